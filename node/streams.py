"""Reading protocol messages and raw bodies from a libp2p stream.

`stream.read(n)` returns whatever is buffered (up to n) and raises StreamEOF at
the end instead of returning b"": these helpers loop for exact counts.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import trio
from libp2p.abc import INetStream
from libp2p.network.stream.exceptions import StreamError
from libp2p.stream_muxer.exceptions import MuxedStreamError

from protocol import FrameDecoder, Message, ProtocolError, encode_frame
from protocol.exchange import Hello, decode_exchange_body

_READ = 256 * 1024


class StreamClosed(Exception):
    pass


async def _read_some(stream: INetStream, n: int, stall_timeout: float) -> bytes:
    try:
        if stall_timeout == math.inf:  # a swarm's reader: a cancel scope per read would only cost
            data = await stream.read(n)
        else:
            with trio.fail_after(stall_timeout):
                data = await stream.read(n)
    except (StreamError, MuxedStreamError, EOFError) as e:
        raise StreamClosed(type(e).__name__) from None
    if not data:
        raise StreamClosed("stream ended")
    return data


async def read_message(stream: INetStream, decoder: FrameDecoder, stall_timeout: float = math.inf) -> Message:
    """The next message; TooSlowError if no byte arrives for stall_timeout seconds."""
    while True:
        msg = decoder.next_message()
        if msg is not None:
            return msg
        decoder.receive_data(await _read_some(stream, _READ, stall_timeout))


async def read_body(stream: INetStream, decoder: FrameDecoder, size: int, stall_timeout: float = math.inf) -> bytearray:
    """Exactly `size` raw bytes; anything after them stays in the decoder."""
    body = bytearray(decoder.take_raw(size))
    while len(body) < size:
        body += await _read_some(stream, min(_READ, size - len(body)), stall_timeout)
    return body


async def stream_body(
    stream: INetStream,
    decoder: FrameDecoder,
    size: int,
    sink: Callable[[bytes], object],
    stall_timeout: float = math.inf,
) -> None:
    """Exactly `size` raw bytes, handed to `sink` as they arrive: a large body
    never sits whole in memory."""
    first = decoder.take_raw(size)
    left = size - len(first)
    if first:
        sink(first)
    while left:
        data = await _read_some(stream, min(_READ, left), stall_timeout)
        sink(data)
        left -= len(data)


async def send_message(stream: INetStream, msg: Message) -> None:
    await stream.write(encode_frame(msg))


async def read_hello(stream: INetStream, limit: int = 64 * 1024) -> tuple[bytes, Hello]:
    """The first frame of an exchange session, which must be a Hello; returns
    the bytes read so far (the session replays them) and the Hello."""
    buf = bytearray()
    while True:
        if len(buf) >= 4:
            size = int.from_bytes(buf[:4], "big")
            if size > limit:
                raise ProtocolError("first frame too large")
            if len(buf) >= 4 + size:
                hello = decode_exchange_body(bytes(buf[4 : 4 + size]))
                if not isinstance(hello, Hello):
                    raise ProtocolError("a session must open with Hello")
                return bytes(buf), hello
        buf += await _read_some(stream, 64 * 1024, math.inf)
