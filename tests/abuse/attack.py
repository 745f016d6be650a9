"""Hostile QUIC and HTTP/2 peers for the abuse suite: what an unauthenticated attacker
can send.

Each attack drives a real relay over real UDP, from aioquic's own client machinery
(so handshakes and packet protection are genuine) plus frames written by hand where a
well-behaved client would never send them. They run in the test's event loop, or as
``python -m tests.abuse.attack NAME ...`` from an attacker namespace.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime as dt
import json
import os
import random
import socket
import ssl
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aioquic.buffer import encode_uint_var
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.crypto import CryptoPair
from aioquic.quic.events import ConnectionTerminated, HandshakeCompleted, StreamReset
from aioquic.quic.packet import QuicFrameType, QuicPacketType, QuicProtocolVersion
from aioquic.quic.packet_builder import QuicPacketBuilder, QuicPacketBuilderStop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID, NameOID

Address = tuple[str, int]


class RawFrameConnection(QuicConnection):
    """A client QuicConnection that also puts hand-written frames in its 1-RTT packets.

    ``raw`` holds whole frames (a one-byte frame type, then the frame's fields).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.raw: collections.deque[bytes] = collections.deque()

    def _write_connection_limits(self, builder: Any, space: Any) -> None:
        while self.raw:
            frame = self.raw[0]
            try:
                buf = builder.start_frame(frame[0], capacity=len(frame))
            except QuicPacketBuilderStop:
                break
            buf.push_bytes(frame[1:])
            self.raw.popleft()
        super()._write_connection_limits(builder, space)


def stream_frame(stream_id: int, offset: int, data: bytes, fin: bool = False) -> bytes:
    """A STREAM frame with offset and length fields (RFC 9000 §19.8)."""
    kind = 0x08 | 0x04 | 0x02 | (0x01 if fin else 0)
    return (
        bytes((kind,))
        + encode_uint_var(stream_id)
        + encode_uint_var(offset)
        + encode_uint_var(len(data))
        + data
    )


@dataclass
class Peer:
    """A QUIC connection driven over its own UDP socket in the running event loop."""

    quic: QuicConnection
    sock: socket.socket
    addr: Address
    terminated: ConnectionTerminated | None = None
    handshake: bool = False
    _timer: asyncio.TimerHandle | None = None
    events: list[Any] = field(default_factory=list)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.sock.fileno(), self._readable)
        self.quic.connect(self.addr, now=time.monotonic())
        self.transmit()

    def _readable(self) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            self.quic.receive_datagram(data, addr, now=time.monotonic())
        self._events()
        self.transmit()

    def _events(self) -> None:
        while (event := self.quic.next_event()) is not None:
            if isinstance(event, HandshakeCompleted):
                self.handshake = True
            elif isinstance(event, ConnectionTerminated):
                self.terminated = event
            self.events.append(event)

    def transmit(self) -> None:
        for data, addr in self.quic.datagrams_to_send(now=time.monotonic()):
            with contextlib.suppress(OSError):
                self.sock.sendto(data, addr)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        at = self.quic.get_timer()
        if at is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(max(0.0, at - time.monotonic()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.quic.handle_timer(now=time.monotonic())
        self._events()
        self.transmit()

    async def wait(self, cond: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.sock.fileno())
        self.sock.close()


def client_config(
    server_name: str,
    ca: str | None,
    certificate: str | None = None,
    private_key: str | None = None,
) -> QuicConfiguration:
    config = QuicConfiguration(
        alpn_protocols=H3_ALPN,
        is_client=True,
        server_name=server_name,
        max_datagram_frame_size=65535,
        idle_timeout=30.0,
    )
    if ca is not None:
        config.load_verify_locations(cafile=ca)
    else:
        config.verify_mode = ssl.CERT_NONE  # an attacker does not care who answers
    if certificate is not None:
        config.load_cert_chain(certificate, private_key)
    return config


def _socket(addr: Address, source: str | None = None) -> socket.socket:
    family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    if source is not None:
        sock.bind((source, 0))
    sock.setblocking(False)
    return sock


async def connected(addr: Address, config: QuicConfiguration, timeout: float = 5.0) -> Peer:
    """A RawFrameConnection with a completed handshake (raises if none in time)."""
    peer = Peer(RawFrameConnection(configuration=config), _socket(addr), addr)
    peer.start()
    if not await peer.wait(lambda: peer.handshake or peer.terminated is not None, timeout):
        peer.close()
        raise TimeoutError("no handshake")
    if not peer.handshake:
        peer.close()
        raise ConnectionError(f"relay closed the connection: {peer.terminated}")
    return peer


@dataclass
class GapFloodResult:
    rounds: int
    bytes_sent: int  # frame payload bytes the attacker sent
    claimed: int  # highest offsets summed: what a zero-filling receiver allocates
    terminated: int | None  # the relay's close code, if it closed the connection


async def gap_flood(
    peer: Peer, streams: int, rounds: int, rtt_wait: float = 0.05
) -> GapFloodResult:
    """1-byte STREAM frames at the far end of every stream's and the connection's
    credit, on ``streams`` bidirectional streams, for ``rounds`` round trips: a
    receiver that zero-fills to the highest offset and grows windows from it holds
    the sum of those offsets."""
    quic = peer.quic
    assert isinstance(quic, RawFrameConnection)
    opened: list[Any] = []
    for _ in range(streams):
        sid = quic.get_next_available_stream_id()
        opened.append(quic._get_or_create_stream_for_send(sid))
    highest = dict.fromkeys((s.stream_id for s in opened), 0)
    sent = 0
    done = 0
    for _ in range(rounds):
        if peer.terminated is not None:
            break
        room = quic._remote_max_data - sum(highest.values())
        for stream in opened:
            if room <= 0:
                break
            credit = stream.max_stream_data_remote
            end = min(credit, highest[stream.stream_id] + room)
            if end <= highest[stream.stream_id]:
                continue
            quic.raw.append(stream_frame(stream.stream_id, end - 1, b"\0"))
            room -= end - highest[stream.stream_id]
            highest[stream.stream_id] = end
            sent += 1
        peer.transmit()
        done += 1
        await asyncio.sleep(rtt_wait)
    code = peer.terminated.error_code if peer.terminated is not None else None
    return GapFloodResult(done, sent, sum(highest.values()), code)


async def many_streams(peer: Peer, streams: int) -> int | None:
    """Open ``streams`` request streams with a byte each; the relay's close code."""
    quic = peer.quic
    assert isinstance(quic, RawFrameConnection)
    for i in range(streams):
        quic.raw.append(stream_frame(4 * i, 0, b"\x01"))
    peer.transmit()
    await peer.wait(lambda: peer.terminated is not None, 2.0)
    return peer.terminated.error_code if peer.terminated is not None else None


async def incomplete_headers(peer: Peer, claimed: int, send: int, chunk: int = 1000) -> int | None:
    """A request stream whose HEADERS frame claims ``claimed`` bytes, of which ``send``
    arrive in order (so QUIC delivers them): HTTP/3 keeps them until the frame is
    whole. Returns the relay's close code."""
    quic = peer.quic
    assert isinstance(quic, RawFrameConnection)
    sid = quic.get_next_available_stream_id()
    stream = quic._get_or_create_stream_for_send(sid)
    header = encode_uint_var(0x01) + encode_uint_var(claimed)
    offset = 0
    quic.raw.append(stream_frame(sid, 0, header))
    offset = len(header)
    while offset - len(header) < send and peer.terminated is None:
        credit = min(stream.max_stream_data_remote, quic._remote_max_data)
        if offset >= credit:
            await asyncio.sleep(0.02)  # wait for credit (MAX_STREAM_DATA / MAX_DATA)
            if offset >= min(stream.max_stream_data_remote, quic._remote_max_data):
                break
            continue
        n = min(chunk, credit - offset)
        quic.raw.append(stream_frame(sid, offset, b"\0" * n))
        offset += n
        peer.transmit()
        await asyncio.sleep(0)
    await peer.wait(lambda: peer.terminated is not None, 2.0)
    return peer.terminated.error_code if peer.terminated is not None else None


def crypto_initial(
    dcid: bytes, scid: bytes, offset: int, data: bytes, packet_number: int = 0
) -> bytes:
    """A client Initial (padded to 1200 bytes) carrying one CRYPTO frame."""
    crypto = CryptoPair()
    version = QuicProtocolVersion.VERSION_1
    crypto.setup_initial(cid=dcid, is_client=True, version=version)
    builder = QuicPacketBuilder(
        host_cid=scid,
        peer_cid=dcid,
        version=version,
        is_client=True,
        max_datagram_size=1200,
        packet_number=packet_number,
    )
    builder.start_packet(QuicPacketType.INITIAL, crypto)
    buf = builder.start_frame(QuicFrameType.CRYPTO, capacity=len(data) + 16)
    buf.push_uint_var(offset)
    buf.push_uint_var(len(data))
    buf.push_bytes(data)
    datagrams, _ = builder.flush()
    return b"".join(datagrams)


async def huge_client_hello(addr: Address, total: int, source: str | None = None) -> int:
    """Initials whose CRYPTO stream starts a ClientHello claiming 16 MiB, continued
    for ``total`` bytes; returns how many datagrams were sent (the relay may stop
    answering at any point: nothing comes back that we need)."""
    dcid, scid = os.urandom(8), os.urandom(8)
    sock = _socket(addr, source)
    chunk = 1000
    first = bytes((1,)) + (0xFFFFFF).to_bytes(3, "big")
    sent = 0
    offset = 0
    try:
        while offset < total:
            data = first + os.urandom(chunk - len(first)) if offset == 0 else os.urandom(chunk)
            try:
                sock.sendto(crypto_initial(dcid, scid, offset, data, sent), addr)
            except BlockingIOError:
                await asyncio.sleep(0.001)
                continue
            offset += len(data)
            sent += 1
            if sent % 32 == 0:
                await asyncio.sleep(0.001)
    finally:
        sock.close()
    return sent


def client_hellos(server_name: str, count: int) -> list[bytes]:
    """``count`` genuine first Initials (each a new connection with its own DCID)."""
    out = []
    config = QuicConfiguration(alpn_protocols=H3_ALPN, is_client=True, server_name=server_name)
    for _ in range(count):
        quic = QuicConnection(configuration=config)
        quic.connect(("0.0.0.0", 0), now=time.monotonic())
        out.append(b"".join(d for d, _ in quic.datagrams_to_send(now=time.monotonic())))
    return out


@dataclass
class FloodResult:
    sent: int
    replies: int
    retries: int  # replies that were Retry packets


async def initial_flood(
    addr: Address, hellos: list[bytes], sources: list[str], listen: float = 0.3
) -> FloodResult:
    """Send every Initial of ``hellos`` from sources round-robin (each a local address
    the attacker never completes a handshake from), count what came back."""
    socks = [_socket(addr, s) for s in sources]
    replies = retries = 0
    try:
        for i, hello in enumerate(hellos):
            with contextlib.suppress(OSError):
                socks[i % len(socks)].sendto(hello, addr)
            if i % 16 == 15:
                await asyncio.sleep(0.001)
        deadline = time.monotonic() + listen
        while time.monotonic() < deadline:
            got = False
            for sock in socks:
                try:
                    data, _ = sock.recvfrom(65535)
                except (BlockingIOError, InterruptedError):
                    continue
                got = True
                replies += 1
                # Long header, type bits 11 = Retry (RFC 9000 §17.2.5).
                if data and data[0] & 0xF0 == 0xF0:
                    retries += 1
            if not got:
                await asyncio.sleep(0.005)
    finally:
        for sock in socks:
            sock.close()
    return FloodResult(len(hellos), replies, retries)


def raw_spoofed_initials(
    dest: Address, hellos: list[bytes], source_net: str, source_port: int = 40000
) -> int:
    """Send Initials with forged IPv4 source addresses (raw socket, IP_HDRINCL) drawn
    from ``source_net``: replies go to addresses nobody holds. Returns the count."""
    import ipaddress

    net = ipaddress.ip_network(source_net)
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
    dst = socket.inet_aton(dest[0])
    sent = 0
    try:
        for hello in hellos:
            src_ip = net[random.randrange(1, net.num_addresses - 1)]
            src = src_ip.packed
            udp_len = 8 + len(hello)
            udp = struct.pack("!HHHH", source_port + sent % 1000, dest[1], udp_len, 0) + hello
            ip = struct.pack(
                "!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, sent & 0xFFFF, 0, 64, 17, 0, src, dst
            )
            sock.sendto(ip + udp, (dest[0], 0))
            sent += 1
    finally:
        sock.close()
    return sent


class _H3(H3Connection):
    """HTTP/3 with SETTINGS_H3_DATAGRAM, as a datagram-mode CONNECT-IP client sends."""

    def _get_local_settings(self) -> dict[int, int]:
        settings = super()._get_local_settings()
        settings[0x33] = 1
        return settings


def _capsule(kind: int, value: bytes) -> bytes:
    return encode_uint_var(kind) + encode_uint_var(len(value)) + value


def fuzz_capsules(rng: random.Random) -> bytes:
    """One case: what a lying client writes on its tunnel stream after the 2xx."""
    kind = rng.randrange(8)
    if kind == 0:  # random bytes
        return rng.randbytes(rng.randrange(1, 3000))
    if kind == 1:  # a capsule that claims far more than the relay accepts
        return encode_uint_var(rng.choice((1, 2, 3))) + encode_uint_var(1 << 30) + b"\0" * 2000
    if kind == 2:  # a huge unknown capsule (skipped, must not be buffered whole)
        return (
            encode_uint_var(0x1F00 + rng.randrange(100))
            + encode_uint_var(1 << 24)
            + (rng.randbytes(4000))
        )
    if kind == 3:  # ADDRESS_REQUEST with many entries, some malformed
        body = b"".join(
            encode_uint_var(rng.randrange(1, 1 << 20))
            + bytes((rng.choice((4, 6, 5)),))
            + rng.randbytes(4)
            + bytes((rng.randrange(40),))
            for _ in range(rng.randrange(1, 400))
        )
        return _capsule(2, body)
    if kind == 4:  # ROUTE_ADVERTISEMENT, random ranges (order and overlap wrong)
        body = b"".join(
            bytes((4,)) + rng.randbytes(4) + rng.randbytes(4) + bytes((rng.randrange(256),))
            for _ in range(rng.randrange(1, 300))
        )
        return _capsule(3, body)
    if kind == 5:  # DATAGRAM capsules: bad context IDs, oversized and junk packets
        return b"".join(
            _capsule(0, encode_uint_var(rng.choice((0, 0, 1, 77))) + rng.randbytes(n))
            for n in (rng.choice((0, 20, 1300, 1400, 9000)) for _ in range(rng.randrange(1, 8)))
        )
    if kind == 6:  # ADDRESS_ASSIGN from the client
        return _capsule(1, rng.randbytes(rng.randrange(0, 200)))
    return _capsule(rng.randrange(1 << 16), rng.randbytes(rng.randrange(0, 500)))


async def _pump(
    peer: Peer, handle: Callable[[], None], done: Callable[[], bool], timeout: float
) -> None:
    """Handle the peer's events until ``done()``, the connection ends, or ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        handle()
        if done() or peer.terminated is not None:
            return
        await asyncio.sleep(0.005)


@dataclass
class FuzzResult:
    tunnels: int = 0  # CONNECTs answered 2xx
    refused: int = 0  # answered otherwise
    aborted: int = 0  # tunnels the relay reset after our input
    survived: int = 0  # tunnels still open when we moved on


async def capsule_fuzz(
    addr: Address, config: QuicConfiguration, token: str, cases: int, seed: int
) -> FuzzResult:
    """``cases`` datagram-mode tunnels, each fed one fuzz case after its 2xx."""
    rng = random.Random(seed)
    result = FuzzResult()
    peer: Peer | None = None
    h3: _H3 | None = None
    responses: dict[int, int] = {}
    resets: set[int] = set()

    def on_events() -> None:
        assert h3 is not None and peer is not None
        for event in peer.events:
            if isinstance(event, StreamReset):
                resets.add(event.stream_id)
            for h3_event in h3.handle_event(event):
                if isinstance(h3_event, HeadersReceived):
                    status = dict(h3_event.headers).get(b":status", b"0")
                    responses[h3_event.stream_id] = int(status or b"0")
        peer.events.clear()

    try:
        for case in range(cases):
            if peer is None or peer.terminated is not None or case % 3 == 0:
                if peer is not None:
                    peer.close()
                peer = await connected(addr, config)
                h3 = _H3(peer.quic)
                peer.transmit()
            assert h3 is not None
            sid = peer.quic.get_next_available_stream_id()
            h3.send_headers(
                sid,
                [
                    (b":method", b"CONNECT"),
                    (b":protocol", b"connect-ip"),
                    (b":scheme", b"https"),
                    (b":authority", b"relay.example:4433"),
                    (b":path", b"/.well-known/masque/ip/*/*/"),
                    (b"capsule-protocol", b"?1"),
                    (b"authorization", b"Bearer " + token.encode()),
                ],
            )
            peer.transmit()
            await _pump(peer, on_events, lambda s=sid: s in responses, 5.0)
            status = responses.get(sid, 0)
            if not 200 <= status < 300:
                result.refused += 1
                continue
            result.tunnels += 1
            with contextlib.suppress(Exception):  # the relay may have reset it already
                h3.send_data(sid, fuzz_capsules(rng), end_stream=False)
            peer.transmit()
            await _pump(peer, on_events, lambda s=sid: s in resets, 0.3)
            if sid in resets:
                result.aborted += 1
            else:
                result.survived += 1
    finally:
        if peer is not None:
            peer.close()
    return result


def malformed_eku_certificate(d: Path) -> Path:
    """A self-signed client certificate whose ExtendedKeyUsage holds bytes 01 02 03:
    TLS accepts it (it only checks the key), cryptography cannot parse the extension."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mallory")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.UnrecognizedExtension(ExtensionOID.EXTENDED_KEY_USAGE, b"\x01\x02\x03"),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    (d / "mallory.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "mallory.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return d / "mallory.pem"


# -- HTTP/2 over TLS over TCP --------------------------------------------------------------

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def h2_frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    """One HTTP/2 frame (RFC 9113 §4.1), however wrong."""
    header = len(payload).to_bytes(3, "big") + bytes((kind, flags))
    return header + stream_id.to_bytes(4, "big") + payload


def malformed_h2(rng: random.Random, i: int) -> bytes:
    """The ``i``-th hostile thing to send after a valid preface: frames RFC 9113 says
    are connection errors, and random garbage."""
    fixed = [
        h2_frame(0x0, 0, 0, b"data on stream 0"),
        h2_frame(0x4, 0, 0, b"\x00\x04\x80\x00\x00\x00"),  # window above 2^31-1
        h2_frame(0x4, 0, 0, b"\x00\x05"),  # SETTINGS not a multiple of 6
        h2_frame(0x1, 0x4, 1, b"\xff\xff\xff\xff"),  # HPACK garbage
        h2_frame(0x0, 0, 1, b"x" * 20000),  # above SETTINGS_MAX_FRAME_SIZE
        h2_frame(0x9, 0x4, 1, b""),  # CONTINUATION without HEADERS
        h2_frame(0x8, 0, 0, b"\x00\x00\x00\x00"),  # WINDOW_UPDATE of 0
        h2_frame(0x6, 0, 0, b"short"),  # PING of 5 bytes
        h2_frame(0x3, 0, 0, b"\x00\x00\x00\x08"),  # RST_STREAM on stream 0
    ]
    if i % 2 == 0:
        return fixed[(i // 2) % len(fixed)]
    return bytes(rng.getrandbits(8) for _ in range(rng.randrange(9, 4000)))


def _h2_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # an attacker does not care who answers
    ctx.set_alpn_protocols(["h2"])
    return ctx


def _goaway_code(data: bytes) -> int | None:
    """The error code of the first GOAWAY among the frames in ``data``."""
    pos = 0
    while pos + 9 <= len(data):
        length = int.from_bytes(data[pos : pos + 3], "big")
        kind = data[pos + 3]
        if kind == 0x7 and pos + 9 + 8 <= len(data):
            return int.from_bytes(data[pos + 13 : pos + 17], "big")
        pos += 9 + length
    return None


async def h2_malformed(addr: Address, count: int, seed: int) -> dict[str, Any]:
    """``count`` TLS connections, each sending a valid preface and then one malformed
    frame or garbage; what the relay answered (GOAWAY code, or just a close)."""
    rng = random.Random(seed)
    codes: collections.Counter[str] = collections.Counter()
    # A few at a time: past 32 waiting connections per address the relay refuses.
    gate = asyncio.Semaphore(8)

    async def one(i: int) -> None:
        async with gate:
            await attempt(i)

    async def attempt(i: int) -> None:
        try:
            reader, writer = await asyncio.open_connection(*addr, ssl=_h2_context())
        except (ConnectionError, ssl.SSLError):
            codes["refused"] += 1
            return
        try:
            writer.write(H2_PREFACE + h2_frame(0x4, 0, 0, b"") + malformed_h2(rng, i))
            received = b""
            with contextlib.suppress(ConnectionError, ssl.SSLError, TimeoutError):
                while chunk := await asyncio.wait_for(reader.read(65536), 15):
                    received += chunk
            code = _goaway_code(received)
            kind = "fixed" if i % 2 == 0 else "garbage"
            codes[f"{kind}:closed" if code is None else f"{kind}:goaway_{code}"] += 1
        finally:
            writer.close()

    await asyncio.gather(*(one(i) for i in range(count)))
    return {"connections": count, "answers": dict(codes)}


def client_hello(server_name: str) -> bytes:
    """The bytes of a real TLS ClientHello (ALPN h2), made by the ssl module."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = _h2_context().wrap_bio(incoming, outgoing, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


async def tls_stall(addr: Address, connections: int, hold: float) -> dict[str, Any]:
    """Connections that start a TLS handshake and never finish it (half a ClientHello,
    then silence): how many the relay closed within ``hold`` seconds."""
    hello = client_hello("relay.example")
    socks = []
    loop = asyncio.get_running_loop()
    for _ in range(connections):
        sock = socket.socket(socket.AF_INET6 if ":" in addr[0] else socket.AF_INET)
        sock.setblocking(False)
        await loop.sock_connect(sock, addr)
        await loop.sock_sendall(sock, hello[: len(hello) // 2])
        socks.append(sock)
    began = time.monotonic()

    async def closes(sock: socket.socket) -> bool:
        with contextlib.suppress(ConnectionError):
            data = await asyncio.wait_for(loop.sock_recv(sock, 4096), hold)
            return not data or await closes(sock)
        return True

    results = await asyncio.gather(*(closes(s) for s in socks), return_exceptions=True)
    closed = sum(1 for r in results if r is True)
    for sock in socks:
        sock.close()
    return {"opened": connections, "closed_by_relay": closed, "seconds": time.monotonic() - began}


async def tcp_flood(addr: Address, connections: int, hold: float) -> dict[str, Any]:
    """Plain TCP connections from one address, held open without a byte: how many
    the relay refused (closed at once) and how many it let wait."""
    loop = asyncio.get_running_loop()
    socks = []
    for _ in range(connections):
        sock = socket.socket(socket.AF_INET6 if ":" in addr[0] else socket.AF_INET)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, addr)
        except OSError:
            sock.close()
            continue
        socks.append(sock)
    await asyncio.sleep(0.5)
    refused = 0
    for sock in socks:
        try:
            data = sock.recv(1)
            refused += data == b""
        except BlockingIOError:
            pass  # still open: waiting for its handshake
        except ConnectionError:
            refused += 1
    await asyncio.sleep(hold)
    for sock in socks:
        sock.close()
    return {"opened": len(socks), "refused": refused}


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.abuse.attack NAME --relay HOST:PORT ...``: one attack, a JSON
    line with its result on stdout."""
    parser = argparse.ArgumentParser(prog="python -m tests.abuse.attack")
    parser.add_argument(
        "attack",
        choices=[
            "gap",
            "streams",
            "headers",
            "hello",
            "flood",
            "capsules",
            "h2frames",
            "tlsstall",
            "tcpflood",
        ],
    )
    parser.add_argument("--relay", required=True)
    parser.add_argument("--server-name", default="relay.example")
    parser.add_argument("--ca")
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--bytes", type=int, default=4 * 1024 * 1024)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--spoof-net", default="198.18.64.0/18")
    parser.add_argument("--token", default="")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=12.0)
    args = parser.parse_args(argv)
    host, _, port = args.relay.rpartition(":")
    addr = (host.strip("[]"), int(port))

    async def run() -> dict[str, Any]:
        if args.attack == "h2frames":
            return await h2_malformed(addr, args.count, args.seed)
        if args.attack == "tlsstall":
            return await tls_stall(addr, args.connections, args.seconds)
        if args.attack == "tcpflood":
            return await tcp_flood(addr, args.connections, args.seconds)
        if args.attack == "flood":
            hellos = client_hellos(args.server_name, args.count)
            began = time.monotonic()
            sent = raw_spoofed_initials(addr, hellos, args.spoof_net)
            return {"sent": sent, "seconds": time.monotonic() - began}
        if args.attack == "hello":
            sent = await asyncio.gather(
                *(huge_client_hello(addr, args.bytes) for _ in range(args.connections))
            )
            return {"datagrams": sum(sent)}
        config = client_config(args.server_name, args.ca)
        if args.attack == "capsules":
            fuzz = await capsule_fuzz(addr, config, args.token, args.count, args.seed)
            return fuzz.__dict__
        peers = await asyncio.gather(*(connected(addr, config) for _ in range(args.connections)))
        try:
            if args.attack == "gap":
                results = await asyncio.gather(
                    *(gap_flood(p, args.streams, args.rounds) for p in peers)
                )
                return {
                    "claimed": sum(r.claimed for r in results),
                    "frames": sum(r.bytes_sent for r in results),
                    "closed": [r.terminated for r in results],
                }
            if args.attack == "streams":
                codes = await asyncio.gather(*(many_streams(p, args.streams) for p in peers))
                return {"closed": list(codes)}
            codes = await asyncio.gather(
                *(incomplete_headers(p, 1 << 30, args.bytes) for p in peers)
            )
            return {"closed": list(codes)}
        finally:
            for p in peers:
                p.close()

    print(json.dumps(asyncio.run(run())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
