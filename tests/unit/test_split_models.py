"""Split models (llama.cpp's NAME-00001-of-0000N.gguf parts): one fragment
folder and one CID for the whole model, assembled back into the same parts or
merged into one GGUF."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

import fragmenter as fr
from fragmenter.cli import main_fragment
from fragmenter.errors import ManifestError, SplitError
from fragmenter.selection import Selection, model_layers
from fragmenter.split import SPLIT_KEYS
from tests.conftest import sha256_file
from tests.gguf_factory import MIXED, write_model

PARTS = 4  # MIXED's 10 tensors, at most 3 a part


def _split(folder: Path, tensors: Any = MIXED, **kw: Any) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    write_model(folder / "model.gguf", tensors, split_max_tensors=3, **kw)
    return sorted(folder.glob("model-*-of-*.gguf"))


@pytest.fixture
def parts(tmp_path: Path) -> list[Path]:
    paths = _split(tmp_path / "src")
    assert [p.name for p in paths] == [f"model-{i:05d}-of-{PARTS:05d}.gguf" for i in range(1, PARTS + 1)]
    return paths


def _concat_sha(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()


def test_round_trip_gives_back_every_part_byte_identical(parts: list[Path], tmp_path: Path) -> None:
    result = fr.fragment_model(parts[0], tmp_path / "frag", chunk_size=1024)
    assert result.parts == PARTS
    assert result.file_size == sum(p.stat().st_size for p in parts)
    assert result.file_sha256 == _concat_sha(parts)
    assert fr.verify_folder(tmp_path / "frag").ok
    out = fr.assemble(tmp_path / "frag", tmp_path / "out")
    assert out.checked_against_manifest and not out.merged
    assert [f.name for f in out.files] == [p.name for p in parts]
    for p in parts:
        assert sha256_file(tmp_path / "out" / p.name) == sha256_file(p)


def test_manifest_describes_the_concatenation(parts: list[Path], tmp_path: Path) -> None:
    fr.fragment_model(parts[0], tmp_path / "frag", chunk_size=1024)
    raw = json.loads((tmp_path / "frag" / "manifest.json").read_bytes())
    assert raw["file_name"] == "model.gguf" and raw["model_name"] == "model"
    assert [p["file_name"] for p in raw["parts"]] == [p.name for p in parts]
    assert [p["file_size"] for p in raw["parts"]] == [p.stat().st_size for p in parts]
    assert [p["file_sha256"] for p in raw["parts"]] == [sha256_file(p) for p in parts]
    # Part 1's header is gguf_header.dat; those of parts 2..N are kept bytes.
    assert (tmp_path / "frag" / "gguf_header.dat").read_bytes() == parts[0].read_bytes()[: raw["header_size"]]
    starts = np.cumsum([0] + [p.stat().st_size for p in parts])[:-1]
    kept = {e["file_offset"]: base64.b64decode(e["base64"]) for e in raw["extra_bytes"]}
    for start, p in zip(starts[1:], parts[1:], strict=True):
        assert p.read_bytes().startswith(kept[int(start)])
    # Every tensor of every part, each fragment inside one part.
    assert set(raw["tensor_specifics"]) == {name for name, _, _ in MIXED}
    ends = np.cumsum([p.stat().st_size for p in parts])
    for f in raw["fragments"]:
        k = int(np.searchsorted(ends, f["file_offset"], side="right"))
        assert f["file_offset"] + f["size_bytes"] <= ends[k]
    m = fr.read_manifest(tmp_path / "frag")
    assert m.parts is not None and [p.file_name for p in m.parts] == [p.name for p in parts]


def test_data_offsets_point_at_the_tensors_in_the_concatenation(parts: list[Path], tmp_path: Path) -> None:
    fr.fragment_model(parts[0], tmp_path / "frag", chunk_size=1024)
    raw = json.loads((tmp_path / "frag" / "manifest.json").read_bytes())
    whole = b"".join(p.read_bytes() for p in parts)
    for f in raw["fragments"]:
        data = (tmp_path / "frag" / (f["fragment_id"] + ".dat")).read_bytes()
        assert whole[f["file_offset"] : f["file_offset"] + f["size_bytes"]] == data
        spec = raw["tensor_specifics"][f["tensor_name"]]
        assert spec["data_offset"] == f["data_offset"] <= f["file_offset"]


def test_any_part_or_all_parts_give_the_same_cid(parts: list[Path], tmp_path: Path) -> None:
    cids = {
        fr.fragment_model(given, tmp_path / f"frag{i}", chunk_size=1024).model_cid
        for i, given in enumerate([parts[0], parts[2], parts[-1], list(reversed(parts))])
    }
    assert len(cids) == 1
    # Deterministic: the same parts elsewhere, fragmented again.
    other = tmp_path / "elsewhere"
    shutil.copytree(parts[0].parent, other)
    assert fr.fragment_model(other / parts[0].name, tmp_path / "again", chunk_size=1024).model_cid in cids


def test_merge_writes_one_gguf_equal_to_an_unsplit_write(parts: list[Path], tmp_path: Path) -> None:
    fr.fragment_model(parts[0], tmp_path / "frag", chunk_size=1024)
    result = fr.assemble(tmp_path / "frag", tmp_path / "merged.gguf", merge=True)
    assert result.merged and result.output == (tmp_path / "merged.gguf").resolve()
    merged = gguf.GGUFReader(tmp_path / "merged.gguf")
    assert not any(key in merged.fields for key in SPLIT_KEYS)
    originals = {t.name: t for p in parts for t in gguf.GGUFReader(p).tensors}
    assert [t.name for t in merged.tensors] == [name for name, _, _ in MIXED]
    for t in merged.tensors:
        o = originals[t.name]
        assert t.tensor_type == o.tensor_type and list(t.shape) == list(o.shape)
        assert np.array_equal(np.asarray(t.data), np.asarray(o.data))
    # gguf-py writing the same model unsplit gives exactly these bytes.
    (tmp_path / "whole").mkdir()
    write_model(tmp_path / "whole" / "model.gguf", MIXED)
    assert sha256_file(tmp_path / "merged.gguf") == sha256_file(tmp_path / "whole" / "model.gguf")


def test_metadata_only_first_part(tmp_path: Path) -> None:
    """small_first_shard: part 1 holds the metadata and no tensor."""
    paths = _split(tmp_path / "src", small_first_shard=True)
    assert not gguf.GGUFReader(paths[0]).tensors
    fr.fragment_model(paths[0], tmp_path / "frag", chunk_size=1024)
    fr.assemble(tmp_path / "frag", tmp_path / "out")
    for p in paths:
        assert sha256_file(tmp_path / "out" / p.name) == sha256_file(p)
    fr.assemble(tmp_path / "frag", tmp_path / "merged.gguf", merge=True)
    assert [t.name for t in gguf.GGUFReader(tmp_path / "merged.gguf").tensors] == [name for name, _, _ in MIXED]


def test_validate_and_load_tensor_read_every_part(parts: list[Path], tmp_path: Path) -> None:
    fr.fragment_model(parts[0], tmp_path / "frag", chunk_size=1024)
    report = fr.validate_folder(tmp_path / "frag")
    assert report.ok and report.tensors == len(MIXED)
    last = gguf.GGUFReader(parts[-1]).tensors[-1]  # output.weight, Q8_0, in the last part
    expected = gguf.quants.dequantize(np.asarray(last.data), last.tensor_type)
    assert np.array_equal(fr.load_tensor(tmp_path / "frag", last.name), expected)


def test_manifest_rebuild_of_a_split_folder_is_unchanged(parts: list[Path], tmp_path: Path) -> None:
    result = fr.fragment_model(parts[0], tmp_path / "frag", chunk_size=1024)
    before = (tmp_path / "frag" / "manifest.json").read_bytes()
    cid, n = fr.rebuild_manifest(tmp_path / "frag")
    assert (cid, n) == (result.model_cid, result.fragments)
    assert (tmp_path / "frag" / "manifest.json").read_bytes() == before


def test_partial_selection_spans_parts(parts: list[Path], tmp_path: Path) -> None:
    fr.fragment_model(parts[0], tmp_path / "frag", chunk_size=1024)
    manifest = fr.read_manifest(tmp_path / "frag")
    assert model_layers(manifest) == [0, 1]
    chosen = Selection(layers=frozenset({1}), with_output=True).fragments(manifest)
    names = {manifest.fragments[i].tensor_name for i in chosen}
    assert names == {
        "blk.1.ffn_down.weight",  # part 2
        "blk.1.attn_k.weight",  # part 3
        "blk.1.ffn_gate_exps.weight",
        "output_norm.weight",
        "output.weight",  # part 4
    }


def test_a_missing_part_is_named(parts: list[Path], tmp_path: Path) -> None:
    parts[2].unlink()
    with pytest.raises(SplitError, match=r"^model-00003-of-00004\.gguf is missing"):
        fr.fragment_model(parts[0], tmp_path / "frag")
    assert not (tmp_path / "frag").exists()


def test_parts_of_different_models_are_refused(parts: list[Path], tmp_path: Path) -> None:
    # A 2-part model's part 2 renamed into the 4-part set: split.count differs.
    two = tmp_path / "two"
    two.mkdir()
    write_model(two / "model.gguf", MIXED[:4], split_max_tensors=2, seed=1)
    shutil.copy(two / "model-00002-of-00002.gguf", parts[1])
    with pytest.raises(SplitError, match=r"parts of different models \(split\.count 4 and 2\)"):
        fr.fragment_model(parts[0], tmp_path / "frag")


def test_a_part_from_another_split_of_the_same_count_is_refused(parts: list[Path], tmp_path: Path) -> None:
    """Same count and tensor total, other tensors: part 3 of the model written in reverse order."""
    other = _split(tmp_path / "other", tensors=MIXED[::-1])
    shutil.copy(other[2], parts[2])
    with pytest.raises(SplitError, match="different models"):
        fr.fragment_model(parts[0], tmp_path / "frag")


def test_an_unsplit_file_among_parts_is_refused(parts: list[Path], tmp_path: Path) -> None:
    plain = write_model(tmp_path / "plain.gguf", MIXED[:2])
    with pytest.raises(SplitError, match=r"^plain\.gguf is not part of a split model \(no split\.count\), but"):
        fr.fragment_model([parts[0], plain, *parts[2:]], tmp_path / "frag")


def test_a_lone_part_without_its_name_is_refused(parts: list[Path], tmp_path: Path) -> None:
    renamed = parts[1].rename(tmp_path / "renamed.gguf")
    with pytest.raises(SplitError, match=r"^renamed\.gguf is part 2 of a 4-part split model"):
        fr.fragment_model(renamed, tmp_path / "frag")


def test_cli_errors_are_one_line(parts: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parts[3].unlink()
    assert main_fragment([str(parts[0]), "-o", str(tmp_path / "frag")]) == 1
    err = capsys.readouterr().err
    assert err == "error: model-00004-of-00004.gguf is missing" + err.split("missing", 1)[1]
    assert err.count("\n") == 1


def test_cli_fragments_and_assembles_a_split_model(
    parts: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from node.cli import main

    assert main_fragment([str(parts[1]), "-o", str(tmp_path / "frag"), "--json"]) == 0
    assert main(["assemble", str(tmp_path / "frag"), "-o", str(tmp_path / "out"), "--json"]) == 0
    assert main(["assemble", str(tmp_path / "frag"), "-o", str(tmp_path / "m.gguf"), "--merge", "--json"]) == 0
    assert main(["validate", str(tmp_path / "frag"), "--json"]) == 0
    assert main(["verify", str(tmp_path / "frag"), "--json"]) == 0
    assert main(["manifest", str(tmp_path / "frag"), "--json"]) == 0
    for p in parts:
        assert sha256_file(tmp_path / "out" / p.name) == sha256_file(p)
    capsys.readouterr()
    assert main(["tokenizer", str(parts[1]), str(tmp_path / "tok")]) == 1
    assert "its metadata is in model-00001-of-00004.gguf" in capsys.readouterr().err


def test_single_file_manifest_has_no_parts(small_model: Path, tmp_path: Path) -> None:
    fr.fragment_model(small_model, tmp_path / "frag")
    raw = json.loads((tmp_path / "frag" / "manifest.json").read_bytes())
    assert "parts" not in raw and fr.read_manifest(tmp_path / "frag").parts is None
    # --merge on a one-file model is the plain assembly.
    fr.assemble(tmp_path / "frag", tmp_path / "back.gguf", merge=True)
    assert sha256_file(tmp_path / "back.gguf") == sha256_file(small_model)


# ---- the manifest gate on `parts` ----------------------------------------------------


@pytest.fixture
def split_manifest(parts: list[Path], tmp_path: Path) -> dict[str, Any]:
    fr.fragment_model(parts[0], tmp_path / "frag", chunk_size=1024)
    return json.loads((tmp_path / "frag" / "manifest.json").read_bytes())


def _set(path: str, value: Any) -> Any:
    def change(m: dict[str, Any]) -> None:
        *keys, last = path.split(".")
        target: Any = m
        for k in keys:
            target = target[int(k)] if isinstance(target, list) else target[k]
        if isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value

    return change


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        (_set("parts.1.file_name", "../evil.gguf"), "not a safe file name"),
        (_set("parts.1.file_name", ".hidden"), "not a safe file name"),
        (_set("parts.1.file_name", "x" * 300), "bad part file_name"),
        (_set("parts.1.file_name", "\udc80.gguf"), "malformed parts"),
        (_set("parts.1.file_name", "a\nb.gguf"), "not a safe file name"),
        (_set("parts.1.file_name", "model-00001-of-00004.gguf"), "appears twice"),
        (_set("parts.1.file_size", 1), "add up to"),
        (_set("parts.1.file_size", 0), "0 bytes"),
        (_set("parts.1.file_sha256", "00"), "part file_sha256"),
        (_set("parts", []), "list of 2 to"),
        (_set("parts", "model.gguf"), "list of 2 to"),
        (lambda m: m["parts"].pop(), "add up to"),
        (lambda m: m["parts"].append(dict(m["parts"][0])), "appears twice"),
    ],
)
def test_bad_parts_are_refused(split_manifest: dict[str, Any], change: Any, complaint: str) -> None:
    m = copy.deepcopy(split_manifest)
    change(m)
    with pytest.raises(ManifestError, match=complaint):
        fr.parse_manifest(m)


def test_a_fragment_straddling_two_parts_is_refused(split_manifest: dict[str, Any]) -> None:
    m = copy.deepcopy(split_manifest)
    # Move the boundary between parts 1 and 2 into the first fragment of part 1.
    first = min(m["fragments"], key=lambda f: f["file_offset"])
    shift = m["parts"][0]["file_size"] - (first["file_offset"] + 1)
    m["parts"][0]["file_size"] -= shift
    m["parts"][1]["file_size"] += shift
    with pytest.raises(ManifestError, match="straddles parts 1 and 2"):
        fr.parse_manifest(m)


def test_a_folder_whose_part_header_is_gone_is_refused(parts: list[Path], tmp_path: Path) -> None:
    fr.fragment_model(parts[0], tmp_path / "frag", chunk_size=1024)
    path = tmp_path / "frag" / "manifest.json"
    m = json.loads(path.read_bytes())
    m["extra_bytes"] = [e for e in m["extra_bytes"] if e["file_offset"] != m["parts"][0]["file_size"]]
    path.write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="no header kept for part model-00002-of-00004.gguf"):
        fr.open_folder(tmp_path / "frag")


def test_several_unsplit_files_are_refused(small_model: Path, tmp_path: Path) -> None:
    other = write_model(tmp_path / "other.gguf", MIXED[:2])
    with pytest.raises(SplitError, match="none is part of a split model"):
        fr.fragment_model([small_model, other], tmp_path / "frag")
