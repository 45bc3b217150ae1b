"""Names on the DHT: publish, republish and resolve `PEER_ID/NAME` records.

The records themselves (bytes, signatures, which one wins) are
`protocol/names.py`; this module moves them through py-libp2p's Kademlia
value store and keeps the publisher's side on disk:

- every node registers `NameValidator` for the `/gguf-swarm-name/` namespace,
  so upstream's PUT_VALUE handler refuses a record that is forged, expired,
  filed under another key or older than the one it stores (py-libp2p 0.8.1
  calls `validate` on every PUT_VALUE and `select([stored, new])` before
  replacing, and resets the stream when either says no);
- a publisher keeps `D/.gguf-swarm/names.json` (name -> CID and sequence
  number), so its sequence only grows, and re-signs each record every
  `REPUBLISH_SECONDS` while it runs, well within `VALIDITY_SECONDS`;
- a resolver asks the nodes closest to the key (and the publisher, when it
  knows its address) itself rather than through `KadDHT.get_value`, which
  answers from its local store whenever that holds anything and would never
  see a newer record; it keeps every valid record, takes the best, and sends
  it to the nodes that answered with an older one.

Only `protocol.names` decides validity; a record's libp2p envelope (signed by
whichever node stored it) is not trusted for anything. Single GET_VALUE and
PUT_VALUE exchanges go through `ValueStore._get_from_peer` / `_store_at_peer`,
private to py-libp2p (pinned at 0.8.1), which has no public per-peer call.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from libp2p.kad_dht.common import format_time_rfc3339
from libp2p.kad_dht.kad_dht import KadDHT
from libp2p.kad_dht.pb.kademlia_pb2 import Record
from libp2p.kad_dht.utils import sort_peer_ids_by_distance
from libp2p.peer.id import ID
from libp2p.records.record import make_signed_put_record
from libp2p.records.validator import Validator

from protocol.names import (
    NAMESPACE,
    InvalidName,
    InvalidRecord,
    NameRecord,
    check_record,
    dht_key,
    encode_record,
    parse_peer_id,
    select_record,
    sign_record,
    validate_name,
)

from .host import NodeError

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger(__name__)

VALIDITY_SECONDS = 48 * 3600  # a record's lifetime (IPNS' default)
REPUBLISH_SECONDS = 4 * 3600  # re-signed and stored again this often while the node runs (IPNS' default)
RETRY_SECONDS = 30.0  # first retry when a record reached no other node (the first node of a swarm)
NAMES_FILE = "names.json"  # in the data dir's .gguf-swarm/
WATCH_SECONDS = 2.0  # how often a running node looks for a changed names.json
QUERY_TIMEOUT = 5.0  # one GET_VALUE / PUT_VALUE
MAX_QUERIED = 20  # nodes asked per lookup: the key's k closest
CONCURRENCY = 3  # Kademlia's alpha
_ALIAS = re.compile(r"[A-Za-z0-9_-]{1,64}")


# ---- the validator every node runs ------------------------------------------------


class NameValidator(Validator):
    """py-libp2p's hook for the `/gguf-swarm-name/` namespace (stores and local puts)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock

    def validate(self, key: str, value: bytes) -> None:
        check_record(value, key, self.clock())  # raises InvalidRecord: upstream refuses the PUT

    def select(self, key: str, values: list[bytes]) -> int:
        best = select_record(key, values, self.clock())
        if best is None:
            raise InvalidRecord("no valid record")
        return best


def register_validator(dht: KadDHT) -> None:
    dht.register_validator(NAMESPACE, NameValidator())


# ---- the publisher's state -----------------------------------------------------------


@dataclass(frozen=True)
class NameEntry:
    value: str  # model CID
    seq: int


def names_path(state_dir: Path) -> Path:
    return state_dir / NAMES_FILE


def load_names(state_dir: Path) -> dict[str, NameEntry]:
    path = names_path(state_dir)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise NodeError(f"cannot read {path}: {e}") from None
    out: dict[str, NameEntry] = {}
    try:
        for name, entry in doc["names"].items():
            out[validate_name(name)] = NameEntry(str(entry["value"]), int(entry["seq"]))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise NodeError(f"cannot read {path}: malformed ({e})") from None
    return out


def save_names(state_dir: Path, names: dict[str, NameEntry]) -> None:
    doc = {"names": {n: {"value": e.value, "seq": e.seq} for n, e in sorted(names.items())}}
    _write_atomic(names_path(state_dir), json.dumps(doc, indent=1) + "\n")


def point_name(state_dir: Path, name: str, cid: str) -> NameEntry:
    """Point `name` at `cid` in the publisher's state: a new CID takes the next sequence number."""
    names = load_names(state_dir)
    old = names.get(validate_name(name))
    entry = NameEntry(cid, 0 if old is None else old.seq + (old.value != cid))
    if entry != old:
        names[name] = entry
        save_names(state_dir, names)
    return entry


# ---- aliases ----------------------------------------------------------------------------


def load_aliases(path: Path) -> dict[str, str]:
    """`[aliases]` of the alias file: short name -> peer id text. No file: none."""
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise NodeError(f"cannot read the alias file {path}: {e}") from None
    table = doc.get("aliases", {})
    if not isinstance(table, dict) or set(doc) - {"aliases"}:
        raise NodeError(f'alias file {path}: expected only an [aliases] table of NAME = "PEER_ID"')
    for alias, peer in table.items():
        if not _ALIAS.fullmatch(alias) or not isinstance(peer, str):
            raise NodeError(f"alias file {path}: bad entry {alias!r}")
        try:
            parse_peer_id(peer)
        except InvalidName as e:
            raise NodeError(f"alias file {path}: {alias}: {e}") from None
    return dict(table)


def add_alias(path: Path, alias: str, peer: str) -> None:
    if not _ALIAS.fullmatch(alias):
        raise NodeError(f"not a valid alias: {alias[:80]!r} (letters, digits, _ and -, at most 64)")
    try:
        parse_peer_id(alias)
    except InvalidName:
        pass
    else:
        raise NodeError(f"an alias cannot itself be a peer id: {alias}")
    try:
        parse_peer_id(peer)
    except InvalidName as e:
        raise NodeError(str(e)) from None
    aliases = load_aliases(path)
    aliases[alias] = peer
    lines = ["# gguf-swarm aliases: `pull ALIAS/NAME` means `pull PEER_ID/NAME`", "[aliases]"]
    lines += [f'{a} = "{p}"' for a, p in sorted(aliases.items())]
    _write_atomic(path, "\n".join(lines) + "\n")


def publisher_of(text: str, aliases: dict[str, str]) -> bytes:
    """The peer id a target's publisher part names: a peer id, else an alias."""
    try:
        return parse_peer_id(text)
    except InvalidName:
        pass
    if text in aliases:
        return parse_peer_id(aliases[text])
    raise NodeError(f"{text[:80]!r} is neither a peer id (12D3KooW...) nor an alias (gguf-swarm alias NAME PEER_ID)")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise NodeError(f"cannot write {path}: {e.strerror or e}") from None


# ---- DHT I/O -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Lookup:
    best: NameRecord | None
    asked: int  # nodes that answered
    records: int  # valid records among the answers


@dataclass(frozen=True)
class Published:
    record: NameRecord
    stored: int  # other nodes that accepted it


def _envelope(node: Node, key: bytes, value: bytes) -> Record:
    record = make_signed_put_record(key, value, node.host.get_private_key())
    record.timeReceived = format_time_rfc3339()
    return record


async def store_record(node: Node, record: NameRecord) -> int:
    """Store `record` here and at the nodes closest to its key; how many others took it."""
    key = dht_key(record.peer_id, record.name)
    key_bytes, value = key.encode(), encode_record(record)
    check_record(value, key, time.time())  # never send what our own stores would refuse
    dht = node.dht
    held = dht.value_store.get(key_bytes)
    if held is None or select_record(key, [held.value, value], time.time()) == 1:
        dht.value_store.put_record(key_bytes, _envelope(node, key_bytes, value))  # not put(): see module doc
    envelope = _envelope(node, key_bytes, value)
    peers = [p for p in await dht.peer_routing.find_closest_peers_network(key_bytes) if p != node.peer_id]
    stored = 0
    limiter = trio.CapacityLimiter(CONCURRENCY)

    async def store_at(peer: ID) -> None:
        nonlocal stored
        async with limiter:
            with trio.move_on_after(QUERY_TIMEOUT):
                if await dht.value_store._store_at_peer(peer, key_bytes, value, record=envelope):
                    stored += 1

    async with trio.open_nursery() as nursery:
        for peer in peers[:MAX_QUERIED]:
            nursery.start_soon(store_at, peer)
    return stored


async def lookup(node: Node, peer_id: bytes, name: str) -> Lookup:
    """Every valid record of `peer_id`'s `name` from the nodes closest to its key
    (and the publisher, when reachable); the best of them, or None."""
    key = dht_key(peer_id, name)
    key_bytes = key.encode()
    dht = node.dht
    found: list[tuple[ID | None, bytes]] = []
    held = dht.value_store.get(key_bytes)
    if held is not None:
        found.append((None, held.value))
    publisher = ID(peer_id)
    candidates = [p for p in await dht.peer_routing.find_closest_peers_network(key_bytes) if p != node.peer_id]
    if publisher != node.peer_id and publisher not in candidates and _reachable(node, publisher):
        candidates.insert(0, publisher)
    asked: set[ID] = set()
    answered = 0
    limiter = trio.CapacityLimiter(CONCURRENCY)

    async def ask(peer: ID) -> None:
        nonlocal answered
        async with limiter:
            with trio.move_on_after(QUERY_TIMEOUT):
                result = await dht.value_store._get_from_peer(
                    peer, key_bytes, return_record=True, return_closer_peers=True
                )
                if not isinstance(result, tuple):
                    return
                answered += 1
                record, closer = result
                if isinstance(record, Record) and record.value:
                    found.append((peer, bytes(record.value)))
                for p in closer:
                    if p not in asked and p not in candidates and p != node.peer_id:
                        candidates.append(p)

    while candidates and len(asked) < MAX_QUERIED:  # rounds, each nearer the key
        batch = []
        for peer in sort_peer_ids_by_distance(key_bytes, candidates):
            if len(asked) + len(batch) >= MAX_QUERIED:
                break
            batch.append(peer)
        candidates = []
        asked.update(batch)
        async with trio.open_nursery() as nursery:
            for peer in batch:
                nursery.start_soon(ask, peer)
    now = time.time()
    valid: list[tuple[ID | None, NameRecord]] = []
    for peer, value in found:
        try:
            valid.append((peer, check_record(value, key, now)))
        except InvalidRecord as e:
            log.info("name record from %s refused: %s", peer, e)
    if not valid:
        return Lookup(None, answered, 0)
    best_index = select_record(key, [encode_record(r) for _, r in valid], now)
    assert best_index is not None  # every candidate is valid
    best = valid[best_index][1]
    best_value = encode_record(best)
    behind = {peer for peer, value in found if peer is not None and value != best_value}  # older, or invalid
    if held is not None and held.value != best_value:  # our own store: never serve the older record again
        dht.value_store.put_record(key_bytes, _envelope(node, key_bytes, best_value))
    if behind:  # entry correction: tell them the newer record
        node.nursery.start_soon(_correct, node, key_bytes, best_value, behind)
    return Lookup(best, answered, len(valid))


async def _correct(node: Node, key_bytes: bytes, value: bytes, peers: set[ID]) -> None:
    envelope = _envelope(node, key_bytes, value)
    for peer in peers:
        with trio.move_on_after(QUERY_TIMEOUT):
            try:
                await node.dht.value_store._store_at_peer(peer, key_bytes, value, record=envelope)
            except Exception as e:
                log.debug("correcting %s: %r", peer, e)


def _reachable(node: Node, peer: ID) -> bool:
    if peer in node.host.get_connected_peers():
        return True
    try:
        return bool(node.host.get_peerstore().addrs(peer))
    except Exception:
        return False


async def resolve_name(node: Node, peer_id: bytes, name: str, timeout: float) -> Lookup:
    """Look the name up until a valid record turns up or `timeout` seconds pass
    (peers found by mDNS or peer exchange may join meanwhile)."""
    result = Lookup(None, 0, 0)
    with trio.move_on_after(timeout):
        while True:
            result = await lookup(node, peer_id, name)
            if result.best is not None:
                return result
            await trio.sleep(1.0)
    return result


async def publish_name(node: Node, name: str, cid: str, validity: float = VALIDITY_SECONDS) -> Published:
    """Sign and store this node's record for `name` -> `cid`: the sequence number
    from names.json (one more when the CID changes), raised past any record of
    ours the DHT still holds (a lost state file must not make names go back)."""
    state_dir = node.store.state_dir
    entry = await trio.to_thread.run_sync(point_name, state_dir, name, cid)
    seq = entry.seq
    me = node.peer_id.to_bytes()
    current = (await lookup(node, me, name)).best
    if current is not None and (current.seq > seq or (current.seq == seq and current.value != cid)):
        seq = current.seq + (current.value != cid)
    if seq != entry.seq:
        names = load_names(state_dir)
        names[name] = NameEntry(cid, seq)
        await trio.to_thread.run_sync(save_names, state_dir, names)
    public_key = node.host.get_public_key().serialize()
    expires = math.floor(time.time() + validity)
    record = sign_record(name, cid, seq, expires, public_key, node.host.get_private_key().sign)
    return Published(record, await store_record(node, record))


async def keep_names_published(
    node: Node,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    interval: float = REPUBLISH_SECONDS,
    validity: float = VALIDITY_SECONDS,
) -> None:
    """Publish every name in names.json now, then again every `interval` seconds
    (sooner, backing off from RETRY_SECONDS, while a record reached no other
    node), and at once when the file changes (`gguf-swarm name` while we run)."""
    retry = RETRY_SECONDS
    path = names_path(node.store.state_dir)
    while True:
        lonely = False
        try:
            names = await trio.to_thread.run_sync(load_names, node.store.state_dir)
        except NodeError as e:  # a damaged names.json: say so, keep serving, look again when it changes
            names = {}
            if on_event is not None:
                on_event({"event": "name_error", "name": str(path), "error": str(e)})
        for name, entry in names.items():
            try:
                published = await publish_name(node, name, entry.value, validity)
            except (NodeError, OSError) as e:
                event: dict[str, Any] = {"event": "name_error", "name": name, "error": str(e)}
            except Exception as e:  # a DHT hiccup must not stop the node
                log.warning("publishing name %s failed: %r", name, e)
                event = {"event": "name_error", "name": name, "error": repr(e)}
            else:
                record = published.record
                lonely |= published.stored == 0
                event = {
                    "event": "name_published",
                    "name": f"{node.peer_id}/{name}",
                    "model_cid": record.value,
                    "sequence": record.seq,
                    "expires": record.expires,
                    "stored": published.stored,
                }
            if on_event is not None:
                on_event(event)
        if lonely and retry < interval:
            await _until_changed(path, retry)
            retry *= 2
        else:
            retry = RETRY_SECONDS
            await _until_changed(path, interval)


async def _until_changed(path: Path, seconds: float) -> None:
    """Sleep `seconds`, or until the file at `path` changes (checked every WATCH_SECONDS)."""
    before = _stamp(path)
    with trio.move_on_after(seconds):
        while _stamp(path) == before:
            await trio.sleep(WATCH_SECONDS)


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_ino)
