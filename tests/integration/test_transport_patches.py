"""The transport patches that cut per-byte work and waits: buffered TCP reads,
Noise messages read in one wake-up, batched Yamux window updates that no reader
waits on, and DHT messages written whole (node/libp2p_patches/tcp.py, yamux.py,
kad.py)."""

from __future__ import annotations

import os
from pathlib import Path

import trio
import varint
from libp2p.bitswap.cid import parse_cid
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.io.trio import TrioTCPStream
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.security.noise.io import NoisePacketReadWriter
from libp2p.stream_muxer.yamux.yamux import YamuxStream

from node.host import connect, make_host, parse_peer_addr
from node.libp2p_patches import apply_all
from node.libp2p_patches.kad import is_one_varint
from node.libp2p_patches.tcp import READ_AHEAD, buffered_bytes
from protocol.cid import cid_of
from tests.integration.test_swarm import node_at

BULK = TProtocol("/gguf-swarm-test/bulk/1.0.0")


async def test_buffered_tcp_reads_return_the_bytes_in_order_and_never_more_than_asked() -> None:
    apply_all()
    payload = bytes(range(256)) * 4096  # 1 MiB
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:

        async def serve() -> None:
            server = await listeners[0].accept()
            await server.send_all(payload)
            await server.aclose()

        nursery.start_soon(serve)
        stream = TrioTCPStream(await trio.open_tcp_stream("127.0.0.1", port))
        got = bytearray()
        sizes = [2, 7, 65535, 1, None]
        while len(got) < len(payload):
            n = sizes[len(got) % len(sizes)]
            data = await stream.read(n)
            assert data and (n is None or len(data) <= n)
            assert buffered_bytes(stream) <= READ_AHEAD
            got += data
        assert bytes(got) == payload
        await stream.close()
        for listener in listeners:
            await listener.aclose()


async def test_a_noise_message_that_trickles_in_is_read_in_one_wakeup() -> None:
    """A 60 KB message sent in 1 KB pieces, as a slow link delivers it, then a
    short message: the first is read in a couple of socket reads, not one per
    piece, and the second is still read at once."""
    apply_all()
    body, short = os.urandom(60_000), b"x" * 100
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:

        async def trickle() -> None:
            server = await listeners[0].accept()
            message = len(body).to_bytes(2, "big") + body
            for i in range(0, len(message), 1000):
                await server.send_all(message[i : i + 1000])
                await trio.sleep(0.002)
            await trio.sleep(0.05)
            await server.send_all(len(short).to_bytes(2, "big") + short)
            await trio.sleep(5)  # the connection stays open: only the message can wake the reader
            await server.aclose()

        nursery.start_soon(trickle)
        socket_stream = await trio.open_tcp_stream("127.0.0.1", port)
        receives = 0
        upstream_receive = socket_stream.receive_some

        async def counted_receive(max_bytes: int | None = None) -> bytes:
            nonlocal receives
            receives += 1
            return await upstream_receive(max_bytes)

        socket_stream.receive_some = counted_receive  # type: ignore[method-assign]
        reader = NoisePacketReadWriter(RawConnection(TrioTCPStream(socket_stream), initiator=True))
        with trio.fail_after(5):
            assert await reader.read_msg() == body
            assert receives <= 4  # 61 without the low-water mark
            assert await reader.read_msg() == short
        nursery.cancel_scope.cancel()
        await socket_stream.aclose()
        for listener in listeners:
            await listener.aclose()


async def test_a_bulk_stream_sends_few_window_updates() -> None:
    size = 32 << 20
    sender, receiver = make_host(create_new_key_pair()), make_host(create_new_key_pair())
    listen = [parse_peer_addr("/ip4/127.0.0.1/tcp/0/p2p/" + str(sender.get_id())).addrs[0]]
    updates = 0
    upstream = YamuxStream.send_window_update

    async def counted(self: YamuxStream, increment: int, skip_lock: bool = False) -> None:
        nonlocal updates
        updates += 1
        await upstream(self, increment, skip_lock)

    async def serve(stream) -> None:  # type: ignore[no-untyped-def]
        chunk = bytes(1 << 20)
        for _ in range(size >> 20):
            await stream.write(chunk)
        await stream.close()

    YamuxStream.send_window_update = counted  # type: ignore[method-assign]
    try:
        async with sender.run(listen_addrs=listen), receiver.run(listen_addrs=listen):
            sender.set_stream_handler(BULK, serve)
            addr = f"{sender.get_addrs()[0]}/p2p/{sender.get_id()}"
            await connect(receiver, parse_peer_addr(addr))
            stream = await receiver.new_stream(sender.get_id(), [BULK])
            received = 0
            with trio.fail_after(60):
                while received < size:
                    received += len(await stream.read(1 << 20))
            await sender.close()
            await receiver.close()
    finally:
        YamuxStream.send_window_update = upstream  # type: ignore[method-assign]
    # One update per frame read would be ~512; go-yamux's half-window rule with
    # an auto-tuned window sends a few dozen.
    assert updates < 100, updates


async def test_a_reader_does_not_wait_for_its_window_update_to_be_written() -> None:
    """While the connection's writer is busy (its write lock held), a reader
    that has consumed half its window still gets its data: the WINDOW_UPDATE
    it grants goes out afterwards, from a task of its own."""
    size = 200 * 1024  # within the first window (256 KiB), past the half that triggers an update
    sender, receiver = make_host(create_new_key_pair()), make_host(create_new_key_pair())
    listen = [parse_peer_addr("/ip4/127.0.0.1/tcp/0/p2p/" + str(sender.get_id())).addrs[0]]

    async def serve(stream) -> None:  # type: ignore[no-untyped-def]
        await stream.write(os.urandom(size))
        await trio.sleep(10)

    async with sender.run(listen_addrs=listen), receiver.run(listen_addrs=listen):
        sender.set_stream_handler(BULK, serve)
        addr = f"{sender.get_addrs()[0]}/p2p/{sender.get_id()}"
        await connect(receiver, parse_peer_addr(addr))
        stream = await receiver.new_stream(sender.get_id(), [BULK])
        yamux = stream.muxed_stream.conn
        busy, done = trio.Event(), trio.Event()

        async def writer_blocked_on_a_full_socket() -> None:
            async with yamux._write_lock:
                busy.set()
                await done.wait()

        received = 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer_blocked_on_a_full_socket)
            await busy.wait()
            with trio.fail_after(5):
                while received < size:
                    received += len(await stream.read(64 * 1024))
            done.set()
        await sender.close()
        await receiver.close()
    assert received == size


def test_one_varint_is_told_from_a_message() -> None:
    assert is_one_varint(b"\x26") and is_one_varint(b"\x80\x01")
    assert not is_one_varint(b"") and not is_one_varint(b"\x08\x03") and not is_one_varint(b"\x80")


async def test_a_dht_request_and_its_answer_each_go_out_as_one_write(tmp_path: Path) -> None:
    """py-libp2p writes a DHT message's varint length and its body separately:
    two Noise messages each. Patched, each is one write of length + body."""
    cid = cid_of(b"a key the answering node provides")
    key = parse_cid(cid).multihash
    writes: list[bytes] = []
    upstream = YamuxStream.write

    async def recorded(self: YamuxStream, data: bytes) -> None:
        writes.append(bytes(data))
        await upstream(self, data)

    async with node_at(tmp_path / "answers") as answering:
        await answering.dht.provide(cid)
        async with node_at(tmp_path / "asks", answering.addrs()[:1]) as asking:
            YamuxStream.write = recorded  # type: ignore[method-assign]
            try:
                with trio.fail_after(10):
                    providers, _ = await asking.dht.provider_store._get_providers_from_peer_with_closers(
                        answering.peer_id, key
                    )
            finally:
                YamuxStream.write = upstream  # type: ignore[method-assign]
    assert answering.peer_id in {p.peer_id for p in providers}
    with_key = [w for w in writes if key in w]
    assert len(with_key) == 2, [len(w) for w in writes]  # the GET_PROVIDERS and its answer
    for w in with_key:
        prefix = next(i for i, b in enumerate(w) if b < 0x80) + 1
        assert varint.decode_bytes(w[:prefix]) == len(w) - prefix, w.hex()
    assert not any(is_one_varint(w) for w in writes)
