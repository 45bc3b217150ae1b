"""Logs: one handler on stderr, human lines or one JSON object per line, with a
level per component.

Our own components (`node.*`, `fragmenter`, `protocol`) log at the base level
(warning unless told otherwise); every other library (py-libp2p, multiaddr,
zeroconf, ...) is silent unless a component setting names it, e.g.
`libp2p=warning`: py-libp2p logs routine stream resets and DHT timeouts as
warnings, which an operator reading a seed's log should not have to wade
through. A level spec is what `--log-level`, `GGUF_SWARM_LOG_LEVEL` and
`[log] level` take: words separated by commas or spaces, a bare level for our
components and `COMPONENT=LEVEL` for one component ("info,swarm=debug,dht=info").

Logs go to stderr; the JSON *events* of `--json` go to stdout. The two never mix.
"""

from __future__ import annotations

import json
import logging
import os
import pkgutil
import re
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

OFF = logging.CRITICAL + 10
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
    "off": OFF,
}
FORMATS = ("text", "json")
OURS = ("node", "fragmenter", "protocol")
DEFAULT_LEVEL = logging.WARNING
# Short names for other libraries' loggers (and our code that patches them).
_ALIASES: dict[str, tuple[str, ...]] = {
    "libp2p": ("libp2p",),
    "dht": ("libp2p.kad_dht", "node.libp2p_patches.kad"),
    "yamux": ("libp2p.stream_muxer.yamux", "node.libp2p_patches.yamux"),
    "noise": ("libp2p.security.noise",),
    "mdns": ("libp2p.discovery.mdns", "zeroconf", "node.lan"),
    "multiaddr": ("multiaddr",),
    "zeroconf": ("zeroconf",),
    "trio": ("trio",),
    "fragmenter": ("fragmenter",),
    "protocol": ("protocol",),
    "node": ("node",),
}


class LogSpecError(ValueError):
    pass


def components() -> dict[str, tuple[str, ...]]:
    """Component name -> the loggers it sets: each module of `node` by its own
    name (swarm, pull, lan, ...), plus the aliases above."""
    import node

    ours = {m.name: (f"node.{m.name}",) for m in pkgutil.iter_modules(node.__path__) if not m.name.startswith("_")}
    return ours | _ALIASES


@dataclass(frozen=True)
class LogConfig:
    """Where and how much to log: `base` for our components, `levels` for named
    ones (component name or dotted logger name -> level), `format` text or json."""

    base: int | None = None  # None: not set at this layer (DEFAULT_LEVEL in the end)
    levels: Mapping[str, int] = field(default_factory=dict)
    format: str | None = None

    def over(self, lower: LogConfig) -> LogConfig:
        """This layer's settings over a lower one's (flags over env over file)."""
        return LogConfig(
            self.base if self.base is not None else lower.base,
            {**lower.levels, **self.levels},
            self.format or lower.format,
        )

    def logger_levels(self) -> dict[str, int]:
        """Logger name -> level, for every logger this config names."""
        base = DEFAULT_LEVEL if self.base is None else self.base
        out = dict.fromkeys(OURS, base)
        known = components()
        for name, level in self.levels.items():
            for logger in known.get(name, (name,)):
                out[logger] = level
        return out


def parse_level(text: str) -> int:
    level = LEVELS.get(text.strip().lower())
    if level is None:
        raise LogSpecError(f"not a log level: {text!r} (one of {', '.join(LEVELS)})")
    return level


def parse_format(text: str) -> str:
    if text.strip().lower() not in FORMATS:
        raise LogSpecError(f"not a log format: {text!r} (text or json)")
    return text.strip().lower()


def parse_spec(text: str) -> LogConfig:
    """ "info", "swarm=debug,dht=info", "debug libp2p=warning" -> a LogConfig."""
    base: int | None = None
    levels: dict[str, int] = {}
    words = [w for w in re.split(r"[,\s]+", text) if w]
    if not words:
        raise LogSpecError(f"no log level in {text!r}")
    for word in words:
        name, eq, level = word.partition("=")
        if not eq:
            base = parse_level(name)
        else:
            levels[check_component(name)] = parse_level(level)
    return LogConfig(base, levels)


def check_component(name: str) -> str:
    """A component's short name (swarm, dht, libp2p, ...) or a dotted logger name."""
    name = name.strip()
    if name in components() or (re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_]\w*)+", name) is not None):
        return name
    raise LogSpecError(
        f"unknown log component {name!r} (a module of node/ such as swarm, pull or lan; "
        f"{', '.join(_ALIASES)}; or a dotted logger name)"
    )


class _Levels(logging.Filter):
    """Per record: the level of its logger's nearest configured ancestor; a
    logger nobody configured (another library's) is off. Libraries that set
    their own levels (py-libp2p sets some to INFO) are held to ours here."""

    def __init__(self, levels: Mapping[str, int]) -> None:
        super().__init__()
        self.levels = dict(levels)
        self._cache: dict[str, int] = {}

    def level_of(self, name: str) -> int:
        level = self._cache.get(name)
        if level is None:
            parts = name.split(".")
            level = OFF
            for i in range(len(parts), 0, -1):
                found = self.levels.get(".".join(parts[:i]))
                if found is not None:
                    level = found
                    break
            self._cache[name] = level
        return level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level_of(record.name)


_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """What the caller passed as `extra=`."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class TextFormatter(logging.Formatter):
    """`2026-11-28 17:52:09,123 WARNING node.lan: message key=value`"""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = extra_fields(record)
        if not extra:
            return line
        first, nl, rest = line.partition("\n")  # after the message, before any traceback
        return first + "".join(f" {k}={v}" for k, v in extra.items()) + nl + rest


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ISO 8601), level, logger, msg, then
    the record's extra fields, and `exc` for a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        out: dict[str, Any] = {
            "ts": ts,
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in extra_fields(record).items():
            out.setdefault(k, v)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str)


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Ours, so a second `configure` replaces it rather than adding another.
    Without a stream of its own it writes to whatever `sys.stderr` is now."""

    def __init__(self, stream: Any = None) -> None:
        super().__init__(stream)
        self._fixed = stream  # after: StreamHandler set its stream to sys.stderr of the moment

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return self._fixed if self._fixed is not None else sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        self._fixed = value


def configure(config: LogConfig, stream: Any = None) -> None:
    """Install the one handler on the root logger and set every named logger's
    level (the root logger's own level is left alone: other libraries' records
    below it are not even made)."""
    levels = config.logger_levels()
    handler = _Handler(stream)
    handler.setFormatter(JsonFormatter() if config.format == "json" else TextFormatter())
    handler.addFilter(_Levels(levels))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    _take_over(["libp2p", *levels])
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def _take_over(names: Iterable[str]) -> None:
    """py-libp2p's own setup keeps its records off the root logger (they went to
    Python's last-resort handler, unformatted); send them through ours. With
    LIBP2P_DEBUG set, py-libp2p's own logging is left as it made it."""
    if os.environ.get("LIBP2P_DEBUG"):
        return
    for name in names:
        if name == "libp2p" or name.startswith("libp2p."):
            lg = logging.getLogger(name)
            lg.handlers.clear()
            lg.propagate = True
