"""Super-seeding of blocks, with a hand-driven clock. Blocks are 1 byte here, so bytes count blocks."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from node.seeding import SuperSeeding


def make(n: int = 12, batch: int = 4, sizes: list[int] | None = None, alone_after: float = 0.0) -> SuperSeeding:
    return SuperSeeding(sizes or [1] * n, batch_bytes=batch, alone_after=alone_after, rng=random.Random(1))


def joined(s: SuperSeeding, *peers: str) -> SuperSeeding:
    for p in peers:
        s.join(p, 0.0)
    return s


def test_a_lone_puller_is_shown_everything() -> None:
    s = joined(make(), "a")
    assert s.reveal("a", 0.0) == list(range(12)) and s.shown("a") is None
    assert s.reveal("a", 1.0) == []
    assert s.shown("nobody") == set()
    s.check_invariants()


def test_a_lone_puller_gets_a_share_until_it_has_been_alone_for_a_while() -> None:
    s = make(alone_after=2.0)
    s.join("a", 0.0)
    first = set(s.reveal("a", 0.0))
    assert len(first) == 4 and s.shown("a") == first  # others may be a few milliseconds behind
    s.join("b", 0.1)
    assert not set(s.reveal("b", 0.1)) & first  # so the second one gets blocks of its own
    s.leave("b")
    assert s.reveal("a", 1.5) == [] or s.shown("a") is not None
    assert len(s.reveal("a", 2.5)) > 0 and s.shown("a") is None  # alone long enough: everything
    s.check_invariants()


def test_pullers_are_shown_disjoint_shares_of_about_a_batch() -> None:
    s = joined(make(), "a", "b", "c")
    a, b, c = (set(s.reveal(p, 0.0)) for p in "abc")
    assert len(a) == len(b) == len(c) == 4 and not (a & b or a & c or b & c)
    assert s.shown("a") == a and s.reveal("a", 1.0) == []  # nothing new until the share drains
    s.check_invariants()


def test_a_share_is_refilled_once_under_half_a_batch() -> None:
    s = joined(make(), "a", "b")
    a = sorted(s.reveal("a", 0.0))
    b = set(s.reveal("b", 0.0))
    s.sent("a", a[0], 1.0)
    s.sent("a", a[1], 1.0)
    assert s.reveal("a", 1.0) == []  # 2 of 4 left: half a batch
    s.sent("a", a[2], 2.0)
    more = s.reveal("a", 2.0)
    assert len(more) == 3 and not set(more) & (b | set(a))  # back to 4 queued, all new
    s.check_invariants()


def test_blocks_another_peer_got_leave_the_share() -> None:
    s = joined(make(), "a", "b")
    a = sorted(s.reveal("a", 0.0))
    s.reveal("b", 0.0)
    s.peer_has("b", a[0])  # b got it elsewhere; a can get it from b
    s.peer_has("b", a[1])
    s.sent("b", a[2], 1.0)
    assert len(s.reveal("a", 1.0)) == 3
    s.check_invariants()


def test_each_puller_gets_at_most_a_fair_share_of_what_is_left() -> None:
    s = joined(make(n=10, batch=1000), "a", "b")
    a, b = set(s.reveal("a", 0.0)), set(s.reveal("b", 0.0))
    assert len(a) == len(b) == 5 and not a & b  # the first to ask does not take it all
    s = joined(make(n=12, batch=1000), "a", "b", "c")
    assert [len(s.reveal(p, 0.0)) for p in "abc"] == [4, 4, 4]
    s = joined(make(sizes=[3, 1, 1, 1, 1, 1], batch=1000), "a", "b")  # 8 bytes: 4 each, block by block
    assert sum(s.sizes[i] for i in s.reveal("a", 0.0)) in (4, 5)
    s.check_invariants()


def test_everything_is_shown_once_every_block_is_out() -> None:
    s = joined(make(n=4, batch=2), "a", "b")
    a, b = s.reveal("a", 0.0), s.reveal("b", 0.0)
    for i in a:
        s.sent("a", i, 1.0)
    assert s.active
    s.sent("a", b[0], 1.0)
    s.peer_has("a", b[1])  # announced by a peer counts as out too
    assert not s.active
    assert sorted(s.reveal("b", 2.0)) == sorted(a) and s.shown("b") is None
    assert sorted(s.reveal("a", 2.0)) == sorted(b) and s.shown("a") is None
    s.check_invariants()


def test_at_the_end_of_the_first_round_a_puller_gets_what_is_out_from_the_others() -> None:
    s = joined(make(n=6, batch=1000), "a", "b", "c")
    a, b, c = (sorted(s.reveal(p, 0.0)) for p in "abc")  # 2 each: the pool is empty
    s.sent("b", b[0], 1.0)
    for i in a:
        s.sent("a", i, 1.0)
    assert s.reveal("a", 1.0) == []  # a's share is done; b[0] is out, and b has it for a
    assert s.uninterested("a", 1.0) == []  # a is not interested: it has its share, not a partial replica
    s.peer_has("a", b[0])  # a got it from b
    assert s.reveal("a", 2.0) == sorted(b + c)  # a holds all that is out: only the seed can feed it
    assert s.shown("a") is None
    s.check_invariants()


def test_with_upload_to_spare_a_puller_at_the_end_of_the_round_is_shown_what_is_out() -> None:
    s = joined(make(n=6, batch=1000), "a", "b", "c")
    a, b, _ = (sorted(s.reveal(p, 0.0)) for p in "abc")
    s.sent("b", b[0], 1.0)
    for i in a:
        s.sent("a", i, 1.0)
    assert s.reveal("a", 1.0) == []  # the seed is busy: a gets b[0] from b
    assert s.reveal("a", 1.5, spare=True) == [b[0]]  # idle: a may ask it of the seed too
    s.sent("a", b[0], 2.0)
    rest = s.reveal("a", 2.0, spare=True)  # a holds all it was shown: the rest, though other shares
    assert len(rest) == 3 and s.shown("a") is None
    s.check_invariants()


def test_a_puller_holding_all_that_is_out_is_shown_the_rest_when_not_interested() -> None:
    s = joined(make(n=4, batch=1000), "a", "b")
    a, b = (sorted(s.reveal(p, 0.0)) for p in "ab")
    for i in a:
        s.sent("a", i, 1.0)
    assert s.uninterested("a", 1.0) == b  # nothing is out that a lacks: b's share it is
    s.check_invariants()


def test_a_puller_that_leaves_gives_its_share_back() -> None:
    s = joined(make(n=6, batch=1000), "a", "b", "c")
    a, b, _ = (set(s.reveal(p, 0.0)) for p in "abc")
    s.leave("a")
    s.check_invariants()
    for i in b:
        s.sent("b", i, 1.0)
    again = set(s.reveal("b", 1.0))  # fair share is now 4 // 2 = 2
    assert again == a
    s.leave("c")
    assert s.reveal("b", 2.0) == sorted(set(range(6)) - a - b)  # alone: everything
    s.check_invariants()


def test_no_blocks_and_one_block() -> None:
    s = joined(make(sizes=[1]), "a", "b")
    assert s.reveal("a", 0.0) == [0] and s.reveal("b", 0.0) == [0]  # b is never shown nothing
    s.check_invariants()
    empty = SuperSeeding([])
    assert not empty.active and empty.reveal("a", 0.0) == [] and empty.shown("a") is None


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 20), st.integers(1, 8), st.lists(st.tuples(st.integers(0, 4), st.integers(0, 3), st.integers())))
def test_shown_only_grows_and_nobody_is_left_without_something_to_ask_for(
    n: int, batch: int, ops: list[tuple[int, int, int]]
) -> None:
    s = SuperSeeding([1 + i % 3 for i in range(n)], batch_bytes=batch, rng=random.Random(n))
    held: dict[int, set[int]] = {}
    shown: dict[int, set[int]] = {}
    for t, (op, peer, x) in enumerate(ops):
        if op == 0:
            s.join(peer, t)
            held.setdefault(peer, set())
            shown.setdefault(peer, set())
        elif op == 1:
            s.leave(peer)
            held.pop(peer, None)
            shown.pop(peer, None)
        elif op == 2 and peer in held:
            new = s.reveal(peer, t, spare=x % 2 == 0)
            assert not set(new) & shown[peer]
            shown[peer] |= set(new)
            now = s.shown(peer)
            assert (set(range(n)) if now is None else now) == shown[peer]
            if len(held[peer]) < n:
                # it can ask the seed for something, or another peer holds a block it lacks
                assert shown[peer] - held[peer] or s.out - held[peer], "a peer that lacks blocks is left with none"
        elif op == 3 and shown.get(peer):
            block = sorted(shown[peer])[x % len(shown[peer])]  # peers only ask for what they were shown
            s.sent(peer, block, t)
            held[peer].add(block)
        elif op == 4 and peer in held:
            s.peer_has(peer, x % n)
            held[peer].add(x % n)
        s.check_invariants()
        if not s.active:
            for p in held:
                assert s.reveal(p, t) == sorted(set(range(n)) - shown[p]) and s.shown(p) is None
                shown[p] = set(range(n))


# ---- a small swarm ------------------------------------------------------------


def swarm(seed: int, super_seeding: bool = True, pullers: int = 4, blocks: int = 64, leaves: int = 0) -> float:
    """Pullers ask the seed only for blocks it showed them, rarest first, and pass blocks among themselves.
    Each source (the seed, each puller) sends one block per tick from a FIFO queue; a puller keeps two
    requests queued at each source and does not see the others' requests. If `leaves`, the last puller
    leaves at that tick, with what it holds. Returns the seed's sends per block."""
    rng = random.Random(seed)
    s = SuperSeeding([1] * blocks, batch_bytes=8, rng=random.Random(seed))
    names = [f"p{i}" for i in range(pullers)]
    held: dict[str, set[int]] = {p: set() for p in names}
    shown: dict[str, set[int]] = {p: set() for p in names}
    queues: dict[str, list[tuple[str, int]]] = {q: [] for q in [*names, "seed"]}
    for p in names:
        s.join(p, 0.0)
    for t in range(1, 10_000):
        if t == leaves:
            gone = names.pop()
            s.leave(gone)
            del queues[gone]
            for q in queues:
                queues[q] = [(p, b) for p, b in queues[q] if p != gone]
        if all(len(held[p]) == blocks for p in names):
            break
        for q, queue in queues.items():
            if queue:
                p, b = queue.pop(0)
                held[p].add(b)
                s.sent(p, b, t) if q == "seed" else s.peer_has(p, b)
        for p in names:
            shown[p] |= set(s.reveal(p, t)) if super_seeding else set(range(blocks))
        for p in rng.sample(names, len(names)):
            pending = {b for q in queues for pp, b in queues[q] if pp == p}
            room = {q: 2 - sum(pp == p for pp, _ in queue) for q, queue in queues.items()}
            holders = [q for q in names if q != p]
            avail = {b: sum(b in held[q] for q in holders) + (b in shown[p]) for b in range(blocks)}
            wanted = [b for b in range(blocks) if b not in held[p] and b not in pending and avail[b]]
            for b in sorted(wanted, key=lambda b: (avail[b], rng.random())):
                sources = [q for q in holders if b in held[q] and room[q] > 0]
                if not sources and b in shown[p] and room["seed"] > 0:
                    sources = ["seed"]
                if sources:
                    q = min(sources, key=lambda q: len(queues[q]))
                    queues[q].append((p, b))
                    room[q] -= 1
        s.check_invariants()
    assert all(len(held[p]) == blocks for p in names)
    return sum(s.sends) / blocks


def test_in_a_small_swarm_each_block_leaves_the_seed_about_once() -> None:
    with_ = [swarm(seed) for seed in range(4)]
    without = [swarm(seed, super_seeding=False) for seed in range(4)]
    assert max(with_) <= 1.1, with_
    assert min(without) > 1.2, without  # what it saves: pullers fetching the same block from the seed


def test_a_puller_that_leaves_mid_way_costs_little() -> None:
    ratios = [swarm(seed, leaves=30) for seed in range(4)]
    assert max(ratios) <= 1.1, ratios


def test_blocks_named_first_are_handed_out_first() -> None:
    s = SuperSeeding([1] * 12, batch_bytes=2, alone_after=0.0, rng=random.Random(5), first=[9, 10, 11])
    s.join("a", 0.0)
    s.join("b", 0.0)
    a, b = set(s.reveal("a", 0.0)), set(s.reveal("b", 0.0))
    assert {9, 10, 11} <= a | b  # the first shares hold the header's blocks
    s.check_invariants()
