"""Config files: the shipped examples load, flags win, mistakes are named."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from node.config import node_config, read_config_file
from node.host import NodeError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def flags(**kw: object) -> argparse.Namespace:
    base: dict[str, object] = {"data_dir": None, "listen": None, "bootstrap": None}
    return argparse.Namespace(**(base | kw))


def test_shipped_examples_load() -> None:
    seed = node_config(read_config_file(str(CONFIGS / "seed.toml")), flags())
    assert seed.listen == ["/ip4/0.0.0.0/tcp/4001"]
    assert seed.serve.max_total == 32 and seed.serve.upload_rate == 100_000_000 and seed.serve.initial_seeding
    assert seed.unchoke_slots == 4
    puller = node_config(read_config_file(str(CONFIGS / "puller.toml")), flags())
    assert puller.request_bytes_per_peer == 48 << 20 and puller.data_dir == Path("~/gguf-models").expanduser()


def test_flags_override_the_file() -> None:
    doc = read_config_file(str(CONFIGS / "seed.toml"))
    config = node_config(doc, flags(data_dir="/tmp/x", listen=["/ip4/127.0.0.1/tcp/0"]))
    assert config.data_dir == Path("/tmp/x") and config.listen == ["/ip4/127.0.0.1/tcp/0"]


def test_no_rate_means_unlimited() -> None:
    assert node_config({"serve": {"upload_rate": 0}}, flags(data_dir="d")).serve.upload_rate is None
    assert node_config({}, flags(data_dir="d")).serve.upload_rate is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[serve]\nupload_rat = 5\n", "unknown key serve.upload_rat"),
        ("[server]\n", "unknown section [server]"),
        ("[serve\n", "cannot read config"),
    ],
)
def test_mistakes_in_the_file_are_named(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(NodeError, match=message.replace("[", r"\[")):
        read_config_file(str(path))


@pytest.mark.parametrize(
    "doc",
    [
        {"serve": {"upload_slots": 0}},
        {"serve": {"upload_rate": "fast"}},
        {"fetch": {"requests_per_peer": "4"}},
        {"serve": {"initial_seeding": "yes"}},
        {"node": {"listen": "/ip4/0.0.0.0/tcp/1"}},  # must be a list
    ],
)
def test_bad_values_are_errors(doc: dict[str, object]) -> None:
    with pytest.raises(NodeError, match="bad value"):
        node_config(doc, flags(data_dir="d"))


def test_data_dir_is_required() -> None:
    with pytest.raises(NodeError, match="--data-dir is required"):
        node_config({}, flags())


def test_metrics_address_file_then_flag() -> None:
    assert node_config({}, flags(data_dir="d")).metrics is None  # not served unless asked for
    doc = {"node": {"metrics": "127.0.0.1:9100"}}
    assert node_config(doc, flags(data_dir="d")).metrics == ("127.0.0.1", 9100)
    assert node_config(doc, flags(data_dir="d", metrics="9200")).metrics == ("127.0.0.1", 9200)
    assert node_config({}, flags(data_dir="d", metrics="0.0.0.0:9100")).metrics == ("0.0.0.0", 9100)
    assert node_config({"node": {"metrics": 9100}}, flags(data_dir="d")).metrics == ("127.0.0.1", 9100)
    for bad in ("everywhere", "localhost:", True, ["127.0.0.1:9100"]):
        with pytest.raises(NodeError, match="bad value.*HOST:PORT"):
            node_config({"node": {"metrics": bad}}, flags(data_dir="d"))
