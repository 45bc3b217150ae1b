"""The node's user-facing error, in a module of its own: the CLI catches it
without importing py-libp2p (about a second), which only node commands need."""

from __future__ import annotations


class NodeError(Exception):
    """A user-facing failure of the node (bad address, unreachable peer, ...)."""
