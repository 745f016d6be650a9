"""Reload (SIGHUP) on a live relay: changes that can apply live do, sessions stay."""

from __future__ import annotations

import signal
import time

from tests.integration.lab import EGRESS_V4, TARGET_V4, NamespaceLab


def wait_log(daemon_log: object, text: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in daemon_log():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not logged")


def test_pool_growth_applies_live(lab3: NamespaceLab) -> None:
    lab3.start_servers()
    small = lab3.relay_config(pool=("198.18.200.0/30",))
    relay = lab3.start_daemon("relay", lab3.relay_ns, small)
    relay.wait_ready()
    routes = ("198.19.0.0/24",)
    first = lab3.start_daemon("c1", lab3.client_ns(1), lab3.client_config(routes=routes))
    first.wait_ready()
    second = lab3.start_daemon("c2", lab3.client_ns(2), lab3.client_config(routes=routes))
    wait_log(second.log_text, "503")  # the /30 holds one client

    grown = lab3.relay_config(pool=("198.18.200.0/30", "198.18.201.0/24"))
    relay.config.write_text(grown)
    pid = relay.proc.pid
    relay.proc.send_signal(signal.SIGHUP)
    wait_log(relay.log_text, "pool grown by 198.18.201.0/24")
    second.wait_ready(timeout=20)
    out = lab3.ip(lab3.client_ns(2), "-4", "-o", "addr", "show", "dev", "mq-c2")
    assert "198.18.201.2/32" in out
    # the relay's TUN and NAT cover the new network; same process, first session kept
    assert "198.18.201.1/24" in lab3.ip(lab3.relay_ns, "-4", "-o", "addr", "show", "mq-relay")
    nft = lab3.run(lab3.relay_ns, "nft", "list", "table", "inet", "masqued_relay").stdout
    assert "198.18.201.0/24" in nft
    assert relay.proc.pid == pid and relay.proc.poll() is None
    assert "session closed" not in relay.log_text()
    for i in (1, 2):
        assert lab3.traffic(lab3.client_ns(i), "udp", TARGET_V4, "5") == f"ok {EGRESS_V4} 5/5"

    # shrinking is not live: reported, and the running pool stays as it is
    relay.config.write_text(small)
    relay.proc.send_signal(signal.SIGHUP)
    wait_log(relay.log_text, "pool changed; restart the instance to apply")
    assert lab3.traffic(lab3.client_ns(2), "udp", TARGET_V4, "5") == f"ok {EGRESS_V4} 5/5"
    for d in lab3.daemons:
        assert d.stop() == 0
    for ns in (lab3.relay_ns, lab3.client_ns(1), lab3.client_ns(2)):
        assert lab3.leftovers(ns) == []


def test_a_rejected_reload_answers_systemd_and_keeps_the_sessions(lab1: NamespaceLab) -> None:
    """An invalid ACL protocol ("²" once escaped as a bare ValueError) on SIGHUP: the
    error is logged, READY=1 follows RELOADING=1, the running config stays."""
    lab1.start_servers()
    relay = lab1.start_daemon("relay", lab1.relay_ns, lab1.relay_config())
    relay.wait_ready()
    client = lab1.start_daemon("c1", lab1.client_ns(1), lab1.client_config())
    client.wait_ready()
    good = relay.config.read_text()
    relay.config.write_text(
        good + 'acl_default = "deny"\n[clients.alice]\nacl = ["allow 198.19.0.0/24 ²"]\n'
    )
    seen = len(relay.notify.messages)
    relay.proc.send_signal(signal.SIGHUP)
    wait_log(relay.log_text, "reload rejected")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        relay.notify.wait_for("(collect)", 0.2)  # receives whatever arrives meanwhile
        lines = [line for m in relay.notify.messages[seen:] for line in m.split("\n")]
        if "RELOADING=1" in lines and "READY=1" in lines[lines.index("RELOADING=1") :]:
            break
    else:
        raise AssertionError(f"no READY=1 after RELOADING=1: {relay.notify.messages[seen:]}")
    assert "clients.alice: acl:" in relay.log_text()
    assert relay.running() and "session closed" not in relay.log_text()
    assert lab1.traffic(lab1.client_ns(1), "udp", TARGET_V4, "5") == f"ok {EGRESS_V4} 5/5"
    for d in lab1.daemons:
        assert d.stop() == 0
