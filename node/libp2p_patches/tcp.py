"""TCP: reads served from a buffer filled by large socket reads.

Flaw (py-libp2p 0.8.1): `TrioTCPStream.read(n)` is one `recv(n)` per call,
and Noise asks for exactly 2 bytes (a message's length), then exactly its
body. Every 64 KiB Noise message costs two system calls and two trips
through trio's scheduler: a cProfile of a 253 MB pull counted 19,255
`recv` calls (2.0 s) on the puller. Fix: `read` takes what it can from a
per-stream buffer, refilled by one `receive_some` of up to `READ_AHEAD` bytes;
it still returns at most `n` bytes and never waits when bytes are buffered.
The buffer holds at most one refill, so a connection costs at most
`READ_AHEAD` more memory, and only while its reader is behind. It is the
bytes read and an offset, so a read is one slice.

Flaw 2: on a link slower than the machine, every TCP segment that arrives
wakes the reader for a few KiB (`strace` of a puller in an 8-puller swarm on
20/100 Mbit/s links: 960 `recv` a second of 6.9 KB on average, each a trip
through trio and the read loops). Fix: while Noise waits for the rest of a
message whose length it has read, the socket's `SO_RCVLOWAT` is that many
bytes, so the kernel wakes the reader once the message is all there. The
sender wrote the whole message at once, so the wait ends as soon as it has
arrived; a closed or reset connection wakes the reader whatever the mark.
Other reads (lengths, handshakes, protocol negotiation) wait for one byte,
as before. The mark is set only when it changes, so a stream of full Noise
messages costs about one `setsockopt` a message. Same swarm: 18 KB a `recv`,
and 12.8-13.3 CPU-s a puller against 14.2-15.6 (one run each).
"""

from __future__ import annotations

import socket
from typing import Any

from libp2p.io.trio import TrioTCPStream
from libp2p.io.utils import read_exactly
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.security.noise.io import NoisePacketReadWriter

from .locks import QuickLock

READ_AHEAD = 256 * 1024
# A smaller remainder is not worth a system call: it arrives in a segment or two.
LOW_WATER_MIN = 16 * 1024


def apply() -> None:
    if getattr(TrioTCPStream, "_gguf_swarm_read_buffer_patch", False):
        return
    upstream_read = TrioTCPStream.read

    async def read(self: TrioTCPStream, n: int | None = None) -> bytes:
        if n == 0:
            return b""
        d = self.__dict__
        lock = d.get("_buffer_lock")
        if lock is None:
            lock = d["_buffer_lock"] = QuickLock()
        async with lock:  # two readers at once must not see bytes out of order
            rest: bytes = d.get("_rest", b"")
            at: int = d.get("_rest_at", 0)
            if at >= len(rest):
                _set_low_water(self, n if n is not None and n >= LOW_WATER_MIN and d.get("_exact") else 1)
                data = await upstream_read(self, max(n or 0, READ_AHEAD))
                if n is None or len(data) <= n:
                    return data
                rest, at = data, 0
            # Kept as the bytes read and an offset: a read is one slice (a bytearray
            # buffer cost three copies of every byte: in, sliced out, made bytes).
            end = len(rest) if n is None else min(len(rest), at + n)
            out = rest[at:end]
            if end == len(rest):
                d["_rest"], d["_rest_at"] = b"", 0
            else:
                d["_rest"], d["_rest_at"] = rest, end
            return out

    async def read_msg(self: NoisePacketReadWriter) -> bytes:
        length = await self.next_msg_len()
        conn = self.read_write_closer
        tcp = conn.stream if isinstance(conn, RawConnection) else None
        exact = isinstance(tcp, TrioTCPStream) and length >= LOW_WATER_MIN
        if exact:
            tcp.__dict__["_exact"] = True  # every read below is for bytes already sent
        try:
            return await read_exactly(conn, length)
        finally:
            if exact:
                tcp.__dict__["_exact"] = False

    TrioTCPStream.read = read  # type: ignore[method-assign]
    TrioTCPStream._gguf_swarm_read_buffer_patch = True  # type: ignore[attr-defined]
    NoisePacketReadWriter.read_msg = read_msg  # type: ignore[method-assign]


def _set_low_water(stream: TrioTCPStream, mark: int) -> None:
    if stream.__dict__.get("_low_water", 1) == mark:
        return
    try:
        stream.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, mark)
    except (OSError, AttributeError):
        return  # a closed socket, or not a socket: reads wake on any byte
    stream.__dict__["_low_water"] = mark


def buffered_bytes(stream: Any) -> int:
    """Bytes read from the socket but not yet taken (tests)."""
    return len(stream.__dict__.get("_rest", b"")) - int(stream.__dict__.get("_rest_at", 0))
