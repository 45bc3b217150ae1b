"""Super-seeding (BitTorrent's initial seeding) for blocks: a pure policy. The caller passes in the clock.

A seed is the only source of a model while several peers pull it, so its
upload is the swarm's scarcest resource. Each block should leave the seed
about once, and the pullers should trade the rest among themselves. A puller
cannot see what the others are fetching from the seed. Left alone, pullers
often fetch the same block from it at the same time, and the seed spends its
upload twice on that block. So the seed tells each puller only about part of
what it holds. The node pushes HAVEs and a HAVE cannot be taken back, so
what a peer has been shown only grows.

- Shares. Each puller is shown its own share of the blocks that are not yet
  out. A block is "out" once the seed has sent it, or once a peer has said it
  holds the block. Shares are disjoint between pullers. A share keeps about
  `batch_bytes` queued for the puller: shown to it, not yet out. The share is
  refilled, in random order, when it drops under half a batch. It is never
  larger than a fair share of what is not yet out (those bytes divided by the
  number of joined peers), so the first puller to ask does not take it all. A
  block sent to another peer, or announced by one, leaves the share and makes
  room for a new block.
- Everything is shown when only one peer has been joined for `alone_after`
  seconds, since there is nobody to share with. Not at once: pullers that
  start together join a few milliseconds apart, and whatever the first one
  is shown can never be taken back. It is also shown to everyone once every block is out
  (`active` False); from then on the seed is just one more holder.
- Never left with nothing to ask for; a block sent twice only with upload
  to spare. When a puller's share is used up and nothing is left to hand
  out (the blocks not yet out are all in other pullers' shares: the end of
  the first round), it gets the blocks that are out from the pullers that
  hold them. Once it holds every block that is out, so that no other puller
  has anything for it, it is shown everything. While the seed's upload has
  nothing queued (`spare`, the node's measure), it is shown what is out,
  or everything if it holds all it was shown: the seed then sends blocks
  again, but with upload that would otherwise go unused. (Showing what was
  out regardless made pullers queue requests at a saturated seed for blocks
  other pullers had: with 8 pullers behind a 35 Mbit/s seed, 33 of 422
  blocks left it twice before the round ended.)
- A peer that wants none of what it was shown (it says NotInterested, or
  never says Interested) is shown everything and gives its share back: it
  pulls only some layers, or it is done. Not a puller that holds all it was
  shown while the round lasts and the seed has no upload to spare: it is
  not interested because it has its share, and gets the rest from other
  pullers as above.
- A peer that leaves gives its share back to the pool. Blocks it took with
  it stay out: the others are shown them at the end of the first round, as
  above, so its departure costs only time.
Peers are opaque hashable handles. After any event (join, leave, sent,
peer_has) the node calls reveal() for every joined peer and sends what it
returns as HAVEs: any of those events can refill a share or end the first
round, and a call with nothing new is cheap. The clock is passed in.
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

Peer = Hashable


@dataclass
class _View:
    """What one peer has been shown and, as far as we know, holds."""

    shown: set[int] = field(default_factory=set)
    share: set[int] = field(default_factory=set)  # shown to this peer alone, not yet out
    share_bytes: int = 0
    held: set[int] = field(default_factory=set)  # sent to it by us, or announced by it
    wanted: set[int] = field(default_factory=set)  # shown, not held: what it can still ask us for
    everything: bool = False
    joined: float = 0.0
    out_seen: int = 0  # how much of the out-order it has been shown (the end of the first round)


class SuperSeeding:
    def __init__(
        self,
        block_sizes: list[int],
        batch_bytes: int = 8 << 20,
        alone_after: float = 2.0,
        rng: random.Random | None = None,
        first: Iterable[int] = (),
    ) -> None:
        self.sizes = list(block_sizes)
        self.alone_after = alone_after
        self.batch_bytes = batch_bytes
        self.rng = rng or random.Random()
        self.peers: dict[Peer, _View] = {}
        self.out: set[int] = set()  # blocks the seed has sent, or that a peer announced
        self.sends = [0] * len(self.sizes)  # times the seed sent each block
        self._out_order: list[int] = []  # self.out, in the order the blocks went out
        self._owner: dict[int, Peer] = {}  # block in someone's share -> that peer
        self._pool = list(range(len(self.sizes)))  # not out, in no share; shuffled, may hold stale entries
        self.rng.shuffle(self._pool)
        # `first` is handed out before the rest (popped from the end): the header, which every
        # puller needs early to build its tokenizer files while the rest arrives.
        early = [b for b in first if 0 <= b < len(self.sizes)]
        self._pool = [b for b in self._pool if b not in set(early)] + early[::-1]
        self._in_pool = set(self._pool)
        self._unsent_bytes = sum(self.sizes)  # bytes of blocks not out

    @property
    def active(self) -> bool:
        """Some block is not out yet, so shares still apply."""
        return len(self.out) < len(self.sizes)

    # ---- events ----------------------------------------------------------

    def join(self, peer: Peer, now: float) -> None:
        """A peer started pulling from us."""
        self.peers.setdefault(peer, _View(joined=now))

    def leave(self, peer: Peer) -> None:
        """The peer is gone. Its share goes back to the pool."""
        view = self.peers.pop(peer, None)
        if view is not None:
            self._give_back(view)

    def uninterested(self, peer: Peer, now: float, spare: bool = False) -> list[int]:
        """The peer wants none of what it has been shown: a partial replica
        after other layers, or a peer done. It is shown everything, so it can
        pick what it wants, and its share goes back to the pool for the others."""
        if peer not in self.peers:
            self.join(peer, now)
        view = self.peers[peer]
        if view.everything and not view.share:
            return []  # the usual case, every tick, for peers done or seeding: O(1)
        if self.active and view.shown and not view.wanted and not spare and not self._starved(view):
            return []  # it has its share and gets the rest from other pullers
        self._give_back(view)
        return self._show(view, range(len(self.sizes)))

    def _give_back(self, view: _View) -> None:
        for block in view.share:
            del self._owner[block]
            self._in_pool.add(block)
            self._pool.append(block)
            j = self.rng.randrange(len(self._pool))  # keep the pool in random order
            self._pool[j], self._pool[-1] = self._pool[-1], self._pool[j]
        view.share.clear()
        view.share_bytes = 0

    def sent(self, peer: Peer, block: int, now: float) -> None:
        """We uploaded `block` to `peer`."""
        self.sends[block] += 1
        self._holds(peer, block)

    def peer_has(self, peer: Peer, block: int) -> None:
        """`peer` says it holds `block`. This counts even if the peer never joined: the block is in the swarm."""
        self._holds(peer, block)

    # ---- decisions -------------------------------------------------------

    def reveal(self, peer: Peer, now: float, spare: bool = False) -> list[int]:
        """Blocks to show `peer` now (the node sends them as HAVEs). A peer not yet joined joins.
        `spare`: the seed's upload has nothing queued, so a block sent twice costs nothing."""
        if peer not in self.peers:
            self.join(peer, now)
        view = self.peers[peer]
        if view.everything:
            return []
        if not self.active or (len(self.peers) == 1 and now - view.joined >= self.alone_after):
            return self._show(view, range(len(self.sizes)))
        new = self._refill(peer, view)
        if not view.share and spare:  # the end of the first round: what is out, from us too
            new += self._show(view, self._out_order[view.out_seen :])
            view.out_seen = len(self._out_order)
        if not view.wanted and len(view.held) < len(self.sizes) and (spare or self._starved(view)):
            new += self._show(view, range(len(self.sizes)))  # the rest is in other shares
        return sorted(new)

    def is_shown(self, peer: Peer, block: int) -> bool:
        """Has `peer` been shown `block`? (O(1): checked on every request.)"""
        view = self.peers.get(peer)
        return view is not None and (view.everything or block in view.shown)

    def shown(self, peer: Peer) -> set[int] | None:
        """What `peer` has been shown so far. None means everything."""
        view = self.peers.get(peer)
        if view is None:
            return set()
        return None if view.everything else set(view.shown)

    # ---- internals -------------------------------------------------------

    def _starved(self, view: _View) -> bool:
        """It holds every block that is out: no other puller has anything for it."""
        return len(view.held) >= len(self.out)  # held is a subset of out

    def _refill(self, peer: Peer, view: _View) -> list[int]:
        if view.share_bytes * 2 >= self.batch_bytes:
            return []
        target = min(self.batch_bytes, self._unsent_bytes // len(self.peers))
        taken: list[int] = []
        while self._pool and (view.share_bytes < target or not view.share):
            block = self._pool.pop()
            if block not in self._in_pool:
                continue  # stale: it went out, or was taken, since it was put here
            self._in_pool.remove(block)
            self._owner[block] = peer
            view.share.add(block)
            view.share_bytes += self.sizes[block]
            taken.append(block)
        return self._show(view, taken)

    def _show(self, view: _View, blocks: Iterable[int]) -> list[int]:
        new = [b for b in blocks if b not in view.shown]
        view.shown.update(new)
        view.wanted.update(b for b in new if b not in view.held)
        view.everything = len(view.shown) == len(self.sizes)
        return new

    def _holds(self, peer: Peer, block: int) -> None:
        view = self.peers.get(peer)
        if view is not None:
            view.held.add(block)
            view.wanted.discard(block)
        if block in self.out:
            return
        self.out.add(block)
        self._out_order.append(block)
        self._unsent_bytes -= self.sizes[block]
        self._in_pool.discard(block)
        owner = self._owner.pop(block, None)
        if owner is not None:
            share = self.peers[owner]
            share.share.discard(block)
            share.share_bytes -= self.sizes[block]

    def check_invariants(self) -> None:
        """For tests: the bookkeeping agrees with itself."""
        everyone = set(range(len(self.sizes)))
        shares = [v.share for v in self.peers.values()]
        assert sum(len(s) for s in shares) == len(set().union(*shares)), "shares overlap"
        assert set().union(*shares) | self._in_pool == everyone - self.out
        assert not self._in_pool & set().union(*shares)
        assert set(self._pool) >= self._in_pool
        assert self._unsent_bytes == sum(self.sizes[b] for b in everyone - self.out)
        assert set(self._out_order) == self.out and len(self._out_order) == len(self.out)
        for v in self.peers.values():
            assert v.held <= self.out
        for peer, v in self.peers.items():
            assert v.share <= v.shown and v.share_bytes == sum(self.sizes[b] for b in v.share)
            assert all(self._owner[b] == peer for b in v.share)
            assert v.wanted == v.shown - v.held
            assert v.everything == (v.shown == everyone)
        assert len(self._owner) == sum(len(s) for s in shares)
