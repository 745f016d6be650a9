"""Relay workers: several processes share one UDP port, each keeps its own connections.

The workers' sockets form one SO_REUSEPORT group, and a classic BPF program on the
group (SO_ATTACH_REUSEPORT_CBPF) picks the socket for every datagram from the QUIC
destination connection ID: socket ``first DCID byte % workers``. A worker makes the
first byte of every connection ID it issues its own index, so once a client uses
one of them (from the server's first Initial on), its packets reach that worker
whatever their source address and port — NAT rebinding and migration included,
which a 4-tuple hash would break. A client's first Initial carries a DCID of its
own choosing (random, RFC 9000 §7.2) and lands on any worker; that worker takes it.

The group's socket order is the order of ``bind``; the parent creates and binds all
the sockets before it starts a worker and keeps them open, so a worker that dies and
is started again gets the same index back.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from typing import Any, TypeVar

from aioquic.quic.connection import QuicConnection

from masqued.gate.ipam import MAX_WORKERS

SO_ATTACH_REUSEPORT_CBPF = 51  # asm-generic/socket.h

# Classic BPF (linux/filter.h).
_BPF_LD_B_ABS = 0x30  # A = packet[k]
_BPF_JSET_K = 0x45  # if A & k: jt else jf
_BPF_JA = 0x05  # pc += k
_BPF_MOD_K = 0x94  # A %= k
_BPF_RET_A = 0x16  # return A

# Offsets into the UDP payload (the program sees it from the QUIC packet's first byte):
# long header = flags(1) version(4) DCID length(1) DCID; short header = flags(1) DCID.
LONG_HEADER_DCID = 6
SHORT_HEADER_DCID = 1


def steering_program(workers: int) -> list[tuple[int, int, int, int]]:
    """The CBPF program: (code, jt, jf, k) per instruction."""
    if not 1 <= workers <= MAX_WORKERS:
        raise ValueError(f"workers must be 1..{MAX_WORKERS}")
    return [
        (_BPF_LD_B_ABS, 0, 0, 0),  # 0: A = first byte
        (_BPF_JSET_K, 0, 2, 0x80),  # 1: long header? -> 2, else -> 4
        (_BPF_LD_B_ABS, 0, 0, LONG_HEADER_DCID),  # 2
        (_BPF_JA, 0, 0, 1),  # 3: -> 5
        (_BPF_LD_B_ABS, 0, 0, SHORT_HEADER_DCID),  # 4
        (_BPF_MOD_K, 0, 0, workers),  # 5
        (_BPF_RET_A, 0, 0, 0),  # 6: socket index (a short packet returns 0 earlier)
    ]


def worker_for(packet: bytes, workers: int) -> int:
    """What the program picks for ``packet`` (a model of it, for tests and logs)."""
    offset = LONG_HEADER_DCID if packet and packet[0] & 0x80 else SHORT_HEADER_DCID
    if len(packet) <= offset:
        return 0
    return packet[offset] % workers


def attach_steering(sock: socket.socket, workers: int) -> None:
    """Attach the program to ``sock``'s SO_REUSEPORT group (one socket is enough)."""
    program = steering_program(workers)
    filters = (ctypes.c_ubyte * (8 * len(program)))()
    struct.pack_into("=" + "HBBI" * len(program), filters, 0, *sum(program, ()))
    fprog = struct.pack("HP", len(program), ctypes.addressof(filters))  # struct sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


def reuseport_group(host: str, port: int, workers: int) -> list[socket.socket]:
    """``workers`` UDP sockets bound to one address in one SO_REUSEPORT group, in
    index order, with the steering program attached; for one worker a single plain
    socket (without SO_REUSEPORT nobody else can bind the port). IPv6 sockets take
    IPv4 too."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    socks: list[socket.socket] = []
    try:
        for _ in range(workers):
            sock = socket.socket(family, socket.SOCK_DGRAM)
            socks.append(sock)
            if workers > 1:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(addr if not socks[1:] else socks[0].getsockname())
        if workers > 1:
            attach_steering(socks[0], workers)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


class SteeredCids(QuicConnection):
    """A QuicConnection whose connection IDs all start with ``worker`` (its index in
    the reuseport group), so the steering program sends their packets back to it.

    aioquic draws its CIDs from os.urandom in two places (the first one in
    ``__init__``, later ones in ``_replenish_connection_ids``); the first byte of
    each is set here before any of them is sent.
    """

    worker: int = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        first = self._host_cids[0]
        first.cid = self._mark(first.cid)
        self.host_cid = first.cid
        self._local_initial_source_connection_id = first.cid

    def _mark(self, cid: bytes) -> bytes:
        return bytes((self.worker,)) + cid[1:] if cid else cid

    def _replenish_connection_ids(self) -> None:
        before = len(self._host_cids)
        super()._replenish_connection_ids()
        for entry in self._host_cids[before:]:
            if not entry.was_sent:
                entry.cid = self._mark(entry.cid)


_C = TypeVar("_C", bound=QuicConnection)
_steered: dict[tuple[type[QuicConnection], int], type[QuicConnection]] = {}


def steered(base: type[_C], worker: int) -> type[_C]:
    """``base`` with its connection IDs marked for ``worker`` (one class per pair)."""
    cls = _steered.get((base, worker))
    if cls is None:
        cls = type(f"Steered{base.__name__}", (SteeredCids, base), {"worker": worker})
        _steered[(base, worker)] = cls
    return cls  # type: ignore[return-value]
