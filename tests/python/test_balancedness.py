"""One balancedness (DESIGN.md section 3, reference/recorder.md section 7.2; issue 16): SGLang's
per-layer utilization rate ``(mean_g + 1e-5) / (max_g + 1e-5)`` over the per-GPU loads, averaged
over ALL layers (dense and idle layers count 1.0) wherever a value is called balancedness -- the
recorder, the planner's statistics and the CLI -- and the variant over the layers with load only
under its own name (``active``). The references below are written from reference/recorder.md,
independently of moelb."""

from __future__ import annotations

import math

import moelb
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

EPS = 1e-5


def sglang_compute_utilization_rate(gpu_physical_count: np.ndarray) -> np.ndarray:
    """SGLang's ``compute_utilization_rate``: [L, W] per-GPU counts -> [L] rates, in float32."""
    gpu = gpu_physical_count.astype(np.float32)
    return (gpu.mean(axis=-1) + np.float32(EPS)) / (gpu.max(axis=-1) + np.float32(EPS))


def sglang_pass_balancedness(counts: np.ndarray, ep_size: int) -> float:
    """SGLang's ``_append_utilization_rate`` on one pass: [L, P] slot counts -> the mean rate."""
    gpu = counts.reshape(counts.shape[0], ep_size, -1).sum(axis=-1)
    return float(sglang_compute_utilization_rate(gpu).mean())


def rate64(mean: np.ndarray, peak: np.ndarray) -> np.ndarray:
    return (np.asarray(mean, np.float64) + EPS) / (np.asarray(peak, np.float64) + EPS)


# ------------------------------------------------------------------------------------------------
# The functions.


@given(
    num_layers=st.integers(1, 5),
    ep_size=st.integers(1, 5),
    slots=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
)
def test_pass_balancedness_is_sglangs(num_layers, ep_size, slots, seed) -> None:
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 50, (num_layers, ep_size * slots)).astype(np.int32)
    counts[rng.random(num_layers) < 0.3] = 0  # dense layers: rate 1.0, part of the mean
    got = moelb.pass_balancedness(counts, ep_size)
    assert got == pytest.approx(sglang_pass_balancedness(counts, ep_size), rel=1e-6)
    gpu = counts.reshape(num_layers, ep_size, -1).sum(axis=-1)
    assert got == pytest.approx(rate64(gpu.mean(-1), gpu.max(-1)).mean(), rel=1e-12)
    active = gpu.max(axis=-1) > 0
    variant = moelb.pass_balancedness(counts, ep_size, layers="active")
    if active.any():
        assert variant == pytest.approx(rate64(gpu.mean(-1), gpu.max(-1))[active].mean(), rel=1e-12)
    else:
        assert math.isnan(variant)


def test_dense_and_idle_layers_count_one() -> None:
    # Layer 0: GPUs [4, 0] -> (2 + eps) / (4 + eps); layer 1 is dense: 1.0, as in SGLang.
    counts = np.array([[1, 3, 0, 0], [0, 0, 0, 0]], np.int32)
    one = (2 + EPS) / (4 + EPS)
    assert moelb.pass_balancedness(counts, 2) == pytest.approx((one + 1.0) / 2, rel=1e-12)
    assert moelb.pass_balancedness(counts, 2, layers="active") == pytest.approx(one, rel=1e-12)
    # An idle pass is perfectly balanced for SGLang; the active variant has no layer to average.
    idle = np.zeros((3, 4), np.int32)
    assert moelb.pass_balancedness(idle, 2) == 1.0
    assert math.isnan(moelb.pass_balancedness(idle, 2, layers="active"))


def test_utilization_rate_and_layer_mean() -> None:
    rng = np.random.default_rng(5)
    peak = rng.random((4, 6)) * 10
    mean = peak * rng.random((4, 6))
    peak[1] = mean[1] = 0.0  # a layer without load in every step
    np.testing.assert_allclose(moelb.utilization_rate(mean, peak), rate64(mean, peak), rtol=1e-15)
    assert moelb.utilization_rate(0.0, 0.0) == 1.0
    # Small loads: the epsilon matters and is SGLang's (not mean / max).
    assert moelb.utilization_rate(1e-5, 3e-5) == pytest.approx(0.5)
    # balancedness: the mean over the last axis (layers) of the rates.
    steps = moelb.balancedness(mean.T, peak.T)  # [6 steps, 4 layers] -> [6]
    np.testing.assert_allclose(steps, rate64(mean, peak).mean(axis=0), rtol=1e-13)
    active = moelb.balancedness(mean.T, peak.T, layers="active")
    np.testing.assert_allclose(active, rate64(mean, peak)[[0, 2, 3]].mean(axis=0), rtol=1e-13)
    assert moelb.balancedness(mean[:, 0], peak[:, 0]) == pytest.approx(
        rate64(mean[:, 0], peak[:, 0]).mean(), rel=1e-13
    )
    assert math.isnan(moelb.balancedness([0.0, 0.0], [0.0, 0.0], layers="active"))


@pytest.mark.parametrize(
    ("mean", "peak", "kwargs", "match"),
    [
        ([1.0, -1.0], [2.0, 2.0], {}, r"mean_rank_load\[1\] = -1"),
        ([1.0, 1.0], [2.0, math.nan], {}, r"max_rank_load\[1\] = nan"),
        ([1.0, 1.0], [2.0, math.inf], {}, r"max_rank_load\[1\] = inf"),
        ([3.0], [2.0], {}, r"mean_rank_load\[0\] = 3 is above max_rank_load\[0\] = 2"),
        ([1.0, 1.0], [2.0], {}, r"mean_rank_load has shape \(2,\) but max_rank_load has \(1,\)"),
        ([1.0], [2.0], {"layers": "moe"}, "layers='moe'"),
    ],
)
def test_balancedness_errors(mean, peak, kwargs, match) -> None:
    with pytest.raises(moelb.InvalidArgumentError, match=match):
        moelb.balancedness(mean, peak, **kwargs)
    if not kwargs:
        with pytest.raises(moelb.InvalidArgumentError, match=match):
            moelb.utilization_rate(mean, peak)


def test_pass_balancedness_errors() -> None:
    counts = np.array([[1, 3, 0, 0]], np.int32)
    with pytest.raises(moelb.InvalidArgumentError, match="ep_size=3"):
        moelb.pass_balancedness(counts, 3)
    with pytest.raises(moelb.InvalidArgumentError, match="layers='some'"):
        moelb.pass_balancedness(counts, 2, layers="some")


# ------------------------------------------------------------------------------------------------
# The planner's statistics.


def test_plan_stats_balancedness_is_sglangs() -> None:
    # Loads of a dense layer (zeros) and of small magnitude, where SGLang's epsilon is visible.
    load = np.array(
        [[0.0] * 8, [4e-5, 1e-5, 2e-5, 1e-5, 0, 0, 0, 0], [9.0, 1, 2, 1, 3, 1, 1, 2]], np.float64
    )
    location = moelb.ExpertLocation.trivial(3, 8, 8, ep_size=4)
    stats = moelb.evaluate_placement(load, location)
    gpu = load.reshape(3, 4, 2).sum(axis=-1)
    rates = rate64(gpu.mean(-1), gpu.max(-1))
    np.testing.assert_allclose(stats.layer_balancedness, rates, rtol=1e-13)
    assert stats.layer_balancedness[0] == 1.0
    assert stats.balancedness == pytest.approx(rates.mean(), rel=1e-13)
    assert stats.active_balancedness == pytest.approx(rates[1:].mean(), rel=1e-13)
    # A time series: per layer SGLang's rate of the mean over the sum of the steps' peaks.
    series = np.stack([load, 2 * load])
    stepped = moelb.evaluate_placement(series, location)
    steps = np.stack([gpu, 2 * gpu]).max(axis=-1).sum(axis=0)
    assert stepped.step_balancedness == pytest.approx(
        rate64(3 * gpu.mean(-1), steps).mean(), rel=1e-13
    )
    # No layer with load: balancedness 1.0 (SGLang), active_balancedness None.
    idle = moelb.evaluate_placement(np.zeros((3, 8)), location)
    assert idle.balancedness == 1.0 and idle.active_balancedness is None


def test_plan_balancedness_from_a_recorders_counts_matches_the_recorder() -> None:
    """A window recorded on the trivial placement: the planner's statistics of that placement
    under the summed counts are SGLang's balancedness of the summed pass."""
    rng = np.random.default_rng(9)
    location = moelb.ExpertLocation.trivial(4, 16, 16, ep_size=4)
    rec = moelb.ExpertDistributionRecorder(location, buffer_size=-1)
    rec.start()
    for _ in range(5):
        with rec.forward_pass():
            for layer in (1, 2, 3):  # layer 0 is dense
                with rec.layer(layer):
                    ids = rng.integers(0, 16, (64, 2)).astype(np.int32)
                    rec.on_select_experts(ids)
    summed = rec.physical_count().sum(axis=0).astype(np.int32)
    stats = moelb.evaluate_placement(rec.logical_count(), location)
    assert stats.balancedness == pytest.approx(moelb.pass_balancedness(summed, 4), rel=1e-12)
    assert stats.active_balancedness == pytest.approx(
        moelb.pass_balancedness(summed, 4, layers="active"), rel=1e-12
    )
    assert stats.layer_balancedness[0] == 1.0


def test_scalars_give_floats() -> None:
    rate = moelb.utilization_rate(1.0, 2.0)
    assert isinstance(rate, float) and rate == pytest.approx((1 + 1e-5) / (2 + 1e-5), rel=1e-15)
    value = moelb.balancedness([1.0, 0.0], [2.0, 0.0])
    assert isinstance(value, float) and value == pytest.approx((rate + 1.0) / 2, rel=1e-15)


def test_rounding_never_gives_more_than_one() -> None:
    """Uniform loads whose mean rounds above their max: SGLang's rate is clamped to 1."""
    plan = moelb.rebalance(np.full((1, 16), 0.1), 16, None, 1, 4)
    assert plan.stats.balancedness <= 1.0
    assert moelb.utilization_rate(1.0 + 1e-12, 1.0) == 1.0


def test_non_numbers_name_the_parameter() -> None:
    with pytest.raises(moelb.InvalidArgumentError, match="mean_rank_load must hold numbers"):
        moelb.utilization_rate("a", 2.0)
    with pytest.raises(moelb.InvalidArgumentError, match="max_rank_load must be a load"):
        moelb.utilization_rate(1.0, None)
