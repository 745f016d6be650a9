"""Measurements: iperf3 (TCP, UDP), ping, CPU time and peak memory of processes.

Every call is bounded in time; each returns plain dicts/floats for the JSON result.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import subprocess
import time
import timeit
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.lab import sh

CLK_TCK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1
IPERF_SLACK = 20.0  # seconds a subprocess may take beyond its nominal duration
_PING_TIME = re.compile(r"icmp_seq=(\d+).* time=([\d.]+) ms")


class MeasureError(Exception):
    """A measurement tool failed (message says which and why)."""


# -- statistics -------------------------------------------------------------------------


def summary(values: Sequence[float]) -> dict[str, Any]:
    """Median with min-max over the repeats (``values`` kept for the record)."""
    if not values:
        return {"n": 0}
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "values": [round(v, 4) for v in values],
    }


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile: the smallest sample with ``pct``% of samples at or below it."""
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


# -- CPU and memory ---------------------------------------------------------------------


def cpu_seconds(pid: int) -> float | None:
    """user+system CPU seconds of ``pid`` (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    # fields[0] is the state (field 3); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_ticks() -> tuple[int, int]:
    """(total, idle+iowait) jiffies of the whole machine."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:9]]
    return sum(parts), parts[3] + parts[4]


def vm_kb(pid: int, key: str) -> int | None:
    """A ``Vm*`` line of /proc/PID/status in KiB (VmHWM = peak RSS, VmRSS = now)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


@dataclass
class CpuMeter:
    """CPU% of some processes (100 = one core) and of the machine (0..100 x cores)."""

    pids: Sequence[int]
    _t0: float = 0.0
    _cpu0: dict[int, float] = field(default_factory=dict)
    _m0: tuple[int, int] = (0, 0)
    proc_pct: dict[int, float] = field(default_factory=dict)
    machine_pct: float = 0.0
    elapsed: float = 0.0

    def cpu_s(self, pid: int) -> float:
        """CPU seconds ``pid`` used while measured."""
        return self.proc_pct.get(pid, 0.0) * self.elapsed / 100

    def __enter__(self) -> CpuMeter:
        self._cpu0 = {p: c for p in self.pids if (c := cpu_seconds(p)) is not None}
        self._m0 = machine_ticks()
        self._t0 = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        elapsed = self.elapsed = max(time.monotonic() - self._t0, 1e-6)
        for p, c0 in self._cpu0.items():
            c1 = cpu_seconds(p)
            if c1 is not None:
                self.proc_pct[p] = 100 * (c1 - c0) / elapsed
        total, idle = machine_ticks()
        dt = max(total - self._m0[0], 1)
        self.machine_pct = NCPU * 100 * ((dt - (idle - self._m0[1])) / dt)

    @property
    def total_pct(self) -> float:
        return sum(self.proc_pct.values())


def machine_busy(seconds: float = 2.0) -> float:
    """Busy share of the whole machine over ``seconds``, 0..100 (like quiet.sh)."""
    t0, i0 = machine_ticks()
    time.sleep(seconds)
    t1, i1 = machine_ticks()
    return 100 * (1 - (i1 - i0) / max(t1 - t0, 1))


def wait_quiet(max_busy: float, max_wait: float) -> float:
    """Wait until the machine is at most ``max_busy`` % busy; return the last sample."""
    deadline = time.monotonic() + max_wait
    while True:
        busy = machine_busy()
        if busy <= max_busy or time.monotonic() >= deadline:
            return busy


# -- host speed reference ---------------------------------------------------------------

REFERENCE_LOOP_ITERATIONS = 200_000


def _reference_loop(iterations: int) -> int:
    # The kind of interpreter work the daemons do per packet: slicing bytes, dict
    # look-ups, int arithmetic. Fixed, so its time tells only how fast this host runs
    # Python right now (CPU model, clock, other tenants), not anything of masqued.
    table = {i: (i * 7) & 0xFF for i in range(256)}
    data = bytes(range(256)) * 8
    total = 0
    for i in range(iterations):
        off = i & 1023
        chunk = data[off : off + 16]
        total = (total + table[chunk[0]] + len(chunk)) & 0xFFFFFFFF
    return total


def python_loop_ms(repeats: int = 7, iterations: int = REFERENCE_LOOP_ITERATIONS) -> dict[str, Any]:
    """Wall time in ms of one fixed pure-Python loop, ``repeats`` times (garbage collector
    off, as ``timeit`` does). Its min is the host-speed reference of a run: lower = a
    faster host state; the spread shows how disturbed the host was."""
    times = timeit.repeat(lambda: _reference_loop(iterations), number=1, repeat=repeats)
    return {**summary([t * 1000 for t in times]), "iterations": iterations}


# -- traffic ----------------------------------------------------------------------------


def _netns(ns: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


def _iperf_json(ns: str, args: Sequence[str], seconds: float) -> dict[str, Any]:
    cmd = _netns(ns, "iperf3", "-J", "--connect-timeout", "3000", *args)
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + IPERF_SLACK)
    except subprocess.TimeoutExpired as exc:
        raise MeasureError(f"iperf3 {' '.join(args)}: no result in {exc.timeout:.0f}s") from exc
    try:
        data: dict[str, Any] = json.loads(res.stdout)
    except json.JSONDecodeError as exc:
        raise MeasureError(f"iperf3 {' '.join(args)}: {res.stderr.strip()[:200]}") from exc
    if "error" in data:
        raise MeasureError(f"iperf3 {' '.join(args)}: {data['error']}")
    return data


def parse_tcp(data: dict[str, Any]) -> dict[str, float]:
    end = data["end"]
    return {
        "mbps": end["sum_received"]["bits_per_second"] / 1e6,
        "retransmits": float(end["sum_sent"].get("retransmits", 0)),
    }


def parse_udp(data: dict[str, Any]) -> dict[str, float]:
    """Sent vs received packets over the whole test (a packet still queued at the end
    counts as lost: that is the truth for a real-time flow)."""
    end = data["end"]
    sent = end.get("sum_sent", end["sum"])
    recv = end.get("sum_received", end["sum"])
    packets = int(sent["packets"])
    received = max(0, int(recv["packets"]) - int(recv.get("lost_packets", 0)))
    lost = max(0, packets - received)
    return {
        "sent_mbps": sent["bits_per_second"] / 1e6,
        "recv_mbps": recv["bits_per_second"] / 1e6,
        "packets": float(packets),
        "lost": float(lost),
        "loss_pct": 100 * lost / packets if packets else 100.0,
        "jitter_ms": float(recv.get("jitter_ms", 0.0)),
    }


def tcp(
    ns: str, server: str, seconds: float, streams: int = 1, port: int = 5201
) -> dict[str, float]:
    """iperf3 TCP from ``ns`` to ``server``: receiver goodput in Mbit/s."""
    args = ["-c", server, "-p", str(port), "-t", f"{seconds:g}", "-P", str(streams)]
    return parse_tcp(_iperf_json(ns, args, seconds))


# iperf3's UDP socket buffers (-w; the server applies the client's setting): a
# receiver sized for 400 Mbit/s, as masqued sizes its own sockets. With the default
# ~208 KiB the iperf3 server, sharing two cores with the daemons, dropped 0-0.15% of
# a 200 Mbit/s flow in its own socket (UdpRcvbufErrors), on every path that delivers
# packets in batches.
UDP_SOCKET_BUFFER = "4M"


def udp_receive_errors(ns: str) -> int:
    """Datagrams the kernel of ``ns`` dropped at full UDP receive buffers, so far."""
    res = sh(*_netns(ns, "cat", "/proc/net/snmp"), check=False, timeout=10)
    lines = [line.split() for line in res.stdout.splitlines() if line.startswith("Udp:")]
    if len(lines) < 2 or "RcvbufErrors" not in lines[0]:
        return 0
    return int(lines[1][lines[0].index("RcvbufErrors")])


def udp(
    ns: str,
    server: str,
    seconds: float,
    mbps: float,
    length: int,
    port: int = 5201,
    receiver_ns: str | None = None,
) -> dict[str, float]:
    """iperf3 UDP at a fixed offered load of ``mbps`` with ``length``-byte payloads.

    With ``receiver_ns`` (where the iperf3 server runs), ``receiver_drops`` says how
    many of the lost packets the receiver's own socket dropped."""
    args = ["-c", server, "-p", str(port), "-u", "-b", f"{mbps:g}M", "-l", str(length)]
    args += ["-w", UDP_SOCKET_BUFFER, "-t", f"{seconds:g}"]
    before = udp_receive_errors(receiver_ns) if receiver_ns else 0
    result = parse_udp(_iperf_json(ns, args, seconds))
    if receiver_ns:
        result["receiver_drops"] = float(udp_receive_errors(receiver_ns) - before)
    return result


def iperf_start(ns: str, args: Sequence[str]) -> subprocess.Popen[str]:
    """Start an iperf3 client in ``ns`` in the background (``iperf_result`` collects it)."""
    cmd = _netns(ns, "iperf3", "-J", "--connect-timeout", "5000", *args)
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def iperf_result(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    """The JSON report of an ``iperf_start``-ed client (killed if it overruns)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        proc.kill()
        proc.communicate()
        raise MeasureError("iperf3: no result in time") from exc
    try:
        data: dict[str, Any] = json.loads(out)
    except json.JSONDecodeError as exc:
        raise MeasureError(f"iperf3: {err.strip()[:200]}") from exc
    if "error" in data:
        raise MeasureError(f"iperf3: {data['error']}")
    return data


def udp_start(
    ns: str, server: str, seconds: float, mbps: float, length: int, port: int
) -> subprocess.Popen[str]:
    """Start an iperf3 UDP client in the background (``udp_finish`` collects it)."""
    args = ["-c", server, "-p", str(port), "-u", "-b", f"{mbps:g}M", "-l", str(length)]
    return iperf_start(ns, [*args, "-w", UDP_SOCKET_BUFFER, "-t", f"{seconds:g}"])


def udp_finish(proc: subprocess.Popen[str], timeout: float) -> dict[str, float]:
    return parse_udp(iperf_result(proc, timeout))


def parse_ping(output: str, count: int) -> dict[str, float]:
    times = [float(m.group(2)) for m in _PING_TIME.finditer(output)]
    if not times:
        raise MeasureError("ping: no replies")
    return {
        "sent": float(count),
        "received": float(len(times)),
        "loss_pct": 100 * (count - len(times)) / count,
        "min_ms": min(times),
        "avg_ms": statistics.fmean(times),
        "p99_ms": percentile(times, 99),
        "max_ms": max(times),
    }


def ping(ns: str, dst: str, count: int = 50, interval: float = 0.01) -> dict[str, float]:
    """``count`` pings every ``interval`` s: min/avg/p99/max RTT from the per-reply times."""
    res = sh(
        *_netns(ns, "ping", "-n", "-c", str(count), "-i", f"{interval:g}", "-W", "1", dst),
        check=False,
        timeout=count * interval + 15,
    )
    return parse_ping(res.stdout, count)


def ping_under_load(
    ns: str, dst: str, seconds: float, interval: float = 0.05, port: int = 5201
) -> dict[str, float]:
    """Ping ``dst`` while one iperf3 TCP stream saturates the path (bufferbloat check)."""
    load = subprocess.Popen(
        [
            *_netns(ns, "iperf3", "-J", "--connect-timeout", "3000", "-c", dst, "-p", str(port)),
            "-t",
            f"{seconds:g}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        time.sleep(min(1.0, seconds / 4))  # let TCP fill the queues first
        count = max(5, int((seconds - 2 * min(1.0, seconds / 4)) / interval))
        result = ping(ns, dst, count=count, interval=interval)
        out, _ = load.communicate(timeout=seconds + IPERF_SLACK)
        with_load: dict[str, float] = dict(result)
        try:
            with_load["load_mbps"] = parse_tcp(json.loads(out))["mbps"]
        except (json.JSONDecodeError, KeyError):
            with_load["load_mbps"] = 0.0
        return with_load
    finally:
        if load.poll() is None:
            load.kill()
            load.wait(5)


def peak_rss_mb(pids: Iterable[int]) -> dict[int, float]:
    """VmHWM of each live pid in MB (MiB/1024 rounded)."""
    out: dict[int, float] = {}
    for pid in pids:
        kb = vm_kb(pid, "VmHWM")
        if kb is not None:
            out[pid] = kb / 1024
    return out
