"""select_experts and the per-rank shared-slot remap against the NumPy reference
(routing_reference.py, written from DESIGN.md section 1 independently of moelb)."""

from __future__ import annotations

import functools
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import moelb
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from routing_reference import (
    make_tie_free_logits,
    make_tie_free_selection,
    reference_epilogue,
    reference_select_experts,
    reference_topk,
)

NUM_TOKENS = 10_000
MIN_MARGIN = 1e-5
SCORINGS = ("softmax", "sigmoid", "sqrtsoftplus")
GROUPINGS = ("ungrouped", "top2_sum", "max")
NUM_EXPERTS = (16, 64, 256, 384)
MAX_TOP_K = 8
# Grouped selection: (num_groups, topk_group) per E; the kept groups hold >= MAX_TOP_K experts.
GROUPS = {16: (4, 2), 64: (8, 3), 256: (8, 4), 384: (8, 2)}
RSFS = (1.0, 2.5, 1.5, 0.5)
RTOL, ATOL = 1e-6, 1e-7


def group_kwargs(grouping: str, num_experts: int) -> dict:
    if grouping == "ungrouped":
        return {}
    num_groups, topk_group = GROUPS[num_experts]
    return {"num_groups": num_groups, "topk_group": topk_group, "group_score": grouping}


def make_bias(scoring: str, num_experts: int, seed: int = 7) -> np.ndarray:
    """A correction bias of the size of the score differences (softmax scores are ~1/E)."""
    scale = 1.0 / num_experts if scoring == "softmax" else 0.1
    rng = np.random.default_rng(seed + num_experts)
    return (rng.standard_normal(num_experts) * scale).astype(np.float32)


def stable_seed(*parts: object) -> int:
    return zlib.crc32(repr(parts).encode())


@functools.lru_cache(maxsize=2)
def routing_dataset(scoring: str, grouping: str, num_experts: int, with_bias: bool):
    """Tie-free logits [NUM_TOKENS, E] for every K <= MAX_TOP_K, the bias, and the reference
    top-MAX_TOP_K selection (ids, float64 scores). The reference's top-K selection is the first K
    columns of its top-MAX_TOP_K selection (checked by test_reference_topk_prefix_property)."""
    groups = group_kwargs(grouping, num_experts)
    bias = make_bias(scoring, num_experts) if with_bias else None
    kept = num_experts if not groups else groups["topk_group"] * num_experts // groups["num_groups"]
    rng = np.random.default_rng(stable_seed(scoring, grouping, num_experts, with_bias))
    # Margin over the top MAX_TOP_K + 1 covers every K-th vs (K+1)-th gap for K <= MAX_TOP_K.
    logits, ids, scores = make_tie_free_selection(
        rng,
        NUM_TOKENS,
        num_experts,
        min_margin=MIN_MARGIN,
        top_k=min(MAX_TOP_K + 1, kept),
        scoring=scoring,
        correction_bias=bias,
        **groups,
    )
    ids, scores = ids[:, :MAX_TOP_K], scores[:, :MAX_TOP_K]
    return logits, bias, ids, scores


@dataclass(frozen=True)
class Case:
    scoring: str
    grouping: str
    renormalize: bool
    num_fused_shared_experts: int
    num_experts: int
    top_k: int
    with_bias: bool
    fold_rsf: bool
    routed_scaling_factor: float

    @property
    def id(self) -> str:
        return "-".join(
            [
                self.scoring,
                self.grouping,
                "renorm" if self.renormalize else "raw",
                f"F{self.num_fused_shared_experts}",
                f"E{self.num_experts}",
                f"K{self.top_k}",
                "bias" if self.with_bias else "nobias",
                "rsf_on_output" if self.fold_rsf else "rsf_later",
                f"rsf{self.routed_scaling_factor}",
            ]
        )

    def config(self) -> moelb.TopKConfig:
        return moelb.TopKConfig(
            top_k=self.top_k,
            scoring=self.scoring,
            renormalize=self.renormalize,
            routed_scaling_factor=self.routed_scaling_factor,
            apply_routed_scaling_factor_on_output=self.fold_rsf,
            num_fused_shared_experts=self.num_fused_shared_experts,
            **group_kwargs(self.grouping, self.num_experts),
        )


def all_cases() -> list[Case]:
    # Ordered so that consecutive cases share a dataset (see routing_dataset's cache).
    cases = []
    for scoring in SCORINGS:
        for grouping in GROUPINGS:
            for e_index, num_experts in enumerate(NUM_EXPERTS):
                for with_bias in (False, True):
                    for top_k in range(1, MAX_TOP_K + 1):
                        if (top_k % 2 == 0) != with_bias:
                            continue
                        # Bias, rsf on output and the rsf value vary across (E, K), so every
                        # (scoring, grouping, renormalize, F) sees each combination.
                        fold = ((top_k - 1) // 2 + e_index) % 2 == 1
                        rsf = RSFS[(top_k + e_index) % len(RSFS)]
                        for renormalize in (True, False):
                            for shared in (0, 1):
                                cases.append(
                                    Case(
                                        scoring,
                                        grouping,
                                        renormalize,
                                        shared,
                                        num_experts,
                                        top_k,
                                        with_bias,
                                        fold,
                                        rsf,
                                    )
                                )
    return cases


CASES = all_cases()


def test_case_matrix_is_complete() -> None:
    combos = {(c.scoring, c.grouping, c.renormalize, c.num_fused_shared_experts) for c in CASES}
    assert len(combos) == 3 * 3 * 2 * 2
    for combo in combos:
        mine = [
            c
            for c in CASES
            if combo == (c.scoring, c.grouping, c.renormalize, c.num_fused_shared_experts)
        ]
        assert {(c.num_experts, c.top_k) for c in mine} == {
            (e, k) for e in NUM_EXPERTS for k in range(1, MAX_TOP_K + 1)
        }
        assert {c.with_bias for c in mine} == {False, True}
        assert {c.fold_rsf for c in mine} == {False, True}


@pytest.mark.parametrize("scoring", SCORINGS)
@pytest.mark.parametrize("grouping", GROUPINGS)
def test_reference_topk_prefix_property(scoring: str, grouping: str) -> None:
    """The reference's top-K is the first K columns of its top-8 (what routing_dataset uses)."""
    rng = np.random.default_rng(3)
    logits = rng.integers(-3, 4, size=(500, 64)).astype(np.float32)  # many exact ties
    groups = group_kwargs(grouping, 64)
    full, full_scores, _ = reference_topk(logits, top_k=8, scoring=scoring, **groups)
    for k in range(1, 8):
        ids, scores, _ = reference_topk(logits, top_k=k, scoring=scoring, **groups)
        np.testing.assert_array_equal(ids, full[:, :k])
        np.testing.assert_array_equal(scores, full_scores[:, :k])


def test_tie_free_selection_is_consistent() -> None:
    """make_tie_free_selection returns tie-free logits and their reference selection."""
    bias = make_bias("sigmoid", 64)
    config = dict(top_k=9, scoring="sigmoid", num_groups=8, topk_group=3, correction_bias=bias)
    logits, ids, scores = make_tie_free_selection(
        np.random.default_rng(0), 3000, 64, min_margin=1e-3, **config
    )
    again, again_scores, margin = reference_topk(logits, **config)
    assert margin.min() >= 1e-3
    np.testing.assert_array_equal(ids, again)
    np.testing.assert_array_equal(scores, again_scores)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_select_experts_matches_reference(case: Case) -> None:
    logits, bias, ref_ids, ref_scores = routing_dataset(
        case.scoring, case.grouping, case.num_experts, case.with_bias
    )
    k = case.top_k
    out = moelb.select_experts(logits, case.config(), bias)
    expected_ids, expected_weights = reference_epilogue(
        ref_ids[:, :k],
        ref_scores[:, :k],
        shared_id=case.num_experts,
        renormalize=case.renormalize,
        routed_scaling_factor=case.routed_scaling_factor,
        apply_routed_scaling_factor_on_output=case.fold_rsf,
        num_fused_shared_experts=case.num_fused_shared_experts,
        num_token_non_padded=None,
    )
    width = k + case.num_fused_shared_experts
    assert out.topk_ids.shape == (NUM_TOKENS, width) and out.topk_ids.dtype == np.int32
    assert out.topk_weights.shape == (NUM_TOKENS, width) and out.topk_weights.dtype == np.float32
    assert out.recorder_topk_ids.shape == (NUM_TOKENS, k)
    assert out.recorder_topk_ids.dtype == np.int32
    np.testing.assert_array_equal(out.topk_ids, expected_ids)
    np.testing.assert_allclose(out.topk_weights, expected_weights, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(out.recorder_topk_ids, expected_ids[:, :k])


PRESETS = {
    "deepseek_v3": dict(
        top_k=8,
        scoring="sigmoid",
        num_groups=8,
        topk_group=4,
        group_score="top2_sum",
        renormalize=True,
        routed_scaling_factor=2.5,
        apply_routed_scaling_factor_on_output=False,
        num_fused_shared_experts=0,
    ),
    "deepseek_v4_flash": dict(
        top_k=6,
        scoring="sqrtsoftplus",
        renormalize=True,
        routed_scaling_factor=1.5,
        apply_routed_scaling_factor_on_output=False,
        num_fused_shared_experts=0,
    ),
    "deepseek_v4_pro": dict(
        top_k=6,
        scoring="sqrtsoftplus",
        renormalize=True,
        routed_scaling_factor=2.5,
        apply_routed_scaling_factor_on_output=False,
        num_fused_shared_experts=0,
    ),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_fields(name: str) -> None:
    config = getattr(moelb.TopKConfig, name)()
    expected = {"num_groups": None, "topk_group": None, "group_score": "top2_sum", **PRESETS[name]}
    for field, value in expected.items():
        assert getattr(config, field) == value, field
    assert config.output_columns == expected["top_k"]
    assert config == getattr(moelb.TopKConfig, name)()
    assert config == moelb.TopKConfig(**PRESETS[name])


@pytest.mark.parametrize(
    ("name", "num_experts", "shared"),
    [
        ("deepseek_v3", 256, 0),
        ("deepseek_v3", 256, 1),
        ("deepseek_v4_flash", 256, 0),
        ("deepseek_v4_flash", 384, 1),
        ("deepseek_v4_pro", 256, 1),
        ("deepseek_v4_pro", 384, 0),
    ],
)
def test_deepseek_presets_match_reference(name: str, num_experts: int, shared: int) -> None:
    preset = getattr(moelb.TopKConfig, name)()
    params = dict(PRESETS[name], num_fused_shared_experts=shared)
    config = moelb.TopKConfig(**params) if shared else preset
    bias = make_bias(params["scoring"], num_experts, seed=11)
    rng = np.random.default_rng(stable_seed(name, num_experts))
    logits = make_tie_free_logits(rng, NUM_TOKENS, num_experts, correction_bias=bias, **params)
    out = moelb.select_experts(logits, config, bias)
    ids, weights, margin = reference_select_experts(logits, correction_bias=bias, **params)
    assert margin.min() >= MIN_MARGIN
    np.testing.assert_array_equal(out.topk_ids, ids)
    np.testing.assert_allclose(out.topk_weights, weights, rtol=RTOL, atol=ATOL)
    routed = out.topk_weights[:, : params["top_k"]].sum(axis=1)
    np.testing.assert_allclose(routed, 1.0, rtol=1e-5)
    if shared:
        assert (out.topk_ids[:, -1] == num_experts).all()
        np.testing.assert_allclose(out.topk_weights[:, -1], 1 / params["routed_scaling_factor"])


# ---------------------------------------------------------------------------------------------
# Ties, NaN, special values


@pytest.mark.parametrize("scoring", SCORINGS)
@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("top_k", [1, 3, 8])
def test_all_equal_logits_pick_lowest_ids(scoring: str, grouping: str, top_k: int) -> None:
    config = moelb.TopKConfig(top_k=top_k, scoring=scoring, **group_kwargs(grouping, 64))
    logits = np.full((5, 64), 0.25, dtype=np.float32)
    out = moelb.select_experts(logits, config)
    np.testing.assert_array_equal(out.topk_ids, np.tile(np.arange(top_k), (5, 1)))
    np.testing.assert_allclose(out.topk_weights, 1.0 / top_k, rtol=1e-6)


@pytest.mark.parametrize("scoring", SCORINGS)
def test_partial_ties_keep_id_order(scoring: str) -> None:
    logits = np.array([[1, 3, 3, 2, 3, 0, 2, 3]], dtype=np.float32)
    expected = {
        1: [1],
        2: [1, 2],
        4: [1, 2, 4, 7],
        6: [1, 2, 4, 7, 3, 6],
        8: [1, 2, 4, 7, 3, 6, 0, 5],
    }
    for top_k, ids in expected.items():
        out = moelb.select_experts(logits, moelb.TopKConfig(top_k=top_k, scoring=scoring))
        np.testing.assert_array_equal(out.topk_ids[0], ids)


@pytest.mark.parametrize("group_score", ["top2_sum", "max"])
def test_group_ties_keep_lowest_group(group_score: str) -> None:
    # 4 groups of 2: groups 1, 2 and 3 tie; topk_group=2 keeps groups 1 and 2.
    logits = np.array([[0, 0, 1, 1, 1, 1, 1, 1]], dtype=np.float32)
    config = moelb.TopKConfig(
        top_k=4, scoring="sigmoid", num_groups=4, topk_group=2, group_score=group_score
    )
    out = moelb.select_experts(logits, config)
    np.testing.assert_array_equal(out.topk_ids[0], [2, 3, 4, 5])


def test_top2_sum_counts_a_duplicated_maximum_twice() -> None:
    # Group 0: [2, 2, -5, -5] -> 2 * sigmoid(2) = 1.76; group 1: [2.5, 1, -5, -5] -> 1.66.
    # (Taking the best value strictly below the maximum as "second" would keep group 1.)
    logits = np.array([[2, 2, -5, -5, 2.5, 1, -5, -5]], dtype=np.float32)
    config = moelb.TopKConfig(top_k=2, scoring="sigmoid", num_groups=2, topk_group=1)
    out = moelb.select_experts(logits, config)
    np.testing.assert_array_equal(out.topk_ids[0], [0, 1])
    max_config = moelb.TopKConfig(
        top_k=2, scoring="sigmoid", num_groups=2, topk_group=1, group_score="max"
    )
    np.testing.assert_array_equal(moelb.select_experts(logits, max_config).topk_ids[0], [4, 5])


def test_bias_selects_but_does_not_weigh() -> None:
    logits = np.array([[0.0, 1.0, 2.0, 3.0]], dtype=np.float32)
    bias = np.array([10.0, 0.0, 0.0, 0.0], dtype=np.float32)
    config = moelb.TopKConfig(top_k=2, scoring="sigmoid", renormalize=False)
    out = moelb.select_experts(logits, config, bias)
    np.testing.assert_array_equal(out.topk_ids[0], [0, 3])
    np.testing.assert_allclose(out.topk_weights[0], [0.5, 1 / (1 + np.exp(-3.0))], rtol=1e-6)


@pytest.mark.parametrize("scoring", SCORINGS)
@pytest.mark.parametrize("grouping", ["ungrouped", "max"])
def test_integer_logits_with_many_ties_match_reference(scoring: str, grouping: str) -> None:
    # Integer logits: equal logits tie exactly, distinct ones are far apart, so every row can be
    # compared (no margin filter) and exercises the lowest-id tie rule everywhere.
    rng = np.random.default_rng(5)
    logits = rng.integers(-3, 4, size=(3000, 64)).astype(np.float32)
    groups = group_kwargs(grouping, 64)
    config = moelb.TopKConfig(top_k=8, scoring=scoring, num_fused_shared_experts=1, **groups)
    out = moelb.select_experts(logits, config)
    ids, weights, _ = reference_select_experts(
        logits, top_k=8, scoring=scoring, num_fused_shared_experts=1, **groups
    )
    np.testing.assert_array_equal(out.topk_ids, ids)
    np.testing.assert_allclose(out.topk_weights, weights, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("scoring", SCORINGS)
@pytest.mark.parametrize("grouping", GROUPINGS)
def test_nan_logits_never_win(scoring: str, grouping: str) -> None:
    rng = np.random.default_rng(stable_seed("nan", scoring, grouping))
    num_experts, top_k = 64, 6
    groups = group_kwargs(grouping, num_experts)
    bias = make_bias(scoring, num_experts)
    logits = rng.standard_normal((4000, num_experts)).astype(np.float32)
    logits[rng.random(logits.shape) < 0.3] = np.nan
    config = moelb.TopKConfig(top_k=top_k, scoring=scoring, num_fused_shared_experts=1, **groups)
    out = moelb.select_experts(logits, config, bias)
    chosen = np.take_along_axis(logits, out.topk_ids[:, :top_k], axis=1)
    assert not np.isnan(chosen).any()
    assert np.isfinite(out.topk_weights).all()
    ids, weights, margin = reference_select_experts(
        logits,
        top_k=top_k,
        scoring=scoring,
        num_fused_shared_experts=1,
        correction_bias=bias,
        **groups,
    )
    ok = margin >= MIN_MARGIN
    assert ok.mean() > 0.9
    np.testing.assert_array_equal(out.topk_ids[ok], ids[ok])
    np.testing.assert_allclose(out.topk_weights[ok], weights[ok], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("scoring", SCORINGS)
@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("renormalize", [True, False])
def test_all_nan_rows_are_finite(scoring: str, grouping: str, renormalize: bool) -> None:
    config = moelb.TopKConfig(
        top_k=4,
        scoring=scoring,
        renormalize=renormalize,
        routed_scaling_factor=2.0,
        num_fused_shared_experts=1,
        **group_kwargs(grouping, 16),
    )
    logits = np.full((3, 16), np.nan, dtype=np.float32)
    logits[1] = np.linspace(-1, 1, 16, dtype=np.float32)  # a healthy row between NaN rows
    out = moelb.select_experts(logits, config, make_bias(scoring, 16))
    assert np.isfinite(out.topk_weights).all()
    for row in (0, 2):
        np.testing.assert_array_equal(out.topk_ids[row], [0, 1, 2, 3, 16])  # ties -> lowest ids
        np.testing.assert_array_equal(out.topk_weights[row, :4], 0.0)
        assert out.topk_weights[row, 4] == pytest.approx(0.5 if renormalize else 0.0)
    assert (out.topk_weights[1, :4] > 0).all()


@pytest.mark.parametrize("scoring", SCORINGS)
def test_infinite_logits(scoring: str) -> None:
    logits = np.array(
        [
            [np.inf, 0.0, -np.inf, 1.0, -1.0, 2.0],
            [-np.inf, -np.inf, -np.inf, -np.inf, 0.5, -np.inf],
            [np.inf, np.inf, 0.0, 0.0, 0.0, 0.0],
        ],
        dtype=np.float32,
    )
    config = moelb.TopKConfig(top_k=3, scoring=scoring)
    out = moelb.select_experts(logits, config)
    ids, weights, _ = reference_select_experts(logits, top_k=3, scoring=scoring)
    np.testing.assert_array_equal(out.topk_ids, ids)
    np.testing.assert_allclose(out.topk_weights, weights, rtol=RTOL, atol=ATOL)
    # +inf is the largest float; under softmax it takes all the mass and the rest tie at 0.
    np.testing.assert_array_equal(out.topk_ids[0], [0, 1, 2] if scoring == "softmax" else [0, 5, 3])
    np.testing.assert_array_equal(out.topk_ids[1], [4, 0, 1])
    np.testing.assert_array_equal(out.topk_ids[2], [0, 1, 2])
    np.testing.assert_allclose(out.topk_weights[1], [1, 0, 0], atol=1e-7)
    assert np.isfinite(out.topk_weights).all()


def test_renormalize_all_zero_row_gives_zeros() -> None:
    # sigmoid(-200) underflows to 0 in float32: the routed sum is 0, the weights must be 0, not NaN.
    logits = np.full((2, 8), -200.0, dtype=np.float32)
    config = moelb.TopKConfig(
        top_k=2, scoring="sigmoid", num_fused_shared_experts=1, routed_scaling_factor=2.5
    )
    out = moelb.select_experts(logits, config)
    np.testing.assert_array_equal(out.topk_weights[:, :2], 0.0)
    np.testing.assert_allclose(out.topk_weights[:, 2], 0.4)


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("fold", [False, True], ids=["rsf_later", "rsf_on_output"])
def test_renormalize_rsf_shared_matrix(renormalize: bool, fold: bool) -> None:
    """reference/routing_waterfill.md 4.9 with moelb's rsf rule: routed weights are s_i (or
    s_i / sum s) times rsf when folded; the shared column is 1/rsf (1.0 folded) or sum/rsf (sum)."""
    rsf = 2.5
    rng = np.random.default_rng(9)
    logits = rng.standard_normal((50, 32)).astype(np.float32)
    config = moelb.TopKConfig(
        top_k=4,
        scoring="sigmoid",
        renormalize=renormalize,
        routed_scaling_factor=rsf,
        apply_routed_scaling_factor_on_output=fold,
        num_fused_shared_experts=1,
    )
    out = moelb.select_experts(logits, config)
    chosen = np.take_along_axis(logits.astype(np.float64), out.topk_ids[:, :4], axis=1)
    raw = 1 / (1 + np.exp(-chosen))
    total = raw.sum(axis=1)
    scale = rsf if fold else 1.0
    routed = raw / total[:, None] if renormalize else raw
    np.testing.assert_allclose(out.topk_weights[:, :4], routed * scale, rtol=1e-6)
    if renormalize:
        shared = np.full(50, 1.0 if fold else 1 / rsf)
    else:
        shared = total if fold else total / rsf
    np.testing.assert_allclose(out.topk_weights[:, 4], shared, rtol=1e-6)
    np.testing.assert_array_equal(out.topk_ids[:, 4], 32)


# ---------------------------------------------------------------------------------------------
# Padding, recorder ids, empty input


@pytest.mark.parametrize("shared", [0, 1])
@pytest.mark.parametrize("non_padded", [0, 1, 37, 100])
def test_padded_rows(shared: int, non_padded: int) -> None:
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((100, 64)).astype(np.float32)
    config = moelb.TopKConfig(top_k=4, scoring="sigmoid", num_fused_shared_experts=shared)
    full = moelb.select_experts(logits, config)
    out = moelb.select_experts(logits, config, num_token_non_padded=non_padded)
    np.testing.assert_array_equal(out.topk_ids[non_padded:], -1)
    np.testing.assert_array_equal(out.topk_weights[non_padded:], 0.0)
    np.testing.assert_array_equal(out.recorder_topk_ids[non_padded:], -1)
    np.testing.assert_array_equal(out.topk_ids[:non_padded], full.topk_ids[:non_padded])
    np.testing.assert_array_equal(out.topk_weights[:non_padded], full.topk_weights[:non_padded])
    ids, weights, _ = reference_select_experts(
        logits,
        top_k=4,
        scoring="sigmoid",
        num_fused_shared_experts=shared,
        num_token_non_padded=non_padded,
    )
    np.testing.assert_array_equal(out.topk_ids, ids)
    np.testing.assert_allclose(out.topk_weights, weights, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("bad", [-1, 101])
def test_num_token_non_padded_out_of_range(bad: int) -> None:
    logits = np.zeros((100, 8), dtype=np.float32)
    with pytest.raises(moelb.InvalidArgumentError, match="num_token_non_padded"):
        moelb.select_experts(logits, moelb.TopKConfig(top_k=2), num_token_non_padded=bad)


@pytest.mark.parametrize("shared", [0, 1])
def test_empty_input(shared: int) -> None:
    config = moelb.TopKConfig(top_k=3, num_fused_shared_experts=shared)
    out = moelb.select_experts(np.zeros((0, 16), dtype=np.float32), config)
    assert out.topk_ids.shape == (0, 3 + shared)
    assert out.topk_weights.shape == (0, 3 + shared)
    assert out.recorder_topk_ids.shape == (0, 3)


def test_output_is_a_named_tuple_of_fresh_arrays() -> None:
    logits = np.random.default_rng(0).standard_normal((10, 16)).astype(np.float32)
    out = moelb.select_experts(logits, moelb.TopKConfig(top_k=2, num_fused_shared_experts=1))
    ids, weights, recorder = out
    assert ids is out.topk_ids and weights is out.topk_weights and recorder is out.recorder_topk_ids
    for array in out:
        assert array.flags.c_contiguous and array.flags.writeable and array.flags.owndata
    np.testing.assert_array_equal(out.recorder_topk_ids, out.topk_ids[:, :2])


# ---------------------------------------------------------------------------------------------
# Location / layer / ep_rank mapping


def redundant_location(num_layers: int = 3) -> moelb.ExpertLocation:
    """E=16 logical experts on P=32 slots, 4 ranks on 2 nodes; every layer a different placement
    (each expert twice, shuffled)."""
    rng = np.random.default_rng(21)
    rows = [
        rng.permutation(np.concatenate([np.arange(16), np.arange(16)])) for _ in range(num_layers)
    ]
    return moelb.ExpertLocation(np.array(rows), num_logical_experts=16, ep_size=4, num_nodes=2)


@pytest.mark.parametrize("dispatch", [d for d in moelb.DISPATCH_ALGORITHMS if d != "equal_split"])
@pytest.mark.parametrize("shared", [0, 1])
def test_location_maps_logical_to_physical(dispatch: str, shared: int) -> None:
    location = redundant_location()
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((500, 16)).astype(np.float32)
    bias = make_bias("sigmoid", 16)
    config = moelb.TopKConfig(
        top_k=4, scoring="sigmoid", num_groups=4, topk_group=2, num_fused_shared_experts=shared
    )
    logical = moelb.select_experts(logits, config, bias)
    for layer in range(location.num_layers):
        for rank in range(location.ep_size):
            out = moelb.select_experts(
                logits,
                config,
                bias,
                location=location,
                layer=layer,
                ep_rank=rank,
                dispatch=dispatch,
                seed=5,
            )
            routed = out.topk_ids[:, :4]
            # Each physical slot holds the chosen logical expert.
            np.testing.assert_array_equal(
                location.physical_to_logical[layer][routed], logical.topk_ids[:, :4]
            )
            expected = moelb.dispatch_tokens(
                np.ascontiguousarray(logical.topk_ids[:, :4]),
                location,
                layer,
                dispatch,
                ep_rank=rank,
                seed=5,
            )
            np.testing.assert_array_equal(routed, expected)
            if dispatch in moelb.dispatch.TABLE_DISPATCH:
                table = moelb.dispatch_table(location, dispatch, rank, 5)[layer]
                np.testing.assert_array_equal(routed, table[logical.topk_ids[:, :4]])
            if shared:
                np.testing.assert_array_equal(out.topk_ids[:, 4], location.num_physical_experts)
            np.testing.assert_array_equal(out.recorder_topk_ids, routed)
            np.testing.assert_array_equal(out.topk_weights, logical.topk_weights)


def test_location_with_padding_masks_after_mapping() -> None:
    location = redundant_location()
    logits = np.random.default_rng(4).standard_normal((20, 16)).astype(np.float32)
    config = moelb.TopKConfig(top_k=2, scoring="softmax", num_fused_shared_experts=1)
    out = moelb.select_experts(logits, config, None, 12, location, 1, 3)
    np.testing.assert_array_equal(out.topk_ids[12:], -1)
    np.testing.assert_array_equal(out.recorder_topk_ids[12:], -1)
    np.testing.assert_array_equal(out.topk_weights[12:], 0.0)
    assert (out.topk_ids[:12, :2] >= 0).all() and (out.topk_ids[:12, 2] == 32).all()


def test_location_requires_layer() -> None:
    location = redundant_location()
    logits = np.zeros((4, 16), dtype=np.float32)
    with pytest.raises(moelb.InvalidArgumentError, match="layer"):
        moelb.select_experts(logits, moelb.TopKConfig(top_k=2), location=location)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"layer": 3}, "layer=3"),
        ({"layer": -1}, "layer=-1"),
        ({"layer": 0, "ep_rank": 4}, "ep_rank=4"),
        ({"layer": 0, "ep_rank": -1}, "ep_rank=-1"),
        ({"layer": 0, "dispatch": "nearest"}, "dispatch"),
        ({"layer": 0, "seed": -1}, "seed"),
    ],
)
def test_location_argument_errors(kwargs: dict, match: str) -> None:
    logits = np.zeros((4, 16), dtype=np.float32)
    with pytest.raises(moelb.InvalidArgumentError, match=match):
        moelb.select_experts(
            logits, moelb.TopKConfig(top_k=2), location=redundant_location(), **kwargs
        )


def test_location_expert_count_must_match_logits() -> None:
    location = moelb.ExpertLocation.trivial(1, 8, 8, 2)
    with pytest.raises(moelb.InvalidArgumentError, match="num_logical_experts"):
        moelb.select_experts(
            np.zeros((4, 16), dtype=np.float32),
            moelb.TopKConfig(top_k=2),
            location=location,
            layer=0,
        )


# ---------------------------------------------------------------------------------------------
# Input validation


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32])
def test_wrong_dtype_is_rejected_without_conversion(dtype) -> None:
    logits = np.zeros((4, 8), dtype=dtype)
    with pytest.raises(moelb.InvalidDTypeError, match="router_logits") as info:
        moelb.select_experts(logits, moelb.TopKConfig(top_k=2))
    assert isinstance(info.value, ValueError) and isinstance(info.value, TypeError)
    assert "float32" in str(info.value)


def test_python_list_is_not_float32() -> None:
    with pytest.raises(TypeError, match="router_logits"):
        moelb.select_experts([[0.0, 1.0], [1.0, 0.0]], moelb.TopKConfig(top_k=1))


@pytest.mark.parametrize(
    "make",
    [lambda x: x[:, ::2], lambda x: np.asfortranarray(x), lambda x: x.T],
    ids=["strided", "fortran", "transposed"],
)
def test_non_contiguous_is_rejected(make) -> None:
    logits = make(np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32))
    assert not logits.flags.c_contiguous
    with pytest.raises(moelb.InvalidArgumentError, match="C-contiguous") as info:
        moelb.select_experts(logits, moelb.TopKConfig(top_k=2))
    assert "router_logits" in str(info.value)


@pytest.mark.parametrize("shape", [(8,), (2, 4, 8), ()])
def test_wrong_ndim_is_rejected(shape) -> None:
    with pytest.raises(moelb.InvalidArgumentError, match=r"router_logits.*2-D"):
        moelb.select_experts(np.zeros(shape, dtype=np.float32), moelb.TopKConfig(top_k=1))


class ArrayInterfaceOnly:
    """An array-like that is not an ndarray (as a torch CPU tensor is): only __array_interface__."""

    def __init__(self, array: np.ndarray) -> None:
        self._array = array
        self.__array_interface__ = array.__array_interface__


def test_accepts_array_likes_and_contiguous_views() -> None:
    rng = np.random.default_rng(0)
    big = rng.standard_normal((200, 32)).astype(np.float32)
    config = moelb.TopKConfig(top_k=4, scoring="sigmoid")
    expected = moelb.select_experts(np.array(big[50:150]), config)
    for candidate in (big[50:150], ArrayInterfaceOnly(big[50:150])):
        out = moelb.select_experts(candidate, config)
        np.testing.assert_array_equal(out.topk_ids, expected.topk_ids)
        np.testing.assert_array_equal(out.topk_weights, expected.topk_weights)
    with pytest.raises(moelb.InvalidDTypeError, match="router_logits"):
        moelb.select_experts(ArrayInterfaceOnly(big.astype(np.float64)), config)


def test_accepts_torch_cpu_tensors() -> None:
    torch = pytest.importorskip("torch")
    logits = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    config = moelb.TopKConfig(top_k=4, scoring="sigmoid")
    out = moelb.select_experts(logits, config)
    np.testing.assert_array_equal(
        out.topk_ids, moelb.select_experts(logits.numpy(), config).topk_ids
    )
    with pytest.raises(moelb.InvalidDTypeError, match="router_logits"):
        moelb.select_experts(logits.double(), config)
    with pytest.raises(moelb.InvalidArgumentError, match="C-contiguous"):
        moelb.select_experts(logits.t(), config)


@pytest.mark.parametrize(
    ("bias", "match"),
    [
        (np.zeros(7, dtype=np.float32), "correction_bias has 7"),
        (np.zeros((1, 8), dtype=np.float32), "correction_bias must be 1-D"),
        (np.array([0, 0, np.nan, 0, 0, 0, 0, 0], dtype=np.float32), r"correction_bias\[2\]"),
        (np.array([0, 0, 0, 0, 0, 0, 0, np.inf], dtype=np.float32), r"correction_bias\[7\]"),
        (np.array(["a"] * 8), "correction_bias"),
    ],
)
def test_bad_correction_bias(bias, match: str) -> None:
    with pytest.raises(moelb.InvalidArgumentError, match=match):
        moelb.select_experts(np.zeros((2, 8), dtype=np.float32), moelb.TopKConfig(top_k=2), bias)


def test_correction_bias_may_be_any_float_vector() -> None:
    logits = np.random.default_rng(0).standard_normal((30, 8)).astype(np.float32)
    bias64 = np.linspace(-0.5, 0.5, 8)
    config = moelb.TopKConfig(top_k=2, scoring="sigmoid")
    a = moelb.select_experts(logits, config, bias64)
    b = moelb.select_experts(logits, config, bias64.astype(np.float32))
    np.testing.assert_array_equal(a.topk_ids, b.topk_ids)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"top_k": 0}, "top_k"),
        ({"top_k": 2, "scoring": "relu"}, "scoring"),
        ({"top_k": 2, "num_groups": 4}, "topk_group"),
        ({"top_k": 2, "topk_group": 1}, "num_groups"),
        ({"top_k": 2, "num_groups": 4, "topk_group": 5}, "topk_group=5"),
        ({"top_k": 2, "num_groups": 4, "topk_group": 0}, "topk_group=0"),
        ({"top_k": 2, "num_groups": 0, "topk_group": 1}, "num_groups"),
        ({"top_k": 2, "num_groups": 4, "topk_group": 2, "group_score": "sum"}, "group_score"),
        ({"top_k": 2, "num_fused_shared_experts": 2}, "num_fused_shared_experts"),
        ({"top_k": 2, "num_fused_shared_experts": -1}, "num_fused_shared_experts"),
        ({"top_k": 2, "routed_scaling_factor": 0.0}, "routed_scaling_factor"),
        ({"top_k": 2, "routed_scaling_factor": -1.0}, "routed_scaling_factor"),
        ({"top_k": 2, "routed_scaling_factor": float("nan")}, "routed_scaling_factor"),
        ({"top_k": 2, "routed_scaling_factor": float("inf")}, "routed_scaling_factor"),
    ],
)
def test_bad_config(kwargs: dict, match: str) -> None:
    with pytest.raises(moelb.InvalidArgumentError, match=match):
        moelb.TopKConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "num_experts", "match"),
    [
        ({"top_k": 9}, 8, "top_k=9"),
        ({"top_k": 2, "num_groups": 3, "topk_group": 1}, 8, "num_groups=3"),
        ({"top_k": 5, "num_groups": 4, "topk_group": 2}, 8, "top_k=5"),
    ],
)
def test_config_does_not_fit_the_logits(kwargs: dict, num_experts: int, match: str) -> None:
    config = moelb.TopKConfig(**kwargs)
    with pytest.raises(moelb.InvalidArgumentError, match=match):
        moelb.select_experts(np.zeros((2, num_experts), dtype=np.float32), config)


def test_config_repr_equality_and_pickle() -> None:
    import pickle

    config = moelb.TopKConfig(
        top_k=3,
        scoring="sqrtsoftplus",
        num_groups=4,
        topk_group=2,
        group_score="max",
        renormalize=False,
        routed_scaling_factor=2.5,
        apply_routed_scaling_factor_on_output=True,
        num_fused_shared_experts=1,
    )
    clone = pickle.loads(pickle.dumps(config))
    assert clone == config
    assert clone.group_score == "max" and clone.num_fused_shared_experts == 1
    assert config != moelb.TopKConfig(top_k=3)
    assert "top_k=3" in repr(config) and "sqrtsoftplus" in repr(config)
    assert config.output_columns == 4


# ---------------------------------------------------------------------------------------------
# Threads


def test_thread_count_does_not_change_results(restore_num_threads) -> None:
    rng = np.random.default_rng(12)
    bias = make_bias("sigmoid", 256)
    logits = rng.standard_normal((20_000, 256)).astype(np.float32)
    logits[rng.random(logits.shape) < 0.01] = np.nan
    config = moelb.TopKConfig.deepseek_v3()
    location = moelb.ExpertLocation.trivial(2, 256, 288, 8, 2)
    results = {}
    for threads in (1, 2, 3):
        moelb.set_num_threads(threads)
        assert moelb.get_num_threads() == threads
        results[threads] = moelb.select_experts(
            logits, config, bias, 19_000, location, 1, 5, dispatch="sglang_dynamic", seed=3
        )
    for threads in (2, 3):
        for got, want in zip(results[threads], results[1], strict=True):
            np.testing.assert_array_equal(got, want)
    moelb.set_num_threads(0)
    assert moelb.get_num_threads() >= 1


def test_concurrent_python_threads_match_serial() -> None:
    rng = np.random.default_rng(13)
    configs = [
        moelb.TopKConfig.deepseek_v3(),
        moelb.TopKConfig.deepseek_v4_flash(),
        moelb.TopKConfig(top_k=4, scoring="softmax", num_fused_shared_experts=1),
    ]
    jobs = [
        (
            rng.standard_normal((8000, 256)).astype(np.float32),
            configs[i % 3],
            make_bias("sigmoid", 256),
        )
        for i in range(12)
    ]
    serial = [moelb.select_experts(*job) for job in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(lambda job: moelb.select_experts(*job), jobs))
    for got, want in zip(parallel, serial, strict=True):
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# Per-rank shared-slot remap


@pytest.mark.parametrize(
    ("ids", "num_physical_experts", "ep_size", "ep_rank", "expected"),
    [
        ([[0, 33, 263, 256]], 264, 8, 7, [[0, 34, 270, 271]]),
        ([[0, 65, 256], [63, 127, 256]], 256, 4, 2, [[0, 66, 194], [63, 128, 194]]),
        ([[5, 40, 100, 256]], 256, 8, 0, [[5, 41, 103, 32]]),
        (
            [[0, 32, 64, 96, 128, 160, 192, 224, 256]],
            256,
            8,
            0,
            [[0, 33, 66, 99, 132, 165, 198, 231, 32]],
        ),
    ],
)
def test_remap_examples(ids, num_physical_experts, ep_size, ep_rank, expected) -> None:
    topk_ids = np.array(ids, dtype=np.int32)
    before = topk_ids.copy()
    out = moelb.remap_topk_for_per_rank_shared_slots(
        topk_ids, num_physical_experts, ep_size, ep_rank
    )
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(topk_ids, before)  # input untouched


def test_remap_after_select_experts_with_location() -> None:
    # DeepEP layout: route with the shared column at P, then remap; recorder keeps physical ids.
    location = moelb.ExpertLocation.trivial(1, 256, 264, 8)
    rng = np.random.default_rng(14)
    logits = rng.standard_normal((300, 256)).astype(np.float32)
    config = moelb.TopKConfig(
        top_k=8, scoring="sigmoid", num_groups=8, topk_group=4, num_fused_shared_experts=1
    )
    out = moelb.select_experts(logits, config, None, 280, location, 0, 7)
    remapped = moelb.remap_topk_for_per_rank_shared_slots(out.topk_ids, 264, 8, 7)
    s = 33
    routed = out.topk_ids[:280, :8]
    np.testing.assert_array_equal(remapped[:280, :8], routed + routed // s)
    np.testing.assert_array_equal(remapped[:280, 8], 7 * (s + 1) + s)
    np.testing.assert_array_equal(remapped[280:], -1)  # padded rows get no phantom shared expert
    np.testing.assert_array_equal(out.recorder_topk_ids[:280], routed)


@given(
    ep_size=st.integers(1, 8),
    slots_per_rank=st.integers(1, 12),
    shared=st.integers(1, 2),
    data=st.data(),
)
def test_remap_property(ep_size: int, slots_per_rank: int, shared: int, data) -> None:
    p = ep_size * slots_per_rank
    rank = data.draw(st.integers(0, ep_size - 1))
    k = data.draw(st.integers(1, 5))
    rows = data.draw(st.integers(0, 6))
    routed = data.draw(hnp.arrays(np.int32, (rows, k), elements=st.integers(-1, p - 1)))
    ids = np.concatenate([routed, np.full((rows, shared), 12345, dtype=np.int32)], axis=1)
    out = moelb.remap_topk_for_per_rank_shared_slots(ids, p, ep_size, rank, shared)
    width = slots_per_rank + shared  # slots per rank in the expanded layout
    valid = routed >= 0
    new = out[:, :k]
    # Routed: same rank, same local index; -1 stays -1.
    np.testing.assert_array_equal(new[~valid], -1)
    np.testing.assert_array_equal(new[valid] // width, routed[valid] // slots_per_rank)
    np.testing.assert_array_equal(new[valid] % width, routed[valid] % slots_per_rank)
    # Shared column j: this rank's own slot S + j; rows without any routed expert stay -1.
    live = valid.any(axis=1)
    for j in range(shared):
        np.testing.assert_array_equal(out[live, k + j], rank * width + slots_per_rank + j)
        np.testing.assert_array_equal(out[~live, k + j], -1)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((np.array([[264, 300]], dtype=np.int32), 264, 8, 0), r"topk_ids\[0, 0\] = 264"),
        ((np.array([[-2, 300]], dtype=np.int32), 264, 8, 0), r"topk_ids\[0, 0\] = -2"),
        ((np.array([[0, 300]], dtype=np.int32), 260, 8, 0), "num_physical_experts=260"),
        ((np.array([[0, 300]], dtype=np.int32), 264, 8, 8), "ep_rank=8"),
        ((np.array([[0, 300]], dtype=np.int32), 264, 0, 0), "ep_size"),
        ((np.array([[300]], dtype=np.int32), 264, 8, 0), "columns"),
        ((np.array([0, 300], dtype=np.int32), 264, 8, 0), "topk_ids must be 2-D"),
    ],
)
def test_remap_errors(args, match: str) -> None:
    with pytest.raises(moelb.InvalidArgumentError, match=match):
        moelb.remap_topk_for_per_rank_shared_slots(*args)


def test_remap_ignores_the_incoming_shared_column() -> None:
    # The shared column's incoming value (E, or P after dispatch) is replaced, not validated.
    ids = np.array([[0, 300], [40, -7]], dtype=np.int32)
    out = moelb.remap_topk_for_per_rank_shared_slots(ids, 264, 8, 1)
    np.testing.assert_array_equal(out, [[0, 67], [41, 67]])


def test_remap_rejects_int64() -> None:
    with pytest.raises(moelb.InvalidDTypeError, match="topk_ids"):
        moelb.remap_topk_for_per_rank_shared_slots(np.zeros((2, 3), dtype=np.int64), 8, 2, 0)


# ---------------------------------------------------------------------------------------------
# Property tests of select_experts on small inputs


@st.composite
def small_routing_problem(draw):
    num_experts = draw(st.sampled_from([4, 6, 8, 12, 16]))
    scoring = draw(st.sampled_from(SCORINGS))
    groups: dict = {}
    if draw(st.booleans()):
        num_groups = draw(st.sampled_from([g for g in (1, 2, 3, 4) if num_experts % g == 0]))
        topk_group = draw(st.integers(1, num_groups))
        groups = {
            "num_groups": num_groups,
            "topk_group": topk_group,
            "group_score": draw(st.sampled_from(["top2_sum", "max"])),
        }
        kept = topk_group * num_experts // num_groups
    else:
        kept = num_experts
    params = dict(
        top_k=draw(st.integers(1, min(kept, 5))),
        scoring=scoring,
        renormalize=draw(st.booleans()),
        routed_scaling_factor=draw(st.sampled_from([1.0, 2.5, 0.5])),
        apply_routed_scaling_factor_on_output=draw(st.booleans()),
        num_fused_shared_experts=draw(st.integers(0, 1)),
        **groups,
    )
    rows = draw(st.integers(1, 8))
    elements = st.floats(-30, 30, width=32) | st.just(float("nan"))
    logits = draw(hnp.arrays(np.float32, (rows, num_experts), elements=elements))
    bias = None
    if draw(st.booleans()):
        bias = draw(hnp.arrays(np.float32, (num_experts,), elements=st.floats(-1, 1, width=32)))
    non_padded = draw(st.none() | st.integers(0, rows))
    return params, logits, bias, non_padded


@given(small_routing_problem())
def test_select_experts_properties(problem) -> None:
    params, logits, bias, non_padded = problem
    config = moelb.TopKConfig(**params)
    out = moelb.select_experts(logits, config, bias, non_padded)
    t, e = logits.shape
    k = params["top_k"]
    n = t if non_padded is None else non_padded
    routed = out.topk_ids[:n, :k]
    # In range, distinct, finite non-negative weights, shared column, recorder ids.
    assert ((routed >= 0) & (routed < e)).all()
    assert all(len(set(row)) == k for row in routed.tolist())
    assert np.isfinite(out.topk_weights).all() and (out.topk_weights >= 0).all()
    if params["num_fused_shared_experts"]:
        assert (out.topk_ids[:n, k] == e).all()
    np.testing.assert_array_equal(out.recorder_topk_ids, out.topk_ids[:, :k])
    assert (out.topk_ids[n:] == -1).all() and (out.topk_weights[n:] == 0).all()
    # A NaN logit is chosen only when the eligible non-NaN experts run out.
    finite_count = (~np.isnan(logits[:n])).sum(axis=1)
    if "num_groups" not in params:
        chosen_nan = np.isnan(np.take_along_axis(logits[:n], routed, axis=1)).sum(axis=1)
        np.testing.assert_array_equal(chosen_nan, np.maximum(0, k - finite_count))
    if "num_groups" in params:
        per_group = e // params["num_groups"]
        for row in routed:
            assert len(set((row // per_group).tolist())) <= params["topk_group"]
    # Where no near-tie decides the row, the reference agrees exactly.
    ids, weights, margin = reference_select_experts(
        logits, correction_bias=bias, num_token_non_padded=non_padded, **params
    )
    ok = margin >= MIN_MARGIN
    np.testing.assert_array_equal(out.topk_ids[ok], ids[ok])
    np.testing.assert_allclose(out.topk_weights[ok], weights[ok], rtol=1e-5, atol=1e-6)


@given(
    scoring=st.sampled_from(SCORINGS),
    num_groups=st.sampled_from([None, 2, 4]),
    logits=hnp.arrays(np.float32, (6, 8), elements=st.integers(-3, 3).map(float)),
)
def test_integer_logit_ties_match_reference(scoring, num_groups, logits) -> None:
    groups = (
        {}
        if num_groups is None
        else {"num_groups": num_groups, "topk_group": 1, "group_score": "max"}
    )
    top_k = 2
    out = moelb.select_experts(logits, moelb.TopKConfig(top_k=top_k, scoring=scoring, **groups))
    ids, _, _ = reference_select_experts(logits, top_k=top_k, scoring=scoring, **groups)
    np.testing.assert_array_equal(out.topk_ids, ids)
