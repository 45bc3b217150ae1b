"""Kademlia DHT: the node's own republisher is the only one; upstream's loop re-provides nothing.

Flaw (py-libp2p 0.8.1): `KadDHT._run_main_loop` calls
`ProviderStore._republish_provider_records` every 10 minutes, and that
re-provides every key in `providing_keys` (every key ever passed to `provide`,
never removed) whose last republish is 22 h old, counting a key never
republished as due at once. So each of our keys is provided twice within
10 minutes of our announcer providing it, in one burst with no rate limit (a
seed announcing 4,000 fragment CIDs runs 4,000 DHT lookups back to back, on
top of our paced ones), and again every 22 h even after the model is gone
from the data dir. `node.node` already republishes what the store holds, paced
(`Node._republisher`, `provides_per_second`); two republishers double the DHT
traffic for nothing.

Fix: `_republish_provider_records` is replaced by a no-op. KadDHT has no
option for it (its constructor takes none), and the rest of its maintenance
loop (routing-table refresh, expiring records) must keep running, so the one
method is patched rather than the loop.
"""

from __future__ import annotations

from libp2p.kad_dht.provider_store import ProviderStore


async def _no_republish(self: ProviderStore) -> None:
    return None  # the node republishes what it holds itself (node.node.Node._republisher)


def apply() -> None:
    if getattr(ProviderStore, "_gguf_swarm_republish_patch", False):
        return
    ProviderStore._republish_provider_records = _no_republish  # type: ignore[method-assign]
    ProviderStore._gguf_swarm_republish_patch = True  # type: ignore[attr-defined]
