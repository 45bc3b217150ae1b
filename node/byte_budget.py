"""A cap on the bytes held at once, for trio tasks.

Why bytes and not a count: received blocks wait in memory to be checked and
written; at 1 MiB blocks eight of them are plenty, but a model cut into 8 KiB
fragments needs hundreds in flight to keep one write batch per thread hop
busy. A byte cap bounds memory the same way for both.
"""

from __future__ import annotations

import trio


class ByteBudget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._freed = trio.Event()

    async def acquire(self, n: int) -> None:
        """Wait until `n` more bytes fit (anything fits when nothing is held)."""
        while self.held and self.held + n > self.limit:
            await self._freed.wait()
        self.held += n

    def release(self, n: int) -> None:
        self.held -= n
        self._freed.set()
        self._freed = trio.Event()
