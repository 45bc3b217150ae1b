"""Swarm: an inbound connection's slot is given back when the connection closes.

Attack (py-libp2p 0.8.1): `Swarm._handle_inbound_connection` takes one of
`max_connections - min_connections` slots of `_inbound_limiter` per inbound
connection and gives it back when its handler returns; but after a successful
upgrade the handler waits for the whole swarm to stop
(`manager.wait_finished()`), not for its connection to close. Slots of closed
connections are never returned. Measured with the default config: 250 hosts
connected and disconnected, the node was left with 0 connections, 250 of 250
slots taken, and refused every inbound connection from then on. One identity
reconnecting 250 times does the same, and so does a banned peer that keeps
coming back to be cut off.

Fix: the handler leaves once its connection has closed. The upgraded
connection is handed from `upgrade_inbound_raw_conn` to the handler in a
context variable (both run in the same task); the handler then waits for
whichever comes first, the connection closing or the swarm stopping, and the
upstream `finally` returns the slot.

Also: when that limiter refuses a connection, the connection pruner is asked
to run (debounced, as upstream does when a connection is added). Upstream only
prunes when a connection is added, and a node whose slots are all taken adds
none: Sybils that filled it were never pruned.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from typing import Any

import trio
from libp2p.abc import IMuxedConn
from libp2p.network.swarm import Swarm

log = logging.getLogger(__name__)


class _Upgraded:
    """Set by the inbound handler, filled by `upgrade_inbound_raw_conn` in the same task."""

    def __init__(self) -> None:
        self.conn: IMuxedConn | None = None
        self.event = trio.Event()


_upgraded: ContextVar[_Upgraded | None] = ContextVar("gguf_swarm_upgraded_conn", default=None)


def apply() -> None:
    if getattr(Swarm, "_gguf_swarm_inbound_slot_patch", False):
        return
    upstream_handle = Swarm._handle_inbound_connection
    upstream_do_handle = Swarm._do_handle_inbound_connection
    upstream_upgrade = Swarm.upgrade_inbound_raw_conn

    async def upgrade_inbound_raw_conn(self: Swarm, *args: Any, **kwargs: Any) -> IMuxedConn:
        muxed_conn = await upstream_upgrade(self, *args, **kwargs)
        upgraded = _upgraded.get()
        if upgraded is not None:
            upgraded.conn = muxed_conn
            upgraded.event.set()
        return muxed_conn

    async def _do_handle_inbound_connection(self: Swarm, *args: Any, **kwargs: Any) -> None:
        upgraded = _Upgraded()
        token = _upgraded.set(upgraded)
        try:
            async with trio.open_nursery() as nursery:

                async def handle() -> None:
                    await upstream_do_handle(self, *args, **kwargs)
                    nursery.cancel_scope.cancel()  # upstream returned (refused, failed, swarm stopped)

                nursery.start_soon(handle)
                await upgraded.event.wait()  # the handshake is bounded by inbound_upgrade_timeout
                closed = getattr(upgraded.conn, "event_closed", None)
                if closed is None:
                    return  # not Yamux: keep upstream's behaviour
                await closed.wait()
                # The connection is gone: leave upstream's wait for the swarm
                # to stop, so its `finally` gives the slot back.
                nursery.cancel_scope.cancel()
        finally:
            _upgraded.reset(token)

    async def _handle_inbound_connection(self: Swarm, *args: Any, **kwargs: Any) -> None:
        limiter = self._inbound_limiter
        if limiter.borrowed_tokens >= limiter.total_tokens:
            self._schedule_prune()  # upstream refuses this one; make room for the next
        await upstream_handle(self, *args, **kwargs)

    Swarm.upgrade_inbound_raw_conn = upgrade_inbound_raw_conn  # type: ignore[method-assign]
    Swarm._do_handle_inbound_connection = _do_handle_inbound_connection  # type: ignore[method-assign]
    Swarm._handle_inbound_connection = _handle_inbound_connection  # type: ignore[method-assign]
    Swarm._gguf_swarm_inbound_slot_patch = True  # type: ignore[attr-defined]
