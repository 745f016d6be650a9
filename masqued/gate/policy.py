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
datagram can ever be reassembled). This module is pure and per-packet fast: rules are
compiled to integers, the packet header is read with slicing, no objects are created
on the allow path.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

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
        elif name.isdigit() and int(name) <= 255:
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
        try:
            lo = int(lo_s)
            hi = int(hi_s) if sep else lo
        except ValueError:
            raise PolicyError(f"{text!r}: bad port {item!r}") from None
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


def describe(acl: Acl) -> list[str]:
    """The ACL as the operator wrote it (for status output)."""
    return [str(r) for r in acl.rules] + [f"default {'allow' if acl.default_allow else 'deny'}"]


def rules_for(acl: Acl, version: int) -> Sequence[Rule]:
    return [r for r in acl.rules if r.network.version == version]
