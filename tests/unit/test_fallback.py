"""The client's choice of HTTP version (http_version = "auto"), in-process: a relay
serving HTTP/3 and HTTP/2 on loopback, and a UDP gate in front of it that the test
opens and closes like a network that blocks UDP. Outcomes are checked (which
version, why, which address, what the relay holds), not how long anything took."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from masqued.gate.access import AccessControl
from masqued.gate.auth import new_token
from masqued.proto.packet import build_udp
from tests.inproc import Client, Relay, UdpGate, relay_config, until

TARGET = "198.19.0.2"
FAST = {"fallback_after": 0.3, "reconnect_max": 0.3, "transport": "datagram"}


@pytest.fixture
async def relay(certs: Path) -> AsyncIterator[Relay]:
    r = Relay(certs, ("198.18.200.0/24",))
    yield r
    r.close()


@pytest.fixture
async def gate(relay: Relay) -> AsyncIterator[UdpGate]:
    g = UdpGate(relay.port)
    yield g
    g.close()


def session_http(client: Client) -> str | None:
    http: str | None = client.tunnel.snapshot()["sessions"][0]["http"]
    return http


async def ping_through(client: Client, relay: Relay, tag: bytes) -> None:
    pkt = build_udp(client.address, TARGET, 1000, 9, tag)
    client.tun.inject(pkt)
    await until(lambda: pkt in relay.tun.written)


async def test_udp_blocked_falls_back_to_h2(relay: Relay, gate: UdpGate, certs: Path) -> None:
    gate.open = False
    client = Client(certs, gate.port, h2_port=relay.port, **FAST)
    await asyncio.wait_for(client.up, 5)
    assert session_http(client) == "h2"
    reason = client.tunnel.status.http_reason or ""
    assert "fallback to HTTP/2" in reason and "no QUIC handshake within 0.3s" in reason
    assert client.tunnel.h3_blocked  # the next race gives HTTP/3 no head start
    assert gate.dropped > 0
    await ping_through(client, relay, b"over-h2")
    (session,) = relay.server.sessions
    assert session.link.http_version == "h2"
    await client.close()


async def test_udp_working_stays_on_h3_and_never_opens_tcp(
    relay: Relay, gate: UdpGate, certs: Path
) -> None:
    client = Client(certs, gate.port, h2_port=relay.port, **FAST)
    await asyncio.wait_for(client.up, 5)
    assert session_http(client) == "h3"
    assert client.tunnel.status.http_reason == "HTTP/3 (auto)"
    await ping_through(client, relay, b"over-h3")
    assert relay.server.tcp is not None and relay.server.tcp.connections() == []
    await client.close()


async def test_back_to_h3_when_udp_returns_with_the_same_address(
    certs: Path, tmp_path: Path
) -> None:
    """With an identity the relay gives the new HTTP/3 tunnel the address of the old
    HTTP/2 one (it replaces it): the client's TUN and routes see no change at all."""
    token, line = new_token("alice")
    (tmp_path / "tokens").write_text(line + "\n")
    (tmp_path / "alice.token").write_text(token + "\n")
    access = AccessControl(relay_config(certs, auth=("token",), tokens_file=tmp_path / "tokens"))
    relay = Relay(certs, ("198.18.200.0/24",), access=access)
    gate = UdpGate(relay.port, open=False)
    try:
        client = Client(
            certs,
            gate.port,
            token_file=tmp_path / "alice.token",
            h2_port=relay.port,
            h3_retry=0.5,
            **FAST,
        )
        await asyncio.wait_for(client.up, 5)
        assert session_http(client) == "h2"
        before = client.address
        gate.open = True
        await until(lambda: session_http(client) == "h3", timeout=15)
        assert client.tunnel.status.http_reason == "back on HTTP/3: a probe got a tunnel over it"
        assert client.tunnel.status.state == "connected"
        assert not client.tunnel.h3_blocked
        # The host state was set once: the relay's answer over HTTP/3 was the same.
        assert len(client.params) == 1 and client.address == before
        await until(lambda: len(relay.server.sessions) == 1 and relay.pool.used() == 1)
        (session,) = relay.server.sessions
        assert session.link.http_version == "h3"
        assert session.identity.name == "alice"
        await ping_through(client, relay, b"back-on-h3")
        assert relay.server.tcp is not None
        await until(lambda: relay.server.tcp.connections() == [])  # type: ignore[union-attr]
        await client.close()
    finally:
        gate.close()
        relay.close()


async def test_a_refusal_over_h3_is_final(certs: Path, tmp_path: Path) -> None:
    """The relay answered over HTTP/3: its 401 holds for HTTP/2 too; no fallback."""
    _, line = new_token("alice")
    (tmp_path / "tokens").write_text(line + "\n")
    access = AccessControl(relay_config(certs, auth=("token",), tokens_file=tmp_path / "tokens"))
    relay = Relay(certs, ("198.18.200.0/24",), access=access)
    try:
        client = Client(certs, relay.port, **FAST)
        await until(lambda: "401" in (client.tunnel.status.last_error or ""))
        assert relay.server.tcp is not None and relay.server.tcp.connections() == []
        assert relay.server.results.get("auth_failed", 0) >= 1
        assert not client.up.done()
        await client.close()
    finally:
        relay.close()


async def test_neither_reachable_says_why_for_both(certs: Path) -> None:
    relay = Relay(certs, ("198.18.200.0/24",), tcp=False)
    gate = UdpGate(relay.port, open=False)
    try:
        client = Client(certs, gate.port, h2_port=relay.port, **FAST)
        await until(lambda: "HTTP/2" in (client.tunnel.status.last_error or ""), timeout=15)
        error = client.tunnel.status.last_error or ""
        assert "HTTP/3: no QUIC handshake within 0.3s" in error
        assert "HTTP/2: cannot reach relay over TCP" in error
        assert not client.up.done()
        await client.close()
    finally:
        gate.close()
        relay.close()


async def test_configured_versions_use_only_their_own(
    relay: Relay, gate: UdpGate, certs: Path
) -> None:
    gate.open = False
    h3 = Client(certs, gate.port, h2_port=relay.port, http_version="h3", **FAST)
    h2 = Client(certs, gate.port, h2_port=relay.port, http_version="h2", **FAST)
    await asyncio.wait_for(h2.up, 5)
    assert session_http(h2) == "h2" and h2.tunnel.status.http_reason == 'http_version = "h2"'
    await until(lambda: "UDP blocked" in (h3.tunnel.status.last_error or ""), timeout=15)
    assert not h3.up.done()
    assert all(s.link.http_version == "h2" for s in relay.server.sessions)
    await h3.close()
    await h2.close()
