"""Which fragments of a model this node should adopt: pure logic, no I/O, no clock, no global random.

`gguf-swarm seed --adopt MODEL_CID --budget B --min-copies k` keeps every
fragment of a model at k copies or more in the swarm while nodes come and go.
The I/O loop calls `Adopter.plan` every round (every 10-30 s) with a fresh
snapshot of who holds what, fetches what the plan says to take, and keeps
calling; the time and the random source are passed in.

Theory of operation:
- Copies. copies(i) = the peers other than us that hold fragment i, plus one
  if we hold it or are fetching it (`mine`). A fragment is short when
  0 < copies < min_copies; it needs d = min_copies - copies more copies. A
  fragment nobody holds is lost: it cannot be restored from the swarm.
- No central server. Adopters agree on who adds the missing copies without
  talking: every node ranks the candidates for fragment i (the peers seen in
  the swarm that do not hold it, us included) by rendezvous hashing
  (highest random weight: sha256(f"{key}|{peer}"), highest first). Every
  adopter that sees the same snapshot computes the same order, so the d
  top-ranked candidates take the fragment now and the others wait.
- Back-off. A top-ranked candidate may never step in (a node that pulled a
  few layers and does not adopt, or an adopter whose budget is spent). A
  candidate of rank r >= d therefore waits until
      first time we saw this shortage + backoff * (r - d + 1) + jitter
  with jitter drawn once per shortage episode from uniform(0, backoff / 2),
  and takes the fragment then if it is still short. When a higher-ranked
  candidate takes a copy, both r and d drop by one, so the deadline does not
  move; the next adopter in rank order steps in one back-off step later.
  Successive deadlines are at least backoff / 2 apart, so when every adopter
  sees the same snapshots and the round period plus the fetch time is at
  most backoff / 2, a copy taken by one adopter is seen by the next one
  before its deadline: no duplicate copies. A slower fetch can let the next
  adopter in rank order take a duplicate (one per back-off step it spans).
- Episodes. A shortage episode starts the first round a fragment is seen
  short (and we are a candidate) and ends when it is no longer short; its
  start time and jitter are kept in between, keyed by the fragment's key.
- Budget. The bytes of what we hold or fetch (`mine`) plus what we take stay
  within `budget`. The fragments due now are taken rarest first (fewest
  copies, then our rank, then index); one that does not fit is skipped (a
  smaller later one may fit) and reported in `over_budget`. Fragments not
  due yet are reported in `waiting` with their deadline, whether or not they
  will fit then; the budget is applied when they come due.
- The caller must count fetches in flight in `mine` (and drop a failed
  fetch from it); otherwise the next round would take the fragment again.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache


@dataclass(frozen=True)
class FragmentInfo:
    key: str  # the fragment's content id (CID string), stable across peers
    size: int


@dataclass(frozen=True)
class AdoptionPlan:
    take: list[int]  # fragment indexes to fetch now, rarest first
    waiting: dict[int, float]  # fragment index -> time at which we will take it if still short
    lost: list[int]  # fragments nobody holds (cannot be restored from the swarm)
    over_budget: list[int]  # short fragments we would have taken but the budget is spent

    @property
    def next_deadline(self) -> float | None:
        """The earliest time a waiting fragment comes due (when to plan again at the latest)."""
        return min(self.waiting.values(), default=None)


@lru_cache(maxsize=1 << 16)
def weight(key: str, peer: str) -> bytes:
    """The rendezvous weight of `peer` for the fragment `key`; the highest weight ranks first."""
    return hashlib.sha256(f"{key}|{peer}".encode()).digest()


def rendezvous_order(key: str, candidates: Iterable[str]) -> list[str]:
    """The candidates for `key` in rank order (rank 0 first); ties (never in practice) by peer id."""
    return sorted(set(candidates), key=lambda p: (weight(key, p), p), reverse=True)


def rendezvous_rank(key: str, me: str, candidates: Iterable[str]) -> int:
    """Our 0-based rank among `candidates` (us included whether listed or not) for `key`."""
    mine = (weight(key, me), me)
    return sum(1 for p in set(candidates) if p != me and (weight(key, p), p) > mine)


@dataclass
class _Episode:
    since: float  # when we first saw the fragment short
    jitter: float  # drawn once per episode, in [0, backoff / 2]


@dataclass
class Adopter:
    """One node's adoption state for one model, carried between rounds."""

    me: str  # our peer id (string)
    min_copies: int
    budget: int  # bytes of this model we may hold in all (what we already hold counts)
    backoff: float = 20.0  # seconds per rank step a non-winner waits before stepping in
    _episodes: dict[str, _Episode] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.min_copies < 1:
            raise ValueError("min_copies must be >= 1")
        if self.budget < 0:
            raise ValueError("budget must be >= 0")
        if self.backoff < 0:
            raise ValueError("backoff must be >= 0")

    def plan(
        self,
        fragments: Sequence[FragmentInfo],
        holders: Sequence[Collection[str]],
        peers: Collection[str],
        mine: Collection[int],
        now: float,
        rng: random.Random,
    ) -> AdoptionPlan:
        """What to fetch now, given who holds what this round.

        `holders[i]`: the peers holding fragment i (if it lists us, we count as holding it);
        `peers`: every peer seen this round (the candidates for a copy; us included or not);
        `mine`: the indexes we hold or are fetching. `rng` draws the back-off jitter only.
        """
        n = len(fragments)
        if len(holders) != n:
            raise ValueError(f"{len(holders)} holder sets for {n} fragments")
        held = set(mine)
        for i in held:
            if not 0 <= i < n:
                raise ValueError(f"fragment index {i} out of range")
        me = self.me
        for i, hs in enumerate(holders):
            if me in hs:
                held.add(i)
        everyone = set(peers)
        everyone.add(me)
        used = sum(fragments[i].size for i in held)

        lost: list[int] = []
        due: list[tuple[int, int, int]] = []  # (copies, rank, index)
        waiting: dict[int, float] = {}
        episodes: dict[str, _Episode] = {}
        for i, frag in enumerate(fragments):
            hs = holders[i]
            others = len(hs) - (me in hs)
            copies = others + (i in held)
            if copies == 0:
                lost.append(i)
                continue
            if copies >= self.min_copies or i in held:
                continue  # not short, or short but we cannot add a copy
            d = self.min_copies - copies
            ep = self._episodes.get(frag.key) or episodes.get(frag.key)
            if ep is None:
                ep = _Episode(since=now, jitter=rng.uniform(0.0, self.backoff / 2))
            episodes[frag.key] = ep
            rank = rendezvous_rank(frag.key, me, (p for p in everyone if p not in hs))
            if rank < d:
                due.append((copies, rank, i))
                continue
            deadline = ep.since + self.backoff * (rank - d + 1) + ep.jitter
            if now >= deadline:
                due.append((copies, rank, i))
            else:
                waiting[i] = deadline
        self._episodes = episodes

        due.sort()
        take: list[int] = []
        over_budget: list[int] = []
        for _, _, i in due:
            size = fragments[i].size
            if used + size <= self.budget:
                used += size
                take.append(i)
            else:
                over_budget.append(i)
        return AdoptionPlan(take=take, waiting=waiting, lost=lost, over_budget=over_budget)
