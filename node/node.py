"""A running node: host + Kademlia DHT + store + fragment server + announcer.

`open_node(config)` starts everything and yields a `Node`; leaving the block
stops it and closes the host (without `close()` py-libp2p leaks a socket).
"""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio
from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

from protocol import PROTOCOL_ID, Error, ErrorCode
from protocol.exchange import EXCHANGE_PROTOCOL_ID, encode_exchange

from . import manifest_index
from .blockstore import ModelBlocks
from .host import (
    NodeError,
    PeerLimits,
    connect,
    dialable_addrs,
    load_or_create_identity,
    make_host,
    manage_connections,
    parse_multiaddr,
    parse_peer_addr,
)
from .lan import lan_discovery
from .metrics import serve_metrics
from .names import register_validator as register_name_validator
from .provide_sweep import provide_region
from .recent import RecentEvents
from .server import FragmentServer, ServeLimits
from .standing import BanList
from .store import LocalModel, Store
from .streams import StreamClosed, read_hello
from .swarm import ModelSwarm
from .sweep import SweepGate, estimate_network_size, plan_regions

log = logging.getLogger(__name__)
REPUBLISH_SECONDS = 22 * 3600  # provider records expire after 48 h
MULTIHASH_SHA256 = b"\x12\x20"  # a fragment's DHT key: this, then its SHA-256
SWEEP_REGION_TIMEOUT = 600.0  # one region's lookup and streams; 40,000 keys take ~2 min
SWEEP_DEFER_MAX = 600.0  # the longest a fragment sweep waits while this node uploads (SweepGate)
SWEEP_RECHECK = 1.0  # seconds between looks at whether a deferred sweep may start
# How often verified-file records are saved: a crash loses at most this much
# verification (those files are hashed again), and no fsync per file.
VERIFIED_FLUSH_SECONDS = 5.0


@dataclass
class NodeConfig:
    data_dir: Path
    listen: list[str] = field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/0"])
    bootstrap: list[str] = field(default_factory=list)
    serve: ServeLimits = field(default_factory=ServeLimits)
    # Requests queued on each peer: its measured rate times a short horizon,
    # never more than these (the serving side accepts 64).
    requests_per_peer: int = 48
    request_bytes_per_peer: int = 48 << 20
    # Peers served at once per model, plus one optimistic unchoke: libtorrent's
    # default. With 4, a seed turning over 8 pullers used ~80 % of its link and
    # the last puller finished 3-4 s later (swarm_bench, N=8).
    unchoke_slots: int = 8
    peer_stall_timeout: float = 30.0  # a peer with requests pending that sends nothing this long is dropped
    pull_stall_timeout: float = 60.0  # a pull with no block verified for this long ends, naming what is missing
    provides_per_second: float = 5.0
    # ADD_PROVIDER records accepted per sender per 10 s (py-libp2p drops the rest
    # silently; its default of 10 would lose most fragment announcements). Our
    # sweeps send at 80 % of it: 4,000 gives 320 keys/s per receiving peer.
    provider_rate_max: int = 4000
    peers: PeerLimits = field(default_factory=PeerLimits)  # connections and inbound streams peers can make us hold
    metrics: tuple[str, int] | None = None  # (host, port) to serve Prometheus /metrics on; None: not served
    web: tuple[str, int] | None = None  # (loopback host, port) to serve the dashboard on; None: not served
    mdns: bool = False  # find and join nodes on the LAN by multicast DNS (the CLI turns it on)
    # The only republisher (py-libp2p's own is disabled: libp2p_patches/republish.py).
    republish_seconds: float = REPUBLISH_SECONDS


class Node:
    def __init__(self, config: NodeConfig, host: IHost, dht: KadDHT, store: Store, server: FragmentServer) -> None:
        self.config = config
        self.host = host
        self.dht = dht
        self.store = store
        self.server = server
        self._model_queue: deque[str] = deque()
        self._queued: set[str] = set()
        # Model CID -> the next of its fragments to announce. A cursor, not a
        # queue of CIDs: twenty 40,000-fragment models queued 800,000 strings.
        self._sweeps: dict[str, int] = {}
        self._wake = trio.Event()
        self._pulls_transferring = 0
        self._sweep_gate = SweepGate(SWEEP_DEFER_MAX)
        self.announced: set[str] = set()  # model CIDs and single fragments announced (not sweeps: see announced_count)
        self.announced_count = 0  # keys provided, all kinds
        self.swarms: dict[str, ModelSwarm] = {}
        self._swarm_lock = trio.Lock()
        self.banned = server.banned  # sent bad data or broke the protocol: refused by every protocol for a while
        self.nursery: trio.Nursery  # set by open_node; swarms live in it
        self.metrics_url: str | None = None  # where /metrics is served (config.metrics), once bound
        self.dashboard_url: str | None = None  # the dashboard (config.web), with its token, once bound
        self.events = RecentEvents()  # bans, rejected blocks, dashboard actions: the dashboard shows them
        self.indexed = server.indexed  # every model folder of the data dir is in the store
        self.index_seconds = 0.0

    # ---- swarms ------------------------------------------------------------

    async def swarm_for(self, model: LocalModel) -> ModelSwarm:
        """The running swarm of a model (started on first use)."""
        async with self._swarm_lock:  # two callers at once must not see a swarm not yet running
            swarm = self.swarms.get(model.cid)
            if swarm is not None and swarm.failure is not None:
                swarm.stop()  # a pull of it failed: a new pull starts afresh...
                await swarm.closed.wait()  # ...once the old one has let go of its partial files
                swarm = None
            if swarm is None:
                # On a worker thread: resuming a killed pull hashes the blocks it left.
                blocks = await trio.to_thread.run_sync(ModelBlocks, self.store, model)
                swarm = ModelSwarm(self, model, blocks)
                await self.nursery.start(swarm.run)
                self.swarms[model.cid] = swarm
        return swarm

    def fetching_of(self, model_cid: str) -> list[bool] | None:
        """Fragments of a model this node is fetching now (wanted, not yet held)."""
        swarm = self.swarms.get(model_cid)
        if swarm is None or swarm.failure is not None:
            return None
        have = swarm.model.have
        return [k in swarm.wanted and not held for k, held in enumerate(have)]

    async def handle_exchange(self, stream: INetStream) -> None:
        """An inbound session: its Hello names the model. Never raises (an
        exception escaping a libp2p handler kills the host)."""
        peer = stream.muxed_conn.peer_id
        try:
            if peer in self.banned:
                raise StreamClosed("banned peer")
            with trio.fail_after(10):
                first, hello = await read_hello(stream)
            model = await self.server.model(hello.model_cid)
            if model is None:
                with trio.move_on_after(2):
                    await stream.write(encode_exchange(Error(ErrorCode.NOT_FOUND, "model not held here")))
                await stream.close()
                return
            swarm = await self.swarm_for(model)
            swarm.accept(stream, first)
        except Exception as e:
            log.info("inbound session from %s refused: %r", peer, e)
            try:
                await stream.reset()
            except Exception:
                pass

    def ban(self, peer: ID, reason: str) -> None:
        """Refuse `peer` everywhere for a while, and close its connections now."""
        self.banned.ban(peer, reason)
        self.events.add("banned", reason, peer=str(peer))
        self.nursery.start_soon(_disconnect, self.host, peer)

    async def throttle(self, n: int) -> None:
        await self.server.throttle(n)  # one bucket for every upload, v1 requests and sessions alike

    @property
    def uploaded_bytes(self) -> int:
        """Bytes this node has sent to peers: fragments served and swarm blocks."""
        return self.server.served_bytes + sum(s.stats.bytes_uploaded for s in self.swarms.values())

    @property
    def peer_id(self) -> ID:
        return self.host.get_id()

    def addrs(self) -> list[str]:
        return dialable_addrs(self.host)

    # ---- announcing -------------------------------------------------------

    def announce_model(self, model: LocalModel) -> None:
        """Queue the model CID (first) and every fragment CID held for providing."""
        self._queue(model.cid, self._model_queue)
        self._sweeps[model.cid] = 0  # from the first fragment again (a republish, a new holding)
        self._wake.set()

    def announce_fragments(self, model: LocalModel) -> None:
        """A pull completed fragments of `model`: sweep what is held of it once
        no pull transfers (one lookup per keyspace region; a lookup per
        fragment took hours at 40,000)."""
        if model.cid not in self._sweeps:
            self._sweeps[model.cid] = 0
            self._wake.set()

    def _queue(self, key: str, queue: deque[str]) -> None:
        if key not in self._queued:
            self._queued.add(key)
            queue.append(key)
            self._wake.set()

    @contextmanager
    def transferring(self) -> Iterator[None]:
        """While a pull transfers, fragment CIDs wait (model CIDs do not): each
        provide is a DHT lookup whose CPU would slow the transfer, and peers
        find a puller through its model CID and have-set anyway."""
        self._pulls_transferring += 1
        try:
            yield
        finally:
            self._pulls_transferring -= 1
            self._wake.set()

    def announcing_idle(self) -> bool:
        return not (self._model_queue or self._sweeps or self._wake.is_set())

    def _next_key(self) -> str | None:
        """The next model CID to provide; None when none is due. Fragment
        CIDs go by sweeps (`_sweep`)."""
        if not self._model_queue:
            return None
        key = self._model_queue.popleft()
        self._queued.discard(key)
        return key

    async def _announcer(self) -> None:
        interval = 1.0 / self.config.provides_per_second
        while True:
            key = self._next_key()
            if key is not None:
                await self._provide(key)
                await trio.sleep(interval)
            elif self._sweeps and self._pulls_transferring == 0 and self.indexed.is_set():
                # Not while the data dir is read: planning a 40,000-fragment sweep
                # takes ~0.15 s of the event loop that indexing needs too.
                if not self._sweep_may_start(trio.current_time()):
                    await self._wait_for_wake(SWEEP_RECHECK)
                    continue
                model_cid = next(iter(self._sweeps))
                del self._sweeps[model_cid]
                model = self.store.models.get(model_cid)
                if model is not None:
                    await self._sweep(model)
            else:
                self._wake = trio.Event()
                await self._wake.wait()

    def _sweep_may_start(self, now: float) -> bool:
        """May a fragment sweep (or its next region) go now? Not while any of our
        links uploaded within its rate window (SweepGate). Peers in the swarm learn
        what we hold from our sessions, and everyone finds us by the model CID
        (announced at once) meanwhile."""
        uploading = any(link.up.rate(now) > 0 for swarm in self.swarms.values() for link in swarm.links.values())
        return self._sweep_gate.may_start(uploading, now)

    async def _wait_for_wake(self, timeout: float = math.inf) -> None:
        self._wake = trio.Event()
        with trio.move_on_after(timeout):
            await self._wake.wait()

    async def _provide(self, key: str) -> None:
        """One key, one lookup: model CIDs."""
        with trio.move_on_after(30):
            try:
                if await self.dht.provide(key):
                    self.announced_count += 1
                    self.announced.add(key)
            except Exception as e:  # a DHT hiccup must not stop announcing
                log.warning("provide %s failed: %s", key, e)

    def _reached(self, keys: int) -> None:
        self.announced_count += keys

    async def _sweep(self, model: LocalModel) -> None:
        """Every fragment CID held of `model`, by keyspace region (sweep.py): one
        lookup per region, not per key. Model CIDs queued meanwhile go first, and
        the sweep waits while a pull transfers."""
        digests = [model.fragment_digest(k) for k in range(len(model.have)) if model.have[k]]
        keys = [MULTIHASH_SHA256 + d for d in digests if d is not None]
        own = self.peer_id.to_bytes()
        size = estimate_network_size(own, [p.to_bytes() for p in self.dht.routing_table.get_peer_ids()])
        for region in plan_regions(keys, size):
            while True:  # what must not wait behind a sweep
                key = self._next_key()
                if key is not None:
                    await self._provide(key)
                elif self._pulls_transferring > 0:
                    await self._wait_for_wake()
                elif not self._sweep_may_start(trio.current_time()):
                    await self._wait_for_wake(SWEEP_RECHECK)
                else:
                    break
            try:
                with trio.move_on_after(SWEEP_REGION_TIMEOUT):
                    await provide_region(self.host, self.dht, region, self.config.provider_rate_max, self._reached)
            except Exception as e:  # a DHT hiccup must not stop announcing
                log.warning("announcing %d fragment CIDs of %s failed: %s", len(region.keys), model.cid, e)

    async def _republisher(self) -> None:
        while True:
            await trio.sleep(self.config.republish_seconds)
            for model in list(self.store.models.values()):
                self.announce_model(model)

    # ---- peers ------------------------------------------------------------

    async def connect_bootstrap(self) -> list[ID]:
        """Dial every bootstrap peer; fail only if none answers."""
        reached: list[ID] = []
        errors: list[str] = []
        for text in self.config.bootstrap:
            info = parse_peer_addr(text)
            if info.peer_id == self.peer_id:
                continue
            try:
                await connect(self.host, info)
                await self.dht.routing_table.add_peer(info.peer_id)
                reached.append(info.peer_id)
            except Exception as e:
                errors.append(f"{text}: {type(e).__name__}")
        if self.config.bootstrap and not reached and errors:
            raise NodeError("no bootstrap peer reachable (" + "; ".join(errors) + ")")
        return reached

    async def find_providers(self, cid: str, timeout: float = 5.0) -> list[PeerInfo]:
        found: dict[ID, PeerInfo] = {}
        with trio.move_on_after(timeout):
            try:
                for info in await self.dht.find_providers(cid, count=20):
                    if info.peer_id != self.peer_id:
                        found.setdefault(info.peer_id, info)  # py-libp2p returns duplicates
            except Exception as e:
                log.info("find_providers %s failed: %s", cid, e)
        for info in found.values():
            if info.addrs:
                self.host.get_peerstore().add_addrs(info.peer_id, info.addrs, 3600)
        return list(found.values())

    def connected_peers(self) -> list[ID]:
        return [p for p in self.host.get_connected_peers() if p != self.peer_id]


@asynccontextmanager
async def open_node(config: NodeConfig, wait_for_index: bool = True) -> AsyncIterator[Node]:
    """A running node. The host listens before the data dir is indexed (a seed
    of twenty large models answers at once, and serves each model as soon as it
    is read); `wait_for_index=False` yields then, else once `node.indexed`."""
    data_dir = Path(config.data_dir)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        probe = data_dir / ".gguf-swarm-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise NodeError(f"data dir {data_dir} is not writable: {e.strerror}") from None
    listen = [parse_multiaddr(a) for a in config.listen]
    for text in config.bootstrap:
        parse_peer_addr(text)  # fail fast on a malformed address
    store = Store(data_dir)
    key_pair = load_or_create_identity(store.state_dir)
    host = make_host(key_pair, config.peers)
    server = FragmentServer(store, config.serve)
    host.get_network().register_notifee(_BanGate(server.banned))
    try:
        async with host.run(listen_addrs=listen), trio.open_nursery() as nursery:
            dht = KadDHT(host, DHTMode.SERVER)
            dht._provider_rate_max = config.provider_rate_max
            register_name_validator(dht)  # stores refuse forged, expired and older name records
            host.set_stream_handler(PROTOCOL_ID, server.handle)
            node = Node(config, host, dht, store, server)
            server.fetching_of = node.fetching_of
            node.nursery = nursery
            host.set_stream_handler(EXCHANGE_PROTOCOL_ID, node.handle_exchange)
            async with background_trio_service(dht):
                await node.connect_bootstrap()
                nursery.start_soon(node._announcer)
                nursery.start_soon(manage_connections, host, config.peers.prune_interval)
                nursery.start_soon(node._republisher)
                nursery.start_soon(_flush_verified, store)
                nursery.start_soon(_index_models, node)
                if wait_for_index:
                    await node.indexed.wait()
                try:
                    async with AsyncExitStack() as stack:
                        if config.metrics is not None:
                            node.metrics_url = await stack.enter_async_context(serve_metrics(node, *config.metrics))
                        if config.web is not None:
                            from .dashboard import serve_dashboard  # hypercorn: only for a node that serves it

                            node.dashboard_url = await stack.enter_async_context(serve_dashboard(node, *config.web))
                        if config.mdns:
                            await stack.enter_async_context(lan_discovery(node))
                        up = {"peer_id": str(node.peer_id), "addrs": node.addrs(), "data_dir": str(data_dir)}
                        log.info("node running", extra=up)
                        yield node
                finally:
                    server.stop()  # handlers run in libp2p's nursery: cancel them ourselves
                nursery.cancel_scope.cancel()
            await _close_host(host)  # while its network service runs, so connections close in order
    except OSError as e:
        raise NodeError(f"cannot listen on {', '.join(config.listen)}: {e.strerror or e}") from None
    finally:
        await _close_host(host)  # without close() py-libp2p leaks a socket
        store.flush_verified()  # the last batch (synchronous: we may be cancelled; one write per changed folder)


class _BanGate(INotifee):
    """Closes a new connection from a banned peer (py-libp2p has no hook to refuse it before the handshake)."""

    def __init__(self, banned: BanList) -> None:
        self.banned = banned

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        if conn.muxed_conn.peer_id in self.banned:
            with trio.move_on_after(2):
                await conn.close()

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        pass

    async def listen(self, network: INetwork, multiaddr: Multiaddr) -> None:
        pass

    async def listen_close(self, network: INetwork, multiaddr: Multiaddr) -> None:
        pass


async def _index_models(node: Node) -> None:
    """Read the data dir's model folders on worker threads, one per core (a
    manifest never indexed before is parsed by one of as many child processes,
    so the cores parse at once); each model is served and announced as soon as
    it is read."""
    start = trio.current_time()
    store = node.store
    cache = await trio.to_thread.run_sync(store.load_hash_cache)
    cores = max(2, os.cpu_count() or 1)
    limiter = trio.CapacityLimiter(cores)
    pool = manifest_index.ParserPool(cores)  # its processes start only if a manifest needs parsing

    async def read(folder: Path) -> None:
        model = await trio.to_thread.run_sync(store.read_folder, folder, cache, pool, limiter=limiter)
        if model is None or model.cid in store.models:
            return  # unreadable (logged), or a pull began it meanwhile
        store.add_model(model)
        if model.complete or any(model.have):  # a partial replica serves, so announces, its part
            node.announce_model(model)

    try:
        async with trio.open_nursery() as nursery:
            for folder in await trio.to_thread.run_sync(store.model_folders):
                nursery.start_soon(read, folder)
    finally:
        with trio.CancelScope(shield=True):  # a stop while indexing: no parser process left running
            await trio.to_thread.run_sync(pool.close)
    await trio.to_thread.run_sync(store.save_hash_cache, cache)
    node.index_seconds = trio.current_time() - start
    node.indexed.set()
    node._wake.set()  # the sweeps waiting for it


async def _flush_verified(store: Store) -> None:
    """Save the records of newly verified files in batches (see store.py)."""
    while True:
        await trio.sleep(VERIFIED_FLUSH_SECONDS)
        await trio.to_thread.run_sync(store.flush_verified)


async def _disconnect(host: IHost, peer: ID) -> None:
    with trio.move_on_after(5):
        try:
            await host.disconnect(peer)
        except Exception as e:
            log.debug("disconnecting %s: %r", peer, e)


async def _close_host(host: IHost) -> None:
    with trio.move_on_after(5, shield=True):
        try:
            await host.close()
        except Exception:
            pass
