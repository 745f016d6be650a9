"""Both QUIC engines behind the seam, in-process over loopback: every pairing of a
relay engine and a client engine carries a tunnel in both data-plane modes (they
interoperate on the wire), and qh3's seam keeps the pre-admission bounds."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from masqued.proto.packet import build_udp
from masqued.transport import engines
from masqued.transport.h3link import H3Link
from masqued.transport.limits import EndpointLimits, ReceiveLimits
from tests.inproc import Client, Relay, until

TARGET = "198.19.0.2"

PAIRS = [
    pytest.param("aioquic", "aioquic", id="aioquic-aioquic"),
    pytest.param("aioquic", "qh3", id="aioquic-relay-qh3-client"),
    pytest.param("qh3", "qh3", id="qh3-qh3"),
    # aioquic pads its Initial datagrams with zeros after the packet: qh3's core must
    # count them toward its anti-amplification limit (qh3_engine._PaddedCore).
    pytest.param("qh3", "aioquic", id="qh3-relay-aioquic-client"),
]


@pytest.mark.parametrize("mode", ["stream", "datagram"])
@pytest.mark.parametrize(("relay_engine", "client_engine"), PAIRS)
async def test_pairing_carries_packets_both_ways(
    certs: Path, relay_engine: str, client_engine: str, mode: str
) -> None:
    relay = Relay(certs, ("198.18.200.0/24",), tcp=False, quic_engine=relay_engine)
    client = Client(certs, relay.port, transport=mode, http_version="h3", quic_engine=client_engine)
    try:
        await asyncio.wait_for(client.up, 10)
        (session,) = relay.server.sessions
        assert isinstance(session.link, H3Link)
        assert relay_engine == session.link.engine.NAME
        assert session.mode.value == mode
        for i in range(20):
            # Up to a full 1300-byte packet (the MTU): it must fit one QUIC packet.
            out = build_udp(client.address, TARGET, 1000 + i, 9, b"u" * (60 * i + 132))
            client.tun.inject(out)
            await until(lambda out=out: out in relay.tun.written)
            back = build_udp(TARGET, client.address, 9, 1000 + i, b"d%02d" % i * (20 * i + 4))
            relay.tun.inject(back)
            # The relay decrements the TTL: compare the payload end.
            await until(
                lambda i=i: any(p.endswith(b"d%02d" % i * (20 * i + 4)) for p in client.tun.written)
            )
        stats = session.link.stats()
        assert stats["rtt_ms"] is not None and stats["cwnd"] > 0
    finally:
        await client.close()
        relay.close()


def test_engines_load_by_name() -> None:
    assert engines.load("aioquic").NAME == "aioquic"
    assert engines.load("qh3").NAME == "qh3"
    with pytest.raises(ValueError):
        engines.load("quiche")
    assert engines.available("qh3") is None


def test_qh3_connection_is_built_with_the_relay_limits(certs: Path) -> None:
    """The windows and stream counts go into qh3's core when it is built."""
    qh3e = engines.load("qh3")
    config = qh3e.configuration(
        is_client=False,
        certificate=str(certs / "relay.example.pem"),
        private_key=str(certs / "relay.example.key"),
    )
    limits = ReceiveLimits()
    quic = qh3e.server_connection(
        config,
        original_dcid=b"\x01" * 8,
        retry_scid=None,
        receive_limits=limits,
        worker=3,
        client_certificate=False,
    )
    assert quic.host_cid[0] == 3  # marked for worker steering
    assert quic._windows() == (
        limits.qh3_window,
        limits.qh3_window,
        limits.qh3_window,
        limits.bidi_streams,
        limits.uni_streams,
    )
    # Incomplete HTTP/3 frames beyond max_held close the connection.
    assert quic.settle({0: limits.max_held + 1}) == limits.max_held + 1
    assert quic.exceeded is not None


@pytest.mark.parametrize("engine", ["aioquic", "qh3"])
def test_tunnel_on_uvloop(certs: Path, engine: str) -> None:
    """event_loop = "uvloop": a tunnel up and a packet through, on each engine."""
    from masqued.runtime.daemon import run_loop

    async def main() -> None:
        assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")
        relay = Relay(certs, ("198.18.200.0/24",), tcp=False, quic_engine=engine)
        client = Client(
            certs, relay.port, transport="datagram", http_version="h3", quic_engine=engine
        )
        try:
            await asyncio.wait_for(client.up, 10)
            out = build_udp(client.address, TARGET, 1000, 9, b"on uvloop")
            client.tun.inject(out)
            await until(lambda: out in relay.tun.written)
        finally:
            await client.close()
            relay.close()

    run_loop(main(), "uvloop")


def test_padding_start() -> None:
    qh3e = engines.load("qh3")
    aq = engines.load("aioquic")
    client = aq.client_connection(aq.configuration(is_client=True, server_name="relay.example"))
    client.connect(("127.0.0.1", 4433), now=0.0)
    ((datagram, _),) = client.datagrams_to_send(now=0.0)
    start = qh3e.padding_start(datagram)  # type: ignore[attr-defined]
    assert 0 < start < len(datagram) and not any(datagram[start:])
    assert qh3e.padding_start(datagram[:start]) == start  # type: ignore[attr-defined]
    assert qh3e.padding_start(b"\x00" * 10) == 0  # type: ignore[attr-defined]
    assert qh3e.padding_start(b"\xff" * 10) == 10  # type: ignore[attr-defined]


# -- qh3's pre-admission bounds, attacked in-process (the attacks of tests/abuse) ------


@pytest.fixture
async def qh3_relay(certs: Path) -> AsyncIterator[Relay]:
    r = Relay(certs, ("198.18.200.0/24",), tcp=False, quic_engine="qh3")
    yield r
    r.close()


async def test_qh3_stream_gaps_earn_no_credit_beyond_its_window(
    qh3_relay: Relay, certs: Path
) -> None:
    """Single bytes at the end of every window: qh3's core grants credit as the
    application reads, so the gaps hold the peer to its one window, and the core keeps
    only the bytes it got (no zero-fill)."""
    from tests.abuse import attack

    legit = Client(certs, qh3_relay.port, transport="datagram", http_version="h3")
    peer = await attack.connected(qh3_relay.addr, attack.client_config("relay.example", None))
    try:
        result = await attack.gap_flood(peer, streams=4, rounds=6)
        assert 0 < result.claimed <= ReceiveLimits().qh3_window
        await asyncio.wait_for(legit.up, 5)
        out = build_udp(legit.address, TARGET, 1000, 9, b"still flowing")
        legit.tun.inject(out)
        await until(lambda: out in qh3_relay.tun.written)
    finally:
        peer.close()
        await legit.close()


async def test_qh3_more_streams_than_allowed_close_the_connection(qh3_relay: Relay) -> None:
    from tests.abuse import attack

    peer = await attack.connected(qh3_relay.addr, attack.client_config("relay.example", None))
    try:
        code = await attack.many_streams(peer, streams=ReceiveLimits().bidi_streams + 12)
    finally:
        peer.close()
    assert code == engines.STREAM_LIMIT_ERROR
    await until(lambda: qh3_relay.server.results.get("limit_exceeded", 0) == 1)
    await until(lambda: qh3_relay.server.endpoint.links == {})


async def test_qh3_incomplete_headers_are_cut_off(certs: Path) -> None:
    """HEADERS claiming 1 GiB, sent in order: qh3's HTTP/3 layer keeps them until the
    frame is whole; past ``max_held`` the relay closes with H3_EXCESSIVE_LOAD."""
    from tests.abuse import attack

    receive = ReceiveLimits(max_held=24 * 1024)
    relay = Relay(
        certs,
        ("198.18.200.0/24",),
        tcp=False,
        quic_engine="qh3",
        limits=EndpointLimits(receive=receive),
    )
    try:
        peer = await attack.connected(relay.addr, attack.client_config("relay.example", None))
        code = await attack.incomplete_headers(peer, 1 << 30, send=256 * 1024)
        peer.close()
        assert code == engines.H3_EXCESSIVE_LOAD
        assert relay.server.results.get("limit_exceeded") == 1
    finally:
        relay.close()


async def test_qh3_client_hello_claiming_16_mib_is_refused(certs: Path) -> None:
    """The connection whose TLS would hold more than ``max_held`` is refused
    (CRYPTO_BUFFER_EXCEEDED); the flood's later Initials open connections whose CRYPTO
    data starts past offset 0, which qh3's core keeps out of order (bounded by its own
    reassembly limit) until the handshake timeout ends them."""
    from tests.abuse import attack

    limits = EndpointLimits(handshake_timeout=0.5)
    relay = Relay(certs, ("198.18.200.0/24",), tcp=False, quic_engine="qh3", limits=limits)
    try:
        await attack.huge_client_hello(relay.addr, total=256 * 1024)
        await until(lambda: relay.server.results.get("limit_exceeded", 0) >= 1)
        await until(lambda: relay.server.endpoint.links == {})
    finally:
        relay.close()


async def test_qh3_initial_flood_gets_retries_and_a_client_gets_through(certs: Path) -> None:
    """Past the Retry threshold every new client proves its address first; an aioquic
    and a qh3 client both complete the Retry round trip with a qh3 relay."""
    from tests.abuse import attack

    limits = EndpointLimits(
        retry_threshold=4, max_pending=8, max_pending_per_address=3, handshake_timeout=0.5
    )
    relay = Relay(certs, ("198.18.200.0/24",), tcp=False, quic_engine="qh3", limits=limits)
    try:
        sources = [f"127.0.0.{i}" for i in range(2, 10)]
        result = await attack.initial_flood(
            relay.addr, attack.client_hellos("relay.example", 20), sources
        )
        assert result.retries == 16
        for engine in ("aioquic", "qh3"):
            legit = Client(
                certs, relay.port, transport="datagram", http_version="h3", quic_engine=engine
            )
            try:
                await asyncio.wait_for(legit.up, 5)
            finally:
                await legit.close()
        await until(lambda: relay.server.results.get("handshake_timeout") == 4, timeout=3)
    finally:
        relay.close()
