"""The dashboard's pure parts: availability maps, the snapshot builder and its
bounds, rate history, the event ring, and the address and Host checks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from node.addresses import parse_web_addr
from node.dashboard import host_allowed, origin_allowed
from node.dashboard_state import (
    HISTORY,
    MAX_CELLS,
    MAX_EVENTS,
    MAX_MODELS,
    MAX_PEERS,
    ModelState,
    NodeState,
    PeerState,
    PullState,
    RateHistory,
    TransferState,
    availability,
    build,
    fragment_copies,
)
from node.recent import MAX_TEXT, NodeEvent, RecentEvents


def have(text: str) -> list[bool]:
    """ "1101" -> [True, True, False, True]"""
    return [c == "1" for c in text]


def bits(held: set[int], total: int) -> bytes:
    out = bytearray((total + 7) // 8)
    for b in held:
        out[b >> 3] |= 0x80 >> (b & 7)
    return bytes(out)


def model(cid: str = "bafkreimodel", n: int = 4, held: str | None = None, **kw: object) -> ModelState:
    held = held if held is not None else "1" * n
    args: dict[str, object] = {
        "cid": cid,
        "name": "m",
        "bytes": 1000,
        "complete": "0" not in held,
        "have": have(held),
        "header_present": True,
        "holding": "complete",
        "held_bytes": 1000,
        "copies": [0] * len(held),
    }
    return ModelState(**(args | kw))  # type: ignore[arg-type]


def state(**kw: object) -> NodeState:
    args: dict[str, object] = {
        "peer_id": "12D3KooWself",
        "addrs": ["/ip4/127.0.0.1/tcp/1"],
        "data_dir": "/d",
        "time": 1_700_000_000.0,
        "uptime": 12.0,
        "indexed": True,
        "downloaded": 0,
        "uploaded": 0,
        "models": [],
        "peers": [],
        "transfers": [],
        "events": [],
        "bans": [],
        "bans_total": 0,
        "history": {},
    }
    return NodeState(**(args | kw))  # type: ignore[arg-type]


# ---- availability maps ------------------------------------------------------------


@pytest.mark.parametrize(
    ("held", "copies", "fetching", "cells", "expect_have", "expect_copies"),
    [
        ("1100", [0, 1, 2, 3], (), 4, "2200", "0123"),  # one cell a fragment
        ("1100", [0, 1, 2, 3], (2,), 4, "22f0", "0123"),  # fragment 2 on its way
        ("1100", [0, 1, 2, 3], (), 2, "20", "02"),  # two fragments a cell: the fewest copies shows
        ("1011", [4, 4, 1, 4], (1,), 2, "12", "41"),  # a half-held cell is PART, even while the rest is fetched
        ("0000", [0, 0, 0, 0], (1, 3), 2, "ff", "00"),
        ("110", [3, 3, 0], (), 2, "20", "30"),  # the last cell is shorter
        ("1", [25], (), 4096, "2", "9"),  # one digit: "9" is nine or more
    ],
)
def test_availability_cells(
    held: str, copies: list[int], fetching: tuple[int, ...], cells: int, expect_have: str, expect_copies: str
) -> None:
    got = availability(have(held), copies, fetching, max_cells=cells)
    assert (got["have"], got["copies"]) == (expect_have, expect_copies)
    assert got["cells"] == len(expect_have) and got["fragments"] == len(held)


def test_a_huge_model_is_downsampled_to_the_cell_bound() -> None:
    n = 40_000
    held = [k < 10_000 or k % 2 == 0 for k in range(n)]
    got = availability(held, [1] * n, fetching=[39_999], max_cells=MAX_CELLS)
    assert got["cells"] <= MAX_CELLS and got["per_cell"] == 10 and got["cells"] * got["per_cell"] >= n
    assert got["have"][:1000] == "2" * 1000 and set(got["have"][1000:]) == {"1"}
    assert got["copies"] == "1" * got["cells"]
    assert availability([], [], max_cells=MAX_CELLS)["cells"] == 0


def test_fragment_copies_count_peers_holding_every_block() -> None:
    # Fragment 0: blocks 0-1; fragment 1: block 2; the header (file 2): blocks 3-4.
    first, total = [0, 2, 3], 5
    peers = [bits({0, 1, 2, 3, 4}, total), bits({0, 2}, total), bits({1, 2}, total), bits(set(), total)]
    assert fragment_copies(first, total, 2, peers).tolist() == [1, 3]
    assert fragment_copies(first, total, 2, []).tolist() == [0, 0]
    assert fragment_copies([], 0, 0, peers).tolist() == []


# ---- the snapshot -------------------------------------------------------------------


def test_build_reports_models_peers_and_transfers() -> None:
    s = state(
        models=[model("bafkreib", held="1100", holding="layers 0-1", copies=[1, 1, 2, 0], fetching=frozenset({2}))],
        peers=[
            PeerState("12D3KooWslowpeer", down_rate=10.0),
            PeerState("12D3KooWfastpeer", down_rate=5e6, up_rate=1e3),
        ],
        transfers=[TransferState("bafkreib", "m", 500, 1000, 250.0, 2)],
        events=[NodeEvent(1.0, "banned", "sent block 3 that does not match its digest", "12D3KooWbad")],
        bans=[("12D3KooWbad", "sent block 3 that does not match its digest")],
        bans_total=1,
        history={"down": [1.4, 2.6], "up": [0.0, 0.0], "bafkreib": [3.0]},
        pulls=[PullState("bafkreib", "running")],
    )
    snap = build(s)
    json.dumps(snap)  # JSON-ready as it is
    (m,) = snap["models"]
    assert (m["cid"], m["held"], m["missing"], m["fragments"], m["fetching"]) == ("bafkreib", 2, 2, 4, 1)
    assert m["map"]["have"] == "22f0" and m["map"]["copies"] == "1120"
    assert [p["id"] for p in snap["peers"]] == ["12D3KooWfastpeer", "12D3KooWslowpeer"]  # busiest first
    assert snap["peers"][0]["short"] == "stpeer"
    assert snap["totals"]["down_rate"] == 5_000_010 and snap["totals"]["peers"] == 2 and snap["totals"]["banned"] == 1
    (t,) = snap["transfers"]
    assert t["eta"] == 2 and t["rate"] == 250
    assert snap["history"] == {"down": [1, 3], "up": [0, 0], "bafkreib": [3]}
    assert snap["events"][0]["kind"] == "banned" and snap["bans"][0]["peer"] == "12D3KooWbad"
    assert snap["pulls"] == [{"cid": "bafkreib", "state": "running", "text": ""}]


def test_the_snapshot_stays_bounded() -> None:
    n = 40_000  # fragments of a 400 GB model
    models = [model(f"bafkrei{i:03d}", held="10" * (n // 2), copies=[i % 12] * n) for i in range(MAX_MODELS + 8)]
    peers = [PeerState(f"12D3KooWpeer{i:04d}", down_rate=float(i)) for i in range(640)]
    events = [NodeEvent(float(i), "dropped", "x" * MAX_TEXT, "p") for i in range(200)]
    s = state(models=models, peers=peers, events=events, history={"down": [1.0] * 500, "up": [1.0] * 500})
    snap = build(s)
    assert len(snap["models"]) == MAX_MODELS and snap["totals"]["models"] == MAX_MODELS + 8
    assert all(m["map"]["cells"] <= MAX_CELLS for m in snap["models"])
    assert len(snap["peers"]) == MAX_PEERS and snap["peers"][0]["id"] == "12D3KooWpeer0639"
    assert snap["totals"]["peers"] == 640
    assert len(snap["events"]) == MAX_EVENTS and len(snap["history"]["down"]) == HISTORY
    assert len(json.dumps(snap)) < 600_000  # the worst case a page receives each second


def test_rate_history() -> None:
    h = RateHistory(length=3)
    h.sample(10.0, 0, 0, {"a": 5.0})
    assert h.as_dict() == {"down": [], "up": [], "a": [5.0]}  # a rate needs two samples
    h.sample(11.0, 1000, 200, {"a": 6.0})
    h.sample(12.0, 500, 400, {})  # counters restarted (a failed pull's swarm replaced): never negative
    assert h.as_dict() == {"down": [1000.0, 0.0], "up": [200.0, 200.0]}  # "a" is over
    for t in range(13, 20):
        h.sample(float(t), 500 + 100 * (t - 12), 400, {"b": 1.0})
    assert h.as_dict() == {"down": [100.0] * 3, "up": [0.0] * 3, "b": [1.0] * 3}


def test_recent_events_are_a_bounded_ring() -> None:
    ring = RecentEvents(capacity=3)
    for i in range(5):
        ring.add("banned", f"reason {i}" + "!" * 1000, peer=f"p{i}", now=float(i))
    assert len(ring) == 3 and ring.total == 5
    assert [e.peer for e in ring.latest(2)] == ["p4", "p3"]  # newest first
    assert all(len(e.text) == MAX_TEXT for e in ring)


def test_the_pure_parts_import_no_io_library() -> None:
    code = (
        "import sys, node.dashboard_state, node.recent; "
        "print(sorted(m for m in ('trio', 'libp2p', 'hypercorn') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---- addresses --------------------------------------------------------------------


def test_web_addresses_are_loopback_only() -> None:
    assert parse_web_addr("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_web_addr("8080") == ("127.0.0.1", 8080) == parse_web_addr(8080)
    assert parse_web_addr("localhost:0") == ("127.0.0.1", 0)
    assert parse_web_addr("[::1]:8080") == ("::1", 8080)
    assert parse_web_addr("127.0.0.2:8080") == ("127.0.0.2", 8080)
    for outside in ("0.0.0.0:8080", "[::]:8080", "192.168.1.2:8080", "example.com:8080", "10.0.0.1:80"):
        with pytest.raises(ValueError, match="loopback only"):
            parse_web_addr(outside)
    for bad in ("", "host:", ":8080", "127.0.0.1:99999", "127.0.0.1:http", True, 1.5, None):
        with pytest.raises(ValueError):
            parse_web_addr(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("host", "ok"),
    [
        ("127.0.0.1:8080", True),
        ("127.0.0.1", True),
        ("localhost:8080", True),
        ("LOCALHOST", True),
        ("[::1]:8080", True),
        ("[::1]", True),
        ("evil.example", False),
        ("evil.example:8080", False),
        ("localhost.evil.example", False),
        ("127.0.0.1.nip.io:8080", False),
        ("192.168.1.2:8080", False),
        ("[::1]x", False),
        ("127.0.0.1:port", False),
        ("", False),
    ],
)
def test_host_header_check(host: str, ok: bool) -> None:
    assert host_allowed(host) is ok


def test_origin_check() -> None:
    assert origin_allowed("http://127.0.0.1:8080") and origin_allowed("http://localhost:8080")
    assert not origin_allowed("http://evil.example") and not origin_allowed("null")
    assert not origin_allowed("https://127.0.0.1:8080")  # we serve no https: another page's
