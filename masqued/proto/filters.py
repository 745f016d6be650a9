"""Which packets may pass a tunnel: link-local rules, the peer's advertised routes,
and the budget of ICMP errors we answer with (RFC 9484 §4.7.3, §7, §8)."""

from __future__ import annotations

import bisect
from collections.abc import Iterable

from masqued.proto.connect_ip import IPRange
from masqued.proto.errors import PacketError
from masqued.proto.packet import PROTO_ICMP, PROTO_ICMPV6, parse_packet
from masqued.proto.request import IPNetwork

# ICMP errors (Packet Too Big, prohibited) sent to one peer: burst, then per second.
ICMP_BURST = 10.0
ICMP_RATE = 10.0


def is_link_local(version: int, addr: bytes) -> bool:
    """Link-local unicast or link-scope multicast (RFC 9484 §7: never forwarded)."""
    if version == 4:
        return (addr[0] == 169 and addr[1] == 254) or (
            addr[0] == 224 and addr[1] == 0 and addr[2] == 0
        )
    return (addr[0] == 0xFE and addr[1] & 0xC0 == 0x80) or (
        addr[0] == 0xFF and addr[1] & 0x0F == 0x02
    )


class IcmpBudget:
    """Token bucket for the ICMP errors sent to one peer (RFC 1812 §4.3.2.8)."""

    __slots__ = ("_at", "_tokens")

    def __init__(self) -> None:
        self._tokens = ICMP_BURST
        self._at = 0.0

    def take(self, now: float) -> bool:
        self._tokens = min(ICMP_BURST, self._tokens + (now - self._at) * ICMP_RATE)
        self._at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


class RouteFilter:
    """Which packets a peer said it routes (ROUTE_ADVERTISEMENT, RFC 9484 §4.7.3): the
    destination in a range whose IP protocol is 0 or the packet's own. ICMP always
    passes (errors about a flow must reach it)."""

    def __init__(self, ranges: Iterable[IPRange]) -> None:
        spans: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for r in ranges:
            spans.setdefault((r.version, r.ipproto), []).append((int(r.start), int(r.end)))
        self._starts = {k: [a for a, _ in sorted(v)] for k, v in spans.items()}
        self._ends = {k: [b for _, b in sorted(v)] for k, v in spans.items()}

    def _covers(self, version: int, proto: int, addr: int) -> bool:
        starts = self._starts.get((version, proto))
        if not starts:
            return False
        i = bisect.bisect_right(starts, addr) - 1
        return i >= 0 and self._ends[(version, proto)][i] >= addr

    def covers_network(self, net: IPNetwork) -> bool:
        """``net`` lies inside one all-protocol range."""
        lo, hi = int(net.network_address), int(net.broadcast_address)
        starts = self._starts.get((net.version, 0))
        if not starts:
            return False
        i = bisect.bisect_right(starts, lo) - 1
        return i >= 0 and self._ends[(net.version, 0)][i] >= hi

    def allows(self, pkt: bytes) -> bool:
        """May ``pkt`` go to this peer? (Malformed packets: no.)"""
        try:
            info = parse_packet(pkt)
        except PacketError:
            return False
        addr = int(info.dst)
        if self._covers(info.version, 0, addr):
            return True
        if info.proto == (PROTO_ICMP if info.version == 4 else PROTO_ICMPV6):
            return any(self._covers(v, p, addr) for v, p in self._starts if v == info.version)
        return self._covers(info.version, info.proto, addr)
