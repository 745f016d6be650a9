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
from collections.abc import Mapping, Sequence
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
    """The client addresses of one network: ``first`` .. ``last`` as integers.

    Dynamic allocation hands out the lowest free address that is not reserved.
    Addresses may also be taken out of order (``take``: a client's previous address or
    its fixed one). ``held`` holds every leased address; the high-water mark skips
    held and reserved ones as it passes them; the heap holds released addresses below
    it (entries not in ``_free_set`` are stale and ignored).
    """

    __slots__ = ("_free", "_free_set", "_next", "first", "held", "last", "network", "reserved")

    def __init__(self, network: IPNetwork) -> None:
        self.network = network
        base = int(network.network_address)
        self.first = base + 2  # base is the network address, base + 1 the gateway
        # IPv4 loses the broadcast address; IPv6 has none (RFC 4291 §2.6.1 only
        # reserves the all-zero subnet-router anycast, which is ``base``).
        self.last = int(network.broadcast_address) - (1 if network.version == 4 else 0)
        if self.last < self.first:
            raise ValueError(f"pool too small: {network} has no client addresses")
        self._next = self.first  # every address below was handed out, held or reserved
        self._free: list[int] = []  # min-heap of released addresses below _next
        self._free_set: set[int] = set()  # the valid entries of _free
        self.held: set[int] = set()
        self.reserved: frozenset[int] = frozenset()

    @property
    def size(self) -> int:
        return self.last - self.first + 1

    def contains(self, value: int) -> bool:
        return self.first <= value <= self.last

    def _skip(self) -> None:
        while self._next <= self.last and (self._next in self.held or self._next in self.reserved):
            self._next += 1

    def has_free(self) -> bool:
        self._skip()
        return bool(self._free_set) or self._next <= self.last

    def take_lowest(self) -> int:
        while self._free:
            value = heapq.heappop(self._free)
            if value in self._free_set:
                self._free_set.discard(value)
                self.held.add(value)
                return value
        self._skip()
        if self._next > self.last:
            raise PoolExhausted(f"{self.network} is full")
        value = self._next
        self._next += 1
        self.held.add(value)
        return value

    def take(self, value: int) -> None:
        """Take a specific address that is not held (caller checked)."""
        self._free_set.discard(value)  # its heap entry, if any, becomes stale
        self.held.add(value)

    def give_back(self, value: int) -> None:
        self.held.discard(value)
        if value < self._next and value not in self.reserved:
            heapq.heappush(self._free, value)
            self._free_set.add(value)

    def set_reserved(self, values: frozenset[int]) -> None:
        for value in self.reserved - values:  # no longer reserved: free if below _next
            if value < self._next and value not in self.held:
                heapq.heappush(self._free, value)
                self._free_set.add(value)
        self._free_set -= values
        self.reserved = values


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
        self._reservations: dict[str, tuple[IPAddress, ...]] = {}
        self._reserved_for: dict[IPAddress, str] = {}

    def add_networks(self, networks: Sequence[IPNetwork]) -> None:
        """Grow the pool (reload): new networks after the existing ones. Leases held
        stay as they are. Raises ValueError for overlaps or too-small networks."""
        ranges = [_Range(net) for net in networks]
        for i, new in enumerate(ranges):
            for other in self._ranges + ranges[:i]:
                if new.network.version == other.network.version and new.network.overlaps(
                    other.network
                ):
                    raise ValueError(f"pool networks {new.network} and {other.network} overlap")
        for r in ranges:
            self._ranges.append(r)
            self._families.setdefault(r.network.version, []).append(r)
        # fixed addresses of the new networks, if any were configured already
        self.set_reservations(self._reservations)

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

    def allocate(
        self,
        owner: str,
        *,
        identity: str | None = None,
        prefer: Sequence[IPAddress] = (),
    ) -> Lease:
        """Lease one address of each family to ``owner``.

        Per family, in this order: the fixed address reserved for ``identity``; else a
        free address from ``prefer`` (the identity's previous lease); else the lowest
        free address. Returns the existing lease if ``owner`` already has one. Raises
        PoolExhausted, allocating nothing, if some family cannot be served.
        """
        existing = self._leases.get(owner)
        if existing is not None:
            return existing
        fixed = self._reservations.get(identity, ()) if identity is not None else ()
        plan: list[tuple[_Range, int | None]] = []
        for version, ranges in self._families.items():
            pick = self._pick_specific(version, fixed, identity, strict=True)
            if pick is None:
                pick = self._pick_specific(version, prefer, identity, strict=False)
            if pick is not None:
                plan.append(pick)
                continue
            for r in ranges:
                if r.has_free():
                    plan.append((r, None))
                    break
            else:
                raise PoolExhausted(f"no free IPv{version} address in the pool")
        held: list[tuple[_Range, int]] = []
        for r, value in plan:
            if value is None:
                value = r.take_lowest()
            else:
                r.take(value)
            held.append((r, value))
        addresses = tuple(_host_interface(r.network, value) for r, value in held)
        lease = Lease(owner=owner, addresses=addresses)
        self._leases[owner] = lease
        self._held[owner] = held
        for iface in addresses:
            self._owners[iface.ip] = owner
        return lease

    def _pick_specific(
        self, version: int, candidates: Sequence[IPAddress], identity: str | None, strict: bool
    ) -> tuple[_Range, int] | None:
        for addr in candidates:
            if addr.version != version:
                continue
            value = int(addr)
            r = self._range_of(addr)
            if r is None:
                continue
            if value in r.held:
                if strict:
                    raise PoolExhausted(f"fixed address {addr} of {identity} is in use")
                continue
            if value in r.reserved and self._reserved_for.get(addr) != identity:
                continue
            return r, value
        return None

    def _range_of(self, addr: IPAddress) -> _Range | None:
        for r in self._families.get(addr.version, ()):
            if r.contains(int(addr)):
                return r
        return None

    def set_reservations(self, reservations: Mapping[str, Sequence[IPAddress]]) -> None:
        """Fixed addresses per identity; they are never handed out to anyone else.

        Raises ValueError for an address outside the client range of the pool or one
        given to two identities. Leases already held are not touched.
        """
        reserved_for: dict[IPAddress, str] = {}
        per_range: dict[int, set[int]] = {id(r): set() for r in self._ranges}
        for identity, addrs in reservations.items():
            for addr in addrs:
                r = self._range_of(addr)
                if r is None:
                    raise ValueError(
                        f"fixed address {addr} of {identity} is not a client address of the pool"
                    )
                if addr in reserved_for:
                    raise ValueError(
                        f"fixed address {addr} given to both {reserved_for[addr]} and {identity}"
                    )
                reserved_for[addr] = identity
                per_range[id(r)].add(int(addr))
        for r in self._ranges:
            r.set_reserved(frozenset(per_range[id(r)]))
        self._reservations = {k: tuple(v) for k, v in reservations.items()}
        self._reserved_for = reserved_for

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


# Relay worker processes one instance may run (the steering program's modulus is a
# byte of the connection ID).
MAX_WORKERS = 64


def pool_slice(networks: Sequence[IPNetwork], index: int, count: int) -> tuple[IPNetwork, ...]:
    """Worker ``index``'s share of the pool when ``count`` relay workers split it.

    Every network is cut into the smallest power of two of equal subnets that is at
    least ``count``; worker k gets subnets k, k + count, ... of each, so the shares
    are disjoint, cover the pool, and each network gives every worker at least one
    subnet (its own gateway on the worker's TUN). Raises ValueError when a subnet
    would have no client address.
    """
    if not 0 <= index < count:
        raise ValueError(f"worker {index} of {count}")
    if count == 1:
        return tuple(networks)
    bits = (count - 1).bit_length()
    out: list[IPNetwork] = []
    for net in networks:
        if net.prefixlen + bits > net.max_prefixlen:
            raise ValueError(f"pool network {net} cannot be split among {count} workers")
        subnets: list[IPNetwork] = list(net.subnets(prefixlen_diff=bits))  # type: ignore[arg-type]
        for sub in subnets[index::count]:
            _Range(sub)  # raises ValueError("pool too small ...") if it is
            out.append(sub)
    return tuple(out)
