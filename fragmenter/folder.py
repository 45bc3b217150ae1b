"""Reading a fragment folder: its manifest, header and fragments, each checked."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import FragmentError, GGUFFormatError, ManifestError
from .gguf_header import GGUFHeader, TensorInfo, align, parse_header
from .manifest import HEADER_NAME, FragmentEntry, Manifest, read_manifest
from .split import PartLayout, folder_parts

READ_SIZE = 4 * 1024 * 1024


@dataclass(frozen=True)
class FragmentFolder:
    path: Path
    manifest: Manifest
    header_bytes: bytes
    header: GGUFHeader
    parts: tuple[PartLayout, ...] = ()  # a split model's parts; () for one file

    @property
    def tensors(self) -> list[TensorInfo]:
        """Every tensor of the model: part 1's header lists only its own."""
        if not self.parts:
            return self.header.tensors
        return [t for p in self.parts for t in p.header.tensors]

    @property
    def file_size(self) -> int:
        """Size of the original file; for the existing tool's folders, inferred
        the way GGUF writers lay files out (each tensor padded to the alignment)."""
        if self.manifest.file_size is not None:
            return self.manifest.file_size
        last = max((f.file_offset + f.size for f in self.manifest.fragments), default=self.header.data_start)
        return align(last, self.header.alignment)

    def fragment_path(self, entry: FragmentEntry) -> Path:
        return self.path / entry.file_name


def open_folder(path: Path) -> FragmentFolder:
    path = Path(path)
    if not path.is_dir():
        raise ManifestError(f"{path}: not a folder")
    manifest = read_manifest(path)
    try:
        header_bytes = (path / HEADER_NAME).read_bytes()
    except OSError:
        raise FragmentError(f"{path}: {HEADER_NAME} is missing or unreadable") from None
    expected = manifest.raw.get("header_sha256")
    if expected is not None and hashlib.sha256(header_bytes).hexdigest() != expected:
        raise FragmentError(f"{path / HEADER_NAME}: does not match header_sha256 in the manifest")
    try:
        header = parse_header(header_bytes)
    except GGUFFormatError as e:
        raise FragmentError(f"{path / HEADER_NAME}: {e}") from None
    if header.data_start != len(header_bytes) or header.data_start != manifest.header_size:
        raise FragmentError(f"{path / HEADER_NAME}: size does not match the manifest's header_size")
    check_layout(manifest, header.data_start)
    return FragmentFolder(path, manifest, header_bytes, header, folder_parts(manifest, header, header_bytes))


def check_layout(manifest: Manifest, header_size: int) -> None:
    """Fragments must lie after the header, in order, without overlapping."""
    pos = header_size
    for f in manifest.fragments:
        if f.file_offset < pos:
            raise ManifestError(f"manifest: fragment {f.fragment_id} overlaps the header or another fragment")
        pos = f.file_offset + f.size
    if manifest.file_size is not None and pos > manifest.file_size:
        raise ManifestError("manifest: fragments run past file_size")


def read_fragment_chunks(path: Path, entry: FragmentEntry) -> Iterator[bytes]:
    """Yield the bytes of one fragment file; raise FragmentError unless they
    are exactly what the manifest says (size and hash)."""
    digest = hashlib.sha256()
    seen = 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(READ_SIZE):
                seen += len(chunk)
                if seen > entry.size:
                    break
                digest.update(chunk)
                yield chunk
    except FileNotFoundError:
        raise FragmentError(f"fragment {entry.fragment_id} is missing") from None
    except OSError as e:
        raise FragmentError(f"fragment {entry.fragment_id} is unreadable: {e.strerror}") from None
    if seen != entry.size:
        raise FragmentError(f"fragment {entry.fragment_id} has {seen} bytes, expected {entry.size}")
    if not entry.matches_digest(digest.hexdigest()):
        raise FragmentError(f"fragment {entry.fragment_id} is corrupt (hash mismatch)")


@dataclass
class VerifyReport:
    checked: int = 0
    bytes: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)  # (fragment id, reason)
    missing: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.bad and not self.missing


def verify_folder(path: Path, progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Check every fragment against the manifest: size, then full SHA-256
    (or the 16-hex checksum for the existing tool's manifests)."""
    folder = open_folder(path)
    report = VerifyReport()
    total = folder.manifest.total_bytes
    for entry in folder.manifest.fragments:
        p = folder.fragment_path(entry)
        report.checked += 1
        if not p.exists():
            report.missing.append(entry.fragment_id)
            continue
        try:
            for chunk in read_fragment_chunks(p, entry):
                report.bytes += len(chunk)
                if progress:
                    progress(report.bytes, total)
        except FragmentError as e:
            report.bad.append((entry.fragment_id, str(e)))
    return report
