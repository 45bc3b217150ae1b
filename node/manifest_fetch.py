"""Fetching a model's manifest from the peers that hold it.

A manifest is fetched in ranges of RANGE_BYTES from up to RANGE_HOLDERS
holders at once (the plan: manifest_ranges.py), each holder asked with
requests pipelined on one stream, and checked as a whole against the model
CID once every range is in: a 30 MB manifest of a 40,000-fragment model
comes at the holders' summed rate, and one slow holder only loses its ranges
to the others. The first range tells the manifest's size, so a small one is
one request. A holder that sends nothing for STALL_SECONDS is dropped, not
one that is slow but sending.

When the ranges do not hash to the CID (a holder lied, and ranges cannot be
told apart), or no holder answers ranged requests (older nodes), the
manifest is fetched whole from one holder at a time, each checked on its
own, which finds the honest one. Bodies go to unnamed temporary files in the
data dir's state folder, never held whole in memory, and vanish with the
process.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections import deque
from typing import BinaryIO

import trio
from libp2p.peer.id import ID

from fragmenter.manifest import MAX_MANIFEST_BYTES
from protocol import ManifestRequest
from protocol.cid import cid_from_digest

from . import manifest_index
from .client import Session
from .host import NodeError
from .manifest_ranges import RangePlan
from .node import Node

log = logging.getLogger(__name__)

RANGE_BYTES = 1 << 20
RANGE_HOLDERS = 4  # holders asked for ranges at once
RANGES_IN_FLIGHT = 2  # per holder, pipelined on its stream
STALL_SECONDS = 10.0  # a holder that sends nothing this long is dropped
MANIFEST_STAGGER = 3.0  # a holder that has not answered after this long gets company
WHOLE_GRACE = 60.0  # a holder sending a whole manifest gets this long, plus 1 s per MIN_RATE bytes sent
MIN_RATE = 16 << 10


async def fetch_manifest_file(node: Node, model_cid: str, peers: list[ID]) -> tuple[BinaryIO, dict[ID, int]]:
    """An unnamed temporary file (the caller closes it) holding the manifest
    that hashes to `model_cid`, and the bytes of it each holder sent."""
    node.store.state_dir.mkdir(parents=True, exist_ok=True)
    spool = tempfile.TemporaryFile(dir=node.store.state_dir, buffering=0)
    try:
        sources = await _fetch_ranges(node, model_cid, peers, spool)
        if sources is not None:
            if await trio.to_thread.run_sync(manifest_index.cid_of_file, spool) == model_cid:
                return spool, sources
            log.warning(
                "the manifest ranges from %s do not hash to %s: fetching it whole, from one holder at a time",
                ", ".join(str(p) for p in sources),
                model_cid,
            )
    except BaseException:
        spool.close()
        raise
    spool.close()
    whole = await _fetch_whole(node, model_cid, peers)
    return whole, {}


class _RangeFetch:
    def __init__(self, node: Node, model_cid: str, spool: BinaryIO) -> None:
        self.node = node
        self.model_cid = model_cid
        self.spool = spool
        self.plan: RangePlan | None = None
        self.sources: dict[ID, int] = {}
        self.changed = trio.Event()  # the plan was made, or a holder ended
        self.local_error: OSError | None = None

    def wake(self) -> None:
        self.changed.set()

    async def holder(self, peer: ID, cancel: trio.CancelScope) -> None:
        """Ranges from `peer` until there is none left for it, or it fails."""
        try:
            with trio.fail_after(STALL_SECONDS):
                session = await Session.open(self.node.host, peer, stall_timeout=STALL_SECONDS)
        except Exception as e:
            log.info("manifest ranges from %s: %r", peer, e)
            self.wake()
            return
        in_flight: deque[int] = deque()
        try:
            while True:
                while len(in_flight) < RANGES_IN_FLIGHT:
                    if self.plan is None:
                        if in_flight:
                            break  # the first range tells the size: wait for it
                        request = ManifestRequest(self.model_cid, 0, RANGE_BYTES)
                        i = 0
                    else:
                        i = self.plan.next_for(peer)
                        if i is None:
                            break
                        offset, length = self.plan.range_of(i)
                        request = ManifestRequest(self.model_cid, offset, length)
                    await session.send(request)
                    in_flight.append(i)
                if not in_flight:
                    return  # nothing left for this holder
                i = in_flight.popleft()
                if self.plan is None:
                    body, total = await session.read_range(RANGE_BYTES, None)
                    if total > MAX_MANIFEST_BYTES:
                        raise ValueError(f"a manifest of {total} bytes is over the cap")
                    if self.plan is None:  # another holder's first range may have come first
                        self.plan = RangePlan(total, RANGE_BYTES)
                        self.plan.next_for(peer)  # range 0: this one
                        self.wake()
                    elif total != self.plan.total:
                        raise ValueError(f"says the manifest has {total} bytes, not {self.plan.total}")
                else:
                    body, _ = await session.read_range(self.plan.range_of(i)[1], self.plan.total)
                if self.plan.received(i, peer):
                    try:
                        os.pwrite(self.spool.fileno(), body, i * RANGE_BYTES)
                    except OSError as e:
                        self.local_error = e  # our disk, not the peer: no other holder will do better
                        cancel.cancel()
                        return
                    self.sources[peer] = self.sources.get(peer, 0) + len(body)
                    if self.plan.complete:
                        cancel.cancel()
                        return
        except Exception as e:
            log.info("manifest ranges from %s: %r", peer, e)
            if self.plan is not None:
                self.plan.failed(peer)
        finally:
            self.wake()
            await session.close()


async def _fetch_ranges(node: Node, model_cid: str, peers: list[ID], spool: BinaryIO) -> dict[ID, int] | None:
    """The manifest into `spool` in ranges; the bytes each holder sent, or None
    when no set of holders gave every range."""
    fetch = _RangeFetch(node, model_cid, spool)
    waiting = deque(peers)
    active = 0

    async def run(peer: ID, cancel: trio.CancelScope) -> None:
        nonlocal active
        try:
            await fetch.holder(peer, cancel)
        finally:
            active -= 1

    async with trio.open_nursery() as nursery:
        while waiting:
            fetch.changed = trio.Event()  # before looking: no wake between the look and the wait is lost
            if fetch.plan is not None and (fetch.plan.complete or fetch.plan.count == 1 and active):
                break  # done, or too small to share: the holder asked has it coming
            if active < RANGE_HOLDERS:
                active += 1
                nursery.start_soon(run, waiting.popleft(), nursery.cancel_scope)
                if fetch.plan is not None:
                    continue  # the size is known: more holders at once
            # Before the size is known: one more holder per stagger, or when one ends.
            with trio.move_on_after(MANIFEST_STAGGER if fetch.plan is None else float("inf")):
                await fetch.changed.wait()
    if fetch.local_error is not None:
        e = fetch.local_error
        raise NodeError(f"cannot write into {node.store.state_dir}: {e.strerror or e}")
    if fetch.plan is None or not fetch.plan.complete:
        return None
    return fetch.sources


async def _fetch_whole(node: Node, model_cid: str, peers: list[ID]) -> BinaryIO:
    """An unnamed temporary file (the caller closes it) holding the manifest
    from the first holder whose bytes hash to the CID. Holders are asked in
    turn, a new one every MANIFEST_STAGGER seconds while the earlier ones are
    still sending, so a holder that trickles (or stalls) costs seconds, not its
    whole timeout. Bodies stream into such files, hashed on the way: several
    hostile holders sending the largest allowed manifest at once cost disk,
    not memory, and leave nothing behind; nor is the winner ever held whole
    in memory (30 MB at 40,000 fragments)."""
    winner: list[BinaryIO] = []
    local_errors: list[OSError] = []
    node.store.state_dir.mkdir(parents=True, exist_ok=True)

    async def fetch(peer: ID, done: trio.Event) -> None:
        spool = tempfile.TemporaryFile(dir=node.store.state_dir, buffering=0)
        try:
            digest = hashlib.sha256()

            def sink(data: bytes) -> None:
                digest.update(data)
                view = memoryview(data)
                try:
                    while view:  # unbuffered: a full disk fails here, not at some later flush
                        view = view[spool.write(view) :]
                except OSError as e:
                    local_errors.append(e)  # our disk, not the peer: no other holder will do better
                    raise

            try:
                began = trio.current_time()
                received = 0
                with trio.CancelScope(deadline=began + WHOLE_GRACE) as scope:

                    def sink_with_deadline(data: bytes) -> None:
                        nonlocal received
                        sink(data)
                        received += len(data)
                        # The deadline follows progress: a holder sending at MIN_RATE or more is never cut off.
                        scope.deadline = max(scope.deadline, began + WHOLE_GRACE + received / MIN_RATE)

                    session = await Session.open(node.host, peer, stall_timeout=STALL_SECONDS)
                    try:
                        await session.send(ManifestRequest(model_cid))
                        await session.read_data_to(sink_with_deadline, MAX_MANIFEST_BYTES)
                    finally:
                        await session.close()
                if scope.cancelled_caught:
                    raise trio.TooSlowError(f"under {MIN_RATE} B/s")
            except Exception as e:
                if local_errors:
                    nursery.cancel_scope.cancel()
                else:
                    log.info("manifest from %s failed: %r", peer, e)
                return
            finally:
                done.set()
            if cid_from_digest(digest.digest()) != model_cid:
                log.warning("peer %s sent a manifest that does not match %s", peer, model_cid)
            elif not winner:
                winner.append(spool)  # hashes to the CID: the publisher's own bytes
                nursery.cancel_scope.cancel()
        finally:
            if not winner or winner[0] is not spool:
                spool.close()

    async with trio.open_nursery() as nursery:
        for peer in peers:
            done = trio.Event()
            nursery.start_soon(fetch, peer, done)
            with trio.move_on_after(MANIFEST_STAGGER):
                await done.wait()
    if local_errors:
        for spool in winner:
            spool.close()
        raise NodeError(f"cannot write into {node.store.state_dir}: {local_errors[0].strerror or local_errors[0]}")
    if not winner:
        raise NodeError(f"no peer sent a manifest matching {model_cid}")
    return winner[0]
