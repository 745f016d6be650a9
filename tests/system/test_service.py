"""masqued.deb and masqued@.service in booted Debian containers, as an operator uses them.

    mq-<t>-c1 [client container] --- mq-<t>-relay [relay container] --- mq-<t>-target
                                                                        (servers.py)

The tests run in order against one pair of containers (one boot each), with the
operator's commands as the README gives them (``apt install ./masqued.deb``,
``systemctl start masqued@relay``, ``journalctl -u masqued``, ``systemctl stop
masqued``): install the previous build, start, traffic, the umbrella unit's journal,
journal fields, a missing and a broken config, reload, a broken reload, the watchdog,
the security exposure, upgrade to the new build, the iptables NAT backend, stop
(nothing left behind, sysctls restored), apt remove and purge.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.lab import (
    EGRESS_V4,
    RELAY_V4,
    TARGET_NET_V4,
    TARGET_NET_V6,
    TARGET_V4,
    TARGET_V6,
    NamespaceLab,
    client_addr_v4,
)
from tests.system.machine import Container, ensure_rootfs

REPO = Path(__file__).resolve().parents[2]
UPSTREAM = re.search(r'^version = "(.+)"$', (REPO / "pyproject.toml").read_text(), re.M).group(1)  # type: ignore[union-attr]
OLD_VERSION = UPSTREAM
NEW_VERSION = f"{UPSTREAM}+systest1"
DEBS = "/mnt/debs"
EXAMPLES = "/usr/share/doc/masqued/examples"
# How long the watchdog test lets the stopped daemon hang: > WatchdogSec below.
TEST_WATCHDOG_SEC = 3

TCP_PROBE = """
import hashlib, os, socket, struct, sys
data = os.urandom(200_000)
s = socket.create_connection((sys.argv[1], 5201), timeout=20)
s.sendall(struct.pack("!Q", len(data)) + data)
reply = b""
while not reply.endswith(b"\\n"):
    chunk = s.recv(4096)
    if not chunk:
        break
    reply += chunk
digest, peer = reply.decode().split()
assert digest == hashlib.sha256(data).hexdigest(), "sha mismatch"
print(peer)
"""


@dataclass
class Env:
    lab: NamespaceLab
    relay: Container
    client: Container
    old_deb: str
    new_deb: str
    timings: dict[str, float]


def _build(version: str, out: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["bash", str(REPO / "packaging" / "build-deb.sh"), "--version", version, "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_build(proc: subprocess.Popen[str]) -> Path:
    out, err = proc.communicate(timeout=1200)
    if proc.returncode != 0:
        raise AssertionError(f"build-deb.sh failed:\n{err[-4000:]}")
    return Path(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    timings: dict[str, float] = {}
    work = tmp_path_factory.mktemp("systest")
    debs = work / "debs"
    debs.mkdir()
    t0 = time.monotonic()
    # Two real builds (the previous and the new one) while the root fs is made.
    builds = [_build(OLD_VERSION, debs / "old"), _build(NEW_VERSION, debs / "new")]
    rootfs, timings["rootfs"] = ensure_rootfs()
    old_deb, new_deb = (_wait_build(b) for b in builds)
    timings["build"] = time.monotonic() - t0
    # MASQUED_LAB_TAG: namespaces mq-TAG-* of one's own when several runs share a host.
    tag = os.environ.get("MASQUED_LAB_TAG") or secrets.token_hex(2)
    the_lab = NamespaceLab(work / "lab", work / "pki", clients=1, tag=tag)
    binds = {debs: DEBS}
    tag = the_lab.tag
    relay = Container(f"mq-{tag}-relay", the_lab.relay_ns, rootfs, work / "relay.log", binds)
    client = Container(f"mq-{tag}-c1", the_lab.client_ns(1), rootfs, work / "c1.log", binds)
    try:
        the_lab.up()
        the_lab.start_servers()
        timings["boot_relay"] = relay.boot()
        timings["boot_client"] = client.boot()
        yield Env(
            the_lab,
            relay,
            client,
            f"{DEBS}/old/{old_deb.name}",
            f"{DEBS}/new/{new_deb.name}",
            timings,
        )
    finally:
        for c in (client, relay):
            c.shutdown()
        the_lab.down()
        print(f"\nsystem test timings (s): { {k: round(v, 1) for k, v in timings.items()} }")


def _apt_install(c: Container, deb: str) -> None:
    """The README's line, verbatim, in the directory of the build's masqued.deb (no
    input: a question from apt would fail the install)."""
    directory = deb.rsplit("/", 1)[0]
    res = c.run(
        "/bin/sh",
        "-c",
        f"cd {directory} && apt install ./masqued.deb",
        check=False,
        timeout=300,
        input="",
    )
    assert res.returncode == 0, f"apt install ./masqued.deb: {res.stdout}{res.stderr}"


def _active(c: Container, unit: str) -> bool:
    return c.run("systemctl", "is-active", unit, check=False).stdout.strip() == "active"


def _main_pid(c: Container, unit: str) -> int:
    return int(c.prop(unit, "MainPID"))


def _ping(c: Container, addr: str, timeout: float = 20) -> None:
    c.wait_for(
        f"ping {addr}",
        lambda: c.run("ping", "-c", "1", "-W", "1", addr, check=False).returncode == 0,
        timeout,
    )


def _tcp_peer(c: Container, addr: str) -> str:
    return c.run("python3.11", "-c", TCP_PROBE, addr, timeout=60).stdout.strip()


def _journal(c: Container, *args: str) -> list[dict[str, str]]:
    out = c.run("journalctl", "--no-pager", "-o", "json", *args).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def _start(c: Container, unit: str) -> None:
    res = c.run("systemctl", "start", unit, check=False, timeout=120)
    if res.returncode != 0:
        logs = c.run("journalctl", "--no-pager", "-u", unit, check=False).stdout
        raise AssertionError(f"systemctl start {unit} failed: {res.stderr}\n{logs[-4000:]}")


def _configure(env: Env) -> None:
    relay, client = env.relay, env.client
    # The operator's steps: a CA and relay certificate, then the shipped examples.
    relay.sh(
        "masqued pki init /etc/masque/pki >/dev/null\n"
        f"masqued pki relay /etc/masque/pki --name relay --san relay.example --san {RELAY_V4}"
        " >/dev/null\n"
        f"install -m 0600 {EXAMPLES}/relay.conf /etc/masque/relay.conf\n"
        # the example relay wants client certificates (auth = "mtls"): make one
        "masqued pki client /etc/masque/pki --name alice >/dev/null\n"
    )
    client.run("mkdir", "-p", "/etc/masque/pki")
    client.write("/etc/masque/pki/ca.pem", relay.read("/etc/masque/pki/ca.pem"), "0644")
    client.write("/etc/masque/pki/alice.pem", relay.read("/etc/masque/pki/alice.pem"), "0644")
    client.write("/etc/masque/pki/alice.key", relay.read("/etc/masque/pki/alice.key"), "0600")
    client.sh(
        f"install -m 0600 {EXAMPLES}/client.conf /etc/masque/client.conf\n"
        f'sed -i \'s/^relay = .*/relay = "{RELAY_V4}:443"/; '
        's/^# server_name = .*/server_name = "relay.example"/; '
        "s/^# certificate = /certificate = /; "
        "s/^# private_key = /private_key = /' /etc/masque/client.conf\n"
    )


def _set_routes(c: Container, routes: list[str]) -> None:
    listed = ", ".join(f'\\"{r}\\"' for r in routes)
    c.sh(f"sed -i 's|^routes = .*|routes = [{listed}]|' /etc/masque/client.conf")


# -- the tests, in order ------------------------------------------------------------------


def test_install_package(env: Env) -> None:
    for c in (env.relay, env.client):
        _apt_install(c, env.old_deb)
        assert c.run("masqued", "--version").stdout.strip() == f"masqued {OLD_VERSION}"
        assert c.run("dpkg-query", "-W", "-f", "${Version}", "masqued").stdout == OLD_VERSION
        for path in (f"{EXAMPLES}/relay.conf", f"{EXAMPLES}/client.conf", "/etc/masque/README"):
            assert c.run("test", "-f", path, check=False).returncode == 0, path
        assert c.run("test", "-L", "/usr/sbin/masqued").returncode == 0
        assert "masqued@.service" in c.run("systemctl", "list-unit-files", "masqued*").stdout
        for page in ("man5/masqued.conf.5.gz", "man8/masqued.8.gz"):
            assert c.run("test", "-f", f"/usr/share/man/{page}", check=False).returncode == 0
    _configure(env)
    for c, name in ((env.relay, "relay"), (env.client, "client")):
        res = c.run("masqued", "check", name)
        assert "warning" not in res.stderr, res.stderr  # no world-readable config warning
    # What start will switch on, to compare after the last stop.
    env.timings["_v6fwd_before"] = float(
        env.relay.run("sysctl", "-n", "net.ipv6.conf.all.forwarding").stdout
    )


def test_start_and_traffic(env: Env) -> None:
    relay, client = env.relay, env.client
    _start(relay, "masqued@relay")
    assert _active(relay, "masqued@relay")
    status = relay.prop("masqued@relay", "StatusText")
    assert status.startswith("relay: 0 clients, pool "), status
    _start(client, "masqued@client")  # Type=notify: returns once the tunnel is up
    assert _active(client, "masqued@client")
    status = client.prop("masqued@client", "StatusText")
    assert status.startswith(f"client: connected to {RELAY_V4}:443 as 198.18.200."), status
    _ping(client, TARGET_V4)
    # The target has no route back to the pool: the answer came through the relay's NAT.
    assert _tcp_peer(client, TARGET_V4) == EGRESS_V4
    relay.wait_for(
        "relay STATUS with 1 client",
        lambda: relay.prop("masqued@relay", "StatusText").startswith("relay: 1 clients"),
    )
    # The shipped example says workers = "auto": one relay process per CPU, all in the
    # unit's cgroup, each with its own TUN.
    cpus = int(relay.run("nproc").stdout)
    doc = json.loads(relay.run("masqued", "status", "relay", "--json").stdout)
    if cpus > 1:
        assert [w["state"] for w in doc["workers"]] == ["running"] * min(cpus, 64)
        for w in doc["workers"]:
            cgroup = relay.read(f"/proc/{w['pid']}/cgroup")
            assert cgroup.strip().endswith("/masqued@relay.service"), cgroup
        links = relay.run("ip", "-o", "link", "show").stdout
        assert all(f" {w['tun']}:" in links for w in doc["workers"])
    else:
        assert "workers" not in doc


def test_relay_serves_http2_too(env: Env) -> None:
    """masqued@relay listens on TCP 443 beside UDP 443 (one SO_REUSEPORT socket per
    worker, inside the hardened unit); a client set to HTTP/2 gets its tunnel there,
    and back on "auto" it is on HTTP/3 again."""
    relay, client = env.relay, env.client
    doc = json.loads(relay.run("masqued", "status", "relay", "--json").stdout)
    assert doc["listen_tcp"] == "0.0.0.0:443"
    sockets = relay.run("ss", "-Hltn", "sport", "= :443").stdout.splitlines()
    assert len(sockets) == max(1, len(doc.get("workers", []))), sockets

    def client_http() -> str | None:
        out = client.run("masqued", "status", "client", "--json", check=False).stdout
        if not out:
            return None
        session = json.loads(out)["sessions"][0]
        return session["http"] if session["state"] == "connected" else None

    conf = "/etc/masque/client.conf"
    client.sh(f"sed -i 's/^http_version = .*/http_version = \"h2\"/' {conf}")
    res = client.run("systemctl", "restart", "masqued@client", check=False, timeout=120)
    assert res.returncode == 0, res.stderr
    assert client_http() == "h2"
    _ping(client, TARGET_V4)
    assert _tcp_peer(client, TARGET_V4) == EGRESS_V4
    relay.wait_for(
        "an HTTP/2 session on the relay",
        lambda: [
            s["http"]
            for s in json.loads(relay.run("masqued", "status", "relay", "--json").stdout)[
                "sessions"
            ]
        ]
        == ["h2"],
    )
    client.sh(f"sed -i 's/^http_version = .*/http_version = \"auto\"/' {conf}")
    res = client.run("systemctl", "restart", "masqued@client", check=False, timeout=120)
    assert res.returncode == 0, res.stderr
    assert client_http() == "h3"
    _ping(client, TARGET_V4)


def test_dns_through_systemd_resolved_and_the_kill_switch(env: Env) -> None:
    """Inside the booted container systemd-resolved answers lookups (its stub in
    /etc/resolv.conf): the hardened unit sets the tunnel's resolver on the TUN over
    D-Bus, a name under dns_search is resolved through the tunnel by the resolver on
    the target, and stop takes it away again; /etc/resolv.conf itself is never
    written. The kill switch works under the unit too."""
    client, lab = env.client, env.lab
    conf = "/etc/masque/client.conf"
    active = client.run("systemctl", "is-active", "systemd-resolved", check=False).stdout
    assert active.strip() == "active"
    link_before = client.run("readlink", "/etc/resolv.conf").stdout.strip()
    assert link_before.endswith("stub-resolv.conf"), link_before
    log = lab.workdir / "dns.log"
    t = lab.target_ns
    server = lab.helper_cmd(t, "dnsserver.py", TARGET_V4, "www.corp.example", TARGET_V4)
    lab.spawn(t, *server, log=log)
    client.wait_for("dns server", lambda: log.exists() and "listening" in log.read_text())
    client.sh(
        f"cp {conf} {conf}.nodns\n"
        f"echo 'dns = [\"{TARGET_V4}\"]' >> {conf}\n"
        f"echo 'dns_search = [\"corp.example\"]' >> {conf}\n"
        f"echo 'kill_switch = true' >> {conf}\n"
    )
    res = client.run("systemctl", "restart", "masqued@client", check=False, timeout=120)
    assert res.returncode == 0, res.stderr
    tun = "mq-client"
    client.wait_for(
        "resolved has the tunnel's resolver",
        lambda: TARGET_V4 in client.run("resolvectl", "dns", tun, check=False).stdout,
    )
    assert "corp.example" in client.run("resolvectl", "domain", tun).stdout
    out = client.run("getent", "hosts", "www.corp.example", check=False, timeout=30).stdout
    assert TARGET_V4 in out, out
    assert any(f"from {EGRESS_V4}" in line for line in log.read_text().splitlines())
    doc = json.loads(client.run("masqued", "status", "client", "--json").stdout)
    assert doc["dns"]["state"] == "applied" and doc["dns"]["backend"] == "resolved"
    assert doc["dns"]["error"] is None
    assert doc["kill_switch"]["installed"] is True
    journal = client.run("journalctl", "--no-pager", "-u", "masqued@client").stdout
    assert f"[#] resolvectl dns {tun} {TARGET_V4}" in journal
    doctor = client.run("masqued", "doctor", "client", check=False, timeout=120).stdout
    assert re.search(r"dns.*198\.19\.0\.2 through resolved", doctor), doctor
    _ping(client, TARGET_V4)
    # Outside the tunnel nothing leaves (the relay host's own address, unmarked).
    assert client.run("ping", "-c", "1", "-W", "1", RELAY_V4, check=False).returncode != 0

    client.run("systemctl", "stop", "masqued@client", timeout=60)
    assert client.run("resolvectl", "dns", tun, check=False).returncode != 0  # link gone
    assert client.run("readlink", "/etc/resolv.conf").stdout.strip() == link_before
    assert client.leftovers() == []
    assert client.run("ping", "-c", "1", "-W", "2", RELAY_V4, check=False).returncode == 0
    client.sh(f"mv {conf}.nodns {conf}")
    _start(client, "masqued@client")
    _ping(client, TARGET_V4)


def test_one_journal_for_all_instances(env: Env) -> None:
    for c, name in _pairs(env):
        # The operator's line: every instance's log under the umbrella unit.
        log = c.run("journalctl", "--no-pager", "-u", "masqued").stdout
        if name == "relay":
            assert "relay relay listening on 0.0.0.0:443 (udp)" in log, log[-3000:]
        else:
            assert "tunnel up" in log, log[-3000:]
        assert _active(c, "masqued.service")  # started with the instance (Wants=)
        entries = _journal(c, "-u", "masqued", "MASQUED_INSTANCE=" + name)
        assert entries and all(e["_SYSTEMD_UNIT"] == f"masqued@{name}.service" for e in entries)
    # The sysctls start switched on are recorded for cleanup to put back.
    record = json.loads(env.relay.read("/run/masqued/relay/sysctl.json"))
    assert any(e["key"] == "net.ipv6.conf.all.forwarding" for e in record["sysctls"])


def test_journal_fields(env: Env) -> None:
    peer = client_addr_v4(1)
    # MASQUED_CLIENT is the authenticated identity (the certificate's CN): the filter
    # README and masqued(8) give, on the umbrella unit.
    entries = _journal(env.relay, "-u", "masqued", "MASQUED_CLIENT=alice")
    opened = [e for e in entries if "session opened" in e.get("MESSAGE", "")]
    assert opened, entries
    e = opened[-1]
    assert e["MASQUED_INSTANCE"] == "relay"
    assert e["MASQUED_ROLE"] == "relay"
    assert e["MASQUED_ADDRESS"].startswith("198.18.200.")
    assert e["MASQUED_PEER"] == peer
    # MASQUED_SESSION is the session's id in `masqued status`
    assert e["MASQUED_SESSION"].startswith(f"{peer}:")
    sessions = json.loads(env.relay.run("masqued", "status", "relay", "--json").stdout)
    assert e["MASQUED_SESSION"] in [s["id"] for s in sessions["sessions"]]
    by_session = _journal(env.relay, "-u", "masqued", f"MASQUED_SESSION={e['MASQUED_SESSION']}")
    assert any("session opened" in x.get("MESSAGE", "") for x in by_session)
    # the lease of the identity is kept in the unit's StateDirectory (sticky addresses),
    # by the relay worker that served it (MASQUED_WORKER, none for the main process)
    worker = int(e.get("MASQUED_WORKER", "0"))
    name = "leases.json" if worker == 0 else f"leases-w{worker}.json"
    leases = env.relay.read(f"/var/lib/masqued/relay/{name}")
    assert '"alice"' in leases and e["MASQUED_ADDRESS"].split(",")[0] in leases
    assert e["SYSLOG_IDENTIFIER"] == "masqued"
    client_entries = _journal(env.client, "-u", "masqued@client", "MASQUED_ROLE=client")
    assert client_entries and client_entries[0]["MASQUED_INSTANCE"] == "client"


def test_missing_or_invalid_config_fails_the_start(env: Env) -> None:
    relay = env.relay
    res = relay.run("systemctl", "start", "masqued@missing", check=False, timeout=60)
    assert res.returncode != 0  # not a silent skip
    log = relay.run("journalctl", "--no-pager", "-u", "masqued@missing").stdout
    assert "/etc/masque/missing.conf: no such file: instance missing has no config" in log, log
    relay.write("/etc/masque/broken.conf", 'mode = "relay"\npol = ["198.18.201.0/24"]\n')
    res = relay.run("systemctl", "start", "masqued@broken", check=False, timeout=60)
    assert res.returncode != 0
    log = relay.run("journalctl", "--no-pager", "-u", "masqued").stdout
    assert "/etc/masque/broken.conf: invalid key 'pol' (did you mean 'pool'?)" in log
    time.sleep(3)  # longer than RestartSec: an invalid config is not retried
    for unit in ("masqued@missing", "masqued@broken"):
        assert relay.prop(unit, "ActiveState") == "failed"
        assert relay.prop(unit, "NRestarts") == "0"
        assert relay.prop(unit, "ExecMainStatus") == "2"
        relay.run("systemctl", "reset-failed", unit)
    relay.run("rm", "/etc/masque/broken.conf")
    assert _active(relay, "masqued@relay")


def _sessions_opened(env: Env) -> int:
    entries = _journal(env.relay, "-u", "masqued@relay", f"MASQUED_PEER={client_addr_v4(1)}")
    return sum("session opened" in e.get("MESSAGE", "") for e in entries)


def test_reload_applies_routes_live(env: Env) -> None:
    client = env.client
    pid = _main_pid(client, "masqued@client")
    opened = _sessions_opened(env)
    assert client.run("ping", "-6", "-c", "1", "-W", "1", TARGET_V6, check=False).returncode != 0
    _set_routes(client, [TARGET_NET_V4, TARGET_NET_V6])
    res = client.run("systemctl", "reload", "masqued@client", check=False)
    assert res.returncode == 0, res.stderr
    assert _main_pid(client, "masqued@client") == pid
    routes = client.run("ip", "-6", "route", "show", "table", "all", "proto", "109").stdout
    assert TARGET_NET_V6 in routes
    _ping(client, TARGET_V6)
    _ping(client, TARGET_V4)
    assert _sessions_opened(env) == opened  # the session was kept
    assert _active(client, "masqued@client")


def test_reload_rejects_broken_config(env: Env) -> None:
    client = env.client
    pid = _main_pid(client, "masqued@client")
    good = client.read("/etc/masque/client.conf")
    client.write("/etc/masque/client.conf", good + 'routes_typo = ["198.19.9.0/24"]\n')
    res = client.run("systemctl", "reload", "masqued@client", check=False)
    assert res.returncode != 0
    logs = client.run("journalctl", "--no-pager", "-u", "masqued@client").stdout
    assert "reload rejected" in logs and "routes_typo" in logs
    assert _active(client, "masqued@client")
    assert _main_pid(client, "masqued@client") == pid
    _ping(client, TARGET_V4)
    client.write("/etc/masque/client.conf", good)


def test_watchdog_restarts_a_stuck_daemon(env: Env) -> None:
    client = env.client
    client.run("mkdir", "-p", "/etc/systemd/system/masqued@client.service.d")
    client.write(
        "/etc/systemd/system/masqued@client.service.d/watchdog.conf",
        f"[Service]\nWatchdogSec={TEST_WATCHDOG_SEC}s\nRestartSec=1s\n",
        "0644",
    )
    client.run("systemctl", "daemon-reload")
    client.run("systemctl", "restart", "masqued@client", timeout=120)
    assert client.prop("masqued@client", "WatchdogUSec") == f"{TEST_WATCHDOG_SEC}s"
    _ping(client, TARGET_V4)
    pid = _main_pid(client, "masqued@client")
    restarts = int(client.prop("masqued@client", "NRestarts"))
    # The test hook: freeze the whole process, event loop included, for > WatchdogSec.
    client.run("kill", "-STOP", str(pid))
    client.wait_for(
        "a new main process after the watchdog fired",
        lambda: (
            _active(client, "masqued@client")
            and _main_pid(client, "masqued@client") not in (0, pid)
        ),
        timeout=TEST_WATCHDOG_SEC * 3 + 30,
    )
    assert int(client.prop("masqued@client", "NRestarts")) == restarts + 1
    logs = client.run("journalctl", "--no-pager", "-u", "masqued@client").stdout
    assert "Watchdog timeout" in logs
    _ping(client, TARGET_V4, timeout=30)


def test_security_exposure(env: Env) -> None:
    res = env.relay.run("systemd-analyze", "security", "--no-pager", "masqued@relay.service")
    m = re.search(r"Overall exposure level for \S+: ([\d.]+) (\w+)", res.stdout)
    assert m, res.stdout
    score = float(m.group(1))
    print(f"\nsystemd-analyze security masqued@relay.service: {score} {m.group(2)}")
    print(res.stdout, file=sys.stderr)
    assert score <= 3.0, res.stdout


def test_upgrade_restarts_running_instances(env: Env) -> None:
    before = {c.name: _main_pid(c, f"masqued@{u}") for c, u in _pairs(env)}
    for c, unit in _pairs(env):
        _apt_install(c, env.new_deb)
        assert c.run("masqued", "--version").stdout.strip() == f"masqued {NEW_VERSION}"
        assert _active(c, f"masqued@{unit}")
        assert _main_pid(c, f"masqued@{unit}") not in (0, before[c.name])
    _ping(env.client, TARGET_V4, timeout=30)
    assert _tcp_peer(env.client, TARGET_V4) == EGRESS_V4


def test_iptables_backend_under_the_unit(env: Env) -> None:
    relay = env.relay
    relay.sh("sed -i 's/^nat = .*/nat = \"iptables\"/' /etc/masque/relay.conf")
    relay.run("systemctl", "restart", "masqued@relay", timeout=120)
    chain = relay.run("iptables-legacy", "-t", "nat", "-S", "MASQUED-relay").stdout
    assert "MASQUERADE" in chain
    assert "masqued" not in relay.run("nft", "list", "tables").stdout
    _ping(env.client, TARGET_V4, timeout=30)
    assert _tcp_peer(env.client, TARGET_V4) == EGRESS_V4


def test_stop_leaves_nothing(env: Env) -> None:
    for c, unit in _pairs(env):
        assert _active(c, f"masqued@{unit}")
        # The operator's line: stops every instance (they are PartOf=masqued.service).
        c.run("systemctl", "stop", "masqued", timeout=60)
        assert not _active(c, f"masqued@{unit}")
        assert not _active(c, "masqued.service")
        assert c.leftovers() == []
        assert c.run("ls", "/run/masqued").stdout.strip() == ""
    # cleanup (ExecStopPost) put back what start switched on
    after = float(env.relay.run("sysctl", "-n", "net.ipv6.conf.all.forwarding").stdout)
    assert after == env.timings["_v6fwd_before"]


def test_remove_stops_instances_and_keeps_config(env: Env) -> None:
    for c, unit in _pairs(env):
        _start(c, f"masqued@{unit}")
    _ping(env.client, TARGET_V4, timeout=30)
    for c, unit in _pairs(env):
        c.run("apt-get", "remove", "-y", "-q", "masqued", timeout=300)
        assert c.run("systemctl", "is-active", f"masqued@{unit}", check=False).stdout.strip() in (
            "inactive",
            "failed",
        )
        assert c.run("test", "-f", f"/etc/masque/{unit}.conf", check=False).returncode == 0
        assert c.leftovers() == []


def test_purge_removes_state_and_keeps_config(env: Env) -> None:
    relay = env.relay
    assert relay.run("test", "-d", "/var/lib/masqued/relay", check=False).returncode == 0
    relay.run("apt-get", "purge", "-y", "-q", "masqued", timeout=300)
    assert relay.run("test", "-e", "/var/lib/masqued", check=False).returncode != 0
    assert relay.run("test", "-f", "/etc/masque/relay.conf", check=False).returncode == 0
    assert relay.run("test", "-e", "/etc/masque/README", check=False).returncode != 0


def _pairs(env: Env) -> list[tuple[Container, str]]:
    return [(env.relay, "relay"), (env.client, "client")]
