"""Relay cost with many clients: N client namespaces connect at once (readiness via
NOTIFY_SOCKET), then each pushes a modest fixed UDP load to its own iperf3 server.

The clients run on the same cores as the relay, so the load per client must leave
them room: at 1 Mbit/s each, 50 client daemons took ~127% of the 2 cores, the
machine was saturated, and the clients' own queues dropped ~70% of the load while
the relay used 18%.

For every N a fresh relay is started, so its idle RSS before the clients is the base of
the per-client figure. Clients use stream mode (the default transport).
"""

from __future__ import annotations

import contextlib
import signal
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import measure
from bench.lab import TARGET_V4, Daemon, Lab, NotReady, wait_ready
from bench.measure import CpuMeter, MeasureError
from bench.paths import PathFailed, Settings

BASE_PORT = 5300
UDP_PAYLOAD = 1000


def stop_all(daemons: Sequence[Daemon], timeout: float = 15) -> list[int | None]:
    """SIGTERM every daemon at once, then wait for each (SIGKILL after ``timeout``)."""
    for d in daemons:
        if d.alive():
            with contextlib.suppress(ProcessLookupError):
                d.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    codes: list[int | None] = []
    for d in daemons:
        try:
            d.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            d.proc.kill()
            d.proc.wait(5)
        d.notify.close()
        codes.append(d.proc.returncode)
    return codes


def _start_servers(lab: Lab, count: int) -> None:
    for i in range(1, count + 1):
        lab.spawn(lab.target_ns, "iperf3", "-s", "-p", str(BASE_PORT + i))
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        out = lab.run(lab.target_ns, "ss", "-Hltn", check=False).stdout
        if all(f":{BASE_PORT + i} " in out for i in range(1, count + 1)):
            return
        time.sleep(0.1)
    raise PathFailed(f"{count} iperf3 servers did not start")


def load_window(seconds: float) -> tuple[float, float]:
    """(wait, measure) in seconds: when to start measuring CPU during a load of
    ``seconds``, and for how long."""
    ramp = min(1.0, seconds / 4)
    return ramp, max(0.3, seconds - 2 * ramp)


def estimate_seconds(settings: Settings) -> float:
    """Rough wall time of the scale section (dominated by Python start-up of N clients)."""
    return sum(8 + 0.6 * n + settings.scale_seconds + 3 for n in settings.scale_clients) + 5


def measure_scale(
    settings: Settings,
    pki: Path,
    workdir: Path,
    time_left: Callable[[], float],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Relay RSS/CPU and connect time for each client count in ``settings.scale_clients``."""
    counts = sorted(set(settings.scale_clients))
    lab = Lab(workdir / "scale", pki, clients=max(counts))
    out: dict[str, Any] = {
        "transport": "stream",
        "load_per_client_mbps": settings.scale_load_mbps,
        "load_seconds": settings.scale_seconds,
        "rows": [],
        "errors": [],
        "skipped": [],
    }
    try:
        lab.up()
        _start_servers(lab, max(counts))
        for n in counts:
            # n Python clients start on 2 cores (~0.35 s of CPU each), then the load,
            # then n clean stops: measured ~17 s to READY for 50 on a quiet machine.
            if time_left() < 15 + 1.5 * n + settings.scale_seconds:
                out["skipped"].append(f"{n} clients: time budget")
                continue
            row = _one_count(lab, n, settings, log)
            out["rows"].append(row)
            if "error" in row:
                out["errors"].append(f"{n} clients: {row['error']}")
        _marginal(out["rows"])
    except (PathFailed, NotReady, MeasureError, OSError, subprocess.SubprocessError) as exc:
        out["errors"].append(str(exc)[-1500:])
    finally:
        lab.down()
    return out


def _marginal(rows: list[dict[str, Any]]) -> None:
    """Relay RSS per additional idle client, against the smallest client count measured
    (excludes one-off costs of the first session: TLS contexts, imports, buffers)."""
    base = next((r for r in rows if "relay_rss_idle_mb" in r), None)
    for r in rows:
        if base is None or r is base or "relay_rss_idle_mb" not in r:
            continue
        extra = r["clients"] - base["clients"]
        delta_kb = (r["relay_rss_idle_mb"] - base["relay_rss_idle_mb"]) * 1024
        r["relay_rss_marginal_kb"] = delta_kb / extra


def _one_count(lab: Lab, n: int, settings: Settings, log: Callable[[str], None]) -> dict[str, Any]:
    row: dict[str, Any] = {"clients": n}
    relay = lab.start_daemon("relay", lab.relay_ns, lab.relay_config(settings.mtu))
    clients: list[Daemon] = []
    try:
        wait_ready([relay], 20)
        time.sleep(0.5)
        base_kb = measure.vm_kb(relay.pid, "VmRSS") or 0
        row["relay_rss_before_mb"] = base_kb / 1024
        config = lab.client_config(settings.mtu, "stream")
        with CpuMeter([relay.pid]) as connect_cpu:
            t0 = time.monotonic()
            clients = [lab.start_daemon(f"c{i}", lab.client_ns(i), config) for i in range(1, n + 1)]
            try:
                wait_ready(clients, timeout=max(30.0, 1.0 * n))
            except NotReady as exc:
                row["error"] = str(exc).splitlines()[0]
        times = [c.notify.ready_at - t0 for c in clients if c.notify.ready_at is not None]
        row["connected"] = len(times)
        if times:
            row["connect_all_s"] = max(times)
            row["connect_median_s"] = statistics.median(times)
            row["connect_first_s"] = min(times)
        row["relay_cpu_s_connect"] = connect_cpu.cpu_s(relay.pid)
        # idle: keepalives only
        time.sleep(1.0)
        with CpuMeter([relay.pid]) as idle_cpu:
            time.sleep(2.0)
        idle_kb = measure.vm_kb(relay.pid, "VmRSS") or 0
        row["relay_rss_idle_mb"] = idle_kb / 1024
        row["relay_rss_per_client_kb"] = (idle_kb - base_kb) / n
        row["relay_cpu_pct_idle"] = idle_cpu.proc_pct.get(relay.pid, 0.0)
        # load: every connected client sends a fixed UDP rate to its own server
        live = [i for i, c in enumerate(clients, 1) if c.notify.ready_at is not None]
        procs = [
            measure.udp_start(
                lab.client_ns(i),
                TARGET_V4,
                settings.scale_seconds,
                settings.scale_load_mbps,
                UDP_PAYLOAD,
                BASE_PORT + i,
            )
            for i in live
        ]
        # CPU over the steady middle of the load: not the iperf3 control connections
        # at its start, nor the wait for every iperf3 to report at its end.
        ramp, window = load_window(settings.scale_seconds)
        time.sleep(ramp)
        with CpuMeter([relay.pid, *(c.pid for c in clients)]) as load_cpu:
            time.sleep(window)
        losses: list[float] = []
        failures = 0
        for p in procs:
            try:
                losses.append(
                    measure.udp_finish(p, settings.scale_seconds + measure.IPERF_SLACK)["loss_pct"]
                )
            except MeasureError:
                failures += 1
        row["relay_cpu_pct_load"] = load_cpu.proc_pct.get(relay.pid, 0.0)
        row["clients_cpu_pct_load"] = sum(load_cpu.proc_pct.get(c.pid, 0.0) for c in clients)
        row["machine_cpu_pct_load"] = load_cpu.machine_pct
        row["load_loss_pct_median"] = statistics.median(losses) if losses else None
        row["load_loss_pct_max"] = max(losses) if losses else None
        row["load_failures"] = failures
        row["relay_peak_rss_mb"] = (measure.vm_kb(relay.pid, "VmHWM") or 0) / 1024
        if not relay.alive():
            row["error"] = f"relay exited {relay.proc.returncode}: {relay.log_tail(500)}"
        log(
            f"    {n} clients: connected {row['connected']}/{n}"
            + (f" in {row['connect_all_s']:.2f}s" if times else "")
            + f", relay RSS {row['relay_rss_idle_mb']:.1f} MB"
            + f", CPU {row['relay_cpu_pct_load']:.0f}% under load"
        )
    finally:
        stop_all(clients)
        stop_all([relay])
        lab.daemons.clear()
    return row
