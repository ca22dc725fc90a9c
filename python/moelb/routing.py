"""Top-k routing: ``select_experts``, the DeepSeek-V4 ``HashRouter`` and the per-rank shared-slot
remap. The work runs in the C++ core with the GIL released, in parallel over tokens."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from . import _core
from ._core import (
    ExpertDistributionRecorder,
    ExpertLocation,
    InvalidArgumentError,
    TopKConfig,
)
from .dispatch import (
    COLLECTIVE_DISPATCH,
    AllGather,
    AllReduce,
    _ep_rank,
    _layer_index,
    check_collective_dispatch,
    dispatch_balanced,
    dispatch_balanced_joint,
)
from .waterfill import WaterfillBalancer

__all__ = ["HashRouter", "TopKOutput", "remap_topk_for_per_rank_shared_slots", "select_experts"]


class TopKOutput(NamedTuple):
    """The result of routing T tokens.

    topk_ids: [T, K + F] int32 expert ids (physical slots when a location was given), -1 for
        padded rows; the fused shared expert, if any, is the last column.
    topk_weights: [T, K + F] float32 combine weights, 0 for padded rows.
    recorder_topk_ids: [T, K] int32, the routed columns only: what the expert distribution
        recorder counts (never the shared expert).
    """

    topk_ids: npt.NDArray[np.int32]
    topk_weights: npt.NDArray[np.float32]
    recorder_topk_ids: npt.NDArray[np.int32]


def select_experts(
    router_logits: Any,
    config: TopKConfig,
    correction_bias: Any = None,
    num_token_non_padded: int | None = None,
    location: ExpertLocation | None = None,
    layer: int | None = None,
    ep_rank: int = 0,
    recorder: ExpertDistributionRecorder | None = None,
    *,
    dispatch: str = "sglang_static",
    seed: int = 0,
    waterfill: WaterfillBalancer | None = None,
    is_decode: bool = False,
    num_tokens: int | None = None,
    all_gather: AllGather | None = None,
    all_reduce: AllReduce | None = None,
) -> TopKOutput:
    """Routes tokens to their top-k experts.

    router_logits: [T, E] float32, C-contiguous (a NumPy array or a CPU torch tensor; never
        copied or converted: a wrong dtype raises ``InvalidDTypeError``).
    config: the layer's ``TopKConfig``.
    correction_bias: [E] (DeepSeek-V3's e_score_correction_bias) added to the scores for
        selection only; the weights are the unbiased scores.
    num_token_non_padded: rows at or after it are padding: ids -1, weights 0.
    location, layer, ep_rank: map logical ids to physical slots of ``location`` for MoE layer
        ``layer`` as seen from rank ``ep_rank``, with ``dispatch`` one of
        ``moelb.DISPATCH_ALGORITHMS`` but 'equal_split' (default 'sglang_static': SGLang's
        table on the --init-expert-location path; see ``moelb.dispatch``; ``seed`` seeds the
        per-token draws of 'sglang_dynamic' and moelb_static's offsets). The fused shared column
        then gets id P.
    dispatch='balanced' / 'balanced_prob' (``moelb.COLLECTIVE_DISPATCH``, ours): the step's
        tokens split over the replicas at the optimal largest rank load, with one collective
        over the EP group that every rank must run for every layer and step (see
        ``moelb.dispatch_balanced``). 'balanced' takes ``all_gather`` (this rank's [E] int64
        counts -> every rank's [W, E], e.g. ``moelb.torch_all_gather()``) and realises the
        optimum at token level; 'balanced_prob' takes ``all_reduce`` ([E] int64 -> the sum, e.g.
        ``moelb.torch_all_reduce()``) and draws each token's replica with the optimal
        fractions, seeded by ``seed``, ``layer`` and ``ep_rank`` (pass a new ``seed`` every
        step, e.g. the step number: with a fixed seed a steady batch draws the same picks each
        step). Both need ``location`` and ``layer``; ``ep_rank`` is this rank's row of the
        gather. Every rank must reach the collective: an error raised on one rank before it
        (bad ids, layer, ep_rank) leaves the others waiting in it.
    dispatch='balanced_joint' (ours): the routed replicas and the fused shared expert balanced
        in one flow, in place of Waterfill's placement of the shared expert (see
        ``moelb.dispatch_balanced_joint``): one ``all_gather`` of this rank's [E + 1] int64
        counts (routed per expert, then its tokens with a valid id) -> [W, E + 1]. Needs
        ``num_fused_shared_experts=1`` and ``waterfill``, which gives the output's layout only:
        ids and weights exactly as ``waterfill.expand`` lays them out after
        ``dispatch='balanced'`` (routed slot p as ``p + p // S``, the shared column at a rank's
        shared slot ``r * (S + 1) + S`` with ``waterfill.shared_weight``; -1 / 0 on rows
        without a valid id), so an engine switches between the two modes by ``dispatch`` alone.
        Our rule: the joint flow replaces Waterfill's plan, so the balancer's ``mode``, its
        ``all_reduce`` and the ``is_decode`` / ``num_tokens`` rules are not used (no
        all-reduce runs, ``waterfill.last_plan`` is left as it was); its ``ep_size`` and
        ``ep_rank`` must be the location's and ``ep_rank``'s. ``recorder_topk_ids`` are the
        routed slots of ``location`` in [0, P), as under 'balanced'.
    recorder: an ``ExpertDistributionRecorder`` that counts the routed columns
        (``recorder_topk_ids``, never the shared column) into its current layer scope; with
        ``layer`` given, that scope must be ``layer``. The ids must be slots of the recorder's
        placement: ``location`` must equal ``recorder.location``, or, without a location, the
        recorder must count logical ids as slots (built from a shape ``(L, E)``); anything else
        raises ``InvalidArgumentError`` naming ``location`` and counts nothing.
    waterfill: a ``WaterfillBalancer`` that appends the shared column after the dispatch (any
        dispatch, the balanced ones included); needs ``num_fused_shared_experts=1``; with a
        ``location``, its ``ep_size`` must be the location's, and under a collective dispatch its
        ``ep_rank`` must be ``ep_rank``. Under 'balanced_joint' it is required and gives the
        layout only (above).

    Columns are ordered by descending selection score; ties go to the lowest expert id; a NaN
    logit never wins a slot. Deterministic for any thread count.
    """
    collective = _check_collective(dispatch, location, layer, ep_rank, all_gather, all_reduce)
    _check_shared(
        waterfill, dispatch, config.num_fused_shared_experts, router_logits, location, ep_rank
    )
    ids, weights, recorder_ids = _core.select_experts(
        router_logits,
        config,
        correction_bias,
        num_token_non_padded,
        *_core_dispatch(collective, location, layer, ep_rank, dispatch),
        seed,
    )
    return _after_routing(
        TopKOutput(ids, weights, recorder_ids),
        router_logits,
        location=location,
        layer=layer,
        ep_rank=ep_rank,
        dispatch=dispatch if collective else None,
        seed=seed,
        all_gather=all_gather,
        all_reduce=all_reduce,
        recorder=recorder,
        waterfill=waterfill,
        num_tokens=num_tokens,
        is_decode=is_decode,
    )


def _core_dispatch(
    collective: bool,
    location: ExpertLocation | None,
    layer: int | None,
    ep_rank: int,
    dispatch: str,
) -> tuple[ExpertLocation | None, int | None, int, str]:
    """The core router's (location, layer, ep_rank, dispatch): for a collective dispatch it
    routes to logical ids (no location), which _after_routing then dispatches."""
    if collective:
        return None, None, 0, "sglang_static"
    return location, layer, ep_rank, dispatch


def _after_routing(
    out: TopKOutput,
    router_logits: Any,
    *,
    location: ExpertLocation | None,
    layer: int | None,
    ep_rank: int,
    dispatch: str | None,
    seed: int,
    all_gather: Any,
    all_reduce: Any,
    recorder: Any,
    waterfill: Any,
    num_tokens: int | None,
    is_decode: bool,
) -> TopKOutput:
    """What select_experts and HashRouter.select do after the core routed: a collective
    dispatch (``dispatch`` given: the core returned logical ids), the recorder, Waterfill (whose
    layout 'balanced_joint' fills itself)."""
    ids, weights, recorder_ids = out
    joint = dispatch == "balanced_joint"
    if dispatch is not None:
        if location is None or layer is None:  # _check_collective refused this already
            raise InvalidArgumentError(f"dispatch={dispatch!r} needs location and layer")
        if joint:
            ids, weights, recorder_ids = _dispatch_joint(
                weights,
                recorder_ids,
                router_logits,
                location,
                layer,
                ep_rank,
                all_gather,
                waterfill.shared_weight,
            )
        else:
            ids, recorder_ids = _dispatch_collective(
                ids,
                recorder_ids,
                router_logits,
                location,
                layer,
                ep_rank,
                dispatch,
                seed,
                all_gather,
                all_reduce,
            )
    if recorder is not None:
        _record(recorder, recorder_ids, router_logits, location, layer)
    if waterfill is not None and not joint:
        ids, weights = _expand(waterfill, recorder_ids, weights, num_tokens, is_decode)
    return TopKOutput(ids, weights, recorder_ids)


def _check_collective(
    dispatch: Any,
    location: ExpertLocation | None,
    layer: int | None,
    ep_rank: int,
    all_gather: Any,
    all_reduce: Any,
) -> bool:
    """Whether ``dispatch`` is a collective mode; checks it has its collective (and that no
    other dispatch got one), a location, a layer and an ep_rank of it, before any routing."""
    if not check_collective_dispatch(dispatch, all_gather, all_reduce):
        return False
    if not isinstance(location, ExpertLocation):
        raise InvalidArgumentError(
            f"dispatch={dispatch!r} needs location= (an ExpertLocation) and layer=: it "
            f"splits each expert's tokens over its replicas, got location={location!r}"
        )
    if layer is None:
        raise InvalidArgumentError(
            f"layer is required when a location is given (the MoE layer whose placement maps "
            f"the ids; dispatch={dispatch!r})"
        )
    _layer_index(layer, location)
    _ep_rank(ep_rank, location)
    return True


def _dispatch_collective(
    ids: npt.NDArray[np.int32],
    logical: npt.NDArray[np.int32],
    router_logits: Any,
    location: ExpertLocation,
    layer: int,
    ep_rank: int,
    dispatch: str,
    seed: int,
    all_gather: AllGather | None,
    all_reduce: AllReduce | None,
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32]]:
    """The routed columns of ``ids`` (logical, from routing without a location) replaced by the
    balanced dispatch's physical slots, the fused shared column by id P as with the engines'
    models; returns (ids, routed physical ids for the recorder)."""
    _check_logits_experts(router_logits, location)
    routed = dispatch_balanced(
        logical,
        location,
        layer,
        dispatch,
        ep_rank=ep_rank,
        all_gather=all_gather,
        all_reduce=all_reduce,
        seed=seed,
    )
    K = routed.shape[1]
    ids[:, :K] = routed
    if ids.shape[1] > K:  # the fused shared expert: id E without a location, P with one
        shared = ids[:, K:]
        shared[shared >= 0] = location.num_physical_experts
    return ids, routed


def _check_logits_experts(router_logits: Any, location: ExpertLocation) -> None:
    E = location.num_logical_experts
    num_experts = int(router_logits.shape[1])
    if num_experts != E:
        raise InvalidArgumentError(
            f"router_logits has {num_experts} experts but the location has num_logical_experts={E}"
        )


def _dispatch_joint(
    weights: npt.NDArray[np.float32],
    logical: npt.NDArray[np.int32],
    router_logits: Any,
    location: ExpertLocation,
    layer: int,
    ep_rank: int,
    all_gather: AllGather | None,
    shared_weight: float,
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32], npt.NDArray[np.int32]]:
    """'balanced_joint' on the core's logical routed ids: (ids [T, K + 1] and weights in
    Waterfill's layout, the routed slots of ``location`` for the recorder)."""
    _check_logits_experts(router_logits, location)
    ids = dispatch_balanced_joint(logical, location, layer, ep_rank=ep_rank, all_gather=all_gather)
    K = logical.shape[1]
    routed = ids[:, :K]
    slots_per_rank = location.num_local_physical_experts
    recorder_ids = np.where(routed >= 0, routed - routed // (slots_per_rank + 1), -1)
    out_weights = np.zeros((ids.shape[0], K + 1), np.float32)
    out_weights[:, :K] = np.where(routed >= 0, weights[:, :K], 0.0)
    out_weights[ids[:, K] >= 0, K] = shared_weight
    return ids, out_weights, np.ascontiguousarray(recorder_ids, np.int32)


def _record(
    recorder: ExpertDistributionRecorder,
    recorder_ids: npt.NDArray[np.int32],
    router_logits: Any,
    location: ExpertLocation | None,
    layer: int | None,
) -> None:
    """Counts the routed ids once they are known to be slots of the recorder's placement (the
    logits passed the core's checks, so they have a [T, E] shape)."""
    recorder.check_id_space(location, int(router_logits.shape[1]))
    recorder.on_select_experts(recorder_ids, layer)


def _check_shared(
    waterfill: Any,
    dispatch: Any,
    num_fused_shared_experts: int,
    router_logits: Any,
    location: ExpertLocation | None,
    ep_rank: int,
) -> None:
    """Checks ``waterfill`` (when given, or required by 'balanced_joint') before any routing or
    collective; ``_check_collective`` has checked location and ep_rank for a collective mode."""
    if dispatch == "balanced_joint" and waterfill is None:
        raise InvalidArgumentError(
            "dispatch='balanced_joint' needs waterfill= (a WaterfillBalancer for this layer and "
            "rank): the routed and shared expert are returned in its per-rank shared-slot layout"
        )
    if waterfill is None:
        return
    _check_waterfill(waterfill, num_fused_shared_experts, router_logits, location)
    if location is None:
        return
    # The layout p + p // S needs the location's ranks under any dispatch; a collective mode
    # also needs this rank's (its row of the gather is the rank Waterfill lays out for).
    collective = dispatch in COLLECTIVE_DISPATCH
    if waterfill.ep_size != location.ep_size or (collective and waterfill.ep_rank != ep_rank):
        raise InvalidArgumentError(
            f"waterfill has ep_size={waterfill.ep_size}, ep_rank={waterfill.ep_rank} but "
            f"dispatch={dispatch!r} runs on the location's ep_size={location.ep_size} "
            f"as ep_rank={ep_rank}: they must agree"
        )


def _check_waterfill(
    waterfill: WaterfillBalancer,
    num_fused_shared_experts: int,
    router_logits: Any,
    location: ExpertLocation | None,
) -> None:
    if not isinstance(waterfill, WaterfillBalancer):
        raise InvalidArgumentError(
            f"waterfill must be a WaterfillBalancer, got {type(waterfill).__name__}"
        )
    if num_fused_shared_experts != 1:
        raise InvalidArgumentError(
            "waterfill balances a fused shared expert: it needs num_fused_shared_experts=1, "
            f"got {num_fused_shared_experts}"
        )
    shape = getattr(router_logits, "shape", None)
    slots = location.num_physical_experts if location is not None else None
    if slots is None and shape is not None and len(shape) == 2:
        slots = int(shape[1])
    if slots is not None and waterfill.num_physical_experts != slots:
        where = "location" if location is not None else "router_logits"
        raise InvalidArgumentError(
            f"waterfill has num_physical_experts={waterfill.num_physical_experts} but the "
            f"routed ids are slots of {slots} experts (from {where})"
        )


def _expand(
    waterfill: WaterfillBalancer,
    routed_ids: npt.NDArray[np.int32],
    weights: npt.NDArray[np.float32],
    num_tokens: int | None,
    is_decode: bool,
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]:
    routed_weights = np.ascontiguousarray(weights[:, : routed_ids.shape[1]])
    return waterfill.expand(routed_ids, routed_weights, num_tokens, is_decode)


class HashRouter(_core.HashRouter):
    """The DeepSeek-V4 hash router: the routed experts of a token are ``tid2eid[token id]``.

    ``HashRouter(tid2eid, scoring="sqrtsoftplus", routed_scaling_factor=1.0,
    num_fused_shared_experts=0, apply_routed_scaling_factor_on_output=False, num_experts=None)``:
    tid2eid is [vocab_size, top_k] integer expert ids. Weights are the looked-up experts' scores,
    renormalized to sum 1 except under softmax scoring (then they stay probabilities over all
    experts, as in SGLang); rsf and the fused shared column follow ``TopKConfig``.
    """

    def select(  # type: ignore[override]
        self,
        router_logits: Any,
        input_ids: Any,
        num_token_non_padded: int | None = None,
        location: ExpertLocation | None = None,
        layer: int | None = None,
        ep_rank: int = 0,
        recorder: ExpertDistributionRecorder | None = None,
        *,
        dispatch: str = "sglang_static",
        seed: int = 0,
        waterfill: WaterfillBalancer | None = None,
        is_decode: bool = False,
        num_tokens: int | None = None,
        all_gather: AllGather | None = None,
        all_reduce: AllReduce | None = None,
    ) -> TopKOutput:
        """Routes tokens by token id. router_logits: [T, E] float32; input_ids: [T] int32 or
        int64, each in [0, vocab_size) (out-of-range ids raise ``InvalidArgumentError``); the rest
        as ``select_experts`` (including Waterfill mode, which needs
        ``num_fused_shared_experts=1``, the balanced dispatch with ``all_gather`` /
        ``all_reduce``, which SGLang's ``lp`` does not offer for V4, and 'balanced_joint' with
        ``all_gather`` and ``waterfill``). Columns follow tid2eid's order."""
        collective = _check_collective(dispatch, location, layer, ep_rank, all_gather, all_reduce)
        _check_shared(
            waterfill, dispatch, self.num_fused_shared_experts, router_logits, location, ep_rank
        )
        ids, weights, recorder_ids = super().select(
            router_logits,
            input_ids,
            num_token_non_padded,
            *_core_dispatch(collective, location, layer, ep_rank, dispatch),
            seed,
        )
        return _after_routing(
            TopKOutput(ids, weights, recorder_ids),
            router_logits,
            location=location,
            layer=layer,
            ep_rank=ep_rank,
            dispatch=dispatch if collective else None,
            seed=seed,
            all_gather=all_gather,
            all_reduce=all_reduce,
            recorder=recorder,
            waterfill=waterfill,
            num_tokens=num_tokens,
            is_decode=is_decode,
        )


def remap_topk_for_per_rank_shared_slots(
    topk_ids: Any,
    num_physical_experts: int,
    ep_size: int,
    ep_rank: int,
    num_fused_shared_experts: int = 1,
) -> npt.NDArray[np.int32]:
    """The per-rank shared-slot layout of DeepEP-class backends (each rank: S routed slots, then
    F shared slots). topk_ids: [T, K + F] int32 with physical routed ids in the first K columns.
    Returns a new array: routed p -> p + (p // S) * F, shared column j -> ep_rank * (S + F) + S + j;
    rows that are all padding (-1) stay -1 everywhere."""
    return _core.remap_topk_for_per_rank_shared_slots(
        topk_ids, num_physical_experts, ep_size, ep_rank, num_fused_shared_experts
    )
