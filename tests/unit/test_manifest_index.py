"""The index of parsed manifests: a restart reads it instead of parsing every
manifest again, but only for the exact manifest bytes it was made from."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as T

import fragmenter as fr
from fragmenter.errors import ManifestError
from fragmenter.manifest import Manifest
from node import manifest_index
from node.store import Store
from tests.gguf_factory import write_model


def fragmented(tmp_path: Path, split: bool = False) -> Path:
    tensors = [(f"blk.{i}.ffn_up.weight", T.F32, (64, 1024)) for i in range(5)]
    model = write_model(tmp_path / "m.gguf", tensors, vocab=False, **({"split_max_tensors": 2} if split else {}))
    parts = sorted(tmp_path.glob("m*.gguf"))
    data = tmp_path / "data"
    fr.fragment_model(parts[0] if split else model, data / "m", chunk_size=32 * 1024)
    return data


def same(a: Manifest, b: Manifest) -> bool:
    fields = ("model_name", "header_size", "file_size", "file_sha256", "alignment", "extra_bytes", "block_size")
    return (
        a.fragments == b.fragments
        and a.raw == b.raw
        and a.parts == b.parts
        and a.header_block_root == b.header_block_root
        and all(getattr(a, f) == getattr(b, f) for f in fields)
    )


def no_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> None:
        raise AssertionError("parsed the manifest again")

    monkeypatch.setattr(manifest_index, "parse_manifest_bytes", refuse)


@pytest.mark.parametrize("split", [False, True])
def test_a_restart_reads_the_index_and_gets_the_same_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, split: bool
) -> None:
    data = fragmented(tmp_path, split)
    first = Store(data)
    first.scan()
    ((cid, parsed),) = first.models.items()
    assert (split and parsed.manifest.parts is not None) or (not split and parsed.manifest.parts is None)
    no_parsing(monkeypatch)
    again = Store(data)
    again.scan()
    indexed = again.models[cid]
    assert same(indexed.manifest, parsed.manifest) and indexed.have == parsed.have and indexed.complete
    assert indexed.digests == parsed.digests


def test_an_edited_manifest_is_parsed_again(tmp_path: Path) -> None:
    data = fragmented(tmp_path)
    Store(data).scan()
    manifest = data / "m" / "manifest.json"
    manifest.write_bytes(manifest.read_bytes().replace(b'"format"', b' "format"', 1))  # same JSON, another CID
    calls = []
    real = manifest_index.parse_manifest_bytes

    def counting(*args: object) -> Manifest:
        calls.append(1)
        return real(*args)  # type: ignore[arg-type]

    manifest_index.parse_manifest_bytes = counting  # type: ignore[assignment]
    try:
        store = Store(data)
        store.scan()
    finally:
        manifest_index.parse_manifest_bytes = real
    assert calls == [1] and len(store.models) == 1


@pytest.mark.parametrize("damage", [b"", b"not an npz", None])
def test_a_damaged_index_is_ignored_and_rebuilt(tmp_path: Path, damage: bytes | None) -> None:
    data = fragmented(tmp_path)
    reference = Store(data)
    reference.scan()
    (index,) = (data / ".gguf-swarm" / "index").iterdir()
    if damage is None:
        index.write_bytes(index.read_bytes()[: index.stat().st_size // 2])  # torn
    else:
        index.write_bytes(damage)
    store = Store(data)
    store.scan()
    ((cid, model),) = store.models.items()
    assert same(model.manifest, reference.models[cid].manifest)
    assert index.stat().st_size > 1000  # rebuilt


def test_a_large_manifest_is_parsed_by_a_child_process_to_the_same_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = fragmented(tmp_path, split=True)
    reference = Store(data)
    reference.scan()
    (index,) = (data / ".gguf-swarm" / "index").iterdir()
    index.unlink()
    monkeypatch.setattr(manifest_index, "CHILD_PARSE_FROM", 0)  # every manifest counts as large
    no_parsing(monkeypatch)  # in this process: the child process parses
    store = Store(data)
    store.scan()
    ((cid, model),) = store.models.items()
    assert same(model.manifest, reference.models[cid].manifest) and model.complete
    assert index.is_file()


def test_the_child_refuses_a_bad_manifest_in_the_same_words(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = fragmented(tmp_path)
    manifest = data / "m" / "manifest.json"
    manifest.write_bytes(manifest.read_bytes().replace(b'"size_bytes": 32768', b'"size_bytes": -5', 1))
    cid = manifest_index.cid_of_file(manifest.open("rb"))
    errors = []
    for threshold in (1 << 40, 0):  # in this process, then in a child
        monkeypatch.setattr(manifest_index, "CHILD_PARSE_FROM", threshold)
        with manifest.open("rb") as f, pytest.raises(ManifestError) as caught:
            manifest_index.parse(f, cid, tmp_path / f"index-{threshold}.npz", str(manifest))
        errors.append(str(caught.value))
    assert errors[0] == errors[1] and "size_bytes is not a whole number" in errors[0]
    assert not list(tmp_path.glob("index-*.npz"))  # nothing indexed for a refused manifest


def test_when_no_child_can_run_the_manifest_is_parsed_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = fragmented(tmp_path)
    monkeypatch.setattr(manifest_index, "CHILD_PARSE_FROM", 0)
    monkeypatch.setattr(manifest_index.sys, "executable", str(tmp_path / "no-such-python"))
    store = Store(data)
    store.scan()
    ((_, model),) = store.models.items()
    assert model.complete and len(list((data / ".gguf-swarm" / "index").iterdir())) == 1


def test_a_pool_of_parser_processes_parses_many_manifests_and_refuses_a_bad_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = fragmented(tmp_path)
    reference = Store(data)
    reference.scan()
    ((cid, model),) = reference.models.items()
    manifest = data / "m" / "manifest.json"
    bad = data / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_bytes(manifest.read_bytes().replace(b'"size_bytes": 32768', b'"size_bytes": -5', 1))
    for index in (data / ".gguf-swarm" / "index").iterdir():
        index.unlink()
    monkeypatch.setattr(manifest_index, "CHILD_PARSE_FROM", 0)
    no_parsing(monkeypatch)  # in this process: the pool's processes parse
    store = Store(data)
    with manifest_index.ParserPool(2) as pool:
        for _ in range(2):  # the same processes, job after job
            got = store.read_folder(data / "m", {}, pool)
            assert got is not None and same(got.manifest, model.manifest)
        with bad.joinpath("manifest.json").open("rb") as f, pytest.raises(ManifestError, match="size_bytes"):
            manifest_index.parse(f, manifest_index.cid_of_file(f), tmp_path / "x.npz", str(bad / "manifest.json"), pool)
        assert len(pool._started) == 1  # one at a time: one process served them all


def test_a_parser_process_that_stops_answering_is_killed_and_the_job_left_to_the_caller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = fragmented(tmp_path)
    manifest = data / "m" / "manifest.json"
    with manifest.open("rb") as f:
        cid = manifest_index.cid_of_file(f)
    with manifest_index.ParserPool(1) as pool:
        assert pool.parse(str(manifest), cid, tmp_path / "a.npz") == (0, "")
        (child,) = pool._started
        os.kill(child.pid, signal.SIGSTOP)  # alive, never answering
        monkeypatch.setattr(manifest_index, "_CHILD_SECONDS", 1.0)
        started = time.monotonic()
        assert pool.parse(str(manifest), cid, tmp_path / "b.npz") is None  # no verdict: the caller parses
        assert time.monotonic() - started < 10
        assert child.poll() is not None  # killed, not left stopped
