"""Messages of the gguf-swarm wire protocol, `/gguf-swarm/1.0.0`.

Goals: be paranoid about data integrity and about the peer. Every incoming
control frame is a small msgpack map whose every field is checked here before
anything else sees it; bytes of a fragment or manifest follow a `Data` frame raw
and are verified by the receiver against the CID it asked for. The sender is
never trusted.

One request per stream:

    client                              server
    ManifestRequest(model)     ->       Data(size) + manifest bytes | Error
    ManifestRequest(model, off, len) -> Data(size, total) + those bytes | Error
    HaveRequest(model)         ->       Have(count, bitfield)      | Error
    FetchingRequest(model)     ->       Have(count, bitfield of fragments being fetched) | Error

FetchingRequest and ranged ManifestRequests are newer than the rest: a node
that predates them answers BAD_REQUEST and resets the stream, so ask them last
on a stream (or on a stream of their own). A ranged answer's `total` is the
manifest's size, so a puller learns it from its first range.
    FragmentRequest(cid, off, len) ->   Data(size) + bytes         | Error
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from .cid import InvalidCID, digest_of_cid

PROTOCOL_ID = "/gguf-swarm/1.0.0"
MAX_FRAGMENT_BYTES = 1 << 30  # no single body beyond 1 GiB, whatever a peer says


class ErrorCode(enum.IntEnum):
    NOT_FOUND = 1
    BAD_REQUEST = 2
    BUSY = 3
    INTERNAL = 4


class ProtocolError(Exception):
    """The remote peer broke the protocol (malformed or unexpected frame)."""


@dataclass(frozen=True)
class ManifestRequest:
    model_cid: str
    offset: int = 0
    length: int | None = None  # None with offset 0: the whole manifest, as older nodes ask

    @property
    def ranged(self) -> bool:
        return self.offset != 0 or self.length is not None


@dataclass(frozen=True)
class HaveRequest:
    model_cid: str


@dataclass(frozen=True)
class FetchingRequest:
    """Which fragments of a model the node is fetching now: copies on their way
    (adopters count them, so two do not both restore the same fragment)."""

    model_cid: str


@dataclass(frozen=True)
class FragmentRequest:
    cid: str
    offset: int = 0
    length: int | None = None  # None: to the end


@dataclass(frozen=True)
class Have:
    count: int  # number of fragments in the manifest
    bitfield: bytes  # bit i (MSB first) set when fragment i (manifest order) is held


@dataclass(frozen=True)
class Data:
    size: int  # raw bytes that follow this frame
    total: int | None = None  # a manifest range's: the whole manifest's size


@dataclass(frozen=True)
class Error:
    code: ErrorCode
    message: str


Request = ManifestRequest | HaveRequest | FetchingRequest | FragmentRequest
Response = Have | Data | Error
Message = Request | Response


def to_wire(msg: Message) -> dict[str, Any]:
    if isinstance(msg, ManifestRequest):
        m: dict[str, Any] = {"t": "manifest", "model": msg.model_cid}
        if msg.ranged:  # only then: a whole-manifest request stays what older nodes accept
            m["offset"] = msg.offset
            if msg.length is not None:
                m["length"] = msg.length
        return m
    if isinstance(msg, HaveRequest):
        return {"t": "have?", "model": msg.model_cid}
    if isinstance(msg, FetchingRequest):
        return {"t": "fetching?", "model": msg.model_cid}
    if isinstance(msg, FragmentRequest):
        d: dict[str, Any] = {"t": "get", "cid": msg.cid, "offset": msg.offset}
        if msg.length is not None:
            d["length"] = msg.length
        return d
    if isinstance(msg, Have):
        return {"t": "have", "count": msg.count, "bits": msg.bitfield}
    if isinstance(msg, Data):
        return (
            {"t": "data", "size": msg.size}
            if msg.total is None
            else {"t": "data", "size": msg.size, "total": msg.total}
        )
    if isinstance(msg, Error):
        return {"t": "error", "code": int(msg.code), "message": msg.message}
    raise TypeError(f"not a protocol message: {msg!r}")


def _field(d: dict[Any, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in d:
        raise ProtocolError(f"missing field {name!r}")
    value = d[name]
    # bool is an int in Python; never accept it where a number is expected.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(f"field {name!r} has the wrong type")
    return value


def _cid(d: dict[Any, Any], name: str) -> str:
    value = _field(d, name, str)
    try:
        digest_of_cid(value)
    except InvalidCID:
        raise ProtocolError(f"field {name!r} is not a CIDv1 raw sha2-256") from None
    return value


def _count(d: dict[Any, Any], name: str, limit: int) -> int:
    value = _field(d, name, int)
    if not 0 <= value <= limit:
        raise ProtocolError(f"field {name!r} out of range")
    return value


_KNOWN_FIELDS = {
    "manifest": {"t", "model", "offset", "length"},
    "have?": {"t", "model"},
    "fetching?": {"t", "model"},
    "get": {"t", "cid", "offset", "length"},
    "have": {"t", "count", "bits"},
    "data": {"t", "size", "total"},
    "error": {"t", "code", "message"},
}


def from_wire(d: Any) -> Message:
    """Validate a decoded msgpack object field by field; raise ProtocolError."""
    if not isinstance(d, dict):
        raise ProtocolError("frame is not a map")
    kind = d.get("t")
    if not isinstance(kind, str) or kind not in _KNOWN_FIELDS:
        raise ProtocolError(f"unknown message type {kind!r}"[:120])
    if not set(d) <= _KNOWN_FIELDS[kind]:
        raise ProtocolError(f"unexpected fields in {kind!r}")
    if kind == "manifest":
        length = _count(d, "length", MAX_FRAGMENT_BYTES) if "length" in d else None
        offset = _count(d, "offset", MAX_FRAGMENT_BYTES) if "offset" in d else 0
        return ManifestRequest(_cid(d, "model"), offset, length)
    if kind == "have?":
        return HaveRequest(_cid(d, "model"))
    if kind == "fetching?":
        return FetchingRequest(_cid(d, "model"))
    if kind == "get":
        length = _count(d, "length", MAX_FRAGMENT_BYTES) if "length" in d else None
        return FragmentRequest(_cid(d, "cid"), _count(d, "offset", MAX_FRAGMENT_BYTES), length)
    if kind == "have":
        count = _count(d, "count", 1 << 24)
        bits = _field(d, "bits", bytes)
        validate_bitfield(bits, count)
        return Have(count, bits)
    if kind == "data":
        size = _count(d, "size", MAX_FRAGMENT_BYTES)
        total = _count(d, "total", MAX_FRAGMENT_BYTES) if "total" in d else None
        if total is not None and total < size:
            raise ProtocolError("data total smaller than its size")
        return Data(size, total)
    code = _field(d, "code", int)
    message = _field(d, "message", str)[:500]
    try:
        return Error(ErrorCode(code), message)
    except ValueError:
        return Error(ErrorCode.INTERNAL, f"unknown error code {code}: {message}")


# ---- bitfields (BitTorrent layout: bit 7 of byte 0 is item 0) ----------------


def encode_bitfield(have: list[bool]) -> bytes:
    out = bytearray((len(have) + 7) // 8)
    for i, h in enumerate(have):
        if h:
            out[i >> 3] |= 0x80 >> (i & 7)
    return bytes(out)


def decode_bitfield(bits: bytes, count: int) -> list[bool]:
    validate_bitfield(bits, count)
    return [bool(bits[i >> 3] & (0x80 >> (i & 7))) for i in range(count)]


def validate_bitfield(bits: bytes, count: int) -> None:
    if len(bits) != (count + 7) // 8:
        raise ProtocolError("bitfield length does not match the count")
    spare = len(bits) * 8 - count
    if spare and bits[-1] & ((1 << spare) - 1):
        raise ProtocolError("bitfield has spare bits set")
