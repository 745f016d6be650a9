"""Names and numbers that mark host objects as belonging to one instance.

Everything an instance creates is found again from its name alone, so
``masqued cleanup NAME`` needs no saved state.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")

# rtm_protocol value stamped on every route we add (see /etc/iproute2/rt_protos;
# 0x6d is unassigned). Tells "ours" apart from the kernel's and the operator's routes.
ROUTE_PROTO = 0x6D

# Policy-rule priorities: after the local table (0), before main (32766).
RULE_PRIORITY_SUPPRESS = 5209
RULE_PRIORITY_TABLE = 5210


class InvalidInstanceName(ValueError):
    pass


def check_instance_name(name: str) -> str:
    """Return ``name`` if it is a usable instance name, else raise InvalidInstanceName."""
    if not _NAME_RE.match(name):
        raise InvalidInstanceName(
            f"invalid instance name {name!r}: use 1-32 of A-Z a-z 0-9 _ . - "
            "(starting with a letter or digit)"
        )
    return name


@dataclass(frozen=True)
class InstanceIds:
    """Identifiers derived from an instance name (pure function of the name)."""

    name: str
    # Relay worker whose TUN ``tun`` names (0: the instance's own, as with one worker).
    worker: int = 0

    @property
    def _hash(self) -> int:
        return zlib.crc32(self.name.encode())

    @property
    def _base_tun(self) -> str:
        if len(self.name) <= 12:
            return f"mq-{self.name}"
        return f"mq-{self.name[:7]}-{self._hash & 0xFFFF:04x}"

    @property
    def tun(self) -> str:
        """TUN device name, at most 15 characters (IFNAMSIZ - 1)."""
        return self.worker_tun(self.worker)

    def worker_tun(self, worker: int) -> str:
        """TUN of relay worker ``worker`` (0 has the instance's own): that + "+k", or
        a short hash form where that would pass 15 characters. "+" is not allowed in
        instance names, so these never clash with another instance's TUN."""
        base = self._base_tun
        if worker == 0:
            return base
        suffix = f"+{worker}"
        if len(base) + len(suffix) <= 15:
            return base + suffix
        return f"mq-{self._hash & 0xFFFF:04x}{suffix}"

    def is_worker_tun(self, ifname: str) -> bool:
        """True for the TUN of one of this instance's relay workers (k >= 1)."""
        for base in (self._base_tun, f"mq-{self._hash & 0xFFFF:04x}"):
            head, plus, k = ifname.rpartition("+")
            if plus and head == base and k.isdigit() and self.worker_tun(int(k)) == ifname:
                return True
        return False

    @property
    def table(self) -> int:
        """Own routing table id; also used as the fwmark of the QUIC socket."""
        return 0x4D0000 | (self._hash & 0xFFFF)

    @property
    def fwmark(self) -> int:
        return self.table

    @property
    def nft_table(self) -> str:
        """Own nftables table: the name as it is (nft takes "-" and "." in table
        names), so that relay-1 and relay_1 never share one."""
        return f"masqued_{self.name}"

    @property
    def ipt_chain(self) -> str:
        """Own iptables chain (names are limited to 28 characters)."""
        if len(self.name) <= 20:
            return f"MASQUED-{self.name}"
        return f"MASQUED-{self.name[:15]}-{self._hash & 0xFFFF:04x}"

    @property
    def comment(self) -> str:
        """Comment stamped on rules we add to chains we do not own."""
        return f"masqued:{self.name}"

    def shared_with(self, other: InstanceIds) -> list[str]:
        """What of ``other``'s host objects this instance would take for its own.

        The names are the instance name where they can hold it, but the routing
        table / fwmark is 16 bits of a hash and long names are shortened with one:
        two instances may meet there (r1623 and r8000 share table 0x4d7733). Their
        set-up and cleanup would then tear down each other's routes and rules, so
        such a pair must not run together.
        """
        if other.name == self.name:
            return []
        shared = []
        if other.table == self.table:
            shared.append(f"routing table and fwmark {self.table:#x}")
        for what, mine, theirs in (
            ("TUN", self._base_tun, other._base_tun),
            ("nftables table", self.nft_table, other.nft_table),
            ("iptables chain", self.ipt_chain, other.ipt_chain),
        ):
            if mine == theirs:
                shared.append(f"{what} {mine}")
        return shared
