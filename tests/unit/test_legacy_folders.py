"""Folders written by the existing tool (shared/seed/SEED_FORMAT.md): verified,
upgraded to our manifest without touching fragments, and assembled."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

import fragmenter as fr
from fragmenter.naming import tensor_role
from protocol.blocks import BLOCK_SIZE, block_digests, block_root
from tests.conftest import sha256_file

CHUNK = 1024


def build_legacy_folder(model: Path, out: Path, chunk: int = CHUNK) -> dict:
    """Cut `model` the way the existing fragmenter does: fixed-size cuts of each
    tensor, 16-hex checksums, metadata as one-element lists and byte lists."""
    data = model.read_bytes()
    header = fr.parse_header(data)
    out.mkdir()
    (out / "gguf_header.dat").write_bytes(data[: header.data_start])
    stem = model.stem
    fragments = []
    for t in header.tensors:
        start = header.data_start + t.offset
        total = -(-t.n_bytes // chunk)
        role = tensor_role(t.name)
        for i in range(total):
            piece = data[start + i * chunk : start + min((i + 1) * chunk, t.n_bytes)]
            sha16 = hashlib.sha256(piece).hexdigest()[:16]
            fid = f"{stem}_L{role.layer_index}_{role.component}_S{i}_{sha16}"
            (out / f"{fid}.dat").write_bytes(piece)
            fragments.append(
                {
                    "fragment_id": fid,
                    "model_name": stem,
                    "fragment_type": role.fragment_type,
                    "layer_index": role.layer_index,
                    "component": role.component,
                    "expert_index": None,
                    "shard_index": i,
                    "total_shards": total,
                    "shape": list(t.dims),
                    "dtype": "uint8",
                    "size_bytes": len(piece),
                    "tensor_name": t.name,
                    "tensor_type": t.ggml_type.name,
                    "checksum": sha16,
                    "is_always_active": True,
                    "data_offset": start,
                }
            )
    manifest = {
        "model_name": stem,
        "architecture": "llama",
        "chunk_size": chunk,
        "header_size": header.data_start,
        "total_fragments": len(fragments),
        "config": {
            "dim": 4096,
            "hidden_dim": 11008,
            "n_layers": 32,
            "n_heads": 32,
            "n_kv_heads": 32,
            "vocab_size": 32000,
            "norm_eps": 1e-5,
            "rope_freq_base": 10000.0,
        },
        "tensor_specifics": {},
        "fragments": fragments,
        "metadata": {"llama.block_count": [2], "general.architecture": [list(b"llama")]},
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def test_legacy_folder_verifies_with_16_hex_checksums(small_model: Path, tmp_path: Path) -> None:
    build_legacy_folder(small_model, tmp_path / "legacy")
    report = fr.verify_folder(tmp_path / "legacy")
    assert report.ok and report.checked > 10
    m = fr.read_manifest(tmp_path / "legacy")
    assert not m.is_ours and m.block_size is None and m.header_block_root is None
    assert all(f.block_root is None for f in m.fragments)


def test_legacy_folder_detects_corruption(small_model: Path, tmp_path: Path) -> None:
    manifest = build_legacy_folder(small_model, tmp_path / "legacy")
    victim = manifest["fragments"][3]["fragment_id"]
    p = tmp_path / "legacy" / f"{victim}.dat"
    p.write_bytes(bytes(len(p.read_bytes())))
    assert [fid for fid, _ in fr.verify_folder(tmp_path / "legacy").bad] == [victim]


def test_legacy_folder_assembles_with_the_padding_it_lost(small_model: Path, tmp_path: Path) -> None:
    build_legacy_folder(small_model, tmp_path / "legacy")
    result = fr.assemble(tmp_path / "legacy", tmp_path / "back.gguf")
    assert not result.checked_against_manifest
    assert sha256_file(tmp_path / "back.gguf") == sha256_file(small_model)


def test_upgrade_keeps_fragments_and_adds_our_fields(small_model: Path, tmp_path: Path) -> None:
    build_legacy_folder(small_model, tmp_path / "legacy")
    before = {p.name: p.read_bytes() for p in (tmp_path / "legacy").glob("*.dat")}
    fr.rebuild_manifest(tmp_path / "legacy")
    after = {p.name: p.read_bytes() for p in (tmp_path / "legacy").glob("*.dat")}
    assert before == after
    m = fr.read_manifest(tmp_path / "legacy")
    assert m.is_ours and m.file_sha256 == sha256_file(small_model)
    assert m.raw["config"]["dim"] == 64  # the model's own numbers, not LLaMA-7B defaults
    assert all(f.sha256 is not None for f in m.fragments)
    # ...and verified blocks: every file gets its block root.
    assert m.raw["format"] == fr.FORMAT == "gguf-swarm/2"
    assert m.block_size == BLOCK_SIZE
    assert m.header_block_root == block_root(block_digests((tmp_path / "legacy" / "gguf_header.dat").read_bytes()))
    for f in m.fragments:
        assert f.block_root == block_root(block_digests((tmp_path / "legacy" / f.file_name).read_bytes()))
    assert fr.verify_folder(tmp_path / "legacy").ok
    result = fr.assemble(tmp_path / "legacy", tmp_path / "back.gguf")
    assert result.checked_against_manifest
    assert sha256_file(tmp_path / "back.gguf") == sha256_file(small_model)
    # Tensors load from fragments cut off row boundaries, too.
    assert fr.validate_folder(tmp_path / "legacy").ok


def test_rebuild_without_any_manifest(small_model: Path, tmp_path: Path) -> None:
    build_legacy_folder(small_model, tmp_path / "legacy")
    (tmp_path / "legacy" / "manifest.json").unlink()
    fr.rebuild_manifest(tmp_path / "legacy")
    assert fr.read_manifest(tmp_path / "legacy").file_sha256 == sha256_file(small_model)


def test_rebuild_names_a_missing_shard(small_model: Path, tmp_path: Path) -> None:
    manifest = build_legacy_folder(small_model, tmp_path / "legacy")
    first = manifest["fragments"][0]
    assert first["total_shards"] > 1
    (tmp_path / "legacy" / f"{first['fragment_id']}.dat").unlink()
    with pytest.raises(fr.FragmenterError, match=first["tensor_name"]):
        fr.rebuild_manifest(tmp_path / "legacy")
