"""Smoke runs of the benchmark scripts: they must run end to end and agree with their reference
implementations. Speed is measured by running them directly, never asserted here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.parametrize("extra", [[], ["--no-torch"]], ids=["with-torch", "no-torch"])
def test_bench_routing_quick(tmp_path: Path, extra: list[str]) -> None:
    out = tmp_path / "routing.json"
    result = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "bench_routing.py"),
            "--quick",
            "--json",
            str(out),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "moelb" in result.stdout
    data = json.loads(out.read_text())
    cases = {r["case"] for r in data["results"]}
    assert {"V3", "V4-Flash", "V4-Pro", "V4-hash"} <= cases
    assert all(a["ok"] for a in data["agreement"]), data["agreement"]
