"""`python -m fragmenter.build_tokenizer HEADER FOLDER`: write the tokenizer files
of a GGUF header (or whole GGUF) into FOLDER, in a process of its own.

A pull builds them while its blocks arrive. In a thread this pure-Python work
would hold the GIL against the transfer's event loop (it halved loopback
goodput); in its own process it runs on another core.
"""

from __future__ import annotations

import gc
import os
import sys

if __name__ == "__main__":
    # A background job: on a machine whose cores the transfer keeps busy, it
    # takes what the transfer leaves (its imports too) and has them all after.
    os.nice(10)
    # A short life that makes ~10^6 objects and no cycles worth finding: the
    # collector's passes over them were ~10% of its CPU (0.85 -> 0.76 s, Gemma).
    gc.disable()
    # A quarter of its peak memory is freed and filled again on the way (heap.py).
    from .heap import keep_freed_memory

    keep_freed_memory()

from pathlib import Path  # noqa: E402

from .errors import FragmenterError
from .gguf_header import parse_header
from .quick_exit import quick_exit
from .tokenizer import write_tokenizer_files


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m fragmenter.build_tokenizer HEADER FOLDER", file=sys.stderr)
        return 2
    try:
        write_tokenizer_files(parse_header(Path(argv[0]).read_bytes()), Path(argv[1]))
    except (FragmenterError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    quick_exit(main(sys.argv[1:]))
