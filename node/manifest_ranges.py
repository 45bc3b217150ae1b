"""Which range of a manifest to ask which holder for next (pure: no I/O).

A large manifest (30 MB at 40,000 fragments) is fetched in ranges of `chunk`
bytes from several holders at once and checked as a whole against the model
CID once every range is in (manifest_fetch.py). A holder gets the lowest
range nobody has asked for; one that fails gives its ranges back; at the end
an idle holder asks again for a range still on its way from another
(BitTorrent's endgame), and the first copy in is kept.
"""

from __future__ import annotations

from collections.abc import Hashable


class RangePlan:
    def __init__(self, total: int, chunk: int) -> None:
        if total < 0 or chunk <= 0:
            raise ValueError("a manifest's size is >= 0 and its ranges > 0 bytes")
        self.total = total
        self.chunk = chunk
        self.count = max(1, -(-total // chunk))
        self._done = [False] * self.count
        self._asked: list[set[Hashable]] = [set() for _ in range(self.count)]  # holders with it in flight
        self.left = self.count

    @property
    def complete(self) -> bool:
        return self.left == 0

    def range_of(self, i: int) -> tuple[int, int]:
        """(offset, length) of range i."""
        offset = i * self.chunk
        return offset, min(self.chunk, self.total - offset)

    def next_for(self, holder: Hashable) -> int | None:
        """The range `holder` should ask for next, now marked as asked of it:
        the lowest that nobody is fetching; else (endgame) the one fetched by
        the fewest others that it is not fetching; None when there is none."""
        endgame: int | None = None
        for i in range(self.count):
            if self._done[i] or holder in self._asked[i]:
                continue
            if not self._asked[i]:
                endgame = i
                break
            if endgame is None or len(self._asked[i]) < len(self._asked[endgame]):
                endgame = i
        if endgame is not None:
            self._asked[endgame].add(holder)
        return endgame

    def received(self, i: int, holder: Hashable) -> bool:
        """Range i came from `holder`; True if it is the first copy (keep it)."""
        self._asked[i].discard(holder)
        if self._done[i]:
            return False
        self._done[i] = True
        self._asked[i].clear()
        self.left -= 1
        return True

    def failed(self, holder: Hashable) -> None:
        """`holder` is gone: what it was fetching goes to the others."""
        for asked in self._asked:
            asked.discard(holder)
