"""Issue 14: a full-tunnel client with the relay given by name resolves it outside the
tunnel when it reconnects (its queries carry the instance's fwmark), so a relay that
was down is found again. The lab's nameserver is only reachable by the client's
default route, which the full tunnel captures."""

from __future__ import annotations

import contextlib
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.lab import (
    EGRESS_V4,
    RELAY_V4,
    TARGET_V4,
    NamespaceLab,
    client_addr_v4,
)

DNS_V4 = "198.18.53.53"  # in the relay namespace, not on the clients' link


@pytest.fixture
def resolv(lab1: NamespaceLab) -> Iterator[Path]:
    """/etc/netns/NS/resolv.conf: what `ip netns exec NS` shows as /etc/resolv.conf
    (the machine's own resolv.conf is not touched)."""
    d = Path("/etc/netns") / lab1.client_ns(1)
    d.mkdir(parents=True)
    try:
        (d / "resolv.conf").write_text(f"nameserver {DNS_V4}\noptions timeout:1 attempts:1\n")
        yield d / "resolv.conf"
    finally:
        shutil.rmtree(d, ignore_errors=True)
        with contextlib.suppress(OSError):
            Path("/etc/netns").rmdir()  # only if empty (ours was the last)


def test_full_tunnel_reconnects_to_a_relay_given_by_name(lab1: NamespaceLab, resolv: Path) -> None:
    r, c = lab1.relay_ns, lab1.client_ns(1)
    lab1.ip(r, "addr", "add", f"{DNS_V4}/32", "dev", "lo")
    lab1.ip(c, "route", "add", "default", "via", RELAY_V4)
    log = lab1.workdir / "dns.log"
    lab1.spawn(
        r, *lab1.helper_cmd(r, "dnsserver.py", DNS_V4, "relay.example", RELAY_V4), log=log
    )
    deadline = time.monotonic() + 10
    while "listening" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    lab1.start_servers()
    relay = lab1.start_daemon("relay", r, lab1.relay_config())
    relay.wait_ready()
    client = lab1.start_daemon(
        "c1", c, lab1.client_config(relay="relay.example:4433", routes=("0.0.0.0/0", "::/0"))
    )
    client.wait_ready()
    assert lab1.traffic(c, "udp", TARGET_V4, "3") == f"ok {EGRESS_V4} 3/3"
    # Unmarked traffic to the nameserver goes into the tunnel now.
    assert "dev mq-c1" in lab1.ip(c, "route", "get", DNS_V4)

    assert relay.stop(signal.SIGKILL) == -signal.SIGKILL
    lab1.forget(relay)
    seen = log.read_text().count("\n")
    time.sleep(2)  # the client notices and asks for the relay's address again
    restarted = lab1.start_daemon("relay", r, lab1.relay_config(), run="2")
    restarted.wait_ready()
    lab1.wait_ping(c, TARGET_V4, timeout=25)
    assert lab1.traffic(c, "udp", TARGET_V4, "3") == f"ok {EGRESS_V4} 3/3"
    after = log.read_text().splitlines()[seen:]
    asked = [line for line in after if line.startswith("query relay.example.")]
    # Asked again, from the client's own address (by the main table), never from
    # its tunnel address into the dead tunnel.
    assert asked, log.read_text()
    assert all(line.endswith(f"from {client_addr_v4(1)}") for line in asked), asked
    assert "tunnel up" in client.log_text()
    for d in lab1.daemons:
        assert d.stop() == 0
