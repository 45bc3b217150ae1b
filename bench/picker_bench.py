"""What one pick costs in BlockPicker, at 40,000 blocks and 200 peers, against a naive scan.

One puller ("us") downloads the whole model in a simulated swarm, with no
sockets and no real time: rounds of events. Its picker knows 200 peers: one
seed and 199 other pullers, which start holding a random part of the model
(0-90%; --start-max 0 for a flash crowd) and announce a few new blocks each round, one `peer_has` call per
block (as HAVE messages arrive). Now and then one of them leaves and a new one
joins with its own bitfield. Each round, we ask a few random peers for blocks
the way the node does (`pick(peer, 1)` until that peer's queue holds 4);
each request completes (`got`) with probability 1/2 per round, or is refused
(`rejected`) with probability 1/20. The run ends when we hold every block.

Every pick is timed. At evenly spaced picks, the same decision is also timed
on the same state the naive way: one pass over a plain set of the free
blocks (missing, not requested), keeping the rarest the peer holds. That is
the baseline; its figure is per pick as well.
Also timed: `peer_has` with one block, a peer's join (its bitfield in one
`peer_has`) and leave (`remove_peer`), and a seed's join and leave. Times are wall-clock per call; the
objects made during setup are frozen out of the garbage collector, whose full
passes over the bench's own have-sets would otherwise land inside picks.

Run: .venv/bin/python bench/picker_bench.py [--blocks 40000] [--peers 200] [--seed 1]
Target: a pick well under a millisecond on average.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from node.picker import BlockPicker  # noqa: E402

QUEUE = 4  # requests in flight per peer
ASKED_PER_ROUND = 20  # peers we fill each round
P_GOT = 0.5
P_REJECT = 0.05
P_CHURN = 0.05  # per round: one puller leaves and a new one joins
NAIVE_SAMPLES = 400


def naive_pick(free: set[int], have: set[int] | None, avail: list[int], rng: random.Random) -> int | None:
    """The baseline: scan every free block, keep the rarest the peer holds."""
    best = -1
    rarest: list[int] = []
    for b in free:
        if have is None or b in have:
            a = avail[b]
            if best < 0 or a < best:
                best, rarest = a, [b]
            elif a == best:
                rarest.append(b)
    return rng.choice(rarest) if rarest else None


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def run(blocks: int, peers: int, seed: int, start_max: float) -> None:
    rng = random.Random(seed)
    picker = BlockPicker(blocks, rng=random.Random(seed + 1))
    # the bench's own view, for the simulation and the naive baseline
    haves: dict[str, set[int] | None] = {}  # None: a seed
    avail = [0] * blocks  # holders among pullers (a seed adds the same to every block)
    free = set(range(blocks))  # missing, not requested
    have_us: set[int] = set()
    inflight: dict[str, set[int]] = {}
    t_has: list[float] = []
    t_join: list[float] = []
    t_leave: list[float] = []
    t_pick: list[float] = []
    t_pick_hit: list[float] = []
    t_naive: list[float] = []
    next_id = 0

    def join() -> None:
        nonlocal next_id
        name = f"p{next_id}"
        next_id += 1
        have = set(rng.sample(range(blocks), int(rng.uniform(0, start_max) * blocks)))
        haves[name] = have
        inflight[name] = set()
        for b in have:
            avail[b] += 1
        order = list(have)
        t0 = time.perf_counter_ns()
        picker.peer_has(name, order)
        t_join.append((time.perf_counter_ns() - t0) / 1000)

    def leave(name: str) -> None:
        have = haves.pop(name)
        t0 = time.perf_counter_ns()
        freed = picker.remove_peer(name)
        t_leave.append((time.perf_counter_ns() - t0) / 1000)
        for b in have or ():
            avail[b] -= 1
        for b in freed:
            free.add(b)
        del inflight[name]

    haves["seed"] = None
    inflight["seed"] = set()
    picker.peer_has_all("seed")
    for _ in range(peers - 1):
        join()
    gc.freeze()  # the bench's own have-sets are large: keep full collections of them out of the timings
    t_setup = time.perf_counter()
    naive_every = max(1, blocks // NAIVE_SAMPLES)
    picks = 0
    rounds = 0
    while not picker.done:
        rounds += 1
        # the other pullers make progress, announced one block at a time
        for name, have in haves.items():
            if have is None or len(have) == blocks:
                continue
            for _ in range(rng.randint(0, 4)):
                b = rng.randrange(blocks)
                if b in have:
                    continue
                have.add(b)
                avail[b] += 1
                t0 = time.perf_counter_ns()
                picker.peer_has(name, (b,))
                t_has.append((time.perf_counter_ns() - t0) / 1000)
        if rng.random() < P_CHURN:
            leave(rng.choice([p for p in haves if p != "seed"]))
            join()
        # our requests complete, fail, or wait
        for name, reqs in inflight.items():
            for b in list(reqs):
                roll = rng.random()
                if roll < P_GOT:
                    reqs.discard(b)
                    for other in picker.got(name, b):
                        inflight[other].discard(b)
                    have_us.add(b)
                    free.discard(b)
                elif roll < P_GOT + P_REJECT:
                    reqs.discard(b)
                    picker.rejected(name, b)
                    if b not in have_us and not any(b in r for r in inflight.values()):
                        free.add(b)
        # we fill the queues of a few peers
        for name in rng.sample(sorted(haves), min(ASKED_PER_ROUND, len(haves))):
            while len(inflight[name]) < QUEUE:
                picks += 1
                if picks % naive_every == 0:
                    t0 = time.perf_counter_ns()
                    naive_pick(free, haves[name], avail, rng)
                    t_naive.append((time.perf_counter_ns() - t0) / 1000)
                t0 = time.perf_counter_ns()
                got = picker.pick(name, 1)
                dt = (time.perf_counter_ns() - t0) / 1000
                t_pick.append(dt)
                if not got:
                    break
                t_pick_hit.append(dt)
                inflight[name].add(got[0])
                free.discard(got[0])
    elapsed = time.perf_counter() - t_setup
    t_seed: list[float] = []  # a seed joining and leaving (after the run; neither depends on progress)
    for i in range(200):
        t0 = time.perf_counter_ns()
        picker.peer_has_all(("seed", i))
        picker.remove_peer(("seed", i))
        t_seed.append((time.perf_counter_ns() - t0) / 1000)
    print(
        f"{blocks} blocks, {peers} peers (1 seed; the others start with 0-{start_max:.0%}),"
        f" {rounds} rounds, {elapsed:.1f} s simulated run"
    )
    print(f"  pick(peer, 1): {len(t_pick)} calls ({len(t_pick_hit)} returned a block)")
    print(
        f"    all calls      median {statistics.median(t_pick):7.1f} us  p99 {pct(t_pick, 0.99):7.1f} us"
        f"  mean {statistics.fmean(t_pick):7.1f} us  max {max(t_pick):8.1f} us"
    )
    print(
        f"    with a block   median {statistics.median(t_pick_hit):7.1f} us  p99 {pct(t_pick_hit, 0.99):7.1f} us"
        f"  mean {statistics.fmean(t_pick_hit):7.1f} us"
    )
    naive_med = statistics.median(t_naive)
    print(
        f"  naive scan ({len(t_naive)} samples, same states)"
        f"  median {naive_med:7.1f} us  p99 {pct(t_naive, 0.99):7.1f} us  mean {statistics.fmean(t_naive):7.1f} us"
    )
    print(
        f"  ratio naive/picker: median {naive_med / statistics.median(t_pick):.0f}x,"
        f" mean {statistics.fmean(t_naive) / statistics.fmean(t_pick):.0f}x"
    )
    print(
        f"  peer_has, one block: {len(t_has)} calls, median {statistics.median(t_has):.2f} us,"
        f" p99 {pct(t_has, 0.99):.2f} us"
    )
    print(
        f"  join (its bitfield, one call): {len(t_join)} joins,"
        f" median {statistics.median(t_join) / 1000:.1f} ms, max {max(t_join) / 1000:.1f} ms"
    )
    print(
        f"  remove_peer: {len(t_leave)} leaves, median {statistics.median(t_leave) / 1000:.1f} ms,"
        f" max {max(t_leave) / 1000:.1f} ms"
    )
    print(f"  a seed: peer_has_all + remove_peer, median {statistics.median(t_seed):.1f} us")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=40_000)
    ap.add_argument("--peers", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--start-max", type=float, default=0.9, help="other pullers start with up to this fraction")
    args = ap.parse_args()
    run(args.blocks, args.peers, args.seed, args.start_max)


if __name__ == "__main__":
    main()
