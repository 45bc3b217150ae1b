"""`manifest.json`: building ours, serializing it deterministically, and reading
both ours and the existing tool's (see `shared/seed/SEED_FORMAT.md`).

Readers get a `Manifest` whose fragments always carry `file_offset` and
`checksum`; `sha256` is None for the existing tool's manifests, which only
have the 16-hex prefix.

Format "gguf-swarm/2" adds verified blocks (`protocol/blocks.py`): top-level
`block_size` and `header_block_root`, and a `block_root` per fragment. Every
"gguf-swarm/1" manifest stays valid and simply has no block roots; a manifest
has block roots for all its files or for none.
"""

from __future__ import annotations

import base64
import json
import math
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring as _encode_str  # what json.dumps uses without ensure_ascii
from pathlib import Path
from typing import Any

import numpy as np

from protocol.blocks import BLOCK_SIZE

from .errors import ManifestError
from .fragment_table import FragmentTable
from .gguf_header import GGUFArray, GGUFHeader, TensorInfo
from .gguf_spec import ValueType
from .naming import TensorRole, fragment_id, tensor_role

FORMAT = "gguf-swarm/2"
OUR_FORMATS = ("gguf-swarm/1", FORMAT)  # v2 only adds optional block fields, so v1 stays ours
MANIFEST_NAME = "manifest.json"
HEADER_NAME = "gguf_header.dat"
_SMALL_ARRAY = 64  # arrays longer than this are summarized; they live in the header
# Bounds on a manifest's block_size: smaller blocks make digest lists and
# request counts explode, larger ones make a corrupt block expensive to refetch.
MIN_BLOCK_SIZE = 16 * 1024
MAX_BLOCK_SIZE = 16 * 1024 * 1024
# The largest alignment a manifest may declare: `_check_layout` lets a file hold
# up to alignment * (fragments + 1) bytes of zero padding, so this bounds how much
# a manifest can inflate a download. GGUF allows any power of two up to 2**31.
MAX_ALIGNMENT = 1 << 24
# A split model (`NAME-0000k-of-0000N.gguf`) has at most this many parts; the
# 5-digit names allow 99,999, llama.cpp's gguf-split writes far fewer.
MAX_PARTS = 10_000
MAX_PART_NAME = 255  # bytes a file name may take on common file systems


@dataclass(frozen=True, slots=True)  # slots: a seed holds ~40,000 of these per large model
class FragmentEntry:
    fragment_id: str
    tensor_name: str
    tensor_type: str
    shape: tuple[int, ...]
    shard_index: int
    total_shards: int
    size: int
    file_offset: int
    data_offset: int  # absolute offset of the whole tensor
    checksum: str  # first 16 hex of sha256
    sha256: str | None  # None for the existing tool's manifests
    block_root: str | None = None  # None before gguf-swarm/2 (v1 and the existing tool's)

    @property
    def file_name(self) -> str:
        return self.fragment_id + ".dat"

    def matches_digest(self, sha256_hex: str) -> bool:
        if self.sha256 is not None:
            return sha256_hex == self.sha256
        return sha256_hex[:16] == self.checksum


@dataclass(frozen=True)
class PartEntry:
    """One file of a split model: the manifest describes their concatenation."""

    file_name: str
    offset: int  # where the part starts in the concatenation of all parts
    file_size: int
    file_sha256: str

    @property
    def end(self) -> int:
        return self.offset + self.file_size


@dataclass(frozen=True)
class Manifest:
    raw: dict[str, Any]  # the top-level fields, all but "fragments"
    model_name: str
    fragments: Sequence[FragmentEntry]  # in file order (a FragmentTable once parsed)
    header_size: int
    file_size: int | None  # None when unknown (existing tool)
    file_sha256: str | None
    alignment: int | None
    extra_bytes: list[tuple[int, bytes]]  # non-zero bytes outside header and tensors
    block_size: int | None = None  # None when absent (before gguf-swarm/2)
    header_block_root: str | None = None
    parts: tuple[PartEntry, ...] | None = None  # None for a model in one file

    @property
    def is_ours(self) -> bool:
        return self.raw.get("format") in OUR_FORMATS

    @property
    def file_name(self) -> str:
        name = self.raw.get("file_name")
        return name if isinstance(name, str) else self.model_name + ".gguf"

    @property
    def total_bytes(self) -> int:
        if isinstance(self.fragments, FragmentTable):
            return self.fragments.total_size
        return sum(f.size for f in self.fragments)


# ---- building ---------------------------------------------------------------


def _json_scalar(value: Any, vtype: ValueType) -> Any:
    if vtype == ValueType.FLOAT32:
        value = float(str(np.float32(value)))  # shortest decimal of the float32
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def json_metadata(header: GGUFHeader) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in header.metadata.items():
        vtype = header.metadata_types[key]
        if isinstance(value, GGUFArray):
            et = value.element_type
            if value.count > _SMALL_ARRAY or et == ValueType.ARRAY:
                out[key] = {"array_of": et.name.lower(), "length": value.count, "in": HEADER_NAME}
            elif et == ValueType.STRING:
                out[key] = value.strings()
            else:
                out[key] = [_json_scalar(v, et) for v in value.values.tolist()]  # type: ignore[union-attr]
        else:
            out[key] = _json_scalar(value, vtype)
    return out


def model_config(header: GGUFHeader, metadata: dict[str, Any]) -> dict[str, Any]:
    """Real numbers from the model's own `{arch}.*` keys; None where the model has none."""
    arch = header.architecture

    def get(*keys: str) -> Any:
        for k in keys:
            if f"{arch}.{k}" in metadata:
                return metadata[f"{arch}.{k}"]
        return None

    tokens = header.metadata.get("tokenizer.ggml.tokens")
    vocab = get("vocab_size")
    if vocab is None and isinstance(tokens, GGUFArray):
        vocab = tokens.count
    n_heads = get("attention.head_count")
    return {
        "dim": get("embedding_length"),
        "hidden_dim": get("feed_forward_length"),
        "n_layers": get("block_count"),
        "n_heads": n_heads,
        "n_kv_heads": get("attention.head_count_kv") if get("attention.head_count_kv") is not None else n_heads,
        "vocab_size": vocab,
        "norm_eps": get("attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon"),
        "rope_freq_base": get("rope.freq_base"),
        "context_length": get("context_length"),
        "head_dim": get("attention.key_length"),
        "expert_count": get("expert_count"),
        "expert_used_count": get("expert_used_count"),
    }


def dtype_name(tensor_type: str) -> str:
    return {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}.get(tensor_type, "uint8")


def serialize(manifest: dict[str, Any]) -> bytes:
    """Deterministic bytes: the model CID is the hash of exactly these."""
    return b"".join(serialize_chunks(manifest))


def _dumps(value: Any) -> str:
    return json.dumps(value, indent=1, ensure_ascii=False, allow_nan=False)


_STREAM_BATCH = 1024  # fragment entries per yielded chunk


def serialize_chunks(manifest: dict[str, Any]) -> Iterator[bytes]:
    """`serialize`'s bytes in pieces, byte for byte what
    `json.dumps(manifest, indent=1, ensure_ascii=False, allow_nan=False) + "\\n"`
    gives, without ever holding the whole text: a 40,000-fragment manifest is
    30 MB, and json's pure-Python indenting encoder holds a list of a few
    million small strings on the way. Each top-level field is dumped on its
    own (json indents it the same inside the whole); the fragment list, the
    bulk, is encoded entry by entry (`_entry_json`) and may be any iterable
    of entry dicts, such as a `FragmentEntries`."""
    if not isinstance(manifest, dict) or not manifest or any(type(k) is not str for k in manifest):
        yield (_dumps(manifest) + "\n").encode("utf-8")
        return
    sep = "{\n"
    for key, value in manifest.items():
        if key != "fragments" or not isinstance(value, (list, FragmentEntries)):
            yield (sep + _dumps({key: value})[2:-2]).encode("utf-8")
        elif not len(value):
            yield (sep + ' "fragments": []').encode("utf-8")
        else:
            batch = [sep + ' "fragments": [\n']
            first = True
            for text in value.encoded() if isinstance(value, FragmentEntries) else map(_entry_json, value):
                if not first:
                    batch.append(",\n")
                first = False
                batch.append(text)
                if len(batch) >= 2 * _STREAM_BATCH:
                    yield "".join(batch).encode("utf-8")
                    batch = []
            batch.append("\n ]")
            yield "".join(batch).encode("utf-8")
        sep = ",\n"
    yield b"\n}\n"


def _entry_json(entry: Any) -> str:
    """One fragment entry as json.dumps(indent=1) writes it at depth 2 (an
    item of the top-level "fragments" list); plain values are encoded here,
    anything else by json itself."""
    if type(entry) is not dict or not entry or any(type(key) is not str for key in entry):
        return "  " + _dumps(entry).replace("\n", "\n  ")
    return "  {\n   " + ",\n   ".join(_encode_str(k) + ": " + _json_value(v) for k, v in entry.items()) + "\n  }"


def _json_value(value: Any, indent: str = "\n   ") -> str:
    """`value` as json.dumps(indent=1) writes it as a member of an object
    whose members start on `indent` (a newline and their indentation)."""
    kind = type(value)
    if kind is str:
        return _encode_str(value)
    if kind is int:
        return int.__repr__(value)
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if kind is list and value and all(type(v) is int for v in value):
        return "[" + indent + " " + ("," + indent + " ").join(map(int.__repr__, value)) + indent + "]"
    return _dumps(value).replace("\n", indent)


def encode_extra(extra: list[tuple[int, bytes]]) -> list[dict[str, Any]]:
    return [{"file_offset": off, "base64": base64.b64encode(data).decode("ascii")} for off, data in extra]


# ---- reading ----------------------------------------------------------------


MAX_MANIFEST_BYTES = 128 << 20  # a 40,000-fragment manifest is ~30 MB
MAX_NUMBER = 1 << 50  # no size or offset beyond 1 PiB, whatever a manifest says
MAX_ID_CHARS = 200
_RESERVED = {HEADER_NAME.lower(), MANIFEST_NAME.lower(), "tokenizer.json", "tokenizer.model"}


def load_manifest_json(data: bytes, where: str = "manifest", entries: bool = False) -> Any:
    """Untrusted manifest bytes -> JSON, or one clear ManifestError: bounded in
    size, no NaN or Infinity, no nesting deep enough to exhaust the stack.
    The gate every manifest passes, from a peer or from the data dir.

    `entries`: each fragment entry that parses on its own becomes a
    FragmentEntry as it is decoded (what `parse_manifest` would make of it), so
    the JSON dicts of a 40,000-fragment manifest are never all held at once
    (93 MB at the peak, against ~45 MB); one that needs the manifest's other
    keys, or is malformed, stays a dict for `parse_manifest` to judge."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{where}: manifest of {len(data)} bytes is over the {MAX_MANIFEST_BYTES}-byte cap")

    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not a number a manifest may hold")

    try:
        return json.loads(data, parse_constant=no_constant, object_hook=_early_entry if entries else None)
    except RecursionError:
        raise ManifestError(f"{where}: manifest nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ManifestError(f"{where}: not valid JSON ({str(e)[:200]})") from None


def read_manifest(folder: Path) -> Manifest:
    path = folder / MANIFEST_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(f"{path}: no manifest.json in this folder") from None
    except OSError as e:
        raise ManifestError(f"{path}: unreadable manifest ({e.strerror or e})") from None
    return parse_manifest_bytes(data, str(path))


def _early_entry(obj: dict[str, Any]) -> Any:
    """`load_manifest_json(entries=True)`'s hook: a fragment entry that carries
    its own file_offset, parsed at once; anything else as it came."""
    if "fragment_id" not in obj or "file_offset" not in obj:
        return obj
    try:
        return _parse_fragment(obj, False, None)
    except (KeyError, TypeError, ValueError, AttributeError):
        return obj  # parse_manifest raises the error, in its words


def parse_manifest_bytes(data: bytes, where: str = "manifest") -> Manifest:
    """`parse_manifest(load_manifest_json(data))`, without the peak of every
    fragment entry held as a JSON dict (a pull, the index of a data dir)."""
    return parse_manifest(load_manifest_json(data, where, entries=True), where)


def parse_manifest(raw: Any, where: str = "manifest") -> Manifest:
    """Validate and normalize a manifest dict (ours or the existing tool's); its
    fragment entries may come parsed already (`parse_manifest_bytes`)."""
    if not isinstance(raw, dict) or not isinstance(raw.get("fragments"), list):
        raise ManifestError(f"{where}: not a fragment manifest (no 'fragments' list)")
    ours = raw.get("format") in OUR_FORMATS
    chunk = raw.get("chunk_size")
    model = raw.get("model_name")
    if not isinstance(model, str):
        raise ManifestError(f"{where}: no model_name")
    try:
        fragments = [f if isinstance(f, FragmentEntry) else _parse_fragment(f, ours, chunk) for f in raw["fragments"]]
        if ours and any(f.sha256 is None for f in fragments):
            raise KeyError("sha256")  # as _parse_fragment says it of one of ours without it
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ManifestError(f"{where}: malformed fragment entry ({e})") from None
    ids = [f.fragment_id for f in fragments]
    if len(set(ids)) != len(ids):
        raise ManifestError(f"{where}: duplicate fragment ids")
    fragments.sort(key=lambda f: (f.file_offset, f.shard_index))
    try:
        header_size = _number(raw.get("header_size"), "header_size")
        extra = [
            (_number(e["file_offset"], "extra_bytes offset"), base64.b64decode(e["base64"], validate=True))
            for e in raw.get("extra_bytes", [])
        ]
        if ours:
            for key in ("file_size", "file_sha256", "alignment"):
                if key not in raw:
                    raise ValueError(f"missing {key}")
            _number(raw["file_size"], "file_size")
            _hex(raw["file_sha256"], 64, "file_sha256")
            if not 1 <= _number(raw["alignment"], "alignment") <= MAX_ALIGNMENT:
                raise ValueError("alignment out of range")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ManifestError(f"{where}: malformed manifest ({e})") from None
    _check_layout(raw, fragments, header_size, extra, ours, where)
    parts = _parse_parts(raw, ours, header_size, fragments, where)
    block_size, header_block_root = _parse_blocks(raw, fragments, where)
    return Manifest(
        # Without its fragment list: held once as `fragments` (the JSON dicts
        # of a 40,000-fragment manifest take 64 MB).
        raw={key: value for key, value in raw.items() if key != "fragments"},
        model_name=model,
        fragments=FragmentTable(fragments),
        header_size=header_size,
        file_size=raw.get("file_size") if ours else None,
        file_sha256=raw.get("file_sha256") if ours else None,
        alignment=raw.get("alignment") if ours else None,
        extra_bytes=extra,
        block_size=block_size,
        header_block_root=header_block_root,
        parts=parts,
    )


def _parse_parts(
    raw: dict[str, Any], ours: bool, header_size: int, fragments: list[FragmentEntry], where: str
) -> tuple[PartEntry, ...] | None:
    """The files of a split model, in order: safe names, sizes adding up to
    file_size, the header within part 1 and no fragment straddling two parts
    (assembly cuts the concatenation back into files at those boundaries)."""
    if "parts" not in raw:
        return None
    try:
        if not ours:
            raise ValueError("only gguf-swarm manifests may list parts")
        items = raw["parts"]
        if not isinstance(items, list) or not 2 <= len(items) <= MAX_PARTS:
            raise ValueError(f"parts is not a list of 2 to {MAX_PARTS} files")
        parts: list[PartEntry] = []
        offset = 0
        for item in items:
            size = _number(item["file_size"], "part file_size")
            if size == 0:
                raise ValueError("a part of 0 bytes")
            parts.append(
                PartEntry(
                    _safe_part_name(item["file_name"]), offset, size, _hex(item["file_sha256"], 64, "part file_sha256")
                )
            )
            offset += size
        names = {p.file_name.lower() for p in parts}  # case-insensitive file systems
        if len(names) != len(parts):
            raise ValueError("a part file name appears twice")
        if offset != raw["file_size"]:
            raise ValueError(f"part sizes add up to {offset}, not file_size {raw['file_size']}")
        if header_size > parts[0].file_size:
            raise ValueError("header_size is larger than the first part")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ManifestError(f"{where}: malformed parts ({e})") from None
    k = 0
    for f in fragments:  # sorted by file_offset, within file_size (`_check_layout`)
        while k < len(parts) - 1 and f.file_offset >= parts[k].end:
            k += 1
        if f.file_offset + f.size > parts[k].end:
            raise ManifestError(f"{where}: fragment {f.fragment_id} straddles parts {k + 1} and {k + 2}")
    return tuple(parts)


def _safe_part_name(name: Any) -> str:
    """A part's file name: written into the output folder, so a bare name."""
    if not isinstance(name, str) or not 0 < len(name.encode("utf-8")) <= MAX_PART_NAME:
        raise ValueError(f"bad part file_name {str(name)[:60]!r}")
    if name.startswith(".") or any(c in "/\\" or ord(c) < 32 or ord(c) == 127 for c in name):
        raise ValueError(f"part file_name {name[:60]!r} is not a safe file name")
    return name


def _parse_blocks(raw: dict[str, Any], fragments: list[FragmentEntry], where: str) -> tuple[int | None, str | None]:
    """(block_size, header_block_root), validated. Block roots come for every
    file or none: a peer cuts each file by whether it has a root, and a
    half-upgraded manifest would mean a half-upgraded writer."""
    try:
        header_root = _hex(raw["header_block_root"], 64, "header_block_root") if "header_block_root" in raw else None
    except ValueError as e:
        raise ManifestError(f"{where}: {e}") from None
    block_size = raw.get("block_size")
    if block_size is not None and not _valid_block_size(block_size):
        raise ManifestError(
            f"{where}: block_size {block_size!r} is not a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}"
        )
    with_root = sum(f.block_root is not None for f in fragments) + (header_root is not None)
    if with_root == 0:
        return block_size, None
    if with_root != len(fragments) + 1:
        raise ManifestError(f"{where}: block roots on {with_root} of {len(fragments) + 1} files, not all or none")
    if block_size is None:
        raise ManifestError(f"{where}: block roots but no block_size")
    return block_size, header_root


def _valid_block_size(value: Any) -> bool:
    return (
        type(value) is int  # not bool, not float
        and MIN_BLOCK_SIZE <= value <= MAX_BLOCK_SIZE
        and value & (value - 1) == 0
    )


# Checked by regular expression: character loops in Python were half the
# start-up time of a node holding a 40,000-fragment model.
_LOWER_HEX = re.compile("[0-9a-f]*")
_UNSAFE_IN_ID = re.compile(r"[/\\\x00-\x1f\x7f]")


def _hex(value: Any, length: int, name: str) -> str:
    if type(value) is not str or len(value) != length or not _LOWER_HEX.fullmatch(value):
        raise ValueError(f"{name} is not {length} hex digits")
    return value


def _number(value: Any, name: str) -> int:
    """A whole number from 0 to MAX_NUMBER: not a float, a string or a bool."""
    # type() is int: one test that also refuses bool (an int subclass); called
    # ~7 times per fragment entry, 290,000 times per 40,000-fragment manifest.
    if type(value) is int and 0 <= value <= MAX_NUMBER:
        return value
    raise ValueError(f"{name} is not a whole number from 0 to {MAX_NUMBER}: {str(value)[:40]!r}")


def _safe_id(fid: Any) -> str:
    """A fragment id that names a file inside the folder and nothing else."""
    if not isinstance(fid, str) or not 0 < len(fid) <= MAX_ID_CHARS:
        raise ValueError(f"bad fragment_id {str(fid)[:60]!r}")
    if fid.startswith(".") or _UNSAFE_IN_ID.search(fid):
        raise ValueError(f"fragment_id {fid[:60]!r} is not a safe file name")
    if (fid + ".dat").lower() in _RESERVED:
        raise ValueError(f"fragment_id {fid!r} would overwrite {fid}.dat, a name the folder reserves")
    return fid


def _check_layout(
    raw: dict[str, Any],
    fragments: list[FragmentEntry],
    header_size: int,
    extra: list[tuple[int, bytes]],
    ours: bool,
    where: str,
) -> None:
    """Fragments follow the header without overlapping; in our manifests they
    end within file_size, and file_size leaves no more room than alignment
    padding (and the bytes kept in extra_bytes): assembly re-creates the gaps
    as zeros, so an inflated file_size must not turn a small download into a
    huge file."""
    pos = header_size
    gaps = 0
    for f in fragments:  # sorted by file_offset
        if f.file_offset < pos:
            raise ManifestError(f"{where}: fragment {f.fragment_id} overlaps the header or the fragment before it")
        gaps += f.file_offset - pos
        pos = f.file_offset + f.size
    if not ours:
        return
    file_size = raw["file_size"]
    if pos > file_size:
        raise ManifestError(f"{where}: fragments run past file_size ({pos} > {file_size})")
    gaps += file_size - pos
    kept = sum(len(data) for _, data in extra)
    if any(off + len(data) > file_size for off, data in extra):
        raise ManifestError(f"{where}: extra_bytes past file_size")
    padding = raw["alignment"] * (len(fragments) + 1)
    if gaps - kept > padding:
        raise ManifestError(
            f"{where}: file_size leaves {gaps - kept} bytes of zeros outside the fragments "
            f"(at most {padding} of alignment padding)"
        )


_SHAPES: dict[tuple[int, ...], tuple[int, ...]] = {}


def _shared_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(_SHAPES) > 65536:
        _SHAPES.clear()  # bounded: shapes come from untrusted manifests
    return _SHAPES.setdefault(shape, shape)


def _parse_fragment(f: dict[str, Any], ours: bool, chunk: Any) -> FragmentEntry:
    fid = _safe_id(f["fragment_id"])
    shard = _number(f["shard_index"], "shard_index")
    size = _number(f["size_bytes"], "size_bytes")
    data_offset = _number(f["data_offset"], "data_offset")
    if "file_offset" in f:
        file_offset = _number(f["file_offset"], "file_offset")
    elif isinstance(chunk, int) and not isinstance(chunk, bool) and 0 < chunk <= MAX_NUMBER:
        file_offset = data_offset + shard * chunk  # the existing tool cuts at fixed chunks
    else:
        raise ValueError(f"{fid}: no file_offset and no chunk_size")
    sha = _hex(f["sha256"], 64, "sha256") if ours or "sha256" in f else None
    root = _hex(f["block_root"], 64, "block_root") if "block_root" in f else None
    checksum = _hex(f.get("checksum") or (sha or "")[:16], 16, "checksum")
    if size < 0 or file_offset < 0 or shard < 0:
        raise ValueError(f"{fid}: negative size or offset")
    return FragmentEntry(
        fragment_id=fid,
        # Interned: every shard of a tensor repeats these.
        tensor_name=sys.intern(str(f.get("tensor_name", ""))),
        tensor_type=sys.intern(str(f.get("tensor_type", ""))),
        shape=_shared_shape(tuple(_number(d, "shape") for d in f.get("shape", ()))),
        shard_index=shard,
        total_shards=_number(f.get("total_shards", 1), "total_shards"),
        size=size,
        file_offset=file_offset,
        data_offset=data_offset,
        checksum=checksum,
        sha256=sha,
        block_root=root,
    )


# ---- building ours ---------------------------------------------------------


def fragment_entry(
    model: str, shard: Any, sha: str, block_root: str, used: set[str], data_start: int
) -> dict[str, Any]:
    """The manifest entry of one written shard (a `plan.Shard`) whose bytes
    hash to `sha` and have block root `block_root`; `used` holds the fragment
    ids taken so far and gains this one."""
    role = tensor_role(shard.tensor.name)
    fid, component = _fragment_name(model, shard, role, sha, used)
    return _entry_dict(model, shard, role, fid, component, sha, block_root, data_start)


def _fragment_name(model: str, shard: Any, role: TensorRole, sha: str, used: set[str]) -> tuple[str, str]:
    """(fragment id, component) of a shard; `used` gains the id."""
    t = shard.tensor
    component = role.component
    fid = fragment_id(model, role.layer_index, component, shard.shard_index, sha[:16])
    if fid in used:
        # Two tensors of one layer that share a component (X.weight / X.bias)
        # with equal bytes: the existing scheme collides; keep the full name.
        component = t.name.split(".", 2)[-1] if t.name.startswith("blk.") else t.name
        fid = fragment_id(model, role.layer_index, component, shard.shard_index, sha[:16])
        n = 1
        while fid in used:
            n += 1
            fid = fragment_id(model, role.layer_index, f"{component}.{n}", shard.shard_index, sha[:16])
    used.add(fid)
    return fid, component


def _entry_dict(
    model: str, shard: Any, role: TensorRole, fid: str, component: str, sha: str, block_root: str, data_start: int
) -> dict[str, Any]:
    t = shard.tensor
    type_name = t.ggml_type.name
    return {
        "fragment_id": fid,
        "model_name": model,
        "fragment_type": role.fragment_type,
        "layer_index": role.layer_index,
        "component": component,
        "expert_index": None,
        "shard_index": shard.shard_index,
        "total_shards": shard.total_shards,
        "shape": list(t.dims),
        "dtype": dtype_name(type_name),
        "size_bytes": shard.size,
        "tensor_name": t.name,
        "tensor_type": type_name,
        "checksum": sha[:16],
        "is_always_active": role.is_always_active,
        "data_offset": data_start + t.offset,
        "file_offset": shard.file_offset,
        "sha256": sha,
        "block_root": block_root,
        "cid": _cid_from_hex(sha),
    }


class FragmentEntries:
    """The fragment entries of a manifest being built, held compactly: a
    40,000-fragment model's entry dicts take ~100 MB, their rows a tenth of
    that. Iterating yields the dicts `fragment_entry` would have built, one at
    a time (`serialize_chunks` streams them into the manifest)."""

    def __init__(self, model: str) -> None:
        self.model = model
        self._rows: list[tuple[Any, str, str, str, str, int]] = []  # shard, id, component, sha, root, data start
        self._used: set[str] = set()
        self._roles: dict[str, TensorRole] = {}
        self.total_shards: dict[str, int] = {}  # tensor name -> shards

    def add(self, shard: Any, sha: str, block_root: str, data_start: int) -> str:
        """Add the entry of a written shard (see `fragment_entry`); return its fragment id."""
        name = shard.tensor.name
        role = self._roles.get(name)
        if role is None:
            role = self._roles[name] = tensor_role(name)
        fid, component = _fragment_name(self.model, shard, role, sha, self._used)
        self._rows.append((shard, fid, component, sha, block_root, data_start))
        self.total_shards[name] = shard.total_shards
        return fid

    def set_block_root(self, index: int, block_root: str) -> None:
        shard, fid, component, sha, _, data_start = self._rows[index]
        self._rows[index] = (shard, fid, component, sha, block_root, data_start)

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        roles = self._roles
        for shard, fid, component, sha, root, data_start in self._rows:
            yield _entry_dict(self.model, shard, roles[shard.tensor.name], fid, component, sha, root, data_start)

    def encoded(self) -> Iterator[str]:
        """Each entry as `_entry_json` encodes the dict `__iter__` gives, with
        what is the same for every shard of a tensor encoded once."""
        value = _json_value
        fixed: dict[int, tuple[str, str, str, str, int]] = {}  # id(tensor) -> its parts
        for shard, fid, component, sha, root, data_start in self._rows:
            t = shard.tensor
            parts = fixed.get(id(t))  # the rows hold every tensor: ids are not reused meanwhile
            if parts is None:
                role = self._roles[t.name]
                type_name = t.ggml_type.name
                parts = fixed[id(t)] = (
                    f',\n   "model_name": {value(self.model)},\n   "fragment_type": {value(role.fragment_type)}'
                    f',\n   "layer_index": {value(role.layer_index)},\n   "component": ',
                    f',\n   "shape": {value(list(t.dims))},\n   "dtype": {value(dtype_name(type_name))}'
                    ',\n   "size_bytes": ',
                    f',\n   "tensor_name": {value(t.name)},\n   "tensor_type": {value(type_name)},\n   "checksum": ',
                    f',\n   "is_always_active": {value(role.is_always_active)},\n   "data_offset": ',
                    t.offset,
                )
            tensor_head, shape_dtype, names, active, offset = parts
            yield (
                '  {\n   "fragment_id": '
                + value(fid)
                + tensor_head
                + value(component)
                + ',\n   "expert_index": null,\n   "shard_index": '
                + value(shard.shard_index)
                + ',\n   "total_shards": '
                + value(shard.total_shards)
                + shape_dtype
                + value(shard.size)
                + names
                + value(sha[:16])
                + active
                + value(data_start + offset)
                + ',\n   "file_offset": '
                + value(shard.file_offset)
                + ',\n   "sha256": '
                + value(sha)
                + ',\n   "block_root": '
                + value(root)
                + ',\n   "cid": '
                + value(_cid_from_hex(sha))
                + "\n  }"
            )


_B32 = "abcdefghijklmnopqrstuvwxyz234567"
_B32_PAIRS = [a + b for a in _B32 for b in _B32]  # every 10 bits
_CID_PREFIX = bytes([0x01, 0x55, 0x12, 0x20])  # as protocol.cid: CIDv1, raw, sha2-256, 32 bytes


def _cid_from_hex(sha256_hex: str) -> str:
    """`protocol.cid.cid_from_hex`, without base64's per-5-byte loop (a
    noticeable share of fragmenting into tens of thousands of fragments):
    36 bytes, zero-padded to 40, are 32 pairs of base32 digits, the last 6
    digits being padding."""
    n = int.from_bytes(_CID_PREFIX + bytes.fromhex(sha256_hex) + bytes(4), "big")
    pairs = _B32_PAIRS
    return "b" + "".join([pairs[(n >> s) & 1023] for s in range(310, -1, -10)])[:58]


def build_manifest(
    header: GGUFHeader,
    file_name: str,
    file_size: int,
    file_sha: str,
    header_sha: str,
    header_block_root: str,
    chunk_size: int,
    entries: list[dict[str, Any]] | FragmentEntries,
    extra: list[tuple[int, bytes]],
    tensors: Sequence[tuple[TensorInfo, int]] | None = None,
    parts: list[dict[str, Any]] | None = None,
    alignment: int | None = None,
) -> dict[str, Any]:
    """`tensors` (each with its absolute data offset), `parts` and `alignment`
    are given for a split model: `header` is then part 1's, and offsets are in
    the concatenation of the parts."""
    metadata = json_metadata(header)
    if isinstance(entries, FragmentEntries):
        shards_of = entries.total_shards
    else:
        shards_of = {e["tensor_name"]: e["total_shards"] for e in entries}
    if tensors is None:
        tensors = [(t, header.data_start + t.offset) for t in header.tensors]
    tensor_specifics = {
        t.name: {
            "shape": list(t.dims),
            "tensor_type": t.ggml_type.name,
            "data_offset": data_offset,
            "size_bytes": t.n_bytes,
            "row_bytes": t.row_bytes,
            "total_shards": shards_of[t.name],
        }
        for t, data_offset in tensors
    }
    # `parts` only when split, so a one-file model's manifest (and CID) is unchanged.
    split = {"parts": parts} if parts is not None else {}
    return {
        "format": FORMAT,
        "model_name": Path(file_name).stem,
        "file_name": file_name,
        "file_size": file_size,
        "file_sha256": file_sha,
        **split,
        "architecture": header.architecture,
        "gguf_version": header.version,
        "alignment": alignment if alignment is not None else header.alignment,
        "chunk_size": chunk_size,
        "header_size": header.data_start,
        "header_sha256": header_sha,
        "block_size": BLOCK_SIZE,
        "header_block_root": header_block_root,
        "total_fragments": len(entries),
        "config": model_config(header, metadata),
        "tensor_specifics": tensor_specifics,
        "extra_bytes": encode_extra(extra),
        "fragments": entries,
        "metadata": metadata,
    }
