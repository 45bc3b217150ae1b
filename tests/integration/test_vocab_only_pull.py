"""A GGUF without tensors (a vocabulary only) through the real console script:
fragmented into a header-only folder, seeded, pulled and assembled."""

from __future__ import annotations

from pathlib import Path

import fragmenter as fr
from tests.conftest import sha256_file
from tests.gguf_factory import write_vocab_only
from tests.integration.test_cli_node import events, pull, seed_process


def test_pull_a_model_without_fragments(tmp_path: Path) -> None:
    model = write_vocab_only(tmp_path / "vocab.gguf")
    data = tmp_path / "seed"
    result = fr.fragment_model(model, data / "vocab")
    assert result.fragments == 0
    with seed_process(data) as addr:
        proc = pull(result.model_cid, tmp_path / "p", addr, "--output", str(tmp_path / "out.gguf"), "--timeout", "20")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [e for e in events(proc) if e["event"] == "pulled"]
    assert sha256_file(tmp_path / "out.gguf") == sha256_file(model)
    folder = tmp_path / "p" / result.model_cid
    assert (folder / "tokenizer.json").read_bytes() == (data / "vocab" / "tokenizer.json").read_bytes()
