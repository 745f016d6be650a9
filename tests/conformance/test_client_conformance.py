"""Our client against a strict, scripted RFC 9484 proxy (raw aioquic).

The proxy records what our client sends (SETTINGS, request headers, capsules,
datagrams) and answers as a third-party proxy might: prefixes instead of host
addresses, no ROUTE_ADVERTISEMENT until later, unknown capsules, later changes,
refusals, malformed capsules, no H3 datagrams at all.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aioquic.asyncio.server import QuicServer, serve

from masqued.proto.packet import build_udp
from tests.conformance.peers import Headers, StrictProxy, server_config
from tests.conformance.wire import (
    ADDRESS_ASSIGN,
    ADDRESS_REQUEST,
    DNS_ASSIGN,
    H3_DATAGRAM_SETTING,
    H3_MESSAGE_ERROR,
    ROUTE_ADVERTISEMENT,
    DnsConfig,
    DnsServer,
    Entry,
    Range,
    assign_value,
    dns_assign_value,
    parse_address_list,
    routes_value,
    split_datagram,
)
from tests.inproc import Client, until

V4_PREFIX = ipaddress.ip_network("192.0.2.0/28")
ALL_V4 = Range(4, 0, 2**32 - 1, 0)


def accept(proxy: StrictProxy, sid: int, headers: Headers) -> None:
    """A typical proxy: 200, then an unprompted assignment and a full-tunnel route."""
    proxy.respond(sid, 200, [(b"capsule-protocol", b"?1")])
    proxy.send_capsule(sid, ADDRESS_ASSIGN, assign_value([Entry(0, V4_PREFIX)]))
    proxy.send_capsule(sid, 0x4D2, b"an unknown capsule to skip")
    proxy.send_capsule(sid, ROUTE_ADVERTISEMENT, routes_value([ALL_V4]))


@asynccontextmanager
async def strict_proxy(
    certs: Path, script: Callable[[StrictProxy, int, Headers], None], datagrams: bool = True
) -> AsyncIterator[tuple[int, list[StrictProxy]]]:
    proxy_cls = type(
        "ScriptedProxy",
        (StrictProxy,),
        {"script": staticmethod(script), "instances": [], "datagrams": datagrams},
    )
    config = server_config(
        str(certs / "relay.example.pem"), str(certs / "relay.example.key"), datagrams
    )
    server: QuicServer = await serve(
        "127.0.0.1", 0, configuration=config, create_protocol=proxy_cls
    )
    port = server._transport.get_extra_info("sockname")[1]
    try:
        yield port, proxy_cls.instances  # type: ignore[attr-defined]
    finally:
        server.close()


def our_client(certs: Path, port: int, **overrides: Any) -> Client:
    """Our client against the strict peer: transport=datagram unless overridden."""
    return Client(certs, port, **{"transport": "datagram", **overrides})


async def test_request_settings_and_unprompted_assignment(certs: Path) -> None:
    async with strict_proxy(certs, accept) as (port, proxies):
        client = our_client(certs, port)
        await asyncio.wait_for(client.up, 5)
        proxy = proxies[0]
        # The client offered H3 datagrams and a DATAGRAM frame size.
        assert proxy.peer_settings() is not None
        assert proxy.peer_settings().get(H3_DATAGRAM_SETTING) == 1  # type: ignore[union-attr]
        assert proxy._quic._remote_max_datagram_frame_size
        (sid,) = proxy.streams
        headers = proxy.streams[sid].headers[0]
        names = [n for n, _ in headers]
        assert names[:5] == [b":method", b":protocol", b":scheme", b":authority", b":path"]
        fields = dict(headers)
        assert fields[b":method"] == b"CONNECT" and fields[b":protocol"] == b"connect-ip"
        assert fields[b":path"] == b"/.well-known/masque/ip/*/*/"
        assert fields[b"capsule-protocol"] == b"?1"
        assert b"masqued-transport" not in fields
        # No ADDRESS_REQUEST unless configured.
        assert not proxy.streams[sid].capsules
        # A /28 prefix: the client takes its first address with the prefix length.
        params = client.params[-1]
        assert [str(a) for a in params.addresses] == ["192.0.2.1/28"]
        assert [str(r) for r in params.routes] == ["0.0.0.0/0"]
        # Packets: TUN -> HTTP Datagram with Context ID 0, and back.
        pkt = build_udp("192.0.2.1", "203.0.113.5", 5, 53, b"up")
        client.tun.inject(pkt)
        await until(lambda: bool(proxy.streams[sid].datagrams))
        assert split_datagram(proxy.streams[sid].datagrams[0]) == (0, pkt)
        down = build_udp("203.0.113.5", "192.0.2.1", 53, 5, b"down")
        proxy.send_packet(sid, down, context_id=7)  # unknown context: dropped
        proxy.send_packet(sid, down)
        await until(lambda: len(client.tun.written) == 1)
        assert client.tun.written[0] == down
        assert client.tunnel.status.counters.drops["unknown_context"] == 1
        await client.close()


async def test_address_request_when_configured_and_later_changes(certs: Path) -> None:
    def script(proxy: StrictProxy, sid: int, headers: Headers) -> None:
        proxy.respond(sid, 200, [(b"capsule-protocol", b"?1")])
        proxy.send_capsule(sid, ROUTE_ADVERTISEMENT, routes_value([ALL_V4]))

    async with strict_proxy(certs, script) as (port, proxies):
        client = our_client(certs, port, address_request=True, request_versions=(4,))
        proxy: StrictProxy | None = None
        await until(lambda: bool(proxies) and any(s.capsules for s in proxies[0].streams.values()))
        proxy = proxies[0]
        (sid,) = proxy.streams
        kind, value = proxy.streams[sid].capsules[0]
        assert kind == ADDRESS_REQUEST
        (req,) = parse_address_list(value, request=True)
        assert req.request_id != 0 and str(req.network) == "0.0.0.0/32"
        proxy.send_capsule(
            sid,
            ADDRESS_ASSIGN,
            assign_value([Entry(req.request_id, ipaddress.ip_network("192.0.2.9/32"))]),
        )
        await asyncio.wait_for(client.up, 5)
        assert [str(a) for a in client.params[-1].addresses] == ["192.0.2.9/32"]
        # Later ADDRESS_ASSIGN and ROUTE_ADVERTISEMENT replace the earlier ones.
        proxy.send_capsule(
            sid, ADDRESS_ASSIGN, assign_value([Entry(0, ipaddress.ip_network("192.0.2.10/32"))])
        )
        proxy.send_capsule(
            sid,
            ROUTE_ADVERTISEMENT,
            routes_value(
                [
                    Range(
                        4,
                        int(ipaddress.ip_address("198.51.100.0")),
                        int(ipaddress.ip_address("198.51.100.255")),
                        0,
                    )
                ]
            ),
        )
        await until(lambda: [str(r) for r in client.params[-1].routes] == ["198.51.100.0/24"])
        assert [str(a) for a in client.params[-1].addresses] == ["192.0.2.10/32"]
        assert client.tunnel.status.params == client.params[-1]
        await client.close()


@pytest.mark.parametrize(
    ("status", "headers", "expected"),
    [
        (403, [], "403"),
        (501, [], "501"),
        (200, [], "without capsule-protocol"),
        (200, [(b"capsule-protocol", b"?0")], "without capsule-protocol"),
    ],
)
async def test_refusals_and_bad_responses(
    certs: Path, status: int, headers: Headers, expected: str
) -> None:
    def script(proxy: StrictProxy, sid: int, _: Headers) -> None:
        proxy.respond(sid, status, headers)

    async with strict_proxy(certs, script) as (port, _proxies):
        client = our_client(certs, port)
        await until(lambda: expected in (client.tunnel.status.last_error or ""))
        assert not client.up.done()
        await client.close()


async def test_malformed_capsule_aborts_the_stream(certs: Path) -> None:
    def script(proxy: StrictProxy, sid: int, _: Headers) -> None:
        proxy.respond(sid, 200, [(b"capsule-protocol", b"?1")])
        # Routes out of order: RFC 9484 §4.7.3 says abort.
        proxy.send_capsule(
            sid, ROUTE_ADVERTISEMENT, routes_value([Range(4, 9, 10, 0), Range(4, 1, 2, 0)])
        )

    async with strict_proxy(certs, script) as (port, proxies):
        client = our_client(certs, port)
        await until(lambda: "malformed capsule" in (client.tunnel.status.last_error or ""))
        await until(lambda: any(s.reset is not None for s in proxies[0].streams.values()))
        (st,) = proxies[0].streams.values()
        assert st.reset == H3_MESSAGE_ERROR
        await client.close()


async def test_settings_checked_before_the_request(certs: Path) -> None:
    requests: list[Headers] = []

    def script(proxy: StrictProxy, sid: int, headers: Headers) -> None:
        requests.append(headers)
        proxy.respond(sid, 501)

    async with strict_proxy(certs, script, datagrams=False) as (port, _proxies):
        client = our_client(certs, port)
        await until(lambda: "SETTINGS_H3_DATAGRAM" in (client.tunnel.status.last_error or ""))
        assert requests == []  # nothing sent to a proxy without H3 datagrams
        await client.close()
        # "auto" falls back to stream mode on the same kind of proxy.
        auto = our_client(certs, port, transport="auto")
        await until(lambda: bool(requests))
        assert dict(requests[0]).get(b"masqued-transport") == b"stream"
        assert b"capsule-protocol" not in dict(requests[0])
        await auto.close()


async def test_auto_uses_datagrams_when_offered(certs: Path) -> None:
    async with strict_proxy(certs, accept) as (port, proxies):
        client = our_client(certs, port, transport="auto")
        await asyncio.wait_for(client.up, 5)
        (sid,) = proxies[0].streams
        assert dict(proxies[0].streams[sid].headers[0])[b"capsule-protocol"] == b"?1"
        assert client.tunnel.snapshot()["sessions"][0]["transport"] == "datagram"
        await client.close()


async def test_a_proxy_that_closes_on_address_request_is_retried_without_it(
    certs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Some proxies end the stream when they get an ADDRESS_REQUEST (RFC 9484 §4.7.2
    wants an answer). Our client says so once and tries again without asking."""

    def script(proxy: StrictProxy, sid: int, headers: Headers) -> None:
        proxy.respond(sid, 200, [(b"capsule-protocol", b"?1")])

        def later() -> None:
            if proxy.stream(sid).capsules:  # it asked: this proxy hangs up
                proxy.send_raw(sid, b"", end=True)
            else:
                accept_capsules(proxy, sid)

        asyncio.get_running_loop().call_later(0.3, later)

    async with strict_proxy(certs, script) as (port, proxies):
        client = our_client(certs, port, address_request=True, request_versions=(4,))
        await asyncio.wait_for(client.up, 10)
        assert len(proxies) == 2
        first, second = (p.streams[min(p.streams)] for p in proxies)
        assert [kind for kind, _ in first.capsules] == [ADDRESS_REQUEST]
        assert second.capsules == []
        assert client.tunnel.without_address_request
        assert sum("right after our ADDRESS_REQUEST" in r.message for r in caplog.records) == 1
        await client.close()


def accept_capsules(proxy: StrictProxy, sid: int) -> None:
    proxy.send_capsule(sid, ADDRESS_ASSIGN, assign_value([Entry(0, V4_PREFIX)]))
    proxy.send_capsule(sid, ROUTE_ADVERTISEMENT, routes_value([ALL_V4]))


async def test_a_route_for_tcp_only_keeps_udp_out_with_icmp_from_our_side(certs: Path) -> None:
    """RFC 9484 §4.7.3 scopes each range to its protocol: with 198.51.100.0/24 for TCP
    only, our client sends TCP there, and answers UDP itself with ICMP prohibited."""
    net = ipaddress.ip_network("198.51.100.0/24")
    tcp_range = Range(4, int(net[0]), int(net[-1]), 6)

    def script(proxy: StrictProxy, sid: int, headers: Headers) -> None:
        proxy.respond(sid, 200, [(b"capsule-protocol", b"?1")])
        proxy.send_capsule(sid, ADDRESS_ASSIGN, assign_value([Entry(0, V4_PREFIX)]))
        proxy.send_capsule(sid, ROUTE_ADVERTISEMENT, routes_value([tcp_range]))

    from masqued.proto.packet import build_tcp, parse_packet

    async with strict_proxy(certs, script) as (port, proxies):
        client = our_client(certs, port, routes=(net,))
        await asyncio.wait_for(client.up, 5)
        me = str(client.params[-1].addresses[0].ip)
        tcp = build_tcp(me, "198.51.100.7", 40000, 80, b"")
        udp = build_udp(me, "198.51.100.7", 40000, 53, b"q")
        client.tun.inject(tcp, udp)
        proxy = proxies[0]
        (sid,) = proxy.streams
        await until(lambda: bool(proxy.streams[sid].datagrams) and bool(client.tun.written))
        await asyncio.sleep(0.1)
        assert [split_datagram(d)[1] for d in proxy.streams[sid].datagrams] == [tcp]
        (icmp,) = client.tun.written
        info = parse_packet(icmp)
        assert (info.icmp_type, info.icmp_code, str(info.dst)) == (3, 13, me)
        assert client.tunnel.status.counters.drops["not_routed"] == 1
        await client.close()


async def test_dns_assign_from_the_proxy_reaches_the_tunnel_params(certs: Path) -> None:
    """A proxy speaking draft-ietf-masque-connect-ip-dns-06 (connect-ip-go's layout):
    our client keeps the plain-DNS nameservers (priority order), the search and
    internal domains, and leaves out a DoH-only nameserver and a bad name."""
    doh = DnsServer(1, (), "dns.example", bytes.fromhex("0001000302683300020000"))
    plain = DnsServer(2, ("192.0.2.53", "2001:db8::53"))
    backup = DnsServer(5, ("192.0.2.54",))

    def script(proxy: StrictProxy, sid: int, headers: Headers) -> None:
        accept(proxy, sid, headers)
        configs = [
            DnsConfig((backup, doh), ("",), ("corp.example",)),
            DnsConfig((plain,), ("internal.example",), ("bad name!", "example")),
        ]
        proxy.send_capsule(sid, DNS_ASSIGN, dns_assign_value(configs))

    async with strict_proxy(certs, script) as (port, _):
        client = our_client(certs, port)
        await asyncio.wait_for(client.up, 5)
        await until(lambda: client.params[-1].dns is not None)
        dns = client.params[-1].dns
        assert dns is not None
        assert [str(s) for s in dns.servers] == ["192.0.2.53", "2001:db8::53", "192.0.2.54"]
        assert dns.search == ("corp.example", "example")
        assert dns.domains == ("", "internal.example")
        assert dns.skipped == 1
        await client.close()


async def test_a_proxy_without_dns_assign_gives_no_dns(certs: Path) -> None:
    async with strict_proxy(certs, accept) as (port, _):
        client = our_client(certs, port)
        await asyncio.wait_for(client.up, 5)
        assert client.params[-1].dns is None
        await client.close()
