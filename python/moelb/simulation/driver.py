"""The simulator's driver, ``simulate``: steps of synthetic or replayed traffic in windows of
``rebalance_period`` steps; per window, every policy's placement in service scored against the
lower bound, then re-planned for the next window; at the end, the results. DESIGN sections 6 and
7 (simulate a serving cluster; what the simulator reports)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ..balancedness import utilization_rate
from .config import SimulationConfig
from .policies import Cluster, Policy, make_policies
from .presets import ModelPreset
from .results import SimulationResult, algorithm_result
from .scoring import step_lower_bounds
from .timing import StepTimer, deepep_mode, step_time_model
from .token_level import TokenLevel
from .trace import replay_trace
from .traffic import SyntheticRouting

__all__ = ["Progress", "simulate"]

#: Progress callback: (steps done, total steps).
Progress = Callable[[int, int], None]


@dataclass
class _Run:
    """What the parts of one simulation share: its config and model, the cluster, the progress
    callback, and the seconds per phase and notes it collects."""

    config: SimulationConfig
    preset: ModelPreset
    cluster: Cluster
    progress: Progress | None
    timings: dict[str, float]
    notes: list[str]


def simulate(config: SimulationConfig, progress: Progress | None = None) -> SimulationResult:
    """Runs the simulation described by ``config``; ``progress(done, total)`` is called after
    every step. Deterministic for a given config (any thread count)."""
    config.validate()
    preset = config.preset()
    timings = {"traffic": 0.0, "planning": 0.0, "scoring": 0.0, "token_level": 0.0}
    start_all = time.perf_counter()
    run = _Run(config, preset, Cluster.of(config, preset), progress, timings, notes=[])
    traffic: _Replayed | _Synthetic = (
        _Replayed(run, config.trace) if config.trace is not None else _Synthetic(run)
    )
    policies = make_policies(config, run.cluster.trivial(len(traffic.layer_ids)))
    num_windows = -(-traffic.num_steps // config.rebalance_period)
    bounds = [_run_window(run, traffic, policies, window) for window in range(num_windows)]
    if isinstance(traffic, _Synthetic):
        run.notes.extend(traffic.token_level.notes())
    return _simulation_result(run, traffic, policies, bounds, start_all)


class _Replayed:
    """Windows of a replayed trace: slices of its counts; progress after each window."""

    def __init__(self, run: _Run, path: str) -> None:
        self.run = run
        self.trace = replay_trace(path, run.config, run.preset, run.timings, run.notes)
        self.layer_ids = self.trace.layer_ids
        self.total_layers = self.trace.total_layers
        self.num_steps = self.trace.counts.shape[0]
        self.source = f"trace {path}"

    def window_counts(
        self, window: int, first: int, last: int, policies: Sequence[Policy]
    ) -> npt.NDArray[np.int32]:
        """The counts [T_w, L, E] of steps ``first:last`` (window ``window``)."""
        return self.trace.counts[first:last]

    def window_done(self, last: int) -> None:
        """Called once the window ending at step ``last`` is scored and re-planned."""
        if self.run.progress is not None:
            self.run.progress(last, self.num_steps)


class _Synthetic:
    """Windows of synthetic traffic over the model's first MoE layers: each step routed into the
    recorder and, from window 1 on, realised at token level on the placements in service;
    progress after each step."""

    def __init__(self, run: _Run) -> None:
        config, preset = run.config, run.preset
        self.run = run
        self.total_layers = preset.num_hidden_layers
        num_moe = config.num_layers or preset.num_moe_layers
        self.layer_ids = np.arange(preset.first_moe_layer, preset.first_moe_layer + num_moe)
        self.num_steps = config.num_steps
        self.source = "synthetic"
        self.routing = SyntheticRouting(preset, self.layer_ids, config)
        model, why_not = step_time_model(config)
        if why_not is not None:
            run.notes.append(why_not)
        self.token_level = TokenLevel(config, run.cluster.num_physical_experts, model)

    def window_counts(
        self, window: int, first: int, last: int, policies: Sequence[Policy]
    ) -> npt.NDArray[np.int32]:
        """Routes steps ``first:last`` (window ``window``), realising each at token level on
        the ``policies``' placements from window 1 on; returns their recorded counts."""
        timings = self.run.timings
        for step in range(first, last):
            t1 = time.perf_counter()
            routed = self.routing.route(step)
            timings["traffic"] += time.perf_counter() - t1
            if window > 0:
                t1 = time.perf_counter()
                self.token_level.realise(policies, routed, step)
                timings["token_level"] += time.perf_counter() - t1
            if self.run.progress is not None:
                self.run.progress(step + 1, self.num_steps)
        return self.routing.window_counts()

    def window_done(self, last: int) -> None:
        """Nothing to do: progress went step by step."""


def _run_window(
    run: _Run, traffic: _Replayed | _Synthetic, policies: Sequence[Policy], window: int
) -> npt.NDArray[np.float64]:
    """Runs window ``window``: its traffic, every policy scored on it, then re-planned on it for
    the next window. Returns the bound's balancedness [T_w, L] over its steps."""
    period = run.config.rebalance_period
    first, last = window * period, min((window + 1) * period, traffic.num_steps)
    counts = traffic.window_counts(window, first, last, policies)
    t0 = time.perf_counter()
    mean_load = None
    bound = step_lower_bounds(counts, run.cluster.num_physical_experts, run.cluster.ep_size)
    for policy in policies:
        mean_load = policy.score_in_service(counts, bound, window)
    assert mean_load is not None
    bound_balancedness = utilization_rate(mean_load, bound)
    run.timings["scoring"] += time.perf_counter() - t0
    # Plan on this window; the plan serves the next one.
    window_load = counts.sum(axis=0, dtype=np.float64)
    window_counts = counts.sum(axis=0, dtype=np.int64)
    for policy in policies:
        if policy.algorithm is not None:
            policy.replan(counts, window_load, bound, run.cluster, run.timings)
        policy.expect(window_counts)
    traffic.window_done(last)
    return bound_balancedness


def _simulation_result(
    run: _Run,
    traffic: _Replayed | _Synthetic,
    policies: Sequence[Policy],
    bounds: list[npt.NDArray[np.float64]],
    start_all: float,
) -> SimulationResult:
    timer = traffic.token_level.timer if isinstance(traffic, _Synthetic) else None
    times = None if timer is None else timer.results()
    results = {
        p.name: algorithm_result(p, traffic.layer_ids, traffic.total_layers, run.cluster, times)
        for p in policies
    }
    bound_in_window = np.concatenate(bounds)
    bound_predictive = np.concatenate(bounds[1:])
    run.timings["total"] = time.perf_counter() - start_all
    return SimulationResult(
        config=run.config,
        source=traffic.source,
        num_steps=traffic.num_steps,
        num_windows=len(bounds),
        num_physical_experts=run.cluster.num_physical_experts,
        expert_bytes=run.cluster.expert_bytes,
        layer_ids=np.asarray(traffic.layer_ids, dtype=np.int64),
        bound_in_window=float(bound_in_window.mean()),
        bound_predictive=float(bound_predictive.mean()),
        layer_bound_predictive=bound_predictive.mean(axis=0),
        algorithms=results,
        timings=run.timings,
        notes=run.notes,
        time_model=None if timer is None else _time_model_summary(run.config, timer),
    )


def _time_model_summary(config: SimulationConfig, timer: StepTimer) -> dict[str, Any]:
    """What the modelled times of a run assume, JSON-ready."""
    model = timer.model
    cal, table = model.calibration, model.table
    return {
        "gpu": cal.key,
        "gpu_name": cal.gpu,
        "calibration": cal.source,
        "date": cal.metadata.get("date"),
        "table": f"{table.model}/{table.dtype}",
        "method": table.method,
        "memory_bandwidth_bytes_per_s": cal.memory_bandwidth_bytes_per_s,
        "layer_fixed_s": cal.layer_fixed_s,
        "weight_bytes_per_expert": table.weight_bytes_per_expert,
        "deepep_mode": deepep_mode(config),
        "nvlink_bytes_per_s": model.interconnect.nvlink_bytes_per_s,
        "network_bytes_per_s": model.interconnect.network_bytes_per_s,
        "dispatch_bytes_per_copy": model.dispatch_bytes,
        "combine_bytes_per_copy": model.combine_bytes,
        "tokens_per_gpu": config.num_tokens / config.ep_size,
    }
