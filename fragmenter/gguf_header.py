"""Parse a GGUF header (metadata + tensor infos) from a byte buffer, fast.

gguf-py's `GGUFReader` builds one numpy view per array element and needs
seconds and hundreds of MB for a 262k-token vocabulary. Here numeric arrays are
read in bulk with `numpy.frombuffer`, and string arrays are only walked by
their lengths; their text is decoded on demand (`GGUFArray.strings()`).
Every parsed record keeps its byte position.
"""

from __future__ import annotations

import functools
import struct
from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import GGUFFormatError
from .gguf_spec import (
    ALIGNMENT_KEY,
    DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    NUMPY_DTYPES,
    SCALAR_FORMATS,
    SUPPORTED_VERSIONS,
    ValueType,
)

if TYPE_CHECKING:
    from gguf import GGMLQuantizationType

# Sanity caps, so a corrupt length field fails fast instead of allocating.
_MAX_DIMS = 8
_MAX_STRING = 1 << 30
# Fewest bytes a metadata pair (key of >= 1 byte, type, 1-byte value) and a
# tensor info (empty name, no dims, type, offset) can take: a count that cannot
# fit in the buffer is refused before any loop runs.
_MIN_KV_BYTES = 8 + 1 + 4 + 1
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8


@dataclass(frozen=True)
class GGUFArray:
    """A metadata array. Numeric arrays hold a numpy array; string arrays hold
    the buffer span of their elements and decode lazily."""

    element_type: ValueType
    count: int
    values: np.ndarray | None  # numeric arrays
    _buffer: Any = field(default=None, repr=False)  # string arrays: the header buffer ...
    _start: int = 0  # ... the offset of the first element ...
    # ... and each element's length in bytes (uint64s, from the parse's walk;
    # they follow from the two above, so are not compared or hashed).
    _lengths: Any = field(default=None, repr=False, compare=False)

    def strings(self) -> list[str]:
        """Each element decoded as UTF-8, invalid bytes replaced (U+FFFD)."""
        joined = self.nul_joined()
        if joined is not None:
            # Decoded at once and split at the NULs, not one decode per element (a
            # 262k-token vocabulary: 0.13 -> 0.04 s). A NUL is a one-byte character,
            # so a whole that is valid UTF-8 is valid between its NULs.
            try:
                return joined.tobytes().decode("utf-8").split("\x00")[1:]
            except UnicodeDecodeError:
                pass  # an element is not valid UTF-8: its bytes are replaced one element at a time
        return [b.decode("utf-8", errors="replace") for b in self.raw_strings()]

    def nul_joined(self) -> np.ndarray | None:
        """The elements' bytes end to end, each after a NUL (uint8; element i
        starts at i + 1 + the lengths before it): what a split at NULs takes apart
        in one C-level pass. Made from the header in place, each length field's
        last byte overwritten by the NUL and the rest dropped. None when an
        element holds a NUL, or the array's lengths were not kept."""
        if self._lengths is None or self.count == 0:
            return None
        lengths = np.frombuffer(self._lengths, dtype=np.uint64).astype(np.int64)
        fields = np.cumsum(lengths + 8) - lengths - 8  # each length field, from the first's
        size = int(fields[-1] + 8 + lengths[-1])
        region = np.frombuffer(self._buffer, dtype=np.uint8, count=size, offset=self._start).copy()
        kept = np.ones(size, dtype=bool)
        for k in range(7):
            kept[fields + k] = False
        region[fields + 7] = 0
        joined = region[kept]
        if np.count_nonzero(joined == 0) != self.count:
            return None
        return joined

    def raw_strings(self) -> list[bytes]:
        if self.element_type != ValueType.STRING:
            raise TypeError("not a string array")
        out: list[bytes] = []
        buf, pos = self._buffer, self._start
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(self.count):
            (n,) = unpack(buf, pos)
            pos += 8
            out.append(bytes(buf[pos : pos + n]))
            pos += n
        return out


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # GGUF order: dims[0] is the fastest-varying (row length)
    ggml_type: GGMLQuantizationType
    offset: int  # relative to the start of tensor data
    info_position: int  # byte position of this record in the header

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return n

    @property
    def block_size(self) -> int:
        return _quant_sizes()[self.ggml_type][0]

    @property
    def type_size(self) -> int:
        return _quant_sizes()[self.ggml_type][1]

    @property
    def n_bytes(self) -> int:
        return self.n_elements // self.block_size * self.type_size

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (dims[0] elements): the unit a shard may be cut at."""
        return self.dims[0] // self.block_size * self.type_size if self.dims else self.type_size

    @property
    def numpy_shape(self) -> tuple[int, ...]:
        """Logical shape in numpy (row-major) order."""
        return tuple(reversed(self.dims))


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    metadata: dict[str, Any]  # scalars as Python values, arrays as GGUFArray
    metadata_types: dict[str, ValueType]
    tensors: list[TensorInfo]
    alignment: int
    data_start: int  # absolute offset of tensor data (== size of gguf_header.dat)

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else "unknown"


class _Cursor:
    def __init__(self, buf: Any) -> None:
        self.buf = buf
        self.pos = 0
        self.size = len(buf)

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise GGUFFormatError(f"truncated GGUF header: {what} at byte {self.pos} runs past the end")

    def scalar(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def u32(self, what: str) -> int:
        return int(self.scalar("<I", what))

    def u64(self, what: str) -> int:
        return int(self.scalar("<Q", what))

    def string(self, what: str) -> str:
        n = self.u64(what)
        if n > _MAX_STRING:
            raise GGUFFormatError(f"corrupt GGUF header: {what} claims {n} bytes")
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value_type(self, what: str) -> ValueType:
        t = self.u32(what)
        try:
            return ValueType(t)
        except ValueError:
            raise GGUFFormatError(f"corrupt GGUF header: unknown value type {t} for {what}") from None

    def value(self, vtype: ValueType, what: str) -> Any:
        if vtype == ValueType.STRING:
            return self.string(what)
        if vtype == ValueType.ARRAY:
            return self.array(what)
        return self.scalar(SCALAR_FORMATS[vtype], what)

    def array(self, what: str) -> GGUFArray:
        etype = self.value_type(what)
        count = self.u64(what)
        if etype == ValueType.STRING:
            start = self.pos
            lengths, self.pos = _walk_strings(self.buf, start, self.size, count, what)
            return GGUFArray(etype, count, None, self.buf, start, lengths)
        if etype == ValueType.ARRAY:
            # Nested arrays are legal but unused by any model we know; keep them parsed.
            items = [self.array(what) for _ in range(count)]
            return GGUFArray(etype, count, np.array(items, dtype=object))
        dtype = np.dtype(NUMPY_DTYPES[etype])
        self.need(count * dtype.itemsize, what)
        values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
        self.pos += count * dtype.itemsize
        return GGUFArray(etype, count, values)


# String arrays at least this long are walked with numpy first (below).
WALK_AT_ONCE_FROM = 4096


def _walk_strings(buf: Any, pos: int, end: int, count: int, what: str) -> tuple[Any, int]:
    """The lengths of a string array's `count` elements from `pos` (each a
    uint64 length, then that many bytes), and the position after the last.

    One Python step per element cost 0.07 s for a 262k-token vocabulary. A long
    array is walked in runs found with numpy: the length field of an element
    under 256 bytes has seven zero bytes after its first, so each such position
    is a candidate, and a run is a stretch of candidates each of which ends
    where the next begins, found for all of them at once (in windows of the
    buffer, which may be a whole mapped model). An element the runs do not
    reach (256 bytes or more, or text that looks like a field) is stepped over
    in Python, and the runs go on from where it ends: every element is still
    located from the one before it, as in the plain walk."""
    if count > (end - pos) // 8:
        raise GGUFFormatError(f"truncated GGUF header: array {what} runs past the end")
    if count == 0 or count < WALK_AT_ONCE_FROM:
        return _walk_strings_stepwise(buf, pos, end, count, what)
    unpack = struct.Struct("<Q").unpack_from
    parts: list[Any] = []
    stepped = array("Q")
    runs_left = count // 64 + 16  # then the plain walk: a crafted array of tiny runs must not crawl
    window = _ShortFields(buf, pos, 0)  # empty: made where the first run starts
    done = 0
    while done < count:
        if pos + 8 > end:
            raise GGUFFormatError(f"truncated GGUF header: array {what} runs past the end")
        if runs_left and buf[pos + 1 : pos + 8] == _SEVEN_ZEROS:
            runs_left -= 1
            if not window.holds(pos):
                window = _ShortFields(buf, pos, min(_WINDOW, end - pos))
            lengths, pos = window.run(pos, count - done)
            if stepped:
                parts.append(np.frombuffer(stepped, dtype=np.uint64))
                stepped = array("Q")
            parts.append(lengths)
            done += len(lengths)
        else:
            (n,) = unpack(buf, pos)
            stepped.append(n)
            pos += 8 + n
            done += 1
    if pos > end:
        raise GGUFFormatError(f"truncated GGUF header: array {what} runs past the end")
    if stepped:
        parts.append(np.frombuffer(stepped, dtype=np.uint64))
    return np.concatenate(parts), pos


_SEVEN_ZEROS = bytes(7)
_WINDOW = 1 << 22  # bytes of the buffer searched for candidates at a time


class _ShortFields:
    """The candidates (positions whose next seven bytes are zero) in
    buf[start : start + size], each one's end as an element, and where runs break."""

    def __init__(self, buf: Any, start: int, size: int) -> None:
        self.start, self.last = start, start + size - 8  # a candidate has its 8 bytes inside
        if size < 8:
            self.cands = self.ends = self.breaks = np.zeros(0, dtype=np.int64)
            return
        data = np.frombuffer(buf, dtype=np.uint8, count=size, offset=start)
        zero = data == 0
        short = zero[1 : size - 6].copy()
        for k in range(2, 8):
            short &= zero[k : size - 7 + k]
        found = np.flatnonzero(short)
        self.cands = found + start
        self.ends = self.cands + 8 + data[found]
        self.breaks = np.flatnonzero(self.ends[:-1] != self.cands[1:])  # a run stops at these

    def holds(self, pos: int) -> bool:
        return self.start <= pos <= self.last

    def run(self, pos: int, most: int) -> tuple[np.ndarray, int]:
        """The lengths of the elements of the run from candidate `pos` (at most
        `most`), and where the last ends."""
        i = int(np.searchsorted(self.cands, pos))
        b = int(np.searchsorted(self.breaks, i))
        last = int(self.breaks[b]) if b < len(self.breaks) else len(self.cands) - 1
        take = min(last - i + 1, most)
        lengths = (self.ends[i : i + take] - self.cands[i : i + take] - 8).astype(np.uint64)
        return lengths, int(self.ends[i + take - 1])


def _walk_strings_stepwise(buf: Any, pos: int, end: int, count: int, what: str) -> tuple[Any, int]:
    unpack = struct.Struct("<Q").unpack_from
    lengths = array("Q")
    add = lengths.append
    for _ in range(count):
        if pos + 8 > end:
            raise GGUFFormatError(f"truncated GGUF header: array {what} runs past the end")
        (n,) = unpack(buf, pos)
        add(n)
        pos += 8 + n
    if pos > end:
        raise GGUFFormatError(f"truncated GGUF header: array {what} runs past the end")
    return lengths, pos


@functools.cache  # asked per tensor, and per shard while a model is cut
def _quant_sizes() -> dict[GGMLQuantizationType, tuple[int, int]]:
    # gguf-py is imported when a header is first parsed, not with this module:
    # its package brings in sentencepiece and yaml (~40 ms), and a node that
    # only moves fragments (a pull: the tokenizer is built in another process)
    # never parses one.
    from gguf import GGML_QUANT_SIZES

    return GGML_QUANT_SIZES


def parse_header(buf: Any) -> GGUFHeader:
    """Parse the GGUF header at the start of `buf` (bytes, mmap or memoryview).

    `buf` may be the whole model or just `gguf_header.dat`. Accepts what
    llama.cpp's `gguf_init_from_reader` (ggml/src/gguf.cpp) accepts; raises
    GGUFFormatError with a one-line reason on anything malformed.
    """
    c = _Cursor(buf)
    if c.size < 4 or bytes(buf[:4]) != GGUF_MAGIC:
        raise GGUFFormatError("not a GGUF file (bad magic)")
    c.pos = 4
    version = _check_version(c.u32("version"))
    n_tensors = c.u64("tensor count")
    n_kv = c.u64("metadata count")
    # A count that cannot fit in the buffer is corrupt (or the file is cut short);
    # llama.cpp has no smaller cap than that (gguf.cpp: n_tensors, n_kv in [0, SIZE_MAX/...]).
    if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES > c.size - c.pos:
        raise GGUFFormatError(
            f"corrupt or truncated GGUF header: {n_tensors} tensors and {n_kv} metadata keys "
            f"cannot fit in {c.size} bytes"
        )

    metadata: dict[str, Any] = {}
    types: dict[str, ValueType] = {}
    for i in range(n_kv):
        key = c.string(f"metadata key #{i}")
        # llama.cpp refuses empty and repeated keys (gguf.cpp, "is empty" / "duplicate key").
        if not key:
            raise GGUFFormatError(f"corrupt GGUF header: metadata key #{i} is empty")
        if key in metadata:
            raise GGUFFormatError(f"corrupt GGUF header: duplicate metadata key {key!r}")
        vtype = c.value_type(key)
        metadata[key] = c.value(vtype, key)
        types[key] = vtype
    alignment = _alignment(metadata, types)

    from gguf import GGMLQuantizationType  # see _quant_sizes

    quant_sizes = _quant_sizes()

    tensors: list[TensorInfo] = []
    for i in range(n_tensors):
        position = c.pos
        name = c.string(f"tensor name #{i}")
        n_dims = c.u32(f"dims of {name}")
        if n_dims > _MAX_DIMS:
            raise GGUFFormatError(f"corrupt GGUF header: tensor {name} has {n_dims} dimensions")
        dims = tuple(c.u64(f"dims of {name}") for _ in range(n_dims))
        raw_type = c.u32(f"type of {name}")
        try:
            ggml_type = GGMLQuantizationType(raw_type)
        except ValueError:
            raise GGUFFormatError(f"tensor {name} has unknown type {raw_type}") from None
        if ggml_type not in quant_sizes:
            raise GGUFFormatError(f"tensor {name} has unsupported type {ggml_type.name}")
        offset = c.u64(f"offset of {name}")
        info = TensorInfo(name, dims, ggml_type, offset, position)
        row = dims[0] if dims else 1  # a 0-dimensional tensor has one element (ggml: ne[0] = 1)
        if row % info.block_size:
            raise GGUFFormatError(f"tensor {name}: row of {row} is not a multiple of the {ggml_type.name} block")
        tensors.append(info)
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise GGUFFormatError("corrupt GGUF header: duplicate tensor names")

    if tensors:
        # Tensor data starts at the next multiple of the alignment, which must lie
        # within the file (gguf.cpp: `n_tensors > 0 && !gr.seek(... GGML_PAD(...))`).
        data_start = align(c.pos, alignment)
        if data_start > c.size:
            raise GGUFFormatError(
                f"truncated GGUF: the file ends at byte {c.size}, before its tensor data (at byte {data_start})"
            )
    else:
        # No tensors: llama.cpp skips that seek, so the padding is optional (its
        # ggml-vocab-*.gguf files end right after the metadata). Whatever padding
        # there is stays in the header, so files that have it are cut as before.
        data_start = min(align(c.pos, alignment), c.size)
    return GGUFHeader(version, metadata, types, tensors, alignment, data_start)


def metadata_spans(buf: Any) -> list[tuple[str, int, int]]:
    """(key, start, end) of each metadata pair's bytes in a header already
    accepted by `parse_header`: lets a writer copy pairs exactly as encoded."""
    c = _Cursor(buf)
    c.pos = 16
    n_kv = c.u64("metadata count")
    spans: list[tuple[str, int, int]] = []
    for i in range(n_kv):
        start = c.pos
        key = c.string(f"metadata key #{i}")
        c.value(c.value_type(key), key)
        spans.append((key, start, c.pos))
    return spans


def _check_version(version: int) -> int:
    """The versions llama.cpp reads (gguf.cpp, `gguf_init_from_reader`): 2 and 3;
    v2 and v3 lay out little-endian files identically."""
    if version in SUPPORTED_VERSIONS:
        return version
    if version == 1:
        raise GGUFFormatError(
            "GGUF v1 is not supported (llama.cpp dropped it too): convert the model again with a current llama.cpp"
        )
    if version and version & 0xFFFF == 0:  # e.g. 3 written big-endian reads as 0x03000000
        raise GGUFFormatError(
            f"unsupported GGUF version {version:#010x}: a big-endian file? (only little-endian GGUF is supported)"
        )
    raise GGUFFormatError(f"unsupported GGUF version {version} (supported: 2, 3)")


def _alignment(metadata: dict[str, Any], types: dict[str, ValueType]) -> int:
    """`general.alignment`, as llama.cpp requires it: a uint32 that is a power of two."""
    if ALIGNMENT_KEY not in metadata:
        return DEFAULT_ALIGNMENT
    if types[ALIGNMENT_KEY] != ValueType.UINT32:
        raise GGUFFormatError(
            f"corrupt GGUF header: {ALIGNMENT_KEY} must be a uint32, not {types[ALIGNMENT_KEY].name.lower()}"
        )
    alignment = int(metadata[ALIGNMENT_KEY])
    if alignment == 0 or alignment & (alignment - 1):
        raise GGUFFormatError(f"corrupt GGUF header: {ALIGNMENT_KEY} {alignment} is not a power of two")
    return alignment


def check_tensor_data(header: GGUFHeader, file_size: int) -> None:
    """Refuse a model whose tensor data runs past the end of the file, as
    llama.cpp's loader does even for a vocab-only load (llama-model-loader.h,
    `llama_tensor_weight`: "data is not within the file bounds")."""
    for t in header.tensors:
        end = header.data_start + t.offset + t.n_bytes
        if end > file_size:
            raise GGUFFormatError(
                f"tensor {t.name} runs past the end of the file ({end} > {file_size} bytes): truncated?"
            )


def align(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment
