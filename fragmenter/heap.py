"""A node process, or a tokenizer build, keeps the memory it frees for reuse.

A node allocates and frees block-sized buffers all the time: a 64 KiB frame
per Noise message, 256 KiB socket reads, 1 MiB blocks to check, write and
send. glibc's defaults hand that memory back to the kernel almost as soon as
it is free (the top of a heap is trimmed past twice the largest block seen,
~2-3 MiB), and the next burst faults it in again, a zeroed page at a time. In
an 8-puller swarm at 100 Mbit/s each node took ~60,000 page faults, about one
per 4 KiB it received; on a VM whose freed pages go back to the host a fault
costs more again (`perf`: the kernel zeroing pages for faults was 3.3% of all
CPU there, and 12-50% of the tokenizer builds' own samples).

`keep_freed_memory()` raises the thresholds (mallopt(3)): up to
`TRIM_THRESHOLD` of free memory stays at the top of a heap, a heap grows by
`TOP_PAD` extra at a time, and only allocations of `MMAP_THRESHOLD` or more
get mappings of their own (a large manifest's buffers, say; released at
once when freed, as before). A node's resident size then stays near its peak
working set instead of following each burst. The tokenizer build
(build_tokenizer.py) frees and refills ~25% of its own peak the same way
(Gemma's: 48,000 faults, 35,000 with these settings, for a 150 MB peak).

It also keeps every thread on one heap (`ARENA_MAX`). By default glibc gives
threads heaps of their own, up to 8 per core: a node's worker threads
(reading blocks to send, checking and writing those received) held 7-8 such
heaps of ~5 MB each, 30-36 MB of a puller's ~165 MB, each a peak of its own
that the others could not reuse. The heaps exist to
spare threads each other's malloc lock, and here nearly every allocation is
made by Python code holding the GIL anyway. Memory a process touches for the
first time is the expensive kind on a VM that hands freed pages back to its
host: 5-9 ms per MB here, against ~0.8 ms for pages the guest kept (1 GB
written to new files, or touched in a new mapping).

glibc only; elsewhere it does nothing. Called where a process starts, never
on import: a program that embeds a node (node/api.py) or calls
`node.cli.main` keeps its own settings.
"""

from __future__ import annotations

import ctypes

from .fsio import libc

# mallopt(3) parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

TRIM_THRESHOLD = 64 << 20
TOP_PAD = 16 << 20
MMAP_THRESHOLD = 8 << 20
ARENA_MAX = 1


def keep_freed_memory() -> bool:
    """True when the settings were taken (a glibc that has mallopt)."""
    try:
        mallopt = libc().mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # Setting any of these also turns off glibc's sliding thresholds, which
    # would otherwise move them with each large block freed.
    settings = (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        (M_TOP_PAD, TOP_PAD),
        (M_ARENA_MAX, ARENA_MAX),
    )
    return all(mallopt(param, value) == 1 for param, value in settings)
