"""Which fragment to ask which peer for: a pure object, fed events, asked for decisions.

Theory of operation (after libtorrent's piece picker):
- Each peer has a request queue bounded by count (`per_peer`) and by bytes
  (`per_peer_bytes`): enough requests in flight to keep its stream busy, so
  many small fragments or a few large ones. Free room is filled with the
  rarest missing fragment the peer has that nobody is fetching yet (random
  among equally rare, so pullers of one model spread out).
- A fragment whose bytes have arrived (`received`) frees its slot at once and
  waits for verification without blocking the peer's queue.
- Endgame: when every missing fragment is already being fetched, an idle slot
  may fetch a fragment a second time from another peer (`endgame_copies`);
  the first verified copy wins; the others are dropped unread or unhashed.
- A peer that sends bytes that fail verification is banned at once; one that
  fails `max_failures` requests in a row is dropped. Either can rejoin only
  through `peer_have` again (dropped) or never (banned).
Peers are opaque hashable handles; nothing here touches a socket or a hash.
"""

from __future__ import annotations

import random
from collections.abc import Hashable
from dataclasses import dataclass, field

Peer = Hashable


@dataclass
class _PeerState:
    have: set[int]
    inflight: set[int] = field(default_factory=set)  # requested, bytes not all here yet
    inflight_bytes: int = 0
    failures: int = 0


class Scheduler:
    def __init__(
        self,
        count: int,
        have: set[int] | None = None,
        per_peer: int = 4,
        endgame_copies: int = 2,
        max_failures: int = 3,
        rng: random.Random | None = None,
        sizes: list[int] | None = None,
        per_peer_bytes: int | None = None,
    ) -> None:
        self.count = count
        self.have: set[int] = set(have or ())
        self.per_peer = per_peer
        self.sizes = sizes or [1] * count
        self.per_peer_bytes = per_peer_bytes
        self.endgame_copies = endgame_copies
        self.max_failures = max_failures
        self.rng = rng or random.Random()
        self.peers: dict[Peer, _PeerState] = {}
        self.banned: set[Peer] = set()
        self.fetching: dict[int, set[Peer]] = {}  # fragment -> peers fetching it
        self.verifying: dict[int, set[Peer]] = {}  # fragment -> peers whose copy is being verified
        self.availability = [0] * count

    # ---- events ----------------------------------------------------------

    def peer_have(self, peer: Peer, have: set[int]) -> None:
        """A peer's full have-set (new peer, or a refresh)."""
        if peer in self.banned:
            return
        have = {i for i in have if 0 <= i < self.count}
        state = self.peers.get(peer)
        if state is None:
            state = self.peers[peer] = _PeerState(set())
        for i in state.have - have:
            self.availability[i] -= 1
        for i in have - state.have:
            self.availability[i] += 1
        state.have = have

    def peer_left(self, peer: Peer) -> list[int]:
        """Forget a peer; return the fragments it was fetching (now free again)."""
        state = self.peers.pop(peer, None)
        if state is None:
            return []
        for i in state.have:
            self.availability[i] -= 1
        for i in state.inflight:
            self._unfetch(peer, i)
        return sorted(state.inflight)

    def received(self, peer: Peer, index: int) -> None:
        """All bytes of a request arrived; verification follows. Frees the peer's slot."""
        state = self.peers.get(peer)
        if state is not None:
            self._drop_inflight(state, index)
        self._unfetch(peer, index)
        if index not in self.have:
            self.verifying.setdefault(index, set()).add(peer)

    def verified(self, peer: Peer, index: int) -> list[tuple[Peer, int]]:
        """A fragment arrived and passed verification. Returns duplicate
        requests (endgame) that should now be cancelled."""
        self.have.add(index)
        self.verifying.pop(index, None)
        state = self.peers.get(peer)
        if state is not None:
            state.failures = 0
            self._drop_inflight(state, index)
        others = [p for p in self.fetching.pop(index, set()) if p != peer]
        for p in others:
            if p in self.peers:
                self._drop_inflight(self.peers[p], index)
        return [(p, index) for p in others]

    def failed(self, peer: Peer, index: int, bad_data: bool = False) -> None:
        """A request failed: an error, a timeout, or (bad_data) bytes that did not verify."""
        state = self.peers.get(peer)
        if state is not None:
            self._drop_inflight(state, index)
            state.failures += 1
        self._unfetch(peer, index)
        self._unverify(peer, index)
        if bad_data:
            self.banned.add(peer)
            self.peer_left(peer)
        elif state is not None and state.failures >= self.max_failures:
            self.peer_left(peer)

    # ---- decisions -------------------------------------------------------

    @property
    def done(self) -> bool:
        return len(self.have) >= self.count

    def missing(self) -> set[int]:
        return set(range(self.count)) - self.have

    def unavailable(self) -> set[int]:
        """Missing fragments that no known peer has."""
        return {i for i in self.missing() if self.availability[i] == 0}

    def next_requests(self) -> list[tuple[Peer, int]]:
        """Fill every free slot; the caller starts these requests."""
        out: list[tuple[Peer, int]] = []
        peers = list(self.peers.items())
        self.rng.shuffle(peers)
        progress = True
        while progress:  # one request per peer per round, so slots are shared fairly
            progress = False
            for peer, state in peers:
                if self._queue_full(state) or peer not in self.peers:
                    continue
                index = self._pick(peer, state)
                if index is None:
                    continue
                state.inflight.add(index)
                state.inflight_bytes += self.sizes[index]
                self.fetching.setdefault(index, set()).add(peer)
                out.append((peer, index))
                progress = True
        return out

    def _queue_full(self, state: _PeerState) -> bool:
        if len(state.inflight) >= self.per_peer:
            return True
        return self.per_peer_bytes is not None and state.inflight_bytes >= self.per_peer_bytes

    def _pick(self, peer: Peer, state: _PeerState) -> int | None:
        busy = self.fetching.keys() | self.verifying.keys()
        candidates = [i for i in state.have if i not in self.have and i not in busy]
        if candidates:
            rarest = min(self.availability[i] for i in candidates)
            return self.rng.choice(sorted(i for i in candidates if self.availability[i] == rarest))
        endgame = [
            i
            for i in state.have
            if i not in self.have
            and i not in state.inflight
            and i not in self.verifying
            and len(self.fetching.get(i, ())) < self.endgame_copies
        ]
        if endgame and not (self.missing() - busy) & self._known():
            return self.rng.choice(sorted(endgame))
        return None

    def _known(self) -> set[int]:
        return {i for i in range(self.count) if self.availability[i] > 0}

    def _drop_inflight(self, state: _PeerState, index: int) -> None:
        if index in state.inflight:
            state.inflight.remove(index)
            state.inflight_bytes -= self.sizes[index]

    def _unverify(self, peer: Peer, index: int) -> None:
        _discard(self.verifying, index, peer)

    def _unfetch(self, peer: Peer, index: int) -> None:
        _discard(self.fetching, index, peer)

    def check_invariants(self) -> None:
        """For tests: the bookkeeping agrees with itself."""
        avail = [0] * self.count
        for state in self.peers.values():
            for i in state.have:
                avail[i] += 1
        assert avail == self.availability
        for i, peers in self.fetching.items():
            assert peers, i
            for p in peers:
                assert i in self.peers[p].inflight
        for p, state in self.peers.items():
            for i in state.inflight:
                assert p in self.fetching[i]
            assert state.inflight_bytes == sum(self.sizes[i] for i in state.inflight)
            assert p not in self.banned
        for i, peers in self.verifying.items():
            assert peers and i not in self.have, i


def _discard(table: dict[int, set[Peer]], index: int, peer: Peer) -> None:
    """Remove peer from table[index], and the entry once it is empty."""
    peers = table.get(index)
    if peers is not None:
        peers.discard(peer)
        if not peers:
            del table[index]
