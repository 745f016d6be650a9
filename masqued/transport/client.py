"""The client's data path: the TUN device <-> one CONNECT-IP tunnel to the relay.

``ClientTunnel.run`` keeps a tunnel up for as long as the daemon runs: it connects,
sends the extended CONNECT, applies the relay's answer (addresses, MTU) through a
callback, moves packets, and when the relay goes away it keeps the TUN and routes in
place and reconnects with capped exponential backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aioquic.h3.connection import ErrorCode as H3ErrorCode
from aioquic.h3.connection import H3Connection, Setting
from aioquic.h3.events import DatagramReceived, DataReceived, H3Event, HeadersReceived
from aioquic.quic.events import (
    ConnectionTerminated,
    HandshakeCompleted,
    PingAcknowledged,
    StreamReset,
)

from masqued.logutil import RateLimitedLog
from masqued.observe.metrics import (
    DROP_DISCONNECTED,
    DROP_MALFORMED,
    DROP_OVERSIZED,
    DROP_TUN_WRITE,
    LatencyHistogram,
    TrafficCounters,
)
from masqued.proto.capsule import (
    ADDRESS_ASSIGN,
    DATAGRAM,
    ROUTE_ADVERTISEMENT,
    Capsule,
    CapsuleDecoder,
)
from masqued.proto.connect_ip import (
    RequestedAddress,
    decode_address_assign,
    decode_address_request,
    decode_datagram_payload,
    decode_route_advertisement,
    encode_address_request,
    encode_ip_datagram,
)
from masqued.proto.errors import (
    CapsuleError,
    FramingError,
    PacketError,
    ProtocolError,
    ResponseError,
)
from masqued.proto.framing import FrameDecoder
from masqued.proto.packet import addresses
from masqued.proto.request import (
    IPV6_MIN_MTU,
    TunnelParams,
    build_connect_request,
    capsule_protocol_true,
    parse_stream_response,
)
from masqued.transport.datagrams import (
    MAX_DATAGRAM_FRAME_SIZE,
    DatagramBound,
    DatagramH3Connection,
    datagram_room,
    queue_datagram,
)
from masqued.transport.quic import (
    Address,
    BacklogBound,
    GuardedConnection,
    QuicPeer,
    UdpSocket,
    bytes_in_flight,
    congestion_window,
    h3_held,
    merged_events,
    monotonic,
    quic_configuration,
    rtt_ms,
    send_packets_on_stream,
    tune_socket,
    use_burst_pacer,
)
from masqued.transport.relay import TUN_READ_BATCH, Tun

log = logging.getLogger("masqued.client")

# The handshake, SETTINGS and the CONNECT response must all arrive within this time.
CONNECT_TIMEOUT = 5.0
BACKOFF_INITIAL = 0.25
# Datagram mode: largest control capsule we accept from the relay.
MAX_CONTROL_CAPSULE = 16384
DROP_UNKNOWN_CONTEXT = "unknown_context"
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class TunnelFailed(Exception):
    """This attempt is over; the reason is logged and we back off and retry."""


class TunnelRefused(TunnelFailed):
    """The relay answered the CONNECT with a non-2xx status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ClientSettings:
    relay_host: str
    relay_port: int
    server_name: str
    ca: str
    mtu: int
    fwmark: int  # 0: do not mark
    keepalive: float = 1.0
    reconnect_max: float = 4.0
    # "stream", "datagram" (RFC 9484 HTTP Datagrams) or "auto" (datagram when the
    # relay's SETTINGS offer H3 datagrams, else stream).
    transport: str = "stream"
    # Datagram mode: send ADDRESS_REQUEST (some proxies reject it; RFC 9484 lets the
    # proxy assign unprompted).
    address_request: bool = False
    # Datagram mode, address_request: the IP versions to ask an address for.
    request_versions: tuple[int, ...] = (4, 6)
    # Credentials for the relay's `auth`: a client certificate, a token file.
    certificate: str | None = None
    private_key: str | None = None
    token_file: str | None = None

    def token(self) -> str | None:
        """The bearer token, read at each attempt (so a replaced file takes effect)."""
        if self.token_file is None:
            return None
        try:
            with open(self.token_file) as f:
                return f.read().strip() or None
        except OSError as exc:
            raise TunnelFailed(
                f"cannot read token_file {self.token_file}: {exc.strerror}"
            ) from None

    @property
    def dead_after(self) -> float:
        """Silence from the relay after which the tunnel is declared dead."""
        return max(3.0, 3 * self.keepalive)

    @property
    def authority(self) -> str:
        host = self.server_name
        return f"[{host}]:{self.relay_port}" if ":" in host else f"{host}:{self.relay_port}"


@dataclass
class ClientStatus:
    state: str = "starting"
    relay_addr: str | None = None
    params: TunnelParams | None = None
    connected_since: float | None = None
    last_error: str | None = None
    connects: int = 0
    counters: TrafficCounters = field(default_factory=TrafficCounters)
    handshakes: LatencyHistogram = field(default_factory=LatencyHistogram)
    started: float = field(default_factory=time.time)


class ClientConnection(QuicPeer):
    """One attempt: QUIC connection + CONNECT-IP stream."""

    def __init__(
        self,
        tunnel: ClientTunnel,
        quic: GuardedConnection,
        udp: UdpSocket,
    ) -> None:
        super().__init__(tunnel.loop, quic, udp.send)
        self.tunnel = tunnel
        self.udp = udp
        self.h3: H3Connection = DatagramH3Connection(quic)
        self.stream_id: int | None = None
        self.params: TunnelParams | None = None
        self.decoder = FrameDecoder(tunnel.settings.mtu)
        self.token: str | None = None  # bearer token for the CONNECT, if configured
        # Datagram mode: the transport picked once the relay's SETTINGS are known, the
        # capsule decoder of the request stream, what the relay assigned and advertised.
        self.transport = "stream"
        self.capsules = CapsuleDecoder(
            max_value=MAX_CONTROL_CAPSULE, max_datagram=tunnel.settings.mtu + 8
        )
        self.responded = False
        self.assigned: tuple[IPNetwork, ...] | None = None
        self.routes: tuple[IPNetwork, ...] | None = None
        self.rx_packets: list[bytes] = []
        self.bound = BacklogBound()  # the tunnel stream's queue (stream mode)
        self.datagram_bound = DatagramBound()  # the connection's queue (datagram mode)
        self._request_ids: dict[int, int] = {}  # request ID -> IP version
        self.ready: asyncio.Future[TunnelParams] = tunnel.loop.create_future()
        self.done: asyncio.Future[str] = tunnel.loop.create_future()
        self.last_rx = monotonic()
        self._ping_uid = 0

    def datagrams_received(self, batch: list[tuple[bytes, Address]]) -> None:
        now = monotonic()
        self.last_rx = now
        receive = self.quic.receive_datagram
        for data, addr in batch:
            receive(data, addr, now)
        tunnel = self.tunnel
        tunnel.batching = True
        try:
            self.process_events()
        finally:
            tunnel.batching = False
            tunnel.write_tun()
        if not self.closed:
            if tunnel.conn is self:
                tunnel.pump_tun()
            self.flush()

    def process_events(self) -> None:
        h3 = self.h3
        assert h3 is not None
        for event in merged_events(self.quic):
            if isinstance(event, ConnectionTerminated):
                reason = event.reason_phrase or f"code {event.error_code:#x}"
                self.finish(f"connection closed by relay or timeout ({reason})")
                return
            if isinstance(event, StreamReset) and event.stream_id == self.stream_id:
                self.finish(f"relay reset the tunnel stream (code {event.error_code:#x})")
                return
            if isinstance(event, (HandshakeCompleted, PingAcknowledged)):
                pass
            for h3_event in h3.handle_event(event):
                self._h3_event(h3_event)
                if self.closed:
                    return
        if self.rx_packets:
            packets, self.rx_packets = self.rx_packets, []
            self.tunnel.datagram_packets(packets)
        if self.stream_id is None and h3.received_settings is not None:
            self._send_request(h3.received_settings)

    def _send_request(self, settings: dict[int, int]) -> None:
        # RFC 9220 §3: extended CONNECT only once the peer's SETTINGS allow it.
        if settings.get(Setting.ENABLE_CONNECT_PROTOCOL) != 1:
            self.fail("relay does not support extended CONNECT (SETTINGS_ENABLE_CONNECT_PROTOCOL)")
            return
        wanted = self.tunnel.settings.transport
        offers_datagrams = settings.get(Setting.H3_DATAGRAM) == 1
        if wanted == "datagram" and not offers_datagrams:
            self.fail("relay does not offer HTTP/3 datagrams (SETTINGS_H3_DATAGRAM)")
            return
        self.transport = (
            "datagram"
            if wanted == "datagram" or (wanted == "auto" and offers_datagrams)
            else "stream"
        )
        if wanted == "auto":
            log.info(
                "transport auto: relay %s H3 datagrams, using %s mode",
                "offers" if offers_datagrams else "does not offer",
                self.transport,
            )
        self.stream_id = self.quic.get_next_available_stream_id()
        self.quic.open_tunnel(self.stream_id)
        extra: list[tuple[bytes, bytes]] = []
        if self.token is not None:
            extra.append((b"authorization", b"Bearer " + self.token.encode()))
        headers = build_connect_request(
            self.tunnel.settings.authority, transport=self.transport, extra=extra
        )
        self.h3.send_headers(self.stream_id, headers, end_stream=False)

    def _h3_event(self, event: H3Event) -> None:
        if self.transport == "datagram":
            self._h3_event_datagram(event)
            return
        if isinstance(event, HeadersReceived) and event.stream_id == self.stream_id:
            if self.params is not None:
                self.fail("unexpected HEADERS on the tunnel stream")
                return
            status = dict(event.headers).get(b":status", b"")
            try:
                params = parse_stream_response(event.headers)
            except ResponseError as exc:
                if status.isdigit() and not status.startswith(b"2"):
                    self.fail(TunnelRefused(int(status), f"relay refused the tunnel: {exc.reason}"))
                else:
                    self.fail(f"unusable response from relay: {exc.reason}")
                return
            self.params = params
            if not self.ready.done():
                self.ready.set_result(params)
            if event.stream_ended:
                self.finish("relay closed the tunnel stream")
        elif isinstance(event, DataReceived) and event.stream_id == self.stream_id:
            if self.params is None:
                self.fail("tunnel data before the response")
                return
            if event.data:
                self.tunnel.packets_from_relay(self, event.data)
            if event.stream_ended and not self.closed:
                self.finish("relay closed the tunnel stream")

    # -- datagram mode (RFC 9484) ---------------------------------------------------

    def _h3_event_datagram(self, event: H3Event) -> None:
        if isinstance(event, DatagramReceived):
            if event.stream_id != self.stream_id or not self.responded:
                return  # not our tunnel (or not open yet): dropped (RFC 9297 §2.1)
            try:
                context_id, packet = decode_datagram_payload(event.data)
            except CapsuleError:
                self.tunnel.status.counters.drops[DROP_MALFORMED] += 1
                return
            if context_id != 0:
                self.tunnel.status.counters.drops[DROP_UNKNOWN_CONTEXT] += 1
                return
            self.rx_packets.append(packet)
        elif isinstance(event, HeadersReceived) and event.stream_id == self.stream_id:
            if self.responded:
                self.fail("unexpected HEADERS on the tunnel stream")
                return
            self._datagram_response(event.headers)
            if event.stream_ended and not self.closed:
                self.finish("relay closed the tunnel stream")
        elif isinstance(event, DataReceived) and event.stream_id == self.stream_id:
            if not self.responded:
                self.fail("tunnel data before the response")
                return
            try:
                capsules = self.capsules.feed(event.data) if event.data else []
                if event.stream_ended:
                    self.capsules.end()
                for capsule in capsules:
                    self._capsule(capsule)
            except CapsuleError as exc:
                self.tunnel.status.counters.drops[DROP_MALFORMED] += 1
                # RFC 9297 §3.3: a malformed message aborts the stream.
                with contextlib.suppress(Exception):
                    self.quic.reset_stream(self.stream_id, exc.wire_code)
                    self.quic.stop_stream(self.stream_id, exc.wire_code)
                self.flush()  # the reset leaves before the connection is closed
                self.fail(f"malformed capsule from relay: {exc.reason}")
                return
            if event.stream_ended and not self.closed:
                self.finish("relay closed the tunnel stream")

    def _datagram_response(self, headers: list[tuple[bytes, bytes]]) -> None:
        fields: dict[bytes, list[str]] = {}
        for name, value in headers:
            fields.setdefault(name.lower(), []).append(value.decode("latin-1"))
        status_text = (fields.get(b":status") or [""])[0]
        if len(status_text) != 3 or not status_text.isdigit():
            self.fail(f"unusable response from relay: bad :status {status_text!r}")
            return
        status = int(status_text)
        if status < 200:
            return  # interim response: the final one follows
        if status >= 300:
            self.fail(TunnelRefused(status, f"relay refused the tunnel: status {status}"))
            return
        if not capsule_protocol_true(fields.get(b"capsule-protocol", [])):
            self.fail(f"relay answered {status} without capsule-protocol: ?1")
            return
        self.responded = True
        settings = self.tunnel.settings
        if settings.address_request:
            requests: list[RequestedAddress] = []
            for version in settings.request_versions:
                request_id = len(self._request_ids) + 1
                self._request_ids[request_id] = version
                any_addr = ipaddress.ip_network("0.0.0.0/32" if version == 4 else "::/128")
                requests.append(RequestedAddress(request_id, any_addr))
            if requests:
                assert self.stream_id is not None
                self.h3.send_data(self.stream_id, encode_address_request(requests), False)

    def _capsule(self, capsule: Capsule) -> None:
        kind = capsule.type
        if kind == ADDRESS_ASSIGN:
            assign = decode_address_assign(capsule.value)
            self.assigned = assign.usable()
            refused = [a.request_id for a in assign.addresses if a.is_rejection and a.request_id]
            if refused:
                log.warning("relay declined address request(s) %s", refused)
            self._update_params()
        elif kind == ROUTE_ADVERTISEMENT:
            self.routes = decode_route_advertisement(capsule.value).networks()
            self._update_params()
        elif kind == DATAGRAM:
            context_id, packet = decode_datagram_payload(capsule.value)
            if context_id == 0:
                self.rx_packets.append(packet)
            else:
                self.tunnel.status.counters.drops[DROP_UNKNOWN_CONTEXT] += 1
        else:
            # ADDRESS_REQUEST from the relay: checked (a malformed one aborts), but we
            # assign no addresses to the relay.
            decode_address_request(capsule.value)

    def _update_params(self) -> None:
        """Once both the addresses and the routes are known: first up, or a change."""
        if self.assigned is None or self.routes is None:
            return
        params = TunnelParams(
            addresses=tuple(_interface(p) for p in self.assigned),
            routes=self.routes,
            mtu=self.tunnel.settings.mtu,
        )
        if params == self.params:
            return
        first = self.params is None
        self.params = params
        if first:
            if not params.addresses:
                self.fail("relay assigned no address")
                return
            if not self.ready.done():
                self.ready.set_result(params)
        else:
            self.tunnel.params_changed(self, params)

    def flush(self) -> None:
        # Receive credit as consumed, and a relay whose messages stay incomplete past
        # the limit is closed (settle queues the close; the attempt then ends).
        self.quic.settle(h3_held(self.h3))
        super().flush()

    def keepalive(self) -> None:
        """Ping when idle; declare the tunnel dead when the relay stays silent."""
        now = monotonic()
        silent = now - self.last_rx
        settings = self.tunnel.settings
        if silent >= settings.dead_after:
            self.fail(f"no answer from relay for {silent:.1f}s")
            return
        if silent >= settings.keepalive:
            self._ping_uid += 1
            self.quic.send_ping(self._ping_uid)
            self.flush()

    def fail(self, reason: str | Exception) -> None:
        """Close the QUIC connection and end this attempt with ``reason``."""
        if self.closed:
            return
        message = str(reason)
        with contextlib.suppress(Exception):
            self.quic.close(error_code=H3ErrorCode.H3_NO_ERROR, reason_phrase=message[:64])
            self.flush()
        if isinstance(reason, Exception) and not self.ready.done():
            self.ready.set_exception(reason)
        self.finish(message)

    def finish(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.cancel_timer()
        if not self.ready.done():
            self.ready.set_exception(TunnelFailed(reason))
        if not self.done.done():
            self.done.set_result(reason)


class ClientTunnel:
    """Keeps one CONNECT-IP tunnel up and pumps packets between it and the TUN."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        settings: ClientSettings,
        tun: Tun,
        on_params: Callable[[TunnelParams], None],
        on_state: Callable[[ClientStatus], None] | None = None,
    ) -> None:
        self.loop = loop
        self.settings = settings
        self.tun = tun
        # Packets from the relay, written to the TUN once per UDP batch (write_tun).
        self._tun_out: list[bytes] = []
        self.batching = False
        self.on_params = on_params
        self.on_state = on_state
        self.status = ClientStatus()
        self.conn: ClientConnection | None = None
        self._ratelog = RateLimitedLog(log)
        self._stopping = False
        self._attempting: ClientConnection | None = None

    # -- lifecycle --------------------------------------------------------------

    async def run(self, first_up: asyncio.Future[None] | None = None) -> None:
        """Connect and reconnect until ``stop()``; ``first_up`` resolves at the first tunnel."""
        self.loop.add_reader(self.tun.fileno(), self._tun_ready)
        backoff = BACKOFF_INITIAL
        try:
            while not self._stopping:
                began = monotonic()
                try:
                    reason = await self._attempt(first_up)
                except TunnelRefused as exc:
                    reason = str(exc)
                    self.status.last_error = reason
                except TunnelFailed as exc:
                    reason = str(exc)
                    self.status.last_error = reason
                except OSError as exc:
                    reason = f"cannot reach relay: {exc.strerror or exc}"
                    self.status.last_error = reason
                if self._stopping:
                    break
                if monotonic() - began > 2 * self.settings.dead_after:
                    backoff = BACKOFF_INITIAL  # the tunnel was up for a while: retry soon
                delay = min(backoff, self.settings.reconnect_max) * random.uniform(0.8, 1.2)
                self._set_state("reconnecting")
                # Keyed by reason: a new kind of failure (e.g. a 403 after a
                # reset) is always logged; repeats of one are rate-limited.
                self._ratelog.warning(
                    f"down:{reason[:80]}",
                    "tunnel down: %s; reconnecting in %.1fs",
                    reason,
                    delay,
                )
                backoff = min(backoff * 2, self.settings.reconnect_max)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stopped_event().wait(), delay)
        finally:
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(self.tun.fileno())

    def _stopped_event(self) -> asyncio.Event:
        if not hasattr(self, "_stop_event"):
            self._stop_event = asyncio.Event()
            if self._stopping:
                self._stop_event.set()
        return self._stop_event

    def stop(self) -> None:
        self._stopping = True
        self._stopped_event().set()
        for conn in (self.conn, self._attempting):
            if conn is not None:
                conn.fail("client shutting down")

    def _set_state(self, state: str) -> None:
        self.status.state = state
        if self.on_state is not None:
            self.on_state(self.status)

    async def _attempt(self, first_up: asyncio.Future[None] | None) -> str:
        settings = self.settings
        self._set_state("connecting")
        infos = await self.loop.getaddrinfo(
            settings.relay_host, settings.relay_port, type=socket.SOCK_DGRAM
        )
        if not infos:
            raise TunnelFailed(f"cannot resolve {settings.relay_host}")
        if self._stopping:
            raise TunnelFailed("client shutting down")
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if settings.fwmark:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, settings.fwmark)
            tune_socket(sock)
            sock.connect(addr)
        except OSError:
            sock.close()
            raise
        config = quic_configuration(is_client=True, server_name=settings.server_name)
        config.max_datagram_frame_size = MAX_DATAGRAM_FRAME_SIZE
        config.load_verify_locations(cafile=settings.ca)
        if settings.certificate is not None:
            config.load_cert_chain(settings.certificate, settings.private_key)
        token = settings.token()
        quic = GuardedConnection(configuration=config)
        use_burst_pacer(quic)
        conn: ClientConnection | None = None

        def on_batch(batch: list[tuple[bytes, Address]]) -> None:
            if conn is not None and not conn.closed:
                conn.datagrams_received(batch)

        udp = UdpSocket(self.loop, sock, on_batch)
        conn = ClientConnection(self, quic, udp)
        conn.token = token
        # Nobody awaits ``ready`` after a timeout or a stop: mark its exception seen.
        conn.ready.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._attempting = conn
        udp.start()
        keepalive: asyncio.Task[None] | None = None
        try:
            quic.connect(addr, now=monotonic())
            conn.flush()
            try:
                params = await asyncio.wait_for(asyncio.shield(conn.ready), CONNECT_TIMEOUT)
            except TimeoutError:
                conn.fail("timed out connecting")
                raise TunnelFailed(
                    f"no tunnel within {CONNECT_TIMEOUT:.0f}s (relay down or UDP blocked?)"
                ) from None
            self.on_params(params)
            self.conn = conn
            self.status.relay_addr = _format(addr)
            self.status.params = params
            self.status.connected_since = time.time()
            self.status.connects += 1
            self.status.handshakes.observe(monotonic() - conn.created)
            self.status.last_error = None
            self._set_state("connected")
            addrs = ", ".join(str(a.ip) for a in params.addresses)
            log.info(
                "tunnel up: %s via %s as %s, mtu %d",
                settings.authority,
                _format(addr),
                addrs,
                params.mtu,
            )
            if first_up is not None and not first_up.done():
                first_up.set_result(None)
            keepalive = self.loop.create_task(self._keepalive(conn))
            return await conn.done
        finally:
            if keepalive is not None:
                keepalive.cancel()
            if self.conn is conn:
                self.conn = None
            self._attempting = None
            if not conn.closed:
                conn.fail("attempt ended")
            conn.cancel_timer()
            udp.close()

    async def _keepalive(self, conn: ClientConnection) -> None:
        interval = min(self.settings.keepalive, 1.0)
        while not conn.closed:
            await asyncio.sleep(interval)
            conn.keepalive()

    # -- packets ------------------------------------------------------------------

    def packets_from_relay(self, conn: ClientConnection, data: bytes) -> None:
        counters = self.status.counters
        try:
            packets = conn.decoder.feed(data)
        except FramingError as exc:
            counters.drops[DROP_MALFORMED] += 1
            conn.fail(f"malformed frame from relay: {exc.reason}")
            return
        if not packets:
            return
        counters.last_rx = time.time()
        counters.rx_packets += len(packets)
        counters.rx_bytes += sum(map(len, packets))
        self._to_tun(packets)

    def _to_tun(self, packets: list[bytes]) -> None:
        self._tun_out += packets
        if not self.batching:
            self.write_tun()

    def write_tun(self) -> None:
        """Write what the relay sent in this UDP batch to the TUN in one batch, so that
        consecutive TCP segments can go to the kernel as one (masqued.host.coalesce)."""
        if not self._tun_out:
            return
        packets, self._tun_out = self._tun_out, []
        dropped = self.tun.write_batch(packets)
        if dropped:
            self.status.counters.drops[DROP_TUN_WRITE] += dropped

    def _tun_ready(self) -> None:
        conn = self.pump_tun()
        if conn is not None:
            conn.flush()

    def pump_tun(self) -> ClientConnection | None:
        """Hand every packet waiting on the TUN to the connection, without sending.

        Returns the connection that has something new to send, or None. Called on TUN
        readiness and also right after a batch from the relay was written to the TUN:
        what the local stack answered meanwhile (TCP ACKs, new data the ACKs released)
        then leaves in the same flush as the QUIC ACKs instead of in packets of its own.
        """
        packets = self.tun.read_batch(TUN_READ_BATCH)
        if not packets:
            return None
        counters = self.status.counters
        conn = self.conn
        if conn is None or conn.closed or conn.stream_id is None:
            counters.drops[DROP_DISCONNECTED] += len(packets)
            return None
        if conn.transport == "datagram":
            return conn if self._send_datagrams(conn, packets) else None
        assert conn.h3 is not None
        try:
            if not send_packets_on_stream(
                conn.h3,
                conn.quic,
                conn.stream_id,
                packets,
                self.settings.mtu,
                counters,
                conn.bound,
            ):
                return None
        except ProtocolError as exc:  # pragma: no cover - defensive
            conn.fail(str(exc))
            return None
        except Exception as exc:
            # aioquic raises if the stream is already closed for sending.
            conn.fail(f"tunnel stream unusable: {exc}")
            return None
        return conn

    def params_changed(self, conn: ClientConnection, params: TunnelParams) -> None:
        """The relay sent new ADDRESS_ASSIGN / ROUTE_ADVERTISEMENT on a live tunnel."""
        if conn is not self.conn:
            return
        self.status.params = params
        log.info(
            "relay changed the tunnel: addresses %s, routes %s",
            ", ".join(map(str, params.addresses)) or "none",
            ", ".join(map(str, params.routes)) or "none",
        )
        self.on_params(params)
        self._set_state(self.status.state)

    def datagram_packets(self, packets: list[bytes]) -> None:
        """IP packets from the relay's HTTP Datagrams (or DATAGRAM capsules) -> TUN."""
        counters = self.status.counters
        counters.last_rx = time.time()
        valid: list[bytes] = []
        for pkt in packets:
            counters.rx_packets += 1
            counters.rx_bytes += len(pkt)
            try:
                addresses(pkt)
            except PacketError:
                counters.drops[DROP_MALFORMED] += 1
                continue
            valid.append(pkt)
        if valid:
            self._to_tun(valid)

    def _send_datagrams(self, conn: ClientConnection, packets: list[bytes]) -> bool:
        """TUN -> relay in datagram mode: one HTTP Datagram per packet, sizes checked
        before anything enters aioquic's queue, the queue bounded. True when something
        was queued (the caller flushes)."""
        counters = self.status.counters
        assert conn.stream_id is not None
        if not conn.responded:
            counters.drops[DROP_DISCONNECTED] += len(packets)
            return False
        room = datagram_room(conn.quic, conn.stream_id) - 1  # minus Context ID 0
        if (
            room < IPV6_MIN_MTU
            and conn.params
            and any(a.version == 6 for a in conn.params.addresses)
        ):
            # RFC 9484 §7.2: an IPv6 tunnel must carry 1280-byte packets.
            conn.fail(f"QUIC path carries only {room}-byte packets, below the IPv6 minimum MTU")
            return False
        sent = 0
        nbytes = 0
        bound = conn.datagram_bound
        bound.refresh(conn.quic, monotonic())
        for pkt in packets:
            if len(pkt) > room:
                counters.drops[DROP_OVERSIZED] += 1
                self._ratelog.warning(
                    "oversized",
                    "dropped a %d-byte packet: datagrams carry at most %d (lower mtu)",
                    len(pkt),
                    room,
                )
                continue
            payload = encode_ip_datagram(pkt)
            reason = queue_datagram(conn.h3, conn.quic, conn.stream_id, payload, bound)
            if reason:
                counters.drops[reason] += 1
                continue
            sent += 1
            nbytes += len(pkt)
        if sent:
            counters.sent(sent, nbytes)
        return sent > 0

    def snapshot(self) -> dict[str, Any]:
        """The tunnel as plain data (docs/status.schema.json, client part).

        ``sessions`` holds the one tunnel; its counters are cumulative over the
        instance's life (they survive reconnects), its RTT and congestion window are
        those of the current QUIC connection (null while disconnected).
        """
        st = self.status
        conn = self.conn
        quic = conn.quic if conn is not None and not conn.closed else None
        now = time.time()
        tunnel = {
            "id": "tunnel",
            "identity": None,
            "peer": st.relay_addr or f"{self.settings.relay_host}:{self.settings.relay_port}",
            "addresses": [str(a) for a in st.params.addresses] if st.params else [],
            "transport": getattr(conn, "transport", "stream"),
            "state": st.state,
            "connected_since": st.connected_since if st.state == "connected" else None,
            "rtt_ms": rtt_ms(quic) if quic is not None else None,
            "cwnd": congestion_window(quic) if quic is not None else None,
            "bytes_in_flight": bytes_in_flight(quic) if quic is not None else None,
            **st.counters.snapshot(),
        }
        return {
            "role": "client",
            "time": now,
            "started": st.started,
            "uptime": now - st.started,
            "state": st.state,
            "relay_mtu": st.params.mtu if st.params else None,
            "relay_routes": [str(r) for r in st.params.routes] if st.params else [],
            "connects": st.connects,
            "last_error": st.last_error,
            "handshake": st.handshakes.snapshot(),
            "sessions": [tunnel],
            "totals": st.counters.snapshot(),
        }


def _format(addr: Address) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _interface(prefix: IPNetwork) -> IPInterface:
    """The TUN address for an assigned prefix: the address itself for /32 and /128,
    else the prefix's first host address (RFC 9484 lets the proxy assign prefixes)."""
    if prefix.prefixlen == prefix.max_prefixlen:
        return ipaddress.ip_interface(prefix.network_address)
    return ipaddress.ip_interface((prefix.network_address + 1, prefix.prefixlen))
