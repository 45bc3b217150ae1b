"""Log records: JSON lines for collectors, one level per component, other libraries silent."""

from __future__ import annotations

import json
import logging
import sys

from node.logs import JsonFormatter, LogConfig, TextFormatter, _Levels, parse_spec


def record(name: str, level: int, msg: str, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord(name, level, __file__, 1, msg, None, None)
    rec.__dict__.update(extra)
    return rec


def test_json_lines_carry_the_extra_fields() -> None:
    line = JsonFormatter().format(record("node.lan", logging.INFO, "connected", peer="12D3KooW", tries=2))
    event = json.loads(line)
    assert event["level"] == "info" and event["logger"] == "node.lan" and event["msg"] == "connected"
    assert event["peer"] == "12D3KooW" and event["tries"] == 2 and event["ts"].endswith("Z")
    assert "\n" not in line
    try:
        raise ValueError("boom")
    except ValueError:
        rec = record("node.swarm", logging.ERROR, "failed")
        rec.exc_info = sys.exc_info()
    line = JsonFormatter().format(rec)
    assert "\n" not in line and "ValueError: boom" in json.loads(line)["exc"]
    text = TextFormatter().format(record("node.lan", logging.WARNING, "heard", peer="X"))
    assert text.endswith("WARNING node.lan: heard peer=X")


def test_each_component_at_its_level_and_other_libraries_off() -> None:
    levels = _Levels(parse_spec("info,swarm=debug,dht=error").logger_levels())
    assert levels.filter(record("node.swarm", logging.DEBUG, "x"))
    assert not levels.filter(record("node.pull", logging.DEBUG, "x")) and levels.filter(record("node.pull", 20, "x"))
    assert not levels.filter(record("libp2p.kad_dht.kad_dht", logging.WARNING, "x"))  # dht=error
    assert levels.filter(record("libp2p.kad_dht.kad_dht", logging.ERROR, "x"))
    # py-libp2p sets some of its loggers to INFO itself; unnamed, they stay out.
    assert not levels.filter(record("libp2p.network.swarm", logging.CRITICAL, "x"))
    assert not levels.filter(record("zeroconf", logging.WARNING, "x"))
    default = _Levels(LogConfig().logger_levels())
    assert default.filter(record("node.store", logging.WARNING, "x"))
    assert not default.filter(record("node.store", logging.INFO, "x"))
    assert not default.filter(record("libp2p.transport.manager", logging.WARNING, "x"))
    asked = _Levels(parse_spec("libp2p=warning").logger_levels())
    assert asked.filter(record("libp2p.transport.manager", logging.WARNING, "x"))
