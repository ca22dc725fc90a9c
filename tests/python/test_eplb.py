"""The EPLB planner (DESIGN.md section 4; reference/eplb.md sections 1, 3 and 6).

- DeepSeek modes: the README example and the golden cases of reference 1.8 exactly, hand-checked
  small cases, and parity with the Python port of DeepSeek's eplb.py in
  benchmarks/deepseek_eplb_reference.py on tie-free inputs across shapes.
- Every algorithm: plan invariants and statistics against a NumPy computation (Hypothesis).
- moelb: never worse than DeepSeek under the same locality, never below the brute-force optimum on
  tiny instances, no duplicate replica on a GPU when avoidable, any topology accepted, node
  locality, ``previous`` / ``move_cost`` / ``max_moves``, input forms, thread determinism.
- Bad input: a clear ``InvalidArgumentError`` naming the parameter.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import moelb
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from moelb import ExpertLocation, InvalidArgumentError, evaluate_placement, rank_loads, rebalance

sys.path.append(str(Path(__file__).resolve().parents[2] / "benchmarks"))
try:
    import deepseek_eplb_reference as ds_ref
except ImportError:  # written concurrently; the parity tests skip until it exists
    ds_ref = None

needs_reference = pytest.mark.skipif(
    ds_ref is None, reason="benchmarks/deepseek_eplb_reference.py is not available"
)

# ---------------------------------------------------------------------------------------------
# Golden data (reference/eplb.md section 1.8)
# ---------------------------------------------------------------------------------------------

README_WEIGHT = np.array(
    [
        [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
        [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
    ]
)
README_PHY2LOG = np.array(
    [
        [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
        [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
    ]
)
README_LOGCNT = np.array(
    [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1], [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]]
)
# DeepSeek's log2phy (replica creation order); moelb lists replicas in ascending slot order.
README_LOG2PHY = [
    [[12], [15, 13], [11], [6], [7, 5], [0, 2], [1], [3], [4], [9], [8, 10], [14]],
    [[13], [15, 11], [8], [14], [9], [10, 12], [2, 4], [0], [6, 3], [7], [1], [5]],
]
README_GPU_LOADS = np.array(
    [
        [121.5, 86.5, 125, 113, 147.5, 131.5, 156, 152],
        [173, 179.5, 120.5, 172, 123, 152, 118.5, 117.5],
    ]
)
GLOBAL_PHY2LOG = np.array(
    [
        [10, 6, 10, 7, 0, 2, 11, 4, 5, 9, 5, 4, 8, 3, 1, 1],
        [1, 10, 2, 4, 5, 11, 5, 0, 6, 7, 6, 3, 8, 8, 9, 7],
    ]
)
GLOBAL_LOGCNT = np.array(
    [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1], [1, 1, 1, 1, 1, 2, 2, 2, 2, 1, 1, 1]]
)

# ---------------------------------------------------------------------------------------------
# NumPy references for the metrics (reference/eplb.md section 3)
# ---------------------------------------------------------------------------------------------


def counts_of(phy2log: np.ndarray, num_experts: int) -> np.ndarray:
    return np.stack([np.bincount(row, minlength=num_experts) for row in phy2log])


def numpy_rank_loads(load: Any, phy2log: np.ndarray, ep_size: int) -> np.ndarray:
    """[L, G]: each slot carries its expert's load divided by the expert's replica count."""
    load = np.asarray(load, dtype=np.float64)
    counts = counts_of(phy2log, load.shape[1])
    per_slot = np.take_along_axis(load, phy2log, 1) / np.take_along_axis(counts, phy2log, 1)
    return per_slot.reshape(phy2log.shape[0], ep_size, -1).sum(axis=2)


def divisor_optimum(w: np.ndarray, num_slots: int) -> float:
    """min over replica counts (>= 1 each, summing to num_slots) of max_e w_e / c_e, by a search
    over the candidate thresholds w_e / k (independent of the planner's greedy)."""
    w = np.asarray(w, dtype=np.float64)
    if w.max() <= 0:
        return 0.0
    candidates = np.unique((w[:, None] / np.arange(1, num_slots + 1)[None, :]).ravel())
    candidates = candidates[candidates > 0]

    def needed(t: float) -> int:
        with np.errstate(over="ignore"):
            ratio = np.minimum(w / t, num_slots + 1)
        return int(np.maximum(1, np.ceil(ratio * (1 - 1e-12))).sum())

    lo, hi = 0, len(candidates) - 1  # needed(candidates[-1]) == E <= num_slots
    while lo < hi:
        mid = (lo + hi) // 2
        if needed(candidates[mid]) <= num_slots:
            hi = mid
        else:
            lo = mid + 1
    return float(candidates[lo])


def gpu_blocks(phy2log_row: np.ndarray, ep_size: int) -> list[list[int]]:
    """The sorted expert ids on each GPU."""
    return [sorted(block.tolist()) for block in phy2log_row.reshape(ep_size, -1)]


def check_plan(plan: moelb.Plan, load: Any, num_physical_experts: int, ep_size: int) -> None:
    """The invariants every plan satisfies, and its stats against a NumPy computation."""
    load = np.asarray(load, dtype=np.float64)
    if load.ndim == 3:
        load = load.sum(axis=0)
    num_layers, num_experts = load.shape
    loc = plan.location
    phy2log = loc.physical_to_logical
    assert phy2log.shape == (num_layers, num_physical_experts)
    assert phy2log.dtype == np.int32
    assert loc.num_logical_experts == num_experts
    assert loc.ep_size == ep_size
    assert loc.num_local_physical_experts * ep_size == num_physical_experts  # S slots per GPU
    assert phy2log.min() >= 0 and phy2log.max() < num_experts
    counts = counts_of(phy2log, num_experts)
    assert (counts >= 1).all(), "every expert has a replica"
    assert (counts.sum(axis=1) == num_physical_experts).all()
    np.testing.assert_array_equal(loc.logical_count, counts)

    expected = numpy_rank_loads(load, phy2log, ep_size)
    np.testing.assert_allclose(rank_loads(load, loc), expected, rtol=1e-12, atol=1e-12)
    stats = plan.stats
    max_load = expected.max(axis=1)
    mean_load = load.sum(axis=1) / ep_size
    np.testing.assert_allclose(stats.max_rank_load, max_load, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.mean_rank_load, mean_load, rtol=1e-12, atol=1e-12)
    # SGLang's rate per layer (1.0 without load), averaged over all layers / the active ones.
    balancedness = (mean_load + 1e-5) / (max_load + 1e-5)
    np.testing.assert_allclose(stats.layer_balancedness, balancedness, rtol=1e-12)
    assert stats.balancedness == pytest.approx(balancedness.mean(), rel=1e-12)
    active = max_load > 0
    if active.any():
        assert stats.active_balancedness == pytest.approx(balancedness[active].mean(), rel=1e-12)
    else:
        assert stats.active_balancedness is None
    weighted = mean_load.sum() / max_load.sum() if max_load.sum() > 0 else 1.0
    assert stats.load_weighted_balancedness == pytest.approx(weighted, rel=1e-12)
    bound = np.array(
        [
            max(load[i].sum() / ep_size, divisor_optimum(load[i], num_physical_experts))
            for i in range(num_layers)
        ]
    )
    np.testing.assert_allclose(stats.lower_bound, bound, rtol=1e-9, atol=1e-12)
    # (Minus a subnormal: a load of 5e-324 split over 2 replicas rounds to 0 per replica.)
    assert (stats.max_rank_load >= stats.lower_bound * (1 - 1e-9) - 1e-300).all()
    gap = np.maximum(np.where(bound > 0, max_load / np.where(bound > 0, bound, 1) - 1, 0.0), 0)
    np.testing.assert_allclose(stats.gap, gap, rtol=1e-9, atol=1e-9)
    assert stats.mean_gap == pytest.approx(gap.mean(), rel=1e-9, abs=1e-9)
    assert stats.max_gap == pytest.approx(gap.max(), rel=1e-9, abs=1e-9)
    assert stats.wall_time_seconds >= 0
    assert stats.layer_moved_experts.sum() == stats.moved_experts


STEP_FIELDS = ("step_max_rank_load", "step_balancedness")


def stats_equal(a: moelb.PlanStats, b: moelb.PlanStats, ignore: tuple[str, ...] = ()) -> bool:
    """Equal except the wall time (and the fields in ``ignore``)."""
    return all(
        np.array_equal(getattr(a, f), getattr(b, f))
        for f in a.__dataclass_fields__
        if f != "wall_time_seconds" and f not in ignore
    )


def effective_locality(plan: moelb.Plan) -> str:
    algorithm = plan.stats.algorithm
    assert algorithm in ("moelb(locality=node)", "moelb(locality=none)"), algorithm
    return "node" if algorithm.endswith("node)") else "none"


def assert_groups_within_nodes(
    phy2log: np.ndarray, num_experts: int, num_groups: int, ep_size: int, num_nodes: int
) -> None:
    """Every group's experts and all their replicas sit on one node."""
    group_size = num_experts // num_groups
    slots = phy2log.shape[1]
    node_of_slot = np.arange(slots) // (slots // ep_size) // (ep_size // num_nodes)
    for layer, row in enumerate(phy2log):
        for g in range(num_groups):
            nodes = np.unique(node_of_slot[(row // group_size) == g])
            assert len(nodes) == 1, f"layer {layer}: group {g} spans nodes {nodes.tolist()}"


def duplicates_on_a_gpu(phy2log: np.ndarray, ep_size: int, counts: np.ndarray, cap: int) -> int:
    """How many (layer, GPU, expert) hold two or more replicas of an expert with <= cap
    replicas."""
    found = 0
    for layer, row in enumerate(phy2log):
        for block in row.reshape(ep_size, -1):
            experts, times = np.unique(block, return_counts=True)
            found += int(((times > 1) & (counts[layer, experts] <= cap)).sum())
    return found


def node_locality_fits(num_experts: int, slots: int, groups: int | None, nodes: int) -> bool:
    """False where an explicit locality='node' would have to put more groups on a node than fit
    (the crash of test_node_locality_with_groups_that_do_not_fit_falls_back); True otherwise."""
    if groups is None or groups < nodes or num_experts % groups:
        return True  # moelb falls back before assigning groups
    group_size = num_experts // groups
    if group_size > slots // nodes:
        return True
    return nodes * ((slots // nodes) // group_size) >= groups


# ---------------------------------------------------------------------------------------------
# DeepSeek: golden cases (reference 1.8) and hand-checked small cases
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["deepseek", "deepseek_hierarchical"])
def test_readme_example_exactly(algorithm: str) -> None:
    plan = rebalance(README_WEIGHT, 16, 4, 2, 8, algorithm=algorithm)
    check_plan(plan, README_WEIGHT, 16, 8)
    loc = plan.location
    np.testing.assert_array_equal(loc.physical_to_logical, README_PHY2LOG)
    np.testing.assert_array_equal(loc.logical_count, README_LOGCNT)
    assert loc.num_nodes == 2
    for layer in range(2):
        for expert, slots in enumerate(README_LOG2PHY[layer]):
            row = loc.logical_to_physical[layer, expert]
            np.testing.assert_array_equal(row[: len(slots)], sorted(slots))
            assert (row[len(slots) :] == -1).all()
    np.testing.assert_allclose(rank_loads(README_WEIGHT, loc), README_GPU_LOADS)
    np.testing.assert_allclose(plan.stats.max_rank_load, [156, 179.5])
    assert np.round(plan.stats.layer_balancedness, 4).tolist() == [0.8277, 0.8050]
    assert plan.stats.algorithm == "deepseek_hierarchical"
    assert_groups_within_nodes(loc.physical_to_logical, 12, 4, 8, 2)


@pytest.mark.parametrize(
    ("algorithm", "num_groups", "num_nodes"),
    [
        ("deepseek", 1, 1),
        ("deepseek", 3, 2),  # 3 % 2 != 0: DeepSeek falls back to the global policy
        ("deepseek", None, 2),  # no groups: global (SGLang's "auto" for group-less models)
        ("deepseek_global", 4, 2),
        ("deepseek_global", 1, 1),
    ],
)
def test_readme_weight_global_golden(
    algorithm: str, num_groups: int | None, num_nodes: int
) -> None:
    plan = rebalance(README_WEIGHT, 16, num_groups, num_nodes, 8, algorithm=algorithm)
    check_plan(plan, README_WEIGHT, 16, 8)
    np.testing.assert_array_equal(plan.location.physical_to_logical, GLOBAL_PHY2LOG)
    np.testing.assert_array_equal(plan.location.logical_count, GLOBAL_LOGCNT)
    assert np.round(plan.stats.layer_balancedness, 4).tolist() == [0.9323, 0.8401]
    # One group on one node is the hierarchical routine with K = N = 1, i.e. the global policy.
    hierarchical = algorithm == "deepseek" and num_groups == 1 and num_nodes == 1
    assert plan.stats.algorithm == ("deepseek_hierarchical" if hierarchical else "deepseek_global")


def test_trivial_layout_balancedness_of_the_readme_weight() -> None:
    trivial = ExpertLocation.trivial(2, 12, 16, 8, num_nodes=2)
    stats = evaluate_placement(README_WEIGHT, trivial)
    assert np.round(stats.layer_balancedness, 3).tolist() == [0.480, 0.420]
    np.testing.assert_allclose(
        rank_loads(README_WEIGHT, trivial),
        numpy_rank_loads(README_WEIGHT, trivial.physical_to_logical, 8),
    )


@pytest.mark.parametrize("ep_size", [1, 2, 4, 8, 16])
def test_zero_loads_pile_extra_replicas_on_expert_0(ep_size: int) -> None:
    plan = rebalance(np.zeros((1, 12)), 16, None, 1, ep_size, algorithm="deepseek_global")
    check_plan(plan, np.zeros((1, 12)), 16, ep_size)
    np.testing.assert_array_equal(plan.location.physical_to_logical, [[*range(12), 0, 0, 0, 0]])
    assert plan.location.logical_count[0, 0] == 5
    assert plan.stats.balancedness == 1.0 and plan.stats.max_gap == 0.0


def test_equal_loads_golden_has_a_same_gpu_duplicate() -> None:
    load = np.full((1, 8), 5)
    plan = rebalance(load, 12, 2, 2, 4, algorithm="deepseek")
    check_plan(plan, load, 12, 4)
    np.testing.assert_array_equal(
        plan.location.physical_to_logical, [[2, 0, 0, 3, 1, 1, 6, 4, 4, 7, 5, 5]]
    )
    np.testing.assert_array_equal(plan.location.logical_count, [[2, 2, 1, 1, 2, 2, 1, 1]])
    # moelb on the same input: no GPU holds two replicas of one expert, and no worse.
    ours = rebalance(load, 12, 2, 2, 4)
    check_plan(ours, load, 12, 4)
    assert (
        duplicates_on_a_gpu(ours.location.physical_to_logical, 4, ours.location.logical_count, 2)
        == 0
    )
    assert ours.stats.max_rank_load[0] <= plan.stats.max_rank_load[0] * (1 + 1e-9)


def test_balanced_packing_9_1_1_1_into_two_packs() -> None:
    # SGLang's test_balanced_packing case: [9, 1, 1, 1] into 2 packs -> max 10.
    plan = rebalance([[9, 1, 1, 1]], 4, None, 1, 2, algorithm="deepseek_global")
    np.testing.assert_array_equal(plan.location.physical_to_logical, [[0, 3, 1, 2]])
    np.testing.assert_allclose(rank_loads([[9, 1, 1, 1]], plan.location), [[10, 2]])


def test_hand_checked_replication_and_packing() -> None:
    # Replication: w / count = [6,3,2,1] -> e0 (6) -> [3,3,2,1]: tie e0/e1 to e0 -> counts
    # [3,1,1,1]. Replica loads by slot [2,3,2,1,2,2]; stable descending order: 1, 0, 2, 4, 5, 3;
    # LPT: 1->GPU0 (3), 0->GPU1 (2), 2->GPU2 (2), 4->GPU1 (4), 5->GPU2 (4), 3->GPU0 (4).
    plan = rebalance([[6, 3, 2, 1]], 6, None, 1, 3, algorithm="deepseek_global")
    np.testing.assert_array_equal(plan.location.physical_to_logical, [[1, 3, 0, 0, 2, 0]])
    np.testing.assert_array_equal(plan.location.logical_count, [[3, 1, 1, 1]])
    np.testing.assert_allclose(rank_loads([[6, 3, 2, 1]], plan.location), [[4, 4, 4]])


def test_hand_checked_one_item_per_pack_and_hierarchy() -> None:
    # One slot per GPU: no sorting, replica i on GPU i.
    plan = rebalance([[1, 5, 3, 2]], 4, None, 1, 4, algorithm="deepseek_global")
    np.testing.assert_array_equal(plan.location.physical_to_logical, [[0, 1, 2, 3]])
    # Two groups {0,1}, {2,3} onto two nodes (one group each, no sort), then each node's two
    # replicas onto its GPU, heavier first.
    plan = rebalance([[1, 2, 30, 40]], 4, 2, 2, 2, algorithm="deepseek_hierarchical")
    np.testing.assert_array_equal(plan.location.physical_to_logical, [[1, 0, 3, 2]])
    # Divisor tie: w / count equal for both experts -> the extra replica goes to expert 0.
    plan = rebalance([[4, 4]], 3, None, 1, 3, algorithm="deepseek_global")
    np.testing.assert_array_equal(plan.location.physical_to_logical, [[0, 1, 0]])


def test_hierarchical_single_node_sorts_groups_by_load() -> None:
    # Reference 1.5 remark: with N = 1 the groups are relabelled by load (heaviest first), so the
    # node-local order, and with it the packing order of the one-slot GPUs, follows group load.
    load = [[1, 2, 30, 40]]
    hier = rebalance(load, 4, 2, 1, 4, algorithm="deepseek_hierarchical")
    glob = rebalance(load, 4, 2, 1, 4, algorithm="deepseek_global")
    np.testing.assert_array_equal(hier.location.physical_to_logical, [[2, 3, 0, 1]])
    np.testing.assert_array_equal(glob.location.physical_to_logical, [[0, 1, 2, 3]])


def test_deepseek_auto_picks_the_policy_by_divisibility() -> None:
    rng = np.random.default_rng(7)
    load = rng.uniform(1, 100, (3, 24))
    for groups, nodes in [(4, 2), (8, 4), (8, 8), (4, 1)]:
        auto = rebalance(load, 32, groups, nodes, 8, algorithm="deepseek")
        hier = rebalance(load, 32, groups, nodes, 8, algorithm="deepseek_hierarchical")
        np.testing.assert_array_equal(
            auto.location.physical_to_logical, hier.location.physical_to_logical
        )
        assert auto.stats.algorithm == "deepseek_hierarchical"
    for groups, nodes in [(3, 2), (6, 4), (1, 2)]:
        auto = rebalance(load, 32, groups, nodes, 8, algorithm="deepseek")
        glob = rebalance(load, 32, groups, nodes, 8, algorithm="deepseek_global")
        np.testing.assert_array_equal(
            auto.location.physical_to_logical, glob.location.physical_to_logical
        )
        assert auto.stats.algorithm == "deepseek_global"


# ---------------------------------------------------------------------------------------------
# DeepSeek: parity with the Python port of eplb.py on tie-free inputs
# ---------------------------------------------------------------------------------------------

# (E, P, num_groups, num_nodes, ep_size): hierarchical and global shapes, one slot per GPU,
# no redundancy, a single node with groups, groups not divisible by nodes (DeepSeek's fallback).
PARITY_SHAPES = [
    (12, 16, 4, 2, 8),
    (16, 24, 4, 2, 8),
    (32, 40, 8, 4, 8),
    (64, 80, 8, 2, 16),
    (8, 12, 2, 2, 4),
    (20, 30, 5, 1, 5),
    (24, 36, 6, 3, 6),
    (10, 20, 5, 5, 5),
    (64, 96, 8, 4, 32),
    (16, 16, 4, 2, 4),
    (60, 72, 6, 4, 12),
    (16, 32, 4, 4, 32),
    (9, 12, 3, 1, 3),
    (12, 18, 3, 2, 6),  # 3 % 2 != 0: global fallback on both sides
    (7, 7, 1, 1, 7),
]


def parity_mismatches(
    load: np.ndarray, shape: tuple[int, int, int, int, int], algorithm: str, reference: Any
) -> tuple[int, int]:
    """Compares moelb's DeepSeek mode with the port on every layer of `load`; returns (layers,
    layers whose per-GPU expert sets differ through a float32 tie). Asserts identical replica
    counts on every layer and identical per-GPU load vectors and expert sets on every other
    layer; a float32 tie shows as per-GPU loads that agree as multisets within float32 rounding
    (the greedy sent an item to the other of two packs whose running sums tie in float32)."""
    _, slots, groups, nodes, gpus = shape
    if algorithm == "deepseek_global":
        phy, log2phy, logcnt = reference(load, slots, 1, 1, gpus)
    else:
        phy, log2phy, logcnt = reference(load, slots, groups, nodes, gpus)
    phy, log2phy, logcnt = (np.asarray(x) for x in (phy, log2phy, logcnt))
    plan = rebalance(load, slots, groups, nodes, gpus, algorithm=algorithm)
    ours = plan.location.physical_to_logical
    np.testing.assert_array_equal(plan.location.logical_count, logcnt)
    ours_loads = rank_loads(load, plan.location)
    theirs_loads = numpy_rank_loads(load, phy, gpus)
    ties = 0
    for layer in range(load.shape[0]):
        same_sets = gpu_blocks(ours[layer], gpus) == gpu_blocks(phy[layer], gpus)
        same_loads = np.allclose(ours_loads[layer], theirs_loads[layer], rtol=1e-12, atol=0)
        if same_sets and same_loads:
            continue
        scale = theirs_loads[layer].max()
        np.testing.assert_allclose(
            np.sort(ours_loads[layer]),
            np.sort(theirs_loads[layer]),
            rtol=0,
            atol=4 * np.finfo(np.float32).eps * scale,
            err_msg=f"{algorithm} {shape} layer {layer}: per-GPU loads differ beyond float32 ties",
        )
        ties += 1
    return load.shape[0], ties


@needs_reference
@pytest.mark.parametrize("shape", PARITY_SHAPES, ids=lambda s: "E{}-P{}-K{}-N{}-G{}".format(*s))
def test_parity_with_deepseek_port_on_tie_free_loads(shape: tuple[int, int, int, int, int]) -> None:
    experts = shape[0]
    rng = np.random.default_rng(sum(shape))
    layers = ties = 0
    for load in (
        rng.uniform(1.0, 1000.0, (6, experts)),  # distinct floats
        rng.lognormal(4.0, 1.5, (6, experts)),  # heavy-tailed
        np.stack([rng.permutation(100_000)[:experts] + 1 for _ in range(4)]),  # distinct ints
    ):
        for algorithm in ("deepseek", "deepseek_global"):
            n, t = parity_mismatches(load, shape, algorithm, ds_ref.rebalance_experts)
            layers += n
            ties += t
    # Float32 ties are rare on random loads (none observed when this was written).
    assert ties <= max(1, layers // 50), f"{ties} of {layers} layers differ by float32 ties"


@needs_reference
def test_parity_with_deepseek_port_on_integer_loads_with_ties() -> None:
    """Small integer loads tie everywhere, and their float32 sums are exact, so every tie is a
    true tie that both sides break by the same documented rule (stable sorts, lower index/pack):
    phy2log must be identical. Covers the packing paths (at most 8 packs, more), the node replica
    order with and without tied experts, and one replica per GPU."""
    rng = np.random.default_rng(7)
    compared = 0
    for _ in range(150):
        experts = int(rng.choice([8, 16, 32, 64, 96, 128]))
        groups = int(rng.choice([1, 2, 4, 8]))
        nodes = int(rng.choice([1, 2, 4]))
        if experts % groups or groups % nodes:
            continue
        gpus = nodes * int(rng.choice([1, 2, 4, 8, 16]))
        per_gpu = -(-experts // gpus)
        slots = gpus * int(rng.integers(per_gpu, per_gpu + 4))
        load = rng.integers(0, int(rng.choice([3, 10, 100])), (4, experts)).astype(np.float64)
        for algorithm, (k, n) in (
            ("deepseek_hierarchical", (groups, nodes)),
            ("deepseek_global", (1, 1)),
        ):
            phy, _, _ = ds_ref.rebalance_experts(load, slots, k, n, gpus)
            plan = rebalance(load, slots, groups, nodes, gpus, algorithm=algorithm)
            np.testing.assert_array_equal(
                plan.location.physical_to_logical,
                np.asarray(phy),
                err_msg=f"{algorithm} E={experts} P={slots} K={groups} N={nodes} G={gpus}",
            )
            compared += 1
    assert compared > 100


@needs_reference
def test_parity_with_deepseek_port_at_deepseek_v3_scale() -> None:
    rng = np.random.default_rng(58)
    load = rng.lognormal(6.0, 1.0, (58, 256))
    for shape in [(256, 288, 8, 4, 32), (256, 320, 8, 8, 64)]:
        for algorithm in ("deepseek", "deepseek_global"):
            layers, ties = parity_mismatches(load, shape, algorithm, ds_ref.rebalance_experts)
            assert ties <= 2, f"{ties} of {layers} layers differ by float32 ties"


@needs_reference
def test_parity_with_deepseek_torch_port() -> None:
    if not getattr(ds_ref, "HAS_TORCH", False):
        pytest.skip("PyTorch is not installed")
    rng = np.random.default_rng(11)
    for shape in [(12, 16, 4, 2, 8), (32, 40, 8, 4, 8), (24, 36, 6, 3, 6)]:
        load = rng.uniform(1.0, 1000.0, (4, shape[0]))
        for algorithm in ("deepseek", "deepseek_global"):
            _, ties = parity_mismatches(load, shape, algorithm, ds_ref.rebalance_experts_torch)
            assert ties <= 1


@needs_reference
def test_port_agrees_on_the_readme_golden() -> None:
    """The port itself reproduces the README, so parity with it means parity with DeepSeek."""
    phy, _, logcnt = ds_ref.rebalance_experts(README_WEIGHT, 16, 4, 2, 8)
    np.testing.assert_array_equal(phy, README_PHY2LOG)
    np.testing.assert_array_equal(logcnt, README_LOGCNT)


# ---------------------------------------------------------------------------------------------
# Invariants on random inputs (Hypothesis)
# ---------------------------------------------------------------------------------------------

LOAD_VALUES = st.one_of(
    st.floats(0.0, 1e4, allow_nan=False, allow_infinity=False),
    st.integers(0, 20).map(float),  # ties and zeros
)


@st.composite
def load_arrays(draw: st.DrawFn, layers: int, experts: int) -> np.ndarray:
    flat = draw(st.lists(LOAD_VALUES, min_size=layers * experts, max_size=layers * experts))
    return np.array(flat, dtype=np.float64).reshape(layers, experts)


@st.composite
def moelb_problems(draw: st.DrawFn) -> dict[str, Any]:
    gpus = draw(st.integers(1, 8))
    slots = gpus * draw(st.integers(1, 4))
    experts = draw(st.integers(1, slots))
    nodes = draw(st.integers(1, 4))
    groups = draw(st.none() | st.integers(1, experts))
    locality = draw(st.sampled_from(["auto", "none", "node"]))
    if locality == "node" and not node_locality_fits(experts, slots, groups, nodes):
        locality = "auto"  # that crash has its own test
    load = draw(load_arrays(draw(st.integers(1, 3)), experts))
    return {
        "load": load,
        "num_physical_experts": slots,
        "num_groups": groups,
        "num_nodes": nodes,
        "ep_size": gpus,
        "locality": locality,
    }


@settings(max_examples=150)
@given(problem=moelb_problems())
def test_moelb_invariants_and_never_worse_than_deepseek(problem: dict[str, Any]) -> None:
    load = problem["load"]
    experts = load.shape[1]
    slots, groups = problem["num_physical_experts"], problem["num_groups"]
    nodes, gpus = problem["num_nodes"], problem["ep_size"]
    plan = rebalance(**problem)
    check_plan(plan, load, slots, gpus)
    locality = effective_locality(plan)
    if gpus % nodes:
        assert plan.location.num_nodes == 1 and "num_nodes" in plan.stats.notes
    else:
        assert plan.location.num_nodes == nodes
    if locality == "node":
        assert groups is not None and experts % groups == 0
        assert_groups_within_nodes(plan.location.physical_to_logical, experts, groups, gpus, nodes)
        if groups % nodes == 0 and gpus % nodes == 0:
            ds = rebalance(load, slots, groups, nodes, gpus, algorithm="deepseek_hierarchical")
            assert (plan.stats.max_rank_load <= ds.stats.max_rank_load * (1 + 1e-9) + 1e-12).all()
    else:
        ds = rebalance(load, slots, groups, 1, gpus, algorithm="deepseek_global")
        assert (plan.stats.max_rank_load <= ds.stats.max_rank_load * (1 + 1e-9) + 1e-12).all()


@st.composite
def deepseek_problems(draw: st.DrawFn) -> dict[str, Any]:
    nodes = draw(st.integers(1, 3))
    gpus = nodes * draw(st.integers(1, 3))
    slots = gpus * draw(st.integers(1, 3))
    algorithm = draw(st.sampled_from(["deepseek_hierarchical", "deepseek_global", "deepseek"]))
    if algorithm == "deepseek_global":
        experts = draw(st.integers(1, slots))
        groups = draw(st.none() | st.integers(1, experts))
    else:
        groups = nodes * draw(st.integers(1, 3))
        experts = groups * draw(st.integers(1, 3))
        assume(experts <= slots)
    load = draw(load_arrays(draw(st.integers(1, 3)), experts))
    return {
        "load": load,
        "num_physical_experts": slots,
        "num_groups": groups,
        "num_nodes": nodes,
        "ep_size": gpus,
        "algorithm": algorithm,
    }


@settings(max_examples=150)
@given(problem=deepseek_problems())
def test_deepseek_invariants(problem: dict[str, Any]) -> None:
    load = problem["load"]
    experts = load.shape[1]
    slots, groups = problem["num_physical_experts"], problem["num_groups"]
    nodes, gpus = problem["num_nodes"], problem["ep_size"]
    plan = rebalance(**problem)
    check_plan(plan, load, slots, gpus)
    if plan.stats.algorithm == "deepseek_hierarchical":
        assert problem["algorithm"] != "deepseek_global"
        phy2log = plan.location.physical_to_logical
        assert_groups_within_nodes(phy2log, experts, groups, gpus, nodes)
        # Every node gets exactly P / N slots for its E / N experts.
        per_node = phy2log.reshape(phy2log.shape[0], nodes, -1)
        for layer in range(phy2log.shape[0]):
            for node in range(nodes):
                assert len(np.unique(per_node[layer, node])) == experts // nodes
    else:
        assert problem["algorithm"] != "deepseek_hierarchical"
    if plan.stats.algorithm == "deepseek_global" and load.max() > 0:
        # Replica counts follow the divisor method: the max per-replica load is optimal.
        counts = plan.location.logical_count
        w32 = load.astype(np.float32).astype(np.float64)
        for layer in range(load.shape[0]):
            best = divisor_optimum(w32[layer], slots)
            assert (w32[layer] / counts[layer]).max() == pytest.approx(best, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# moelb: never worse than DeepSeek, brute force on tiny instances
# ---------------------------------------------------------------------------------------------


def named_inputs() -> list[tuple[str, np.ndarray, tuple[int, int, int | None, int, int]]]:
    """(name, load [L, E], (E, P, groups, nodes, GPUs)): the golden cases and random loads of
    several distributions over shapes."""
    rng = np.random.default_rng(2024)
    cases: list[tuple[str, np.ndarray, tuple[int, int, int | None, int, int]]] = [
        ("readme", README_WEIGHT.astype(float), (12, 16, 4, 2, 8)),
        ("equal", np.full((1, 8), 5.0), (8, 12, 2, 2, 4)),
        ("zeros", np.zeros((2, 12)), (12, 16, 4, 2, 8)),
        ("hand", np.array([[6.0, 3, 2, 1]]), (4, 6, None, 1, 3)),
    ]
    shapes = [
        (16, 24, 4, 2, 8),
        (32, 40, 8, 4, 8),
        (64, 80, 8, 2, 16),
        (20, 30, 5, 1, 5),
        (24, 36, 6, 3, 6),
        (10, 20, 5, 5, 5),
        (256, 288, 8, 4, 32),
        (48, 64, 8, 8, 16),
        (12, 16, None, 1, 4),
    ]
    for shape in shapes:
        experts = shape[0]
        cases.append((f"uniform{shape}", rng.uniform(0, 100, (4, experts)), shape))
        cases.append((f"lognormal{shape}", rng.lognormal(3, 1.5, (4, experts)), shape))
        skewed = rng.zipf(1.5, (4, experts)).clip(max=10_000).astype(float)
        cases.append((f"zipf{shape}", skewed, shape))
        sparse = rng.integers(0, 4, (4, experts)) * (rng.random((4, experts)) < 0.3)
        cases.append((f"sparse{shape}", sparse.astype(float), shape))
    return cases


NAMED_INPUTS = named_inputs()


@pytest.mark.parametrize(
    ("name", "load", "shape"),
    [
        pytest.param(
            *case,
            id=case[0],
        )
        for case in NAMED_INPUTS
    ],
)
def test_moelb_never_worse_than_deepseek_on_every_layer(
    name: str, load: np.ndarray, shape: tuple[int, int, int | None, int, int]
) -> None:
    experts, slots, groups, nodes, gpus = shape
    hierarchical_ok = groups is not None and experts % groups == 0 and groups % nodes == 0
    if hierarchical_ok:
        ours = rebalance(load, slots, groups, nodes, gpus, locality="node")
        assert effective_locality(ours) == "node"
        check_plan(ours, load, slots, gpus)
        ds = rebalance(load, slots, groups, nodes, gpus, algorithm="deepseek_hierarchical")
        assert (ours.stats.max_rank_load <= ds.stats.max_rank_load * (1 + 1e-9)).all(), name
    ours = rebalance(load, slots, groups, nodes, gpus, locality="none")
    assert effective_locality(ours) == "none"
    check_plan(ours, load, slots, gpus)
    ds = rebalance(load, slots, groups, nodes, gpus, algorithm="deepseek_global")
    assert (ours.stats.max_rank_load <= ds.stats.max_rank_load * (1 + 1e-9)).all(), name


def test_single_node_node_locality_never_worse_than_deepseek_hierarchical() -> None:
    load = np.zeros((1, 20))
    load[0, [0, 8, 12, 19]] = [1, 1, 2, 2]
    ds = rebalance(load, 30, 5, 1, 5, algorithm="deepseek_hierarchical")
    assert ds.stats.max_rank_load[0] == pytest.approx(1.3)
    ours = rebalance(load, 30, 5, 1, 5)
    assert effective_locality(ours) == "node"
    assert ours.stats.max_rank_load[0] <= ds.stats.max_rank_load[0] * (1 + 1e-9)


def test_moelb_beats_deepseek_somewhere() -> None:
    """The comparison above could pass with moelb == DeepSeek everywhere; it does better on
    most random shapes (by at least 1 % on some layer)."""
    better = 0
    for _, load, (_, slots, groups, nodes, gpus) in NAMED_INPUTS[4:]:
        ours = rebalance(load, slots, groups, nodes, gpus, locality="none")
        ds = rebalance(load, slots, groups, nodes, gpus, algorithm="deepseek_global")
        better += bool((ours.stats.max_rank_load < ds.stats.max_rank_load * 0.99).any())
    assert better >= len(NAMED_INPUTS[4:]) // 2


_PLACEMENTS: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}


def all_placements(experts: int, slots: int) -> tuple[np.ndarray, np.ndarray]:
    """Every phy2log row with each expert at least once, and its replica counts."""
    if (experts, slots) not in _PLACEMENTS:
        rows = np.array(list(itertools.product(range(experts), repeat=slots)), dtype=np.int64)
        counts = np.stack([(rows == e).sum(axis=1) for e in range(experts)], axis=1)
        keep = (counts >= 1).all(axis=1)
        _PLACEMENTS[experts, slots] = rows[keep], counts[keep]
    return _PLACEMENTS[experts, slots]


def brute_force(
    w: np.ndarray, slots: int, gpus: int, group_nodes: tuple[int, int] | None = None
) -> tuple[float, float]:
    """(optimal max GPU load, optimal max GPU load without a duplicate on a GPU) over all
    placements; with group_nodes = (groups, nodes) only placements keeping every group on one
    node count."""
    rows, counts = all_placements(len(w), slots)
    per_slot = w[rows] / np.take_along_axis(counts, rows, axis=1)
    worst = per_slot.reshape(len(rows), gpus, -1).sum(axis=2).max(axis=1)
    allowed = np.ones(len(rows), dtype=bool)
    if group_nodes is not None:
        groups, nodes = group_nodes
        node_of_slot = np.arange(slots) // (slots // nodes)
        group_of = rows // (len(w) // groups)
        for g in range(groups):
            nodes_used = np.where(group_of == g, node_of_slot, -1)
            lo = np.where(nodes_used >= 0, nodes_used, nodes).min(axis=1)
            allowed &= nodes_used.max(axis=1) == lo
    blocks = rows.reshape(len(rows), gpus, -1)
    no_dup = np.ones(len(rows), dtype=bool)
    for i, j in itertools.combinations(range(blocks.shape[2]), 2):
        no_dup &= (blocks[:, :, i] != blocks[:, :, j]).all(axis=1)
    best = worst[allowed].min()
    best_no_dup = worst[allowed & no_dup].min() if (allowed & no_dup).any() else np.inf
    return float(best), float(best_no_dup)


def tiny_instances(count: int, seed: int) -> list[tuple[np.ndarray, int, int]]:
    """(w [E], P, G) with E <= 4, P <= 6, G <= 3, G | P, P >= E."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < count:
        experts, gpus = int(rng.integers(1, 5)), int(rng.integers(1, 4))
        options = [p for p in range(experts, 7) if p % gpus == 0]
        if not options:
            continue
        slots = int(rng.choice(options))
        if rng.random() < 0.3:
            w = rng.integers(0, 6, experts).astype(float)  # ties and zeros
        else:
            w = rng.uniform(0, 100, experts)
        out.append((w, slots, gpus))
    return out


TINY = tiny_instances(300, seed=1)


def test_moelb_against_brute_force_on_tiny_instances(record_property: Any) -> None:
    optimal = 0
    worst_ratio = 1.0
    for w, slots, gpus in TINY:
        best, _ = brute_force(w, slots, gpus)
        plan = rebalance(w[None], slots, None, 1, gpus, locality="none")
        ours = plan.stats.max_rank_load[0]
        ds = rebalance(w[None], slots, None, 1, gpus, algorithm="deepseek_global")
        assert ours >= best * (1 - 1e-9), (w, slots, gpus)  # nothing beats the optimum
        assert plan.stats.lower_bound[0] <= best * (1 + 1e-9)  # the lower bound is one
        assert ours <= ds.stats.max_rank_load[0] * (1 + 1e-9), (w, slots, gpus)
        assert ours <= 1.5 * best + 1e-12, (w, slots, gpus)
        optimal += bool(ours <= best * (1 + 1e-9))
        worst_ratio = max(worst_ratio, ours / best if best > 0 else 1.0)
    # Plain floats: pytest-xdist sends the properties between processes and cannot send NumPy's.
    record_property("optimal_fraction", optimal / len(TINY))
    record_property("worst_ratio_to_optimum", float(worst_ratio))
    # When written: 267 of 300 optimal, worst 4/3 of the optimum (where DeepSeek is as far off).
    assert optimal >= 0.8 * len(TINY), f"optimal on only {optimal} of {len(TINY)}"


def test_moelb_node_locality_against_brute_force() -> None:
    rng = np.random.default_rng(3)
    for _ in range(60):
        # 4 experts in 2 groups of 2, 2 nodes of one or more GPUs.
        gpus, slots = [(2, 4), (2, 6), (4, 4)][int(rng.integers(3))]
        w = rng.uniform(0, 100, 4) if rng.random() < 0.7 else rng.integers(0, 5, 4).astype(float)
        best, _ = brute_force(w, slots, gpus, group_nodes=(2, 2))
        plan = rebalance(w[None], slots, 2, 2, gpus, locality="node")
        assert effective_locality(plan) == "node"
        assert_groups_within_nodes(plan.location.physical_to_logical, 4, 2, gpus, 2)
        ds = rebalance(w[None], slots, 2, 2, gpus, algorithm="deepseek_hierarchical")
        ours = plan.stats.max_rank_load[0]
        assert best * (1 - 1e-9) <= ours <= ds.stats.max_rank_load[0] * (1 + 1e-9)


# ---------------------------------------------------------------------------------------------
# moelb: no two replicas of an expert on one GPU when avoidable
# ---------------------------------------------------------------------------------------------


def test_no_duplicate_when_a_duplicate_free_placement_is_as_good() -> None:
    w = np.array([[6.0, 3, 2, 1]])
    plan = rebalance(w, 6, None, 1, 3, locality="none")
    better = ExpertLocation([[0, 2, 0, 2, 1, 3]], 4, 3)
    assert rank_loads(w, better).max() == 4.0
    assert plan.stats.max_rank_load[0] <= 4.0
    assert (
        duplicates_on_a_gpu(plan.location.physical_to_logical, 3, plan.location.logical_count, 3)
        == 0
    )


def test_no_duplicate_on_a_gpu_on_moelbs_own_packings() -> None:
    """Where moelb's own packing wins (DeepSeek's is not taken, so notes do not say so), an
    expert with at most G replicas (G per node under node locality) never has two on a GPU."""
    checked = 0
    for _, load, (_, slots, groups, nodes, gpus) in NAMED_INPUTS:
        for locality in ("none", "node"):
            for layer in range(load.shape[0]):
                plan = rebalance(
                    load[layer : layer + 1], slots, groups, nodes, gpus, locality=locality
                )
                if "DeepSeek" in plan.stats.notes:
                    continue
                cap = gpus // nodes if effective_locality(plan) == "node" else gpus
                loc = plan.location
                found = duplicates_on_a_gpu(loc.physical_to_logical, gpus, loc.logical_count, cap)
                assert found == 0, (load[layer], shape_of(slots, groups, nodes, gpus), locality)
                checked += 1
    assert checked > 100


def shape_of(slots: int, groups: int | None, nodes: int, gpus: int) -> str:
    return f"P={slots} groups={groups} nodes={nodes} gpus={gpus}"


def test_no_avoidable_duplicate_on_tiny_instances() -> None:
    avoidable = 0
    for w, slots, gpus in TINY:
        plan = rebalance(w[None], slots, None, 1, gpus, locality="none")
        loc = plan.location
        if duplicates_on_a_gpu(loc.physical_to_logical, gpus, loc.logical_count, gpus) == 0:
            continue
        _, best_no_dup = brute_force(w, slots, gpus)
        avoidable += bool(best_no_dup <= plan.stats.max_rank_load[0] * (1 + 1e-9))
    assert avoidable == 0, f"{avoidable} of {len(TINY)} plans have an avoidable duplicate"


def removable_duplicates(
    w: np.ndarray, p2l: np.ndarray, gpus: int, cap: int, domain_gpus: int
) -> list[tuple[int, int]]:
    """The (GPU, expert) same-GPU duplicates of experts with <= cap replicas that a single move
    removes without raising the layer's max GPU load: a swap of the duplicate with a replica of
    another GPU of its domain (neither GPU then holds an expert twice more than before), or
    rewriting the duplicate slot as another expert of the domain."""
    slots_per_gpu = len(p2l) // gpus

    def max_load(row: np.ndarray) -> float:
        counts = np.bincount(row, minlength=len(w))
        return float((w[row] / counts[row]).reshape(gpus, slots_per_gpu).sum(axis=1).max())

    limit = max_load(p2l) * (1 + 1e-12)
    counts = np.bincount(p2l, minlength=len(w))
    blocks = p2l.reshape(gpus, slots_per_gpu)
    found = []
    for g in range(gpus):
        experts, times = np.unique(blocks[g], return_counts=True)
        for e in experts[(times > 1) & (counts[experts] <= cap)]:
            slot = g * slots_per_gpu + int(np.flatnonzero(blocks[g] == e)[1])
            first = g // domain_gpus * domain_gpus
            domain = range(first, first + domain_gpus)
            moves = []
            for h in domain:
                if h == g or e in blocks[h]:
                    continue
                for k, y in enumerate(blocks[h]):
                    if y not in blocks[g]:
                        row = p2l.copy()
                        row[slot], row[h * slots_per_gpu + k] = y, e
                        moves.append(row)
            in_domain = set(p2l[first * slots_per_gpu : (first + domain_gpus) * slots_per_gpu])
            for f in sorted(in_domain - set(blocks[g].tolist())):
                row = p2l.copy()
                row[slot] = f
                moves.append(row)
            if any(max_load(row) <= limit for row in moves):
                found.append((g, int(e)))
    return found


def test_duplicates_kept_only_where_no_move_removes_them_at_no_cost() -> None:
    """Two replicas of an expert on one GPU can be what balances a layer best (a GPU takes 2/c of
    the expert's tokens), e.g. DeepSeek's packing that moelb keeps. What moelb must not leave is
    a duplicate that one swap or one slot rewrite removes without raising the max GPU load --
    checked here independently of the planner on every layer of the random inputs."""
    checked = 0
    for _, load, (_, slots, groups, nodes, gpus) in NAMED_INPUTS:
        for locality in ("none", "node"):
            plan = rebalance(load, slots, groups, nodes, gpus, locality=locality)
            node = effective_locality(plan) == "node"
            domain_gpus = gpus // nodes if node else gpus
            for layer in range(load.shape[0]):
                row = plan.location.physical_to_logical[layer]
                counts = plan.location.logical_count[layer : layer + 1]
                checked += duplicates_on_a_gpu(row[None], gpus, counts, domain_gpus)
                found = removable_duplicates(load[layer], row, gpus, domain_gpus, domain_gpus)
                assert found == [], (shape_of(slots, groups, nodes, gpus), locality, layer, found)
    assert checked > 0  # the inputs do hold duplicates that balance needs


def test_removable_duplicates_finds_a_free_fix() -> None:
    """The checker above is not vacuous: a duplicate a swap removes at no cost is reported."""
    w = np.array([4.0, 4.0, 1.0, 1.0])
    row = np.array([0, 0, 2, 1, 1, 3])  # expert 0 twice on GPU 0, expert 1 twice on GPU 1
    assert removable_duplicates(w, row, 2, 2, 2) == [(0, 0), (1, 1)]
    assert removable_duplicates(w, np.array([0, 1, 2, 0, 1, 3]), 2, 2, 2) == []


# ---------------------------------------------------------------------------------------------
# moelb: any topology, node locality
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("experts", "slots", "groups", "nodes", "gpus", "locality", "expect_locality", "note"),
    [
        (14, 16, 4, 2, 8, "auto", "none", "not divisible by num_groups"),  # E % K != 0
        (14, 16, 4, 2, 8, "node", "none", "not divisible by num_groups"),
        (12, 16, 3, 2, 8, "auto", "none", None),  # K % N != 0: auto is flat, by definition
        (12, 16, 3, 2, 8, "node", "node", None),  # ... but node locality still works
        (12, 16, 2, 4, 8, "node", "none", "fewer groups than nodes"),
        (12, 16, 2, 4, 8, "auto", "none", None),
        (12, 18, 4, 4, 6, "auto", "none", "ep_size=6 is not divisible by num_nodes=4"),
        (12, 18, 4, 4, 6, "node", "none", "ep_size=6 is not divisible by num_nodes=4"),
        (12, 16, None, 2, 8, "node", "none", "no expert groups"),
        (12, 16, None, 2, 8, "auto", "none", None),
        (16, 16, 2, 4, 8, "node", "none", "fewer groups than nodes"),
        (24, 24, 2, 2, 4, "node", "node", None),  # a group fills a node exactly
        (24, 36, 3, 2, 6, "node", "node", None),  # 2 groups on one node, 1 on the other
        (20, 24, 5, 2, 4, "node", "node", None),
        (7, 9, 7, 1, 3, "node", "node", None),
    ],
)
def test_any_topology_gives_a_valid_plan(
    experts: int,
    slots: int,
    groups: int | None,
    nodes: int,
    gpus: int,
    locality: str,
    expect_locality: str,
    note: str | None,
) -> None:
    load = np.random.default_rng(experts * slots).uniform(1, 100, (3, experts))
    plan = rebalance(load, slots, groups, nodes, gpus, locality=locality)
    check_plan(plan, load, slots, gpus)
    assert effective_locality(plan) == expect_locality
    if note is not None:
        assert note in plan.stats.notes
        assert "locality" in plan.stats.notes
    assert plan.location.num_nodes == (nodes if gpus % nodes == 0 else 1)
    if expect_locality == "node" and nodes > 1:
        assert_groups_within_nodes(plan.location.physical_to_logical, experts, groups, gpus, nodes)


@pytest.mark.parametrize(
    ("experts", "slots", "groups", "nodes", "gpus"), [(12, 12, 3, 2, 4), (24, 24, 3, 2, 4)]
)
def test_node_locality_with_groups_that_do_not_fit_falls_back(
    experts: int, slots: int, groups: int, nodes: int, gpus: int
) -> None:
    script = (
        "import json, numpy as np, moelb\n"
        f"p = moelb.rebalance(np.arange(1.0, {experts + 1})[None], {slots}, {groups}, {nodes}, "
        f"{gpus}, locality='node')\n"
        "print(json.dumps([p.location.physical_to_logical.tolist(), p.stats.notes]))\n"
    )
    package_root = str(Path(moelb.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([package_root, *sys.path])}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr[-500:]
    phy2log, notes = json.loads(done.stdout)
    assert sorted(set(phy2log[0])) == list(range(experts))
    assert "locality" in notes


def test_node_locality_keeps_groups_on_one_node_on_random_loads() -> None:
    rng = np.random.default_rng(5)
    for experts, slots, groups, nodes, gpus in [
        (64, 80, 8, 2, 16),
        (32, 48, 8, 4, 8),
        (256, 288, 8, 4, 32),
        (24, 36, 6, 3, 6),
        (18, 24, 3, 3, 6),
    ]:
        load = rng.lognormal(3, 1.5, (4, experts))
        plan = rebalance(load, slots, groups, nodes, gpus)  # auto: node locality
        assert effective_locality(plan) == "node"
        check_plan(plan, load, slots, gpus)
        assert_groups_within_nodes(plan.location.physical_to_logical, experts, groups, gpus, nodes)


# ---------------------------------------------------------------------------------------------
# moelb: previous, move_cost, max_moves, expert_bytes
# ---------------------------------------------------------------------------------------------

MOVE_SHAPES = [(16, 24, 4, 2, 8), (32, 40, 8, 4, 8), (64, 80, 8, 2, 16), (20, 30, 5, 1, 5)]


def moved(previous: ExpertLocation, location: ExpertLocation) -> int:
    return int((previous.physical_to_logical != location.physical_to_logical).sum())


@pytest.mark.parametrize("shape", MOVE_SHAPES)
def test_replanning_the_same_load_moves_nothing(shape: tuple[int, ...]) -> None:
    experts, slots, groups, nodes, gpus = shape
    load = np.random.default_rng(1).lognormal(3, 1, (6, experts))
    for locality in ("node", "none"):
        first = rebalance(load, slots, groups, nodes, gpus, locality=locality)
        again = rebalance(
            load, slots, groups, nodes, gpus, locality=locality, previous=first.location
        )
        np.testing.assert_array_equal(
            again.location.physical_to_logical, first.location.physical_to_logical
        )
        assert again.stats.moved_experts == 0
        assert (again.stats.layer_moved_experts == 0).all()


@pytest.mark.parametrize("shape", MOVE_SHAPES)
def test_previous_with_relabelled_gpus_and_slots_moves_nothing(shape: tuple[int, ...]) -> None:
    """The same expert sets on permuted GPUs (within nodes) and slots: matched, not moved."""
    experts, slots, groups, nodes, gpus = shape
    rng = np.random.default_rng(2)
    load = rng.lognormal(3, 1, (4, experts))
    plan = rebalance(load, slots, groups, nodes, gpus)
    per_node = gpus // nodes
    shuffled = plan.location.physical_to_logical.reshape(4, nodes, per_node, -1).copy()
    for layer in range(4):
        shuffled[layer] = shuffled[layer][rng.permutation(nodes)]
        for node in range(nodes):
            shuffled[layer, node] = shuffled[layer, node][rng.permutation(per_node)]
            for g in range(per_node):
                shuffled[layer, node, g] = rng.permutation(shuffled[layer, node, g])
    previous = ExpertLocation(shuffled.reshape(4, slots), experts, gpus, nodes)
    again = rebalance(load, slots, groups, nodes, gpus, previous=previous)
    assert again.stats.moved_experts == 0
    np.testing.assert_array_equal(again.location.physical_to_logical, previous.physical_to_logical)


@pytest.mark.parametrize("shape", MOVE_SHAPES)
def test_previous_moves_fewer_experts_after_a_perturbation(shape: tuple[int, ...]) -> None:
    experts, slots, groups, nodes, gpus = shape
    rng = np.random.default_rng(3)
    load = rng.lognormal(3, 1, (6, experts))
    first = rebalance(load, slots, groups, nodes, gpus)
    perturbed = load * rng.uniform(0.8, 1.2, load.shape)
    kept = rebalance(perturbed, slots, groups, nodes, gpus, previous=first.location, move_cost=0)
    fresh = rebalance(perturbed, slots, groups, nodes, gpus)
    check_plan(kept, perturbed, slots, gpus)
    without = evaluate_placement(perturbed, fresh.location, first.location).moved_experts
    assert kept.stats.moved_experts == moved(first.location, kept.location)
    np.testing.assert_array_equal(
        kept.stats.layer_moved_experts,
        (first.location.physical_to_logical != kept.location.physical_to_logical).sum(axis=1),
    )
    assert kept.stats.moved_experts < without
    # With move_cost=0 and no max_moves, matching the previous placement costs no balance.
    assert (kept.stats.max_rank_load <= fresh.stats.max_rank_load * (1 + 1e-9)).all()
    assert not kept.stats.layer_kept_previous.any()


def greedy_block_matching(new: np.ndarray, old: np.ndarray, count: int) -> list[int]:
    """The pairwise reference of the planner's matching: new[a] and old[b] are blocks of slots;
    every pair with a positive multiset overlap, sorted by (-overlap, a, b), is taken when both
    blocks are free; new blocks left over take the free old blocks in order."""
    new_counts = [Counter(block.tolist()) for block in new.reshape(count, -1)]
    old_counts = [Counter(block.tolist()) for block in old.reshape(count, -1)]
    pairs = []
    for a, x in enumerate(new_counts):
        for b, y in enumerate(old_counts):
            common = sum((x & y).values())
            if common > 0:
                pairs.append((-common, a, b))
    target, used = [-1] * count, [False] * count
    for _, a, b in sorted(pairs):
        if target[a] < 0 and not used[b]:
            target[a], used[b] = b, True
    free = iter(b for b in range(count) if not used[b])
    return [t if t >= 0 else next(free) for t in target]


def reference_match_previous(row: np.ndarray, old: np.ndarray, gpus: int, nodes: int) -> np.ndarray:
    """Relabels a planned layer's nodes, then GPUs within nodes, then slots within GPUs, to match
    ``old`` (the pre-issue-17 O(G^2) pairwise algorithm, written out)."""
    slots_per_gpu = len(row) // gpus
    out = row.copy()
    if nodes > 1:
        node_target = greedy_block_matching(row, old, nodes)
        width = len(row) // nodes
        for n, t in enumerate(node_target):
            out[t * width : (t + 1) * width] = row[n * width : (n + 1) * width]
        cur, per_node = out.copy(), gpus // nodes
        for n in range(nodes):
            base = n * width
            gpu_target = greedy_block_matching(
                cur[base : base + width], old[base : base + width], per_node
            )
            for g, t in enumerate(gpu_target):
                out[base + t * slots_per_gpu : base + (t + 1) * slots_per_gpu] = cur[
                    base + g * slots_per_gpu : base + (g + 1) * slots_per_gpu
                ]
    else:
        for g, t in enumerate(greedy_block_matching(row, old, gpus)):
            out[t * slots_per_gpu : (t + 1) * slots_per_gpu] = row[
                g * slots_per_gpu : (g + 1) * slots_per_gpu
            ]
    result = np.empty_like(out)
    for g in range(gpus):
        span = slice(g * slots_per_gpu, (g + 1) * slots_per_gpu)
        pending, prev = list(out[span]), old[span]
        filled = [False] * slots_per_gpu
        for s, e in enumerate(prev):
            if e in pending:
                result[span.start + s], filled[s] = e, True
                pending.remove(e)
        rest = iter(pending)
        for s in range(slots_per_gpu):
            if not filled[s]:
                result[span.start + s] = next(rest)
    return result


@pytest.mark.parametrize(
    "shape",
    [(64, 256, 8, 8, 64), (64, 192, 8, 4, 32), (48, 96, 6, 1, 24), (32, 128, 0, 4, 64)],
    ids=["64gpus-8nodes", "32gpus-4nodes", "24gpus-1node", "no-groups"],
)
def test_previous_matching_equals_the_pairwise_reference(shape: tuple[int, ...]) -> None:
    """At a moderate size, with ties and hot experts replicated across many GPUs, the plan with
    ``previous`` is the plan without it relabelled by the pairwise greedy matching (issue 17: the
    sparse matching must keep these plans bit-identical)."""
    experts, slots, groups, nodes, gpus = shape
    rng = np.random.default_rng(17)
    layers = 3
    zipf = 1.0 / np.arange(1, experts + 1)
    load = np.stack([rng.permutation(zipf) * 1e4 for _ in range(layers)])
    load[1] = np.round(load[1] / 2e3)  # small integers: many ties
    earlier = rebalance(
        load * rng.uniform(0.5, 1.5, load.shape), slots, groups or None, nodes, gpus
    )
    rows = [rng.permutation(np.r_[np.arange(experts), rng.integers(0, experts, slots - experts)])]
    random = ExpertLocation(np.array(rows * layers, dtype=np.int32), experts, gpus, nodes)
    for previous in (earlier.location, random):
        for locality in ("node", "none"):
            args = (load, slots, groups or None, nodes, gpus)
            fresh = rebalance(*args, locality=locality)
            plan = rebalance(*args, locality=locality, previous=previous, move_cost=0)
            matched_nodes = nodes if "locality=node" in plan.stats.algorithm else 1
            for layer in range(layers):
                old = previous.physical_to_logical[layer]
                expected = (
                    old
                    if plan.stats.layer_kept_previous[layer]
                    else reference_match_previous(
                        fresh.location.physical_to_logical[layer], old, gpus, matched_nodes
                    )
                )
                np.testing.assert_array_equal(plan.location.physical_to_logical[layer], expected)
            assert not plan.stats.layer_kept_previous.all()


def test_large_move_cost_keeps_previous_layers() -> None:
    experts, slots, groups, nodes, gpus = 32, 40, 8, 4, 8
    rng = np.random.default_rng(4)
    previous = ExpertLocation.trivial(6, experts, slots, gpus, nodes)
    load = rng.lognormal(3, 1, (6, experts))
    free = rebalance(load, slots, groups, nodes, gpus, previous=previous)
    assert free.stats.moved_experts > 0
    plan = rebalance(load, slots, groups, nodes, gpus, previous=previous, move_cost=1e6)
    np.testing.assert_array_equal(plan.location.physical_to_logical, previous.physical_to_logical)
    assert plan.stats.moved_experts == 0
    np.testing.assert_array_equal(
        plan.stats.layer_kept_previous, free.stats.layer_moved_experts > 0
    )
    assert "kept their previous placement" in plan.stats.notes
    check_plan(plan, load, slots, gpus)


def test_move_cost_is_a_minimum_gain_per_moved_expert() -> None:
    experts, slots, groups, nodes, gpus = 16, 24, 4, 2, 8
    rng = np.random.default_rng(6)
    load = rng.lognormal(3, 1, (12, experts))
    previous = rebalance(load, slots, groups, nodes, gpus).location
    perturbed = load * rng.uniform(0.5, 1.5, load.shape)
    old_max = evaluate_placement(perturbed, previous).max_rank_load
    for cost in (0.0005, 0.002, 0.01):
        plan = rebalance(perturbed, slots, groups, nodes, gpus, previous=previous, move_cost=cost)
        for layer in range(12):
            moves = plan.stats.layer_moved_experts[layer]
            if moves == 0:
                continue
            gain = (old_max[layer] - plan.stats.max_rank_load[layer]) / old_max[layer]
            assert gain >= cost * moves * (1 - 1e-9), (cost, layer, gain, moves)
            assert not plan.stats.layer_kept_previous[layer]


def zipf_popularity(rng: np.random.Generator, layers: int, experts: int) -> np.ndarray:
    """[layers, experts] 1 / rank^0.6 over a seeded expert order per layer, rows summing to 1."""
    popularity = np.empty((layers, experts))
    for layer in range(layers):
        popularity[layer, rng.permutation(experts)] = np.arange(1, experts + 1) ** -0.6
    return popularity / popularity.sum(axis=1, keepdims=True)


def test_default_move_cost_ignores_noise_and_follows_real_shifts() -> None:
    """DeepSeek-V3's topology (8 of its 58 layers): re-planning a resampled window of the same
    traffic (100 passes x 4,096 tokens x top-8) must not rewrite the placement for sampling
    noise (move_cost=0 rewrote about 60% of the slots for +0.004 balancedness); a real change of
    popularity must still be followed (benchmarks/bench_move_cost.py measures both)."""
    layers, experts, slots, groups, nodes, gpus = 8, 256, 288, 8, 4, 32
    rng = np.random.default_rng(12)
    popularity = zipf_popularity(rng, layers, experts)

    def window(p: np.ndarray) -> np.ndarray:
        return rng.multinomial(100 * 4096 * 8, p)

    trivial = ExpertLocation.trivial(layers, experts, slots, gpus, nodes)
    first = rebalance(window(popularity), slots, groups, nodes, gpus, previous=trivial)
    assert first.stats.moved_experts > layers * slots // 2  # the trivial placement: followed
    noise = rebalance(window(popularity), slots, groups, nodes, gpus, previous=first.location)
    assert noise.stats.moved_experts <= 0.02 * layers * slots, noise.stats.moved_experts
    eager = rebalance(
        window(popularity), slots, groups, nodes, gpus, previous=first.location, move_cost=0
    )
    assert eager.stats.moved_experts > 0.3 * layers * slots  # what the old default did

    # A quarter of each layer's experts trade popularity: a real shift.
    shifted = popularity.copy()
    for layer in range(layers):
        chosen = rng.choice(experts, experts // 4, replace=False)
        shifted[layer, chosen] = popularity[layer, rng.permutation(chosen)]
    plan = rebalance(window(shifted), slots, groups, nodes, gpus, previous=first.location)
    assert plan.stats.moved_experts > 0.5 * layers * slots
    fresh = window(shifted)
    kept = evaluate_placement(fresh, first.location).balancedness
    followed = evaluate_placement(fresh, plan.location).balancedness
    best = evaluate_placement(
        fresh,
        rebalance(
            window(shifted), slots, groups, nodes, gpus, previous=first.location, move_cost=0
        ).location,
    ).balancedness
    assert followed > kept + 0.1 and followed >= best - 0.002, (kept, followed, best)


def test_default_move_cost_is_documented_everywhere() -> None:
    import inspect

    import moelb.cli

    default = moelb.eplb.DEFAULT_MOVE_COST
    assert default == 1e-4
    assert inspect.signature(rebalance).parameters["move_cost"].default == default
    assert f"= {default}, max_moves" in moelb._core.rebalance.__doc__  # the binding's
    assert (
        moelb.cli.build_parser()
        .parse_args(
            ["rebalance", "d.pt", "-o", "p.json", "--num-physical-experts", "8", "--ep-size", "1"]
        )
        .move_cost
        == default
    )


@pytest.mark.parametrize("max_moves", [0, 1, 5, 20, 60, 10_000])
def test_max_moves_caps_moved_experts(max_moves: int) -> None:
    experts, slots, groups, nodes, gpus = 32, 40, 8, 4, 8
    rng = np.random.default_rng(8)
    load = rng.lognormal(3, 1, (8, experts))
    previous = ExpertLocation.trivial(8, experts, slots, gpus, nodes)
    plan = rebalance(
        load, slots, groups, nodes, gpus, previous=previous, max_moves=max_moves, expert_bytes=7
    )
    check_plan(plan, load, slots, gpus)
    assert plan.stats.moved_experts <= max_moves
    assert plan.stats.moved_experts == moved(previous, plan.location)
    assert plan.stats.moved_bytes == 7 * plan.stats.moved_experts
    kept = plan.stats.layer_kept_previous
    np.testing.assert_array_equal(
        plan.location.physical_to_logical[kept], previous.physical_to_logical[kept]
    )
    if max_moves == 0:
        np.testing.assert_array_equal(
            plan.location.physical_to_logical, previous.physical_to_logical
        )
    if max_moves == 10_000:
        assert plan.stats.moved_experts > 60  # the cap binds only when it is small


def test_expert_bytes_gives_moved_bytes() -> None:
    rng = np.random.default_rng(9)
    load = rng.uniform(1, 100, (3, 16))
    previous = ExpertLocation.trivial(3, 16, 24, 8, 2)
    plan = rebalance(load, 24, 4, 2, 8, previous=previous, expert_bytes=3 * 2**20)
    assert plan.stats.moved_experts == moved(previous, plan.location) > 0
    assert plan.stats.moved_bytes == plan.stats.moved_experts * 3 * 2**20
    assert rebalance(load, 24, 4, 2, 8, previous=previous).stats.moved_bytes is None
    assert rebalance(load, 24, 4, 2, 8, expert_bytes=100).stats.moved_bytes == 0
    stats = evaluate_placement(load, plan.location, previous, expert_bytes=10)
    assert stats.moved_bytes == 10 * plan.stats.moved_experts
    # DeepSeek modes count moves against previous too (without trying to keep anything).
    ds = rebalance(load, 24, 4, 2, 8, algorithm="deepseek", previous=previous, expert_bytes=2)
    assert ds.stats.moved_experts == moved(previous, ds.location)
    assert ds.stats.moved_bytes == 2 * ds.stats.moved_experts


# ---------------------------------------------------------------------------------------------
# Input forms, determinism
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["moelb", "deepseek", "deepseek_global"])
def test_time_series_input_equals_its_sum(algorithm: str) -> None:
    rng = np.random.default_rng(10)
    series = rng.integers(0, 50, (7, 3, 16))
    summed = series.sum(axis=0)
    a = rebalance(series, 24, 4, 2, 8, algorithm=algorithm)
    b = rebalance(summed, 24, 4, 2, 8, algorithm=algorithm)
    np.testing.assert_array_equal(a.location.physical_to_logical, b.location.physical_to_logical)
    assert stats_equal(a.stats, b.stats)
    check_plan(a, series, 24, 8)
    np.testing.assert_array_equal(rank_loads(series, a.location), rank_loads(summed, a.location))
    # A time series also gets the per-step peaks; the rest is the sum's.
    of_series = evaluate_placement(series, a.location)
    assert stats_equal(of_series, evaluate_placement(summed, a.location), ignore=STEP_FIELDS)
    assert of_series.step_max_rank_load is not None and of_series.step_balancedness is not None
    assert evaluate_placement(summed, a.location).step_max_rank_load is None


@pytest.mark.parametrize("algorithm", ["moelb", "deepseek", "deepseek_global"])
def test_integer_and_float_loads_plan_alike(algorithm: str) -> None:
    base = np.random.default_rng(12).integers(0, 1000, (4, 16))
    plans = [
        rebalance(base.astype(dtype), 24, 4, 2, 8, algorithm=algorithm)
        for dtype in (np.int64, np.int32, np.uint16, np.float32, np.float64)
    ]
    plans.append(rebalance(base.tolist(), 24, 4, 2, 8, algorithm=algorithm))
    plans.append(rebalance(np.asfortranarray(base), 24, 4, 2, 8, algorithm=algorithm))
    for plan in plans[1:]:
        np.testing.assert_array_equal(
            plan.location.physical_to_logical, plans[0].location.physical_to_logical
        )
        assert stats_equal(plan.stats, plans[0].stats)


def test_torch_tensor_load_is_accepted() -> None:
    torch = pytest.importorskip("torch")
    load = np.random.default_rng(13).integers(0, 100, (2, 5, 16))
    a = rebalance(torch.from_numpy(load), 24, 4, 2, 8)
    b = rebalance(load, 24, 4, 2, 8)
    np.testing.assert_array_equal(a.location.physical_to_logical, b.location.physical_to_logical)


@pytest.mark.usefixtures("restore_num_threads")
@pytest.mark.parametrize("algorithm", ["moelb", "deepseek", "deepseek_global"])
def test_same_plan_whatever_the_thread_count(algorithm: str) -> None:
    rng = np.random.default_rng(14)
    load = rng.lognormal(4, 1.5, (24, 64))
    previous = ExpertLocation.trivial(24, 64, 80, 16, 2)
    plans = []
    for threads in (1, 2, 4):
        moelb.set_num_threads(threads)
        plans.append(
            rebalance(load, 80, 8, 2, 16, algorithm=algorithm, previous=previous, max_moves=200)
        )
    for plan in plans[1:]:
        np.testing.assert_array_equal(
            plan.location.physical_to_logical, plans[0].location.physical_to_logical
        )
        assert stats_equal(plan.stats, plans[0].stats)


@pytest.mark.parametrize("locality", ["none", "node"])
def test_same_plan_whatever_the_load_scale(locality: str) -> None:
    """Scaling every load by a power of two (exact in floating point) changes no plan. The
    swap search's first test runs in float32 for loads from 1e-30 to 1e30 and in float64 outside:
    2**-110 and 2**100 take the float64 path, the others the float32 one, and all must agree."""
    rng = np.random.default_rng(16)
    load = rng.lognormal(6, 1.5, (6, 64))
    reference = rebalance(load, 80, 8, 2, 16, locality=locality)
    for k in (-110, -60, 40, 100):
        plan = rebalance(load * 2.0**k, 80, 8, 2, 16, locality=locality)
        np.testing.assert_array_equal(
            plan.location.physical_to_logical, reference.location.physical_to_logical, err_msg=k
        )
        np.testing.assert_allclose(plan.stats.gap, reference.stats.gap, rtol=1e-12, atol=0)


def test_plan_stats_equal_evaluate_placement() -> None:
    rng = np.random.default_rng(15)
    load = rng.lognormal(3, 1, (5, 32))
    previous = ExpertLocation.trivial(5, 32, 40, 8, 4)
    plan = rebalance(load, 40, 8, 4, 8, previous=previous)
    again = evaluate_placement(load, plan.location, previous)
    for field in ("max_rank_load", "mean_rank_load", "layer_balancedness", "lower_bound", "gap"):
        np.testing.assert_array_equal(getattr(again, field), getattr(plan.stats, field))
    assert again.moved_experts == plan.stats.moved_experts
    assert again.balancedness == plan.stats.balancedness
    assert again.load_weighted_balancedness == plan.stats.load_weighted_balancedness
    assert again.moved_bytes is None


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

GOOD = {"load": np.ones((2, 12)), "num_physical_experts": 16, "num_groups": 4, "num_nodes": 2,
        "ep_size": 8}  # fmt: skip


def nan_load() -> np.ndarray:
    load = np.ones((2, 12))
    load[1, 3] = np.nan
    return load


@pytest.mark.parametrize(
    "algorithm", ["moelb", "deepseek", "deepseek_hierarchical", "deepseek_global"]
)
@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"load": -np.ones((2, 12))}, r"load\[0, 0\] = -1"),
        ({"load": nan_load()}, r"load\[1, 3\] = nan"),
        ({"load": np.full((2, 12), np.inf)}, r"load\[0, 0\] = inf"),
        ({"load": np.full((2, 12), -np.inf)}, r"load\[0, 0\] = -inf"),
        ({"load": np.ones(12)}, r"load must be \[num_layers, num_experts\].*\(12,\)"),
        ({"load": np.ones((1, 2, 2, 12))}, r"load must be .*\(1, 2, 2, 12\)"),
        ({"load": np.ones((2, 0))}, r"load must have shape .*\[2, 0\]"),
        ({"load": np.ones((0, 12))}, r"load must have shape .*\[0, 12\]"),
        ({"load": np.array([["a"] * 12] * 2)}, r"load must hold numbers"),
        ({"num_physical_experts": 8}, r"num_physical_experts=8 is smaller than the 12"),
        ({"num_physical_experts": 20}, r"num_physical_experts=20 is not divisible by ep_size=8"),
        ({"ep_size": 0}, r"ep_size must be positive, got 0"),
        ({"num_nodes": 0}, r"num_nodes must be positive, got 0"),
        ({"num_groups": -1}, r"num_groups must be non-negative, got -1"),
        ({"ep_size": 2**40}, r"ep_size=1099511627776 does not fit"),
    ],
)
def test_bad_input_names_the_parameter(algorithm: str, change: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        rebalance(**{**GOOD, **change}, algorithm=algorithm)


def overflowing_loads() -> dict[str, np.ndarray]:
    """Finite loads whose sums are not (issue 16): within a layer, across layers, across steps."""
    in_layer = np.zeros((2, 4))
    in_layer[1, :2] = 1e308  # layer 1 sums to inf
    across_layers = np.zeros((2, 4))
    across_layers[:, 0] = 1e308  # each layer finite; summed over layers (vLLM's ratio): inf
    in_step = np.zeros((2, 2, 4))
    in_step[0, 1, :2] = 1e308  # one step's layer sums to inf; each expert's total is finite
    return {"in_layer": in_layer, "across_layers": across_layers, "in_step": in_step}


@pytest.mark.parametrize("case", ["in_layer", "across_layers", "in_step"])
def test_loads_whose_sum_overflows_are_an_error(case: str) -> None:
    """Finite float64 loads of 1e308 on two experts: the statistics were nan (silently)."""
    load = overflowing_loads()[case]
    assert np.isfinite(load).all()
    location = ExpertLocation.trivial(2, 4, 4, ep_size=1)
    calls = {
        "rebalance": lambda: rebalance(load, 4, None, 1, 1),
        "rebalance step_peak": lambda: rebalance(load, 4, None, 1, 1, objective="step_peak"),
        "evaluate_placement": lambda: evaluate_placement(load, location),
        "rank_loads": lambda: rank_loads(load, location),
    }
    if load.ndim == 2:
        del calls["rebalance step_peak"]
    for name, call in calls.items():
        with pytest.raises(InvalidArgumentError, match=r"load sums to inf") as info:
            call()
        assert "1e+300" in str(info.value), name


@pytest.mark.parametrize(
    ("load", "match"),
    [
        (nan_load(), r"load\[1, 3\] = nan"),
        (-np.ones((2, 12)), r"load\[0, 0\] = -1"),
        (np.full((2, 12), np.inf), r"load\[0, 0\] = inf"),
    ],
)
def test_evaluate_placement_and_rank_loads_check_the_load(load: np.ndarray, match: str) -> None:
    location = ExpertLocation.trivial(2, 12, 16, ep_size=4)
    with pytest.raises(InvalidArgumentError, match=match):
        evaluate_placement(load, location)
    with pytest.raises(InvalidArgumentError, match=match):
        rank_loads(load, location)


def test_integer_and_float32_loads_never_overflow() -> None:
    """The int and float32 paths: the largest values their dtypes hold plan with finite
    statistics (they are summed in float64)."""
    location = ExpertLocation.trivial(2, 4, 4, ep_size=2)
    for load in (
        np.full((2, 4), np.iinfo(np.int64).max, np.int64),
        np.full((3, 2, 4), np.iinfo(np.int64).max, np.int64),
        np.full((3, 2, 4), np.iinfo(np.int32).max, np.int32),
        np.full((2, 4), np.iinfo(np.uint64).max, np.uint64),
        np.full((2, 4), np.finfo(np.float32).max, np.float32),
    ):
        plan = rebalance(load, 4, None, 1, 2)
        stats = evaluate_placement(load, location)
        for s in (plan.stats, stats):
            assert np.isfinite(s.max_rank_load).all() and np.isfinite(s.balancedness)
            assert np.isfinite(s.load_weighted_balancedness)
            assert s.balancedness == pytest.approx(1.0)
        assert np.isfinite(rank_loads(load if load.ndim == 2 else load.sum(0), location)).all()


def test_unknown_algorithm_and_locality() -> None:
    with pytest.raises(InvalidArgumentError, match=r"algorithm='greedy'.*'moelb'"):
        rebalance(**GOOD, algorithm="greedy")
    with pytest.raises(InvalidArgumentError, match=r"locality='rack'.*'node'"):
        rebalance(**GOOD, locality="rack")
    assert issubclass(InvalidArgumentError, ValueError)


@pytest.mark.parametrize(
    ("algorithm", "shape", "match"),
    [
        # E % num_groups: the hierarchical policy (explicit, or auto with K % N == 0) rejects it.
        (
            "deepseek_hierarchical",
            (14, 16, 4, 2, 8),
            r"num_experts=14 is not divisible by num_groups=4",
        ),
        ("deepseek", (14, 16, 4, 2, 8), r"num_experts=14 is not divisible by num_groups=4"),
        (
            "deepseek_hierarchical",
            (12, 16, 3, 2, 8),
            r"num_groups=3 is not divisible by num_nodes=2",
        ),
        ("deepseek_hierarchical", (12, 16, None, 2, 8), r"needs num_groups"),
        ("deepseek_hierarchical", (12, 18, 4, 4, 6), r"ep_size=6 is not divisible by num_nodes=4"),
        ("deepseek", (12, 18, 4, 4, 6), r"ep_size=6 is not divisible by num_nodes=4"),
    ],
)
def test_deepseek_modes_reject_what_deepseek_rejects(
    algorithm: str, shape: tuple[int, int, int | None, int, int], match: str
) -> None:
    experts, slots, groups, nodes, gpus = shape
    load = np.random.default_rng(16).uniform(1, 10, (2, experts))
    with pytest.raises(InvalidArgumentError, match=match):
        rebalance(load, slots, groups, nodes, gpus, algorithm=algorithm)
    # moelb accepts every one of them.
    plan = rebalance(load, slots, groups, nodes, gpus)
    check_plan(plan, load, slots, gpus)
    if ds_ref is not None and groups is not None:  # as the port of DeepSeek's code does
        port = (
            ds_ref.rebalance_experts
            if algorithm == "deepseek"
            else ds_ref.rebalance_experts_hierarchical
        )
        with pytest.raises(ValueError):
            port(load, slots, groups, nodes, gpus)


@pytest.mark.parametrize(
    ("algorithm", "shape"),
    [
        ("deepseek", (12, 16, 3, 2, 8)),  # K % N != 0: global, not an error
        ("deepseek_global", (14, 16, 4, 2, 8)),  # groups do not matter to the global policy
        ("deepseek", (14, 16, 3, 2, 8)),  # E % K != 0 but K % N != 0: global, no E % K check
        ("deepseek_global", (12, 16, 3, 2, 8)),
        ("deepseek_global", (12, 16, None, 2, 8)),
    ],
)
def test_deepseek_modes_accept_what_deepseek_accepts(
    algorithm: str, shape: tuple[int, int, int | None, int, int]
) -> None:
    experts, slots, groups, nodes, gpus = shape
    load = np.random.default_rng(17).uniform(1, 10, (2, experts))
    plan = rebalance(load, slots, groups, nodes, gpus, algorithm=algorithm)
    check_plan(plan, load, slots, gpus)
    assert plan.stats.algorithm == "deepseek_global"
    if ds_ref is not None and groups is not None:
        phy, _, _ = ds_ref.rebalance_experts(
            load,
            slots,
            groups if algorithm == "deepseek" else 1,
            nodes if algorithm == "deepseek" else 1,
            gpus,
        )
        np.testing.assert_array_equal(plan.location.physical_to_logical, phy)


@pytest.mark.parametrize(("algorithm", "groups"), [("deepseek_global", 4), ("deepseek", 3)])
def test_deepseek_global_accepts_gpus_not_divisible_by_nodes(algorithm: str, groups: int) -> None:
    load = np.random.default_rng(18).uniform(1, 10, (2, 12))
    plan = rebalance(load, 18, groups, 4, 6, algorithm=algorithm)
    check_plan(plan, load, 18, 6)
    expected = rebalance(load, 18, groups, 1, 6, algorithm="deepseek_global")
    np.testing.assert_array_equal(
        plan.location.physical_to_logical, expected.location.physical_to_logical
    )


@pytest.mark.parametrize(
    ("previous", "match"),
    [
        (ExpertLocation.trivial(3, 12, 16, 8, 2), r"previous has num_layers=3"),
        (ExpertLocation.trivial(2, 10, 16, 8, 2), r"previous has .*num_logical_experts=10"),
        (ExpertLocation.trivial(2, 12, 24, 8, 2), r"previous has .*num_physical_experts=24"),
        (ExpertLocation.trivial(2, 12, 16, 4, 2), r"previous has .*ep_size=4"),
    ],
)
def test_previous_of_another_shape(previous: ExpertLocation, match: str) -> None:
    for algorithm in ("moelb", "deepseek"):
        with pytest.raises(InvalidArgumentError, match=match):
            rebalance(**GOOD, algorithm=algorithm, previous=previous)
    # A slot of another ep_size lies on another GPU: its weights are not "kept" there.
    with pytest.raises(InvalidArgumentError, match=match):
        evaluate_placement(GOOD["load"], ExpertLocation.trivial(2, 12, 16, 8, 2), previous)


def test_bad_move_options() -> None:
    previous = ExpertLocation.trivial(2, 12, 16, 8, 2)
    for cost in (-0.1, np.nan, np.inf):
        with pytest.raises(
            InvalidArgumentError, match=r"move_cost must be finite and non-negative"
        ):
            rebalance(**GOOD, previous=previous, move_cost=cost)
    with pytest.raises(InvalidArgumentError, match=r"max_moves"):
        rebalance(**GOOD, previous=previous, max_moves=-5)
    with pytest.raises(InvalidArgumentError, match=r"expert_bytes must be non-negative, got -1"):
        rebalance(**GOOD, expert_bytes=-1)


def test_metrics_reject_a_load_of_another_shape() -> None:
    loc = ExpertLocation.trivial(2, 12, 16, 8, 2)
    with pytest.raises(InvalidArgumentError, match=r"load has shape \[2, 10\]"):
        rank_loads(np.ones((2, 10)), loc)
    with pytest.raises(InvalidArgumentError, match=r"load has shape \[3, 12\]"):
        evaluate_placement(np.ones((3, 12)), loc)
    with pytest.raises(InvalidArgumentError, match=r"load must be"):
        rank_loads(np.ones(12), loc)


def test_evaluate_placement_rejects_negative_expert_bytes() -> None:
    previous = ExpertLocation.trivial(2, 12, 16, 8, 2)
    with pytest.raises(InvalidArgumentError, match=r"expert_bytes"):
        evaluate_placement(GOOD["load"], previous, expert_bytes=-1)


def test_max_moves_minus_one_is_rejected() -> None:
    previous = ExpertLocation.trivial(2, 12, 16, 8, 2)
    with pytest.raises(InvalidArgumentError, match=r"max_moves must be >= 0 \(or None\), got -1"):
        rebalance(**GOOD, previous=previous, max_moves=-1)


# ---------------------------------------------------------------------------------------------
# The per-step peak objective (objective="step_peak" on a time series [T, L, E])
# ---------------------------------------------------------------------------------------------


def numpy_step_peaks(series: np.ndarray, phy2log: np.ndarray, ep_size: int) -> np.ndarray:
    """[L]: the sum over steps of each step's largest GPU load (equal split over replicas)."""
    return np.stack([numpy_rank_loads(step, phy2log, ep_size).max(axis=1) for step in series]).sum(
        axis=0
    )


def bursty_series(
    rng: np.random.Generator, steps: int, layers: int, experts: int, strength: float
) -> np.ndarray:
    """Per-step counts [T, L, E]: a skewed base popularity, plus 4 fixed topics (random subsets
    of experts) that flare up together in random steps, sampled multinomially."""
    series = np.zeros((steps, layers, experts), dtype=np.int64)
    for layer in range(layers):
        base = 1.0 / (1.0 + rng.permutation(experts)) ** 0.6
        topics = [rng.choice(experts, max(2, experts // 8), replace=False) for _ in range(4)]
        for t in range(steps):
            p = base.copy()
            for topic, weight in zip(topics, rng.dirichlet(np.full(4, 0.3)), strict=True):
                p[topic] *= 1.0 + strength * 4 * weight
            series[t, layer] = rng.multinomial(64 * experts, p / p.sum())
    return series


STEP_SHAPES = [  # (experts, slots, groups, nodes, gpus, locality)
    (16, 24, 4, 2, 8, "node"),
    (16, 24, 4, 2, 8, "none"),
    (32, 40, 8, 2, 4, "node"),
    (32, 48, None, 1, 6, "none"),
    (12, 16, None, 1, 2, "none"),
]


@pytest.mark.parametrize("shape", STEP_SHAPES, ids=lambda s: "E{}-P{}-K{}-N{}-G{}-{}".format(*s))
def test_step_peak_never_above_the_total_plan(shape: tuple[Any, ...]) -> None:
    experts, slots, groups, nodes, gpus, locality = shape
    rng = np.random.default_rng(experts * 1000 + slots)
    series = bursty_series(rng, steps=24, layers=4, experts=experts, strength=3.0)
    args = (slots, groups, nodes, gpus)
    total = rebalance(series, *args, locality=locality)
    peak = rebalance(series, *args, locality=locality, objective="step_peak")
    check_plan(peak, series, slots, gpus)
    assert peak.stats.algorithm == total.stats.algorithm + "+step_peak"
    # Same replica counts and locality; only which GPU holds which replica changes.
    np.testing.assert_array_equal(peak.location.logical_count, total.location.logical_count)
    if effective_locality(total) == "node" and nodes > 1:
        assert_groups_within_nodes(peak.location.physical_to_logical, experts, groups, gpus, nodes)
    # The step statistics are the NumPy ones, and never above the total plan's.
    mine = numpy_step_peaks(series, peak.location.physical_to_logical, gpus)
    theirs = numpy_step_peaks(series, total.location.physical_to_logical, gpus)
    np.testing.assert_allclose(peak.stats.step_max_rank_load, mine, rtol=1e-12)
    assert (mine <= theirs * (1 + 1e-12)).all()
    assert (peak.stats.step_max_rank_load >= peak.stats.max_rank_load * (1 - 1e-12)).all()
    mean = series.sum(axis=0).sum(axis=1) / gpus
    assert peak.stats.step_balancedness == pytest.approx(
        ((mean + 1e-5) / (mine + 1e-5)).mean(), rel=1e-12
    )
    # No new avoidable same-GPU duplicate.
    counts = peak.location.logical_count
    cap = gpus // (nodes if effective_locality(total) == "node" else 1)
    assert duplicates_on_a_gpu(
        peak.location.physical_to_logical, gpus, counts, cap
    ) <= duplicates_on_a_gpu(total.location.physical_to_logical, gpus, counts, cap)


def test_step_peak_lowers_the_per_step_peak_of_bursty_traffic() -> None:
    """Not vacuous: on traffic whose experts flare up together, the step objective finds a
    strictly better per-step peak on most layers."""
    rng = np.random.default_rng(7)
    series = bursty_series(rng, steps=40, layers=6, experts=32, strength=3.0)
    total = rebalance(series, 48, None, 1, 8, locality="none")
    peak = rebalance(series, 48, None, 1, 8, locality="none", objective="step_peak")
    before = evaluate_placement(series, total.location)
    assert (peak.stats.step_max_rank_load < before.step_max_rank_load * (1 - 1e-4)).sum() >= 4
    assert peak.stats.step_balancedness > before.step_balancedness


def test_step_peak_hand_checked() -> None:
    """4 equally loaded experts on 2 GPUs: experts 0 and 1 peak in step 0, 2 and 3 in step 1.
    Keeping each step's pair apart halves the per-step peak."""
    series = np.array([[[10, 10, 1, 1]], [[1, 1, 10, 10]]], dtype=np.float64)
    peak = rebalance(series, 4, None, 1, 2, locality="none", objective="step_peak")
    for block in peak.location.physical_to_logical[0].reshape(2, 2):
        assert sorted(block.tolist()) in ([0, 2], [0, 3], [1, 2], [1, 3])
    assert peak.stats.step_max_rank_load[0] == pytest.approx(22.0)
    total = rebalance(series, 4, None, 1, 2, locality="none")
    assert evaluate_placement(series, total.location).step_max_rank_load[0] >= 22.0


@pytest.mark.usefixtures("restore_num_threads")
def test_step_peak_same_plan_whatever_the_thread_count() -> None:
    rng = np.random.default_rng(3)
    series = bursty_series(rng, steps=30, layers=8, experts=16, strength=2.0)
    plans = []
    for threads in (1, 2, 4):
        moelb.set_num_threads(threads)
        plans.append(rebalance(series, 24, 4, 2, 8, objective="step_peak"))
    for other in plans[1:]:
        np.testing.assert_array_equal(
            other.location.physical_to_logical, plans[0].location.physical_to_logical
        )
        assert stats_equal(other.stats, plans[0].stats)


def test_step_peak_with_previous_keeps_its_per_step_peak() -> None:
    """Matching a previous placement only relabels GPUs and slots."""
    rng = np.random.default_rng(5)
    series = bursty_series(rng, steps=20, layers=3, experts=16, strength=2.0)
    previous = rebalance(series[:10], 24, 4, 2, 8).location
    fresh = rebalance(series, 24, 4, 2, 8, objective="step_peak")
    matched = rebalance(series, 24, 4, 2, 8, objective="step_peak", previous=previous)
    np.testing.assert_allclose(
        matched.stats.step_max_rank_load, fresh.stats.step_max_rank_load, rtol=1e-12
    )
    # ... so that fewer slots change than in the fresh plan.
    assert evaluate_placement(series, fresh.location, previous).moved_experts >= (
        matched.stats.moved_experts
    )


def test_evaluate_placement_of_a_time_series_has_step_peaks() -> None:
    rng = np.random.default_rng(11)
    series = rng.integers(0, 100, (9, 3, 16))
    location = ExpertLocation.trivial(3, 16, 24, 8, 2)
    stats = evaluate_placement(series, location)
    expected = numpy_step_peaks(series, location.physical_to_logical, 8)
    np.testing.assert_allclose(stats.step_max_rank_load, expected, rtol=1e-12)
    mean = series.sum(axis=(0, 2)) / 8
    assert stats.step_balancedness == pytest.approx(
        ((mean + 1e-5) / (expected + 1e-5)).mean(), rel=1e-12
    )
    # A series of zeros: balancedness 1, no NaN.
    zeros = evaluate_placement(np.zeros((2, 3, 16)), location)
    assert zeros.step_balancedness == 1.0
    np.testing.assert_array_equal(zeros.step_max_rank_load, 0.0)
    # A series of no steps is an empty sum, as for rebalance's total objective.
    empty = evaluate_placement(np.zeros((0, 3, 16), dtype=np.int32), location)
    assert empty.step_max_rank_load is None and empty.step_balancedness is None
    np.testing.assert_array_equal(empty.max_rank_load, 0.0)


@pytest.mark.parametrize(
    ("load", "kwargs", "match"),
    [
        (np.ones((3, 16)), {}, "objective='step_peak' needs per-step loads"),
        (np.ones((2, 3, 16)), {"algorithm": "deepseek"}, "objective='step_peak' is moelb's"),
        (np.ones((0, 3, 16)), {}, r"load must have shape \[num_steps"),
        (np.full((2, 3, 16), -1.0), {}, r"load\[0, 0, 0\] = -1 is not a finite non-negative"),
        (np.full((2, 3, 16), np.nan), {}, r"load\[0, 0, 0\] = nan"),
        (np.ones((2, 3, 15)), {}, "num_logical_experts|16|15"),
    ],
    ids=["not-a-series", "deepseek", "no-steps", "negative", "nan", "shape"],
)
def test_step_peak_bad_input(load: np.ndarray, kwargs: dict[str, Any], match: str) -> None:
    if load.shape[-1] == 15:  # a previous placement of another shape
        previous = ExpertLocation.trivial(3, 16, 24, 8, 2)
        with pytest.raises(InvalidArgumentError, match="previous"):
            rebalance(load, 24, 4, 2, 8, objective="step_peak", previous=previous)
        return
    with pytest.raises(InvalidArgumentError, match=match):
        rebalance(load, 24, 4, 2, 8, objective="step_peak", **kwargs)


def test_step_series_int32_counts_equal_float64() -> None:
    """A recorder's int32 counts go to the core as they are (no float64 copy) and plan and score
    exactly like the same values in float64; other dtypes and non-contiguous views work too."""
    rng = np.random.default_rng(12)
    counts = bursty_series(rng, steps=15, layers=3, experts=16, strength=2.0).astype(np.int32)
    as_float = counts.astype(np.float64)
    for objective in ("total", "step_peak"):
        a = rebalance(counts, 24, 4, 2, 8, objective=objective)
        b = rebalance(as_float, 24, 4, 2, 8, objective=objective)
        np.testing.assert_array_equal(
            a.location.physical_to_logical, b.location.physical_to_logical
        )
        assert stats_equal(a.stats, b.stats)
    plan = rebalance(counts, 24, 4, 2, 8, objective="step_peak")
    expected = evaluate_placement(counts, plan.location)
    np.testing.assert_array_equal(expected.step_max_rank_load, plan.stats.step_max_rank_load)
    others = (as_float, counts.astype(np.int64), counts.astype(np.uint16), counts[:, :, ::-1])
    for other in others[:3]:
        assert stats_equal(evaluate_placement(other, plan.location), expected)
    # A non-contiguous view is copied: the same numbers for the reversed expert order.
    reversed_location = ExpertLocation(15 - plan.location.physical_to_logical, 16, 8, 2)
    assert stats_equal(evaluate_placement(others[3], reversed_location), expected)


def test_unknown_objective() -> None:
    with pytest.raises(InvalidArgumentError, match="objective='peak' is not an EPLB objective"):
        rebalance(np.ones((2, 3, 16)), 24, 4, 2, 8, objective="peak")


def test_a_series_whose_step_sum_overflows_names_the_expert() -> None:
    """Three finite steps of 1e308 on one expert: the sum over steps overflows. The error says so
    (it said 'load[0, 0] = inf', a value the caller never passed)."""
    series = np.zeros((3, 2, 8))
    series[:, 1, 5] = 1e308
    with pytest.raises(InvalidArgumentError, match=r"load\[:, 1, 5\] summed over the 3 steps"):
        rebalance(series, 8, None, 1, 4)
