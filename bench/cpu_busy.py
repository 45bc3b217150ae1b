"""How busy the machine's cores were over a stretch of time, from /proc/stat.

A swarm benchmark runs every host on one machine, so a contender can be held
back by the cores rather than by the links. `CpuSampler` records the
machine-wide counters in a thread; `busy_between` says, for a window, what
share of all cores was busy and how many core-seconds that was. A contender
that leaves cores idle is not CPU-bound, whatever its time.
"""

from __future__ import annotations

import bisect
import math
import os
import threading
import time
from dataclasses import dataclass

TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class CpuSample:
    at: float  # time.monotonic()
    busy: int  # jiffies summed over all cores: user, nice, system, irq, softirq, steal
    total: int  # busy + idle + iowait


def read_proc_stat(text: str, at: float) -> CpuSample:
    """The machine-wide line of /proc/stat ("cpu  user nice system idle iowait irq softirq steal ...")."""
    fields = [int(x) for x in text.split("\n", 1)[0].split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields + [0] * (8 - len(fields))
    busy = user + nice + system + irq + softirq + steal
    return CpuSample(at, busy, busy + idle + iowait)


def busy_between(samples: list[CpuSample], start: float, end: float) -> tuple[float, float]:
    """(share of all cores busy, busy core-seconds) between the samples nearest
    `start` and `end`; (nan, nan) when the window holds fewer than two samples
    or is not known (a contender not run)."""
    if math.isnan(start) or math.isnan(end):
        return float("nan"), float("nan")  # bisect would take a nan window for all of them
    times = [s.at for s in samples]
    i = bisect.bisect_left(times, start)
    j = bisect.bisect_right(times, end) - 1
    if i >= len(samples) or j <= i:
        return float("nan"), float("nan")
    first, last = samples[i], samples[j]
    total = last.total - first.total
    busy = last.busy - first.busy
    return (busy / total if total else float("nan")), busy / TICK


class CpuSampler:
    """Samples /proc/stat every `every` seconds in a daemon thread while running."""

    def __init__(self, every: float = 0.25) -> None:
        self.every = every
        self.samples: list[CpuSample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with open("/proc/stat") as f:
                self.samples.append(read_proc_stat(f.read(), time.monotonic()))
            if self._stop.wait(self.every):
                return
