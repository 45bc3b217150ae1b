"""`python -m fragmenter.build_tokenizer`, the process a pull builds its tokenizer files in."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from fragmenter.build_tokenizer import CANNOT_WRITE
from tests.gguf_factory import write_vocab_only

ROOT = Path(__file__).resolve().parents[2]
BUILD = [sys.executable, "-m", "fragmenter.build_tokenizer"]


def build(header: Path, folder: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BUILD, str(header), str(folder)], capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_a_folder_that_cannot_be_written_has_its_own_exit_status(tmp_path: Path) -> None:
    # A pull fails on this one (a full disk, say), and only warns when the vocabulary is the trouble.
    header = write_vocab_only(tmp_path / "vocab.gguf")
    (tmp_path / "a-file").write_bytes(b"")
    proc = build(header, tmp_path / "a-file" / "folder")
    assert proc.returncode == CANNOT_WRITE, proc.stderr
    assert proc.stderr.startswith("error: cannot write into ") and proc.stderr.count("\n") == 1

    rwkv = write_vocab_only(tmp_path / "rwkv.gguf", tokenizer_model="rwkv")
    proc = build(rwkv, tmp_path / "out")
    assert proc.returncode == 1 and "rwkv" in proc.stderr

    assert build(header, tmp_path / "out").returncode == 0
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_a_build_ended_by_sigterm_leaves_no_staging_file(gemma_folder: Path, tmp_path: Path) -> None:
    # What a pull that stops sends it. Gemma's 262k-token vocabulary keeps the
    # build inside tokenizer.json's staging file for a few tenths of a second.
    out = tmp_path / "out"
    proc = subprocess.Popen([*BUILD, str(gemma_folder / "gguf_header.dat"), str(out)], cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while not any(out.glob(".tokenizer.json.partial-*")):
            assert proc.poll() is None, "the build ended before it was caught writing"
            assert time.monotonic() < deadline
            time.sleep(0.002)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no staging file left
