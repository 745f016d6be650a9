"""Seeing what the tunnel does, end to end: ``masqued status``, Prometheus metrics, the
control socket's defences and ``masqued doctor`` against real faults in the lab."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import jsonschema
from prometheus_client.parser import text_string_to_metric_families

from masqued.gate import pki
from tests.integration.lab import PYTHON, REPO, TARGET_V4, NamespaceLab

MB = 1024 * 1024
SCHEMA = json.loads((REPO / "docs" / "status.schema.json").read_text())
NOBODY = 65534


def status_json(lab: NamespaceLab, ns: str, name: str) -> dict[str, Any]:
    res = lab.masqued(ns, "status", name, "--json")
    assert res.returncode == 0, res.stderr
    doc: dict[str, Any] = json.loads(res.stdout)
    jsonschema.validate(doc, SCHEMA)
    return doc


def link_stats(lab: NamespaceLab, ns: str, dev: str) -> dict[str, Any]:
    (link,) = json.loads(lab.ip(ns, "-s", "-j", "link", "show", "dev", dev))
    stats: dict[str, Any] = link["stats64"]
    return stats


def scrape(lab: NamespaceLab, ns: str, address: str) -> dict[tuple[str, str], float]:
    code = f"from masqued.observe.exposition import scrape; print(scrape({address!r}), end='')"
    res = lab.run(ns, PYTHON, "-c", code, timeout=30)
    values: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(res.stdout):
        for s in family.samples:
            values[(s.name, ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())))] = s.value
    return values


def test_status_and_metrics_of_a_relay_with_three_clients(lab3: NamespaceLab) -> None:
    lab = lab3
    lab.start_servers()
    relay = lab.start_daemon(
        "relay", lab.relay_ns, lab.relay_config(extra='metrics = "127.0.0.1:9810"\n')
    )
    relay.wait_ready()
    clients = [lab.start_daemon(f"c{i}", lab.client_ns(i), lab.client_config()) for i in (1, 2, 3)]
    for d in clients:
        d.wait_ready()
    before = scrape(lab, lab.relay_ns, "127.0.0.1:9810")
    assert before[("masqued_sessions_open", "")] == 3
    assert before[("masqued_sessions_total", "result=accepted")] == 3

    sizes = {1: 1 * MB, 2: 2 * MB, 3: 3 * MB}
    for i, size in sizes.items():
        out = lab.traffic(lab.client_ns(i), "tcp", TARGET_V4, str(size))
        assert out.startswith("ok "), out
    time.sleep(0.5)  # let the last ACKs settle before reading counters

    doc = status_json(lab, lab.relay_ns, "relay")
    assert doc["role"] == "relay" and len(doc["sessions"]) == 3
    assert doc["nat"]["backend"] == "nftables"
    assert any("masquerade" in rule for rule in doc["nat"]["rules"])
    by_addr = {s["addresses"][0]: s for s in doc["sessions"]}
    for i, size in sizes.items():
        ns = lab.client_ns(i)
        addr = lab.ip(ns, "-4", "-o", "addr", "show", "dev", f"mq-c{i}").split()[3]
        s = by_addr[addr.split("/")[0] + "/32"]
        tun = link_stats(lab, ns, f"mq-c{i}")
        wire = link_stats(lab, ns, "mq-c-r")
        tunnel = status_json(lab, ns, f"c{i}")["sessions"][0]
        # What the relay counts is what the client put into the tunnel, and the other
        # way round (a few background packets may slip in between the readings) ...
        assert abs(s["rx_bytes"] - tunnel["tx_bytes"]) <= 2048, (s, tunnel)
        assert abs(s["tx_bytes"] - tun["rx"]["bytes"]) <= 2048, (s, tun)
        # ... and every packet the client's TUN handed over was either sent or dropped
        # and counted (a bulk transfer overruns the client's bounded queue by design).
        accounted = tunnel["tx_packets"] + sum(tunnel["drops"].values())
        assert abs(tun["tx"]["packets"] - accounted) <= 4, (tunnel, tun)
        # The payload the test sent, plus TCP/IP headers (at most ~10% with ACKs) ...
        assert size <= s["rx_bytes"] <= size * 1.10 + 64 * 1024, (size, s)
        # ... and on the wire, QUIC/UDP/IP framing on top of that, not more than ~15%.
        assert s["rx_bytes"] < wire["tx"]["bytes"] <= s["rx_bytes"] * 1.15 + 256 * 1024
        assert s["rtt_ms"] is not None and s["cwnd"] > 0 and s["last_rx"]

    after = scrape(lab, lab.relay_ns, "127.0.0.1:9810")
    moved = (
        after[("masqued_bytes_total", "direction=rx")]
        - before[("masqued_bytes_total", "direction=rx")]
    )
    assert moved >= sum(sizes.values())
    assert after[("masqued_bytes_total", "direction=rx")] >= doc["totals"]["rx_bytes"]
    assert after[("masqued_handshake_seconds_count", "")] == 3
    assert after[("masqued_pool_used", "")] == 3

    # Human output, and every running instance when NAME is left out.
    text = lab.masqued(lab.relay_ns, "status", "relay").stdout
    assert "instance: relay" in text and text.count("\nsession: ") == 3
    assert 'oifname "mq-r-t" masquerade' in text
    everything = lab.masqued(lab.relay_ns, "status").stdout
    assert all(f"instance: {n}" in everything for n in ("relay", "c1", "c2", "c3"))
    cdoc = status_json(lab, lab.client_ns(2), "c2")
    assert cdoc["state"] == "connected" and cdoc["sessions"][0]["tx_bytes"] >= 2 * MB
    watch = lab.masqued(lab.relay_ns, "status", "relay", "--watch", "-n", "0.2", "--count", "2")
    assert watch.returncode == 0 and "rate: rx " in watch.stdout
    for d in [*clients, relay]:
        assert d.stop() == 0


def test_control_socket_refuses_non_root_and_survives_garbage(lab1: NamespaceLab) -> None:
    lab = lab1
    lab.start_servers()
    relay = lab.start_daemon("relay", lab.relay_ns, lab.relay_config())
    relay.wait_ready()
    client = lab.start_daemon("c1", lab.client_ns(1), lab.client_config())
    client.wait_ready()
    sock_path = lab.run_dir / "relay.sock"
    st = sock_path.stat()
    assert st.st_uid == 0 and st.st_mode & 0o777 == 0o600
    assert lab.run_dir.stat().st_mode & 0o777 == 0o755

    probe = (
        "import socket\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
        "try:\n"
        "    s.connect('relay.sock')\n"
        "except OSError as e:\n"
        "    print('connect failed', e.errno); raise SystemExit\n"
        's.sendall(b\'{"version": 1, "command": "status"}\\n\')\n'
        "print(s.recv(4096).decode().strip())\n"
    )

    def as_nobody() -> str:
        res = subprocess.run(
            ["/usr/bin/python3", "-c", probe],
            cwd=lab.run_dir,
            user=NOBODY,
            group=NOBODY,
            extra_groups=[],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return res.stdout + res.stderr

    # The file mode keeps other users out ...
    assert "connect failed 13" in as_nobody()  # EACCES
    # ... and with the mode opened up, SO_PEERCRED still does.
    os.chmod(sock_path, 0o666)
    try:
        answer = json.loads(as_nobody())
    finally:
        os.chmod(sock_path, 0o600)
    assert answer["ok"] is False and answer["error"]["code"] == "forbidden"
    assert "refused connection from uid 65534" in relay.log_text()

    garbage = [
        b"\x00\xff\xfe" * 100 + b"\n",
        b"{" * 3000 + b"\n",
        b"x" * 100_000,
        b'{"version": 99, "command": "status"}\n',
        b'{"version": 1, "command": "status", "args": 7}\n',
        os.urandom(20_000),
    ]
    for blob in garbage:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(sock_path))
            s.sendall(blob)
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):
                pass
    # Still serving status, still moving packets.
    assert relay.proc.poll() is None
    doc = status_json(lab, lab.relay_ns, "relay")
    assert len(doc["sessions"]) == 1
    assert lab.traffic(lab.client_ns(1), "udp", TARGET_V4, "10").endswith("10/10")
    assert "control: bad request" in relay.log_text()
    assert relay.stop() == 0 and client.stop() == 0
    assert not sock_path.exists()


def doctor(lab: NamespaceLab, ns: str, name: str, config: Path) -> tuple[int, str]:
    res = lab.masqued(ns, "doctor", name, "--config", str(config), timeout=60)
    return res.returncode, res.stdout + res.stderr


def failed_checks(output: str) -> list[str]:
    return [line.split()[1].rstrip(":") for line in output.splitlines() if "FAIL " in line]


def test_doctor_finds_injected_faults(lab1: NamespaceLab) -> None:
    lab = lab1
    lab.start_servers()
    relay = lab.start_daemon("relay", lab.relay_ns, lab.relay_config(nat="nftables"))
    relay.wait_ready()
    client = lab.start_daemon("c1", lab.client_ns(1), lab.client_config())
    client.wait_ready()
    relay_conf = lab.workdir / "conf" / "relay.conf"
    client_conf = lab.workdir / "conf" / "c1.conf"

    rc, out = doctor(lab, lab.relay_ns, "relay", relay_conf)
    assert rc == 0 and "no problems found" in out, out
    rc, out = doctor(lab, lab.client_ns(1), "c1", client_conf)
    assert rc == 0 and "no problems found" in out, out

    # 1. Forwarding switched off on the relay's TUN.
    lab.run(lab.relay_ns, "sysctl", "-qw", "net.ipv4.conf.mq-relay.forwarding=0")
    rc, out = doctor(lab, lab.relay_ns, "relay", relay_conf)
    assert rc == 1 and failed_checks(out) == ["forwarding"], out
    assert "fix: sysctl -w net.ipv4.conf.mq-relay.forwarding=1" in out
    lab.run(lab.relay_ns, "sysctl", "-qw", "net.ipv4.conf.mq-relay.forwarding=1")

    # 2. Someone deleted our NAT table.
    lab.run(lab.relay_ns, "nft", "delete", "table", "inet", "masqued_relay")
    rc, out = doctor(lab, lab.relay_ns, "relay", relay_conf)
    assert rc == 1 and failed_checks(out) == ["nat"], out
    assert "table inet masqued_relay is missing" in out and "systemctl restart" in out

    # 3. A client config trusting the wrong CA.
    other = lab.workdir / "other-ca"
    pki.init_ca(other, name="wrong CA")
    wrong = lab.workdir / "conf" / "cw.conf"
    wrong.write_text(
        client_conf.read_text().replace(str(lab.pki / "ca.pem"), str(other / "ca.pem"))
    )
    rc, out = doctor(lab, lab.client_ns(1), "cw", wrong)
    assert rc == 1 and "certificate" in failed_checks(out), out
    assert "does not verify against" in out

    # 4. The relay is down.
    assert relay.stop() == 0
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        rc, out = doctor(lab, lab.client_ns(1), "c1", client_conf)
        if "reconnecting" in out or "connecting" in out:
            break
        time.sleep(0.5)
    assert rc == 1 and "relay" in failed_checks(out), out
    assert "unreachable" in out and "relay down" in out
    assert client.stop() == 0
    assert lab.leftovers(lab.relay_ns) == [] and lab.leftovers(lab.client_ns(1)) == []


def test_status_of_an_instance_that_is_not_running(lab1: NamespaceLab) -> None:
    res = lab1.masqued(lab1.relay_ns, "status", "nothere")
    assert res.returncode == 1 and "is not running" in res.stderr
    res = lab1.masqued(lab1.relay_ns, "status")
    assert res.returncode == 0 and "no running instances" in res.stdout
