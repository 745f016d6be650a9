"""The client's kill switch: nothing leaves the host but through the TUN.

In the instance's own nftables table ``inet masqued_NAME`` (the name the relay uses
for NAT, so ``masqued cleanup NAME`` removes either), one transaction replaces the
table with two base chains, output and forward, of policy drop, for IPv4 and IPv6
alike (an inet table: no IPv6 leak when the tunnel carries IPv4 only). Accepted:

- everything out of the TUN and on loopback;
- the tunnel's own packets, recognised by the instance's fwmark: UDP to the relay's
  QUIC port, TCP to its HTTP/2 port, and DNS (port 53) from the marked sockets that
  resolve the relay's name (masqued.host.dns);
- DHCPv4/DHCPv6 requests and IPv6 router/neighbour solicitations and neighbour
  advertisements, without which the host loses the very network the tunnel runs on;
- the ``kill_switch_allow`` CIDRs (the LAN, a management network).

The rules stay while the client reconnects (that is the point) and after a crash
(fail closed) until the next start or ``masqued cleanup NAME``; a clean stop removes
them.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from masqued.host.naming import InstanceIds

log = logging.getLogger("masqued.host")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Runner = Callable[[Sequence[str], str | None], subprocess.CompletedProcess[str]]
OUT_CHAIN = "killswitch_out"
FWD_CHAIN = "killswitch_fwd"


class KillSwitchError(RuntimeError):
    pass


def _nft(cmd: Sequence[str], stdin: str | None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), input=stdin, capture_output=True, text=True, timeout=30)


@dataclass(frozen=True)
class KillSwitchRules:
    """What the kill switch lets out besides the TUN."""

    tun: str
    fwmark: int
    udp_port: int
    tcp_port: int | None
    allow: tuple[IPNetwork, ...] = ()

    def script(self, table: str) -> str:
        """The ``nft -f`` transaction that (re)creates ``table`` with the kill switch."""
        if not self.fwmark:
            raise ValueError("the kill switch needs the fwmark")
        for name in (self.tun,):
            if not name or len(name) > 15 or any(c in name for c in ' "\\/\n\t'):
                raise ValueError(f"invalid interface name {name!r}")
        mark = f"meta mark {self.fwmark:#x}"
        v4 = ", ".join(str(n) for n in self.allow if n.version == 4)
        v6 = ", ".join(str(n) for n in self.allow if n.version == 6)
        tunnel = [
            f"{mark} udp dport {self.udp_port} accept",
            *([f"{mark} tcp dport {self.tcp_port} accept"] if self.tcp_port else []),
            f"{mark} udp dport 53 accept",
            f"{mark} tcp dport 53 accept",
        ]
        lan = [
            "udp sport 68 udp dport 67 accept",
            "udp sport 546 udp dport 547 accept",
            "icmpv6 type { nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert } accept",
        ]
        allowed = [
            *([f"ip daddr {{ {v4} }} accept"] if v4 else []),
            *([f"ip6 daddr {{ {v6} }} accept"] if v6 else []),
        ]
        drop = 'counter drop comment "masqued kill switch"'

        def chain(name: str, hook: str, rules: list[str]) -> list[str]:
            return [
                f"\tchain {name} {{",
                f"\t\ttype filter hook {hook} priority filter; policy drop;",
                *(f"\t\t{rule}" for rule in rules),
                f"\t\t{drop}",
                "\t}",
            ]

        own = [f'oifname "{self.tun}" accept']
        lines = [
            f"table inet {table} {{}}",
            f"delete table inet {table}",
            f"table inet {table} {{",
            *chain(OUT_CHAIN, "output", ['oifname "lo" accept', *own, *tunnel, *lan, *allowed]),
            *chain(FWD_CHAIN, "forward", [*own, *allowed]),
            "}",
            "",
        ]
        return "\n".join(lines)


class KillSwitch:
    """The kill switch of one instance: ``apply`` (idempotent), ``remove``, ``describe``."""

    def __init__(self, ids: InstanceIds, runner: Runner = _nft) -> None:
        self.table = ids.nft_table
        self.runner = runner
        self.rules: KillSwitchRules | None = None

    def _run(self, cmd: Sequence[str], stdin: str | None = None) -> str:
        try:
            proc = self.runner(cmd, stdin)
        except (OSError, subprocess.SubprocessError) as exc:
            raise KillSwitchError(f"{' '.join(cmd)}: {exc}") from None
        if proc.returncode != 0:
            raise KillSwitchError(f"{' '.join(cmd)} failed: {(proc.stderr or '').strip()}")
        return proc.stdout or ""

    def apply(self, rules: KillSwitchRules) -> None:
        allow = ", ".join(map(str, rules.allow)) or "nothing else"
        log.info(
            "[#] nft -f - (table inet %s: kill switch, out only via %s, to the relay's "
            "udp/%d%s with mark %#x, and %s)",
            self.table,
            rules.tun,
            rules.udp_port,
            f" tcp/{rules.tcp_port}" if rules.tcp_port else "",
            rules.fwmark,
            allow,
        )
        self._run(["nft", "-f", "-"], rules.script(self.table))
        self.rules = rules

    def remove(self) -> None:
        log.info("[#] nft delete table inet %s (kill switch)", self.table)
        self._run(
            ["nft", "-f", "-"], f"table inet {self.table} {{}}\ndelete table inet {self.table}\n"
        )
        self.rules = None

    def installed(self) -> bool:
        """True when our output chain drops by policy right now."""
        try:
            out = self._run(["nft", "-j", "list", "chain", "inet", self.table, OUT_CHAIN])
        except KillSwitchError:
            return False
        return chain_policy(out) == "drop"

    def describe(self) -> dict[str, Any]:
        rules = self.rules
        return {
            "enabled": rules is not None,
            "installed": self.installed() if rules is not None else False,
            "table": f"inet {self.table}",
            "allow": [str(n) for n in rules.allow] if rules else [],
            "relay_ports": (
                [f"udp/{rules.udp_port}", *([f"tcp/{rules.tcp_port}"] if rules.tcp_port else [])]
                if rules
                else []
            ),
        }


def chain_policy(listing: str) -> str | None:
    """The policy of the chain in ``nft -j list chain`` output."""
    try:
        data = json.loads(listing)
    except ValueError:
        return None
    for item in data.get("nftables", []):
        chain = item.get("chain") if isinstance(item, dict) else None
        if isinstance(chain, dict) and "policy" in chain:
            return str(chain["policy"])
    return None
