"""Benchmark: moelb builds and ISA paths side by side -- bench_routing, bench_eplb and bench_moe
run for each variant, interleaved, in one run.

A variant is a moelb build (a folder holding the ``moelb`` package, e.g. made by ``pip install
--target``; none: the moelb this Python imports) and optionally an ISA path forced through the
``MOELB_ISA`` environment variable (``baseline``, ``avx2``, ``avx512``, ``avx512_bf16``; see ``moelb.cpu_isa()``):

    --variant NAME=[FOLDER][:ISA]

Without ``--variant``, the importable moelb is run once per path this CPU offers
(``moelb.available_cpu_isas()``). Each round runs every benchmark script (``--no-torch``: only
moelb's own timings matter here) once per variant, in fresh interpreters; the order of the variants
rotates from round to round so that machine noise hits them alike. For every timed case (routing:
model x threads; EPLB: algorithm x threads, summed over the script's 8 topology/load cases; MoE
layer: model x tokens x threads) the table gives each variant's median over the rounds of the
script's own median wall time, and each variant's time relative to the first variant (1.00: equal;
above 1: slower) as the median over rounds of the ratio within a round (a paired ratio: load that
drifts between rounds cancels). The last line per script is the geometric mean of those ratios.

This is not a timed test: it never fails on speed; it exits with status 1 when a script fails (its
implementations disagree) in any variant.

    python benchmarks/bench_isa.py                       # the installed moelb, every ISA path
    python benchmarks/bench_isa.py --quick               # smoke test, a few seconds per script
    python benchmarks/bench_isa.py --variant native=build/isa/native \\
        --variant portable=build/isa/portable --rounds 5 # two builds (benchmarks/README.md)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_common import load_average, table, write_json  # noqa: E402

DEFAULT_ROUNDS = 3
QUICK_ROUNDS = 1
SCRIPTS = ("routing", "eplb", "moe")
# Each script's arguments: a full run (kept short, since every round runs every variant) and the
# smoke test.
SCRIPT_ARGS: dict[str, tuple[list[str], list[str]]] = {
    "routing": (["--tokens", "16384", "--repeats", "7"], ["--quick"]),
    "eplb": (["--repeats", "9", "--torch-repeats", "1"], ["--quick"]),
    "moe": (["--tokens", "256", "4096", "--repeats", "5"], ["--quick"]),
}
_EPLB_IMPL = re.compile(r"^(deepseek|node|none)@(\d+)$")

Key = tuple[str, ...]


@dataclass
class Variant:
    name: str
    folder: Path | None  # prepended to PYTHONPATH; None: this Python's moelb
    isa: str | None  # MOELB_ISA, or None: the build's own choice

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.folder is not None:
            env["PYTHONPATH"] = os.pathsep.join(
                [str(self.folder), *filter(None, [env.get("PYTHONPATH")])]
            )
        env.pop("MOELB_ISA", None)
        if self.isa is not None:
            env["MOELB_ISA"] = self.isa
        return env


@dataclass
class Result:
    """One script's timings: per round, variant -> key -> seconds."""

    script: str
    rounds: list[dict[str, dict[Key, float]]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> dict[str, dict[Key, list[float]]]:
        """variant -> key -> the seconds of each round it ran."""
        out: dict[str, dict[Key, list[float]]] = {}
        for per_round in self.rounds:
            for variant, per_key in per_round.items():
                for key, seconds in per_key.items():
                    out.setdefault(variant, {}).setdefault(key, []).append(seconds)
        return out

    def median(self, variant: str, key: Key) -> float | None:
        values = self.seconds.get(variant, {}).get(key)
        return statistics.median(values) if values else None

    def ratio(self, variant: str, first: str, key: Key) -> float | None:
        """The median over rounds of variant's time / first's time in the same round (a paired
        ratio: load that drifts between rounds cancels)."""
        ratios = [
            r[variant][key] / r[first][key]
            for r in self.rounds
            if key in r.get(variant, {}) and r.get(first, {}).get(key)
        ]
        return statistics.median(ratios) if ratios else None

    def keys(self) -> list[Key]:
        seen: dict[Key, None] = {}
        for per_key in self.seconds.values():
            for key in per_key:
                seen.setdefault(key, None)
        return list(seen)


def parse_variant(text: str) -> Variant:
    """``NAME=[FOLDER][:ISA]`` -> a Variant; a ValueError names what is wrong."""
    name, sep, rest = text.partition("=")
    if not sep or not name:
        raise ValueError(f"--variant {text!r} is not NAME=[FOLDER][:ISA]")
    folder_text, _, isa = rest.partition(":")
    folder = Path(folder_text) if folder_text else None
    if folder is not None and not (folder / "moelb").is_dir():
        raise ValueError(f"--variant {text!r}: {folder} holds no moelb package")
    return Variant(name, folder, isa or None)


def default_variants() -> list[Variant]:
    """The importable moelb once per ISA path this CPU offers."""
    import moelb

    return [Variant(isa, None, isa) for isa in moelb.available_cpu_isas()]


def describe(variant: Variant) -> str:
    """The variant's moelb version and the ISA path it runs (from a fresh interpreter)."""
    code = (
        "import moelb; f = getattr(moelb, 'cpu_isa', None); "
        "print(moelb.__version__, f() if f else 'no ISA dispatch (single path)')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=variant.env()
    )
    if proc.returncode != 0:
        return "import failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1]
    return proc.stdout.strip()


def routing_seconds(data: dict[str, Any]) -> dict[Key, float]:
    return {(r["case"], f"{r['threads']}"): r["median_seconds"]["moelb"] for r in data["results"]}


def eplb_seconds(data: dict[str, Any]) -> dict[Key, float]:
    totals: dict[Key, float] = {}
    for timing in data["timings"]:
        for impl, seconds in timing["seconds"].items():
            m = _EPLB_IMPL.match(impl)
            if m and seconds is not None:
                key = (m.group(1), m.group(2))
                totals[key] = totals.get(key, 0.0) + seconds
    return totals


def moe_seconds(data: dict[str, Any]) -> dict[Key, float]:
    return {
        (r["case"], f"T={r['num_tokens']}", f"{r['threads']}"): r["median_seconds"]["moelb"]
        for r in data["results"]
    }


EXTRACT: dict[str, Callable[[dict[str, Any]], dict[Key, float]]] = {
    "routing": routing_seconds,
    "eplb": eplb_seconds,
    "moe": moe_seconds,
}


def run_script(script: str, variant: Variant, quick: bool, timeout: float) -> dict[str, Any]:
    """Runs benchmarks/bench_<script>.py for `variant`; its JSON, or a RuntimeError."""
    full, smoke = SCRIPT_ARGS[script]
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "result.json"
        command = [
            sys.executable,
            str(HERE / f"bench_{script}.py"),
            "--no-torch",
            *(smoke if quick else full),
            "--json",
            str(out),
        ]
        proc = subprocess.run(
            command, capture_output=True, text=True, env=variant.env(), timeout=timeout
        )
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stdout + proc.stderr)[-1500:]
            raise RuntimeError(f"bench_{script}.py failed for {variant.name}:\n{tail}")
        return json.loads(out.read_text())


def run(
    variants: Sequence[Variant], scripts: Sequence[str], rounds: int, quick: bool, timeout: float
) -> list[Result]:
    results = {s: Result(s) for s in scripts}
    for r in range(rounds):
        order = [variants[(i + r) % len(variants)] for i in range(len(variants))]
        for script in scripts:
            results[script].rounds.append({})
            for variant in order:
                start = time.perf_counter()
                try:
                    data = run_script(script, variant, quick, timeout)
                except (RuntimeError, subprocess.TimeoutExpired) as e:
                    results[script].failures.append(str(e))
                    print(f"round {r + 1}: {e}", file=sys.stderr, flush=True)
                    continue
                results[script].rounds[-1][variant.name] = EXTRACT[script](data)
                print(
                    f"round {r + 1}/{rounds}: bench_{script} {variant.name} "
                    f"({time.perf_counter() - start:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
    return list(results.values())


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3f}"


def format_result(result: Result, variants: Sequence[Variant]) -> str:
    first = variants[0].name
    others = [v.name for v in variants[1:]]
    header = ["case", *(f"{v.name} ms" for v in variants), *(f"{o} / {first}" for o in others)]
    rows = []
    logs: dict[str, list[float]] = {o: [] for o in others}
    for key in result.keys():
        row = [" ".join(key), *(_ms(result.median(v.name, key)) for v in variants)]
        for o in others:
            ratio = result.ratio(o, first, key)
            if ratio:
                logs[o].append(math.log(ratio))
                row.append(f"{ratio:.2f}")
            else:
                row.append("-")
        rows.append(row)
    if others:
        rows.append(
            [
                "geometric mean",
                *("" for _ in variants),
                *(f"{math.exp(statistics.fmean(logs[o])):.2f}" if logs[o] else "-" for o in others),
            ]
        )
    title = {
        "routing": "bench_routing: select_experts / HashRouter, model threads",
        "eplb": "bench_eplb: rebalance, algorithm threads (sum over the 8 cases)",
        "moe": "bench_moe: DeepSeekMoE.forward, model tokens threads",
    }[result.script]
    return title + "\n" + table(header, rows)


def ratios(result: Result, variants: Sequence[Variant]) -> dict[str, dict[str, float]]:
    first = variants[0].name
    out: dict[str, dict[str, float]] = {}
    for v in variants[1:]:
        per: dict[str, float] = {}
        for key in result.keys():
            ratio = result.ratio(v.name, first, key)
            if ratio:
                per[" ".join(key)] = ratio
        out[v.name] = per
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--variant",
        action="append",
        metavar="NAME=[FOLDER][:ISA]",
        help="a build folder and/or ISA path (repeatable; default: every path of this moelb)",
    )
    parser.add_argument("--rounds", type=int, help=f"interleaved rounds (default {DEFAULT_ROUNDS})")
    parser.add_argument("--only", nargs="+", choices=SCRIPTS, help="run only these scripts")
    parser.add_argument("--quick", action="store_true", help="smoke test: each script's --quick")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per script run")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results as JSON")
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    try:
        args.variants = (
            [parse_variant(v) for v in args.variant] if args.variant else default_variants()
        )
    except ValueError as e:
        parser.error(str(e))
    names = [v.name for v in args.variants]
    if len(set(names)) != len(names):
        parser.error(f"variant names must differ, got {names}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    scripts = args.only or list(SCRIPTS)
    load = load_average()
    described = {v.name: describe(v) for v in args.variants}
    print(
        f"{len(args.variants)} variants x {len(scripts)} scripts x {args.rounds} rounds; "
        f"{os.cpu_count()} CPUs, load average {load if load is None else f'{load:.2f}'}"
    )
    for v in args.variants:
        where = v.folder if v.folder is not None else "this Python's moelb"
        isa = f", MOELB_ISA={v.isa}" if v.isa else ""
        print(f"  {v.name}: {where}{isa} -> moelb {described[v.name]}")
    results = run(args.variants, scripts, args.rounds, args.quick, args.timeout)
    for result in results:
        print()
        print(format_result(result, args.variants))
    failures = [f for r in results for f in r.failures]
    for f in failures:
        print(f"\nFAILED: {f}")
    if args.json:
        write_json(
            args.json,
            {
                "benchmark": "bench_isa",
                "rounds": args.rounds,
                "quick": args.quick,
                "load_average_before": load,
                "load_average_after": load_average(),
                "command": " ".join(["python", "benchmarks/bench_isa.py", *(sys.argv[1:])]),
                "variants": [
                    {
                        "name": v.name,
                        "folder": None if v.folder is None else str(v.folder),
                        "isa": v.isa,
                        "moelb": described[v.name],
                    }
                    for v in args.variants
                ],
                "results": {
                    r.script: {
                        "seconds": {
                            name: {" ".join(k): s for k, s in per.items()}
                            for name, per in r.seconds.items()
                        },
                        "ratio_to_first": ratios(r, args.variants),
                    }
                    for r in results
                },
                "failures": failures,
            },
        )
        print(f"\nwrote {args.json}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
