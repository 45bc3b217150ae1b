"""bench/cpu_busy.py: the share of the machine's cores a contender kept busy."""

from __future__ import annotations

import math
import time

from bench.cpu_busy import TICK, CpuSample, CpuSampler, busy_between, read_proc_stat


def test_a_proc_stat_line_counts_irq_softirq_and_steal_as_busy_and_iowait_as_idle() -> None:
    sample = read_proc_stat("cpu  100 5 20 300 40 1 2 3 0 0\ncpu0 50 2 10 150 20 0 1 1 0 0\n", at=1.0)
    assert sample == CpuSample(1.0, busy=100 + 5 + 20 + 1 + 2 + 3, total=131 + 300 + 40)


def test_busy_between_takes_the_samples_inside_the_window() -> None:
    # Two cores: idle for the first second, both busy for the next two, half busy after.
    samples = [
        CpuSample(0.0, 0, 0),
        CpuSample(1.0, 0, 2 * TICK),
        CpuSample(2.0, 2 * TICK, 4 * TICK),
        CpuSample(3.0, 4 * TICK, 6 * TICK),
        CpuSample(4.0, 5 * TICK, 8 * TICK),
    ]
    share, core_seconds = busy_between(samples, 1.0, 3.0)
    assert (share, core_seconds) == (1.0, 4.0)
    share, core_seconds = busy_between(samples, 0.5, 4.0)  # from the first sample inside: 1.0
    assert math.isclose(share, 5 / 6) and math.isclose(core_seconds, 5.0)


def test_a_window_with_fewer_than_two_samples_has_no_answer() -> None:
    samples = [CpuSample(0.0, 0, 0), CpuSample(1.0, TICK, 2 * TICK)]
    assert all(math.isnan(x) for x in busy_between(samples, 0.2, 0.9))
    assert all(math.isnan(x) for x in busy_between(samples, 5.0, 6.0))


def test_a_contender_not_run_has_no_answer() -> None:
    samples = [CpuSample(float(t), t * TICK, 2 * t * TICK) for t in range(5)]
    nan = float("nan")
    assert all(math.isnan(x) for x in busy_between(samples, nan - 1.0, nan))  # aria2c skipped: its window


def test_the_sampler_sees_this_process_keep_a_core_busy() -> None:
    with CpuSampler(every=0.05) as cpu:
        start = time.monotonic()
        while time.monotonic() - start < 0.5:
            pass  # one core busy
        end = time.monotonic()
    share, core_seconds = busy_between(cpu.samples, start, end)
    assert core_seconds >= 0.2  # this loop alone kept one core busy for most of the window
    assert 0.0 < share <= 1.0
