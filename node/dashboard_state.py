"""The dashboard's picture of a node: one JSON-ready dict, about once a second.

Two steps, so the interesting part is pure:
- `collect(node, ...)` copies what the page shows out of the running node into
  frozen records. It runs on the trio thread with no await inside, so no swarm
  changes its dicts under it; it does no I/O (no stat, no hashing).
- `build(state)` turns the records into the snapshot: sorted, cut to bounds,
  availability maps downsampled. Unit tests feed it records made by hand.

Bounds (a snapshot goes to every open page each second): at most
`MAX_MODELS` models with maps of at most `MAX_CELLS` cells each (a
40,000-fragment model shows ~10 fragments a cell: the cell's own fragments
held all/some/none, and the fewest copies among them), `MAX_PEERS` peers,
`MAX_EVENTS` events, `HISTORY` seconds of rates. Cells are strings, one
character each, not lists of numbers: a full map is 8 KiB of JSON.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING, Any

import numpy as np

from fragmenter.selection import held_summary

from .recent import NodeEvent

if TYPE_CHECKING:
    from .node import Node

MAX_CELLS = 4096
MAX_MODELS = 32
MAX_PEERS = 100
MAX_EVENTS = 50
MAX_BANS = 20
HISTORY = 120  # one-second samples of the rates kept for the graph
MAX_COPIES_SHOWN = 9  # a cell's copy count is one digit: "9" is nine or more

# A map cell's holding, one character: every fragment of the cell held, some,
# none but being fetched, none.
HELD, PART, FETCHING, NONE = "2", "1", "f", "0"


@dataclass(frozen=True)
class ModelState:
    cid: str
    name: str
    bytes: int
    complete: bool
    have: bytes | Sequence[bool]  # per fragment (manifest order); collect() gives bytes, 0 or 1 each
    header_present: bool
    holding: str  # "complete", "layers 0-8, embeddings", "nothing"
    held_bytes: int
    copies: Sequence[int] | np.ndarray  # per fragment: peers in session with us holding it whole
    fetching: frozenset[int] = frozenset()  # fragments being fetched now (wanted, not held)
    sessions: int = 0
    blocks_verified: int | None = None  # with a swarm running: blocks held of `blocks`
    blocks: int | None = None


@dataclass(frozen=True)
class PeerState:
    peer: str
    down_rate: float = 0.0  # bytes/s we receive from it, all models
    up_rate: float = 0.0
    received: int = 0  # bytes on the wire, this session
    sent: int = 0
    models: int = 0  # sessions with it (one per model)
    unchoked: bool = False  # we upload to it


@dataclass(frozen=True)
class TransferState:
    cid: str
    name: str
    done: int  # bytes of wanted files held
    total: int
    down_rate: float
    peers: int


@dataclass(frozen=True)
class PullState:
    cid: str
    state: str  # "running", "done", "failed"
    text: str = ""


@dataclass(frozen=True)
class NodeState:
    peer_id: str
    addrs: Sequence[str]
    data_dir: str
    time: float  # wall clock
    uptime: float
    indexed: bool
    downloaded: int
    uploaded: int
    models: Sequence[ModelState]
    peers: Sequence[PeerState]
    transfers: Sequence[TransferState]
    events: Sequence[NodeEvent]
    bans: Sequence[tuple[str, str]]  # (peer, reason), at most MAX_BANS
    bans_total: int
    history: Mapping[str, Sequence[float]]  # "down", "up", and per transferring model CID
    pulls: Sequence[PullState] = ()
    models_total: int | None = None  # models held (the list may be cut); None: len(models)
    peers_total: int | None = None


class RateHistory:
    """One-second samples of the node's download and upload rates (bytes/s),
    and of each transferring model's download rate. Pure: fed counters and the time."""

    def __init__(self, length: int = HISTORY) -> None:
        self.length = length
        self.down: deque[float] = deque(maxlen=length)
        self.up: deque[float] = deque(maxlen=length)
        self.models: dict[str, deque[float]] = {}
        self._last: tuple[float, int, int] | None = None

    def sample(self, now: float, downloaded: int, uploaded: int, model_rates: Mapping[str, float]) -> None:
        if self._last is not None:
            then, down, up = self._last
            dt = max(now - then, 1e-3)
            # Counters restart with a model's swarm (a failed pull retried): never a negative rate.
            self.down.append(max(0, downloaded - down) / dt)
            self.up.append(max(0, uploaded - up) / dt)
        self._last = (now, downloaded, uploaded)
        for cid in [c for c in self.models if c not in model_rates]:
            del self.models[cid]  # its transfer is over
        for cid, rate in model_rates.items():
            self.models.setdefault(cid, deque(maxlen=self.length)).append(rate)

    def as_dict(self) -> dict[str, list[float]]:
        return {"down": list(self.down), "up": list(self.up), **{cid: list(h) for cid, h in self.models.items()}}


# ---- pure parts ------------------------------------------------------------


def fragment_copies(first: Sequence[int], total_blocks: int, fragments: int, peer_haves: Iterable[bytes]) -> np.ndarray:
    """Per fragment, how many of the peers hold all its blocks. `first[k]`: the
    first block of file k (fragments, then the header); `peer_haves`: each
    peer's have-bitfield over the blocks, MSB first."""
    copies = np.zeros(fragments, dtype=np.int32)
    if fragments == 0 or total_blocks == 0:
        return copies
    starts = np.asarray(first, dtype=np.int64)
    lengths = np.diff(np.append(starts, total_blocks))[:fragments]
    for bits in peer_haves:
        held = np.unpackbits(np.frombuffer(bytes(bits), dtype=np.uint8), count=total_blocks)
        per_file = np.add.reduceat(held.astype(np.int32), starts)[:fragments]
        copies += (per_file == lengths) & (lengths > 0)
    return copies


def availability(
    have: bytes | Sequence[bool],
    copies: Sequence[int] | np.ndarray,
    fetching: Iterable[int] = (),
    max_cells: int = MAX_CELLS,
) -> dict[str, Any]:
    """The model's map: consecutive fragments grouped so there are at most
    `max_cells` cells; per cell one character of holding (HELD, PART, FETCHING,
    NONE) and one digit of copies (the fewest among its fragments, peers only)."""
    n = len(have)
    if n == 0:
        return {"fragments": 0, "held": 0, "per_cell": 1, "cells": 0, "have": "", "copies": ""}
    per = max(1, math.ceil(n / max(1, max_cells)))
    starts = np.arange(0, n, per)
    flags = np.frombuffer(have, dtype=np.bool_) if isinstance(have, bytes) else np.array(have, dtype=np.bool_)
    held = np.add.reduceat(flags, starts, dtype=np.int32)
    sizes = np.diff(np.append(starts, n))
    wanted = np.zeros(n, dtype=np.bool_)
    busy_fragments = [k for k in fetching if 0 <= k < n]
    if busy_fragments:
        wanted[busy_fragments] = True
    busy = np.add.reduceat(wanted, starts, dtype=np.int32)
    least = np.minimum.reduceat(np.minimum(np.asarray(copies, dtype=np.int32), MAX_COPIES_SHOWN), starts)
    cells = np.where(
        held == sizes, ord(HELD), np.where(held > 0, ord(PART), np.where(busy > 0, ord(FETCHING), ord(NONE)))
    )
    return {
        "fragments": n,
        "held": int(held.sum()),
        "per_cell": per,
        "cells": len(cells),
        "have": cells.astype(np.uint8).tobytes().decode("ascii"),
        "copies": (least + ord("0")).astype(np.uint8).tobytes().decode("ascii"),
    }


def short_id(peer: str) -> str:
    """The last 6 characters, as `where` labels peers."""
    return peer[-6:]


def build(state: NodeState) -> dict[str, Any]:
    """The snapshot the page draws (JSON-ready), within the module's bounds."""
    models = sorted(state.models, key=lambda m: (m.name, m.cid))
    peers = sorted(state.peers, key=lambda p: (-(p.down_rate + p.up_rate), -(p.received + p.sent), p.peer))
    down_rate = sum(p.down_rate for p in state.peers)
    up_rate = sum(p.up_rate for p in state.peers)
    return {
        "node": {
            "peer_id": state.peer_id,
            "addrs": list(state.addrs)[:4],
            "data_dir": state.data_dir,
            "time": round(state.time, 3),
            "uptime": round(state.uptime, 1),
            "indexed": state.indexed,
        },
        "totals": {
            "downloaded": state.downloaded,
            "uploaded": state.uploaded,
            "down_rate": round(down_rate),
            "up_rate": round(up_rate),
            "models": len(state.models) if state.models_total is None else state.models_total,
            "peers": len(state.peers) if state.peers_total is None else state.peers_total,
            "banned": state.bans_total,
        },
        "models": [_model(m) for m in models[:MAX_MODELS]],
        "peers": [_peer(p) for p in peers[:MAX_PEERS]],
        "transfers": [
            {
                "cid": t.cid,
                "name": t.name,
                "done": t.done,
                "total": t.total,
                "rate": round(t.down_rate),
                "peers": t.peers,
                "eta": round((t.total - t.done) / t.down_rate) if t.down_rate > 0 and t.total > t.done else None,
            }
            for t in sorted(state.transfers, key=lambda t: (t.name, t.cid))
        ],
        "history": {key: [round(v) for v in values][-HISTORY:] for key, values in state.history.items()},
        "events": [
            {"time": round(e.time, 3), "kind": e.kind, "text": e.text, "peer": e.peer, "model": e.model}
            for e in islice(state.events, MAX_EVENTS)
        ],
        "bans": [{"peer": p, "reason": r} for p, r in list(state.bans)[:MAX_BANS]],
        "pulls": [{"cid": p.cid, "state": p.state, "text": p.text} for p in state.pulls],
    }


def _model(m: ModelState) -> dict[str, Any]:
    cells = availability(m.have, m.copies, m.fetching)
    held = cells.pop("held")
    return {
        "cid": m.cid,
        "name": m.name,
        "bytes": m.bytes,
        "complete": m.complete,
        "holding": m.holding,
        "held_bytes": m.held_bytes,
        "fragments": len(m.have),
        "held": held,
        "missing": len(m.have) - held,
        "header": m.header_present,
        "fetching": len(m.fetching),
        "sessions": m.sessions,
        "blocks_verified": m.blocks_verified,
        "blocks": m.blocks,
        "map": cells,
    }


def _peer(p: PeerState) -> dict[str, Any]:
    return {
        "id": p.peer,
        "short": short_id(p.peer),
        "down_rate": round(p.down_rate),
        "up_rate": round(p.up_rate),
        "received": p.received,
        "sent": p.sent,
        "models": p.models,
        "unchoked": p.unchoked,
    }


# ---- reading the node (trio thread, no await) --------------------------------


@dataclass
class Caches:
    """What is costly to work out and changes rarely: a partial model's
    holding text, keyed by (model CID, fragments held, header held)."""

    holding: dict[tuple[str, int, bool], tuple[str, int]] = field(default_factory=dict)


def collect(
    node: Node,
    now: float,
    wall: float,
    history: RateHistory,
    pulls: Sequence[PullState] = (),
    caches: Caches | None = None,
    started: float | None = None,
) -> NodeState:
    """Copy what the page shows out of the running node. `now`: trio's clock
    (the rate meters'); `wall`: the wall clock, for people."""
    caches = caches if caches is not None else Caches()
    swarms = dict(node.swarms)
    peer_rows: dict[str, dict[str, Any]] = {str(p): {} for p in node.connected_peers()}
    models: list[ModelState] = []
    for m in list(node.store.models.values()):
        swarm = swarms.get(m.cid)
        have = bytes(m.have)  # a copy, and the cheapest: 0.5 ms for 40,000 fragments
        held = have.count(1)
        if m.complete:
            holding, held_bytes = "complete", m.manifest.total_bytes
        elif held == 0:
            holding, held_bytes = "nothing", 0
        else:
            key = (m.cid, held, m.header_present)
            if key not in caches.holding:
                if len(caches.holding) > 4 * MAX_MODELS:
                    caches.holding.clear()
                summary = held_summary(m.manifest, have)
                caches.holding[key] = (summary.describe(), summary.bytes)
            holding, held_bytes = caches.holding[key]
        copies: Sequence[int] | np.ndarray = ()
        fetching: frozenset[int] = frozenset()
        sessions = 0
        blocks_verified = blocks = None
        if swarm is not None:
            layout = swarm.layout
            ready = [link for link in swarm.links.values() if link.ready]
            sessions = len(ready)
            bitfields = (link.session.peer_have for link in ready)
            copies = fragment_copies(layout.first, layout.total_blocks, len(have), bitfields)
            if swarm.failure is None and swarm.picker is not None:
                fetching = frozenset(k for k in swarm.wanted if k < len(have) and not have[k])
            blocks_verified, blocks = swarm.blocks.have_count, layout.total_blocks
        if len(copies) != len(have):
            copies = np.zeros(len(have), dtype=np.int32)
        models.append(
            ModelState(
                m.cid,
                m.name,
                m.manifest.total_bytes,
                m.complete,
                have,
                m.header_present,
                holding,
                held_bytes,
                copies,
                fetching,
                sessions,
                blocks_verified,
                blocks,
            )
        )
    transfers: list[TransferState] = []
    for cid, swarm in swarms.items():
        rate = 0.0
        for peer, link in swarm.links.items():
            row = peer_rows.setdefault(str(peer), {})
            down, up = link.down.rate(now), link.up.rate(now)
            rate += down
            row["down_rate"] = row.get("down_rate", 0.0) + down
            row["up_rate"] = row.get("up_rate", 0.0) + up
            row["received"] = row.get("received", 0) + link.bytes_in
            row["sent"] = row.get("sent", 0) + link.bytes_out
            row["models"] = row.get("models", 0) + (1 if link.ready else 0)
            row["unchoked"] = row.get("unchoked", False) or (link.ready and not link.session.am_choking)
        if swarm.picker is not None and not swarm.complete.is_set() and swarm.failure is None:
            transfers.append(
                TransferState(cid, swarm.model.name, swarm.wanted_done, swarm.wanted_bytes, rate, len(swarm.links))
            )
    banned = node.banned
    bans_total = banned.active()
    bans = [(str(p), r) for p, r in islice(reversed(banned.reasons.items()), MAX_BANS)]
    return NodeState(
        peer_id=str(node.peer_id),
        addrs=node.addrs()[:4],
        data_dir=str(node.config.data_dir),
        time=wall,
        uptime=0.0 if started is None else now - started,
        indexed=node.indexed.is_set(),
        downloaded=sum(s.stats.bytes_fetched for s in swarms.values()),
        uploaded=node.uploaded_bytes,
        models=models,
        peers=[PeerState(peer, **row) for peer, row in peer_rows.items()],
        transfers=transfers,
        events=node.events.latest(MAX_EVENTS),
        bans=bans,
        bans_total=bans_total,
        history=history.as_dict(),
        pulls=pulls,
        peers_total=len(peer_rows),
    )


def totals(node: Node, now: float) -> tuple[int, int, dict[str, float]]:
    """(bytes downloaded, bytes uploaded, download rate per transferring model):
    what RateHistory samples. `now`: trio's clock."""
    swarms = list(node.swarms.values())
    rates = {
        s.model.cid: sum(link.down.rate(now) for link in s.links.values())
        for s in swarms
        if s.picker is not None and not s.complete.is_set() and s.failure is None
    }
    downloaded = sum(s.stats.bytes_fetched for s in swarms)
    uploaded = node.uploaded_bytes
    return downloaded, uploaded, rates
