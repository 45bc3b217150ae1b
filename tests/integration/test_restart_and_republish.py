"""Real nodes on 127.0.0.1: a restarted seed serves without hashing its unchanged
files again, and only the node's own republisher re-provides its keys."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest
import trio
from libp2p.kad_dht import kad_dht as kad_module
from libp2p.kad_dht.provider_store import ProviderStore
from libp2p.peer.peerinfo import PeerInfo

from node.client import request_have
from node.node import NodeConfig, open_node
from node.pull import PullOptions, pull_model
from node.store import Store
from protocol import HaveRequest
from protocol.cid import cid_of
from protocol.messages import decode_bitfield
from tests.integration.test_swarm import LOOPBACK, model_folder, node_at


async def test_restarted_seed_serves_without_rehashing(tmp_path: Path) -> None:
    model_folder(tmp_path / "seed")
    for run in range(2):
        async with node_at(tmp_path / "seed") as seed, node_at(tmp_path / f"p{run}", seed.addrs()[:1]) as puller:
            model = next(iter(seed.store.models.values()))
            got, _ = await pull_model(puller, model.cid, PullOptions(find_timeout=20))
            assert got.complete
            hashed = seed.store.hashed_bytes
        if run == 0:
            assert hashed == model.manifest.total_bytes + model.manifest.header_size  # verified before first serve
        else:
            assert hashed == 0  # the saved record (written at shutdown) vouches for every unchanged file
    # The puller's own files were verified as they arrived: its restart (a re-pull of a model held) hashes nothing.
    async with node_at(tmp_path / "p0") as again:
        got, stats = await pull_model(again, model.cid, PullOptions(find_timeout=1))
        blocks = (await again.swarm_for(got)).blocks
        assert all(blocks.file_digests(k) is not None for k in range(len(blocks.specs)))
        assert again.store.hashed_bytes == 0 and stats.bytes_fetched == 0


async def test_only_our_republisher_reprovides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kad_module, "ROUTING_TABLE_REFRESH_INTERVAL", 0.1)  # upstream's loop: every 0.1 s
    provides: Counter[bytes] = Counter()
    upstream_provide = ProviderStore.provide

    async def counting(self: ProviderStore, key: bytes) -> bool:
        provides[key] += 1
        return await upstream_provide(self, key)

    monkeypatch.setattr(ProviderStore, "provide", counting)
    model_folder(tmp_path / "seed")
    async with node_at(tmp_path / "boot") as boot:
        config = NodeConfig(tmp_path / "seed", listen=LOOPBACK, bootstrap=boot.addrs()[:1], provides_per_second=1000.0)
        config.republish_seconds = 3.0
        async with open_node(config) as seed:
            model = next(iter(seed.store.models.values()))
            keys = 1 + sum(model.have)  # the model CID (one provide), its fragments (one sweep)
            with trio.fail_after(10):
                while seed.announced_count < keys:
                    await trio.sleep(0.05)
            await trio.sleep(1.0)  # ten rounds of upstream's maintenance loop
            assert len(provides) == 1 and set(provides.values()) == {1}
            with trio.fail_after(10):
                while min(provides.values()) < 2 or seed.announced_count < 2 * keys:  # ours, after republish_seconds
                    await trio.sleep(0.05)
            assert set(provides.values()) == {2}


async def test_a_seed_listens_before_indexing_and_requests_wait_for_the_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A seed of many large models answers at once; a request for a model it
    has not read yet waits for the index instead of hearing NOT_FOUND."""
    _, folder = model_folder(tmp_path / "seed")
    model_cid = cid_of((folder / "manifest.json").read_bytes())
    slow_read = Store.read_folder

    def read_folder_slowly(self: Store, *args: object) -> object:
        time.sleep(1.5)  # a data dir of twenty 40,000-fragment models
        return slow_read(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(Store, "read_folder", read_folder_slowly)
    config = NodeConfig(tmp_path / "seed", listen=LOOPBACK)
    async with open_node(config, wait_for_index=False) as seed, node_at(tmp_path / "asker") as asker:
        assert not seed.indexed.is_set() and not seed.store.models  # listening, nothing read yet
        await asker.host.connect(PeerInfo(seed.peer_id, seed.host.get_addrs()))
        have = await request_have(asker.host, seed.peer_id, HaveRequest(model_cid))
        assert seed.indexed.is_set() and all(decode_bitfield(have.bitfield, have.count))
