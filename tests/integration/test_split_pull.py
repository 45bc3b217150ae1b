"""Split models (llama.cpp's NAME-0000k-of-0000N.gguf parts) through the
swarm: one CID, pulled whole or in part by real libp2p nodes on 127.0.0.1,
assembled back into the same parts or merged; and the same through the
`gguf-swarm` console script (publish, pull --output [--merge])."""

from __future__ import annotations

import json
import subprocess
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as T

import fragmenter as fr
from fragmenter.errors import FragmentError
from fragmenter.selection import Selection, held_summary, parse_layers
from node.cli import main
from node.pull import PullOptions, pull_model
from tests.conftest import sha256_file
from tests.gguf_factory import write_model
from tests.integration.test_cli_node import CLI, LISTEN, events, pull
from tests.integration.test_partial_replicas import dat_files
from tests.integration.test_swarm import node_at
from tests.processes import terminate

LAYERS = 4
# 11 tensors, at most 4 a part: 3 parts, layers spread over all of them.
TENSORS = [("token_embd.weight", T.Q8_0, (64, 128))]
for _i in range(LAYERS):
    TENSORS += [(f"blk.{_i}.attn_q.weight", T.Q4_K, (16, 256)), (f"blk.{_i}.ffn_up.weight", T.F16, (16, 64))]
TENSORS += [("output_norm.weight", T.F32, (64,)), ("output.weight", T.Q8_0, (64, 64))]
PARTS = 3


def split_parts(src: Path, name: str = "tiny") -> list[Path]:
    """The parts of a small split model with a vocabulary, written into `src`."""
    src.mkdir(parents=True, exist_ok=True)
    write_model(src / f"{name}.gguf", TENSORS, split_max_tensors=4)
    parts = sorted(src.glob(f"{name}-*-of-*.gguf"))
    assert [p.name for p in parts] == [f"{name}-{k:05d}-of-{PARTS:05d}.gguf" for k in range(1, PARTS + 1)]
    return parts


def unsplit(base: Path) -> Path:
    """gguf-py writing the same model as one file: what --merge must give."""
    base.mkdir(parents=True, exist_ok=True)
    return write_model(base / "tiny.gguf", TENSORS)


async def test_split_model_pulled_in_part_then_whole_and_assembled(tmp_path: Path) -> None:
    parts = split_parts(tmp_path / "src")
    fr.fragment_model(parts[0], tmp_path / "seed" / "tiny", chunk_size=4096)
    manifest = fr.read_manifest(tmp_path / "seed" / "tiny")
    layer1 = {f.file_name for f in manifest.fragments if f.tensor_name.startswith("blk.1.")}
    async with AsyncExitStack() as stack:
        seed = await stack.enter_async_context(node_at(tmp_path / "seed"))
        model_cid = next(iter(seed.store.models))
        puller = await stack.enter_async_context(node_at(tmp_path / "p", seed.addrs()[:1]))

        # Layer 1's tensors sit in two parts; a partial pull takes just those fragments.
        got, _ = await pull_model(puller, model_cid, PullOptions(selection=Selection(layers=parse_layers("1"))))
        assert dat_files(got.folder) == layer1
        assert held_summary(got.manifest, got.have).layers == "1" and not got.complete
        with pytest.raises(FragmentError, match="fragments missing"):
            fr.assemble(got.folder, tmp_path / "early")
        assert not (tmp_path / "early").exists()

        got, stats = await pull_model(puller, model_cid)  # the rest, into the same folder
        assert got.complete and stats.already_had == len(layer1)
    assert fr.verify_folder(got.folder).ok
    # The tokenizer files come from part 1's header, as the seed's do.
    assert sha256_file(got.folder / "tokenizer.json") == sha256_file(tmp_path / "seed" / "tiny" / "tokenizer.json")

    out = fr.assemble(got.folder, tmp_path / "parts")
    assert [f.name for f in out.files] == [p.name for p in parts]
    for p in parts:
        assert sha256_file(tmp_path / "parts" / p.name) == sha256_file(p)
    merged = fr.assemble(got.folder, tmp_path / "merged.gguf", merge=True)
    assert merged.merged
    assert sha256_file(tmp_path / "merged.gguf") == sha256_file(unsplit(tmp_path / "whole"))


def test_cli_publish_a_part_then_pull_output_parts_and_merged(tmp_path: Path) -> None:
    parts = split_parts(tmp_path / "src")
    data = tmp_path / "served"
    # Any part names the model; its folder is the model's name, not the part's.
    proc = subprocess.Popen(
        [*CLI, "publish", str(parts[1]), "--data-dir", str(data), *LISTEN, "--no-mdns", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        seen = _events_until(proc, "serving")
        published = seen["published"]
        assert published["folder"] == str(data / "tiny")
        assert fr.read_manifest(data / "tiny").model_name == "tiny"
        addr = seen["listening"]["addrs"][0]
        cid = published["model_cid"]

        got = pull(cid, tmp_path / "p", addr, "--no-mdns", "--output", str(tmp_path / "out"))
        assert got.returncode == 0, got.stderr[-2000:]
        assembled = [e for e in events(got) if e["event"] == "assembled"]
        assert len(assembled) == 1 and not assembled[0]["merged"] and assembled[0]["checked"]
        assert [Path(f).name for f in assembled[0]["files"]] == [p.name for p in parts]
        assert assembled[0]["output"] == str((tmp_path / "out").resolve())
        for p in parts:
            assert sha256_file(tmp_path / "out" / p.name) == sha256_file(p)

        # The model is held now: this pull only assembles, merged.
        merged = pull(cid, tmp_path / "p", addr, "--no-mdns", "--output", str(tmp_path / "m.gguf"), "--merge")
        assert merged.returncode == 0, merged.stderr[-2000:]
        event = [e for e in events(merged) if e["event"] == "assembled"][0]
        assert event["merged"] and event["files"] == [] and event["output"] == str((tmp_path / "m.gguf").resolve())
        assert sha256_file(tmp_path / "m.gguf") == event["file_sha256"] == sha256_file(unsplit(tmp_path / "whole"))
    finally:
        terminate(proc)


def test_cli_pull_merge_without_output_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cid = "bafkreibm6jg3ux5qumhcn2b3flc3tyu6dmlb4xa7u5bf44yegnrjhc4yeq"
    assert main(["pull", cid, "--data-dir", str(tmp_path / "d"), "--merge"]) == 2
    assert capsys.readouterr().err == "error: --merge needs --output (the file to merge a split model's parts into)\n"
    assert not (tmp_path / "d").exists()  # refused before any node started


def _events_until(proc: subprocess.Popen[str], last: str) -> dict[str, dict]:
    """The JSON events of a running node, by name, up to the first `last` one."""
    seen: dict[str, dict] = {}
    assert proc.stdout is not None
    for line in proc.stdout:
        event = json.loads(line)
        seen[event["event"]] = event
        if event["event"] == last:
            return seen
    raise AssertionError(proc.stderr.read() if proc.stderr else seen)
