"""The libp2p host: identity, Noise-only security, Yamux, bootstrap dialing.

Measured traps this module exists to avoid (shared/LIBP2P_NOTES.md): default
hosts also accept plaintext; three connections per peer make every dial wait a
250 ms fallback; addresses from `connect()` expire after 120 s.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import multiaddr
import trio
from libp2p import create_yamux_muxer_option, new_host
from libp2p.abc import IHost
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.identity_utils import load_identity, save_identity
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.rcmgr import new_resource_manager
from libp2p.rcmgr.connection_limits import new_connection_limits_with_defaults
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport

from .errors import NodeError
from .libp2p_patches import apply_all, streams

IDENTITY_FILE = "identity.key"
PERMANENT_TTL = 0  # peerstore: never expire


def load_or_create_identity(state_dir: Path) -> KeyPair:
    path = state_dir / IDENTITY_FILE
    if path.exists():
        try:
            return load_identity(path)
        except Exception as e:
            raise NodeError(f"cannot read the node identity {path}: {e}") from None
    key_pair = create_new_key_pair()
    # Under a temporary name first: a full disk must not leave an empty key that every later start refuses.
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        save_identity(key_pair, tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise NodeError(f"cannot write the node identity {path}: {e.strerror or e}") from None
    return key_pair


@dataclass(frozen=True)
class PeerLimits:
    """How many connections and streams peers (or one peer's Sybil identities) can make a node hold.

    Defaults are for a seed serving swarms of ~1,000 peers: not every puller
    needs a connection at once, and each held connection costs a Noise session,
    a Yamux reader task and an identify exchange.
    """

    max_connections: int = 640  # hard cap, inbound and outbound: beyond it a connection is closed before its handshake
    high_watermark: int = 512  # above this many, idle connections are pruned...
    low_watermark: int = 384  # ...down to this many (at most 20 per round, py-libp2p's batch)
    # Slots inbound connections may not take, so that the node can always dial
    # out (a pull, a bootstrap peer) while Sybils hold every inbound slot.
    outbound_reserve: int = 32
    grace_period: float = 20.0  # a connection younger than this is never pruned
    prune_interval: float = 10.0  # py-libp2p prunes only when a connection is added; we also do it on a timer
    inbound_streams_per_conn: int = 256  # streams a peer has open to our handlers; beyond: reset at once
    inbound_streams: int = 4096  # the same, all peers together (below rcmgr's 10,000, which queues instead)

    def __post_init__(self) -> None:
        if not 0 <= self.outbound_reserve <= self.low_watermark <= self.high_watermark < self.max_connections:
            raise ValueError(
                "connection limits need 0 <= outbound_reserve <= low_watermark <= high_watermark < max_connections"
            )
        if self.inbound_streams_per_conn < 1 or self.inbound_streams < self.inbound_streams_per_conn:
            raise ValueError("stream limits need 1 <= inbound_streams_per_conn <= inbound_streams")


def make_host(key_pair: KeyPair, limits: PeerLimits | None = None) -> IHost:
    apply_all()  # py-libp2p fixes for measured attacks (node/libp2p_patches)
    limits = limits or PeerLimits()
    noise = NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)
    # rcmgr's own cap on established inbound connections (256 by default) would
    # silently undercut max_connections: raise it so ConnectionConfig decides.
    conn_limits = new_connection_limits_with_defaults()
    conn_limits.max_established_inbound = conn_limits.max_established_outbound = limits.max_connections
    conn_limits.max_established_total = max(conn_limits.max_established_total, limits.max_connections)
    host = new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: noise},  # Noise only: plaintext peers are refused
        muxer_opt=create_yamux_muxer_option(),
        connection_config=ConnectionConfig(
            max_connections_per_peer=1,
            max_connections=limits.max_connections,
            high_watermark=limits.high_watermark,
            low_watermark=limits.low_watermark,
            # Inbound connections get max_connections - min_connections slots.
            min_connections=limits.outbound_reserve,
            grace_period=limits.grace_period,
        ),
        resource_manager=new_resource_manager(connection_limits=conn_limits),
    )
    streams.set_limits(host.get_network(), limits.inbound_streams_per_conn, limits.inbound_streams)
    return host


async def manage_connections(host: IHost, prune_interval: float) -> None:
    """Stop py-libp2p's auto-connector, then run its connection pruner every `prune_interval` s, forever.

    The auto-connector dials peers from the peerstore whenever fewer than
    (low + high watermark) / 2 are connected: measured, 60 s after pruning
    (its back-off) a seed dialled the pruned Sybils back (it learns their
    addresses through identify) to fill its slots itself. Our node dials whom
    it needs: bootstrap peers, DHT lookups, pulls. And upstream prunes only
    when a connection is added, which a node at its cap never does: Sybils
    that filled every slot were never pruned (measured), so no honest peer
    could connect again.
    """
    swarm = host.get_network()
    await swarm.auto_connector.stop()  # type: ignore[attr-defined]
    while True:
        await trio.sleep(prune_interval)
        await swarm.connection_pruner.maybe_prune_connections()  # type: ignore[attr-defined]  # logs its own errors


def parse_multiaddr(text: str) -> multiaddr.Multiaddr:
    try:
        return multiaddr.Multiaddr(text)
    except Exception:
        raise NodeError(f"not a valid multiaddr: {text!r}") from None


def parse_peer_addr(text: str) -> PeerInfo:
    addr = parse_multiaddr(text)
    try:
        return info_from_p2p_addr(addr)
    except Exception:
        raise NodeError(f"multiaddr has no /p2p/<peer id>: {text!r}") from None


def dialable_addrs(host: IHost) -> list[str]:
    peer = host.get_id().to_string()
    out = []
    for a in host.get_addrs():
        s = str(a)
        out.append(s if "/p2p/" in s else f"{s}/p2p/{peer}")
    return out


async def connect(host: IHost, info: PeerInfo, timeout: float = 10.0) -> None:
    host.get_peerstore().add_addrs(info.peer_id, info.addrs, PERMANENT_TTL)
    with trio.fail_after(timeout):
        await host.connect(info)


def peer_id_str(peer: ID) -> str:
    return peer.to_string()
