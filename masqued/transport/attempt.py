"""One try at a tunnel: a link (HTTP/3 or HTTP/2), one CONNECT-IP session on it, its
data plane, and the settings and status types the client's tunnel shares with it."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from masqued.gate.auth import server_auth_problem
from masqued.logutil import RateLimitedLog
from masqued.observe.metrics import LatencyHistogram, TrafficCounters
from masqued.proto.drops import DROP_MALFORMED
from masqued.proto.errors import ProtocolError, ResponseError
from masqued.proto.events import (
    AddressesAssigned,
    Event,
    RoutesAdvertised,
    StreamEnded,
    TunnelChanged,
    TunnelOpened,
)
from masqued.proto.events import TunnelRefused as Refused
from masqued.proto.framings import Mode
from masqued.proto.request import TunnelParams
from masqued.proto.session import MAX_ROUTE_NETWORKS, ClientSession
from masqued.proto.template import UriTemplate
from masqued.transport import engines
from masqued.transport.dataplane import DataPlane, plane_for
from masqued.transport.h2link import H2Link
from masqued.transport.h3link import H3Link, monotonic
from masqued.transport.link import Headers, Link
from masqued.transport.udp import Address

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

log = logging.getLogger("masqued.client")


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
    transport: str = "auto"
    # Datagram mode: send ADDRESS_REQUEST (some proxies reject it; RFC 9484 lets the
    # proxy assign unprompted).
    address_request: bool = False
    # Datagram mode, address_request: the IP versions to ask an address for.
    request_versions: tuple[int, ...] = (4, 6)
    # Credentials for the relay's `auth`: a client certificate, a token file.
    certificate: str | None = None
    private_key: str | None = None
    token_file: str | None = None
    template: UriTemplate | None = None  # the relay's URI template (RFC 9484 §3)
    routes: tuple[IPNetwork, ...] = ()  # what the host routes into the tunnel
    # "h3", "h2" (TLS over TCP), or "auto": HTTP/3, falling back to HTTP/2 when no
    # QUIC handshake completes within fallback_after; back to HTTP/3 when a probe
    # every h3_retry seconds gets a tunnel. h2_port: the relay's TCP port (None: the
    # same as relay_port).
    http_version: str = "auto"
    fallback_after: float = 2.0
    h3_retry: float = 30.0
    h2_port: int | None = None
    # The QUIC engine (masqued.transport.engines): "aioquic", "qh3"; None: the default.
    quic_engine: str | None = None
    # The host's own nameservers, for the relay's name while reconnecting, when the
    # client pointed /etc/resolv.conf at the tunnel's (empty: /etc/resolv.conf's).
    outside_dns: tuple[str, ...] = ()
    # The kill switch drops the system resolver's unmarked queries: the relay's name
    # is resolved from marked sockets from the first attempt on.
    marked_dns: bool = False

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
        if self.template is not None:
            return self.template.authority
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
    # Why the tunnel runs over the HTTP version it does (status and log).
    http_reason: str | None = None
    counters: TrafficCounters = field(default_factory=TrafficCounters)
    handshakes: LatencyHistogram = field(default_factory=LatencyHistogram)
    started: float = field(default_factory=time.time)


class Owner(Protocol):
    """What an attempt needs of the tunnel that made it (transport/client.py)."""

    loop: asyncio.AbstractEventLoop
    settings: ClientSettings
    status: ClientStatus
    ratelog: RateLimitedLog
    # True while a batch of the link's input is processed: packets for the TUN are
    # written once at its end (write_tun).
    batching: bool
    current: Attempt | None
    without_address_request: bool

    def packets_from_relay(self, packets: list[bytes]) -> None: ...
    def write_tun(self) -> None: ...
    def pump_tun(self) -> Attempt | None: ...
    def params_changed(self, attempt: Attempt, params: TunnelParams) -> None: ...
    def address_request_refused(self) -> None: ...


class Attempt:
    """One try at a tunnel: a link (HTTP/3 or HTTP/2), one CONNECT-IP session on it,
    its data plane. ``release`` frees the link's socket once the attempt is over."""

    def __init__(
        self,
        tunnel: Owner,
        link: H3Link | H2Link,
        token: str | None,
        release: Callable[[], None] = lambda: None,
    ) -> None:
        self.tunnel = tunnel
        self.link = link
        self.http = link.http_version
        self.release = release
        settings = tunnel.settings
        extra: list[tuple[bytes, bytes]] = []
        if token is not None:
            extra.append((b"authorization", b"Bearer " + token.encode()))
        self.session = ClientSession(
            authority=settings.authority,
            # HTTP/2 carries datagram mode only: packets in DATAGRAM capsules.
            wanted="datagram" if self.http == "h2" else settings.transport,
            mtu=settings.mtu,
            drops=tunnel.status.counters.drops,
            request_versions=(
                settings.request_versions
                if settings.address_request and not tunnel.without_address_request
                else ()
            ),
            extra_headers=extra,
            template=settings.template,
            routes=settings.routes,
        )
        self.stream_id: int | None = None
        self.plane: DataPlane | None = None
        self.rx_packets: list[bytes] = []
        loop = tunnel.loop
        self.ready: asyncio.Future[TunnelParams] = loop.create_future()
        self.done: asyncio.Future[str] = loop.create_future()
        # The transport handshake (QUIC, or TCP and TLS) completed: the relay is
        # reachable this way.
        self.reachable: asyncio.Future[None] = loop.create_future()
        # Nobody awaits ``ready`` after a timeout or a stop: mark its exception seen.
        self.ready.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.started = monotonic()
        self.last_rx = self.started
        self._ping_uid = 0
        self.closed = False
        self.asked = False

    # -- the link's input ----------------------------------------------------------------

    def datagrams_received(self, batch: list[tuple[bytes, Address]]) -> None:
        """HTTP/3: a batch of UDP datagrams for the QUIC connection."""
        now = monotonic()
        self.last_rx = now
        link = self.link
        assert isinstance(link, H3Link)
        link.receive_batch(batch, now)
        self.received(link.process)

    def bytes_received(self, data: bytes) -> None:
        """HTTP/2: what TLS decrypted from one read."""
        self.last_rx = monotonic()
        link = self.link
        assert isinstance(link, H2Link)
        self.received(lambda: link.receive(data))

    def received(self, process: Callable[[], None]) -> None:
        """Let the link hand its events to us (``process``), then act on them: send the
        request once the relay's SETTINGS are in, write what arrived to the TUN in one
        batch, answer with what the TUN had, flush."""
        tunnel = self.tunnel
        tunnel.batching = True
        try:
            process()
            if self.link.handshake_done and not self.reachable.done():
                self.reachable.set_result(None)
            if self.stream_id is None and not self.closed:
                self._send_request()
            if self.rx_packets:
                packets, self.rx_packets = self.rx_packets, []
                tunnel.packets_from_relay(packets)
        finally:
            tunnel.batching = False
            tunnel.write_tun()
        if not self.closed:
            if tunnel.current is self:
                tunnel.pump_tun()
            self.link.flush()

    def _send_request(self) -> None:
        settings = self.link.settings()
        if settings is None:
            return  # the relay's SETTINGS first (RFC 9220 §3, RFC 8441 §4)
        extended, datagrams = settings
        # Before anything (a token) goes to the relay: is its certificate a server's?
        problem = server_auth_problem(self.link.peer_certificate()[0])
        if problem is not None:
            self.fail(TunnelFailed(problem))
            return
        try:
            headers = self.session.request(extended_connect=extended, datagrams=datagrams)
        except ResponseError as exc:
            self.fail(exc.reason)
            return
        if self.tunnel.settings.transport == "auto" and self.http == "h3":
            log.info(
                "transport auto: relay %s H3 datagrams, using %s mode",
                "offers" if datagrams else "does not offer",
                self.session.mode,
            )
        sid = self.link.new_stream()
        self.stream_id = sid
        self.link.open_tunnel(sid)
        assert self.session.mode is not None
        self.plane = plane_for(self.session.mode, self.link, sid, self.tunnel.settings.mtu)
        self.link.send_headers(sid, headers)

    def link_headers(self, link: Link, stream_id: int, headers: Headers, ended: bool) -> None:
        if stream_id != self.stream_id:
            return
        try:
            events, out = self.session.receive_headers(headers, ended)
        except ResponseError as exc:
            self.fail(f"unusable response from relay: {exc.reason}")
            return
        if out:
            link.send_data(stream_id, out)
            self.asked = True  # an ADDRESS_REQUEST went out
        self._events(events)

    def link_data(self, link: Link, stream_id: int, data: bytes, ended: bool) -> None:
        if stream_id != self.stream_id or self.closed:
            return
        try:
            packets, events = self.session.receive_data(data, ended)
        except ResponseError as exc:
            self.fail(exc.reason)
            return
        except ProtocolError as exc:
            self.tunnel.status.counters.drops[DROP_MALFORMED] += 1
            if self.session.mode is Mode.DATAGRAM:
                # RFC 9297 §3.3: a malformed message aborts the stream.
                link.abort(stream_id, exc.wire_code)
                link.flush()  # the reset leaves before the connection is closed
                self.fail(f"malformed capsule from relay: {exc.reason}")
            else:
                self.fail(f"malformed frame from relay: {exc.reason}")
            return
        if packets:
            self.rx_packets += packets
        self._events(events)

    def link_datagram(self, link: Link, stream_id: int, payload: bytes) -> None:
        if stream_id != self.stream_id:
            return  # not our tunnel: dropped (RFC 9297 §2.1)
        packet = self.session.receive_datagram(payload)
        if packet is not None:
            self.rx_packets.append(packet)

    def link_reset(self, link: Link, stream_id: int, code: int) -> None:
        if stream_id == self.stream_id:
            self._refused_request()
            self.finish(f"relay reset the tunnel stream (code {code:#x})")

    def _refused_request(self) -> None:
        """The relay ended the tunnel right after our ADDRESS_REQUEST, before any
        tunnel: some proxies do (against RFC 9484 §4.7.2, which wants an answer)."""
        if self.asked and not self.ready.done():
            self.tunnel.address_request_refused()

    def link_closed(self, link: Link, code: int, reason: str) -> None:
        self.finish(f"connection closed by relay or timeout ({reason})")

    def _events(self, events: list[Event]) -> None:
        for event in events:
            if self.closed:
                return
            kind = type(event)
            if kind is TunnelOpened:
                assert isinstance(event, TunnelOpened)
                if not self.ready.done():
                    self.ready.set_result(event.params)
            elif kind is TunnelChanged:
                assert isinstance(event, TunnelChanged)
                self.tunnel.params_changed(self, event.params)
            elif kind is Refused:
                assert isinstance(event, Refused)
                self.fail(TunnelRefused(event.status, event.reason))
            elif kind is AddressesAssigned:
                assert isinstance(event, AddressesAssigned)
                if event.declined:
                    log.warning("relay declined address request(s) %s", list(event.declined))
                if self.session.addresses_dropped:
                    self.tunnel.ratelog.warning(
                        "addresses_dropped",
                        "relay assigned %d more addresses than one per IP version: "
                        "using the first of each",
                        self.session.addresses_dropped,
                    )
            elif kind is RoutesAdvertised and self.session.routes_truncated:
                self.tunnel.ratelog.warning(
                    "routes_truncated",
                    "relay advertised routes of more than %d networks: they are all obeyed, "
                    "status shows the first %d",
                    MAX_ROUTE_NETWORKS,
                    MAX_ROUTE_NETWORKS,
                )
            elif kind is StreamEnded:
                self._refused_request()
                self.finish("relay closed the tunnel stream")

    # -- lifecycle ----------------------------------------------------------------------

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
            self.link.ping(self._ping_uid)
            self.link.flush()

    def fail(self, reason: str | Exception) -> None:
        """Close the connection and end this attempt with ``reason``."""
        if self.closed:
            return
        message = str(reason)
        with contextlib.suppress(Exception):
            self.link.close(engines.H3_NO_ERROR, message)
            self.link.flush()
        if isinstance(reason, Exception) and not self.ready.done():
            self.ready.set_exception(reason)
        self.finish(message)

    def finish(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.link.closed = True
        with contextlib.suppress(Exception):
            self.release()
        if not self.ready.done():
            self.ready.set_exception(TunnelFailed(reason))
        if not self.reachable.done():
            self.reachable.set_exception(TunnelFailed(reason))
            self.reachable.exception()  # seen: nobody may be waiting
        if not self.done.done():
            self.done.set_result(reason)
