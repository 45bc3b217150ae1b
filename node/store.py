"""The fragment folders under a data dir, indexed by CID.

Any folder with a `manifest.json` is a model (ours or the existing tool's); a
pull writes into `DATA_DIR/<model CID>/`. The index is built at start from
manifests and file sizes alone; hashes come from our manifests, or for the
existing tool's (which have only 16-hex prefixes) from a cache keyed by file
size and mtime, so nothing is re-hashed on every start. A file is hashed whole
before it is first served; every later read hashes again the 1 MiB blocks it
touches, against the digests recorded then, so bytes that rot on disk later
(a bad sector, a stray write that kept the mtime) are never served. Hidden
files in a model folder: `.partial-*` are temporary (deleted at every start),
`.resume-*` are a killed pull's verified blocks (see blockstore.py).
Synchronous file work: the node calls it through `trio.to_thread`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fragmenter import FragmenterError, Manifest, parse_manifest
from fragmenter.fsio import fsync_dir
from fragmenter.manifest import HEADER_NAME, MANIFEST_NAME, load_manifest_json
from protocol.blocks import BLOCK_SIZE, DIGEST_SIZE, block_digests
from protocol.cid import cid_from_hex, cid_of, digest_of_cid

log = logging.getLogger(__name__)
STATE_DIR = ".gguf-swarm"
_HASH_CACHE = "hash-cache.json"
PARTIAL_PREFIX = ".partial-"
RESUME_PREFIX = ".resume-"


@dataclass
class LocalModel:
    cid: str
    folder: Path
    manifest: Manifest
    manifest_bytes: bytes
    fragment_cids: list[str]  # manifest order
    header_cid: str | None
    have: list[bool]
    header_present: bool

    @property
    def complete(self) -> bool:
        return self.header_present and all(self.have)

    @property
    def name(self) -> str:
        return self.manifest.model_name


@dataclass(frozen=True)
class Blob:
    """Where the bytes of one CID live, and what they must hash to."""

    path: Path
    size: int
    sha256: str
    model_cid: str
    index: int  # in the manifest; -1: gguf_header.dat


@dataclass
class Store:
    data_dir: Path
    models: dict[str, LocalModel] = field(default_factory=dict)
    _blobs: dict[str, list[tuple[LocalModel, int]]] = field(default_factory=dict)  # cid -> (model, index | -1)
    # path -> (size, mtime_ns, block size, block digests) of a file checked against its full hash
    _verified: dict[str, tuple[int, int, int, bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)

    @property
    def state_dir(self) -> Path:
        return self.data_dir / STATE_DIR

    def scan(self) -> None:
        """(Re)index every model folder in the data dir."""
        self.models.clear()
        self._blobs.clear()
        cache = self._load_hash_cache()
        for folder in sorted(p for p in self.data_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if not (folder / MANIFEST_NAME).is_file():
                continue
            for stale in folder.glob(PARTIAL_PREFIX + "*"):
                stale.unlink(missing_ok=True)
            try:
                self._add_folder(folder, cache)
            except (FragmenterError, OSError, ValueError) as e:
                log.warning("skipping %s: %s", folder, e)
        self._save_hash_cache(cache)

    def _add_folder(self, folder: Path, cache: dict[str, list]) -> LocalModel:
        raw = (folder / MANIFEST_NAME).read_bytes()
        manifest = parse_manifest(load_manifest_json(raw, str(folder / MANIFEST_NAME)), str(folder / MANIFEST_NAME))
        cids: list[str] = []
        have: list[bool] = []
        for entry in manifest.fragments:
            path = folder / entry.file_name
            present = _size_of(path) == entry.size
            sha = entry.sha256
            if sha is None and present:
                sha = _cached_sha256(path, cache)
                if sha[:16] != entry.checksum:
                    present, sha = False, None
            cids.append(cid_from_hex(sha) if sha else "")
            have.append(present and sha is not None)
        header_sha = manifest.raw.get("header_sha256")
        header_present = _size_of(folder / HEADER_NAME) == manifest.header_size
        if header_sha is None and header_present:
            header_sha = _cached_sha256(folder / HEADER_NAME, cache)
        model = LocalModel(
            cid=cid_of(raw),
            folder=folder,
            manifest=manifest,
            manifest_bytes=raw,
            fragment_cids=cids,
            header_cid=cid_from_hex(header_sha) if header_sha else None,
            have=have,
            header_present=header_present,
        )
        self._index(model)
        return model

    def _index(self, model: LocalModel) -> None:
        self.models[model.cid] = model
        for i, cid in enumerate(model.fragment_cids):
            if cid:
                self._blobs.setdefault(cid, []).append((model, i))
        if model.header_cid:
            self._blobs.setdefault(model.header_cid, []).append((model, -1))

    # ---- lookups for serving --------------------------------------------

    def locate(self, cid: str) -> Blob | None:
        for model, index in self._blobs.get(cid, []):
            if index == -1:
                if model.header_present:
                    sha = model.manifest.raw.get("header_sha256") or _digest_hex(cid)
                    return Blob(model.folder / HEADER_NAME, model.manifest.header_size, sha, model.cid, -1)
            elif model.have[index]:
                entry = model.manifest.fragments[index]
                return Blob(model.folder / entry.file_name, entry.size, _digest_hex(cid), model.cid, index)
        return None

    def read_verified(self, blob: Blob, offset: int = 0, length: int | None = None) -> bytes | None:
        """The blob's bytes (or a range), or None if the file no longer matches its hash
        (then it is no longer offered)."""
        end = blob.size if length is None else min(blob.size, offset + length)
        try:
            with open(blob.path, "rb") as f:
                record = self.verified_blocks(blob.path)
                if record is None:
                    data = f.read()
                    if len(data) != blob.size or hashlib.sha256(data).hexdigest() != blob.sha256:
                        return self._went_bad(blob)
                    self.mark_verified(blob.path, BLOCK_SIZE, block_digests(data))
                    return data[offset:end]
                # Checked whole before: read the blocks the range touches and check just those.
                block_size, digests = record
                first, last = offset // block_size, max(offset // block_size, -(-end // block_size))
                f.seek(first * block_size)
                data = f.read((last - first) * block_size)
        except OSError:
            return self._went_bad(blob)
        view = memoryview(data)
        for j in range(first, last):
            block = view[(j - first) * block_size : (j - first + 1) * block_size]
            if hashlib.sha256(block).digest() != digests[j * DIGEST_SIZE : (j + 1) * DIGEST_SIZE]:
                return self._went_bad(blob)
        start = offset - first * block_size
        return data[start : start + end - offset]

    def verified_blocks(self, path: Path) -> tuple[int, bytes] | None:
        """(block size, block digests) of this file if it was checked against its full
        hash as it is now on disk (same size and mtime); else None."""
        record = self._verified.get(str(path))
        if record is None:
            return None
        try:
            st = os.stat(path)
        except OSError:
            return None
        size, mtime_ns, block_size, digests = record
        return (block_size, digests) if (st.st_size, st.st_mtime_ns) == (size, mtime_ns) else None

    def mark_verified(self, path: Path, block_size: int, digests: bytes) -> None:
        """`path` matched its full hash just now; `digests` are its blocks' (of
        `block_size`), for checking later reads block by block. Never raises."""
        try:
            st = os.stat(path)
        except OSError:
            return  # gone meanwhile: it will be checked again if it comes back
        self._verified[str(path)] = (st.st_size, st.st_mtime_ns, block_size, digests)

    def forget_verified(self, path: Path) -> None:
        self._verified.pop(str(path), None)

    def _went_bad(self, blob: Blob) -> None:
        log.error("local file %s does not match its hash (changed on disk?); not serving it", blob.path)
        self.forget_verified(blob.path)
        self._forget(blob)
        return None

    def _forget(self, blob: Blob) -> None:
        for model in self.models.values():
            if model.folder / HEADER_NAME == blob.path:
                model.header_present = False
            for i, entry in enumerate(model.manifest.fragments):
                if model.folder / entry.file_name == blob.path:
                    model.have[i] = False

    # ---- writing pulled models ------------------------------------------

    def begin_model(self, cid: str, manifest_bytes: bytes) -> LocalModel:
        """Create (or reopen, to resume) the folder a pull writes into."""
        if cid in self.models:
            return self.models[cid]
        folder = self.data_dir / cid
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / MANIFEST_NAME).exists():
            _write_atomic(folder / MANIFEST_NAME, manifest_bytes)
        return self._add_folder(folder, {})

    def write_file(self, model: LocalModel, index: int, data: bytes) -> None:
        """Write verified bytes under their final name (index -1: the header)."""
        name = HEADER_NAME if index == -1 else model.manifest.fragments[index].file_name
        path = model.folder / name
        _write_atomic(path, data)
        if index == -1 or model.manifest.fragments[index].sha256 is not None:
            # Checked against a full SHA-256 just now: serving it need hash only the blocks it reads.
            self.mark_verified(path, BLOCK_SIZE, block_digests(data))
        if index == -1:
            model.header_present = True
        else:
            model.have[index] = True

    # ---- hash cache for the existing tool's folders ----------------------

    def _load_hash_cache(self) -> dict[str, list]:
        try:
            data = json.loads((self.state_dir / _HASH_CACHE).read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _save_hash_cache(self, cache: dict[str, list]) -> None:
        if cache:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            _write_atomic(self.state_dir / _HASH_CACHE, json.dumps(cache).encode())


def _write_atomic(path: Path, data: bytes) -> None:
    # A name of its own per write: two copies of one fragment (endgame) may be
    # verified on two threads at once, and each must land whole.
    tmp = path.with_name(f"{PARTIAL_PREFIX}{path.name}.{uuid.uuid4().hex[:12]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)  # a full disk, say: no temporary file left behind
        raise OSError(e.errno, e.strerror, str(path)) from None  # named for the user by its final name
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    except OSError:
        return ""
    return h.hexdigest()


def _cached_sha256(path: Path, cache: dict[str, list]) -> str:
    st = path.stat()
    key = str(path.resolve())
    hit = cache.get(key)
    if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
        return str(hit[2])
    sha = _sha256_file(path)
    cache[key] = [st.st_size, st.st_mtime_ns, sha]
    return sha


def _digest_hex(cid: str) -> str:
    return digest_of_cid(cid).hex()
