"""Packets per second through the per-client ACL check and the route check
(masqued.gate.policy: CompiledAcl.allows, Reach.check).

    .venv/bin/python bench/policy_bench.py [--seconds 2]

Bounded in time; prints one line per case. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import ipaddress
import time

from masqued.gate.policy import Acl, Reach, relay_addresses
from masqued.proto.packet import addresses, build_icmp_echo, build_tcp, build_udp


def measure(name: str, acl: Acl, packets: list[bytes], seconds: float) -> None:
    check = acl.compile().allows
    n = 0
    allowed = 0
    deadline = time.perf_counter() + seconds
    start = time.perf_counter()
    while time.perf_counter() < deadline:
        for p in packets:
            allowed += check(p)
        n += len(packets)
    elapsed = time.perf_counter() - start
    print(
        f"{name:<42} {n / elapsed / 1e6:6.2f} Mpps  ({elapsed / n * 1e9:5.0f} ns/packet, "
        f"{allowed / n:.0%} allowed)"
    )


def measure_reach(name: str, routes: list[str], packets: list[bytes], seconds: float) -> None:
    """Reach as the relay's hot loop uses it, on the (version, dst) it already has."""
    pool = [ipaddress.ip_network("198.18.200.0/24"), ipaddress.ip_network("2001:db8:200::/64")]
    reach = Reach([ipaddress.ip_network(r) for r in routes], relay_addresses(pool), "x")
    verdicts, verdict = reach.verdicts, reach.verdict
    views = [(v, d) for v, _, d in map(addresses, packets)]
    n = 0
    allowed = 0
    deadline = time.perf_counter() + seconds
    start = time.perf_counter()
    while time.perf_counter() < deadline:
        for version, dst in views:
            try:
                why = verdicts[dst]
            except KeyError:
                why = verdict(version, dst)
            if why:
                continue
            allowed += 1
        n += len(views)
    elapsed = time.perf_counter() - start
    print(
        f"{name:<42} {n / elapsed / 1e6:6.2f} Mpps  ({elapsed / n * 1e9:5.0f} ns/packet, "
        f"{allowed / n:.0%} allowed)"
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=2.0)
    a = p.parse_args()
    src, src6 = "198.18.200.2", "2001:db8:200::2"
    mix = [
        build_tcp(src, "198.19.0.2", 40000, 8080),
        build_tcp(src, "198.19.0.2", 40000, 22),
        build_udp(src, "198.19.0.2", 40000, 53, b"q" * 40),
        build_icmp_echo(src, "198.19.0.2", 1, 1, b"p" * 56),
        build_tcp(src6, "2001:db8:19::2", 40000, 8080),
        build_udp(src6, "2001:db8:19::2", 40000, 5353, b"q" * 40),
    ]
    measure("no rules, default allow", Acl((), True), mix, a.seconds)
    measure(
        "1 rule (tcp 8080), default deny",
        Acl.parse(["allow 198.19.0.2/32 tcp 8080"], "deny"),
        mix,
        a.seconds,
    )
    ten = [f"allow 198.19.{i}.0/24 udp {1000 + i}" for i in range(9)]
    measure(
        "10 rules, last matches",
        Acl.parse([*ten, "allow 0.0.0.0/0 tcp 8080"], "deny"),
        mix,
        a.seconds,
    )
    fifty = [f"deny 198.20.{i}.0/24" for i in range(49)]
    measure(
        "50 rules, mostly no match",
        Acl.parse([*fifty, "allow 198.19.0.0/16"], "deny"),
        mix,
        a.seconds,
    )
    measure_reach("reach: 0.0.0.0/0, ::/0 (relay default)", ["0.0.0.0/0", "::/0"], mix, a.seconds)
    measure_reach(
        "reach: 198.19.0.0/24, 2001:db8:19::/64",
        ["198.19.0.0/24", "2001:db8:19::/64"],
        mix,
        a.seconds,
    )
    ten_routes = [f"198.{20 + i}.0.0/16" for i in range(9)] + ["198.19.0.0/24", "::/0"]
    measure_reach("reach: 10 IPv4 routes, last matches", ten_routes, mix, a.seconds)
    many = [
        build_udp(src, f"198.19.{i >> 8}.{i & 255}", 40000, 53, b"q") for i in range(1, 9000)
    ]
    measure_reach("reach: 198.19.0.0/16, 9000 destinations", ["198.19.0.0/16"], many, a.seconds)


if __name__ == "__main__":
    main()
