"""Prometheus /metrics of real nodes in one process: a pull, scraped on both ends."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

import fragmenter as fr
from node.addresses import is_loopback
from node.host import NodeError
from node.metrics import parse_metrics_addr
from node.node import NodeConfig, open_node
from node.pull import PullOptions, pull_model
from tests.integration.test_swarm import LOOPBACK, model_folder


def scrape_sync(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    # The collector hands the snapshot to this trio thread: the HTTP request must come from another.
    return await trio.to_thread.run_sync(scrape_sync, url)


def value(metrics: dict, metric: str, **labels: str) -> float:
    return metrics[(metric, tuple(sorted(labels.items())))]


def config(data_dir: Path, bootstrap: list[str] | None = None) -> NodeConfig:
    return NodeConfig(data_dir, listen=LOOPBACK, bootstrap=bootstrap or [], metrics=("127.0.0.1", 0))


async def test_pull_shows_in_both_nodes_metrics(tmp_path: Path) -> None:
    _, folder = model_folder(tmp_path / "seed")
    manifest = fr.read_manifest(folder)
    model_bytes = manifest.total_bytes + manifest.header_size  # every block, the header's included
    n = len(manifest.fragments)
    async with open_node(config(tmp_path / "seed")) as seed:
        model_cid = next(iter(seed.store.models))
        async with open_node(config(tmp_path / "p", seed.addrs()[:1])) as puller:
            assert seed.metrics_url and puller.metrics_url and seed.metrics_url != puller.metrics_url
            before = await scrape(puller.metrics_url)
            assert value(before, "gguf_swarm_models") == 0
            assert value(before, "gguf_swarm_downloaded_bytes_total") == 0
            await pull_model(puller, model_cid, PullOptions(find_timeout=20))
            got = await scrape(puller.metrics_url)
            served = await scrape(seed.metrics_url)
            port = int(puller.metrics_url.rsplit(":", 1)[1].split("/")[0])
    labels = {"model": model_cid, "name": "swarm-model"}
    assert value(got, "gguf_swarm_downloaded_bytes_total") == model_bytes
    assert value(got, "gguf_swarm_blocks_verified_total") > 0
    assert value(got, "gguf_swarm_blocks_rejected_total") == 0
    assert value(got, "gguf_swarm_models") == 1
    assert value(got, "gguf_swarm_model_complete", **labels) == 1
    assert value(got, "gguf_swarm_fragments_held", **labels) == n
    assert value(got, "gguf_swarm_fragments_missing", **labels) == 0
    assert value(got, "gguf_swarm_peers_connected") >= 1
    assert value(got, "gguf_swarm_peers_banned") == 0
    # The seed's registry is its own: it uploaded what the puller downloaded, and downloaded nothing.
    assert value(served, "gguf_swarm_uploaded_bytes_total") >= model_bytes
    assert value(served, "gguf_swarm_downloaded_bytes_total") == 0
    assert value(served, "gguf_swarm_fragments_held", **labels) == n
    # The node has stopped: so has its metrics server, and the port is free again.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    with socket.socket() as s:  # as a restarted node would bind it (the scrape's TIME_WAIT may linger)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


async def test_metrics_port_in_use_is_a_node_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = NodeConfig(tmp_path / "d", listen=LOOPBACK, metrics=("127.0.0.1", taken.getsockname()[1]))
        with pytest.raises((NodeError, BaseExceptionGroup)) as caught:
            async with open_node(busy):
                pass
    assert "cannot serve metrics" in str(caught.value) or caught.group_contains(NodeError)


def test_metrics_addresses() -> None:
    assert parse_metrics_addr("127.0.0.1:9100") == ("127.0.0.1", 9100)
    assert parse_metrics_addr("9100") == ("127.0.0.1", 9100)  # a bare port: loopback, never every interface
    assert parse_metrics_addr("[::1]:9100") == ("::1", 9100)
    assert parse_metrics_addr("0.0.0.0:9100") == ("0.0.0.0", 9100)  # written out: the operator's choice
    for bad in ("", "host:", ":9100", "127.0.0.1:99999", "127.0.0.1:http", "abc"):
        with pytest.raises(ValueError):
            parse_metrics_addr(bad)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")
