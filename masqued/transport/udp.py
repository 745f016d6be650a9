"""The relay's and the client's UDP socket: drained per wake-up, with GSO and GRO.

A QUIC engine's own asyncio adapter reads one datagram per event-loop pass and sends
after every one; here every wake-up drains the socket until EAGAIN and hands the
whole batch to the endpoint, which flushes each touched connection once. Linux UDP
offloads make one sendmsg carry many datagrams of one size (GSO) and one recvmsg
return several (GRO).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger("masqued.transport")

Address = Any  # what socket.recvfrom returns: (host, port) or (host, port, flow, scope)

# Upper bound of datagrams read per wake-up, so one busy socket cannot starve the TUN.
RECV_BATCH = 128
RECV_BUFSIZE = 65535
SOCKET_BUFFER = 4 * 1024 * 1024


def tune_socket(sock: socket.socket) -> None:
    """Large kernel buffers: bursts of a whole batch must not be dropped by the kernel."""
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):  # best effort
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
    sock.setblocking(False)


# Linux UDP offloads (include/uapi/linux/udp.h): one sendmsg carries many datagrams
# of one size (GSO), one recvmsg returns several coalesced ones (GRO).
SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
GSO_MAX_SEGMENTS = 64  # UDP_MAX_SEGMENTS in the kernel
GSO_MAX_BYTES = 65000  # stay under the 64 KiB IP datagram limit with headers
_CMSG_SPACE = socket.CMSG_SPACE(4)


class UdpSocket:
    """A non-blocking UDP socket drained on every wake-up, with GSO/GRO where the
    kernel supports them (each falls back to plain sendto/recvfrom on first refusal).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        on_batch: Callable[[list[tuple[bytes, Address]]], None],
    ) -> None:
        self._loop = loop
        self.sock = sock
        self._on_batch = on_batch
        self._reading = False
        self.send_errors = 0
        self.last_error: int | None = None  # errno of the last failed receive
        # MASQUED_UDP_OFFLOAD=0 turns both off (for comparisons, or a kernel/NIC that
        # mishandles them).
        offload = os.environ.get("MASQUED_UDP_OFFLOAD", "1") != "0"
        self.gso = offload
        self.gro = False
        if offload:
            with contextlib.suppress(OSError):
                sock.setsockopt(SOL_UDP, UDP_GRO, 1)
                self.gro = True

    def start(self) -> None:
        self._loop.add_reader(self.sock.fileno(), self._read_ready)
        self._reading = True

    def close(self) -> None:
        if self._reading:
            self._loop.remove_reader(self.sock.fileno())
            self._reading = False
        self.sock.close()

    def _read_ready(self) -> None:
        batch: list[tuple[bytes, Address]] = []
        gro = self.gro
        recvmsg = self.sock.recvmsg
        recvfrom = self.sock.recvfrom
        for _ in range(RECV_BATCH):
            try:
                if not gro:
                    batch.append(recvfrom(RECV_BUFSIZE))
                    continue
                data, ancdata, _flags, addr = recvmsg(RECV_BUFSIZE, _CMSG_SPACE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                # ICMP errors surface here on connected sockets (ECONNREFUSED); the
                # QUIC layer notices the silence through its own timers.
                self.last_error = exc.errno
                if exc.errno not in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                    log.debug("recvfrom failed: %s", exc)
                break
            size = 0
            for level, kind, value in ancdata:
                if level == SOL_UDP and kind == UDP_GRO and len(value) >= 2:
                    size = (
                        int.from_bytes(value[:2], "little")
                        if len(value) < 4
                        else (int.from_bytes(value[:4], "little"))
                    )
            if size and len(data) > size:
                for i in range(0, len(data), size):
                    batch.append((data[i : i + size], addr))
            else:
                batch.append((data, addr))
        if batch:
            self._on_batch(batch)

    def send(self, datagrams: Iterable[tuple[bytes, Address]]) -> None:
        if not self.gso:
            for data, addr in datagrams:
                self._sendto(data, addr)
            return
        # Runs of datagrams to one address with one size (the last may be shorter)
        # go out in one sendmsg with UDP_SEGMENT.
        run: list[bytes] = []
        run_addr: Address = None
        seg = 0
        total = 0
        for data, addr in datagrams:
            n = len(data)
            if run and (
                addr != run_addr
                or n > seg
                or len(run[-1]) < seg
                or len(run) >= GSO_MAX_SEGMENTS
                or total + n > GSO_MAX_BYTES
            ):
                self._send_run(run, run_addr, seg)
                run = []
            if not run:
                run_addr, seg, total = addr, n, 0
            run.append(data)
            total += n
        if run:
            self._send_run(run, run_addr, seg)

    def _send_run(self, run: list[bytes], addr: Address, seg: int) -> None:
        if len(run) == 1:
            self._sendto(run[0], addr)
            return
        try:
            self.sock.sendmsg(
                [b"".join(run)], [(SOL_UDP, UDP_SEGMENT, seg.to_bytes(2, "little"))], 0, addr
            )
        except (BlockingIOError, InterruptedError):
            self.send_errors += len(run)  # QUIC sees loss and retransmits
        except OSError as exc:
            if exc.errno in (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP):
                log.info("UDP GSO not available (%s): sending one datagram per call", exc)
                self.gso = False
                for data in run:
                    self._sendto(data, addr)
            else:
                self.send_errors += len(run)

    def _sendto(self, data: bytes, addr: Address) -> None:
        try:
            self.sock.sendto(data, addr)
        except OSError:
            # Kernel buffer full or a transient route error: QUIC treats it as loss.
            self.send_errors += 1
