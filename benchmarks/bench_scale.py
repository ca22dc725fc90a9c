"""Benchmark: how the EPLB planner and the recorder scale to 1,000+ GPUs and 100k-token batches.

Planner: ``moelb.rebalance`` (algorithms ``deepseek`` and ``moelb``) over a 58-layer model at
growing cluster sizes, up to 4,096 physical experts on 1,024 GPUs in 128 nodes and on 4,096 GPUs
in 512 nodes, for 256 logical experts (DeepSeek-V3) and 384 (Kimi-K2-like), 8 expert groups,
seeded Zipf-skewed loads. Each row times three calls per repeat, interleaved (each repeat starts
with another of the three): without ``previous``, with the trivial placement as ``previous`` (the
placement a deployment starts from), and with an earlier plan (of other Zipf loads) as
``previous`` (a later rebalance round, where moelb's matching to the previous placement has the
most to do). Each row runs in a fresh process so its peak RSS (``resource.getrusage``) is its own:
the table gives the median planning times and the ratio of the slower ``previous`` time to the
time without, the time of ``plan_weight_moves`` (from the trivial placement) over all layers, the
resulting balancedness, the process's peak RSS and how much planning added to it.

Recorder: ``ExpertDistributionRecorder`` at the same 4,096 slots (58 layers, 1,024 ranks) fed
100,000-token top-8 batches: time per ``on_select_experts`` call and per pass, ``dump`` time, and
the peak RSS after the window filled and after twice as many passes (the window is bounded by
``buffer_size``: the second figure must not grow), in ``stat`` and ``per_token`` mode; plus one
``select_experts`` call on 100,000 tokens routed to those 4,096 slots.

This is not a timed test: it prints figures and never fails on speed. ``--quick`` runs small
sizes in a few seconds (the test suite's smoke test).

    python benchmarks/bench_scale.py                     # full sizes (a few minutes)
    python benchmarks/bench_scale.py --quick             # smoke test
    python benchmarks/bench_scale.py --json results.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import moelb
import numpy as np
import numpy.typing as npt

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

from bench_common import load_average, table, write_json  # noqa: E402

NUM_GROUPS = 8  # DeepSeek-V3's n_group (a global policy once nodes do not divide it)
DEFAULT_LAYERS = 58  # DeepSeek-V3's MoE layers
QUICK_LAYERS = 4
DEFAULT_REPEATS = 3
QUICK_REPEATS = 1
TOKENS_BEHIND_LOADS = 1 << 20  # tokens per layer behind the synthetic loads, top-8
TOP_K = 8
ALGORITHMS = ("deepseek", "moelb")


@dataclass(frozen=True)
class Size:
    """A cluster shape for the planner: logical experts, physical slots per layer, GPUs, nodes."""

    num_experts: int
    num_physical_experts: int
    ep_size: int
    num_nodes: int


FULL_SIZES = (  # two halves, E = 256 and E = 384 (the table separates them)
    Size(256, 288, 32, 4),
    Size(256, 320, 64, 8),
    Size(256, 1024, 256, 32),
    Size(256, 4096, 1024, 128),
    Size(256, 4096, 4096, 512),
    Size(384, 416, 32, 4),
    Size(384, 512, 128, 16),
    Size(384, 2048, 512, 64),
    Size(384, 4096, 1024, 128),
    Size(384, 4096, 4096, 512),
)
QUICK_SIZES = (Size(256, 288, 32, 4), Size(256, 320, 64, 8), Size(384, 512, 128, 16))

# The recorder's scale: 4,096 slots of 384 experts on 1,024 ranks in 128 nodes.
RECORDER_SHAPE = Size(384, 4096, 1024, 128)
QUICK_RECORDER_SHAPE = Size(256, 320, 64, 8)
FULL_TOKENS = 100_000
QUICK_TOKENS = 10_000


def zipf_loads(num_layers: int, num_experts: int, seed: int) -> npt.NDArray[np.float64]:
    """[L, E] per-expert loads: Zipf-skewed (exponent ~1) over a random expert order per layer,
    each layer summing to TOKENS_BEHIND_LOADS * TOP_K."""
    rng = np.random.default_rng(seed)
    loads = np.empty((num_layers, num_experts))
    for layer in range(num_layers):
        weights = 1.0 / np.arange(1, num_experts + 1) ** rng.uniform(0.9, 1.1)
        weights = weights[rng.permutation(num_experts)] * rng.uniform(0.8, 1.2, num_experts)
        loads[layer] = np.round(weights / weights.sum() * TOKENS_BEHIND_LOADS * TOP_K)
    return loads


def peak_rss_mib() -> float:
    """This process's peak resident set size so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def run_plan(spec: dict[str, Any]) -> dict[str, Any]:
    """One planner row, in this (fresh) process."""
    size = Size(**spec["size"])
    layers, repeats, algorithm = spec["layers"], spec["repeats"], spec["algorithm"]
    load = zipf_loads(layers, size.num_experts, seed=size.ep_size * 1000 + size.num_experts)
    previous = moelb.ExpertLocation.trivial(
        layers,
        size.num_experts,
        size.num_physical_experts,
        ep_size=size.ep_size,
        num_nodes=size.num_nodes,
    )
    args = (size.num_physical_experts, NUM_GROUPS, size.num_nodes, size.ep_size)
    before = peak_rss_mib()
    # A later round's current placement: the plan of other loads (not timed).
    other = zipf_loads(layers, size.num_experts, seed=size.ep_size * 1000 + size.num_experts + 1)
    earlier = moelb.rebalance(other, *args, algorithm=algorithm).location
    moelb.rebalance(load[:1], *args, algorithm=algorithm)  # warm-up: threads, first allocations
    seconds: dict[str, list[float]] = {"none": [], "trivial": [], "earlier": []}
    plan = None
    variants = [("none", None), ("trivial", previous), ("earlier", earlier)]
    for repeat in range(repeats):
        # Each repeat starts with another variant: a process's first big allocations after a
        # plan is freed are slower (page faults), which would bias the variant always run first.
        shift = repeat % len(variants)
        for name, current in variants[shift:] + variants[:shift]:
            start = time.perf_counter()
            result = moelb.rebalance(load, *args, algorithm=algorithm, previous=current)
            seconds[name].append(time.perf_counter() - start)
            if name == "trivial":
                plan = result
    assert plan is not None
    start = time.perf_counter()
    transfers = sum(
        moelb.plan_weight_moves(previous, plan.location, layer).transfers for layer in range(layers)
    )
    moves_seconds = time.perf_counter() - start
    return {
        "plan_seconds": statistics.median(seconds["trivial"]),
        "plan_seconds_no_previous": statistics.median(seconds["none"]),
        "plan_seconds_previous_plan": statistics.median(seconds["earlier"]),
        "moves_seconds": moves_seconds,
        "transfers": transfers,
        "ran": plan.stats.algorithm,
        "balancedness": plan.stats.balancedness,
        "mean_gap": plan.stats.mean_gap,
        "rss_before_mib": before,
        "peak_rss_mib": peak_rss_mib(),
    }


def run_recorder(spec: dict[str, Any]) -> dict[str, Any]:
    """The recorder (and one select_experts call) at one shape, in this (fresh) process."""
    size = Size(**spec["size"])
    layers, tokens, mode = spec["layers"], spec["tokens"], spec["mode"]
    buffer_size = spec["buffer_size"]
    location = moelb.ExpertLocation.trivial(
        layers,
        size.num_experts,
        size.num_physical_experts,
        ep_size=size.ep_size,
        num_nodes=size.num_nodes,
    )
    rng = np.random.default_rng(0)
    # A few distinct batches, reused over the layers (distinct per layer would cost memory).
    batches = [
        rng.integers(0, size.num_physical_experts, (tokens, TOP_K), dtype=np.int32)
        for _ in range(4)
    ]
    recorder = moelb.ExpertDistributionRecorder(location, mode=mode, buffer_size=buffer_size)
    recorder.start()
    baseline = peak_rss_mib()
    call_seconds: list[float] = []
    pass_seconds: list[float] = []
    rss_full = 0.0
    for p in range(2 * buffer_size):
        pass_start = time.perf_counter()
        with recorder.forward_pass():
            for layer in range(layers):
                with recorder.layer(layer):
                    start = time.perf_counter()
                    recorder.on_select_experts(batches[(p + layer) % len(batches)])
                    call_seconds.append(time.perf_counter() - start)
        pass_seconds.append(time.perf_counter() - pass_start)
        if p + 1 == buffer_size:
            rss_full = peak_rss_mib()
    rss_twice = peak_rss_mib()
    counted = int(recorder.physical_count().sum())
    expected = buffer_size * layers * tokens * TOP_K
    start = time.perf_counter()
    dump = recorder.dump()
    dump_seconds = time.perf_counter() - start
    window = buffer_size * layers * size.num_physical_experts * 4
    if mode == "per_token":
        window += buffer_size * layers * tokens * TOP_K * 4
    result = {
        "on_select_experts_seconds": statistics.median(call_seconds),
        "pass_seconds": statistics.median(pass_seconds),
        "dump_seconds": dump_seconds,
        "dump_shape": list(dump["logical_count"].shape),
        "counts_conserved": counted == expected,
        "window_mib": window / (1 << 20),
        "rss_baseline_mib": baseline,
        "rss_window_full_mib": rss_full,
        "rss_after_twice_mib": rss_twice,
    }
    del recorder, dump
    if spec["select_experts"]:
        config = moelb.TopKConfig(
            top_k=TOP_K, scoring="sigmoid", num_groups=NUM_GROUPS, topk_group=4
        )
        logits = rng.standard_normal((tokens, size.num_experts), dtype=np.float32)
        seconds = []
        for _ in range(3):
            start = time.perf_counter()
            moelb.select_experts(logits, config, location=location, layer=0, ep_rank=0)
            seconds.append(time.perf_counter() - start)
        result["select_experts_seconds"] = statistics.median(seconds)
    result["peak_rss_mib"] = peak_rss_mib()
    return result


def in_child(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Runs ``run_<kind>(spec)`` in a fresh Python process (its own peak RSS)."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if out.returncode != 0:
        raise RuntimeError(f"the {kind} run {spec} failed:\n{out.stdout}\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


@dataclass
class PlanRow:
    num_experts: int
    num_physical_experts: int
    ep_size: int
    num_nodes: int
    algorithm: str
    ran: str
    plan_seconds: float  # previous = the trivial placement
    plan_seconds_no_previous: float
    plan_seconds_previous_plan: float  # previous = an earlier plan
    moves_seconds: float
    transfers: int
    balancedness: float
    mean_gap: float
    rss_before_mib: float
    peak_rss_mib: float


def previous_ratio(row: PlanRow) -> float:
    """The slower of the two ``previous`` times over the time without ``previous``."""
    slower = max(row.plan_seconds, row.plan_seconds_previous_plan)
    return slower / row.plan_seconds_no_previous


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds")
    parser.add_argument("--layers", type=int, help=f"MoE layers (default {DEFAULT_LAYERS})")
    parser.add_argument("--repeats", type=int, help="planner calls per row (median)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, spec = args.child
        run = run_plan if kind == "plan" else run_recorder
        print(json.dumps(run(json.loads(spec))))
        return 0

    quick = args.quick
    layers = args.layers or (QUICK_LAYERS if quick else DEFAULT_LAYERS)
    repeats = args.repeats or (QUICK_REPEATS if quick else DEFAULT_REPEATS)
    sizes = QUICK_SIZES if quick else FULL_SIZES
    print(
        f"moelb {moelb.__version__}, {moelb.get_num_threads()} thread(s), {platform.machine()}, "
        f"Python {platform.python_version()}; {layers} layers, {NUM_GROUPS} groups, median of "
        f"{repeats}; each row in a fresh process"
    )

    plan_rows: list[PlanRow] = []
    for size in sizes:
        for algorithm in ALGORITHMS:
            spec = {"size": asdict(size), "layers": layers, "repeats": repeats}
            raw = in_child("plan", {**spec, "algorithm": algorithm})
            plan_rows.append(PlanRow(**asdict(size), algorithm=algorithm, **raw))
    print(
        "\nPlanner: rebalance without previous, with previous=trivial and with previous=an "
        "earlier plan; plan_weight_moves from the trivial placement over all layers"
    )
    print(
        table(
            [
                "E",
                "P",
                "GPUs",
                "nodes",
                "algorithm",
                "ran",
                "no previous ms",
                "trivial ms",
                "earlier plan ms",
                "x",
                "moves ms",
                "transfers",
                "balancedness",
                "peak RSS MiB",
                "+planning MiB",
            ],
            [
                [
                    str(r.num_experts),
                    str(r.num_physical_experts),
                    str(r.ep_size),
                    str(r.num_nodes),
                    r.algorithm,
                    r.ran,
                    f"{r.plan_seconds_no_previous * 1e3:.2f}",
                    f"{r.plan_seconds * 1e3:.2f}",
                    f"{r.plan_seconds_previous_plan * 1e3:.2f}",
                    f"{previous_ratio(r):.2f}",
                    f"{r.moves_seconds * 1e3:.1f}",
                    str(r.transfers),
                    f"{r.balancedness:.4f}",
                    f"{r.peak_rss_mib:.0f}",
                    f"{r.peak_rss_mib - r.rss_before_mib:.1f}",
                ]
                for r in plan_rows
            ],
            left=(4, 5),
            separate_every=2 * (len(sizes) // 2) if not quick else None,
        )
    )

    worst = max(plan_rows, key=previous_ratio)
    print(
        f"previous costs at most {previous_ratio(worst):.2f}x the plan without it "
        f"({worst.algorithm}, {worst.num_physical_experts} slots on {worst.ep_size} GPUs)"
    )

    shape = QUICK_RECORDER_SHAPE if quick else RECORDER_SHAPE
    tokens = QUICK_TOKENS if quick else FULL_TOKENS
    recorder_rows = []
    for mode, buffer_size in (("stat", 2 if quick else 8), ("per_token", 2)):
        spec = {
            "size": asdict(shape),
            "layers": layers,
            "tokens": tokens,
            "mode": mode,
            "buffer_size": buffer_size,
            "select_experts": mode == "stat",
        }
        recorder_rows.append({**spec, **in_child("recorder", spec)})
    print(
        f"\nRecorder: {tokens:,}-token top-{TOP_K} batches, {layers} layers, "
        f"{shape.num_physical_experts} slots on {shape.ep_size} ranks; "
        f"2 x buffer_size passes recorded"
    )
    print(
        table(
            [
                "mode",
                "buffer",
                "on_select_experts ms",
                "pass ms",
                "dump ms",
                "window MiB",
                "RSS start",
                "RSS window full",
                "RSS after 2x",
                "conserved",
            ],
            [
                [
                    r["mode"],
                    str(r["buffer_size"]),
                    f"{r['on_select_experts_seconds'] * 1e3:.2f}",
                    f"{r['pass_seconds'] * 1e3:.1f}",
                    f"{r['dump_seconds'] * 1e3:.1f}",
                    f"{r['window_mib']:.1f}",
                    f"{r['rss_baseline_mib']:.0f}",
                    f"{r['rss_window_full_mib']:.0f}",
                    f"{r['rss_after_twice_mib']:.0f}",
                    "yes" if r["counts_conserved"] else "NO",
                ]
                for r in recorder_rows
            ],
        )
    )
    select_seconds = recorder_rows[0]["select_experts_seconds"]
    print(
        f"select_experts on {tokens:,} tokens (E={shape.num_experts}, grouped sigmoid top-{TOP_K},"
        f" static dispatch to {shape.num_physical_experts} slots): {select_seconds * 1e3:.1f} ms"
    )
    # recorder.all_reduce of a DeepSeek-V3 window across gloo processes (bench_all_reduce.py),
    # against a plain torch.distributed.all_reduce of the same bytes.
    reduce_rows: list[dict] = []
    try:
        import torch.distributed  # noqa: F401
        from bench_all_reduce import measure
    except ImportError:
        print("\nrecorder.all_reduce: skipped (needs PyTorch)")
    else:
        cases = ((2, 20),) if quick else ((2, 1000), (4, 1000))
        for ranks, passes in cases:
            r = measure(ranks, passes, layers=4 if quick else 61, repeats=1 if quick else 3)
            reduce_rows.append(asdict(r))
        print("\nrecorder.all_reduce (gloo, DeepSeek-V3 counts: 288 slots; median)")
        print(
            table(
                ["ranks", "passes", "layers", "MB per rank", "all_reduce ms", "recorder ms", "x"],
                [
                    [
                        str(r["ranks"]),
                        str(r["passes"]),
                        str(r["layers"]),
                        f"{r['megabytes']:.1f}",
                        f"{r['all_reduce_seconds'] * 1e3:.1f}",
                        f"{r['recorder_seconds'] * 1e3:.1f}",
                        f"{r['ratio']:.1f}",
                    ]
                    for r in reduce_rows
                ],
            )
        )
    load = load_average()
    print(f"\nload average at the end: {load:.2f}" if load is not None else "")

    if args.json:
        write_json(
            args.json,
            {
                "quick": quick,
                "layers": layers,
                "repeats": repeats,
                "threads": moelb.get_num_threads(),
                "planner": [asdict(r) for r in plan_rows],
                "recorder": recorder_rows,
                "all_reduce": reduce_rows,
                "load_average": load,
            },
        )
    ok = all(r["counts_conserved"] for r in recorder_rows) and all(r["agrees"] for r in reduce_rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
