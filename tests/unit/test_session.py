"""The sans-I/O CONNECT-IP session (masqued.proto.session), both roles, on its own."""

from __future__ import annotations

import contextlib
import ipaddress
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from masqued.proto.capsule import (
    ADDRESS_ASSIGN,
    ROUTE_ADVERTISEMENT,
    CapsuleDecoder,
    encode_capsule,
    encode_datagram_capsule,
)
from masqued.proto.connect_ip import (
    AssignedAddress,
    IPRange,
    RequestedAddress,
    decode_address_assign,
    decode_route_advertisement,
    encode_address_request,
    encode_ip_datagram,
    ranges_for,
)
from masqued.proto.drops import (
    DROP_ACL,
    DROP_LINK_LOCAL,
    DROP_NOT_ROUTED,
    DROP_OUT_OF_SCOPE,
    DROP_OVERSIZED,
    DROP_SPOOFED,
    DROP_TTL_EXPIRED,
    DROP_UNKNOWN_CONTEXT,
)
from masqued.proto.errors import CapsuleError, FramingError, ProtocolError, ResponseError
from masqued.proto.events import (
    AddressesAssigned,
    AddressesRequested,
    RoutesAdvertised,
    StreamEnded,
    TunnelChanged,
    TunnelOpened,
    TunnelRefused,
)
from masqued.proto.framing import encode_frames
from masqued.proto.packet import build_icmp_echo, build_tcp, build_udp, parse_packet
from masqued.proto.request import parse_connect_request
from masqued.proto.session import (
    MAX_REQUEST_IDS,
    ClientSession,
    Mode,
    ProxySession,
    RouteFilter,
)

LEASE = (ipaddress.ip_interface("198.18.200.7/24"), ipaddress.ip_interface("2001:db8:200::7/64"))
ROUTES = (ipaddress.ip_network("198.19.0.0/24"), ipaddress.ip_network("2001:db8:19::/64"))
GATEWAYS = {4: ipaddress.ip_address("198.18.200.1"), 6: ipaddress.ip_address("2001:db8:200::1")}
ME4, ME6 = "198.18.200.7", "2001:db8:200::7"


def request(transport: str = "datagram", path: str = "/.well-known/masque/ip/*/*/"):  # type: ignore[no-untyped-def]
    header = (
        (b"capsule-protocol", b"?1")
        if transport == "datagram"
        else (
            b"masqued-transport",
            b"stream",
        )
    )
    return parse_connect_request(
        [
            (b":method", b"CONNECT"),
            (b":protocol", b"connect-ip"),
            (b":scheme", b"https"),
            (b":authority", b"relay.example:443"),
            (b":path", path.encode()),
            header,
        ]
    )


def proxy(transport: str = "datagram", **kw: object) -> ProxySession:
    return ProxySession(
        request(transport, **kw),  # type: ignore[arg-type]
        addresses=LEASE,
        routes=ROUTES,
        mtu=1300,
        gateways=GATEWAYS,  # type: ignore[arg-type]
        drops=Counter(),
    )


def client(wanted: str = "datagram", versions: tuple[int, ...] = ()) -> ClientSession:
    return ClientSession(
        authority="relay.example:443",
        wanted=wanted,
        mtu=1300,
        drops=Counter(),
        request_versions=versions,
    )


def open_client(c: ClientSession, p: ProxySession) -> list[object]:
    """Wire the proxy's response into the client; the client's events."""
    c.request(extended_connect=True, datagrams=True)
    headers, first = p.response()
    events, _ = c.receive_headers(headers, False)
    packets, more = c.receive_data(first, False)
    assert packets == []
    return [*events, *more]


# -- proxy ---------------------------------------------------------------------------------


def test_proxy_response_in_stream_mode_carries_the_parameters_in_headers() -> None:
    headers, first = proxy("stream").response()
    fields = dict(headers)
    assert fields[b":status"] == b"200" and first == b""
    assert fields[b"masqued-address"] == b"198.18.200.7/24, 2001:db8:200::7/64"
    assert fields[b"masqued-routes"] == b"198.19.0.0/24, 2001:db8:19::/64"


def test_proxy_response_in_datagram_mode_assigns_and_advertises() -> None:
    headers, first = proxy().response()
    assert dict(headers)[b"capsule-protocol"] == b"?1"
    capsules = CapsuleDecoder().feed(first)
    assert [c.type for c in capsules] == [ADDRESS_ASSIGN, ROUTE_ADVERTISEMENT]
    assign = decode_address_assign(capsules[0].value)
    assert assign.addresses == tuple(AssignedAddress(0, a.network) for a in LEASE)
    routes = decode_route_advertisement(capsules[1].value)
    assert routes.ranges == ranges_for(ROUTES)


def test_a_scoped_protocol_narrows_the_advertised_routes() -> None:
    _, first = proxy(path="/.well-known/masque/ip/*/6/").response()
    capsules = CapsuleDecoder().feed(first)
    assert {r.ipproto for r in decode_route_advertisement(capsules[1].value).ranges} == {6}


V4_ANY = ipaddress.ip_network("0.0.0.0/32")
V6_ANY = ipaddress.ip_network("::/128")


@pytest.mark.parametrize(
    ("requests", "expected"),
    [
        # one family: its lease address answers it, the other comes with ID 0
        ([(1, V4_ANY)], [(1, "198.18.200.0/24"), (0, "2001:db8:200::/64")]),
        ([(1, V4_ANY), (2, V6_ANY)], [(1, "198.18.200.0/24"), (2, "2001:db8:200::/64")]),
        # a prefix the lease is not inside: rejected (all-zero), lease with ID 0
        (
            [(5, ipaddress.ip_network("203.0.113.0/24"))],
            [(5, "0.0.0.0/32"), (0, "198.18.200.0/24"), (0, "2001:db8:200::/64")],
        ),
        # two requests for one family: only the first gets the address
        (
            [(1, V4_ANY), (2, V4_ANY)],
            [(1, "198.18.200.0/24"), (2, "0.0.0.0/32"), (0, "2001:db8:200::/64")],
        ),
    ],
)
def test_address_requests_are_answered_as_rfc_9484_4_7_2_says(
    requests: list[tuple[int, ipaddress.IPv4Network]], expected: list[tuple[int, str]]
) -> None:
    p = proxy()
    ask = encode_address_request([RequestedAddress(i, n) for i, n in requests])
    packets, reply, events = p.receive_data(ask, False)
    assert packets == [] and isinstance(events[0], AddressesRequested)
    (answer,) = CapsuleDecoder().feed(reply)
    got = [(a.request_id, str(a.prefix)) for a in decode_address_assign(answer.value).addresses]
    assert got == expected


def test_request_ids_may_not_be_reused_and_are_bounded() -> None:
    p = proxy()
    p.receive_data(encode_address_request([RequestedAddress(1, V4_ANY)]), False)
    with pytest.raises(CapsuleError, match="reuses request ID 1"):
        p.receive_data(encode_address_request([RequestedAddress(1, V4_ANY)]), False)
    q = proxy()
    for start in range(1, MAX_REQUEST_IDS, 64):
        batch = [
            RequestedAddress(i, V4_ANY) for i in range(start, min(start + 64, MAX_REQUEST_IDS + 1))
        ]
        q.receive_data(encode_address_request(batch), False)
    with pytest.raises(CapsuleError, match="more than"):
        q.receive_data(
            encode_address_request([RequestedAddress(MAX_REQUEST_IDS + 1, V4_ANY)]), False
        )


def test_datagram_capsules_unknown_capsules_and_contexts() -> None:
    p = proxy()
    pkt = build_udp(ME4, "198.19.0.2", 1000, 53, b"q")
    data = (
        encode_datagram_capsule(encode_ip_datagram(pkt))
        + encode_capsule(0x4242, b"skip me")
        + encode_datagram_capsule(b"\x05" + pkt)  # context 5: not ours
    )
    packets, reply, events = p.receive_data(data, True)
    assert packets == [pkt] and reply == b""
    assert events == [StreamEnded()]
    assert p.drops[DROP_UNKNOWN_CONTEXT] == 1


def test_a_stream_ending_inside_a_capsule_or_record_is_an_error() -> None:
    with pytest.raises(CapsuleError):
        proxy().receive_data(encode_capsule(ROUTE_ADVERTISEMENT, b"\x04" * 10)[:-3], True)
    with pytest.raises(ProtocolError):
        proxy("stream").receive_data(encode_frames([b"\x45" + b"\0" * 40])[:-1], True)


def test_a_malformed_record_is_a_framing_error() -> None:
    with pytest.raises(FramingError):
        proxy("stream").receive_data(b"\x00\x00", False)  # a zero-length record


def _uplink(p: ProxySession, *packets: bytes) -> tuple[list[bytes], list[bytes]]:
    return p.uplink(list(packets), now=1.0)


def test_uplink_checks_in_order() -> None:
    p = proxy()
    good = build_udp(ME4, "198.19.0.2", 1000, 53, b"q")
    spoofed = build_udp("198.18.200.8", "198.19.0.2", 1000, 53, b"q")
    link_local = build_udp(ME6, "ff02::2", 1000, 53, b"q")
    big = build_udp(ME4, "198.19.0.2", 1000, 53, b"x" * 1400)
    accepted, replies = _uplink(p, good, spoofed, link_local, big)
    assert accepted == [good]
    assert p.drops == Counter({DROP_SPOOFED: 1, DROP_LINK_LOCAL: 1, DROP_OVERSIZED: 1})
    (ptb,) = replies  # Packet Too Big from the gateway to the client
    info = parse_packet(ptb)
    assert str(info.src) == "198.18.200.1" and str(info.dst) == ME4 and info.icmp_type == 3
    assert p.spoofed_from == ipaddress.ip_address("198.18.200.8").packed


def test_scoped_requests_pass_only_their_target_and_protocol_and_icmp() -> None:
    p = proxy(path="/.well-known/masque/ip/198.19.0.2/6/")
    tcp = build_tcp(ME4, "198.19.0.2", 1000, 80, b"")
    udp = build_udp(ME4, "198.19.0.2", 1000, 53, b"q")
    ping = build_icmp_echo(ME4, "198.19.0.2", 1, 1)
    elsewhere = build_tcp(ME4, "198.19.0.3", 1000, 80, b"")
    accepted, _ = _uplink(p, tcp, udp, ping, elsewhere)
    assert accepted == [tcp, ping]
    assert p.drops[DROP_OUT_OF_SCOPE] == 2


def test_acl_denials_are_answered_within_the_icmp_budget() -> None:
    p = proxy()
    p.acl = lambda pkt: False
    denied = build_udp(ME4, "198.19.0.2", 1000, 53, b"q")
    accepted, replies = p.uplink([denied] * 30, now=5.0)
    assert accepted == [] and p.drops[DROP_ACL] == 30
    assert len(replies) == 10  # the burst; then 10 per second
    _, later = p.uplink([denied] * 30, now=5.5)
    assert len(later) == 5


def test_downlink_decrements_the_hop_count_and_answers_what_cannot_go() -> None:
    p = proxy()
    pkt = build_udp("198.19.0.2", ME4, 53, 1000, b"r", ttl=64)
    last_hop = build_udp("198.19.0.2", ME4, 53, 1000, b"r", ttl=1)
    big = build_udp("198.19.0.2", ME4, 53, 1000, b"x" * 1250)
    out, to_tun = p.downlink([pkt, last_hop, big], room=1200)
    assert len(out) == 1 and parse_packet(out[0]).ttl == 63
    assert p.drops == Counter({DROP_TTL_EXPIRED: 1, DROP_OVERSIZED: 1})
    kinds = [parse_packet(icmp).icmp_type for icmp in to_tun]
    assert kinds == [11, 3]  # Time Exceeded, Fragmentation Needed
    stream = proxy("stream")
    assert stream.downlink([pkt], room=1300) == ([pkt], [])


# -- client ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wanted", "extended", "datagrams", "mode"),
    [
        ("auto", True, True, Mode.DATAGRAM),
        ("auto", True, False, Mode.STREAM),
        ("stream", True, True, Mode.STREAM),
        ("datagram", True, True, Mode.DATAGRAM),
        ("datagram", True, False, None),
        ("auto", False, True, None),
    ],
)
def test_the_client_picks_its_mode_from_the_peer_settings(
    wanted: str, extended: bool, datagrams: bool, mode: Mode | None
) -> None:
    c = client(wanted)
    if mode is None:
        with pytest.raises(ResponseError):
            c.request(extended_connect=extended, datagrams=datagrams)
        return
    headers = c.request(extended_connect=extended, datagrams=datagrams)
    assert c.mode is mode
    assert parse_connect_request(headers).transport == mode.value


def test_client_interim_refused_and_opened_responses() -> None:
    c = client("stream")
    c.request(extended_connect=True, datagrams=False)
    assert c.receive_headers([(b":status", b"103")], False) == ([], b"")
    (refused,), _ = c.receive_headers([(b":status", b"403")], True)
    assert refused == TunnelRefused(403, "relay refused the tunnel: status 403")
    c = client("stream")
    c.request(extended_connect=True, datagrams=False)
    headers, _ = proxy("stream").response()
    (opened,), _ = c.receive_headers(headers, False)
    assert isinstance(opened, TunnelOpened) and opened.params.routes == ROUTES
    with pytest.raises(ResponseError, match="unexpected HEADERS"):
        c.receive_headers(headers, False)


def test_client_datagram_mode_needs_capsule_protocol_and_waits_for_both_capsules() -> None:
    c = client()
    c.request(extended_connect=True, datagrams=True)
    with pytest.raises(ResponseError, match="capsule-protocol"):
        c.receive_headers([(b":status", b"200")], False)
    c = client()
    events = open_client(c, proxy())
    assert [type(e) for e in events] == [AddressesAssigned, RoutesAdvertised, TunnelOpened]
    opened = events[-1]
    assert isinstance(opened, TunnelOpened)
    assert opened.params.addresses == (
        ipaddress.ip_interface("198.18.200.1/24"),
        ipaddress.ip_interface("2001:db8:200::1/64"),
    )  # a /24 assigned: the prefix's first host address (RFC 9484 lets proxies do that)


def test_client_sees_changes_and_sends_address_requests() -> None:
    c = client(versions=(4, 6))
    c.request(extended_connect=True, datagrams=True)
    headers, first = proxy().response()
    _, ask = c.receive_headers(headers, False)
    (capsule,) = CapsuleDecoder().feed(ask)
    assert capsule.type == 0x02
    c.receive_data(first, False)
    new_routes = encode_capsule(ROUTE_ADVERTISEMENT, b"")  # every route withdrawn
    _, events = c.receive_data(new_routes, False)
    assert isinstance(events[-1], TunnelChanged) and events[-1].params.routes == ()


def test_client_data_before_the_response_is_an_error() -> None:
    c = client()
    c.request(extended_connect=True, datagrams=True)
    with pytest.raises(ResponseError):
        c.receive_data(b"\x00", False)
    assert c.receive_datagram(b"\x00abc") is None  # not open yet: dropped silently


# -- both: any split of the stream, any bytes ---------------------------------------------------


PACKETS = st.lists(
    st.builds(
        lambda n, body: build_udp(ME4, "198.19.0.2", 1000 + n, 53, body),
        st.integers(0, 1000),
        st.binary(max_size=200),
    ),
    max_size=8,
)


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in [*points, len(data)]:
        out.append(data[last:p])
        last = p
    return out


@settings(max_examples=200)
@given(
    mode=st.sampled_from(["stream", "datagram"]),
    packets=PACKETS,
    cuts=st.lists(st.integers(0, 10**6), max_size=12),
)
def test_packets_cross_from_client_to_proxy_at_any_split(
    mode: str, packets: list[bytes], cuts: list[int]
) -> None:
    c = client(mode)
    p = proxy(mode)
    open_client(c, p)
    assert c.framing is not None
    data = c.framing.encode_packets(packets)
    got: list[bytes] = []
    for chunk in _chunks(data, cuts):
        arrived, _, _ = p.receive_data(chunk, False)
        got += arrived
    assert got == packets


@settings(max_examples=200)
@given(
    mode=st.sampled_from(["stream", "datagram"]), cuts=st.lists(st.integers(0, 10**6), max_size=12)
)
def test_the_proxy_response_opens_the_client_at_any_split(mode: str, cuts: list[int]) -> None:
    c = client(mode)
    c.request(extended_connect=True, datagrams=True)
    p = proxy(mode)
    headers, first = p.response()
    events, _ = c.receive_headers(headers, False)
    for chunk in _chunks(first, cuts):
        _, more = c.receive_data(chunk, False)
        events += more
    (opened,) = [e for e in events if isinstance(e, TunnelOpened)]
    assert {a.version for a in opened.params.addresses} == {4, 6}


@settings(max_examples=500)
@given(
    mode=st.sampled_from(["stream", "datagram"]), data=st.binary(max_size=400), end=st.booleans()
)
def test_any_bytes_either_parse_or_raise_a_protocol_error(
    mode: str, data: bytes, end: bool
) -> None:
    p = proxy(mode)
    c = client(mode)
    open_client(c, proxy(mode))
    for receive in (lambda: p.receive_data(data, end), lambda: c.receive_data(data, end)):
        with contextlib.suppress(ProtocolError):
            receive()


def test_link_local_traffic_is_the_tunnel_links_own_not_spoofed() -> None:
    """RFC 9484 §7: a peer's router solicitation (fe80:: to ff02::2) is counted as
    link-local and never forwarded; it is not a spoofed source."""
    p = proxy()
    solicitation = build_icmp_echo("fe80::1", "ff02::2", 1, 1)
    v4_link_local = build_udp("169.254.1.1", "198.19.0.2", 1, 2, b"x")
    accepted, replies = _uplink(p, solicitation, v4_link_local)
    assert accepted == [] and replies == []
    assert p.drops == Counter({DROP_LINK_LOCAL: 2})
    assert p.spoofed_from is None


def _advertise(c: ClientSession, ranges: list[IPRange]) -> None:
    c.request(extended_connect=True, datagrams=True)
    c.receive_headers([(b":status", b"200"), (b"capsule-protocol", b"?1")], False)
    assign = encode_capsule(
        ADDRESS_ASSIGN,
        b"\x00\x04" + ipaddress.ip_address(ME4).packed + b"\x20",
    )
    body = b"".join(
        bytes((r.version,)) + r.start.packed + r.end.packed + bytes((r.ipproto,)) for r in ranges
    )
    c.receive_data(assign + encode_capsule(ROUTE_ADVERTISEMENT, body), False)


def test_a_route_for_one_protocol_keeps_the_others_out_with_icmp() -> None:
    """RFC 9484 §4.7.3: a range advertised for TCP only; UDP there is answered locally
    with ICMP administratively prohibited (§8) instead of vanishing at the relay, ICMP
    always passes, and a range for every protocol costs no check at all."""
    net = ipaddress.ip_network("198.19.0.0/24")
    tcp_only = [IPRange(net[0], net[-1], 6)]
    c = ClientSession(
        authority="relay.example:443", wanted="datagram", mtu=1300, drops=Counter(), routes=[net]
    )
    _advertise(c, tcp_only)
    assert c.route_filter is not None
    tcp = build_tcp(ME4, "198.19.0.2", 1000, 80, b"")
    udp = build_udp(ME4, "198.19.0.2", 1000, 53, b"q")
    ping = build_icmp_echo(ME4, "198.19.0.2", 1, 1)
    allowed, replies = c.uplink([tcp, udp, ping], now=1.0)
    assert allowed == [tcp, ping]
    (icmp,) = replies
    info = parse_packet(icmp)
    assert (str(info.src), str(info.dst), info.icmp_type, info.icmp_code) == (
        "198.19.0.2",
        ME4,
        3,
        13,
    )
    assert c.drops[DROP_NOT_ROUTED] == 1
    every = ClientSession(
        authority="relay.example:443", wanted="datagram", mtu=1300, drops=Counter(), routes=[net]
    )
    _advertise(every, [IPRange(net[0], net[-1], 0)])
    assert every.route_filter is None  # nothing to check per packet


def test_the_route_filter_by_range_and_protocol() -> None:
    a, b = ipaddress.ip_network("198.19.0.0/24"), ipaddress.ip_network("2001:db8:19::/64")
    f = RouteFilter([IPRange(a[0], a[-1], 0), IPRange(b[0], b[-1], 17)])
    assert f.allows(build_tcp(ME4, "198.19.0.9", 1, 2, b""))
    assert not f.allows(build_tcp(ME4, "198.19.1.9", 1, 2, b""))
    assert f.allows(build_udp(ME6, "2001:db8:19::5", 1, 2, b"x"))
    assert not f.allows(build_tcp(ME6, "2001:db8:19::5", 1, 2, b""))
    assert f.covers_network(ipaddress.ip_network("198.19.0.128/25"))
    assert not f.covers_network(b)  # only for UDP


def test_the_relay_answers_echo_to_all_nodes_and_its_gateways() -> None:
    """RFC 9484 §7.2: a peer probing the tunnel's MTU with a 1232-byte ICMPv6 echo
    to ff02::1 (or pinging the gateway) gets the echo back from the gateway address,
    same identifier, sequence and data; nothing is forwarded."""
    p = proxy()
    data = bytes(range(256)) * 4 + bytes(1232 - 1024)  # a 1280-byte packet
    probe = build_icmp_echo(ME6, "ff02::1", 7, 3, data)
    assert len(probe) == 1280
    from_link_local = build_icmp_echo("fe80::7", "ff02::1", 7, 4, b"ll")
    ping4 = build_icmp_echo(ME4, "198.18.200.1", 9, 1, b"v4")
    ping6 = build_icmp_echo(ME6, "2001:db8:200::1", 9, 2, b"v6")
    accepted, replies = _uplink(p, probe, from_link_local, ping4, ping6)
    assert accepted == []
    want = [
        build_icmp_echo("2001:db8:200::1", ME6, 7, 3, data, reply=True),
        build_icmp_echo("2001:db8:200::1", "fe80::7", 7, 4, b"ll", reply=True),
        build_icmp_echo("198.18.200.1", ME4, 9, 1, b"v4", reply=True),
        build_icmp_echo("2001:db8:200::1", ME6, 9, 2, b"v6", reply=True),
    ]
    assert replies == want
    # Other traffic to those addresses is not answered this way.
    udp = build_udp(ME6, "ff02::1", 1, 2, b"x")
    accepted, replies = _uplink(p, udp)
    assert accepted == [] and replies == [] and p.drops[DROP_LINK_LOCAL] == 1
