"""Driving aioquic's sans-I/O QuicConnection directly.

aioquic's own asyncio adapter reads one datagram per event-loop pass and calls
``transmit()`` after every datagram; that is where most of its CPU goes. Here we own
the UDP socket: every wake-up drains it until EAGAIN, feeds the whole batch to the
connections, and only then asks each touched connection for its datagrams, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any

from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

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
        congestion_control_algorithm="cubic",
    )


def tune_socket(sock: socket.socket) -> None:
    """Large kernel buffers: bursts of a whole batch must not be dropped by the kernel."""
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):  # best effort
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
    sock.setblocking(False)


class UdpSocket:
    """A non-blocking UDP socket drained on every wake-up."""

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

    def start(self) -> None:
        self._loop.add_reader(self.sock.fileno(), self._read_ready)
        self._reading = True

    def close(self) -> None:
        if self._reading:
            self._loop.remove_reader(self.sock.fileno())
            self._reading = False
        self.sock.close()

    def _read_ready(self) -> None:
        recvfrom = self.sock.recvfrom
        batch: list[tuple[bytes, Address]] = []
        for _ in range(RECV_BATCH):
            try:
                batch.append(recvfrom(RECV_BUFSIZE))
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                # ICMP errors surface here on connected sockets (ECONNREFUSED); the
                # QUIC layer notices the silence through its own timers.
                if exc.errno not in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                    log.debug("recvfrom failed: %s", exc)
                break
        if batch:
            self._on_batch(batch)

    def send(self, datagrams: Iterable[tuple[bytes, Address]]) -> None:
        sendto = self.sock.sendto
        for data, addr in datagrams:
            try:
                sendto(data, addr)
            except (BlockingIOError, InterruptedError):
                # Kernel buffer full: QUIC treats it as loss and retransmits.
                self.send_errors += 1
            except OSError:
                self.send_errors += 1


class QuicPeer:
    """One QUIC connection with its H3 layer, its timer and a way to send datagrams."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        quic: QuicConnection,
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
    bound (tail drop, like a router queue) instead of buffering without limit.
    """
    stream = quic._streams.get(stream_id)  # aioquic exposes no public accessor
    if stream is None:
        return 0
    return len(stream.sender._buffer)


class ClientCertRequestingConnection(QuicConnection):
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
