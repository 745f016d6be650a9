"""The extended CONNECT request for CONNECT-IP and our stream-mode response headers.

Request: RFC 9484 §4 (URI template, target and ipproto variables), RFC 9220 /
RFC 9114 §4.4 (extended CONNECT over HTTP/3). Every refusal is a RequestError
carrying the HTTP status to answer with.

Response: a 2xx for the stream transport carries the tunnel parameters in
``masqued-address``, ``masqued-routes`` and ``masqued-mtu`` (docs/architecture.md §3),
and the relay's resolvers in ``masqued-dns`` / ``masqued-dns-search`` (masqued.proto.dns).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import (
    IPv4Interface,
    IPv4Network,
    IPv6Interface,
    IPv6Network,
    ip_address,
    ip_interface,
    ip_network,
)
from types import MappingProxyType
from typing import Literal

from masqued.proto.dns import DnsInfo, dns_headers, parse_dns_headers
from masqued.proto.errors import RequestError, ResponseError
from masqued.proto.packet import EXTENSION_HEADERS
from masqued.proto.template import UriTemplate

Headers = list[tuple[bytes, bytes]]
IPNetwork = IPv4Network | IPv6Network
IPInterface = IPv4Interface | IPv6Interface
Transport = Literal["stream", "datagram"]

WELL_KNOWN_PREFIX = "/.well-known/masque/ip/"
PROTOCOL = "connect-ip"

TRANSPORT_HEADER = "masqued-transport"
ADDRESS_HEADER = "masqued-address"
ROUTES_HEADER = "masqued-routes"
MTU_HEADER = "masqued-mtu"
CAPSULE_PROTOCOL_HEADER = "capsule-protocol"

MIN_MTU = 576
MAX_MTU = 65535
IPV6_MIN_MTU = 1280

_PSEUDO = frozenset((b":method", b":protocol", b":scheme", b":authority", b":path"))
_HEX = frozenset(b"0123456789abcdefABCDEF")
# RFC 1123 host name: LDH labels of 1..63 characters separated by dots.
_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}\.?$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)
_SMALL_DECIMAL_RE = re.compile(r"^[0-9]{1,3}$")
_BAD_AUTHORITY_RE = re.compile(r"[\x00-\x20\x7f/?#]")
# RFC 8941 §3.1.2 parameter list after a bare item: ;key or ;key=value.
_SF_PARAMS_RE = re.compile(r"^(?:[ ]*;[ ]*[a-z*][a-z0-9_.*-]*(?:=[^;]*)?)*[ ]*$")


@dataclass(frozen=True)
class ConnectIpRequest:
    """A validated CONNECT-IP request.

    ``target`` None means ``*`` (any address); ``ipproto`` None means ``*``.
    ``headers`` holds the regular header fields, names lowercased, repeated fields
    joined with ", " (RFC 9110 §5.3).
    """

    authority: str
    path: str
    target: tuple[IPNetwork, ...] | None
    ipproto: int | None
    transport: Transport
    headers: Mapping[str, str] = field(default_factory=dict, hash=False)


def _err(status: int, reason: str) -> RequestError:
    return RequestError(status, reason)


def _percent_decode(text: str, status: int = 400) -> str:
    """Strict percent-decoding (RFC 3986 §2.1); the result must be ASCII."""
    if "%" not in text:
        return text
    raw = text.encode("ascii")
    out = bytearray()
    i = 0
    while i < len(raw):
        c = raw[i]
        if c == 0x25:  # '%'
            pair = raw[i + 1 : i + 3]
            if len(pair) != 2 or not all(b in _HEX for b in pair):
                raise _err(status, f"bad percent-encoding in {text!r}")
            out.append(int(pair, 16))
            i += 3
        else:
            out.append(c)
            i += 1
    try:
        return out.decode("ascii")
    except UnicodeDecodeError:
        raise _err(status, f"non-ASCII target in {text!r}") from None


def _parse_target(raw: str) -> tuple[IPNetwork, ...] | None:
    """RFC 9484 §4.6: ``*``, an IP address, or ``ADDR/LEN`` with zero host bits. An
    empty value (a client that expanded the template with nothing, as connect-ip-go
    does, breaking §3) is read as ``*``."""
    text = _percent_decode(raw)
    if text in ("*", ""):
        return None
    if "%" in text:  # an IPv6 zone identifier has no meaning here
        raise _err(400, f"bad target {text!r}")
    addr_text, slash, len_text = text.partition("/")
    try:
        addr = ip_address(addr_text)
    except ValueError:
        if not slash and _HOSTNAME_RE.match(text) and re.search(r"[A-Za-z]", text):
            raise _err(501, f"hostname targets are not supported: {text!r}") from None
        raise _err(400, f"bad target {text!r}") from None
    if not slash:
        return (ip_network(addr),)
    if not _SMALL_DECIMAL_RE.match(len_text) or int(len_text) > addr.max_prefixlen:
        raise _err(400, f"bad prefix length in target {text!r}")
    try:
        network = ip_network(f"{addr}/{int(len_text)}", strict=True)
    except ValueError:
        raise _err(400, f"target {text!r} has host bits set") from None
    return (network,)


def _parse_ipproto(raw: str) -> int | None:
    """``*`` (or empty, as for the target), or a decimal protocol number that can be
    a packet's final protocol: an IPv6 extension header number is refused (§4.8
    allows it), since a ROUTE_ADVERTISEMENT with protocol 0 would mean "all"."""
    text = _percent_decode(raw)
    if text in ("*", ""):
        return None
    if not _SMALL_DECIMAL_RE.match(text) or int(text) > 255:
        raise _err(400, f"bad ipproto {text!r}")
    if int(text) in EXTENSION_HEADERS:
        raise _err(400, f"ipproto {text} is an IPv6 extension header, not a final protocol")
    return int(text)


def capsule_protocol_true(values: list[str]) -> bool:
    """RFC 9297 §3.4: a Boolean item; anything else (or repeats) counts as absent."""
    if len(values) != 1:
        return False
    item, _, params = values[0].strip(" \t").partition(";")
    if item.rstrip(" ") != "?1":
        return False
    return not params or _SF_PARAMS_RE.match(";" + params) is not None


def _match_path(
    path: str, templates: Sequence[UriTemplate]
) -> tuple[tuple[IPNetwork, ...] | None, int | None]:
    """(target, ipproto) of a request path: the first configured template it expands,
    else the default one (RFC 9484 §3); a variable the template lacks means ``*``."""
    for template in templates:
        values = template.match(path)
        if values is not None:
            target = values.get("target")
            ipproto = values.get("ipproto")
            return (
                None if target is None else _parse_target(target),
                None if ipproto is None else _parse_ipproto(ipproto),
            )
    resource = path.partition("?")[0]
    served = ", ".join(
        [*(t.text for t in templates), f"{WELL_KNOWN_PREFIX}{{target}}/{{ipproto}}/"]
    )
    if not resource.startswith(WELL_KNOWN_PREFIX):
        raise _err(404, f"path {path!r} matches none of the templates served: {served}")
    parts = resource[len(WELL_KNOWN_PREFIX) :].split("/")
    if len(parts) != 3 or parts[2]:
        raise _err(404, f"path {path!r} matches none of the templates served: {served}")
    return _parse_target(parts[0]), _parse_ipproto(parts[1])


def parse_connect_request(
    headers: Sequence[tuple[bytes, bytes]], templates: Sequence[UriTemplate] = ()
) -> ConnectIpRequest:
    """Validate an extended CONNECT request for CONNECT-IP.

    ``templates``: URI templates this proxy serves besides the default one.
    Raises RequestError with the status to answer: 405 for another method, 501 for
    another :protocol or a hostname target, 404 for a path that expands none of the
    templates, 400 for anything else that is wrong.
    """
    pseudo: dict[bytes, str] = {}
    regular: dict[str, list[str]] = {}
    seen_regular = False
    for name, value in headers:
        if name.startswith(b":"):
            if seen_regular:
                raise _err(400, "pseudo-header after regular header")  # RFC 9114 §4.3
            if name not in _PSEUDO:
                raise _err(400, f"unknown pseudo-header {name!r}")
            if name in pseudo:
                raise _err(400, f"duplicate pseudo-header {name!r}")
            try:
                pseudo[name] = value.decode("ascii")
            except UnicodeDecodeError:
                raise _err(400, f"non-ASCII {name!r}") from None
        else:
            seen_regular = True
            key = name.decode("latin-1").lower()
            regular.setdefault(key, []).append(value.decode("latin-1"))

    method = pseudo.get(b":method")
    if not method:
        raise _err(400, "missing :method")
    if method != "CONNECT":
        raise _err(405, f"method {method} not allowed")
    protocol = pseudo.get(b":protocol")
    if protocol is None:
        raise _err(400, "missing :protocol (not an extended CONNECT)")
    if protocol != PROTOCOL:
        raise _err(501, f"protocol {protocol!r} not supported")
    scheme = pseudo.get(b":scheme")
    path = pseudo.get(b":path")
    authority = pseudo.get(b":authority")
    if not scheme or not path or not authority:
        raise _err(400, "missing :scheme, :path or :authority")
    if scheme != "https":
        raise _err(400, f"scheme {scheme!r} not supported")
    if _BAD_AUTHORITY_RE.search(authority):
        raise _err(400, f"bad :authority {authority!r}")

    target, ipproto = _match_path(path, templates)

    transport_values = regular.get(TRANSPORT_HEADER, [])
    if len(transport_values) > 1:
        raise _err(400, f"repeated {TRANSPORT_HEADER}")
    wants_stream = False
    if transport_values:
        if transport_values[0].strip(" \t") != "stream":
            raise _err(400, f"unknown {TRANSPORT_HEADER} {transport_values[0]!r}")
        wants_stream = True
    wants_datagram = capsule_protocol_true(regular.get(CAPSULE_PROTOCOL_HEADER, []))
    if wants_stream and wants_datagram:
        raise _err(400, f"both {TRANSPORT_HEADER} and {CAPSULE_PROTOCOL_HEADER}")
    if not wants_stream and not wants_datagram:
        raise _err(400, f"need {CAPSULE_PROTOCOL_HEADER}: ?1 or {TRANSPORT_HEADER}: stream")

    return ConnectIpRequest(
        authority=authority,
        path=path,
        target=target,
        ipproto=ipproto,
        transport="stream" if wants_stream else "datagram",
        headers=MappingProxyType({k: ", ".join(v) for k, v in regular.items()}),
    )


def _encode_target(target: IPNetwork | None) -> str:
    """RFC 6570 simple expansion: ':' and '/' percent-encoded (RFC 9484 §4.6)."""
    if target is None:
        return "*"
    text = str(target.network_address) if target.prefixlen == target.max_prefixlen else str(target)
    return text.replace(":", "%3A").replace("/", "%2F")


def request_path(target: IPNetwork | None = None, ipproto: int | None = None) -> str:
    """The default-template path for ``target`` and ``ipproto`` (None meaning ``*``)."""
    if ipproto is not None and not 0 <= ipproto <= 255:
        raise ValueError(f"ipproto {ipproto} out of range")
    proto = "*" if ipproto is None else str(ipproto)
    return f"{WELL_KNOWN_PREFIX}{_encode_target(target)}/{proto}/"


def _path(template: UriTemplate | None, target: IPNetwork | None, ipproto: int | None) -> str:
    if template is None:
        return request_path(target, ipproto)
    if target is None:
        target_text = "*"
    elif target.prefixlen == target.max_prefixlen:
        target_text = str(target.network_address)
    else:
        target_text = str(target)
    return template.expand(
        {"target": target_text, "ipproto": "*" if ipproto is None else str(ipproto)}
    )


def build_connect_request(
    authority: str,
    *,
    transport: str,
    target: IPNetwork | None = None,
    ipproto: int | None = None,
    extra: Sequence[tuple[bytes, bytes]] = (),
    template: UriTemplate | None = None,
) -> Headers:
    """Build the request headers ``parse_connect_request`` accepts (its inverse).

    With ``template`` the :authority and :path are its expansion (RFC 9484 §3);
    else ``authority`` and the default template's path.
    """
    if transport == "stream":
        transport_header = (TRANSPORT_HEADER.encode(), b"stream")
    elif transport == "datagram":
        transport_header = (CAPSULE_PROTOCOL_HEADER.encode(), b"?1")
    else:
        raise ValueError(f"unknown transport {transport!r}")
    return [
        (b":method", b"CONNECT"),
        (b":protocol", PROTOCOL.encode()),
        (b":scheme", b"https"),
        (b":authority", (template.authority if template else authority).encode("ascii")),
        (b":path", _path(template, target, ipproto).encode("ascii")),
        transport_header,
        *extra,
    ]


@dataclass(frozen=True)
class TunnelParams:
    """What a stream-mode client needs to bring its side of the tunnel up."""

    addresses: tuple[IPInterface, ...]
    routes: tuple[IPNetwork, ...]
    mtu: int
    # The relay's resolvers (DNS_ASSIGN, or masqued-dns in stream mode); None: none told.
    dns: DnsInfo | None = None


def build_response_headers(
    status: int,
    params: TunnelParams | None = None,
    extra: Sequence[tuple[bytes, bytes]] = (),
) -> Headers:
    """``:status`` and, for a 2xx with ``params``, the stream-mode tunnel headers."""
    if not 100 <= status <= 999:
        raise ValueError(f"bad HTTP status {status}")
    headers: Headers = [(b":status", str(status).encode())]
    if params is not None and 200 <= status < 300:
        headers += [
            (TRANSPORT_HEADER.encode(), b"stream"),
            (ADDRESS_HEADER.encode(), ", ".join(map(str, params.addresses)).encode()),
            (ROUTES_HEADER.encode(), ", ".join(map(str, params.routes)).encode()),
            (MTU_HEADER.encode(), str(params.mtu).encode()),
            *dns_headers(params.dns),
        ]
    headers.extend(extra)
    return headers


def _list(value: str) -> list[str]:
    """Split a comma-separated header list; an empty or blank value is an empty list."""
    if not value.strip(" \t"):
        return []
    return [item.strip(" \t") for item in value.split(",")]


def parse_stream_response(headers: Sequence[tuple[bytes, bytes]]) -> TunnelParams:
    """Read the relay's answer to a stream-mode request; raise ResponseError if unusable."""
    fields: dict[bytes, str] = {}
    for name, value in headers:
        key = name.lower()
        if key in fields and (key.startswith(b":") or key.startswith(b"masqued-")):
            raise ResponseError(f"repeated {key.decode('latin-1')} in response")
        fields[key] = value.decode("latin-1")

    status_text = fields.get(b":status", "")
    if not re.fullmatch(r"[0-9]{3}", status_text):
        raise ResponseError(f"bad :status {status_text!r} in response")
    status = int(status_text)
    if not 200 <= status < 300:
        raise ResponseError(f"relay answered {status}")

    def need(header: str) -> str:
        value = fields.get(header.encode())
        if value is None:
            raise ResponseError(f"response lacks {header}")
        return value

    transport = need(TRANSPORT_HEADER).strip(" \t")
    if transport != "stream":
        raise ResponseError(f"relay offers transport {transport!r}, not stream")

    addresses: list[IPInterface] = []
    for item in _list(need(ADDRESS_HEADER)):
        try:
            if "%" in item or "/" not in item:
                raise ValueError(item)
            addresses.append(ip_interface(item))
        except ValueError:
            raise ResponseError(f"bad address {item!r} in {ADDRESS_HEADER}") from None
    if not addresses:
        raise ResponseError("relay assigned no address")

    routes: list[IPNetwork] = []
    for item in _list(need(ROUTES_HEADER)):
        try:
            if "%" in item:
                raise ValueError(item)
            route = ip_network(item, strict=True)
        except ValueError:
            raise ResponseError(f"bad route {item!r} in {ROUTES_HEADER}") from None
        routes.append(route)

    mtu_text = need(MTU_HEADER).strip(" \t")
    if not re.fullmatch(r"[0-9]{1,5}", mtu_text):
        raise ResponseError(f"bad {MTU_HEADER} {mtu_text!r}")
    mtu = int(mtu_text)
    if not MIN_MTU <= mtu <= MAX_MTU:
        raise ResponseError(f"{MTU_HEADER} {mtu} outside {MIN_MTU}..{MAX_MTU}")
    if mtu < IPV6_MIN_MTU and any(a.version == 6 for a in addresses):
        raise ResponseError(f"{MTU_HEADER} {mtu} is below the IPv6 minimum (RFC 8200 §5)")
    return TunnelParams(
        addresses=tuple(addresses), routes=tuple(routes), mtu=mtu, dns=parse_dns_headers(fields)
    )
