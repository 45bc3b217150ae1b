"""The upload token bucket, with a hand-driven clock."""

from __future__ import annotations

import pytest

from node.ratelimit import TokenBucket


def test_burst_is_free_then_the_rate_applies() -> None:
    bucket = TokenBucket(rate=100, burst=50, now=0.0)
    assert bucket.reserve(50, now=0.0) == 0.0
    assert bucket.reserve(100, now=0.0) == pytest.approx(1.0)  # 100 bytes of debt at 100 B/s
    assert bucket.reserve(100, now=0.0) == pytest.approx(2.0)  # queued behind the first


def test_idle_time_refills_up_to_the_burst_only() -> None:
    bucket = TokenBucket(rate=100, burst=50, now=0.0)
    bucket.reserve(50, now=0.0)
    assert bucket.reserve(50, now=10.0) == 0.0  # refilled, but capped at 50
    assert bucket.reserve(1, now=10.0) == pytest.approx(0.01)


def test_long_run_rate_never_exceeds_the_limit() -> None:
    bucket = TokenBucket(rate=1000, burst=100, now=0.0)
    now, sent = 0.0, 0
    for _ in range(1000):
        now += bucket.reserve(64, now)  # the sender waits as told
        sent += 64
    assert sent <= 100 + 1000 * now


def test_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate=0, burst=1, now=0.0)
