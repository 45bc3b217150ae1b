"""Tokenizer files from a GGUF vocabulary (`tokenizer.ggml.*`).

- `tokenizer.json` (Hugging Face `tokenizers`):
  * SentencePiece-style vocabularies (`tokenizer.ggml.model == "llama"`): llama.cpp
    merges adjacent symbols by the score of the merged piece, then falls back to
    bytes. That is BPE whose merge ranks follow piece scores, with byte fallback
    (the construction transformers' SentencePiece converters use). Control and
    user-defined tokens are split out of the raw text first, as llama.cpp does.
  * BPE vocabularies (`"gpt2"`): byte-level BPE with the file's own merges and
    the pre-tokenizer regex llama.cpp uses for `tokenizer.ggml.pre`.
- `tokenizer.model` (SentencePiece protobuf, BPE type) for SentencePiece
  vocabularies, encoded here by hand: it is a flat message and the protobuf
  runtime is not worth a dependency.
"""

from __future__ import annotations

import json
import struct
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .errors import FragmenterError
from .fsio import open_staging_file
from .gguf_header import GGUFArray, GGUFHeader

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_MODEL = "tokenizer.model"

# llama.cpp token types (the same numbers as SentencePiece's piece types).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer regexes of llama.cpp (llama-vocab.cpp) by `tokenizer.ggml.pre`.
_LLAMA3_REGEX = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_BPE_PRE_REGEX = {
    "llama3": _LLAMA3_REGEX,
    "llama-bpe": _LLAMA3_REGEX,
    "dbrx": _LLAMA3_REGEX,
    "smaug-bpe": _LLAMA3_REGEX,
    "qwen2": _QWEN2_REGEX,
    "deepseek-r1-qwen": _QWEN2_REGEX,
}


class _Vocab:
    def __init__(self, header: GGUFHeader) -> None:
        md = header.metadata
        tokens = md.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, GGUFArray):
            raise FragmenterError("this model has no vocabulary (tokenizer.ggml.tokens)")
        self.model = md.get("tokenizer.ggml.model")
        self.pre = md.get("tokenizer.ggml.pre", "default")
        self.tokens = tokens.strings()
        n = len(self.tokens)
        scores = md.get("tokenizer.ggml.scores")
        types = md.get("tokenizer.ggml.token_type")
        # Compact containers with fast element access: a 262k vocabulary as
        # Python lists of floats and ints would cost tens of MB.
        self.scores: array[float] = (
            array("d", scores.values.astype(np.float64).tobytes())
            if (isinstance(scores, GGUFArray) and scores.values is not None)
            else array("d", bytes(8 * n))
        )
        self.types: bytes = (
            types.values.astype(np.uint8).tobytes()
            if (isinstance(types, GGUFArray) and types.values is not None)
            else bytes([NORMAL]) * n
        )
        if len(self.scores) != n or len(self.types) != n:
            raise FragmenterError("corrupt vocabulary: tokens, scores and types differ in length")
        merges = md.get("tokenizer.ggml.merges")
        self.merges = merges.strings() if isinstance(merges, GGUFArray) else []
        self.bos = md.get("tokenizer.ggml.bos_token_id")
        self.eos = md.get("tokenizer.ggml.eos_token_id")
        self.unk = md.get("tokenizer.ggml.unknown_token_id")
        self.pad = md.get("tokenizer.ggml.padding_token_id")
        self.add_bos = bool(md.get("tokenizer.ggml.add_bos_token", self.model == "llama"))
        self.add_eos = bool(md.get("tokenizer.ggml.add_eos_token", False))
        self.add_space_prefix = bool(md.get("tokenizer.ggml.add_space_prefix", self.model == "llama"))
        self.ids: dict[str, int] = {}
        for i, t in enumerate(self.tokens):
            self.ids.setdefault(t, i)

    def token(self, i: Any) -> str | None:
        return self.tokens[i] if isinstance(i, int) and 0 <= i < len(self.tokens) else None


@contextmanager
def _open_atomic(path: Path) -> Iterator[BinaryIO]:
    """`path` for writing, under a staging name until written whole: a pull that
    builds these beside its fragments and is killed (or runs out of disk) midway
    leaves no half-written tokenizer file."""
    with open_staging_file(path) as tmp, open(tmp, "wb") as out:
        yield out


def write_tokenizer_files(header: GGUFHeader, folder: Path) -> list[str]:
    """Write the tokenizer files this model's vocabulary allows; return their names."""
    if "tokenizer.ggml.tokens" not in header.metadata:
        return []
    vocab = _Vocab(header)
    if vocab.model == "llama":
        with _open_atomic(folder / TOKENIZER_JSON) as out:
            _write_tokenizer_json(out, _spm_parts(vocab), vocab, *spm_merges(vocab))
        with _open_atomic(folder / TOKENIZER_MODEL) as out:
            write_spm_model_proto(vocab, out)
        return [TOKENIZER_JSON, TOKENIZER_MODEL]
    if vocab.model == "gpt2":
        with _open_atomic(folder / TOKENIZER_JSON) as out:
            _write_tokenizer_json(out, _bpe_parts(vocab), vocab, *bpe_merges(vocab))
        return [TOKENIZER_JSON]
    raise FragmenterError(f"tokenizer model {vocab.model!r} is not supported (only 'llama' and 'gpt2')")


def _added_tokens(vocab: _Vocab) -> list[dict[str, Any]]:
    out = []
    for i, (t, ty) in enumerate(zip(vocab.tokens, vocab.types, strict=True)):
        if ty in (CONTROL, USER_DEFINED, UNKNOWN) and vocab.ids.get(t) == i:
            out.append(
                {
                    "id": i,
                    "content": t,
                    "single_word": False,
                    "lstrip": False,
                    "rstrip": False,
                    "normalized": False,
                    "special": ty != USER_DEFINED,
                }
            )
    return out


def _post_processor(vocab: _Vocab) -> dict[str, Any] | None:
    single: list[dict[str, Any]] = []
    special: dict[str, Any] = {}
    pieces: list[tuple[bool, Any]] = [(vocab.add_bos, vocab.bos), (False, None), (vocab.add_eos, vocab.eos)]
    for pos, (on, tid) in enumerate(pieces):
        if pos == 1:
            single.append({"Sequence": {"id": "A", "type_id": 0}})
        elif on and (name := vocab.token(tid)) is not None:
            single.append({"SpecialToken": {"id": name, "type_id": 0}})
            special[name] = {"id": name, "ids": [tid], "tokens": [name]}
    if not special:
        return None
    pair = single + [s if "SpecialToken" in s else {"Sequence": {"id": "B", "type_id": 1}} for s in single[1:]]
    return {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special}


def spm_merges(vocab: _Vocab) -> tuple[np.ndarray, np.ndarray]:
    """BPE merges as arrays of (left id, right id), ranked by the score of the
    merged piece, highest first (ties: by the ids of the two halves)."""
    ids = vocab.ids
    lefts: array[int] = array("q")
    rights: array[int] = array("q")
    scores: array[float] = array("d")
    types, all_scores = vocab.types, vocab.scores
    for piece, i in ids.items():
        if types[i] != NORMAL or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            li = ids.get(piece[:cut])
            if li is not None:
                ri = ids.get(piece[cut:])
                if ri is not None:
                    lefts.append(li)
                    rights.append(ri)
                    scores.append(-all_scores[i])
    left_a, right_a = np.frombuffer(lefts, dtype=np.int64), np.frombuffer(rights, dtype=np.int64)
    order = np.lexsort((right_a, left_a, np.frombuffer(scores, dtype=np.float64)))
    return left_a[order], right_a[order]


def bpe_merges(vocab: _Vocab) -> tuple[np.ndarray, np.ndarray]:
    """The file's own merges ("left right") as arrays of token ids."""
    ids = vocab.ids
    lefts, rights = array("q"), array("q")
    for n, merge in enumerate(vocab.merges):
        left, _, right = merge.partition(" ")
        if left not in ids or right not in ids:
            raise FragmenterError(f"corrupt vocabulary: merge #{n} {merge!r} names unknown tokens")
        lefts.append(ids[left])
        rights.append(ids[right])
    return np.frombuffer(lefts, dtype=np.int64), np.frombuffer(rights, dtype=np.int64)


def _spm_parts(vocab: _Vocab) -> dict[str, Any]:
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
    normalizer: dict[str, Any] = replace
    decoders: list[dict[str, Any]] = [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ]
    if vocab.add_space_prefix:
        normalizer = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"}, replace]}
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": _added_tokens(vocab),
        "normalizer": normalizer,
        "pre_tokenizer": None,
        "post_processor": _post_processor(vocab),
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": vocab.token(vocab.unk),
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
        },
    }


def _write_tokenizer_json(
    out: BinaryIO, parts: dict[str, Any], vocab: _Vocab, lefts: np.ndarray, rights: np.ndarray
) -> None:
    """Stream the JSON. Merges are given as token ids and written from
    pre-encoded token strings in batches: half a million merges as Python
    pairs would cost seconds and tens of MB."""
    encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
    model = parts.pop("model")
    out.write(encode(parts)[:-1].encode("utf-8"))
    out.write(b',"model":' + encode(model)[:-1].encode("utf-8") + b',"vocab":')
    out.write(encode(vocab.ids).encode("utf-8") + b',"merges":[')
    quoted = np.array([encode(t) for t in vocab.tokens], dtype=object)
    step = 65536
    for start in range(0, len(lefts), step):
        batch = "[" + quoted[lefts[start : start + step]] + "," + quoted[rights[start : start + step]] + "]"
        out.write((b"," if start else b"") + ",".join(batch.tolist()).encode("utf-8"))
    out.write(b"]}}")


def _bpe_parts(vocab: _Vocab) -> dict[str, Any]:
    regex = _BPE_PRE_REGEX.get(str(vocab.pre))
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": regex is None}
    pre: dict[str, Any] = byte_level
    if regex is not None:
        split = {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}
        pre = {"type": "Sequence", "pretokenizers": [split, byte_level]}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": _added_tokens(vocab),
        "normalizer": None,
        "pre_tokenizer": pre,
        "post_processor": _post_processor(vocab),
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,
        },
    }


# ---- SentencePiece ModelProto, by hand ---------------------------------------


def _varint(n: int) -> bytes:
    if n < 0:
        n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field_varint(num: int, value: int) -> bytes:
    return _varint(num << 3) + _varint(value)


def _field_bytes(num: int, data: bytes) -> bytes:
    return _varint(num << 3 | 2) + _varint(len(data)) + data


def _field_float(num: int, value: float) -> bytes:
    return _varint(num << 3 | 5) + struct.pack("<f", value)


def write_spm_model_proto(vocab: _Vocab, out: BinaryIO) -> None:
    pieces: list[bytes] = []
    pack_score = struct.Struct("<f").pack
    for piece, score, ty in zip(vocab.tokens, vocab.scores, vocab.types, strict=True):
        if ty == USER_DEFINED:
            # SentencePiece matches user-defined pieces after escaping spaces.
            piece = piece.replace(" ", "\u2581")
        raw = piece.encode("utf-8")
        body = b"\x0a" + _varint(len(raw)) + raw + b"\x15" + pack_score(score)  # fields 1 (piece), 2 (score)
        if ty != NORMAL:
            body += b"\x18" + _varint(ty if ty in (UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE) else NORMAL)
        pieces.append(b"\x0a" + _varint(len(body)) + body)  # ModelProto field 1 (pieces)
    out.write(b"".join(pieces))
    trainer = _field_varint(3, 2) + _field_varint(4, len(vocab.tokens))  # model_type BPE
    trainer += _field_varint(26, 1)  # allow_whitespace_only_pieces
    trainer += _field_varint(35, int(BYTE in vocab.types))  # byte_fallback
    for num, tid in ((40, vocab.unk), (41, vocab.bos), (42, vocab.eos), (43, vocab.pad)):
        trainer += _field_varint(num, tid if isinstance(tid, int) else -1)
    out.write(_field_bytes(2, trainer))
    normalizer = _field_bytes(1, b"identity") + _field_varint(3, int(vocab.add_space_prefix))
    normalizer += _field_varint(4, 0) + _field_varint(5, 1)  # keep whitespace runs; escape spaces as U+2581
    out.write(_field_bytes(3, normalizer))
