"""PyTorch CPU references of SGLang's DeepSeek routers, for benchmarking moelb against.

Written from the behavioural specification (``reference/routing_waterfill.md`` sections 4.0-4.9
and 6.3), in the style of SGLang's torch fallbacks (``biased_grouped_topk_impl``,
``biased_topk_impl``, the ``HashTopK`` torch path): whole-batch tensor operations and
``torch.topk``. They are what an engine runs on CPU when no fused kernel applies, so they are the
baseline moelb has to beat.

Differences from SGLang, all of them output-neutral for the benchmarked configurations:

* ``torch.topk(..., sorted=True)`` always, so columns are in descending choice order like moelb's
  (SGLang sorts only when a shared column is fused).
* ``top_k`` counts the routed experts only (moelb's convention); with a fused shared expert the
  top-k runs over ``top_k + 1`` columns and the last one is overwritten, as SGLang does when it is
  given ``top_k + 1``. Its id is ``E`` (SGLang draws ``randint(E, E + 1)``, which is always ``E``).
* The functions return ``(topk_ids, topk_weights)`` (moelb's order), int32 and float32.

Ties inside ``torch.topk`` are resolved however PyTorch resolves them (unspecified), so rows that
are exact or float near-ties may differ from moelb (which gives ties to the lowest expert id).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "RENORMALIZE_EPSILON",
    "biased_grouped_topk",
    "biased_topk",
    "hash_topk",
    "scores_of",
]

# SGLang's _RENORMALIZE_SUM_EPSILON: an all-underflow row renormalizes to zeros, not 0/0 = NaN.
RENORMALIZE_EPSILON = 1e-20


def scores_of(router_logits: torch.Tensor, scoring: str) -> torch.Tensor:
    """[T, E] scores of [T, E] logits: softmax over the row, sigmoid, or sqrt(softplus(x)) with
    PyTorch's default softplus (beta 1, threshold 20)."""
    if scoring == "softmax":
        return torch.softmax(router_logits, dim=-1)
    if scoring == "sigmoid":
        return router_logits.sigmoid()
    if scoring == "sqrtsoftplus":
        return F.softplus(router_logits).sqrt()
    raise ValueError(f"Invalid scoring function {scoring!r}")


def _finish(
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    renormalize: bool,
    routed_scaling_factor: float,
    apply_routed_scaling_factor_on_output: bool,
    num_fused_shared_experts: int,
    num_experts: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared column, renormalization and rsf of SGLang's torch routers (section 4.8/4.9).

    topk_ids: [T, K + F] int64 in descending choice order; topk_weights: [T, K + F] the unbiased
    scores of those experts. With F = 1 the last (weakest) column becomes the shared expert."""
    if num_fused_shared_experts not in (0, 1):
        raise ValueError("num_fused_shared_experts must be 0 or 1")
    if num_fused_shared_experts:
        topk_ids[:, -1] = num_experts
        topk_weights[:, -1] = topk_weights[:, :-1].sum(dim=-1) / routed_scaling_factor
    if renormalize:
        routed = topk_weights[:, :-1] if num_fused_shared_experts else topk_weights
        topk_weights = topk_weights / (routed.sum(dim=-1, keepdim=True) + RENORMALIZE_EPSILON)
        if apply_routed_scaling_factor_on_output:
            topk_weights = topk_weights * routed_scaling_factor
    return topk_ids.to(torch.int32), topk_weights.to(torch.float32)


def biased_grouped_topk(
    router_logits: torch.Tensor,
    correction_bias: torch.Tensor,
    *,
    top_k: int,
    num_groups: int,
    topk_group: int,
    renormalize: bool = True,
    routed_scaling_factor: float = 1.0,
    apply_routed_scaling_factor_on_output: bool = False,
    num_fused_shared_experts: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 ``noaux_tc`` routing (SGLang ``biased_grouped_topk_impl``, section 4.4).

    router_logits: [T, E] float32; correction_bias: [E] float32, added to the sigmoid scores for
    selection only. Groups are contiguous blocks of E / num_groups experts scored by the sum of
    their two best choice values; the topk_group best groups are kept, the others masked to -inf.
    Returns (topk_ids int32 [T, K + F], topk_weights float32 [T, K + F])."""
    num_tokens, num_experts = router_logits.shape
    scores = router_logits.sigmoid()
    scores_for_choice = scores + correction_bias.unsqueeze(0)
    group_scores = scores_for_choice.view(num_tokens, num_groups, -1).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    score_mask = (
        group_mask.unsqueeze(-1)
        .expand(num_tokens, num_groups, num_experts // num_groups)
        .reshape(num_tokens, -1)
    )
    tmp_scores = scores_for_choice.masked_fill(~score_mask.bool(), float("-inf"))
    _, topk_ids = torch.topk(tmp_scores, k=top_k + num_fused_shared_experts, dim=-1, sorted=True)
    topk_weights = scores.gather(1, topk_ids)
    return _finish(
        topk_ids,
        topk_weights,
        renormalize=renormalize,
        routed_scaling_factor=routed_scaling_factor,
        apply_routed_scaling_factor_on_output=apply_routed_scaling_factor_on_output,
        num_fused_shared_experts=num_fused_shared_experts,
        num_experts=num_experts,
    )


def biased_topk(
    router_logits: torch.Tensor,
    correction_bias: torch.Tensor,
    *,
    top_k: int,
    scoring: str = "sqrtsoftplus",
    renormalize: bool = True,
    routed_scaling_factor: float = 1.0,
    apply_routed_scaling_factor_on_output: bool = False,
    num_fused_shared_experts: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V4 learned-layer routing (SGLang ``biased_topk_impl``, section 4.5): ungrouped
    top-k of ``scores + correction_bias``; the weights are the unbiased scores.

    router_logits: [T, E] float32; correction_bias: [E] float32; scoring: 'sigmoid' or
    'sqrtsoftplus'. Returns (topk_ids int32 [T, K + F], topk_weights float32 [T, K + F])."""
    if scoring not in ("sigmoid", "sqrtsoftplus"):
        raise ValueError(f"Invalid scoring function {scoring!r}")
    scores = scores_of(router_logits, scoring)
    _, topk_ids = torch.topk(
        scores + correction_bias.unsqueeze(0),
        k=top_k + num_fused_shared_experts,
        dim=-1,
        sorted=True,
    )
    topk_weights = scores.gather(1, topk_ids)
    return _finish(
        topk_ids,
        topk_weights,
        renormalize=renormalize,
        routed_scaling_factor=routed_scaling_factor,
        apply_routed_scaling_factor_on_output=apply_routed_scaling_factor_on_output,
        num_fused_shared_experts=num_fused_shared_experts,
        num_experts=router_logits.shape[1],
    )


def hash_topk(
    router_logits: torch.Tensor,
    input_ids: torch.Tensor,
    tid2eid: torch.Tensor,
    *,
    scoring: str = "sqrtsoftplus",
    routed_scaling_factor: float = 1.0,
    apply_routed_scaling_factor_on_output: bool = False,
    num_fused_shared_experts: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The DeepSeek-V4 hash router's torch path (SGLang ``HashTopK.forward``, section 6.3).

    router_logits: [T, E] float32; input_ids: [T] int64 token ids; tid2eid: [vocab, K] int32.
    Ids are ``tid2eid[input_ids]`` in table order; weights are their scores, renormalized unless
    scoring is softmax. Returns (topk_ids int32 [T, K + F], topk_weights float32 [T, K + F])."""
    if num_fused_shared_experts not in (0, 1):
        raise ValueError("num_fused_shared_experts must be 0 or 1")
    num_tokens, num_experts = router_logits.shape
    top_k = tid2eid.shape[1]
    scores = scores_of(router_logits, scoring)
    topk_ids = torch.empty(
        (num_tokens, top_k + num_fused_shared_experts), dtype=torch.int32, device=scores.device
    )
    topk_weights = torch.empty(
        (num_tokens, top_k + num_fused_shared_experts), dtype=scores.dtype, device=scores.device
    )
    topk_ids[:, :top_k] = tid2eid[input_ids]
    topk_weights[:, :top_k] = scores.gather(1, topk_ids[:, :top_k].long())
    if scoring != "softmax":
        routed = topk_weights[:, :top_k]
        topk_weights[:, :top_k] = routed / (routed.sum(dim=-1, keepdim=True) + RENORMALIZE_EPSILON)
    if num_fused_shared_experts:
        topk_ids[:, top_k] = num_experts
        topk_weights[:, top_k] = topk_weights[:, :top_k].sum(dim=-1) / routed_scaling_factor
    if apply_routed_scaling_factor_on_output:
        topk_weights = topk_weights * routed_scaling_factor
    return topk_ids, topk_weights.to(torch.float32)
