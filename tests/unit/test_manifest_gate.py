"""The manifest gate: whatever a manifest holds (it may hash to the very CID
the user asked for: a CID proves who wrote it, not that it is sane), parsing
it either succeeds with a sane layout or fails with one ManifestError."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from gguf import GGMLQuantizationType as T
from hypothesis import given, settings
from hypothesis import strategies as st

import fragmenter as fr
from fragmenter.errors import ManifestError
from fragmenter.manifest import MAX_MANIFEST_BYTES, load_manifest_json, parse_manifest, parse_manifest_bytes, serialize
from node.store import Store
from tests.gguf_factory import write_model


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("gate")
    model = write_model(base / "m.gguf", [(f"blk.{i}.ffn_up.weight", T.F32, (16, 64)) for i in range(3)], vocab=False)
    fr.fragment_model(model, base / "m", chunk_size=1024)
    return json.loads((base / "m" / "manifest.json").read_bytes())


def gate(raw: Any) -> fr.Manifest:
    """The gate, both ways: the JSON whole then parsed, and entry by entry as it is
    decoded (parse_manifest_bytes, what pulls and the store use): the same
    manifest, or the same one error."""
    data = raw if isinstance(raw, bytes) else json.dumps(raw).encode()
    try:
        whole = parse_manifest(load_manifest_json(data), "manifest")
    except ManifestError as e:
        with pytest.raises(ManifestError) as early:
            parse_manifest_bytes(data, "manifest")
        assert str(early.value) == str(e)
        raise
    early_parsed = parse_manifest_bytes(data, "manifest")
    assert list(early_parsed.fragments) == list(whole.fragments) and early_parsed.raw == whole.raw
    return whole


def test_our_own_manifest_passes(manifest: dict[str, Any]) -> None:
    assert gate(manifest).fragments


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        (lambda m: m["fragments"][0].__setitem__("fragment_id", "a\x00b"), "safe file name"),
        (lambda m: m["fragments"][0].__setitem__("fragment_id", "../../etc/passwd"), "safe file name"),
        (lambda m: m["fragments"][0].__setitem__("fragment_id", "gguf_header"), "reserves"),
        (lambda m: m["fragments"][0].__setitem__("fragment_id", "GGUF_Header"), "reserves"),
        (lambda m: m["fragments"][0].__setitem__("size_bytes", "12"), "whole number"),
        (lambda m: m["fragments"][0].__setitem__("size_bytes", 1.5), "whole number"),
        (lambda m: m["fragments"][0].__setitem__("size_bytes", True), "whole number"),
        (lambda m: m["fragments"][0].__setitem__("size_bytes", 1 << 60), "whole number"),
        (lambda m: m.__setitem__("file_size", "x"), "whole number"),
        (lambda m: m.__setitem__("file_size", m["file_size"] + 200_000_000), "zeros"),
        (lambda m: m.__setitem__("file_size", m["file_size"] - 100), "past file_size"),
        (lambda m: m["fragments"][1].__setitem__("file_offset", m["fragments"][0]["file_offset"]), "overlaps"),
        (lambda m: m.__setitem__("header_size", m["fragments"][0]["file_offset"] + 1), "overlaps"),
        (lambda m: m.__setitem__("alignment", 0), "alignment"),
        (lambda m: m.__setitem__("file_sha256", "zz"), "file_sha256"),
    ],
)
def test_hostile_manifests_are_refused_with_one_error(manifest: dict[str, Any], change: Any, complaint: str) -> None:
    bad = copy.deepcopy(manifest)
    change(bad)
    with pytest.raises(ManifestError, match=complaint):
        gate(bad)


@pytest.mark.parametrize(
    "data",
    [
        b'{"fragments": [], "model_name": "m", "header_size": 1e400}',  # json gives inf
        b'{"fragments": [], "model_name": "m", "header_size": Infinity}',
        b'{"fragments": [], "model_name": "m", "header_size": NaN}',
        b"[" * 100_000 + b"]" * 100_000,
        b"\xff\xfe not json",
        b"",
    ],
)
def test_hostile_json_is_refused_with_one_error(data: bytes) -> None:
    with pytest.raises(ManifestError):
        gate(data)


def test_a_manifest_over_the_size_cap_is_refused_before_parsing() -> None:
    with pytest.raises(ManifestError, match="cap"):
        load_manifest_json(b" " * (MAX_MANIFEST_BYTES + 1))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_mutation_of_a_manifest_passes_or_fails_with_one_error(
    manifest: dict[str, Any], data: st.DataObject
) -> None:
    text = serialize(manifest)
    cut = data.draw(st.integers(0, len(text) - 1))
    junk = data.draw(st.binary(max_size=8))
    for mutated in (text[:cut] + junk + text[cut + len(junk) :], text[:cut]):
        try:
            gate(mutated)
        except ManifestError:
            pass


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(["size_bytes", "file_offset", "data_offset", "shard_index", "fragment_id", "sha256"]),
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5), st.lists(st.integers())),
)
def test_any_field_value_passes_or_fails_with_one_error(manifest: dict[str, Any], field: str, value: Any) -> None:
    bad = copy.deepcopy(manifest)
    bad["fragments"][-1][field] = value
    try:
        gate(bad)
    except ManifestError:
        pass


def test_a_hostile_manifest_in_the_data_dir_is_skipped_and_the_rest_served(tmp_path: Path) -> None:
    model = write_model(tmp_path / "m.gguf", [("blk.0.ffn_up.weight", T.F32, (16, 64))], vocab=False)
    good = fr.fragment_model(model, tmp_path / "data" / "good", chunk_size=1024)
    bad = tmp_path / "data" / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_bytes(b"[" * 100_000 + b"]" * 100_000)
    store = Store(tmp_path / "data")
    store.scan()
    assert list(store.models) == [good.model_cid]
