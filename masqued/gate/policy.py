"""Per-client access control: which destinations a client's packets may reach.

An ACL is an ordered list of rules, first match wins, then the default::

    allow 198.19.0.0/24 tcp 8080
    allow 2001:db8:19::/64 udp 53,5000-5010
    deny  198.19.0.0/16
    allow 0.0.0.0/0 icmp

A rule is ``allow|deny CIDR [PROTO [PORTS]]``: PROTO is a name (tcp, udp, icmp, icmpv6,
sctp, udplite) or a number 0-255, or ``any``; PORTS (only for tcp/udp/sctp/udplite)
is a comma list of ports and ranges. Fragments: a non-first fragment carries no
transport header, so port conditions cannot be evaluated; it is matched on address
and protocol alone (the first fragment, which holds the ports, decides whether the
datagram can ever be reassembled). PROTO is the upper-layer protocol: IPv6 extension
headers (hop-by-hop, routing, destination options, fragment, AH) are walked to it, so
a TCP segment behind AH matches ``tcp`` and its ports; an IPv4 packet's is its
protocol field (AH there is 51). The ACL filters what a client sends (uplink);
packets to the client are not checked. This module is pure and per-packet fast: rules are
compiled to integers, the packet header is read with slicing, no objects are created
on the allow path.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from masqued.proto.drops import DROP_RELAY_ADDRESS

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

PROTOCOLS: dict[str, int] = {
    "icmp": 1,
    "tcp": 6,
    "udp": 17,
    "icmpv6": 58,
    "ipv6-icmp": 58,
    "sctp": 132,
    "udplite": 136,
    "gre": 47,
    "esp": 50,
}
PORT_PROTOCOLS = frozenset({6, 17, 132, 136})

# IPv6 extension headers we walk to find the upper-layer protocol (RFC 8200 §4).
_V6_EXT = frozenset({0, 43, 60})  # hop-by-hop, routing, destination options
_V6_FRAGMENT = 44
_V6_AH = 51  # Authentication Header: its length counts 4-octet units (RFC 4302 §2.2)
_V6_MAX_EXT = 8


class PolicyError(ValueError):
    """A rule that does not parse; the message says which part is wrong."""


@dataclass(frozen=True)
class Rule:
    allow: bool
    network: IPNetwork
    proto: int | None = None  # None: any protocol
    ports: tuple[tuple[int, int], ...] = ()  # empty: any port

    def __str__(self) -> str:
        parts = ["allow" if self.allow else "deny", str(self.network)]
        if self.proto is not None:
            names = {v: k for k, v in PROTOCOLS.items() if k != "ipv6-icmp"}
            parts.append(names.get(self.proto, str(self.proto)))
        if self.ports:
            parts.append(",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in self.ports))
        return " ".join(parts)


def parse_rule(text: str) -> Rule:
    """Parse ``allow|deny CIDR [PROTO [PORTS]]``."""
    words = text.split()
    if not 2 <= len(words) <= 4:
        raise PolicyError(f"{text!r}: expected 'allow|deny CIDR [PROTO [PORTS]]'")
    action = words[0].lower()
    if action not in ("allow", "deny"):
        raise PolicyError(f"{text!r}: action must be allow or deny, not {words[0]!r}")
    try:
        network = ipaddress.ip_network(words[1], strict=True)
    except ValueError as exc:
        raise PolicyError(f"{text!r}: {exc}") from None
    proto: int | None = None
    if len(words) >= 3 and words[2].lower() != "any":
        name = words[2].lower()
        if name in PROTOCOLS:
            proto = PROTOCOLS[name]
        elif name.isascii() and name.isdigit() and int(name) <= 255:
            proto = int(name)
        else:
            raise PolicyError(f"{text!r}: unknown protocol {words[2]!r}")
        if (proto == 1 and network.version == 6) or (proto == 58 and network.version == 4):
            raise PolicyError(f"{text!r}: {words[2]} does not exist for IPv{network.version}")
    ports: tuple[tuple[int, int], ...] = ()
    if len(words) == 4:
        if proto not in PORT_PROTOCOLS:
            raise PolicyError(f"{text!r}: ports need tcp, udp, sctp or udplite")
        ports = _parse_ports(text, words[3])
    return Rule(allow=action == "allow", network=network, proto=proto, ports=ports)


def _parse_ports(text: str, spec: str) -> tuple[tuple[int, int], ...]:
    out: list[tuple[int, int]] = []
    for item in spec.split(","):
        lo_s, sep, hi_s = item.partition("-")
        # ASCII digits only: int() also takes "٨٠" and " 80", str.isdigit() "²".
        if not all(p.isascii() and p.isdigit() for p in ((lo_s, hi_s) if sep else (lo_s,))):
            raise PolicyError(f"{text!r}: bad port {item!r}")
        lo = int(lo_s)
        hi = int(hi_s) if sep else lo
        if not (0 <= lo <= hi <= 65535):
            raise PolicyError(f"{text!r}: bad port range {item!r}")
        out.append((lo, hi))
    return tuple(sorted(out))


@dataclass(frozen=True)
class Acl:
    """An ordered rule list and the default for packets no rule matches."""

    rules: tuple[Rule, ...] = ()
    default_allow: bool = False

    @classmethod
    def parse(cls, rules: Iterable[str], default: str) -> Acl:
        if default not in ("allow", "deny"):
            raise PolicyError(f"default must be 'allow' or 'deny', not {default!r}")
        return cls(tuple(parse_rule(r) for r in rules), default == "allow")

    def compile(self) -> CompiledAcl:
        return CompiledAcl(self)


# A compiled rule: (allow, net_int, mask_int, proto or -1, ports or None)
_CRule = tuple[bool, int, int, int, tuple[tuple[int, int], ...] | None]


class CompiledAcl:
    """The per-packet form of an ``Acl``."""

    __slots__ = ("_all_allow", "_v4", "_v6", "acl", "default_allow")

    def __init__(self, acl: Acl) -> None:
        self.acl = acl
        self.default_allow = acl.default_allow
        v4: list[_CRule] = []
        v6: list[_CRule] = []
        for r in acl.rules:
            net = r.network
            crule: _CRule = (
                r.allow,
                int(net.network_address),
                int(net.netmask),
                -1 if r.proto is None else r.proto,
                r.ports or None,
            )
            (v4 if net.version == 4 else v6).append(crule)
        self._v4 = tuple(v4)
        self._v6 = tuple(v6)
        # Fast path: nothing to check at all.
        self._all_allow = not acl.rules and acl.default_allow

    def allows(self, pkt: bytes) -> bool:
        """True if ``pkt`` (a full IP packet) may pass. Unparseable packets are denied."""
        if self._all_allow:
            return True
        n = len(pkt)
        if n < 1:
            return False
        version = pkt[0] >> 4
        if version == 4:
            if n < 20:
                return False
            ihl = (pkt[0] & 0x0F) * 4
            if ihl < 20 or n < ihl:
                return False
            dst = int.from_bytes(pkt[16:20], "big")
            proto = pkt[9]
            frag = int.from_bytes(pkt[6:8], "big")
            first = (frag & 0x1FFF) == 0
            off = ihl
            rules = self._v4
        elif version == 6:
            if n < 40:
                return False
            dst = int.from_bytes(pkt[24:40], "big")
            proto = pkt[6]
            off = 40
            first = True
            for _ in range(_V6_MAX_EXT):
                if proto in _V6_EXT:
                    if n < off + 8:
                        return False
                    proto, off = pkt[off], off + (pkt[off + 1] + 1) * 8
                elif proto == _V6_FRAGMENT:
                    if n < off + 8:
                        return False
                    first = (int.from_bytes(pkt[off + 2 : off + 4], "big") >> 3) == 0
                    proto, off = pkt[off], off + 8
                elif proto == _V6_AH:
                    if n < off + 8:
                        return False
                    proto, off = pkt[off], off + (pkt[off + 1] + 2) * 4
                    if n < off:
                        return False
                else:
                    break
            else:
                return False
            rules = self._v6
        else:
            return False
        port = -1
        for allow, net, mask, rproto, ports in rules:
            if dst & mask != net:
                continue
            if rproto != -1 and rproto != proto:
                continue
            if ports is not None and first:
                if port < 0:
                    if n < off + 4:
                        return False  # a first fragment too short to hold its ports
                    port = int.from_bytes(pkt[off + 2 : off + 4], "big")
                if not any(lo <= port <= hi for lo, hi in ports):
                    continue
            return allow
        return self.default_allow



class Reach:
    """Where packets may go: the relay's routes, or a scoped request's target inside
    them (RFC 9484 §4.6), and never one of the relay's own addresses.

    ``check(version, dst)`` takes the destination bytes the data path already has
    (masqued.proto.packet.addresses) and returns "" or the drop reason. The relay's
    hot loop subscripts ``verdicts`` itself (the relay's own addresses are in it from
    the start; flows repeat their destinations) and calls ``verdict`` only on a
    KeyError: one dict lookup per packet whatever the routes, cheaper than a call.
    The cache holds at most ``cache_size`` destinations besides the relay's own.
    Protocol scope and the ACL come after this (ICMP passes a protocol scope, not
    the routes).
    """

    __slots__ = ("_blocked", "_cache_size", "_routed", "outside", "verdicts")

    def __init__(
        self,
        networks: Iterable[IPNetwork],
        blocked: Iterable[bytes],
        outside: str,
        cache_size: int = 4096,
    ) -> None:
        self.outside = outside  # the drop reason for a destination outside ``networks``
        self._blocked = {dst: DROP_RELAY_ADDRESS for dst in blocked}
        self._cache_size = cache_size + len(self._blocked)
        nets: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
        whole: set[int] = set()
        for net in networks:
            if net.prefixlen == 0:
                whole.add(net.version)
            nets[net.version].append((int(net.network_address), int(net.netmask)))
        # None: the whole family is routed (no compare at all).
        self._routed = _route_matcher(
            None if 4 in whole else tuple(nets[4]), None if 6 in whole else tuple(nets[6])
        )
        self.verdicts: dict[bytes, str] = dict(self._blocked)

    def verdict(self, version: int, dst: bytes) -> str:
        """The verdict for a destination not in ``verdicts`` yet; remembered."""
        verdicts = self.verdicts
        if len(verdicts) >= self._cache_size:
            verdicts.clear()
            verdicts.update(self._blocked)
        why = "" if self._routed(version, dst) else self.outside
        verdicts[dst] = why
        return why

    def check(self, version: int, dst: bytes) -> str:
        """"" if a packet to ``dst`` may be forwarded, else the drop reason."""
        why = self.verdicts.get(dst)
        return self.verdict(version, dst) if why is None else why


def _route_matcher(
    v4: tuple[tuple[int, int], ...] | None, v6: tuple[tuple[int, int], ...] | None
) -> Callable[[int, bytes], bool]:
    """``routed(version, dst)`` over closed-over tuples (no attribute lookups)."""
    from_bytes = int.from_bytes

    def routed(version: int, dst: bytes) -> bool:
        nets = v4 if version == 4 else v6
        if nets is None:
            return True
        d = from_bytes(dst, "big")
        for net, mask in nets:  # noqa: SIM110 (a loop: no generator per packet)
            if d & mask == net:
                return True
        return False

    return routed


def relay_addresses(pool: Iterable[IPNetwork]) -> tuple[bytes, ...]:
    """Addresses of the relay itself inside its pool networks, as packed bytes: each
    network's first address (the gateway on the relay's TUN), the network address
    (IPv6: the subnet-router anycast address a forwarding host answers) and, for
    IPv4, the broadcast address. Packets to them would be delivered to the relay
    host rather than forwarded."""
    out: list[bytes] = []
    for net in pool:
        out += [net.network_address.packed, (net.network_address + 1).packed]
        if net.version == 4:
            out.append(net.broadcast_address.packed)
    return tuple(dict.fromkeys(out))


def describe(acl: Acl) -> list[str]:
    """The ACL as the operator wrote it (for status output)."""
    return [str(r) for r in acl.rules] + [f"default {'allow' if acl.default_allow else 'deny'}"]


def rules_for(acl: Acl, version: int) -> Sequence[Rule]:
    return [r for r in acl.rules if r.network.version == version]
