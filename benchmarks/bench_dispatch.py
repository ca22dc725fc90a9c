"""Benchmark: the balance a placement realises under each engine's dispatch, against the equal split
it was planned for; and the speed of moelb's SGLang static table against SGLang's Python loop.

At DeepSeek-V3 scale (--layers MoE layers, default 16, of 256 experts in 8 groups; 288 slots on
32 GPUs in 4 nodes; 4,096 tokens x top-8 per step split evenly over the 32 source ranks), each
layer has a fixed Zipf-like popularity (1 / rank^--skew over a seeded expert order). Tokens pick
their top-8 experts by Gumbel-perturbed log popularity, so the expected load is known exactly and
each placement is planned on it: what remains is the dispatch, not prediction error. Every
placement (DeepSeek's hierarchical and global policies, moelb node-local and free) is then
served for --steps steps; per step and layer the tokens of every source rank are dispatched by
each model (``moelb.dispatch_tokens`` / ``moelb.dispatch_tables``) and the per-GPU routed load is
scored as SGLang does ((mean + 1e-5) / (max + 1e-5), averaged); "max/mean" is its inverse.

Speed: ``moelb.dispatch_table(location, "sglang_static", rank)`` (one rank's table, what each
SGLang rank builds at start-up) against the same algorithm as a plain Python loop over lists,
written here from reference/dispatch.md §2-3 (SGLang's ``compute_logical_to_rank_dispatch_
physical_map`` is such a loop; this is not SGLang's own code), checked equal to moelb's; medians
of --repeats runs.

Exact per-step split: ``moelb.balanced_split`` (ours; a max-flow, reference/dispatch.md §7) per
layer on one thread at EP32/288, EP64/320, EP144/288 and EP256/512 slots (256 experts, 8 GPUs per
node), on placements planned by ``moelb.rebalance`` from skewed expected loads (Zipf --skew) and on
per-step counts drawn around them (128 tokens x top-8 per rank and step, multinomial over the
layer's popularity); median over steps of one call's time for all --split-layers layers, divided
by the layers. Against it, ``scipy.optimize.linprog(method="highs")`` on the same LP (built before
the clock starts; only the solve is timed) for a few layers, when SciPy is importable; its
``ceil(optimum)`` must equal moelb's largest rank load. Also the realised max/mean rank load of the
steps under the equal split and under balanced_split.

This is not a timed test: it exits with status 1 only if moelb's table differs from the Python
loop's, a dispatch sends a token to a slot that does not hold its expert, balanced_split does not
conserve a count, or its largest rank load differs from linprog's ceil(optimum).

    python benchmarks/bench_dispatch.py             # 16 layers, about a minute on 2 CPUs
    python benchmarks/bench_dispatch.py --quick     # smoke test: 2 layers, 2 steps, 4 split layers
    python benchmarks/bench_dispatch.py --json results.json
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import moelb
import numpy as np
import numpy.typing as npt

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

from bench_common import load_average, machine_summary, table, write_json  # noqa: E402

NUM_EXPERTS = 256
NUM_GROUPS = 8
NUM_SLOTS = 288
NUM_GPUS = 32
NUM_NODES = 4
TOP_K = 8
TOKENS = 4096
DEFAULT_LAYERS = 16
QUICK_LAYERS = 2
DEFAULT_STEPS = 8
QUICK_STEPS = 2
PLACEMENTS = (
    ("deepseek", "deepseek", "auto"),
    ("deepseek_global", "deepseek_global", "auto"),
    ("moelb", "moelb", "node"),
    ("moelb:none", "moelb", "none"),
)
DISPATCH = (
    "equal_split",
    "sglang_static",
    "sglang_static_runtime",
    "sglang_dynamic",
    "vllm_hash",
    "round_robin",
    "moelb_static",
)


# ------------------------------------------------------------------------------------------------
# SGLang's static table, as its Python code computes it (reference/dispatch.md §2-3).


def _nearest(candidates: list[int], rank: int, S: int, rpn: int) -> int:
    if len(candidates) == 1:
        return candidates[0]
    for p in candidates:
        if p // S == rank:
            return p
    node = rank // rpn
    same = [p for p in candidates if p // (S * rpn) == node]
    return same[0] if same and len(same) < len(candidates) else -1


def python_sglang_table(location: moelb.ExpertLocation, rank: int) -> npt.NDArray[np.int32]:
    """One rank's table on the --init-expert-location path: collapse, then Random(42)."""
    W = location.ep_size
    S, rpn = location.num_local_physical_experts, W // location.num_nodes
    l2p = location.logical_to_physical.tolist()
    rng = random.Random(42)
    out = np.empty((location.num_layers, location.num_logical_experts), dtype=np.int32)
    for layer, experts in enumerate(l2p):
        for e, padded in enumerate(experts):
            cands = [p for p in padded if p >= 0]
            near = _nearest(cands, rank, S, rpn)
            if near >= 0:
                cands = [near]
            res = [_nearest(cands, g, S, rpn) for g in range(W)]
            remaining = [g for g in range(W) if res[g] == -1]
            if remaining:
                q, r = divmod(len(remaining), len(cands))
                choices = cands * q + rng.sample(cands, k=r)
                rng.shuffle(choices)
                for g, c in zip(remaining, choices, strict=True):
                    res[g] = c
            out[layer, e] = res[rank]
    return out


# Exact per-step split: (ep_size, num_physical_experts, num_nodes), 8 GPUs per node.
SPLIT_SIZES = ((32, 288, 4), (64, 320, 8), (144, 288, 18), (256, 512, 32))
SPLIT_TOKENS_PER_RANK = 128
DEFAULT_SPLIT_LAYERS = 58  # DeepSeek-V3's MoE layers
QUICK_SPLIT_LAYERS = 4
DEFAULT_SPLIT_STEPS = 21
QUICK_SPLIT_STEPS = 3
DEFAULT_LP_LAYERS = 6
QUICK_LP_LAYERS = 1

# ------------------------------------------------------------------------------------------------
# Traffic and scoring.


def popularity(rng: np.random.Generator, layers: int, skew: float) -> npt.NDArray[np.float64]:
    """[L, E]: 1 / rank^skew over a seeded expert order per layer, normalised."""
    base = 1.0 / np.arange(1, NUM_EXPERTS + 1) ** skew
    p = np.stack([base[rng.permutation(NUM_EXPERTS)] for _ in range(layers)])
    return p / p.sum(axis=1, keepdims=True)


def expected_load(p: npt.NDArray[np.float64], rng: np.random.Generator) -> npt.NDArray[np.float64]:
    """[L, E]: the expected top-8 counts of a step, estimated from a large sample."""
    load = np.zeros_like(p)
    for layer in range(p.shape[0]):
        ids = route(p[layer], 16 * TOKENS, rng)
        load[layer] = np.bincount(ids.ravel(), minlength=NUM_EXPERTS) / 16
    return load


def route(p: npt.NDArray[np.float64], tokens: int, rng: np.random.Generator) -> npt.NDArray[Any]:
    """[tokens, 8] int32: top-8 of log p + Gumbel noise (8 distinct experts per token)."""
    scores = np.log(p)[None, :] + rng.gumbel(size=(tokens, NUM_EXPERTS))
    return np.argpartition(-scores, TOP_K, axis=1)[:, :TOP_K].astype(np.int32)


def balancedness(loads: npt.NDArray[np.float64]) -> float:
    """SGLang's rate of one layer's per-GPU loads."""
    return moelb.utilization_rate(float(loads.mean()), float(loads.max()))


def score(
    location: moelb.ExpertLocation,
    steps: list[list[npt.NDArray[np.int32]]],
    offsets: npt.NDArray[np.int64],
    problems: list[str],
    name: str,
) -> dict[str, float]:
    """Per dispatch model: mean balancedness of the routed per-GPU load over steps and layers."""
    W = location.ep_size
    S = location.num_local_physical_experts
    source = np.repeat(np.arange(W), np.diff(offsets))
    tables = {
        d: moelb.dispatch_tables(location, d)
        for d in ("sglang_static", "sglang_static_runtime", "moelb_static")
    }
    out: dict[str, list[float]] = {d: [] for d in DISPATCH}
    for step, layers in enumerate(steps):
        for layer, ids in enumerate(layers):
            p2l = location.physical_to_logical[layer]
            counts = np.bincount(ids.ravel(), minlength=NUM_EXPERTS)
            share = counts[p2l] / location.logical_count[layer][p2l]
            out["equal_split"].append(balancedness(share.reshape(W, S).sum(axis=1)))
            for d in DISPATCH[1:]:
                if d in tables:
                    physical = tables[d][source[:, None], layer, ids]
                else:
                    physical = moelb.dispatch_tokens(
                        ids, location, layer, d, rank_offsets=offsets, seed=step
                    )
                if not np.array_equal(p2l[physical], ids):
                    problems.append(f"{name} {d}: a token reached a slot without its expert")
                out[d].append(balancedness(np.bincount(physical.ravel() // S, minlength=W)))
    return {d: float(np.mean(v)) for d, v in out.items()}


def time_tables(location: moelb.ExpertLocation, repeats: int, problems: list[str]) -> dict:
    ours, theirs = [], []
    for i in range(repeats):
        rank = (7 * i) % location.ep_size
        t0 = time.perf_counter()
        mine = moelb.dispatch_table(location, "sglang_static", rank)
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ref = python_sglang_table(location, rank)
        theirs.append(time.perf_counter() - t0)
        if not np.array_equal(mine, ref):
            problems.append(f"sglang_static table of rank {rank} differs from the Python loop")
    return {
        "moelb_ms": statistics.median(ours) * 1e3,
        "python_ms": statistics.median(theirs) * 1e3,
        "ratio": statistics.median(theirs) / statistics.median(ours),
    }


# ------------------------------------------------------------------------------------------------
# Exact per-step split: balanced_split against linprog on the LP of reference/dispatch.md §7.


def split_lp(
    location: moelb.ExpertLocation, layer: int, counts: npt.NDArray[np.int64]
) -> tuple[Any, ...]:
    """(c, A_ub, b_ub, A_eq, b_eq) of min T s.t. sum_g x[e, g] = n_e, sum_e x[e, g] <= T over
    the distinct ranks g of each expert's replicas (no fixed loads here)."""
    from scipy import sparse

    S = location.num_local_physical_experts
    p2l = location.physical_to_logical[layer]
    pairs = sorted({(int(e), p // S) for p, e in enumerate(p2l) if counts[e] > 0})
    experts = sorted({e for e, _ in pairs})
    row = {e: i for i, e in enumerate(experts)}
    n = len(pairs)
    cols = np.arange(n)
    a_eq = sparse.csr_matrix(
        (np.ones(n), ([row[e] for e, _ in pairs], cols)), shape=(len(experts), n + 1)
    )
    ranks = np.array([g for _, g in pairs])
    a_ub = sparse.csr_matrix(
        (
            np.concatenate([np.ones(n), -np.ones(location.ep_size)]),
            (
                np.concatenate([ranks, np.arange(location.ep_size)]),
                np.concatenate([cols, np.full(location.ep_size, n)]),
            ),
        ),
        shape=(location.ep_size, n + 1),
    )
    c = np.zeros(n + 1)
    c[n] = 1.0
    return c, a_ub, np.zeros(location.ep_size), a_eq, counts[experts].astype(float)


def max_over_mean(rank_loads: npt.NDArray[Any]) -> float:
    """Mean over rows of max / mean of each row's rank loads."""
    return float(np.mean(rank_loads.max(axis=-1) / rank_loads.mean(axis=-1)))


def time_balanced_split(args: argparse.Namespace, problems: list[str]) -> list[dict[str, Any]]:
    try:
        from scipy import optimize
    except ImportError:
        optimize = None
    L = args.split_layers
    results = []
    threads = moelb.get_num_threads()
    for W, P, N, location, steps in split_instances(args):
        tokens = SPLIT_TOKENS_PER_RANK * W * TOP_K
        S = location.num_local_physical_experts
        seconds, split_loads, equal_loads = [], [], []
        moelb.set_num_threads(1)
        try:
            for counts in steps:
                t0 = time.perf_counter()
                out = moelb.balanced_split(counts, location)
                seconds.append(time.perf_counter() - t0)
                got = np.stack(
                    [np.bincount(location.physical_to_logical[i], out[i], NUM_EXPERTS)
                     for i in range(L)]
                )  # fmt: skip
                if not np.array_equal(got, counts):
                    problems.append(f"balanced_split EP{W}/{P}: a count is not conserved")
                split_loads.append(out.reshape(L, W, S).sum(axis=2))
                share = counts[np.arange(L)[:, None], location.physical_to_logical]
                share = share / location.logical_count[np.arange(L)[:, None],
                                                       location.physical_to_logical]  # fmt: skip
                equal_loads.append(share.reshape(L, W, S).sum(axis=2))
        finally:
            moelb.set_num_threads(threads)
        us = statistics.median(seconds) / L * 1e6
        row: dict[str, Any] = {
            "ep_size": W,
            "num_physical_experts": P,
            "num_nodes": N,
            "num_experts": NUM_EXPERTS,
            "num_layers": L,
            "num_steps": len(steps),
            "tokens_per_step": tokens // TOP_K,
            "us_per_layer": us,
            "max_over_mean_balanced": max_over_mean(np.stack(split_loads)),
            "max_over_mean_equal_split": max_over_mean(np.stack(equal_loads)),
            "linprog_us_per_layer": None,
            "linprog_ratio": None,
        }
        if optimize is not None:
            lp_seconds = []
            counts = steps[0]
            peak = split_loads[0].max(axis=1)
            for layer in range(min(args.lp_layers, L)):
                c, a_ub, b_ub, a_eq, b_eq = split_lp(location, layer, counts[layer])
                t0 = time.perf_counter()
                res = optimize.linprog(c, a_ub, b_ub, a_eq, b_eq, bounds=(0, None), method="highs")
                lp_seconds.append(time.perf_counter() - t0)
                # T* is a multiple of 1 / k for some k <= W: a tolerance below 1 / W is exact.
                if res.status != 0 or int(np.ceil(res.fun - 0.25 / W)) != peak[layer]:
                    problems.append(
                        f"balanced_split EP{W}/{P} layer {layer}: largest rank load "
                        f"{peak[layer]} but linprog gives {res.fun} ({res.message})"
                    )
            row["linprog_us_per_layer"] = statistics.median(lp_seconds) * 1e6
            row["linprog_ratio"] = row["linprog_us_per_layer"] / us
        results.append(row)
    return results


def deal_to_sources(
    rng: np.random.Generator, counts: npt.NDArray[np.int64], W: int
) -> npt.NDArray[np.int64]:
    """[L, W, E]: each layer's routed tokens ([L, E]) dealt at random to the W source ranks, the
    same number to each (128 tokens x top-8 per rank): every source's counts sum to the step's."""
    L, E = counts.shape
    out = np.empty((L, W, E), dtype=np.int64)
    for layer in range(L):
        ids = np.repeat(np.arange(E), counts[layer])
        rng.shuffle(ids)
        rows = np.arange(ids.size) * W // ids.size
        out[layer] = np.bincount(rows * E + ids, minlength=W * E).reshape(W, E)
    return out


def time_balanced_assignment(args: argparse.Namespace, problems: list[str]) -> list[dict[str, Any]]:
    """balanced_assignment (ours) per layer on one thread, as an engine calls it (one layer per
    call, after the all-gather of the per-rank counts), on the exact split's plans and steps dealt
    to the source ranks; the previous solver (a generic min-cost flow over classes of sources,
    moelb._core._balanced_assignment_reference) on the same calls for the ratio. Timed as CPU time
    of the calling thread (time.thread_time: on a shared machine wall time also counts waiting for
    a core). Checks each source's counts, the makespan against balanced_split's and the total cost
    against the previous solver's."""
    reference = moelb._core._balanced_assignment_reference
    rng = np.random.default_rng(args.seed + 2)
    L = args.split_layers
    threads = moelb.get_num_threads()
    results = []
    for W, P, N, location, steps in split_instances(args):
        S, rpn = location.num_local_physical_experts, W // N
        p2l = location.physical_to_logical
        rank = np.arange(P) // S
        cost = np.where(
            rank[None, :] == np.arange(W)[:, None],
            moelb.dispatch.DISPATCH_COST_OWN_RANK,
            np.where(
                rank[None, :] // rpn == np.arange(W)[:, None] // rpn,
                moelb.dispatch.DISPATCH_COST_SAME_NODE,
                moelb.dispatch.DISPATCH_COST_OTHER_NODE,
            ),
        )
        ours_us, all_us, theirs_us = [], [], []
        served = np.zeros(3)
        moelb.set_num_threads(1)
        try:
            for step, counts in enumerate(steps):
                source = deal_to_sources(rng, counts, W)
                # Each layer's result dropped at once, as an engine does after dispatching by it
                # (58 arrays kept alive would time the kernel's page faults for fresh memory).
                t0 = time.thread_time()
                for layer in range(L):
                    moelb.balanced_assignment(source[layer], location, layer=layer)
                ours_us.append((time.thread_time() - t0) / L * 1e6)
                t0 = time.thread_time()
                for layer in range(L):
                    reference(source[layer], location, None, layer)
                theirs_us.append((time.thread_time() - t0) / L * 1e6)
                t0 = time.thread_time()
                out = moelb.balanced_assignment(source, location)
                all_us.append((time.thread_time() - t0) / L * 1e6)
                split = moelb.balanced_split(counts, location)
                for layer in range(L):
                    # Each source's tokens per expert: its slots summed by expert (every expert
                    # has a slot, so the sorted slots start a run per expert).
                    order = np.argsort(p2l[layer], kind="stable")
                    starts = np.searchsorted(p2l[layer][order], np.arange(NUM_EXPERTS))
                    got = np.add.reduceat(out[layer][:, order], starts, axis=1)
                    if not np.array_equal(got, source[layer]):
                        problems.append(f"balanced_assignment EP{W}/{P}: a count is not conserved")
                    peak = out[layer].sum(axis=0).reshape(W, S).sum(axis=1).max()
                    if peak != split[layer].reshape(W, S).sum(axis=1).max():
                        problems.append(
                            f"balanced_assignment EP{W}/{P} step {step} layer {layer}: largest "
                            f"rank load {peak} but balanced_split's is different"
                        )
                    for c in range(3):
                        served[c] += out[layer][cost == c].sum()
                    if layer % max(1, L // 8) != 0:  # the previous solver's cost: some layers
                        continue
                    one = moelb.balanced_assignment(source[layer], location, layer=layer)
                    if not np.array_equal(one, out[layer]):
                        problems.append(
                            f"balanced_assignment EP{W}/{P} layer {layer}: one layer's call "
                            "differs from the call for all layers"
                        )
                    theirs = reference(source[layer], location, None, layer)
                    ours, previous = (out[layer] * cost).sum(), (theirs * cost).sum()
                    if ours != previous:
                        problems.append(
                            f"balanced_assignment EP{W}/{P} step {step} layer {layer}: total cost "
                            f"{ours} but the previous solver's is {previous}"
                        )
        finally:
            moelb.set_num_threads(threads)
        ours, theirs = statistics.median(ours_us), statistics.median(theirs_us)
        results.append(
            {
                "ep_size": W,
                "num_physical_experts": P,
                "num_nodes": N,
                "num_layers": L,
                "num_steps": len(steps),
                "tokens_per_step": SPLIT_TOKENS_PER_RANK * W,
                "us_per_layer": ours,
                "us_per_layer_one_call": statistics.median(all_us),
                "previous_us_per_layer": theirs,
                "ratio": theirs / ours,
                "share_own_rank": served[0] / served.sum(),
                "share_same_node": served[1] / served.sum(),
                "share_other_node": served[2] / served.sum(),
            }
        )
    return results


def split_instances(
    args: argparse.Namespace,
) -> list[tuple[int, int, int, moelb.ExpertLocation, list[npt.NDArray[np.int64]]]]:
    """The exact split's inputs at SPLIT_SIZES: (W, P, N, moelb's plan, per-step counts [L, E])."""
    rng = np.random.default_rng(args.seed + 1)
    L = args.split_layers
    p = popularity(rng, L, args.skew)
    out = []
    for W, P, N in SPLIT_SIZES:
        tokens = SPLIT_TOKENS_PER_RANK * W * TOP_K
        location = moelb.rebalance(p * tokens, P, NUM_GROUPS, N, W).location
        steps = [
            np.stack([rng.multinomial(tokens, p[layer]) for layer in range(L)])
            for _ in range(args.split_steps)
        ]
        out.append((W, P, N, location, steps))
    return out


def compare_sglang_lp(args: argparse.Namespace, problems: list[str]) -> list[dict[str, Any]]:
    """SGLang's ``lp`` (reference model, moelb.reference_dispatch: float32, 5 affine-scaling
    iterations, 0.5 fallback) on the exact split's inputs: its expected rank loads' max/mean, how
    often it fell back, its solve time on the CPU, next to the exact split's max/mean."""
    from moelb import reference_dispatch as ref

    rows = []
    for W, P, _, location, steps in split_instances(args):
        S = location.num_local_physical_experts
        lp_ratio, exact_ratio, seconds, fell_back = [], [], [], 0
        for counts in steps[: args.lp_steps]:
            for layer in range(min(args.lp_layers, counts.shape[0])):
                t0 = time.perf_counter()
                solved = ref.sglang_lp_fractions(counts[layer], location, layer)
                seconds.append(time.perf_counter() - t0)
                fell_back += not solved.converged
                loads = ref.sglang_lp_rank_loads(
                    counts[layer], location, layer, log2phy_prob=solved.log2phy_prob
                )
                lp_ratio.append(loads.max() / loads.mean())
                exact = moelb.balanced_split(counts[layer], location, layer=layer)
                exact_loads = exact.reshape(W, S).sum(axis=1)
                exact_ratio.append(exact_loads.max() / exact_loads.mean())
                if exact_loads.max() > np.ceil(loads.max() - 1e-6):
                    problems.append(
                        f"EP{W}/{P} layer {layer}: the exact split's largest rank load "
                        f"{exact_loads.max()} is above SGLang lp's {loads.max():.1f}"
                    )
        rows.append(
            {
                "ep_size": W,
                "num_physical_experts": P,
                "solves": len(seconds),
                "sglang_lp_max_over_mean": float(np.mean(lp_ratio)),
                "sglang_lp_fallbacks": fell_back,
                "sglang_lp_ms": statistics.median(seconds) * 1e3,
                "balanced_max_over_mean": float(np.mean(exact_ratio)),
            }
        )
    return rows


def lplb_cases(args: argparse.Namespace, problems: list[str]) -> list[dict[str, Any]]:
    """DeepSeek LPLB's test inputs (its topologies, loads N(1, 0.3) * 4096 per expert;
    moelb.reference_dispatch): the exact split's per-step max/mean next to the bound LPLB's tests
    accept, and the 5-iteration affine scaling (SGLang's lp model, one LP over all ranks) on the
    same draws. Each draw is one placement (seeded) and one step."""
    from moelb import reference_dispatch as ref

    rows = []
    for case in ref.LPLB_TEST_CASES:
        exact, affine, under = [], [], 0
        for draw in range(args.lplb_draws):
            location = case.location(seed=args.seed + draw)
            counts = ref.lplb_test_load(case.num_experts, seed=args.seed + 1000 + draw)
            split = moelb.balanced_split(counts.astype(np.int64), location, layer=0)
            loads = split.reshape(case.ep_size, -1).sum(axis=1)
            exact.append(loads.max() / loads.mean())
            under += exact[-1] < case.max_balance
            lp = ref.sglang_lp_rank_loads(counts, location, 0)
            affine.append(lp.max() / lp.mean())
        rows.append(
            {
                "case": case.name,
                "bound": case.max_balance,
                "draws": args.lplb_draws,
                "balanced_max_over_mean": float(np.mean(exact)),
                "balanced_worst": float(np.max(exact)),
                "balanced_under_bound": int(under),
                "affine_scaling_max_over_mean": float(np.mean(affine)),
            }
        )
    return rows


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, help=f"MoE layers (default {DEFAULT_LAYERS})")
    parser.add_argument("--steps", type=int, help=f"served steps (default {DEFAULT_STEPS})")
    parser.add_argument("--skew", type=float, default=0.6, help="Zipf exponent (default 0.6)")
    parser.add_argument("--repeats", type=int, default=5, help="timing repeats (default 5)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 layers, 2 steps")
    parser.add_argument(
        "--split-layers", type=int, help=f"balanced_split layers (default {DEFAULT_SPLIT_LAYERS})"
    )
    parser.add_argument(
        "--split-steps",
        type=int,
        help=f"balanced_split steps timed (default {DEFAULT_SPLIT_STEPS})",
    )
    parser.add_argument(
        "--lp-layers", type=int, help=f"layers solved by linprog (default {DEFAULT_LP_LAYERS})"
    )
    parser.add_argument(
        "--lp-steps", type=int, default=2, help="steps of SGLang lp's comparison (default 2)"
    )
    parser.add_argument(
        "--lplb-draws", type=int, default=10, help="placements x loads per LPLB case (default 10)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results as JSON")
    args = parser.parse_args(argv)
    if args.layers is None:
        args.layers = QUICK_LAYERS if args.quick else DEFAULT_LAYERS
    if args.steps is None:
        args.steps = QUICK_STEPS if args.quick else DEFAULT_STEPS
    if args.split_layers is None:
        args.split_layers = QUICK_SPLIT_LAYERS if args.quick else DEFAULT_SPLIT_LAYERS
    if args.split_steps is None:
        args.split_steps = QUICK_SPLIT_STEPS if args.quick else DEFAULT_SPLIT_STEPS
    if args.lp_layers is None:
        args.lp_layers = QUICK_LP_LAYERS if args.quick else DEFAULT_LP_LAYERS
    if args.quick:
        args.repeats = min(args.repeats, 1)
        args.lp_steps = min(args.lp_steps, 1)
        args.lplb_draws = min(args.lplb_draws, 1)
    if min(args.layers, args.steps, args.repeats, args.split_layers, args.split_steps) < 1:
        parser.error(
            "--layers, --steps, --repeats, --split-layers and --split-steps must be positive"
        )
    if args.lp_layers < 0:
        parser.error("--lp-layers must be >= 0")
    if not (np.isfinite(args.skew) and args.skew >= 0):
        parser.error("--skew must be finite and >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    versions = {
        "moelb": moelb.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
    load_avg = load_average()
    print(
        f"dispatch: {args.layers} layers x {NUM_EXPERTS} experts, {NUM_SLOTS} slots on "
        f"{NUM_GPUS} GPUs in {NUM_NODES} nodes; {TOKENS:,} tokens x top-{TOP_K} per step from "
        f"{NUM_GPUS} source ranks, Zipf {args.skew:g}, {args.steps} steps, seed {args.seed}; "
        + machine_summary(load_avg, versions)
    )
    start = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    p = popularity(rng, args.layers, args.skew)
    load = expected_load(p, rng)
    steps = [
        [route(p[layer], TOKENS, rng) for layer in range(args.layers)] for _ in range(args.steps)
    ]
    offsets = np.linspace(0, TOKENS, NUM_GPUS + 1).astype(np.int64)
    problems: list[str] = []
    rows, results = [], []
    for name, algorithm, locality in PLACEMENTS:
        plan = moelb.rebalance(
            load, NUM_SLOTS, NUM_GROUPS, NUM_NODES, NUM_GPUS, algorithm=algorithm,
            locality=locality,
        )  # fmt: skip
        realised = score(plan.location, steps, offsets, problems, name)
        results.append(
            {"placement": name, "ran": plan.stats.algorithm, "planned": plan.stats.balancedness,
             "realised": realised}
        )  # fmt: skip
        rows.append(
            [name, f"{plan.stats.balancedness:.3f}"]
            + [f"{realised[d]:.3f} ({1 / realised[d]:.2f})" for d in DISPATCH]
        )
    timing = time_tables(plan.location, args.repeats, problems)
    split_timing = time_balanced_split(args, problems)
    assignment_timing = time_balanced_assignment(args, problems)
    lp_rows = compare_sglang_lp(args, problems)
    lplb_rows = lplb_cases(args, problems)
    seconds = time.perf_counter() - start

    print(
        "\nrouted balancedness (max/mean in brackets), per step and layer, averaged; planned: the "
        "plan's\nown statistic on the expected load (equal split)"
    )
    print(table(["placement", "planned", *DISPATCH], rows))
    best = {d: max(results, key=lambda r: r["realised"][d])["placement"] for d in DISPATCH}
    print()
    for d in ("sglang_static", "sglang_dynamic", "moelb_static"):
        print(f"best under {d}: {best[d]}")
    print(
        f"\nSGLang static table of one rank ({args.layers} layers): moelb "
        f"{timing['moelb_ms']:.2f} ms, the same loop in Python {timing['python_ms']:.1f} ms "
        f"({timing['ratio']:.0f}x), median of {args.repeats}"
    )
    print(
        f"\nexact per-step split (balanced_split, ours), one thread: median of "
        f"{args.split_steps} steps x {args.split_layers} layers; linprog (HiGHS, solve only) on "
        f"{args.lp_layers} layers of one step; max/mean: realised rank loads, mean over steps "
        f"and layers"
    )
    split_rows = [
        [
            f"EP{r['ep_size']}/{r['num_physical_experts']}",
            str(r["num_nodes"]),
            f"{r['tokens_per_step']:,}",
            f"{r['us_per_layer']:.1f}",
            "-" if r["linprog_us_per_layer"] is None else f"{r['linprog_us_per_layer']:.0f}",
            "-" if r["linprog_ratio"] is None else f"{r['linprog_ratio']:.0f}x",
            f"{r['max_over_mean_equal_split']:.3f}",
            f"{r['max_over_mean_balanced']:.3f}",
        ]
        for r in split_timing
    ]
    header = ["EP/slots", "nodes", "tokens", "us/layer", "linprog us", "ratio"]
    print(table([*header, "max/mean equal", "max/mean balanced"], split_rows))
    print(
        f"\nexact per-step assignment (balanced_assignment, ours), one thread: median of "
        f"{args.split_steps} steps of the thread's CPU time, per layer; one call per layer (as an "
        "engine calls it after the all-gather) and one call for all layers; previous: the generic "
        "min-cost flow it replaced, one call per layer; tokens served on their own rank / their "
        "node / another node"
    )
    print(
        table(
            ["EP/slots", "nodes", "us/layer", "one call", "previous us", "ratio", "own/node/other"],
            [
                [
                    f"EP{r['ep_size']}/{r['num_physical_experts']}",
                    str(r["num_nodes"]),
                    f"{r['us_per_layer']:.1f}",
                    f"{r['us_per_layer_one_call']:.1f}",
                    f"{r['previous_us_per_layer']:.0f}",
                    f"{r['ratio']:.1f}x",
                    f"{r['share_own_rank']:.3f}/{r['share_same_node']:.3f}/"
                    f"{r['share_other_node']:.3f}",
                ]
                for r in assignment_timing
            ],
        )
    )
    print(
        "\nSGLang lp (reference model: float32, 5 affine-scaling iterations, 0.5 fallback; "
        "expected rank loads)\nvs the exact split, same plans and counts, "
        f"{args.lp_steps} steps x {args.lp_layers} layers"
    )
    print(
        table(
            ["EP/slots", "solves", "lp max/mean", "lp fallbacks", "lp ms (CPU)", "exact max/mean"],
            [
                [
                    f"EP{r['ep_size']}/{r['num_physical_experts']}",
                    str(r["solves"]),
                    f"{r['sglang_lp_max_over_mean']:.3f}",
                    str(r["sglang_lp_fallbacks"]),
                    f"{r['sglang_lp_ms']:.1f}",
                    f"{r['balanced_max_over_mean']:.3f}",
                ]
                for r in lp_rows
            ],
        )
    )
    print(
        "\nDeepSeek LPLB's test inputs (its topologies; loads N(1, 0.3) x 4096 per expert), "
        f"{args.lplb_draws} draws each: per-step max/mean"
    )
    print(
        table(
            ["case", "LPLB bound", "exact mean", "exact worst", "under bound", "affine 5-iter"],
            [
                [
                    r["case"],
                    f"{r['bound']:.2f}",
                    f"{r['balanced_max_over_mean']:.3f}",
                    f"{r['balanced_worst']:.3f}",
                    f"{r['balanced_under_bound']}/{r['draws']}",
                    f"{r['affine_scaling_max_over_mean']:.3f}",
                ]
                for r in lplb_rows
            ],
        )
    )
    for problem in problems:
        print(f"PROBLEM: {problem}")
    print(
        f"\n{seconds:.1f} s (traffic, plans, dispatch, timing, the exact split and assignment, "
        "SGLang lp, LPLB)"
    )
    if args.json is not None:
        write_json(
            args.json,
            {
                "benchmark": "dispatch",
                "num_layers": args.layers,
                "num_steps": args.steps,
                "skew": args.skew,
                "seed": args.seed,
                "results": results,
                "best": best,
                "table_timing": timing,
                "balanced_split_timing": split_timing,
                "balanced_assignment_timing": assignment_timing,
                "sglang_lp": lp_rows,
                "lplb": lplb_rows,
                "problems": problems,
                "load_average_before": load_avg,
                "versions": versions,
                "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
            },
        )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
