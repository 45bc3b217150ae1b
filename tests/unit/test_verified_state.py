"""The saved record of verified files: a restart trusts unchanged files without
hashing them, re-hashes changed ones, and ignores a bad record file."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as T

import fragmenter as fr
from node import verified_state
from node.blockstore import ModelBlocks
from node.store import LocalModel, Store
from node.verified_state import BadState, FileRecord
from tests.gguf_factory import write_model

CID = "bafkreitest"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    tensors = [(f"blk.{i}.ffn_up.weight", T.F32, (64, 1024)) for i in range(5)]
    model = write_model(tmp_path / "m.gguf", tensors, vocab=False)
    data = tmp_path / "data"
    fr.fragment_model(model, data / "m", chunk_size=32 * 1024)
    return data


def start(data_dir: Path) -> tuple[Store, LocalModel, ModelBlocks]:
    """What a node does at start and first serve: scan, then the digests of every file."""
    store = Store(data_dir)
    store.scan()
    model = next(iter(store.models.values()))
    blocks = ModelBlocks(store, model)
    for k in range(len(blocks.specs)):
        assert blocks.file_digests(k) is not None
    return store, model, blocks


def folder_bytes(model: LocalModel) -> int:
    return model.manifest.total_bytes + model.manifest.header_size


def test_restart_trusts_unchanged_files_and_rehashes_changed_ones(data_dir: Path) -> None:
    store, model, _ = start(data_dir)
    assert store.hashed_bytes == folder_bytes(model)  # first start: every file hashed whole
    store.flush_verified()

    fresh = Store(data_dir)
    fresh.scan()  # what `gguf-swarm models` does: no hashing, and it can tell what is verified
    assert fresh.verified_files(next(iter(fresh.models.values()))) == len(model.manifest.fragments) + 1
    assert fresh.hashed_bytes == 0

    store, model, blocks = start(data_dir)
    assert store.hashed_bytes == 0  # restart: nothing hashed whole
    assert all(blocks.read_block(b) is not None for b in range(blocks.layout.total_blocks))  # blocks still checked

    touched = data_dir / "m" / model.manifest.fragments[2].file_name
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
    store, model, _ = start(data_dir)
    assert store.hashed_bytes == model.manifest.fragments[2].size  # only the touched file


def test_rewritten_file_is_rehashed_and_dropped_when_bad(data_dir: Path) -> None:
    store, model, _ = start(data_dir)
    store.flush_verified()
    entry = model.manifest.fragments[1]
    path = data_dir / "m" / entry.file_name
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[10] ^= 1
    tmp = path.with_name("x")
    tmp.write_bytes(bytes(data))
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime, another inode
    os.replace(tmp, path)

    store = Store(data_dir)
    store.scan()
    model = next(iter(store.models.values()))
    blocks = ModelBlocks(store, model)
    assert blocks.file_digests(1) is None  # hashed whole again, and found bad
    assert store.hashed_bytes == entry.size and not model.have[1]


def test_record_of_a_dropped_file_is_removed(data_dir: Path) -> None:
    store, model, blocks = start(data_dir)
    blocks._drop_file(0)
    store.flush_verified()
    store, model, _ = start(data_dir)
    assert store.hashed_bytes == model.manifest.fragments[0].size


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "huge", "other_model", "fifo"])
def test_bad_state_file_is_ignored_with_a_log_line(
    data_dir: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    store, model, _ = start(data_dir)
    store.flush_verified()
    path = store.state_dir / "verified" / "m"
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip":
        path.write_bytes(raw[:100] + bytes([raw[100] ^ 1]) + raw[101:])
    elif damage == "garbage":
        path.write_bytes(os.urandom(5000))
    elif damage == "huge":
        path.write_bytes(raw + b"\0" * (64 << 20))
    elif damage == "fifo":  # reading it would block the node's start
        path.unlink()
        os.mkfifo(path)
    else:
        records = verified_state.decode(raw, model.cid)
        path.write_bytes(verified_state.encode("bafkreiother", records))
    with caplog.at_level(logging.WARNING):
        store, model, blocks = start(data_dir)
    assert store.hashed_bytes == folder_bytes(model)  # every file hashed again, nothing crashed
    assert "ignoring verified-state file" in caplog.text


def test_record_whose_digests_miss_the_block_root_is_not_trusted(data_dir: Path) -> None:
    """A well-formed record (checksum fixed up) claiming other digests: re-hashed, not believed."""
    store, model, _ = start(data_dir)
    store.flush_verified()
    path = store.state_dir / "verified" / "m"
    records = verified_state.decode(path.read_bytes(), model.cid)
    forged = [
        FileRecord(r.name, r.size, r.mtime_ns, r.ino, r.block_size, bytes(len(r.digests))) if i == 0 else r
        for i, r in enumerate(records)
    ]
    path.write_bytes(verified_state.encode(model.cid, forged))
    store, model, _ = start(data_dir)
    assert store.hashed_bytes == (data_dir / "m" / records[0].name).stat().st_size


def test_format_round_trip_and_checks() -> None:
    records = [FileRecord("a.dat", 3 << 20, 123, 456, 1 << 20, bytes(range(32)) * 3)]
    raw = verified_state.encode(CID, records)
    assert verified_state.decode(raw, CID) == records
    assert len(raw) <= verified_state.max_bytes(CID, {"a.dat": 3 << 20}, 1 << 20)
    bad_count = [FileRecord("a.dat", 3 << 20, 123, 456, 1 << 20, bytes(32) * 2)]  # 2 digests for 3 blocks
    with pytest.raises(BadState):
        verified_state.decode(verified_state.encode(CID, bad_count), CID)
    with pytest.raises(BadState):
        verified_state.decode(raw + b"x", CID)
