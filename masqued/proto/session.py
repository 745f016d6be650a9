"""One CONNECT-IP tunnel's protocol state, for both roles, without I/O (RFC 9484).

Shaped like h11: a transport adapter feeds a session the request or response headers,
the bytes of the request stream and the HTTP Datagram payloads of the tunnel; the
session answers with the headers and bytes to send, the IP packets that arrived, and
past-tense events (masqued.proto.events). It knows nothing of QUIC or HTTP/2 beyond
"a stream of bytes" and "datagrams with a context ID". A peer's violation raises a
ProtocolError carrying the code to abort the stream with; nothing else escapes.

Two framings of the request stream (docs/architecture.md §3): ``stream`` (masqued's own: only
``u16 length || packet`` records, tunnel parameters in the response headers) and
``datagram`` (RFC 9484: capsules, packets in HTTP Datagrams or DATAGRAM capsules).
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from masqued.proto.capsule import (
    ADDRESS_ASSIGN,
    ADDRESS_REQUEST,
    DNS_ASSIGN,
    ROUTE_ADVERTISEMENT,
    Capsule,
)
from masqued.proto.connect_ip import (
    AssignedAddress,
    IPRange,
    RequestedAddress,
    decode_address_assign,
    decode_address_request,
    decode_route_advertisement,
    encode_address_assign,
    encode_address_request,
    encode_route_advertisement,
    ranges_for,
    rejection,
)
from masqued.proto.dns import DnsInfo, decode_dns_assign, dns_info, encode_dns_assign
from masqued.proto.drops import (
    DROP_ACL,
    DROP_LINK_LOCAL,
    DROP_MALFORMED,
    DROP_NOT_ROUTED,
    DROP_OUT_OF_SCOPE,
    DROP_OVERSIZED,
    DROP_SPOOFED,
    DROP_TTL_EXPIRED,
)
from masqued.proto.errors import CapsuleError, PacketError, ResponseError
from masqued.proto.events import (
    AddressesAssigned,
    AddressesRequested,
    DnsAssigned,
    Event,
    RoutesAdvertised,
    StreamEnded,
    TunnelChanged,
    TunnelOpened,
    TunnelRefused,
)
from masqued.proto.filters import IcmpBudget, RouteFilter, is_link_local
from masqued.proto.framings import CapsuleFraming, Framing, Mode, RecordFraming, datagram_packet
from masqued.proto.packet import (
    PROTO_ICMP,
    PROTO_ICMPV6,
    addresses,
    decrement_ttl,
    echo_reply,
    icmp_admin_prohibited,
    icmp_error,
    icmp_packet_too_big,
    parse_packet,
)
from masqued.proto.request import (
    CAPSULE_PROTOCOL_HEADER,
    IPV6_MIN_MTU,
    ConnectIpRequest,
    Headers,
    IPInterface,
    IPNetwork,
    TunnelParams,
    build_connect_request,
    build_response_headers,
    capsule_protocol_true,
    parse_stream_response,
)
from masqued.proto.template import UriTemplate

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
ALL_NODES = ipaddress.IPv6Address("ff02::1")

# Request IDs one ADDRESS_REQUEST stream may use in all (RFC 9484 §4.7.2 forbids
# reuse, so the set of used IDs must be kept; this bounds it).
MAX_REQUEST_IDS = 256
# Networks the client keeps of a ROUTE_ADVERTISEMENT for its parameters (display, the
# "not advertised" warning); packets are judged against the ranges themselves.
MAX_ROUTE_NETWORKS = 1024
# ICMP Time Exceeded (RFC 792) / ICMPv6 Time Exceeded (RFC 4443 §3.3), code 0.
ICMPV4_TIME_EXCEEDED = 11
ICMPV6_TIME_EXCEEDED = 3


class Destinations(Protocol):
    """Where an admitted client's packets may go (masqued.gate.policy.Reach): a verdict
    per destination, "" or the drop reason. ``verdicts`` is subscripted per packet;
    ``verdict`` decides (and remembers) a destination it does not hold yet."""

    verdicts: dict[bytes, str]

    def verdict(self, version: int, dst: bytes) -> str: ...


class ProxySession:
    """The relay's side of one admitted tunnel.

    Built once admission gave the client its addresses; ``response`` is what to send
    first. Then ``receive_data`` / ``receive_datagram`` turn what the client sent into
    IP packets, ``uplink`` decides which of them may reach the TUN (and which ICMP
    errors go back to the client), and ``downlink`` prepares packets from the TUN.
    """

    def __init__(
        self,
        request: ConnectIpRequest,
        *,
        addresses: Sequence[IPInterface],
        routes: Sequence[IPNetwork],
        mtu: int,
        gateways: dict[int, IPAddress],
        drops: Counter[str],
        acl: Callable[[bytes], bool] | None = None,
        reach: Destinations | None = None,
        dns: DnsInfo | None = None,
    ) -> None:
        self.request = request
        self.dns = dns  # resolvers told to the client (DNS_ASSIGN / masqued-dns)
        self.mode = Mode(request.transport)
        self.addresses = tuple(addresses)
        self.routes = tuple(routes)
        self.mtu = mtu
        self.gateways = gateways
        self.drops = drops
        self.acl = acl
        # None: anything (only for tests of the framing; the relay always sets it).
        self.reach = reach
        self.addr_keys = frozenset(a.ip.packed for a in self.addresses)
        # Echo requests the relay answers itself (RFC 9484 §7.2: a peer may probe the
        # tunnel's MTU with ICMPv6 echo to ff02::1, or ping its gateway); never
        # forwarded: the gateway is the relay's own address.
        self.echo_dsts = frozenset(
            [ALL_NODES.packed] * (6 in gateways) + [g.packed for g in gateways.values()]
        )
        self.framing: Framing = (
            RecordFraming(mtu) if self.mode is Mode.STREAM else CapsuleFraming(mtu, drops)
        )
        self.icmp = IcmpBudget()
        self._request_ids: set[int] = set()
        self.peer_routes: tuple[IPRange, ...] | None = None
        # Set by uplink() when it dropped a spoofed packet or refused one (why: the
        # drop reason), for the adapter's rate-limited log line; the adapter resets them.
        self.spoofed_from: bytes | None = None
        self.denied_to: bytes | None = None
        self.denied_why = ""
        self.ended = False

    @property
    def scoped(self) -> bool:
        return self.request.target is not None or self.request.ipproto is not None

    def response(self) -> tuple[Headers, bytes]:
        """The 2xx headers and the first bytes of the stream: stream mode puts the
        tunnel parameters in headers; datagram mode sends ADDRESS_ASSIGN (request ID
        0, unprompted) and ROUTE_ADVERTISEMENT (RFC 9484 §4.7) after a capsule-protocol
        2xx, then DNS_ASSIGN when the relay names resolvers (after the routes, as
        draft-ietf-masque-connect-ip-dns §5 asks). A scoped ipproto narrows the routes
        to that protocol (§4.7.3)."""
        if self.mode is Mode.STREAM:
            params = TunnelParams(
                addresses=self.addresses, routes=self.routes, mtu=self.mtu, dns=self.dns
            )
            return build_response_headers(200, params), b""
        headers = build_response_headers(200, extra=[(CAPSULE_PROTOCOL_HEADER.encode(), b"?1")])
        proto = self.request.ipproto or 0
        control = encode_address_assign(
            AssignedAddress(0, a.network) for a in self.addresses
        ) + encode_route_advertisement(ranges_for(self.routes, proto))
        if self.dns:
            control += encode_dns_assign(self.dns.configurations())
        return headers, control

    def receive_data(self, data: bytes, ended: bool) -> tuple[list[bytes], bytes, list[Event]]:
        """Bytes of the request stream: (packets, bytes to send back, events)."""
        packets, control = self.framing.decode(data) if data else ([], [])
        reply = b""
        events: list[Event] = []
        for capsule in control:
            answer, event = self._capsule(capsule)
            reply += answer
            if event is not None:
                events.append(event)
        if ended:
            self.framing.end()
            self.ended = True
            events.append(StreamEnded())
        return packets, reply, events

    def _capsule(self, capsule: Capsule) -> tuple[bytes, Event | None]:
        kind = capsule.type
        if kind == ADDRESS_REQUEST:
            requests = decode_address_request(capsule.value).requests
            ids = {r.request_id for r in requests}
            reused = self._request_ids & ids
            if reused:
                raise CapsuleError(f"ADDRESS_REQUEST reuses request ID {min(reused)}")
            if len(self._request_ids) + len(ids) > MAX_REQUEST_IDS:
                raise CapsuleError(f"more than {MAX_REQUEST_IDS} address requests")
            self._request_ids |= ids
            return self._answer(requests), AddressesRequested(requests)
        if kind == ADDRESS_ASSIGN:
            # The client assigning us addresses (site-to-site) is not something we
            # use; it is still checked, as a malformed one must abort the stream.
            decode_address_assign(capsule.value)
            return b"", None
        if kind == ROUTE_ADVERTISEMENT:
            self.peer_routes = decode_route_advertisement(capsule.value).ranges
            return b"", RoutesAdvertised(self.peer_routes)
        if kind == DNS_ASSIGN:
            # A client's DNS configuration is not for us (draft-ietf-masque-connect-ip-dns
            # §3: proxies ignore it); a malformed one still aborts.
            decode_dns_assign(capsule.value)
        return b"", None

    def _answer(self, requests: Iterable[RequestedAddress]) -> bytes:
        """RFC 9484 §4.7.2: one Assigned Address per request (the lease address of that
        family when the request allows it, else the all-zero rejection) plus the rest
        of the lease with request ID 0; the capsule lists every assigned address."""
        lease = {a.version: a.network for a in self.addresses}
        answered: dict[int, int] = {}  # IP version -> request ID that got the address
        entries: list[AssignedAddress] = []
        for req in requests:
            mine = lease.get(req.prefix.version)
            wanted = req.prefix
            any_address = int(wanted.network_address) == 0
            if (
                mine is not None
                and mine.version not in answered
                and (any_address or mine.subnet_of(wanted))  # type: ignore[arg-type]
            ):
                answered[mine.version] = req.request_id
                entries.append(AssignedAddress(req.request_id, mine))
            else:
                entries.append(rejection(req.request_id, wanted.version))
        for version, net in lease.items():
            if version not in answered:
                entries.append(AssignedAddress(0, net))
        return encode_address_assign(entries)

    def receive_datagram(self, payload: bytes) -> bytes | None:
        """An HTTP Datagram of this tunnel: its IP packet, or None (dropped, counted)."""
        return datagram_packet(payload, self.drops)

    def uplink(self, packets: Iterable[bytes], now: float) -> tuple[list[bytes], list[bytes]]:
        """Client -> TUN checks of RFC 9484 §7 and docs/architecture.md §4: (packets that may go to
        the TUN, ICMP errors to send back to the client)."""
        drops = self.drops
        keys = self.addr_keys
        mtu = self.mtu
        acl = self.acl
        reach = self.reach
        # With a reach, a scoped target is part of it: only the protocol is left.
        scoped = self.request.ipproto is not None or (reach is None and self.scoped)
        verdicts = reach.verdicts if reach is not None else {}
        accepted: list[bytes] = []
        replies: list[bytes] = []
        for pkt in packets:
            try:
                version, src, dst = addresses(pkt)
            except PacketError:
                drops[DROP_MALFORMED] += 1
                continue
            if dst in self.echo_dsts and (src in keys or is_link_local(version, src)):
                reply = echo_reply(pkt, self.gateways[version])
                if reply is not None:
                    if self.icmp.take(now):
                        replies.append(reply)
                    continue
            # RFC 9484 §7: link-local traffic belongs to the tunnel link (a peer's
            # kernel sends router solicitations from fe80::); never forwarded, and a
            # link-local source is not a spoofed one.
            if is_link_local(version, dst) or is_link_local(version, src):
                drops[DROP_LINK_LOCAL] += 1
                continue
            if src not in keys:
                drops[DROP_SPOOFED] += 1
                self.spoofed_from = src
                continue
            # Only into the relay's routes (a scoped request: its target), never to the
            # relay itself: one dict subscript per packet, the route compare on a miss.
            if reach is not None:
                try:
                    why = verdicts[dst]
                except KeyError:
                    why = reach.verdict(version, dst)
                if why:
                    self._refuse(pkt, version, dst, why, now, replies)
                    continue
            if len(pkt) > mtu:
                # Too big for our TUN: tell the sender the tunnel's MTU (§7.2.1).
                drops[DROP_OVERSIZED] += 1
                gateway = self.gateways.get(version)
                icmp = icmp_packet_too_big(pkt, mtu, gateway) if gateway is not None else None
                if icmp is not None:
                    replies.append(icmp)
                continue
            if scoped:
                why = self._out_of_scope(pkt)
                if why == DROP_MALFORMED:
                    drops[DROP_MALFORMED] += 1
                    continue
                if why:
                    self._refuse(pkt, version, dst, why, now, replies)
                    continue
            if acl is not None and not acl(pkt):
                self._refuse(pkt, version, dst, DROP_ACL, now, replies)
                continue
            accepted.append(pkt)
        return accepted, replies

    def _refuse(
        self, pkt: bytes, version: int, dst: bytes, why: str, now: float, replies: list[bytes]
    ) -> None:
        """A packet the relay will not forward (outside its routes or the request's
        scope, to the relay itself, denied by the ACL): counted under ``why`` and
        answered with ICMP administratively prohibited within the ICMP budget."""
        self.drops[why] += 1
        self.denied_to = dst
        self.denied_why = why
        gateway = self.gateways.get(version)
        if gateway is not None and self.icmp.take(now):
            icmp = icmp_admin_prohibited(pkt, gateway)
            if icmp is not None:
                replies.append(icmp)

    def _out_of_scope(self, pkt: bytes) -> str:
        """A scoped request (RFC 9484 §4.6): "" or the drop reason. ICMP always passes
        a protocol scope (errors about the flow); the target is ``reach``'s, when the
        session has one."""
        try:
            info = parse_packet(pkt)
        except PacketError:
            return DROP_MALFORMED
        targets = self.request.target
        if self.reach is None and targets is not None and not any(info.dst in t for t in targets):
            return DROP_OUT_OF_SCOPE
        ipproto = self.request.ipproto
        if (
            ipproto is not None
            and info.proto != ipproto
            and info.proto != (PROTO_ICMP if info.version == 4 else PROTO_ICMPV6)
        ):
            return DROP_OUT_OF_SCOPE
        return ""

    def downlink(self, packets: list[bytes], room: int) -> tuple[list[bytes], list[bytes]]:
        """TUN -> client: (packets to send, ICMP errors to write back to the TUN).

        Datagram mode decrements the hop count on encapsulation (§7.2; Time Exceeded
        when it runs out) and answers what cannot fit ``room`` bytes with Packet Too
        Big. Stream mode changes nothing (its data plane drops packets above the MTU:
        the records would be refused).
        """
        if self.mode is Mode.STREAM:
            return packets, []
        drops = self.drops
        out: list[bytes] = []
        to_tun: list[bytes] = []
        for pkt in packets:
            try:
                fwd = decrement_ttl(pkt)
            except PacketError:
                drops[DROP_MALFORMED] += 1
                continue
            version = pkt[0] >> 4
            gateway = self.gateways.get(version)
            if fwd is None:
                drops[DROP_TTL_EXPIRED] += 1
                if gateway is not None:
                    kind = ICMPV4_TIME_EXCEEDED if version == 4 else ICMPV6_TIME_EXCEEDED
                    icmp = icmp_error(pkt, gateway, kind, 0)
                    if icmp is not None:
                        to_tun.append(icmp)
                continue
            if len(fwd) > room:
                drops[DROP_OVERSIZED] += 1
                if gateway is not None:
                    icmp = icmp_packet_too_big(pkt, room, gateway)
                    if icmp is not None:
                        to_tun.append(icmp)
                continue
            out.append(fwd)
        return out, to_tun


class ClientSession:
    """The client's side of one tunnel attempt: request, response, then packets.

    ``request`` picks the mode from the peer's SETTINGS and returns the headers;
    ``receive_headers`` reads the response; then ``receive_data`` and
    ``receive_datagram`` yield packets and control events until the stream ends;
    ``uplink`` keeps what the relay does not route (for that protocol) out of the
    tunnel. ``routes``: what the client sends into the tunnel. ``params`` is the
    tunnel's state once TunnelOpened was returned.
    """

    def __init__(
        self,
        *,
        authority: str,
        wanted: str,
        mtu: int,
        drops: Counter[str],
        request_versions: Sequence[int] = (),
        extra_headers: Sequence[tuple[bytes, bytes]] = (),
        template: UriTemplate | None = None,
        routes: Sequence[IPNetwork] = (),
    ) -> None:
        if wanted not in ("stream", "datagram", "auto"):
            raise ValueError(f"unknown transport {wanted!r}")
        self.authority = authority
        self.wanted = wanted
        self.mtu = mtu
        self.drops = drops
        self.request_versions = tuple(request_versions)
        self.extra_headers = tuple(extra_headers)
        self.template = template
        self.routes = tuple(routes)
        self.route_filter: RouteFilter | None = None
        self._ranges: tuple[IPRange, ...] | None = None
        self.icmp = IcmpBudget()
        self.mode: Mode | None = None
        self.framing: Framing | None = None
        self.responded = False
        self.params: TunnelParams | None = None
        self._assigned: tuple[IPNetwork, ...] | None = None
        self._routes: tuple[IPNetwork, ...] | None = None
        self._dns: DnsInfo | None = None
        self._request_ids: dict[int, int] = {}  # request ID -> IP version
        # The relay advertised more than MAX_ROUTE_NETWORKS networks / more than one
        # address of a family: the adapter says so once.
        self.routes_truncated = False
        self.addresses_dropped = 0

    def request(self, *, extended_connect: bool, datagrams: bool) -> Headers:
        """The CONNECT-IP request for a peer whose SETTINGS allow ``extended_connect``
        and offer ``datagrams``; ResponseError if the tunnel cannot be asked for."""
        if not extended_connect:
            # RFC 9220 §3: extended CONNECT only once the peer's SETTINGS allow it.
            raise ResponseError(
                "relay does not support extended CONNECT (SETTINGS_ENABLE_CONNECT_PROTOCOL)"
            )
        if self.wanted == "datagram" and not datagrams:
            raise ResponseError("relay does not offer HTTP/3 datagrams (SETTINGS_H3_DATAGRAM)")
        datagram = self.wanted == "datagram" or (self.wanted == "auto" and datagrams)
        self.mode = Mode.DATAGRAM if datagram else Mode.STREAM
        self.framing = CapsuleFraming(self.mtu, self.drops) if datagram else RecordFraming(self.mtu)
        return build_connect_request(
            self.authority,
            transport=self.mode.value,
            extra=self.extra_headers,
            template=self.template,
        )

    def receive_headers(self, headers: Headers, ended: bool) -> tuple[list[Event], bytes]:
        """The response (or an interim one): events, and bytes to send (ADDRESS_REQUEST)."""
        if self.responded:
            raise ResponseError("unexpected HEADERS on the tunnel stream")
        status = _status(headers)
        if status < 200:
            return [], b""  # interim: the final response follows
        if status >= 300:
            return [TunnelRefused(status, f"relay refused the tunnel: status {status}")], b""
        self.responded = True
        events: list[Event] = []
        out = b""
        if self.mode is Mode.STREAM:
            self.params = parse_stream_response(headers)
            self._set_filter(ranges_for(self.params.routes))
            events.append(TunnelOpened(self.params))
        else:
            fields = [v.decode("latin-1") for n, v in headers if n.lower() == b"capsule-protocol"]
            if not capsule_protocol_true(fields):
                raise ResponseError(f"relay answered {status} without capsule-protocol: ?1")
            out = self._address_request()
        if ended:
            events.append(StreamEnded())
        return events, out

    def _address_request(self) -> bytes:
        requests: list[RequestedAddress] = []
        for version in self.request_versions:
            request_id = len(self._request_ids) + 1
            self._request_ids[request_id] = version
            any_addr = ipaddress.ip_network("0.0.0.0/32" if version == 4 else "::/128")
            requests.append(RequestedAddress(request_id, any_addr))
        return encode_address_request(requests) if requests else b""

    def receive_data(self, data: bytes, ended: bool) -> tuple[list[bytes], list[Event]]:
        """Bytes of the request stream after the response: (packets, events)."""
        if not self.responded or self.framing is None:
            raise ResponseError("tunnel data before the response")
        packets, control = self.framing.decode(data) if data else ([], [])
        events: list[Event] = []
        for capsule in control:
            events.extend(self._capsule(capsule))
        if ended:
            self.framing.end()
            events.append(StreamEnded())
        return packets, events

    def _capsule(self, capsule: Capsule) -> list[Event]:
        kind = capsule.type
        events: list[Event] = []
        if kind == ADDRESS_ASSIGN:
            assign = decode_address_assign(capsule.value)
            # One address per family is what the TUN gets (the first the relay
            # assigned): a capsule of hundreds would be as many host changes.
            usable = assign.usable()
            first: dict[int, IPNetwork] = {}
            for prefix in usable:
                first.setdefault(prefix.version, prefix)
            self._assigned = tuple(first.values())
            self.addresses_dropped = len(usable) - len(first)
            declined = tuple(
                a.request_id for a in assign.addresses if a.is_rejection and a.request_id
            )
            events.append(AddressesAssigned(self._assigned, declined))
        elif kind == ROUTE_ADVERTISEMENT:
            advert = decode_route_advertisement(capsule.value)
            self._routes, complete = advert.some_networks(MAX_ROUTE_NETWORKS)
            self.routes_truncated = not complete
            self._set_filter(advert.ranges)
            events.append(RoutesAdvertised(advert.ranges))
        elif kind == DNS_ASSIGN:
            self._dns = dns_info(decode_dns_assign(capsule.value))
            events.append(DnsAssigned(self._dns))
        elif kind == ADDRESS_REQUEST:
            # The relay asking us for addresses: checked (a malformed one aborts), but
            # we assign none.
            decode_address_request(capsule.value)
            return events
        else:
            return events
        events.extend(self._update())
        return events

    def _update(self) -> list[Event]:
        """Once both the addresses and the routes are known: opened, or changed."""
        if self._assigned is None or self._routes is None:
            return []
        params = TunnelParams(
            addresses=tuple(_interface(p) for p in self._assigned),
            routes=self._routes,
            mtu=self.mtu,
            dns=self._dns,
        )
        if params == self.params:
            return []
        first = self.params is None
        if first and not params.addresses:
            raise ResponseError("relay assigned no address")
        self.params = params
        return [TunnelOpened(params) if first else TunnelChanged(params)]

    def set_routes(self, routes: Sequence[IPNetwork]) -> None:
        """What the client sends into the tunnel changed (reload)."""
        self.routes = tuple(routes)
        if self._ranges is not None:
            self._set_filter(self._ranges)

    def _set_filter(self, ranges: Sequence[IPRange]) -> None:
        """Check packets against the relay's routes only where the routes we send into
        the tunnel are not all inside all-protocol ranges (the common case costs
        nothing per packet)."""
        self._ranges = tuple(ranges)
        route_filter = RouteFilter(ranges)
        if all(route_filter.covers_network(r) for r in self.routes):
            self.route_filter = None
        else:
            self.route_filter = route_filter

    def uplink(self, packets: list[bytes], now: float) -> tuple[list[bytes], list[bytes]]:
        """TUN -> relay: (packets the relay routes, ICMP errors for our own stack).

        A packet the relay did not advertise a route for (for its protocol) would be
        dropped there without a word; it is answered here with ICMP administratively
        prohibited instead (RFC 9484 §8), within a rate limit."""
        route_filter = self.route_filter
        if route_filter is None:
            return packets, []
        allowed: list[bytes] = []
        replies: list[bytes] = []
        for pkt in packets:
            if route_filter.allows(pkt):
                allowed.append(pkt)
                continue
            self.drops[DROP_NOT_ROUTED] += 1
            if self.icmp.take(now):
                try:
                    dst = parse_packet(pkt).dst
                except PacketError:
                    continue
                icmp = icmp_admin_prohibited(pkt, dst)
                if icmp is not None:
                    replies.append(icmp)
        return allowed, replies

    def receive_datagram(self, payload: bytes) -> bytes | None:
        """An HTTP Datagram of this tunnel: its IP packet, or None (dropped, counted)."""
        if not self.responded:
            return None  # not open yet: dropped (RFC 9297 §2.1)
        return datagram_packet(payload, self.drops)

    def check_room(self, room: int) -> None:
        """RFC 9484 §7.2: an IPv6 tunnel must carry 1280-byte packets; ResponseError
        when the path's datagrams carry only ``room`` bytes of IP packet."""
        params = self.params
        if room < IPV6_MIN_MTU and params and any(a.version == 6 for a in params.addresses):
            raise ResponseError(
                f"QUIC path carries only {room}-byte packets, below the IPv6 minimum MTU"
            )


def _status(headers: Headers) -> int:
    for name, value in headers:
        if name == b":status":
            text = value.decode("latin-1")
            if len(text) == 3 and text.isdigit():
                return int(text)
            raise ResponseError(f"unusable response from relay: bad :status {text!r}")
    raise ResponseError("unusable response from relay: no :status")


def _interface(prefix: IPNetwork) -> IPInterface:
    """The TUN address for an assigned prefix: the address itself for /32 and /128,
    else the prefix's first host address (RFC 9484 lets the proxy assign prefixes)."""
    if prefix.prefixlen == prefix.max_prefixlen:
        return ipaddress.ip_interface(prefix.network_address)
    return ipaddress.ip_interface((prefix.network_address + 1, prefix.prefixlen))
