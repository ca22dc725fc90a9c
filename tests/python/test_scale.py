"""Smoke run of benchmarks/bench_scale.py --quick: the planner and recorder rows run in their own
processes, report their peak memory and conserve the recorded counts. Speed is never asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_scale.py"


def test_bench_scale_quick(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Planner" in result.stdout and "Recorder" in result.stdout
    data = json.loads(out.read_text())
    planner = data["planner"]
    assert {r["algorithm"] for r in planner} == {"deepseek", "moelb"}
    assert len({r["ep_size"] for r in planner}) >= 2  # a table over sizes
    for row in planner:
        assert row["plan_seconds"] > 0 and row["moves_seconds"] > 0, row
        assert row["plan_seconds_no_previous"] > 0 and row["plan_seconds_previous_plan"] > 0, row
        assert 0 < row["balancedness"] <= 1, row
        assert row["peak_rss_mib"] >= row["rss_before_mib"] > 0, row
    recorder = {r["mode"]: r for r in data["recorder"]}
    assert set(recorder) == {"stat", "per_token"}
    for row in recorder.values():
        assert row["counts_conserved"], row
        assert row["dump_shape"] == [row["buffer_size"], data["layers"], row["size"]["num_experts"]]
        # The window is bounded: once it is full, recording as many passes again adds at most
        # the pass being recorded (no more than the window) and some slack.
        assert row["rss_after_twice_mib"] <= row["rss_window_full_mib"] + row["window_mib"] + 16
    assert recorder["stat"]["select_experts_seconds"] > 0
    # recorder.all_reduce across gloo processes, against a plain all_reduce of the same bytes.
    reduce_rows = data["all_reduce"]
    assert reduce_rows and all(r["agrees"] for r in reduce_rows), reduce_rows
    assert all(r["recorder_seconds"] > 0 and r["all_reduce_seconds"] > 0 for r in reduce_rows)
