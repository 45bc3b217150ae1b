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
from protocol import PROTOCOL_ID, FragmentRequest, encode_frame
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


async def test_data_past_the_receive_window_closes_the_connection_and_honest_pulls_go_on(tmp_path: Path) -> None:
    model, folder = big_fragment_model(tmp_path / "seed")
    manifest = fr.read_manifest(folder)
    big = max(manifest.fragments, key=lambda e: e.size)
    async with node_at(tmp_path / "seed") as seed, node_at(tmp_path / "attacker", seed.addrs()[:1]) as attacker:
        stream = await attacker.host.new_stream(seed.peer_id, [TProtocol(PROTOCOL_ID)])
        # The seed's handler now writes a fragment we never read, so it reads
        # nothing of ours while we write past its window.
        await stream.write(encode_frame(FragmentRequest(big.checksum)))
        stream_id = stream.muxed_stream.stream_id  # type: ignore[attr-defined]
        muxer = stream.muxed_conn
        attacked = seed.host.get_network().get_connections(attacker.peer_id)
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
        with trio.fail_after(5):
            while not all(conn.is_closed for conn in attacked):
                await trio.sleep(0.05)

        async with node_at(tmp_path / "honest", seed.addrs()[:1]) as honest:
            cid = next(iter(seed.store.models))
            with trio.fail_after(30):
                await pull_model(honest, cid, PullOptions(find_timeout=10))
            out = tmp_path / "out.gguf"
            fr.assemble(honest.store.models[cid].folder, out)
            assert sha256_file(out) == sha256_file(model)
