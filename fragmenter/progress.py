"""Progress display for long work: a bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class ProgressBar:
    """Call with (done, total) as often as you like; it redraws at most 10×/s
    on a terminal and writes a plain line every `line_every` seconds elsewhere."""

    def __init__(self, label: str, stream: TextIO | None = None, line_every: float = 5.0) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = time.monotonic()
        self.last = 0.0 if self.tty else self.start  # plain lines: the first after line_every
        self.line_every = line_every
        self.extra = ""

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last < (0.1 if self.tty else self.line_every) and done < total:
            return
        self.last = now
        elapsed = max(now - self.start, 1e-6)
        speed = done / elapsed
        eta = (total - done) / speed if speed > 0 else 0.0
        pct = 100.0 * done / total if total else 100.0
        stats = f"{human_bytes(done)}/{human_bytes(total)} {human_bytes(speed)}/s ETA {human_seconds(eta)}{self.extra}"
        if self.tty:
            width = 24
            filled = int(width * pct / 100)
            bar = "#" * filled + "-" * (width - filled)
            self.stream.write(f"\r{self.label} [{bar}] {pct:5.1f}% {stats}\x1b[K")
        else:
            self.stream.write(f"{self.label}: {pct:5.1f}% {stats}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
