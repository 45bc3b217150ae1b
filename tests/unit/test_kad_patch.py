"""The pure pieces of node/libp2p_patches/kad.py: the bounded provider store
and its ledger, address bounds, ADD_PROVIDER trimming."""

from __future__ import annotations

import time

import pytest
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.kad_dht.provider_store import PROVIDER_RECORD_EXPIRATION_INTERVAL, ProviderStore
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from multiaddr import Multiaddr

from node.libp2p_patches import kad

kad.apply()


def new_id() -> ID:
    return ID.from_pubkey(create_new_key_pair().public_key)


class FakeHost:
    def __init__(self) -> None:
        self.id = new_id()

    def get_id(self) -> ID:
        return self.id


def info(peer: ID, n_addrs: int = 1) -> PeerInfo:
    return PeerInfo(peer, [Multiaddr(f"/ip4/10.0.{i >> 8}.{i & 255}/tcp/4001") for i in range(n_addrs)])


def new_store() -> ProviderStore:
    return ProviderStore(FakeHost())  # type: ignore[arg-type]


def key(i: int) -> bytes:
    return i.to_bytes(34, "big")


def consistent(store: ProviderStore) -> None:
    """The ledger counts exactly the store's records from other peers."""
    local = str(store.local_peer_id)
    held = {(p, k) for k, records in store.providers.items() for p in records if p != local}
    book = kad.ledger(store)
    assert {(p, k) for p, keys in book.keys.items() for k in keys} == held
    assert book.total == len(held)


def test_addresses_per_record_are_capped_deduplicated_and_byte_bounded() -> None:
    store = new_store()
    peer = new_id()
    many = info(peer, 5000).addrs
    store.add_provider(key(1), PeerInfo(peer, many[:3] + many[:3] + many[3:]))
    kept = store.get_providers(key(1))[0].addrs
    assert kept == many[: kad.MAX_ADDRS_PER_RECORD]
    long_name = Multiaddr("/dns4/" + ".".join(["a" * 60] * 4) + "/tcp/4001")  # 249 bytes
    assert len(kad.bounded_addrs([long_name] * 3 + many[:2])) == 3  # repeats dropped
    names = [Multiaddr(f"/dns4/{i}" + ".".join(["a" * 50] * 4) + "/tcp/1") for i in range(8)]  # ~210 bytes each
    assert len(kad.bounded_addrs(names)) == 2  # the per-record byte budget


def test_a_full_key_takes_a_newcomer_in_place_of_its_stalest_provider() -> None:
    store = new_store()
    sybils = [new_id() for _ in range(kad.MAX_PROVIDERS_PER_KEY)]
    for i, s in enumerate(sybils):
        store.add_provider(key(1), info(s))
        store.providers[key(1)][str(s)].timestamp -= 100 - i  # sybils[0] is the stalest
    honest = new_id()
    store.add_provider(key(1), info(honest))
    held = {p.peer_id for p in store.get_providers(key(1))}
    assert honest in held and sybils[0] not in held and len(held) == kad.MAX_PROVIDERS_PER_KEY
    # The node's own record is never the one to give way.
    store.add_provider(key(1), info(store.local_peer_id))
    assert store.local_peer_id in {p.peer_id for p in store.get_providers(key(1))}
    for _ in range(3 * kad.MAX_PROVIDERS_PER_KEY):
        store.add_provider(key(1), info(new_id()))
    assert store.local_peer_id in {p.peer_id for p in store.get_providers(key(1))}
    assert len(store.providers[key(1)]) == kad.MAX_PROVIDERS_PER_KEY
    consistent(store)


def test_records_per_provider_are_capped_but_refreshes_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kad, "MAX_RECORDS_PER_PROVIDER", 10)
    store = new_store()
    peer = new_id()
    for i in range(25):
        store.add_provider(key(i), info(peer))
    assert len(store.get_provided_keys(peer)) == 10
    before = store.providers[key(3)][str(peer)].timestamp
    store.add_provider(key(3), info(peer, 2))  # a refresh of a held key
    assert store.providers[key(3)][str(peer)].timestamp >= before
    assert len(store.providers[key(3)][str(peer)].addresses) == 2
    for i in range(25):
        store.add_provider(key(1000 + i), info(store.local_peer_id))  # our own records: not capped
    assert len(store.get_provided_keys(store.local_peer_id)) == 25
    consistent(store)


def test_a_full_store_evicts_from_the_heaviest_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kad, "MAX_RECORDS", 100)
    store = new_store()
    flooder, second, honest = new_id(), new_id(), new_id()
    for i in range(150):
        store.add_provider(key(i), info(flooder))
    assert store.size() == 100
    for i in range(80):
        store.add_provider(key(1000 + i), info(second))
    counts = [len(store.get_provided_keys(p)) for p in (flooder, second)]
    assert sum(counts) == 100 and abs(counts[0] - counts[1]) <= 1  # shared out evenly
    assert key(0) not in store.providers  # the flooder's oldest went first
    store.add_provider(key(5000), info(honest))
    assert store.size() == 100 and len(store.get_provided_keys(honest)) == 1
    # A provider as heavy as anyone gets no more room: its new record is dropped.
    for i in range(10):
        store.add_provider(key(2000 + i), info(second))
    assert store.size() == 100 and honest in {p.peer_id for p in store.get_providers(key(5000))}
    consistent(store)


def test_ledger_follows_records_upstream_expires() -> None:
    store = new_store()
    peers = [new_id() for _ in range(3)]
    for i, p in enumerate(peers):
        store.add_provider(key(1), info(p))
        store.add_provider(key(2 + i), info(p))
    old = time.time() - PROVIDER_RECORD_EXPIRATION_INTERVAL - 1
    store.providers[key(1)][str(peers[0])].timestamp = old
    store.providers[key(3)][str(peers[1])].timestamp = old
    assert {p.peer_id for p in store.get_providers(key(1))} == set(peers[1:])  # upstream drops the expired one
    consistent(store)
    store.cleanup_expired()
    assert key(3) not in store.providers
    consistent(store)


def test_ledger_top_tracks_the_heaviest_provider() -> None:
    book = kad.Ledger()
    for i in range(5):
        book.add("a", key(i))
    for i in range(3):
        book.add("b", key(i))
    assert book.heaviest() == "a" and book.total == 8
    book.add("a", key(0))  # a refresh: no change in counts
    assert book.count("a") == 5 and next(iter(book.keys["a"])) == key(1)
    for i in range(1, 4):
        book.remove("a", key(i))
    assert book.heaviest() == "b"
    for i in range(3):
        book.remove("b", key(i))
    assert book.heaviest() == "a"
    book.remove("a", key(0))
    book.remove("a", key(4))
    assert book.heaviest() is None and book.total == 0 and not book.keys


def test_oversized_add_provider_is_trimmed_before_parsing() -> None:
    msg = Message()
    msg.type = Message.MessageType.ADD_PROVIDER
    msg.key = key(1)
    peer = msg.providerPeers.add()
    peer.id = new_id().to_bytes()
    peer.addrs.extend(Multiaddr(f"/ip4/10.0.{i >> 8}.{i & 255}/tcp/1").to_bytes() for i in range(5000))
    data = msg.SerializeToString()
    trimmed = Message()
    trimmed.ParseFromString(kad.trim_add_provider(data))
    assert len(trimmed.providerPeers[0].addrs) == kad.RAW_ADDRS_KEPT
    assert list(trimmed.providerPeers[0].addrs) == list(msg.providerPeers[0].addrs[: kad.RAW_ADDRS_KEPT])
    other = Message()
    other.type = Message.MessageType.GET_PROVIDERS
    other.key = key(1)
    assert kad.trim_add_provider(other.SerializeToString()) == other.SerializeToString()
    assert kad.trim_add_provider(b"\xff\xff not protobuf") == b"\xff\xff not protobuf"
