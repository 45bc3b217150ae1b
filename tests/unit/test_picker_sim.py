"""The block picker in a simulated swarm: one seed, many pullers, each with its own BlockPicker.

A discrete-event simulation in rounds, with no sockets and no clock:
- Nodes join (some mid-way) by opening links to a few random nodes already
  there; each side tells its picker what the other holds (a bitfield, or
  `peer_has_all` for a seed). A puller that finishes stays, as one more seed.
- Each round, every node serves a few random requests among those waiting
  for it (its upload). A served request is refused now and then
  (`rejected`); a bad peer claims every block and every block it sends fails
  verification (`rejected` too, and a third strike ends the link); otherwise
  the block verifies (`got`) and the other requests for it are cancelled.
  At the end of the round each puller tells its links what it got in the
  round (one `peer_has` each: HAVEs sent in a batch).
- Each round, every puller still pulling asks a few random interesting links
  to fill their request queues (`pick`).
- Some pullers leave mid-way (`remove_peer` on every node linked to them); a
  puller left with few links dials more.
Checked on every pick: no block is asked of the same peer twice at once, only
holders are asked, and a block asked of two peers at once means the endgame:
every block the puller lacks that a linked peer holds is already asked for.
At the end every puller that stayed holds every block. The small
configurations run check_invariants() on the pickers after every event.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from node.picker import BlockPicker


@dataclass(frozen=True)
class Config:
    blocks: int = 2000
    pullers: int = 50  # joining at the start, and...
    late: int = 10  # ...joining mid-way
    leavers: int = 8  # pullers that leave mid-way for good
    bad: int = 1  # peers that claim every block and send garbage
    links: int = 6  # links a node opens when it joins
    queue: int = 4  # requests in flight per link
    asks: int = 3  # links a puller fills per round
    upload: int = 4  # requests a puller serves per round
    seed_upload: int = 8
    p_reject: float = 0.05
    endgame_copies: int = 2
    check_every_event: bool = False
    max_rounds: int = 3000
    seed: int = 0


@dataclass
class Node:
    name: str
    kind: str  # "seed", "puller" or "bad"
    have: set[int]
    announced: set[int] = field(default_factory=set)  # what its links have been told it holds
    got: list[int] = field(default_factory=list)  # blocks got this round, to announce
    picker: BlockPicker | None = None
    links: set[str] = field(default_factory=set)
    asked: dict[str, set[int]] = field(default_factory=dict)  # our requests in flight, by the peer asked
    missing: set[int] = field(default_factory=set)
    strikes: dict[str, int] = field(default_factory=dict)
    banned: set[str] = field(default_factory=set)
    present: bool = False

    def holds(self, block: int) -> bool:
        """As far as its links know."""
        return self.kind != "puller" or block in self.announced


@dataclass
class Stats:
    rounds: int = 0
    picks: int = 0
    got: int = 0
    rejected: int = 0
    bad_blocks: int = 0
    bans: int = 0
    endgame_picks: int = 0
    cancels: int = 0
    joins_midway: int = 0
    leaves: int = 0
    events: int = 0


class Swarm:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.nodes: dict[str, Node] = {}
        self.stats = Stats()
        self.everything = set(range(cfg.blocks))

    # ---- events ------------------------------------------------------------------

    def event(self, *nodes: Node) -> None:
        self.stats.events += 1
        if self.cfg.check_every_event:
            for n in nodes:
                if n.picker is not None:
                    n.picker.check_invariants()

    def join(self, name: str, kind: str) -> None:
        cfg = self.cfg
        node = Node(name, kind, set(self.everything) if kind != "puller" else set())
        if kind == "puller":
            node.picker = BlockPicker(
                cfg.blocks, endgame_copies=cfg.endgame_copies, rng=random.Random(self.rng.getrandbits(32))
            )
            node.missing = set(self.everything)
        self.nodes[name] = node
        node.present = True
        if kind == "puller":
            self.dial(node, cfg.links)

    def dial(self, node: Node, count: int) -> None:
        others = [
            n for n in self.nodes.values() if n.present and n is not node and n.name not in node.links | node.banned
        ]
        for other in self.rng.sample(others, min(count, len(others))):
            self.link(node, other)

    def link(self, a: Node, b: Node) -> None:
        a.links.add(b.name)
        b.links.add(a.name)
        for x, y in ((a, b), (b, a)):
            x.asked[y.name] = set()
            if x.picker is not None:
                if y.kind == "puller":
                    x.picker.peer_has(y.name, sorted(y.announced))
                else:
                    x.picker.peer_has_all(y.name)
                self.event(x)

    def unlink(self, a: Node, b: Node) -> None:
        a.links.discard(b.name)
        b.links.discard(a.name)
        for x, y in ((a, b), (b, a)):
            asked = x.asked.pop(y.name)
            if x.picker is not None:
                assert x.picker.remove_peer(y.name) == sorted(asked)
                self.event(x)

    def leave(self, node: Node) -> None:
        for name in sorted(node.links):
            self.unlink(node, self.nodes[name])
        node.present = False
        self.stats.leaves += 1

    def serve(self, server: Node) -> None:
        """One round of a node's upload: random requests among those waiting for it."""
        waiting = [(u, b) for u in sorted(server.links) for b in sorted(self.nodes[u].asked[server.name])]
        self.rng.shuffle(waiting)
        slots = self.cfg.seed_upload if server.kind == "seed" else self.cfg.upload
        for u, b in waiting[:slots]:
            self.answer(self.nodes[u], server, b)

    def answer(self, u: Node, v: Node, block: int) -> None:
        """v sends u the block u asked for (or refuses)."""
        if v.name not in u.links or block not in u.asked[v.name]:
            return  # cancelled, or the link is gone, earlier in this round
        picker = u.picker
        assert picker is not None
        u.asked[v.name].discard(block)
        if self.rng.random() < self.cfg.p_reject:
            picker.rejected(v.name, block)
            self.stats.rejected += 1
            self.event(u)
            return
        if v.kind == "bad":
            picker.rejected(v.name, block)  # did not verify
            self.stats.bad_blocks += 1
            self.event(u)
            u.strikes[v.name] = u.strikes.get(v.name, 0) + 1
            if u.strikes[v.name] >= 3:
                u.banned.add(v.name)
                self.unlink(u, v)
                self.stats.bans += 1
            return
        assert v.holds(block) and block in v.have and block not in u.have
        expected = {w for w, asked in u.asked.items() if block in asked}
        others = picker.got(v.name, block)
        self.event(u)
        assert set(others) == expected and len(others) == len(expected)
        for w in others:
            u.asked[w].discard(block)  # cancelled
        self.stats.cancels += len(others)
        self.stats.got += 1
        u.have.add(block)
        u.missing.discard(block)
        u.got.append(block)

    def announce(self, u: Node) -> None:
        """u tells its links what it got this round."""
        for name in sorted(u.links):
            x = self.nodes[name]
            if x.picker is not None:
                x.picker.peer_has(u.name, u.got)
                self.event(x)
        u.announced.update(u.got)
        u.got.clear()

    def fill(self, u: Node) -> None:
        """u asks a few of its interesting links for blocks."""
        picker = u.picker
        assert picker is not None
        if picker.done:
            return
        wanted = [name for name in sorted(u.links) if picker.interesting(name)]
        for v in self.rng.sample(wanted, min(self.cfg.asks, len(wanted))):
            room = self.cfg.queue - len(u.asked[v])
            if room <= 0:
                continue
            picks = picker.pick(v, room)
            self.event(u)
            self.stats.picks += len(picks)
            assert len(set(picks)) == len(picks) <= room
            second = False
            for b in picks:
                assert b in u.missing and self.nodes[v].holds(b)
                assert b not in u.asked[v]  # never twice from the same peer at once
                second |= any(b in asked for asked in u.asked.values())
                u.asked[v].add(b)
            if second:
                self.stats.endgame_picks += 1
                assert self.in_endgame(u), "a block asked of two peers outside the endgame"

    def in_endgame(self, u: Node) -> bool:
        """Every block u lacks that a linked peer holds (as far as u knows) is asked of some peer."""
        asked = set().union(*u.asked.values())
        holders = [self.nodes[name] for name in u.links]
        return all(b in asked or not any(h.holds(b) for h in holders) for b in u.missing)

    # ---- the run -----------------------------------------------------------------

    def run(self) -> None:
        cfg = self.cfg
        rng = self.rng
        self.join("seed", "seed")
        for i in range(cfg.bad):
            self.join(f"bad{i}", "bad")
        for i in range(cfg.pullers):
            self.join(f"p{i}", "puller")
        # about half the rounds the whole pull takes: the swarm's upload against what it must fetch
        middle = max(4, cfg.blocks * cfg.pullers // (2 * (cfg.upload * cfg.pullers + cfg.seed_upload)))
        joins = {f"p{cfg.pullers + i}": rng.randint(1, middle) for i in range(cfg.late)}
        leaves = {f"p{i}": rng.randint(1, 2 * middle) for i in rng.sample(range(cfg.pullers), cfg.leavers)}
        for r in range(1, cfg.max_rounds + 1):
            self.stats.rounds = r
            for name, when in joins.items():
                if when == r:
                    self.join(name, "puller")
                    self.stats.joins_midway += 1
            for name, when in leaves.items():
                if when == r:
                    self.leave(self.nodes[name])
            present = [n for n in self.nodes.values() if n.present]
            for node in rng.sample(present, len(present)):
                if node.present:
                    self.serve(node)
            pullers = [n for n in present if n.kind == "puller" and n.present]
            for node in rng.sample(pullers, len(pullers)):
                if len(node.links) < cfg.links // 2 and node.missing:
                    self.dial(node, cfg.links - len(node.links))
                self.fill(node)
            for node in pullers:
                if node.present:
                    self.announce(node)
            if r > max(joins.values(), default=0) and all(not n.missing for n in pullers):
                break
        stayed = [n for n in self.nodes.values() if n.kind == "puller" and n.name not in leaves]
        assert len(stayed) == cfg.pullers + cfg.late - cfg.leavers
        for n in stayed:
            assert n.picker is not None
            assert n.have == self.everything, (n.name, len(n.missing), self.stats)
            assert n.picker.done and n.picker.missing_count == 0
            assert not any(n.asked.values())
            n.picker.check_invariants()


SMALL = Config(
    blocks=40,
    pullers=6,
    late=2,
    leavers=1,
    bad=1,
    links=3,
    queue=3,
    asks=2,
    upload=2,
    seed_upload=3,
    check_every_event=True,
)


@pytest.mark.parametrize("seed", range(6))
def test_small_swarm_with_invariants_checked_after_every_event(seed: int) -> None:
    swarm = Swarm(Config(**{**SMALL.__dict__, "seed": seed}))
    swarm.run()
    s = swarm.stats
    assert s.got >= SMALL.blocks * (SMALL.pullers + SMALL.late - SMALL.leavers)
    assert s.joins_midway == SMALL.late and s.leaves == SMALL.leavers


@pytest.mark.parametrize("copies", [1, 3])
def test_small_swarm_other_endgame_copies(copies: int) -> None:
    swarm = Swarm(Config(**{**SMALL.__dict__, "endgame_copies": copies, "seed": 10 + copies}))
    swarm.run()
    if copies == 1:
        assert swarm.stats.endgame_picks == 0 and swarm.stats.cancels == 0


def test_swarm_of_fifty() -> None:
    """1 seed, 50 pullers (+10 joining mid-way, 8 leaving), a bad peer, 2,000 blocks."""
    swarm = Swarm(Config())
    swarm.run()
    s = swarm.stats
    assert s.joins_midway == 10 and s.leaves == 8
    assert s.bad_blocks > 0 and s.bans > 0 and s.rejected > 0
    assert s.endgame_picks > 0 and s.cancels > 0
    assert s.rounds < Config().max_rounds
