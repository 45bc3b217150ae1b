"""The fragment folders under a data dir, indexed by CID.

Any folder with a `manifest.json` is a model (ours or the existing tool's); a
pull writes into `DATA_DIR/<model CID>/`, `publish` into `DATA_DIR/<model name>/`
(`published_folder`); either is found by its CID, so a pull of a model already
published into the same data dir fetches nothing. The index is built at start from
manifests and file sizes alone; hashes come from our manifests, or for the
existing tool's (which have only 16-hex prefixes) from a cache keyed by file
size and mtime, so nothing is re-hashed on every start. A file is hashed whole
before it is first served; every later read hashes again the 1 MiB blocks it
touches, against the digests recorded then, so bytes that rot on disk later
(a bad sector, a stray write that kept the mtime) are never served. That record
is kept on disk per folder (verified_state.py), so a restart, or a re-pull of a
model held, trusts unchanged files (same size, mtime and inode) without
hashing them whole again; it is written in batches (`flush_verified`, every few
seconds and at shutdown): a crash loses at most the last batch, which only
means hashing those files again. Pulled files are not fsynced one by one (at
40,000 fragments, two fsyncs per file were 35 % of a pull's time): each batch
first makes the whole filesystem durable with one syncfs(2), so a record on
disk names only durable files; after a power cut, a file written since is
either short (not counted as held) or hashed whole before it is served. Once a
batch is durable, the files pulled in it leave the page cache (`drop_cached`):
a pull of hundreds of GB does not push the machine's working set out, and the
pages it frees take the next blocks at once. On a VM that hands free memory
back to its host, a page written for the first time costs 5-9 ms of CPU per
MB, reused ~0.8 (README, Benchmarks); blocks asked of us after that are read
from disk, most are asked within seconds of our HAVE. Hidden
files in a model folder: `.partial-*` are temporary (deleted at every start),
`.resume-*` are a killed pull's verified blocks (see blockstore.py).
Synchronous file work: the node calls it through `trio.to_thread`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import stat
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from fragmenter import FragmenterError, Manifest
from fragmenter.fragment_table import FragmentTable
from fragmenter.fsio import WRITEBACK_FROM, drop_cached, fsync_dir, start_writeback, sync_filesystem
from fragmenter.manifest import HEADER_NAME, MANIFEST_NAME
from fragmenter.split import model_file_name
from protocol.blocks import BLOCK_SIZE, DIGEST_SIZE, block_digests, block_root
from protocol.cid import InvalidCID, cid_from_digest, cid_from_hex, cid_of, cids_from_hex, digest_of_cid

from . import manifest_index, verified_state
from .verified_state import BadState, FileRecord

log = logging.getLogger(__name__)
STATE_DIR = ".gguf-swarm"
_HASH_CACHE = "hash-cache.json"
PARTIAL_PREFIX = ".partial-"
RESUME_PREFIX = ".resume-"
REMOVING_PREFIX = ".removing-"  # a model folder being deleted (delete_model_folder)
_VERIFIED_DIR = "verified"
_PULLING_DIR = "pulling"  # folders pulls write into without fsync, until recorded whole (mark_pulling)
_INDEX_DIR = "index"  # parsed manifests (manifest_index.py)
_UNKNOWN = bytes(32)


def published_folder(data_dir: Path, model_file: Path) -> Path:
    """Where `publish` fragments a GGUF: `DATA_DIR/NAME`, the file's name without
    `.gguf` (for a split model's part, NAME, not NAME-00001-of-00003: the manifest's model_name)."""
    return Path(data_dir) / Path(model_file_name(model_file)).stem


@dataclass
class LocalModel:
    cid: str
    folder: Path
    manifest: Manifest
    # SHA-256 of each fragment, manifest order, 32 bytes each (zeros: unknown, an
    # existing tool's fragment not yet hashed). Bytes, not CID strings: a seed of
    # twenty 40,000-fragment models held 280 MB of CIDs and their index.
    digests: bytes
    header_cid: str | None
    have: list[bool]
    header_present: bool
    # The digests' first 8 bytes sorted, and the fragment of each: finds a
    # fragment by CID with one binary search.
    _prefixes: np.ndarray = field(init=False, repr=False)
    _order: np.ndarray = field(init=False, repr=False)
    # (size, mtime_ns, inode) of manifest.json when it was last seen to hash to
    # the CID: ranges of it are served without hashing 30 MB per range.
    _manifest_signature: tuple[int, int, int] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        prefixes = np.frombuffer(self.digests, dtype=">u8")[::4] if self.digests else np.zeros(0, ">u8")
        self._order = np.argsort(prefixes, kind="stable").astype(np.int32)
        self._prefixes = prefixes[self._order].astype(np.uint64)

    def fragment_digest(self, k: int) -> bytes | None:
        digest = self.digests[32 * k : 32 * k + 32]
        return None if digest == _UNKNOWN else digest

    def fragment_cid(self, k: int) -> str:
        """Fragment k's CID; "" when its digest is not known."""
        digest = self.fragment_digest(k)
        return "" if digest is None else cid_from_digest(digest)

    @property
    def fragment_cids(self) -> list[str]:
        """Every fragment's CID (computed: see `digests`)."""
        hexes = self.digests.hex()
        known = [self.fragment_digest(k) is not None for k in range(len(self.have))]
        return cids_from_hex([hexes[64 * k : 64 * k + 64] if ok else "" for k, ok in enumerate(known)])

    def find_fragment(self, digest: bytes) -> int | None:
        """The fragment with this SHA-256, if the manifest has one."""
        prefix = np.uint64(int.from_bytes(digest[:8], "big"))
        at = int(np.searchsorted(self._prefixes, prefix))
        while at < len(self._prefixes) and self._prefixes[at] == prefix:
            k = int(self._order[at])
            if self.digests[32 * k : 32 * k + 32] == digest:
                return k
            at += 1
        return None

    @property
    def complete(self) -> bool:
        return self.header_present and all(self.have)

    @property
    def name(self) -> str:
        return self.manifest.model_name

    def read_manifest_bytes(self) -> bytes | None:
        """The manifest as on disk, or None when it no longer hashes to the model
        CID. Read when asked, not held: a 40,000-fragment manifest is 30 MB, and
        a seed holds twenty models."""
        try:
            with open(self.folder / MANIFEST_NAME, "rb") as f:
                before = verified_state.signature(os.fstat(f.fileno()))
                data = f.read()
        except OSError:
            return None
        if cid_of(data) != self.cid:
            return None
        self._manifest_signature = before
        return data

    def manifest_size(self) -> int | None:
        """The manifest file's size, if it hashes to the model CID: hashed (in
        chunks, never held) only when the file changed since it last did."""
        try:
            with open(self.folder / MANIFEST_NAME, "rb") as f:
                before = verified_state.signature(os.fstat(f.fileno()))
                if before != self._manifest_signature:
                    if manifest_index.cid_of_file(f) != self.cid:
                        return None
                    if verified_state.signature(os.fstat(f.fileno())) != before:
                        return None  # changed while hashed
                    self._manifest_signature = before
                return before[0]
        except OSError:
            return None

    def read_manifest_range(self, offset: int, length: int) -> tuple[bytes, int] | None:
        """Bytes [offset, offset + length) of the manifest (fewer at its end) and
        its whole size; None when it no longer hashes to the model CID."""
        try:
            with open(self.folder / MANIFEST_NAME, "rb") as f:
                st = os.fstat(f.fileno())
                if verified_state.signature(st) != self._manifest_signature and self.manifest_size() is None:
                    return None
                return os.pread(f.fileno(), max(0, min(length, st.st_size - offset)), offset), st.st_size
        except OSError:
            return None


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
    # path -> record of a file checked against its full hash (kept on disk per folder: verified_state.py)
    # folder -> file name -> record: the name is the record's own string, and a
    # flush or a removal touches one folder's records, not every model's.
    _verified: dict[str, dict[str, FileRecord]] = field(default_factory=dict)
    _dirty: set[Path] = field(default_factory=set)  # folders whose record on disk is behind
    _written: list[Path] = field(default_factory=list)  # pulled files, whole since the last batch (flush_verified)
    hashed_bytes: int = 0  # bytes of complete files hashed whole to check them (tests and benchmarks read it)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        # Files are verified on worker threads while another flushes the records.
        self._lock = threading.Lock()

    @property
    def state_dir(self) -> Path:
        return self.data_dir / STATE_DIR

    def scan(self) -> None:
        """(Re)index every model folder in the data dir."""
        self.models.clear()
        cache = self.load_hash_cache()
        for folder in self.model_folders():
            model = self.read_folder(folder, cache)
            if model is not None:
                self.add_model(model)
        self.save_hash_cache(cache)

    def model_folders(self) -> list[Path]:
        """The folders of the data dir that hold a manifest."""
        for p in self.data_dir.glob(REMOVING_PREFIX + "*"):  # a removal a crash interrupted
            shutil.rmtree(p, ignore_errors=True)
        return sorted(
            p
            for p in self.data_dir.iterdir()
            if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST_NAME).is_file()
        )

    def read_folder(
        self, folder: Path, cache: dict[str, list], pool: manifest_index.ParserPool | None = None
    ) -> LocalModel | None:
        """A model folder read and checked, not yet indexed (`add_model`); None
        (logged) when it cannot be served. Safe on a worker thread while the
        node serves the models already added: it touches no index."""
        try:
            for name in os.listdir(folder):  # not Path.glob: a pattern match and a Path per file, at 40,000 files
                if name.startswith(PARTIAL_PREFIX):
                    (folder / name).unlink(missing_ok=True)
        except OSError:
            pass  # unreadable: _read_folder says so
        try:
            return self._read_folder(folder, cache, pool=pool)
        except (FragmenterError, OSError, ValueError) as e:
            log.warning("skipping %s: %s", folder, e)
            return None

    def add_model(self, model: LocalModel) -> None:
        self._index(model)

    def _add_folder(self, folder: Path, cache: dict[str, list]) -> LocalModel:
        model = self._read_folder(folder, cache)
        self._index(model)
        return model

    def _read_folder(
        self,
        folder: Path,
        cache: dict[str, list],
        parsed: tuple[str, Manifest] | None = None,
        pool: manifest_index.ParserPool | None = None,
    ) -> LocalModel:
        """`parsed`: (CID, manifest) of the folder's manifest, known already;
        `pool`: parser processes for a manifest never indexed."""
        index_path = self._index_path(folder)
        signature: tuple[int, int, int] | None = None
        if parsed is not None:
            model_cid, manifest = parsed
            if index_path is not None and not index_path.exists():  # a parser process may have written it
                manifest_index.save(index_path, model_cid, manifest)
        else:
            where = str(folder / MANIFEST_NAME)
            with open(where, "rb") as f:
                manifest_index.check_size(f, where)
                signature = verified_state.signature(os.fstat(f.fileno()))
                model_cid = manifest_index.cid_of_file(f)
                if verified_state.signature(os.fstat(f.fileno())) != signature:
                    signature = None  # changed while hashed: ranges of it are checked whole first
                manifest = None if index_path is None else manifest_index.load(index_path, model_cid)
                if manifest is None:
                    manifest = manifest_index.parse(f, model_cid, index_path, where, pool)
        table = manifest.fragments
        assert isinstance(table, FragmentTable)
        # Whole columns, no entry per fragment: this runs for every fragment of every model at start.
        known, has_sha = table.sha256_digests()
        digests = bytearray(known)
        have: list[bool] = []
        folder_str = str(folder)
        # Names relative to the open folder: no path to build or walk per file, at 40,000 files.
        folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            names = table.file_names()
            sizes = [_size_at(folder_fd, name) for name in names]
        finally:
            os.close(folder_fd)
        for k, (name, size) in enumerate(zip(names, table.sizes(), strict=True)):
            present = sizes[k] == size
            if not has_sha[k] and present:  # the existing tool's: only a checksum prefix to check against
                sha = _cached_sha256(Path(os.path.join(folder_str, name)), cache)
                if sha[:16] == table[k].checksum:
                    digests[32 * k : 32 * k + 32] = bytes.fromhex(sha)
                else:
                    present = False
            have.append(present and digests[32 * k : 32 * k + 32] != _UNKNOWN)
        header_sha = manifest.raw.get("header_sha256")
        header_present = _size_of(folder / HEADER_NAME) == manifest.header_size
        if header_sha is None and header_present:
            header_sha = _cached_sha256(folder / HEADER_NAME, cache)
        model = LocalModel(
            cid=model_cid,
            folder=folder,
            manifest=manifest,
            digests=bytes(digests),
            header_cid=cid_from_hex(header_sha) if header_sha else None,
            have=have,
            header_present=header_present,
        )
        model._manifest_signature = signature
        self._load_verified(model)
        return model

    def _index(self, model: LocalModel) -> None:
        self.models[model.cid] = model

    # ---- lookups for serving --------------------------------------------

    def locate(self, cid: str) -> Blob | None:
        try:
            digest = digest_of_cid(cid)
        except InvalidCID:
            return None
        for model in list(self.models.values()):  # list(): models are added meanwhile (store.py's indexing)
            if cid == model.header_cid:
                if model.header_present:
                    sha = model.manifest.raw.get("header_sha256") or digest.hex()
                    return Blob(model.folder / HEADER_NAME, model.manifest.header_size, sha, model.cid, -1)
                continue
            index = model.find_fragment(digest)
            if index is not None and model.have[index]:
                entry = model.manifest.fragments[index]
                return Blob(model.folder / entry.file_name, entry.size, digest.hex(), model.cid, index)
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
                    self.count_hashed(len(data))
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
        hash as it is now on disk (same size, mtime and inode); else None."""
        folder, name = os.path.split(path)
        record = self._verified.get(folder, {}).get(name)
        if record is None:
            return None
        try:
            st = os.stat(path)
        except OSError:
            return None
        return (record.block_size, record.digests) if verified_state.signature(st) == record.signature else None

    def mark_verified(self, path: Path, block_size: int, digests: bytes) -> None:
        """`path` matched its full hash just now; `digests` are its blocks' (of
        `block_size`), for checking later reads block by block. Never raises."""
        try:
            st = os.stat(path)
        except OSError:
            return  # gone meanwhile: it will be checked again if it comes back
        size, mtime_ns, ino = verified_state.signature(st)
        folder, name = os.path.split(path)
        record = FileRecord(name, size, mtime_ns, ino, block_size, digests)
        with self._lock:
            self._verified.setdefault(folder, {})[name] = record
            self._dirty.add(path.parent)

    def forget_verified(self, path: Path) -> None:
        folder, name = os.path.split(path)
        with self._lock:
            if self._verified.get(folder, {}).pop(name, None) is not None:
                self._dirty.add(path.parent)

    def verified_files(self, model: LocalModel) -> int:
        """Files of `model` checked whole (this run or, per the saved record, an earlier
        one) and unchanged on disk since: those serve without being hashed whole again."""
        names = [e.file_name for e in model.manifest.fragments] + [HEADER_NAME]
        return sum(1 for name in names if self.verified_blocks(model.folder / name) is not None)

    def count_hashed(self, n: int) -> None:
        with self._lock:
            self.hashed_bytes += n

    # ---- the verified record on disk -------------------------------------

    def pulled_index_path(self, cid: str) -> Path | None:
        """Where the parsed manifest of model `cid` is kept once a pull begins it."""
        return self._index_path(self.data_dir / cid)

    def _index_path(self, folder: Path) -> Path | None:
        # Like the verified records: one per model folder of the data dir.
        return self.state_dir / _INDEX_DIR / (folder.name + ".npz") if folder.parent == self.data_dir else None

    def _verified_path(self, folder: Path) -> Path | None:
        # One file per model folder of the data dir (the only folders a node serves).
        return self.state_dir / _VERIFIED_DIR / folder.name if folder.parent == self.data_dir else None

    def _load_verified(self, model: LocalModel) -> None:
        """Trust again the files of `model` unchanged since they were verified. A bad
        state file is ignored (logged): its files are just hashed again."""
        path = self._verified_path(model.folder)
        if path is None:
            return
        try:
            st = path.stat()
        except FileNotFoundError:
            return  # never served, or not since the last start: nothing to trust yet
        except OSError as e:
            log.warning("ignoring verified-state file %s (its files will be hashed again): %s", path, e)
            return
        expected = _expected_files(model.manifest)
        min_block = min(BLOCK_SIZE, model.manifest.block_size or BLOCK_SIZE)
        sizes = {name: size for name, (size, _) in expected.items()}
        try:
            if not stat.S_ISREG(st.st_mode):
                raise BadState("not a regular file")
            if st.st_size > verified_state.max_bytes(model.cid, sizes, min_block):
                raise BadState("larger than this model's record can be")
            records = verified_state.decode(path.read_bytes(), model.cid)
        except FileNotFoundError:
            return
        except (OSError, BadState) as e:
            log.warning("ignoring verified-state file %s (its files will be hashed again): %s", path, e)
            return
        block_size = model.manifest.block_size or BLOCK_SIZE
        folder = str(model.folder)
        trusted = {}
        try:
            folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)  # names relative to it: no path per file
        except OSError:
            return
        try:
            for r in records:
                if _trusted(folder_fd, r, expected.get(r.name), block_size):
                    trusted[r.name] = r
        finally:
            os.close(folder_fd)
        with self._lock:
            self._verified.setdefault(folder, {}).update(trusted)

    def _pulling_path(self, folder: Path) -> Path | None:
        return self.state_dir / _PULLING_DIR / folder.name if folder.parent == self.data_dir else None

    def mark_pulling(self, model: LocalModel) -> None:
        """Before blocks are written into `model`'s folder without fsync: a durable
        mark that a power cut may leave its files that have no record torn (a pull
        hashes those first, pull.py). `flush_verified` clears it once the model is
        whole and recorded; folders `fragment` wrote (synced) never carry it."""
        path = self._pulling_path(model.folder)
        if path is None or path.exists():
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(path, model.cid.encode())
        except OSError as e:  # a full disk, say: the write that follows fails with the clear error
            log.warning("cannot save %s: %s", path, e)

    def pulled_unsynced(self, model: LocalModel) -> bool:
        """Was a pull writing into `model`'s folder since its records were last made whole?"""
        path = self._pulling_path(model.folder)
        return path is not None and path.exists()

    def note_written(self, path: Path) -> None:
        """A pulled file is whole under its final name: once the next batch has made
        it durable, its pages leave the page cache (see above)."""
        with self._lock:
            self._written.append(path)

    def flush_verified(self) -> None:
        """Write the records of the folders changed since the last flush (one atomic
        write per folder). Never raises: a record not written costs only a re-hash."""
        with self._lock:
            dirty, self._dirty = self._dirty, set()
            if not dirty:
                return
            written, self._written = self._written, []
            by_folder = {str(f): list(self._verified.get(str(f), {}).values()) for f in dirty}
        models = {m.folder: m for m in list(self.models.values())}  # list(): models are added meanwhile
        cids = {folder: m.cid for folder, m in models.items()}
        try:
            sync_filesystem(self.data_dir)  # the files these records vouch for, written without fsync
        except OSError as e:
            log.warning("cannot sync %s (records not saved; their files will be hashed again): %s", self.data_dir, e)
            with self._lock:
                self._dirty |= dirty
                self._written[:0] = written
            return
        for path in written:
            drop_cached(path)  # durable now: only clean pages, which the kernel may drop
        for folder_str, records in by_folder.items():
            folder = Path(folder_str)
            path = self._verified_path(folder)
            if path is None or folder not in cids:
                continue
            try:
                if records:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    _write_atomic(path, verified_state.encode(cids[folder], sorted(records, key=lambda r: r.name)))
                else:
                    path.unlink(missing_ok=True)
                pulling = self._pulling_path(folder)
                if pulling is not None and models[folder].complete:  # every file synced and recorded
                    pulling.unlink(missing_ok=True)
            except OSError as e:
                # A full disk has already been reported by whatever filled it; a record
                # not saved costs only a re-hash of its files on the next start.
                (log.debug if e.errno == errno.ENOSPC else log.warning)("cannot save %s: %s", path, e)

    def _went_bad(self, blob: Blob) -> None:
        log.error("local file %s does not match its hash (changed on disk?); not serving it", blob.path)
        self.forget_verified(blob.path)
        self._forget(blob)
        return None

    def _forget(self, blob: Blob) -> None:
        model = self.models.get(blob.model_cid)
        if model is None:
            return
        if blob.index == -1:
            model.header_present = False
        else:
            model.have[blob.index] = False

    # ---- writing pulled models ------------------------------------------

    def begin_model(self, cid: str, manifest_bytes: bytes | BinaryIO, manifest: Manifest | None = None) -> LocalModel:
        """Create (or reopen, to resume) the folder a pull writes into.
        `manifest_bytes`: what hashes to `cid`, or a file of it (copied, never
        held whole). `manifest`: that parsed already (by the caller that checked
        it against `cid`): not read back and parsed again (30 MB and 0.6 s at
        40,000 fragments)."""
        if cid in self.models:
            return self.models[cid]
        folder = self.data_dir / cid
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / MANIFEST_NAME).exists():
            _write_atomic(folder / MANIFEST_NAME, manifest_bytes)
        elif manifest is not None and _file_cid(folder / MANIFEST_NAME) != cid:
            manifest = None  # another manifest under this CID's name: read what is there, as any folder
        model = self._read_folder(folder, {}, (cid, manifest) if manifest is not None else None)
        self._index(model)
        return model

    def write_file(self, model: LocalModel, index: int, data: bytes, digests: bytes | None = None) -> None:
        """Write verified bytes under their final name (index -1: the header);
        `digests`: their blocks' (of BLOCK_SIZE), if the caller has them."""
        name = HEADER_NAME if index == -1 else model.manifest.fragments[index].file_name
        path = model.folder / name
        _write_atomic(path, data, durable=False)  # made durable in batches, before its record (flush_verified)
        if len(data) >= WRITEBACK_FROM:  # a small file's few pages are not worth a drop's three system calls
            self.note_written(path)
        if index == -1 or model.manifest.fragments[index].sha256 is not None:
            # Checked against a full SHA-256 just now: serving it need hash only the blocks it reads.
            self.mark_verified(path, BLOCK_SIZE, block_digests(data) if digests is None else digests)
        else:
            with self._lock:
                self._dirty.add(path.parent)  # no record to save, but the next batch makes it durable
        if index == -1:
            model.header_present = True
        else:
            model.have[index] = True

    # ---- removing a model ------------------------------------------------

    def forget_model(self, cid: str) -> LocalModel:
        """Take model `cid` out of the index (nothing serves it from now on) and
        return it for `delete_model_folder`. KeyError if it is not held;
        ValueError if its folder is not a model folder directly under the data
        dir: a node deletes nothing else. On the trio thread (the index changes)."""
        model = self.models[cid]
        self._check_removable(model.folder)
        del self.models[cid]
        return model

    def delete_model_folder(self, model: LocalModel) -> None:
        """Delete a forgotten model's folder and its records (synchronous file
        work: call it on a worker thread). The folder is first renamed to a hidden
        name in one step, so a crash midway never leaves a half-deleted folder that
        looks like a model; a leftover is deleted at the next start."""
        folder = model.folder
        self._check_removable(folder)
        trash = self.data_dir / f"{REMOVING_PREFIX}{folder.name}.{uuid.uuid4().hex[:12]}"
        os.rename(folder, trash)
        fsync_dir(self.data_dir)
        with self._lock:
            self._verified.pop(str(folder), None)
            self._dirty.discard(folder)
        for path in (self._verified_path(folder), self._index_path(folder)):
            if path is not None:
                path.unlink(missing_ok=True)
        shutil.rmtree(trash, ignore_errors=True)

    def _check_removable(self, folder: Path) -> None:
        ok = (
            folder.parent == self.data_dir
            and folder.parent.resolve() == self.data_dir.resolve()
            and not folder.name.startswith(".")
            and not folder.is_symlink()
            and folder.is_dir()
            and (folder / MANIFEST_NAME).is_file()
        )
        if not ok:
            raise ValueError(f"not removing {folder}: not a model folder directly in {self.data_dir} (or a symlink)")

    # ---- hash cache for the existing tool's folders ----------------------

    def load_hash_cache(self) -> dict[str, list]:
        try:
            data = json.loads((self.state_dir / _HASH_CACHE).read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def save_hash_cache(self, cache: dict[str, list]) -> None:
        if cache:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            _write_atomic(self.state_dir / _HASH_CACHE, json.dumps(cache).encode())


def _write_atomic(path: Path, data: bytes | bytearray | BinaryIO, durable: bool = True) -> None:
    """Write `path` whole (`data`, or the whole of a file of it) under a
    temporary name, then rename it into place; `durable`: fsync the file and
    its folder too."""
    # A name of its own per write: two copies of one fragment (endgame) may be
    # verified on two threads at once, and each must land whole.
    tmp = path.with_name(f"{PARTIAL_PREFIX}{path.name}.{uuid.uuid4().hex[:12]}")
    try:
        with open(tmp, "wb") as f:
            if isinstance(data, bytes | bytearray):
                f.write(data)
            else:
                data.seek(0)
                shutil.copyfileobj(data, f, 1 << 20)
            f.flush()
            if durable:
                os.fsync(f.fileno())
            elif f.tell() >= WRITEBACK_FROM:
                start_writeback(f.fileno())  # durable at the next batch's sync; most of it on disk by then
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)  # a full disk, say: no temporary file left behind
        raise OSError(e.errno, e.strerror, str(path)) from None  # named for the user by its final name
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def _file_cid(path: Path) -> str:
    with open(path, "rb") as f:
        return manifest_index.cid_of_file(f)


def _size_at(folder_fd: int, name: str) -> int:
    try:
        return os.stat(name, dir_fd=folder_fd).st_size
    except OSError:
        return -1


def _size_of(path: Path | str) -> int:
    try:
        return os.stat(path).st_size
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


def _trusted(folder_fd: int, r: FileRecord, expected: tuple[int, str | None] | None, block_size: int) -> bool:
    """A record is used only for a file of the manifest (in the folder open as
    `folder_fd`), of its size, unchanged on disk, and whose digests make the
    manifest's block root (when it has one: the record then cannot claim
    digests the manifest does not commit to)."""
    if expected is None or expected[0] != r.size:
        return False
    try:
        if verified_state.signature(os.stat(r.name, dir_fd=folder_fd)) != r.signature:
            return False
    except OSError:
        return False
    root = expected[1]
    return root is None or (r.block_size == block_size and block_root(r.digests) == root)


def _expected_files(manifest: Manifest) -> dict[str, tuple[int, str | None]]:
    """name -> (size, block root or None) of every file of a model folder."""
    table = manifest.fragments
    files: dict[str, tuple[int, str | None]]
    if isinstance(table, FragmentTable):
        files = dict(zip(table.file_names(), zip(table.sizes(), table.block_roots(), strict=True), strict=True))
    else:
        files = {e.file_name: (e.size, e.block_root) for e in table}
    files[HEADER_NAME] = (manifest.header_size, manifest.header_block_root)
    return files
