"""Small patches to py-libp2p 0.8.1, each closing one measured attack or cost.

Each submodule patches one upstream weakness, names the attack it stops (or,
`republish`, `tcp`, `reads`, `locks` and part of `yamux`, the waste it ends), and
could be sent upstream as it is. `apply_all()` is idempotent and runs before
any host is made (`node.host.make_host`). The tests in
`tests/integration/test_hostile_*.py` run each attack against a live node;
`test_transport_patches.py` and `tests/unit/test_quick_locks.py` the rest.
"""

from __future__ import annotations

from . import connections, kad, locks, reads, republish, streams, tcp, yamux

_applied = False


def apply_all() -> None:
    global _applied
    if _applied:
        return
    yamux.apply()
    kad.apply()
    connections.apply()
    streams.apply()
    republish.apply()
    tcp.apply()
    reads.apply()
    locks.apply()
    _applied = True
