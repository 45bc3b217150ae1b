"""Models with as many fragments as a 400 GB one, on this disk.

A synthetic GGUF of F32 tensors whose rows are exactly `--chunk` bytes is cut
at `--chunk` (8 KiB: 40,960 fragments from 336 MB; a 400 GB model at 10 MiB
has ~40,000). Every figure is a whole CLI process, against a baseline measured
in the same run where there is one:
1. `fragment`: wall time against `cp` + `sha256sum` of the same file (page
   cache warm), and its peak RSS (targets: <= 1.5x, < 200 MB); and against
   coreutils `split` into as many files + `sha256sum`: what creating one file
   per fragment costs this file system;
2. `pull` of it from one `seed` on 127.0.0.1: wall time from process start to
   exit, and the puller's peak RSS (targets: <= 60 s, < 200 MB);
3. a `seed` on a data dir of `--models` such models (copies of the folder
   under other model names, so other CIDs, fragments hard-linked): seconds to
   its first listening address and to every model indexed, and its RSS then
   (targets: < 2 s, < 10 s, < 500 MB); twice: the first start parses every
   manifest (and saves its parsed form), a restart reads that. Indexing hashes
   nothing.

Run: .venv/bin/python bench/scale_bench.py [--chunk 8KiB] [--tensors 40] [--models 20]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from fragmenter.cli import parse_size  # noqa: E402

CLI = [sys.executable, "-m", "node.cli"]
LOOPBACK = ["--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns"]


def many_fragment_model(path: Path, tensors: int, rows: int, row_bytes: int) -> None:
    """F32 tensors of `rows` rows of `row_bytes`: cut at `row_bytes`, one fragment a row."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(tensors)
    for i in range(tensors):
        writer.add_tensor_info(f"blk.{i}.ffn_up.weight", (rows, row_bytes // 4), np.dtype(np.float32), rows * row_bytes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    out = writer.fout[0]
    out.write(bytes(-out.tell() % 32))
    block = np.random.default_rng(0).integers(0, 256, size=rows * row_bytes, dtype=np.uint8).tobytes()
    for i in range(tensors):
        out.write(block[i:] + block[:i])  # distinct tensors, so distinct fragments
    out.close()


def timed(cmd: list[str]) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MB) and stdout of one child process. The file
    system is synced first: a command that syncs (fragment, pull) must not
    pay for the writes of the step before it."""
    os.sync()
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    out = proc.stdout.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{' '.join(cmd[2:4])} failed (status {status})")
    return time.monotonic() - start, usage.ru_maxrss / 1024, out


def start_seed(data_dir: Path) -> tuple[subprocess.Popen[str], float]:
    """A seed process, and seconds from its start to its first listening address."""
    start = time.monotonic()
    proc = subprocess.Popen(
        [*CLI, "seed", "--data-dir", str(data_dir), *LOOPBACK, "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
    )
    line = json.loads(proc.stdout.readline())  # type: ignore[union-attr]
    if line.get("event") != "listening":
        raise SystemExit(f"seed did not start: {line}")
    proc.addr = line["addrs"][0]  # type: ignore[attr-defined]
    return proc, time.monotonic() - start


def wait_indexed(proc: subprocess.Popen[str]) -> dict:
    for text in proc.stdout:  # type: ignore[union-attr]
        event = json.loads(text)
        if event.get("event") == "indexed":
            return event
    raise SystemExit("seed ended before indexing")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def copies(folder: Path, data_dir: Path, n: int) -> None:
    """`n` models made from `folder`: its fragments hard-linked, its manifest
    under another model name (another CID)."""
    manifest = json.loads((folder / "manifest.json").read_bytes())
    files = [p.name for p in folder.iterdir() if p.suffix == ".dat"]
    for i in range(n):
        target = data_dir / f"model-{i}"
        target.mkdir(parents=True)
        for name in files:
            os.link(folder / name, target / name)
        manifest["model_name"] = f"copy-{i}"
        (target / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunk", default="8KiB")
    parser.add_argument("--tensors", type=int, default=40)
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--models", type=int, default=20)
    args = parser.parse_args()
    chunk = parse_size(args.chunk)
    with tempfile.TemporaryDirectory(prefix="scale-bench-", dir=os.environ.get("BENCH_TMP")) as tmp:
        work = Path(tmp)
        model = work / "many.gguf"
        many_fragment_model(model, args.tensors, args.rows, chunk)
        size = model.stat().st_size
        subprocess.run(["cat", str(model)], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
        t_cp, _, _ = timed(["cp", str(model), str(work / "copy.gguf")])
        t_sha, _, _ = timed(["sha256sum", str(work / "copy.gguf")])
        (work / "copy.gguf").unlink()
        seed_dir = work / "seed"
        t_frag, rss_frag, out = timed(
            [*CLI, "fragment", str(model), "--output", str(seed_dir / "many"), "--chunk-size", args.chunk]
        )
        cid = out.split()[0]
        fragments = sum(1 for p in (seed_dir / "many").iterdir() if p.suffix == ".dat" and p.name != "gguf_header.dat")
        # The file system's share: the same bytes as as many files, by coreutils (no parsing, no hashing).
        (work / "split").mkdir()
        t_split, _, _ = timed(["split", "-a", "6", "-b", str(chunk), str(model), str(work / "split" / "x")])
        shutil.rmtree(work / "split")
        print(f"model: {size / 1e6:,.0f} MB cut at {chunk:,} B: {fragments:,} fragments", flush=True)
        base = t_cp + t_sha
        floor = t_split + t_sha
        print(
            f"fragment: {t_frag:.1f} s against cp+sha256sum {base:.2f} s: ratio {t_frag / base:.1f} "
            f"(target <= 1.5); against split+sha256sum (as many files) {floor:.2f} s: ratio {t_frag / floor:.1f} "
            f"| peak RSS {rss_frag:.0f} MB (target < 200)",
            flush=True,
        )

        seed, _ = start_seed(seed_dir)
        try:
            wait_indexed(seed)
            pull_cmd = [*CLI, "pull", cid, "--data-dir", str(work / "puller"), "--bootstrap", seed.addr, *LOOPBACK]  # type: ignore[attr-defined]
            t_pull, rss_pull, _ = timed(pull_cmd)
        finally:
            stop(seed)
        print(
            f"pull (one seed, loopback): {t_pull:.1f} s start to exit, {size / 1e6 / t_pull:.1f} MB/s "
            f"(target <= 60 s) | peak RSS {rss_pull:.0f} MB (target < 200)",
            flush=True,
        )
        shutil.rmtree(work / "puller")
        model.unlink()

        many = work / "many-models"
        copies(seed_dir / "many", many, args.models)
        for start in ("first start (parses every manifest, saves its index)", "restart (reads the index)"):
            seed, t_listen = start_seed(many)
            try:
                indexed = wait_indexed(seed)
                t_indexed = indexed["seconds"]  # the node's own clock, from the start of indexing
                rss = rss_mb(seed.pid)
            finally:
                stop(seed)
            print(
                f"seed of {indexed['models']} such models, {start}: listening after {t_listen:.2f} s (target < 2), "
                f"indexed {t_indexed:.1f} s after that (target < 10) | RSS then {rss:.0f} MB (target < 500)",
                flush=True,
            )


if __name__ == "__main__":
    main()
