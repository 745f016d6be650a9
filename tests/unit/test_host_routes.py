"""Router against FakeNetlink: dumps for given states, random walks, cleanup."""

from __future__ import annotations

import errno
import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from masqued.host.cleanup import cleanup_instance
from masqued.host.naming import ROUTE_PROTO, RULE_PRIORITY_TABLE, InstanceIds
from masqued.host.netstate import PROTO_KERNEL
from masqued.host.routes import (
    FakeNetlink,
    NetState,
    Route,
    Router,
    Rule,
    cleanup,
    client_state,
    default_interface,
    enable_forwarding,
    forwarding_status,
    full_tunnel_rules,
    route_get,
)

IDS = InstanceIds("t1")
TUN = IDS.tun
T = IDS.table
M = IDS.fwmark
net = ipaddress.ip_network
ifc = ipaddress.ip_interface


def foreign_fake() -> FakeNetlink:
    """A host with an operator's routes and rules, and our TUN already created."""
    nl = FakeNetlink()
    nl.add_link("lo")
    nl.add_link("eth0")
    nl.add_link(TUN)
    nl.addrs["eth0"] = {ifc("198.18.1.2/24"), ifc("2001:db8:1::2/64")}
    nl.seed_route(Route(net("198.18.1.0/24"), "eth0"), proto=2)
    nl.seed_route(Route(net("0.0.0.0/0"), "eth0", via=ipaddress.ip_address("198.18.1.1")))
    nl.seed_route(Route(net("2001:db8:1::/64"), "eth0"), proto=2, metric=256)
    nl.seed_route(Route(net("::/0"), "eth0", via=ipaddress.ip_address("2001:db8:1::1")))
    nl.seed_route(Route(net("198.19.0.0/16"), "eth0", table=100))
    # the kernel's own link-local route on our TUN: not ours, gone with the link
    nl.seed_route(Route(net("fe80::/64"), TUN), proto=2, metric=256)
    nl.addrs[TUN] = {ifc("fe80::1234/64")}
    nl.seed_rule(Rule(4, 0, 255))
    nl.seed_rule(Rule(4, 32766, 254))
    nl.seed_rule(Rule(6, 32766, 254))
    nl.seed_rule(Rule(4, 1000, 100, fwmark=0x1))
    # same table number as an operator might use elsewhere, different fwmark: foreign
    nl.seed_rule(Rule(6, 1001, 100, fwmark=0x2, invert=True))
    return nl


def foreign_view(nl: FakeNetlink) -> str:
    """Dump of everything that is not ours (what must never change)."""
    owned_route = [
        f"route -{r.family} {r} proto {p}"
        for r, p in nl.routes()
        if (p == ROUTE_PROTO and (r.dev == TUN or r.table == T))
        or (p == PROTO_KERNEL and r.dev == TUN)  # the prefix routes of our addresses
    ]
    owned = set(owned_route)
    owned |= {
        f"rule -{r.family} {r.priority}: {r}" for r in nl.rules() if r.table == T or r.fwmark == M
    }
    owned |= {
        f"addr -{a.version} {a.with_prefixlen} dev {TUN}"
        for a in nl.addresses(TUN)
        if not (a.version == 6 and a.ip.is_link_local)
    }
    return "\n".join(line for line in nl.dump().splitlines() if line not in owned)


CLIENT = NetState(
    addresses=frozenset({ifc("198.18.200.7/32"), ifc("2001:db8:200::7/128")}),
    routes=frozenset(
        {
            Route(net("198.19.0.0/24"), TUN),
            Route(net("2001:db8:300::/48"), TUN),
        }
    ),
    prefix_routes=False,
)

FULL = NetState(
    addresses=CLIENT.addresses,
    routes=frozenset({Route(net("0.0.0.0/0"), TUN, T), Route(net("::/0"), TUN, T)}),
    rules=full_tunnel_rules(IDS),
    prefix_routes=False,
)


def test_dump_specific_routes() -> None:
    nl = foreign_fake()
    reached = Router(nl, IDS).set(CLIENT)
    assert reached == CLIENT
    ours = [line for line in nl.dump().splitlines() if TUN in line and "fe80" not in line]
    assert ours == [
        "addr -4 198.18.200.7/32 dev mq-t1",
        "addr -6 2001:db8:200::7/128 dev mq-t1",
        "link mq-t1",
        "route -4 198.19.0.0/24 dev mq-t1 table main proto 109",
        "route -6 2001:db8:300::/48 dev mq-t1 table main proto 109",
    ]


def test_dump_full_tunnel() -> None:
    nl = foreign_fake()
    assert Router(nl, IDS).set(FULL) == FULL
    mark = f"{M:#x}"
    ours = sorted(line for line in nl.dump().splitlines() if (f"table {T}" in line or mark in line))
    assert ours == [
        f"route -4 0.0.0.0/0 dev mq-t1 table {T} proto 109",
        f"route -6 ::/0 dev mq-t1 table {T} proto 109",
        f"rule -4 5209: not from all fwmark {mark} lookup main suppress_prefixlength 0",
        f"rule -4 5210: not from all fwmark {mark} lookup {T}",
        f"rule -6 5209: not from all fwmark {mark} lookup main suppress_prefixlength 0",
        f"rule -6 5210: not from all fwmark {mark} lookup {T}",
    ]


V4_ONLY = frozenset({ifc("198.18.200.7/32")})
BOTH = CLIENT.addresses


@pytest.mark.parametrize(
    ("routes", "addresses", "fwmark", "expected"),
    [
        # specific routes, marked: our table, one rule per family
        (
            ["198.19.0.0/24", "2001:db8:300::/48"],
            BOTH,
            M,
            [
                f"route -4 198.19.0.0/24 dev mq-t1 table {T} proto 109",
                f"route -6 2001:db8:300::/48 dev mq-t1 table {T} proto 109",
                f"rule -4 5210: not from all fwmark {M:#x} lookup {T}",
                f"rule -6 5210: not from all fwmark {M:#x} lookup {T}",
            ],
        ),
        # a v4-only tunnel: the v6 route and its rule are left out
        (
            ["198.19.0.0/24", "2001:db8:300::/48"],
            V4_ONLY,
            M,
            [
                f"route -4 198.19.0.0/24 dev mq-t1 table {T} proto 109",
                f"rule -4 5210: not from all fwmark {M:#x} lookup {T}",
            ],
        ),
        # a default route in one family: wg-quick's suppress rule there only
        (
            ["0.0.0.0/0", "2001:db8:300::/48"],
            BOTH,
            M,
            [
                f"route -4 0.0.0.0/0 dev mq-t1 table {T} proto 109",
                f"route -6 2001:db8:300::/48 dev mq-t1 table {T} proto 109",
                f"rule -4 5209: not from all fwmark {M:#x} lookup main suppress_prefixlength 0",
                f"rule -4 5210: not from all fwmark {M:#x} lookup {T}",
                f"rule -6 5210: not from all fwmark {M:#x} lookup {T}",
            ],
        ),
        # fwmark off: the main table, no rules
        (["198.19.0.0/24"], BOTH, 0, ["route -4 198.19.0.0/24 dev mq-t1 table main proto 109"]),
    ],
)
def test_the_clients_desired_state(
    routes: list[str],
    addresses: frozenset[ifc],
    fwmark: int,
    expected: list[str],  # type: ignore[valid-type]
) -> None:
    nl = foreign_fake()
    state = client_state(IDS, [net(r) for r in routes], addresses, fwmark)
    assert Router(nl, IDS).set(state) == state
    ours = sorted(
        line
        for line in nl.dump().splitlines()
        if ("proto 109" in line or f"{M:#x}" in line) and not line.startswith("addr")
    )
    assert ours == sorted(expected)
    assert {line for line in nl.dump().splitlines() if line.startswith("addr -")} >= {
        f"addr -{a.version} {a.with_prefixlen} dev mq-t1" for a in addresses
    }


def test_idempotent_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    nl = foreign_fake()
    router = Router(nl, IDS)
    with caplog.at_level(logging.INFO, logger="masqued.host"):
        router.set(FULL)
    first = [r.getMessage() for r in caplog.records]
    assert len(first) == 2 + 2 + 4  # one line per change
    assert all(m.startswith("[#] ip -") for m in first)
    assert f"[#] ip -4 route add 0.0.0.0/0 dev mq-t1 table {T} proto 109" in first
    before = nl.dump()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="masqued.host"):
        assert router.set(FULL) == FULL
    assert caplog.records == []
    assert nl.dump() == before


def test_transition_adds_before_deleting() -> None:
    """At the first delete, everything desired is already in place."""

    @dataclass
    class Watch(FakeNetlink):
        at_first_delete: NetState | None = None

        def _seen(self) -> None:
            if self.at_first_delete is None:
                self.at_first_delete = Router(self, IDS).current()

        def route_del(self, route: Route, proto: int = ROUTE_PROTO) -> None:
            self._seen()
            super().route_del(route, proto)

        def rule_del(self, rule: Rule) -> None:
            self._seen()
            super().rule_del(rule)

        def address_del(
            self, ifname: str, addr: ipaddress.IPv4Interface | ipaddress.IPv6Interface
        ) -> None:
            self._seen()
            super().address_del(ifname, addr)

    nl = Watch(**vars(foreign_fake()))
    router = Router(nl, IDS)
    router.set(CLIENT)
    nl.at_first_delete = None
    new = NetState(
        addresses=frozenset({ifc("198.18.200.8/32")}),
        routes=FULL.routes,
        rules=FULL.rules,
    )
    assert router.set(new) == new
    seen = nl.at_first_delete
    assert seen is not None
    assert new.addresses <= seen.addresses
    assert new.routes <= seen.routes
    assert new.rules <= seen.rules


def test_ipv6_prefix_change_replaces_address() -> None:
    nl = foreign_fake()
    router = Router(nl, IDS)
    a = NetState(addresses=frozenset({ifc("2001:db8:200::1/128")}))
    b = NetState(addresses=frozenset({ifc("2001:db8:200::1/64")}))
    assert router.set(a) == a
    assert router.set(b) == b


def test_foreign_objects_rejected() -> None:
    router = Router(foreign_fake(), IDS)
    with pytest.raises(ValueError, match="cleanup"):
        router.set(NetState(routes=frozenset({Route(net("198.19.0.0/16"), "eth0")})))
    with pytest.raises(ValueError, match="fwmark"):
        router.set(NetState(rules=frozenset({Rule(4, 100, 254)})))


def test_errors_are_reported_in_reached_state() -> None:
    nl = foreign_fake()
    # 198.18.1.0/24 in main collides with the kernel's route on eth0 (EEXIST)
    want = NetState(routes=frozenset({Route(net("198.18.1.0/24"), TUN)}))
    reached = Router(nl, IDS).set(want)
    assert reached.routes == frozenset()


def test_missing_tun_is_not_fatal() -> None:
    nl = FakeNetlink()
    reached = Router(nl, IDS).set(CLIENT)
    assert reached == NetState()


def test_cleanup_when_nothing_exists() -> None:
    nl = FakeNetlink()
    assert cleanup(nl, IDS) == []
    assert cleanup_instance(IDS, nl, nat_cleanup=lambda ids: []) == []


def test_cleanup_removes_ours_and_table_contents() -> None:
    nl = foreign_fake()
    Router(nl, IDS).set(FULL)
    # A route someone else put in our table is removed too (the table is ours).
    nl.seed_route(Route(net("198.19.9.0/24"), "eth0", table=T), proto=3)
    before = foreign_view(nl)
    done = cleanup_instance(IDS, nl, nat_cleanup=lambda ids: ["nat gone"])
    assert done[0] == "nat gone"
    assert f"ip link delete dev {TUN}" in done
    assert not nl.link_exists(TUN)
    expected = "\n".join(
        line for line in before.splitlines() if TUN not in line and f"table {T}" not in line
    )
    assert nl.dump() == expected
    assert cleanup(nl, IDS) == []


def test_other_instance_untouched() -> None:
    nl = foreign_fake()
    other = InstanceIds("other")
    nl.add_link(other.tun)
    Router(nl, other).set(
        NetState(
            addresses=frozenset({ifc("198.18.210.1/24")}),
            routes=frozenset({Route(net("0.0.0.0/0"), other.tun, other.table)}),
            rules=full_tunnel_rules(other),
        )
    )
    Router(nl, IDS).set(FULL)
    theirs = Router(nl, other).current()
    cleanup(nl, IDS)
    assert Router(nl, other).current() == theirs
    Router(nl, IDS).set(NetState())
    assert Router(nl, other).current() == theirs


def test_lookups_on_fake() -> None:
    nl = foreign_fake()
    assert default_interface(4, nl) == "eth0"
    assert default_interface(6, nl) == "eth0"
    assert route_get(ipaddress.ip_address("198.18.1.9"), nl) == ("eth0", None)
    assert route_get(ipaddress.ip_address("203.0.113.1"), nl) == (
        "eth0",
        ipaddress.ip_address("198.18.1.1"),
    )
    empty = FakeNetlink()
    assert default_interface(4, empty) is None
    with pytest.raises(OSError) as e:
        route_get(ipaddress.ip_address("198.18.1.9"), empty)
    assert e.value.errno == errno.ENETUNREACH


def test_forwarding(tmp_path: Path) -> None:
    for name in ("mq-t1", "eth0"):
        d = tmp_path / "net/ipv4/conf" / name
        d.mkdir(parents=True)
        (d / "forwarding").write_text("0\n")
    (tmp_path / "net/ipv4/conf/eth0/forwarding").write_text("1\n")
    d6 = tmp_path / "net/ipv6/conf/all"
    d6.mkdir(parents=True)
    (d6 / "forwarding").write_text("0\n")
    status = forwarding_status(["mq-t1", "eth0"], root=tmp_path)
    assert status == {
        "net.ipv4.conf.mq-t1.forwarding": False,
        "net.ipv4.conf.eth0.forwarding": True,
        "net.ipv6.conf.all.forwarding": False,
    }
    changed = enable_forwarding(["mq-t1", "eth0"], v4=True, v6=True, root=tmp_path)
    assert changed == ["net.ipv4.conf.mq-t1.forwarding=1", "net.ipv6.conf.all.forwarding=1"]
    assert all(forwarding_status(["mq-t1", "eth0"], root=tmp_path).values())
    assert enable_forwarding(["mq-t1", "eth0"], v4=True, v6=True, root=tmp_path) == []
    assert enable_forwarding(["mq-t1"], v4=False, v6=False, root=tmp_path) == []


# ----------------------------------------------------------------- random state walks

ADDRS = [
    ifc("198.18.200.1/32"),
    ifc("198.18.200.1/24"),
    ifc("198.18.201.1/24"),
    ifc("2001:db8:200::1/128"),
    ifc("2001:db8:200::1/64"),
    ifc("2001:db8:201::1/64"),
]
ROUTE_CHOICES = {
    (net("198.19.0.0/24"), 254): [Route(net("198.19.0.0/24"), TUN)],
    (net("198.18.0.0/15"), 254): [Route(net("198.18.0.0/15"), TUN)],
    (net("2001:db8:300::/48"), 254): [Route(net("2001:db8:300::/48"), TUN)],
    (net("0.0.0.0/0"), T): [Route(net("0.0.0.0/0"), TUN, T)],
    (net("::/0"), T): [Route(net("::/0"), TUN, T)],
    (net("198.19.5.5/32"), T): [
        Route(net("198.19.5.5/32"), "eth0", T, ipaddress.ip_address("198.18.1.1")),
        Route(net("198.19.5.5/32"), TUN, T),
    ],
}
RULES = sorted(
    full_tunnel_rules(IDS) | {Rule(4, RULE_PRIORITY_TABLE + 1, T), Rule(6, 5300, 254, fwmark=M)},
    key=str,
)


@st.composite
def states(draw: st.DrawFn) -> NetState:
    addrs = draw(st.sets(st.sampled_from(ADDRS)))
    # the kernel keeps one IPv6 address per address, whatever the prefix
    by_ip: dict[object, ipaddress.IPv4Interface | ipaddress.IPv6Interface] = {}
    for a in sorted(addrs, key=str):
        by_ip.setdefault(a.ip if a.version == 6 else a, a)
    routes = set()
    for options in ROUTE_CHOICES.values():
        pick = draw(st.integers(-1, len(options) - 1))
        if pick >= 0:
            routes.add(options[pick])
    rules = draw(st.sets(st.sampled_from(RULES)))
    return NetState(frozenset(by_ip.values()), frozenset(routes), frozenset(rules))


@settings(max_examples=150, deadline=None)
@given(st.lists(states(), min_size=1, max_size=6))
def test_random_walk(walk: list[NetState]) -> None:
    nl = foreign_fake()
    foreign = foreign_view(nl)
    router = Router(nl, IDS)
    for desired in walk:
        assert router.set(desired) == desired
        assert router.current() == desired
        assert foreign_view(nl) == foreign
        snapshot = nl.dump()
        assert router.set(desired) == desired  # idempotent
        assert nl.dump() == snapshot
    cleanup(nl, IDS)
    expected = "\n".join(line for line in foreign.splitlines() if TUN not in line)
    assert nl.dump() == expected


@pytest.mark.parametrize("name", ["relay", "relay-east1", "a-rather-long-instance-name"])
def test_worker_tuns_are_short_distinct_and_found_again_by_cleanup(name: str) -> None:
    ids = InstanceIds(name)
    tuns = [ids.worker_tun(k) for k in range(64)]
    assert tuns[0] == ids.tun and len(set(tuns)) == 64
    assert all(len(t) <= 15 for t in tuns)
    assert all(ids.is_worker_tun(t) for t in tuns[1:]) and not ids.is_worker_tun(ids.tun)
    assert InstanceIds(name, worker=3).tun == tuns[3]
    # Another instance's TUNs are not ours, however alike the names.
    other = InstanceIds(name[:-1] + "2")
    assert not any(ids.is_worker_tun(other.worker_tun(k)) for k in range(64))
    nl = FakeNetlink()
    nl.add_link("eth0")
    for k in (0, 1, 2):
        nl.add_link(tuns[k])
        Router(nl, InstanceIds(name, worker=k)).set(
            NetState(addresses=frozenset({ifc(f"198.18.200.{1 + 64 * k}/26")}))
        )
    nl.add_link(other.worker_tun(1))
    done = cleanup(nl, ids)
    assert {f"ip link delete dev {t}" for t in tuns[:3]} <= set(done)
    assert nl.link_names() == {"eth0", other.worker_tun(1)}


def test_client_addresses_are_host_addresses_without_a_prefix_route() -> None:
    """Issue 14: a relay that assigns 198.18.200.2/16 and 2001:db8:200::2/64 (or
    128.0.0.2/1) must not get those prefixes routed into the TUN: the client adds
    /32 and /128 host addresses with no prefix route, and routes only what it was
    configured to."""
    nl = FakeNetlink()
    nl.add_link(TUN)
    nl.add_link("eth0")
    nl.seed_route(Route(net("0.0.0.0/0"), "eth0"))
    nl.seed_rule(Rule(4, 32766, 254))  # the kernel's "from all lookup main"
    assigned = [ifc("198.18.200.2/16"), ifc("2001:db8:200::2/64")]
    desired = client_state(IDS, [net("198.19.0.0/24")], assigned, M)
    assert Router(nl, IDS).set(desired) == desired
    ours = sorted(line for line in nl.dump().splitlines() if TUN in line)
    assert ours == [
        "addr -4 198.18.200.2/32 dev mq-t1",
        "addr -6 2001:db8:200::2/128 dev mq-t1",
        "link mq-t1",
        f"route -4 198.19.0.0/24 dev mq-t1 table {T} proto 109",
    ]
    # Other hosts of 198.18.0.0/16 stay where the main table sends them.
    assert nl.route_get(ipaddress.ip_address("198.18.5.5"), mark=0)[0] == "eth0"
    # The model does add the prefix route when asked (the relay's gateways).
    Router(nl, IDS).set(NetState(addresses=frozenset({ifc("198.18.200.1/24")})))
    assert "route -4 198.18.200.0/24 dev mq-t1 table main proto 2" in nl.dump()
