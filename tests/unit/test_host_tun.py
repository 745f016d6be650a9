"""FakeTun keeps state; TunDevice's read/write loop over a datagram socketpair."""

from __future__ import annotations

import select
import socket

import pytest

from masqued.host.tun import FakeTun, TunDevice

V4 = bytes.fromhex("45000014000000004001") + bytes(10)
V6 = bytes([0x60]) + bytes(39)


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def test_fake_tun_queues_and_readiness() -> None:
    tun = FakeTun(mtu=1400, capacity=2)
    assert not readable(tun.fileno())
    assert tun.read_batch() == []
    tun.inject(V4, V6, V4)
    assert readable(tun.fileno())
    assert tun.read_batch(max_packets=2) == [V4, V6]
    assert readable(tun.fileno())  # one left
    assert tun.read_batch() == [V4]
    assert not readable(tun.fileno())

    assert tun.write(V4) and tun.write(V6)
    assert not tun.write(V4)  # full: dropped, no exception
    assert not tun.write(b"\x00junk")
    assert tun.dropped == 2
    assert tun.take_written() == [V4, V6]
    assert tun.write(V4)
    tun.close()
    with pytest.raises(OSError):
        tun.read_batch()


class _SockDev:
    """Stands in for pytun's device: one end of a SOCK_DGRAM pair keeps packet bounds."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.closed = True
        self.sock.close()


def test_tun_device_batches_and_drops() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setblocking(False)
    b.setblocking(False)
    dev = _SockDev(a)
    tun = TunDevice(dev, "mq-test", 1400)
    assert (tun.name, tun.mtu) == ("mq-test", 1400)
    assert tun.read_batch() == []
    for i in range(5):
        b.send(V4 + bytes([i]))
    assert tun.read_batch(max_packets=3) == [V4 + bytes([i]) for i in range(3)]
    assert tun.read_batch() == [V4 + bytes([3]), V4 + bytes([4])]
    big = V4 + bytes(1420)  # 1440 bytes, above the MTU
    b.send(big)
    assert tun.read_batch() == [big]  # read size leaves room above the MTU
    # fill the peer's queue: EAGAIN is a drop, not an exception
    sent = 0
    while tun.write(V6):
        sent += 1
        assert sent < 100_000
    assert sent > 0
    tun.close()
    tun.close()
    assert dev.closed
    b.close()


def test_vnet_tun_device_strips_and_adds_headers_and_coalesces() -> None:
    from masqued.host.coalesce import VNET_HDR, VNET_HDR_LEN, ZERO_VNET_HDR
    from masqued.proto.packet import build_tcp, build_udp

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setblocking(False)
    tun = TunDevice(_SockDev(a), "mq-test", 1400, vnet=True)
    b.send(ZERO_VNET_HDR + V4)
    assert tun.read_batch() == [V4]
    assert tun.write(V6)
    assert b.recv(2000) == ZERO_VNET_HDR + V6
    # A run of TCP segments leaves as one write; a lone packet with a zero header.
    segs = [
        build_tcp("198.18.200.2", "198.19.0.2", 1, 2, b"x" * 100, flags=0x10, seq=1 + 100 * i)
        for i in range(3)
    ]
    segs = [s[:6] + b"\x40" + s[7:] for s in segs]  # DF (checksum not re-done: not checked)
    udp = build_udp("198.18.200.2", "198.19.0.2", 1, 2, b"u")
    assert tun.write_batch([*segs, udp]) == 0
    first = b.recv(2000)
    assert VNET_HDR.unpack(first[:VNET_HDR_LEN])[1:4] == (1, 40, 100)  # TCPv4, hdr, mss
    assert len(first) == VNET_HDR_LEN + 40 + 300
    assert b.recv(2000) == ZERO_VNET_HDR + udp
    tun.close()
    b.close()
