"""End-to-end: real daemons, real TUN, routes, NAT, QUIC over UDP.

Written against the lab interface (tests/integration/lab.py ``Lab``): they run in the
namespace lab and, unchanged, on the Vagrant VMs (README "Testing in VMs").
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.integration.lab import (
    EGRESS_V4,
    EGRESS_V6,
    TARGET_V4,
    TARGET_V6,
    Lab,
)

pytestmark = pytest.mark.any_lab

MB = 1024 * 1024


def start_pair(
    lab: Lab,
    *,
    nat: str = "auto",
    client_extra: str = "",
    routes: tuple[str, ...] | None = None,
) -> None:
    lab.start_servers()
    relay = lab.start_daemon("relay", lab.relay_ns, lab.relay_config(nat=nat))
    relay.wait_ready()
    config = (
        lab.client_config(extra=client_extra)
        if routes is None
        else lab.client_config(extra=client_extra, routes=routes)
    )
    client = lab.start_daemon("c1", lab.client_ns(1), config)
    client.wait_ready()


def assert_clean_after_stop(lab: Lab) -> None:
    codes = [d.stop() for d in lab.daemons]
    assert codes == [0] * len(codes), [d.log_text()[-3000:] for d in lab.daemons]
    for ns in [lab.relay_ns] + [lab.client_ns(i) for i in range(1, lab.clients + 1)]:
        assert lab.leftovers(ns) == [], ns


def test_ping_tcp_udp_ipv4_ipv6_with_nftables(lab1: Lab) -> None:
    start_pair(lab1, nat="nftables")
    c = lab1.client_ns(1)
    # ICMP both families
    res = lab1.ping(c, TARGET_V4, count=5)
    assert res.returncode == 0, res.stdout + res.stderr
    assert " 0% packet loss" in res.stdout
    res = lab1.ping(c, TARGET_V6, count=5)
    assert res.returncode == 0, res.stdout + res.stderr
    # TCP 10 MB with checksum; the target sees the relay's egress address (NAT)
    out = lab1.traffic(c, "tcp", TARGET_V4, str(10 * MB))
    assert out.split()[:2] == ["ok", EGRESS_V4], out
    out = lab1.traffic(c, "tcp", TARGET_V6, str(10 * MB))
    assert out.split()[:2] == ["ok", EGRESS_V6], out
    # UDP request/response
    out = lab1.traffic(c, "udp", TARGET_V4, "20")
    assert out == f"ok {EGRESS_V4} 20/20"
    out = lab1.traffic(c, "udp", TARGET_V6, "20")
    assert out == f"ok {EGRESS_V6} 20/20"
    # The NAT really is our own nftables table.
    tables = lab1.run(lab1.relay_ns, "nft", "list", "tables").stdout
    assert "table inet masqued_relay" in tables
    assert_clean_after_stop(lab1)


def test_iptables_backend_nat(lab1: Lab) -> None:
    start_pair(lab1, nat="iptables")
    c = lab1.client_ns(1)
    out = lab1.traffic(c, "udp", TARGET_V4, "10")
    assert out == f"ok {EGRESS_V4} 10/10"
    out = lab1.traffic(c, "udp", TARGET_V6, "10")
    assert out == f"ok {EGRESS_V6} 10/10"
    out = lab1.traffic(c, "tcp", TARGET_V4, str(2 * MB))
    assert out.split()[:2] == ["ok", EGRESS_V4], out
    rules = lab1.run(lab1.relay_ns, "iptables-legacy", "-t", "nat", "-S").stdout
    assert "-A MASQUED-relay" in rules and "MASQUERADE" in rules
    # nftables was not used
    assert "masqued" not in lab1.run(lab1.relay_ns, "nft", "list", "tables").stdout
    assert_clean_after_stop(lab1)


def test_three_clients_at_once(lab3: Lab) -> None:
    lab3.start_servers()
    relay = lab3.start_daemon("relay", lab3.relay_ns, lab3.relay_config())
    relay.wait_ready()
    clients = [
        lab3.start_daemon(f"c{i}", lab3.client_ns(i), lab3.client_config()) for i in (1, 2, 3)
    ]
    for d in clients:
        d.wait_ready()
    addrs = set()
    for i in (1, 2, 3):
        out = lab3.ip(lab3.client_ns(i), "-4", "-o", "addr", "show", "dev", f"mq-c{i}")
        addrs.add(out.split()[3])
    assert len(addrs) == 3, addrs
    assert all(a.startswith("198.18.200.") for a in addrs)
    # All three move traffic at the same time.
    procs = [
        lab3.spawn(
            lab3.client_ns(i),
            *lab3.helper_cmd(lab3.client_ns(i), "traffic.py", "tcp", TARGET_V4, str(3 * MB)),
            log=lab3.workdir / f"t{i}.out",
        )
        for i in (1, 2, 3)
    ]
    for i, p in enumerate(procs, 1):
        assert p.wait(120) == 0, (lab3.workdir / f"t{i}.out").read_text()
        assert (lab3.workdir / f"t{i}.out").read_text().split()[:2] == ["ok", EGRESS_V4]
    for i in (1, 2, 3):
        assert lab3.ping(lab3.client_ns(i), TARGET_V6, count=2).returncode == 0
    assert_clean_after_stop(lab3)


def test_routes_covering_the_relay_and_full_tunnel(lab3: Lab) -> None:
    lab3.start_servers()
    relay = lab3.start_daemon("relay", lab3.relay_ns, lab3.relay_config())
    relay.wait_ready()
    # c1: a specific route that covers the relay's own address
    covering = lab3.start_daemon(
        "c1",
        lab3.client_ns(1),
        lab3.client_config(routes=("198.18.0.0/16", "198.19.0.0/16", "2001:db8::/32")),
    )
    # c2: full tunnel
    full = lab3.start_daemon(
        "c2", lab3.client_ns(2), lab3.client_config(routes=("0.0.0.0/0", "::/0"))
    )
    covering.wait_ready()
    full.wait_ready()
    for i in (1, 2):
        ns = lab3.client_ns(i)
        assert lab3.ping(ns, TARGET_V4).returncode == 0
        assert lab3.ping(ns, TARGET_V6).returncode == 0
        out = lab3.traffic(ns, "tcp", TARGET_V4, str(MB))
        assert out.split()[:2] == ["ok", EGRESS_V4]
    # The full tunnel uses the fwmark + suppress_prefixlength rules.
    rules = lab3.ip(lab3.client_ns(2), "rule", "show")
    assert "suppress_prefixlength 0" in rules
    assert "not from all fwmark" in rules
    assert_clean_after_stop(lab3)


def test_client_recovers_after_relay_sigkill(lab1: Lab) -> None:
    start_pair(lab1)
    c = lab1.client_ns(1)
    assert lab1.ping(c, TARGET_V4).returncode == 0
    relay = lab1.daemons[0]
    assert relay.stop(signal.SIGKILL) == -signal.SIGKILL
    if lab1.supervised:
        # masqued@relay's ExecStopPost (masqued cleanup) ran after the crash.
        assert lab1.leftovers(lab1.relay_ns) == []
    else:
        # The crashed relay left its NAT table behind; the new one cleans it up first.
        assert any("nft" in x for x in lab1.leftovers(lab1.relay_ns))
    res = lab1.ping(lab1.client_ns(1), TARGET_V4, count=1)
    assert res.returncode != 0
    time.sleep(1)
    restarted = lab1.start_daemon("relay", lab1.relay_ns, lab1.relay_config(), run="2")
    restarted.wait_ready()
    back_after = lab1.wait_ping(c, TARGET_V4, timeout=20)
    assert back_after < 15 * lab1.time_scale, back_after
    out = lab1.traffic(c, "tcp", TARGET_V4, str(MB))
    assert out.split()[:2] == ["ok", EGRESS_V4]
    lab1.forget(relay)
    assert_clean_after_stop(lab1)


@pytest.mark.namespace_only(
    reason="needs a crash nobody cleans up after; under systemd ExecStopPost runs "
    "`masqued cleanup` itself (tests/system checks that)"
)
def test_cleanup_command_after_crash(lab1: Lab) -> None:
    start_pair(lab1)
    for d in lab1.daemons:
        d.stop(signal.SIGKILL)
    # Leftovers: NAT table on the relay, rules on the client.
    assert lab1.leftovers(lab1.relay_ns)
    assert lab1.leftovers(lab1.client_ns(1))
    for ns, name in ((lab1.relay_ns, "relay"), (lab1.client_ns(1), "c1")):
        res = lab1.masqued(ns, "cleanup", name)
        assert res.returncode == 0, res.stderr
        assert lab1.leftovers(ns) == []
    for d in list(lab1.daemons):
        lab1.forget(d)


@pytest.mark.parametrize("pool", [("198.18.200.0/30",)])
def test_pool_exhausted_gets_503_and_others_unaffected(lab3: Lab, pool: tuple[str, ...]) -> None:
    lab3.start_servers()
    relay = lab3.start_daemon("relay", lab3.relay_ns, lab3.relay_config(pool=pool))
    relay.wait_ready()
    first = lab3.start_daemon(
        "c1", lab3.client_ns(1), lab3.client_config(routes=("198.19.0.0/24",))
    )
    first.wait_ready()
    second = lab3.start_daemon(
        "c2", lab3.client_ns(2), lab3.client_config(routes=("198.19.0.0/24",))
    )
    time.sleep(3)
    assert "503" in second.log_text()
    assert "pool exhausted" in relay.log_text()
    assert lab3.ping(lab3.client_ns(1), TARGET_V4).returncode == 0
    assert_clean_after_stop(lab3)


def rawclient(lab: Lab, ns: str, mode: str) -> str:
    from tests.integration.lab import RELAY_V4

    res = lab.run(
        ns,
        *lab.helper_cmd(ns, "rawclient.py", RELAY_V4, "4433", str(lab.pki / "ca.pem"), mode),
        check=False,
        timeout=30,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def test_malformed_frame_closes_only_that_client(lab3: Lab) -> None:
    lab3.start_servers()
    relay = lab3.start_daemon("relay", lab3.relay_ns, lab3.relay_config())
    relay.wait_ready()
    good = lab3.start_daemon("c1", lab3.client_ns(1), lab3.client_config())
    good.wait_ready()
    out = rawclient(lab3, lab3.client_ns(2), "malformed")
    assert "status 200" in out
    assert "reset 0x10e" in out  # H3_MESSAGE_ERROR
    assert "malformed stream frame" in relay.log_text()
    # The relay is alive and the other client unaffected.
    assert relay.running()
    out = lab3.traffic(lab3.client_ns(1), "tcp", TARGET_V4, str(MB))
    assert out.split()[:2] == ["ok", EGRESS_V4]
    assert_clean_after_stop(lab3)


def test_spoofed_source_is_dropped(lab1: Lab) -> None:
    lab1.start_servers()
    relay = lab1.start_daemon("relay", lab1.relay_ns, lab1.relay_config())
    relay.wait_ready()
    out = rawclient(lab1, lab1.client_ns(1), "spoof")
    assert "legit-payload" in out
    assert "spoofed" not in out
    servers_log = lab1.servers_log()
    assert "legit-payload" in servers_log
    assert "spoofed-payload" not in servers_log
    assert "spoofed source 198.18.200.99" in relay.log_text()
    assert_clean_after_stop(lab1)
