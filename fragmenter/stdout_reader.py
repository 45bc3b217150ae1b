"""A command whose stdout reader has gone (`gguf-swarm pull --json | head -1`) stops, quietly.

A program killed by SIGPIPE is the Unix way: the pipeline ends when its
reader does. Python ignores SIGPIPE (its sockets then fail with EPIPE, which a
node needs: a peer that hangs up must not kill it), so a write to the closed
pipe raises BrokenPipeError instead. Uncaught, that is a traceback; caught by
a swarm's event callback, it was one traceback per progress event while the
pull went on with nobody reading. Here the first such write points stdout at
/dev/null, so nothing later (our lines, the interpreter's last flush) fails
again, and sends the process SIGTERM: it ends as when its user stops it. A
seed stops cleanly, exit 0; a pull ends at once (exit 143), and keeps all it
had verified for the next pull, as after any kill.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any, TextIO


class _StdoutReaderMayLeave:
    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.gone = False

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._reader_left()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._reader_left()

    def _reader_left(self) -> None:
        if self.gone:
            return
        self.gone = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)
        try:
            self._stream.flush()  # what it still buffered, to /dev/null now
        except OSError:
            pass  # nothing more can be said on it anyway
        signal.raise_signal(signal.SIGTERM)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def stop_when_stdout_reader_leaves() -> None:
    if not isinstance(sys.stdout, _StdoutReaderMayLeave) and sys.stdout is not None:
        sys.stdout = _StdoutReaderMayLeave(sys.stdout)  # type: ignore[assignment]
