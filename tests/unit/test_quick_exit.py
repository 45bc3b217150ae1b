"""A command's quick exit keeps what it printed and logged, and its exit code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Buffered standard streams, as a user's shell gives them (PYTHONUNBUFFERED would hide a lost flush).
BUFFERED = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}

SCRIPT = """
import logging, sys
from fragmenter.quick_exit import quick_exit
logging.basicConfig(stream=open(sys.argv[1], "a"), level=logging.INFO)  # a block-buffered file
logging.info("logged")
print("x" * 70000)  # more than one buffer's worth, the tail still buffered
sys.stderr.write("said")
quick_exit(3)
"""


def test_buffered_output_and_logs_survive_the_quick_exit(tmp_path: Path) -> None:
    log = tmp_path / "log.txt"
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(log)], capture_output=True, text=True, cwd=ROOT, env=BUFFERED
    )
    assert out.returncode == 3
    assert out.stdout == "x" * 70000 + "\n"
    assert out.stderr == "said"
    assert log.read_text() == "INFO:root:logged\n"


def test_output_to_a_closed_pipe_does_not_turn_the_exit_into_a_traceback() -> None:
    script = (
        "import sys\nfrom fragmenter.quick_exit import quick_exit\n"
        "sys.stdout.write('y' * 1000)\nsys.stderr.write('buffered\\n')\nsys.stderr.flush()\n"
        "sys.stdin.readline()\nquick_exit(0)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env=BUFFERED,
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    assert proc.stderr.readline() == b"buffered\n"
    proc.stdout.close()  # `| head -c 0`: the 1000 bytes are still in the script's buffer
    proc.stdin.write(b"\n")
    proc.stdin.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=20) == 0
    assert err == b""
