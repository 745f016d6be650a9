"""RFC 9484 §4.7 capsules and §5-§6 HTTP Datagram payloads, encoded and checked.

ADDRESS_ASSIGN (0x01), ADDRESS_REQUEST (0x02) and ROUTE_ADVERTISEMENT (0x03) are
decoded from a capsule's value with every MUST of §4.7 checked; any violation
raises ``CapsuleError`` (the request stream is then aborted with
H3_MESSAGE_ERROR, RFC 9297 §3.3). The encoders refuse to build what the decoders
would reject, so a bug on our side surfaces here rather than at the peer.
"""

from __future__ import annotations

import bisect
import ipaddress
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from masqued.proto.capsule import (
    ADDRESS_ASSIGN,
    ADDRESS_REQUEST,
    ROUTE_ADVERTISEMENT,
    encode_capsule,
    encode_varint,
    read_varint,
)
from masqued.proto.errors import CapsuleError

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

#: Context ID of IP packets in HTTP Datagrams (RFC 9484 §6).
IP_CONTEXT_ID = 0
_ADDR_LEN = {4: 4, 6: 16}
_MAX_PREFIX = {4: 32, 6: 128}


# --- HTTP Datagram payload (RFC 9484 §6) ---------------------------------------------


def encode_ip_datagram(packet: bytes) -> bytes:
    """The HTTP Datagram payload carrying ``packet``: Context ID 0 then the packet."""
    return b"\x00" + packet


def decode_datagram_payload(payload: bytes) -> tuple[int, bytes]:
    """``(context_id, rest)`` of an HTTP Datagram payload; CapsuleError if truncated."""
    context_id, pos = read_varint(payload, 0, "context ID")
    return context_id, payload[pos:]


# --- address prefixes -------------------------------------------------------------------


def _pull_prefix(value: bytes, pos: int, what: str) -> tuple[int, IPNetwork, int]:
    """Request ID, prefix, next position of one Assigned/Requested Address."""
    request_id, pos = read_varint(value, pos, f"{what} request ID")
    if pos >= len(value):
        raise CapsuleError(f"truncated {what}")
    version = value[pos]
    size = _ADDR_LEN.get(version)
    if size is None:
        raise CapsuleError(f"{what}: IP version {version} (must be 4 or 6)")
    end = pos + 1 + size + 1
    if end > len(value):
        raise CapsuleError(f"truncated {what}")
    raw = value[pos + 1 : pos + 1 + size]
    prefix_len = value[end - 1]
    if prefix_len > _MAX_PREFIX[version]:
        raise CapsuleError(f"{what}: prefix length {prefix_len} for IPv{version}")
    address = ipaddress.ip_address(raw)
    try:
        network = ipaddress.ip_network((address, prefix_len), strict=True)
    except ValueError:
        raise CapsuleError(f"{what}: {address}/{prefix_len} has host bits set") from None
    return request_id, network, end


def _push_prefix(request_id: int, prefix: IPNetwork) -> bytes:
    return (
        encode_varint(request_id)
        + bytes((prefix.version,))
        + prefix.network_address.packed
        + bytes((prefix.prefixlen,))
    )


@dataclass(frozen=True, slots=True)
class AssignedAddress:
    """One entry of ADDRESS_ASSIGN. ``request_id`` 0: not an answer to a request."""

    request_id: int
    prefix: IPNetwork

    @property
    def is_rejection(self) -> bool:
        """All-zero address with full prefix: "could not assign" (§4.7.2)."""
        return (
            int(self.prefix.network_address) == 0
            and self.prefix.prefixlen == self.prefix.max_prefixlen
        )


@dataclass(frozen=True, slots=True)
class RequestedAddress:
    """One entry of ADDRESS_REQUEST; an all-zero address means "any of this family"."""

    request_id: int
    prefix: IPNetwork


@dataclass(frozen=True, slots=True)
class AddressAssign:
    addresses: tuple[AssignedAddress, ...]

    def usable(self) -> tuple[IPNetwork, ...]:
        """The assigned prefixes, without rejection entries."""
        return tuple(a.prefix for a in self.addresses if not a.is_rejection)


@dataclass(frozen=True, slots=True)
class AddressRequest:
    requests: tuple[RequestedAddress, ...]


def rejection(request_id: int, version: int) -> AssignedAddress:
    """The Assigned Address that answers an unfulfilled request (0.0.0.0/32 or ::/128)."""
    if version == 4:
        return AssignedAddress(request_id, IPv4Network("0.0.0.0/32"))
    return AssignedAddress(request_id, IPv6Network("::/128"))


def encode_address_assign(addresses: Iterable[AssignedAddress]) -> bytes:
    """A whole ADDRESS_ASSIGN capsule (zero entries: all addresses withdrawn)."""
    body = b"".join(_push_prefix(a.request_id, a.prefix) for a in addresses)
    return encode_capsule(ADDRESS_ASSIGN, body)


def decode_address_assign(value: bytes) -> AddressAssign:
    """Decode and check an ADDRESS_ASSIGN value (RFC 9484 §4.7.1)."""
    out: list[AssignedAddress] = []
    pos = 0
    while pos < len(value):
        request_id, prefix, pos = _pull_prefix(value, pos, "ADDRESS_ASSIGN")
        out.append(AssignedAddress(request_id, prefix))
    return AddressAssign(tuple(out))


def encode_address_request(requests: Sequence[RequestedAddress]) -> bytes:
    """A whole ADDRESS_REQUEST capsule; ValueError for what §4.7.2 forbids."""
    if not requests:
        raise ValueError("ADDRESS_REQUEST needs at least one Requested Address")
    ids = [r.request_id for r in requests]
    if 0 in ids or len(set(ids)) != len(ids):
        raise ValueError("request IDs must be non-zero and distinct")
    body = b"".join(_push_prefix(r.request_id, r.prefix) for r in requests)
    return encode_capsule(ADDRESS_REQUEST, body)


def decode_address_request(value: bytes) -> AddressRequest:
    """Decode and check an ADDRESS_REQUEST value (RFC 9484 §4.7.2).

    Empty capsules, request ID 0 and a request ID repeated within the capsule are
    errors (the latter two break "MUST NOT be reused and MUST NOT be zero"); reuse
    across capsules is checked by the receiver's session state.
    """
    out: list[RequestedAddress] = []
    seen: set[int] = set()
    pos = 0
    while pos < len(value):
        request_id, prefix, pos = _pull_prefix(value, pos, "ADDRESS_REQUEST")
        if request_id == 0:
            raise CapsuleError("ADDRESS_REQUEST with request ID 0")
        if request_id in seen:
            raise CapsuleError(f"ADDRESS_REQUEST reuses request ID {request_id}")
        seen.add(request_id)
        out.append(RequestedAddress(request_id, prefix))
    if not out:
        raise CapsuleError("empty ADDRESS_REQUEST")
    return AddressRequest(tuple(out))


# --- routes ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IPRange:
    """One IP Address Range of ROUTE_ADVERTISEMENT: ``start``..``end`` inclusive.

    ``ipproto`` 0 means every protocol (RFC 9484 §4.7.3).
    """

    start: IPAddress
    end: IPAddress
    ipproto: int = 0

    @property
    def version(self) -> int:
        return self.start.version

    def networks(self) -> list[IPNetwork]:
        """The CIDR blocks that exactly cover this range."""
        return list(ipaddress.summarize_address_range(self.start, self.end))  # type: ignore[arg-type]

    def __contains__(self, addr: object) -> bool:
        if not isinstance(addr, IPv4Address | IPv6Address) or addr.version != self.version:
            return False
        return self.start <= addr <= self.end  # type: ignore[operator]


@dataclass(frozen=True, slots=True)
class RouteAdvertisement:
    ranges: tuple[IPRange, ...]

    def networks(self) -> tuple[IPNetwork, ...]:
        """Every range as CIDR blocks, protocol-specific ranges included, deduplicated."""
        return self.some_networks(None)[0]

    def some_networks(self, limit: int | None) -> tuple[tuple[IPNetwork, ...], bool]:
        """At most ``limit`` of the CIDR blocks (None: all), and whether that is all.

        A range that is not CIDR-aligned is up to 2 x 128 blocks: 16 KB of ranges can
        expand into 10^5 networks, seconds of work; a bound keeps that per capsule.
        """
        seen: dict[IPNetwork, None] = {}
        complete = True
        for r in self.ranges:
            blocks = ipaddress.summarize_address_range(r.start, r.end)  # type: ignore[type-var]
            for net in blocks:
                if limit is not None and len(seen) >= limit:
                    complete = False
                    break
                seen[net] = None  # type: ignore[index]
            if not complete:
                break
        nets = tuple(ipaddress.collapse_addresses([n for n in seen if n.version == 4])) + tuple(  # type: ignore[misc]
            ipaddress.collapse_addresses([n for n in seen if n.version == 6])  # type: ignore[misc]
        )
        return nets, complete


def _check_order(ranges: Sequence[IPRange]) -> None:
    """§4.7.3: sorted by version, then protocol, then disjoint ascending addresses;
    and no protocol-0 range overlapping a protocol-specific one (optional check)."""
    for a, b in itertools.pairwise(ranges):
        if a.version > b.version:
            raise CapsuleError("ROUTE_ADVERTISEMENT ranges not ordered by IP version")
        if a.version == b.version:
            if a.ipproto > b.ipproto:
                raise CapsuleError("ROUTE_ADVERTISEMENT ranges not ordered by IP protocol")
            if a.ipproto == b.ipproto and not a.end < b.start:  # type: ignore[operator]
                raise CapsuleError(
                    f"ROUTE_ADVERTISEMENT ranges {a.start}-{a.end} and {b.start}-{b.end} "
                    "overlap or are not in ascending order"
                )
    for version in (4, 6):
        wildcard = [r for r in ranges if r.version == version and r.ipproto == 0]
        specific = [r for r in ranges if r.version == version and r.ipproto != 0]
        if not wildcard or not specific:
            continue
        # ``wildcard`` is sorted and disjoint: bisect for the last one starting at or
        # before each specific range's end (bounded work for a hostile capsule).
        starts = [int(w.start) for w in wildcard]
        for s in specific:
            i = bisect.bisect_right(starts, int(s.end)) - 1
            if i >= 0 and int(wildcard[i].end) >= int(s.start):
                raise CapsuleError(
                    f"ROUTE_ADVERTISEMENT range {s.start}-{s.end} (protocol {s.ipproto}) "
                    "overlaps an all-protocol range"
                )


def encode_route_advertisement(ranges: Sequence[IPRange]) -> bytes:
    """A whole ROUTE_ADVERTISEMENT capsule; ValueError unless the ranges satisfy §4.7.3."""
    for r in ranges:
        if r.start.version != r.end.version or r.start > r.end:  # type: ignore[operator]
            raise ValueError(f"bad range {r.start}-{r.end}")
        if not 0 <= r.ipproto <= 255:
            raise ValueError(f"bad IP protocol {r.ipproto}")
    try:
        _check_order(ranges)
    except CapsuleError as exc:
        raise ValueError(exc.reason) from None
    body = b"".join(
        bytes((r.version,)) + r.start.packed + r.end.packed + bytes((r.ipproto,)) for r in ranges
    )
    return encode_capsule(ROUTE_ADVERTISEMENT, body)


def decode_route_advertisement(value: bytes) -> RouteAdvertisement:
    """Decode and check a ROUTE_ADVERTISEMENT value (RFC 9484 §4.7.3)."""
    out: list[IPRange] = []
    pos = 0
    n = len(value)
    while pos < n:
        version = value[pos]
        size = _ADDR_LEN.get(version)
        if size is None:
            raise CapsuleError(f"ROUTE_ADVERTISEMENT: IP version {version} (must be 4 or 6)")
        end = pos + 1 + 2 * size + 1
        if end > n:
            raise CapsuleError("truncated ROUTE_ADVERTISEMENT")
        start_addr = ipaddress.ip_address(value[pos + 1 : pos + 1 + size])
        end_addr = ipaddress.ip_address(value[pos + 1 + size : pos + 1 + 2 * size])
        if start_addr > end_addr:  # type: ignore[operator]
            raise CapsuleError(f"ROUTE_ADVERTISEMENT range {start_addr}-{end_addr}: start > end")
        out.append(IPRange(start_addr, end_addr, value[end - 1]))
        pos = end
    _check_order(out)
    return RouteAdvertisement(tuple(out))


def ranges_for(networks: Iterable[IPNetwork], ipproto: int = 0) -> tuple[IPRange, ...]:
    """Sorted, merged, disjoint ranges covering ``networks`` (all with ``ipproto``)."""
    out: list[IPRange] = []
    for version in (4, 6):
        nets = [n for n in networks if n.version == version]
        merged: list[list[int]] = []
        for net in sorted(nets, key=lambda n: int(n.network_address)):
            lo, hi = int(net.network_address), int(net.broadcast_address)
            if merged and lo <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        make = IPv4Address if version == 4 else IPv6Address
        out.extend(IPRange(make(lo), make(hi), ipproto) for lo, hi in merged)
    return tuple(out)
