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
from collections.abc import Callable, Iterator, Sequence
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
from .split import ModelLayout, check_kept_headers, find_parts, model_layout, order_parts, read_part
from .tokenizer import TokenizerBuild, UnsupportedVocabulary

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
    parts: int = 1  # files of a split model


class _Reader:
    """Sequential reads into two reused buffers. Two single-thread workers hash
    each view as it is read: one the whole file, one the blocks of the current
    file (when asked). A worker per hash keeps each hash's updates in file
    order while the two run in parallel with the main thread.

    For a split model, `parts` lists every part (path, size), `f` being the
    first: the others are opened in turn, read as if appended to it, and each
    is hashed on its own as well (`part_shas`)."""

    def __init__(
        self, f: BinaryIO, progress: Progress | None, total: int, parts: Sequence[tuple[Path, int]] = ()
    ) -> None:
        self.f = f
        self.parts = list(parts)
        self.part_end = self.parts[0][1] if self.parts else total
        self.part_hash = hashlib.sha256() if self.parts else None  # None: no second hash of a lone file
        self.part_digests: list[Future[str]] = []
        self.opened: BinaryIO | None = None  # the part file this reader opened
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
        if self.opened is not None:
            self.opened.close()

    def _hash(self, view: memoryview, part_hash: Any) -> None:
        self.file_hash.update(view)
        if part_hash is not None:
            part_hash.update(view)

    def _next_part(self) -> None:
        """Finish the hash of the part read to its end and open the next."""
        self.part_digests.append(self.file_worker.submit(self.part_hash.hexdigest))  # type: ignore[union-attr]
        path, size = self.parts[len(self.part_digests)]
        if self.opened is not None:
            self.opened.close()
        try:
            self.f = self.opened = open(path, "rb")
        except OSError as e:
            raise FragmenterError(f"cannot read {path}: {e.strerror or e}") from None
        self.part_hash = hashlib.sha256()
        self.part_end += size

    def chunks(self, size: int, blocks: BlockHasher | None = None) -> Iterator[memoryview]:
        """Yield memoryviews covering the next `size` bytes of the file; the
        block worker feeds them to `blocks` (read it through `block_root`)."""
        while size > 0:
            if self.pos == self.part_end:
                self._next_part()
            turn, self.turn = self.turn, self.turn ^ 1
            for task in self.busy[turn]:
                task.result()  # this buffer is free again
            n = min(size, _READ_SIZE, self.part_end - self.pos)
            view = memoryview(self.buffers[turn])[:n]
            try:
                got = self.f.readinto(view)
            except OSError as e:  # told apart from the writes' errors (a full disk), which name the output
                raise FragmenterError(f"cannot read the model at byte {self.pos}: {e.strerror or e}") from None
            if got != n:
                where = f"{Path(self.f.name).name} " if self.parts else "file "
                raise GGUFFormatError(f"{where}ended early at byte {self.pos + (got or 0)}: truncated?")
            self.busy[turn] = [self.file_worker.submit(self._hash, view, self.part_hash)]
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
        if self.parts:
            self.part_digests.append(self.file_worker.submit(self.part_hash.hexdigest))  # type: ignore[union-attr]
        return self.file_hash.hexdigest()

    def part_shas(self) -> list[str]:
        """SHA-256 of each part, once `finish` has run; [] for a lone file."""
        return [d.result() for d in self.part_digests]


def fragment_model(
    gguf_path: Path | Sequence[Path],
    output: Path,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    force: bool = False,
    progress: Progress | None = None,
) -> FragmentResult:
    """`gguf_path`: the model file; for a split model, its first part (the
    others are found beside it), any part, or all of them."""
    start = time.monotonic()
    paths = find_parts([gguf_path] if isinstance(gguf_path, (str, os.PathLike)) else gguf_path)
    parts = order_parts([read_part(p) for p in paths]) if len(paths) > 1 else []
    gguf_path = parts[0].path if parts else paths[0]
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
            layout = model_layout(gguf_path, header, file_size, parts, chunk_size)
            warnings: list[str] = []
            try:
                with (
                    open_staging_folder(Path(output), force) as staging,
                    _Reader(f, progress, layout.file_size, layout.reads) as reader,
                    TokenizerBuild(header, staging) as tokenizer,  # beside the fragment stream, on another core
                ):
                    entries, extra, header_sha, header_root = _write_fragments(reader, header, layout, staging)
                    check_kept_headers(layout.parts, extra)
                    file_sha = reader.finish()
                    try:
                        tokenizer_files = tokenizer.result()
                    except UnsupportedVocabulary as e:  # the fragments are fine: say so, and go on
                        tokenizer_files, warnings = [], [f"no tokenizer files: {e}"]
                    manifest = build_manifest(
                        header,
                        layout.file_name,
                        layout.file_size,
                        file_sha,
                        header_sha,
                        header_root,
                        chunk_size,
                        entries,
                        extra,
                        **layout.manifest_fields(reader.part_shas()),
                    )
                    manifest_bytes = serialize(manifest)
                    (staging / MANIFEST_NAME).write_bytes(manifest_bytes)
            except OSError as e:  # writing (reads fail as FragmenterError): the staging folder is gone already
                raise FragmenterError(f"cannot write {output}: {e.strerror or e}") from None
    return FragmentResult(
        model_cid=cid_of(manifest_bytes),
        folder=Path(output).resolve(),
        fragments=len(entries),
        file_size=layout.file_size,
        file_sha256=file_sha,
        seconds=time.monotonic() - start,
        tokenizer_files=tokenizer_files,
        warnings=warnings,
        parts=max(1, len(layout.parts)),
    )


def _write_fragments(
    reader: _Reader, header: GGUFHeader, layout: ModelLayout, staging: Path
) -> tuple[list[dict[str, Any]], list[tuple[int, bytes]], str, str]:
    """Write the header and every fragment; return (fragment entries, non-zero
    gap bytes, header sha256, header block root)."""
    model = Path(layout.file_name).stem
    plan = layout.plan
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
        entry = fragment_entry(model, item, digest.hexdigest(), "", used_ids, layout.data_bases[item.tensor.name])
        roots.append(reader.block_root(blocks))
        os.replace(tmp, staging / (entry["fragment_id"] + ".dat"))
        entries.append(entry)
    for entry, root in zip(entries, roots, strict=True):
        entry["block_root"] = root.result()
    return entries, extra, header_hash.hexdigest(), header_root.result()
