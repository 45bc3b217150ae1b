"""Initial seeding (BitTorrent's "super-seeding"): pure policy, clock passed in.

A node holding a whole model, with several peers pulling it at once, should
upload each fragment about once and let the pullers trade the rest. Pullers
cannot see what the others are fetching from the seed, so by themselves they
often fetch the same large fragment from it at the same time, spending the
seed's upload (the swarm's scarcest resource) twice. Here each puller is
shown, in the have-set it asks for, its own fair share of the fragments
nobody has been sent yet. Everything is shown when only one peer is
pulling, once every fragment has gone out, or when nothing is left to assign;
fragments sent long ago are shown again, so a puller that left with them
costs nothing but time.
"""

from __future__ import annotations

import random
from collections.abc import Hashable

Peer = Hashable


class InitialSeeding:
    def __init__(
        self,
        sizes: list[int],
        batch_bytes: int = 48 << 20,
        reveal_after: float = 30.0,
        active_window: float = 5.0,
        rng: random.Random | None = None,
    ) -> None:
        self.sizes = sizes
        self.batch_bytes = batch_bytes  # at most this many unsent bytes assigned to one puller at a time
        self.reveal_after = reveal_after  # a fragment sent this long ago is shown to all
        self.active_window = active_window  # a peer that asked this recently is pulling
        self.rng = rng or random.Random()
        self.sent_at: dict[int, float] = {}  # fragment -> first time it went out whole
        self.assigned: dict[Peer, dict[int, float]] = {}  # peer -> fragments shown to it alone -> when
        self.last_asked: dict[Peer, float] = {}

    def have_for(self, peer: Peer, now: float) -> list[bool]:
        """The have-set to show `peer` now."""
        self.last_asked[peer] = now
        active = {p for p, t in self.last_asked.items() if now - t <= self.active_window}
        everything = [True] * len(self.sizes)
        if len(active) < 2 or len(self.sent_at) == len(self.sizes):
            return everything
        self._expire(active, now)
        mine = self.assigned.setdefault(peer, {})
        taken = {i for p, frags in self.assigned.items() if p != peer for i in frags}
        free = [i for i in range(len(self.sizes)) if i not in self.sent_at and i not in taken and i not in mine]
        self.rng.shuffle(free)
        # A fair share of what is left, so that the first to ask does not take it all.
        unsent = sum(self.sizes[i] for i in range(len(self.sizes)) if i not in self.sent_at)
        budget = min(self.batch_bytes, unsent // len(active)) - sum(self.sizes[i] for i in mine)
        for i in free:
            if budget <= 0:
                break
            mine[i] = now
            budget -= self.sizes[i]
        shown = set(mine) | {i for i, t in self.sent_at.items() if now - t >= self.reveal_after}
        if not shown:
            return everything  # nothing left to hand out: do not look like a non-holder
        return [i in shown for i in range(len(self.sizes))]

    def sent(self, peer: Peer, index: int, now: float) -> None:
        """A whole fragment went out to `peer`."""
        self.sent_at.setdefault(index, now)
        for frags in self.assigned.values():
            frags.pop(index, None)

    def _expire(self, active: set[Peer], now: float) -> None:
        """Assignments of peers that stopped asking go back to the pool."""
        for peer in [p for p in self.assigned if p not in active]:
            del self.assigned[peer]
        for peer in [p for p, t in self.last_asked.items() if now - t > 10 * self.active_window]:
            del self.last_asked[peer]
