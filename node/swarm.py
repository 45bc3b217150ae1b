"""One model's swarm: a long-lived exchange session with every peer that holds or wants it.

Theory of operation (BitTorrent's peer wire, on libp2p streams):
- One stream per peer and model (`/gguf-swarm/2.0.0`), both directions. Its
  rules live in the sans-IO `protocol.session.ExchangeSession`; this module
  only moves bytes and makes decisions. Per link, a reader task feeds the
  session and handles its events without ever waiting on a write, and a
  writer task owns every write: control frames first, in the order the
  session produced them, then the next 64 KiB chunk of the block being
  uploaded, so a HAVE or a request is never stuck behind a whole block.
- Haves are pushed: the held blocks once, then a HAVE per newly verified
  block. Nothing is polled, so an idle peer costs nothing.
- What to fetch: the pure `BlockPicker` (rarest first, block-level endgame);
  how much to queue on a peer: its measured rate times a short horizon.
- Whom to serve: the pure `Choker` (tit-for-tat while downloading, round
  robin while seeding, one rotating optimistic unchoke).
- A seed holding the whole model shows concurrent pullers disjoint shares of
  what it has not sent yet (`SuperSeeding`), so its upload goes out about once.
- Blocks are checked against the file's block digests (fetched once per file,
  checked against the manifest's block_root) on a worker thread and written
  into a partial file; a completed file is checked whole and renamed.
- A peer that sends a bad block or breaks the protocol is banned; one that
  keeps refusing what it claims, or goes silent with requests pending, is dropped.
- Peers tell each other of other peers (PeerExchange), and of their own
  listen addresses, so a swarm forms without a DHT round trip per peer.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import multiaddr
import trio
from libp2p.abc import INetStream
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.stream_muxer.yamux.yamux import HEADER_SIZE as YAMUX_HEADER_SIZE

from protocol import MAX_CHUNK, Error
from protocol.exchange import (
    EXCHANGE_PROTOCOL_ID,
    MAX_BITFIELD_BYTES,
    MAX_HAVE_BATCH,
    MAX_PEX,
    Bitfield,
    CancelBlock,
    Choke,
    Hashes,
    HashesRequest,
    HaveBlocks,
    Hello,
    Interested,
    Lost,
    NotInterested,
    PeerExchange,
    RejectBlock,
    RequestBlock,
    Unchoke,
)
from protocol.session import BlockReceived, ExchangeSession, LocalProtocolError, RemoteProtocolError

from .blockstore import BadManifest, ModelBlocks
from .byte_budget import ByteBudget
from .choker import Choker, PeerRates
from .host import PERMANENT_TTL
from .libp2p_patches.yamux import NOISE_MAX_PLAINTEXT
from .picker import BlockPicker, copy_saves_time
from .rates import RateMeter, UplinkUse
from .seeding import SuperSeeding
from .store import LocalModel

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger(__name__)

# A block goes out in writes of at most four Yamux DATA frames (each one Noise
# message, libp2p_patches/yamux.py), control frames that wait joined in front.
# A write of a 256 KiB chunk and its header was four full frames and a fifth of
# ~160 bytes: a Noise message, with all its per-message work at both ends, for
# every 256 KiB sent. So a chunk fills what is left of four frames, and a block
# ends in one short frame instead of four. A control frame waits at most one
# write behind a block.
CHUNK_WRITE = 4 * (NOISE_MAX_PLAINTEXT - YAMUX_HEADER_SIZE)
CHUNK_HEADER_MAX = 64  # a chunk frame's length prefix and msgpack header (46 bytes for 2**32 blocks)
MIN_JOINED_CHUNK = 64 * 1024  # less room than this after waiting control frames: they go alone first
TICK = 0.25
MAX_LINKS = 60  # sessions per model
MAX_DIALS = 8  # session dials in flight at once
MAX_KNOWN = 500  # peers remembered to dial (peer exchange cannot grow this without bound)
REQUEST_HORIZON = 0.4  # seconds of a peer's measured rate kept queued on it
MIN_QUEUE_BYTES = 2 << 20
MAX_PEER_REQUESTS = 64  # what a session accepts from a peer (ExchangeSession's default)
READ_BATCH = 1 << 20  # bytes of requested blocks read per worker-thread hop
REFILL_BATCH = 8  # a request queue limited by count is topped up this many at a time
HASHES_TIMEOUT = 10.0  # a digest list not sent by then is asked of another peer
HASH_REQUESTS = 12  # digest lists asked of one peer at once (the peer accepts 16)
RECEIVED_BYTES = 16 << 20  # received blocks held in memory while waiting to be checked and written
STRIKES = 8  # refusals of claimed blocks while unchoked, with nothing delivered, before a peer is dropped
# A peer shown its share by a super-seed that is still not interested after this
# long wants other blocks (a partial replica): it is shown everything.
UNINTERESTED_AFTER = 2.0
# A super-seed whose upload queues have been empty, or whose uplink has carried
# under half its best rate (rates.UplinkUse), this long has upload to spare:
# only then may it send a block a second time (node/seeding.py). Not at once:
# between one request and the next a busy queue is empty for a moment.
SPARE_AFTER = 0.5
DROP_FOR = 300.0  # a dropped peer is not dialled again for this long
WRITE_STALL = 60.0  # a peer that takes none of our bytes this long is dropped


@dataclass
class SwarmStats:
    bytes_fetched: int = 0
    blocks_fetched: int = 0
    blocks_rejected: int = 0  # received, but did not match their digest
    bytes_by_peer: dict[str, int] = field(default_factory=dict)
    bad_peers: set[str] = field(default_factory=set)
    bytes_uploaded: int = 0
    first_request: float | None = None
    last_block: float | None = None


class Want:
    """One caller's files (see ModelSwarm.want)."""

    def __init__(self, missing: set[int]) -> None:
        self.missing = missing  # files not in yet
        self.done = trio.Event()


class SwarmFailed(Exception):
    """The pull cannot go on (bad manifest, disk error, nothing left to fetch from)."""


class PeerLink:
    def __init__(self, peer: ID, stream: INetStream, session: ExchangeSession, initiator: ID, now: float) -> None:
        self.peer = peer
        self.stream = stream
        self.session = session
        self.initiator = initiator
        self.out: list[bytes] = []  # frames from the session, written in order by the writer
        self.wake = trio.Event()
        self.down = RateMeter()
        self.up = RateMeter()
        self.joined = now
        self.last_recv = now
        self.last_request: float | None = None
        self.uploaded_since_unchoke = 0
        self.uploading: set[int] = set()  # blocks the writer is reading or sending
        self.requested_at: dict[int, float] = {}  # our requests on this link -> when sent
        self.strikes = 0
        self.scope = trio.CancelScope()
        self.ready = False  # the peer's Hello arrived
        self.ready_at = now  # when it did
        self.bytes_in = 0  # on the wire, control frames included
        self.bytes_out = 0

    def send(self, msg: Any) -> None:
        if self.session.closed:
            return  # the peer said goodbye (or we did): run_link is tearing the link down
        self.out.append(self.session.send(msg))
        self.wake.set()


class ModelSwarm:
    def __init__(self, node: Node, model: LocalModel, blocks: ModelBlocks | None = None) -> None:
        self.node = node
        self.model = model
        self.blocks = blocks if blocks is not None else ModelBlocks(node.store, model)
        self.layout = self.blocks.layout
        self.stats = SwarmStats()
        self.links: dict[ID, PeerLink] = {}
        self.known: dict[ID, float] = {}  # peers to dial -> not before this time
        self.dropped: dict[ID, float] = {}  # peer -> until when it is not dialled or accepted
        self.choker = Choker(slots=node.config.unchoke_slots)
        # What this node fetches: nothing until a pull (or an adopter) asks for
        # files, so a partial replica serves its part without pulling the rest.
        self.picker: BlockPicker | None = None
        self.wanted: set[int] = set()  # files (fragment k; the header is file n)
        self.wanted_bytes = 0
        self.wanted_done = 0  # bytes of wanted files held (for progress)
        self._lost_told: set[int] = set()  # files we dropped (bad on disk) and told our peers of
        self._upload_busy_at = 0.0  # a super-seed: when its uplink was last busy
        self.uplink = UplinkUse()  # the node's upload, sampled each tick while we super-seed
        # Callers waiting for files: a few at once, so a file's waiters are found by
        # asking each (a list of waiters per file cost ~7 MB at 40,960 files).
        self._wants: list[Want] = []
        self.seeding: SuperSeeding | None = None
        if self.blocks.complete and node.config.serve.initial_seeding:
            self.seeding = SuperSeeding(
                [self.layout.block_length(b) for b in range(self.layout.total_blocks)],
                first=self.layout.file_blocks(self.blocks.n),  # the header: pullers build their tokenizer from it
            )
        self._dialing: set[ID] = set()
        self._dial_failures: dict[ID, int] = {}
        self.hash_asked: dict[int, tuple[ID, float]] = {}  # file -> (peer asked for its digests, when)
        self.parked: dict[int, list[tuple[ID, int, bytes]]] = {}  # file -> blocks waiting for its digests
        self.complete = trio.Event()  # every wanted block is in (replaced when more is wanted)
        self.complete.set()
        self.closed = trio.Event()  # run() has ended and the partial files are closed
        self.failure: Exception | None = None
        self.on_event: Callable[[dict[str, Any]], None] = lambda e: None
        self.on_file_complete: Callable[[int], None] = lambda k: None
        self._received = ByteBudget(RECEIVED_BYTES)
        # Blocks to check and write, in arrival order; one task takes all that
        # are waiting in one hop to a worker thread (a hop per block cost more
        # than the writes for 8 KiB fragments).
        self._to_write_in, self._to_write = trio.open_memory_channel[tuple[ID, int, bytes]](math.inf)
        self._last_progress = 0.0
        self._nursery: trio.Nursery
        self._scope: trio.CancelScope

    # ---- running -----------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._scope = nursery.cancel_scope
            nursery.start_soon(self._block_writer)
            task_status.started()
            try:
                while True:
                    self._tick(trio.current_time())
                    await trio.sleep(TICK)
            finally:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self.blocks.close)
                self.closed.set()

    def stop(self) -> None:
        """End every session and task of this swarm."""
        self._scope.cancel()

    def emit(self, event: dict[str, Any]) -> None:
        """An event for the caller's callback, which must never take the swarm down."""
        try:
            self.on_event(event)
        except Exception:
            log.exception("event callback failed on %r", event)

    def want(self, files: Iterable[int]) -> Want:
        """Fetch these files too (fragment k; the header is file n), from every
        peer with a session now or later. Wanting more after a pull ended starts
        a new picker from what the connected peers have told us. The returned
        handle's `done` is set when these files are in (or the swarm failed):
        each caller waits for its own files, whatever others want."""
        if self.failure is not None:
            raise SwarmFailed(str(self.failure))
        handle = Want({k for k in files if not self.blocks.file_complete(k)})
        if handle.missing:
            self.node.store.mark_pulling(self.model)  # before any block is written without fsync
            self._wants.append(handle)
        else:
            handle.done.set()
        # With no picker running, every missing file is fetched anew, even one wanted
        # before (held then, and dropped since as bad on disk).
        new = set(handle.missing) if self.picker is None else {k for k in handle.missing if k not in self.wanted}
        if not new:
            return handle
        layout, blocks = self.layout, self.blocks
        self.wanted_bytes += sum(layout.sizes[k] for k in new if k not in self.wanted)
        self.wanted |= new
        new_blocks = [b for k in sorted(new) for b in layout.file_blocks(k)]
        self.wanted_done += layout.block_bytes([b for b in new_blocks if blocks.has_block(b)])
        missing = [b for b in new_blocks if not blocks.has_block(b)]
        if self.picker is not None:
            self.picker.want(missing)
        else:
            wanted = {b for k in self.wanted for b in layout.file_blocks(k) if not blocks.has_block(b)}
            picker = BlockPicker(layout.total_blocks, (b for b in range(layout.total_blocks) if b not in wanted))
            # The header first: the tokenizer files are built from it while the rest arrives.
            picker.prioritize(layout.file_blocks(blocks.n))
            for link in self.links.values():
                session = link.session
                if session.peer_have_count == layout.total_blocks:
                    picker.peer_has_all(link.peer)
                elif session.peer_have_count:
                    picker.peer_has(link.peer, _bits_set(session.peer_have))
            self.picker = picker
            self.complete = trio.Event()
        self._dial_known(trio.current_time())
        return handle

    def unwant(self, handle: Want) -> None:
        """A caller gave up (cancelled, or its pull failed): its files that no
        other caller waits for are no longer fetched."""
        if handle in self._wants:
            self._wants.remove(handle)
        dropped: list[int] = []
        for k in handle.missing:
            if any(k in other.missing for other in self._wants):
                continue  # another caller still waits for it
            if k in self.wanted and not self.blocks.file_complete(k):
                self.wanted.discard(k)
                self.wanted_bytes -= self.layout.sizes[k]
                dropped.append(k)
        picker = self.picker
        if picker is not None and dropped:
            picker.unwant(b for k in dropped for b in self.layout.file_blocks(k) if not self.blocks.has_block(b))
            if picker.done and not self.complete.is_set():
                self._finished()

    def _file_done(self, file: int) -> None:
        for handle in list(self._wants):
            if file in handle.missing:
                handle.missing.discard(file)
                if not handle.missing:
                    handle.done.set()
                    self._wants.remove(handle)

    def add_peers(self, peers: list[ID]) -> None:
        now = trio.current_time()
        for peer in peers:
            if peer != self.node.peer_id and peer not in self.links:
                self.known.setdefault(peer, now)
        if self.picker is not None and not self.complete.is_set():
            self._dial_known(now)  # now, not at the next tick

    def fail(self, error: Exception) -> None:
        if self.failure is None:
            self.failure = error
        self.complete.set()
        for handle in self._wants:
            handle.done.set()  # its caller finds self.failure

    def _tick(self, now: float) -> None:
        if self.picker is not None and not self.complete.is_set():
            self._dial_known(now)
            self._check_stalls(now)
        self._rechoke(now, force=False)
        if self.seeding is not None:
            # After the first round `spare` is moot. Requests waiting in our
            # queues do not make the uplink busy if it carries half what it can.
            if self.seeding.active:
                self.uplink.sample(self.node.uploaded_bytes, now)
                if not self._upload_idle() and not self.uplink.underused():
                    self._upload_busy_at = now
            spare = now - self._upload_busy_at >= SPARE_AFTER
            for link in list(self.links.values()):
                if not link.ready:
                    continue
                if not link.session.peer_interested and now - link.ready_at >= UNINTERESTED_AFTER:
                    self._send_haves(link, self.seeding.uninterested(link.peer, now, spare))
                else:
                    self._reveal(link, now, spare)
        for link in list(self.links.values()):
            if link.ready:
                self._update_interest(link)
                self._fill(link)
        if self.picker is not None and now - self._last_progress >= 0.5:  # while pulling
            self._progress(now)

    def _progress(self, now: float) -> None:
        self._last_progress = now
        self.emit(
            {
                "event": "progress",
                "done": self.wanted_done,
                "total": self.wanted_bytes,
                "peers": len(self.links),
                "fragments_done": sum(self.model.have),
                "fragments": len(self.model.have),
                "blocks_done": self.blocks.have_count,
                "blocks": self.layout.total_blocks,
            }
        )

    def _check_stalls(self, now: float) -> None:
        stall = self.node.config.peer_stall_timeout
        for link in list(self.links.values()):
            pending = link.session.our_requests
            for block in [b for b in link.requested_at if b not in pending]:
                del link.requested_at[block]  # answered
            if link.requested_at and now - min(link.requested_at.values()) > stall:
                self._drop(link, f"left a request unanswered for {stall:.0f} s")  # BitTorrent's snubbed peer
        for file, (peer, asked) in list(self.hash_asked.items()):
            if peer not in self.links or now - asked > HASHES_TIMEOUT:
                del self.hash_asked[file]  # ask someone else, at the next need
                if file in self.parked:
                    self._ask_hashes_elsewhere(file, exclude=peer)
        for file in list(self.parked):
            if file not in self.hash_asked:
                self._ask_hashes_elsewhere(file, exclude=None)
        for peer, until in list(self.dropped.items()):
            if until < now:
                del self.dropped[peer]

    # ---- dialling and accepting -------------------------------------------

    def _dial_known(self, now: float) -> None:
        for peer, not_before in list(self.known.items()):
            if len(self.links) + len(self._dialing) >= MAX_LINKS or len(self._dialing) >= MAX_DIALS:
                return
            if peer in self.links or peer in self.node.banned or self.dropped.get(peer, 0) > now or not_before > now:
                continue
            self.known[peer] = now + 30.0  # next attempt, if this one fails
            self._dialing.add(peer)
            self._nursery.start_soon(self._dial, peer)

    async def _dial(self, peer: ID) -> None:
        try:
            with trio.fail_after(10):
                stream = await self.node.host.new_stream(peer, [EXCHANGE_PROTOCOL_ID])
        except Exception as e:
            log.info("cannot open a session with %s: %r", peer, e)
            self._dial_failures[peer] = failures = self._dial_failures.get(peer, 0) + 1
            if failures >= 3:
                self.known.pop(peer, None)  # gone, or never there: a PEX entry costs nothing more
            return
        finally:
            self._dialing.discard(peer)
        self._dial_failures.pop(peer, None)
        self.known.pop(peer, None)
        await self.run_link(stream, initiator=True)

    def accept(self, stream: INetStream, first_bytes: bytes) -> None:
        """An inbound session whose Hello (in first_bytes) names this model."""
        self._nursery.start_soon(self.run_link, stream, False, first_bytes)

    async def run_link(self, stream: INetStream, initiator: bool, first_bytes: bytes = b"") -> None:
        peer = stream.muxed_conn.peer_id
        now = trio.current_time()
        log.debug("session with %s starting (we opened it: %s)", peer, initiator)
        if peer in self.node.banned or self.dropped.get(peer, 0) > now or len(self.links) >= MAX_LINKS:
            await _reset(stream)
            return
        opener = self.node.peer_id if initiator else peer
        existing = self.links.get(peer)
        if existing is not None:
            # Both sides dialled: keep the session opened by the smaller peer id, on both ends.
            keep_new = str(opener) < str(existing.initiator)
            if not keep_new:
                await _reset(stream)
                return
            existing.scope.cancel()
        session = ExchangeSession(self.layout, self.model.cid)
        link = PeerLink(peer, stream, session, opener, now)
        self.links[peer] = link
        try:
            with link.scope:
                link.send(Hello(self.model.cid, self.layout.total_blocks))
                self._send_own_addrs(link)
                if first_bytes:
                    session.receive_data(first_bytes)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer, link)
                    await self._reader(link)
                    nursery.cancel_scope.cancel()
        except Exception as group:
            self._link_failed(peer, _first_leaf(group))
        finally:
            if self.links.get(peer) is link:
                del self.links[peer]
                if self.picker is not None:
                    self.picker.remove_peer(peer)
                if self.seeding is not None:
                    self.seeding.leave(peer)
                if self.picker is not None and not self.complete.is_set():
                    self.known.setdefault(peer, trio.current_time() + 2.0)  # redial, unless dropped or banned
            elif self.picker is not None:  # replaced by a newer session: its requests will never be answered
                for block in list(link.session.our_requests):
                    self.picker.rejected(peer, block)
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await _reset(stream)

    def _link_failed(self, peer: ID, e: BaseException) -> None:
        if isinstance(e, RemoteProtocolError):
            self._ban(peer, f"broke the protocol: {e}")
        elif isinstance(e, LocalProtocolError):
            log.error("our own protocol bug in the session with %s", peer, exc_info=e)
        elif isinstance(e, BadManifest):
            self.fail(SwarmFailed(str(e)))
        else:  # the peer went away: StreamClosed, TooSlowError, a reset socket, or one of libp2p's many kinds
            log.info("session with %s ended: %r", peer, e)

    def _send_own_addrs(self, link: PeerLink) -> None:
        addrs = tuple(a for a in self.node.addrs() if len(a) <= 300)[:MAX_PEX]
        if addrs:
            link.send(PeerExchange(addrs))

    # ---- the writer: control frames first, then chunks of the block being uploaded

    async def _writer(self, link: PeerLink) -> None:
        while True:
            if link.out:
                data = b"".join(link.out)
                link.out.clear()
                await self._write(link, data)
                continue
            blocks = self._next_uploads(link)
            if not blocks:
                link.wake = trio.Event()
                await link.wake.wait()
                continue
            link.uploading = set(blocks)
            # Several requested blocks read in one worker-thread hop: a hop per
            # 8 KiB block cost a seed more than reading it.
            datas = await trio.to_thread.run_sync(self._read_blocks, blocks)
            for block, data in zip(blocks, datas, strict=True):
                await self._upload(link, block, data)
                link.uploading.discard(block)
            link.uploading = set()

    def _read_blocks(self, blocks: list[int]) -> list[bytes | None]:
        return [self.blocks.read_block(block) for block in blocks]

    async def _upload(self, link: PeerLink, block: int, data: bytes | None) -> None:
        session = link.session
        if data is None:
            link.uploading.discard(block)
            self._tell_lost(self.layout.file_of(block))  # first: the reject below is then no lie
            if session.peer_requests.get(block) == 0:
                link.send(RejectBlock(block))
            return
        view = memoryview(data)
        room = CHUNK_WRITE - CHUNK_HEADER_MAX
        offset = 0

        def rejected() -> bool:  # a Choke or Cancel while we read it, waited, or wrote
            return session.closed or session.peer_requests.get(block) != offset

        while True:
            size = min(room, MAX_CHUNK, len(data) - offset)
            await self.node.throttle(size)
            if rejected():
                return
            # Control frames produced meanwhile (during the rate limit's wait too)
            # go first, in the same write when they leave room for enough of a chunk.
            pending = b"".join(link.out)
            link.out.clear()
            if len(pending) > room - MIN_JOINED_CHUNK:
                await self._write(link, pending)
                pending = b""
                if rejected():
                    return
            chunk = view[offset : offset + min(size, room - len(pending))]
            frame = session.send_chunk(block, offset, chunk)
            await self._write(link, pending + frame if pending else frame)
            offset += len(chunk)
            now = trio.current_time()
            link.up.add(len(chunk), now)
            link.uploaded_since_unchoke += len(chunk)
            self.stats.bytes_uploaded += len(chunk)
            if offset >= len(data):
                break
        if self.seeding is not None:
            now = trio.current_time()
            self.seeding.sent(link.peer, block, now)
            self._reveal(link, now)

    def _upload_idle(self) -> bool:
        """No peer's request waits in our upload queues behind the block being sent
        to it: a super-seed's upload is about to go unused (O(requests pending), each tick)."""
        for link in self.links.values():
            for block, sent in link.session.peer_requests.items():
                if not sent and block not in link.uploading:
                    return False
        return True

    def _tell_lost(self, file: int) -> None:
        """If the file went bad on our disk and was dropped, every peer hears it
        once: haves only grow otherwise, and they would keep asking us for it."""
        if file in self._lost_told or any(self.blocks.has_block(b) for b in self.layout.file_blocks(file)):
            return
        self._lost_told.add(file)
        seeding, self.seeding = self.seeding, None  # its shares assume we hold everything: no longer so
        for link in self.links.values():
            if link.ready:
                if seeding is not None:
                    self._send_bitfield(link, self.blocks.have)  # all we hold, not just each peer's share
                link.send(Lost(file))

    def _next_uploads(self, link: PeerLink) -> list[int]:
        """The blocks to send next: one partly sent (or, while unchoked, the
        oldest request), then more unstarted requests up to READ_BATCH bytes."""
        session = link.session
        batch: list[int] = []
        size = 0
        for block, sent in session.peer_requests.items():
            if sent:
                return [block]  # finish what was started before anything else
            if session.am_choking:
                continue
            batch.append(block)
            size += self.layout.block_length(block)
            if size >= READ_BATCH:
                break
        return batch

    async def _write(self, link: PeerLink, data: bytes) -> None:
        with trio.fail_after(WRITE_STALL):
            await link.stream.write(data)
        link.bytes_out += len(data)

    # ---- the reader: every event handled without waiting on a write -------

    async def _reader(self, link: PeerLink) -> None:
        session = link.session
        while not session.closed:
            while (event := session.next_event()) is not None:  # first: what the Hello came with
                if isinstance(event, BlockReceived):
                    await self._received.acquire(len(event.data))  # backpressure: bounded bytes held
                    self._take_block(link, event.block, event.data)
                else:
                    self._on_event(link, event)
            if session.closed:
                return  # an Error frame from the peer: nothing more will be parsed
            data = await _read_some(link.stream)
            link.bytes_in += len(data)
            link.last_recv = trio.current_time()
            session.receive_data(data)

    def _on_event(self, link: PeerLink, event: Any) -> None:
        log.debug("%s <- %s: %r", self.node.peer_id, link.peer, event)
        session = link.session
        now = trio.current_time()
        if isinstance(event, Hello):
            link.ready = True
            link.ready_at = now
            self._send_initial_haves(link, now)
            self._send_peers(link)
        elif isinstance(event, Bitfield | HaveBlocks):
            self._peer_has(link, event)
        elif isinstance(event, RequestBlock):
            link.last_request = now
            if session.am_choking or not self._may_serve(link, event.block):
                link.send(RejectBlock(event.block))
            else:
                link.wake.set()
        elif isinstance(event, CancelBlock):
            if session.peer_requests.get(event.block) == 0 and event.block not in link.uploading:
                link.send(RejectBlock(event.block))
        elif isinstance(event, RejectBlock):
            if self.picker is not None:
                self.picker.rejected(link.peer, event.block)
            answered_cancel = self.picker is None or self.picker.have_block(event.block)
            if not session.peer_choking and session.peer_has(event.block) and not answered_cancel:
                link.strikes += 1
                if link.strikes >= STRIKES:
                    self._drop(link, f"refused {link.strikes} blocks it claims to hold")
                    return
            self._fill(link)
        elif isinstance(event, Unchoke):
            self._fill(link)
        elif isinstance(event, Choke):
            pass  # our pending requests come back as rejections
        elif isinstance(event, Interested | NotInterested):
            if isinstance(event, NotInterested) and self.seeding is not None:
                self._send_haves(link, self.seeding.uninterested(link.peer, now))
            self._rechoke(now, force=True)
        elif isinstance(event, HashesRequest):
            self._nursery.start_soon(self._answer_hashes, link, event.file)
        elif isinstance(event, Hashes):
            self._on_hashes(link, event)
        elif isinstance(event, PeerExchange):
            self._on_pex(link, event)
        elif isinstance(event, Lost):
            if self.picker is not None:
                self.picker.peer_lacks(link.peer, self.layout.file_blocks(event.file))
                self._update_interest(link)
        elif isinstance(event, Error):
            log.info("peer %s closed the session: %s", link.peer, event.message)

    def _may_serve(self, link: PeerLink, block: int) -> bool:
        if not self.blocks.has_block(block):
            return False
        return self.seeding is None or self.seeding.is_shown(link.peer, block)

    # ---- haves -----------------------------------------------------------------

    def _send_initial_haves(self, link: PeerLink, now: float) -> None:
        if self.seeding is not None:
            self.seeding.join(link.peer, now)
            self._reveal(link, now)
        elif self.blocks.have_count:
            self._send_bitfield(link, self.blocks.have)

    def _reveal(self, link: PeerLink, now: float, spare: bool = False) -> None:
        assert self.seeding is not None
        shown = self.seeding.reveal(link.peer, now, spare)
        if shown:
            self._send_haves(link, shown)

    def _send_haves(self, link: PeerLink, blocks: list[int]) -> None:
        if len(blocks) > 256:  # many at once: a bitfield is smaller
            bits = bytearray(len(self.blocks.have))
            for b in blocks:
                bits[b >> 3] |= 0x80 >> (b & 7)
            self._send_bitfield(link, bits)
            return
        for i in range(0, len(blocks), MAX_HAVE_BATCH):
            link.send(HaveBlocks(tuple(blocks[i : i + MAX_HAVE_BATCH])))

    def _send_bitfield(self, link: PeerLink, bits: bytes | bytearray) -> None:
        for start in range(0, len(bits), MAX_BITFIELD_BYTES):
            part = bytes(bits[start : start + MAX_BITFIELD_BYTES])
            if any(part):
                link.send(Bitfield(start * 8, part))

    def _peer_has(self, link: PeerLink, event: Bitfield | HaveBlocks) -> None:
        if isinstance(event, HaveBlocks):
            blocks: list[int] = list(event.blocks)
        else:
            blocks = [
                event.first + i * 8 + j
                for i, byte in enumerate(event.bits)
                if byte
                for j in range(8)
                if byte & (0x80 >> j)
            ]
        if self.seeding is not None:
            for b in blocks:
                self.seeding.peer_has(link.peer, b)
        if self.picker is not None and not self.complete.is_set():
            if link.session.peer_have_count == self.layout.total_blocks:
                self.picker.peer_has_all(link.peer)
            else:
                self.picker.peer_has(link.peer, blocks)
            self._update_interest(link)
            self._fill(link)

    def _update_interest(self, link: PeerLink) -> None:
        session = link.session
        wanted = self.picker is not None and not self.complete.is_set() and self.picker.interesting(link.peer)
        if wanted and not session.am_interested:
            link.send(Interested())
        elif not wanted and session.am_interested:
            link.send(NotInterested())

    # ---- requests ----------------------------------------------------------------

    def _fill(self, link: PeerLink) -> None:
        session = link.session
        picker = self.picker
        if picker is None or self.complete.is_set() or session.peer_choking or not session.am_interested:
            return
        if self.links.get(link.peer) is not link or session.closed:
            return
        now = trio.current_time()
        config = self.node.config
        limit = min(config.requests_per_peer, MAX_PEER_REQUESTS)
        room = limit - len(session.our_requests)
        if room < min(REFILL_BATCH, max(1, limit // 2)):
            return  # requests go out a batch at a time: one write, not one per block received
        rate = link.down.rate(now)
        target_bytes = min(max(MIN_QUEUE_BYTES, rate * REQUEST_HORIZON), config.request_bytes_per_peer)
        queued = self.layout.block_bytes(session.our_requests)
        etas: dict[ID, dict[int, float]] = {}  # of each peer asked: its blocks' ETAs, worked out once a fill
        # An idle link's recent rate is 0: what it carried before says what it can do;
        # one that never sent us anything is unknown, and may be asked (0 s).
        copy_rate = rate or link.down.average(now)

        def copy_ok(peer: ID, block: int, asked: Sequence[ID]) -> bool:  # an endgame copy, of this link's peer
            eta_copy = (queued + self.layout.block_length(block)) / copy_rate if copy_rate > 0 else 0.0
            for p in asked:
                if p not in etas:
                    etas[p] = self._etas(self.links.get(p), now)
            return copy_saves_time([etas[p].get(block, math.inf) for p in asked], eta_copy)

        while room > 0 and queued < target_bytes:
            picks = picker.pick(link.peer, 1, copy_ok)
            if not picks:
                break
            block = picks[0]
            file = self.layout.file_of(block)
            if self.blocks.needs_digests(file) and file not in self.hash_asked:
                if sum(session.our_hash_requests.values()) >= HASH_REQUESTS:
                    picker.rejected(link.peer, block)  # later, once digests asked for arrive
                    break
                self.hash_asked[file] = (link.peer, now)
                link.send(HashesRequest(file))
            link.send(RequestBlock(block))
            link.requested_at[block] = now
            if self.stats.first_request is None:
                self.stats.first_request = time.monotonic()
            queued += self.layout.block_length(block)
            room -= 1

    def _etas(self, link: PeerLink | None, now: float) -> dict[int, float]:
        """Seconds until each block asked of this link is in at its measured
        rate, what was asked of it before the block first; none when the link
        is gone or has sent nothing lately (their ETAs are then unknown)."""
        if link is None:
            return {}
        rate = link.down.rate(now)
        if rate <= 0:
            return {}
        etas: dict[int, float] = {}
        ahead = 0
        for block, received in link.session.our_requests.items():  # in the order asked (and served)
            ahead += self.layout.block_length(block) - received
            etas[block] = ahead / rate
        return etas

    # ---- hashes ------------------------------------------------------------------

    async def _answer_hashes(self, link: PeerLink, file: int) -> None:
        digests = self.blocks.digests.get(file)
        if digests is None and self.blocks.file_complete(file):
            digests = await trio.to_thread.run_sync(self.blocks.file_digests, file)
            if digests is None:  # hashed just now and found bad on disk (dropped): say so before the empty answer
                self._tell_lost(file)
        if link.session.closed or self.links.get(link.peer) is not link:
            return
        try:
            link.send(Hashes(file, digests or b""))
        except LocalProtocolError:  # over one frame (a file of > 2,000 blocks): say we have none
            link.send(Hashes(file, b""))

    def _on_hashes(self, link: PeerLink, event: Hashes) -> None:
        file = event.file
        if self.hash_asked.get(file, (None,))[0] == link.peer:
            del self.hash_asked[file]
        if file in self.blocks.digests:
            return
        if not event.digests:
            link.strikes += 1  # it claimed blocks of this file but has no digests for it
        elif not self.blocks.accept_digests(file, event.digests):
            self._ban(link.peer, f"sent block digests for file {file} that do not match the manifest")
            return
        if file in self.blocks.digests:
            for peer, block, data in self.parked.pop(file, []):
                self._nursery.start_soon(self._store_parked, peer, block, data)
        else:
            self._ask_hashes_elsewhere(file, exclude=link.peer)

    def _ask_hashes_elsewhere(self, file: int, exclude: ID | None) -> None:
        blocks = self.layout.file_blocks(file)
        for peer, other in self.links.items():
            pending = other.session.our_hash_requests
            if peer == exclude or not other.ready or sum(pending.values()) >= HASH_REQUESTS or file in pending:
                continue
            if any(other.session.peer_has(b) for b in blocks):
                self.hash_asked[file] = (peer, trio.current_time())
                other.send(HashesRequest(file))
                return

    async def _store_parked(self, peer: ID, block: int, data: bytes) -> None:
        await self._received.acquire(len(data))
        self._take_block(None, block, data, peer)  # its bytes were counted when they arrived

    # ---- received blocks ---------------------------------------------------------

    def _take_block(self, link: PeerLink | None, block: int, data: bytes, peer: ID | None = None) -> None:
        """Queue one received block for checking and writing, or park it until
        its file's digests arrive (its bytes are held in the budget on entry)."""
        peer = link.peer if link is not None else peer
        assert peer is not None
        if link is not None:
            link.down.add(len(data), trio.current_time())
            link.strikes = 0
            self._fill(link)  # its queue has room again: keep the peer busy while we check
        if self.picker is None or self.blocks.has_block(block):
            self._received.release(len(data))  # an endgame duplicate that lost the race
            return
        file = self.layout.file_of(block)
        if self.blocks.needs_digests(file):
            self._park(peer, block, data)
            return
        self._to_write_in.send_nowait((peer, block, data))

    def _park(self, peer: ID, block: int, data: bytes) -> None:
        self._received.release(len(data))
        file = self.layout.file_of(block)
        self.parked.setdefault(file, []).append((peer, block, data))
        if file not in self.hash_asked:
            self._ask_hashes_elsewhere(file, exclude=None)

    async def _block_writer(self) -> None:
        """Check and write the queued blocks, every block waiting in one worker-thread hop."""
        async for first in self._to_write:
            batch = [first]
            while True:
                try:
                    batch.append(self._to_write.receive_nowait())
                except trio.WouldBlock:
                    break
            try:
                results = await trio.to_thread.run_sync(self._check_and_write, batch)
            finally:
                self._received.release(sum(len(data) for _, _, data in batch))
            for (peer, block, data), result in zip(batch, results, strict=True):
                self._block_stored(peer, block, data, result)

    def _check_and_write(self, batch: list[tuple[ID, int, bytes]]) -> list[bool | str | Exception | None]:
        """On a worker thread: per block, True (it completed its file), False
        (written), None (wrong bytes), "skip" (already held), "park" (its file's
        digests are gone: the file went bad on disk meanwhile), or the error."""
        results: list[bool | str | Exception | None] = []
        for _, block, data in batch:
            if self.blocks.has_block(block):
                results.append("skip")
            elif self.blocks.needs_digests(self.layout.file_of(block)):
                results.append("park")
            else:
                try:
                    results.append(self.blocks.check_and_write(block, data))
                except (BadManifest, OSError) as e:
                    results.append(e)
        return results

    def _block_stored(self, peer: ID, block: int, data: bytes, result: bool | str | Exception | None) -> None:
        picker = self.picker
        if result == "skip" or picker is None:
            return
        if result == "park":
            self.parked.setdefault(self.layout.file_of(block), []).append((peer, block, data))
        elif result is None:
            self.stats.blocks_rejected += 1
            text = f"block {block} of {self.model.name} did not match its digest"
            self.node.events.add("rejected_block", text, peer=str(peer), model=self.model.cid)
            picker.rejected(peer, block)
            self._ban(peer, f"sent block {block} that does not match its digest")
        elif isinstance(result, BadManifest):
            self.fail(SwarmFailed(f"cannot store {self.model.folder}: {result}"))
        elif isinstance(result, OSError):  # a full disk, say: one plain line, and the verified blocks stay
            self.fail(SwarmFailed(f"cannot write into {self.model.folder}: {result.strerror or result}"))
        else:
            assert isinstance(result, bool)
            self._verified(peer, block, len(data), result)

    def _verified(self, peer: ID, block: int, size: int, completed_file: bool) -> None:
        picker = self.picker
        assert picker is not None
        for other in picker.got(peer, block):
            link = self.links.get(other)
            if link is not None and block in link.session.our_requests and block not in link.session.cancelled:
                link.send(CancelBlock(block))
        self.stats.bytes_fetched += size
        self.wanted_done += size
        self.stats.blocks_fetched += 1
        self.stats.last_block = time.monotonic()
        key = str(peer)
        self.stats.bytes_by_peer[key] = self.stats.bytes_by_peer.get(key, 0) + size
        for link in self.links.values():
            if link.ready and hears_have(link.session, block):
                link.send(HaveBlocks((block,)))
        if completed_file:
            file = self.layout.file_of(block)
            self.node.announce_fragments(self.model)
            self._file_done(file)
            self._lost_told.discard(file)  # held again: the HAVEs just sent say so
            try:
                self.on_file_complete(file)
            except Exception:
                log.exception("file-complete callback failed")
        if picker.done:
            self._finished()

    def _finished(self) -> None:
        self.picker = None
        for link in self.links.values():
            if link.ready and link.session.am_interested:
                link.send(NotInterested())
        self.complete.set()
        self._progress(trio.current_time())

    # ---- choking -------------------------------------------------------------------

    def _rechoke(self, now: float, force: bool) -> None:
        if not force and not self.choker.due(now):
            return
        peers = {
            peer: PeerRates(
                interested=link.session.peer_interested,
                download_rate=link.down.rate(now),
                upload_rate=link.up.rate(now),
                uploaded=link.uploaded_since_unchoke,
                last_request=link.last_request,
                joined=link.joined,
            )
            for peer, link in self.links.items()
            if link.ready
        }
        unchoked = self.choker.update(now, peers, seeding=self.complete.is_set())
        for peer, link in self.links.items():
            if not link.ready:
                continue
            if peer in unchoked and link.session.am_choking:
                link.uploaded_since_unchoke = 0
                link.send(Unchoke())
            elif peer not in unchoked and not link.session.am_choking:
                link.send(Choke())

    # ---- peer exchange ---------------------------------------------------------------

    def _send_peers(self, link: PeerLink) -> None:
        """Tell a new peer of the others, and the others of it."""
        store = self.node.host.get_peerstore()
        addrs: list[str] = []
        for peer, other in self.links.items():
            if peer == link.peer or not other.ready:
                continue
            for a in _addrs_of(store, peer)[:2]:
                addrs.append(f"{a}/p2p/{peer}")
        if addrs:
            link.send(PeerExchange(tuple(a for a in addrs if len(a) <= 300)[:MAX_PEX]))
        mine = [f"{a}/p2p/{link.peer}" for a in _addrs_of(store, link.peer)[:2]]
        mine = [a for a in mine if len(a) <= 300]
        if mine:
            for peer, other in self.links.items():
                if peer != link.peer and other.ready:
                    other.send(PeerExchange(tuple(mine)))

    def _on_pex(self, link: PeerLink, event: PeerExchange) -> None:
        store = self.node.host.get_peerstore()
        for text in event.addrs:
            try:
                info = info_from_p2p_addr(multiaddr.Multiaddr(text))
            except Exception:
                continue  # not an address we can use; harmless
            if info.peer_id == self.node.peer_id:
                continue
            if info.peer_id == link.peer:
                store.add_addrs(info.peer_id, info.addrs, PERMANENT_TTL)  # its own listen addresses
            elif self.picker is not None and info.peer_id not in self.links and len(self.known) < MAX_KNOWN:
                store.add_addrs(info.peer_id, info.addrs, 3600)
                self.known.setdefault(info.peer_id, trio.current_time())

    # ---- standing --------------------------------------------------------------------

    def _ban(self, peer: ID, why: str) -> None:
        log.warning("banning peer %s: %s", peer, why)
        self.stats.bad_peers.add(str(peer))
        self.emit({"event": "bad_peer", "peer": str(peer), "reason": why})
        link = self.links.get(peer)
        if link is not None:
            link.scope.cancel()
        self.node.ban(peer, why)

    def _drop(self, link: PeerLink, why: str) -> None:
        log.info("dropping peer %s: %s", link.peer, why)
        text = f"dropped for {DROP_FOR:.0f} s: {why}"
        self.node.events.add("dropped", text, peer=str(link.peer), model=self.model.cid)
        self.dropped[link.peer] = trio.current_time() + DROP_FOR
        link.scope.cancel()


def hears_have(session: ExchangeSession, block: int) -> bool:
    """Is a newly verified block announced to this session's peer? Not to a
    peer that holds it and is interested in what we hold: a puller, which
    cannot want it (libtorrent's have suppression; ~40% of a puller's HAVEs
    in an 8-puller swarm). A super-seed is never interested, shows us only
    part of what it holds, and counts its shares out by the HAVEs it hears."""
    return not session.peer_has(block) or not session.peer_interested


def _addrs_of(store: Any, peer: ID) -> list[Any]:
    """A peer's known addresses; py-libp2p raises once a record has expired."""
    try:
        return list(store.addrs(peer))
    except Exception:
        return []


def _bits_set(bits: bytes | bytearray) -> list[int]:
    """Indexes of the bits set in an MSB-first bitfield."""
    return [i * 8 + j for i, byte in enumerate(bits) if byte for j in range(8) if byte & (0x80 >> j)]


def _first_leaf(e: BaseException) -> BaseException:
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return e


async def _read_some(stream: INetStream) -> bytes:
    from .streams import _read_some as read_some

    return await read_some(stream, 1 << 20, math.inf)


async def _reset(stream: INetStream) -> None:
    try:
        await stream.reset()
    except Exception:
        pass
