"""Peers refused for a while: one list for every protocol a node speaks.

A peer that sends a bad block, breaks a protocol or lies about what it holds
is refused for `duration` seconds by the v1 server, the exchange sessions and
new connections alike. The list is bounded: a Sybil who earns bans under many
identities pushes out the bans that end soonest, never our memory.
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from dataclasses import dataclass, field

BAN_SECONDS = 3600.0
MAX_BANNED = 10_000


@dataclass
class BanList:
    duration: float = BAN_SECONDS
    capacity: int = MAX_BANNED
    _until: dict[Hashable, float] = field(default_factory=dict)
    reasons: dict[Hashable, str] = field(default_factory=dict)

    def ban(self, peer: Hashable, reason: str, now: float | None = None, duration: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        until = now + (self.duration if duration is None else duration)
        if peer not in self._until and len(self._until) >= self.capacity:
            self._expire(now)
            if len(self._until) >= self.capacity:
                soonest = min(self._until, key=self._until.__getitem__)
                self._forget(soonest)
        self._until[peer] = max(until, self._until.get(peer, 0.0))
        self.reasons[peer] = reason

    def is_banned(self, peer: Hashable, now: float | None = None) -> bool:
        until = self._until.get(peer)
        if until is None:
            return False
        if (time.monotonic() if now is None else now) < until:
            return True
        self._forget(peer)
        return False

    def __contains__(self, peer: Hashable) -> bool:
        return self.is_banned(peer)

    def __len__(self) -> int:
        return len(self._until)

    def active(self, now: float | None = None) -> int:
        """Peers banned right now (expired bans are forgotten first)."""
        self._expire(time.monotonic() if now is None else now)
        return len(self._until)

    def _expire(self, now: float) -> None:
        for peer in [p for p, until in self._until.items() if until <= now]:
            self._forget(peer)

    def _forget(self, peer: Hashable) -> None:
        self._until.pop(peer, None)
        self.reasons.pop(peer, None)
