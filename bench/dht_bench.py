"""How soon a newly published model is findable on the DHT, in a 10-node swarm.

Nine nodes form a swarm (all bootstrap through node 0; each then looks itself
up on the DHT, as every node does on joining). A tenth node then starts with a freshly fragmented
model in its data dir, which it announces as it starts, exactly as
`gguf-swarm publish` does. Once that announcement (a DHT provide) has
returned, every other node does one provider lookup for the model CID, one
node at a time (all nodes share this process's one core; nine concurrent
lookups would measure CPU contention, not the DHT). A node's figure is
announce time + its lookup time, counted from the moment the publisher's node
was up.
All nodes run in this one process on 127.0.0.1 (real hosts, Noise, Yamux,
Kademlia on /ipfs/kad/1.0.0).

Run: .venv/bin/python bench/dht_bench.py [--nodes 10] [--rounds 3]
Target: every node finds the model in under 1 s.

With `--sweep-fragments N` (40960 for a 400 GB model's count), the publisher's
model is instead a synthetic one of N fragments (bench/scale_bench.py's), and
the figure is how long until every fragment CID is announced (node/sweep.py:
one lookup per keyspace region), with how many of them each other node holds
as provider records of the publisher. Target: under 10 minutes.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fragmenter import fragment_model  # noqa: E402
from node.node import NodeConfig, open_node  # noqa: E402
from tests.gguf_factory import MIXED, write_model  # noqa: E402

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


async def one_round(work: Path, nodes: int) -> tuple[float, list[float]]:
    model = write_model(work / "m.gguf", MIXED)
    publisher_dir = work / "publisher"
    cid = fragment_model(model, publisher_dir / "m").model_cid
    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(open_node(NodeConfig(work / "n0", listen=LOOPBACK)))
        entry = first.addrs()[:1]
        swarm = [first]
        for i in range(1, nodes - 1):
            swarm.append(await stack.enter_async_context(open_node(NodeConfig(work / f"n{i}", LOOPBACK, entry))))
        await trio.sleep(1)  # let the nodes' DHT self-lookups (their join) settle
        publisher = await stack.enter_async_context(open_node(NodeConfig(publisher_dir, LOOPBACK, entry)))
        ready = time.monotonic()
        while cid not in publisher.announced:  # the announcer's provide() has returned
            await trio.sleep(0.005)
        announced = time.monotonic() - ready
        found: list[float] = []

        async def look(node_index: int) -> None:
            start = time.monotonic()
            providers = await swarm[node_index].find_providers(cid, timeout=5)
            if any(p.peer_id == publisher.peer_id for p in providers):
                found.append(announced + time.monotonic() - start)

        for i in range(len(swarm)):  # one at a time: in one process, concurrent lookups share one core
            await look(i)
        return announced, found


async def sweep_round(work: Path, nodes: int, fragments: int) -> None:
    """The publisher in this process; the other nodes as `gguf-swarm seed`
    processes of their own (as they would run: each receiver's CPU is its own,
    not this process's one core)."""
    import subprocess

    from scale_bench import many_fragment_model

    row = 4096
    tensors = 40
    model = work / "many.gguf"
    many_fragment_model(model, tensors, -(-fragments // tensors), row)
    publisher_dir = work / "publisher"
    fragment_model(model, publisher_dir / "many", chunk_size=row)
    model.unlink()
    cli = [sys.executable, "-m", "node.cli", "seed", "--listen", LOOPBACK[0], "--no-mdns"]
    procs: list[subprocess.Popen[str]] = []
    entry = ""
    try:
        for i in range(nodes - 1):
            boot = ["--bootstrap", entry] if procs else []
            proc = subprocess.Popen([*cli, "--data-dir", str(work / f"n{i}"), *boot], stdout=subprocess.PIPE, text=True)
            procs.append(proc)
            addr = proc.stdout.readline().strip()  # type: ignore[union-attr]
            if i == 0:
                entry = addr
        await trio.sleep(2)  # their DHT self-lookups (their join)
        start = time.monotonic()
        async with open_node(NodeConfig(publisher_dir, LOOPBACK, [entry])) as publisher:
            m = next(iter(publisher.store.models.values()))
            cids = [m.fragment_cid(k) for k in range(len(m.have))]
            next_report = 30.0
            while publisher.announced_count < 1 + len(cids):
                await trio.sleep(0.5)
                if time.monotonic() - start > next_report:
                    print(f"  {publisher.announced_count - 1:,} of {len(cids):,} after {next_report:.0f} s", flush=True)
                    next_report += 30
            took = time.monotonic() - start
            # Records live only at the other nodes (a sweep keeps none locally): a lookup that
            # names the publisher found them there.
            sample = random.Random(0).sample(cids, 100)
            found = 0
            for cid in sample:
                with trio.move_on_after(5):
                    providers = await publisher.dht.find_providers(cid, count=20)
                    found += any(p.peer_id == publisher.peer_id for p in providers)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()
    print(
        f"{len(cids):,} fragment CIDs announced to a {nodes}-node swarm (9 seed processes) in {took:.0f} s "
        f"(target < 600 s); a provider lookup of 100 of them, at random, finds the publisher for {found}",
        flush=True,
    )


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sweep-fragments", type=int, default=0, help="time announcing N fragment CIDs instead")
    args = parser.parse_args()
    if args.sweep_fragments:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        with tempfile.TemporaryDirectory(prefix="dht-bench-") as tmp:
            await sweep_round(Path(tmp), args.nodes, args.sweep_fragments)
        return
    worst: list[float] = []
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="dht-bench-") as tmp:
            announce, times = await one_round(Path(tmp), args.nodes)
        missing = args.nodes - 1 - len(times)
        worst.append(max(times) if times and not missing else float("inf"))
        print(
            f"round {r + 1}: announced in {announce * 1000:.0f} ms; {len(times)}/{args.nodes - 1} nodes found it, "
            f"after (announce + one lookup) median {statistics.median(times) * 1000:.0f} ms, "
            f"slowest {max(times) * 1000:.0f} ms"
            if times
            else f"round {r + 1}: no node found the model",
            flush=True,
        )
    print(f"slowest node over {args.rounds} rounds: {max(worst) * 1000:.0f} ms (target < 1000 ms)")


if __name__ == "__main__":
    trio.run(main)
