"""What happened lately that a person watching the node should see: peers
banned or dropped, blocks rejected, pulls and removals started from the
dashboard. A bounded ring: the oldest event goes when a new one comes, so a
hostile swarm that earns a ban a second costs a fixed amount of memory.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

MAX_EVENTS = 200
MAX_TEXT = 300  # characters kept of an event's text (reasons can quote what a peer sent)


@dataclass(frozen=True)
class NodeEvent:
    time: float  # wall clock (seconds since the epoch): shown to people
    kind: str  # "banned", "rejected_block", "dropped", "pull", "pulled", "pull_failed", "removed"
    text: str
    peer: str = ""
    model: str = ""


class RecentEvents:
    def __init__(self, capacity: int = MAX_EVENTS) -> None:
        self._ring: deque[NodeEvent] = deque(maxlen=capacity)
        self.total = 0  # events ever added (the ring keeps the last `capacity`)

    def add(self, kind: str, text: str, peer: str = "", model: str = "", now: float | None = None) -> NodeEvent:
        event = NodeEvent(time.time() if now is None else now, kind, text[:MAX_TEXT], peer, model)
        self._ring.append(event)
        self.total += 1
        return event

    def latest(self, n: int) -> list[NodeEvent]:
        """The last n events, newest first."""
        return list(reversed(self._ring))[:n]

    def __iter__(self) -> Iterator[NodeEvent]:
        return iter(self._ring)

    def __len__(self) -> int:
        return len(self._ring)
