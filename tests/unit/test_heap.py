"""fragmenter/heap.py: freed block buffers stay in the process for the next ones.

Each case runs in a child interpreter: the settings are process-wide, and
the test process must keep glibc's defaults.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt"
)

# Blocks of 1 MiB, as a node's are: allocated, touched, freed all at once.
BURST = """
import json, os, sys
sys.path.insert(0, {root!r})
if {keep}:
    from fragmenter.heap import keep_freed_memory
    assert keep_freed_memory()
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
def burst():
    blocks = [bytes(1 << 20) + bytes(1) for _ in range(40)]  # each sum is written: every page touched
    peak = rss()
    del blocks
    return peak, rss()
burst()  # glibc's own thresholds settle on the first burst
peak, after = burst()
with open("/proc/self/stat") as f:
    faults_before = int(f.read().rsplit(")", 1)[1].split()[7])
burst()
with open("/proc/self/stat") as f:
    faults = int(f.read().rsplit(")", 1)[1].split()[7]) - faults_before
print(json.dumps({{"released": peak - after, "faults": faults}}))
"""


# One worker thread frees its blocks; another, started while the first lives
# on (so that it cannot inherit the first one's heap), allocates as many.
THREADS = """
import json, sys, threading
sys.path.insert(0, {root!r})
from fragmenter.heap import keep_freed_memory
assert keep_freed_memory()
def faults():
    with open("/proc/self/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])
freed, done = threading.Event(), threading.Event()
def first():
    blocks = [bytes(1 << 20) + bytes(1) for _ in range(40)]
    del blocks
    freed.set()
    done.wait()
result = {{}}
def second():
    before = faults()
    blocks = [bytes(1 << 20) + bytes(1) for _ in range(40)]
    result["faults"] = faults() - before
    del blocks
a = threading.Thread(target=first)
a.start()
freed.wait()
b = threading.Thread(target=second)
b.start()
b.join()
done.set()
a.join()
print(json.dumps(result))
"""


def _burst(keep: bool) -> dict[str, int]:
    code = BURST.format(root=str(ROOT), keep=keep)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    result: dict[str, int] = json.loads(out)
    return result


def test_freed_blocks_stay_in_the_process_and_are_not_faulted_in_again() -> None:
    kept = _burst(keep=True)
    assert kept["released"] < 4 << 20  # of the 40 MiB freed
    assert kept["faults"] < 1000  # a third burst reuses the pages: 40 MiB would be 10,240 faults


def test_without_the_settings_glibc_gives_the_blocks_back() -> None:
    # What heap.py is for: the defaults trim the freed burst and fault it in again.
    plain = _burst(keep=False)
    assert plain["released"] > 30 << 20
    assert plain["faults"] > 5000


def test_a_thread_reuses_what_another_thread_freed() -> None:
    # With a heap per thread (glibc's default) the second thread's 40 MiB
    # would be 10,240 new pages.
    out = subprocess.run(
        [sys.executable, "-c", THREADS.format(root=str(ROOT))], capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(out)["faults"] < 1000
