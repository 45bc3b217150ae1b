"""(Re)build `manifest.json` from `gguf_header.dat` and the `.dat` files.

Works on our folders and on the existing tool's: the header says which tensors
exist, where and how big; the file names say which files belong to which
tensor (`_L{layer}_{component}_S{shard}_`); the files' own sizes say where
each shard starts. Fragments are read (to hash them: sha256 and block digests,
in bounded reads) but never modified, so an upgraded folder gains block roots.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.blocks import BlockHasher, block_digests, block_root
from protocol.cid import cid_of

from .errors import FragmentError, ManifestError
from .folder import READ_SIZE
from .fsio import open_staging_file
from .gguf_header import GGUFHeader, TensorInfo, align, parse_header
from .manifest import (
    HEADER_NAME,
    MANIFEST_NAME,
    MAX_ALIGNMENT,
    build_manifest,
    fragment_entry,
    load_manifest_json,
    parse_manifest,
    serialize,
)
from .naming import FRAGMENT_FILE, tensor_role
from .plan import ShardPlan
from .split import PartLayout, folder_parts, part_tensors


@dataclass(frozen=True)
class _DatFile:
    path: Path
    shard: int
    size: int


def rebuild_manifest(path: Path) -> tuple[str, int]:
    """Write a fresh manifest.json into `path`; return (model CID, fragment count)."""
    path = Path(path)
    try:
        header_bytes = (path / HEADER_NAME).read_bytes()
    except OSError:
        raise ManifestError(f"{path}: no readable {HEADER_NAME}") from None
    header = parse_header(header_bytes)
    if header.alignment > MAX_ALIGNMENT:  # a manifest with it would be refused on reading
        raise ManifestError(
            f"{path}: alignment {header.alignment} is larger than the {MAX_ALIGNMENT} a manifest allows"
        )
    old = _old_manifest(path)
    parts = _old_parts(old, header, header_bytes)
    groups = _group_dat_files(path)
    model = old.get("model_name") or _common_model_name(groups) or path.name
    file_name = old.get("file_name") or f"{model}.gguf"

    tensors = part_tensors(parts) if parts else [(t, header.data_start + t.offset) for t in header.tensors]
    data_bases = {t.name: data_offset - t.offset for t, data_offset in tensors}
    shards: list[tuple[ShardPlan, _DatFile]] = []
    for t, data_offset in tensors:
        chain = _claim_chain(t, groups)
        offset = data_offset
        for dat in chain:
            shards.append((ShardPlan(t, dat.shard, len(chain), offset, dat.size), dat))
            offset += dat.size
    leftovers = [d.path.name for files in groups.values() for d in files]
    if leftovers:
        raise ManifestError(f"{path}: {len(leftovers)} .dat files match no tensor of the header, e.g. {leftovers[0]}")
    shards.sort(key=lambda s: s[0].file_offset)

    last = max((s.file_offset + s.size for s, _ in shards), default=header.data_start)
    file_size = int(old["file_size"]) if isinstance(old.get("file_size"), int) else align(last, header.alignment)
    file_hash = hashlib.sha256(header_bytes)
    pos = header.data_start
    entries: list[dict[str, Any]] = []
    used: set[str] = set()
    for plan, dat in shards:
        file_hash.update(bytes(plan.file_offset - pos))
        digest = hashlib.sha256()
        blocks = BlockHasher()
        with open(dat.path, "rb") as f:
            while chunk := f.read(READ_SIZE):
                digest.update(chunk)
                blocks.update(chunk)
                file_hash.update(chunk)
        pos = plan.file_offset + plan.size
        entry = fragment_entry(model, plan, digest.hexdigest(), blocks.root(), used, data_bases[plan.tensor.name])
        entry["fragment_id"] = dat.path.stem  # keep the names the files already have
        entry["model_name"] = model
        entries.append(entry)
    file_hash.update(bytes(file_size - pos))
    chunk_size = (
        old.get("chunk_size") if isinstance(old.get("chunk_size"), int) else max((s.size for s, _ in shards), default=0)
    )
    manifest = build_manifest(
        header,
        file_name,
        file_size,
        file_hash.hexdigest(),
        hashlib.sha256(header_bytes).hexdigest(),
        block_root(block_digests(header_bytes)),  # the header is in memory already
        chunk_size,
        entries,
        [],
        **_split_fields(parts, tensors, old),
    )
    manifest["model_name"] = model
    if old.get("extra_bytes"):
        manifest["extra_bytes"] = old["extra_bytes"]
        # The file hash above assumed zero gaps; only our own manifests carry
        # non-zero ones, and those also carry the right file_sha256.
        manifest["file_sha256"] = old.get("file_sha256", manifest["file_sha256"])
    data = serialize(manifest)
    with open_staging_file(path / MANIFEST_NAME) as tmp:
        tmp.write_bytes(data)
    return cid_of(data), len(entries)


def _old_parts(old: dict[str, Any], header: GGUFHeader, header_bytes: bytes) -> tuple[PartLayout, ...]:
    """A split model's parts, from the manifest being replaced: nothing else
    in the folder says where its files start and end, or holds the headers of
    parts 2..N. () for a one-file model (or a manifest too broken to tell)."""
    try:
        manifest = parse_manifest(old)
    except ManifestError:
        return ()
    return folder_parts(manifest, header, header_bytes)


def _split_fields(
    parts: tuple[PartLayout, ...], tensors: list[tuple[TensorInfo, int]], old: dict[str, Any]
) -> dict[str, Any]:
    if not parts:
        return {}
    return {
        "tensors": tensors,
        "parts": [
            {"file_name": p.entry.file_name, "file_size": p.entry.file_size, "file_sha256": p.entry.file_sha256}
            for p in parts
        ],
        "alignment": old["alignment"],
    }


def _old_manifest(path: Path) -> dict[str, Any]:
    try:
        raw = load_manifest_json((path / MANIFEST_NAME).read_bytes(), str(path / MANIFEST_NAME))
    except (OSError, ManifestError):
        return {}  # rebuilt from the files alone
    return raw if isinstance(raw, dict) else {}


def _group_dat_files(path: Path) -> dict[tuple[int, str], list[_DatFile]]:
    groups: dict[tuple[int, str], list[_DatFile]] = defaultdict(list)
    for p in sorted(path.glob("*.dat")):
        if p.name == HEADER_NAME:
            continue
        m = FRAGMENT_FILE.match(p.name)
        if not m:
            raise ManifestError(f"{p.name}: not a fragment file name (model_L<layer>_<component>_S<shard>_<sha16>.dat)")
        groups[(int(m["layer"]), m["component"])].append(_DatFile(p, int(m["shard"]), p.stat().st_size))
    return groups


def _common_model_name(groups: dict[tuple[int, str], list[_DatFile]]) -> str | None:
    for files in groups.values():
        for d in files:
            m = FRAGMENT_FILE.match(d.path.name)
            if m:
                return m["model"]
    return None


def _claim_chain(t: TensorInfo, groups: dict[tuple[int, str], list[_DatFile]]) -> list[_DatFile]:
    """Take from `groups` the files S0..Sk of tensor `t`: the first chain of
    consecutive shards whose sizes add up to the tensor's size."""
    role = tensor_role(t.name)
    keys = [(role.layer_index, role.component)]
    if t.name.startswith("blk."):
        keys.append((role.layer_index, t.name.split(".", 2)[-1]))  # our collision-free names
    for key in keys:
        files = groups.get(key, [])
        by_shard: dict[int, list[_DatFile]] = defaultdict(list)
        for d in files:
            by_shard[d.shard].append(d)
        for first in by_shard.get(0, []):
            chain, total = [first], first.size
            while total < t.n_bytes:
                nxt = next((d for d in by_shard.get(len(chain), []) if d not in chain), None)
                if nxt is None:
                    break
                chain.append(nxt)
                total += nxt.size
            if total == t.n_bytes:
                for d in chain:
                    files.remove(d)
                return chain
    raise FragmentError(f"fragments of tensor {t.name} are missing or incomplete")
