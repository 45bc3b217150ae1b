"""Swarm: a peer's inbound streams are capped per connection and node-wide; the rest are reset at once.

Attack (py-libp2p 0.8.1): Yamux caps only the streams we open
(`stream_backlog_semaphore`); every stream a peer opens becomes a task in
`SwarmConn._handle_muxed_stream` that negotiates a protocol for up to 10 s.
The only bound is rcmgr's global `trio.Semaphore(10_000)`, which queues
streams instead of refusing them and is shared with the streams the node
itself opens. Measured, one peer sending 20,000 SYNs over one connection:
10,000 streams held and 16,000 tasks, +147 MB RSS, the node's own new
streams waiting behind them; with a protocol id (`/gguf-swarm/2.0.0`) 4,800
sessions at once waiting 10 s each for a Hello, and the node busy for 36 s
getting through them.

Fix, like go-libp2p's resource manager (256 inbound streams per peer by
default): at most `per_conn` inbound streams per connection (with one
connection per peer, per peer) and `total` node-wide are handed to the host's
handlers at a time; a stream beyond either is reset before any protocol is
negotiated. `total` stays below rcmgr's semaphore, so peers' streams can never
queue there or starve the node's own. Limits are set per swarm by
`set_limits` (`node.host.make_host`); the defaults below apply otherwise.

Attack 2: a stream our handler has closed (FIN sent) stays in Yamux's table
until the peer closes its end too, and upstream never sweeps it. Measured,
20,000 streams each carrying a Hello for a model we do not hold (answered
NOT_FOUND, then closed): 20,000 entries, +49 MB, kept for the connection's
life. Fix, as go-yamux does with its close timeout: such a stream still counts
against both caps until the peer closes its end, and after
`HALF_CLOSED_TIMEOUT` it is reset and dropped. (A stream a handler returns
still open, such as a session handed to the swarm, is not ours to time out.)
"""

from __future__ import annotations

import logging
from typing import Any

import trio
from libp2p.abc import IMuxedStream
from libp2p.network.connection.swarm_connection import SwarmConn
from libp2p.stream_muxer.yamux.yamux import YamuxStream

log = logging.getLogger(__name__)

PER_CONN = 256
TOTAL = 4096
# Honest peers close their end as soon as they have read our answer; one on a
# slow link still has at most its receive window and our socket buffers of it
# to read when our handler closes. go-yamux waits 5 minutes.
HALF_CLOSED_TIMEOUT = 30.0


def set_limits(swarm: Any, per_conn: int, total: int) -> None:
    swarm._gguf_inbound_stream_limits = (per_conn, total)


def inbound_streams(conn_or_swarm: Any) -> int:
    """Streams a peer has open to our handlers right now on a connection (SwarmConn), or all peers (Swarm)."""
    return conn_or_swarm.__dict__.get("_gguf_inbound_streams", 0)


async def _refuse(stream: IMuxedStream) -> None:
    try:
        await stream.reset()
    except Exception:
        pass
    if isinstance(stream, YamuxStream):
        # Upstream keeps a reset stream's entry while it has unread data, for
        # 60-90 s: a flood of SYNs carrying data (a protocol id) left ~20,000
        # of them (+49 MB). Nobody will read a refused stream: drop it now.
        conn = stream.conn
        async with conn.streams_lock:
            if conn.streams.get(stream.stream_id) is stream:
                del conn.streams[stream.stream_id]
                conn.stream_buffers.pop(stream.stream_id, None)
                conn.stream_events.pop(stream.stream_id, None)


async def _await_peer_close(stream: YamuxStream) -> None:
    """We closed our end; wait (polling, backing off) for the peer's, then give up on it."""
    delay = 0.05
    with trio.move_on_after(HALF_CLOSED_TIMEOUT):
        while not (stream.recv_closed or stream.closed):
            await trio.sleep(delay)
            delay = min(delay * 2, 2.0)
        return
    await _refuse(stream)


def apply() -> None:
    if getattr(SwarmConn, "_gguf_swarm_stream_cap_patch", False):
        return
    upstream = SwarmConn._handle_muxed_stream

    async def _handle_muxed_stream(self: SwarmConn, muxed_stream: IMuxedStream) -> None:
        swarm: Any = self.swarm
        per_conn, total = getattr(swarm, "_gguf_inbound_stream_limits", (PER_CONN, TOTAL))
        mine = self.__dict__.get("_gguf_inbound_streams", 0)
        everyone = inbound_streams(swarm)
        if mine >= per_conn or everyone >= total:
            log.debug(
                "resetting a new stream from %s: %d open on its connection, %d in all",
                self.muxed_conn.peer_id,
                mine,
                everyone,
            )
            await _refuse(muxed_stream)
            return
        # Counted before the first checkpoint, so streams arriving at once cannot all pass.
        self._gguf_inbound_streams = mine + 1  # type: ignore[attr-defined]
        swarm._gguf_inbound_streams = everyone + 1
        try:
            await upstream(self, muxed_stream)
            if isinstance(muxed_stream, YamuxStream) and muxed_stream.send_closed and not muxed_stream.recv_closed:
                await _await_peer_close(muxed_stream)
        finally:
            self._gguf_inbound_streams -= 1  # type: ignore[attr-defined]
            swarm._gguf_inbound_streams -= 1

    SwarmConn._handle_muxed_stream = _handle_muxed_stream  # type: ignore[method-assign]
    SwarmConn._gguf_swarm_stream_cap_patch = True  # type: ignore[attr-defined]
