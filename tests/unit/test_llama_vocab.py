"""llama.cpp's own vocabulary-only GGUFs (no tensors, no padding after the
metadata, one of them GGUF v2): every one parses, and `gguf-swarm tokenizer`
writes its files or refuses its vocabulary type with one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import fragmenter as fr
from node.cli import main
from tests.conftest import FIXTURES, sha256_file
from tests.vocab import VOCAB_MODELS

# the tokenizer.ggml.model values fragmenter/tokenizer.py writes files for
SUPPORTED = ("llama", "gpt2", "gemma4", "bert", "t5")
NAMES = sorted(VOCAB_MODELS)


def vocab_file(folder: Path, name: str) -> Path:
    return folder / f"ggml-vocab-{name}.gguf"


def test_the_pinned_sdist_holds_the_files_we_expect(llama_vocab_dir: Path) -> None:
    found = sorted(p.name.removeprefix("ggml-vocab-").removesuffix(".gguf") for p in llama_vocab_dir.glob("*.gguf"))
    assert found == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_parses(llama_vocab_dir: Path, name: str) -> None:
    data = vocab_file(llama_vocab_dir, name).read_bytes()
    header = fr.parse_header(data)
    assert header.tensors == [] and header.version == (2 if name == "aquila" else 3)
    assert header.data_start == len(data)  # the file ends right after the metadata
    assert header.metadata["tokenizer.ggml.model"] == VOCAB_MODELS[name]
    assert header.metadata["tokenizer.ggml.tokens"].count > 1000


@pytest.mark.parametrize("name", NAMES)
def test_tokenizer_command(
    llama_vocab_dir: Path, name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code = main(["tokenizer", str(vocab_file(llama_vocab_dir, name)), str(out)])
    stdout, stderr = capsys.readouterr()
    model = VOCAB_MODELS[name]
    if model not in SUPPORTED:
        assert code == 1
        supported = "only 'llama', 'gpt2', 'gemma4', 'bert' and 't5'"
        assert stderr.splitlines() == [f"error: tokenizer model {model!r} is not supported ({supported})"]
        assert not list(out.glob("tokenizer.*"))
        return
    assert code == 0, stderr
    expected = ["tokenizer.json", "tokenizer.model"] if model == "llama" else ["tokenizer.json"]
    expected += ["tokenizer_config.json", "special_tokens_map.json"]
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)
    assert stdout.strip() == "wrote " + ", ".join(expected)
    tokenizers = pytest.importorskip("tokenizers")
    tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))  # loads: a well-formed tokenizer.json


@pytest.mark.parametrize("name", ["aquila", "llama-spm"])  # GGUF v2 and v3
def test_fragments_into_a_header_only_folder(llama_vocab_dir: Path, name: str, tmp_path: Path) -> None:
    model = vocab_file(llama_vocab_dir, name)
    result = fr.fragment_model(model, tmp_path / "frag")
    manifest = fr.read_manifest(tmp_path / "frag")
    assert result.fragments == 0 and manifest.fragments == []
    assert manifest.header_size == manifest.file_size == model.stat().st_size
    assert fr.verify_folder(tmp_path / "frag").ok
    fr.assemble(tmp_path / "frag", tmp_path / "back.gguf")
    assert sha256_file(tmp_path / "back.gguf") == sha256_file(model)


# ---- token ids: llama.cpp's own test vectors -----------------------------------------

# llama.cpp's tests/test-tokenizer-0.cpp: `.inp` holds the texts separated by this line,
# `.out` one line of space-separated ids per text, tokenized with add_special = false and
# parse_special = false.
_SEPARATOR = "\n__ggml_vocab_test__\n"
NO_VECTORS = ("aquila", "baichuan", "gpt-neox", "nomic-bert-moe")  # no .inp/.out: see LLAMA_CPP_IDS["plain"]
WITH_VECTORS = [n for n in NAMES if VOCAB_MODELS[n] in SUPPORTED and n not in NO_VECTORS]
# Vocabularies whose written tokenizer.json is known to give other ids than llama.cpp
# on some of its texts (name -> why); strict, so that a fix is noticed.
KNOWN_DIFFERENT: dict[str, str] = {}


def vectors(folder: Path, name: str) -> list[tuple[str, list[int]]]:
    texts = (folder / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8").split(_SEPARATOR)
    if texts[-1] == "":  # the file ends with a separator
        texts.pop()
    lines = (folder / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8").splitlines()
    assert len(texts) == len(lines) > 0
    return [(text, [int(i) for i in line.split()]) for text, line in zip(texts, lines, strict=True)]


def test_which_vocabularies_have_vectors(llama_vocab_dir: Path) -> None:
    with_inp = {p.name.removeprefix("ggml-vocab-").removesuffix(".gguf.inp") for p in llama_vocab_dir.glob("*.inp")}
    assert sorted(n for n in with_inp if VOCAB_MODELS[n] in SUPPORTED) == WITH_VECTORS


@pytest.fixture(scope="module")
def built_vocabs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where each vocabulary's files are built, once for the tests that load them
    (a test's own tmp_path is removed when it passes)."""
    return tmp_path_factory.mktemp("vocabs")


def written_tokenizer(folder: Path, name: str, built_vocabs: Path) -> Any:
    """A fresh Tokenizer of our files for vocabulary `name` (the files are built
    once per run; each test loads its own copy, as its settings change it)."""
    tokenizers = pytest.importorskip("tokenizers")
    built = built_vocabs / name
    if not (built / "tokenizer.json").exists():
        built.mkdir(exist_ok=True)
        fr.write_tokenizer_files(fr.parse_header(vocab_file(folder, name).read_bytes()), built)
    return tokenizers.Tokenizer.from_file(str(built / "tokenizer.json"))


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=KNOWN_DIFFERENT[n])) if n in KNOWN_DIFFERENT else n
        for n in WITH_VECTORS
    ],
)
def test_token_ids_match_llama_cpp(llama_vocab_dir: Path, name: str, built_vocabs: Path) -> None:
    tok = written_tokenizer(llama_vocab_dir, name, built_vocabs)
    tok.encode_special_tokens = True  # parse_special = false: control tokens in the text are plain text
    cases = vectors(llama_vocab_dir, name)
    wrong = [(text, ids, got) for text, ids in cases if (got := tok.encode(text, add_special_tokens=False).ids) != ids]
    assert not wrong, f"{name}: {len(cases) - len(wrong)}/{len(cases)} texts match llama.cpp; first: {wrong[0]!r}"


# Ids from llama.cpp's llama-tokenize for what the vectors above do not cover.
LLAMA_CPP_IDS = json.loads((FIXTURES / "llama-cpp-ids.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", NO_VECTORS)
def test_vocabularies_without_vectors(llama_vocab_dir: Path, name: str, built_vocabs: Path) -> None:
    """aquila and gpt-neox have no `tokenizer.ggml.pre` (llama.cpp's default regexes);
    nomic-bert-moe is a T5-style Unigram vocabulary."""
    tok = written_tokenizer(llama_vocab_dir, name, built_vocabs)
    tok.encode_special_tokens = True
    texts = [text for text, _ in vectors(llama_vocab_dir, "llama-bpe")]
    expected = LLAMA_CPP_IDS["plain"][name]
    assert len(texts) == len(expected)
    for text, ids in zip(texts, expected, strict=True):
        assert tok.encode(text, add_special_tokens=False).ids == ids, text


def check_special_cases(tok: Any, cases: list[dict[str, Any]]) -> None:
    """parse_special = true: control and user-defined tokens written in the text are
    single ids; false (`encode_special_tokens`): only user-defined ones are."""
    for case in cases:
        tok.encode_special_tokens = False
        assert tok.encode(case["text"], add_special_tokens=False).ids == case["ids"], case["text"]
        tok.encode_special_tokens = True
        assert tok.encode(case["text"], add_special_tokens=False).ids == case["ids_as_text"], case["text"]


@pytest.mark.parametrize("name", sorted(set(LLAMA_CPP_IDS["special"]) - {"gemma3"}))
def test_special_tokens_in_the_text(llama_vocab_dir: Path, name: str, built_vocabs: Path) -> None:
    """Includes llama.cpp's fix-ups: tokens it makes control tokens by their text
    (aquila's <|endoftext|>, deepseek-coder's FIM tokens, qwen2's </s>) and phi-3's,
    which swallow the whitespace after them."""
    check_special_cases(written_tokenizer(llama_vocab_dir, name, built_vocabs), LLAMA_CPP_IDS["special"][name])


@pytest.mark.parametrize("name", sorted(LLAMA_CPP_IDS["add_special"]))
def test_bos_and_eos_as_llama_cpp_adds_them(llama_vocab_dir: Path, name: str, built_vocabs: Path) -> None:
    """llama-bpe's file has no `add_bos_token`: llama.cpp adds BOS for its pre-tokenizer."""
    tok = written_tokenizer(llama_vocab_dir, name, built_vocabs)
    for case in LLAMA_CPP_IDS["add_special"][name]:
        assert tok.encode(case["text"]).ids == case["ids"], case["text"]
