"""llama.cpp's vocabulary-only test models (`models/ggml-vocab-*.gguf`), for tests.

llama-cpp-python's sdist vendors llama.cpp with those files. It is fetched once
with pip (pinned version and hash, so the test data cannot change under us),
and only the `ggml-vocab-*` files are kept, in a cache folder shared by test
runs: `$GGUF_SWARM_TEST_CACHE`, else `$XDG_CACHE_HOME/gguf-swarm-tests`, else
`~/.cache/gguf-swarm-tests`. Without network the tests that need them skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"  # 76,589,250 bytes

# The vocabulary files in that version, with the `tokenizer.ggml.model` of each.
VOCAB_MODELS = {
    "aquila": "gpt2",
    "baichuan": "llama",
    "bert-bge": "bert",
    "command-r": "gpt2",
    "deepseek-coder": "gpt2",
    "deepseek-llm": "gpt2",
    "falcon": "gpt2",
    "gemma-4": "gemma4",
    "gpt-2": "gpt2",
    "gpt-neox": "gpt2",
    "llama-bpe": "gpt2",
    "llama-spm": "llama",
    "mpt": "gpt2",
    "nomic-bert-moe": "t5",
    "phi-3": "llama",
    "qwen2": "gpt2",
    "qwen35": "gpt2",
    "refact": "gpt2",
    "starcoder": "gpt2",
}

_PREFIX = "vendor/llama.cpp/models/ggml-vocab-"


def cache_root() -> Path:
    if os.environ.get("GGUF_SWARM_TEST_CACHE"):
        return Path(os.environ["GGUF_SWARM_TEST_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gguf-swarm-tests"


def llama_cpp_vocab_dir() -> Path:
    """The folder of `ggml-vocab-*` files (with their `.inp`/`.out`), fetched on
    first use; skips the calling test when they cannot be fetched."""
    target = cache_root() / f"llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION}-vocab"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        sdist = _download_sdist(Path(tmp))
        staging = Path(tmp) / "vocab"
        staging.mkdir()
        _extract_vocab_files(sdist, staging)
        try:
            staging.rename(target)  # whole or not at all: an interrupted fetch leaves no half folder
        except OSError:
            if not target.is_dir():  # another run finished first: use its copy
                raise
    return target


class SdistUnavailable(Exception):
    """The pinned sdist cannot be had (no network, say); `fatal`: it can, but is not the pinned one."""

    def __init__(self, message: str, fatal: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal


def download_sdist(into: Path) -> Path:
    """The pinned llama-cpp-python sdist, downloaded into `into`; SdistUnavailable if not."""
    requirements = into / "requirements.txt"
    requirements.write_text(f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} --hash=sha256:{SDIST_SHA256}\n")
    # --no-binary for this one package only: its build dependencies (needed by pip
    # to read the sdist's metadata) then come as wheels, in seconds, not built.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python"]
    cmd += ["--require-hashes", "-r", str(requirements), "-d", str(into), "--quiet", "--retries", "2"]
    what = f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} sdist"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        raise SdistUnavailable(f"{what}: download timed out") from None
    if proc.returncode != 0:
        if "DO NOT MATCH THE HASHES" in proc.stderr:
            raise SdistUnavailable(f"{what} does not match its pinned sha256", fatal=True)
        last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise SdistUnavailable(f"cannot download the {what} (no network?): {last}")
    found = list(into.glob("llama_cpp_python-*.tar.gz"))
    if len(found) != 1:
        raise SdistUnavailable(f"pip download left {[p.name for p in into.iterdir()]}, expected one sdist", fatal=True)
    return found[0]


def _download_sdist(into: Path) -> Path:
    try:
        return download_sdist(into)
    except SdistUnavailable as e:
        if e.fatal:
            pytest.fail(str(e))
        pytest.skip(str(e))


def _extract_vocab_files(sdist: Path, into: Path) -> None:
    """Only `models/ggml-vocab-*`, each written under its own base name: nothing
    else of the 76 MB archive, and no path from the archive is trusted."""
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar:
            name = member.name.split("/", 1)[-1]  # drop the llama_cpp_python-X.Y.Z/ prefix
            if not (member.isfile() and name.startswith(_PREFIX) and "/" not in name[len(_PREFIX) :]):
                continue
            src = tar.extractfile(member)
            assert src is not None
            with src, open(into / Path(name).name, "wb") as out:
                shutil.copyfileobj(src, out)
