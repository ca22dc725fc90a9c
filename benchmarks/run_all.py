"""Runs every benchmark and collects the results: benchmarks/results/latest.json (each script's
JSON, exit status, wall time and output, with the machine and commit) and latest.md (a summary
table, then each script's printed tables).

    python benchmarks/run_all.py                 # full runs (several minutes)
    python benchmarks/run_all.py --quick         # every script's smoke test
    python benchmarks/run_all.py --only bench_simulate bench_eplb

Scripts run one after another in fresh interpreters (this one's), in the order below; a missing
optional script (bench_moe.py) is skipped. The exit status is 1 if any script failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import load_average, table, write_json

HERE = Path(__file__).resolve().parent
BENCHMARKS = (
    "bench_routing",
    "bench_recorder",
    "bench_all_reduce",
    "bench_eplb",
    "bench_waterfill",
    "bench_moe",
    "bench_simulate",
    "bench_objective",
    "bench_dispatch",
    "bench_move_cost",
    "bench_step_time",
)


def _commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=HERE,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def run_one(name: str, quick: bool, timeout: float) -> dict[str, Any]:
    script = HERE / f"{name}.py"
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / f"{name}.json"
        command = [sys.executable, str(script), *(["--quick"] if quick else []), "--json", str(out)]
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                command, capture_output=True, text=True, timeout=timeout, env=dict(os.environ)
            )
            returncode, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as e:
            returncode = None
            stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            stderr = f"timed out after {timeout:.0f} s"
        seconds = time.perf_counter() - start
        results = json.loads(out.read_text()) if out.exists() else None
    return {
        "script": f"benchmarks/{name}.py",
        "command": " ".join(["python", f"benchmarks/{name}.py", *(["--quick"] if quick else [])]),
        "ok": returncode == 0,
        "returncode": returncode,
        "seconds": seconds,
        "stdout": stdout,
        "stderr_tail": stderr[-2000:],
        "results": results,
    }


def markdown(payload: dict[str, Any]) -> str:
    lines = [
        "# Benchmark results",
        "",
        f"`{payload['command']}` at commit `{payload['commit']}`, {payload['date']}; "
        f"{payload['machine']}, {payload['cpus']} CPUs, load average "
        f"{payload['load_average_before']} before the run; Python {payload['python']}.",
        "",
        "| benchmark | status | wall time |",
        "|---|---|---|",
    ]
    for name, r in payload["benchmarks"].items():
        status = "ok" if r["ok"] else ("skipped" if r.get("skipped") else "FAILED")
        wall = f"{r['seconds']:.1f} s" if "seconds" in r else "-"
        lines.append(f"| `{name}` | {status} | {wall} |")
    for name, r in payload["benchmarks"].items():
        if r.get("skipped"):
            continue
        lines += ["", f"## `{name}`", "", f"`{r['command']}`", "", "```", r["stdout"].rstrip()]
        if not r["ok"]:
            lines += ["--- stderr (tail) ---", r["stderr_tail"].rstrip()]
        lines.append("```")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="run each script's smoke test")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run only these")
    parser.add_argument(
        "--output-dir", type=Path, default=HERE / "results", help="default: benchmarks/results"
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per script")
    args = parser.parse_args()

    payload: dict[str, Any] = {
        "command": "python benchmarks/run_all.py" + (" --quick" if args.quick else ""),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _commit(),
        "machine": f"{platform.system()} {platform.machine()}",
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_before": load_average(),
        "benchmarks": {},
    }
    if args.only:
        payload["command"] += " --only " + " ".join(args.only)
    rows = []
    for name in args.only or BENCHMARKS:
        if not (HERE / f"{name}.py").exists():
            payload["benchmarks"][name] = {"ok": True, "skipped": True}
            rows.append([name, "skipped (no script)", "-"])
            continue
        print(f"running {name} ...", file=sys.stderr, flush=True)
        result = run_one(name, args.quick, args.timeout)
        payload["benchmarks"][name] = result
        rows.append([name, "ok" if result["ok"] else "FAILED", f"{result['seconds']:.1f}"])
    args.output_dir.mkdir(parents=True, exist_ok=True)
    write_json(args.output_dir / "latest.json", payload)
    md = args.output_dir / "latest.md"
    tmp = md.with_name(f".{md.name}.tmp")
    tmp.write_text(markdown(payload), encoding="utf-8")
    os.replace(tmp, md)
    print(table(["benchmark", "status", "seconds"], rows))
    print(f"wrote {args.output_dir / 'latest.json'} and {md}")
    return 0 if all(r["ok"] for r in payload["benchmarks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
