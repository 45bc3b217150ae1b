"""`python -m fragmenter.build_tokenizer HEADER FOLDER`: write the tokenizer files
of a GGUF header (or whole GGUF) into FOLDER, in a process of its own.

A pull builds them while its blocks arrive. In a thread this pure-Python work
would hold the GIL against the transfer's event loop (it halved loopback
goodput); in its own process it runs on another core.

It runs at the pull's own priority. At nice 10 it got next to nothing while
the transfer kept the cores busy, so in an 8-puller swarm on 2 cores all
eight builds ran after the data, the last 3-7 s of every command. By then
the pulled files had taken the machine's warm memory, and on a VM that gives
freed pages back to its host each build's ~150 MB peak cost ~0.9 CPU-s of
page faults on top of its ~0.8 CPU-s of work (0.2-0.4 CPU-s where memory was
warm). Built as soon as the header is in, the builds' CPU and memory come
cheaper, and what they free is reused by the transfer.
"""

from __future__ import annotations

import gc
import signal
import sys

if __name__ == "__main__":
    # A pull that stops (an error, a Ctrl-C) ends its build with SIGTERM: raised
    # here as an exit, the staging file being written is removed on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    # A short life that makes ~10^6 objects and no cycles worth finding: the
    # collector's passes over them were ~10% of its CPU (0.85 -> 0.76 s, Gemma).
    gc.disable()
    # A quarter of its peak memory is freed and filled again on the way (heap.py).
    from .heap import keep_freed_memory

    keep_freed_memory()

from pathlib import Path  # noqa: E402

from .errors import FragmenterError, WriteError
from .gguf_header import parse_header
from .quick_exit import quick_exit
from .tokenizer import write_tokenizer_files

CANNOT_WRITE = 3  # exit status: the folder could not be written (other failures are the vocabulary's)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m fragmenter.build_tokenizer HEADER FOLDER", file=sys.stderr)
        return 2
    folder = Path(argv[1])
    try:
        header = parse_header(Path(argv[0]).read_bytes())
    except (FragmenterError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        write_tokenizer_files(header, folder)
    except WriteError as e:
        print(f"error: {e}", file=sys.stderr)
        return CANNOT_WRITE
    except FragmenterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: cannot write into {folder}: {e.strerror or e}", file=sys.stderr)
        return CANNOT_WRITE
    return 0


if __name__ == "__main__":
    quick_exit(main(sys.argv[1:]))
