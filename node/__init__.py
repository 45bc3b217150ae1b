"""The gguf-swarm node: trio + py-libp2p host, DHT, store, serving, fetching, CLI."""

from .lean_imports import install

install()  # before anything here imports py-libp2p (see lean_imports.py)
