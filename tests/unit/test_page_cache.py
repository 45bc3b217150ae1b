"""Pulled files leave the page cache once durable (node/store.py): a pull of
hundreds of GB does not push the machine's working set out, and on a VM that
hands free memory back to its host the freed pages take the next blocks warm."""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as T

import fragmenter as fr
import node.store
from fragmenter.fsio import WRITEBACK_FROM, drop_cached
from fragmenter.manifest import MANIFEST_NAME
from node.blockstore import ModelBlocks
from node.store import Store
from tests.gguf_factory import write_model

LIBC = ctypes.CDLL(None, use_errno=True)


def resident_pages(path: Path) -> int:
    """Pages of `path` in the page cache (mincore(2) of a mapping that touches none)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
        try:
            pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vec = (ctypes.c_ubyte * pages)()
            anchor = ctypes.c_char.from_buffer(m)
            try:
                if LIBC.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size), vec) != 0:
                    pytest.skip(f"mincore: errno {ctypes.get_errno()}")
            finally:
                del anchor
            return sum(v & 1 for v in vec)
        finally:
            m.close()


@pytest.fixture
def seed(tmp_path: Path) -> tuple[Store, ModelBlocks]:
    """A model of 3 fragments of 3 MiB (several 1 MiB blocks each: written block by
    block), one of 512 KiB (one block: written whole) and a small header, served."""
    tensors = [(f"blk.{i}.ffn_up.weight", T.F32, (768, 1024)) for i in range(3)]
    tensors.append(("blk.3.ffn_up.weight", T.F32, (128, 1024)))
    gguf = write_model(tmp_path / "m.gguf", tensors, vocab=False)
    fr.fragment_model(gguf, tmp_path / "seed" / "m")
    store = Store(tmp_path / "seed")
    store.scan()
    return store, ModelBlocks(store, next(iter(store.models.values())))


def pull_all(seed: tuple[Store, ModelBlocks], data_dir: Path) -> tuple[Store, list[Path]]:
    """What a puller does with every block it is sent: check it and write it."""
    seed_store, seed_blocks = seed
    model = next(iter(seed_store.models.values()))
    store = Store(data_dir)
    pulled = store.begin_model(model.cid, (model.folder / MANIFEST_NAME).read_bytes())
    blocks = ModelBlocks(store, pulled)
    for k in range(len(blocks.specs)):
        if blocks.needs_digests(k):
            assert blocks.accept_digests(k, seed_blocks.file_digests(k))  # type: ignore[arg-type]
    for b in range(blocks.layout.total_blocks):
        assert blocks.check_and_write(b, seed_blocks.read_block(b)) is not None  # type: ignore[arg-type]
    assert blocks.complete
    files = sorted(p for p in pulled.folder.iterdir() if p.suffix == ".dat" and p.stat().st_size >= WRITEBACK_FROM)
    assert sorted(p.stat().st_size >> 19 for p in files) == [1, 6, 6, 6]  # the header is small: kept (store.py)
    return store, files


def test_drop_cached_empties_the_cache_of_a_durable_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"\x5a" * (4 << 20))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    assert resident_pages(path) > 0
    drop_cached(path)
    assert resident_pages(path) == 0
    drop_cached(tmp_path / "gone")  # a file removed meanwhile: nothing to do, no error


def test_pulled_files_leave_the_cache_once_a_batch_made_them_durable(
    seed: tuple[Store, ModelBlocks], tmp_path: Path
) -> None:
    store, files = pull_all(seed, tmp_path / "pulled")
    assert all(resident_pages(p) > 0 for p in files)  # just written
    store.flush_verified()
    assert [resident_pages(p) for p in files] == [0] * len(files)
    # Still held and served, from disk now.
    restarted = Store(tmp_path / "pulled")
    restarted.scan()
    assert next(iter(restarted.models.values())).complete


def test_files_are_not_dropped_before_they_are_durable(
    seed: tuple[Store, ModelBlocks], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, files = pull_all(seed, tmp_path / "pulled")

    def cannot_sync(path: Path) -> None:
        raise OSError(5, "Input/output error")

    with monkeypatch.context() as m:
        m.setattr(node.store, "sync_filesystem", cannot_sync)
        store.flush_verified()  # not durable: dirty pages are kept, and so are the clean ones
    assert all(resident_pages(p) > 0 for p in files)
    store.flush_verified()  # the next batch syncs, then drops them
    assert [resident_pages(p) for p in files] == [0] * len(files)


def test_files_a_seed_only_read_stay_cached(seed: tuple[Store, ModelBlocks]) -> None:
    store, blocks = seed
    model = next(iter(store.models.values()))
    for b in range(blocks.layout.total_blocks):
        blocks.read_block(b)  # read (and hashed whole) to serve: in the cache
    store.flush_verified()
    assert all(resident_pages(model.folder / s.name) > 0 for s in blocks.specs)
