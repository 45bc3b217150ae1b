"""What a node announces on the LAN: addresses another host can dial."""

from __future__ import annotations

from node.lan import lan_addrs

IPS = ["127.0.0.1", "::1", "192.168.1.7", "10.8.0.2", "fd00::2", "fe80::fc:ff:fe00:1"]


def test_a_wildcard_becomes_each_interface_address() -> None:
    assert lan_addrs(["/ip4/0.0.0.0/tcp/4001"], IPS) == ["/ip4/192.168.1.7/tcp/4001", "/ip4/10.8.0.2/tcp/4001"]
    assert lan_addrs(["/ip6/::/tcp/4001"], IPS) == ["/ip6/fd00::2/tcp/4001"]  # no link-local: it needs a zone


def test_named_addresses_stay_and_loopback_only_when_alone() -> None:
    assert lan_addrs(["/ip4/127.0.0.1/tcp/1", "/ip4/192.168.1.7/tcp/2"], IPS) == [
        "/ip4/127.0.0.1/tcp/1",
        "/ip4/192.168.1.7/tcp/2",
    ]
    assert lan_addrs(["/ip4/0.0.0.0/tcp/1"], ["127.0.0.1"]) == ["/ip4/127.0.0.1/tcp/1"]
    assert lan_addrs(["/dns4/seed.local/tcp/1"], IPS) == ["/dns4/seed.local/tcp/1"]
