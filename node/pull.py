"""Pulling a model by CID: find holders, fetch and check the manifest and the
header, fetch the fragments (transfer.py), write the tokenizer files.
A restart resumes: verified fragments on disk are re-hashed once and kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time

import trio
from libp2p.peer.id import ID

from fragmenter import FragmenterError, parse_header, parse_manifest, write_tokenizer_files
from protocol import FragmentRequest, HaveRequest, ManifestRequest, cid_of
from protocol.messages import MAX_FRAGMENT_BYTES

from .client import request_body, request_have
from .host import NodeError
from .node import Node
from .store import LocalModel
from .transfer import PullOptions, PullStats, Transfer

__all__ = ["PullOptions", "PullStats", "pull_model"]

log = logging.getLogger(__name__)


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

    await Transfer(node, model, peers, opts, stats).run()
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


def _write_tokenizer(model: LocalModel) -> None:
    try:
        header = parse_header((model.folder / "gguf_header.dat").read_bytes())
        write_tokenizer_files(header, model.folder)
    except FragmenterError as e:
        log.warning("no tokenizer files for %s: %s", model.cid, e)
