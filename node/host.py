"""The libp2p host: identity, Noise-only security, Yamux, bootstrap dialing.

Measured traps this module exists to avoid (shared/LIBP2P_NOTES.md): default
hosts also accept plaintext; three connections per peer make every dial wait a
250 ms fallback; addresses from `connect()` expire after 120 s.
"""

from __future__ import annotations

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
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport

from .libp2p_patches import apply_all

IDENTITY_FILE = "identity.key"
PERMANENT_TTL = 0  # peerstore: never expire


class NodeError(Exception):
    """A user-facing failure of the node (bad address, unreachable peer, ...)."""


def load_or_create_identity(state_dir: Path) -> KeyPair:
    path = state_dir / IDENTITY_FILE
    if path.exists():
        try:
            return load_identity(path)
        except Exception as e:
            raise NodeError(f"cannot read the node identity {path}: {e}") from None
    key_pair = create_new_key_pair()
    state_dir.mkdir(parents=True, exist_ok=True)
    save_identity(key_pair, path)
    return key_pair


def make_host(key_pair: KeyPair) -> IHost:
    apply_all()  # py-libp2p fixes for measured attacks (node/libp2p_patches)
    noise = NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)
    return new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: noise},  # Noise only: plaintext peers are refused
        muxer_opt=create_yamux_muxer_option(),
        connection_config=ConnectionConfig(max_connections_per_peer=1),
    )


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
