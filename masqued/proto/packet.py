"""IPv4/IPv6 header view, TTL handling and ICMP error builders.

Two speeds: ``addresses()`` is the hot-path check done on every packet (version,
source, destination, length sanity); ``parse_packet()`` is the full view used for
ACL decisions and ICMP. Both take any bytes and either succeed or raise PacketError.

The ``build_*`` helpers make well-formed packets with correct checksums; tests all
over the project use them, so they live here rather than in a test module.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address

from masqued.proto.errors import PacketError

IPAddress = IPv4Address | IPv6Address
BytesLike = bytes | bytearray | memoryview

PROTO_HOPOPTS = 0
PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ROUTING = 43
PROTO_FRAGMENT = 44
PROTO_AH = 51  # Authentication Header (RFC 4302): length in 4-octet units, minus 2
PROTO_ICMPV6 = 58
PROTO_NONE = 59
PROTO_DSTOPTS = 60
PROTO_SCTP = 132
PROTO_UDPLITE = 136

# Transports whose header starts with a 16-bit source and destination port.
_PORT_PROTOS = frozenset((PROTO_TCP, PROTO_UDP, PROTO_SCTP, PROTO_UDPLITE))
# IPv6 extension headers we walk (RFC 8200 §4); anything else is the upper layer.
_EXT_GENERIC = frozenset((PROTO_HOPOPTS, PROTO_ROUTING, PROTO_DSTOPTS))
# Protocol numbers of IPv6 extension headers (IANA registry; ESP left out: nothing
# follows it that we could see, so it is the final protocol). A packet's protocol,
# as scopes and ACLs see it, is never one of these.
EXTENSION_HEADERS = frozenset(
    (PROTO_HOPOPTS, PROTO_ROUTING, PROTO_FRAGMENT, PROTO_AH, PROTO_DSTOPTS, 135, 139, 140, 253, 254)
)
# A peer can chain extension headers; we give up after this many.
MAX_EXTENSION_HEADERS = 8

IPV4_HEADER_LEN = 20
IPV6_HEADER_LEN = 40
ICMP_HEADER_LEN = 8
# Largest ICMP error we send (RFC 1812 §4.3.2.3; RFC 4443 §2.4 (c)).
IPV4_MIN_MTU = 576
IPV6_MIN_MTU = 1280
DEFAULT_TTL = 64

# ICMPv4 types that are queries or replies, not errors (RFC 792, RFC 950). Anything
# else -- the error types and types we do not know -- never gets an error in reply
# (RFC 1122 §3.2.2).
_ICMPV4_INFORMATIONAL = frozenset((0, 8, 9, 10, 13, 14, 15, 16, 17, 18))

_IPV4_BROADCAST = IPv4Address("255.255.255.255")

ICMPV4_DEST_UNREACHABLE = 3
ICMPV4_CODE_FRAG_NEEDED = 4
ICMPV4_CODE_ADMIN_PROHIBITED = 13
ICMPV6_DEST_UNREACHABLE = 1
ICMPV6_CODE_ADMIN_PROHIBITED = 1
ICMPV6_PACKET_TOO_BIG = 2


def internet_checksum(data: BytesLike, initial: int = 0) -> int:
    """RFC 1071 checksum of ``data`` (odd length is padded with a zero byte).

    ``initial`` is a one's-complement partial sum to fold in (a pseudo-header).
    Uses 2**16 ≡ 1 (mod 0xFFFF): the one's-complement sum of the 16-bit words is
    the big-endian integer modulo 0xFFFF, which CPython computes in C.
    """
    raw = bytes(data)
    if len(raw) & 1:
        raw += b"\x00"
    total = int.from_bytes(raw, "big") + initial
    folded = total % 0xFFFF
    if folded == 0 and total:
        folded = 0xFFFF
    return ~folded & 0xFFFF


def pseudo_header_sum(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """One's-complement sum of the TCP/UDP/ICMPv6 pseudo-header (RFC 768, RFC 8200 §8.1)."""
    if len(src) == 4:
        tail = bytes((0, proto)) + length.to_bytes(2, "big")
    else:
        tail = length.to_bytes(4, "big") + bytes((0, 0, 0, proto))
    return int.from_bytes(src + dst + tail, "big") % 0xFFFF


def _fail(reason: str) -> PacketError:
    return PacketError(reason)


def addresses(pkt: BytesLike) -> tuple[int, bytes, bytes]:
    """Hot-path view: ``(version, source bytes, destination bytes)``.

    Raises PacketError if ``pkt`` is too short, not IPv4/IPv6, has an IPv4 IHL
    below 5, or declares more bytes than it holds.
    """
    if not isinstance(pkt, bytes):
        pkt = bytes(pkt)
    n = len(pkt)
    if not n:
        raise _fail("empty packet")
    version = pkt[0] >> 4
    if version == 4:
        if n < IPV4_HEADER_LEN:
            raise _fail(f"IPv4 packet of {n} bytes")
        ihl = (pkt[0] & 0x0F) << 2
        if ihl < IPV4_HEADER_LEN:
            raise _fail(f"IPv4 header length {ihl}")
        total = (pkt[2] << 8) | pkt[3]
        if total > n or total < ihl:
            raise _fail(f"IPv4 total length {total} with header {ihl} in {n} bytes")
        return 4, pkt[12:16], pkt[16:20]
    if version == 6:
        if n < IPV6_HEADER_LEN:
            raise _fail(f"IPv6 packet of {n} bytes")
        payload = (pkt[4] << 8) | pkt[5]
        if payload + IPV6_HEADER_LEN > n:
            raise _fail(f"IPv6 payload length {payload} in {n} bytes")
        return 6, pkt[8:24], pkt[24:40]
    raise _fail(f"IP version {version}")


@dataclass(frozen=True, slots=True)
class PacketInfo:
    """What we need to know about one IP packet.

    ``proto`` is the upper-layer protocol (for IPv6 after the extension headers);
    ``header_len`` is where that protocol's header starts. ``is_fragment`` is true
    for any piece of a fragmented packet (not for IPv6 atomic fragments, RFC 6946);
    ``is_first_fragment`` only for the piece at offset 0. Ports and ICMP type are
    set only when the transport header is present in this packet.
    """

    version: int
    src: IPAddress
    dst: IPAddress
    proto: int
    ttl: int
    header_len: int
    is_fragment: bool
    is_first_fragment: bool
    src_port: int | None
    dst_port: int | None
    icmp_type: int | None
    icmp_code: int | None = None
    length: int = 0

    @property
    def has_transport_header(self) -> bool:
        """True unless this is a non-first fragment."""
        return not self.is_fragment or self.is_first_fragment

    @property
    def is_icmp_error(self) -> bool:
        """True for ICMP/ICMPv6 errors (and unknown ICMPv4 types, to be safe)."""
        if self.icmp_type is None:
            return False
        if self.version == 4:
            return self.icmp_type not in _ICMPV4_INFORMATIONAL
        return self.icmp_type < 128  # RFC 4443 §2.1


def parse_packet(pkt: BytesLike) -> PacketInfo:
    """Parse an IPv4 or IPv6 packet; raise PacketError (only) on anything malformed."""
    if not isinstance(pkt, bytes):
        pkt = bytes(pkt)
    version, src_raw, dst_raw = addresses(pkt)
    src: IPAddress
    dst: IPAddress
    if version == 4:
        header_len = (pkt[0] & 0x0F) << 2
        end = (pkt[2] << 8) | pkt[3]
        frag = (pkt[6] << 8) | pkt[7]
        offset = frag & 0x1FFF
        is_fragment = bool(frag & 0x2000) or offset != 0
        first = offset == 0
        proto = pkt[9]
        ttl = pkt[8]
        src, dst = IPv4Address(src_raw), IPv4Address(dst_raw)
        icmp_proto = PROTO_ICMP
    else:
        end = IPV6_HEADER_LEN + ((pkt[4] << 8) | pkt[5])
        proto = pkt[6]
        ttl = pkt[7]
        header_len = IPV6_HEADER_LEN
        is_fragment = False
        first = True
        src, dst = IPv6Address(src_raw), IPv6Address(dst_raw)
        icmp_proto = PROTO_ICMPV6
        for _ in range(MAX_EXTENSION_HEADERS + 1):
            if proto in _EXT_GENERIC:
                if header_len + 2 > end:
                    raise _fail("truncated IPv6 extension header")
                proto, size = pkt[header_len], (pkt[header_len + 1] + 1) << 3
                header_len += size
                if header_len > end:
                    raise _fail("truncated IPv6 extension header")
            elif proto == PROTO_AH:
                if header_len + 8 > end:
                    raise _fail("truncated IPv6 authentication header")
                proto, size = pkt[header_len], (pkt[header_len + 1] + 2) << 2
                header_len += size
                if header_len > end:
                    raise _fail("truncated IPv6 authentication header")
            elif proto == PROTO_FRAGMENT:
                if header_len + 8 > end:
                    raise _fail("truncated IPv6 fragment header")
                frag = (pkt[header_len + 2] << 8) | pkt[header_len + 3]
                offset = frag >> 3
                proto = pkt[header_len]
                header_len += 8
                if offset or frag & 1:
                    is_fragment = True
                    first = offset == 0
                if offset:
                    break  # the rest is the middle of someone's payload
            else:
                break
        else:
            raise _fail("too many IPv6 extension headers")

    src_port = dst_port = icmp_type = icmp_code = None
    if first:
        if proto in _PORT_PROTOS and header_len + 4 <= end:
            src_port = (pkt[header_len] << 8) | pkt[header_len + 1]
            dst_port = (pkt[header_len + 2] << 8) | pkt[header_len + 3]
        elif proto == icmp_proto and header_len + 2 <= end:
            icmp_type = pkt[header_len]
            icmp_code = pkt[header_len + 1]
    return PacketInfo(
        version=version,
        src=src,
        dst=dst,
        proto=proto,
        ttl=ttl,
        header_len=header_len,
        is_fragment=is_fragment,
        is_first_fragment=is_fragment and first,
        src_port=src_port,
        dst_port=dst_port,
        icmp_type=icmp_type,
        icmp_code=icmp_code,
        length=end,
    )


def decrement_ttl(pkt: BytesLike) -> bytes | None:
    """Return ``pkt`` with TTL / hop limit one lower, or None if it would reach 0.

    The IPv4 header checksum is updated incrementally (RFC 1624 eqn. 3), so a packet
    that arrived with a correct checksum leaves with one. Raises PacketError for
    a packet ``addresses()`` rejects.
    """
    version, _, _ = addresses(pkt)
    out = bytearray(pkt)
    if version == 4:
        ttl = out[8]
        if ttl <= 1:
            return None
        old_word = (ttl << 8) | out[9]
        new_word = old_word - 0x100
        checksum = (out[10] << 8) | out[11]
        # HC' = ~(~HC + ~m + m')
        total = (~checksum & 0xFFFF) + (~old_word & 0xFFFF) + new_word
        total = (total & 0xFFFF) + (total >> 16)
        total = (total & 0xFFFF) + (total >> 16)
        checksum = ~total & 0xFFFF
        out[8] = ttl - 1
        out[10] = checksum >> 8
        out[11] = checksum & 0xFF
    else:
        hop_limit = out[7]
        if hop_limit <= 1:
            return None
        out[7] = hop_limit - 1
    return bytes(out)


# --- builders ---------------------------------------------------------------------------

AddressLike = IPv4Address | IPv6Address | str


def _addr(value: AddressLike) -> IPAddress:
    return value if isinstance(value, IPv4Address | IPv6Address) else ip_address(value)


def _pair(src: AddressLike, dst: AddressLike) -> tuple[IPAddress, IPAddress]:
    s, d = _addr(src), _addr(dst)
    if s.version != d.version:
        raise ValueError(f"address family mismatch: {s} and {d}")
    return s, d


def build_ipv4(
    src: AddressLike,
    dst: AddressLike,
    proto: int,
    payload: bytes,
    ttl: int = DEFAULT_TTL,
    *,
    ident: int = 0,
    dont_fragment: bool = False,
    more_fragments: bool = False,
    fragment_offset: int = 0,
    tos: int = 0,
) -> bytes:
    """Return an IPv4 packet (20-byte header, correct header checksum) around ``payload``.

    ``fragment_offset`` is in 8-byte units as on the wire. The payload is taken as-is:
    compute transport checksums first (see ``build_udp``).
    """
    s, d = _pair(src, dst)
    if s.version != 4:
        raise ValueError("build_ipv4 needs IPv4 addresses")
    total = IPV4_HEADER_LEN + len(payload)
    if total > 0xFFFF:
        raise ValueError("IPv4 packet too long")
    flags = (0x4000 if dont_fragment else 0) | (0x2000 if more_fragments else 0)
    header = bytearray(
        bytes((0x45, tos))
        + total.to_bytes(2, "big")
        + ident.to_bytes(2, "big")
        + (flags | fragment_offset).to_bytes(2, "big")
        + bytes((ttl, proto, 0, 0))
        + s.packed
        + d.packed
    )
    header[10:12] = internet_checksum(header).to_bytes(2, "big")
    return bytes(header) + payload


def build_ipv6(
    src: AddressLike,
    dst: AddressLike,
    next_header: int,
    payload: bytes,
    hop_limit: int = DEFAULT_TTL,
    *,
    traffic_class: int = 0,
    flow_label: int = 0,
) -> bytes:
    """Return an IPv6 packet around ``payload`` (which may begin with extension headers,
    in which case ``next_header`` names the first of them)."""
    s, d = _pair(src, dst)
    if s.version != 6:
        raise ValueError("build_ipv6 needs IPv6 addresses")
    if len(payload) > 0xFFFF:
        raise ValueError("IPv6 payload too long (no jumbograms)")
    first_word = (6 << 28) | (traffic_class << 20) | flow_label
    return (
        first_word.to_bytes(4, "big")
        + len(payload).to_bytes(2, "big")
        + bytes((next_header, hop_limit))
        + s.packed
        + d.packed
        + payload
    )


def build_ip(
    src: AddressLike, dst: AddressLike, proto: int, payload: bytes, ttl: int = DEFAULT_TTL
) -> bytes:
    """``build_ipv4`` or ``build_ipv6`` depending on the address family."""
    s, d = _pair(src, dst)
    if s.version == 4:
        return build_ipv4(s, d, proto, payload, ttl)
    return build_ipv6(s, d, proto, payload, ttl)


def _transport_checksum(s: IPAddress, d: IPAddress, proto: int, segment: bytes) -> int:
    return internet_checksum(segment, pseudo_header_sum(s.packed, d.packed, proto, len(segment)))


def build_udp(
    src: AddressLike,
    dst: AddressLike,
    sport: int,
    dport: int,
    payload: bytes,
    ttl: int = DEFAULT_TTL,
) -> bytes:
    """Return a whole IPv4/IPv6 packet carrying one UDP datagram with a correct checksum."""
    s, d = _pair(src, dst)
    length = 8 + len(payload)
    segment = (
        sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + length.to_bytes(2, "big") + b"\0\0"
    ) + payload
    checksum = _transport_checksum(s, d, PROTO_UDP, segment) or 0xFFFF  # RFC 768
    segment = segment[:6] + checksum.to_bytes(2, "big") + segment[8:]
    return build_ip(s, d, PROTO_UDP, segment, ttl)


TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_PSH = 0x08
TCP_ACK = 0x10


def build_tcp(
    src: AddressLike,
    dst: AddressLike,
    sport: int,
    dport: int,
    payload: bytes = b"",
    *,
    flags: int = TCP_SYN,
    seq: int = 0,
    ack: int = 0,
    window: int = 65535,
    ttl: int = DEFAULT_TTL,
) -> bytes:
    """Return a whole IPv4/IPv6 packet carrying one option-less TCP segment."""
    s, d = _pair(src, dst)
    segment = bytearray(
        sport.to_bytes(2, "big")
        + dport.to_bytes(2, "big")
        + seq.to_bytes(4, "big")
        + ack.to_bytes(4, "big")
        + bytes((5 << 4, flags))
        + window.to_bytes(2, "big")
        + b"\0\0\0\0"
        + payload
    )
    segment[16:18] = _transport_checksum(s, d, PROTO_TCP, bytes(segment)).to_bytes(2, "big")
    return build_ip(s, d, PROTO_TCP, bytes(segment), ttl)


def _icmp_message(
    s: IPAddress, d: IPAddress, icmp_type: int, code: int, rest: int, body: bytes
) -> bytes:
    """The ICMP/ICMPv6 message (header + body) with its checksum filled in."""
    message = bytearray(bytes((icmp_type, code, 0, 0)) + rest.to_bytes(4, "big") + body)
    if s.version == 4:
        checksum = internet_checksum(message)
    else:
        checksum = _transport_checksum(s, d, PROTO_ICMPV6, bytes(message))
    message[2:4] = checksum.to_bytes(2, "big")
    return bytes(message)


def build_icmp(
    src: AddressLike,
    dst: AddressLike,
    icmp_type: int,
    code: int,
    rest: int = 0,
    body: bytes = b"",
    ttl: int = DEFAULT_TTL,
) -> bytes:
    """Return an ICMP (IPv4) or ICMPv6 (IPv6) packet with a correct checksum.

    ``rest`` is the 32-bit field after the checksum (identifier/sequence, MTU, ...).
    """
    s, d = _pair(src, dst)
    message = _icmp_message(s, d, icmp_type, code, rest, body)
    return build_ip(s, d, PROTO_ICMP if s.version == 4 else PROTO_ICMPV6, message, ttl)


def build_icmp_echo(
    src: AddressLike,
    dst: AddressLike,
    ident: int = 0,
    seq: int = 0,
    payload: bytes = b"",
    *,
    reply: bool = False,
    ttl: int = DEFAULT_TTL,
) -> bytes:
    """Return an ICMP/ICMPv6 echo request (or reply) packet."""
    s, _ = _pair(src, dst)
    icmp_type = (0 if reply else 8) if s.version == 4 else 129 if reply else 128
    return build_icmp(src, dst, icmp_type, 0, (ident << 16) | seq, payload, ttl)


def echo_reply(request: BytesLike, src: IPAddress) -> bytes | None:
    """The answer from ``src`` to an ICMP or ICMPv6 echo request: same identifier,
    sequence number and data (RFC 792; RFC 4443 §4.2). None if ``request`` is not an
    unfragmented echo request of ``src``'s family."""
    try:
        info = parse_packet(request)
    except PacketError:
        return None
    want = 8 if info.version == 4 else 128
    if info.icmp_type != want or info.icmp_code != 0 or info.is_fragment:
        return None
    if src.version != info.version:
        return None
    message = bytes(request[info.header_len : info.length])
    if len(message) < ICMP_HEADER_LEN:
        return None
    rest = int.from_bytes(message[4:8], "big")
    return build_icmp(src, info.src, 0 if info.version == 4 else 129, 0, rest, message[8:])


# --- ICMP errors ------------------------------------------------------------------------


def _may_answer(info: PacketInfo) -> bool:
    """RFC 1122 §3.2.2 / RFC 1812 §4.3.2.7 / RFC 4443 §2.4 (e): when not to send an error."""
    if info.is_icmp_error:
        return False
    if info.is_fragment and not info.is_first_fragment:
        return False
    src = info.src
    if src.version == 4 and src == _IPV4_BROADCAST:
        return False
    return not (src.is_unspecified or src.is_multicast or src.is_loopback)


def icmp_error(
    original: BytesLike,
    src: IPAddress,
    icmp_type: int,
    code: int,
    rest: int = 0,
    *,
    multicast_ok: bool = False,
) -> bytes | None:
    """Build an ICMP(v6) error from ``src`` about ``original``, sent back to its source.

    ``rest`` is the 32-bit field after the checksum. The original is quoted as far as
    fits in 576 (IPv4) / 1280 (IPv6) bytes. Returns None when no error may be sent:
    ``original`` is unparseable, is itself an ICMP error, is a non-first fragment,
    has a source we cannot answer, or went to a multicast/broadcast destination
    (``multicast_ok`` lifts this last rule, for ICMPv6 Packet Too Big, RFC 4443
    §2.4 (e.3)). Raises ValueError if ``src`` is of the other address family.
    """
    try:
        info = parse_packet(original)
    except PacketError:
        return None
    if src.version != info.version:
        raise ValueError(f"ICMP source {src} does not match an IPv{info.version} packet")
    if not _may_answer(info):
        return None
    dst = info.dst
    if not multicast_ok and (dst.is_multicast or (dst.version == 4 and dst == _IPV4_BROADCAST)):
        return None
    if info.version == 4:
        room = IPV4_MIN_MTU - IPV4_HEADER_LEN - ICMP_HEADER_LEN
    else:
        room = IPV6_MIN_MTU - IPV6_HEADER_LEN - ICMP_HEADER_LEN
    quote = bytes(original[: min(info.length, room)])
    message = _icmp_message(src, info.src, icmp_type, code, rest & 0xFFFFFFFF, quote)
    proto = PROTO_ICMP if info.version == 4 else PROTO_ICMPV6
    return build_ip(src, info.src, proto, message, DEFAULT_TTL)


def icmp_packet_too_big(original: BytesLike, mtu: int, src: IPAddress) -> bytes | None:
    """ICMP "fragmentation needed" (type 3 code 4, RFC 1191) or ICMPv6 Packet Too Big.

    For IPv4 the next-hop MTU goes in the low 16 bits of the rest-of-header field;
    for IPv6 it is the whole 32-bit field (RFC 4443 §3.2).
    """
    if src.version == 4:
        return icmp_error(
            original, src, ICMPV4_DEST_UNREACHABLE, ICMPV4_CODE_FRAG_NEEDED, mtu & 0xFFFF
        )
    return icmp_error(original, src, ICMPV6_PACKET_TOO_BIG, 0, mtu, multicast_ok=True)


def icmp_admin_prohibited(original: BytesLike, src: IPAddress) -> bytes | None:
    """ICMP "communication administratively prohibited" (v4 3/13, RFC 1812; v6 1/1)."""
    if src.version == 4:
        return icmp_error(original, src, ICMPV4_DEST_UNREACHABLE, ICMPV4_CODE_ADMIN_PROHIBITED)
    return icmp_error(original, src, ICMPV6_DEST_UNREACHABLE, ICMPV6_CODE_ADMIN_PROHIBITED)
