"""Reads from a Noise session without the copies.

Flaw (py-libp2p 0.8.1): `SecureSession.read(n)` keeps what is left of a
decrypted Noise message in an `io.BytesIO`, and a read copies it out through
a memoryview, then into a bytearray, then into bytes; keeping the rest of a
message after a Yamux frame header copied that rest once more.
`read_exactly`, with which Yamux reads every frame header and body, copied
the result twice again. A 64 KiB DATA frame was copied about five times on
its way from the decrypted message to the stream's buffer.

Fix: the rest of the current message is kept as bytes and an offset. A read
the message can satisfy is one slice, or the message itself when the read
takes all of it; reads that span messages join their parts once. Yamux's
`read_exactly` returns a read that came back complete as it is. The
semantics are upstream's: `read(n)` returns n bytes, or what arrived before
the connection closed; `read()` what is buffered, else the next message.
"""

from __future__ import annotations

from typing import Any

from libp2p.io.exceptions import ConnectionClosedError
from libp2p.io.utils import DEFAULT_RETRY_READ_COUNT
from libp2p.io.utils import read_exactly as upstream_read_exactly
from libp2p.security.secure_session import SecureSession
from libp2p.stream_muxer.yamux import yamux as yamux_module


def _take(session: Any, limit: int | None) -> bytes:
    """Up to `limit` bytes (all when None) of the current message's rest."""
    message: bytes = session._rest
    start: int = session._rest_at
    end = len(message) if limit is None else min(len(message), start + limit)
    if end == len(message):
        session._rest, session._rest_at = b"", 0
        return message if start == 0 else message[start:]
    session._rest_at = end
    return message[start:end]


async def read(self: Any, n: int | None = None) -> bytes:
    if n == 0:
        return b""
    if n is None:
        if self._rest_at < len(self._rest):
            return _take(self, None)
        message = await self.conn.read_msg()
        if message == b"":  # the underlying connection closed
            raise ConnectionClosedError("Connection closed")
        return message
    parts: list[bytes] = []
    got = 0
    while got < n:
        if self._rest_at >= len(self._rest):
            message = await self.conn.read_msg()
            if message == b"":
                if parts:
                    return b"".join(parts)  # what came before the close, as upstream does
                raise ConnectionClosedError("Connection closed")
            self._rest, self._rest_at = bytes(message), 0
        part = _take(self, n - got)
        parts.append(part)
        got += len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


async def read_exactly(reader: Any, n: int, retry_count: int = DEFAULT_RETRY_READ_COUNT) -> bytes:
    data = await reader.read(n)
    if len(data) == n:
        return data if type(data) is bytes else bytes(data)
    # Short: the session closed mid-frame, and reading on raises as upstream does.
    return bytes(data) + await upstream_read_exactly(reader, n - len(data), retry_count)


def apply() -> None:
    if getattr(SecureSession, "_gguf_swarm_reads_patch", False):
        return
    SecureSession._rest = b""  # type: ignore[attr-defined]  # the current message's unread rest...
    SecureSession._rest_at = 0  # type: ignore[attr-defined]  # ...from this offset
    SecureSession.read = read  # type: ignore[method-assign]
    yamux_module.read_exactly = read_exactly  # type: ignore[attr-defined]
    SecureSession._gguf_swarm_reads_patch = True  # type: ignore[attr-defined]
