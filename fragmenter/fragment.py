"""GGUF file -> fragment folder, in one sequential read with bounded memory.

Every byte is read once, in views of 4 MiB, into two reused buffers; the
whole-file SHA-256, each fragment's SHA-256 and each fragment's block digests
(`protocol/blocks.py`) are computed from those views. hashlib releases the
GIL, so the whole-file hash runs on a worker thread (one task per view), as do
the block digests of fragments of more than one block, while the main thread
hashes and writes each fragment. A fragment of one block (up to 1 MiB) has the
hash of its SHA-256 as block root, so it costs no extra pass. Small fragments
are slices of a view, written straight to their final name inside the
staging folder, large ones under a temporary name then renamed to theirs; the
staging folder is renamed into place only when everything, manifest
included, is written, so no killed run leaves a complete-looking folder.
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

from protocol.blocks import BLOCK_SIZE, BlockHasher
from protocol.cid import cid_from_digest

from .errors import FragmenterError, GGUFFormatError
from .fsio import WRITEBACK_FROM, open_staging_folder, start_writeback
from .gguf_header import GGUFHeader, parse_header
from .manifest import (
    HEADER_NAME,
    MANIFEST_NAME,
    MAX_ALIGNMENT,
    FragmentEntries,
    build_manifest,
    serialize_chunks,
)
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
    """Sequential reads of 4 MiB views into two reused buffers, handed out in
    slices of any size (`chunks`, `take`). A single-thread worker hashes each
    view as it is read (the whole file), another, when asked, the blocks of
    the current fragment; a worker per hash keeps each hash's updates in file
    order while the two run in parallel with the main thread. A buffer is read
    into again only once the tasks reading its last view are done, and the
    slices the main thread got from it are used before it takes the view
    after next: `take`'s slices live until then.

    For a split model, `parts` lists every part (path, size), `f` being the
    first: the others are opened in turn, read as if appended to it, and each
    is hashed on its own as well (`part_shas`). A view never spans two parts."""

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
        self.pos = 0  # bytes handed out
        self.read_pos = 0  # bytes read
        self.total = total
        self.progress = progress
        # Two buffers: the workers hash one while the next is read into the other.
        self.buffers = [bytearray(_READ_SIZE), bytearray(_READ_SIZE)]
        self.busy: list[list[Future[Any]]] = [[], []]  # tasks still reading each buffer
        self.turn = 1
        self.view = memoryview(b"")  # the last view read, from `self.buffers[self.turn]`
        self.at = 0  # bytes of `view` handed out

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

    def _read(self) -> None:
        """Read the next view (the current one is all handed out)."""
        if self.read_pos == self.part_end:
            self._next_part()
        self.turn ^= 1
        for task in self.busy[self.turn]:
            task.result()  # this buffer is free again
        n = min(_READ_SIZE, self.part_end - self.read_pos)
        view = memoryview(self.buffers[self.turn])[:n]
        try:
            got = self.f.readinto(view)
        except OSError as e:  # told apart from the writes' errors (a full disk), which name the output
            raise FragmenterError(f"cannot read the model at byte {self.read_pos}: {e.strerror or e}") from None
        if got != n:
            where = f"{Path(self.f.name).name} " if self.parts else "file "
            raise GGUFFormatError(f"{where}ended early at byte {self.read_pos + (got or 0)}: truncated?")
        self.busy[self.turn] = [self.file_worker.submit(self._hash, view, self.part_hash)]
        self.read_pos += n
        self.view = view
        self.at = 0

    def _slice(self, size: int) -> memoryview:
        """Up to `size` bytes of the current view (reading the next one if it is all handed out)."""
        if self.at == len(self.view):
            self._read()
        n = min(size, len(self.view) - self.at)
        piece = self.view[self.at : self.at + n]
        self.at += n
        self.pos += n
        return piece

    def chunks(self, size: int, blocks: BlockHasher | None = None) -> Iterator[memoryview]:
        """Yield memoryviews covering the next `size` bytes of the file; the
        block worker feeds them to `blocks` (read it through `block_root`)."""
        while size > 0:
            piece = self._slice(size)
            if blocks is not None:
                self.busy[self.turn].append(self.block_worker.submit(blocks.update, piece))
            size -= len(piece)
            yield piece
            if self.progress:
                self.progress(self.pos, self.total)

    def take(self, size: int) -> memoryview | bytes:
        """The next `size` bytes in one piece: a slice of the current view,
        valid until the view after next is read, or (across views) a copy."""
        if size == 0:
            return b""
        piece = self._slice(size)
        if len(piece) < size:  # copied piece by piece: a third view would overwrite the first
            piece = b"".join([bytes(piece), *(bytes(p) for p in self.chunks(size - len(piece)))])
        elif self.progress:
            self.progress(self.pos, self.total)
        return piece

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
                    model_cid = _write_manifest(staging / MANIFEST_NAME, manifest)
            except OSError as e:  # writing (reads fail as FragmenterError): the staging folder is gone already
                raise FragmenterError(f"cannot write {output}: {e.strerror or e}") from None
    return FragmentResult(
        model_cid=model_cid,
        folder=Path(output).resolve(),
        fragments=len(entries),
        file_size=layout.file_size,
        file_sha256=file_sha,
        seconds=time.monotonic() - start,
        tokenizer_files=tokenizer_files,
        warnings=warnings,
        parts=max(1, len(layout.parts)),
    )


def _write_manifest(path: Path, manifest: dict[str, Any]) -> str:
    """Write `manifest` to `path` as it is serialized, piece by piece; return its CID."""
    digest = hashlib.sha256()
    with open(path, "wb") as out:
        for piece in serialize_chunks(manifest):
            digest.update(piece)
            out.write(piece)
    return cid_from_digest(digest.digest())


_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)


def _write_file(name: str, data: memoryview | bytes, folder: int) -> None:
    """Write `data` to the file `name` in the folder open as `folder` (unbuffered: one write)."""
    fd = os.open(name, _NEW_FILE, 0o666, dir_fd=folder)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if len(data) >= WRITEBACK_FROM:
            start_writeback(fd)
    finally:
        os.close(fd)


def _write_fragments(
    reader: _Reader, header: GGUFHeader, layout: ModelLayout, staging: Path
) -> tuple[FragmentEntries, list[tuple[int, bytes]], str, str]:
    """Write the header and every fragment; return (fragment entries, non-zero
    gap bytes, header sha256, header block root)."""
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
    entries = FragmentEntries(Path(layout.file_name).stem)
    extra: list[tuple[int, bytes]] = []
    roots: list[tuple[int, Future[str]]] = []  # (entry, block root) of the fragments of several blocks
    bases = layout.data_bases
    sha256 = hashlib.sha256
    tmp = staging / ".fragment.partial"
    folder = os.open(staging, os.O_RDONLY)
    try:
        for _, is_shard, item in events:
            if not is_shard:
                data = b"".join(bytes(v) for v in reader.chunks(item.size))
                if data.count(0) != len(data):
                    extra.append((item.file_offset, data))
                continue
            if item.size <= BLOCK_SIZE:
                # One block: its digest is the fragment's SHA-256, its root the hash of that.
                data = reader.take(item.size)
                digest = sha256(data).digest()
                fid = entries.add(item, digest.hex(), sha256(digest).hexdigest(), bases[item.tensor.name])
                _write_file(fid + ".dat", data, folder)
                continue
            hasher = sha256()
            blocks = BlockHasher()
            with open(tmp, "wb") as out:
                for view in reader.chunks(item.size, blocks):
                    hasher.update(view)
                    out.write(view)
                out.flush()
                start_writeback(out.fileno())
            # The block root is filled in below, once the block worker is done.
            fid = entries.add(item, hasher.hexdigest(), "", bases[item.tensor.name])
            roots.append((len(entries) - 1, reader.block_root(blocks)))
            os.replace(tmp, staging / (fid + ".dat"))
    finally:
        os.close(folder)
    for index, root in roots:
        entries.set_block_root(index, root.result())
    return entries, extra, header_hash.hexdigest(), header_root.result()
