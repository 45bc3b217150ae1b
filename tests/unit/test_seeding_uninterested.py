"""SuperSeeding.uninterested: a peer that wants none of what it was shown (a partial replica after
other layers, or a peer done) is shown everything, and its share goes to the other pullers."""

from __future__ import annotations

import random

import pytest

from node.seeding import SuperSeeding


def make(n: int = 12, batch: int = 4, seed: int = 1) -> SuperSeeding:
    """Blocks of 1 byte, so bytes count blocks; never alone long enough to be shown everything."""
    return SuperSeeding([1] * n, batch_bytes=batch, alone_after=1e9, rng=random.Random(seed))


def test_an_uninterested_peer_is_shown_everything_and_its_share_goes_to_the_others() -> None:
    s = make()
    for p in "abc":
        s.join(p, 0.0)
    shares = {p: set(s.reveal(p, 0.0)) for p in "abc"}
    assert all(len(v) == 4 for v in shares.values())  # 12 blocks: the pool is empty now
    s.check_invariants()

    new = s.uninterested("a", 1.0)
    s.check_invariants()
    assert new == sorted(set(range(12)) - shares["a"])  # only what it had not been shown
    assert s.shown("a") is None and s.is_shown("a", 11)
    assert s.reveal("a", 1.0) == []
    assert s.uninterested("a", 1.0) == []  # again: nothing new

    # b and c drain their shares: what a gave back is handed to them, each block to one of them
    handed: dict[str, set[int]] = {"b": set(), "c": set()}
    for t in range(1, 20):
        for p in "bc":
            for b in sorted(set(s.shown(p) or ()) - s.out):
                s.sent(p, b, float(t))
            s.check_invariants()
        for p in "bc":
            handed[p] |= (set(s.reveal(p, float(t))) & shares["a"]) - s.out  # in its share, not seen out
            s.check_invariants()
    assert handed["b"] | handed["c"] == shares["a"]
    assert not handed["b"] & handed["c"]  # disjoint shares, still
    assert s.sends == [1] * 12  # nothing went out twice
    assert not s.active


def test_uninterested_before_any_reveal() -> None:
    s = make()
    s.join("a", 0.0)
    s.join("b", 0.0)
    assert s.uninterested("a", 0.0) == list(range(12))
    s.check_invariants()
    assert len(s.reveal("b", 0.0)) == 4  # b still gets a share, not everything
    s.check_invariants()
    # a peer not yet joined joins
    assert s.uninterested("z", 0.0) == list(range(12)) and "z" in s.peers
    s.check_invariants()


def test_blocks_an_uninterested_peer_holds_stay_out() -> None:
    s = make()
    for p in "ab":
        s.join(p, 0.0)
    a = sorted(s.reveal("a", 0.0))
    s.sent("a", a[0], 0.0)
    s.uninterested("a", 1.0)
    s.check_invariants()
    assert a[0] in s.out
    b_shown: set[int] = set()
    for t in range(2, 30):
        b_shown |= set(s.reveal("b", float(t)))
        for blk in sorted(b_shown - s.out):
            s.sent("b", blk, float(t))
        s.check_invariants()
    assert s.sends[a[0]] == 1 and sum(s.sends) == 12  # b was never sent a's block by the seed
    assert set(range(12)) - {a[0]} <= b_shown | {a[0]}


# ---- a partial puller and a full one -----------------------------------------------


def simulate(
    n: int, batch: int, partial_wants: set[int], seed: int, share_first: bool = True
) -> tuple[SuperSeeding, dict[str, int]]:
    """One seed; F wants everything, P only `partial_wants`. Pullers trade among themselves first
    (what the other holds, from its HAVEs), then request from the seed what it has shown them.
    The node calls `uninterested` for a peer whose shown-but-not-held blocks hold none it wants.
    Returns the seed's policy and the round each puller finished in."""
    rng = random.Random(seed)
    s = SuperSeeding([1 + rng.randrange(3) for _ in range(n)], batch_bytes=batch, alone_after=1e9, rng=rng)
    wants = {"F": set(range(n)), "P": set(partial_wants)}
    holds: dict[str, set[int]] = {"F": set(), "P": set()}
    shown_wanted: dict[str, set[int]] = {"F": set(), "P": set()}
    traded: dict[str, set[int]] = {"F": set(), "P": set()}
    finished: dict[str, int] = {}
    order = ["P", "F"] if share_first else ["F", "P"]
    for p in order:
        s.join(p, 0.0)
    for t in range(1, 4 * n):
        now = float(t)
        for p in order:  # after any event, reveal for every joined peer
            s.reveal(p, now)
            s.check_invariants()
        # trade: each fetches what it wants from the other puller
        for p, other in (("F", "P"), ("P", "F")):
            for b in sorted((holds[other] & wants[p]) - holds[p]):
                holds[p].add(b)
                traded[p].add(b)
                s.peer_has(p, b)
        s.check_invariants()
        # requests to the seed, all at once from what each was shown and lacks
        asks = {}
        for p in order:
            shown = set(range(n)) if s.shown(p) is None else s.shown(p)
            assert shown is not None
            shown_wanted[p] |= shown & wants[p]
            asks[p] = sorted((shown & wants[p]) - holds[p])
        for p in order:
            for b in asks[p]:
                s.sent(p, b, now)
                holds[p].add(b)
            s.check_invariants()
        for p in order:  # the sends were events too
            s.reveal(p, now)
        for p in order:
            shown = set(range(n)) if s.shown(p) is None else s.shown(p)
            assert shown is not None
            if not (shown - holds[p]) & wants[p] and s.shown(p) is not None:
                s.uninterested(p, now)
                s.check_invariants()
        for p in wants:
            if wants[p] <= holds[p]:
                finished.setdefault(p, t)
        if len(finished) == len(wants):
            break
    assert holds["F"] == set(range(n)), "the full puller did not finish"
    assert holds["P"] >= wants["P"], "the partial puller did not finish"
    for p in wants:  # what it did not get from the other puller, the seed showed it
        assert shown_wanted[p] | traded[p] == wants[p], p
    return s, finished


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("share_first", [True, False])
def test_a_partial_and_a_full_puller_both_finish_and_the_seed_sends_each_block_about_once(
    seed: int, share_first: bool
) -> None:
    n = 60
    rng = random.Random(100 + seed)
    partial = set(rng.sample(range(n), 12))
    s, finished = simulate(n, batch=12, partial_wants=partial, seed=seed, share_first=share_first)
    # P said it wanted none of its share after round 1, and was shown everything: it need not
    # wait for its layers to come round in F's shares (about n / batch rounds)
    assert finished["P"] <= 3, finished
    assert finished["F"] <= n // 6 + 3, finished
    assert all(c >= 1 for c in s.sends)  # the seed is the only source
    # each block leaves the seed once, but for a few the two pullers asked for in the same round
    # (P's, in F's new share, the round P was shown everything)
    assert max(s.sends) <= 2
    assert sum(s.sends) <= n + len(partial) // 3, s.sends


def test_a_partial_puller_whose_layers_are_all_in_the_other_share() -> None:
    # P joins second and wants only blocks the first share went to F with: it is shown
    # nothing it wants until it says so, then everything
    s = make(n=12, batch=4, seed=3)
    s.join("F", 0.0)
    s.join("P", 0.0)
    f_share = set(s.reveal("F", 0.0))
    p_share = set(s.reveal("P", 0.0))
    assert not f_share & p_share
    wants = set(sorted(f_share)[:2])
    assert not p_share & wants
    shown = set(s.uninterested("P", 0.0))
    assert wants <= shown and s.shown("P") is None
    s.check_invariants()
    # P's share is back in the pool: F is handed it once its own drains
    for b in sorted(f_share):
        s.sent("F", b, 1.0)
    assert set(s.reveal("F", 1.0)) & p_share
    s.check_invariants()
