"""The node's user-facing error, in a module of its own: the CLI catches it
without importing py-libp2p (about a second), which only node commands need."""

from __future__ import annotations


class NodeError(Exception):
    """A user-facing failure of the node (bad address, unreachable peer, ...)."""


def first_leaf(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    """The first exception of `kinds` in `exc`, looking inside the groups trio's nurseries wrap errors in."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = first_leaf(inner, kinds)
            if found is not None:
                return found
        return None
    return exc if isinstance(exc, kinds) else None
