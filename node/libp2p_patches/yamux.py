"""Yamux: a receive window that holds, and window updates batched and sent as go-yamux does.

1. A peer that sends beyond a stream's receive window loses the connection.

Attack (py-libp2p 0.8.1): DATA past the receive window is logged ("peer
exceeded receive window") and buffered anyway. While a handler writes and does
not read, one peer grew a node from 100 to 614 MB in 5 s, without bound.

Fix, as go-yamux and the spec do: overrunning the window is a protocol error
that ends the session. `YamuxStream.recv_window` becomes a property whose
setter, given a negative value, marks the connection as shutting down and
raises; `Yamux.handle_incoming` then closes the connection even where
upstream's own handler only logs the error. A stream can overshoot by at most
one DATA frame (upstream caps frames at 16 MiB), once per connection.

2. Window updates are sent once half the window has been read, not on every read.

Flaw (py-libp2p 0.8.1): `YamuxStream.read` sends a WINDOW_UPDATE after nearly
every read ("release on read"), so a receiver reading one 64 KiB frame at a
time sends one encrypted update per frame. On loopback each is a socket send
that costs the receiver ~0.25 ms (cProfile of a 253 MB pull: 6,724 sends,
1.7 s, the largest single cost of the puller). Fix, go-yamux's rule
(`sendWindowUpdate`): credit is returned only when at least half the target
window has been consumed; the window still auto-tunes (doubling up to 16 MiB
when updates come fast), so a fast stream soon sends one update per 8 MiB.

3. A DATA frame fits one Noise message.

Flaw (py-libp2p 0.8.1): Yamux cuts writes into frames of 64 KiB with their
12-byte header, and Noise carries at most 65,519 plaintext bytes per message,
so every full frame went out as two Noise messages, the second of 17 bytes:
twice the encryptions, socket sends and reads per byte (a seed's cProfile:
24,407 Noise messages and 9,470 socket sends for 253 MB). Fix: frames of at
most 65,519 bytes, header included (any Yamux peer accepts smaller frames).

4. A reader does not wait for its window update to be written.

Flaw (py-libp2p 0.8.1): `YamuxStream.read` writes the WINDOW_UPDATE it grants
before it returns, and the write waits for the connection's write lock, held
while another task's DATA frame goes into a full socket. In an 8-puller swarm
at 100 Mbit/s every puller sent 370-730 updates and its readers waited 26-42 s
in all for them (45-65% of the waits over 50 ms, the longest 0.25-0.48 s): a
stalled reader handles none of its peer's messages meanwhile, so it makes no
new requests of that peer. Fix: the update is sent by a task of the
connection's own nursery (go-yamux likewise queues it for the session's
sender); the credit is counted at once as before, so the window bookkeeping
does not change. The link-bound mix N=8, seed 35, pullers 40/100 Mbit/s:
66.4 and 66.9 s against 67.4 and 67.5 s (alternating runs); at 100/100,
where CPU is the bound, neutral.
"""

from __future__ import annotations

import logging
from typing import Any

import trio
from libp2p.stream_muxer.yamux import yamux as yamux_module
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


async def _batched_window_update(self: YamuxStream, *, bytes_read: int = 0) -> None:
    async with self.window_lock:
        buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
        delta = self.target_recv_window - (self.recv_window + buffered)
        if delta <= 0 or delta < self.target_recv_window // 2:
            return  # the peer still holds at least half a window of credit
        self.recv_window += delta
        delta += self._apply_autotune_epoch(buffered)
    nursery = getattr(self.conn, "_nursery", None)
    if nursery is not None:
        try:
            nursery.start_soon(_send_window_update, self, delta)
            return
        except RuntimeError:  # the connection is closing: its nursery takes no new task
            pass
    await self.send_window_update(delta, skip_lock=True)


async def _send_window_update(stream: YamuxStream, delta: int) -> None:
    """The update, sent beside the reader that granted it (see 4. above)."""
    try:
        await stream.send_window_update(delta, skip_lock=True)
    except Exception as e:  # a connection that fails a write is ending: its reader sees it too
        log.debug("window update for stream %s not sent: %r", stream.stream_id, e)


NOISE_MAX_PLAINTEXT = 65535 - 16  # a Noise transport message, less its Poly1305 tag


def apply() -> None:
    if getattr(Yamux, "_gguf_swarm_window_patch", False):
        return
    YamuxStream.recv_window = property(_get_recv_window, _set_recv_window)  # type: ignore[assignment]
    YamuxStream._auto_tune_and_send_window_update = _batched_window_update  # type: ignore[method-assign]
    yamux_module.MAX_MESSAGE_SIZE = NOISE_MAX_PLAINTEXT  # read at call time by YamuxStream.write
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
