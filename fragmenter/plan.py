"""Plan how a GGUF file is cut into shards: a pure function of its header.

The file is covered, in offset order, by the header, shards and gaps:

    [ header | gap? | shard | shard | gap? | shard | ... | gap? ]  == file_size

A shard is a slice of one tensor. Its length is the largest whole number of
rows that fits in the chunk, so each shard can be dequantized on its own; a
row bigger than the chunk falls back to plain chunk-sized cuts. Gaps are the
alignment padding between tensors and anything after the last one; assembly
re-creates them (zeros, or the bytes kept in the manifest).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import GGUFFormatError
from .gguf_header import GGUFHeader, TensorInfo


@dataclass(frozen=True)
class ShardPlan:
    tensor: TensorInfo
    shard_index: int
    total_shards: int
    file_offset: int  # absolute offset in the original file
    size: int


@dataclass(frozen=True)
class GapPlan:
    file_offset: int
    size: int


@dataclass(frozen=True)
class FilePlan:
    shards: list[ShardPlan]  # in file order
    gaps: list[GapPlan]  # in file order


def shard_length(tensor: TensorInfo, chunk_size: int) -> int:
    row = tensor.row_bytes
    if 0 < row <= chunk_size:
        return chunk_size // row * row
    return chunk_size


def plan_file(header: GGUFHeader, file_size: int, chunk_size: int) -> FilePlan:
    if chunk_size <= 0:
        raise ValueError("chunk size must be positive")
    shards: list[ShardPlan] = []
    gaps: list[GapPlan] = []
    pos = header.data_start
    for t in sorted(header.tensors, key=lambda t: (t.offset, t.name)):
        start = header.data_start + t.offset
        if start < pos:
            raise GGUFFormatError(f"corrupt GGUF: tensor {t.name} overlaps the previous tensor")
        end = start + t.n_bytes
        if end > file_size:
            raise GGUFFormatError(
                f"tensor {t.name} runs past the end of the file ({end} > {file_size} bytes): truncated?"
            )
        if start > pos:
            gaps.append(GapPlan(pos, start - pos))
        step = shard_length(t, chunk_size)
        total = max(1, -(-t.n_bytes // step))
        for i in range(total):
            off = i * step
            shards.append(ShardPlan(t, i, total, start + off, min(step, t.n_bytes - off)))
        pos = end
    if pos < file_size:
        gaps.append(GapPlan(pos, file_size - pos))
    return FilePlan(shards, gaps)
