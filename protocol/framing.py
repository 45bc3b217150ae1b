"""Frames: a 4-byte big-endian length, then a msgpack map of at most 64 KiB.

`FrameDecoder` is a pure object: feed it bytes (`receive_data`), take messages
out (`next_message`, None while it needs more). Bytes that arrive after a
frame (the raw body of a `Data` frame) are taken with `take_raw`; whatever
follows the body (the next answer on a pipelined stream) stays buffered.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from .messages import Message, ProtocolError, from_wire, to_wire

MAX_FRAME = 64 * 1024
_LEN = struct.Struct(">I")


def encode_frame(msg: Message) -> bytes:
    body = msgpack.packb(to_wire(msg), use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise ValueError(f"frame of {len(body)} bytes exceeds the {MAX_FRAME}-byte cap")
    return _LEN.pack(len(body)) + body


def unpack_body(body: bytes) -> Any:
    """The msgpack object in one frame's body (v1 and v2 frames alike); ProtocolError for garbage."""
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises many kinds for garbage
        raise ProtocolError(f"frame is not valid msgpack ({type(e).__name__})") from None


def decode_body(body: bytes) -> Message:
    return from_wire(unpack_body(body))


class FrameDecoder:
    def __init__(self) -> None:
        self._buf = bytearray()

    def receive_data(self, data: bytes) -> None:
        self._buf += data

    def next_message(self) -> Message | None:
        if len(self._buf) < 4:
            return None
        (n,) = _LEN.unpack_from(self._buf)
        if n > MAX_FRAME:
            raise ProtocolError(f"frame of {n} bytes exceeds the {MAX_FRAME}-byte cap")
        if len(self._buf) < 4 + n:
            return None
        body = bytes(self._buf[4 : 4 + n])
        del self._buf[: 4 + n]
        return decode_body(body)

    def take_raw(self, limit: int) -> bytes:
        """Up to `limit` buffered bytes that are not frames (a body being received)."""
        data = bytes(self._buf[:limit])
        del self._buf[:limit]
        return data
