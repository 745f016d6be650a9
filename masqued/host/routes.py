"""Addresses, routes and policy rules, set declaratively (tailscale router style).

``Router.set(desired)`` compares the desired state with what the kernel has *of ours*,
adds what is missing before it deletes what is extra, and returns the state it reached.
What is "ours" is found from the instance name alone (see ``naming.py``):

- addresses on our TUN (IPv6 link-local addresses are the kernel's and ignored);
- routes with protocol ``ROUTE_PROTO`` that go via our TUN or live in our table;
- rules that look up our table or carry our fwmark in their selector.

So ``cleanup()`` needs no saved state. Every change is logged once, wg-quick style,
as the ``ip`` command that would make it (``[#] ip -4 route add ...``).

The kernel is reached through the small ``Netlink`` protocol; ``RtNetlink`` (in
``rtnetlink.py``) is the real one, ``FakeNetlink`` keeps state in memory and prints it
as sorted text.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Protocol

from masqued.host.naming import (
    ROUTE_PROTO,
    RULE_PRIORITY_SUPPRESS,
    RULE_PRIORITY_TABLE,
    InstanceIds,
)
from masqued.host.netstate import (  # the values are part of this module's interface
    FIB_RULE_INVERT,  # noqa: F401
    IFA_F_NODAD,  # noqa: F401
    PROTO_KERNEL,
    RT_TABLE_LOCAL,  # noqa: F401
    RT_TABLE_MAIN,
    IPAddress,
    IPInterface,
    IPNetwork,
    NetState,
    Route,
    Rule,
)
from masqued.host.sysctl import SysctlRecord

log = logging.getLogger("masqued.host")



def tunnel_rules(
    ids: InstanceIds, family: int, fwmark: int, *, full: bool
) -> frozenset[Rule]:
    """wg-quick's loop guard for the tunnel's routes of one family.

    ``not fwmark M lookup T`` sends everything but the marked QUIC socket to our table;
    with a default route in it (``full``), ``not fwmark M lookup main
    suppress_prefixlength 0`` (checked first) keeps the main table's specific routes
    (LAN, relay host route) in force; it carries our fwmark so it is recognisably ours.
    """
    rules = {Rule(family, RULE_PRIORITY_TABLE, ids.table, fwmark=fwmark, invert=True)}
    if full:
        rules.add(
            Rule(
                family,
                RULE_PRIORITY_SUPPRESS,
                RT_TABLE_MAIN,
                fwmark=fwmark,
                invert=True,
                suppress_prefixlength=0,
            )
        )
    return frozenset(rules)


def full_tunnel_rules(ids: InstanceIds, families: Iterable[int] = (4, 6)) -> frozenset[Rule]:
    """Both of wg-quick's rules for a full tunnel in every family of ``families``."""
    return frozenset().union(*(tunnel_rules(ids, f, ids.fwmark, full=True) for f in families))


def client_state(
    ids: InstanceIds,
    routes: Iterable[IPNetwork],
    addresses: Iterable[IPInterface],
    fwmark: int,
) -> NetState:
    """What a client's host should look like once its tunnel has ``addresses``.

    Routes of a family the tunnel has no address for are left out. With a fwmark
    (the default) they live in the instance's own table, consulted for every packet
    not carrying the mark; the QUIC socket carries it, so the relay stays reachable
    whatever the routes cover. Without one they go into the main table.
    """
    # Host addresses (/32, /128) without a prefix route, whatever prefix the relay
    # named: "128.0.0.2/1" must not route half the Internet into the TUN (only the
    # configured routes go there).
    addresses = frozenset(ipaddress.ip_interface(a.ip) for a in addresses)
    families = {a.version for a in addresses}
    usable = [r for r in routes if r.version in families]
    table = ids.table if fwmark else RT_TABLE_MAIN
    rules: frozenset[Rule] = frozenset()
    if fwmark:
        for family in sorted({r.version for r in usable}):
            full = any(r.prefixlen == 0 for r in usable if r.version == family)
            rules |= tunnel_rules(ids, family, fwmark, full=full)
    return NetState(
        addresses=addresses,
        routes=frozenset(Route(dst=r, dev=ids.tun, table=table) for r in usable),
        rules=rules,
        prefix_routes=False,
    )


def _fam(version: int) -> str:
    return f"-{version}"


def addr_cmd(verb: str, addr: IPInterface, dev: str, prefix_route: bool = True) -> str:
    flags = "" if prefix_route or verb != "add" else " noprefixroute"
    return f"ip {_fam(addr.version)} address {verb} {addr.with_prefixlen} dev {dev}{flags}"


def route_cmd(verb: str, route: Route, proto: int = ROUTE_PROTO) -> str:
    return f"ip {_fam(route.family)} route {verb} {route} proto {proto}"


def rule_cmd(verb: str, rule: Rule) -> str:
    return f"ip {_fam(rule.family)} rule {verb} {rule} priority {rule.priority}"


def _change(cmd: str) -> str:
    log.info("[#] %s", cmd)
    return cmd


def _route_key(r: Route) -> tuple[int, int, int, str]:
    # Deterministic order (mixed families do not compare): broad before specific.
    return (r.family, r.dst.prefixlen, r.table, str(r))


def _rule_key(r: Rule) -> tuple[int, int, str]:
    return (r.family, r.priority, str(r))


def _is_kernel_addr(addr: IPInterface) -> bool:
    return addr.version == 6 and addr.ip.is_link_local


# --------------------------------------------------------------------------- netlink


class Netlink(Protocol):
    """Low-level netlink operations. Errors are ``OSError`` with a kernel errno."""

    def link_exists(self, ifname: str) -> bool: ...

    def link_names(self) -> set[str]:
        """Names of every link."""
        ...

    def link_delete(self, ifname: str) -> None: ...

    def addresses(self, ifname: str) -> set[IPInterface]:
        """Addresses on ``ifname`` (empty if the link does not exist)."""
        ...

    def address_add(self, ifname: str, addr: IPInterface, prefix_route: bool = True) -> None:
        """Add ``addr``; without ``prefix_route`` the kernel adds no route for its
        prefix (IFA_F_NOPREFIXROUTE)."""
        ...

    def address_del(self, ifname: str, addr: IPInterface) -> None: ...

    def routes(
        self, *, table: int | None = None, dev: str | None = None
    ) -> list[tuple[Route, int]]:
        """Unicast routes (both families) as ``(route, protocol)``, optionally filtered."""
        ...

    def route_add(self, route: Route) -> None:
        """Add ``route`` with protocol ``ROUTE_PROTO``."""
        ...

    def route_del(self, route: Route, proto: int = ROUTE_PROTO) -> None: ...

    def rules(self) -> set[Rule]:
        """All policy rules of both families."""
        ...

    def rule_add(self, rule: Rule) -> None: ...

    def rule_del(self, rule: Rule) -> None: ...

    def route_get(self, addr: IPAddress, mark: int = 0) -> tuple[str, IPAddress | None]:
        """The kernel's route decision for ``addr`` from a packet with fwmark ``mark``:
        (device, gateway or None)."""
        ...

    def default_interface(self, family: int) -> str | None:
        """The device of the default route in the main table, if any."""
        ...


@dataclass
class _FakeRoute:
    route: Route
    proto: int
    metric: int


@dataclass
class FakeNetlink:
    """In-memory kernel with the conflicts that matter (EEXIST, ESRCH, ENODEV).

    IPv6 addresses are identified by address alone (as the kernel does), IPv4 ones by
    address and prefix; deleting a link removes its addresses and routes.
    """

    links: set[str] = field(default_factory=set)
    addrs: dict[str, set[IPInterface]] = field(default_factory=dict)
    route_entries: list[_FakeRoute] = field(default_factory=list)
    rule_set: set[Rule] = field(default_factory=set)
    default_routes: dict[int, tuple[str, IPAddress | None]] = field(default_factory=dict)

    # seeding helpers for tests
    def add_link(self, ifname: str) -> None:
        self.links.add(ifname)
        self.addrs.setdefault(ifname, set())

    def seed_route(self, route: Route, proto: int = 3, metric: int | None = None) -> None:
        """Add a route as someone else would (proto 3 = boot, i.e. the operator)."""
        if route.dev and route.dev not in self.links:
            raise OSError(errno.ENODEV, route.dev)
        m = metric if metric is not None else (0 if route.family == 4 else 1024)
        self.route_entries.append(_FakeRoute(route, proto, m))
        if route.dst.prefixlen == 0 and route.table == RT_TABLE_MAIN:
            self.default_routes.setdefault(route.family, (route.dev, route.via))

    def seed_rule(self, rule: Rule) -> None:
        self.rule_set.add(rule)

    # Netlink
    def link_exists(self, ifname: str) -> bool:
        return ifname in self.links

    def link_names(self) -> set[str]:
        return set(self.links)

    def link_delete(self, ifname: str) -> None:
        if ifname not in self.links:
            raise OSError(errno.ENODEV, ifname)
        self.links.discard(ifname)
        self.addrs.pop(ifname, None)
        self.route_entries = [e for e in self.route_entries if e.route.dev != ifname]

    def addresses(self, ifname: str) -> set[IPInterface]:
        return set(self.addrs.get(ifname, set()))

    def address_add(self, ifname: str, addr: IPInterface, prefix_route: bool = True) -> None:
        if ifname not in self.links:
            raise OSError(errno.ENODEV, ifname)
        for have in self.addrs[ifname]:
            if have == addr or (addr.version == 6 and have.ip == addr.ip):
                raise OSError(errno.EEXIST, str(addr))
        self.addrs[ifname].add(addr)
        # As the kernel: a route for the address's prefix (an IPv4 /32 has none),
        # unless asked not to (IFA_F_NOPREFIXROUTE).
        if prefix_route and not (addr.version == 4 and addr.network.prefixlen == 32):
            kernel = Route(addr.network, ifname, RT_TABLE_MAIN)
            if not any(e.route == kernel and e.proto == PROTO_KERNEL for e in self.route_entries):
                metric = 0 if addr.version == 4 else 256
                self.route_entries.append(_FakeRoute(kernel, PROTO_KERNEL, metric))

    def address_del(self, ifname: str, addr: IPInterface) -> None:
        if ifname not in self.links:
            raise OSError(errno.ENODEV, ifname)
        if addr not in self.addrs[ifname]:
            raise OSError(errno.EADDRNOTAVAIL, str(addr))
        self.addrs[ifname].discard(addr)
        if not any(a.network == addr.network for a in self.addrs[ifname]):
            kernel = Route(addr.network, ifname, RT_TABLE_MAIN)
            self.route_entries = [
                e for e in self.route_entries if not (e.route == kernel and e.proto == PROTO_KERNEL)
            ]

    def routes(
        self, *, table: int | None = None, dev: str | None = None
    ) -> list[tuple[Route, int]]:
        return [
            (e.route, e.proto)
            for e in self.route_entries
            if (table is None or e.route.table == table) and (dev is None or e.route.dev == dev)
        ]

    def route_add(self, route: Route) -> None:
        if route.dev and route.dev not in self.links:
            raise OSError(errno.ENODEV, route.dev)
        metric = 0 if route.family == 4 else 1024
        for e in self.route_entries:
            if (e.route.dst, e.route.table, e.metric) == (route.dst, route.table, metric):
                raise OSError(errno.EEXIST, str(route))
        self.route_entries.append(_FakeRoute(route, ROUTE_PROTO, metric))

    def route_del(self, route: Route, proto: int = ROUTE_PROTO) -> None:
        for i, e in enumerate(self.route_entries):
            if e.route == route and (proto == 0 or e.proto == proto):
                del self.route_entries[i]
                return
        raise OSError(errno.ESRCH, str(route))

    def rules(self) -> set[Rule]:
        return set(self.rule_set)

    def rule_add(self, rule: Rule) -> None:
        if rule in self.rule_set:
            raise OSError(errno.EEXIST, str(rule))
        self.rule_set.add(rule)

    def rule_del(self, rule: Rule) -> None:
        if rule not in self.rule_set:
            raise OSError(errno.ENOENT, str(rule))
        self.rule_set.discard(rule)

    def route_get(self, addr: IPAddress, mark: int = 0) -> tuple[str, IPAddress | None]:
        """The kernel's decision, modelled: rules by priority (main alone when there
        are none), fwmark selectors (``not`` inverts them), suppress_prefixlength."""
        rules = sorted(
            (r for r in self.rule_set if r.family == addr.version), key=lambda r: r.priority
        ) or [Rule(addr.version, 32766, RT_TABLE_MAIN)]
        for rule in rules:
            if rule.fwmark is not None and (rule.fwmark == mark) == rule.invert:
                continue
            best = self._lookup(rule.table, addr)
            if best is None:
                continue
            if rule.suppress_prefixlength is not None and (
                best.dst.prefixlen <= rule.suppress_prefixlength
            ):
                continue
            return best.dev, best.via
        raise OSError(errno.ENETUNREACH, str(addr))

    def _lookup(self, table: int, addr: IPAddress) -> Route | None:
        best: Route | None = None
        for e in self.route_entries:
            r = e.route
            if (
                r.table == table
                and r.family == addr.version
                and addr in r.dst
                and (best is None or r.dst.prefixlen > best.dst.prefixlen)
            ):
                best = r
        return best

    def default_interface(self, family: int) -> str | None:
        for e in self.route_entries:
            r = e.route
            if r.family == family and r.table == RT_TABLE_MAIN and r.dst.prefixlen == 0:
                return r.dev or None
        return None

    def dump(self) -> str:
        """Sorted text like ``ip link; ip addr; ip route show table all; ip rule``."""
        lines = [f"link {name}" for name in self.links]
        for name, addrs in self.addrs.items():
            lines += [f"addr {_fam(a.version)} {a.with_prefixlen} dev {name}" for a in addrs]
        lines += [
            f"route {_fam(e.route.family)} {e.route} proto {e.proto}" for e in self.route_entries
        ]
        lines += [f"rule {_fam(r.family)} {r.priority}: {r}" for r in self.rule_set]
        return "\n".join(sorted(lines))


# --------------------------------------------------------------------------- router


class Router:
    """Owns the addresses, routes and rules of one instance; ``set`` converges to a state."""

    def __init__(self, nl: Netlink, ids: InstanceIds) -> None:
        self.nl = nl
        self.ids = ids

    def _owns_route(self, route: Route, proto: int = ROUTE_PROTO) -> bool:
        return proto == ROUTE_PROTO and (route.dev == self.ids.tun or route.table == self.ids.table)

    def _owns_rule(self, rule: Rule) -> bool:
        return rule.table == self.ids.table or rule.fwmark == self.ids.fwmark

    def current(self) -> NetState:
        """What the kernel has of ours right now."""
        addrs = {a for a in self.nl.addresses(self.ids.tun) if not _is_kernel_addr(a)}
        routes = {r for r, p in self.nl.routes() if self._owns_route(r, p)}
        rules = {r for r in self.nl.rules() if self._owns_rule(r)}
        return NetState(frozenset(addrs), frozenset(routes), frozenset(rules))

    def _check(self, desired: NetState) -> NetState:
        for r in desired.routes:
            if not self._owns_route(r):
                raise ValueError(
                    f"route {r} is neither via {self.ids.tun} nor in table {self.ids.table}: "
                    "it could not be found again by cleanup"
                )
        for rule in desired.rules:
            if not self._owns_rule(rule):
                raise ValueError(f"rule {rule} has neither our table nor our fwmark")
        addrs = frozenset(a for a in desired.addresses if not _is_kernel_addr(a))
        return replace(desired, addresses=addrs)

    def _try(self, cmd: str, fn: Callable[[], None]) -> None:
        _change(cmd)
        try:
            fn()
        except OSError as e:
            log.warning("%s: %s", cmd, e)

    def set(self, desired: NetState) -> NetState:
        """Converge to ``desired``; add missing objects first, then delete extra ones.

        Errors are logged and skipped; the returned state is re-read from the kernel,
        so callers compare it with ``desired`` to learn what failed.
        """
        desired = self._check(desired)
        tun = self.ids.tun
        for _ in range(2):  # a second pass repairs collateral damage of deletes
            have = self.current()
            if have == desired:
                return have
            extra_addrs = have.addresses - desired.addresses
            for a in sorted(desired.addresses - have.addresses, key=str):
                # IPv6 identifies an address by the address alone: a prefix change
                # has to delete the old one first.
                for old in [o for o in extra_addrs if o.version == 6 and o.ip == a.ip]:
                    self._try(addr_cmd("del", old, tun), partial(self.nl.address_del, tun, old))
                    extra_addrs = extra_addrs - {old}
                self._try(
                    addr_cmd("add", a, tun, desired.prefix_routes),
                    partial(self.nl.address_add, tun, a, desired.prefix_routes),
                )
            for r in sorted(desired.routes - have.routes, key=_route_key):
                self._try(route_cmd("add", r), partial(self.nl.route_add, r))
            for rule in sorted(desired.rules - have.rules, key=_rule_key):
                self._try(rule_cmd("add", rule), partial(self.nl.rule_add, rule))
            # Deletes: rules first so no traffic is steered at a table being emptied.
            for rule in sorted(have.rules - desired.rules, key=_rule_key):
                self._try(rule_cmd("del", rule), partial(self.nl.rule_del, rule))
            for r in sorted(have.routes - desired.routes, key=_route_key):
                self._try(route_cmd("del", r), partial(self.nl.route_del, r))
            for a in sorted(extra_addrs, key=str):
                self._try(addr_cmd("del", a, tun), partial(self.nl.address_del, tun, a))
        return self.current()


def cleanup(nl: Netlink, ids: InstanceIds) -> list[str]:
    """Remove every address, route, rule and the TUNs (relay workers' included) of
    ``ids``; no saved state needed."""
    done: list[str] = []

    def attempt(cmd: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ESRCH, errno.ENODEV, errno.EADDRNOTAVAIL):
                log.warning("%s: %s", cmd, e)
            return
        done.append(_change(cmd))

    for rule in sorted(nl.rules(), key=_rule_key):
        if rule.table == ids.table or rule.fwmark == ids.fwmark:
            attempt(rule_cmd("del", rule), partial(nl.rule_del, rule))
    tuns = {ids.tun} | {name for name in nl.link_names() if ids.is_worker_tun(name)}
    for r, proto in sorted(nl.routes(), key=lambda e: (_route_key(e[0]), e[1])):
        if r.table == ids.table or (r.dev in tuns and proto == ROUTE_PROTO):
            attempt(route_cmd("del", r, proto), partial(nl.route_del, r, proto))
    for tun in sorted(tuns):
        if nl.link_exists(tun):
            attempt(f"ip link delete dev {tun}", partial(nl.link_delete, tun))
    return done


# --------------------------------------------------------------------------- lookups


def default_interface(family: int, nl: Netlink | None = None) -> str | None:
    """Egress for ``egress = "auto"``: the device of the main table's default route."""
    if nl is not None:
        return nl.default_interface(family)
    from masqued.host.rtnetlink import RtNetlink

    with RtNetlink() as real:
        return real.default_interface(family)


def route_get(
    addr: IPAddress, nl: Netlink | None = None, mark: int = 0
) -> tuple[str, IPAddress | None]:
    """(device, gateway or None) the kernel would use to reach ``addr`` now, for a
    packet with fwmark ``mark`` (the client's QUIC socket carries its instance's)."""
    if nl is not None:
        return nl.route_get(addr, mark)
    from masqued.host.rtnetlink import RtNetlink

    with RtNetlink() as real:
        return real.route_get(addr, mark)


# --------------------------------------------------------------------------- forwarding

PROC_SYS = Path("/proc/sys")


def _forwarding_paths(ifnames: Sequence[str], v4: bool, v6: bool, root: Path) -> list[Path]:
    paths: list[Path] = []
    if v4:
        # IPv4 forwarding is decided by the *input* interface's flag.
        paths += [root / "net/ipv4/conf" / name / "forwarding" for name in ifnames]
    if v6:
        # IPv6 forwarding is one global switch.
        paths.append(root / "net/ipv6/conf/all/forwarding")
    return paths


def forwarding_status(
    ifnames: Sequence[str], v4: bool = True, v6: bool = True, root: Path = PROC_SYS
) -> dict[str, bool]:
    """``{"net.ipv4.conf.eth0.forwarding": True, ...}`` for the flags we would need."""
    out: dict[str, bool] = {}
    for p in _forwarding_paths(ifnames, v4, v6, root):
        key = ".".join(p.relative_to(root).parts)
        try:
            out[key] = p.read_text().strip() == "1"
        except OSError:
            out[key] = False
    return out


def enable_forwarding(
    ifnames: Sequence[str],
    v4: bool,
    v6: bool,
    root: Path = PROC_SYS,
    record: SysctlRecord | None = None,
) -> list[str]:
    """Turn on forwarding where it is off; return the sysctls changed.

    With ``record`` every sysctl this needs, and the value it had, is recorded for
    ``masqued cleanup`` to put back (masqued.host.sysctl).

    Note: with IPv6 forwarding on, interfaces with ``accept_ra = 1`` stop accepting
    router advertisements; we warn about that rather than change it.
    """
    changed: list[str] = []
    for p in _forwarding_paths(ifnames, v4, v6, root):
        key = ".".join(p.relative_to(root).parts)
        if p.read_text().strip() == "1":
            if record is not None:
                record.set(key, "1")  # needed: recorded, so another instance leaves it on
            continue
        _change(f"sysctl -q {key}=1")
        if record is not None:
            record.set(key, "1")
        else:
            p.write_text("1\n")
        changed.append(f"{key}=1")
    if v6 and changed:
        for name in ifnames:
            ra = root / "net/ipv6/conf" / name / "accept_ra"
            try:
                if ra.read_text().strip() == "1":
                    log.warning(
                        "%s has accept_ra=1: with IPv6 forwarding on it ignores router "
                        "advertisements (set net.ipv6.conf.%s.accept_ra=2 if it needs them)",
                        name,
                        name,
                    )
            except OSError:
                pass
    return changed
