"""The relay's TCP endpoint: TLS over TCP, one HTTP/2 link per connection.

Beside the QUIC endpoint and feeding the same handler (the relay): accepts
connections on its listening sockets (SO_REUSEPORT, shared by the workers), refuses
them past the per-address and pending limits, runs TLS (ALPN h2) and HTTP/2, ends
connections whose TLS handshake or CONNECT never comes or that fall silent, and
keeps a peer's misbehaviour (HTTP/2 protocol errors, too many requests, output it
does not read) and our own bugs inside its connection. Everything is counted in the
relay's results and logged once per address and kind.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import functools
import logging
import socket
import ssl
import time
from typing import Protocol

from masqued.logutil import RateLimitedLog
from masqued.proto.errors import H3_EXCESSIVE_LOAD, H3_INTERNAL_ERROR, H3_NO_ERROR
from masqued.transport.h2link import ALPN, H2Link
from masqued.transport.limits import BufferLedger, EndpointLimits
from masqued.transport.link import Headers, Link, TunnelHandler, log_failure
from masqued.transport.tcp import TlsPipe, server_context, tune_tcp

log = logging.getLogger("masqued.relay")

ACCEPT_BATCH = 64  # connections accepted per wake-up of one listening socket
SWEEP_INTERVAL = 1.0
LISTEN_BACKLOG = 512


class TcpHandler(TunnelHandler, Protocol):
    """The relay, as the TCP endpoint sees it."""

    def begin_batch(self) -> None: ...
    def end_batch(self) -> None: ...
    def count(self, result: str) -> None: ...
    def tls_refused(self, link: H2Link, reason: str) -> None:
        """The TLS layer refused the client's certificate (an authentication failure)."""


def listen_tcp(host: str, port: int, count: int = 1) -> list[socket.socket]:
    """``count`` listening TCP sockets on one address (SO_REUSEPORT: the kernel spreads
    new connections over them, one per worker)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if count > 1:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6 and host == "::":
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((host, port))
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


def _peer_ip(addr: tuple[str, int] | tuple[str, int, int, int]) -> str:
    host = str(addr[0])
    return host[7:] if host.startswith("::ffff:") else host


class TcpEndpoint:
    """Accepts TLS/HTTP/2 connections on ``socks`` and hands their tunnels to ``handler``."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        socks: list[socket.socket],
        handler: TcpHandler,
        *,
        certificate: str,
        private_key: str,
        client_ca: str | None,
        limits: EndpointLimits,
    ) -> None:
        self.loop = loop
        self.socks = socks
        self.handler = handler
        self.limits = limits
        self.links: dict[H2Link, str] = {}  # every connection -> its peer's IP
        self._by_ip: collections.Counter[str] = collections.Counter()
        self._pending: dict[H2Link, None] = {}  # no tunnel admitted yet, oldest first
        self._pending_by_ip: collections.Counter[str] = collections.Counter()
        self._requests: collections.Counter[H2Link] = collections.Counter()
        self._dirty: set[H2Link] = set()
        self.ledger = BufferLedger(limits.max_buffered_total)
        self._sweeper: asyncio.TimerHandle | None = None
        self._ratelog = RateLimitedLog(log)
        self._closing = _Closing(self)
        self.context: ssl.SSLContext
        self.set_certificate(certificate, private_key, client_ca)

    def set_certificate(self, certificate: str, private_key: str, client_ca: str | None) -> None:
        """The TLS context new connections get (start, reload)."""
        self.context = server_context(certificate, private_key, client_ca, ALPN)

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        for sock in self.socks:
            sock.setblocking(False)
            self.loop.add_reader(sock.fileno(), self._accept, sock)
        self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self._sweep)

    def close(self, reason: str) -> None:
        """GOAWAY to every connection and stop accepting (the sockets stay open)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for sock in self.socks:
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(sock.fileno())
        for link in list(self.links):
            with contextlib.suppress(Exception):
                link.close(H3_NO_ERROR, reason)
            self._drop(link, reason)

    def connections(self) -> list[H2Link]:
        return list(self.links)

    def pending(self) -> int:
        return len(self._pending)

    # -- accepting -----------------------------------------------------------------------

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # EMFILE/ENFILE/ENOBUFS: out of descriptors or memory; the backlog keeps
                # the rest until we can take them.
                self._ratelog.warning(
                    f"accept:{exc.errno}", "cannot accept TCP connections: %s", exc.strerror
                )
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    return
                continue
            try:
                self._new_connection(conn, addr)
            except Exception as exc:
                conn.close()
                self.handler.count("internal_error")
                self._ratelog.log(
                    logging.ERROR,
                    f"internal:accept:{type(exc).__name__}",
                    "internal error accepting a TCP connection: %s",
                    exc,
                    exc_info=(type(exc), exc, exc.__traceback__),
                )

    def _new_connection(self, conn: socket.socket, addr: tuple[str, int]) -> None:
        ip = _peer_ip(addr)
        limits = self.limits
        why = None
        if self._by_ip[ip] >= limits.max_tcp_per_address:
            why = f"{self._by_ip[ip]} TCP connections from this address"
        elif self._pending_by_ip[ip] >= limits.max_pending_per_address:
            why = f"{self._pending_by_ip[ip]} connections from this address wait for a tunnel"
        elif len(self._pending) >= limits.max_pending:
            why = f"{len(self._pending)} connections wait for a TLS handshake or a CONNECT"
        if why is not None:
            conn.close()
            self.handler.count("tcp_refused")
            self._ratelog.warning(
                f"tcp_refused:{ip}", "%s: TCP connection refused: %s", _show(addr), why
            )
            return
        tune_tcp(conn)
        pipe = TlsPipe(self.loop, conn, self.context, server_side=True)
        link = H2Link(self.loop, pipe, self._closing, addr, client=False)
        link.input = functools.partial(self._input, link)
        link.on_touch = self._dirty.add
        link.on_admitted = self._unpend
        link.on_error = self.failed
        link.on_violation = self._violation
        self.links[link] = ip
        self._by_ip[ip] += 1
        self._pending[link] = None
        self._pending_by_ip[ip] += 1
        link.start()

    # -- input and output ------------------------------------------------------------------

    def _input(self, link: H2Link, data: bytes) -> None:
        """One read's plaintext: a batch for the relay (its TUN writes go out at once)."""
        handler = self.handler
        handler.begin_batch()
        try:
            link.receive(data)
            if not link.closed:
                self._check_held(link)
        finally:
            handler.end_batch()
        self.flush()

    def flush(self) -> None:
        dirty = self._dirty
        while dirty:
            link = dirty.pop()
            if link.closed:
                continue
            try:
                link.flush()
                if link.pipe.unsent > self.limits.max_unsent:
                    self.limit_exceeded(link, f"{link.pipe.unsent} bytes unsent: peer not reading")
            except Exception as exc:
                self.failed(link, exc)

    def _check_held(self, link: H2Link) -> None:
        """What the peer makes us hold: bounded per connection before its tunnel is
        admitted, and for all connections together."""
        held = link.held()
        if link in self._pending and held > self.limits.receive.max_held:
            self.limit_exceeded(link, f"{held} bytes held before a tunnel was admitted")
        elif not self.ledger.update(id(link), held):
            self.limit_exceeded(link, f"{held} bytes held while the relay's total is over")

    def limit_exceeded(self, link: H2Link, reason: str) -> None:
        """A peer went past a limit: ENHANCE_YOUR_CALM, counted, logged once."""
        self.handler.count("limit_exceeded")
        self._ratelog.warning(
            f"limit:{self.links.get(link)}", "%s: closing the connection: %s", link.peer, reason
        )
        with contextlib.suppress(Exception):
            link.close(H3_EXCESSIVE_LOAD, "excessive load")
        self._drop(link, "closed for exceeding a limit")

    def failed(self, link: H2Link, exc: BaseException) -> None:
        """A bug met while serving one connection: it ends there, alone."""
        self.handler.count("internal_error")
        log_failure(self._ratelog, link.peer, exc)
        with contextlib.suppress(Exception):
            link.close(H3_INTERNAL_ERROR, "internal error")
        try:
            self._drop(link, "internal error")
        except Exception:
            self._forget(link)

    def _violation(self, link: H2Link, reason: str) -> None:
        self.handler.count("h2_protocol_error")
        self._ratelog.warning(
            f"h2:{self.links.get(link)}:{reason[:30]}",
            "%s: closing the connection: %s",
            link.peer,
            reason,
        )

    def _request(self, link: H2Link) -> bool:
        """Count a CONNECT on ``link``; False (and the connection closed) past the limit."""
        self._requests[link] += 1
        if self._requests[link] <= self.limits.max_requests_per_connection:
            return True
        self.limit_exceeded(
            link, f"more than {self.limits.max_requests_per_connection} requests on one connection"
        )
        return False

    # -- bookkeeping -------------------------------------------------------------------------

    def _drop(self, link: H2Link, reason: str) -> None:
        if not link.closed:
            link.closed = True
            self.handler.link_closed(link, 0, reason)
        self._forget(link)

    def _forget(self, link: H2Link) -> None:
        ip = self.links.pop(link, None)
        if ip is not None:
            self._by_ip[ip] -= 1
            if self._by_ip[ip] <= 0:
                del self._by_ip[ip]
        self._unpend(link)
        self._dirty.discard(link)
        self._requests.pop(link, None)
        self.ledger.forget(id(link))

    def _unpend(self, link: H2Link) -> None:
        if link in self._pending:
            del self._pending[link]
            ip = _peer_ip(link.peer_addr)
            self._pending_by_ip[ip] -= 1
            if self._pending_by_ip[ip] <= 0:
                del self._pending_by_ip[ip]

    def _closed(self, link: H2Link, code: int, reason: str) -> None:
        """The link ended by itself (peer closed, TLS or HTTP/2 error, GOAWAY)."""
        if not link.handshake_done:
            if "certificate verify failed" in reason:
                self.handler.tls_refused(link, reason)
            else:
                self.handler.count("tls_failed")
                self._ratelog.info(f"tls:{self.links.get(link)}", "%s: %s", link.peer, reason)
        self._forget(link)

    def _sweep(self) -> None:
        """Every SWEEP_INTERVAL: end connections whose TLS handshake or admitted CONNECT
        did not come in time, and admitted ones silent for longer than the idle time
        (a client pings every keepalive)."""
        self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self._sweep)
        now = time.monotonic()
        limits = self.limits
        expired: list[tuple[H2Link, str, str]] = []
        for link in self._pending:  # oldest first
            age = now - link.created
            if age < min(limits.handshake_timeout, limits.admission_timeout):
                break
            if not link.handshake_done and age >= limits.handshake_timeout:
                expired.append((link, "tls_handshake_timeout", "no TLS handshake in time"))
            elif link.handshake_done and age >= limits.admission_timeout:
                expired.append((link, "admission_timeout", "no CONNECT-IP tunnel requested"))
        for link in self.links:
            if link not in self._pending and now - link.last_rx >= limits.tcp_idle_timeout:
                expired.append((link, "idle_timeout", "idle: nothing received"))
        for link, result, reason in expired:
            try:
                self.handler.count(result)
                self._ratelog.info(
                    f"{result}:{self.links.get(link)}", "%s: closing: %s", link.peer, reason
                )
                link.close(H3_NO_ERROR, reason)
                self._drop(link, reason)
            except Exception as exc:
                self.failed(link, exc)


class _Closing:
    """The handler each link reports to: the relay's, with the endpoint's own
    bookkeeping (request counts, links that end by themselves)."""

    def __init__(self, endpoint: TcpEndpoint) -> None:
        self._endpoint = endpoint
        handler = endpoint.handler
        self.link_data = handler.link_data
        self.link_datagram = handler.link_datagram
        self.link_reset = handler.link_reset

    def link_headers(self, link: Link, stream_id: int, headers: Headers, ended: bool) -> None:
        assert isinstance(link, H2Link)
        if self._endpoint._request(link):
            self._endpoint.handler.link_headers(link, stream_id, headers, ended)

    def link_closed(self, link: Link, code: int, reason: str) -> None:
        assert isinstance(link, H2Link)
        endpoint = self._endpoint
        endpoint.handler.link_closed(link, code, reason)
        endpoint._closed(link, code, reason)


def _show(addr: tuple[str, int]) -> str:
    host = _peer_ip(addr)
    return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
