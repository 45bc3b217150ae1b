"""The table of llama.cpp's BPE pre-tokenizers (fragmenter/llama_pre.py): every entry
builds a Hugging Face pre-tokenizer that runs; llama.cpp's own test vectors for some of
them are checked in test_llama_vocab.py."""

from __future__ import annotations

import pytest

from fragmenter.llama_pre import _PRE, _SPLITS, pre_tokenizer_regexes

TEXT = "Hello, y'all! 3333 ½ 数字 카카 ﬀ \u00e9\u0301 <sentinel:12>\n\n  \t x   \r\n 🦙"


def test_every_name_points_at_regexes() -> None:
    assert {group for group, _ in _PRE.values()} == set(_SPLITS)
    assert pre_tokenizer_regexes("no-such-pre") is None
    assert pre_tokenizer_regexes("llama-bpe") == (_SPLITS["llama3"], True)
    assert pre_tokenizer_regexes("qwen2") == (_SPLITS["qwen2"], False)


@pytest.mark.parametrize("group", sorted(_SPLITS))
def test_regexes_compile_and_cover_the_text(group: str) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    pre = tokenizers.pre_tokenizers.Sequence(
        [tokenizers.pre_tokenizers.Split(tokenizers.Regex(r), "isolated") for r in _SPLITS[group]]
    )
    pieces = pre.pre_tokenize_str(TEXT)
    assert "".join(piece for piece, _ in pieces) == TEXT  # "isolated" keeps every character


def test_falcon_splits_digits_in_threes_and_punctuation_apart() -> None:
    tokenizers = pytest.importorskip("tokenizers")
    pre = tokenizers.pre_tokenizers.Sequence(
        [tokenizers.pre_tokenizers.Split(tokenizers.Regex(r), "isolated") for r in _SPLITS["falcon"]]
    )
    assert [p for p, _ in pre.pre_tokenize_str("ab, 1234567!")] == ["ab", ",", " ", "123", "456", "7", "!"]
