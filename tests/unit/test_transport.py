"""The data path without root: relay and client in one event loop over loopback UDP,
with in-memory TUN devices that keep what was written to them."""

from __future__ import annotations

import asyncio
import collections
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from masqued.proto.packet import build_udp, parse_packet
from tests.inproc import ROUTES, Client, Relay, until


@pytest.fixture
async def relay(certs: Path) -> AsyncIterator[Relay]:
    r = Relay(certs, ("198.18.200.0/24", "2001:db8:200::/64"))
    yield r
    r.close()


async def test_packets_flow_both_ways_and_are_counted(relay: Relay, certs: Path) -> None:
    client = Client(certs, relay.port)
    await asyncio.wait_for(client.up, 5)
    params = client.params[-1]
    assert {str(a) for a in params.addresses} == {"198.18.200.2/32", "2001:db8:200::2/128"}
    assert params.routes == ROUTES and params.mtu == 1300

    out = build_udp(client.address, "198.19.0.2", 1000, 53, b"question")
    client.tun.inject(out)
    await until(lambda: len(relay.tun.written) == 1)
    assert relay.tun.written[0] == out

    back = build_udp("198.19.0.2", client.address, 53, 1000, b"answer")
    relay.tun.inject(back)
    await until(lambda: len(client.tun.written) == 1)
    assert client.tun.written[0] == back

    session = next(iter(relay.server.sessions))
    assert (session.counters.rx_packets, session.counters.rx_bytes) == (1, len(out))
    assert (session.counters.tx_packets, session.counters.tx_bytes) == (1, len(back))
    await client.close()
    await until(lambda: not relay.server.sessions)
    assert relay.pool.used() == 0


async def test_many_packets_in_one_batch_keep_order(relay: Relay, certs: Path) -> None:
    client = Client(certs, relay.port)
    await asyncio.wait_for(client.up, 5)
    packets = [
        build_udp(client.address, "198.19.0.2", 1000, 9, i.to_bytes(4, "big") * 300)
        for i in range(500)
    ]
    # Bursts of 50 (about 60 KB, inside the stream's backlog bound), each drained
    # before the next: a burst larger than the bound would be tail-dropped by design.
    for i in range(0, 500, 50):
        client.tun.inject(*packets[i : i + 50])
        await until(lambda i=i: len(relay.tun.written) == i + 50)
    assert list(relay.tun.written) == packets
    await client.close()


async def test_spoofed_source_dropped_and_counted(relay: Relay, certs: Path) -> None:
    client = Client(certs, relay.port)
    await asyncio.wait_for(client.up, 5)
    client.tun.inject(build_udp("198.18.200.77", "198.19.0.2", 1, 2, b"spoof"))
    client.tun.inject(build_udp(client.address, "198.19.0.2", 1, 2, b"legit"))
    await until(lambda: len(relay.tun.written) == 1)
    assert parse_packet(relay.tun.written[0]).src == client.address
    session = next(iter(relay.server.sessions))
    assert session.counters.drops["spoofed_source"] == 1
    await client.close()


async def test_two_clients_get_distinct_addresses_and_their_own_packets(
    relay: Relay, certs: Path
) -> None:
    a, b = Client(certs, relay.port), Client(certs, relay.port)
    await asyncio.wait_for(asyncio.gather(a.up, b.up), 5)
    assert a.address != b.address
    relay.tun.inject(build_udp("198.19.0.2", b.address, 1, 2, b"for-b"))
    relay.tun.inject(build_udp("198.19.0.2", a.address, 1, 2, b"for-a"))
    relay.tun.inject(build_udp("198.19.0.2", "198.18.200.200", 1, 2, b"nobody"))
    await until(lambda: len(a.tun.written) == 1 and len(b.tun.written) == 1)
    assert a.tun.written[0].endswith(b"for-a") and b.tun.written[0].endswith(b"for-b")
    assert relay.server.totals.drops["no_session"] == 1
    await a.close()
    await b.close()


async def test_pool_exhausted_answers_503_and_first_client_keeps_working(certs: Path) -> None:
    relay = Relay(certs, ("198.18.200.0/30",))  # one client address: .2
    try:
        first = Client(certs, relay.port)
        await asyncio.wait_for(first.up, 5)
        second = Client(certs, relay.port)
        await until(lambda: "503" in (second.tunnel.status.last_error or ""))
        assert not second.up.done()
        assert relay.server.results["pool_exhausted"] >= 1
        first.tun.inject(build_udp(first.address, "198.19.0.2", 1, 2, b"still-ok"))
        await until(lambda: len(relay.tun.written) == 1)
        await second.close()
        await first.close()
    finally:
        relay.close()


async def test_client_reconnects_when_relay_restarts(certs: Path) -> None:
    relay = Relay(certs, ("198.18.200.0/24",))
    port = relay.port
    client = Client(certs, port)
    await asyncio.wait_for(client.up, 5)
    relay.close()  # sends CONNECTION_CLOSE: the client notices at once
    await until(lambda: client.tunnel.status.state == "reconnecting")
    relay = Relay(certs, ("198.18.200.0/24",), port=port)
    try:
        await until(lambda: client.tunnel.status.connects == 2, timeout=10)
        client.tun.inject(build_udp(client.address, "198.19.0.2", 1, 2, b"again"))
        await until(lambda: len(relay.tun.written) == 1)
        await client.close()
    finally:
        relay.close()


async def test_udp_gso_and_gro_keep_datagram_boundaries() -> None:
    """Runs of equal-size datagrams go out in one sendmsg (UDP_SEGMENT) and come back
    split at the right places, including a shorter last one and other destinations."""
    from masqued.transport.quic import UdpSocket

    loop = asyncio.get_running_loop()
    socks = []
    for _ in range(3):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
        socks.append(s)
    got: dict[int, list[bytes]] = {1: [], 2: []}
    sender = UdpSocket(loop, socks[0], lambda batch: None)
    receivers = [
        UdpSocket(loop, socks[i], lambda batch, i=i: got[i].extend(d for d, _ in batch))
        for i in (1, 2)
    ]
    for r in receivers:
        r.start()
    to1, to2 = socks[1].getsockname(), socks[2].getsockname()
    first = [bytes([i]) * 1200 for i in range(70)] + [b"tail"]  # more than one GSO run
    sender.send([(m, to1) for m in first] + [(b"other", to2), (b"x" * 1200, to1)])
    await until(lambda: len(got[1]) == 72 and len(got[2]) == 1)
    assert got[1] == [*first, b"x" * 1200]
    assert got[2] == [b"other"]
    assert sender.send_errors == 0
    for r in receivers:
        r.close()
    sender.close()


async def test_burst_beyond_the_stream_bound_is_tail_dropped_and_counted(
    relay: Relay, certs: Path
) -> None:
    from masqued.transport.quic import BacklogBound

    client = Client(certs, relay.port)
    await asyncio.wait_for(client.up, 5)
    packet = build_udp(client.address, "198.19.0.2", 1000, 9, b"x" * 1200)
    # A burst at once, from an idle tunnel: the floor, with its grace for bursts.
    room = BacklogBound.GRACE_FACTOR * BacklogBound.FLOOR
    burst = 4 * room // len(packet)
    client.tun.inject(*[packet] * burst)
    drops = client.tunnel.status.counters.drops
    await until(lambda: drops["queue_full"] > 0)
    await until(lambda: len(relay.tun.written) + drops["queue_full"] == burst, timeout=10)
    assert len(relay.tun.written) <= room // len(packet) + 256
    await client.close()


async def test_datagram_burst_beyond_the_bound_is_tail_dropped_and_counted(
    relay: Relay, certs: Path
) -> None:
    """Datagram mode: what does not fit the connection's bound is dropped at once and
    counted; aioquic's own queue never holds more than the bound."""
    from masqued.transport.datagrams import DATAGRAM_COST, DatagramBound

    client = Client(certs, relay.port, transport="datagram")
    await asyncio.wait_for(client.up, 5)
    conn = client.tunnel.conn
    assert conn is not None and conn.transport == "datagram"
    packet = build_udp(client.address, "198.19.0.2", 1000, 9, b"x" * 1200)
    room = DatagramBound.GRACE_FACTOR * DatagramBound.FLOOR
    burst = 4 * room // len(packet)
    client.tun.inject(*[packet] * burst)
    drops = client.tunnel.status.counters.drops
    await until(lambda: drops["queue_full"] > 0)
    queued = sum(map(len, conn.quic._datagrams_pending))
    assert queued <= room
    await until(lambda: len(relay.tun.written) + drops["queue_full"] == burst, timeout=10)
    admitted = room // (len(packet) + 1 + DATAGRAM_COST)
    assert len(relay.tun.written) <= admitted + 256  # later TUN reads find room again
    assert drops["queue_full"] >= burst - admitted - 256
    await client.close()


async def test_lone_icmp_error_in_datagram_mode_is_not_dropped_by_a_stale_budget(
    relay: Relay, certs: Path
) -> None:
    """A Packet Too Big the relay answers outside a TUN batch refreshes the datagram
    bound itself: a budget spent in some earlier burst must not drop it."""
    client = Client(certs, relay.port, transport="datagram")
    await asyncio.wait_for(client.up, 5)
    conn = next(iter(relay.server.sessions)).conn
    conn.datagram_bound.budget = -1  # as left by a burst long ago
    # Over the relay's MTU (1300) but within what one HTTP Datagram carries.
    big = build_udp(client.address, "198.19.0.2", 1000, 9, b"x" * 1320)
    client.tun.inject(big)
    await until(lambda: len(client.tun.written) == 1)
    answer = parse_packet(client.tun.written[0])
    assert answer.proto == 1 and str(answer.dst) == str(client.address)
    assert not relay.tun.written
    session = next(iter(relay.server.sessions))
    assert session.counters.drops["oversized"] == 1
    assert session.counters.drops["queue_full"] == 0
    await client.close()


class _FakeCc:
    def __init__(self) -> None:
        self.delivered = 0
        self.bytes_in_flight = 0


class _FakeRecovery:
    _rtt_min = 0.002

    def __init__(self) -> None:
        self._cc = _FakeCc()

    @property
    def bytes_in_flight(self) -> int:
        return self._cc.bytes_in_flight


class _FakeDatagramQuic:
    """Just what DatagramBound reads: delivered and in-flight bytes, the min RTT and
    aioquic's datagram queue."""

    def __init__(self) -> None:
        self._loss = _FakeRecovery()
        self._datagrams_pending: collections.deque[bytes] = collections.deque()


def test_datagram_bound_counts_flight_and_queue_against_the_rate() -> None:
    from masqued.transport.datagrams import DATAGRAM_COST, DatagramBound

    quic = _FakeDatagramQuic()
    bound = DatagramBound()
    t = 50.0
    room = DatagramBound.GRACE_FACTOR * DatagramBound.FLOOR
    assert bound.refresh(quic, t) == room  # type: ignore[arg-type]
    # 25 MB/s delivered: limit = rate x (2 ms + QUEUE_TARGET).
    for _ in range(10):
        t += 0.05
        quic._loss._cc.delivered += int(25e6 * 0.05)
        bound.refresh(quic, t)  # type: ignore[arg-type]
    limit = 25e6 * (0.002 + DatagramBound.QUEUE_TARGET)
    assert bound.limit == pytest.approx(limit, rel=0.01)
    # Bytes in flight and queued datagrams (with their overhead) both use it up.
    quic._loss._cc.bytes_in_flight = 100_000
    quic._datagrams_pending.extend([b"x" * 1000] * 10)
    used = 100_000 + 10 * (1000 + DATAGRAM_COST)
    budget = bound.refresh(quic, t + 0.001)  # type: ignore[arg-type]
    assert budget == DatagramBound.GRACE_FACTOR * bound.limit - used  # under the limit
    # Held above the limit for GRACE: only the limit.
    quic._loss._cc.bytes_in_flight = bound.limit
    bound.refresh(quic, t + 0.002)  # type: ignore[arg-type]
    budget = bound.refresh(quic, t + 0.003 + DatagramBound.GRACE)  # type: ignore[arg-type]
    assert budget == -10 * (1000 + DATAGRAM_COST)
    # The old delivered count, a new in-flight figure: nothing new was acknowledged
    # but the window is not over yet, so the limit holds.
    quic._loss._cc.bytes_in_flight = 10**7
    assert bound.refresh(quic, t + 0.002) < 0  # type: ignore[arg-type]


class _EventQueue:
    """Stands in for a QuicConnection: hands out queued events one by one."""

    def __init__(self, events: list[object]) -> None:
        self.events = list(events)

    def next_event(self) -> object | None:
        return self.events.pop(0) if self.events else None


def test_merged_events_joins_runs_of_one_stream_only() -> None:
    from aioquic.quic.events import HandshakeCompleted, StreamDataReceived

    from masqued.transport.quic import merged_events

    hs = HandshakeCompleted(alpn_protocol="h3", early_data_accepted=False, session_resumed=False)
    q = _EventQueue(
        [
            StreamDataReceived(b"a", False, 0),
            StreamDataReceived(b"b", False, 0),
            StreamDataReceived(b"x", False, 4),
            StreamDataReceived(b"c", True, 0),
            StreamDataReceived(b"d", False, 0),  # after the end: not merged into it
            hs,
            StreamDataReceived(b"e", False, 0),
        ]
    )
    got = [
        (e.stream_id, e.data, e.end_stream) if isinstance(e, StreamDataReceived) else e
        for e in merged_events(q)  # type: ignore[arg-type]
    ]
    assert got == [
        (0, b"ab", False),
        (4, b"x", False),
        (0, b"c", True),
        (0, b"d", False),
        hs,
        (0, b"e", False),
    ]


def test_merged_events_leaves_the_rest_queued_when_the_consumer_stops() -> None:
    from aioquic.quic.events import ConnectionTerminated, StreamDataReceived

    from masqued.transport.quic import merged_events

    bye = ConnectionTerminated(error_code=0, frame_type=None, reason_phrase="")
    later = StreamDataReceived(b"z", False, 0)
    q = _EventQueue([StreamDataReceived(b"a", False, 0), bye, later])
    for event in merged_events(q):  # type: ignore[arg-type]
        if event is bye:
            break
    assert q.events == [later]


def _burst_at_one_instant(pacer: object) -> int:
    """How many packets the pacer lets out at once after a long idle."""
    pacer.update_rate(congestion_window=1_000_000, smoothed_rtt=0.01)  # type: ignore[attr-defined]
    now, sent = 10.0, 0
    while pacer.next_send_time(now) is None and sent < 1000:  # type: ignore[attr-defined]
        pacer.update_after_send(now)  # type: ignore[attr-defined]
        sent += 1
    return sent


def test_burst_pacer_lets_one_gso_send_out_and_keeps_the_rate() -> None:
    from aioquic.quic.connection import QuicConnection
    from aioquic.quic.recovery import QuicPacketPacer

    from masqued.transport.quic import (
        MAX_DATAGRAM_SIZE,
        PACER_BURST,
        BurstPacer,
        quic_configuration,
        use_burst_pacer,
    )

    stock = QuicPacketPacer(max_datagram_size=MAX_DATAGRAM_SIZE)
    burst = BurstPacer(max_datagram_size=MAX_DATAGRAM_SIZE)
    assert _burst_at_one_instant(stock) <= 17
    assert PACER_BURST - 1 <= _burst_at_one_instant(burst) <= PACER_BURST + 1
    assert burst.packet_time == stock.packet_time  # same pacing rate
    # Then one packet per packet_time, as before.
    later = 10.0 + 3 * burst.packet_time  # type: ignore[operator]
    assert burst.next_send_time(later) is None
    # A small window caps the burst at half of it.
    small = BurstPacer(max_datagram_size=MAX_DATAGRAM_SIZE)
    small.update_rate(congestion_window=10 * MAX_DATAGRAM_SIZE, smoothed_rtt=0.01)
    assert small.bucket_max == pytest.approx(
        5 * MAX_DATAGRAM_SIZE / (10 * MAX_DATAGRAM_SIZE / 0.01)
    )

    quic = QuicConnection(configuration=quic_configuration(is_client=True, server_name="x"))
    use_burst_pacer(quic)
    assert isinstance(quic._loss._pacer, BurstPacer)


class _FakeSender:
    def __init__(self) -> None:
        self._buffer_start = 0


class _FakeStream:
    def __init__(self) -> None:
        self.sender = _FakeSender()


class _FakeLoss:
    _rtt_min = 0.002


class _FakeQuic:
    """Just what BacklogBound reads: the stream's acknowledged offset, the min RTT."""

    def __init__(self) -> None:
        self._streams = {0: _FakeStream()}
        self._loss = _FakeLoss()

    def ack(self, n: int) -> None:
        self._streams[0].sender._buffer_start += n


def test_backlog_bound_follows_the_acknowledged_rate_in_time() -> None:
    from masqued.transport.quic import BacklogBound

    quic = _FakeQuic()
    bound = BacklogBound()
    t = 100.0
    assert bound.update(quic, 0, t) == BacklogBound.FLOOR  # type: ignore[arg-type]
    # 25 MB/s acknowledged (200 Mbit/s): rate x (2 ms + QUEUE_TARGET).
    for _ in range(10):
        t += 0.05
        quic.ack(int(25e6 * 0.05))
        limit = bound.update(quic, 0, t)  # type: ignore[arg-type]
    assert limit == pytest.approx(25e6 * (0.002 + BacklogBound.QUEUE_TARGET), rel=0.01)
    # Samples closer than WINDOW change nothing.
    quic.ack(10**9)
    assert bound.update(quic, 0, t + BacklogBound.WINDOW / 2) == limit  # type: ignore[arg-type]
    # A slow link: 1 MB/s (8 Mbit/s) -> the floor, not 12 kB.
    t += BacklogBound.WINDOW / 2
    quic._streams[0].sender._buffer_start = 0
    bound = BacklogBound()
    bound.update(quic, 0, t)  # type: ignore[arg-type]
    for _ in range(20):
        t += 0.05
        quic.ack(int(1e6 * 0.05))
        limit = bound.update(quic, 0, t)  # type: ignore[arg-type]
    assert limit == BacklogBound.FLOOR
    # Fast, then a dip: the bound holds for RATE_HORIZON (a dip must not shrink it
    # and deepen itself), then follows the rate down.
    for _ in range(4):
        t += 0.05
        quic.ack(int(800e6 * 0.05))
        bound.update(quic, 0, t)  # type: ignore[arg-type]
    assert bound.limit == BacklogBound.CEILING
    t += 0.05
    bound.update(quic, 0, t)  # type: ignore[arg-type]  (nothing acknowledged)
    assert bound.limit == BacklogBound.CEILING
    for _ in range(40):
        t += 0.05
        bound.update(quic, 0, t)  # type: ignore[arg-type]
    assert bound.limit == BacklogBound.FLOOR


def test_backlog_bound_samples_a_new_flow_alone_and_sooner_when_dropping() -> None:
    """After a rest the first sample covers only the new flow; while the bound is
    dropping, samples come every SHORT_WINDOW instead of every WINDOW."""
    from masqued.transport.quic import BacklogBound

    quic = _FakeQuic()
    bound = BacklogBound()
    t = 100.0
    bound.update(quic, 0, t)  # type: ignore[arg-type]
    t += 0.05
    quic.ack(int(1e6 * 0.05))
    bound.update(quic, 0, t)  # type: ignore[arg-type]
    assert bound.rate == pytest.approx(1e6, rel=0.01)
    # Idle past REST, with much acknowledged meanwhile: not part of any sample.
    quic.ack(10**8)
    t += 2 * BacklogBound.REST
    assert bound.update(quic, 0, t) == BacklogBound.FLOOR  # type: ignore[arg-type]
    # Not dropping: a short interval is no sample.
    t += BacklogBound.SHORT_WINDOW
    quic.ack(int(40e6 * BacklogBound.SHORT_WINDOW))
    assert bound.update(quic, 0, t) == BacklogBound.FLOOR  # type: ignore[arg-type]
    assert bound.rate == pytest.approx(1e6, rel=0.01)
    # Dropping at the floor while 40 MB/s get through: a sample after SHORT_WINDOW
    # (the two short intervals of the new flow only) raises the bound.
    bound.limited = True
    t += BacklogBound.SHORT_WINDOW
    quic.ack(int(40e6 * BacklogBound.SHORT_WINDOW))
    limit = bound.update(quic, 0, t)  # type: ignore[arg-type]
    assert bound.rate == pytest.approx(40e6, rel=0.01)
    assert limit == pytest.approx(40e6 * (0.002 + BacklogBound.QUEUE_TARGET), rel=0.01)
    assert not bound.limited
    t += BacklogBound.SHORT_WINDOW
    quic.ack(int(400e6 * BacklogBound.SHORT_WINDOW))
    assert bound.update(quic, 0, t) == limit  # type: ignore[arg-type]


def test_backlog_bound_room_lets_a_short_excursion_pass_but_not_a_standing_queue() -> None:
    from masqued.transport.quic import BacklogBound

    bound = BacklogBound()
    b = 100_000
    t = 10.0
    # Below the bound: room up to GRACE_FACTOR times it (a burst may pass).
    assert bound.room(b, 40_000, t) == BacklogBound.GRACE_FACTOR * b - 40_000
    # Above it, briefly (a stall of the peer, a burst): still the grace room.
    assert bound.room(b, 150_000, t + 0.001) == BacklogBound.GRACE_FACTOR * b - 150_000
    assert bound.room(b, 180_000, t + 0.001 + BacklogBound.GRACE / 2) > 0
    # Above it for GRACE: only the bound, so nothing more is admitted.
    assert bound.room(b, 150_000, t + 0.002 + BacklogBound.GRACE) == b - 150_000
    assert bound.room(b, 120_000, t + 0.1) == b - 120_000
    # Back under the bound: the excursion is over, the grace room is back.
    assert bound.room(b, 90_000, t + 0.2) == BacklogBound.GRACE_FACTOR * b - 90_000
    assert bound.room(b, 150_000, t + 0.201) == BacklogBound.GRACE_FACTOR * b - 150_000


def test_burst_pacer_keeps_its_burst_when_the_window_is_huge() -> None:
    """aioquic floors packet_time at 1 us but sizes its bucket from the raw rate: with
    a 60 MB window (CUBIC without loss) its bucket holds under two packets."""
    from aioquic.quic.recovery import QuicPacketPacer

    from masqued.transport.quic import MAX_DATAGRAM_SIZE, PACER_BURST, BurstPacer

    def burst(pacer: QuicPacketPacer) -> int:
        pacer.update_rate(congestion_window=60_000_000, smoothed_rtt=0.001)
        now, sent = 10.0, 0
        while pacer.next_send_time(now) is None and sent < 1000:
            pacer.update_after_send(now)
            sent += 1
        return sent

    assert burst(QuicPacketPacer(max_datagram_size=MAX_DATAGRAM_SIZE)) <= 3
    assert burst(BurstPacer(max_datagram_size=MAX_DATAGRAM_SIZE)) >= PACER_BURST - 1
