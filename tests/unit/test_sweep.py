"""The keyspace sweep's plan (node/sweep.py): regions, their size, the network estimate."""

from __future__ import annotations

import os
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from node.sweep import K, SweepGate, batches, estimate_network_size, kad_id, plan_regions, prefix_bits


def keys(n: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    return [b"\x12\x20" + rng.randbytes(32) for _ in range(n)]


def test_a_small_swarm_is_one_region_a_large_one_many() -> None:
    assert prefix_bits(1) == prefix_bits(10) == prefix_bits(2 * K - 1) == 0  # one lookup for every key
    assert prefix_bits(2 * K) == 1
    assert prefix_bits(1000) == 5  # 32 regions of ~31 peers
    assert prefix_bits(10**12) == 16  # capped


@given(st.integers(min_value=0, max_value=300), st.integers(min_value=1, max_value=5000), st.integers(0, 99))
@settings(max_examples=60, deadline=None)
def test_every_key_is_in_exactly_one_region_whose_prefix_it_has(n: int, network: int, seed: int) -> None:
    ks = keys(n, seed)
    regions = plan_regions(ks + ks[: n // 3], network)  # duplicates are announced once
    flat = [k for r in regions for k in r.keys]
    assert sorted(flat) == sorted(ks)
    bits = prefix_bits(network)
    prefixes = [r.prefix for r in regions]
    assert prefixes == sorted(set(prefixes))  # keyspace order, one region per prefix
    for r in regions:
        assert r.bits == bits and r.keys
        for k in r.keys:
            assert (int.from_bytes(kad_id(k), "big") >> (256 - bits) if bits else 0) == r.prefix
        assert r.target in r.keys


def test_regions_of_a_large_network_split_40000_keys_evenly() -> None:
    regions = plan_regions(keys(40_000), 1000)
    assert len(regions) == 32
    assert all(1000 < len(r.keys) < 1500 for r in regions)  # 1,250 expected each


def test_network_size_is_estimated_from_the_closest_peers() -> None:
    for n in (50, 1000, 20_000):
        ids = [os.urandom(38) for _ in range(n)]
        own = ids[0]
        own_id = int.from_bytes(kad_id(own), "big")
        # What a routing table holds of a large network: the closest peers, and a few far ones.
        closest = sorted(ids[1:], key=lambda p: own_id ^ int.from_bytes(kad_id(p), "big"))
        known = closest[:K] + random.Random(1).sample(closest[K:], min(60, n - 1 - K))
        estimate = estimate_network_size(own, known)
        assert n / 4 < estimate < n * 4, (n, estimate)
    assert estimate_network_size(b"me", []) == 1
    assert estimate_network_size(b"me", [b"a", b"b"]) >= 3  # never below the peers known, and ourselves


def test_batches_cover_the_keys_in_order() -> None:
    ks = keys(10)
    assert [len(b) for b in batches(ks, 4)] == [4, 4, 2]
    assert [k for b in batches(ks, 4) for k in b] == ks


def test_a_sweep_waits_while_the_node_uploads_but_not_forever() -> None:
    gate = SweepGate(max_defer=600.0)
    assert gate.may_start(uploading=False, now=0.0)  # an idle node sweeps at once
    assert not gate.may_start(uploading=True, now=10.0)
    assert not gate.may_start(uploading=True, now=300.0)
    assert gate.may_start(uploading=False, now=301.0)  # the uploads stopped
    assert not gate.may_start(uploading=True, now=400.0)  # a new wait starts from here...
    assert not gate.may_start(uploading=True, now=999.0)
    assert gate.may_start(uploading=True, now=1000.0)  # ...and ends after max_defer, busy or not
    assert not gate.may_start(uploading=True, now=1001.0)  # the next sweep waits afresh
