from __future__ import annotations

import json
from pathlib import Path

import pytest

import fragmenter as fr
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
