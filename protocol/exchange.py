"""Messages of wire protocol v2, `/gguf-swarm/2.0.0`: one long-lived stream per peer pair.

Goals: be paranoid about the peer. Every control frame is a small msgpack map
(4-byte big-endian length, at most `MAX_FRAME` bytes) whose every field is
checked here, type and bounds, before anything else sees it; unknown types and
unknown fields are refused. The raw bytes of a block follow a `chunk` frame
(at most `MAX_CHUNK` of them) and are checked by the node against the block's
digest. Non-goal: state. Which message is allowed when lives in
`protocol/session.py`; this module only knows what a well-formed frame is.

    hello      {model, blocks}          first frame in each direction
    bitfield   {first, bits}            blocks first.. (MSB first), first % 8 == 0
    have       {blocks: [int]}          a few more blocks held
    interested / not_interested / choke / unchoke   {}
    request / cancel / reject   {block}
    chunk      {block, offset, size}    then `size` raw bytes
    hashes?    {file}                   ask for the block digests of one file
    hashes     {file, digests}          32 bytes per block, b"" if not held
    pex        {addrs: [str]}           multiaddrs of other peers
    lost       {file}                   no longer holds any block of this file (it went bad on disk)
    error      {code, message}          fatal goodbye
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import msgpack

from .framing import MAX_FRAME, unpack_body
from .messages import Error, ErrorCode, ProtocolError, _cid, _count, _field

EXCHANGE_PROTOCOL_ID = "/gguf-swarm/2.0.0"
MAX_CHUNK = 256 * 1024  # raw bytes after one chunk frame
MAX_HAVE_BATCH = 4096  # indices in one HaveBlocks
MAX_BITFIELD_BYTES = 32768  # bits bytes in one Bitfield frame
MAX_PEX = 50  # addresses in one PeerExchange
MAX_ADDR_CHARS = 300  # characters in one PeerExchange address
MAX_ERROR_CHARS = 500  # longer error messages are cut
MAX_BLOCKS = 1 << 24  # blocks (and files) of one model: 16 TiB of 1 MiB blocks
MAX_BLOCK_BYTES = 1 << 30  # no block (an unblocked file is one block) beyond 1 GiB

_LEN = struct.Struct(">I")


@dataclass(frozen=True)
class Hello:
    model_cid: str
    blocks: int  # layout.total_blocks


@dataclass(frozen=True)
class Bitfield:
    first: int  # a multiple of 8
    bits: bytes  # bit i (MSB first) set when block first + i is held


@dataclass(frozen=True)
class HaveBlocks:
    blocks: tuple[int, ...]


@dataclass(frozen=True)
class Interested:
    pass


@dataclass(frozen=True)
class NotInterested:
    pass


@dataclass(frozen=True)
class Choke:
    pass


@dataclass(frozen=True)
class Unchoke:
    pass


@dataclass(frozen=True)
class RequestBlock:
    block: int


@dataclass(frozen=True)
class CancelBlock:
    block: int


@dataclass(frozen=True)
class RejectBlock:
    block: int


@dataclass(frozen=True)
class PieceChunk:
    block: int
    offset: int  # within the block
    size: int  # raw bytes that follow this frame


@dataclass(frozen=True)
class HashesRequest:
    file: int


@dataclass(frozen=True)
class Hashes:
    file: int
    digests: bytes  # 32 bytes per block of the file; b"" means "not held"


@dataclass(frozen=True)
class PeerExchange:
    addrs: tuple[str, ...]


@dataclass(frozen=True)
class Lost:
    """The sender dropped every block of this file (it found it changed on disk):
    haves only grow otherwise, so without this a peer would keep asking for them."""

    file: int


ExchangeMessage = (
    Hello
    | Bitfield
    | HaveBlocks
    | Interested
    | NotInterested
    | Choke
    | Unchoke
    | RequestBlock
    | CancelBlock
    | RejectBlock
    | PieceChunk
    | HashesRequest
    | Hashes
    | PeerExchange
    | Lost
    | Error
)

_BARE: dict[type, str] = {Interested: "interested", NotInterested: "not_interested", Choke: "choke", Unchoke: "unchoke"}
_BLOCK_ONLY: dict[type, str] = {RequestBlock: "request", CancelBlock: "cancel", RejectBlock: "reject"}


def _to_wire(msg: ExchangeMessage) -> dict[str, Any]:
    if isinstance(msg, PieceChunk):
        return {"t": "chunk", "block": msg.block, "offset": msg.offset, "size": msg.size}
    if isinstance(msg, RequestBlock | CancelBlock | RejectBlock):
        return {"t": _BLOCK_ONLY[type(msg)], "block": msg.block}
    if isinstance(msg, Interested | NotInterested | Choke | Unchoke):
        return {"t": _BARE[type(msg)]}
    if isinstance(msg, Hello):
        return {"t": "hello", "model": msg.model_cid, "blocks": msg.blocks}
    if isinstance(msg, Bitfield):
        return {"t": "bitfield", "first": msg.first, "bits": msg.bits}
    if isinstance(msg, HaveBlocks):
        return {"t": "have", "blocks": list(msg.blocks)}
    if isinstance(msg, HashesRequest):
        return {"t": "hashes?", "file": msg.file}
    if isinstance(msg, Hashes):
        return {"t": "hashes", "file": msg.file, "digests": msg.digests}
    if isinstance(msg, PeerExchange):
        return {"t": "pex", "addrs": list(msg.addrs)}
    if isinstance(msg, Lost):
        return {"t": "lost", "file": msg.file}
    if isinstance(msg, Error):
        return {"t": "error", "code": int(msg.code), "message": msg.message}
    raise TypeError(f"not an exchange message: {msg!r}"[:200])


def encode_exchange(msg: ExchangeMessage) -> bytes:
    """One frame. Raises ValueError for a message the peer would refuse (we never send one)."""
    wire = _to_wire(msg)
    try:
        decode_exchange(wire)
    except ProtocolError as e:
        raise ValueError(f"invalid {type(msg).__name__}: {e}") from None
    body = msgpack.packb(wire, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise ValueError(f"frame of {len(body)} bytes exceeds the {MAX_FRAME}-byte cap")
    return _LEN.pack(len(body)) + body


def encode_chunk_header(block: int, offset: int, size: int) -> bytes:
    """The frame of PieceChunk(block, offset, size), unchecked (the session checked it)."""
    body = msgpack.packb({"t": "chunk", "block": block, "offset": offset, "size": size})
    return _LEN.pack(len(body)) + body


def decode_exchange_body(body: bytes) -> ExchangeMessage:
    """The message in the body of one frame (its length prefix stripped)."""
    return decode_exchange(unpack_body(body))


_KNOWN_FIELDS = {
    "hello": {"t", "model", "blocks"},
    "bitfield": {"t", "first", "bits"},
    "have": {"t", "blocks"},
    "interested": {"t"},
    "not_interested": {"t"},
    "choke": {"t"},
    "unchoke": {"t"},
    "request": {"t", "block"},
    "cancel": {"t", "block"},
    "reject": {"t", "block"},
    "chunk": {"t", "block", "offset", "size"},
    "hashes?": {"t", "file"},
    "hashes": {"t", "file", "digests"},
    "pex": {"t", "addrs"},
    "lost": {"t", "file"},
    "error": {"t", "code", "message"},
}
_BARE_BY_NAME = {name: kind() for kind, name in _BARE.items()}
_BLOCK_ONLY_BY_NAME = {name: kind for kind, name in _BLOCK_ONLY.items()}


def _index(d: dict[Any, Any], name: str) -> int:
    """A block or file index: 0 <= value < MAX_BLOCKS."""
    return _count(d, name, MAX_BLOCKS - 1)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def decode_exchange(obj: Any) -> ExchangeMessage:
    """Validate a decoded msgpack object field by field; raise ProtocolError."""
    if not isinstance(obj, dict):
        raise ProtocolError("frame is not a map")
    kind = obj.get("t")
    if not isinstance(kind, str) or kind not in _KNOWN_FIELDS:
        raise ProtocolError(f"unknown message type {kind!r}"[:120])
    if not obj.keys() <= _KNOWN_FIELDS[kind]:
        raise ProtocolError(f"unexpected fields in {kind!r}")
    if kind == "chunk":
        return PieceChunk(_index(obj, "block"), _count(obj, "offset", MAX_BLOCK_BYTES), _count(obj, "size", MAX_CHUNK))
    if kind in _BLOCK_ONLY_BY_NAME:
        return _BLOCK_ONLY_BY_NAME[kind](_index(obj, "block"))
    if kind in _BARE_BY_NAME:
        return _BARE_BY_NAME[kind]
    if kind == "hello":
        return Hello(_cid(obj, "model"), _count(obj, "blocks", MAX_BLOCKS))
    if kind == "bitfield":
        first = _index(obj, "first")
        if first % 8:
            raise ProtocolError("bitfield does not start on a byte boundary")
        bits = _field(obj, "bits", bytes)
        if len(bits) > MAX_BITFIELD_BYTES:
            raise ProtocolError("bitfield too long")
        return Bitfield(first, bits)
    if kind == "have":
        blocks = _field(obj, "blocks", (list, tuple))
        if len(blocks) > MAX_HAVE_BATCH:
            raise ProtocolError("too many blocks in one have")
        if not all(_is_int(b) and 0 <= b < MAX_BLOCKS for b in blocks):
            raise ProtocolError("have lists something other than a block index")
        return HaveBlocks(tuple(blocks))
    if kind == "hashes?":
        return HashesRequest(_index(obj, "file"))
    if kind == "hashes":
        file = _index(obj, "file")
        digests = _field(obj, "digests", bytes)
        if len(digests) % 32:
            raise ProtocolError("digests are not a whole number of 32-byte hashes")
        return Hashes(file, digests)
    if kind == "lost":
        return Lost(_index(obj, "file"))
    if kind == "pex":
        addrs = _field(obj, "addrs", (list, tuple))
        if len(addrs) > MAX_PEX:
            raise ProtocolError("too many addresses in one pex")
        if not all(isinstance(a, str) and len(a) <= MAX_ADDR_CHARS for a in addrs):
            raise ProtocolError("pex lists something other than an address")
        return PeerExchange(tuple(addrs))
    code = _field(obj, "code", int)
    message = _field(obj, "message", str)[:MAX_ERROR_CHARS]
    try:
        return Error(ErrorCode(code), message)
    except ValueError:
        return Error(ErrorCode.INTERNAL, f"unknown error code {code}: {message}"[:MAX_ERROR_CHARS])
