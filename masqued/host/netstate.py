"""The host state an instance owns, as values: routes, policy rules, addresses.

Shared by the Router that reconciles them (routes.py) and the netlink client that
reads and writes them (rtnetlink.py), so neither imports the other for its types.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

RT_TABLE_MAIN = 254
RT_TABLE_LOCAL = 255
FIB_RULE_INVERT = 0x2
IFA_F_NODAD = 0x02
IFA_F_NOPREFIXROUTE = 0x200  # linux/if_addr.h: no route for the address's prefix
PROTO_KERNEL = 2  # rtm_protocol of the routes the kernel adds itself (RTPROT_KERNEL)


@dataclass(frozen=True)
class Route:
    """A unicast route. ``via`` is an optional gateway (e.g. a pinned route to the relay)."""

    dst: IPNetwork
    dev: str
    table: int = RT_TABLE_MAIN
    via: IPAddress | None = None

    @property
    def family(self) -> int:
        return self.dst.version

    def __str__(self) -> str:
        s = f"{self.dst}"
        if self.via is not None:
            s += f" via {self.via}"
        if self.dev:
            s += f" dev {self.dev}"
        return s + f" table {table_name(self.table)}"


@dataclass(frozen=True)
class Rule:
    """A policy rule. ``invert`` is ``ip rule not ...``; only fwmark selectors are modelled."""

    family: int  # 4 or 6
    priority: int
    table: int
    fwmark: int | None = None
    invert: bool = False
    suppress_prefixlength: int | None = None

    def __str__(self) -> str:
        s = "not " if self.invert else ""
        s += "from all"
        if self.fwmark is not None:
            s += f" fwmark {self.fwmark:#x}"
        s += f" lookup {table_name(self.table)}"
        if self.suppress_prefixlength is not None:
            s += f" suppress_prefixlength {self.suppress_prefixlength}"
        return s


@dataclass(frozen=True)
class NetState:
    """The host state one instance owns."""

    addresses: frozenset[IPInterface] = frozenset()
    routes: frozenset[Route] = frozenset()
    rules: frozenset[Rule] = frozenset()
    # Whether the kernel adds a route for each address's prefix (the relay's TUN
    # gateways need theirs; a client's host addresses get none, IFA_F_NOPREFIXROUTE).
    prefix_routes: bool = field(default=True, compare=False)



def table_name(table: int) -> str:
    return {RT_TABLE_MAIN: "main", RT_TABLE_LOCAL: "local", 253: "default"}.get(table, str(table))


