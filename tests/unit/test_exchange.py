"""Protocol v2 without sockets: two `ExchangeSession`s joined in memory (what one sends, the other receives).

Layouts are written as file sizes; every test runs `check_invariants` on both
ends after each step. Have-sets are written as strings: "*" held.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.swarm import hears_have
from protocol import (
    EXCHANGE_PROTOCOL_ID,
    MAX_BITFIELD_BYTES,
    MAX_CHUNK,
    MAX_FRAME,
    MAX_HAVE_BATCH,
    MAX_PEX,
    Bitfield,
    BlockReceived,
    CancelBlock,
    Choke,
    Error,
    ErrorCode,
    Event,
    ExchangeMessage,
    ExchangeSession,
    Hashes,
    HashesRequest,
    HaveBlocks,
    Hello,
    Interested,
    LocalProtocolError,
    NotInterested,
    PeerExchange,
    PieceChunk,
    ProtocolError,
    RejectBlock,
    RemoteProtocolError,
    RequestBlock,
    Unchoke,
    cid_of,
    decode_exchange,
    encode_exchange,
)
from protocol.blocks import BLOCK_SIZE
from protocol.exchange import Lost
from protocol.layout import BlockLayout

CID = cid_of(b"model")
OTHER_CID = cid_of(b"another model")

# Block size 64 keeps bodies small enough to feed one byte at a time.
# file:   0     1 (3 blocks + 5)  2 (empty)  3 (unblocked)  4 (10 blocks + 1)
# blocks: 0     1 2 3 4           5          6              7..17
BS = 64
SIZES = [10, 3 * BS + 5, 0, 7, 10 * BS + 1]
LAYOUT = BlockLayout(SIZES, [True, True, True, False, True], block_size=BS)
TOTAL = 18
# The same shape with real 1 MiB blocks: bodies are cut into MAX_CHUNK chunks.
BIG = BlockLayout([10, 3 * BLOCK_SIZE + 5, 0, 7], [True, True, True, False])


def haves(pattern: str) -> set[int]:
    return {i for i, c in enumerate(pattern) if c == "*"}


def bitfield_of(blocks: Iterable[int], total: int = TOTAL) -> bytes:
    out = bytearray((total + 7) // 8)
    for b in blocks:
        out[b >> 3] |= 0x80 >> (b & 7)
    return bytes(out)


def block_data(layout: BlockLayout, block: int) -> bytes:
    return bytes((block * 7 + i) % 251 for i in range(layout.block_length(block)))


def check_invariants(s: ExchangeSession) -> None:
    total = s.layout.total_blocks
    assert len(s.peer_have) == (total + 7) // 8
    assert s.peer_have_count == sum(bin(x).count("1") for x in s.peer_have)
    assert s.peer_have_count == sum(s.peer_has(b) for b in range(total))
    assert s.cancelled <= s.our_requests.keys()
    for block, got in s.our_requests.items():
        assert 0 <= block < total and 0 <= got < max(1, s.layout.block_length(block))
    for block, sent in s.peer_requests.items():
        assert 0 <= block < total and 0 <= sent < max(1, s.layout.block_length(block))
    assert len(s.peer_requests) <= s.max_peer_requests
    assert sum(s.peer_hash_requests.values()) <= s.max_peer_hash_requests
    assert all(n > 0 for n in s.peer_hash_requests.values())
    assert all(n > 0 for n in s.our_hash_requests.values())


def drain(s: ExchangeSession) -> list[Event]:
    events = []
    while (event := s.next_event()) is not None:
        events.append(event)
    return events


def feed(s: ExchangeSession, data: bytes, step: int | None = None) -> list[Event]:
    """Events of `data` received in reads of `step` bytes (all at once when None)."""
    if step is None:
        s.receive_data(data)
        return drain(s)
    events = []
    for i in range(0, len(data), step):
        s.receive_data(data[i : i + step])
        events += drain(s)
    return events


class Pair:
    """Two ends of one stream, `a` (usually the seed) and `b`."""

    def __init__(self, layout: BlockLayout = LAYOUT, **kw: int) -> None:
        self.a = ExchangeSession(layout, CID, **kw)
        self.b = ExchangeSession(layout, CID, **kw)
        self.layout = layout

    def other(self, s: ExchangeSession) -> ExchangeSession:
        return self.b if s is self.a else self.a

    def deliver(self, s: ExchangeSession, data: bytes) -> list[Event]:
        peer = self.other(s)
        peer.receive_data(data)
        events = drain(peer)
        check_invariants(self.a)
        check_invariants(self.b)
        return events

    def send(self, s: ExchangeSession, msg: ExchangeMessage) -> list[Event]:
        return self.deliver(s, s.send(msg))

    def chunk(self, s: ExchangeSession, block: int, offset: int, data: bytes) -> list[Event]:
        return self.deliver(s, s.send_chunk(block, offset, data))

    def serve(self, s: ExchangeSession, block: int, chunk: int) -> list[Event]:
        """Every chunk of `block`, `chunk` bytes at a time, from `s`."""
        data = block_data(self.layout, block)
        events = []
        for off in range(0, max(1, len(data)), chunk):
            events += self.chunk(s, block, off, data[off : off + chunk])
        return events

    def hello(self) -> None:
        assert self.send(self.a, Hello(CID, self.layout.total_blocks)) == [Hello(CID, self.layout.total_blocks)]
        assert self.send(self.b, Hello(CID, self.layout.total_blocks)) == [Hello(CID, self.layout.total_blocks)]

    def unchoked(self) -> None:
        """Hellos, then `b` is interested and `a` unchokes it."""
        self.hello()
        assert self.send(self.b, Interested()) == [Interested()]
        assert self.send(self.a, Unchoke()) == [Unchoke()]


def helloed(layout: BlockLayout = LAYOUT, **kw: int) -> ExchangeSession:
    """A session that has sent and received Hello."""
    s = ExchangeSession(layout, CID, **kw)
    s.send(Hello(CID, layout.total_blocks))
    assert feed(s, encode_exchange(Hello(CID, layout.total_blocks))) == [Hello(CID, layout.total_blocks)]
    return s


def frames(*msgs: ExchangeMessage) -> bytes:
    return b"".join(encode_exchange(m) for m in msgs)


def raw_frame(obj: object) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return len(body).to_bytes(4, "big") + body


# ---- a full exchange ---------------------------------------------------------


def test_layout_of_the_tests() -> None:
    assert LAYOUT.total_blocks == TOTAL
    assert [LAYOUT.block_length(b) for b in (0, 1, 4, 5, 6, 7, 17)] == [10, BS, 5, 0, 7, BS, 1]
    assert EXCHANGE_PROTOCOL_ID == "/gguf-swarm/2.0.0"


def test_full_exchange() -> None:
    p = Pair()
    a, b = p.a, p.b
    p.hello()
    assert a.hello_sent and a.hello_received and b.hello_sent and b.hello_received

    # a reveals its blocks gradually: a bitfield, then a few haves.
    held = haves("***** ** ** ")
    assert p.send(a, Bitfield(0, bitfield_of(held)[:2])) == [Bitfield(0, bitfield_of(held)[:2])]
    assert {i for i in range(TOTAL) if b.peer_has(i)} == held
    assert p.send(a, HaveBlocks((17, 12, 12))) == [HaveBlocks((17, 12, 12))]
    assert b.peer_have_count == len(held) + 2 and b.peer_has(17) and b.peer_has(12)

    assert p.send(b, Interested()) == [Interested()]
    assert a.peer_interested and b.am_interested
    with pytest.raises(LocalProtocolError):
        b.send(RequestBlock(0))  # still choked
    assert p.send(a, Unchoke()) == [Unchoke()]
    assert not a.am_choking and not b.peer_choking

    # b pipelines requests; a answers them in any order, several chunks each.
    for block in (1, 0, 5, 6):
        assert p.send(b, RequestBlock(block)) == [RequestBlock(block)]
    assert list(b.our_requests) == [1, 0, 5, 6] and list(a.peer_requests) == [1, 0, 5, 6]
    assert p.serve(a, 0, 3) == [BlockReceived(0, block_data(LAYOUT, 0))]
    events = p.serve(a, 1, 20)
    assert events == [BlockReceived(1, block_data(LAYOUT, 1))]
    assert p.serve(a, 5, 20) == [BlockReceived(5, b"")]  # a zero-length block: one empty chunk
    assert p.serve(a, 6, 7) == [BlockReceived(6, block_data(LAYOUT, 6))]
    assert not b.our_requests and not a.peer_requests

    # hashes of one file, asked and answered; then not held.
    assert p.send(b, HashesRequest(1)) == [HashesRequest(1)]
    assert b.our_hash_requests == {1: 1} and a.peer_hash_requests == {1: 1}
    digests = bytes(range(32)) * 4
    assert p.send(a, Hashes(1, digests)) == [Hashes(1, digests)]
    assert p.send(b, HashesRequest(4)) == [HashesRequest(4)]
    assert p.send(a, Hashes(4, b"")) == [Hashes(4, b"")]
    assert not b.our_hash_requests and not a.peer_hash_requests

    addrs = ("/ip4/10.0.0.1/tcp/4001/p2p/QmPeer", "/ip6/::1/udp/4001/quic-v1")
    assert p.send(a, PeerExchange(addrs)) == [PeerExchange(addrs)]
    assert p.send(b, NotInterested()) == [NotInterested()]
    assert not a.peer_interested
    assert p.send(a, Choke()) == [Choke()]
    assert b.peer_choking

    goodbye = Error(ErrorCode.BUSY, "shutting down")
    assert p.send(a, goodbye) == [goodbye]
    assert a.closed and b.closed
    with pytest.raises(LocalProtocolError):
        a.send(Unchoke())
    with pytest.raises(LocalProtocolError):
        b.send(Interested())


def test_real_blocks_in_max_chunks_fed_in_odd_reads() -> None:
    p = Pair(BIG)
    p.unchoked()
    for block in (1, 4, 0):
        p.send(p.b, RequestBlock(block))
    wire = b""
    for block in (1, 4, 0):
        data = block_data(BIG, block)
        for off in range(0, len(data), MAX_CHUNK):
            wire += p.a.send_chunk(block, off, memoryview(data)[off : off + MAX_CHUNK])
    assert not p.a.peer_requests
    expected = [BlockReceived(b, block_data(BIG, b)) for b in (1, 4, 0)]
    for step in (None, 65536, 65537, 1000, MAX_CHUNK + 30):
        b = helloed(BIG)
        feed(b, encode_exchange(Unchoke()))
        for block in (1, 4, 0):
            b.send(RequestBlock(block))
        assert feed(b, wire, step) == expected, step
        assert not b.our_requests


def test_chunks_of_different_blocks_may_interleave() -> None:
    p = Pair()
    p.unchoked()
    p.send(p.b, RequestBlock(1))
    p.send(p.b, RequestBlock(2))
    one, two = block_data(LAYOUT, 1), block_data(LAYOUT, 2)
    assert p.chunk(p.a, 1, 0, one[:30]) == []
    assert p.chunk(p.a, 2, 0, two[:10]) == []
    assert p.b.our_requests == {1: 30, 2: 10} and p.a.peer_requests == {1: 30, 2: 10}
    assert p.chunk(p.a, 2, 10, two[10:]) == [BlockReceived(2, two)]
    assert p.chunk(p.a, 1, 30, one[30:]) == [BlockReceived(1, one)]


def test_choke_rejects_what_was_not_started_and_finishes_the_rest() -> None:
    p = Pair()
    p.unchoked()
    for block in (1, 2, 3):
        p.send(p.b, RequestBlock(block))
    data = block_data(LAYOUT, 2)
    assert p.chunk(p.a, 2, 0, data[:16]) == []
    assert p.send(p.a, Choke()) == [Choke(), RejectBlock(1), RejectBlock(3)]
    assert p.a.am_choking and p.a.peer_requests == {2: 16}
    assert p.b.peer_choking and p.b.our_requests == {2: 16}
    with pytest.raises(LocalProtocolError):
        p.b.send(RequestBlock(1))
    assert p.chunk(p.a, 2, 16, data[16:]) == [BlockReceived(2, data)]
    # a request that was in flight when the choke was sent is rejected by the node
    p.send(p.a, Unchoke())
    in_flight = p.b.send(RequestBlock(4))
    assert p.send(p.a, Choke()) == [Choke()]  # crosses the request
    assert p.deliver(p.b, in_flight) == [RequestBlock(4)]  # accepted while choking...
    assert p.send(p.a, RejectBlock(4)) == [RejectBlock(4)]  # ...and rejected by the node
    assert not p.a.peer_requests and not p.b.our_requests


def test_cancel_is_a_hint_answered_by_a_reject_or_the_block() -> None:
    p = Pair()
    p.unchoked()
    p.send(p.b, RequestBlock(1))
    p.send(p.b, RequestBlock(7))
    assert p.send(p.b, CancelBlock(1)) == [CancelBlock(1)]
    assert p.b.cancelled == {1} and 1 in p.b.our_requests  # pending until answered
    assert p.send(p.a, RejectBlock(1)) == [RejectBlock(1)]
    assert p.b.cancelled == set() and 1 not in p.b.our_requests
    # a cancel that crosses the first chunk: the seed finishes the block
    p.chunk(p.a, 7, 0, block_data(LAYOUT, 7)[:8])
    assert p.send(p.b, CancelBlock(7)) == [CancelBlock(7)]
    with pytest.raises(LocalProtocolError):
        p.a.send(RejectBlock(7))  # started: must be finished
    assert p.chunk(p.a, 7, 8, block_data(LAYOUT, 7)[8:]) == [BlockReceived(7, block_data(LAYOUT, 7))]
    assert not p.b.cancelled and not p.b.our_requests
    # a cancel of a block already answered is only an event
    assert p.deliver(p.b, encode_exchange(CancelBlock(7))) == [CancelBlock(7)]


def test_availability_only_grows() -> None:
    p = Pair()
    p.hello()
    p.send(p.a, HaveBlocks((3,)))
    p.send(p.a, Bitfield(8, bitfield_of(haves("         *"))[1:2]))  # block 9 only
    p.send(p.a, Bitfield(0, b"\x00\x00\x00"))  # announces nothing: nothing is lost
    assert {i for i in range(TOTAL) if p.b.peer_has(i)} == {3, 9}
    p.send(p.a, Bitfield(0, bitfield_of(range(TOTAL))))
    assert p.b.peer_have_count == TOTAL
    p.send(p.a, HaveBlocks(tuple(range(TOTAL))))
    assert p.b.peer_have_count == TOTAL
    with pytest.raises(IndexError):
        p.b.peer_has(TOTAL)


def test_lost_takes_a_files_blocks_out_of_availability_and_nothing_else() -> None:
    p = Pair()
    p.hello()
    p.send(p.a, Bitfield(0, bitfield_of(range(TOTAL))))
    assert p.send(p.a, Lost(1)) == [Lost(1)]  # file 1: blocks 1..4
    assert {i for i in range(TOTAL) if p.b.peer_has(i)} == set(range(TOTAL)) - {1, 2, 3, 4}
    assert p.b.peer_have_count == TOTAL - 4
    p.send(p.a, Lost(1))  # again: nothing more to take
    assert p.b.peer_have_count == TOTAL - 4
    p.send(p.a, HaveBlocks((2,)))  # fetched again later: announced again
    assert p.b.peer_has(2) and p.b.peer_have_count == TOTAL - 3
    with pytest.raises(LocalProtocolError):
        p.a.send(Lost(len(SIZES)))
    with pytest.raises(RemoteProtocolError):
        feed(p.b, frames(Lost(len(SIZES))))


def test_pex_and_bitfield_may_come_any_time_after_hello_in_both_directions() -> None:
    p = Pair()
    p.hello()
    assert p.send(p.b, PeerExchange(())) == [PeerExchange(())]
    assert p.send(p.b, Bitfield(16, b"\x80")) == [Bitfield(16, b"\x80")]
    assert p.a.peer_has(16) and p.a.peer_have_count == 1


def test_error_may_be_the_first_and_last_message() -> None:
    b = ExchangeSession(LAYOUT, CID)
    gone = Error(ErrorCode.NOT_FOUND, "no such model")
    assert feed(b, encode_exchange(gone) + b"\x00\x00\x00\x01garbage") == [gone]
    assert b.closed and b.next_event() is None
    b.receive_data(b"more garbage")
    assert b.next_event() is None
    a = ExchangeSession(LAYOUT, CID)
    assert a.send(gone) == encode_exchange(gone)
    assert a.closed
    with pytest.raises(LocalProtocolError):
        a.send(Hello(CID, TOTAL))


def test_unknown_error_code_is_kept_as_internal() -> None:
    msg = decode_exchange({"t": "error", "code": 99, "message": "x" * 1000})
    assert isinstance(msg, Error) and msg.code == ErrorCode.INTERNAL and len(msg.message) <= 500


# ---- the same bytes, however they arrive -------------------------------------

CONTROL_STREAM = [
    Hello(CID, TOTAL),
    Bitfield(0, bitfield_of(haves("* * * * * * * * * "))),
    HaveBlocks((1, 3, 17)),
    Interested(),
    Unchoke(),
    RequestBlock(2),
    RequestBlock(5),
    CancelBlock(2),
    HashesRequest(4),
    PeerExchange(("/ip4/127.0.0.1/tcp/1",)),
    NotInterested(),
    Choke(),
    Error(ErrorCode.BAD_REQUEST, "bye"),
]


@pytest.mark.parametrize("step", [None, 1, 2, 3, 7, 100])
@pytest.mark.parametrize("trailing", [b"", b"\x00\x00\x00\x05trailing garbage", b"\xff" * 10])
def test_control_stream_all_at_once_byte_by_byte_and_with_trailing_data(step: int | None, trailing: bytes) -> None:
    s = ExchangeSession(LAYOUT, CID)
    assert feed(s, frames(*CONTROL_STREAM) + trailing, step) == CONTROL_STREAM
    assert s.closed and s.peer_have_count == 12 and list(s.peer_requests) == [2, 5]


@pytest.mark.parametrize("step", [None, 1, 3, 13, 64])
def test_control_stream_without_goodbye_leaves_a_partial_frame_buffered(step: int | None) -> None:
    s = ExchangeSession(LAYOUT, CID)
    wire = frames(*CONTROL_STREAM[:-1])
    partial = encode_exchange(Interested())[:-2]
    assert feed(s, wire + partial, step) == CONTROL_STREAM[:-1]
    assert not s.closed and not s.peer_interested
    assert feed(s, encode_exchange(Interested())[-2:]) == [Interested()]


CHUNKED = [(1, 0, 20), (0, 0, 10), (1, 20, 44), (5, 0, 0), (2, 0, 64), (6, 0, 3), (6, 3, 4), (4, 0, 5)]


def chunked_stream() -> tuple[bytes, list[Event]]:
    """Chunks of blocks 0..6 interleaved, a reject of 3, and the events they make."""
    seed = helloed()
    for block in range(7):
        seed.receive_data(encode_exchange(RequestBlock(block)))
    assert len(drain(seed)) == 7
    wire = b""
    for block, off, size in CHUNKED:
        wire += seed.send_chunk(block, off, block_data(LAYOUT, block)[off : off + size])
    wire += seed.send(RejectBlock(3))
    assert not seed.peer_requests
    events: list[Event] = [BlockReceived(b, block_data(LAYOUT, b)) for b in (0, 1, 5, 2, 6, 4)]
    return wire, events + [RejectBlock(3)]


def requester() -> ExchangeSession:
    s = helloed()
    assert feed(s, encode_exchange(Unchoke())) == [Unchoke()]
    for block in range(7):
        s.send(RequestBlock(block))
    return s


@pytest.mark.parametrize("step", [None, 1, 2, 5, 31, 64, 1000])
def test_chunked_pieces_all_at_once_byte_by_byte_and_with_trailing_data(step: int | None) -> None:
    wire, events = chunked_stream()
    trailing = encode_exchange(Choke())
    s = requester()
    assert feed(s, wire + trailing + trailing[:3], step) == events + [Choke()]
    assert not s.our_requests and s.next_event() is None
    check_invariants(s)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(min_value=0, max_value=2000), max_size=30))
def test_chunked_pieces_at_random_cuts(cuts: list[int]) -> None:
    wire, events = chunked_stream()
    s = requester()
    got: list[Event] = []
    start = 0
    for cut in sorted({min(c, len(wire)) for c in cuts}) + [len(wire)]:
        s.receive_data(wire[start:cut])
        got += drain(s)
        check_invariants(s)
        start = cut
    assert got == events


def test_bodies_arriving_as_bytearray_or_memoryview_are_not_aliased() -> None:
    wire, events = chunked_stream()
    s = requester()
    buf = bytearray(wire)
    got: list[Event] = []
    for i in range(0, len(buf), 9):
        piece = buf[i : i + 9]
        s.receive_data(memoryview(piece) if i % 2 else piece)
        got += drain(s)
        piece[:] = b"\xee" * len(piece)  # the caller reuses its read buffer
    assert got == events


# ---- golden bytes: the wire format is pinned -----------------------------------


GOLDEN = [
    (Hello(CID, 18), b"\x00\x00\x00T\x83\xa1t\xa5hello\xa5model\xd9;" + CID.encode() + b"\xa6blocks\x12"),
    (Bitfield(8, b"\xa0"), b"\x00\x00\x00\x1b\x83\xa1t\xa8bitfield\xa5first\x08\xa4bits\xc4\x01\xa0"),
    (HaveBlocks((1, 300)), b"\x00\x00\x00\x14\x82\xa1t\xa4have\xa6blocks\x92\x01\xcd\x01\x2c"),
    (Choke(), b"\x00\x00\x00\x09\x81\xa1t\xa5choke"),
    (NotInterested(), b"\x00\x00\x00\x12\x81\xa1t\xaenot_interested"),
    (RequestBlock(7), b"\x00\x00\x00\x12\x82\xa1t\xa7request\xa5block\x07"),
    (PieceChunk(1, 2, 3), b"\x00\x00\x00\x1e\x84\xa1t\xa5chunk\xa5block\x01\xa6offset\x02\xa4size\x03"),
    (HashesRequest(2), b"\x00\x00\x00\x11\x82\xa1t\xa7hashes?\xa4file\x02"),
    (Hashes(0, b""), b"\x00\x00\x00\x1a\x83\xa1t\xa6hashes\xa4file\x00\xa7digests\xc4\x00"),
    (PeerExchange(("/a",)), b"\x00\x00\x00\x11\x82\xa1t\xa3pex\xa5addrs\x91\xa2/a"),
    (Error(ErrorCode.NOT_FOUND, "no"), b"\x00\x00\x00\x1a\x83\xa1t\xa5error\xa4code\x01\xa7message\xa2no"),
]


@pytest.mark.parametrize(("msg", "wire"), GOLDEN)
def test_golden_bytes(msg: ExchangeMessage, wire: bytes) -> None:
    assert encode_exchange(msg) == wire
    assert decode_exchange(msgpack.unpackb(wire[4:], raw=False)) == msg


def test_send_chunk_golden_bytes() -> None:
    s = helloed()
    s.receive_data(encode_exchange(RequestBlock(1)))
    drain(s)
    assert s.send_chunk(1, 0, b"abc") == GOLDEN[6][1].replace(b"\x02\xa4size", b"\x00\xa4size") + b"abc"


# ---- every message survives the wire ------------------------------------------

indices = st.integers(min_value=0, max_value=(1 << 24) - 1)
MESSAGES = st.one_of(
    st.builds(Hello, st.just(CID) | st.just(OTHER_CID), st.integers(min_value=0, max_value=1 << 24)),
    st.builds(Bitfield, indices.map(lambda i: i & ~7), st.binary(max_size=MAX_BITFIELD_BYTES)),
    st.builds(HaveBlocks, st.lists(indices, max_size=MAX_HAVE_BATCH).map(tuple)),
    st.sampled_from([Interested(), NotInterested(), Choke(), Unchoke()]),
    st.builds(RequestBlock, indices),
    st.builds(CancelBlock, indices),
    st.builds(RejectBlock, indices),
    st.builds(PieceChunk, indices, st.integers(0, 1 << 30), st.integers(0, MAX_CHUNK)),
    st.builds(HashesRequest, indices),
    st.builds(Hashes, indices, st.binary(max_size=64 * 32).map(lambda b: b[: len(b) // 32 * 32])),
    st.builds(PeerExchange, st.lists(st.text(max_size=300), max_size=MAX_PEX).map(tuple)),
    st.builds(Error, st.sampled_from(ErrorCode), st.text(max_size=500)),
)


@given(MESSAGES)
def test_round_trip_of_every_message_type(msg: ExchangeMessage) -> None:
    wire = encode_exchange(msg)
    assert int.from_bytes(wire[:4], "big") == len(wire) - 4 <= MAX_FRAME
    assert decode_exchange(msgpack.unpackb(wire[4:], raw=False, strict_map_key=True)) == msg


@pytest.mark.parametrize(
    "obj",
    [
        [1, 2],
        {"t": "nope"},
        {"t": 1},
        {"t": "hello", "model": "bafy-not-a-cid", "blocks": 1},
        {"t": "hello", "model": CID},
        {"t": "hello", "model": CID, "blocks": True},
        {"t": "hello", "model": CID, "blocks": -1},
        {"t": "hello", "model": CID, "blocks": 1, "evil": 1},
        {"t": "choke", "block": 1},
        {"t": "request", "block": 1.0},
        {"t": "request", "block": 1 << 24},
        {"t": "request", "block": False},
        {"t": "bitfield", "first": 3, "bits": b"\x00"},
        {"t": "bitfield", "first": 0, "bits": "\x00"},
        {"t": "bitfield", "first": 0, "bits": b"\x00" * (MAX_BITFIELD_BYTES + 1)},
        {"t": "have", "blocks": [1, True]},
        {"t": "have", "blocks": [1, -1]},
        {"t": "have", "blocks": [0] * (MAX_HAVE_BATCH + 1)},
        {"t": "have", "blocks": 3},
        {"t": "chunk", "block": 0, "offset": 0, "size": MAX_CHUNK + 1},
        {"t": "chunk", "block": 0, "offset": -1, "size": 1},
        {"t": "hashes", "file": 0, "digests": b"\x00" * 31},
        {"t": "hashes", "file": 0},
        {"t": "pex", "addrs": ["/a"] * (MAX_PEX + 1)},
        {"t": "pex", "addrs": ["x" * 301]},
        {"t": "pex", "addrs": [b"/a"]},
        {"t": "error", "code": "1", "message": "x"},
    ],
)
def test_invalid_frames_are_protocol_errors(obj: object) -> None:
    with pytest.raises(ProtocolError):
        decode_exchange(obj)
    s = helloed()
    with pytest.raises(RemoteProtocolError):
        feed(s, raw_frame(obj))


def test_encoding_refuses_what_the_peer_would_refuse() -> None:
    for msg in (Hello("nope", 1), RequestBlock(-1), Bitfield(1, b""), PeerExchange(("x",) * (MAX_PEX + 1))):
        with pytest.raises(ValueError):
            encode_exchange(msg)
    with pytest.raises(TypeError):
        encode_exchange("choke")  # type: ignore[arg-type]


# ---- receive rules: the peer at fault -------------------------------------------


def fails(s: ExchangeSession, *msgs: ExchangeMessage) -> str:
    """Feed `msgs`; the last one must raise RemoteProtocolError. Returns its reason."""
    with pytest.raises(RemoteProtocolError) as info:
        feed(s, frames(*msgs))
    with pytest.raises(RemoteProtocolError):
        s.next_event()  # a failed session stays failed
    return str(info.value)


def test_first_message_received_must_be_hello() -> None:
    assert "Hello" in fails(ExchangeSession(LAYOUT, CID), Interested())
    assert "model" in fails(ExchangeSession(LAYOUT, CID), Hello(OTHER_CID, TOTAL))
    assert "blocks" in fails(ExchangeSession(LAYOUT, CID), Hello(CID, TOTAL + 1))
    assert "hello" in fails(helloed(), Hello(CID, TOTAL))


@pytest.mark.parametrize(
    "msg",
    [
        Bitfield(24, b"\x80"),  # past the last byte
        Bitfield(0, b"\x00" * 4),
        Bitfield(16, b"\x20"),  # block 18: the first spare bit
        Bitfield(0, b"\xff\xff\xc1"),
        HaveBlocks((0, TOTAL)),
        RequestBlock(TOTAL),
        CancelBlock(TOTAL),
        HashesRequest(len(SIZES)),
    ],
)
def test_indices_out_of_range_are_refused(msg: ExchangeMessage) -> None:
    fails(helloed(), msg)


def test_peer_requests_are_bounded_and_not_repeated() -> None:
    s = helloed(max_peer_requests=3)
    assert feed(s, frames(RequestBlock(0), RequestBlock(1), RequestBlock(2))) != []
    assert "too many" in fails(s, RequestBlock(3))
    s = helloed()
    assert "twice" in fails(s, RequestBlock(4), RequestBlock(4))
    s = helloed(max_peer_requests=1)  # an answered request frees its slot
    feed(s, frames(RequestBlock(0)))
    s.send(RejectBlock(0))
    assert feed(s, frames(RequestBlock(0))) == [RequestBlock(0)]


def test_reject_must_answer_an_unstarted_request_of_ours() -> None:
    assert "not requested" in fails(requester(), RejectBlock(8))
    s = requester()
    s.receive_data(encode_exchange(PieceChunk(1, 0, 5)) + b"12345")
    assert drain(s) == []
    assert "partly" in fails(s, RejectBlock(1))


def test_chunks_must_follow_our_requests_in_order_and_within_the_block() -> None:
    assert "not requested" in fails(requester(), PieceChunk(8, 0, 1))
    assert "order" in fails(requester(), PieceChunk(1, 5, 1))
    assert "end" in fails(requester(), PieceChunk(0, 0, 11))
    assert "end" in fails(requester(), PieceChunk(5, 0, 1))  # a zero-length block
    assert "empty" in fails(requester(), PieceChunk(1, 0, 0))
    s = requester()
    s.receive_data(encode_exchange(PieceChunk(1, 0, 5)) + b"12345")
    assert "order" in fails(s, PieceChunk(1, 0, 5))
    fails(requester(), RejectBlock(0), PieceChunk(0, 0, 10))  # answered already


def test_nothing_is_buffered_for_a_block_we_did_not_ask_for() -> None:
    s = helloed(BIG)
    s.receive_data(encode_exchange(PieceChunk(1, 0, MAX_CHUNK)))
    with pytest.raises(RemoteProtocolError):
        s.next_event()
    s.receive_data(b"\x00" * MAX_CHUNK)  # ignored: the session failed
    assert len(s._buf) < 64


def test_hash_requests_are_bounded_and_hashes_must_be_asked_for() -> None:
    s = helloed(max_peer_hash_requests=2)
    assert feed(s, frames(HashesRequest(1), HashesRequest(1))) == [HashesRequest(1)] * 2
    assert "too many" in fails(s, HashesRequest(0))
    s = helloed(max_peer_hash_requests=1)
    feed(s, frames(HashesRequest(1)))
    s.send(Hashes(1, b""))
    assert feed(s, frames(HashesRequest(0))) == [HashesRequest(0)]

    assert "not asked" in fails(helloed(), Hashes(0, b"\x00" * 32))
    s = helloed()
    s.send(HashesRequest(1))
    assert "length" in fails(s, Hashes(1, b"\x00" * 32 * 3))
    s = helloed()
    s.send(HashesRequest(1))
    assert "not asked" in fails(s, Hashes(1, b""), Hashes(1, b""))  # one answer per request


def test_oversized_frame_is_refused_before_it_arrives() -> None:
    s = helloed()
    s.receive_data((MAX_FRAME + 1).to_bytes(4, "big"))
    with pytest.raises(RemoteProtocolError):
        s.next_event()


def test_garbage_frames_are_remote_errors() -> None:
    for body in (b"", b"\xc1", b"\x81\xa1t", b"\x81\x01\x02", b"\xa5hello"):
        s = helloed()
        with pytest.raises(RemoteProtocolError):
            feed(s, len(body).to_bytes(4, "big") + body)


@settings(max_examples=300)
@given(st.binary(max_size=400))
def test_random_bytes_are_only_ever_a_remote_protocol_error(data: bytes) -> None:
    for s in (helloed(), requester()):
        try:
            feed(s, data)
            feed(s, len(data).to_bytes(4, "big") + data)
        except RemoteProtocolError:
            pass
        check_invariants(s)


SMALL_INDICES = st.integers(min_value=0, max_value=TOTAL + 2)
SESSION_MESSAGES = st.one_of(
    st.builds(Hello, st.just(CID), st.just(TOTAL)),
    st.builds(Bitfield, st.integers(0, 3).map(lambda i: 8 * i), st.binary(max_size=4)),
    st.builds(HaveBlocks, st.lists(SMALL_INDICES, max_size=5).map(tuple)),
    st.sampled_from([Interested(), NotInterested(), Choke(), Unchoke()]),
    st.builds(RequestBlock, SMALL_INDICES),
    st.builds(CancelBlock, SMALL_INDICES),
    st.builds(RejectBlock, SMALL_INDICES),
    st.builds(PieceChunk, SMALL_INDICES, st.integers(0, 70), st.integers(0, 70)),
    st.builds(HashesRequest, st.integers(0, 6)),
    st.builds(Hashes, st.integers(0, 6), st.sampled_from([b"", b"\x00" * 32, b"\x00" * 128])),
    st.builds(PeerExchange, st.lists(st.text(max_size=5), max_size=2).map(tuple)),
    st.builds(Error, st.sampled_from(ErrorCode), st.text(max_size=5)),
)


@settings(max_examples=300)
@given(st.lists(st.tuples(SESSION_MESSAGES, st.binary(max_size=80)), max_size=20))
def test_random_well_formed_messages_are_only_ever_a_remote_protocol_error(
    script: list[tuple[ExchangeMessage, bytes]],
) -> None:
    s = requester()
    s.send(HashesRequest(1))
    try:
        for msg, body in script:
            s.receive_data(encode_exchange(msg))
            if isinstance(msg, PieceChunk):
                s.receive_data(body[: msg.size])
            drain(s)
            check_invariants(s)
    except RemoteProtocolError:
        pass
    check_invariants(s)


# ---- send rules: our own bugs ------------------------------------------------------


def local_error(s: ExchangeSession, action: Callable[[ExchangeSession], object]) -> None:
    before = (dict(s.our_requests), set(s.cancelled), dict(s.peer_requests), s.am_choking, s.closed)
    with pytest.raises(LocalProtocolError):
        action(s)
    assert (dict(s.our_requests), set(s.cancelled), dict(s.peer_requests), s.am_choking, s.closed) == before


def test_first_message_sent_must_be_our_hello() -> None:
    with pytest.raises(ValueError):
        ExchangeSession(LAYOUT, "not a cid")
    local_error(ExchangeSession(LAYOUT, CID), lambda s: s.send(Interested()))
    local_error(ExchangeSession(LAYOUT, CID), lambda s: s.send(Hello(OTHER_CID, TOTAL)))
    local_error(ExchangeSession(LAYOUT, CID), lambda s: s.send(Hello(CID, TOTAL - 1)))
    local_error(helloed(), lambda s: s.send(Hello(CID, TOTAL)))


@pytest.mark.parametrize(
    "action",
    [
        lambda s: s.send(RequestBlock(8)),  # choked
        lambda s: s.send(CancelBlock(8)),  # not requested
        lambda s: s.send(RejectBlock(8)),  # not requested by the peer
        lambda s: s.send(PieceChunk(0, 0, 1)),  # chunks go through send_chunk
        lambda s: s.send_chunk(8, 0, b"x"),
        lambda s: s.send(HaveBlocks((TOTAL,))),
        lambda s: s.send(HaveBlocks((-1,))),
        lambda s: s.send(Bitfield(16, b"\x3f")),
        lambda s: s.send(Bitfield(32, b"")),
        lambda s: s.send(HashesRequest(len(SIZES))),
        lambda s: s.send(Hashes(0, b"")),  # not asked
        lambda s: s.send(PeerExchange(("x" * 301,))),
        lambda s: s.send("choke"),
        lambda s: s.send(BlockReceived(0, b"")),
    ],
)
def test_send_rules(action: Callable[[ExchangeSession], object]) -> None:
    local_error(helloed(), action)


def test_our_requests_are_in_range_and_not_repeated() -> None:
    s = requester()  # 0..6 requested
    local_error(s, lambda s: s.send(RequestBlock(3)))
    local_error(s, lambda s: s.send(RequestBlock(TOTAL)))
    local_error(s, lambda s: s.send(RequestBlock(-1)))
    s.send(RequestBlock(17))
    assert list(s.our_requests) == [0, 1, 2, 3, 4, 5, 6, 17]


def test_chunks_we_send_must_answer_a_request_in_order_and_within_bounds() -> None:
    s = helloed(BIG)
    feed(s, frames(RequestBlock(1), RequestBlock(5), RequestBlock(0)))
    data = b"\x00" * (MAX_CHUNK + 1)
    local_error(s, lambda s: s.send_chunk(1, 0, data))  # too big
    local_error(s, lambda s: s.send_chunk(1, 0, b""))  # empty
    local_error(s, lambda s: s.send_chunk(1, 5, b"x"))  # out of order
    local_error(s, lambda s: s.send_chunk(0, 0, b"x" * 11))  # past the end
    local_error(s, lambda s: s.send_chunk(5, 0, b"x"))  # a zero-length block
    s.send_chunk(1, 0, data[:MAX_CHUNK])
    local_error(s, lambda s: s.send(RejectBlock(1)))  # started
    assert s.send_chunk(5, 0, b"").endswith(b"\x00")
    s.send_chunk(0, 0, b"x" * 10)
    assert s.peer_requests == {1: MAX_CHUNK}


def test_hashes_we_send_must_answer_a_request_with_the_right_length() -> None:
    s = helloed()
    feed(s, frames(HashesRequest(4)))
    local_error(s, lambda s: s.send(Hashes(4, b"\x00" * 32)))
    local_error(s, lambda s: s.send(Hashes(3, b"\x00" * 32)))
    s.send(Hashes(4, b"\x00" * 32 * 11))
    local_error(s, lambda s: s.send(Hashes(4, b"")))


def test_nothing_is_sent_after_a_goodbye() -> None:
    s = helloed()
    feed(s, frames(RequestBlock(0), Error(ErrorCode.INTERNAL, "bye")))
    assert s.closed
    local_error(s, lambda s: s.send_chunk(0, 0, b"x" * 10))
    local_error(s, lambda s: s.send(Error(ErrorCode.INTERNAL, "bye")))


def test_after_a_remote_error_we_may_still_say_goodbye() -> None:
    s = helloed()
    fails(s, RequestBlock(TOTAL))
    assert s.send(Error(ErrorCode.BAD_REQUEST, "out of range")) == encode_exchange(
        Error(ErrorCode.BAD_REQUEST, "out of range")
    )
    assert s.closed


def test_read_buffer_is_compacted() -> None:
    s = requester()
    for _ in range(2000):  # many small frames: the buffer does not grow with the stream
        s.receive_data(encode_exchange(HaveBlocks((1,))) * 10)
        assert len(drain(s)) == 10
    assert len(s._buf) < 1024


def test_read_buffer_is_compacted_behind_a_partial_frame() -> None:
    s = helloed()
    have = encode_exchange(HaveBlocks((1,)))
    for _ in range(20):  # each read: many frames and the head of the next one
        s.receive_data(have * 5000 + have[:7])
        assert len(drain(s)) == 5000
        s.receive_data(have[7:])
        assert drain(s) == [HaveBlocks((1,))]
    assert len(s._buf) < 4 * len(have) * 5000


def test_hash_requests_for_the_same_file_are_answered_one_by_one() -> None:
    s = helloed()
    feed(s, frames(HashesRequest(1), HashesRequest(1)))
    s.send(Hashes(1, b""))
    assert s.peer_hash_requests == {1: 1}
    s.send(Hashes(1, b"\x00" * 32 * 4))
    assert s.peer_hash_requests == {}


def test_digests_of_a_file_too_big_for_one_frame_cannot_be_sent() -> None:
    # 2048 blocks of digests (a 2 GiB file) do not fit a 64 KiB frame: blocks.py caps fragments at 1 GiB.
    with pytest.raises(ValueError):
        encode_exchange(Hashes(0, b"\x00" * 32 * 2048))
    s = helloed(BlockLayout([2048 * BS], [True], block_size=BS))
    feed(s, frames(HashesRequest(0)))
    local_error(s, lambda s: s.send(Hashes(0, b"\x00" * 32 * 2048)))
    assert s.peer_hash_requests == {0: 1}


def test_a_have_skips_an_interested_holder_but_reaches_a_super_seed() -> None:
    p = Pair()
    p.hello()
    p.send(p.a, HaveBlocks((1, 2)))  # a holds 1 and 2 (a puller, or a super-seed showing part)
    assert hears_have(p.b, 0)  # a lacks it
    assert hears_have(p.b, 1)  # a holds it but wants nothing of ours: a super-seed counts its shares by HAVEs
    p.send(p.a, Interested())  # a puller that wants what b holds
    assert not hears_have(p.b, 1) and not hears_have(p.b, 2)  # it cannot want these
    assert hears_have(p.b, 3)
    p.send(p.a, NotInterested())
    assert hears_have(p.b, 2)
