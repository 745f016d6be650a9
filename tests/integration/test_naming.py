"""Issue 14: a second instance whose routing table / fwmark meets a running one's is
refused at start, and the running one keeps its rules, routes and tunnel."""

from __future__ import annotations

import time

from masqued.host.naming import InstanceIds
from tests.integration.lab import EGRESS_V4, TARGET_V4, NamespaceLab


def test_an_instance_colliding_with_a_running_one_is_refused(lab1: NamespaceLab) -> None:
    assert InstanceIds("r1623").table == InstanceIds("r8000").table
    lab1.start_servers()
    relay = lab1.start_daemon("relay", lab1.relay_ns, lab1.relay_config())
    relay.wait_ready()
    c = lab1.client_ns(1)
    first = lab1.start_daemon("r1623", c, lab1.client_config())
    first.wait_ready()
    mark = f"{InstanceIds('r1623').fwmark:#x}"
    rules_before = lab1.ip(c, "rule", "show")
    assert mark in rules_before
    second = lab1.start_daemon("r8000", c, lab1.client_config(), run="second")
    deadline = time.monotonic() + 15
    while second.running() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not second.running() and second.proc.returncode == 1, second.log_text()
    assert "would share its routing table and fwmark" in second.log_text()
    assert "running instance r1623" in second.log_text()
    # Nothing of the first was torn down: same rules, and its tunnel still works.
    assert lab1.ip(c, "rule", "show") == rules_before
    assert lab1.traffic(c, "udp", TARGET_V4, "5") == f"ok {EGRESS_V4} 5/5"
    lab1.forget(second)
    for d in lab1.daemons:
        assert d.stop() == 0
    assert lab1.leftovers(c) == []
