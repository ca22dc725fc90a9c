"""The EPLB planner: turn recorded expert loads into a placement (``rebalance``), evaluate a
placement (``evaluate_placement``, ``rank_loads``), relabel one onto another (``relabel_ranks``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from . import _core
from ._core import ExpertLocation, InvalidArgumentError

__all__ = [
    "ALGORITHMS",
    "DEFAULT_MOVE_COST",
    "OBJECTIVES",
    "PLAN_DISPATCH",
    "Plan",
    "PlanStats",
    "evaluate_placement",
    "rank_loads",
    "rebalance",
    "relabel_ranks",
]

ALGORITHMS = ("moelb", "deepseek", "deepseek_hierarchical", "deepseek_global")
OBJECTIVES = ("total", "step_peak")
#: The dispatch a plan can target (``rebalance(dispatch=...)``): ``equal_split`` (what every
#: planner assumes, the default), ``sglang_static`` (SGLang's static table on the
#: ``--init-expert-location`` path, modelled exactly) and ``balanced`` (moelb's per-step exact
#: split, ``balanced_split``; ours).
PLAN_DISPATCH = ("equal_split", "sglang_static", "balanced")
#: ``rebalance(move_cost=...)``'s default: with ``previous``, a layer is re-placed only when its
#: largest GPU load drops by at least 0.01% per slot rewritten (1% per 100 slots). Sampling noise
#: between 100- to 1,000-pass windows of the same traffic gains at most 5.6e-5 per move at
#: DeepSeek-V3 scale (10-pass windows: more; use ~3e-4 there), a real
#: popularity change 2e-4 to 2e-3 (benchmarks/bench_move_cost.py, benchmarks/README.md).
DEFAULT_MOVE_COST: float = _core.DEFAULT_MOVE_COST


@dataclass(frozen=True)
class PlanStats:
    """Statistics of a placement under a load (per-replica load = expert load / replicas).

    Balancedness is SGLang's throughout (``moelb.balancedness``): per layer the utilization rate
    ``(mean + 1e-5) / (max + 1e-5)`` of the GPU loads, 1.0 for a layer without load.

    Per layer ([L] arrays): ``max_rank_load``, ``mean_rank_load``, ``layer_balancedness`` (that
    rate), ``lower_bound`` (max(total / GPUs, best achievable max per-replica load)), ``gap``
    (max / lower_bound - 1), ``layer_moved_experts`` (slots whose expert changed vs ``previous``),
    ``layer_kept_previous``. Overall: ``balancedness`` (SGLang's: the mean of
    ``layer_balancedness`` over ALL layers, dense / idle ones counting 1.0; what SGLang reports
    for the same counts), ``active_balancedness`` (the same mean over the layers with load only;
    None when no layer has load), ``load_weighted_balancedness`` (vLLM's sum of means / sum of
    maxes, another metric), ``mean_gap``, ``max_gap``, ``moved_experts``, ``moved_bytes`` (moved
    experts x ``expert_bytes``, or None), ``wall_time_seconds`` of the planner, ``algorithm``
    that ran and ``notes`` (fallbacks, why).

    With per-step loads (``objective="step_peak"``, or ``evaluate_placement`` of a time series):
    ``step_max_rank_load`` ([L]: the sum over steps of each step's largest GPU load, >=
    ``max_rank_load``, which is the largest GPU's sum over steps) and ``step_balancedness``
    (``balancedness(mean_rank_load, step_max_rank_load)``, i.e. per layer the rate of the steps'
    mean GPU loads summed over the steps' largest summed: SGLang's per-pass balancedness with
    each pass weighted by its largest load, the counterpart of the step_peak objective); None
    otherwise.

    ``dispatch``: the dispatch the statistics target (``rebalance(dispatch=)``,
    ``evaluate_placement(dispatch=)``). Under a dispatch other than ``"equal_split"``:
    ``realised_max_rank_load`` ([L]: the largest GPU load that dispatch realises; for
    ``"sglang_static"`` through SGLang's file-path tables, each rank originating 1/W of every
    expert's load; for ``"balanced"`` the sum over the evaluation steps -- ``min(T, 32)`` evenly
    spaced steps of a time series, or the summed load as one step -- of each step's optimal
    largest GPU load ``ceil(T*)`` (non-integer loads scaled to integers by a power of two, then
    scaled back), times the layer's total over the evaluated steps' load; the realised mean is
    ``mean_rank_load``, as every dispatch sends all the load somewhere) and
    ``realised_balancedness`` (SGLang's balancedness of ``mean_rank_load`` over
    ``realised_max_rank_load``, over all layers: under ``"balanced"`` each layer's per-step
    balancedness under the balanced dispatch, the steps weighted by their largest load); None
    under ``"equal_split"``.
    """

    max_rank_load: npt.NDArray[np.float64]
    mean_rank_load: npt.NDArray[np.float64]
    layer_balancedness: npt.NDArray[np.float64]
    lower_bound: npt.NDArray[np.float64]
    gap: npt.NDArray[np.float64]
    layer_moved_experts: npt.NDArray[np.int64]
    layer_kept_previous: npt.NDArray[np.bool_]
    balancedness: float
    active_balancedness: float | None
    load_weighted_balancedness: float
    mean_gap: float
    max_gap: float
    moved_experts: int
    moved_bytes: int | None
    wall_time_seconds: float
    algorithm: str
    notes: str
    step_max_rank_load: npt.NDArray[np.float64] | None
    step_balancedness: float | None
    dispatch: str
    realised_max_rank_load: npt.NDArray[np.float64] | None
    realised_balancedness: float | None


@dataclass(frozen=True)
class Plan:
    """A placement (``location``, what SGLang's ``--init-expert-location`` takes once saved with
    ``moelb.save_placement``) and its ``stats``."""

    location: ExpertLocation
    stats: PlanStats


def _as_load(load: Any, steps: bool | str = False) -> npt.NDArray[Any]:
    """load as float64 [L, E]; a time series [T, L, E] is summed over T unless ``steps``
    (``"optional"``: a series of no steps is summed)."""
    if hasattr(load, "detach"):  # a torch tensor
        load = load.detach().cpu().numpy()
    array = np.asarray(load)
    if array.dtype.kind not in "iuf":
        raise InvalidArgumentError(f"load must hold numbers, got dtype {array.dtype}")
    if array.ndim == 3 and steps:
        if array.shape[0] == 0 and steps == "optional":
            return np.zeros(array.shape[1:], dtype=np.float64)  # no steps: an empty sum
        if 0 in array.shape:
            raise InvalidArgumentError(
                f"load must have shape [num_steps, num_layers, num_experts] with all positive, "
                f"got {array.shape}"
            )
        # int32 counts (a recorder's dump) are read as they are; anything else as float64.
        kind = np.int32 if array.dtype == np.int32 else np.float64
        return np.ascontiguousarray(array, dtype=kind)
    if array.ndim == 3:  # a time series [T, L, E]: the plan uses the sum over T
        series = array
        with np.errstate(over="ignore", invalid="ignore"):
            array = series.sum(axis=0, dtype=np.float64)
        overflowed = np.isinf(array) & np.isfinite(series).all(axis=0)
        if overflowed.any():
            layer, expert = (int(i) for i in np.argwhere(overflowed)[0])
            raise InvalidArgumentError(
                f"load[:, {layer}, {expert}] summed over the {series.shape[0]} steps overflows: "
                "finite loads must sum to at most 1e300"
            )
    if array.ndim != 2:
        raise InvalidArgumentError(
            f"load must be [num_layers, num_experts] or [T, num_layers, num_experts], "
            f"got shape {array.shape}"
        )
    return np.ascontiguousarray(array, dtype=np.float64)


def _stats(raw: dict[str, Any], expert_bytes: int | None) -> PlanStats:
    if expert_bytes is not None and expert_bytes < 0:
        raise InvalidArgumentError(f"expert_bytes must be non-negative, got {expert_bytes}")
    moved = int(raw["moved_experts"])
    return PlanStats(
        **{k: v for k, v in raw.items() if k != "moved_experts"},
        moved_experts=moved,
        moved_bytes=None if expert_bytes is None else moved * int(expert_bytes),
    )


def rebalance(
    load: Any,
    num_physical_experts: int,
    num_groups: int | None,
    num_nodes: int,
    ep_size: int,
    algorithm: str = "moelb",
    previous: ExpertLocation | None = None,
    *,
    locality: str = "auto",
    move_cost: float = DEFAULT_MOVE_COST,
    max_moves: int | None = None,
    expert_bytes: int | None = None,
    objective: str = "total",
    dispatch: str = "equal_split",
) -> Plan:
    """Plans which GPU slots hold which experts, from loads.

    load: [L, E] or a time series [T, L, E] (summed over T) of per-expert loads (token counts,
        integer or float, finite and >= 0, summing to at most 1e300 so that no statistic
        overflows; else ``InvalidArgumentError`` naming ``load``), e.g. a recorder dump's
        ``logical_count``.
    num_physical_experts: slots per layer (E + redundant); a multiple of ep_size, at most 2**20.
    num_groups: expert groups (DeepSeek-V3: 8), or None.
    algorithm: ``"moelb"`` (ours, the default), ``"deepseek"`` (DeepSeek's eplb.py: hierarchical
        when num_groups % num_nodes == 0, else global), ``"deepseek_hierarchical"``,
        ``"deepseek_global"``.
    previous: the current placement. moelb keeps unchanged experts in their slots, and with
        ``move_cost`` (minimum relative max-load reduction per moved expert for a layer to change;
        default ``DEFAULT_MOVE_COST`` = 1e-4, i.e. 1% per 100 slots rewritten, which at windows of
        100+ passes moves nothing for the sampling noise between windows of the same traffic and
        still follows real popularity changes (10-pass windows: use ~3e-4); 0 re-places a layer
        for any gain) or ``max_moves`` (a cap on slots rewritten over all layers) keeps layers
        whose gain does not pay for their moves. Also
        makes ``stats`` count moved experts. DeepSeek's algorithms ignore both.
    locality: moelb only: ``"node"`` keeps each expert group and its replicas on one node,
        ``"none"`` places freely, ``"auto"`` is node when num_groups % num_nodes == 0.
    expert_bytes: the size of one expert's weights, for ``stats.moved_bytes``.
    objective: moelb only: ``"total"`` plans against the loads summed over a time series;
        ``"step_peak"`` needs a time series [T, L, E] and then lowers the sum over steps of each
        step's largest GPU load (swapping replicas between GPUs, counts unchanged), which spreads
        experts that peak together: it predicts the next window better when experts are
        co-activated in bursts (topics, batch content) or the hot experts drift, and changes
        nothing that lasts on stationary traffic (benchmarks/bench_objective.py). Its per-step
        peak is never above the "total" plan's on the given series (unless ``move_cost`` /
        ``max_moves`` keep a layer's previous placement; they then weigh the gain in the per-step
        peak). Time grows with T (a 58-layer DeepSeek-V3 plan over 1,000 steps takes about
        0.3-3 s on 2 cores), and the search keeps about (E + 2 W) x T doubles per thread: for a
        long dump, plan on its last window, e.g. ``load[-1000:]``. int32 counts (a recorder's
        dump) are read as they are; other dtypes are converted to float64.
    dispatch: moelb only: the dispatch the plan is made for (``PLAN_DISPATCH``; ours -- every
        planner, DeepSeek's and SGLang's included, plans for ``"equal_split"``, the default).
        ``"sglang_static"``: the load SGLang's default static table realises for a placement
        loaded with ``--init-expert-location`` (``reference/dispatch.md`` sections 2-3, modelled
        exactly: each rank's nearest replica, else its own ``random.Random(42)`` fair choice,
        the streams running on from layer to layer). Planning model: each rank originates 1/W of
        every expert's load. The planner evaluates each candidate's tables exactly and keeps,
        per layer, the lowest realised largest GPU load among the equal-split plan, that plan
        improved by slot swaps, and with ``locality="none"`` on several nodes placements that
        put an expert's replicas on distinct nodes (on every node, every rank has a nearest
        replica and none draws), improved likewise. Never worse per layer: every layer realises
        no more than the equal-split plan (``dispatch="equal_split"``, same options, loaded
        through the same file path) realises on it, nor than the equal-split plan's layer would
        after this plan's earlier layers (ours: the planner follows the equal-split plan's own
        streams too; where the streams this plan leaves cannot match its layer, the previous
        layer is changed within what it realised, else the equal-split plan's earlier layers are
        taken). The guarantee is without a move trade-off: with ``previous``, ``move_cost``
        (``DEFAULT_MOVE_COST`` unless given) or ``max_moves`` may keep a layer's previous
        placement afterwards (``stats.layer_kept_previous``), and that layer and the later ones
        (SGLang's draws then run differently) may realise more than the equal-split plan's, whose
        own trade-off keeps other layers; pass ``move_cost=0`` (no ``max_moves``) to keep the
        guarantee with ``previous``. Use ``locality="none"``: under node locality every rank
        without its own replica of a replicated expert draws at random.
        ``stats.realised_max_rank_load`` / ``realised_balancedness`` report it; with
        ``previous``, ``move_cost`` / ``max_moves`` weigh the realised gain. Takes
        ``objective="total"`` (a time series is summed). About 0.1-0.3 s for 58 layers at EP32
        (the exact tables cost more as W grows: about 1.5 s at EP64).
        ``"balanced"``: moelb's per-step exact split (``balanced_split``, ``select_experts(
        dispatch="balanced")``: each step's tokens split over the replicas at the optimal largest
        GPU load ``ceil(T*)``). Its optimum is limited by sets of GPUs that no replica links to
        the rest, so the replicated experts' replicas are laid out as one spanning hypertree over
        the GPUs (one per node with ``locality="node"``), connected whenever the domain has at
        least its GPUs - 1 redundant slots; replica counts by the divisor method on the window's
        load (no forecast). Per layer the layout is kept only when its sum of ``ceil(T*)`` over
        the evaluation steps (``min(T, 32)`` evenly spaced steps of a time series ``[T, L, E]``,
        else the load as one step) is below the equal-split plan's: never worse on the window it
        was planned on. Pass the window's time series (its steps are read, not only its sum).
        With ``previous`` (ours): the layout is also repaired from the previous one (replica
        counts updated, the previous replicas and links kept, only what changed re-placed, every
        GPU still linked, then swaps of single-copy experts), and per layer the previous
        placement, the repaired layout after 0, 1, 2, 4, ... of its swaps, the rebuilt layout
        and the equal-split plan (both relabelled onto ``previous`` by ``relabel_ranks``)
        compete: those at or below the equal-split plan on the window, on their relative gain
        minus ``move_cost`` per slot rewritten (ties: fewer slots); then ``move_cost`` /
        ``max_moves`` weigh the realised gain as for every plan. On the demo configuration this
        rewrites ~1,100 slots per window at the default ``move_cost`` (~13,300 when rebuilt
        every window). Takes ``objective="total"``.
    """
    if algorithm not in ALGORITHMS:
        raise InvalidArgumentError(
            f"algorithm={algorithm!r} is not an EPLB algorithm; expected one of {ALGORITHMS}"
        )
    if objective not in OBJECTIVES:
        raise InvalidArgumentError(
            f"objective={objective!r} is not an EPLB objective; expected one of {OBJECTIVES}"
        )
    _check_dispatch(dispatch)
    location, raw = _core.rebalance(
        _as_load(load, steps=objective == "step_peak" or dispatch == "balanced"),
        num_physical_experts,
        0 if num_groups is None else num_groups,
        num_nodes,
        ep_size,
        algorithm,
        locality,
        previous,
        move_cost,
        max_moves,
        objective,
        dispatch,
    )
    return Plan(location, _stats(raw, expert_bytes))


def _check_dispatch(dispatch: str) -> None:
    if dispatch not in PLAN_DISPATCH:
        raise InvalidArgumentError(
            f"dispatch={dispatch!r} is not a dispatch the planner targets; expected one of "
            f"{PLAN_DISPATCH}"
        )


def evaluate_placement(
    load: Any,
    location: ExpertLocation,
    previous: ExpertLocation | None = None,
    *,
    expert_bytes: int | None = None,
    dispatch: str = "equal_split",
) -> PlanStats:
    """The statistics of ``location`` under ``load`` ([L, E], or a time series [T, L, E]: then
    with the per-step peaks, ``step_max_rank_load`` and ``step_balancedness``; int32 counts are
    read as they are, other dtypes converted to float64). The load is checked as for
    ``rebalance`` (finite, >= 0, summing to at most 1e300). ``dispatch`` (``PLAN_DISPATCH``):
    also what that dispatch realises of the (summed) load -- ``"balanced"``: of the series'
    evaluation steps -- as ``rebalance(dispatch=)`` reports it (``realised_max_rank_load``,
    ``realised_balancedness``)."""
    _check_dispatch(dispatch)
    return _stats(
        _core.evaluate_placement(_as_load(load, steps="optional"), location, previous, dispatch),
        expert_bytes,
    )


def relabel_ranks(
    location: ExpertLocation, previous: ExpertLocation, locality: str = "none"
) -> ExpertLocation:
    """``location`` with each layer's EP ranks permuted and each rank's slots reordered so that
    the most slots hold the expert they hold in ``previous`` (ours): the fewest weights to move
    for the same per-rank multisets of experts. ``locality="node"``: the ranks of each node go
    onto the ranks of one node (``location.num_nodes``), nodes permuted too; ``"none"``: any
    permutation. Exact (an assignment solved as a min-cost flow, the largest sum over ranks of
    the multiset overlap of a rank's experts with its previous rank's). Equal-split and
    balanced-dispatch loads are those of ``location`` with its ranks permuted; SGLang's static
    tables read the replica order and may change. ``rebalance(dispatch="balanced",
    previous=...)`` relabels its rebuilt layouts this way. Raises ``InvalidArgumentError`` for a
    ``previous`` of another shape (layers, logical and physical experts, ep_size) or a locality
    other than ``"none"`` / ``"node"``."""
    return _core.relabel_ranks(location, previous, locality)


def rank_loads(load: Any, location: ExpertLocation) -> npt.NDArray[np.float64]:
    """[L, W]: each EP rank's load under ``location`` (each expert's load split equally over its
    replicas). The load is checked as for ``rebalance``."""
    return _core.rank_loads(_as_load(load), location)
