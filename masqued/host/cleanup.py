"""``masqued cleanup NAME``: remove every host object of an instance, from its name alone."""

from __future__ import annotations

from collections.abc import Callable

from masqued.host.naming import InstanceIds
from masqued.host.nat import cleanup_nat
from masqued.host.routes import Netlink, cleanup
from masqued.host.rtnetlink import RtNetlink


def cleanup_instance(
    ids: InstanceIds,
    nl: Netlink | None = None,
    nat_cleanup: Callable[[InstanceIds], list[str]] = cleanup_nat,
) -> list[str]:
    """Remove rules, routes, the TUN and NAT of ``ids``; return what was removed.

    Safe to run when nothing exists (the unit runs it before start and after stop).
    ``nat_cleanup`` is replaceable for tests. NAT goes first so nothing is masqueraded
    for a pool that is going away.
    """
    done = nat_cleanup(ids)
    if nl is not None:
        return done + cleanup(nl, ids)
    with RtNetlink() as real:
        return done + cleanup(real, ids)
