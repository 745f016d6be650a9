"""Address pool, checked against a slow, obviously correct model."""

from __future__ import annotations

from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
    ip_address,
)

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from masqued.gate.ipam import AddressPool, Lease, PoolExhausted

Net = IPv4Network | IPv6Network
Iface = IPv4Interface | IPv6Interface

V4 = IPv4Network("198.18.200.0/24")
V6 = IPv6Network("2001:db8:200::/64")


def test_gateways_and_first_lease() -> None:
    pool = AddressPool([V4, V6])
    assert pool.gateways() == (
        IPv4Interface("198.18.200.1/24"),
        IPv6Interface("2001:db8:200::1/64"),
    )
    lease = pool.allocate("alice")
    assert lease == Lease(
        "alice", (IPv4Interface("198.18.200.2/32"), IPv6Interface("2001:db8:200::2/128"))
    )
    assert pool.allocate("alice") is lease
    assert pool.allocate("bob").addresses[0] == IPv4Interface("198.18.200.3/32")
    assert pool.used() == 2
    assert pool.owner_of(IPv4Address("198.18.200.3")) == "bob"
    assert pool.owner_of(IPv6Interface("2001:db8:200::2/128")) == "alice"
    assert pool.owner_of(IPv4Address("198.18.200.1")) is None
    assert pool.lease_of("alice") is lease and pool.lease_of("carol") is None


def test_capacity() -> None:
    assert AddressPool([V4]).capacity() == 253  # .0 network, .1 relay, .255 broadcast
    assert AddressPool([V6]).capacity() == 2**64 - 2  # ::0 anycast, ::1 relay
    assert AddressPool([V4, V6]).capacity() == 253
    assert AddressPool([V4, IPv4Network("10.0.0.0/30")]).capacity() == 254
    assert AddressPool([IPv6Network("2001:db8::/126")]).capacity() == 2


def test_v4_30_has_one_client() -> None:
    pool = AddressPool([IPv4Network("10.0.0.0/30")])
    assert pool.allocate("a").addresses == (IPv4Interface("10.0.0.2/32"),)
    with pytest.raises(PoolExhausted):
        pool.allocate("b")
    pool.release("a")
    assert pool.allocate("b").addresses == (IPv4Interface("10.0.0.2/32"),)


@pytest.mark.parametrize(
    "net",
    [
        IPv4Network("10.0.0.0/31"),
        IPv4Network("10.0.0.1/32"),
        IPv6Network("::/127"),
        IPv6Network("::1/128"),
    ],
)
def test_too_small(net: Net) -> None:
    with pytest.raises(ValueError, match="pool too small"):
        AddressPool([V4, net])


def test_invalid_pools() -> None:
    with pytest.raises(ValueError):
        AddressPool([])
    with pytest.raises(ValueError, match="overlap"):
        AddressPool([V4, IPv4Network("198.18.200.128/25")])
    with pytest.raises(ValueError, match="overlap"):
        AddressPool([V6, IPv6Network("2001:db8::/32")])
    AddressPool([IPv4Network("10.0.0.0/24"), IPv4Network("10.0.1.0/24"), V6])


def test_exhaustion_allocates_nothing() -> None:
    pool = AddressPool([IPv4Network("10.0.0.0/29"), IPv6Network("2001:db8::/126")])
    pool.allocate("a")
    pool.allocate("b")  # IPv6 /126 holds two clients; IPv4 /29 five
    with pytest.raises(PoolExhausted):
        pool.allocate("c")
    assert pool.used() == 2 and pool.lease_of("c") is None
    assert pool.owner_of(IPv4Address("10.0.0.4")) is None
    pool.release("a")
    assert pool.allocate("c").addresses == (
        IPv4Interface("10.0.0.2/32"),
        IPv6Interface("2001:db8::2/128"),
    )


def test_lowest_free_reused_and_release_idempotent() -> None:
    pool = AddressPool([V4])
    for name in "abcde":
        pool.allocate(name)
    pool.release("d")
    pool.release("b")
    pool.release("b")
    pool.release("nobody")
    assert pool.allocate("x").addresses[0].ip == IPv4Address("198.18.200.3")
    assert pool.allocate("y").addresses[0].ip == IPv4Address("198.18.200.5")
    assert pool.allocate("z").addresses[0].ip == IPv4Address("198.18.200.7")


def test_networks_in_configured_order() -> None:
    # The second network is numerically lower, but configured order wins.
    pool = AddressPool([IPv4Network("10.0.1.0/30"), IPv4Network("10.0.0.0/30")])
    assert pool.allocate("a").addresses[0].ip == IPv4Address("10.0.1.2")
    assert pool.allocate("b").addresses[0].ip == IPv4Address("10.0.0.2")
    assert pool.capacity() == 2


def test_a_large_v6_pool_holds_state_only_for_its_leases() -> None:
    """A /64 (and a /8) are never materialised: what the pool keeps grows with the
    leases and releases, not with the networks (O(log n) per allocation)."""
    pool = AddressPool([IPv4Network("10.0.0.0/8"), V6])
    for i in range(5000):
        pool.allocate(f"c{i}")
    for i in range(0, 5000, 2):
        pool.release(f"c{i}")
    for i in range(5000, 7500):
        pool.allocate(f"c{i}")
    assert pool.used() == 5000
    assert pool.lease_of("c7499") is not None
    assert pool.capacity() == 2**24 - 3
    for r in pool._ranges:  # the per-network state
        assert len(r.held) <= 5000 and len(r._free) <= 2500 and len(r._free_set) <= 2500
        assert r._next - r.first <= 5000  # the high-water mark moved past leases only


# --- model-based test ----------------------------------------------------------------------


class Model:
    """Scan every network from the bottom for the first unused client address."""

    def __init__(self, networks: list[Net]) -> None:
        self.networks = networks
        self.leases: dict[str, tuple[Iface, ...]] = {}

    def used(self) -> set[IPv4Address | IPv6Address]:
        return {i.ip for lease in self.leases.values() for i in lease}

    def client_hosts(self, net: Net) -> list[IPv4Address | IPv6Address]:
        gateway = net.network_address + 1
        hosts = [a for a in net if a not in (net.network_address, gateway)]
        if net.version == 4:
            hosts.remove(net.broadcast_address)
        return hosts

    def allocate(self, owner: str) -> tuple[Iface, ...] | None:
        if owner in self.leases:
            return self.leases[owner]
        used = self.used()
        out: list[Iface] = []
        for version in dict.fromkeys(n.version for n in self.networks):
            free = [
                a
                for n in self.networks
                if n.version == version
                for a in self.client_hosts(n)
                if a not in used
            ]
            if not free:
                return None
            out.append(IPv4Interface(free[0]) if version == 4 else IPv6Interface(free[0]))
        self.leases[owner] = tuple(out)
        return self.leases[owner]

    def capacity(self) -> int:
        per_family: dict[int, int] = {}
        for n in self.networks:
            per_family[n.version] = per_family.get(n.version, 0) + len(self.client_hosts(n))
        return min(per_family.values())


POOLS: list[list[Net]] = [
    [IPv4Network("10.0.0.0/29")],
    [IPv4Network("10.0.0.0/30"), IPv4Network("10.0.0.8/29")],
    [IPv6Network("2001:db8::/125")],
    [IPv4Network("10.0.0.0/29"), IPv6Network("2001:db8::/126")],
    [IPv6Network("2001:db8::/125"), IPv4Network("10.9.0.0/28"), IPv6Network("2001:db8:1::/126")],
    [IPv4Network("10.0.1.0/30"), IPv4Network("10.0.0.0/30"), IPv6Network("fd00::/124")],
]
OWNERS = st.sampled_from([f"o{i}" for i in range(20)])


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pool: AddressPool | None = None
        self.model: Model | None = None

    @precondition(lambda self: self.pool is None)
    @rule(networks=st.sampled_from(POOLS))
    def create(self, networks: list[Net]) -> None:
        self.pool = AddressPool(networks)
        self.model = Model(networks)
        assert self.pool.capacity() == self.model.capacity()

    @precondition(lambda self: self.pool is not None)
    @rule(owner=OWNERS)
    def allocate(self, owner: str) -> None:
        assert self.pool is not None and self.model is not None
        expected = self.model.allocate(owner)
        if expected is None:
            with pytest.raises(PoolExhausted):
                self.pool.allocate(owner)
        else:
            assert self.pool.allocate(owner) == Lease(owner, expected)

    @precondition(lambda self: self.pool is not None)
    @rule(owner=OWNERS)
    def release(self, owner: str) -> None:
        assert self.pool is not None and self.model is not None
        self.pool.release(owner)
        self.model.leases.pop(owner, None)

    @invariant()
    def agrees(self) -> None:
        if self.pool is None or self.model is None:
            return
        assert self.pool.used() == len(self.model.leases)
        for owner, addresses in self.model.leases.items():
            lease = self.pool.lease_of(owner)
            assert lease is not None and lease.addresses == addresses
            for iface in addresses:
                assert self.pool.owner_of(iface.ip) == owner
        for net in self.model.networks:
            for addr in net:
                if addr not in self.model.used():
                    assert self.pool.owner_of(ip_address(addr)) is None


PoolMachine.TestCase.settings = settings(deadline=None, max_examples=150, stateful_step_count=40)
TestPool = PoolMachine.TestCase


def test_ipv6_interface_typing() -> None:
    lease = AddressPool([V6]).allocate("a")
    assert isinstance(lease.addresses[0], IPv6Interface)
    assert lease.addresses[0].network.prefixlen == 128
    assert isinstance(lease.addresses[0].ip, IPv6Address)


@pytest.mark.parametrize("count", [1, 2, 3, 4, 6, 8])
def test_pool_slices_are_disjoint_cover_the_pool_and_serve_every_family(count: int) -> None:
    from masqued.gate.ipam import pool_slice

    pool = [V4, V6, IPv4Network("198.19.128.0/22")]
    slices = [pool_slice(pool, k, count) for k in range(count)]
    every = [n for s in slices for n in s]
    for i, a in enumerate(every):
        for b in every[i + 1 :]:
            assert a.version != b.version or not a.overlaps(b)
    for net in pool:
        covered = sum(
            n.num_addresses for n in every if n.version == net.version and n.subnet_of(net)
        )  # type: ignore[arg-type]
        assert covered == net.num_addresses
    for k, share in enumerate(slices):
        # Each worker has a share of each pool network, so every family it serves.
        for net in pool:
            assert any(n.version == net.version and n.subnet_of(net) for n in share)  # type: ignore[arg-type]
        # ... and addresses to give out of each.
        allocated = AddressPool(share).allocate(f"c{k}")
        assert {a.version for a in allocated.addresses} == {4, 6}


def test_pool_slices_refuse_what_cannot_be_split() -> None:
    from masqued.gate.ipam import pool_slice

    with pytest.raises(ValueError, match=r"no client addresses|cannot be split"):
        pool_slice([IPv4Network("198.18.200.0/29")], 0, 4)  # /31 shares
    with pytest.raises(ValueError):
        pool_slice([V4], 2, 2)
    assert pool_slice([V4], 1, 2) == (IPv4Network("198.18.200.128/25"),)
