"""moelb's balanced dispatch across 4 real processes with torch.distributed (gloo on CPU).

Each process is an EP rank that routes its own tokens with ``select_experts(...,
dispatch="balanced", all_gather=moelb.torch_all_gather())`` (one all_gather of the per-rank counts
per layer; every rank computes the same assignment and sends its tokens by its row) and with
``dispatch="balanced_prob", all_reduce=moelb.torch_all_reduce()`` (one all_reduce; seeded picks
from the optimal fractions), and the V4 ``HashRouter`` in the exact mode; both routers also with
``dispatch="balanced_joint"`` (the routed replicas and the fused shared expert in one flow, one
all_gather of the [E + 1] counts, output in Waterfill's layout). The processes save the tokens
they sent to each slot; the tests compare the ranks' union with the single-process optimum
(``balanced_split`` / ``balanced_assignment`` of the summed counts, on the joint placement for
the joint mode) computed here.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import moelb
import numpy as np
import numpy.typing as npt
import pytest
from moelb import ExpertLocation, TopKConfig
from test_distributed import run_ranks

NUM_LAYERS, NUM_EXPERTS, EP_SIZE, NUM_NODES, SLOTS_PER_RANK = 2, 16, 4, 2, 6
NUM_PHYSICAL = EP_SIZE * SLOTS_PER_RANK
CONFIG = TopKConfig(top_k=4, scoring="softmax", num_fused_shared_experts=1)
PROB_TOKENS = 3000  # per rank: the probabilities mode is checked within its sampling error
VOCAB = 500


def location() -> ExpertLocation:
    """Every expert once, 8 more replicas of random experts, shuffled over the ranks and nodes
    differently per layer."""
    rng = np.random.default_rng(5)
    rows = [
        rng.permutation(np.concatenate([np.arange(NUM_EXPERTS), rng.integers(0, 16, 8)]))
        for _ in range(NUM_LAYERS)
    ]
    return ExpertLocation(np.array(rows, np.int32), NUM_EXPERTS, EP_SIZE, NUM_NODES)


def logits(rank: int, layer: int, num_tokens: int, salt: int = 0) -> npt.NDArray[np.float32]:
    """One rank's router logits: skewed towards a few experts, differently per layer and rank."""
    rng = np.random.default_rng([17, rank, layer, salt])
    skew = np.roll(np.linspace(3.0, 0.0, NUM_EXPERTS), 3 * layer + rank)
    return (rng.standard_normal((num_tokens, NUM_EXPERTS)) + skew).astype(np.float32)


def num_tokens(rank: int) -> int:
    return 150 + 37 * rank  # uneven batches


def num_non_padded(rank: int) -> int:
    return num_tokens(rank) - 3 * rank  # rank r pads its last 3r rows


def hash_router() -> moelb.HashRouter:
    rng = np.random.default_rng(9)
    table = np.stack([rng.choice(NUM_EXPERTS, 3, replace=False) for _ in range(VOCAB)])
    return moelb.HashRouter(table.astype(np.int32), num_fused_shared_experts=1)


def input_ids(rank: int) -> npt.NDArray[np.int64]:
    rng = np.random.default_rng([23, rank])
    return (rng.zipf(1.4, num_tokens(rank)) % VOCAB).astype(np.int64)


def per_slot(ids: npt.NDArray[np.int32]) -> npt.NDArray[np.int64]:
    return np.bincount(ids[ids >= 0], minlength=NUM_PHYSICAL)


def _worker(rank: int, world: int, workdir: str) -> None:
    """One EP rank (run in its own process by ``run_ranks``)."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    moelb.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{workdir}/store",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        result: dict[str, Any] = {}
        loc = location()
        all_gather, all_reduce = moelb.torch_all_gather(), moelb.torch_all_reduce()
        router = hash_router()
        for layer in range(NUM_LAYERS):
            out = moelb.select_experts(
                logits(rank, layer, num_tokens(rank)),
                CONFIG,
                None,
                num_non_padded(rank),
                loc,
                layer,
                rank,
                dispatch="balanced",
                all_gather=all_gather,
            )
            result[f"exact_ids_{layer}"] = out.topk_ids
            prob = moelb.select_experts(
                logits(rank, layer, PROB_TOKENS, salt=1),
                CONFIG,
                location=loc,
                layer=layer,
                ep_rank=rank,
                dispatch="balanced_prob",
                all_reduce=all_reduce,
                seed=11,
            )
            result[f"prob_ids_{layer}"] = prob.topk_ids
            hashed = router.select(
                logits(rank, layer, num_tokens(rank)),
                input_ids(rank),
                num_non_padded(rank),
                loc,
                layer,
                rank,
                dispatch="balanced",
                all_gather=all_gather,
            )
            result[f"hash_ids_{layer}"] = hashed.topk_ids
            waterfill = moelb.WaterfillBalancer(NUM_PHYSICAL, world, rank)
            joint = moelb.select_experts(
                logits(rank, layer, num_tokens(rank)),
                CONFIG,
                None,
                num_non_padded(rank),
                loc,
                layer,
                rank,
                dispatch="balanced_joint",
                all_gather=all_gather,
                waterfill=waterfill,
            )
            result[f"joint_ids_{layer}"] = joint.topk_ids
            result[f"joint_weights_{layer}"] = joint.topk_weights
            hashed_joint = router.select(
                logits(rank, layer, num_tokens(rank)),
                input_ids(rank),
                num_non_padded(rank),
                loc,
                layer,
                rank,
                dispatch="balanced_joint",
                all_gather=all_gather,
                waterfill=waterfill,
            )
            result[f"hash_joint_ids_{layer}"] = hashed_joint.topk_ids
            result[f"hash_joint_weights_{layer}"] = hashed_joint.topk_weights
        # A rank that passes another rank's ep_rank: the gathered row is not its counts; the
        # collective has completed on every rank, so each raises and none waits.
        try:
            moelb.select_experts(
                logits(rank, 0, num_tokens(rank)),
                CONFIG,
                location=loc,
                layer=0,
                ep_rank=(rank + 1) % world,
                dispatch="balanced",
                all_gather=all_gather,
            )
            result["wrong_rank_error"] = ""
        except moelb.InvalidArgumentError as error:
            result["wrong_rank_error"] = str(error)
        np.savez(Path(workdir) / f"rank{rank}.npz", **result)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Runs ``_worker`` in EP_SIZE processes; returns what each saved, by rank."""
    return run_ranks("test_distributed_dispatch", EP_SIZE, tmp_path_factory.mktemp("dispatch"))


def logical_counts(ids: list[npt.NDArray[np.int32]]) -> npt.NDArray[np.int64]:
    """[W, E]: each rank's (token, expert) pairs per logical expert."""
    return np.stack([np.bincount(x[x >= 0], minlength=NUM_EXPERTS) for x in ids])


def rank_loads(slots: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    return slots.reshape(EP_SIZE, SLOTS_PER_RANK).sum(axis=1)


def check_exact(cluster: list[dict[str, Any]], key: str, logical: list[Any], layer: int) -> None:
    """The ranks' union realises the single-process optimum; each rank sent its tokens by its
    row of the assignment computed here; routed ids are replicas of the logical ones; the fused
    shared column is P on valid rows."""
    loc = location()
    p2l = loc.physical_to_logical[layer]
    source = logical_counts([x.recorder_topk_ids for x in logical])
    assignment = moelb.balanced_assignment(source, loc, layer=layer)
    optimum = moelb.balanced_split(source.sum(axis=0), loc, layer=layer)
    union = np.zeros(NUM_PHYSICAL, np.int64)
    for rank, result in enumerate(cluster):
        ids = result[f"{key}_{layer}"]
        routed, plain = ids[:, : ids.shape[1] - 1], logical[rank].recorder_topk_ids
        np.testing.assert_array_equal(routed < 0, plain < 0)
        np.testing.assert_array_equal(p2l[routed[routed >= 0]], plain[plain >= 0])
        np.testing.assert_array_equal(ids[: num_non_padded(rank), -1], NUM_PHYSICAL)
        np.testing.assert_array_equal(per_slot(routed), assignment[rank])
        union += per_slot(routed)
    assert union.sum() == source.sum()
    assert rank_loads(union).max() == rank_loads(optimum).max()


def test_exact_mode_realises_the_single_process_optimum(cluster: list[dict[str, Any]]) -> None:
    for layer in range(NUM_LAYERS):
        logical = [
            moelb.select_experts(logits(r, layer, num_tokens(r)), CONFIG, None, num_non_padded(r))
            for r in range(EP_SIZE)
        ]
        check_exact(cluster, "exact_ids", logical, layer)


def test_hash_router_exact_mode(cluster: list[dict[str, Any]]) -> None:
    router = hash_router()
    for layer in range(NUM_LAYERS):
        logical = [
            router.select(logits(r, layer, num_tokens(r)), input_ids(r), num_non_padded(r))
            for r in range(EP_SIZE)
        ]
        check_exact(cluster, "hash_ids", logical, layer)


def check_joint(cluster: list[dict[str, Any]], key: str, logical: list[Any], layer: int) -> None:
    """The joint mode: each rank sent its routed and shared pairs by its row of the joint
    assignment computed here, the union has the joint optimum's largest rank load, the shared
    column sits in a shared slot on every non-padded row, and ids and weights are in Waterfill's
    layout (the weights those of ``WaterfillBalancer.expand`` on the same routed ids)."""
    loc = location()
    joint = moelb.per_rank_shared_location(loc)
    S1 = SLOTS_PER_RANK + 1
    p2l = loc.physical_to_logical[layer]
    routed_logical = [x.recorder_topk_ids for x in logical]
    source = np.stack(
        [
            np.append(np.bincount(x[x >= 0], minlength=NUM_EXPERTS), (x >= 0).any(axis=1).sum())
            for x in routed_logical
        ]
    )
    assignment = moelb.balanced_assignment(source, joint, layer=layer)
    optimum = moelb.balanced_split(source.sum(axis=0), joint, layer=layer)
    union = np.zeros(EP_SIZE * S1, np.int64)
    for rank, result in enumerate(cluster):
        ids, weights = result[f"{key}_ids_{layer}"], result[f"{key}_weights_{layer}"]
        per_slot_joint = np.bincount(ids[ids >= 0], minlength=EP_SIZE * S1)
        np.testing.assert_array_equal(per_slot_joint, assignment[rank])
        union += per_slot_joint
        routed, plain = ids[:, :-1], routed_logical[rank]
        np.testing.assert_array_equal(routed < 0, plain < 0)
        physical = np.where(routed >= 0, routed - routed // S1, -1).astype(np.int32)
        np.testing.assert_array_equal(p2l[physical[physical >= 0]], plain[plain >= 0])
        n = num_non_padded(rank)
        assert (ids[:n, -1] % S1 == SLOTS_PER_RANK).all() and (ids[n:] == -1).all()
        balancer = moelb.WaterfillBalancer(NUM_PHYSICAL, EP_SIZE, rank)
        routed_weights = np.ascontiguousarray(logical[rank].topk_weights[:, :-1])
        _, want = balancer.expand(physical, routed_weights)
        np.testing.assert_array_equal(weights, want)
    assert union.sum() == source.sum()
    loads = union.reshape(EP_SIZE, S1).sum(axis=1)
    assert loads.max() == optimum.reshape(EP_SIZE, S1).sum(axis=1).max()


def test_joint_mode_realises_the_single_process_joint_optimum(
    cluster: list[dict[str, Any]],
) -> None:
    router = hash_router()
    for layer in range(NUM_LAYERS):
        logical = [
            moelb.select_experts(logits(r, layer, num_tokens(r)), CONFIG, None, num_non_padded(r))
            for r in range(EP_SIZE)
        ]
        check_joint(cluster, "joint", logical, layer)
        hashed = [
            router.select(logits(r, layer, num_tokens(r)), input_ids(r), num_non_padded(r))
            for r in range(EP_SIZE)
        ]
        check_joint(cluster, "hash_joint", hashed, layer)


def test_probabilities_mode_within_rounding(cluster: list[dict[str, Any]]) -> None:
    loc = location()
    for layer in range(NUM_LAYERS):
        logical = [
            moelb.select_experts(logits(r, layer, PROB_TOKENS, salt=1), CONFIG).recorder_topk_ids
            for r in range(EP_SIZE)
        ]
        counts = logical_counts(logical).sum(axis=0)
        split = moelb.balanced_split(counts, loc, layer=layer)
        p2l = loc.physical_to_logical[layer]
        union = np.zeros(NUM_PHYSICAL, np.int64)
        for rank, result in enumerate(cluster):
            routed = result[f"prob_ids_{layer}"][:, :-1]
            np.testing.assert_array_equal(p2l[routed], logical[rank])
            union += per_slot(routed)
        # Systematic sampling: each rank gives each slot its share of the rank's tokens of the
        # expert rounded down or up, so the union is within one token per rank of the optimal
        # split (the max-flow's, which the per-step mode uses), per slot.
        assert (np.abs(union - split) < EP_SIZE).all(), (union, split)
        S = NUM_PHYSICAL // EP_SIZE
        assert (np.abs(rank_loads(union) - rank_loads(split)) < EP_SIZE * S).all()


def test_a_rank_out_of_order_is_refused_on_every_rank(cluster: list[dict[str, Any]]) -> None:
    for rank, result in enumerate(cluster):
        message = str(result["wrong_rank_error"])
        assert f"all_gather returned a row {(rank + 1) % EP_SIZE} (ep_rank)" in message, message
