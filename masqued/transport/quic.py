"""Driving aioquic's sans-I/O QuicConnection directly.

aioquic's own asyncio adapter reads one datagram per event-loop pass and calls
``transmit()`` after every datagram; that is where most of its CPU goes. Here we own
the UDP socket: every wake-up drains it until EAGAIN, feeds the whole batch to the
connections, and only then asks each touched connection for its datagrams, once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.congestion.base import register_congestion_control
from aioquic.quic.congestion.cubic import CubicCongestionControl
from aioquic.quic.connection import (
    CONNECTION_LIMIT_FRAME_CAPACITY,
    MAX_STREAM_DATA_FRAME_CAPACITY,
    QuicConnection,
    QuicConnectionError,
)
from aioquic.quic.events import QuicEvent, StreamDataReceived
from aioquic.quic.packet import QuicErrorCode, QuicFrameType
from aioquic.quic.packet_builder import QuicPacketBuilder, QuicSentPacket
from aioquic.quic.recovery import QuicPacketPacer

from masqued.observe.metrics import DROP_OVERSIZED, DROP_QUEUE_FULL, TrafficCounters
from masqued.proto.framing import encode_frames
from masqued.transport.limits import ReceiveLimits

log = logging.getLogger("masqued.transport")

Address = Any  # what socket.recvfrom returns: (host, port) or (host, port, flow, scope)

# Upper bound of datagrams read per wake-up, so one busy socket cannot starve the TUN.
RECV_BATCH = 128
RECV_BUFSIZE = 65535
SOCKET_BUFFER = 4 * 1024 * 1024

# QUIC tuning shared by both roles.
IDLE_TIMEOUT = 30.0
# Our packets are at most MTU (1300 by default) plus QUIC/H3 overhead; 1452 fits a
# 1500-byte path with IPv6+UDP headers and lets a whole 1300-byte packet ride in one
# QUIC packet.
MAX_DATAGRAM_SIZE = 1452
MAX_DATA = 16 * 1024 * 1024
MAX_STREAM_DATA = 8 * 1024 * 1024


def monotonic() -> float:
    """The clock given to aioquic (precise, unlike a cached loop time)."""
    return time.monotonic()


class DeliveryCountingCubic(CubicCongestionControl):
    """aioquic's CUBIC, also counting the bytes the peer has acknowledged.

    ``delivered`` grows by each in-flight packet's size as it is acknowledged: the
    delivery rate the datagram queue is bounded by (DatagramBound), which aioquic
    does not track.
    """

    def __init__(self, *, max_datagram_size: int) -> None:
        super().__init__(max_datagram_size=max_datagram_size)
        self.delivered = 0

    def on_packet_acked(self, *, now: float, packet: QuicSentPacket) -> None:
        self.delivered += packet.sent_bytes
        super().on_packet_acked(now=now, packet=packet)


CONGESTION_CONTROL = "masqued-cubic"
register_congestion_control(CONGESTION_CONTROL, DeliveryCountingCubic)


def quic_configuration(*, is_client: bool, server_name: str | None = None) -> QuicConfiguration:
    """A QuicConfiguration with the settings both roles share."""
    return QuicConfiguration(
        alpn_protocols=H3_ALPN,
        is_client=is_client,
        idle_timeout=IDLE_TIMEOUT,
        max_datagram_size=MAX_DATAGRAM_SIZE,
        max_data=MAX_DATA,
        max_stream_data=MAX_STREAM_DATA,
        server_name=server_name,
        congestion_control_algorithm=CONGESTION_CONTROL,
    )


def tune_socket(sock: socket.socket) -> None:
    """Large kernel buffers: bursts of a whole batch must not be dropped by the kernel."""
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):  # best effort
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
    sock.setblocking(False)


# Linux UDP offloads (include/uapi/linux/udp.h): one sendmsg carries many datagrams
# of one size (GSO), one recvmsg returns several coalesced ones (GRO).
SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
GSO_MAX_SEGMENTS = 64  # UDP_MAX_SEGMENTS in the kernel
GSO_MAX_BYTES = 65000  # stay under the 64 KiB IP datagram limit with headers
_CMSG_SPACE = socket.CMSG_SPACE(4)


class UdpSocket:
    """A non-blocking UDP socket drained on every wake-up, with GSO/GRO where the
    kernel supports them (each falls back to plain sendto/recvfrom on first refusal).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        on_batch: Callable[[list[tuple[bytes, Address]]], None],
    ) -> None:
        self._loop = loop
        self.sock = sock
        self._on_batch = on_batch
        self._reading = False
        self.send_errors = 0
        # MASQUED_UDP_OFFLOAD=0 turns both off (for comparisons, or a kernel/NIC that
        # mishandles them).
        offload = os.environ.get("MASQUED_UDP_OFFLOAD", "1") != "0"
        self.gso = offload
        self.gro = False
        if offload:
            with contextlib.suppress(OSError):
                sock.setsockopt(SOL_UDP, UDP_GRO, 1)
                self.gro = True

    def start(self) -> None:
        self._loop.add_reader(self.sock.fileno(), self._read_ready)
        self._reading = True

    def close(self) -> None:
        if self._reading:
            self._loop.remove_reader(self.sock.fileno())
            self._reading = False
        self.sock.close()

    def _read_ready(self) -> None:
        batch: list[tuple[bytes, Address]] = []
        gro = self.gro
        recvmsg = self.sock.recvmsg
        recvfrom = self.sock.recvfrom
        for _ in range(RECV_BATCH):
            try:
                if not gro:
                    batch.append(recvfrom(RECV_BUFSIZE))
                    continue
                data, ancdata, _flags, addr = recvmsg(RECV_BUFSIZE, _CMSG_SPACE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                # ICMP errors surface here on connected sockets (ECONNREFUSED); the
                # QUIC layer notices the silence through its own timers.
                if exc.errno not in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                    log.debug("recvfrom failed: %s", exc)
                break
            size = 0
            for level, kind, value in ancdata:
                if level == SOL_UDP and kind == UDP_GRO and len(value) >= 2:
                    size = (
                        int.from_bytes(value[:2], "little")
                        if len(value) < 4
                        else (int.from_bytes(value[:4], "little"))
                    )
            if size and len(data) > size:
                for i in range(0, len(data), size):
                    batch.append((data[i : i + size], addr))
            else:
                batch.append((data, addr))
        if batch:
            self._on_batch(batch)

    def send(self, datagrams: Iterable[tuple[bytes, Address]]) -> None:
        if not self.gso:
            for data, addr in datagrams:
                self._sendto(data, addr)
            return
        # Runs of datagrams to one address with one size (the last may be shorter)
        # go out in one sendmsg with UDP_SEGMENT.
        run: list[bytes] = []
        run_addr: Address = None
        seg = 0
        total = 0
        for data, addr in datagrams:
            n = len(data)
            if run and (
                addr != run_addr
                or n > seg
                or len(run[-1]) < seg
                or len(run) >= GSO_MAX_SEGMENTS
                or total + n > GSO_MAX_BYTES
            ):
                self._send_run(run, run_addr, seg)
                run = []
            if not run:
                run_addr, seg, total = addr, n, 0
            run.append(data)
            total += n
        if run:
            self._send_run(run, run_addr, seg)

    def _send_run(self, run: list[bytes], addr: Address, seg: int) -> None:
        if len(run) == 1:
            self._sendto(run[0], addr)
            return
        try:
            self.sock.sendmsg(
                [b"".join(run)], [(SOL_UDP, UDP_SEGMENT, seg.to_bytes(2, "little"))], 0, addr
            )
        except (BlockingIOError, InterruptedError):
            self.send_errors += len(run)  # QUIC sees loss and retransmits
        except OSError as exc:
            if exc.errno in (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP):
                log.info("UDP GSO not available (%s): sending one datagram per call", exc)
                self.gso = False
                for data in run:
                    self._sendto(data, addr)
            else:
                self.send_errors += len(run)

    def _sendto(self, data: bytes, addr: Address) -> None:
        try:
            self.sock.sendto(data, addr)
        except OSError:
            # Kernel buffer full or a transient route error: QUIC treats it as loss.
            self.send_errors += 1


# Packets the pacer lets out back to back: one GSO send (GSO_MAX_SEGMENTS), at most
# half the congestion window.
PACER_BURST = 64


class BurstPacer(QuicPacketPacer):
    """aioquic's pacer (same rate: window / smoothed RTT) with a burst of 64 packets.

    aioquic's bucket holds at most 16 packets. Once the pacer gates, every further
    send waits for a timer, and asyncio sleeps in whole milliseconds (epoll's
    timeout), so a timer-driven sender moves at most ~16 packets per millisecond
    (~190 Mbit/s) and spends its CPU on wake-ups: under load the tunnel fell into
    that mode in about one run in three (75-105 Mbit/s with both daemons at 95% CPU,
    QuicPeer._on_timer 54% of the client's profile instead of 10%). A burst the
    size of one GSO send keeps the rate and leaves the timer granularity out of it.
    """

    def update_rate(self, congestion_window: int, smoothed_rtt: float) -> None:
        super().update_rate(congestion_window, smoothed_rtt)
        assert self.packet_time is not None  # set by update_rate
        # In packets times packet_time, not bytes / rate: aioquic clamps packet_time
        # to >= 1 us but computes its bucket from the unclamped rate, so once the
        # window has grown large (CUBIC keeps growing it when nothing is lost; 58 MB
        # after a minute of bulk transfer here) the bucket held ~1.6 us, under two
        # packets, and every further packet waited for a timer: throughput fell from
        # ~240 to ~100 Mbit/s after 30-60 s on one connection.
        burst = max(2, min(congestion_window // 2 // self._max_datagram_size, PACER_BURST))
        self.bucket_max = burst * self.packet_time
        if self.bucket_time > self.bucket_max:
            self.bucket_time = self.bucket_max


def use_burst_pacer(quic: QuicConnection) -> None:
    """Give ``quic`` a BurstPacer (aioquic has no setting for the burst). A no-op on
    an aioquic whose recovery object looks different."""
    loss = getattr(quic, "_loss", None)
    old = getattr(loss, "_pacer", None)
    if loss is not None and type(old) is QuicPacketPacer:
        loss._pacer = BurstPacer(max_datagram_size=old._max_datagram_size)


def merged_events(quic: QuicConnection) -> Iterator[QuicEvent]:
    """``quic``'s pending events, each run of StreamDataReceived on one stream merged
    into one event.

    A UDP batch of a bulk transfer yields one event per QUIC packet; the H3 layer,
    the frame decoder and the packet checks then run once per run instead of once
    per packet. Stream data is a byte stream, so the merge changes nothing else.
    An event is yielded only after everything before it, so a consumer that stops
    early leaves the rest in aioquic's queue.
    """
    run: StreamDataReceived | None = None
    chunks: list[bytes] = []
    while (event := quic.next_event()) is not None:
        if type(event) is StreamDataReceived:
            if run is not None and event.stream_id == run.stream_id and not run.end_stream:
                chunks.append(event.data)
                run.end_stream = event.end_stream
                continue
            if run is not None:
                yield _merged(run, chunks)
            run = StreamDataReceived(event.data, event.end_stream, event.stream_id)
            chunks = [event.data]
            continue
        if run is not None:
            yield _merged(run, chunks)
            run = None
        yield event
    if run is not None:
        yield _merged(run, chunks)


def _merged(run: StreamDataReceived, chunks: list[bytes]) -> StreamDataReceived:
    if len(chunks) > 1:
        run.data = b"".join(chunks)
    return run


class QuicPeer:
    """One QUIC connection with its H3 layer, its timer and a way to send datagrams."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        quic: GuardedConnection,
        send: Callable[[Iterable[tuple[bytes, Address]]], None],
    ) -> None:
        self.loop = loop
        self.quic = quic
        self.h3: H3Connection | None = None
        self._send = send
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self.closed = False
        self.created = monotonic()  # for the handshake latency histogram

    # Subclasses handle the events aioquic produced.
    def process_events(self) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        """Send everything aioquic has queued and re-arm the timer."""
        self._send(self.quic.datagrams_to_send(now=monotonic()))
        self._arm_timer()

    def _arm_timer(self) -> None:
        at = self.quic.get_timer()
        if at == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = at
        if at is not None:
            self._timer = self.loop.call_later(max(0.0, at - monotonic()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self.quic.handle_timer(now=monotonic())
        self.process_events()
        if not self.closed:
            self.flush()

    def cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = None


class BacklogBound:
    """How many unacknowledged bytes a tunnel may hold before packets are dropped
    (tail drop, like a router queue): a bound in time, not in bytes.

    aioquic's stream send buffer and its datagram queue are both unbounded. The bound
    is what the peer has been acknowledging per second times (minimum RTT +
    QUEUE_TARGET): the data in flight plus at most ~QUEUE_TARGET of queue, whatever
    the link's speed, kept between FLOOR and CEILING. A fixed 128 KiB was 5 ms of
    queue at 200 Mbit/s but 100 ms on a 10 Mbit/s uplink. 6 ms: at ~240 Mbit/s, 10 ms
    gave the same throughput with ping p99 under load 12-22 ms instead of ~10 ms,
    though with fewer inner-TCP retransmissions (~1k instead of ~11k per 6 s).
    Stream mode bounds the stream's unacknowledged bytes (``update``), datagram mode
    the connection's bytes in flight plus its queued datagrams (DatagramBound).
    """

    QUEUE_TARGET = 0.006
    FLOOR = 64 * 1024
    CEILING = 4 * 1024 * 1024
    WINDOW = 0.025  # rate samples span at least this long
    # ... or only this long (and at least one min RTT) while the bound is dropping:
    # a flow starting after an idle second met a bound still sized for the idle rate
    # and lost ~60-90 packets (0.1% of a 3 s transfer at 200 Mbit/s) in the 25 ms
    # the first sample took.
    SHORT_WINDOW = 0.003
    RATE_HORIZON = 1.0  # the rate is the best sample of this long
    # A bound unused this long has rested: the next packets start a new flow, and
    # its first rate sample covers only that flow, not the idle time before it.
    REST = 0.1
    # Above the bound for less than GRACE, a tunnel may hold up to GRACE_FACTOR times
    # it (CoDel's distinction between a burst and a standing queue): the relay,
    # sharing two cores with everything else, sometimes stalls for 7-10 ms; its
    # acknowledgements stop, the bytes in flight pass the bound, and a flow at half
    # the tunnel's capacity lost 0.05-0.25% of its packets to those stalls alone.
    GRACE = 0.010
    GRACE_FACTOR = 2

    def __init__(self) -> None:
        self.limit = self.FLOOR
        self.rate = 0.0  # acknowledged bytes per second (best recent window)
        # Set by whoever dropped a packet because of the bound since the last sample.
        self.limited = False
        self._at: float | None = None
        self._acked = 0
        self._samples: collections.deque[tuple[float, float]] = collections.deque()
        self._used: float | None = None  # last follow()
        self._over_since: float | None = None  # above the bound since then

    def update(self, quic: QuicConnection, stream_id: int, now: float) -> int:
        """The bound for the stream now; call before queuing on it."""
        stream = quic._streams.get(stream_id)  # aioquic exposes no public accessor
        if stream is None:
            return self.limit
        # Every byte below _buffer_start is acknowledged.
        return self.follow(quic, stream.sender._buffer_start, now)

    def follow(self, quic: QuicConnection, acked: int, now: float) -> int:
        """The bound now, from ``acked``: a count of acknowledged bytes that only grows."""
        used, self._used = self._used, now
        if self._at is None or used is None or now - used > self.REST:
            self._at, self._acked = now, acked
            return self.limit
        elapsed = now - self._at
        if elapsed < self.WINDOW and not (
            self.limited and elapsed >= self.SHORT_WINDOW and elapsed >= _min_rtt(quic)
        ):
            return self.limit
        min_rtt = _min_rtt(quic)
        sample = (acked - self._acked) / elapsed
        self._at, self._acked = now, acked
        self.limited = False
        # The best rate of the last RATE_HORIZON (a max filter, as BBR keeps its
        # bandwidth estimate): rises at once when a transfer starts, and a dip does
        # not shrink the bound, which would drop more and deepen the dip.
        samples = self._samples
        samples.append((now, sample))
        while samples[0][0] < now - self.RATE_HORIZON:
            samples.popleft()
        self.rate = max(r for _, r in samples)
        self.limit = int(
            min(self.CEILING, max(self.FLOOR, self.rate * (min_rtt + self.QUEUE_TARGET)))
        )
        return self.limit

    def room(self, bound: int, used: int, now: float) -> int:
        """Bytes that may still be queued now, with ``used`` bytes held (in flight or
        queued) against ``bound`` (from ``update``/``follow``): up to GRACE_FACTOR
        times the bound unless ``used`` has stayed above the bound for GRACE."""
        if used <= bound:
            self._over_since = None
        elif self._over_since is None:
            self._over_since = now
        elif now - self._over_since >= self.GRACE:
            return bound - used
        return bound * self.GRACE_FACTOR - used


def _min_rtt(quic: QuicConnection) -> float:
    """aioquic's minimum RTT in seconds, 0 before it has one (or if implausible)."""
    min_rtt = getattr(getattr(quic, "_loss", None), "_rtt_min", 0.0)
    return min_rtt if 0.0 < min_rtt < 1.0 else 0.0


def delivered_bytes(quic: QuicConnection) -> int | None:
    """Bytes the peer has acknowledged on the connection (DeliveryCountingCubic);
    None with another congestion controller."""
    delivered = getattr(getattr(getattr(quic, "_loss", None), "_cc", None), "delivered", None)
    return delivered if isinstance(delivered, int) else None


def send_packets_on_stream(
    h3: H3Connection,
    quic: QuicConnection,
    stream_id: int,
    packets: list[bytes],
    mtu: int,
    counters: TrafficCounters,
    bound: BacklogBound,
) -> bool:
    """Stream mode: frame ``packets`` into one DATA write on the tunnel stream.

    Packets above ``mtu`` and those that would push the stream's backlog past
    ``bound`` are dropped and counted. Returns True if anything was queued.
    """
    now = monotonic()
    budget = bound.room(
        bound.update(quic, stream_id, now), stream_send_backlog(quic, stream_id), now
    )
    batch: list[bytes] = []
    nbytes = 0
    for pkt in packets:
        size = len(pkt)
        if size > mtu:
            counters.drops[DROP_OVERSIZED] += 1
            continue
        if nbytes + size + 2 > budget:
            counters.drops[DROP_QUEUE_FULL] += 1
            bound.limited = True
            continue
        batch.append(pkt)
        nbytes += size + 2
    if not batch:
        return False
    counters.sent(len(batch), nbytes - 2 * len(batch))
    h3.send_data(stream_id, encode_frames(batch), end_stream=False)
    return True


def rtt_ms(quic: QuicConnection) -> float | None:
    """Smoothed RTT of a connection in milliseconds, None before the first sample."""
    loss = getattr(quic, "_loss", None)  # aioquic keeps it in its recovery object
    if loss is None or not getattr(loss, "_rtt_initialized", False):
        return None
    return round(float(loss._rtt_smoothed) * 1000, 3)


def congestion_window(quic: QuicConnection) -> int | None:
    """The connection's congestion window in bytes (aioquic's recovery state)."""
    loss = getattr(quic, "_loss", None)
    if loss is None:
        return None
    try:
        return int(loss.congestion_window)
    except AttributeError:  # another aioquic layout: show nothing rather than fail
        return None


def bytes_in_flight(quic: QuicConnection) -> int | None:
    """Bytes sent and not yet acknowledged or declared lost."""
    loss = getattr(quic, "_loss", None)
    if loss is None:
        return None
    try:
        return int(loss.bytes_in_flight)
    except AttributeError:
        return None


def stream_send_backlog(quic: QuicConnection, stream_id: int) -> int:
    """Bytes queued on a stream but not yet acknowledged by the peer.

    aioquic's stream send buffer is unbounded; this lets the data path apply its own
    bound (BacklogBound) instead of buffering without limit.
    """
    stream = quic._streams.get(stream_id)  # aioquic exposes no public accessor
    if stream is None:
        return 0
    return len(stream.sender._buffer)


# HTTP/3 error code for a peer that makes us hold too much (RFC 9114 §8.1).
H3_EXCESSIVE_LOAD = 0x107
# Error codes of the closes GuardedConnection makes (or aioquic makes on its behalf),
# with what each means for the log.
LIMIT_ERRORS: dict[int, str] = {
    QuicErrorCode.FLOW_CONTROL_ERROR: "sent past its flow-control credit",
    QuicErrorCode.STREAM_LIMIT_ERROR: "opened more streams than allowed",
    QuicErrorCode.CRYPTO_BUFFER_EXCEEDED: "sent a handshake message too large",
    H3_EXCESSIVE_LOAD: "left too much in incomplete messages",
}


class GuardedConnection(QuicConnection):
    """A QuicConnection whose receive credit follows what our side consumed.

    aioquic doubles a stream's window once the peer's highest offset passes half of
    it, and the connection's once the bytes counted against it do, and zero-fills the
    receive buffer up to that offset: 1-byte STREAM frames at the end of each window
    make it allocate the whole window, then twice that. Here the windows start small
    (``ReceiveLimits``), an admitted tunnel stream gets a large one
    (``open_tunnel``), and ``settle`` (before each send) grants credit only as
    consumed bytes + window, where bytes still held above QUIC (an incomplete HTTP/3
    frame) are not consumed. A peer that sends past its credit gets aioquic's own
    FLOW_CONTROL_ERROR; one that opens more streams than allowed STREAM_LIMIT_ERROR;
    one whose TLS or HTTP/3 messages stay incomplete past ``max_held`` is closed too.
    """

    def __init__(
        self, *args: Any, receive_limits: ReceiveLimits | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.receive_limits = limits = receive_limits or ReceiveLimits()
        self._windows: dict[int, int] = {}  # stream ID -> window of an admitted tunnel
        self._connection_window = limits.connection_window
        # Set before the transport parameters are sent (at the first handshake step).
        self._local_max_data.value = self._local_max_data.sent = limits.connection_window
        self._local_max_stream_data_bidi_local = limits.stream_window
        self._local_max_stream_data_bidi_remote = limits.stream_window
        self._local_max_stream_data_uni = limits.stream_window
        for limit, count in (
            (self._local_max_streams_bidi, limits.bidi_streams),
            (self._local_max_streams_uni, limits.uni_streams),
        ):
            limit.value = limit.sent = count
        self.exceeded: str | None = None  # why settle() closed the connection

    def local_close_code(self) -> int | None:
        """The error code of a close this side started (a limit aioquic enforces
        itself, such as flow control, ends up here), None while open."""
        event = self._close_event
        return None if event is None else event.error_code

    def open_tunnel(self, stream_id: int) -> None:
        """``stream_id`` carries an admitted tunnel: give it (and the connection) the
        tunnel's windows from the next send on."""
        limits = self.receive_limits
        self._windows[stream_id] = limits.tunnel_window
        self._connection_window = max(self._connection_window, limits.tunnel_connection_window)

    def settle(self, held: dict[int, int]) -> int:
        """Grant credit for what was consumed; returns the bytes held for this peer.

        ``held``: bytes an upper layer keeps per stream (incomplete HTTP/3 frames).
        """
        limits = self.receive_limits
        tls = getattr(self, "tls", None)
        upper = sum(held.values()) + (len(tls._receive_buffer) if tls is not None else 0)
        if upper > limits.max_held and self.exceeded is None:
            self.exceeded = f"{upper} bytes held in incomplete HTTP/3 or TLS messages"
            self.close(error_code=H3_EXCESSIVE_LOAD, reason_phrase="excessive load")
        windows = self._windows
        buffered = 0
        for stream_id, stream in self._streams.items():
            limit = stream.max_stream_data_local
            if not limit:  # our own unidirectional streams receive nothing
                continue
            receiver = stream.receiver
            buffered += len(receiver._buffer)  # out of order, or a gap the peer left
            window = windows.get(stream_id, limits.stream_window)
            credit = receiver._buffer_start - held.get(stream_id, 0) + window
            if credit - limit >= window >> 1:
                stream.max_stream_data_local = credit
        if len(windows) > limits.bidi_streams:
            for stream_id in [s for s in windows if s not in self._streams]:
                del windows[stream_id]
        max_data = self._local_max_data
        window = self._connection_window
        credit = max_data.used - buffered - upper + window
        if credit - max_data.value >= window >> 1:
            max_data.value = credit
        return buffered + upper

    # The two writers below send what settle() granted; aioquic's own versions would
    # first double the windows from the highest offsets received.

    def _write_connection_limits(self, builder: QuicPacketBuilder, space: Any) -> None:
        for limit in (
            self._local_max_data,
            self._local_max_streams_bidi,
            self._local_max_streams_uni,
        ):
            if limit.value == limit.sent:
                continue
            if limit is not self._local_max_data and (
                limit.sent - limit.used >= limit.value - limit.sent
            ):
                continue  # batch MAX_STREAMS until the peer is short of streams
            buf = builder.start_frame(
                limit.frame_type,
                capacity=CONNECTION_LIMIT_FRAME_CAPACITY,
                handler=self._on_connection_limit_delivery,
                handler_args=(limit,),
            )
            buf.push_uint_var(limit.value)
            limit.sent = limit.value

    def _write_stream_limits(self, builder: QuicPacketBuilder, space: Any, stream: Any) -> None:
        if stream.max_stream_data_local_sent == stream.max_stream_data_local:
            return
        buf = builder.start_frame(
            QuicFrameType.MAX_STREAM_DATA,
            capacity=MAX_STREAM_DATA_FRAME_CAPACITY,
            handler=self._on_max_stream_data_delivery,
            handler_args=(stream,),
        )
        buf.push_uint_var(stream.stream_id)
        buf.push_uint_var(stream.max_stream_data_local)
        stream.max_stream_data_local_sent = stream.max_stream_data_local

    def _handle_crypto_frame(self, context: Any, frame_type: int, buf: Any) -> None:
        # aioquic's TLS layer buffers a handshake message until all of it arrived, and a
        # message may claim 16 MiB: bound what waits there (RFC 9000 §7.5).
        start = buf.tell()
        offset = buf.pull_uint_var()
        length = buf.pull_uint_var()
        buf.seek(start)
        stream = self._crypto_streams.get(context.epoch)
        tls = getattr(self, "tls", None)
        if stream is not None and tls is not None:
            pending = offset + length - stream.receiver.starting_offset()
            if pending + len(tls._receive_buffer) > self.receive_limits.max_held:
                raise QuicConnectionError(
                    error_code=QuicErrorCode.CRYPTO_BUFFER_EXCEEDED,
                    frame_type=frame_type,
                    reason_phrase="handshake message too large",
                )
        super()._handle_crypto_frame(context, frame_type, buf)


def h3_held(h3: H3Connection) -> dict[int, int]:
    """Bytes aioquic's HTTP/3 layer keeps per stream while a frame is incomplete."""
    return {sid: len(s.buffer) for sid, s in h3._stream.items() if s.buffer}


class ClientCertRequestingConnection(GuardedConnection):
    """A server connection whose TLS handshake asks the client for a certificate.

    aioquic only has a private switch for this; it then checks the client's proof of
    key possession (CertificateVerify) but not the chain, which the relay verifies
    itself (masqued.auth.verify_client_certificate) before serving a CONNECT. A client
    without a certificate may still complete the handshake (RFC 8446 §4.4.2.4), so
    token authentication keeps working on the same relay.
    """

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        self.tls._request_client_certificate = True


def peer_certificate(quic: QuicConnection) -> tuple[Any, list[Any]]:
    """The certificate (and chain) the peer presented in the handshake, if any."""
    tls = getattr(quic, "tls", None)
    if tls is None:
        return None, []
    return getattr(tls, "_peer_certificate", None), list(
        getattr(tls, "_peer_certificate_chain", []) or []
    )
