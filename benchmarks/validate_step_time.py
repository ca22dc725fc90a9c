"""Validates the step-time model of issue 22 where it can be measured: one GPU's routed experts of
one MoE layer, for token distributions the simulator's dispatch realises, run as real GEMMs and
compared with the time the calibration table predicts. Three modes:

    # 1. here (moelb installed): realised per-expert token counts of ONE rank (the one with the
    #    most routed tokens) for several placements, dispatch models and loads
    python benchmarks/validate_step_time.py distributions \
        --out benchmarks/results/step_time_distributions.json
    # 2. on the GPU (PyTorch only; the kernel and timing of calibrate_gpu.py, beside this file)
    python benchmarks/validate_step_time.py measure --distributions D.json --out measured.json
    # 3. here: the model's prediction from the calibration file against the measured times
    python benchmarks/validate_step_time.py compare --calibration python/moelb/data/gpus/h100.json \
        --distributions D.json --measured measured.json \
        --out benchmarks/results/step_time_validation.json

The prediction is the calibration contract's arithmetic (benchmarks/README.md, "GPU calibration
(issue 22)"), implemented here on its own so that moelb's implementation can be checked against it:
a GPU's layer time = layer_fixed_s + sum over its experts e with T_e > 0 of
[W / BW + max(0, interp(seconds_per_expert, T_e) - W / BW)], interp linear between the table's
token counts and extrapolated linearly from its last two beyond the last; dispatch/combine is not
part of one GPU's measured FFN, so it is 0 here.
"""

from __future__ import annotations

import argparse
import bisect
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import calibrate_gpu  # beside this file; imports PyTorch only when measuring

REGIMES = ("prefill", "decode")

# ---------------------------------------------------------------------------------------------
# The model's arithmetic (pure).


def interpolate(tokens: Sequence[int], seconds: Sequence[float], t: float) -> float:
    """seconds_per_expert at ``t`` tokens: linear between the table's points, linear
    extrapolation from the last two beyond the last point."""
    if len(tokens) != len(seconds) or len(tokens) < 2:
        raise ValueError("tokens and seconds must be equally long, with at least two points")
    if t < 0:
        raise ValueError(f"tokens must be >= 0, got {t}")
    k = bisect.bisect_right(tokens, t)
    if k >= len(tokens):
        k = len(tokens) - 1  # extrapolate with the last segment
    lo, hi = k - 1, k
    frac = (t - tokens[lo]) / (tokens[hi] - tokens[lo])
    return seconds[lo] + frac * (seconds[hi] - seconds[lo])


def find_entry(calibration: dict[str, Any], model: str, dtype: str) -> dict[str, Any]:
    """The calibration's gemm entry of (model, dtype)."""
    for entry in calibration["gemm"]:
        if entry["model"] == model and entry["dtype"] == dtype:
            return entry
    raise ValueError(
        f"the calibration has no gemm entry for model={model!r}, dtype={dtype!r}; it has "
        f"{[(e['model'], e['dtype']) for e in calibration['gemm']]}"
    )


def predict_layer_seconds(
    calibration: dict[str, Any], model: str, dtype: str, tokens_per_expert: Sequence[int]
) -> float:
    """One GPU's modelled time of one MoE layer (no dispatch/combine): layer_fixed_s + sum over
    its experts with tokens of W / BW + max(0, interp(T_e) - W / BW)."""
    entry = find_entry(calibration, model, dtype)
    stream = entry["weight_bytes_per_expert"] / calibration["memory_bandwidth_bytes_per_s"]
    total = calibration["layer_fixed_s"]
    for t in tokens_per_expert:
        if t < 0:
            raise ValueError(f"tokens_per_expert must be >= 0, got {t}")
        if t > 0:
            gemm = max(0.0, interpolate(entry["tokens"], entry["seconds_per_expert"], t) - stream)
            total += stream + gemm
    return total


# ---------------------------------------------------------------------------------------------
# Mode 1: distributions from moelb's simulator (here).


def realised_distributions(
    model: str,
    ep_size: int,
    num_nodes: int,
    tokens_per_gpu: int,
    skew: float,
    dispatches: Sequence[str],
    regime: str,
    seed: int,
    period: int = 4,
    num_redundant_experts: int = 32,
) -> list[dict[str, Any]]:
    """Per placement (trivial, deepseek, moelb) and dispatch model: the tokens each slot of ONE
    rank receives in the first MoE layer, one step after the placements were planned on
    ``period`` steps of the same synthetic traffic (the rank with the most routed tokens: the
    one a token-count view calls the slowest)."""
    import numpy as np
    from moelb.simulate import SimulationConfig
    from moelb.simulation.policies import Cluster, make_policies
    from moelb.simulation.scoring import step_lower_bounds
    from moelb.simulation.token_level import TokenLevel
    from moelb.simulation.traffic import SyntheticRouting

    config = SimulationConfig(
        model=model,
        ep_size=ep_size,
        num_nodes=num_nodes,
        num_redundant_experts=num_redundant_experts,
        num_tokens=tokens_per_gpu * ep_size,
        num_steps=2 * period,
        rebalance_period=period,
        skew=skew,
        algorithms=("deepseek", "moelb"),
        waterfill=None,
        num_layers=1,
        dispatch=tuple(dispatches),
        seed=seed,
    )
    config.validate()
    preset = config.preset()
    cluster = Cluster.of(config, preset)
    layer_ids = np.arange(preset.first_moe_layer, preset.first_moe_layer + 1)
    routing = SyntheticRouting(preset, layer_ids, config)
    for step in range(period):
        routing.route(step)
    counts = routing.window_counts()
    policies = make_policies(config, cluster.trivial(1))
    bound = step_lower_bounds(counts, cluster.num_physical_experts, ep_size)
    timings = {"planning": 0.0, "scoring": 0.0}
    for policy in policies:
        if policy.algorithm is not None:
            window_load = counts.sum(axis=0, dtype=np.float64)
            policy.replan(counts, window_load, bound, cluster, timings)
        policy.expect(counts.sum(axis=0, dtype=np.int64))
    routed = routing.route(period)
    token_level = TokenLevel(config, cluster.num_physical_experts)
    slots = cluster.num_physical_experts // ep_size
    out = []
    for policy in policies:
        for dispatch in dispatches:
            physical = token_level.dispatch(policy, dispatch, routed, period)[0]
            per_slot = np.bincount(physical[physical >= 0], minlength=cluster.num_physical_experts)
            per_rank = per_slot.reshape(ep_size, slots)
            loads = per_rank.sum(axis=1)
            rank = int(np.argmax(loads))
            out.append(
                {
                    "id": f"{regime}-{model}-ep{ep_size}-t{tokens_per_gpu}-s{skew:g}-"
                    f"{policy.name}-{dispatch}",
                    "regime": regime,
                    "model": model,
                    "ep_size": ep_size,
                    "num_nodes": num_nodes,
                    "tokens_per_gpu": tokens_per_gpu,
                    "skew": skew,
                    "seed": seed,
                    "placement": policy.name,
                    "dispatch": dispatch,
                    "layer": int(layer_ids[0]),
                    "rank": rank,
                    "balancedness": float(loads.mean() / loads.max()),
                    "rank_tokens": int(loads[rank]),
                    "mean_rank_tokens": float(loads.mean()),
                    "tokens_per_expert": [int(t) for t in per_rank[rank]],
                }
            )
    return out


#: The grid of realised distributions: (regime, model, ep_size, num_nodes, tokens per GPU, skew).
DISTRIBUTION_GRID = (
    [("prefill", "deepseek-v3", 32, 4, t, s) for t in (4096, 8192) for s in (0.6, 1.0)]
    + [("prefill", "deepseek-v3", 8, 1, 4096, 0.6)]
    + [("decode", "deepseek-v3", 32, 4, t, 0.6) for t in (64, 128, 256)]
    + [("decode", "deepseek-v3", 32, 4, 128, 1.0), ("decode", "deepseek-v3", 8, 1, 256, 0.6)]
)
DISPATCHES = ("sglang_static", "balanced")


def distributions_command(args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    seen: set[tuple[Any, ...]] = set()
    for regime, model, ep, nodes, tpg, skew in DISTRIBUTION_GRID:
        for r in realised_distributions(model, ep, nodes, tpg, skew, DISPATCHES, regime, args.seed):
            # The trivial placement has one replica for most experts: both dispatch models often
            # realise the same counts there; keep one of each distinct distribution.
            key = (r["regime"], r["model"], tuple(r["tokens_per_expert"]))
            if key not in seen:
                seen.add(key)
                rows.append(r)
        print(
            f"{regime} {model} EP{ep} {tpg} tokens/GPU skew {skew}: {len(rows)} so far", flush=True
        )
    for r in rows:
        counts = r["tokens_per_expert"]
        print(
            f"{r['id']:70s} balancedness {r['balancedness']:.3f}  rank {r['rank']:2d}: "
            f"{sum(counts):7d} tokens on {sum(c > 0 for c in counts)}/{len(counts)} experts, "
            f"max {max(counts)}"
        )
    payload = {
        "format": "moelb-step-time-distributions",
        "command": " ".join(["python", "benchmarks/validate_step_time.py", *sys.argv[1:]]),
        "distributions": rows,
    }
    calibrate_gpu.write_json(args.out, payload)
    print(f"wrote {len(rows)} distributions to {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------
# Mode 2: measure on the GPU (PyTorch only).


def measure_command(args: argparse.Namespace) -> int:
    torch = calibrate_gpu._torch()
    if not torch.cuda.is_available():
        print("validate_step_time.py measure: no CUDA device", file=sys.stderr)
        return 2
    rows = json.loads(args.distributions.read_text())["distributions"]
    if args.sample:
        step = max(1, len(rows) // args.sample)
        rows = rows[::step][: args.sample]
    calibrate_gpu.MIN_SECONDS = args.min_seconds
    elementwise = args.elementwise
    if elementwise == "triton" and calibrate_gpu._silu_mul_kernel() is None:
        elementwise = "torch"
    env = calibrate_gpu.environment(args.key, " ".join(["python", *sys.argv]))
    results, methods = [], {}
    for model in sorted({r["model"] for r in rows}):
        hidden, inter = calibrate_gpu.MODELS[model]
        mine = [r for r in rows if r["model"] == model]
        if args.order == "rows":  # light to heavy, as the calibration goes up its token grid
            mine.sort(key=lambda r: sum(r["tokens_per_expert"]))
        max_experts = max(len(r["tokens_per_expert"]) for r in mine)
        max_rows = max(sum(r["tokens_per_expert"]) for r in mine)
        for dtype in args.dtypes:
            group = calibrate_gpu.ExpertGroup(
                hidden, inter, max_experts, dtype, elementwise, seed=args.seed
            )
            methods[f"{model}/{dtype}"] = group.method()
            x, x_scale = group.inputs(max_rows, seed=args.seed + 1)
            for pass_ in range(args.passes):
                for r in mine:
                    seconds = calibrate_gpu.time_layer(
                        group, x, x_scale, r["tokens_per_expert"], args.warmup, args.repeats
                    )
                    results.append(
                        {"id": r["id"], "dtype": dtype, "pass": pass_, "seconds": seconds}
                    )
                    print(f"{dtype:8s} {pass_} {r['id']:70s} {seconds * 1e6:10.1f} us", flush=True)
            del group, x, x_scale
            torch.cuda.empty_cache()
    payload = {k: env[k] for k in ("gpu", "torch", "cuda", "driver", "date", "command")}
    payload.update({"format": "moelb-step-time-measured", "methods": methods, "results": results})
    calibrate_gpu.write_json(args.out, payload)
    print(f"wrote {len(results)} timings to {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------
# Mode 3: compare (pure).


def compare(
    calibration: dict[str, Any], distributions: list[dict[str, Any]], measured: list[dict[str, Any]]
) -> dict[str, Any]:
    """Per measured (distribution, dtype): predicted and measured seconds and the relative
    error (predicted / measured - 1); summaries per (regime, dtype)."""
    by_id = {d["id"]: d for d in distributions}
    passes: dict[tuple[str, str], list[float]] = {}
    for m in measured:
        if m["id"] not in by_id:
            raise ValueError(f"measured: distribution {m['id']!r} is not in the distributions")
        passes.setdefault((m["id"], m["dtype"]), []).append(m["seconds"])
    rows = []
    for (key, dtype), seconds in passes.items():
        d = by_id[key]
        measured_s = statistics.median(seconds)
        pred = predict_layer_seconds(calibration, d["model"], dtype, d["tokens_per_expert"])
        rows.append(
            {
                "id": d["id"],
                "regime": d["regime"],
                "dtype": dtype,
                "placement": d["placement"],
                "dispatch": d["dispatch"],
                "tokens_per_gpu": d["tokens_per_gpu"],
                "balancedness": d["balancedness"],
                "rank_tokens": d["rank_tokens"],
                "active_experts": sum(t > 0 for t in d["tokens_per_expert"]),
                "tokens_per_expert": d["tokens_per_expert"],
                "measured_s": measured_s,
                "measured_passes_s": seconds,
                "pass_spread": max(seconds) / min(seconds) - 1.0,
                "predicted_s": pred,
                "error": pred / measured_s - 1.0,
            }
        )
    summary = []
    for regime in REGIMES:
        for dtype in sorted({r["dtype"] for r in rows}):
            mine = [r for r in rows if r["regime"] == regime and r["dtype"] == dtype]
            if not mine:
                continue
            errs = [r["error"] for r in mine]
            summary.append(
                {
                    "regime": regime,
                    "dtype": dtype,
                    "count": len(errs),
                    "mean_error": statistics.fmean(errs),
                    "mean_abs_error": statistics.fmean(abs(e) for e in errs),
                    "max_abs_error": max(abs(e) for e in errs),
                    "within_10_percent": sum(abs(e) <= 0.10 for e in errs),
                    "mean_pass_spread": statistics.fmean(r["pass_spread"] for r in mine),
                }
            )
    return {"rows": rows, "summary": summary}


def compare_command(args: argparse.Namespace) -> int:
    calibration = json.loads(args.calibration.read_text())
    calibrate_gpu.validate_calibration(calibration)
    distributions = json.loads(args.distributions.read_text())["distributions"]
    measured_doc = json.loads(args.measured.read_text())
    result = compare(calibration, distributions, measured_doc["results"])
    for r in result["rows"]:
        print(
            f"{r['dtype']:8s} {r['id']:66s} b={r['balancedness']:.2f} "
            f"{r['active_experts']:2d} exp {r['rank_tokens']:7d} tok  measured "
            f"{r['measured_s'] * 1e6:9.1f} us  predicted {r['predicted_s'] * 1e6:9.1f} us  "
            f"{r['error'] * 100:+6.1f}%"
        )
    print()
    for s in result["summary"]:
        print(
            f"{s['regime']:8s} {s['dtype']:8s} n={s['count']:3d}  "
            f"mean {s['mean_error'] * 100:+5.1f}%  mean |err| {s['mean_abs_error'] * 100:4.1f}%  "
            "max |err| "
            f"{s['max_abs_error'] * 100:4.1f}%  within 10%: {s['within_10_percent']}/{s['count']}  "
            f"pass-to-pass spread {s['mean_pass_spread'] * 100:.1f}%"
        )
    payload = {
        "format": "moelb-step-time-validation",
        "command": " ".join(["python", "benchmarks/validate_step_time.py", *sys.argv[1:]]),
        "calibration": {
            k: calibration[k] for k in ("key", "gpu", "torch", "cuda", "driver", "date", "command")
        },
        "measured": {
            k: measured_doc.get(k) for k in ("gpu", "torch", "date", "command", "methods")
        },
        **result,
    }
    calibrate_gpu.write_json(args.out, payload)
    print(f"wrote {args.out}")
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    d = sub.add_parser("distributions", help="realised per-expert counts from moelb (here)")
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--seed", type=int, default=0)
    m = sub.add_parser("measure", help="time the distributions as real GEMMs (on the GPU)")
    m.add_argument("--distributions", type=Path, required=True)
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--dtypes", nargs="+", default=list(calibrate_gpu.DTYPES))
    m.add_argument("--key", default="h100")
    m.add_argument("--warmup", type=int, default=5)
    m.add_argument("--repeats", type=int, default=30)
    m.add_argument("--min-seconds", type=float, default=calibrate_gpu.MIN_SECONDS)
    m.add_argument("--elementwise", choices=("triton", "torch"), default="triton")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument(
        "--order",
        choices=("rows", "file"),
        default="rows",
        help="rows: by ascending token count (light to heavy, as the calibration runs)",
    )
    m.add_argument("--passes", type=int, default=2, help="passes over all distributions")
    m.add_argument("--sample", type=int, default=0, help="only N evenly spaced distributions")
    c = sub.add_parser("compare", help="predicted vs measured (here)")
    c.add_argument("--calibration", type=Path, required=True)
    c.add_argument("--distributions", type=Path, required=True)
    c.add_argument("--measured", type=Path, required=True)
    c.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return {"distributions": distributions_command, "measure": measure_command}.get(
        args.mode, compare_command
    )(args)


if __name__ == "__main__":
    sys.exit(main())
