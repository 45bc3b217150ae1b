"""What a restart costs a node holding a model of many fragments, with and
without the saved record of verified files (node/verified_state.py).

A synthetic GGUF (500 F32 tensors of 1 MiB) is cut into 128 KiB fragments
(~4,000 files, 500 MiB). "before" deletes the record first, which is what every
start did before it existed; "after" keeps the one the previous run saved.
1. Every file checked as before its first serve, offline (Store.scan +
   ModelBlocks.file_digests for every file): wall and CPU time, bytes hashed.
2. A seed node restarted: time from start until it answers a first v1
   request, and until a fresh puller has the whole model; bytes it hashed.
3. A re-pull of a model held (the puller restarted), then the whole model
   served once from it: bytes hashed.

Run: .venv/bin/python bench/restart_bench.py [--tensors 500] [--chunk 128KiB]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import trio
from gguf import GGMLQuantizationType as T

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import fragmenter as fr  # noqa: E402
from fragmenter.cli import parse_size  # noqa: E402
from node.blockstore import ModelBlocks  # noqa: E402
from node.client import Session  # noqa: E402
from node.node import NodeConfig, open_node  # noqa: E402
from node.pull import PullOptions, pull_model  # noqa: E402
from node.store import STATE_DIR, Store  # noqa: E402
from protocol import FragmentRequest  # noqa: E402
from tests.gguf_factory import write_model  # noqa: E402

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


def forget_record(data_dir: Path) -> None:
    shutil.rmtree(data_dir / STATE_DIR / "verified", ignore_errors=True)


def check_all(data_dir: Path) -> tuple[float, float, float, int]:
    """(scan s, wall s, CPU s, bytes hashed) to have every file's digests, as before first serve."""
    t, c = time.perf_counter(), time.process_time()
    store = Store(data_dir)
    store.scan()
    scanned = time.perf_counter() - t
    model = next(iter(store.models.values()))
    blocks = ModelBlocks(store, model)
    for k in range(len(blocks.specs)):
        assert blocks.file_digests(k) is not None
    store.flush_verified()
    return scanned, time.perf_counter() - t, time.process_time() - c, store.hashed_bytes


def config(data_dir: Path, bootstrap: list[str] | None = None) -> NodeConfig:
    return NodeConfig(data_dir, listen=LOOPBACK, bootstrap=bootstrap or [])


async def seed_restart(seed_dir: Path, puller_dir: Path) -> dict[str, float]:
    shutil.rmtree(puller_dir, ignore_errors=True)
    start = time.perf_counter()
    async with open_node(config(seed_dir)) as seed:
        listening = time.perf_counter() - start
        model = next(iter(seed.store.models.values()))
        async with open_node(config(puller_dir, seed.addrs()[:1])) as puller:
            session = await Session.open(puller.host, seed.peer_id)
            await session.send(FragmentRequest(model.fragment_cids[-1]))
            await session.read_data(1 << 30)
            first = time.perf_counter() - start
            await session.close()
            await pull_model(puller, model.cid, PullOptions(find_timeout=20))
            whole = time.perf_counter() - start
        hashed = seed.store.hashed_bytes
    return {"listening_s": listening, "first_request_s": first, "whole_pull_s": whole, "seed_hashed": hashed}


async def repull_and_serve(puller_dir: Path, third_dir: Path, cid: str) -> int:
    """Bytes the restarted puller hashes re-pulling the model it holds and serving it whole once."""
    shutil.rmtree(third_dir, ignore_errors=True)
    async with open_node(config(puller_dir)) as again:
        await pull_model(again, cid, PullOptions(find_timeout=1))
        async with open_node(config(third_dir, again.addrs()[:1])) as third:
            await pull_model(third, cid, PullOptions(find_timeout=20))
        return again.store.hashed_bytes


async def run_nodes(base: Path, cid: str) -> None:
    seed_dir, puller_dir = base / "seed", base / "puller"
    for label in ("before", "after"):
        if label == "before":
            forget_record(seed_dir)
        r = await seed_restart(seed_dir, puller_dir)
        print(
            f"seed restart, {label}: listening {r['listening_s']:.2f} s, first request answered "
            f"{r['first_request_s']:.2f} s, whole model served {r['whole_pull_s']:.1f} s, "
            f"seed hashed {r['seed_hashed'] / 2**20:.0f} MiB",
            flush=True,
        )
    for label in ("before", "after"):
        if label == "before":
            forget_record(puller_dir)
        hashed = await repull_and_serve(puller_dir, base / "third", cid)
        print(f"re-pull of a held model + serving it once, {label}: hashed {hashed / 2**20:.0f} MiB", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tensors", type=int, default=500)
    ap.add_argument("--chunk", default="128KiB")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="restart-bench-") as tmp:
        base = Path(tmp)
        tensors = [(f"blk.{i}.ffn_up.weight", T.F32, (256, 1024)) for i in range(args.tensors)]
        gguf = write_model(base / "synthetic.gguf", tensors, vocab=False)
        folder = base / "seed" / "synthetic"
        fr.fragment_model(gguf, folder, chunk_size=parse_size(args.chunk))
        gguf.unlink()
        manifest = fr.read_manifest(folder)
        print(f"{len(manifest.fragments)} fragments, {manifest.total_bytes / 2**20:.0f} MiB", flush=True)
        for label in ("before", "after"):
            if label == "before":
                forget_record(base / "seed")
            scan, wall, cpu, hashed = check_all(base / "seed")
            print(
                f"check every file, {label}: scan {scan:.2f} s, in all {wall:.2f} s wall, {cpu:.2f} s CPU, "
                f"hashed {hashed / 2**20:.0f} MiB"
            )
        store = Store(base / "seed")
        store.scan()
        cid = next(iter(store.models))
        trio.run(run_nodes, base, cid)


if __name__ == "__main__":
    main()
