"""Reads from a Noise session (node/libp2p_patches/reads.py): upstream's
semantics, without its copies. The session reads from a scripted stand-in for
the Noise connection: this is the buffering logic alone."""

from __future__ import annotations

import pytest
from libp2p.io.exceptions import ConnectionClosedError
from libp2p.security.secure_session import SecureSession
from libp2p.stream_muxer.yamux import yamux as yamux_module

from node.libp2p_patches import apply_all


class Messages:
    """Decrypted Noise messages, one per read_msg(); b"" once they run out (closed)."""

    def __init__(self, *messages: bytes) -> None:
        self.messages = list(messages)
        self.reads = 0

    async def read_msg(self) -> bytes:
        self.reads += 1
        return self.messages.pop(0) if self.messages else b""


def session(*messages: bytes) -> SecureSession:
    apply_all()
    s = SecureSession.__new__(SecureSession)  # no handshake: only the read path is under test
    s.conn = Messages(*messages)  # type: ignore[assignment]
    return s


async def test_a_frame_header_and_body_come_out_of_one_message() -> None:
    frame = b"H" * 12 + b"b" * 65_000
    s = session(frame, b"next")
    assert await s.read(12) == b"H" * 12
    assert await s.read(65_000) == b"b" * 65_000
    assert await s.read(4) == b"next"
    assert s.conn.reads == 2  # type: ignore[attr-defined]


async def test_a_read_that_takes_a_whole_message_is_that_message_uncopied() -> None:
    message = bytes(range(256)) * 256
    s = session(message)
    assert await s.read(len(message)) is message


async def test_reads_span_messages_and_keep_the_rest() -> None:
    s = session(b"abc", b"defgh", b"ij")
    assert await s.read(4) == b"abcd"
    assert await s.read(2) == b"ef"
    assert await s.read() == b"gh"  # no size: what is buffered...
    assert await s.read() == b"ij"  # ...else the next message whole


async def test_a_close_mid_read_returns_what_came_and_then_raises() -> None:
    s = session(b"abc")
    assert await s.read(10) == b"abc"
    with pytest.raises(ConnectionClosedError):
        await s.read(1)
    with pytest.raises(ConnectionClosedError):
        await s.read()


async def test_yamux_read_exactly_takes_a_frame_whole_and_a_cut_one_ends_the_session() -> None:
    s = session(b"H" * 12 + b"body", b"more")
    assert await yamux_module.read_exactly(s, 12) == b"H" * 12
    assert await yamux_module.read_exactly(s, 8) == b"bodymore"  # across messages
    s = session(b"head")
    with pytest.raises(ConnectionClosedError):  # as upstream: the session closed mid-frame
        await yamux_module.read_exactly(s, 12)
