"""Who holds which fragments of a model: asked of every holder we can find.

Used by `gguf-swarm where` (the coverage map) and by adopters (which rare
fragments to take on). Holders are found the way a pull finds them: connected
peers, the model's swarm, and the DHT's providers of the model CID; each is
asked for its have-bitfield (`/gguf-swarm/1.0.0` HaveRequest).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio
from libp2p.peer.id import ID

from fragmenter import Manifest
from protocol import FetchingRequest, HaveRequest, decode_bitfield

from .client import Session
from .host import NodeError
from .node import Node
from .pull import fetch_manifest

log = logging.getLogger(__name__)
HAVE_TIMEOUT = 5.0


@dataclass
class Survey:
    manifest: Manifest
    manifest_bytes: bytes  # what hashes to the model CID (to start a folder for the model)
    holdings: dict[str, list[bool]]  # peer id -> fragment k held (manifest order); this node included when it holds any
    fetching: dict[str, list[bool]]  # peer id -> fragment k being fetched now (copies on their way); peers fetching any
    peers: dict[str, ID]  # the peers of `holdings`, to dial


async def survey(node: Node, model_cid: str, *, find_timeout: float = 10.0) -> Survey:
    """The holdings of every peer found; NodeError when nobody has the model
    (and we do not have its manifest)."""
    candidates = set(node.connected_peers())
    swarm = node.swarms.get(model_cid)
    if swarm is not None:
        candidates |= set(swarm.links) | set(swarm.known)
    candidates |= {info.peer_id for info in await node.find_providers(model_cid, timeout=find_timeout)}
    candidates.discard(node.peer_id)
    haves: dict[ID, tuple[int, bytes]] = {}
    fetches: dict[ID, tuple[int, bytes]] = {}

    async def ask(peer: ID) -> None:
        try:
            with trio.fail_after(HAVE_TIMEOUT):
                session = await Session.open(node.host, peer)
                try:
                    await session.send(HaveRequest(model_cid))
                    await session.send(FetchingRequest(model_cid))  # last: older nodes reset the stream on it
                    have = await session.read_have()
                    haves[peer] = (have.count, have.bitfield)
                    fetching = await session.read_have()
                    fetches[peer] = (fetching.count, fetching.bitfield)
                finally:
                    await session.close()
        except Exception as e:
            log.info("no have-set from %s: %r", peer, e)  # not a holder, unreachable, or an older node

    async with trio.open_nursery() as nursery:
        for peer in candidates:
            nursery.start_soon(ask, peer)

    local = node.store.models.get(model_cid)
    local_bytes = None if local is None else await trio.to_thread.run_sync(local.read_manifest_bytes)
    if local is not None and local_bytes is not None:
        manifest, manifest_bytes = local.manifest, local_bytes
    else:
        holders = [p for p, (count, bits) in haves.items() if count == 0 or any(bits)]
        if not holders:
            raise NodeError(f"no peer has model {model_cid} ({len(candidates)} peer(s) asked)")
        manifest_bytes, manifest = await fetch_manifest(node, model_cid, holders)
    count = len(manifest.fragments)
    holdings: dict[str, list[bool]] = {}
    fetching: dict[str, list[bool]] = {}
    peers: dict[str, ID] = {}
    for peer, (n, bits) in haves.items():
        if n != count:
            log.info("peer %s counts %d fragments in %s, not %d: ignored", peer, n, model_cid, count)
            continue
        try:
            holdings[str(peer)] = decode_bitfield(bits, count)
            peers[str(peer)] = peer
            n_fetching, fetching_bits = fetches.get(peer, (0, b""))
            if n_fetching == count and any(fetching_bits):
                fetching[str(peer)] = decode_bitfield(fetching_bits, count)
        except Exception as e:  # already validated by the decoder; a bad one is ignored, never fatal
            log.info("bad have-set from %s: %r", peer, e)
    if local is not None and (any(local.have) or local.header_present):
        holdings[str(node.peer_id)] = list(local.have)
    return Survey(manifest, manifest_bytes, holdings, fetching, peers)
