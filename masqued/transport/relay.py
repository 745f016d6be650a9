"""The relay's data path: HTTP/3 CONNECT-IP sessions <-> the relay's TUN device.

Each accepted CONNECT-IP request becomes a ``RelaySession`` owning one lease from
the address pool. Packets from a client are checked (source must be its lease,
BCP 38) and written to the TUN; the kernel forwards and NATs them. Packets read
from the TUN are sent to the session that owns their destination address.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from aioquic.buffer import Buffer  # type: ignore[attr-defined]
from aioquic.h3.connection import ErrorCode as H3ErrorCode
from aioquic.h3.connection import H3Connection
from aioquic.h3.events import DatagramReceived, DataReceived, H3Event, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import (
    ConnectionIdIssued,
    ConnectionIdRetired,
    ConnectionTerminated,
    HandshakeCompleted,
    StreamReset,
)
from aioquic.quic.packet import (
    QuicPacketType,
    encode_quic_retry,
    encode_quic_version_negotiation,
    pull_quic_header,
)

from masqued.gate.access import AccessControl, Identity, LeaseStore
from masqued.gate.auth import AuthError
from masqued.gate.ipam import AddressPool, Lease, PoolExhausted
from masqued.gate.policy import CompiledAcl
from masqued.logutil import RateLimitedLog
from masqued.observe.metrics import (
    DROP_MALFORMED,
    DROP_NO_SESSION,
    DROP_OVERSIZED,
    DROP_QUEUE_FULL,
    DROP_SPOOFED,
    DROP_TUN_WRITE,
    LatencyHistogram,
    TrafficCounters,
)
from masqued.proto.capsule import (
    ADDRESS_ASSIGN,
    ADDRESS_REQUEST,
    DATAGRAM,
    ROUTE_ADVERTISEMENT,
    Capsule,
    CapsuleDecoder,
    encode_datagram_capsule,
)
from masqued.proto.connect_ip import (
    AssignedAddress,
    RouteAdvertisement,
    decode_address_assign,
    decode_address_request,
    decode_datagram_payload,
    decode_route_advertisement,
    encode_address_assign,
    encode_ip_datagram,
    encode_route_advertisement,
    ranges_for,
    rejection,
)
from masqued.proto.errors import (
    H3_DATAGRAM_ERROR,
    CapsuleError,
    FramingError,
    PacketError,
    RequestError,
)
from masqued.proto.framing import FrameDecoder, encode_frame
from masqued.proto.packet import (
    PROTO_ICMP,
    PROTO_ICMPV6,
    addresses,
    decrement_ttl,
    icmp_admin_prohibited,
    icmp_error,
    icmp_packet_too_big,
    parse_packet,
)
from masqued.proto.request import (
    ConnectIpRequest,
    TunnelParams,
    build_response_headers,
    parse_connect_request,
)
from masqued.runtime.service import client_fields
from masqued.transport.balance import Balancer, InvalidToken, RetryTokens, retry_cid
from masqued.transport.datagrams import (
    MAX_DATAGRAM_FRAME_SIZE,
    DatagramBound,
    DatagramH3Connection,
    datagram_room,
    peer_accepts_datagrams,
    queue_datagram,
)
from masqued.transport.limits import DEFAULT_ENDPOINT_LIMITS, BufferLedger, EndpointLimits
from masqued.transport.quic import (
    H3_EXCESSIVE_LOAD,
    LIMIT_ERRORS,
    Address,
    BacklogBound,
    ClientCertRequestingConnection,
    GuardedConnection,
    QuicPeer,
    UdpSocket,
    bytes_in_flight,
    congestion_window,
    h3_held,
    merged_events,
    monotonic,
    peer_certificate,
    quic_configuration,
    rtt_ms,
    send_packets_on_stream,
    stream_send_backlog,
    tune_socket,
    use_burst_pacer,
)
from masqued.transport.steering import steered

log = logging.getLogger("masqued.relay")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# CONNECT-IP sessions one QUIC connection may open at once.
MAX_SESSIONS_PER_CONNECTION = 4
# Smallest UDP payload that may open a connection (RFC 9000 §14.1).
MIN_INITIAL_SIZE = 1200
# How often pending connections are checked against their timeouts.
SWEEP_INTERVAL = 1.0
TUN_READ_BATCH = 256
# Datagram mode: largest control capsule we accept (a few hundred addresses/routes).
MAX_CONTROL_CAPSULE = 16384
# Datagram mode drop reasons (besides the shared ones in masqued.observe.metrics).
DROP_LINK_LOCAL = "link_local"
DROP_TTL_EXPIRED = "ttl_expired"
DROP_UNKNOWN_CONTEXT = "unknown_context"
DROP_UNKNOWN_STREAM = "unknown_stream"
DROP_ACL = "acl"
# ICMP errors (Packet Too Big, prohibited) sent to one client: burst, then per second.
ICMP_BURST = 10.0
ICMP_RATE = 10.0
ANONYMOUS = Identity(None, "none")
# ICMP Time Exceeded (RFC 792) / ICMPv6 Time Exceeded (RFC 4443 §3.3), code 0.
ICMPV4_TIME_EXCEEDED = 11
ICMPV6_TIME_EXCEEDED = 3


class Tun(Protocol):
    @property
    def name(self) -> str: ...

    def fileno(self) -> int: ...
    def read_batch(self, max_packets: int = ...) -> list[bytes]: ...
    def write(self, packet: bytes) -> bool: ...
    def write_batch(self, packets: list[bytes]) -> int: ...


@dataclass(frozen=True)
class RelaySettings:
    """What the data path needs from the relay config."""

    mtu: int
    routes: tuple[IPNetwork, ...]
    certificate: str
    private_key: str
    max_clients: int | None = None
    # Relay workers (masqued.runtime.workers): this one's index and how many share the port;
    # with more than one, every connection ID this worker issues starts with its index.
    worker: int = 0
    workers: int = 1
    limits: EndpointLimits = DEFAULT_ENDPOINT_LIMITS


@dataclass(eq=False)
class RelaySession:
    """One CONNECT-IP tunnel (one request stream) and the client's lease."""

    conn: RelayConnection
    stream_id: int
    lease: Lease
    decoder: FrameDecoder
    peer: str
    identity: Identity = ANONYMOUS
    acl: CompiledAcl | None = None  # None: everything the relay routes
    peer_cert: Any = None
    icmp_budget: float = ICMP_BURST
    icmp_at: float = 0.0
    scope_targets: tuple[IPNetwork, ...] | None = None
    scope_ipproto: int | None = None
    started: float = field(default_factory=time.time)
    counters: TrafficCounters = field(default_factory=TrafficCounters)
    addr_keys: frozenset[bytes] = frozenset()
    out: list[bytes] = field(default_factory=list)
    tun_out: list[bytes] = field(default_factory=list)  # accepted, not yet written
    bound: BacklogBound = field(default_factory=BacklogBound)  # stream mode's queue
    # Datagram mode (RFC 9484): capsules on the stream, packets in HTTP Datagrams.
    transport: str = "stream"
    capsules: CapsuleDecoder | None = None
    request_ids: set[int] = field(default_factory=set)
    peer_routes: RouteAdvertisement | None = None

    @property
    def owner(self) -> str:
        return self.lease.owner

    def describe(self) -> str:
        addrs = ", ".join(str(a.ip) for a in self.lease.addresses)
        who = f"{self.identity.name} ({self.peer})" if self.identity.name else self.peer
        return f"{who} as {addrs}"

    def icmp_allowed(self, now: float) -> bool:
        """Token bucket for the ICMP errors we send this client (RFC 1812 §4.3.2.8)."""
        self.icmp_budget = min(ICMP_BURST, self.icmp_budget + (now - self.icmp_at) * ICMP_RATE)
        self.icmp_at = now
        if self.icmp_budget < 1.0:
            return False
        self.icmp_budget -= 1.0
        return True


def session_log_fields(session: RelaySession) -> dict[str, str]:
    """Journal fields of a session's log lines (masqued.runtime.service.client_fields)."""
    return client_fields(
        session.peer,
        ",".join(str(a.ip) for a in session.lease.addresses),
        session.identity.name,
        session.owner,
    )


class RelayConnection(QuicPeer):
    def __init__(
        self,
        server: RelayServer,
        quic: GuardedConnection,
        peer_addr: Address,
        send: Callable[[Iterable[tuple[bytes, Address]]], None],
    ) -> None:
        super().__init__(server.loop, quic, send)
        self.server = server
        self.peer_addr = peer_addr
        self.peer = _format_addr(peer_addr)
        self.h3: H3Connection = DatagramH3Connection(quic)
        self.sessions: dict[int, RelaySession] = {}
        self.cids: set[bytes] = set()
        self.datagram_bound = DatagramBound()  # its datagram queue (datagram mode)
        self.handshake_done = False
        self.admitted = False  # a CONNECT was admitted on it (it left the pending set)
        self.over_limit = False  # closed for exceeding a receive limit (counted once)

    def process_events(self) -> None:
        quic = self.quic
        h3 = self.h3
        assert h3 is not None
        for event in merged_events(quic):
            if isinstance(event, HandshakeCompleted):
                self.handshake_done = True
            elif isinstance(event, ConnectionIdIssued):
                self.server._register_cid(event.connection_id, self)
            elif isinstance(event, ConnectionIdRetired):
                self.server._unregister_cid(event.connection_id)
            elif isinstance(event, ConnectionTerminated):
                self._terminated(event)
                return
            elif isinstance(event, StreamReset):
                session = self.sessions.get(event.stream_id)
                if session is not None:
                    self.server.end_session(session, f"reset by client (code {event.error_code})")
                continue
            for h3_event in h3.handle_event(event):
                self._h3_event(h3_event)
        code = quic.local_close_code()
        if code in LIMIT_ERRORS:
            self.server.limit_exceeded(self, f"{LIMIT_ERRORS[code]} (code {code:#x})")

    def _h3_event(self, event: H3Event) -> None:
        if isinstance(event, DataReceived):
            session = self.sessions.get(event.stream_id)
            if session is not None and session.transport == "datagram":
                self.server.session_capsules(session, event.data, event.stream_ended)
            elif session is not None:
                self.server.session_data(session, event.data)
                if event.stream_ended and session.stream_id in self.sessions:
                    self.server.end_session(session, "closed by client", fin=True)
        elif isinstance(event, DatagramReceived):
            self.server.session_datagram(self, event.stream_id, event.data)
        elif isinstance(event, HeadersReceived):
            self.server.handle_request(self, event)

    def flush(self) -> None:
        """Grant receive credit, account what this peer makes us hold, then send."""
        quic = self.quic
        held = quic.settle(h3_held(self.h3))
        if quic.exceeded is not None:
            self.server.limit_exceeded(self, quic.exceeded)
        elif not self.server.ledger.update(id(self), held):
            quic.exceeded = f"{held} bytes held while the relay's total is over its limit"
            quic.close(error_code=H3_EXCESSIVE_LOAD, reason_phrase="excessive load")
            self.server.limit_exceeded(self, quic.exceeded)
        super().flush()

    def _on_timer(self) -> None:
        try:
            super()._on_timer()
        except Exception as exc:
            self.server.connection_failed(self, exc)

    def _terminated(self, event: ConnectionTerminated) -> None:
        reason = event.reason_phrase or f"code {event.error_code:#x}"
        if event.error_code in LIMIT_ERRORS:
            self.server.limit_exceeded(self, f"{LIMIT_ERRORS[event.error_code]} ({reason})")
        for session in list(self.sessions.values()):
            self.server.end_session(session, f"connection closed ({reason})")
        self.closed = True
        self.cancel_timer()
        self.server._forget_connection(self)

    def abort_stream(self, stream_id: int, code: int) -> None:
        """Abort one request stream in both directions (RFC 9114 §4.1.2)."""
        # Either half may already be finished; that is fine.
        with contextlib.suppress(Exception):
            self.quic.reset_stream(stream_id, code)
        with contextlib.suppress(Exception):
            self.quic.stop_stream(stream_id, code)


class RelayServer:
    """Accepts QUIC connections, serves CONNECT-IP, moves packets to and from the TUN."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        tun: Tun,
        pool: AddressPool,
        settings: RelaySettings,
        access: AccessControl | None = None,
        leases: LeaseStore | None = None,
        balancer: Balancer | None = None,
    ) -> None:
        self.loop = loop
        # With workers: sends new clients to the least busy worker (Retry).
        self.balancer = balancer
        # Retry tokens: shared by the workers (balancing), else this process's own.
        self.tokens = balancer.tokens if balancer is not None else RetryTokens(os.urandom(16))
        self.limits = settings.limits
        self.ledger = BufferLedger(settings.limits.max_buffered_total)
        # Connections without an admitted CONNECT yet, oldest first, and per source IP.
        self._pending: dict[RelayConnection, None] = {}
        self._pending_by_ip: collections.Counter[str] = collections.Counter()
        self._sweeper: asyncio.TimerHandle | None = None
        self.tun = tun
        self.pool = pool
        self.settings = settings
        self.access = access
        self.leases = leases or LeaseStore(None)
        if access is not None:
            pool.set_reservations(access.reservations())
        self.udp = UdpSocket(loop, sock, self._datagrams_received)
        self.connections: dict[bytes, RelayConnection] = {}
        self.by_addr: dict[bytes, RelaySession] = {}
        self.sessions: set[RelaySession] = set()
        self.totals = TrafficCounters()
        self.results: dict[str, int] = {}
        self.handshakes = LatencyHistogram()
        self.started = time.time()
        self._ratelog = RateLimitedLog(log)
        self._quic_config = self._make_quic_config()
        self._dirty: set[RelayConnection] = set()
        # Packets from clients are written to the TUN once per UDP batch, so that
        # consecutive TCP segments can go to the kernel as one (masqued.host.coalesce).
        self._tun_pending: list[RelaySession] = []
        self._batching = False
        # The relay's own TUN address per IP version: source of the ICMP errors we make.
        self.gateways: dict[int, ipaddress.IPv4Address | ipaddress.IPv6Address] = {
            g.version: g.ip for g in pool.gateways()
        }
        self.on_change: Callable[[], None] | None = None

    def _make_quic_config(self) -> QuicConfiguration:
        config = quic_configuration(is_client=False)
        config.max_datagram_frame_size = MAX_DATAGRAM_FRAME_SIZE
        config.load_cert_chain(self.settings.certificate, self.settings.private_key)
        return config

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        tune_socket(self.udp.sock)
        self.udp.start()
        self.loop.add_reader(self.tun.fileno(), self._tun_ready)
        self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self._sweep)

    def update_settings(self, settings: RelaySettings) -> None:
        """Apply settings that can change live (routes for new sessions, certificates)."""
        self.settings = settings
        self._quic_config = self._make_quic_config()

    def close(self) -> None:
        """Close every connection (CONNECTION_CLOSE, H3_NO_ERROR) and stop reading."""
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.tun.fileno())
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        conns = {id(c): c for c in self.connections.values()}
        for conn in conns.values():
            for session in list(conn.sessions.values()):
                self.end_session(session, "relay shutting down")
            conn.quic.close(error_code=H3ErrorCode.H3_NO_ERROR, reason_phrase="relay shutting down")
            conn.flush()
            conn.cancel_timer()
            conn.closed = True
        self.connections.clear()
        self.udp.close()

    # -- UDP side --------------------------------------------------------------

    def _datagrams_received(self, batch: list[tuple[bytes, Address]]) -> None:
        now = monotonic()
        dirty = self._dirty
        for data, addr in batch:
            conn = self.connections.get(_dcid(data))
            if conn is None:
                conn = self._new_connection(data, addr)
                if conn is None:
                    continue
            try:
                conn.quic.receive_datagram(data, addr, now)
            except Exception as exc:
                self.connection_failed(conn, exc)
                continue
            dirty.add(conn)
        self._batching = True
        try:
            # A copy: handling one connection may touch another (a client replacing
            # its old session marks the old connection dirty).
            for conn in list(dirty):
                if conn.closed:
                    continue
                try:
                    conn.process_events()
                except Exception as exc:
                    self.connection_failed(conn, exc)
        finally:
            self._batching = False
            self._write_tun()
        self._pump_tun()
        self._flush()

    def connection_failed(self, conn: RelayConnection, exc: BaseException) -> None:
        """A bug met by one connection's input: it ends there (H3_INTERNAL_ERROR),
        logged once per kind, and the other connections of the batch go on."""
        self._count("internal_error")
        kind = f"{type(exc).__name__}:{exc}"[:120]
        self._ratelog.log(
            logging.ERROR,
            f"internal:{kind}",
            "%s: internal error while handling this connection: closing it",
            conn.peer,
            exc_info=(type(exc), exc, exc.__traceback__),
        )
        with contextlib.suppress(Exception):
            conn.quic.close(
                error_code=H3ErrorCode.H3_INTERNAL_ERROR, reason_phrase="internal error"
            )
            QuicPeer.flush(conn)
        try:
            self._drop(conn, "internal error")
        except Exception:  # its sessions' state is suspect too: at least forget it
            conn.closed = True
            conn.cancel_timer()
            self._forget_connection(conn)

    def limit_exceeded(self, conn: RelayConnection, reason: str) -> None:
        """A peer went past a receive limit (its connection is closing): count, log once."""
        if conn.over_limit:
            return
        conn.over_limit = True
        self._count("limit_exceeded")
        self._ratelog.warning(
            f"limit:{_peer_ip(conn.peer_addr)}",
            "%s: closing the connection: %s",
            conn.peer,
            reason,
        )

    def _write_tun(self) -> None:
        """Write what the clients sent in this batch, one TUN batch per session."""
        pending, self._tun_pending = self._tun_pending, []
        for session in pending:
            packets, session.tun_out = session.tun_out, []
            dropped = self.tun.write_batch(packets)
            if dropped:
                session.counters.drops[DROP_TUN_WRITE] += dropped

    def _flush(self) -> None:
        dirty = self._dirty
        while dirty:
            conn = dirty.pop()
            if conn.closed:
                continue
            try:
                conn.flush()
            except Exception as exc:
                self.connection_failed(conn, exc)
                continue
            if conn.over_limit:
                # Its CONNECTION_CLOSE is out: drop its state now rather than keep
                # what it made us hold through the closing period (RFC 9000 §10.2).
                self._drop(conn, "closed for exceeding a limit")

    def _drop(self, conn: RelayConnection, reason: str) -> None:
        for session in list(conn.sessions.values()):
            self.end_session(session, reason)
        conn.closed = True
        conn.cancel_timer()
        self._forget_connection(conn)

    def _new_connection(self, data: bytes, addr: Address) -> RelayConnection | None:
        config = self._quic_config
        try:
            header = pull_quic_header(
                Buffer(data=data), host_cid_length=config.connection_id_length
            )
        except ValueError:
            return None
        if (
            header.packet_type != QuicPacketType.VERSION_NEGOTIATION
            and header.version is not None
            and header.version not in config.supported_versions
        ):
            self.udp.send(
                [
                    (
                        encode_quic_version_negotiation(
                            source_cid=header.destination_cid,
                            destination_cid=header.source_cid,
                            supported_versions=config.supported_versions,
                        ),
                        addr,
                    )
                ]
            )
            return None
        # Known by another of its CIDs (long headers carry the original one).
        conn = self.connections.get(header.destination_cid)
        if conn is not None:
            return conn
        if header.packet_type != QuicPacketType.INITIAL or len(data) < MIN_INITIAL_SIZE:
            return None
        limits = self.limits
        ip = _peer_ip(addr)
        if len(self._pending) >= limits.max_pending or (
            self._pending_by_ip[ip] >= limits.max_pending_per_address
        ):
            self._count("initial_dropped")
            self._ratelog.warning(
                "pending_full",
                "%s: new connection dropped: %d connections wait for a handshake or a "
                "CONNECT (%d from this address)",
                _format_addr(addr),
                len(self._pending),
                self._pending_by_ip[ip],
            )
            return None
        odcid, retry_scid = header.destination_cid, None
        if header.token:
            # The second Initial of a client we (or another worker) sent a Retry.
            try:
                odcid, retry_scid = self.tokens.open(
                    _format_addr(addr), header.token, header.destination_cid
                )
            except InvalidToken as exc:
                self._count("retry_invalid")
                self._ratelog.info(
                    f"token:{ip}",
                    "%s: Initial with an unusable Retry token (%s): dropped",
                    _format_addr(addr),
                    exc,
                )
                return None
        else:
            target = self.balancer.target(self._load()) if self.balancer is not None else None
            if target is not None:
                self._count("redirected")
                self._send_retry(header, addr, target)
                return None
            if len(self._pending) >= limits.retry_threshold:
                # Many handshakes at once (perhaps from spoofed sources): the client
                # proves its address with a Retry before we spend a handshake on it.
                self._count("address_validation")
                self._send_retry(header, addr, self.settings.worker)
                return None
        connection_class: type[GuardedConnection] = (
            ClientCertRequestingConnection
            if self.access is not None and self.access.requests_client_certificate
            else GuardedConnection
        )
        if self.settings.workers > 1:
            connection_class = steered(connection_class, self.settings.worker)
        quic = connection_class(
            configuration=config,
            original_destination_connection_id=odcid,
            retry_source_connection_id=retry_scid,
            receive_limits=limits.receive,
        )
        use_burst_pacer(quic)
        conn = RelayConnection(self, quic, addr, self.udp.send)
        self._register_cid(header.destination_cid, conn)
        self._register_cid(quic.host_cid, conn)
        self._pending[conn] = None
        self._pending_by_ip[ip] += 1
        return conn

    def _load(self) -> int:
        """This worker's clients, those still in their handshake included."""
        return len({id(conn) for conn in self.connections.values()})

    def _send_retry(self, header: Any, addr: Address, target: int) -> None:
        """Send the client to worker ``target`` (this one, to validate its address): a
        Retry with a connection ID that the steering program maps there, and a token
        that worker accepts."""
        scid = retry_cid(target)
        token = self.tokens.seal(_format_addr(addr), header.destination_cid, scid)
        retry = encode_quic_retry(
            version=header.version,
            source_cid=scid,
            destination_cid=header.source_cid,
            original_destination_cid=header.destination_cid,
            retry_token=token,
        )
        self.udp.send([(retry, addr)])

    def _admitted(self, conn: RelayConnection) -> None:
        """A CONNECT was admitted on ``conn``: it no longer counts as pending."""
        if not conn.admitted:
            conn.admitted = True
            self._unpend(conn)

    def _unpend(self, conn: RelayConnection) -> None:
        if conn in self._pending:
            del self._pending[conn]
            ip = _peer_ip(conn.peer_addr)
            self._pending_by_ip[ip] -= 1
            if self._pending_by_ip[ip] <= 0:
                del self._pending_by_ip[ip]

    def _sweep(self) -> None:
        """Every SWEEP_INTERVAL: end connections that waited too long for their
        handshake (dropped silently: the source may be spoofed) or for an admitted
        CONNECT (closed)."""
        self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self._sweep)
        now = monotonic()
        limits = self.limits
        expired: list[RelayConnection] = []
        for conn in self._pending:  # oldest first
            age = now - conn.created
            if age < min(limits.handshake_timeout, limits.admission_timeout):
                break
            if (not conn.handshake_done and age >= limits.handshake_timeout) or (
                conn.handshake_done and age >= limits.admission_timeout
            ):
                expired.append(conn)
        for conn in expired:
            try:
                if conn.handshake_done:
                    self._count("admission_timeout")
                    conn.quic.close(
                        error_code=H3ErrorCode.H3_NO_ERROR,
                        reason_phrase="no CONNECT-IP tunnel requested",
                    )
                    QuicPeer.flush(conn)
                else:
                    self._count("handshake_timeout")
                self._drop(conn, "no tunnel admitted in time")
            except Exception as exc:
                self.connection_failed(conn, exc)

    def _register_cid(self, cid: bytes, conn: RelayConnection) -> None:
        self.connections[cid] = conn
        conn.cids.add(cid)

    def _unregister_cid(self, cid: bytes) -> None:
        conn = self.connections.pop(cid, None)
        if conn is not None:
            conn.cids.discard(cid)

    def _forget_connection(self, conn: RelayConnection) -> None:
        for cid in conn.cids:
            if self.connections.get(cid) is conn:
                del self.connections[cid]
        conn.cids.clear()
        self._dirty.discard(conn)
        self._unpend(conn)
        self.ledger.forget(id(conn))

    # -- requests ----------------------------------------------------------------

    def _count(self, result: str) -> None:
        self.results[result] = self.results.get(result, 0) + 1

    def handle_request(self, conn: RelayConnection, event: HeadersReceived) -> None:
        h3 = conn.h3
        assert h3 is not None
        stream_id = event.stream_id
        if stream_id in conn.sessions:
            # Trailers or a second HEADERS on an open tunnel: not allowed here.
            self._ratelog.warning(
                f"hdr:{conn.peer}", "%s: unexpected HEADERS on tunnel stream", conn.peer
            )
            self.end_session(conn.sessions[stream_id], "unexpected HEADERS")
            conn.abort_stream(stream_id, H3ErrorCode.H3_MESSAGE_ERROR)
            return
        try:
            request = parse_connect_request(event.headers)
            routes = self._scope_routes(request)
            if len(conn.sessions) >= MAX_SESSIONS_PER_CONNECTION:
                raise RequestError(429, "too many tunnels on one connection")
            if self.settings.max_clients is not None and len(self.sessions) >= (
                self.settings.max_clients
            ):
                raise RequestError(503, "client limit reached")
        except RequestError as exc:
            self._count("rejected")
            self._ratelog.warning(
                f"req:{conn.peer}:{exc.status}",
                "%s: request refused with %d: %s",
                conn.peer,
                exc.status,
                exc.reason,
            )
            self._respond_error(conn, stream_id, exc.status)
            return
        identity = ANONYMOUS
        acl: CompiledAcl | None = None
        cert, chain = peer_certificate(conn.quic)
        if self.access is not None:
            try:
                identity = self.access.authenticate(
                    _peer_ip(conn.peer_addr), request.headers, cert, chain
                )
            except AuthError as exc:
                self._count("auth_failed" if exc.status != 429 else "rate_limited")
                # The reason never contains the secret; only the peer and what failed.
                self._ratelog.warning(
                    f"auth:{_peer_ip(conn.peer_addr)}:{exc.status}:{exc.reason}",
                    "%s: authentication failed, answering %d: %s",
                    conn.peer,
                    exc.status,
                    exc.reason,
                )
                extra: list[tuple[bytes, bytes]] = []
                if exc.status == 401 and self.access.tokens is not None:
                    extra.append((b"www-authenticate", b'Bearer realm="masqued"'))
                self._respond_error(conn, stream_id, exc.status, extra)
                return
            policy, acl = self.access.policy_for(identity)
            if policy is None and acl.acl.default_allow and not acl.acl.rules:
                acl = None  # nothing to check per packet
        if identity.name is not None:
            # One tunnel per identity: a client that reconnects (new connection after a
            # network change) replaces its old session and keeps its address.
            for old in [s for s in self.sessions if s.identity.name == identity.name]:
                self._close_session(old, "replaced by a new session of the same client")
        owner = f"{conn.peer}#{stream_id}"
        prefer = self.leases.previous(identity.name) if identity.name else ()
        try:
            lease = self.pool.allocate(owner, identity=identity.name, prefer=prefer)
        except PoolExhausted:
            self._count("pool_exhausted")
            self._ratelog.warning(
                "pool_exhausted",
                "%s: address pool exhausted (%d/%d in use): answering 503",
                conn.peer,
                self.pool.used(),
                self.pool.capacity(),
            )
            self._respond_error(conn, stream_id, 503)
            return
        session = RelaySession(
            conn=conn,
            stream_id=stream_id,
            lease=lease,
            decoder=FrameDecoder(self.settings.mtu),
            peer=conn.peer,
            scope_targets=request.target,
            scope_ipproto=request.ipproto,
            addr_keys=frozenset(a.ip.packed for a in lease.addresses),
            identity=identity,
            acl=acl,
            peer_cert=cert,
        )
        if identity.name is not None:
            self.leases.remember(identity.name, [a.ip for a in lease.addresses])
        if request.transport == "datagram":
            self._open_datagram_session(session, routes)
        else:
            params = TunnelParams(addresses=lease.addresses, routes=routes, mtu=self.settings.mtu)
            h3.send_headers(stream_id, build_response_headers(200, params), end_stream=False)
        conn.sessions[stream_id] = session
        self.sessions.add(session)
        for key in session.addr_keys:
            self.by_addr[key] = session
        conn.quic.open_tunnel(stream_id)
        self._admitted(conn)
        self._count("accepted")
        self.handshakes.observe(monotonic() - conn.created)
        log.info(
            "session opened: %s (stream %d, %d/%d addresses in use)",
            session.describe(),
            stream_id,
            self.pool.used(),
            self.pool.capacity(),
            extra=session_log_fields(session),
        )
        self._changed()

    def _scope_routes(self, request: ConnectIpRequest) -> tuple[IPNetwork, ...]:
        """Routes to advertise: the relay's routes, narrowed to a scoped request's target."""
        allowed = self.settings.routes
        if request.target is None:
            return allowed
        narrowed: list[IPNetwork] = []
        for target in request.target:
            covering = [r for r in allowed if r.version == target.version and target.subnet_of(r)]  # type: ignore[arg-type]
            if not covering:
                raise RequestError(403, f"target {target} is outside what this relay routes")
            narrowed.append(target)
        return tuple(narrowed)

    def _respond_error(
        self,
        conn: RelayConnection,
        stream_id: int,
        status: int,
        extra: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        assert conn.h3 is not None
        try:
            conn.h3.send_headers(
                stream_id, build_response_headers(status, extra=extra), end_stream=True
            )
        except Exception:  # the stream may already be gone
            conn.abort_stream(stream_id, H3ErrorCode.H3_REQUEST_REJECTED)
        self._dirty.add(conn)

    def end_session(self, session: RelaySession, reason: str, fin: bool = False) -> None:
        conn = session.conn
        if conn.sessions.pop(session.stream_id, None) is None:
            return
        self.sessions.discard(session)
        for key in session.addr_keys:
            if self.by_addr.get(key) is session:
                del self.by_addr[key]
        self.pool.release(session.owner)
        self.totals.add(session.counters)
        if fin and not conn.closed:
            try:
                assert conn.h3 is not None
                conn.h3.send_data(session.stream_id, b"", end_stream=True)
            except Exception:
                pass
            self._dirty.add(conn)
        c = session.counters
        log.info(
            "session closed: %s: %s (rx %d pkts/%d B, tx %d pkts/%d B, dropped %s)",
            session.describe(),
            reason,
            c.rx_packets,
            c.rx_bytes,
            c.tx_packets,
            c.tx_bytes,
            dict(c.drops) or "none",
            extra=session_log_fields(session),
        )
        self._changed()

    def _close_session(self, session: RelaySession, reason: str) -> None:
        """End a session from our side: release it and reset its stream."""
        conn = session.conn
        self.end_session(session, reason)
        if not conn.closed:
            conn.abort_stream(session.stream_id, H3ErrorCode.H3_REQUEST_CANCELLED)
            self._dirty.add(conn)

    def pool_changed(self) -> None:
        """The pool grew (reload): ICMP errors may now come from a new family's gateway."""
        for gateway in reversed(self.pool.gateways()):
            self.gateways[gateway.version] = gateway.ip

    def update_access(self, access: AccessControl | None) -> None:
        """After a reload: new credentials and policies for new and live sessions.

        Sessions whose client is no longer authorized (token removed, certificate
        revoked) are closed; the others keep running with their new ACL.
        """
        if access is not None and self.access is not None:
            access.carry_over(self.access)
        self.access = access
        self.pool.set_reservations(access.reservations() if access is not None else {})
        for session in list(self.sessions):
            if access is None:
                session.acl = None
                continue
            if not access.still_valid(session.identity, session.peer_cert):
                self._ratelog.warning(
                    f"revoked:{session.identity}",
                    "%s: no longer authorized after reload: closing its session",
                    session.describe(),
                    extra=session_log_fields(session),
                )
                self._close_session(session, "no longer authorized")
                continue
            policy, acl = access.policy_for(session.identity)
            session.acl = (
                None if policy is None and acl.acl.default_allow and not acl.acl.rules else acl
            )
        self._flush()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    # -- client -> TUN -----------------------------------------------------------

    def session_data(self, session: RelaySession, data: bytes) -> None:
        try:
            packets = session.decoder.feed(data)
        except FramingError as exc:
            # Whatever complete packets preceded the bad record were already lost with
            # the exception; the session is over either way (it cannot resynchronise).
            self._ratelog.warning(
                f"framing:{session.peer}",
                "%s: malformed stream frame (%s): closing this tunnel",
                session.describe(),
                exc.reason,
            )
            session.counters.drops[DROP_MALFORMED] += 1
            conn = session.conn
            self.end_session(session, f"protocol error: {exc.reason}")
            conn.abort_stream(session.stream_id, exc.wire_code)
            self._dirty.add(conn)
            return
        if packets:
            self._packets_from_client(session, packets)

    def _in_scope(self, session: RelaySession, pkt: bytes) -> bool:
        """Scoped requests (RFC 9484 §4.6): only the requested target and protocol."""
        try:
            info = parse_packet(pkt)
        except PacketError:
            session.counters.drops[DROP_MALFORMED] += 1
            return False
        targets = session.scope_targets
        if targets is not None and not any(info.dst in t for t in targets):
            session.counters.drops["out_of_scope"] += 1
            return False
        if (
            session.scope_ipproto is not None
            and info.proto != session.scope_ipproto
            and info.proto != (PROTO_ICMP if info.version == 4 else PROTO_ICMPV6)
        ):
            session.counters.drops["out_of_scope"] += 1
            return False
        return True

    # -- TUN -> client ------------------------------------------------------------

    def _tun_ready(self) -> None:
        self._pump_tun()
        self._flush()

    def _pump_tun(self) -> None:
        """Hand every packet waiting on the TUN to its session, without sending.

        Runs on TUN readiness and also right after a batch from the clients was written
        to the TUN: the answers the kernel produced meanwhile (TCP ACKs above all) then
        leave with the QUIC ACKs in one flush instead of in packets of their own.
        """
        packets = self.tun.read_batch(TUN_READ_BATCH)
        if not packets:
            return
        by_addr = self.by_addr
        touched: list[RelaySession] = []
        for pkt in packets:
            version = pkt[0] >> 4
            if version == 4:
                dst = pkt[16:20]
            elif version == 6:
                dst = pkt[24:40]
            else:
                self.totals.drops[DROP_MALFORMED] += 1
                continue
            session = by_addr.get(dst)
            if session is None:
                self.totals.drops[DROP_NO_SESSION] += 1
                continue
            if not session.out:
                touched.append(session)
            session.out.append(pkt)
        mtu = self.settings.mtu
        for session in touched:
            try:
                self._send_packets(session, mtu)
            except Exception as exc:
                session.out = []
                self.connection_failed(session.conn, exc)

    def _send_packets(self, session: RelaySession, mtu: int) -> None:
        if session.transport == "datagram":
            self._send_datagrams(session)
            return
        packets = session.out
        session.out = []
        conn = session.conn
        if conn.closed or session.stream_id not in conn.sessions:
            return
        assert conn.h3 is not None
        if send_packets_on_stream(
            conn.h3, conn.quic, session.stream_id, packets, mtu, session.counters, session.bound
        ):
            self._dirty.add(conn)

    # -- datagram mode (RFC 9484) ---------------------------------------------------

    def _open_datagram_session(self, session: RelaySession, routes: tuple[IPNetwork, ...]) -> None:
        """2xx with capsule-protocol, then ADDRESS_ASSIGN (request ID 0, unprompted) and
        ROUTE_ADVERTISEMENT for what the client may reach (RFC 9484 §4.7)."""
        conn = session.conn
        session.transport = "datagram"
        session.capsules = CapsuleDecoder(
            max_value=MAX_CONTROL_CAPSULE, max_datagram=self.settings.mtu + 8
        )
        headers = build_response_headers(200, extra=[(b"capsule-protocol", b"?1")])
        conn.h3.send_headers(session.stream_id, headers, end_stream=False)
        # A scoped ipproto narrows the routes to that protocol (§4.7.3; ICMP always passes).
        proto = session.scope_ipproto or 0
        control = encode_address_assign(
            AssignedAddress(0, a.network) for a in session.lease.addresses
        ) + encode_route_advertisement(ranges_for(routes, proto))
        conn.h3.send_data(session.stream_id, control, end_stream=False)
        self._dirty.add(conn)

    def _abort_session(self, session: RelaySession, code: int, reason: str) -> None:
        """A peer error on one tunnel: log once, abort only that stream."""
        self._ratelog.warning(
            f"abort:{session.peer}", "%s: %s: aborting this tunnel", session.describe(), reason
        )
        conn = session.conn
        self.end_session(session, f"protocol error: {reason}")
        conn.abort_stream(session.stream_id, code)
        self._dirty.add(conn)

    def session_capsules(self, session: RelaySession, data: bytes, ended: bool) -> None:
        """The request stream of a datagram-mode session: capsules only."""
        decoder = session.capsules
        assert decoder is not None
        try:
            capsules = decoder.feed(data) if data else []
            if ended:
                decoder.end()
            packets: list[bytes] = []
            for capsule in capsules:
                self._capsule(session, capsule, packets)
        except CapsuleError as exc:
            session.counters.drops[DROP_MALFORMED] += 1
            self._abort_session(session, exc.wire_code, exc.reason)
            return
        if packets:
            self._packets_from_client(session, packets)
        if ended and session.stream_id in session.conn.sessions:
            self.end_session(session, "closed by client", fin=True)

    def _capsule(self, session: RelaySession, capsule: Capsule, packets: list[bytes]) -> None:
        kind = capsule.type
        if kind == DATAGRAM:
            # RFC 9297 §3.5: the reliable equivalent of a QUIC DATAGRAM frame.
            context_id, payload = decode_datagram_payload(capsule.value)
            if context_id == 0:
                packets.append(payload)
            else:
                session.counters.drops[DROP_UNKNOWN_CONTEXT] += 1
        elif kind == ADDRESS_REQUEST:
            request = decode_address_request(capsule.value)
            reused = session.request_ids.intersection(r.request_id for r in request.requests)
            if reused:
                raise CapsuleError(f"ADDRESS_REQUEST reuses request ID {min(reused)}")
            session.request_ids.update(r.request_id for r in request.requests)
            self._answer_address_request(session, request.requests)
        elif kind == ADDRESS_ASSIGN:
            # The client assigning us addresses (site-to-site) is not something we use;
            # it is still checked, as a malformed one must abort the stream.
            decode_address_assign(capsule.value)
        elif kind == ROUTE_ADVERTISEMENT:
            session.peer_routes = decode_route_advertisement(capsule.value)

    def _answer_address_request(self, session: RelaySession, requests: Iterable[Any]) -> None:
        """RFC 9484 §4.7.2: one Assigned Address per request (the lease address of that
        family when the request allows it, else the all-zero rejection) plus the rest of
        the lease with request ID 0; the capsule lists every assigned address."""
        lease = {a.version: a.network for a in session.lease.addresses}
        answered: dict[int, int] = {}  # IP version -> request ID that got the lease address
        entries: list[AssignedAddress] = []
        for req in requests:
            mine = lease.get(req.prefix.version)
            wanted = req.prefix
            any_address = int(wanted.network_address) == 0
            if (
                mine is not None
                and mine.version not in answered
                and (any_address or mine.subnet_of(wanted))
            ):
                answered[mine.version] = req.request_id
                entries.append(AssignedAddress(req.request_id, mine))
            else:
                entries.append(rejection(req.request_id, wanted.version))
        for version, net in lease.items():
            if version not in answered:
                entries.append(AssignedAddress(0, net))
        conn = session.conn
        conn.h3.send_data(session.stream_id, encode_address_assign(entries), end_stream=False)
        self._dirty.add(conn)

    def session_datagram(self, conn: RelayConnection, stream_id: int, data: bytes) -> None:
        """An HTTP/3 Datagram from a client (RFC 9297 §2.1, RFC 9484 §6)."""
        session = conn.sessions.get(stream_id)
        if session is None:
            # Unknown, not yet open or closed stream: silently dropped (RFC 9297 §2.1).
            self.totals.drops[DROP_UNKNOWN_STREAM] += 1
            return
        if session.transport != "datagram":
            # A stream-mode tunnel has no datagram semantics (RFC 9297 §2).
            self._abort_session(session, H3_DATAGRAM_ERROR, "HTTP datagram on a stream-mode tunnel")
            return
        try:
            context_id, packet = decode_datagram_payload(data)
        except CapsuleError:
            session.counters.drops[DROP_MALFORMED] += 1
            return
        if context_id != 0:
            session.counters.drops[DROP_UNKNOWN_CONTEXT] += 1  # RFC 9484 §6
            return
        self._packets_from_client(session, [packet])

    def _packets_from_client(self, session: RelaySession, packets: list[bytes]) -> None:
        """Checks of RFC 9484 §7.2 and docs/architecture.md §4, then the TUN."""
        counters = session.counters
        counters.last_rx = time.time()
        keys = session.addr_keys
        accepted: list[bytes] = []
        mtu = self.settings.mtu
        scoped = session.scope_targets is not None or session.scope_ipproto is not None
        acl = session.acl.allows if session.acl is not None else None
        for pkt in packets:
            counters.rx_packets += 1
            counters.rx_bytes += len(pkt)
            try:
                version, src, dst = addresses(pkt)
            except PacketError:
                counters.drops[DROP_MALFORMED] += 1
                continue
            if src not in keys:
                counters.drops[DROP_SPOOFED] += 1
                self._ratelog.warning(
                    f"spoof:{session.peer}",
                    "%s: dropped packet with spoofed source %s",
                    session.describe(),
                    ipaddress.ip_address(src),
                )
                continue
            if _link_local(version, dst):
                counters.drops[DROP_LINK_LOCAL] += 1
                continue
            if len(pkt) > mtu:
                # Too big for our TUN: tell the sender the tunnel's MTU (RFC 9484 §7.2.1).
                counters.drops[DROP_OVERSIZED] += 1
                gateway = self.gateways.get(version)
                icmp = icmp_packet_too_big(pkt, mtu, gateway) if gateway is not None else None
                if icmp is not None:
                    self._send_to_client(session, icmp)
                continue
            if scoped and not self._in_scope(session, pkt):
                continue
            if acl is not None and not acl(pkt):
                self._denied(session, version, pkt)
                continue
            accepted.append(pkt)
        if accepted:
            if not session.tun_out:
                self._tun_pending.append(session)
            session.tun_out += accepted
            if not self._batching:
                self._write_tun()

    def _denied(self, session: RelaySession, version: int, pkt: bytes) -> None:
        """An ACL drop: count it, log it (rate-limited), answer ICMP prohibited."""
        session.counters.drops[DROP_ACL] += 1
        self._ratelog.info(
            f"acl:{session.identity}",
            "%s: packet to %s denied by ACL",
            session.describe(),
            ipaddress.ip_address(pkt[16:20] if version == 4 else pkt[24:40]),
            extra=session_log_fields(session),
        )
        gateway = self.gateways.get(version)
        if gateway is None or not session.icmp_allowed(time.monotonic()):
            return
        icmp = icmp_admin_prohibited(pkt, gateway)
        if icmp is not None:
            self._send_to_client(session, icmp)

    def _send_to_client(self, session: RelaySession, pkt: bytes, batch: bool = False) -> str:
        """Queue one IP packet for the client: a QUIC DATAGRAM when the client accepts
        them, else a DATAGRAM capsule on the stream. Returns "" or a drop reason.
        ``batch``: the caller refreshed the datagram bound for a batch; a lone packet
        (an ICMP error) refreshes it here, so a budget spent long ago does not stick."""
        conn = session.conn
        if conn.closed or session.stream_id not in conn.sessions:
            return DROP_NO_SESSION
        if session.transport == "stream":
            if stream_send_backlog(conn.quic, session.stream_id) > session.bound.limit:
                return DROP_QUEUE_FULL
            assert conn.h3 is not None
            conn.h3.send_data(session.stream_id, encode_frame(pkt), end_stream=False)
            self._dirty.add(conn)
            return ""
        payload = encode_ip_datagram(pkt)
        if peer_accepts_datagrams(conn.h3, conn.quic):
            if not batch:
                conn.datagram_bound.refresh(conn.quic, monotonic())
            reason = queue_datagram(
                conn.h3, conn.quic, session.stream_id, payload, conn.datagram_bound
            )
        elif stream_send_backlog(conn.quic, session.stream_id) > session.bound.limit:
            reason = DROP_QUEUE_FULL
        else:
            conn.h3.send_data(session.stream_id, encode_datagram_capsule(payload), False)
            reason = ""
        if not reason:
            self._dirty.add(conn)
        return reason

    def _send_datagrams(self, session: RelaySession) -> None:
        """TUN -> client in datagram mode: hop limit, size and queue checks per packet."""
        packets = session.out
        session.out = []
        conn = session.conn
        if conn.closed or session.stream_id not in conn.sessions:
            return
        counters = session.counters
        if peer_accepts_datagrams(conn.h3, conn.quic):
            # Largest IP packet one HTTP Datagram can carry (Context ID 0 takes a byte).
            room = datagram_room(conn.quic, session.stream_id) - 1
            conn.datagram_bound.refresh(conn.quic, monotonic())
        else:
            room = self.settings.mtu
        sent = 0
        nbytes = 0
        for pkt in packets:
            try:
                # RFC 9484 §7.2: decrement the hop count upon encapsulation.
                fwd = decrement_ttl(pkt)
            except PacketError:
                counters.drops[DROP_MALFORMED] += 1
                continue
            version = pkt[0] >> 4
            gateway = self.gateways.get(version)
            if fwd is None:
                counters.drops[DROP_TTL_EXPIRED] += 1
                if gateway is not None:
                    kind = ICMPV4_TIME_EXCEEDED if version == 4 else ICMPV6_TIME_EXCEEDED
                    icmp = icmp_error(pkt, gateway, kind, 0)
                    if icmp is not None:
                        self.tun.write(icmp)
                continue
            if len(fwd) > room:
                # Never queue what cannot fit: Packet Too Big back to the sender instead.
                counters.drops[DROP_OVERSIZED] += 1
                if gateway is not None:
                    icmp = icmp_packet_too_big(pkt, room, gateway)
                    if icmp is not None:
                        self.tun.write(icmp)
                continue
            reason = self._send_to_client(session, fwd, batch=True)
            if reason:
                counters.drops[reason] += 1
                continue
            sent += 1
            nbytes += len(fwd)
        if sent:
            counters.sent(sent, nbytes)

    # -- status -------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Sessions, pool and counters as plain data (docs/status.schema.json, relay part).

        Called from the event loop (control socket, metrics scrape); O(sessions), no I/O.
        ``totals`` covers closed and open sessions, so its counters only ever grow.
        """
        now = time.time()
        totals = self.totals.copy()
        sessions = []
        for s in sorted(self.sessions, key=lambda s: s.started):
            quic = s.conn.quic
            totals.add(s.counters)
            sessions.append(
                {
                    "id": s.owner,
                    "identity": getattr(s, "identity", None),
                    "peer": s.peer,
                    "addresses": [str(a) for a in s.lease.addresses],
                    "transport": getattr(s, "transport", "stream"),
                    "state": "connected",
                    "connected_since": s.started,
                    "rtt_ms": rtt_ms(quic),
                    "cwnd": congestion_window(quic),
                    "bytes_in_flight": bytes_in_flight(quic),
                    **s.counters.snapshot(),
                }
            )
        return {
            "role": "relay",
            "time": now,
            "started": self.started,
            "uptime": now - self.started,
            "sessions": sessions,
            "pool": {"used": self.pool.used(), "capacity": self.pool.capacity()},
            "results": dict(self.results),
            "handshake": self.handshakes.snapshot(),
            "totals": totals.snapshot(),
        }


def _link_local(version: int, dst: bytes) -> bool:
    """Link-local unicast or multicast destination: never forwarded (RFC 9484 §7.2)."""
    if version == 4:
        return (dst[0] == 169 and dst[1] == 254) or (dst[0] == 224 and dst[1] == 0 and dst[2] == 0)
    return (dst[0] == 0xFE and dst[1] & 0xC0 == 0x80) or (dst[0] == 0xFF and dst[1] & 0x0F == 0x02)


def _dcid(data: bytes) -> bytes:
    """Destination CID of a QUIC packet, for routing it to its connection.

    Short header: the CID follows the first byte (our CIDs are 8 bytes). Long header:
    byte 5 is the DCID length. Anything malformed yields a key that matches nothing.
    """
    if not data:
        return b""
    if data[0] & 0x80:
        if len(data) < 6:
            return b""
        n = data[5]
        return data[6 : 6 + n]
    return data[1:9]


def _peer_ip(addr: Address) -> str:
    host = str(addr[0])
    return host[7:] if host.startswith("::ffff:") else host


def _format_addr(addr: Address) -> str:
    host, port = addr[0], addr[1]
    if host.startswith("::ffff:"):
        host = host[7:]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
