"""Prometheus metrics of a running node, on `/metrics` (`--metrics HOST:PORT`).

Nothing is counted twice: a custom collector reads the node's own counters
and state when Prometheus scrapes. The scrape runs on the HTTP server's
thread, so the snapshot is taken on the trio thread (`trio.from_thread`),
never while a swarm is changing its dicts. Each node has its own registry:
two nodes in one process do not share metrics.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector, CollectorRegistry

from .addresses import parse_host_port
from .errors import NodeError

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger(__name__)


def parse_metrics_addr(text: str | int) -> tuple[str, int]:
    """`HOST:PORT`, `[IPv6]:PORT` or a bare `PORT` (then on 127.0.0.1: a
    non-loopback host is only ever used when written out)."""
    return parse_host_port(text, "metrics", 9100)


@dataclass
class Snapshot:
    """What one scrape reports, copied on the trio thread."""

    uploaded: int = 0
    downloaded: int = 0
    blocks_verified: int = 0
    blocks_rejected: int = 0
    peers_connected: int = 0
    peers_banned: int = 0
    sessions: int = 0
    unchoked: int = 0
    models: list[tuple[str, str, bool, int, int]] = field(default_factory=list)  # cid, name, complete, held, missing


def snapshot(node: Node) -> Snapshot:
    swarms = list(node.swarms.values())
    snap = Snapshot(
        uploaded=node.uploaded_bytes,
        downloaded=sum(s.stats.bytes_fetched for s in swarms),
        blocks_verified=sum(s.stats.blocks_fetched for s in swarms),
        blocks_rejected=sum(s.stats.blocks_rejected for s in swarms),
        peers_connected=len(node.connected_peers()),
        peers_banned=node.banned.active(),
        sessions=sum(len(s.links) for s in swarms),
        unchoked=sum(1 for s in swarms for link in s.links.values() if link.ready and not link.session.am_choking),
    )
    for m in node.store.models.values():
        held = sum(m.have)
        snap.models.append((m.cid, m.name, m.complete, held, len(m.have) - held))
    return snap


class NodeCollector(Collector):
    def __init__(self, node: Node, token: trio.lowlevel.TrioToken) -> None:
        self.node = node
        self.token = token

    def collect(self) -> Iterator[Metric]:
        try:
            snap = trio.from_thread.run_sync(snapshot, self.node, trio_token=self.token)
        except trio.RunFinishedError:
            return  # the node has stopped; the server is going too
        counters = [
            ("gguf_swarm_uploaded_bytes", "Bytes served to peers (exchange sessions and v1 requests)", snap.uploaded),
            ("gguf_swarm_downloaded_bytes", "Bytes received in verified blocks", snap.downloaded),
            ("gguf_swarm_blocks_verified", "Blocks received that matched their digest", snap.blocks_verified),
            ("gguf_swarm_blocks_rejected", "Blocks received that did not match their digest", snap.blocks_rejected),
        ]
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)
        gauges = [
            ("gguf_swarm_peers_connected", "Peers with an open connection", snap.peers_connected),
            ("gguf_swarm_peers_banned", "Peers refused for now (bad data or broken protocol)", snap.peers_banned),
            ("gguf_swarm_sessions", "Exchange sessions open, all models", snap.sessions),
            ("gguf_swarm_unchoked_peers", "Peers we are uploading to (unchoked), all models", snap.unchoked),
            ("gguf_swarm_models", "Models held, complete or not", len(snap.models)),
        ]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        labels = ["model", "name"]
        complete = GaugeMetricFamily("gguf_swarm_model_complete", "1 if every fragment is held", labels=labels)
        held = GaugeMetricFamily("gguf_swarm_fragments_held", "Fragments held, per model", labels=labels)
        missing = GaugeMetricFamily("gguf_swarm_fragments_missing", "Fragments missing, per model", labels=labels)
        for cid, name, is_complete, n_held, n_missing in snap.models:
            complete.add_metric([cid, name], int(is_complete))
            held.add_metric([cid, name], n_held)
            missing.add_metric([cid, name], n_missing)
        yield from (complete, held, missing)


@asynccontextmanager
async def serve_metrics(node: Node, host: str, port: int) -> AsyncIterator[str]:
    """Serve `/metrics` on host:port while the block runs; yields its URL.
    The socket is closed (the port released) on the way out."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node, trio.lowlevel.current_trio_token()))
    try:
        server, thread = start_http_server(port, host, registry)
    except OSError as e:
        raise NodeError(f"cannot serve metrics on {host}:{port}: {e.strerror or e}") from None
    bound_host, bound_port = server.server_address[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    try:
        yield f"http://{shown}:{bound_port}/metrics"
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(_stop, server, thread)


def _stop(server: object, thread: threading.Thread) -> None:
    server.shutdown()  # type: ignore[attr-defined]
    server.server_close()  # type: ignore[attr-defined]
    thread.join(timeout=5)
