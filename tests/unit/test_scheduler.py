"""The piece picker, without sockets. Have-sets are written as strings: "*" held."""

from __future__ import annotations

import random

from node.scheduler import Scheduler


def haves(pattern: str) -> set[int]:
    return {i for i, c in enumerate(pattern) if c == "*"}


def make(count: int, **kw: object) -> Scheduler:
    return Scheduler(count, rng=random.Random(1), **kw)  # type: ignore[arg-type]


def test_rarest_first() -> None:
    s = make(4, per_peer=1)
    s.peer_have("a", haves("****"))
    s.peer_have("b", haves("*** "))
    s.peer_have("c", haves("**  "))
    reqs = dict(s.next_requests())
    assert reqs["a"] == 3  # only a has fragment 3
    assert reqs["b"] == 2  # the rarest b has that is not taken
    s.check_invariants()


def test_slots_are_limited_and_nothing_is_fetched_twice_before_endgame() -> None:
    s = make(10, per_peer=3)
    s.peer_have("a", haves("*" * 10))
    s.peer_have("b", haves("*" * 10))
    reqs = s.next_requests()
    assert len(reqs) == 6 and len({i for _, i in reqs}) == 6
    assert s.next_requests() == []
    s.check_invariants()


def test_verified_fragments_free_slots_and_finish() -> None:
    s = make(3, per_peer=1)
    s.peer_have("a", haves("***"))
    for _ in range(3):
        [(peer, i)] = s.next_requests()
        assert s.verified(peer, i) == []
    assert s.done and s.next_requests() == []


def test_queue_is_bounded_by_bytes_as_well_as_count() -> None:
    sizes = [10, 10, 10, 1, 1, 1, 1, 1]
    s = make(8, per_peer=4, per_peer_bytes=15, sizes=sizes)
    s.peer_have("a", haves("***     "))
    assert len(s.next_requests()) == 2  # 10 + 10 >= 15: the queue is full by bytes
    s = make(8, per_peer=4, per_peer_bytes=15, sizes=sizes)
    s.peer_have("a", haves("   *****"))
    assert len(s.next_requests()) == 4  # small fragments: full by count
    s.check_invariants()


def test_received_frees_the_slot_but_nobody_refetches_while_verifying() -> None:
    s = make(2, per_peer=1, endgame_copies=1)
    s.peer_have("a", haves("**"))
    s.peer_have("b", haves("**"))
    reqs = dict(s.next_requests())
    s.received("a", reqs["a"])
    s.check_invariants()
    assert s.next_requests() == []  # a's slot is free, but both fragments are taken
    s.failed("a", reqs["a"], bad_data=True)  # verification failed: the fragment is free again
    assert s.next_requests() == [] and s.verifying == {}
    s.verified("b", reqs["b"])
    assert s.next_requests() == [("b", reqs["a"])]
    s.check_invariants()


def test_endgame_duplicates_then_cancels() -> None:
    s = make(2, per_peer=2, endgame_copies=2)
    s.peer_have("a", haves("**"))
    first = s.next_requests()
    assert sorted(i for _, i in first) == [0, 1]
    s.peer_have("b", haves("**"))
    dup = s.next_requests()
    assert sorted(i for _, i in dup) == [0, 1] and all(p == "b" for p, _ in dup)
    assert s.verified("b", 0) == [("a", 0)]
    s.check_invariants()


def test_bad_data_bans_the_peer_and_frees_the_fragment() -> None:
    s = make(2, per_peer=1)
    s.peer_have("evil", haves("**"))
    [(peer, i)] = s.next_requests()
    s.failed("evil", i, bad_data=True)
    assert "evil" in s.banned and "evil" not in s.peers
    s.peer_have("evil", haves("**"))  # cannot come back
    assert "evil" not in s.peers
    s.peer_have("good", haves("**"))
    assert len(s.next_requests()) == 1
    s.check_invariants()


def test_repeated_failures_drop_a_peer() -> None:
    s = make(1, per_peer=1, max_failures=2)
    s.peer_have("flaky", haves("*"))
    for _ in range(2):
        [(p, i)] = s.next_requests()
        s.failed(p, i)
    assert "flaky" not in s.peers and "flaky" not in s.banned
    assert s.unavailable() == {0}


def test_peer_leaving_returns_its_requests() -> None:
    s = make(3, per_peer=3)
    s.peer_have("a", haves("***"))
    s.next_requests()
    assert s.peer_left("a") == [0, 1, 2]
    assert s.fetching == {} and s.availability == [0, 0, 0]


def test_already_held_fragments_are_never_requested() -> None:
    s = Scheduler(4, have={0, 1}, per_peer=4)
    s.peer_have("a", haves("****"))
    assert sorted(i for _, i in s.next_requests()) == [2, 3]


def test_random_simulation_keeps_invariants() -> None:
    rng = random.Random(7)
    for trial in range(20):
        n = rng.randint(1, 30)
        sizes = [rng.randint(1, 10) for _ in range(n)]
        budget = rng.choice([None, 5, 20])
        s = Scheduler(n, per_peer=rng.randint(1, 4), rng=random.Random(trial), sizes=sizes, per_peer_bytes=budget)
        peers = [f"p{i}" for i in range(rng.randint(1, 5))]
        for p in peers:
            s.peer_have(p, {i for i in range(n) if rng.random() < 0.7} | {0})
        s.peer_have("full", set(range(n)))
        for _ in range(2000):
            if s.done:
                break
            for p, i in s.next_requests():
                if rng.random() < 0.5:
                    s.received(p, i)  # verification follows below
                    s.check_invariants()
                roll = rng.random()
                if roll < 0.8:
                    s.verified(p, i)
                elif roll < 0.95:
                    s.failed(p, i)
                else:
                    s.failed(p, i, bad_data=(p != "full"))
            s.check_invariants()
            if "full" not in s.peers:
                s.peer_have("full", set(range(n)))
        assert s.done, trial
