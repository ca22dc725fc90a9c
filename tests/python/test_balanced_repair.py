"""rebalance(dispatch="balanced", previous=...) repairs the previous layout instead of rebuilding
it, and relabel_ranks (ours; issue 20). Checked here with implementations written in the test:
relabel_ranks keeps as many slots as the best of all rank permutations (brute force, nodes onto
nodes under node locality) and only permutes ranks; along a chain of drifting windows every
layer stays at or below the equal-split plan on its planning window (balanced_split per
evaluated step), every layer that is neither the equal-split plan nor the previous placement
is one connected piece (a union-find), node locality holds, and at move_cost 0 no layer is
worse on its window than the plan made without previous, nor moves more slots than that plan
relabelled at the same value; the chain is the same at any thread count; bad arguments name
the parameter."""

from __future__ import annotations

import itertools
from collections import Counter

import moelb
import numpy as np
import pytest
from moelb.eplb import DEFAULT_MOVE_COST
from test_eplb_balanced import pieces, realised

# (L, E, P, groups, N, W): demo-like; two nodes; too few redundant slots to be one piece.
CHAIN_SHAPES = [
    (3, 256, 288, 8, 4, 32),
    (3, 64, 80, 8, 2, 16),
    (2, 30, 32, None, 4, 8),
]


def drifting(T: int, L: int, E: int, seed: int) -> np.ndarray:
    """[T, L, E] int32 counts whose Zipf-like popularity drifts: each step blends 3% of a new
    random popularity in; 64 picks per expert per step."""
    rng = np.random.default_rng(seed)
    popularity = rng.random((L, E)) ** 3 + 0.02
    steps = []
    for _ in range(T):
        popularity = 0.97 * popularity + 0.03 * (rng.random((L, E)) ** 3 + 0.02)
        p = popularity / popularity.sum(axis=1, keepdims=True)
        steps.append(np.stack([rng.multinomial(64 * E, p[layer]) for layer in range(L)]))
    return np.stack(steps).astype(np.int32)


def rank_multisets(row: np.ndarray, W: int) -> list[Counter]:
    S = len(row) // W
    return [Counter(row[g * S : (g + 1) * S].tolist()) for g in range(W)]


def brute_force_kept(new: np.ndarray, old: np.ndarray, W: int, nodes: int) -> int:
    """The most slots any rank permutation (mapping nodes onto nodes) keeps: every permutation
    of the W ranks is tried."""
    a, b = rank_multisets(new, W), rank_multisets(old, W)
    overlap = [[sum((x & y).values()) for y in b] for x in a]
    R = W // nodes
    best = 0
    for perm in itertools.permutations(range(W)):
        # perm[g]: the old rank of new rank g; each node's ranks must land on one node.
        if any(len({perm[g] // R for g in range(n * R, (n + 1) * R)}) != 1 for n in range(nodes)):
            continue
        best = max(best, sum(overlap[g][perm[g]] for g in range(W)))
    return best


def random_row(rng: np.random.Generator, E: int, P: int) -> np.ndarray:
    row = np.concatenate([np.arange(E), rng.integers(0, E, P - E)])
    return rng.permutation(row).astype(np.int32)


def perturbed(rng: np.random.Generator, old: np.ndarray, W: int, E: int) -> np.ndarray:
    """`old` with its ranks shuffled, then a few slots rewritten (every expert kept)."""
    S = len(old) // W
    new = old.reshape(W, S)[rng.permutation(W)].reshape(-1).copy()
    for p in rng.choice(len(new), size=len(new) // 3, replace=False):
        e = int(rng.integers(0, E))
        if (new == new[p]).sum() > 1:
            new[p] = e
    return new


@pytest.mark.parametrize(
    ("E", "P", "W", "nodes", "locality"),
    [(6, 12, 4, 1, "none"), (8, 12, 6, 1, "none"), (10, 14, 7, 1, "none"),
     (8, 12, 6, 2, "node"), (8, 16, 8, 2, "node"), (9, 12, 6, 3, "node")],
)  # fmt: skip
def test_relabel_ranks_keeps_the_most_slots(
    E: int, P: int, W: int, nodes: int, locality: str
) -> None:
    rng = np.random.default_rng(E * 100 + P + W)
    layers = 6
    old = np.stack([random_row(rng, E, P) for _ in range(layers)])
    new = np.stack([
        perturbed(rng, old[layer], W, E) if layer % 2 else random_row(rng, E, P)
        for layer in range(layers)
    ])  # fmt: skip
    previous = moelb.ExpertLocation(old, E, W, nodes)
    location = moelb.ExpertLocation(new, E, W, nodes)
    out = moelb.relabel_ranks(location, previous, locality=locality)
    assert out.num_nodes == nodes and out.ep_size == W
    got = out.physical_to_logical
    R = W // nodes
    for layer in range(layers):
        kept = int((got[layer] == old[layer]).sum())
        assert kept == brute_force_kept(new[layer], old[layer], W, nodes), layer
        # Only ranks permuted (nodes onto nodes), slots reordered within ranks.
        before, after = rank_multisets(new[layer], W), rank_multisets(got[layer], W)
        for n in range(nodes):
            mine = sorted(map(sorted, (before[g].elements() for g in range(n * R, (n + 1) * R))))
            onto = [
                sorted(map(sorted, (after[g].elements() for g in range(m * R, (m + 1) * R))))
                for m in range(nodes)
            ]
            assert mine in onto, (layer, n)
        assert sorted(map(sorted, (c.elements() for c in before))) == sorted(
            map(sorted, (c.elements() for c in after))
        )


def test_relabel_ranks_of_a_permuted_placement_restores_it() -> None:
    rng = np.random.default_rng(5)
    old = np.stack([random_row(rng, 40, 64) for _ in range(3)])
    perm = rng.permutation(16)
    new = np.stack([row.reshape(16, 4)[perm][:, ::-1].reshape(-1) for row in old])
    out = moelb.relabel_ranks(
        moelb.ExpertLocation(new, 40, 16, 4), moelb.ExpertLocation(old, 40, 16, 4)
    )
    np.testing.assert_array_equal(out.physical_to_logical, old)


def chain(
    shape: tuple, locality: str, move_cost: float, windows: int = 4, period: int = 6
) -> list[tuple[np.ndarray, moelb.ExpertLocation, moelb.Plan]]:
    """(window, previous, plan) along a chain of drifting windows, from the trivial placement."""
    L, E, P, groups, N, W = shape
    counts = drifting(windows * period, L, E, seed=P + W)
    current = moelb.ExpertLocation.trivial(L, E, P, W, N)
    out = []
    for w in range(windows):
        window = counts[w * period : (w + 1) * period]
        plan = moelb.rebalance(
            window, P, groups, N, W, locality=locality, dispatch="balanced",
            previous=current, move_cost=move_cost,
        )  # fmt: skip
        out.append((window, current, plan))
        current = plan.location
    return out


def canonical(location: moelb.ExpertLocation, layer: int) -> list[list[int]]:
    """A layer up to which rank is which: its ranks' sorted experts, sorted."""
    W = location.ep_size
    return sorted(
        sorted(c.elements()) for c in rank_multisets(location.physical_to_logical[layer], W)
    )


@pytest.mark.parametrize("shape", CHAIN_SHAPES)
@pytest.mark.parametrize("locality", ["none", "node"])
@pytest.mark.parametrize("move_cost", [0.0, DEFAULT_MOVE_COST])
def test_repaired_chain_never_worse_and_connected(
    shape: tuple, locality: str, move_cost: float
) -> None:
    L, E, P, groups, N, W = shape
    for window, previous, plan in chain(shape, locality, move_cost):
        equal = moelb.rebalance(window, P, groups, N, W, locality=locality, previous=previous)
        mine, theirs = realised(window, plan.location), realised(window, equal.location)
        np.testing.assert_allclose(plan.stats.realised_max_rank_load, mine, rtol=1e-12)
        kept = plan.stats.layer_kept_previous
        if move_cost == 0:
            assert (mine <= theirs).all(), (mine, theirs)
        else:  # move_cost may keep a previous placement that is worse
            assert (mine[~kept] <= theirs[~kept]).all(), (mine, theirs, kept)
        for layer in range(L):
            form = canonical(plan.location, layer)
            if (
                locality == "none"
                and P - E >= W - 1
                and form
                not in (
                    canonical(equal.location, layer),
                    canonical(previous, layer),
                )
            ):
                assert pieces(plan.location, layer) == 1, layer
        if locality == "node" and "locality=node" in plan.stats.algorithm:
            node_slots = P // N
            for layer in range(L):
                p2l = plan.location.physical_to_logical[layer]
                for e in range(E):
                    assert len(set(np.flatnonzero(p2l == e) // node_slots)) == 1


@pytest.mark.parametrize("shape", CHAIN_SHAPES[:2])
@pytest.mark.parametrize("locality", ["none", "node"])
def test_no_worse_and_no_more_moves_than_a_relabelled_rebuild(shape: tuple, locality: str) -> None:
    """At move_cost 0 the plan from previous is, per layer, at or below the plan made without
    previous on the window, and at the same value moves no more slots than that plan relabelled
    onto previous (which is one of its candidates)."""
    _L, _E, P, groups, N, W = shape
    for window, previous, plan in chain(shape, locality, 0.0):
        fresh = moelb.rebalance(window, P, groups, N, W, locality=locality, dispatch="balanced")
        relabelled = moelb.relabel_ranks(
            fresh.location,
            previous,
            locality="node" if "locality=node" in fresh.stats.algorithm else "none",
        )
        mine = plan.stats.realised_max_rank_load
        theirs = fresh.stats.realised_max_rank_load
        assert (mine <= theirs).all(), (mine, theirs)
        moved = (plan.location.physical_to_logical != previous.physical_to_logical).sum(axis=1)
        rebuilt = (relabelled.physical_to_logical != previous.physical_to_logical).sum(axis=1)
        same = mine == theirs
        assert (moved[same] <= rebuilt[same]).all(), (moved, rebuilt, same)
        np.testing.assert_array_equal(moved, plan.stats.layer_moved_experts)


def test_moves_far_fewer_slots_than_a_rebuild() -> None:
    """Along the chain (default move_cost) the plans rewrite fewer slots than the plans made
    without previous relabelled onto the same previous placements."""
    shape = CHAIN_SHAPES[0]
    _L, _E, P, groups, N, W = shape
    ours = theirs = 0
    for window, previous, plan in chain(shape, "none", DEFAULT_MOVE_COST, windows=5):
        fresh = moelb.rebalance(window, P, groups, N, W, locality="none", dispatch="balanced")
        relabelled = moelb.relabel_ranks(fresh.location, previous)
        ours += plan.stats.moved_experts
        theirs += int((relabelled.physical_to_logical != previous.physical_to_logical).sum())
    assert ours < theirs / 2, (ours, theirs)


def test_replanning_the_same_window_moves_only_for_a_gain() -> None:
    """From the plan, on the same window: a layer moves only where the window gains (the repair
    of the plan is a new candidate); the others keep their placement."""
    L, E, P, groups, N, W = CHAIN_SHAPES[0]
    counts = drifting(6, L, E, seed=2)
    trivial = moelb.ExpertLocation.trivial(L, E, P, W, N)
    for move_cost in (0.0, DEFAULT_MOVE_COST):
        kw = dict(locality="none", dispatch="balanced", move_cost=move_cost)
        first = moelb.rebalance(counts, P, groups, N, W, previous=trivial, **kw)
        again = moelb.rebalance(counts, P, groups, N, W, previous=first.location, **kw)
        was, now = first.stats.realised_max_rank_load, again.stats.realised_max_rank_load
        moved = again.stats.layer_moved_experts > 0
        assert (now[moved] < was[moved]).all()
        np.testing.assert_array_equal(now[~moved], was[~moved])
        assert again.stats.layer_kept_previous[~moved].all()
        np.testing.assert_array_equal(
            again.location.physical_to_logical[~moved], first.location.physical_to_logical[~moved]
        )


@pytest.mark.parametrize("locality", ["none", "node"])
def test_chain_identical_for_any_thread_count(locality: str) -> None:
    runs = []
    try:
        for threads in (1, 2):
            moelb.set_num_threads(threads)
            runs.append(chain(CHAIN_SHAPES[0], locality, 0.0, windows=3))
    finally:
        moelb.set_num_threads(0)
    for (_, _, a), (_, _, b) in zip(*runs, strict=True):
        np.testing.assert_array_equal(
            a.location.physical_to_logical, b.location.physical_to_logical
        )
        np.testing.assert_array_equal(
            a.stats.realised_max_rank_load, b.stats.realised_max_rank_load
        )
        assert a.stats.notes == b.stats.notes
    relabelled = []
    for threads in (1, 2):
        moelb.set_num_threads(threads)
        try:
            location = moelb.ExpertLocation(
                np.stack([random_row(np.random.default_rng(layer), 40, 64) for layer in range(8)]),
                40, 16, 4,
            )  # fmt: skip
            relabelled.append(
                moelb.relabel_ranks(location, moelb.ExpertLocation.trivial(8, 40, 64, 16, 4))
            )
        finally:
            moelb.set_num_threads(0)
    np.testing.assert_array_equal(
        relabelled[0].physical_to_logical, relabelled[1].physical_to_logical
    )


def test_relabel_ranks_errors_name_the_parameter() -> None:
    location = moelb.ExpertLocation.trivial(2, 8, 12, 4, 2)
    with pytest.raises(ValueError, match=r"previous has num_layers=3, .* but location has 2, "):
        moelb.relabel_ranks(location, moelb.ExpertLocation.trivial(3, 8, 12, 4, 2))
    with pytest.raises(ValueError, match=r"previous has .*num_physical_experts=16"):
        moelb.relabel_ranks(location, moelb.ExpertLocation.trivial(2, 8, 16, 4, 2))
    with pytest.raises(ValueError, match=r"previous has .*ep_size=6"):
        moelb.relabel_ranks(location, moelb.ExpertLocation.trivial(2, 8, 12, 6, 2))
    with pytest.raises(ValueError, match="locality='auto' is not one relabel_ranks takes"):
        moelb.relabel_ranks(location, location, locality="auto")
    with pytest.raises(ValueError, match="locality='nodes' is not a locality"):
        moelb.relabel_ranks(location, location, locality="nodes")
    with pytest.raises(TypeError):
        moelb.relabel_ranks(location, None)  # type: ignore[arg-type]
