"""Pulling a model by CID: find peers, fetch and check the manifest, then fetch
fragments from many peers at once (the Scheduler decides who gives what),
verify each against the manifest, write it atomically, and serve and announce
it as soon as it is verified. A restart resumes: verified fragments on disk
are re-hashed once and kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.peer.id import ID

from fragmenter import FragmenterError, parse_header, parse_manifest, write_tokenizer_files
from protocol import FragmentRequest, HaveRequest, ManifestRequest, cid_of, decode_bitfield
from protocol.messages import MAX_FRAGMENT_BYTES

from .client import RemoteError, Session, request_body, request_have
from .host import NodeError
from .node import Node
from .scheduler import Scheduler
from .store import LocalModel

log = logging.getLogger(__name__)
Event = dict[str, Any]


@dataclass
class PullOptions:
    find_timeout: float = 30.0  # give up when no peer has the model after this long
    stall_timeout: float = 60.0  # give up when fragments stay unavailable this long
    refresh_every: float = 1.0  # ask known peers for their have-sets this often
    discover_every: float = 30.0  # look for more holders on the DHT this often
    peer_stall_timeout: float = 30.0  # a peer that sends nothing this long mid-answer is dropped
    on_event: Callable[[Event], None] = lambda e: None


@dataclass
class PullStats:
    bytes_fetched: int = 0
    fragments_fetched: int = 0
    already_had: int = 0
    seconds: float = 0.0  # the whole pull: finding peers, manifest, fragments, tokenizer
    transfer_seconds: float = 0.0  # from the first fragment request to the last one verified
    bytes_by_peer: dict[str, int] = field(default_factory=dict)
    bad_peers: set[str] = field(default_factory=set)


SESSION_IDLE = 20.0  # a session with nothing to ask is closed (servers close at 60 s)


async def pull_model(node: Node, model_cid: str, options: PullOptions | None = None) -> tuple[LocalModel, PullStats]:
    opts = options or PullOptions()
    stats = PullStats()
    start = time.monotonic()
    emit = opts.on_event

    model = node.store.models.get(model_cid)
    peers = await _find_holders(node, model_cid, opts, need=model is None or not model.complete)
    if model is None:
        model = await _fetch_manifest(node, model_cid, peers)
        emit(
            {"event": "manifest", "model": model_cid, "fragments": len(model.have), "bytes": model.manifest.total_bytes}
        )
    else:
        dropped = await trio.to_thread.run_sync(node.store.reverify, model)
        if dropped:
            emit({"event": "dropped_corrupt", "fragments": dropped})
    stats.already_had = sum(model.have)
    if not model.header_present:
        await _fetch_header(node, model, peers)

    entries = model.manifest.fragments
    sched = Scheduler(
        len(entries),
        {i for i, h in enumerate(model.have) if h},
        per_peer=node.config.requests_per_peer,
        sizes=[e.size for e in entries],
        per_peer_bytes=node.config.request_bytes_per_peer,
    )
    total = model.manifest.total_bytes
    done_bytes = sum(e.size for e, h in zip(entries, model.have, strict=True) if h)
    announced = bool(sched.have)
    if announced:
        node.announce_model(model)
    send, receive = trio.open_memory_channel[tuple[str, ID, int, bytes | None]](math.inf)
    queues: dict[ID, trio.MemorySendChannel[int]] = {}  # requests for each peer's session
    verify_slots = trio.Semaphore(4)  # bodies held in memory while being verified
    known_peers: set[ID] = set(peers)
    stalled_since: float | None = None

    def dispatch(peer: ID, index: int) -> None:
        queue = queues.get(peer)
        if queue is None:
            queue, requests = trio.open_memory_channel[int](math.inf)
            queues[peer] = queue
            nursery.start_soon(peer_session, peer, requests)
        queue.send_nowait(index)

    async def peer_session(peer: ID, requests: trio.MemoryReceiveChannel[int]) -> None:
        """One stream to `peer`: requests written as the scheduler hands them out,
        answers read back in order, each verified on a worker thread."""
        pending: deque[int] = deque()
        session: Session | None = None
        try:
            with trio.fail_after(10):
                session = await Session.open(node.host, peer, opts.peer_stall_timeout)
            while peer not in sched.banned:
                while True:  # write every queued request before reading
                    try:
                        index = requests.receive_nowait()
                    except trio.WouldBlock:
                        break
                    if not model.have[index]:  # an endgame duplicate already won elsewhere
                        await session.send(FragmentRequest(model.fragment_cids[index]))
                        pending.append(index)
                if not pending:
                    next_index: int | None = None
                    with trio.move_on_after(SESSION_IDLE):
                        next_index = await requests.receive()
                    if next_index is None:
                        return  # idle: the finally clause retires this session
                    if not model.have[next_index]:
                        await session.send(FragmentRequest(model.fragment_cids[next_index]))
                        pending.append(next_index)
                    continue
                index = pending[0]
                size = entries[index].size
                try:
                    data = await session.read_data(size)
                except RemoteError as e:  # this request failed; the stream is still good
                    pending.popleft()
                    log.info("fragment %d from %s: %s", index, peer, e)
                    await send.send(("failed", peer, index, None))
                    continue
                pending.popleft()
                await send.send(("received", peer, index, None))
                await verify_slots.acquire()
                nursery.start_soon(verify, peer, index, data)
        except Exception as e:  # TooSlowError, a dropped connection, a protocol violation...
            log.info("session with %s failed: %r", peer, e)
        finally:
            if queues.get(peer) is not None:
                del queues[peer]
            while True:
                try:
                    pending.append(requests.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            for index in pending:
                send.send_nowait(("failed", peer, index, None))
            if session is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    await session.close()

    async def verify(peer: ID, index: int, data: bytes) -> None:
        try:
            ok = await trio.to_thread.run_sync(_verify_and_store, node, model, index, data)
        finally:
            verify_slots.release()
        await send.send(("verified" if ok else "bad", peer, index, None))

    async def discover() -> None:
        while True:
            for info in await node.find_providers(model_cid, timeout=10):
                known_peers.add(info.peer_id)
            await trio.sleep(opts.discover_every)

    async def refresh_haves() -> None:
        while True:
            known_peers.update(node.connected_peers())
            async with trio.open_nursery() as n:
                for peer in list(known_peers):
                    if peer not in sched.banned:
                        n.start_soon(ask_have, peer)
            await trio.sleep(opts.refresh_every)

    async def ask_have(peer: ID) -> None:
        try:
            with trio.fail_after(5):
                have = await request_have(node.host, peer, HaveRequest(model_cid))
            if have.count == len(entries):
                await send.send(("have", peer, 0, bytes(have.bitfield)))
        except Exception:
            pass  # not a holder (yet), or gone

    transfer_start = time.monotonic()
    with node.transferring():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(discover)
            nursery.start_soon(refresh_haves)
            for peer in peers:
                nursery.start_soon(ask_have, peer)
            last_progress = 0.0
            while not sched.done:
                with trio.move_on_after(1.0):
                    kind, peer, index, payload = await receive.receive()
                    if kind == "have":
                        bits = decode_bitfield(payload or b"", len(entries))
                        sched.peer_have(peer, {i for i, b in enumerate(bits) if b})
                    elif kind == "verified":
                        if index not in sched.have:
                            size = entries[index].size
                            done_bytes += size
                            stats.bytes_fetched += size
                            stats.fragments_fetched += 1
                            key = str(peer)
                            stats.bytes_by_peer[key] = stats.bytes_by_peer.get(key, 0) + size
                            if announced:
                                node.announce_fragment(model.fragment_cids[index])
                            else:
                                node.announce_model(model)  # the model CID first, as soon as we can serve
                                announced = True
                        sched.verified(peer, index)  # duplicates still queued are skipped at sending
                    elif kind == "bad":
                        sched.failed(peer, index, bad_data=True)
                        stats.bad_peers.add(str(peer))
                        emit({"event": "bad_peer", "peer": str(peer), "fragment": entries[index].fragment_id})
                    elif kind == "received":
                        sched.received(peer, index)
                    elif kind == "failed":
                        sched.failed(peer, index)
                for peer_, index_ in sched.next_requests():
                    dispatch(peer_, index_)
                now = time.monotonic()
                if now - last_progress >= 0.2 or sched.done:
                    last_progress = now
                    emit(
                        {
                            "event": "progress",
                            "done": done_bytes,
                            "total": total,
                            "peers": len(sched.peers),
                            "fragments_done": len(sched.have),
                            "fragments": len(entries),
                        }
                    )
                if not sched.fetching and sched.unavailable() and not sched.done:
                    stalled_since = stalled_since or now
                    if now - stalled_since > opts.stall_timeout:
                        raise NodeError(f"stalled: {len(sched.unavailable())} fragments are held by no reachable peer")
                else:
                    stalled_since = None
            stats.transfer_seconds = time.monotonic() - transfer_start
            nursery.cancel_scope.cancel()

    await trio.to_thread.run_sync(_write_tokenizer, model)
    stats.seconds = time.monotonic() - start
    return model, stats


async def _find_holders(node: Node, model_cid: str, opts: PullOptions, need: bool) -> list[ID]:
    """Peers that answer a have-request for this model. Connected peers (the
    bootstrap nodes) are asked first, so a pull from a seed starts at once;
    only when none of them holds the model does the pull wait for the DHT
    (which the have-refresh loop keeps searching during the pull anyway)."""
    deadline = time.monotonic() + opts.find_timeout
    while True:
        holders = await _holders_among(node, model_cid, node.connected_peers())
        if not holders:
            providers = [info.peer_id for info in await node.find_providers(model_cid, timeout=5)]
            holders = await _holders_among(node, model_cid, providers)
        if holders or not need:
            return holders
        if time.monotonic() > deadline:
            raise NodeError(f"no peer has model {model_cid} (searched for {opts.find_timeout:.0f} s)")
        await trio.sleep(1.0)


async def _holders_among(node: Node, model_cid: str, peers: list[ID]) -> list[ID]:
    holders: list[ID] = []

    async def ask(peer: ID) -> None:
        try:
            with trio.fail_after(5):
                have = await request_have(node.host, peer, HaveRequest(model_cid))
            if any(have.bitfield):
                holders.append(peer)
        except Exception:
            pass  # not a holder, or unreachable

    async with trio.open_nursery() as nursery:
        for peer in set(peers):
            nursery.start_soon(ask, peer)
    return holders


async def _fetch_manifest(node: Node, model_cid: str, peers: list[ID]) -> LocalModel:
    for peer in peers:
        try:
            with trio.fail_after(60):
                data = await request_body(node.host, peer, ManifestRequest(model_cid), MAX_FRAGMENT_BYTES)
        except Exception as e:
            log.info("manifest from %s failed: %r", peer, e)
            continue
        if cid_of(data) != model_cid:
            log.warning("peer %s sent a manifest that does not match %s", peer, model_cid)
            continue
        try:
            parse_manifest(json.loads(data), "manifest from peer")
        except (FragmenterError, ValueError) as e:
            raise NodeError(f"model {model_cid} has an unusable manifest: {e}") from None
        return await trio.to_thread.run_sync(node.store.begin_model, model_cid, data)
    raise NodeError(f"no peer sent a manifest matching {model_cid}")


async def _fetch_header(node: Node, model: LocalModel, peers: list[ID]) -> None:
    if model.header_cid is None:
        raise NodeError("the manifest has no header_sha256; cannot fetch gguf_header.dat safely")
    expected = model.manifest.raw["header_sha256"]
    for peer in peers:
        try:
            with trio.fail_after(60):
                data = await request_body(
                    node.host, peer, FragmentRequest(model.header_cid), model.manifest.header_size
                )
        except Exception:
            continue
        if hashlib.sha256(data).hexdigest() == expected:
            await trio.to_thread.run_sync(node.store.add_blob, model, -1, data)
            return
    raise NodeError("no peer sent a gguf_header.dat matching the manifest")


def _verify_and_store(node: Node, model: LocalModel, index: int, data: bytes) -> bool:
    entry = model.manifest.fragments[index]
    if len(data) != entry.size or not entry.matches_digest(hashlib.sha256(data).hexdigest()):
        return False
    if not model.have[index]:
        node.store.add_blob(model, index, data)
    return True


def _write_tokenizer(model: LocalModel) -> None:
    try:
        header = parse_header((model.folder / "gguf_header.dat").read_bytes())
        write_tokenizer_files(header, model.folder)
    except FragmenterError as e:
        log.warning("no tokenizer files for %s: %s", model.cid, e)
