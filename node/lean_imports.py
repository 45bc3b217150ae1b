"""Start-up without the py-libp2p code a node never runs.

`import libp2p` (0.8.1) imports its QUIC and WebTransport transports (and
aioquic under them), circuit relay v2 and AutoTLS, because `libp2p/__init__.py`,
`BasicHost`, `NetStream` and the swarm import names from them at module
level. A node uses none of them: TCP + Noise + Yamux, the DHT, identify and
ping. They cost ~0.2 s of CPU at every process start (a process importing
`node.node` and the CLI: 1.04 -> 0.83 s, medians of 8 pairs), and where
every core is busy a `pull` is that much later to listen: 9 nodes starting
at once on 2 cores listened ~4 s after they started.

Before py-libp2p is first imported, `install()` puts a finder at the front of
`sys.meta_path` that serves those packages as empty stand-in modules. A name
imported from one is a stand-in class: an exception type, so upstream's
`except (..., QUICStreamClosedError)` and `isinstance` checks stay valid and
simply never match; making one raises `UnavailableFeature`. Nothing a node
calls reaches them: upstream builds a QUIC transport only when asked
(`enable_quic`) and runs AutoTLS only when told to. If py-libp2p is already
imported (a host program that imported it first), nothing is changed.
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


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if is_unused(fullname):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _StandInModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def is_unused(name: str) -> bool:
    return any(name == package or name.startswith(package + ".") for package in UNUSED)


def install() -> None:
    if "libp2p" in sys.modules or any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _Finder())
