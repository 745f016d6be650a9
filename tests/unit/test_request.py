"""CONNECT-IP request validation (RFC 9484 §4) and stream-mode response headers."""

from __future__ import annotations

from ipaddress import IPv4Interface, IPv4Network, IPv6Interface, IPv6Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from masqued.proto.errors import RequestError, ResponseError
from masqued.proto.packet import EXTENSION_HEADERS
from masqued.proto.request import (
    ConnectIpRequest,
    TunnelParams,
    build_connect_request,
    build_response_headers,
    parse_connect_request,
    parse_stream_response,
    request_path,
)
from masqued.proto.template import UriTemplate

Headers = list[tuple[bytes, bytes]]


def req(
    path: str = "/.well-known/masque/ip/*/*/",
    *,
    method: bytes = b"CONNECT",
    extra: Headers | None = None,
    transport: Headers | None = None,
) -> Headers:
    headers = [
        (b":method", method),
        (b":protocol", b"connect-ip"),
        (b":scheme", b"https"),
        (b":authority", b"relay.example:443"),
        (b":path", path.encode()),
    ]
    headers += [(b"masqued-transport", b"stream")] if transport is None else transport
    return headers + (extra or [])


def status_of(headers: Headers) -> int:
    with pytest.raises(RequestError) as info:
        parse_connect_request(headers)
    return info.value.status


def drop(headers: Headers, name: bytes) -> Headers:
    return [(k, v) for k, v in headers if k != name]


def replace(headers: Headers, name: bytes, value: bytes) -> Headers:
    return [(k, value if k == name else v) for k, v in headers]


# --- accepted requests -------------------------------------------------------------------


def test_full_tunnel_stream() -> None:
    r = parse_connect_request(req(extra=[(b"Authorization", b"Bearer x"), (b"user-agent", b"t")]))
    assert r == ConnectIpRequest(
        authority="relay.example:443",
        path="/.well-known/masque/ip/*/*/",
        target=None,
        ipproto=None,
        transport="stream",
        headers={"masqued-transport": "stream", "authorization": "Bearer x", "user-agent": "t"},
    )


@pytest.mark.parametrize(
    ("segment", "expected"),
    [
        ("192.0.2.1", IPv4Network("192.0.2.1/32")),
        ("192.0.2.0%2F24", IPv4Network("192.0.2.0/24")),
        ("192.0.2.0%2f24", IPv4Network("192.0.2.0/24")),
        ("0.0.0.0%2F0", IPv4Network("0.0.0.0/0")),
        ("2001%3Adb8%3A%3A42", IPv6Network("2001:db8::42/128")),
        ("2001%3Adb8%3A%3A%2F32", IPv6Network("2001:db8::/32")),
        ("%3A%3A%2F0", IPv6Network("::/0")),
        ("%2A", None),
    ],
)
def test_targets(segment: str, expected: IPv4Network | IPv6Network | None) -> None:
    r = parse_connect_request(req(f"/.well-known/masque/ip/{segment}/17/"))
    assert r.target == (None if expected is None else (expected,))
    assert r.ipproto == 17


@pytest.mark.parametrize(
    ("segment", "expected"), [("255", 255), ("6", 6), ("50", 50), ("*", None), ("", None)]
)
def test_ipproto(segment: str, expected: int | None) -> None:
    assert parse_connect_request(req(f"/.well-known/masque/ip/*/{segment}/")).ipproto == expected


@pytest.mark.parametrize("number", [0, 43, 44, 51, 60, 135, 253])
def test_ipproto_of_an_extension_header_is_refused(number: int) -> None:
    """A scope to Hop-by-Hop (0) would be advertised as protocol 0, "all" (§4.7.3)."""
    with pytest.raises(RequestError) as info:
        parse_connect_request(req(f"/.well-known/masque/ip/*/{number}/"))
    assert info.value.status == 400 and "extension header" in str(info.value)


def test_empty_variables_mean_any() -> None:
    """connect-ip-go expands the default template with no values: ``ip///``."""
    r = parse_connect_request(req("/.well-known/masque/ip///"))
    assert r.target is None and r.ipproto is None


def test_query_ignored_and_datagram_transport() -> None:
    r = parse_connect_request(
        req(
            "/.well-known/masque/ip/*/*/?foo=bar",
            transport=[(b"capsule-protocol", b"?1")],
        )
    )
    assert (r.transport, r.target, r.path) == (
        "datagram",
        None,
        "/.well-known/masque/ip/*/*/?foo=bar",
    )


@pytest.mark.parametrize("value", [b"?1", b"?1;a=1", b" ?1 ", b"?1;a;b=?0"])
def test_capsule_protocol_true_values(value: bytes) -> None:
    assert (
        parse_connect_request(req(transport=[(b"capsule-protocol", value)])).transport == "datagram"
    )


def test_repeated_regular_headers_joined() -> None:
    r = parse_connect_request(req(extra=[(b"x-a", b"1"), (b"X-A", b"2")]))
    assert r.headers["x-a"] == "1, 2"


# --- refused requests --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        (req(method=b"GET"), 405),
        (req(method=b"connect"), 405),
        (drop(req(), b":method"), 400),
        (drop(req(), b":protocol"), 400),
        (replace(req(), b":protocol", b"connect-udp"), 501),
        (drop(req(), b":scheme"), 400),
        (drop(req(), b":path"), 400),
        (drop(req(), b":authority"), 400),
        (replace(req(), b":authority", b""), 400),
        (replace(req(), b":path", b""), 400),
        (replace(req(), b":scheme", b""), 400),
        (replace(req(), b":scheme", b"http"), 400),
        (replace(req(), b":authority", b"a b"), 400),
        ([*drop(req(), b":path"), (b":path", b"/.well-known/masque/ip/*/*/")], 400),
        ([(b":method", b"CONNECT"), *req()], 400),  # duplicate
        ([(b":status", b"200"), *req()], 400),  # response pseudo in a request
        (req(transport=[]), 400),
        (req(transport=[(b"masqued-transport", b"datagram")]), 400),
        (
            req(transport=[(b"masqued-transport", b"stream"), (b"masqued-transport", b"stream")]),
            400,
        ),
        (req(transport=[(b"masqued-transport", b"stream"), (b"capsule-protocol", b"?1")]), 400),
        (req(transport=[(b"capsule-protocol", b"?0")]), 400),
        (req(transport=[(b"capsule-protocol", b"1")]), 400),
        (req(transport=[(b"capsule-protocol", b"?1"), (b"capsule-protocol", b"?1")]), 400),
        (req(transport=[(b"capsule-protocol", b"?1;A")]), 400),
        (replace(req(), b":path", "/.well-known/masque/ip/*/*/é".encode()), 400),
    ],
)
def test_refusals(headers: Headers, status: int) -> None:
    assert status_of(headers) == status


def test_stream_with_capsule_false_is_stream() -> None:
    headers = req(transport=[(b"masqued-transport", b"stream"), (b"capsule-protocol", b"?0")])
    assert parse_connect_request(headers).transport == "stream"


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/", 404),
        ("/.well-known/masque/udp/*/*/", 404),
        ("/.well-known/masque/ip", 404),
        ("/.well-known/masque/ip/", 404),
        ("/.well-known/masque/ip/*/*", 404),
        ("/.well-known/masque/ip/*/", 404),
        ("/.well-known/masque/ip/*/*/extra/", 404),
        ("/.well-known/masque/ip/192.0.2.0/24/*/", 404),  # unencoded slash
        ("/.well-known/masque/ip/192.0.2.1%2F24/*/", 400),  # host bits set
        ("/.well-known/masque/ip/2001%3Adb8%3A%3A1%2F64/*/", 400),
        ("/.well-known/masque/ip/192.0.2.0%2F33/*/", 400),
        ("/.well-known/masque/ip/2001%3Adb8%3A%3A%2F129/*/", 400),
        ("/.well-known/masque/ip/192.0.2.0%2F/*/", 400),
        ("/.well-known/masque/ip/192.0.2.0%2F-1/*/", 400),
        ("/.well-known/masque/ip/192.0.2.0%2F+8/*/", 400),
        ("/.well-known/masque/ip/192.0.2.0%2F2400/*/", 400),
        ("/.well-known/masque/ip/192.0.2.256/*/", 400),
        ("/.well-known/masque/ip/192.0.2/*/", 400),
        ("/.well-known/masque/ip/01.2.3.4/*/", 400),
        ("/.well-known/masque/ip/fe80%3A%3A1%25eth0/*/", 400),  # zone id
        ("/.well-known/masque/ip/%zz/*/", 400),
        ("/.well-known/masque/ip/%2/*/", 400),
        ("/.well-known/masque/ip/%C3%A9/*/", 400),
        ("/.well-known/masque/ip/**/*/", 400),
        ("/.well-known/masque/ip/example.com/*/", 501),
        ("/.well-known/masque/ip/relay/*/", 501),
        ("/.well-known/masque/ip/example.com%2F24/*/", 400),
        ("/.well-known/masque/ip/*/256/", 400),
        ("/.well-known/masque/ip/*/-1/", 400),
        ("/.well-known/masque/ip/*/tcp/", 400),
        ("/.well-known/masque/ip/*/1000/", 400),
        ("/.well-known/masque/ip/*/ 6/", 400),
    ],
)
def test_path_refusals(path: str, status: int) -> None:
    assert status_of(req(path)) == status


# --- build <-> parse ---------------------------------------------------------------------


def test_build_connect_request_vector() -> None:
    headers = build_connect_request(
        "relay.example:443",
        transport="stream",
        target=IPv6Network("2001:db8::/32"),
        ipproto=17,
        extra=[(b"authorization", b"Bearer t")],
    )
    assert headers == [
        (b":method", b"CONNECT"),
        (b":protocol", b"connect-ip"),
        (b":scheme", b"https"),
        (b":authority", b"relay.example:443"),
        (b":path", b"/.well-known/masque/ip/2001%3Adb8%3A%3A%2F32/17/"),
        (b"masqued-transport", b"stream"),
        (b"authorization", b"Bearer t"),
    ]
    assert request_path() == "/.well-known/masque/ip/*/*/"
    assert request_path(IPv4Network("10.0.0.1/32"), 0) == "/.well-known/masque/ip/10.0.0.1/0/"


def test_build_connect_request_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        build_connect_request("a", transport="udp")
    with pytest.raises(ValueError):
        build_connect_request("a", transport="stream", ipproto=256)


v4net = st.builds(
    lambda a, n: IPv4Network((a, n), strict=False), st.integers(0, 2**32 - 1), st.integers(0, 32)
)
v6net = st.builds(
    lambda a, n: IPv6Network((a, n), strict=False), st.integers(0, 2**128 - 1), st.integers(0, 128)
)


@settings(deadline=None)
@given(
    st.one_of(st.none(), v4net, v6net),
    st.one_of(st.none(), st.integers(0, 255).filter(lambda n: n not in EXTENSION_HEADERS)),
    st.sampled_from(["stream", "datagram"]),
    st.from_regex(r"[a-z0-9.-]{1,30}(:[0-9]{1,5})?", fullmatch=True),
)
def test_round_trip(
    target: IPv4Network | IPv6Network | None, ipproto: int | None, transport: str, authority: str
) -> None:
    r = parse_connect_request(
        build_connect_request(authority, transport=transport, target=target, ipproto=ipproto)
    )
    assert r.target == (None if target is None else (target,))
    assert (r.ipproto, r.transport, r.authority) == (ipproto, transport, authority)


header_names = st.sampled_from(
    [
        b":method",
        b":protocol",
        b":scheme",
        b":authority",
        b":path",
        b":status",
        b"capsule-protocol",
        b"masqued-transport",
        b"x",
        b"Authorization",
    ]
)
header_values = st.one_of(
    st.sampled_from(
        [b"CONNECT", b"connect-ip", b"https", b"?1", b"stream", b"", b"/.well-known/masque/ip/*/*/"]
    ),
    st.binary(max_size=30),
    st.builds(lambda s: ("/.well-known/masque/ip/" + s).encode(), st.text(max_size=30)),
)


@settings(deadline=None, max_examples=300)
@given(
    st.one_of(
        st.lists(st.tuples(header_names, header_values), max_size=10),
        st.builds(
            lambda good, i, v: [
                (k, v if n == i % len(good) else old) for n, (k, old) in enumerate(good)
            ],
            st.just(req()),
            st.integers(0),
            header_values,
        ),
    )
)
def test_garbage_requests_parse_or_raise_request_error(headers: Headers) -> None:
    """h11 contract: any header list either parses or raises RequestError."""
    try:
        r = parse_connect_request(headers)
    except RequestError as exc:
        assert exc.status in (400, 404, 405, 501)
    else:
        assert r.transport in ("stream", "datagram")


# --- response headers --------------------------------------------------------------------

PARAMS = TunnelParams(
    addresses=(IPv4Interface("198.18.200.2/32"), IPv6Interface("2001:db8:200::2/128")),
    routes=(IPv4Network("198.19.0.0/24"), IPv6Network("::/0")),
    mtu=1300,
)


def test_response_headers_vector() -> None:
    headers = build_response_headers(200, PARAMS, extra=[(b"server", b"masqued")])
    assert headers == [
        (b":status", b"200"),
        (b"masqued-transport", b"stream"),
        (b"masqued-address", b"198.18.200.2/32, 2001:db8:200::2/128"),
        (b"masqued-routes", b"198.19.0.0/24, ::/0"),
        (b"masqued-mtu", b"1300"),
        (b"server", b"masqued"),
    ]
    assert parse_stream_response(headers) == PARAMS
    assert build_response_headers(403) == [(b":status", b"403")]
    assert build_response_headers(403, PARAMS) == [(b":status", b"403")]
    with pytest.raises(ValueError):
        build_response_headers(42)


def test_response_empty_routes() -> None:
    params = TunnelParams(addresses=(IPv4Interface("10.1.0.2/32"),), routes=(), mtu=576)
    headers = build_response_headers(200, params)
    assert (b"masqued-routes", b"") in headers
    assert parse_stream_response(headers) == params


def resp(**over: bytes | None) -> Headers:
    base = dict(build_response_headers(200, PARAMS))
    for name, value in over.items():
        key = name.replace("_", "-").encode()
        if value is None:
            base.pop(key)
        else:
            base[key] = value
    return list(base.items())


@pytest.mark.parametrize(
    "headers",
    [
        resp(**{":status": b"403"}),
        resp(**{":status": b"2000"}),
        resp(**{":status": b"abc"}),
        resp(**{":status": None}),
        resp(masqued_transport=None),
        resp(masqued_transport=b"datagram"),
        resp(masqued_address=None),
        resp(masqued_address=b""),
        resp(masqued_address=b"198.18.200.2"),  # no prefix length
        resp(masqued_address=b"198.18.200.2/33"),
        resp(masqued_address=b"fe80::1%eth0/128"),
        resp(masqued_address=b"198.18.200.2/32,,"),
        resp(masqued_routes=None),
        resp(masqued_routes=b"198.19.0.1/24"),  # host bits
        resp(masqued_routes=b"nonsense"),
        resp(masqued_mtu=None),
        resp(masqued_mtu=b""),
        resp(masqued_mtu=b"575"),
        resp(masqued_mtu=b"65536"),
        resp(masqued_mtu=b"-1"),
        resp(masqued_mtu=b"1279"),  # IPv6 address assigned: below 1280
        [*resp(), (b"masqued-mtu", b"1300")],
    ],
)
def test_bad_responses(headers: Headers) -> None:
    with pytest.raises(ResponseError):
        parse_stream_response(headers)


def test_non_2xx_message_has_status() -> None:
    with pytest.raises(ResponseError, match="403"):
        parse_stream_response([(b":status", b"403")])


def test_v4_only_low_mtu_ok() -> None:
    headers = resp(masqued_address=b"198.18.200.2/32", masqued_mtu=b"1000")
    assert parse_stream_response(headers).mtu == 1000


@settings(deadline=None)
@given(
    st.lists(
        st.one_of(
            st.builds(lambda a: IPv4Interface((a, 32)), st.integers(0, 2**32 - 1)),
            st.builds(lambda a: IPv6Interface((a, 128)), st.integers(0, 2**128 - 1)),
        ),
        min_size=1,
        max_size=3,
    ),
    st.lists(st.one_of(v4net, v6net), max_size=4),
    st.integers(1280, 65535),
)
def test_response_round_trip(
    addresses: list[IPv4Interface | IPv6Interface],
    routes: list[IPv4Network | IPv6Network],
    mtu: int,
) -> None:
    params = TunnelParams(addresses=tuple(addresses), routes=tuple(routes), mtu=mtu)
    assert parse_stream_response(build_response_headers(200, params)) == params


@settings(deadline=None, max_examples=200)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(
                [
                    b":status",
                    b"masqued-address",
                    b"masqued-routes",
                    b"masqued-mtu",
                    b"masqued-transport",
                    b"other",
                ]
            ),
            st.one_of(st.binary(max_size=40), st.sampled_from([b"200", b"stream", b"1300"])),
        ),
        max_size=8,
    )
)
def test_garbage_responses_raise_response_error(headers: Headers) -> None:
    try:
        params = parse_stream_response(headers)
    except ResponseError:
        pass
    else:
        assert params.addresses and 576 <= params.mtu <= 65535


def test_empty_variables_of_a_configured_template_mean_any() -> None:
    template = UriTemplate.parse("https://relay.example/vpn/{target}/{ipproto}/")
    r = parse_connect_request(req("/vpn///"), templates=(template,))
    assert r.target is None and r.ipproto is None
