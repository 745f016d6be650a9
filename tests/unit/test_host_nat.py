"""NAT rule generation (pure) and backend choice."""

from __future__ import annotations

import ipaddress

import pytest

from masqued.host import nat
from masqued.host.naming import InstanceIds
from masqued.host.nat import (
    FakeNat,
    IptablesNat,
    NftablesNat,
    iptables_rules,
    make_nat,
    nft_delete_script,
    nft_ruleset,
)

IDS = InstanceIds("relay")
POOL = [ipaddress.ip_network("2001:db8:200::/64"), ipaddress.ip_network("198.18.200.0/24")]


def test_nft_ruleset_text() -> None:
    assert nft_ruleset(IDS.nft_table, POOL, "eth0") == (
        "table inet masqued_relay {}\n"
        "delete table inet masqued_relay\n"
        "table inet masqued_relay {\n"
        "\tchain postrouting {\n"
        "\t\ttype nat hook postrouting priority srcnat; policy accept;\n"
        '\t\tip saddr 198.18.200.0/24 oifname "eth0" masquerade\n'
        '\t\tip6 saddr 2001:db8:200::/64 oifname "eth0" masquerade\n'
        "\t}\n"
        "}\n"
    )


def test_nft_ruleset_empty_pool_keeps_empty_chain() -> None:
    script = nft_ruleset("masqued_x", [], "eth0")
    assert "masquerade" not in script
    assert "hook postrouting" in script


def test_nft_delete_script_tolerates_absence() -> None:
    assert nft_delete_script("masqued_x") == (
        "table inet masqued_x {}\ndelete table inet masqued_x\n"
    )


@pytest.mark.parametrize("bad", ["", "a" * 16, 'eth0"; flush ruleset', "eth 0", "a/b"])
def test_bad_egress_rejected(bad: str) -> None:
    with pytest.raises(ValueError):
        nft_ruleset("masqued_x", POOL, bad)
    with pytest.raises(ValueError):
        iptables_rules("MASQUED-x", "masqued:x", POOL, bad)


def test_iptables_rules_text() -> None:
    assert iptables_rules(IDS.ipt_chain, IDS.comment, POOL, "eth0") == [
        '-A POSTROUTING -m comment --comment "masqued:relay" -j MASQUED-relay',
        "-N MASQUED-relay",
        "-A MASQUED-relay -s 198.18.200.0/24 -o eth0 -j MASQUERADE",
        "-A MASQUED-relay -s 2001:db8:200::/64 -o eth0 -j MASQUERADE",
    ]


def test_make_nat(monkeypatch: pytest.MonkeyPatch) -> None:
    assert make_nat("off", IDS) is None
    assert isinstance(make_nat("nftables", IDS), NftablesNat)
    assert isinstance(make_nat("iptables", IDS), IptablesNat)
    monkeypatch.setattr(nat, "iptables_is_legacy", lambda: True)
    assert isinstance(make_nat("auto", IDS), IptablesNat)
    monkeypatch.setattr(nat, "iptables_is_legacy", lambda: False)
    assert isinstance(make_nat("auto", IDS), NftablesNat)
    with pytest.raises(ValueError, match="auto"):
        make_nat("pf", IDS)


def test_fake_nat_keeps_state() -> None:
    fake = FakeNat(IDS)
    fake.apply(POOL, "eth0")
    fake.apply(POOL, "eth0")
    assert "-o eth0 -j MASQUERADE" in fake.describe()
    fake.apply(POOL[:1], "eth1")
    assert fake.sources == (POOL[0],) and fake.egress == "eth1"
    fake.remove()
    assert fake.describe() == "# fake\n(none)"


def test_iptables_helper_reports_errors() -> None:
    # An unknown operation fails in the helper before libiptc is touched.
    with pytest.raises(nat.NatError, match="KeyError"):
        nat._ipt_call(4, "no-such-op")


def test_iptables_helper_is_one_process_for_both_families(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started: list[list[str]] = []
    real_run = nat.subprocess.run

    def run(cmd: list[str], **kw: object) -> object:
        started.append(cmd)
        return real_run(cmd, **kw)  # type: ignore[call-overload]

    monkeypatch.setattr(nat.subprocess, "run", run)
    with pytest.raises(nat.NatError, match=r"IPv4\) no-such-op: KeyError"):
        nat._ipt_run([(4, "no-such-op", {}), (6, "no-such-op", {})])
    assert len(started) == 1
    assert nat._ipt_run([]) == [] and len(started) == 1  # nothing to do: no process


def test_iptables_helper_forks_for_the_second_family(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import io
    import json
    import os

    # Each family must run in a process where no libxtables extension was loaded
    # before: the first in the helper itself, the next in a fork of it.
    monkeypatch.setitem(nat._OPS, "pid", lambda version: [str(os.getpid())])
    reqs = [{"version": v, "op": "pid", "args": {}} for v in (4, 6, 4)]
    monkeypatch.setattr(nat.sys, "stdin", io.StringIO(json.dumps(reqs)))
    assert nat._child_main() == 0
    replies = json.loads(capsys.readouterr().out)
    pids = [r["result"][0] for r in replies]
    assert pids[0] == pids[2] == str(os.getpid())
    assert pids[1] != pids[0]
