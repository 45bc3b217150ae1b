"""TCP: reads served from a buffer filled by large socket reads.

Flaw (py-libp2p 0.8.1): `TrioTCPStream.read(n)` is one `recv(n)` per call,
and Noise asks for exactly 2 bytes (a message's length), then exactly its
body. Every 64 KiB Noise message costs two system calls and two trips
through trio's scheduler: a cProfile of a 253 MB pull counted 19,255
`recv` calls (2.0 s) on the puller. Fix: `read` takes what it can from a
per-stream buffer, refilled by one `receive_some` of up to `READ_AHEAD` bytes;
it still returns at most `n` bytes and never waits when bytes are buffered.
The buffer holds at most one refill, so a connection costs at most
`READ_AHEAD` more memory, and only while its reader is behind.
"""

from __future__ import annotations

from typing import Any

import trio
from libp2p.io.trio import TrioTCPStream

READ_AHEAD = 256 * 1024


def apply() -> None:
    if getattr(TrioTCPStream, "_gguf_swarm_read_buffer_patch", False):
        return
    upstream_read = TrioTCPStream.read

    async def read(self: TrioTCPStream, n: int | None = None) -> bytes:
        if n == 0:
            return b""
        lock = self.__dict__.get("_buffer_lock")
        if lock is None:
            lock = self.__dict__["_buffer_lock"] = trio.Lock()
        async with lock:  # two readers at once must not see bytes out of order
            buffered: bytearray | None = self.__dict__.get("_read_buffer")
            if not buffered:
                data = await upstream_read(self, max(n or 0, READ_AHEAD))
                if n is None or len(data) <= n:
                    return data
                self.__dict__["_read_buffer"] = buffered = bytearray(data)
            take = len(buffered) if n is None else min(n, len(buffered))
            out = bytes(buffered[:take])
            del buffered[:take]
            return out

    TrioTCPStream.read = read  # type: ignore[method-assign]
    TrioTCPStream._gguf_swarm_read_buffer_patch = True  # type: ignore[attr-defined]


def buffered_bytes(stream: Any) -> int:
    """Bytes read from the socket but not yet taken (tests)."""
    return len(stream.__dict__.get("_read_buffer") or b"")
