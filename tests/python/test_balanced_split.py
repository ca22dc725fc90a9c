"""moelb's exact per-step split (``balanced_split``, ``balanced_assignment``) against the LP of
reference/dispatch.md section 7 solved independently here with ``scipy.optimize.linprog`` (HiGHS).

The LP is written from the spec, not from moelb's graph: one variable per (expert with tokens,
distinct rank holding one of its replicas), single-rank experts included, and the makespan ``T``.
Its optimum ``T*`` is a fraction whose denominator is a number of ranks (Hall: ``T* = (tokens of
a set of experts + fixed loads of their ranks) / number of those ranks``), so any tolerance below
``1 / ep_size`` turns HiGHS's floating optimum into the exact ``ceil(T*)``.
"""

from __future__ import annotations

import math
from typing import Any

import moelb
import numpy as np
import numpy.typing as npt
import pytest
from moelb import ExpertLocation, InvalidArgumentError, InvalidDTypeError
from moelb.dispatch import (
    DISPATCH_COST_OTHER_NODE,
    DISPATCH_COST_OWN_RANK,
    DISPATCH_COST_SAME_NODE,
)

optimize = pytest.importorskip("scipy.optimize")
sparse = pytest.importorskip("scipy.sparse")

# ------------------------------------------------------------------------------------------------
# Random instances: 1-3 replicas per expert on random slots (so over random ranks and nodes, some
# on one rank twice), random fixed loads, zero counts.


def random_map(rng: np.random.Generator, E: int, P: int) -> npt.NDArray[np.int32]:
    """[P]: every expert 1-3 replicas on random slots."""
    reps = np.ones(E, dtype=np.int64)
    for _ in range(P - E):
        e = rng.choice(np.flatnonzero(reps < 3))
        reps[e] += 1
    slots = np.repeat(np.arange(E, dtype=np.int32), reps)
    rng.shuffle(slots)
    return slots


def random_counts(rng: np.random.Generator, L: int, E: int) -> npt.NDArray[np.int64]:
    """[L, E]: per layer small or large counts, about a quarter zero, a few layers all zero."""
    scale = rng.choice([3, 30, 1000], size=(L, 1))
    counts = rng.integers(0, scale + 1, size=(L, E))
    counts[rng.random((L, E)) < 0.25] = 0
    counts[rng.random(L) < 0.05] = 0
    return counts.astype(np.int64)


def random_instance(
    rng: np.random.Generator, L: int, max_ranks: int = 16
) -> tuple[ExpertLocation, npt.NDArray[np.int64], npt.NDArray[np.int64] | None]:
    W = int(rng.choice([w for w in (2, 3, 4, 6, 8, 12, 16) if w <= max_ranks]))
    N = int(rng.choice([n for n in (1, 2, 3, 4) if W % n == 0]))
    S = int(rng.integers(1, 5))
    P = W * S
    E = int(rng.integers(max(1, -(-P // 3)), P + 1))
    p2l = np.stack([random_map(rng, E, P) for _ in range(L)])
    location = ExpertLocation(p2l, E, W, N)
    fixed = None
    if rng.random() < 0.5:
        fixed = rng.integers(0, rng.choice([5, 200, 3000]) + 1, size=(L, W)).astype(np.int64)
    return location, random_counts(rng, L, E), fixed


# ------------------------------------------------------------------------------------------------
# The references: the LP of dispatch.md section 7, and the least-cost assignment's LP.


def distinct_ranks(location: ExpertLocation, layer: int, expert: int) -> list[int]:
    S = location.num_local_physical_experts
    slots = np.flatnonzero(location.physical_to_logical[layer] == expert)
    return sorted({int(p) // S for p in slots})


def lp_optimum(
    location: ExpertLocation, layer: int, counts: npt.NDArray[np.int64], fixed: npt.NDArray[Any]
) -> float:
    """T*: min T s.t. sum_g x[e, g] = n_e, fixed_g + sum_e x[e, g] <= T, x >= 0."""
    W = location.ep_size
    pairs = [
        (e, g)
        for e in range(location.num_logical_experts)
        if counts[e] > 0
        for g in distinct_ranks(location, layer, e)
    ]
    if not pairs:
        return float(fixed.max())
    n = len(pairs)
    experts = sorted({e for e, _ in pairs})
    row_of = {e: i for i, e in enumerate(experts)}
    a_eq = sparse.lil_matrix((len(experts), n + 1))
    a_ub = sparse.lil_matrix((W, n + 1))
    for j, (e, g) in enumerate(pairs):
        a_eq[row_of[e], j] = 1
        a_ub[g, j] = 1
    a_ub[:, n] = -1
    c = np.zeros(n + 1)
    c[n] = 1
    res = optimize.linprog(
        c,
        A_ub=a_ub.tocsr(),
        b_ub=-fixed.astype(float),
        A_eq=a_eq.tocsr(),
        b_eq=counts[experts].astype(float),
        bounds=(0, None),
        method="highs",
    )
    assert res.status == 0, res.message
    return float(res.fun)


def exact_ceil(value: float, W: int) -> int:
    """ceil(T*) from a floating T* whose exact value is a multiple of 1 / k for some k <= W."""
    return math.ceil(value - 0.25 / W)


def cost(s: int, g: int, ranks_per_node: int) -> int:
    if s == g:
        return DISPATCH_COST_OWN_RANK
    if s // ranks_per_node == g // ranks_per_node:
        return DISPATCH_COST_SAME_NODE
    return DISPATCH_COST_OTHER_NODE


def least_cost(
    location: ExpertLocation,
    layer: int,
    source: npt.NDArray[np.int64],
    fixed: npt.NDArray[np.int64],
    makespan: int,
) -> float:
    """The least total cost of sending every source's tokens to replicas with every rank load
    <= makespan (a transportation LP; its optimum is integral)."""
    W, E = source.shape
    rpn = W // location.num_nodes
    variables = [
        (s, e, g)
        for s in range(W)
        for e in range(E)
        if source[s, e] > 0
        for g in distinct_ranks(location, layer, e)
    ]
    if not variables:
        return 0.0
    rows = sorted({(s, e) for s, e, _ in variables})
    row_of = {k: i for i, k in enumerate(rows)}
    a_eq = sparse.lil_matrix((len(rows), len(variables)))
    a_ub = sparse.lil_matrix((W, len(variables)))
    c = np.zeros(len(variables))
    for j, (s, e, g) in enumerate(variables):
        a_eq[row_of[(s, e)], j] = 1
        a_ub[g, j] = 1
        c[j] = cost(s, g, rpn)
    res = optimize.linprog(
        c,
        A_ub=a_ub.tocsr(),
        b_ub=(makespan - fixed).astype(float),
        A_eq=a_eq.tocsr(),
        b_eq=np.array([source[k] for k in rows], dtype=float),
        bounds=(0, None),
        method="highs",
    )
    assert res.status == 0, res.message
    return float(res.fun)


def rank_loads(
    location: ExpertLocation, slots: npt.NDArray[np.int64], fixed: npt.NDArray[np.int64]
) -> npt.NDArray[np.int64]:
    """[..., W] from [..., P] tokens per slot plus the fixed loads."""
    W, S = location.ep_size, location.num_local_physical_experts
    return slots.reshape(*slots.shape[:-1], W, S).sum(axis=-1) + fixed


def check_conserved(
    location: ExpertLocation, counts: npt.NDArray[np.int64], slots: npt.NDArray[np.int64]
) -> None:
    """Every expert's slots sum to its count (so tokens sit only on its replicas)."""
    L, E = counts.shape
    assert slots.dtype == np.int64 and slots.shape == (L, location.num_physical_experts)
    assert (slots >= 0).all()
    p2l = location.physical_to_logical
    for layer in range(L):
        got = np.bincount(p2l[layer], weights=slots[layer], minlength=E)
        np.testing.assert_array_equal(got, counts[layer])


# ------------------------------------------------------------------------------------------------
# balanced_split: the optimum, on thousands of random instances.

# 60 random placements of 40 layers each (2,400 LPs), in 6 chunks that pytest-xdist can spread
# over the cores.
NUM_CHUNKS = 6
NUM_LOCATIONS = 10  # per chunk
LAYERS_PER_LOCATION = 40


@pytest.mark.parametrize("chunk", range(NUM_CHUNKS))
def test_split_reaches_the_lp_optimum_on_random_instances(
    chunk: int, restore_num_threads: None
) -> None:
    rng = np.random.default_rng([2026, chunk])
    instances = above_lower_bound = 0
    for _ in range(NUM_LOCATIONS):
        location, counts, fixed = random_instance(rng, LAYERS_PER_LOCATION)
        L, W = location.num_layers, location.ep_size
        fixed_or_zero = np.zeros((L, W), dtype=np.int64) if fixed is None else fixed
        peaks = []
        for shares in ("any", "even"):
            moelb.set_num_threads(1)
            slots = moelb.balanced_split(counts, location, fixed, shares=shares)
            moelb.set_num_threads(2)
            again = moelb.balanced_split(counts, location, fixed, shares=shares)
            np.testing.assert_array_equal(again, slots)
            check_conserved(location, counts, slots)
            peaks.append(rank_loads(location, slots, fixed_or_zero).max(axis=1))
        peak = peaks[0]
        np.testing.assert_array_equal(peaks[1], peak)  # the even split is optimal too
        for layer in range(L):
            optimum = lp_optimum(location, layer, counts[layer], fixed_or_zero[layer])
            assert peak[layer] == exact_ceil(optimum, W), (layer, optimum, peak[layer])
            total = counts[layer].sum() + fixed_or_zero[layer].sum()
            simple = max(fixed_or_zero[layer].max(), -(-total // W))
            above_lower_bound += int(peak[layer] > simple)
            instances += 1
    assert instances == NUM_LOCATIONS * LAYERS_PER_LOCATION
    # The instances are not all decided by the trivial bounds (mean load, largest fixed load).
    assert above_lower_bound > instances // 5


# ------------------------------------------------------------------------------------------------
# balanced_split(shares="even"): among the optimal splits, the most even replica shares.


def squares(
    location: ExpertLocation, layer: int, counts: npt.NDArray[np.int64], slots: Any
) -> float:
    """sum over (expert e, rank g) of x_eg^2 / (n_e m_eg) for the experts with tokens on two or
    more ranks: the even split's objective (least, per expert, at the equal split per slot)."""
    S = location.num_local_physical_experts
    total = 0.0
    for e in range(location.num_logical_experts):
        ranks = distinct_ranks(location, layer, e)
        if counts[e] == 0 or len(ranks) < 2:
            continue
        mine = np.flatnonzero(location.physical_to_logical[layer] == e)
        for g in ranks:
            on_g = mine[mine // S == g]
            total += float(np.sum(slots[on_g])) ** 2 / (counts[e] * len(on_g))
    return total


def test_even_split_is_the_equal_split_when_that_is_optimal() -> None:
    # Every expert on every rank (2 ranks, one slot each per expert): the equal split is optimal,
    # so the even split is it (within a token), while any optimal split may be a vertex.
    E, W = 5, 2
    p2l = np.tile(np.arange(E, dtype=np.int32), W)[None]
    location = ExpertLocation(p2l, E, W, 1)
    counts = np.array([[40, 8, 0, 17, 1000]], dtype=np.int64)
    even = moelb.balanced_split(counts, location, shares="even")[0]
    for e in range(E):
        pair = even[[e, E + e]]
        assert pair.sum() == counts[0, e]
        assert abs(int(pair[0]) - int(pair[1])) <= 1, (e, pair)


def all_splits(
    location: ExpertLocation, layer: int, counts: npt.NDArray[np.int64], fixed: Any, makespan: int
) -> list[dict[tuple[int, int], int]]:
    """Every integral split (expert, rank) -> tokens with every rank load <= makespan, by brute
    force (tiny instances only)."""
    W = location.ep_size
    experts = [e for e in range(location.num_logical_experts) if counts[e] > 0]
    out: list[dict[tuple[int, int], int]] = []

    def compositions(n: int, k: int) -> Any:
        if k == 1:
            yield (n,)
            return
        for first in range(n + 1):
            for rest in compositions(n - first, k - 1):
                yield (first, *rest)

    def extend(i: int, loads: list[int], chosen: dict[tuple[int, int], int]) -> None:
        if i == len(experts):
            out.append(dict(chosen))
            return
        e = experts[i]
        ranks = distinct_ranks(location, layer, e)
        for parts in compositions(int(counts[e]), len(ranks)):
            new = list(loads)
            for g, x in zip(ranks, parts, strict=True):
                new[g] += x
            if max(new) > makespan:
                continue
            extend(i + 1, new, {**chosen, **{(e, g): x for g, x in zip(ranks, parts, strict=True)}})

    extend(0, [int(f) for f in fixed[:W]], {})
    return out


def test_even_split_is_near_the_least_squares_optimal_split(restore_num_threads: None) -> None:
    # Brute force over every optimal integral split of tiny instances: the even split's objective
    # is within the piecewise-linear bound of the least one (the chord of x^2 / (n m) over a
    # segment of at most ceil(n m / (2 r)) = h tokens lies at most h^2 / (4 n m) above it, per
    # (expert, rank)).
    rng = np.random.default_rng(11)
    checked = strictly_better = 0
    for _ in range(150):
        W = int(rng.choice([2, 3, 4]))
        S = int(rng.integers(1, 3))
        P = W * S
        E = int(rng.integers(max(1, -(-P // 3)), P))
        location = ExpertLocation(random_map(rng, E, P)[None], E, W, 1)
        counts = rng.integers(0, 7, size=E).astype(np.int64)
        fixed = rng.integers(0, 4, size=W).astype(np.int64)
        even = moelb.balanced_split(counts, location, fixed, layer=0, shares="even")
        first = moelb.balanced_split(counts, location, fixed, layer=0)
        makespan = int(rank_loads(location, first, fixed).max())
        assert int(rank_loads(location, even, fixed).max()) == makespan
        S_ = location.num_local_physical_experts
        values = []
        for split in all_splits(location, 0, counts, fixed, makespan):
            total = 0.0
            for (e, g), x in split.items():
                if len(distinct_ranks(location, 0, e)) > 1:
                    mine = np.flatnonzero(location.physical_to_logical[0] == e)
                    total += x * x / (counts[e] * np.sum(mine // S_ == g))
            values.append(total)
        if not values:
            continue
        bound = 0.0
        for e in range(E):
            ranks = distinct_ranks(location, 0, e)
            if counts[e] == 0 or len(ranks) < 2:
                continue
            mine = np.flatnonzero(location.physical_to_logical[0] == e)
            r = len(mine)
            for g in ranks:
                m = int(np.sum(mine // S_ == g))
                h = math.ceil(counts[e] * m / (2 * r))
                bound += h * h / (4 * counts[e] * m) + 1e-5
        got = squares(location, 0, counts, even)
        assert got <= min(values) + bound, (got, min(values), bound)
        strictly_better += int(squares(location, 0, counts, first) > got + 1e-9)
        checked += 1
    assert checked > 100
    # The instances exercise the criterion: the max-flow's split is often less even.
    assert strictly_better > checked // 10


def test_split_one_layer_equals_its_row() -> None:
    rng = np.random.default_rng(7)
    location, counts, fixed = random_instance(rng, 5)
    fixed = rng.integers(0, 50, size=(5, location.ep_size))
    every = moelb.balanced_split(counts, location, fixed)
    for layer in range(5):
        one = moelb.balanced_split(counts[layer], location, fixed[layer], layer=layer)
        np.testing.assert_array_equal(one, every[layer])
    # Any integer dtype converts; torch-free array-likes too.
    np.testing.assert_array_equal(
        moelb.balanced_split(counts.astype(np.int32), location, fixed.astype(np.uint16)), every
    )
    np.testing.assert_array_equal(
        moelb.balanced_split(counts[2].tolist(), location, layer=2),
        moelb.balanced_split(counts, location)[2],
    )


def test_split_known_instance() -> None:
    # Two ranks, 2 slots each: expert 0 on slots 0, 1 (rank 0) and 2 (rank 1), expert 1 on slot
    # 3; rank 1 carries 5 fixed. 9 tokens of expert 0: T* = 14 / 2 = 7, rank 0 takes 7 (4 + 3,
    # lower slot first), rank 1 takes 2.
    location = ExpertLocation(np.array([[0, 0, 0, 1]]), 2, 2)
    out = moelb.balanced_split(np.array([[9, 0]]), location, np.array([[0, 5]]))
    np.testing.assert_array_equal(out, [[4, 3, 2, 0]])
    assert out.dtype == np.int64


# ------------------------------------------------------------------------------------------------
# balanced_assignment: per-source sums, the same optimum, the least cost.


def split_sources(rng: np.random.Generator, counts: npt.NDArray[np.int64], W: int) -> Any:
    """[L, W, E]: each count split over the W sources at random (some get none)."""
    L, E = counts.shape
    weights = rng.random((L, W, E)) * (rng.random((L, W, E)) < 0.6)
    weights[:, 0, :] += 1e-9
    source = np.zeros((L, W, E), dtype=np.int64)
    for layer in range(L):
        for e in range(E):
            share = weights[layer, :, e] / weights[layer, :, e].sum()
            source[layer, :, e] = rng.multinomial(counts[layer, e], share)
    return source


def test_assignment_optimal_and_least_cost(restore_num_threads: None) -> None:
    rng = np.random.default_rng(19)
    instances = with_cost = 0
    for _ in range(30):
        location, counts, fixed = random_instance(rng, 10, max_ranks=8)
        L, W = location.num_layers, location.ep_size
        fixed_or_zero = np.zeros((L, W), dtype=np.int64) if fixed is None else fixed
        source = split_sources(rng, counts, W)
        moelb.set_num_threads(1)
        out = moelb.balanced_assignment(source, location, fixed)
        moelb.set_num_threads(2)
        np.testing.assert_array_equal(moelb.balanced_assignment(source, location, fixed), out)
        assert out.shape == (L, W, location.num_physical_experts) and out.dtype == np.int64
        p2l = location.physical_to_logical
        for s in range(W):  # each source's row sums to its counts, expert by expert
            check_conserved(location, source[:, s, :], out[:, s, :])
        split = moelb.balanced_split(counts, location, fixed)
        peak = rank_loads(location, out.sum(axis=1), fixed_or_zero).max(axis=1)
        np.testing.assert_array_equal(peak, rank_loads(location, split, fixed_or_zero).max(axis=1))
        rpn = W // location.num_nodes
        S = location.num_local_physical_experts
        costs = np.array([[cost(s, p // S, rpn) for p in range(p2l.shape[1])] for s in range(W)])
        for layer in range(L):
            ours = float((out[layer] * costs).sum())
            best = least_cost(location, layer, source[layer], fixed_or_zero[layer], peak[layer])
            assert ours == pytest.approx(best, abs=1e-6), (layer, ours, best)
            with_cost += int(best > 0)
            instances += 1
        one = moelb.balanced_assignment(source[3], location, fixed_or_zero[3], layer=3)
        np.testing.assert_array_equal(one, out[3])
    assert instances == 300 and with_cost > 100


def leaning_sources(
    rng: np.random.Generator, location: ExpertLocation, layer: int, scale: int
) -> npt.NDArray[np.int64]:
    """[W, E]: random counts per source, most sources sending many more tokens to the experts
    with a replica on their own rank or node (so that the cheap shares matter), about a quarter
    zero."""
    W, E = location.ep_size, location.num_logical_experts
    rpn, S = W // location.num_nodes, location.num_local_physical_experts
    ranks = location.physical_to_logical[layer]
    counts = rng.integers(0, scale + 1, size=(W, E))
    for s in range(W):
        own = np.unique(ranks[s * S : (s + 1) * S])
        node = np.unique(ranks[(s // rpn) * rpn * S : (s // rpn + 1) * rpn * S])
        counts[s, node] += rng.integers(0, 2 * scale + 1, size=node.size)
        counts[s, own] += rng.integers(0, 4 * scale + 1, size=own.size)
    counts[rng.random((W, E)) < 0.25] = 0
    return counts.astype(np.int64)


def cheapest_cost(location: ExpertLocation, layer: int, source: npt.NDArray[np.int64]) -> int:
    """The cost with every token on its cheapest replica, rank loads ignored: a lower bound that
    the least cost at the optimal makespan exceeds only when cheap tokens had to give way."""
    W, E = source.shape
    rpn = W // location.num_nodes
    total = 0
    for e in range(E):
        ranks = distinct_ranks(location, layer, e)
        for s in range(W):
            total += int(source[s, e]) * min(cost(s, g, rpn) for g in ranks)
    return total


def test_assignment_least_cost_matches_the_lp_and_the_previous_solver() -> None:
    # Several hundred layers over 2-4 nodes with 1-3 replicas per expert (on one rank, one node or
    # several), sources leaning towards their own rank's and node's experts, zero counts and
    # fixed loads from none to tight: the makespan equals ceil(T*) of the split's LP, the total
    # cost equals the transportation LP's least cost at that makespan, and both equal the previous
    # solver's (moelb._core._balanced_assignment_reference).
    rng = np.random.default_rng(41)
    layers = gave_way = 0
    for _ in range(80):
        W = int(rng.choice([4, 6, 8, 12]))
        N = int(rng.choice([n for n in (2, 3, 4) if W % n == 0]))
        S = int(rng.integers(1, 4))
        P = W * S
        E = int(rng.integers(max(1, -(-P // 3)), P + 1))
        L = 5
        location = ExpertLocation(np.stack([random_map(rng, E, P) for _ in range(L)]), E, W, N)
        scales = rng.choice([3, 30, 300], size=L)
        source = np.stack(
            [leaning_sources(rng, location, layer, scales[layer]) for layer in range(L)]
        )
        source[rng.random(L) < 0.05] = 0
        fixed = None
        if rng.random() < 0.7:
            tight = rng.choice([1, 4, 16])
            fixed = rng.integers(0, scales[:, None] * tight + 1, size=(L, W)).astype(np.int64)
        fixed_or_zero = np.zeros((L, W), dtype=np.int64) if fixed is None else fixed
        out = moelb.balanced_assignment(source, location, fixed)
        previous = moelb._core._balanced_assignment_reference(source, location, fixed, None)
        rpn = W // N
        costs = np.array([[cost(s, p // S, rpn) for p in range(P)] for s in range(W)])
        for layer in range(L):
            p2l = location.physical_to_logical[layer]
            for s in range(W):  # each source's row sums to its counts, expert by expert
                assert (out[layer, s] >= 0).all()
                got = np.bincount(p2l, weights=out[layer, s], minlength=E)
                np.testing.assert_array_equal(got, source[layer, s])
            loads = rank_loads(location, out[layer].sum(axis=0), fixed_or_zero[layer])
            counts = source[layer].sum(axis=0)
            optimum = lp_optimum(location, layer, counts, fixed_or_zero[layer])
            assert loads.max() == exact_ceil(optimum, W), (layer, optimum, loads.max())
            theirs = rank_loads(location, previous[layer].sum(axis=0), fixed_or_zero[layer])
            assert theirs.max() == loads.max()
            ours = int((out[layer] * costs).sum())
            best = least_cost(location, layer, source[layer], fixed_or_zero[layer], loads.max())
            assert ours == pytest.approx(best, abs=1e-6), (layer, ours, best)
            assert ours == int((previous[layer] * costs).sum())
            gave_way += int(ours > cheapest_cost(location, layer, source[layer]))
            layers += 1
    assert layers == 400
    # Many layers need cheap tokens to give way to the makespan (the min-cost flow's harder path).
    assert gave_way > 100, gave_way


def test_assignment_keeps_tokens_home() -> None:
    # The documented costs per token: own rank, another rank of the node, another node.
    assert (DISPATCH_COST_OWN_RANK, DISPATCH_COST_SAME_NODE, DISPATCH_COST_OTHER_NODE) == (0, 1, 2)
    # Expert 0 on ranks 0 and 1, 3 tokens from each: each stays on its source rank.
    location = ExpertLocation(np.array([[0, 0]]), 1, 2)
    out = moelb.balanced_assignment(np.array([[[3], [3]]]), location)
    np.testing.assert_array_equal(out, [[[3, 0], [0, 3]]])


# ------------------------------------------------------------------------------------------------
# Errors name the parameter.


@pytest.fixture
def two_layers() -> ExpertLocation:
    return ExpertLocation(np.array([[0, 1, 2, 0], [1, 2, 0, 1]]), 3, 2)


def test_split_errors(two_layers: ExpertLocation) -> None:
    loc = two_layers
    with pytest.raises(InvalidArgumentError, match=r"counts\[1, 2\] = -1 is negative"):
        moelb.balanced_split(np.array([[1, 2, 3], [4, 5, -1]]), loc)
    with pytest.raises(
        InvalidArgumentError,
        match=r"counts has shape \(2, 4\) but the location needs \(num_layers=2, num_experts=3\)",
    ):
        moelb.balanced_split(np.zeros((2, 4), dtype=np.int64), loc)
    with pytest.raises(InvalidArgumentError, match=r"counts must be 1-D, got shape \(2, 3\)"):
        moelb.balanced_split(np.zeros((2, 3), dtype=np.int64), loc, layer=0)
    with pytest.raises(InvalidArgumentError, match=r"counts has shape \(4,\) but the location"):
        moelb.balanced_split(np.zeros(4, dtype=np.int64), loc, layer=0)
    with pytest.raises(InvalidArgumentError, match=r"counts\[2\] = -3 is negative"):
        moelb.balanced_split(np.array([0, 0, -3]), loc, layer=1)
    with pytest.raises(InvalidArgumentError, match=r"layer=2 is outside \[0, num_layers=2\)"):
        moelb.balanced_split(np.zeros(3, dtype=np.int64), loc, layer=2)
    with pytest.raises(InvalidDTypeError, match="counts must hold integers"):
        moelb.balanced_split(np.zeros((2, 3)), loc)
    with pytest.raises(
        InvalidArgumentError, match=r"counts holds \d+, which does not fit in int64"
    ):
        moelb.balanced_split(np.full((2, 3), 2**63, dtype=np.uint64), loc)
    big = 2**62
    with pytest.raises(InvalidArgumentError, match="counts of layer 0 sum past the int64 range"):
        moelb.balanced_split(np.array([[big, big, 0], [0, 0, 0]]), loc)
    with pytest.raises(
        InvalidArgumentError, match="counts and fixed_loads sum past the int64 range"
    ):
        moelb.balanced_split(np.array([big, 0, 0]), loc, np.array([big, 0]), layer=0)
    with pytest.raises(InvalidArgumentError, match=r"fixed_loads\[0, 1\] = -2 is negative"):
        moelb.balanced_split(np.ones((2, 3), dtype=np.int64), loc, np.array([[0, -2], [0, 0]]))
    with pytest.raises(
        InvalidArgumentError,
        match=r"fixed_loads has shape \(2, 3\) but the location needs \(num_layers=2, ep_size=2\)",
    ):
        moelb.balanced_split(np.ones((2, 3), dtype=np.int64), loc, np.zeros((2, 3), np.int64))
    with pytest.raises(InvalidArgumentError, match=r"fixed_loads has shape \(3,\) but one layer"):
        moelb.balanced_split(np.ones(3, dtype=np.int64), loc, np.zeros(3, np.int64), layer=0)
    # Every count has somewhere to go: a placement that leaves an expert without a replica in a
    # layer is rejected when the location is built, naming the expert and layer.
    with pytest.raises(InvalidArgumentError, match="logical expert 2 has no replica in layer 1"):
        ExpertLocation(np.array([[0, 1, 2, 0], [1, 0, 0, 1]]), 3, 2)


def test_assignment_errors(two_layers: ExpertLocation) -> None:
    loc = two_layers
    source = np.ones((2, 2, 3), dtype=np.int64)
    source[1, 0, 2] = -4
    with pytest.raises(InvalidArgumentError, match=r"source_counts\[1, 0, 2\] = -4 is negative"):
        moelb.balanced_assignment(source, loc)
    with pytest.raises(InvalidArgumentError, match=r"source_counts\[0, 2\] = -4 is negative"):
        moelb.balanced_assignment(source[1], loc, layer=1)
    with pytest.raises(
        InvalidArgumentError,
        match=r"source_counts has shape \(2, 2, 4\) but the location needs \(num_layers=2, "
        r"ep_size=2, num_experts=3\)",
    ):
        moelb.balanced_assignment(np.ones((2, 2, 4), dtype=np.int64), loc)
    with pytest.raises(
        InvalidArgumentError, match=r"source_counts must be 3-D, got shape \(2, 3\)"
    ):
        moelb.balanced_assignment(np.ones((2, 3), dtype=np.int64), loc)
    with pytest.raises(
        InvalidArgumentError,
        match=r"source_counts has shape \(3, 3\) but one layer needs \(ep_size=2, num_experts=3\)",
    ):
        moelb.balanced_assignment(np.ones((3, 3), dtype=np.int64), loc, layer=0)
    with pytest.raises(InvalidArgumentError, match="source_counts sum past the int64 range"):
        moelb.balanced_assignment(np.array([[2**62, 0, 0], [2**62, 0, 0]]), loc, layer=0)
    with pytest.raises(InvalidArgumentError, match=r"fixed_loads\[1\] = -1 is negative"):
        moelb.balanced_assignment(np.ones((2, 3), np.int64), loc, np.array([0, -1]), layer=0)
    with pytest.raises(InvalidDTypeError, match="source_counts must hold integers"):
        moelb.balanced_assignment(np.ones((2, 2, 3)), loc)
