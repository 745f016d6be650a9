"""The benchmark's trend table over the stored runs (bench/results)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from bench import measure, peers, report
from bench.measure import summary

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"


def test_trend_table_has_a_row_per_stored_run_with_its_figures(tmp_path: Path) -> None:
    runs = [(f.name, json.loads(f.read_text())) for f in sorted(RESULTS.glob("*.json"))]
    assert runs
    table = report.trend_table([*runs, ("smoke.json", {"smoke": True})])
    lines = table.splitlines()
    assert len(lines) == 2 + len(runs)  # header, rule, one row each; smoke runs left out
    name, result = runs[-1]
    last = lines[-1]
    assert f"(results/{name})" in last and result["commit_short"] in last
    stream = result["paths"]["masqued-stream"]["tcp1_mbps"]["median"]
    assert f"| {stream:.0f} |" in last
    met = sum(1 for t in result["targets"] if t["met"])
    judged = sum(1 for t in result["targets"] if t["met"] is not None)  # not the reported
    assert last.endswith(f"| {met}/{judged} |")
    # The README block is replaced in place, not appended again.
    readme = tmp_path / "README.md"
    readme.write_text("# bench\n")
    report.update_trend(readme, RESULTS)
    report.update_trend(readme, RESULTS)
    assert readme.read_text().count(report.TREND_BEGIN) == 1


# -- a run with both wireguard-go builds ------------------------------------------------


def _path(tcp1: float, cpu: float | None, ping_avg: float, **extra: object) -> dict[str, object]:
    p: dict[str, object] = {
        "status": "ok",
        "tcp1_mbps": summary([tcp1 * 0.9, tcp1, tcp1 * 1.1]),
        "ping": {"avg_ms": summary([ping_avg]), "min_ms": summary([ping_avg / 2])},
        **extra,
    }
    if cpu is not None:
        p["cpu_pct"] = summary([cpu])
    return p


def _run_with_current_wg() -> dict[str, Any]:
    paths = {
        "direct": _path(14000, None, 0.07),
        "masqued-stream": _path(300, 180, 1.4),
        "masqued-datagram": _path(420, 190, 1.0),
        "wireguard-go": _path(460, 150, 0.44, source="bench-peers"),
        "wireguard-go-current": _path(1400, 160, 0.40, source="bench-peers"),
        "openvpn-udp": _path(550, 140, 0.31, source="bench-peers"),
    }
    result: dict[str, Any] = {
        "date": "2026-12-02T15:00:00Z",
        "commit_short": "abcdef1234",
        "machine": {"cores": 2, "kernel": "6.18.44-fc-v1045"},
        "versions": {
            "wireguard-go": "wireguard-go v0.0.20220316",
            "wireguard-go-current": "wireguard-go v0.0.20250522",
        },
        "builds": {
            "wireguard-go-current": {
                "status": "cached",
                "version": "wireguard-go v0.0.20250522",
                "archive": "wireguard-go-0.0.20250522.tar.gz",
                "archive_sha256": "3feff97b70b4caad" + "0" * 48,
            }
        },
        "settings": {"repeats": 3, "tcp_seconds": 5, "udp_seconds": 3, "peer_seconds": 5},
        "host_reference": {
            "python_loop_ms": {
                "start": {**summary([36.0, 35.2, 40.1]), "iterations": 200_000},
                "end": {**summary([37.5, 39.0]), "iterations": 200_000},
            },
            "direct_tcp1_mbps": 14000.0,
        },
        "paths": paths,
    }
    result["ratios"] = report.compute_ratios(paths)
    result["targets"] = report.check_targets(result)
    return result


def test_current_wireguard_go_is_a_reference_beside_debians() -> None:
    result = _run_with_current_wg()
    ratios = result["ratios"]
    assert ratios["masqued-stream vs wireguard-go-current"]["tcp1"] == pytest.approx(300 / 1400)
    assert ratios["masqued-datagram vs wireguard-go"]["tcp1"] == pytest.approx(420 / 460)
    cpu = ratios["masqued-datagram vs wireguard-go-current"]["cpu_per_mbit"]
    assert cpu == pytest.approx((190 / 420) / (160 / 1400))
    # Paths and ratios tables: the current build right after Debian's.
    text = report.render(result)
    names = [line.split(" | ")[0].lstrip("| ") for line in text.splitlines()]
    paths_rows = [n for n in names if n in report.PATH_ORDER]
    assert paths_rows[:6] == [
        "direct",
        "masqued-stream",
        "masqued-datagram",
        "wireguard-go",
        "wireguard-go-current",
        "openvpn-udp",
    ]
    assert "| masqued-stream vs wireguard-go-current | 0.21 |" in text
    assert "wireguard-go-current is wireguard-go v0.0.20250522" in text
    assert "sha256 3feff97b70b4caad; cached" in text


def test_ratios_to_current_wireguard_go_are_reported_not_judged() -> None:
    result = _run_with_current_wg()
    reported = {t["target"]: t for t in result["targets"] if t["limit"] == report.REPORTED}
    assert set(reported) == {
        "stream TCP 1 stream / wireguard-go-current",
        "stream CPU per Mbit/s / wireguard-go-current",
        "datagram TCP 1 stream / wireguard-go-current",
        "datagram CPU per Mbit/s / wireguard-go-current",
    }
    assert all(t["met"] is None for t in reported.values())
    assert reported["stream TCP 1 stream / wireguard-go-current"]["value"] == pytest.approx(
        300 / 1400
    )
    table = report.targets_table(result["targets"])
    assert "| datagram TCP 1 stream / wireguard-go-current | 0.3 | reported (issue 22) | — |" in (
        table
    )
    # Without the current build (skipped: its build failed) the rows are simply absent.
    result["paths"]["wireguard-go-current"] = {"status": "skipped", "note": "build failed: x"}
    result["ratios"] = report.compute_ratios(result["paths"])
    targets = report.check_targets(result)
    assert not [t for t in targets if t["limit"] == report.REPORTED]
    assert "| wireguard-go-current | skipped: build failed: x |" in report.paths_table(
        result["paths"]
    )


def test_host_reference_in_report_and_trend() -> None:
    result = _run_with_current_wg()
    line = report.host_reference_line(result)
    assert "(200,000 iterations) took 35.2 ms at the start, 37.5 ms at the end" in line
    assert "best of 3" in line and "direct path TCP 1 stream 14000 Mbit/s" in line
    assert line in report.render(result)
    old = {k: v for k, v in result.items() if k != "host_reference"}
    assert report.host_reference_line(old) == ""
    header, _rule, new_row, old_row = report.trend_table(
        [("new.json", result), ("old.json", old)]
    ).splitlines()
    cols = [c.strip() for c in header.strip("|").split("|")]
    new = dict(zip(cols, (c.strip() for c in new_row.strip("|").split("|")), strict=True))
    before = dict(zip(cols, (c.strip() for c in old_row.strip("|").split("|")), strict=True))
    assert new["Python loop, ms (start / end)"] == "35.2 / 37.5"
    assert before["Python loop, ms (start / end)"] == "—"
    assert new["wireguard-go (Debian)"] == "460"
    assert new["wireguard-go-current"] == "1400"
    assert new["stream / wireguard-go-current"] == "0.21"
    assert new["datagram / wireguard-go-current"] == "0.30"
    assert new["direct"] == "14000"


def test_peer_output_parsing_keeps_retransmits() -> None:
    out = "\n".join(
        [
            "pre-run busy=3%",
            "tcp1  run1 Mbps/sndCPU/rcvCPU/retr: 1398 12.0 40.1 0  wg-go(both) procCPU% 158"
            " machineCPU% 190/200",
            "tcp1  run2 Mbps/sndCPU/rcvCPU/retr: 1304 11.0 39.1 12  wg-go(both) procCPU% 155"
            " machineCPU% 188/200",
            "tcpP4 run1 Mbps/sndCPU/rcvCPU/retr: 1442 14.0 41.0 3  wg-go(both) procCPU% 160",
            "ping  run1: 50 packets transmitted, 50 received, 0% packet loss, time 600ms"
            " rtt min/avg/max/mdev = 0.300/0.810/1.200/0.100 ms",
        ]
    )
    r = peers.parse_output(out)
    assert r["tcp1_mbps"]["values"] == [1398, 1304]
    assert r["tcp1_retransmits"]["values"] == [0, 12]
    assert r["tcp4_mbps"]["median"] == 1442
    assert r["cpu_pct"]["values"] == [158, 155]
    assert r["ping"]["avg_ms"]["median"] == 0.81


def test_a_run_that_started_another_wireguard_go_is_caught(tmp_path: Path) -> None:
    built = tmp_path / "wireguard-go"
    built.write_text("")
    names = ("wireguard-go",)
    assert peers._foreign({str(built)}, tmp_path, names) == []
    assert peers._foreign({str(built), "/usr/bin/wireguard-go"}, tmp_path, names) == [
        "/usr/bin/wireguard-go"
    ]
    assert peers._foreign({"/usr/bin/wireguard-go"}, None, names) == []


def test_python_loop_reference_is_a_summary_in_ms() -> None:
    r = measure.python_loop_ms(repeats=3, iterations=1000)
    assert r["n"] == 3 and r["iterations"] == 1000
    assert 0 < r["min"] <= r["median"] <= r["max"]


def test_peer_scripts_run_with_quiet_sh_wait_capped(tmp_path: Path) -> None:
    real = tmp_path / "peers"
    real.mkdir()
    (real / "quiet.sh").write_text('echo "busy=3% max=$1 wait=$2"\n')
    (real / "bench_x.sh").write_text(
        'D=$(cd "$(dirname "$0")" && pwd); echo "pre-run $($D/quiet.sh 10 120)"\n'
    )
    (tmp_path / "view").mkdir()
    view = peers.quiet_capped(real, tmp_path / "view", 20)
    assert (view / "bench_x.sh").resolve() == real / "bench_x.sh"
    run = subprocess.run(
        ["bash", str(view / "bench_x.sh")], capture_output=True, text=True, check=True
    )
    assert run.stdout == "pre-run busy=3% max=10 wait=20\n"
    short = subprocess.run(
        [str(view / "quiet.sh"), "5", "3"], capture_output=True, text=True, check=True
    )
    assert short.stdout == "busy=3% max=5 wait=3\n"  # a shorter wait is kept
