"""The balanced split at token level: this rank's tokens dispatched by its row of
balanced_assignment (exact mode), or by per-replica fractions of balanced_split with seeded
per-token picks (probabilities mode); and the engine modes built on them, select_experts /
HashRouter.select with dispatch="balanced" (an all_gather) or "balanced_prob" (an all_reduce), run
by several ranks in threads with in-process collectives. References written here: per-rank loads
recounted from the dispatched ids, fractions rebuilt from balanced_split's slots, the
single-process optimum of the summed counts."""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor

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
    split = moelb.balanced_split(counts, location, shares="even")
    np.testing.assert_array_equal(
        moelb.balanced_fractions(counts, location, shares="any") * 0,  # the same shape and zeros
        fractions * 0,
    )
    any_split = moelb.balanced_split(counts, location)
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
                vertex = moelb.balanced_fractions(counts, location, shares="any")[layer, e]
                np.testing.assert_allclose(
                    vertex[: len(slots)] * counts[layer, e], any_split[layer, slots]
                )
        one = moelb.balanced_fractions(counts[layer], location, layer=layer)
        np.testing.assert_array_equal(one, fractions[layer])


def test_probabilities_mode_follows_the_fractions_and_its_seed() -> None:
    rng = np.random.default_rng(7)
    location = random_location(rng, 6, 4, 3, 2)
    ids = rng.integers(0, 6, (20000, 2)).astype(np.int32)
    ids[:5] = -1
    counts = np.bincount(ids[ids >= 0], minlength=6)
    fractions = moelb.balanced_fractions(counts, location, layer=1)
    out = moelb.dispatch_by_fractions(ids, location, 1, fractions, seed=5, sampling="independent")
    again = moelb.dispatch_by_fractions(ids, location, 1, fractions, seed=5, sampling="independent")
    other = moelb.dispatch_by_fractions(ids, location, 1, fractions, seed=6, sampling="independent")
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


def test_systematic_sampling_rounds_each_share_and_keeps_each_pairs_probability() -> None:
    rng = np.random.default_rng(17)
    location = random_location(rng, 6, 4, 3, 2)
    l2p = location.logical_to_physical[1]
    p2l = location.physical_to_logical[1]
    ids = rng.integers(0, 6, (3000, 2)).astype(np.int32)
    ids[:7, 1] = -1
    counts = np.bincount(ids[ids >= 0], minlength=6)
    # Shares that are not multiples of 1 / count, some replica without tokens.
    fractions = np.where(l2p >= 0, rng.random(l2p.shape) + 0.05, 0.0)
    fractions[0, 0] = 0.0
    fractions /= fractions.sum(axis=1, keepdims=True)
    hits = np.zeros((*ids.shape, location.num_physical_experts))
    for seed in range(200):
        out = moelb.dispatch_by_fractions(ids, location, 1, fractions, seed=seed)
        assert (out[ids < 0] == -1).all()
        assert np.array_equal(p2l[out[ids >= 0]], ids[ids >= 0])
        # Every replica's count is its share of the expert's pairs, rounded down or up.
        per_slot = np.bincount(out[out >= 0], minlength=p2l.size)
        for e in range(6):
            for x, slot in enumerate(l2p[e][l2p[e] >= 0]):
                share = counts[e] * fractions[e, x]
                assert math.floor(share) <= per_slot[slot] <= math.ceil(share), (e, x, seed)
        rows, cols = np.nonzero(ids >= 0)
        hits[rows, cols, out[rows, cols]] += 1
    # Each pair still goes to each replica with its probability (over seeds; 5 sigma).
    for row, col in [(0, 0), (10, 1), (2999, 0)]:
        e = ids[row, col]
        for x, slot in enumerate(l2p[e][l2p[e] >= 0]):
            p = fractions[e, x]
            sigma = math.sqrt(200 * p * (1 - p)) + 1
            assert abs(hits[row, col, slot] - 200 * p) <= 5 * sigma
    with pytest.raises(moelb.InvalidArgumentError, match="sampling must be"):
        moelb.dispatch_by_fractions(ids, location, 1, fractions, sampling="stratified")


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


# ---------------------------------------------------------------------------------------------
# The engine modes: select_experts / HashRouter.select with dispatch="balanced" (all_gather) or
# "balanced_prob" (all_reduce). Each rank runs in its own thread; FakeGroup's collectives meet at a
# barrier, as a process group's would, so the ranks exchange their counts in the middle of routing.


class FakeGroup:
    """In-process collectives over ``size`` ranks (threads): ``all_gather(rank)`` and
    ``all_reduce(rank)`` return the callables rank ``rank`` hands to select_experts."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.barrier = threading.Barrier(size, timeout=30)
        self.slots: list[np.ndarray | None] = [None] * size
        self.calls = 0

    def all_gather(self, rank: int):
        def gather(buffer: np.ndarray) -> np.ndarray:
            assert buffer.dtype == np.int64 and buffer.ndim == 1
            self.slots[rank] = np.array(buffer, copy=True)
            self.barrier.wait()
            out = np.stack(self.slots)
            self.calls += rank == 0
            self.barrier.wait()  # every rank has read the slots before the next call
            return out

        return gather

    def all_reduce(self, rank: int):
        gather = self.all_gather(rank)
        return lambda buffer: gather(buffer).sum(axis=0)

    def run(self, work):
        """work(rank) on every rank at once; its results in rank order."""
        with ThreadPoolExecutor(self.size) as pool:
            return list(pool.map(work, range(self.size)))


def engine_setup(seed: int, shared: int = 1):
    rng = np.random.default_rng(seed)
    ranks, nodes = [(4, 2), (6, 3), (8, 2)][seed % 3]
    experts = 14
    location = random_location(rng, experts, ranks, 4 + seed % 2, nodes)
    config = moelb.TopKConfig(top_k=3, scoring="softmax", num_fused_shared_experts=shared)
    skew = np.linspace(2.0, 0.0, experts)[rng.permutation(experts)]
    logits = [
        (rng.standard_normal((60 + 13 * r, experts)) + skew).astype(np.float32)
        for r in range(ranks)
    ]
    return location, config, logits


def union_rank_loads(outs, location: moelb.ExpertLocation) -> np.ndarray:
    return rank_loads_of([o.recorder_topk_ids for o in outs], location)


def optimum_rank_loads(logical: list[np.ndarray], location, layer: int) -> np.ndarray:
    """Per-rank loads of the single-process optimum of the summed counts."""
    E = location.num_logical_experts
    counts = sum(np.bincount(ids[ids >= 0], minlength=E) for ids in logical)
    split = moelb.balanced_split(counts, location, layer=layer)
    return split.reshape(location.ep_size, -1).sum(axis=1)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("shared", [0, 1])
def test_select_experts_balanced_realises_the_optimum(seed: int, shared: int) -> None:
    location, config, logits = engine_setup(seed, shared)
    W, P, K = location.ep_size, location.num_physical_experts, config.top_k
    group = FakeGroup(W)
    non_padded = [len(x) - r for r, x in enumerate(logits)]  # rank r pads its last r rows
    for layer in range(location.num_layers):

        def route(r: int, layer: int = layer) -> moelb.TopKOutput:
            return moelb.select_experts(
                logits[r],
                config,
                None,
                non_padded[r],
                location,
                layer,
                r,
                dispatch="balanced",
                all_gather=group.all_gather(r),
            )

        outs = group.run(route)
        plain = [
            moelb.select_experts(x, config, None, n)
            for x, n in zip(logits, non_padded, strict=True)
        ]
        p2l = location.physical_to_logical[layer]
        for r, (out, ref) in enumerate(zip(outs, plain, strict=True)):
            routed = out.topk_ids[:, :K]
            np.testing.assert_array_equal(routed, out.recorder_topk_ids)
            np.testing.assert_array_equal(routed < 0, ref.recorder_topk_ids < 0)
            valid = routed >= 0
            np.testing.assert_array_equal(p2l[routed[valid]], ref.recorder_topk_ids[valid])
            np.testing.assert_array_equal(out.topk_weights, ref.topk_weights)
            if shared:  # the fused shared column: id P, as with the engines' models
                np.testing.assert_array_equal(out.topk_ids[: non_padded[r], K], P)
                np.testing.assert_array_equal(out.topk_ids[non_padded[r] :], -1)
            else:
                assert out.topk_ids.shape[1] == K
        logical = [p.recorder_topk_ids for p in plain]
        # The union realises the optimum's largest rank load, and exactly the assignment every
        # rank computed from the gathered counts.
        assert (
            union_rank_loads(outs, location).max()
            == optimum_rank_loads(logical, location, layer).max()
        )
        source = np.stack([np.bincount(x[x >= 0], minlength=14) for x in logical])
        assignment = moelb.balanced_assignment(source, location, layer=layer)
        for r, out in enumerate(outs):
            ids = out.recorder_topk_ids
            np.testing.assert_array_equal(np.bincount(ids[ids >= 0], minlength=P), assignment[r])
    assert group.calls == location.num_layers  # one all_gather per layer and step


def test_select_experts_balanced_prob_follows_the_optimal_fractions() -> None:
    rng = np.random.default_rng(41)
    location = random_location(rng, 10, 4, 4, 2)
    W, P, E = 4, location.num_physical_experts, 10
    config = moelb.TopKConfig(top_k=2, scoring="softmax", num_fused_shared_experts=1)
    skew = np.linspace(1.5, 0.0, E)
    logits = [(rng.standard_normal((3000, E)) + skew).astype(np.float32) for _ in range(W)]
    logits[3] = logits[2].copy()  # same tokens on two ranks: their draws still differ
    group = FakeGroup(W)

    def route(layer: int, seed: int) -> list[moelb.TopKOutput]:
        def one(r: int) -> moelb.TopKOutput:
            return moelb.select_experts(
                logits[r],
                config,
                location=location,
                layer=layer,
                ep_rank=r,
                dispatch="balanced_prob",
                all_reduce=group.all_reduce(r),
                seed=seed,
            )

        return group.run(one)

    for layer in range(location.num_layers):
        outs = route(layer, seed=9)
        plain = [moelb.select_experts(x, config).recorder_topk_ids for x in logits]
        p2l = location.physical_to_logical[layer]
        for out, ref in zip(outs, plain, strict=True):
            np.testing.assert_array_equal(p2l[out.recorder_topk_ids], ref)
            np.testing.assert_array_equal(out.topk_ids[:, 2], P)
        assert not np.array_equal(outs[2].recorder_topk_ids, outs[3].recorder_topk_ids)
        again = route(layer, seed=9)
        other = route(layer, seed=10)
        for a, b in zip(outs, again, strict=True):
            np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        assert any(
            not np.array_equal(a.topk_ids, c.topk_ids) for a, c in zip(outs, other, strict=True)
        )
        # Each slot's share of its expert's tokens, and each rank's load, within rounding of the
        # optimal split of the summed counts (the max-flow's, which the per-step mode uses):
        # systematic sampling gives each slot its share of each rank's tokens of the expert
        # rounded down or up.
        counts = sum(np.bincount(x.ravel(), minlength=E) for x in plain)
        split = moelb.balanced_split(counts, location, layer=layer)
        per_slot = np.bincount(
            np.concatenate([o.recorder_topk_ids.ravel() for o in outs]), minlength=P
        )
        assert (np.abs(per_slot - split) < W).all(), (per_slot, split)
        S = location.num_local_physical_experts
        rank_error = np.abs(per_slot.reshape(W, S).sum(1) - split.reshape(W, S).sum(1))
        assert (rank_error < W * S).all()


def hash_setup(seed: int):
    rng = np.random.default_rng(seed)
    location = random_location(rng, 12, 4, 4, 2)
    table = np.stack([rng.choice(12, 3, replace=False) for _ in range(200)]).astype(np.int32)
    router = moelb.HashRouter(table, num_fused_shared_experts=1, routed_scaling_factor=2.5)
    logits = [rng.standard_normal((70 + 9 * r, 12)).astype(np.float32) for r in range(4)]
    input_ids = [(rng.zipf(1.3, len(x)) % 200).astype(np.int64) for x in logits]
    return location, router, logits, input_ids


@pytest.mark.parametrize("dispatch", ["balanced", "balanced_prob"])
def test_hash_router_balanced_modes(dispatch: str) -> None:
    location, router, logits, input_ids = hash_setup(5)
    W, P = location.ep_size, location.num_physical_experts
    group = FakeGroup(W)
    collective = "all_gather" if dispatch == "balanced" else "all_reduce"
    for layer in range(location.num_layers):

        def route(r: int, layer: int = layer) -> moelb.TopKOutput:
            return router.select(
                logits[r],
                input_ids[r],
                len(logits[r]) - 2,
                location,
                layer,
                r,
                dispatch=dispatch,
                **{collective: getattr(group, collective)(r)},
            )

        outs = group.run(route)
        plain = [router.select(x, i, len(x) - 2) for x, i in zip(logits, input_ids, strict=True)]
        p2l = location.physical_to_logical[layer]
        for out, ref in zip(outs, plain, strict=True):
            ids = out.recorder_topk_ids
            np.testing.assert_array_equal(ids < 0, ref.recorder_topk_ids < 0)
            np.testing.assert_array_equal(p2l[ids[ids >= 0]], ref.recorder_topk_ids[ids >= 0])
            np.testing.assert_array_equal(out.topk_ids[:, :3], ids)
            np.testing.assert_array_equal(out.topk_ids[:-2, 3], P)
            np.testing.assert_array_equal(out.topk_ids[-2:], -1)
            np.testing.assert_array_equal(out.topk_weights, ref.topk_weights)
        if dispatch == "balanced":
            logical = [p.recorder_topk_ids for p in plain]
            assert (
                union_rank_loads(outs, location).max()
                == optimum_rank_loads(logical, location, layer).max()
            )


@pytest.mark.parametrize("dispatch", ["balanced", "balanced_prob"])
def test_balanced_modes_with_the_recorder_and_waterfill(dispatch: str) -> None:
    """The recorder counts the physical routed ids the balanced dispatch chose; Waterfill widens
    them afterwards exactly as it widens any dispatch's ids."""
    location, config, logits = engine_setup(2, shared=1)
    W, P = location.ep_size, location.num_physical_experts
    group = FakeGroup(W)
    collective = "all_gather" if dispatch == "balanced" else "all_reduce"

    def work(r: int):
        recorder = moelb.ExpertDistributionRecorder(location)
        recorder.start()
        waterfill = moelb.WaterfillBalancer(P, W, r, routed_scaling_factor=1.0)
        outs = []
        with recorder.forward_pass():
            for layer in range(location.num_layers):
                with recorder.layer(layer):
                    out = moelb.select_experts(
                        logits[r],
                        config,
                        location=location,
                        layer=layer,
                        ep_rank=r,
                        recorder=recorder,
                        waterfill=waterfill,
                        dispatch=dispatch,
                        seed=2,
                        **{collective: getattr(group, collective)(r)},
                    )
                    outs.append(out)
        return recorder.physical_count()[0], outs

    for r, (counts, outs) in enumerate(group.run(work)):
        for layer, out in enumerate(outs):
            ids = out.recorder_topk_ids
            np.testing.assert_array_equal(counts[layer], np.bincount(ids.ravel(), minlength=P))
            # Waterfill after the balanced dispatch: its expand of the same routed ids.
            balancer = moelb.WaterfillBalancer(P, W, r, routed_scaling_factor=1.0)
            plain = moelb.select_experts(logits[r], config)
            want_ids, want_weights = balancer.expand(
                ids, np.ascontiguousarray(plain.topk_weights[:, : config.top_k])
            )
            np.testing.assert_array_equal(out.topk_ids, want_ids)
            np.testing.assert_array_equal(out.topk_weights, want_weights)


def one_rank_setup():
    location = moelb.ExpertLocation.trivial(2, 8, 12, ep_size=2, num_nodes=1)
    logits = np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32)
    return location, moelb.TopKConfig(top_k=2), logits


def gather_as_rank0(other: np.ndarray | None = None):
    """An all_gather for rank 0 of 2 whose rank 1 holds ``other`` (default zeros)."""
    return lambda buffer: np.stack([buffer, np.zeros_like(buffer) if other is None else other])


def never_called(buffer: np.ndarray) -> np.ndarray:
    raise AssertionError("the collective must not run when the arguments are refused")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dispatch": "balanced"}, r"dispatch='balanced' needs all_gather="),
        ({"dispatch": "balanced_prob"}, r"dispatch='balanced_prob' needs all_reduce="),
        ({"dispatch": "balanced", "all_reduce": never_called}, "takes all_gather=, not all_red"),
        ({"dispatch": "balanced_prob", "all_gather": never_called}, "takes all_reduce=, not all"),
        ({"all_gather": never_called}, r"all_gather is given but dispatch='sglang_static' runs"),
        ({"dispatch": "vllm_hash", "all_reduce": never_called}, r"all_reduce is given but"),
        ({"dispatch": "balanced", "all_gather": 3}, r"all_gather must be callable, got int"),
        ({"dispatch": "balanced", "all_gather": never_called, "location": None}, "needs locati"),
        ({"dispatch": "balanced", "all_gather": never_called, "layer": None}, "layer is required"),
        ({"dispatch": "balanced", "all_gather": never_called, "layer": 2}, r"layer=2 is outside"),
        ({"dispatch": "balanced", "all_gather": never_called, "ep_rank": 2}, r"ep_rank=2 is outsi"),
        ({"dispatch": "balanced_prob", "all_reduce": never_called, "seed": -1}, "seed"),
    ],
)
@pytest.mark.parametrize("router", ["select_experts", "hash"])
def test_balanced_mode_argument_errors(kwargs: dict, match: str, router: str) -> None:
    location, config, logits = one_rank_setup()
    call = {"location": location, "layer": 0, "ep_rank": 0} | kwargs
    with pytest.raises(moelb.InvalidArgumentError, match=match):
        if router == "hash":
            table = np.arange(16, dtype=np.int32).reshape(8, 2) % 8
            moelb.HashRouter(table).select(logits, np.arange(20) % 8, **call)
        else:
            moelb.select_experts(logits, config, **call)


def test_balanced_mode_needs_logits_of_the_location_experts() -> None:
    location, config, _ = one_rank_setup()
    logits = np.zeros((4, 16), dtype=np.float32)
    with pytest.raises(moelb.InvalidArgumentError, match="num_logical_experts=8"):
        moelb.select_experts(
            logits,
            config,
            location=location,
            layer=0,
            dispatch="balanced",
            all_gather=never_called,
        )


@pytest.mark.parametrize(
    ("all_gather", "match"),
    [
        (lambda b: None, r"all_gather must return .* got None"),
        (lambda b: b, r"all_gather must return .*\(2, 8\), got int64 of shape \(8,\)"),
        (lambda b: np.stack([b, b]).astype(np.float32), r"got float32 of shape \(2, 8\)"),
        (lambda b: np.stack([b, -np.ones_like(b)]), "all_gather returned a negative count"),
        (lambda b: np.stack([np.zeros_like(b), b]), r"row 0 \(ep_rank\) that is not this rank"),
    ],
)
def test_all_gather_output_is_checked(all_gather, match: str) -> None:
    location, config, logits = one_rank_setup()
    with pytest.raises(moelb.InvalidArgumentError, match=match):
        moelb.select_experts(
            logits,
            config,
            location=location,
            layer=1,
            dispatch="balanced",
            all_gather=all_gather,
        )


@pytest.mark.parametrize(
    ("all_reduce", "match"),
    [
        (lambda b: b[:-1], r"all_reduce must return the counts summed over ranks: .*\(8,\)"),
        (lambda b: b.astype(np.float64), r"got float64"),
        (lambda b: b - 1, "all_reduce returned a negative count|this rank alone has"),
        (lambda b: b // 2, r"this rank alone has .*: it must return the sum over the ranks"),
    ],
)
def test_all_reduce_output_is_checked(all_reduce, match: str) -> None:
    location, config, logits = one_rank_setup()
    with pytest.raises(moelb.InvalidArgumentError, match=match):
        moelb.select_experts(
            logits,
            config,
            location=location,
            layer=1,
            dispatch="balanced_prob",
            all_reduce=all_reduce,
        )


def test_collectives_may_return_tensors_or_sum_in_place() -> None:
    torch = pytest.importorskip("torch")
    location, config, logits = one_rank_setup()
    other = np.arange(8, dtype=np.int64)
    gathered = moelb.select_experts(
        logits,
        config,
        location=location,
        layer=1,
        dispatch="balanced",
        all_gather=lambda b: torch.from_numpy(np.stack([b, other])),
    )
    numpy = moelb.select_experts(
        logits,
        config,
        location=location,
        layer=1,
        dispatch="balanced",
        all_gather=gather_as_rank0(other),
    )
    np.testing.assert_array_equal(gathered.topk_ids, numpy.topk_ids)

    def in_place(buffer: np.ndarray) -> None:
        buffer += other

    summed = moelb.select_experts(
        logits,
        config,
        location=location,
        layer=1,
        dispatch="balanced_prob",
        all_reduce=in_place,
        seed=4,
    )
    returned = moelb.select_experts(
        logits,
        config,
        location=location,
        layer=1,
        dispatch="balanced_prob",
        all_reduce=lambda b: torch.from_numpy(b + other),
        seed=4,
    )
    np.testing.assert_array_equal(summed.topk_ids, returned.topk_ids)


def test_dispatch_balanced_directly() -> None:
    """The collective step alone, for an engine that routes by itself."""
    location, config, logits = one_rank_setup()
    ids = moelb.select_experts(logits, config).recorder_topk_ids
    other = np.array([5, 0, 0, 9, 0, 0, 3, 1], np.int64)
    out = moelb.dispatch_balanced(ids, location, 0, ep_rank=0, all_gather=gather_as_rank0(other))
    source = np.stack([np.bincount(ids.ravel(), minlength=8), other])
    row = moelb.balanced_assignment(source, location, layer=0)[0]
    np.testing.assert_array_equal(np.bincount(out.ravel(), minlength=12), row)
    with pytest.raises(moelb.InvalidArgumentError, match="not one of moelb's collective modes"):
        moelb.dispatch_balanced(ids, location, 0, "sglang_static", all_gather=never_called)
    with pytest.raises(moelb.InvalidArgumentError, match="location must be an ExpertLocation"):
        moelb.dispatch_balanced(ids, None, 0, all_gather=never_called)  # type: ignore[arg-type]
    with pytest.raises(moelb.InvalidDTypeError, match="topk_ids must be an int32"):
        moelb.dispatch_balanced(ids.astype(np.int64), location, 0, all_gather=never_called)
    assert "balanced" in moelb.COLLECTIVE_DISPATCH and "balanced" not in moelb.DISPATCH_ALGORITHMS


@pytest.mark.parametrize("dispatch", ["balanced", "balanced_prob"])
def test_an_empty_batch_still_joins_the_collective(dispatch: str) -> None:
    location, config, logits = one_rank_setup()
    calls: list[np.ndarray] = []
    other = np.arange(8, dtype=np.int64)

    def gather(buffer: np.ndarray) -> np.ndarray:
        calls.append(buffer.copy())
        return np.stack([buffer, other])

    def reduce(buffer: np.ndarray) -> np.ndarray:
        calls.append(buffer.copy())
        return buffer + other

    collective = {"all_gather": gather} if dispatch == "balanced" else {"all_reduce": reduce}
    for rows, non_padded in ((0, None), (5, 0)):  # no rows; rows that are all padding
        out = moelb.select_experts(
            logits[:rows], config, None, non_padded, location, 0, 0, dispatch=dispatch, **collective
        )
        assert out.topk_ids.shape == (rows, 2) and (out.topk_ids == -1).all()
    assert len(calls) == 2 and all((c == 0).all() and c.shape == (8,) for c in calls)


def test_layer_must_be_an_int_everywhere() -> None:
    """A bool or a float is not a layer (True was read as layer 1 by balanced_split)."""
    rng = np.random.default_rng(9)
    location = random_location(rng, 6, 4, 3, 2)
    counts = np.full(6, 4)
    for bad in (True, 1.0, "1"):
        with pytest.raises(moelb.InvalidArgumentError, match="layer must be an int"):
            moelb.balanced_split(counts, location, layer=bad)
        with pytest.raises(moelb.InvalidArgumentError, match="layer must be an int"):
            moelb.balanced_assignment(np.tile(counts, (4, 1)), location, layer=bad)
    np.testing.assert_array_equal(
        moelb.balanced_split(counts, location, layer=np.int64(1)),
        moelb.balanced_split(counts, location, layer=1),
    )
