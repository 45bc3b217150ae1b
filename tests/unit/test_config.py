"""Config: the shipped examples load, the environment overrides the file and flags both,
mistakes are named."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest

from node.config import load_node_config, node_config, read_config_file, read_settings
from node.host import NodeError
from node.node import NodeConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def flags(**kw: object) -> argparse.Namespace:
    base: dict[str, object] = {"data_dir": None, "listen": None, "bootstrap": None}
    return argparse.Namespace(**(base | kw))


def test_shipped_examples_load() -> None:
    seed = node_config(read_config_file(str(CONFIGS / "seed.toml")), flags())
    assert seed.listen == ["/ip4/0.0.0.0/tcp/4001"]
    assert seed.serve.max_total == 32 and seed.serve.upload_rate == 100_000_000 and seed.serve.initial_seeding
    assert seed.unchoke_slots == 8
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


# ---- layers: file < GGUF_SWARM_* < flags ------------------------------------


def cli_args(*argv: str) -> argparse.Namespace:
    from node.cli import build_parser

    return build_parser().parse_args(["seed", *argv])


def layered(env: dict[str, str], *argv: str) -> NodeConfig:
    return load_node_config(cli_args(*argv), env)


@pytest.fixture
def seed_toml(tmp_path: Path) -> str:
    path = tmp_path / "seed.toml"
    path.write_text(
        '[node]\ndata_dir = "/srv/file"\nlisten = ["/ip4/0.0.0.0/tcp/4001"]\n'
        'bootstrap = ["/ip4/10.0.0.1/tcp/1/p2p/A"]\nmdns = false\n[serve]\nupload_rate = "100MB"\nupload_slots = 7\n'
    )
    return str(path)


def test_the_environment_overrides_the_file_and_flags_override_both(seed_toml: str) -> None:
    file_only = layered({}, "--config", seed_toml)
    assert file_only.data_dir == Path("/srv/file") and file_only.serve.upload_rate == 100_000_000
    assert not file_only.mdns and file_only.listen == ["/ip4/0.0.0.0/tcp/4001"]
    env = {
        "GGUF_SWARM_CONFIG": seed_toml,  # the file, named by the environment
        "GGUF_SWARM_DATA_DIR": "/srv/env",
        "GGUF_SWARM_LISTEN": "/ip4/0.0.0.0/tcp/5001, /ip6/::/tcp/5001",
        "GGUF_SWARM_BOOTSTRAP": "/ip4/10.0.0.2/tcp/1/p2p/B /ip4/10.0.0.3/tcp/1/p2p/C",
        "GGUF_SWARM_UPLOAD_RATE": "5MB",
        "GGUF_SWARM_MDNS": "true",
        "GGUF_SWARM_METRICS": "9100",
        "GGUF_SWARM_WEB": "8080",
    }
    over_file = layered(env)
    assert over_file.data_dir == Path("/srv/env") and over_file.serve.upload_rate == 5_000_000
    assert over_file.listen == ["/ip4/0.0.0.0/tcp/5001", "/ip6/::/tcp/5001"]
    assert over_file.bootstrap == ["/ip4/10.0.0.2/tcp/1/p2p/B", "/ip4/10.0.0.3/tcp/1/p2p/C"]
    assert over_file.mdns and over_file.metrics == ("127.0.0.1", 9100) and over_file.web == ("127.0.0.1", 8080)
    assert over_file.serve.max_total == 7  # not in the environment: still the file's
    flags_win = layered(
        env, "--data-dir", "/srv/flag", "--listen", "/ip4/127.0.0.1/tcp/0", "--upload-rate", "0", "--no-mdns"
    )
    assert flags_win.data_dir == Path("/srv/flag") and flags_win.listen == ["/ip4/127.0.0.1/tcp/0"]
    assert flags_win.serve.upload_rate is None and not flags_win.mdns  # 0: unlimited, over both
    assert flags_win.bootstrap == over_file.bootstrap
    assert layered({**env, "GGUF_SWARM_UPLOAD_RATE": ""}).serve.upload_rate == 100_000_000  # empty: unset


def test_a_flag_config_is_read_instead_of_the_environments(seed_toml: str, tmp_path: Path) -> None:
    other = tmp_path / "other.toml"
    other.write_text('[node]\ndata_dir = "/srv/other"\n')
    assert layered({"GGUF_SWARM_CONFIG": seed_toml}, "--config", str(other)).data_dir == Path("/srv/other")


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("GGUF_SWARM_UPLOAD_RATE", "fast", "GGUF_SWARM_UPLOAD_RATE: not a size: 'fast'"),
        ("GGUF_SWARM_MDNS", "maybe", "GGUF_SWARM_MDNS: expected true or false, got 'maybe'"),
        ("GGUF_SWARM_METRICS", "everywhere", "GGUF_SWARM_METRICS: expected HOST:PORT"),
        ("GGUF_SWARM_WEB", "0.0.0.0:8080", "GGUF_SWARM_WEB: the dashboard is served on loopback only"),
        ("GGUF_SWARM_LOG_LEVEL", "loud", "GGUF_SWARM_LOG_LEVEL: not a log level: 'loud'"),
        ("GGUF_SWARM_LOG_LEVEL", "swram=debug", "GGUF_SWARM_LOG_LEVEL: unknown log component 'swram'"),
        ("GGUF_SWARM_LOG_FORMAT", "xml", "GGUF_SWARM_LOG_FORMAT: not a log format: 'xml'"),
    ],
)
def test_a_bad_variable_is_named(variable: str, value: str, message: str) -> None:
    with pytest.raises(NodeError) as caught:
        layered({variable: value}, "--data-dir", "d")
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_the_data_dir_may_come_from_any_layer() -> None:
    with pytest.raises(NodeError, match="GGUF_SWARM_DATA_DIR"):
        layered({})
    assert layered({"GGUF_SWARM_DATA_DIR": "~/models"}).data_dir == Path("~/models").expanduser()


def test_log_settings_layer_per_component(tmp_path: Path) -> None:
    path = tmp_path / "log.toml"
    path.write_text('[log]\nlevel = "info,dht=info"\nformat = "json"\nswarm = "debug"\n')
    from_file = read_settings(cli_args("--config", str(path)), {}).log
    assert from_file.base == logging.INFO and from_file.format == "json"
    assert dict(from_file.levels) == {"dht": logging.INFO, "swarm": logging.DEBUG}
    env = {"GGUF_SWARM_LOG_LEVEL": "swarm=warning libp2p=warning", "GGUF_SWARM_LOG_FORMAT": "text"}
    over = read_settings(cli_args("--config", str(path)), env).log
    assert over.base == logging.INFO and over.format == "text"  # a spec without a bare level keeps the file's
    assert dict(over.levels) == {"dht": logging.INFO, "swarm": logging.WARNING, "libp2p": logging.WARNING}
    flags = read_settings(cli_args("--config", str(path), "-v", "--log-level", "dht=error"), env).log
    assert flags.base == logging.DEBUG and flags.levels["dht"] == logging.ERROR
    levels = flags.logger_levels()
    assert levels["node"] == levels["fragmenter"] == logging.DEBUG
    assert levels["libp2p.kad_dht"] == logging.ERROR and levels["node.swarm"] == logging.WARNING
    assert "libp2p" in levels and "yamux" not in flags.levels  # libraries not named stay silent
    path.write_text('[log]\nswram = "debug"\n')
    with pytest.raises(NodeError, match=r"unknown key log\.swram"):
        read_config_file(str(path))
    path.write_text('[log]\nswarm = "loud"\n')
    with pytest.raises(NodeError, match="bad value.*not a log level"):
        read_settings(cli_args("--config", str(path)), {})
