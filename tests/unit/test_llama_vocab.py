"""llama.cpp's own vocabulary-only GGUFs (no tensors, no padding after the
metadata, one of them GGUF v2): every one parses, and `gguf-swarm tokenizer`
writes its files or refuses its vocabulary type with one line."""

from __future__ import annotations

from pathlib import Path

import pytest

import fragmenter as fr
from node.cli import main
from tests.conftest import sha256_file
from tests.vocab import VOCAB_MODELS

SUPPORTED = ("llama", "gpt2")  # the tokenizer.ggml.model values fragmenter/tokenizer.py writes files for
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
        assert stderr.splitlines() == [f"error: tokenizer model {model!r} is not supported (only 'llama' and 'gpt2')"]
        assert not list(out.glob("tokenizer.*"))
        return
    assert code == 0, stderr
    expected = ["tokenizer.json", "tokenizer.model"] if model == "llama" else ["tokenizer.json"]
    assert sorted(p.name for p in out.iterdir()) == expected
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
