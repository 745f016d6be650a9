"""The seam to qh3: the only module that imports it or touches its internals.

The same names as masqued.transport.aioquic_engine, on qh3 2.x: a Python facade
(QuicConnection, H3Connection, TLS) over a compiled core (``QuicConnectionCore``:
packets, recovery, pacing, flow control, stream reassembly). What masqued sets or
reads inside aioquic's Python objects lives in that core here, so:

- receive windows, stream counts and the out-of-order buffer per stream are given
  to the core once, when it is built (``GuardedConnection._create_core``), and hold
  for the connection's life: the core grants credit itself as the application reads
  (it hands every in-order byte up at once), so a window bounds bytes in flight and
  out of order, not what the layers above keep. Those layers are bounded here as
  with aioquic (``settle``: incomplete HTTP/3 frames and TLS messages past
  ``max_held`` close the connection, H3_EXCESSIVE_LOAD; a handshake message that
  would make TLS hold more, CRYPTO_BUFFER_EXCEEDED). A relay connection cannot be
  given the tunnel's larger windows once its CONNECT is admitted: it keeps
  ``ReceiveLimits.qh3_window`` from the start (see limits.py);
- the pacer and congestion control are the core's (no BurstPacer, no delivery
  count: ``delivered_bytes`` is estimated from what was sent and what is in flight);
- only the first connection ID can be marked for worker steering (the core draws
  the later ones itself);
- the server side of qh3's TLS never asks for a client certificate: no mTLS over
  HTTP/3 (config.py refuses ``auth = mtls`` with a qh3 relay);
- the datagram queue is the core's and not visible: ``datagrams_queued`` counts what
  was queued since the last flush.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterator
from typing import Any

import qh3
from cryptography import x509
from qh3._hazmat import Buffer, QuicConnectionCore
from qh3._hazmat import pull_quic_header as pull_header_raw
from qh3.h3.connection import H3_ALPN, H3Connection, Setting
from qh3.h3.events import DatagramReceived, DataReceived, HeadersReceived
from qh3.quic.configuration import QuicConfiguration
from qh3.quic.connection import QuicConnection, QuicConnectionError
from qh3.quic.events import (
    ConnectionIdIssued,
    ConnectionIdRetired,
    ConnectionTerminated,
    HandshakeCompleted,
    QuicEvent,
    StreamDataReceived,
    StreamReset,
)
from qh3.quic.packet import (
    QuicErrorCode,
    QuicPacketType,
    encode_quic_retry,
    encode_quic_version_negotiation,
    pull_quic_header,
    pull_quic_transport_parameters,
    push_quic_transport_parameters,
)
from qh3.quic.tls_bridge import QuicTlsBridge, QuicTlsBridgeError
from qh3.tls import ExtensionType

from masqued.transport.engines import (
    CID_LENGTH,
    CRYPTO_BUFFER_EXCEEDED,
    DATAGRAM_COST,
    H3_EXCESSIVE_LOAD,
    H3_INTERNAL_ERROR,
    H3_MESSAGE_ERROR,
    H3_NO_ERROR,
    H3_REQUEST_CANCELLED,
    H3_REQUEST_REJECTED,
    IDLE_TIMEOUT,
    LIMIT_ERRORS,
    MAX_DATAGRAM_FRAME_SIZE,
    MAX_DATAGRAM_SIZE,
    EventSink,
    LongHeader,
    datagram_payload_room,
)
from masqued.transport.limits import ReceiveLimits

__all__ = [
    "CID_LENGTH",
    "DATAGRAM_COST",
    "H3_EXCESSIVE_LOAD",
    "H3_INTERNAL_ERROR",
    "H3_MESSAGE_ERROR",
    "H3_NO_ERROR",
    "H3_REQUEST_CANCELLED",
    "H3_REQUEST_REJECTED",
    "LIMIT_ERRORS",
    "EventSink",
    "GuardedConnection",
    "LongHeader",
    "TunnelH3",
]

NAME = "qh3"
# The release line this seam was written against: it builds the core itself with the
# facade's private _create_core signature. Another line may change it; refuse.
TESTED = "2.1."
if not qh3.__version__.startswith(TESTED):
    raise ImportError(f"masqued's qh3 seam was written for qh3 {TESTED}x, found {qh3.__version__}")

# The longest connection ID a peer may use (RFC 9000 §17.2): the core does not say
# which length the peer chose, so datagram room assumes the worst.
PEER_CID_MAX = 20
# The core's own initial RTT before a sample (RFC 9002 §6.2.2 suggests 333 ms;
# aioquic uses 100 ms): the handshake's first PTO.
INITIAL_RTT = 0.1


def configuration(
    *,
    is_client: bool,
    server_name: str | None = None,
    certificate: str | None = None,
    private_key: str | None = None,
    cafile: str | None = None,
    verify: bool = True,
) -> QuicConfiguration:
    """A QuicConfiguration with the settings both roles share; ``verify=False``: a
    client that does not check the server's certificate (doctor's probe)."""
    config = QuicConfiguration(
        alpn_protocols=H3_ALPN,
        is_client=is_client,
        idle_timeout=IDLE_TIMEOUT,
        max_datagram_size=MAX_DATAGRAM_SIZE,
        server_name=server_name,
        max_datagram_frame_size=MAX_DATAGRAM_FRAME_SIZE,
        initial_rtt=INITIAL_RTT,
    )
    if cafile is not None:
        config.load_verify_locations(cafile=cafile)
    if not verify:
        config.verify_mode = ssl.CERT_NONE
    if certificate is not None:
        config.load_cert_chain(certificate, private_key)
    return config


def padding_start(data: bytes) -> int:
    """Where zero padding after the datagram's last QUIC packet starts (len(data): none)."""
    offset = 0
    while offset < len(data):
        if not data[offset]:
            return offset if not any(data[offset:]) else len(data)
        try:
            end = pull_header_raw(data, offset, CID_LENGTH)[9]
        except ValueError:
            return len(data)
        if end <= offset:
            return len(data)
        offset = end
    return len(data)


class _PaddedCore:
    """The core while one datagram with zero padding after its last packet is fed to
    it: aioquic pads the datagrams of its Initials that way (RFC 9000 §14.1 allows
    it), and qh3's core counts toward the anti-amplification limit (3x what was
    received, RFC 9000 §8.1) only the bytes of the packets it is handed; with 526 of
    1452 counted, its packet builder then fails ("packet builder capacity exhausted")
    instead of waiting. The last packet is handed on with its padding, which the core
    counts, and the padding alone is not handed on."""

    __slots__ = ("_core", "_last", "_padding")

    def __init__(self, core: QuicConnectionCore, data: bytes, start: int) -> None:
        self._core = core
        self._padding = len(data) - start
        self._last = data[:start]

    def receive_datagram(self, data: bytes, addr: Any, now: float, size: int | None = None) -> Any:
        padding = self._padding
        if len(data) == padding and not any(data):
            return (0, 0, 0, 0, 0, 0)  # the padding alone: already handed on
        if self._last.endswith(data):
            data = bytes(data) + bytes(padding)
        return self._core.receive_datagram(data, addr, now, size)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._core, name)


class _GuardedBridge(QuicTlsBridge):
    """qh3's TLS bridge with masqued's bounds (GuardedConnection._create_tls)."""

    windows: tuple[int, int, int, int, int]
    max_held: int

    def serialize_transport_parameters(self) -> bytes:
        """qh3's transport parameters (from the configuration's max_data and
        max_stream_data, and 100 + 103 streams) with the windows and stream counts the
        core is built with: the peer must be told what the core enforces."""
        data = super().serialize_transport_parameters()
        parameters = pull_quic_transport_parameters(Buffer(data=data))
        connection_window, stream_window, _, bidi, uni = self.windows
        parameters.initial_max_data = connection_window
        parameters.initial_max_stream_data_bidi_local = stream_window
        parameters.initial_max_stream_data_bidi_remote = stream_window
        parameters.initial_max_stream_data_uni = stream_window
        parameters.initial_max_streams_bidi = bidi
        parameters.initial_max_streams_uni = uni
        buf = Buffer(capacity=len(data) + 64)
        push_quic_transport_parameters(buf, parameters)
        return bytes(buf.data)

    def receive_crypto(
        self, epoch: Any, data: bytes, offset: int | None = None, *, version: int | None = None
    ) -> None:
        # qh3's TLS buffers a handshake message until all of it arrived, and a message
        # may claim 16 MiB: bound what waits there (RFC 9000 §7.5).
        if len(self.tls._receive_buffer) + len(data) > self.max_held:
            raise QuicTlsBridgeError(CRYPTO_BUFFER_EXCEEDED, "handshake message too large")
        super().receive_crypto(epoch, data, offset, version=version)


class GuardedConnection(QuicConnection):
    """qh3's QuicConnection with masqued's receive limits built into its core, the
    bounds on what its TLS and HTTP/3 layers hold, and (relay workers) a marked first
    connection ID. See the module docstring for what differs from aioquic's."""

    worker: int | None = None
    # A first datagram with zero padding, while it builds the core (receive_datagram).
    _padded: tuple[bytes, int] | None = None

    def __init__(
        self, *args: Any, receive_limits: ReceiveLimits | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.receive_limits = receive_limits or ReceiveLimits()
        self.exceeded: str | None = None  # why settle() closed the connection
        self._written: dict[int, int] = {}  # stream ID -> bytes queued on it
        self._datagrams = 0  # queued since the last flush (the core's queue is hidden)
        self._datagram_bytes = 0
        self._sent = 0  # bytes of every UDP payload sent: for delivered_bytes
        self.min_rtt = 0.0  # smallest RTT sample seen (engine.min_rtt)
        self._handshake_bytes = 0  # received before the handshake completed
        if self.worker is not None:
            # The core takes host_cid as its source CID when it is built (the first
            # packet): marked, the client's packets reach this worker from then on.
            self.host_cid = bytes((self.worker,)) + self.host_cid[1:]

    def _windows(self) -> tuple[int, int, int, int, int]:
        """(connection window, stream window, out-of-order bytes per stream, bidi
        streams, uni streams) the core is built with."""
        limits = self.receive_limits
        if self._is_client:
            # A client talks to its own relay: the tunnel's windows from the start.
            window = limits.tunnel_window
            return limits.tunnel_connection_window, window, window, 16, 16
        window = limits.qh3_window
        return window, window, window, limits.bidi_streams, limits.uni_streams

    def _create_core(self, remote_addr: Any, initial_dcid: bytes, now: float) -> None:
        # qh3's own version passes the configuration's max_data / max_stream_data
        # and 100 + 103 streams; masqued's limits instead. No 0-RTT (masqued keeps no
        # session tickets), so the peer's limits are learnt in the handshake.
        config = self._configuration
        connection_window, stream_window, reassembly, bidi, uni = self._windows()
        self._core = QuicConnectionCore(
            self._is_client,
            int(self._version or 0),
            ("0.0.0.0", 0),
            remote_addr,
            self.host_cid,
            initial_dcid,
            self._is_client or self._retry_source_connection_id is not None,
            config.active_connection_id_limit or (2 if self._is_client else 8),
            config.max_datagram_size,
            False,  # no PMTU probing: MAX_DATAGRAM_SIZE is what datagram room assumes
            config.idle_timeout,
            3,  # ack_delay_exponent
            config.max_datagram_frame_size,
            None,  # the peer's max_datagram_frame_size: from its transport parameters
            connection_window,
            0,  # connection send limit: from the peer's transport parameters
            stream_window,
            0,
            0,
            0,
            reassembly,
            bidi,
            uni,
            0,
            0,
            config.initial_rtt,
            0.025,  # max_ack_delay
            now,
        )
        padded = self._padded
        if padded is not None:
            self._core = _PaddedCore(self._core, padded[0], padded[1])  # type: ignore[assignment]
        self._applied_transport_parameters = None
        self._pre_handshake_state_replayed = False

    def _create_tls(self, remote_source_cid: bytes | None) -> QuicTlsBridge:
        bridge = super()._create_tls(remote_source_cid)
        # Our bounds as methods of a subclass (not closures stored on the bridge: those
        # would tie the connection into reference cycles that only the cyclic GC frees).
        bridge.__class__ = _GuardedBridge
        assert isinstance(bridge, _GuardedBridge)
        bridge.windows = self._windows()
        bridge.max_held = self.receive_limits.max_held
        # Serialized once in the bridge's constructor (and again on a version change).
        bridge.tls.handshake_extensions = [
            (ExtensionType.QUIC_TRANSPORT_PARAMETERS, bridge.serialize_transport_parameters())
        ]
        return bridge

    def receive_datagram(self, data: bytes, addr: Any, now: float) -> None:
        if not self._handshake_complete and not self._is_client:
            self._handshake_bytes += len(data)
            if self._handshake_bytes > self.receive_limits.qh3_handshake_bytes:
                # Before the handshake everything is TLS: a peer sending more than a
                # ClientHello needs is closed before the core buffers it (limits.py).
                if self._core is not None and self._close_event is None:
                    self.close(CRYPTO_BUFFER_EXCEEDED, None, "handshake too large")
                return
        if self._handshake_complete or self._is_client or data[-1:] != b"\0":
            super().receive_datagram(data, addr, now)
            return
        start = padding_start(data)
        if start == len(data):
            super().receive_datagram(data, addr, now)
            return
        if self._core is None:
            # The core is built by this first datagram: feed it through a wrapper of
            # the class the facade builds (see _create_core).
            self._padded = (data, start)
            try:
                super().receive_datagram(data, addr, now)
            finally:
                self._padded = None
                if isinstance(self._core, _PaddedCore):
                    self._core = self._core._core
            return
        core = self._core
        self._core = _PaddedCore(core, data, start)  # type: ignore[assignment]
        try:
            super().receive_datagram(data, addr, now)
        finally:
            if self._core is not None and isinstance(self._core, _PaddedCore):
                self._core = core

    def receive_datagrams(self, batch: list[tuple[bytes, Any]], now: float) -> None:
        """A batch of UDP datagrams for this connection, in order: after the handshake,
        from one address, handed to the core in one call (the facade's per-datagram
        path parses every packet header in Python)."""
        if self._handshake_complete and len(batch) > 1:
            addr = batch[0][1]
            if all(a == addr for _, a in batch):
                self.receive_many_datagrams([d for d, _ in batch], addr, now)
                return
        for data, addr in batch:
            self.receive_datagram(data, addr, now)

    def send_stream_data(self, stream_id: int, data: Any, end_stream: bool = False) -> None:
        self._written[stream_id] = self._written.get(stream_id, 0) + len(data)
        super().send_stream_data(stream_id, data, end_stream)

    def send_datagram_frame(self, data: bytes) -> None:
        self._datagrams += 1
        self._datagram_bytes += len(data)
        super().send_datagram_frame(data)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]:
        # The facade's loop (without its qlog calls: masqued sets no QUIC logger),
        # keeping what was built when the core's builder gives up.
        core = self._core
        out: list[tuple[bytes, Any]] = []
        if core is None:
            return out
        self._datagrams = self._datagram_bytes = 0
        while True:
            try:
                transmit = core.poll_transmit(now)
            except RuntimeError as exc:
                if self._handshake_complete or "capacity" not in str(exc):
                    raise QuicConnectionError(QuicErrorCode.INTERNAL_ERROR, None, str(exc)) from exc
                # Before the peer's address is validated the core may send 3x what it
                # received (RFC 9000 §8.1); qh3 2.1's builder raises when a packet of
                # its flight (a PTO's retransmission of Initial, Handshake and the
                # HTTP/3 SETTINGS) does not fit what is left, instead of waiting. The
                # frames stay queued; the loss timer backs off as usual.
                break
            if transmit is None:
                break
            data = transmit[0]
            self._sent += len(data)
            out.append((data, transmit[1]))
        return out

    def local_close_code(self) -> int | None:
        """The error code of a close this side (or its core) started, None while open."""
        core = self._core
        if core is not None:
            error = core.local_error
            if error is not None:
                return int(error[0])
        event = self._close_event
        return None if event is None else event.error_code

    def open_tunnel(self, stream_id: int) -> None:
        """An admitted tunnel: the core's windows cannot change after it is built
        (module docstring), so nothing to do."""

    def settle(self, held: dict[int, int]) -> int:
        """Close the connection if its upper layers hold too much; returns what they
        hold (the core's out-of-order bytes are bounded by its windows, not counted).

        ``held``: bytes the HTTP/3 layer keeps per stream (incomplete frames).
        """
        tls = self._tls.tls if self._tls is not None else None
        upper = sum(held.values()) + (len(tls._receive_buffer) if tls is not None else 0)
        if upper > self.receive_limits.max_held and self.exceeded is None:
            self.exceeded = f"{upper} bytes held in incomplete HTTP/3 or TLS messages"
            self.close(error_code=H3_EXCESSIVE_LOAD, reason_phrase="excessive load")
        return upper


_classes: dict[int | None, type[GuardedConnection]] = {}


def connection_class(worker: int | None, client_certificate: bool) -> type[GuardedConnection]:
    """The GuardedConnection for a relay worker (first CID marked with ``worker``, None
    for an unmarked one); qh3 cannot ask for client certificates (config.py refuses)."""
    cls = _classes.get(worker)
    if cls is None:
        cls = type(f"GuardedConnection_w{worker}", (GuardedConnection,), {"worker": worker})
        _classes[worker] = cls
    return cls


def server_connection(
    config: QuicConfiguration,
    *,
    original_dcid: bytes,
    retry_scid: bytes | None,
    receive_limits: ReceiveLimits,
    worker: int | None,
    client_certificate: bool,
) -> GuardedConnection:
    return connection_class(worker, client_certificate)(
        configuration=config,
        original_destination_connection_id=original_dcid,
        retry_source_connection_id=retry_scid,
        receive_limits=receive_limits,
    )


def client_connection(config: QuicConfiguration) -> GuardedConnection:
    return GuardedConnection(configuration=config)


class TunnelH3(H3Connection):
    """H3Connection that also sends SETTINGS_ENABLE_CONNECT_PROTOCOL=1 (RFC 9220; qh3
    sends SETTINGS_H3_DATAGRAM=1 itself), and takes and gives HTTP Datagrams by request
    stream ID as aioquic does (qh3's API speaks in quarter stream IDs, "flow IDs")."""

    def _get_local_settings(self) -> dict[int, int]:
        settings = super()._get_local_settings()
        settings[Setting.H3_DATAGRAM] = 1
        settings[Setting.ENABLE_CONNECT_PROTOCOL] = 1
        return settings

    def send_datagram(self, flow_id: int, data: bytes) -> None:
        # Called with the request stream's ID (h3link); on the wire its quarter.
        super().send_datagram(flow_id // 4, data)


# -- packets an endpoint answers without a connection ------------------------------------


def parse_long_header(data: bytes) -> LongHeader | None:
    """The header of a packet for no known connection, None if unparseable."""
    try:
        header = pull_quic_header(Buffer(data=data), host_cid_length=CID_LENGTH)
    except ValueError:
        return None
    return LongHeader(
        is_initial=header.packet_type == QuicPacketType.INITIAL,
        version_negotiation=header.packet_type == QuicPacketType.VERSION_NEGOTIATION,
        version=header.version,
        destination_cid=header.destination_cid,
        source_cid=header.source_cid,
        token=header.token,
    )


def supported_versions(config: QuicConfiguration) -> list[int]:
    return [int(v) for v in config.supported_versions]


def version_negotiation(header: LongHeader, versions: list[int]) -> bytes:
    return encode_quic_version_negotiation(
        source_cid=header.destination_cid,
        destination_cid=header.source_cid,
        supported_versions=versions,
    )


def retry(header: LongHeader, scid: bytes, token: bytes) -> bytes:
    assert header.version is not None
    return encode_quic_retry(
        version=header.version,
        source_cid=scid,
        destination_cid=header.source_cid,
        original_destination_cid=header.destination_cid,
        retry_token=token,
    )


def random_cid() -> bytes:
    return os.urandom(CID_LENGTH)


# -- a connection's events -------------------------------------------------------------


def pump(quic: GuardedConnection, h3: H3Connection, sink: EventSink) -> None:
    """Hand every event ``quic`` has (through ``h3``) to ``sink``, until it stops."""
    for event in _merged_events(quic):
        kind = type(event)
        if kind is ConnectionTerminated:
            assert isinstance(event, ConnectionTerminated)
            sink.terminated(event.error_code, event.reason_phrase or f"code {event.error_code:#x}")
            return
        if kind is HandshakeCompleted:
            sink.handshake_completed()
        elif kind is ConnectionIdIssued:
            assert isinstance(event, ConnectionIdIssued)
            sink.cid_issued(event.connection_id)
        elif kind is ConnectionIdRetired:
            assert isinstance(event, ConnectionIdRetired)
            sink.cid_retired(event.connection_id)
        elif kind is StreamReset:
            assert isinstance(event, StreamReset)
            sink.stream_reset(event.stream_id, event.error_code)
        for h3_event in h3.handle_event(event):
            h3_kind = type(h3_event)
            if h3_kind is DataReceived:
                assert isinstance(h3_event, DataReceived)
                sink.data_received(h3_event.stream_id, h3_event.data, h3_event.stream_ended)
            elif h3_kind is DatagramReceived:
                assert isinstance(h3_event, DatagramReceived)
                sink.datagram_received(h3_event.flow_id * 4, h3_event.data)
            elif h3_kind is HeadersReceived:
                assert isinstance(h3_event, HeadersReceived)
                sink.headers_received(h3_event.stream_id, h3_event.headers, h3_event.stream_ended)
            if sink.stopped:
                return
        if sink.stopped:
            return


def _merged_events(quic: QuicConnection) -> Iterator[QuicEvent]:
    """``quic``'s pending events, each run of StreamDataReceived on one stream merged
    into one event (as aioquic_engine does, for the same reason)."""
    run: StreamDataReceived | None = None
    chunks: list[bytes] = []
    while (event := quic.next_event()) is not None:
        if type(event) is StreamDataReceived:
            if run is not None and event.stream_id == run.stream_id and not run.end_stream:
                chunks.append(event.data)
                run.end_stream = event.end_stream
                continue
            if run is not None:
                yield _merged(run, chunks)
            run = StreamDataReceived(event.data, event.end_stream, event.stream_id)
            chunks = [event.data]
            continue
        if run is not None:
            yield _merged(run, chunks)
            run = None
        yield event
    if run is not None:
        yield _merged(run, chunks)


def _merged(run: StreamDataReceived, chunks: list[bytes]) -> StreamDataReceived:
    if len(chunks) > 1:
        run.data = b"".join(chunks)
    return run


# -- state qh3 keeps private -----------------------------------------------------------


def h3_held(h3: H3Connection) -> dict[int, int]:
    """Bytes qh3's HTTP/3 layer keeps per stream while a frame is incomplete."""
    return {sid: len(s.buffer) for sid, s in h3._stream.items() if s.buffer}


def peer_settings(h3: H3Connection) -> tuple[bool, bool] | None:
    """(extended CONNECT allowed, HTTP/3 datagrams offered) once the peer's SETTINGS
    arrived, else None."""
    settings = h3.received_settings
    if settings is None:
        return None
    return (
        settings.get(Setting.ENABLE_CONNECT_PROTOCOL) == 1,
        settings.get(Setting.H3_DATAGRAM) == 1,
    )


def peer_accepts_datagrams(h3: H3Connection, quic: GuardedConnection) -> bool:
    """True once the peer sent SETTINGS_H3_DATAGRAM=1 and max_datagram_frame_size."""
    settings = h3.received_settings
    return (
        settings is not None
        and settings.get(Setting.H3_DATAGRAM) == 1
        and quic._remote_max_datagram_frame_size is not None
    )


def datagram_room(quic: GuardedConnection, stream_id: int) -> int:
    """Largest HTTP Datagram payload (Context ID + data) that fits one QUIC packet
    and the peer's max_datagram_frame_size; 0 if the peer accepts no DATAGRAM frames."""
    return datagram_payload_room(
        quic._configuration.max_datagram_size,
        PEER_CID_MAX,
        quic._remote_max_datagram_frame_size,
        stream_id,
    )


def datagrams_queued(quic: GuardedConnection) -> tuple[int, int]:
    """(datagrams, bytes with their worst-case overhead) queued since the last flush
    (what the core still holds from earlier flushes it does not say)."""
    count = quic._datagrams
    return count, quic._datagram_bytes + DATAGRAM_COST * count


def _core(quic: GuardedConnection) -> QuicConnectionCore | None:
    return quic._core


def stream_backlog(quic: GuardedConnection, stream_id: int) -> int:
    """Bytes queued on a stream and not yet acknowledged, at most: those the core has
    not sent yet, plus the connection's bytes in flight."""
    core = _core(quic)
    if core is None or stream_id not in quic._written:
        return 0
    return int(quic.get_send_buffer_size(stream_id)) + int(core.bytes_in_flight)


def stream_acked(quic: GuardedConnection, stream_id: int) -> int | None:
    """Bytes of ``stream_id`` the peer has acknowledged, at least."""
    written = quic._written.get(stream_id)
    if written is None:
        return None
    return max(0, written - stream_backlog(quic, stream_id))


def min_rtt(quic: GuardedConnection) -> float:
    """The smallest RTT sample seen at the calls so far (the core keeps no minimum),
    in seconds; 0 before one (or if implausible)."""
    core = _core(quic)
    value = None if core is None else core.latest_rtt
    if value is not None and 0.0 < value < 1.0:
        quic.min_rtt = min(quic.min_rtt, value) if quic.min_rtt else value
    return quic.min_rtt


def rtt_ms(quic: GuardedConnection) -> float | None:
    """Smoothed RTT in milliseconds, None before the first sample."""
    core = _core(quic)
    value = None if core is None else core.smoothed_rtt
    return None if value is None else round(float(value) * 1000, 3)


def congestion_window(quic: GuardedConnection) -> int:
    core = _core(quic)
    return 0 if core is None else int(core.congestion_window)


def bytes_in_flight(quic: GuardedConnection) -> int:
    core = _core(quic)
    return 0 if core is None else int(core.bytes_in_flight)


def delivered_bytes(quic: GuardedConnection) -> int | None:
    """Bytes the peer has acknowledged, estimated: all sent minus those in flight (lost
    and ACK-only packets count as delivered; the core has no delivery count)."""
    return max(0, quic._sent - bytes_in_flight(quic))


def _x509(cert: Any) -> x509.Certificate | None:
    if cert is None:
        return None
    try:
        return x509.load_der_x509_certificate(cert.public_bytes())
    except ValueError:
        return None


def peer_certificate(quic: GuardedConnection) -> tuple[Any, list[Any]]:
    """The certificate (and chain) the peer presented, as cryptography's objects."""
    chain = [c for c in (_x509(c) for c in quic.get_issuercerts()) if c is not None]
    return _x509(quic.get_peercert()), chain
