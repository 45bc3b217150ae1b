"""Coverage map of a model over peers (`gguf-swarm where`): rows, copies, rendering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as T

import fragmenter as fr
from fragmenter.manifest import Manifest
from fragmenter.progress import human_bytes
from fragmenter.selection import tensor_group
from node.coverage import Coverage, column_name, coverage, render, to_json
from tests.gguf_factory import write_model

N_LAYERS = 6
CHUNK = 1024  # F32 rows of 64 are 256 bytes: ffn_up (2048 bytes) has 2 shards, token_embd 4


def _tensors() -> list[tuple[str, T, tuple[int, ...]]]:
    tensors: list[tuple[str, T, tuple[int, ...]]] = [("token_embd.weight", T.F32, (16, 64))]
    for n in range(N_LAYERS):
        tensors += [
            (f"blk.{n}.attn_norm.weight", T.F32, (64,)),
            (f"blk.{n}.attn_q.weight", T.F32, (4, 64)),
            (f"blk.{n}.ffn_up.weight", T.F32, (8, 64)),
        ]
    tensors += [
        ("output_norm.weight", T.F32, (64,)),
        ("output.weight", T.F32, (16, 64)),
        ("rope_freqs.weight", T.F32, (32,)),
    ]
    return tensors


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    tmp = tmp_path_factory.mktemp("coverage")
    model = write_model(tmp / "layered.gguf", _tensors())
    fr.fragment_model(model, tmp / "frag", chunk_size=CHUNK)
    return fr.read_manifest(Path(tmp / "frag"))


def _holding(manifest: Manifest, groups: set[int | str]) -> list[bool]:
    return [tensor_group(f.tensor_name) in groups for f in manifest.fragments]


def _peer(n: int) -> str:
    return f"12D3KooWPeer{n:02d}xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx{n:04d}"


def test_tensor_group() -> None:
    assert tensor_group("blk.12.attn_q.weight") == 12
    assert tensor_group("token_embd.weight") == "embeddings"
    assert tensor_group("per_layer_token_embd.weight") == "embeddings"
    assert tensor_group("position_embd.weight") == "embeddings"
    assert tensor_group("token_types.weight") == "embeddings"
    assert tensor_group("output.weight") == "output"
    assert tensor_group("output_norm.weight") == "output"
    assert tensor_group("cls.output.weight") == "output"
    assert tensor_group("rope_freqs.weight") == "other"


def test_the_test_model_has_multi_shard_tensors(manifest: Manifest) -> None:
    shards = [f for f in manifest.fragments if f.tensor_name == "blk.0.ffn_up.weight"]
    assert [f.total_shards for f in shards] == [2, 2]


def test_five_peers_on_layer_ranges(manifest: Manifest) -> None:
    a, b, c, d, e = (_peer(n) for n in range(5))
    holdings = {
        e: _holding(manifest, {4, 5, "output", "other"}),
        a: _holding(manifest, {"embeddings", 0, 1}),
        b: _holding(manifest, {0, 1, 2, 3}),
        c: _holding(manifest, {2, 3}),
        d: _holding(manifest, {4, 5}),
    }
    cov = coverage(manifest, holdings)
    got = [(r.label, r.first_layer, r.last_layer, r.copies, sorted(r.held)) for r in cov.rows]
    assert got == [
        ("embeddings", None, None, 1, [a]),
        ("layers 0-1", 0, 1, 2, [a, b]),
        ("layers 2-3", 2, 3, 2, [b, c]),
        ("layers 4-5", 4, 5, 2, [d, e]),
        ("output", None, None, 1, [e]),
        ("other", None, None, 1, [e]),
    ]
    assert all(f == 1.0 for r in cov.rows for f in r.held.values())
    assert cov.peers == [a, b, c, d, e]  # by first row held, then id
    assert sum(r.fragments for r in cov.rows) == len(manifest.fragments)
    assert sum(r.bytes for r in cov.rows) == manifest.total_bytes
    assert len(cov.fragment_copies) == len(manifest.fragments)
    assert cov.fragment_copies == [sum(h[i] for h in holdings.values()) for i in range(len(manifest.fragments))]


def test_layers_merge_only_when_held_alike(manifest: Manifest) -> None:
    everything = [True] * len(manifest.fragments)
    cov = coverage(manifest, {_peer(0): everything, _peer(1): everything})
    assert [r.label for r in cov.rows] == ["embeddings", f"layers 0-{N_LAYERS - 1}", "output", "other"]
    assert cov.rows[1].copies == 2

    # A peer that also holds layer 3 splits the range in three.
    cov = coverage(manifest, {_peer(0): everything, _peer(1): _holding(manifest, {3})})
    assert [r.label for r in cov.rows][1:4] == ["layers 0-2", "layer 3", f"layers 4-{N_LAYERS - 1}"]
    assert [r.copies for r in cov.rows][1:4] == [1, 2, 1]


def test_partial_holder(manifest: Manifest) -> None:
    full, part = _peer(0), _peer(1)
    # `part` holds layer 2 except the second shard of its ffn_up.
    partial = [
        tensor_group(f.tensor_name) == 2 and not (f.tensor_name == "blk.2.ffn_up.weight" and f.shard_index == 1)
        for f in manifest.fragments
    ]
    missing = next(
        i for i, f in enumerate(manifest.fragments) if f.tensor_name == "blk.2.ffn_up.weight" and f.shard_index == 1
    )
    cov = coverage(manifest, {full: _holding(manifest, {2}), part: partial})
    row = next(r for r in cov.rows if r.label == "layer 2")
    layer_bytes = sum(f.size for f in manifest.fragments if tensor_group(f.tensor_name) == 2)
    assert row.held[full] == 1.0
    assert row.held[part] == pytest.approx((layer_bytes - manifest.fragments[missing].size) / layer_bytes)
    assert 0 < row.held[part] < 1
    assert cov.fragment_copies[missing] == 1  # the partial holder is no copy of the shard it lacks
    assert row.copies == 1
    text = render(cov)
    assert "▒▒" in text and "██" in text


def test_under_and_json(manifest: Manifest) -> None:
    a, b = _peer(0), _peer(1)
    cov = coverage(manifest, {a: _holding(manifest, {"embeddings", 0, 1, 2}), b: _holding(manifest, {1, 2, 3})})
    assert [r.label for r in cov.under(1)] == ["layers 4-5", "output", "other"]
    assert [r.label for r in cov.under(2)] == ["embeddings", "layer 0", "layer 3", "layers 4-5", "output", "other"]
    assert cov.under(0) == []

    lost = sum(1 for f in manifest.fragments if tensor_group(f.tensor_name) in {4, 5, "output", "other"})
    once = sum(1 for f in manifest.fragments if tensor_group(f.tensor_name) in {"embeddings", 0, 3})
    data = to_json(cov, min_copies=2)
    assert json.loads(json.dumps(data)) == data
    assert data["fragments_lost"] == lost == cov.fragments_lost
    assert data["fragments_under_min"] == lost + once
    assert to_json(cov)["fragments_under_min"] == lost
    assert data["min_copies"] == 2
    assert data["peers"] == [a, b]
    assert data["rows"][0] == {
        "label": "embeddings",
        "first_layer": None,
        "last_layer": None,
        "fragments": cov.rows[0].fragments,
        "bytes": cov.rows[0].bytes,
        "copies": 1,
        "held": {a: 1.0},
    }


def test_render_plain(manifest: Manifest) -> None:
    a, b = _peer(0), _peer(1)
    cov = coverage(manifest, {a: _holding(manifest, {"embeddings", 0, 1, 2}), b: _holding(manifest, {1, 2, 3})})
    text = render(cov, min_copies=2)
    assert "\x1b" not in text
    lines = text.splitlines()
    for row in cov.rows:
        line = next(line for line in lines if line.startswith(row.label + " "))
        assert (row.copies < 2) == ("! under 2 copies" in line)
        assert ("(lost)" in line) == (row.copies == 0)
        assert human_bytes(row.bytes) in line
    assert any(a in line and a[-6:] in line for line in lines)  # legend: short id -> full id
    assert any(b in line for line in lines)
    assert lines[0].split()[1:3] == ["A", "B"]
    assert lines[-1].startswith(f"{len(manifest.fragments)} fragments")
    assert "2 peers" in lines[-1]
    assert f"{cov.fragments_lost} lost" in lines[-1]
    assert all(len(line) <= 100 for line in lines if not line.lstrip().startswith(("A ", "B ")))


def test_render_color(manifest: Manifest) -> None:
    cov = coverage(manifest, {_peer(0): _holding(manifest, {0, 1})})
    text = render(cov, color=True)
    assert "\x1b[31m" in text  # lost rows in red
    assert "\x1b[32m" in text  # held rows in green
    assert "\x1b[33m" in render(cov, min_copies=2, color=True)  # under min, not lost: yellow


def test_many_peers(manifest: Manifest) -> None:
    holdings = {_peer(n): _holding(manifest, {n % N_LAYERS}) for n in range(40)}
    cov = coverage(manifest, holdings)
    text = render(cov, width=100)
    header = text.splitlines()[0]
    shown = len(header.split()) - 1 - 4  # minus "layers", "+N", "more", "copies", "size"
    assert 0 < shown < 40
    assert f"+{40 - shown} more" in header
    assert all(len(line) <= 100 for line in text.splitlines()[: 1 + len(cov.rows)])
    layer0 = next(r for r in cov.rows if r.first_layer == 0)
    assert layer0.copies == 7  # peers 0, 6, ..., 36: hidden ones count too
    assert column_name(25) == "Z" and column_name(26) == "AA"


def test_header_copies(manifest: Manifest) -> None:
    a, b = _peer(0), _peer(1)
    everything = [True] * len(manifest.fragments)
    cov = coverage(manifest, {a: everything, b: everything}, header_holders=[a])
    assert cov.header_copies == 1
    assert to_json(cov)["header_copies"] == 1
    assert "header: 1 copy" in render(cov)
    assert coverage(manifest, {a: everything}).header_copies is None


def test_wrong_length_holdings(manifest: Manifest) -> None:
    n = len(manifest.fragments)
    with pytest.raises(ValueError, match="fragments"):
        coverage(manifest, {_peer(0): [True] * (n - 1)})
    with pytest.raises(ValueError):
        coverage(manifest, {_peer(0): [True] * n, _peer(1): [True] * (n + 1)})


def test_no_peers(manifest: Manifest) -> None:
    cov = coverage(manifest, {})
    assert isinstance(cov, Coverage)
    assert cov.peers == []
    assert all(r.copies == 0 and r.held == {} for r in cov.rows)
    assert cov.fragments_lost == len(manifest.fragments)
    assert "0 peers" in render(cov)
