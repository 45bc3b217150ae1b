"""Two machines on one LAN, for real: two network namespaces joined by a bridge
(as /work/shared/netlab/netlab.sh builds them), a seed in one and, in the
other, `gguf-swarm pull CID` with no address at all: the puller must find the
seed by multicast DNS and complete. Needs root and iproute2 (`ip`); skipped
otherwise. Namespaces are named per run and always deleted."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import fragmenter as fr
from tests.processes import terminate

pytestmark = [
    pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2 (ip)"),
]

_SCRIPT = Path(sys.executable).with_name("gguf-swarm")  # the console script of this venv
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "node.cli"]


@dataclass
class Lan:
    hosts: list[str]  # namespace of each host
    addrs: list[str]  # its address on the bridge

    def run(self, i: int, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.hosts[i], *argv]


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, text=True, timeout=10)


@pytest.fixture
def lan() -> Iterator[Lan]:
    """Two hosts on one bridge (in a hub namespace of its own), loopback up,
    multicast routed to the LAN interface."""
    token = uuid.uuid4().hex[:6]
    hub, hosts = f"gs-{token}-hub", [f"gs-{token}-h{i}" for i in range(2)]
    subnet = f"198.19.{int(token[:2], 16)}"  # 198.18.0.0/15: set aside for tests; netlab uses 198.18.0.x
    made: list[str] = []
    try:
        for ns in (hub, *hosts):
            _ip("netns", "add", ns)
            made.append(ns)
    except subprocess.CalledProcessError as e:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        pytest.skip(f"cannot make network namespaces here: {e.stderr.strip()}")
    try:
        _ip("-n", hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", hub, "link", "set", "br0", "up")
        for i, ns in enumerate(hosts):
            inside, outside = f"gs{token}h{i}", f"gs{token}p{i}"  # at most 15 characters
            _ip("link", "add", inside, "type", "veth", "peer", "name", outside)
            _ip("link", "set", inside, "netns", ns)
            _ip("link", "set", outside, "netns", hub)
            _ip("-n", hub, "link", "set", outside, "master", "br0")
            _ip("-n", hub, "link", "set", outside, "up")
            _ip("-n", ns, "addr", "add", f"{subnet}.{i + 1}/24", "dev", inside)
            _ip("-n", ns, "link", "set", inside, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", inside)  # mDNS: 224.0.0.251 out of the LAN link
        yield Lan(hosts, [f"{subnet}.{i + 1}" for i in range(2)])
    finally:
        for ns in made:  # the veth pairs and the bridge go with them
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


@pytest.fixture
def model(tmp_path: Path) -> tuple[Path, str]:
    from tests.integration.test_swarm import model_folder

    model_folder(tmp_path / "seed")
    listed = subprocess.run(
        [*CLI, "models", "--data-dir", str(tmp_path / "seed"), "--json"], capture_output=True, text=True, timeout=60
    )
    return tmp_path / "seed", json.loads(listed.stdout.splitlines()[0])["model_cid"]


def test_pull_finds_a_seed_on_another_host_of_the_lan(lan: Lan, model: tuple[Path, str], tmp_path: Path) -> None:
    data, cid = model
    # The seed: everything from the environment, as a service unit would give it; mDNS is on by default.
    seed = subprocess.Popen(
        lan.run(0, *CLI, "seed"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "GGUF_SWARM_DATA_DIR": str(data), "GGUF_SWARM_LOG_LEVEL": "lan=info"},
    )
    try:
        assert seed.stdout is not None
        addr = seed.stdout.readline().strip()
        assert "/p2p/12D3" in addr, seed.stderr.read() if seed.poll() is not None else addr
        pulled = subprocess.run(
            lan.run(1, *CLI, "pull", cid, "--data-dir", str(tmp_path / "puller"), "--json", "--timeout", "15"),
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        terminate(seed)
    seed_log = seed.stderr.read() if seed.stderr else ""
    assert pulled.returncode == 0, f"{pulled.stderr[-2000:]}\nseed: {seed_log[-2000:]}"
    # It announced its address on the LAN, not the 0.0.0.0 it listens on (which the puller would dial as itself).
    assert f"announcing /ip4/{lan.addrs[0]}/tcp/" in seed_log and "/ip4/0.0.0.0" not in seed_log, seed_log
    done = [json.loads(line) for line in pulled.stdout.splitlines() if '"pulled"' in line][-1]
    assert done["peers"] == 1 and done["bytes"] > 0
    assert fr.verify_folder(tmp_path / "puller" / cid).ok
