"""RFC 9484 §3 URI templates: validation, expansion by the client, matching by the proxy."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from masqued.proto.errors import RequestError
from masqued.proto.request import build_connect_request, parse_connect_request
from masqued.proto.template import TemplateError, UriTemplate

TEMPLATES = [
    "https://relay.example/.well-known/masque/ip/{target}/{ipproto}/",
    "https://proxy.example.org:4443/masque/ip?t={target}&i={ipproto}",
    "https://proxy.example.org:4443/masque/ip{?target,ipproto}",
    "https://masque.example.org/?user=bob",
    "https://relay.example/vpn",
    "https://relay.example/ip/{target}/{ipproto}{?user}",
]


@pytest.mark.parametrize("text", TEMPLATES)
def test_the_rfc_examples_and_ours_are_valid(text: str) -> None:
    template = UriTemplate.parse(text)
    assert template.scheme == "https" and template.authority


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("", "ASCII"),
        ("https://relay.example/vpn é", "ASCII"),
        ("http://relay.example/vpn", "https"),
        ("/.well-known/masque/ip/{target}/{ipproto}/", "absolute"),
        ("https://relay.example", "path"),
        ("https://{host}/vpn", "authority"),
        ("https://relay.example/{+target}", "reserved"),
        ("https://relay.example/{#target}", "fragment"),
        ("https://relay.example/{.target}", "label"),
        ("https://relay.example/x{/target}", "path segment"),
        ("https://relay.example/x{;target}", "path-style"),
        ("https://relay.example/{target:3}", "level 4"),
        ("https://relay.example/{target*}", "level 4"),
        ("https://relay.example/{target", "unbalanced"),
        ("https://relay.example/{}", "empty"),
        ("https://relay.example/vpn#frag", "fragment"),
        ("https://relay.example/%zz", "percent"),
    ],
)
def test_templates_rfc_9484_forbids_are_refused_with_the_rule(text: str, rule: str) -> None:
    with pytest.raises(TemplateError, match=rule):
        UriTemplate.parse(text)


TARGETS = st.one_of(
    st.just("*"),
    st.ip_addresses().map(str),
    st.builds(
        lambda net: str(net),
        st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).flatmap(
            lambda a: st.integers(0, a.max_prefixlen).map(
                lambda n: ipaddress.ip_network((a, n), strict=False)
            )
        ),
    ),
)
PROTOS = st.one_of(st.just("*"), st.integers(0, 255).map(str))


@given(text=st.sampled_from(TEMPLATES), target=TARGETS, ipproto=PROTOS)
def test_what_the_client_expands_the_proxy_matches(text: str, target: str, ipproto: str) -> None:
    template = UriTemplate.parse(text)
    values = {"target": target, "ipproto": ipproto}
    if "user" in template.variables:
        values["user"] = "bob"
    path = template.expand(values)
    got = template.match(path)
    assert got is not None
    for name in template.variables & {"target", "ipproto"}:
        assert got[name].replace("%3A", ":").replace("%2F", "/") == values[name]


def test_a_template_without_variables_means_any_target_and_protocol() -> None:
    template = UriTemplate.parse("https://relay.example/vpn")
    request = parse_connect_request(_headers("/vpn"), [template])
    assert request.target is None and request.ipproto is None
    # the default template keeps working beside it
    request = parse_connect_request(
        _headers("/.well-known/masque/ip/198.19.0.0%2F24/6/"), [template]
    )
    assert request.target == (ipaddress.ip_network("198.19.0.0/24"),) and request.ipproto == 6


def test_a_path_matching_no_template_is_404_naming_the_path_and_the_templates() -> None:
    template = UriTemplate.parse("https://relay.example/vpn")
    with pytest.raises(RequestError) as exc:
        parse_connect_request(_headers("/other"), [template])
    assert exc.value.status == 404
    assert "'/other'" in exc.value.reason and "https://relay.example/vpn" in exc.value.reason


def test_query_templates_read_their_variables_back() -> None:
    template = UriTemplate.parse("https://proxy.example.org:4443/masque/ip?t={target}&i={ipproto}")
    request = parse_connect_request(_headers("/masque/ip?t=2001%3Adb8%3A%3A1&i=17"), [template])
    assert request.target == (ipaddress.ip_network("2001:db8::1/128"),) and request.ipproto == 17
    assert template.match("/masque/ip?t=*") is None  # a variable missing
    assert template.match("/masque/ip?t=*&i=*&t=1") is None  # repeated


def test_the_client_sends_the_expansion_and_the_template_authority() -> None:
    template = UriTemplate.parse("https://proxy.example.org:4443/masque/ip{?target,ipproto}")
    headers = dict(build_connect_request("ignored:1", transport="datagram", template=template))
    assert headers[b":authority"] == b"proxy.example.org:4443"
    assert headers[b":path"] == b"/masque/ip?target=*&ipproto=*"
    request = parse_connect_request(list(headers.items()), [template])
    assert request.target is None and request.ipproto is None


def _headers(path: str) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", b"CONNECT"),
        (b":protocol", b"connect-ip"),
        (b":scheme", b"https"),
        (b":authority", b"relay.example:443"),
        (b":path", path.encode()),
        (b"capsule-protocol", b"?1"),
    ]
