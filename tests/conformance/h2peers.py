"""Strict, independent CONNECT-IP peers over HTTP/2, on h2 directly (no masqued code).

``StrictH2Client`` is an RFC 9484 client over HTTP/2 (RFC 8441 extended CONNECT,
RFC 9297 capsules, packets in DATAGRAM capsules) driven step by step by a test, to
check our relay as a third-party client would. ``StrictH2Proxy`` is a minimal one
whose answers each test scripts, to check our client. Both keep what the peer did
(its SETTINGS, the first frame it sent, headers, capsules, resets, GOAWAY) as state;
the wire codec is tests/conformance/wire.py, written from the RFCs.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

from tests.conformance.wire import (
    DATAGRAM,
    Violation,
    capsule,
    split_capsules,
    split_datagram,
    varint,
)

Headers = list[tuple[bytes, bytes]]
FRAME_SETTINGS = 0x4


@dataclass
class H2Stream:
    headers: list[Headers] = field(default_factory=list)
    data: bytes = b""
    capsules: list[tuple[int, bytes]] = field(default_factory=list)
    reset: int | None = None
    ended: bool = False


class H2Peer:
    """What both peers share: one HTTP/2 connection over TLS, every event recorded."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        conn: h2.connection.H2Connection,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = conn
        self.streams: dict[int, H2Stream] = {}
        self.peer_settings: dict[int, int] | None = None
        self.first_frame_type: int | None = None
        self.goaway: int | None = None  # the error code of the peer's GOAWAY
        self.closed = False  # the TCP connection ended
        self._head = b""
        self.on_request: Callable[[H2Peer, int, Headers], None] | None = None
        # False: never hand flow-control credit back (a peer that stops granting it).
        self.acknowledge = True
        self.task = asyncio.get_running_loop().create_task(self._read())

    def stream(self, sid: int) -> H2Stream:
        return self.streams.setdefault(sid, H2Stream())

    def transmit(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    async def _read(self) -> None:
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    break
                self._note_first_frame(data)
                try:
                    events = self.conn.receive_data(data)
                except h2.exceptions.ProtocolError as exc:
                    raise Violation(f"peer broke HTTP/2: {exc}") from exc
                for event in events:
                    self._event(event)
                self.transmit()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            self.closed = True

    def _note_first_frame(self, data: bytes) -> None:
        if self.first_frame_type is not None:
            return
        self._head += data
        preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        head = self._head[len(preface) :] if self._head.startswith(preface) else self._head
        if len(head) >= 9:
            self.first_frame_type = head[3]

    def _event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RemoteSettingsChanged):
            self.peer_settings = dict(self.conn.remote_settings.items())
        elif isinstance(event, h2.events.RequestReceived):
            self.stream(event.stream_id).headers.append(list(event.headers or []))
            if self.on_request is not None:
                self.on_request(self, event.stream_id, list(event.headers or []))
        elif isinstance(
            event,
            h2.events.ResponseReceived
            | h2.events.InformationalResponseReceived
            | h2.events.TrailersReceived,
        ):
            self.stream(event.stream_id).headers.append(list(event.headers or []))
        elif isinstance(event, h2.events.DataReceived):
            st = self.stream(event.stream_id)
            caps, st.data = split_capsules(st.data + (event.data or b""))
            st.capsules += caps
            if event.flow_controlled_length and self.acknowledge:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            self.stream(event.stream_id).ended = True
        elif isinstance(event, h2.events.StreamReset):
            self.stream(event.stream_id).reset = int(event.error_code or 0)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = int(event.error_code or 0)

    async def wait(self, cond: Callable[[], bool], timeout: float = 5.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not cond():
            if loop.time() > deadline:
                raise AssertionError("condition not reached")
            await asyncio.sleep(0.005)

    def send_raw(self, sid: int, data: bytes, end: bool = False) -> None:
        self.conn.send_data(sid, data, end_stream=end)
        self.transmit()

    def send_capsule(self, sid: int, kind: int, value: bytes, end: bool = False) -> None:
        self.send_raw(sid, capsule(kind, value), end)

    def send_packet(self, sid: int, packet: bytes, context_id: int = 0) -> None:
        """An IP packet as a DATAGRAM capsule (RFC 9297 §3.5, RFC 9484 §6)."""
        self.send_capsule(sid, DATAGRAM, varint(context_id) + packet)

    def send_frame_bytes(self, data: bytes) -> None:
        """Bytes straight onto the connection, past h2 (for malformed frames)."""
        self.writer.write(data)

    def packets(self, sid: int) -> list[tuple[int, bytes]]:
        """(context ID, packet) of every DATAGRAM capsule received on ``sid``."""
        out = []
        for kind, value in self.stream(sid).capsules:
            if kind == DATAGRAM:
                out.append(split_datagram(value))
        return out

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close_connection()
            self.transmit()
            self.writer.close()
            await asyncio.wait_for(self.writer.wait_closed(), 2)
        self.task.cancel()
        with contextlib.suppress(BaseException):
            await self.task


def client_tls(ca: str, alpn: tuple[str, ...] = ("h2",)) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca)
    ctx.set_alpn_protocols(list(alpn))
    return ctx


class StrictH2Client(H2Peer):
    """An RFC 9484 client over HTTP/2."""

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        ca: str,
        server_name: str = "relay.example",
        window: int = 1 << 20,
        certificate: str | None = None,
        key: str | None = None,
    ) -> StrictH2Client:
        tls_context = client_tls(ca)
        if certificate is not None:
            tls_context.load_cert_chain(certificate, key)
        reader, writer = await asyncio.open_connection(
            host, port, ssl=tls_context, server_hostname=server_name
        )
        tls = writer.get_extra_info("ssl_object")
        if tls.selected_alpn_protocol() != "h2":
            raise Violation("relay did not select ALPN h2 (RFC 9113 §3.2)")
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        conn.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window,
            },
        )
        conn.initiate_connection()
        if window > 65535:
            conn.increment_flow_control_window(4 * window)
        peer = cls(reader, writer, conn)
        peer.transmit()
        return peer

    def connect_ip(
        self,
        path: str = "/.well-known/masque/ip/*/*/",
        extra: Headers | None = None,
        capsule_protocol: bool = True,
        protocol: bytes = b"connect-ip",
    ) -> int:
        """Send the extended CONNECT; RFC 8441 §4 allows it only after the peer's
        SETTINGS_ENABLE_CONNECT_PROTOCOL = 1."""
        settings = self.peer_settings or {}
        if settings.get(h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL) != 1:
            raise Violation("relay did not send SETTINGS_ENABLE_CONNECT_PROTOCOL = 1")
        sid = self.conn.get_next_available_stream_id()
        headers: Headers = [
            (b":method", b"CONNECT"),
            (b":protocol", protocol),
            (b":scheme", b"https"),
            (b":authority", b"relay.example"),
            (b":path", path.encode()),
        ]
        if capsule_protocol:
            headers.append((b"capsule-protocol", b"?1"))
        headers += extra or []
        self.conn.send_headers(sid, headers, end_stream=False)
        self.stream(sid)
        self.transmit()
        return sid


def server_tls(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["h2"])
    return ctx


class StrictH2Proxy:
    """A proxy: each connection is an H2Peer; ``script(peer, stream_id, headers)``
    answers every request. ``extended_connect = False`` leaves out
    SETTINGS_ENABLE_CONNECT_PROTOCOL (a proxy that cannot take CONNECT-IP)."""

    def __init__(
        self,
        script: Callable[[H2Peer, int, Headers], None],
        extended_connect: bool = True,
    ) -> None:
        self.script = script
        self.extended_connect = extended_connect
        self.peers: list[H2Peer] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self, cert: str, key: str) -> None:
        self.server = await asyncio.start_server(
            self._accepted, "127.0.0.1", 0, ssl=server_tls(cert, key)
        )
        self.port = self.server.sockets[0].getsockname()[1]

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        values: dict[h2.settings.SettingCodes, int] = {
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 10,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20,
        }
        if self.extended_connect:
            values[h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL] = 1
        conn.local_settings = h2.settings.Settings(client=False, initial_values=values)
        conn.initiate_connection()
        conn.increment_flow_control_window(4 << 20)
        peer = H2Peer(reader, writer, conn)
        peer.on_request = self._request
        peer.transmit()
        self.peers.append(peer)

    def _request(self, peer: H2Peer, sid: int, headers: Headers) -> None:
        self.script(peer, sid, headers)
        peer.transmit()

    async def close(self) -> None:
        for peer in self.peers:
            await peer.close()
        if self.server is not None:
            self.server.close()


def respond(peer: H2Peer, sid: int, status: int, headers: Headers | None = None) -> None:
    peer.conn.send_headers(
        sid, [(b":status", str(status).encode()), *(headers or [])], end_stream=status >= 300
    )
    peer.transmit()
