"""Quick locks (node/libp2p_patches/locks.py): free means no trip through
trio's run loop; held means trio's own waiting, in order; cancellation holds."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing
from libp2p.io.trio import TrioTCPStream
from libp2p.stream_muxer.rw_lock import ReadWriteLock

from node.libp2p_patches import apply_all
from node.libp2p_patches.locks import QuickLock, QuickSemaphore


class RunLoopPasses(trio.abc.Instrument):
    def __init__(self) -> None:
        self.passes = 0

    def before_io_wait(self, timeout: float) -> None:
        self.passes += 1


@pytest.mark.parametrize("make", [QuickLock, lambda: QuickSemaphore(1)])
async def test_a_free_lock_is_taken_without_a_pass_through_the_run_loop(make: Callable[[], Any]) -> None:
    lock = make()
    counter = RunLoopPasses()
    trio.lowlevel.add_instrument(counter)
    try:
        for _ in range(1000):
            async with lock:
                pass
    finally:
        trio.lowlevel.remove_instrument(counter)
    assert counter.passes == 0  # a trio.Lock: 1000 passes


@pytest.mark.parametrize("make", [QuickLock, lambda: QuickSemaphore(1)])
async def test_a_held_lock_is_handed_on_first_come_first_served(make: Callable[[], Any]) -> None:
    lock = make()
    order: list[int] = []

    async def take(i: int) -> None:
        async with lock:
            order.append(i)
            await trio.sleep(0.01)

    async with trio.open_nursery() as nursery:
        await lock.acquire()
        for i in range(5):
            nursery.start_soon(take, i)
            await trio.testing.wait_all_tasks_blocked()
        lock.release()
    assert order == [0, 1, 2, 3, 4]


async def test_only_one_task_holds_a_quick_lock() -> None:
    lock = QuickLock()
    inside = 0
    most = 0

    async def work() -> None:
        nonlocal inside, most
        for _ in range(20):
            async with lock:
                inside += 1
                most = max(most, inside)
                await trio.sleep(0)
                inside -= 1

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(work)
    assert most == 1


async def test_a_cancelled_task_cannot_take_a_free_quick_lock() -> None:
    lock = QuickLock()
    with trio.CancelScope() as scope:
        scope.cancel()
        await lock.acquire()
    assert scope.cancelled_caught
    assert not lock.locked()


async def test_py_libp2p_objects_get_quick_locks_when_made() -> None:
    apply_all()
    a, b = trio.testing.memory_stream_pair()
    tcp = TrioTCPStream(a)  # type: ignore[arg-type]
    assert isinstance(tcp.read_lock, QuickLock) and isinstance(tcp.write_lock, QuickLock)
    rw = ReadWriteLock()
    assert isinstance(rw._readers_lock, QuickLock) and isinstance(rw._writer_lock, QuickSemaphore)
    async with rw.write_lock():
        assert rw._writer_lock.value == 0
    assert rw._writer_lock.value == 1
