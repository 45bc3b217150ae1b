"""Locks on the data path that do not yield when they are free.

Flaw (py-libp2p 0.8.1 on trio 0.35): `trio.Lock.acquire` is a checkpoint, so
it sends the task back through trio's run loop even when the lock is free.
py-libp2p takes several locks for every 64 KiB Noise message: the TCP
stream's read or write lock, NetStream's state lock, Yamux's read-write,
window and frame locks. `strace` of a puller at 100 Mbit/s counted 4,289
passes of the run loop (`epoll_wait` with no timeout) in 2 s, about ten a
message; a loopback pull spends its time there.

Fix: `QuickLock` and `QuickSemaphore` take what is free without yielding, and
wait exactly as trio's do (first come, first served, through trio's own lock)
when it is not, so mutual exclusion and fairness are trio's. Cancellation is
still checked on entry. Every loop on these paths still yields, at its socket
call or while it waits for data or window. The upstream objects' `trio.Lock`s
(and Yamux's one-writer `trio.Semaphore(1)`) are swapped for these when made.
Same puller: 608 passes in 2 s. `bench/pull_bench.py`: the pull 113 -> 131
MB/s, the raw stream (patched too) 264 -> 344 MB/s; an 8-puller netlab swarm
used 103 CPU-s in all, against 131-140.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import trio
from libp2p.io.trio import TrioTCPStream
from libp2p.network.stream.net_stream import NetStream
from libp2p.stream_muxer.rw_lock import ReadWriteLock
from libp2p.stream_muxer.yamux.yamux import Yamux, YamuxStream


class _QuickAcquire:
    """Takes the trio lock or semaphore it wraps (`_inner`) without yielding when it is free."""

    __slots__ = ("_inner",)
    _inner: Any

    async def acquire(self) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            self._inner.acquire_nowait()
        except trio.WouldBlock:
            await self._inner.acquire()  # trio's own wait, in arrival order

    def acquire_nowait(self) -> None:
        self._inner.acquire_nowait()

    def release(self) -> None:
        self._inner.release()

    def statistics(self) -> Any:
        return self._inner.statistics()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class QuickLock(_QuickAcquire):
    """A `trio.Lock` whose `acquire` yields only when it has to wait."""

    __slots__ = ()

    def __init__(self) -> None:
        self._inner = trio.Lock()

    def locked(self) -> bool:
        return bool(self._inner.locked())


class QuickSemaphore(_QuickAcquire):
    """A `trio.Semaphore` whose `acquire` yields only when it has to wait."""

    __slots__ = ()

    def __init__(self, value: int) -> None:
        self._inner = trio.Semaphore(value)

    @property
    def value(self) -> int:
        return int(self._inner.value)


def quicken(obj: object) -> None:
    """Swap the free `trio.Lock`s and one-slot `trio.Semaphore`s `obj` holds for quick ones."""
    for name, value in list(vars(obj).items()):
        if type(value) is trio.Lock and not value.locked():
            setattr(obj, name, QuickLock())
        elif type(value) is trio.Semaphore and value.value == 1 and value.max_value is None:
            setattr(obj, name, QuickSemaphore(1))


def apply() -> None:
    for cls in (TrioTCPStream, NetStream, YamuxStream, Yamux, ReadWriteLock):
        if not getattr(cls, "_gguf_swarm_quick_locks", False):
            cls.__init__ = _quickened(cls.__init__)  # type: ignore[method-assign]
            cls._gguf_swarm_quick_locks = True  # type: ignore[attr-defined]


def _quickened(upstream_init: Any) -> Any:
    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        upstream_init(self, *args, **kwargs)
        quicken(self)

    return init
