"""Whose connection it is, for the per-client bound on connections that send no request
(app/connections.py, client_of): an IPv4 address, or an IPv6 address's /64."""

from __future__ import annotations

import pytest

from app.connections import client_of


@pytest.mark.parametrize(("host", "counted_as"), [
    ("203.0.113.7", "203.0.113.7"),
    ("127.0.0.1", "127.0.0.1"),
    # Addresses of one /64 are one client, however many it picks (a host may use any of 2**64).
    ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff:ffff:ffff:fffe", "2001:db8:1:2::/64"),
    ("2001:DB8:1:2:0:0:0:9", "2001:db8:1:2::/64"),  # however it is written
    ("2001:db8:1:3::1", "2001:db8:1:3::/64"),  # the next /64: another client
    ("::1", "::/64"),
    ("::ffff:198.51.100.4", "198.51.100.4"),  # IPv4 on a dual-stack socket: the IPv4 address
    ("testclient", "testclient"),  # not an address (a test transport): itself
])
def test_a_client_is_an_ipv4_address_or_an_ipv6_64(host, counted_as):
    assert client_of(host) == counted_as
