"""A peer that writes past a Yamux stream's receive window loses its connection.

py-libp2p 0.8.1 buffered such data without bound (node/libp2p_patches/yamux.py).
"""

from __future__ import annotations

import struct
from pathlib import Path

import trio
from libp2p.custom_types import TProtocol
from libp2p.stream_muxer.yamux.yamux import TYPE_DATA, YAMUX_HEADER_FORMAT, Yamux

import fragmenter as fr
from node.node import Node
from node.pull import PullOptions, pull_model
from node.server import ServeLimits
from node.streams import read_message
from protocol import PROTOCOL_ID, Data, FragmentRequest, FrameDecoder, encode_frame
from tests.conftest import sha256_file
from tests.integration.test_exchange import big_fragment_model
from tests.integration.test_swarm import node_at

FLOOD = 64 << 20  # sent past the window; upstream buffered all of it


def buffered_from(node: Node, peer: object) -> int:
    """Bytes `node` holds in Yamux receive buffers for connections from `peer`."""
    total = 0
    for conn in node.host.get_network().get_connections(peer):  # type: ignore[arg-type]
        muxer = conn.muxed_conn
        if isinstance(muxer, Yamux):
            total += sum(len(b) for b in muxer.stream_buffers.values())
    return total


async def drain(stream: object) -> None:
    """Read what the seed sends, so it never waits on our window: upstream's
    writer gives up on a window after 5 s and resets the stream, and data for a
    reset stream is dropped, not counted against any window."""
    try:
        while await stream.read(1 << 16):  # type: ignore[attr-defined]
            pass
    except Exception:
        pass  # the seed closed the connection


async def test_data_past_the_receive_window_closes_the_connection_and_honest_pulls_go_on(tmp_path: Path) -> None:
    model, folder = big_fragment_model(tmp_path / "seed")
    manifest = fr.read_manifest(folder)
    big = max(range(len(manifest.fragments)), key=lambda i: manifest.fragments[i].size)
    # Held to 256 KB/s, the seed takes seconds to send the fragment, and its
    # handler reads nothing of ours until it is done: we write past its window.
    limits = ServeLimits(upload_rate=256_000)
    async with (
        node_at(tmp_path / "seed", serve=limits) as seed,
        node_at(tmp_path / "attacker", seed.addrs()[:1]) as attacker,
        trio.open_nursery() as nursery,
    ):
        model_cid = next(iter(seed.store.models))
        stream = await attacker.host.new_stream(seed.peer_id, [TProtocol(PROTOCOL_ID)])
        await stream.write(encode_frame(FragmentRequest(seed.store.models[model_cid].fragment_cids[big])))
        # A valid request: one the seed refused would reset the stream at once,
        # and data for a reset stream is dropped, counted against no window.
        assert isinstance(await read_message(stream, FrameDecoder()), Data)
        nursery.start_soon(drain, stream)
        stream_id = stream.muxed_stream.stream_id  # type: ignore[attr-defined]
        muxer = stream.muxed_conn
        assert isinstance(muxer, Yamux)
        chunk = bytes(64 << 10)
        header = struct.pack(YAMUX_HEADER_FORMAT, 0, TYPE_DATA, 0, stream_id, len(chunk))
        peak = 0
        sent = 0
        with trio.move_on_after(20):
            try:
                while sent < FLOOD:
                    await muxer._write_frame(header + chunk)  # bypasses our own send window
                    sent += len(chunk)
                    if sent % (1 << 20) == 0:
                        peak = max(peak, buffered_from(seed, attacker.peer_id))
                        await trio.sleep(0)
            except Exception:
                pass  # the seed closed the connection
        peak = max(peak, buffered_from(seed, attacker.peer_id))
        assert peak <= 2 << 20, f"seed buffered {peak} bytes past the window"
        assert sent < FLOOD, "the seed took all 64 MiB without closing the connection"
        with trio.fail_after(15):
            await muxer.event_closed.wait()  # the seed hung up on us
        nursery.cancel_scope.cancel()

        limits.upload_rate = None  # the honest pull need not take 30 s
        async with node_at(tmp_path / "honest", seed.addrs()[:1]) as honest:
            with trio.fail_after(30):
                await pull_model(honest, model_cid, PullOptions(find_timeout=10))
            out = tmp_path / "out.gguf"
            fr.assemble(honest.store.models[model_cid].folder, out)
            assert sha256_file(out) == sha256_file(model)
