"""ACL engine: parsing, fixed cases, and the compiled check against a slow model."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from masqued.gate.policy import Acl, PolicyError, Rule, parse_rule
from masqued.proto.errors import PacketError
from masqued.proto.packet import (
    build_icmp_echo,
    build_ipv4,
    build_ipv6,
    build_tcp,
    build_udp,
    parse_packet,
)

SRC4, SRC6 = "198.18.200.2", "2001:db8:200::2"


def acl(*rules: str, default: str = "deny") -> Acl:
    return Acl.parse(rules, default)


# -- parsing -----------------------------------------------------------------------------


def test_parse_rule_forms() -> None:
    assert parse_rule("allow 198.19.0.0/24") == Rule(True, ipaddress.ip_network("198.19.0.0/24"))
    r = parse_rule("deny 2001:db8:19::/64 udp 53,5000-5010")
    assert (r.allow, r.proto, r.ports) == (False, 17, ((53, 53), (5000, 5010)))
    assert parse_rule("allow 0.0.0.0/0 any").proto is None
    assert parse_rule("allow 198.19.0.2/32 47").proto == 47
    assert str(parse_rule("allow 198.19.0.0/24 tcp 8080")) == "allow 198.19.0.0/24 tcp 8080"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "allow",
        "permit 198.19.0.0/24",
        "allow 198.19.0.1/24",  # host bits set
        "allow 198.19.0.0/33",
        "allow 198.19.0.0/24 foo",
        "allow 198.19.0.0/24 icmp 80",  # ports without a port protocol
        "allow 198.19.0.0/24 tcp 80-70",
        "allow 198.19.0.0/24 tcp 65536",
        "allow 198.19.0.0/24 tcp http",
        "allow 198.19.0.0/24 icmpv6",
        "allow 2001:db8::/32 icmp",
        "allow 198.19.0.0/24 tcp 80 extra",
    ],
)
def test_parse_rule_rejects(text: str) -> None:
    with pytest.raises(PolicyError):
        parse_rule(text)


def test_default_must_be_explicit_word() -> None:
    with pytest.raises(PolicyError):
        Acl.parse([], "maybe")


# -- fixed cases ---------------------------------------------------------------------------


def test_only_tcp_8080_on_target() -> None:
    c = acl("allow 198.19.0.2/32 tcp 8080").compile()
    assert c.allows(build_tcp(SRC4, "198.19.0.2", 40000, 8080))
    assert not c.allows(build_tcp(SRC4, "198.19.0.2", 40000, 8081))
    assert not c.allows(build_udp(SRC4, "198.19.0.2", 40000, 8080, b"x"))
    assert not c.allows(build_icmp_echo(SRC4, "198.19.0.2", 1, 1, b"x"))
    assert not c.allows(build_tcp(SRC4, "198.19.0.3", 40000, 8080))
    assert not c.allows(build_tcp(SRC6, "2001:db8:19::2", 40000, 8080))


def test_first_match_wins_then_default() -> None:
    c = acl("deny 198.19.0.2/32", "allow 198.19.0.0/24", default="deny").compile()
    assert not c.allows(build_udp(SRC4, "198.19.0.2", 1, 2, b""))
    assert c.allows(build_udp(SRC4, "198.19.0.3", 1, 2, b""))
    assert not c.allows(build_udp(SRC4, "198.20.0.3", 1, 2, b""))
    c = acl("deny 198.19.0.2/32", default="allow").compile()
    assert c.allows(build_udp(SRC4, "198.20.0.3", 1, 2, b""))
    assert c.allows(build_udp(SRC6, "2001:db8:19::9", 1, 2, b""))


def test_non_first_fragment_matched_without_ports() -> None:
    c = acl("allow 198.19.0.2/32 udp 53").compile()
    tail = build_ipv4(SRC4, "198.19.0.2", 17, b"\x00" * 16, fragment_offset=185)
    assert c.allows(tail)
    other_proto = build_ipv4(SRC4, "198.19.0.2", 6, b"\x00" * 16, fragment_offset=185)
    assert not c.allows(other_proto)


def test_garbage_is_denied_not_raised() -> None:
    c = acl("allow 0.0.0.0/0 tcp 80", default="allow").compile()
    for junk in (b"", b"\x45", b"\x60" + b"\x00" * 10, b"\x99" * 60, b"\x4f" + b"\x00" * 30):
        assert c.allows(junk) in (True, False)
    assert not c.allows(b"")


def test_empty_allow_all_fast_path() -> None:
    assert acl(default="allow").compile().allows(b"\x45" + b"\x00" * 19)


# -- model-based -------------------------------------------------------------------------------

V4_NETS = [f"198.19.{a}.0/24" for a in range(3)] + ["198.19.0.0/16", "198.19.0.2/32", "0.0.0.0/0"]
V6_NETS = ["2001:db8:19::/64", "2001:db8:19::2/128", "2001:db8:1a::/48", "::/0"]
PROTOS = [None, 6, 17, 1, 58]


@st.composite
def rules(draw: st.DrawFn) -> Rule:
    net = ipaddress.ip_network(draw(st.sampled_from(V4_NETS + V6_NETS)))
    proto = draw(st.sampled_from(PROTOS))
    if (proto == 1 and net.version == 6) or (proto == 58 and net.version == 4):
        proto = None
    ports: tuple[tuple[int, int], ...] = ()
    if proto in (6, 17) and draw(st.booleans()):
        lo = draw(st.integers(0, 100))
        ports = ((lo, lo + draw(st.integers(0, 20))),)
    return Rule(draw(st.booleans()), net, proto, ports)


def v6_fragment(src: str, dst: str, inner: int, offset: int, payload: bytes) -> bytes:
    frag = struct.pack("!BBHI", inner, 0, (offset << 3) | 1, 7)
    return build_ipv6(src, dst, 44, frag + payload)


def v6_ah(src: str, dst: str, inner: bytes, icv: int = 12) -> bytes:
    """``inner`` (an upper-layer packet's payload with its protocol first) behind an
    IPv6 Authentication Header (RFC 4302 §2: Payload Len = 4-octet units - 2)."""
    proto, payload = inner[0], inner[1:]
    ah = struct.pack("!BBHII", proto, (12 + icv) // 4 - 2, 0, 0x100, 1) + b"\x00" * icv
    return build_ipv6(src, dst, 51, ah + payload)


def ah_tcp(dst: str, port: int) -> bytes:
    tcp = build_tcp(SRC6, dst, 1000, port)
    return v6_ah(SRC6, dst, bytes([6]) + tcp[40:])


def test_ipv6_ah_is_walked_like_other_extension_headers() -> None:
    """A TCP segment behind AH is matched as TCP with its ports, not as protocol 51."""
    deny_ssh = acl("deny 2001:db8:19::/64 tcp 22", "allow ::/0", default="deny").compile()
    assert not deny_ssh.allows(ah_tcp("2001:db8:19::2", 22))
    assert deny_ssh.allows(ah_tcp("2001:db8:19::2", 80))
    only_web = acl("allow 2001:db8:19::/64 tcp 8080", default="deny").compile()
    assert only_web.allows(ah_tcp("2001:db8:19::2", 8080))
    assert not only_web.allows(ah_tcp("2001:db8:19::2", 8081))
    info = parse_packet(ah_tcp("2001:db8:19::2", 22))
    assert (info.proto, info.dst_port) == (6, 22)
    # An AH header claiming more bytes than the packet holds is malformed: denied.
    bad = build_ipv6(SRC6, "2001:db8:19::2", 51, struct.pack("!BBHII", 6, 200, 0, 1, 1))
    assert not deny_ssh.allows(bad)


@st.composite
def packets(draw: st.DrawFn) -> bytes:
    v6 = draw(st.booleans())
    host = draw(st.sampled_from([0, 1, 2, 3, 300]))
    if v6:
        dst = str(ipaddress.ip_address("2001:db8:19::") + host) if host < 300 else "2001:db8:1a::5"
        src = SRC6
    else:
        dst = f"198.19.{host % 3}.{host % 250}" if host < 300 else "198.20.0.1"
        src = SRC4
    kind = draw(st.sampled_from(["tcp", "udp", "icmp", "frag", "ah"]))
    port = draw(st.integers(0, 130))
    if kind == "ah":
        inner = build_tcp(src, dst, 1000, port) if draw(st.booleans()) else None
        if inner is None:
            inner = build_udp(src, dst, 1000, port, b"data")
        head = 40 if v6 else 20
        proto = inner[6] if v6 else inner[9]
        if v6:
            return v6_ah(src, dst, bytes([proto]) + inner[head:])
        return inner
    if kind == "tcp":
        return build_tcp(src, dst, 1000, port)
    if kind == "udp":
        return build_udp(src, dst, 1000, port, b"data")
    if kind == "icmp":
        return build_icmp_echo(src, dst, 1, 1, b"ping")
    inner = draw(st.sampled_from([6, 17]))
    offset = draw(st.integers(1, 100))
    if v6:
        return v6_fragment(src, dst, inner, offset, b"\x00" * 16)
    return build_ipv4(src, dst, inner, b"\x00" * 16, fragment_offset=offset)


def model_allows(acl: Acl, pkt: bytes) -> bool:
    """Slow and obviously correct: parse everything, compare address objects."""
    try:
        info = parse_packet(pkt)
    except PacketError:
        return False
    for rule in acl.rules:
        if rule.network.version != info.version or info.dst not in rule.network:
            continue
        if rule.proto is not None and rule.proto != info.proto:
            continue
        port = info.dst_port
        if (
            rule.ports
            and info.has_transport_header
            and (port is None or not any(lo <= port <= hi for lo, hi in rule.ports))
        ):
            continue
        return rule.allow
    return acl.default_allow


@settings(max_examples=600, deadline=None)
@given(st.lists(rules(), max_size=6), st.booleans(), st.lists(packets(), min_size=1, max_size=8))
def test_compiled_matches_model(rule_list: list[Rule], default: bool, pkts: list[bytes]) -> None:
    the_acl = Acl(tuple(rule_list), default)
    compiled = the_acl.compile()
    for pkt in pkts:
        assert compiled.allows(pkt) == model_allows(the_acl, pkt), (the_acl, pkt.hex())


@settings(max_examples=300, deadline=None)
@given(st.lists(rules(), max_size=4), st.binary(max_size=80))
def test_any_bytes_give_a_decision(rule_list: list[Rule], junk: bytes) -> None:
    assert Acl(tuple(rule_list), True).compile().allows(junk) in (True, False)
