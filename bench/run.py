"""``python -m bench``: the whole benchmark in one go (issue 8).

Order: the current wireguard-go's build (cached; before the time budget starts), the
direct routed path, masqued stream mode, masqued datagram mode (when ``masqued check``
accepts ``transport = "datagram"``), masqued over HTTP/2 (datagram mode, TLS over
TCP: beside OpenVPN-TCP), the peer VPNs through the bench-peers scripts
(their own quiet.sh may wait for an idle machine), then the relay with 1/10/50 clients
and with 1 and 2 workers. Prints the tables, writes
``bench/results/<date>-<commit>.json`` and renders them into ``bench/README.md``.
``--smoke`` runs the same code with very short durations and writes nothing into the
repository. Every section is bounded; a global time budget skips what would not fit.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import datetime as dt
import fcntl
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import Any

from bench import cores, peers, report, scale, wgbuild
from bench.lab import REPO, sh, sweep_stale
from bench.measure import NCPU, python_loop_ms, wait_quiet
from bench.paths import ENGINE_KINDS, Settings, datagram_supported, measure_path

RESULTS = REPO / "bench" / "results"
README = REPO / "bench" / "README.md"
LOCK = Path("/run/lock/masqued-bench.lock")
QUIET_BUSY_PCT = 15.0
# CI runs the smoke: both wireguard-go builds, so the current one's build cannot rot.
SMOKE_PEERS = ("wireguard-go", "wireguard-go-current")

FULL = Settings(
    tcp_seconds=5,
    udp_seconds=3,
    udp_loads_mbps=(20, 100, 400),
    ping_count=50,
    loaded_ping_seconds=6,
    repeats=3,
    mtu=1300,
    scale_clients=(1, 10, 50),
    scale_load_mbps=0.1,  # x 50 clients: 5 Mbit/s (see bench/scale.py)
    scale_seconds=5,
    cores_clients=8,
    peer_seconds=5,
    peer_quiet_wait_s=20,
    budget_s=570,  # + make's own checks and the 60 s quiet wait stay inside 10 minutes
)
SMOKE = Settings(
    tcp_seconds=1,
    udp_seconds=1,
    udp_loads_mbps=(10, 100),
    ping_count=20,
    loaded_ping_seconds=3,
    repeats=1,
    mtu=1300,
    scale_clients=(1, 3),
    scale_load_mbps=1,
    scale_seconds=1,
    cores_clients=2,
    peer_seconds=1,
    peer_quiet_wait_s=5,
    budget_s=170,
)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def single_run(wait: float = 30) -> Iterator[None]:
    """One harness at a time on this machine (the peer scripts use fixed names)."""
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK, "w") as f:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise SystemExit("bench: another benchmark is running (lock held)") from None
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def git_info() -> dict[str, Any]:
    head = sh("git", "-C", str(REPO), "rev-parse", "HEAD", check=False).stdout.strip()
    status = sh(
        "git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no", check=False
    ).stdout
    dirty = sorted(line[3:] for line in status.splitlines() if line.strip())
    return {
        "commit": head or "unknown",
        "commit_short": head[:10] if head else "unknown",
        "dirty": bool(dirty),
        "dirty_files": dirty,
    }


def _first_line(*cmd: str) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    with contextlib.suppress(Exception):
        res = sh(*cmd, check=False, timeout=10)
        text = (res.stdout or res.stderr).strip()
        return text.splitlines()[0] if text else None
    return None


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    return {
        "cores": NCPU,
        "cpu_model": model,
        "mem_mb": mem_kb // 1024,
        "kernel": platform.release(),
    }


def versions(build: wgbuild.Build | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"python": platform.python_version()}
    for dist in ("aioquic", "qh3", "cryptography", "uvloop"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    out["iperf3"] = _first_line("iperf3", "--version")
    out["wireguard-go"] = _first_line("wireguard-go", "--version")
    if build is not None and build.ok:
        out["wireguard-go-current"] = build.version
    out["openvpn"] = _first_line("openvpn", "--version")
    return out


def make_pki(d: Path) -> Path:
    from masqued.gate import pki

    pki.init_ca(d)
    pki.issue(d, "relay.example", "relay", sans=["198.18.1.1"])
    return d


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="very short runs, 1 repeat, no results")
    p.add_argument("--repeats", type=int, help="repeats per path (default 3)")
    p.add_argument("--seconds", type=float, help="iperf3 TCP duration (default 5)")
    p.add_argument("--mtu", type=int, help="masqued tunnel MTU (default 1300)")
    p.add_argument(
        "--only",
        help=(
            "comma list of sections: direct,stream,datagram,h2,engines,peers,scale,cores "
            "(default all)"
        ),
    )
    p.add_argument(
        "--peers",
        help=f"comma list of {','.join(peers.PEER_NAMES)} or 'none' "
        "(default all; smoke: wireguard-go,wireguard-go-current)",
    )
    p.add_argument("--scale", help="client counts, e.g. 1,10,50")
    p.add_argument(
        "--budget", type=float, help="wall-time limit in seconds (default 570; smoke 170)"
    )
    p.add_argument("--out", type=Path, help="write the JSON into this directory")
    p.add_argument("--no-readme", action="store_true", help="do not update bench/README.md")
    p.add_argument("--no-wait-quiet", action="store_true", help="do not wait for an idle machine")
    p.add_argument("--render", type=Path, help="only render this result JSON into bench/README.md")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    base = SMOKE if args.smoke else FULL
    over: dict[str, Any] = {}
    if args.repeats:
        over["repeats"] = args.repeats
    if args.seconds:
        over["tcp_seconds"] = args.seconds
    if args.mtu:
        over["mtu"] = args.mtu
    if args.scale:
        over["scale_clients"] = tuple(int(x) for x in args.scale.split(",") if x)
    if args.budget:
        over["budget_s"] = args.budget
    return Settings(**{**asdict(base), **over})


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        result = json.loads(args.render.read_text())
        report.update_readme(README, result, args.render.name)
        report.update_trend(README, RESULTS)
        print(report.render(result))
        return 0
    if os.geteuid() != 0:
        log("bench: needs root (network namespaces, TUN, netfilter)")
        return 2
    for tool in ("iperf3", "ping", "ip"):
        if shutil.which(tool) is None:
            log(f"bench: {tool} not found; run `make bench-deps`")
            return 2
    settings = settings_from(args)
    sections = set(
        (args.only or "direct,stream,datagram,h2,engines,peers,scale,cores").split(",")
    )
    if args.peers:
        wanted = [] if args.peers == "none" else args.peers.split(",")
    else:
        wanted = list(SMOKE_PEERS) if args.smoke else list(peers.PEER_NAMES)
    unknown = set(wanted) - set(peers.PEER_NAMES)
    if unknown:
        log(f"bench: unknown peer(s): {', '.join(sorted(unknown))}")
        return 2
    signal.signal(signal.SIGTERM, _sigterm)
    with single_run():
        return _run(args, settings, sections, wanted)


def build_peers(sections: set[str], wanted: list[str]) -> wgbuild.Build | None:
    """Build (or find cached) the binary of the peers that need one, before the clock
    starts: a cold build (Go's install included) must not eat the measurements' budget."""
    if "peers" not in sections or not any(p.built and p.name in wanted for p in peers.PEERS):
        return None
    log("== wireguard-go-current: bench-peers' build.sh, cached per source archive")
    build = wgbuild.ensure_built(peers.peers_dir(), log)
    log(
        f"   {build.status} in {build.seconds:.1f} s: {build.binary or build.note}"
        + (" (installed Go 1.23 first)" if build.go_installed else "")
    )
    return build


def _run(
    args: argparse.Namespace, settings: Settings, sections: set[str], wanted: list[str]
) -> int:
    build = build_peers(sections, wanted)
    started = time.monotonic()
    deadline = started + settings.budget_s

    def time_left() -> float:
        return deadline - time.monotonic()

    notes: list[str] = []
    # The daemons run from this checkout: give them byte-compiled modules, as the
    # package installs them, even where PYTHONDONTWRITEBYTECODE is set (otherwise
    # every client start compiles masqued from source, ~0.1 s CPU each).
    compileall.compile_dir(str(REPO / "masqued"), quiet=1)
    stale = sweep_stale()
    if stale:
        notes.append(f"removed {len(stale)} stale bench namespace(s) of an earlier killed run")
    if args.smoke or args.no_wait_quiet:
        busy = wait_quiet(100, 0)
    else:
        log("waiting for a quiet machine (up to 60 s) ...")
        busy = wait_quiet(QUIET_BUSY_PCT, 60)
    if busy > QUIET_BUSY_PCT:
        notes.append(
            f"machine was {busy:.0f}% busy before the run (other work running): "
            "figures may be low and noisy"
        )
    result: dict[str, Any] = {
        "schema": 1,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **git_info(),
        "machine": machine_info(),
        "versions": versions(build),
        "smoke": bool(args.smoke),
        "settings": {**asdict(settings), "udp_payload": settings.udp_payload},
        "pre_run_busy_pct": round(busy, 1),
        # How fast the host runs Python at the start and the end of the run, beside the
        # direct path's figure: tells runs on a slow host state from slow code.
        "host_reference": {"python_loop_ms": {"start": python_loop_ms()}},
        "paths": {},
        "notes": notes,
    }
    if build is not None:
        result["builds"] = {"wireguard-go-current": build.as_json()}
    workdir = Path(tempfile.mkdtemp(prefix="masqued-bench-"))
    keep_workdir = False
    interrupted = False
    try:
        pki = make_pki(workdir / "pki")
        kinds: list[str] = [k for k in ("direct", "stream") if k in sections]
        if "datagram" in sections:
            ok, why = datagram_supported(pki, workdir, settings.mtu)
            if ok:
                kinds.append("datagram")
            else:
                result["paths"]["masqued-datagram"] = {
                    "status": "skipped",
                    "note": f"masqued check refuses transport = datagram: {why}",
                }
                notes.append(f"datagram mode not measured: masqued check said: {why}")
        if "h2" in sections:
            kinds.append("h2")
        if "engines" in sections:
            # The other QUIC engine and event loop (issue 18), right after the default.
            kinds.extend(ENGINE_KINDS)
        for kind in kinds:
            name = kind if kind == "direct" else f"masqued-{kind}"
            # every repeat, plus the lab and daemons coming up and going down
            need = settings.repeats * settings.repeat_seconds() + 15
            if time_left() < need:
                result["paths"][name] = {"status": "skipped", "note": "time budget"}
                notes.append(f"{name} skipped: time budget")
                continue
            log(f"== {name}")
            r = measure_path(kind, settings, pki, workdir, time_left, log)
            result["paths"][name] = r
            if r["status"] != "ok":
                keep_workdir = True
                log(f"   {name} FAILED: {r['errors'][-1][:300] if r['errors'] else ''}")
        # Peers before scale: the ratios to them are the headline figures.
        if "peers" in sections:
            _run_peers(result, settings, wanted, workdir, time_left, notes, build)
        sections_after = (
            (
                "scale",
                20.0,
                f"{', '.join(map(str, settings.scale_clients))} clients",
                scale.measure_scale,
            ),
            (
                "cores",
                cores.estimate_seconds(settings),
                f"{settings.cores_clients} clients through workers = 1 and 2",
                cores.measure_cores,
            ),
        )
        for name, need, what, measure_section in sections_after:
            if name not in sections:
                continue
            if time_left() < need:
                notes.append(f"{name} skipped: time budget")
                continue
            log(f"== {name}: {what}")
            out = result[name] = measure_section(settings, pki, workdir, time_left, log)
            if out["errors"]:
                keep_workdir = True
                notes.extend(f"{name}: {e.splitlines()[0]}" for e in out["errors"])
            notes.extend(f"{name} skipped {x}" for x in out.get("skipped", []))
    except KeyboardInterrupt:
        interrupted = True
        notes.append("interrupted")
        log("bench: interrupted, cleaning up")
    finally:
        sweep_stale()
    result["wall_s"] = round(time.monotonic() - started, 1)
    if not interrupted:
        result["host_reference"]["python_loop_ms"]["end"] = python_loop_ms()
        after = wait_quiet(100, 0)
        result["post_run_busy_pct"] = round(after, 1)
        if after > QUIET_BUSY_PCT:
            notes.append(
                f"machine was {after:.0f}% busy right after the run: other work overlapped it"
            )
    result["host_reference"]["direct_tcp1_mbps"] = report.median_of(
        result["paths"], "direct", "tcp1_mbps"
    )
    result["ratios"] = report.compute_ratios(result["paths"])
    result["targets"] = report.check_targets(result)
    if result.get("dirty"):
        notes.append(
            "measured a working tree with uncommitted changes to: "
            + ", ".join(result["dirty_files"][:12])
        )
    if keep_workdir:
        notes.append(f"daemon logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    text = report.render(result)
    print(text)
    _write(args, result, text)
    if interrupted:
        return 130
    # The harness's own sections must work (CI's smoke run relies on this); a peer that
    # could not run is only a note.
    broken = [
        name
        for name, p in result["paths"].items()
        if p.get("status") == "failed" and p.get("source") != "bench-peers"
    ]
    for section in ("scale", "cores"):
        if section in result and (result[section]["errors"] or not result[section]["rows"]):
            broken.append(section)
    if broken:
        log(f"bench: failed: {', '.join(broken)}")
        return 1
    return 0


def _run_peers(
    result: dict[str, Any],
    settings: Settings,
    wanted: list[str],
    workdir: Path,
    time_left: Any,
    notes: list[str],
    build: wgbuild.Build | None,
) -> None:
    directory = peers.peers_dir()
    runs = settings.repeats
    for peer in peers.PEERS:
        if peer.name not in wanted:
            continue
        bin_dir: Path | None = None
        if not peer.built:
            why = peers.skip_reason(peer, directory)
        elif build is None or not build.ok or build.binary is None:
            why = f"build failed: {build.note if build else 'not built'}"
        else:
            bin_dir = Path(build.binary).parent
            why = peers.skip_reason(peer, directory, bin_dir)
        est = peers.estimate_seconds(peer, settings.peer_seconds, runs)
        quiet = settings.peer_quiet_wait_s
        if why is None and time_left() < est + quiet + 10:
            why = "time budget"
        if why is not None:
            result["paths"][peer.name] = {"status": "skipped", "note": why}
            notes.append(f"{peer.name} not measured: {why}")
            log(f"== {peer.name}: skipped ({why})")
            continue
        log(f"== {peer.name} ({directory / peer.script})")
        # its quiet.sh waits up to `quiet` s first; a busy machine also slows the runs
        timeout = min(est + quiet + 60, max(time_left() - 5, est + quiet + 10))
        r = peers.run_peer(
            peer,
            directory,
            settings.peer_seconds,
            runs,
            timeout,
            workdir / f"{peer.name}.log",
            bin_dir,
            quiet,
        )
        r["source"] = "bench-peers"
        result["paths"][peer.name] = r
        if r["status"] != "ok":
            notes.append(f"{peer.name} failed: {r.get('note')}")
            log(f"   {peer.name} FAILED: {r.get('note')}")
        else:
            log(
                f"   {peer.name}: tcp1 {report.fmt(r.get('tcp1_mbps'), 0)} Mbit/s,"
                f" ping avg {report.fmt((r.get('ping') or {}).get('avg_ms'), 3)} ms"
            )
        busy = r.get("pre_run_busy_pct")
        if busy is not None and busy > 10:
            notes.append(f"{peer.name}: bench-peers' quiet.sh saw the machine {busy:.0f}% busy")


def _write(args: argparse.Namespace, result: dict[str, Any], text: str) -> None:
    stamp = result["date"].replace("-", "").replace(":", "")[:13]  # 20250101T1200
    name = f"{stamp}-{result['commit_short']}.json"
    if args.out is not None:
        out_dir: Path = args.out
    elif args.smoke:
        out_dir = Path(tempfile.gettempdir())
        name = "masqued-bench-smoke.json"
    else:
        out_dir = RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    path.write_text(json.dumps(result, indent=1, sort_keys=False) + "\n")
    log(f"bench: wrote {path}")
    if not args.smoke and not args.no_readme and args.out is None and README.exists():
        report.update_readme(README, result, name)
        report.update_trend(README, RESULTS)
        log(f"bench: updated {README}")
