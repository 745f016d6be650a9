"""IP header view, TTL decrement, builders and ICMP errors.

Checksums are verified with the slow reference below, never with the module's own
``internet_checksum``.
"""

from __future__ import annotations

import contextlib
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from masqued.proto import packet as P
from masqued.proto.errors import PacketError

V4A, V4B = IPv4Address("198.18.200.2"), IPv4Address("198.19.0.2")
V6A, V6B = IPv6Address("2001:db8:200::2"), IPv6Address("2001:db8:1::2")
RELAY4, RELAY6 = IPv4Address("198.18.200.1"), IPv6Address("2001:db8:200::1")


# --- slow, obviously correct reference ---------------------------------------------------


def ref_sum(data: bytes) -> int:
    """RFC 1071 one's-complement sum, word by word."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) + data[i + 1]
        while total > 0xFFFF:
            total = (total & 0xFFFF) + (total >> 16)
    return total


def ref_checksum(data: bytes) -> int:
    return ~ref_sum(data) & 0xFFFF


def ref_pseudo(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    if len(src) == 4:
        return src + dst + bytes([0, proto]) + length.to_bytes(2, "big")
    return src + dst + length.to_bytes(4, "big") + bytes([0, 0, 0, proto])


def header_ok(pkt: bytes) -> bool:
    """IPv4 header checksum verifies: the sum over the header is 0xFFFF."""
    ihl = (pkt[0] & 15) * 4
    return ref_sum(pkt[:ihl]) == 0xFFFF


def transport_ok(pkt: bytes) -> bool:
    """The transport (UDP/TCP/ICMPv6) checksum of a simple packet verifies."""
    if pkt[0] >> 4 == 4:
        ihl = (pkt[0] & 15) * 4
        src, dst, proto, seg = pkt[12:16], pkt[16:20], pkt[9], pkt[ihl:]
        if proto == 1:
            return ref_sum(seg) == 0xFFFF
    else:
        src, dst, proto, seg = pkt[8:24], pkt[24:40], pkt[6], pkt[40:]
    return ref_sum(ref_pseudo(src, dst, proto, len(seg)) + seg) == 0xFFFF


# --- checksum ----------------------------------------------------------------------------


def test_checksum_rfc_vector() -> None:
    # The usual worked example: 192.168.0.1 -> 192.168.0.199, UDP, checksum 0xb861.
    header = bytes.fromhex("450000730000400040110000c0a80001c0a800c7")
    assert P.internet_checksum(header) == 0xB861
    assert ref_checksum(header) == 0xB861


@settings(deadline=None)
@given(st.binary(max_size=200))
def test_checksum_matches_reference(data: bytes) -> None:
    assert P.internet_checksum(data) == ref_checksum(data)


@pytest.mark.parametrize(
    "data", [b"", b"\0", b"\0\0\0\0", b"\xff\xff", b"\xff\xff\xff\xff", b"\x01"]
)
def test_checksum_edges(data: bytes) -> None:
    assert P.internet_checksum(data) == ref_checksum(data)


# --- builders ----------------------------------------------------------------------------


def test_build_ipv4_vector() -> None:
    pkt = P.build_ipv4("192.168.0.1", "192.168.0.199", 17, b"x" * 95, ttl=64, dont_fragment=True)
    assert pkt[:20] == bytes.fromhex("450000730000400040 11b861c0a80001c0a800c7".replace(" ", ""))


def test_build_udp_v4_vector() -> None:
    pkt = P.build_udp(V4A, V4B, 12345, 53, b"hello")
    assert len(pkt) == 20 + 8 + 5
    assert header_ok(pkt) and transport_ok(pkt)
    assert pkt[20:26] == bytes.fromhex("3039003500 0d".replace(" ", ""))
    info = P.parse_packet(pkt)
    assert (info.version, info.src, info.dst, info.proto) == (4, V4A, V4B, 17)
    assert (info.src_port, info.dst_port, info.ttl, info.header_len) == (12345, 53, 64, 20)
    assert not info.is_fragment and not info.is_first_fragment and info.has_transport_header


def test_build_udp_v6_and_tcp() -> None:
    pkt = P.build_udp(V6A, V6B, 1, 2, b"abc", ttl=9)
    assert transport_ok(pkt)
    info = P.parse_packet(pkt)
    assert (info.version, info.src, info.dst, info.proto, info.ttl) == (6, V6A, V6B, 17, 9)
    assert (info.src_port, info.dst_port, info.header_len) == (1, 2, 40)
    for src, dst in ((V4A, V4B), (V6A, V6B)):
        tcp = P.build_tcp(src, dst, 40000, 443, b"data", flags=P.TCP_SYN | P.TCP_ACK)
        assert transport_ok(tcp)
        info = P.parse_packet(tcp)
        assert (info.proto, info.src_port, info.dst_port) == (6, 40000, 443)


def test_build_icmp_echo() -> None:
    v4 = P.build_icmp_echo(V4A, V4B, 7, 1, b"ping")
    assert header_ok(v4) and transport_ok(v4)
    assert P.parse_packet(v4).icmp_type == 8
    v6 = P.build_icmp_echo(V6A, V6B, 7, 1, b"ping", reply=True)
    assert transport_ok(v6)
    info = P.parse_packet(v6)
    assert (info.proto, info.icmp_type, info.icmp_code) == (58, 129, 0)
    assert not info.is_icmp_error


def test_builders_reject_mixed_families() -> None:
    with pytest.raises(ValueError):
        P.build_udp(V4A, V6B, 1, 2, b"")
    with pytest.raises(ValueError):
        P.build_ipv4(V6A, V6B, 17, b"")
    with pytest.raises(ValueError):
        P.build_ipv6(V4A, V4B, 17, b"")


v4addr = st.integers(0, 2**32 - 1).map(IPv4Address)
v6addr = st.integers(0, 2**128 - 1).map(IPv6Address)
addr_pair = st.one_of(st.tuples(v4addr, v4addr), st.tuples(v6addr, v6addr))
port = st.integers(0, 65535)


@settings(deadline=None)
@given(addr_pair, port, port, st.binary(max_size=600), st.integers(1, 255))
def test_udp_builder_checksums(
    pair: tuple[P.IPAddress, P.IPAddress], sport: int, dport: int, data: bytes, ttl: int
) -> None:
    pkt = P.build_udp(pair[0], pair[1], sport, dport, data, ttl)
    assert transport_ok(pkt)
    if pair[0].version == 4:
        assert header_ok(pkt)
    assert pkt.endswith(data)
    info = P.parse_packet(pkt)
    assert (info.src, info.dst, info.src_port, info.dst_port, info.ttl) == (
        pair[0],
        pair[1],
        sport,
        dport,
        ttl,
    )
    version, s, d = P.addresses(pkt)
    assert (version, s, d) == (pair[0].version, pair[0].packed, pair[1].packed)


# --- addresses() -------------------------------------------------------------------------


def test_addresses_ok() -> None:
    pkt = P.build_udp(V4A, V4B, 1, 2, b"")
    assert P.addresses(pkt) == (4, V4A.packed, V4B.packed)
    assert P.addresses(pkt + b"padding") == (4, V4A.packed, V4B.packed)
    assert P.addresses(bytearray(pkt)) == (4, V4A.packed, V4B.packed)
    pkt6 = P.build_ipv6(V6A, V6B, 59, b"")
    assert P.addresses(pkt6) == (6, V6A.packed, V6B.packed)


def _set(pkt: bytes, offset: int, value: bytes) -> bytes:
    return pkt[:offset] + value + pkt[offset + len(value) :]


V4PKT = P.build_udp(V4A, V4B, 1, 2, b"payload")
V6PKT = P.build_udp(V6A, V6B, 1, 2, b"payload")


@pytest.mark.parametrize(
    "bad",
    [
        b"",
        b"\x45",
        V4PKT[:19],
        V6PKT[:39],
        _set(V4PKT, 0, b"\x55"),  # version 5
        _set(V4PKT, 0, b"\x05"),
        _set(V4PKT, 0, b"\x44"),  # IHL 4
        _set(V4PKT, 0, b"\x4f"),  # IHL 15 = 60 bytes > total length
        _set(V4PKT, 2, (len(V4PKT) + 1).to_bytes(2, "big")),
        _set(V4PKT, 2, b"\x00\x13"),  # total length < header
        V4PKT[:-1],
        _set(V6PKT, 4, (len(V6PKT) - 39).to_bytes(2, "big")),
        V6PKT[:-1],
    ],
)
def test_addresses_rejects(bad: bytes) -> None:
    with pytest.raises(PacketError):
        P.addresses(bad)
    with pytest.raises(PacketError):
        P.parse_packet(bad)
    with pytest.raises(PacketError):
        P.decrement_ttl(bad)


# --- parse_packet --------------------------------------------------------------------------


def ext(next_header: int, body: bytes = b"\0" * 6) -> bytes:
    """A generic IPv6 extension header (hop-by-hop, routing, destination options)."""
    assert (len(body) + 2) % 8 == 0
    return bytes([next_header, (len(body) + 2) // 8 - 1]) + body


def frag6(next_header: int, offset: int, more: bool, ident: int = 1) -> bytes:
    return (
        bytes([next_header, 0])
        + ((offset << 3) | more).to_bytes(2, "big")
        + ident.to_bytes(4, "big")
    )


UDP_HDR = (1000).to_bytes(2, "big") + (53).to_bytes(2, "big") + b"\x00\x08\x00\x00"


def test_ipv6_extension_headers_walked() -> None:
    payload = ext(60) + ext(17, b"\0" * 14) + UDP_HDR
    info = P.parse_packet(P.build_ipv6(V6A, V6B, 0, payload))
    assert (info.proto, info.header_len, info.src_port, info.dst_port) == (
        17,
        40 + 8 + 16,
        1000,
        53,
    )
    assert not info.is_fragment


def test_ipv6_routing_header_walked() -> None:
    info = P.parse_packet(P.build_ipv6(V6A, V6B, 43, ext(6) + UDP_HDR))
    assert (info.proto, info.src_port) == (6, 1000)


def test_ipv6_first_fragment() -> None:
    info = P.parse_packet(P.build_ipv6(V6A, V6B, 44, frag6(17, 0, True) + UDP_HDR))
    assert info.is_fragment and info.is_first_fragment and info.has_transport_header
    assert (info.proto, info.header_len, info.src_port, info.dst_port) == (17, 48, 1000, 53)


def test_ipv6_later_fragment() -> None:
    info = P.parse_packet(P.build_ipv6(V6A, V6B, 44, frag6(17, 185, False) + UDP_HDR))
    assert info.is_fragment and not info.is_first_fragment and not info.has_transport_header
    assert (info.proto, info.src_port, info.dst_port) == (17, None, None)


def test_ipv6_atomic_fragment_is_not_a_fragment() -> None:
    info = P.parse_packet(P.build_ipv6(V6A, V6B, 44, frag6(17, 0, False) + UDP_HDR))
    assert not info.is_fragment and info.src_port == 1000


def test_ipv6_extension_header_limits() -> None:
    chain = b"".join(ext(0) for _ in range(P.MAX_EXTENSION_HEADERS)) + ext(17) + UDP_HDR
    with pytest.raises(PacketError):
        P.parse_packet(P.build_ipv6(V6A, V6B, 0, chain))
    ok = b"".join(ext(0) for _ in range(P.MAX_EXTENSION_HEADERS - 1)) + ext(17) + UDP_HDR
    assert P.parse_packet(P.build_ipv6(V6A, V6B, 0, ok)).proto == 17
    with pytest.raises(PacketError):  # header claims 16 bytes, 8 present
        P.parse_packet(P.build_ipv6(V6A, V6B, 60, bytes([17, 1]) + b"\0" * 6))
    with pytest.raises(PacketError):
        P.parse_packet(P.build_ipv6(V6A, V6B, 60, bytes([17])))
    with pytest.raises(PacketError):
        P.parse_packet(P.build_ipv6(V6A, V6B, 44, frag6(17, 0, True)[:7]))


def test_ipv6_no_next_header_and_truncated_transport() -> None:
    info = P.parse_packet(P.build_ipv6(V6A, V6B, 59, b""))
    assert (info.proto, info.src_port, info.icmp_type) == (59, None, None)
    info = P.parse_packet(P.build_ipv6(V6A, V6B, 17, b"\x01\x02\x03"))
    assert (info.proto, info.src_port) == (17, None)


def test_ipv4_fragments() -> None:
    seg = UDP_HDR + b"x" * 16
    first = P.parse_packet(P.build_ipv4(V4A, V4B, 17, seg, more_fragments=True))
    assert first.is_fragment and first.is_first_fragment and first.src_port == 1000
    later = P.parse_packet(P.build_ipv4(V4A, V4B, 17, seg, fragment_offset=3))
    assert later.is_fragment and not later.is_first_fragment and later.src_port is None
    df = P.parse_packet(P.build_ipv4(V4A, V4B, 17, seg, dont_fragment=True))
    assert not df.is_fragment and df.src_port == 1000


def test_ipv4_options_and_padding() -> None:
    base = P.build_udp(V4A, V4B, 7, 9, b"abc")
    # Add 4 bytes of options (NOP NOP NOP EOL): IHL 6.
    header = bytearray(
        b"\x46" + base[1:2] + (len(base) + 4).to_bytes(2, "big") + base[4:20] + b"\x01\x01\x01\x00"
    )
    header[10:12] = b"\0\0"
    header[10:12] = ref_checksum(bytes(header)).to_bytes(2, "big")
    pkt = bytes(header) + base[20:]
    info = P.parse_packet(pkt + b"\0\0\0")  # link-layer padding after total length
    assert (info.header_len, info.src_port, info.dst_port, info.length) == (24, 7, 9, len(pkt))


def test_icmp_type_only_for_matching_family() -> None:
    # Protocol 1 inside IPv6 is not ICMPv6.
    info = P.parse_packet(P.build_ipv6(V6A, V6B, 1, b"\x03\x04\0\0"))
    assert info.icmp_type is None
    info = P.parse_packet(P.build_ipv4(V4A, V4B, 1, b"\x03\x04\0\0\0\0\0\0"))
    assert (info.icmp_type, info.icmp_code, info.is_icmp_error) == (3, 4, True)


def valid_packets() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.builds(P.build_udp, v4addr, v4addr, port, port, st.binary(max_size=40)),
        st.builds(P.build_udp, v6addr, v6addr, port, port, st.binary(max_size=40)),
        st.builds(
            P.build_ipv6,
            v6addr,
            v6addr,
            st.sampled_from([0, 43, 44, 60, 17, 58]),
            st.binary(max_size=64),
        ),
    )


@settings(deadline=None, max_examples=300)
@given(
    st.one_of(
        st.binary(max_size=120),
        st.builds(lambda b: b"\x45" + b, st.binary(max_size=80)),
        st.builds(lambda b: b"\x60" + b, st.binary(max_size=120)),
        st.builds(
            lambda pkt, i, v: _set(pkt, i % len(pkt), bytes([v])),
            valid_packets(),
            st.integers(0),
            st.integers(0, 255),
        ),
    )
)
def test_garbage_parses_or_raises_packet_error(data: bytes) -> None:
    """h11 contract for every entry point that reads a peer's packet."""
    try:
        info = P.parse_packet(data)
    except PacketError:
        pass
    else:
        assert info.version in (4, 6)
        assert info.header_len <= info.length <= len(data)
    with contextlib.suppress(PacketError):
        P.addresses(data)
    with contextlib.suppress(PacketError):
        P.decrement_ttl(data)
    # ICMP builders swallow garbage: they answer None, never raise for peer input.
    relay = RELAY6 if data[:1] and data[0] >> 4 == 6 else RELAY4
    P.icmp_admin_prohibited(data, relay)
    P.icmp_packet_too_big(data, 1280, relay)


# --- decrement_ttl -------------------------------------------------------------------------


def test_decrement_ttl_v4_vector() -> None:
    pkt = P.build_udp(V4A, V4B, 1, 2, b"x", ttl=64)
    out = P.decrement_ttl(pkt)
    assert out is not None
    assert out[8] == 63 and header_ok(out) and out[20:] == pkt[20:]
    assert P.decrement_ttl(P.build_udp(V4A, V4B, 1, 2, b"x", ttl=1)) is None
    assert P.decrement_ttl(P.build_udp(V4A, V4B, 1, 2, b"x", ttl=0)) is None
    assert P.decrement_ttl(bytearray(pkt)) == out


def test_decrement_hop_limit_v6() -> None:
    pkt = P.build_udp(V6A, V6B, 1, 2, b"x", ttl=2)
    out = P.decrement_ttl(pkt)
    assert out is not None and out[7] == 1 and _set(out, 7, b"\x02") == pkt
    assert P.decrement_ttl(out) is None


@settings(deadline=None)
@given(st.binary(min_size=20, max_size=20), st.integers(2, 255), st.integers(0, 10))
def test_decrement_ttl_keeps_checksum_valid(raw: bytes, ttl: int, opt_words: int) -> None:
    header = bytearray(raw + bytes(opt_words * 4))
    header[0] = 0x45 + opt_words
    header[2:4] = len(header).to_bytes(2, "big")
    header[8] = ttl
    header[10:12] = b"\0\0"
    header[10:12] = ref_checksum(bytes(header)).to_bytes(2, "big")
    assert header_ok(bytes(header))
    out = P.decrement_ttl(bytes(header))
    assert out is not None and out[8] == ttl - 1 and header_ok(out)
    assert out[:8] == header[:8] and out[9] == header[9] and out[12:] == header[12:]


# --- ICMP errors ---------------------------------------------------------------------------


def check_icmp_error(err: bytes | None, original: bytes, src: P.IPAddress) -> P.PacketInfo:
    assert err is not None
    info = P.parse_packet(err)
    orig = P.parse_packet(original)
    assert info.src == src and info.dst == orig.src and info.ttl == 64
    assert info.is_icmp_error
    assert transport_ok(err)
    if info.version == 4:
        assert header_ok(err) and len(err) <= 576
        quoted = err[28:]
    else:
        assert len(err) <= 1280
        quoted = err[48:]
    assert len(quoted) == min(orig.length, (548 if info.version == 4 else 1232))
    assert original.startswith(quoted)
    return info


def test_packet_too_big_v4() -> None:
    original = P.build_udp(V4A, V4B, 5000, 53, b"q" * 1400)
    err = P.icmp_packet_too_big(original, 1300, RELAY4)
    info = check_icmp_error(err, original, RELAY4)
    assert err is not None
    assert (info.icmp_type, info.icmp_code) == (3, 4)
    assert err[24:28] == b"\x00\x00" + (1300).to_bytes(2, "big")
    assert len(err) == 576


def test_packet_too_big_v6() -> None:
    original = P.build_udp(V6A, V6B, 5000, 53, b"q" * 1400)
    err = P.icmp_packet_too_big(original, 1280, RELAY6)
    info = check_icmp_error(err, original, RELAY6)
    assert err is not None
    assert (info.icmp_type, info.icmp_code) == (2, 0)
    assert err[44:48] == (1280).to_bytes(4, "big")
    assert len(err) == 1280


def test_admin_prohibited_small_original_quoted_whole() -> None:
    original = P.build_tcp(V4A, V4B, 40000, 22)
    err = P.icmp_admin_prohibited(original + b"\0\0", RELAY4)  # padding not quoted
    info = check_icmp_error(err, original, RELAY4)
    assert (info.icmp_type, info.icmp_code) == (3, 13)
    assert err is not None and err[28:] == original
    original6 = P.build_tcp(V6A, V6B, 40000, 22)
    info6 = check_icmp_error(P.icmp_admin_prohibited(original6, RELAY6), original6, RELAY6)
    assert (info6.icmp_type, info6.icmp_code) == (1, 1)


def test_icmp_error_vector_v4() -> None:
    """A hand-assembled expected packet, checksums by the reference."""
    original = P.build_icmp_echo("198.18.200.2", "198.19.0.2", 1, 1, b"")
    icmp = bytearray(b"\x03\x0d\x00\x00\x00\x00\x00\x00" + original)
    icmp[2:4] = ref_checksum(bytes(icmp)).to_bytes(2, "big")
    ip = bytearray(
        b"\x45\x00"
        + (20 + len(icmp)).to_bytes(2, "big")
        + b"\x00\x00\x00\x00\x40\x01\x00\x00"
        + RELAY4.packed
        + V4A.packed
    )
    ip[10:12] = ref_checksum(bytes(ip)).to_bytes(2, "big")
    assert P.icmp_admin_prohibited(original, RELAY4) == bytes(ip) + bytes(icmp)


def test_no_error_about_errors_or_later_fragments() -> None:
    v4_err = P.build_icmp(V4A, V4B, 3, 1, 0, b"")
    v6_err = P.build_icmp(V6A, V6B, 1, 0, 0, b"")
    v4_unknown = P.build_icmp(V4A, V4B, 200, 0, 0, b"")
    assert P.icmp_admin_prohibited(v4_err, RELAY4) is None
    assert P.icmp_admin_prohibited(v4_unknown, RELAY4) is None
    assert P.icmp_packet_too_big(v6_err, 1280, RELAY6) is None
    assert P.icmp_packet_too_big(P.build_icmp(V6A, V6B, 2, 0, 1280, b""), 1280, RELAY6) is None
    later4 = P.build_ipv4(V4A, V4B, 17, b"x" * 16, fragment_offset=2)
    later6 = P.build_ipv6(V6A, V6B, 44, frag6(17, 3, False) + b"x" * 8)
    assert P.icmp_admin_prohibited(later4, RELAY4) is None
    assert P.icmp_admin_prohibited(later6, RELAY6) is None
    first4 = P.build_ipv4(V4A, V4B, 17, UDP_HDR, more_fragments=True)
    assert P.icmp_admin_prohibited(first4, RELAY4) is not None
    # Echo requests and replies do get errors.
    echo = P.build_icmp_echo(V6A, V6B, 1, 2, b"x")
    check_icmp_error(P.icmp_admin_prohibited(echo, RELAY6), echo, RELAY6)


def test_no_error_to_unanswerable_sources_or_multicast() -> None:
    for src in ("0.0.0.0", "224.0.0.1", "127.0.0.1", "255.255.255.255"):
        assert P.icmp_admin_prohibited(P.build_udp(src, V4B, 1, 2, b""), RELAY4) is None
    for dst in ("224.0.0.5", "255.255.255.255"):
        assert P.icmp_admin_prohibited(P.build_udp(V4A, dst, 1, 2, b""), RELAY4) is None
    mcast6 = P.build_udp(V6A, "ff02::1", 1, 2, b"")
    assert P.icmp_admin_prohibited(mcast6, RELAY6) is None
    # RFC 4443 §2.4 (e.3): Packet Too Big is sent even for multicast destinations.
    assert P.icmp_packet_too_big(mcast6, 1280, RELAY6) is not None
    assert P.icmp_admin_prohibited(P.build_udp("::", V6B, 1, 2, b""), RELAY6) is None


def test_icmp_error_garbage_and_family_mismatch() -> None:
    assert P.icmp_admin_prohibited(b"\x45garbage", RELAY4) is None
    with pytest.raises(ValueError):
        P.icmp_admin_prohibited(V6PKT, RELAY4)
    err = P.icmp_error(V4PKT, RELAY4, 11, 0)  # time exceeded, via the generic builder
    info = check_icmp_error(err, V4PKT, RELAY4)
    assert (info.icmp_type, info.icmp_code) == (11, 0)


@settings(deadline=None)
@given(
    st.one_of(st.tuples(v4addr, v4addr), st.tuples(v6addr, v6addr)),
    st.integers(0, 3000),
    st.integers(576, 65535),
    st.booleans(),
)
def test_icmp_errors_always_valid(
    pair: tuple[P.IPAddress, P.IPAddress], size: int, mtu: int, ptb: bool
) -> None:
    src, dst = pair
    assume(not (src.is_unspecified or src.is_multicast or src.is_loopback))
    assume(not dst.is_multicast and dst != IPv4Address("255.255.255.255"))
    assume(src != IPv4Address("255.255.255.255"))
    relay = RELAY4 if src.version == 4 else RELAY6
    original = P.build_udp(src, dst, 1, 2, bytes(size))
    err = (
        P.icmp_packet_too_big(original, mtu, relay)
        if ptb
        else P.icmp_admin_prohibited(original, relay)
    )
    check_icmp_error(err, original, relay)


def test_address_strings_accepted() -> None:
    assert P.build_udp("10.0.0.1", "10.0.0.2", 1, 2, b"") == P.build_udp(
        ip_address("10.0.0.1"), ip_address("10.0.0.2"), 1, 2, b""
    )
