"""Yamux: a peer that sends beyond a stream's receive window loses the connection.

Attack (py-libp2p 0.8.1): DATA past the receive window is logged ("peer
exceeded receive window") and buffered anyway. While a handler writes and does
not read, one peer grew a node from 100 to 614 MB in 5 s, without bound.

Fix, as go-yamux and the spec do: overrunning the window is a protocol error
that ends the session. `YamuxStream.recv_window` becomes a property whose
setter, given a negative value, marks the connection as shutting down and
raises; `Yamux.handle_incoming` then closes the connection even where
upstream's own handler only logs the error. A stream can overshoot by at most
one DATA frame (upstream caps frames at 16 MiB), once per connection.
"""

from __future__ import annotations

import logging
from typing import Any

import trio
from libp2p.stream_muxer.yamux.yamux import Yamux, YamuxStream

log = logging.getLogger(__name__)


class ReceiveWindowExceeded(Exception):
    pass


def _get_recv_window(stream: YamuxStream) -> int:
    return stream.__dict__["_recv_window"]


def _set_recv_window(stream: YamuxStream, value: int) -> None:
    if value < 0:
        conn = stream.__dict__.get("conn")
        stream.__dict__["_recv_window"] = 0
        if conn is not None:
            log.warning(
                "peer %s overran the receive window of a stream by %d bytes: closing the connection",
                conn.peer_id,
                -value,
            )
            conn._window_overrun = True
            conn.event_shutting_down.set()
        raise ReceiveWindowExceeded(f"receive window exceeded by {-value} bytes")
    stream.__dict__["_recv_window"] = value


def apply() -> None:
    if getattr(Yamux, "_gguf_swarm_window_patch", False):
        return
    YamuxStream.recv_window = property(_get_recv_window, _set_recv_window)  # type: ignore[assignment]
    upstream_handle_incoming = Yamux.handle_incoming

    async def handle_incoming(self: Yamux, *args: Any, **kwargs: Any) -> None:
        try:
            await upstream_handle_incoming(self, *args, **kwargs)
        finally:
            # Upstream's DATA path swallows our exception and leaves its loop
            # on the shutdown flag without closing the connection: close it here.
            if getattr(self, "_window_overrun", False) and not self.event_closed.is_set():
                with trio.CancelScope(shield=True):
                    await self._cleanup_on_error()

    Yamux.handle_incoming = handle_incoming  # type: ignore[method-assign]
    Yamux._gguf_swarm_window_patch = True  # type: ignore[attr-defined]
