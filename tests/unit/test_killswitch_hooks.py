"""The kill switch's nftables transaction (masqued.host.killswitch) and the hooks
(masqued.runtime.hooks), without touching the host's firewall."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from masqued.host.killswitch import KillSwitch, KillSwitchRules, chain_policy
from masqued.host.naming import InstanceIds
from masqued.runtime import hooks

RULES = KillSwitchRules(
    tun="mq-c1",
    fwmark=0x4D1234,
    udp_port=443,
    tcp_port=8443,
    allow=(ipaddress.ip_network("198.18.1.0/24"), ipaddress.ip_network("2001:db8:1::/64")),
)


def test_the_ruleset_drops_all_but_the_tunnel_the_relay_and_the_allowed() -> None:
    script = RULES.script("masqued_c1")
    lines = [line.strip() for line in script.splitlines()]
    # One transaction that replaces the table (delete succeeds when it is absent).
    assert lines[:3] == [
        "table inet masqued_c1 {}",
        "delete table inet masqued_c1",
        "table inet masqued_c1 {",
    ]
    out = lines[
        lines.index("chain killswitch_out {") + 1 : lines.index(
            "}", lines.index("chain killswitch_out {")
        )
    ]
    assert out == [
        "type filter hook output priority filter; policy drop;",
        'oifname "lo" accept',
        'oifname "mq-c1" accept',
        "meta mark 0x4d1234 udp dport 443 accept",
        "meta mark 0x4d1234 tcp dport 8443 accept",
        "meta mark 0x4d1234 udp dport 53 accept",
        "meta mark 0x4d1234 tcp dport 53 accept",
        "udp sport 68 udp dport 67 accept",
        "udp sport 546 udp dport 547 accept",
        "icmpv6 type { nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert } accept",
        "ip daddr { 198.18.1.0/24 } accept",
        "ip6 daddr { 2001:db8:1::/64 } accept",
        'counter drop comment "masqued kill switch"',
    ]
    assert "type filter hook forward priority filter; policy drop;" in lines
    h3_only = KillSwitchRules("mq-c1", 7, 443, None).script("t")
    assert "tcp dport 443" not in h3_only and "ip daddr" not in h3_only
    with pytest.raises(ValueError):
        KillSwitchRules("mq-c1", 0, 443, None).script("t")
    with pytest.raises(ValueError):
        KillSwitchRules('x" accept', 7, 443, None).script("t")


def test_apply_remove_and_describe_through_nft() -> None:
    calls: list[tuple[list[str], str | None]] = []
    listing = json.dumps({"nftables": [{"chain": {"name": "killswitch_out", "policy": "drop"}}]})

    def nft(cmd: Sequence[str], stdin: str | None) -> subprocess.CompletedProcess[str]:
        calls.append((list(cmd), stdin))
        return subprocess.CompletedProcess(list(cmd), 0, listing if "-j" in cmd else "", "")

    ks = KillSwitch(InstanceIds("c1"), nft)
    ks.apply(RULES)
    assert calls[0] == (["nft", "-f", "-"], RULES.script("masqued_c1"))
    doc = ks.describe()
    assert doc == {
        "enabled": True,
        "installed": True,
        "table": "inet masqued_c1",
        "allow": ["198.18.1.0/24", "2001:db8:1::/64"],
        "relay_ports": ["udp/443", "tcp/8443"],
    }
    ks.remove()
    assert calls[-1][1] == "table inet masqued_c1 {}\ndelete table inet masqued_c1\n"
    assert ks.describe()["enabled"] is False
    assert chain_policy("not json") is None


def test_hook_expansion() -> None:
    assert (
        hooks.expand("ip link set %i up; echo 100%%", "mq-c1") == "ip link set mq-c1 up; echo 100%"
    )
    assert hooks.expand("%x %", "t") == "%x %"


def test_hooks_run_in_order_log_output_and_stop_at_a_failure(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trace = tmp_path / "trace"
    caplog.set_level(logging.INFO, "masqued")
    ok = asyncio.run(
        hooks.run(
            "post_up", (f"echo one %i >> {trace}; echo said it", f"echo two >> {trace}"), "mq-x", 10
        )
    )
    assert ok and trace.read_text() == "one mq-x\ntwo\n"
    assert "post_up: said it" in caplog.text and f"[#] echo one mq-x >> {trace}" in caplog.text
    failed = asyncio.run(hooks.run("pre_up", ("exit 4", f"echo never >> {trace}"), "mq-x", 10))
    assert not failed and "exit status 4" in caplog.text
    assert "never" not in trace.read_text()


def test_a_hook_that_hangs_is_killed_at_the_timeout(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "masqued")
    assert not asyncio.run(hooks.run_one("pre_down", "sleep 30", "mq-x", 0.3))
    assert "did not finish within 0.3 s" in caplog.text


def test_hooks_do_not_get_the_daemons_notify_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    out = tmp_path / "env"
    assert asyncio.run(hooks.run_one("post_up", f"env > {out}", "mq-x", 10))
    env = out.read_text()
    assert "NOTIFY_SOCKET" not in env
    assert "MASQUED_TUN=mq-x" in env and "MASQUED_HOOK=post_up" in env
