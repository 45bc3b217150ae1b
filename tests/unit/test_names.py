"""Name records (protocol/names.py) and the publisher's files (node/names.py): no network."""

from __future__ import annotations

import base64
import hashlib
import os
import random
from pathlib import Path

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st
from libp2p.crypto.ed25519 import Ed25519PrivateKey
from libp2p.peer.id import ID
from nacl.signing import SigningKey

from node.host import NodeError
from node.names import NameValidator, add_alias, load_aliases, load_names, point_name, publisher_of
from protocol import cid_of
from protocol.names import (
    MAX_NAME,
    InvalidName,
    InvalidRecord,
    NameRecord,
    check_record,
    decode_record,
    dht_key,
    encode_record,
    parse_peer_id,
    parse_target,
    peer_id_of_key,
    peer_id_text,
    select_record,
    sign_record,
    validate_name,
    verify_record,
)

NOW = 1_800_000_000
CID_1, CID_2 = cid_of(b"model one"), cid_of(b"model two")
NAME = "gemma-3-270m:q4_k_m"
# sha256 of Alice's record (seq 7, expiring at NOW) for CID_1: pins the wire format.
GOLDEN_SHA256 = "63983c1f43629fcb97972577c4e40dc4c44ab3f0d84acf34604af33dc018bf19"


class Key:
    """An Ed25519 identity as our nodes have one (fixed seed: deterministic signatures)."""

    def __init__(self, seed: int) -> None:
        self.signing = SigningKey(bytes([seed]) * 32)
        self.public = bytes([0x08, 0x01, 0x12, 0x20]) + bytes(self.signing.verify_key)
        self.peer_id = peer_id_of_key(self.public)

    def sign(self, data: bytes) -> bytes:
        return self.signing.sign(data).signature

    def record(self, value: str = CID_1, seq: int = 0, expires: int = NOW + 3600, name: str = NAME) -> NameRecord:
        return sign_record(name, value, seq, expires, self.public, self.sign)

    def key(self, name: str = NAME) -> str:
        return dht_key(self.peer_id, name)


ALICE, MALLORY = Key(1), Key(2)


def test_a_signed_record_verifies() -> None:
    record = ALICE.record()
    assert check_record(encode_record(record), ALICE.key(), NOW) == record
    verify_record(record, ALICE.peer_id, NAME, NOW)


def test_peer_ids_match_libp2p() -> None:
    private = Ed25519PrivateKey.from_bytes(bytes([7]) * 32)
    public = private.get_public_key().serialize()
    libp2p_id = ID.from_pubkey(private.get_public_key())
    assert peer_id_of_key(public) == libp2p_id.to_bytes()
    assert peer_id_text(libp2p_id.to_bytes()) == libp2p_id.to_string()
    assert parse_peer_id(libp2p_id.to_string()) == libp2p_id.to_bytes()
    # Signed with libp2p's own key object, as the node does.
    record = sign_record(NAME, CID_1, 3, NOW + 60, public, private.sign)
    assert check_record(encode_record(record), dht_key(libp2p_id.to_bytes(), NAME), NOW).seq == 3


def test_a_forged_signature_is_rejected() -> None:
    record = ALICE.record()
    forged = NameRecord(record.name, CID_2, record.seq, record.expires, record.public_key, record.signature)
    with pytest.raises(InvalidRecord, match="bad signature"):
        check_record(encode_record(forged), ALICE.key(), NOW)
    flipped = bytes([record.signature[0] ^ 1]) + record.signature[1:]
    tampered = NameRecord(record.name, record.value, record.seq, record.expires, record.public_key, flipped)
    with pytest.raises(InvalidRecord, match="bad signature"):
        check_record(encode_record(tampered), ALICE.key(), NOW)


def test_a_record_signed_with_another_key_is_rejected() -> None:
    # Mallory's key inside, Mallory's signature: valid, but for Mallory's name, not Alice's.
    own = MALLORY.record(CID_2, seq=99)
    with pytest.raises(InvalidRecord, match="another peer"):
        verify_record(own, ALICE.peer_id, NAME, NOW)
    with pytest.raises(InvalidRecord, match="under this key"):
        check_record(encode_record(own), ALICE.key(), NOW)
    # Alice's key inside, Mallory's signature.
    claimed = sign_record(NAME, CID_2, 99, NOW + 60, ALICE.public, MALLORY.sign)
    with pytest.raises(InvalidRecord, match="bad signature"):
        check_record(encode_record(claimed), ALICE.key(), NOW)
    # Alice's own record, filed under another name's key.
    with pytest.raises(InvalidRecord, match="under this key"):
        check_record(encode_record(ALICE.record()), ALICE.key("other"), NOW)


def test_an_expired_record_is_rejected() -> None:
    record = ALICE.record(expires=NOW)
    with pytest.raises(InvalidRecord, match="expired"):
        check_record(encode_record(record), ALICE.key(), NOW)
    assert check_record(encode_record(record), ALICE.key(), NOW - 1) == record


def test_selection_takes_the_highest_valid_sequence() -> None:
    key = ALICE.key()
    values = [
        encode_record(ALICE.record(CID_1, seq=1)),
        encode_record(MALLORY.record(CID_2, seq=50)),  # another key
        encode_record(ALICE.record(CID_2, seq=9, expires=NOW - 1)),  # expired
        encode_record(ALICE.record(CID_2, seq=2)),
        b"\x93garbage",
        encode_record(ALICE.record(CID_1, seq=0, expires=NOW + 10**6)),  # older, however long it lives
    ]
    assert select_record(key, values, NOW) == 3
    assert select_record(key, values[4:5], NOW) is None
    # Same sequence: the later expiry wins (a republish).
    again = encode_record(ALICE.record(CID_2, seq=2, expires=NOW + 7200))
    assert select_record(key, [values[3], again], NOW) == 1
    assert select_record(key, [again, values[3]], NOW) == 0
    # Identical records: the later one (a store refreshes what it holds).
    assert select_record(key, [again, again], NOW) == 1


def test_a_lower_sequence_never_replaces_a_higher_one() -> None:
    """What a storing node does on PUT_VALUE: validate(new), then select([stored, new]) == 1 to replace."""
    validator = NameValidator(clock=lambda: NOW)
    key = ALICE.key()
    stored = encode_record(ALICE.record(CID_2, seq=5))
    older = encode_record(ALICE.record(CID_1, seq=4, expires=NOW + 10**6))
    validator.validate(key, older)  # valid on its own...
    assert validator.select(key, [stored, older]) == 0  # ...but the stored one stays
    newer = encode_record(ALICE.record(CID_1, seq=6))
    assert validator.select(key, [stored, newer]) == 1
    for bad in (encode_record(ALICE.record(expires=NOW - 5)), encode_record(MALLORY.record())):
        with pytest.raises(InvalidRecord):
            validator.validate(key, bad)
    # A stored record that has since expired gives way to any valid one.
    expired = encode_record(ALICE.record(CID_2, seq=9, expires=NOW - 1))
    assert validator.select(key, [expired, older]) == 1


def test_encoding_is_deterministic_and_pinned() -> None:
    record = ALICE.record(CID_1, seq=7, expires=NOW)
    data = encode_record(record)
    assert data == encode_record(ALICE.record(CID_1, seq=7, expires=NOW))
    assert decode_record(data) == record
    assert list(msgpack.unpackb(data)) == ["v", "name", "value", "seq", "expires", "key", "sig"]
    # Golden: Ed25519 signatures are deterministic, so the whole record is.
    assert len(data) == 226
    assert hashlib.sha256(data).hexdigest() == GOLDEN_SHA256
    digest = hashlib.sha256(ALICE.peer_id + NAME.encode()).digest()[:20]
    assert ALICE.key() == "/gguf-swarm-name/" + base64.b32encode(digest).decode().lower()
    assert len(ALICE.key()) == 49  # py-libp2p answers FIND_NODE only for keys of <= 50 bytes


def test_non_canonical_or_malformed_records_are_rejected() -> None:
    record = ALICE.record()
    fields = msgpack.unpackb(encode_record(record))
    reordered = msgpack.packb(dict(reversed(list(fields.items()))), use_bin_type=True)
    extra = msgpack.packb({**fields, "x": 1}, use_bin_type=True)
    as_str = msgpack.packb({**fields, "seq": "0"}, use_bin_type=True)
    as_bool = msgpack.packb({**fields, "seq": True}, use_bin_type=True)
    wide_int = encode_record(record).replace(b"\xa3seq\x00", b"\xa3seq\xcd\x00\x00")  # 0 as uint16
    for bad in (reordered, extra, as_str, as_bool, wide_int, b"", b"\xc1", b"\x00" * 2000):
        with pytest.raises(InvalidRecord):
            decode_record(bad)


@given(st.binary(max_size=400))
def test_garbage_is_only_ever_an_invalid_record(data: bytes) -> None:
    try:
        check_record(data, ALICE.key(), NOW)
    except InvalidRecord:
        pass


@given(
    st.integers(0, 2**63 - 1), st.integers(0, 2**63 - 1), st.from_regex(r"[a-z0-9][a-z0-9.:_+-]{0,40}", fullmatch=True)
)
def test_records_round_trip(seq: int, expires: int, name: str) -> None:
    record = ALICE.record(CID_2, seq=seq, expires=expires, name=name)
    assert decode_record(encode_record(record)) == record


def test_names_are_validated() -> None:
    for good in (NAME, "a", "x" * MAX_NAME, "Qwen2.5-7B+instruct:Q8_0"):
        assert validate_name(good) == good
    for bad in ("", "x" * (MAX_NAME + 1), "-lead", ".hidden", "a/b", "a b", "é", "a\n", "name\x00"):
        with pytest.raises(InvalidName):
            validate_name(bad)
    assert parse_target(f"{peer_id_text(ALICE.peer_id)}/{NAME}") == (peer_id_text(ALICE.peer_id), NAME)
    for bad in ("noslash", "/name", "peer/", "peer/a/b"):
        with pytest.raises(InvalidName):
            parse_target(bad)
    for bad in ("", "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N", "12D3KooW0OIl", "x" * 100):
        with pytest.raises(InvalidName):
            parse_peer_id(bad)


def test_the_publishers_sequence_only_grows(tmp_path: Path) -> None:
    assert point_name(tmp_path, NAME, CID_1).seq == 0
    assert point_name(tmp_path, NAME, CID_1).seq == 0  # same CID: same sequence (a republish)
    assert point_name(tmp_path, NAME, CID_2).seq == 1
    assert point_name(tmp_path, NAME, CID_1).seq == 2  # back to the first CID: still forwards
    assert point_name(tmp_path, "other", CID_1).seq == 0
    assert {n: e.seq for n, e in load_names(tmp_path).items()} == {NAME: 2, "other": 0}
    (tmp_path / "names.json").write_text("{not json")
    with pytest.raises(NodeError, match="cannot read"):
        load_names(tmp_path)


def test_alias_file(tmp_path: Path) -> None:
    path = tmp_path / "gguf-swarm" / "aliases.toml"
    assert load_aliases(path) == {}
    alice = peer_id_text(ALICE.peer_id)
    add_alias(path, "alice", alice)
    add_alias(path, "mallory", peer_id_text(MALLORY.peer_id))
    assert load_aliases(path) == {"alice": alice, "mallory": peer_id_text(MALLORY.peer_id)}
    assert publisher_of("alice", load_aliases(path)) == ALICE.peer_id
    assert publisher_of(alice, {}) == ALICE.peer_id
    with pytest.raises(NodeError, match="neither a peer id"):
        publisher_of("bob", load_aliases(path))
    for alias, peer in (("a.b", alice), ("bob", "not-a-peer"), (alice, alice)):
        with pytest.raises(NodeError):
            add_alias(path, alias, peer)
    path.write_text('[aliases]\nbob = "nope"\n')
    with pytest.raises(NodeError, match="bob"):
        load_aliases(path)
    assert os.access(path, os.R_OK)


@given(
    st.lists(st.tuples(st.integers(0, 5), st.integers(-2, 3), st.booleans()), min_size=1, max_size=8),
    st.randoms(use_true_random=False),
)
def test_selection_is_the_newest_valid_record_in_any_order(
    specs: list[tuple[int, int, bool]], rnd: random.Random
) -> None:
    """(seq, expiry offset, Alice signs?) records: the pick is the highest (seq,
    expiry) of Alice's unexpired ones, whatever order they come in."""
    values = [
        encode_record((ALICE if alice else MALLORY).record(CID_1, seq=seq, expires=NOW + offset))
        for seq, offset, alice in specs
    ]
    valid = [(seq, offset) for seq, offset, alice in specs if alice and offset > 0]
    shuffled = list(values)
    rnd.shuffle(shuffled)
    for candidates in (values, shuffled):
        index = select_record(ALICE.key(), candidates, NOW)
        if not valid:
            assert index is None
            continue
        assert index is not None
        record = decode_record(candidates[index])
        assert (record.seq, record.expires - NOW) == max(valid)
