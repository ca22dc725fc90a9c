"""Benchmark: what re-planning against the placement in service costs in weight traffic and buys
in balancedness, for each ``move_cost``, when only sampling noise changed -- and when the traffic
really changed. This is how ``moelb.rebalance``'s default ``move_cost`` was chosen (issue 16).

At DeepSeek-V3 scale (--layers MoE layers, default 58, of 256 experts in 8 groups; 288 slots on 32
GPUs in 4 nodes; one expert's weights are 44 MB in FP8), every layer has a fixed Zipf-like
popularity (1 / rank^0.6 over a seeded expert order). A window of W passes holds, per layer,
W x 4,096 tokens x top-8 routed picks drawn multinomially from the popularity. Then:

1. window 1 is planned from the trivial placement (``previous=trivial``, move_cost 0);
2. window 2 is re-planned with ``previous`` = the window-1 plan, once per move_cost of the grid;
3. every plan is scored on a fresh window 3 by SGLang's balancedness (``PlanStats.balancedness``).

Scenarios: ``noise`` draws windows 2 and 3 from the same popularity (only sampling noise
changed); ``shift N%`` first lets N% of each layer's experts trade popularity (a random
permutation among them): a real change a re-plan must follow. Each (scenario, W) runs --repeats
seeded repeats; the table shows their means: slots rewritten (and % of all slots), GB moved,
balancedness gained in window 2 (in-window, what the planner sees) and in window 3 (next window,
what serving gets) over keeping the window-1 plan, and the share of the move_cost-0 re-plan's
next-window gain kept. It also reports, per (scenario, W), the largest and the median per-layer
gain per move of the unconstrained re-plan: the relative max-GPU-load reduction per slot
rewritten, which is what move_cost thresholds.

This is not a timed test. It exits with status 1 only on an inconsistency the library rules out:
a re-placed layer whose gain is below move_cost x its moves, or moved-slot counts that disagree
with the placements.

    python benchmarks/bench_move_cost.py             # 58 layers, W = 100 and 1,000 (~10 s)
    python benchmarks/bench_move_cost.py --quick     # smoke test: 4 layers, W = 10, 1 repeat
    python benchmarks/bench_move_cost.py --json results.json
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import moelb
import numpy as np
import numpy.typing as npt

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

from bench_common import load_average, machine_summary, table, write_json  # noqa: E402

NUM_EXPERTS = 256  # DeepSeek-V3's routed experts
NUM_GROUPS = 8  # DeepSeek-V3's n_group
NUM_PHYSICAL = 288  # 32 redundant slots
NUM_GPUS = 32
NUM_NODES = 4
DEFAULT_LAYERS = 58  # DeepSeek-V3's MoE layers
QUICK_LAYERS = 4
TOKENS = 4096  # tokens per pass ...
TOP_K = 8  # ... each routed to 8 experts
ZIPF_EXPONENT = 0.6  # popularity 1 / rank^ZIPF_EXPONENT
EXPERT_BYTES = moelb.MODEL_PRESETS["deepseek-v3"].expert_bytes  # 3 x 7168 x 2048 FP8 bytes
MOVE_COSTS = (0.0, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3)
SHIFTS = (0.0, 0.02, 0.1, 1.0)  # share of each layer's experts that trade popularity
DEFAULT_WINDOWS = (100, 1000)
QUICK_WINDOWS = (10,)
DEFAULT_REPEATS = 3
QUICK_REPEATS = 1
TOLERANCE = 1e-9  # relative margin of the move_cost check (float64 max loads)


def scenario_name(shift: float) -> str:
    return "noise" if shift == 0 else f"shift {shift:.0%}"


# --------------------------------------------------------------------------------------------
# Traffic
# --------------------------------------------------------------------------------------------


def make_popularity(rng: np.random.Generator, num_layers: int) -> npt.NDArray[np.float64]:
    """[L, E]: 1 / rank^ZIPF_EXPONENT over a seeded expert order per layer; rows sum to 1."""
    ranks = np.arange(1, NUM_EXPERTS + 1, dtype=np.float64)
    popularity = np.empty((num_layers, NUM_EXPERTS))
    for layer in range(num_layers):
        popularity[layer, rng.permutation(NUM_EXPERTS)] = ranks**-ZIPF_EXPONENT
    return popularity / popularity.sum(axis=1, keepdims=True)


def shift_popularity(
    popularity: npt.NDArray[np.float64], rng: np.random.Generator, share: float
) -> npt.NDArray[np.float64]:
    """A real change: in every layer, round(share x E) random experts trade their popularity
    values (a random permutation among them)."""
    out = popularity.copy()
    count = round(share * NUM_EXPERTS)
    for layer in range(popularity.shape[0]):
        chosen = rng.choice(NUM_EXPERTS, count, replace=False)
        out[layer, chosen] = popularity[layer, rng.permutation(chosen)]
    return out


def sample_window(
    popularity: npt.NDArray[np.float64], rng: np.random.Generator, passes: int
) -> npt.NDArray[np.int64]:
    """[L, E] routed picks of a window of ``passes`` passes: per layer, passes x TOKENS x TOP_K
    picks drawn multinomially (the window's summed counts, as the planner reads them)."""
    return rng.multinomial(passes * TOKENS * TOP_K, popularity)


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------


@dataclass
class Repeat:
    """One seeded repeat of one (scenario, window size): per move_cost, what the re-plan of
    window 2 moved and gained."""

    moved: dict[str, int] = field(default_factory=dict)  # move_cost -> slots rewritten
    gain_in: dict[str, float] = field(default_factory=dict)  # in window 2, over keeping plan 1
    gain_next: dict[str, float] = field(default_factory=dict)  # in window 3, over keeping it
    layers_kept: dict[str, int] = field(default_factory=dict)  # layers that kept plan 1
    max_gain_per_move: float = 0.0  # of the move_cost-0 re-plan, over layers that moved
    median_gain_per_move: float = 0.0
    balancedness_kept: float = 0.0  # window 3 under the window-1 plan


@dataclass
class Case:
    scenario: str
    shift: float
    passes: int
    repeats: list[Repeat] = field(default_factory=list)

    def mean(self, metric: str, cost: str) -> float:
        return statistics.fmean(getattr(r, metric)[cost] for r in self.repeats)

    def summary(self, costs: Sequence[float], num_slots: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for c in costs:
            key = f"{c:g}"
            moved = self.mean("moved", key)
            out[key] = {
                "moved_slots": moved,
                "moved_share": moved / num_slots,
                "moved_gb": moved * EXPERT_BYTES / 1e9,
                "gain_in_window": self.mean("gain_in", key),
                "gain_next_window": self.mean("gain_next", key),
                "layers_kept": self.mean("layers_kept", key),
            }
        out["max_gain_per_move"] = max(r.max_gain_per_move for r in self.repeats)
        out["median_gain_per_move"] = statistics.median(
            r.median_gain_per_move for r in self.repeats
        )
        out["balancedness_kept"] = statistics.fmean(r.balancedness_kept for r in self.repeats)
        return out


def _check(
    where: str,
    plan: moelb.Plan,
    previous: moelb.ExpertLocation,
    before: moelb.PlanStats,
    move_cost: float,
) -> list[str]:
    """What the library guarantees about a re-plan against ``previous``."""
    problems = []
    old = np.asarray(previous.physical_to_logical)
    new = np.asarray(plan.location.physical_to_logical)
    per_layer = (old != new).sum(axis=1)
    if not np.array_equal(per_layer, plan.stats.layer_moved_experts):
        problems.append(f"{where}: layer_moved_experts disagrees with the placements")
    if int(per_layer.sum()) != plan.stats.moved_experts:
        problems.append(f"{where}: moved_experts disagrees with the placements")
    gain = (before.max_rank_load - plan.stats.max_rank_load) / before.max_rank_load
    short = np.flatnonzero(
        (per_layer > 0) & (gain < move_cost * per_layer * (1 - TOLERANCE) - TOLERANCE)
    )
    if short.size:
        layer = int(short[0])
        problems.append(
            f"{where}: layer {layer} re-placed for a gain of {gain[layer]:.3g} with "
            f"{per_layer[layer]} moves, below move_cost {move_cost:g} per move"
        )
    return problems


def measure_repeat(
    rng: np.random.Generator,
    num_layers: int,
    shift: float,
    passes: int,
    costs: Sequence[float],
    where: str,
) -> tuple[Repeat, list[str]]:
    args = (NUM_PHYSICAL, NUM_GROUPS, NUM_NODES, NUM_GPUS)
    popularity = make_popularity(rng, num_layers)
    trivial = moelb.ExpertLocation.trivial(
        num_layers, NUM_EXPERTS, NUM_PHYSICAL, NUM_GPUS, NUM_NODES
    )
    first = moelb.rebalance(sample_window(popularity, rng, passes), *args, previous=trivial,
                            move_cost=0.0)  # fmt: skip
    later = shift_popularity(popularity, rng, shift) if shift > 0 else popularity
    window2 = sample_window(later, rng, passes)
    window3 = sample_window(later, rng, passes)
    before = moelb.evaluate_placement(window2, first.location)
    kept_next = moelb.evaluate_placement(window3, first.location).balancedness
    repeat = Repeat(balancedness_kept=kept_next)
    problems: list[str] = []
    for cost in costs:
        plan = moelb.rebalance(window2, *args, previous=first.location, move_cost=cost)
        key = f"{cost:g}"
        repeat.moved[key] = plan.stats.moved_experts
        repeat.gain_in[key] = plan.stats.balancedness - before.balancedness
        next_window = moelb.evaluate_placement(window3, plan.location).balancedness
        repeat.gain_next[key] = next_window - kept_next
        repeat.layers_kept[key] = int(plan.stats.layer_kept_previous.sum())
        problems += _check(f"{where} move_cost={key}", plan, first.location, before, cost)
        if cost == 0:
            moves = plan.stats.layer_moved_experts
            gain = (before.max_rank_load - plan.stats.max_rank_load) / before.max_rank_load
            per_move = gain[moves > 0] / moves[moves > 0]
            repeat.max_gain_per_move = float(per_move.max()) if per_move.size else 0.0
            repeat.median_gain_per_move = float(np.median(per_move)) if per_move.size else 0.0
    return repeat, problems


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def format_cases(cases: list[Case], costs: Sequence[float], num_slots: int) -> str:
    rows = []
    for case in cases:
        summary = case.summary(costs, num_slots)
        best = summary[f"{costs[0]:g}"]["gain_next_window"]
        for cost in costs:
            s = summary[f"{cost:g}"]
            kept = f"{s['gain_next_window'] / best:.0%}" if costs[0] == 0 and best > 0.01 else "-"
            rows.append(
                [
                    case.scenario,
                    f"{case.passes:,}",
                    f"{cost:g}",
                    f"{s['moved_slots']:,.0f}",
                    f"{s['moved_share']:.0%}",
                    f"{s['moved_gb']:,.0f}",
                    f"{s['gain_in_window']:+.4f}",
                    f"{s['gain_next_window']:+.4f}",
                    kept,
                    f"{s['layers_kept']:.0f}",
                ]
            )
    headers = [
        "scenario",
        "passes",
        "move_cost",
        "moved",
        "slots",
        "GB",
        "gain in",
        "gain next",
        "kept",
        "layers kept",
    ]
    return table(headers, rows, left=(0,), separate_every=len(costs))


def conclusions(cases: list[Case], costs: Sequence[float], num_slots: int) -> list[str]:
    lines = []
    default = moelb.eplb.DEFAULT_MOVE_COST
    for case in cases:
        s = case.summary(costs, num_slots)
        lines.append(
            f"{case.scenario}, {case.passes:,} passes: the move_cost-0 re-plan gains "
            f"{s['median_gain_per_move']:.1e} per move (median layer; largest "
            f"{s['max_gain_per_move']:.1e})"
        )
    key = f"{default:g}"
    if key in {f"{c:g}" for c in costs} and 0.0 in costs:
        for case in cases:
            s = case.summary(costs, num_slots)
            zero, chosen = s["0"], s[key]
            lines.append(
                f"default move_cost {default:g}, {case.scenario}, {case.passes:,} passes: "
                f"{chosen['moved_share']:.1%} of slots moved ({chosen['moved_gb']:,.0f} GB; "
                f"move_cost 0: {zero['moved_share']:.0%}, {zero['moved_gb']:,.0f} GB), next-window "
                f"gain {chosen['gain_next_window']:+.4f} (move_cost 0: "
                f"{zero['gain_next_window']:+.4f})"
            )
    return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, help=f"MoE layers (default {DEFAULT_LAYERS})")
    parser.add_argument(
        "--windows",
        type=int,
        nargs="+",
        help=f"window sizes in passes (default {' '.join(map(str, DEFAULT_WINDOWS))})",
    )
    parser.add_argument(
        "--repeats", type=int, help=f"seeded repeats per case (default {DEFAULT_REPEATS})"
    )
    parser.add_argument(
        "--move-costs",
        type=float,
        nargs="+",
        default=list(MOVE_COSTS),
        help=f"the grid (default {' '.join(f'{c:g}' for c in MOVE_COSTS)})",
    )
    parser.add_argument(
        "--shifts",
        type=float,
        nargs="+",
        default=list(SHIFTS),
        help="shares of each layer's experts that trade popularity between windows 1 and 2 "
        f"(0 = noise only; default {' '.join(f'{s:g}' for s in SHIFTS)})",
    )
    parser.add_argument(
        "--threads", type=int, help="moelb threads (default: the library's default)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: {QUICK_LAYERS} layers, windows of "
        f"{' and '.join(map(str, QUICK_WINDOWS))} passes, {QUICK_REPEATS} repeat unless given",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the traffic (default 0)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results as JSON")
    args = parser.parse_args(argv)
    if args.layers is None:
        args.layers = QUICK_LAYERS if args.quick else DEFAULT_LAYERS
    if args.windows is None:
        args.windows = list(QUICK_WINDOWS if args.quick else DEFAULT_WINDOWS)
    if args.repeats is None:
        args.repeats = QUICK_REPEATS if args.quick else DEFAULT_REPEATS
    if args.layers < 1 or args.repeats < 1 or min(args.windows) < 1:
        parser.error("--layers, --repeats and --windows must be positive")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be positive")
    if not all(np.isfinite(c) and c >= 0 for c in args.move_costs):
        parser.error("--move-costs must be finite and >= 0")
    if not all(0 <= s <= 1 for s in args.shifts):
        parser.error("--shifts must be in [0, 1]")
    args.move_costs = sorted(set(args.move_costs))
    args.shifts = sorted(set(args.shifts))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    saved_threads = moelb.get_num_threads()
    if args.threads is not None:
        moelb.set_num_threads(args.threads)
    threads = moelb.get_num_threads()
    versions = {
        "moelb": moelb.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
    load_avg = load_average()
    num_slots = args.layers * NUM_PHYSICAL
    print(
        f"move_cost: {args.layers} layers x {NUM_EXPERTS} experts in {NUM_GROUPS} groups, "
        f"{NUM_PHYSICAL} slots on {NUM_GPUS} GPUs in {NUM_NODES} nodes ({num_slots:,} slots, "
        f"{EXPERT_BYTES / 1e6:.0f} MB per expert); moelb at {threads} thread(s); "
        + machine_summary(load_avg, versions)
    )
    print(
        f"traffic: 1/rank^{ZIPF_EXPONENT:g} popularity per layer, windows of "
        f"{' and '.join(f'{w:,}' for w in args.windows)} passes x {TOKENS:,} tokens x "
        f"top-{TOP_K} (multinomial); {args.repeats} repeat(s); seed {args.seed}"
    )

    cases: list[Case] = []
    problems: list[str] = []
    start = time.perf_counter()
    seeds = iter(np.random.SeedSequence(args.seed).spawn(len(args.shifts) * len(args.windows)))
    try:
        for shift in args.shifts:
            for passes in args.windows:
                case = Case(scenario_name(shift), shift, passes)
                for r, seed in enumerate(next(seeds).spawn(args.repeats)):
                    where = f"{case.scenario}, {passes} passes, repeat {r}"
                    repeat, found = measure_repeat(
                        np.random.default_rng(seed),
                        args.layers,
                        shift,
                        passes,
                        args.move_costs,
                        where,
                    )
                    case.repeats.append(repeat)
                    problems += found
                cases.append(case)
    finally:
        moelb.set_num_threads(saved_threads)
    seconds = time.perf_counter() - start

    print()
    print(
        "window 1 planned from the trivial placement; window 2 re-planned with previous = that"
        "\nplan; moved: slots rewritten (share of all, GB of expert weights); gain in / next:"
        "\nSGLang balancedness over keeping the window-1 plan, in window 2 / a fresh window 3;"
        "\nkept: share of the move_cost-0 next-window gain kept; layers kept: layers left as"
        "\nthey were; means over the repeats"
    )
    print(format_cases(cases, args.move_costs, num_slots))
    print()
    lines = conclusions(cases, args.move_costs, num_slots)
    for line in lines:
        print(f"conclusion: {line}")
    print(f"\n{seconds:.1f} s for {len(cases)} cases")

    if args.json is not None:
        payload = {
            "benchmark": "move_cost",
            "num_layers": args.layers,
            "num_experts": NUM_EXPERTS,
            "num_groups": NUM_GROUPS,
            "num_physical_experts": NUM_PHYSICAL,
            "ep_size": NUM_GPUS,
            "num_nodes": NUM_NODES,
            "expert_bytes": EXPERT_BYTES,
            "tokens": TOKENS,
            "top_k": TOP_K,
            "zipf_exponent": ZIPF_EXPONENT,
            "windows": args.windows,
            "repeats": args.repeats,
            "move_costs": args.move_costs,
            "shifts": args.shifts,
            "default_move_cost": moelb.eplb.DEFAULT_MOVE_COST,
            "threads": threads,
            "seed": args.seed,
            "cpu_count": os.cpu_count(),
            "load_average_before": load_avg,
            "machine": platform.machine(),
            "versions": versions,
            "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
            "cases": [
                {"scenario": c.scenario, "shift": c.shift, "passes": c.passes}
                | {"repeats": [asdict(r) for r in c.repeats]}
                | c.summary(args.move_costs, num_slots)
                for c in cases
            ],
            "conclusions": lines,
            "inconsistencies": problems,
            "seconds": seconds,
        }
        write_json(args.json, payload)
        print(f"\nwrote {args.json}")

    if problems:
        print("\nINCONSISTENT:\n" + "\n".join(problems), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
