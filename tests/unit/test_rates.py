"""RateMeter: the recent rate over a sliding window, and the average since the first byte."""

from __future__ import annotations

import pytest

from node.rates import RateMeter


def test_the_recent_rate_covers_the_window_and_falls_to_zero_when_idle() -> None:
    meter = RateMeter(window=5.0, step=0.25)
    for i in range(40):  # 1 MB a second for 10 s
        meter.add(250_000, 0.25 * i)
    assert meter.rate(10.0) == pytest.approx(1_000_000, rel=0.06)
    assert meter.rate(16.0) == 0.0  # idle for longer than the window


def test_the_average_remembers_what_an_idle_link_carried() -> None:
    meter = RateMeter(window=5.0, step=0.25)
    assert meter.average(3.0) == 0.0  # nothing yet: unknown
    for i in range(40):
        meter.add(250_000, 0.25 * i)
    assert meter.rate(16.0) == 0.0
    assert meter.average(16.0) == pytest.approx(10_000_000 / 16.0)
    assert meter.average(0.0) == pytest.approx(10_000_000 / 0.25)  # a young meter divides by one step at least
