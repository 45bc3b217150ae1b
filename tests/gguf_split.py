"""llama.cpp's `gguf-split --split-max-tensors N MODEL PREFIX`, byte for byte,
in Python (tools/gguf-split/gguf-split.cpp, `split_strategy`), so tests can
split the real Gemma the way users' split models are made without building
llama.cpp. Checked against llama.cpp's own `llama-gguf-split` on Gemma (its
parts are identical, see `test_llama_cpp_split.py`).

What the tool writes, part k of n (PREFIX-0000k-of-0000n.gguf):
- GGUF v3; part 1 carries every metadata pair of the model, copied as
  encoded and in order, every part then `split.no` (u16, from 0),
  `split.tensors.count` (i32, the model's total) and `split.count` (u16:
  set again once known, and gguf_set_val moves a key it sets to the end);
- up to N tensor infos in the model's order, dims trimmed of trailing ones
  (`ggml_n_dims`), offsets from 0 padded to 32 bytes (a fresh gguf context
  aligns at GGUF_DEFAULT_ALIGNMENT whatever the copied metadata says);
- the header padded with zeros to 32, then each tensor's bytes, padded with
  zeros to 32.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

from fragmenter.gguf_header import align, metadata_spans, parse_header

ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT
_UINT16, _INT32 = 2, 5  # gguf_type


def _string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def _pair(key: str, vtype: int, fmt: str, value: int) -> bytes:
    return _string(key) + struct.pack("<I" + fmt, vtype, value)


def gguf_split(model: Path, prefix: Path, max_tensors: int) -> list[Path]:
    """Split `model` into parts of at most `max_tensors` tensors; their paths."""
    with open(model, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        header = parse_header(buf)
        if "general.alignment" in header.metadata:
            raise ValueError("models with general.alignment are not split the way llama.cpp reads them back")
        model_pairs = [bytes(buf[start:end]) for _, start, end in metadata_spans(buf)]
        tensors = header.tensors
        groups = [tensors[i : i + max_tensors] for i in range(0, len(tensors), max_tensors)]
        paths = []
        for k, group in enumerate(groups):
            pairs = (model_pairs if k == 0 else []) + [
                _pair("split.no", _UINT16, "H", k),
                _pair("split.tensors.count", _INT32, "i", len(tensors)),
                _pair("split.count", _UINT16, "H", len(groups)),  # set last, once the count is known
            ]
            infos = []
            offset = 0
            for t in group:
                dims = list(t.dims) or [1]
                while len(dims) > 1 and dims[-1] == 1:
                    dims.pop()
                infos.append(
                    _string(t.name)
                    + struct.pack(f"<I{len(dims)}Q", len(dims), *dims)
                    + struct.pack("<IQ", t.ggml_type, offset)
                )
                offset += align(t.n_bytes, ALIGNMENT)
            meta = b"GGUF" + struct.pack("<IQQ", 3, len(group), len(pairs)) + b"".join(pairs) + b"".join(infos)
            path = prefix.with_name(f"{prefix.name}-{k + 1:05d}-of-{len(groups):05d}.gguf")
            with open(path, "wb") as out:
                out.write(meta + bytes(align(len(meta), ALIGNMENT) - len(meta)))
                for t in group:
                    start = header.data_start + t.offset
                    out.write(buf[start : start + t.n_bytes])
                    out.write(bytes(align(t.n_bytes, ALIGNMENT) - t.n_bytes))
            paths.append(path)
    return paths
