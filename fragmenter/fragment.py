"""GGUF file -> fragment folder, in one sequential read with bounded memory.

Every byte is read once into a reused buffer; the whole-file SHA-256, each
fragment's SHA-256 and each fragment's block digests (`protocol/blocks.py`)
are updated from that buffer. hashlib releases the GIL, so the whole-file hash
and the block digests each run on a worker thread while the main thread hashes
and writes the fragment. Fragments are written under a temporary name, named by
their hash when complete, and the folder is renamed into place only when
everything, manifest included, is written.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from protocol.blocks import BlockHasher
from protocol.cid import cid_of

from .errors import FragmenterError, GGUFFormatError
from .fsio import open_staging_folder
from .gguf_header import GGUFHeader, parse_header
from .manifest import HEADER_NAME, MANIFEST_NAME, MAX_ALIGNMENT, build_manifest, fragment_entry, serialize
from .plan import plan_file
from .tokenizer import UnsupportedVocabulary, write_tokenizer_files

DEFAULT_CHUNK_SIZE = 10 * 1024 * 1024
_READ_SIZE = 4 * 1024 * 1024

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


@dataclass(frozen=True)
class FragmentResult:
    model_cid: str
    folder: Path
    fragments: int
    file_size: int
    file_sha256: str
    seconds: float
    tokenizer_files: list[str]
    warnings: list[str] = field(default_factory=list)


class _Reader:
    """Sequential reads into two reused buffers. Two single-thread workers hash
    each view as it is read: one the whole file, one the blocks of the current
    file (when asked). A worker per hash keeps each hash's updates in file
    order while the two run in parallel with the main thread."""

    def __init__(self, f: BinaryIO, progress: Progress | None, total: int) -> None:
        self.f = f
        self.file_worker = ThreadPoolExecutor(1)
        self.block_worker = ThreadPoolExecutor(1)
        self.file_hash = hashlib.sha256()
        self.pos = 0
        self.total = total
        self.progress = progress
        # Two buffers: the workers hash one while the next is read into the other.
        self.buffers = [bytearray(_READ_SIZE), bytearray(_READ_SIZE)]
        self.busy: list[list[Future[None]]] = [[], []]  # tasks still reading each buffer
        self.turn = 0

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file_worker.shutdown()
        self.block_worker.shutdown()

    def chunks(self, size: int, blocks: BlockHasher | None = None) -> Iterator[memoryview]:
        """Yield memoryviews covering the next `size` bytes of the file; the
        block worker feeds them to `blocks` (read it through `block_root`)."""
        while size > 0:
            turn, self.turn = self.turn, self.turn ^ 1
            for task in self.busy[turn]:
                task.result()  # this buffer is free again
            n = min(size, _READ_SIZE)
            view = memoryview(self.buffers[turn])[:n]
            try:
                got = self.f.readinto(view)
            except OSError as e:  # told apart from the writes' errors (a full disk), which name the output
                raise FragmenterError(f"cannot read the model at byte {self.pos}: {e.strerror or e}") from None
            if got != n:
                raise GGUFFormatError(f"file ended early at byte {self.pos + (got or 0)}: truncated?")
            self.busy[turn] = [self.file_worker.submit(self.file_hash.update, view)]
            if blocks is not None:
                self.busy[turn].append(self.block_worker.submit(blocks.update, view))
            self.pos += n
            size -= n
            yield view
            if self.progress:
                self.progress(self.pos, self.total)

    def block_root(self, blocks: BlockHasher) -> Future[str]:
        """The root of `blocks` once the block worker has hashed every view
        fed to it so far. A future, so that the main thread reads on instead
        of waiting for the worker at the end of each fragment."""
        return self.block_worker.submit(blocks.root)

    def finish(self) -> str:
        for tasks in self.busy:  # the last tasks of each worker: all earlier ones are done
            for task in tasks:
                task.result()
        return self.file_hash.hexdigest()


def fragment_model(
    gguf_path: Path,
    output: Path,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    force: bool = False,
    progress: Progress | None = None,
) -> FragmentResult:
    start = time.monotonic()
    gguf_path = Path(gguf_path)
    try:
        f = open(gguf_path, "rb")
    except OSError as e:
        raise FragmenterError(f"cannot read {gguf_path}: {e.strerror}") from None
    with f:
        file_size = os.fstat(f.fileno()).st_size
        if file_size == 0:
            raise GGUFFormatError(f"{gguf_path}: empty file, not a GGUF model")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as header_map:
            header = parse_header(header_map)
            if header.alignment > MAX_ALIGNMENT:  # valid GGUF, but a manifest we would write and then refuse
                raise GGUFFormatError(
                    f"{gguf_path}: alignment {header.alignment} is larger than the {MAX_ALIGNMENT} a manifest allows"
                )
            plan = plan_file(header, file_size, chunk_size)
            warnings: list[str] = []
            try:
                with open_staging_folder(Path(output), force) as staging, _Reader(f, progress, file_size) as reader:
                    entries, extra, header_sha, header_root = _write_fragments(reader, header, plan, staging, gguf_path)
                    file_sha = reader.finish()
                    try:
                        tokenizer_files = write_tokenizer_files(header, staging)
                    except UnsupportedVocabulary as e:  # the fragments are fine: say so, and go on
                        tokenizer_files, warnings = [], [f"no tokenizer files: {e}"]
                    manifest = build_manifest(
                        header, gguf_path.name, file_size, file_sha, header_sha, header_root, chunk_size, entries, extra
                    )
                    manifest_bytes = serialize(manifest)
                    (staging / MANIFEST_NAME).write_bytes(manifest_bytes)
            except OSError as e:  # writing (reads fail as FragmenterError): the staging folder is gone already
                raise FragmenterError(f"cannot write {output}: {e.strerror or e}") from None
    return FragmentResult(
        model_cid=cid_of(manifest_bytes),
        folder=Path(output).resolve(),
        fragments=len(entries),
        file_size=file_size,
        file_sha256=file_sha,
        seconds=time.monotonic() - start,
        tokenizer_files=tokenizer_files,
        warnings=warnings,
    )


def _write_fragments(
    reader: _Reader, header: GGUFHeader, plan: Any, staging: Path, gguf_path: Path
) -> tuple[list[dict[str, Any]], list[tuple[int, bytes]], str, str]:
    """Write the header and every fragment; return (fragment entries, non-zero
    gap bytes, header sha256, header block root)."""
    model = gguf_path.stem
    header_hash = hashlib.sha256()
    header_blocks = BlockHasher()
    with open(staging / HEADER_NAME, "wb") as out:
        for view in reader.chunks(header.data_start, header_blocks):
            header_hash.update(view)
            out.write(view)
    header_root = reader.block_root(header_blocks)

    # Walk shards and gaps together in file order.
    events = [(s.file_offset, 1, s) for s in plan.shards] + [(g.file_offset, 0, g) for g in plan.gaps]
    events.sort(key=lambda e: (e[0], e[1]))
    entries: list[dict[str, Any]] = []
    extra: list[tuple[int, bytes]] = []
    used_ids: set[str] = set()
    roots: list[Future[str]] = []  # block root of each entry, in order
    tmp = staging / ".fragment.partial"
    for _, is_shard, item in events:
        if not is_shard:
            data = b"".join(bytes(v) for v in reader.chunks(item.size))
            if data.count(0) != len(data):
                extra.append((item.file_offset, data))
            continue
        digest = hashlib.sha256()
        blocks = BlockHasher()
        with open(tmp, "wb") as out:
            for view in reader.chunks(item.size, blocks):
                digest.update(view)
                out.write(view)
        # The block root is filled in below, once the block worker is done;
        # the placeholder keeps its place in the entry's (serialized) key order.
        entry = fragment_entry(model, item, digest.hexdigest(), "", used_ids, header.data_start)
        roots.append(reader.block_root(blocks))
        os.replace(tmp, staging / (entry["fragment_id"] + ".dat"))
        entries.append(entry)
    for entry, root in zip(entries, roots, strict=True):
        entry["block_root"] = root.result()
    return entries, extra, header_hash.hexdigest(), header_root.result()
