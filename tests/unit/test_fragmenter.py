"""Fragment -> verify -> assemble on small real GGUF files."""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

import fragmenter as fr
from protocol.blocks import BLOCK_SIZE, block_digests, block_root
from protocol.cid import cid_of
from tests.conftest import sha256_file
from tests.gguf_factory import MIXED, set_version, write_model, write_vocab_only


@pytest.mark.parametrize("chunk", [256, 1000, 1024, 10 * 1024 * 1024])
def test_round_trip_is_byte_identical(small_model: Path, tmp_path: Path, chunk: int) -> None:
    result = fr.fragment_model(small_model, tmp_path / "frag", chunk_size=chunk)
    assert fr.verify_folder(tmp_path / "frag").ok
    out = fr.assemble(tmp_path / "frag", tmp_path / "back.gguf")
    assert out.checked_against_manifest
    assert sha256_file(tmp_path / "back.gguf") == sha256_file(small_model) == result.file_sha256


def test_shards_fall_on_row_boundaries_when_a_row_fits(small_model: Path, tmp_path: Path) -> None:
    fr.fragment_model(small_model, tmp_path / "frag", chunk_size=1000)
    manifest = fr.read_manifest(tmp_path / "frag")
    specifics = manifest.raw["tensor_specifics"]
    multi = [f for f in manifest.fragments if f.total_shards > 1]
    assert multi, "the test model must have tensors larger than the chunk"
    for f in manifest.fragments:
        row = specifics[f.tensor_name]["row_bytes"]
        if row <= 1000:
            assert (f.file_offset - f.data_offset) % row == 0
            assert f.size % row == 0 or f.shard_index == f.total_shards - 1
        assert f.size <= 1000


def test_rows_larger_than_the_chunk_fall_back_to_chunk_cuts(small_model: Path, tmp_path: Path) -> None:
    fr.fragment_model(small_model, tmp_path / "frag", chunk_size=256)
    shards = [f for f in fr.read_manifest(tmp_path / "frag").fragments if f.tensor_name == "blk.0.ffn_up.weight"]
    assert [f.size for f in shards] == [256] * 9  # 2304 bytes, 288-byte rows
    assert fr.verify_folder(tmp_path / "frag").ok


def test_manifest_fields(small_model: Path, tmp_path: Path) -> None:
    result = fr.fragment_model(small_model, tmp_path / "frag", chunk_size=1024)
    raw = json.loads((tmp_path / "frag" / "manifest.json").read_bytes())
    assert result.model_cid == cid_of((tmp_path / "frag" / "manifest.json").read_bytes())
    assert raw["format"] == "gguf-swarm/2"
    assert raw["file_name"] == "tiny-model.gguf" and raw["model_name"] == "tiny-model"
    assert raw["file_size"] == small_model.stat().st_size
    assert raw["config"]["dim"] == 64 and raw["config"]["n_layers"] == 2 and raw["config"]["n_heads"] == 4
    assert raw["config"]["norm_eps"] == 1e-6
    assert raw["metadata"]["llama.block_count"] == 2  # JSON-native, not [2]
    assert raw["metadata"]["tokenizer.ggml.tokens"]["array_of"] == "string"
    ids = [f["fragment_id"] for f in raw["fragments"]]
    assert len(ids) == len(set(ids)) == raw["total_fragments"]
    for f in raw["fragments"]:
        data = (tmp_path / "frag" / (f["fragment_id"] + ".dat")).read_bytes()
        assert len(data) == f["size_bytes"]
        assert f["checksum"] == f["sha256"][:16] and f["fragment_id"].endswith(f["checksum"])
        assert f["cid"] == cid_of(data)
    names = {f["fragment_id"].split("_S")[0] for f in raw["fragments"]}
    assert "tiny-model_L-1_embedding" in names and "tiny-model_L-2_lm_head" in names
    assert "tiny-model_L-3_output_norm.weight" in names and "tiny-model_L0_attn_q" in names
    assert (tmp_path / "frag" / "gguf_header.dat").stat().st_size == raw["header_size"]


def test_deterministic_across_directories(small_model: Path, tmp_path: Path) -> None:
    other = tmp_path / "elsewhere"
    other.mkdir()
    copy = other / small_model.name
    copy.write_bytes(small_model.read_bytes())
    a = fr.fragment_model(small_model, tmp_path / "a")
    cwd = os.getcwd()
    try:
        os.chdir(other)
        b = fr.fragment_model(Path(copy.name), Path("b"))
    finally:
        os.chdir(cwd)
    assert a.model_cid == b.model_cid
    manifest = (tmp_path / "a" / "manifest.json").read_bytes()
    assert manifest == (other / "b" / "manifest.json").read_bytes()
    assert sorted(os.listdir(tmp_path / "a")) == sorted(os.listdir(other / "b"))
    # The block roots are part of the bytes compared above.
    m = fr.parse_manifest(json.loads(manifest))
    assert m.header_block_root and all(f.block_root for f in m.fragments)


def test_equal_tensors_of_one_layer_get_unique_ids(tmp_path: Path) -> None:
    w = gguf.GGUFWriter(str(tmp_path / "dup.gguf"), "llama")
    same = np.arange(16, dtype=np.float32)
    w.add_tensor("blk.0.attn_q.weight", same)
    w.add_tensor("blk.0.attn_q.bias", same.copy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    fr.fragment_model(tmp_path / "dup.gguf", tmp_path / "frag")
    ids = [f.fragment_id for f in fr.read_manifest(tmp_path / "frag").fragments]
    assert len(set(ids)) == 2
    fr.assemble(tmp_path / "frag", tmp_path / "back.gguf")
    assert sha256_file(tmp_path / "back.gguf") == sha256_file(tmp_path / "dup.gguf")


def test_non_zero_padding_and_trailing_bytes_survive(small_model: Path, tmp_path: Path) -> None:
    header = fr.parse_header(small_model.read_bytes())
    norm = next(t for t in header.tensors if t.name == "blk.0.attn_norm.weight")
    pad_at = header.data_start + norm.offset + norm.n_bytes  # 28-byte tensor, 4 bytes of padding follow
    data = bytearray(small_model.read_bytes())
    data[pad_at : pad_at + 4] = b"\xde\xad\xbe\xef"
    data += b"trailing bytes after the last tensor"
    odd = tmp_path / "odd.gguf"
    odd.write_bytes(bytes(data))
    fr.fragment_model(odd, tmp_path / "frag", chunk_size=1024)
    fr.assemble(tmp_path / "frag", tmp_path / "back.gguf")
    assert (tmp_path / "back.gguf").read_bytes() == bytes(data)


@pytest.mark.parametrize("alignment", [1, 64])
def test_alignment_other_than_32(tmp_path: Path, alignment: int) -> None:
    model = write_model(tmp_path / "a.gguf", MIXED[:4], alignment=alignment)
    fr.fragment_model(model, tmp_path / "frag", chunk_size=512)
    assert fr.read_manifest(tmp_path / "frag").alignment == alignment
    fr.assemble(tmp_path / "frag", tmp_path / "back.gguf")
    assert sha256_file(tmp_path / "back.gguf") == sha256_file(model)


def test_gguf_v2_round_trip(tmp_path: Path) -> None:
    model = set_version(write_model(tmp_path / "v2.gguf", MIXED), 2)
    fr.fragment_model(model, tmp_path / "frag", chunk_size=1024)
    assert fr.read_manifest(tmp_path / "frag").raw["gguf_version"] == 2
    fr.assemble(tmp_path / "frag", tmp_path / "back.gguf")
    assert sha256_file(tmp_path / "back.gguf") == sha256_file(model)


@pytest.mark.parametrize("padded", [False, True])
def test_a_model_without_tensors_is_a_header_only_folder(tmp_path: Path, padded: bool) -> None:
    # The manifest format holds it: no fragments, and at most one alignment of
    # padding outside the header (manifest._check_layout).
    model = write_vocab_only(tmp_path / "vocab.gguf", padded=padded)
    result = fr.fragment_model(model, tmp_path / "frag")
    assert result.fragments == 0 and result.tokenizer_files == [
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ]
    manifest = fr.read_manifest(tmp_path / "frag")
    assert manifest.fragments == [] and manifest.header_size == manifest.file_size == model.stat().st_size
    assert fr.verify_folder(tmp_path / "frag").ok and fr.validate_folder(tmp_path / "frag").ok
    fr.assemble(tmp_path / "frag", tmp_path / "back.gguf")
    assert sha256_file(tmp_path / "back.gguf") == sha256_file(model)
    cid, n = fr.rebuild_manifest(tmp_path / "frag")
    assert (cid, n) == (result.model_cid, 0)


def test_an_alignment_no_manifest_may_hold_is_refused(tmp_path: Path) -> None:
    model = write_vocab_only(tmp_path / "vocab.gguf", alignment=1 << 25)  # valid GGUF: no tensors, no padding
    assert fr.parse_header(model.read_bytes()).alignment == 1 << 25
    with pytest.raises(fr.GGUFFormatError, match="alignment 33554432 is larger than the 16777216 a manifest allows"):
        fr.fragment_model(model, tmp_path / "frag")
    assert not (tmp_path / "frag").exists()


def test_a_model_cut_before_its_tensor_data_is_refused(small_model: Path, tmp_path: Path) -> None:
    data = small_model.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: fr.parse_header(data).data_start])
    with pytest.raises(fr.GGUFFormatError, match="runs past the end of the file .*: truncated"):
        fr.fragment_model(cut, tmp_path / "frag")
    assert not (tmp_path / "frag").exists()


def test_load_tensor_equals_dequantizing_the_original(small_model: Path, tmp_path: Path) -> None:
    fr.fragment_model(small_model, tmp_path / "frag", chunk_size=1000)
    reader = gguf.GGUFReader(small_model)
    for t in reader.tensors:
        expected = gguf.quants.dequantize(t.data, t.tensor_type)
        got = fr.load_tensor(tmp_path / "frag", t.name)
        assert got.shape == tuple(reversed([int(d) for d in t.shape]))
        np.testing.assert_array_equal(got, expected.reshape(got.shape))
    assert fr.validate_folder(tmp_path / "frag").ok


def test_interrupted_run_leaves_nothing(small_model: Path, tmp_path: Path) -> None:
    def stop(done: int, total: int) -> None:
        if done > total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fr.fragment_model(small_model, tmp_path / "frag", chunk_size=1024, progress=stop)
    assert not (tmp_path / "frag").exists()
    assert [p.name for p in tmp_path.iterdir()] == [small_model.name]


def test_refuses_non_empty_output_without_force(small_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "frag"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(fr.FragmenterError, match="not empty"):
        fr.fragment_model(small_model, out)
    assert (out / "precious.txt").read_text() == "keep me"
    fr.fragment_model(small_model, out, force=True)
    assert not (out / "precious.txt").exists() and fr.verify_folder(out).ok


def test_verify_reports_bad_and_missing(small_model: Path, tmp_path: Path) -> None:
    fr.fragment_model(small_model, tmp_path / "frag", chunk_size=1024)
    frags = fr.read_manifest(tmp_path / "frag").fragments
    victim, gone = frags[0], frags[1]
    path = tmp_path / "frag" / victim.file_name
    data = bytearray(path.read_bytes())
    data[0] ^= 1
    path.write_bytes(bytes(data))
    (tmp_path / "frag" / gone.file_name).unlink()
    report = fr.verify_folder(tmp_path / "frag")
    assert not report.ok
    assert [fid for fid, _ in report.bad] == [victim.fragment_id]
    assert report.missing == [gone.fragment_id]


def test_assemble_refuses_a_corrupt_fragment_and_names_it(small_model: Path, tmp_path: Path) -> None:
    fr.fragment_model(small_model, tmp_path / "frag", chunk_size=1024)
    victim = fr.read_manifest(tmp_path / "frag").fragments[-1]
    path = tmp_path / "frag" / victim.file_name
    path.write_bytes(b"\0" * victim.size)
    with pytest.raises(fr.FragmentError, match=victim.fragment_id):
        fr.assemble(tmp_path / "frag", tmp_path / "back.gguf")
    assert not (tmp_path / "back.gguf").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".back.gguf")]


def test_rebuilt_manifest_describes_the_same_file(small_model: Path, tmp_path: Path) -> None:
    result = fr.fragment_model(small_model, tmp_path / "frag", chunk_size=1024)
    original = (tmp_path / "frag" / "manifest.json").read_bytes()
    before = fr.read_manifest(tmp_path / "frag")
    # With our manifest in place, rebuilding gives back the same bytes.
    assert fr.rebuild_manifest(tmp_path / "frag") == (result.model_cid, len(before.fragments))
    assert (tmp_path / "frag" / "manifest.json").read_bytes() == original
    (tmp_path / "frag" / "manifest.json").unlink()
    cid, n = fr.rebuild_manifest(tmp_path / "frag")
    after = fr.read_manifest(tmp_path / "frag")
    assert n == len(before.fragments)
    assert after.file_sha256 == before.file_sha256
    assert (after.block_size, after.header_block_root) == (before.block_size, before.header_block_root)
    assert [(f.fragment_id, f.sha256, f.block_root, f.file_offset) for f in after.fragments] == [
        (f.fragment_id, f.sha256, f.block_root, f.file_offset) for f in before.fragments
    ]
    assert cid == cid_of((tmp_path / "frag" / "manifest.json").read_bytes())


# ---- verified blocks (gguf-swarm/2) ------------------------------------------


def _root_by_hand(data: bytes) -> str:
    """block_root spelled out, independent of protocol.blocks."""
    starts = range(0, max(len(data), 1), BLOCK_SIZE)
    return hashlib.sha256(b"".join(hashlib.sha256(data[i : i + BLOCK_SIZE]).digest() for i in starts)).hexdigest()


def test_block_roots_match_the_files(small_model: Path, tmp_path: Path) -> None:
    fr.fragment_model(small_model, tmp_path / "frag", chunk_size=1024)
    raw = json.loads((tmp_path / "frag" / "manifest.json").read_bytes())
    assert raw["block_size"] == BLOCK_SIZE
    header = (tmp_path / "frag" / "gguf_header.dat").read_bytes()
    assert raw["header_block_root"] == block_root(block_digests(header))
    for f in raw["fragments"]:
        data = (tmp_path / "frag" / (f["fragment_id"] + ".dat")).read_bytes()
        assert f["block_root"] == block_root(block_digests(data))
    # Key order is part of the manifest bytes, hence of the model CID.
    keys = list(raw)
    at = keys.index("header_sha256")
    assert keys[at + 1 : at + 3] == ["block_size", "header_block_root"]
    entry_keys = list(raw["fragments"][0])
    assert entry_keys[entry_keys.index("sha256") + 1] == "block_root"
    m = fr.read_manifest(tmp_path / "frag")
    assert m.block_size == BLOCK_SIZE and m.header_block_root == raw["header_block_root"]
    assert [f.block_root for f in m.fragments] == [
        f["block_root"] for f in sorted(raw["fragments"], key=lambda f: f["file_offset"])
    ]


def test_fragments_larger_than_a_block_have_multi_block_roots(tmp_path: Path) -> None:
    # F32 rows of 4 KiB: a 2.34 MiB tensor cut at 2 MiB (two whole blocks, then
    # a short shard) and a 1.5 MiB tensor in one shard (a whole and a half block).
    tensors = [
        ("blk.0.ffn_up.weight", T.F32, (600, 1024)),
        ("blk.0.ffn_down.weight", T.F32, (384, 1024)),
        ("output_norm.weight", T.F32, (64,)),
    ]
    model = write_model(tmp_path / "big.gguf", tensors, vocab=False)
    result = fr.fragment_model(model, tmp_path / "frag", chunk_size=2 * BLOCK_SIZE)
    m = fr.read_manifest(tmp_path / "frag")
    sizes = {f.size for f in m.fragments}
    assert {2 * BLOCK_SIZE, BLOCK_SIZE + BLOCK_SIZE // 2} <= sizes
    for f in m.fragments:
        data = (tmp_path / "frag" / f.file_name).read_bytes()
        assert f.block_root == block_root(block_digests(data)) == _root_by_hand(data)
        if f.size > BLOCK_SIZE:
            assert len(block_digests(data)) == 32 * -(-f.size // BLOCK_SIZE)
            assert f.block_root != hashlib.sha256(hashlib.sha256(data).digest()).hexdigest()  # not one block
    # Rebuilding (a second, independent hashing of the files) agrees byte for byte.
    original = (tmp_path / "frag" / "manifest.json").read_bytes()
    assert fr.rebuild_manifest(tmp_path / "frag")[0] == result.model_cid
    assert (tmp_path / "frag" / "manifest.json").read_bytes() == original


@pytest.fixture
def raw_manifest(small_model: Path, tmp_path: Path) -> dict[str, Any]:
    fr.fragment_model(small_model, tmp_path / "frag", chunk_size=1024)
    return json.loads((tmp_path / "frag" / "manifest.json").read_bytes())


def _without_blocks(raw: dict[str, Any]) -> dict[str, Any]:
    old = copy.deepcopy(raw)
    del old["block_size"], old["header_block_root"]
    for f in old["fragments"]:
        del f["block_root"]
    return old


def test_v1_manifest_without_blocks_still_parses(raw_manifest: dict[str, Any]) -> None:
    v1 = _without_blocks(raw_manifest)
    v1["format"] = "gguf-swarm/1"
    m = fr.parse_manifest(v1)
    assert m.is_ours and m.file_sha256 == raw_manifest["file_sha256"]
    assert m.block_size is None and m.header_block_root is None
    assert all(f.block_root is None and f.sha256 for f in m.fragments)
    # Our required keys stay required in both formats.
    for fmt in ("gguf-swarm/1", "gguf-swarm/2"):
        broken = {k: v for k, v in v1.items() if k != "file_sha256"} | {"format": fmt}
        with pytest.raises(fr.ManifestError, match="file_sha256"):
            fr.parse_manifest(broken)


@pytest.mark.parametrize("bad", ["A" * 64, "a" * 63, "g" * 64, None, 123])
def test_rejects_a_bad_block_root(raw_manifest: dict[str, Any], bad: Any) -> None:
    fragment = copy.deepcopy(raw_manifest)
    fragment["fragments"][2]["block_root"] = bad
    with pytest.raises(fr.ManifestError, match="block_root"):
        fr.parse_manifest(fragment)
    header = copy.deepcopy(raw_manifest)
    header["header_block_root"] = bad
    with pytest.raises(fr.ManifestError, match="header_block_root"):
        fr.parse_manifest(header)


def test_rejects_block_roots_on_some_files_only(raw_manifest: dict[str, Any]) -> None:
    one_fragment_without = copy.deepcopy(raw_manifest)
    del one_fragment_without["fragments"][3]["block_root"]
    header_without = copy.deepcopy(raw_manifest)
    del header_without["header_block_root"]
    only_header = _without_blocks(raw_manifest) | {"block_size": BLOCK_SIZE, "header_block_root": "0" * 64}
    for raw in (one_fragment_without, header_without, only_header):
        with pytest.raises(fr.ManifestError, match="all or none"):
            fr.parse_manifest(raw)


def test_rejects_block_roots_without_block_size(raw_manifest: dict[str, Any]) -> None:
    del raw_manifest["block_size"]
    with pytest.raises(fr.ManifestError, match="no block_size"):
        fr.parse_manifest(raw_manifest)


@pytest.mark.parametrize("bad", [0, -BLOCK_SIZE, 8 * 1024, 32 << 20, 3 << 20, 1_000_000, "1048576", 1048576.0, True])
def test_rejects_a_bad_block_size(raw_manifest: dict[str, Any], bad: Any) -> None:
    raw_manifest["block_size"] = bad
    with pytest.raises(fr.ManifestError, match="block_size"):
        fr.parse_manifest(raw_manifest)


@pytest.mark.parametrize("size", [16 * 1024, BLOCK_SIZE, 16 << 20])
def test_accepts_block_sizes_within_bounds(raw_manifest: dict[str, Any], size: int) -> None:
    raw_manifest["block_size"] = size
    assert fr.parse_manifest(raw_manifest).block_size == size


def test_mixed_types_cover_the_issue_list() -> None:
    assert {T.F32, T.F16, T.Q8_0, T.Q4_0, T.Q4_K, T.Q6_K} <= {t for _, t, _ in MIXED}
    assert {1, 2, 3} <= {len(s) for _, _, s in MIXED}


DEQUANTIZED = sorted(gguf.quants._type_traits, key=lambda t: t.name)  # every type gguf-py dequantizes


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf * 0 in random blocks
@pytest.mark.parametrize("qtype", [T.F32, T.F16, *DEQUANTIZED], ids=lambda t: t.name)
def test_every_type_gguf_py_dequantizes_validates_and_loads(qtype: T, tmp_path: Path) -> None:
    """A GGUFWriter model of one tensor of `qtype` (random blocks: scales may be NaN
    or inf, which must come back the same): `load_tensor` gives what gguf-py
    dequantizes from the original file, and `validate` passes exactly when
    that is all finite."""
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows, per_row = 3, 2
    rng = np.random.default_rng(int(qtype))
    raw = rng.integers(0, 256, size=(rows, per_row * type_size), dtype=np.uint8)
    path = tmp_path / "one.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("blk.0.ffn_up.weight", raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    fr.fragment_model(path, tmp_path / "frag", chunk_size=4096)
    (t,) = gguf.GGUFReader(path).tensors
    expected = gguf.quants.dequantize(t.data, t.tensor_type)
    got = fr.load_tensor(tmp_path / "frag", t.name)
    assert got.shape == (rows, per_row * block)
    np.testing.assert_array_equal(got, expected.reshape(got.shape))
    assert fr.validate_folder(tmp_path / "frag").ok == bool(np.isfinite(expected).all())


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_written_folders_and_files_get_the_modes_the_umask_gives(small_model: Path, tmp_path: Path, mask: int) -> None:
    # A seed often runs as its own user: a folder left at mkdtemp's 0700 (or a
    # model at mkstemp's 0600) would be unreadable to it.
    old = os.umask(mask)
    try:
        fr.fragment_model(small_model, tmp_path / "frag")
        fr.assemble(tmp_path / "frag", tmp_path / "out.gguf")
    finally:
        os.umask(old)
    assert (tmp_path / "frag").stat().st_mode & 0o777 == 0o777 & ~mask
    for path in (tmp_path / "out.gguf", tmp_path / "frag" / "manifest.json", tmp_path / "frag" / "gguf_header.dat"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path
