"""DNS configuration from the relay: the DNS_ASSIGN capsule and our stream-mode headers.

DNS_ASSIGN is draft-ietf-masque-connect-ip-dns-06 as connect-ip-go speaks it
(provisional type 0x1ACE79EC; the value is one or more DNS Configurations and has
no Request ID, which the -06 draft dropped together with DNS_REQUEST)::

    DNS Configuration { Nameserver Count (i), Nameserver (..) ...,
                        Internal Domain Count (i), Domain (..) ...,
                        Search Domain Count (i), Domain (..) ... }
    Nameserver { Service Priority (16), IPv4 Address Count (i), IPv4 Address (32) ...,
                 IPv6 Address Count (i), IPv6 Address (128) ...,
                 Authentication Domain Name (Domain), Service Parameters Length (i),
                 Service Parameters (..) }       -- SvcParams, RFC 9460 §2.2
    Domain { Domain Length (i), Domain Name (..) }   -- presentation format, A-labels

What a client can put in a resolver configuration is ``DnsInfo``: nameserver
addresses for plain DNS on port 53, search domains and internal (routing) domains.
Nameservers that only offer encrypted DNS or another port are left out of it
(counted in ``skipped``). Stream mode has no capsules: the same information travels
in the ``masqued-dns`` and ``masqued-dns-search`` response headers.

A DNS_ASSIGN that does not parse is a malformed capsule (CapsuleError, the stream is
aborted, RFC 9297 §3.3); a peer that does not know the type skips it (§3.2).
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from masqued.proto.capsule import DNS_ASSIGN, encode_capsule, encode_varint, read_varint
from masqued.proto.errors import CapsuleError, ResponseError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

__all__ = ["DNS_ASSIGN", "DnsConfiguration", "DnsInfo", "Nameserver"]

DNS_HEADER = "masqued-dns"
DNS_SEARCH_HEADER = "masqued-dns-search"

# Bounds on what one capsule may make us keep (the capsule itself is bounded by the
# framing's control capsule limit).
MAX_SERVERS = 8  # glibc reads 3; resolved takes more
MAX_DOMAINS = 32
MAX_DOMAIN_LEN = 253  # RFC 1035 §2.3.4, presentation form without the final dot

# SvcParamKeys (RFC 9460 §14.3.2) that change how a nameserver is reached.
_SVC_NO_DEFAULT_ALPN = 2
_SVC_PORT = 3

_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def check_domain(name: str) -> str:
    """``name`` without a final dot if it is a usable domain (ASCII labels of letters,
    digits, ``-`` and ``_``), else ValueError."""
    text = name[:-1] if name.endswith(".") else name
    if not text or len(text) > MAX_DOMAIN_LEN:
        raise ValueError(f"{name!r} is not a domain name")
    if not all(_LABEL.fullmatch(label) for label in text.split(".")):
        raise ValueError(f"{name!r} is not a domain name (ASCII letters, digits, - and _)")
    return text.lower()


@dataclass(frozen=True, slots=True)
class Nameserver:
    """One Nameserver structure."""

    priority: int
    addresses: tuple[IPAddress, ...]
    auth_name: str = ""
    service_params: bytes = b""

    @property
    def plain_dns_port(self) -> int | None:
        """The port for plain DNS, None when the nameserver does not offer it
        (``no-default-alpn``) or the SvcParams do not parse."""
        port = 53
        params = _svc_params(self.service_params)
        if params is None or _SVC_NO_DEFAULT_ALPN in params:
            return None
        if _SVC_PORT in params:
            value = params[_SVC_PORT]
            if len(value) != 2:
                return None
            port = int.from_bytes(value, "big")
        return port


@dataclass(frozen=True, slots=True)
class DnsConfiguration:
    """One DNS Configuration structure."""

    nameservers: tuple[Nameserver, ...] = ()
    internal_domains: tuple[str, ...] = ()  # "" is the root: every name
    search_domains: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class DnsInfo:
    """What the client's resolver configuration can use: plain-DNS nameservers on
    port 53 (in priority order), search domains, internal domains ("" = all names)."""

    servers: tuple[IPAddress, ...] = ()
    search: tuple[str, ...] = ()
    domains: tuple[str, ...] = ()
    skipped: int = 0  # nameservers left out (encrypted only, another port)

    def __bool__(self) -> bool:
        return bool(self.servers or self.search)

    def configurations(self) -> tuple[DnsConfiguration, ...]:
        """As one DNS Configuration (what a relay sends)."""
        if not self:
            return ()
        servers = (Nameserver(1, self.servers),) if self.servers else ()
        return (DnsConfiguration(servers, self.domains, self.search),)


def _svc_params(data: bytes) -> dict[int, bytes] | None:
    """SvcParams (RFC 9460 §2.2: key (16), length (16), value), None if malformed."""
    params: dict[int, bytes] = {}
    pos = 0
    while pos < len(data):
        if pos + 4 > len(data):
            return None
        key = int.from_bytes(data[pos : pos + 2], "big")
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        pos += 4
        if pos + length > len(data) or key in params:
            return None
        params[key] = data[pos : pos + length]
        pos += length
    return params


# --- the capsule -------------------------------------------------------------------


def _encode_domain(name: str) -> bytes:
    raw = name.encode("ascii")
    return encode_varint(len(raw)) + raw


def encode_dns_assign(configs: Iterable[DnsConfiguration]) -> bytes:
    """A whole DNS_ASSIGN capsule."""
    out = bytearray()
    for config in configs:
        out += encode_varint(len(config.nameservers))
        for ns in config.nameservers:
            if not 1 <= ns.priority <= 0xFFFF:
                raise ValueError("nameserver priority must be 1..65535 (ServiceMode)")
            v4 = [a for a in ns.addresses if a.version == 4]
            v6 = [a for a in ns.addresses if a.version == 6]
            out += ns.priority.to_bytes(2, "big")
            out += encode_varint(len(v4)) + b"".join(a.packed for a in v4)
            out += encode_varint(len(v6)) + b"".join(a.packed for a in v6)
            out += _encode_domain(ns.auth_name)
            out += encode_varint(len(ns.service_params)) + ns.service_params
        for names in (config.internal_domains, config.search_domains):
            out += encode_varint(len(names))
            for name in names:
                out += _encode_domain(name)
    return encode_capsule(DNS_ASSIGN, bytes(out))


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def varint(self, what: str) -> int:
        value, self.pos = read_varint(self.data, self.pos, what)
        return value

    def take(self, n: int, what: str) -> bytes:
        if n > len(self.data) - self.pos:
            raise CapsuleError(f"DNS_ASSIGN: truncated {what}")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def count(self, what: str, size: int) -> int:
        """A count of items of at least ``size`` bytes each, checked against what is left
        (so a huge count cannot make us loop)."""
        n = self.varint(what)
        if n * size > len(self.data) - self.pos:
            raise CapsuleError(f"DNS_ASSIGN: {what} {n} exceeds the capsule")
        return n

    def domain(self, what: str) -> str:
        length = self.varint(what)
        if length > 255:
            raise CapsuleError(f"DNS_ASSIGN: {what} of {length} bytes")
        raw = self.take(length, what)
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise CapsuleError(f"DNS_ASSIGN: {what} is not ASCII (A-labels)") from None


def decode_dns_assign(value: bytes) -> tuple[DnsConfiguration, ...]:
    """The DNS Configurations of a DNS_ASSIGN capsule value (CapsuleError if malformed)."""
    r = _Reader(value)
    configs: list[DnsConfiguration] = []
    while r.pos < len(value):
        servers: list[Nameserver] = []
        for _ in range(r.count("nameserver count", 6)):
            priority = int.from_bytes(r.take(2, "service priority"), "big")
            if priority == 0:
                raise CapsuleError("DNS_ASSIGN: service priority 0 (AliasMode) is not allowed")
            addrs: list[IPAddress] = []
            n4 = r.count("IPv4 address count", 4)
            addrs += [ipaddress.IPv4Address(r.take(4, "IPv4 address")) for _ in range(n4)]
            n6 = r.count("IPv6 address count", 16)
            addrs += [ipaddress.IPv6Address(r.take(16, "IPv6 address")) for _ in range(n6)]
            auth = r.domain("authentication domain name")
            params = r.take(r.varint("service parameters length"), "service parameters")
            if not auth and not addrs:
                raise CapsuleError("DNS_ASSIGN: nameserver without address or name")
            servers.append(Nameserver(priority, tuple(addrs), auth, params))
        internal = tuple(r.domain("internal domain") for _ in range(r.count("domain count", 1)))
        search = tuple(r.domain("search domain") for _ in range(r.count("domain count", 1)))
        configs.append(DnsConfiguration(tuple(servers), internal, search))
    return tuple(configs)


def dns_info(configs: Sequence[DnsConfiguration]) -> DnsInfo:
    """What of ``configs`` a resolver configuration can use (bounded, deduplicated;
    names that are not plain domain names are left out)."""
    ranked: list[tuple[int, int, IPAddress]] = []
    skipped = 0
    search: dict[str, None] = {}
    domains: dict[str, None] = {}
    for config in configs:
        for ns in config.nameservers:
            if ns.plain_dns_port != 53 or not ns.addresses:
                skipped += 1
                continue
            ranked += [(ns.priority, len(ranked) + i, a) for i, a in enumerate(ns.addresses)]
        for name in config.search_domains:
            _add_name(search, name, root=False)
        for name in config.internal_domains:
            _add_name(domains, name, root=True)
    ranked.sort(key=lambda item: item[:2])  # addresses of both families never compared
    servers = tuple(dict.fromkeys(a for _, _, a in ranked))
    return DnsInfo(
        servers=servers[:MAX_SERVERS],
        search=tuple(search)[:MAX_DOMAINS],
        domains=tuple(domains)[:MAX_DOMAINS],
        skipped=skipped,
    )


def _add_name(into: dict[str, None], name: str, root: bool) -> None:
    if name in ("", ".") and root:
        into[""] = None
        return
    with contextlib.suppress(ValueError):  # not something a resolver config can hold
        into[check_domain(name)] = None


# --- stream mode: headers ------------------------------------------------------------


def dns_headers(info: DnsInfo | None) -> list[tuple[bytes, bytes]]:
    """The stream-mode response headers for ``info`` (none when there is nothing)."""
    if not info:
        return []
    headers = []
    if info.servers:
        headers.append((DNS_HEADER.encode(), ", ".join(map(str, info.servers)).encode()))
    if info.search:
        headers.append((DNS_SEARCH_HEADER.encode(), ", ".join(info.search).encode()))
    return headers


def parse_dns_headers(fields: dict[bytes, str]) -> DnsInfo | None:
    """``masqued-dns`` / ``masqued-dns-search`` of a stream-mode response; ResponseError
    when present and unusable. The relay's nameservers serve every name."""
    servers_text = fields.get(DNS_HEADER.encode())
    search_text = fields.get(DNS_SEARCH_HEADER.encode())
    if servers_text is None and search_text is None:
        return None
    servers: list[IPAddress] = []
    for item in _items(servers_text):
        try:
            if "%" in item:
                raise ValueError(item)
            servers.append(ipaddress.ip_address(item))
        except ValueError:
            raise ResponseError(f"bad nameserver {item!r} in {DNS_HEADER}") from None
    search: list[str] = []
    for item in _items(search_text):
        try:
            search.append(check_domain(item))
        except ValueError:
            raise ResponseError(f"bad domain {item!r} in {DNS_SEARCH_HEADER}") from None
    return DnsInfo(
        servers=tuple(dict.fromkeys(servers))[:MAX_SERVERS],
        search=tuple(dict.fromkeys(search))[:MAX_DOMAINS],
        domains=("",) if servers else (),
    )


def _items(text: str | None) -> list[str]:
    if text is None or not text.strip(" \t"):
        return []
    return [item.strip(" \t") for item in text.split(",")]
