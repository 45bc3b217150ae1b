"""Fetching a model's missing fragments from many peers at once.

The pure `Scheduler` decides which peer gives which fragment; this module does
the I/O around it:
- one `Session` (stream) per peer, requests pipelined on it as the scheduler
  hands them out, answers read back in order;
- each body is verified (SHA-256 against the manifest) and written atomically
  on a worker thread, while the session goes on reading;
- have-sets are refreshed every second from every peer known to care about
  the model: connected peers, DHT providers (looked up with backoff up to
  `discover_every`), and peers that asked us for our own have-set;
- every outcome comes back to one loop as an event, so the scheduler is only
  ever touched from there.
A verified fragment is served at once (the store knows it) and announced.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.peer.id import ID

from protocol import FragmentRequest, HaveRequest, decode_bitfield

from .client import RemoteError, Session, request_have
from .host import NodeError
from .node import Node
from .scheduler import Scheduler
from .store import LocalModel

log = logging.getLogger(__name__)
Event = dict[str, Any]

SESSION_IDLE = 20.0  # a session with nothing to ask is closed (servers close theirs at 60 s)
VERIFY_SLOTS = 4  # bodies held in memory while being verified and written
HAVE_TIMEOUT = 30.0  # a have answer can queue behind megabytes of fragments on a slow link


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


@dataclass(frozen=True)
class _Outcome:
    kind: str  # "have", "received", "verified", "bad", "failed"
    peer: ID
    index: int = -1
    bitfield: bytes = b""


class Transfer:
    def __init__(self, node: Node, model: LocalModel, peers: list[ID], opts: PullOptions, stats: PullStats) -> None:
        self.node = node
        self.model = model
        self.opts = opts
        self.stats = stats
        self.entries = model.manifest.fragments
        self.sched = Scheduler(
            len(self.entries),
            {i for i, h in enumerate(model.have) if h},
            per_peer=node.config.requests_per_peer,
            sizes=[e.size for e in self.entries],
            per_peer_bytes=node.config.request_bytes_per_peer,
        )
        self.known_peers: set[ID] = set(peers)
        self.done_bytes = sum(e.size for e, h in zip(self.entries, model.have, strict=True) if h)
        self._outcomes, self._outcome_queue = trio.open_memory_channel[_Outcome](math.inf)
        self._requests: dict[ID, trio.MemorySendChannel[int]] = {}  # each live session's queue
        self._verify_slots = trio.Semaphore(VERIFY_SLOTS)
        self._announced = bool(self.sched.have)
        self._nursery: trio.Nursery  # set by run(); sessions, verifications and have-loops live in it

    async def run(self) -> None:
        """Until every fragment is verified; NodeError if they stay unavailable."""
        if self._announced:
            self.node.announce_model(self.model)
        start = time.monotonic()
        with self.node.transferring():
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._discover)
                nursery.start_soon(self._refresh_haves)
                await self._event_loop()
                nursery.cancel_scope.cancel()
        self.stats.transfer_seconds = time.monotonic() - start

    async def _event_loop(self) -> None:
        last_progress = 0.0
        stalled_since: float | None = None
        while not self.sched.done:
            with trio.move_on_after(1.0):
                self._apply(await self._outcome_queue.receive())
            for peer, index in self.sched.next_requests():
                self._dispatch(peer, index)
            now = time.monotonic()
            if now - last_progress >= 0.2 or self.sched.done:
                last_progress = now
                self._progress()
            if not self.sched.fetching and not self.sched.verifying and self.sched.unavailable():
                stalled_since = stalled_since or now
                if now - stalled_since > self.opts.stall_timeout:
                    missing = len(self.sched.unavailable())
                    raise NodeError(f"stalled: {missing} fragments are held by no reachable peer")
            else:
                stalled_since = None

    def _apply(self, out: _Outcome) -> None:
        sched = self.sched
        if out.kind == "have":
            bits = decode_bitfield(out.bitfield, len(self.entries))
            sched.peer_have(out.peer, {i for i, b in enumerate(bits) if b})
        elif out.kind == "received":
            sched.received(out.peer, out.index)
        elif out.kind == "verified":
            if out.index not in sched.have:
                self._count(out.peer, out.index)
            sched.verified(out.peer, out.index)  # endgame duplicates still queued are skipped when sending
        elif out.kind == "bad":
            sched.failed(out.peer, out.index, bad_data=True)
            self.stats.bad_peers.add(str(out.peer))
            self.opts.on_event(
                {"event": "bad_peer", "peer": str(out.peer), "fragment": self.entries[out.index].fragment_id}
            )
        elif out.kind == "failed":
            sched.failed(out.peer, out.index)

    def _count(self, peer: ID, index: int) -> None:
        size = self.entries[index].size
        self.done_bytes += size
        self.stats.bytes_fetched += size
        self.stats.fragments_fetched += 1
        key = str(peer)
        self.stats.bytes_by_peer[key] = self.stats.bytes_by_peer.get(key, 0) + size
        if self._announced:
            self.node.announce_fragment(self.model.fragment_cids[index])
        else:
            self.node.announce_model(self.model)  # the model CID first, as soon as we can serve
            self._announced = True

    def _progress(self) -> None:
        self.opts.on_event(
            {
                "event": "progress",
                "done": self.done_bytes,
                "total": self.model.manifest.total_bytes,
                "peers": len(self.sched.peers),
                "fragments_done": len(self.sched.have),
                "fragments": len(self.entries),
            }
        )

    # ---- one session per peer --------------------------------------------

    def _dispatch(self, peer: ID, index: int) -> None:
        queue = self._requests.get(peer)
        if queue is None:
            queue, requests = trio.open_memory_channel[int](math.inf)
            self._requests[peer] = queue
            self._nursery.start_soon(self._session, peer, requests)
        queue.send_nowait(index)

    async def _session(self, peer: ID, requests: trio.MemoryReceiveChannel[int]) -> None:
        """One stream to `peer`: requests written as they are handed out,
        answers read back in order, bodies passed on for verification."""
        pending: deque[int] = deque()  # sent, answer not yet read
        session: Session | None = None
        try:
            with trio.fail_after(10):
                session = await Session.open(self.node.host, peer, self.opts.peer_stall_timeout)
            while peer not in self.sched.banned:
                while True:  # write every queued request before reading
                    try:
                        await self._send(session, requests.receive_nowait(), pending)
                    except trio.WouldBlock:
                        break
                if not pending:
                    index: int | None = None
                    with trio.move_on_after(SESSION_IDLE):
                        index = await requests.receive()
                    if index is None:
                        return  # idle; `finally` retires the session before anything can be queued
                    await self._send(session, index, pending)
                    continue
                first = pending[0]
                try:
                    data = await session.read_data(self.entries[first].size)
                except RemoteError as e:  # this one request failed; the stream is still good
                    pending.popleft()
                    log.info("fragment %d from %s: %s", first, peer, e)
                    self._outcomes.send_nowait(_Outcome("failed", peer, first))
                    continue
                pending.popleft()
                self._outcomes.send_nowait(_Outcome("received", peer, first))
                if self.model.have[first]:
                    continue  # an endgame duplicate that lost the race: no need to hash it
                await self._verify_slots.acquire()
                self._nursery.start_soon(self._verify, peer, first, data)
        except Exception as e:  # TooSlowError, a dropped connection, a protocol violation...
            log.info("session with %s failed: %r", peer, e)
        finally:
            if self._requests.get(peer) is not None:
                del self._requests[peer]
            while True:
                try:
                    pending.append(requests.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            for index in pending:
                self._outcomes.send_nowait(_Outcome("failed", peer, index))
            if session is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    if pending:  # answers we will not read: stop the peer from sending them
                        await session.reset()
                    else:
                        await session.close()

    async def _send(self, session: Session, index: int, pending: deque[int]) -> None:
        if not self.model.have[index]:  # else an endgame duplicate already won elsewhere
            pending.append(index)  # first, so that a failed send is reported as failed
            await session.send(FragmentRequest(self.model.fragment_cids[index]))

    async def _verify(self, peer: ID, index: int, data: bytes) -> None:
        try:
            ok = await trio.to_thread.run_sync(_verify_and_store, self.node, self.model, index, data)
        except OSError as e:  # a full or failing disk: nothing a peer can fix
            raise NodeError(f"cannot write into {self.model.folder}: {e.strerror or e}") from None
        finally:
            self._verify_slots.release()
        self._outcomes.send_nowait(_Outcome("verified" if ok else "bad", peer, index))

    # ---- who holds what ---------------------------------------------------

    async def _discover(self) -> None:
        """DHT lookups for more holders: soon and often at first, when other
        pullers are just starting to announce, then every `discover_every`."""
        pause = 1.0
        while True:
            for info in await self.node.find_providers(self.model.cid, timeout=10):
                self.known_peers.add(info.peer_id)
            await trio.sleep(pause)
            pause = min(pause * 2, self.opts.discover_every)

    async def _refresh_haves(self) -> None:
        """One have-loop per peer, so that a peer slow to answer (its link busy
        with our fragments) delays nobody else's have-set."""
        polled: set[ID] = set()
        while True:
            self.known_peers.update(self.node.connected_peers())
            self.known_peers.update(self.node.server.askers.get(self.model.cid, ()))
            for peer in self.known_peers - polled - self.sched.banned:
                polled.add(peer)
                self._nursery.start_soon(self._have_loop, peer, polled)
            await trio.sleep(self.opts.refresh_every)

    async def _have_loop(self, peer: ID, polled: set[ID]) -> None:
        failures = 0
        while peer not in self.sched.banned and failures < 3:
            try:
                with trio.fail_after(HAVE_TIMEOUT):
                    have = await request_have(self.node.host, peer, HaveRequest(self.model.cid))
                failures = 0
                if have.count == len(self.entries):
                    self._outcomes.send_nowait(_Outcome("have", peer, bitfield=bytes(have.bitfield)))
            except Exception:
                failures += 1  # not a holder (yet), or slow, or gone
            await trio.sleep(self.opts.refresh_every)
        polled.discard(peer)  # asked again if it shows up again
        self.known_peers.discard(peer)


def _verify_and_store(node: Node, model: LocalModel, index: int, data: bytes) -> bool:
    entry = model.manifest.fragments[index]
    if len(data) != entry.size or not entry.matches_digest(hashlib.sha256(data).hexdigest()):
        return False
    if not model.have[index]:
        node.store.add_blob(model, index, data)
    return True
