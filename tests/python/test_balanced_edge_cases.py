"""The balanced split and its engine modes at their edges: the even split with counts near the int64
limit, ``dispatch_by_fractions`` with finite fractions whose sum overflows float64, and a
Waterfill balancer whose ranks are not the location's under any dispatch. Each expected value is
derived here from the contract (counts conserved, the makespan of ``shares="any"``, the
fractions' proportions, the layout's ranks), not from moelb's output."""

from __future__ import annotations

import moelb
import numpy as np
import pytest

INT64_MAX = np.iinfo(np.int64).max


def rank_peak(slots: np.ndarray, ranks: int) -> int:
    """The largest rank load of one layer's slots, in Python integers (no int64 overflow)."""
    per_rank = len(slots) // ranks
    return max(sum(int(v) for v in slots[r * per_rank : (r + 1) * per_rank]) for r in range(ranks))


@pytest.mark.parametrize(
    "p2l",
    [
        [0, 1, 0, 1],  # one replica on each of two ranks
        [0, 0, 0, 1],  # two replicas on rank 0, one on rank 1: 2 r / m = 3 / 2 is not integral
        [2, 1, 0, 2, 0, 1, 1, 1],  # one and three replicas: 2 r / m = 8 / 3
    ],
)
@pytest.mark.parametrize("count", [2**62 + 1, 3 * 2**61, INT64_MAX - 2756, INT64_MAX])
def test_even_split_of_a_count_near_the_int64_limit(p2l: list[int], count: int) -> None:
    # Counts past 2**62 overflowed the chord slope (lo + hi) and the breakpoints past the count:
    # an internal error, or an endless loop until the memory ran out.
    experts = max(p2l) + 1
    location = moelb.ExpertLocation(np.array([p2l], np.int32), experts, 2, 1)
    counts = np.zeros(experts, np.int64)
    counts[0] = count
    fast = moelb.balanced_split(counts, location, layer=0, shares="any")
    even = moelb.balanced_split(counts, location, layer=0, shares="even")
    assert (even >= 0).all()
    slots = np.array(p2l)
    assert sum(int(v) for v in even[slots == 0]) == count
    assert (even[slots != 0] == 0).all()
    assert rank_peak(even, 2) == rank_peak(fast, 2)


def test_fractions_are_scale_free_up_to_the_float_limit() -> None:
    # Finite fractions whose row sum overflows to inf sent every pair to the last replica.
    location = moelb.ExpertLocation(np.array([[0, 1, 0, 1]], np.int32), 2, 2, 1)
    ids = np.zeros((1000, 1), np.int32)
    for sampling in ("systematic", "independent"):
        counts = []
        for scale in (1.0, 1.7e308):  # 1.7e308 + 0.85e308 overflows
            fractions = np.array([[2.0, 1.0], [1.0, 1.0]]) * (scale / 2)
            out = moelb.dispatch_by_fractions(ids, location, 0, fractions, sampling=sampling)
            counts.append(np.bincount(out.ravel(), minlength=4))
        np.testing.assert_array_equal(counts[0], counts[1])
        if sampling == "systematic":  # 2/3 and 1/3 of 1000 pairs, rounded down or up
            assert counts[1][0] in (666, 667) and counts[1][2] in (333, 334)


@pytest.mark.parametrize("dispatch", ["balanced", "balanced_prob", "sglang_static"])
def test_waterfill_ranks_must_be_the_locations(dispatch: str) -> None:
    # A balancer of 4 ranks on a location of 2 laid out routed slot p as p + p // 3 (its S), not
    # p + p // 6; under a collective mode, one of another rank gave that rank's shared slot.
    location = moelb.ExpertLocation.trivial(1, 8, 12, ep_size=2, num_nodes=1)
    logits = np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32)
    config = moelb.TopKConfig(top_k=2, num_fused_shared_experts=1)
    collective = {
        "balanced": {"all_gather": lambda b: np.stack([b, np.zeros_like(b)])},
        "balanced_prob": {"all_reduce": lambda b: b},
        "sglang_static": {},
    }[dispatch]
    balancers = [moelb.WaterfillBalancer(12, 4, 0)]
    if dispatch != "sglang_static":  # a table dispatch's ep_rank is only its table's
        balancers.append(moelb.WaterfillBalancer(12, 2, 1))
    for waterfill in balancers:
        with pytest.raises(moelb.InvalidArgumentError, match=r"waterfill has ep_size="):
            moelb.select_experts(
                logits,
                config,
                None,
                None,
                location,
                0,
                0,
                dispatch=dispatch,
                waterfill=waterfill,
                **collective,
            )
    # The matching balancer still lays out rank 0's ids.
    out = moelb.select_experts(
        logits,
        config,
        None,
        None,
        location,
        0,
        0,
        dispatch=dispatch,
        waterfill=moelb.WaterfillBalancer(12, 2, 0),
        **collective,
    )
    routed = out.topk_ids[:, :2]
    assert ((routed % 7) != 6).all() and (routed < 14).all()
