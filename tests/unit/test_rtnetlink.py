"""RtNetlink against a scripted kernel: request bytes and reply parsing.

Expected bytes are spelled out field by field from the UAPI structs (host byte order
for integers, network order for addresses), independently of the module's encoders:

    nlmsghdr      u32 len, u16 type, u16 flags, u32 seq, u32 pid
    ifinfomsg     u8 family, u8 pad, u16 type, i32 index, u32 flags, u32 change
    ifaddrmsg     u8 family, u8 prefixlen, u8 flags, u8 scope, u32 index
    rtmsg         u8 family, dst_len, src_len, tos, table, protocol, scope, type; u32 flags
    fib_rule_hdr  u8 family, dst_len, src_len, tos, table, res1, res2, action; u32 flags
    rtattr        u16 len, u16 type, payload padded to 4
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from masqued.host import rtnetlink
from masqued.host.routes import Route, Rule
from masqued.host.rtnetlink import NetlinkError, RtNetlink

net = ipaddress.ip_network
ifc = ipaddress.ip_interface
ip = ipaddress.ip_address

T = 0x4D1234  # a table above 255, as InstanceIds makes them
M = 0x4D1234
AF_INET, AF_INET6 = 2, 10

# nlmsg_flags as the kernel headers define them
REQ_ACK = 0x001 | 0x004  # NLM_F_REQUEST | NLM_F_ACK
CREATE = REQ_ACK | 0x200 | 0x400  # ... | NLM_F_EXCL | NLM_F_CREATE
DUMP = 0x001 | 0x300  # NLM_F_REQUEST | NLM_F_DUMP
MULTI = 0x002


def u8(*v: int) -> bytes:
    return bytes(v)


def u16(v: int) -> bytes:
    return v.to_bytes(2, sys.byteorder)


def u32(v: int) -> bytes:
    return v.to_bytes(4, sys.byteorder)


def i32(v: int) -> bytes:
    return v.to_bytes(4, sys.byteorder, signed=True)


def rta(kind: int, payload: bytes) -> bytes:
    size = 4 + len(payload)
    return u16(size) + u16(kind) + payload + bytes(-size % 4)


def nlh(msg_type: int, flags: int, seq: int, body: bytes, pid: int = 4242) -> bytes:
    return u32(16 + len(body)) + u16(msg_type) + u16(flags) + u32(seq) + u32(pid) + body


def ifinfomsg(index: int, *attrs: bytes) -> bytes:
    return u8(0, 0) + u16(1) + i32(index) + u32(0x1003) + u32(0) + b"".join(attrs)


def ifaddrmsg(family: int, plen: int, index: int, *attrs: bytes, flags: int = 0) -> bytes:
    return u8(family, plen, flags, 0) + u32(index) + b"".join(attrs)


def rtmsg(
    family: int, dst_len: int, table: int, proto: int, scope: int, rtype: int, *attrs: bytes
) -> bytes:
    return u8(family, dst_len, 0, 0, table, proto, scope, rtype) + u32(0) + b"".join(attrs)


def fibrule(family: int, table: int, action: int, flags: int, *attrs: bytes) -> bytes:
    return u8(family, 0, 0, 0, table, 0, 0, action) + u32(flags) + b"".join(attrs)


def link(index: int, name: str) -> bytes:
    """An RTM_NEWLINK body with a few attributes RtNetlink does not know."""
    return ifinfomsg(
        index,
        rta(3, name.encode() + b"\0"),  # IFLA_IFNAME
        rta(4, u32(1500)),  # IFLA_MTU
        rta(0x8000 | 26, rta(1, b"x")),  # a nested attribute (NLA_F_NESTED)
        rta(0x3FF0, b"future"),  # a type from a newer kernel
    )


def ack(seq: int, error: int = 0) -> bytes:
    return nlh(2, 0x100, seq, i32(error) + nlh(0, 0, seq, b"", pid=0))


def done(seq: int, status: int = 0) -> bytes:
    return nlh(3, MULTI, seq, i32(status))


Responder = Callable[[int], list[bytes]]


@dataclass
class Kernel:
    """A NetlinkSocket: each request gets the datagrams of the next responder."""

    script: list[Responder]
    sent: list[bytes] = field(default_factory=list)
    queue: list[bytes] = field(default_factory=list)
    closed: bool = False

    def send(self, data: bytes, /) -> int:
        self.sent.append(bytes(data))
        seq = int.from_bytes(data[8:12], sys.byteorder)
        if self.script:
            self.queue += self.script.pop(0)(seq)
        return len(data)

    def recv_into(self, buffer: bytearray, nbytes: int, flags: int, /) -> int:
        if not self.queue:
            raise TimeoutError("timed out")  # what a socket with a timeout raises
        data = self.queue.pop(0)
        buffer[: min(len(data), nbytes)] = data[:nbytes]
        return len(data) if flags & socket.MSG_TRUNC else min(len(data), nbytes)

    def close(self) -> None:
        self.closed = True


def lookup(index: int, name: str) -> Responder:
    """Reply to RTM_GETLINK by name: the link, then the ACK, in one datagram."""
    return lambda seq: [nlh(16, 0, seq, link(index, name)) + ack(seq)]


def acked(seq: int) -> list[bytes]:
    return [ack(seq)]


def refuse(code: int) -> Responder:
    return lambda seq: [ack(seq, -code)]


def dump(msg_type: int, *bodies: bytes, split: int = 1) -> Responder:
    """A multipart dump over ``split`` datagrams, DONE alone in the last one."""

    def respond(seq: int) -> list[bytes]:
        msgs = [nlh(msg_type, MULTI, seq, b) for b in bodies]
        per = max(1, -(-len(msgs) // split))
        grams = [b"".join(msgs[i : i + per]) for i in range(0, len(msgs), per)]
        return [*grams, done(seq)]

    return respond


def links(*pairs: tuple[int, str]) -> Responder:
    return dump(16, *(link(i, n) for i, n in pairs))


def nl_with(*script: Responder) -> tuple[RtNetlink, Kernel]:
    kernel = Kernel(list(script))
    return RtNetlink(timeout=0.1, sock=kernel), kernel


def header(data: bytes) -> tuple[int, int, int, int]:
    """(len, type, flags, seq) of a request, checking len against the datagram."""
    length = int.from_bytes(data[0:4], sys.byteorder)
    assert length == len(data)
    assert data[12:16] == u32(0)  # nlmsg_pid: the kernel fills it in
    return (
        length,
        int.from_bytes(data[4:6], sys.byteorder),
        int.from_bytes(data[6:8], sys.byteorder),
        int.from_bytes(data[8:12], sys.byteorder),
    )


# --------------------------------------------------------------------------- requests

# IFLA_IFNAME "mq-t": 4 + 5 bytes, padded to 12
NAME_MQ_T = u16(9) + u16(3) + b"mq-t\0" + bytes(3)
SKIP_STATS = u16(8) + u16(29) + u32(1 << 3)  # IFLA_EXT_MASK: RTEXT_FILTER_SKIP_STATS


def test_link_lookup_and_delete_requests() -> None:
    nl, k = nl_with(lookup(7, "mq-t"), acked)
    nl.link_delete("mq-t")
    assert k.sent == [
        # RTM_GETLINK by name: ifinfomsg with index 0, IFLA_IFNAME, and IFLA_EXT_MASK
        # RTEXT_FILTER_SKIP_STATS
        nlh(18, REQ_ACK, 1, bytes(16) + NAME_MQ_T + SKIP_STATS, pid=0),
        # RTM_DELLINK by index
        nlh(17, REQ_ACK, 2, u8(0, 0) + u16(0) + i32(7) + u32(0) + u32(0), pid=0),
    ]
    assert [header(m)[:2] for m in k.sent] == [(16 + 16 + 12 + 8, 18), (16 + 16, 17)]


def test_address_requests_ipv4() -> None:
    nl, k = nl_with(lookup(7, "mq-t"), acked, lookup(7, "mq-t"), acked)
    nl.address_add("mq-t", ifc("198.18.7.1/24"))
    nl.address_del("mq-t", ifc("198.18.7.1/24"))
    addr = u8(198, 18, 7, 1)
    body = u8(AF_INET, 24, 0, 0) + u32(7) + u16(8) + u16(2) + addr + u16(8) + u16(1) + addr
    assert k.sent[1] == nlh(20, CREATE, 2, body, pid=0)  # RTM_NEWADDR, IFA_LOCAL+IFA_ADDRESS
    assert k.sent[3] == nlh(21, REQ_ACK, 4, body, pid=0)  # RTM_DELADDR
    assert header(k.sent[1]) == (40, 20, 0x605, 2)


def test_address_requests_ipv6_nodad() -> None:
    nl, k = nl_with(lookup(9, "mq-t"), acked, lookup(9, "mq-t"), acked)
    nl.address_add("mq-t", ifc("2001:db8:7::1/64"))
    nl.address_del("mq-t", ifc("2001:db8:7::1/64"))
    addr = bytes.fromhex("20010db8000700000000000000000001")
    added = (
        u8(AF_INET6, 64, 0x02, 0)  # ifa_flags IFA_F_NODAD
        + u32(9)
        + u16(20)
        + u16(1)  # IFA_ADDRESS only
        + addr
        + u16(8)
        + u16(8)  # IFA_FLAGS
        + u32(0x02)
    )
    assert k.sent[1] == nlh(20, CREATE, 2, added, pid=0)
    deleted = u8(AF_INET6, 64, 0, 0) + u32(9) + u16(20) + u16(1) + addr
    assert k.sent[3] == nlh(21, REQ_ACK, 4, deleted, pid=0)


def test_route_requests() -> None:
    nl, k = nl_with(
        lookup(7, "mq-t"), acked, lookup(3, "eth0"), acked, lookup(7, "mq-t"), acked, acked
    )
    nl.route_add(Route(net("198.19.0.0/24"), "mq-t", T))
    nl.route_del(Route(net("198.19.5.5/32"), "eth0", via=ip("198.18.1.1")), proto=3)
    nl.route_add(Route(net("::/0"), "mq-t", T))
    nl.route_del(Route(net("2001:db8:300::/48"), "", 254), proto=0)
    # RTM_NEWROUTE: table > 255 goes in RTA_TABLE with rtm_table RT_TABLE_UNSPEC,
    # protocol 0x6d, scope universe, type unicast
    assert k.sent[1] == nlh(
        24,
        CREATE,
        2,
        rtmsg(AF_INET, 24, 0, 0x6D, 0, 1)
        + u16(8)
        + u16(15)
        + u32(T)  # RTA_TABLE
        + u16(8)
        + u16(1)
        + u8(198, 19, 0, 0)  # RTA_DST
        + u16(8)
        + u16(4)
        + u32(7),  # RTA_OIF
        pid=0,
    )
    # RTM_DELROUTE: the protocol is matched, scope RT_SCOPE_NOWHERE matches any
    assert k.sent[3] == nlh(
        25,
        REQ_ACK,
        4,
        rtmsg(AF_INET, 32, 254, 3, 255, 1)
        + rta(15, u32(254))
        + rta(1, u8(198, 19, 5, 5))
        + rta(4, u32(3))
        + rta(5, u8(198, 18, 1, 1)),  # RTA_GATEWAY
        pid=0,
    )
    # a default route has no RTA_DST
    assert k.sent[5] == nlh(
        24, CREATE, 6, rtmsg(AF_INET6, 0, 0, 0x6D, 0, 1) + rta(15, u32(T)) + rta(4, u32(7)), pid=0
    )
    # no device: no lookup, no RTA_OIF
    assert k.sent[6] == nlh(
        25,
        REQ_ACK,
        7,
        rtmsg(AF_INET6, 48, 254, 0, 255, 1)
        + rta(15, u32(254))
        + rta(1, bytes.fromhex("20010db8030000000000000000000000")),
        pid=0,
    )


def test_rule_requests() -> None:
    nl, k = nl_with(acked, acked, acked)
    nl.rule_add(Rule(4, 5210, T, fwmark=M, invert=True))
    nl.rule_add(Rule(6, 5209, 254, fwmark=M, invert=True, suppress_prefixlength=0))
    nl.rule_del(Rule(4, 1000, 100, fwmark=0x1))
    # fib_rule_hdr: action FR_ACT_TO_TBL (1), flags FIB_RULE_INVERT (2)
    assert k.sent[0] == nlh(
        32,
        CREATE,
        1,
        fibrule(AF_INET, 0, 1, 2)
        + u16(8)
        + u16(6)
        + u32(5210)  # FRA_PRIORITY
        + u16(8)
        + u16(15)
        + u32(T)  # FRA_TABLE
        + u16(8)
        + u16(10)
        + u32(M),  # FRA_FWMARK
        pid=0,
    )
    assert k.sent[1] == nlh(
        32,
        CREATE,
        2,
        fibrule(AF_INET6, 254, 1, 2)
        + rta(6, u32(5209))
        + rta(15, u32(254))
        + rta(10, u32(M))
        + rta(14, u32(0)),  # FRA_SUPPRESS_PREFIXLEN
        pid=0,
    )
    assert k.sent[2] == nlh(
        33,
        REQ_ACK,
        3,
        fibrule(AF_INET, 100, 1, 0) + rta(6, u32(1000)) + rta(15, u32(100)) + rta(10, u32(1)),
        pid=0,
    )


def test_dump_and_get_requests() -> None:
    nl, k = nl_with(
        lookup(7, "mq-t"),
        dump(20),
        links(),
        dump(24),
        dump(24),
        dump(32),
        dump(32),
        lambda seq: [nlh(24, 0, seq, rtmsg(AF_INET, 32, 254, 2, 0, 1)), ack(seq)],
    )
    assert nl.addresses("mq-t") == set()
    assert nl.routes() == []
    assert nl.rules() == set()
    assert nl.route_get(ip("198.51.100.1")) == ("", None)
    assert k.sent[1] == nlh(22, DUMP, 2, u8(0, 0, 0, 0) + u32(7), pid=0)  # RTM_GETADDR
    assert k.sent[2] == nlh(18, DUMP, 3, bytes(16) + SKIP_STATS, pid=0)  # RTM_GETLINK dump
    assert k.sent[3] == nlh(26, DUMP, 4, rtmsg(AF_INET, 0, 0, 0, 0, 0), pid=0)
    assert k.sent[4] == nlh(26, DUMP, 5, rtmsg(AF_INET6, 0, 0, 0, 0, 0), pid=0)
    assert k.sent[5] == nlh(34, DUMP, 6, fibrule(AF_INET, 0, 0, 0), pid=0)
    assert k.sent[6] == nlh(34, DUMP, 7, fibrule(AF_INET6, 0, 0, 0), pid=0)
    # RTM_GETROUTE for one address: dst_len 32 and RTA_DST, no flags
    assert k.sent[7] == nlh(
        26, REQ_ACK, 8, rtmsg(AF_INET, 32, 0, 0, 0, 0) + rta(1, u8(198, 51, 100, 1)), pid=0
    )


# --------------------------------------------------------------------------- replies


def test_link_exists_and_missing_links() -> None:
    nl, k = nl_with(lookup(5, "eth0"), refuse(errno.ENODEV), refuse(errno.ENODEV))
    assert nl.link_exists("eth0")
    assert not nl.link_exists("mq-gone")
    assert nl.addresses("mq-gone") == set()  # no such link: nothing, no error
    # names the kernel could never have: no request at all
    assert not nl.link_exists("x" * 16) and not nl.link_exists("") and not nl.link_exists("a\0b")
    assert len(k.sent) == 3
    with pytest.raises(OSError) as e:
        nl_with(refuse(errno.ENODEV))[0].address_add("mq-gone", ifc("198.18.0.1/24"))
    assert e.value.errno == errno.ENODEV


def test_addresses_from_a_multipart_dump() -> None:
    stale = nlh(20, MULTI, 1, ifaddrmsg(AF_INET, 8, 7, rta(2, u8(10, 0, 0, 1))))
    a4 = u8(198, 18, 7, 1)
    bodies = [
        ifaddrmsg(AF_INET, 24, 7, rta(1, a4), rta(2, a4), rta(3, b"mq-t\0"), rta(6, bytes(16))),
        # point-to-point: IFA_LOCAL is ours, IFA_ADDRESS the peer
        ifaddrmsg(AF_INET, 32, 7, rta(1, u8(198, 18, 9, 9)), rta(2, u8(198, 18, 7, 2))),
        ifaddrmsg(AF_INET6, 64, 7, rta(1, bytes.fromhex("20010db8" + "00" * 11 + "01"))),
        ifaddrmsg(AF_INET6, 64, 7, rta(1, bytes.fromhex("fe80" + "00" * 13 + "05")), rta(99, b"")),
        ifaddrmsg(AF_INET, 24, 8, rta(2, u8(198, 18, 8, 1))),  # another link
        ifaddrmsg(45, 0, 7, rta(1, b"\x01")),  # another family
        ifaddrmsg(AF_INET, 24, 7, rta(3, b"no address\0")),
    ]

    def respond(seq: int) -> list[bytes]:
        return [stale + nlh(1, 0, seq, b""), *dump(20, *bodies, split=3)(seq)]

    nl, _ = nl_with(lookup(7, "mq-t"), respond)
    assert nl.addresses("mq-t") == {
        ifc("198.18.7.1/24"),
        ifc("198.18.7.2/32"),
        ifc("2001:db8::1/64"),
        ifc("fe80::5/64"),
    }


def test_routes_filtered_by_table_and_device() -> None:
    link_dump = links((1, "lo"), (3, "eth0"), (7, "mq-t"))
    v4 = dump(
        24,
        rtmsg(
            AF_INET, 0, 254, 3, 0, 1, rta(15, u32(254)), rta(5, u8(198, 18, 1, 1)), rta(4, u32(3))
        ),
        rtmsg(
            AF_INET, 24, 252, 0x6D, 0, 1, rta(15, u32(T)), rta(1, u8(198, 19, 0, 0)), rta(4, u32(7))
        ),
        rtmsg(AF_INET, 0, 252, 0x6D, 0, 1, rta(15, u32(T)), rta(4, u32(7)), rta(6, u32(10))),
        # local and broadcast routes are not unicast
        rtmsg(AF_INET, 32, 255, 2, 254, 2, rta(15, u32(255)), rta(1, u8(127, 0, 0, 1))),
        # no RTA_TABLE (old kernel): rtm_table; no RTA_OIF: dev ""
        rtmsg(AF_INET, 16, 100, 4, 0, 1, rta(1, u8(198, 18, 0, 0)), rta(9, b"\x00" * 16)),
        # an unknown device index
        rtmsg(AF_INET, 32, 254, 4, 0, 1, rta(1, u8(198, 18, 3, 3)), rta(4, u32(99))),
        rtmsg(AF_INET6, 0, 254, 3, 0, 1, rta(4, u32(3))),  # wrong family in a v4 dump
        split=2,
    )
    v6 = dump(
        24,
        rtmsg(
            AF_INET6,
            48,
            254,
            0x6D,
            0,
            1,
            rta(15, u32(254)),
            rta(1, bytes.fromhex("20010db803" + "00" * 11)),
            rta(4, u32(7)),
            rta(12, bytes(32)),
        ),
        rtmsg(
            AF_INET6,
            0,
            254,
            9,
            0,
            1,
            rta(15, u32(254)),
            rta(5, bytes.fromhex("fe80" + "00" * 13 + "01")),
            rta(4, u32(3)),
            rta(6, u32(1024)),
        ),
    )
    nl, _ = nl_with(link_dump, v4, v6, link_dump, v4, v6, link_dump, v4, v6)
    everything = nl.routes()
    assert everything == [
        (Route(net("0.0.0.0/0"), "eth0", 254, ip("198.18.1.1")), 3),
        (Route(net("198.19.0.0/24"), "mq-t", T), 0x6D),
        (Route(net("0.0.0.0/0"), "mq-t", T), 0x6D),
        (Route(net("198.18.0.0/16"), "", 100), 4),
        (Route(net("198.18.3.3/32"), "", 254), 4),
        (Route(net("2001:db8:300::/48"), "mq-t", 254), 0x6D),
        (Route(net("::/0"), "eth0", 254, ip("fe80::1")), 9),
    ]
    assert [r for r, _ in nl.routes(table=T)] == [
        Route(net("198.19.0.0/24"), "mq-t", T),
        Route(net("0.0.0.0/0"), "mq-t", T),
    ]
    assert nl.routes(dev="mq-t", table=254) == [(Route(net("2001:db8:300::/48"), "mq-t"), 0x6D)]


def test_rules_from_dumps() -> None:
    v4 = dump(
        32,
        fibrule(
            AF_INET, 255, 1, 0, rta(15, u32(255)), rta(21, u8(2))
        ),  # priority 0: no FRA_PRIORITY
        fibrule(
            AF_INET,
            0,
            1,
            2,
            rta(6, u32(5210)),
            rta(15, u32(T)),
            rta(10, u32(M)),
            rta(14, u32(0xFFFFFFFF)),
        ),
        fibrule(
            AF_INET,
            254,
            1,
            2,
            rta(6, u32(5209)),
            rta(15, u32(254)),
            rta(10, u32(M)),
            rta(16, u32(0xFFFFFFFF)),
            rta(14, u32(0)),
        ),
        fibrule(AF_INET, 100, 1, 0, rta(6, u32(1000))),  # old kernel: table in the header only
        fibrule(AF_INET6, 254, 1, 0, rta(6, u32(1))),  # wrong family
    )
    v6 = dump(32, fibrule(AF_INET6, 254, 1, 0, rta(6, u32(32766)), rta(15, u32(254))))
    nl, _ = nl_with(v4, v6)
    assert nl.rules() == {
        Rule(4, 0, 255),
        Rule(4, 5210, T, fwmark=M, invert=True),
        Rule(4, 5209, 254, fwmark=M, invert=True, suppress_prefixlength=0),
        Rule(4, 1000, 100),
        Rule(6, 32766, 254),
    }


def test_route_get_and_default_interface() -> None:
    def get(seq: int) -> list[bytes]:
        route = rtmsg(
            AF_INET,
            32,
            254,
            0,
            0,
            1,
            rta(15, u32(254)),
            rta(1, u8(198, 51, 100, 1)),
            rta(4, u32(3)),
            rta(5, u8(198, 18, 1, 1)),
            rta(7, u8(198, 18, 1, 2)),
        )
        return [nlh(24, 0, seq, route), ack(seq)]  # the answer and the ACK apart

    nexthop = u16(16) + u8(0, 0) + i32(7) + rta(5, u8(198, 18, 2, 1))
    defaults = dump(
        24,
        rtmsg(AF_INET, 0, 254, 3, 0, 1, rta(15, u32(254)), rta(4, u32(3)), rta(6, u32(600))),
        rtmsg(AF_INET, 0, 254, 3, 0, 1, rta(15, u32(254)), rta(9, nexthop), rta(6, u32(100))),
        rtmsg(AF_INET, 0, 254, 3, 0, 1, rta(15, u32(254)), rta(4, u32(99))),  # gone device
        rtmsg(AF_INET, 0, 252, 0x6D, 0, 1, rta(15, u32(T)), rta(4, u32(8))),  # not main
        rtmsg(AF_INET, 0, 254, 3, 0, 7, rta(15, u32(254))),  # unreachable default
        rtmsg(AF_INET, 24, 254, 2, 0, 1, rta(15, u32(254)), rta(4, u32(1))),  # not default
    )
    nl, k = nl_with(
        get,
        lambda seq: [nlh(16, 0, seq, link(3, "eth0")), ack(seq)],
        links((1, "lo"), (3, "eth0"), (7, "mq-t"), (8, "mq-u")),
        defaults,
        links((1, "lo")),
        dump(24),
    )
    assert nl.route_get(ip("198.51.100.1")) == ("eth0", ip("198.18.1.1"))
    link3 = u8(0, 0) + u16(0) + i32(3) + u32(0) + u32(0)
    assert k.sent[1] == nlh(18, REQ_ACK, 2, link3 + SKIP_STATS, pid=0)
    assert nl.default_interface(4) == "mq-t"  # the multipath one has the lowest metric
    assert nl.default_interface(6) is None


# --------------------------------------------------------------------------- errors


def test_kernel_errors_become_oserror_with_errno() -> None:
    nl, _ = nl_with(refuse(errno.EEXIST), refuse(errno.ENOENT))
    with pytest.raises(NetlinkError) as e:
        nl.rule_add(Rule(4, 5210, T))
    assert isinstance(e.value, OSError)
    assert (e.value.errno, e.value.strerror) == (errno.EEXIST, "File exists")
    with pytest.raises(OSError) as e2:
        nl.rule_del(Rule(4, 5210, T))
    assert e2.value.errno == errno.ENOENT


def test_extended_ack_text() -> None:
    text = rta(1, b"Nexthop has invalid gateway\0")

    def capped(seq: int) -> list[bytes]:
        # NLM_F_CAPPED | NLM_F_ACK_TLVS: the request's header only, then the TLVs
        return [nlh(2, 0x300, seq, i32(-errno.EINVAL) + nlh(24, CREATE, seq, b"", pid=0) + text)]

    def uncapped(seq: int) -> list[bytes]:
        request = nlh(24, CREATE, seq, rtmsg(AF_INET, 0, 254, 0, 0, 1), pid=0)
        return [nlh(2, 0x200, seq, i32(-errno.EINVAL) + request + text)]

    nl, _ = nl_with(capped, uncapped, lambda seq: [nlh(2, 0x200, seq, i32(-22) + b"\xff")])
    for _ in range(2):
        with pytest.raises(OSError) as e:
            nl.rule_add(Rule(4, 1, 254))
        assert e.value.errno == errno.EINVAL
        assert e.value.strerror == "Invalid argument (Nexthop has invalid gateway)"
    with pytest.raises(OSError) as e:  # unreadable TLVs: the plain text
        nl.rule_add(Rule(4, 1, 254))
    assert e.value.strerror == "Invalid argument"


def test_dump_error_in_done_and_in_error() -> None:
    nl, _ = nl_with(
        lambda seq: [nlh(32, MULTI, seq, fibrule(AF_INET, 254, 1, 0)), done(seq, -errno.EBUSY)],
        refuse(errno.EOPNOTSUPP),
    )
    with pytest.raises(OSError) as e:
        nl.rules()
    assert e.value.errno == errno.EBUSY
    with pytest.raises(OSError) as e:
        nl.rules()
    assert e.value.errno == errno.EOPNOTSUPP


def test_interrupted_dump_is_repeated() -> None:
    def interrupted(seq: int) -> list[bytes]:
        return [nlh(32, MULTI | 0x10, seq, fibrule(AF_INET, 254, 1, 0, rta(6, u32(9)))), done(seq)]

    v4 = dump(32, fibrule(AF_INET, 254, 1, 0, rta(6, u32(32766))))
    nl, k = nl_with(interrupted, v4, dump(32))
    assert nl.rules() == {Rule(4, 32766, 254)}
    assert len(k.sent) == 3


def test_no_reply_is_a_timeout_not_a_hang() -> None:
    nl, _ = nl_with(lambda seq: [])
    with pytest.raises(OSError) as e:
        nl.link_exists("eth0")
    assert e.value.errno == errno.ETIMEDOUT
    # a dump that stops half way, and only stale replies
    nl, _ = nl_with(lambda seq: [nlh(16, MULTI, seq, link(1, "lo"))], lambda seq: [ack(seq - 1)])
    for _ in range(2):
        with pytest.raises(OSError) as e:
            nl.routes() if _ == 0 else nl.rule_add(Rule(4, 1, 254))
        assert e.value.errno == errno.ETIMEDOUT


@pytest.mark.parametrize(
    "datagram",
    [
        b"\x01\x02\x03",  # shorter than a header
        u32(8) + bytes(12),  # nlmsg_len below the header size
        u32(64) + u16(2) + u16(0) + u32(1) + u32(0) + bytes(8),  # longer than the datagram
        ack(1) + b"\x00\x00",  # stray bytes after the last message
    ],
)
def test_garbage_datagrams_raise_ebadmsg(datagram: bytes) -> None:
    nl, _ = nl_with(lambda seq: [datagram])
    with pytest.raises(OSError) as e:
        nl.rule_del(Rule(4, 1, 254))
    assert e.value.errno == errno.EBADMSG


@pytest.mark.parametrize(
    "body",
    [
        ifaddrmsg(AF_INET, 24, 7)[:5],  # short ifaddrmsg
        ifaddrmsg(AF_INET, 24, 7, u16(40) + u16(1) + u8(1, 2, 3, 4)),  # attribute overruns
        ifaddrmsg(AF_INET, 24, 7, u16(2) + u16(1)),  # attribute shorter than its header
        ifaddrmsg(AF_INET, 24, 7, rta(1, u8(1, 2, 3))),  # 3-byte IPv4 address
        ifaddrmsg(AF_INET, 33, 7, rta(1, u8(1, 2, 3, 4))),  # impossible prefix
        ifaddrmsg(AF_INET6, 64, 7, rta(1, u8(1, 2, 3, 4))),  # IPv4-sized IPv6 address
    ],
)
def test_malformed_messages_raise_ebadmsg(body: bytes) -> None:
    nl, _ = nl_with(lookup(7, "mq-t"), dump(20, body))
    with pytest.raises(OSError) as e:
        nl.addresses("mq-t")
    assert e.value.errno == errno.EBADMSG


def test_bad_datagram_in_a_dump_is_read_past() -> None:
    """The rest of the dump is consumed (else the kernel says EBUSY to the next one)."""

    def respond(seq: int) -> list[bytes]:
        good = nlh(32, MULTI, seq, fibrule(AF_INET, 254, 1, 0))
        return [good, b"garbage!", good, done(seq)]

    nl, k = nl_with(respond, dump(32), dump(32), dump(32))
    with pytest.raises(OSError) as e:
        nl.rules()
    assert e.value.errno == errno.EBADMSG
    assert k.queue == []  # nothing left behind
    assert nl.rules() == set()  # and the socket still works


def test_truncated_datagram_is_reported() -> None:
    nl, _ = nl_with(lambda seq: [ack(seq) + bytes(rtnetlink.RECV_BUFFER)])
    with pytest.raises(OSError) as e:
        nl.rule_del(Rule(4, 1, 254))
    assert e.value.errno == errno.EMSGSIZE


def test_close_and_context_manager() -> None:
    kernel = Kernel([])
    with RtNetlink(sock=kernel) as nl:
        pass
    assert kernel.closed
    nl.close()  # idempotent
    with pytest.raises(OSError) as e:
        nl.rules()
    assert e.value.errno == errno.EBADF


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.sampled_from([20, 24, 32]))
def test_fuzzed_replies_raise_only_oserror(junk: bytes, msg_type: int) -> None:
    def respond(seq: int) -> list[bytes]:
        return [nlh(msg_type, MULTI, seq, junk) if junk[:1] != b"!" else junk, done(seq)]

    nl, _ = nl_with(lookup(7, "mq-t"), respond, respond, respond, respond)
    for call in (lambda: nl.addresses("mq-t"), nl.rules):
        with contextlib.suppress(OSError):
            call()


def test_import_is_light() -> None:
    """No pyroute2, and nothing that starts threads or event loops."""
    code = (
        "import sys, masqued.host.rtnetlink, masqued.host.cleanup; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'pyroute2', 'asyncio', 'concurrent', 'multiprocessing', 'ctypes'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_real_socket_lists_links() -> None:
    """Reading the test process's own namespace changes nothing."""
    try:
        nl = RtNetlink()
    except OSError as e:  # pragma: no cover - sandbox without netlink
        pytest.skip(f"no netlink: {e}")
    with nl:
        assert nl.link_exists("lo")
        assert not nl.link_exists("mq-surely-not")
        assert 1 in nl._names()
