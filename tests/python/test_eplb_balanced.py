"""rebalance(dispatch="balanced"): planning for moelb's per-step exact split (ours; issue 20).
The realised objective is recomputed here from ``moelb.balanced_split`` on the documented
evaluation steps (``min(T, 32)`` evenly spaced steps); per layer it is never above the
equal-split plan's; without locality and with at least W - 1 redundant slots every layer that
leaves the equal-split plan is one connected piece (a union-find written here); the plan is the
same at any thread count; the CLI and the simulator take the target; bad combinations name the
parameter."""

from __future__ import annotations

import json
from pathlib import Path

import moelb
import numpy as np
import pytest
from moelb.simulate import SimulationConfig, parse_algorithm, simulate
from test_cli import SMALL_TOPOLOGY, assert_one_line_error, cli, small_dump

# (T, L, E, P, groups, N, W): demo-like, two nodes, few extra slots (P - E < W - 1).
SHAPES = [
    (6, 3, 256, 288, 8, 4, 32),
    (10, 3, 64, 80, 8, 2, 16),
    (40, 2, 30, 32, None, 4, 8),
]


def window(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """[T, L, E] int32 counts: Zipf-like popularity, multinomial steps of 64 picks per expert."""
    T, L, E = shape[:3]
    rng = np.random.default_rng(seed)
    popularity = rng.random((L, E)) ** 3 + 0.02
    popularity /= popularity.sum(axis=1, keepdims=True)
    return np.stack([rng.multinomial(64 * E, popularity) for _ in range(T)]).astype(np.int32)


def realised(counts: np.ndarray, location: moelb.ExpertLocation) -> np.ndarray:
    """[L]: the evaluated steps' largest GPU loads under balanced_split, summed, times the
    layer's total over the evaluated steps' total (rebalance's documented statistic)."""
    T, L, _ = counts.shape
    K = min(T, 32)
    steps = [(2 * k + 1) * T // (2 * K) for k in range(K)]
    W, S = location.ep_size, location.num_local_physical_experts
    out = np.zeros(L)
    for t in steps:
        split = moelb.balanced_split(counts[t].astype(np.int64), location)
        out += split.reshape(L, W, S).sum(axis=2).max(axis=1)
    evaluated = counts[steps].sum(axis=(0, 2), dtype=np.float64)
    return out * counts.sum(axis=(0, 2), dtype=np.float64) / evaluated


def pieces(location: moelb.ExpertLocation, layer: int) -> int:
    """The connected pieces of the GPUs, joined by every expert's replicas."""
    parent = list(range(location.ep_size))

    def root(g: int) -> int:
        while parent[g] != g:
            g = parent[g]
        return g

    S = location.num_local_physical_experts
    p2l = location.physical_to_logical[layer]
    for e in range(location.num_logical_experts):
        ranks = sorted({int(p) // S for p in np.flatnonzero(p2l == e)})
        for g in ranks[1:]:
            a, b = root(ranks[0]), root(g)
            if a != b:
                parent[b] = a
    return sum(root(g) == g for g in range(location.ep_size))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("locality", ["none", "node"])
def test_never_worse_than_the_equal_split_plan(shape: tuple, locality: str) -> None:
    _T, L, E, P, groups, N, W = shape
    counts = window(shape, seed=P + W)
    ours = moelb.rebalance(counts, P, groups, N, W, locality=locality, dispatch="balanced")
    equal = moelb.rebalance(counts, P, groups, N, W, locality=locality)
    mine, theirs = realised(counts, ours.location), realised(counts, equal.location)
    assert ours.stats.dispatch == "balanced"
    assert ours.stats.algorithm.endswith("+balanced")
    np.testing.assert_allclose(ours.stats.realised_max_rank_load, mine, rtol=1e-12)
    assert (mine <= theirs).all(), (mine, theirs)
    again = moelb.evaluate_placement(counts, ours.location, dispatch="balanced")
    np.testing.assert_array_equal(again.realised_max_rank_load, ours.stats.realised_max_rank_load)
    changed = [
        layer
        for layer in range(L)
        if not np.array_equal(
            ours.location.physical_to_logical[layer], equal.location.physical_to_logical[layer]
        )
    ]
    if locality == "none" and P - E >= W - 1:
        assert mine.sum() < theirs.sum()
        assert changed, "the connected layout is lower on some layer"
        for layer in changed:
            assert pieces(ours.location, layer) == 1, layer
    if locality == "node" and "locality=node" in ours.stats.algorithm:
        node_slots = P // N
        for layer in range(L):
            p2l = ours.location.physical_to_logical[layer]
            for e in range(E):
                assert len(set(np.flatnonzero(p2l == e) // node_slots)) == 1


def test_identical_for_any_thread_count() -> None:
    _T, _L, _E, P, groups, N, W = SHAPES[0]
    counts = window(SHAPES[0], seed=1)
    plans = []
    try:
        for threads in (1, 2):
            moelb.set_num_threads(threads)
            plans.append(
                moelb.rebalance(counts, P, groups, N, W, locality="none", dispatch="balanced")
            )
    finally:
        moelb.set_num_threads(0)
    a, b = plans
    np.testing.assert_array_equal(a.location.physical_to_logical, b.location.physical_to_logical)
    assert a.stats.realised_balancedness == b.stats.realised_balancedness


def test_previous_keeps_experts_in_place() -> None:
    """Replanning the same window from the plan moves nothing; a huge move cost keeps the
    previous placement; no move cost takes the realised gain."""
    _T, L, E, P, groups, N, W = SHAPES[1]
    counts = window(SHAPES[1], seed=7)
    trivial = moelb.ExpertLocation.trivial(L, E, P, W, N)
    common = dict(locality="none", dispatch="balanced")
    first = moelb.rebalance(counts, P, groups, N, W, previous=trivial, move_cost=0, **common)
    before = moelb.evaluate_placement(counts, trivial, dispatch="balanced")
    assert first.stats.realised_balancedness > before.realised_balancedness
    again = moelb.rebalance(counts, P, groups, N, W, previous=first.location, **common)
    assert again.stats.moved_experts == 0
    kept = moelb.rebalance(counts, P, groups, N, W, previous=trivial, move_cost=1e9, **common)
    np.testing.assert_array_equal(kept.location.physical_to_logical, trivial.physical_to_logical)


def test_bad_combinations_name_the_parameter() -> None:
    counts = window(SHAPES[1], seed=3)
    with pytest.raises(ValueError, match="dispatch='balanced' is moelb's target; algorithm="):
        moelb.rebalance(counts, 80, 8, 2, 16, algorithm="deepseek", dispatch="balanced")
    with pytest.raises(ValueError, match="objective='step_peak'"):
        moelb.rebalance(counts, 80, 8, 2, 16, objective="step_peak", dispatch="balanced")
    with pytest.raises(ValueError, match="dispatch='balance'"):
        moelb.rebalance(counts, 80, 8, 2, 16, dispatch="balance")


def test_cli_plans_for_the_balanced_dispatch(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    dump = tmp_path / "dump.npz"
    counts = small_dump(dump)
    out_path = tmp_path / "p.json"
    args = ["rebalance", str(dump), "-o", str(out_path), *SMALL_TOPOLOGY, "--num-groups", "8"]
    target = ["--locality", "none", "--dispatch", "balanced"]
    code, out, err = cli(capsys, *args, *target, "--json")
    assert code == 0, err
    summary = json.loads(out)
    plan = moelb.rebalance(counts, 80, 8, 2, 8, locality="none", dispatch="balanced")
    saved = moelb.load_placement(out_path, ep_size=8, num_nodes=2)
    np.testing.assert_array_equal(saved.physical_to_logical, plan.location.physical_to_logical)
    assert summary["dispatch"] == "balanced"
    assert summary["algorithm"] == "moelb(locality=none)+balanced"
    code, _, err = cli(capsys, *args, *target, "--algorithm", "deepseek")
    assert_one_line_error(code, err, "dispatch='balanced'")


def test_simulator_policy() -> None:
    assert parse_algorithm("moelb:none:balanced") == ("moelb", "none", "total", "balanced")
    config = SimulationConfig(
        model="deepseek-v3",
        num_layers=2,
        num_steps=12,
        rebalance_period=4,
        num_tokens=1024,
        algorithms=("moelb:none", "moelb:none:balanced"),
        dispatch=("balanced",),
    )
    result = simulate(config)
    ours = result.algorithms["moelb:none:balanced"]
    assert ours.ran.endswith("+balanced")
    assert 0 < ours.realised["balanced"].routed <= 1
    assert result.algorithms["moelb:none"].ran == "moelb(locality=none)"
