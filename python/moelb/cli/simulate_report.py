"""The report of ``moelb demo`` / ``moelb simulate``: the header that says what was simulated, the
planning table (one row per placement, then the bound), the table of what each dispatch model
realises at token level, the best placement in one line, the per-layer table and the legend.
DESIGN section 7 (what the simulator reports; results print as a table)."""

from __future__ import annotations

import numpy as np

from .. import __version__
from ..simulate import MODEL_PRESETS, SimulationResult
from ..simulation.timing import DECODE_TOKENS_PER_GPU
from .output import fixed, gigabytes, table

__all__ = [
    "LEGEND",
    "TIME_LEGEND",
    "best_placement_line",
    "describe",
    "layer_table",
    "realised_table",
    "simulation_table",
    "time_header",
    "time_table",
    "timed_row_line",
]


def simulation_table(result: SimulationResult) -> str:
    """The planning table: one row per placement (balancedness under the equal split every
    planner assumes), then the bound."""
    headers = [
        "placement",
        "ran",
        "in-window",
        "planned",
        "moved/rebal",
        "GB/rebal",
        "plan ms",
    ]
    rows = []
    for name, a in result.algorithms.items():
        rows.append(
            [
                name,
                a.ran,
                fixed(a.in_window),
                fixed(a.predictive),
                f"{np.mean(a.moved_experts):,.0f}" if a.moved_experts else "-",
                gigabytes(a.moved_bytes),
                f"{np.mean(a.plan_seconds) * 1e3:.1f}" if a.plan_seconds else "-",
            ]
        )
    rows.append(
        [
            "lower bound",
            "any placement",
            fixed(result.bound_in_window),
            fixed(result.bound_predictive),
            *["-"] * 3,
        ]
    )
    return table(headers, rows)


def realised_table(result: SimulationResult) -> str | None:
    """The realised table: per placement, the planned balancedness beside what each dispatch
    model realises at token level: routed experts only, and with the shared expert placed by
    Waterfill (by the joint flow under ``balanced_joint``: "+joint"; the shared expert on each
    token's own rank is in the JSON, ``shared_local``). None for replayed counts (no tokens)."""
    dispatch = result.config.dispatch
    first = next(iter(result.algorithms.values()))
    if not first.realised:
        return None
    headers = ["placement", "planned"]
    for name in dispatch:
        headers += [name, "+joint" if name == "balanced_joint" else "+WF"]
    rows = []
    for name, a in result.algorithms.items():
        row = [name, fixed(a.predictive)]
        for d in dispatch:
            r = a.realised[d]
            row += [fixed(r.routed), fixed(r.waterfill)]
        rows.append(row)
    return table(headers, rows)


def best_placement_line(result: SimulationResult) -> str | None:
    """One line: which placement serves best under the first (default) dispatch model."""
    dispatch = result.config.dispatch[0]
    scored = {n: a.realised[dispatch] for n, a in result.algorithms.items() if a.realised}
    if not scored:
        return None
    best = max(scored, key=lambda n: scored[n].routed)
    planned_best = max(result.algorithms, key=lambda n: result.algorithms[n].predictive)
    line = (
        f"Under {dispatch}, {best} serves best: realised {scored[best].routed:.3f} routed"
        + (
            f", {scored[best].waterfill:.3f} with Waterfill"
            if scored[best].waterfill is not None
            else ""
        )
        + f" (planned {result.algorithms[best].predictive:.3f})"
    )
    if planned_best != best:
        line += (
            f"; the best planned, {planned_best} "
            f"({result.algorithms[planned_best].predictive:.3f}), realises "
            f"{scored[planned_best].routed:.3f}"
        )
    return line + "."


def time_header(result: SimulationResult) -> str | None:
    """What the modelled times assume, in one line (None without time figures)."""
    t = result.time_model
    if t is None:
        return None
    per_gpu = t["tokens_per_gpu"]
    regime = "decode-like" if per_gpu <= DECODE_TOKENS_PER_GPU else "prefill-like"
    return (
        f"modelled routed-MoE time per step ({len(result.layer_ids)} MoE layers) on "
        f"{t['gpu_name']} ({t['gpu']}, {t['table']} table, measured {t['date']}): "
        f"{per_gpu:,.0f} tokens/GPU, {regime} (DeepEP {t['deepep_mode']}); memory "
        f"{t['memory_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s, NVLink "
        f"{t['nvlink_bytes_per_s'] / 1e9:.0f} GB/s, network {t['network_bytes_per_s'] / 1e9:.0f} "
        "GB/s per GPU and direction"
    )


def time_table(result: SimulationResult) -> str | None:
    """One row per placement x dispatch: the realised balancedness beside the modelled time of
    a step, the speed-up over the trivial placement under the same dispatch, and what the
    slowest GPUs of the layers spent it on (summed over the layers). None without time
    figures."""
    if result.time_model is None:
        return None
    headers = [
        "placement",
        "dispatch",
        "realised",
        "+WF",
        "ms/step",
        "x trivial",
        "weights",
        "GEMM",
        "comm",
        "fixed",
        "mean GPU",
    ]
    rows = []
    for name, a in result.algorithms.items():
        for d in result.config.dispatch:
            r = a.realised[d]
            t = r.time
            if t is None:
                continue
            rows.append(
                [
                    name,
                    d,
                    fixed(r.routed),
                    fixed(r.waterfill),
                    f"{t.seconds * 1e3:.2f}",
                    f"{t.speedup:.3f}",
                    *(
                        f"{v * 1e3:.2f}"
                        for v in (
                            t.slowest_weights_s,
                            t.slowest_gemm_s,
                            t.slowest_comm_s,
                            t.fixed_s,
                            t.mean_gpu_s,
                        )
                    ),
                ]
            )
    return table(headers, rows)


def timed_row_line(result: SimulationResult) -> str | None:
    """One row explained end to end: the fastest placement under the first dispatch model,
    beside the trivial one; None without time figures."""
    dispatch = result.config.dispatch[0]
    timed = {
        n: a.realised[dispatch].time
        for n, a in result.algorithms.items()
        if a.realised and a.realised[dispatch].time is not None
    }
    if not timed:
        return None
    best = min(timed, key=lambda n: timed[n].seconds)  # type: ignore[union-attr]
    t = timed[best]
    assert t is not None
    share = np.asarray(t.slowest_share)
    top = int(share.argmax())
    line = (
        f"Under {dispatch}, {best} takes {t.seconds * 1e3:.2f} ms per step, {t.speedup:.3f}x "
        f"the trivial placement: per layer its slowest GPU (GPU {top} in {share[top]:.0%} of "
        f"the layers and steps) spends weights {t.slowest_weights_s * 1e3:.2f} + GEMM "
        f"{t.slowest_gemm_s * 1e3:.2f} + comm {t.slowest_comm_s * 1e3:.2f} ms over the step, "
        f"plus {t.fixed_s * 1e3:.2f} ms fixed; the mean GPU would take "
        f"{t.mean_gpu_s * 1e3:.2f} ms. Its slowest layer: {t.worst}."
    )
    return line


def layer_table(result: SimulationResult) -> str:
    """Predictive balancedness per simulated layer."""
    names = list(result.algorithms)
    rows = [
        [
            str(layer),
            *(fixed(result.algorithms[n].layer_predictive[i]) for n in names),
            fixed(result.layer_bound_predictive[i]),
        ]
        for i, layer in enumerate(result.layer_ids)
    ]
    return table(["layer", *names, "bound"], rows)


def describe(result: SimulationResult) -> str:
    """The report's header: the model and cluster, the traffic, the steps and windows."""
    c = result.config
    layers = len(result.layer_ids)
    if c.trace is None:
        traffic = (
            f"synthetic traffic: {c.num_tokens:,} tokens/step, Zipf skew {c.skew}, "
            f"drift {c.drift}/step"
            + (f", bursts {c.bursts}" if c.bursts > 0 else "")
            + f", seed {c.seed}"
        )
    else:
        traffic = f"replayed counts from {c.trace}"
    if c.trace is not None:  # counts, not tokens: nothing realised at token level
        token_level = "no token-level figures (a replay has counts, not tokens)"
    else:
        token_level = f"Waterfill {'off' if c.waterfill is None else c.waterfill}"
    return (
        f"moelb {__version__} simulation: {c.model}, {layers} MoE layers x "
        f"{MODEL_PRESETS[c.model].num_experts} experts, {result.num_physical_experts} slots on "
        f"{c.ep_size} GPUs in {c.num_nodes} nodes\n"
        f"{traffic}; {result.num_steps} steps, rebalance every {c.rebalance_period} "
        f"({result.num_windows} windows); {token_level}"
    )


LEGEND = """\
balancedness = SGLang's rate (mean + 1e-5) / (max + 1e-5) of the per-GPU loads per step and
layer, averaged over the steps and the simulated MoE layers (1.0 = perfectly even; SGLang's
logged value would also count the model's dense layers as 1.0).
in-window: the plan scored on the traffic it was planned from; planned: scored on the next
window (the traffic it serves), both under the equal split of every expert over its replicas
that planners assume. Realised: the next window's tokens of every source rank dispatched as the
engine does (sglang_static: SGLang's default with DeepEP for a placement loaded with
--init-expert-location; sglang_static_runtime: its table after its own runtime rebalance;
sglang_dynamic: a random replica after SGLang's per-rank collapse; moelb_static: our coordinated
table; the others: moelb.dispatch), routed experts only; +WF: plus the shared expert placed by
Waterfill. Ours, per step: balanced (every rank's counts all-gathered, the exact split at the
optimal largest GPU load), balanced_prob (per-replica fractions of the all-reduced counts, seeded
picks), balanced_offline (fractions of the window the plan was made from, no collective),
balanced_joint (routed and shared expert in one flow; +joint: its routed + shared load, in place
of Waterfill). sglang_lp: a reference model of SGLang's --ep-dispatch-algorithm lp (its LP, 5
float32 iterations, 0.5 fallback), reproduced for measurement only.
moved/rebal: expert slots rewritten per rebalance (GB: their FP8 weights)."""

TIME_LEGEND = """\
modelled time (moelb.step_time): per MoE layer and GPU, the weights of the experts with tokens
streamed from memory + the measured GEMM time beyond that per expert + dispatch and combine
bytes over NVLink (inside a node) and the network (across nodes); a layer takes its slowest GPU
plus a measured fixed term, a step the sum over the layers. Routed experts only (no shared
expert, no attention, no overlap of communication with compute). realised / +WF: the
balancedness columns above; x trivial: the trivial placement's time under the same dispatch over
this row's; weights / GEMM / comm: the slowest GPU's terms summed over the layers; mean GPU: the
average GPU's time summed over the layers (an even load's time, without the fixed terms)."""
