"""CONNECT-IP over HTTP/2 end to end (issue 19): real daemons in namespaces whose
client network drops UDP to the relay (nftables in the client's namespace).

``http_version = "auto"`` must bring the tunnel up over HTTP/2 within 5 s, carry
ping, TCP (10 MB, SHA-256), UDP and IPv6, refuse with the same status codes as over
HTTP/3, enforce ACLs, show h2 in `masqued status`; and a client whose UDP is cut in
the middle of a session must move to HTTP/2 with a running TCP flow surviving (the
relay gives the identity the same address), and back to HTTP/3 once UDP returns.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from masqued.gate.auth import new_token
from tests.integration.lab import (
    EGRESS_V4,
    EGRESS_V6,
    REPO,
    TARGET_V4,
    TARGET_V6,
    NamespaceLab,
)
from tests.integration.test_auth import cert_keys, client_pki, refused, tunnel_addr  # noqa: F401

MB = 1024 * 1024
TRAFFIC = str(REPO / "tests" / "integration" / "traffic.py")
pytestmark = pytest.mark.namespace_only(reason="nftables in the client's namespace")


def status_json(lab: NamespaceLab, ns: str, name: str) -> dict:  # type: ignore[type-arg]
    res = lab.masqued(ns, "status", name, "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)  # type: ignore[no-any-return]


def wait_for(what: str, cond, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout}s: {what}")


def test_udp_blocked_auto_comes_up_over_h2(lab1: NamespaceLab) -> None:
    lab = lab1
    c = lab.client_ns(1)
    lab.start_servers()
    relay = lab.start_daemon("relay", lab.relay_ns, lab.relay_config())
    relay.wait_ready()
    lab.block_udp(1)
    began = time.monotonic()
    client = lab.start_daemon("c1", c, lab.client_config())
    client.wait_ready(timeout=10)
    up_after = time.monotonic() - began
    # The daemon's own start-up is in this figure; the fallback waits 2 s of it.
    assert up_after < 5.0, f"tunnel up over HTTP/2 after {up_after:.1f}s"
    assert lab.udp_blocked_count(1) > 0  # QUIC was tried, and dropped
    log = client.log_text()
    assert "no QUIC handshake within 2.0s" in log and "over HTTP/2" in log, log[-2000:]
    # systemd's STATUS= says it too.
    assert client.notify.wait_for("READY=1", 0.1)
    assert any(
        "STATUS=client: connected" in m and "over HTTP/2" in m for m in client.notify.messages
    )

    res = lab.ping(c, TARGET_V4, count=5)
    assert res.returncode == 0 and " 0% packet loss" in res.stdout, res.stdout
    assert lab.ping(c, TARGET_V6, count=3).returncode == 0
    # A 1280-byte IPv6 packet (the minimum MTU) in one DATAGRAM capsule.
    res = lab.run(c, "ping", "-6", "-c", "2", "-s", "1232", "-M", "do", TARGET_V6, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    out = lab.traffic(c, "tcp", TARGET_V4, str(10 * MB))
    assert out.split()[:2] == ["ok", EGRESS_V4], out
    print(f"[h2] TCP 10 MB over HTTP/2: {out.split()[2]} Mbit/s")
    out = lab.traffic(c, "tcp", TARGET_V6, str(10 * MB))
    assert out.split()[:2] == ["ok", EGRESS_V6], out
    assert lab.traffic(c, "udp", TARGET_V4, "20") == f"ok {EGRESS_V4} 20/20"
    assert lab.traffic(c, "udp", TARGET_V6, "20") == f"ok {EGRESS_V6} 20/20"

    # Both sides say HTTP/2, and the client says why.
    text = lab.masqued(c, "status", "c1").stdout
    assert "over h2" in text and "fallback to HTTP/2" in text, text
    doc = status_json(lab, c, "c1")
    assert doc["sessions"][0]["http"] == "h2"
    assert "no QUIC handshake" in doc["sessions"][0]["http_reason"]
    rdoc = status_json(lab, lab.relay_ns, "relay")
    assert [s["http"] for s in rdoc["sessions"]] == ["h2"]
    assert rdoc["listen_tcp"] == "0.0.0.0:4433"
    rtext = lab.masqued(lab.relay_ns, "status", "relay").stdout
    assert "(udp, tcp)" in rtext and "by HTTP version: h2 1" in rtext, rtext
    assert "tcp: rtt" in rtext, rtext

    codes = [d.stop() for d in lab.daemons]
    assert codes == [0, 0], [d.log_text()[-2000:] for d in lab.daemons]
    for ns in (lab.relay_ns, c):
        assert lab.leftovers(ns) == [], ns


def test_auth_refusals_and_acls_over_h2(lab3: NamespaceLab, client_pki: Path) -> None:  # noqa: F811
    """mTLS and tokens over HTTP/2: 401 and 403 as over HTTP/3 (a certificate from a
    foreign CA is refused by TLS itself, see README), and per-client ACLs."""
    lab, d, w = lab3, client_pki, lab3.workdir
    alice_token, alice_line = new_token("alice")
    _, bob_line = new_token("bob")
    (w / "tokens").write_text(f"{alice_line}\n{bob_line}\n")
    (w / "alice.token").write_text(alice_token + "\n")
    (w / "wrong.token").write_text("bob.not-the-secret\n")
    for f in ("tokens", "alice.token", "wrong.token"):
        (w / f).chmod(0o600)
    relay_extra = (
        f'auth = ["mtls", "token"]\nclient_ca = "{d / "ca.pem"}"\nrevoked = ["mallory"]\n'
        f'tokens_file = "{w / "tokens"}"\n'
        'acl_default = "allow"\n'
        "[clients.alice]\n"
        'acl = ["allow 198.19.0.2/32 tcp 8080", "deny 198.19.0.0/16"]\n'
    )
    lab.start_servers()
    relay = lab.start_daemon("relay", lab.relay_ns, lab.relay_config(extra=relay_extra))
    relay.wait_ready()
    for i in (1, 2, 3):
        lab.block_udp(i)
    routes = ("198.19.0.0/24",)
    alice = lab.start_daemon(
        "c1",
        lab.client_ns(1),
        lab.client_config(routes=routes, extra=f'token_file = "{w / "alice.token"}"\n'),
    )
    good = lab.start_daemon(
        "c2", lab.client_ns(2), lab.client_config(routes=routes, extra=cert_keys(d, "bob"))
    )
    alice.wait_ready()
    good.wait_ready()
    assert status_json(lab, lab.client_ns(1), "c1")["sessions"][0]["http"] == "h2"
    a_ns = lab.client_ns(1)
    # alice's ACL: TCP 8080 on the target, nothing else there (ICMP prohibited back).
    assert lab.traffic(a_ns, "tcp", TARGET_V4, str(MB), "--port", "8080").startswith("ok")
    res = lab.run(
        a_ns,
        sys.executable,
        TRAFFIC,
        "tcp",
        TARGET_V4,
        "1000",
        "--port",
        "8081",
        "--timeout",
        "5",
        check=False,
    )
    assert res.returncode != 0 and "No route to host" in res.stderr + res.stdout, res
    ping = lab.run(a_ns, "ping", "-c", "1", "-W", "2", TARGET_V4, check=False)
    assert "Packet filtered" in ping.stdout or "Prohibited" in ping.stdout, ping.stdout
    # bob (mTLS over HTTP/2, default allow): everything.
    assert lab.traffic(lab.client_ns(2), "udp", TARGET_V4, "5") == f"ok {EGRESS_V4} 5/5"

    cases = [
        ("", 401),
        (f'token_file = "{w / "wrong.token"}"\n', 403),
        (cert_keys(d, "old"), 403),  # expired
        (cert_keys(d, "mallory"), 403),  # revoked
    ]
    for i, (extra, status) in enumerate(cases):
        bad = lab.start_daemon(
            "c3", lab.client_ns(3), lab.client_config(routes=routes, extra=extra), run=f"h2bad{i}"
        )
        refused(bad, status)
        assert "over HTTP/2" not in bad.log_text() or "tunnel up" not in bad.log_text()
        bad.stop()
        lab.daemons.remove(bad)
    # A foreign CA's certificate: the relay's TLS refuses it (unknown CA), counted as
    # an authentication failure.
    foreign = lab.start_daemon(
        "c3",
        lab.client_ns(3),
        lab.client_config(routes=routes, extra=cert_keys(d / "foreign", "alice")),
        run="h2foreign",
    )
    wait_for("a TLS refusal", lambda: "unknown ca" in foreign.log_text().lower())
    assert not foreign.notify.wait_for("READY=1", 0.1)
    foreign.stop()
    lab.daemons.remove(foreign)
    log = relay.log_text()
    assert "client certificate refused in the TLS handshake" in log
    for words in ("no credentials", "invalid token", "expired", "revoked"):
        assert words in log, words
    results = status_json(lab, lab.relay_ns, "relay")["results"]
    assert results.get("auth_failed", 0) >= 4, results
    # alice and bob were never disturbed
    assert lab.traffic(a_ns, "tcp", TARGET_V4, str(MB), "--port", "8080").startswith("ok")
    for dmn in lab.daemons:
        assert dmn.stop() == 0


def test_udp_cut_mid_session_moves_to_h2_and_back_with_a_flow_alive(
    lab1: NamespaceLab,
) -> None:
    lab, w = lab1, lab1.workdir
    c = lab.client_ns(1)
    token, line = new_token("alice")
    (w / "tokens").write_text(line + "\n")
    (w / "alice.token").write_text(token + "\n")
    for f in ("tokens", "alice.token"):
        (w / f).chmod(0o600)
    lab.start_servers()
    relay = lab.start_daemon(
        "relay",
        lab.relay_ns,
        lab.relay_config(
            extra=f'auth = "token"\ntokens_file = "{w / "tokens"}"\nstate_dir = "{w / "st"}"\n'
        ),
    )
    relay.wait_ready()
    client = lab.start_daemon(
        "c1",
        c,
        lab.client_config(extra=f'token_file = "{w / "alice.token"}"\nh3_retry = 3\n'),
    )
    client.wait_ready()
    assert status_json(lab, c, "c1")["sessions"][0]["http"] == "h3"
    addr = tunnel_addr(lab, c, "c1")
    # A flow of 30 s at 256 KiB/s across both moves.
    flow = lab.spawn(
        c,
        sys.executable,
        TRAFFIC,
        "tcp",
        TARGET_V4,
        str(30 * 256 * 1024),
        "--rate",
        str(256 * 1024),
        "--timeout",
        "120",
        log=w / "flow.out",
    )
    time.sleep(3)
    lab.block_udp(1)
    wait_for(
        "the tunnel on HTTP/2",
        lambda: status_json(lab, c, "c1")["sessions"][0]["http"] == "h2",
        timeout=20,
    )
    assert tunnel_addr(lab, c, "c1") == addr
    time.sleep(5)  # the flow runs over HTTP/2 for a while
    lab.unblock_udp(1)
    wait_for(
        "the tunnel back on HTTP/3",
        lambda: status_json(lab, c, "c1")["sessions"][0]["http"] == "h3",
        timeout=20,
    )
    assert tunnel_addr(lab, c, "c1") == addr
    assert flow.wait(timeout=120) == 0, (w / "flow.out").read_text()
    out = (w / "flow.out").read_text().split()
    assert out[:2] == ["ok", EGRESS_V4], out
    log = client.log_text()
    assert "fallback to HTTP/2" in log and "back on HTTP/3" in log, log[-3000:]
    doc = status_json(lab, c, "c1")
    assert doc["sessions"][0]["http_reason"] == "back on HTTP/3: a probe got a tunnel over it"
    sessions = status_json(lab, lab.relay_ns, "relay")["sessions"]
    assert [(s["http"], s["identity"]) for s in sessions] == [("h3", "alice")]
    assert lab.ping(c, TARGET_V4, count=3).returncode == 0
    for dmn in lab.daemons:
        assert dmn.stop() == 0
    for ns in (lab.relay_ns, c):
        assert lab.leftovers(ns) == [], ns
