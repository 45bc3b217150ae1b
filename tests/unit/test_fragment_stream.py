"""The fragmenter's fast paths give the bytes of the plain ones: views of any
size sliced into fragments, one-block roots computed inline, entries held as
rows and the manifest streamed (issue 9, 40,000-fragment models)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
from gguf import GGMLQuantizationType as T

import fragmenter as fr
import fragmenter.fragment as fragment_module
from fragmenter.manifest import FragmentEntries, _cid_from_hex, fragment_entry, serialize, serialize_chunks
from fragmenter.plan import ShardPlan
from protocol.blocks import BlockHasher
from protocol.cid import cid_from_hex, cid_of
from tests.gguf_factory import MIXED, write_model


def _plain(manifest: Any) -> bytes:
    """What the fragmenter wrote before streaming: the model CID hashes these bytes."""
    return (json.dumps(manifest, indent=1, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ---- manifest serialization ---------------------------------------------------------


def _entry(**over: Any) -> dict[str, Any]:
    entry = {
        "fragment_id": "m_L0_attn_q_S0_0123456789abcdef",
        "model_name": "m",
        "layer_index": 0,
        "expert_index": None,
        "shape": [64, 32],
        "is_always_active": True,
        "block_root": "ab" * 32,
    }
    entry.update(over)
    return entry


ODD_ENTRIES = [
    _entry(),
    _entry(layer_index=-3, component='ünïcødé \u2028 "quoted" \\ \n\t\x01', is_always_active=False),
    _entry(shape=[]),
    _entry(shape=[7]),
    _entry(shape=[1, True, 3]),  # not all ints: json's own encoding
    _entry(extra={"nested": [1.5, None, {"a": []}], "empty": {}}, ratio=0.1, big=2**70),
    {},
    {"only": 1},
]


@pytest.mark.parametrize(
    "manifest",
    [
        {"format": "x", "fragments": ODD_ENTRIES, "metadata": {"k": [1, 2.5, "s"], "f": 1e-6}},
        {"fragments": []},
        {"fragments": [_entry()]},
        {"a": 1, "fragments": "not a list", "b": {}},
        {"no fragments": [1, 2]},
        {},
        [1, {"fragments": [1]}],
        {1: "int key", "fragments": [_entry()]},
        {"fragments": [{1: "int key in an entry"}, _entry()]},
    ],
)
def test_streamed_manifest_is_json_dumps_byte_for_byte(manifest: Any) -> None:
    assert serialize(manifest) == b"".join(serialize_chunks(manifest)) == _plain(manifest)


def test_streamed_manifest_comes_in_bounded_pieces() -> None:
    manifest = {"format": "x", "fragments": [_entry(shard_index=i) for i in range(5000)], "tail": [1]}
    pieces = list(serialize_chunks(manifest))
    assert b"".join(pieces) == _plain(manifest)
    assert max(len(p) for p in pieces) < len(b"".join(pieces)) // 3


def test_nan_is_refused_as_before() -> None:
    with pytest.raises(ValueError):
        serialize({"fragments": [_entry(ratio=float("nan"))]})
    with pytest.raises(ValueError):
        serialize({"x": float("inf"), "fragments": []})


def test_fast_cid_is_the_protocol_cid() -> None:
    for i in range(2000):
        sha = hashlib.sha256(i.to_bytes(4, "big")).hexdigest()
        assert _cid_from_hex(sha) == cid_from_hex(sha)
    for sha in ("00" * 32, "ff" * 32):
        assert _cid_from_hex(sha) == cid_from_hex(sha)


def test_entry_rows_give_fragment_entry_dicts(small_model: Path) -> None:
    """Same ids (collisions included), same dicts, in order, whatever the block roots."""
    header = fr.parse_header(small_model.read_bytes())
    tensors = header.tensors
    shards = [ShardPlan(t, i, 3, 1000 * k + i, 10 + i) for k, t in enumerate(tensors) for i in range(3)]
    shas = [hashlib.sha256(bytes([k % 4])).hexdigest() for k in range(len(shards))]  # many equal digests
    used: set[str] = set()
    expected = [fragment_entry("m", s, sha, "r" * 64, used, 96) for s, sha in zip(shards, shas, strict=True)]
    rows = FragmentEntries("m")
    ids = [rows.add(s, sha, "" if k % 2 else "r" * 64, 96) for k, (s, sha) in enumerate(zip(shards, shas, strict=True))]
    for k in range(1, len(shards), 2):
        rows.set_block_root(k, "r" * 64)
    assert len(rows) == len(expected) and ids == [e["fragment_id"] for e in expected]
    assert list(rows) == expected
    assert rows.total_shards == {t.name: 3 for t in tensors}
    assert serialize({"fragments": rows}) == _plain({"fragments": expected})


# ---- reading in views, writing fragments ------------------------------------------


def test_manifest_is_the_plain_json_of_itself(small_model: Path, tmp_path: Path) -> None:
    """The bytes written are json.dumps of the manifest they hold: the CID did not change."""
    result = fr.fragment_model(small_model, tmp_path / "frag", chunk_size=1000)
    data = (tmp_path / "frag" / "manifest.json").read_bytes()
    assert _plain(json.loads(data)) == data and result.model_cid == cid_of(data)


@pytest.mark.parametrize("read_size", [4096, 1000, 777, 1 << 20])
@pytest.mark.parametrize("chunk", [256, 1000, 5000])
def test_any_read_size_gives_the_same_folder(
    small_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, read_size: int, chunk: int
) -> None:
    """Fragments inside one view, across two, spanning several: the same files and manifest."""
    expected = fr.fragment_model(small_model, tmp_path / "plain", chunk_size=chunk)
    monkeypatch.setattr(fragment_module, "_READ_SIZE", read_size)
    result = fr.fragment_model(small_model, tmp_path / "views", chunk_size=chunk)
    assert result.model_cid == expected.model_cid and result.file_sha256 == expected.file_sha256
    assert _folder_bytes(tmp_path / "views") == _folder_bytes(tmp_path / "plain")
    assert fr.verify_folder(tmp_path / "views").ok


@pytest.mark.parametrize("read_size", [1 << 20, 3 << 19, 5000])
def test_fragments_of_several_blocks_under_any_read_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, read_size: int
) -> None:
    """Fragments of 1 MiB (one block: root inline) and of more (block worker), cut by any view."""
    model = write_model(tmp_path / "big.gguf", [(f"blk.{i}.ffn_up.weight", T.F32, (256, 3072)) for i in range(2)])
    for chunk in (1 << 20, 3 << 20):
        expected = fr.fragment_model(model, tmp_path / f"plain-{chunk}", chunk_size=chunk)
        with monkeypatch.context() as m:
            m.setattr(fragment_module, "_READ_SIZE", read_size)
            result = fr.fragment_model(model, tmp_path / f"views-{chunk}", chunk_size=chunk)
        assert result.model_cid == expected.model_cid
        assert _folder_bytes(tmp_path / f"views-{chunk}") == _folder_bytes(tmp_path / f"plain-{chunk}")
        raw = json.loads((tmp_path / f"views-{chunk}" / "manifest.json").read_bytes())
        for f in raw["fragments"]:
            blocks = BlockHasher()
            blocks.update((tmp_path / f"views-{chunk}" / (f["fragment_id"] + ".dat")).read_bytes())
            assert f["block_root"] == blocks.root()


@pytest.mark.parametrize("read_size", [4096, 700])
def test_split_model_under_any_read_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, read_size: int) -> None:
    """Views never span two parts; each part is hashed on its own."""
    (tmp_path / "src").mkdir()
    write_model(tmp_path / "src" / "model.gguf", MIXED, split_max_tensors=3)
    parts = sorted((tmp_path / "src").glob("model-*-of-*.gguf"))
    assert len(parts) > 1
    expected = fr.fragment_model(parts[0], tmp_path / "plain", chunk_size=1024)
    monkeypatch.setattr(fragment_module, "_READ_SIZE", read_size)
    result = fr.fragment_model(parts[0], tmp_path / "views", chunk_size=1024)
    assert result.model_cid == expected.model_cid and result.parts == len(parts)
    assert _folder_bytes(tmp_path / "views") == _folder_bytes(tmp_path / "plain")
    out = fr.assemble(tmp_path / "views", tmp_path / "out")
    assert out.checked_against_manifest
    for p in parts:
        assert (tmp_path / "out" / p.name).read_bytes() == p.read_bytes()


def test_fragment_files_get_the_usual_permissions(small_model: Path, tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        fr.fragment_model(small_model, tmp_path / "frag", chunk_size=1000)
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "frag").iterdir() if p.suffix == ".dat" or p.name == "manifest.json"]
    assert {p.stat().st_mode & 0o777 for p in files} == {0o644}


def test_a_failed_write_leaves_no_folder(small_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk part way: a clear error, and neither the folder nor its staging left."""
    calls = 0
    real = fragment_module._write_file

    def failing(name: str, data: Any, folder: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 5:
            raise OSError(28, "No space left on device")
        real(name, data, folder)

    monkeypatch.setattr(fragment_module, "_write_file", failing)
    with pytest.raises(fr.FragmenterError, match="No space left"):
        fr.fragment_model(small_model, tmp_path / "frag", chunk_size=1000)
    assert calls == 5
    assert [p.name for p in tmp_path.iterdir()] == [small_model.name]
