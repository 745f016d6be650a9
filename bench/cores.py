"""Relay workers: the same clients, each pushing one TCP stream at once, through a
relay with ``workers = 1`` and then ``workers = 2`` (masqued.runtime.workers).

Issue 8 asks for a relay that uses both cores when clients are many, kept only if
the benchmark shows it helps. On a 2-core machine the clients, iperf3 and the
kernel's forwarding run on the same cores as the relay, so the figures say whether
one relay process is a bottleneck here, not what a dedicated many-core relay would
do. With 2 workers the clients are spread over the workers by the kernel (a
client's first packet picks one at random), so a run may put more clients on one.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import measure
from bench.lab import PYTHON, TARGET_V4, Daemon, Lab, NotReady, wait_ready
from bench.measure import CpuMeter, MeasureError, summary
from bench.paths import PathFailed, Settings
from bench.scale import stop_all

BASE_PORT = 5400


def estimate_seconds(settings: Settings) -> float:
    """Rough wall time of the section: two layouts, each up, its repeats, down."""
    return 2 * (12 + settings.repeats * (settings.tcp_seconds + 2))


def measure_cores(
    settings: Settings,
    pki: Path,
    workdir: Path,
    time_left: Callable[[], float],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Aggregate TCP throughput and CPU of ``settings.cores_clients`` clients through
    a relay with 1 and with 2 workers."""
    n = settings.cores_clients
    out: dict[str, Any] = {
        "clients": n,
        "transport": "stream",
        "rows": [],
        "errors": [],
        "skipped": [],
    }
    for workers in (1, 2):
        if time_left() < estimate_seconds(settings) / 2:
            out["skipped"].append(f"{workers} worker(s): time budget")
            continue
        try:
            row = _one_layout(workers, n, settings, pki, workdir, log)
        except (PathFailed, NotReady, MeasureError, OSError, subprocess.SubprocessError) as exc:
            out["errors"].append(f"{workers} worker(s): {str(exc)[-500:]}")
            continue
        out["rows"].append(row)
    one = next((r for r in out["rows"] if r["workers"] == 1), None)
    two = next((r for r in out["rows"] if r["workers"] == 2), None)
    if one and two and one["total_mbps"].get("n") and two["total_mbps"].get("n"):
        out["two_over_one"] = two["total_mbps"]["median"] / one["total_mbps"]["median"]
    return out


def _one_layout(
    workers: int,
    n: int,
    settings: Settings,
    pki: Path,
    workdir: Path,
    log: Callable[[str], None],
) -> dict[str, Any]:
    lab = Lab(workdir / f"cores{workers}", pki, clients=n)
    try:
        lab.up()
        for i in range(1, n + 1):
            lab.spawn(lab.target_ns, "iperf3", "-s", "-p", str(BASE_PORT + i))
        relay = lab.start_daemon(
            "relay", lab.relay_ns, lab.relay_config(settings.mtu) + f"workers = {workers}\n"
        )
        wait_ready([relay], 30)
        clients = [
            lab.start_daemon(f"c{i}", lab.client_ns(i), lab.client_config(settings.mtu))
            for i in range(1, n + 1)
        ]
        wait_ready(clients, 30)
        for i in range(1, n + 1):
            lab.wait_ping(lab.client_ns(i), TARGET_V4)
        time.sleep(0.3)
        relay_pids = [relay.pid, *_children(relay.pid)]
        spread = _sessions_per_worker(lab, relay)
        totals: list[float] = []
        relay_cpu: list[float] = []
        client_cpu: list[float] = []
        machine: list[float] = []
        for _ in range(settings.repeats):
            with CpuMeter(relay_pids + [c.pid for c in clients]) as m:
                mbps = _tcp_all(lab, n, settings.tcp_seconds)
            totals.append(sum(mbps))
            relay_cpu.append(sum(m.proc_pct.get(pid, 0.0) for pid in relay_pids))
            client_cpu.append(sum(m.proc_pct.get(c.pid, 0.0) for c in clients))
            machine.append(m.machine_pct)
        for d in [relay, *clients]:
            if not d.alive():
                raise PathFailed(f"{d.name} exited {d.proc.returncode}: {d.log_tail(500)}")
        row = {
            "workers": workers,
            "sessions_per_worker": spread,
            "total_mbps": summary(totals),
            "relay_cpu_pct": summary(relay_cpu),
            "clients_cpu_pct": summary(client_cpu),
            "machine_cpu_pct": summary(machine),
        }
        log(
            f"    {n} clients through {workers} worker(s) {spread}: "
            f"{statistics.median(totals):.0f} Mbit/s in all, relay CPU "
            f"{statistics.median(relay_cpu):.0f}%, machine {statistics.median(machine):.0f}%"
        )
        stop_all(clients)
        stop_all([relay])
        lab.daemons.clear()
        return row
    finally:
        lab.down()


def _children(pid: int) -> list[int]:
    """PIDs of the relay's worker processes (its children, through `ip netns exec`)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            with open(f"/proc/{parent}/task/{parent}/children") as f:
                kids = [int(x) for x in f.read().split()]
        except OSError:
            continue
        found += kids
        todo += kids
    return found


def _sessions_per_worker(lab: Lab, relay: Daemon) -> list[int]:
    """How many sessions each worker serves (from ``masqued status --json``)."""
    res = lab.run(
        lab.relay_ns, PYTHON, "-m", "masqued", "status", relay.name, "--json", check=False
    )
    try:
        doc = json.loads(res.stdout)
    except json.JSONDecodeError:
        return []
    count = len(doc.get("workers") or [None])
    spread = [0] * count
    for sess in doc.get("sessions", []):
        spread[int(sess.get("worker", 0)) % count] += 1
    return spread


def _tcp_all(lab: Lab, n: int, seconds: float) -> list[float]:
    """One iperf3 TCP stream from every client at once: each receiver's Mbit/s."""
    procs = [
        measure.iperf_start(
            lab.client_ns(i), ["-c", TARGET_V4, "-p", str(BASE_PORT + i), "-t", f"{seconds:g}"]
        )
        for i in range(1, n + 1)
    ]
    try:
        return [
            measure.parse_tcp(measure.iperf_result(p, seconds + measure.IPERF_SLACK))["mbps"]
            for p in procs
        ]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
