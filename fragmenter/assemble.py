"""Fragment folder -> the original GGUF file, byte-identical.

The output is written under a temporary name; every fragment is checked as
it is copied, the gaps between tensors are re-created (zeros, or the bytes the
manifest kept), and the whole file's SHA-256 is checked against
`file_sha256` before the file is renamed into place.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .errors import FragmenterError, FragmentError
from .folder import READ_SIZE, FragmentFolder, open_folder, read_fragment_chunks
from .fsio import open_staging_file
from .selection import describe_fragments


@dataclass(frozen=True)
class AssembleResult:
    output: Path
    file_size: int
    file_sha256: str
    checked_against_manifest: bool  # False for the existing tool's folders (no file_sha256)


def assemble(
    path: Path, output: Path, force: bool = False, progress: Callable[[int, int], None] | None = None
) -> AssembleResult:
    folder = open_folder(path)
    output = Path(output)
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


def write_assembled(
    folder: FragmentFolder, out: BinaryIO, progress: Callable[[int, int], None] | None
) -> tuple[int, str]:
    manifest = folder.manifest
    file_size = folder.file_size
    digest = hashlib.sha256()
    extra = sorted(manifest.extra_bytes)
    pos = 0

    def emit(data: bytes) -> None:
        nonlocal pos
        digest.update(data)
        out.write(data)
        pos += len(data)
        if progress:
            progress(pos, file_size)

    def fill_to(end: int) -> None:
        while pos < end:
            n = min(READ_SIZE, end - pos)
            block = bytearray(n)
            for off, data in extra:
                lo, hi = max(off, pos), min(off + len(data), pos + n)
                if lo < hi:
                    block[lo - pos : hi - pos] = data[lo - off : hi - off]
            emit(bytes(block))

    emit(folder.header_bytes)
    for entry in manifest.fragments:
        fill_to(entry.file_offset)
        for chunk in read_fragment_chunks(folder.fragment_path(entry), entry):
            emit(chunk)
    fill_to(file_size)
    return pos, digest.hexdigest()
