"""DNS configuration from the relay (masqued.proto.dns): the DNS_ASSIGN codec, the
stream-mode headers, and both sessions carrying them."""

from __future__ import annotations

import ipaddress
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from masqued.proto.capsule import DNS_ASSIGN, CapsuleDecoder, encode_capsule, encode_varint
from masqued.proto.dns import (
    DnsConfiguration,
    DnsInfo,
    Nameserver,
    check_domain,
    decode_dns_assign,
    dns_headers,
    dns_info,
    encode_dns_assign,
    parse_dns_headers,
)
from masqued.proto.errors import CapsuleError, ResponseError
from masqued.proto.events import DnsAssigned, TunnelChanged, TunnelOpened
from masqued.proto.request import build_response_headers, parse_stream_response
from masqued.proto.session import ClientSession, ProxySession
from tests.unit.test_session import GATEWAYS, LEASE, ROUTES, request

V4 = ipaddress.ip_address("198.19.0.53")
V6 = ipaddress.ip_address("2001:db8:19::53")
INFO = DnsInfo(servers=(V4, V6), search=("corp.example",), domains=("",))


def value_of(capsule: bytes) -> bytes:
    decoder = CapsuleDecoder(known_types={DNS_ASSIGN})
    (cap,) = decoder.feed(capsule)
    return cap.value


def test_round_trip_and_wire_layout() -> None:
    wire = encode_dns_assign(INFO.configurations())
    value = value_of(wire)
    # -06 layout: Nameserver Count, then priority (16), v4 count + address, v6 count
    # + address, an empty auth name, empty SvcParams; internal domains; search domains.
    assert value == (
        b"\x01"
        + b"\x00\x01"
        + b"\x01"
        + V4.packed
        + b"\x01"
        + V6.packed
        + b"\x00"
        + b"\x00"
        + b"\x01\x00"
        + b"\x01\x0ccorp.example"
    )
    assert decode_dns_assign(value) == INFO.configurations()
    assert dns_info(decode_dns_assign(value)) == INFO
    assert decode_dns_assign(b"") == ()  # an empty DNS_ASSIGN: nothing to share


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (b"\x01\x00", "exceeds the capsule"),
        (b"\x01\x00\x01\x00\x00\x05ab", "truncated"),
        (b"\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00", "priority 0"),
        (b"\x01\x00\x01\x00\x00\x00\x00\x00\x00", "without address or name"),
        (b"\x01\x00\x01\x05\x00", "exceeds the capsule"),
        (b"\x00\x00\x01\x05ab", "truncated"),
        (b"\x00\x00\x01\x02\xff\xfe", "not ASCII"),
        (b"\x00\x00" + encode_varint(1 << 40), "exceeds the capsule"),
    ],
)
def test_malformed_values_are_capsule_errors(value: bytes, why: str) -> None:
    with pytest.raises(CapsuleError, match=why):
        decode_dns_assign(value)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80))
def test_any_bytes_parse_or_raise_capsule_error(data: bytes) -> None:
    try:
        configs = decode_dns_assign(data)
    except CapsuleError:
        return
    dns_info(configs)  # whatever parsed, the summary never raises


def test_dns_info_keeps_plain_dns_in_priority_order() -> None:
    doh_only = Nameserver(1, (), "dns.example", bytes.fromhex("00020000"))  # no-default-alpn
    port_5353 = Nameserver(1, (ipaddress.ip_address("192.0.2.9"),), "", b"\x00\x03\x00\x02\x14\xe9")
    port_53 = Nameserver(9, (ipaddress.ip_address("192.0.2.8"),), "", b"\x00\x03\x00\x02\x00\x35")
    mixed = Nameserver(3, (V6, V4))
    bad_params = Nameserver(1, (ipaddress.ip_address("192.0.2.7"),), "", b"\x00")
    info = dns_info(
        [
            DnsConfiguration((port_53, doh_only, port_5353), ("Corp.Example.",), ("x y",)),
            DnsConfiguration((mixed, bad_params), (".",), ("corp.example", "b.example")),
        ]
    )
    assert info.servers == (V6, V4, ipaddress.ip_address("192.0.2.8"))
    assert info.search == ("corp.example", "b.example")
    assert info.domains == ("corp.example", "")
    assert info.skipped == 3


def test_check_domain() -> None:
    assert check_domain("Corp.Example.") == "corp.example"
    for bad in ("", ".", "a..b", "-a.b", "a b", "é.example", "a" * 64 + ".b"):
        with pytest.raises(ValueError):
            check_domain(bad)


def test_stream_headers_round_trip_and_reject_garbage() -> None:
    headers = dns_headers(INFO)
    assert headers == [
        (b"masqued-dns", b"198.19.0.53, 2001:db8:19::53"),
        (b"masqued-dns-search", b"corp.example"),
    ]
    fields = {n: v.decode() for n, v in headers}
    assert parse_dns_headers(fields) == DnsInfo((V4, V6), ("corp.example",), ("",))
    assert parse_dns_headers({}) is None
    assert dns_headers(None) == [] and dns_headers(DnsInfo()) == []
    with pytest.raises(ResponseError):
        parse_dns_headers({b"masqued-dns": "198.19.0.53, nope"})
    with pytest.raises(ResponseError):
        parse_dns_headers({b"masqued-dns": "fe80::1%eth0"})
    with pytest.raises(ResponseError):
        parse_dns_headers({b"masqued-dns-search": "not a domain"})


def _proxy(transport: str, dns: DnsInfo | None) -> ProxySession:
    return ProxySession(
        request(transport),
        addresses=LEASE,
        routes=ROUTES,
        mtu=1300,
        gateways=GATEWAYS,  # type: ignore[arg-type]
        drops=Counter(),
        dns=dns,
    )


def _client(wanted: str) -> ClientSession:
    return ClientSession(authority="relay.example:443", wanted=wanted, mtu=1300, drops=Counter())


def test_stream_mode_tells_the_resolvers_in_headers() -> None:
    headers, first = _proxy("stream", INFO).response()
    assert first == b""
    params = parse_stream_response(headers)
    assert params.dns == DnsInfo((V4, V6), ("corp.example",), ("",))
    # No dns: no headers, and the client's params say so.
    headers, _ = _proxy("stream", None).response()
    assert not any(n.startswith(b"masqued-dns") for n, _ in headers)
    assert parse_stream_response(headers).dns is None
    # A repeated header is refused like the other masqued- ones.
    twice = [
        *build_response_headers(200, parse_stream_response(headers)),
        (b"masqued-dns", b"198.19.0.53"),
        (b"masqued-dns", b"198.19.0.54"),
    ]
    with pytest.raises(ResponseError, match="repeated"):
        parse_stream_response(twice)


def test_datagram_mode_sends_dns_assign_after_the_routes_whatever_the_split() -> None:
    proxy = _proxy("datagram", INFO)
    headers, first = proxy.response()
    for step in (len(first), 1):  # whole, then byte by byte
        c = _client("datagram")
        c.request(extended_connect=True, datagrams=True)
        events, _ = c.receive_headers(headers, False)
        for i in range(0, len(first), step):
            _, more = c.receive_data(first[i : i + step], False)
            events += more
        events = [e for e in events if isinstance(e, (TunnelOpened, DnsAssigned, TunnelChanged))]
        assert [type(e) for e in events] == [TunnelOpened, DnsAssigned, TunnelChanged]
        opened, assigned, changed = events
        assert isinstance(opened, TunnelOpened) and opened.params.dns is None
        assert isinstance(assigned, DnsAssigned) and assigned.dns == INFO
        assert isinstance(changed, TunnelChanged) and changed.params.dns == INFO
    # Without dns configured, no DNS_ASSIGN at all.
    _, first = _proxy("datagram", None).response()
    assert encode_varint(DNS_ASSIGN) not in first


def test_the_relay_ignores_a_clients_dns_assign_but_checks_it() -> None:
    proxy = _proxy("datagram", None)
    proxy.response()
    packets, reply, events = proxy.receive_data(encode_dns_assign(INFO.configurations()), False)
    assert (packets, reply, events) == ([], b"", [])
    with pytest.raises(CapsuleError):
        proxy.receive_data(encode_capsule(DNS_ASSIGN, b"\x01\x00"), False)
