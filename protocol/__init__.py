"""Sans-IO wire protocol of gguf-swarm: frames, messages, CIDs. No sockets, no trio."""
