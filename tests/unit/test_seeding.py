"""Initial seeding policy, with a hand-driven clock."""

from __future__ import annotations

import random

from node.seeding import InitialSeeding


def shown(bits: list[bool]) -> set[int]:
    return {i for i, b in enumerate(bits) if b}


def make(n: int = 10, size: int = 10, batch: int = 30) -> InitialSeeding:
    return InitialSeeding([size] * n, batch_bytes=batch, reveal_after=30, active_window=5, rng=random.Random(1))


def two_pullers(s: InitialSeeding, now: float = 0.0) -> tuple[set[int], set[int]]:
    """a and b both start pulling; what each is shown once both are known."""
    s.have_for("a", now)
    s.have_for("b", now)
    return shown(s.have_for("a", now)), shown(s.have_for("b", now))


def test_a_single_puller_sees_everything() -> None:
    s = make()
    assert shown(s.have_for("a", 0.0)) == set(range(10))
    assert shown(s.have_for("a", 1.0)) == set(range(10))


def test_concurrent_pullers_see_disjoint_batches() -> None:
    s = make()
    s.have_for("a", 0.0)
    b = shown(s.have_for("b", 0.5))  # now two are pulling
    a = shown(s.have_for("a", 1.0))
    assert len(a) == 3 and len(b) == 3 and not a & b  # 30 bytes of 10-byte fragments each


def test_a_batch_refills_as_fragments_go_out_and_old_ones_are_revealed() -> None:
    s = make()
    s.have_for("a", 0.0)
    s.have_for("b", 0.0)
    a = shown(s.have_for("a", 0.0))
    first = min(a)
    s.sent("a", first, now=1.0)
    a2 = shown(s.have_for("a", 1.0))
    assert first not in a2 and len(a2) == 3  # a new one replaces the one sent
    s.have_for("b", 2.0)
    assert first not in shown(s.have_for("b", 2.0))  # b gets it from a, not from the seed
    s.have_for("a", 40.0)
    assert first in shown(s.have_for("b", 40.0))  # sent 39 s ago: shown to all again


def test_a_puller_that_leaves_returns_its_batch() -> None:
    s = make(n=4, batch=20)
    a, b = two_pullers(s)
    assert a.isdisjoint(b) and len(a | b) == 4
    s.have_for("c", 10.0)  # a and b went quiet
    assert shown(s.have_for("c", 10.0)) == set(range(4))  # only one active puller now
    s.have_for("d", 10.5)
    c = shown(s.have_for("c", 11.0))
    assert len(c) == 2  # a's and b's batches went back to the pool


def test_never_looks_empty_and_ends_showing_everything() -> None:
    s = make(n=1, batch=100)
    a, b = two_pullers(s)
    assert a == {0} and b == {0}  # nothing left for b to be handed: everything, not nothing
    s.sent("a", 0, 1.0)
    assert shown(s.have_for("b", 2.0)) == {0}  # every fragment went out once


def test_each_puller_gets_a_fair_share_of_what_is_left() -> None:
    a, b = two_pullers(make(n=10, batch=1000))
    assert len(a) == 5 and len(b) == 5 and not a & b
