"""Tokenizer files from a GGUF vocabulary (`tokenizer.ggml.*`).

- `tokenizer.json` (Hugging Face `tokenizers`):
  * SentencePiece-style vocabularies (`tokenizer.ggml.model == "llama"`): llama.cpp
    merges adjacent symbols by the score of the merged piece, then falls back to
    bytes. That is BPE whose merge ranks follow piece scores, with byte fallback
    (the construction transformers' SentencePiece converters use).
  * BPE vocabularies (`"gpt2"`): byte-level BPE with the file's own merges and
    the pre-tokenizer regexes llama.cpp uses for `tokenizer.ggml.pre` (llama_pre.py).
  * Gemma 4 (`"gemma4"`): BPE on raw UTF-8 with byte fallback; BERT (`"bert"`):
    WordPiece; T5-style (`"t5"`): Unigram with the file's precompiled character map.
  * All: control, user-defined and unknown tokens (plus those llama.cpp treats so
    by their text) are split out of the raw text first, as llama.cpp does; control
    and unknown ones are `special`, so `encode_special_tokens = True` gives
    llama.cpp's parse_special = false. Token ids are checked against llama.cpp's
    (tests/unit/test_llama_vocab.py).
- `tokenizer.model` (SentencePiece protobuf, BPE type) for SentencePiece
  vocabularies, encoded here by hand: it is a flat message and the protobuf
  runtime is not worth a dependency.
- `tokenizer_config.json` and `special_tokens_map.json`: the special tokens,
  `add_bos_token`/`add_eos_token` and the `chat_template` from the GGUF keys,
  so `transformers.AutoTokenizer` loads the folder like a Hugging Face repo.
"""

from __future__ import annotations

import base64
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
from .llama_pre import ADD_BOS, pre_tokenizer_regexes

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
TOKENIZER_MODEL = "tokenizer.model"

# llama.cpp token types (the same numbers as SentencePiece's piece types).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


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
        # llama.cpp's defaults when the file does not say (out-of-range ones are dropped).
        defaults = {"llama": (1, 2, 0), "gpt2": (11, 11, None), "bert": (101, None, 100), "t5": (None, 1, 2)}
        bos, eos, unk = defaults.get(str(self.model), (None, None, None))
        self.bos = self._id(md.get("tokenizer.ggml.bos_token_id", bos))
        self.eos = self._id(md.get("tokenizer.ggml.eos_token_id", eos))
        self.unk = self._id(md.get("tokenizer.ggml.unknown_token_id", unk))
        self.pad = md.get("tokenizer.ggml.padding_token_id")
        if self.model == "gemma4":
            self.pre = "gemma4"  # llama.cpp ignores the file's
        self.add_bos = bool(md.get("tokenizer.ggml.add_bos_token", self.model == "llama" or self.pre in ADD_BOS))
        self.remove_extra_whitespaces = bool(md.get("tokenizer.ggml.remove_extra_whitespaces", False))
        charsmap = md.get("tokenizer.ggml.precompiled_charsmap")
        self.charsmap = (
            charsmap.values.astype(np.uint8).tobytes()
            if isinstance(charsmap, GGUFArray) and charsmap.values is not None
            else b""
        )
        self.add_bos |= self.pre in ("gemma4", "granite-embed-multi-311m")  # llama.cpp forces it for these
        self.sep = self._id(md.get("tokenizer.ggml.seperator_token_id", 102 if self.model == "bert" else None))
        if self.model == "bert":  # llama.cpp's WordPiece adds [CLS] and [SEP] whatever the file says
            self.add_bos, self.add_eos = True, False
        self.lowercase = bool(md.get("tokenizer.ggml.normalizer.lowercase", True))
        self.strip_accents = bool(md.get("tokenizer.ggml.normalizer.strip_accents", self.lowercase))
        self.add_eos = bool(md.get("tokenizer.ggml.add_eos_token", self.model == "t5"))
        self.add_space_prefix = bool(md.get("tokenizer.ggml.add_space_prefix", self.model == "llama"))
        self.name = str(md.get("general.name", "")).lower()
        self.arch = str(md.get("general.architecture", ""))
        self.keys = frozenset(md)
        self.ids: dict[str, int] = {}
        for i, t in enumerate(self.tokens):
            self.ids.setdefault(t, i)

    def _id(self, i: Any) -> int | None:
        return i if isinstance(i, int) and 0 <= i < len(self.tokens) else None

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
    names = [TOKENIZER_JSON]
    if vocab.model == "llama":
        with _open_atomic(folder / TOKENIZER_JSON) as out:
            _write_tokenizer_json(out, _spm_parts(vocab), vocab, *spm_merges(vocab))
        with _open_atomic(folder / TOKENIZER_MODEL) as out:
            write_spm_model_proto(vocab, out)
        names.append(TOKENIZER_MODEL)
    elif vocab.model in ("bert", "t5"):  # WordPiece, Unigram: small enough to build whole
        build = _wpm_tokenizer if vocab.model == "bert" else _ugm_tokenizer
        with _open_atomic(folder / TOKENIZER_JSON) as out:
            out.write(json.dumps(build(vocab), ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
    elif vocab.model == "gemma4" or (vocab.model == "gpt2" and vocab.pre in _UTF8_BPE_PRE):
        with _open_atomic(folder / TOKENIZER_JSON) as out:
            _write_tokenizer_json(out, _utf8_bpe_parts(vocab), vocab, *bpe_merges(vocab))
    elif vocab.model == "gpt2":
        with _open_atomic(folder / TOKENIZER_JSON) as out:
            _write_tokenizer_json(out, _bpe_parts(vocab), vocab, *bpe_merges(vocab))
    else:
        raise UnsupportedVocabulary(
            f"tokenizer model {vocab.model!r} is not supported (only 'llama', 'gpt2', 'gemma4', 'bert' and 't5')"
        )
    return names + _write_hf_configs(vocab, header, folder)


class UnsupportedVocabulary(FragmenterError):
    """A vocabulary type we cannot write tokenizer files for (RWKV, say): the
    fragments are still fine, so `fragment` warns and goes on."""


def _write_hf_configs(vocab: _Vocab, header: GGUFHeader, folder: Path) -> list[str]:
    """`tokenizer_config.json` and `special_tokens_map.json`, as a Hugging Face
    repo has them beside `tokenizer.json`, so `transformers.AutoTokenizer`
    loads the folder with the model's special tokens, BOS/EOS rules and chat template."""
    special = {
        role: vocab.token(i)
        for role, i in (("bos_token", vocab.bos), ("eos_token", vocab.eos), ("unk_token", vocab.unk))
        if vocab.token(i) is not None
    }
    pad = vocab.token(vocab._id(vocab.pad))
    if pad is not None:
        special["pad_token"] = pad
    if vocab.model == "bert" and vocab.token(vocab.sep) is not None:
        special["sep_token"] = vocab.token(vocab.sep)  # type: ignore[assignment]
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": vocab.add_bos,
        "add_eos_token": vocab.add_eos,
        "clean_up_tokenization_spaces": False,
        **special,
    }
    template = header.metadata.get("tokenizer.chat_template")
    if isinstance(template, str):
        config["chat_template"] = template
    context = header.metadata.get(f"{vocab.arch}.context_length")
    if isinstance(context, int) and context > 0:
        config["model_max_length"] = context
    for name, doc in ((TOKENIZER_CONFIG, config), (SPECIAL_TOKENS_MAP, special)):
        with _open_atomic(folder / name) as out:
            out.write(json.dumps(doc, ensure_ascii=False, indent=2, sort_keys=True).encode("utf-8") + b"\n")
    return [TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP]


# Tokens llama.cpp turns into control tokens by their text, whatever their type in the
# file (`llama_vocab::impl::load`, "auto-detect special tokens by text"): the
# end-of-generation ones always, the fill-in-the-middle ones when the file names no token
# for that role (llama.cpp then takes the first it meets; here all of them).
_EOG_TEXTS = frozenset(
    ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "<end_of_turn>")
    + ("<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>")
    + ("<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>", "<\uff5cend\u2581of\u2581sentence\uff5c>")
)
_FIM_TEXTS: dict[tuple[str, ...], tuple[str, ...]] = {
    ("fim_pre_token_id", "prefix_token_id"): (
        ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<\uff5cfim\u2581begin\uff5c>", "<PRE>", "\u2581<PRE>")
        + ("<|code_prefix|>", "<|prefix|>")
    ),
    ("fim_suf_token_id", "suffix_token_id"): (
        ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<\uff5cfim\u2581hole\uff5c>", "<SUF>", "\u2581<SUF>")
        + ("<|code_suffix|>", "<|suffix|>")
    ),
    ("fim_mid_token_id", "middle_token_id"): (
        ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<\uff5cfim\u2581end\uff5c>", "<MID>", "\u2581<MID>")
        + ("<|code_middle|>", "<|middle|>")
    ),
    ("fim_pad_token_id",): ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    ("fim_rep_token_id",): ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    ("fim_sep_token_id",): ("<|file_sep|>",),
}


def _matched_tokens(vocab: _Vocab) -> dict[int, bool]:
    """The tokens llama.cpp matches in the raw text before anything else (its control,
    user-defined and unknown tokens, after its fix-ups by text), each with whether it
    is special: control or unknown, which llama.cpp leaves as text with parse_special
    off (user-defined ones it matches always)."""
    ids = vocab.ids
    kinds = {i: ty != USER_DEFINED for i, ty in enumerate(vocab.types) if ty in (CONTROL, USER_DEFINED, UNKNOWN)}
    promoted = set(_EOG_TEXTS)
    for keys, texts in _FIM_TEXTS.items():
        if not any(f"tokenizer.ggml.{key}" in vocab.keys for key in keys):
            promoted.update(texts)
    for text in promoted:
        if (i := ids.get(text)) is not None:
            kinds[i] = True
    for text in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):  # gpt-oss
        if (i := ids.get(text)) is not None:
            kinds[i] = False
    has_call = "<|call|>" in ids or "<|calls|>" in ids
    if "<|end|>" in ids and has_call and ("<|return|>" in ids or "<|flush|>" in ids):  # o200k_harmony, solar-open
        kinds[ids["<|end|>"]] = False
    if "</s>" in ids and ("<|tool_response>" in ids or vocab.token(vocab.eos) == "<|plamo:eos|>"):
        kinds.pop(ids["</s>"], None)  # gemma4, plamo: a normal token
    return kinds


def _strip_sides(vocab: _Vocab, matched: dict[int, bool]) -> tuple[set[str], set[str]]:
    """The matched tokens that swallow the whitespace on their left and on their right,
    as llama.cpp decides it by model name (`LLAMA_TOKEN_ATTR_LSTRIP`/`RSTRIP`)."""
    pre = str(vocab.pre)
    if any(s in pre for s in ("jina-v2-de", "jina-v2-es", "jina-v2-code")) or any(
        s in vocab.arch for s in ("nomic-bert-moe", "jina-bert-v3")
    ):
        return {"<mask>"}, set()
    if "phi-3" in vocab.name or "phi3" in vocab.name:
        rstrip = {vocab.tokens[i] for i in matched}
        return set(), (rstrip | {"</s>"}) - {"<unk>", "<s>", "<|endoftext|>"}
    if "modern-bert" in vocab.name:
        return {"[MASK]"}, set()
    return set(), set()


def _added_tokens(vocab: _Vocab) -> list[dict[str, Any]]:
    """The tokens matched in the raw text first, as llama.cpp does. Control and unknown
    ones are `special`, so that `encode_special_tokens = True` (llama.cpp's
    parse_special = false) leaves them to the model while user-defined ones are still
    matched."""
    matched = _matched_tokens(vocab)
    lstrip, rstrip = _strip_sides(vocab, matched)
    out = []
    for i in sorted(matched):
        t = vocab.tokens[i]
        if vocab.ids.get(t) == i:
            out.append(
                {
                    "id": i,
                    "content": t,
                    "single_word": False,
                    "lstrip": t in lstrip,
                    "rstrip": t in rstrip,
                    "normalized": False,
                    "special": matched[i],
                }
            )
    return out


def _post_processor(vocab: _Vocab) -> dict[str, Any] | None:
    single: list[dict[str, Any]] = []
    special: dict[str, Any] = {}
    pieces: list[tuple[bool, Any]] = [(vocab.add_bos, vocab.bos), (False, None), (vocab.add_eos, vocab.eos)]
    if vocab.model == "bert":
        pieces.append((True, vocab.sep))
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
        cut = merge.find(" ", 1)  # as llama.cpp splits it
        left, right = (merge[:cut], merge[cut + 1 :]) if cut > 0 else ("", "")
        if left not in ids or right not in ids:
            raise FragmenterError(f"corrupt vocabulary: merge #{n} {merge!r} names unknown tokens")
        lefts.append(ids[left])
        rights.append(ids[right])
    return np.frombuffer(lefts, dtype=np.int64), np.frombuffer(rights, dtype=np.int64)


def _tokenizer_doc(
    vocab: _Vocab, *, normalizer: Any, pre_tokenizer: Any, decoder: Any, model: dict[str, Any]
) -> dict[str, Any]:
    """A `tokenizer.json` document: the parts every vocabulary type shares, around its own."""
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": _added_tokens(vocab),
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": _post_processor(vocab),
        "decoder": decoder,
        "model": model,
    }


def _bpe_model(*, unk: str | None, fuse_unk: bool, byte_fallback: bool, ignore_merges: bool) -> dict[str, Any]:
    return {
        "type": "BPE",
        "dropout": None,
        "unk_token": unk,
        "continuing_subword_prefix": None,
        "end_of_word_suffix": None,
        "fuse_unk": fuse_unk,
        "byte_fallback": byte_fallback,
        "ignore_merges": ignore_merges,
    }


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
    return _tokenizer_doc(
        vocab,
        normalizer=normalizer,
        pre_tokenizer=None,
        decoder={"type": "Sequence", "decoders": decoders},
        model=_bpe_model(unk=vocab.token(vocab.unk), fuse_unk=True, byte_fallback=True, ignore_merges=False),
    )


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
    # llama.cpp's regexes for this `tokenizer.ggml.pre`, one Split each, then the
    # byte-to-unicode mapping; a pre-tokenizer it has no regexes for falls back to
    # GPT-2's regex (ByteLevel's own).
    found = pre_tokenizer_regexes(str(vocab.pre))
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": found is None}
    pre: dict[str, Any] = byte_level
    ignore_merges = False
    if found is not None:
        regexes, ignore_merges = found
        splits = [{"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": False} for r in regexes]
        pre = {"type": "Sequence", "pretokenizers": [*splits, byte_level]}
    return _tokenizer_doc(
        vocab,
        normalizer=None,
        pre_tokenizer=pre,
        decoder={"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True},
        model=_bpe_model(unk=None, fuse_unk=False, byte_fallback=False, ignore_merges=ignore_merges),
    )


# llama.cpp's BPE on raw UTF-8 rather than GPT-2's byte-to-unicode mapping (Gemma 4's
# vocabulary, `tokenizer.ggml.model == "gemma4"`, and these `tokenizer.ggml.pre` values):
# spaces become U+2581, the text is split at newlines only, and symbols outside the
# vocabulary fall back to <0xXX> byte tokens.
_UTF8_BPE_PRE = ("gemma4", "granite-embed-multi-311m", "sarvam-moe")


def _utf8_bpe_parts(vocab: _Vocab) -> dict[str, Any]:
    split = {"type": "Split", "pattern": {"Regex": "[^\\n]+|[\\n]+"}, "behavior": "Isolated", "invert": False}
    decoders = [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ]
    return _tokenizer_doc(
        vocab,
        normalizer={"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        pre_tokenizer=split,
        decoder={"type": "Sequence", "decoders": decoders},
        model=_bpe_model(unk=None, fuse_unk=False, byte_fallback=True, ignore_merges=False),
    )


def _wpm_tokenizer(vocab: _Vocab) -> dict[str, Any]:
    """BERT's WordPiece as llama.cpp runs it: lowercase and strip accents (unless the
    file says otherwise), split at whitespace, punctuation and CJK characters, then
    the longest vocabulary pieces from the left, the word as [UNK] if that fails. The
    file marks word-initial pieces with U+2581 where Hugging Face marks the others
    with "##"."""
    words: dict[str, int] = {}
    for i, (t, ty) in enumerate(zip(vocab.tokens, vocab.types, strict=True)):
        key = t if ty != NORMAL else t[1:] if t.startswith("\u2581") else "##" + t
        words.setdefault(key, i)
    normalizer = {
        "type": "BertNormalizer",
        "clean_text": True,
        "handle_chinese_chars": True,
        "strip_accents": vocab.strip_accents,
        "lowercase": vocab.lowercase,
    }
    return _tokenizer_doc(
        vocab,
        normalizer=normalizer,
        pre_tokenizer={"type": "BertPreTokenizer"},
        decoder={"type": "WordPiece", "prefix": "##", "cleanup": True},
        model={
            "type": "WordPiece",
            "unk_token": vocab.token(vocab.unk) or "[UNK]",
            "continuing_subword_prefix": "##",
            "max_input_chars_per_word": 1 << 30,  # llama.cpp has no limit
            "vocab": words,
        },
    )


def _ugm_tokenizer(vocab: _Vocab) -> dict[str, Any]:
    """T5-style Unigram as llama.cpp runs it: the file's precompiled character map, runs
    of spaces merged (and the ends trimmed) if `remove_extra_whitespaces`, spaces as
    U+2581 with one in front, then the best-scoring segmentation of the whole text.
    Control, unknown and byte tokens are outside llama.cpp's segmentation: here they
    get a score it never picks."""
    normal = [s for s, ty in zip(vocab.scores, vocab.types, strict=True) if ty == NORMAL]
    outside = (min(normal) if normal else 0.0) - 1e6
    pieces = [
        [t, float(s) if ty in (NORMAL, UNUSED) else 0.0 if ty == USER_DEFINED else outside]
        for t, s, ty in zip(vocab.tokens, vocab.scores, vocab.types, strict=True)
    ]
    normalizers: list[dict[str, Any]] = []
    if vocab.charsmap:
        normalizers.append({"type": "Precompiled", "precompiled_charsmap": base64.b64encode(vocab.charsmap).decode()})
    if vocab.remove_extra_whitespaces:
        normalizers.append({"type": "Strip", "strip_left": True, "strip_right": True})
        normalizers.append({"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "})
    prepend = "always" if vocab.add_space_prefix else "never"
    metaspace = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": prepend, "split": False}
    return _tokenizer_doc(
        vocab,
        normalizer={"type": "Sequence", "normalizers": normalizers},
        pre_tokenizer=metaspace,
        decoder=metaspace,
        model={"type": "Unigram", "unk_id": vocab.unk, "vocab": pieces, "byte_fallback": False},
    )


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
