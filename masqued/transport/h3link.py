"""HTTP/3 as a tunnel link: one QUIC connection and its HTTP/3 layer, through the seam.

``H3Link`` implements masqued.transport.link.Link on a QUIC engine (a seam module,
masqued.transport.engines: aioquic or qh3): it feeds received datagrams to the connection,
hands the resulting events to a TunnelHandler, keeps the connection's timer, and
flushes what the connection queued. The relay's endpoint and the client each own
their links; nothing here decides anything about tunnels.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from typing import Any

from masqued.transport import engines
from masqued.transport.link import Headers, TunnelHandler, format_addr
from masqued.transport.udp import Address


def monotonic() -> float:
    """The clock given to the QUIC engine (precise, unlike a cached loop time)."""
    return time.monotonic()


class H3Link:
    """One HTTP/3 connection carrying CONNECT-IP tunnels."""

    http_version = "h3"

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        quic: engines.Connection,
        send: Callable[[Iterable[tuple[bytes, Address]]], None],
        handler: TunnelHandler,
        peer_addr: Address,
        engine: engines.Engine | None = None,
    ) -> None:
        self.loop = loop
        # The seam module ``quic`` belongs to (its GuardedConnection).
        self.engine = engine = engine or engines.load()
        self.quic = quic
        self.h3 = engine.TunnelH3(quic)
        self._send = send
        self.handler = handler
        self.peer_addr = peer_addr
        self.peer = format_addr(peer_addr)
        self.closed = False
        self.created = monotonic()
        self.handshake_done = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        # Set by the owner: connection IDs issued/retired (the relay's CID registry),
        # what the peer makes us hold (the relay's ledger), a failure inside the link.
        self.on_cid: Callable[[bytes, bool], None] | None = None
        self.on_held: Callable[[H3Link, int], None] | None = None
        self.on_error: Callable[[H3Link, BaseException], None] | None = None
        # Something was queued: the owner flushes the link at the end of its batch.
        self.on_touch: Callable[[H3Link], None] | None = None
        self.on_admitted: Callable[[H3Link], None] | None = None

    # -- input ----------------------------------------------------------------------

    def receive(self, data: bytes, addr: Address, now: float) -> None:
        self.quic.receive_datagram(data, addr, now)

    def receive_batch(self, batch: list[tuple[bytes, Address]], now: float) -> None:
        """Datagrams of one UDP batch for this connection, in order."""
        self.quic.receive_datagrams(batch, now)

    def process(self) -> None:
        """Hand what the connection received to the handler."""
        self.engine.pump(self.quic, self.h3, self)

    # engines.EventSink

    @property
    def stopped(self) -> bool:
        return self.closed

    def handshake_completed(self) -> None:
        self.handshake_done = True

    def cid_issued(self, cid: bytes) -> None:
        if self.on_cid is not None:
            self.on_cid(cid, True)

    def cid_retired(self, cid: bytes) -> None:
        if self.on_cid is not None:
            self.on_cid(cid, False)

    def terminated(self, code: int, reason: str) -> None:
        self.closed = True
        self.cancel_timer()
        self.handler.link_closed(self, code, reason)

    def stream_reset(self, stream_id: int, code: int) -> None:
        self.handler.link_reset(self, stream_id, code)

    def headers_received(self, stream_id: int, headers: Headers, ended: bool) -> None:
        self.handler.link_headers(self, stream_id, headers, ended)

    def data_received(self, stream_id: int, data: bytes, ended: bool) -> None:
        self.handler.link_data(self, stream_id, data, ended)

    def datagram_received(self, stream_id: int, data: bytes) -> None:
        self.handler.link_datagram(self, stream_id, data)

    # -- output -----------------------------------------------------------------------

    def flush(self) -> None:
        """Grant receive credit, account what the peer makes us hold, send, re-arm."""
        held = self.quic.settle(self.engine.h3_held(self.h3))
        if self.on_held is not None:
            self.on_held(self, held)
        self._send(self.quic.datagrams_to_send(now=monotonic()))
        self._arm_timer()

    def _touched(self) -> None:
        if self.on_touch is not None:
            self.on_touch(self)

    def send_headers(self, stream_id: int, headers: Headers, end: bool = False) -> None:
        self.h3.send_headers(stream_id, headers, end_stream=end)
        self._touched()

    def send_data(self, stream_id: int, data: bytes, end: bool = False) -> None:
        self.h3.send_data(stream_id, data, end_stream=end)
        self._touched()

    def send_datagram(self, stream_id: int, payload: bytes) -> None:
        self.h3.send_datagram(stream_id, payload)
        self._touched()

    def abort(self, stream_id: int, code: int) -> None:
        # Either half may already be finished; that is fine.
        with contextlib.suppress(Exception):
            self.quic.reset_stream(stream_id, code)
        with contextlib.suppress(Exception):
            self.quic.stop_stream(stream_id, code)
        self._touched()

    def close(self, code: int, reason: str) -> None:
        self.quic.close(error_code=code, reason_phrase=reason[:64])
        self._touched()

    def admitted(self) -> None:
        """A tunnel was admitted on this connection (it has earned its keep)."""
        if self.on_admitted is not None:
            self.on_admitted(self)

    def fail(self, exc: BaseException) -> None:
        """A bug met while serving this connection: its owner ends it."""
        if self.on_error is None:
            raise exc
        self.on_error(self, exc)

    def new_stream(self) -> int:
        return self.quic.get_next_available_stream_id()

    def ping(self, uid: int) -> None:
        self.quic.send_ping(uid)

    # -- timer -----------------------------------------------------------------------

    def _arm_timer(self) -> None:
        at = self.quic.get_timer()
        if at == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = at
        if at is not None:
            self._timer = self.loop.call_later(max(0.0, at - monotonic()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        try:
            self.quic.handle_timer(now=monotonic())
            self.process()
            if not self.closed:
                self.flush()
        except Exception as exc:
            if self.on_error is None:
                raise
            self.on_error(self, exc)

    def cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = None

    # -- state ------------------------------------------------------------------------

    def settings(self) -> tuple[bool, bool] | None:
        """(extended CONNECT, HTTP/3 datagrams) from the peer's SETTINGS, None before."""
        return self.engine.peer_settings(self.h3)

    def open_tunnel(self, stream_id: int) -> None:
        self.quic.open_tunnel(stream_id)

    def accepts_datagrams(self) -> bool:
        return self.engine.peer_accepts_datagrams(self.h3, self.quic)

    def datagram_room(self, stream_id: int) -> int:
        return self.engine.datagram_room(self.quic, stream_id)

    def datagrams_queued(self) -> tuple[int, int]:
        return self.engine.datagrams_queued(self.quic)

    def stream_acked(self, stream_id: int) -> int | None:
        return self.engine.stream_acked(self.quic, stream_id)

    def stream_backlog(self, stream_id: int) -> int:
        return self.engine.stream_backlog(self.quic, stream_id)

    def delivered(self) -> int | None:
        return self.engine.delivered_bytes(self.quic)

    def in_flight(self) -> int:
        return self.engine.bytes_in_flight(self.quic)

    def min_rtt(self) -> float:
        return self.engine.min_rtt(self.quic)

    def stats(self) -> dict[str, Any]:
        quic = self.quic
        return {
            "rtt_ms": self.engine.rtt_ms(quic),
            "cwnd": self.engine.congestion_window(quic),
            "bytes_in_flight": self.engine.bytes_in_flight(quic),
        }

    def peer_certificate(self) -> tuple[Any, list[Any]]:
        return self.engine.peer_certificate(self.quic)

    def local_close_code(self) -> int | None:
        return self.quic.local_close_code()

    def exceeded(self) -> str | None:
        return self.quic.exceeded
