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
