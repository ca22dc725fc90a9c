"""Benchmark: does planning against per-step peaks (objective="step_peak") predict the next
window better than planning against the summed load (objective="total")?

On seeded synthetic traffic at DeepSeek-V3 scale (--layers MoE layers, default 58, of 256 experts
in 8 groups; 4,096 tokens x top-8 per step and layer), ``moelb.rebalance`` plans each window of
W steps with both objectives, and ``moelb.evaluate_placement`` scores both plans

* in-window: on the window they were planned from, and
* predictive: on the next window (what a deployment rebalancing every W steps gets),

by the step balancedness (``PlanStats.step_balancedness``: per layer the steps' mean GPU loads
summed over their max GPU loads summed -- SGLang's per-pass balancedness, each pass weighted by
its max load -- averaged over layers) and by the balancedness of the summed load.

Traffic: each layer has a fixed Zipf-like base popularity (1 / rank^0.6 over a seeded expert
order) and 16 fixed "topics" (random sets of 16 experts). Every step draws topic weights from a
Dirichlet(0.3) distribution, multiplies the popularity of each topic's experts by
``1 + s * 16 / 4 * weight`` (s: the burst strength; 0 leaves only sampling noise, larger s makes
a topic's experts peak together), and samples the step's 32,768 routed slots from the result
(multinomial). Consecutive windows come from the same model, so what a plan learns about which
experts peak together carries over; what it learns about the noise does not.

Cases: burst strengths 0, 0.5, 1, 3; windows of 20 and 100 steps; 288 slots on 32 GPUs in
4 nodes (locality "node" and "none") and 320 slots on 64 GPUs in 8 nodes (locality "none");
--pairs (5) consecutive window pairs each. Also the whole-model plan time (median over the
windows planned) of each objective.

This is not a timed test: it never fails on quality or speed. It exits with status 1 only on an
inconsistency the library rules out: step_peak's in-window per-step peak above total's on some
layer, different replica counts, a node-local plan with a group on two nodes, or the planner's
statistics disagreeing with ``evaluate_placement``.

    python benchmarks/bench_objective.py             # 58 layers, about 1-2 minutes on 2 CPUs
    python benchmarks/bench_objective.py --quick     # smoke test: 2 layers, small windows
    python benchmarks/bench_objective.py --json results.json
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
DEFAULT_LAYERS = 58  # DeepSeek-V3's MoE layers
QUICK_LAYERS = 2
TOKENS = 4096  # tokens per step ...
TOP_K = 8  # ... each routed to 8 experts: a step's counts sum to TOKENS * TOP_K per layer
ZIPF_EXPONENT = 0.6  # base popularity 1 / rank^ZIPF_EXPONENT
NUM_TOPICS = 16  # topics per layer ...
TOPIC_SIZE = 16  # ... of this many experts each
TOPIC_CONCENTRATION = 0.3  # Dirichlet parameter of a step's topic weights (small: one dominates)
# A topic holding weight w multiplies its experts' popularity by 1 + s * TOPIC_GAIN * w: a topic
# at its average weight 1 / NUM_TOPICS by 1 + s / 4, a topic holding the whole step by 1 + 4 s.
TOPIC_GAIN = NUM_TOPICS / 4

STRENGTHS = (0.0, 0.5, 1.0, 3.0)
DEFAULT_WINDOWS = (20, 100)
QUICK_WINDOWS = (4, 8)
DEFAULT_PAIRS = 5
QUICK_PAIRS = 2
# Relative margin of the consistency checks (the same float64 statistics, possibly summed in a
# different order).
TOLERANCE = 1e-9


@dataclass(frozen=True)
class Topology:
    """A cluster shape and the locality the plans keep."""

    num_physical_experts: int
    ep_size: int
    num_nodes: int
    locality: str

    @property
    def name(self) -> str:
        return f"{self.num_physical_experts}/{self.ep_size}g/{self.num_nodes}n {self.locality}"

    def args(self) -> tuple[int, int, int, int]:
        return self.num_physical_experts, NUM_GROUPS, self.num_nodes, self.ep_size


TOPOLOGIES = (
    Topology(288, 32, 4, "node"),
    Topology(288, 32, 4, "none"),
    Topology(320, 64, 8, "none"),
)


# --------------------------------------------------------------------------------------------
# Traffic
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrafficModel:
    """The fixed part of the traffic: per layer a base popularity and topic memberships; with
    drift, the seed of the later popularity orders."""

    popularity: npt.NDArray[np.float64]  # [L, E], each layer sums to 1
    topics: npt.NDArray[np.float64]  # [L, NUM_TOPICS, E], 1 where the expert is in the topic
    seed: int = 0

    def log_popularity(self, step: int, drift: float) -> npt.NDArray[np.float64]:
        """[L, E] at a step: with drift d, the popularity order of phase k = floor(d * step)
        blended linearly into that of phase k + 1 (phase 0: the base popularity; later phases
        put the same 1 / rank^ZIPF_EXPONENT values on a new seeded order), as
        ``moelb.simulate``'s drift does."""
        base = np.log(self.popularity)
        position = drift * step
        phase = int(position)
        frac = position - phase
        out = self._phase(base, phase)
        return out if frac == 0 else (1 - frac) * out + frac * self._phase(base, phase + 1)

    def _phase(self, base: npt.NDArray[np.float64], phase: int) -> npt.NDArray[np.float64]:
        if phase == 0:
            return base
        values = np.sort(base, axis=1)[:, ::-1]  # the same popularity values, hottest first
        out = np.empty_like(base)
        for layer in range(base.shape[0]):
            order = np.random.default_rng([self.seed, 9, layer, phase]).permutation(base.shape[1])
            out[layer, order] = values[layer]
        return out


def make_model(rng: np.random.Generator, num_layers: int, seed: int = 0) -> TrafficModel:
    """Per layer: 1 / rank^ZIPF_EXPONENT over a seeded expert order, and NUM_TOPICS random sets
    of TOPIC_SIZE experts (topics may share experts)."""
    ranks = np.arange(1, NUM_EXPERTS + 1, dtype=np.float64)
    popularity = np.empty((num_layers, NUM_EXPERTS))
    topics = np.zeros((num_layers, NUM_TOPICS, NUM_EXPERTS))
    for layer in range(num_layers):
        popularity[layer, rng.permutation(NUM_EXPERTS)] = ranks**-ZIPF_EXPONENT
        for topic in range(NUM_TOPICS):
            topics[layer, topic, rng.choice(NUM_EXPERTS, TOPIC_SIZE, replace=False)] = 1.0
    popularity /= popularity.sum(axis=1, keepdims=True)
    return TrafficModel(popularity=popularity, topics=topics, seed=seed)


def sample_counts(
    model: TrafficModel,
    rng: np.random.Generator,
    num_steps: int,
    strength: float,
    drift: float = 0.0,
) -> npt.NDArray[np.int64]:
    """[num_steps, L, E] per-step expert token counts: each step and layer draws topic weights
    from Dirichlet(TOPIC_CONCENTRATION), boosts each expert's popularity (drifting at rate
    ``drift``, see TrafficModel.log_popularity) by 1 + strength * TOPIC_GAIN * (its topics'
    weights), and samples TOKENS * TOP_K routed slots from the result."""
    num_layers = model.popularity.shape[0]
    weights = rng.dirichlet(
        np.full(NUM_TOPICS, TOPIC_CONCENTRATION), size=(num_steps, num_layers)
    )  # [T, L, K]
    boost = 1.0 + strength * TOPIC_GAIN * np.einsum("tlk,lke->tle", weights, model.topics)
    if drift > 0:
        popularity = np.exp(np.stack([model.log_popularity(t, drift) for t in range(num_steps)]))
    else:
        popularity = model.popularity[None]
    p = popularity * boost
    p /= p.sum(axis=2, keepdims=True)
    return rng.multinomial(TOKENS * TOP_K, p)


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------


@dataclass
class Pair:
    """Both objectives' plans of one window, scored on it and on the next window."""

    window: int  # index of the window planned from (scored on it and on window + 1)
    step_in: dict[str, float]  # objective -> in-window step balancedness
    step_next: dict[str, float]  # objective -> next-window step balancedness
    summed_in: dict[str, float]  # objective -> in-window balancedness of the summed load
    summed_next: dict[str, float]  # objective -> next-window balancedness of the summed load
    seconds: dict[str, float]  # objective -> wall time of the whole-model rebalance call
    planner_seconds: dict[str, float]  # objective -> stats.wall_time_seconds


@dataclass
class Case:
    """One (burst strength, window size, topology): its window pairs and their means."""

    strength: float
    window_steps: int
    topology: str
    pairs: list[Pair] = field(default_factory=list)

    def mean(self, metric: str, objective: str) -> float:
        return statistics.fmean(getattr(p, metric)[objective] for p in self.pairs)

    def change(self, metric: str) -> float:
        """Mean over the pairs of step_peak's value minus total's."""
        return self.mean(metric, "step_peak") - self.mean(metric, "total")

    def changes(self, metric: str) -> list[float]:
        return [getattr(p, metric)["step_peak"] - getattr(p, metric)["total"] for p in self.pairs]

    def median_seconds(self, objective: str) -> float:
        return statistics.median(p.seconds[objective] for p in self.pairs)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for metric in ("step_in", "step_next", "summed_in", "summed_next"):
            out[metric] = {o: self.mean(metric, o) for o in ("total", "step_peak")}
            out[f"{metric}_change"] = self.change(metric)
        out["next_better_pairs"] = sum(d > 0 for d in self.changes("step_next"))
        out["median_seconds"] = {o: self.median_seconds(o) for o in ("total", "step_peak")}
        return out


def _check(
    where: str,
    series: npt.NDArray[np.int64],
    topology: Topology,
    plans: dict[str, moelb.Plan],
    scores: dict[str, moelb.PlanStats],
) -> list[str]:
    """What the library guarantees about the two plans of one window; a list of violations."""
    problems = []
    total, peak = scores["total"].step_max_rank_load, scores["step_peak"].step_max_rank_load
    above = np.flatnonzero(peak > total * (1 + TOLERANCE))
    if above.size:
        layer = int(above[0])
        problems.append(
            f"{where}: step_peak's in-window step_max_rank_load above total's on "
            f"{above.size} layer(s), e.g. layer {layer}: {peak[layer]:.1f} > {total[layer]:.1f}"
        )
    counts = {o: np.asarray(p.location.logical_count) for o, p in plans.items()}
    if not np.array_equal(counts["total"], counts["step_peak"]):
        problems.append(f"{where}: step_peak changed the replica counts of the total plan")
    own = plans["step_peak"].stats.step_max_rank_load
    if own is None or not np.allclose(own, peak, rtol=TOLERANCE, atol=0.0):
        problems.append(
            f"{where}: step_peak's Plan.stats.step_max_rank_load disagrees with evaluate_placement"
        )
    if topology.locality == "node":
        slots_per_node = topology.num_physical_experts // topology.num_nodes
        node = np.arange(topology.num_physical_experts) // slots_per_node
        for objective, plan in plans.items():
            group = np.asarray(plan.location.physical_to_logical) // (NUM_EXPERTS // NUM_GROUPS)
            spread = [
                layer
                for layer in range(series.shape[1])
                for g in range(NUM_GROUPS)
                if np.unique(node[group[layer] == g]).size != 1
            ]
            if spread:
                problems.append(
                    f"{where}: {objective} plan has an expert group on several nodes "
                    f"(layer {spread[0]})"
                )
    return problems


def measure_case(
    series: npt.NDArray[np.int64],
    strength: float,
    window_steps: int,
    num_pairs: int,
    topology: Topology,
) -> tuple[Case, list[str]]:
    """Plans windows 0 .. num_pairs - 1 of ``series`` with both objectives and scores each plan
    on its window and the next; returns the case and any inconsistencies."""
    case = Case(strength=strength, window_steps=window_steps, topology=topology.name)
    problems: list[str] = []
    windows = [series[i * window_steps : (i + 1) * window_steps] for i in range(num_pairs + 1)]
    for i in range(num_pairs):
        plans: dict[str, moelb.Plan] = {}
        seconds: dict[str, float] = {}
        for objective in ("total", "step_peak"):
            start = time.perf_counter()
            plans[objective] = moelb.rebalance(
                windows[i], *topology.args(), locality=topology.locality, objective=objective
            )
            seconds[objective] = time.perf_counter() - start
        scores_in = {o: moelb.evaluate_placement(windows[i], p.location) for o, p in plans.items()}
        scores_next = {
            o: moelb.evaluate_placement(windows[i + 1], p.location) for o, p in plans.items()
        }
        where = f"s={strength:g} W={window_steps} {topology.name} window {i}"
        problems += _check(where, windows[i], topology, plans, scores_in)
        case.pairs.append(
            Pair(
                window=i,
                step_in={o: float(s.step_balancedness) for o, s in scores_in.items()},
                step_next={o: float(s.step_balancedness) for o, s in scores_next.items()},
                summed_in={o: float(s.balancedness) for o, s in scores_in.items()},
                summed_next={o: float(s.balancedness) for o, s in scores_next.items()},
                seconds=seconds,
                planner_seconds={o: float(p.stats.wall_time_seconds) for o, p in plans.items()},
            )
        )
    return case, problems


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def format_cases(cases: Sequence[Case], rows_per_strength: int) -> str:
    header = [
        "s",
        "W",
        "case",
        "in total",
        "in step_peak",
        "change",
        "next total",
        "next step_peak",
        "change",
        "better",
        "sum total",
        "sum step_peak",
        "total ms",
        "step_peak ms",
    ]
    rows = [
        [
            f"{c.strength:g}",
            str(c.window_steps),
            c.topology,
            f"{c.mean('step_in', 'total'):.4f}",
            f"{c.mean('step_in', 'step_peak'):.4f}",
            f"{c.change('step_in'):+.4f}",
            f"{c.mean('step_next', 'total'):.4f}",
            f"{c.mean('step_next', 'step_peak'):.4f}",
            f"{c.change('step_next'):+.4f}",
            f"{sum(d > 0 for d in c.changes('step_next'))}/{len(c.pairs)}",
            f"{c.mean('summed_in', 'total'):.4f}",
            f"{c.mean('summed_in', 'step_peak'):.4f}",
            f"{c.median_seconds('total') * 1e3:.1f}",
            f"{c.median_seconds('step_peak') * 1e3:.1f}",
        ]
        for c in cases
    ]
    return table(header, rows, left=(2,), separate_every=rows_per_strength)


def conclusions(cases: Sequence[Case], strengths: Sequence[float]) -> list[str]:
    """What the numbers say, one line each: per burst strength whether step_peak predicts the
    next window better (in every window pair, in none, or mixed), the strengths where it does,
    how much of the in-window gain carries over, the effect of the window size, and the costs
    (summed-load balancedness, plan time)."""
    lines = []
    verdicts: dict[float, str] = {}
    for s in strengths:
        mine = [c for c in cases if c.strength == s]
        changes = [d for c in mine for d in c.changes("step_next")]
        better, mean = sum(d > 0 for d in changes), statistics.fmean(changes)
        if better == len(changes):
            verdicts[s] = "better in every window pair"
        elif better == 0:
            verdicts[s] = "worse in every window pair"
        elif mean > 0 and 2 * better > len(changes):
            verdicts[s] = f"better on average, in {better}/{len(changes)} window pairs"
        elif mean < 0 and 2 * better < len(changes):
            verdicts[s] = f"worse on average, better in only {better}/{len(changes)} window pairs"
        else:
            verdicts[s] = f"no consistent difference, better in {better}/{len(changes)} pairs"
        gain_in = statistics.fmean(c.change("step_in") for c in mine)
        carried = f"{mean / gain_in:.0%}" if gain_in > 0 else "-"
        lines.append(
            f"s={s:g}: next-window step balancedness {mean:+.4f} on average (from "
            f"{min(changes):+.4f} to {max(changes):+.4f} over {len(changes)} window pairs in "
            f"{len(mine)} cases) against {gain_in:+.4f} in-window ({carried} carried over): "
            f"step_peak predicts the next window {verdicts[s]}"
        )
    better = [s for s in strengths if verdicts[s] == "better in every window pair"]
    others = [s for s in strengths if s not in better]
    if not better:
        summary = "at no burst strength does step_peak predict the next window better in every "
        summary += "window pair"
    elif all(s in better for s in strengths if s >= min(better)):
        summary = "step_peak predicts the next window better in every window pair at burst "
        summary += f"strength >= {min(better):g}"
    else:
        summary = "step_peak predicts the next window better in every window pair at burst "
        summary += f"strength {', '.join(f'{s:g}' for s in better)}"
    if others:
        summary += ": " if not better else "; not at "
        summary += "; ".join(f"s={s:g} ({verdicts[s]})" for s in others)
    lines.append(summary)
    windows = sorted({c.window_steps for c in cases})
    bursty = [s for s in strengths if s > 0]
    if bursty:
        by_window = {
            w: statistics.fmean(
                c.change("step_next") for c in cases if c.window_steps == w and c.strength > 0
            )
            for w in windows
        }
        lines.append(
            "by window size, next-window change averaged over s > 0: "
            + ", ".join(f"W={w}: {change:+.4f}" for w, change in by_window.items())
        )
    summed_in = [d for c in cases for d in c.changes("summed_in")]
    summed_next = [d for c in cases for d in c.changes("summed_next")]
    lines.append(
        f"summed-load balancedness, step_peak minus total: in-window "
        f"{statistics.fmean(summed_in):+.4f} on average (worst {min(summed_in):+.4f}), next window "
        f"{statistics.fmean(summed_next):+.4f} (worst {min(summed_next):+.4f})"
    )
    for w in windows:
        mine = [c for c in cases if c.window_steps == w]
        t_total = statistics.median(p.seconds["total"] for c in mine for p in c.pairs)
        t_peak = statistics.median(p.seconds["step_peak"] for c in mine for p in c.pairs)
        slowest = max(p.seconds["step_peak"] for c in mine for p in c.pairs)
        lines.append(
            f"plan time at W={w}: step_peak median {t_peak * 1e3:.0f} ms (slowest "
            f"{slowest * 1e3:.0f} ms) against total's {t_total * 1e3:.1f} ms, "
            f"{t_peak / t_total:.0f}x"
        )
    return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, help=f"MoE layers (default {DEFAULT_LAYERS})")
    parser.add_argument(
        "--windows",
        type=int,
        nargs="+",
        help=f"window sizes in steps (default {' '.join(map(str, DEFAULT_WINDOWS))})",
    )
    parser.add_argument(
        "--pairs", type=int, help=f"window pairs per case (default {DEFAULT_PAIRS})"
    )
    parser.add_argument(
        "--strengths",
        type=float,
        nargs="+",
        default=list(STRENGTHS),
        help=f"burst strengths (default {' '.join(f'{s:g}' for s in STRENGTHS)})",
    )
    parser.add_argument(
        "--drift",
        type=float,
        default=0.0,
        help="hot-set turnover per step, as moelb simulate's --drift (default 0: a fixed base "
        "popularity)",
    )
    parser.add_argument(
        "--threads", type=int, help="moelb threads (default: the library's default)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: {QUICK_LAYERS} layers, windows of "
        f"{' and '.join(map(str, QUICK_WINDOWS))} steps, {QUICK_PAIRS} pairs unless given",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the traffic (default 0)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results as JSON")
    args = parser.parse_args(argv)
    if args.layers is None:
        args.layers = QUICK_LAYERS if args.quick else DEFAULT_LAYERS
    if args.windows is None:
        args.windows = list(QUICK_WINDOWS if args.quick else DEFAULT_WINDOWS)
    if args.pairs is None:
        args.pairs = QUICK_PAIRS if args.quick else DEFAULT_PAIRS
    if args.layers < 1 or args.pairs < 1 or min(args.windows) < 1:
        parser.error("--layers, --pairs and --windows must be positive")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be positive")
    if min(args.strengths) < 0:
        parser.error("--strengths must be >= 0")
    if not (np.isfinite(args.drift) and args.drift >= 0):
        parser.error("--drift must be finite and >= 0")
    args.strengths = sorted(set(args.strengths))
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
    num_steps = (args.pairs + 1) * max(args.windows)
    print(
        f"objective: {args.layers} layers x {NUM_EXPERTS} experts in {NUM_GROUPS} groups, "
        f"{TOKENS:,} tokens x top-{TOP_K} per step; moelb at {threads} thread(s); "
        + machine_summary(load_avg, versions)
    )
    print(
        f"traffic: 1/rank^{ZIPF_EXPONENT:g} base popularity, {NUM_TOPICS} topics of "
        f"{TOPIC_SIZE} experts per layer, Dirichlet({TOPIC_CONCENTRATION:g}) topic weights per "
        f"step, boost 1 + s * {TOPIC_GAIN:g} * weight, multinomial counts; "
        + (f"drift {args.drift:g}/step; " if args.drift > 0 else "")
        + f"seed {args.seed}; "
        f"{num_steps} steps per burst strength; windows of "
        f"{' and '.join(map(str, args.windows))} steps, {args.pairs} pairs each"
    )

    seeds = np.random.SeedSequence(args.seed).spawn(1 + len(args.strengths))
    model = make_model(np.random.default_rng(seeds[0]), args.layers, args.seed)
    cases: list[Case] = []
    problems: list[str] = []
    start = time.perf_counter()
    try:
        for s, seed in zip(args.strengths, seeds[1:], strict=True):
            series = sample_counts(model, np.random.default_rng(seed), num_steps, s, args.drift)
            for window_steps in args.windows:
                for topology in TOPOLOGIES:
                    case, found = measure_case(series, s, window_steps, args.pairs, topology)
                    cases.append(case)
                    problems += found
    finally:
        moelb.set_num_threads(saved_threads)
    seconds = time.perf_counter() - start

    print()
    print(
        "step balancedness (per layer the steps' mean GPU loads summed over their max GPU loads"
        "\nsummed, averaged over layers) of the plans of window i, scored on window i (in) and on"
        "\nwindow i + 1 (next), mean over the window pairs;"
        "\nchange: step_peak - total; better: window pairs where step_peak is ahead on the next"
        "\nwindow; sum: balancedness of the in-window summed load; ms: whole-model plan, median"
    )
    print(format_cases(cases, len(args.windows) * len(TOPOLOGIES)))
    print()
    lines = conclusions(cases, args.strengths)
    for line in lines:
        print(f"conclusion: {line}")
    print(f"\n{seconds:.1f} s for {len(cases)} cases")

    if args.json is not None:
        payload = {
            "benchmark": "objective",
            "num_layers": args.layers,
            "num_experts": NUM_EXPERTS,
            "num_groups": NUM_GROUPS,
            "tokens": TOKENS,
            "top_k": TOP_K,
            "traffic": {
                "zipf_exponent": ZIPF_EXPONENT,
                "num_topics": NUM_TOPICS,
                "topic_size": TOPIC_SIZE,
                "topic_concentration": TOPIC_CONCENTRATION,
                "topic_gain": TOPIC_GAIN,
            },
            "strengths": args.strengths,
            "drift": args.drift,
            "windows": args.windows,
            "pairs": args.pairs,
            "threads": threads,
            "seed": args.seed,
            "cpu_count": os.cpu_count(),
            "load_average_before": load_avg,
            "machine": platform.machine(),
            "versions": versions,
            "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
            "topologies": [asdict(t) | {"name": t.name} for t in TOPOLOGIES],
            "cases": [asdict(c) | c.summary() for c in cases],
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
