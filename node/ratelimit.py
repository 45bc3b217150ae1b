"""A token bucket for upload rate limits: pure arithmetic, the clock passed in.

`reserve(n, now)` books n bytes and returns how long the caller must wait
before sending them. Reservations queue fairly in call order: a large send
books ahead and later callers wait behind it, so the long-run rate never
exceeds `rate` and bursts never exceed `burst`.
"""

from __future__ import annotations


class TokenBucket:
    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._updated = now

    def reserve(self, n: int, now: float) -> float:
        """Book n bytes; seconds to wait before sending them (0 if none)."""
        self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
        self._updated = now
        self._tokens -= n  # may go negative: later callers wait for the debt too
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate
