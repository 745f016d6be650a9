"""The relay under attack, for real: a relay daemon and a legitimate client in the
namespace lab, hostile peers (tests/abuse/attack.py) in another client namespace.

Every attack must leave the relay's peak memory under RSS_BOUND above what it had
before the first attack, the legitimate client's traffic flowing, and nothing
escaping to the relay's batch loop (no traceback, no ``internal_error``).
``MASQUED_ABUSE_SCALE`` multiplies every count (CI runs the default, 1; ``make
abuse`` runs 10).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from masqued.gate.auth import new_token
from masqued.transport.limits import ReceiveLimits
from tests.abuse import attack
from tests.integration.lab import (
    PYTHON,
    QUIC_ENGINE,
    RELAY_V4,
    REPO,
    TARGET_V4,
    Daemon,
    NamespaceLab,
    client_addr_v4,
    lab,
)

SCALE = float(os.environ.get("MASQUED_ABUSE_SCALE", "1"))
MIB = 1024 * 1024
# What every attack together may add to the relay's peak RSS (VmHWM). Without the
# limits, one gap-flooding connection alone made it hold 128 MiB in four round trips.
RSS_BOUND = 64 * MIB
# Forged source addresses of the Initial flood: routed from the relay back towards the
# attacker's namespace, which holds none of them and drops what comes back.
SPOOF_NET = "198.18.64.0/18"
RELAY = f"{RELAY_V4}:4433"
# MASQUED_QUIC_ENGINE=qh3 attacks a qh3 relay: the same bounds must hold. qh3 cannot
# ask for client certificates, so that relay takes tokens only.
QH3 = QUIC_ENGINE == "qh3"
# The credit a connection gets before its CONNECT is admitted: aioquic's connection
# window; qh3's core has one window for the connection's life (limits.py).
PRE_ADMISSION_CREDIT = ReceiveLimits().qh3_window if QH3 else ReceiveLimits().connection_window


def n(count: float) -> int:
    return max(1, int(count * SCALE))


def proc_status(pid: int, field: str) -> int:
    """A /proc/PID/status field in bytes (VmRSS, VmHWM)."""
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    assert match, text
    return int(match.group(1)) * 1024


def settled_cpu(pid: int, timeout: float = 30) -> float:
    """The process's CPU time once it has caught up with its input (under 20 ms of
    CPU in 0.2 s), after at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last = cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = cpu_seconds(pid)
        if now - last < 0.02:
            return now
        last = now
    return last


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Abuse:
    lab: NamespaceLab
    relay: Daemon
    client: Daemon
    mallory_token: str
    baseline_hwm: int

    @property
    def attacker_ns(self) -> str:
        return self.lab.client_ns(2)

    def attack(self, *args: str, timeout: float = 120) -> dict[str, Any]:
        res = subprocess.run(
            ["ip", "netns", "exec", self.attacker_ns, PYTHON, "-m", "tests.abuse.attack", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        return json.loads(res.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]

    def status(self) -> dict[str, Any]:
        res = self.lab.masqued(self.lab.relay_ns, "status", "relay", "--json")
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)  # type: ignore[no-any-return]

    def start_ping(self, count: int) -> subprocess.Popen[bytes]:
        log = self.lab.workdir / f"ping-{time.monotonic_ns()}.log"
        proc = self.lab.spawn(
            self.lab.client_ns(1),
            "ping",
            "-c",
            str(count),
            "-i",
            "0.05",
            "-W",
            "1",
            TARGET_V4,
            log=log,
        )
        proc.log = log  # type: ignore[attr-defined]
        return proc

    def ping_received(self, proc: subprocess.Popen[bytes]) -> tuple[int, int]:
        proc.wait(timeout=120)
        text = proc.log.read_text()  # type: ignore[attr-defined]
        match = re.search(r"(\d+) packets transmitted, (\d+) received", text)
        assert match, text
        return int(match.group(1)), int(match.group(2))

    def wait_result(self, key: str, at_least: int, timeout: float = 30) -> int:
        """Wait until the relay's ``results`` counter ``key`` reaches ``at_least``."""
        deadline = time.monotonic() + timeout
        while True:
            got = int(self.status()["results"].get(key, 0))
            if got >= at_least or time.monotonic() > deadline:
                return got
            time.sleep(0.5)

    def check(self) -> None:
        """The relay's bounds held and it stayed healthy."""
        growth = proc_status(self.relay.proc.pid, "VmHWM") - self.baseline_hwm
        print(f"[abuse] relay peak RSS {self.baseline_hwm / MIB:.1f} MiB + {growth / MIB:.1f} MiB")
        assert growth <= RSS_BOUND, f"relay peak RSS grew by {growth / MIB:.1f} MiB"
        results = self.status().get("results", {})
        assert "internal_error" not in results, results
        assert "Traceback" not in self.relay.log_text()
        assert self.relay.running()
        assert self.lab.ping(self.lab.client_ns(1), TARGET_V4, count=3).returncode == 0


@pytest.fixture(scope="module")
def abuse(pki_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Abuse]:
    w = tmp_path_factory.mktemp("abuse")
    alice_token, alice_line = new_token("alice")
    mallory_token, mallory_line = new_token("mallory")
    (w / "tokens").write_text(f"{alice_line}\n{mallory_line}\n")
    (w / "alice.token").write_text(alice_token + "\n")
    for f in ("tokens", "alice.token"):
        (w / f).chmod(0o600)
    with lab(w, pki_dir, clients=3) as the_lab:
        the_lab.start_servers()
        relay = the_lab.start_daemon(
            "relay",
            the_lab.relay_ns,
            the_lab.relay_config(
                extra=(
                    (
                        'quic_engine = "qh3"\nauth = ["token"]\n'
                        if QH3
                        else 'auth = ["mtls", "token"]\n'
                    )
                    + f'client_ca = "{pki_dir / "ca.pem"}"\n'
                    f'tokens_file = "{w / "tokens"}"\n'
                    f'state_dir = "{w / "state"}"\n'
                )
            ),
        )
        relay.wait_ready()
        the_lab.ip(the_lab.relay_ns, "route", "add", SPOOF_NET, "via", client_addr_v4(2))
        client = the_lab.start_daemon(
            "c1",
            the_lab.client_ns(1),
            the_lab.client_config(extra=f'token_file = "{w / "alice.token"}"\n'),
        )
        client.wait_ready()
        baseline = proc_status(relay.proc.pid, "VmHWM")
        yield Abuse(the_lab, relay, client, mallory_token, baseline)
        # The legitimate client kept its one tunnel through everything.
        assert "tunnel down" not in client.log_text()


# Connections one address may have waiting for a handshake or a CONNECT
# (EndpointLimits.max_pending_per_address); more are dropped at their first Initial.
PER_ADDRESS = 32


def test_stream_gap_flood(abuse: Abuse) -> None:
    conns = n(16)
    timeouts = abuse.status()["results"].get("admission_timeout", 0)
    ping = abuse.start_ping(40)
    out = abuse.attack("gap", "--relay", RELAY, "--connections", str(conns), "--rounds", "8")
    sent, received = abuse.ping_received(ping)
    # Never more credit than the pre-admission window per connection.
    assert out["claimed"] <= conns * PRE_ADMISSION_CREDIT
    assert received >= sent * 0.9
    # Held open without a CONNECT, the attacker's connections end at the admission
    # timeout (10 s), which frees the address's pending slots for the next test.
    want = timeouts + min(conns, PER_ADDRESS)
    assert abuse.wait_result("admission_timeout", want) >= want
    abuse.check()


def test_many_streams(abuse: Abuse) -> None:
    conns = n(16)
    out = abuse.attack("streams", "--relay", RELAY, "--connections", str(conns), "--streams", "200")
    assert out["closed"] == [0x4] * conns  # STREAM_LIMIT_ERROR
    abuse.check()


def test_incomplete_headers(abuse: Abuse) -> None:
    conns = n(16)
    timeouts = abuse.status()["results"].get("admission_timeout", 0)
    abuse.attack("headers", "--relay", RELAY, "--connections", str(conns), "--bytes", "1000000")
    # Headers that never end are no CONNECT: the admission timeout closes them.
    want = timeouts + min(conns, PER_ADDRESS)
    assert abuse.wait_result("admission_timeout", want) >= want
    abuse.check()


def test_client_hello_claiming_16_mib(abuse: Abuse) -> None:
    before = abuse.status()["results"].get("limit_exceeded", 0)
    abuse.attack("hello", "--relay", RELAY, "--connections", str(n(8)), "--bytes", "1000000")
    assert abuse.status()["results"].get("limit_exceeded", 0) >= before + n(8)
    abuse.check()


def test_spoofed_initial_flood(abuse: Abuse) -> None:
    """Initials with forged sources: past the Retry threshold each costs a Retry, not
    a handshake, and a new legitimate client still gets in (through the Retry)."""
    count = n(2000)
    pid = abuse.relay.proc.pid
    before = abuse.status()["results"]
    cpu = cpu_seconds(pid)
    ping = abuse.start_ping(40)
    abuse.attack("flood", "--relay", RELAY, "--count", str(count), "--spoof-net", SPOOF_NET)
    spent = settled_cpu(pid) - cpu
    after = abuse.status()["results"]
    validated = after.get("address_validation", 0) - before.get("address_validation", 0)
    # At most retry_threshold (64) handshakes were started; the rest were asked to prove
    # their address.
    assert validated >= count - 64 - 8
    print(f"[abuse] {count} spoofed Initials: relay CPU {spent / count * 1e6:.0f} us each")
    # 3 ms of CPU per Initial before (a full handshake each): now a Retry each.
    assert spent / count < 0.001, f"{spent / count * 1e3:.2f} ms CPU per Initial"
    newcomer = abuse.lab.start_daemon(
        "c3",
        abuse.lab.client_ns(3),
        abuse.lab.client_config(extra=f'token_file = "{abuse.lab.workdir / "alice.token"}"\n'),
    )
    newcomer.stop()  # it would replace alice's session; starting is what counts here
    sent, received = abuse.ping_received(ping)
    assert received >= sent * 0.9
    abuse.check()


@pytest.mark.skipif(QH3, reason="a qh3 relay takes no client certificates (auth = token)")
def test_malformed_client_certificate(abuse: Abuse) -> None:
    cert = attack.malformed_eku_certificate(abuse.lab.workdir)
    mallory = abuse.lab.start_daemon(
        "c3",
        abuse.lab.client_ns(3),
        abuse.lab.client_config(
            extra=f'certificate = "{cert}"\nprivate_key = "{cert.with_suffix(".key")}"\n'
        ),
        run="mallory",
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and "403" not in mallory.log_text():
        time.sleep(0.1)
    mallory.stop(signal.SIGTERM)
    assert "refused the tunnel" in mallory.log_text() and "403" in mallory.log_text()
    assert "malformed client certificate" in abuse.relay.log_text()
    abuse.check()


def test_fuzzed_capsules_from_an_authenticated_client(abuse: Abuse) -> None:
    cases = n(60)
    out = abuse.attack(
        "capsules", "--relay", RELAY, "--token", abuse.mallory_token, "--count", str(cases)
    )
    assert out["tunnels"] == cases and out["refused"] == 0
    assert out["aborted"] > 0
    abuse.check()


def test_malformed_http2_frames(abuse: Abuse) -> None:
    """Malformed frames and garbage after a valid HTTP/2 preface: each connection is
    closed with a GOAWAY (its RFC 9113 error code), counted, nothing else disturbed."""
    count = n(40)
    before = abuse.status()["results"].get("h2_protocol_error", 0)
    ping = abuse.start_ping(40)
    out = abuse.attack("h2frames", "--relay", RELAY, "--count", str(count))
    answers = out["answers"]
    assert sum(answers.values()) == count
    # Every malformed frame gets a GOAWAY with an error code (never NO_ERROR).
    fixed = {k: v for k, v in answers.items() if k.startswith("fixed:")}
    assert sum(fixed.values()) == (count + 1) // 2, answers
    assert all(k.startswith("fixed:goaway_") and k != "fixed:goaway_0" for k in fixed), answers
    # Garbage gets one too, or is ignored as unknown frames (RFC 9113 §5.5) until
    # the admission timeout's GOAWAY NO_ERROR.
    after = abuse.status()["results"].get("h2_protocol_error", 0)
    assert after - before >= sum(fixed.values())
    sent, received = abuse.ping_received(ping)
    assert received >= sent * 0.9
    abuse.check()


def test_tls_handshakes_that_never_finish(abuse: Abuse) -> None:
    """Half a ClientHello, then silence: every such connection is closed after the
    handshake timeout (10 s), counted."""
    conns = min(n(20), 30)  # below the 32 pending per address, or some are refused
    before = abuse.status()["results"].get("tls_handshake_timeout", 0)
    out = abuse.attack("tlsstall", "--relay", RELAY, "--connections", str(conns), "--seconds", "14")
    assert out["closed_by_relay"] == conns, out
    after = abuse.status()["results"].get("tls_handshake_timeout", 0)
    assert after - before == conns
    abuse.check()


def test_too_many_tcp_connections_from_one_address(abuse: Abuse) -> None:
    """One address opening many TCP connections: past 32 waiting for a handshake the
    relay refuses the rest at once; other addresses still get in over HTTP/2."""
    conns = n(120)
    before = abuse.status()["results"].get("tcp_refused", 0)
    proc = abuse.lab.spawn(
        abuse.attacker_ns,
        PYTHON,
        "-m",
        "tests.abuse.attack",
        "tcpflood",
        "--relay",
        RELAY,
        "--connections",
        str(conns),
        "--seconds",
        "6",
        log=abuse.lab.workdir / "tcpflood.out",
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if abuse.status()["results"].get("tcp_refused", 0) - before >= conns - 32:
            break
        time.sleep(0.2)
    # Meanwhile a client from another address comes up over HTTP/2 (its own identity:
    # it must not replace alice's tunnel).
    token = abuse.lab.workdir / "mallory.token"
    token.write_text(abuse.mallory_token + "\n")
    token.chmod(0o600)
    newcomer = abuse.lab.start_daemon(
        "c3",
        abuse.lab.client_ns(3),
        abuse.lab.client_config(extra=f'token_file = "{token}"\nhttp_version = "h2"\n'),
        run="h2newcomer",
    )
    newcomer.wait_ready(timeout=20)
    newcomer.stop()
    assert proc.wait(timeout=60) == 0
    out = json.loads((abuse.lab.workdir / "tcpflood.out").read_text().strip().splitlines()[-1])
    assert out["opened"] == conns
    assert out["refused"] >= conns - 32, out
    after = abuse.status()["results"].get("tcp_refused", 0)
    assert after - before >= conns - 32
    abuse.check()


def test_soak_eight_clients_started_at_once(
    pki_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """8 clients start at once, each must pass traffic within 5 s; then all are killed
    (their connections live on in the relay) and the same identities start again at
    once, replacing those sessions: 20 rounds."""
    w = tmp_path_factory.mktemp("soak")
    names = [f"c{i}" for i in range(1, 9)]
    lines = []
    for name in names:
        token, line = new_token(name)
        lines.append(line)
        (w / f"{name}.token").write_text(token + "\n")
    (w / "tokens").write_text("\n".join(lines) + "\n")
    rounds = max(2, int(20 * min(SCALE, 1.0)))
    with lab(w, pki_dir, clients=8) as the_lab:
        the_lab.start_servers()
        relay = the_lab.start_daemon(
            "relay",
            the_lab.relay_ns,
            the_lab.relay_config(
                extra=f'auth = "token"\ntokens_file = "{w / "tokens"}"\n'
                f'state_dir = "{w / "state"}"\n'
            ),
        )
        relay.wait_ready()
        for r in range(rounds):
            began = time.monotonic()
            daemons = [
                the_lab.start_daemon(
                    name,
                    the_lab.client_ns(i),
                    the_lab.client_config(extra=f'token_file = "{w / name}.token"\n'),
                    run=f"r{r}",
                )
                for i, name in enumerate(names, 1)
            ]
            for i, d in enumerate(daemons, 1):
                left = began + 5.0 - time.monotonic()
                ok = left > 0 and _ping_within(the_lab, the_lab.client_ns(i), left)
                assert ok, f"round {r}: {d.name} passed no traffic within 5 s\n{d.log_text()}"
            for d in daemons:
                d.stop(signal.SIGKILL)
                the_lab.forget(d)
        res = the_lab.masqued(the_lab.relay_ns, "status", "relay", "--json")
        results = json.loads(res.stdout).get("results", {})
        assert "internal_error" not in results
        assert "Traceback" not in relay.log_text()
        assert results.get("accepted", 0) >= 8 * rounds


def _ping_within(the_lab: NamespaceLab, ns: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if the_lab.run(ns, "ping", "-c", "1", "-W", "1", TARGET_V4, check=False).returncode == 0:
            return True
        time.sleep(0.05)
    return False
