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
import os
import pickle
import signal
import struct
import sys
import threading
import traceback
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import repeat
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

import numpy as np

from .errors import FragmenterError
from .fsio import open_staging_file
from .gguf_header import GGUFArray, GGUFHeader
from .gguf_spec import ValueType
from .llama_pre import ADD_BOS, pre_tokenizer_regexes

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
TOKENIZER_MODEL = "tokenizer.model"

# llama.cpp token types (the same numbers as SentencePiece's piece types).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _first_ids(tokens: list[str]) -> dict[str, int]:
    """Token -> its first id (llama.cpp's lookup), in first-seen order: one C-level
    pass, and a second only when the vocabulary repeats a token."""
    ids = dict(zip(tokens, range(len(tokens)), strict=True))
    if len(ids) < len(tokens):
        for i in range(len(tokens) - 1, -1, -1):  # overwriting a value keeps the key's place
            ids[tokens[i]] = i
    return ids


class _Vocab:
    def __init__(self, header: GGUFHeader) -> None:
        md = header.metadata
        tokens = md.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, GGUFArray):
            raise FragmenterError("this model has no vocabulary (tokenizer.ggml.tokens)")
        if tokens.element_type != ValueType.STRING:
            raise FragmenterError("corrupt vocabulary: tokenizer.ggml.tokens is not an array of strings")
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
        if isinstance(merges, GGUFArray) and merges.element_type != ValueType.STRING:
            raise FragmenterError("corrupt vocabulary: tokenizer.ggml.merges is not an array of strings")
        self.merges = merges if isinstance(merges, GGUFArray) else None  # decoded by bpe_merges
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
        self.ids = _first_ids(self.tokens)

    def _id(self, i: Any) -> int | None:
        return i if isinstance(i, int) and 0 <= i < len(self.tokens) else None

    def chars(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All tokens' code points end to end, with each token's start and length in them."""
        lengths = np.fromiter(map(len, self.tokens), dtype=np.int64, count=len(self.tokens))
        starts = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        return np.frombuffer("".join(self.tokens).encode("utf-32-le"), dtype=np.uint32), starts, lengths

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


class TokenizerBuild:
    """`write_tokenizer_files(header, folder)`, started at once and collected by
    `result()`, for `fragment` to build them beside the fragment stream.

    In a forked process where that is safe (Linux, more than one CPU, no other
    thread in this process): in a thread, this Python work would hold the GIL
    against the stream's hashing and writing, and a fresh interpreter would first
    spend a third of a second importing. The child writes only through the same
    staging files, dies with this process (PR_SET_PDEATHSIG) and is killed if the
    build is abandoned, so no file of it is left behind a kill. Elsewhere, or
    when forking fails, `result()` builds them in this process."""

    def __init__(self, header: GGUFHeader, folder: Path) -> None:
        self.header, self.folder = header, folder
        self.pid: int | None = None
        self.pipe = -1

    def __enter__(self) -> TokenizerBuild:
        # Forked here, not in __init__: an interrupt between __init__ and
        # __enter__ would skip __exit__ and leave the child writing into a
        # staging folder being removed.
        if "tokenizer.ggml.tokens" in self.header.metadata and _can_fork():
            try:
                self._fork()
            except BaseException:  # a SIGTERM held during the fork lands here: no child left writing
                self.close()
                raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fork(self) -> None:
        read_end, write_end = os.pipe()
        parent = os.getpid()
        # A SIGTERM or Ctrl-C that lands inside fork()'s at-fork handlers raises
        # there, where Python ignores the exception: the run went on to the end.
        # Held until both processes are set up, it is delivered after.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            try:
                pid = os.fork()
            except OSError:  # no memory for a process, say: build in this one
                os.close(read_end)
                os.close(write_end)
                return
            if pid == 0:
                os.close(read_end)
                _build_in_child(self.header, self.folder, write_end, parent, held)
            os.close(write_end)
            self.pid, self.pipe = pid, read_end
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)

    def result(self) -> list[str]:
        """The names of the files written; raises what `write_tokenizer_files` raised."""
        if self.pid is None:
            return write_tokenizer_files(self.header, self.folder)
        with open(self.pipe, "rb") as pipe:
            self.pipe = -1
            data = pipe.read()  # to the end: the child is done
        _, status = os.waitpid(self.pid, 0)
        self.pid = None
        if not data:
            raise FragmenterError(f"the tokenizer files were not written: their process {_ended(status)}")
        ok, value = pickle.loads(data)  # from our own child
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    def close(self) -> None:
        """Stop the child if `result()` was not reached (an error, an interrupt)."""
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(self.pid, 0)
            self.pid = None
        if self.pipe != -1:
            os.close(self.pipe)
            self.pipe = -1


def _can_fork() -> bool:
    """Forking a process with other threads can deadlock the child on a lock
    one of them held; with one CPU the child would only take turns with us."""
    return sys.platform == "linux" and threading.active_count() == 1 and len(os.sched_getaffinity(0)) > 1


def _build_in_child(header: GGUFHeader, folder: Path, pipe: int, parent: int, signals: set[int]) -> NoReturn:
    """The forked child: build, send (ok, names or exception) down `pipe`, and
    leave with os._exit: never back into the parent's frames (whose cleanup would
    remove the staging folder) or its exit handlers."""
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a Ctrl-C or kill ends it at once
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, signals)  # the parent's mask, from before the fork
        _die_with(parent)
        try:
            outcome: tuple[bool, Any] = (True, write_tokenizer_files(header, folder))
        except BaseException as e:
            outcome = (False, _picklable(e))
        with open(pipe, "wb") as out:
            out.write(pickle.dumps(outcome))
        code = 0
    finally:
        os._exit(code)


def _die_with(parent: int) -> None:
    """Have the kernel kill this process when its parent dies (a SIGKILLed
    `fragment`), so that it stops writing into a staging folder the next run
    clears; leave now if the parent is already gone."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (AttributeError, OSError):
        pass
    if os.getppid() != parent:
        os._exit(1)


def _picklable(e: BaseException) -> BaseException:
    """`e` as the parent can re-raise it: with the child's traceback as a note
    when it is a bug rather than an error reported to the user."""
    if not isinstance(e, (FragmenterError, OSError)):
        e.add_note("in the tokenizer process:\n" + "".join(traceback.format_exception(e)).rstrip())
    try:
        pickle.loads(pickle.dumps(e))
    except Exception:
        plain = RuntimeError(f"{type(e).__name__}: {e}")
        for note in getattr(e, "__notes__", []):
            plain.add_note(note)
        return plain
    return e


def _ended(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by signal {os.WTERMSIG(status)}"
    return f"ended with status {os.waitstatus_to_exitcode(status)}"


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
    types = np.frombuffer(vocab.types, dtype=np.uint8)
    found = np.flatnonzero(np.isin(types, (CONTROL, USER_DEFINED, UNKNOWN)))  # no Python loop over 262k types
    kinds = dict(zip(found.tolist(), (types[found] != USER_DEFINED).tolist(), strict=True))
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
    merged piece, highest first (ties: by the ids of the two halves).

    A merge is a normal piece of two or more characters cut in two where both
    halves are vocabulary pieces. Looking every cut up in a dict costs seconds for
    a 262k vocabulary; here every cut's halves are hashed with numpy and looked up
    in a table of the vocabulary's hashes, and only the hits are compared as text."""
    found = _spm_cuts_by_hash(vocab)
    pieces, lefts, rights = found if found is not None else _spm_cuts_by_lookup(vocab)
    n = len(vocab.tokens)
    ranks = _score_ranks(vocab)
    if (int(ranks.max(initial=0)) + 1) * n * n >= 1 << 63:  # too many to pack in one key: three sorts
        order = np.lexsort((rights, lefts, -np.frombuffer(vocab.scores, dtype=np.float64)[pieces]))
        return lefts[order], rights[order]
    # One sort of (rank, left, right) packed into an int64 (all distinct: one
    # piece per pair), not numpy's lexsort, which sorts three times.
    keys = np.sort((ranks[pieces] * n + lefts) * n + rights)
    return keys // n % n, keys % n


def _score_ranks(vocab: _Vocab) -> np.ndarray:
    """Each token's place among the distinct scores, highest first: the order
    numpy sorts -score in, with every NaN alike and last (0.0 and -0.0 alike)."""
    negated = -np.frombuffer(vocab.scores, dtype=np.float64)
    order = np.argsort(negated, kind="stable")
    ordered = negated[order]
    new = np.zeros(len(ordered), dtype=np.int64)
    if len(ordered) > 1:
        new[1:] = (ordered[1:] != ordered[:-1]) & ~(np.isnan(ordered[1:]) & np.isnan(ordered[:-1]))
    ranks = np.empty(len(ordered), dtype=np.int64)
    ranks[order] = np.cumsum(new)
    return ranks


def _spm_cuts_by_lookup(vocab: _Vocab) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(piece, left, right) ids of every merge, by a dict lookup per cut: the
    fallback when two vocabulary pieces share a hash."""
    ids = vocab.ids
    found: tuple[array[int], array[int], array[int]] = (array("q"), array("q"), array("q"))
    pieces, lefts, rights = found
    types = vocab.types
    for piece, i in ids.items():
        if types[i] != NORMAL or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            li = ids.get(piece[:cut])
            if li is not None:
                ri = ids.get(piece[cut:])
                if ri is not None:
                    pieces.append(i)
                    lefts.append(li)
                    rights.append(ri)
    return tuple(np.frombuffer(a, dtype=np.int64) for a in found)  # type: ignore[return-value]


# Polynomial hashing of strings modulo 2**64 (numpy's uint64 arithmetic wraps): an
# odd base, so that it has an inverse and a suffix's hash follows from two prefix sums.
_HASH_BASE = 0x9E3779B97F4A7C15
_SLOT_MIX = 0xBF58476D1CE4E5B9  # odd: spreads small hashes (one-character pieces) over the slots
_CUTS_PER_BATCH = 1 << 16  # bounds the temporary arrays (under a MB each)


def _powers(base: int, n: int) -> np.ndarray:
    """base**0 .. base**(n-1) modulo 2**64."""
    out = np.full(n, base, dtype=np.uint64)
    out[0] = 1
    return np.cumprod(out, out=out)


class _HashIndex:
    """Distinct uint64 keys -> ids, as an open-addressing table (linear probing)
    built and probed with whole-array numpy steps: a binary search per cut
    (`np.searchsorted`) is several times slower, a cache miss at every level."""

    def __init__(self, keys: np.ndarray, ids: np.ndarray) -> None:
        self.bits = max(4, (4 * len(keys) - 1).bit_length())  # an eighth to a quarter full: short probes
        self.mask = (1 << self.bits) - 1
        self.keys = np.zeros(1 << self.bits, dtype=np.uint64)
        self.ids = np.full(1 << self.bits, -1, dtype=np.int64 if len(keys) >> 31 else np.int32)
        owner = np.full(1 << self.bits, -1, dtype=self.ids.dtype)
        pending, at = np.arange(len(keys)), self._home(keys)
        while len(pending):  # each round, one of the keys wanting a free slot takes it
            free = self.ids[at] == -1
            owner[at[free]] = pending[free]
            won = free & (owner[at] == pending)
            self.keys[at[won]], self.ids[at[won]] = keys[pending[won]], ids[pending[won]]
            pending, at = pending[~won], (at[~won] + 1) & self.mask

    def _home(self, keys: np.ndarray) -> np.ndarray:
        return ((keys * np.uint64(_SLOT_MIX)) >> np.uint64(64 - self.bits)).astype(np.int64)

    def get(self, keys: np.ndarray) -> np.ndarray:
        """The id of each key, -1 where there is none."""
        # Most keys are settled at their home slot: that round runs on the whole
        # arrays, without the index arrays the later rounds keep. An empty slot
        # holds key 0 and id -1, so a match there still reads as "none".
        at = self._home(keys)
        ids = self.ids[at]
        hit = self.keys[at] == keys
        out = np.where(hit, ids, -1).astype(np.int64, copy=False)
        todo = np.flatnonzero((ids != -1) & ~hit)
        at = (at[todo] + 1) & self.mask
        while len(todo):
            ids = self.ids[at]
            hit = (ids != -1) & (self.keys[at] == keys[todo])
            out[todo[hit]] = ids[hit]
            going = (ids != -1) & ~hit
            todo, at = todo[going], (at[going] + 1) & self.mask
        return out


def _spm_cuts_by_hash(vocab: _Vocab) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(piece, left, right) ids of every merge, in no particular order (the caller
    sorts by unique keys); None if two distinct vocabulary pieces hash alike, as
    then a lookup by hash could miss."""
    cp, starts, lengths = vocab.chars()
    if len(cp) == 0:
        return None
    cp = cp + np.uint32(1)  # code point + 1: no character hashes as the empty string
    # prefix[starts[t] + k] - prefix[starts[t]] is the hash of token t's first k
    # characters, sum of (code point + 1) * base**(position in the token).
    longest = int(lengths.max())
    power, inverse = _powers(_HASH_BASE, longest + 1), _powers(pow(_HASH_BASE, -1, 1 << 64), longest + 1)
    terms = power[_ranges(np.zeros_like(lengths), lengths)]
    terms *= cp
    prefix = np.zeros(len(cp) + 1, dtype=np.uint64)
    np.cumsum(terms, out=prefix[1:])
    del terms
    ends = starts + lengths
    unique = np.fromiter(vocab.ids.values(), dtype=np.int64, count=len(vocab.ids))
    hashes = prefix[ends[unique]] - prefix[starts[unique]]
    ordered = np.sort(hashes)
    if np.any(ordered[1:] == ordered[:-1]):
        return None
    del ordered
    index = _HashIndex(hashes, unique)
    types = np.frombuffer(vocab.types, dtype=np.uint8)
    candidates = unique[(types[unique] == NORMAL) & (lengths[unique] >= 2)]
    cuts_before = np.cumsum(lengths[candidates] - 1)
    out: list[tuple[np.ndarray, ...]] = []
    id_type = np.int32 if len(vocab.tokens) < 1 << 31 else np.int64
    lo = 0
    while lo < len(candidates):
        done = int(cuts_before[lo - 1]) if lo else 0
        hi = max(lo + 1, int(np.searchsorted(cuts_before, done + _CUTS_PER_BATCH, side="right")))
        batch = candidates[lo:hi]
        count = lengths[batch] - 1
        piece = np.repeat(batch, count)
        cut = np.arange(len(piece), dtype=np.int64) - np.repeat(cuts_before[lo:hi] - count - done, count) + 1
        start = starts[piece]
        left = index.get(prefix[start + cut] - prefix[start])
        ok = left != -1
        piece, cut, start, left = piece[ok], cut[ok], start[ok], left[ok]
        right = index.get((prefix[ends[piece]] - prefix[start + cut]) * inverse[cut])
        ok = right != -1
        piece, cut, left, right = piece[ok], cut[ok], left[ok], right[ok]
        ok = _same_text(cp, starts, lengths, piece, cut, left, right)  # hashes can collide: check
        out.append(tuple(a[ok].astype(id_type) for a in (piece, left, right)))
        lo = hi
    del index, prefix, cp  # before the merges are concatenated: a lower peak
    if not out:
        return None
    return tuple(np.concatenate(parts) for parts in zip(*out, strict=True))  # type: ignore[return-value]


def _same_text(
    cp: np.ndarray,
    starts: np.ndarray,
    lengths: np.ndarray,
    piece: np.ndarray,
    cut: np.ndarray,
    left: np.ndarray,
    right: np.ndarray,
) -> np.ndarray:
    """Whether each piece is exactly its left piece followed by its right piece,
    compared as code points (far faster than concatenating Python strings)."""
    size = lengths[piece]
    ok = (lengths[left] == cut) & (lengths[right] == size - cut)
    if not len(piece):
        return ok
    halves = np.empty(2 * len(piece), dtype=np.int64)
    halves[0::2], halves[1::2] = starts[left], starts[right]
    sizes = np.empty(2 * len(piece), dtype=np.int64)
    sizes[0::2], sizes[1::2] = cut, size - cut
    differ = cp[_ranges(starts[piece], size)] != cp[_ranges(halves, sizes)]
    ok &= np.add.reduceat(differ, np.cumsum(size) - size) == 0  # sizes >= 2: no empty segment
    return ok


def _ranges(begins: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """The concatenation of range(b, b + n) for each (b, n), n >= 0, in one cumsum
    (as int32 when the numbers fit: half the memory)."""
    keep = sizes > 0
    begins, sizes = begins[keep], sizes[keep]
    fits = not len(begins) or int((begins + sizes).max()) < 1 << 31 and int(begins.min()) >= 0
    out = np.ones(int(sizes.sum()), dtype=np.int32 if fits else np.int64)
    if not len(begins):
        return out
    first = np.cumsum(sizes) - sizes
    out[first[0]] = begins[0]
    out[first[1:]] = begins[1:] - (begins[:-1] + sizes[:-1] - 1)  # jump from the end of the previous range
    return np.cumsum(out, out=out)


def bpe_merges(vocab: _Vocab) -> tuple[np.ndarray, np.ndarray]:
    """The file's own merges ("left right", cut at the first space after the
    first character, as llama.cpp cuts them) as arrays of token ids."""
    if vocab.merges is None or vocab.merges.count == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    halves = _merge_halves(vocab.merges)
    if halves is None:
        return _bpe_merges_one_by_one(vocab.ids, vocab.merges.strings())
    lefts_text, rights_text = halves
    get = vocab.ids.get
    count = len(lefts_text)
    lefts = np.fromiter(map(get, lefts_text, repeat(-1)), dtype=np.int64, count=count)
    rights = np.fromiter(map(get, rights_text, repeat(-1)), dtype=np.int64, count=count)
    unknown = np.flatnonzero((lefts < 0) | (rights < 0))
    if len(unknown):
        n = int(unknown[0])
        merge = f"{lefts_text[n]} {rights_text[n]}"
        raise FragmenterError(f"corrupt vocabulary: merge #{n} {merge!r} names unknown tokens")
    return lefts, rights


def _merge_halves(merges: GGUFArray) -> tuple[list[str], list[str]] | None:
    """Every merge's left and right text, in C-level passes: each merge's cut
    space becomes a NUL in the NUL-separated merges, so that one decode and one
    split give left, right, left, right... (Llama 3's 280k merges: ~0.3 s as a
    Python loop). None where that is not exact: a merge without a cut, one holding
    a NUL, or bytes that are not UTF-8."""
    joined = merges.nul_joined()
    if joined is None:
        return None
    starts = np.flatnonzero(joined == 0) + 1
    spaces = np.flatnonzero(joined == ord(" "))
    owner = np.searchsorted(starts, spaces, side="right") - 1
    # A space byte is never inside a multi-byte character: "after the first
    # character" is "not the merge's first byte".
    inside = spaces > starts[owner]
    spaces, owner = spaces[inside], owner[inside]
    first = np.flatnonzero(np.diff(owner, prepend=-1) != 0)  # owners ascend: each merge's first space
    if len(first) != merges.count:
        return None
    joined[spaces[first]] = 0
    try:
        parts = joined.tobytes().decode("utf-8").split("\x00")
    except UnicodeDecodeError:
        return None
    return parts[1::2], parts[2::2]


def _bpe_merges_one_by_one(ids: dict[str, int], merges: list[str]) -> tuple[np.ndarray, np.ndarray]:
    lefts, rights = array("q"), array("q")
    for n, merge in enumerate(merges):
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
    """Stream the JSON. The vocabulary and the merges (given as token ids) are
    spliced together with numpy from the bytes of each token's JSON string, in
    batches: as Python strings or pairs, half a million merges cost seconds and
    tens of MB."""
    encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
    model = parts.pop("model")
    out.write(encode(parts)[:-1].encode("utf-8"))
    out.write(b',"model":' + encode(model)[:-1].encode("utf-8") + b',"vocab":')
    if not vocab.tokens:
        out.write(b'{},"merges":[]}}')
        return
    texts = _JsonTexts(vocab)
    out.write(b"{")
    ids = np.fromiter(vocab.ids.values(), dtype=np.int64, count=len(vocab.ids))
    for start in range(0, len(ids), _JSON_BATCH):  # "token":id,
        batch = np.arange(start, min(start + _JSON_BATCH, len(ids)))
        text = texts.join(texts.token(ids[batch]), texts.colon, texts.number(batch), texts.comma)
        out.write(text if start + _JSON_BATCH < len(ids) else text[:-1])  # no comma after the last
    out.write(b'},"merges":[')
    for start in range(0, len(lefts), _JSON_BATCH):  # ["left","right"],
        left, right = lefts[start : start + _JSON_BATCH], rights[start : start + _JSON_BATCH]
        text = texts.join(texts.open, texts.token(left), texts.comma, texts.token(right), texts.close)
        out.write(text if start + _JSON_BATCH < len(lefts) else text[:-1])
    out.write(b"]}}")


_JSON_BATCH = 65536  # entries per write: a few MB of temporary index arrays


class _JsonTexts:
    """The JSON text of every token (as a string) and of every token id in
    `vocab.ids` order (as a number), and some punctuation, as spans of one byte
    buffer: entries are spliced from spans with numpy, no Python object each."""

    def __init__(self, vocab: _Vocab) -> None:
        # One call of the C encoder each. An encoded string never holds a raw
        # newline, so with newline as the item separator the encoded list splits
        # unambiguously; numbers are split at their commas.
        strings = json.JSONEncoder(ensure_ascii=False, separators=("\n", ":")).encode(vocab.tokens)
        numbers = json.JSONEncoder(separators=(",", ":")).encode(list(vocab.ids.values()))
        head = strings[1:-1].encode("utf-8") + b"\n"
        tail = numbers[1:-1].encode("utf-8") + b","
        punctuation = len(head) + len(tail)
        self.blob = np.frombuffer(head + tail + b"[,],:", dtype=np.uint8)
        self.starts, self.sizes = _spans(self.blob[: len(head)], ord("\n"), 0)
        self.number_starts, self.number_sizes = _spans(self.blob[len(head) : punctuation], ord(","), len(head))
        self.open, self.comma, self.close, self.colon = (
            (punctuation + i, n) for i, n in ((0, 1), (1, 1), (2, 2), (4, 1))
        )

    def token(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.starts[ids], self.sizes[ids]

    def number(self, at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.number_starts[at], self.number_sizes[at]

    def join(self, *columns: tuple[Any, Any]) -> bytes:
        """Row after row, each row the columns' spans in order (a column is an
        array of spans, or one span for all rows)."""
        rows = max(np.size(start) for start, _ in columns)
        starts, sizes = np.empty((rows, len(columns)), dtype=np.int64), np.empty((rows, len(columns)), dtype=np.int64)
        for c, (start, size) in enumerate(columns):
            starts[:, c], sizes[:, c] = start, size
        return self.blob[_ranges(starts.ravel(), sizes.ravel())].tobytes()


def _spans(blob: np.ndarray, separator: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """(start, size) of each item of `blob`, every item followed by `separator`."""
    ends = np.flatnonzero(blob == separator)
    starts = np.empty(len(ends), dtype=np.int64)
    starts[0], starts[1:] = 0, ends[:-1] + 1
    return starts + offset, ends - starts


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


def _varint_sizes(values: np.ndarray) -> np.ndarray:
    """Bytes of the varint of each (non-negative) value."""
    sizes = np.ones(len(values), dtype=np.int64)
    for bits in range(7, 64, 7):
        sizes += values >= (1 << bits)
    return sizes


def _put_varints(buf: np.ndarray, at: np.ndarray, values: np.ndarray) -> None:
    """Write the varint of each (non-negative) value into `buf` at its position."""
    values = values.astype(np.uint64)
    while len(at):
        more = values >= 0x80
        buf[at] = (values & np.uint64(0x7F)) | (more.astype(np.uint64) << np.uint64(7))
        at, values = at[more] + 1, values[more] >> np.uint64(7)


def _spm_pieces(pieces: list[str], scores: np.ndarray, types: np.ndarray) -> np.ndarray:
    """ModelProto's repeated field 1, one SentencePiece message per token (field 1
    the piece, 2 its score as a float, 3 its type unless NORMAL), laid out with
    numpy: a Python loop of small byte strings takes a third of a second on 262k tokens."""
    text = "".join(pieces)
    raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    # Each piece's UTF-8 size, from its code points' sizes.
    cp = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    before = np.zeros(len(cp) + 1, dtype=np.int64)
    np.cumsum(1 + (cp >= 0x80) + (cp >= 0x800) + (cp >= 0x10000), out=before[1:])
    del cp
    ends = np.cumsum(np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces)))
    sizes = before[ends] - before[np.concatenate(([0], ends[:-1]))]
    del before
    with np.errstate(over="ignore", invalid="ignore"):
        score32 = scores.astype("<f4")
    if np.any(np.isinf(score32) & ~np.isinf(scores)):
        raise FragmenterError("corrupt vocabulary: a token score is out of float32 range")
    typed = types != NORMAL
    size_bytes = _varint_sizes(sizes)
    body = 1 + size_bytes + sizes + 5 + 2 * typed
    body_bytes = _varint_sizes(body)
    starts = np.zeros(len(pieces) + 1, dtype=np.int64)
    np.cumsum(1 + body_bytes + body, out=starts[1:])
    buf = np.zeros(int(starts[-1]), dtype=np.uint8)
    at = starts[:-1]
    buf[at] = 0x0A  # ModelProto field 1 (pieces), length-delimited
    _put_varints(buf, at + 1, body)
    at = at + 1 + body_bytes
    buf[at] = 0x0A  # SentencePiece field 1 (piece)
    _put_varints(buf, at + 1, sizes)
    at = at + 1 + size_bytes
    buf[_inside(len(buf), at, sizes)] = raw
    at = at + sizes
    buf[at] = 0x15  # field 2 (score), 32-bit
    for i, column in enumerate(score32.view(np.uint8).reshape(-1, 4).T):
        buf[at + 1 + i] = column
    at = at[typed] + 5
    buf[at] = 0x18  # field 3 (type), varint: one byte
    known = np.isin(types[typed], (UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE))
    buf[at + 1] = np.where(known, types[typed], NORMAL)
    return buf


def _inside(total: int, starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """A mask of `total` positions, true inside the (disjoint, non-adjacent) spans."""
    edges = np.zeros(total + 1, dtype=np.int8)
    some = sizes > 0
    edges[starts[some]] = 1
    edges[starts[some] + sizes[some]] = -1
    return np.cumsum(edges[:-1], dtype=np.int8).view(bool)


def _field_varint(num: int, value: int) -> bytes:
    return _varint(num << 3) + _varint(value)


def _field_bytes(num: int, data: bytes) -> bytes:
    return _varint(num << 3 | 2) + _varint(len(data)) + data


def _field_float(num: int, value: float) -> bytes:
    return _varint(num << 3 | 5) + struct.pack("<f", value)


def write_spm_model_proto(vocab: _Vocab, out: BinaryIO) -> None:
    types = np.frombuffer(vocab.types, dtype=np.uint8)
    pieces = vocab.tokens
    user_defined = np.flatnonzero(types == USER_DEFINED)
    if len(user_defined):
        pieces = list(pieces)
        for i in user_defined.tolist():  # SentencePiece matches user-defined pieces after escaping spaces
            pieces[i] = pieces[i].replace(" ", "\u2581")
    out.write(_spm_pieces(pieces, np.frombuffer(vocab.scores, dtype=np.float64), types))
    trainer = _field_varint(3, 2) + _field_varint(4, len(vocab.tokens))  # model_type BPE
    trainer += _field_varint(26, 1)  # allow_whitespace_only_pieces
    trainer += _field_varint(35, int(BYTE in vocab.types))  # byte_fallback
    for num, tid in ((40, vocab.unk), (41, vocab.bos), (42, vocab.eos), (43, vocab.pad)):
        trainer += _field_varint(num, tid if isinstance(tid, int) else -1)
    out.write(_field_bytes(2, trainer))
    normalizer = _field_bytes(1, b"identity") + _field_varint(3, int(vocab.add_space_prefix))
    normalizer += _field_varint(4, 0) + _field_varint(5, 1)  # keep whitespace runs; escape spaces as U+2581
    out.write(_field_bytes(3, normalizer))
