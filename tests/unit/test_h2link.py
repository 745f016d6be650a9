"""The HTTP/2 link's bounds, in-process over loopback TCP: what a peer that stops
granting flow-control credit, or stops reading, can make the relay hold; and the
TCP endpoint's limits (per address, pending, requests per connection, held bytes)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from masqued.proto.packet import build_udp
from masqued.transport.dataplane import BacklogBound
from masqued.transport.h2link import H2Link, h2_code
from masqued.transport.limits import EndpointLimits, ReceiveLimits
from tests.conformance.h2peers import StrictH2Client
from tests.conformance.wire import ADDRESS_ASSIGN, parse_address_list
from tests.inproc import Client, Relay, until

TARGET = "198.19.0.2"


@pytest.fixture
async def relay(certs: Path) -> Relay:  # type: ignore[misc]
    r = Relay(certs, ("198.18.200.0/24",))
    yield r
    r.close()


async def tunnel(
    relay: Relay, certs: Path, window: int = 1 << 20
) -> tuple[StrictH2Client, int, str]:
    c = await StrictH2Client.connect("127.0.0.1", relay.port, str(certs / "ca.pem"), window=window)
    await c.wait(lambda: c.peer_settings is not None)
    sid = c.connect_ip()
    st = c.stream(sid)
    await c.wait(lambda: len(st.capsules) >= 2)
    assert st.capsules[0][0] == ADDRESS_ASSIGN
    addr = str(parse_address_list(st.capsules[0][1], request=False)[0].network.network_address)
    return c, sid, addr


def relay_link(relay: Relay) -> H2Link:
    (session,) = relay.server.sessions
    assert isinstance(session.link, H2Link)
    return session.link


async def test_a_peer_granting_no_credit_holds_at_most_the_bound(relay: Relay, certs: Path) -> None:
    """DATA the peer's windows keep back waits in the link, counted in the stream's
    backlog: beyond the bound packets are tail-dropped, not queued."""
    c, sid, addr = await tunnel(relay, certs, window=65535)
    c.acknowledge = False  # no WINDOW_UPDATE ever
    link = relay_link(relay)
    packet = build_udp(TARGET, addr, 9, 1000, b"x" * 1200)
    room = BacklogBound.GRACE_FACTOR * BacklogBound.FLOOR
    burst = 6 * room // len(packet)
    for _ in range(burst // 200):
        relay.tun.inject(*[packet] * 200)
        await asyncio.sleep(0.005)
    (session,) = relay.server.sessions
    drops = session.counters.drops
    await until(lambda: drops["queue_full"] + session.counters.tx_packets >= burst // 200 * 200)
    assert drops["queue_full"] > 0
    # What the h2 window let out, plus what waits for credit, within twice the floor.
    assert link.pending_bytes <= room
    assert link.stream_backlog(sid) <= room + 65535 + 2 * 1024
    await c.close()


async def test_a_peer_that_stops_reading_is_bounded_too(relay: Relay, certs: Path) -> None:
    """The peer reads nothing more: the kernel's buffers fill, then ours would; the
    bound (unacknowledged bytes included) drops instead."""
    c, sid, addr = await tunnel(relay, certs)
    c.task.cancel()  # reads no more: TCP's window closes
    link = relay_link(relay)
    packet = build_udp(TARGET, addr, 9, 1000, b"y" * 1200)
    (session,) = relay.server.sessions
    drops = session.counters.drops
    for _ in range(200):
        relay.tun.inject(*[packet] * 100)
        await asyncio.sleep(0.002)
        if drops["queue_full"] > 1000:
            break
    await until(lambda: drops["queue_full"] > 1000, timeout=20)
    # Held in this process: the TLS buffer and DATA waiting for h2's window.
    held = link.pipe.unsent + link.pending_bytes
    assert held <= BacklogBound.GRACE_FACTOR * BacklogBound.CEILING
    assert link.stream_backlog(sid) <= BacklogBound.GRACE_FACTOR * BacklogBound.CEILING + 65535
    await c.close()


def test_http3_codes_map_to_http2_codes() -> None:
    # RFC 9114 §A.4 both ways for what we send; HTTP/2 codes pass as they are.
    assert h2_code(0x10E) == 0x1  # H3_MESSAGE_ERROR -> PROTOCOL_ERROR
    assert h2_code(0x10C) == 0x8  # H3_REQUEST_CANCELLED -> CANCEL
    assert h2_code(0x10B) == 0x7  # H3_REQUEST_REJECTED -> REFUSED_STREAM
    assert h2_code(0x107) == 0xB  # H3_EXCESSIVE_LOAD -> ENHANCE_YOUR_CALM
    assert h2_code(0x100) == 0x0
    assert h2_code(0x8) == 0x8
    assert h2_code(0x4242) == 0x1  # unknown: a protocol error


async def test_per_address_and_pending_limits(certs: Path) -> None:
    limits = EndpointLimits(max_tcp_per_address=3, max_pending_per_address=2)
    relay = Relay(certs, ("198.18.200.0/24",), limits=limits)
    try:
        socks = []
        for _ in range(5):
            s = socket.create_connection(("127.0.0.1", relay.port))
            socks.append(s)
        await until(lambda: relay.server.results.get("tcp_refused", 0) == 3)
        assert relay.server.tcp is not None
        assert len(relay.server.tcp.connections()) == 2
        for s in socks:
            s.close()
    finally:
        relay.close()


async def test_tls_handshake_timeout_and_admission_timeout(certs: Path) -> None:
    limits = EndpointLimits(handshake_timeout=0.5, admission_timeout=0.5)
    relay = Relay(certs, ("198.18.200.0/24",), limits=limits)
    try:
        silent = socket.create_connection(("127.0.0.1", relay.port))  # never says hello
        idle = await StrictH2Client.connect("127.0.0.1", relay.port, str(certs / "ca.pem"))
        await until(lambda: relay.server.results.get("tls_handshake_timeout", 0) == 1)
        await until(lambda: relay.server.results.get("admission_timeout", 0) == 1)
        await idle.wait(lambda: idle.goaway is not None)
        assert idle.goaway == 0  # NO_ERROR: just nothing asked in time
        silent.settimeout(5)
        assert silent.recv(100) == b""  # closed
        assert relay.server.tcp is not None and relay.server.tcp.connections() == []
        silent.close()
        await idle.close()
    finally:
        relay.close()


async def test_requests_per_connection_are_capped(certs: Path) -> None:
    limits = EndpointLimits(max_requests_per_connection=3)
    relay = Relay(certs, ("198.18.200.0/24",), limits=limits)
    try:
        c = await StrictH2Client.connect("127.0.0.1", relay.port, str(certs / "ca.pem"))
        await c.wait(lambda: c.peer_settings is not None)
        for _ in range(4):
            sid = c.connect_ip(path="/nowhere")  # each refused with 404 ...
            await c.wait(
                lambda sid=sid: bool(c.stream(sid).headers) or c.goaway is not None  # type: ignore[misc]
            )
        # ... and the fourth ends the connection (no rapid reset loops).
        await c.wait(lambda: c.goaway is not None)
        assert c.goaway == 0xB  # ENHANCE_YOUR_CALM
        assert relay.server.results.get("limit_exceeded") == 1
        await c.close()
    finally:
        relay.close()


async def test_a_header_block_that_never_ends_is_cut_off(certs: Path) -> None:
    """HEADERS without END_HEADERS then CONTINUATIONs: h2 keeps the block until it
    ends; past the pre-admission bound the connection is closed."""
    limits = EndpointLimits(receive=ReceiveLimits(max_held=32 * 1024))
    relay = Relay(certs, ("198.18.200.0/24",), limits=limits)
    try:
        c = await StrictH2Client.connect("127.0.0.1", relay.port, str(certs / "ca.pem"))
        await c.wait(lambda: c.peer_settings is not None)

        def frame(kind: int, flags: int, payload: bytes) -> bytes:
            head = len(payload).to_bytes(3, "big") + bytes((kind, flags))
            return head + (1).to_bytes(4, "big") + payload

        c.send_frame_bytes(frame(0x1, 0, b"\x00" * 16000))
        for _ in range(8):
            c.send_frame_bytes(frame(0x9, 0, b"\x00" * 16000))
        await c.wait(lambda: c.goaway is not None or c.closed)
        assert c.goaway == 0xB  # ENHANCE_YOUR_CALM
        assert relay.server.results.get("limit_exceeded") == 1
        await c.close()
    finally:
        relay.close()


async def test_delivery_is_timed_by_credit_only_from_peers_that_say_so(
    relay: Relay, certs: Path
) -> None:
    """Our client returns credit per read and says so in its SETTINGS: the relay times
    delivery by it. A peer that does not (here one with an 8 MiB window and h2's
    half-window updates) is timed by TCP's acknowledgements, and its downlink flows
    rather than waiting for credit that comes only every 4 MiB."""
    ours = Client(certs, relay.port, transport="datagram", http_version="h2")
    await asyncio.wait_for(ours.up, 5)
    (session,) = relay.server.sessions
    assert isinstance(session.link, H2Link) and session.link.credit_timed
    packet = build_udp(TARGET, str(ours.address), 9, 1000, b"z" * 1200)
    for _ in range(20):
        relay.tun.inject(*[packet] * 50)
        await asyncio.sleep(0.002)
    await until(lambda: len(ours.tun.written) + session.counters.drops["queue_full"] >= 1000)
    link = session.link
    await until(lambda: link.data_consumed == link.data_sent)  # all credit came back
    await ours.close()

    c, sid, addr = await tunnel(relay, certs, window=8 << 20)
    link = relay_link(relay)
    assert not link.credit_timed
    packet = build_udp(TARGET, addr, 9, 1000, b"w" * 1200)
    sent = 0
    while sent < 6000:  # about 7 MiB
        relay.tun.inject(*[packet] * 100)
        sent += 100
        await asyncio.sleep(0.003)
    await c.wait(lambda: len(c.packets(sid)) >= 3000, timeout=20)
    await c.close()
