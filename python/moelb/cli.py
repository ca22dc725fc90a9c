"""The ``moelb`` command line (also ``python -m moelb``): what EPLB and Waterfill buy on a cluster.

  moelb demo                     the main job: a DeepSeek-V3-like model on 32 GPUs in 4 nodes with
                                 32 redundant experts and skewed, drifting traffic; prints the
                                 comparison table, writes a placement JSON and PNG plots
  moelb simulate [flags]         the same with every knob as a flag, or replaying a recorded dump
  moelb rebalance DUMP -o FILE   an SGLang expert distribution dump -> a placement JSON for
                                 SGLang's --init-expert-location
  moelb inspect FILE             per-layer statistics of a placement or a dump

Errors are one line on stderr and a non-zero exit status (2: bad flags or input, 1: other).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

import numpy as np

from . import __version__
from ._core import Error, ExpertLocation, InvalidArgumentError, set_num_threads
from .balancedness import balancedness as layer_mean_balancedness
from .balancedness import utilization_rate
from .dispatch import DISPATCH_ALGORITHMS, expected_gpu_loads
from .eplb import (
    ALGORITHMS,
    DEFAULT_MOVE_COST,
    OBJECTIVES,
    evaluate_placement,
    rebalance,
)
from .io import (
    PLACEMENT_KEY,
    atomic_write_bytes,
    load_expert_distribution,
    load_placement,
    save_placement,
)
from .simulate import MODEL_PRESETS, SimulationConfig, SimulationResult, simulate

__all__ = ["build_parser", "main"]

#: The demo: DeepSeek-V3 (58 MoE layers x 256 experts), 288 slots on 32 GPUs in 4 nodes.
DEMO_CONFIG = SimulationConfig(
    model="deepseek-v3",
    ep_size=32,
    num_nodes=4,
    num_redundant_experts=32,
    num_tokens=4096,
    num_steps=24,
    rebalance_period=6,
    skew=0.6,
    drift=0.02,
    algorithms=("deepseek", "moelb", "deepseek_global", "moelb:none", "moelb:none:step_peak"),
    waterfill="dynamic",
    dispatch=("sglang_static", "sglang_static_runtime", "sglang_dynamic", "moelb_static"),
)


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


# ------------------------------------------------------------------------------------------------
# Output helpers.


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([fmt(headers), "  ".join("-" * w for w in widths), *map(fmt, rows)])


class ProgressBar:
    """A one-line progress bar on a terminal (stderr); silent when the stream is not a terminal
    unless forced."""

    def __init__(self, label: str, stream: TextIO = sys.stderr, enabled: bool | None = None):
        self.label, self.stream = label, stream
        self.enabled = stream.isatty() if enabled is None else enabled
        self.start = time.perf_counter()
        self.last_draw = -1.0
        self.width = 30

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if done < total and now - self.last_draw < 0.1:
            return
        self.last_draw = now
        fraction = done / total if total else 1.0
        filled = int(self.width * fraction)
        bar = "#" * filled + "-" * (self.width - filled)
        elapsed = now - self.start
        eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
        self.stream.write(
            f"\r{self.label} [{bar}] {done}/{total} {elapsed:5.1f}s (eta {eta:4.1f}s)"
        )
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()


def _f(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _gb(values: Sequence[int]) -> str:
    return f"{np.mean(values) / 1e9:.1f}" if values else "-"


def _print_json(payload: Any) -> None:
    json.dump(payload, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


# ------------------------------------------------------------------------------------------------
# demo / simulate.


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
                _f(a.in_window),
                _f(a.predictive),
                f"{np.mean(a.moved_experts):,.0f}" if a.moved_experts else "-",
                _gb(a.moved_bytes),
                f"{np.mean(a.plan_seconds) * 1e3:.1f}" if a.plan_seconds else "-",
            ]
        )
    rows.append(
        [
            "lower bound",
            "any placement",
            _f(result.bound_in_window),
            _f(result.bound_predictive),
            *["-"] * 3,
        ]
    )
    return table(headers, rows)


def realised_table(result: SimulationResult) -> str | None:
    """The realised table: per placement, the planned balancedness beside what each dispatch
    model realises at token level: routed experts only, and with the shared expert placed by
    Waterfill (the shared expert on each token's own rank is in the JSON, ``shared_local``).
    None for replayed counts (no tokens)."""
    dispatch = result.config.dispatch
    first = next(iter(result.algorithms.values()))
    if not first.realised:
        return None
    headers = ["placement", "planned"]
    for name in dispatch:
        headers += [name, "+WF"]
    rows = []
    for name, a in result.algorithms.items():
        row = [name, _f(a.predictive)]
        for d in dispatch:
            r = a.realised[d]
            row += [_f(r.routed), _f(r.waterfill)]
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


def layer_table(result: SimulationResult) -> str:
    """Predictive balancedness per simulated layer."""
    names = list(result.algorithms)
    rows = [
        [
            str(layer),
            *(_f(result.algorithms[n].layer_predictive[i]) for n in names),
            _f(result.layer_bound_predictive[i]),
        ]
        for i, layer in enumerate(result.layer_ids)
    ]
    return table(["layer", *names, "bound"], rows)


def _describe(result: SimulationResult) -> str:
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
    waterfill = "off" if c.waterfill is None else c.waterfill
    return (
        f"moelb {__version__} simulation: {c.model}, {layers} MoE layers x "
        f"{MODEL_PRESETS[c.model].num_experts} experts, {result.num_physical_experts} slots on "
        f"{c.ep_size} GPUs in {c.num_nodes} nodes\n"
        f"{traffic}; {result.num_steps} steps, rebalance every {c.rebalance_period} "
        f"({result.num_windows} windows); Waterfill {waterfill}"
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
Waterfill. moved/rebal: expert slots rewritten per rebalance (GB: their FP8 weights)."""


def _run_simulation(config: SimulationConfig, args: argparse.Namespace) -> int:
    if args.threads is not None:
        set_num_threads(args.threads)
    progress = ProgressBar("simulating", enabled=args.progress)
    result = simulate(config, progress=progress)
    out_dir: Path | None = args.output_dir
    written: list[str] = []
    notes: list[str] = []
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        focus = _focus(result)
        placement = out_dir / "placement.json"
        save_placement(result.algorithms[focus].placement, placement)
        written.append(str(placement))
        summary = out_dir / "simulation.json"
        _write_text(summary, json.dumps(result.to_dict(), indent=2) + "\n")
        written.append(str(summary))
        if args.plots:
            from .plots import PlotsUnavailable, plot_simulation

            try:
                written += [str(p) for p in plot_simulation(result, out_dir, focus)]
            except PlotsUnavailable as e:
                notes.append(f"plots skipped: {e}")
        else:
            notes.append("plots skipped: --no-plots")
    if args.json:
        payload = result.to_dict()
        payload["files"] = written
        payload["notes"] = result.notes + notes
        _print_json(payload)
        return 0
    print(_describe(result) + "\n")
    print(simulation_table(result))
    realised = realised_table(result)
    if realised is not None:
        print("\nrealised at token level (next window), per dispatch\n" + realised)
        best = best_placement_line(result)
        if best is not None:
            print("\n" + best)
    if args.per_layer:
        print("\npredictive balancedness per layer\n" + layer_table(result))
    print("\n" + LEGEND)
    for note in result.notes:
        print(f"note: {note}")
    print(f"\nsimulated in {result.timings['total']:.1f} s")
    if written:
        focus = _focus(result)
        print(f"wrote ({focus} placement for SGLang --init-expert-location):")
        for path in written:
            print(f"  {path}")
    for note in notes:
        print(note)
    return 0


def _focus(result: SimulationResult) -> str:
    """The placement to write: moelb's if simulated, else the first algorithm's."""
    names = [n for n in result.algorithms if n != "trivial"]
    return "moelb" if "moelb" in names else names[0]


def demo(args: argparse.Namespace) -> int:
    config = DEMO_CONFIG
    if args.quick:
        config = _replace(config, num_layers=6, num_tokens=1024, num_steps=8, rebalance_period=4)
    if args.seed is not None:
        config = _replace(config, seed=args.seed)
    return _run_simulation(config, args)


def _replace(config: SimulationConfig, **changes: Any) -> SimulationConfig:
    import dataclasses

    return dataclasses.replace(config, **changes)


#: simulate flags that shape synthetic traffic only: with --trace they would do nothing.
_SYNTHETIC_ONLY = ("num_tokens", "num_steps", "skew", "drift", "bursts", "num_layers")


def simulate_command(args: argparse.Namespace) -> int:
    if args.trace is not None and not Path(args.trace).exists():
        raise CliError(f"trace file {args.trace!r} does not exist")
    if args.trace is not None:
        defaults = SimulationConfig()
        for name in _SYNTHETIC_ONLY:
            if getattr(args, name) != getattr(defaults, name):
                flag = "--" + name.replace("_", "-")
                raise CliError(
                    f"{flag} shapes synthetic traffic; a --trace replay uses the dump's steps, "
                    "layers and counts as they are: drop it"
                )
    config = SimulationConfig(
        model=args.model,
        ep_size=args.ep_size,
        num_nodes=args.num_nodes,
        num_redundant_experts=args.num_redundant_experts,
        num_tokens=args.num_tokens,
        num_steps=args.num_steps,
        rebalance_period=args.rebalance_period,
        skew=args.skew,
        drift=args.drift,
        bursts=args.bursts,
        algorithms=tuple(args.algorithms),
        waterfill=None if args.waterfill == "off" else args.waterfill,
        dispatch=tuple(args.dispatch),
        trace=args.trace,
        trace_rotate=args.trace_rotate,
        num_layers=args.num_layers,
        expert_bytes=args.expert_bytes,
        seed=args.seed if args.seed is not None else 0,
    )
    return _run_simulation(config, args)


# ------------------------------------------------------------------------------------------------
# rebalance.


def _load_dump(path: str, num_logical_experts: int | None = None) -> np.ndarray:
    if not Path(path).exists():
        raise CliError(f"dump file {path!r} does not exist")
    dump = load_expert_distribution(path, num_logical_experts)
    counts = np.asarray(dump["logical_count"])
    if counts.shape[0] == 0:
        raise CliError(f"dump file {path!r} holds no forward passes")
    return counts


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


def rebalance_command(args: argparse.Namespace) -> int:
    if Path(args.output).suffix.lower() != ".json":
        raise CliError(
            f"-o {args.output}: SGLang reads --init-expert-location as a file only when the name "
            "ends in .json or .pt (anything else is parsed as inline JSON); moelb writes JSON, so "
            "give a .json name"
        )
    counts = _load_dump(args.dump, args.num_logical_experts)
    num_passes, num_layers, num_experts = counts.shape
    num_groups = _num_groups(args, num_layers, num_experts)
    if args.model is not None:
        preset = MODEL_PRESETS[args.model]
        if num_layers == preset.num_moe_layers != preset.num_hidden_layers:
            # SGLang's placement has a row per decoder layer, dense ones included.
            dense = np.zeros((num_passes, preset.first_moe_layer, num_experts), counts.dtype)
            counts = np.concatenate([dense, counts], axis=1)
            num_layers = preset.num_hidden_layers
            print(
                f"note: the dump holds the {preset.num_moe_layers} MoE layers of {args.model}; "
                f"the placement gets {preset.first_moe_layer} leading dense layers (no load), "
                f"{num_layers} rows as SGLang reads it",
                file=sys.stderr,
            )
    load = counts.sum(axis=0, dtype=np.float64)
    previous = None
    if args.previous is not None:
        previous = load_placement(args.previous, args.num_gpus, args.num_nodes, num_experts)
    step_peak = args.objective == "step_peak"
    plan = rebalance(
        counts if step_peak else load,
        args.num_physical_experts,
        num_groups,
        args.num_nodes,
        args.num_gpus,
        algorithm=args.algorithm,
        previous=previous,
        locality=args.locality,
        move_cost=args.move_cost,
        max_moves=args.max_moves,
        expert_bytes=args.expert_bytes,
        objective=args.objective,
    )
    output = Path(args.output)
    save_placement(plan.location, output)
    trivial = ExpertLocation.trivial(
        num_layers, num_experts, args.num_physical_experts, args.num_gpus, args.num_nodes
    )
    baseline = previous if previous is not None else trivial
    before = evaluate_placement(counts if step_peak else load, baseline)
    after = plan.stats
    active = load.sum(axis=1) > 0
    summary = {
        "dump": args.dump,
        "output": str(output),
        "num_passes": int(num_passes),
        "num_layers": int(num_layers),
        "num_layers_with_counts": int(active.sum()),
        "num_logical_experts": int(num_experts),
        "num_physical_experts": args.num_physical_experts,
        "num_gpus": args.num_gpus,
        "num_nodes": args.num_nodes,
        "model": args.model,
        "num_groups": num_groups,
        # The dump's counts summed: one per (token, routed expert) pick, over passes and layers.
        "routed_picks": int(load.sum()),
        "algorithm": after.algorithm,
        "notes": after.notes,
        "baseline": "previous" if previous is not None else "trivial",
        # SGLang's balancedness (moelb.balancedness): over all layers, dense ones counting 1.0;
        # active_*: over the layers with counts only.
        "balancedness_before": before.balancedness,
        "balancedness_after": after.balancedness,
        "active_balancedness_before": before.active_balancedness,
        "active_balancedness_after": after.active_balancedness,
        "lower_bound_balancedness": layer_mean_balancedness(after.mean_gpu_load, after.lower_bound),
        "active_lower_bound_balancedness": _or_none(
            layer_mean_balancedness(after.mean_gpu_load, after.lower_bound, layers="active")
        ),
        "mean_gap": _active_mean(after.gap, active),
        "max_gap": float(after.max_gap),
        "move_cost": args.move_cost,
        # What was traded against the previous placement: slots (bytes) moved for balancedness.
        "moved_experts": after.moved_experts if previous is not None else None,
        "moved_bytes": after.moved_bytes if previous is not None else None,
        "balancedness_gained": after.balancedness - before.balancedness,
        "layers_kept_previous": int(after.layer_kept_previous.sum())
        if previous is not None
        else None,
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
    }
    if args.json:
        _print_json(summary)
        return 0
    print(
        f"{args.dump}: {num_passes:,} passes x {num_layers} layers ({int(active.sum())} with "
        f"counts) x {num_experts} experts, {int(load.sum()):,} routed (token, expert) picks "
        "(tokens x top-k, summed over layers)"
    )
    if args.model is not None:
        print(f"model {args.model}: {num_groups} expert groups")
    rows = [
        [
            summary["baseline"],
            _f(before.balancedness),
            _f(before.active_balancedness),
            _f(summary["sglang_static_balancedness_before"]),
            "-",
        ],
        [
            after.algorithm,
            _f(after.balancedness),
            _f(after.active_balancedness),
            _f(summary["sglang_static_balancedness_after"]),
            _f(summary["mean_gap"] * 100, 2),
        ],
        [
            "lower bound",
            _f(summary["lower_bound_balancedness"]),
            _f(summary["active_lower_bound_balancedness"]),
            "-",
            "0.00",
        ],
    ]
    headers = [
        "placement",
        f"planned (SGLang balancedness, all {num_layers} layers)",
        f"{int(active.sum())} layers with counts",
        "under sglang_static",
        "gap %",
    ]
    print(table(headers, rows))
    print(
        "planned: each expert's load split equally over its replicas (what the planner "
        "optimises); under sglang_static: what SGLang's default dispatch (its static table for "
        "--init-expert-location) realises in expectation, tokens coming evenly from all ranks"
    )
    if step_peak:
        print(
            f"per-pass balancedness (load-weighted): {summary['baseline']} "
            f"{_f(summary['step_balancedness_before'])}, {after.algorithm} "
            f"{_f(summary['step_balancedness_after'])}"
        )
    if after.notes:
        print(f"notes: {after.notes}")
    if previous is not None:
        slots = num_layers * args.num_physical_experts
        moved = f"traded: {after.moved_experts:,} of {slots:,} expert slots rewritten"
        if after.moved_bytes is not None:
            moved += f" ({after.moved_bytes / 1e9:.2f} GB)"
        moved += (
            f" for balancedness {summary['balancedness_gained']:+.4f} "
            f"({before.balancedness:.4f} -> {after.balancedness:.4f})"
        )
        kept = summary["layers_kept_previous"]
        if kept:
            moved += (
                f"; {kept} layer(s) kept their placement (gain below --move-cost "
                f"{args.move_cost:g} per slot rewritten)"
            )
        print(moved)
    print(f"planned in {after.wall_time_seconds * 1e3:.1f} ms")
    print(
        f"wrote {output} ([{num_layers}, {args.num_physical_experts}] {PLACEMENT_KEY}); "
        f"SGLang: --init-expert-location {output}"
    )
    return 0


def _expected_balancedness(load: np.ndarray, location: ExpertLocation) -> float:
    """SGLang's balancedness, over all layers, of the per-GPU load SGLang's static table
    realises in expectation (``moelb.expected_gpu_loads``)."""
    g = expected_gpu_loads(load, location, "sglang_static")
    return float(layer_mean_balancedness(g.mean(axis=1), g.max(axis=1)))


def _or_none(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def _active_mean(values: np.ndarray, active: np.ndarray) -> float:
    return float(values[active].mean()) if active.any() else 0.0


# ------------------------------------------------------------------------------------------------
# inspect.


def _looks_like_placement(path: Path) -> bool:
    if path.suffix.lower() != ".json":
        return False
    with open(path, "rb") as f:
        head = f.read(4096)
    return f'"{PLACEMENT_KEY}"'.encode() in head  # dumps hold "last_physical_to_logical_map"


def inspect_command(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.exists():
        raise CliError(f"file {args.file!r} does not exist")
    if args.num_gpus is None:
        # Without GPUs there is no topology to give nodes or slots to: say so rather than
        # building one the user never asked for.
        for flag, value, default in (
            ("--num-nodes", args.num_nodes, 1),
            ("--num-physical-experts", args.num_physical_experts, None),
        ):
            if value != default:
                raise CliError(
                    f"{flag} {value} needs --num-gpus (the EP ranks that hold the slots)"
                )
    if path.is_file() and _looks_like_placement(path):
        return _inspect_placement(path, args)
    return _inspect_dump(path, args)


def _inspect_placement(path: Path, args: argparse.Namespace) -> int:
    location = load_placement(path, args.num_gpus or 1, args.num_nodes)
    phy2log = location.physical_to_logical
    count = location.logical_count
    L, P = phy2log.shape
    S = P // location.ep_size
    layers = []
    for layer in range(L):
        per_gpu = phy2log[layer].reshape(location.ep_size, S)
        duplicates = sum(S - len(np.unique(row)) for row in per_gpu)
        layers.append(
            {
                "layer": layer,
                "replicated_experts": int((count[layer] > 1).sum()),
                "max_replicas": int(count[layer].max()),
                "same_gpu_duplicates": int(duplicates) if args.num_gpus else None,
                "trivial": bool(np.array_equal(phy2log[layer], np.arange(P) % count.shape[1])),
            }
        )
    summary = {
        "kind": "placement",
        "file": str(path),
        "num_layers": L,
        "num_physical_experts": P,
        "num_logical_experts": location.num_logical_experts,
        "num_gpus": args.num_gpus,
        "trivial_layers": sum(x["trivial"] for x in layers),
        "layers": layers,
    }
    if args.json:
        _print_json(summary)
        return 0
    print(
        f"{path}: placement [{L} layers, {P} slots] of {location.num_logical_experts} experts; "
        f"{summary['trivial_layers']} layer(s) trivial"
    )
    headers = ["layer", "replicated experts", "max replicas", "trivial"]
    if args.num_gpus:
        headers.insert(3, f"same-GPU duplicates (G={args.num_gpus})")
    rows = []
    for x in layers:
        row = [str(x["layer"]), str(x["replicated_experts"]), str(x["max_replicas"])]
        if args.num_gpus:
            row.append(str(x["same_gpu_duplicates"]))
        rows.append([*row, "yes" if x["trivial"] else "no"])
    print(table(headers, rows))
    return 0


def _inspect_dump(path: Path, args: argparse.Namespace) -> int:
    counts = _load_dump(str(path))
    T, L, E = counts.shape
    load = counts.sum(axis=0, dtype=np.float64)
    totals = load.sum(axis=1)
    mean = totals / E
    hottest = load.max(axis=1)
    gpus = args.num_gpus
    slots = None
    trivial_bal = bound_bal = None
    trivial_stats = None
    if gpus:
        slots = args.num_physical_experts or E
        trivial = ExpertLocation.trivial(L, E, slots, gpus, args.num_nodes)
        trivial_stats = evaluate_placement(load, trivial)
        # SGLang's per-layer rate (moelb.utilization_rate) of the trivial placement and of the
        # lower bound.
        trivial_bal = trivial_stats.layer_balancedness
        bound_bal = utilization_rate(trivial_stats.mean_gpu_load, trivial_stats.lower_bound)
    layers = []
    for layer in range(L):
        layers.append(
            {
                "layer": layer,
                "routed_picks": int(totals[layer]),
                "hottest_expert": int(load[layer].argmax()),
                "hottest_over_mean": float(hottest[layer] / mean[layer]) if mean[layer] else None,
                "idle_experts": int((load[layer] == 0).sum()),
                "trivial_balancedness": None if trivial_bal is None else float(trivial_bal[layer]),
                "bound_balancedness": None if bound_bal is None else float(bound_bal[layer]),
            }
        )
    summary = {
        "kind": "dump",
        "file": str(path),
        "num_passes": T,
        "num_layers": L,
        "num_logical_experts": E,
        "num_gpus": gpus,
        "num_physical_experts": slots,
        # The dump's counts summed: one per (token, routed expert) pick, over passes and layers.
        "routed_picks": int(totals.sum()),
        "layers_with_counts": int((totals > 0).sum()),
        # SGLang's balancedness of the trivial placement (all layers, dense ones 1.0).
        "trivial_balancedness": None if trivial_stats is None else trivial_stats.balancedness,
        "layers": layers,
    }
    if args.json:
        _print_json(summary)
        return 0
    print(
        f"{path}: expert distribution dump, {T:,} passes x {L} layers "
        f"({summary['layers_with_counts']} with counts) x {E} experts, "
        f"{summary['routed_picks']:,} routed (token, expert) picks (tokens x top-k, summed over "
        "layers)"
    )
    headers = ["layer", "routed picks", "hottest expert", "hottest / mean", "idle experts"]
    if gpus:
        headers += [f"trivial bal. (G={gpus}, P={slots})", "bound bal."]
    rows = []
    for x in layers:
        row = [
            str(x["layer"]),
            f"{x['routed_picks']:,}",
            str(x["hottest_expert"]),
            _f(x["hottest_over_mean"], 2),
            str(x["idle_experts"]),
        ]
        if gpus:
            row += [_f(x["trivial_balancedness"]), _f(x["bound_balancedness"])]
        rows.append(row)
    print(table(headers, rows))
    if trivial_stats is not None:
        print(
            f"trivial placement: balancedness {_f(trivial_stats.balancedness)} (SGLang's, all {L} "
            f"layers), {_f(trivial_stats.active_balancedness)} over the "
            f"{summary['layers_with_counts']} layers with counts"
        )
    return 0


# ------------------------------------------------------------------------------------------------
# Parser.


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block): ``moelb simulate: error: ...``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}") from None
    if not (np.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _add_run_flags(p: argparse.ArgumentParser, default_dir: str | None) -> None:
    p.add_argument(
        "--output-dir",
        type=Path,
        default=None if default_dir is None else Path(default_dir),
        help="write placement.json, simulation.json and PNG plots here"
        + (f" (default: {default_dir})" if default_dir else " (default: write nothing)"),
    )
    p.add_argument("--no-plots", dest="plots", action="store_false", help="do not write PNG plots")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--per-layer", action="store_true", help="also print a per-layer table")
    p.add_argument("--threads", type=_positive_int, default=None, help="threads (default: all)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="moelb",
        description=__doc__.splitlines()[0],
        epilog="Run `moelb COMMAND --help` for a command's flags.",
    )
    parser.add_argument("--version", action="version", version=f"moelb {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser(
        "demo",
        help="simulate DeepSeek-V3 on 32 GPUs / 4 nodes with skewed, drifting traffic",
        description="The main job with defaults: "
        f"{DEMO_CONFIG.model}, {DEMO_CONFIG.ep_size} GPUs in {DEMO_CONFIG.num_nodes} nodes, "
        f"{DEMO_CONFIG.num_redundant_experts} redundant experts, {DEMO_CONFIG.num_steps} steps "
        f"of {DEMO_CONFIG.num_tokens} tokens, rebalance every {DEMO_CONFIG.rebalance_period}. "
        "Same as `moelb simulate` with those values.",
    )
    _add_run_flags(p, "moelb-demo")
    p.add_argument(
        "--quick", action="store_true", help="a smoke run: 6 layers, 8 steps of 1,024 tokens"
    )
    p.set_defaults(func=demo)

    p = sub.add_parser(
        "simulate",
        help="simulate a cluster with every knob as a flag (or replay a recorded dump)",
        description="Synthetic or replayed traffic -> routers -> recorder -> periodic EPLB -> "
        "dispatch -> Waterfill -> per-GPU loads; prints the comparison table.",
    )
    d = SimulationConfig()
    p.add_argument("--model", choices=sorted(MODEL_PRESETS), default=d.model)
    p.add_argument("--ep-size", type=_positive_int, default=d.ep_size, help="GPUs (EP ranks)")
    p.add_argument("--num-nodes", type=_positive_int, default=d.num_nodes)
    p.add_argument(
        "--num-redundant-experts", type=_non_negative_int, default=d.num_redundant_experts
    )
    p.add_argument("--num-tokens", type=_positive_int, default=d.num_tokens, help="per step")
    p.add_argument("--num-steps", type=_positive_int, default=d.num_steps)
    p.add_argument("--rebalance-period", type=_positive_int, default=d.rebalance_period)
    p.add_argument("--skew", type=_non_negative_float, default=d.skew, help="Zipf exponent")
    p.add_argument(
        "--drift", type=_non_negative_float, default=d.drift, help="hot-set turnover per step"
    )
    p.add_argument(
        "--bursts",
        type=_non_negative_float,
        default=d.bursts,
        help="co-activation: logit boost of one of 16 expert sets per step (0 = none)",
    )
    p.add_argument(
        "--algorithms",
        nargs="+",
        default=list(d.algorithms),
        metavar="ALG",
        help=f"EPLB algorithms: {', '.join(ALGORITHMS)}; moelb:node / moelb:none set moelb's "
        "locality, moelb:step_peak (e.g. moelb:none:step_peak) plans each window against its "
        "per-step peaks",
    )
    p.add_argument("--waterfill", choices=("dynamic", "static", "off"), default="dynamic")
    p.add_argument(
        "--dispatch",
        nargs="+",
        choices=DISPATCH_ALGORITHMS,
        default=list(d.dispatch),
        metavar="NAME",
        help=f"dispatch models the realised figures use: {', '.join(DISPATCH_ALGORITHMS)} "
        "(default sglang_static: SGLang's default with DeepEP; moelb_static is ours)",
    )
    p.add_argument("--trace", default=None, help="replay this recorder dump (.pt/.npz/.json)")
    p.add_argument(
        "--trace-rotate",
        type=_non_negative_int,
        default=0,
        help="replay the trace from this row on (a wrapped bounded SGLang buffer: passes "
        "recorded mod buffer size)",
    )
    p.add_argument(
        "--num-layers", type=_positive_int, default=None, help="simulate the first N MoE layers"
    )
    p.add_argument("--expert-bytes", type=_non_negative_int, default=None)
    _add_run_flags(p, None)
    p.set_defaults(func=simulate_command)

    p = sub.add_parser(
        "rebalance",
        help="an SGLang expert distribution dump -> a placement JSON for --init-expert-location",
        description="Plans a placement from the summed counts of a dump (.pt with PyTorch, "
        ".npz or .json; a folder of them), or from its per-pass counts with --objective "
        "step_peak, and writes SGLang's placement JSON.",
    )
    p.add_argument("dump", help="expert_distribution_recorder dump (.pt / .npz / .json) or folder")
    p.add_argument("-o", "--output", required=True, help="placement JSON to write")
    p.add_argument("--num-physical-experts", type=_positive_int, required=True)
    p.add_argument("--num-gpus", type=_positive_int, required=True)
    p.add_argument("--num-nodes", type=_positive_int, default=1)
    p.add_argument(
        "--model",
        choices=sorted(MODEL_PRESETS),
        default=None,
        help="the model the dump comes from: supplies --num-groups (and checks the dump's "
        "layers and experts against it)",
    )
    p.add_argument(
        "--num-groups",
        type=_non_negative_int,
        default=None,
        help="expert groups (DeepSeek-V3: 8; 0 = the model has none). Required unless --model "
        "gives it: a missing value is an error, since without groups the planner uses the "
        "global policy instead of the node-local / hierarchical one",
    )
    p.add_argument("--algorithm", choices=ALGORITHMS, default="moelb")
    p.add_argument("--locality", choices=("auto", "node", "none"), default="auto")
    p.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default="total",
        help="total: plan against the summed counts; step_peak: against each pass's peak GPU "
        "load (moelb only; spreads experts that peak in the same passes)",
    )
    p.add_argument("--previous", default=None, help="the placement in service (JSON)")
    p.add_argument(
        "--move-cost",
        type=_non_negative_float,
        default=DEFAULT_MOVE_COST,
        help="with --previous: re-place a layer only when its largest GPU load drops by at least "
        f"this fraction per slot rewritten (default {DEFAULT_MOVE_COST:g}: 1%% per 100 slots, "
        "which at windows of 100+ passes moves nothing for sampling noise and follows real "
        "popularity changes; for ~10-pass windows use ~3e-4; 0: any gain)",
    )
    p.add_argument("--max-moves", type=_non_negative_int, default=None)
    p.add_argument("--expert-bytes", type=_non_negative_int, default=None)
    p.add_argument("--num-logical-experts", type=_positive_int, default=None)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=rebalance_command)

    p = sub.add_parser(
        "inspect",
        help="per-layer statistics of a placement JSON or a dump",
        description="A placement JSON: replicas per layer (and same-GPU duplicates with "
        "--num-gpus). A dump: tokens and hot experts per layer (and the trivial placement's "
        "balancedness and the bound with --num-gpus).",
    )
    p.add_argument("file")
    p.add_argument("--num-gpus", type=_positive_int, default=None)
    p.add_argument("--num-nodes", type=_positive_int, default=1, help="needs --num-gpus")
    p.add_argument(
        "--num-physical-experts",
        type=_positive_int,
        default=None,
        help="slots of the trivial placement a dump is scored on (default: the dump's experts, "
        "no redundancy; needs --num-gpus)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=inspect_command)
    return parser


def _one_line(error: BaseException, limit: int = 400) -> str:
    """An error message on one line (library messages may span several), shortened to
    ``limit`` characters."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (CliError, InvalidArgumentError) as e:
        print(f"moelb {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`moelb demo | head`): not an error
        sys.stdout = open(os.devnull, "w")  # keeps the interpreter quiet at exit
        return 0
    except OSError as e:  # unwritable output folder, disk full, ...
        print(f"moelb {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except MemoryError:
        print(
            f"moelb {args.command}: error: out of memory (try fewer layers, tokens, steps or "
            "passes)",
            file=sys.stderr,
        )
        return 1
    except Error as e:
        print(f"moelb {args.command}: internal error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"moelb {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: still one line, with the exception's type
        message = f"{type(e).__name__}: {_one_line(e)}" if str(e) else type(e).__name__
        print(f"moelb {args.command}: internal error: {message}", file=sys.stderr)
        return 1
