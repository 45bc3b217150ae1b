"""The gguf-swarm node: trio + py-libp2p host, DHT, store, serving, fetching, CLI."""
