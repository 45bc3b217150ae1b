"""Split models: llama.cpp's `NAME-00001-of-00005.gguf` ... parts.

llama.cpp's gguf-split (and gguf-py's `GGUFWriter(split_max_tensors=...)`)
puts the model's metadata in part 1 and only the `split.*` keys and its own
tensor infos in the others; each part is a valid GGUF file of its own, with
`split.no` (0-based), `split.count` and `split.tensors.count`.

A fragment folder holds a split model as the concatenation of its parts: its
offsets are offsets in that concatenation, `gguf_header.dat` is part 1's
header, the headers of parts 2..N are kept in the manifest's `extra_bytes`
(like any other non-zero bytes outside header and tensors) and the manifest's
`parts` says where each file starts and ends. This module finds and checks the
parts of a model (fragmenting), reads the part headers back from a manifest
(assembling, validating) and builds the header of the merged, unsplit file.
"""

from __future__ import annotations

import mmap
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .errors import FragmenterError, GGUFFormatError, ManifestError, SplitError
from .gguf_header import GGUFHeader, TensorInfo, align, metadata_spans, parse_header
from .gguf_spec import GGUF_MAGIC
from .manifest import MAX_ALIGNMENT, MAX_PARTS, Manifest, PartEntry
from .plan import FilePlan, GapPlan, plan_file

SPLIT_NO = "split.no"
SPLIT_COUNT = "split.count"
SPLIT_TENSORS_COUNT = "split.tensors.count"
SPLIT_KEYS = (SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS_COUNT)
_SPLIT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
# The headers of parts 2..N travel in the manifest (base64): gguf-split's hold
# only split keys and tensor infos (~100 bytes a tensor). A writer that copies
# a whole vocabulary into every part would bloat every manifest download.
MAX_KEPT_HEADERS = 16 << 20


def split_file_name(prefix: str, no: int, count: int) -> str:
    """The name of part `no` (1-based) of `count`, as llama.cpp spells it."""
    return f"{prefix}-{no:05d}-of-{count:05d}.gguf"


# ---- finding and checking the parts of a model ------------------------------------


def find_parts(given: Sequence[Path]) -> list[Path]:
    """The files of the model named by `given`: one file alone; or, for one
    part of a split model (named NAME-0000k-of-0000N.gguf), all N parts beside
    it; or all the files given (ordered later, by their `split.no`)."""
    given = [Path(p) for p in given]
    if not given:
        raise FragmenterError("no model file given")
    if len(given) > 1:
        if len({p.resolve() for p in given}) != len(given):
            raise SplitError("the same part is given twice")
        return given
    path = given[0]
    m = _SPLIT_NAME.match(path.name)
    if not m or int(m["count"]) <= 1:
        return [path]
    count = int(m["count"])
    if count > MAX_PARTS:
        raise SplitError(f"{path.name}: a model of {count} parts (at most {MAX_PARTS} are supported)")
    paths = [path.with_name(split_file_name(m["prefix"], i, count)) for i in range(1, count + 1)]
    for p in paths:
        if not p.is_file():
            raise SplitError(f"{p.name} is missing (part of the same model as {path.name}, looked for in {p.parent})")
    return paths


@dataclass(frozen=True)
class SourcePart:
    """A part file of a split model, its header read (and copied: it is small)."""

    path: Path
    size: int
    header: GGUFHeader
    header_bytes: bytes  # [0, data_start)


def read_part(path: Path) -> SourcePart:
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            try:
                data_start = parse_header(m).data_start
            except GGUFFormatError as e:
                raise GGUFFormatError(f"{path.name}: {e}") from None
            header_bytes = bytes(m[:data_start])
            size = len(m)
    except ValueError:  # mmap of an empty file
        raise GGUFFormatError(f"{path}: empty file, not a GGUF model") from None
    except OSError as e:
        raise FragmenterError(f"cannot read {path}: {e.strerror or e}") from None
    return SourcePart(path, size, parse_header(header_bytes), header_bytes)


def _split_value(header: GGUFHeader, key: str) -> int | None:
    value = header.metadata.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def check_lone_file(header: GGUFHeader, path: Path) -> None:
    """A model given as one file must not be one part of a split model."""
    count = _split_value(header, SPLIT_COUNT)
    if count is not None and count > 1:
        no = _split_value(header, SPLIT_NO)
        which = f"part {no + 1}" if no is not None else "a part"
        raise SplitError(
            f"{path.name} is {which} of a {count}-part split model, but its name does not say so: "
            f"name the parts NAME-00001-of-{count:05d}.gguf ... or give them all"
        )


def order_parts(parts: Sequence[SourcePart]) -> list[SourcePart]:
    """`parts` in split.no order, checked to be all the parts of one model."""

    def is_part(p: SourcePart) -> bool:
        return _split_value(p.header, SPLIT_COUNT) is not None and _split_value(p.header, SPLIT_NO) is not None

    split = next((p for p in parts if is_part(p)), None)
    if split is None:
        raise SplitError(f"{len(parts)} files given, but none is part of a split model: give one model file")
    for p in parts:
        if not is_part(p):
            raise SplitError(f"{p.path.name} is not part of a split model (no split.count), but {split.path.name} is")
    first = parts[0]
    count = _split_value(first.header, SPLIT_COUNT)
    for p in parts[1:]:
        if _split_value(p.header, SPLIT_COUNT) != count:
            raise SplitError(
                f"{first.path.name} and {p.path.name} are parts of different models "
                f"(split.count {count} and {_split_value(p.header, SPLIT_COUNT)})"
            )
    if count != len(parts):
        raise SplitError(f"{len(parts)} parts given, but {first.path.name} says the model has {count}")
    ordered = sorted(parts, key=lambda p: _split_value(p.header, SPLIT_NO) or 0)
    for k, p in enumerate(ordered):
        no = _split_value(p.header, SPLIT_NO)
        if no != k:
            raise SplitError(
                f"{p.path.name} says it is part {(no or 0) + 1} of {count} where part {k + 1} belongs: "
                "parts repeated or from different models"
            )
        m = _SPLIT_NAME.match(p.path.name)
        if m and int(m["no"]) != k + 1:
            raise SplitError(f"{p.path.name} says it is part {k + 1} of {count} (split.no {no})")
    _check_tensors([p.header for p in ordered], [p.path.name for p in ordered])
    kept = sum(len(p.header_bytes) for p in ordered[1:])
    if kept > MAX_KEPT_HEADERS:
        raise SplitError(
            f"the headers of parts 2..{count} take {kept} bytes, over the {MAX_KEPT_HEADERS} a manifest keeps"
        )
    for p in ordered:
        if p.header.alignment > MAX_ALIGNMENT:
            raise GGUFFormatError(f"{p.path.name}: alignment {p.header.alignment} is over the {MAX_ALIGNMENT} allowed")
    return ordered


def _check_tensors(headers: Sequence[GGUFHeader], names: Sequence[str]) -> None:
    """split.tensors.count agrees everywhere and with the tensors found; no
    tensor name appears in two parts."""
    total = sum(len(h.tensors) for h in headers)
    for h, name in zip(headers, names, strict=True):
        said = _split_value(h, SPLIT_TENSORS_COUNT)
        if said is not None and said != total:
            raise SplitError(
                f"{name} says the model has {said} tensors, its parts hold {total}: parts of different models?"
            )
    seen: set[str] = set()
    for h, name in zip(headers, names, strict=True):
        for t in h.tensors:
            if t.name in seen:
                raise SplitError(
                    f"tensor {t.name} appears in two parts ({name} and another): parts of different models?"
                )
            seen.add(t.name)


def model_file_name(first: Path) -> str:
    """NAME.gguf for NAME-00001-of-00005.gguf: the merged file's name."""
    m = _SPLIT_NAME.match(first.name)
    return (m["prefix"] if m else first.stem) + ".gguf"


def check_first(part: SourcePart, header: GGUFHeader, size: int) -> None:
    """Part 1, opened again to be read, is still the file checked before."""
    if size != part.size or header.data_start != part.header.data_start:
        raise FragmenterError(f"{part.path.name} changed while being read")


def split_plan(parts: Sequence[SourcePart], chunk_size: int) -> FilePlan:
    """The plan of every part, in concatenation offsets, with the header of
    each part after the first as a gap (non-zero: kept in extra_bytes).
    Shards never straddle two parts: each part is planned on its own."""
    shards = []
    gaps = []
    base = 0
    for k, part in enumerate(parts):
        try:
            plan = plan_file(part.header, part.size, chunk_size)
        except GGUFFormatError as e:
            raise GGUFFormatError(f"{part.path.name}: {e}") from None
        if k:
            gaps.append(GapPlan(base, part.header.data_start))
        shards += [replace(s, file_offset=s.file_offset + base) for s in plan.shards]
        gaps += [GapPlan(g.file_offset + base, g.size) for g in plan.gaps]
        base += part.size
    return FilePlan(shards, gaps)


def split_tensors(headers: Sequence[GGUFHeader], sizes: Sequence[int]) -> list[tuple[TensorInfo, int]]:
    """Every tensor of every part with its absolute offset in the concatenation."""
    out: list[tuple[TensorInfo, int]] = []
    base = 0
    for h, size in zip(headers, sizes, strict=True):
        out += [(t, base + h.data_start + t.offset) for t in h.tensors]
        base += size
    return out


def check_kept_headers(parts: Sequence[SourcePart], extra: Sequence[tuple[int, bytes]]) -> None:
    """The part headers read in the fragmenting pass (and kept in the
    manifest) are the ones planned from: no part changed in between."""
    kept = dict(extra)
    base = 0
    for k, part in enumerate(parts):
        if k and kept.get(base) != part.header_bytes:
            raise FragmenterError(f"{part.path.name} changed while being read")
        base += part.size


# ---- a fragment folder of a split model -----------------------------------------------


@dataclass(frozen=True)
class PartLayout:
    """One part of a split model, as its fragment folder describes it."""

    entry: PartEntry
    header: GGUFHeader
    header_bytes: bytes

    @property
    def data_base(self) -> int:
        """Offset, in the concatenation, of this part's tensor data."""
        return self.entry.offset + self.header.data_start


def folder_parts(manifest: Manifest, header: GGUFHeader, header_bytes: bytes) -> tuple[PartLayout, ...]:
    """The parts of a split model's folder, headers read back from the
    manifest's extra_bytes and checked; () for a one-file model."""
    if manifest.parts is None:
        return ()
    kept = dict(manifest.extra_bytes)
    out = [PartLayout(manifest.parts[0], header, header_bytes)]
    for entry in manifest.parts[1:]:
        data = kept.get(entry.offset)
        if data is None:
            raise ManifestError(f"manifest: no header kept for part {entry.file_name}")
        try:
            part_header = parse_header(data)
        except GGUFFormatError as e:
            raise ManifestError(f"manifest: header of part {entry.file_name}: {e}") from None
        out.append(PartLayout(entry, part_header, data[: part_header.data_start]))
    count = len(out)
    for k, part in enumerate(out):
        h, name = part.header, part.entry.file_name
        if _split_value(h, SPLIT_NO) != k or _split_value(h, SPLIT_COUNT) != count:
            raise ManifestError(f"manifest: header of {name} does not say it is part {k + 1} of {count}")
        for t in h.tensors:
            if part.data_base + t.offset + t.n_bytes > part.entry.end:
                raise ManifestError(f"manifest: tensor {t.name} runs past the end of {name}")
    try:
        _check_tensors([p.header for p in out], [p.entry.file_name for p in out])
    except SplitError as e:
        raise ManifestError(f"manifest: {e}") from None
    return tuple(out)


def part_tensors(parts: Sequence[PartLayout]) -> list[tuple[TensorInfo, int]]:
    return [(t, p.data_base + t.offset) for p in parts for t in p.header.tensors]


# ---- the merged (unsplit) file ---------------------------------------------------------


def merged_header(parts: Sequence[PartLayout]) -> tuple[bytes, list[tuple[TensorInfo, int]]]:
    """The header of the unsplit model, and its tensors (each with its offset
    in the concatenation) in the order the merged file holds their data.

    As llama.cpp's `gguf-split --merge`: part 1's metadata without the split
    keys (each pair copied byte for byte), then every part's tensor infos with
    offsets recomputed at part 1's alignment, then padding to the alignment.
    """
    first = parts[0]
    alignment = first.header.alignment
    kv = [(s, e) for key, s, e in metadata_spans(first.header_bytes) if key not in SPLIT_KEYS]
    tensors = sorted(part_tensors(parts), key=lambda te: te[1])
    info_of = {t.name: (p, t) for p in parts for t in p.header.tensors}
    out = bytearray(GGUF_MAGIC + struct.pack("<IQQ", first.header.version, len(tensors), len(kv)))
    for s, e in kv:
        out += first.header_bytes[s:e]
    offset = 0
    for t, _ in tensors:
        part, _ = info_of[t.name]
        out += _tensor_info_bytes(part.header_bytes, t) + struct.pack("<Q", offset)
        offset = align(offset + t.n_bytes, alignment)
    out += bytes(align(len(out), alignment) - len(out))
    return bytes(out), tensors


def _tensor_info_bytes(header_bytes: bytes, t: TensorInfo) -> bytes:
    """A tensor info record as written in its part, without its offset: the
    name is copied raw (TensorInfo.name is decoded, perhaps lossily)."""
    pos = t.info_position
    (name_len,) = struct.unpack_from("<Q", header_bytes, pos)
    end = pos + 8 + name_len + 4 + 8 * len(t.dims) + 4
    return header_bytes[pos:end]


def merged_size(tensors: Sequence[tuple[TensorInfo, Any]], header_size: int, alignment: int) -> int:
    """Bytes of the merged file: header, then each tensor padded to the alignment."""
    return header_size + sum(align(t.n_bytes, alignment) for t, _ in tensors)


# ---- what fragmenting reads ----------------------------------------------------------


@dataclass(frozen=True)
class ModelLayout:
    """Where a model's bytes lie: one file, or the concatenation of a split model's parts."""

    file_name: str  # the model's file name (NAME.gguf for a split model)
    file_size: int  # of the file, or of the concatenation
    plan: FilePlan
    data_bases: dict[str, int]  # tensor name -> offset of its (part's) tensor data
    parts: list[SourcePart]  # [] for one file

    @property
    def reads(self) -> list[tuple[Path, int]]:
        """The files to read one after another, with their sizes; [] for one file."""
        return [(p.path, p.size) for p in self.parts]

    def manifest_fields(self, part_shas: Sequence[str]) -> dict[str, Any]:
        """The `build_manifest` arguments a split model adds; {} for one file."""
        if not self.parts:
            return {}
        return {
            "tensors": split_tensors([p.header for p in self.parts], [p.size for p in self.parts]),
            "parts": [
                {"file_name": p.path.name, "file_size": p.size, "file_sha256": sha}
                for p, sha in zip(self.parts, part_shas, strict=True)
            ],
            # Parts after the first may declare their own alignment: the manifest's
            # padding bound must allow the largest.
            "alignment": max(p.header.alignment for p in self.parts),
        }


def model_layout(
    path: Path, header: GGUFHeader, file_size: int, parts: Sequence[SourcePart], chunk_size: int
) -> ModelLayout:
    """`header` and `file_size` are those of `path`, the file (or part 1) as opened for reading."""
    if not parts:
        check_lone_file(header, path)
        bases = {t.name: header.data_start for t in header.tensors}
        return ModelLayout(path.name, file_size, plan_file(header, file_size, chunk_size), bases, [])
    check_first(parts[0], header, file_size)
    bases: dict[str, int] = {}
    base = 0
    for p in parts:
        bases.update((t.name, base + p.header.data_start) for t in p.header.tensors)
        base += p.size
    return ModelLayout(model_file_name(parts[0].path), base, split_plan(parts, chunk_size), bases, list(parts))


def check_holds_metadata(header: GGUFHeader, path: Path) -> None:
    """Parts 2..N of a split model hold only split keys and tensor infos: name part 1."""
    no = _split_value(header, SPLIT_NO)
    count = _split_value(header, SPLIT_COUNT)
    if no and count:
        m = _SPLIT_NAME.match(path.name)
        first = split_file_name(m["prefix"], 1, count) if m else "its first part"
        raise SplitError(f"{path.name} is part {no + 1} of {count} of a split model: its metadata is in {first}")
