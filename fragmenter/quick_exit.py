"""Ending a command's process without the interpreter's teardown.

Freeing every module a node command loads (py-libp2p, cryptography, trio,
numpy) takes ~0.3 s of CPU after the work is done: a third of a small
command's run, and on a pull it is time the user waits for nothing. By the
time a command returns, everything it writes is closed and synced in its own
`with` blocks; only the standard streams and log handlers still buffer.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn


def quick_exit(code: int) -> NoReturn:
    """Flush what still buffers, then end the process with `code` at once
    (a normal exit under a profiler or tracer: it reports at exit)."""
    if sys.getprofile() is not None or sys.gettrace() is not None:
        sys.exit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`| head`) or stream: nothing more to say
            pass
    os._exit(code)
