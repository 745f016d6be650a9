"""Our relay against a strict, independent RFC 9484 client (raw aioquic).

Each test checks one thing a third-party CONNECT-IP client relies on: SETTINGS,
response headers, capsule order and validity, skipping of unknown capsules,
aborting on malformed ones, scoped requests, Packet Too Big, BCP 38, hop limits.
"""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from aioquic.asyncio.client import connect

from masqued.proto.dns import DnsInfo
from masqued.proto.packet import (
    build_icmp_echo,
    build_tcp,
    build_udp,
    parse_packet,
)
from tests.conformance.conftest import RELAY_MTU, OurRelay
from tests.conformance.peers import NoDatagramClient, StrictClient, client_config
from tests.conformance.wire import (
    ADDRESS_ASSIGN,
    ADDRESS_REQUEST,
    DATAGRAM,
    DNS_ASSIGN,
    ENABLE_CONNECT_PROTOCOL,
    H3_DATAGRAM_ERROR,
    H3_DATAGRAM_SETTING,
    H3_MESSAGE_ERROR,
    ROUTE_ADVERTISEMENT,
    DnsConfig,
    DnsServer,
    Range,
    assign_value,
    capsule,
    parse_address_list,
    parse_dns_assign,
    parse_routes,
    routes_value,
    split_datagram,
    varint,
)

TARGET = "198.19.0.2"
FULL = "/.well-known/masque/ip/*/*/"


def v4range(start: str, end: str, proto: int) -> Range:
    return Range(4, int(ipaddress.ip_address(start)), int(ipaddress.ip_address(end)), proto)


@asynccontextmanager
async def strict_client(
    relay: OurRelay, certs: Path, cls: type[StrictClient] = StrictClient
) -> AsyncIterator[StrictClient]:
    config = client_config(str(certs / "ca.pem"), datagrams=cls.datagrams)
    async with connect("127.0.0.1", relay.port, configuration=config, create_protocol=cls) as c:
        assert isinstance(c, StrictClient)
        yield c
        c.close_quietly()


async def open_tunnel(
    c: StrictClient, path: str = "/.well-known/masque/ip/*/*/"
) -> tuple[int, str]:
    """Request, check the response and the first capsules; return stream and IPv4."""
    sid = c.connect_ip(path)
    st = c.stream(sid)
    await c.wait(lambda: len(st.capsules) >= 2 or st.reset is not None)
    headers = dict(st.headers[0])
    assert headers[b":status"] == b"200"
    assert headers[b"capsule-protocol"] == b"?1"  # RFC 9297 §3.4
    assert b"content-length" not in headers  # RFC 9297 §3.2
    (kind, value), (kind2, value2) = st.capsules[:2]
    # Unprompted ADDRESS_ASSIGN (request ID 0) first, then the routes (RFC 9484 §4.7).
    assert (kind, kind2) == (ADDRESS_ASSIGN, ROUTE_ADVERTISEMENT)
    entries = parse_address_list(value, request=False)
    assert {e.request_id for e in entries} == {0}
    parse_routes(value2)
    v4 = next(e.network for e in entries if e.network.version == 4)
    assert v4.prefixlen == 32
    return sid, str(v4.network_address)


async def test_settings_and_transport_parameters(relay: OurRelay, certs: Path) -> None:
    async with strict_client(relay, certs) as c:
        await c.wait(lambda: c.peer_settings() is not None)
        settings = c.peer_settings()
        assert settings is not None
        assert settings.get(ENABLE_CONNECT_PROTOCOL) == 1  # RFC 9220 §3
        assert settings.get(H3_DATAGRAM_SETTING) == 1  # RFC 9297 §2.1.1
        assert c._quic._remote_max_datagram_frame_size  # RFC 9221 §3


async def test_assign_and_routes_without_address_request(relay: OurRelay, certs: Path) -> None:
    async with strict_client(relay, certs) as c:
        sid, addr = await open_tunnel(c)
        st = c.stream(sid)
        routes = parse_routes(st.capsules[1][1])
        assert routes == [
            Range(
                4,
                int(ipaddress.ip_address("198.19.0.0")),
                int(ipaddress.ip_address("198.19.0.255")),
                0,
            ),
            Range(
                6,
                int(ipaddress.ip_address("2001:db8:19::")),
                int(ipaddress.ip_address("2001:db8:19:0:ffff:ffff:ffff:ffff")),
                0,
            ),
        ]
        # Packets flow both ways as HTTP Datagrams with Context ID 0.
        out = build_udp(addr, TARGET, 4000, 53, b"ping")
        c.send_packet(sid, out)
        await c.wait(lambda: len(relay.tun.written) == 1)
        assert relay.tun.written[0] == out
        relay.tun.inject(build_udp(TARGET, addr, 53, 4000, b"pong", ttl=9))
        await c.wait(lambda: len(st.datagrams) == 1)
        ctx, pkt = split_datagram(st.datagrams[0])
        assert ctx == 0
        info = parse_packet(pkt)
        assert pkt.endswith(b"pong") and info.ttl == 8  # hop limit decremented (§7.2)


async def test_address_request_is_answered_with_matching_ids(relay: OurRelay, certs: Path) -> None:
    async with strict_client(relay, certs) as c:
        sid, addr = await open_tunnel(c)
        st = c.stream(sid)
        request = (
            varint(7)
            + b"\x04"
            + bytes(4)
            + b"\x20"  # any IPv4
            + varint(8)
            + b"\x06"
            + bytes(16)
            + b"\x80"  # any IPv6
            + varint(9)
            + b"\x04"
            + bytes([203, 0, 113, 0])
            + b"\x18"  # a prefix we cannot give
        )
        c.send_capsule(sid, ADDRESS_REQUEST, request)
        await c.wait(lambda: len(st.capsules) >= 3)
        kind, value = st.capsules[2]
        assert kind == ADDRESS_ASSIGN
        entries = parse_address_list(value, request=False)
        by_id = {e.request_id: e.network for e in entries}
        assert str(by_id[7]) == f"{addr}/32"
        assert by_id[8].version == 6 and by_id[8].prefixlen == 128
        assert str(by_id[9]) == "0.0.0.0/32"  # rejection (§4.7.2)
        # Reusing a request ID is a protocol violation: the stream is aborted.
        c.send_capsule(sid, ADDRESS_REQUEST, varint(7) + b"\x04" + bytes(4) + b"\x20")
        await c.wait(lambda: st.reset is not None)
        assert st.reset == H3_MESSAGE_ERROR


async def test_unknown_capsules_are_skipped(relay: OurRelay, certs: Path) -> None:
    async with strict_client(relay, certs) as c:
        sid, addr = await open_tunnel(c)
        # A reserved (GREASE-like) type and a large unknown one split across writes.
        c.send_raw(sid, capsule(0x29, b"x" * 50) + capsule(0x17C5, b"y" * 3000)[:1000])
        c.send_raw(sid, capsule(0x17C5, b"y" * 3000)[1000:])
        # The DATAGRAM capsule is the reliable equivalent of a QUIC DATAGRAM (RFC 9297 §3.5).
        pkt = build_udp(addr, TARGET, 4000, 53, b"via-capsule")
        c.send_capsule(sid, DATAGRAM, varint(0) + pkt)
        await c.wait(lambda: len(relay.tun.written) == 1)
        assert relay.tun.written[0] == pkt
        assert c.stream(sid).reset is None


async def test_malformed_capsules_abort_only_that_stream(relay: OurRelay, certs: Path) -> None:
    bad = [
        (ROUTE_ADVERTISEMENT, b"\x04" + bytes([10, 0, 0, 9]) + bytes([10, 0, 0, 1]) + b"\x00"),
        (ROUTE_ADVERTISEMENT, routes_value([Range(4, 5, 9, 0), Range(4, 1, 3, 0)])),
        (ADDRESS_REQUEST, b""),
        (ADDRESS_ASSIGN, varint(0) + b"\x04" + bytes([10, 0, 0, 1]) + b"\x18"),
        (ADDRESS_ASSIGN, varint(0) + b"\x05" + bytes(4) + b"\x20"),
    ]
    async with strict_client(relay, certs) as c:
        for kind, value in bad:
            sid, _ = await open_tunnel(c)
            c.send_capsule(sid, kind, value)
            await c.wait(lambda sid=sid: c.stream(sid).reset is not None)  # type: ignore[misc]
            assert c.stream(sid).reset == H3_MESSAGE_ERROR, (kind, value)
        # A stream ending inside a capsule is malformed too (RFC 9297 §3.3).
        sid, _ = await open_tunnel(c)
        c.send_raw(sid, capsule(ADDRESS_ASSIGN, assign_value([]))[:1] + b"\x10abc", end=True)
        await c.wait(lambda: c.stream(sid).reset is not None)
        # The connection and other tunnels are fine.
        sid, addr = await open_tunnel(c)
        c.send_packet(sid, build_udp(addr, TARGET, 1, 2, b"still-works"))
        await c.wait(lambda: any(p.endswith(b"still-works") for p in relay.tun.written))
        assert not relay.server.sessions or len(relay.server.sessions) == 1


async def test_scoped_request_is_enforced(relay: OurRelay, certs: Path) -> None:
    async with strict_client(relay, certs) as c:
        sid, addr = await open_tunnel(c, "/.well-known/masque/ip/198.19.0.0%2F24/17/")
        routes = parse_routes(c.stream(sid).capsules[1][1])
        assert routes == [
            Range(
                4,
                int(ipaddress.ip_address("198.19.0.0")),
                int(ipaddress.ip_address("198.19.0.255")),
                17,
            )
        ]
        inside = build_udp(addr, TARGET, 1, 53, b"in-scope")
        c.send_packet(sid, build_tcp(addr, TARGET, 1, 80))  # wrong protocol
        c.send_packet(sid, build_udp(addr, "198.19.1.2", 1, 53, b"wrong-target"))
        c.send_packet(sid, build_icmp_echo(addr, TARGET, 1, 1))  # ICMP is always allowed
        c.send_packet(sid, inside)
        await c.wait(lambda: len(relay.tun.written) == 2)
        assert relay.tun.written[1] == inside
        assert parse_packet(relay.tun.written[0]).proto == 1
        session = next(iter(relay.server.sessions))
        assert session.counters.drops["out_of_scope"] == 2
        # Bad scope values are refused with 400 (RFC 9484 §4.6).
        for path in (
            "/.well-known/masque/ip/198.19.0.1%2F24/17/",
            "/.well-known/masque/ip/198.19.0.0/300/",
            "/.well-known/masque/ip/198.19.0.0%2F33/*/",
        ):
            bad = c.connect_ip(path)
            await c.wait(lambda bad=bad: bool(c.stream(bad).headers))  # type: ignore[misc]
            assert dict(c.stream(bad).headers[0])[b":status"] == b"400", path


async def test_oversized_packet_gets_packet_too_big(relay: OurRelay, certs: Path) -> None:
    async with strict_client(relay, certs) as c:
        sid, addr = await open_tunnel(c)
        big = build_udp(addr, TARGET, 1, 2, b"z" * (RELAY_MTU + 60))
        c.send_packet(sid, big)
        st = c.stream(sid)
        await c.wait(lambda: len(st.datagrams) == 1)
        ctx, icmp = split_datagram(st.datagrams[0])
        info = parse_packet(icmp)
        assert (ctx, info.proto, info.icmp_type, info.icmp_code) == (0, 1, 3, 4)
        assert str(info.dst) == addr
        assert int.from_bytes(icmp[26:28], "big") == RELAY_MTU  # next-hop MTU
        assert not relay.tun.written


async def test_spoofed_source_link_local_and_unknown_context_dropped(
    relay: OurRelay, certs: Path
) -> None:
    async with strict_client(relay, certs) as c:
        sid, addr = await open_tunnel(c)
        c.send_packet(sid, build_udp("198.18.200.99", TARGET, 1, 2, b"spoofed"))
        c.send_packet(sid, build_udp(addr, "169.254.1.1", 1, 2, b"link-local"))
        c.send_packet(sid, build_udp(addr, TARGET, 1, 2, b"context-5"), context_id=5)
        c.send_datagram(sid + 4, varint(0) + build_udp(addr, TARGET, 1, 2, b"no-stream"))
        c.send_packet(sid, build_udp(addr, TARGET, 1, 2, b"legit"))
        await c.wait(lambda: len(relay.tun.written) == 1)
        assert relay.tun.written[0].endswith(b"legit")
        drops = next(iter(relay.server.sessions)).counters.drops
        assert drops["spoofed_source"] == 1
        assert drops["link_local"] == 1
        assert drops["unknown_context"] == 1
        assert relay.server.totals.drops["unknown_stream"] == 1


async def test_ttl_expiry_answers_time_exceeded(relay: OurRelay, certs: Path) -> None:
    async with strict_client(relay, certs) as c:
        sid, addr = await open_tunnel(c)
        relay.tun.inject(build_udp(TARGET, addr, 53, 4000, b"dying", ttl=1))
        await c.wait(lambda: len(relay.tun.written) == 1)
        info = parse_packet(relay.tun.written[0])
        assert (info.icmp_type, str(info.dst)) == (11, TARGET)
        assert not c.stream(sid).datagrams


async def test_datagram_on_stream_mode_tunnel_is_h3_datagram_error(
    relay: OurRelay, certs: Path
) -> None:
    async with strict_client(relay, certs) as c:
        sid = c.connect_ip(capsule_protocol=False, extra=[(b"masqued-transport", b"stream")])
        await c.wait(lambda: bool(c.stream(sid).headers))
        c.send_datagram(sid, b"\x00" + b"\x45" * 20)
        await c.wait(lambda: c.stream(sid).reset is not None)
        assert c.stream(sid).reset == H3_DATAGRAM_ERROR  # RFC 9297 §2


async def test_client_without_h3_datagrams_gets_datagram_capsules(
    relay: OurRelay, certs: Path
) -> None:
    async with strict_client(relay, certs, NoDatagramClient) as c:
        sid, addr = await open_tunnel(c)
        c.send_capsule(sid, DATAGRAM, varint(0) + build_udp(addr, TARGET, 1, 2, b"up"))
        await c.wait(lambda: len(relay.tun.written) == 1)
        relay.tun.inject(build_udp(TARGET, addr, 2, 1, b"down"))
        st = c.stream(sid)
        await c.wait(lambda: any(k == DATAGRAM for k, _ in st.capsules))
        value = next(v for k, v in st.capsules if k == DATAGRAM)
        assert split_datagram(value)[1].endswith(b"down")
        assert not st.datagrams


async def test_clean_close_releases_the_address(relay: OurRelay, certs: Path) -> None:
    async with strict_client(relay, certs) as c:
        sid, _ = await open_tunnel(c)
        assert relay.pool.used() == 1
        c.send_raw(sid, b"", end=True)
        await c.wait(lambda: c.stream(sid).ended)
        assert relay.pool.used() == 0
        # Datagrams after the stream closed are dropped silently.
        c.send_packet(sid, b"\x45" + bytes(19))
        sid2, _ = await open_tunnel(c)
        assert relay.server.totals.drops["unknown_stream"] >= 1 or sid2 != sid


async def test_datagrams_too_small_for_ipv6_are_refused(relay: OurRelay, certs: Path) -> None:
    """RFC 9484 §7.2: an IPv6 tunnel must carry 1280-byte packets. A peer whose
    max_datagram_frame_size leaves less room is refused before a lease is taken."""
    config = client_config(str(certs / "ca.pem"))
    config.max_datagram_frame_size = 1200
    async with connect(
        "127.0.0.1", relay.port, configuration=config, create_protocol=StrictClient
    ) as c:
        assert isinstance(c, StrictClient)
        sid = c.connect_ip()
        st = c.stream(sid)
        await c.wait(lambda: bool(st.headers) or st.reset is not None)
        assert dict(st.headers[0])[b":status"] == b"503"
        assert relay.pool.used() == 0
        c.close_quietly()


async def test_dns_assign_follows_the_routes_and_a_client_not_knowing_it_works(
    certs: Path,
) -> None:
    """draft-ietf-masque-connect-ip-dns: DNS_ASSIGN after ROUTE_ADVERTISEMENT (§5), in
    the -06 layout; a client that does not know the type skips it (RFC 9297 §3.2)
    and its tunnel works as before."""
    dns = DnsInfo(
        servers=(ipaddress.ip_address("198.19.0.53"), ipaddress.ip_address("2001:db8:19::53")),
        search=("corp.example",),
        domains=("",),
    )
    r = OurRelay(certs, dns=dns)
    try:
        async with strict_client(r, certs) as c:
            sid, addr = await open_tunnel(c)
            st = c.stream(sid)
            await c.wait(lambda: len(st.capsules) >= 3)
            kind, value = st.capsules[2]
            assert kind == DNS_ASSIGN
            assert parse_dns_assign(value) == [
                DnsConfig(
                    servers=(DnsServer(1, ("198.19.0.53", "2001:db8:19::53")),),
                    internal=("",),
                    search=("corp.example",),
                )
            ]
            out = build_udp(addr, TARGET, 4000, 53, b"q")
            c.send_packet(sid, out)
            await c.wait(lambda: len(r.tun.written) == 1)
            assert r.tun.written[0] == out
    finally:
        r.server.close()
        for sock in r.tcp_socks:
            sock.close()


async def test_no_dns_assign_unless_configured(relay: OurRelay, certs: Path) -> None:
    async with strict_client(relay, certs) as c:
        sid, addr = await open_tunnel(c)
        st = c.stream(sid)
        c.send_packet(sid, build_udp(addr, TARGET, 4000, 53, b"q"))
        await c.wait(lambda: len(relay.tun.written) == 1)
        assert [k for k, _ in st.capsules] == [ADDRESS_ASSIGN, ROUTE_ADVERTISEMENT]
