"""Placement policies of the simulator: the cluster every plan is made for, and each policy's
running state (the placement in service and the scores it collected), scored on every window and
re-planned with ``rebalance`` for the next one (window 0 runs the trivial placement). DESIGN
sections 4 (EPLB) and 6-7 (the simulator)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from .._core import ExpertLocation
from ..balancedness import utilization_rate
from ..eplb import rank_loads, rebalance
from .config import SimulationConfig, parse_algorithm
from .presets import ModelPreset
from .scoring import score_steps, smallest_gap

__all__ = ["Cluster", "Policy", "make_policies"]


@dataclass(frozen=True)
class Cluster:
    """What every placement is made for: E logical experts on P physical slots over ``ep_size``
    GPUs in ``num_nodes`` nodes, with the model's expert groups; ``expert_bytes``: one expert's
    weights (moved bytes)."""

    num_logical_experts: int
    num_physical_experts: int
    num_groups: int | None
    num_nodes: int
    ep_size: int
    expert_bytes: int

    @classmethod
    def of(cls, config: SimulationConfig, preset: ModelPreset) -> Cluster:
        expert_bytes = preset.expert_bytes if config.expert_bytes is None else config.expert_bytes
        return cls(
            num_logical_experts=preset.num_experts,
            num_physical_experts=preset.num_experts + config.num_redundant_experts,
            num_groups=preset.num_groups,
            num_nodes=config.num_nodes,
            ep_size=config.ep_size,
            expert_bytes=expert_bytes,
        )

    def trivial(self, num_layers: int) -> ExpertLocation:
        """The trivial placement of ``num_layers`` layers (slot p holds expert p % E)."""
        return ExpertLocation.trivial(
            num_layers,
            self.num_logical_experts,
            self.num_physical_experts,
            self.ep_size,
            self.num_nodes,
        )


@dataclass
class Policy:
    """The running state of one placement policy."""

    name: str
    algorithm: str | None  # None: trivial
    locality: str
    objective: str
    current: ExpertLocation  # in service
    dispatch: str = "equal_split"  # the dispatch its plans target (rebalance(dispatch=))
    ran: str = "trivial"
    in_window: list[npt.NDArray[np.float64]] = field(default_factory=list)  # [T_w, L]
    predictive: list[npt.NDArray[np.float64]] = field(default_factory=list)
    step_balancedness: list[npt.NDArray[np.float64]] = field(default_factory=list)
    token: dict[str, list[tuple[float, float, float]]] = field(default_factory=dict)
    moved_experts: list[int] = field(default_factory=list)
    moved_bytes: list[int] = field(default_factory=list)
    plan_seconds: list[float] = field(default_factory=list)
    rank_load_sum: npt.NDArray[np.float64] | None = None
    rank_load_steps: int = 0
    min_gap: float = float("inf")
    tables: dict[str, npt.NDArray[np.int32]] = field(default_factory=dict)  # [W, L, E] each
    # The counts [L, E] of the window the placement in service was planned from (the trivial
    # placement: the last window's), and what the token level derives from them and from the
    # placement: balanced_offline's fractions [L, E, X], balanced_joint's per-rank shared-slot
    # placement.
    planned_from: npt.NDArray[np.int64] | None = None
    offline_fractions: npt.NDArray[np.float64] | None = None
    joint_location: ExpertLocation | None = None

    def score_in_service(
        self, counts: npt.NDArray[np.int32], bound: npt.NDArray[np.float64], window: int
    ) -> npt.NDArray[np.float64]:
        """Scores the placement in service on window ``window``'s counts [T_w, L, E] (``bound``:
        their per-step lower bounds [T_w, L]): per-step balancedness, the gap to the bound, and
        from window 1 on the predictive balancedness and GPU loads (the trivial policy's is also
        its in-window score). Returns the mean GPU load [T_w, L]."""
        max_load, mean_load = score_steps(counts, self.current)
        serving = utilization_rate(mean_load, max_load)
        self.step_balancedness.append(serving.mean(axis=1))
        self.min_gap = min(self.min_gap, smallest_gap(max_load, bound))
        if window > 0:
            self.predictive.append(serving)
            g = rank_loads(counts, self.current)
            self.rank_load_sum = g if self.rank_load_sum is None else self.rank_load_sum + g
            self.rank_load_steps += counts.shape[0]
        if self.algorithm is None:
            self.in_window.append(serving)
        return mean_load

    def replan(
        self,
        counts: npt.NDArray[np.int32],
        window_load: npt.NDArray[np.float64],
        bound: npt.NDArray[np.float64],
        cluster: Cluster,
        timings: dict[str, float],
    ) -> None:
        """Plans on a window's counts [T_w, L, E] (on their sum ``window_load`` [L, E] unless the
        objective is step_peak or the target dispatch balanced; from the placement in service,
        so moved experts are counted),
        scores the plan on that window (in-window) and puts it in service for the next one;
        planning and scoring seconds are added to ``timings``."""
        t0 = time.perf_counter()
        plan = rebalance(
            # step_peak and the balanced target read the window's steps.
            counts if self.objective == "step_peak" or self.dispatch == "balanced" else window_load,
            cluster.num_physical_experts,
            cluster.num_groups,
            cluster.num_nodes,
            cluster.ep_size,
            algorithm=self.algorithm,
            previous=self.current,
            locality=self.locality,
            expert_bytes=cluster.expert_bytes,
            objective=self.objective,
            dispatch=self.dispatch,
        )
        timings["planning"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        max_load, mean_load = score_steps(counts, plan.location)
        self.in_window.append(utilization_rate(mean_load, max_load))
        self.min_gap = min(self.min_gap, smallest_gap(max_load, bound))
        timings["scoring"] += time.perf_counter() - t0
        self.current = plan.location
        self.ran = plan.stats.algorithm
        self.moved_experts.append(plan.stats.moved_experts)
        self.moved_bytes.append(int(plan.stats.moved_bytes or 0))
        self.plan_seconds.append(plan.stats.wall_time_seconds)
        self.tables = {}
        self.joint_location = None

    def expect(self, window_counts: npt.NDArray[np.int64]) -> None:
        """Records the summed counts [L, E] of the window just scored: what the placement that
        serves the next window was planned from (the expected counts of balanced_offline)."""
        self.planned_from = window_counts
        self.offline_fractions = None


def make_policies(config: SimulationConfig, trivial: ExpertLocation) -> list[Policy]:
    """The trivial placement (always scored), then one policy per algorithm spec of the config,
    all starting from ``trivial``."""
    policies = [Policy("trivial", None, "auto", "total", trivial)]
    for spec in config.algorithms:
        algorithm, locality, objective, dispatch = parse_algorithm(spec)
        policies.append(Policy(spec, algorithm, locality, objective, trivial, dispatch))
    return policies
