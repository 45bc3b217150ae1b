"""Verified blocks: how a fragment is cut into blocks and how blocks are checked.

A fragment (or `gguf_header.dat`) of `size` bytes is cut into blocks of
`BLOCK_SIZE` bytes, the last one shorter. Its `block_root` (manifest field) is
the SHA-256 of the concatenated raw SHA-256 digests of its blocks, so a peer
can fetch the digest list of one file on demand (32 bytes per MiB: 320 bytes
for a 10 MiB fragment, 32 KiB at the 1 GiB cap) and check it against the
manifest before checking any block against it.

Why a flat list rather than BitTorrent v2's Merkle tree (BEP 52) or BLAKE3/BAO
(iroh-blobs): our files are small (10 MiB fragments), so the whole list of one
file is fetched in one short message and no proofs are needed; SHA-256 keeps
one hash family across the format (the user's `sha256`/`checksum` fields and
the CIDs are SHA-256), and hashlib's SHA-256 releases the GIL and runs at disk
speed. A file of one block has root = sha256(sha256(data)).
"""

from __future__ import annotations

import hashlib

BLOCK_SIZE = 1 << 20
DIGEST_SIZE = 32


def block_count(size: int, block_size: int = BLOCK_SIZE) -> int:
    """Blocks in a file of `size` bytes (an empty file is one empty block)."""
    return max(1, -(-size // block_size))


def block_digests(data: bytes | bytearray | memoryview, block_size: int = BLOCK_SIZE) -> bytes:
    """The concatenated raw SHA-256 digests of each block of `data`."""
    view = memoryview(data)
    if len(view) == 0:
        return hashlib.sha256(b"").digest()
    return b"".join(hashlib.sha256(view[i : i + block_size]).digest() for i in range(0, len(view), block_size))


def block_root(digests: bytes) -> str:
    """The `block_root` (hex) of a file whose block digests are `digests`."""
    return hashlib.sha256(digests).hexdigest()


class BlockHasher:
    """Block digests of a stream fed in pieces of any size (the fragmenter's reads)."""

    def __init__(self, block_size: int = BLOCK_SIZE) -> None:
        self.block_size = block_size
        self._digests: list[bytes] = []
        self._current = hashlib.sha256()
        self._filled = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while len(view):
            take = min(len(view), self.block_size - self._filled)
            self._current.update(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == self.block_size:
                self._digests.append(self._current.digest())
                self._current = hashlib.sha256()
                self._filled = 0

    def digests(self) -> bytes:
        tail = [self._current.digest()] if self._filled or not self._digests else []
        return b"".join(self._digests + tail)

    def root(self) -> str:
        return block_root(self.digests())
