"""Asking one peer for one thing: a request on a fresh stream, the answer checked."""

from __future__ import annotations

from libp2p.abc import IHost, INetStream
from libp2p.peer.id import ID

from protocol import PROTOCOL_ID, Data, Error, ErrorCode, FrameDecoder, Have, HaveRequest, ProtocolError, Request

from .streams import read_body, read_message, send_message


class RemoteError(Exception):
    """The peer answered with an error frame."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code


async def _open(host: IHost, peer: ID, request: Request) -> INetStream:
    stream = await host.new_stream(peer, [PROTOCOL_ID])
    await send_message(stream, request)
    return stream


async def request_body(host: IHost, peer: ID, request: Request, max_size: int) -> bytes:
    """Send `request`; return the raw body of the Data answer (at most max_size bytes)."""
    stream = await _open(host, peer, request)
    try:
        decoder = FrameDecoder()
        answer = await read_message(stream, decoder)
        if isinstance(answer, Error):
            raise RemoteError(answer.code, answer.message)
        if not isinstance(answer, Data):
            raise ProtocolError(f"expected data, got {type(answer).__name__}")
        if answer.size > max_size:
            raise ProtocolError(f"peer announced {answer.size} bytes, expected at most {max_size}")
        body = await read_body(stream, decoder, answer.size)
        return bytes(body)
    finally:
        await _close_quietly(stream)


async def request_have(host: IHost, peer: ID, request: HaveRequest) -> Have:
    stream = await _open(host, peer, request)
    try:
        answer = await read_message(stream, FrameDecoder())
        if isinstance(answer, Error):
            raise RemoteError(answer.code, answer.message)
        if not isinstance(answer, Have):
            raise ProtocolError(f"expected have, got {type(answer).__name__}")
        return answer
    finally:
        await _close_quietly(stream)


async def _close_quietly(stream: INetStream) -> None:
    try:
        await stream.close()
    except Exception:
        pass
