"""The seam to aioquic: the only module that imports it or touches its internals.

Everything masqued needs from a QUIC + HTTP/3 library goes through the names defined
here: building connections (receive limits, pacer, CID marking for worker steering,
client certificates), parsing and writing the long-header packets an endpoint answers
itself (version negotiation, Retry), pumping a connection's events into a handler,
and reading the state aioquic keeps private (RTT, congestion window, bytes in flight,
stream and datagram queues, the peer's certificate). A second engine provides the
same names in its own module.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterator
from typing import Any

import aioquic
from aioquic.buffer import Buffer  # type: ignore[attr-defined]
from aioquic.h3.connection import H3_ALPN, H3Connection, Setting
from aioquic.h3.events import DatagramReceived, DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.congestion.base import register_congestion_control
from aioquic.quic.congestion.cubic import CubicCongestionControl
from aioquic.quic.connection import (
    CONNECTION_LIMIT_FRAME_CAPACITY,
    MAX_STREAM_DATA_FRAME_CAPACITY,
    QuicConnection,
    QuicConnectionError,
)
from aioquic.quic.events import (
    ConnectionIdIssued,
    ConnectionIdRetired,
    ConnectionTerminated,
    HandshakeCompleted,
    QuicEvent,
    StreamDataReceived,
    StreamReset,
)
from aioquic.quic.packet import (
    QuicErrorCode,
    QuicFrameType,
    QuicPacketType,
    encode_quic_retry,
    encode_quic_version_negotiation,
    pull_quic_header,
)
from aioquic.quic.packet_builder import QuicPacketBuilder, QuicSentPacket
from aioquic.quic.recovery import QuicPacketPacer

from masqued.transport.engines import (
    CID_LENGTH,
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

NAME = "aioquic"
# The release line this seam was written against: its private members are read as
# they are there. Another line may rename them; refuse rather than misread.
TESTED = "1.7."
if not aioquic.__version__.startswith(TESTED):
    raise ImportError(
        f"masqued's aioquic seam was written for aioquic {TESTED}x, found {aioquic.__version__}"
    )

# aioquic's connection IDs are CID_LENGTH bytes (its default connection_id_length).


class DeliveryCountingCubic(CubicCongestionControl):
    """aioquic's CUBIC, also counting the bytes the peer has acknowledged: the
    delivery rate the datagram queue is bounded by, which aioquic does not track."""

    def __init__(self, *, max_datagram_size: int) -> None:
        super().__init__(max_datagram_size=max_datagram_size)
        self.delivered = 0

    def on_packet_acked(self, *, now: float, packet: QuicSentPacket) -> None:
        self.delivered += packet.sent_bytes
        super().on_packet_acked(now=now, packet=packet)


CONGESTION_CONTROL = "masqued-cubic"
register_congestion_control(CONGESTION_CONTROL, DeliveryCountingCubic)


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
        congestion_control_algorithm=CONGESTION_CONTROL,
        max_datagram_frame_size=MAX_DATAGRAM_FRAME_SIZE,
    )
    if cafile is not None:
        config.load_verify_locations(cafile=cafile)
    if not verify:
        config.verify_mode = ssl.CERT_NONE
    if certificate is not None:
        config.load_cert_chain(certificate, private_key)
    return config


# Packets the pacer lets out back to back: one GSO send (64 segments), at most half
# the congestion window.
PACER_BURST = 64


class BurstPacer(QuicPacketPacer):
    """aioquic's pacer (same rate: window / smoothed RTT) with a burst of 64 packets.

    aioquic's bucket holds at most 16 packets; once it gates, every send waits for an
    asyncio timer (whole milliseconds), so a timer-driven sender moves at most ~16
    packets per millisecond. A burst the size of one GSO send keeps the rate and
    leaves the timer granularity out of it (README, Performance).
    """

    def update_rate(self, congestion_window: int, smoothed_rtt: float) -> None:
        super().update_rate(congestion_window, smoothed_rtt)
        assert self.packet_time is not None  # set by update_rate
        # In packets times packet_time, not bytes / rate: aioquic clamps packet_time
        # to >= 1 us but sizes its bucket from the unclamped rate, which left room
        # for under two packets once CUBIC's window had grown large.
        burst = max(2, min(congestion_window // 2 // self._max_datagram_size, PACER_BURST))
        self.bucket_max = burst * self.packet_time
        if self.bucket_time > self.bucket_max:
            self.bucket_time = self.bucket_max


class GuardedConnection(QuicConnection):
    """A QuicConnection whose receive credit follows what our side consumed.

    aioquic doubles a stream's window once the peer's highest offset passes half of
    it, and the connection's once the bytes counted against it do, and zero-fills the
    receive buffer up to that offset: 1-byte STREAM frames at the end of each window
    make it allocate the whole window, then twice that. Here the windows start small
    (``ReceiveLimits``), an admitted tunnel stream gets a large one
    (``open_tunnel``), and ``settle`` (before each send) grants credit only as
    consumed bytes + window, where bytes still held above QUIC (an incomplete HTTP/3
    frame) are not consumed. A peer that sends past its credit gets aioquic's own
    FLOW_CONTROL_ERROR; one that opens more streams than allowed STREAM_LIMIT_ERROR;
    one whose TLS or HTTP/3 messages stay incomplete past ``max_held`` is closed too.
    It also carries the BurstPacer and, for relay workers, CIDs marked for steering.
    """

    # Relay workers: the first byte of every connection ID this side issues (its
    # index in the reuseport group, masqued.transport.steering); None: unmarked.
    worker: int | None = None
    # Servers with mTLS: ask the client for a certificate.
    request_client_certificate = False

    def __init__(
        self, *args: Any, receive_limits: ReceiveLimits | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.receive_limits = limits = receive_limits or ReceiveLimits()
        self._windows: dict[int, int] = {}  # stream ID -> window of an admitted tunnel
        self._connection_window = limits.connection_window
        # Set before the transport parameters are sent (at the first handshake step).
        self._local_max_data.value = self._local_max_data.sent = limits.connection_window
        self._local_max_stream_data_bidi_local = limits.stream_window
        self._local_max_stream_data_bidi_remote = limits.stream_window
        self._local_max_stream_data_uni = limits.stream_window
        for limit, count in (
            (self._local_max_streams_bidi, limits.bidi_streams),
            (self._local_max_streams_uni, limits.uni_streams),
        ):
            limit.value = limit.sent = count
        self.exceeded: str | None = None  # why settle() closed the connection
        old = self._loss._pacer
        if type(old) is QuicPacketPacer:
            self._loss._pacer = BurstPacer(max_datagram_size=old._max_datagram_size)
        if self.worker is not None:
            # aioquic draws CIDs from os.urandom in __init__ and in
            # _replenish_connection_ids; each is marked before it is sent.
            first = self._host_cids[0]
            first.cid = self._mark(first.cid)
            self.host_cid = first.cid
            self._local_initial_source_connection_id = first.cid

    def _mark(self, cid: bytes) -> bytes:
        return bytes((self.worker,)) + cid[1:] if cid and self.worker is not None else cid

    def _replenish_connection_ids(self) -> None:
        before = len(self._host_cids)
        super()._replenish_connection_ids()
        if self.worker is not None:
            for entry in self._host_cids[before:]:
                if not entry.was_sent:
                    entry.cid = self._mark(entry.cid)

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        if self.request_client_certificate:
            # aioquic has only this private switch; it then checks the client's proof
            # of key possession but not the chain, which masqued.gate verifies itself
            # at CONNECT time. A client may still answer without a certificate
            # (RFC 8446 §4.4.2.4), so tokens keep working on the same relay.
            self.tls._request_client_certificate = True

    def receive_datagrams(self, batch: list[tuple[bytes, Any]], now: float) -> None:
        """A batch of UDP datagrams for this connection, in order."""
        receive = self.receive_datagram
        for data, addr in batch:
            receive(data, addr, now)

    def local_close_code(self) -> int | None:
        """The error code of a close this side started (a limit aioquic enforces
        itself, such as flow control, ends up here), None while open."""
        event = self._close_event
        return None if event is None else event.error_code

    def open_tunnel(self, stream_id: int) -> None:
        """``stream_id`` carries an admitted tunnel: give it (and the connection) the
        tunnel's windows from the next send on."""
        limits = self.receive_limits
        self._windows[stream_id] = limits.tunnel_window
        self._connection_window = max(self._connection_window, limits.tunnel_connection_window)

    def settle(self, held: dict[int, int]) -> int:
        """Grant credit for what was consumed; returns the bytes held for this peer.

        ``held``: bytes an upper layer keeps per stream (incomplete HTTP/3 frames).
        """
        limits = self.receive_limits
        tls = getattr(self, "tls", None)
        upper = sum(held.values()) + (len(tls._receive_buffer) if tls is not None else 0)
        if upper > limits.max_held and self.exceeded is None:
            self.exceeded = f"{upper} bytes held in incomplete HTTP/3 or TLS messages"
            self.close(error_code=H3_EXCESSIVE_LOAD, reason_phrase="excessive load")
        windows = self._windows
        buffered = 0
        for stream_id, stream in self._streams.items():
            limit = stream.max_stream_data_local
            if not limit:  # our own unidirectional streams receive nothing
                continue
            receiver = stream.receiver
            buffered += len(receiver._buffer)  # out of order, or a gap the peer left
            window = windows.get(stream_id, limits.stream_window)
            credit = receiver._buffer_start - held.get(stream_id, 0) + window
            if credit - limit >= window >> 1:
                stream.max_stream_data_local = credit
        if len(windows) > limits.bidi_streams:
            for stream_id in [s for s in windows if s not in self._streams]:
                del windows[stream_id]
        max_data = self._local_max_data
        window = self._connection_window
        credit = max_data.used - buffered - upper + window
        if credit - max_data.value >= window >> 1:
            max_data.value = credit
        return buffered + upper

    # The two writers below send what settle() granted; aioquic's own versions would
    # first double the windows from the highest offsets received.

    def _write_connection_limits(self, builder: QuicPacketBuilder, space: Any) -> None:
        for limit in (
            self._local_max_data,
            self._local_max_streams_bidi,
            self._local_max_streams_uni,
        ):
            if limit.value == limit.sent:
                continue
            if limit is not self._local_max_data and (
                limit.sent - limit.used >= limit.value - limit.sent
            ):
                continue  # batch MAX_STREAMS until the peer is short of streams
            buf = builder.start_frame(
                limit.frame_type,
                capacity=CONNECTION_LIMIT_FRAME_CAPACITY,
                handler=self._on_connection_limit_delivery,
                handler_args=(limit,),
            )
            buf.push_uint_var(limit.value)
            limit.sent = limit.value

    def _write_stream_limits(self, builder: QuicPacketBuilder, space: Any, stream: Any) -> None:
        if stream.max_stream_data_local_sent == stream.max_stream_data_local:
            return
        buf = builder.start_frame(
            QuicFrameType.MAX_STREAM_DATA,
            capacity=MAX_STREAM_DATA_FRAME_CAPACITY,
            handler=self._on_max_stream_data_delivery,
            handler_args=(stream,),
        )
        buf.push_uint_var(stream.stream_id)
        buf.push_uint_var(stream.max_stream_data_local)
        stream.max_stream_data_local_sent = stream.max_stream_data_local

    def _handle_crypto_frame(self, context: Any, frame_type: int, buf: Any) -> None:
        # aioquic's TLS layer buffers a handshake message until all of it arrived, and a
        # message may claim 16 MiB: bound what waits there (RFC 9000 §7.5).
        start = buf.tell()
        offset = buf.pull_uint_var()
        length = buf.pull_uint_var()
        buf.seek(start)
        stream = self._crypto_streams.get(context.epoch)
        tls = getattr(self, "tls", None)
        if stream is not None and tls is not None:
            pending = offset + length - stream.receiver.starting_offset()
            if pending + len(tls._receive_buffer) > self.receive_limits.max_held:
                raise QuicConnectionError(
                    error_code=QuicErrorCode.CRYPTO_BUFFER_EXCEEDED,
                    frame_type=frame_type,
                    reason_phrase="handshake message too large",
                )
        super()._handle_crypto_frame(context, frame_type, buf)


_classes: dict[tuple[int | None, bool], type[GuardedConnection]] = {}


def connection_class(worker: int | None, client_certificate: bool) -> type[GuardedConnection]:
    """The GuardedConnection for a relay worker (CIDs marked with ``worker``, None for
    an unmarked one) that asks for client certificates or not (one class per pair)."""
    key = (worker, client_certificate)
    cls = _classes.get(key)
    if cls is None:
        cls = type(
            f"GuardedConnection_w{worker}_{int(client_certificate)}",
            (GuardedConnection,),
            {"worker": worker, "request_client_certificate": client_certificate},
        )
        _classes[key] = cls
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
    """H3Connection that sends SETTINGS_H3_DATAGRAM=1 (RFC 9297 §2.1.1) and
    SETTINGS_ENABLE_CONNECT_PROTOCOL=1 (RFC 9220), without WebTransport (aioquic
    advertises datagrams only together with WebTransport)."""

    def _get_local_settings(self) -> dict[int, int]:
        settings = super()._get_local_settings()
        settings[Setting.H3_DATAGRAM] = 1
        settings[Setting.ENABLE_CONNECT_PROTOCOL] = 1
        return settings


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
    return list(config.supported_versions)


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


def pump(quic: QuicConnection, h3: H3Connection, sink: EventSink) -> None:
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
                sink.datagram_received(h3_event.stream_id, h3_event.data)
            elif h3_kind is HeadersReceived:
                assert isinstance(h3_event, HeadersReceived)
                sink.headers_received(h3_event.stream_id, h3_event.headers, h3_event.stream_ended)
            if sink.stopped:
                return
        if sink.stopped:
            return


def _merged_events(quic: QuicConnection) -> Iterator[QuicEvent]:
    """``quic``'s pending events, each run of StreamDataReceived on one stream merged
    into one event: the H3 layer, the frame decoder and the packet checks then run
    once per run instead of once per QUIC packet. An event is yielded only after
    everything before it, so a consumer that stops leaves the rest queued."""
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


# -- state aioquic keeps private ---------------------------------------------------------


def h3_held(h3: H3Connection) -> dict[int, int]:
    """Bytes aioquic's HTTP/3 layer keeps per stream while a frame is incomplete."""
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


def peer_accepts_datagrams(h3: H3Connection, quic: QuicConnection) -> bool:
    """True once the peer sent SETTINGS_H3_DATAGRAM=1 and max_datagram_frame_size."""
    settings = h3.received_settings
    return (
        settings is not None
        and settings.get(Setting.H3_DATAGRAM) == 1
        and quic._remote_max_datagram_frame_size is not None
    )


def datagram_room(quic: QuicConnection, stream_id: int) -> int:
    """Largest HTTP Datagram payload (Context ID + data) that fits one QUIC packet
    and the peer's max_datagram_frame_size, for datagrams of ``stream_id``; 0 if the
    peer accepts no DATAGRAM frames."""
    return datagram_payload_room(
        quic._max_datagram_size,
        len(quic._peer_cid.cid),
        quic._remote_max_datagram_frame_size,
        stream_id,
    )


def datagrams_queued(quic: QuicConnection) -> tuple[int, int]:
    """(datagrams, bytes with their worst-case overhead) waiting in aioquic's queue."""
    pending = quic._datagrams_pending
    return len(pending), sum(map(len, pending)) + DATAGRAM_COST * len(pending)


def stream_acked(quic: QuicConnection, stream_id: int) -> int | None:
    """Bytes of ``stream_id`` the peer has acknowledged (all below the send buffer)."""
    stream = quic._streams.get(stream_id)
    return None if stream is None else stream.sender._buffer_start


def stream_backlog(quic: QuicConnection, stream_id: int) -> int:
    """Bytes queued on a stream but not yet acknowledged (aioquic's send buffer is
    unbounded: the data plane bounds it)."""
    stream = quic._streams.get(stream_id)
    return 0 if stream is None else len(stream.sender._buffer)


def min_rtt(quic: QuicConnection) -> float:
    """Minimum RTT in seconds, 0 before a sample (or if implausible)."""
    value = quic._loss._rtt_min
    return value if 0.0 < value < 1.0 else 0.0


def rtt_ms(quic: QuicConnection) -> float | None:
    """Smoothed RTT in milliseconds, None before the first sample."""
    loss = quic._loss
    if not loss._rtt_initialized:
        return None
    return round(float(loss._rtt_smoothed) * 1000, 3)


def congestion_window(quic: QuicConnection) -> int:
    return int(quic._loss.congestion_window)


def bytes_in_flight(quic: QuicConnection) -> int:
    return int(quic._loss.bytes_in_flight)


def delivered_bytes(quic: QuicConnection) -> int | None:
    """Bytes the peer has acknowledged on the connection (DeliveryCountingCubic)."""
    delivered = getattr(quic._loss._cc, "delivered", None)
    return delivered if isinstance(delivered, int) else None


def peer_certificate(quic: QuicConnection) -> tuple[Any, list[Any]]:
    """The certificate (and chain) the peer presented in the handshake, if any."""
    tls = getattr(quic, "tls", None)
    if tls is None:
        return None, []
    return tls._peer_certificate, list(tls._peer_certificate_chain or [])
