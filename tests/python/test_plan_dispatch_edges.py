"""Edge cases of the planning targets of issue 20 (rebalance / evaluate_placement dispatch=):
load magnitudes the balanced target's integer scaling must survive, and the realised statistics
against an independent recomputation."""

import numpy as np
import pytest

import moelb


def _series(seed: int, T: int = 6, L: int = 2, E: int = 8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.gamma(0.7, 1.0, size=(T, L, E))


@pytest.mark.parametrize("exponent", [-1000, -990, 1000 - 4])
def test_balanced_is_scale_free_in_powers_of_two(exponent: int) -> None:
    # Multiplying every load by a power of two changes nothing but the unit: the same placement,
    # the realised maximum scaled by the same power. Loads near 1e-300 used to overflow the
    # integer scaling (2^(31 - ilogb) past the double range) into an internal error.
    s = _series(1)
    if exponent > 0:
        s = s / s.sum(axis=0).max() * 1e-4  # sums stay below 1e300 once scaled
    scaled = np.ldexp(s, exponent)
    plan = moelb.rebalance(s, 12, None, 2, 4, locality="none", dispatch="balanced")
    tiny = moelb.rebalance(scaled, 12, None, 2, 4, locality="none", dispatch="balanced")
    np.testing.assert_array_equal(
        tiny.location.physical_to_logical, plan.location.physical_to_logical
    )
    np.testing.assert_allclose(
        tiny.stats.realised_max_rank_load,
        np.ldexp(plan.stats.realised_max_rank_load, exponent),
        rtol=1e-12,
    )
    stats = moelb.evaluate_placement(scaled, plan.location, dispatch="balanced")
    np.testing.assert_allclose(
        stats.realised_max_rank_load, tiny.stats.realised_max_rank_load, rtol=1e-12
    )


def test_balanced_single_subnormal_load_is_realised() -> None:
    # One expert with the smallest positive double: it all lands on one GPU.
    load = np.zeros((1, 1, 4))
    load[0, 0, 0] = 5e-324
    plan = moelb.rebalance(load, 4, None, 1, 2, locality="none", dispatch="balanced")
    assert plan.stats.realised_max_rank_load[0] == 5e-324
    stats = moelb.evaluate_placement(load, plan.location, dispatch="balanced")
    assert stats.realised_max_rank_load[0] == 5e-324


def test_balanced_tiny_evaluated_steps_among_huge_ones() -> None:
    # T = 64: the evaluated steps are the odd ones (K = 32). With those tiny and the others huge
    # the layer's total over the evaluated total passes the double range; the realised maximum
    # is still the evaluated steps' max/mean ratio times the layer's mean.
    base = _series(2, T=64)
    s = base.copy()
    s[1::2] *= 1e-300
    s[0::2] *= 1e298 / base.sum()
    location = moelb.rebalance(s, 12, None, 2, 4, locality="none").location
    full = moelb.evaluate_placement(s, location, dispatch="balanced")
    odd = moelb.evaluate_placement(s[1::2], location, dispatch="balanced")
    assert np.isfinite(full.realised_max_rank_load).all()
    np.testing.assert_allclose(
        full.realised_max_rank_load / full.mean_rank_load,
        odd.realised_max_rank_load / odd.mean_rank_load,
        rtol=1e-9,
    )
