"""Real nodes on 127.0.0.1: a seed announces every fragment CID of a model by
sweeping the keyspace (one lookup per region, every key of a region to each of
its closest peers on one stream), not by one DHT lookup per key."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from gguf import GGMLQuantizationType as T
from libp2p.kad_dht.peer_routing import PeerRouting

import fragmenter as fr
from node.node import NodeConfig, open_node
from tests.gguf_factory import write_model
from tests.integration.test_swarm import LOOPBACK, node_at


async def test_a_seed_announces_every_fragment_in_one_sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = write_model(tmp_path / "many.gguf", [(f"blk.{i}.ffn_up.weight", T.F32, (64, 1024)) for i in range(5)])
    fr.fragment_model(model, tmp_path / "seed" / "many", chunk_size=4096)  # ~320 fragments
    lookups: list[bytes] = []
    upstream = PeerRouting.find_closest_peers_network

    async def counting(self: PeerRouting, key: bytes, count: int = 20) -> list:
        lookups.append(key)
        return await upstream(self, key, count)

    monkeypatch.setattr(PeerRouting, "find_closest_peers_network", counting)
    async with node_at(tmp_path / "boot") as boot, node_at(tmp_path / "a", boot.addrs()[:1]) as a:
        async with node_at(tmp_path / "b", boot.addrs()[:1]) as b:
            config = NodeConfig(tmp_path / "seed", listen=LOOPBACK, bootstrap=boot.addrs()[:1])
            async with open_node(config) as seed:
                m = next(iter(seed.store.models.values()))
                keys = [b"\x12\x20" + m.fragment_digest(k) for k in range(len(m.have))]  # type: ignore[operator]
                assert len(keys) > 300
                with trio.fail_after(30):
                    while seed.announced_count < 1 + len(keys):  # the model CID, then every fragment
                        await trio.sleep(0.05)
                seed_lookups = [k for k in lookups if k in keys]
                for other in (boot, a, b):
                    store = other.dht.provider_store
                    held = [k for k in keys if str(seed.peer_id) in store.providers.get(k, {})]
                    assert len(held) == len(keys), f"{len(held)} of {len(keys)} fragment keys at {other.peer_id}"
    assert len(seed_lookups) == 1  # four nodes: the whole keyspace is one region
