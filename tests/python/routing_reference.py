"""A vectorised NumPy reference of moelb's routers, written from the specification (DESIGN.md
section 1, reference/routing_waterfill.md sections 4 and 6), independent of moelb.

Everything is computed in float64 from the float32 logits; outputs are cast like moelb's (int32
ids, float32 weights). ``reference_select_experts`` also returns, per row, the smallest *relative
gap* that decided the selection, so tests can keep to inputs on which float32 rounding cannot
change the chosen experts (``make_tie_free_logits``).

Semantics (moelb's):

* scores: softmax over the row | sigmoid | sqrt(softplus(x)) with softplus(x) = x if x > 20 else
  log1p(exp(x)); NaN logits count as -inf (score 0) and can never win a slot (choice -inf);
  +inf counts as the largest float32.
* choice = score + correction_bias (selection); weights are the unbiased scores.
* grouped: contiguous groups of E / num_groups experts; group score = sum of the two best choice
  values (a duplicated maximum counts twice; a group of one expert scores its choice) or the
  best one; the topk_group best groups are kept (ties -> lowest group id); top_k among the
  experts of kept groups.
* columns in descending choice, ties -> lowest expert id.
* renormalize: routed weights / (sum + 1e-20); apply_routed_scaling_factor_on_output multiplies
  the routed weights by rsf. Fused shared column (F = 1): id E with weight 1/rsf (1.0 when rsf
  is folded) under renormalize, else sum/rsf (sum when folded).
* rows >= num_token_non_padded: ids -1, weights 0.

This module is also imported by benchmarks/bench_routing.py: keep the signature of
``reference_select_experts`` stable.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "RENORMALIZE_EPSILON",
    "make_tie_free_logits",
    "make_tie_free_selection",
    "reference_epilogue",
    "reference_hash_select",
    "reference_scores",
    "reference_select_experts",
    "reference_topk",
]

RENORMALIZE_EPSILON = 1e-20
SCORINGS = ("softmax", "sigmoid", "sqrtsoftplus")

_F32_MAX = float(np.finfo(np.float32).max)
# The selection key of a NaN logit inside a kept group: below every real choice value, above the
# -inf of experts in dropped groups (so, as in moelb, such experts still fill a row before any
# expert of a dropped group, lowest id first).
_ELIGIBLE_NAN_KEY = -1e300


def reference_scores(router_logits: npt.ArrayLike, scoring: str) -> np.ndarray:
    """[T, E] float64 scores of float logits (NaN -> score 0, +inf -> largest float32)."""
    if scoring not in SCORINGS:
        raise ValueError(f"unknown scoring {scoring!r}")
    x = np.asarray(router_logits, dtype=np.float64)
    x = np.where(np.isnan(x), -np.inf, np.minimum(x, _F32_MAX))
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if scoring == "softmax":
            m = x.max(axis=1, keepdims=True)
            alive = np.isfinite(m)  # m == -inf: every logit NaN or -inf, no probability mass
            e = np.exp(x - np.where(alive, m, 0.0))
            return np.where(alive, e / e.sum(axis=1, keepdims=True), 0.0)
        if scoring == "sigmoid":
            return 1.0 / (1.0 + np.exp(-x))
        return np.sqrt(np.where(x > 20.0, x, np.log1p(np.exp(x))))


def _top_k_lowest_id(key: np.ndarray, k: int, slack: float) -> tuple[np.ndarray, np.ndarray]:
    """The k largest keys of every row. key: [T, N] float64 without NaN.

    Returns ([T, k] column ids in descending key, ties -> lowest column id; [T] relative gap
    between the k-th and (k+1)-th largest keys, inf when N == k)."""
    t, n = key.shape
    if k >= n:
        return np.argsort(-key, axis=1, kind="stable")[:, :k], np.full(t, np.inf)
    part = -np.partition(-key, [k - 1, k], axis=1)
    kth = part[:, k - 1 : k]  # the k-th largest value per row
    greater = key > kth
    equal = key == kth
    need = k - greater.sum(axis=1, keepdims=True)  # >= 1 tied entries to take, lowest ids first
    chosen = greater | (equal & (np.cumsum(equal, axis=1) <= need))
    cols = np.nonzero(chosen)[1].reshape(t, k)  # ascending ids in every row
    vals = np.take_along_axis(key, cols, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    return np.take_along_axis(cols, order, axis=1), _relative_gap(kth[:, 0], part[:, k], slack)


def _relative_gap(a: np.ndarray, b: np.ndarray, slack: float) -> np.ndarray:
    """|a - b| relative to the magnitude of the operands (slack: the bias magnitude, which float32
    rounding of score + bias is relative to). inf where either side is not a real value."""
    real = np.isfinite(a) & np.isfinite(b) & (a > _ELIGIBLE_NAN_KEY) & (b > _ELIGIBLE_NAN_KEY)
    with np.errstate(invalid="ignore", over="ignore"):
        gap = np.abs(a - b) / (np.maximum(np.abs(a), np.abs(b)) + slack + 1e-300)
    return np.where(real, gap, np.inf)


def reference_epilogue(
    ids: np.ndarray,
    scores: np.ndarray,
    *,
    shared_id: int,
    renormalize: bool,
    routed_scaling_factor: float,
    apply_routed_scaling_factor_on_output: bool,
    num_fused_shared_experts: int,
    num_token_non_padded: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Weights, rsf and the fused shared column of the chosen experts.

    ids: [T, K] chosen expert ids; scores: [T, K] float64 unbiased scores. shared_id: the id of
    the fused shared column (E). Returns (ids int32 [T, K+F], weights float32 [T, K+F])."""
    if num_fused_shared_experts not in (0, 1):
        raise ValueError("num_fused_shared_experts must be 0 or 1")
    rsf = float(routed_scaling_factor)
    total = scores.sum(axis=1, keepdims=True)
    weights = scores / (total + RENORMALIZE_EPSILON) if renormalize else scores.copy()
    if apply_routed_scaling_factor_on_output:
        weights = weights * rsf
    if num_fused_shared_experts:
        if renormalize:
            shared = np.full_like(total, 1.0 if apply_routed_scaling_factor_on_output else 1 / rsf)
        else:
            shared = total if apply_routed_scaling_factor_on_output else total / rsf
        ids = np.concatenate([ids, np.full_like(ids[:, :1], shared_id)], axis=1)
        weights = np.concatenate([weights, shared], axis=1)
    ids = ids.astype(np.int32)
    weights = weights.astype(np.float32)
    if num_token_non_padded is not None:
        ids[num_token_non_padded:] = -1
        weights[num_token_non_padded:] = 0.0
    return ids, weights


def reference_topk(
    router_logits: npt.ArrayLike,
    *,
    top_k: int,
    scoring: str,
    num_groups: int | None = None,
    topk_group: int | None = None,
    group_score: str = "top2_sum",
    correction_bias: npt.ArrayLike | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The selection part of select_experts.

    Returns (ids int64 [T, K] in descending choice, ties -> lowest id; their unbiased scores
    float64 [T, K]; margin float64 [T], the smallest relative gap that decided the row: K-th vs
    (K+1)-th eligible choice, adjacent chosen choices, topk_group-th vs next group score)."""
    logits = np.asarray(router_logits)
    if logits.ndim != 2:
        raise ValueError("router_logits must be [T, E]")
    t, e = logits.shape
    if not 1 <= top_k <= e:
        raise ValueError(f"top_k={top_k} must be in [1, {e}]")
    scores = reference_scores(logits, scoring)
    nan = np.isnan(logits)
    slack = 0.0
    choice = scores
    if correction_bias is not None:
        bias = np.asarray(correction_bias, dtype=np.float64).reshape(-1)
        if bias.shape != (e,):
            raise ValueError("correction_bias must have E entries")
        choice = scores + bias
        slack = float(np.abs(bias).max(initial=0.0))
    choice = np.where(nan, -np.inf, choice)
    margin = np.full(t, np.inf)

    if num_groups:
        if topk_group is None or not 1 <= topk_group <= num_groups or e % num_groups:
            raise ValueError("bad num_groups / topk_group")
        per_group = e // num_groups
        if top_k > topk_group * per_group:
            raise ValueError("top_k exceeds the experts of the kept groups")
        grouped = choice.reshape(t, num_groups, per_group)
        if group_score == "max" or per_group == 1:
            group_scores = grouped.max(axis=2)
            group_slack = slack
        elif group_score == "top2_sum":
            group_scores = np.partition(grouped, per_group - 2, axis=2)[:, :, -2:].sum(axis=2)
            group_slack = 2 * slack
        else:
            raise ValueError(f"unknown group_score {group_score!r}")
        kept, group_gap = _top_k_lowest_id(group_scores, topk_group, group_slack)
        margin = np.minimum(margin, group_gap)
        eligible_groups = np.zeros((t, num_groups), dtype=bool)
        np.put_along_axis(eligible_groups, kept, True, axis=1)
        eligible = np.repeat(eligible_groups, per_group, axis=1)
        key = np.where(eligible, np.where(nan, _ELIGIBLE_NAN_KEY, choice), -np.inf)
    else:
        key = choice
    ids, kth_gap = _top_k_lowest_id(key, top_k, slack)
    margin = np.minimum(margin, kth_gap)
    if top_k > 1:
        chosen_keys = np.take_along_axis(key, ids, axis=1)
        adjacent = _relative_gap(chosen_keys[:, :-1], chosen_keys[:, 1:], slack)
        margin = np.minimum(margin, adjacent.min(axis=1))
    return ids, np.take_along_axis(scores, ids, axis=1), margin


def reference_select_experts(
    router_logits: npt.ArrayLike,
    *,
    top_k: int,
    scoring: str,
    num_groups: int | None = None,
    topk_group: int | None = None,
    group_score: str = "top2_sum",
    renormalize: bool = True,
    routed_scaling_factor: float = 1.0,
    apply_routed_scaling_factor_on_output: bool = False,
    num_fused_shared_experts: int = 0,
    correction_bias: npt.ArrayLike | None = None,
    num_token_non_padded: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """moelb.select_experts without a location, in float64.

    router_logits: [T, E] floats. Returns (ids int32 [T, K+F], weights float32 [T, K+F],
    margin float64 [T]): margin is the smallest relative gap that decided the row (K-th vs
    (K+1)-th eligible choice, adjacent chosen choices, topk_group-th vs next group score); inf for
    padded rows and where every decision was by exact ties of NaN logits (resolved by id).
    """
    ids, scores, margin = reference_topk(
        router_logits,
        top_k=top_k,
        scoring=scoring,
        num_groups=num_groups,
        topk_group=topk_group,
        group_score=group_score,
        correction_bias=correction_bias,
    )
    t, e = np.shape(router_logits)
    if num_token_non_padded is not None:
        if not 0 <= num_token_non_padded <= t:
            raise ValueError("num_token_non_padded outside [0, T]")
        margin[num_token_non_padded:] = np.inf
    out_ids, weights = reference_epilogue(
        ids,
        scores,
        shared_id=e,
        renormalize=renormalize,
        routed_scaling_factor=routed_scaling_factor,
        apply_routed_scaling_factor_on_output=apply_routed_scaling_factor_on_output,
        num_fused_shared_experts=num_fused_shared_experts,
        num_token_non_padded=num_token_non_padded,
    )
    return out_ids, weights, margin


def reference_hash_select(
    router_logits: npt.ArrayLike,
    input_ids: npt.ArrayLike,
    tid2eid: npt.ArrayLike,
    *,
    scoring: str = "sqrtsoftplus",
    routed_scaling_factor: float = 1.0,
    num_fused_shared_experts: int = 0,
    apply_routed_scaling_factor_on_output: bool = False,
    num_token_non_padded: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """moelb.HashRouter(...).select without a location, in float64.

    ids = tid2eid[input_ids]; weights = their scores (softmax: probabilities over all E),
    renormalized unless scoring is softmax; rsf and the shared column as select_experts.
    Token ids of padded rows are not looked up. Returns (ids int32 [T, K+F], weights float32).
    """
    logits = np.asarray(router_logits)
    table = np.asarray(tid2eid, dtype=np.int64)
    tokens = np.asarray(input_ids, dtype=np.int64).reshape(-1)
    t, e = logits.shape
    n = t if num_token_non_padded is None else num_token_non_padded
    lookup = tokens.copy()
    lookup[n:] = 0
    if lookup.size and (lookup.min() < 0 or lookup.max() >= table.shape[0]):
        raise ValueError("input_ids outside the hash table")
    ids = table[lookup]
    scores = np.take_along_axis(reference_scores(logits, scoring), ids, axis=1)
    return reference_epilogue(
        ids,
        scores,
        shared_id=e,
        renormalize=scoring != "softmax",
        routed_scaling_factor=routed_scaling_factor,
        apply_routed_scaling_factor_on_output=apply_routed_scaling_factor_on_output,
        num_fused_shared_experts=num_fused_shared_experts,
        num_token_non_padded=num_token_non_padded,
    )


def make_tie_free_selection(
    rng: np.random.Generator,
    num_tokens: int,
    num_experts: int,
    *,
    scale: float = 1.0,
    min_margin: float = 1e-5,
    max_rounds: int = 50,
    **config: Any,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_tie_free_logits, also returning the reference selection of the returned logits:
    (logits float32 [T, E], ids int64 [T, K], scores float64 [T, K]) from ``reference_topk``."""
    selection_keys = ("top_k", "scoring", "num_groups", "topk_group", "group_score")
    selection = {k: v for k, v in config.items() if k in selection_keys}
    selection["correction_bias"] = config.get("correction_bias")

    def sample(rows: int) -> np.ndarray:
        return rng.standard_normal((rows, num_experts), dtype=np.float32) * np.float32(scale)

    logits = sample(num_tokens)
    ids, scores, margin = reference_topk(logits, **selection)
    rows = np.flatnonzero(margin < min_margin)
    for _ in range(max_rounds):
        if rows.size == 0:
            return logits, ids, scores
        logits[rows] = sample(rows.size)
        ids[rows], scores[rows], margin = reference_topk(logits[rows], **selection)
        rows = rows[margin < min_margin]
    raise RuntimeError(f"{rows.size} rows stay within {min_margin} of a tie; change the config")


def make_tie_free_logits(
    rng: np.random.Generator,
    num_tokens: int,
    num_experts: int,
    *,
    scale: float = 1.0,
    min_margin: float = 1e-5,
    max_rounds: int = 50,
    **config: Any,
) -> np.ndarray:
    """[num_tokens, num_experts] float32 normal logits (standard deviation ``scale``) whose every
    row has ``reference_select_experts(..., **config)`` margin >= min_margin: rows that come close
    to a tie are resampled, so float32-vs-float64 rounding cannot change the selection.

    config: the keyword arguments of reference_select_experts (top_k, scoring, num_groups,
    correction_bias, ...); output-only ones (renormalize, rsf, ...) are accepted and ignored."""
    logits, _, _ = make_tie_free_selection(
        rng,
        num_tokens,
        num_experts,
        scale=scale,
        min_margin=min_margin,
        max_rounds=max_rounds,
        **config,
    )
    return logits


def reference_route(
    config: Any, logits: npt.ArrayLike, weights: dict, input_ids: npt.ArrayLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The routing of a moelb.DeepSeekMoEConfig's layer in float64: the hash router for a hash
    layer (``weights["tid2eid"]``, ``input_ids``), else select_experts with the config's groups,
    scoring and ``weights["correction_bias"]``. Returns (ids [T, K], weights [T, K])."""
    if config.is_hash_layer:
        return reference_hash_select(
            logits,
            input_ids,
            weights["tid2eid"],
            scoring=config.scoring,
            routed_scaling_factor=config.routed_scaling_factor,
        )
    ids, topk_weights, _ = reference_select_experts(
        logits,
        top_k=config.top_k,
        scoring=config.scoring,
        num_groups=config.num_groups,
        topk_group=config.topk_group,
        renormalize=config.renormalize,
        routed_scaling_factor=config.routed_scaling_factor,
        correction_bias=weights["correction_bias"],
    )
    return ids, topk_weights
