"""Fragment folder -> the original GGUF file, byte-identical.

The output is written under a temporary name; every fragment is checked as
it is copied, the gaps between tensors are re-created (zeros, or the bytes the
manifest kept), and the whole file's SHA-256 is checked against
`file_sha256` before the file is renamed into place.

A split model comes back as its part files, in a folder, each checked against
its own SHA-256; or, with `merge`, as one unsplit GGUF file (`split.py` builds
its header), every fragment checked on the way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from .errors import FragmenterError, FragmentError
from .folder import READ_SIZE, FragmentFolder, open_folder, read_fragment_chunks
from .fsio import open_staging_file
from .gguf_header import TensorInfo, align
from .manifest import FragmentEntry, PartEntry
from .selection import describe_fragments
from .split import merged_header, merged_size

Progress = Callable[[int, int], None]


class _Sink(Protocol):
    def write(self, data: bytes, /) -> Any: ...


@dataclass(frozen=True)
class AssembleResult:
    output: Path
    file_size: int
    file_sha256: str
    checked_against_manifest: bool  # False for the existing tool's folders (no file_sha256)
    files: tuple[Path, ...] = ()  # the part files written, for a split model
    merged: bool = False  # a split model written as one file: no file_sha256 for it, fragments checked


def assemble(
    path: Path,
    output: Path,
    force: bool = False,
    progress: Progress | None = None,
    merge: bool = False,
) -> AssembleResult:
    """`output`: the file; for a split model, the folder its parts go into,
    or with `merge` the one file to write (for a one-file model, `merge`
    changes nothing)."""
    folder = open_folder(path)
    output = Path(output)
    if folder.parts:
        _check_whole(folder)
        if merge:
            return _assemble_merged(folder, output, force, progress)
        return _assemble_parts(folder, output, force, progress)
    if output.exists() and not force:
        raise FragmenterError(f"{output} already exists (use --force to replace it)")
    _check_whole(folder)
    with open_staging_file(output) as tmp:
        try:
            with open(tmp, "wb") as out:
                size, sha = write_assembled(folder, out, progress)
        except OSError as e:
            raise FragmenterError(f"cannot write {output}: {e.strerror}") from None
        expected = folder.manifest.file_sha256
        if expected is not None and sha != expected:
            raise FragmentError(f"assembled file does not match file_sha256 {expected[:16]}…: not written")
    return AssembleResult(output.resolve(), size, sha, expected is not None)


def _check_whole(folder: FragmentFolder) -> None:
    """A partial replica (or a folder a pull has not finished) fails before any
    byte is written, naming what it lacks."""
    fragments = folder.manifest.fragments
    missing = [k for k, f in enumerate(fragments) if _size(folder.fragment_path(f)) != f.size]
    if missing:
        raise FragmentError(
            f"{folder.path} holds part of the model: {len(missing)} of {len(fragments)} fragments missing "
            f"({describe_fragments(folder.manifest, missing)}; e.g. {fragments[missing[0]].file_name}); "
            "pull the rest first"
        )


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def write_assembled(folder: FragmentFolder, out: _Sink | BinaryIO, progress: Progress | None) -> tuple[int, str]:
    manifest = folder.manifest
    writer = _HashingWriter(out, progress, folder.file_size)
    extra = sorted(manifest.extra_bytes)

    def fill_to(end: int) -> None:
        while (pos := writer.pos) < end:
            n = min(READ_SIZE, end - pos)
            block = bytearray(n)
            for off, data in extra:
                lo, hi = max(off, pos), min(off + len(data), pos + n)
                if lo < hi:
                    block[lo - pos : hi - pos] = data[lo - off : hi - off]
            writer.write(bytes(block))

    writer.write(folder.header_bytes)
    for entry in manifest.fragments:
        fill_to(entry.file_offset)
        for chunk in read_fragment_chunks(folder.fragment_path(entry), entry):
            writer.write(chunk)
    fill_to(folder.file_size)
    return writer.pos, writer.digest.hexdigest()


class _HashingWriter:
    """Writes to `out`, hashing what it writes and reporting progress."""

    def __init__(self, out: _Sink | BinaryIO, progress: Progress | None, total: int) -> None:
        self.out, self.progress, self.total = out, progress, total
        self.digest = hashlib.sha256()
        self.pos = 0

    def write(self, data: bytes) -> None:
        self.digest.update(data)
        self.out.write(data)
        self.pos += len(data)
        if self.progress:
            self.progress(self.pos, self.total)


# ---- split models ------------------------------------------------------------------


def _assemble_parts(folder: FragmentFolder, out_dir: Path, force: bool, progress: Progress | None) -> AssembleResult:
    parts = folder.manifest.parts or ()
    if out_dir.exists() and not out_dir.is_dir():
        raise FragmenterError(f"{out_dir} is not a folder: a split model is assembled into a folder of its parts")
    targets = tuple(out_dir / p.file_name for p in parts)
    existing = next((t for t in targets if t.exists()), None)
    if existing is not None and not force:
        raise FragmenterError(f"{existing} already exists (use --force to replace it)")
    # Every part is renamed into place only once all parts and the whole check out.
    with ExitStack() as stack:
        sink = _PartWriter(stack, out_dir, parts)
        try:
            size, sha = write_assembled(folder, sink, progress)
            sink.close()
        except OSError as e:
            raise FragmenterError(f"cannot write into {out_dir}: {e.strerror or e}") from None
        expected = folder.manifest.file_sha256
        if sha != expected:
            raise FragmentError(f"assembled parts do not match file_sha256 {(expected or '')[:16]}…: not written")
    return AssembleResult(out_dir.resolve(), size, sha, True, tuple(t.resolve() for t in targets))


class _PartWriter:
    """Cuts the concatenation of the parts back into part files, each written
    under a temporary name (removed by `stack` on any error) and checked
    against its own SHA-256."""

    def __init__(self, stack: ExitStack, out_dir: Path, parts: Sequence[PartEntry]) -> None:
        self.stack = stack
        self.out_dir = out_dir
        self.parts = parts
        self.index = -1
        self.left = 0  # bytes still to write into the current part
        self.file: BinaryIO | None = None
        self.hash = hashlib.sha256()

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while len(view):
            if self.left == 0:
                self._next_part()
            n = min(self.left, len(view))
            assert self.file is not None
            self.file.write(view[:n])
            self.hash.update(view[:n])
            self.left -= n
            view = view[n:]

    def close(self) -> None:
        if self.index != len(self.parts) - 1 or self.left:
            raise FragmentError("the fragments make up less than the model's parts: not written")
        self._finish_part()

    def _next_part(self) -> None:
        self._finish_part()
        self.index += 1
        if self.index >= len(self.parts):
            raise FragmentError("the fragments make up more than the model's parts: not written")
        part = self.parts[self.index]
        tmp = self.stack.enter_context(open_staging_file(self.out_dir / part.file_name))
        self.file = open(tmp, "wb")
        self.stack.callback(self.file.close)  # closed before its staging file is renamed or removed
        self.hash = hashlib.sha256()
        self.left = part.file_size

    def _finish_part(self) -> None:
        if self.file is None:
            return
        self.file.close()
        self.file = None
        part = self.parts[self.index]
        if self.hash.hexdigest() != part.file_sha256:
            raise FragmentError(
                f"assembled {part.file_name} does not match its file_sha256 {part.file_sha256[:16]}…: not written"
            )


def _assemble_merged(folder: FragmentFolder, output: Path, force: bool, progress: Progress | None) -> AssembleResult:
    if output.exists() and not force:
        raise FragmenterError(f"{output} already exists (use --force to replace it)")
    header, tensors = merged_header(folder.parts)
    by_tensor: dict[str, list[FragmentEntry]] = {}
    for f in folder.manifest.fragments:
        by_tensor.setdefault(f.tensor_name, []).append(f)
    if set(by_tensor) != {t.name for t, _ in tensors}:
        raise FragmentError(f"{folder.path}: the manifest's fragments do not match the tensors of the model's parts")
    with open_staging_file(output) as tmp:
        try:
            with open(tmp, "wb") as out:
                size, sha = _write_merged(folder, out, header, [t for t, _ in tensors], by_tensor, progress)
        except OSError as e:
            raise FragmenterError(f"cannot write {output}: {e.strerror or e}") from None
    return AssembleResult(output.resolve(), size, sha, False, merged=True)


def _write_merged(
    folder: FragmentFolder,
    out: BinaryIO,
    header: bytes,
    tensors: list[TensorInfo],
    by_tensor: dict[str, list[FragmentEntry]],
    progress: Progress | None,
) -> tuple[int, str]:
    """The merged header, then each tensor's fragments (each checked) and its
    padding to the alignment, as `merged_header` laid them out."""
    alignment = folder.header.alignment
    writer = _HashingWriter(out, progress, merged_size([(t, None) for t in tensors], len(header), alignment))
    writer.write(header)
    for t in tensors:
        written = 0
        for entry in sorted(by_tensor[t.name], key=lambda f: f.shard_index):
            for chunk in read_fragment_chunks(folder.fragment_path(entry), entry):
                writer.write(chunk)
                written += len(chunk)
        if written != t.n_bytes:
            raise FragmentError(f"fragments of {t.name} hold {written} bytes, the tensor {t.n_bytes}: not written")
        writer.write(bytes(align(written, alignment) - written))
    return writer.pos, writer.digest.hexdigest()
