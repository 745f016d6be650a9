"""Tables (Markdown, printed and rendered into bench/README.md), ratios and target checks."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

README_BEGIN = "<!-- bench:latest:begin -->"
README_END = "<!-- bench:latest:end -->"

MASQUED_PATHS = (
    "masqued-stream",
    "masqued-datagram",
    "masqued-h2",
    # The same over the other QUIC engine and event loop (issue 18; bench/paths.py).
    "masqued-uvloop-stream",
    "masqued-qh3-stream",
    "masqued-qh3-datagram",
    "masqued-qh3-uvloop-stream",
    "masqued-qh3-uvloop-datagram",
)
PEER_PATHS = ("wireguard-go", "wireguard-go-current", "openvpn-udp", "openvpn-tcp")
REFERENCE_PATHS = ("direct", *PEER_PATHS)
PATH_ORDER = ("direct", *MASQUED_PATHS, *PEER_PATHS)
# The userspace VPN a user would pick today (issue 22): its ratios are reported among
# the targets, not judged.
CURRENT_WG = "wireguard-go-current"
REPORTED = "reported (issue 22)"


def _med(s: Any) -> float | None:
    if isinstance(s, dict) and s.get("n"):
        return float(s["median"])
    return None


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def median_of(d: Any, *keys: str) -> float | None:
    """The median of the summary at ``d[keys...]``, or None."""
    return _med(_get(d, *keys))


def _num(v: float, digits: int) -> str:
    return f"{v:.{digits}f}"


def _auto_digits(v: float) -> int:
    if abs(v) >= 100:
        return 0
    if abs(v) >= 10:
        return 1
    if abs(v) >= 1:
        return 2
    return 3


def fmt(s: Any, digits: int | None = None) -> str:
    """``median [min-max]`` of a summary (just the median when there was one sample)."""
    if not isinstance(s, dict) or not s.get("n"):
        return "—"
    d = digits if digits is not None else _auto_digits(float(s["median"]))
    if s["n"] == 1 or s["min"] == s["max"]:
        return _num(s["median"], d)
    return f"{_num(s['median'], d)} [{_num(s['min'], d)}-{_num(s['max'], d)}]"


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def compute_ratios(paths: dict[str, Any]) -> dict[str, Any]:
    """masqued's medians over each reference's, all measured in this run.

    ``tcp*``: masqued / peer (> 1: masqued faster). ``ping_avg``: masqued / peer (< 1:
    masqued lower latency); ``added_rtt_ms``: masqued - peer. ``cpu_per_mbit``: CPU% per
    Mbit/s of TCP 1 stream, masqued / peer (< 1: masqued cheaper per bit).
    """
    out: dict[str, Any] = {}
    for m in MASQUED_PATHS:
        mp = paths.get(m)
        if not mp or mp.get("status") != "ok":
            continue
        for r in REFERENCE_PATHS:
            rp = paths.get(r)
            if not rp or rp.get("status") != "ok":
                continue
            row: dict[str, float | None] = {
                "tcp1": _ratio(_med(mp.get("tcp1_mbps")), _med(rp.get("tcp1_mbps"))),
                "tcp4": _ratio(_med(mp.get("tcp4_mbps")), _med(rp.get("tcp4_mbps"))),
                "ping_avg": _ratio(
                    _med(_get(mp, "ping", "avg_ms")), _med(_get(rp, "ping", "avg_ms"))
                ),
            }
            ma, ra = _med(_get(mp, "ping", "avg_ms")), _med(_get(rp, "ping", "avg_ms"))
            row["added_rtt_ms"] = ma - ra if ma is not None and ra is not None else None
            mc, rc = _med(mp.get("cpu_pct")), _med(rp.get("cpu_pct"))
            mt, rt = _med(mp.get("tcp1_mbps")), _med(rp.get("tcp1_mbps"))
            if mc is not None and rc is not None and mt and rt:
                row["cpu_per_mbit"] = _ratio(mc / mt, rc / rt)
            else:
                row["cpu_per_mbit"] = None
            out[f"{m} vs {r}"] = row
    return out


def check_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets with this run's figures (reported, never asserted)."""
    paths = result.get("paths", {})
    ratios = result.get("ratios", {})
    rows: list[dict[str, Any]] = []

    def add(name: str, value: float | None, limit: str, ok: bool | None) -> None:
        rows.append({"target": name, "value": value, "limit": limit, "met": ok})

    r = _get(ratios, "masqued-stream vs openvpn-udp", "tcp1")
    add("stream TCP 1 stream / OpenVPN-UDP", r, ">= 0.5", None if r is None else r >= 0.5)
    for m in MASQUED_PATHS:
        if _get(paths, m, "status") != "ok":
            continue
        added = _get(ratios, f"{m} vs direct", "added_rtt_ms")
        add(f"{m}: added RTT at idle, ms", added, "<= 1", None if added is None else added <= 1)
        p99 = _med(_get(paths, m, "ping_loaded", "p99_ms"))
        add(f"{m}: ping p99 under TCP load, ms", p99, "<= 20", None if p99 is None else p99 <= 20)
    # HTTP/2 is the fallback where UDP is blocked, where OpenVPN would run over TCP.
    r = _get(ratios, "masqued-h2 vs openvpn-tcp", "tcp1")
    if _get(paths, "masqued-h2", "status") == "ok":
        add("h2 TCP 1 stream / OpenVPN-TCP", r, ">= 1.0", None if r is None else r >= 1.0)
    loss = _med(_get(paths, "masqued-datagram", "below_capacity", "loss_pct"))
    if loss is not None:
        add("datagram: loss below capacity, %", loss, "< 0.1", loss < 0.1)
    rss = _get(paths, "masqued-stream", "rss_idle_mb", "relay")
    add("relay idle RSS, MB", rss, "<= 60", None if rss is None else rss <= 60)
    for row in _get(result, "scale", "rows") or []:
        per = row.get("relay_rss_marginal_kb")
        if per is not None:
            n = row["clients"]
            add(
                f"relay RSS per additional idle client (at {n} clients), MB",
                per / 1024,
                "<= 0.5",
                per / 1024 <= 0.5,
            )
        if row.get("clients") == 50:
            t = row.get("connect_all_s")
            ok = None if t is None else (t <= 10 and row.get("connected") == 50)
            add("50 clients connect at once, s", t, "<= 10", ok)
    for m in MASQUED_PATHS:
        row = ratios.get(f"{m} vs {CURRENT_WG}")
        if row is None:
            continue
        short = m.removeprefix("masqued-")
        add(f"{short} TCP 1 stream / {CURRENT_WG}", row.get("tcp1"), REPORTED, None)
        add(f"{short} CPU per Mbit/s / {CURRENT_WG}", row.get("cpu_per_mbit"), REPORTED, None)
    return rows


# -- tables ------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _rss(p: dict[str, Any]) -> str:
    peak = p.get("peak_rss_mb") or {}
    if not peak:
        return "—"
    return " / ".join(f"{peak[k]:.1f}" for k in ("relay", "client") if k in peak) or "—"


def paths_table(paths: dict[str, Any]) -> str:
    rows: list[list[str]] = []
    for name in PATH_ORDER:
        p = paths.get(name)
        if p is None:
            continue
        if p.get("status") != "ok":
            note = p.get("note") or "; ".join(p.get("errors", []))[:120]
            rows.append([name, f"{p.get('status')}: {note}"] + [""] * 7)
            continue
        ping = p.get("ping") or {}
        p99 = fmt(ping.get("p99_ms"))
        if p99 == "—" and ping.get("max_ms"):
            p99 = f"(max {fmt(ping.get('max_ms'))})"
        loaded = p.get("ping_loaded") or {}
        loaded_txt = f"{fmt(loaded.get('avg_ms'))} / {fmt(loaded.get('p99_ms'))}" if loaded else "—"
        rows.append(
            [
                name,
                fmt(p.get("tcp1_mbps"), 0),
                fmt(p.get("tcp4_mbps"), 0),
                fmt(ping.get("min_ms"), 3),
                fmt(ping.get("avg_ms"), 3),
                p99,
                loaded_txt,
                fmt(p.get("cpu_pct"), 0),
                _rss(p),
            ]
        )
    header = [
        "path",
        "TCP 1 stream, Mbit/s",
        "TCP 4 streams, Mbit/s",
        "ping min, ms",
        "ping avg, ms",
        "ping p99, ms",
        "ping under TCP load avg / p99, ms",
        "VPN CPU % (TCP 1)",
        "peak RSS relay / client, MB",
    ]
    return _table(header, rows)


def _count(v: Any) -> str:
    return "—" if v is None else f"{v:.0f}"


def udp_table(paths: dict[str, Any]) -> str:
    rows: list[list[str]] = []
    for name in PATH_ORDER:
        p = paths.get(name)
        if not p or p.get("status") != "ok":
            continue
        for u in p.get("udp") or []:
            rows.append(
                [
                    name,
                    f"{u['offered_mbps']:g}",
                    fmt(u.get("recv_mbps"), 1),
                    fmt(u.get("loss_pct"), 2),
                    fmt(u.get("receiver_drops"), 0),
                    fmt(u.get("cpu_pct"), 0),
                ]
            )
        bc = p.get("below_capacity")
        if bc and "offered_mbps" in bc:
            rows.append(
                [
                    f"{name} (below capacity)",
                    f"{bc['offered_mbps']:g}",
                    fmt(bc.get("recv_mbps"), 1),
                    f"{fmt(bc.get('loss_pct'), 3)} "
                    f"({bc['packets_lost']:.0f}/{bc['packets_sent']:.0f} pkts)",
                    _count(bc.get("packets_dropped_by_receiver")),
                    "—",
                ]
            )
    header = [
        "path",
        "offered, Mbit/s",
        "received, Mbit/s",
        "loss (sent vs received), %",
        "of it dropped in the receiver's socket, pkts",
        "VPN CPU %",
    ]
    return _table(header, rows) if rows else "(no UDP figures)"


def ratios_table(ratios: dict[str, Any]) -> str:
    def r(v: Any) -> str:
        if v is None:
            return "—"
        return f"{v:.2f}" if abs(v) >= 0.1 else f"{v:.2g}"

    rows = [
        [
            k,
            r(v.get("tcp1")),
            r(v.get("tcp4")),
            r(v.get("ping_avg")),
            "—" if v.get("added_rtt_ms") is None else f"{v['added_rtt_ms']:+.3f}",
            r(v.get("cpu_per_mbit")),
        ]
        for k, v in ratios.items()
    ]
    header = [
        "masqued vs",
        "TCP 1 stream (x)",
        "TCP 4 streams (x)",
        "ping avg (x)",
        "added RTT, ms",
        "CPU per Mbit/s (x)",
    ]
    return _table(header, rows) if rows else "(no ratios: a side is missing)"


def scale_table(scale: dict[str, Any]) -> str:
    def f(v: Any, d: int = 1) -> str:
        return "—" if v is None else f"{v:.{d}f}"

    rows = [
        [
            str(row["clients"]),
            f"{row.get('connected', 0)}/{row['clients']}",
            f(row.get("connect_all_s"), 2),
            f(row.get("connect_median_s"), 2),
            f(row.get("relay_cpu_s_connect"), 2),
            f"{f(row.get('relay_rss_before_mb'))} → {f(row.get('relay_rss_idle_mb'))}",
            f(row.get("relay_rss_per_client_kb"), 0)
            + (
                f" ({row['relay_rss_marginal_kb']:.0f})"
                if row.get("relay_rss_marginal_kb") is not None
                else ""
            ),
            f(row.get("relay_cpu_pct_idle"), 1),
            f(row.get("relay_cpu_pct_load"), 0),
            f"{f(row.get('clients_cpu_pct_load'), 0)} / {f(row.get('machine_cpu_pct_load'), 0)}",
            f"{f(row.get('load_loss_pct_median'), 2)} / {f(row.get('load_loss_pct_max'), 2)}",
            f(row.get("relay_peak_rss_mb")),
        ]
        for row in scale.get("rows", [])
    ]
    header = [
        "clients",
        "connected",
        "all READY, s",
        "median READY, s",
        "relay CPU s to connect",
        "relay RSS before → with clients, MB",
        "relay RSS KB per client (per extra client)",
        "relay CPU % idle",
        "relay CPU % under load",
        "client daemons / machine CPU % under load",
        "load loss % median / max",
        "relay peak RSS, MB",
    ]
    return _table(header, rows) if rows else "(scale not measured)"


def cores_table(cores: dict[str, Any]) -> str:
    rows = [
        [
            str(row["workers"]),
            " + ".join(map(str, row.get("sessions_per_worker") or [])) or "—",
            fmt(row.get("total_mbps"), 0),
            fmt(row.get("relay_cpu_pct"), 0),
            fmt(row.get("clients_cpu_pct"), 0),
            fmt(row.get("machine_cpu_pct"), 0),
        ]
        for row in cores.get("rows", [])
    ]
    if not rows:
        return "(cores not measured)"
    header = [
        "relay workers",
        "clients per worker",
        "TCP in all, Mbit/s",
        "relay CPU %",
        "client daemons CPU %",
        "machine CPU %",
    ]
    ratio = cores.get("two_over_one")
    tail = f"\n\n2 workers / 1 worker: {ratio:.2f}x" if ratio is not None else ""
    return _table(header, rows) + tail


def targets_table(targets: list[dict[str, Any]]) -> str:
    def v(x: Any) -> str:
        return "—" if x is None else f"{x:.3g}"

    rows = [
        [t["target"], v(t["value"]), t["limit"], {True: "yes", False: "no", None: "—"}[t["met"]]]
        for t in targets
    ]
    return _table(["target (issue 8)", "this run", "goal", "met"], rows)


def host_reference_line(result: dict[str, Any]) -> str:
    """The host-speed reference of a run, in one sentence (or "" for runs without one)."""
    loop = _get(result, "host_reference", "python_loop_ms") or {}
    start, end = loop.get("start"), loop.get("end")
    if not isinstance(start, dict) or not start.get("n"):
        return ""
    text = (
        f"Host speed reference: a fixed pure-Python loop ({start.get('iterations', 0):,}"
        f" iterations) took {start['min']:.1f} ms at the start"
    )
    if isinstance(end, dict) and end.get("n"):
        text += f", {end['min']:.1f} ms at the end"
    text += f" (best of {start['n']}; lower = a faster host state)"
    direct = _get(result, "host_reference", "direct_tcp1_mbps")
    if direct is not None:
        text += f"; direct path TCP 1 stream {direct:.0f} Mbit/s"
    return text + "."


def peers_line(result: dict[str, Any]) -> str:
    """Which builds of the peers were measured."""
    v = result.get("versions") or {}
    parts = []
    if v.get("wireguard-go"):
        parts.append(f"wireguard-go is Debian's package ({v['wireguard-go']})")
    build = _get(result, "builds", CURRENT_WG)
    if isinstance(build, dict):
        if build.get("status") in ("cached", "built"):
            how = (
                f"built in {build.get('seconds', 0):.0f} s"
                if build["status"] == "built"
                else "cached"
            )
            parts.append(
                f"{CURRENT_WG} is {build.get('version')}, built by bench-peers' build.sh"
                f" from {build.get('archive')} (sha256 {str(build.get('archive_sha256'))[:16]};"
                f" {how})"
            )
        else:
            parts.append(f"{CURRENT_WG}: build failed ({build.get('note')})")
    if v.get("openvpn"):
        parts.append(" ".join(str(v["openvpn"]).split()[:2]))
    return ("Peers: " + "; ".join(parts) + ".") if parts else ""


def _paragraphs(*lines: str) -> list[str]:
    """Each non-empty line after a blank one."""
    return [x for line in lines if line for x in ("", line)]


def render(result: dict[str, Any]) -> str:
    """The whole report as Markdown."""
    s = result.get("settings", {})
    head = (
        f"Run {result.get('date')} · commit {result.get('commit_short')}"
        + (" (+ uncommitted changes)" if result.get("dirty") else "")
        + f" · {result.get('machine', {}).get('cores')} cores"
        + f" · {result.get('wall_s', 0):.0f} s"
        + (" · SMOKE (short runs, not comparable)" if result.get("smoke") else "")
    )
    parts = [
        head,
        "",
        f"Medians [min-max] of {s.get('repeats')} repeats; iperf3 TCP {s.get('tcp_seconds'):g} s, "
        f"UDP {s.get('udp_seconds'):g} s with {s.get('udp_payload')}-byte payloads, "
        f"{s.get('ping_count')} pings every 10 ms, masqued tunnel MTU {s.get('mtu')}; "
        f"peers via bench-peers scripts ({s.get('peer_seconds'):g} s runs"
        + (
            f"; their quiet.sh waited at most {s['peer_quiet_wait_s']:g} s"
            if s.get("peer_quiet_wait_s") is not None
            else ""
        )
        + "). "
        "CPU % = the VPN's own processes, both ends (100 = one core).",
        *_paragraphs(peers_line(result), host_reference_line(result)),
        "",
        "**Paths**",
        "",
        paths_table(result.get("paths", {})),
        "",
        "**UDP at fixed offered loads**",
        "",
        udp_table(result.get("paths", {})),
        "",
        "**masqued as ratios to the others (same run)**",
        "",
        ratios_table(result.get("ratios", {})),
        "",
        "**Scale** (stream mode"
        + (
            f"; each client sends {s.get('scale_load_mbps'):g} Mbit/s UDP"
            f" for {s.get('scale_seconds'):g} s under load)"
            if result.get("scale")
            else ")"
        ),
        "",
        scale_table(result.get("scale") or {}),
        "",
        "**Cores** ("
        + (
            f"{result['cores']['clients']} clients, one TCP stream each at once, through a "
            "relay with workers = 1, then workers = 2)"
            if result.get("cores")
            else "relay workers = 1 vs 2)"
        ),
        "",
        cores_table(result.get("cores") or {}),
        "",
        "**Targets**",
        "",
        targets_table(result.get("targets", [])),
    ]
    notes = result.get("notes") or []
    if notes:
        parts += ["", "**Notes**", ""] + [f"- {n}" for n in notes]
    return "\n".join(parts) + "\n"


TREND_BEGIN = "<!-- bench:trend:begin -->"
TREND_END = "<!-- bench:trend:end -->"


def trend_table(results: list[tuple[str, dict[str, Any]]]) -> str:
    """One line per stored run (oldest first): the headline medians and ratios, so the
    trend is visible without opening every JSON. ``results``: (file name, result)."""

    def med(*keys: str, data: dict[str, Any]) -> float | None:
        value = _med(_get(data, *keys))
        return None if value is None else float(value)

    def num(v: float | None, digits: int = 0) -> str:
        return "—" if v is None else f"{v:.{digits}f}"

    rows: list[list[str]] = []
    for name, r in results:
        if r.get("smoke"):
            continue
        paths = r.get("paths", {})
        ratios = r.get("ratios", {})
        targets = r.get("targets", [])
        met = sum(1 for t in targets if t.get("met"))
        judged = sum(1 for t in targets if t.get("met") is not None)
        kernel = str(r.get("machine", {}).get("kernel", ""))
        loop = _get(r, "host_reference", "python_loop_ms") or {}
        best = [_get(loop, k, "min") for k in ("start", "end")]
        rows.append(
            [
                f"[{str(r.get('date', ''))[:16]}](results/{name})",
                str(r.get("commit_short", "")),
                kernel.rsplit("-", 1)[-1] if kernel else "—",
                " / ".join(num(b, 1) for b in best if b is not None) or "—",
                num(med("direct", "tcp1_mbps", data=paths)),
                num(med("masqued-stream", "tcp1_mbps", data=paths)),
                num(med("masqued-datagram", "tcp1_mbps", data=paths)),
                num(med("wireguard-go", "tcp1_mbps", data=paths)),
                num(med(CURRENT_WG, "tcp1_mbps", data=paths)),
                num(med("openvpn-udp", "tcp1_mbps", data=paths)),
                num(_get(ratios, "masqued-stream vs openvpn-udp", "tcp1"), 2),
                num(_get(ratios, f"masqued-stream vs {CURRENT_WG}", "tcp1"), 2),
                num(_get(ratios, f"masqued-datagram vs {CURRENT_WG}", "tcp1"), 2),
                num(_get(ratios, "masqued-stream vs direct", "added_rtt_ms"), 2),
                num(_get(ratios, "masqued-datagram vs direct", "added_rtt_ms"), 2),
                num(med("masqued-stream", "ping_loaded", "p99_ms", data=paths), 1),
                num(med("masqued-datagram", "below_capacity", "loss_pct", data=paths), 3),
                f"{met}/{judged}" if judged else "—",
            ]
        )
    header = [
        "run",
        "commit",
        "host kernel",
        "Python loop, ms (start / end)",
        "direct",
        "stream",
        "datagram",
        "wireguard-go (Debian)",
        "wireguard-go-current",
        "OpenVPN-UDP",
        "stream / OpenVPN-UDP",
        "stream / wireguard-go-current",
        "datagram / wireguard-go-current",
        "added RTT stream, ms",
        "added RTT datagram, ms",
        "stream p99 under load, ms",
        "datagram loss below capacity, %",
        "targets met",
    ]
    return _table(header, rows) if rows else "(no runs stored)"


def update_trend(readme: Path, results_dir: Path) -> None:
    """Re-render the table of every run stored in ``results_dir`` into ``readme``."""
    runs = []
    for f in sorted(results_dir.glob("*.json")):
        try:
            runs.append((f.name, json.loads(f.read_text())))
        except (OSError, ValueError):
            continue
    block = (
        f"{TREND_BEGIN}\nTCP single stream medians in Mbit/s; every run stored in `results/`"
        " (`python -m bench --render` re-renders this table). Host speed reference: the"
        " fixed pure-Python loop's best time at the run's start and end (lower = a faster"
        " host state; runs before it was recorded show —) and the direct path.\n\n"
        f"{trend_table(runs)}\n{TREND_END}"
    )
    _replace_block(readme, TREND_BEGIN, TREND_END, block, "All runs")


def update_readme(readme: Path, result: dict[str, Any], json_name: str) -> None:
    """Replace the block between the markers in ``readme`` with this run's report."""
    block = f"{README_BEGIN}\nFrom `results/{json_name}`.\n\n{render(result)}{README_END}"
    _replace_block(readme, README_BEGIN, README_END, block, "Latest run")


def _replace_block(readme: Path, begin: str, end: str, block: str, heading: str) -> None:
    """``block`` (markers included) in place of the one in ``readme``, or at its end
    under ``heading`` the first time."""
    text = readme.read_text()
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip("\n") + f"\n\n## {heading}\n\n" + block + "\n"
    readme.write_text(text)
