"""Providing a keyspace region's keys: one lookup, then each of the region's
closest peers gets every key on one stream (see sweep.py for the plan).

The DHT protocol lets a stream carry many messages; py-libp2p's handler reads
them in a loop and echoes each ADD_PROVIDER. The sender paces itself under the
receivers' ADD_PROVIDER rate limit (our nodes accept `provider_rate_max` per
sender per 10 s; a stream that exceeds it is reset) and below their stream
lifetime (libp2p_patches/kad.py), so a 40,000-key region goes to each peer in
minutes, not the hours of one lookup per key.

Records carry the provider's id and addresses but no signed peer record: ~100
bytes a key instead of ~1 kB.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio
import varint
from libp2p.abc import IHost
from libp2p.kad_dht.common import PROTOCOL_ID
from libp2p.kad_dht.kad_dht import KadDHT
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.peer.id import ID
from libp2p.utils.varint import read_varint_prefixed_bytes_limited

from .sweep import Region, batches

log = logging.getLogger(__name__)

STREAM_KEYS = 2000  # keys per stream: well inside a receiver's stream lifetime at the paced rate
PEERS_AT_ONCE = 8  # peers of a region sent to concurrently
RATE_SHARE = 0.8  # of the receivers' limit: their window and ours need not line up
ECHO_BYTES = 256  # an echo is the key and the message type
ATTEMPTS = 3  # streams in a row that carry no key before a peer is given up
RETRY_PAUSE = 2.0  # seconds, times the attempt


def add_provider_messages(host: IHost, keys: list[bytes]) -> list[bytes]:
    """Each key's ADD_PROVIDER naming this host, varint-prefixed, ready to write."""
    template = Message()
    template.type = Message.MessageType.ADD_PROVIDER
    me = template.providerPeers.add()
    me.id = host.get_id().to_bytes()
    me.addrs.extend(addr.to_bytes() for addr in host.get_addrs())
    out = []
    for key in keys:
        template.key = key
        body = template.SerializeToString()
        out.append(varint.encode(len(body)) + body)
    return out


async def provide_region(
    host: IHost, dht: KadDHT, region: Region, per_peer_per_10s: int, on_reached: Callable[[int], None]
) -> None:
    """Provide the region's keys to its closest peers; `on_reached(n)` as each
    run of n keys has reached its first peer."""
    peers = [p for p in await dht.peer_routing.find_closest_peers_network(region.target) if p != host.get_id()]
    if not peers:
        return
    messages = add_provider_messages(host, region.keys)
    per_second = max(1.0, per_peer_per_10s * RATE_SHARE / 10)
    reached: set[int] = set()
    limit = trio.CapacityLimiter(PEERS_AT_ONCE)

    async def one(peer: ID) -> None:
        async with limit:
            for i, batch in enumerate(batches(messages, STREAM_KEYS)):
                done = failures = 0
                while done < len(batch):  # a reset stream (a busy peer timed us out): go on from its last echo
                    sent = await _send_batch(host, peer, batch[done:], per_second)
                    done += sent
                    if done == len(batch):
                        break
                    failures = 0 if sent else failures + 1
                    if failures >= ATTEMPTS:
                        log.debug("provide sweep: %s took %d of %d keys; it gets no more", peer, done, len(batch))
                        return
                    await trio.sleep(RETRY_PAUSE * (failures + 1))
                if i not in reached:
                    reached.add(i)
                    on_reached(len(batch))

    async with trio.open_nursery() as nursery:
        for peer in peers:
            nursery.start_soon(one, peer)


async def _send_batch(host: IHost, peer: ID, messages: list[bytes], per_second: float) -> int:
    """Write the messages on one stream at `per_second`; the number echoed."""
    echoed = 0
    try:
        stream = await host.new_stream(peer, [PROTOCOL_ID])
    except Exception as e:
        log.debug("provide sweep: cannot open a DHT stream to %s: %s", peer, e)
        return 0

    done = trio.Event()

    async def read_echoes() -> None:
        nonlocal echoed
        try:
            while echoed < len(messages):
                await read_varint_prefixed_bytes_limited(stream, ECHO_BYTES)
                echoed += 1
        except Exception:
            pass  # EOF or reset: what was echoed so far is what counts
        finally:
            done.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_echoes)
            step = max(1, int(per_second / 10))  # ten writes a second
            for i in range(0, len(messages), step):
                started = trio.current_time()
                await stream.write(b"".join(messages[i : i + step]))
                await trio.sleep(max(0.0, step / per_second - (trio.current_time() - started)))
            with trio.move_on_after(10):  # the last echoes
                await done.wait()
            nursery.cancel_scope.cancel()
    except Exception as e:  # a reset (rate limit, lifetime), a closed connection
        log.debug("provide sweep to %s stopped after %d echoes: %s", peer, echoed, e)
    finally:
        try:
            await stream.close()
        except Exception:
            pass
    return echoed
