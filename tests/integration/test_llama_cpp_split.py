"""Gemma split the way llama.cpp's gguf-split splits models goes through the
fragmenter and back byte-identical, and llama.cpp itself (its `llama-simple`,
built by tests/llama_cpp.py) generates the same text from the parts we
assemble, and from the one file `--merge` writes, as from the model never
split."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import fragmenter as fr
from tests import llama_cpp
from tests.conftest import sha256_file
from tests.gguf_split import gguf_split

PARTS = 3
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def gemma_parts(gemma_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Path]]:
    tensors = 236  # Gemma 3 270M
    folder = tmp_path_factory.mktemp("split")
    parts = gguf_split(gemma_model, folder / "gemma-3-270m", -(-tensors // PARTS))
    assert [p.name for p in parts] == [f"gemma-3-270m-{k:05d}-of-{PARTS:05d}.gguf" for k in range(1, PARTS + 1)]
    yield parts
    shutil.rmtree(folder)  # 253 MB, not needed past this module


@pytest.fixture(scope="module")
def assembled(gemma_parts: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list[Path], Path]]:
    """(the parts, the merged file) assembled from the fragments of the split model."""
    work = tmp_path_factory.mktemp("assembled")
    fr.fragment_model(gemma_parts[0], work / "frag")
    parts = fr.assemble(work / "frag", work / "parts").files
    fr.assemble(work / "frag", work / "merged.gguf", merge=True)
    yield list(parts), work / "merged.gguf"
    shutil.rmtree(work)  # 760 MB


def test_split_gemma_fragments_into_one_model_and_assembles_byte_identical(
    gemma_model: Path, gemma_parts: list[Path], assembled: tuple[list[Path], Path], tmp_path: Path
) -> None:
    parts, merged = assembled
    assert [p.name for p in parts] == [p.name for p in gemma_parts]
    for ours, original in zip(parts, gemma_parts, strict=True):
        assert sha256_file(ours) == sha256_file(original)
    # The split keys dropped, the parts' paddings gone: the very file that was split.
    assert sha256_file(merged) == sha256_file(gemma_model)


def _generate(model: Path) -> str:
    simple = llama_cpp.tool("llama-simple")
    assert simple is not None
    done = subprocess.run([str(simple), "-m", str(model), "-n", "16", PROMPT], capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    return done.stdout.decode()


@pytest.mark.skipif(
    llama_cpp.tool("llama-simple") is None, reason="llama.cpp's tools not built: python -m tests.llama_cpp"
)
def test_llama_cpp_generates_the_same_text_from_what_we_assemble(
    gemma_model: Path, gemma_parts: list[Path], assembled: tuple[list[Path], Path], tmp_path: Path
) -> None:
    split_tool = llama_cpp.tool("llama-gguf-split")
    if split_tool is not None:  # our gguf_split is llama.cpp's, byte for byte
        subprocess.run(
            [str(split_tool), "--split", "--split-max-tensors", str(-(-236 // PARTS)), gemma_model, tmp_path / "ref"],
            check=True,
            capture_output=True,
        )
        for k, ours in enumerate(gemma_parts, 1):
            assert sha256_file(tmp_path / f"ref-{k:05d}-of-{PARTS:05d}.gguf") == sha256_file(ours)
    parts, merged = assembled
    reference = _generate(gemma_model)
    assert reference.startswith(f"<bos>{PROMPT}") and len(reference) > len(PROMPT) + 20  # it did generate
    assert _generate(parts[0]) == reference  # llama.cpp finds parts 2 and 3 beside part 1
    assert _generate(merged) == reference
