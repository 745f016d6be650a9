"""What a CONNECT-IP session tells its transport happened (past tense, like h11's events)."""

from __future__ import annotations

from dataclasses import dataclass

from masqued.proto.connect_ip import IPRange, RequestedAddress
from masqued.proto.dns import DnsInfo
from masqued.proto.request import IPNetwork, TunnelParams


@dataclass(frozen=True, slots=True)
class TunnelOpened:
    """Client: the relay accepted the tunnel and told its addresses and routes."""

    params: TunnelParams


@dataclass(frozen=True, slots=True)
class TunnelChanged:
    """Client: the relay assigned other addresses or advertised other routes."""

    params: TunnelParams


@dataclass(frozen=True, slots=True)
class TunnelRefused:
    """Client: the relay answered the request with a final non-2xx status."""

    status: int
    reason: str


@dataclass(frozen=True, slots=True)
class AddressesAssigned:
    """ADDRESS_ASSIGN: the usable prefixes, and request IDs the peer could not fulfil."""

    prefixes: tuple[IPNetwork, ...]
    declined: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class RoutesAdvertised:
    """ROUTE_ADVERTISEMENT: every range the peer routes, with its IP protocol."""

    ranges: tuple[IPRange, ...]


@dataclass(frozen=True, slots=True)
class DnsAssigned:
    """DNS_ASSIGN: the resolvers the peer names (what a resolver configuration can use)."""

    dns: DnsInfo


@dataclass(frozen=True, slots=True)
class AddressesRequested:
    """Relay: an ADDRESS_REQUEST, already answered by the session."""

    requests: tuple[RequestedAddress, ...]


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer finished its side of the request stream (a clean end of the tunnel)."""


Event = (
    TunnelOpened
    | TunnelChanged
    | TunnelRefused
    | AddressesAssigned
    | RoutesAdvertised
    | DnsAssigned
    | AddressesRequested
    | StreamEnded
)
