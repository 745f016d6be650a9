"""The relay's QUIC endpoint: one UDP socket, many connections, each a tunnel link.

Duties no single connection can do: route each datagram to its connection by
connection ID (the CID registry), answer unknown versions, start connections from
Initials — with a Retry when many wait (address validation, RFC 9000 §8.1) or to send
the client to a less busy worker —, bound what waiting connections and all
connections together may hold (masqued.transport.limits), end connections whose
handshake or CONNECT never comes, and keep a failure inside one connection from
reaching the others. What the connections carry goes to a TunnelHandler (the relay).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
from collections.abc import Callable
from typing import Protocol

from masqued.logutil import RateLimitedLog
from masqued.transport import engines
from masqued.transport.balance import Balancer, InvalidToken, RetryTokens, retry_cid
from masqued.transport.h3link import H3Link, monotonic
from masqued.transport.limits import BufferLedger, EndpointLimits
from masqued.transport.link import Link, TunnelHandler, format_addr, log_failure
from masqued.transport.udp import Address, UdpSocket, tune_socket

log = logging.getLogger("masqued.relay")

# Smallest UDP payload that may open a connection (RFC 9000 §14.1).
MIN_INITIAL_SIZE = 1200
# How often pending connections are checked against their timeouts.
SWEEP_INTERVAL = 1.0


class BatchHandler(TunnelHandler, Protocol):
    """A TunnelHandler that also hears where each UDP batch begins and ends (the relay
    writes what the batch brought to its TUN at once)."""

    def begin_batch(self) -> None: ...
    def end_batch(self) -> None: ...
    def count(self, result: str) -> None: ...


def peer_ip(addr: Address) -> str:
    host = str(addr[0])
    return host[7:] if host.startswith("::ffff:") else host


def short_dcid(data: bytes) -> bytes:
    """Destination CID of a QUIC packet, for routing it to its connection: a short
    header's follows the first byte (our CIDs are 8 bytes), a long header's length
    is byte 5. Anything malformed yields a key that matches nothing."""
    if not data:
        return b""
    if data[0] & 0x80:
        if len(data) < 6:
            return b""
        n = data[5]
        return data[6 : 6 + n]
    return data[1 : 1 + engines.CID_LENGTH]


class QuicEndpoint:
    """Accepts QUIC connections on ``sock`` and hands their tunnels to ``handler``."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        handler: BatchHandler,
        *,
        certificate: str,
        private_key: str,
        limits: EndpointLimits,
        worker: int = 0,
        workers: int = 1,
        balancer: Balancer | None = None,
        client_certificates: Callable[[], bool] = lambda: False,
        engine: str | None = None,
    ) -> None:
        self.loop = loop
        # The QUIC engine's seam module (masqued.transport.engines): relay quic_engine.
        self.engine = engines.load(engine)
        self.handler = handler
        self.limits = limits
        self.worker = worker
        self.workers = workers
        # With workers: sends new clients to the least busy worker (Retry).
        self.balancer = balancer
        # Retry tokens: shared by the workers (balancing), else this process's own.
        self.tokens = balancer.tokens if balancer is not None else RetryTokens(os.urandom(16))
        self.client_certificates = client_certificates
        self.udp = UdpSocket(loop, sock, self._datagrams_received)
        self.links: dict[bytes, H3Link] = {}  # every CID of every connection
        self.ledger = BufferLedger(limits.max_buffered_total)
        self._cids: dict[H3Link, set[bytes]] = {}
        self._dirty: set[H3Link] = set()
        # Connections without an admitted CONNECT yet, oldest first, and per source IP.
        self._pending: dict[H3Link, None] = {}
        self._pending_by_ip: collections.Counter[str] = collections.Counter()
        self._over_limit: set[H3Link] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._ratelog = RateLimitedLog(log)
        self.set_certificate(certificate, private_key)

    def set_certificate(self, certificate: str, private_key: str) -> None:
        """The certificate new connections get (reload)."""
        self._config = self.engine.configuration(
            is_client=False, certificate=certificate, private_key=private_key
        )

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        tune_socket(self.udp.sock)
        self.udp.start()
        self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self._sweep)

    def close(self, reason: str) -> None:
        """Close every connection (H3_NO_ERROR) and stop reading."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for link in list(self._cids):
            link.close(engines.H3_NO_ERROR, reason)
            with contextlib.suppress(Exception):
                link.flush()
            self._drop(link, reason)
        self.udp.close()

    def connections(self) -> list[H3Link]:
        return list(self._cids)

    def load(self) -> int:
        """This worker's clients, those still in their handshake included."""
        return len(self._cids)

    # -- UDP side ------------------------------------------------------------------------

    def _datagrams_received(self, batch: list[tuple[bytes, Address]]) -> None:
        now = monotonic()
        dirty = self._dirty
        links = self.links
        # Each connection's datagrams of the batch, in order, handed to it at once.
        inputs: dict[H3Link, list[tuple[bytes, Address]]] = {}
        for data, addr in batch:
            link = links.get(short_dcid(data))
            if link is None:
                link = self._new_connection(data, addr)
                if link is None:
                    continue
                # A new connection starts on its first datagram (the CIDs that the
                # next ones carry are known once it has taken it).
                try:
                    link.receive(data, addr, now)
                except Exception as exc:
                    self.failed(link, exc)
                    continue
                dirty.add(link)
                continue
            got = inputs.get(link)
            if got is None:
                inputs[link] = [(data, addr)]
            else:
                got.append((data, addr))
        for link, got in inputs.items():
            if link.closed:
                continue
            try:
                link.receive_batch(got, now)
            except Exception as exc:
                self.failed(link, exc)
                continue
            dirty.add(link)
        self.handler.begin_batch()
        try:
            # A copy: handling one connection may touch another (a client replacing
            # its old session marks the old connection dirty).
            for link in list(dirty):
                if link.closed:
                    continue
                try:
                    link.process()
                    self._check_close(link)
                except Exception as exc:
                    self.failed(link, exc)
        finally:
            self.handler.end_batch()
        self.flush()

    def flush(self) -> None:
        dirty = self._dirty
        while dirty:
            link = dirty.pop()
            if link.closed:
                continue
            try:
                link.flush()
            except Exception as exc:
                self.failed(link, exc)
                continue
            if link in self._over_limit:
                # Its CONNECTION_CLOSE is out: drop its state now rather than keep
                # what it made us hold through the closing period (RFC 9000 §10.2).
                self._drop(link, "closed for exceeding a limit")

    def _check_close(self, link: H3Link) -> None:
        """A limit the engine enforced itself (flow control, streams, handshake size)
        closed the connection: count and log it once."""
        code = link.local_close_code()
        if code in engines.LIMIT_ERRORS:
            self.limit_exceeded(link, f"{engines.LIMIT_ERRORS[code]} (code {code:#x})")

    def failed(self, link: H3Link, exc: BaseException) -> None:
        """A bug met by one connection's input: it ends there (H3_INTERNAL_ERROR),
        logged once per kind, and the other connections of the batch go on."""
        self.handler.count("internal_error")
        log_failure(self._ratelog, link.peer, exc)
        with contextlib.suppress(Exception):
            link.close(engines.H3_INTERNAL_ERROR, "internal error")
            link.flush()
        try:
            self._drop(link, "internal error")
        except Exception:  # its tunnels' state is suspect too: at least forget it
            self._forget(link)

    def limit_exceeded(self, link: H3Link, reason: str) -> None:
        """A peer went past a receive limit (its connection is closing): count, log once."""
        if link in self._over_limit:
            return
        self._over_limit.add(link)
        self.handler.count("limit_exceeded")
        self._ratelog.warning(
            f"limit:{peer_ip(link.peer_addr)}", "%s: closing the connection: %s", link.peer, reason
        )

    def _held(self, link: H3Link, held: int) -> None:
        exceeded = link.exceeded()
        if exceeded is not None:
            self.limit_exceeded(link, exceeded)
        elif not self.ledger.update(id(link), held):
            link.quic.exceeded = f"{held} bytes held while the relay's total is over its limit"
            link.close(engines.H3_EXCESSIVE_LOAD, "excessive load")
            self.limit_exceeded(link, link.quic.exceeded)

    def _drop(self, link: H3Link, reason: str) -> None:
        if not link.closed:
            link.closed = True
            link.cancel_timer()
            self.handler.link_closed(link, 0, reason)
        self._forget(link)

    def _closed(self, link: H3Link) -> None:
        """The engine ended the connection (after the closing period, or a timeout)."""
        self._forget(link)

    # -- new connections ---------------------------------------------------------------

    def _new_connection(self, data: bytes, addr: Address) -> H3Link | None:
        header = self.engine.parse_long_header(data)
        if header is None:
            return None
        versions = self.engine.supported_versions(self._config)
        if (
            not header.version_negotiation
            and header.version is not None
            and (header.version not in versions)
        ):
            self.udp.send([(self.engine.version_negotiation(header, versions), addr)])
            return None
        # Known by another of its CIDs (long headers carry the original one).
        link = self.links.get(header.destination_cid)
        if link is not None:
            return link
        if not header.is_initial or len(data) < MIN_INITIAL_SIZE:
            return None
        limits = self.limits
        ip = peer_ip(addr)
        if len(self._pending) >= limits.max_pending or (
            self._pending_by_ip[ip] >= limits.max_pending_per_address
        ):
            self.handler.count("initial_dropped")
            self._ratelog.warning(
                "pending_full",
                "%s: new connection dropped: %d connections wait for a handshake or a "
                "CONNECT (%d from this address)",
                format_addr(addr),
                len(self._pending),
                self._pending_by_ip[ip],
            )
            return None
        odcid, retry_scid = header.destination_cid, None
        if header.token:
            # The second Initial of a client we (or another worker) sent a Retry.
            try:
                odcid, retry_scid = self.tokens.open(
                    format_addr(addr), header.token, header.destination_cid
                )
            except InvalidToken as exc:
                self.handler.count("retry_invalid")
                self._ratelog.info(
                    f"token:{ip}",
                    "%s: Initial with an unusable Retry token (%s): dropped",
                    format_addr(addr),
                    exc,
                )
                return None
        else:
            target = self.balancer.target(self.load()) if self.balancer is not None else None
            if target is not None:
                self.handler.count("redirected")
                self._send_retry(header, addr, target)
                return None
            if len(self._pending) >= limits.retry_threshold:
                # Many handshakes at once (perhaps from spoofed sources): the client
                # proves its address with a Retry before we spend a handshake on it.
                self.handler.count("address_validation")
                self._send_retry(header, addr, self.worker)
                return None
        quic = self.engine.server_connection(
            self._config,
            original_dcid=odcid,
            retry_scid=retry_scid,
            receive_limits=limits.receive,
            worker=self.worker if self.workers > 1 else None,
            client_certificate=self.client_certificates(),
        )
        link = H3Link(self.loop, quic, self.udp.send, _Closing(self), addr, self.engine)
        link.on_cid = lambda cid, issued, link=link: self._cid(link, cid, issued)
        link.on_held = self._held
        link.on_error = self.failed
        link.on_touch = self._dirty.add
        link.on_admitted = self._unpend
        self._cids[link] = set()
        self._cid(link, header.destination_cid, True)
        self._cid(link, quic.host_cid, True)
        self._pending[link] = None
        self._pending_by_ip[ip] += 1
        return link

    def _send_retry(self, header: engines.LongHeader, addr: Address, target: int) -> None:
        """Send the client to worker ``target`` (this one, to validate its address): a
        Retry with a connection ID that the steering program maps there, and a token
        that worker accepts."""
        scid = retry_cid(target)
        token = self.tokens.seal(format_addr(addr), header.destination_cid, scid)
        self.udp.send([(self.engine.retry(header, scid, token), addr)])

    # -- the CID registry and the pending set ----------------------------------------------

    def _cid(self, link: H3Link, cid: bytes, issued: bool) -> None:
        cids = self._cids.get(link)
        if cids is None:
            return
        if issued:
            self.links[cid] = link
            cids.add(cid)
        elif self.links.get(cid) is link:
            del self.links[cid]
            cids.discard(cid)

    def _forget(self, link: H3Link) -> None:
        for cid in self._cids.pop(link, ()):
            if self.links.get(cid) is link:
                del self.links[cid]
        self._dirty.discard(link)
        self._over_limit.discard(link)
        self._unpend(link)
        self.ledger.forget(id(link))

    def _unpend(self, link: H3Link) -> None:
        if link in self._pending:
            del self._pending[link]
            ip = peer_ip(link.peer_addr)
            self._pending_by_ip[ip] -= 1
            if self._pending_by_ip[ip] <= 0:
                del self._pending_by_ip[ip]

    def pending(self) -> int:
        return len(self._pending)

    def _sweep(self) -> None:
        """Every SWEEP_INTERVAL: end connections that waited too long for their
        handshake (dropped silently: the source may be spoofed) or for an admitted
        CONNECT (closed)."""
        self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self._sweep)
        now = monotonic()
        limits = self.limits
        expired: list[H3Link] = []
        for link in self._pending:  # oldest first
            age = now - link.created
            if age < min(limits.handshake_timeout, limits.admission_timeout):
                break
            if (not link.handshake_done and age >= limits.handshake_timeout) or (
                link.handshake_done and age >= limits.admission_timeout
            ):
                expired.append(link)
        for link in expired:
            try:
                if link.handshake_done:
                    self.handler.count("admission_timeout")
                    link.close(engines.H3_NO_ERROR, "no CONNECT-IP tunnel requested")
                    link.flush()
                else:
                    self.handler.count("handshake_timeout")
                self._drop(link, "no tunnel admitted in time")
            except Exception as exc:
                self.failed(link, exc)


class _Closing:
    """The handler a link reports to: the relay's, plus the endpoint's own bookkeeping
    when the engine ends a connection."""

    def __init__(self, endpoint: QuicEndpoint) -> None:
        self._endpoint = endpoint
        handler = endpoint.handler
        self.link_headers = handler.link_headers
        self.link_data = handler.link_data
        self.link_datagram = handler.link_datagram
        self.link_reset = handler.link_reset

    def link_closed(self, link: Link, code: int, reason: str) -> None:
        assert isinstance(link, H3Link)
        endpoint = self._endpoint
        if code in engines.LIMIT_ERRORS:
            endpoint.limit_exceeded(link, f"{engines.LIMIT_ERRORS[code]} ({reason})")
        endpoint.handler.link_closed(link, code, reason)
        endpoint._closed(link)
