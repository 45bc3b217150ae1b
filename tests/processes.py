"""Child processes of the real CLI in tests."""

from __future__ import annotations

import signal
import subprocess


def terminate(proc: subprocess.Popen[str], timeout: float = 20) -> None:
    """SIGTERM (the node's clean stop), then SIGKILL if it does not stop in time."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
