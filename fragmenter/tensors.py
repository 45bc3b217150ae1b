"""Dequantize tensors from their fragments alone, with `gguf.quants`.

`validate_folder` walks every tensor a block of rows at a time, so memory stays
bounded by a fragment's worth of float32 however large the tensor is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import FragmenterError, FragmentError
from .folder import FragmentFolder, open_folder, read_fragment_chunks
from .gguf_header import TensorInfo
from .manifest import FragmentEntry

_BLOCK_BYTES = 8 * 1024 * 1024  # dequantize about this many input bytes at a time


def _tensor(folder: FragmentFolder, name: str) -> tuple[TensorInfo, list[FragmentEntry]]:
    info = next((t for t in folder.tensors if t.name == name), None)
    if info is None:
        raise FragmenterError(f"no tensor named {name!r} in this model")
    shards = sorted((f for f in folder.manifest.fragments if f.tensor_name == name), key=lambda f: f.shard_index)
    if sum(f.size for f in shards) != info.n_bytes:
        raise FragmentError(f"fragments of {name} do not add up to the tensor's {info.n_bytes} bytes")
    return info, shards


def _row_blocks(folder: FragmentFolder, info: TensorInfo, shards: list[FragmentEntry]) -> Iterator[np.ndarray]:
    """Yield (rows, dims[0]) float32 blocks of a tensor, shard bytes verified."""
    row = info.row_bytes
    rows_per_block = max(1, _BLOCK_BYTES // max(row, 1))
    pending = bytearray()
    for entry in shards:
        for chunk in read_fragment_chunks(folder.fragment_path(entry), entry):
            pending += chunk
            usable = len(pending) // (row * rows_per_block) * (row * rows_per_block)
            if usable:
                yield _dequantize_rows(info, bytes(pending[:usable]))
                del pending[:usable]
    if pending:
        yield _dequantize_rows(info, bytes(pending))


def _dequantize_rows(info: TensorInfo, data: bytes) -> np.ndarray:
    from gguf.quants import dequantize  # here: see gguf_header._quant_sizes

    raw = np.frombuffer(data, dtype=np.uint8).reshape(-1, info.row_bytes)
    try:
        values = dequantize(raw, info.ggml_type)
    except NotImplementedError:
        raise FragmenterError(f"cannot dequantize {info.ggml_type.name} (tensor {info.name})") from None
    return np.asarray(values, dtype=np.float32).reshape(raw.shape[0], info.dims[0] if info.dims else 1)


def load_tensor(path: Path | str, name: str) -> np.ndarray:
    """One tensor, dequantized to float32, in its logical (numpy) shape."""
    folder = open_folder(Path(path))
    info, shards = _tensor(folder, name)
    blocks = list(_row_blocks(folder, info, shards))
    flat = np.concatenate(blocks) if blocks else np.zeros((0,), dtype=np.float32)
    return flat.reshape(info.numpy_shape)


@dataclass
class ValidateReport:
    tensors: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def validate_folder(path: Path | str, progress: Callable[[int, int], None] | None = None) -> ValidateReport:
    """Dequantize every tensor from its fragments: shapes add up, values finite."""
    folder = open_folder(Path(path))
    report = ValidateReport()
    total = sum(t.n_bytes for t in folder.tensors)
    done = 0
    for info in folder.tensors:
        report.tensors += 1
        try:
            _, shards = _tensor(folder, info.name)
            rows = 0
            for block in _row_blocks(folder, info, shards):
                rows += block.shape[0]
                if not np.isfinite(block).all():
                    report.problems.append(f"{info.name}: non-finite values")
                    break
            else:
                expected_rows = info.n_elements // info.dims[0] if info.dims and info.dims[0] else 0
                if rows != expected_rows:
                    report.problems.append(f"{info.name}: {rows} rows, shape says {expected_rows}")
        except FragmenterError as e:
            report.problems.append(str(e))
        done += info.n_bytes
        if progress:
            progress(done, total)
    return report
