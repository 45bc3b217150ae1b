"""Start-up without the py-libp2p code a node never runs.

`import libp2p` (0.8.1) imports its QUIC, WebTransport and WebSocket
transports (aioquic, trio-websocket and wsproto under them), circuit relay
v2 and AutoTLS, because `libp2p/__init__.py`, `BasicHost`, `NetStream` and
the swarm import names from them at module level. A node uses none of them:
TCP + Noise + Yamux, the DHT, identify and ping. They cost ~0.2 s of CPU at
every process start (a process importing `node.node` and the CLI: 1.04 ->
0.83 s, medians of 8 pairs, before WebSocket was added), and where every
core is busy a `pull` is that much later to listen: 9 nodes starting at once
on 2 cores listened ~4 s after they started.

Before py-libp2p is first imported, `install()` puts a finder at the front of
`sys.meta_path` that serves those packages as empty stand-in modules. A name
imported from one is a stand-in class: an exception type, so upstream's
`except (..., QUICStreamClosedError)` and `isinstance` checks stay valid and
simply never match; making one raises `UnavailableFeature`. Nothing a node
calls reaches them: upstream builds a QUIC transport only when asked
(`enable_quic`), a WebSocket one only for `/ws` addresses, and runs AutoTLS
only when told to. If py-libp2p is already imported (a host program that
imported it first), nothing is changed.

The same finder tells dnspython (which py-libp2p's TCP transport imports to
resolve `/dns` addresses) that DNS over HTTPS and over QUIC are unavailable,
as soon as its feature table loads: otherwise `dns.query` imports httpx2,
httpcore2, h2 and asyncio, ~0.1 s of every start, for lookups a node makes
over plain DNS only.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from typing import Any

# Packages (with everything under them) served as stand-ins.
UNUSED = (
    "aioquic",
    "libp2p.transport.quic",
    "libp2p.transport.webtransport",
    "libp2p.transport.websocket",
    "libp2p.relay",
    "libp2p.security.tls.autotls",
)


class UnavailableFeature(RuntimeError):
    pass


class _StandIn(Exception):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise UnavailableFeature(f"{type(self).__module__}.{type(self).__name__} is not part of gguf-swarm's libp2p")


class _StandInModule(types.ModuleType):
    def __getattr__(self, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        stand_in = type(name, (_StandIn,), {"__module__": self.__name__})
        setattr(self, name, stand_in)
        return stand_in


# dnspython's optional features a node never uses (see above).
DNS_FEATURES_OFF = ("doh", "doq")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if is_unused(fullname):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        if fullname == "dns._features":
            spec = importlib.machinery.PathFinder.find_spec(fullname, path)
            if spec is not None and spec.loader is not None:
                spec.loader = _DnsFeaturesLoader(spec.loader)
            return spec
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _StandInModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


class _DnsFeaturesLoader(importlib.abc.Loader):
    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        module: types.ModuleType | None = self.loader.create_module(spec)
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        self.loader.exec_module(module)
        force = getattr(module, "force", None)  # a dnspython without it: its own probing, and a slower start
        if callable(force):
            for feature in DNS_FEATURES_OFF:
                force(feature, False)


def is_unused(name: str) -> bool:
    return any(name == package or name.startswith(package + ".") for package in UNUSED)


def install() -> None:
    if "libp2p" in sys.modules or any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _Finder())
