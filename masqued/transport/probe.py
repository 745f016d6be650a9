"""A QUIC handshake (or a TLS one over TCP) to a relay and nothing more, on the
client's own machinery.

``masqued doctor`` asks this to learn whether a relay answers and which certificate
it presents: the same socket set-up (fwmark), engine configuration and link as a
tunnel attempt, without certificate checks and without a CONNECT.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
from dataclasses import dataclass
from typing import Any

from masqued.transport import engines
from masqued.transport.h2link import ALPN as H2_ALPN
from masqued.transport.h3link import H3Link, monotonic
from masqued.transport.link import Link, NullHandler
from masqued.transport.tcp import TlsPipe, tune_tcp
from masqued.transport.udp import Address, UdpSocket, tune_socket


@dataclass
class ProbeResult:
    reached: bool
    error: str | None = None
    refused: bool = False
    chain: list[Any] | None = None  # the relay's certificate, then the rest of its chain
    rtt_ms: float | None = None


class _Watch(NullHandler):
    """The probe's link handler: only the end of the connection matters."""

    def __init__(self) -> None:
        self.closed: str | None = None

    def link_closed(self, link: Link, code: int, reason: str) -> None:
        self.closed = reason


async def probe(
    host: str,
    port: int,
    server_name: str,
    fwmark: int,
    timeout: float,
    quic_engine: str | None = None,
) -> ProbeResult:
    """Handshake with the relay at ``host``:``port`` within ``timeout`` seconds (with
    QUIC engine ``quic_engine``, None: the default)."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except OSError as exc:
        return ProbeResult(False, f"cannot resolve {host}: {exc}")
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if fwmark:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, fwmark)
        tune_socket(sock)
        sock.connect(addr)
    except OSError as exc:
        sock.close()
        return ProbeResult(False, f"cannot send to {host}:{port}: {exc.strerror}")
    engine = engines.load(quic_engine)
    config = engine.configuration(is_client=True, server_name=server_name, verify=False)
    quic = engine.client_connection(config)
    watch = _Watch()
    link: H3Link | None = None
    changed = asyncio.Event()

    def on_batch(batch: list[tuple[bytes, Address]]) -> None:
        assert link is not None
        now = monotonic()
        for data, peer in batch:
            link.receive(data, peer, now)
        link.process()
        link.flush()
        changed.set()

    udp = UdpSocket(loop, sock, on_batch)
    link = H3Link(loop, quic, udp.send, watch, addr, engine)
    udp.start()
    start = monotonic()
    try:
        quic.connect(addr, now=start)
        link.flush()
        deadline = start + timeout
        while not link.handshake_done and watch.closed is None:
            left = deadline - monotonic()
            if left <= 0:
                return ProbeResult(False, f"no QUIC answer within {timeout:g}s")
            changed.clear()
            try:
                await asyncio.wait_for(changed.wait(), min(left, 0.2))
            except TimeoutError:
                if udp.last_error == errno.ECONNREFUSED:
                    return ProbeResult(
                        False, f"nothing listens on UDP {port} at {addr[0]}", refused=True
                    )
        if not link.handshake_done:
            return ProbeResult(True, f"relay closed the handshake: {watch.closed}")
        rtt = round((monotonic() - start) * 1000, 1)
        leaf, rest = link.peer_certificate()
        link.close(engines.H3_NO_ERROR, "probe done")
        link.flush()
        return ProbeResult(True, chain=[leaf, *rest] if leaf is not None else None, rtt_ms=rtt)
    finally:
        link.cancel_timer()
        udp.close()


async def probe_h2(
    host: str, port: int, server_name: str, fwmark: int, timeout: float
) -> ProbeResult:
    """A TLS handshake (ALPN h2) with the relay over TCP, on the tunnel's socket set-up
    (fwmark), without certificate checks: is HTTP/2 there when UDP is not?"""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        return ProbeResult(False, f"cannot resolve {host}: {exc}")
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    start = monotonic()
    try:
        tune_tcp(sock, fwmark)
        await asyncio.wait_for(loop.sock_connect(sock, addr), timeout)
    except ConnectionRefusedError:
        sock.close()
        return ProbeResult(False, f"nothing listens on TCP {port} at {addr[0]}", refused=True)
    except (OSError, TimeoutError) as exc:
        sock.close()
        what = f"no TCP answer within {timeout:g}s" if isinstance(exc, TimeoutError) else exc
        return ProbeResult(False, f"cannot connect to TCP {port}: {what}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the certificate is checked on the QUIC probe
    context.set_alpn_protocols([H2_ALPN])
    pipe = TlsPipe(loop, sock, context, server_side=False, server_hostname=server_name)
    done: asyncio.Future[str | None] = loop.create_future()

    def ended(reason: str | None, error: BaseException | None = None) -> None:
        if not done.done():
            done.set_result(reason)

    pipe.on_open = lambda: ended(None)
    pipe.on_closed = ended
    pipe.start()
    try:
        error = await asyncio.wait_for(done, max(0.1, timeout - (monotonic() - start)))
    except TimeoutError:
        error = f"no TLS answer within {timeout:g}s"
    try:
        if error is not None:
            return ProbeResult(True, error)
        if pipe.alpn() != H2_ALPN:
            return ProbeResult(True, "the TLS server there does not speak HTTP/2 (ALPN)")
        return ProbeResult(True, rtt_ms=round((monotonic() - start) * 1000, 1))
    finally:
        pipe.close()
