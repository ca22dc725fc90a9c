"""Reference models of other engines' per-step solvers, reproduced on the CPU for measurement only.

Nothing here is moelb's dispatch, and nothing here is exported from ``moelb``: import it as
``moelb.reference_dispatch``. These models exist so that moelb's own per-step split (issue 19)
can be measured against what the other engines do on the same inputs.

SGLang ``--ep-dispatch-algorithm lp`` (``../shared/reference/dispatch.md`` section 5; SGLang's
``srt/eplb/lplb_solver.py`` and the ``lplb`` kernels ``lp_prep``, ``ipm``, ``lp_post``,
``dispatch_probability``):

- ``sglang_lp_problem``: the standard-form LP of one layer and one step, built as
  ``LPLBSolver.__init__`` and ``lp_prep`` build it;
- ``sglang_affine_scaling``: the 5 float32 iterations of primal affine scaling with the
  kernel's Cholesky and its convergence test;
- ``sglang_lp_fractions``: both, then ``lp_post``: the per-replica table ``log2phy_prob [E, X]``
  (every entry 0.5 for a copy when the iteration did not converge);
- ``sglang_lp_sample`` / ``sglang_lp_dispatch``: the per-token inverse-CDF pick of
  ``dispatch_probability`` from a seeded NumPy generator (SGLang draws ``torch.rand``);
- ``sglang_lp_rank_loads``: the expected per-rank load of the picks.

Details dispatch.md leaves open, taken from SGLang's source (its ``main`` branch, 2026): the
rows of A are the replicated experts in ascending id, then the ranks; its columns the replicated
experts' slots in ascending slot order, then the slacks, M, Big-M (``LPLBSolver.__init__``); the
Cholesky works on the lower triangle without pivoting and clamps each pivot to >= 1e-12
(``ipm.cuh``); ``max(d)`` and the residual are reductions from 0 that skip NaNs (``fmaxf``);
``t = counts * (1 / max(total, 1))`` (``lp_prep.cuh``); X is the width of the placement's replica
table (``logical_to_all_physical_map``, here ``location.max_replicas``); a pick is the smallest
column c with ``u * row_sum < cumsum[c]`` and a row summing to 0 picks uniformly among the
replicas (``dispatch_probability.cuh``). Newer SGLang pads the LP to placement-independent
shapes with all-zero rows and columns (CUDA graphs); that changes no value here and is not
modelled, nor are its decode-only variants (``dispatch_decode_integral``, METRO), which
dispatch.md does not describe.

DeepSeek LPLB's test inputs (dispatch.md section 6; LPLB's ``tests/test_solve.py``,
``tests/utils.py``, ``lplb/planner.py``): its redundancy topologies (``r2o`` matrices), the
placements its planner builds from them (``lplb_location``), its load generator
(``lplb_test_load``) and the max/mean bounds its tests accept (``LPLB_TEST_CASES``). LPLB's own
per-group LP is not modelled: the bounds are what its solver reaches on these inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from ._core import ExpertLocation, InvalidArgumentError
from .eplb import rebalance

__all__ = [
    "LPLB_CUBE_8P2E",
    "LPLB_GPUS_PER_NODE",
    "LPLB_HYPERCUBE_16P2E",
    "LPLB_RING_8P",
    "LPLB_TEST_CASES",
    "SGLANG_LP_BIG_M_COST",
    "SGLANG_LP_FALLBACK",
    "SGLANG_LP_NUM_ITERS",
    "AffineScalingResult",
    "LplbTestCase",
    "SglangLpProblem",
    "SglangLpResult",
    "lplb_location",
    "lplb_test_load",
    "lplb_torus_2d",
    "lplb_workload_history",
    "sglang_affine_scaling",
    "sglang_lp_dispatch",
    "sglang_lp_fractions",
    "sglang_lp_problem",
    "sglang_lp_rank_loads",
    "sglang_lp_sample",
]

F32 = np.float32

# ---------------------------------------------------------------------------------------------
# SGLang `lp`
# ---------------------------------------------------------------------------------------------

#: Iterations of SGLang's affine scaling (``DEFAULT_NUM_ITERS``).
SGLANG_LP_NUM_ITERS = 5
#: What the kernel writes to every entry of x when the iteration did not converge.
SGLANG_LP_FALLBACK = 0.5
#: The objective's weight on the Big-M column (M itself has weight 1).
SGLANG_LP_BIG_M_COST = 1000.0
# The convergence test: max(d) < 0.1, 0 <= Big-M < 1e-4, ||A x - b||_inf < 0.05.
_D_MAX_LIMIT = 0.1
_BIG_M_LIMIT = 1e-4
_RESIDUAL_LIMIT = 0.05
# The kernel's step rule: alpha = 0.999 / max(d), or 1 when max(d) <= 1e-9.
_STEP = 0.999
_D_MAX_FLOOR = 1e-9
# The kernel's Cholesky clamps every pivot to at least this before its square root.
_PIVOT_FLOOR = 1e-12


class SglangLpProblem(NamedTuple):
    """SGLang's LP of one layer and one step, ``min c^T x, A x = b, x >= 0`` (float32).

    Variables (columns of ``A``): the copy shares of the replicated experts' slots
    (``phy_replicated``, ascending slot), one slack per rank, M, Big-M. Rows: one per replicated
    expert (``log_replicated``, ascending id: its copies' shares sum to its ``t``), then one per
    rank (its copies' shares + its slack - M = - its single-copy experts' ``t``).
    """

    A: npt.NDArray[np.float32]  # [NC, NV], NC = R + W, NV = R' + W + 2
    b: npt.NDArray[np.float32]  # [NC]
    c: npt.NDArray[np.float32]  # [NV]: 1 for M, 1000 for Big-M, else 0
    t: npt.NDArray[np.float32]  # [E]: counts / max(sum(counts), 1)
    log_single: npt.NDArray[np.int64]  # experts with one replica, ascending
    phy_single: npt.NDArray[np.int64]  # their slots
    log_replicated: npt.NDArray[np.int64]  # R experts with 2+ replicas, ascending
    phy_replicated: npt.NDArray[np.int64]  # R' slots holding them, ascending


class AffineScalingResult(NamedTuple):
    """The outcome of SGLang's affine-scaling kernel.

    x: [NV] float32, the last iterate (before the fallback). converged: the kernel's test.
    solution: what the kernel returns: ``x`` if converged, else every entry 0.5.
    d_max, big_m, residual: the quantities of the test (``d_max`` is that of the last
    iteration, ``big_m = x[-1]``, ``residual = ||A x - b||_inf``).
    """

    x: npt.NDArray[np.float32]
    converged: bool
    solution: npt.NDArray[np.float32]
    d_max: float
    big_m: float
    residual: float


class SglangLpResult(NamedTuple):
    """log2phy_prob: [E, X] float32, X = ``location.max_replicas``, rows in the replica order of
    ``location.logical_to_physical[layer]`` (padding columns 0): a copy of a replicated expert
    holds its share ``max(x, 0)``, a single copy its ``t``. converged: whether the LP converged
    (when not, every copy's entry is 0.5). solve: the affine-scaling details."""

    log2phy_prob: npt.NDArray[np.float32]
    converged: bool
    solve: AffineScalingResult


def sglang_lp_problem(counts: Any, location: ExpertLocation, layer: int) -> SglangLpProblem:
    """Builds SGLang's ``lp`` LP for one layer and one step (dispatch.md section 5, step 2).

    counts: [E] global token count per logical expert (all-reduced over the EP ranks), finite and
        >= 0; read as float32 as SGLang does.
    location: the placement; layer: which of its layers.
    """
    _check_location(location, layer)
    n = _counts_f32(counts, location.num_logical_experts)
    E, W = location.num_logical_experts, location.ep_size
    P, S = location.num_physical_experts, location.num_local_physical_experts
    phy2log = location.physical_to_logical[layer].astype(np.int64)
    logcnt = np.bincount(phy2log, minlength=E)

    # Index sets as LPLBSolver builds them: experts in ascending id, slots in ascending slot.
    log_single = np.flatnonzero(logcnt == 1).astype(np.int64)
    log_replicated = np.flatnonzero(logcnt > 1).astype(np.int64)
    phy_replicated = np.flatnonzero(logcnt[phy2log] > 1).astype(np.int64)
    slot_of = np.full(E, -1, dtype=np.int64)
    slot_of[phy2log[::-1]] = np.arange(P - 1, -1, -1)  # the (only) slot of a single-copy expert
    phy_single = slot_of[log_single]

    rank_of = np.arange(P) // S
    R, Rp = len(log_replicated), len(phy_replicated)
    NC, NV = R + W, Rp + W + 2
    A = np.zeros((NC, NV), dtype=F32)
    # C: the copies of a replicated expert share its load.
    row_of_expert = np.full(E, -1, dtype=np.int64)
    row_of_expert[log_replicated] = np.arange(R)
    A[row_of_expert[phy2log[phy_replicated]], np.arange(Rp)] = 1.0
    # B2 | I | -1: per rank, its copies' shares + its slack - M.
    A[R + rank_of[phy_replicated], np.arange(Rp)] = 1.0
    A[R + np.arange(W), Rp + np.arange(W)] = 1.0
    A[R:, Rp + W] = -1.0

    # lp_prep: t = counts / max(total, 1) as counts * (1 / total) in float32 (the kernel
    # multiplies by the reciprocal); b1 = t[replicated]; b2 = -B1 t1, accumulated per rank.
    total = max(F32(n.sum(dtype=F32)), F32(1.0))
    t = n * (F32(1.0) / total)
    t1 = t[log_single]
    b = np.empty(NC, dtype=F32)
    b[:R] = t[log_replicated]
    b2 = np.zeros(W, dtype=F32)
    np.add.at(b2, rank_of[phy_single], t1)
    b[R:] = -b2
    # Big-M column b - A_base.sum(1), so that x = 1 is feasible.
    A[:, NV - 1] = b - A[:, : NV - 1].sum(axis=1, dtype=F32)
    c = np.zeros(NV, dtype=F32)
    c[NV - 2] = 1.0
    c[NV - 1] = SGLANG_LP_BIG_M_COST
    return SglangLpProblem(
        A=A,
        b=b,
        c=c,
        t=t,
        log_single=log_single,
        phy_single=phy_single,
        log_replicated=log_replicated,
        phy_replicated=phy_replicated,
    )


def sglang_affine_scaling(
    A: Any, b: Any, c: Any, num_iters: int = SGLANG_LP_NUM_ITERS
) -> AffineScalingResult:
    """SGLang's ``ipm_solve`` kernel in NumPy float32: primal affine scaling from x = 1.

    Each iteration: D = diag(x^2), solve (A D A^T) y = A D c by the kernel's Cholesky (no
    pivoting; every pivot clamped to >= 1e-12 before its square root, so a singular system still
    gives finite numbers), r = A^T y, d = x * (c - r), alpha = 0.999 / max(d) (1 when max(d) <=
    1e-9), x <- x * (1 - alpha d). Converged iff max(d) < 0.1 (last iteration), 0 <= x[-1] <
    1e-4 and ||A x - b||_inf < 0.05.

    Like the kernel, ``max(d)`` and the residual are ``fmaxf`` reductions started at 0: NaNs are
    skipped and a vector with no positive entry has max 0 (then alpha = 1: x <- x * (1 - d)).
    The sums run in a different order from the GPU's, so results agree with SGLang's to float32
    rounding, not bit for bit.

    A: [NC, NV], b: [NC], c: [NV] (converted to float32).
    """
    A = np.ascontiguousarray(A, dtype=F32)
    b = np.ascontiguousarray(b, dtype=F32)
    c = np.ascontiguousarray(c, dtype=F32)
    if A.ndim != 2 or b.shape != (A.shape[0],) or c.shape != (A.shape[1],):
        raise InvalidArgumentError(
            f"A, b, c have shapes {A.shape}, {b.shape}, {c.shape}; expected [NC, NV], [NC], [NV]"
        )
    if num_iters < 1:
        raise InvalidArgumentError(f"num_iters must be >= 1, got {num_iters}")
    x = np.ones(A.shape[1], dtype=F32)
    d_max = F32(0.0)
    with np.errstate(all="ignore"):  # the kernel lets inf/NaN through to its test
        for _ in range(num_iters):
            ax2 = A * (x * x)
            y = _cholesky_solve(np.tril(ax2 @ A.T), ax2 @ c)
            r = y @ A
            d = x * (c - r)
            d_max = F32(np.fmax.reduce(d, initial=F32(0.0)))
            alpha = F32(_STEP) / d_max if d_max > _D_MAX_FLOOR else F32(1.0)
            x = x * (F32(1.0) - alpha * d)
        residual = F32(np.fmax.reduce(np.abs(A @ x - b), initial=F32(0.0)))
    big_m = x[-1]
    converged = bool(
        d_max < _D_MAX_LIMIT and big_m >= 0 and big_m < _BIG_M_LIMIT and residual < _RESIDUAL_LIMIT
    )
    solution = x if converged else np.full_like(x, SGLANG_LP_FALLBACK)
    return AffineScalingResult(
        x=x,
        converged=converged,
        solution=solution,
        d_max=float(d_max),
        big_m=float(big_m),
        residual=float(residual),
    )


def _cholesky_solve(K: npt.NDArray[np.float32], rhs: npt.NDArray[np.float32]) -> Any:
    """The kernel's ``cholesky_factor`` + ``cholesky_apply`` on the lower triangle of K."""
    L = K.astype(F32, copy=True)
    N = L.shape[0]
    for k in range(N):
        L[k, k] = np.sqrt(np.fmax(L[k, k], F32(_PIVOT_FLOOR)))
        L[k + 1 :, k] /= L[k, k]
        col = L[k + 1 :, k]
        L[k + 1 :, k + 1 :] -= np.outer(col, col)  # only the lower triangle is read
    y = rhs.astype(F32, copy=True)
    for i in range(N):
        y[i] = (y[i] - L[i, :i] @ y[:i]) / L[i, i]
    for i in range(N - 1, -1, -1):
        y[i] = (y[i] - L[i + 1 :, i] @ y[i + 1 :]) / L[i, i]
    return y


def sglang_lp_fractions(counts: Any, location: ExpertLocation, layer: int) -> SglangLpResult:
    """SGLang ``lp``'s per-replica table for one layer and one step (dispatch.md section 5).

    counts: [E] global token counts per logical expert (finite, >= 0).
    location: the placement; layer: which of its layers.

    Returns ``SglangLpResult(log2phy_prob [E, X] float32, converged, solve)``: a replicated
    expert's copies hold their LP shares ``max(x, 0)`` (summing to about the expert's ``t`` when
    converged, all 0.5 when not), a single copy its ``t``; ``X = location.max_replicas`` and the
    columns follow ``location.logical_to_physical[layer]`` (ascending slots; SGLang's rows are
    ``logical_to_all_physical_map``'s, the same order on the placement-file path). Only the row
    proportions matter to the sampler.
    """
    problem = sglang_lp_problem(counts, location, layer)
    solve = sglang_affine_scaling(problem.A, problem.b, problem.c)
    # lp_post: phy_prob[slot] = max(x, 0) for copies, t for single copies, gathered by log2phy.
    phy_prob = np.zeros(location.num_physical_experts + 1, dtype=F32)  # last: the -1 sink
    phy_prob[problem.phy_replicated] = np.fmax(
        solve.solution[: len(problem.phy_replicated)], F32(0.0)
    )
    phy_prob[problem.phy_single] = problem.t[problem.log_single]
    log2phy = location.logical_to_physical[layer]
    return SglangLpResult(log2phy_prob=phy_prob[log2phy], converged=solve.converged, solve=solve)


def sglang_lp_sample(
    topk_ids: Any, log2phy_prob: Any, location: ExpertLocation, layer: int, seed: int
) -> npt.NDArray[np.int32]:
    """Physical ids [T, K] int32 for logical ``topk_ids`` [T, K] (``-1`` stays ``-1``): each
    (token, column) picks a replica of its expert with probability proportional to its row of
    ``log2phy_prob`` [E, X] (``dispatch_probability``: the smallest column whose running sum
    exceeds ``u * row_sum``, u uniform in [0, 1) float32 from ``np.random.default_rng(seed)``;
    a row summing to 0 picks uniformly among the expert's replicas).

    One deviation from the kernel, on purpose: when ``u * row_sum`` rounds up to the row sum
    (odds about 2**-24 per pick) the kernel clamps to column X - 1, which is a padding column
    (-1, a dropped token) for an expert with fewer than X replicas; here the pick is clamped to
    the expert's last replica instead.
    """
    _check_location(location, layer)
    E = location.num_logical_experts
    ids = np.asarray(topk_ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise InvalidArgumentError(f"topk_ids must hold integer expert ids, got dtype {ids.dtype}")
    if ids.size and (ids.min() < -1 or ids.max() >= E):
        bad = ids[(ids < -1) | (ids >= E)].flat[0]
        raise InvalidArgumentError(f"topk_ids holds {bad}, outside [-1, {E})")
    log2phy = location.logical_to_physical[layer]
    prob = np.asarray(log2phy_prob, dtype=F32)
    if prob.shape != log2phy.shape:
        raise InvalidArgumentError(
            f"log2phy_prob has shape {prob.shape} but the location's rows are {log2phy.shape}"
        )
    rng = np.random.default_rng(seed)
    flat = ids.reshape(-1).astype(np.int64)
    valid_token = flat >= 0
    e = flat[valid_token]
    u = rng.random(e.size, dtype=F32)
    maps = log2phy[e]
    p = np.where(maps >= 0, prob[e], F32(0.0))
    cum = np.cumsum(p, axis=1, dtype=F32)  # sequential, as the kernel's loop
    row_sum = cum[:, -1]
    fallback = ~(row_sum > 0)
    if fallback.any():
        cum[fallback] = np.cumsum((maps[fallback] >= 0).astype(F32), axis=1, dtype=F32)
        row_sum = cum[:, -1]
    target = u * row_sum
    chosen = (target[:, None] >= cum).sum(axis=1)
    num_valid = (maps >= 0).sum(axis=1)
    chosen = np.minimum(chosen, num_valid - 1)
    out = np.full(flat.shape, -1, dtype=np.int32)
    out[valid_token] = maps[np.arange(e.size), chosen]
    return out.reshape(ids.shape)


def sglang_lp_dispatch(
    topk_ids: Any,
    location: ExpertLocation,
    layer: int,
    seed: int,
    *,
    counts: Any = None,
) -> npt.NDArray[np.int32]:
    """SGLang ``lp`` end to end for one rank's tokens: counts, LP, per-token picks.

    topk_ids: [T, K] logical ids (-1 = padding, kept). counts: [E] the global counts the LP is
    solved for (SGLang all-reduces them over the EP group); default: the counts of ``topk_ids``
    (a single process holding every rank's tokens). seed: the pick's generator seed.
    Returns physical ids [T, K] int32.
    """
    _check_location(location, layer)
    if counts is None:
        ids = np.asarray(topk_ids)
        E = location.num_logical_experts
        if ids.size and (ids.min() < -1 or ids.max() >= E):
            bad = ids[(ids < -1) | (ids >= E)].flat[0]
            raise InvalidArgumentError(f"topk_ids holds {bad}, outside [-1, {E})")
        counts = np.bincount(ids[ids >= 0].ravel().astype(np.int64), minlength=E)
    fractions = sglang_lp_fractions(counts, location, layer)
    return sglang_lp_sample(topk_ids, fractions.log2phy_prob, location, layer, seed)


def sglang_lp_rank_loads(
    counts: Any, location: ExpertLocation, layer: int, *, log2phy_prob: Any = None
) -> npt.NDArray[np.float64]:
    """[W] float64: the expected per-rank load of SGLang ``lp``'s picks: each expert's count
    times the pick probabilities of its replicas (its row of ``log2phy_prob`` over the row's sum;
    uniform over its replicas when the row sums to 0), summed per rank.

    counts: [E] global counts (finite, >= 0). log2phy_prob: [E, X] a table already solved for
    these counts; default: ``sglang_lp_fractions(counts, location, layer).log2phy_prob``.
    """
    _check_location(location, layer)
    n = _counts_f64(counts, location.num_logical_experts)
    if log2phy_prob is None:
        log2phy_prob = sglang_lp_fractions(n, location, layer).log2phy_prob
    log2phy = location.logical_to_physical[layer]
    prob = np.asarray(log2phy_prob, dtype=np.float64)
    if prob.shape != log2phy.shape:
        raise InvalidArgumentError(
            f"log2phy_prob has shape {prob.shape} but the location's rows are {log2phy.shape}"
        )
    valid = log2phy >= 0
    weight = np.where(valid, prob, 0.0)
    row_sum = weight.sum(axis=1, keepdims=True)
    weight = np.where(row_sum > 0, weight, valid.astype(np.float64))
    weight /= weight.sum(axis=1, keepdims=True)
    out = np.zeros(location.ep_size)
    S = location.num_local_physical_experts
    np.add.at(out, log2phy[valid] // S, (n[:, None] * weight)[valid])
    return out


def _check_location(location: ExpertLocation, layer: int) -> None:
    if not isinstance(location, ExpertLocation):
        raise TypeError(f"location must be a moelb.ExpertLocation, got {type(location).__name__}")
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
        raise TypeError(f"layer must be an integer, got {type(layer).__name__}")
    if not 0 <= layer < location.num_layers:
        raise InvalidArgumentError(
            f"layer={layer} is outside [0, {location.num_layers}) of the location"
        )


def _counts_f64(counts: Any, num_experts: int) -> npt.NDArray[np.float64]:
    values = np.asarray(counts, dtype=np.float64)
    if values.shape != (num_experts,):
        raise InvalidArgumentError(
            f"counts has shape {values.shape} but the location has {num_experts} experts"
        )
    bad = ~np.isfinite(values) | (values < 0)
    if bad.any():
        expert = int(np.flatnonzero(bad)[0])
        raise InvalidArgumentError(f"counts[{expert}] = {values[expert]} is not a count >= 0")
    return values


def _counts_f32(counts: Any, num_experts: int) -> npt.NDArray[np.float32]:
    values = _counts_f64(counts, num_experts)
    if values.max(initial=0.0) > np.finfo(F32).max:
        raise InvalidArgumentError(f"counts reach {values.max()}, beyond float32")
    return values.astype(F32)


# ---------------------------------------------------------------------------------------------
# DeepSeek LPLB's test inputs
# ---------------------------------------------------------------------------------------------

#: LPLB's redundancy topologies (``tests/utils.py``), ``r2o[i, k]``: the rank (within a group of
#: ``r2o.shape[0]`` ranks) whose k-th replicated expert rank i holds a second copy of.
#: Cube: 8 ranks, 2 copies per rank: a 4-ring in each half (k = 0) and a cross edge (k = 1).
LPLB_CUBE_8P2E = np.array(
    [[3, 0, 1, 2, 7, 4, 5, 6], [6, 7, 4, 5, 0, 1, 2, 3]], dtype=np.int64
).T.copy()
#: Hypercube: 16 ranks, 2 copies per rank: a 4-ring in each block of 4 and the rank 4 below.
LPLB_HYPERCUBE_16P2E = np.array(
    [
        [3, 0, 1, 2, 7, 4, 5, 6, 11, 8, 9, 10, 15, 12, 13, 14],
        [12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
    ],
    dtype=np.int64,
).T.copy()
#: Ring: 8 ranks, 1 copy per rank, of the next rank's expert.
LPLB_RING_8P = np.array([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=np.int64).T.copy()
#: GPUs per host where LPLB's tests ran: their EPLB reorder uses num_nodes = ep_size //
#: torch.cuda.device_count(); we take the 8-GPU hosts the cube topology is made for.
LPLB_GPUS_PER_NODE = 8


def lplb_torus_2d(m: int, n: int) -> npt.NDArray[np.int64]:
    """LPLB's ``torus_2d(m, n)``: [m * n, 2]; rank i * n + j copies an expert of rank
    ((i + 1) % m) * n + j (k = 0) and of rank i * n + (j + 1) % n (k = 1)."""
    if m < 1 or n < 1:
        raise InvalidArgumentError(f"torus sides must be >= 1, got m={m}, n={n}")
    return np.array(
        [[(i + 1) % m * n + j, i * n + (j + 1) % n] for i in range(m) for j in range(n)],
        dtype=np.int64,
    )


def lplb_location(
    r2o: Any,
    num_experts: int,
    ep_size: int,
    redundants_per_rank: int,
    *,
    workload_history: Any = None,
    num_nodes: int | None = None,
    num_layers: int = 1,
) -> ExpertLocation:
    """The placement LPLB's ``Planner.update_redundancy_mapping`` builds, as an ExpertLocation.

    r2o: [G, K] topology (``LPLB_CUBE_8P2E``, ...): ranks form ep_size / G groups of G; within a
        group, rank i's k-th block of redundant slots holds copies of rank r2o[i, k]'s experts.
        Each column must be a permutation of [0, G).
    num_experts: E logical experts, a multiple of ep_size; redundants_per_rank: a multiple of K.
    workload_history: [E] loads or None. None: rank r holds experts r * E/W ... (r + 1) * E/W - 1
        in order. Given: DeepSeek's EPLB without redundancy (``moelb.rebalance(...,
        algorithm="deepseek")`` with E slots, ep_size / G groups, ``num_nodes`` nodes), then each
        rank's experts sorted by descending history (stable), as LPLB's tests do "with_reorder".
    num_nodes: of the placement and of the reorder; default max(1, ep_size // 8).
    num_layers: the layout repeated over this many layers.

    Rank r's slots: its E/W own experts, then its redundants_per_rank copies in (c, k) order,
    c < C = redundants_per_rank / K: slot (c, k) holds a copy of the (c * K + k)-th expert of
    rank r2o[r % G, k] of its group. So the first C * K experts of every rank have exactly two
    copies (the original first, on its owner) and the others one.
    """
    topo = np.asarray(r2o, dtype=np.int64)
    if topo.ndim != 2 or topo.shape[0] < 1 or topo.shape[1] < 1:
        raise InvalidArgumentError(f"r2o must be a [G, K] matrix, got shape {topo.shape}")
    G, K = topo.shape
    for k in range(K):
        if sorted(topo[:, k].tolist()) != list(range(G)):
            raise InvalidArgumentError(f"r2o[:, {k}] is not a permutation of [0, {G})")
    if ep_size < 1 or ep_size % G:
        raise InvalidArgumentError(f"ep_size={ep_size} is not a multiple of r2o's {G} ranks")
    if num_experts < 1 or num_experts % ep_size:
        raise InvalidArgumentError(
            f"num_experts={num_experts} is not a multiple of ep_size={ep_size}"
        )
    if redundants_per_rank < 0 or redundants_per_rank % K:
        raise InvalidArgumentError(
            f"redundants_per_rank={redundants_per_rank} is not a multiple of r2o's {K} columns"
        )
    local = num_experts // ep_size
    C = redundants_per_rank // K
    if C * K > local:
        raise InvalidArgumentError(
            f"redundants_per_rank={redundants_per_rank} exceeds the {local} experts of a rank"
        )
    nodes = max(1, ep_size // LPLB_GPUS_PER_NODE) if num_nodes is None else num_nodes
    n_group = ep_size // G

    if workload_history is None:
        own = np.arange(num_experts, dtype=np.int64).reshape(ep_size, local)
    else:
        history = np.asarray(workload_history, dtype=np.float64)
        if history.shape != (num_experts,):
            raise InvalidArgumentError(
                f"workload_history has shape {history.shape}, expected ({num_experts},)"
            )
        plan = rebalance(history[None], num_experts, n_group, nodes, ep_size, algorithm="deepseek")
        own = plan.location.physical_to_logical[0].astype(np.int64).reshape(ep_size, local)
        order = np.argsort(-history[own], axis=1, kind="stable")
        own = np.take_along_axis(own, order, axis=1)

    # tored[rank, c, k]: the experts to be copied; the copy of rank r's slot (c, k) comes from
    # rank r2o[r % G, k] of the same group.
    tored = own[:, : C * K].reshape(ep_size, C, K)
    ranks = np.arange(ep_size)
    source = (ranks // G * G)[:, None] + topo[ranks % G]  # [W, K]
    dup = tored[source[:, None, :], np.arange(C)[None, :, None], np.arange(K)[None, None, :]]
    phy2log = np.concatenate([own, dup.reshape(ep_size, C * K)], axis=1).reshape(-1)
    return ExpertLocation(
        np.tile(phy2log.astype(np.int32), (num_layers, 1)), num_experts, ep_size, nodes
    )


def lplb_test_load(
    num_experts: int = 256, *, seed: int, size: int | None = None
) -> npt.NDArray[np.int32]:
    """LPLB's test load per expert: ``(N(1, 0.3) clipped at 0) * 4096`` truncated to int32, in
    float32 as its ``torch.randn(...) * 0.3 + 1`` then ``clamp_min(0).mul(2**12).int()``.

    LPLB seeds torch's CUDA generator (42); here the normal draws come from
    ``np.random.default_rng(seed)``: the same law, not the same numbers.
    Returns [E] (or [size, E] for ``size`` independent steps).
    """
    shape = (num_experts,) if size is None else (size, num_experts)
    z = np.random.default_rng(seed).standard_normal(shape, dtype=F32)
    return (np.maximum(z * F32(0.3) + F32(1.0), F32(0.0)) * F32(4096.0)).astype(np.int32)


def lplb_workload_history(num_experts: int = 256, *, seed: int) -> npt.NDArray[np.int64]:
    """LPLB's reorder history: ``(N(1, 0.15) clipped at 0) * 2**20`` truncated to int64 (drawn
    independently of the test load, so the reorder does not favour the step's hot experts)."""
    z = np.random.default_rng(seed).standard_normal(num_experts, dtype=F32)
    return (np.maximum(z * F32(0.15) + F32(1.0), F32(0.0)) * F32(2**20)).astype(np.int64)


@dataclass(frozen=True)
class LplbTestCase:
    """One row of LPLB's ``test_planner_solve``: the topology, the sizes, whether the placement
    is reordered by a workload history first, and the per-step max/mean of the rank loads its
    test accepts (``balance < max_balance``) after LPLB's own solve."""

    name: str
    r2o: npt.NDArray[np.int64]
    num_experts: int
    ep_size: int
    redundants_per_rank: int
    with_reorder: bool
    max_balance: float

    @property
    def num_physical_experts(self) -> int:
        return self.num_experts + self.redundants_per_rank * self.ep_size

    def location(self, *, seed: int = 0, num_layers: int = 1) -> ExpertLocation:
        """The case's placement; with reorder, from ``lplb_workload_history(seed=seed)``."""
        history = lplb_workload_history(self.num_experts, seed=seed) if self.with_reorder else None
        return lplb_location(
            self.r2o,
            self.num_experts,
            self.ep_size,
            self.redundants_per_rank,
            workload_history=history,
            num_layers=num_layers,
        )


#: LPLB's ``test_planner_solve`` parameters, in its order. dispatch.md section 6 names four of
#: them (cube EP32 with 2 redundant per rank: 1.07; cube EP64: 1.10; hypercube EP16: 1.03; 2-D
#: torus 8x4: 1.01); the cube with 4 redundant per rank and the ring are its other two rows.
LPLB_TEST_CASES: tuple[LplbTestCase, ...] = (
    LplbTestCase("cube_ep32", LPLB_CUBE_8P2E, 256, 32, 2, True, 1.07),
    LplbTestCase("cube_ep32_4_redundant", LPLB_CUBE_8P2E, 256, 32, 4, False, 1.07),
    LplbTestCase("cube_ep64", LPLB_CUBE_8P2E, 256, 64, 2, True, 1.10),
    LplbTestCase("ring_ep32", LPLB_RING_8P, 256, 32, 1, True, 1.07),
    LplbTestCase("hypercube_ep16", LPLB_HYPERCUBE_16P2E, 256, 16, 2, True, 1.03),
    LplbTestCase("torus_8x4_ep32", lplb_torus_2d(8, 4), 256, 32, 2, False, 1.01),
)
