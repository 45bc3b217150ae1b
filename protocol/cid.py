"""Content identifiers: CIDv1, raw codec (0x55), sha2-256 multihash, base32.

This is the form every libp2p implementation's Kademlia DHT turns into the
same multihash key, so go-libp2p and js-libp2p peers can look our keys up.
"""

from __future__ import annotations

import base64
import hashlib

_PREFIX = bytes([0x01, 0x55, 0x12, 0x20])  # CIDv1, raw, sha2-256, 32-byte digest


class InvalidCID(ValueError):
    pass


def cid_from_digest(digest: bytes) -> str:
    if len(digest) != 32:
        raise ValueError("sha2-256 digest must be 32 bytes")
    return "b" + base64.b32encode(_PREFIX + digest).decode("ascii").lower().rstrip("=")


def cid_from_hex(sha256_hex: str) -> str:
    return cid_from_digest(bytes.fromhex(sha256_hex))


def cid_of(data: bytes) -> str:
    return cid_from_digest(hashlib.sha256(data).digest())


def digest_of_cid(cid: str) -> bytes:
    """The sha2-256 digest named by `cid`; raises InvalidCID for anything else."""
    if not isinstance(cid, str) or not cid.startswith("b") or len(cid) != 59:
        raise InvalidCID(f"not a CIDv1 raw sha2-256 base32 string: {cid!r}")
    body = cid[1:].upper()
    try:
        raw = base64.b32decode(body + "=" * (-len(body) % 8))
    except (ValueError, base64.binascii.Error):
        raise InvalidCID(f"not valid base32: {cid!r}") from None
    if raw[:4] != _PREFIX or len(raw) != 36:
        raise InvalidCID(f"not a CIDv1 raw sha2-256 CID: {cid!r}")
    return raw[4:]


def is_cid(text: str) -> bool:
    try:
        digest_of_cid(text)
    except InvalidCID:
        return False
    return True
