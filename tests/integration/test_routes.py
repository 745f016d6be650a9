"""Issue 14 item 4 end to end: a relay forwards only to the routes it serves, and never
to its own addresses, whatever a client sends into its tunnel."""

from __future__ import annotations

import json

from tests.integration.lab import (
    EGRESS_V4,
    EGRESS_V6,
    RELAY_V4,
    TARGET_V4,
    TARGET_V6,
    NamespaceLab,
)

# Reachable from the relay (via its default route, the target) but outside its routes.
OTHER_V4 = "198.20.0.2"
OTHER_V6 = "2001:db8:20::2"
GATEWAY_V4 = "198.18.200.1"
BROADCAST_V4 = "198.18.200.255"
GATEWAY_V6 = "2001:db8:200::1"


def test_destinations_outside_the_routes_and_the_relay_itself_are_refused(
    lab1: NamespaceLab,
) -> None:
    t = lab1.target_ns
    lab1.ip(t, "addr", "add", f"{OTHER_V4}/32", "dev", "lo")
    lab1.ip(t, "-6", "addr", "add", f"{OTHER_V6}/128", "dev", "lo")
    lab1.start_servers()
    relay = lab1.start_daemon(
        "relay",
        lab1.relay_ns,
        lab1.relay_config(extra='routes = ["198.19.0.0/24", "2001:db8:19::/64"]\n'),
    )
    relay.wait_ready()
    c = lab1.client_ns(1)
    # masqued's client routes more than the relay serves; it keeps what the relay does
    # not advertise out of the tunnel itself, and the routes it serves work.
    client_routes = ("198.19.0.0/24", "198.20.0.0/24", "2001:db8:19::/64", "2001:db8:20::/64")
    client = lab1.start_daemon("c1", c, lab1.client_config(routes=client_routes))
    client.wait_ready()
    assert lab1.traffic(c, "udp", TARGET_V4, "5") == f"ok {EGRESS_V4} 5/5"
    assert lab1.traffic(c, "udp", TARGET_V6, "5") == f"ok {EGRESS_V6} 5/5"
    for dst in (OTHER_V4, OTHER_V6):
        res = lab1.ping(c, dst, count=1)
        assert res.returncode != 0, (dst, res.stdout)

    # A client that sends anywhere (not masqued's): the relay itself must refuse. The
    # target would answer for 198.20.0.2 (the relay's default route leads there), the
    # relay host for its gateway and pool broadcast addresses.
    seen = lab1.servers_log().count("udp ")
    targets = (TARGET_V4, OTHER_V4, GATEWAY_V4, BROADCAST_V4, OTHER_V6, GATEWAY_V6)
    res = lab1.run(
        c,
        *lab1.helper_cmd(c, "rawclient.py", RELAY_V4, "4433", str(lab1.pki / "ca.pem"), "reach")
        + list(targets),
        check=False,
        timeout=30,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert "status 200" in lines
    assert f"udp {TARGET_V4} {EGRESS_V4} reach-{TARGET_V4}" in lines, lines
    assert any(line.startswith(f"icmp {TARGET_V4} 0/0") for line in lines), lines  # echo reply
    for dst in targets[1:]:
        gateway = GATEWAY_V6 if ":" in dst else GATEWAY_V4
        code = "1/1" if ":" in dst else "3/13"  # administratively prohibited
        echo_reply = f"icmp {dst} {'129/0' if ':' in dst else '0/0'}"
        if dst == gateway:
            # The relay answers a ping of its gateway itself (RFC 9484 §7.2 probes);
            # the UDP datagram is refused like the others.
            assert lines.count(f"icmp {gateway} {code} {dst}") == 1, (dst, lines)
            assert any(line.startswith(echo_reply) for line in lines), lines
            assert not any(line.startswith(f"udp {dst} ") for line in lines), lines
            continue
        assert lines.count(f"icmp {gateway} {code} {dst}") == 2, (dst, lines)  # udp and echo
        assert not any(line.startswith((f"udp {dst} ", echo_reply)) for line in lines), lines
    # Only the legitimate datagram reached the target's servers.
    log = lab1.servers_log()
    assert log.count("udp ") == seen + 1 and f"reach-{TARGET_V4}" in log, log
    status = json.loads(lab1.masqued(lab1.relay_ns, "status", "relay", "--json").stdout)
    drops = status["totals"]["drops"]
    assert drops.get("not_routed", 0) == 4, drops
    assert drops.get("relay_address", 0) == 4, drops
    assert "outside the routes this relay serves" in relay.log_text()
    for d in lab1.daemons:
        assert d.stop() == 0
    for ns in (lab1.relay_ns, c):
        assert lab1.leftovers(ns) == []
