"""LAN discovery: nodes on one local network find each other by multicast DNS
(libp2p's mDNS discovery, py-libp2p's module over zeroconf), so a `pull`
without `--bootstrap` finds a seed on the same LAN, as ollama users expect of
machines without internet.

py-libp2p's listener runs in zeroconf's thread and records what it hears in
the peerstore; a trio task here connects to each newly heard peer, after
which a pull asks it like any connected peer. Off with `--no-mdns` (or
`[node] mdns = false`).

What we announce is our listen addresses, with a wildcard one (the default
`/ip4/0.0.0.0/tcp/0`) replaced by this machine's interface addresses: another
host that dials 0.0.0.0 dials itself. (py-libp2p's own announcement takes the
host's addresses as they are, so we hand it ours; and its `start()` spawns a
trio system task, which cannot be done from the worker thread that keeps
zeroconf's blocking registration off the event loop: we register there and
clean up stale entries in our own loop.) tests/integration/test_lan_netns.py
checks it between two network namespaces.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from multiaddr import Multiaddr

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger(__name__)
POLL = 1.0  # seconds between looks at what zeroconf heard
RETRY = 30.0  # a peer we could not connect to is tried again after this long
DIALS_PER_POLL = 8
CLEANUP = 60.0  # seconds between clearing services not heard of for two TTLs
# zeroconf sends its first goodbye at once and two more 125 ms apart, and its
# close() waits for them: a pull would end 0.26 s later for the repeats.
GOODBYE_WAIT = 0.05


@asynccontextmanager
async def lan_discovery(node: Node) -> AsyncIterator[None]:
    """Announce this node on the LAN and connect to the nodes heard there, while
    the block runs. Starting takes zeroconf ~1.5 s of probing: it runs in the
    background, so the node is up (and a pull under way) meanwhile."""
    running: list[object] = []
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_run, node, running)
            yield
            nursery.cancel_scope.cancel()
    finally:
        if running:
            with trio.CancelScope(shield=True), trio.move_on_after(GOODBYE_WAIT):
                await trio.to_thread.run_sync(_stop, running[0], abandon_on_cancel=True)


def _stop(discovery: object) -> None:
    try:
        discovery.stop()  # type: ignore[attr-defined]
    except Exception as e:  # stopped before it had started: nothing to take back
        log.info("stopping LAN discovery: %r", e)


async def _run(node: Node, running: list[object]) -> None:
    from libp2p.discovery.mdns.mdns import MDNSDiscovery  # zeroconf: only when used

    addrs = [a.split("/p2p/")[0] for a in node.addrs()]
    ports = [int(a.split("/tcp/")[1].split("/")[0]) for a in addrs if "/tcp/" in a]
    port = ports[0] if ports else 0
    network = node.host.get_network()
    try:
        announced = lan_addrs(addrs, await trio.to_thread.run_sync(_interface_ips))
        discovery = await trio.to_thread.run_sync(lambda: MDNSDiscovery(network, port=port, listen_addrs=announced))
        running.append(discovery)
        await trio.to_thread.run_sync(discovery.broadcaster.register)
    except Exception as e:  # no multicast on this machine, say: the node works without
        log.warning("LAN discovery (mDNS) is off: %s", e)
        return
    log.info("LAN discovery (mDNS) on, announcing %s", " ".join(announced), extra={"addrs": announced})
    await _connect_heard(node, discovery)


def lan_addrs(addrs: Iterable[str], interface_ips: Iterable[str]) -> list[str]:
    """The listen addresses to announce, each wildcard one (0.0.0.0, ::) as one
    address per interface of its family; loopback only when there is no other
    (then only a node on this machine can use it anyway)."""
    ips = [ipaddress.ip_address(ip) for ip in interface_ips]
    out: list[str] = []
    for addr in addrs:
        parts = addr.split("/")  # "", "ip4", HOST, "tcp", PORT, ...
        if len(parts) < 3 or parts[1] not in ("ip4", "ip6") or not ipaddress.ip_address(parts[2]).is_unspecified:
            out.append(addr)
            continue
        version = 4 if parts[1] == "ip4" else 6
        usable = [ip for ip in ips if ip.version == version and not ip.is_link_local]  # fe80::: needs a zone
        outside = [ip for ip in usable if not ip.is_loopback] or usable
        out += ["/".join([*parts[:2], str(ip), *parts[3:]]) for ip in outside]
    return list(dict.fromkeys(out))


def _interface_ips() -> list[str]:
    import ifaddr  # zeroconf's own dependency

    ips: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            ips.append(ip.ip if isinstance(ip.ip, str) else ip.ip[0])  # IPv6: (address, flowinfo, scope)
    return ips


async def _connect_heard(node: Node, discovery: object) -> None:
    tried: dict[ID, float] = {}  # peer -> when we last dialled it (forgotten after RETRY)
    cleaned = trio.current_time()
    while True:
        if trio.current_time() - cleaned >= CLEANUP:
            cleaned = trio.current_time()
            listener = discovery.listener  # type: ignore[attr-defined]
            listener.cleanup_stale_entries(max_age=discovery.ttl * 2)  # type: ignore[attr-defined]
        heard = [peer for peer, _ in list(discovery.listener.discovered_services.values())]  # type: ignore[attr-defined]
        now = trio.current_time()
        for peer, when in list(tried.items()):
            if now - when >= RETRY:
                del tried[peer]
        connected = set(node.connected_peers())
        dials = 0
        for peer in heard:
            if dials >= DIALS_PER_POLL:
                break  # a host announcing thousands of identities gets a few dials a second
            if peer == node.peer_id or peer in node.banned or peer in tried or peer in connected:
                continue
            tried[peer] = now
            dials += 1
            node.nursery.start_soon(_connect, node, peer)
        await trio.sleep(POLL)


async def _connect(node: Node, peer: ID) -> None:
    try:
        addrs = [Multiaddr(str(a)) for a in node.host.get_peerstore().addrs(peer)]
        with trio.fail_after(10):
            await node.host.connect(PeerInfo(peer, addrs))
        log.info("connected to %s, heard on the LAN", peer, extra={"peer": str(peer)})
    except Exception as e:
        log.info("cannot connect to %s, heard on the LAN: %r", peer, e, extra={"peer": str(peer)})
