"""TUN device: IP packets in and out of the kernel (IFF_TUN | IFF_NO_PI, non-blocking).

``TunDevice`` is the real device over python-pytun; ``FakeTun`` keeps packets in memory
and still offers a pollable ``fileno()`` so event-loop code runs unchanged in tests.
Both satisfy the ``Tun`` protocol, which is all the transport layer should depend on.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections import deque
from typing import Any, Protocol

from masqued.host.coalesce import VNET_HDR_LEN, ZERO_VNET_HDR, coalesce

log = logging.getLogger("masqued.host")

# write() reports these as a dropped packet instead of raising: the queue is full
# (EAGAIN, ENOBUFS) or the kernel rejected this one packet (EINVAL: not IP, bad length).
_DROP_ERRNOS = frozenset({errno.EAGAIN, errno.ENOBUFS, errno.EINVAL})

# Extra room above the MTU for a read, so an oversized packet is seen whole, not cut.
_READ_SLACK = 64


class Tun(Protocol):
    """What the packet pumps need from a TUN device."""

    @property
    def name(self) -> str: ...

    @property
    def mtu(self) -> int: ...

    def fileno(self) -> int:
        """A non-blocking fd that polls readable when packets are waiting."""
        ...

    def read_batch(self, max_packets: int = 256) -> list[bytes]:
        """Up to ``max_packets`` packets, stopping early when none are left."""
        ...

    def write(self, packet: bytes) -> bool:
        """Hand one IP packet to the kernel; False (no exception) when it was dropped."""
        ...

    def write_batch(self, packets: list[bytes]) -> int:
        """Hand a batch of IP packets to the kernel; returns how many were dropped."""
        ...

    def close(self) -> None: ...


class TunDevice:
    """A real TUN device; the kernel deletes it when the fd is closed.

    With ``vnet`` (IFF_VNET_HDR) every packet crosses the fd behind a virtio_net_hdr,
    and ``write_batch`` merges consecutive segments of a TCP flow into one
    super-packet (masqued.host.coalesce). Reads never carry offloads: the device
    does not announce any (no TUNSETOFFLOAD), so the kernel hands us plain packets.
    """

    def __init__(self, dev: Any, name: str, mtu: int, vnet: bool = False) -> None:
        self._dev = dev
        self._fd: int = dev.fileno()
        self._name = name
        self._mtu = mtu
        self.vnet = vnet
        self._bufsize = mtu + _READ_SLACK + (VNET_HDR_LEN if vnet else 0)

    @property
    def name(self) -> str:
        return self._name

    @property
    def mtu(self) -> int:
        return self._mtu

    def fileno(self) -> int:
        return self._fd

    def read_batch(self, max_packets: int = 256) -> list[bytes]:
        # Hot path: plain os.read, one syscall per packet, no per-call allocation
        # beyond the packet itself.
        out: list[bytes] = []
        read, fd, size = os.read, self._fd, self._bufsize
        try:
            if self.vnet:
                while len(out) < max_packets:
                    out.append(read(fd, size)[VNET_HDR_LEN:])
            else:
                while len(out) < max_packets:
                    out.append(read(fd, size))
        except BlockingIOError:
            pass
        return out

    def write(self, packet: bytes) -> bool:
        try:
            if self.vnet:
                os.writev(self._fd, (ZERO_VNET_HDR, packet))
            else:
                os.write(self._fd, packet)
        except OSError as e:
            if e.errno in _DROP_ERRNOS:
                return False
            raise
        return True

    def write_batch(self, packets: list[bytes]) -> int:
        if not self.vnet or len(packets) < 2:
            return sum(not self.write(p) for p in packets)
        dropped = 0
        writev, fd = os.writev, self._fd
        for iov, count in coalesce(packets):
            try:
                writev(fd, iov)
            except OSError as e:
                if e.errno not in _DROP_ERRNOS:
                    raise
                dropped += count
        return dropped

    def close(self) -> None:
        if self._fd >= 0:
            log.info("[#] ip link delete dev %s", self._name)
            self._dev.close()
            self._fd = -1

    def __enter__(self) -> TunDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _InheritedFd:
    """The TUN fd a relay worker got from its parent (which created the device and
    keeps it open, so the device outlives a worker that is restarted)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        os.close(self._fd)


def inherited_tun(fd: int, name: str, mtu: int, vnet: bool) -> TunDevice:
    """A TunDevice over an fd opened by another process (``open_tun`` there)."""
    os.set_blocking(fd, False)
    return TunDevice(_InheritedFd(fd), name, mtu, vnet=vnet)


def tun_offload_wanted() -> bool:
    """Coalesced TUN writes unless MASQUED_TUN_OFFLOAD=0 (for comparisons, or a
    kernel that mishandles them)."""
    return os.environ.get("MASQUED_TUN_OFFLOAD", "1") != "0"


def open_tun(name: str, mtu: int, vnet: bool | None = None) -> TunDevice:
    """Create TUN ``name`` (IFF_TUN|IFF_NO_PI, and IFF_VNET_HDR unless ``vnet`` is
    False or MASQUED_TUN_OFFLOAD=0), set its MTU, bring it up, non-blocking."""
    import pytun

    if not 0 < len(name) <= 15:
        raise ValueError(f"TUN name {name!r} must be 1-15 characters")
    if vnet is None:
        vnet = tun_offload_wanted()
    log.info("[#] ip tuntap add dev %s mode tun%s", name, " vnet_hdr" if vnet else "")
    flags = pytun.IFF_TUN | pytun.IFF_NO_PI | (pytun.IFF_VNET_HDR if vnet else 0)
    try:
        dev = pytun.TunTapDevice(name=name, flags=flags)
    except pytun.Error as e:
        raise OSError(f"cannot create TUN {name}: {e}") from None
    try:
        _no_link_local(dev.name)
        log.info("[#] ip link set mtu %d up dev %s", mtu, name)
        dev.mtu = mtu
        dev.up()
        os.set_blocking(dev.fileno(), False)
    except BaseException:
        dev.close()
        raise
    return TunDevice(dev, dev.name, mtu, vnet=vnet)


def _no_link_local(name: str) -> None:
    """No IPv6 link-local address on the tunnel (addr_gen_mode 1, before link up).

    A point-to-point L3 tunnel has no use for one, and with it the kernel sends router
    solicitations and MLD reports from fe80::/10 into the tunnel, which the relay must
    drop as not coming from the client's assigned address.
    """
    path = f"/proc/sys/net/ipv6/conf/{name}/addr_gen_mode"
    try:
        with open(path, "w") as f:
            f.write("1")
    except OSError:
        pass  # IPv6 disabled on this host: nothing to suppress


class FakeTun:
    """In-memory TUN: ``inject`` plays the kernel sending, ``written`` what we sent it.

    ``capacity`` bounds the kernel-side queue: writes beyond it are dropped (False),
    as a full real TUN would. A pipe makes ``fileno()`` readable while packets wait.
    """

    def __init__(self, name: str = "mq-fake", mtu: int = 1400, capacity: int = 1024) -> None:
        self._name = name
        self._mtu = mtu
        self.capacity = capacity
        self.inbound: deque[bytes] = deque()  # kernel -> daemon (read_batch)
        self.written: deque[bytes] = deque()  # daemon -> kernel (write)
        self.dropped = 0
        self.closed = False
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)

    @property
    def name(self) -> str:
        return self._name

    @property
    def mtu(self) -> int:
        return self._mtu

    def fileno(self) -> int:
        return self._rfd

    def inject(self, *packets: bytes) -> None:
        """Queue packets as if the kernel routed them into the TUN."""
        if self.closed:
            raise OSError(errno.EBADF, "closed")
        for p in packets:
            self.inbound.append(bytes(p)[: self._mtu + _READ_SLACK])
        self._signal()

    def _signal(self) -> None:
        if self.inbound:
            with contextlib.suppress(BlockingIOError):  # already readable
                os.write(self._wfd, b"\0")

    def read_batch(self, max_packets: int = 256) -> list[bytes]:
        if self.closed:
            raise OSError(errno.EBADF, "closed")
        out: list[bytes] = []
        while self.inbound and len(out) < max_packets:
            out.append(self.inbound.popleft())
        try:
            while os.read(self._rfd, 4096):
                pass
        except BlockingIOError:
            pass
        self._signal()  # stay readable if packets are left
        return out

    def write(self, packet: bytes) -> bool:
        if self.closed:
            raise OSError(errno.EBADF, "closed")
        if len(self.written) >= self.capacity or not packet or packet[0] >> 4 not in (4, 6):
            self.dropped += 1
            return False
        self.written.append(bytes(packet))
        return True

    def write_batch(self, packets: list[bytes]) -> int:
        return sum(not self.write(p) for p in packets)

    def take_written(self) -> list[bytes]:
        """Everything written so far, emptying the queue (the kernel consumed it)."""
        out = list(self.written)
        self.written.clear()
        return out

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self._rfd)
            os.close(self._wfd)
