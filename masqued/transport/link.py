"""The one interface between CONNECT-IP tunnels and an HTTP connection that carries them.

A *link* is one HTTP connection (HTTP/3 over QUIC today) seen as what an extended
CONNECT tunnel needs: request streams carrying headers and bytes, HTTP Datagrams
bound to a stream, and the state a data plane bounds its queues by. The relay and the
client serve tunnels through this interface only; each HTTP version is an adapter
that implements it (masqued.transport.h3link).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from masqued.logutil import RateLimitedLog

Headers = list[tuple[bytes, bytes]]


def format_addr(addr: Any) -> str:
    """A peer's (host, port) as logs show it: ``1.2.3.4:5``, ``[2001:db8::1]:5``; an
    IPv4-mapped address as plain IPv4."""
    host, port = str(addr[0]), addr[1]
    if host.startswith("::ffff:"):
        host = host[7:]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def log_failure(ratelog: RateLimitedLog, peer: str, exc: BaseException) -> None:
    """A bug met by one connection's input (which then ends there, alone): logged with
    its traceback once per kind of failure."""
    kind = f"{type(exc).__name__}:{exc}"[:120]
    ratelog.log(
        logging.ERROR,
        f"internal:{kind}",
        "%s: internal error while handling this connection: closing it",
        peer,
        exc_info=(type(exc), exc, exc.__traceback__),
    )


class TunnelHandler(Protocol):
    """What a link reports to whoever serves its tunnels (the relay or the client)."""

    def link_headers(self, link: Link, stream_id: int, headers: Headers, ended: bool) -> None:
        """Headers on a request stream (a request at the relay, a response at the client)."""

    def link_data(self, link: Link, stream_id: int, data: bytes, ended: bool) -> None:
        """Bytes of a request stream, in order; ``ended``: the peer finished it."""

    def link_datagram(self, link: Link, stream_id: int, payload: bytes) -> None:
        """An HTTP Datagram (RFC 9297) for the request stream ``stream_id``."""

    def link_reset(self, link: Link, stream_id: int, code: int) -> None:
        """The peer reset a request stream."""

    def link_closed(self, link: Link, code: int, reason: str) -> None:
        """The connection is over (closed by either side, or timed out)."""


class NullHandler:
    """A TunnelHandler that ignores everything (a link before its owner is ready, or
    one that carries no tunnel); subclasses override what they need."""

    def link_headers(self, link: Link, stream_id: int, headers: Headers, ended: bool) -> None:
        pass

    def link_data(self, link: Link, stream_id: int, data: bytes, ended: bool) -> None:
        pass

    def link_datagram(self, link: Link, stream_id: int, payload: bytes) -> None:
        pass

    def link_reset(self, link: Link, stream_id: int, code: int) -> None:
        pass

    def link_closed(self, link: Link, code: int, reason: str) -> None:
        pass


class Link(Protocol):
    """One HTTP connection carrying CONNECT-IP tunnels."""

    http_version: str  # "h3"
    peer: str  # the peer's address, for logs and status
    peer_addr: Any  # the peer's socket address
    closed: bool
    created: float  # monotonic time it was made (handshake latency)

    def send_headers(self, stream_id: int, headers: Headers, end: bool = False) -> None: ...
    def send_data(self, stream_id: int, data: bytes, end: bool = False) -> None: ...
    def abort(self, stream_id: int, code: int) -> None:
        """Abort a request stream in both directions (RFC 9114 §4.1.2)."""

    def close(self, code: int, reason: str) -> None: ...
    def admitted(self) -> None:
        """A tunnel was admitted on this connection (it leaves the pending set)."""

    def fail(self, exc: BaseException) -> None:
        """A bug met while serving this connection: its owner ends it, alone."""

    def accepts_datagrams(self) -> bool:
        """The peer takes HTTP Datagrams (SETTINGS and transport parameters)."""

    def open_tunnel(self, stream_id: int) -> None:
        """``stream_id`` carries an admitted tunnel: give it a tunnel's receive window."""

    def datagram_room(self, stream_id: int) -> int:
        """Largest HTTP Datagram payload the peer takes now; 0 if it takes none."""

    def send_datagram(self, stream_id: int, payload: bytes) -> None: ...
    def datagrams_queued(self) -> tuple[int, int]:
        """(datagrams, bytes) waiting to be sent."""

    def stream_acked(self, stream_id: int) -> int | None:
        """Bytes of the stream the peer has acknowledged (None: no such stream)."""

    def stream_backlog(self, stream_id: int) -> int:
        """Bytes queued on the stream and not yet acknowledged."""

    def delivered(self) -> int | None:
        """Bytes the peer has acknowledged on the whole connection."""

    def in_flight(self) -> int:
        """Bytes sent and not yet acknowledged or declared lost."""

    def min_rtt(self) -> float: ...
    def stats(self) -> dict[str, Any]:
        """``rtt_ms``, ``cwnd`` and ``bytes_in_flight`` for status (None when unknown)."""

    def peer_certificate(self) -> tuple[Any, list[Any]]:
        """The certificate (and chain) the peer presented, if any."""

    def flush(self) -> None:
        """Send what is queued."""
