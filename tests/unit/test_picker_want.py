"""BlockPicker.want: a partial replica's picker starts with the blocks it does not want as "have" and
asks for more later. Every picker here checks its invariants after every call."""

from __future__ import annotations

import random

import pytest

from node.picker import BlockPicker
from tests.unit.test_picker import Checked


def partial(total: int, wanted: set[int], seed: int = 1, copies: int = 2) -> Checked:
    """A picker that fetches only `wanted`: everything else is passed as have."""
    return Checked(total, [b for b in range(total) if b not in wanted], endgame_copies=copies, rng=random.Random(seed))


def pick_all(p: BlockPicker, peer: str) -> set[int]:
    out = p.pick(peer, p.total_blocks)
    assert len(out) == len(set(out))
    return set(out)


def test_a_partial_picker_fetches_only_what_it_wants_then_what_it_wants_later() -> None:
    p = partial(10, {0, 1})
    p.peer_has("a", range(9))  # not a seed: it lacks block 9
    assert p.missing_count == 2 and not p.done
    assert pick_all(p, "a") == {0, 1}
    for b in (0, 1):
        assert p.got("a", b) == []
    assert p.done and p.missing_count == 0 and not p.interesting("a")
    assert pick_all(p, "a") == set()

    p.want([4, 5, 9])
    assert p.missing_count == 3 and not p.done
    assert not any(p.have_block(b) for b in (4, 5, 9)) and p.have_block(3)
    assert p.interesting("a")  # it has 4 and 5
    assert pick_all(p, "a") == {4, 5}  # 9: nobody has it
    p.peer_has("b", [9])
    assert p.interesting("b")
    assert p.pick("b", 5) == [9]
    for b in (4, 5):
        p.got("a", b)
    p.got("b", 9)
    assert p.done


def test_interesting_follows_want() -> None:
    p = partial(6, set())
    p.peer_has("a", [2])
    p.peer_has_all("s")
    assert p.done and not p.interesting("a") and not p.interesting("s")
    p.want([3])
    assert not p.interesting("a") and p.interesting("s")
    p.want([2])
    assert p.interesting("a") and p.interesting("s")
    p.got("s", 2)
    assert not p.interesting("a") and p.interesting("s")


def test_wanted_blocks_keep_the_availability_counted_while_they_were_not_wanted() -> None:
    p = partial(6, set())
    p.peer_has("a", range(5))
    p.peer_has("b", [0, 1, 2])
    p.peer_has("c", [0, 1])
    p.peer_has_all("s")
    assert [p.availability(b) for b in range(6)] == [4, 4, 3, 2, 2, 1]
    p.want([0, 2, 3])
    assert [p.availability(b) for b in range(6)] == [4, 4, 3, 2, 2, 1]
    assert p.pick("a", 1) == [3]  # rarest first among the blocks now wanted
    assert p.pick("a", 1) == [2]
    assert p.pick("a", 1) == [0]
    assert p.pick("a", 1) == [] or p.requested_by("a") == {0, 2, 3}


def test_a_seed_picks_only_wanted_blocks_and_the_rarest_first() -> None:
    for seed in range(10):
        p = partial(8, set(), seed=seed)
        p.peer_has_all("s")
        p.peer_has("a", [1, 2, 3])
        assert p.pick("s", 8) == []
        p.want([1, 6])
        assert p.pick("s", 1) == [6]  # 1 is held by a too
        assert p.pick("s", 8) == [1]
        p.want([7])
        assert p.pick("s", 8) == [7]


def test_want_while_blocks_are_requested_leaves_the_requests_alone() -> None:
    p = partial(8, {0, 1})
    p.peer_has("a", range(7))
    p.peer_has("b", range(7))
    [first] = p.pick("a", 1)
    p.want([first])  # already wanted, and requested: a no-op
    assert p.requested_by("a") == {first} and p.missing_count == 2
    p.want([2, 3, 2])  # a duplicate counts once
    assert p.missing_count == 4
    picked_b = set(p.pick("b", 3))
    assert picked_b == {0, 1, 2, 3} - {first}  # the free blocks, not a second request of a's
    assert p.pick("b", 1) == [first]  # then the endgame
    assert p.got("a", first) == ["b"]  # to cancel
    assert p.missing_count == 3 and p.requested_by("b") == {0, 1, 2, 3} - {first}


def test_want_ends_the_endgame() -> None:
    p = partial(6, {0}, copies=2)
    p.peer_has("a", range(5))
    p.peer_has("b", range(5))
    assert p.pick("a", 1) == [0]
    assert p.pick("b", 1) == [0]  # endgame: nothing else to fetch
    p.want([1])
    assert p.pick("b", 1) == [1]  # a free block again: no duplicate request for it
    assert p.pick("a", 1) == [1]  # endgame again: b's block, a second copy
    assert sorted(p.got("b", 1)) == ["a"]
    assert p.got("a", 0) == ["b"]
    assert p.done


def test_want_then_peers_leave_and_join() -> None:
    p = partial(8, set())
    p.peer_has("a", [0, 1, 2, 3])
    p.peer_has_all("s")
    p.want(range(4))
    picked = pick_all(p, "a")
    assert picked == {0, 1, 2, 3}
    assert p.remove_peer("a") == [0, 1, 2, 3]
    assert pick_all(p, "s") == {0, 1, 2, 3}
    p.want([7])
    assert p.pick("s", 3) == [7]
    assert p.remove_peer("s") == [0, 1, 2, 3, 7]
    assert p.missing_count == 5 and not p.done
    p.peer_has("c", range(8))  # a seed by announcements
    assert p.availability(7) == 1
    assert pick_all(p, "c") == {0, 1, 2, 3, 7}


def test_want_checks_its_blocks() -> None:
    p = partial(4, set())
    with pytest.raises(IndexError):
        p.want([4])
    with pytest.raises(IndexError):
        p.want([-1])


def test_the_prioritized_header_stays_first_when_more_is_wanted() -> None:
    p = partial(8, {5, 6})  # 5, 6: the header, wanted from the start
    p.peer_has_all("s")
    p.prioritize([6, 5])
    p.want([0, 1, 2, 3])
    assert p.pick("s", 1) == [6]
    assert p.pick("s", 1) == [5]
    assert sorted(p.pick("s", 8)) == [0, 1, 2, 3]


# ---- randomized -----------------------------------------------------------------


class Model:
    """What the picker should know, kept naively."""

    def __init__(self, total: int, wanted: set[int]) -> None:
        self.total = total
        self.wanted = set(wanted)
        self.got: set[int] = set()
        self.holds: dict[str, set[int]] = {}
        self.req: dict[str, set[int]] = {}

    def missing(self) -> set[int]:
        return self.wanted - self.got

    def requested(self) -> set[int]:
        return set().union(*self.req.values()) if self.req else set()

    def free_available(self) -> bool:
        free = self.missing() - self.requested()
        return any(free & h for h in self.holds.values())

    def check(self, p: BlockPicker) -> None:
        p.check_invariants()
        assert p.missing_count == len(self.missing())
        assert p.done == (not self.missing())
        assert [not p.have_block(b) for b in range(self.total)] == [b in self.missing() for b in range(self.total)]
        assert set(p.peers) == set(self.holds)
        for peer, holds in self.holds.items():
            assert p.interesting(peer) == bool(holds & self.missing()), peer
            assert p.requested_by(peer) == self.req[peer], peer
        for b in range(self.total):
            assert p.availability(b) == sum(b in h for h in self.holds.values()), b


def run(seed: int, total: int = 40, steps: int = 250) -> None:
    rng = random.Random(seed)
    wanted = {b for b in range(total) if rng.random() < 0.3}
    p = partial(total, wanted, seed=seed, copies=rng.choice([1, 2, 3]))
    m = Model(total, wanted)
    names = ["a", "b", "c", "d", "e"]
    never_wanted_picked: list[int] = []
    wants_while_requested = 0

    def do_pick(peer: str, n: int) -> None:
        before = {q: set(r) for q, r in m.req.items()}
        mine_free = (m.missing() - m.requested()) & m.holds[peer]
        out = p.pick(peer, n)
        assert len(out) == len(set(out)) <= n
        for b in out:
            if b not in m.wanted:
                never_wanted_picked.append(b)
            assert b in m.holds[peer] and b in m.missing() and b not in before[peer], (peer, b)
        m.req[peer] |= set(out)
        again = [b for b in out if any(b in r for r in before.values())]
        if again:  # the endgame: only once no free block is left that some peer has
            assert not m.free_available(), (peer, again)
        assert len(out) == n or mine_free <= set(out), (peer, n, out)  # a pick uses up what it can

    for _ in range(steps):
        event = rng.random()
        peer = rng.choice(names)
        if event < 0.2:
            blocks = rng.sample(range(total), rng.choice([1, 1, 2, 5, total // 2]))
            p.peer_has(peer, blocks)
            m.holds.setdefault(peer, set()).update(blocks)
            m.req.setdefault(peer, set())
        elif event < 0.24:
            p.peer_has_all(peer)
            m.holds[peer] = set(range(total))
            m.req.setdefault(peer, set())
        elif event < 0.45:
            if peer in m.holds:
                do_pick(peer, rng.choice([1, 2, 4, total]))
            else:
                assert p.pick(peer, 3) == []
        elif event < 0.62:
            if m.req.get(peer):
                b = rng.choice(sorted(m.req[peer]))
                others = p.got(peer, b)
                assert sorted(others) == sorted(q for q, r in m.req.items() if b in r and q != peer)
                m.got.add(b)
                for r in m.req.values():
                    r.discard(b)
        elif event < 0.7:
            if m.req.get(peer):
                b = rng.choice(sorted(m.req[peer]))
                p.rejected(peer, b)
                m.req[peer].discard(b)
        elif event < 0.76:
            returned = p.remove_peer(peer)
            assert returned == sorted(m.req.pop(peer, set()))
            m.holds.pop(peer, None)
        else:
            unwanted = [b for b in range(total) if b not in m.wanted]
            if unwanted:
                more = rng.sample(unwanted, min(len(unwanted), rng.choice([1, 2, 6])))
                wants_while_requested += bool(m.requested())
                p.want(more)
                m.wanted.update(more)
        m.check(p)

    # finish: a seed joins, and everything requested arrives
    p.peer_has_all("z")
    m.holds["z"] = set(range(total))
    m.req["z"] = set()
    m.check(p)
    for _ in range(4 * total):
        if p.done:
            break
        for peer in list(m.holds):
            do_pick(peer, 3)
            for b in sorted(m.req[peer]):
                p.got(peer, b)
                m.got.add(b)
                for r in m.req.values():
                    r.discard(b)
            m.check(p)
    assert p.done
    assert m.got == m.wanted
    assert never_wanted_picked == []
    assert wants_while_requested  # the sequence did exercise want() with requests out


@pytest.mark.parametrize("seed", range(12))
def test_random_events_with_want(seed: int) -> None:
    run(seed)


def test_peer_lacks_takes_blocks_out_of_a_peer_and_a_seed() -> None:
    picker = BlockPicker(20)
    picker.peer_has_all("seed")
    picker.peer_has("p", range(0, 10))
    picked = set(picker.pick("seed", 4)) | set(picker.pick("p", 3))
    picker.check_invariants()
    picker.peer_lacks("seed", range(5, 15))  # a seed dropped a file: an ordinary peer now
    picker.check_invariants()
    assert all(picker.availability(b) == 1 for b in range(5, 10))  # only "p" holds them now
    assert all(picker.availability(b) == 0 for b in range(10, 15))
    assert picker.requested_by("seed") <= set(range(5)) | set(range(15, 20))
    picker.peer_lacks("p", [0, 1, 99, -1])  # out of range ignored
    picker.check_invariants()
    assert picker.availability(0) == 1 and picker.availability(2) == 2
    for peer in ("seed", "p"):
        for b in picker.requested_by(peer):
            picker.got(peer, b)
    while got := picker.pick("seed", 1) or picker.pick("p", 1):
        picker.got("seed" if picker.requested_by("seed") else "p", got[0])
        picker.check_invariants()
    assert picker.missing_count == 5 and not picker.interesting("seed") and not picker.interesting("p")
    assert picked


def test_unwant_stops_fetching_free_blocks_and_lets_requested_ones_in() -> None:
    picker = BlockPicker(10, range(5, 10))  # wants 0..4
    picker.peer_has_all("seed")
    requested = picker.pick("seed", 2)
    picker.unwant(range(0, 5))  # given up: the free ones leave, the requested ones may still come
    picker.check_invariants()
    assert picker.missing_count == 2 and set(picker.requested_by("seed")) == set(requested)
    assert picker.pick("seed", 5) == [] or not picker.done
    for b in requested:
        picker.got("seed", b)
    picker.check_invariants()
    assert picker.done
    picker.want([b for b in range(5) if b not in requested])  # wanted again later (the caller passes what it lacks)
    picker.check_invariants()
    assert picker.missing_count == 3 and picker.pick("seed", 5)
