"""Kademlia DHT: inbound streams bounded in time and per peer; a bounded provider store.

Attack 1, handler slots (py-libp2p 0.8.1): `KadDHT.handle_stream` holds one of
twelve `CapacityLimiter` tokens for a stream's whole life and reads without a
timeout. Twelve `/ipfs/kad/1.0.0` streams that send nothing (or trickle a
message a byte at a time) take every token, and the node resets every other
DHT stream: lookups through it fail for as long as the attacker likes.

Fix: a token is held only while a message is being handled, never while
waiting for one (an idle stream costs no CPU, which is what the limiter is
for). Waiting is bounded instead: each message must arrive whole within
`MESSAGE_TIMEOUT` of the handler asking for it, a stream lives at most
`STREAM_LIFETIME`, a peer has at most `MAX_STREAMS_PER_PEER` inbound DHT
streams and the node `MAX_INBOUND_STREAMS`; streams beyond a cap are reset at
once. `handle_stream` is replaced (it is ten lines: the CLIENT check and the
limiter) and the message reader that `_do_handle_stream` calls is wrapped by
rebinding it in the `kad_dht` module.

Attack 2, provider store (py-libp2p 0.8.1): ADD_PROVIDER records are kept 48 h
with no cap on keys, records or addresses: one 4 MiB message carries 419 k
addresses (measured: 0.6 s of parsing, 46 MiB kept), and floods of random keys
grow the store without bound. Per key the first 20 providers are kept and later
ones dropped, so 20 early Sybils shut out every honest provider of a key.

Fix, in `ProviderStore.add_provider`: at most `MAX_ADDRS_PER_RECORD` distinct
addresses and `MAX_ADDR_BYTES_PER_RECORD` bytes of them per record; per key
`MAX_PROVIDERS_PER_KEY` providers, a newcomer replacing the stalest record
(honest providers republish every 22 h, a Sybil must keep spending announces
to stay); at most `MAX_RECORDS_PER_PROVIDER` records per provider; at most
`MAX_RECORDS` records from other peers in all. When that is full a newcomer
evicts the oldest record of the provider holding the most, so a flooder loses
its own records first and cannot evict a provider holding fewer than itself.
The node's own records (`provide`) are exempt: they are not attacker-chosen.
ADD_PROVIDER messages larger than `TRIM_ABOVE` bytes have each provider's
address list cut before upstream parses it. `get_providers` and
`cleanup_expired` are wrapped to keep the per-provider ledger in step with the
expired records upstream deletes.

Waste (py-libp2p 0.8.1): every DHT message is written as two: its varint
length, then its body, so each goes out as two Noise messages (two
encryptions, two socket sends, two wake-ups at the reader). A provide sweep's
receiver echoes each ADD_PROVIDER that way: in an 8-puller swarm that was
~3,800 echo pairs a puller, as many Noise messages as the model's data.
Fix, in `NetStream.write` for DHT streams only: a write that is one complete
varint is held and sent with the next write on the stream, its body. At most
one write is held, and the next write always releases it, so order is kept.

`libp2p.rcmgr` does not cover either attack: its stream limit is one global
count (10 000 by default), with no per-peer or per-protocol share, and its
`ProtocolRateLimiter` is not wired into the host.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.abc import INetStream
from libp2p.kad_dht import kad_dht as kad_module
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.kad_dht.provider_store import ProviderRecord, ProviderStore
from libp2p.network.stream.net_stream import NetStream
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from multiaddr import Multiaddr

log = logging.getLogger(__name__)

# ---- inbound streams -------------------------------------------------------
# Honest requests arrive in milliseconds; go-libp2p clients that keep a stream
# open between requests retry once on a fresh stream when this one is reset.
MESSAGE_TIMEOUT = 5.0
# Bounds a stream that keeps sending just in time, and a handler stuck writing.
STREAM_LIFETIME = 60.0
# One peer's lookups, provides and refreshes run a few streams at once; the rest
# is slack. Below upstream's 12 tokens so one peer cannot take them all.
MAX_STREAMS_PER_PEER = 8
# Idle streams hold no CPU token, only a task and a partial message: this bounds
# them. Filling it takes 16 connected peer IDs each refreshing 8 streams every 5 s.
MAX_INBOUND_STREAMS = 128

# ---- provider store ----------------------------------------------------------
# A node's addresses: ip4/ip6 x tcp/quic and perhaps a relay, a handful.
MAX_ADDRS_PER_RECORD = 8
MAX_ADDR_BYTES_PER_RECORD = 512  # /dns4 names of up to ~250 bytes still fit
MAX_PROVIDERS_PER_KEY = 20  # the spec's k, as upstream
# A seed announces every fragment key it holds; in a small swarm every node
# receives all of them. 64 Ki: one 400 GB model's 41,000 fragments fit whole.
MAX_RECORDS_PER_PROVIDER = 65_536
# A record shares its provider's addresses with the provider's other records
# (`_interned_info`): measured 0.47 kB per record (0.8 kB unshared), so 128 Ki
# records take ~60 MB; at the address caps, each record with addresses of its
# own, 1.8 kB: 230 MB at worst.
MAX_RECORDS = 131_072
INTERNED_INFOS = 4096  # providers whose address list is shared between records
TRIM_ABOVE = 4096  # bytes; an honest ADD_PROVIDER with two signed records is ~1 kB
RAW_ADDRS_KEPT = 4 * MAX_ADDRS_PER_RECORD  # before parsing: room for a few invalid ones


# ---- attack 1: inbound streams -------------------------------------------------


@dataclass
class _StreamCounts:
    per_peer: dict[ID, int] = field(default_factory=dict)
    total: int = 0

    def admit(self, peer: ID) -> bool:
        n = self.per_peer.get(peer, 0)
        if n >= MAX_STREAMS_PER_PEER or self.total >= MAX_INBOUND_STREAMS:
            return False
        self.per_peer[peer] = n + 1
        self.total += 1
        return True

    def leave(self, peer: ID) -> None:
        self.total -= 1
        n = self.per_peer.pop(peer) - 1
        if n:
            self.per_peer[peer] = n


@dataclass
class _Inbound:
    dht: KadDHT
    holding: bool = False  # holds one of dht._inbound_limiter's tokens


_inbound: dict[int, _Inbound] = {}  # id(stream) -> state, for streams our handler runs


def stream_counts(dht: KadDHT) -> _StreamCounts:
    counts = dht.__dict__.get("_gguf_stream_counts")
    if counts is None:
        counts = dht.__dict__["_gguf_stream_counts"] = _StreamCounts()
    return counts


async def _reset(stream: INetStream) -> None:
    with trio.move_on_after(2):
        try:
            await stream.reset()
        except Exception:
            pass


async def _handle_stream(self: KadDHT, stream: INetStream) -> None:
    """Replaces `KadDHT.handle_stream`. Never raises: an exception escaping a
    stream handler kills the host."""
    try:
        if self.mode == DHTMode.CLIENT:
            await stream.close()
            return
        peer = stream.muxed_conn.peer_id
    except Exception:
        await _reset(stream)
        return
    counts = stream_counts(self)
    if not counts.admit(peer):
        log.debug("DHT stream from %s refused: %d of its streams open", peer, counts.per_peer.get(peer, 0))
        await _reset(stream)
        return
    state = _Inbound(self)
    _inbound[id(stream)] = state
    try:
        with trio.move_on_after(STREAM_LIFETIME) as scope:
            await self._do_handle_stream(stream)
        if scope.cancelled_caught:
            log.info("DHT stream from %s reset: open longer than %.0f s", peer, STREAM_LIFETIME)
            await _reset(stream)
    except Exception as e:
        log.info("DHT stream from %s failed: %r", peer, e)
        await _reset(stream)
    finally:
        del _inbound[id(stream)]
        if state.holding:
            self._inbound_limiter.release()
        counts.leave(peer)


def _wrap_read(upstream: Callable[..., Any]) -> Callable[..., Any]:
    async def read_request(stream: Any, max_length: int) -> bytes:
        """`_do_handle_stream`'s message reader: the CPU token is given back
        while waiting, and the wait is bounded. A timeout raises TooSlowError,
        which upstream catches and answers by resetting the stream."""
        state = _inbound.get(id(stream))
        if state is None:
            return await upstream(stream, max_length)
        limiter = state.dht._inbound_limiter
        if state.holding:
            limiter.release()
            state.holding = False
        with trio.fail_after(MESSAGE_TIMEOUT):
            data: bytes = await upstream(stream, max_length)
            await limiter.acquire()  # work starts: wait (bounded) for a CPU token
            state.holding = True
        return trim_add_provider(data) if len(data) > TRIM_ABOVE else data

    return read_request


def trim_add_provider(data: bytes) -> bytes:
    """An ADD_PROVIDER with each provider's address list cut to
    `RAW_ADDRS_KEPT`, so upstream does not parse hundreds of thousands of
    addresses it would then drop. Anything else is returned unchanged."""
    try:
        msg = Message()
        msg.ParseFromString(data)
        if msg.type != Message.MessageType.ADD_PROVIDER:
            return data
        cut = False
        for peer in msg.providerPeers:
            if len(peer.addrs) > RAW_ADDRS_KEPT:
                del peer.addrs[RAW_ADDRS_KEPT:]
                cut = True
        return msg.SerializeToString() if cut else data
    except Exception:
        return data  # upstream parses it again and resets the stream


# ---- attack 2: provider store ----------------------------------------------------


class Ledger:
    """Keys held per remote provider (least recently added first), their
    total, and which provider holds the most: O(1) per change."""

    def __init__(self) -> None:
        self.keys: dict[str, dict[bytes, None]] = {}
        self._with_count: dict[int, set[str]] = {}
        self._top = 0
        self.total = 0

    def count(self, provider: str) -> int:
        keys = self.keys.get(provider)
        return len(keys) if keys else 0

    def _move(self, provider: str, old: int, new: int) -> None:
        if old:
            group = self._with_count[old]
            group.discard(provider)
            if not group:
                del self._with_count[old]
                if old == self._top:
                    self._top = new  # the provider that was alone on top is now at `new`
        if new:
            self._with_count.setdefault(new, set()).add(provider)
            self._top = max(self._top, new)

    def add(self, provider: str, key: bytes) -> None:
        keys = self.keys.setdefault(provider, {})
        if key in keys:
            del keys[key]  # refreshed: now the newest
            keys[key] = None
            return
        keys[key] = None
        self.total += 1
        self._move(provider, len(keys) - 1, len(keys))

    def remove(self, provider: str, key: bytes) -> None:
        keys = self.keys.get(provider)
        if not keys or key not in keys:
            return
        del keys[key]
        self.total -= 1
        self._move(provider, len(keys) + 1, len(keys))
        if not keys:
            del self.keys[provider]

    def heaviest(self) -> str | None:
        group = self._with_count.get(self._top)
        return next(iter(group)) if group else None


def ledger(store: ProviderStore) -> Ledger:
    """The store's ledger, built from its records on first use."""
    book = store.__dict__.get("_gguf_ledger")
    if book is None:
        book = store.__dict__["_gguf_ledger"] = _build_ledger(store)
    return book


def _build_ledger(store: ProviderStore) -> Ledger:
    book = Ledger()
    local = str(store.local_peer_id)
    entries = [
        (record.timestamp, provider, key)
        for key, records in store.providers.items()
        for provider, record in records.items()
        if provider != local
    ]
    for _, provider, key in sorted(entries, key=lambda e: e[0]):
        book.add(provider, key)
    return book


def bounded_addrs(addrs: Iterable[Multiaddr]) -> list[Multiaddr]:
    """The first distinct addresses within the per-record caps."""
    out: list[Multiaddr] = []
    seen: set[bytes] = set()
    used = 0
    for i, addr in enumerate(addrs):
        if len(out) >= MAX_ADDRS_PER_RECORD or i >= RAW_ADDRS_KEPT:
            break
        try:
            raw = addr.to_bytes()
        except Exception:
            continue
        if raw in seen or used + len(raw) > MAX_ADDR_BYTES_PER_RECORD:
            continue
        seen.add(raw)
        used += len(raw)
        out.append(addr)
    return out


def _drop(store: ProviderStore, book: Ledger, key: bytes, provider: str) -> None:
    records = store.providers.get(key)
    if records is not None and records.pop(provider, None) is not None and not records:
        del store.providers[key]
    book.remove(provider, key)


def _interned_info(store: ProviderStore, provider: PeerInfo) -> PeerInfo:
    """The provider's bounded record, one object shared by all its records while
    its addresses stay the same: a seed sweeping 40,000 keys sends the same
    addresses 40,000 times (0.8 kB a record, 0.35 kB shared)."""
    addrs = bounded_addrs(provider.addrs)
    raw = tuple(a.to_bytes() for a in addrs)
    cache: dict[ID, tuple[tuple[bytes, ...], PeerInfo]] = store.__dict__.setdefault("_gguf_infos", {})
    known = cache.get(provider.peer_id)
    if known is not None and known[0] == raw:
        return known[1]
    if len(cache) >= INTERNED_INFOS:
        cache.clear()  # a flood of identities: start over (sharing is only a saving)
    info = PeerInfo(provider.peer_id, addrs)
    cache[provider.peer_id] = (raw, info)
    return info


def _add_provider(self: ProviderStore, key: bytes, provider: PeerInfo) -> None:
    """Replaces `ProviderStore.add_provider`: the same record, within bounds."""
    if not provider or not provider.peer_id:
        return
    book = ledger(self)
    info = _interned_info(self, provider)
    pid = str(info.peer_id)  # the interned ID keeps its base58 (a fresh one costs a big-int division per byte)
    local_pid = str(self.local_peer_id)
    local = pid == local_pid
    record = ProviderRecord(info, time.time())
    records = self.providers.get(key)
    if records is not None and pid in records:  # a refresh: no new entry
        records[pid] = record
        if not local:
            book.add(pid, key)
        self._save()
        return
    if not local and book.count(pid) >= MAX_RECORDS_PER_PROVIDER:
        log.debug("provider %s holds %d records: dropping one more", pid, MAX_RECORDS_PER_PROVIDER)
        return
    if records is not None and len(records) >= MAX_PROVIDERS_PER_KEY:
        others = [(r.timestamp, p) for p, r in records.items() if p != local_pid]
        if not others:
            return
        _drop(self, book, key, min(others)[1])  # the stalest gives way
    elif not local and book.total >= MAX_RECORDS:
        heavy = book.heaviest()
        if heavy is None or book.count(heavy) < book.count(pid) + 2:
            log.debug("provider store full: dropping a record of %s", pid)
            return  # the newcomer already holds about as many as anyone
        _drop(self, book, next(iter(book.keys[heavy])), heavy)
    self.providers.setdefault(key, {})[pid] = record
    if not local:
        book.add(pid, key)
    self._save()


def _wrap_get_providers(upstream: Callable[[ProviderStore, bytes], list[PeerInfo]]) -> Callable[..., list[PeerInfo]]:
    def get_providers(self: ProviderStore, key: bytes) -> list[PeerInfo]:
        before = set(self.providers.get(key, ()))
        result = upstream(self, key)
        if before:  # upstream deletes expired records here: forget them too
            book = ledger(self)
            for provider in before.difference(self.providers.get(key, ())):
                book.remove(provider, key)
        return result

    return get_providers


def _wrap_cleanup_expired(upstream: Callable[[ProviderStore], None]) -> Callable[[ProviderStore], None]:
    def cleanup_expired(self: ProviderStore) -> None:
        upstream(self)
        self.__dict__["_gguf_ledger"] = _build_ledger(self)  # every 10 min: a rebuild is cheap

    return cleanup_expired


def is_one_varint(data: bytes) -> bool:
    """A complete unsigned varint and nothing after it: every byte but the last has the high bit."""
    return 0 < len(data) <= 10 and data[-1] < 0x80 and all(b >= 0x80 for b in data[:-1])


def _join_length_and_body(upstream: Callable[..., Any]) -> Callable[..., Any]:
    async def write(self: NetStream, data: bytes) -> None:
        if self.protocol_id == kad_module.PROTOCOL_ID:
            held = self.__dict__.get("_gguf_held_length")
            if held is not None:
                self.__dict__["_gguf_held_length"] = None
                data = held + data
            elif is_one_varint(data):
                self.__dict__["_gguf_held_length"] = bytes(data)
                return
        await upstream(self, data)

    return write


def apply() -> None:
    if getattr(KadDHT, "_gguf_swarm_kad_patch", False):
        return
    NetStream.write = _join_length_and_body(NetStream.write)  # type: ignore[method-assign]
    KadDHT.handle_stream = _handle_stream  # type: ignore[method-assign]
    kad_module.read_varint_prefixed_bytes_limited = _wrap_read(kad_module.read_varint_prefixed_bytes_limited)
    ProviderStore.add_provider = _add_provider  # type: ignore[method-assign]
    ProviderStore.get_providers = _wrap_get_providers(ProviderStore.get_providers)  # type: ignore[method-assign]
    ProviderStore.cleanup_expired = _wrap_cleanup_expired(ProviderStore.cleanup_expired)  # type: ignore[method-assign]
    KadDHT._gguf_swarm_kad_patch = True  # type: ignore[attr-defined]
