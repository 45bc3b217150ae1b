"""Announcing many keys by sweeping the keyspace, region by region (the way
Kubo's sweeping reprovider does), instead of one DHT lookup per key.

Pure planning, no I/O: node/node.py runs the plan.

A lookup finds the k closest peers of a key. Keys whose Kademlia ids share a
prefix long enough that about k peers fall under it have (nearly) the same k
closest peers, so one lookup serves the whole region, and each of those peers
gets the region's keys on one stream. With N peers in the network a region is
`log2(N / k)` bits of prefix: a swarm of ten nodes is one region (one lookup
for 40,000 keys), a thousand peers make 32.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

K = 20  # the DHT's replication factor: peers that store each provider record
MAX_PREFIX_BITS = 16  # 65,536 regions: beyond any network this node will see


def kad_id(key: bytes) -> bytes:
    """The Kademlia id of a DHT key (a multihash) or of a peer id's bytes:
    distances are XORs of these (py-libp2p hashes keys with SHA-256)."""
    return hashlib.sha256(key).digest()


def estimate_network_size(own_id: bytes, peer_ids: Iterable[bytes], k: int = K) -> int:
    """Peers in the network, from how close the nearest known peers are: the
    i-th closest at XOR distance d suggests i * 2**256 / d peers in all (the
    estimator libp2p's DHTs use). The median over the k closest, never fewer
    than the peers known."""
    own = int.from_bytes(kad_id(own_id), "big")
    distances = sorted(own ^ int.from_bytes(kad_id(p), "big") for p in peer_ids)
    if not distances:
        return 1
    estimates = [(i + 1) * (1 << 256) // max(d, 1) for i, d in enumerate(distances[:k])]
    return max(len(distances) + 1, _median(estimates))


def _median(values: list[int]) -> int:
    # Not statistics.median: `statistics` brings in `fractions` and `decimal`,
    # ~40 ms of every node's start, for this one call.
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) // 2


def prefix_bits(network_size: int, k: int = K) -> int:
    """Bits of prefix that leave about k peers (at least) under each region."""
    bits = 0
    while bits < MAX_PREFIX_BITS and network_size >> (bits + 1) >= k:
        bits += 1
    return bits


@dataclass(frozen=True)
class Region:
    prefix: int  # the region's first `bits` bits of Kademlia id
    bits: int
    keys: list[bytes]  # DHT keys (multihashes) whose ids start with `prefix`, in id order

    @property
    def target(self) -> bytes:
        """The key to look up for the region's closest peers."""
        return self.keys[0]


def plan_regions(keys: Iterable[bytes], network_size: int, k: int = K) -> list[Region]:
    """The keys grouped into keyspace regions, in keyspace order; each key once."""
    bits = prefix_bits(network_size, k)
    ordered = sorted({(kad_id(key), key) for key in keys})
    regions: list[Region] = []
    current: list[bytes] = []
    prefix = -1
    for ident, key in ordered:
        p = int.from_bytes(ident[:4], "big") >> (32 - bits) if bits else 0
        if p != prefix and current:
            regions.append(Region(prefix, bits, current))
            current = []
        prefix = p
        current.append(key)
    if current:
        regions.append(Region(prefix, bits, current))
    return regions


def batches(keys: list[bytes], size: int) -> Iterator[list[bytes]]:
    """`keys` in runs of at most `size` (one stream each)."""
    for i in range(0, len(keys), size):
        yield keys[i : i + size]


class SweepGate:
    """When a due sweep may go. Not while the node uploads: a sweep sends each
    closest peer an ADD_PROVIDER per key, which costs sender and receivers CPU
    that their transfers need: 8 pullers at 100 Mbit/s on 2 cores, each
    sweeping 253 keys to the 8 others while it served them, finished their
    pulls in 48.4 s, against 43.1 s waiting (medians of 3). But after
    `max_defer` seconds of waiting it goes anyway, so a seed that never stops
    serving gets its records out."""

    def __init__(self, max_defer: float) -> None:
        self.max_defer = max_defer
        self.waiting_since: float | None = None

    def may_start(self, uploading: bool, now: float) -> bool:
        if uploading and self.waiting_since is None:
            self.waiting_since = now
        if self.waiting_since is None or not uploading or now - self.waiting_since >= self.max_defer:
            self.waiting_since = None
            return True
        return False
