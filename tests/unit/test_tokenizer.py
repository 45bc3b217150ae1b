from __future__ import annotations

from pathlib import Path

import pytest

import fragmenter as fr
from tests.gguf_factory import MIXED, write_model


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
