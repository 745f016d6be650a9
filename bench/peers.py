"""The peer VPNs (wireguard-go: Debian's and the current release; OpenVPN UDP/TCP), measured
by calling the scripts in ``../shared/bench-peers/`` (``$MASQUED_BENCH_PEERS``), which are
not part of this project. The current wireguard-go is ``bench_wireguard.sh`` again, with
the binary bench/wgbuild.py built first on its PATH.

Those scripts build their own ``perf-*`` namespaces, run iperf3 TCP and ping through the
tunnel, print one line per run and delete what they create. We parse their lines and, while
a script runs, read the peak RSS (VmHWM) of the VPN processes from /proc. If a script is
interrupted or times out we kill its process group and run its own ``topo.sh down``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.lab import REPO
from bench.measure import summary, vm_kb

PEERS_ENV = "MASQUED_BENCH_PEERS"
PERF_NAMESPACES = ("perf-client", "perf-relay", "perf-target")


@dataclass(frozen=True)
class Peer:
    name: str
    script: str
    args: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    tools: tuple[str, ...]
    processes: tuple[str, ...]  # /proc/PID/comm of the VPN's processes
    tcp4: bool
    built: bool = False  # runs the wireguard-go that bench/wgbuild.py builds, first on PATH


PEERS: tuple[Peer, ...] = (
    Peer(
        "wireguard-go",
        "bench_wireguard.sh",
        (),
        (("TESTS", "tcpP4"),),
        ("wireguard-go", "wg", "iperf3"),
        ("wireguard-go",),
        True,
    ),
    Peer(
        "wireguard-go-current",
        "bench_wireguard.sh",
        (),
        (("TESTS", "tcpP4"),),
        ("wireguard-go", "wg", "iperf3"),
        ("wireguard-go",),
        True,
        built=True,
    ),
    Peer(
        "openvpn-udp",
        "bench_openvpn.sh",
        ("udp",),
        (),
        ("openvpn", "openssl", "iperf3"),
        ("openvpn",),
        False,
    ),
    Peer(
        "openvpn-tcp",
        "bench_openvpn.sh",
        ("tcp",),
        (),
        ("openvpn", "openssl", "iperf3"),
        ("openvpn",),
        False,
    ),
)
PEER_NAMES = tuple(p.name for p in PEERS)

_TCP = re.compile(
    r"^(tcp1|tcpP4)\s+run\d+ Mbps/sndCPU/rcvCPU/retr: (\d+) ([\d.]+) ([\d.]+) (\d+)(.*)$"
)
_PROC_CPU = re.compile(r"procCPU% (-?\d+)")
_MACHINE_CPU = re.compile(r"machineCPU% (-?\d+)/(\d+)")
_PING = re.compile(r"rtt min/avg/max/mdev = ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms")
_PING_RECV = re.compile(r"(\d+) packets transmitted, (\d+) received")
_BUSY = re.compile(r"pre-run busy=(\d+)%")
_FAILURES = ("did not come up", "tunnel ping failed", "route to target not via tunnel")


def peers_dir() -> Path:
    """``$MASQUED_BENCH_PEERS``, else ``../shared/bench-peers`` next to the repository."""
    env = os.environ.get(PEERS_ENV)
    return Path(env) if env else REPO.parent / "shared" / "bench-peers"


def _search_path(bin_dir: Path | None) -> str:
    path = os.environ.get("PATH", "")
    return f"{bin_dir}{os.pathsep}{path}" if bin_dir is not None else path


def _which(tool: str, bin_dir: Path | None = None) -> bool:
    return any(
        os.access(Path(d) / tool, os.X_OK) for d in _search_path(bin_dir).split(os.pathsep)
    ) or any(os.access(Path(d) / tool, os.X_OK) for d in ("/usr/sbin", "/sbin"))


def skip_reason(peer: Peer, directory: Path, bin_dir: Path | None = None) -> str | None:
    """Why ``peer`` cannot be measured here, or None (``bin_dir``: first on its PATH)."""
    if not (directory / peer.script).is_file() or not (directory / "topo.sh").is_file():
        return f"{directory / peer.script} not found (set ${PEERS_ENV})"
    missing = [t for t in peer.tools if not _which(t, bin_dir)]
    if missing:
        return f"not installed: {', '.join(missing)} (make bench-deps)"
    busy = [ns for ns in PERF_NAMESPACES if Path("/run/netns", ns).exists()]
    if busy:
        return f"namespace {busy[0]} exists: another bench-peers run is using the topology"
    return None


def estimate_seconds(peer: Peer, seconds: float, runs: int) -> float:
    """Rough wall time of one script run when the machine is quiet."""
    tests = 2 if peer.tcp4 else 1
    return 12 + runs * tests * (seconds + 1.5) + runs * 1.5


class _RssWatcher(threading.Thread):
    """Samples VmHWM of the peer's processes in perf-client / perf-relay once a second."""

    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__(daemon=True)
        self.names = names
        self.peak_kb: dict[str, int] = {}
        self.executables: set[str] = set()
        self.stop_event = threading.Event()

    def _ns_inodes(self) -> dict[int, str]:
        out: dict[int, str] = {}
        for ns in ("perf-client", "perf-relay"):
            with contextlib.suppress(OSError):
                out[os.stat(f"/run/netns/{ns}").st_ino] = ns.removeprefix("perf-")
        return out

    def _sample(self) -> None:
        inodes = self._ns_inodes()
        if not inodes:
            return
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                comm = Path(f"/proc/{entry}/comm").read_text().strip()
                if comm not in self.names:
                    continue
                role = inodes.get(os.stat(f"/proc/{entry}/ns/net").st_ino)
            except OSError:
                continue
            if not role:
                continue
            with contextlib.suppress(OSError):
                self.executables.add(os.readlink(f"/proc/{entry}/exe"))
            kb = vm_kb(int(entry), "VmHWM")
            if kb is not None:
                self.peak_kb[role] = max(self.peak_kb.get(role, 0), kb)

    def run(self) -> None:
        while not self.stop_event.wait(1.0):
            self._sample()


def parse_output(text: str) -> dict[str, Any]:
    """The figures in a bench-peers script's output."""
    tcp1: list[float] = []
    tcp4: list[float] = []
    retransmits: list[float] = []
    cpu: list[float] = []
    machine: list[float] = []
    ping_min: list[float] = []
    ping_avg: list[float] = []
    ping_max: list[float] = []
    ping_loss: list[float] = []
    busy: float | None = None
    failure: str | None = None
    for line in text.splitlines():
        if m := _TCP.match(line):
            (tcp1 if m.group(1) == "tcp1" else tcp4).append(float(m.group(2)))
            if m.group(1) == "tcp1":
                retransmits.append(float(m.group(5)))
                if c := _PROC_CPU.search(line):
                    cpu.append(float(c.group(1)))
                if c2 := _MACHINE_CPU.search(line):
                    machine.append(float(c2.group(1)))
        elif line.startswith("ping") and (p := _PING.search(line)):
            ping_min.append(float(p.group(1)))
            ping_avg.append(float(p.group(2)))
            ping_max.append(float(p.group(3)))
            if r := _PING_RECV.search(line):
                sent, recv = int(r.group(1)), int(r.group(2))
                ping_loss.append(100 * (sent - recv) / sent if sent else 100.0)
        elif b := _BUSY.search(line):
            busy = float(b.group(1))
        elif any(f in line for f in _FAILURES):
            failure = line.strip()
    out: dict[str, Any] = {"pre_run_busy_pct": busy}
    if tcp1:
        out["tcp1_mbps"] = summary(tcp1)
    if tcp4:
        out["tcp4_mbps"] = summary(tcp4)
    if retransmits:
        out["tcp1_retransmits"] = summary(retransmits)
    if cpu:
        out["cpu_pct"] = summary(cpu)
    if machine:
        out["machine_cpu_pct"] = summary(machine)
    if ping_avg:
        out["ping"] = {
            "min_ms": summary(ping_min),
            "avg_ms": summary(ping_avg),
            "max_ms": summary(ping_max),
            "loss_pct": summary(ping_loss),
        }
    if failure:
        out["failure"] = failure
    return out


def _teardown(directory: Path) -> None:
    with contextlib.suppress(Exception):
        subprocess.run(
            ["bash", str(directory / "topo.sh"), "down"], capture_output=True, timeout=30
        )
    for pidfile in Path("/tmp").glob("perf-iperf3-perf-*.pid"):
        with contextlib.suppress(OSError):
            pidfile.unlink()


def run_peer(
    peer: Peer,
    directory: Path,
    seconds: float,
    runs: int,
    timeout: float,
    log: Path,
    bin_dir: Path | None = None,
    quiet_wait: float | None = None,
) -> dict[str, Any]:
    """Run one bench-peers script; return its figures (``status`` ok or failed).

    ``bin_dir`` goes first on the script's PATH; then every VPN process seen must have
    been started from it, or the run counts as failed (it measured another build).
    ``quiet_wait``: the most seconds the script's quiet.sh may wait for an idle machine
    (its own call asks for 120).
    """
    if quiet_wait is not None:
        with tempfile.TemporaryDirectory(prefix="masqued-bench-peers-") as tmp:
            overlay = quiet_capped(directory, Path(tmp), quiet_wait)
            return _run_peer(peer, overlay, directory, seconds, runs, timeout, log, bin_dir)
    return _run_peer(peer, directory, directory, seconds, runs, timeout, log, bin_dir)


def quiet_capped(directory: Path, into: Path, wait: float) -> Path:
    """``into`` made a view of ``directory`` whose quiet.sh waits at most ``wait`` s.

    The scripts find their helpers next to themselves (``D=$(dirname $0)``), so links to
    every script but quiet.sh, plus a quiet.sh that runs the real one with the wait
    capped, make them use the cap without a copy or a change of theirs.
    """
    for script in directory.glob("*.sh"):
        if script.name != "quiet.sh":
            (into / script.name).symlink_to(script)
    real = directory / "quiet.sh"
    (into / "quiet.sh").write_text(
        "#!/usr/bin/env bash\n"
        f"# {real}, waiting at most {wait:g} s (written by masqued's bench/peers.py)\n"
        f'w=${{2:-600}}; (( w > {wait:.0f} )) && w={wait:.0f}\n'
        f'exec bash {shlex.quote(str(real))} "${{1:-10}}" "$w"\n'
    )
    (into / "quiet.sh").chmod(0o755)
    return into


def _run_peer(
    peer: Peer,
    scripts: Path,
    directory: Path,
    seconds: float,
    runs: int,
    timeout: float,
    log: Path,
    bin_dir: Path | None,
) -> dict[str, Any]:
    env = {
        **os.environ,
        "RUNS": str(runs),
        "BENCH_T": f"{seconds:g}",
        **dict(peer.env),
        "PATH": _search_path(bin_dir),
    }
    watcher = _RssWatcher(peer.processes)
    started = time.monotonic()
    proc = subprocess.Popen(
        ["bash", str(scripts / peer.script), *peer.args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    watcher.start()
    clean = False
    out = ""
    try:
        out, _ = proc.communicate(timeout=timeout)
        clean = True
    except subprocess.TimeoutExpired:
        pass
    finally:
        watcher.stop_event.set()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                out2, _ = proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                out2, _ = proc.communicate()
            out = out or out2 or ""
        if not clean or proc.returncode != 0:
            _teardown(directory)
    log.write_text(out)
    result = parse_output(out)
    result["wall_s"] = round(time.monotonic() - started, 1)
    result["runs"] = runs
    result["seconds"] = seconds
    result["script"] = f"{peer.script} {' '.join(peer.args)}".strip()
    if watcher.peak_kb:
        result["peak_rss_mb"] = {k: v / 1024 for k, v in watcher.peak_kb.items()}
    result["executables"] = sorted(watcher.executables)
    foreign = _foreign(watcher.executables, bin_dir, peer.processes)
    if not clean:
        result["status"] = "failed"
        result["note"] = f"timed out after {timeout:.0f}s"
    elif "tcp1_mbps" not in result:
        result["status"] = "failed"
        result["note"] = result.get("failure") or f"no figures (exit {proc.returncode})"
    elif foreign:
        result["status"] = "failed"
        result["note"] = f"ran {', '.join(foreign)}, not the binary in {bin_dir}"
    else:
        result["status"] = "ok"
    return result


def _foreign(executables: set[str], bin_dir: Path | None, names: tuple[str, ...]) -> list[str]:
    """The VPN executables seen that are not in ``bin_dir`` (none to check without it)."""
    if bin_dir is None:
        return []
    wanted = {os.path.realpath(bin_dir / n) for n in names}
    return sorted(e for e in executables if os.path.realpath(e) not in wanted)
