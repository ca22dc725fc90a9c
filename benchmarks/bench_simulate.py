"""How fast the simulator replays recorded counts: DeepSeek-V3's 58 MoE layers x 256 experts,
--steps (10,000) steps, a rebalance every --period (1,000) steps with deepseek and moelb on 288
slots over 32 GPUs in 4 nodes. Goal: the whole replay (loading the dump included) under 10 s.

The trace is synthetic but shaped like a recording: per window a Zipf-like popularity
(exponent 0.6) over a random expert order in which 25 pairs swap from window to window, Poisson
counts of about --tokens (4,096) x 8 routed slots per step and layer; saved as an .npz recorder
dump (SGLang's stat layout), then replayed with ``moelb.simulate(SimulationConfig(trace=...))``.

    python benchmarks/bench_simulate.py           # 58 x 10,000 steps, period 1,000
    python benchmarks/bench_simulate.py --quick   # smoke test: 58 x 400 steps, period 100
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import moelb
from bench_common import load_average, table, write_json

GOAL_SECONDS = 10.0


def make_trace(steps: int, period: int, tokens: int, seed: int) -> np.ndarray:
    """[steps, 58, 256] int32 counts whose hot set moves every window (25 random swaps of the
    popularity order per layer)."""
    rng = np.random.default_rng(seed)
    L, E, K = 58, 256, 8
    zipf = 1.0 / np.arange(1, E + 1) ** 0.6
    order = np.stack([rng.permutation(E) for _ in range(L)])
    out = np.empty((steps, L, E), np.int32)
    for first in range(0, steps, period):
        last = min(first + period, steps)
        for layer in range(L):
            for a, b in rng.integers(0, E, (25, 2)):
                order[layer, a], order[layer, b] = order[layer, b], order[layer, a]
        popularity = zipf[order]
        lam = tokens * K * popularity / popularity.sum(axis=1, keepdims=True)
        out[first:last] = rng.poisson(lam, (last - first, L, E))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--period", type=int, default=1_000)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="400 steps, period 100, 1 repeat")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.period, args.repeats = 400, 100, 1

    t0 = time.perf_counter()
    counts = make_trace(args.steps, args.period, args.tokens, args.seed)
    generate_seconds = time.perf_counter() - t0
    results = []
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "expert_distribution_recorder.npz"
        moelb.save_expert_distribution(
            {"rank": 0, "logical_count": counts, "average_utilization_rate_over_window": None},
            path,
        )
        size_mb = path.stat().st_size / 1e6
        del counts
        config = moelb.SimulationConfig(
            model="deepseek-v3",
            ep_size=32,
            num_nodes=4,
            num_redundant_experts=32,
            rebalance_period=args.period,
            algorithms=("deepseek", "moelb"),
            trace=str(path),
        )
        result = None
        for threads in args.threads:
            moelb.set_num_threads(threads)
            times, phases = [], []
            for _ in range(args.repeats):
                start = time.perf_counter()
                result = moelb.simulate(config)
                times.append(time.perf_counter() - start)
                phases.append(result.timings)
            best = int(np.argmin(times))
            results.append(
                {
                    "threads": threads,
                    "seconds_min": min(times),
                    "seconds_median": float(np.median(times)),
                    "phases_of_fastest": phases[best],
                }
            )
        moelb.set_num_threads(0)
    assert result is not None
    a = result.algorithms
    quality = {
        name: {
            "in_window": r.in_window,
            "predictive": r.predictive,
            "moved_experts_per_rebalance": float(np.mean(r.moved_experts))
            if r.moved_experts
            else 0.0,
            "plan_ms": float(np.mean(r.plan_seconds) * 1e3) if r.plan_seconds else 0.0,
            "min_gap": r.min_gap,
        }
        for name, r in a.items()
    }
    slowest = max(r["seconds_median"] for r in results)
    met = slowest < GOAL_SECONDS
    load = load_average()
    print(
        f"replay: {args.steps:,} steps x 58 layers x 256 experts (dump {size_mb:.0f} MB .npz, "
        f"generated in {generate_seconds:.1f} s), rebalance every {args.period:,} steps "
        f"({result.num_windows} windows) with deepseek and moelb, 288 slots / 32 GPUs / 4 nodes; "
        f"{platform.machine()}, load average {load if load is not None else '?'}; "
        f"moelb {moelb.__version__}\n"
    )
    rows = []
    for r in results:
        p = r["phases_of_fastest"]
        rows.append(
            [
                str(r["threads"]),
                f"{r['seconds_median']:.2f}",
                f"{r['seconds_min']:.2f}",
                f"{p.get('load_trace', 0):.2f}",
                f"{p['scoring']:.2f}",
                f"{p['planning']:.2f}",
                f"{args.steps * 58 / r['seconds_min'] / 1e6:.2f}",
            ]
        )
    print(
        table(
            [
                "threads",
                "median s",
                "min s",
                "load s",
                "scoring s",
                "planning s",
                "M layer-steps/s",
            ],
            rows,
        )
    )
    print(
        f"goal: replay under {GOAL_SECONDS:.0f} s: "
        + (f"met (slowest median {slowest:.2f} s)" if met else f"NOT met ({slowest:.2f} s)")
    )
    print()
    print(
        table(
            ["placement", "in-window", "predictive", "moved/rebalance", "plan ms", "min gap"],
            [
                [
                    name,
                    f"{q['in_window']:.4f}",
                    f"{q['predictive']:.4f}",
                    f"{q['moved_experts_per_rebalance']:,.0f}",
                    f"{q['plan_ms']:.1f}",
                    f"{q['min_gap']:.4f}",
                ]
                for name, q in quality.items()
            ],
        )
    )
    if args.json is not None:
        write_json(
            args.json,
            {
                "benchmark": "bench_simulate",
                "command": " ".join(sys.argv),
                "steps": args.steps,
                "period": args.period,
                "tokens": args.tokens,
                "dump_mb": size_mb,
                "generate_seconds": generate_seconds,
                "results": results,
                "quality": quality,
                "goal": {"seconds": GOAL_SECONDS, "met": met},
                "load_average": load,
                "moelb": moelb.__version__,
                "numpy": np.__version__,
                "python": platform.python_version(),
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
