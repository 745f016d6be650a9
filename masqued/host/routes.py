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
from masqued.host.sysctl import SysctlRecord

log = logging.getLogger("masqued.host")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

RT_TABLE_MAIN = 254
RT_TABLE_LOCAL = 255
FIB_RULE_INVERT = 0x2
IFA_F_NODAD = 0x02


# --------------------------------------------------------------------------- values


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
        return s + f" table {_table_name(self.table)}"


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
        s += f" lookup {_table_name(self.table)}"
        if self.suppress_prefixlength is not None:
            s += f" suppress_prefixlength {self.suppress_prefixlength}"
        return s


@dataclass(frozen=True)
class NetState:
    """The host state one instance owns."""

    addresses: frozenset[IPInterface] = frozenset()
    routes: frozenset[Route] = frozenset()
    rules: frozenset[Rule] = frozenset()


def full_tunnel_rules(ids: InstanceIds, families: Iterable[int] = (4, 6)) -> frozenset[Rule]:
    """wg-quick's loop guard for a default route into the tunnel.

    ``not fwmark M lookup T`` sends everything but the marked QUIC socket to our table;
    ``not fwmark M lookup main suppress_prefixlength 0`` (checked first) keeps the
    main table's specific routes (LAN, relay host route) in force; it carries our
    fwmark so that it is recognisably ours.
    """
    rules: set[Rule] = set()
    for fam in families:
        rules.add(Rule(fam, RULE_PRIORITY_TABLE, ids.table, fwmark=ids.fwmark, invert=True))
        rules.add(
            Rule(
                fam,
                RULE_PRIORITY_SUPPRESS,
                RT_TABLE_MAIN,
                fwmark=ids.fwmark,
                invert=True,
                suppress_prefixlength=0,
            )
        )
    return frozenset(rules)


def _table_name(table: int) -> str:
    return {RT_TABLE_MAIN: "main", RT_TABLE_LOCAL: "local", 253: "default"}.get(table, str(table))


def _fam(version: int) -> str:
    return f"-{version}"


def addr_cmd(verb: str, addr: IPInterface, dev: str) -> str:
    return f"ip {_fam(addr.version)} address {verb} {addr.with_prefixlen} dev {dev}"


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

    def address_add(self, ifname: str, addr: IPInterface) -> None: ...

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

    def route_get(self, addr: IPAddress) -> tuple[str, IPAddress | None]:
        """The kernel's route decision for ``addr``: (device, gateway or None)."""
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

    def address_add(self, ifname: str, addr: IPInterface) -> None:
        if ifname not in self.links:
            raise OSError(errno.ENODEV, ifname)
        for have in self.addrs[ifname]:
            if have == addr or (addr.version == 6 and have.ip == addr.ip):
                raise OSError(errno.EEXIST, str(addr))
        self.addrs[ifname].add(addr)

    def address_del(self, ifname: str, addr: IPInterface) -> None:
        if ifname not in self.links:
            raise OSError(errno.ENODEV, ifname)
        if addr not in self.addrs[ifname]:
            raise OSError(errno.EADDRNOTAVAIL, str(addr))
        self.addrs[ifname].discard(addr)

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

    def route_get(self, addr: IPAddress) -> tuple[str, IPAddress | None]:
        best: Route | None = None
        for e in self.route_entries:
            r = e.route
            if (
                r.table == RT_TABLE_MAIN
                and r.family == addr.version
                and addr in r.dst
                and (best is None or r.dst.prefixlen > best.dst.prefixlen)
            ):
                best = r
        if best is None:
            raise OSError(errno.ENETUNREACH, str(addr))
        return best.dev, best.via

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
                self._try(addr_cmd("add", a, tun), partial(self.nl.address_add, tun, a))
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


def route_get(addr: IPAddress, nl: Netlink | None = None) -> tuple[str, IPAddress | None]:
    """(device, gateway or None) the kernel would use to reach ``addr`` now."""
    if nl is not None:
        return nl.route_get(addr)
    from masqued.host.rtnetlink import RtNetlink

    with RtNetlink() as real:
        return real.route_get(addr)


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
