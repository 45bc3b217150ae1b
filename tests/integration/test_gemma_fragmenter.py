"""The real Gemma 3 270M Q4_K_M model: fragment, verify, assemble, load, tokenize."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

import fragmenter as fr
from protocol.blocks import BLOCK_SIZE, block_digests, block_root
from tests.conftest import FIXTURES, GEMMA_SHA256, sha256_file

pytestmark = pytest.mark.slow


def test_fragment_verify_assemble(gemma_folder: Path, tmp_path: Path) -> None:
    manifest = fr.read_manifest(gemma_folder)
    assert manifest.file_sha256 == GEMMA_SHA256
    assert manifest.raw["config"]["n_layers"] == 18 and manifest.raw["config"]["vocab_size"] == 262144
    assert fr.verify_folder(gemma_folder).ok
    fr.assemble(gemma_folder, tmp_path / "back.gguf")
    assert sha256_file(tmp_path / "back.gguf") == GEMMA_SHA256


def test_block_roots_of_real_10_mib_fragments(gemma_folder: Path) -> None:
    manifest = fr.read_manifest(gemma_folder)
    assert manifest.raw["format"] == "gguf-swarm/2" and manifest.block_size == BLOCK_SIZE
    header = (gemma_folder / "gguf_header.dat").read_bytes()
    assert manifest.header_block_root == block_root(block_digests(header))
    assert max(f.size for f in manifest.fragments) > BLOCK_SIZE  # real multi-block fragments
    for f in manifest.fragments:
        assert f.block_root == block_root(block_digests((gemma_folder / f.file_name).read_bytes())), f.fragment_id


def test_load_tensor_equals_the_original(gemma_model: Path, gemma_folder: Path) -> None:
    reader = gguf.GGUFReader(gemma_model)
    seen: set[str] = set()
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind in seen or t.name == "token_embd.weight":
            continue
        seen.add(kind)
        expected = gguf.quants.dequantize(t.data, t.tensor_type)
        got = fr.load_tensor(gemma_folder, t.name)
        np.testing.assert_array_equal(got, expected.reshape(got.shape))
    assert {"F32", "Q5_0", "Q4_K", "Q6_K"} <= seen


def test_validate_whole_model(gemma_folder: Path) -> None:
    report = fr.validate_folder(gemma_folder)
    assert report.ok and report.tensors == 236


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer.model"])
def test_tokenizer_matches_llama_cpp(gemma_folder: Path, name: str) -> None:
    cases = json.loads((FIXTURES / "gemma3-270m-q4_k_m.tokens.json").read_text())
    if name == "tokenizer.json":
        tokenizers = pytest.importorskip("tokenizers")
        tok = tokenizers.Tokenizer.from_file(str(gemma_folder / name))
        encode = lambda text: tok.encode(text).ids  # noqa: E731
    else:
        spm = pytest.importorskip("sentencepiece")
        sp = spm.SentencePieceProcessor(model_file=str(gemma_folder / name))
        encode = lambda text: [2] + sp.encode(text)  # noqa: E731
    for case in cases:
        assert encode(case["text"]) == case["ids"], case["text"]


def test_special_tokens_in_the_text_match_llama_cpp(gemma_folder: Path) -> None:
    """Chat-template text: control tokens (<start_of_turn>, ...) are single ids, as with
    llama.cpp's parse_special = true, and text with it off (ids from its llama-tokenize)."""
    from tests.unit.test_llama_vocab import check_special_cases

    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer.from_file(str(gemma_folder / "tokenizer.json"))
    check_special_cases(
        tok, json.loads((FIXTURES / "llama-cpp-ids.json").read_text(encoding="utf-8"))["special"]["gemma3"]
    )


def test_transformers_autotokenizer_loads_the_folder_like_a_hub_repo(gemma_folder: Path) -> None:
    """tokenizer_config.json + special_tokens_map.json beside tokenizer.json: AutoTokenizer
    gives llama.cpp's ids (BOS added as the GGUF says) and knows the special tokens.
    (This GGUF carries no chat template; tests/unit/test_tokenizer.py covers one.)"""
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(gemma_folder))
    for case in json.loads((FIXTURES / "gemma3-270m-q4_k_m.tokens.json").read_text()):
        assert tok(case["text"])["input_ids"] == case["ids"], case["text"]
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<bos>", "<eos>", "<pad>", "<unk>")
    turn = tok("<start_of_turn>user\nHello<end_of_turn>", add_special_tokens=False)["input_ids"]
    assert turn[0] == tok.convert_tokens_to_ids("<start_of_turn>") and turn[-1] == tok.convert_tokens_to_ids(
        "<end_of_turn>"
    )
