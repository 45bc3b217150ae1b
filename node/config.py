"""Node configuration: a TOML file, with command-line flags over it.

Unknown sections and keys are errors, not silently ignored: a typo in a seed
node's config should not quietly remove its rate limit.
"""

from __future__ import annotations

import argparse
import math
import tomllib
from pathlib import Path
from typing import Any

from fragmenter.cli import parse_size

from .host import NodeError, PeerLimits
from .metrics import parse_metrics_addr
from .node import NodeConfig
from .server import ServeLimits

DEFAULT_LISTEN = "/ip4/0.0.0.0/tcp/0"
_KEYS = {
    "node": {"data_dir", "listen", "bootstrap", "metrics", "mdns"},
    "serve": {"unchoke_slots", "upload_slots", "upload_slots_per_peer", "upload_rate", "initial_seeding"},
    "fetch": {"requests_per_peer", "request_bytes_per_peer", "stall_timeout"},
    "peers": {"max_connections", "high_watermark", "low_watermark", "streams_per_peer"},
}


def read_config_file(path: str) -> dict[str, Any]:
    try:
        doc = tomllib.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise NodeError(f"cannot read config {path}: {e}") from None
    for section, value in doc.items():
        if section not in _KEYS or not isinstance(value, dict):
            raise NodeError(f"config {path}: unknown section [{section}] (known: {', '.join(_KEYS)})")
        for key in value:
            if key not in _KEYS[section]:
                raise NodeError(f"config {path}: unknown key {section}.{key}")
    return doc


def node_config(doc: dict[str, Any], args: argparse.Namespace, source: str = "config") -> NodeConfig:
    """The file's values, with any flag given on the command line taking precedence."""
    node, serve, fetch = doc.get("node", {}), doc.get("serve", {}), doc.get("fetch", {})
    peers, peer_limits = doc.get("peers", {}), PeerLimits()
    data_dir = args.data_dir or node.get("data_dir")
    if not data_dir:
        raise NodeError("--data-dir is required (or data_dir in the config file)")
    limits, defaults = ServeLimits(), NodeConfig(Path())
    metrics = getattr(args, "metrics", None) or node.get("metrics")
    try:
        return NodeConfig(
            data_dir=Path(data_dir).expanduser(),
            listen=args.listen or _strings(node.get("listen")) or [DEFAULT_LISTEN],
            bootstrap=args.bootstrap or _strings(node.get("bootstrap")) or [],
            serve=ServeLimits(
                max_total=_positive(serve.get("upload_slots", limits.max_total)),
                max_per_peer=_positive(serve.get("upload_slots_per_peer", limits.max_per_peer)),
                upload_rate=_rate(serve.get("upload_rate")),
                initial_seeding=_bool(serve.get("initial_seeding", limits.initial_seeding)),
            ),
            unchoke_slots=_positive(serve.get("unchoke_slots", defaults.unchoke_slots)),
            requests_per_peer=_positive(fetch.get("requests_per_peer", defaults.requests_per_peer)),
            request_bytes_per_peer=_size(fetch.get("request_bytes_per_peer", defaults.request_bytes_per_peer)),
            pull_stall_timeout=_seconds(fetch.get("stall_timeout", defaults.pull_stall_timeout)),
            peers=PeerLimits(
                max_connections=_positive(peers.get("max_connections", peer_limits.max_connections)),
                high_watermark=_positive(peers.get("high_watermark", peer_limits.high_watermark)),
                low_watermark=(low := _positive(peers.get("low_watermark", peer_limits.low_watermark))),
                outbound_reserve=min(peer_limits.outbound_reserve, low),
                inbound_streams_per_conn=_positive(peers.get("streams_per_peer", peer_limits.inbound_streams_per_conn)),
            ),
            metrics=parse_metrics_addr(metrics) if metrics else None,
            mdns=not getattr(args, "no_mdns", False) and _bool(node.get("mdns", True)),
        )
    except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
        raise NodeError(f"bad value in {source}: {e}") from None


def _strings(value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"expected a list of strings, got {value!r}")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected true or false, got {value!r}")
    return value


def _positive(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"expected a positive integer, got {value!r}")
    return value


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ValueError(f"expected a positive number of seconds, got {value!r}")
    return float(value)


def _size(value: Any) -> int:
    """Bytes: an integer, or a string such as "24MiB"."""
    return parse_size(value) if isinstance(value, str) else _positive(value)


def _rate(value: Any) -> int | None:
    """Bytes per second ("50MB" means 50 MB/s); absent or 0 means unlimited."""
    if value is None or value == 0:
        return None
    return _size(value)
