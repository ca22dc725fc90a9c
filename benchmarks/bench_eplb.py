"""Benchmark: moelb.rebalance against DeepSeek's EPLB greedy (eplb.py), in one run.

At DeepSeek-V3 scale (58 MoE layers, 256 experts in 8 groups) on four cluster shapes -- 288 slots
on 32 GPUs in 4 nodes, 320 on 64 GPUs in 8 nodes, 288 on 72 GPUs in 9 nodes, 288 on 144 GPUs in
18 nodes -- and two seeded load models (Zipf-skewed and log-normal per-expert loads), plans with

* moelb.rebalance(algorithm="deepseek"): moelb's C++ port of DeepSeek's greedy (its auto policy:
  hierarchical when num_groups % num_nodes == 0, else global), and "deepseek_global",
* moelb.rebalance(algorithm="moelb") with locality="node" (where num_groups % num_nodes == 0) and
  locality="none",
* the pure-Python/NumPy port of eplb.py in ``deepseek_eplb_reference.py`` (plain Python loops like
  the original) and its PyTorch port (when PyTorch is importable),

and prints, in the same run on the same loads:

* wall times (median of ``--repeats`` calls, timed round-robin; moelb at 1 and 2 threads via
  ``moelb.set_num_threads``) and the speedup of moelb's deepseek mode over the two ports,
* balancedness (SGLang's layer mean of mean/max GPU load), the mean and max gap to the flat lower
  bound ``max(total / GPUs, best max per-replica load)`` and, for moelb, the number of layers whose
  max GPU load exceeds DeepSeek's under the same locality (node vs hierarchical, none vs global);
  for locality="none" at >= 4 slots per GPU also a slot-aware lower bound (``slot_lower_bound``:
  a GPU holding the largest replica carries S - 1 more) -- how far above the flat bound every
  placement must be, and the plan's gap to that bound,
* agreement: moelb's deepseek mode against the ports on the same (tie-free) loads -- replica counts
  and per-GPU loads per layer, and identical slot maps for information,
* whether the issue's goals are met: deepseek mode >= 100x the Python port (at each thread
  count); moelb never worse than DeepSeek on any layer; locality="none" within 0.5% of the lower
  bound on average at >= 4 slots per GPU (naming the cases no placement can meet); a whole-model
  plan in under 5 ms (at each thread count).

This is not a timed test: it never fails on speed or balance; it exits with status 1 only when
moelb's deepseek mode disagrees with the ports (replica counts or per-GPU loads).

    python benchmarks/bench_eplb.py                     # 58 layers, 1 and 2 threads
    python benchmarks/bench_eplb.py --quick             # smoke test, a few seconds
    python benchmarks/bench_eplb.py --json results.json
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import moelb
import numpy as np
import numpy.typing as npt

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

import deepseek_eplb_reference as ref  # noqa: E402
from bench_common import load_average, machine_summary, table, write_json  # noqa: E402

NUM_EXPERTS = 256  # DeepSeek-V3's routed experts
NUM_GROUPS = 8  # DeepSeek-V3's n_group
DEFAULT_LAYERS = 58  # DeepSeek-V3's MoE layers
QUICK_LAYERS = 2
DEFAULT_REPEATS = 9
QUICK_REPEATS = 2
DEFAULT_TORCH_REPEATS = 3  # the PyTorch port takes seconds per call at full size
QUICK_TORCH_REPEATS = 1
TOKENS = 1 << 20  # tokens per layer behind the loads ...
TOP_K = 8  # ... each routed to 8 experts: a layer's loads sum to TOKENS * TOP_K
ZIPF_S = 1.0  # Zipf exponent, drawn per layer from ZIPF_S +- ZIPF_S_SPREAD
ZIPF_S_SPREAD = 0.1
LOGNORMAL_SIGMA = 1.0  # log-normal loads: exp(sigma * N(0, 1))

GOAL_VS_PYTHON = 100.0  # deepseek mode at least 100x faster than the Python port
GOAL_GAP = 0.005  # locality="none": mean gap to the lower bound within 0.5% ...
GOAL_GAP_MIN_SLOTS_PER_GPU = 4  # ... at 4 or more slots per GPU
GOAL_PLAN_SECONDS = 5e-3  # a whole-model plan in under 5 ms
# A layer counts as "moelb worse than DeepSeek" when its max GPU load exceeds DeepSeek's by more
# than this relative margin (both are computed by the same float64 statistics code).
WORSE_TOLERANCE = 1e-9
# Per-GPU loads of moelb's deepseek mode and of the ports agree when within this relative margin
# (the same replicas summed in a possibly different order).
LOAD_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Topology:
    """A cluster shape: slots per layer, GPUs, nodes (8 GPUs per node)."""

    num_physical_experts: int
    ep_size: int
    num_nodes: int

    @property
    def name(self) -> str:
        return f"{self.num_physical_experts}/{self.ep_size}g/{self.num_nodes}n"

    @property
    def slots_per_gpu(self) -> int:
        return self.num_physical_experts // self.ep_size

    @property
    def node_locality(self) -> bool:
        """Whether groups can be kept on nodes (DeepSeek's hierarchical policy applies)."""
        return NUM_GROUPS % self.num_nodes == 0

    def args(self) -> tuple[int, int, int, int]:
        return self.num_physical_experts, NUM_GROUPS, self.num_nodes, self.ep_size


TOPOLOGIES = (
    Topology(288, 32, 4),
    Topology(320, 64, 8),
    Topology(288, 72, 9),
    Topology(288, 144, 18),
)


# (label, algorithm, locality) of the moelb plans whose quality is reported.
def _plans(topology: Topology) -> list[tuple[str, str, str]]:
    plans = [("deepseek", "deepseek", "auto"), ("deepseek_global", "deepseek_global", "auto")]
    if topology.node_locality:
        plans.append(("moelb node", "moelb", "node"))
    plans.append(("moelb none", "moelb", "none"))
    return plans


@dataclass
class Quality:
    """One plan's statistics (moelb's PlanStats) on one case."""

    case: str
    loads: str
    slots_per_gpu: int
    plan: str
    algorithm: str  # what ran, as stats.algorithm reports it
    balancedness: float
    mean_gap: float
    max_gap: float
    # The slot-aware lower bound (slot_lower_bound), for the locality="none" plans at >= 4 slots
    # per GPU: its mean excess over the flat bound (what no placement can avoid) and the plan's
    # mean gap to it.
    slot_bound_excess: float | None = None
    gap_to_slot_bound: float | None = None
    # Every plan: the mean over layers of max GPU load / packing_lower_bound(its replicas) - 1:
    # how far the packing is from the best any packing of the same replica counts can do.
    packing_gap: float = 0.0
    # moelb plans only: layers whose max GPU load exceeds DeepSeek's (same locality), and which
    compared_with: str | None = None
    worse_layers: int | None = None
    worst_excess: float | None = None  # max over layers of moelb max / DeepSeek max - 1
    worse: list[dict[str, float]] = field(default_factory=list)
    same_at_2_threads: bool | None = None  # moelb's placement is the same at 1 and 2 threads


@dataclass
class Agreement:
    """moelb's deepseek mode against one port on the same loads, layer by layer."""

    case: str
    loads: str
    reference: str
    num_layers: int
    same_logcnt: int  # layers with identical replica counts
    same_rank_loads: int  # layers with identical per-GPU loads (GPU by GPU)
    same_phy2log: int  # layers with identical slot maps (for information)

    @property
    def ok(self) -> bool:
        return self.same_logcnt == self.num_layers and self.same_rank_loads == self.num_layers


@dataclass
class Timing:
    """Median seconds per whole-model call of each implementation on one case."""

    case: str
    loads: str
    seconds: dict[str, float] = field(default_factory=dict)  # "deepseek@1", "python", ...
    planner_seconds: dict[str, float] = field(default_factory=dict)  # stats.wall_time_seconds

    def ratio(self, reference: str, impl: str = "deepseek@1") -> float | None:
        if reference not in self.seconds or impl not in self.seconds:
            return None
        return self.seconds[reference] / self.seconds[impl]


def _import_torch() -> Any | None:
    if not ref.HAS_TORCH:
        return None
    import torch

    return torch


# --------------------------------------------------------------------------------------------
# Loads
# --------------------------------------------------------------------------------------------


def zipf_loads(rng: np.random.Generator, num_layers: int) -> npt.NDArray[np.float64]:
    """[L, E]: per layer, popularity 1 / rank^s over a seeded permutation of the experts, s drawn
    from ZIPF_S +- ZIPF_S_SPREAD, scaled to TOKENS * TOP_K."""
    loads = np.empty((num_layers, NUM_EXPERTS))
    ranks = np.arange(1, NUM_EXPERTS + 1, dtype=np.float64)
    for layer in range(num_layers):
        s = rng.uniform(ZIPF_S - ZIPF_S_SPREAD, ZIPF_S + ZIPF_S_SPREAD)
        popularity = ranks**-s
        loads[layer, rng.permutation(NUM_EXPERTS)] = popularity / popularity.sum()
    return loads * (TOKENS * TOP_K)


def lognormal_loads(rng: np.random.Generator, num_layers: int) -> npt.NDArray[np.float64]:
    """[L, E]: exp(LOGNORMAL_SIGMA * N(0, 1)) per expert, each layer scaled to TOKENS * TOP_K."""
    weights = np.exp(LOGNORMAL_SIGMA * rng.standard_normal((num_layers, NUM_EXPERTS)))
    return weights / weights.sum(axis=1, keepdims=True) * (TOKENS * TOP_K)


def make_loads(num_layers: int, seed: int) -> dict[str, npt.NDArray[np.float64]]:
    rng = np.random.default_rng(seed)
    loads = {"zipf": zipf_loads(rng, num_layers), "lognormal": lognormal_loads(rng, num_layers)}
    for name, load in loads.items():
        as_f32 = load.astype(np.float32)
        if any(np.unique(row).size != row.size for row in as_f32):
            raise ValueError(f"{name} loads have float32 ties; change --seed")
    return loads


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------


def _rank_loads(
    load: npt.NDArray[np.float64], phy2log: Any, logcnt: Any, ep_size: int
) -> npt.NDArray[np.float64]:
    """[L, G] per-GPU loads of a slot map under equal split, replicas summed in ascending order
    within each GPU (so that the same multiset gives the same float sum)."""
    phy2log = np.asarray(phy2log, dtype=np.int64)
    logcnt = np.asarray(logcnt, dtype=np.int64)
    per_slot = np.take_along_axis(load, phy2log, axis=1) / np.take_along_axis(logcnt, phy2log, 1)
    per_slot = np.sort(per_slot.reshape(load.shape[0], ep_size, -1), axis=2)
    return per_slot.sum(axis=2)


def check_agreement(
    case: str,
    loads: str,
    reference: str,
    load: npt.NDArray[np.float64],
    plan: moelb.Plan,
    ref_output: tuple[Any, Any, Any],
    ep_size: int,
) -> Agreement:
    phy2log = np.asarray(plan.location.physical_to_logical, dtype=np.int64)
    logcnt = np.asarray(plan.location.logical_count, dtype=np.int64)
    ref_phy2log = np.asarray(ref_output[0], dtype=np.int64)
    ref_logcnt = np.asarray(ref_output[2], dtype=np.int64)
    ours = _rank_loads(load, phy2log, logcnt, ep_size)
    theirs = _rank_loads(load, ref_phy2log, ref_logcnt, ep_size)
    close = np.abs(ours - theirs) <= LOAD_TOLERANCE * np.maximum(np.abs(theirs), 1.0)
    return Agreement(
        case=case,
        loads=loads,
        reference=reference,
        num_layers=load.shape[0],
        same_logcnt=int((logcnt == ref_logcnt).all(axis=1).sum()),
        same_rank_loads=int(close.all(axis=1).sum()),
        same_phy2log=int((phy2log == ref_phy2log).all(axis=1).sum()),
    )


def _fewest_replicas(w: npt.NDArray[np.float64], t: float) -> npt.NDArray[np.int64]:
    """Per expert, the fewest replicas c >= 1 with w / c <= t (in float64, as the planner)."""
    c = np.maximum(1, np.ceil(w / t)).astype(np.int64)
    while (over := w / c > t).any():
        c[over] += 1
    while (fewer := (c > 1) & (w / np.maximum(c - 1, 1) <= t)).any():
        c[fewer] -= 1
    return c


def slot_lower_bound(w: npt.NDArray[np.float64], num_slots: int, ep_size: int) -> float:
    """A lower bound on the max GPU load of every placement of loads w [E] on num_slots slots of
    ep_size GPUs (exactly S = num_slots / ep_size replicas per GPU), at least the flat bound.

    For replica counts c with largest replica load t = max w / c, the GPU holding that replica
    also holds S - 1 others, so its load is at least t plus the S - 1 smallest other replicas.
    Those weigh at least the S - 1 smallest of a relaxation: with c >= c_min(t) (the fewest
    replicas reaching t) and F = num_slots - sum c_min(t) slots left, every expert has at most
    c_min + F replicas, each at least w / (c_min + F). So every placement is at least
    min over t of (t + that sum), t ranging over the values w_e / k that can be a largest replica
    (from the divisor method's optimum up; the scan stops once t alone exceeds the best)."""
    w = np.asarray(w, dtype=np.float64)
    total = float(w.sum())
    mean = total / ep_size
    if total <= 0:
        return 0.0
    experts = len(w)
    extra = num_slots - experts
    ks = np.arange(1, extra + 2, dtype=np.float64)
    candidates = np.unique((w[:, None] / ks[None, :]).ravel())
    candidates = candidates[candidates > 0]
    # The divisor method's optimum: the smallest candidate whose fewest replicas fit.
    lo, hi = 0, len(candidates) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if _fewest_replicas(w, candidates[mid]).sum() <= num_slots:
            hi = mid
        else:
            lo = mid + 1
    per_gpu = num_slots // ep_size
    best = np.inf
    for t in candidates[lo:]:
        if t >= best:
            break
        c = _fewest_replicas(w, float(t))
        spare = num_slots - int(c.sum())
        most = c + spare
        share = w / most
        order = np.argsort(share, kind="stable")
        need, small = per_gpu - 1, 0.0
        for e in order:
            if need == 0:
                break
            take = min(need, int(most[e]))
            small += take * float(share[e])
            need -= take
        best = min(best, float(t) + small)
    return max(mean, best)


def packing_lower_bound(replica_loads: npt.NDArray[np.float64], ep_size: int) -> float:
    """A lower bound on the max GPU load of every packing of these replicas (their loads fixed:
    the plan's replica counts) onto ep_size GPUs of exactly S = len / ep_size replicas each.

    For every h, the h GPUs holding the h largest replicas (or, if some share a GPU, h GPUs
    holding at least those) carry h * S replicas, so together at least the h largest plus the
    (S - 1) * h smallest: one of them carries at least that sum / h. The bound is the largest
    over h (h = G gives the mean)."""
    r = np.sort(np.asarray(replica_loads, dtype=np.float64))[::-1]
    per_gpu = len(r) // ep_size
    h = np.arange(1, ep_size + 1)
    top = np.cumsum(r)[h - 1]
    smallest = np.concatenate(([0.0], np.cumsum(r[::-1])))[(per_gpu - 1) * h]
    return float(np.max((top + smallest) / h))


def measure_quality(
    topology: Topology,
    loads_name: str,
    load: npt.NDArray[np.float64],
    threads: Sequence[int],
) -> tuple[list[Quality], dict[str, moelb.Plan]]:
    """Plans once per (algorithm, locality) at the first thread count and reports their stats;
    moelb's plans are compared with DeepSeek's layer by layer and, when a second thread count is
    given, with the same plan at that count."""
    plans: dict[str, moelb.Plan] = {}
    moelb.set_num_threads(threads[0])
    for label, algorithm, locality in _plans(topology):
        plans[label] = moelb.rebalance(
            load, *topology.args(), algorithm=algorithm, locality=locality
        )
    baseline = {"moelb node": "deepseek", "moelb none": "deepseek_global"}
    results = []
    for label, algorithm, locality in _plans(topology):
        stats = plans[label].stats
        quality = Quality(
            case=topology.name,
            loads=loads_name,
            slots_per_gpu=topology.slots_per_gpu,
            plan=label,
            algorithm=stats.algorithm,
            balancedness=float(stats.balancedness),
            mean_gap=float(stats.mean_gap),
            max_gap=float(stats.max_gap),
        )
        location = plans[label].location
        replicas = np.take_along_axis(load, location.physical_to_logical, 1) / np.take_along_axis(
            location.logical_count, location.physical_to_logical, 1
        )
        packing = np.array(
            [packing_lower_bound(row, topology.ep_size) for row in replicas], dtype=np.float64
        )
        quality.packing_gap = float(
            np.mean(np.asarray(stats.max_rank_load) / np.maximum(packing, 1e-300) - 1.0)
        )
        if label == "moelb none" and topology.slots_per_gpu >= GOAL_GAP_MIN_SLOTS_PER_GPU:
            slots, gpus = topology.num_physical_experts, topology.ep_size
            slot_bound = np.array([slot_lower_bound(row, slots, gpus) for row in load])
            flat = np.asarray(stats.lower_bound)
            quality.slot_bound_excess = float(np.mean(slot_bound / flat - 1.0))
            quality.gap_to_slot_bound = float(
                np.mean(np.asarray(stats.max_rank_load) / slot_bound - 1.0)
            )
        if label in baseline:
            other = plans[baseline[label]].stats
            ours, theirs = np.asarray(stats.max_rank_load), np.asarray(other.max_rank_load)
            excess = ours / np.maximum(theirs, np.finfo(np.float64).tiny) - 1.0
            worse = np.flatnonzero(excess > WORSE_TOLERANCE)
            quality.compared_with = other.algorithm
            quality.worse_layers = int(worse.size)
            quality.worst_excess = float(excess.max())
            quality.worse = [
                {"layer": int(i), "moelb": float(ours[i]), "deepseek": float(theirs[i])}
                for i in worse
            ]
            if len(threads) > 1:
                moelb.set_num_threads(threads[1])
                again = moelb.rebalance(
                    load, *topology.args(), algorithm=algorithm, locality=locality
                )
                quality.same_at_2_threads = bool(again.location == plans[label].location)
                moelb.set_num_threads(threads[0])
        results.append(quality)
    return results, plans


def _round_robin(
    impls: dict[str, Callable[[], Any]], rounds: dict[str, int], samples: dict[str, list[float]]
) -> None:
    """Times ``impls`` round-robin: in round r, every implementation with more than r rounds to
    go runs once, in an order rotating from round to round."""
    names = list(impls)
    for r in range(max(rounds.values(), default=0)):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            if r >= rounds[name]:
                continue
            start = time.perf_counter()
            result = impls[name]()
            samples.setdefault(name, []).append(time.perf_counter() - start)
            if isinstance(result, moelb.Plan):
                samples.setdefault(f"{name}:planner", []).append(result.stats.wall_time_seconds)


def time_case(
    topology: Topology,
    loads_name: str,
    load: npt.NDArray[np.float64],
    threads: Sequence[int],
    repeats: int,
    torch_repeats: int,
    torch_mod: Any | None,
) -> Timing:
    """Median seconds per whole-model call. moelb's deepseek mode and its planner (each
    locality) run in every block, after one untimed call at that thread count; so does the Python
    port (single-threaded: its samples from every block make one median), so that moelb's calls
    at every thread count follow the same tens of milliseconds of other work, as a planner called
    now and then does (on this kind of machine a call after such a pause takes ~1.5x a call in a
    tight loop, and a parked worker thread wakes too late to help). The PyTorch port runs in the
    first block only (set to that thread count; it takes seconds). The ports have already run
    once (the agreement check), which serves as their warm-up."""
    args = topology.args()
    moelb_impls: dict[str, tuple[str, str]] = {"deepseek": ("deepseek", "auto")}
    if topology.node_locality:
        moelb_impls["node"] = ("moelb", "node")
    moelb_impls["none"] = ("moelb", "none")
    samples: dict[str, list[float]] = {}
    for block, n in enumerate(threads):
        moelb.set_num_threads(n)
        impls: dict[str, Callable[[], Any]] = {}
        rounds: dict[str, int] = {}
        for short, (algorithm, locality) in moelb_impls.items():

            def run(algorithm: str = algorithm, locality: str = locality) -> Any:
                return moelb.rebalance(load, *args, algorithm=algorithm, locality=locality)

            run()  # warm-up at this thread count (the pool may start its threads now)
            impls[f"{short}@{n}"] = run
            rounds[f"{short}@{n}"] = repeats
        impls["python"] = lambda: ref.rebalance_experts(load, *args)
        rounds["python"] = repeats
        if block == 0:
            if torch_mod is not None and torch_repeats > 0:
                torch_mod.set_num_threads(n)
                impls["torch"] = lambda: ref.rebalance_experts_torch(load, *args)
                rounds["torch"] = torch_repeats
        _round_robin(impls, rounds, samples)
    timing = Timing(case=topology.name, loads=loads_name)
    for name, values in samples.items():
        if name.endswith(":planner"):
            timing.planner_seconds[name.removesuffix(":planner")] = statistics.median(values)
        else:
            timing.seconds[name] = statistics.median(values)
    return timing


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"


def _ratio(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:,.0f}x"


def format_speed(timings: Sequence[Timing], threads: Sequence[int]) -> str:
    first = threads[0]
    header = [
        "case",
        "loads",
        *(f"deepseek {n}t ms" for n in threads),
        "python ms",
        "torch ms",
        *(f"vs python ({n}t)" for n in threads),
        f"vs torch ({first}t)",
    ]
    rows = [
        [
            t.case,
            t.loads,
            *(_ms(t.seconds.get(f"deepseek@{n}")) for n in threads),
            _ms(t.seconds.get("python")),
            _ms(t.seconds.get("torch")),
            *(_ratio(t.ratio("python", f"deepseek@{n}")) for n in threads),
            _ratio(t.ratio("torch", f"deepseek@{first}")),
        ]
        for t in timings
    ]
    return table(header, rows)


def format_moelb_times(timings: Sequence[Timing], threads: Sequence[int]) -> str:
    header = [
        "case",
        "loads",
        *(f"node {n}t ms" for n in threads),
        *(f"none {n}t ms" for n in threads),
        *(f"deepseek {n}t ms" for n in threads),
    ]
    rows = [
        [
            t.case,
            t.loads,
            *(_ms(t.seconds.get(f"node@{n}")) for n in threads),
            *(_ms(t.seconds.get(f"none@{n}")) for n in threads),
            *(_ms(t.seconds.get(f"deepseek@{n}")) for n in threads),
        ]
        for t in timings
    ]
    return table(header, rows)


def format_quality(qualities: Sequence[Quality], num_layers: int) -> str:
    header = [
        "case",
        "loads",
        "S",
        "plan",
        "ran",
        "balancedness",
        "mean gap",
        "max gap",
        "slot bound",
        "gap to it",
        "packing gap",
        "worse layers",
        "same 1t/2t",
    ]
    rows = [
        [
            q.case,
            q.loads,
            str(q.slots_per_gpu),
            q.plan,
            q.algorithm,
            f"{q.balancedness:.5f}",
            f"{q.mean_gap:.4%}",
            f"{q.max_gap:.4%}",
            "-" if q.slot_bound_excess is None else f"+{q.slot_bound_excess:.4%}",
            "-" if q.gap_to_slot_bound is None else f"{q.gap_to_slot_bound:.4%}",
            f"{q.packing_gap:.4%}",
            "-" if q.worse_layers is None else f"{q.worse_layers}/{num_layers}",
            "-" if q.same_at_2_threads is None else ("yes" if q.same_at_2_threads else "NO"),
        ]
        for q in qualities
    ]
    return table(header, rows)


def format_agreement(agreements: Sequence[Agreement]) -> str:
    header = ["case", "loads", "vs", "same logcnt", "same GPU loads", "same phy2log", "ok?"]
    rows = [
        [
            a.case,
            a.loads,
            a.reference,
            f"{a.same_logcnt}/{a.num_layers}",
            f"{a.same_rank_loads}/{a.num_layers}",
            f"{a.same_phy2log}/{a.num_layers}",
            "ok" if a.ok else "DISAGREE",
        ]
        for a in agreements
    ]
    return table(header, rows)


def evaluate_goals(
    timings: Sequence[Timing], qualities: Sequence[Quality], threads: Sequence[int]
) -> list[dict[str, Any]]:
    """The issue's four goals (the speed ones per thread count), each with whether it is met
    and the figures behind it."""
    goals: list[dict[str, Any]] = []

    for n in threads:
        ratios = {
            f"{t.case} {t.loads}": r
            for t in timings
            if (r := t.ratio("python", f"deepseek@{n}")) is not None
        }
        worst = min(ratios, key=ratios.__getitem__) if ratios else None
        goals.append(
            {
                "goal": f"deepseek mode >= {GOAL_VS_PYTHON:g}x the Python port ({n} "
                f"thread{'s' if n > 1 else ''})",
                "met": bool(ratios) and min(ratios.values()) >= GOAL_VS_PYTHON,
                "detail": "no timings"
                if worst is None
                else f"lowest {ratios[worst]:,.0f}x ({worst}), "
                f"highest {max(ratios.values()):,.0f}x",
                "values": ratios,
            }
        )

    compared = [q for q in qualities if q.worse_layers is not None]
    worse = sum(q.worse_layers or 0 for q in compared)
    excess = max((q.worst_excess or 0.0 for q in compared), default=0.0)
    goals.append(
        {
            "goal": "moelb never worse than DeepSeek on any layer (same locality)",
            "met": worse == 0,
            "detail": f"{worse} worse layer(s) over {len(compared)} plans; "
            + (
                f"closest: moelb max {excess:+.4%} vs DeepSeek's"
                if worse
                else f"worst layer: moelb max {excess:+.4%} vs DeepSeek's (<= 0 is as good)"
            ),
            "values": {f"{q.case} {q.loads} {q.plan}": q.worse_layers for q in compared},
        }
    )

    in_scope = [
        q
        for q in qualities
        if q.plan == "moelb none" and q.slots_per_gpu >= GOAL_GAP_MIN_SLOTS_PER_GPU
    ]
    gaps = {f"{q.case} {q.loads}": q.mean_gap for q in in_scope}
    # Cases where no placement can meet the goal: the slot-aware bound alone is further above
    # the flat one.
    unreachable = {
        f"{q.case} {q.loads}": q.slot_bound_excess
        for q in in_scope
        if q.slot_bound_excess is not None and q.slot_bound_excess > GOAL_GAP
    }
    widest = max(gaps, key=gaps.__getitem__) if gaps else None
    goals.append(
        {
            "goal": f'locality="none" mean gap <= {GOAL_GAP:.1%} at >= '
            f"{GOAL_GAP_MIN_SLOTS_PER_GPU} slots per GPU",
            "met": bool(gaps) and max(gaps.values()) <= GOAL_GAP,
            "detail": "no case"
            if widest is None
            else f"widest {gaps[widest]:.4%} ({widest}); mean over cases "
            f"{statistics.fmean(gaps.values()):.4%}"
            + "".join(
                f"; unreachable at {case}: every placement is >= {excess:.2%} above the flat "
                f"bound on average (slot bound)"
                for case, excess in unreachable.items()
            ),
            "values": gaps,
            "unreachable": unreachable,
        }
    )

    for n in threads:
        plan_times = {
            f"{t.case} {t.loads} {loc}": s
            for t in timings
            for loc in ("node", "none")
            if (s := t.seconds.get(f"{loc}@{n}")) is not None
        }
        slowest = max(plan_times, key=plan_times.__getitem__) if plan_times else None
        goals.append(
            {
                "goal": f"moelb whole-model plan < {GOAL_PLAN_SECONDS * 1e3:g} ms at {n} "
                f"thread{'s' if n > 1 else ''}",
                "met": bool(plan_times) and max(plan_times.values()) < GOAL_PLAN_SECONDS,
                "detail": "no timings"
                if slowest is None
                else f"slowest {plan_times[slowest] * 1e3:.2f} ms ({slowest}), "
                f"fastest {min(plan_times.values()) * 1e3:.2f} ms",
                "values": plan_times,
            }
        )
    return goals


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, help=f"MoE layers (default {DEFAULT_LAYERS})")
    parser.add_argument(
        "--repeats",
        type=int,
        help=f"timed calls per measurement (default {DEFAULT_REPEATS})",
    )
    parser.add_argument(
        "--torch-repeats",
        type=int,
        help=f"timed calls of the PyTorch port (default {DEFAULT_TORCH_REPEATS}; it is slow)",
    )
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[1, 2], help="moelb thread counts (default 1 2)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: {QUICK_LAYERS} layers, {QUICK_REPEATS} repeats unless given",
    )
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch port")
    parser.add_argument("--seed", type=int, default=0, help="seed of the loads (default 0)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results as JSON")
    args = parser.parse_args(argv)
    if args.layers is None:
        args.layers = QUICK_LAYERS if args.quick else DEFAULT_LAYERS
    if args.repeats is None:
        args.repeats = QUICK_REPEATS if args.quick else DEFAULT_REPEATS
    if args.torch_repeats is None:
        args.torch_repeats = QUICK_TORCH_REPEATS if args.quick else DEFAULT_TORCH_REPEATS
    if args.layers < 1 or args.repeats < 1 or args.torch_repeats < 0 or min(args.threads) < 1:
        parser.error("--layers, --repeats and --threads must be positive, --torch-repeats >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch_mod = None if args.no_torch else _import_torch()
    versions = {
        "moelb": moelb.__version__,
        "numpy": np.__version__,
        "torch": torch_mod.__version__ if torch_mod is not None else None,
        "python": platform.python_version(),
    }
    load_avg = load_average()
    print(
        f"rebalance: {args.layers} layers x {NUM_EXPERTS} experts in {NUM_GROUPS} groups, "
        f"median of {args.repeats} runs ({args.torch_repeats} for torch); "
        + machine_summary(load_avg, versions)
    )
    print(
        f"loads: zipf (1/rank^s over a seeded permutation, s = {ZIPF_S:g} +- {ZIPF_S_SPREAD:g} "
        f"per layer) and lognormal (sigma {LOGNORMAL_SIGMA:g}); {TOKENS:,} tokens x top-{TOP_K} "
        f"per layer; seed {args.seed}; tie-free in float32"
    )
    if torch_mod is None:
        reason = "--no-torch" if args.no_torch else "PyTorch is not installed"
        print(f"torch port skipped ({reason})")

    all_loads = make_loads(args.layers, args.seed)
    saved_threads = moelb.get_num_threads()
    saved_torch_threads = torch_mod.get_num_threads() if torch_mod is not None else None
    qualities: list[Quality] = []
    agreements: list[Agreement] = []
    timings: list[Timing] = []
    try:
        for topology in TOPOLOGIES:
            for loads_name, load in all_loads.items():
                case_qualities, plans = measure_quality(topology, loads_name, load, args.threads)
                qualities.extend(case_qualities)
                deepseek_plan = plans["deepseek"]
                references: list[tuple[str, tuple[Any, Any, Any]]] = [
                    ("python", ref.rebalance_experts(load, *topology.args()))
                ]
                if torch_mod is not None:
                    torch_mod.set_num_threads(args.threads[0])
                    references.append(
                        ("torch", ref.rebalance_experts_torch(load, *topology.args()))
                    )
                for name, output in references:
                    agreements.append(
                        check_agreement(
                            topology.name,
                            loads_name,
                            name,
                            load,
                            deepseek_plan,
                            output,
                            topology.ep_size,
                        )
                    )
                timings.append(
                    time_case(
                        topology,
                        loads_name,
                        load,
                        args.threads,
                        args.repeats,
                        args.torch_repeats,
                        torch_mod,
                    )
                )
    finally:
        moelb.set_num_threads(saved_threads)
        if torch_mod is not None and saved_torch_threads is not None:
            torch_mod.set_num_threads(saved_torch_threads)

    print()
    print("DeepSeek's greedy: moelb.rebalance(algorithm='deepseek') vs the ports (median ms)")
    print(format_speed(timings, args.threads))
    print()
    print("moelb.rebalance(algorithm='moelb') wall time per whole-model plan (median ms)")
    print(format_moelb_times(timings, args.threads))
    print()
    print(
        "plan quality (S: slots per GPU; ran: the policy that ran; gap: max GPU load / flat lower"
        "\nbound - 1; worse layers: moelb's max GPU load above DeepSeek's, node vs hierarchical and"
        "\nnone vs global; same 1t/2t: moelb's placement is the same at 1 and 2 threads)"
    )
    print(format_quality(qualities, args.layers))
    print()
    print("agreement of moelb's deepseek mode with the ports on the same loads")
    print(format_agreement(agreements))
    print()
    goals = evaluate_goals(timings, qualities, args.threads)
    for goal in goals:
        print(f"goal: {goal['goal']}: {'met' if goal['met'] else 'NOT met'} -- {goal['detail']}")
    for q in qualities:
        for w in q.worse:
            print(
                f"  worse layer: {q.case} {q.loads} {q.plan} layer {w['layer']}: "
                f"moelb {w['moelb']:.1f} vs {q.compared_with} {w['deepseek']:.1f}"
            )

    if args.json is not None:
        payload = {
            "benchmark": "rebalance",
            "num_layers": args.layers,
            "num_experts": NUM_EXPERTS,
            "num_groups": NUM_GROUPS,
            "repeats": args.repeats,
            "torch_repeats": args.torch_repeats if torch_mod is not None else 0,
            "threads": args.threads,
            "seed": args.seed,
            "cpu_count": os.cpu_count(),
            "load_average_before": load_avg,
            "machine": platform.machine(),
            "versions": versions,
            "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
            "topologies": [asdict(t) | {"name": t.name} for t in TOPOLOGIES],
            "timings": [
                asdict(t)
                | {
                    "speedup_vs_python": t.ratio("python", f"deepseek@{args.threads[0]}"),
                    "speedup_vs_torch": t.ratio("torch", f"deepseek@{args.threads[0]}"),
                }
                for t in timings
            ],
            "quality": [asdict(q) for q in qualities],
            "agreement": [asdict(a) | {"ok": a.ok} for a in agreements],
            "goals": goals,
        }
        write_json(args.json, payload)
        print(f"\nwrote {args.json}")

    failed = [a for a in agreements if not a.ok]
    if failed:
        print(
            "\nDISAGREEMENT: " + ", ".join(f"{a.case} {a.loads} vs {a.reference}" for a in failed),
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
