"""HTTP/2 as a tunnel link: the h2 library on a TLS pipe (the only module importing h2).

``H2Link`` implements masqued.transport.link.Link for one HTTP/2 connection in either
role: extended CONNECT (RFC 8441) with SETTINGS_ENABLE_CONNECT_PROTOCOL, no HTTP
Datagrams of its own (a tunnel's packets travel as DATAGRAM capsules on its stream,
RFC 9297 §3.5). h2 does the framing, HPACK and flow control; this adapter feeds it
what TLS decrypted, hands its events to a TunnelHandler, and at each ``flush`` moves
queued DATA into h2 as far as the peer's flow-control windows allow, then writes
everything h2 produced in one TLS write (one TCP send for a whole TUN batch).
What waits is bounded by the data plane, in time: a tunnel's backlog is everything the
peer has not consumed yet. TCP's acknowledgements say only that the peer's kernel has
the bytes (its receive buffer may hold megabytes a busy peer has not read); HTTP/2's
flow control says when its application consumed them, so masqued hands credit back
at once, after every read, and says so in a header of its requests and responses
(``masqued-credit: ?1``; others ignore it); a sender whose peer says so counts DATA
as delivered when the credit for it returns. Other peers may return credit in
half-window steps, which would stall a bound in time: they are measured by TCP's
acknowledgements. (A SETTINGS parameter would say it per connection, but hyperframe
6.1 writes setting identifiers as one byte: no experimental-range one is possible.)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hpack
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame

from masqued.proto.errors import (
    H3_DATAGRAM_ERROR,
    H3_EXCESSIVE_LOAD,
    H3_GENERAL_PROTOCOL_ERROR,
    H3_INTERNAL_ERROR,
    H3_MESSAGE_ERROR,
    H3_NO_ERROR,
    H3_REQUEST_CANCELLED,
    H3_REQUEST_REJECTED,
)
from masqued.transport.link import Headers, TunnelHandler, format_addr
from masqued.transport.tcp import TcpInfo, TlsPipe

ALPN = "h2"

# Receive windows: a tunnel stream and its connection get credit enough for a fast
# path's bandwidth-delay product (h2 returns it as soon as we consumed the DATA,
# which is at once: nothing is held for the peer beyond one incomplete frame).
STREAM_WINDOW = 65535  # before a tunnel is admitted (RFC 9113's initial value)
TUNNEL_WINDOW = 8 * 1024 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
MAX_FRAME_SIZE = 16384  # RFC 9113's minimum, ours inbound
# "This side returns flow-control credit after every read" (a Structured Field
# boolean, RFC 8941), on the first HEADERS of each request and response we send.
CREDIT_HEADER = (b"masqued-credit", b"?1")
MAX_HEADER_LIST_SIZE = 16384
# Request streams a peer may have open at once (as over QUIC).
MAX_CONCURRENT_STREAMS = 4

# RFC 9114 §A.4: the HTTP/3 error codes the relay and client speak, as HTTP/2 codes.
H3_TO_H2: dict[int, int] = {
    H3_NO_ERROR: ErrorCodes.NO_ERROR,
    H3_GENERAL_PROTOCOL_ERROR: ErrorCodes.PROTOCOL_ERROR,
    H3_INTERNAL_ERROR: ErrorCodes.INTERNAL_ERROR,
    H3_REQUEST_REJECTED: ErrorCodes.REFUSED_STREAM,
    H3_REQUEST_CANCELLED: ErrorCodes.CANCEL,
    H3_MESSAGE_ERROR: ErrorCodes.PROTOCOL_ERROR,  # a malformed message (RFC 9113 §8.1.1)
    H3_EXCESSIVE_LOAD: ErrorCodes.ENHANCE_YOUR_CALM,
    H3_DATAGRAM_ERROR: ErrorCodes.PROTOCOL_ERROR,  # no HTTP/2 datagrams to get wrong
}


def h2_code(code: int) -> int:
    """An error code for HTTP/2 frames: HTTP/3 codes mapped, HTTP/2 ones as they are."""
    if code in H3_TO_H2:
        return H3_TO_H2[code]
    return code if 0 <= code <= 0xD else int(ErrorCodes.PROTOCOL_ERROR)


_HEADER_EVENTS = (
    h2.events.RequestReceived,
    h2.events.ResponseReceived,
    h2.events.InformationalResponseReceived,
    h2.events.TrailersReceived,
)


def code_name(code: int) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return f"{code:#x}"


class H2Link:
    """One HTTP/2 connection carrying CONNECT-IP tunnels (Link)."""

    http_version = "h2"

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        pipe: TlsPipe,
        handler: TunnelHandler,
        peer_addr: Any,
        *,
        client: bool,
    ) -> None:
        self.loop = loop
        self.pipe = pipe
        self.handler = handler
        self.peer_addr = peer_addr
        self.peer = format_addr(peer_addr)
        self.client = client
        self.closed = False
        self.created = time.monotonic()
        self.last_rx = self.created
        config = h2.config.H2Configuration(
            client_side=client,
            header_encoding=None,
            validate_inbound_headers=True,
            validate_outbound_headers=True,
        )
        conn = h2.connection.H2Connection(config)
        local: dict[h2.settings.SettingCodes, int] = {
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
        }
        if client:
            local[h2.settings.SettingCodes.ENABLE_PUSH] = 0
        else:
            local[h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL] = 1  # RFC 8441 §3
        conn.local_settings = h2.settings.Settings(client=client, initial_values=local)
        conn.decoder.max_header_list_size = MAX_HEADER_LIST_SIZE
        self.conn = conn
        self._settings: tuple[bool, bool] | None = None
        # DATA not yet handed to h2 (its flow-control windows, or no flush yet).
        self._pending: dict[int, bytearray] = {}
        self._ending: set[int] = set()  # END_STREAM to send once pending is out
        self.pending_bytes = 0
        # DATA handed to h2 (all streams) and the part the peer returned credit for
        # (consumed); credit_timed: the peer returns it per read (CREDIT_HEADER).
        self.data_sent = 0
        self.data_consumed = 0
        self.credit_timed = False
        self._info: TcpInfo | None = None  # TCP_INFO, read once per flush cycle
        self._info_valid = False
        self.handshake_done = False
        # Set by the owner: what arrives (wraps receive() for batching), something
        # was queued (flush at the end of the batch), a tunnel admitted, a bug met,
        # a peer that broke HTTP/2 (counted and logged by the owner).
        self.input: Callable[[bytes], None] = self.receive
        self.on_touch: Callable[[H2Link], None] | None = None
        self.on_admitted: Callable[[H2Link], None] | None = None
        self.on_error: Callable[[H2Link, BaseException], None] | None = None
        self.on_violation: Callable[[H2Link, str], None] | None = None
        self.tunnels_opened = 0  # request streams admitted as tunnels
        pipe.on_open = self._tls_open
        pipe.on_data = self._data
        pipe.on_closed = self._pipe_closed

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Run TLS; HTTP/2 starts once its handshake is done."""
        self.pipe.start()

    def _tls_open(self) -> None:
        self.handshake_done = True
        if self.pipe.alpn() != ALPN:
            # RFC 9113 §3.2: h2 over TLS only after ALPN chose it.
            self._terminate(int(ErrorCodes.PROTOCOL_ERROR), "peer did not negotiate ALPN h2")
            self.pipe.close()
            return
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.flush()

    def _pipe_closed(self, reason: str, error: BaseException | None) -> None:
        self._terminate(int(ErrorCodes.CONNECT_ERROR) if error else 0, reason)

    def _terminate(self, code: int, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self._pending.clear()
        self.pending_bytes = 0
        self.handler.link_closed(self, code, reason)

    # -- input ---------------------------------------------------------------------------

    def _data(self, data: bytes) -> None:
        self.last_rx = time.monotonic()
        self._info_valid = False
        try:
            self.input(data)
        except Exception as exc:
            if self.on_error is None:
                raise
            self.on_error(self, exc)

    def receive(self, data: bytes) -> None:
        """Feed h2 what TLS decrypted; hand its events to the handler."""
        if self.closed:
            return
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            # h2 queued a GOAWAY with the error's code; send it and close.
            code = int(getattr(exc, "error_code", ErrorCodes.PROTOCOL_ERROR))
            if isinstance(exc.__cause__, hpack.HPACKError) and not isinstance(
                exc, h2.exceptions.DenialOfServiceError
            ):
                # RFC 9113 §4.3: a field block that does not decode is a
                # COMPRESSION_ERROR; h2 4.x says PROTOCOL_ERROR. Ours replaces its.
                code = int(ErrorCodes.COMPRESSION_ERROR)
                self.conn.data_to_send()
                self._goaway(code)
            reason = f"HTTP/2 {code_name(code)}: {exc}"
            self._write()
            self.pipe.close()
            if self.on_violation is not None:
                self.on_violation(self, reason)
            self._terminate(code, reason)
            return
        declared = self._declared_length()
        if declared > self.conn.max_inbound_frame_size:
            # RFC 9113 §4.2: refused on its header, before h2 would buffer it whole.
            self._goaway(int(ErrorCodes.FRAME_SIZE_ERROR))
            reason = f"HTTP/2 FRAME_SIZE_ERROR: a frame of {declared} bytes announced"
            self._write()
            self.pipe.close()
            if self.on_violation is not None:
                self.on_violation(self, reason)
            self._terminate(int(ErrorCodes.FRAME_SIZE_ERROR), reason)
            return
        handler = self.handler
        ended: set[int] = set()  # StreamEnded already given with its HEADERS or DATA
        consumed: dict[int, int] = {}  # flow-controlled bytes per stream, to hand back
        for event in events:
            if self.closed:
                return
            kind = type(event)
            if kind is h2.events.DataReceived:
                assert isinstance(event, h2.events.DataReceived)
                sid = event.stream_id
                fin = event.stream_ended is not None
                if fin:
                    ended.add(sid)
                handler.link_data(self, sid, event.data or b"", fin)
                if event.flow_controlled_length:
                    consumed[sid] = consumed.get(sid, 0) + event.flow_controlled_length
            elif kind in _HEADER_EVENTS:
                sid = event.stream_id  # type: ignore[attr-defined]
                fin = getattr(event, "stream_ended", None) is not None
                if fin:
                    ended.add(sid)
                trailers = kind is h2.events.TrailersReceived
                headers = event.headers  # type: ignore[attr-defined]
                if self.data_sent == 0 and CREDIT_HEADER in headers:
                    # Decided before any DATA left: one delivery counter throughout.
                    self.credit_timed = True
                handler.link_headers(self, sid, headers, fin or trailers)
            elif kind is h2.events.StreamEnded:
                sid = event.stream_id  # type: ignore[attr-defined]
                if sid not in ended:
                    handler.link_data(self, sid, b"", True)
            elif kind is h2.events.WindowUpdated:
                assert isinstance(event, h2.events.WindowUpdated)
                if event.stream_id == 0:
                    self._credit(int(event.delta or 0))
            elif kind is h2.events.StreamReset:
                assert isinstance(event, h2.events.StreamReset)
                self._drop_pending(event.stream_id)
                handler.link_reset(self, event.stream_id, int(event.error_code or 0))
            elif kind is h2.events.RemoteSettingsChanged:
                remote = self.conn.remote_settings
                self._settings = (remote.enable_connect_protocol == 1, True)
            elif kind is h2.events.ConnectionTerminated:
                assert isinstance(event, h2.events.ConnectionTerminated)
                code = int(event.error_code or 0)
                extra = (event.additional_data or b"").decode("utf-8", "replace")[:100]
                self._write()
                self.pipe.close()
                self._terminate(
                    code, f"GOAWAY {code_name(code)}" + (f" ({extra})" if extra else "")
                )
                return
        if consumed and not self.closed:
            self._return_credit(consumed)
        # Window updates (pending DATA may go), PING and SETTINGS ACKs, our own
        # WINDOW_UPDATEs: whatever h2 queued leaves at the owner's flush.
        self._touched()

    def _return_credit(self, consumed: dict[int, int]) -> None:
        """What this read consumed goes back to the peer at once, stream and
        connection, so that its credit says how much we have taken in."""
        conn = self.conn
        for sid, n in consumed.items():
            # A stream the peer ended or reset needs no more credit.
            with contextlib.suppress(h2.exceptions.ProtocolError, KeyError, ValueError):
                if conn.streams[sid].open:
                    conn.increment_flow_control_window(n, sid)
        conn.increment_flow_control_window(sum(consumed.values()))

    def _credit(self, delta: int) -> None:
        """The peer returned ``delta`` bytes of connection credit; more than was
        outstanding is the peer growing its window (at the start)."""
        self.data_consumed += min(delta, self.data_sent - self.data_consumed)

    def _declared_length(self) -> int:
        """The length the frame h2 is waiting for says it has (0: no header yet)."""
        head = self.conn.incoming_buffer._data
        return int.from_bytes(head[:3], "big") if len(head) >= 9 else 0

    def _goaway(self, code: int) -> None:
        """Our own GOAWAY (hyperframe), where h2 would not send the right one."""
        goaway = GoAwayFrame(0)
        goaway.last_stream_id = self.conn.highest_inbound_stream_id
        goaway.error_code = code
        self.pipe.write(goaway.serialize())

    # -- output --------------------------------------------------------------------------

    def _touched(self) -> None:
        if self.on_touch is not None:
            self.on_touch(self)

    def send_headers(self, stream_id: int, headers: Headers, end: bool = False) -> None:
        self.conn.send_headers(stream_id, [*headers, CREDIT_HEADER], end_stream=end)
        self._touched()

    def send_data(self, stream_id: int, data: bytes, end: bool = False) -> None:
        if data:
            buf = self._pending.get(stream_id)
            if buf is None:
                self._pending[stream_id] = bytearray(data)
            else:
                buf += data
            self.pending_bytes += len(data)
        if end:
            self._ending.add(stream_id)
        self._touched()

    def abort(self, stream_id: int, code: int) -> None:
        self._drop_pending(stream_id)
        # Already closed both ways: nothing to reset.
        with contextlib.suppress(h2.exceptions.ProtocolError, KeyError):
            self.conn.reset_stream(stream_id, error_code=h2_code(code))
        self._touched()

    def _drop_pending(self, stream_id: int) -> None:
        buf = self._pending.pop(stream_id, None)
        if buf is not None:
            self.pending_bytes -= len(buf)
        self._ending.discard(stream_id)

    def close(self, code: int, reason: str) -> None:
        """GOAWAY with ``code`` and close the connection (the owner does the rest)."""
        if self.closed:
            return
        if self.pipe.open:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.conn.close_connection(
                    error_code=h2_code(code), additional_data=reason.encode()[:64]
                )
            self._write()
        self.pipe.close()
        self._pending.clear()
        self.pending_bytes = 0

    def flush(self) -> None:
        """Move pending DATA into h2 within the peer's windows, then send everything."""
        if self.closed or self.pipe.closed or not self.pipe.open:
            return
        if self._pending or self._ending:
            self._drain()
        self._write()
        self._info_valid = False

    def _drain(self) -> None:
        conn = self.conn
        frame = conn.max_outbound_frame_size
        for sid in list(self._pending):
            buf = self._pending[sid]
            try:
                window = conn.local_flow_control_window(sid)
            except (h2.exceptions.ProtocolError, KeyError):
                self._drop_pending(sid)  # the stream is gone
                continue
            n = min(len(buf), window)
            off = 0
            while off < n:
                size = min(frame, n - off)
                conn.send_data(sid, bytes(buf[off : off + size]))
                off += size
            self.data_sent += off
            if off:
                del buf[:off]
                self.pending_bytes -= off
            if not buf:
                del self._pending[sid]
        for sid in list(self._ending):
            if sid not in self._pending:
                self._ending.discard(sid)
                with contextlib.suppress(h2.exceptions.ProtocolError, KeyError):
                    conn.end_stream(sid)

    def _write(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.pipe.write(data)
        self.pipe.flush()

    # -- what the relay and client ask ----------------------------------------------------

    def settings(self) -> tuple[bool, bool] | None:
        """(extended CONNECT allowed, HTTP Datagrams available) once the peer's
        SETTINGS arrived, else None. Over HTTP/2 datagrams are DATAGRAM capsules
        (RFC 9297 §3.5): always available, never native."""
        return self._settings

    def new_stream(self) -> int:
        return self.conn.get_next_available_stream_id()

    def ping(self, uid: int) -> None:
        self.conn.ping(uid.to_bytes(8, "big"))
        self._touched()

    def admitted(self) -> None:
        self.tunnels_opened += 1
        if self.on_admitted is not None:
            self.on_admitted(self)

    def fail(self, exc: BaseException) -> None:
        if self.on_error is None:
            raise exc
        self.on_error(self, exc)

    def open_tunnel(self, stream_id: int) -> None:
        """An admitted tunnel: its stream gets a tunnel's receive window."""
        try:
            self.conn.increment_flow_control_window(TUNNEL_WINDOW - STREAM_WINDOW, stream_id)
        except (h2.exceptions.ProtocolError, KeyError, ValueError):
            return
        self._touched()

    def accepts_datagrams(self) -> bool:
        return False  # HTTP/2 has no datagrams: DATAGRAM capsules on the stream

    def datagram_room(self, stream_id: int) -> int:
        return 0

    def send_datagram(self, stream_id: int, payload: bytes) -> None:
        raise RuntimeError("HTTP/2 carries no HTTP Datagrams; use DATAGRAM capsules")

    def datagrams_queued(self) -> tuple[int, int]:
        return 0, 0

    def _tcp(self) -> TcpInfo | None:
        if not self._info_valid:
            self._info = self.pipe.info()
            self._info_valid = True
        return self._info

    def stream_acked(self, stream_id: int) -> int | None:
        """Bytes the peer has consumed on the connection (the credit it returned), or,
        from a peer that does not return it per read, acknowledged (TCP)."""
        return self.delivered()

    def stream_backlog(self, stream_id: int) -> int:
        """Everything the peer has not consumed: DATA h2's windows hold back, and what
        h2 has sent (in our TLS buffer, the kernel's, on the way, in the peer's)."""
        on_the_way = self.pipe.unsent + self._unacked()
        if self.credit_timed:
            on_the_way = max(on_the_way, self.data_sent - self.data_consumed)
        return self.pending_bytes + on_the_way

    def _unacked(self) -> int:
        info = self._tcp()
        if info is None:
            return 0
        # tcpi_bytes_acked counts the SYN as one byte.
        return max(0, self.pipe.written - max(0, info.acked - 1))

    def delivered(self) -> int | None:
        if self.credit_timed:
            return self.data_consumed
        info = self._tcp()
        return None if info is None else info.acked

    def in_flight(self) -> int:
        return self._unacked()

    def min_rtt(self) -> float:
        info = self._tcp()
        return info.min_rtt if info is not None and 0.0 < info.min_rtt < 1.0 else 0.0

    def stats(self) -> dict[str, Any]:
        info = self._tcp()
        if info is None:
            return {"rtt_ms": None, "cwnd": None, "bytes_in_flight": None}
        return {
            "rtt_ms": round(info.rtt * 1000, 3),
            "cwnd": info.cwnd,
            "bytes_in_flight": self._unacked(),
        }

    def peer_certificate(self) -> tuple[Any, list[Any]]:
        return self.pipe.peer_certificate()

    def held(self) -> int:
        """Bytes this connection makes us hold beyond the data plane's bound: h2's
        incomplete frame and header block, and output the peer does not read."""
        buffer = self.conn.incoming_buffer
        incomplete = len(buffer._data) + sum(len(f.data) for f in buffer._headers_buffer)
        return incomplete + self.pipe.unsent
