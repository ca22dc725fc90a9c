"""What ``simulate`` returns: per placement policy an ``AlgorithmResult`` (planned, in-window and
realised balancedness, moves, GPU loads, the last placement), per dispatch model a
``DispatchResult``, and the ``SimulationResult`` that holds them with the bound; all as JSON-ready
dicts. DESIGN section 7 (what the simulator reports)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from .._core import ExpertLocation
from .config import SimulationConfig
from .policies import Cluster, Policy
from .timing import StepTimeResult

__all__ = ["AlgorithmResult", "DispatchResult", "SimulationResult", "algorithm_result"]


@dataclass(frozen=True)
class DispatchResult:
    """What one placement realises under one dispatch model, at token level: the tokens of every
    source rank dispatched by the model, per step and simulated layer, averaged (SGLang's
    balancedness, (mean + 1e-5) / (max + 1e-5) of the per-GPU loads). routed: routed experts
    only; shared_local: plus the shared expert on each token's own rank; waterfill: plus the
    shared expert placed by Waterfill (None without Waterfill, and for ``equal_split``, whose
    fractional tokens Waterfill cannot place). time: the modelled routed-MoE time of its steps
    (``moelb.simulation.timing``; None without a GPU calibration)."""

    routed: float
    shared_local: float
    waterfill: float | None
    time: StepTimeResult | None = None


@dataclass(frozen=True)
class AlgorithmResult:
    """One placement policy over the run. Balancedness figures are means over steps and
    simulated layers; ``layer_*`` are per simulated layer ([L]).

    in_window / predictive: see the module doc (trivial: the same placement throughout).
    step_balancedness: [num_steps] the placement in service at each step (window 0: trivial).
    realised: token level (synthetic traffic, windows >= 1): for each dispatch model of the
        config, a ``DispatchResult``; empty for replayed counts (they carry no tokens).
    moved_experts / moved_bytes / plan_seconds: per rebalance (empty for trivial).
    rank_load: [L, W] mean per-step load of each EP rank under the placements in service (windows
        >= 1). min_gap: the smallest max-load / lower-bound - 1 over steps and layers (>= 0).
    placement: the last plan, over all of the model's layers (the ones not simulated trivial):
        what ``save_placement`` writes for SGLang's ``--init-expert-location``.
    """

    name: str
    ran: str
    in_window: float
    predictive: float
    layer_in_window: npt.NDArray[np.float64]
    layer_predictive: npt.NDArray[np.float64]
    step_balancedness: npt.NDArray[np.float64]
    realised: dict[str, DispatchResult]
    moved_experts: list[int]
    moved_bytes: list[int]
    plan_seconds: list[float]
    rank_load: npt.NDArray[np.float64]
    min_gap: float
    placement: ExpertLocation

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["realised"] = {k: dataclasses.asdict(v) for k, v in self.realised.items()}
        return {k: _jsonable(v) for k, v in d.items() if k != "placement"}


@dataclass(frozen=True)
class SimulationResult:
    """The outcome of ``simulate``. ``algorithms`` maps "trivial" and each algorithm spec to its
    ``AlgorithmResult``; ``layer_ids`` are the model layers simulated; ``bound_in_window`` /
    ``bound_predictive`` (and ``layer_bound_predictive``) are the balancedness no placement
    exceeds over the same steps as ``in_window`` / ``predictive``. ``timings``: seconds spent
    per phase. ``notes``: what the run changed or could not know (skipped trace steps, a trace
    that may be out of time order). ``time_model``: what the modelled times assume (the GPU
    calibration, its table, the DeepEP mode, the bandwidths, tokens per GPU); None without
    time figures."""

    config: SimulationConfig
    source: str
    num_steps: int
    num_windows: int
    num_physical_experts: int
    expert_bytes: int
    layer_ids: npt.NDArray[np.int64]
    bound_in_window: float
    bound_predictive: float
    layer_bound_predictive: npt.NDArray[np.float64]
    algorithms: dict[str, AlgorithmResult]
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    time_model: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-ready Python values (placements excluded)."""
        return {
            "config": dataclasses.asdict(self.config),
            "source": self.source,
            "num_steps": self.num_steps,
            "num_windows": self.num_windows,
            "num_physical_experts": self.num_physical_experts,
            "expert_bytes": self.expert_bytes,
            "layer_ids": self.layer_ids.tolist(),
            "bound_in_window": self.bound_in_window,
            "bound_predictive": self.bound_predictive,
            "layer_bound_predictive": self.layer_bound_predictive.tolist(),
            "algorithms": {k: v.to_dict() for k, v in self.algorithms.items()},
            "timings": dict(self.timings),
            "notes": list(self.notes),
            "time_model": self.time_model,
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def algorithm_result(
    policy: Policy,
    layer_ids: npt.NDArray[np.int64],
    total_layers: int,
    cluster: Cluster,
    times: dict[tuple[str, str], StepTimeResult] | None = None,
) -> AlgorithmResult:
    """A policy's result at the end of the run: its scores averaged over steps (and per layer),
    its modelled times per dispatch (``times``, keyed by (placement, dispatch)), and its last
    plan widened to the model's ``total_layers`` layers (the ones not simulated trivial)."""
    times = {} if times is None else times
    in_window = np.concatenate(policy.in_window)
    predictive = np.concatenate(policy.predictive)
    realised = {}
    for name, rows in policy.token.items():
        token = np.asarray(rows)
        waterfill = float(token[:, 2].mean())
        realised[name] = DispatchResult(
            routed=float(token[:, 0].mean()),
            shared_local=float(token[:, 1].mean()),
            waterfill=None if np.isnan(waterfill) else waterfill,
            time=times.get((policy.name, name)),
        )
    assert policy.rank_load_sum is not None
    full = cluster.trivial(total_layers).physical_to_logical.copy()
    full[layer_ids] = policy.current.physical_to_logical
    return AlgorithmResult(
        name=policy.name,
        ran=policy.ran,
        in_window=float(in_window.mean()),
        predictive=float(predictive.mean()),
        layer_in_window=in_window.mean(axis=0),
        layer_predictive=predictive.mean(axis=0),
        step_balancedness=np.concatenate(policy.step_balancedness),
        realised=realised,
        moved_experts=policy.moved_experts,
        moved_bytes=policy.moved_bytes,
        plan_seconds=policy.plan_seconds,
        rank_load=policy.rank_load_sum / max(policy.rank_load_steps, 1),
        min_gap=policy.min_gap,
        placement=ExpertLocation(
            full, cluster.num_logical_experts, cluster.ep_size, cluster.num_nodes
        ),
    )
