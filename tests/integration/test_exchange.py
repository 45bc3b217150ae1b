"""The v2 exchange between real nodes on 127.0.0.1: verified blocks passed on
before their fragment completes, pushed haves (an idle session is silent),
and peers that claim what they refuse."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from gguf import GGMLQuantizationType as T
from libp2p.stream_muxer.yamux.yamux import HEADER_SIZE as YAMUX_HEADER_SIZE
from libp2p.stream_muxer.yamux.yamux import YamuxStream

import fragmenter as fr
import node.manifest_fetch as manifest_fetch
import node.pull as pull_module
import node.swarm as swarm_module
from node.host import NodeError
from node.libp2p_patches.yamux import NOISE_MAX_PLAINTEXT
from node.node import Node
from node.pull import PullOptions, pull_model
from node.server import ServeLimits
from node.swarm import CHUNK_WRITE, STRIKES, ModelSwarm
from protocol import PROTOCOL_ID, Data, Error, ErrorCode, encode_frame
from protocol.exchange import (
    EXCHANGE_PROTOCOL_ID,
    HaveBlocks,
    Hello,
    Interested,
    decode_exchange_body,
    encode_exchange,
)
from tests.conftest import sha256_file
from tests.gguf_factory import write_model
from tests.integration.test_swarm import model_folder, node_at


def big_fragment_model(base: Path) -> tuple[Path, Path]:
    """~8 MB in 4 fragments of 2 MiB: two verified blocks each."""
    tensors = [(f"blk.{i}.ffn_up.weight", T.F32, (512, 1024)) for i in range(4)]
    model = write_model(base.parent / "big.gguf", tensors, vocab=False)
    folder = base / "big"
    fr.fragment_model(model, folder, chunk_size=4 << 20)
    return model, folder


@asynccontextmanager
async def two_pullers_behind_a_slow_seed(tmp_path: Path) -> AsyncIterator[tuple[Node, Node, Node, str]]:
    """A seed of `big_fragment_model` (in tmp_path/seed) held to 3 MB/s, and two
    nodes that have pulled it at once: they overlapped, and traded blocks."""
    async with (
        node_at(tmp_path / "seed", serve=ServeLimits(upload_rate=3_000_000)) as seed,
        node_at(tmp_path / "a", seed.addrs()[:1]) as a,
        node_at(tmp_path / "b", seed.addrs()[:1]) as b,
    ):
        model_cid = next(iter(seed.store.models))
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for node in (a, b):
                    nursery.start_soon(pull_model, node, model_cid, PullOptions(find_timeout=20))
        yield seed, a, b, model_cid


async def test_blocks_are_passed_on_before_their_fragment_is_complete(tmp_path: Path) -> None:
    model, folder = big_fragment_model(tmp_path / "seed")
    manifest = fr.read_manifest(folder)
    assert all(e.size > (1 << 20) and e.block_root for e in manifest.fragments)
    # A slow seed: two pullers overlap, and each can give the other blocks of
    # fragments neither has finished.
    async with two_pullers_behind_a_slow_seed(tmp_path) as (seed, a, b, model_cid):
        served_partial = a.swarms[model_cid].blocks.partial_reads + b.swarms[model_cid].blocks.partial_reads
        from_each_other = a.swarms[model_cid].stats.bytes_by_peer.get(str(b.peer_id), 0) + b.swarms[
            model_cid
        ].stats.bytes_by_peer.get(str(a.peer_id), 0)
        for node in (a, b):
            out = tmp_path / f"{node.peer_id}.gguf"
            fr.assemble(node.store.models[model_cid].folder, out)
            assert sha256_file(out) == sha256_file(model)
    assert from_each_other > 0
    assert served_partial > 0  # a block went out before its own fragment was whole


async def test_a_block_goes_out_in_whole_frames(tmp_path: Path) -> None:
    """Each write of block data fills at most four Yamux frames (one Noise
    message each): a 256 KiB chunk and its header made four full frames and a
    ~160-byte fifth, a message for nothing every 256 KiB."""
    model, folder = big_fragment_model(tmp_path / "seed")
    frame = NOISE_MAX_PLAINTEXT - YAMUX_HEADER_SIZE
    writes: list[int] = []
    upstream = YamuxStream.write

    async def recorded(self: YamuxStream, data: bytes) -> None:
        writes.append(len(data))
        await upstream(self, data)

    async with node_at(tmp_path / "seed") as seed, node_at(tmp_path / "p", seed.addrs()[:1]) as puller:
        model_cid = next(iter(seed.store.models))
        YamuxStream.write = recorded  # type: ignore[method-assign]
        try:
            await pull_model(puller, model_cid, PullOptions(find_timeout=20))
        finally:
            YamuxStream.write = upstream  # type: ignore[method-assign]
        out = tmp_path / "out.gguf"
        fr.assemble(puller.store.models[model_cid].folder, out)
        assert sha256_file(out) == sha256_file(model)
    blocks = sum(-(-e.size // (1 << 20)) for e in fr.read_manifest(folder).fragments)
    data_writes = [n for n in writes if n > frame]
    assert len(data_writes) >= 4 * blocks  # each block's first 4 x ~256 KiB (its last ~700 bytes go alone)
    assert max(data_writes) <= CHUNK_WRITE
    assert sum(-(-n // frame) for n in data_writes) <= 16 * blocks  # 1 MiB in 16 frames, was 20


async def test_an_idle_session_sends_nothing(tmp_path: Path) -> None:
    model_folder(tmp_path / "seed")
    async with node_at(tmp_path / "seed") as seed, node_at(tmp_path / "p", seed.addrs()[:1]) as puller:
        model_cid = next(iter(seed.store.models))
        await pull_model(puller, model_cid, PullOptions(find_timeout=20))
        link = puller.swarms[model_cid].links[seed.peer_id]
        await trio.sleep(1.0)  # the last HAVEs and NOT_INTERESTED settle
        before = (link.bytes_in, link.bytes_out)
        await trio.sleep(3.0)
        assert (link.bytes_in, link.bytes_out) == before  # pushed state, no polling: 0 bytes/s


def make_liar(swarm: ModelSwarm) -> None:
    """A peer that claims every block and refuses every request."""
    swarm._may_serve = lambda link, block: False  # type: ignore[method-assign]


async def test_a_peer_that_refuses_what_it_claims_is_dropped_and_the_pull_completes(tmp_path: Path) -> None:
    model, folder = model_folder(tmp_path / "honest")
    liar_dir = tmp_path / "liar"
    (liar_dir / folder.name).mkdir(parents=True)
    for p in folder.iterdir():
        (liar_dir / folder.name / p.name).write_bytes(p.read_bytes())
    async with (
        node_at(tmp_path / "honest", serve=ServeLimits(upload_rate=2_000_000)) as honest,
        node_at(liar_dir) as liar,
    ):
        model_cid = next(iter(honest.store.models))
        make_liar(await liar.swarm_for(liar.store.models[model_cid]))
        async with node_at(tmp_path / "p", honest.addrs()[:1] + liar.addrs()[:1]) as puller:
            with trio.fail_after(60):
                got, stats = await pull_model(puller, model_cid, PullOptions(find_timeout=20))
            swarm = puller.swarms[model_cid]
            assert liar.peer_id in swarm.dropped  # lost its standing: not dialled again for a while
            assert set(stats.bytes_by_peer) == {str(honest.peer_id)}
    fr.assemble(got.folder, tmp_path / "out.gguf")
    assert sha256_file(tmp_path / "out.gguf") == sha256_file(model)
    assert STRIKES > 1


async def test_a_pull_from_liars_alone_stops_with_a_clear_error(tmp_path: Path) -> None:
    model_folder(tmp_path / "liar")
    async with node_at(tmp_path / "liar") as liar:
        model_cid = next(iter(liar.store.models))
        make_liar(await liar.swarm_for(liar.store.models[model_cid]))
        async with node_at(tmp_path / "p", liar.addrs()[:1]) as puller:
            with trio.fail_after(30), pytest.raises(NodeError, match="stalled.*missing"):
                await pull_model(puller, model_cid, PullOptions(find_timeout=10, stall_timeout=3))


async def test_a_session_for_an_unknown_model_is_refused_and_the_node_keeps_serving(tmp_path: Path) -> None:
    model_folder(tmp_path / "seed")
    async with node_at(tmp_path / "seed") as seed, node_at(tmp_path / "c", seed.addrs()[:1]) as client:
        stream = await client.host.new_stream(seed.peer_id, [EXCHANGE_PROTOCOL_ID])
        unknown = "bafkreigsgxmcnkhjmxpohdq62xbgq327uoav2d7pbbkjdc5so4fnmqu3fq"
        await stream.write(encode_exchange(Hello(unknown, 10)))
        with trio.fail_after(5):
            frame = await stream.read(65536)
        answer = decode_exchange_body(frame[4:])
        assert isinstance(answer, Error)
        # ... and garbage instead of a Hello is refused without harm
        stream = await client.host.new_stream(seed.peer_id, [EXCHANGE_PROTOCOL_ID])
        await stream.write(b"\x00\x00\x00\x05garbage")
        model_cid = next(iter(seed.store.models))
        got, _ = await pull_model(client, model_cid, PullOptions(find_timeout=10))
        assert got.complete


async def test_digests_a_peer_never_sends_are_asked_of_another(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(swarm_module, "HASHES_TIMEOUT", 1.0)
    model, folder = big_fragment_model(tmp_path / "a")
    mute_dir = tmp_path / "mute"
    (mute_dir / folder.name).mkdir(parents=True)
    for p in folder.iterdir():
        (mute_dir / folder.name / p.name).write_bytes(p.read_bytes())
    async with node_at(tmp_path / "a") as honest, node_at(mute_dir) as mute:
        model_cid = next(iter(honest.store.models))
        mute_swarm = await mute.swarm_for(mute.store.models[model_cid])

        async def never_answer(link: object, file: int) -> None:
            pass  # serves blocks, but keeps every digest list to itself

        mute_swarm._answer_hashes = never_answer  # type: ignore[method-assign]
        async with node_at(tmp_path / "p", mute.addrs()[:1] + honest.addrs()[:1]) as puller:
            with trio.fail_after(60):
                got, _ = await pull_model(puller, model_cid, PullOptions(find_timeout=20))
    fr.assemble(got.folder, tmp_path / "out.gguf")
    assert sha256_file(tmp_path / "out.gguf") == sha256_file(model)


async def test_a_peer_that_says_goodbye_but_keeps_the_stream_open_is_let_go(tmp_path: Path) -> None:
    model_folder(tmp_path / "seed")
    async with node_at(tmp_path / "seed") as seed, node_at(tmp_path / "evil", seed.addrs()[:1]) as evil:
        model_cid = next(iter(seed.store.models))
        layout_blocks = (await seed.swarm_for(seed.store.models[model_cid])).layout.total_blocks
        stream = await evil.host.new_stream(seed.peer_id, [EXCHANGE_PROTOCOL_ID])
        await stream.write(
            encode_exchange(Hello(model_cid, layout_blocks))
            + encode_exchange(Interested())
            + encode_exchange(Error(ErrorCode.INTERNAL, "bye"))
        )  # ... and the stream stays open: nothing may be sent on that session again
        with trio.fail_after(5):  # the seed ends the session (it reads its Hello and haves first)
            with pytest.raises(Exception):  # noqa: B017 (libp2p raises one of several kinds on a reset stream)
                while True:
                    await stream.read(65536)
        assert evil.peer_id not in seed.swarms[model_cid].links
        async with node_at(tmp_path / "p", seed.addrs()[:1]) as puller:
            got, _ = await pull_model(puller, model_cid, PullOptions(find_timeout=10))
        assert got.complete


async def test_a_holder_that_trickles_the_manifest_costs_seconds_not_minutes(tmp_path: Path) -> None:
    model_folder(tmp_path / "seed")
    async with node_at(tmp_path / "seed") as seed, node_at(tmp_path / "slow") as slow:
        model_cid = next(iter(seed.store.models))
        manifest = seed.store.models[model_cid].read_manifest_bytes()
        assert manifest is not None

        async def trickle(stream: Any) -> None:
            try:
                await stream.read(65536)  # the ManifestRequest
                await stream.write(encode_frame(Data(len(manifest))))
                for i in range(len(manifest)):
                    await stream.write(manifest[i : i + 1])
                    await trio.sleep(0.5)  # would take days
            except Exception:
                pass

        slow.host.set_stream_handler(PROTOCOL_ID, trickle)
        async with node_at(tmp_path / "p", slow.addrs()[:1] + seed.addrs()[:1]) as puller:
            start = trio.current_time()
            with trio.fail_after(20):
                got = await pull_module._fetch_manifest(puller, model_cid, [slow.peer_id, seed.peer_id])
            assert got.read_manifest_bytes() == manifest
            assert trio.current_time() - start < manifest_fetch.MANIFEST_STAGGER + 5


async def test_haves_skip_peers_that_hold_the_block_but_always_reach_a_seed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Have suppression: a verified block is announced to each peer that lacks it,
    and to a peer not interested in us even so (a super-seed counts its shares
    out by the HAVEs it hears, and shows us only part of what it holds)."""
    verifying: list[ModelSwarm] = []
    announced: list[tuple[str, str, int, bool, bool]] = []  # sender, receiver, block, held it, interested
    upstream_verified, upstream_send = ModelSwarm._verified, swarm_module.PeerLink.send

    def verified(self: ModelSwarm, *args: Any) -> None:
        verifying.append(self)
        try:
            upstream_verified(self, *args)
        finally:
            verifying.pop()

    def send(link: swarm_module.PeerLink, msg: Any) -> None:
        if verifying and isinstance(msg, HaveBlocks):
            s = link.session
            for block in msg.blocks:
                sender = str(verifying[-1].node.peer_id)
                announced.append((sender, str(link.peer), block, s.peer_has(block), s.peer_interested))
        upstream_send(link, msg)

    monkeypatch.setattr(ModelSwarm, "_verified", verified)
    monkeypatch.setattr(swarm_module.PeerLink, "send", send)
    big_fragment_model(tmp_path / "seed")
    async with two_pullers_behind_a_slow_seed(tmp_path) as (seed, a, b, model_cid):
        total = a.swarms[model_cid].layout.total_blocks
        got_from_each_other = [
            x.swarms[model_cid].stats.bytes_by_peer.get(str(y.peer_id), 0) for x, y in ((a, b), (b, a))
        ]
        seeding = seed.swarms[model_cid].seeding
        assert seeding is not None
        for puller in (a, b):  # the super-seed heard of every block each puller holds
            assert seeding.peers[puller.peer_id].held == set(range(total))
    assert all(not held or not interested for *_, held, interested in announced)
    for puller in (a, b):
        to_seed = {
            block for sender, to, block, *_ in announced if sender == str(puller.peer_id) and to == str(seed.peer_id)
        }
        assert to_seed == set(range(total))  # every block it verified, though the seed holds them all
    between = [(sender, block) for sender, to, block, *_ in announced if to != str(seed.peer_id)]
    assert sum(got_from_each_other) > 0
    assert len(between) < 2 * total  # a block one puller got from the other was not announced back to it
