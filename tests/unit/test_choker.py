"""The choker, with a hand-driven clock: who gets upload slots, and when."""

from __future__ import annotations

import math
import random
from collections.abc import Hashable

from hypothesis import given, settings
from hypothesis import strategies as st

from node.choker import Choker, PeerRates


def rates(
    down: float = 0.0,
    up: float = 0.0,
    interested: bool = True,
    uploaded: int = 0,
    last: float | None = None,
    joined: float = -1000.0,
) -> PeerRates:
    return PeerRates(interested, down, up, uploaded, last, joined)


def make(**kw: float) -> Choker:
    return Choker(rng=random.Random(1), **kw)  # type: ignore[arg-type]


def busy(peers: dict[Hashable, PeerRates], now: float) -> dict[Hashable, PeerRates]:
    """The same peers, each having just sent a request."""
    for r in peers.values():
        r.last_request = now
    return peers


def test_only_interested_peers_that_are_still_there_get_slots() -> None:
    c = make()
    peers = {"a": rates(), "b": rates(interested=False)}
    assert c.update(0.0, peers, seeding=False) == {"a"} == c.unchoked
    assert c.update(1.0, {"b": rates(interested=False)}, seeding=False) == set()  # a left; not due
    assert c.update(2.0, {}, seeding=True) == set() and c.optimistic is None


def test_downloading_is_tit_for_tat() -> None:
    c = make(slots=4)
    peers = {p: rates(down=float(i)) for i, p in enumerate("abcdefg")}
    got = c.update(0.0, peers, seeding=False)
    assert c.regular == set("defg") and len(got) == 5  # the four fastest, plus one optimistic
    assert c.optimistic in set("abc") and got == c.regular | {c.optimistic}


def test_downloading_ties_go_to_whom_we_upload_faster_then_to_chance() -> None:
    c = make(slots=1)
    peers = {"a": rates(down=5, up=1), "b": rates(down=5, up=2), "x": rates(), "y": rates()}
    c.update(0.0, peers, seeding=False)
    assert c.regular == {"b"}
    winners = set()
    for seed in range(20):
        c = Choker(slots=1, rng=random.Random(seed))
        c.update(0.0, {"a": rates(down=5), "b": rates(down=5), "x": rates()}, seeding=False)
        winners |= c.regular
    assert winners == {"a", "b"}


def test_slots_move_only_at_a_full_rechoke() -> None:
    c = make(slots=1, rechoke_every=10)
    assert c.due(0.0)
    c.update(0.0, {"a": rates(down=9), "b": rates(down=1), "x": rates(), "y": rates()}, seeding=False)
    assert c.regular == {"a"} and not c.due(9.9) and c.due(10.0)
    peers = busy({"a": rates(down=1), "b": rates(down=9), "x": rates(), "y": rates()}, 5.0)
    c.update(5.0, peers, seeding=False)
    assert c.regular == {"a"}  # b is faster now, but nothing is due
    c.update(10.0, busy(peers, 10.0), seeding=False)
    assert c.regular == {"b"}


def test_a_freed_slot_is_filled_at_once() -> None:
    c = make(slots=2, rechoke_every=100)
    peers = {p: rates(down=float(i)) for i, p in enumerate("abcde")}
    c.update(0.0, peers, seeding=False)
    assert c.regular == {"d", "e"}
    del peers["e"]
    peers["d"].interested = False
    c.update(1.0, busy(peers, 1.0), seeding=False)
    assert len(c.regular) == 2 and c.regular <= {"a", "b", "c"}  # not due, but nobody waits for a free slot
    assert c.optimistic is not None and c.optimistic not in c.regular and len(c.unchoked) == 3


def test_an_optimistic_peer_that_earns_a_slot_frees_the_optimistic_one() -> None:
    c = make(slots=1, rechoke_every=10)
    peers = {"a": rates(down=5), "b": rates(), "c": rates(), "d": rates()}
    c.update(0.0, peers, seeding=False)
    lucky = c.optimistic
    assert lucky is not None
    peers[lucky].download_rate = 50  # it paid us back
    c.update(10.0, busy(peers, 10.0), seeding=False)
    assert c.regular == {lucky} and c.optimistic not in (None, lucky)


def test_when_few_are_interested_all_are_unchoked() -> None:
    for seeding in (False, True):
        c = make(slots=4)
        peers = {p: rates(down=float(i) * 1000, up=float(i)) for i, p in enumerate("abcde")}
        assert c.update(0.0, peers, seeding) == set("abcde")
        peers["f"] = rates(joined=1.0)
        c.update(1.0, busy(peers, 1.0), seeding)
        assert len(c.unchoked) == 5  # six now: one waits


def test_the_optimistic_slot_rotates_every_optimistic_every_seconds() -> None:
    c = make(slots=1, rechoke_every=10, optimistic_every=30)
    peers = {"a": rates(down=9), "b": rates(), "c": rates(), "d": rates()}
    c.update(0.0, peers, seeding=False)
    first = c.optimistic
    for t in (10.0, 20.0):
        c.update(t, busy(peers, t), seeding=False)
        assert c.optimistic == first
    c.update(30.0, busy(peers, 30.0), seeding=False)
    assert c.optimistic not in (None, first)


def test_new_peers_are_three_times_as_likely_to_be_the_optimistic_one() -> None:
    picks = 0
    trials = 3000
    for seed in range(trials):
        c = Choker(slots=1, optimistic_every=30, rng=random.Random(seed))
        peers = {"a": rates(down=9), "new": rates(joined=-60.0), "old1": rates(), "old2": rates()}
        c.update(0.0, peers, seeding=False)
        picks += c.optimistic == "new"
    assert 0.55 < picks / trials < 0.65  # 3 / (3 + 1 + 1); uniform would be 1/3


def test_seeding_a_slot_is_a_turn_of_seed_quota_bytes() -> None:
    c = make(slots=1, rechoke_every=10, seed_quota=100)
    peers = {"a": rates(up=3), "b": rates(up=2), "c": rates(up=1)}
    c.update(0.0, peers, seeding=True)
    assert c.regular == {"a"}  # all started waiting together: the fastest first
    peers["a"].uploaded = 99
    c.update(10.0, busy(peers, 10.0), seeding=True)
    assert c.regular == {"a"}  # quota not reached: keeps its turn
    peers["a"].uploaded = 100
    c.update(20.0, busy(peers, 20.0), seeding=True)
    assert c.regular == {"b"}  # b and c waited since 0: the faster of them
    peers["b"].uploaded = 100
    peers["a"].up = 50
    c.update(30.0, busy(peers, 30.0), seeding=True)
    assert c.regular == {"c"}  # c waited longest; a, though faster now, waits since 20


def test_seeding_a_slow_peer_yields_after_three_rechoke_periods() -> None:
    c = make(slots=1, rechoke_every=10, seed_quota=1 << 30)
    peers = {"a": rates(up=3), "b": rates(), "c": rates()}
    c.update(0.0, peers, seeding=True)
    for t in (10.0, 20.0):
        c.update(t, busy(peers, t), seeding=True)
        assert c.regular == {"a"}
    c.update(30.0, busy(peers, 30.0), seeding=True)
    assert c.regular != {"a"}


def test_seeding_a_spent_peer_keeps_its_slot_when_nobody_waits() -> None:
    c = make(slots=2, rechoke_every=10, seed_quota=100)
    peers = {"a": rates(), "b": rates()}
    c.update(0.0, peers, seeding=True)
    peers["a"].uploaded = 500
    c.update(10.0, busy(peers, 10.0), seeding=True)
    assert c.regular == {"a", "b"}


def test_a_peer_that_holds_a_slot_without_asking_loses_it_even_if_not_due() -> None:
    c = make(slots=2, rechoke_every=100, idle_after=10)
    peers = {"a": rates(), "b": rates()}
    assert c.update(0.0, peers, seeding=False) == {"a", "b"}
    peers["a"].last_request = 5.0
    assert c.update(9.0, peers, seeding=False) == {"a", "b"}  # idle time counts from the unchoke, not joining
    assert c.update(10.0, peers, seeding=False) == {"a"}  # b never asked: choked though a slot is free
    assert c.update(50.0, busy(peers, 50.0), seeding=False) == {"a"}  # and sits out until the next rechoke
    peers["a"].last_request = 99.0
    assert c.update(100.0, peers, seeding=False) == {"a", "b"}
    assert c.update(105.0, peers, seeding=False) == {"a", "b"}  # b's request at 50 is not held against it


def test_an_idle_optimistic_peer_is_replaced() -> None:
    c = make(slots=1, rechoke_every=100, idle_after=10)
    peers = {"a": rates(down=9), "b": rates(), "c": rates()}
    c.update(0.0, peers, seeding=False)
    idle = c.optimistic
    c.update(10.0, busy({p: r for p, r in peers.items() if p != idle}, 10.0) | {idle: peers[idle]}, seeding=False)
    assert c.optimistic not in (None, idle)


# ---- properties -----------------------------------------------------------------

peer_rates = st.builds(
    PeerRates,
    st.booleans(),
    st.floats(0, 1e6),
    st.floats(0, 1e6),
    st.integers(0, 8 << 20),
    st.none() | st.floats(-100, 1000),
    st.floats(-100, 1000),
)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 4),
    st.lists(st.tuples(st.floats(0, 40), st.dictionaries(st.integers(0, 9), peer_rates, max_size=10), st.booleans())),
)
def test_slots_go_only_to_interested_peers_and_none_stays_free_while_someone_waits(
    slots: int, steps: list[tuple[float, dict[Hashable, PeerRates], bool]]
) -> None:
    c = Choker(slots=slots, rng=random.Random(0))
    now = 0.0
    for dt, peers, seeding in steps:
        now += dt
        got = c.update(now, peers, seeding)
        interested = {p for p, r in peers.items() if r.interested}
        assert got <= interested and got == c.unchoked and len(got) <= slots + 1
        assert len(got) == min(slots + 1, len(interested - c.benched))  # nobody waits while a slot is free
        assert c.optimistic is None or c.optimistic in got
        assert len(c.regular) <= slots


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 12), st.integers(1, 4), st.integers(0, 2**32), st.booleans())
def test_seeding_nobody_starves(n: int, slots: int, seed: int, light_updates: bool) -> None:
    """Every interested peer is unchoked within 3 * (ceil(n / slots) + 1) rechoke periods."""
    rng = random.Random(seed)
    quota = 100
    c = Choker(slots=slots, rechoke_every=10, seed_quota=quota, rng=random.Random(seed))
    peers: dict[Hashable, PeerRates] = {i: rates(up=rng.random(), joined=0.0) for i in range(n)}
    bound = 3 * (math.ceil(n / slots) + 1)
    last_unchoked = dict.fromkeys(peers, 0.0)
    for step in range(4 * bound):
        now = 10.0 * step
        for r in peers.values():
            r.upload_rate = rng.random() * 1000
        before = set(c.unchoked)
        got = c.update(now, peers, seeding=True)
        if light_updates:
            got = c.update(now + 5, busy(peers, now + 5), seeding=True)
        for p in got:
            r = peers[p]
            r.uploaded = 0 if p not in before else r.uploaded + rng.randrange(quota)  # counted from the unchoke
            r.last_request = now + 5  # it keeps asking while unchoked
            last_unchoked[p] = now
        for p, t in last_unchoked.items():
            assert now - t <= 10.0 * bound, (p, now, t)
