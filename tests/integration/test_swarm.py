"""Real libp2p nodes in one process on 127.0.0.1, real fragment folders."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import msgpack
import pytest
import trio
import trio.testing
from gguf import GGMLQuantizationType as T

import fragmenter as fr
from node.client import RemoteError, Session
from node.node import Node, NodeConfig, open_node
from node.pull import PullOptions, PullStats, pull_model
from node.server import ServeLimits
from node.streams import read_message, send_message
from protocol import PROTOCOL_ID, Data, Error, FragmentRequest, FrameDecoder, HaveRequest, ManifestRequest
from tests.conftest import sha256_file
from tests.gguf_factory import write_model

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


def model_folder(base: Path, name: str = "swarm-model") -> tuple[Path, Path]:
    """A ~1.3 MB model cut into ~40 fragments, inside data dir `base`."""
    tensors = [(f"blk.{i}.ffn_up.weight", T.F32, (64, 1024)) for i in range(5)]
    model = write_model(base.parent / f"{name}.gguf", tensors, vocab=False)
    folder = base / name
    fr.fragment_model(model, folder, chunk_size=32 * 1024)
    return model, folder


@asynccontextmanager
async def node_at(
    data_dir: Path,
    bootstrap: list[str] | None = None,
    serve: ServeLimits | None = None,
    request_bytes: int = 24 << 20,
) -> AsyncIterator[Node]:
    data_dir.mkdir(parents=True, exist_ok=True)
    config = NodeConfig(
        data_dir,
        listen=LOOPBACK,
        bootstrap=bootstrap or [],
        serve=serve or ServeLimits(),
        request_bytes_per_peer=request_bytes,
    )
    async with open_node(config) as node:
        yield node


async def test_five_node_swarm_two_pullers_know_only_a_bootstrap_node(tmp_path: Path) -> None:
    model, _ = model_folder(tmp_path / "seed")
    cid = fr.read_manifest(tmp_path / "seed" / "swarm-model")
    async with AsyncExitStack() as stack:
        boot = await stack.enter_async_context(node_at(tmp_path / "boot"))
        entry = boot.addrs()[:1]
        # Holders at 1 MiB/s: p2 reaches the second before the first alone has sent the 1.3 MB.
        slow = ServeLimits(upload_rate=1 << 20)
        seed = await stack.enter_async_context(node_at(tmp_path / "seed", entry, slow))
        for i in range(2):
            await stack.enter_async_context(node_at(tmp_path / f"idle{i}", entry))
        model_cid = next(iter(seed.store.models))
        p1 = await stack.enter_async_context(node_at(tmp_path / "p1", entry, slow))
        got1, stats1 = await pull_model(p1, model_cid, PullOptions(find_timeout=20))
        # Every block, the header's included, came from the seed.
        assert got1.complete and stats1.bytes_by_peer == {str(seed.peer_id): cid.total_bytes + cid.header_size}
        with trio.fail_after(20):
            while not p1.announcing_idle():  # p1 is in the DHT as a holder
                await trio.sleep(0.05)
        p2 = await stack.enter_async_context(node_at(tmp_path / "p2", entry))
        got2, stats2 = await pull_model(p2, model_cid, PullOptions(find_timeout=20))
        assert got2.complete
        holders = {str(seed.peer_id): "seed", str(p1.peer_id): "p1"}
        assert set(stats2.bytes_by_peer) == set(holders), {holders[p]: n for p, n in stats2.bytes_by_peer.items()}
    for got in (got1, got2):
        assert fr.verify_folder(got.folder).ok
        fr.assemble(got.folder, got.folder.parent / "out.gguf")
        assert sha256_file(got.folder.parent / "out.gguf") == sha256_file(model)
        assert (got.folder / "gguf_header.dat").exists()


async def test_corrupt_peer_is_banned_and_the_honest_one_serves(tmp_path: Path) -> None:
    model, folder = model_folder(tmp_path / "honest")
    evil_dir = tmp_path / "evil"
    evil_dir.mkdir()
    (evil_dir / folder.name).mkdir()
    for p in folder.iterdir():
        (evil_dir / folder.name / p.name).write_bytes(p.read_bytes())
    # The honest seed at 300 kB/s: the pull lasts seconds, so the liar's session is
    # up and asked before it ends (unthrottled, the honest one could serve it all first).
    slow = ServeLimits(upload_rate=300_000)
    async with node_at(tmp_path / "honest", serve=slow) as honest, node_at(evil_dir) as evil:
        model_cid = next(iter(honest.store.models))
        evil_swarm = await evil.swarm_for(evil.store.models[model_cid])
        honest_read = evil_swarm.blocks.read_block

        def lying_read(block: int) -> bytes | None:
            data = honest_read(block)
            if not data:
                return data
            wrong = bytearray(data)
            wrong[len(wrong) // 2] ^= 0xFF  # a hostile peer: right size, wrong bytes
            return bytes(wrong)

        evil_swarm.blocks.read_block = lying_read  # type: ignore[method-assign]
        async with node_at(tmp_path / "puller", honest.addrs()[:1] + evil.addrs()[:1]) as puller:
            got, stats = await pull_model(puller, model_cid, PullOptions(find_timeout=20))
    assert stats.bad_peers == {str(evil.peer_id)}
    assert fr.verify_folder(got.folder).ok
    fr.assemble(got.folder, tmp_path / "out.gguf")
    assert sha256_file(tmp_path / "out.gguf") == sha256_file(model)


async def test_provider_disappearing_mid_pull(tmp_path: Path) -> None:
    model, folder = model_folder(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / folder.name).mkdir()
    for p in folder.iterdir():
        (tmp_path / "b" / folder.name / p.name).write_bytes(p.read_bytes())
    async with node_at(tmp_path / "a") as a, trio.open_nursery() as outer:
        model_cid = next(iter(a.store.models))
        b_scope = trio.CancelScope()
        b_ready: list[Node] = []

        async def run_b(task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
            with b_scope:
                async with node_at(tmp_path / "b") as b:
                    b_ready.append(b)
                    task_status.started()
                    await trio.sleep_forever()

        await outer.start(run_b)
        b = b_ready[0]
        async with node_at(tmp_path / "puller", a.addrs()[:1] + b.addrs()[:1]) as puller:

            def on_event(e: dict) -> None:
                if e["event"] == "progress" and e["fragments_done"] >= 5:
                    b_scope.cancel()  # b vanishes mid-pull

            result = [await pull_model(puller, model_cid, PullOptions(on_event=on_event))]
        got, _ = result[0]
    fr.assemble(got.folder, tmp_path / "out.gguf")
    assert sha256_file(tmp_path / "out.gguf") == sha256_file(model)


async def test_malformed_frames_leave_the_server_serving(tmp_path: Path) -> None:
    _, folder = model_folder(tmp_path / "seed")
    manifest = fr.read_manifest(folder)
    async with node_at(tmp_path / "seed") as seed, node_at(tmp_path / "client", seed.addrs()[:1]) as client:
        model_cid = next(iter(seed.store.models))
        garbage = [
            b"\xff\xff\xff\xff",  # absurd length
            b"\x00\x00\x00\x03abc",  # not msgpack
            len(msgpack.packb({"t": "launch"})).to_bytes(4, "big") + msgpack.packb({"t": "launch"}),
            b"\x00\x00",  # truncated, then the stream closes
        ]
        for raw in garbage:
            stream = await client.host.new_stream(seed.peer_id, [PROTOCOL_ID])
            await stream.write(raw)
            await stream.close()
        # A request that is valid but asks for what is not there.
        stream = await client.host.new_stream(seed.peer_id, [PROTOCOL_ID])
        await send_message(stream, ManifestRequest(manifest.fragments and next(iter(seed.store.models))[:-1] + "a"))
        answer = await read_message(stream, FrameDecoder())
        assert isinstance(answer, Error)
        # Still alive and serving real requests.
        stream = await client.host.new_stream(seed.peer_id, [PROTOCOL_ID])
        await send_message(stream, HaveRequest(model_cid))
        have = await read_message(stream, FrameDecoder())
        assert have.count == len(manifest.fragments)
        entry = manifest.fragments[0]
        stream = await client.host.new_stream(seed.peer_id, [PROTOCOL_ID])
        await send_message(stream, FragmentRequest(entry_cid := seed.store.models[model_cid].fragment_cids[0]))
        decoder = FrameDecoder()
        header = await read_message(stream, decoder)
        assert header == Data(entry.size)
        assert entry_cid
        body = decoder.take_raw(entry.size)
        while len(body) < entry.size:
            body += await stream.read(entry.size - len(body))
        assert hashlib.sha256(body).hexdigest() == entry.sha256


async def test_one_stream_carries_pipelined_requests_answered_in_order(tmp_path: Path) -> None:
    _, folder = model_folder(tmp_path / "seed")
    manifest = fr.read_manifest(folder)
    async with node_at(tmp_path / "seed") as seed, node_at(tmp_path / "client", seed.addrs()[:1]) as client:
        model = next(iter(seed.store.models.values()))
        session = await Session.open(client.host, seed.peer_id)
        wanted = [0, 5, 1]
        await session.send(FragmentRequest(model.fragment_cids[0]))
        await session.send(FragmentRequest(model.fragment_cids[5]))
        await session.send(FragmentRequest("bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"))  # not held
        await session.send(FragmentRequest(model.fragment_cids[1], offset=10, length=20))
        await session.send(HaveRequest(model.cid))
        for i in wanted[:2]:
            body = await session.read_data(manifest.fragments[i].size)
            assert hashlib.sha256(body).hexdigest() == manifest.fragments[i].sha256
        with pytest.raises(RemoteError, match="NOT_FOUND"):
            await session.read_data(1 << 20)
        whole = fr.open_folder(folder).fragment_path(manifest.fragments[1]).read_bytes()
        assert await session.read_data(20) == whole[10:30]
        assert (await session.read_have()).count == len(manifest.fragments)
        assert seed.server.open_streams == {str(client.peer_id): 1}  # all of it on one stream
        await trio.testing.wait_all_tasks_blocked()  # the seed's side is done with the last answer
        assert not seed.server.active  # an idle stream holds no upload slot
        assert client.peer_id in seed.server.askers[model.cid]  # a puller of this model, to tell other pullers
        await session.close()


async def test_upload_rate_limit_holds_a_seed_to_its_rate(tmp_path: Path) -> None:
    model, folder = model_folder(tmp_path / "seed")
    total = fr.read_manifest(folder).total_bytes  # ~1.3 MB
    rate = 500_000
    async with (
        node_at(tmp_path / "seed", serve=ServeLimits(upload_rate=rate)) as seed,
        node_at(tmp_path / "p", seed.addrs()[:1]) as puller,
    ):
        start = trio.current_time()
        got, _ = await pull_model(puller, next(iter(seed.store.models)), PullOptions(find_timeout=20))
        elapsed = trio.current_time() - start
    assert got.complete
    burst = rate / 4
    assert elapsed >= (total - burst) / rate * 0.95, elapsed  # unlimited, this takes well under a second


async def test_concurrent_pullers_trade_fragments_among_themselves(tmp_path: Path) -> None:
    model, folder = model_folder(tmp_path / "seed")
    manifest = fr.read_manifest(folder)
    async with AsyncExitStack() as stack:
        # A slow seed, so that pullers overlap and must trade fragments among themselves.
        seed = await stack.enter_async_context(node_at(tmp_path / "seed", serve=ServeLimits(upload_rate=1_000_000)))
        entry = seed.addrs()[:1]
        # Queues of 4 fragments: the model is small, and should look large next to them.
        pullers = [
            await stack.enter_async_context(node_at(tmp_path / f"p{i}", entry, request_bytes=128 * 1024))
            for i in range(3)
        ]
        model_cid = next(iter(seed.store.models))
        results: list[PullStats] = []

        async def pull(node: Node) -> None:
            _, stats = await pull_model(node, model_cid, PullOptions(find_timeout=20, stall_timeout=20))
            results.append(stats)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for node in pullers:
                    nursery.start_soon(pull, node)
        for node in pullers:
            assert fr.verify_folder(node.store.models[model_cid].folder).ok
    assert len(results) == 3
    from_pullers = sum(n for stats in results for peer, n in stats.bytes_by_peer.items() if peer != str(seed.peer_id))
    assert from_pullers > 0  # pullers found each other (no DHT wait) and traded fragments
    swarm = seed.swarms[model_cid]
    assert swarm.stats.bytes_uploaded < 3 * manifest.total_bytes
    # Super-seeding handed out every block (its effect is measured by bench/swarm_bench.py).
    assert swarm.seeding is not None and not swarm.seeding.active


async def test_a_large_manifest_is_parsed_outside_the_pulling_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pull hands a manifest it counts as large to a child process, which
    checks it and writes its index; the pull goes on from that index, and a
    restart of the puller reads it too (nothing is parsed in this process)."""
    from node import manifest_index

    model, _ = model_folder(tmp_path / "seed")
    async with AsyncExitStack() as stack:
        seed = await stack.enter_async_context(node_at(tmp_path / "seed"))
        model_cid = next(iter(seed.store.models))
        monkeypatch.setattr(manifest_index, "CHILD_PARSE_FROM", 0)

        def refuse(*args: object) -> None:
            raise AssertionError("the pulling process parsed the manifest")

        monkeypatch.setattr(manifest_index, "parse_manifest_bytes", refuse)
        puller = await stack.enter_async_context(node_at(tmp_path / "p", seed.addrs()[:1]))
        got, _ = await pull_model(puller, model_cid)
        assert got.complete
    assert (tmp_path / "p" / ".gguf-swarm" / "index" / f"{model_cid}.npz").is_file()
    async with node_at(tmp_path / "p") as again:
        await again.indexed.wait()
        assert again.store.models[model_cid].complete
    fr.assemble(got.folder, tmp_path / "out.gguf")
    assert sha256_file(tmp_path / "out.gguf") == sha256_file(model)
