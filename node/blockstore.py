"""The blocks of one model on disk: reading them to serve, writing verified ones.

Rule: a block is written only after it matched its digest, and a file gets its
final name only when every block is in and the whole file matched the
manifest's SHA-256 (the block roots come from the same manifest, but only the
file hash is the user's format: a publisher could make the two disagree).
Until then the blocks live in a hidden `.resume-NAME` file beside it, with the
file's block digests in `.resume-NAME.digests`, so a kill never leaves a
wrong file under a final name. Completed files are not fsynced one by one: the
store syncs the filesystem before it records them (Store.flush_verified), and a
pull hashes a held file with no record before counting it (after a power cut
it may hold anything). The whole file's SHA-256 is taken as blocks extend the
written prefix, so completing a file seldom reads it again. Verified blocks of a partial file are served at
once. A pull that is killed (or runs out of disk) keeps them: the next one
hashes each written block again against the saved digests (themselves checked
against the manifest's root) and fetches only the blocks that do not match.
Why blocks and not just whole fragments: blocks are picked rarest first, in
random order, so when a pull stops most of its fragments are partly there.

Serving re-checks what it reads: a complete file is hashed whole before it is
first served (unless the store's saved record shows it unchanged since it was,
see verified_state.py), and every block read to send is hashed again against its
digest, so a block that rots on disk after that (~1 ms per MiB) is refused,
not sent; the file is then dropped (logged, no longer offered).

File k < n is fragment k (manifest order); file n is `gguf_header.dat`.
Synchronous: the node calls everything here through `trio.to_thread`, except
the cheap lookups.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import overload

from fragmenter.fragment_table import FragmentTable
from fragmenter.fsio import start_writeback
from fragmenter.manifest import HEADER_NAME, Manifest
from protocol.blocks import BLOCK_SIZE, DIGEST_SIZE, block_digests, block_root
from protocol.layout import BlockLayout

from .store import PARTIAL_PREFIX, RESUME_PREFIX, LocalModel, Store

log = logging.getLogger(__name__)


class BadManifest(Exception):
    """Verified blocks make a file that does not match the manifest's hash: the publisher's mistake."""


@dataclass(frozen=True)
class FileSpec:
    name: str
    size: int
    sha256: str | None  # full hex digest; None for the existing tool's fragments (checksum prefix only)
    checksum: str  # 16-hex prefix, always present
    root: str | None  # block_root; None: the file is one block, checked whole

    def matches(self, sha256_hex: str) -> bool:
        return sha256_hex == self.sha256 if self.sha256 is not None else sha256_hex[:16] == self.checksum


class FileSpecs(Sequence[FileSpec]):
    """The files of a model, its fragments then its header, each made on demand
    from the manifest's columns: a FileSpec (and its hex strings) per file, held
    for a whole pull, cost ~27 MB at 40,960 fragments."""

    def __init__(self, manifest: Manifest) -> None:
        self._fragments = manifest.fragments
        sha = manifest.raw.get("header_sha256")
        sha = sha if isinstance(sha, str) else None
        self._header = FileSpec(HEADER_NAME, manifest.header_size, sha, (sha or "")[:16], manifest.header_block_root)

    def __len__(self) -> int:
        return len(self._fragments) + 1

    @overload
    def __getitem__(self, k: int) -> FileSpec: ...

    @overload
    def __getitem__(self, k: slice) -> list[FileSpec]: ...

    def __getitem__(self, k: int | slice) -> FileSpec | list[FileSpec]:
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        if k == len(self._fragments) or k == -1:
            return self._header
        e = self._fragments[k]
        return FileSpec(e.file_name, e.size, e.sha256, e.checksum, e.block_root)


def file_specs(model: LocalModel) -> FileSpecs:
    return FileSpecs(model.manifest)


def layout_of(model: LocalModel) -> BlockLayout:
    m = model.manifest
    table = m.fragments
    if isinstance(table, FragmentTable):  # whole columns: no entry built per fragment
        sizes, blocked = table.sizes(), table.has_block_roots()
    else:
        sizes, blocked = [e.size for e in table], [e.block_root is not None for e in table]
    sizes.append(m.header_size)
    blocked.append(m.header_block_root is not None)
    return BlockLayout(sizes, blocked, m.block_size or BLOCK_SIZE)


class _Partial:
    def __init__(self, path: Path, size: int, fresh: bool = True) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | (os.O_TRUNC if fresh else 0), 0o644)
        os.ftruncate(self.fd, size)  # sparse: blocks not yet written are holes
        self.blocks_in = 0
        # The whole file's SHA-256, advanced over the written prefix as blocks
        # arrive (mostly in order): completing the file need not read it all again.
        self.sha256 = hashlib.sha256()
        self.hashed = 0  # bytes [0, hashed) are in `sha256`

    def catch_up(self, end: int) -> None:
        """Hash the written bytes after the hashed prefix, up to `end` (a hole reads as zeros, so
        callers pass only what is written)."""
        while self.hashed < end:
            chunk = os.pread(self.fd, min(4 << 20, end - self.hashed), self.hashed)
            if not chunk:
                break
            self.sha256.update(chunk)
            self.hashed += len(chunk)


def _written(fd: int, offset: int, length: int) -> bool:
    """Is any of [offset, offset + length) written? A hole (a block a killed pull
    never got to) is skipped unread on resume."""
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) < offset + length
    except OSError as e:  # ENXIO: only holes from there on; else no SEEK_DATA here: read it
        return e.errno != errno.ENXIO


class ModelBlocks:
    def __init__(self, store: Store, model: LocalModel) -> None:
        self.store = store
        self.model = model
        self.specs = file_specs(model)
        self.layout = layout_of(model)
        self.n = len(self.specs) - 1  # index of the header file
        self.digests: dict[int, bytes] = {}  # file -> verified block digests
        self._partials: dict[int, _Partial] = {}
        # Blocks are read to serve on several worker threads while one other
        # completes a file: partial-file state changes only under this lock.
        self._lock = threading.Lock()
        self.have = bytearray((self.layout.total_blocks + 7) // 8)  # verified blocks, MSB first
        self.have_count = 0
        self.have_bytes = 0
        self.partial_reads = 0  # blocks served from files still incomplete here
        self.resumed_bytes = 0  # verified blocks a killed pull left, kept (see _resume)
        leftovers = _resume_names(model.folder)
        for k in range(len(self.specs)):
            if self.file_complete(k):
                self._mark_file(k)
                if self._resume_path(k).name in leftovers:
                    self._discard_resume(k)  # completed by another run meanwhile
            elif self._resume_path(k).name in leftovers:
                self._resume(k)

    # ---- state -------------------------------------------------------------

    def file_complete(self, k: int) -> bool:
        return self.model.header_present if k == self.n else self.model.have[k]

    def has_block(self, block: int) -> bool:
        return bool(self.have[block >> 3] & (0x80 >> (block & 7)))

    @property
    def complete(self) -> bool:
        return self.have_count == self.layout.total_blocks

    def held_blocks(self) -> list[int]:
        return [b for b in range(self.layout.total_blocks) if self.has_block(b)]

    def _mark(self, block: int) -> None:
        if not self.has_block(block):
            self.have[block >> 3] |= 0x80 >> (block & 7)
            self.have_count += 1
            self.have_bytes += self.layout.block_length(block)

    def _mark_file(self, k: int) -> None:
        for b in self.layout.file_blocks(k):
            self._mark(b)

    def _unmark_file(self, k: int) -> None:
        for b in self.layout.file_blocks(k):
            if self.has_block(b):
                self.have[b >> 3] &= ~(0x80 >> (b & 7)) & 0xFF
                self.have_count -= 1
                self.have_bytes -= self.layout.block_length(b)

    # ---- serving -------------------------------------------------------------

    def file_digests(self, k: int) -> bytes | None:
        """Block digests of file k, verified; None when not held whole or not blocked.
        A complete file is hashed here once (the seed's verify-before-first-serve):
        a file that rotted on disk is dropped and never served."""
        if k in self.digests or self.specs[k].root is None:
            return self.digests.get(k)
        if not self.file_complete(k):
            return None
        spec = self.specs[k]
        path = self.model.folder / spec.name
        known = self._known_digests(k, path)
        if known is not None:
            self.digests[k] = known
            return known
        try:
            data = path.read_bytes()
        except OSError:
            data = b""
        self.store.count_hashed(len(data))
        digests = block_digests(data, self.layout.block_size)
        whole_ok = len(data) == spec.size and spec.matches(hashlib.sha256(data).hexdigest())
        if not whole_ok or block_root(digests) != spec.root:
            log.error("local file %s does not match the manifest; not serving it", self.model.folder / spec.name)
            self._drop_file(k)
            return None
        self.digests[k] = digests
        # v1 requests, and the next start (the record is saved), need not hash it whole again
        self.store.mark_verified(path, self.layout.block_size, digests)
        return digests

    def _known_digests(self, k: int, path: Path) -> bytes | None:
        """File k's digests from the store's record, when the file is unchanged since it
        was verified (a run ago, say) and they make its block root."""
        record = self.store.verified_blocks(path)
        if record is None or record[0] != self.layout.block_size or block_root(record[1]) != self.specs[k].root:
            return None
        return record[1]

    def read_block(self, block: int) -> bytes | None:
        """The bytes of a held block, checked against its digest as read; None when
        not held, or when the block no longer matches (the file is then dropped)."""
        if not self.has_block(block):
            return None
        span = self.layout.span(block)
        k = span.file
        with self._lock:
            partial = self._partials.get(k)
            if partial is not None:
                data = os.pread(partial.fd, span.length, span.offset)
                self.partial_reads += 1
            complete = self.file_complete(k)
        if partial is None:
            if not complete:
                return None  # dropped meanwhile
            if self.specs[k].root is not None and self.file_digests(k) is None:
                return None
            try:
                with open(self.model.folder / self.specs[k].name, "rb") as f:
                    f.seek(span.offset)
                    data = f.read(span.length)
            except OSError:
                data = b""
        try:
            intact = self.check_block(block, data)
        except LookupError:  # its digests were dropped meanwhile: the file went bad on another thread
            return None
        if intact:
            return data
        if partial is not None:
            # Written here verified, changed since: refuse it; the file's whole hash fails at completion.
            log.error("block %d of %s changed on disk since it was written; not serving it", block, partial.path)
        else:
            path = self.model.folder / self.specs[k].name
            log.error("local file %s changed on disk since it was verified; not serving it", path)
            self._drop_file(k)
        return None

    def _drop_file(self, k: int) -> None:
        """File k is bad on disk: no longer offered, and checked whole again if it comes back."""
        with self._lock:
            self._unmark_file(k)
            self.digests.pop(k, None)
            if k == self.n:
                self.model.header_present = False
            else:
                self.model.have[k] = False
        self.store.forget_verified(self.model.folder / self.specs[k].name)

    # ---- receiving -----------------------------------------------------------

    def needs_digests(self, k: int) -> bool:
        """Must file k's block digests be fetched before its blocks can be checked?"""
        return self.specs[k].root is not None and len(self.layout.file_blocks(k)) > 1 and k not in self.digests

    def accept_digests(self, k: int, digests: bytes) -> bool:
        """A peer's digest list for file k: kept if it matches the manifest's root."""
        spec = self.specs[k]
        if spec.root is None or len(digests) != DIGEST_SIZE * len(self.layout.file_blocks(k)):
            return False
        if block_root(digests) != spec.root:
            return False
        self.digests[k] = digests
        return True

    def check_block(self, block: int, data: bytes) -> bool:
        """Does `data` match block `block`? (Needs the file's digests, or, for an
        unblocked file, the whole file's hash.)"""
        span = self.layout.span(block)
        if len(data) != span.length:
            return False
        spec = self.specs[span.file]
        if spec.root is None:
            return spec.matches(hashlib.sha256(data).hexdigest())
        if len(self.layout.file_blocks(span.file)) == 1:  # one block: its root is the hash of its digest
            return block_root(hashlib.sha256(data).digest()) == spec.root
        digests = self.digests.get(span.file)
        if digests is None:
            raise LookupError(f"no digests for file {span.file}")
        j = block - self.layout.first[span.file]
        return hashlib.sha256(data).digest() == digests[j * DIGEST_SIZE : (j + 1) * DIGEST_SIZE]

    def check_and_write(self, block: int, data: bytes) -> bool | None:
        """`check_block`, then `write_block`: None when the data is wrong."""
        span = self.layout.span(block)
        spec = self.specs[span.file]
        if spec.root is not None and len(data) == spec.size == span.length:
            # A file that is one block (most fragments of a small model): its block
            # digest is its SHA-256, hashed here once, not again to write it.
            digest = hashlib.sha256(data).digest()
            if block_root(digest) != spec.root:
                return None
            if self.has_block(block):
                return False
            self._finish(span.file, data, digest)
            return True
        if not self.check_block(block, data):
            return None
        return self.write_block(block, data)

    def write_block(self, block: int, data: bytes) -> bool:
        """Store a checked block; True when it completed its file (then renamed into place)."""
        span = self.layout.span(block)
        k = span.file
        if self.has_block(block):
            return False
        spec = self.specs[k]
        if spec.root is None or len(self.layout.file_blocks(k)) == 1:
            self._finish(k, data)
            return True
        partial = self._partials.get(k)
        if partial is None:
            partial = self._start_partial(k)
            with self._lock:
                self._partials[k] = partial
        os.pwrite(partial.fd, data, span.offset)
        self._mark(block)
        partial.blocks_in += 1
        if span.offset == partial.hashed:  # it extends the hashed prefix, and so may blocks that came before it
            partial.sha256.update(data)
            partial.hashed += len(data)
            partial.catch_up(self._written_prefix_end(k, partial))
        if partial.blocks_in < len(self.layout.file_blocks(k)):
            return False
        self._complete_partial(k, partial)
        return True

    def _written_prefix_end(self, k: int, partial: _Partial) -> int:
        """The end of the run of held blocks of file k that starts at its hashed prefix."""
        blocks = self.layout.file_blocks(k)
        j = (partial.hashed + self.layout.block_size - 1) // self.layout.block_size
        end = partial.hashed
        while j < len(blocks) and self.has_block(blocks[j]):
            end = self.layout.span(blocks[j]).offset + self.layout.block_length(blocks[j])
            j += 1
        return end

    def _complete_partial(self, k: int, partial: _Partial) -> None:
        spec = self.specs[k]
        partial.catch_up(spec.size)  # every block is in: the rest of the file, out of order or resumed
        if not spec.matches(partial.sha256.hexdigest()):
            with self._lock:
                del self._partials[k]
                self._unmark_file(k)
            os.close(partial.fd)
            self._discard_resume(k)
            raise BadManifest(f"{spec.name}: blocks match the manifest's block_root but not its sha256")
        start_writeback(partial.fd)  # on disk by the next records' sync, mostly, instead of all then
        final = self.model.folder / spec.name
        os.replace(partial.path, final)  # the descriptor still reads the same file: readers go on meanwhile
        self.store.note_written(final)
        self._digests_path(k).unlink(missing_ok=True)
        with self._lock:
            self._set_complete(k, final)
            del self._partials[k]
            os.close(partial.fd)

    def _finish(self, k: int, data: bytes, digest: bytes | None = None) -> None:
        """A file that is one block (or unblocked): written whole, atomically.
        `digest`: its SHA-256, when the caller has it."""
        spec = self.specs[k]
        if digest is None:
            digest = hashlib.sha256(data).digest()
        if not spec.matches(digest.hex()):
            raise BadManifest(f"{spec.name}: block matches the manifest's block_root but not its sha256")
        digests = digest if len(data) <= self.layout.block_size else block_digests(data, self.layout.block_size)
        same = self.layout.block_size == BLOCK_SIZE
        self.store.write_file(self.model, k if k < self.n else -1, data, digests if same else None)
        recorded = same and (k == self.n or spec.sha256 is not None)  # the store's record holds them (write_file)
        if spec.root is not None and not recorded:
            self.digests[k] = digests  # else file_digests finds them in that record: not held twice
        self._mark_file(k)

    def _set_complete(self, k: int, path: Path) -> None:
        self.store.mark_verified(path, self.layout.block_size, self.digests[k])
        if k == self.n:
            self.model.header_present = True
        else:
            self.model.have[k] = True

    def close(self) -> None:
        """Close the partial files; they stay on disk for the next pull to resume."""
        with self._lock:
            partials = list(self._partials.values())
            self._partials.clear()
        for partial in partials:
            try:
                os.close(partial.fd)
            except OSError:
                pass

    # ---- resuming a killed pull ------------------------------------------------

    def _resume_path(self, k: int) -> Path:
        return self.model.folder / f"{RESUME_PREFIX}{self.specs[k].name}"

    def _digests_path(self, k: int) -> Path:
        return self.model.folder / f"{RESUME_PREFIX}{self.specs[k].name}.digests"

    def _start_partial(self, k: int) -> _Partial:
        """A new partial file for k, its block digests saved beside it first (not
        synced: a torn digest file fails its root check on resume, which costs
        only a refetch)."""
        digests_path = self._digests_path(k)
        tmp = digests_path.with_name(f"{PARTIAL_PREFIX}{digests_path.name}.{uuid.uuid4().hex[:12]}")
        try:
            tmp.write_bytes(self.digests[k])
            os.replace(tmp, digests_path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return _Partial(self._resume_path(k), self.specs[k].size)

    def _resume(self, k: int) -> None:
        """Adopt the verified blocks an earlier pull left of file k. Every written
        block is hashed again against the saved digests, so whatever a kill, a
        crash or a full disk left in the file, only matching blocks count."""
        spec = self.specs[k]
        blocks = self.layout.file_blocks(k)
        try:
            digests = self._digests_path(k).read_bytes()
            usable = (
                spec.root is not None
                and len(digests) == DIGEST_SIZE * len(blocks)
                and block_root(digests) == spec.root
                and self._resume_path(k).stat().st_size == spec.size
            )
            partial = _Partial(self._resume_path(k), spec.size, fresh=False) if usable else None
        except OSError:
            partial = None
        if partial is None:
            self._discard_resume(k)
            return
        good = []
        try:
            for j, b in enumerate(blocks):
                span = self.layout.span(b)
                if _written(partial.fd, span.offset, span.length):
                    data = os.pread(partial.fd, span.length, span.offset)
                    if hashlib.sha256(data).digest() == digests[j * DIGEST_SIZE : (j + 1) * DIGEST_SIZE]:
                        good.append(b)
        except OSError as e:  # unreadable: start the file afresh
            log.warning("cannot resume %s: %s", self._resume_path(k), e)
            os.close(partial.fd)
            self._discard_resume(k)
            return
        self.digests[k] = digests
        self._partials[k] = partial
        for b in good:
            self._mark(b)
            self.resumed_bytes += self.layout.block_length(b)
        partial.blocks_in = len(good)
        if good:
            log.info("resuming %s: %d of %d blocks already verified", spec.name, len(good), len(blocks))
        if partial.blocks_in == len(blocks):  # killed between its last block and its rename
            try:
                self._complete_partial(k, partial)
            except BadManifest as e:
                log.error("%s", e)  # fetched again, and the pull fails on it then

    def _discard_resume(self, k: int) -> None:
        self._resume_path(k).unlink(missing_ok=True)
        self._digests_path(k).unlink(missing_ok=True)


def _resume_names(folder: Path) -> set[str]:
    """The resume files in a model folder (listed once, not probed file by file)."""
    try:
        with os.scandir(folder) as entries:
            return {e.name for e in entries if e.name.startswith(RESUME_PREFIX)}
    except OSError:
        return set()
