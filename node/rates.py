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
