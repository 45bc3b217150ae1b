"""Peers that hold streams idle, or misbehave, against a live seed: honest pulls go on."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import trio
from gguf import GGMLQuantizationType as T

import fragmenter as fr
import node.pull as pull_module
from fragmenter.manifest import MAX_MANIFEST_BYTES
from node.client import RemoteError, Session
from node.pull import PullOptions, pull_model
from protocol import PROTOCOL_ID, Data, HaveRequest, ManifestRequest, encode_frame
from tests.conftest import sha256_file
from tests.gguf_factory import write_model
from tests.integration.test_swarm import model_folder, node_at


async def test_sybils_holding_idle_streams_take_no_upload_slot(tmp_path: Path) -> None:
    model, _ = model_folder(tmp_path / "seed")
    async with AsyncExitStack() as stack:
        seed = await stack.enter_async_context(node_at(tmp_path / "seed"))
        cid = next(iter(seed.store.models))
        limits = seed.server.limits
        sessions: list[Session] = []
        for i in range(4):  # was enough to take all 32 upload slots for a minute
            attacker = await stack.enter_async_context(node_at(tmp_path / f"sybil{i}", seed.addrs()[:1]))
            for _ in range(limits.max_streams_per_peer):
                session = await Session.open(attacker.host, seed.peer_id)
                await session.send(HaveRequest(cid))
                await session.read_have()  # answered, then held open and idle
                sessions.append(session)
            extra = await Session.open(attacker.host, seed.peer_id)
            await extra.send(HaveRequest(cid))
            with pytest.raises(RemoteError, match="BUSY"):  # one peer's streams are capped
                await extra.read_have()
        assert seed.server.open_streams.total() == 4 * limits.max_streams_per_peer
        assert not seed.server.active  # idle streams hold no slot

        honest = await stack.enter_async_context(node_at(tmp_path / "honest", seed.addrs()[:1]))
        with trio.fail_after(30):
            await pull_model(honest, cid, PullOptions(find_timeout=10))
        out = tmp_path / "out.gguf"
        fr.assemble(honest.store.models[cid].folder, out)
        assert sha256_file(out) == sha256_file(model)


async def test_a_banned_peer_is_refused_by_every_protocol_and_cut_off(tmp_path: Path) -> None:
    model_folder(tmp_path / "seed")
    async with node_at(tmp_path / "seed") as seed, node_at(tmp_path / "bad", seed.addrs()[:1]) as bad:
        cid = next(iter(seed.store.models))
        seed.ban(bad.peer_id, "sent a bad block")
        with trio.fail_after(5):
            while seed.host.get_network().get_connections(bad.peer_id):
                await trio.sleep(0.05)
        # It comes back: the connection is closed again, and no request is answered.
        answered = False
        with trio.move_on_after(5):
            try:
                session = await Session.open(bad.host, seed.peer_id)
                await session.send(HaveRequest(cid))
                answered = (await session.read_have()).count > 0
            except Exception:
                pass  # refused: reset, or no connection
        assert not answered
        await trio.sleep(0.3)
        assert not seed.host.get_network().get_connections(bad.peer_id)


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def test_holders_sending_huge_wrong_manifests_cost_no_memory(tmp_path: Path) -> None:
    model_folder(tmp_path / "seed")
    junk = 48 << 20  # per liar: announced as a huge manifest, sent fast, then held

    async def liar(stream: Any) -> None:
        try:
            await stream.read(65536)  # the ManifestRequest
            await stream.write(encode_frame(Data(MAX_MANIFEST_BYTES)))
            block = bytes(1 << 20)
            for _ in range(junk >> 20):
                await stream.write(block)
            await trio.sleep_forever()
        except BaseException:
            pass

    async with AsyncExitStack() as stack:
        seed = await stack.enter_async_context(node_at(tmp_path / "seed"))
        cid = next(iter(seed.store.models))
        liars = []
        for i in range(3):
            node = await stack.enter_async_context(node_at(tmp_path / f"liar{i}"))
            node.host.set_stream_handler(PROTOCOL_ID, liar)
            liars.append(node)
        puller = await stack.enter_async_context(
            node_at(tmp_path / "p", [a for n in liars for a in n.addrs()[:1]] + seed.addrs()[:1])
        )
        before = rss_bytes()
        peak = before

        async def sample() -> None:
            nonlocal peak
            while True:
                peak = max(peak, rss_bytes())
                await trio.sleep(0.02)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sample)
            with trio.fail_after(30):
                got = await pull_module._fetch_manifest(puller, cid, [n.peer_id for n in liars] + [seed.peer_id])
            nursery.cancel_scope.cancel()
        assert got.read_manifest_bytes() == seed.store.models[cid].read_manifest_bytes()
        assert peak - before < 48 << 20, f"puller grew {(peak - before) >> 20} MiB on {3 * junk >> 20} MiB of junk"
        assert not list(puller.store.state_dir.iterdir()) or all(
            not p.name.startswith("tmp") for p in puller.store.state_dir.iterdir()
        )


async def test_peers_asking_for_a_large_manifest_and_not_reading_cost_the_seed_little(tmp_path: Path) -> None:
    """Every upload slot asked for the whole of a ~3 MB manifest by peers that
    never read: the seed reads it a piece at a time, so it holds ~1 MiB per
    slot, not the manifest per slot (which was ~100 MB here, ~1 GB at 40,000
    fragments)."""
    tensors = [(f"blk.{i}.ffn_up.weight", T.F32, (1024, 2048)) for i in range(4)]
    model = write_model(tmp_path / "many.gguf", tensors, vocab=False)
    fr.fragment_model(model, tmp_path / "seed" / "many", chunk_size=8192)
    manifest_size = (tmp_path / "seed" / "many" / "manifest.json").stat().st_size
    assert manifest_size > 2_500_000
    async with AsyncExitStack() as stack:
        seed = await stack.enter_async_context(node_at(tmp_path / "seed"))
        cid = next(iter(seed.store.models))
        askers = [await stack.enter_async_context(node_at(tmp_path / f"a{i}", seed.addrs()[:1])) for i in range(4)]
        streams = []
        before = rss_bytes()
        for asker in askers:
            for _ in range(8):  # a peer's share of the upload slots
                stream = await asker.host.new_stream(seed.peer_id, [PROTOCOL_ID])
                await stream.write(encode_frame(ManifestRequest(cid)))
                streams.append(stream)
        await trio.sleep(2)  # every answer started, each stuck once the stream's window is full
        grown = rss_bytes() - before
        assert grown < 32 * manifest_size // 2, f"seed grew {grown >> 20} MiB for {len(streams)} stuck answers"
