"""RateMeter: the recent rate over a sliding window, and the average since the first byte.
UplinkUse: an uplink carrying well under its best rate has upload to spare."""

from __future__ import annotations

import pytest

from node.rates import RateMeter, UplinkUse


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


def sample_at_rate(use: UplinkUse, rate: float, start: float, seconds: float, total: int, tick: float = 0.25) -> int:
    """Feed `use` a constant upload rate for `seconds`; returns the new total."""
    steps = round(seconds / tick)
    for i in range(1, steps + 1):
        use.sample(total + round(rate * tick * i), start + tick * i)
    return total + round(rate * tick * steps)


def test_an_uplink_at_its_best_rate_is_busy_and_one_at_a_fraction_of_it_has_upload_to_spare() -> None:
    use = UplinkUse(window=1.0, fraction=0.5, memory=60.0)
    assert not use.underused()  # nothing seen yet: nothing to compare with
    total = sample_at_rate(use, 12_000_000, 0.0, 10.0, 0)
    assert use.rate == pytest.approx(12_000_000)
    assert not use.underused()
    # The one peer still asking is held back by its own downlink: 0.2 MB/s.
    total = sample_at_rate(use, 200_000, 10.0, 2.0, total)
    assert use.underused()
    sample_at_rate(use, 11_000_000, 12.0, 2.0, total)  # busy again
    assert not use.underused()


def test_small_dips_of_a_busy_uplink_are_not_upload_to_spare() -> None:
    use = UplinkUse()
    total = 0
    for second in range(30):  # a token bucket's rate, give or take 15%
        total = sample_at_rate(use, 4_400_000 if second % 2 else 3_800_000, float(second), 1.0, total)
        assert not use.underused()


def test_the_best_rate_fades_so_an_uplink_slower_for_good_is_busy_again() -> None:
    use = UplinkUse(window=1.0, fraction=0.5, memory=20.0)
    total = sample_at_rate(use, 10_000_000, 0.0, 5.0, 0)
    total = sample_at_rate(use, 3_000_000, 5.0, 5.0, total)
    assert use.underused()
    sample_at_rate(use, 3_000_000, 10.0, 60.0, total)  # three half-lives: 10 MB/s is now 1.25
    assert not use.underused()
    assert use.best == pytest.approx(3_000_000, rel=0.01)
