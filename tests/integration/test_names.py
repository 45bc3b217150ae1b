"""Names through the real DHT: in-process nodes on 127.0.0.1, and the real CLI."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from contextlib import AsyncExitStack
from pathlib import Path

import trio
from libp2p.records.record import make_signed_put_record

from node.host import IDENTITY_FILE
from node.names import lookup, publish_name, resolve_name
from node.node import Node
from protocol import cid_of
from protocol.names import check_record, decode_record, dht_key, encode_record, sign_record
from tests.gguf_factory import MIXED, write_model
from tests.integration.test_cli_errors import assert_one_line_error
from tests.integration.test_cli_node import CLI, LISTEN
from tests.integration.test_swarm import model_folder, node_at
from tests.processes import terminate

NAME = "tiny-model:q4_k_m"


def two_models(base: Path) -> tuple[str, str]:
    """Two models in data dir `base`; their CIDs (the SHA-256 of each manifest.json)."""
    one, two = (cid_of((model_folder(base, name)[1] / "manifest.json").read_bytes()) for name in ("one", "two"))
    return one, two


def held(node: Node, publisher: Node) -> int:
    """The sequence number of the record `node` stores for `publisher`'s NAME."""
    stored = node.dht.value_store.get(dht_key(publisher.peer_id.to_bytes(), NAME).encode())
    assert stored is not None
    return decode_record(stored.value).seq


async def put(sender: Node, receiver: Node, key: str, value: bytes) -> bool:
    """A raw PUT_VALUE of `value` (whatever `sender` holds itself); whether `receiver` took it."""
    envelope = make_signed_put_record(key.encode(), value, sender.host.get_private_key())
    return await sender.dht.value_store._store_at_peer(receiver.peer_id, key.encode(), value, record=envelope)


async def test_a_name_resolves_through_the_dht_and_follows_its_publisher(tmp_path: Path) -> None:
    cid_1, cid_2 = two_models(tmp_path / "a")
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(node_at(tmp_path / "a"))
        store = await stack.enter_async_context(node_at(tmp_path / "store", a.addrs()[:1]))
        b = await stack.enter_async_context(node_at(tmp_path / "b", store.addrs()[:1]))  # knows only `store`
        me = a.peer_id.to_bytes()
        with trio.fail_after(30):
            first = await publish_name(a, NAME, cid_1)
            assert first.record.seq == 0 and first.stored >= 1
            found = await resolve_name(b, me, NAME, timeout=10)
            assert found.best is not None and found.best.value == cid_1 and found.best.seq == 0

            # Re-pointed: the next sequence number, and resolvers follow.
            second = await publish_name(a, NAME, cid_2)
            assert second.record.seq == 1
            found = await resolve_name(b, me, NAME, timeout=10)
            assert found.best is not None and (found.best.value, found.best.seq) == (cid_2, 1)
            assert held(store, a) == 1

            # A stale record (seq 0, signed by the publisher, still valid) put later
            # is refused by the storing node; the newer one stays.
            key = dht_key(me, NAME)
            stale = encode_record(first.record)
            check_record(stale, key, time.time())  # valid in itself
            assert not await put(b, store, key, stale)
            assert held(store, a) == 1
            # Nor does a forged one (b's key filed under a's name) get in.
            forged = sign_record(
                NAME, cid_1, 99, first.record.expires, first.record.public_key, b.host.get_private_key().sign
            )
            assert not await put(b, store, key, encode_record(forged))
            assert held(store, a) == 1
            # A resolver holding the stale record itself still takes the newest.
            b.dht.value_store.put_record(
                key.encode(), make_signed_put_record(key.encode(), stale, b.host.get_private_key())
            )
            found = await resolve_name(b, me, NAME, timeout=10)
            assert found.best is not None and found.best.seq == 1
            assert held(b, a) == 1  # and replaces its own copy

            # Republishing the same CID keeps the sequence number.
            assert (await publish_name(a, NAME, cid_2)).record.seq == 1
            # A publisher that lost its names.json still goes forwards (it asks the DHT).
            (a.store.state_dir / "names.json").unlink()
            assert (await publish_name(a, NAME, cid_1)).record.seq == 2
            found = await lookup(b, me, NAME)
            assert found.best is not None and (found.best.value, found.best.seq) == (cid_1, 2)


async def test_an_unknown_name_does_not_resolve(tmp_path: Path) -> None:
    async with node_at(tmp_path / "a") as a, node_at(tmp_path / "b", a.addrs()[:1]) as b:
        with trio.fail_after(20):
            found = await resolve_name(b, a.peer_id.to_bytes(), "never-published", timeout=2)
        assert found.best is None and found.asked >= 1


async def test_the_identity_is_kept_per_data_dir_owner_only(tmp_path: Path) -> None:
    async with node_at(tmp_path / "a") as a:
        first = a.peer_id
    async with node_at(tmp_path / "a") as a:
        assert a.peer_id == first
        path = a.store.state_dir / IDENTITY_FILE
        assert path.parent == tmp_path / "a" / ".gguf-swarm"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_cli_publish_with_a_name_then_pull_by_name(tmp_path: Path) -> None:
    model = write_model(tmp_path / "tiny.gguf", MIXED)
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    publisher = subprocess.Popen(
        [*CLI, "publish", str(model), "--data-dir", str(tmp_path / "pub"), *LISTEN, "--name", NAME, "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert publisher.stdout is not None
        seen: dict[str, dict] = {}
        for line in publisher.stdout:
            event = json.loads(line)
            seen[event["event"]] = event
            if event["event"] in ("name_published", "name_error"):
                break
        assert "name_published" in seen, publisher.stderr.read() if publisher.poll() is not None else seen
        peer = seen["listening"]["peer_id"]
        addr = seen["listening"]["addrs"][0]
        cid = seen["published"]["model_cid"]
        assert seen["name"]["sequence"] == 0
        assert seen["name_published"]["name"] == f"{peer}/{NAME}" and seen["name_published"]["model_cid"] == cid

        def pull(target: str, *extra: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [*CLI, "pull", target, "--data-dir", str(tmp_path / "p"), *LISTEN, "--bootstrap", addr, *extra],
                capture_output=True,
                text=True,
                timeout=120,
                env=env,
            )

        proc = pull(f"{peer}/{NAME}", "--json", "--output", str(tmp_path / "out.gguf"))
        assert proc.returncode == 0, proc.stderr[-2000:]
        events = {e["event"]: e for e in map(json.loads, proc.stdout.splitlines())}
        assert events["resolved"]["model_cid"] == cid and events["resolved"]["sequence"] == 0
        assert events["pulled"]["model_cid"] == cid
        assert (tmp_path / "out.gguf").read_bytes() == model.read_bytes()

        # An alias for the publisher.
        subprocess.run([*CLI, "alias", "alice", peer], check=True, capture_output=True, env=env, timeout=60)
        assert (tmp_path / "config" / "gguf-swarm" / "aliases.toml").read_text().count(peer) == 1
        proc = pull(f"alice/{NAME}")
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert f"resolved {peer}/{NAME} -> {cid} (sequence 0)" in proc.stdout

        # Re-pointed while the publisher runs: it publishes sequence 1 within seconds.
        other = cid_of(b"a model nobody holds")
        proc = subprocess.run(
            [*CLI, "name", NAME, other, "--data-dir", str(tmp_path / "pub")], capture_output=True, text=True, env=env
        )
        assert proc.returncode == 0 and "(sequence 1)" in proc.stdout, proc.stderr
        for line in publisher.stdout:
            event = json.loads(line)
            if event["event"] == "name_published" and event["sequence"] == 1:
                assert event["model_cid"] == other
                break
        proc = pull(f"alice/{NAME}", "--timeout", "2")
        assert f"resolved {peer}/{NAME} -> {other} (sequence 1)" in proc.stdout, (proc.stdout, proc.stderr)
        assert_one_line_error(proc, "no peer has model")  # the name resolved; nobody holds that model

        # A name nobody published: one line, non-zero exit.
        assert_one_line_error(pull(f"alice/not-{NAME}", "--timeout", "2"), "did not resolve")
        assert_one_line_error(pull(f"bob/{NAME}"), "is neither a peer id")
        assert_one_line_error(pull(f"{peer}/bad name"), "not a valid name")
    finally:
        terminate(publisher)
