"""What a peer can make us hold before and after its CONNECT is admitted.

Engine-neutral policy: the receive windows and stream counts a connection starts with,
what an admitted tunnel stream gets, the bytes a peer may leave buffered (out of order
or in a half-parsed HTTP/3 or TLS message), and how many connections may wait for a
handshake or an admitted CONNECT. The engine seams (masqued.transport.aioquic_engine,
qh3_engine) apply it to the QUIC library; the relay's endpoints (QUIC and TCP) count
and enforce the connection caps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

KIB = 1024
MIB = 1024 * KIB


@dataclass(frozen=True)
class ReceiveLimits:
    """Receive-side bounds of one connection.

    Credit is always what our side has consumed plus a window: a peer that sends at
    the far end of its window (leaving a gap) gains nothing until the gap is filled
    and read, so bytes held for a connection never exceed its connection window plus
    ``max_held``.
    """

    # Every stream the peer opens, and the connection, until a tunnel is admitted:
    # room for SETTINGS, QPACK instructions and a CONNECT request with its token.
    stream_window: int = 16 * KIB
    connection_window: int = 64 * KIB
    # An admitted tunnel stream (a bulk transfer in stream mode) and the connection
    # that carries it.
    tunnel_window: int = 8 * MIB
    tunnel_connection_window: int = 16 * MIB
    # Streams the peer may have open at once: request streams (each admitted CONNECT
    # is one; a refused one frees its slot) and unidirectional ones (HTTP/3 control
    # and the two QPACK streams, with room for a few the peer may add).
    bidi_streams: int = 4
    uni_streams: int = 6
    # qh3 (masqued.transport.qh3_engine) builds a connection's windows into its core
    # once: a relay connection has this one window (connection, each stream, and
    # out-of-order bytes per stream) before and after its CONNECT. It bounds what a
    # peer that never gets a tunnel can make the core hold, and an admitted tunnel's
    # stream-mode upload to this much in flight (8 Mbit/s per ms of RTT).
    qh3_window: int = 1 * MIB
    # qh3: bytes a peer may send before its handshake completes (a ClientHello flight
    # of two datagrams and four retransmissions of it, the client's Finished). qh3's
    # core keeps out-of-order CRYPTO data at ~24 bytes of memory per byte (1 MB of
    # Initials made the relay grow by 20 MiB; 16 KiB cost ~400 KiB per pending
    # connection, aioquic's bound ~50 KiB); aioquic bounds those bytes itself.
    qh3_handshake_bytes: int = 16 * KIB
    # Bytes an upper layer keeps for a connection while a message is incomplete
    # (HTTP/3 frame reassembly, TLS handshake messages); more closes the connection.
    max_held: int = 64 * KIB


@dataclass(frozen=True)
class EndpointLimits:
    """Relay-wide bounds on connections that have not (yet) earned a tunnel."""

    # A connection whose handshake has not completed after this long is dropped
    # without a word (its source may be spoofed), and one with a handshake but no
    # admitted CONNECT is closed.
    handshake_timeout: float = 10.0
    admission_timeout: float = 10.0
    # Above this many pending connections (no tunnel admitted yet), a new client's
    # first Initial is answered with a Retry: its address must be proven before we
    # spend a handshake on it (RFC 9000 §8.1).
    retry_threshold: int = 64
    # Pending connections in all, and from one source address; past them, new
    # Initials are dropped.
    max_pending: int = 256
    max_pending_per_address: int = 32
    # Bytes all connections together may leave buffered; the connection that pushes
    # the total past it is closed.
    max_buffered_total: int = 256 * MIB
    receive: ReceiveLimits = field(default_factory=ReceiveLimits)
    # TCP (HTTP/2): connections one address may hold open at once, pending or not
    # (the pending ones also count against max_pending_per_address); CONNECT
    # requests one connection may make in its life (a refused or reset one included:
    # no rapid-reset loops); seconds without a byte from the peer before it is closed
    # (the client pings every keepalive); bytes an admitted connection may leave
    # unsent because its peer does not read (the data plane bounds tunnel data far
    # below this; PING and SETTINGS acknowledgements do not count against it).
    max_tcp_per_address: int = 64
    max_requests_per_connection: int = 16
    tcp_idle_timeout: float = 30.0
    max_unsent: int = 16 * MIB


DEFAULT_ENDPOINT_LIMITS = EndpointLimits()


class BufferLedger:
    """Bytes held for each connection, and their sum, updated once per flush."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0
        self._held: dict[int, int] = {}

    def update(self, key: int, held: int) -> bool:
        """Record ``held`` bytes for connection ``key``; False if the total is over."""
        self.total += held - self._held.get(key, 0)
        self._held[key] = held
        return self.total <= self.limit

    def forget(self, key: int) -> None:
        self.total -= self._held.pop(key, 0)
