"""The DeepSeek-V4 hash router against the NumPy reference (routing_reference.reference_hash_select)
and the worked example of reference/routing_waterfill.md section 6.4."""

from __future__ import annotations

import gc
import zlib

import moelb
import numpy as np
import pytest
from routing_reference import reference_hash_select

NUM_TOKENS = 10_000
VOCAB = 4096
RTOL, ATOL = 1e-6, 1e-7


def random_table(rng: np.random.Generator, vocab: int, num_experts: int, top_k: int) -> np.ndarray:
    """[vocab, top_k] int32: distinct experts per token id."""
    return np.argsort(rng.random((vocab, num_experts)), axis=1)[:, :top_k].astype(np.int32)


CASES = [
    # (scoring, E, K, rsf, F, rsf on output, input_ids dtype)
    ("sqrtsoftplus", 256, 6, 1.5, 0, False, np.int32),
    ("sqrtsoftplus", 256, 6, 1.5, 1, False, np.int64),
    ("sqrtsoftplus", 384, 6, 2.5, 0, False, np.int64),
    ("sqrtsoftplus", 384, 6, 2.5, 1, False, np.int32),
    ("sqrtsoftplus", 256, 6, 2.5, 0, True, np.int32),
    ("sqrtsoftplus", 384, 6, 1.5, 1, True, np.int64),
    ("sigmoid", 256, 6, 2.5, 1, False, np.int32),
    ("sigmoid", 384, 8, 1.5, 0, True, np.int64),
    ("softmax", 256, 6, 1.5, 1, False, np.int64),
    ("softmax", 384, 6, 2.5, 0, False, np.int32),
    ("softmax", 256, 4, 2.5, 1, True, np.int32),
]


def case_id(case) -> str:
    scoring, e, k, rsf, f, fold, dtype = case
    fold_name = "rsf_on_output" if fold else "rsf_later"
    return f"{scoring}-E{e}-K{k}-rsf{rsf}-F{f}-{fold_name}-{np.dtype(dtype).name}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_hash_router_matches_reference(case) -> None:
    scoring, num_experts, top_k, rsf, shared, fold, dtype = case
    rng = np.random.default_rng(zlib.crc32(case_id(case).encode()))
    table = random_table(rng, VOCAB, num_experts, top_k)
    logits = (rng.standard_normal((NUM_TOKENS, num_experts)) * 2).astype(np.float32)
    input_ids = rng.integers(0, VOCAB, NUM_TOKENS).astype(dtype)
    router = moelb.HashRouter(
        table,
        scoring=scoring,
        routed_scaling_factor=rsf,
        num_fused_shared_experts=shared,
        apply_routed_scaling_factor_on_output=fold,
        num_experts=num_experts,
    )
    out = router.select(logits, input_ids)
    ids, weights = reference_hash_select(
        logits,
        input_ids,
        table,
        scoring=scoring,
        routed_scaling_factor=rsf,
        num_fused_shared_experts=shared,
        apply_routed_scaling_factor_on_output=fold,
    )
    assert out.topk_ids.dtype == np.int32 and out.topk_weights.dtype == np.float32
    assert out.topk_ids.shape == (NUM_TOKENS, top_k + shared)
    np.testing.assert_array_equal(out.topk_ids, ids)
    np.testing.assert_array_equal(out.topk_ids[:, :top_k], table[input_ids])
    np.testing.assert_allclose(out.topk_weights, weights, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(out.recorder_topk_ids, out.topk_ids[:, :top_k])
    routed_sum = out.topk_weights[:, :top_k].astype(np.float64).sum(axis=1)
    if scoring != "softmax":
        np.testing.assert_allclose(routed_sum, rsf if fold else 1.0, rtol=1e-5)
    else:
        assert (routed_sum < (rsf if fold else 1.0)).all()  # probabilities over all E experts


@pytest.mark.parametrize(
    ("scoring", "expected"),
    [
        ("sqrtsoftplus", [0.636590, 0.363410, 0.666667]),
        ("softmax", [0.236883, 0.032059, 0.179294]),
    ],
)
@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_worked_example(scoring: str, expected: list[float], dtype) -> None:
    # reference/routing_waterfill.md 6.4: E=4, logits [0, 1, 2, 3], tid2eid[t] = [2, 0], rsf 1.5,
    # one fused shared expert.
    router = moelb.HashRouter(
        np.array([[1, 3], [2, 0]]),
        scoring=scoring,
        routed_scaling_factor=1.5,
        num_fused_shared_experts=1,
    )
    out = router.select(np.array([[0, 1, 2, 3]], dtype=np.float32), np.array([1], dtype=dtype))
    np.testing.assert_array_equal(out.topk_ids, [[2, 0, 4]])
    np.testing.assert_allclose(out.topk_weights[0], expected, atol=1e-6)
    np.testing.assert_array_equal(out.recorder_topk_ids, [[2, 0]])


def test_worked_example_scores_from_first_principles() -> None:
    x = np.arange(4.0)
    sqrt_softplus = np.sqrt(np.log1p(np.exp(x)))
    np.testing.assert_allclose(sqrt_softplus, [0.832555, 1.145976, 1.458399, 1.746020], atol=1e-6)
    router = moelb.HashRouter(np.array([[2, 0]]), routed_scaling_factor=1.5)
    out = router.select(np.array([[0, 1, 2, 3]], dtype=np.float32), np.zeros(1, dtype=np.int32))
    w = sqrt_softplus[[2, 0]]
    np.testing.assert_allclose(out.topk_weights[0], w / w.sum(), rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
@pytest.mark.parametrize("bad", [-1, VOCAB, VOCAB + 1000])
def test_out_of_range_token_id(dtype, bad: int) -> None:
    rng = np.random.default_rng(0)
    router = moelb.HashRouter(random_table(rng, VOCAB, 16, 2))
    input_ids = np.zeros(10, dtype=dtype)
    input_ids[7] = bad
    with pytest.raises(moelb.InvalidArgumentError, match=rf"input_ids\[7\] = {bad}"):
        router.select(np.zeros((10, 16), dtype=np.float32), input_ids)


def test_huge_int64_token_id() -> None:
    router = moelb.HashRouter(np.tile(np.array([[0, 1]], dtype=np.int32), (8, 1)))
    with pytest.raises(moelb.InvalidArgumentError, match="input_ids"):
        router.select(np.zeros((1, 4), dtype=np.float32), np.array([2**40], dtype=np.int64))


@pytest.mark.parametrize("shared", [0, 1])
@pytest.mark.parametrize("non_padded", [0, 5, 64])
def test_padding_skips_token_id_checks(shared: int, non_padded: int) -> None:
    rng = np.random.default_rng(1)
    table = random_table(rng, 100, 32, 4)
    logits = rng.standard_normal((64, 32)).astype(np.float32)
    input_ids = rng.integers(0, 100, 64).astype(np.int64)
    input_ids[non_padded:] = -12345  # garbage in padded rows must not be looked up
    router = moelb.HashRouter(table, routed_scaling_factor=2.5, num_fused_shared_experts=shared)
    out = router.select(logits, input_ids, num_token_non_padded=non_padded)
    np.testing.assert_array_equal(out.topk_ids[non_padded:], -1)
    np.testing.assert_array_equal(out.topk_weights[non_padded:], 0.0)
    np.testing.assert_array_equal(out.recorder_topk_ids[non_padded:], -1)
    ids, weights = reference_hash_select(
        logits,
        input_ids,
        table,
        routed_scaling_factor=2.5,
        num_fused_shared_experts=shared,
        num_token_non_padded=non_padded,
    )
    np.testing.assert_array_equal(out.topk_ids, ids)
    np.testing.assert_allclose(out.topk_weights, weights, rtol=RTOL, atol=ATOL)


def test_num_token_non_padded_out_of_range() -> None:
    router = moelb.HashRouter(np.array([[0, 1]]))
    with pytest.raises(moelb.InvalidArgumentError, match="num_token_non_padded"):
        router.select(np.zeros((3, 4), dtype=np.float32), np.zeros(3, np.int32), 4)


@pytest.mark.parametrize("scoring", ["sqrtsoftplus", "sigmoid", "softmax"])
def test_nan_logits_give_finite_weights(scoring: str) -> None:
    router = moelb.HashRouter(
        np.array([[0, 1], [2, 3]]),
        scoring=scoring,
        num_fused_shared_experts=1,
        routed_scaling_factor=2.0,
    )
    logits = np.array(
        [[np.nan, np.nan, 1.0, 2.0], [np.nan] * 4, [0.0, 1.0, np.nan, 3.0]], dtype=np.float32
    )
    out = router.select(logits, np.array([0, 0, 1], dtype=np.int32))
    assert np.isfinite(out.topk_weights).all()
    np.testing.assert_array_equal(out.topk_weights[:2, :2], 0.0)  # NaN scores are 0
    ids, weights = reference_hash_select(
        logits,
        [0, 0, 1],
        [[0, 1], [2, 3]],
        scoring=scoring,
        num_fused_shared_experts=1,
        routed_scaling_factor=2.0,
    )
    np.testing.assert_array_equal(out.topk_ids, ids)
    np.testing.assert_allclose(out.topk_weights, weights, rtol=RTOL, atol=ATOL)


def test_location_maps_hash_routed_ids() -> None:
    rng = np.random.default_rng(3)
    p2l = np.array([rng.permutation(np.arange(24) % 16) for _ in range(2)])
    location = moelb.ExpertLocation(p2l, 16, ep_size=4, num_nodes=2)
    table = random_table(rng, 50, 16, 3)
    logits = rng.standard_normal((40, 16)).astype(np.float32)
    input_ids = rng.integers(0, 50, 40).astype(np.int32)
    router = moelb.HashRouter(table, num_fused_shared_experts=1, routed_scaling_factor=2.5)
    plain = router.select(logits, input_ids)
    for rank in range(4):
        out = router.select(logits, input_ids, 30, location, 1, rank)
        static = moelb.dispatch_table(location, "sglang_static", rank)[1]
        np.testing.assert_array_equal(out.topk_ids[:30, :3], static[table[input_ids[:30]]])
        np.testing.assert_array_equal(out.topk_ids[:30, 3], 24)  # the shared column becomes P
        np.testing.assert_array_equal(out.topk_ids[30:], -1)
        np.testing.assert_array_equal(out.recorder_topk_ids[:30], out.topk_ids[:30, :3])
        np.testing.assert_array_equal(out.recorder_topk_ids[30:], -1)
        np.testing.assert_array_equal(out.topk_weights[:30], plain.topk_weights[:30])
    with pytest.raises(moelb.InvalidArgumentError, match="layer"):
        router.select(logits, input_ids, location=location)


# ---------------------------------------------------------------------------------------------
# Construction and argument errors


def test_properties_and_read_only_table() -> None:
    table = np.array([[3, 1], [0, 2], [1, 1]], dtype=np.int64)
    router = moelb.HashRouter(
        table,
        scoring="softmax",
        routed_scaling_factor=2.5,
        num_fused_shared_experts=1,
        num_experts=4,
    )
    assert router.vocab_size == 3 and router.top_k == 2 and router.num_experts == 4
    assert router.scoring == "softmax" and router.routed_scaling_factor == 2.5
    assert router.num_fused_shared_experts == 1
    assert router.apply_routed_scaling_factor_on_output is False
    assert router.renormalize is False
    assert moelb.HashRouter(table).renormalize is True
    assert moelb.HashRouter(table).num_experts is None
    view = router.tid2eid
    assert view.dtype == np.int32
    np.testing.assert_array_equal(view, table)
    with pytest.raises(ValueError):
        view[0, 0] = 2
    del router
    gc.collect()
    np.testing.assert_array_equal(view, table)  # the view keeps its router alive


@pytest.mark.parametrize(
    ("table", "kwargs", "match"),
    [
        (np.array([[0, -1]]), {}, r"tid2eid\[0, 1\] = -1"),
        (np.array([[0, 1], [4, 0]]), {"num_experts": 4}, r"tid2eid\[1, 0\] = 4"),
        (np.zeros((0, 2), dtype=np.int32), {}, "tid2eid"),
        (np.zeros((3, 0), dtype=np.int32), {}, "tid2eid"),
        (np.array([0, 1]), {}, "tid2eid must be 2-D"),
        (np.array([[0, 1]]), {"scoring": "tanh"}, "scoring"),
        (np.array([[0, 1]]), {"routed_scaling_factor": 0.0}, "routed_scaling_factor"),
        (np.array([[0, 1]]), {"num_fused_shared_experts": 2}, "num_fused_shared_experts"),
        (np.array([[0, 1]]), {"num_experts": 0}, "num_experts"),
        (np.array([[0, 2**33]]), {}, "tid2eid"),
    ],
)
def test_bad_construction(table, kwargs: dict, match: str) -> None:
    with pytest.raises(moelb.InvalidArgumentError, match=match):
        moelb.HashRouter(table, **kwargs)


def test_float_table_is_a_dtype_error() -> None:
    with pytest.raises(moelb.InvalidDTypeError, match="tid2eid"):
        moelb.HashRouter(np.array([[0.0, 1.0]]))


def test_select_argument_errors() -> None:
    router = moelb.HashRouter(np.array([[0, 5], [1, 2]]))
    logits = np.zeros((3, 8), dtype=np.float32)
    ids = np.zeros(3, dtype=np.int32)
    with pytest.raises(moelb.InvalidDTypeError, match="router_logits"):
        router.select(logits.astype(np.float64), ids)
    with pytest.raises(moelb.InvalidArgumentError, match="C-contiguous"):
        router.select(np.zeros((8, 3), dtype=np.float32).T, ids)
    with pytest.raises(moelb.InvalidDTypeError, match="input_ids"):
        router.select(logits, ids.astype(np.float32))
    with pytest.raises(moelb.InvalidDTypeError, match="input_ids"):
        router.select(logits, ids.astype(np.uint32))
    with pytest.raises(moelb.InvalidArgumentError, match="input_ids must be 1-D"):
        router.select(logits, ids.reshape(3, 1))
    with pytest.raises(moelb.InvalidArgumentError, match="input_ids has 2 tokens"):
        router.select(logits, ids[:2])
    with pytest.raises(moelb.InvalidArgumentError, match="C-contiguous"):
        router.select(logits, np.zeros(6, dtype=np.int32)[::2])
    with pytest.raises(moelb.InvalidArgumentError, match="expert id 5"):
        router.select(np.zeros((3, 5), dtype=np.float32), ids)  # tid2eid holds 5 >= E
    fixed = moelb.HashRouter(np.array([[0, 5]]), num_experts=8)
    with pytest.raises(moelb.InvalidArgumentError, match="num_experts=8"):
        fixed.select(np.zeros((1, 6), dtype=np.float32), np.zeros(1, dtype=np.int32))
