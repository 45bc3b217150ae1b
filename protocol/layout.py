"""The block space of one model: every file a swarm exchanges, cut into blocks.

Files are the manifest's fragments in manifest order (file k = fragment k),
then `gguf_header.dat` last (file n). Blocks are numbered globally, file by
file. A file with a `block_root` is cut at `block_size`; a file without one
(a manifest written before blocks existed) is one block, checked whole against
its SHA-256. Pure arithmetic; the node and the session state machine share it.
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .blocks import BLOCK_SIZE, block_count


@dataclass(frozen=True)
class BlockSpan:
    file: int
    offset: int  # within the file
    length: int


class BlockLayout:
    def __init__(self, sizes: Sequence[int], blocked: Sequence[bool], block_size: int = BLOCK_SIZE) -> None:
        """`sizes[k]`: bytes of file k; `blocked[k]`: file k has a block_root (else one block)."""
        if len(sizes) != len(blocked):
            raise ValueError("sizes and blocked differ in length")
        self.block_size = block_size
        # Arrays, not lists of ints: 40,000 files cost 8 bytes each here, not ~40.
        self.sizes = array("q", sizes)
        self.blocked = bytes(bool(b) for b in blocked)
        self.first = array("q")  # first global block of each file
        total = 0
        for size, has_root in zip(self.sizes, self.blocked, strict=True):
            self.first.append(total)
            total += block_count(size, block_size) if has_root else 1
        self.total_blocks = total

    @property
    def file_count(self) -> int:
        return len(self.sizes)

    def file_blocks(self, file: int) -> range:
        end = self.first[file + 1] if file + 1 < len(self.first) else self.total_blocks
        return range(self.first[file], end)

    def file_of(self, block: int) -> int:
        if not 0 <= block < self.total_blocks:
            raise IndexError(f"block {block} out of range")
        return bisect.bisect_right(self.first, block) - 1

    def span(self, block: int) -> BlockSpan:
        file = self.file_of(block)
        size = self.sizes[file]
        if not self.blocked[file]:
            return BlockSpan(file, 0, size)
        offset = (block - self.first[file]) * self.block_size
        return BlockSpan(file, offset, min(self.block_size, size - offset))

    def block_length(self, block: int) -> int:
        # span() without the BlockSpan: called per request queued, per block received
        if not 0 <= block < self.total_blocks:
            raise IndexError(f"block {block} out of range")
        file = bisect.bisect_right(self.first, block) - 1
        size = self.sizes[file]
        if not self.blocked[file]:
            return size
        return min(self.block_size, size - (block - self.first[file]) * self.block_size)

    def block_bytes(self, blocks: Iterable[int]) -> int:
        return sum(self.block_length(b) for b in blocks)
