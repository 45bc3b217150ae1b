"""The gguf-swarm node: trio + py-libp2p host, DHT, store, serving, fetching, CLI."""

import os

# Before numpy loads: OpenBLAS's thread pool cost 0.075 s of CPU at every
# import (0.16 -> 0.09 s, farm-bench) and the node does no BLAS work.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from .lean_imports import install  # noqa: E402

install()  # before anything here imports py-libp2p (see lean_imports.py)
