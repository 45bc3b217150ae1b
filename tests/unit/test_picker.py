"""The block picker, without sockets. Have-sets are strings ("*" held); availability is a digit per block.

Every picker here is a `Checked` one: it runs check_invariants() after every call.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import node.picker
from node.picker import BlockPicker, copy_saves_time


def _checked(name: str) -> Callable[..., Any]:
    method = getattr(BlockPicker, name)

    def call(self: BlockPicker, *args: Any, **kw: Any) -> Any:
        out = method(self, *args, **kw)
        self.check_invariants()
        return out

    return call


class Checked(BlockPicker):
    """A BlockPicker that checks its invariants after every event and decision."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.check_invariants()

    add_peer = _checked("add_peer")
    remove_peer = _checked("remove_peer")
    peer_has = _checked("peer_has")
    peer_has_all = _checked("peer_has_all")
    pick = _checked("pick")
    got = _checked("got")
    rejected = _checked("rejected")
    want = _checked("want")
    unwant = _checked("unwant")
    peer_lacks = _checked("peer_lacks")
    prioritize = _checked("prioritize")


def haves(pattern: str) -> list[int]:
    return [i for i, c in enumerate(pattern) if c == "*"]


def make(total: int, have: str = "", *, copies: int = 2, seed: int = 1, **peers: str) -> Checked:
    """A picker holding `have`, that knows each keyword peer's have-set (or "all": a seed)."""
    p = Checked(total, haves(have), endgame_copies=copies, rng=random.Random(seed))
    for name, pattern in peers.items():
        if pattern == "all":
            p.peer_has_all(name)
        else:
            assert len(pattern) == total, name
            p.peer_has(name, haves(pattern))
    return p


def avail(p: BlockPicker) -> str:
    return "".join(str(p.availability(b)) for b in range(p.total_blocks))


def held(p: BlockPicker) -> str:
    return "".join("*" if p.have_block(b) else " " for b in range(p.total_blocks))


def requested(p: BlockPicker) -> dict[int, set[Any]]:
    """block -> the peers requesting it"""
    out: dict[int, set[Any]] = {}
    for peer in p.peers:
        for b in p.requested_by(peer):
            out.setdefault(b, set()).add(peer)
    return out


def free_available(p: BlockPicker) -> set[int]:
    """Blocks we lack that some peer has and nobody requests: while there are any, no endgame."""
    req = requested(p)
    return {b for b in range(p.total_blocks) if not p.have_block(b) and b not in req and p.availability(b) > 0}


# ---- rarest first ------------------------------------------------------------


def test_rarest_first() -> None:
    p = make(4, a="****", b="*** ", c="**  ")
    assert avail(p) == "3321"
    assert p.pick("a", 1) == [3]  # only a has block 3
    assert p.pick("b", 1) == [2]  # the rarest b has that nobody requests
    assert sorted(p.pick("c", 5)) == [0, 1]
    assert p.pick("a", 5) == [] or not free_available(p)


def test_a_seed_picks_the_rarest_too() -> None:
    p = make(4, a="**  ", b="*   ", s="all")
    assert avail(p) == "3211"
    assert sorted(p.pick("s", 2)) == [2, 3]  # only the seed has them
    assert p.pick("s", 1) == [1]
    assert p.pick("s", 1) == [0]


def test_random_among_the_rarest() -> None:
    first_a, first_s = set(), set()
    for seed in range(60):
        p = make(4, seed=seed, a="****", b="**  ")
        first_a.add(p.pick("a", 1)[0])
        p = make(4, seed=seed, s="all", b="**  ")
        first_s.add(p.pick("s", 1)[0])
    assert first_a == {2, 3}
    assert first_s == {2, 3}


def test_random_in_a_long_bucket_where_the_peer_holds_a_thin_slice() -> None:
    # every block but 0 is held by x and by one of a, b: one bucket of 2,999 at availability 2,
    # of which a holds three (read out of the bitset) or sixty (scanned for)
    total = 3000
    for thin in ([5, 1700, 2999], list(range(7, 3000, 50))):
        firsts = set()
        for seed in range(40 if len(thin) == 3 else 10):
            p = BlockPicker(total, rng=random.Random(seed))
            p.peer_has("x", range(1, total))
            p.peer_has("a", thin)
            p.peer_has("b", sorted(set(range(1, total)) - set(thin)))
            [b] = p.pick("a", 1)
            assert b in thin
            firsts.add(b)
            more = p.pick("a", 100)
            assert sorted(more + [b]) == thin  # all of them, once each
            p.check_invariants()
        assert len(firsts) >= 3


def test_already_held_blocks_are_never_picked() -> None:
    p = make(4, "**  ", a="****")
    assert held(p) == "**  "
    assert sorted(p.pick("a", 4)) == [2, 3]
    assert p.missing_count == 2


# ---- one request per block, until the endgame -----------------------------------


def test_nothing_is_requested_twice_before_the_endgame() -> None:
    p = make(10, a="*" * 10, b="*" * 10, c="*****     ")
    seen: list[int] = []
    for peer in ["c", "a", "b"] * 3:
        seen += p.pick(peer, 1)
    assert len(seen) == 9 and len(set(seen)) == 9
    [last] = free_available(p)
    assert p.pick("b", 1) == [last]
    [dup] = p.pick("a", 1)  # now the endgame: a block b or c requests
    assert requested(p)[dup] in ({"a", "b"}, {"a", "c"})


def test_no_endgame_while_another_peer_has_a_free_block() -> None:
    p = make(3, a="** ", b="  *")
    assert sorted(p.pick("a", 3)) == [0, 1]
    assert p.pick("a", 1) == []  # block 2 is free (b has it): a may not duplicate 0 or 1 yet
    assert p.pick("b", 1) == [2]
    assert p.pick("a", 1) == []  # 0 and 1 are a's own; b has nothing to duplicate


def test_endgame_when_everything_available_is_requested() -> None:
    p = make(4, a="*** ", b="*   ")  # nobody has block 3: it does not hold the endgame back
    assert avail(p) == "2110"
    assert sorted(p.pick("a", 2)) == [1, 2]
    assert p.pick("b", 1) == [0]
    assert free_available(p) == set()
    assert p.pick("a", 5) == [0]  # a duplicates what b is fetching
    assert p.pick("b", 5) == []  # b has nothing else
    p.peer_has("c", haves("*** "))
    assert sorted(p.pick("c", 5)) == [1, 2]  # 0 already has endgame_copies requesters
    assert requested(p) == {0: {"a", "b"}, 1: {"a", "c"}, 2: {"a", "c"}}


def test_endgame_copies_bound_the_requesters() -> None:
    p = make(2, copies=3, a="**", b="**", c="**", d="**")
    p.pick("a", 2)
    p.pick("b", 2)
    p.pick("c", 2)
    assert p.pick("d", 2) == []
    assert all(len(peers) == 3 for peers in requested(p).values())
    p = make(2, copies=1, a="**", b="**")
    p.pick("a", 2)
    assert p.pick("b", 2) == []  # endgame_copies=1: no endgame at all


def test_endgame_copies_only_where_the_caller_agrees() -> None:
    p = make(3, copies=3, a="***", b="***", c="***")
    assert sorted(p.pick("a", 3)) == [0, 1, 2]
    asked: list[tuple[str, int, list[str]]] = []

    def only_block_1(peer: str, block: int, requesters: Sequence[str]) -> bool:
        asked.append((peer, block, list(requesters)))
        return block == 1

    assert p.pick("b", 3, only_block_1) == [1]  # 0 and 2 were refused: not asked of b
    assert sorted(asked) == [("b", 0, ["a"]), ("b", 1, ["a"]), ("b", 2, ["a"])]
    assert p.pick("c", 3, lambda peer, block, requesters: False) == []
    assert requested(p) == {0: {"a"}, 1: {"a", "b"}, 2: {"a"}}
    assert sorted(p.pick("c", 3)) == [0, 1, 2]  # no rule given: every copy is allowed


def test_an_endgame_copy_must_come_much_sooner_than_the_request_it_races() -> None:
    assert not copy_saves_time([2.0], 1.5)  # a tie, near enough: the sender's upload for nothing
    assert not copy_saves_time([2.0], 1.0)  # exactly COPY_SPEEDUP sooner is not enough
    assert copy_saves_time([2.0], 0.9)
    assert not copy_saves_time([5.0, 1.0], 0.9)  # the soonest request already asked decides
    assert copy_saves_time([math.inf], 30.0)  # the peer asked sends nothing (stalled, or new)
    assert not copy_saves_time([2.0], math.inf)  # nor does the one we would ask


def test_endgame_prefers_the_blocks_with_fewest_requesters() -> None:
    p = make(3, copies=3, a="***", b="***", c="***")
    assert sorted(p.pick("a", 3)) == [0, 1, 2]
    p.rejected("a", 2)
    assert p.pick("b", 1) == [2]  # free again: not an endgame pick
    p.got("a", 0)
    # 1 is requested by a only and 2 by b only: c duplicates both; then a takes 2, b takes 1
    assert sorted(p.pick("c", 2)) == [1, 2]
    assert p.pick("a", 2) == [2] and p.pick("b", 2) == [1]


# ---- outcomes --------------------------------------------------------------------


def test_got_returns_the_other_requesters() -> None:
    p = make(2, a="**", b="**", c="**", copies=3)
    p.pick("a", 2)
    p.pick("b", 2)
    p.pick("c", 1)
    block = next(iter(p.requested_by("c")))
    assert sorted(p.got("b", block)) == ["a", "c"]
    assert p.have_block(block) and block not in p.requested_by("a") | p.requested_by("c")
    assert p.got("b", block) == []  # again: nothing to cancel
    other = 1 - block
    assert sorted(p.got("z", other)) == ["a", "b"]  # from a peer we did not ask: cancel everyone
    assert p.done and held(p) == "**"


def test_rejected_frees_the_block() -> None:
    p = make(3, a="***", b="***")
    [block] = p.pick("a", 1)
    p.rejected("a", block)
    assert p.requested_by("a") == set()
    assert block in p.pick("b", 3)
    p.rejected("a", block)  # not a's request any more: nothing happens
    assert block in p.requested_by("b")


def test_rejected_by_one_endgame_requester_keeps_the_other() -> None:
    p = make(1, a="*", b="*")
    assert p.pick("a", 1) == [0] and p.pick("b", 1) == [0]
    p.rejected("a", 0)
    assert requested(p) == {0: {"b"}}
    assert p.pick("a", 1) == [0]  # still endgame: a may ask again


def test_bad_data_is_one_call() -> None:
    p = make(2, evil="**", good="**")
    bad = p.pick("evil", 2)
    for b in bad:
        p.rejected("evil", b)  # its bytes did not verify
    assert p.remove_peer("evil") == []
    assert avail(p) == "11"
    assert sorted(p.pick("good", 2)) == [0, 1]


def test_remove_peer_frees_its_requests_and_lowers_availability() -> None:
    p = make(3, a="***", b="** ")
    assert avail(p) == "221"
    assert sorted(p.pick("a", 3)) == [0, 1, 2]
    assert p.remove_peer("a") == [0, 1, 2]
    assert avail(p) == "110" and "a" not in p.peers
    assert p.requested_by("a") == set()
    assert sorted(p.pick("b", 3)) == [0, 1]
    assert p.remove_peer("a") == []  # unknown: nothing


def test_remove_peer_in_the_endgame_leaves_the_other_request() -> None:
    p = make(1, a="*", b="*")
    p.pick("a", 1)
    p.pick("b", 1)
    assert p.remove_peer("a") == [0]
    assert requested(p) == {0: {"b"}}


# ---- seeds, interest, completion -------------------------------------------------


def test_peer_has_all_counts_once() -> None:
    p = make(4, a=" ** ")
    p.peer_has_all("a")  # announced two blocks, then turned out to be a seed
    p.peer_has_all("a")
    p.peer_has("a", [0, 3])  # a seed announcing blocks: nothing changes
    assert avail(p) == "1111"
    p.peer_has("b", haves("****"))  # every block announced one by one: also a seed
    assert avail(p) == "2222"
    p.peer_has_all("new")  # unknown peer: added
    assert avail(p) == "3333" and set(p.peers) == {"a", "b", "new"}
    assert p.remove_peer("a") == []
    assert avail(p) == "2222"


def test_a_seeds_requests_survive_it_becoming_one() -> None:
    p = make(3, a="** ")
    [b] = p.pick("a", 1)
    p.peer_has("a", [2])
    assert p.requested_by("a") == {b}
    assert avail(p) == "111"
    assert p.got("a", b) == []


def test_interesting() -> None:
    p = make(3, "*  ", a="*  ")
    assert not p.interesting("a")  # only what we hold
    assert not p.interesting("nobody")
    p.peer_has("a", [1])
    assert p.interesting("a")
    p.pick("a", 1)
    assert p.interesting("a")  # requested still counts
    p.got("a", 1)
    assert not p.interesting("a")
    p.peer_has_all("s")
    assert p.interesting("s")
    p.got("s", 2)
    assert p.done and not p.interesting("s")


def test_done_and_missing_count() -> None:
    p = make(3, " * ", a="***")
    assert p.missing_count == 2 and not p.done
    for b in p.pick("a", 3):
        p.got("a", b)
    assert p.missing_count == 0 and p.done
    assert p.pick("a", 3) == []
    assert make(0).done


def test_indices_from_the_wire_are_ignored_local_misuse_raises() -> None:
    p = make(3, a="*  ")
    p.peer_has("a", [-1, 3, 99])  # a peer's bitfield padding, say
    assert avail(p) == "100"
    p.rejected("a", 99)  # a reject for a block we never asked: nothing
    with pytest.raises(IndexError):
        p.got("a", 3)
    with pytest.raises(IndexError):
        p.have_block(-1)
    with pytest.raises(IndexError):
        BlockPicker(3, [3])


def test_unknown_peers() -> None:
    p = make(2)
    assert p.pick("ghost", 2) == [] and p.requested_by("ghost") == set()
    p.add_peer("a")
    p.add_peer("a")
    assert list(p.peers) == ["a"] and not p.interesting("a") and avail(p) == "00"
    assert p.pick("a", 0) == []


# ---- fuzzing ----------------------------------------------------------------------

Op = tuple[int, int, int]  # (what, which peer, a number)


def _run(p: BlockPicker, ops: list[Op]) -> None:
    """Events and decisions on five peers; checks the invariants, and the endgame rule on every pick."""
    total = p.total_blocks
    for what, who, arg in ops:
        x = f"p{who}"
        if what == 0:
            p.peer_has(x, [(arg + 7 * k) % (total + 2) - 1 for k in range(1 + arg % 3)])  # -1 and total: ignored
        elif what == 1:
            p.peer_has(x, range(0, total, 1 + arg % 3))
        elif what == 2:
            p.peer_has_all(x)
        elif what == 3:
            p.remove_peer(x)
        elif what in (4, 5, 6):
            before = requested(p)
            picked = p.pick(x, arg % 5)
            assert len(set(picked)) == len(picked)
            for b in picked:
                assert not p.have_block(b) and x not in before.get(b, set())
                if b in before:  # a second request: only in the endgame
                    assert not free_available(p)
        elif what in (7, 8):
            mine = sorted(p.requested_by(x))
            if mine:
                b = mine[arg % len(mine)]
                others = requested(p)[b] - {x}
                assert set(p.got(x, b)) == others
        else:
            mine = sorted(p.requested_by(x))
            if mine:
                p.rejected(x, mine[arg % len(mine)])
        p.check_invariants()


# "draw": no scan at all, so small pickers take the way out of a long bucket.
MODES: dict[str, dict[str, int]] = {"default": {}, "draw": {"_SCAN": 0}}


@pytest.mark.parametrize("mode", MODES)
def test_random_walks_keep_the_invariants(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in MODES[mode].items():
        monkeypatch.setattr(node.picker, name, value)
    rng = random.Random(mode)
    for trial in range(30):
        total = rng.randint(0, 60)
        have = [b for b in range(total) if rng.random() < 0.2]
        p = BlockPicker(total, have, endgame_copies=rng.randint(1, 3), rng=random.Random(trial))
        ops = [
            (rng.choice([0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9]), rng.randrange(5), rng.randrange(1000))
            for _ in range(150)
        ]
        _run(p, ops)


@settings(max_examples=80, deadline=None)
@given(
    total=st.integers(0, 40),
    copies=st.integers(1, 3),
    mode=st.sampled_from(sorted(MODES)),
    ops=st.lists(st.tuples(st.integers(0, 9), st.integers(0, 4), st.integers(0, 999)), max_size=80),
)
def test_any_sequence_of_events_keeps_the_invariants(total: int, copies: int, mode: str, ops: list[Op]) -> None:
    saved = {name: getattr(node.picker, name) for name in MODES[mode]}
    for name, value in MODES[mode].items():
        setattr(node.picker, name, value)
    try:
        _run(BlockPicker(total, range(0, total, 5), endgame_copies=copies, rng=random.Random(total)), ops)
    finally:
        for name, value in saved.items():
            setattr(node.picker, name, value)


def test_drawing_from_a_slice_is_uniform() -> None:
    rng = random.Random(3)
    for _ in range(300):
        size = rng.choice([1, 9, 64, 1000, 5000])
        c = rng.getrandbits(size) if rng.random() < 0.5 else sum(1 << b for b in rng.sample(range(size), 1))
        assert node.picker._bits_of_int(c) == [b for b in range(size) if c >> b & 1]
    bits = [3, 50, 51, 52, 900, 39_000, 39_001]  # bunched and spread, as a peer's slice can be
    c = sum(1 << b for b in bits)
    counts = dict.fromkeys(bits, 0)
    for _ in range(7000):
        drawn = node.picker._sample_bits(c, len(bits), 2, rng)
        assert len(set(drawn)) == 2
        for b in drawn:
            counts[b] += 1
    assert all(1800 < n < 2200 for n in counts.values()), counts  # 2,000 each expected


def test_prioritized_blocks_are_picked_first_in_order() -> None:
    p = BlockPicker(10, rng=random.Random(3))
    p.peer_has_all("seed")
    p.peer_has("a", [2, 7, 8])
    p.prioritize([8, 9, 7])
    assert p.pick("a", 1) == [8]  # a lacks 9, so 7 comes next
    assert p.pick("a", 2) == [7, 2]
    assert p.pick("seed", 1) == [9]
    p.check_invariants()
