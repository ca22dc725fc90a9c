"""``moelb rebalance DUMP -o placement.json``: an expert distribution dump planned into SGLang's
placement JSON for ``--init-expert-location`` (the model's dense layers added when the dump holds
its MoE layers only), with a summary of the balancedness before and after, the bound, and what was
traded against a previous placement. ``--format`` writes SGLang's ``logical_count`` file,
TensorRT-LLM's load balancer YAML or moelb's own JSON instead (``moelb.engine_files``). DESIGN
sections 4 (EPLB) and 7 (files, CLI, the main job); ``reference/integrations.md``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .._core import ExpertLocation
from ..balancedness import balancedness as layer_mean_balancedness
from ..dispatch import expected_rank_loads
from ..engine_files import save_logical_count, save_moelb_placement, save_trtllm_load_balancer
from ..eplb import Plan, PlanStats, evaluate_placement, rebalance
from ..io import PLACEMENT_KEY, load_placement, save_placement
from ..simulate import MODEL_PRESETS
from .common import CliError, load_dump
from .output import fixed, print_json, table

__all__ = ["REBALANCE_FORMATS", "rebalance_command"]

#: ``--format``: the file ``-o`` receives.
REBALANCE_FORMATS = ("sglang", "sglang-logical-count", "trtllm", "json")


def rebalance_command(args: argparse.Namespace) -> int:
    _check_output_name(args.output, args.format)
    if args.format == "sglang-logical-count" and args.previous is not None:
        raise CliError(
            "--previous does not apply to --format sglang-logical-count: SGLang plans a "
            "logical_count file at start-up, with no placement in service"
        )
    counts = load_dump(args.dump, args.num_logical_experts)
    num_groups = _num_groups(args, counts.shape[1], counts.shape[2])
    counts, first_moe_layer = _decoder_layers(args, counts)
    _, num_layers, num_experts = counts.shape
    load = counts.sum(axis=0, dtype=np.float64)
    previous = None
    if args.previous is not None:
        previous = load_placement(args.previous, args.ep_size, args.num_nodes, num_experts)
    # step_peak and the balanced target read the passes (balanced: up to 32 of them, evenly spaced).
    planned = counts if args.objective == "step_peak" or args.dispatch == "balanced" else load
    plan = _plan(args, planned, num_groups, previous)
    output = Path(args.output)
    trivial = ExpertLocation.trivial(
        num_layers, num_experts, args.num_physical_experts, args.ep_size, args.num_nodes
    )
    baseline = previous if previous is not None else trivial
    before = evaluate_placement(planned, baseline)
    summary = _summary(args, counts, load, num_groups, output, baseline, before, plan)
    summary["written"] = _write(args, output, plan, planned, num_groups, summary, first_moe_layer)
    if args.json:
        print_json(summary)
        return 0
    _print_summary(summary)
    return 0


def _check_output_name(output: str, file_format: str) -> None:
    suffix = Path(output).suffix
    if file_format == "trtllm":
        if suffix.lower() not in (".yaml", ".yml"):
            raise CliError(f"-o {output}: --format trtllm writes YAML; give a .yaml or .yml name")
    elif file_format == "json":
        if suffix.lower() != ".json":
            raise CliError(f"-o {output}: --format json writes JSON; give a .json name")
    elif suffix != ".json":  # SGLang tests str.endswith(".json"): case-sensitive
        raise CliError(
            f"-o {output}: SGLang reads --init-expert-location as a file only when the name "
            "ends in .json or .pt, in lower case (anything else is parsed as inline JSON); moelb "
            "writes JSON, so give a name ending in .json"
        )


def _write(
    args: argparse.Namespace,
    output: Path,
    plan: Plan,
    planned: np.ndarray,
    num_groups: int | None,
    summary: dict[str, Any],
    first_moe_layer: int,
) -> str:
    """Writes ``output`` in ``--format`` (atomically); returns what it holds, for the report.
    ``planned``: the counts the plan was made from ([L, E] summed, or [T, L, E]), a row per
    decoder layer from ``first_moe_layer`` on holding MoE layers."""
    location = plan.location
    num_layers, slots = location.num_layers, location.num_physical_experts
    if args.format == "sglang":
        save_placement(location, output)
        return f"[{num_layers}, {slots}] {PLACEMENT_KEY}; SGLang: --init-expert-location {output}"
    if args.format == "sglang-logical-count":
        counts = np.rint(planned).astype(np.int64) if planned.ndim == 2 else planned
        save_logical_count(counts, output)
        shape = ", ".join(str(n) for n in counts.shape)
        return (
            f"logical_count [{shape}]; SGLang: --init-expert-location {output} plans it at "
            "start-up with --eplb-algorithm (auto: DeepSeek's; the plan above: --eplb-algorithm "
            "moelb under python -m moelb.integrations.sglang_launch)"
        )
    if args.format == "trtllm":
        layers = list(range(first_moe_layer, num_layers))
        save_trtllm_load_balancer(location, output, layers)
        return (
            f"TensorRT-LLM load balancer, num_slots {slots}, initial_global_assignments for "
            f"{len(layers)} layers ({layers[0]}..{layers[-1]}); TensorRT-LLM: moe_config: "
            f"load_balancer: {output}"
        )
    save_moelb_placement(plan, output, num_groups, extra={"summary": summary})
    return f"moelb placement JSON ([{num_layers}, {slots}] map, topology, statistics)"


def _num_groups(args: argparse.Namespace, num_layers: int, num_experts: int) -> int | None:
    """The expert groups to plan with: --num-groups, or the --model preset's; a missing value is
    an error (without groups the planner would silently switch to the global policy)."""
    if args.model is not None:
        preset = MODEL_PRESETS[args.model]
        layers = {preset.num_hidden_layers, preset.num_moe_layers}
        if num_experts != preset.num_experts or num_layers not in layers:
            raise CliError(
                f"--model {args.model} has {preset.num_experts} experts in "
                f"{preset.num_hidden_layers} layers ({preset.num_moe_layers} MoE) but the dump "
                f"holds {num_layers} layers x {num_experts} experts"
            )
        if args.num_groups is not None and args.num_groups != (preset.num_groups or 0):
            raise CliError(
                f"--num-groups {args.num_groups} contradicts --model {args.model} "
                f"({preset.num_groups} groups); give one of them"
            )
        return preset.num_groups
    if args.num_groups is None:
        raise CliError(
            "--num-groups is required (or --model): without expert groups the planner uses the "
            "global policy instead of the node-local / hierarchical one (DeepSeek-V3: "
            "--num-groups 8 or --model deepseek-v3; --num-groups 0 for a model without groups)"
        )
    return args.num_groups or None


def _decoder_layers(args: argparse.Namespace, counts: np.ndarray) -> tuple[np.ndarray, int]:
    """``counts`` [T, L, E] with a row per decoder layer, as the engines' files index layers
    (SGLang's map has a row per decoder layer, dense ones included; TensorRT-LLM keys its MoE
    layers by decoder-layer index), and the first row that may hold an MoE layer (TensorRT-LLM's
    file lists the rows from there on). A dump holding the MoE layers only gets the leading dense
    layers (no load) that --model or --dense-layers names. Without either, an engine file from a
    dump whose layer count is a known model's MoE layers but not its decoder layers is refused:
    written as is, every row would be off by the dense layers."""
    num_layers, num_experts = counts.shape[1], counts.shape[2]
    dense = args.dense_layers
    if args.model is not None:
        preset = MODEL_PRESETS[args.model]
        missing = preset.num_hidden_layers - num_layers  # 0, or the dense layers (_num_groups)
        if dense is not None and dense != missing:
            raise CliError(
                f"--dense-layers {dense} contradicts --model {args.model}: the dump holds "
                f"{num_layers} of its {preset.num_hidden_layers} decoder layers, so "
                f"{missing} leading dense layers are missing; give one of them"
            )
        return _with_dense_layers(counts, missing, args.model), preset.first_moe_layer
    if dense is not None:
        return _with_dense_layers(counts, dense, None), dense
    if args.format != "json":
        for name, preset in MODEL_PRESETS.items():
            if (
                preset.first_moe_layer > 0
                and num_layers == preset.num_moe_layers
                and num_experts == preset.num_experts
            ):
                raise CliError(
                    f"--format {args.format}: the dump holds {num_layers} layers x "
                    f"{num_experts} experts, as many as the MoE layers of {name} "
                    f"({preset.num_hidden_layers} decoder layers, the first "
                    f"{preset.first_moe_layer} dense), but the engine's file needs a row per "
                    f"decoder layer: pass --model {name} (or --dense-layers "
                    f"{preset.first_moe_layer}) if these are its MoE layers, or --dense-layers 0 "
                    "if the rows already are decoder layers"
                )
    return counts, 0


def _with_dense_layers(counts: np.ndarray, dense: int, model: str | None) -> np.ndarray:
    """``counts`` [T, L, E] with ``dense`` leading layers of no load prepended."""
    if dense == 0:
        return counts
    num_passes, num_layers, num_experts = counts.shape
    zeros = np.zeros((num_passes, dense, num_experts), counts.dtype)
    of = f" of {model}" if model is not None else ""
    print(
        f"note: the dump holds {num_layers} MoE layers{of}; the placement gets {dense} leading "
        f"dense layers (no load), {num_layers + dense} rows as the engines read it",
        file=sys.stderr,
    )
    return np.concatenate([zeros, counts], axis=1)


def _plan(
    args: argparse.Namespace,
    planned: np.ndarray,
    num_groups: int | None,
    previous: ExpertLocation | None,
) -> Plan:
    """Plans ``planned`` (the summed [L, E] counts, or the per-pass ones for step_peak and the
    balanced target) with the
    flags' topology and algorithm."""
    return rebalance(
        planned,
        args.num_physical_experts,
        num_groups,
        args.num_nodes,
        args.ep_size,
        algorithm=args.algorithm,
        previous=previous,
        locality=args.locality,
        move_cost=args.move_cost,
        max_moves=args.max_moves,
        expert_bytes=args.expert_bytes,
        objective=args.objective,
        dispatch=args.dispatch,
    )


def _summary(
    args: argparse.Namespace,
    counts: np.ndarray,
    load: np.ndarray,
    num_groups: int | None,
    output: Path,
    baseline: ExpertLocation,
    before: PlanStats,
    plan: Plan,
) -> dict[str, Any]:
    """What ``--json`` prints (and the text report shows): the dump, the topology, and the
    baseline's and the plan's balancedness, planned and under SGLang's static dispatch.
    ``counts`` [T, L, E]: the dump's (dense layers added), ``load`` [L, E]: their sum."""
    num_passes, num_layers, num_experts = counts.shape
    has_previous = args.previous is not None
    after = plan.stats
    active = load.sum(axis=1) > 0
    return {
        "dump": args.dump,
        "output": str(output),
        "format": args.format,
        "num_passes": int(num_passes),
        "num_layers": int(num_layers),
        "num_layers_with_counts": int(active.sum()),
        "num_logical_experts": int(num_experts),
        "num_physical_experts": args.num_physical_experts,
        "ep_size": args.ep_size,
        "num_nodes": args.num_nodes,
        "model": args.model,
        "num_groups": num_groups,
        # The dump's counts summed: one per (token, routed expert) pick, over passes and layers.
        "routed_picks": int(load.sum()),
        "algorithm": after.algorithm,
        "notes": after.notes,
        "baseline": "previous" if has_previous else "trivial",
        # SGLang's balancedness (moelb.balancedness): over all layers, dense ones counting 1.0;
        # active_*: over the layers with counts only.
        "balancedness_before": before.balancedness,
        "balancedness_after": after.balancedness,
        "active_balancedness_before": before.active_balancedness,
        "active_balancedness_after": after.active_balancedness,
        "lower_bound_balancedness": layer_mean_balancedness(
            after.mean_rank_load, after.lower_bound
        ),
        "active_lower_bound_balancedness": _or_none(
            layer_mean_balancedness(after.mean_rank_load, after.lower_bound, layers="active")
        ),
        "mean_gap": _active_mean(after.gap, active),
        "max_gap": float(after.max_gap),
        "move_cost": args.move_cost,
        # What was traded against the previous placement: slots (bytes) moved for balancedness.
        "moved_experts": after.moved_experts if has_previous else None,
        "moved_bytes": after.moved_bytes if has_previous else None,
        "balancedness_gained": after.balancedness - before.balancedness,
        "layers_kept_previous": int(after.layer_kept_previous.sum()) if has_previous else None,
        "plan_seconds": after.wall_time_seconds,
        "objective": args.objective,
        # With objective step_peak: SGLang's balancedness of the passes' mean GPU loads summed
        # over their max GPU loads summed (per-pass balancedness, each pass weighted by its max
        # load), over all layers.
        "step_balancedness_before": before.step_balancedness,
        "step_balancedness_after": after.step_balancedness,
        # What SGLang's default dispatch (its static table on the --init-expert-location path)
        # realises in expectation, each expert's tokens coming evenly from all ranks: the
        # balancedness above assumes an equal split over replicas, which SGLang does not do.
        "sglang_static_balancedness_before": _expected_balancedness(load, baseline),
        "sglang_static_balancedness_after": _expected_balancedness(load, plan.location),
        # The dispatch the plan targets, and per layer with counts the largest over the mean GPU
        # load (averaged over those layers): under an equal split, and as that dispatch realises
        # it (None under equal_split).
        "dispatch": after.dispatch,
        "max_over_mean_after": _max_over_mean(after.max_rank_load, after.mean_rank_load, active),
        "realised_max_over_mean_after": None
        if after.realised_max_rank_load is None
        else _max_over_mean(after.realised_max_rank_load, after.mean_rank_load, active),
    }


def _print_summary(summary: dict[str, Any]) -> None:
    """The text report of a rebalance: the dump, the balancedness table, notes, the trade
    against a previous placement, and the file written."""
    print(
        f"{summary['dump']}: {summary['num_passes']:,} passes x {summary['num_layers']} layers "
        f"({summary['num_layers_with_counts']} with counts) x {summary['num_logical_experts']} "
        f"experts, {summary['routed_picks']:,} routed (token, expert) picks (tokens x top-k, "
        "summed over layers)"
    )
    if summary["model"] is not None:
        print(f"model {summary['model']}: {summary['num_groups']} expert groups")
    print(_balancedness_table(summary))
    print(
        "planned: each expert's load split equally over its replicas (what the planner "
        "optimises); under sglang_static: what SGLang's default dispatch (its static table for "
        "--init-expert-location) realises in expectation, tokens coming evenly from all ranks"
    )
    if summary["realised_max_over_mean_after"] is not None:
        print(
            f"planned for dispatch {summary['dispatch']}: per layer max/mean GPU load "
            f"{summary['realised_max_over_mean_after']:.4f} as it realises it, "
            f"{summary['max_over_mean_after']:.4f} under an equal split (mean over the layers "
            "with counts)"
        )
    if summary["objective"] == "step_peak":
        print(
            f"per-pass balancedness (load-weighted): {summary['baseline']} "
            f"{fixed(summary['step_balancedness_before'])}, {summary['algorithm']} "
            f"{fixed(summary['step_balancedness_after'])}"
        )
    if summary["notes"]:
        print(f"notes: {summary['notes']}")
    if summary["baseline"] == "previous":
        print(_trade_line(summary))
    print(f"planned in {summary['plan_seconds'] * 1e3:.1f} ms")
    print(f"wrote {summary['output']} ({summary['written']})")


def _balancedness_table(summary: dict[str, Any]) -> str:
    """Baseline, plan and bound: SGLang's balancedness over all layers and over the layers with
    counts, under sglang_static, and the gap to the bound."""
    rows = [
        [
            summary["baseline"],
            fixed(summary["balancedness_before"]),
            fixed(summary["active_balancedness_before"]),
            fixed(summary["sglang_static_balancedness_before"]),
            "-",
        ],
        [
            summary["algorithm"],
            fixed(summary["balancedness_after"]),
            fixed(summary["active_balancedness_after"]),
            fixed(summary["sglang_static_balancedness_after"]),
            fixed(summary["mean_gap"] * 100, 2),
        ],
        [
            "lower bound",
            fixed(summary["lower_bound_balancedness"]),
            fixed(summary["active_lower_bound_balancedness"]),
            "-",
            "0.00",
        ],
    ]
    headers = [
        "placement",
        f"planned (SGLang balancedness, all {summary['num_layers']} layers)",
        f"{summary['num_layers_with_counts']} layers with counts",
        "under sglang_static",
        "gap %",
    ]
    return table(headers, rows)


def _trade_line(summary: dict[str, Any]) -> str:
    """What re-planning from the previous placement traded: slots (bytes) rewritten for
    balancedness, and the layers that kept their placement."""
    slots = summary["num_layers"] * summary["num_physical_experts"]
    line = f"traded: {summary['moved_experts']:,} of {slots:,} expert slots rewritten"
    if summary["moved_bytes"] is not None:
        line += f" ({summary['moved_bytes'] / 1e9:.2f} GB)"
    line += (
        f" for balancedness {summary['balancedness_gained']:+.4f} "
        f"({summary['balancedness_before']:.4f} -> {summary['balancedness_after']:.4f})"
    )
    kept = summary["layers_kept_previous"]
    if kept:
        line += (
            f"; {kept} layer(s) kept their placement (gain below --move-cost "
            f"{summary['move_cost']:g} per slot rewritten)"
        )
    return line


def _expected_balancedness(load: np.ndarray, location: ExpertLocation) -> float:
    """SGLang's balancedness, over all layers, of the per-GPU load SGLang's static table
    realises in expectation (``moelb.expected_rank_loads``)."""
    g = expected_rank_loads(load, location, "sglang_static")
    return float(layer_mean_balancedness(g.mean(axis=1), g.max(axis=1)))


def _max_over_mean(max_load: np.ndarray, mean_load: np.ndarray, active: np.ndarray) -> float:
    """The mean over the ``active`` layers of their largest over their mean GPU load."""
    if not active.any():
        return 1.0
    return float((max_load[active] / mean_load[active]).mean())


def _or_none(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def _active_mean(values: np.ndarray, active: np.ndarray) -> float:
    return float(values[active].mean()) if active.any() else 0.0
