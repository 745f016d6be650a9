"""Our client over HTTP/2 against a strict, scripted RFC 9484 proxy (h2 directly).

The proxy records what our client sends (SETTINGS, the request, capsules) and
answers as a third-party HTTP/2 CONNECT-IP proxy might: prefixes, unknown capsules,
refusals, malformed capsules, a proxy without extended CONNECT.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import h2.settings
import pytest
from h2.errors import ErrorCodes

from masqued.proto.packet import build_udp
from tests.conformance.h2peers import H2Peer, Headers, StrictH2Proxy, respond
from tests.conformance.wire import (
    ADDRESS_ASSIGN,
    ROUTE_ADVERTISEMENT,
    Entry,
    Range,
    assign_value,
    routes_value,
)
from tests.inproc import Client, until

V4_PREFIX = ipaddress.ip_network("192.0.2.0/28")
ALL_V4 = Range(4, 0, 2**32 - 1, 0)


def accept(peer: H2Peer, sid: int, headers: Headers) -> None:
    """A typical proxy: 200, an unprompted assignment, an unknown capsule, the routes."""
    respond(peer, sid, 200, [(b"capsule-protocol", b"?1")])
    peer.send_capsule(sid, ADDRESS_ASSIGN, assign_value([Entry(0, V4_PREFIX)]))
    peer.send_capsule(sid, 0x4D2, b"an unknown capsule to skip")
    peer.send_capsule(sid, ROUTE_ADVERTISEMENT, routes_value([ALL_V4]))


@asynccontextmanager
async def strict_proxy(
    certs: Path, script: Callable[[H2Peer, int, Headers], None], extended_connect: bool = True
) -> AsyncIterator[StrictH2Proxy]:
    proxy = StrictH2Proxy(script, extended_connect)
    await proxy.start(str(certs / "relay.example.pem"), str(certs / "relay.example.key"))
    try:
        yield proxy
    finally:
        await proxy.close()


def our_client(certs: Path, port: int, **overrides: Any) -> Client:
    """Our client against the strict peer: transport=auto, http_version=h2 unless overridden."""
    return Client(certs, port, **{"transport": "auto", "http_version": "h2", **overrides})


async def test_request_settings_and_packets(certs: Path) -> None:
    async with strict_proxy(certs, accept) as proxy:
        client = our_client(certs, proxy.port)
        await asyncio.wait_for(client.up, 5)
        (peer,) = proxy.peers
        # Our client's SETTINGS: no server push (RFC 9113 §6.5.2), and it sent the
        # CONNECT only after the proxy's SETTINGS_ENABLE_CONNECT_PROTOCOL.
        assert peer.peer_settings is not None
        assert peer.peer_settings.get(h2.settings.SettingCodes.ENABLE_PUSH) == 0
        (sid,) = peer.streams
        request = dict(peer.streams[sid].headers[0])
        assert request[b":method"] == b"CONNECT"
        assert request[b":protocol"] == b"connect-ip"  # RFC 9484 §4, RFC 8441 §4
        assert request[b":scheme"] == b"https"
        assert request[b":path"] == b"/.well-known/masque/ip/*/*/"
        assert request[b":authority"] == f"relay.example:{proxy.port}".encode()
        assert request[b"capsule-protocol"] == b"?1"  # datagram mode only over HTTP/2
        assert b"masqued-transport" not in request
        params = client.params[0]
        assert str(params.addresses[0]) == "192.0.2.1/28"  # the prefix's first host
        # Packets both ways in DATAGRAM capsules with context ID 0 (RFC 9297 §3.5).
        out = build_udp("192.0.2.1", "198.19.0.2", 1000, 9, b"up")
        client.tun.inject(out)
        await until(lambda: peer.packets(sid) == [(0, out)])
        back = build_udp("198.19.0.2", "192.0.2.1", 9, 1000, b"down")
        peer.send_packet(sid, back)
        await until(lambda: list(client.tun.written) == [back])
        snap = client.tunnel.snapshot()["sessions"][0]
        assert (snap["transport"], snap["http"]) == ("datagram", "h2")
        await client.close()


async def test_a_proxy_without_extended_connect_gets_no_request(certs: Path) -> None:
    requests: list[Headers] = []

    def script(peer: H2Peer, sid: int, headers: Headers) -> None:
        requests.append(headers)
        respond(peer, sid, 501)

    async with strict_proxy(certs, script, extended_connect=False) as proxy:
        client = our_client(certs, proxy.port)
        await until(lambda: "extended CONNECT" in (client.tunnel.status.last_error or ""))
        assert requests == []  # RFC 8441 §4: not before the setting
        await client.close()


@pytest.mark.parametrize(
    ("status", "headers", "expected"),
    [
        (403, [], "status 403"),
        (401, [(b"www-authenticate", b'Bearer realm="x"')], "status 401"),
        (200, [], "without capsule-protocol"),
    ],
)
async def test_refusals_and_bad_responses(
    certs: Path, status: int, headers: Headers, expected: str
) -> None:
    def script(peer: H2Peer, sid: int, _: Headers) -> None:
        respond(peer, sid, status, headers)

    async with strict_proxy(certs, script) as proxy:
        client = our_client(certs, proxy.port)
        await until(lambda: expected in (client.tunnel.status.last_error or ""))
        assert not client.up.done()
        await client.close()


async def test_malformed_capsule_resets_the_stream(certs: Path) -> None:
    def script(peer: H2Peer, sid: int, _: Headers) -> None:
        respond(peer, sid, 200, [(b"capsule-protocol", b"?1")])
        # Routes out of order: RFC 9484 §4.7.3 says abort.
        peer.send_capsule(
            sid, ROUTE_ADVERTISEMENT, routes_value([Range(4, 9, 10, 0), Range(4, 1, 2, 0)])
        )

    async with strict_proxy(certs, script) as proxy:
        client = our_client(certs, proxy.port)
        await until(lambda: "malformed capsule" in (client.tunnel.status.last_error or ""))
        await until(lambda: any(s.reset is not None for s in proxy.peers[0].streams.values()))
        (st,) = proxy.peers[0].streams.values()
        assert st.reset == ErrorCodes.PROTOCOL_ERROR  # RFC 9113 §8.1.1
        await client.close()


async def test_stream_transport_still_uses_capsules_over_h2_in_auto(certs: Path) -> None:
    """transport = "stream" is HTTP/3-only: a client that fell back to HTTP/2 asks
    for datagram mode (capsules), which every RFC 9484 proxy speaks."""
    async with strict_proxy(certs, accept) as proxy:
        client = our_client(certs, proxy.port, transport="stream")
        await asyncio.wait_for(client.up, 5)
        (sid,) = proxy.peers[0].streams
        assert dict(proxy.peers[0].streams[sid].headers[0])[b"capsule-protocol"] == b"?1"
        await client.close()
