"""Signed name records: `PEER_ID/NAME` -> model CID, IPNS-style. Pure: no sockets, no clock.

Everything that decides whether a name record is believed lives in this file:
its bytes, its signature, its DHT key, its expiry and which of two records
wins. `node/names.py` moves the bytes through the DHT and passes the time in.

Goals: a name resolves only to a CID its publisher signed; an old record never
replaces a newer one (at a resolver or at a node storing it); one record has
exactly one encoding. Non-goals: global names (a name is scoped by its
publisher's peer id; short local aliases live in the user's alias file), key
types other than Ed25519 (every gguf-swarm identity is Ed25519, and its peer
id inlines the public key, so a record is checked against the peer id alone).

A record is a msgpack map, keys in this order, nothing else:

    v        1
    name     the name (validate_name)
    value    the model CID (CIDv1 raw sha2-256)
    seq      sequence number, 0 .. 2**63-1; a publisher's next record for the
             same name has a higher one when the value changes
    expires  Unix seconds after which the record is invalid (validity)
    key      the publisher's public key, libp2p protobuf form (08 01 12 20 + 32 bytes)
    sig      Ed25519 signature of SIGNING_PREFIX + msgpack [v, name, value, seq, expires, key]

It is stored under DHT key `/gguf-swarm-name/` + base32 of the first 20 bytes
of sha256(peer id bytes + UTF-8 name), 49 bytes in all (py-libp2p 0.8.1 nodes
refuse FIND_NODE for longer keys that are not multihashes, which would stop
lookups at the first hop). The key commits to the publisher: a record signed
by anyone else fails `check_record` for that key (forging one would take a
second preimage of 160 bits). Of several valid records the highest
(seq, expires, signature) wins; identical records tie, and the later
candidate wins the tie (a store then accepts a republished copy of what it
holds, which refreshes its timestamps).
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from .cid import is_cid

VERSION = 1
NAMESPACE = "gguf-swarm-name"
KEY_PREFIX = f"/{NAMESPACE}/"
KEY_DIGEST_BYTES = 20  # of the SHA-256: 32 base32 characters
SIGNING_PREFIX = b"gguf-swarm-name-record:"
MAX_NAME = 128
MAX_RECORD_BYTES = 1024  # an honest record is ~330 bytes
MAX_SEQ = 2**63 - 1
_FIELDS = ("v", "name", "value", "seq", "expires", "key", "sig")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]*")
_ED25519_KEY_PREFIX = bytes([0x08, 0x01, 0x12, 0x20])  # protobuf PublicKey{Type: Ed25519, Data: 32 bytes}
_IDENTITY_MULTIHASH = bytes([0x00, 0x24])  # identity hash, 36 bytes: the key inlined in the peer id
_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


class InvalidName(ValueError):
    """We (the user) gave a name or peer id that cannot be one."""


class InvalidRecord(Exception):
    """A record from the network is malformed, forged, expired or for another key."""


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not name:
        raise InvalidName("a name cannot be empty")
    if len(name) > MAX_NAME:
        raise InvalidName(f"a name is at most {MAX_NAME} characters, this one has {len(name)}")
    if not _NAME.fullmatch(name):
        raise InvalidName(
            f"not a valid name: {name[:140]!r} (letters, digits and . _ : + -, starting with a letter or digit)"
        )
    return name


# ---- peer ids (Ed25519 only) -------------------------------------------------------


def peer_id_of_key(public_key: bytes) -> bytes:
    """The peer id (multihash bytes) of a libp2p-serialized Ed25519 public key."""
    if len(public_key) != 36 or not public_key.startswith(_ED25519_KEY_PREFIX):
        raise InvalidRecord("not an Ed25519 public key")
    return _IDENTITY_MULTIHASH + public_key


def key_of_peer_id(peer_id: bytes) -> bytes:
    """The public key inlined in an Ed25519 peer id."""
    if len(peer_id) != 38 or not peer_id.startswith(_IDENTITY_MULTIHASH + _ED25519_KEY_PREFIX):
        raise InvalidName("not an Ed25519 peer id (12D3KooW...)")
    return peer_id[2:]


def peer_id_text(peer_id: bytes) -> str:
    n = int.from_bytes(peer_id, "big")
    out = ""
    while n:
        n, r = divmod(n, 58)
        out = _B58[r] + out
    return "1" * (len(peer_id) - len(peer_id.lstrip(b"\0"))) + out


def parse_peer_id(text: str) -> bytes:
    """Peer id bytes from its base58 text; raises InvalidName for anything but an Ed25519 peer id."""
    if not text or len(text) > 64 or any(c not in _B58 for c in text):
        raise InvalidName(f"not a peer id: {text[:80]!r}")
    n = 0
    for c in text:
        n = n * 58 + _B58.index(c)
    zeros = len(text) - len(text.lstrip("1"))
    raw = b"\0" * zeros + (n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b"")
    key_of_peer_id(raw)
    return raw


def parse_target(text: str) -> tuple[str, str]:
    """`PUBLISHER/NAME` -> (publisher: a peer id or an alias, name); the name is validated."""
    publisher, sep, name = text.partition("/")
    if not sep or not publisher:
        raise InvalidName(f"not PEER_ID/NAME: {text[:140]!r}")
    return publisher, validate_name(name)


def dht_key(peer_id: bytes, name: str) -> str:
    """49 bytes: py-libp2p 0.8.1 answers FIND_NODE only for a multihash or a key of at most 50 bytes."""
    digest = hashlib.sha256(peer_id + validate_name(name).encode()).digest()[:KEY_DIGEST_BYTES]
    return KEY_PREFIX + base64.b32encode(digest).decode("ascii").lower()


# ---- records --------------------------------------------------------------------


@dataclass(frozen=True)
class NameRecord:
    name: str
    value: str  # model CID
    seq: int
    expires: int  # Unix seconds
    public_key: bytes  # libp2p-serialized Ed25519 key
    signature: bytes

    @property
    def peer_id(self) -> bytes:
        return peer_id_of_key(self.public_key)

    @property
    def rank(self) -> tuple[int, int, bytes]:
        """Higher wins: sequence, then expiry, then the signature's bytes (two
        different records with one seq and expiry, which only their publisher
        can sign, must still rank the same on every node)."""
        return (self.seq, self.expires, self.signature)


def _signing_bytes(name: str, value: str, seq: int, expires: int, public_key: bytes) -> bytes:
    body = msgpack.packb([VERSION, name, value, seq, expires, public_key], use_bin_type=True)
    return SIGNING_PREFIX + body


def sign_record(
    name: str, value: str, seq: int, expires: int, public_key: bytes, sign: Callable[[bytes], bytes]
) -> NameRecord:
    """A record signed with `sign` (the private half of `public_key`)."""
    validate_name(name)
    if not is_cid(value):
        raise ValueError(f"not a model CID: {value!r}")
    if not 0 <= seq <= MAX_SEQ or not 0 <= expires <= MAX_SEQ:
        raise ValueError("seq and expires must be 0 .. 2**63-1")
    peer_id_of_key(public_key)
    signature = sign(_signing_bytes(name, value, seq, expires, public_key))
    return NameRecord(name, value, seq, expires, public_key, signature)


def encode_record(record: NameRecord) -> bytes:
    fields: dict[str, Any] = {
        "v": VERSION,
        "name": record.name,
        "value": record.value,
        "seq": record.seq,
        "expires": record.expires,
        "key": record.public_key,
        "sig": record.signature,
    }
    return msgpack.packb(fields, use_bin_type=True)


def decode_record(data: bytes) -> NameRecord:
    """Parse (not verify) a record; raise InvalidRecord unless it is well formed and canonical."""
    if not isinstance(data, bytes | bytearray) or len(data) > MAX_RECORD_BYTES:
        raise InvalidRecord("record missing or too large")
    try:
        d = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True, max_map_len=len(_FIELDS))
    except Exception:
        raise InvalidRecord("record is not msgpack") from None
    if not isinstance(d, dict) or tuple(d) != _FIELDS:
        raise InvalidRecord("record fields are not v, name, value, seq, expires, key, sig")
    if d["v"] != VERSION or isinstance(d["v"], bool):
        raise InvalidRecord(f"unknown record version {d['v']!r}"[:80])
    for name, kind in (("name", str), ("value", str), ("seq", int), ("expires", int), ("key", bytes), ("sig", bytes)):
        if not isinstance(d[name], kind) or isinstance(d[name], bool):
            raise InvalidRecord(f"record field {name!r} has the wrong type")
    try:
        validate_name(d["name"])
    except InvalidName as e:
        raise InvalidRecord(str(e)) from None
    if not is_cid(d["value"]):
        raise InvalidRecord("record value is not a model CID")
    if not 0 <= d["seq"] <= MAX_SEQ or not 0 <= d["expires"] <= MAX_SEQ:
        raise InvalidRecord("record seq or expires out of range")
    if len(d["sig"]) != 64:
        raise InvalidRecord("record signature is not 64 bytes")
    record = NameRecord(d["name"], d["value"], d["seq"], d["expires"], d["key"], d["sig"])
    record.peer_id  # noqa: B018  (raises InvalidRecord for a key that is not Ed25519)
    if encode_record(record) != bytes(data):
        raise InvalidRecord("record is not in canonical form")
    return record


def verify_record(record: NameRecord, peer_id: bytes, name: str, now: float) -> None:
    """Raise InvalidRecord unless `record` is `peer_id`'s signed, unexpired record for `name`."""
    if record.peer_id != peer_id:
        raise InvalidRecord("record is signed by another peer")
    if record.name != name:
        raise InvalidRecord("record is for another name")
    if record.expires <= now:
        raise InvalidRecord("record has expired")
    signed = _signing_bytes(record.name, record.value, record.seq, record.expires, record.public_key)
    try:
        VerifyKey(record.public_key[4:]).verify(signed, record.signature)
    except (BadSignatureError, ValueError, TypeError):
        raise InvalidRecord("bad signature") from None


def check_record(data: bytes, key: str, now: float) -> NameRecord:
    """A record as found under DHT `key`: decoded, for that key, signed by its publisher, unexpired."""
    record = decode_record(data)
    if dht_key(record.peer_id, record.name) != key:
        raise InvalidRecord("record does not belong under this key")
    verify_record(record, record.peer_id, record.name, now)
    return record


def select_record(key: str, values: Sequence[bytes], now: float) -> int | None:
    """Index of the best valid record among `values` (highest seq, then latest
    expiry; a tie goes to the later one), None when none is valid."""
    best: tuple[tuple[int, int, bytes], int] | None = None
    for i, value in enumerate(values):
        try:
            record = check_record(value, key, now)
        except InvalidRecord:
            continue
        if best is None or record.rank >= best[0]:
            best = (record.rank, i)
    return None if best is None else best[1]
