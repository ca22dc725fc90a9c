"""Replica dispatch: how each engine turns a logical expert id into one of its physical replicas.

A placement is judged by the load the GPUs realise under the dispatch the engine really runs, not
by the equal split of every expert over its replicas that planners assume
(``../shared/reference/dispatch.md``; DESIGN section 2). Two kinds, never confused:

Engine models, exact, named after the engine:

- ``sglang_static``: SGLang's default with DeepEP, on the ``--init-expert-location`` file path.
  Every rank collapses each replica list to its nearest replica (its own GPU, else its node when
  that is a strict subset of the list), then fills the rest with ``_fair_choices`` drawn from its
  own ``random.Random(42)`` over its own lists: bit-exact, and ranks draw independently.
- ``sglang_static_runtime``: the same table after a runtime EPLB rebalance: uncollapsed lists in
  the algorithm's ``log2phy`` order (``replica_order``; default ascending slots), one coordinated
  table for all ranks.
- ``sglang_dynamic``: ``--ep-dispatch-algorithm dynamic`` with an a2a backend: the rank's collapsed
  list, then ``randint(0, 65536) % num_valid`` per (token, column). SGLang draws from torch's
  global RNG; moelb from a seeded hash with the same distribution.
- ``sglang_dynamic_rank_invariant``: ``dynamic`` without an a2a backend: uncollapsed lists, replica
  ``token_row % num_valid``, the same on every rank (rows are global).
- ``vllm_hash``: vLLM 0.33: replica ``((token_row * 2654435769) & 0xFFFFFFFF) % replica_count``.
- ``round_robin``: replica ``(token_row + ep_rank) % replica_count`` (a TensorRT-LLM-like spread;
  its per-block offset is not modelled).
- ``equal_split``: what planners assume: each token split equally over the replicas (fractional,
  so it has no per-token slot; the simulator scores it from counts).

moelb's own, named as ours:

- ``moelb_static``: a coordinated table: the rank's own replica, else the node's replicas shared
  evenly among the node's ranks without one, else all replicas shared evenly among the ranks of
  nodes without one. Unlike SGLang's file path it never piles a node's ranks onto one replica.
- ``balanced_split`` / ``balanced_assignment``: the exact per-step split (DESIGN section 9,
  ``reference/dispatch.md`` section 7): from a step's token counts, the integer tokens per replica
  (per source rank and replica) whose largest rank load is the optimum ``ceil(T*)``, by a
  max-flow -- no LP solver, deterministic, the same on every rank that computes it.
- ``balanced`` / ``balanced_prob`` (``COLLECTIVE_DISPATCH``): that split run by an engine, one
  collective per layer and step (``dispatch_balanced``; ``select_experts(..., dispatch=)``):
  ``balanced`` all-gathers every rank's counts and sends this rank's tokens where
  ``balanced_assignment`` says (the optimum at token level); ``balanced_prob`` all-reduces the
  counts and draws each token's replica from ``balanced_fractions`` (SGLang ``lp``'s contract,
  with the exact split). The same fractions from a window's expected counts need no collective
  (``save_placement(..., fractions=)``).
- ``balanced_joint`` (``COLLECTIVE_DISPATCH``; ``dispatch_balanced_joint``): the routed replicas
  and the fused shared expert in one flow (``reference/dispatch.md`` section 7 with an
  unrestricted expert), in place of Waterfill: the shared expert is a virtual logical expert E
  with one replica in every rank's shared slot (``per_rank_shared_location``), each rank's tokens
  with a valid id count once for it, and ``balanced_assignment`` of the all-gathered [W, E + 1]
  counts places routed and shared pairs together at the optimal largest rank load of routed +
  shared work. The output is in Waterfill's per-rank shared-slot layout.

Token rows are rows within the source rank's batch, except for ``sglang_dynamic_rank_invariant``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from . import _core
from ._core import ExpertLocation, InvalidArgumentError, InvalidDTypeError

__all__ = [
    "COLLECTIVE_DISPATCH",
    "DISPATCH_ALGORITHMS",
    "DISPATCH_COST_OTHER_NODE",
    "DISPATCH_COST_OWN_RANK",
    "DISPATCH_COST_SAME_NODE",
    "ENGINE_DISPATCH",
    "EXPECTED_DISPATCH",
    "MOELB_DISPATCH",
    "TABLE_DISPATCH",
    "balanced_assignment",
    "balanced_fractions",
    "balanced_split",
    "dispatch_balanced",
    "dispatch_balanced_joint",
    "dispatch_by_assignment",
    "dispatch_by_fractions",
    "dispatch_table",
    "dispatch_tables",
    "dispatch_tokens",
    "expected_rank_loads",
    "per_rank_shared_location",
    "sglang_replica_lists",
]

#: Models of what the engines run (exact, reference/dispatch.md).
ENGINE_DISPATCH = (
    "sglang_static",
    "sglang_static_runtime",
    "sglang_dynamic",
    "sglang_dynamic_rank_invariant",
    "vllm_hash",
    "round_robin",
    "equal_split",
)
#: moelb's own dispatch.
MOELB_DISPATCH = ("moelb_static",)
DISPATCH_ALGORITHMS = ENGINE_DISPATCH + MOELB_DISPATCH
#: The models that are one table per rank.
TABLE_DISPATCH = ("sglang_static", "sglang_static_runtime", "moelb_static")
#: moelb's dispatch modes that run one collective per layer and step, and the collective each
#: takes (``dispatch_balanced``, ``select_experts``). Not models of an engine, and not in
#: ``DISPATCH_ALGORITHMS``: they need the ranks' counts, which a table or a per-token rule has not.
COLLECTIVE_DISPATCH = ("balanced", "balanced_prob", "balanced_joint")
_COLLECTIVE_OF = {
    "balanced": "all_gather",
    "balanced_prob": "all_reduce",
    "balanced_joint": "all_gather",
}

#: ``all_gather(local_counts)``: every rank's [n] int64 counts, stacked in rank order -> [W, n]
#: (n = E; E + 1 under ``balanced_joint``).
AllGather = Callable[[npt.NDArray[np.int64]], Any]
#: ``all_reduce(local_counts)``: the [E] int64 counts summed over the ranks (returned, or summed
#: in place and None returned).
AllReduce = Callable[[npt.NDArray[np.int64]], Any]


def dispatch_table(
    location: ExpertLocation,
    dispatch: str = "sglang_static",
    ep_rank: int = 0,
    seed: int = 0,
    *,
    replica_order: Any = None,
) -> npt.NDArray[np.int32]:
    """[L, E] int32: the slot rank ``ep_rank`` sends each (layer, logical expert) to under a table
    model (``sglang_static``, ``sglang_static_runtime``, ``moelb_static``).

    seed: ``moelb_static``'s seeded offsets only (SGLang's tables always use Random(42)).
    replica_order: ``sglang_static_runtime`` only: [L, E, X] int, the replica lists in the
    algorithm's order (DeepSeek's ``log2phy``), -1 padded; each row exactly the expert's slots.
    """
    return _core.dispatch_table(location, dispatch, ep_rank, _seed(seed), replica_order)


def dispatch_tables(
    location: ExpertLocation,
    dispatch: str = "sglang_static",
    *,
    seed: int = 0,
    replica_order: Any = None,
) -> npt.NDArray[np.int32]:
    """[W, L, E] int32: ``dispatch_table`` of every rank (computed in parallel)."""
    return _core.dispatch_tables(location, dispatch, _seed(seed), replica_order)


def sglang_replica_lists(
    location: ExpertLocation, ep_rank: int | None = None, *, replica_order: Any = None
) -> npt.NDArray[np.int32]:
    """[L, E, X] int32, -1 padded: the replica lists SGLang builds. With ``ep_rank`` the file
    path's per-rank collapse (a2a backend); without, the uncollapsed lists (ascending slots, or
    ``replica_order``)."""
    return _core.sglang_replica_lists(location, ep_rank, replica_order)


def dispatch_tokens(
    topk_ids: Any,
    location: ExpertLocation,
    layer: int,
    dispatch: str = "sglang_static",
    *,
    ep_rank: int | None = None,
    rank_offsets: Any = None,
    seed: int = 0,
) -> npt.NDArray[np.int32]:
    """Maps logical ids [T, C] int32 (C-contiguous) of MoE layer ``layer`` to physical slots.

    The rows come from one source rank (``ep_rank``, default 0) or, with ``rank_offsets`` (W + 1
    non-decreasing ints from 0 to T), rows ``[rank_offsets[r], rank_offsets[r + 1])`` from rank r.
    -1 stays -1; ``equal_split`` has no per-token slot and is an error here.
    """
    return _core.dispatch_tokens(
        topk_ids, location, layer, dispatch, ep_rank, rank_offsets, _seed(seed)
    )


#: The per-token costs ``balanced_assignment`` minimises among the optimal assignments: a token
#: served on its source rank (0), on another rank of the source's node (1), on another node (2).
DISPATCH_COST_OWN_RANK: int = _core.DISPATCH_COST_OWN_RANK
DISPATCH_COST_SAME_NODE: int = _core.DISPATCH_COST_SAME_NODE
DISPATCH_COST_OTHER_NODE: int = _core.DISPATCH_COST_OTHER_NODE


def balanced_split(
    counts: Any,
    location: ExpertLocation,
    fixed_loads: Any = None,
    *,
    layer: int | None = None,
    shares: str = "any",
) -> npt.NDArray[np.int64]:
    """The tokens each physical slot receives when a step's tokens are split over the replicas
    so that the largest rank load is as small as possible (ours; DESIGN section 9).

    counts: the global tokens routed to each logical expert in the step, integers >= 0: [L, E]
    for all of ``location``'s layers, or [E] with ``layer=``.
    fixed_loads: optional integers >= 0 that every rank carries besides the routed tokens (a
    shared expert, ...): [L, W] (``ep_size`` columns), or [W] with ``layer=``.
    Returns int64 [L, P] ([P] with ``layer=``). Each expert's slots sum to its count; only its
    replicas get tokens; the largest ``rank_load`` (fixed load plus the tokens of the rank's
    slots) is exactly ``ceil(T*)``, ``T*`` the optimum of the LP of ``reference/dispatch.md``
    section 7. An expert whose replicas all sit on one rank is a fixed load there; several
    replicas of one expert on one rank share its tokens evenly, lower slots first. Solved by a
    max-flow, deterministically: the same output for any thread count and on every rank that
    computes it from the same counts.

    shares: which of the optimal splits (usually many). ``"any"``: the max-flow's, the fastest;
    a vertex of the optimal set, where many experts sit wholly on one replica. ``"even"``: the
    optimal split whose replica shares are the most even (the least sum over expert ``e`` and
    rank ``g`` of ``x**2 / (n_e * m_eg)``, ``m_eg`` the expert's slots on ``g``; a min-cost flow
    with convex piecewise-linear costs: the objective's chords between integral breakpoints
    every half equal share): for fractions that serve other steps' tokens, where spreading an expert
    over its replicas hedges its own variation (``balanced_fractions``).
    """
    if not isinstance(shares, str):
        raise InvalidArgumentError(f"shares must be 'any' or 'even', got {shares!r}")
    layer = None if layer is None else _layer_index(layer, location)
    return _core.balanced_split(counts, location, fixed_loads, layer, shares)


def balanced_assignment(
    source_counts: Any,
    location: ExpertLocation,
    fixed_loads: Any = None,
    *,
    layer: int | None = None,
) -> npt.NDArray[np.int64]:
    """The tokens each source rank sends to each physical slot: the exact dispatch an engine
    runs when every rank has every rank's counts (one all-gather; ours).

    source_counts: the tokens each source rank (``ep_rank``) routed to each logical expert,
    integers >= 0: [L, W, E], or [W, E] with ``layer=``.
    fixed_loads: as in ``balanced_split``.
    Returns int64 [L, W, P] ([W, P] with ``layer=``): row ``[l, s]`` is what source rank ``s``
    sends to each slot. Every source's tokens of an expert go to that expert's replicas and sum to
    its count; the largest rank load is ``ceil(T*)`` of the summed counts (that of
    ``balanced_split``); among such assignments, the total per-token cost is the least
    (``DISPATCH_COST_OWN_RANK`` = 0 on the source rank, ``DISPATCH_COST_SAME_NODE`` = 1 on another
    rank of its node, ``DISPATCH_COST_OTHER_NODE`` = 2 on another node): a min-cost flow at that
    makespan. Deterministic like ``balanced_split``. Among equally cheap assignments (ours): each
    source's tokens of an expert go first to its own rank, then to its node's ranks, then to the
    others; a rank's tokens of an expert are split evenly over its slots of that expert (lower
    slots first), filled by its own source's share, then its node's, then the rest.
    """
    layer = None if layer is None else _layer_index(layer, location)
    return _core.balanced_assignment(source_counts, location, fixed_loads, layer)


def balanced_fractions(
    counts: Any,
    location: ExpertLocation,
    fixed_loads: Any = None,
    *,
    layer: int | None = None,
    shares: str = "even",
) -> npt.NDArray[np.float64]:
    """Each expert's share of its tokens per replica under ``balanced_split`` (ours): float64
    [L, E, X] ([E, X] with ``layer=``), X = ``location.max_replicas``, columns in the order of
    ``location.logical_to_physical`` (padding columns 0). An expert without tokens gets equal
    shares. From a step's global counts (one all-reduce, the contract of SGLang's ``lp``) or from
    a window's expected counts (offline: no per-step collective). ``counts`` and ``fixed_loads``
    as for ``balanced_split``.

    shares: ``balanced_split``'s choice among the optimal splits. ``"even"`` (the default, for
    fractions fixed over a window: each expert spread over its replicas as evenly as the optimum
    allows, which hedges its variation; about 0.15 ms per layer at EP32 and 6 ms at EP256 on one
    core) or ``"any"`` (the max-flow's vertex, microseconds: what the per-step probabilities mode
    uses, where the fractions serve the very counts they were made from)."""
    split = balanced_split(counts, location, fixed_loads, layer=layer, shares=shares)
    one = split.ndim == 1
    split = split[None] if one else split
    l2p = location.logical_to_physical
    if one:
        l2p = l2p[[_layer_index(layer, location)]]
    valid = l2p >= 0
    tokens = np.where(valid, np.take_along_axis(split[:, None, :], np.maximum(l2p, 0), axis=2), 0)
    tokens = tokens.astype(np.float64)
    total = tokens.sum(axis=2, keepdims=True)
    replicas = valid.sum(axis=2, keepdims=True)
    equal = np.where(valid, 1.0 / np.maximum(replicas, 1), 0.0)
    shares = np.where(total > 0, tokens / np.where(total > 0, total, 1.0), equal)
    return shares[0] if one else shares


def _layer_index(layer: int | None, location: ExpertLocation) -> int:
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
        raise InvalidArgumentError(f"layer must be an int, got {layer!r}")
    if not 0 <= int(layer) < location.num_layers:
        raise InvalidArgumentError(
            f"layer={layer!r} is outside [0, num_layers={location.num_layers})"
        )
    return int(layer)


def _valid_ids(topk_ids: Any, location: ExpertLocation) -> npt.NDArray[np.int32]:
    ids = np.asarray(topk_ids)
    if ids.dtype != np.int32 or ids.ndim != 2:
        raise InvalidDTypeError(
            f"topk_ids must be an int32 [T, K] array, got {ids.dtype} with shape {ids.shape}"
        )
    E = location.num_logical_experts
    bad = (ids < -1) | (ids >= E)
    if bad.any():
        row, col = (int(v[0]) for v in np.nonzero(bad))
        raise InvalidArgumentError(
            f"topk_ids[{row}, {col}] = {ids[row, col]} is not a logical expert id in [0, {E}) or -1"
        )
    return ids


def dispatch_by_fractions(
    topk_ids: Any,
    location: ExpertLocation,
    layer: int,
    fractions: Any,
    *,
    seed: int = 0,
    ep_rank: int | None = None,
    sampling: str = "systematic",
) -> npt.NDArray[np.int32]:
    """Physical ids [T, K] int32 for logical ``topk_ids`` (-1 stays -1): every (token, column)
    goes to a replica of its expert with probability proportional to ``fractions`` [E, X]
    (``balanced_fractions(..., layer=layer)``), drawn from a generator seeded by (``seed``,
    ``layer``), and ``ep_rank`` when given (so that ranks with the same seed draw independently):
    the same picks for the same inputs on every run. What an engine does after one all-reduce of
    the counts (ours, SGLang ``lp``'s contract with the exact split).

    sampling: ``"independent"``: every pair draws on its own (SGLang ``lp``'s kernel), so a
    replica's count varies binomially around its share. ``"systematic"`` (ours, the default):
    the pairs of each expert, in a random order, take the points ``(i + u) / k`` of one random
    offset ``u`` per expert (``k`` its pairs here) against the cumulative fractions: each pair
    still goes to each replica with exactly its probability, but a replica's count is its share
    of ``k`` rounded down or up -- the binomial noise of this rank's batch is gone."""
    if sampling not in ("systematic", "independent"):
        raise InvalidArgumentError(
            f"sampling must be 'systematic' or 'independent', got {sampling!r}"
        )
    layer = _layer_index(layer, location)
    key = [_seed(seed), layer]
    if ep_rank is not None:
        key.append(_ep_rank(ep_rank, location))
    ids = _valid_ids(topk_ids, location)
    l2p = location.logical_to_physical[layer]
    shares = np.asarray(fractions, dtype=np.float64)
    if shares.shape != l2p.shape:
        raise InvalidArgumentError(
            f"fractions has shape {shares.shape} but the placement's layer {layer} needs "
            f"[num_experts, max_replicas] = {l2p.shape}"
        )
    if not np.isfinite(shares).all() or (shares < 0).any() or (shares[l2p < 0] > 0).any():
        raise InvalidArgumentError(
            "fractions must be finite, >= 0, and 0 where an expert has no replica"
        )
    # Each row over its largest entry first: finite shares may still sum past the float range.
    largest = shares.max(axis=1, keepdims=True, initial=0.0)
    shares = shares / np.where(largest > 0, largest, 1.0)
    sums = shares.sum(axis=1)
    used = np.unique(ids[ids >= 0])
    if (sums[used] <= 0).any():
        expert = int(used[np.argmax(sums[used] <= 0)])
        raise InvalidArgumentError(f"fractions of expert {expert} sum to 0 but it has tokens")
    cdf = np.cumsum(shares, axis=1) / np.where(sums > 0, sums, 1.0)[:, None]
    rng = np.random.default_rng(key)
    out = np.full(ids.shape, -1, np.int32)
    valid = ids >= 0
    e = ids[valid]
    if sampling == "independent":
        u = rng.random(ids.shape)[valid]
    else:
        u = _systematic_points(e, rng, len(cdf))
    pick = (u[:, None] >= cdf[e]).sum(axis=1)
    pick = np.minimum(pick, (l2p[e] >= 0).sum(axis=1) - 1)  # rounding at the top of the cdf
    out[valid] = l2p[e, pick]
    return out


def _systematic_points(
    experts: npt.NDArray[np.int32], rng: np.random.Generator, num_experts: int
) -> npt.NDArray[np.float64]:
    """For each pair of ``experts`` (its expert per pair), a point in [0, 1): the pairs of one
    expert, in a random order, take ``(i + u_e) / k_e``, i = 0 .. k_e - 1, ``u_e`` uniform."""
    order = np.lexsort((rng.random(len(experts)), experts))  # by expert, random within
    k = np.bincount(experts, minlength=num_experts)
    first = np.cumsum(k) - k
    offset = rng.random(num_experts)
    ranked = experts[order]
    points = np.empty(len(experts))
    points[order] = (np.arange(len(experts)) - first[ranked] + offset[ranked]) / k[ranked]
    return points


def dispatch_by_assignment(
    topk_ids: Any, location: ExpertLocation, layer: int, assignment: Any
) -> npt.NDArray[np.int32]:
    """Physical ids [T, K] int32 for this rank's logical ``topk_ids`` (-1 stays -1), given its
    row of ``balanced_assignment`` ([P]: the tokens this rank sends to each slot): the (token,
    column) pairs of expert e, in row-major order, fill e's slots in ascending slot order, each
    with its assigned count. Realises the exact split at token level (ours; one all-gather of
    the per-rank counts). The assignment must have been made from these tokens: each expert's
    assigned total equals its pairs here, else ``InvalidArgumentError``."""
    layer = _layer_index(layer, location)
    ids = _valid_ids(topk_ids, location)
    row = np.asarray(assignment)
    P = location.num_physical_experts
    if row.shape != (P,) or not np.issubdtype(row.dtype, np.integer) or (row < 0).any():
        raise InvalidArgumentError(
            f"assignment must be integers >= 0 of shape ({P},) (this rank's row of "
            f"balanced_assignment), got {row.dtype} {row.shape}"
        )
    p2l = location.physical_to_logical[layer]
    E = location.num_logical_experts
    valid = ids >= 0
    flat = ids[valid]
    need = np.bincount(flat, minlength=E)
    have = np.bincount(p2l, weights=row, minlength=E).astype(np.int64)
    if not np.array_equal(need, have):
        expert = int(np.argmax(need != have))
        raise InvalidArgumentError(
            f"assignment gives expert {expert} {have[expert]} tokens but topk_ids has "
            f"{need[expert]} of it: it was not made from these tokens (layer {layer})"
        )
    # Slots grouped by expert in ascending slot order, with their cumulative counts.
    slots = np.argsort(p2l, kind="stable")
    cumulative = np.cumsum(row[slots])
    first = np.searchsorted(p2l[slots], np.arange(E))  # each expert's first entry in `slots`
    before = np.where(first > 0, cumulative[np.maximum(first - 1, 0)], 0)
    order = np.argsort(flat, kind="stable")
    rank_in_expert = np.empty(len(flat), np.int64)
    rank_in_expert[order] = np.arange(len(flat)) - np.searchsorted(flat[order], flat[order])
    position = before[flat] + rank_in_expert
    out = np.full(ids.shape, -1, np.int32)
    out[valid] = slots[np.searchsorted(cumulative, position, side="right")].astype(np.int32)
    return out


def check_collective_dispatch(dispatch: Any, all_gather: Any, all_reduce: Any) -> bool:
    """Whether ``dispatch`` is one of ``COLLECTIVE_DISPATCH``; raises ``InvalidArgumentError``
    unless exactly its collective is given (a callable), and none for any other dispatch."""
    needs = _COLLECTIVE_OF.get(dispatch) if isinstance(dispatch, str) else None
    for name, function in (("all_gather", all_gather), ("all_reduce", all_reduce)):
        if function is None:
            continue
        if needs is None:
            raise InvalidArgumentError(
                f"{name} is given but dispatch={dispatch!r} runs no collective: it is for "
                f"dispatch='balanced' or 'balanced_joint' (all_gather) or 'balanced_prob' "
                "(all_reduce)"
            )
        if name != needs:
            raise InvalidArgumentError(
                f"dispatch={dispatch!r} takes {needs}=, not {name}= ('balanced' and "
                "'balanced_joint' all-gather the ranks' counts, 'balanced_prob' all-reduces them)"
            )
        if not callable(function):
            raise InvalidArgumentError(f"{name} must be callable, got {type(function).__name__}")
    if needs is not None and (all_gather if needs == "all_gather" else all_reduce) is None:
        raise InvalidArgumentError(
            f"dispatch={dispatch!r} needs {needs}=: a callable over the EP group, e.g. "
            f"moelb.torch_{needs}()"
        )
    return needs is not None


def _ep_rank(ep_rank: Any, location: ExpertLocation) -> int:
    W = location.ep_size
    if isinstance(ep_rank, bool) or not isinstance(ep_rank, (int, np.integer)):
        raise InvalidArgumentError(f"ep_rank must be an integer, got {ep_rank!r}")
    if not 0 <= int(ep_rank) < W:
        raise InvalidArgumentError(f"ep_rank={ep_rank} is outside [0, ep_size={W})")
    return int(ep_rank)


def _collective_output(
    result: Any, name: str, shape: tuple[int, ...], meaning: str
) -> npt.NDArray[np.int64]:
    """The counts a collective returned (NumPy or a torch tensor on any device) as int64, or an
    InvalidArgumentError naming the callable and what it returned."""
    if hasattr(result, "detach"):  # a torch tensor
        result = result.detach().cpu().numpy()
    array = np.asarray(result) if result is not None else None
    if array is None or array.shape != shape or array.dtype.kind not in "iu":
        got = "None" if array is None else f"{array.dtype} of shape {array.shape}"
        raise InvalidArgumentError(
            f"{name} must return {meaning}: integers of shape {shape}, got {got}"
        )
    if array.dtype == np.uint64 and (array > np.iinfo(np.int64).max).any():
        raise InvalidArgumentError(f"{name} returned counts beyond int64")
    counts = np.ascontiguousarray(array, dtype=np.int64)
    if (counts < 0).any():
        raise InvalidArgumentError(f"{name} returned a negative count ({int(counts.min())})")
    return counts


def dispatch_balanced(
    topk_ids: Any,
    location: ExpertLocation,
    layer: int,
    dispatch: str = "balanced",
    *,
    ep_rank: int = 0,
    all_gather: AllGather | None = None,
    all_reduce: AllReduce | None = None,
    seed: int = 0,
) -> npt.NDArray[np.int32]:
    """Physical ids [T, K] int32 for this rank's logical ``topk_ids`` [T, K] int32 (-1 stays -1)
    of MoE layer ``layer``, by moelb's per-step balanced dispatch (ours; DESIGN section 9). Runs
    one collective, which every rank of the EP group must reach for every layer and step, an
    empty batch included.

    dispatch='balanced' (exact): ``all_gather(local_counts)`` with this rank's pairs per
    logical expert ([E] int64) must return every rank's, [W, E] integers in rank order (a NumPy
    array or a tensor; ``moelb.torch_all_gather()``). Every rank computes the same
    ``balanced_assignment`` and sends its tokens by its row (``dispatch_by_assignment``): the
    ranks' loads together have the largest rank load of ``balanced_split`` of the summed counts,
    the optimum at token level, with the fewest tokens leaving their rank, then node.
    dispatch='balanced_prob': ``all_reduce(local_counts)`` must return the sum over the ranks,
    [E] integers (or None after summing the buffer in place; ``moelb.torch_all_reduce()``).
    Each (token, column) then draws a replica with the probabilities of
    ``balanced_fractions`` of the sum (``dispatch_by_fractions``, seeded by ``seed``, ``layer``
    and ``ep_rank``): the optimum in expectation, SGLang ``lp``'s contract with the exact split.
    Pass a new ``seed`` every step (e.g. the step number): with a fixed seed a steady batch draws
    the same picks every step.

    ep_rank: this rank in [0, ``location.ep_size``): its row of the gathered counts (checked to
    be its own counts, so a gather out of rank order is refused).

    Every rank must reach the collective: an error raised on one rank before it (bad ids, layer,
    ep_rank) leaves the others waiting in it until the process group's timeout.
    """
    if not isinstance(location, ExpertLocation):
        raise InvalidArgumentError(
            f"location must be an ExpertLocation, got {type(location).__name__}"
        )
    if dispatch not in COLLECTIVE_DISPATCH:
        raise InvalidArgumentError(
            f"dispatch={dispatch!r} is not one of moelb's collective modes {COLLECTIVE_DISPATCH}"
        )
    if dispatch == "balanced_joint":
        raise InvalidArgumentError(
            "dispatch='balanced_joint' also places the shared expert: call "
            "dispatch_balanced_joint, which returns the shared column too"
        )
    check_collective_dispatch(dispatch, all_gather, all_reduce)
    layer = _layer_index(layer, location)
    rank = _ep_rank(ep_rank, location)
    seed = _seed(seed)
    ids = _valid_ids(topk_ids, location)
    E = location.num_logical_experts
    local = np.bincount(ids[ids >= 0], minlength=E).astype(np.int64)
    if dispatch == "balanced":
        assert all_gather is not None  # checked above
        gathered = _gathered_counts(all_gather, local, rank, location.ep_size)
        assignment = balanced_assignment(gathered, location, layer=layer)
        return dispatch_by_assignment(ids, location, layer, assignment[rank])
    assert all_reduce is not None  # checked above
    buffer = local.copy()
    result = all_reduce(buffer)
    summed = _collective_output(
        buffer if result is None else result, "all_reduce", (E,), "the counts summed over ranks"
    )
    if (summed < local).any():
        expert = int(np.argmax(summed < local))
        raise InvalidArgumentError(
            f"all_reduce returned {summed[expert]} tokens of expert {expert} but this rank alone "
            f"has {local[expert]}: it must return the sum over the ranks"
        )
    # Per step the max-flow's split (fast); systematic sampling realises it within rounding.
    fractions = balanced_fractions(summed, location, layer=layer, shares="any")
    return dispatch_by_fractions(ids, location, layer, fractions, seed=seed, ep_rank=rank)


def _gathered_counts(
    all_gather: AllGather, local: npt.NDArray[np.int64], rank: int, num_ranks: int
) -> npt.NDArray[np.int64]:
    """Every rank's counts [W, n] from ``all_gather`` of this rank's ``local`` [n], checked: the
    shape, integers >= 0, and row ``rank`` equal to ``local`` (a gather out of rank order is
    refused)."""
    gathered = _collective_output(
        all_gather(local.copy()),
        "all_gather",
        (num_ranks, len(local)),
        "every rank's counts in rank order",
    )
    if not np.array_equal(gathered[rank], local):
        raise InvalidArgumentError(
            f"all_gather returned a row {rank} (ep_rank) that is not this rank's counts: "
            "its rows must be the ranks' counts in rank order (row r from rank r)"
        )
    return gathered


def per_rank_shared_location(
    location: ExpertLocation, *, layer: int | None = None
) -> ExpertLocation:
    """``location`` in the per-rank shared-slot layout (DESIGN section 1; Waterfill's, DESIGN
    section 5): rank r's S routed slots, then one slot holding a virtual logical expert E (the
    fused shared expert), so routed slot p becomes ``p + p // S`` and rank r's shared slot is
    ``r * (S + 1) + S``. A placement of E + 1 logical experts on W * (S + 1) slots, the same
    ``ep_size`` and ``num_nodes``: the joint flow of ``balanced_joint`` (ours) solves on it.

    layer: the placement of that layer only (one layer, index 0), what one engine call needs;
    default all of ``location``'s layers.
    """
    if not isinstance(location, ExpertLocation):
        raise InvalidArgumentError(
            f"location must be an ExpertLocation, got {type(location).__name__}"
        )
    p2l = location.physical_to_logical
    if layer is not None:
        p2l = p2l[[_layer_index(layer, location)]]
    L, W = p2l.shape[0], location.ep_size
    S, E = location.num_local_physical_experts, location.num_logical_experts
    shared = np.full((L, W, 1), E, dtype=np.int32)
    joint = np.concatenate([p2l.reshape(L, W, S), shared], axis=2).reshape(L, W * (S + 1))
    return ExpertLocation(np.ascontiguousarray(joint), E + 1, W, location.num_nodes)


def _with_shared_expert_column(
    topk_ids: npt.NDArray[np.int32], num_logical_experts: int
) -> npt.NDArray[np.int32]:
    """[T, K + 1] int32: logical ``topk_ids`` [T, K] with a last column holding the shared
    expert as logical expert ``num_logical_experts`` (E) on every row with a valid id, -1 on a
    row whose ids are all -1 (padding carries no shared token): the ids ``balanced_joint``
    dispatches on ``per_rank_shared_location``."""
    shared = np.where((topk_ids >= 0).any(axis=1), num_logical_experts, -1).astype(np.int32)
    return np.ascontiguousarray(np.concatenate([topk_ids, shared[:, None]], axis=1), np.int32)


def dispatch_balanced_joint(
    topk_ids: Any,
    location: ExpertLocation,
    layer: int,
    *,
    ep_rank: int = 0,
    all_gather: AllGather | None = None,
) -> npt.NDArray[np.int32]:
    """Physical ids [T, K + 1] int32 for this rank's logical routed ``topk_ids`` [T, K] int32
    (-1 for padding) of MoE layer ``layer``, the routed replicas and the fused shared expert
    balanced in one flow (ours; DESIGN section 9, ``reference/dispatch.md`` section 7 with an
    unrestricted expert). Runs one collective, which every rank of the EP group must reach for
    every layer and step, an empty batch included; every rank must use this mode in the step.

    The shared expert is a virtual logical expert E with one replica in every rank's shared slot
    (``per_rank_shared_location``); every row with a valid routed id carries one shared token
    (padding carries none). ``all_gather(local_counts)`` with this rank's pairs per expert,
    [E + 1] int64 (routed per logical expert, then its shared tokens), must return every rank's,
    [W, E + 1] integers in rank order (``moelb.torch_all_gather()``). Every rank computes the
    same ``balanced_assignment`` of them on the joint placement and sends its (token, column)
    pairs, routed and shared, by its row (``dispatch_by_assignment``): the ranks' routed + shared
    loads together have the optimal largest rank load (``ceil(T*)`` of the summed joint
    counts), and among such placements the fewest pairs, routed and shared alike, leave their
    rank, then their node.

    Output: Waterfill's per-rank shared-slot layout (``WaterfillBalancer.expand``,
    ``remap_topk_for_per_rank_shared_slots``): a routed pair on slot p of ``location`` is
    ``p + p // S``; the last column is rank r's shared slot ``r * (S + 1) + S``; -1 where the id
    was -1 and in the shared column of a row without a valid id. ep_rank: this rank, its row of
    the gathered counts (checked to be its own counts).
    """
    if not isinstance(location, ExpertLocation):
        raise InvalidArgumentError(
            f"location must be an ExpertLocation, got {type(location).__name__}"
        )
    check_collective_dispatch("balanced_joint", all_gather, None)
    assert all_gather is not None  # checked above
    layer = _layer_index(layer, location)
    rank = _ep_rank(ep_rank, location)
    ids = _valid_ids(topk_ids, location)
    E = location.num_logical_experts
    joint_ids = _with_shared_expert_column(ids, E)
    local = np.bincount(joint_ids[joint_ids >= 0], minlength=E + 1).astype(np.int64)
    gathered = _gathered_counts(all_gather, local, rank, location.ep_size)
    joint = per_rank_shared_location(location, layer=layer)
    assignment = balanced_assignment(gathered, joint, layer=0)
    return dispatch_by_assignment(joint_ids, joint, 0, assignment[rank])


def _seed(seed: int) -> int:
    """A seed the core takes (a non-negative 63-bit integer), else InvalidArgumentError."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise _core.InvalidArgumentError(f"seed must be an integer, got {seed!r}")
    if not 0 <= int(seed) < 2**63:
        raise _core.InvalidArgumentError(f"seed must be in [0, 2**63), got {seed}")
    return int(seed)


#: The models whose expected per-GPU load follows from the expert loads alone.
EXPECTED_DISPATCH = (
    "equal_split",
    "sglang_static",
    "sglang_static_runtime",
    "sglang_dynamic",
    "moelb_static",
)


def expected_rank_loads(
    load: Any, location: ExpertLocation, dispatch: str = "sglang_static", *, seed: int = 0
) -> npt.NDArray[np.float64]:
    """[L, W] float64: the per-GPU load a dispatch model realises in expectation when every
    expert's load ``load`` ([L, E], >= 0) comes from all source ranks evenly.

    Exact for the table models (each rank's share goes to its table's slot), for
    ``sglang_dynamic`` (each rank's share split over its collapsed list with the weights of
    ``randint(0, 65536) % n``) and for ``equal_split`` (= ``moelb.rank_loads``). The other models
    pick by token row, so their load depends on the batch, not on the expert loads alone: use
    ``moelb.simulate`` or ``dispatch_tokens`` on real batches.
    """
    if dispatch not in EXPECTED_DISPATCH:
        raise _core.InvalidArgumentError(
            f"dispatch={dispatch!r}: the expected load of a model that picks by token row "
            f"depends on the batch; expected loads exist for {EXPECTED_DISPATCH}"
        )
    values = np.asarray(load, dtype=np.float64)
    L, E, W = location.num_layers, location.num_logical_experts, location.ep_size
    if values.shape != (L, E):
        raise _core.InvalidArgumentError(
            f"load has shape {values.shape} but the location has {L} layers and {E} experts"
        )
    bad = ~np.isfinite(values) | (values < 0)
    if bad.any():
        layer, expert = (int(i) for i in np.argwhere(bad)[0])
        raise _core.InvalidArgumentError(
            f"load[{layer}, {expert}] = {values[layer, expert]} is not a finite load >= 0"
        )
    if values.sum(axis=1).max(initial=0.0) > 1e300:
        raise _core.InvalidArgumentError(
            "load sums to more than 1e300 in a layer: per-GPU loads would overflow"
        )
    S = location.num_local_physical_experts
    out = np.zeros((L, W))
    if dispatch == "equal_split":
        _spread(out, location.logical_to_physical, values, S, uniform_pick=True)
        return out
    if dispatch == "sglang_dynamic":
        for rank in range(W):
            _spread(out, sglang_replica_lists(location, rank), values / W, S, uniform_pick=False)
        return out
    tables = dispatch_tables(location, dispatch, seed=seed)  # [W, L, E]
    layers = np.broadcast_to(np.arange(L)[:, None], (L, E))
    for rank in range(W):
        np.add.at(out, (layers, tables[rank] // S), values / W)
    return out


def _spread(
    out: npt.NDArray[np.float64],
    lists: npt.NDArray[np.int32],
    share: npt.NDArray[np.float64],
    S: int,
    uniform_pick: bool,
) -> None:
    """Adds each expert's ``share`` to the GPUs of its replica ``lists`` [L, E, X]: equally, or
    with SGLang's ``randint(0, 65536) % n`` weights (index x: (65536 // n + (x < 65536 % n)) /
    65536)."""
    count = (lists >= 0).sum(axis=2)  # [L, E]
    layers = np.broadcast_to(np.arange(lists.shape[0])[:, None], count.shape)
    for x in range(lists.shape[2]):
        slot = lists[:, :, x]
        valid = slot >= 0
        n = np.maximum(count, 1)
        weight = 1.0 / n if uniform_pick else (65536 // n + (x < 65536 % n)) / 65536.0
        np.add.at(out, (layers[valid], slot[valid] // S), (share * weight)[valid])
