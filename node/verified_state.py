"""The per-folder record of files already checked against their full SHA-256.

Why: hashing a 400 GB model whole takes ~12 min of CPU, and without a record
every restart (and every re-pull of a model already held) did it again before
serving. A file whose size, mtime and inode still match its record is trusted with
the block digests saved there; each block read to send is still hashed
against its digest, so bytes that rot later (or a stray write that kept the
mtime) are never sent. ctime is left out on purpose: chmod, chown, a new hard
link or a backup tool's xattrs change it, and each would cost a 400 GB
re-hash that the per-block check makes unnecessary.

The record lives in the node's state dir (`DATA_DIR/.gguf-swarm/verified/`),
one file per model folder, not in the folder itself: the node already needs
that dir writable, model folders may be read-only (the existing tool's, a
read-only mount), a folder copied elsewhere carries no record that could look
valid there, and deleting one dir forces a full check.

Binary, little-endian, digests raw (a 400 GB model at 1 MiB blocks: 12.8 MB):

    magic b"GSWV1\\n"
    u16 cid length, model CID (ASCII)
    u32 record count, then per record:
        u16 name length, name (UTF-8), u64 size, i64 mtime_ns, u64 inode,
        u32 block size, u32 digest count, digests (32 bytes each)
    32 bytes: SHA-256 of everything before (a torn or edited file is ignored whole)

Reading is bounded by the size the model's manifest allows (see `max_bytes`)
and never raises on bad input: `decode` says why it refused.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass

from protocol.blocks import DIGEST_SIZE, block_count

MAGIC = b"GSWV1\n"
_RECORD = struct.Struct("<QqQII")  # size, mtime_ns, inode, block size, digest count
_OVERHEAD = 2 + _RECORD.size  # per record, besides its name and digests
MIN_BLOCK = 4096  # the fragmenter's smallest chunk; no block size below it is ours
MAX_BLOCK = 1 << 30


class BadState(ValueError):
    """A state file that is not one we wrote (torn, edited, another version)."""


@dataclass(frozen=True, slots=True)
class FileRecord:
    name: str
    size: int
    mtime_ns: int
    ino: int
    block_size: int
    digests: bytes

    @property
    def signature(self) -> tuple[int, int, int]:
        return (self.size, self.mtime_ns, self.ino)


def signature(st: os.stat_result) -> tuple[int, int, int]:
    """What must not change for a file to stay trusted."""
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def max_bytes(cid: str, files: dict[str, int], min_block: int) -> int:
    """The largest state file a model of these files (name -> size) can have."""
    body = sum(_OVERHEAD + len(n.encode()) + DIGEST_SIZE * block_count(s, min_block) for n, s in files.items())
    return len(MAGIC) + 2 + len(cid) + 4 + body + 32


def encode(cid: str, records: list[FileRecord]) -> bytearray:
    # One growing buffer, not copied: three parts per record, then their join,
    # held ~10 MB more at the end of a 40,000-fragment pull, its peak.
    out = bytearray(MAGIC)
    out += struct.pack("<H", len(cid))
    out += cid.encode("ascii")
    out += struct.pack("<I", len(records))
    for r in records:
        name = r.name.encode()
        out += struct.pack("<H", len(name))
        out += name
        out += _RECORD.pack(r.size, r.mtime_ns, r.ino, r.block_size, len(r.digests) // DIGEST_SIZE)
        out += r.digests
    out += hashlib.sha256(out).digest()
    return out


def decode(data: bytes | bytearray, cid: str) -> list[FileRecord]:
    """The records of a state file written for model `cid`; BadState when it is not one."""
    if len(data) < len(MAGIC) + 32 or not data.startswith(MAGIC):
        raise BadState("not a verified-state file")
    body, check = data[:-32], data[-32:]
    if hashlib.sha256(body).digest() != check:
        raise BadState("checksum mismatch (torn or edited)")
    try:
        return _parse(memoryview(body), cid)
    except (struct.error, UnicodeDecodeError, IndexError) as e:
        raise BadState(f"malformed: {e}") from None


def _parse(view: memoryview, cid: str) -> list[FileRecord]:
    pos = len(MAGIC)
    (n,) = struct.unpack_from("<H", view, pos)
    pos += 2
    if bytes(view[pos : pos + n]) != cid.encode("ascii"):
        raise BadState("written for another model")
    pos += n
    (count,) = struct.unpack_from("<I", view, pos)
    pos += 4
    records: list[FileRecord] = []
    for _ in range(count):
        (n,) = struct.unpack_from("<H", view, pos)
        name = bytes(view[pos + 2 : pos + 2 + n]).decode()
        pos += 2 + n
        size, mtime_ns, ino, block_size, digests = _RECORD.unpack_from(view, pos)
        pos += _RECORD.size
        if not MIN_BLOCK <= block_size <= MAX_BLOCK or digests != block_count(size, block_size):
            raise BadState(f"{name}: digest count does not fit its size")
        end = pos + digests * DIGEST_SIZE
        if end > len(view):
            raise BadState("truncated")
        records.append(FileRecord(name, size, mtime_ns, ino, block_size, bytes(view[pos:end])))
        pos = end
    if pos != len(view):
        raise BadState("trailing bytes")
    return records
