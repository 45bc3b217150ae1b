"""The peer session of protocol v2: everything that affects state transitions lives in this file.

An `ExchangeSession` is one end of one long-lived stream between two peers,
with no I/O (h11's shape): bytes read from the stream go in with
`receive_data`, events come out of `next_event` (None: it needs more bytes);
messages go in with `send` / `send_chunk`, and the bytes to write come out.
Whatever the peer does wrong raises `RemoteProtocolError` (the node ends the
stream and may ban the peer); whatever we do wrong raises `LocalProtocolError`
(a bug of ours, never the peer's fault).

Theory of operation.

- Both sides open with `Hello` (same model, same block count); `Error` is a
  fatal goodbye allowed at any time, after which nothing more is parsed or sent.
- Availability grows with `Bitfield` and `HaveBlocks`; only `Lost` (a file
  the peer found bad on disk and dropped) takes blocks out of `peer_have`.
- Every request is answered exactly once: all of its chunks, in order, or one
  `RejectBlock` sent before any chunk. `CancelBlock` is only a hint: the
  cancelled request stays pending until its answer arrives, so both sides
  always agree on what is pending, and a late chunk is never a surprise.
  Choking rejects every request not started; a started one is finished.
- Chunks of different blocks may interleave; each block's chunks come in
  order. The raw bytes of a chunk follow its frame directly, so while a body
  is due no frame is parsed. Bodies are kept per block as the bytes objects
  they arrived in when possible and joined once, into `BlockReceived.data`;
  nothing is buffered for a block we did not ask for.
- The read buffer is consumed through an offset and compacted only when it is
  empty or mostly consumed: linear in the bytes received, whatever the reads.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .cid import InvalidCID, digest_of_cid
from .exchange import (
    MAX_CHUNK,
    Bitfield,
    CancelBlock,
    Choke,
    ExchangeMessage,
    Hashes,
    HashesRequest,
    HaveBlocks,
    Hello,
    Interested,
    Lost,
    NotInterested,
    PeerExchange,
    PieceChunk,
    RejectBlock,
    RequestBlock,
    Unchoke,
    decode_exchange_body,
    encode_chunk_header,
    encode_exchange,
)
from .framing import MAX_FRAME
from .layout import BlockLayout
from .messages import Error, ProtocolError

_LEN = struct.Struct(">I")
_COMPACT_AT = 1 << 16  # consumed bytes kept at the head of the read buffer before it is compacted


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol; the session is dead (the node may ban the peer)."""


class LocalProtocolError(Exception):
    """We misused the session: a bug of ours, not the peer's."""


@dataclass(frozen=True)
class BlockReceived:
    block: int
    data: bytes  # the whole block, every chunk of it; not yet checked against its digest


Event = (
    Hello
    | Bitfield
    | HaveBlocks
    | Lost
    | Interested
    | NotInterested
    | Choke
    | Unchoke
    | RequestBlock
    | CancelBlock
    | RejectBlock
    | BlockReceived
    | HashesRequest
    | Hashes
    | PeerExchange
    | Error
)


class ExchangeSession:
    def __init__(
        self,
        layout: BlockLayout,
        model_cid: str,
        *,
        max_peer_requests: int = 64,
        max_peer_hash_requests: int = 16,
    ) -> None:
        try:
            digest_of_cid(model_cid)
        except InvalidCID:
            raise ValueError(f"not a model CID: {model_cid!r}") from None
        self.layout = layout
        self.model_cid = model_cid
        self.max_peer_requests = max_peer_requests
        self.max_peer_hash_requests = max_peer_hash_requests

        self.am_choking = True
        self.am_interested = False
        self.peer_choking = True
        self.peer_interested = False
        self.peer_have = bytearray((layout.total_blocks + 7) // 8)  # MSB first, as BitTorrent
        self.peer_have_count = 0
        self.our_requests: dict[int, int] = {}  # block -> bytes received; asked by us, unanswered
        self.cancelled: set[int] = set()  # of our_requests, those we sent CancelBlock for
        self.peer_requests: dict[int, int] = {}  # block -> bytes sent; asked by the peer, unanswered
        self.our_hash_requests: dict[int, int] = {}  # file -> HashesRequest we sent, unanswered
        self.peer_hash_requests: dict[int, int] = {}  # file -> HashesRequest received, unanswered
        self.hello_sent = False
        self.hello_received = False
        self.closed = False  # an Error went one way or the other

        self._buf = bytearray()
        self._pos = 0  # bytes of _buf already consumed
        self._pieces: dict[int, list[bytes]] = {}  # block -> body bytes received so far
        self._body_block: int | None = None  # a chunk body is due for this block
        self._body_left = 0  # bytes of it still to come
        self._body_last = False  # it is the block's final chunk
        self._peer_hash_pending = 0
        self._failure: str | None = None  # why the peer was found at fault

    # ---- state the node reads -------------------------------------------

    def peer_has(self, block: int) -> bool:
        if not 0 <= block < self.layout.total_blocks:
            raise IndexError(f"block {block} out of range")
        return bool(self.peer_have[block >> 3] & (0x80 >> (block & 7)))

    # ---- receiving ---------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes read from the stream. Ignored once the session is closed or failed."""
        if self.closed or self._failure is not None or not data:
            return
        if self._body_left and self._pos == len(self._buf):
            # A body is due and nothing is buffered ahead of it: take it from `data`
            # as is (no copy when the whole read is body, the common case).
            view = memoryview(data)
            take = min(len(view), self._body_left)
            self._take_body(data if take == len(view) and type(data) is bytes else bytes(view[:take]))
            if take == len(view):
                return
            data = view[take:]
        if self._pos:
            if self._pos == len(self._buf):
                self._buf.clear()
                self._pos = 0
            elif self._pos >= _COMPACT_AT and 2 * self._pos >= len(self._buf):
                del self._buf[: self._pos]
                self._pos = 0
        self._buf += data

    def next_event(self) -> Event | None:
        """The next event, or None when more bytes are needed. Raises RemoteProtocolError."""
        if self._failure is not None:
            raise RemoteProtocolError(f"session already failed: {self._failure}")
        if self.closed:
            return None
        try:
            return self._next_event()
        except ProtocolError as e:
            self._failure = str(e)
            if isinstance(e, RemoteProtocolError):
                raise
            raise RemoteProtocolError(str(e)) from None

    def _next_event(self) -> Event | None:
        while True:
            if self._body_block is not None:
                if self._body_left:
                    avail = len(self._buf) - self._pos
                    if not avail:
                        return None
                    take = min(avail, self._body_left)
                    with memoryview(self._buf) as view:
                        self._take_body(bytes(view[self._pos : self._pos + take]))
                    self._pos += take
                    if self._body_left:
                        return None
                block = self._body_block
                self._body_block = None
                if self._body_last:
                    return self._complete(block)
            msg = self._next_frame()
            if msg is None:
                return None
            event = self._receive(msg)
            if event is not None:
                return event

    def _take_body(self, piece: bytes) -> None:
        block = self._body_block
        assert block is not None
        self._pieces[block].append(piece)
        self.our_requests[block] += len(piece)
        self._body_left -= len(piece)

    def _complete(self, block: int) -> BlockReceived:
        del self.our_requests[block]
        self.cancelled.discard(block)
        return BlockReceived(block, b"".join(self._pieces.pop(block, ())))

    def _next_frame(self) -> ExchangeMessage | None:
        buf, pos = self._buf, self._pos
        if len(buf) - pos < 4:
            return None
        (n,) = _LEN.unpack_from(buf, pos)
        if n > MAX_FRAME:
            raise RemoteProtocolError(f"frame of {n} bytes exceeds the {MAX_FRAME}-byte cap")
        end = pos + 4 + n
        if len(buf) < end:
            return None
        with memoryview(buf) as view:
            body = bytes(view[pos + 4 : end])
        self._pos = end
        return decode_exchange_body(body)

    def _receive(self, msg: ExchangeMessage) -> Event | None:
        """Apply one well-formed message from the peer; None for a chunk frame (its body is due)."""
        if isinstance(msg, Error):
            self.closed = True
            return msg
        if not self.hello_received:
            if not isinstance(msg, Hello):
                raise RemoteProtocolError(f"first message is {type(msg).__name__}, not Hello")
            if msg.model_cid != self.model_cid:
                raise RemoteProtocolError("hello names another model")
            if msg.blocks != self.layout.total_blocks:
                raise RemoteProtocolError("hello disagrees on the number of blocks")
            self.hello_received = True
            return msg
        if isinstance(msg, PieceChunk):
            return self._receive_chunk(msg)
        if isinstance(msg, RequestBlock):
            if msg.block >= self.layout.total_blocks:
                raise RemoteProtocolError("request for a block out of range")
            if msg.block in self.peer_requests:
                raise RemoteProtocolError("block requested twice")
            if len(self.peer_requests) >= self.max_peer_requests:
                raise RemoteProtocolError("too many requests pending")
            self.peer_requests[msg.block] = 0
        elif isinstance(msg, CancelBlock):
            if msg.block >= self.layout.total_blocks:
                raise RemoteProtocolError("cancel of a block out of range")
        elif isinstance(msg, RejectBlock):
            received = self.our_requests.get(msg.block)
            if received is None:
                raise RemoteProtocolError("reject of a block not requested")
            if received:
                raise RemoteProtocolError("reject of a block partly sent")
            del self.our_requests[msg.block]
            self.cancelled.discard(msg.block)
        elif isinstance(msg, HaveBlocks):
            if msg.blocks and max(msg.blocks) >= self.layout.total_blocks:
                raise RemoteProtocolError("have of a block out of range")
            self._add_have(msg.blocks)
        elif isinstance(msg, Lost):
            if msg.file >= self.layout.file_count:
                raise RemoteProtocolError("lost a file out of range")
            self._remove_file(msg.file)
        elif isinstance(msg, Bitfield):
            problem = self._bitfield_problem(msg)
            if problem:
                raise RemoteProtocolError(problem)
            self._add_bitfield(msg)
        elif isinstance(msg, Choke):
            self.peer_choking = True
        elif isinstance(msg, Unchoke):
            self.peer_choking = False
        elif isinstance(msg, Interested):
            self.peer_interested = True
        elif isinstance(msg, NotInterested):
            self.peer_interested = False
        elif isinstance(msg, HashesRequest):
            if msg.file >= self.layout.file_count:
                raise RemoteProtocolError("hashes asked for a file out of range")
            if self._peer_hash_pending >= self.max_peer_hash_requests:
                raise RemoteProtocolError("too many hash requests pending")
            self.peer_hash_requests[msg.file] = self.peer_hash_requests.get(msg.file, 0) + 1
            self._peer_hash_pending += 1
        elif isinstance(msg, Hashes):
            if not self.our_hash_requests.get(msg.file):
                raise RemoteProtocolError("hashes not asked for")
            if len(msg.digests) not in (0, 32 * len(self.layout.file_blocks(msg.file))):
                raise RemoteProtocolError("hashes of the wrong length")
            _decrement(self.our_hash_requests, msg.file)
        elif isinstance(msg, Hello):
            raise RemoteProtocolError("second hello")
        # PeerExchange: nothing to check beyond the codec
        return msg

    def _receive_chunk(self, msg: PieceChunk) -> BlockReceived | None:
        received = self.our_requests.get(msg.block)
        if received is None:
            raise RemoteProtocolError("chunk of a block not requested")
        if msg.offset != received:
            raise RemoteProtocolError("chunk out of order")
        length = self.layout.block_length(msg.block)
        if msg.offset + msg.size > length:
            raise RemoteProtocolError("chunk runs past the end of its block")
        if msg.size == 0:
            if length:
                raise RemoteProtocolError("empty chunk")
            return self._complete(msg.block)  # a zero-length block: one empty chunk
        self._pieces.setdefault(msg.block, [])
        self._body_block = msg.block
        self._body_left = msg.size
        self._body_last = msg.offset + msg.size == length
        return None

    def _bitfield_problem(self, msg: Bitfield) -> str | None:
        end = msg.first + 8 * len(msg.bits)
        if msg.first % 8 or end > 8 * len(self.peer_have):
            return "bitfield runs past the last block"
        spare = end - self.layout.total_blocks
        if spare > 0 and msg.bits and msg.bits[-1] & ((1 << spare) - 1):
            return "bitfield has bits set past the last block"
        return None

    def _add_bitfield(self, msg: Bitfield) -> None:
        lo = msg.first // 8
        hi = lo + len(msg.bits)
        old = int.from_bytes(self.peer_have[lo:hi], "big")
        new = int.from_bytes(msg.bits, "big")
        self.peer_have_count += (new & ~old).bit_count()
        self.peer_have[lo:hi] = (old | new).to_bytes(len(msg.bits), "big")

    def _remove_file(self, file: int) -> None:
        have = self.peer_have
        for b in self.layout.file_blocks(file):
            bit = 0x80 >> (b & 7)
            if have[b >> 3] & bit:
                have[b >> 3] &= ~bit & 0xFF
                self.peer_have_count -= 1

    def _add_have(self, blocks: tuple[int, ...]) -> None:
        have = self.peer_have
        for b in blocks:
            mask = 0x80 >> (b & 7)
            if not have[b >> 3] & mask:
                have[b >> 3] |= mask
                self.peer_have_count += 1

    # ---- sending -----------------------------------------------------------

    def send(self, msg: ExchangeMessage) -> bytes:
        """The bytes of `msg` (and of what it implies) to write; LocalProtocolError if not allowed now."""
        if self.closed:
            raise LocalProtocolError("session is closed")
        data = self._encode(msg)  # checks every field; state is checked below, then changed
        if isinstance(msg, Error):
            self.closed = True
            return data
        if not self.hello_sent:
            if not isinstance(msg, Hello):
                raise LocalProtocolError(f"first message sent is {type(msg).__name__}, not Hello")
            if msg.model_cid != self.model_cid or msg.blocks != self.layout.total_blocks:
                raise LocalProtocolError("hello must name our model and its block count")
            self.hello_sent = True
            return data
        total = self.layout.total_blocks
        if isinstance(msg, Hello):
            raise LocalProtocolError("hello sent twice")
        if isinstance(msg, PieceChunk):
            raise LocalProtocolError("chunks are sent with send_chunk")
        if isinstance(msg, RequestBlock):
            if msg.block >= total:
                raise LocalProtocolError("request for a block out of range")
            if msg.block in self.our_requests:
                raise LocalProtocolError("block already requested")
            if self.peer_choking:
                raise LocalProtocolError("request while the peer chokes us")
            self.our_requests[msg.block] = 0
        elif isinstance(msg, CancelBlock):
            if msg.block not in self.our_requests:
                raise LocalProtocolError("cancel of a block not requested")
            self.cancelled.add(msg.block)
        elif isinstance(msg, RejectBlock):
            if msg.block not in self.peer_requests:
                raise LocalProtocolError("reject of a block not requested")
            if self.peer_requests[msg.block]:
                raise LocalProtocolError("reject of a block partly sent")
            del self.peer_requests[msg.block]
        elif isinstance(msg, Choke):
            unstarted = [b for b, sent in self.peer_requests.items() if not sent]
            for b in unstarted:
                del self.peer_requests[b]
            self.am_choking = True
            return data + b"".join(encode_exchange(RejectBlock(b)) for b in unstarted)
        elif isinstance(msg, Unchoke):
            self.am_choking = False
        elif isinstance(msg, Interested):
            self.am_interested = True
        elif isinstance(msg, NotInterested):
            self.am_interested = False
        elif isinstance(msg, HaveBlocks):
            if msg.blocks and max(msg.blocks) >= total:
                raise LocalProtocolError("have of a block out of range")
        elif isinstance(msg, Lost):
            if msg.file >= self.layout.file_count:
                raise LocalProtocolError("lost a file out of range")
        elif isinstance(msg, Bitfield):
            problem = self._bitfield_problem(msg)
            if problem:
                raise LocalProtocolError(problem)
        elif isinstance(msg, HashesRequest):
            if msg.file >= self.layout.file_count:
                raise LocalProtocolError("hashes asked for a file out of range")
            self.our_hash_requests[msg.file] = self.our_hash_requests.get(msg.file, 0) + 1
        elif isinstance(msg, Hashes):
            if not self.peer_hash_requests.get(msg.file):
                raise LocalProtocolError("hashes not asked for")
            if len(msg.digests) not in (0, 32 * len(self.layout.file_blocks(msg.file))):
                raise LocalProtocolError("hashes of the wrong length")
            _decrement(self.peer_hash_requests, msg.file)
            self._peer_hash_pending -= 1
        # PeerExchange: nothing to check beyond the codec
        return data

    def send_chunk(self, block: int, offset: int, data: bytes | bytearray | memoryview) -> bytes:
        """A chunk frame followed by `data`, the next bytes of a block the peer requested."""
        if self.closed:
            raise LocalProtocolError("session is closed")
        sent = self.peer_requests.get(block)
        if sent is None:
            raise LocalProtocolError("chunk of a block not requested")
        if offset != sent:
            raise LocalProtocolError("chunk out of order")
        size = memoryview(data).nbytes
        length = self.layout.block_length(block)
        if size > MAX_CHUNK or offset + size > length or (size == 0 and length):
            raise LocalProtocolError("chunk size out of bounds")
        frame = encode_chunk_header(block, offset, size) + data
        if offset + size == length:
            del self.peer_requests[block]
        else:
            self.peer_requests[block] = offset + size
        return frame

    def _encode(self, msg: ExchangeMessage) -> bytes:
        try:
            return encode_exchange(msg)
        except (TypeError, ValueError) as e:
            raise LocalProtocolError(str(e)) from None


def _decrement(counts: dict[int, int], key: int) -> None:
    if counts[key] == 1:
        del counts[key]
    else:
        counts[key] -= 1
