"""Strict, independent CONNECT-IP peers on raw aioquic (no masqued transport code).

``StrictClient`` is an RFC 9484 client driven step by step by a test, to check our
relay as a third-party client would. ``StrictProxy`` is a minimal RFC 9484 proxy
whose behaviour each test scripts, to check our client as a third-party proxy would.
Both record everything the peer did (SETTINGS, headers, capsules, datagrams, resets)
so tests assert on state, not on call lists.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DatagramReceived, DataReceived, H3Event, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import QuicEvent, StreamReset

from tests.conformance.wire import (
    ENABLE_CONNECT_PROTOCOL,
    H3_DATAGRAM_SETTING,
    capsule,
    split_capsules,
    varint,
)

Headers = list[tuple[bytes, bytes]]


class SettingsH3(H3Connection):
    """H3 with a chosen SETTINGS_H3_DATAGRAM / ENABLE_CONNECT_PROTOCOL."""

    datagrams = True
    extended_connect = True

    def _get_local_settings(self) -> dict[int, int]:
        settings = super()._get_local_settings()
        if self.datagrams:
            settings[H3_DATAGRAM_SETTING] = 1
        else:
            settings.pop(H3_DATAGRAM_SETTING, None)
        if not self.extended_connect:
            settings.pop(ENABLE_CONNECT_PROTOCOL, None)
        return settings


@dataclass
class StreamState:
    headers: list[Headers] = field(default_factory=list)
    data: bytes = b""
    capsules: list[tuple[int, bytes]] = field(default_factory=list)
    datagrams: list[bytes] = field(default_factory=list)
    reset: int | None = None
    ended: bool = False


class Peer(QuicConnectionProtocol):
    """Shared event recording for both peers."""

    datagrams = True
    extended_connect = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        h3 = SettingsH3.__new__(SettingsH3)
        h3.datagrams = self.datagrams
        h3.extended_connect = self.extended_connect
        SettingsH3.__init__(h3, self._quic)
        self.h3 = h3
        self.streams: dict[int, StreamState] = {}
        self.changed = asyncio.Event()
        self.on_event: Callable[[Peer, H3Event], None] | None = None

    def stream(self, sid: int) -> StreamState:
        return self.streams.setdefault(sid, StreamState())

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamReset):
            self.stream(event.stream_id).reset = event.error_code
        for ev in self.h3.handle_event(event):
            if isinstance(ev, HeadersReceived):
                self.stream(ev.stream_id).headers.append(ev.headers)
                if ev.stream_ended:
                    self.stream(ev.stream_id).ended = True
            elif isinstance(ev, DataReceived):
                st = self.stream(ev.stream_id)
                caps, st.data = split_capsules(st.data + ev.data)
                st.capsules += caps
                st.ended = st.ended or ev.stream_ended
            elif isinstance(ev, DatagramReceived):
                self.stream(ev.stream_id).datagrams.append(ev.data)
            if self.on_event is not None:
                self.on_event(self, ev)
        self.changed.set()

    async def wait(self, cond: Callable[[], bool], timeout: float = 5.0) -> None:
        """Poll ``cond`` (state may change on either side of the connection)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not cond():
            if loop.time() > deadline:
                raise AssertionError("condition not reached")
            await asyncio.sleep(0.005)

    def send_capsule(self, sid: int, kind: int, value: bytes, end: bool = False) -> None:
        self.h3.send_data(sid, capsule(kind, value), end_stream=end)
        self.transmit()

    def send_raw(self, sid: int, data: bytes, end: bool = False) -> None:
        self.h3.send_data(sid, data, end_stream=end)
        self.transmit()

    def send_datagram(self, sid: int, payload: bytes) -> None:
        self.h3.send_datagram(sid, payload)
        self.transmit()

    def send_packet(self, sid: int, packet: bytes, context_id: int = 0) -> None:
        self.send_datagram(sid, varint(context_id) + packet)

    def peer_settings(self) -> dict[int, int] | None:
        return self.h3.received_settings

    def close_quietly(self) -> None:
        with contextlib.suppress(Exception):
            self._quic.close()
            self.transmit()


class StrictClient(Peer):
    """A client; set ``datagrams = False`` on a subclass to not offer H3 datagrams."""

    def connect_ip(
        self,
        path: str = "/.well-known/masque/ip/*/*/",
        extra: Headers | None = None,
        capsule_protocol: bool = True,
    ) -> int:
        sid = self._quic.get_next_available_stream_id()
        headers: Headers = [
            (b":method", b"CONNECT"),
            (b":protocol", b"connect-ip"),
            (b":scheme", b"https"),
            (b":authority", b"relay.example"),
            (b":path", path.encode()),
        ]
        if capsule_protocol:
            headers.append((b"capsule-protocol", b"?1"))
        headers += extra or []
        self.h3.send_headers(sid, headers, end_stream=False)
        self.stream(sid)
        self.transmit()
        return sid


class NoDatagramClient(StrictClient):
    datagrams = False


def client_config(ca: str, datagrams: bool = True) -> QuicConfiguration:
    config = QuicConfiguration(alpn_protocols=H3_ALPN, is_client=True, server_name="relay.example")
    config.load_verify_locations(cafile=ca)
    if datagrams:
        config.max_datagram_frame_size = 65536
    config.max_datagram_size = 1452
    return config


def server_config(cert: str, key: str, datagrams: bool = True) -> QuicConfiguration:
    config = QuicConfiguration(alpn_protocols=H3_ALPN, is_client=False)
    config.load_cert_chain(cert, key)
    if datagrams:
        config.max_datagram_frame_size = 65536
    config.max_datagram_size = 1452
    return config


class StrictProxy(Peer):
    """A proxy: every request and capsule is recorded; ``script`` answers them.

    ``script(proxy, stream_id, headers)`` runs for each request's HEADERS and sends
    the response (and capsules) itself.
    """

    script: Callable[[StrictProxy, int, Headers], None] | None = None
    instances: list[StrictProxy] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        type(self).instances.append(self)
        self.on_event = self._dispatch

    def _dispatch(self, peer: Peer, ev: H3Event) -> None:
        if isinstance(ev, HeadersReceived) and self.script is not None:
            type(self).script(self, ev.stream_id, ev.headers)  # type: ignore[misc]
            self.transmit()

    def respond(self, sid: int, status: int, headers: Headers | None = None) -> None:
        self.h3.send_headers(
            sid, [(b":status", str(status).encode()), *(headers or [])], end_stream=status >= 300
        )
        self.transmit()
