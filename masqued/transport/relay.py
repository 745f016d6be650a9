"""The relay's tunnels: CONNECT-IP sessions on the endpoint's links <-> the relay's TUN.

Each admitted request becomes a ``Tunnel``: a ProxySession (the protocol), a data
plane (how its packets leave) and the client's lease. Packets from a client pass the
session's checks and are written to the TUN once per UDP batch; the kernel forwards
and NATs them. Packets read from the TUN go to the tunnel that owns their destination.
Tunnels come from HTTP/3 links (the QUIC endpoint: connections, Retry, limits,
transport/endpoint.py) and from HTTP/2 links (the TCP endpoint, transport/tcpendpoint.py)
alike; who may connect and with what address is admission's (gate/admission.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from masqued.gate.access import AccessControl, Identity, LeaseStore
from masqued.gate.admission import ANONYMOUS, Admitter, Caller, Refused
from masqued.gate.ipam import AddressPool, Lease
from masqued.gate.policy import Reach, relay_addresses
from masqued.host.tun import Tun
from masqued.logutil import RateLimitedLog
from masqued.observe.metrics import LatencyHistogram, TrafficCounters
from masqued.proto.dns import DnsInfo
from masqued.proto.drops import (
    DROP_ACL,
    DROP_MALFORMED,
    DROP_NO_SESSION,
    DROP_NOT_ROUTED,
    DROP_OUT_OF_SCOPE,
    DROP_RELAY_ADDRESS,
    DROP_TUN_WRITE,
    DROP_UNKNOWN_STREAM,
)
from masqued.proto.errors import H3_DATAGRAM_ERROR, ProtocolError, RequestError
from masqued.proto.events import StreamEnded
from masqued.proto.framings import Mode
from masqued.proto.request import IPV6_MIN_MTU, build_response_headers, parse_connect_request
from masqued.proto.session import ProxySession
from masqued.proto.template import UriTemplate
from masqued.runtime.service import client_fields
from masqued.transport import engines
from masqued.transport.balance import Balancer
from masqued.transport.dataplane import DataPlane, plane_for
from masqued.transport.endpoint import QuicEndpoint, peer_ip
from masqued.transport.h2link import H2Link
from masqued.transport.h3link import monotonic
from masqued.transport.limits import DEFAULT_ENDPOINT_LIMITS, EndpointLimits
from masqued.transport.link import Headers, Link
from masqued.transport.tcpendpoint import TcpEndpoint

log = logging.getLogger("masqued.relay")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# CONNECT-IP tunnels one connection may carry at once.
MAX_TUNNELS_PER_CONNECTION = 4
TUN_READ_BATCH = 256
# Lease-file changes are written this long after the first of them (one write for a
# burst of reconnects).
LEASE_WRITE_DELAY = 0.2
# How a refusal's drop reason reads in the log line.
_DENIED_WHY = {
    DROP_ACL: "denied by ACL",
    DROP_NOT_ROUTED: "outside the routes this relay serves",
    DROP_OUT_OF_SCOPE: "outside the request's scope",
    DROP_RELAY_ADDRESS: "the relay's own address",
}


@dataclass(frozen=True)
class RelaySettings:
    """What the data path needs from the relay config."""

    mtu: int
    routes: tuple[IPNetwork, ...]
    certificate: str
    private_key: str
    max_clients: int | None = None
    # Relay workers (masqued.runtime.workers): this one's index and how many share the
    # port; with more than one, every connection ID this worker issues starts with it.
    worker: int = 0
    workers: int = 1
    limits: EndpointLimits = DEFAULT_ENDPOINT_LIMITS
    templates: tuple[UriTemplate, ...] = ()  # served besides the default one
    # The CA that signs client certificates (auth = mtls): the TCP endpoint's TLS
    # asks for a certificate and checks its chain (the ssl module cannot defer that).
    client_ca: str | None = None
    # Addresses of the relay host no client may send to, besides those of this
    # server's own pool (masqued.gate.policy.relay_addresses): the other workers'.
    relay_addresses: tuple[bytes, ...] = ()
    # Resolvers told to every client (DNS_ASSIGN, or masqued-dns in stream mode).
    dns: DnsInfo | None = None
    # The QUIC engine (masqued.transport.engines): "aioquic", "qh3"; None: the default.
    quic_engine: str | None = None


@dataclass(eq=False)
class Tunnel:
    """One CONNECT-IP tunnel (one request stream) and the client's lease."""

    link: Link
    stream_id: int
    session: ProxySession
    plane: DataPlane
    lease: Lease
    identity: Identity = ANONYMOUS
    peer_cert: Any = None
    started: float = field(default_factory=time.time)
    counters: TrafficCounters = field(default_factory=TrafficCounters)
    out: list[bytes] = field(default_factory=list)  # from the TUN, not yet sent
    tun_out: list[bytes] = field(default_factory=list)  # accepted, not yet written

    @property
    def owner(self) -> str:
        return self.lease.owner

    @property
    def peer(self) -> str:
        return self.link.peer

    @property
    def mode(self) -> Mode:
        return self.session.mode

    def describe(self) -> str:
        addrs = ", ".join(str(a.ip) for a in self.lease.addresses)
        who = f"{self.identity.name} ({self.peer})" if self.identity.name else self.peer
        return f"{who} as {addrs}"

    def log_fields(self) -> dict[str, str]:
        """Journal fields of this tunnel's log lines (masqued.runtime.service.client_fields)."""
        return client_fields(
            self.peer,
            ",".join(str(a.ip) for a in self.lease.addresses),
            self.identity.name,
            self.owner,
        )


class RelayServer:
    """Serves CONNECT-IP on a QUIC endpoint (and, given TCP sockets, a TCP endpoint)
    and moves packets to and from the TUN."""

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
        tcp_socks: Sequence[socket.socket] = (),
    ) -> None:
        self.loop = loop
        self.tun = tun
        self.pool = pool
        self.settings = settings
        leases = leases or LeaseStore(None)
        # Lease writes (an fsync each) off the packet loop, coalesced, in order.
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="leases")
        leases.schedule = lambda fn: loop.call_later(LEASE_WRITE_DELAY, fn)
        leases.run_blocking = lambda fn: loop.run_in_executor(self._writer, fn)
        self.admitter = Admitter(
            access,
            pool,
            leases,
            routes=settings.routes,
            max_clients=settings.max_clients,
            max_tunnels_per_connection=MAX_TUNNELS_PER_CONNECTION,
        )
        self.endpoint = QuicEndpoint(
            loop,
            sock,
            self,
            certificate=settings.certificate,
            private_key=settings.private_key,
            limits=settings.limits,
            worker=settings.worker,
            workers=settings.workers,
            balancer=balancer,
            client_certificates=self._wants_certificates,
            engine=settings.quic_engine,
        )
        self.tcp: TcpEndpoint | None = None
        if tcp_socks:
            self.tcp = TcpEndpoint(
                loop,
                list(tcp_socks),
                self,
                certificate=settings.certificate,
                private_key=settings.private_key,
                client_ca=settings.client_ca,
                limits=settings.limits,
            )
        self.tunnels: dict[tuple[Link, int], Tunnel] = {}
        self.by_addr: dict[bytes, Tunnel] = {}
        self.totals = TrafficCounters()
        self.results: dict[str, int] = {}
        self.handshakes = LatencyHistogram()
        self.started = time.time()
        self._ratelog = RateLimitedLog(log)
        # Packets from clients are written to the TUN once per UDP batch, so that
        # consecutive TCP segments can go to the kernel as one (masqued.host.coalesce).
        self._tun_pending: list[Tunnel] = []
        self._batching = False
        # The relay's own TUN address per IP version: source of the ICMP errors we make.
        self.gateways: dict[int, ipaddress.IPv4Address | ipaddress.IPv6Address] = {
            g.version: g.ip for g in pool.gateways()
        }
        self.on_change: Callable[[], None] | None = None
        self._reach = self._new_reach(settings.routes, DROP_NOT_ROUTED)

    @property
    def access(self) -> AccessControl | None:
        return self.admitter.access

    @property
    def balancer(self) -> Balancer | None:
        return self.endpoint.balancer

    @property
    def sessions(self) -> list[Tunnel]:
        return list(self.tunnels.values())

    def _wants_certificates(self) -> bool:
        access = self.admitter.access
        return access is not None and access.requests_client_certificate

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        self.endpoint.start()
        if self.tcp is not None:
            self.tcp.start()
        self.loop.add_reader(self.tun.fileno(), self._tun_ready)

    def update_settings(self, settings: RelaySettings) -> None:
        """Apply settings that can change live (routes, certificates): the routes
        also for the live tunnels (what they may reach). Nothing changes if the new
        certificate cannot be loaded (it raises)."""
        if self.tcp is not None:
            self.tcp.set_certificate(settings.certificate, settings.private_key, settings.client_ca)
        self.endpoint.set_certificate(settings.certificate, settings.private_key)
        self.settings = settings
        self._reach_changed()

    def _new_reach(self, networks: Sequence[IPNetwork], outside: str, cache: int = 4096) -> Reach:
        own = relay_addresses(g.network for g in self.pool.gateways())
        return Reach(networks, own + self.settings.relay_addresses, outside, cache_size=cache)

    def _reach_for(self, routes: Sequence[IPNetwork], scoped: bool) -> Reach:
        """Where a tunnel's packets may go: the relay's routes (one Reach the tunnels
        share), or a scoped request's targets inside them; never the relay itself."""
        if not scoped:
            return self._reach
        return self._new_reach(routes, DROP_OUT_OF_SCOPE, cache=256)

    def _reach_changed(self) -> None:
        """Routes or the pool changed: every tunnel checks against the new ones."""
        self._reach = self._new_reach(self.settings.routes, DROP_NOT_ROUTED)
        for tunnel in self.tunnels.values():
            session = tunnel.session
            scoped = session.request.target is not None
            session.reach = self._reach_for(session.routes, scoped)

    def flush(self) -> None:
        """Send what every link of every endpoint queued."""
        self.endpoint.flush()
        if self.tcp is not None:
            self.tcp.flush()

    def close(self) -> None:
        """Close every connection (CONNECTION_CLOSE, H3_NO_ERROR) and stop reading."""
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.tun.fileno())
        for tunnel in list(self.tunnels.values()):
            self.end_tunnel(tunnel, "relay shutting down")
        self.endpoint.close("relay shutting down")
        if self.tcp is not None:
            self.tcp.close("relay shutting down")
        leases = self.admitter.leases
        leases.schedule = leases.run_blocking = None
        self._writer.shutdown(wait=True)
        leases.save()  # what a pending write had not written yet

    def count(self, result: str) -> None:
        self.results[result] = self.results.get(result, 0) + 1

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    # -- batches (endpoint) -------------------------------------------------------------

    def begin_batch(self) -> None:
        self._batching = True

    def end_batch(self) -> None:
        self._batching = False
        self._write_tun()
        self._pump_tun()
        # What the TUN answered may be for clients of either endpoint.
        self.flush()

    def _write_tun(self) -> None:
        """Write what the clients sent in this batch, one TUN batch per tunnel."""
        pending, self._tun_pending = self._tun_pending, []
        for tunnel in pending:
            packets, tunnel.tun_out = tunnel.tun_out, []
            dropped = self.tun.write_batch(packets)
            if dropped:
                tunnel.counters.drops[DROP_TUN_WRITE] += dropped

    # -- what the links report (TunnelHandler) -----------------------------------------------

    def link_headers(self, link: Link, stream_id: int, headers: Headers, ended: bool) -> None:
        tunnel = self.tunnels.get((link, stream_id))
        if tunnel is not None:
            # Trailers or a second HEADERS on an open tunnel: not allowed here.
            self._abort(tunnel, engines.H3_MESSAGE_ERROR, "unexpected HEADERS on the tunnel")
            return
        self._request(link, stream_id, headers)

    def link_data(self, link: Link, stream_id: int, data: bytes, ended: bool) -> None:
        tunnel = self.tunnels.get((link, stream_id))
        if tunnel is None:
            return  # a refused request's body, or a stream we already ended
        try:
            packets, reply, events = tunnel.session.receive_data(data, ended)
        except ProtocolError as exc:
            tunnel.counters.drops[DROP_MALFORMED] += 1
            what = "malformed stream frame" if tunnel.mode is Mode.STREAM else "malformed capsule"
            self._abort(tunnel, exc.wire_code, f"{what} ({exc.reason})")
            return
        if reply and not tunnel.plane.send_control(reply):
            # Address requests while the stream holds all it may unacknowledged: the
            # answers (RFC 9484 §4.7.2 wants one each) cannot be queued without limit.
            self._abort(
                tunnel, engines.H3_EXCESSIVE_LOAD, "address requests beyond the stream's send bound"
            )
            return
        if packets:
            self._from_client(tunnel, packets)
        if any(type(e) is StreamEnded for e in events):
            self.end_tunnel(tunnel, "closed by client", fin=True)

    def link_datagram(self, link: Link, stream_id: int, payload: bytes) -> None:
        """An HTTP/3 Datagram from a client (RFC 9297 §2.1, RFC 9484 §6)."""
        tunnel = self.tunnels.get((link, stream_id))
        if tunnel is None:
            # Unknown, not yet open or closed stream: silently dropped (RFC 9297 §2.1).
            self.totals.drops[DROP_UNKNOWN_STREAM] += 1
            return
        if tunnel.mode is Mode.STREAM:
            # A stream-mode tunnel has no datagram semantics (RFC 9297 §2).
            self._abort(tunnel, H3_DATAGRAM_ERROR, "HTTP datagram on a stream-mode tunnel")
            return
        packet = tunnel.session.receive_datagram(payload)
        if packet is not None:
            self._from_client(tunnel, [packet])

    def link_reset(self, link: Link, stream_id: int, code: int) -> None:
        tunnel = self.tunnels.get((link, stream_id))
        if tunnel is not None:
            self.end_tunnel(tunnel, f"reset by client (code {code})")

    def link_closed(self, link: Link, code: int, reason: str) -> None:
        for tunnel in [t for (lk, _), t in self.tunnels.items() if lk is link]:
            self.end_tunnel(tunnel, f"connection closed ({reason})")

    # -- requests ---------------------------------------------------------------------------

    def _request(self, link: Link, stream_id: int, headers: Headers) -> None:
        try:
            request = parse_connect_request(headers, self.settings.templates)
            if request.transport == "stream" and link.http_version != "h3":
                # Over HTTP/2 packets travel as DATAGRAM capsules only (RFC 9484).
                raise RequestError(
                    400, "stream mode needs HTTP/3; over HTTP/2 send capsule-protocol: ?1"
                )
            if (
                request.transport == "datagram"
                and 6 in self.gateways
                and link.accepts_datagrams()
                and link.datagram_room(stream_id) - 1 < IPV6_MIN_MTU
            ):
                # RFC 9484 §7.2: an IPv6 tunnel must carry 1280-byte packets; the
                # peer's max_datagram_frame_size leaves less room (a PTB below 1280
                # would be ignored and packets would vanish).
                raise RequestError(
                    503,
                    f"HTTP datagrams of this connection carry only "
                    f"{link.datagram_room(stream_id) - 1}-byte packets, below the IPv6 minimum MTU",
                )
            cert, chain = link.peer_certificate()
            caller = Caller(
                peer_ip=peer_ip(link.peer_addr),
                owner=f"{link.peer}#{stream_id}",
                certificate=cert,
                chain=tuple(chain),
                tunnels_on_connection=sum(1 for lk, _ in self.tunnels if lk is link),
            )
            admission = self.admitter.admit(
                request, caller, len(self.tunnels), self._replace_identity
            )
        except Refused as exc:
            self._refuse(link, stream_id, exc.status, exc.reason, exc.result, exc.headers)
            return
        except RequestError as exc:
            self._refuse(link, stream_id, exc.status, exc.reason, "rejected")
            return
        counters = TrafficCounters()
        session = ProxySession(
            request,
            addresses=admission.lease.addresses,
            routes=admission.routes,
            mtu=self.settings.mtu,
            gateways=self.gateways,
            drops=counters.drops,
            acl=admission.acl.allows if admission.acl is not None else None,
            reach=self._reach_for(admission.routes, request.target is not None),
            dns=self.settings.dns,
        )
        tunnel = Tunnel(
            link=link,
            stream_id=stream_id,
            session=session,
            plane=plane_for(session.mode, link, stream_id, self.settings.mtu),
            lease=admission.lease,
            identity=admission.identity,
            peer_cert=cert,
            counters=counters,
        )
        self._open(tunnel)

    def _open(self, tunnel: Tunnel) -> None:
        link, stream_id, session = tunnel.link, tunnel.stream_id, tunnel.session
        headers, first = session.response()
        link.send_headers(stream_id, headers)
        if first:
            link.send_data(stream_id, first)
        link.open_tunnel(stream_id)
        self.tunnels[(link, stream_id)] = tunnel
        for key in session.addr_keys:
            self.by_addr[key] = tunnel
        link.admitted()
        self.count("accepted")
        self.handshakes.observe(monotonic() - link.created)
        log.info(
            "session opened: %s (stream %d, %d/%d addresses in use)",
            tunnel.describe(),
            stream_id,
            self.pool.used(),
            self.pool.capacity(),
            extra=tunnel.log_fields(),
        )
        self._changed()

    def _replace_identity(self, name: str) -> None:
        """One tunnel per identity: a client that reconnects (new connection after a
        network change) replaces its old tunnel and keeps its address."""
        for old in [t for t in self.tunnels.values() if t.identity.name == name]:
            self._close(old, "replaced by a new session of the same client")

    def _refuse(
        self,
        link: Link,
        stream_id: int,
        status: int,
        reason: str,
        result: str,
        extra: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        self.count(result)
        ip = peer_ip(link.peer_addr)
        # The reason never contains a secret; only the peer and what failed.
        auth = result in ("auth_failed", "rate_limited")
        what = "authentication failed" if auth else "request refused"
        self._ratelog.warning(
            f"{result}:{ip}:{status}:{reason[:40]}",
            "%s: %s, answering %d: %s",
            link.peer,
            what,
            status,
            reason,
        )
        try:
            link.send_headers(stream_id, build_response_headers(status, extra=extra), end=True)
        except Exception:  # the stream may already be gone
            link.abort(stream_id, engines.H3_REQUEST_REJECTED)

    def tls_refused(self, link: H2Link, reason: str) -> None:
        """The TCP endpoint's TLS refused a client certificate (not from client_ca):
        an authentication failure like a 403 over HTTP/3, counted as one and towards
        the address's failure limit; the client saw a TLS alert, not a status."""
        self.count("auth_failed")
        ip = peer_ip(link.peer_addr)
        access = self.admitter.access
        if access is not None:
            access.limiter.failed(ip)
        self._ratelog.warning(
            f"auth_failed:{ip}:tls",
            "%s: authentication failed: client certificate refused in the TLS handshake (%s)",
            link.peer,
            reason,
        )

    def _abort(self, tunnel: Tunnel, code: int, reason: str) -> None:
        """A peer error on one tunnel: log once, abort only that stream."""
        self._ratelog.warning(
            f"abort:{tunnel.peer}", "%s: %s: aborting this tunnel", tunnel.describe(), reason
        )
        self.end_tunnel(tunnel, f"protocol error: {reason}")
        tunnel.link.abort(tunnel.stream_id, code)

    def end_tunnel(self, tunnel: Tunnel, reason: str, fin: bool = False) -> None:
        link = tunnel.link
        if self.tunnels.pop((link, tunnel.stream_id), None) is None:
            return
        for key in tunnel.session.addr_keys:
            if self.by_addr.get(key) is tunnel:
                del self.by_addr[key]
        self.admitter.release(tunnel.owner)
        self.totals.add(tunnel.counters)
        if fin and not link.closed:
            with contextlib.suppress(Exception):
                link.send_data(tunnel.stream_id, b"", end=True)
        c = tunnel.counters
        log.info(
            "session closed: %s: %s (rx %d pkts/%d B, tx %d pkts/%d B, dropped %s)",
            tunnel.describe(),
            reason,
            c.rx_packets,
            c.rx_bytes,
            c.tx_packets,
            c.tx_bytes,
            dict(c.drops) or "none",
            extra=tunnel.log_fields(),
        )
        self._changed()

    def _close(self, tunnel: Tunnel, reason: str) -> None:
        """End a tunnel from our side: release it and reset its stream."""
        self.end_tunnel(tunnel, reason)
        if not tunnel.link.closed:
            tunnel.link.abort(tunnel.stream_id, engines.H3_REQUEST_CANCELLED)

    def pool_changed(self) -> None:
        """The pool grew (reload): ICMP errors may now come from a new family's gateway."""
        for gateway in reversed(self.pool.gateways()):
            self.gateways[gateway.version] = gateway.ip
        self._reach_changed()

    def update_access(self, access: AccessControl | None) -> None:
        """After a reload: new credentials and policies for new and live tunnels.

        Tunnels whose client is no longer authorized (token removed, certificate
        revoked) are closed; the others keep running with their new ACL.
        """
        settings = self.settings
        self.admitter.update(access, settings.routes, settings.max_clients)
        for tunnel in list(self.tunnels.values()):
            if not self.admitter.still_valid(tunnel.identity, tunnel.peer_cert):
                self._ratelog.warning(
                    f"revoked:{tunnel.identity}",
                    "%s: no longer authorized after reload: closing its session",
                    tunnel.describe(),
                    extra=tunnel.log_fields(),
                )
                self._close(tunnel, "no longer authorized")
                continue
            acl = self.admitter.acl_for(tunnel.identity)
            tunnel.session.acl = acl.allows if acl is not None else None
        self.flush()

    # -- client -> TUN ------------------------------------------------------------------------

    def _from_client(self, tunnel: Tunnel, packets: list[bytes]) -> None:
        counters = tunnel.counters
        counters.last_rx = time.time()
        counters.rx_packets += len(packets)
        counters.rx_bytes += sum(map(len, packets))
        session = tunnel.session
        accepted, replies = session.uplink(packets, time.monotonic())
        if session.spoofed_from is not None:
            self._ratelog.warning(
                f"spoof:{tunnel.peer}",
                "%s: dropped packet with spoofed source %s",
                tunnel.describe(),
                ipaddress.ip_address(session.spoofed_from),
            )
            session.spoofed_from = None
        if session.denied_to is not None:
            why = session.denied_why
            self._ratelog.info(
                f"{why}:{tunnel.identity}",
                "%s: packet to %s dropped (%s)",
                tunnel.describe(),
                ipaddress.ip_address(session.denied_to),
                _DENIED_WHY.get(why, why),
                extra=tunnel.log_fields(),
            )
            session.denied_to = None
        for icmp in replies:
            tunnel.plane.send_one(icmp)
        if accepted:
            if not tunnel.tun_out:
                self._tun_pending.append(tunnel)
            tunnel.tun_out += accepted
            if not self._batching:
                self._write_tun()

    # -- TUN -> client ------------------------------------------------------------------------

    def _tun_ready(self) -> None:
        self._pump_tun()
        self.flush()

    def _pump_tun(self) -> None:
        """Hand every packet waiting on the TUN to its tunnel, without sending.

        Runs on TUN readiness and also right after a batch from the clients was written
        to the TUN: the answers the kernel produced meanwhile (TCP ACKs above all) then
        leave with the QUIC ACKs in one flush instead of in packets of their own.
        """
        packets = self.tun.read_batch(TUN_READ_BATCH)
        if not packets:
            return
        by_addr = self.by_addr
        touched: list[Tunnel] = []
        for pkt in packets:
            version = pkt[0] >> 4
            if version == 4:
                dst = pkt[16:20]
            elif version == 6:
                dst = pkt[24:40]
            else:
                self.totals.drops[DROP_MALFORMED] += 1
                continue
            tunnel = by_addr.get(dst)
            if tunnel is None:
                self.totals.drops[DROP_NO_SESSION] += 1
                continue
            if not tunnel.out:
                touched.append(tunnel)
            tunnel.out.append(pkt)
        for tunnel in touched:
            packets, tunnel.out = tunnel.out, []
            if tunnel.link.closed:
                continue
            try:
                self._to_client(tunnel, packets)
            except Exception as exc:
                tunnel.link.fail(exc)

    def _to_client(self, tunnel: Tunnel, packets: list[bytes]) -> None:
        plane = tunnel.plane
        out, to_tun = tunnel.session.downlink(packets, plane.room())
        for icmp in to_tun:
            self.tun.write(icmp)
        if out:
            plane.send(out, tunnel.counters)

    # -- status -------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Tunnels, pool and counters as plain data (docs/status.schema.json, relay part).

        Called from the event loop (control socket, metrics scrape); O(tunnels), no I/O.
        ``totals`` covers closed and open tunnels, so its counters only ever grow.
        """
        now = time.time()
        totals = self.totals.copy()
        sessions = []
        for t in sorted(self.tunnels.values(), key=lambda t: t.started):
            totals.add(t.counters)
            sessions.append(
                {
                    "id": t.owner,
                    "identity": t.identity.name,
                    "peer": t.peer,
                    "addresses": [str(a) for a in t.lease.addresses],
                    "transport": str(t.mode),
                    "http": t.link.http_version,
                    "state": "connected",
                    "connected_since": t.started,
                    **t.link.stats(),
                    **t.counters.snapshot(),
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
