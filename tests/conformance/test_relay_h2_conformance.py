"""Our relay over HTTP/2 against a strict, independent RFC 9484 client (h2 directly).

The HTTP/3 checks of test_relay_conformance.py where HTTP/2 has them (SETTINGS,
the 2xx, capsule order and validity, unknown capsules skipped, malformed ones
aborting only their stream, DATAGRAM capsules both ways, scope, Packet Too Big,
BCP 38), plus what only HTTP/2 has: RFC 8441's SETTINGS_ENABLE_CONNECT_PROTOCOL,
the first frame being SETTINGS, ALPN, and malformed frames ending the connection
with the right error code (RFC 9113 §5.4) without touching other connections.
"""

from __future__ import annotations

import ipaddress
import ssl
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import h2.settings
import pytest
from h2.errors import ErrorCodes

from masqued.proto.packet import build_icmp_echo, build_tcp, build_udp, parse_packet
from masqued.transport.h2link import H2Link
from tests.conformance.conftest import RELAY_MTU, OurRelay
from tests.conformance.h2peers import FRAME_SETTINGS, StrictH2Client, client_tls
from tests.conformance.wire import (
    ADDRESS_ASSIGN,
    ADDRESS_REQUEST,
    DATAGRAM,
    ROUTE_ADVERTISEMENT,
    Range,
    assign_value,
    capsule,
    parse_address_list,
    parse_routes,
    routes_value,
    varint,
)

TARGET = "198.19.0.2"


@asynccontextmanager
async def strict_client(relay: OurRelay, certs: Path) -> AsyncIterator[StrictH2Client]:
    c = await StrictH2Client.connect("127.0.0.1", relay.tcp_port, str(certs / "ca.pem"))
    try:
        await c.wait(lambda: c.peer_settings is not None)
        yield c
    finally:
        await c.close()


async def open_tunnel(
    c: StrictH2Client, path: str = "/.well-known/masque/ip/*/*/"
) -> tuple[int, str]:
    """Request; check the 2xx and the first capsules; return the stream and the IPv4."""
    sid = c.connect_ip(path)
    st = c.stream(sid)
    await c.wait(lambda: len(st.capsules) >= 2 or st.reset is not None)
    headers = dict(st.headers[0])
    assert headers[b":status"] == b"200"
    assert headers[b"capsule-protocol"] == b"?1"  # RFC 9297 §3.4
    assert b"content-length" not in headers  # RFC 9297 §3.2
    (kind, value), (kind2, value2) = st.capsules[:2]
    assert (kind, kind2) == (ADDRESS_ASSIGN, ROUTE_ADVERTISEMENT)  # RFC 9484 §4.7
    entries = parse_address_list(value, request=False)
    assert {e.request_id for e in entries} == {0}
    parse_routes(value2)
    v4 = next(e.network for e in entries if e.network.version == 4)
    return sid, str(v4.network_address)


async def test_alpn_settings_and_first_frame(relay: OurRelay, certs: Path) -> None:
    async with strict_client(relay, certs) as c:
        settings = c.peer_settings
        assert settings is not None
        assert settings.get(h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL) == 1  # RFC 8441 §3
        assert settings.get(h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS, 0) >= 1
        assert c.first_frame_type == FRAME_SETTINGS  # RFC 9113 §3.4: the server preface


async def test_a_client_without_alpn_h2_is_refused(relay: OurRelay, certs: Path) -> None:
    import asyncio

    ctx = client_tls(str(certs / "ca.pem"), alpn=("http/1.1",))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", relay.tcp_port, ssl=ctx, server_hostname="relay.example"
        )
        writer.write(b"GET / HTTP/1.1\r\nHost: relay.example\r\n\r\n")
        await writer.drain()
        data = await asyncio.wait_for(reader.read(100), 5)
        if not data:
            raise ConnectionError("closed")
        raise AssertionError(f"the relay answered HTTP/1.1: {data!r}")


async def test_tunnel_capsules_and_packets_both_ways(relay: OurRelay, certs: Path) -> None:
    async with strict_client(relay, certs) as c:
        sid, addr = await open_tunnel(c)
        routes = parse_routes(c.stream(sid).capsules[1][1])
        assert routes[0] == Range(
            4, int(ipaddress.ip_address("198.19.0.0")), int(ipaddress.ip_address("198.19.0.255")), 0
        )
        out = build_udp(addr, TARGET, 4000, 53, b"ping")
        c.send_packet(sid, out)
        await c.wait(lambda: len(relay.tun.written) == 1)
        assert relay.tun.written[0] == out
        relay.tun.inject(build_udp(TARGET, addr, 53, 4000, b"pong", ttl=9))
        await c.wait(lambda: len(c.packets(sid)) == 1)
        ctx, pkt = c.packets(sid)[0]
        assert ctx == 0
        assert pkt.endswith(b"pong") and parse_packet(pkt).ttl == 8  # hop limit (§7.2)
        (session,) = relay.server.sessions
        assert relay.server.snapshot()["sessions"][0]["http"] == "h2"
        assert session.link.http_version == "h2"


async def test_address_request_answered_and_reuse_aborts(relay: OurRelay, certs: Path) -> None:
    async with strict_client(relay, certs) as c:
        sid, addr = await open_tunnel(c)
        st = c.stream(sid)
        any_v4 = varint(7) + b"\x04" + bytes(4) + b"\x20"
        cannot = varint(9) + b"\x04" + bytes([203, 0, 113, 0]) + b"\x18"
        c.send_capsule(sid, ADDRESS_REQUEST, any_v4 + cannot)
        await c.wait(lambda: len(st.capsules) >= 3)
        kind, value = st.capsules[2]
        assert kind == ADDRESS_ASSIGN
        by_id = {e.request_id: e.network for e in parse_address_list(value, request=False)}
        assert str(by_id[7]) == f"{addr}/32"
        assert str(by_id[9]) == "0.0.0.0/32"  # a rejection (§4.7.2)
        c.send_capsule(sid, ADDRESS_REQUEST, varint(7) + b"\x04" + bytes(4) + b"\x20")
        await c.wait(lambda: st.reset is not None)
        # A malformed message is a stream error of type PROTOCOL_ERROR (RFC 9113 §8.1.1).
        assert st.reset == ErrorCodes.PROTOCOL_ERROR


async def test_unknown_capsules_are_skipped(relay: OurRelay, certs: Path) -> None:
    async with strict_client(relay, certs) as c:
        sid, addr = await open_tunnel(c)
        big = capsule(0x17C5, b"y" * 3000)
        c.send_raw(sid, capsule(0x29, b"x" * 50) + big[:1000])
        c.send_raw(sid, big[1000:])
        pkt = build_udp(addr, TARGET, 4000, 53, b"after-unknown")
        c.send_packet(sid, pkt)
        await c.wait(lambda: len(relay.tun.written) == 1)
        assert relay.tun.written[0] == pkt
        assert c.stream(sid).reset is None


async def test_malformed_capsules_abort_only_that_stream(relay: OurRelay, certs: Path) -> None:
    bad = [
        (ROUTE_ADVERTISEMENT, b"\x04" + bytes([10, 0, 0, 9]) + bytes([10, 0, 0, 1]) + b"\x00"),
        (ROUTE_ADVERTISEMENT, routes_value([Range(4, 5, 9, 0), Range(4, 1, 3, 0)])),
        (ADDRESS_REQUEST, b""),
        (ADDRESS_ASSIGN, varint(0) + b"\x04" + bytes([10, 0, 0, 1]) + b"\x18"),
    ]
    async with strict_client(relay, certs) as c:
        for kind, value in bad:
            sid, _ = await open_tunnel(c)
            c.send_capsule(sid, kind, value)
            await c.wait(lambda sid=sid: c.stream(sid).reset is not None)  # type: ignore[misc]
            assert c.stream(sid).reset == ErrorCodes.PROTOCOL_ERROR, (kind, value)
        # The stream ending inside a capsule is malformed too (RFC 9297 §3.3).
        sid, _ = await open_tunnel(c)
        c.send_raw(sid, capsule(ADDRESS_ASSIGN, assign_value([]))[:1] + b"\x10abc", end=True)
        await c.wait(lambda: c.stream(sid).reset is not None)
        # The connection carries on.
        sid, addr = await open_tunnel(c)
        c.send_packet(sid, build_udp(addr, TARGET, 1, 2, b"still-works"))
        await c.wait(lambda: any(p.endswith(b"still-works") for p in relay.tun.written))
        assert c.goaway is None


async def test_oversized_control_capsule_refused_before_its_body(
    relay: OurRelay, certs: Path
) -> None:
    """A capsule claiming 1 MiB is refused on its header: the relay does not wait for
    (or buffer) the body, it resets the stream at once."""
    async with strict_client(relay, certs) as c:
        sid, _ = await open_tunnel(c)
        c.send_raw(sid, varint(ADDRESS_REQUEST) + varint(1 << 20) + b"\x01")
        await c.wait(lambda: c.stream(sid).reset is not None)
        assert c.stream(sid).reset == ErrorCodes.PROTOCOL_ERROR
        # An oversized DATAGRAM capsule is skipped as it streams by, never buffered.
        sid, addr = await open_tunnel(c)
        c.send_raw(sid, varint(DATAGRAM) + varint(200_000))
        for _ in range(20):
            c.send_raw(sid, b"\x00" * 10_000)
        pkt = build_udp(addr, TARGET, 1, 2, b"after-the-skip")
        c.send_packet(sid, pkt)
        await c.wait(lambda: any(p == pkt for p in relay.tun.written))
        assert c.stream(sid).reset is None
        (session,) = relay.server.sessions
        assert session.counters.drops["oversized"] == 1
        assert isinstance(session.link, H2Link) and session.link.held() < 20_000


async def test_scope_packet_too_big_and_bcp38(relay: OurRelay, certs: Path) -> None:
    async with strict_client(relay, certs) as c:
        sid, addr = await open_tunnel(c, "/.well-known/masque/ip/198.19.0.0%2F24/17/")
        inside = build_udp(addr, TARGET, 1, 53, b"in-scope")
        c.send_packet(sid, build_tcp(addr, TARGET, 1, 80))  # outside the protocol scope
        c.send_packet(sid, build_udp("198.18.200.99", TARGET, 1, 53, b"spoofed"))
        c.send_packet(sid, build_icmp_echo(addr, TARGET, 1, 1))
        c.send_packet(sid, inside)
        await c.wait(lambda: len(relay.tun.written) == 2)
        assert relay.tun.written[1] == inside
        drops = next(iter(relay.server.sessions)).counters.drops
        assert (drops["out_of_scope"], drops["spoofed_source"]) == (1, 1)
        big = build_udp(addr, TARGET, 1, 53, b"z" * (RELAY_MTU + 60))
        c.send_packet(sid, big)

        def icmp_codes() -> list[tuple[int, int]]:
            infos = [parse_packet(p) for _, p in c.packets(sid)]
            return [(i.icmp_type, i.icmp_code) for i in infos if i.proto == 1]

        # Packet Too Big (3/4) for the big one, beside the administratively
        # prohibited (3/13) the out-of-scope TCP packet may have got.
        await c.wait(lambda: (3, 4) in icmp_codes())
        assert set(icmp_codes()) <= {(3, 4), (3, 13)}
        assert len(relay.tun.written) == 2


async def test_refusals(relay: OurRelay, certs: Path) -> None:
    async with strict_client(relay, certs) as c:
        cases = [
            (dict(protocol=b"connect-udp"), b"501"),
            (dict(path="/elsewhere"), b"404"),
            (dict(path="/.well-known/masque/ip/198.19.0.1%2F24/17/"), b"400"),
            # Stream mode needs HTTP/3: over HTTP/2 packets travel in capsules.
            (dict(capsule_protocol=False, extra=[(b"masqued-transport", b"stream")]), b"400"),
        ]
        for kwargs, status in cases:
            sid = c.connect_ip(**kwargs)  # type: ignore[arg-type]
            await c.wait(lambda sid=sid: bool(c.stream(sid).headers))  # type: ignore[misc]
            assert dict(c.stream(sid).headers[0])[b":status"] == status, kwargs
            await c.wait(lambda sid=sid: c.stream(sid).ended)  # type: ignore[misc]
        assert relay.pool.used() == 0


async def test_clean_close_releases_the_address(relay: OurRelay, certs: Path) -> None:
    async with strict_client(relay, certs) as c:
        sid, _ = await open_tunnel(c)
        assert relay.pool.used() == 1
        c.send_raw(sid, b"", end=True)
        await c.wait(lambda: c.stream(sid).ended)
        assert relay.pool.used() == 0


def frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    """One HTTP/2 frame (RFC 9113 §4.1), however wrong."""
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes((kind, flags))
        + struct.pack(">I", stream_id)
        + payload
    )


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (frame(0x0, 0, 0, b"data on stream 0"), ErrorCodes.PROTOCOL_ERROR),  # §6.1
        (frame(0x4, 0, 0, b"\x00\x04\x80\x00\x00\x00"), ErrorCodes.FLOW_CONTROL_ERROR),  # §6.5.2
        (frame(0x4, 0, 0, b"\x00\x05"), ErrorCodes.FRAME_SIZE_ERROR),  # §6.5
        (frame(0x1, 0x4, 1, b"\xff\xff\xff\xff"), ErrorCodes.COMPRESSION_ERROR),  # §4.3
        (frame(0x0, 0, 1, b"x" * 16385), ErrorCodes.FRAME_SIZE_ERROR),  # above our max
        # Refused on its header alone: the 1 MiB announced never has to arrive.
        (
            frame(0x0, 0, 1, b"x" * 100)[:9].replace(b"\x00\x00\x64", b"\x10\x00\x00"),
            ErrorCodes.FRAME_SIZE_ERROR,
        ),
        (frame(0x9, 0x4, 1, b""), ErrorCodes.PROTOCOL_ERROR),  # CONTINUATION alone, §6.10
    ],
)
async def test_malformed_frames_end_that_connection_with_the_right_code(
    relay: OurRelay, certs: Path, raw: bytes, code: int
) -> None:
    async with strict_client(relay, certs) as bystander:
        sid, addr = await open_tunnel(bystander)
        async with strict_client(relay, certs) as c:
            c.send_frame_bytes(raw)
            await c.wait(lambda: c.goaway is not None or c.closed)
            assert c.goaway == code
            await c.wait(lambda: c.closed)
        assert relay.server.results.get("h2_protocol_error", 0) >= 1
        # The other connection and its tunnel are untouched.
        bystander.send_packet(sid, build_udp(addr, TARGET, 1, 2, b"unaffected"))
        await bystander.wait(lambda: any(p.endswith(b"unaffected") for p in relay.tun.written))
        assert bystander.goaway is None
