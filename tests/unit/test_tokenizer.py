from __future__ import annotations

import json
import os
import signal
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fragmenter as fr
from fragmenter import tokenizer as tok
from node.cli import main
from tests.gguf_factory import MIXED, write_model, write_vocab_only


@pytest.fixture
def tokenizer_folder(tmp_path: Path) -> Path:
    model = write_model(tmp_path / "m.gguf", MIXED[:2])
    fr.fragment_model(model, tmp_path / "frag")
    return tmp_path / "frag"


def test_tokenizer_json_merges_by_score(tokenizer_folder: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer.from_file(str(tokenizer_folder / "tokenizer.json"))
    enc = tok.encode("hello world")
    assert enc.tokens == ["<bos>", "hello", "\u2581world"]
    # Characters outside the vocabulary fall back to bytes; user-defined pieces split first.
    assert tok.encode("hé").tokens == ["<bos>", "h", "<0xC3>", "<0xA9>"]
    assert tok.encode("hello  world").tokens[:3] == ["<bos>", "hello", "  "]
    assert tok.decode(enc.ids, skip_special_tokens=True) == "hello world"


def test_sentencepiece_model_agrees(tokenizer_folder: Path) -> None:
    spm = pytest.importorskip("sentencepiece")
    tokenizers = pytest.importorskip("tokenizers")
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_folder / "tokenizer.model"))
    tok = tokenizers.Tokenizer.from_file(str(tokenizer_folder / "tokenizer.json"))
    for text in ["hello world", "hé", "world hello", "hello  world"]:
        assert [2] + sp.encode(text) == tok.encode(text).ids, text


def test_model_without_vocabulary_writes_no_tokenizer(tmp_path: Path) -> None:
    model = write_model(tmp_path / "m.gguf", MIXED[:2], vocab=False)
    result = fr.fragment_model(model, tmp_path / "frag")
    assert result.tokenizer_files == []
    assert not (tmp_path / "frag" / "tokenizer.json").exists()


def test_tokenizer_command_on_a_vocabulary_only_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    vocab = write_vocab_only(tmp_path / "vocab.gguf")  # no tensors, no padding after the metadata
    assert main(["tokenizer", str(vocab), str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.strip() == (
        "wrote tokenizer.json, tokenizer.model, tokenizer_config.json, special_tokens_map.json"
    )
    fr.fragment_model(write_model(tmp_path / "m.gguf", MIXED[:2]), tmp_path / "frag")
    for name in ("tokenizer.json", "tokenizer.model"):  # the same vocabulary, the same files
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "frag" / name).read_bytes()


@pytest.mark.parametrize("cut", ["inside the padding", "before the tensor data"])
def test_tokenizer_command_refuses_a_cut_model(tmp_path: Path, capsys: pytest.CaptureFixture[str], cut: str) -> None:
    data = write_model(tmp_path / "m.gguf", MIXED).read_bytes()
    start = fr.parse_header(data).data_start
    (tmp_path / "cut.gguf").write_bytes(data[: start - 1 if cut == "inside the padding" else start])
    assert main(["tokenizer", str(tmp_path / "cut.gguf"), str(tmp_path / "out")]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("error: ") and ("before its tensor data" in line or "runs past the end of the file" in line)
    assert not (tmp_path / "out").exists()


def test_tokenizer_command_refuses_an_unsupported_vocabulary_type(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "rwkv.gguf"), "rwkv6")
    w.add_tokenizer_model("rwkv")
    w.add_token_list(["a", "b"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    assert main(["tokenizer", str(tmp_path / "rwkv.gguf"), str(tmp_path / "out")]) == 1
    supported = "only 'llama', 'gpt2', 'gemma4', 'bert' and 't5'"
    assert capsys.readouterr().err.splitlines() == [f"error: tokenizer model 'rwkv' is not supported ({supported})"]
    assert not list((tmp_path / "out").glob("tokenizer.*"))


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_hf_config_files_carry_the_special_tokens_and_chat_template(tmp_path: Path) -> None:
    vocab = write_vocab_only(tmp_path / "vocab.gguf", chat_template=CHAT_TEMPLATE)
    names = fr.write_tokenizer_files(fr.parse_header(vocab.read_bytes()), tmp_path / "out")
    assert names[-2:] == ["tokenizer_config.json", "special_tokens_map.json"]
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    special = json.loads((tmp_path / "out" / "special_tokens_map.json").read_text())
    tokens = fr.parse_header(vocab.read_bytes()).metadata["tokenizer.ggml.tokens"].strings()
    assert special == {"bos_token": tokens[2], "eos_token": tokens[1], "unk_token": tokens[3]}
    assert config["chat_template"] == CHAT_TEMPLATE
    assert (config["add_bos_token"], config["add_eos_token"], config["model_max_length"]) == (True, False, 128)
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert tok.bos_token == tokens[2] and tok.eos_token == tokens[1]
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>hi</s><|assistant|>"


def test_fragment_goes_on_without_tokenizer_files_for_an_unsupported_vocabulary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = write_vocab_only(tmp_path / "rwkv.gguf", tokenizer_model="rwkv")
    with pytest.raises(fr.FragmenterError, match="tokenizer model 'rwkv' is not supported"):
        fr.write_tokenizer_files(fr.parse_header(model.read_bytes()), tmp_path)
    assert main(["fragment", str(model), "--output", str(tmp_path / "frag")]) == 0
    out, err = capsys.readouterr()
    assert err.strip().splitlines()[-1] == (
        "warning: no tokenizer files: tokenizer model 'rwkv' is not supported "
        "(only 'llama', 'gpt2', 'gemma4', 'bert' and 't5')"
    )
    assert fr.verify_folder(tmp_path / "frag").ok and not list((tmp_path / "frag").glob("tokenizer*"))


# ---- the fast paths give the plain paths' bytes --------------------------------------

_ALPHABET = ["a", "b", "c", "\u2581", " ", "\u00e9", "\U0001f600", "\n", '"', "\\", "\x00", "\u2028", "ab"]


def _random_vocab(path: Path, seed: int, n: int = 1500) -> fr.GGUFHeader:
    """A SentencePiece-style vocabulary with what the fast paths must get right:
    repeated and empty tokens, every token type (and unknown ones), tied, signed-zero
    and NaN scores, characters outside the BMP, escapes and long pieces."""
    import random

    import gguf

    rng = random.Random(seed)
    tokens = ["".join(rng.choice(_ALPHABET) for _ in range(rng.choice([0, 1, 1, 2, 2, 3, 4, 6, 9]))) for _ in range(n)]
    tokens += ["<unk>", "<s>", "</s>", "a b", "long" * 40]
    types = [rng.choice([1, 1, 1, 1, 2, 3, 4, 5, 6, 0, 7]) for _ in tokens]
    scores = [rng.choice([0.0, -0.0, -1.0, -2.5, float("nan"), float("-inf"), rng.uniform(-1e4, 1e4)]) for _ in tokens]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(len(tokens) - 4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    return fr.parse_header(path.read_bytes())


def _plain_merges(vocab: tok._Vocab) -> tuple[np.ndarray, np.ndarray]:
    pieces, lefts, rights = tok._spm_cuts_by_lookup(vocab)
    order = np.lexsort((rights, lefts, -np.frombuffer(vocab.scores, dtype=np.float64)[pieces]))
    return lefts[order], rights[order]


@pytest.mark.parametrize("seed", range(4))
def test_spm_merges_by_hash_are_the_merges_by_lookup(tmp_path: Path, seed: int) -> None:
    vocab = tok._Vocab(_random_vocab(tmp_path / "v.gguf", seed))
    lefts, rights = tok.spm_merges(vocab)
    expected = _plain_merges(vocab)
    assert len(lefts) > 100
    assert np.array_equal(lefts, expected[0]) and np.array_equal(rights, expected[1])


def test_spm_merges_too_many_ranks_to_pack_sort_by_each_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vocab = tok._Vocab(_random_vocab(tmp_path / "v.gguf", 5))
    expected = _plain_merges(vocab)
    ranks = tok._score_ranks
    monkeypatch.setattr(tok, "_score_ranks", lambda v: ranks(v) + (1 << 50))  # same order, no room in an int64
    lefts, rights = tok.spm_merges(vocab)
    assert np.array_equal(lefts, expected[0]) and np.array_equal(rights, expected[1])


def test_spm_merges_survive_hash_collisions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vocab = tok._Vocab(_random_vocab(tmp_path / "v.gguf", 7))
    expected = _plain_merges(vocab)
    # Base 1: a string's hash is the sum of its code points. Anagrams in the
    # vocabulary collide (the lookup fallback)...
    monkeypatch.setattr(tok, "_HASH_BASE", 1)
    assert tok._spm_cuts_by_hash(vocab) is None
    lefts, rights = tok.spm_merges(vocab)
    assert np.array_equal(lefts, expected[0]) and np.array_equal(rights, expected[1])
    # ...and without them, halves whose hash is another piece's are told apart by their text.
    # "ab" sums like "\x00\u00c3" (1 + 196 = 98 + 99), "x" like "\x00w", of another length.
    tokens = ["a", "bc", "abc", "\x00\u00c3", "c", "xy", "\x00w", "y"]
    small = tok._Vocab(_written_vocab(tmp_path / "s.gguf", tokens))
    assert tok._spm_cuts_by_hash(small) is not None
    lefts, rights = tok.spm_merges(small)
    assert [(small.tokens[i], small.tokens[j]) for i, j in zip(lefts, rights, strict=True)] == [("a", "bc")]


def _written_vocab(path: Path, tokens: list[str]) -> fr.GGUFHeader:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([-float(i) for i in range(len(tokens))][::-1])  # the last piece scores highest
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    return fr.parse_header(path.read_bytes())


def _plain_proto_pieces(vocab: tok._Vocab) -> bytes:
    """The SentencePiece messages one by one, as the format describes them."""
    out = b""
    for piece, score, ty in zip(vocab.tokens, vocab.scores, vocab.types, strict=True):
        raw = (piece.replace(" ", "\u2581") if ty == tok.USER_DEFINED else piece).encode("utf-8")
        body = b"\x0a" + tok._varint(len(raw)) + raw + b"\x15" + struct.pack("<f", score)
        if ty != tok.NORMAL:
            body += b"\x18" + tok._varint(ty if ty in (2, 3, 4, 5, 6) else tok.NORMAL)
        out += b"\x0a" + tok._varint(len(body)) + body
    return out


@pytest.mark.parametrize("seed", range(3))
def test_fast_writers_write_the_plain_bytes(tmp_path: Path, seed: int) -> None:
    header = _random_vocab(tmp_path / "v.gguf", seed)
    names = fr.write_tokenizer_files(header, tmp_path / "out")
    vocab = tok._Vocab(header)
    model = (tmp_path / "out" / "tokenizer.model").read_bytes()
    assert model.startswith(_plain_proto_pieces(vocab))
    # tokenizer.json, streamed from spans, is json.dumps of the whole document.
    doc = tok._spm_parts(vocab)
    lefts, rights = _plain_merges(vocab)
    doc["model"]["vocab"] = vocab.ids
    doc["model"]["merges"] = [[vocab.tokens[i], vocab.tokens[j]] for i, j in zip(lefts, rights, strict=True)]
    expected = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == expected
    assert names[:2] == ["tokenizer.json", "tokenizer.model"]


def test_a_vocabulary_without_merges(tmp_path: Path) -> None:
    header = _written_vocab(tmp_path / "v.gguf", ["a", "b", "\u2581"])
    fr.write_tokenizer_files(header, tmp_path / "out")
    doc = json.loads((tmp_path / "out" / "tokenizer.json").read_text())
    assert doc["model"]["vocab"] == {"a": 0, "b": 1, "\u2581": 2} and doc["model"]["merges"] == []


# ---- built beside the fragment stream --------------------------------------------------


def test_tokenizer_build_in_a_child_writes_what_the_parent_would(tmp_path: Path) -> None:
    if not tok._can_fork():
        pytest.skip("this process cannot fork safely (threads, or one CPU)")
    header = _random_vocab(tmp_path / "v.gguf", 3)
    with tok.TokenizerBuild(header, tmp_path / "child") as build:
        assert build.pid is not None
        names = build.result()
    in_process = fr.write_tokenizer_files(header, tmp_path / "here")
    assert names == in_process
    for name in names:
        assert (tmp_path / "child" / name).read_bytes() == (tmp_path / "here" / name).read_bytes()


def test_tokenizer_build_errors_reach_the_parent(tmp_path: Path) -> None:
    if not tok._can_fork():
        pytest.skip("this process cannot fork safely (threads, or one CPU)")
    rwkv = fr.parse_header(write_vocab_only(tmp_path / "rwkv.gguf", tokenizer_model="rwkv").read_bytes())
    with tok.TokenizerBuild(rwkv, tmp_path / "out") as build, pytest.raises(tok.UnsupportedVocabulary, match="rwkv"):
        build.result()
    header = _random_vocab(tmp_path / "v.gguf", 1)
    with tok.TokenizerBuild(header, tmp_path / "out") as build:
        assert build.pid is not None
        os.kill(build.pid, signal.SIGKILL)
        with pytest.raises(fr.FragmenterError, match="were not written: their process was killed by signal 9"):
            build.result()


def test_an_abandoned_tokenizer_build_stops_its_child(tmp_path: Path) -> None:
    if not tok._can_fork():
        pytest.skip("this process cannot fork safely (threads, or one CPU)")
    with tok.TokenizerBuild(_random_vocab(tmp_path / "v.gguf", 2), tmp_path / "out") as build:
        pid = build.pid
    assert pid is not None and build.pid is None
    with pytest.raises(ChildProcessError):  # killed and reaped
        os.waitpid(pid, 0)


def test_tokenizer_build_without_fork_runs_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tok, "_can_fork", lambda: False)
    header = _random_vocab(tmp_path / "v.gguf", 0)
    with tok.TokenizerBuild(header, tmp_path / "out") as build:
        assert build.pid is None
        assert build.result() == [
            "tokenizer.json",
            "tokenizer.model",
            "tokenizer_config.json",
            "special_tokens_map.json",
        ]


@pytest.mark.parametrize("mix", [tok._SLOT_MIX, 0])  # 0: every key's home is slot 0, one long probe chain
def test_hash_index_finds_every_key_and_no_other(monkeypatch: pytest.MonkeyPatch, mix: int) -> None:
    monkeypatch.setattr(tok, "_SLOT_MIX", mix)
    rng = np.random.default_rng(3)
    keys = np.unique(rng.integers(0, 1 << 63, size=300, dtype=np.uint64))
    keys[0] = 0  # the key an empty slot holds
    ids = rng.permutation(len(keys)).astype(np.int64)
    index = tok._HashIndex(keys, ids)
    absent = np.setdiff1d(rng.integers(0, 1 << 63, size=300, dtype=np.uint64), keys)
    queries = rng.permutation(np.concatenate([keys, absent, keys[:50]]))
    expected = {int(k): int(i) for k, i in zip(keys, ids, strict=True)}
    assert index.get(queries).tolist() == [expected.get(int(q), -1) for q in queries]


_BPE_TOKENS = [b"a", b"b", b"ab", b" ", b"a b", b"\xc3\xa9", b"\xc3\xa9a", b"", b"\x00", b"\xe2\x96\x81"]
_MERGE_EDGES = [b" a", b"a ", b"ab", b"a  b", b"a\x00 b", b"\xff b", b"\xc3 \xa9", b" ", b"", b"\xc3\xa9 a b"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    merges=st.lists(
        st.one_of(
            st.tuples(st.sampled_from(_BPE_TOKENS), st.sampled_from(_BPE_TOKENS)).map(lambda p: p[0] + b" " + p[1]),
            st.sampled_from(_MERGE_EDGES),
        ),
        min_size=1,  # GGUFWriter leaves an empty array out
        max_size=12,
    )
)
def test_bpe_merges_at_once_are_the_merges_one_by_one(tmp_path: Path, merges: list[bytes]) -> None:
    """The merges cut in C-level passes (`_merge_halves`) give the ids, or the
    error, that cutting each merge in Python gives: merges with a leading or a
    doubled space, none, a NUL, bytes that are not UTF-8, empty halves."""
    import gguf

    path = tmp_path / "bpe.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_token_list(_BPE_TOKENS)
    w.add_token_merges(merges)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    vocab = tok._Vocab(fr.parse_header(path.read_bytes()))

    def outcome(merge_ids: Callable[[], tuple[np.ndarray, np.ndarray]]) -> Any:
        try:
            lefts, rights = merge_ids()
        except fr.FragmenterError as e:
            return str(e)
        return lefts.tolist(), rights.tolist()

    assert vocab.merges is not None
    expected = outcome(lambda: tok._bpe_merges_one_by_one(vocab.ids, vocab.merges.strings()))  # type: ignore[union-attr]
    assert outcome(lambda: tok.bpe_merges(vocab)) == expected


@pytest.mark.parametrize("key", ["tokenizer.ggml.tokens", "tokenizer.ggml.merges"])
def test_a_vocabulary_array_of_numbers_is_a_clear_error(tmp_path: Path, key: str) -> None:
    import gguf

    path = tmp_path / "bad.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    if key != "tokenizer.ggml.tokens":
        w.add_token_list(["a", "b"])
    w.add_array(key, [1, 2, 3])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    with pytest.raises(fr.FragmenterError, match=f"{key} is not an array of strings"):
        tok.write_tokenizer_files(fr.parse_header(path.read_bytes()), tmp_path)
