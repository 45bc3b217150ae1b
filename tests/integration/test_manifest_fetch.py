"""A manifest fetched in ranges from several holders at once, checked whole
against the CID; a holder that lies in a range costs a fetch of the whole
manifest, never a wrong one. Real libp2p nodes on 127.0.0.1."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import trio

from node import manifest_fetch
from node.manifest_fetch import fetch_manifest_file
from node.server import ServeLimits
from node.streams import read_message
from protocol import PROTOCOL_ID, Data, FrameDecoder, ManifestRequest, encode_frame
from tests.integration.test_swarm import model_folder, node_at


def lying_in_ranges(manifest: bytes) -> Any:
    """A stream handler that knows the manifest and flips a byte of every range but the first."""

    async def handler(stream: Any) -> None:
        decoder = FrameDecoder()
        try:
            while True:
                request = await read_message(stream, decoder, 10)
                assert isinstance(request, ManifestRequest)
                if request.ranged:
                    body = bytearray(manifest[request.offset : request.offset + (request.length or len(manifest))])
                    if request.offset > 0:
                        body[0] ^= 1
                    await stream.write(encode_frame(Data(len(body), len(manifest))) + bytes(body))
                else:
                    await stream.write(encode_frame(Data(len(manifest))) + manifest[:-1] + b"?")
        except BaseException:
            pass

    return handler


async def test_a_manifest_comes_in_ranges_from_several_holders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manifest_fetch, "RANGE_BYTES", 2048)
    _, folder = model_folder(tmp_path / "seed0")
    manifest = (folder / "manifest.json").read_bytes()
    assert len(manifest) > 8 * 2048
    slow = ServeLimits(upload_rate=64 << 10)  # so no one holder has sent it all before the others start
    async with AsyncExitStack() as stack:
        seeds = []
        for i in range(3):
            if i:
                model_folder(tmp_path / f"seed{i}")
            seeds.append(await stack.enter_async_context(node_at(tmp_path / f"seed{i}", serve=slow)))
        cid = next(iter(seeds[0].store.models))
        assert all(cid in s.store.models for s in seeds)
        puller = await stack.enter_async_context(node_at(tmp_path / "p", [a for s in seeds for a in s.addrs()[:1]]))
        with trio.fail_after(30):
            spool, sources = await fetch_manifest_file(puller, cid, [s.peer_id for s in seeds])
        with spool:
            spool.seek(0)
            assert spool.read() == manifest
    assert len(sources) >= 2 and sum(sources.values()) == len(manifest)


async def test_a_holder_lying_in_a_range_costs_a_whole_fetch_not_a_wrong_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(manifest_fetch, "RANGE_BYTES", 2048)
    _, folder = model_folder(tmp_path / "seed")
    manifest = (folder / "manifest.json").read_bytes()
    async with AsyncExitStack() as stack:
        seed = await stack.enter_async_context(node_at(tmp_path / "seed"))
        liar = await stack.enter_async_context(node_at(tmp_path / "liar"))
        liar.host.set_stream_handler(PROTOCOL_ID, lying_in_ranges(manifest))
        cid = next(iter(seed.store.models))
        puller = await stack.enter_async_context(node_at(tmp_path / "p", liar.addrs()[:1] + seed.addrs()[:1]))
        with trio.fail_after(30):
            spool, sources = await fetch_manifest_file(puller, cid, [liar.peer_id, seed.peer_id])
        with spool:
            spool.seek(0)
            assert spool.read() == manifest
    assert sources == {}  # the ranges did not hash to the CID: fetched whole, the liar's copy refused
