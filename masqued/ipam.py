"""The relay's client address pool. Pure: no I/O, no clock.

Each configured network gives its first host address (network + 1) to the relay's
own TUN interface; clients get the others, one address per address family present
in the pool, always the lowest free one (networks of a family in configured order).

Per network we keep a high-water mark (every address below it has been handed out
at least once) and a min-heap of addresses given back below it, so allocation and
release are O(log n) however large the network (an IPv6 /64 included) and nothing
is materialised per address.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
)

IPAddress = IPv4Address | IPv6Address
IPInterface = IPv4Interface | IPv6Interface
IPNetwork = IPv4Network | IPv6Network


class PoolExhausted(Exception):
    """No free address is left in some address family of the pool."""


@dataclass(frozen=True)
class Lease:
    """The host addresses (/32, /128) one client holds, one per family, pool order."""

    owner: str
    addresses: tuple[IPInterface, ...]


class _Range:
    """The client addresses of one network: ``first`` .. ``last`` as integers."""

    __slots__ = ("_free", "_next", "first", "last", "network")

    def __init__(self, network: IPNetwork) -> None:
        self.network = network
        base = int(network.network_address)
        self.first = base + 2  # base is the network address, base + 1 the gateway
        # IPv4 loses the broadcast address; IPv6 has none (RFC 4291 §2.6.1 only
        # reserves the all-zero subnet-router anycast, which is ``base``).
        self.last = int(network.broadcast_address) - (1 if network.version == 4 else 0)
        if self.last < self.first:
            raise ValueError(f"pool too small: {network} has no client addresses")
        self._next = self.first  # every address below has been handed out once
        self._free: list[int] = []  # released addresses below _next (min-heap)

    @property
    def size(self) -> int:
        return self.last - self.first + 1

    def has_free(self) -> bool:
        return bool(self._free) or self._next <= self.last

    def take_lowest(self) -> int:
        if self._free:
            return heapq.heappop(self._free)
        if self._next > self.last:
            raise PoolExhausted(f"{self.network} is full")
        value = self._next
        self._next += 1
        return value

    def give_back(self, value: int) -> None:
        # Always below _next, so the heap's minimum is the lowest free address.
        heapq.heappush(self._free, value)


class AddressPool:
    """Hands out client addresses from the relay's configured networks."""

    def __init__(self, networks: Sequence[IPNetwork]) -> None:
        if not networks:
            raise ValueError("empty address pool")
        for i, a in enumerate(networks):
            for b in networks[i + 1 :]:
                if a.version == b.version and a.overlaps(b):
                    raise ValueError(f"pool networks {a} and {b} overlap")
        self._ranges = [_Range(net) for net in networks]
        self._families: dict[int, list[_Range]] = {}
        for r in self._ranges:
            self._families.setdefault(r.network.version, []).append(r)
        self._leases: dict[str, Lease] = {}
        self._owners: dict[IPAddress, str] = {}
        # owner -> (range, integer address) for each address of the lease
        self._held: dict[str, list[tuple[_Range, int]]] = {}

    @property
    def networks(self) -> tuple[IPNetwork, ...]:
        return tuple(r.network for r in self._ranges)

    def gateways(self) -> tuple[IPInterface, ...]:
        """The relay's own TUN addresses: network + 1 with the network's prefix length."""
        out: list[IPInterface] = []
        for r in self._ranges:
            net = r.network
            gateway = net.network_address + 1
            if isinstance(net, IPv4Network):
                out.append(IPv4Interface((gateway, net.prefixlen)))
            else:
                out.append(IPv6Interface((gateway, net.prefixlen)))
        return tuple(out)

    def allocate(self, owner: str) -> Lease:
        """Lease the lowest free address of each family to ``owner``.

        Returns the existing lease if ``owner`` already has one. Raises PoolExhausted,
        allocating nothing, if some family has no free address.
        """
        existing = self._leases.get(owner)
        if existing is not None:
            return existing
        chosen: list[_Range] = []
        for version, ranges in self._families.items():
            for r in ranges:
                if r.has_free():
                    chosen.append(r)
                    break
            else:
                raise PoolExhausted(f"no free IPv{version} address in the pool")
        held = [(r, r.take_lowest()) for r in chosen]
        addresses = tuple(_host_interface(r.network, value) for r, value in held)
        lease = Lease(owner=owner, addresses=addresses)
        self._leases[owner] = lease
        self._held[owner] = held
        for iface in addresses:
            self._owners[iface.ip] = owner
        return lease

    def release(self, owner: str) -> None:
        """Give ``owner``'s addresses back (no-op if it holds none)."""
        lease = self._leases.pop(owner, None)
        if lease is None:
            return
        for iface in lease.addresses:
            del self._owners[iface.ip]
        for r, value in self._held.pop(owner):
            r.give_back(value)

    def owner_of(self, addr: IPAddress | IPInterface) -> str | None:
        """Who holds ``addr``, if anyone."""
        if isinstance(addr, IPv4Interface | IPv6Interface):
            addr = addr.ip
        return self._owners.get(addr)

    def lease_of(self, owner: str) -> Lease | None:
        return self._leases.get(owner)

    def leases(self) -> tuple[Lease, ...]:
        return tuple(self._leases.values())

    def used(self) -> int:
        """Number of leases held."""
        return len(self._leases)

    def capacity(self) -> int:
        """How many clients the pool can hold at once (smallest family decides)."""
        return min(sum(r.size for r in ranges) for ranges in self._families.values())


def _host_interface(network: IPNetwork, value: int) -> IPInterface:
    if isinstance(network, IPv4Network):
        return IPv4Interface((value, 32))
    return IPv6Interface((value, 128))
