"""End-to-end in datagram mode (RFC 9484 HTTP Datagrams): the stream-mode tests of
test_tunnel.py again, plus loss on the relay-client link and the benchmark figures.

Benchmark figures (Mbit/s, loss counts) are printed and written to
``$MASQUED_BENCH_OUT`` (default: the test's work dir) as JSON lines.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

from tests.integration.lab import (
    EGRESS_V4,
    EGRESS_V6,
    REPO,
    TARGET_V4,
    TARGET_V6,
    NamespaceLab,
)

MB = 1024 * 1024
DATAGRAM = 'transport = "datagram"\n'
UDPLOAD = str(REPO / "tests" / "integration" / "udpload.py")


def record(lab: NamespaceLab, **fields: object) -> None:
    line = json.dumps(fields)
    print("BENCH", line)
    out = Path(os.environ.get("MASQUED_BENCH_OUT", str(lab.workdir / "bench.jsonl")))
    with out.open("a") as f:
        f.write(line + "\n")


def start(lab: NamespaceLab, n: int = 1, client_extra: str = DATAGRAM) -> None:
    lab.start_servers()
    relay = lab.start_daemon("relay", lab.relay_ns, lab.relay_config())
    relay.wait_ready()
    clients = [
        lab.start_daemon(f"c{i}", lab.client_ns(i), lab.client_config(extra=client_extra))
        for i in range(1, n + 1)
    ]
    for d in clients:
        d.wait_ready()


def assert_datagram_sessions(lab: NamespaceLab, n: int) -> None:
    log = lab.daemons[0].log_text()
    assert log.count("session opened") >= n, log[-2000:]
    for d in lab.daemons[1:]:
        assert "tunnel up" in d.log_text()


def assert_clean_after_stop(lab: NamespaceLab) -> None:
    codes = [d.stop() for d in lab.daemons]
    assert codes == [0] * len(codes), [d.log_text()[-3000:] for d in lab.daemons]
    for ns in [lab.relay_ns] + [lab.client_ns(i) for i in range(1, lab.clients + 1)]:
        assert lab.leftovers(ns) == [], ns


def test_datagram_ping_tcp_udp_ipv4_ipv6(lab1: NamespaceLab) -> None:
    start(lab1)
    c = lab1.client_ns(1)
    res = lab1.ping(c, TARGET_V4, count=5)
    assert res.returncode == 0 and " 0% packet loss" in res.stdout, res.stdout + res.stderr
    # Two routers on the way (the relay's kernel and, per RFC 9484 §7.2, the
    # encapsulation at the relay): the reply's TTL shows both.
    assert re.search(r"ttl=62", res.stdout), res.stdout
    res = lab1.ping(c, TARGET_V6, count=5)
    assert res.returncode == 0, res.stdout + res.stderr
    # A 1280-byte IPv6 packet (the IPv6 minimum MTU) fits one datagram.
    res = lab1.run(c, "ping", "-6", "-c", "2", "-s", "1232", "-M", "do", TARGET_V6, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    out = lab1.traffic(c, "tcp", TARGET_V4, str(10 * MB))
    assert out.split()[:2] == ["ok", EGRESS_V4], out
    out = lab1.traffic(c, "tcp", TARGET_V6, str(10 * MB))
    assert out.split()[:2] == ["ok", EGRESS_V6], out
    assert lab1.traffic(c, "udp", TARGET_V4, "20") == f"ok {EGRESS_V4} 20/20"
    assert lab1.traffic(c, "udp", TARGET_V6, "20") == f"ok {EGRESS_V6} 20/20"
    assert_datagram_sessions(lab1, 1)
    status = lab1.run(c, sys.executable, "-m", "masqued", "status", "c1", check=False).stdout
    if status:
        assert "datagram" in status
    assert_clean_after_stop(lab1)


def test_datagram_three_clients_at_once(lab3: NamespaceLab) -> None:
    start(lab3, 3)
    addrs = set()
    for i in (1, 2, 3):
        out = lab3.ip(lab3.client_ns(i), "-4", "-o", "addr", "show", "dev", f"mq-c{i}")
        addrs.add(out.split()[3])
    assert len(addrs) == 3 and all(a.startswith("198.18.200.") for a in addrs), addrs
    procs = [
        lab3.spawn(
            lab3.client_ns(i),
            sys.executable,
            str(REPO / "tests" / "integration" / "traffic.py"),
            "tcp",
            TARGET_V4,
            str(3 * MB),
            log=lab3.workdir / f"t{i}.out",
        )
        for i in (1, 2, 3)
    ]
    for i, p in enumerate(procs, 1):
        assert p.wait(120) == 0, (lab3.workdir / f"t{i}.out").read_text()
        assert (lab3.workdir / f"t{i}.out").read_text().split()[:2] == ["ok", EGRESS_V4]
    for i in (1, 2, 3):
        assert lab3.ping(lab3.client_ns(i), TARGET_V6, count=2).returncode == 0
    assert_clean_after_stop(lab3)


def test_auto_picks_datagram_and_address_request_works(lab1: NamespaceLab) -> None:
    start(lab1, client_extra='transport = "auto"\naddress_request = true\n')
    log = lab1.daemons[1].log_text()
    assert "using datagram mode" in log, log[-2000:]
    out = lab1.traffic(lab1.client_ns(1), "udp", TARGET_V4, "10")
    assert out == f"ok {EGRESS_V4} 10/10"
    assert_clean_after_stop(lab1)


def _tcp_mbit(lab: NamespaceLab, nbytes: int) -> float:
    out = lab.traffic(lab.client_ns(1), "tcp", TARGET_V4, str(nbytes), timeout=240)
    assert out.split()[:2] == ["ok", EGRESS_V4], out
    return float(out.split()[2])


def test_tcp_through_loss_stream_vs_datagram(lab1: NamespaceLab) -> None:
    """2% random loss on the relay-client link: inner TCP still completes and verifies
    in both modes; the figures compare stream and datagram mode with the same transfer."""
    lab1.start_servers()
    relay = lab1.start_daemon("relay", lab1.relay_ns, lab1.relay_config())
    relay.wait_ready()
    figures: dict[str, float] = {}
    method = "none"
    for run, extra in (("stream", ""), ("datagram", DATAGRAM)):
        client = lab1.start_daemon(
            "c1", lab1.client_ns(1), lab1.client_config(extra=extra), run=run
        )
        client.wait_ready()
        figures[f"{run}_0"] = _tcp_mbit(lab1, 10 * MB)
        method = lab1.add_loss(1, 2.0)
        figures[f"{run}_2"] = _tcp_mbit(lab1, 4 * MB)
        lab1.remove_loss(1)
        assert client.stop() == 0
        lab1.daemons.remove(client)
        time.sleep(0.5)
    record(lab1, bench="tcp_loss", loss_method=method, **figures)
    assert_clean_after_stop(lab1)


def test_datagram_loss_below_capacity(lab1: NamespaceLab) -> None:
    """UDP at a load below capacity: fewer than 0.1% of the datagrams may be lost."""
    start(lab1)
    # 10 s at ~19 Mbit/s of payload by default; MASQUED_UDP_PPS probes other loads.
    pps = int(os.environ.get("MASQUED_UDP_PPS", "2000"))
    count, size = 10 * pps, 1200
    sink = lab1.spawn(
        lab1.target_ns,
        sys.executable,
        UDPLOAD,
        "sink",
        "5301",
        "40",
        log=lab1.workdir / "sink.out",
    )
    deadline = time.monotonic() + 10
    while "ready" not in (lab1.workdir / "sink.out").read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    res = lab1.run(
        lab1.client_ns(1),
        sys.executable,
        UDPLOAD,
        "send",
        TARGET_V4,
        "5301",
        str(count),
        str(pps),
        str(size),
        timeout=60,
    )
    sent = int(res.stdout.split()[1])
    assert sink.wait(60) == 0
    received = int((lab1.workdir / "sink.out").read_text().split("received")[1].split()[0])
    loss = 1 - received / sent
    record(
        lab1,
        bench="udp_below_capacity",
        sent=sent,
        received=received,
        loss=loss,
        pps=pps,
        size=size,
    )
    if "MASQUED_UDP_PPS" not in os.environ:
        assert loss < 0.001, (sent, received)
    assert_clean_after_stop(lab1)
