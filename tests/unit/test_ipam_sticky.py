"""Fixed (reserved) and preferred addresses in the pool, against a scanning model."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from masqued.gate.ipam import AddressPool, PoolExhausted

NETS = [
    ip_network("198.18.200.0/29"),
    ip_network("198.18.201.0/30"),
    ip_network("2001:db8:200::/125"),
]
# client addresses: .2-.6 and 201.2 (IPv4), ::2-::7 (IPv6)
V4 = [ip_address(f"198.18.200.{i}") for i in range(2, 7)] + [ip_address("198.18.201.2")]
V6 = [ip_address(f"2001:db8:200::{i}") for i in range(2, 8)]
ALL = V4 + V6
IDS = ["alice", "bob", "carol", "dave"]


def test_fixed_address_is_kept_for_its_owner() -> None:
    pool = AddressPool(NETS)
    pool.set_reservations({"alice": [ip_address("198.18.200.2")]})
    a = pool.allocate("s1")  # someone else: must skip .2
    assert str(a.addresses[0].ip) == "198.18.200.3"
    b = pool.allocate("s2", identity="alice")
    assert str(b.addresses[0].ip) == "198.18.200.2"
    with pytest.raises(PoolExhausted):
        pool.allocate("s3", identity="alice")  # alice's fixed address is in use


def test_preferred_address_is_reused_when_free() -> None:
    pool = AddressPool(NETS)
    pool.allocate("x")
    lease = pool.allocate("y", prefer=[ip_address("198.18.200.5"), ip_address("2001:db8:200::6")])
    assert [str(a.ip) for a in lease.addresses] == ["198.18.200.5", "2001:db8:200::6"]
    # .5 is held now: a preference for it falls back to the lowest free
    lease = pool.allocate("z", prefer=[ip_address("198.18.200.5")])
    assert str(lease.addresses[0].ip) == "198.18.200.3"


def test_reservation_outside_pool_is_refused() -> None:
    pool = AddressPool(NETS)
    with pytest.raises(ValueError):
        pool.set_reservations({"alice": [ip_address("198.18.200.1")]})  # the gateway
    with pytest.raises(ValueError):
        pool.set_reservations(
            {"a": [ip_address("198.18.200.2")], "b": [ip_address("198.18.200.2")]}
        )


class Model:
    def __init__(self) -> None:
        self.held: dict[str, dict[int, IPv4Address | IPv6Address]] = {}
        self.reserved: dict[IPv4Address | IPv6Address, str] = {}

    def busy(self) -> set[IPv4Address | IPv6Address]:
        return {a for lease in self.held.values() for a in lease.values()}

    def allocate(
        self, owner: str, identity: str | None, prefer: list[IPv4Address | IPv6Address]
    ) -> dict[int, IPv4Address | IPv6Address] | None:
        if owner in self.held:
            return self.held[owner]
        busy = self.busy()
        out: dict[int, IPv4Address | IPv6Address] = {}
        for version, addrs in ((4, V4), (6, V6)):
            fixed = [
                a for a, who in self.reserved.items() if who == identity and a.version == version
            ]
            if fixed:
                if fixed[0] in busy:
                    return None
                out[version] = fixed[0]
                continue
            pref = [
                a
                for a in prefer
                if a.version == version
                and a in addrs
                and a not in busy
                and self.reserved.get(a, identity) == identity
            ]
            if pref:
                out[version] = pref[0]
                continue
            free = [a for a in addrs if a not in busy and a not in self.reserved]
            if not free:
                return None
            out[version] = free[0]
        self.held[owner] = out
        return out


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pool = AddressPool(NETS)
        self.model = Model()
        self.n = 0

    @rule(
        identity=st.none() | st.sampled_from(IDS), prefer=st.lists(st.sampled_from(ALL), max_size=3)
    )
    def allocate(self, identity: str | None, prefer: list[IPv4Address | IPv6Address]) -> None:
        self.n += 1
        owner = f"s{self.n}"
        expected = self.model.allocate(owner, identity, prefer)
        try:
            lease = self.pool.allocate(owner, identity=identity, prefer=prefer)
        except PoolExhausted:
            assert expected is None
            return
        assert expected is not None
        assert {a.ip.version: a.ip for a in lease.addresses} == expected

    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        if not self.model.held:
            return
        owner = data.draw(st.sampled_from(sorted(self.model.held)))
        del self.model.held[owner]
        self.pool.release(owner)

    @rule(assign=st.dictionaries(st.sampled_from(ALL), st.sampled_from(IDS), max_size=4))
    def reserve(self, assign: dict[IPv4Address | IPv6Address, str]) -> None:
        per_id: dict[str, list[IPv4Address | IPv6Address]] = {}
        for addr, who in sorted(assign.items(), key=lambda kv: (kv[0].version, int(kv[0]))):
            # at most one fixed address per family and identity
            if any(a.version == addr.version for a in per_id.get(who, [])):
                continue
            per_id.setdefault(who, []).append(addr)
        self.pool.set_reservations(per_id)
        self.model.reserved = {a: who for who, addrs in per_id.items() for a in addrs}

    @invariant()
    def holders_agree(self) -> None:
        for owner, lease in self.model.held.items():
            got = self.pool.lease_of(owner)
            assert got is not None
            assert {a.ip.version: a.ip for a in got.addresses} == lease
        assert self.pool.used() == len(self.model.held)


PoolMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=30, deadline=None)
TestPoolMachine = PoolMachine.TestCase


def test_pool_grows_without_touching_leases() -> None:
    pool = AddressPool([ip_network("198.18.200.0/30")])
    a = pool.allocate("a")
    with pytest.raises(PoolExhausted):
        pool.allocate("b")
    pool.add_networks([ip_network("198.18.201.0/29"), ip_network("2001:db8:200::/126")])
    assert pool.lease_of("a") == a
    b = pool.allocate("b")
    assert [str(x.ip) for x in b.addresses] == ["198.18.201.2", "2001:db8:200::2"]
    assert [str(g) for g in pool.gateways()] == [
        "198.18.200.1/30",
        "198.18.201.1/29",
        "2001:db8:200::1/126",
    ]
    with pytest.raises(ValueError):
        pool.add_networks([ip_network("198.18.200.0/24")])  # overlaps
