"""TLS over a non-blocking TCP socket on the event loop: the byte pipe under HTTP/2.

The standard ssl module does the TLS (an SSLObject over memory BIOs); this module only
moves its bytes: every readable event drains the socket (up to READ_BUDGET),
decrypts and hands the plaintext on in one piece; writes are encrypted into one
buffer that one ``send`` per flush empties as far as the kernel takes it. asyncio's
SSL transport would keep a second, uncounted buffer in the socket transport below
it; here everything not yet acknowledged by the peer is known (our buffer, and what
we wrote minus TCP_INFO's acknowledged bytes), which the data plane bounds in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509

READ_CHUNK = 256 * 1024
# Bytes read from one socket per wake-up, so one busy connection cannot starve others.
READ_BUDGET = 1024 * 1024
# A peer that acknowledges nothing for this long is dead (TCP_USER_TIMEOUT, ms).
USER_TIMEOUT_MS = 20_000
# TLS 1.2 is the floor RFC 9113 §9.2 allows for HTTP/2.
MIN_TLS = ssl.TLSVersion.TLSv1_2
# OpenSSL's X509_V_FLAG_NO_CHECK_TIME: a client certificate's validity period is
# checked by masqued.gate (an expired one then gets 403, as over HTTP/3).
VERIFY_NO_CHECK_TIME = 0x200000


@dataclass(frozen=True)
class TcpInfo:
    """What the kernel knows of a connection's sending side (struct tcp_info)."""

    acked: int  # bytes the peer acknowledged (tcpi_bytes_acked; counts the SYN)
    rtt: float  # smoothed RTT, seconds
    min_rtt: float  # seconds, 0 before a sample
    cwnd: int  # congestion window, bytes


# struct tcp_info (include/uapi/linux/tcp.h): offsets of the fields read here.
_TCP_INFO_LEN = 152
_MSS, _RTT, _CWND, _BYTES_ACKED, _MIN_RTT = 16, 68, 80, 120, 148


def tcp_info(sock: socket.socket) -> TcpInfo | None:
    """The kernel's TCP_INFO of ``sock``; None if unavailable (closed, old kernel)."""
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    except OSError:
        return None
    if len(raw) < _TCP_INFO_LEN:
        return None
    mss, rtt, cwnd = (struct.unpack_from("I", raw, o)[0] for o in (_MSS, _RTT, _CWND))
    (acked,) = struct.unpack_from("Q", raw, _BYTES_ACKED)
    (min_rtt,) = struct.unpack_from("I", raw, _MIN_RTT)
    return TcpInfo(
        acked=acked,
        rtt=rtt / 1e6,
        min_rtt=min_rtt / 1e6 if min_rtt != 0xFFFFFFFF else 0.0,
        cwnd=cwnd * mss,
    )


def tune_tcp(sock: socket.socket, fwmark: int = 0) -> None:
    """A tunnel's TCP socket: no Nagle delay (packets leave at once, batched by the
    caller), a bound on how long unacknowledged data may wait, our fwmark."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)
    if fwmark:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, fwmark)
    sock.setblocking(False)


def server_context(
    certificate: str, private_key: str, client_ca: str | None, alpn: str
) -> ssl.SSLContext:
    """The relay's TLS: its certificate, ALPN ``alpn``, and with ``client_ca`` a request
    for a client certificate (optional: tokens work on the same port). OpenSSL checks
    the chain to ``client_ca`` (the ssl module cannot defer that); masqued.gate checks
    the rest (validity, usage, revocation) at CONNECT time."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MIN_TLS
    ctx.load_cert_chain(certificate, private_key)
    ctx.set_alpn_protocols([alpn])
    if client_ca is not None:
        ctx.load_verify_locations(cafile=client_ca)
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.verify_flags |= VERIFY_NO_CHECK_TIME  # type: ignore[assignment]
    return ctx


def client_context(
    ca: str, alpn: str, certificate: str | None = None, private_key: str | None = None
) -> ssl.SSLContext:
    """The client's TLS: the relay's certificate must chain to ``ca`` and name the
    server (check_hostname), ALPN ``alpn``, our certificate for mTLS if given."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = MIN_TLS
    ctx.load_verify_locations(cafile=ca)
    ctx.set_alpn_protocols([alpn])
    if certificate is not None:
        ctx.load_cert_chain(certificate, private_key)
    return ctx


class TlsPipe:
    """One TLS connection over a connected, non-blocking TCP socket.

    ``on_open()`` once the handshake is done, ``on_data(bytes)`` with each read's
    plaintext, ``on_closed(reason, error)`` once when the connection is over (peer
    closed, TLS or socket error; not after our own ``close``). Writes queue until
    ``flush``.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
    ) -> None:
        self.loop = loop
        self.sock = sock
        self._fd = sock.fileno()
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(
            self._incoming, self._outgoing, server_side=server_side, server_hostname=server_hostname
        )
        self.open = False  # handshake done
        self.closed = False
        self._out = bytearray()  # ciphertext the kernel has not taken yet
        self._writing = False
        self.written = 0  # bytes the kernel took, in all
        self.on_open: Callable[[], None] = lambda: None
        self.on_data: Callable[[bytes], None] = lambda data: None
        self.on_closed: Callable[[str, BaseException | None], None] = lambda r, e: None

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        self.loop.add_reader(self._fd, self._readable)
        self._handshake()  # a client's ClientHello leaves now

    def close(self) -> None:
        """Close now, sending what is queued (and a close_notify) as far as the kernel
        takes it. No ``on_closed``: the caller knows."""
        if self.closed:
            return
        self.closed = True
        if self.open:
            with contextlib.suppress(ssl.SSLError, ValueError):
                self.tls.unwrap()
        if self._outgoing.pending:
            self._out += self._outgoing.read()
        with contextlib.suppress(OSError):
            self._send()
        self._release()

    def _release(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self._fd)
        if self._writing:
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_writer(self._fd)
            self._writing = False
        self.sock.close()
        self._out.clear()

    def _fail(self, reason: str, error: BaseException | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        self._release()
        self.on_closed(reason, error)

    # -- input -----------------------------------------------------------------------

    def _readable(self) -> None:
        if self.closed:
            return
        budget = READ_BUDGET
        eof = False
        try:
            while budget > 0:
                chunk = self.sock.recv(READ_CHUNK)
                if not chunk:
                    eof = True
                    break
                self._incoming.write(chunk)
                budget -= len(chunk)
                if len(chunk) < READ_CHUNK:
                    break
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            self._fail(f"connection error: {exc.strerror or exc}", exc)
            return
        if not self.open:
            self._handshake()
            if not self.open or self.closed:
                if eof and not self.closed:
                    self._fail("connection closed during the TLS handshake")
                return
        self._decrypt()
        if eof and not self.closed:
            self._fail("connection closed by peer")

    def _handshake(self) -> None:
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush_tls()
            return
        except ssl.SSLError as exc:
            self._flush_tls()  # the alert, if any
            self._fail(f"TLS handshake failed: {tls_reason(exc)}", exc)
            return
        except OSError as exc:
            self._fail(f"TLS handshake failed: {exc}", exc)
            return
        self.open = True
        self._flush_tls()
        self.on_open()

    def _decrypt(self) -> None:
        parts: list[bytes] = []
        try:
            while True:
                data = self.tls.read(READ_CHUNK)
                if not data:
                    break
                parts.append(data)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            if parts:
                self.on_data(b"".join(parts))
            self._fail("closed by peer (TLS close_notify)")
            return
        except ssl.SSLError as exc:
            self._fail(f"TLS error: {tls_reason(exc)}", exc)
            return
        if parts and not self.closed:
            self.on_data(parts[0] if len(parts) == 1 else b"".join(parts))
        # Reading may have produced TLS output (a key update, a session ticket ack).
        if self._outgoing.pending and not self.closed:
            self._flush_tls()

    # -- output ----------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Encrypt ``data``; it leaves at the next ``flush``."""
        if self.closed or not data:
            return
        self.tls.write(data)

    def flush(self) -> None:
        if not self.closed:
            self._flush_tls()

    def _flush_tls(self) -> None:
        if self._outgoing.pending:
            self._out += self._outgoing.read()
        if self._out and not self._writing:
            try:
                self._send()
            except OSError as exc:
                self._fail(f"connection error: {exc.strerror or exc}", exc)

    def _send(self) -> None:
        out = self._out
        while out:
            try:
                sent = self.sock.send(out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno == errno.EAGAIN:
                    break
                raise
            self.written += sent
            del out[:sent]
        if out and not self._writing and not self.closed:
            self.loop.add_writer(self._fd, self._writable)
            self._writing = True

    def _writable(self) -> None:
        try:
            self._send()
        except OSError as exc:
            self._fail(f"connection error: {exc.strerror or exc}", exc)
            return
        if not self._out and self._writing:
            self.loop.remove_writer(self._fd)
            self._writing = False

    # -- state -----------------------------------------------------------------------

    @property
    def unsent(self) -> int:
        """Ciphertext waiting for the kernel (plus what TLS has not handed out yet)."""
        return len(self._out) + self._outgoing.pending

    def info(self) -> TcpInfo | None:
        return None if self.closed else tcp_info(self.sock)

    def alpn(self) -> str | None:
        return self.tls.selected_alpn_protocol()

    def peer_certificate(self) -> tuple[x509.Certificate | None, list[x509.Certificate]]:
        """The certificate the peer presented (as verified) and the rest of its chain."""
        der = self.tls.getpeercert(binary_form=True) if self.open else None
        if not der:
            return None, []
        leaf = x509.load_der_x509_certificate(der)
        return leaf, [x509.load_der_x509_certificate(d) for d in _verified_chain(self.tls)[1:]]


def _verified_chain(tls: ssl.SSLObject) -> list[bytes]:
    """The peer's chain as OpenSSL verified it (leaf first), DER; [] if unknown.
    Python 3.13 has SSLObject.get_verified_chain; 3.11 only its C object's."""
    getter: Any = getattr(tls, "get_verified_chain", None)
    if getter is None:
        getter = getattr(getattr(tls, "_sslobj", None), "get_verified_chain", None)
    if getter is None:
        return []
    try:
        chain = getter() or []
    except (ssl.SSLError, ValueError):
        return []
    out: list[bytes] = []
    for cert in chain:
        if isinstance(cert, bytes):
            out.append(cert)
        else:
            out.append(cert.public_bytes(ssl._ssl.ENCODING_DER))  # type: ignore[attr-defined]
    return out


def tls_reason(exc: BaseException) -> str:
    """An ssl error as one short line: OpenSSL's reason, e.g. "tlsv1 alert unknown ca"."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    return str(exc)
