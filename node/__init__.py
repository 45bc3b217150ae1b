"""The gguf-swarm node: trio + py-libp2p host, DHT, store, serving, fetching, CLI."""

import fragmenter  # noqa: F401  # first: it keeps numpy's OpenBLAS to one thread (see fragmenter/__init__.py)

from .lean_imports import install

install()  # before anything here imports py-libp2p (see lean_imports.py)
