"""masqued.doctor: what each check concludes from a given host state (no root needed)."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import socket
from pathlib import Path

import pytest
from cryptography import x509

from masqued import doctor
from masqued.doctor import (
    Finding,
    check_certificate_dates,
    check_forwarding,
    check_nat,
    check_net_admin,
    check_nft_ruleset,
    check_probe,
    check_relay_certificate,
    check_route_loop,
    check_tun_device,
    probe_relay,
)
from masqued.gate import pki
from masqued.host.naming import InstanceIds
from masqued.host.nat import FakeNat, ipt_missing, iptables_rules, nft_missing, nft_ruleset
from tests.inproc import Relay

IDS = InstanceIds("relay")
POOL = (ipaddress.ip_network("198.18.200.0/24"), ipaddress.ip_network("2001:db8:200::/64"))
NOW = dt.datetime.now(dt.UTC)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The tests' "now" must be when these certificates are made, not when the module
    # was imported: collection can happen minutes earlier (in CI the integration tests
    # run first), past the 5-minute clock-skew allowance of issued certificates.
    global NOW
    NOW = dt.datetime.now(dt.UTC)
    d = tmp_path_factory.mktemp("pki")
    pki.init_ca(d)
    pki.issue(d, "relay.example", "relay", sans=["198.18.1.1"])
    pki.issue(
        d,
        "old.example",
        "relay",
        not_before=NOW - dt.timedelta(days=30),
        not_after=NOW - dt.timedelta(days=1),
    )
    pki.issue(d, "soon.example", "relay", days=3)
    other = d / "other"
    pki.init_ca(other, name="some other CA")
    return d


def cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificates(path.read_bytes())[0]


def levels(findings: list[Finding]) -> list[str]:
    return [f.level for f in findings]


def test_tun_device(tmp_path: Path) -> None:
    missing = check_tun_device(tmp_path / "tun")
    assert missing.level == "fail" and "does not exist" in missing.message
    assert missing.fix is not None and "modprobe tun" in missing.fix
    (tmp_path / "file").touch()
    assert "not a character device" in check_tun_device(tmp_path / "file").message


def test_net_admin() -> None:
    assert check_net_admin("Name:\tx\nCapEff:\t000001ffffffffff\n").level == "ok"
    nope = check_net_admin("CapEff:\t0000000000000000\n")
    assert nope.level == "fail" and "CAP_NET_ADMIN" in nope.message
    assert check_net_admin("").level == "fail"


def test_forwarding() -> None:
    assert levels(check_forwarding({"net.ipv4.conf.mq-relay.forwarding": True})) == ["ok"]
    found = check_forwarding(
        {
            "net.ipv4.conf.mq-relay.forwarding": False,
            "net.ipv4.conf.eth0.forwarding": True,
            "net.ipv6.conf.all.forwarding": False,
        }
    )
    assert levels(found) == ["fail", "fail"]
    assert found[0].fix is not None
    assert found[0].fix.startswith("sysctl -w net.ipv4.conf.mq-relay.forwarding=1")


def nft_listing(pool: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> str:
    """What ``nft list table`` prints for the table nft_ruleset() creates."""
    script = nft_ruleset(IDS.nft_table, pool, "eth0").splitlines()
    body = script[2:]  # without the create/delete preamble
    return "\n".join(body)


def nft_check(listing: str, egress: str = "eth0") -> list[Finding]:
    missing = nft_missing(listing, IDS.nft_table, POOL, egress)
    return check_nat("nftables", missing, IDS, POOL, egress)


def test_nat_listing_nftables() -> None:
    assert levels(nft_check(nft_listing(POOL))) == ["ok"]
    gone = nft_check("")
    assert levels(gone) == ["fail"] and "table inet masqued_relay is missing" in gone[0].message
    assert gone[0].fix is not None and "systemctl restart masqued@relay" in gone[0].fix
    partial = nft_check(nft_listing(POOL[:1]))
    assert levels(partial) == ["fail"] and "2001:db8:200::/64" in partial[0].message
    assert levels(nft_check(nft_listing(POOL), egress="eth1")) == ["fail", "fail"]


def test_nat_listing_iptables() -> None:
    by_family = {
        v: iptables_rules(IDS.ipt_chain, IDS.comment, [n for n in POOL if n.version == v], "eth0")
        for v in (4, 6)
    }
    ok_missing = ipt_missing(by_family, IDS.ipt_chain, IDS.comment, POOL, "eth0")
    assert levels(check_nat("iptables", ok_missing, IDS, POOL, "eth0")) == ["ok"]
    no_jump = {v: [r for r in rules if "POSTROUTING" not in r] for v, rules in by_family.items()}
    found = check_nat(
        "iptables",
        ipt_missing(no_jump, IDS.ipt_chain, IDS.comment, POOL, "eth0"),
        IDS,
        POOL,
        "eth0",
    )
    assert [f.message for f in found] == [f"no jump from POSTROUTING to {IDS.ipt_chain}"] * 2
    # No IPv6 nat table at all: all of the v6 rules are missing, the v4 ones are not.
    v4_only = ipt_missing({4: by_family[4]}, IDS.ipt_chain, IDS.comment, POOL, "eth0")
    assert v4_only and all(":" in r or "POSTROUTING" in r or r.startswith("-N") for r in v4_only)


def test_fake_nat_missing_follows_its_state() -> None:
    nat = FakeNat(IDS)
    assert len(nat.missing(POOL, "eth0")) == 2 + len(POOL)
    nat.apply(POOL, "eth0")
    assert nat.missing(POOL, "eth0") == []
    assert nat.missing(POOL, "eth1") != []
    nat.remove()
    assert nat.missing(POOL[:1], "eth0") != []


def test_nft_ruleset_shadowing_and_forward_drop() -> None:
    ruleset = {
        "nftables": [
            {"metainfo": {"version": "1.0.6"}},
            {
                "chain": {
                    "family": "inet",
                    "table": "masqued_relay",
                    "name": "postrouting",
                    "type": "nat",
                    "hook": "postrouting",
                    "prio": 100,
                }
            },
            {
                "chain": {
                    "family": "ip",
                    "table": "nat",
                    "name": "POSTROUTING",
                    "type": "nat",
                    "hook": "postrouting",
                    "prio": 50,
                }
            },
            {
                "rule": {
                    "family": "ip",
                    "table": "nat",
                    "chain": "POSTROUTING",
                    "expr": [{"snat": {"addr": "198.19.0.9"}}],
                }
            },
            {
                "chain": {
                    "family": "inet",
                    "table": "filter",
                    "name": "forward",
                    "type": "filter",
                    "hook": "forward",
                    "prio": 0,
                    "policy": "drop",
                }
            },
        ]
    }
    found = check_nft_ruleset(ruleset, IDS, IDS.tun)
    assert [(f.check, f.level) for f in found] == [("firewall", "warn"), ("nat", "warn")]
    assert "ip nat chain POSTROUTING (priority 50)" in found[1].message
    assert found[0].fix is not None and 'iifname "mq-relay" accept' in found[0].fix
    # A forward chain that already lets our TUN through is fine.
    ruleset["nftables"].append(
        {
            "rule": {
                "family": "inet",
                "table": "filter",
                "chain": "forward",
                "expr": [{"match": {"right": "mq-relay"}}, {"accept": None}],
            }
        }
    )
    assert [f.check for f in check_nft_ruleset(ruleset, IDS, IDS.tun)] == ["nat"]
    assert check_nft_ruleset({"nftables": []}, IDS, IDS.tun) == []
    # With workers: every worker's TUN needs its rule; the one without is named.
    found = check_nft_ruleset(ruleset, IDS, [IDS.tun, IDS.worker_tun(1)])
    assert [f.check for f in found] == ["firewall", "nat"]
    assert found[0].message.endswith(f"has no rule for {IDS.worker_tun(1)}")
    assert found[0].fix is not None and f'iifname "{IDS.worker_tun(1)}" accept' in found[0].fix


def test_certificate_dates(certs: Path) -> None:
    assert check_certificate_dates(cert(certs / "relay.example.pem"), NOW, "c").level == "ok"
    expired = check_certificate_dates(cert(certs / "old.example.pem"), NOW, "c")
    assert expired.level == "fail" and "expired on" in expired.message
    assert expired.fix is not None and "masqued pki relay" in expired.fix
    assert check_certificate_dates(cert(certs / "soon.example.pem"), NOW, "c").level == "warn"
    early = check_certificate_dates(
        cert(certs / "relay.example.pem"), NOW - dt.timedelta(days=9), "c"
    )
    assert early.level == "fail" and "not valid before" in early.message


def test_relay_certificate(certs: Path) -> None:
    ca = [cert(certs / "ca.pem")]
    chain = [cert(certs / "relay.example.pem")]
    assert levels(check_relay_certificate(chain, ca, "relay.example", NOW)) == ["ok", "ok"]
    assert levels(check_relay_certificate(chain, ca, "198.18.1.1", NOW)) == ["ok", "ok"]
    (mismatch,) = check_relay_certificate(chain, ca, "vpn.example", NOW)
    assert mismatch.level == "fail" and "not vpn.example" in mismatch.message
    assert "relay.example" in mismatch.message
    wrong_ca = [cert(certs / "other" / "ca.pem")]
    (bad,) = check_relay_certificate(chain, wrong_ca, "relay.example", NOW, "other/ca.pem")
    assert bad.level == "fail" and "does not verify against other/ca.pem" in bad.message
    assert bad.fix is not None and "masqued CA" in bad.fix
    (old,) = check_relay_certificate([cert(certs / "old.example.pem")], ca, "old.example", NOW)
    assert "expired" in old.message


def test_name_matching_with_wildcards(tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    pki.issue(tmp_path, "wild", "relay", sans=["*.vpn.example"])
    c = cert(tmp_path / "wild.pem")
    assert doctor.name_matches(c, "a.vpn.example")
    assert not doctor.name_matches(c, "a.b.vpn.example")
    assert not doctor.name_matches(c, "vpn.example")


def test_route_loop_from_the_kernels_decision() -> None:
    """The route the tunnel socket's packets take to the relay, decided by the rules a
    full-tunnel client installs (FakeNetlink models rule lookup and suppression)."""
    import ipaddress

    from masqued.host.naming import InstanceIds
    from masqued.host.routes import FakeNetlink, Route, Router, Rule, client_state, route_get

    ids = InstanceIds("c1")
    nl = FakeNetlink()
    for link in ("lo", "eth0", ids.tun):
        nl.add_link(link)
    nl.seed_route(Route(ipaddress.ip_network("198.18.1.0/24"), "eth0"), proto=2)
    nl.seed_route(
        Route(ipaddress.ip_network("0.0.0.0/0"), "eth0", via=ipaddress.ip_address("198.18.1.254"))
    )
    nl.seed_rule(Rule(4, 32766, 254))
    relay = ipaddress.ip_address("198.18.9.9")  # reached through the default route
    addresses = [ipaddress.ip_interface("198.18.200.7/32")]
    full = [ipaddress.ip_network("0.0.0.0/0")]
    Router(nl, ids).set(client_state(ids, full, addresses, ids.fwmark))
    marked = route_get(relay, nl, mark=ids.fwmark)[0]
    assert check_route_loop(marked, ids.tun, str(relay)).level == "ok"  # outside the tunnel
    unmarked = route_get(relay, nl)[0]
    assert unmarked == ids.tun  # everything else does go in
    loop = check_route_loop(unmarked, ids.tun, str(relay))
    assert loop.level == "fail" and "routing loop" in loop.message
    assert check_route_loop(None, ids.tun, str(relay)).level == "warn"


def test_probe_findings() -> None:
    refused = check_probe(doctor.ProbeResult(False, "nothing listens", refused=True), "h", 443)
    assert refused.level == "fail" and "relay down" in refused.message
    silent = check_probe(doctor.ProbeResult(False, "no QUIC answer within 3s"), "h", 443)
    assert "UDP blocked" in silent.message
    assert silent.fix is not None and "UDP 443" in silent.fix
    assert check_probe(doctor.ProbeResult(True, rtt_ms=1.0), "h", 443).level == "ok"


def test_probe_of_a_closed_port_is_refused() -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: ICMP port unreachable
    result = probe_relay("127.0.0.1", port, "relay.example", fwmark=0, timeout=2)
    assert not result.reached and result.refused


async def test_probe_of_a_live_relay_fetches_its_chain(certs: Path) -> None:
    relay = Relay(certs, ("198.18.200.0/24",))
    try:
        result = await asyncio.to_thread(
            probe_relay, "127.0.0.1", relay.port, "relay.example", 0, 5.0
        )
    finally:
        relay.close()
    assert result.reached and result.error is None and result.chain
    assert result.chain[0] == cert(certs / "relay.example.pem")


def test_bad_config_fails_and_render(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MASQUED_RUN_DIR", str(tmp_path / "run"))
    conf = tmp_path / "x.conf"
    conf.write_text('mode = "relay"\npool = ["198.18.200.0/33"]\n')
    findings = doctor.run_checks(conf, "x")
    config = [f for f in findings if f.check == "config"]
    assert config and all(f.level == "fail" for f in config)
    daemon = next(f for f in findings if f.check == "daemon")
    assert daemon.level == "warn" and "not running" in daemon.message
    text = doctor.render(findings, "masqued doctor x")
    assert "FAIL  config:" in text and "fix: edit" in text and "problem(s)" in text
    assert doctor.main(conf, "x") == 1


def test_http2_probe_findings() -> None:
    quic_ok = doctor.ProbeResult(True, rtt_ms=1.0)
    quic_silent = doctor.ProbeResult(False, "no QUIC answer within 3s")
    h2_ok = doctor.ProbeResult(True, rtt_ms=2.0)
    h2_down = doctor.ProbeResult(False, "nothing listens on TCP 443", refused=True)
    assert doctor.check_probe_h2(h2_ok, quic_ok, "h", 443).level == "ok"
    fallback = doctor.check_probe_h2(h2_ok, quic_silent, "h", 443)
    assert fallback.level == "warn" and "runs over HTTP/2" in fallback.message
    assert doctor.check_probe_h2(h2_down, quic_ok, "h", 443).level == "warn"
    both = doctor.check_probe_h2(h2_down, quic_silent, "h", 443)
    assert both.level == "fail" and both.fix is not None and "listen_tcp" in both.fix


async def test_http2_probe_of_a_live_relay(certs: Path) -> None:
    relay = Relay(certs, ("198.18.200.0/24",))
    try:
        result = await asyncio.to_thread(
            doctor.probe_relay_h2, "127.0.0.1", relay.port, "relay.example", 0, 5.0
        )
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        closed.close()
        refused = await asyncio.to_thread(
            doctor.probe_relay_h2, "127.0.0.1", port, "relay.example", 0, 2.0
        )
    finally:
        relay.close()
    assert result.reached and result.error is None and result.rtt_ms is not None
    assert not refused.reached and refused.refused
