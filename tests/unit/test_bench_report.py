"""The benchmark's trend table over the stored runs (bench/results)."""

from __future__ import annotations

import json
from pathlib import Path

from bench import report

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
    assert last.endswith(f"| {met}/{len(result['targets'])} |")
    # The README block is replaced in place, not appended again.
    readme = tmp_path / "README.md"
    readme.write_text("# bench\n")
    report.update_trend(readme, RESULTS)
    report.update_trend(readme, RESULTS)
    assert readme.read_text().count(report.TREND_BEGIN) == 1
