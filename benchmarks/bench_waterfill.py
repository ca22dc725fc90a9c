"""Benchmark: Waterfill's cost against the routing it follows, and the rank balance it buys.

(1) Cost. On rank 5 of 16 (256 experts, S = 16 slots per rank), ``moelb.select_experts`` routes a
batch with DeepSeek-V3's router (``TopKConfig.deepseek_v3()`` with the fused shared expert,
top-8 of 256, correction bias); ``WaterfillBalancer.expand`` then appends the shared column to
the 8 routed ids. Timed round-robin at each thread count (medians of ``--repeats``):

* (a) ``select_experts(logits, config, bias)`` alone,
* (b) ``balancer.expand(routed ids, routed weights)`` alone, static prefill (one counting pass,
  then a hashed draw per token), static decode (fewest active experts) and dynamic prefill (with an
  in-process all-reduce that returns a precomputed sum),
* (c) ``select_experts(..., waterfill=balancer)``: both in one call.

The goal: (b) costs at most 10% of (a) at 4,096 tokens. Before timing, every expand is checked
against ``tests/python/waterfill_reference.py`` (a literal plain-Python reading of SGLang's rules);
its time is printed for scale.

(2) Balance. 16 ranks each route their own batch (sizes drawn from 0.5x-1.5x of ``--tokens``)
whose logits favour the same hot experts (a per-expert skew of standard deviation ``--skew``),
as under real traffic, on the trivial placement (256 slots) and on an EPLB placement planned by
``moelb.rebalance`` from a sample of the same traffic (288 slots, 2 nodes; the routed load is then
nearly even, and the shared experts of the unequal batches are what is left to balance).
``moelb.waterfill_rank_loads`` counts each rank's work (routed ids landing in its slots + shared
experts it computes) without Waterfill (each token's shared expert on its own rank) and with it,
static and dynamic, prefill and decode; prints the balancedness (mean / max rank load) and the
gain.

This is not a timed test: it never fails on speed; it exits with status 1 only when moelb and the
reference disagree.

    python benchmarks/bench_waterfill.py            # 4,096 tokens, 1 and 2 threads
    python benchmarks/bench_waterfill.py --quick    # smoke test, a few seconds
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import moelb
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "python"))

import waterfill_reference as ref
from bench_common import load_average, machine_summary, table, write_json

NUM_EXPERTS = 256
EP_SIZE = 16
RANK = 5
TOP_K = 8
GOAL = 0.10
EPLB_SLOTS = 288  # 256 experts + 32 redundant on 16 ranks


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=31)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--decode-tokens", type=int, default=64, help="per-rank decode batch")
    p.add_argument("--skew", type=float, default=0.5, help="std of the per-expert logit skew")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the results here (atomically)")
    p.add_argument("--quick", action="store_true", help="smoke test: small and few repeats")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.repeats, args.decode_tokens = 512, 3, 16
    for name in ("tokens", "repeats", "decode_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if any(t < 1 for t in args.threads):
        p.error(f"--threads must be positive, got {args.threads}")
    return args


def config() -> moelb.TopKConfig:
    v3 = moelb.TopKConfig.deepseek_v3()
    return moelb.TopKConfig(
        top_k=v3.top_k,
        scoring=v3.scoring,
        num_groups=v3.num_groups,
        topk_group=v3.topk_group,
        renormalize=v3.renormalize,
        routed_scaling_factor=v3.routed_scaling_factor,
        num_fused_shared_experts=1,
    )


def logits_for(rng: np.random.Generator, tokens: int, skew: np.ndarray) -> np.ndarray:
    return (rng.standard_normal((tokens, NUM_EXPERTS)) + skew).astype(np.float32)


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def time_round_robin(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median wall time (ms) of each function, called once per round in a rotating order."""
    names = list(fns)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for fn in fns.values():  # warm-up
        fn()
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            start = time.perf_counter()
            fns[n]()
            samples[n].append(time.perf_counter() - start)
    return {n: median_ms(s) for n, s in samples.items()}


def check_against_reference(
    balancer: moelb.WaterfillBalancer,
    ids: np.ndarray,
    weights: np.ndarray,
    is_decode: bool,
    reduced: np.ndarray | None,
) -> tuple[bool, float]:
    """moelb's expand vs the literal reference; (identical, reference seconds)."""
    got_ids, got_w = balancer.expand(ids, weights, is_decode=is_decode)
    start = time.perf_counter()
    want_ids, want_w, _ = ref.expand(
        ids,
        weights,
        NUM_EXPERTS,
        EP_SIZE,
        RANK,
        balancer.routed_scaling_factor,
        is_decode=is_decode,
        dynamic=reduced is not None,
        reduced=None if reduced is None else list(reduced),
    )
    elapsed = time.perf_counter() - start
    same = np.array_equal(got_ids, want_ids) and np.array_equal(got_w, want_w)
    return same, elapsed


def cost(args: argparse.Namespace, rng: np.random.Generator, skew: np.ndarray) -> dict[str, Any]:
    cfg = config()
    bias = (rng.standard_normal(NUM_EXPERTS) * 0.05).astype(np.float32)
    logits = logits_for(rng, args.tokens, skew)
    routed = moelb.select_experts(logits, cfg, bias)
    ids = routed.recorder_topk_ids
    weights = np.ascontiguousarray(routed.topk_weights[:, :TOP_K])
    # Dynamic mode: the other ranks' contribution is this batch's, rotated by rank.
    part = ref.exchange_buffer(ids, NUM_EXPERTS, EP_SIZE, RANK, args.tokens, False)
    total = np.array(part, dtype=np.int64) * EP_SIZE
    rsf = cfg.routed_scaling_factor
    balancers = {
        "static prefill": (moelb.WaterfillBalancer(NUM_EXPERTS, EP_SIZE, RANK, rsf), False, None),
        "static decode": (moelb.WaterfillBalancer(NUM_EXPERTS, EP_SIZE, RANK, rsf), True, None),
        "dynamic prefill": (
            moelb.WaterfillBalancer(
                NUM_EXPERTS, EP_SIZE, RANK, rsf, "dynamic", lambda _: total.copy()
            ),
            False,
            total,
        ),
    }
    checks = []
    for name, (balancer, is_decode, reduced) in balancers.items():
        same, seconds = check_against_reference(balancer, ids, weights, is_decode, reduced)
        checks.append({"variant": name, "identical": same, "reference_ms": seconds * 1e3})

    results = []
    for threads in args.threads:
        moelb.set_num_threads(threads)
        fns: dict[str, Callable[[], Any]] = {
            "route": lambda: moelb.select_experts(logits, cfg, bias)
        }
        for name, (balancer, is_decode, _) in balancers.items():
            fns[name] = lambda b=balancer, d=is_decode: b.expand(ids, weights, is_decode=d)
        fns["route+waterfill"] = lambda b=balancers["static prefill"][0]: moelb.select_experts(
            logits, cfg, bias, waterfill=b
        )
        ms = time_round_robin(fns, args.repeats)
        for name in balancers:
            results.append(
                {
                    "threads": threads,
                    "variant": name,
                    "route_ms": ms["route"],
                    "expand_ms": ms[name],
                    "ratio": ms[name] / ms["route"],
                    "route_waterfill_ms": ms["route+waterfill"],
                }
            )
    return {"results": results, "checks": checks}


def balance(args: argparse.Namespace, rng: np.random.Generator, skew: np.ndarray) -> list[dict]:
    cfg = moelb.TopKConfig.deepseek_v3()
    bias = (rng.standard_normal(NUM_EXPERTS) * 0.05).astype(np.float32)
    # EPLB from a sample of the same traffic: 288 slots on the 16 ranks (2 nodes).
    sample = moelb.select_experts(logits_for(rng, 8 * args.tokens, skew), cfg, bias)
    load = np.bincount(sample.topk_ids.ravel(), minlength=NUM_EXPERTS)[None, :]
    eplb = moelb.rebalance(load, EPLB_SLOTS, cfg.num_groups, 2, EP_SIZE).location
    rows = []
    for phase, base in (("prefill", args.tokens), ("decode", args.decode_tokens)):
        sizes = [int(s) for s in rng.integers(base // 2, base + base // 2 + 1, EP_SIZE)]
        logits = [logits_for(rng, n, skew) for n in sizes]
        for placement, location in (("trivial", None), ("eplb", eplb)):
            slots = NUM_EXPERTS if location is None else EPLB_SLOTS
            extra: dict[str, Any] = {} if location is None else {"location": location, "layer": 0}
            batches = [
                moelb.select_experts(x, cfg, bias, ep_rank=r, **extra).recorder_topk_ids
                for r, x in enumerate(logits)
            ]
            for mode in ("static", "dynamic"):
                loads = moelb.waterfill_rank_loads(
                    batches, slots, mode, is_decode=phase == "decode"
                )
                rows.append(
                    {
                        "phase": phase,
                        "placement": f"{placement} ({slots} slots)",
                        "mode": mode,
                        "tokens_per_rank": f"{min(sizes)}-{max(sizes)}",
                        "balancedness_local": loads.balancedness_local,
                        "balancedness_waterfill": loads.balancedness_waterfill,
                        "max_load_local": int(loads.load_local.max()),
                        "max_load_waterfill": int(loads.load_waterfill.max()),
                        "mean_load": float(loads.load_local.mean()),
                    }
                )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    versions = {
        "moelb": moelb.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
    load = load_average()
    print(
        f"Waterfill vs select_experts: {args.tokens} tokens, DeepSeek-V3 router (top-{TOP_K} of "
        f"{NUM_EXPERTS}, fused shared expert), rank {RANK} of {EP_SIZE}, median of {args.repeats}; "
        + machine_summary(load, versions)
    )
    rng = np.random.default_rng(args.seed)
    skew = rng.standard_normal(NUM_EXPERTS) * args.skew
    saved = moelb.get_num_threads()
    try:
        timing = cost(args, rng, skew)
    finally:
        moelb.set_num_threads(saved)
    balance_rows = balance(args, rng, skew)

    print()
    print(
        table(
            [
                "variant",
                "threads",
                "route ms",
                "expand ms",
                "expand/route",
                "route+waterfill ms",
            ],
            [
                [
                    r["variant"],
                    str(r["threads"]),
                    f"{r['route_ms']:.3f}",
                    f"{r['expand_ms']:.3f}",
                    f"{r['ratio']:.1%}",
                    f"{r['route_waterfill_ms']:.3f}",
                ]
                for r in timing["results"]
            ],
        )
    )
    missed = [r for r in timing["results"] if r["ratio"] > GOAL]
    print(
        f"goal: expand costs <= {GOAL:.0%} of routing: "
        + (
            "met everywhere"
            if not missed
            else "not met for " + ", ".join(f"{r['variant']}/{r['threads']}t" for r in missed)
        )
    )
    print()
    print("agreement with the literal reference (tests/python/waterfill_reference.py):")
    for c in timing["checks"]:
        print(
            f"  {c['variant']}: {'identical' if c['identical'] else 'DIFFERENT'} "
            f"(reference {c['reference_ms']:.0f} ms)"
        )
    print()
    print(
        f"rank balance: {EP_SIZE} ranks, each routing its own batch (skewed logits, std "
        f"{args.skew}); load = routed ids in the rank's slots + shared experts it computes"
    )
    print(
        table(
            [
                "phase",
                "placement",
                "mode",
                "tokens/rank",
                "mean load",
                "max local",
                "max waterfill",
                "balancedness local",
                "balancedness waterfill",
                "gain",
            ],
            [
                [
                    r["phase"],
                    r["placement"],
                    r["mode"],
                    r["tokens_per_rank"],
                    f"{r['mean_load']:.0f}",
                    str(r["max_load_local"]),
                    str(r["max_load_waterfill"]),
                    f"{r['balancedness_local']:.4f}",
                    f"{r['balancedness_waterfill']:.4f}",
                    f"{r['balancedness_waterfill'] - r['balancedness_local']:+.4f}",
                ]
                for r in balance_rows
            ],
            left=(0, 1, 2),
        )
    )
    if args.json:
        write_json(
            args.json,
            {
                "command": " ".join(sys.argv),
                "versions": versions,
                "load_average": load,
                "timing": timing,
                "balance": balance_rows,
            },
        )
    return 0 if all(c["identical"] for c in timing["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
