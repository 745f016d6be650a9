"""A small synchronous rtnetlink client: the ``Netlink`` protocol over NETLINK_ROUTE.

Written from the kernel's UAPI headers (``linux/netlink.h``, ``rtnetlink.h``,
``if_link.h``, ``if_addr.h``, ``fib_rules.h``) and rtnetlink(7). It needs nothing but
``socket`` and ``struct``: no threads, no event loop, nothing heavy to import.
Instead of pyroute2: import plus first dump 29 ms of CPU against its 144 ms.

Wire format (integers in host byte order, addresses in network byte order)::

    nlmsghdr      u32 len, u16 type, u16 flags, u32 seq, u32 pid           16 bytes
    ifinfomsg     u8 family, u8 pad, u16 type, i32 index, u32 flags, u32 change   16
    ifaddrmsg     u8 family, u8 prefixlen, u8 flags, u8 scope, u32 index       8
    rtmsg         u8 family, dst_len, src_len, tos, table, protocol, scope, type,
                  u32 flags                                                   12
    fib_rule_hdr  u8 family, dst_len, src_len, tos, table, res1, res2, action,
                  u32 flags                                                   12
    rtattr        u16 len (header included), u16 type, payload; padded to 4 bytes
    nlmsgerr      i32 error (-errno; 0 is an ACK), the request's nlmsghdr, then
                  (with NETLINK_EXT_ACK) attributes such as NLMSGERR_ATTR_MSG

Requests carry NLM_F_REQUEST|NLM_F_ACK (plus NLM_F_CREATE|NLM_F_EXCL for adds) and
end at the kernel's NLMSG_ERROR; dumps carry NLM_F_REQUEST|NLM_F_DUMP and end at
NLMSG_DONE. Replies are matched by sequence number, so a late reply to an abandoned
request is skipped. Every receive is bounded in size and in time.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Protocol

from masqued.host.naming import ROUTE_PROTO
from masqued.host.netstate import (
    FIB_RULE_INVERT,
    IFA_F_NODAD,
    IFA_F_NOPREFIXROUTE,
    RT_TABLE_MAIN,
    IPAddress,
    IPInterface,
    IPNetwork,
    Route,
    Rule,
)

# linux/socket.h, linux/netlink.h
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11

NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4

NLM_F_REQUEST = 0x01
NLM_F_MULTI = 0x02
NLM_F_ACK = 0x04
NLM_F_DUMP_INTR = 0x10
NLM_F_DUMP = 0x100 | 0x200  # NLM_F_ROOT | NLM_F_MATCH
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_CAPPED = 0x100  # in NLMSG_ERROR: the request was not echoed
NLM_F_ACK_TLVS = 0x200  # in NLMSG_ERROR: extended-ACK attributes follow

NLMSGERR_ATTR_MSG = 1
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER

# linux/rtnetlink.h
RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_GETLINK = 18
RTM_NEWADDR = 20
RTM_DELADDR = 21
RTM_GETADDR = 22
RTM_NEWROUTE = 24
RTM_DELROUTE = 25
RTM_GETROUTE = 26
RTM_NEWRULE = 32
RTM_DELRULE = 33
RTM_GETRULE = 34

RTN_UNICAST = 1
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_NOWHERE = 255  # in a delete request: match routes of any scope
RT_TABLE_UNSPEC = 0

RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RTA_PRIORITY = 6
RTA_MULTIPATH = 9
RTA_TABLE = 15
RTA_MARK = 16

RTEXT_FILTER_SKIP_STATS = 1 << 3

# linux/if_link.h, linux/if.h
IFLA_IFNAME = 3
IFLA_EXT_MASK = 29
IFNAMSIZ = 16

# linux/if_addr.h
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_FLAGS = 8

# linux/fib_rules.h
FRA_PRIORITY = 6
FRA_FWMARK = 10
FRA_SUPPRESS_PREFIXLEN = 14
FRA_TABLE = 15
FR_ACT_TO_TBL = 1
NO_SUPPRESS = 0xFFFFFFFF  # FRA_SUPPRESS_PREFIXLEN of a rule without one (-1)

DEFAULT_TIMEOUT = 5.0  # seconds any one receive may wait for the kernel
RECV_BUFFER = 256 * 1024  # a dump datagram is at most 32 KiB; one link can be large
DUMP_ATTEMPTS = 3  # a dump interrupted by a concurrent change is repeated

NLMSGHDR = struct.Struct("=IHHII")
RTATTR = struct.Struct("=HH")
IFINFOMSG = struct.Struct("=BxHiII")
IFADDRMSG = struct.Struct("=BBBBI")
RTMSG = struct.Struct("=BBBBBBBBI")
FIB_RULE_HDR = struct.Struct("=BBBBBBBBI")
RTNEXTHOP = struct.Struct("=HBBi")
_U32 = struct.Struct("=I")
_I32 = struct.Struct("=i")


class NetlinkError(OSError):
    """The kernel refused a request (NLMSG_ERROR with a non-zero error)."""


def _bad(what: str) -> OSError:
    return OSError(errno.EBADMSG, f"malformed netlink reply: {what}")


def _af(version: int) -> int:
    return socket.AF_INET if version == 4 else socket.AF_INET6


def _version(af: int) -> int | None:
    if af == socket.AF_INET:
        return 4
    return 6 if af == socket.AF_INET6 else None


def _align(n: int) -> int:
    return (n + 3) & ~3


# --------------------------------------------------------------------------- encoding


def nlmsg(msg_type: int, flags: int, seq: int, body: bytes) -> bytes:
    """One netlink message: ``nlmsghdr`` + ``body`` (port id 0: the kernel fills it)."""
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), msg_type, flags, seq, 0) + body


def attr(kind: int, payload: bytes) -> bytes:
    """One ``rtattr``, padded to a multiple of 4 bytes."""
    size = RTATTR.size + len(payload)
    return RTATTR.pack(size, kind) + payload + bytes(_align(size) - size)


def attr_u32(kind: int, value: int) -> bytes:
    return attr(kind, _U32.pack(value))


def link_request(index: int = 0, name: bytes | None = None, *, get: bool = False) -> bytes:
    """``ifinfomsg`` for RTM_DELLINK or (``get``) RTM_GETLINK, by index or by name
    (index 0). A get asks the kernel to leave out the statistics: we want names."""
    body = IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, 0, 0)
    if name is not None:
        body += attr(IFLA_IFNAME, name + b"\0")
    if get:
        body += attr_u32(IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS)
    return body


def address_request(index: int, addr: IPInterface, flags: int = 0) -> bytes:
    """``ifaddrmsg`` for RTM_NEWADDR/RTM_DELADDR (IPv4: IFA_LOCAL and IFA_ADDRESS)."""
    body = IFADDRMSG.pack(
        _af(addr.version), addr.network.prefixlen, flags & 0xFF, RT_SCOPE_UNIVERSE, index
    )
    if addr.version == 4:
        body += attr(IFA_LOCAL, addr.ip.packed)
    body += attr(IFA_ADDRESS, addr.ip.packed)
    if flags:
        body += attr_u32(IFA_FLAGS, flags)
    return body


def route_request(route: Route, oif: int | None, proto: int, scope: int) -> bytes:
    """``rtmsg`` for RTM_NEWROUTE/RTM_DELROUTE; the table always goes in RTA_TABLE."""
    table = route.table
    body = RTMSG.pack(
        _af(route.family),
        route.dst.prefixlen,
        0,
        0,
        table if table < 256 else RT_TABLE_UNSPEC,
        proto,
        scope,
        RTN_UNICAST,
        0,
    )
    body += attr_u32(RTA_TABLE, table)
    if route.dst.prefixlen:
        body += attr(RTA_DST, route.dst.network_address.packed)
    if oif is not None:
        body += attr_u32(RTA_OIF, oif)
    if route.via is not None:
        body += attr(RTA_GATEWAY, route.via.packed)
    return body


def route_get_request(addr: IPAddress, mark: int = 0) -> bytes:
    """RTM_GETROUTE for ``addr`` as a packet carrying fwmark ``mark`` would be routed."""
    body = RTMSG.pack(_af(addr.version), addr.max_prefixlen, 0, 0, 0, 0, 0, 0, 0)
    out = body + attr(RTA_DST, addr.packed)
    if mark:
        out += attr(RTA_MARK, struct.pack("=I", mark))
    return out


def rule_request(rule: Rule) -> bytes:
    """``fib_rule_hdr`` for RTM_NEWRULE/RTM_DELRULE: ``[not] fwmark M lookup T``."""
    table = rule.table
    body = FIB_RULE_HDR.pack(
        _af(rule.family),
        0,
        0,
        0,
        table if table < 256 else RT_TABLE_UNSPEC,
        0,
        0,
        FR_ACT_TO_TBL,
        FIB_RULE_INVERT if rule.invert else 0,
    )
    body += attr_u32(FRA_PRIORITY, rule.priority)
    body += attr_u32(FRA_TABLE, table)
    if rule.fwmark is not None:
        body += attr_u32(FRA_FWMARK, rule.fwmark)
    if rule.suppress_prefixlength is not None:
        body += attr_u32(FRA_SUPPRESS_PREFIXLEN, rule.suppress_prefixlength)
    return body


def address_dump_request(index: int = 0) -> bytes:
    """RTM_GETADDR dump of both families (the index only filters on strict sockets)."""
    return IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, index)


def route_dump_request(af: int) -> bytes:
    return RTMSG.pack(af, 0, 0, 0, 0, 0, 0, 0, 0)


def rule_dump_request(af: int) -> bytes:
    return FIB_RULE_HDR.pack(af, 0, 0, 0, 0, 0, 0, 0, 0)


# --------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class Message:
    type: int
    flags: int
    seq: int
    body: bytes


def split_messages(data: bytes | memoryview) -> list[Message]:
    """The netlink messages of one datagram; anything that does not add up raises."""
    out: list[Message] = []
    pos, end = 0, len(data)
    while pos < end:
        if end - pos < NLMSGHDR.size:
            raise _bad(f"{end - pos} stray bytes after the last message")
        length, msg_type, flags, seq, _pid = NLMSGHDR.unpack_from(data, pos)
        if length < NLMSGHDR.size or length > end - pos:
            raise _bad(f"message length {length} with {end - pos} bytes left")
        out.append(Message(msg_type, flags, seq, bytes(data[pos + NLMSGHDR.size : pos + length])))
        pos += _align(length)
    return out


def parse_attrs(data: bytes) -> dict[int, bytes]:
    """Attribute type -> payload; unknown types are kept and ignored by the callers."""
    out: dict[int, bytes] = {}
    pos, end = 0, len(data)
    while end - pos >= RTATTR.size:
        size, kind = RTATTR.unpack_from(data, pos)
        if size < RTATTR.size or size > end - pos:
            raise _bad(f"attribute {kind} of length {size} with {end - pos} bytes left")
        out[kind & NLA_TYPE_MASK] = data[pos + RTATTR.size : pos + size]
        pos += _align(size)
    return out


def _u32(raw: bytes) -> int:
    if len(raw) < 4:
        raise _bad(f"{len(raw)}-byte integer attribute")
    return int(_U32.unpack_from(raw)[0])


def _fixed(header: struct.Struct, body: bytes, what: str) -> tuple[int, ...]:
    if len(body) < header.size:
        raise _bad(f"{what} of {len(body)} bytes")
    return header.unpack_from(body)


def _ip(version: int, raw: bytes) -> IPAddress:
    if len(raw) != (4 if version == 4 else 16):
        raise _bad(f"{len(raw)}-byte IPv{version} address")
    return ipaddress.IPv4Address(raw) if version == 4 else ipaddress.IPv6Address(raw)


def _prefix(version: int, plen: int) -> int:
    if plen > (32 if version == 4 else 128):
        raise _bad(f"IPv{version} prefix length {plen}")
    return plen


def parse_error(msg: Message) -> tuple[int, str]:
    """(errno, text) of an NLMSG_ERROR or NLMSG_DONE; errno 0 is success (an ACK).

    With NETLINK_EXT_ACK the text carries the kernel's explanation, if it gave one.
    """
    body = msg.body
    if len(body) < _I32.size:
        if msg.type == NLMSG_DONE:
            return 0, ""  # old kernels: a DONE without a status
        raise _bad("truncated NLMSG_ERROR")
    code = abs(int(_I32.unpack_from(body)[0]))
    if code == 0:
        return 0, ""
    text = os.strerror(code)
    detail = _ext_ack_message(msg)
    return code, f"{text} ({detail})" if detail else text


def _ext_ack_message(msg: Message) -> str:
    """NLMSGERR_ATTR_MSG of an extended ACK, or ""; never raises."""
    body = msg.body
    if not msg.flags & NLM_F_ACK_TLVS:
        return ""
    start = _I32.size  # NLMSG_DONE: the attributes follow the status
    if msg.type == NLMSG_ERROR:  # ...here the request's header (or all of it) first
        if len(body) < _I32.size + NLMSGHDR.size:
            return ""
        echoed = int(_U32.unpack_from(body, _I32.size)[0])
        start += NLMSGHDR.size if msg.flags & NLM_F_CAPPED else _align(echoed)
    try:
        raw = parse_attrs(body[start:]).get(NLMSGERR_ATTR_MSG, b"")
    except OSError:
        return ""
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def parse_link(body: bytes) -> tuple[int, str | None]:
    """(ifindex, name) of an RTM_NEWLINK."""
    _fam, _type, index, _flags, _change = _fixed(IFINFOMSG, body, "ifinfomsg")
    raw = parse_attrs(body[IFINFOMSG.size :]).get(IFLA_IFNAME)
    name = raw.split(b"\0", 1)[0].decode(errors="replace") if raw is not None else None
    return index, name


def parse_address(body: bytes) -> tuple[int, IPInterface] | None:
    """(ifindex, address/prefix) of an RTM_NEWADDR; None for non-IP families.

    The local address is IFA_LOCAL if present (on a point-to-point link IFA_ADDRESS is
    the peer), else IFA_ADDRESS (IPv6 sends only that).
    """
    af, plen, _flags, _scope, index = _fixed(IFADDRMSG, body, "ifaddrmsg")
    version = _version(af)
    if version is None:
        return None
    attrs = parse_attrs(body[IFADDRMSG.size :])
    raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
    if raw is None:
        return None
    ip = _ip(version, raw)
    iface: IPInterface = (
        ipaddress.IPv4Interface((ip, _prefix(4, plen)))
        if isinstance(ip, ipaddress.IPv4Address)
        else ipaddress.IPv6Interface((ip, _prefix(6, plen)))
    )
    return index, iface


@dataclass(frozen=True)
class RouteMessage:
    """The parts of an RTM_NEWROUTE that we use (table: RTA_TABLE, else rtm_table)."""

    family: int
    dst_len: int
    table: int
    protocol: int
    scope: int
    type: int
    dst: bytes | None = None
    oif: int | None = None
    gateway: bytes | None = None
    priority: int | None = None
    multipath_oif: int | None = None  # the first nexthop's device of RTA_MULTIPATH

    @property
    def version(self) -> int | None:
        return _version(self.family)

    def network(self) -> IPNetwork:
        version = self.version
        if version is None:
            raise _bad(f"route of family {self.family}")
        raw = self.dst if self.dst is not None else bytes(4 if version == 4 else 16)
        net: IPNetwork = (
            ipaddress.IPv4Network((_ip(4, raw), _prefix(4, self.dst_len)), strict=False)
            if version == 4
            else ipaddress.IPv6Network((_ip(6, raw), _prefix(6, self.dst_len)), strict=False)
        )
        return net

    def via(self) -> IPAddress | None:
        version = self.version
        if not self.gateway or version is None:
            return None
        return _ip(version, self.gateway)


def parse_route(body: bytes) -> RouteMessage:
    af, dst_len, _src, _tos, table, proto, scope, rtype, _flags = _fixed(RTMSG, body, "rtmsg")
    attrs = parse_attrs(body[RTMSG.size :])
    if RTA_TABLE in attrs:
        table = _u32(attrs[RTA_TABLE]) or table
    mp = attrs.get(RTA_MULTIPATH)
    return RouteMessage(
        family=af,
        dst_len=dst_len,
        table=table,
        protocol=proto,
        scope=scope,
        type=rtype,
        dst=attrs.get(RTA_DST),
        oif=_u32(attrs[RTA_OIF]) if RTA_OIF in attrs else None,
        gateway=attrs.get(RTA_GATEWAY),
        priority=_u32(attrs[RTA_PRIORITY]) if RTA_PRIORITY in attrs else None,
        multipath_oif=RTNEXTHOP.unpack_from(mp)[3] if mp and len(mp) >= RTNEXTHOP.size else None,
    )


def parse_rule(body: bytes) -> Rule | None:
    """The ``Rule`` of an RTM_NEWRULE; None for non-IP families."""
    af, _dl, _sl, _tos, table, _r1, _r2, _action, flags = _fixed(FIB_RULE_HDR, body, "rule")
    version = _version(af)
    if version is None:
        return None
    attrs = parse_attrs(body[FIB_RULE_HDR.size :])
    sup = _u32(attrs[FRA_SUPPRESS_PREFIXLEN]) if FRA_SUPPRESS_PREFIXLEN in attrs else None
    return Rule(
        family=version,
        priority=_u32(attrs[FRA_PRIORITY]) if FRA_PRIORITY in attrs else 0,
        table=(_u32(attrs[FRA_TABLE]) if FRA_TABLE in attrs else 0) or table,
        fwmark=_u32(attrs[FRA_FWMARK]) if FRA_FWMARK in attrs else None,
        invert=bool(flags & FIB_RULE_INVERT),
        suppress_prefixlength=None if sup is None or sup == NO_SUPPRESS else sup,
    )


# --------------------------------------------------------------------------- socket


class NetlinkSocket(Protocol):
    """What ``RtNetlink`` needs of its socket (a fake one in unit tests)."""

    def send(self, data: bytes, /) -> int: ...

    def recv_into(self, buffer: bytearray, nbytes: int, flags: int, /) -> int: ...

    def close(self) -> None: ...


def open_socket(timeout: float = DEFAULT_TIMEOUT) -> socket.socket:
    """A NETLINK_ROUTE socket in the calling thread's network namespace.

    Connected to the kernel (port 0), so no other process can send to it; capped
    extended ACKs give error texts without echoing our requests.
    """
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    try:
        for opt in (NETLINK_CAP_ACK, NETLINK_EXT_ACK):
            with contextlib.suppress(OSError):  # older kernels: plain ACKs
                sock.setsockopt(SOL_NETLINK, opt, 1)
        sock.bind((0, 0))
        sock.connect((0, 0))
        sock.settimeout(timeout)
    except BaseException:
        sock.close()
        raise
    return sock


class RtNetlink:
    """``Netlink`` over one NETLINK_ROUTE socket, one request at a time.

    The socket belongs to the network namespace of the thread that creates this
    object. Requests are serialised by a lock, so threads may share an instance.
    Kernel refusals raise ``NetlinkError`` (an ``OSError`` with the kernel's errno);
    a receive that waits longer than ``timeout`` raises ``OSError(ETIMEDOUT)``, a reply
    that does not parse ``OSError(EBADMSG)``.
    """

    def __init__(
        self, timeout: float = DEFAULT_TIMEOUT, *, sock: NetlinkSocket | None = None
    ) -> None:
        self.timeout = timeout
        self._sock: NetlinkSocket = sock if sock is not None else open_socket(timeout)
        self._lock = threading.Lock()
        self._seq = 0
        self._buf = bytearray(RECV_BUFFER)
        self._closed = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._sock.close()

    def __enter__(self) -> RtNetlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- transport

    def _receive(self) -> list[Message]:
        try:
            n = self._sock.recv_into(self._buf, len(self._buf), socket.MSG_TRUNC)
        except TimeoutError:
            raise OSError(
                errno.ETIMEDOUT, f"netlink: no reply from the kernel within {self.timeout:g} s"
            ) from None
        if n > len(self._buf):
            raise OSError(errno.EMSGSIZE, f"netlink reply of {n} bytes exceeds {len(self._buf)}")
        if n <= 0:
            raise _bad("empty datagram")
        return split_messages(memoryview(self._buf)[:n])

    def _exchange(self, msg_type: int, flags: int, body: bytes) -> tuple[list[Message], bool]:
        """Send one request; return its reply's data messages and whether the dump was
        interrupted by a concurrent change (NLM_F_DUMP_INTR).

        A dump is read to its end even past a malformed datagram (the error is raised
        then): the kernel refuses a new dump on a socket whose dump is unfinished.
        """
        dump = flags & NLM_F_DUMP == NLM_F_DUMP
        with self._lock:
            if self._closed:
                raise OSError(errno.EBADF, "netlink socket is closed")
            self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
            seq = self._seq
            self._sock.send(nlmsg(msg_type, flags, seq, body))
            out: list[Message] = []
            interrupted = False
            failure: OSError | None = None
            while True:
                try:
                    msgs = self._receive()
                except OSError as e:
                    if failure is not None:
                        raise failure from None
                    if not dump or e.errno not in (errno.EBADMSG, errno.EMSGSIZE):
                        raise
                    failure = e
                    continue
                for msg in msgs:
                    if msg.seq != seq or msg.type == NLMSG_NOOP:
                        continue  # e.g. a late reply to an abandoned request
                    if msg.type in (NLMSG_ERROR, NLMSG_DONE):
                        code, text = parse_error(msg)
                        if code:
                            raise NetlinkError(code, text)
                        if failure is not None:
                            raise failure
                        return out, interrupted
                    if msg.type == NLMSG_OVERRUN:
                        raise OSError(errno.ENOBUFS, "netlink: the kernel lost part of a reply")
                    interrupted = interrupted or bool(msg.flags & NLM_F_DUMP_INTR)
                    out.append(msg)
                    if not dump and not flags & NLM_F_ACK and not msg.flags & NLM_F_MULTI:
                        return out, interrupted

    def _do(self, msg_type: int, body: bytes, flags: int = 0) -> list[Message]:
        return self._exchange(msg_type, NLM_F_REQUEST | NLM_F_ACK | flags, body)[0]

    def _dump(self, msg_type: int, body: bytes, reply_type: int) -> list[Message]:
        for _ in range(DUMP_ATTEMPTS):
            msgs, interrupted = self._exchange(msg_type, NLM_F_REQUEST | NLM_F_DUMP, body)
            if not interrupted:
                break
        return [m for m in msgs if m.type == reply_type]

    # ----------------------------------------------------------------- links

    def _index(self, ifname: str) -> int | None:
        name = ifname.encode()
        if not 0 < len(name) < IFNAMSIZ or b"\0" in name:
            return None
        try:
            msgs = self._do(RTM_GETLINK, link_request(name=name, get=True))
        except NetlinkError:
            return None  # ENODEV, or a name the kernel rejects: no such link
        for msg in msgs:
            if msg.type == RTM_NEWLINK:
                return parse_link(msg.body)[0]
        return None

    def _need_index(self, ifname: str) -> int:
        idx = self._index(ifname)
        if idx is None:
            raise OSError(errno.ENODEV, f"no such device: {ifname}")
        return idx

    def _names(self) -> dict[int, str]:
        out: dict[int, str] = {}
        for msg in self._dump(RTM_GETLINK, link_request(get=True), RTM_NEWLINK):
            index, name = parse_link(msg.body)
            if name is not None:
                out[index] = name
        return out

    def _name(self, index: int) -> str:
        try:
            msgs = self._do(RTM_GETLINK, link_request(index, get=True))
        except NetlinkError:
            return ""
        for msg in msgs:
            if msg.type == RTM_NEWLINK:
                return parse_link(msg.body)[1] or ""
        return ""

    def link_exists(self, ifname: str) -> bool:
        return self._index(ifname) is not None

    def link_names(self) -> set[str]:
        return set(self._names().values())

    def link_delete(self, ifname: str) -> None:
        self._do(RTM_DELLINK, link_request(self._need_index(ifname)))

    # ----------------------------------------------------------------- addresses

    def addresses(self, ifname: str) -> set[IPInterface]:
        idx = self._index(ifname)
        if idx is None:
            return set()
        request = address_dump_request(idx)
        out: set[IPInterface] = set()
        for msg in self._dump(RTM_GETADDR, request, RTM_NEWADDR):
            found = parse_address(msg.body)
            if found is not None and found[0] == idx:
                out.add(found[1])
        return out

    def address_add(self, ifname: str, addr: IPInterface, prefix_route: bool = True) -> None:
        # IPv6: IFA_F_NODAD makes it usable at once, no 1-2 s of "tentative"
        flags = IFA_F_NODAD if addr.version == 6 else 0
        if not prefix_route:
            flags |= IFA_F_NOPREFIXROUTE
        body = address_request(self._need_index(ifname), addr, flags)
        self._do(RTM_NEWADDR, body, NLM_F_CREATE | NLM_F_EXCL)

    def address_del(self, ifname: str, addr: IPInterface) -> None:
        self._do(RTM_DELADDR, address_request(self._need_index(ifname), addr))

    # ----------------------------------------------------------------- routes

    def _route_messages(self, version: int) -> list[RouteMessage]:
        af = _af(version)
        msgs = self._dump(RTM_GETROUTE, route_dump_request(af), RTM_NEWROUTE)
        return [r for r in map(parse_route, (m.body for m in msgs)) if r.family == af]

    def routes(
        self, *, table: int | None = None, dev: str | None = None
    ) -> list[tuple[Route, int]]:
        names = self._names()
        out: list[tuple[Route, int]] = []
        for version in (4, 6):
            for r in self._route_messages(version):
                if r.type != RTN_UNICAST or (table is not None and r.table != table):
                    continue
                rdev = names.get(r.oif, "") if r.oif is not None else ""
                if dev is not None and rdev != dev:
                    continue
                out.append((Route(r.network(), rdev, r.table, r.via()), r.protocol))
        return out

    def _oif(self, route: Route) -> int | None:
        return self._need_index(route.dev) if route.dev else None

    def route_add(self, route: Route) -> None:
        body = route_request(route, self._oif(route), ROUTE_PROTO, RT_SCOPE_UNIVERSE)
        self._do(RTM_NEWROUTE, body, NLM_F_CREATE | NLM_F_EXCL)

    def route_del(self, route: Route, proto: int = ROUTE_PROTO) -> None:
        # proto is part of the match: never delete the kernel's twin of our route.
        self._do(RTM_DELROUTE, route_request(route, self._oif(route), proto, RT_SCOPE_NOWHERE))

    # ----------------------------------------------------------------- rules

    def rules(self) -> set[Rule]:
        out: set[Rule] = set()
        for version in (4, 6):
            request = rule_dump_request(_af(version))
            for msg in self._dump(RTM_GETRULE, request, RTM_NEWRULE):
                rule = parse_rule(msg.body)
                if rule is not None and rule.family == version:
                    out.add(rule)
        return out

    def rule_add(self, rule: Rule) -> None:
        self._do(RTM_NEWRULE, rule_request(rule), NLM_F_CREATE | NLM_F_EXCL)

    def rule_del(self, rule: Rule) -> None:
        self._do(RTM_DELRULE, rule_request(rule))

    # ----------------------------------------------------------------- lookups

    def route_get(self, addr: IPAddress, mark: int = 0) -> tuple[str, IPAddress | None]:
        for msg in self._do(RTM_GETROUTE, route_get_request(addr, mark)):
            if msg.type == RTM_NEWROUTE:
                r = parse_route(msg.body)
                dev = self._name(r.oif) if r.oif is not None else ""
                return dev, r.via()
        raise _bad(f"no route in the kernel's answer for {addr}")

    def default_interface(self, family: int) -> str | None:
        names = self._names()
        best: tuple[int, str] | None = None
        for r in self._route_messages(family):
            if r.dst_len != 0 or r.type != RTN_UNICAST or r.table != RT_TABLE_MAIN:
                continue
            oif = r.oif if r.oif is not None else r.multipath_oif
            if oif is None or oif not in names:
                continue
            metric = r.priority or 0
            if best is None or metric < best[0]:
                best = (metric, names[oif])
        return best[1] if best else None
