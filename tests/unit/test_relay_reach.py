"""Issue 14 item 4: the relay forwards only to its advertised routes (narrowed by a
scoped request), never to its own addresses; the ACL comes on top. A real relay and
client in one event loop over loopback UDP, with in-memory TUNs."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path

import pytest

from masqued.gate.policy import Acl, Reach, relay_addresses
from masqued.proto.packet import build_icmp_echo, build_udp, parse_packet
from tests.inproc import Client, Relay, until

V4_GATEWAY = "198.18.200.1"
V6_GATEWAY = "2001:db8:200::1"


def _prohibited(pkt: bytes) -> bool:
    info = parse_packet(pkt)
    if info.version == 4:
        return info.proto == 1 and (info.icmp_type, info.icmp_code) == (3, 13)
    return info.proto == 58 and (info.icmp_type, info.icmp_code) == (1, 1)


@pytest.mark.parametrize("transport", ["stream", "datagram"])
async def test_only_advertised_routes_are_forwarded_and_never_the_relay_itself(
    certs: Path, transport: str
) -> None:
    relay = Relay(certs, ("198.18.200.0/24", "2001:db8:200::/64"))
    try:
        client = Client(certs, relay.port, transport=transport)
        await asyncio.wait_for(client.up, 5)
        me4 = client.address
        me6 = next(a.ip for a in client.params[-1].addresses if a.version == 6)
        inside = [
            build_udp(me4, "198.19.0.2", 1, 53, b"in-v4"),
            build_udp(me6, "2001:db8:19::2", 1, 53, b"in-v6"),
        ]
        outside = [
            build_udp(me4, "198.20.0.2", 1, 53, b"other-net"),
            build_icmp_echo(me4, "198.20.0.2", 7, 1),  # ICMP gets no exemption here
            build_udp(me6, "2001:db8:20::2", 1, 53, b"other-net-v6"),
        ]
        to_relay = [
            build_udp(me4, V4_GATEWAY, 1, 22, b"relay-v4"),
            build_udp(me4, "198.18.200.255", 1, 53, b"pool-broadcast"),
            build_udp(me6, V6_GATEWAY, 1, 22, b"relay-v6"),
        ]
        client.tun.inject(*outside, *to_relay, *inside)
        await until(lambda: len(relay.tun.written) == 2)
        await until(lambda: len(client.tun.written) == 6)
        assert sorted(relay.tun.written) == sorted(inside)
        assert all(_prohibited(p) for p in client.tun.written)
        session = next(iter(relay.server.sessions))
        assert session.counters.drops["not_routed"] == 3
        assert session.counters.drops["relay_address"] == 3
        # A ping of the gateway is the exception: the relay answers it itself
        # (RFC 9484 §7.2 probes), and nothing reaches its TUN.
        client.tun.inject(build_icmp_echo(me4, V4_GATEWAY, 7, 2, b"hello"))
        await until(lambda: len(client.tun.written) == 7)
        reply = client.tun.written[-1]
        assert reply == build_icmp_echo(V4_GATEWAY, me4, 7, 2, b"hello", reply=True)
        assert len(relay.tun.written) == 2
        await client.close()
    finally:
        relay.close()


async def test_acl_applies_on_top_of_the_routes(certs: Path) -> None:
    """An ACL that allows everything does not widen what the relay routes."""
    relay = Relay(certs, ("198.18.200.0/24",))
    try:
        client = Client(certs, relay.port)
        await asyncio.wait_for(client.up, 5)
        session = await _session(relay)
        acl = Acl.parse(["deny 198.19.0.3/32", "allow 0.0.0.0/0"], "allow").compile()
        session.session.acl = acl.allows
        client.tun.inject(
            build_udp(client.address, "198.20.0.2", 1, 2, b"acl-allows-but-not-routed"),
            build_udp(client.address, "198.19.0.3", 1, 2, b"routed-but-acl-denies"),
            build_udp(client.address, "198.19.0.2", 1, 2, b"ok"),
        )
        await until(lambda: len(relay.tun.written) == 1)
        await until(lambda: len(client.tun.written) == 2)
        assert relay.tun.written[0].endswith(b"ok")
        assert session.counters.drops["not_routed"] == 1
        assert session.counters.drops["acl"] == 1
        await client.close()
    finally:
        relay.close()


async def _session(relay: Relay):  # type: ignore[no-untyped-def]
    await until(lambda: bool(relay.server.sessions))
    return next(iter(relay.server.sessions))


def test_reach_against_a_simple_model() -> None:
    routes = [ipaddress.ip_network(n) for n in ("198.19.0.0/24", "10.0.0.0/8", "2001:db8::/32")]
    blocked = relay_addresses([ipaddress.ip_network("198.19.0.0/24")])
    reach = Reach(routes, blocked, outside="not_routed")
    for text in ("198.19.0.0", "198.19.0.1", "198.19.0.255"):
        assert reach.check(4, ipaddress.ip_address(text).packed) == "relay_address", text
    for text, want in (
        ("198.19.0.2", ""),
        ("10.200.3.4", ""),
        ("11.0.0.1", "not_routed"),
        ("2001:db8:5::1", ""),
        ("2001:db9::1", "not_routed"),
    ):
        ip = ipaddress.ip_address(text)
        assert reach.check(ip.version, ip.packed) == want, text
    everything = Reach([ipaddress.ip_network("0.0.0.0/0")], (), outside="not_routed")
    assert everything.check(4, bytes(4)) == ""
    assert everything.check(6, bytes(16)) == "not_routed"  # no IPv6 route at all


def test_reach_remembers_a_bounded_number_of_destinations() -> None:
    own = relay_addresses([ipaddress.ip_network("198.18.200.0/24")])
    reach = Reach([ipaddress.ip_network("198.19.0.0/16")], own, "not_routed", cache_size=100)
    for i in range(1000):
        dst = ipaddress.ip_address(int(ipaddress.ip_address("198.19.0.0")) + i * 64).packed
        assert reach.check(4, dst) == ("" if i * 64 < 65536 else "not_routed")
        assert len(reach.verdicts) <= 100 + len(own)
    # The relay's own addresses stay refused however the cache turned over.
    assert all(reach.check(4, a) == "relay_address" for a in own)


def test_relay_addresses_cover_gateway_network_and_broadcast() -> None:
    nets = [ipaddress.ip_network("198.18.200.0/24"), ipaddress.ip_network("2001:db8:200::/64")]
    got = {ipaddress.ip_address(a) for a in relay_addresses(nets)}
    assert got == {
        ipaddress.ip_address(a)
        for a in ("198.18.200.0", "198.18.200.1", "198.18.200.255", "2001:db8:200::", V6_GATEWAY)
    }


def test_every_workers_gateway_is_a_relay_address(certs: Path) -> None:
    from masqued.config import RelayConfig
    from masqued.runtime.relay import relay_settings

    config = RelayConfig(
        name="r",
        path=Path("/nonexistent"),
        listen_host="0.0.0.0",
        listen_port=443,
        certificate=certs / "relay.example.pem",
        private_key=certs / "relay.example.key",
        pool=(ipaddress.ip_network("198.18.200.0/24"),),
        routes=(ipaddress.ip_network("0.0.0.0/0"),),
        egress="auto",
        nat="off",
        workers=2,
    )
    # Worker 0 serves 198.18.200.0/25, worker 1 198.18.200.128/25: each one's TUN
    # holds its gateway, and neither may be reached through the other.
    for worker in (0, 1):
        got = {ipaddress.ip_address(a) for a in relay_settings(config, worker).relay_addresses}
        assert {ipaddress.ip_address(a) for a in ("198.18.200.1", "198.18.200.129")} <= got
        assert ipaddress.ip_address("198.18.200.2") not in got
