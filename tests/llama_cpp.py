"""llama.cpp's own tools, for the tests that check llama.cpp reads what we
write: `llama-simple` (loads a model, split parts included, and generates
greedily) and `llama-gguf-split`, built from the llama.cpp that the pinned
llama-cpp-python sdist vendors (the one tests/vocab.py takes its vocab files
from).

A build takes ~5 minutes on 2 cores, so tests never build: `.ci/run` runs
`python -m tests.llama_cpp` first, which builds the tools once per machine
into the test cache (`cache_root()/llama.cpp-VERSION-tools`, see vocab.py);
without them those tests skip, saying how to build them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from tests.vocab import LLAMA_CPP_PYTHON_VERSION, SdistUnavailable, cache_root, download_sdist

TOOLS = ("llama-simple", "llama-gguf-split")
# A portable CPU build (no -march=native, no AVX-512 or AMX), static, without
# the network and server parts.
CMAKE_OPTIONS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=OFF",
    "-DGGML_AVX512=OFF",
    "-DGGML_AMX_TILE=OFF",
    "-DGGML_AMX_INT8=OFF",
    "-DGGML_AMX_BF16=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
]
_VENDORED = "vendor/llama.cpp/"


def tools_dir() -> Path:
    return cache_root() / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}-tools"


def tool(name: str) -> Path | None:
    """The built tool `name`, or None when it has not been built."""
    path = tools_dir() / name
    return path if os.access(path, os.X_OK) else None


def build() -> Path:
    """Build the tools into `tools_dir()` unless they are there; the folder."""
    target = tools_dir()
    if all(tool(name) for name in TOOLS):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        work = Path(tmp)
        source = work / "llama.cpp"
        _extract_llama_cpp(download_sdist(work), source)
        build_dir = work / "build"
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        subprocess.run(["cmake", "-S", str(source), "-B", str(build_dir), *generator, *CMAKE_OPTIONS], check=True)
        jobs = str(os.cpu_count() or 2)
        subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs, "--target", *TOOLS], check=True)
        staging = work / "tools"
        staging.mkdir()
        for name in TOOLS:
            shutil.copy2(build_dir / "bin" / name, staging / name)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)  # whole or not at all
    return target


def _extract_llama_cpp(sdist: Path, into: Path) -> None:
    """The sdist's vendor/llama.cpp tree (minus its test models), with tar's
    "data" filter: no links out of the tree, no device files."""
    with tarfile.open(sdist, "r:gz") as tar:
        members = []
        for member in tar.getmembers():
            name = member.name.split("/", 1)[-1]  # drop the llama_cpp_python-X.Y.Z/ prefix
            if not name.startswith(_VENDORED) or name.startswith(_VENDORED + "models/"):
                continue
            member.name = name[len(_VENDORED) :]
            if member.name:
                members.append(member)
        tar.extractall(into, members=members, filter="data")


def main() -> int:
    missing = [name for name in ("cmake", "c++") if shutil.which(name) is None]
    if missing:
        print(f"cannot build llama.cpp's tools: {', '.join(missing)} not installed", file=sys.stderr)
        return 1
    try:
        print(build())
    except SdistUnavailable as e:
        print(f"cannot build llama.cpp's tools: {e}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as e:
        print(f"cannot build llama.cpp's tools: {' '.join(e.cmd[:3])} failed (status {e.returncode})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
