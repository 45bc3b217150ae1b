"""Start-up without py-libp2p's QUIC, WebTransport, WebSocket, relay and
AutoTLS code, or dnspython's DNS over HTTPS and QUIC (node/lean_imports.py):
they are never loaded, and what upstream does with their names still works."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from node.lean_imports import UnavailableFeature, is_unused


def test_a_node_process_never_loads_the_unused_packages() -> None:
    probe = (
        "import sys, node.node, node.pull, node.cli\n"
        "from node.lean_imports import is_unused\n"
        "loaded = [m for m, mod in sys.modules.items() if is_unused(m) and getattr(mod, '__file__', None)]\n"
        "print(len(loaded), 'libp2p.transport.quic' in sys.modules, 'libp2p' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["0", "True", "True"]  # asked for, served as stand-ins, none from a file


def test_stand_ins_are_exception_types_that_never_match_and_cannot_be_made() -> None:
    from libp2p.network.stream.net_stream import QUICStreamClosedError  # a stand-in in this process too

    if getattr(sys.modules.get("libp2p.transport.quic.exceptions"), "__file__", None):
        pytest.skip("py-libp2p was imported before node in this process: the real modules are loaded")
    try:
        raise ValueError("an ordinary error")
    except QUICStreamClosedError:
        raise AssertionError("a stand-in matched") from None
    except ValueError:
        pass
    assert not isinstance(ValueError(), QUICStreamClosedError)
    with pytest.raises(UnavailableFeature, match="not part of gguf-swarm"):
        QUICStreamClosedError("x")


def test_only_the_named_packages_and_what_is_under_them_are_stand_ins() -> None:
    assert is_unused("aioquic") and is_unused("aioquic.quic.connection")
    assert is_unused("libp2p.transport.quic.utils") and is_unused("libp2p.relay.circuit_v2.nat")
    assert not is_unused("libp2p.transport") and not is_unused("libp2p.transport.tcp.tcp")
    assert not is_unused("libp2p.transport.quicker") and not is_unused("aioquickly")


def test_a_node_process_resolves_dns_without_loading_http_or_quic_clients() -> None:
    probe = (
        "import sys, node.node, node.pull, node.cli, libp2p.transport.tcp.tcp, dns.query, dns.asyncresolver\n"
        "print(dns.query.have_doh, [m for m in ('httpx2', 'httpcore2', 'h2', 'hypercorn', 'statistics') "
        "if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["False", "[]"]


def test_the_fragmenter_package_loads_its_names_on_use() -> None:
    probe = (
        "import sys, fragmenter\n"
        "print(sorted(m for m in sys.modules if m.startswith('fragmenter.')))\n"
        "import fragmenter.assembly\n"  # a submodule imported first must not shadow a name
        "from fragmenter import assemble, parse_header, Manifest\n"
        "print(callable(assemble), type(assemble).__name__, 'gguf' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.splitlines() == ["[]", "True function False"]


def test_every_name_the_fragmenter_package_exports_resolves() -> None:
    import types

    import fragmenter

    for name in fragmenter.__all__:
        assert not isinstance(getattr(fragmenter, name), types.ModuleType), name
    with pytest.raises(AttributeError):
        fragmenter.no_such_name  # noqa: B018


def test_numpy_starts_no_blas_threads_in_a_node_or_builder_process() -> None:
    for entry in ("node.cli", "fragmenter.build_tokenizer"):
        probe = f"import os, {entry}, numpy\nprint(len(os.listdir('/proc/self/task')))\n"
        env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, env=env)
        assert out.stdout.split() == ["1"], (entry, out.stdout, out.stderr[-300:])


def test_the_tokenizer_builder_starts_no_other_program() -> None:
    """A pull starts this process while its blocks arrive; importing it runs no
    other program (ctypes' find_library ran `ldconfig -p` twice, for libc)."""
    probe = (
        "import sys\n"
        "started = []\n"
        "sys.addaudithook(lambda event, args: started.append(args[0]) if event == 'subprocess.Popen' else None)\n"
        "import fragmenter.build_tokenizer\n"
        "print(started)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
