"""``masqued cleanup NAME``: remove every host object of an instance, from its name alone,
and put back the sysctls and the resolver configuration its start changed (recorded
in /run: masqued.host.sysctl, masqued.host.resolver). The client's kill switch lives
in the instance's nftables table and goes with it."""

from __future__ import annotations

from collections.abc import Callable

from masqued.host.naming import InstanceIds
from masqued.host.nat import cleanup_nat
from masqued.host.resolver import cleanup_resolver
from masqued.host.routes import Netlink, cleanup
from masqued.host.rtnetlink import RtNetlink
from masqued.host.sysctl import SysctlRecord


def cleanup_instance(
    ids: InstanceIds,
    nl: Netlink | None = None,
    nat_cleanup: Callable[[InstanceIds], list[str]] = cleanup_nat,
    sysctls: SysctlRecord | None = None,
    resolver_cleanup: Callable[[InstanceIds], list[str]] = cleanup_resolver,
) -> list[str]:
    """Remove rules, routes, the TUN and NAT of ``ids``, restore the sysctls start
    changed; return what was done.

    Safe to run when nothing exists (the unit runs it before start and after stop).
    ``nat_cleanup``, ``nl``, ``sysctls`` and ``resolver_cleanup`` are replaceable for
    tests. The resolvers go back first (resolved's per-link settings need the TUN
    to revert), then NAT (or the kill switch, same table) so nothing is masqueraded
    for a pool that is going away; forwarding is switched back last, once nothing of
    ours routes through it.
    """
    done = resolver_cleanup(ids)
    done += nat_cleanup(ids)
    if nl is not None:
        done += cleanup(nl, ids)
    else:
        with RtNetlink() as real:
            done += cleanup(real, ids)
    record = sysctls if sysctls is not None else SysctlRecord(ids.name)
    return done + record.restore()
