"""The QUIC engines behind the seam: their names, what they share, and loading one.

masqued speaks QUIC + HTTP/3 through one seam module per library
(masqued.transport.aioquic_engine, masqued.transport.qh3_engine); each provides the
same names (configuration, server_connection, client_connection, TunnelH3, pump,
the state readers ...). This module holds what does not depend on the library — the
wire constants, the header of a packet the endpoint answers itself, the event sink —
and ``load``, which imports an engine only when a config asks for it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Protocol, cast

NAMES = ("aioquic", "qh3")
# The engine of a config that names none. Tests set it (MASQUED_QUIC_ENGINE, in
# tests/conftest.py) to run the in-process suites with another engine.
DEFAULT = "aioquic"

# QUIC tuning shared by both roles and both engines. Our packets are at most MTU
# (1300 by default) plus QUIC/H3 overhead; 1452 fits a 1500-byte path with IPv6+UDP
# headers and lets a whole 1300-byte packet ride in one QUIC packet.
IDLE_TIMEOUT = 30.0
MAX_DATAGRAM_SIZE = 1452
# Our max_datagram_frame_size transport parameter (RFC 9221 §3): generous, the QUIC
# packet size is the real limit.
MAX_DATAGRAM_FRAME_SIZE = 65535
CID_LENGTH = 8  # both engines' connection_id_length; short headers carry it

# HTTP/3 error codes (RFC 9114 §8.1).
H3_EXCESSIVE_LOAD = 0x107
H3_NO_ERROR = 0x100
H3_INTERNAL_ERROR = 0x102
H3_REQUEST_REJECTED = 0x10B
H3_REQUEST_CANCELLED = 0x10C
H3_MESSAGE_ERROR = 0x10E
# QUIC transport error codes (RFC 9000 §20.1) of the limits the engines enforce.
FLOW_CONTROL_ERROR = 0x3
STREAM_LIMIT_ERROR = 0x4
CRYPTO_BUFFER_EXCEEDED = 0xD
# Error codes of the closes a guarded connection makes (or its library makes on its
# behalf), with what each means for the log.
LIMIT_ERRORS: dict[int, str] = {
    FLOW_CONTROL_ERROR: "sent past its flow-control credit",
    STREAM_LIMIT_ERROR: "opened more streams than allowed",
    CRYPTO_BUFFER_EXCEEDED: "sent a handshake message too large",
    H3_EXCESSIVE_LOAD: "left too much in incomplete messages",
}

# Worst-case bytes around a DATAGRAM frame's data in a 1-RTT packet: first byte,
# packet number (≤ 4), AEAD tag (16), frame type (1) and length varint (2 while the
# frame is below 16384 bytes). The peer's connection ID length is added per call.
PACKET_OVERHEAD = 1 + 4 + 16
FRAME_OVERHEAD = 1 + 2
# What one datagram adds to the bytes in flight besides its payload, at most.
DATAGRAM_COST = PACKET_OVERHEAD + FRAME_OVERHEAD + 20


def varint_size(value: int) -> int:
    return 1 if value < 0x40 else 2 if value < 0x4000 else 4 if value < 0x4000_0000 else 8


def datagram_payload_room(
    max_datagram_size: int, peer_cid_length: int, remote_frame_size: int | None, stream_id: int
) -> int:
    """Largest HTTP Datagram payload (Context ID + data) of ``stream_id`` that fits one
    QUIC packet and the peer's max_datagram_frame_size; 0 if it takes none."""
    if remote_frame_size is None:
        return 0
    frame_data = max_datagram_size - PACKET_OVERHEAD - peer_cid_length - FRAME_OVERHEAD
    # RFC 9221 §3: the limit covers the whole frame (type, length, data); staying one
    # byte further below it also satisfies receivers that compare with ">=".
    frame_data = min(frame_data, remote_frame_size - FRAME_OVERHEAD - 1)
    return max(0, frame_data - varint_size(stream_id // 4))


@dataclass(frozen=True)
class LongHeader:
    """What the endpoint needs of a long-header packet that matched no connection."""

    is_initial: bool
    version_negotiation: bool
    version: int | None
    destination_cid: bytes
    source_cid: bytes
    token: bytes


class EventSink(Protocol):
    """What an engine's ``pump`` calls for each event of a connection
    (masqued.transport.h3link)."""

    def handshake_completed(self) -> None: ...
    def cid_issued(self, cid: bytes) -> None: ...
    def cid_retired(self, cid: bytes) -> None: ...
    def terminated(self, code: int, reason: str) -> None: ...
    def stream_reset(self, stream_id: int, code: int) -> None: ...
    def headers_received(
        self, stream_id: int, headers: list[tuple[bytes, bytes]], ended: bool
    ) -> None: ...
    def data_received(self, stream_id: int, data: bytes, ended: bool) -> None: ...
    def datagram_received(self, stream_id: int, data: bytes) -> None: ...

    @property
    def stopped(self) -> bool: ...


class Connection(Protocol):
    """What masqued calls on an engine's GuardedConnection (both engines' QUIC
    connection API, plus the limits masqued adds)."""

    host_cid: bytes
    exceeded: str | None

    def connect(self, addr: Any, now: float) -> None: ...
    def receive_datagram(self, data: bytes, addr: Any, now: float) -> None: ...
    def receive_datagrams(self, batch: list[tuple[bytes, Any]], now: float) -> None: ...
    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]: ...
    def get_timer(self) -> float | None: ...
    def handle_timer(self, now: float) -> None: ...
    def reset_stream(self, stream_id: int, error_code: int) -> None: ...
    def stop_stream(self, stream_id: int, error_code: int) -> None: ...
    def close(
        self, error_code: int = ..., frame_type: int | None = ..., reason_phrase: str = ...
    ) -> None: ...
    def get_next_available_stream_id(self, is_unidirectional: bool = ...) -> int: ...
    def send_ping(self, uid: int) -> None: ...
    def settle(self, held: dict[int, int]) -> int: ...
    def open_tunnel(self, stream_id: int) -> None: ...
    def local_close_code(self) -> int | None: ...


class Engine(Protocol):
    """A seam module (aioquic_engine, qh3_engine): the names masqued uses. ``h3`` is
    the engine's TunnelH3, ``quic`` its GuardedConnection."""

    NAME: str
    CID_LENGTH: int

    def configuration(
        self,
        *,
        is_client: bool,
        server_name: str | None = ...,
        certificate: str | None = ...,
        private_key: str | None = ...,
        cafile: str | None = ...,
        verify: bool = ...,
    ) -> Any: ...
    def server_connection(
        self,
        config: Any,
        *,
        original_dcid: bytes,
        retry_scid: bytes | None,
        receive_limits: Any,
        worker: int | None,
        client_certificate: bool,
    ) -> Connection: ...
    def client_connection(self, config: Any) -> Connection: ...
    def TunnelH3(self, quic: Any) -> Any: ...  # a class
    def parse_long_header(self, data: bytes) -> LongHeader | None: ...
    def supported_versions(self, config: Any) -> list[int]: ...
    def version_negotiation(self, header: LongHeader, versions: list[int]) -> bytes: ...
    def retry(self, header: LongHeader, scid: bytes, token: bytes) -> bytes: ...
    def pump(self, quic: Any, h3: Any, sink: EventSink) -> None: ...
    def h3_held(self, h3: Any) -> dict[int, int]: ...
    def peer_settings(self, h3: Any) -> tuple[bool, bool] | None: ...
    def peer_accepts_datagrams(self, h3: Any, quic: Any) -> bool: ...
    def datagram_room(self, quic: Any, stream_id: int) -> int: ...
    def datagrams_queued(self, quic: Any) -> tuple[int, int]: ...
    def stream_acked(self, quic: Any, stream_id: int) -> int | None: ...
    def stream_backlog(self, quic: Any, stream_id: int) -> int: ...
    def min_rtt(self, quic: Any) -> float: ...
    def rtt_ms(self, quic: Any) -> float | None: ...
    def congestion_window(self, quic: Any) -> int: ...
    def bytes_in_flight(self, quic: Any) -> int: ...
    def delivered_bytes(self, quic: Any) -> int | None: ...
    def peer_certificate(self, quic: Any) -> tuple[Any, list[Any]]: ...


def load(name: str | None = None) -> Engine:
    """The seam module of engine ``name`` (None: DEFAULT), imported on first use; an
    engine whose library is missing or of another release line raises ImportError."""
    name = name or DEFAULT
    if name not in NAMES:
        raise ValueError(f"unknown QUIC engine {name!r} (known: {', '.join(NAMES)})")
    return cast(Engine, importlib.import_module(f"masqued.transport.{name}_engine"))


def available(name: str) -> str | None:
    """Why engine ``name`` cannot be used here, or None if it can."""
    try:
        load(name)
    except (ImportError, ValueError) as exc:
        return str(exc)
    return None
