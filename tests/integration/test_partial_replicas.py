"""Partial replicas: nodes that hold and fetch only some layers, the coverage
map of who holds what, and tensors fetched through the Python API. Real
libp2p nodes on 127.0.0.1, real GGUF files (Gemma and small synthetic ones)."""

from __future__ import annotations

import json
import re
import subprocess
from contextlib import AsyncExitStack
from pathlib import Path

import numpy as np
import pytest
import trio
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

import fragmenter as fr
from fragmenter.selection import Selection, held_summary, parse_layers
from node.api import SyncNode, get_tensor, read_tensor
from node.coverage import coverage
from node.host import NodeError
from node.node import NodeConfig
from node.pull import PullOptions, pull_model
from node.survey import survey
from tests.conftest import copy_folder
from tests.gguf_factory import write_model
from tests.integration.test_cli_errors import assert_one_line_error
from tests.integration.test_cli_node import CLI, events, pull, seed_process
from tests.integration.test_swarm import LOOPBACK, node_at


def original_tensor(model: Path, name: str) -> np.ndarray:
    """`gguf.quants.dequantize` of a tensor read straight from the GGUF file."""
    with open(model, "rb") as f:
        head = f.read(64 << 20)
    header = fr.parse_header(head)
    info = next(t for t in header.tensors if t.name == name)
    with open(model, "rb") as f:
        f.seek(header.data_start + info.offset)
        raw = np.frombuffer(f.read(info.n_bytes), dtype=np.uint8).reshape(-1, info.row_bytes)
    return dequantize(raw, info.ggml_type).reshape(info.numpy_shape)


def layered_model(base: Path, layers: int = 6) -> tuple[Path, Path]:
    """A small model with `layers` layers of two tensors, embeddings and an output head, ~40 fragments."""
    tensors = [("token_embd.weight", T.Q8_0, (64, 256))]
    for i in range(layers):
        tensors += [(f"blk.{i}.attn_q.weight", T.Q4_K, (64, 256)), (f"blk.{i}.ffn_up.weight", T.F16, (64, 128))]
    tensors += [("output_norm.weight", T.F32, (64,)), ("rope_freqs.weight", T.F32, (32,))]
    model = write_model(base.parent / "layered.gguf", tensors, vocab=False)
    folder = base / "layered"
    fr.fragment_model(model, folder, chunk_size=8 * 1024)
    return model, folder


def dat_files(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("*.dat") if p.name != "gguf_header.dat"}


async def node_in_task(data_dir: Path, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
    """A node that can stop before the nodes started after it: started with
    `nursery.start`, which returns (node, an async function that stops it)."""
    stop = trio.Event()
    stopped = trio.Event()

    async def stop_it() -> None:
        stop.set()
        await stopped.wait()

    async with node_at(data_dir) as node:
        task_status.started((node, stop_it))
        await stop.wait()
    stopped.set()


@pytest.mark.slow
async def test_gemma_layers_pulled_alone_then_served_from_a_partial_node(
    gemma_model: Path, gemma_folder: Path, tmp_path: Path
) -> None:
    manifest = fr.read_manifest(gemma_folder)
    layer01 = {f.file_name for f in manifest.fragments if re.match(r"blk\.[01]\.", f.tensor_name)}
    layer1 = {f.file_name for f in manifest.fragments if f.tensor_name.startswith("blk.1.")}
    # Non-layer tensors that are neither embeddings nor output come with any layer (Gemma has none).
    assert {fr.selection.tensor_group(f.tensor_name) for f in manifest.fragments} - set(range(18)) == {
        "embeddings",
        "output",
    }
    copy_folder(gemma_folder, tmp_path / "a" / "gemma")
    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        a, stop_a = await nursery.start(node_in_task, tmp_path / "a")
        model_cid = next(iter(a.store.models))
        b = await stack.enter_async_context(node_at(tmp_path / "b", a.addrs()[:1]))
        got_b, stats_b = await pull_model(b, model_cid, PullOptions(selection=Selection(layers=parse_layers("0-1"))))
        assert dat_files(got_b.folder) == layer01  # exactly the layers' fragments...
        for name in ("manifest.json", "gguf_header.dat", "tokenizer.json"):  # ...plus what every part needs
            assert (got_b.folder / name).is_file(), name
        assert stats_b.bytes_fetched == manifest.header_size + sum(
            f.size for f in manifest.fragments if f.file_name in layer01
        )
        assert held_summary(got_b.manifest, got_b.have).layers == "0-1"
        assert not got_b.complete

        with trio.fail_after(20):
            await stop_a()  # the full seed leaves: only b holds layer 1 now
        c = await stack.enter_async_context(node_at(tmp_path / "c", b.addrs()[:1]))
        got_c, stats_c = await pull_model(c, model_cid, PullOptions(selection=Selection(layers=frozenset({1}))))
        assert dat_files(got_c.folder) == layer1
        assert set(stats_c.bytes_by_peer) == {str(b.peer_id)}

        # The API reads a held tensor locally, bit for bit what gguf.quants makes of the original file.
        name = "blk.1.attn_q.weight"
        via_node = await get_tensor(c, model_cid, name)
        expected = original_tensor(gemma_model, name)
        assert via_node.dtype == expected.dtype and via_node.shape == expected.shape
        assert np.array_equal(via_node, expected, equal_nan=True)
        # A tensor c lacks is fetched from the swarm (b holds layer 0), and only its fragments.
        before = dat_files(got_c.folder)
        name0 = "blk.0.ffn_down.weight"
        assert np.array_equal(await get_tensor(c, model_cid, name0), original_tensor(gemma_model, name0))
        added = dat_files(got_c.folder) - before
        assert added == {f.file_name for f in manifest.fragments if f.tensor_name == name0}


async def test_partial_pull_adds_to_the_folder_and_assemble_names_what_is_missing(tmp_path: Path) -> None:
    model, _ = layered_model(tmp_path / "seed")
    async with node_at(tmp_path / "seed") as seed, node_at(tmp_path / "p", seed.addrs()[:1]) as p:
        model_cid = next(iter(seed.store.models))
        await pull_model(p, model_cid, PullOptions(selection=Selection(layers=parse_layers("0-1"), with_output=True)))
        got, _ = await pull_model(p, model_cid, PullOptions(selection=Selection(tensors=("blk.4.*",))))
        held = {f.tensor_name for f, h in zip(got.manifest.fragments, got.have, strict=True) if h}
        assert held == {
            *(f"blk.{i}.{t}.weight" for i in (0, 1, 4) for t in ("attn_q", "ffn_up")),
            "output_norm.weight",
            "token_embd.weight",  # no output.weight: the head is tied to the embeddings
            "rope_freqs.weight",  # shared by every layer: comes with --layers
        }
        assert held_summary(got.manifest, got.have).layers == "0-1,4"
        with pytest.raises(fr.FragmenterError, match=r"\d+ of \d+ fragments missing \(layers 2-3,5; e.g"):
            fr.assemble(got.folder, tmp_path / "out.gguf")
        assert not (tmp_path / "out.gguf").exists()
        # Then the rest: a whole pull completes the same folder, and it assembles byte-identical.
        got, stats = await pull_model(p, model_cid)
        assert got.complete and stats.already_had == len(held_fragments := [h for h in got.have if h]) - (
            stats.fragments_fetched
        )
        assert held_fragments
        fr.assemble(got.folder, tmp_path / "out.gguf")
        assert (tmp_path / "out.gguf").read_bytes() == model.read_bytes()
        # A read from a partial folder: the layer's tensor equals gguf.quants of the original.
        assert np.array_equal(
            read_tensor(got.folder, "blk.4.attn_q.weight"), original_tensor(model, "blk.4.attn_q.weight")
        )


async def test_a_pull_ends_when_its_own_layers_are_in_whatever_else_the_node_waits_for(tmp_path: Path) -> None:
    layered_model(tmp_path / "seed")
    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        seed, stop_seed = await nursery.start(node_in_task, tmp_path / "seed")
        model_cid = next(iter(seed.store.models))
        p = await stack.enter_async_context(node_at(tmp_path / "p", seed.addrs()[:1]))
        await pull_model(p, model_cid, PullOptions(selection=Selection(layers=parse_layers("0-1"))))
        with trio.fail_after(20):
            await stop_seed()  # now nobody holds layer 3
        q = await stack.enter_async_context(node_at(tmp_path / "q", p.addrs()[:1]))
        stuck = PullOptions(selection=Selection(layers=frozenset({3})), stall_timeout=3600)
        give_up = trio.CancelScope()

        async def stuck_pull() -> None:
            with give_up:
                await pull_model(q, model_cid, stuck)  # waits for layer 3, which never comes

        nursery.start_soon(stuck_pull)
        with trio.fail_after(30):
            while model_cid not in q.swarms or not q.swarms[model_cid].wanted:
                await trio.sleep(0.05)
            got, stats = await pull_model(q, model_cid, PullOptions(selection=Selection(layers=frozenset({1}))))
        assert held_summary(got.manifest, got.have).layers == "1"
        assert set(stats.bytes_by_peer) == {str(p.peer_id)}
        # The stuck pull given up: nothing is wanted any more, and the swarm is idle.
        swarm = q.swarms[model_cid]
        fragments = got.manifest.fragments
        assert {fragments[k].tensor_name for k in swarm.wanted if k < len(fragments) and not got.have[k]} <= {
            f.tensor_name for f in got.manifest.fragments if f.tensor_name.startswith("blk.3.")
        }
        give_up.cancel()
        await trio.sleep(0.1)
        assert all(got.have[k] for k in swarm.wanted if k < len(got.have)) and swarm.picker is None
        nursery.cancel_scope.cancel()


async def test_a_selection_that_matches_nothing_is_a_clear_error(tmp_path: Path) -> None:
    layered_model(tmp_path / "seed")
    async with node_at(tmp_path / "seed") as seed, node_at(tmp_path / "p", seed.addrs()[:1]) as p:
        model_cid = next(iter(seed.store.models))
        with pytest.raises(Exception, match=r"no layer 9-10 \(its layers: 0-5\)"):
            await pull_model(p, model_cid, PullOptions(selection=Selection(layers=parse_layers("9-10"))))
        with pytest.raises(Exception, match="no tensor of the model matches 'nope.*'"):
            await pull_model(p, model_cid, PullOptions(selection=Selection(tensors=("nope.*",))))


async def test_where_maps_five_nodes_holding_different_layer_ranges(tmp_path: Path) -> None:
    layered_model(tmp_path / "seed")
    ranges = {"p0": "0-1", "p1": "2-3", "p2": "4-5", "p3": "1-4"}
    async with AsyncExitStack() as stack:
        seed = await stack.enter_async_context(node_at(tmp_path / "seed"))
        entry = seed.addrs()[:1]
        model_cid = next(iter(seed.store.models))
        nodes = {"seed": seed}
        for name, layers in ranges.items():
            nodes[name] = node = await stack.enter_async_context(node_at(tmp_path / name, entry))
            await pull_model(node, model_cid, PullOptions(selection=Selection(layers=parse_layers(layers))))
        truth = {str(n.peer_id): list(n.store.models[model_cid].have) for n in nodes.values()}

        observer = await stack.enter_async_context(node_at(tmp_path / "observer", entry))
        with trio.fail_after(30):
            while True:  # until the partial nodes' provider records are in the DHT
                found = await survey(observer, model_cid, find_timeout=5)
                if len(found.holdings) == len(truth):
                    break
                await trio.sleep(0.5)
        assert found.holdings == truth
        cov = coverage(found.manifest, found.holdings)
        rows = {r.label: r.copies for r in cov.rows}
        # p3 (1-4) overlaps p0 (0-1), p1 (2-3) and p2 (4-5) differently: rows split where holders change.
        # rope_freqs ("other") comes with any layer range, so every node holds it.
        assert rows == {
            "embeddings": 1,
            "layer 0": 2,
            "layer 1": 3,
            "layers 2-3": 3,
            "layer 4": 3,
            "layer 5": 2,
            "output": 1,
            "other": 5,
        }

        # The CLI reports the same map, and exits 3 while some layer has fewer than --min-copies.
        result = await trio.run_process(
            [
                *CLI,
                "where",
                model_cid,
                "--json",
                "--min-copies",
                "2",
                "--bootstrap",
                entry[0],
                "--listen",
                LOOPBACK[0],
                "--no-mdns",
            ],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        report = json.loads(result.stdout.decode().strip().splitlines()[-1])
        assert result.returncode == 3, result.stderr.decode()[-500:]
        assert {r["label"]: r["copies"] for r in report["rows"]} == rows
        assert {r["label"] for r in report["rows"] if r["copies"] < 2} == {"embeddings", "output"}


def test_sync_node_fetches_a_tensor_for_plain_python_callers(tmp_path: Path) -> None:
    model, _ = layered_model(tmp_path / "seed")
    with SyncNode(NodeConfig(tmp_path / "seed", listen=LOOPBACK)) as seed:
        model_cid = seed.model_cids()[0]
        (tmp_path / "client").mkdir()
        with SyncNode(NodeConfig(tmp_path / "client", listen=LOOPBACK, bootstrap=seed.addrs()[:1])) as client:
            got = client.get_tensor(model_cid, "blk.2.ffn_up.weight")
            assert "blk.2.ffn_up.weight" in client.tensor_names(model_cid)
            with pytest.raises(NodeError, match="no tensor named 'nope'"):
                client.get_tensor(model_cid, "nope")
    assert np.array_equal(got, original_tensor(model, "blk.2.ffn_up.weight"))


def models(data_dir: Path) -> list[dict]:
    listed = subprocess.run([*CLI, "models", "--data-dir", str(data_dir), "--json"], capture_output=True, text=True)
    return [json.loads(line) for line in listed.stdout.splitlines()]


def test_cli_partial_pull_and_models(tmp_path: Path) -> None:
    layered_model(tmp_path / "seed")
    listed = subprocess.run(
        [*CLI, "models", "--data-dir", str(tmp_path / "seed"), "--json"], capture_output=True, text=True
    )
    model_cid = json.loads(listed.stdout.splitlines()[0])["model_cid"]
    with seed_process(tmp_path / "seed") as addr:
        done = pull(model_cid, tmp_path / "p", addr, "--layers", "2-3", "--with-embeddings")
        assert done.returncode == 0, done.stderr
        assert events(done)[-1]["event"] == "pulled"
        bad = pull(model_cid, tmp_path / "q", addr, "--layers", "2-3", "-o", str(tmp_path / "x.gguf"))
        assert_one_line_error(bad, "--output assembles the whole model")
        assert bad.returncode == 2
    listed = subprocess.run(
        [*CLI, "models", "--data-dir", str(tmp_path / "p"), "--json"], capture_output=True, text=True
    )
    entry = json.loads(listed.stdout.splitlines()[0])
    assert (entry["layers"], entry["embeddings"], entry["output"], entry["complete"]) == ("2-3", True, False, False)
    text = subprocess.run([*CLI, "models", "--data-dir", str(tmp_path / "p")], capture_output=True, text=True).stdout
    assert "layers 2-3, embeddings" in text
