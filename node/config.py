"""Node configuration, in three layers: a TOML file (`--config`, else
`$GGUF_SWARM_CONFIG`), `GGUF_SWARM_*` environment variables over it, and
command-line flags over both. Every node command reads it here, once.

Unknown sections and keys are errors, not silently ignored: a typo in a seed
node's config should not quietly remove its rate limit. Each environment
variable is parsed as it is read, so a bad one is named in the error.
"""

from __future__ import annotations

import argparse
import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fragmenter.cli import parse_size

from .errors import NodeError
from .logs import LogConfig, LogSpecError, check_component, parse_format, parse_level, parse_spec

if TYPE_CHECKING:
    from .node import NodeConfig

DEFAULT_LISTEN = "/ip4/0.0.0.0/tcp/0"
_KEYS = {
    "node": {"data_dir", "listen", "bootstrap", "metrics", "web", "mdns"},
    "serve": {"unchoke_slots", "upload_slots", "upload_slots_per_peer", "upload_rate", "initial_seeding"},
    "fetch": {"requests_per_peer", "request_bytes_per_peer", "stall_timeout"},
    "peers": {"max_connections", "high_watermark", "low_watermark", "streams_per_peer"},
    "log": {"level", "format"},  # and COMPONENT = "LEVEL" (swarm = "debug", libp2p = "warning")
}
CONFIG_VARIABLE = "GGUF_SWARM_CONFIG"


def read_config_file(path: str) -> dict[str, Any]:
    try:
        doc = tomllib.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise NodeError(f"cannot read config {path}: {e}") from None
    for section, value in doc.items():
        if section not in _KEYS or not isinstance(value, dict):
            raise NodeError(f"config {path}: unknown section [{section}] (known: {', '.join(_KEYS)})")
        for key in value:
            if key not in _KEYS[section] and not (section == "log" and _is_component(key)):
                raise NodeError(f"config {path}: unknown key {section}.{key}")
    return doc


def _is_component(name: str) -> bool:
    try:
        check_component(name)
    except LogSpecError:
        return False
    return True


# ---- the environment: GGUF_SWARM_* over the file --------------------------


def _words(text: str) -> list[str]:
    """Multiaddrs: separated by commas or spaces."""
    return [w for w in re.split(r"[,\s]+", text) if w]


def _env_bool(text: str) -> bool:
    word = text.strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def parse_rate(text: str) -> int:
    """Bytes per second, as --upload-rate and GGUF_SWARM_UPLOAD_RATE take it: a size ("50MB"), 0 for unlimited."""
    return 0 if text.strip() == "0" else parse_size(text.strip())


def _env_metrics(text: str) -> str:
    from .metrics import parse_metrics_addr  # here: the node's modules load only for node commands

    parse_metrics_addr(text.strip())
    return text.strip()


def _env_web(text: str) -> str:
    from .addresses import parse_web_addr

    parse_web_addr(text.strip())
    return text.strip()


def _env_log_level(text: str) -> str:
    parse_spec(text)
    return text


# variable -> (section, key, parse): the value as the config file would hold it
ENVIRONMENT: dict[str, tuple[str, str, Callable[[str], Any]]] = {
    "GGUF_SWARM_DATA_DIR": ("node", "data_dir", str),
    "GGUF_SWARM_LISTEN": ("node", "listen", _words),
    "GGUF_SWARM_BOOTSTRAP": ("node", "bootstrap", _words),
    "GGUF_SWARM_METRICS": ("node", "metrics", _env_metrics),
    "GGUF_SWARM_WEB": ("node", "web", _env_web),
    "GGUF_SWARM_MDNS": ("node", "mdns", _env_bool),
    "GGUF_SWARM_UPLOAD_RATE": ("serve", "upload_rate", parse_rate),
    "GGUF_SWARM_LOG_LEVEL": ("log", "level", _env_log_level),
    "GGUF_SWARM_LOG_FORMAT": ("log", "format", parse_format),
}


def environment(environ: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """The GGUF_SWARM_* variables that are set (an empty one counts as unset), as
    a config document. A bad value is a NodeError naming the variable."""
    doc: dict[str, dict[str, Any]] = {}
    for variable, (section, key, parse) in ENVIRONMENT.items():
        text = environ.get(variable, "")
        if not text.strip():
            continue
        try:
            doc.setdefault(section, {})[key] = parse(text)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
            raise NodeError(f"{variable}: {str(e).removeprefix('metrics: ').removeprefix('web: ')}") from None
    return doc


@dataclass(frozen=True)
class Settings:
    """The config file's values with the environment's over them (flags still to come)."""

    doc: dict[str, Any]
    source: str  # where a value that turns out bad came from, for the message
    log: LogConfig


def read_settings(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    """File, then environment; log settings with the flags over them already."""
    path = getattr(args, "config", None) or environ.get(CONFIG_VARIABLE, "").strip() or None
    file_doc = read_config_file(path) if path else {}
    env_doc = environment(environ)
    doc = {s: {**file_doc.get(s, {}), **env_doc.get(s, {})} for s in {*file_doc, *env_doc}}
    log = _flags_log(args).over(_env_log(env_doc)).over(_file_log(file_doc, path or ""))
    return Settings(doc, path or "flags", log)


def load_node_config(
    args: argparse.Namespace, environ: Mapping[str, str], default_data_dir: str | None = None
) -> NodeConfig:
    """Every layer: file, environment, flags; `default_data_dir` if none names a data dir."""
    settings = getattr(args, "settings", None) or read_settings(args, environ)
    doc = settings.doc
    if default_data_dir is not None and not args.data_dir and not doc.get("node", {}).get("data_dir"):
        args.data_dir = default_data_dir
    return node_config(doc, args, source=settings.source)


def data_dir(args: argparse.Namespace, environ: Mapping[str, str]) -> Path:
    """The data dir alone (for commands that run no node: `models`)."""
    settings = getattr(args, "settings", None) or read_settings(args, environ)
    value = args.data_dir or settings.doc.get("node", {}).get("data_dir")
    if not value:
        raise NodeError(_DATA_DIR_REQUIRED)
    if not isinstance(value, str):
        raise NodeError(f"bad value in {settings.source}: data_dir: expected a path, got {value!r}")
    return Path(value).expanduser()


_DATA_DIR_REQUIRED = "--data-dir is required (or GGUF_SWARM_DATA_DIR, or data_dir in the config file)"


# ---- logs: [log] in the file, GGUF_SWARM_LOG_*, --log-level/--log-format/-v ----


def _file_log(doc: dict[str, Any], path: str) -> LogConfig:
    section = doc.get("log", {})
    try:
        layer = parse_spec(_text(section["level"])) if "level" in section else LogConfig()
        levels = {check_component(k): parse_level(_text(v)) for k, v in section.items() if k not in _KEYS["log"]}
        fmt = parse_format(_text(section["format"])) if "format" in section else None
    except (TypeError, ValueError) as e:
        raise NodeError(f"bad value in {path} [log]: {e}") from None
    return LogConfig(None, levels, fmt).over(layer)


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def _env_log(env_doc: dict[str, Any]) -> LogConfig:
    section = env_doc.get("log", {})
    layer = parse_spec(section["level"]) if "level" in section else LogConfig()
    return LogConfig(None, {}, section.get("format")).over(layer)


def _flags_log(args: argparse.Namespace) -> LogConfig:
    """-v is debug for our components; --log-level over it."""
    verbose = LogConfig(parse_level("debug")) if getattr(args, "verbose", False) else LogConfig()
    spec = getattr(args, "log_level", None)
    layer = (parse_spec(spec) if spec else LogConfig()).over(verbose)
    return LogConfig(None, {}, getattr(args, "log_format", None)).over(layer)


def node_config(doc: dict[str, Any], args: argparse.Namespace, source: str = "config") -> NodeConfig:
    """The file's values, with any flag given on the command line taking precedence."""
    # Here, not at the top: the CLI reads settings for every command, and py-libp2p
    # (which these bring in) takes about a second to import.
    from .addresses import parse_web_addr
    from .host import PeerLimits
    from .metrics import parse_metrics_addr
    from .node import NodeConfig
    from .server import ServeLimits

    node, serve, fetch = doc.get("node", {}), doc.get("serve", {}), doc.get("fetch", {})
    peers, peer_limits = doc.get("peers", {}), PeerLimits()
    data_dir = args.data_dir or node.get("data_dir")
    if not data_dir:
        raise NodeError(_DATA_DIR_REQUIRED)
    limits, defaults = ServeLimits(), NodeConfig(Path())
    metrics = getattr(args, "metrics", None) or node.get("metrics")
    web = getattr(args, "web", None) or node.get("web")
    rate_flag = getattr(args, "upload_rate", None)  # 0: unlimited, over a rate from the file
    try:
        return NodeConfig(
            data_dir=Path(data_dir).expanduser(),
            listen=args.listen or _strings(node.get("listen")) or [DEFAULT_LISTEN],
            bootstrap=args.bootstrap or _strings(node.get("bootstrap")) or [],
            serve=ServeLimits(
                max_total=_positive(serve.get("upload_slots", limits.max_total)),
                max_per_peer=_positive(serve.get("upload_slots_per_peer", limits.max_per_peer)),
                upload_rate=_rate(serve.get("upload_rate") if rate_flag is None else rate_flag),
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
            web=parse_web_addr(web) if web else None,
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
