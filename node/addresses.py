"""HOST:PORT addresses of the node's local HTTP endpoints (`--metrics`, `--web`)."""

from __future__ import annotations

import ipaddress

DEFAULT_HOST = "127.0.0.1"


def parse_host_port(text: str | int, what: str, example_port: int) -> tuple[str, int]:
    """`HOST:PORT`, `[IPv6]:PORT` or a bare `PORT` (then on 127.0.0.1); a
    ValueError naming `what` (the config key) otherwise."""
    if isinstance(text, int) and not isinstance(text, bool):
        text = str(text)  # `metrics = 9100` in a config file
    if not isinstance(text, str):
        raise ValueError(f"{what}: expected a string HOST:PORT, got {text!r}")
    text = text.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = DEFAULT_HOST, text
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{what}: expected HOST:PORT (e.g. {DEFAULT_HOST}:{example_port}), got {text!r}")
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_web_addr(text: str | int) -> tuple[str, int]:
    """`HOST:PORT`, `[::1]:PORT` or a bare `PORT` (on 127.0.0.1); HOST must be
    loopback (`localhost` is taken as 127.0.0.1). ValueError otherwise."""
    host, port = parse_host_port(text, "web", 8080)
    if not is_loopback(host):
        raise ValueError(
            f"web: the dashboard is served on loopback only (127.0.0.1, [::1] or localhost), not {host}; "
            "from another machine, use an SSH tunnel (ssh -L 8080:127.0.0.1:8080 HOST)"
        )
    return (DEFAULT_HOST if host == "localhost" else host), port
