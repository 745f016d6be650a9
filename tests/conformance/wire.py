"""An independent, strict RFC 9297 / RFC 9484 wire codec for the conformance peers.

Written from the RFCs on aioquic's ``Buffer`` varints, sharing nothing with
masqued.proto, so a bug in our codec is not mirrored here. Every check raises
``Violation`` naming the rule broken.
"""

from __future__ import annotations

import ipaddress
import itertools
from dataclasses import dataclass

from aioquic.buffer import Buffer, BufferReadError  # type: ignore[attr-defined]

DATAGRAM, ADDRESS_ASSIGN, ADDRESS_REQUEST, ROUTE_ADVERTISEMENT = 0, 1, 2, 3
H3_DATAGRAM_SETTING = 0x33
ENABLE_CONNECT_PROTOCOL = 0x08
H3_MESSAGE_ERROR = 0x10E
H3_DATAGRAM_ERROR = 0x33


class Violation(AssertionError):
    """The peer broke an RFC rule."""


def varint(value: int) -> bytes:
    buf = Buffer(capacity=8)
    buf.push_uint_var(value)
    return buf.data


def capsule(kind: int, value: bytes) -> bytes:
    return varint(kind) + varint(len(value)) + value


def split_capsules(stream: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """Complete capsules in ``stream`` and the incomplete rest."""
    out: list[tuple[int, bytes]] = []
    buf = Buffer(data=stream)
    while True:
        start = buf.tell()
        try:
            kind = buf.pull_uint_var()
            length = buf.pull_uint_var()
            value = buf.pull_bytes(length)
        except BufferReadError:
            return out, stream[start:]
        out.append((kind, value))


@dataclass(frozen=True)
class Entry:
    request_id: int
    network: ipaddress.IPv4Network | ipaddress.IPv6Network


def _addr(version: int, raw: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.IPv4Address(raw) if version == 4 else ipaddress.IPv6Address(raw)


def parse_address_list(value: bytes, *, request: bool) -> list[Entry]:
    """ADDRESS_ASSIGN / ADDRESS_REQUEST entries with RFC 9484 §4.7.1-2 checks."""
    buf = Buffer(data=value)
    out: list[Entry] = []
    while not buf.eof():
        try:
            rid = buf.pull_uint_var()
            version = buf.pull_uint8()
            if version not in (4, 6):
                raise Violation(f"IP version {version}")
            raw = buf.pull_bytes(4 if version == 4 else 16)
            plen = buf.pull_uint8()
        except BufferReadError:
            raise Violation("truncated address entry") from None
        if plen > (32 if version == 4 else 128):
            raise Violation(f"prefix length {plen}")
        net = ipaddress.ip_network((_addr(version, raw), plen), strict=False)
        if net.network_address != _addr(version, raw):
            raise Violation("host bits set beyond the prefix length")
        if request and rid == 0:
            raise Violation("ADDRESS_REQUEST with request ID 0")
        out.append(Entry(rid, net))
    if request and not out:
        raise Violation("empty ADDRESS_REQUEST")
    return out


@dataclass(frozen=True)
class Range:
    version: int
    start: int
    end: int
    proto: int


def parse_routes(value: bytes) -> list[Range]:
    """ROUTE_ADVERTISEMENT with every ordering rule of RFC 9484 §4.7.3."""
    buf = Buffer(data=value)
    out: list[Range] = []
    while not buf.eof():
        try:
            version = buf.pull_uint8()
            if version not in (4, 6):
                raise Violation(f"IP version {version}")
            size = 4 if version == 4 else 16
            start = int.from_bytes(buf.pull_bytes(size), "big")
            end = int.from_bytes(buf.pull_bytes(size), "big")
            proto = buf.pull_uint8()
        except BufferReadError:
            raise Violation("truncated route") from None
        if start > end:
            raise Violation("start > end")
        out.append(Range(version, start, end, proto))
    for a, b in itertools.pairwise(out):
        if a.version > b.version:
            raise Violation("ranges not sorted by version")
        if a.version == b.version and a.proto > b.proto:
            raise Violation("ranges not sorted by protocol")
        if a.version == b.version and a.proto == b.proto and not a.end < b.start:
            raise Violation("ranges overlap or are unsorted")
    return out


def assign_value(entries: list[Entry]) -> bytes:
    out = b""
    for e in entries:
        out += (
            varint(e.request_id)
            + bytes((e.network.version,))
            + e.network.network_address.packed
            + bytes((e.network.prefixlen,))
        )
    return out


def routes_value(ranges: list[Range]) -> bytes:
    out = b""
    for r in ranges:
        size = 4 if r.version == 4 else 16
        out += (
            bytes((r.version,))
            + r.start.to_bytes(size, "big")
            + r.end.to_bytes(size, "big")
            + bytes((r.proto,))
        )
    return out


def split_datagram(payload: bytes) -> tuple[int, bytes]:
    """Context ID and IP packet of an HTTP Datagram payload (RFC 9484 §6)."""
    buf = Buffer(data=payload)
    ctx = buf.pull_uint_var()
    return ctx, payload[buf.tell() :]


# --- DNS_ASSIGN (draft-ietf-masque-connect-ip-dns-06, as connect-ip-go) ---------------

DNS_ASSIGN = 0x1ACE79EC


@dataclass(frozen=True)
class DnsServer:
    priority: int
    addresses: tuple[str, ...]
    auth_name: str = ""
    params: bytes = b""


@dataclass(frozen=True)
class DnsConfig:
    servers: tuple[DnsServer, ...]
    internal: tuple[str, ...]
    search: tuple[str, ...]


def _domain(name: str) -> bytes:
    return varint(len(name)) + name.encode()


def dns_assign_value(configs: list[DnsConfig]) -> bytes:
    out = b""
    for cfg in configs:
        out += varint(len(cfg.servers))
        for s in cfg.servers:
            v4 = [ipaddress.ip_address(a) for a in s.addresses if ":" not in a]
            v6 = [ipaddress.ip_address(a) for a in s.addresses if ":" in a]
            out += s.priority.to_bytes(2, "big")
            out += varint(len(v4)) + b"".join(a.packed for a in v4)
            out += varint(len(v6)) + b"".join(a.packed for a in v6)
            out += _domain(s.auth_name) + varint(len(s.params)) + s.params
        for names in (cfg.internal, cfg.search):
            out += varint(len(names)) + b"".join(_domain(n) for n in names)
    return out


def parse_dns_assign(value: bytes) -> list[DnsConfig]:
    buf = Buffer(data=value)

    def domain() -> str:
        return buf.pull_bytes(buf.pull_uint_var()).decode("ascii")

    configs = []
    try:
        while buf.tell() < len(value):
            servers = []
            for _ in range(buf.pull_uint_var()):
                priority = buf.pull_uint16()
                if priority == 0:
                    raise Violation("nameserver Service Priority 0 (draft §2.2: MUST NOT)")
                addrs = [
                    str(ipaddress.IPv4Address(buf.pull_bytes(4)))
                    for _ in range(buf.pull_uint_var())
                ]
                addrs += [
                    str(ipaddress.IPv6Address(buf.pull_bytes(16)))
                    for _ in range(buf.pull_uint_var())
                ]
                name = domain()
                params = buf.pull_bytes(buf.pull_uint_var())
                servers.append(DnsServer(priority, tuple(addrs), name, params))
            internal = tuple(domain() for _ in range(buf.pull_uint_var()))
            search = tuple(domain() for _ in range(buf.pull_uint_var()))
            configs.append(DnsConfig(tuple(servers), internal, search))
    except BufferReadError:
        raise Violation("truncated DNS_ASSIGN") from None
    return configs
