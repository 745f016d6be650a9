"""Relay workers end to end (``workers = 2``): several processes on one UDP port, each
with its share of the pool on its own TUN, steered by connection ID; a worker that
dies is started again; nothing is left behind, also when the main process is killed."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import time
from typing import Any

import jsonschema

from masqued.gate.auth import new_token
from tests.integration.lab import (
    EGRESS_V4,
    EGRESS_V6,
    REPO,
    TARGET_V4,
    TARGET_V6,
    NamespaceLab,
)
from tests.integration.test_auth import refused

SCHEMA = json.loads((REPO / "docs" / "status.schema.json").read_text())
MB = 1024 * 1024


def status(lab: NamespaceLab) -> dict[str, Any]:
    res = lab.masqued(lab.relay_ns, "status", "relay", "--json")
    assert res.returncode == 0, res.stderr
    doc: dict[str, Any] = json.loads(res.stdout)
    jsonschema.validate(doc, SCHEMA)
    return doc


def until(cond: Any, timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {timeout:.0f}s")
        time.sleep(0.2)


def worker_pids(relay_pid: int) -> list[int]:
    with open(f"/proc/{relay_pid}/task/{relay_pid}/children") as f:
        return [int(x) for x in f.read().split()]


def start(lab: NamespaceLab) -> Any:
    lab.start_servers()
    relay = lab.start_daemon("relay", lab.relay_ns, lab.relay_config(extra="workers = 2\n"))
    relay.wait_ready(30)
    clients = [lab.start_daemon(f"c{i}", lab.client_ns(i), lab.client_config()) for i in (1, 2, 3)]
    for c in clients:
        c.wait_ready(30)
    return relay


def test_two_workers_share_the_pool_and_carry_every_client(lab3: NamespaceLab) -> None:
    lab = lab3
    relay = start(lab)
    # Two TUNs, each with the gateway of its half of each pool network.
    tuns = {
        line.split()[0]: line.split()[2:]
        for line in lab.ip(lab.relay_ns, "-br", "addr", "show").splitlines()
        if line.startswith("mq-relay")
    }
    assert set(tuns) == {"mq-relay", "mq-relay+1"}
    assert "198.18.200.1/25" in tuns["mq-relay"] and "198.18.200.129/25" in tuns["mq-relay+1"]
    assert "2001:db8:200::1/65" in tuns["mq-relay"]
    assert "2001:db8:200:0:8000::1/65" in tuns["mq-relay+1"]
    # Every client reaches the target both ways, NATed, whichever worker it has.
    for i in (1, 2, 3):
        c = lab.client_ns(i)
        assert lab.ping(c, TARGET_V4, count=3).returncode == 0
        assert lab.ping(c, TARGET_V6, count=3).returncode == 0
        out = lab.traffic(c, "tcp", TARGET_V4, str(2 * MB))
        assert out.split()[:2] == ["ok", EGRESS_V4], out
        out = lab.traffic(c, "udp", TARGET_V6, "20")
        assert out == f"ok {EGRESS_V6} 20/20"
    doc = until(
        lambda: (d := status(lab))["totals"]["rx_bytes"] >= 3 * 2 * MB and d,
        what="status showing the transfers",
    )
    assert len(doc["sessions"]) == 3 and doc["pool"]["used"] == 3
    # New clients go to the least busy worker (a Retry moves them): 2 + 1 or 1 + 2.
    spread = [sum(s["worker"] == k for s in doc["sessions"]) for k in (0, 1)]
    assert sorted(spread) == [1, 2], spread
    workers = {w["index"]: w for w in doc["workers"]}
    assert sorted(workers) == [0, 1]
    assert workers[0]["pid"] == relay.proc.pid and workers[1]["state"] == "running"
    assert [w["tun"] for w in doc["workers"]] == ["mq-relay", "mq-relay+1"]
    for s in doc["sessions"]:
        share = [ipaddress.ip_network(n) for n in workers[s["worker"]]["pool"]]
        for a in s["addresses"]:
            ip = ipaddress.ip_interface(a).ip
            assert any(ip in n for n in share), (a, share)
    assert {str(n) for w in workers.values() for n in w["pool"]} == {
        "198.18.200.0/25",
        "198.18.200.128/25",
        "2001:db8:200::/65",
        "2001:db8:200:0:8000::/65",
    }
    text = lab.masqued(lab.relay_ns, "status", "relay").stdout
    assert "worker 0: pid" in text and "tun mq-relay+1, pool 198.18.200.128/25" in text
    # The doctor checks every worker's TUN (forwarding on each).
    res = lab.masqued(lab.relay_ns, "doctor", "relay", "--config", str(relay.config))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "mq-relay+1" in res.stdout, res.stdout
    assert text.count("\n  worker: ") == 3
    codes = [d.stop() for d in reversed(lab.daemons)]
    assert codes == [0, 0, 0, 0], [d.log_text()[-2000:] for d in lab.daemons]
    assert lab.leftovers(lab.relay_ns) == []


def test_a_dead_worker_is_started_again_and_its_clients_come_back(lab3: NamespaceLab) -> None:
    lab = lab3
    relay = start(lab)
    doc = until(lambda: len((d := status(lab))["sessions"]) == 3 and d, what="3 sessions")
    (child,) = worker_pids(relay.proc.pid)
    assert doc["workers"][1]["pid"] == child
    on_main = {s["id"]: s["connected_since"] for s in doc["sessions"] if s["worker"] == 0}
    os.kill(child, signal.SIGKILL)
    # Started again (same TUN, same socket), and every client is back in the tunnel.
    doc = until(
        lambda: (
            (d := status(lab))["workers"][1]["restarts"] == 1
            and d["workers"][1]["state"] == "running"
            and len(d["sessions"]) == 3
            and d
        ),
        timeout=30,
        what="worker 1 restarted with its clients back",
    )
    assert doc["workers"][1]["pid"] != child
    for i in (1, 2, 3):
        lab.wait_ping(lab.client_ns(i), TARGET_V4, timeout=20)
    # The main process's own clients never noticed.
    still = {s["id"]: s["connected_since"] for s in doc["sessions"] if s["worker"] == 0}
    assert on_main.items() <= still.items()
    assert "relay worker 1" in relay.log_text() and "starting it again" in relay.log_text()
    assert relay.running()


def test_killing_the_main_process_takes_the_workers_and_a_restart_cleans_up(
    lab1: NamespaceLab,
) -> None:
    lab = lab1
    lab.start_servers()
    config = lab.relay_config(extra="workers = 2\n")
    relay = lab.start_daemon("relay", lab.relay_ns, config)
    relay.wait_ready(30)
    (child,) = worker_pids(relay.proc.pid)
    relay.proc.send_signal(signal.SIGKILL)
    relay.proc.wait(10)
    # The worker sees its socket pair close and stops; then the TUNs are gone with the
    # last fd, and only NAT (and forwarding) would be left: the next start cleans up.
    until(lambda: not os.path.exists(f"/proc/{child}"), timeout=15, what="worker gone")
    left = lab.leftovers(lab.relay_ns)
    assert all(not item.startswith("link ") for item in left), left
    lab.forget(relay)
    again = lab.start_daemon("relay", lab.relay_ns, config, run="-2")
    again.wait_ready(30)
    client = lab.start_daemon("c1", lab.client_ns(1), lab.client_config())
    client.wait_ready(30)
    assert lab.ping(lab.client_ns(1), TARGET_V4, count=3).returncode == 0
    assert [d.stop() for d in (client, again)] == [0, 0]
    assert lab.leftovers(lab.relay_ns) == []


def test_reload_reaches_every_worker(lab3: NamespaceLab) -> None:
    """Revoking a token and changing the ACLs on SIGHUP applies in every worker: the
    revoked client is refused whichever worker served it, the others keep their
    sessions and get the new ACL, wherever they are."""
    lab = lab3
    w = lab.workdir
    names = ("alice", "bob", "carol")
    tokens = {n: new_token(n) for n in names}
    (w / "tokens").write_text("".join(line + "\n" for _, line in tokens.values()))
    for n, (token, _) in tokens.items():
        (w / f"{n}.token").write_text(token + "\n")
        (w / f"{n}.token").chmod(0o600)
    (w / "tokens").chmod(0o600)

    def relay_conf(icmp: str) -> str:
        return lab.relay_config(
            extra=(
                f'workers = 2\nauth = "token"\ntokens_file = "{w / "tokens"}"\n'
                f'state_dir = "{w / "state"}"\nacl_default = "allow"\n'
                + "".join(f'[clients.{n}]\nacl = ["{icmp} 198.19.0.2/32 icmp"]\n' for n in names)
            )
        )

    lab.start_servers()
    relay = lab.start_daemon("relay", lab.relay_ns, relay_conf("allow"))
    relay.wait_ready(30)
    clients = {
        n: lab.start_daemon(
            f"c{i}", lab.client_ns(i), lab.client_config(extra=f'token_file = "{w / n}.token"\n')
        )
        for i, n in enumerate(names, 1)
    }
    for c in clients.values():
        c.wait_ready(30)
    doc = until(lambda: len((d := status(lab))["sessions"]) == 3 and d, what="3 sessions")
    before = {s["identity"]: (s["worker"], s["connected_since"]) for s in doc["sessions"]}
    for i in (1, 3):
        assert lab.ping(lab.client_ns(i), TARGET_V4, count=2).returncode == 0  # ICMP allowed
    # Revoke bob, forbid ICMP, reload: same main process, same workers.
    (w / "tokens").write_text(tokens["alice"][1] + "\n" + tokens["carol"][1] + "\n")
    config = w / "conf" / "relay.conf"
    config.write_text(relay_conf("deny"))
    pids = [relay.proc.pid, *worker_pids(relay.proc.pid)]
    relay.proc.send_signal(signal.SIGHUP)
    until(lambda: "no longer authorized" in relay.log_text(), what="bob's session closed")
    refused(clients["bob"], 403, timeout=20, never_up=False)
    assert "relay worker 1: reloaded" in relay.log_text()
    for i in (1, 3):
        res = lab.run(lab.client_ns(i), "ping", "-c", "1", "-W", "2", TARGET_V4, check=False)
        assert res.returncode != 0, res.stdout
        assert "Packet filtered" in res.stdout or "Prohibited" in res.stdout, res.stdout
    assert lab.traffic(lab.client_ns(1), "tcp", TARGET_V4, str(MB)).startswith("ok")
    doc = status(lab)
    after = {s["identity"]: (s["worker"], s["connected_since"]) for s in doc["sessions"]}
    assert set(after) == {"alice", "carol"}
    assert after["alice"] == before["alice"] and after["carol"] == before["carol"]
    assert [relay.proc.pid, *worker_pids(relay.proc.pid)] == pids


def test_a_stuck_worker_is_killed_and_started_again(lab1: NamespaceLab) -> None:
    """A worker whose event loop stops (SIGSTOP here) falls silent on its socket pair;
    after WATCHDOG seconds the main process kills it and starts it again."""
    from masqued.runtime.workers import WATCHDOG

    lab = lab1
    lab.start_servers()
    relay = lab.start_daemon("relay", lab.relay_ns, lab.relay_config(extra="workers = 2\n"))
    relay.wait_ready(30)
    (child,) = worker_pids(relay.proc.pid)
    os.kill(child, signal.SIGSTOP)
    try:
        doc = until(
            lambda: (
                (d := status(lab))["workers"][1]["restarts"] == 1
                and d["workers"][1]["state"] == "running"
                and d
            ),
            timeout=WATCHDOG + 20,
            what="the stuck worker replaced",
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
    assert doc["workers"][1]["pid"] != child
    assert "silent for" in relay.log_text() and "stuck, killing it" in relay.log_text()
    client = lab.start_daemon("c1", lab.client_ns(1), lab.client_config())
    client.wait_ready(30)
    assert lab.ping(lab.client_ns(1), TARGET_V4, count=3).returncode == 0
    assert [d.stop() for d in (client, relay)] == [0, 0]
    assert lab.leftovers(lab.relay_ns) == []
