"""Who we upload to: BitTorrent's choker as a pure object. The caller passes in the clock.

Theory of operation (after BitTorrent and libtorrent's choker):
- Upload goes to at most `slots` regular peers plus one optimistic peer.
  Only peers interested in something we have get a slot. No slot stays
  empty while an interested peer waits, so with at most slots+1 interested
  peers all of them are unchoked.
- A full rechoke runs every `rechoke_every` seconds (`due`). Between
  rechokes, `update` only takes slots back from peers that no longer qualify
  (gone, not interested, idle) and hands free slots to waiting peers.
- Downloading: tit-for-tat. The regular slots go to the peers that upload
  fastest to us (download_rate). Ties go to the peers we upload fastest to
  (upload_rate), then to chance.
- Seeding: nobody can pay us back, so slots go round robin by bytes given
  (libtorrent's "round robin" seeding choker). A peer keeps its regular slot
  until it has received `seed_quota` bytes since it was unchoked, or has held
  the slot for three rechoke periods, so a slow peer cannot keep it forever.
  Then it yields to the interested peers that have waited longest for a
  regular slot. A peer that has just used up its turn comes after every
  waiting peer. Among peers that waited equally long, and among peers whose
  turn is over when too few others are waiting, the faster one
  (upload_rate, libtorrent's "fastest upload") wins. Each turn moves the
  waiting peers up the queue, so nobody starves: each of n interested peers
  is unchoked within about 3 * ceil(n / slots) rechoke periods.
- Optimistic unchoke: one more slot, for an interested peer without a
  regular slot, picked at random and rotated every `optimistic_every`
  seconds. This lets a new peer show what it gives back. Peers that joined in
  the last 3 * optimistic_every seconds are 3x as likely to be picked. The
  peer picked last time is not picked again while another peer can be. An
  optimistic slot does not count as a turn: the peer keeps its place in the
  queue for a regular slot.
- Idle: a peer that holds a slot and has sent no request for `idle_after`
  seconds loses the slot at the next `update`, due or not. The time is
  counted from its last request, but never from before it was unchoked,
  because a peer needs a moment to react to an unchoke. The idle peer then
  sits out until the next full rechoke.
Peers are opaque hashable handles. The node measures the rates and times.
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Mapping
from dataclasses import dataclass

Peer = Hashable


@dataclass
class PeerRates:
    interested: bool  # the peer wants something we have
    download_rate: float  # bytes/s we received from it recently (e.g. 20 s average)
    upload_rate: float  # bytes/s we sent it recently
    uploaded: int  # bytes sent to it since it was last unchoked
    last_request: float | None  # when it last sent us a request (None: never)
    joined: float  # when the session started


class Choker:
    def __init__(
        self,
        slots: int = 4,
        rechoke_every: float = 10.0,
        optimistic_every: float = 30.0,
        idle_after: float = 10.0,
        seed_quota: int = 4 << 20,
        rng: random.Random | None = None,
    ) -> None:
        self.slots = slots
        self.rechoke_every = rechoke_every
        self.optimistic_every = optimistic_every
        self.idle_after = idle_after
        self.seed_quota = seed_quota  # seeding: bytes a regular slot gives before it goes to the next peer
        self.rng = rng or random.Random()
        self.unchoked: set[Peer] = set()  # regular | {optimistic}, as last returned by update()
        self.regular: set[Peer] = set()
        self.optimistic: Peer | None = None
        self._unchoked_at: dict[Peer, float] = {}  # unchoked peer -> when it was unchoked
        self._waiting: dict[Peer, float] = {}  # interested peer without a regular slot -> since when
        self.benched: set[Peer] = set()  # choked for idling: no slot until the next full rechoke
        self._next_rechoke: float | None = None
        self._next_optimistic: float | None = None

    def due(self, now: float) -> bool:
        """A full rechoke is due: the node should call update() now."""
        return self._next_rechoke is None or now >= self._next_rechoke

    def update(self, now: float, peers: Mapping[Peer, PeerRates], seeding: bool) -> set[Peer]:
        """The peers to keep unchoked from now on. May be called at any time.
        A full rechoke happens only when one is due."""
        full = self.due(now)
        if full:
            self._next_rechoke = now + self.rechoke_every
            self.benched.clear()
        self.benched = {p for p in self.benched if p in peers}
        for p in self.unchoked:
            if p in peers and peers[p].interested and self._idle(p, peers[p], now):
                self.benched.add(p)
        eligible = [p for p, r in peers.items() if r.interested and p not in self.benched]
        ok = set(eligible)
        self._waiting = {p: t for p, t in self._waiting.items() if p in ok}
        for p in eligible:
            if p not in self.regular:
                self._waiting.setdefault(p, now)

        regular = {p for p in self.regular if p in ok}
        spent: set[Peer] = set()
        if full and seeding:
            spent = {p for p in regular if self._spent(p, peers[p], now)}
            regular -= spent
        elif full:
            regular = set()
        tie = {p: self.rng.random() for p in eligible}

        def rate_order(p: Peer) -> tuple[float, float, float]:
            return (-peers[p].download_rate, -peers[p].upload_rate, tie[p])

        def seed_order(p: Peer) -> tuple[bool, float, float, float]:
            return (p in spent, self._waiting.get(p, now), -peers[p].upload_rate, tie[p])

        candidates = sorted((p for p in eligible if p not in regular), key=seed_order if seeding else rate_order)
        regular.update(candidates[: max(0, self.slots - len(regular))])
        for p in regular:
            self._waiting.pop(p, None)
        for p in self.regular:
            if p in ok and p not in regular:
                self._waiting[p] = now  # lost its regular slot: waits from now on

        optimistic = self._pick_optimistic(now, peers, [p for p in eligible if p not in regular])
        unchoked = regular | ({optimistic} if optimistic is not None else set())
        self._unchoked_at = {p: self._unchoked_at.get(p, now) for p in unchoked}
        self.regular, self.optimistic, self.unchoked = regular, optimistic, unchoked
        return set(unchoked)

    def _pick_optimistic(self, now: float, peers: Mapping[Peer, PeerRates], choices: list[Peer]) -> Peer | None:
        """Keep the optimistic peer until its rotation is due; otherwise pick another."""
        current = self.optimistic if self.optimistic in choices else None
        if current is not None and self._next_optimistic is not None and now < self._next_optimistic:
            return current
        if current is not None and len(choices) > 1:
            choices = [p for p in choices if p != current]  # rotate: someone else's turn
        if not choices:
            self._next_optimistic = None
            return None
        recent = self.optimistic_every * 3
        weights = [3.0 if now - peers[p].joined < recent else 1.0 for p in choices]
        self._next_optimistic = now + self.optimistic_every
        return self.rng.choices(choices, weights)[0]

    def _idle(self, peer: Peer, rates: PeerRates, now: float) -> bool:
        since = rates.last_request if rates.last_request is not None else rates.joined
        since = max(since, self._unchoked_at.get(peer, now))
        return now - since >= self.idle_after

    def _spent(self, peer: Peer, rates: PeerRates, now: float) -> bool:
        """Seeding: this regular slot has had its turn."""
        held = now - self._unchoked_at.get(peer, now)
        return rates.uploaded >= self.seed_quota or held >= 3 * self.rechoke_every
