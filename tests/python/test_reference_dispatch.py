"""moelb.reference_dispatch: SGLang's ``lp`` per-step solver reproduced on the CPU (checked against
an independent float64 implementation of reference/dispatch.md section 5 written here), and
DeepSeek LPLB's test layouts and load generator (section 6)."""

from __future__ import annotations

import moelb
import numpy as np
import pytest
from moelb import reference_dispatch as rd

# ---------------------------------------------------------------------------------------------
# An independent float64 model of dispatch.md section 5, written from the text.
# ---------------------------------------------------------------------------------------------


def lp64(counts, physical_to_logical, num_experts, ep_size):
    """A, b, c of the LP by plain loops (float64), plus the replicated slots and t."""
    p2l = [int(e) for e in physical_to_logical]
    P = len(p2l)
    S = P // ep_size
    copies = [[p for p in range(P) if p2l[p] == e] for e in range(num_experts)]
    replicated = [e for e in range(num_experts) if len(copies[e]) > 1]
    slots = [p for p in range(P) if len(copies[p2l[p]]) > 1]
    n = np.asarray(counts, dtype=np.float64)
    t = n / max(n.sum(), 1.0)
    R, W = len(replicated), ep_size
    nc, nv = R + W, len(slots) + W + 2
    A = np.zeros((nc, nv))
    b = np.zeros(nc)
    for i, e in enumerate(replicated):
        b[i] = t[e]
        for j, p in enumerate(slots):
            if p2l[p] == e:
                A[i, j] = 1.0
    for g in range(W):
        row = R + g
        for j, p in enumerate(slots):
            if p // S == g:
                A[row, j] = 1.0
        A[row, len(slots) + g] = 1.0
        A[row, nv - 2] = -1.0
        single_here = [
            e for e in range(num_experts) if len(copies[e]) == 1 and copies[e][0] // S == g
        ]
        b[row] = -sum(t[e] for e in single_here)
    A[:, nv - 1] = b - A[:, : nv - 1].sum(axis=1)
    c = np.zeros(nv)
    c[nv - 2], c[nv - 1] = 1.0, 1000.0
    return A, b, c, slots, t


def affine64(A, b, c, iters=5):
    """Primal affine scaling in float64 with a general solver; returns (x, converged)."""
    x = np.ones(A.shape[1])
    d_max = 0.0
    for _ in range(iters):
        AD = A * x**2
        y = np.linalg.solve(AD @ A.T, AD @ c)
        d = x * (c - A.T @ y)
        d_max = max(float(d.max()), 0.0)
        alpha = 0.999 / d_max if d_max > 1e-9 else 1.0
        x = x * (1.0 - alpha * d)
    residual = np.abs(A @ x - b).max()
    converged = d_max < 0.1 and 0.0 <= x[-1] < 1e-4 and residual < 0.05
    return x, converged


def random_location(seed, num_experts, ep_size, num_physical_experts, num_nodes=1):
    rng = np.random.default_rng(seed)
    p2l = np.concatenate(
        [np.arange(num_experts), rng.integers(0, num_experts, num_physical_experts - num_experts)]
    )
    rng.shuffle(p2l)
    return moelb.ExpertLocation(p2l[None].astype(np.int32), num_experts, ep_size, num_nodes)


def loads_from_shares(x, slots, t, location):
    """Per-rank loads of an LP solution: copies take their share over the expert's total
    share, single copies all of their expert's load (float64)."""
    p2l = location.physical_to_logical[0]
    S = location.num_local_physical_experts
    share = np.zeros(location.num_physical_experts)
    share[slots] = np.maximum(x[: len(slots)], 0.0)
    out = np.zeros(location.ep_size)
    counts = location.logical_count[0]
    for p, e in enumerate(p2l):
        if counts[e] == 1:
            out[p // S] += t[e]
        else:
            total = share[p2l == e].sum()
            out[p // S] += t[e] * share[p] / total
    return out


MID_SIZES = [(16, 4, 20), (16, 4, 24), (64, 8, 72), (64, 8, 80)]


@pytest.mark.parametrize("seed", range(8))
def test_lp_matches_the_written_spec(seed):
    E, W, P = MID_SIZES[seed % len(MID_SIZES)]
    location = random_location(seed, E, W, P)
    counts = np.random.default_rng([seed, 1]).integers(0, 2000, E)
    problem = rd.sglang_lp_problem(counts, location, 0)
    A, b, c, slots, t = lp64(counts, location.physical_to_logical[0], E, W)
    assert problem.A.dtype == np.float32 and problem.b.dtype == np.float32
    assert problem.A.shape == A.shape
    np.testing.assert_array_equal(problem.A[:, :-1], A[:, :-1])
    np.testing.assert_allclose(problem.A[:, -1], A[:, -1], rtol=0, atol=1e-6)
    np.testing.assert_allclose(problem.b, b, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(problem.c, c)
    np.testing.assert_array_equal(problem.phy_replicated, slots)
    np.testing.assert_allclose(problem.t, t, rtol=1e-6)
    # x = 1 is feasible: the Big-M column's purpose.
    np.testing.assert_allclose(problem.A @ np.ones(A.shape[1], np.float32), problem.b, atol=1e-5)


@pytest.mark.parametrize("seed", range(8))
def test_affine_scaling_agrees_with_float64(seed):
    E, W, P = MID_SIZES[seed % len(MID_SIZES)]
    location = random_location(seed, E, W, P)
    counts = np.random.default_rng([seed, 1]).integers(0, 2000, E)
    A, b, c, _, t = lp64(counts, location.physical_to_logical[0], E, W)
    x64, converged64 = affine64(A, b, c)
    result = rd.sglang_affine_scaling(A, b, c)
    assert converged64 and result.converged
    assert result.x.dtype == np.float32
    # Float32 against float64 over 5 steps toward the boundary: agreement to a small fraction of
    # the largest expert share (the solve of A D A^T loses digits as x spreads over 1e-9..1).
    np.testing.assert_allclose(result.x[:-1], x64[:-1], rtol=0, atol=2e-3 * t.max())
    np.testing.assert_allclose(result.x[-2], x64[-2], rtol=1e-3)  # M, the objective
    assert 0 <= result.big_m < 1e-4
    np.testing.assert_array_equal(result.solution, result.x)


def test_affine_scaling_agrees_with_float64_at_deepseek_v3_size():
    E, W, P = 256, 32, 288
    location = random_location(5, E, W, P, num_nodes=4)
    counts = np.random.default_rng(6).integers(0, 2000, E)
    A, b, c, slots, t = lp64(counts, location.physical_to_logical[0], E, W)
    x64, converged64 = affine64(A, b, c)
    fractions = rd.sglang_lp_fractions(counts, location, 0)
    assert converged64 and fractions.converged
    x32 = fractions.solve.x
    # Larger systems drift more in float32; what the solve decides (M and the per-rank loads)
    # still agrees closely.
    np.testing.assert_allclose(x32[-2], x64[-2], rtol=2e-3)
    ours = rd.sglang_lp_rank_loads(counts, location, 0, log2phy_prob=fractions.log2phy_prob)
    theirs = loads_from_shares(x64, slots, t, location) * counts.sum()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-3 * theirs.mean())


def test_not_converged_falls_back_to_one_half():
    # Experts 0-3 have two copies, 4-7 one; all tokens on the single-copy expert 7.
    location = moelb.ExpertLocation.trivial(1, 8, 12, 4)
    counts = np.zeros(8)
    counts[7] = 1000
    result = rd.sglang_lp_fractions(counts, location, 0)
    assert not result.converged
    assert result.solve.d_max >= 0.1 or result.solve.big_m >= 1e-4
    np.testing.assert_array_equal(result.solve.solution, 0.5)
    # Every copy of a replicated expert 0.5 (an equal split); single copies keep their t.
    np.testing.assert_array_equal(result.log2phy_prob[:4], 0.5)
    np.testing.assert_array_equal(result.log2phy_prob[4:7], 0.0)
    np.testing.assert_array_equal(result.log2phy_prob[7], [1.0, 0.0])
    # The float64 model agrees that this instance does not converge.
    A, b, c, _, _ = lp64(counts, location.physical_to_logical[0], 8, 4)
    assert not affine64(A, b, c)[1]


def test_replicated_rows_sum_to_the_expert_share():
    location = random_location(11, 64, 8, 80)
    counts = np.random.default_rng(12).integers(0, 5000, 64)
    result = rd.sglang_lp_fractions(counts, location, 0)
    assert result.converged
    t = counts / counts.sum()
    multi = location.logical_count[0] > 1
    rows = result.log2phy_prob.sum(axis=1, dtype=np.float64)
    np.testing.assert_allclose(rows[multi], t[multi], rtol=0, atol=result.solve.residual + 1e-6)
    assert (result.log2phy_prob >= 0).all()
    # Padding columns (replica -1) are 0.
    assert (result.log2phy_prob[location.logical_to_physical[0] < 0] == 0).all()


def test_single_copy_row_holds_its_share():
    location = random_location(3, 16, 4, 20)
    counts = np.arange(16) * 10
    result = rd.sglang_lp_fractions(counts, location, 0)
    t = (counts / counts.sum()).astype(np.float32)
    single = np.flatnonzero(location.logical_count[0] == 1)
    assert len(single) > 0
    np.testing.assert_allclose(result.log2phy_prob[single, 0], t[single], rtol=1e-6)
    np.testing.assert_array_equal(result.log2phy_prob[single, 1:], 0.0)
    assert result.log2phy_prob.shape == (16, location.max_replicas)


def test_replica_order_follows_logical_to_physical():
    # Expert 0 has copies in slots 0 (rank 0) and 8 (rank 2); rank 0 also holds the heavy
    # single-copy expert 8, so the LP moves expert 0's tokens to its copy on rank 2.
    p2l = np.array([[0, 1, 2, 8, 4, 5, 6, 7, 0, 1, 2, 3]], dtype=np.int32)
    location = moelb.ExpertLocation(p2l, 9, 3)
    counts = np.array([1000, 10, 10, 10, 10, 10, 10, 10, 2000])
    result = rd.sglang_lp_fractions(counts, location, 0)
    assert result.converged
    np.testing.assert_array_equal(location.logical_to_physical[0, 0], [0, 8])
    assert result.log2phy_prob[0, 1] > 10 * result.log2phy_prob[0, 0]


def test_zero_counts():
    location = random_location(4, 16, 4, 24)
    counts = np.zeros(16, dtype=np.int64)
    result = rd.sglang_lp_fractions(counts, location, 0)
    assert np.isfinite(result.log2phy_prob).all()
    single = location.logical_count[0] == 1
    np.testing.assert_array_equal(result.log2phy_prob[single], 0.0)
    np.testing.assert_array_equal(rd.sglang_lp_rank_loads(counts, location, 0), 0.0)
    # A row of zeros picks uniformly among the expert's replicas (SGLang's fallback).
    prob = np.zeros_like(result.log2phy_prob)
    ids = np.full((4000, 1), int(np.argmax(location.logical_count[0])), dtype=np.int32)
    picks = rd.sglang_lp_sample(ids, prob, location, 0, seed=1)
    replicas = location.logical_to_physical[0, ids[0, 0]]
    replicas = replicas[replicas >= 0]
    freq = np.array([(picks == p).mean() for p in replicas])
    np.testing.assert_allclose(freq, 1 / len(replicas), atol=0.04)


def test_sample_frequencies_follow_the_rows():
    location = moelb.ExpertLocation.trivial(1, 4, 12, 4)  # every expert has 3 copies
    prob = np.array(
        [[0.2, 0.3, 0.5], [1.0, 0.0, 0.0], [0.0, 0.0, 2.0], [0.1, 0.1, 0.1]], dtype=np.float32
    )
    T = 20000
    ids = np.repeat(np.arange(4, dtype=np.int32), T).reshape(4 * T, 1)
    ids[::7] = -1
    picks = rd.sglang_lp_sample(ids, prob, location, 0, seed=7)
    assert picks.dtype == np.int32 and picks.shape == ids.shape
    assert (picks[ids == -1] == -1).all()
    for e in range(4):
        mine = picks[ids == e]
        replicas = location.logical_to_physical[0, e]
        freq = np.array([(mine == p).mean() for p in replicas])
        expected = prob[e] / prob[e].sum()
        sigma = np.sqrt(expected * (1 - expected) / len(mine))
        assert (np.abs(freq - expected) <= 5 * sigma + 1e-12).all(), (e, freq, expected)
    np.testing.assert_array_equal(picks, rd.sglang_lp_sample(ids, prob, location, 0, seed=7))
    assert not np.array_equal(picks, rd.sglang_lp_sample(ids, prob, location, 0, seed=8))


def test_dispatch_and_rank_loads():
    location = random_location(8, 16, 4, 24)
    rng = np.random.default_rng(9)
    topk_ids = rng.integers(0, 16, (3000, 2)).astype(np.int32)
    topk_ids[-5:] = -1
    counts = np.bincount(topk_ids[topk_ids >= 0], minlength=16)
    picks = rd.sglang_lp_dispatch(topk_ids, location, 0, seed=3)
    np.testing.assert_array_equal(
        picks, rd.sglang_lp_dispatch(topk_ids, location, 0, seed=3, counts=counts)
    )
    p2l = location.physical_to_logical[0]
    assert (p2l[picks[topk_ids >= 0]] == topk_ids[topk_ids >= 0]).all()
    assert (picks[topk_ids < 0] == -1).all()
    expected = rd.sglang_lp_rank_loads(counts, location, 0)
    assert expected.dtype == np.float64 and expected.shape == (4,)
    np.testing.assert_allclose(expected.sum(), counts.sum())
    realised = np.bincount(picks[picks >= 0] // location.num_local_physical_experts, minlength=4)
    np.testing.assert_allclose(realised, expected, rtol=0.06)
    # Counts times the normalised rows, summed per rank, written out.
    prob = rd.sglang_lp_fractions(counts, location, 0).log2phy_prob.astype(np.float64)
    manual = np.zeros(4)
    for e in range(16):
        for k, p in enumerate(location.logical_to_physical[0, e]):
            if p >= 0:
                manual[p // 6] += counts[e] * prob[e, k] / prob[e].sum()
    np.testing.assert_allclose(expected, manual, rtol=1e-12)


def test_lp_balances_better_than_the_equal_split():
    # On this instance the LP's expected peak is below the equal split's. Not a theorem: after
    # 5 iterations the LP is not at its optimum, and on about 1 in 40 random mid-size instances
    # its peak is above the equal split's.
    location = random_location(13, 64, 8, 80)
    counts = np.random.default_rng(14).integers(0, 3000, 64)
    lp = rd.sglang_lp_rank_loads(counts, location, 0)
    equal = moelb.dispatch.expected_rank_loads(counts[None], location, "equal_split")[0]
    assert lp.max() <= equal.max() + 1e-9


def test_errors():
    location = moelb.ExpertLocation.trivial(2, 8, 12, 4)
    good = np.ones(8)
    with pytest.raises(moelb.InvalidArgumentError, match="counts has shape"):
        rd.sglang_lp_fractions(np.ones(7), location, 0)
    with pytest.raises(moelb.InvalidArgumentError, match=r"counts\[2\] = -1"):
        rd.sglang_lp_fractions([1, 1, -1, 1, 1, 1, 1, 1], location, 0)
    with pytest.raises(moelb.InvalidArgumentError, match=r"counts\[0\] = nan"):
        rd.sglang_lp_rank_loads([np.nan] + [1] * 7, location, 0)
    with pytest.raises(moelb.InvalidArgumentError, match="float32"):
        rd.sglang_lp_fractions([1e39] + [1] * 7, location, 0)
    with pytest.raises(moelb.InvalidArgumentError, match="layer=2"):
        rd.sglang_lp_fractions(good, location, 2)
    with pytest.raises(TypeError, match="location must be"):
        rd.sglang_lp_fractions(good, location.physical_to_logical, 0)
    with pytest.raises(TypeError, match="layer must be"):
        rd.sglang_lp_fractions(good, location, 0.0)
    with pytest.raises(moelb.InvalidArgumentError, match="topk_ids holds 8"):
        rd.sglang_lp_dispatch(np.array([[0, 8]]), location, 0, seed=0)
    with pytest.raises(moelb.InvalidArgumentError, match="topk_ids holds -2"):
        rd.sglang_lp_sample(np.array([[-2]]), np.ones((8, 2)), location, 0, seed=0)
    with pytest.raises(moelb.InvalidArgumentError, match="integer"):
        rd.sglang_lp_sample(np.array([[0.5]]), np.ones((8, 2)), location, 0, seed=0)
    with pytest.raises(moelb.InvalidArgumentError, match="log2phy_prob has shape"):
        rd.sglang_lp_sample(np.array([[0]]), np.ones((8, 3)), location, 0, seed=0)
    with pytest.raises(moelb.InvalidArgumentError, match="log2phy_prob has shape"):
        rd.sglang_lp_rank_loads(good, location, 0, log2phy_prob=np.ones((7, 2)))
    with pytest.raises(moelb.InvalidArgumentError, match="shapes"):
        rd.sglang_affine_scaling(np.ones((2, 3)), np.ones(3), np.ones(3))
    with pytest.raises(moelb.InvalidArgumentError, match="num_iters"):
        rd.sglang_affine_scaling(np.ones((2, 3)), np.ones(2), np.ones(3), num_iters=0)


# ---------------------------------------------------------------------------------------------
# DeepSeek LPLB's test layouts
# ---------------------------------------------------------------------------------------------


def test_topologies():
    cube = rd.LPLB_CUBE_8P2E
    assert cube.shape == (8, 2)
    for i in range(8):
        # k = 0: the previous rank of a 4-ring within each half; k = 1: a rank of the other half.
        assert cube[i, 0] == i // 4 * 4 + (i - 1) % 4
        assert cube[i, 1] // 4 != i // 4
    hyper = rd.LPLB_HYPERCUBE_16P2E
    assert hyper.shape == (16, 2)
    for i in range(16):
        assert hyper[i, 0] == i // 4 * 4 + (i - 1) % 4
        assert hyper[i, 1] == (i - 4) % 16
    torus = rd.lplb_torus_2d(8, 4)
    assert torus.shape == (32, 2)
    for i in range(8):
        for j in range(4):
            assert tuple(torus[i * 4 + j]) == ((i + 1) % 8 * 4 + j, i * 4 + (j + 1) % 4)
    np.testing.assert_array_equal(rd.LPLB_RING_8P[:, 0], (np.arange(8) + 1) % 8)
    for r2o in (cube, hyper, torus, rd.LPLB_RING_8P):
        for k in range(r2o.shape[1]):
            assert sorted(r2o[:, k]) == list(range(r2o.shape[0]))
            assert (r2o[:, k] != np.arange(r2o.shape[0])).all()


def test_bounds_of_the_named_cases():
    bounds = {case.name: case.max_balance for case in rd.LPLB_TEST_CASES}
    assert bounds["cube_ep32"] == 1.07
    assert bounds["cube_ep64"] == 1.10
    assert bounds["hypercube_ep16"] == 1.03
    assert bounds["torus_8x4_ep32"] == 1.01
    assert len(bounds) == len(rd.LPLB_TEST_CASES)


@pytest.mark.parametrize("case", rd.LPLB_TEST_CASES, ids=lambda case: case.name)
def test_lplb_layout_invariants(case):
    location = case.location(seed=2, num_layers=2)
    E, W, P = case.num_experts, case.ep_size, case.num_physical_experts
    G, K = case.r2o.shape
    assert location.num_physical_experts == P and location.ep_size == W
    assert location.num_nodes == max(1, W // 8)
    np.testing.assert_array_equal(location.physical_to_logical[0], location.physical_to_logical[1])
    p2l = location.physical_to_logical[0].reshape(W, P // W)  # equal slot counts per rank
    local, extra = E // W, P // W - E // W
    own = p2l[:, :local]
    # Every expert is owned exactly once; the first redundants_per_rank experts of every rank
    # have exactly one more copy, the rest none.
    np.testing.assert_array_equal(np.sort(own.ravel()), np.arange(E))
    counts = location.logical_count[0]
    assert set(np.unique(counts)) == {1, 2}
    np.testing.assert_array_equal(
        np.sort(np.flatnonzero(counts == 2)), np.sort(own[:, :extra].ravel())
    )
    # Each copy is on the rank that the topology links to the owner: slot (c, k) of rank r holds
    # the (c * K + k)-th expert of rank r2o[r % G, k] of r's group.
    for r in range(W):
        for slot in range(extra):
            k = slot % K
            owner = r // G * G + case.r2o[r % G, k]
            assert owner != r
            assert p2l[r, local + slot] == own[owner, slot]
    for r in range(W):
        assert len(set(p2l[r])) == P // W  # never two copies of an expert on one rank


def test_lplb_reorder_replicates_each_rank_s_heaviest_history():
    case = rd.LPLB_TEST_CASES[0]  # cube, EP32, with reorder
    history = rd.lplb_workload_history(case.num_experts, seed=5)
    location = case.location(seed=5)
    p2l = location.physical_to_logical[0].reshape(case.ep_size, -1)
    own = p2l[:, : case.num_experts // case.ep_size]
    # Each rank's own experts in descending history: the replicated ones are its heaviest.
    assert (np.diff(history[own], axis=1) <= 0).all()
    # The order comes from DeepSeek's EPLB without redundancy on that history.
    plan = moelb.rebalance(history[None], case.num_experts, 4, 4, 32, algorithm="deepseek")
    expected = plan.location.physical_to_logical[0].reshape(32, -1)
    np.testing.assert_array_equal(np.sort(own, axis=1), np.sort(expected, axis=1))
    plain = rd.lplb_location(case.r2o, 256, 32, 2)
    np.testing.assert_array_equal(
        plain.physical_to_logical[0].reshape(32, -1)[:, :8], np.arange(256).reshape(32, 8)
    )


def test_lplb_location_errors():
    cube = rd.LPLB_CUBE_8P2E
    with pytest.raises(moelb.InvalidArgumentError, match="permutation"):
        rd.lplb_location(np.zeros((8, 2)), 256, 32, 2)
    with pytest.raises(moelb.InvalidArgumentError, match="ep_size=12"):
        rd.lplb_location(cube, 240, 12, 2)
    with pytest.raises(moelb.InvalidArgumentError, match="num_experts=100"):
        rd.lplb_location(cube, 100, 32, 2)
    with pytest.raises(moelb.InvalidArgumentError, match="redundants_per_rank=3"):
        rd.lplb_location(cube, 256, 32, 3)
    with pytest.raises(moelb.InvalidArgumentError, match="redundants_per_rank=10"):
        rd.lplb_location(cube, 256, 32, 10)
    with pytest.raises(moelb.InvalidArgumentError, match="workload_history"):
        rd.lplb_location(cube, 256, 32, 2, workload_history=np.ones(5))
    with pytest.raises(moelb.InvalidArgumentError, match="torus"):
        rd.lplb_torus_2d(0, 4)


def test_lplb_load_generator_statistics():
    loads = rd.lplb_test_load(256, seed=0, size=400)
    assert loads.dtype == np.int32 and loads.shape == (400, 256)
    assert loads.min() >= 0
    values = loads.astype(np.float64)
    # N(1, 0.3) * 4096, clipped at 0 (3.3 sigma: ~4e-4 of draws) and truncated.
    assert abs(values.mean() - 4096 + 0.5) < 15  # standard error ~4
    assert abs(values.std() / (0.3 * 4096) - 1) < 0.02
    assert (loads == 0).mean() < 2e-3
    single = rd.lplb_test_load(256, seed=0)
    assert single.shape == (256,)
    np.testing.assert_array_equal(single, rd.lplb_test_load(256, seed=0))
    assert not np.array_equal(single, rd.lplb_test_load(256, seed=1))
    # The formula itself, from the same normal draws.
    z = np.random.default_rng(0).standard_normal(256, dtype=np.float32)
    expected = np.floor(np.maximum(z.astype(np.float64) * 0.3 + 1, 0) * 4096)
    assert np.abs(single - expected).max() <= 1
    history = rd.lplb_workload_history(256, seed=0)
    assert history.dtype == np.int64
    assert abs(history.mean() / 2**20 - 1) < 0.05


def test_lplb_case_is_solved_by_the_sglang_model():
    # The reference models meet: SGLang's lp on LPLB's hypercube layout and test load converges
    # and improves on the equal split (LPLB's own solver is not modelled).
    case = next(c for c in rd.LPLB_TEST_CASES if c.name == "hypercube_ep16")
    location = case.location(seed=0)
    load = rd.lplb_test_load(case.num_experts, seed=0)
    fractions = rd.sglang_lp_fractions(load, location, 0)
    assert fractions.converged
    lp = rd.sglang_lp_rank_loads(load, location, 0, log2phy_prob=fractions.log2phy_prob)
    equal = moelb.dispatch.expected_rank_loads(load[None], location, "equal_split")[0]
    assert lp.max() / lp.mean() < equal.max() / equal.mean()
