"""Issue 14, the client's side: it requires the serverAuth usage on the relay's
certificate, and bounds the work one capsule from the relay can make it do."""

from __future__ import annotations

import asyncio
import ipaddress
from collections import Counter
from ipaddress import IPv6Address
from pathlib import Path

import pytest

from masqued.gate import pki
from masqued.proto.connect_ip import (
    AssignedAddress,
    IPRange,
    encode_address_assign,
    encode_route_advertisement,
    ranges_for,
)
from masqued.proto.events import TunnelOpened
from masqued.proto.packet import build_udp
from masqued.proto.request import build_response_headers
from masqued.proto.session import MAX_ROUTE_NETWORKS, ClientSession
from tests.inproc import Client, Relay, until


@pytest.fixture(scope="module")
def client_auth_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA whose "relay.example" certificate is for client authentication only."""
    d = tmp_path_factory.mktemp("clientauth")
    pki.init_ca(d)
    pki.issue(d, "relay.example", "client")
    return d


async def test_a_relay_certificate_without_server_auth_is_refused(client_auth_only: Path) -> None:
    relay = Relay(client_auth_only, ("198.18.200.0/24",))
    try:
        client = Client(client_auth_only, relay.port)
        status = client.tunnel.status
        await until(lambda: "serverAuth" in (status.last_error or ""), timeout=10)
        assert not client.up.done()
        # It never asked for a tunnel (a token would have gone to this relay with it).
        assert relay.server.results.get("accepted", 0) == 0
        assert not relay.server.results
        await client.close()
    finally:
        relay.close()


async def test_a_relay_certificate_with_server_auth_still_works(certs: Path) -> None:
    relay = Relay(certs, ("198.18.200.0/24",))
    try:
        client = Client(certs, relay.port)
        await asyncio.wait_for(client.up, 5)
        await client.close()
    finally:
        relay.close()


# -- the work one capsule makes ---------------------------------------------------------


def _hostile_routes(limit: int = 16384 - 64) -> bytes:
    """Disjoint IPv6 ranges that are each ~236 CIDR blocks: 480 of them in 16 KB."""
    ranges = []
    for i in range(limit // 34):
        base = i << 119
        ranges.append(IPRange(IPv6Address(base + 1), IPv6Address(base + (1 << 119) - 2), 0))
    return encode_route_advertisement(ranges)


def _opened_session() -> ClientSession:
    s = ClientSession(
        authority="relay.example:443",
        wanted="datagram",
        mtu=1300,
        drops=Counter(),
        routes=[ipaddress.ip_network("2001:db8:19::/64")],
    )
    s.request(extended_connect=True, datagrams=True)
    s.receive_headers(build_response_headers(200, extra=[(b"capsule-protocol", b"?1")]), False)
    return s


def test_a_16k_route_advertisement_is_bounded_work() -> None:
    """480 ranges of ~236 CIDR blocks each once made the client expand 113,280
    networks (4.8 s here); now it keeps the ranges (exact, for filtering) and at most
    MAX_ROUTE_NETWORKS networks for display and the host."""
    capsule = _hostile_routes()
    assert len(capsule) <= 16384
    s = _opened_session()
    assign = encode_address_assign(
        [AssignedAddress(0, ipaddress.ip_network("2001:db8:200::2/128"))]
    )
    _, events = s.receive_data(assign + capsule, False)
    assert any(isinstance(e, TunnelOpened) for e in events)
    assert s.params is not None and len(s.params.routes) <= MAX_ROUTE_NETWORKS
    assert s.routes_truncated
    # Packets are still judged against every range, not the shortened list.
    far = build_udp("2001:db8:200::2", str(IPv6Address((400 << 119) + 5)), 1, 2, b"x")
    outside = build_udp(
        "2001:db8:200::2", str(IPv6Address((400 << 119) + (1 << 119) - 1)), 1, 2, b"x"
    )
    s.routes = (ipaddress.ip_network("::/0"),)
    s.set_routes(s.routes)
    allowed, _ = s.uplink([far, outside], 0.0)
    assert allowed == [far]


def test_many_assigned_addresses_give_one_per_family() -> None:
    s = _opened_session()
    many = [
        AssignedAddress(0, ipaddress.ip_network(f"2001:db8:200::{i:x}/128")) for i in range(2, 400)
    ] + [AssignedAddress(0, ipaddress.ip_network("198.18.200.2/32"))]
    routes = encode_route_advertisement(ranges_for([ipaddress.ip_network("::/0")]))
    s.receive_data(encode_address_assign(many) + routes, False)
    assert s.params is not None
    assert sorted(str(a) for a in s.params.addresses) == ["198.18.200.2/32", "2001:db8:200::2/128"]
