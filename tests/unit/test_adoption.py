"""The adoption planner (node/adoption.py): unit checks, then a swarm simulated in rounds.

The simulation: adopters (each with its own Adopter, budget and rng) and
passive peers (a seed, nodes that pulled a few layers: they hold fragments
and are candidates in the rendezvous order, but never adopt). Each round
every adopter plans from the same snapshot; what it takes is in flight
(counted in its `mine`) for `delay` rounds, then held and visible to all.
`now` advances 10 s a round. Events (a peer leaves or joins) happen only
once the swarm is restored, so the minimum number of copies to make is the
sum of the deficits right after each event; checked on every plan: the
budget holds, nothing lost or already held is taken.
"""

from __future__ import annotations

import random

import pytest

from node.adoption import (
    Adopter,
    AdoptionPlan,
    FragmentInfo,
    rendezvous_order,
    rendezvous_rank,
    weight,
)

MiB = 1 << 20
ROUND = 10.0


def frags(m: int, seed: int = 0, size: int | None = None) -> list[FragmentInfo]:
    rng = random.Random(seed)
    return [FragmentInfo(f"cid-{seed}-{i}", size or rng.randint(8 * MiB, 12 * MiB)) for i in range(m)]


# --- unit checks ----------------------------------------------------------------------------------


def test_rank_is_deterministic_and_consistent():
    peers = [f"peer-{j}" for j in range(8)]
    order = rendezvous_order("cid-x", peers)
    assert order == rendezvous_order("cid-x", reversed(peers))
    assert sorted(order) == sorted(peers)
    for r, p in enumerate(order):
        assert rendezvous_rank("cid-x", p, peers) == r
    assert weight("cid-x", "peer-0") != weight("cid-y", "peer-0")


def test_k1_everything_held_gives_empty_plan():
    fs = frags(20)
    a = Adopter("me", min_copies=1, budget=10**12)
    plan = a.plan(fs, [{"seed"}] * 20, {"me", "seed"}, set(), 0.0, random.Random(1))
    assert plan == AdoptionPlan(take=[], waiting={}, lost=[], over_budget=[])
    assert plan.next_deadline is None


def test_lost_fragments_reported_never_taken():
    fs = frags(6)
    holders = [{"a"}, set(), {"a", "b"}, set(), {"b"}, set()]
    a = Adopter("me", min_copies=5, budget=10**12)
    plan = a.plan(fs, holders, {"me", "a", "b"}, set(), 0.0, random.Random(1))
    assert plan.lost == [1, 3, 5]
    assert set(plan.take) == {0, 2, 4}  # the only candidate: rank 0
    assert plan.take == [0, 4, 2]  # rarest first


def test_held_by_me_counts_and_me_in_holders_tolerated():
    fs = frags(3, size=MiB)
    a = Adopter("me", min_copies=2, budget=10**12)
    # fragment 0 lists us as a holder: one copy besides "x", so 2 copies, not short
    plan = a.plan(fs, [{"x", "me"}, {"x"}, {"x"}], {"me", "x"}, {2}, 0.0, random.Random(1))
    assert plan.take == [1]
    # us alone: one copy (ours), short, but we cannot add one; not lost either
    plan = a.plan(fs, [{"me"}, {"x"}, set()], {"me", "x"}, {2}, 0.0, random.Random(1))
    assert plan.take == [1] and plan.lost == [] and plan.waiting == {}


def test_budget_skips_what_does_not_fit_and_counts_mine():
    sizes = [10, 30, 10, 5, 50]
    fs = [FragmentInfo(f"k{i}", s) for i, s in enumerate(sizes)]
    a = Adopter("me", min_copies=2, budget=50)
    holders = [{"x"}, {"x"}, {"x"}, {"x"}, {"x"}]
    # we hold 4 (50 bytes): nothing fits
    plan = a.plan(fs, holders, {"me", "x"}, {4}, 0.0, random.Random(1))
    assert plan.take == [] and sorted(plan.over_budget) == [0, 1, 2, 3]
    # we hold 0 (10 bytes): 40 left
    plan = a.plan(fs, holders, {"me", "x"}, {0}, 0.0, random.Random(1))
    taken = sum(sizes[i] for i in plan.take)
    assert 10 + taken <= 50
    assert set(plan.take) | set(plan.over_budget) == {1, 2, 3, 4}
    assert not set(plan.take) & set(plan.over_budget)
    # all have one copy, so order is by rank; whatever is skipped, a smaller later one is still taken
    for j, i in enumerate(plan.over_budget):
        assert 10 + sum(sizes[t] for t in plan.take) + sizes[i] > 50, (plan, j)


def _key_where_ranked(me: str, other: str, me_first: bool) -> str:
    for n in range(1000):
        key = f"cid-{n}"
        if (weight(key, me) > weight(key, other)) == me_first:
            return key
    raise AssertionError


def test_backoff_deadline_jitter_kept_and_episode_forgotten():
    key = _key_where_ranked("me", "lazy", me_first=False)
    fs = [FragmentInfo(key, MiB)]
    a = Adopter("me", min_copies=2, budget=10**9, backoff=20.0)
    rng = random.Random(7)
    peers = {"me", "lazy", "seed"}
    p0 = a.plan(fs, [{"seed"}], peers, set(), 100.0, rng)
    assert p0.take == [] and set(p0.waiting) == {0}
    deadline = p0.waiting[0]
    assert 120.0 <= deadline <= 130.0  # since + backoff * (1 - 1 + 1) + jitter in [0, 10]
    assert p0.next_deadline == deadline
    p1 = a.plan(fs, [{"seed"}], peers, set(), deadline - 0.001, rng)
    assert p1.waiting == {0: deadline}  # same episode, same jitter
    p2 = a.plan(fs, [{"seed"}], peers, set(), deadline, rng)
    assert p2.take == [0] and p2.waiting == {}
    # restored by someone else: the episode ends; a new shortage starts a new one
    a.plan(fs, [{"seed", "lazy"}], peers, set(), 200.0, rng)
    p3 = a.plan(fs, [{"seed"}], peers, set(), 300.0, rng)
    assert 320.0 <= p3.waiting[0] <= 330.0
    # with "lazy" gone, we are rank 0: take now
    assert a.plan(fs, [{"seed"}], {"me", "seed"}, set(), 301.0, rng).take == [0]


def test_rank_step_scales_deadline():
    # d = 1 and three candidates ranked above us: wait three back-off steps
    others = ["o1", "o2", "o3"]
    for n in range(10000):
        key = f"cid-{n}"
        if rendezvous_order(key, [*others, "me"])[-1] == "me":
            break
    a = Adopter("me", min_copies=2, budget=10**9, backoff=20.0)
    plan = a.plan([FragmentInfo(key, 1)], [{"seed"}], {"me", "seed", *others}, set(), 0.0, random.Random(3))
    assert 60.0 <= plan.waiting[0] <= 70.0
    # k = 4: d = 3, rank 3 -> one step
    a = Adopter("me", min_copies=4, budget=10**9, backoff=20.0)
    plan = a.plan([FragmentInfo(key, 1)], [{"seed"}], {"me", "seed", *others}, set(), 0.0, random.Random(3))
    assert 20.0 <= plan.waiting[0] <= 30.0


def test_plan_deterministic_for_fixed_seed():
    fs = frags(100, seed=5)
    rng = random.Random(5)
    peers = {f"p{j}" for j in range(6)} | {"me"}
    holders = [set(rng.sample(sorted(peers - {"me"}), rng.randint(0, 3))) for _ in fs]
    mine = {i for i in range(100) if rng.random() < 0.1}
    plans = [
        Adopter("me", min_copies=3, budget=150 * MiB).plan(fs, holders, peers, mine, 50.0, random.Random(9))
        for _ in range(2)
    ]
    assert plans[0] == plans[1]
    assert plans[0].take and plans[0].waiting and plans[0].lost and plans[0].over_budget


def test_bad_inputs():
    with pytest.raises(ValueError):
        Adopter("me", min_copies=0, budget=1)
    a = Adopter("me", min_copies=1, budget=1)
    with pytest.raises(ValueError):
        a.plan(frags(2), [set()], {"me"}, set(), 0.0, random.Random(0))
    with pytest.raises(ValueError):
        a.plan(frags(2), [set(), set()], {"me"}, {5}, 0.0, random.Random(0))


# --- simulation -----------------------------------------------------------------------------------


class Sim:
    def __init__(self, fs: list[FragmentInfo], k: int, seed: int, delay: int = 0, backoff: float = 20.0):
        self.fs, self.k, self.seed, self.delay, self.backoff = fs, k, seed, delay, backoff
        self.adopters: dict[str, Adopter] = {}
        self.rngs: dict[str, random.Random] = {}
        self.held: dict[str, set[int]] = {}  # every present peer's visible holdings
        self.fetching: dict[str, dict[int, int]] = {}  # adopter -> index -> round it becomes held
        self.round = 0
        self.takes = 0
        self.backoff_takes = 0  # takes by an adopter that was not among the d top-ranked
        self.minimum = 0  # sum of deficits after each event
        self.dups = 0  # takes of a fragment already at k copies counting every fetch in flight
        self.trace: list[tuple[int, str, tuple[int, ...]]] = []
        self.lost_seen: set[int] = set()

    @property
    def now(self) -> float:
        return self.round * ROUND

    def add_passive(self, name: str, holds: set[int]) -> None:
        self.held[name] = set(holds)

    def add_adopter(self, name: str, budget: int) -> None:
        self.adopters[name] = Adopter(name, self.k, budget, self.backoff)
        self.rngs[name] = random.Random(f"{self.seed}/{name}")
        self.held[name] = set()
        self.fetching[name] = {}

    def leave(self, name: str) -> None:
        assert not self.fetching.get(name), "events only between restorations"
        for d in (self.adopters, self.rngs, self.held, self.fetching):
            d.pop(name, None)

    def holders(self) -> list[set[str]]:
        hs: list[set[str]] = [set() for _ in self.fs]
        for p, held in self.held.items():
            for i in held:
                hs[i].add(p)
        return hs

    def deficit(self) -> int:
        return sum(max(0, self.k - len(h)) for h in self.holders() if h)

    def restored(self) -> bool:
        return self.deficit() == 0 and not any(self.fetching.values())

    def step(self) -> None:
        hs = self.holders()
        peers = set(self.held)
        inflight = [0] * len(self.fs)
        for f in self.fetching.values():
            for i in f:
                inflight[i] += 1
        for name, a in self.adopters.items():
            mine = self.held[name] | set(self.fetching[name])
            plan = a.plan(self.fs, [h - {name} for h in hs], peers, mine, self.now, self.rngs[name])
            take = set(plan.take)
            assert len(take) == len(plan.take)
            assert not take & mine
            assert not take & set(plan.lost)
            assert all(not hs[i] for i in plan.lost)
            assert sum(self.fs[i].size for i in mine | take) <= a.budget
            self.lost_seen |= set(plan.lost)
            for i in plan.take:
                d = self.k - len(hs[i])
                if rendezvous_rank(self.fs[i].key, name, peers - hs[i]) >= d:
                    self.backoff_takes += 1
                self.fetching[name][i] = self.round + 1 + self.delay
                self.dups += len(hs[i]) + inflight[i] >= self.k
                inflight[i] += 1
            self.takes += len(plan.take)
            if plan.take:
                self.trace.append((self.round, name, tuple(plan.take)))
        self.round += 1
        for name, f in self.fetching.items():
            for i in [i for i, r in f.items() if r <= self.round]:
                del f[i]
                self.held[name].add(i)

    def event(self) -> None:
        """Call right after a change to the swarm: adds its deficit to the minimum."""
        self.minimum += self.deficit()

    def run_until_restored(self, max_rounds: int) -> int:
        start = self.round
        while not self.restored():
            assert self.round - start < max_rounds, f"not restored after {max_rounds} rounds"
            self.step()
        rounds = self.round - start
        takes = self.takes
        for _ in range(int(4 * self.backoff / ROUND) + 2):  # nothing more is taken once restored
            self.step()
        assert self.takes == takes
        return rounds

    def copies(self) -> list[int]:
        return [len(h) for h in self.holders()]


def test_sim_adopters_ranked_first_make_exactly_the_minimum():
    """Only adopters besides the seed: the d top-ranked candidates are adopters, so copies made == minimum."""
    fs = frags(200, seed=1)
    figures = []
    for delay in (0, 1):
        sim = Sim(fs, k=3, seed=1, delay=delay)
        sim.add_passive("seed", set(range(len(fs))))
        for j in range(5):
            sim.add_adopter(f"a{j}", budget=10**12)
        sim.event()
        rounds = [sim.run_until_restored(2 + delay)]
        for change in ("seed", "a0", "+a5", "a3", "a1"):
            if change.startswith("+"):
                sim.add_adopter(change[1:], budget=10**12)
            else:
                sim.leave(change)
            sim.event()
            rounds.append(sim.run_until_restored(2 + delay))
        assert sim.takes == sim.minimum and sim.dups == 0
        assert sim.backoff_takes == 0
        assert all(c == 3 for c in sim.copies())
        assert max(rounds) == 1 + delay  # one plan, then the fetch
        figures.append((delay, sim.takes, sim.minimum, rounds))
    print("adopters first:", figures)


def _leecher_sim(delay: int, backoff: float, seed: int = 2, m: int = 150) -> tuple[Sim, list[int], int]:
    """A seed, 4 passive leechers holding a few fragments each (often ranked first), 4 adopters, k = 2."""
    fs = frags(m, seed=seed)
    rng = random.Random(seed)
    sim = Sim(fs, k=2, seed=seed, delay=delay, backoff=backoff)
    sim.add_passive("seed", set(range(m)))
    leechers = [f"l{j}" for j in range(4)]
    for name in leechers:
        sim.add_passive(name, set(rng.sample(range(m), 10)))
    for j in range(4):
        sim.add_adopter(f"a{j}", budget=10**12)
    # the worst case wait: every leecher ranked above every adopter (4 steps), the jitter, then the fetch
    bound = int((backoff * (len(leechers) + 1) + backoff / 2) / ROUND) + 2 + delay
    rounds = []
    # a fragment needs a back-off when a non-adopter is among the d (= 1 with k = 2) top-ranked candidates
    blocked = 0
    for change in (None, "seed", "a2", "l1", "a0"):
        if change:
            sim.leave(change)
        hs = sim.holders()
        blocked += sum(
            1
            for i, h in enumerate(hs)
            if len(h) == 1 and rendezvous_order(fs[i].key, set(sim.held) - h)[0] not in sim.adopters
        )
        sim.event()
        rounds.append(sim.run_until_restored(bound))
        assert min(c for c in sim.copies() if c) >= 2
    return sim, rounds, blocked


@pytest.mark.parametrize(("delay", "backoff"), [(0, 20.0), (1, 40.0)])
def test_sim_non_adopters_first_no_duplicates_when_backoff_covers_fetch(delay, backoff):
    """Round period + fetch time <= backoff / 2: the next adopter sees the copy before its deadline."""
    sim, rounds, blocked = _leecher_sim(delay, backoff)
    assert blocked > 0 and sim.backoff_takes > 0  # back-off did happen
    assert sim.takes == sim.minimum and sim.dups == 0
    print(f"leechers first, delay {delay}, backoff {backoff}:", sim.takes, sim.minimum, blocked, rounds)


def test_sim_non_adopters_first_slow_fetch_duplicates_bounded():
    """Fetch slower than backoff / 2 - round (here 2 rounds, backoff 20 s): a back-off taker may be duplicated
    by the next adopter in rank order, by at most one. In these synchronous rounds a shortage seen at t0 is
    taken by the first adopter (s steps down) at t0 + 20 s + 10, its copy is visible 30 s later; the next
    candidate takes at t0 + 20 (s + 1) + 10, before that (a duplicate); the one after at t0 + 20 (s + 2) + 10,
    when the copy is visible. So at most one duplicate per fragment that needed a back-off."""
    sim, rounds, blocked = _leecher_sim(delay=2, backoff=20.0)
    assert sim.takes - sim.dups == sim.minimum
    assert 0 < sim.dups <= blocked
    print("leechers first, slow fetch:", sim.takes, sim.minimum, blocked, sim.dups, rounds)


def test_sim_budget_never_exceeded_and_over_budget_reported():
    """Budgets too small for k copies of everything: budgets hold (checked every plan), and what does not fit
    stays short and is reported over budget."""
    fs = frags(100, seed=3)
    total = sum(f.size for f in fs)
    sim = Sim(fs, k=3, seed=3)
    sim.add_passive("seed", set(range(len(fs))))
    for j in range(3):
        sim.add_adopter(f"a{j}", budget=total // 2)
    for _ in range(12):
        sim.step()
    for name, a in sim.adopters.items():
        held = sum(fs[i].size for i in sim.held[name])
        assert held <= a.budget
        assert held > a.budget - 12 * MiB  # filled up to within a fragment
    assert sim.deficit() > 0
    hs = sim.holders()
    plans = [
        a.plan(fs, [h - {n} for h in hs], set(sim.held), sim.held[n], sim.now, sim.rngs[n])
        for n, a in sim.adopters.items()
    ]
    short = {i for i, h in enumerate(hs) if len(h) < 3}
    assert set().union(*(p.over_budget for p in plans)) <= short
    assert set().union(*(p.over_budget for p in plans))
    assert not any(p.take for p in plans)


def test_sim_lost_fragments_reported_never_taken():
    fs = frags(60, seed=4)
    sim = Sim(fs, k=2, seed=4, delay=1)
    sim.add_passive("half", set(range(30)))
    for j in range(3):
        sim.add_adopter(f"a{j}", budget=10**12)
    sim.event()
    sim.run_until_restored(3)
    assert sim.lost_seen == set(range(30, 60))  # Sim.step checks that lost fragments are never taken
    assert all(not sim.holders()[i] for i in range(30, 60))
    assert all(c == 2 for c in sim.copies()[:30])


def _churn(seed: int) -> tuple[Sim, list[int]]:
    """k = 3, 6 adopters with 90 % of the model each, passive leechers; random departures and arrivals."""
    fs = frags(120, seed=seed)
    total = sum(f.size for f in fs)
    rng = random.Random(seed)
    sim = Sim(fs, k=3, seed=seed, delay=1)
    sim.add_passive("seed", set(range(len(fs))))
    for j in range(3):
        sim.add_passive(f"l{j}", set(rng.sample(range(len(fs)), 15)))
    n = 0
    for _ in range(6):
        sim.add_adopter(f"a{n}", budget=total * 9 // 10)
        n += 1
    bound = int((sim.backoff * 10 + sim.backoff / 2) / ROUND) + 3
    sim.event()
    rounds = [sim.run_until_restored(bound)]
    sim.leave("seed")
    sim.event()
    rounds.append(sim.run_until_restored(bound))
    for _ in range(8):
        if len(sim.adopters) > 4 and rng.random() < 0.6:
            sim.leave(rng.choice(sorted(sim.adopters)))
        elif rng.random() < 0.5 and any(p.startswith("l") for p in sim.held):
            sim.leave(rng.choice(sorted(p for p in sim.held if p.startswith("l"))))
        else:
            sim.add_adopter(f"a{n}", budget=total * 9 // 10)
            n += 1
        sim.event()
        rounds.append(sim.run_until_restored(bound))
        assert min(c for c in sim.copies() if c) >= 3
    return sim, rounds


def test_sim_churn_restores_within_bound_and_is_deterministic():
    sim, rounds = _churn(seed=11)
    again, rounds2 = _churn(seed=11)
    assert sim.trace == again.trace and rounds == rounds2
    other, _ = _churn(seed=12)
    assert other.trace != sim.trace
    assert sim.takes - sim.dups == sim.minimum
    assert sim.dups <= sim.backoff_takes
    print("churn:", sim.takes, sim.minimum, sim.dups, sim.backoff_takes, rounds)
