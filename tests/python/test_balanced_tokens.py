"""The balanced split at token level: this rank's tokens dispatched by its row of
balanced_assignment (exact mode), or by per-replica fractions of balanced_split with seeded
per-token picks (probabilities mode). References written here: per-rank loads recounted from the
dispatched ids, fractions rebuilt from balanced_split's slots."""

from __future__ import annotations

import moelb
import numpy as np
import pytest


def random_location(rng: np.random.Generator, experts: int, ranks: int, slots_per_rank: int,
                    nodes: int, layers: int = 2) -> moelb.ExpertLocation:  # fmt: skip
    """Every expert once, the remaining slots random experts, shuffled per layer."""
    slots = ranks * slots_per_rank
    rows = []
    for _ in range(layers):
        row = np.concatenate([np.arange(experts), rng.integers(0, experts, slots - experts)])
        rows.append(rng.permutation(row))
    return moelb.ExpertLocation(np.array(rows, np.int32), experts, ranks, nodes)


def rank_batches(rng: np.random.Generator, experts: int, ranks: int, tokens: int, top_k: int):
    """Each rank's logical topk_ids [T, K] int32 with a skewed choice and some padding."""
    weights = rng.pareto(1.2, experts) + 0.05
    weights /= weights.sum()
    out = []
    for _ in range(ranks):
        ids = rng.choice(experts, size=(tokens, top_k), p=weights).astype(np.int32)
        ids[rng.random(ids.shape) < 0.03] = -1
        out.append(ids)
    return out


def rank_loads_of(dispatched: list[np.ndarray], location: moelb.ExpertLocation) -> np.ndarray:
    S = location.num_local_physical_experts
    slots = np.concatenate([d[d >= 0] for d in dispatched])
    return np.bincount(slots // S, minlength=location.ep_size)


@pytest.mark.parametrize("seed", range(12))
def test_exact_mode_realises_the_optimum_at_token_level(seed: int) -> None:
    rng = np.random.default_rng(seed)
    ranks, nodes = [(4, 2), (8, 2), (6, 3), (8, 1)][seed % 4]
    experts, per_rank = 12, 3 + seed % 3
    location = random_location(rng, experts, ranks, per_rank, nodes)
    batches = rank_batches(rng, experts, ranks, tokens=40 + 7 * seed, top_k=3)
    for layer in range(location.num_layers):
        source = np.stack([np.bincount(b[b >= 0], minlength=experts) for b in batches])
        assignment = moelb.balanced_assignment(source, location, layer=layer)
        dispatched = [
            moelb.dispatch_by_assignment(batches[r], location, layer, assignment[r])
            for r in range(ranks)
        ]
        p2l = location.physical_to_logical[layer]
        for ids, out in zip(batches, dispatched, strict=True):
            assert np.array_equal(out < 0, ids < 0)
            assert np.array_equal(p2l[out[out >= 0]], ids[ids >= 0])  # a replica of its expert
        # Every rank's tokens per slot are its assignment row, so the ranks' union is optimal.
        for r in range(ranks):
            per_slot = np.bincount(dispatched[r][dispatched[r] >= 0], minlength=p2l.size)
            np.testing.assert_array_equal(per_slot, assignment[r])
        split = moelb.balanced_split(source.sum(axis=0), location, layer=layer)
        S = location.num_local_physical_experts
        optimum = split.reshape(ranks, S).sum(axis=1).max()
        assert rank_loads_of(dispatched, location).max() == optimum


def test_exact_mode_refuses_an_assignment_of_other_tokens() -> None:
    rng = np.random.default_rng(3)
    location = random_location(rng, 8, 4, 3, 2)
    batches = rank_batches(rng, 8, 4, 30, 2)
    source = np.stack([np.bincount(b[b >= 0], minlength=8) for b in batches])
    assignment = moelb.balanced_assignment(source, location, layer=0)
    with pytest.raises(moelb.InvalidArgumentError, match="not made from these tokens"):
        moelb.dispatch_by_assignment(batches[1], location, 0, assignment[0])
    with pytest.raises(moelb.InvalidArgumentError, match="assignment must be integers"):
        moelb.dispatch_by_assignment(batches[0], location, 0, assignment[0][:-1])
    with pytest.raises(moelb.InvalidArgumentError, match="layer=2 is outside"):
        moelb.dispatch_by_assignment(batches[0], location, 2, assignment[0])
    with pytest.raises(moelb.InvalidDTypeError, match="topk_ids must be an int32"):
        moelb.dispatch_by_assignment(batches[0].astype(np.int64), location, 0, assignment[0])
    bad = batches[0].copy()
    bad[0, 0] = 8
    with pytest.raises(moelb.InvalidArgumentError, match=r"topk_ids\[0, 0\] = 8"):
        moelb.dispatch_by_assignment(bad, location, 0, assignment[0])


@pytest.mark.parametrize("seed", range(6))
def test_fractions_are_the_split_per_replica(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    location = random_location(rng, 10, 4, 4, 2)
    counts = rng.integers(0, 50, (location.num_layers, 10))
    counts[:, 0] = 0  # an expert without tokens: equal shares
    fractions = moelb.balanced_fractions(counts, location)
    split = moelb.balanced_split(counts, location)
    l2p = location.logical_to_physical
    assert fractions.shape == l2p.shape
    for layer in range(location.num_layers):
        for e in range(10):
            slots = l2p[layer, e][l2p[layer, e] >= 0]
            row = fractions[layer, e, : len(slots)]
            assert (fractions[layer, e, len(slots) :] == 0).all()
            if counts[layer, e] == 0:
                np.testing.assert_allclose(row, 1 / len(slots))
            else:
                np.testing.assert_allclose(row * counts[layer, e], split[layer, slots])
        one = moelb.balanced_fractions(counts[layer], location, layer=layer)
        np.testing.assert_array_equal(one, fractions[layer])


def test_probabilities_mode_follows_the_fractions_and_its_seed() -> None:
    rng = np.random.default_rng(7)
    location = random_location(rng, 6, 4, 3, 2)
    ids = rng.integers(0, 6, (20000, 2)).astype(np.int32)
    ids[:5] = -1
    counts = np.bincount(ids[ids >= 0], minlength=6)
    fractions = moelb.balanced_fractions(counts, location, layer=1)
    out = moelb.dispatch_by_fractions(ids, location, 1, fractions, seed=5)
    again = moelb.dispatch_by_fractions(ids, location, 1, fractions, seed=5)
    other = moelb.dispatch_by_fractions(ids, location, 1, fractions, seed=6)
    np.testing.assert_array_equal(out, again)
    assert not np.array_equal(out, other)
    assert (out[:5] == -1).all()
    p2l = location.physical_to_logical[1]
    assert np.array_equal(p2l[out[out >= 0]], ids[ids >= 0])
    # Each replica's share of its expert's tokens within sampling error (5 sigma).
    l2p = location.logical_to_physical[1]
    per_slot = np.bincount(out[out >= 0], minlength=p2l.size)
    for e in range(6):
        for x, slot in enumerate(l2p[e][l2p[e] >= 0]):
            p = fractions[e, x]
            sigma = np.sqrt(counts[e] * p * (1 - p)) + 1
            assert abs(per_slot[slot] - counts[e] * p) <= 5 * sigma


def test_probabilities_mode_errors() -> None:
    rng = np.random.default_rng(8)
    location = random_location(rng, 6, 4, 3, 2)
    ids = rng.integers(0, 6, (10, 2)).astype(np.int32)
    fractions = moelb.balanced_fractions(np.full(6, 5), location, layer=0)
    with pytest.raises(moelb.InvalidArgumentError, match="fractions has shape"):
        moelb.dispatch_by_fractions(ids, location, 0, fractions[:, :1])
    bad = fractions.copy()
    bad[0, 0] = -0.5
    with pytest.raises(moelb.InvalidArgumentError, match="fractions must be finite"):
        moelb.dispatch_by_fractions(ids, location, 0, bad)
    zero = fractions.copy()
    zero[ids[0, 0]] = 0
    with pytest.raises(moelb.InvalidArgumentError, match="sum to 0 but it has tokens"):
        moelb.dispatch_by_fractions(ids, location, 0, zero)
