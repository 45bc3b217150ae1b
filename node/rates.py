"""Bytes per second over a sliding window: pure, clock passed in."""

from __future__ import annotations

from collections import deque


class RateMeter:
    """Rate over the last `window` seconds, kept in `step`-second buckets."""

    def __init__(self, window: float = 5.0, step: float = 0.25) -> None:
        self.window = window
        self.step = step
        self._buckets: deque[tuple[int, int]] = deque()  # (bucket number, bytes)
        self.total = 0
        self._first: float | None = None

    def add(self, n: int, now: float) -> None:
        self.total += n
        if self._first is None:
            self._first = now
        slot = int(now / self.step)
        if self._buckets and self._buckets[-1][0] == slot:
            self._buckets[-1] = (slot, self._buckets[-1][1] + n)
        else:
            self._buckets.append((slot, n))
        self._trim(slot)

    def rate(self, now: float) -> float:
        slot = int(now / self.step)
        self._trim(slot)
        if not self._buckets or self._first is None:
            return 0.0
        # A young meter divides by its age, so the first second is not underestimated.
        span = min(self.window, max(now - self._first, self.step))
        return sum(n for _, n in self._buckets) / span

    def average(self, now: float) -> float:
        """Bytes per second since the first byte: what a link that has gone idle
        could still carry, by its record (`rate` falls to 0 while it idles)."""
        if self._first is None:
            return 0.0
        return self.total / max(now - self._first, self.step)

    def _trim(self, slot: int) -> None:
        oldest = slot - int(self.window / self.step)
        while self._buckets and self._buckets[0][0] < oldest:
            self._buckets.popleft()


class UplinkUse:
    """Whether an upload runs well below what it has shown it can carry.

    A super-seed may send a block twice only with upload to spare
    (node/seeding.py). Requests waiting in its queues do not show that its
    uplink is full: with 8 pullers at 20 Mbit/s up and 100 down behind a
    100 Mbit/s seed, the one puller still asking at the end of the first round
    had its downlink filled by the other pullers, and the seed sent ~0.1 MB/s
    for 10 s while the seven others, holding all they had been shown, wanted
    nothing of it. So the node samples its total upload every tick: below
    `fraction` of the best rate it has reached over `window` seconds, it has
    upload to spare. The best rate fades with a half-life of `memory` seconds,
    so an uplink that has become slower for good is not taken as idle forever.
    """

    def __init__(self, window: float = 1.0, fraction: float = 0.5, memory: float = 60.0) -> None:
        self.window = window
        self.fraction = fraction
        self.memory = memory
        self._samples: deque[tuple[float, int]] = deque()  # (time, bytes uploaded so far)
        self.rate = 0.0  # over the last window; 0 until a whole window has been seen
        self.best = 0.0

    def sample(self, total: int, now: float) -> None:
        """The node's upload so far, in bytes (a count that only grows)."""
        if self._samples:
            self.best *= 0.5 ** ((now - self._samples[-1][0]) / self.memory)
        self._samples.append((now, total))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window:
            self._samples.popleft()
        first_time, first_total = self._samples[0]
        if now - first_time >= self.window:
            self.rate = (total - first_total) / (now - first_time)
            self.best = max(self.best, self.rate)

    def underused(self) -> bool:
        return self.rate < self.fraction * self.best
