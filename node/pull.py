"""Pulling a model by CID: find holders, fetch and check the manifest, then let
the model's swarm (swarm.py) fetch every block, header included, while the
tokenizer files are built from the header as soon as it is in.

A restart resumes: whole files under their final names were verified before
they got those names and are kept, and so are the verified blocks of files
that were still partial (blockstore.py hashes them again on resume).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import trio
from libp2p.peer.id import ID

from fragmenter import FragmenterError, Manifest
from fragmenter.build_tokenizer import CANNOT_WRITE
from fragmenter.manifest import HEADER_NAME
from fragmenter.selection import Selection
from fragmenter.tokenizer import TOKENIZER_JSON
from protocol import HaveRequest

from . import manifest_index
from .client import request_have
from .host import NodeError
from .manifest_fetch import fetch_manifest_file
from .node import Node
from .store import LocalModel
from .swarm import ModelSwarm, SwarmFailed, Want

__all__ = ["PullOptions", "PullStats", "fetch_manifest", "find_holders", "pull_model"]

log = logging.getLogger(__name__)
Event = dict[str, Any]


@dataclass
class PullOptions:
    find_timeout: float = 30.0  # give up when no peer has the model after this long
    stall_timeout: float = 60.0  # give up when no block is verified for this long
    discover_every: float = 30.0  # look for more holders on the DHT at most this rarely
    selection: Selection = field(default_factory=Selection)  # what part of the model (default: all of it)
    on_event: Callable[[Event], None] = lambda e: None


@dataclass
class PullStats:
    bytes_fetched: int = 0
    fragments_fetched: int = 0
    already_had: int = 0
    seconds: float = 0.0  # the whole pull: finding peers, manifest, blocks, tokenizer
    transfer_seconds: float = 0.0  # from the first block request to the last block verified
    bytes_by_peer: dict[str, int] = field(default_factory=dict)
    bad_peers: set[str] = field(default_factory=set)


async def pull_model(node: Node, model_cid: str, options: PullOptions | None = None) -> tuple[LocalModel, PullStats]:
    opts = options or PullOptions()
    stats = PullStats()
    start = time.monotonic()

    model = node.store.models.get(model_cid)
    if model is not None and node.store.pulled_unsynced(model):
        await _recheck_unrecorded(node, model)
    wanted = None if model is None else _wanted(model, opts.selection)
    held = model is not None and wanted is not None and model.header_present and all(model.have[k] for k in wanted)
    peers = await find_holders(node, model_cid, opts, need=not held)
    if model is None:
        model = await _fetch_manifest(node, model_cid, peers)
        wanted = _wanted(model, opts.selection)
        opts.on_event(
            {"event": "manifest", "model": model_cid, "fragments": len(model.have), "bytes": model.manifest.total_bytes}
        )
    assert wanted is not None
    stats.already_had = sum(1 for k in wanted if model.have[k])
    had = set(i for i, h in enumerate(model.have) if h)

    swarm = await node.swarm_for(model)
    swarm.on_event = opts.on_event
    transfer_start = time.monotonic()
    before = (swarm.stats.bytes_fetched, dict(swarm.stats.bytes_by_peer), swarm.stats.last_block)
    try:
        handle = swarm.want([*wanted, len(model.have)])  # and the header, file n: every part needs it
    except SwarmFailed as e:
        raise NodeError(str(e)) from None
    try:
        await _transfer(node, swarm, handle, peers, opts)
    except BaseExceptionGroup as group:  # a nursery's wrapping: the caller wants the NodeError itself
        errors = group.subgroup(NodeError)
        if errors is None:
            raise
        raise _first(errors) from None
    finally:
        if not handle.done.is_set():
            swarm.unwant(handle)  # given up (stalled, cancelled): what only it wanted is no longer fetched

    # This pull's share of what the model's swarm (which may outlive it) has done.
    s = swarm.stats
    stats.bytes_fetched = s.bytes_fetched - before[0]
    stats.fragments_fetched = sum(1 for i, h in enumerate(model.have) if h and i not in had)
    stats.bytes_by_peer = {p: n - before[1].get(p, 0) for p, n in s.bytes_by_peer.items() if n > before[1].get(p, 0)}
    stats.bad_peers = set(s.bad_peers)
    if s.first_request is not None and s.last_block is not None and s.last_block != before[2]:
        stats.transfer_seconds = s.last_block - max(s.first_request, transfer_start)
    stats.seconds = time.monotonic() - start
    return model, stats


async def _transfer(node: Node, swarm: ModelSwarm, handle: Want, peers: list[ID], opts: PullOptions) -> None:
    """Every block wanted in, and the tokenizer files written from the header meanwhile."""
    model = swarm.model
    with node.transferring():
        node.announce_model(model)  # the model CID at once: we serve blocks as soon as they are in
        async with trio.open_nursery() as nursery:
            tokenizer_done = trio.Event()

            async def tokenizer() -> None:
                await _write_tokenizer(model)
                tokenizer_done.set()

            header = len(model.have)
            if (model.folder / TOKENIZER_JSON).exists():
                tokenizer_done.set()  # an earlier pull of this model (or part of it) wrote it
            elif model.header_present:
                nursery.start_soon(tokenizer)
            else:
                swarm.on_file_complete = lambda k: nursery.start_soon(tokenizer) if k == header else None
            try:
                swarm.add_peers(peers)
                nursery.start_soon(_discover, node, swarm, opts)
                await _wait(swarm, handle, opts)
                await tokenizer_done.wait()
                nursery.cancel_scope.cancel()
            finally:
                swarm.on_file_complete = lambda k: None  # this nursery is closing
                swarm.on_event = lambda e: None


def _wanted(model: LocalModel, selection: Selection) -> list[int]:
    try:
        return selection.fragments(model.manifest)
    except FragmenterError as e:
        raise NodeError(f"model {model.cid}: {e}") from None


def _first(group: BaseExceptionGroup) -> BaseException:
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    return leaf


async def _wait(swarm: ModelSwarm, handle: Want, opts: PullOptions) -> None:
    """Until this pull's files are in; NodeError when the swarm fails or stays silent."""
    last_bytes, last_change = -1, time.monotonic()
    while True:
        with trio.move_on_after(1.0):
            await handle.done.wait()
        if swarm.failure is not None:
            raise NodeError(str(swarm.failure))
        if handle.done.is_set():
            return
        received = swarm.stats.bytes_fetched  # verified: bytes that arrive and go nowhere are no progress
        if received != last_bytes:
            last_bytes, last_change = received, time.monotonic()
        elif time.monotonic() - last_change > opts.stall_timeout:
            fragments = swarm.model.manifest.fragments
            names = [fragments[k].file_name if k < len(fragments) else HEADER_NAME for k in sorted(handle.missing)]
            names.sort(key=lambda name: name != HEADER_NAME)
            raise NodeError(
                f"stalled: no block verified for {opts.stall_timeout:.0f} s, with {len(swarm.links)} peer(s); "
                f"{len(names)} file(s) missing, e.g. {', '.join(names[:3])}"
            )


async def _discover(node: Node, swarm: ModelSwarm, opts: PullOptions) -> None:
    """More holders for the swarm: peers that asked us for this model, connected
    peers, and DHT providers (soon and often at first, when other pullers are
    just starting to announce, then every `discover_every`)."""
    pause = 1.0
    next_lookup = time.monotonic()
    while True:
        swarm.add_peers(list(node.server.askers.get(swarm.model.cid, ())))
        if time.monotonic() >= next_lookup:
            swarm.add_peers([info.peer_id for info in await node.find_providers(swarm.model.cid, timeout=10)])
            next_lookup = time.monotonic() + pause
            pause = min(pause * 2, opts.discover_every)
        await trio.sleep(1.0)


async def find_holders(node: Node, model_cid: str, opts: PullOptions, need: bool) -> list[ID]:
    """Peers that answer a have-request for this model. Connected peers (the
    bootstrap nodes) are asked first, so a pull from a seed starts at once;
    only when none of them holds the model does the pull wait for the DHT
    (which the discovery loop keeps searching during the pull anyway)."""
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
            # A model without tensors (a vocabulary-only GGUF) has no fragments, only
            # its header: a peer that knows the model is then a holder with no bits set.
            if have.count == 0 or any(have.bitfield):
                holders.append(peer)
        except Exception:
            pass  # not a holder, or unreachable

    async with trio.open_nursery() as nursery:
        for peer in set(peers):
            nursery.start_soon(ask, peer)
    return holders


async def _fetch_manifest(node: Node, model_cid: str, peers: list[ID]) -> LocalModel:
    with (await fetch_manifest_file(node, model_cid, peers))[0] as spool:
        manifest = await trio.to_thread.run_sync(
            _parse_fetched, spool, model_cid, node.store.pulled_index_path(model_cid)
        )
        return await trio.to_thread.run_sync(node.store.begin_model, model_cid, spool, manifest)


async def fetch_manifest(node: Node, model_cid: str, peers: list[ID]) -> tuple[bytes, Manifest]:
    """The manifest's bytes, from its holders (manifest_fetch.py), and what they parse to."""
    with (await fetch_manifest_file(node, model_cid, peers))[0] as spool:
        manifest = await trio.to_thread.run_sync(_parse_fetched, spool, model_cid, None)
        spool.seek(0)
        return spool.read(), manifest


def _parse_fetched(spool: BinaryIO, model_cid: str, index_path: Path | None) -> Manifest:
    try:
        manifest = manifest_index.parse(spool, model_cid, index_path, "manifest from peer")
    except FragmenterError as e:
        raise NodeError(f"model {model_cid} has an unusable manifest: {e}") from None
    if manifest.raw.get("header_sha256") is None:
        raise NodeError("the manifest has no header_sha256; cannot fetch gguf_header.dat safely")
    return manifest


async def _recheck_unrecorded(node: Node, model: LocalModel) -> None:
    """Hash the files held without a verified record before they count as held,
    in a folder a pull wrote into since its records were last made whole (after
    a crash, say). Pulled files are made durable in batches, just before their
    records are saved (Store.flush_verified): a file named after the last batch
    may hold anything after a power cut. One that does not match is dropped,
    and fetched again."""
    folder = model.folder
    names = [e.file_name for e in model.manifest.fragments]
    unrecorded = [
        k for k, name in enumerate(names) if model.have[k] and node.store.verified_blocks(folder / name) is None
    ]
    if model.header_present and node.store.verified_blocks(folder / HEADER_NAME) is None:
        unrecorded.append(len(names))
    if not unrecorded:
        return
    swarm = await node.swarm_for(model)
    await trio.to_thread.run_sync(lambda: [swarm.blocks.file_digests(k) for k in unrecorded])


async def _write_tokenizer(model: LocalModel) -> None:
    """The tokenizer files, built in a process of their own (see fragmenter/build_tokenizer.py)."""
    header = model.folder / "gguf_header.dat"
    result = await trio.run_process(
        [sys.executable, "-m", "fragmenter.build_tokenizer", str(header), str(model.folder)],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    reason = result.stderr.decode(errors="replace").strip()[-300:]
    if result.returncode == CANNOT_WRITE:  # a full disk, say: the folder cannot be whole
        last = reason.splitlines()[-1] if reason else f"cannot write the tokenizer files into {model.folder}"
        raise NodeError(last.removeprefix("error: "))
    if result.returncode != 0:  # a vocabulary we cannot write them for: the fragments are still the model
        log.warning("no tokenizer files for %s: %s", model.cid, reason)
