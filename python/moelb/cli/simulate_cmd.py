"""``moelb demo`` and ``moelb simulate``: a ``SimulationConfig`` from the defaults or the flags, the
simulation with a progress bar, the placement JSON, ``simulation.json`` and PNG plots written to
``--output-dir``, and the report (or the results as JSON); the demo adds a prefill-like run's
modelled times (``simulation_prefill.json``). DESIGN section 7 (the CLI and the main job)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from .._core import set_num_threads
from ..io import save_placement
from ..simulate import SimulationConfig, SimulationResult, simulate
from ..simulation.timing import step_time_model
from .common import CliError
from .output import ProgressBar, print_json, write_text
from .simulate_report import (
    LEGEND,
    TIME_LEGEND,
    best_placement_line,
    describe,
    layer_table,
    realised_table,
    simulation_table,
    time_header,
    time_table,
    timed_row_line,
)

__all__ = ["DEMO_CONFIG", "DEMO_PREFILL_CONFIG", "demo", "run_simulation", "simulate_command"]

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

#: The demo's prefill-like run: the same cluster, placements and dispatch models at 4,096 tokens
#: per GPU (131,072 per step; the decode-like run above has 128), over fewer layers and steps:
#: its token level does 32x the decode run's work per step and layer. It reports the modelled
#: time only (it runs when there is a GPU calibration).
DEMO_PREFILL_CONFIG = dataclasses.replace(
    DEMO_CONFIG, num_tokens=4096 * DEMO_CONFIG.ep_size, num_layers=8, num_steps=8,
    rebalance_period=4,
)  # fmt: skip
#: ``moelb demo --quick``: a smoke run of both.
_QUICK = {"num_layers": 6, "num_tokens": 1024, "num_steps": 8, "rebalance_period": 4}
_QUICK_PREFILL = {"num_layers": 2, "num_steps": 4, "rebalance_period": 2}

#: simulate flags that shape synthetic traffic only: with --trace they would do nothing.
_SYNTHETIC_ONLY = ("num_tokens", "num_steps", "skew", "drift", "bursts", "num_layers")


def demo(args: argparse.Namespace) -> int:
    """The decode-like run (the full report), then, with a GPU calibration, the prefill-like
    run's modelled times (``--traffic`` picks one of them)."""
    common = {"gpu": _gpu(args.gpu)}
    if args.seed is not None:
        common["seed"] = args.seed
    decode = dataclasses.replace(DEMO_CONFIG, **common, **(_QUICK if args.quick else {}))
    prefill = dataclasses.replace(
        DEMO_PREFILL_CONFIG, **common, **(_QUICK_PREFILL if args.quick else {})
    )
    if args.traffic == "prefill":
        return run_simulation(prefill, args)
    if args.traffic == "decode" or step_time_model(prefill)[0] is None:
        return run_simulation(decode, args)
    return run_simulation(decode, args, then=prefill)


def simulate_command(args: argparse.Namespace) -> int:
    if args.trace is not None:
        _check_replay_flags(args)
    return run_simulation(_config_from_flags(args), args)


def _check_replay_flags(args: argparse.Namespace) -> None:
    """A --trace replay needs an existing file and none of the flags that shape synthetic
    traffic or its token-level figures (a replay has counts, not tokens)."""
    if not Path(args.trace).exists():
        raise CliError(f"trace file {args.trace!r} does not exist")
    defaults = SimulationConfig()
    for name in _SYNTHETIC_ONLY:
        if getattr(args, name) != getattr(defaults, name):
            flag = "--" + name.replace("_", "-")
            raise CliError(
                f"{flag} shapes synthetic traffic; a --trace replay uses the dump's steps, "
                "layers and counts as they are: drop it"
            )
    given = [
        "--" + name.replace("_", "-")
        for name in ("deepep_mode", "nvlink_bytes_per_s", "network_bytes_per_s")
        if getattr(args, name) != getattr(defaults, name)
    ]
    given += [
        flag
        for flag in ("--dispatch", "--waterfill", "--seed", "--gpu", "--gpu-dtype")
        if getattr(args, flag[2:].replace("-", "_")) is not None
    ]
    if given:
        raise CliError(
            f"{given[0]} shapes the token-level figures of synthetic traffic; a --trace replay "
            "has per-expert counts, not tokens: drop it"
        )


def _waterfill(flag: str | None) -> str | None:
    """--waterfill: the default when not given, None for "off"."""
    if flag is None:
        return SimulationConfig.waterfill
    return None if flag == "off" else flag


def _config_from_flags(args: argparse.Namespace) -> SimulationConfig:
    return SimulationConfig(
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
        waterfill=_waterfill(args.waterfill),
        dispatch=SimulationConfig.dispatch if args.dispatch is None else tuple(args.dispatch),
        trace=args.trace,
        trace_rotate=args.trace_rotate,
        num_layers=args.num_layers,
        expert_bytes=args.expert_bytes,
        seed=args.seed if args.seed is not None else 0,
        gpu=_gpu(args.gpu),
        gpu_dtype=args.gpu_dtype,
        deepep_mode=args.deepep_mode,
        nvlink_bytes_per_s=args.nvlink_bytes_per_s,
        network_bytes_per_s=args.network_bytes_per_s,
    )


def _gpu(flag: str | None) -> str | None:
    """--gpu: the default calibration when not given, None for "none"."""
    if flag is None:
        return SimulationConfig.gpu
    return None if flag == "none" else flag


def run_simulation(
    config: SimulationConfig, args: argparse.Namespace, then: SimulationConfig | None = None
) -> int:
    """Simulates ``config``, writes the files to --output-dir, prints the report or the JSON.
    ``then``: the demo's prefill-like run, simulated after it; its modelled times are printed
    after the report (``"prefill"`` in the JSON) and written to ``simulation_prefill.json``."""
    if args.threads is not None:
        set_num_threads(args.threads)
    progress = ProgressBar("simulating", enabled=args.progress)
    result = simulate(config, progress=progress)
    second = None
    if then is not None:
        second = simulate(then, progress=ProgressBar("prefill-like", enabled=args.progress))
    written: list[str] = []
    notes: list[str] = []
    if args.output_dir is not None:
        written, notes = _write_files(result, args.output_dir, args.plots)
        if second is not None:
            path = args.output_dir / "simulation_prefill.json"
            write_text(path, json.dumps(second.to_dict(), indent=2) + "\n")
            written.append(str(path))
    if args.json:
        payload = result.to_dict()
        payload["files"] = written
        payload["notes"] = result.notes + notes
        if second is not None:
            payload["prefill"] = second.to_dict()
        print_json(payload)
        return 0
    _print_report(result, args.per_layer, written, notes, second)
    return 0


def _write_files(
    result: SimulationResult, out_dir: Path, plots: bool
) -> tuple[list[str], list[str]]:
    """Writes the focus placement, simulation.json and (with ``plots``) the PNG plots to
    ``out_dir``; returns the paths written and notes on what was skipped."""
    written: list[str] = []
    notes: list[str] = []
    out_dir.mkdir(parents=True, exist_ok=True)
    focus = _focus(result)
    placement = out_dir / "placement.json"
    save_placement(result.algorithms[focus].placement, placement)
    written.append(str(placement))
    summary = out_dir / "simulation.json"
    write_text(summary, json.dumps(result.to_dict(), indent=2) + "\n")
    written.append(str(summary))
    if plots:
        from ..plots import PlotsUnavailable, plot_simulation

        try:
            written += [str(p) for p in plot_simulation(result, out_dir, focus)]
        except PlotsUnavailable as e:
            notes.append(f"plots skipped: {e}")
    else:
        notes.append("plots skipped: --no-plots")
    return written, notes


def _print_report(
    result: SimulationResult,
    per_layer: bool,
    written: list[str],
    notes: list[str],
    prefill: SimulationResult | None = None,
) -> None:
    print(describe(result) + "\n")
    print(simulation_table(result))
    realised = realised_table(result)
    if realised is not None:
        print("\nrealised at token level (next window), per dispatch\n" + realised)
        best = best_placement_line(result)
        if best is not None:
            print("\n" + best)
    timed = time_table(result)
    if timed is not None:
        print(f"\n{time_header(result)}\n{timed}\n\n{timed_row_line(result)}")
    if prefill is not None:
        print(f"\nprefill-like: {describe(prefill)}\n\n{time_header(prefill)}")
        print(f"{time_table(prefill)}\n\n{timed_row_line(prefill)}")
    if per_layer:
        print("\npredictive balancedness per layer\n" + layer_table(result))
    print("\n" + LEGEND)
    if timed is not None:
        print(TIME_LEGEND)
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


def _focus(result: SimulationResult) -> str:
    """The placement to write: moelb's if simulated, else the first algorithm's."""
    names = [n for n in result.algorithms if n != "trivial"]
    return "moelb" if "moelb" in names else names[0]
