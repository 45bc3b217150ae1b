"""Baseline for bench/pull_bench.py: the same bytes over one raw libp2p stream.

Two processes, each a host built exactly like a node's (Noise, Yamux, one
connection per peer), with no protocol, no verification and no disk writes on
the receiving side: the ceiling a pull can approach.

  python bench/raw_stream.py send FOLDER     # prints its multiaddr, then serves
  python bench/raw_stream.py receive ADDR    # prints one JSON line: bytes, seconds
  python bench/raw_stream.py receive ADDR FOLDER OUT
      # also cuts the bytes into FOLDER's fragments, hashes each (SHA-256) and
      # writes it to OUT with fsync on a worker thread, as a pull must: the
      # cost of verifying and storing, without the protocol
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import multiaddr
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamEOF

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fragmenter import open_folder  # noqa: E402
from node.host import connect, dialable_addrs, make_host, parse_peer_addr  # noqa: E402

RAW = TProtocol("/gguf-swarm-bench/raw/1.0.0")
CHUNK = 1 << 20


def fragment_files(path: Path) -> list[Path]:
    """Every file a pull fetches: the fragments, then gguf_header.dat."""
    folder = open_folder(path)
    return [folder.fragment_path(entry) for entry in folder.manifest.fragments] + [path / "gguf_header.dat"]


async def send(folder: Path) -> None:
    files = fragment_files(folder)
    host = make_host(create_new_key_pair())

    async def handler(stream) -> None:  # type: ignore[no-untyped-def]
        try:
            for path in files:
                data = path.read_bytes()
                for start in range(0, len(data), CHUNK):
                    await stream.write(data[start : start + CHUNK])
            await stream.close()
        except Exception as e:  # keep the host alive (see LIBP2P_NOTES)
            print(f"send failed: {e!r}", file=sys.stderr)

    async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        host.set_stream_handler(RAW, handler)
        print(dialable_addrs(host)[0], flush=True)
        await trio.sleep_forever()


def store(path: Path, data: bytes) -> None:
    hashlib.sha256(data).hexdigest()
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


async def receive(addr: str, folder: Path | None = None, out: Path | None = None) -> None:
    sizes = [p.stat().st_size for p in fragment_files(folder)] if folder else []
    host = make_host(create_new_key_pair())
    async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        info = parse_peer_addr(addr)
        await connect(host, info)
        start = time.monotonic()
        stream = await host.new_stream(info.peer_id, [RAW])
        received = 0
        pending = bytearray()
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    data = await stream.read(CHUNK)
                except StreamEOF:
                    break
                if not data:
                    break
                received += len(data)
                if out is not None:
                    pending += data
                    while sizes and len(pending) >= sizes[0]:
                        size = sizes.pop(0)
                        body, pending = bytes(pending[:size]), pending[size:]
                        nursery.start_soon(trio.to_thread.run_sync, store, out / f"{len(sizes)}.dat", body)
        seconds = time.monotonic() - start
        print(json.dumps({"bytes": received, "seconds": seconds}), flush=True)
        await host.close()


if __name__ == "__main__":
    if len(sys.argv) not in (3, 5) or sys.argv[1] not in ("send", "receive"):
        sys.exit(__doc__)
    if sys.argv[1] == "send":
        trio.run(send, Path(sys.argv[2]))
    elif len(sys.argv) == 5:
        trio.run(receive, sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))
    else:
        trio.run(receive, sys.argv[2])
