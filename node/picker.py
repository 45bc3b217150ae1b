"""Which block to request from which peer: a pure object that scales to many blocks and many peers.

Theory of operation (after libtorrent's piece picker, simplified):
- Events come in (a peer has blocks, a block verified, a request was
  refused, a peer left); decisions go out (`pick`, `interesting`). Peers are
  opaque hashable handles; nothing here touches a socket, a hash or a clock.
- Availability. A block's availability is the number of known peers that
  hold it. Seeds (`peer_has_all`, or a peer whose announcements reach every
  block) are not counted block by block: a seed count is added to every
  block, so a seed joins or leaves in O(1). `_avail` counts only the other
  peers, and since the seed count is the same for every block it does not
  change which block is rarer.
- Buckets. A block we lack that nobody is requesting is "free". Each free
  block sits in the bucket of its `_avail` level: a list kept in uniformly
  random order (a new block is swapped into a random position; a block leaves
  by swapping the last one into its place). Each bucket is mirrored by a
  bitset (a Python int), as is every peer's have-set, so "the blocks of this
  bucket that this peer has" is one AND done in C.
- Rarest first. A seed's pick takes the tail of the lowest non-empty bucket:
  O(1). For any other peer, the buckets are walked from the lowest level; at
  the first level where the peer has something, the bucket's list is scanned
  from the tail (random order, so the first blocks it holds are a uniformly
  random choice). If the peer holds only a thin slice of a long bucket, a
  scan would be long: after a few blocks it stops, and the rest are drawn
  from the AND by rank (random ranks, found through the popcounts of about
  sqrt(slice) chunks of it). The walk stops as soon as the peer's free blocks are used
  up, so a peer with nothing free costs one AND.
- Endgame. Only when every missing block that some peer has is requested (no
  free block is available), a pick may request a block again from another
  peer that has it, as long as fewer than `endgame_copies` peers are
  requesting it and the caller's `copy_ok(peer, block, requesters)` agrees (the
  node asks for a copy only where it would arrive much sooner; see
  `copy_saves_time`); blocks with the fewest requesters go first. `got`
  returns the other requesters, so the node can cancel them.
- Requests are remembered per block (`_req`, the requesting peers) and per
  peer. A block is always exactly one of: held, requested, free.
- Costs. A big-int operation is O(blocks / 64) machine words in C: about a
  microsecond at 40,000 blocks. `peer_has` of one block: a few of them, and
  O(1) list work. `got`, `rejected`, a seed's pick: the same. Another peer's
  pick: one AND per non-empty level up to where the peer has something, then
  the short scan and maybe the draw. A peer that joins with a bitfield or leaves:
  O(blocks it holds) list work, and a few big-int operations per level.
  Memory: two bits per block per non-seed peer (a bytearray and an int).
The picker never decides that a peer is bad: the node calls `rejected` (or
`remove_peer`) and the block is free again.
"""

from __future__ import annotations

import math
import random
from array import array
from collections.abc import Callable, Hashable, Iterable, Sequence

Peer = Hashable

# A bucket scan from the tail looks at this many blocks (plus the number wanted)
# before it draws from the peer's slice of the bucket instead (about 3 us, and
# 10-20 us for a draw at 40,000 blocks).
_SCAN = 16


class _PeerState:
    __slots__ = ("seed", "mask", "bits", "count", "requested")

    def __init__(self, nbytes: int) -> None:
        self.seed = False
        self.mask = 0  # have-set as an int: bit b set = holds block b (all ones for a seed)
        self.bits: bytearray | None = bytearray(nbytes)  # the same have-set, packed; None for a seed
        self.count = 0  # blocks held (not kept for a seed)
        self.requested: set[int] = set()

    def has(self, block: int) -> bool:
        bits = self.bits
        return bits is None or bool(bits[block >> 3] >> (block & 7) & 1)


class BlockPicker:
    def __init__(
        self,
        total_blocks: int,
        have: Iterable[int] = (),
        *,
        endgame_copies: int = 2,
        rng: random.Random | None = None,
    ) -> None:
        if total_blocks < 0:
            raise ValueError(f"total_blocks must be >= 0, not {total_blocks}")
        self.total_blocks = total_blocks
        self.endgame_copies = endgame_copies
        self._rng = rng or random.Random()
        self._random = self._rng.random
        self._nbytes = (total_blocks + 7) >> 3
        self._all = (1 << total_blocks) - 1
        self._have = bytearray(total_blocks)  # one byte per block: 1 held
        for b in have:
            self._check(b)
            self._have[b] = 1
        self._missing_count = total_blocks - sum(self._have)
        self._missing_mask = _pack(b for b in range(total_blocks) if not self._have[b])
        self._peers: dict[Peer, _PeerState] = {}
        self._seeds = 0
        self._avail = array("i", bytes(4 * total_blocks))  # holders that are not seeds
        self._req: dict[int, list[Peer]] = {}  # requested block -> requesting peers
        # free blocks (missing, not requested), by _avail level
        free = [b for b in range(total_blocks) if not self._have[b]]
        self._rng.shuffle(free)
        self._pos = array("i", [-1]) * total_blocks  # index in its bucket, -1 if not free
        for i, b in enumerate(free):
            self._pos[b] = i
        self._buckets: list[list[int]] = [free]
        self._bucket_masks: list[int] = [self._missing_mask]
        self._free_mask = self._missing_mask
        self._nfree = len(free)
        self._lo = 0  # no bucket below this level has anything
        self._priority: list[int] = []  # picked before anything else, in this order

    # ---- what peers hold -------------------------------------------------

    def add_peer(self, peer: Peer) -> None:
        if peer not in self._peers:
            self._peers[peer] = _PeerState(self._nbytes)

    def remove_peer(self, peer: Peer) -> list[int]:
        """Forget a peer. Returns the blocks it had requested, sorted; those no
        other peer is requesting (endgame) are free again."""
        st = self._peers.pop(peer, None)
        if st is None:
            return []
        if st.seed:
            self._seeds -= 1
        else:
            self._uncount(st)
        for b in st.requested:
            self._unrequest(peer, b)
        return sorted(st.requested)

    def peer_has(self, peer: Peer, blocks: Iterable[int]) -> None:
        """The peer holds these blocks (added to what it held before). Indices
        outside 0..total_blocks-1 are ignored: they come from the wire."""
        st = self._peers.get(peer)
        if st is None:
            st = self._peers[peer] = _PeerState(self._nbytes)
        bits = st.bits
        if bits is None:
            return
        total = self.total_blocks
        added: list[int] = []
        for b in blocks:
            if 0 <= b < total:
                byte = b >> 3
                bit = 1 << (b & 7)
                if not bits[byte] & bit:
                    bits[byte] |= bit
                    added.append(b)
        if not added:
            return
        st.count += len(added)
        if st.count == total:
            self._make_seed(st)  # st.mask: the blocks counted so far
        elif len(added) <= len(self._buckets):
            avail = self._avail
            pos = self._pos
            masks = self._bucket_masks
            mask = st.mask
            for b in added:
                bit = 1 << b
                mask |= bit
                level = avail[b]
                avail[b] = level + 1
                if pos[b] >= 0:  # free: one bucket up (this is _delist and _enlist, inlined)
                    bucket = self._buckets[level]
                    last = bucket.pop()
                    if last != b:
                        i = pos[b]
                        bucket[i] = last
                        pos[last] = i
                    masks[level] ^= bit
                    level += 1
                    if level == len(self._buckets):
                        self._buckets.append([])
                        masks.append(0)
                    bucket = self._buckets[level]
                    k = len(bucket)
                    j = int(self._random() * (k + 1))
                    if j == k:
                        bucket.append(b)
                    else:
                        other = bucket[j]
                        bucket.append(other)
                        pos[other] = k
                        bucket[j] = b
                    pos[b] = j
                    masks[level] |= bit
            st.mask = mask
        else:
            old = st.mask
            st.mask = int.from_bytes(bits, "little")
            self._shift(added, st.mask ^ old, +1)

    def peer_lacks(self, peer: Peer, blocks: Iterable[int]) -> None:
        """The peer no longer holds these blocks (it dropped a file that went bad
        on its disk). A seed becomes an ordinary peer: O(blocks) once. Its
        requests for them end (the node sees them rejected)."""
        st = self._peers.get(peer)
        if st is None:
            return
        lost = {b for b in blocks if 0 <= b < self.total_blocks and st.has(b)}
        if not lost:
            return
        for b in lost & st.requested:
            st.requested.discard(b)
            self._unrequest(peer, b)
        if st.seed:
            self._seeds -= 1
            st.seed = False
            st.bits = bytearray(self._nbytes)
            st.mask = 0
            st.count = 0
            self.peer_has(peer, (b for b in range(self.total_blocks) if b not in lost))
            return
        assert st.bits is not None
        for b in lost:
            st.bits[b >> 3] &= ~(1 << (b & 7)) & 0xFF
        st.count -= len(lost)
        mask = _pack(lost)
        st.mask ^= mask
        self._shift(sorted(lost), mask, -1)

    def peer_has_all(self, peer: Peer) -> None:
        """The peer is a seed: O(1) for a new peer, O(blocks it had announced) otherwise."""
        st = self._peers.get(peer)
        if st is None:
            st = self._peers[peer] = _PeerState(0)
        if not st.seed:
            self._make_seed(st)

    # ---- decisions -------------------------------------------------------

    def want(self, blocks: Iterable[int]) -> None:
        """Fetch these blocks too. A picker's `have` is what it does not fetch:
        the blocks held, and for a partial replica the blocks not wanted (yet);
        pass here only blocks that are not held."""
        for b in blocks:
            self._check(b)
            if self._have[b]:
                self._have[b] = 0
                self._missing_count += 1
                self._missing_mask |= 1 << b
                self._free(b)

    def unwant(self, blocks: Iterable[int]) -> None:
        """Stop fetching these blocks (nobody wants them any more): free ones
        leave the buckets; one being requested is let in if it comes."""
        for b in blocks:
            self._check(b)
            if not self._have[b] and self._pos[b] >= 0:
                self._unfree(b)
                self._have[b] = 1
                self._missing_count -= 1
                self._missing_mask ^= 1 << b

    def prioritize(self, blocks: Iterable[int]) -> None:
        """Pick these blocks before any other, in this order, rarity aside (the
        node needs some early: the header, to build the tokenizer meanwhile)."""
        self._priority = [b for b in blocks if not self._have[b]]

    def pick(self, peer: Peer, n: int, copy_ok: Callable[[Peer, int, Sequence[Peer]], bool] | None = None) -> list[int]:
        """Up to n blocks to request from `peer` now; they are marked requested by it.
        `copy_ok(peer, block, requesters)`: whether an endgame copy of a block
        the requesters are asked for may be asked of `peer` too (default: yes)."""
        st = self._peers.get(peer)
        if st is None or n <= 0:
            return []
        out: list[int] = []
        if self._priority:
            self._priority = [b for b in self._priority if not self._have[b]]
            for b in self._priority:
                if len(out) < n and self._pos[b] >= 0 and st.has(b):
                    self._take(peer, st, b)
                    out.append(b)
            if len(out) == n:
                return out
        if st.seed:
            while len(out) < n and self._free_available():
                level = self._lo
                while not self._buckets[level]:
                    level += 1
                self._lo = level
                out.append(self._buckets[level][-1])
                self._take(peer, st, out[-1])
        else:
            cand = st.mask & self._free_mask
            if cand:
                self._pick_rarest(peer, st, cand, n, out)
        if len(out) < n and not self._free_available():
            self._pick_endgame(peer, st, n - len(out), out, copy_ok)
        return out

    def interesting(self, peer: Peer) -> bool:
        """The peer has a block we lack (requested or not)."""
        st = self._peers.get(peer)
        return st is not None and bool(st.mask & self._missing_mask)

    # ---- outcomes --------------------------------------------------------

    def got(self, peer: Peer, block: int) -> list[Peer]:
        """The block verified (it came from `peer`). Returns the OTHER peers
        that still had it requested, so the node can cancel those requests."""
        self._check(block)
        if self._have[block]:
            return []
        self._have[block] = 1
        self._missing_count -= 1
        self._missing_mask ^= 1 << block
        if self._pos[block] >= 0:
            self._unfree(block)
        others: list[Peer] = []
        for p in self._req.pop(block, ()):
            self._peers[p].requested.discard(block)
            if p != peer:
                others.append(p)
        return others

    def rejected(self, peer: Peer, block: int) -> None:
        """The request was refused, failed, or its data was bad: `peer` no
        longer requests it, and it is free again unless another peer does."""
        st = self._peers.get(peer)
        if st is not None and block in st.requested:
            st.requested.discard(block)
            self._unrequest(peer, block)

    def have_block(self, block: int) -> bool:
        self._check(block)
        return bool(self._have[block])

    # ---- state -----------------------------------------------------------

    @property
    def done(self) -> bool:
        return self._missing_count == 0

    @property
    def missing_count(self) -> int:
        return self._missing_count

    @property
    def peers(self) -> tuple[Peer, ...]:
        return tuple(self._peers)

    def requested_by(self, peer: Peer) -> set[int]:
        st = self._peers.get(peer)
        return set(st.requested) if st is not None else set()

    def availability(self, block: int) -> int:
        """How many known peers hold the block."""
        self._check(block)
        return self._avail[block] + self._seeds

    # ---- internals -------------------------------------------------------

    def _check(self, block: int) -> None:
        if not 0 <= block < self.total_blocks:
            raise IndexError(f"block {block} out of range 0..{self.total_blocks - 1}")

    def _free_available(self) -> bool:
        """Some free block is held by a known peer."""
        if self._seeds:
            return self._nfree > 0
        return self._nfree > len(self._buckets[0])

    def _pick_rarest(self, peer: Peer, st: _PeerState, cand: int, n: int, out: list[int]) -> None:
        buckets = self._buckets
        masks = self._bucket_masks
        bits = st.bits
        assert bits is not None
        lo = self._lo
        while lo < len(buckets) - 1 and not buckets[lo]:
            lo += 1
        self._lo = lo
        for level in range(max(1, lo), len(buckets)):  # level 0: nobody but seeds holds it
            bucket = buckets[level]
            if not bucket:
                continue
            c = masks[level] & cand
            if not c:
                continue
            cand ^= c
            chosen = self._choose(bucket, c, n - len(out), bits)
            for b in chosen:
                self._take(peer, st, b)
            out.extend(chosen)
            if len(out) >= n or not cand:
                return

    def _choose(self, bucket: list[int], c: int, k: int, bits: bytearray) -> list[int]:
        """k blocks (or all there are) picked uniformly among the bucket's blocks set in c (those bits held)."""
        out: list[int] = []
        if _scan(bucket, len(bucket) - 1, _SCAN + k, k, bits, out) < 0 or len(out) == k:
            return out
        # A thin slice of a long bucket: draw the rest from c instead.
        for b in out:
            c ^= 1 << b
        left = c.bit_count()
        if left <= k - len(out):
            return out + _bits_of_int(c)
        return out + _sample_bits(c, left, k - len(out), self._rng)

    def _pick_endgame(
        self,
        peer: Peer,
        st: _PeerState,
        k: int,
        out: list[int],
        copy_ok: Callable[[Peer, int, Sequence[Peer]], bool] | None,
    ) -> None:
        # requested blocks this peer holds: missing and not free
        c = st.mask & self._missing_mask & ~self._free_mask
        if not c:
            return
        req = self._req
        cands = [b for b in _bits_of_int(c) if len(req[b]) < self.endgame_copies and peer not in req[b]]
        self._rng.shuffle(cands)
        cands.sort(key=lambda b: len(req[b]))
        taken = 0
        for b in cands:
            if taken == k:
                break
            if copy_ok is not None and not copy_ok(peer, b, req[b]):
                continue
            req[b].append(peer)
            st.requested.add(b)
            out.append(b)
            taken += 1

    def _take(self, peer: Peer, st: _PeerState, block: int) -> None:
        """A free block becomes requested by peer."""
        self._unfree(block)
        self._req[block] = [peer]
        st.requested.add(block)

    def _unrequest(self, peer: Peer, block: int) -> None:
        """peer no longer requests block (its own set is the caller's job)."""
        peers = self._req[block]
        peers.remove(peer)
        if not peers:
            del self._req[block]
            self._free(block)

    def _make_seed(self, st: _PeerState) -> None:
        self._uncount(st)
        st.seed = True
        st.bits = None
        st.mask = self._all
        st.count = 0
        self._seeds += 1

    def _uncount(self, st: _PeerState) -> None:
        """Take a non-seed peer's blocks (st.mask) out of the availability counts."""
        if st.mask:
            self._shift(_bits_of_int(st.mask), st.mask, -1)

    def _shift(self, blocks: list[int], mask: int, delta: int) -> None:
        """Add delta (+1 or -1) to the availability of blocks (mask: the same set),
        moving the free ones between buckets. The masks move level by level."""
        avail = self._avail
        pos = self._pos
        masks = self._bucket_masks
        moved = [m & mask for m in masks]
        for b in blocks:
            level = avail[b]
            avail[b] = level + delta
            if pos[b] >= 0:
                self._delist(b, level)
                self._enlist(b, level + delta)
        for level, m in enumerate(moved):
            if m:
                masks[level] ^= m
        for level, m in enumerate(moved):
            if m:
                masks[level + delta] |= m

    def _free(self, block: int) -> None:
        level = self._avail[block]
        self._enlist(block, level)
        bit = 1 << block
        self._bucket_masks[level] |= bit
        self._free_mask |= bit
        self._nfree += 1

    def _unfree(self, block: int) -> None:
        level = self._avail[block]
        self._delist(block, level)
        bit = 1 << block
        self._bucket_masks[level] ^= bit
        self._free_mask ^= bit
        self._nfree -= 1

    def _enlist(self, block: int, level: int) -> None:
        """Put a block in a bucket's list, at a random place (the bucket's mask is the caller's job)."""
        buckets = self._buckets
        while level >= len(buckets):
            buckets.append([])
            self._bucket_masks.append(0)
        bucket = buckets[level]
        k = len(bucket)
        j = int(self._random() * (k + 1))
        if j == k:
            bucket.append(block)
        else:
            other = bucket[j]
            bucket.append(other)
            self._pos[other] = k
            bucket[j] = block
        self._pos[block] = j
        if level < self._lo:
            self._lo = level

    def _delist(self, block: int, level: int) -> None:
        """Take a block out of a bucket's list (the bucket's mask is the caller's job)."""
        bucket = self._buckets[level]
        i = self._pos[block]
        last = bucket.pop()
        if last != block:
            bucket[i] = last
            self._pos[last] = i
        self._pos[block] = -1

    # ---- for tests -------------------------------------------------------

    def check_invariants(self) -> None:
        """Recount everything from the peers' have-sets and the requests; slow."""
        total = self.total_blocks
        avail = [0] * total
        seeds = 0
        for p, st in self._peers.items():
            if st.seed:
                seeds += 1
                assert st.bits is None and st.mask == self._all and st.count == 0, p
            else:
                assert st.bits is not None and len(st.bits) == self._nbytes, p
                held = [b for b in range(total) if st.has(b)]
                assert int.from_bytes(st.bits, "little") == st.mask == _pack(held), p
                assert st.count == len(held) and (st.count < total or total == 0), p
                for b in held:
                    avail[b] += 1
            for b in st.requested:
                assert p in self._req[b], (p, b)
                assert st.has(b), (p, b)  # only ever requested from a holder
        assert avail == list(self._avail)
        assert seeds == self._seeds
        for b, ps in self._req.items():
            assert ps and len(set(ps)) == len(ps), b
            assert len(ps) <= max(1, self.endgame_copies), b
            for p in ps:
                assert b in self._peers[p].requested, (p, b)
            assert not self._have[b] and self._pos[b] == -1, b
        missing = [b for b in range(total) if not self._have[b]]
        assert self._missing_count == len(missing)
        assert self._missing_mask == _pack(missing)
        free = [b for b in missing if b not in self._req]
        assert self._free_mask == _pack(free) and self._nfree == len(free)
        assert len(self._buckets) == len(self._bucket_masks) >= 1
        listed = 0
        for level, bucket in enumerate(self._buckets):
            assert self._bucket_masks[level] == _pack(bucket), level
            assert level >= self._lo or not bucket, level
            for i, b in enumerate(bucket):
                assert self._pos[b] == i and self._avail[b] == level, (level, b)
            listed += len(bucket)
        assert listed == len(free)
        assert sum(1 for b in range(total) if self._pos[b] >= 0) == len(free)


def _scan(bucket: list[int], i: int, budget: int, k: int, bits: bytearray, out: list[int]) -> int:
    """Look at up to `budget` blocks from bucket[i] down; append those set in bits to out until
    it holds k. Returns the index of the next block to look at (-1: none left)."""
    stop = max(-1, i - budget)
    while i > stop:
        b = bucket[i]
        i -= 1
        if bits[b >> 3] >> (b & 7) & 1:
            out.append(b)
            if len(out) == k:
                break
    return i


def _pack(blocks: Iterable[int]) -> int:
    """A set of block indices as an int bitset."""
    buf = bytearray()
    for b in blocks:
        i = b >> 3
        if i >= len(buf):
            buf.extend(bytes(i + 1 - len(buf)))
        buf[i] |= 1 << (b & 7)
    return int.from_bytes(buf, "little")


def _sample_bits(c: int, count: int, k: int, rng: random.Random) -> list[int]:
    """k of the `count` set bits of c, uniformly at random: ranks are drawn, then found
    chunk by chunk through popcounts, without reading out every set bit."""
    data = c.to_bytes((c.bit_length() + 7) >> 3, "little")
    size = len(data) // (math.isqrt(count) + 1) + 8  # bytes per chunk: about sqrt(count) chunks
    out: list[int] = []
    start = 0  # byte offset of the current chunk
    chunk = int.from_bytes(data[:size], "little")
    before, here = 0, chunk.bit_count()  # set bits before the chunk, in it
    for rank in sorted(rng.sample(range(count), k)):
        while rank >= before + here:
            before += here
            start += size
            if start >= len(data):
                raise ValueError(f"c has {before} set bits, not {count}")
            chunk = int.from_bytes(data[start : start + size], "little")
            here = chunk.bit_count()
        x = chunk
        for _ in range(rank - before):
            x &= x - 1  # drop the lowest set bit
        out.append((start << 3) + (x & -x).bit_length() - 1)
    return out


def _bits_of_int(c: int) -> list[int]:
    """The set bits of c, ascending: its bytes, a mask of the non-zero ones to find() them at C speed."""
    data = c.to_bytes((c.bit_length() + 7) >> 3, "little")
    nonzero = data.translate(_NONZERO)
    out: list[int] = []
    i = nonzero.find(1)
    while i >= 0:
        base = i << 3
        out.extend([base + j for j in _BITS[data[i]]])
        i = nonzero.find(1, i + 1)
    return out


_NONZERO = bytes([0] + [1] * 255)
_BITS = [tuple(j for j in range(8) if v >> j & 1) for v in range(256)]  # the set bits of each byte value


# An endgame copy must bring its block in at least this many times sooner.
COPY_SPEEDUP = 2.0


def copy_saves_time(eta_asked: Sequence[float], eta_copy: float) -> bool:
    """Whether asking one more peer for a block is worth its bytes: the copy
    (`eta_copy` seconds until it would be in, after what that peer already
    has queued for us) would arrive `COPY_SPEEDUP` times sooner than the
    soonest of the peers already asked (`eta_asked`: seconds until theirs is
    in, the blocks queued before it included), or none of them has sent
    anything measurable (inf: stalled, or new). A copy that merely ties
    spends the sender's upload for nothing: in a swarm whose seed is its
    bottleneck, copies asked of the seed were 2% of all it sent (N=4, 40
    Mbit/s links)."""
    soonest = min(eta_asked, default=math.inf)
    return soonest == math.inf or eta_copy * COPY_SPEEDUP < soonest
