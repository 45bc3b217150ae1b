from __future__ import annotations

import ast
import hashlib
from pathlib import Path

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import (
    Data,
    Error,
    ErrorCode,
    FetchingRequest,
    FragmentRequest,
    FrameDecoder,
    Have,
    HaveRequest,
    ManifestRequest,
    ProtocolError,
    cid_of,
    decode_bitfield,
    digest_of_cid,
    encode_bitfield,
    encode_frame,
)
from protocol.framing import MAX_FRAME
from protocol.messages import to_wire

CID = cid_of(b"hello")


def test_cid_golden_vector() -> None:
    # CIDv1 raw sha2-256 of b"hello", as go/js multiformats print it.
    assert CID == "bafkreibm6jg3ux5qumhcn2b3flc3tyu6dmlb4xa7u5bf44yegnrjhc4yeq"
    assert digest_of_cid(CID) == hashlib.sha256(b"hello").digest()


def test_frame_golden_bytes() -> None:
    assert encode_frame(Data(5)) == b"\x00\x00\x00\x0e" + msgpack.packb({"t": "data", "size": 5})


def test_a_whole_manifest_request_is_what_older_nodes_accept() -> None:
    # Ranges were added later: only a ranged request carries offset and length.
    assert to_wire(ManifestRequest(CID)) == {"t": "manifest", "model": CID}
    assert to_wire(ManifestRequest(CID, 0, 10)) == {"t": "manifest", "model": CID, "offset": 0, "length": 10}


MESSAGES = [
    ManifestRequest(CID),
    ManifestRequest(CID, 1 << 20, 1 << 20),
    ManifestRequest(CID, 0, 4096),
    HaveRequest(CID),
    FetchingRequest(CID),
    FragmentRequest(CID),
    FragmentRequest(CID, 10, 20),
    Have(10, encode_bitfield([True, False] * 5)),
    Data(123),
    Data(123, 5000),
    Error(ErrorCode.NOT_FOUND, "no such fragment"),
]


@pytest.mark.parametrize("msg", MESSAGES)
def test_round_trip_all_at_once_byte_by_byte_and_with_trailing_data(msg: object) -> None:
    wire = encode_frame(msg)  # type: ignore[arg-type]
    d = FrameDecoder()
    d.receive_data(wire + b"BODY" + wire)
    assert d.next_message() == msg
    assert d.take_raw(4) == b"BODY"
    assert d.next_message() == msg  # the next answer on a pipelined stream stays buffered
    d = FrameDecoder()
    for i in range(len(wire)):
        assert d.next_message() is None
        d.receive_data(wire[i : i + 1])
    assert d.next_message() == msg


@given(st.lists(st.booleans(), max_size=200))
def test_bitfield_round_trip(bits: list[bool]) -> None:
    assert decode_bitfield(encode_bitfield(bits), len(bits)) == bits


@pytest.mark.parametrize(
    "obj",
    [
        [1, 2],
        {"t": "nope"},
        {"t": "get", "cid": "bafy-not-a-cid", "offset": 0},
        {"t": "get", "cid": CID, "offset": -1},
        {"t": "get", "cid": CID, "offset": True},
        {"t": "get", "cid": CID, "offset": 0, "evil": 1},
        {"t": "have", "count": 9, "bits": b"\xff"},
        {"t": "have", "count": 4, "bits": b"\xff"},  # spare bits set
        {"t": "data", "size": 1 << 40},
        {"t": "manifest"},
        {"t": "manifest", "model": CID, "offset": -1},
        {"t": "data", "size": 10, "total": 9},  # a range larger than the whole
    ],
)
def test_invalid_frames_are_protocol_errors(obj: object) -> None:
    d = FrameDecoder()
    body = msgpack.packb(obj, use_bin_type=True)
    d.receive_data(len(body).to_bytes(4, "big") + body)
    with pytest.raises(ProtocolError):
        d.next_message()


def test_oversized_frame_is_refused_before_it_arrives() -> None:
    d = FrameDecoder()
    d.receive_data((MAX_FRAME + 1).to_bytes(4, "big"))
    with pytest.raises(ProtocolError):
        d.next_message()


@given(st.binary(max_size=300))
def test_garbage_is_only_ever_a_protocol_error(data: bytes) -> None:
    d = FrameDecoder()
    d.receive_data(len(data).to_bytes(4, "big") + data)
    try:
        d.next_message()
    except ProtocolError:
        pass


def test_protocol_and_fragmenter_import_no_io_libraries() -> None:
    root = Path(__file__).resolve().parents[2]
    for package in ("protocol", "fragmenter"):
        for path in (root / package).glob("*.py"):
            tree = ast.parse(path.read_text())
            names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            names |= {
                (n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0
            }
            assert not names & {"trio", "libp2p", "socket", "node"}, path
