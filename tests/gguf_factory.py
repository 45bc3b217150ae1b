"""Small, real GGUF files written with gguf.GGUFWriter for fast tests."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import quantize

# A tiny SentencePiece-style vocabulary: control, byte and normal pieces.
SPM_TOKENS = (
    ["<pad>", "<eos>", "<bos>", "<unk>"]
    + [f"<0x{b:02X}>" for b in range(256)]
    + [
        "\u2581",
        "h",
        "e",
        "l",
        "o",
        "w",
        "r",
        "d",
        "he",
        "ll",
        "llo",
        "hello",
        "\u2581hello",
        "\u2581w",
        "or",
        "\u2581wor",
        "\u2581world",
        "ld",
        "  ",
    ]
)
SPM_TYPES = [3, 3, 3, 3] + [6] * 256 + [1] * 18 + [4]


def _k_blocks(qtype: T, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant blocks whose f16 scales are finite, so they dequantize cleanly."""
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    raw = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    if qtype == T.Q4_K:
        raw[:, 0:2] = scale
        raw[:, 2:4] = scale
    elif qtype == T.Q6_K:
        raw[:, 208:210] = scale
    return raw


def tensor_bytes(qtype: T, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Encoded tensor data of logical numpy `shape` in `qtype`, as the writer wants it."""
    values = rng.standard_normal(shape).astype(np.float32)
    if qtype == T.F32:
        return values
    if qtype == T.F16:
        return values.astype(np.float16)
    if qtype in (T.Q4_K, T.Q6_K):
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        per_row = shape[-1] // block
        return _k_blocks(qtype, rows * per_row, rng).reshape(*shape[:-1], per_row * size)
    return quantize(values, qtype)


def _writer(
    path: Path,
    arch: str,
    vocab: bool,
    alignment: int | None,
    tokenizer_model: str = "llama",
    split_max_tensors: int = 0,
    small_first_shard: bool = False,
) -> gguf.GGUFWriter:
    """A writer holding the metadata every test model has; with
    `split_max_tensors`, it writes llama.cpp split parts PATH-00001-of-0000N.gguf ..."""
    w = gguf.GGUFWriter(str(path), arch, split_max_tensors=split_max_tensors, small_first_shard=small_first_shard)
    w.add_block_count(2)
    w.add_embedding_length(64)
    w.add_head_count(4)
    w.add_context_length(128)
    w.add_layer_norm_rms_eps(1e-6)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    if vocab:
        w.add_tokenizer_model(tokenizer_model)
        w.add_token_list(SPM_TOKENS)
        w.add_token_scores([0.0] * 4 + [0.0] * 256 + [-float(i) for i in range(18)] + [0.0])
        w.add_token_types(SPM_TYPES)
        w.add_bos_token_id(2)
        w.add_eos_token_id(1)
        w.add_unk_token_id(3)
        w.add_add_bos_token(True)
        w.add_add_space_prefix(False)
    return w


def write_vocab_only(
    path: Path,
    alignment: int | None = None,
    padded: bool = False,
    chat_template: str | None = None,
    tokenizer_model: str = "llama",
) -> Path:
    """A GGUF with metadata and no tensors, like llama.cpp's models/ggml-vocab-*.gguf:
    by default it ends right after the metadata, with no alignment padding."""
    w = _writer(path, "llama", True, alignment, tokenizer_model)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    if padded:
        w.write_tensors_to_file()  # no tensor infos, then padding to the alignment
    else:
        w.write_ti_data_to_file()
    w.close()
    return path


def set_version(path: Path, version: int) -> Path:
    """Patch the version field (bytes 4..8) in place: v2 and v3 files differ only there."""
    data = bytearray(path.read_bytes())
    data[4:8] = struct.pack("<I", version)
    path.write_bytes(bytes(data))
    return path


def write_model(
    path: Path,
    tensors: list[tuple[str, T, tuple[int, ...]]],
    seed: int = 0,
    vocab: bool = True,
    alignment: int | None = None,
    arch: str = "llama",
    split_max_tensors: int = 0,
    small_first_shard: bool = False,
) -> Path:
    """A model in `path`; split into parts of at most `split_max_tensors`
    tensors (named from `path`, which is then not written) when that is set."""
    rng = np.random.default_rng(seed)
    w = _writer(path, arch, vocab, alignment, split_max_tensors=split_max_tensors, small_first_shard=small_first_shard)
    for name, qtype, shape in tensors:
        data = tensor_bytes(qtype, shape, rng)
        raw_dtype = None if qtype in (T.F32, T.F16) else qtype
        w.add_tensor(name, data, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# Many types, sizes that force padding, 1- to 3-dimensional, some larger than a 4 KiB chunk.
MIXED = [
    ("token_embd.weight", T.Q8_0, (40, 64)),
    ("blk.0.attn_norm.weight", T.F32, (7,)),  # 28 bytes: forces padding
    ("blk.0.attn_q.weight", T.Q4_0, (64, 64)),
    ("blk.0.attn_q.bias", T.F32, (5,)),
    ("blk.0.ffn_up.weight", T.Q4_K, (8, 512)),
    ("blk.1.ffn_down.weight", T.Q6_K, (4, 256)),
    ("blk.1.attn_k.weight", T.F16, (3, 33)),  # 198 bytes
    ("blk.1.ffn_gate_exps.weight", T.F32, (2, 3, 64)),  # 3-D
    ("output_norm.weight", T.F32, (64,)),
    ("output.weight", T.Q8_0, (50, 64)),
]
