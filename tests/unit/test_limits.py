"""What an unauthenticated peer can make the relay hold or do, in one event loop over
loopback UDP: receive windows, stream counts, incomplete messages, Initial floods,
malformed certificates, and errors that must stay inside one connection."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aioquic.quic.packet import QuicErrorCode

from masqued.gate import pki
from masqued.gate.access import AccessControl
from masqued.gate.auth import new_token
from masqued.proto.packet import build_udp
from masqued.transport.limits import EndpointLimits, ReceiveLimits
from masqued.transport.quic import H3_EXCESSIVE_LOAD
from tests.abuse import attack
from tests.inproc import Client, Relay, relay_config, until

POOL = ("198.18.200.0/24",)
TARGET = "198.19.0.2"


class LoopErrors:
    """Exceptions that escaped to the event loop (a callback such as the UDP batch
    handler raised): none may."""

    def __init__(self) -> None:
        self.errors: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: self.errors.append(ctx))


@pytest.fixture
async def relay(certs: Path) -> AsyncIterator[Relay]:
    r = Relay(certs, POOL)
    yield r
    r.close()


async def passes_traffic(client: Client, relay: Relay, n: int = 5) -> None:
    """``n`` packets from the client reach the relay's TUN."""
    await asyncio.wait_for(client.up, 5)
    before = len(relay.tun.written)
    for i in range(n):
        client.tun.inject(build_udp(str(client.address), TARGET, 1000 + i, 53, b"x" * 100))
    await until(lambda: len(relay.tun.written) >= before + n)


async def test_stream_gaps_earn_no_credit_beyond_the_first_window(
    relay: Relay, certs: Path
) -> None:
    """A peer that sends single bytes at the end of each window (never filling the
    gaps) is held to the pre-admission connection window: aioquic alone doubled the
    windows every round trip (16 MiB -> 1 GiB in 6 rounds here)."""
    errors = LoopErrors()
    legit = Client(certs, relay.port)
    peer = await attack.connected(relay.addr, attack.client_config("relay.example", None))
    try:
        result = await attack.gap_flood(peer, streams=4, rounds=6)
        limits = ReceiveLimits()
        assert result.claimed <= limits.connection_window
        assert relay.server.ledger.total <= limits.connection_window + limits.max_held
        await passes_traffic(legit, relay)
    finally:
        peer.close()
        await legit.close()
    assert errors.errors == []


async def test_more_streams_than_allowed_close_the_connection(relay: Relay) -> None:
    peer = await attack.connected(relay.addr, attack.client_config("relay.example", None))
    try:
        code = await attack.many_streams(peer, streams=ReceiveLimits().bidi_streams + 12)
    finally:
        peer.close()
    assert code == QuicErrorCode.STREAM_LIMIT_ERROR
    await until(lambda: relay.server.results.get("limit_exceeded", 0) == 1)
    assert relay.server.connections == {}  # dropped at once, nothing kept for it


async def test_incomplete_headers_frames_earn_no_credit_and_are_cut_off(certs: Path) -> None:
    """HEADERS claiming 1 GiB, sent in order: QUIC delivers it but HTTP/3 keeps it
    until the frame is whole, so it is not consumed: the stream gets no credit past
    its first window (aioquic alone raised it as QUIC delivered), and once such
    frames hold more than ``max_held`` the relay closes with H3_EXCESSIVE_LOAD."""
    receive = ReceiveLimits(stream_window=16 * 1024, max_held=24 * 1024)
    relay = Relay(certs, POOL, limits=EndpointLimits(receive=receive))
    config = attack.client_config("relay.example", None)
    try:
        one = await attack.connected(relay.addr, config)
        code = await attack.incomplete_headers(one, 1 << 30, send=256 * 1024)
        stalled = one.quic._streams[0].max_stream_data_remote
        one.close()
        assert code is None and stalled == receive.stream_window
        two = await attack.connected(relay.addr, config)
        codes = await asyncio.gather(
            attack.incomplete_headers(two, 1 << 30, send=256 * 1024),
            attack.incomplete_headers(two, 1 << 30, send=256 * 1024),
        )
        two.close()
        assert H3_EXCESSIVE_LOAD in codes
        assert relay.server.results.get("limit_exceeded") == 1
    finally:
        relay.close()


async def test_a_client_hello_claiming_16_mib_is_refused(relay: Relay) -> None:
    """TLS buffers a handshake message until it is whole; the claim is refused once
    what waits passes ``max_held``, and the connection's state is dropped."""
    await attack.huge_client_hello(relay.addr, total=256 * 1024)
    # Each connection is refused once its claim passes the limit, and its state is
    # dropped at once (the rest of the flood may open new ones, refused the same way).
    await until(lambda: relay.server.results.get("limit_exceeded", 0) >= 1)
    await until(lambda: relay.server.connections == {})


async def test_initial_flood_gets_retries_beyond_the_threshold_and_expires(
    certs: Path,
) -> None:
    limits = EndpointLimits(
        retry_threshold=4, max_pending=8, max_pending_per_address=3, handshake_timeout=0.5
    )
    relay = Relay(certs, POOL, limits=limits)
    errors = LoopErrors()
    try:
        sources = [f"127.0.0.{i}" for i in range(2, 10)]
        result = await attack.initial_flood(
            relay.addr, attack.client_hellos("relay.example", 20), sources
        )
        server = relay.server
        # 4 handshakes started, then every new client was asked to prove its address.
        assert server.results.get("address_validation") == 16
        assert result.retries == 16
        assert len(server._pending) == 4
        # A genuine client completes the Retry round trip and gets its tunnel.
        legit = Client(certs, relay.port)
        await passes_traffic(legit, relay)
        # The half-open ones never answered: gone after the handshake timeout.
        await until(lambda: server.results.get("handshake_timeout") == 4, timeout=3)
        assert len(server._pending) == 0
        await legit.close()
    finally:
        relay.close()
    assert errors.errors == []


async def test_pending_connections_are_capped_per_address(certs: Path) -> None:
    limits = EndpointLimits(retry_threshold=100, max_pending_per_address=3)
    relay = Relay(certs, POOL, limits=limits)
    try:
        await attack.initial_flood(
            relay.addr, attack.client_hellos("relay.example", 10), ["127.0.0.2"]
        )
        assert relay.server.results.get("initial_dropped") == 7
        assert len(relay.server._pending) == 3
        # Another address is not affected.
        legit = Client(certs, relay.port)
        await passes_traffic(legit, relay)
        await legit.close()
    finally:
        relay.close()


async def test_a_malformed_client_certificate_gets_403_and_disturbs_nobody(
    certs: Path, tmp_path: Path
) -> None:
    ca = tmp_path / "pki"
    ca.mkdir()
    pki.init_ca(ca)
    pki.issue(ca, "relay.example", "relay")
    pki.issue(ca, "alice", "client")
    access = AccessControl(relay_config(ca, auth=("mtls",), client_ca=ca / "ca.pem"))
    relay = Relay(ca, POOL, access=access)
    errors = LoopErrors()
    alice = Client(ca, relay.port, certificate=ca / "alice.pem")
    try:
        await passes_traffic(alice, relay)
        mallory = Client(ca, relay.port, certificate=attack.malformed_eku_certificate(tmp_path))
        await until(lambda: "403" in (mallory.tunnel.status.last_error or ""))
        await passes_traffic(alice, relay)
        await mallory.close()
        assert relay.server.results.get("auth_failed", 0) >= 1
        assert "internal_error" not in relay.server.results
        assert access.limiter.blocked("127.0.0.1") is False  # charged, not yet over
    finally:
        await alice.close()
        relay.close()
    assert errors.errors == []


async def test_an_identity_reconnecting_while_its_old_connection_lives(
    certs: Path, tmp_path: Path
) -> None:
    """The new connection replaces the old session from inside the batch loop; that
    loop used to iterate the set of dirty connections while the replacement added
    the old one to it (RuntimeError: Set changed size during iteration)."""
    token, line = new_token("alice")
    (tmp_path / "tokens").write_text(line + "\n")
    (tmp_path / "alice.token").write_text(token + "\n")
    access = AccessControl(relay_config(certs, auth=("token",), tokens_file=tmp_path / "tokens"))
    relay = Relay(certs, POOL, access=access)
    errors = LoopErrors()
    first = Client(certs, relay.port, token_file=tmp_path / "alice.token")
    try:
        await passes_traffic(first, relay)
        second = Client(certs, relay.port, token_file=tmp_path / "alice.token")
        await asyncio.wait_for(second.up, 5)
        await first.close()
        await passes_traffic(second, relay)
        await second.close()
    finally:
        relay.close()
    assert errors.errors == []
    assert relay.server.results.get("accepted", 0) >= 2


async def test_fuzzed_capsules_abort_their_tunnel_only(certs: Path, tmp_path: Path) -> None:
    """An authenticated client that lies on its tunnel stream (random bytes, oversized
    and malformed capsules, bad ADDRESS_REQUESTs and routes, odd datagrams): each
    such tunnel is aborted or carries on; the relay, and another client, do not care."""
    token, line = new_token("mallory")
    alice_token, alice_line = new_token("alice")
    (tmp_path / "tokens").write_text(f"{line}\n{alice_line}\n")
    (tmp_path / "alice.token").write_text(alice_token + "\n")
    access = AccessControl(relay_config(certs, auth=("token",), tokens_file=tmp_path / "tokens"))
    relay = Relay(certs, POOL, access=access)
    errors = LoopErrors()
    alice = Client(certs, relay.port, transport="datagram", token_file=tmp_path / "alice.token")
    try:
        await passes_traffic(alice, relay)
        config = attack.client_config("relay.example", None)
        result = await attack.capsule_fuzz(relay.addr, config, token, cases=40, seed=7)
        assert result.tunnels == 40 and result.refused == 0
        assert result.aborted > 10  # the malformed cases
        await passes_traffic(alice, relay)
        assert "internal_error" not in relay.server.results
    finally:
        await alice.close()
        relay.close()
    assert errors.errors == []
