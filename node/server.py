"""Serving manifests, have-sets and fragments to peers.

A stream carries any number of requests, answered one after another in order
(clients pipeline them; see client.py). The handler can never crash the node:
every exception is caught, logged and answered by resetting the stream (an
exception escaping a libp2p stream handler kills the whole host).

Two bounds, so idle streams cannot starve honest peers: an upload slot is held
only while a request is answered (beyond the slots a request gets BUSY at once,
not a queue), and open streams, busy or idle, are capped per peer and in
total. Banned peers (standing.py) are refused.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import trio
from libp2p.abc import INetStream
from libp2p.peer.id import ID

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
    Message,
    ProtocolError,
    encode_bitfield,
    encode_frame,
)

from .ratelimit import TokenBucket
from .standing import BanList
from .store import LocalModel, Store
from .streams import StreamClosed, read_message, send_message

log = logging.getLogger(__name__)
_WRITE = 1 << 20
MAX_ASKERS = 200  # remembered per model
INDEX_WAIT = 30.0  # seconds a request for a model not yet indexed waits for the index
MANIFEST_RANGE_MAX = 4 << 20  # bytes of a manifest one ranged request gets at most (a reply held in memory)


@dataclass
class ServeLimits:
    max_total: int = 32  # requests being answered at once, all peers (upload slots)
    max_per_peer: int = 8  # requests being answered at once, one peer
    max_streams_per_peer: int = 16  # open streams, busy or idle, one peer
    max_streams_total: int = 1024  # open streams, busy or idle, all peers
    request_timeout: float = 10.0  # to receive the first request frame
    idle_timeout: float = 30.0  # an open stream with no next request is closed
    stall_timeout: float = 120.0  # a peer that takes no bytes for this long is dropped
    upload_rate: int | None = None  # bytes/s, all peers together; None: unlimited
    initial_seeding: bool = True  # complete models: show concurrent pullers disjoint shares (seeding.py, swarm.py)


@dataclass
class FragmentServer:
    store: Store
    limits: ServeLimits = field(default_factory=ServeLimits)
    banned: BanList = field(default_factory=BanList)
    active: Counter[str] = field(default_factory=Counter)  # requests being answered, per peer
    open_streams: Counter[str] = field(default_factory=Counter)  # per peer
    served_bytes: int = 0
    served_requests: int = 0
    # Peers that asked for a model's have-set: its other pullers. A pull of the
    # same model asks them in turn (BitTorrent's incoming peers), so pullers
    # find each other without waiting for the DHT.
    askers: dict[str, dict[ID, None]] = field(default_factory=dict)
    # model CID -> fragment k being fetched now (set by the node: its swarms know); None: nothing
    fetching_of: Callable[[str], list[bool] | None] = lambda cid: None
    # Set once the data dir is indexed (the node listens before): until then a
    # request for a model not yet read waits for it instead of hearing NOT_FOUND.
    indexed: trio.Event = field(default_factory=trio.Event)
    _bucket: TokenBucket | None = None
    _handlers: set[trio.CancelScope] = field(default_factory=set)

    def stop(self) -> None:
        """Cancel every request being served (the node is stopping)."""
        for scope in self._handlers:
            scope.cancel()

    async def handle(self, stream: INetStream) -> None:
        with trio.CancelScope() as scope:
            self._handlers.add(scope)
            try:
                await self._handle(stream)
            finally:
                self._handlers.discard(scope)
        if scope.cancelled_caught:
            await _reset(stream)

    async def _handle(self, stream: INetStream) -> None:
        peer = str(stream.muxed_conn.peer_id)
        try:
            if stream.muxed_conn.peer_id in self.banned:
                await _reset(stream)
                return
            if (
                self.open_streams.total() >= self.limits.max_streams_total
                or self.open_streams[peer] >= self.limits.max_streams_per_peer
            ):
                with trio.move_on_after(2):
                    await send_message(stream, Error(ErrorCode.BUSY, "too many streams, try later"))
                await stream.close()
                return
            with _counted(self.open_streams, peer):
                await self._serve(stream, peer)
        except ProtocolError as e:
            log.info("peer %s broke the protocol: %s", peer, e)
            await _answer_then_reset(stream, Error(ErrorCode.BAD_REQUEST, str(e)))
        except (StreamClosed, trio.TooSlowError) as e:
            log.debug("request from %s ended early: %r", peer, e)
            await _reset(stream)
        except Exception:
            log.exception("error serving %s", peer)
            await _reset(stream)

    async def _serve(self, stream: INetStream, peer: str) -> None:
        decoder = FrameDecoder()
        request: Message | None
        with trio.fail_after(self.limits.request_timeout):
            request = await read_message(stream, decoder)
        while request is not None:
            if self.active.total() >= self.limits.max_total or self.active[peer] >= self.limits.max_per_peer:
                await self._write(stream, encode_frame(Error(ErrorCode.BUSY, "too many requests, try later")))
            else:
                with _counted(self.active, peer):
                    await self._answer(stream, request)
            request = None
            with trio.move_on_after(self.limits.idle_timeout):
                try:
                    request = await read_message(stream, decoder)
                except StreamClosed:
                    pass  # the client is done with this stream
        await stream.close()

    async def model(self, model_cid: str) -> LocalModel | None:
        """The model, waiting (a while) for the index if it is still being built."""
        model = self.store.models.get(model_cid)
        if model is None and not self.indexed.is_set():
            with trio.move_on_after(INDEX_WAIT):
                await self.indexed.wait()
            model = self.store.models.get(model_cid)
        return model

    async def _answer(self, stream: INetStream, request: Message) -> None:
        if isinstance(request, ManifestRequest):
            model = await self.model(request.model_cid)
            if model is None:
                await self._write(stream, encode_frame(Error(ErrorCode.NOT_FOUND, "unknown model")))
            elif request.ranged:
                length = MANIFEST_RANGE_MAX if request.length is None else min(request.length, MANIFEST_RANGE_MAX)
                found = await trio.to_thread.run_sync(model.read_manifest_range, request.offset, length)
                if found is None or request.offset > found[1]:
                    await self._write(stream, encode_frame(Error(ErrorCode.NOT_FOUND, "no such manifest range")))
                else:
                    await self._send_body(stream, found[0], total=found[1])
            else:
                size = await trio.to_thread.run_sync(model.manifest_size)
                if size is None:
                    await self._write(stream, encode_frame(Error(ErrorCode.NOT_FOUND, "unknown model")))
                else:
                    await self._send_manifest(stream, model, size)
        elif isinstance(request, HaveRequest):
            model = await self.model(request.model_cid)
            if model is None:
                await self._write(stream, encode_frame(Error(ErrorCode.NOT_FOUND, "unknown model")))
            else:
                # Remembered only for models held here: asking about random CIDs must cost us nothing.
                self._remember_asker(request.model_cid, stream.muxed_conn.peer_id)
                have = model.have
                await self._write(stream, encode_frame(Have(len(have), encode_bitfield(have))))
        elif isinstance(request, FetchingRequest):
            model = await self.model(request.model_cid)
            if model is None:
                await self._write(stream, encode_frame(Error(ErrorCode.NOT_FOUND, "unknown model")))
            else:
                fetching = self.fetching_of(request.model_cid) or [False] * len(model.have)
                await self._write(stream, encode_frame(Have(len(fetching), encode_bitfield(fetching))))
        elif isinstance(request, FragmentRequest):
            await self._send_fragment(stream, request)
        else:
            raise ProtocolError(f"{type(request).__name__} is not a request")

    def _remember_asker(self, model_cid: str, peer: ID) -> None:
        askers = self.askers.setdefault(model_cid, {})
        askers.pop(peer, None)
        askers[peer] = None  # most recent last
        if len(askers) > MAX_ASKERS:
            del askers[next(iter(askers))]

    async def _send_fragment(self, stream: INetStream, request: FragmentRequest) -> None:
        blob = self.store.locate(request.cid)
        if blob is None and not self.indexed.is_set():
            with trio.move_on_after(INDEX_WAIT):
                await self.indexed.wait()
            blob = self.store.locate(request.cid)
        if blob is None or request.offset > blob.size:
            await self._write(stream, encode_frame(Error(ErrorCode.NOT_FOUND, "fragment not held here")))
            return
        data = await trio.to_thread.run_sync(self.store.read_verified, blob, request.offset, request.length)
        if data is None:
            await self._write(stream, encode_frame(Error(ErrorCode.NOT_FOUND, "fragment not held here")))
            return
        await self._send_body(stream, data)

    async def _send_manifest(self, stream: INetStream, model: LocalModel, size: int) -> None:
        """The whole manifest, read from its file a piece at a time: a 30 MB
        manifest asked for by every upload slot at once costs 32 MiB, not ~1 GB."""
        await self._write(stream, encode_frame(Data(size)))
        for offset in range(0, size, _WRITE):
            found = await trio.to_thread.run_sync(model.read_manifest_range, offset, _WRITE)
            if found is None or found[1] != size or not found[0]:
                await stream.reset()  # changed under us: the asker sees a cut stream, not wrong bytes
                return
            await self.throttle(len(found[0]))
            await self._write(stream, found[0])
        self.served_bytes += size
        self.served_requests += 1

    async def _send_body(self, stream: INetStream, data: bytes, total: int | None = None) -> None:
        await self._write(stream, encode_frame(Data(len(data), total)))
        view = memoryview(data)
        for start in range(0, len(data), _WRITE):
            chunk = bytes(view[start : start + _WRITE])
            await self.throttle(len(chunk))
            await self._write(stream, chunk)
        self.served_bytes += len(data)
        self.served_requests += 1

    async def _write(self, stream: INetStream, data: bytes) -> None:
        with trio.fail_after(self.limits.stall_timeout):
            await stream.write(data)

    async def throttle(self, n: int) -> None:
        """The node-wide upload rate limit (`serve.upload_rate`), shared with the swarms."""
        if self.limits.upload_rate is None:
            return
        now = trio.current_time()
        if self._bucket is None:
            self._bucket = TokenBucket(self.limits.upload_rate, self.limits.upload_rate / 4, now)  # 1/4 s burst
        await trio.sleep(self._bucket.reserve(n, now))


@contextmanager
def _counted(counter: Counter[str], key: str) -> Iterator[None]:
    counter[key] += 1
    try:
        yield
    finally:
        counter[key] -= 1
        if not counter[key]:
            del counter[key]


async def _reset(stream: INetStream) -> None:
    try:
        await stream.reset()
    except Exception:
        pass


async def _answer_then_reset(stream: INetStream, error: Error) -> None:
    try:
        with trio.move_on_after(2):
            await stream.write(encode_frame(error))
    except Exception:
        pass
    await _reset(stream)
