"""Issue 6 end to end: mTLS and token authentication, per-client ACLs, revocation on
reload, sticky addresses — real daemons in namespaces."""

from __future__ import annotations

import datetime as dt
import signal
import time
from pathlib import Path

import pytest

from masqued.gate import pki
from masqued.gate.auth import new_token
from tests.integration.lab import EGRESS_V4, TARGET_V4, Daemon, NamespaceLab

MB = 1024 * 1024


@pytest.fixture(scope="module")
def client_pki(pki_dir: Path) -> Path:
    """Client certificates signed by the lab CA, plus a foreign CA's."""
    now = dt.datetime.now(dt.UTC)
    for name in ("alice", "bob", "mallory"):
        if not (pki_dir / f"{name}.pem").exists():
            pki.issue(pki_dir, name, "client")
    if not (pki_dir / "old.pem").exists():
        pki.issue(
            pki_dir,
            "old",
            "client",
            not_before=now - dt.timedelta(days=10),
            not_after=now - dt.timedelta(days=1),
        )
    foreign = pki_dir / "foreign"
    if not foreign.exists():
        pki.init_ca(foreign)
        pki.issue(foreign, "alice", "client")
    return pki_dir


def cert_keys(d: Path, name: str) -> str:
    return f'certificate = "{d / name}.pem"\nprivate_key = "{d / name}.key"\n'


def refused(daemon: Daemon, status: int, timeout: float = 15, never_up: bool = True) -> None:
    """The client is refused with ``status`` (and, if ``never_up``, never became READY)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "refused the tunnel" in daemon.log_text() and str(status) in daemon.log_text():
            break
        time.sleep(0.1)
    assert f"{status}" in daemon.log_text(), daemon.log_text()[-2000:]
    if never_up:
        assert not daemon.notify.wait_for("READY=1", 0.1)


def test_mtls_good_missing_wrong_expired_revoked(lab3: NamespaceLab, client_pki: Path) -> None:
    d = client_pki
    lab3.start_servers()
    relay = lab3.start_daemon(
        "relay",
        lab3.relay_ns,
        lab3.relay_config(
            extra=(f'auth = "mtls"\nclient_ca = "{d / "ca.pem"}"\nrevoked = ["mallory"]\n')
        ),
    )
    relay.wait_ready()
    good = lab3.start_daemon(
        "c1", lab3.client_ns(1), lab3.client_config(extra=cert_keys(d, "alice"))
    )
    good.wait_ready()
    assert lab3.traffic(lab3.client_ns(1), "udp", TARGET_V4, "5") == f"ok {EGRESS_V4} 5/5"

    cases = [
        ("", 401),
        (cert_keys(d / "foreign", "alice"), 403),
        (cert_keys(d, "old"), 403),
        (cert_keys(d, "mallory"), 403),
    ]
    for i, (extra, status) in enumerate(cases):
        bad = lab3.start_daemon(
            "c2", lab3.client_ns(2), lab3.client_config(extra=extra), run=f"bad{i}"
        )
        refused(bad, status)
        # no tunnel: nothing of c2 reaches the target
        assert lab3.ping(lab3.client_ns(2), TARGET_V4, count=1).returncode != 0
        bad.stop()
        lab3.daemons.remove(bad)
    log = relay.log_text()
    for words in ("no credentials", "not trusted", "expired", "revoked"):
        assert words in log, words
    # the good client was never disturbed
    assert lab3.traffic(lab3.client_ns(1), "tcp", TARGET_V4, str(MB)).startswith("ok")


def test_tokens_acls_revocation_and_sticky_addresses(lab3: NamespaceLab, client_pki: Path) -> None:
    w = lab3.workdir
    alice_token, alice_line = new_token("alice")
    bob_token, bob_line = new_token("bob")
    (w / "tokens").write_text(f"{alice_line}\n{bob_line}\n")
    (w / "alice.token").write_text(alice_token + "\n")
    (w / "bob.token").write_text(bob_token + "\n")
    (w / "wrong.token").write_text("bob.not-the-secret\n")
    for f in ("tokens", "alice.token", "bob.token", "wrong.token"):
        (w / f).chmod(0o600)
    relay_extra = (
        f'auth = "token"\ntokens_file = "{w / "tokens"}"\nstate_dir = "{w / "state"}"\n'
        'acl_default = "deny"\n'
        "[clients.alice]\n"
        'acl = ["allow 198.19.0.2/32 tcp 8080"]\n'
        "[clients.bob]\n"
        'acl = ["allow 198.19.0.2/32 udp 5202", "allow 198.19.0.2/32 icmp"]\n'
    )
    lab3.start_servers()
    relay = lab3.start_daemon(
        "relay", lab3.relay_ns, lab3.relay_config(pool=("198.18.200.0/24",), extra=relay_extra)
    )
    relay.wait_ready()
    routes = ("198.19.0.0/24",)
    alice = lab3.start_daemon(
        "c1",
        lab3.client_ns(1),
        lab3.client_config(routes=routes, extra=f'token_file = "{w / "alice.token"}"\n'),
    )
    bob = lab3.start_daemon(
        "c2",
        lab3.client_ns(2),
        lab3.client_config(routes=routes, extra=f'token_file = "{w / "bob.token"}"\n'),
    )
    wrong = lab3.start_daemon(
        "c3",
        lab3.client_ns(3),
        lab3.client_config(routes=routes, extra=f'token_file = "{w / "wrong.token"}"\n'),
    )
    alice.wait_ready()
    bob.wait_ready()
    refused(wrong, 403)
    a_ns, b_ns = lab3.client_ns(1), lab3.client_ns(2)

    # alice: only TCP 8080 on the target
    assert lab3.traffic(a_ns, "tcp", TARGET_V4, str(MB), "--port", "8080").startswith("ok")
    res = lab3.run(
        a_ns,
        *traffic_cmd("tcp", TARGET_V4, "1000", "--port", "8081", "--timeout", "5"),
        check=False,
    )
    assert res.returncode != 0 and "No route to host" in res.stderr + res.stdout, res
    ping = lab3.run(a_ns, "ping", "-c", "1", "-W", "2", TARGET_V4, check=False)
    assert ping.returncode != 0
    assert "Packet filtered" in ping.stdout or "Prohibited" in ping.stdout, ping.stdout
    res = lab3.run(a_ns, *traffic_cmd("udp", TARGET_V4, "1", "--timeout", "3"), check=False)
    assert res.returncode != 0
    # bob: UDP and ICMP, no TCP
    assert lab3.traffic(b_ns, "udp", TARGET_V4, "5") == f"ok {EGRESS_V4} 5/5"
    assert lab3.ping(b_ns, TARGET_V4, count=2).returncode == 0
    res = lab3.run(
        b_ns,
        *traffic_cmd("tcp", TARGET_V4, "1000", "--port", "8080", "--timeout", "5"),
        check=False,
    )
    assert res.returncode != 0
    assert "acl" in relay.log_text().lower()

    # alice reconnects (client restart): same address
    addr_before = tunnel_addr(lab3, a_ns, "c1")
    alice.stop()
    lab3.daemons.remove(alice)
    alice = lab3.start_daemon(
        "c1",
        a_ns,
        lab3.client_config(routes=routes, extra=f'token_file = "{w / "alice.token"}"\n'),
        run="again",
    )
    alice.wait_ready()
    assert tunnel_addr(lab3, a_ns, "c1") == addr_before

    # revoke bob's token and reload: bob's session closes, alice's stays, same relay process
    relay_pid = relay.proc.pid
    (w / "tokens").write_text(alice_line + "\n")
    relay.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "no longer authorized" not in relay.log_text():
        time.sleep(0.2)
    assert "no longer authorized" in relay.log_text()
    assert relay.proc.poll() is None and relay.proc.pid == relay_pid
    assert lab3.traffic(a_ns, "tcp", TARGET_V4, str(MB), "--port", "8080").startswith("ok")
    refused(bob, 403, timeout=20, never_up=False)

    # relay restart: alice still gets her address back from the lease file, even though
    # a new client (bob, re-admitted) connects first and would otherwise take the lowest.
    (w / "tokens").write_text(f"{alice_line}\n{bob_line}\n")
    for dmn in list(lab3.daemons):
        if dmn.name in ("relay", "c2", "c3"):
            dmn.stop()
            lab3.daemons.remove(dmn)
    alice.stop()
    lab3.daemons.remove(alice)
    relay = lab3.start_daemon(
        "relay",
        lab3.relay_ns,
        lab3.relay_config(pool=("198.18.200.0/24",), extra=relay_extra),
        run="restart",
    )
    relay.wait_ready()
    bob = lab3.start_daemon(
        "c2",
        b_ns,
        lab3.client_config(routes=routes, extra=f'token_file = "{w / "bob.token"}"\n'),
        run="restart",
    )
    bob.wait_ready()
    alice = lab3.start_daemon(
        "c1",
        a_ns,
        lab3.client_config(routes=routes, extra=f'token_file = "{w / "alice.token"}"\n'),
        run="restart",
    )
    alice.wait_ready()
    assert tunnel_addr(lab3, a_ns, "c1") == addr_before
    assert tunnel_addr(lab3, b_ns, "c2") != addr_before
    for dmn in lab3.daemons:
        assert dmn.stop() == 0


def traffic_cmd(*args: str) -> list[str]:
    import sys

    from tests.integration.lab import REPO

    return [sys.executable, str(REPO / "tests" / "integration" / "traffic.py"), *args]


def tunnel_addr(lab: NamespaceLab, ns: str, name: str) -> str:
    out = lab.ip(ns, "-4", "-o", "addr", "show", "dev", f"mq-{name}")
    return out.split()[3]
