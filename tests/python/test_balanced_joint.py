"""The joint mode (ours): the routed replicas and the fused shared expert balanced in one flow,
``dispatch_balanced_joint`` and ``select_experts`` / ``HashRouter.select`` with
``dispatch="balanced_joint"``. References written here: each rank's joint counts (routed per
expert plus its rows with a valid id), the optimum by Hall's condition over sets of ranks on the
joint placement (independent of the max-flow), per-rank loads recounted from the dispatched ids,
and Waterfill's layout from ``WaterfillBalancer.expand``."""

from __future__ import annotations

import moelb
import numpy as np
import pytest
from test_balanced_tokens import FakeGroup, engine_setup, hash_setup, random_location
from test_simulate import hall_optimum


def joint_counts(batches: list[np.ndarray], experts: int) -> np.ndarray:
    """[W, E + 1]: each rank's routed pairs per logical expert, then its rows with a valid id
    (one shared-expert token each)."""
    return np.stack(
        [
            np.append(np.bincount(b[b >= 0], minlength=experts), (b >= 0).any(axis=1).sum())
            for b in batches
        ]
    )


def padded_batches(rng: np.random.Generator, experts: int, ranks: int, tokens: int, top_k: int):
    """Each rank's logical ids [T, K] int32, skewed, with single -1 ids and whole -1 rows."""
    weights = rng.pareto(1.2, experts) + 0.05
    weights /= weights.sum()
    out = []
    for r in range(ranks):
        ids = rng.choice(experts, size=(tokens + 5 * r, top_k), p=weights).astype(np.int32)
        ids[rng.random(ids.shape) < 0.05] = -1
        ids[rng.random(len(ids)) < 0.1] = -1  # padding rows
        out.append(ids)
    return out


def gather_of(counts: np.ndarray):
    """An all_gather that returns the ranks' counts computed here (what every rank would see)."""
    return lambda buffer: counts.copy()


def to_routed_slot(joint_slot: np.ndarray, slots_per_rank: int) -> np.ndarray:
    """A slot of the per-rank shared-slot layout back to the routed slot of the placement."""
    return np.where(joint_slot >= 0, joint_slot - joint_slot // (slots_per_rank + 1), -1)


def test_per_rank_shared_location_layout() -> None:
    rng = np.random.default_rng(3)
    location = random_location(rng, 10, 4, 3, 2, layers=3)
    joint = moelb.per_rank_shared_location(location)
    assert (joint.num_logical_experts, joint.num_physical_experts) == (11, 16)
    assert (joint.ep_size, joint.num_nodes, joint.num_layers) == (4, 2, 3)
    p2l = joint.physical_to_logical
    np.testing.assert_array_equal(p2l[:, 3::4], 10)  # rank r's shared slot r * (S + 1) + S
    routed = np.delete(p2l, np.s_[3::4], axis=1)
    np.testing.assert_array_equal(routed, location.physical_to_logical)
    one = moelb.per_rank_shared_location(location, layer=2)
    assert one.num_layers == 1
    np.testing.assert_array_equal(one.physical_to_logical[0], p2l[2])
    # Slot p of the placement is p + p // S in the layout, as Waterfill and the remap have it.
    p = np.arange(12)
    np.testing.assert_array_equal(p2l[:, p + p // 3], location.physical_to_logical)
    with pytest.raises(moelb.InvalidArgumentError, match="location must be an ExpertLocation"):
        moelb.per_rank_shared_location(None)  # type: ignore[arg-type]
    with pytest.raises(moelb.InvalidArgumentError, match=r"layer=3 is outside"):
        moelb.per_rank_shared_location(location, layer=3)


@pytest.mark.parametrize("seed", range(10))
def test_dispatch_balanced_joint_realises_the_joint_optimum(seed: int) -> None:
    rng = np.random.default_rng(seed)
    ranks, nodes = [(4, 2), (6, 3), (8, 2), (5, 1)][seed % 4]
    experts, per_rank = 12, 3 + seed % 3
    location = random_location(rng, experts, ranks, per_rank, nodes)
    S = per_rank
    batches = padded_batches(rng, experts, ranks, tokens=30 + 9 * seed, top_k=3)
    counts = joint_counts(batches, experts)
    joint_all = moelb.per_rank_shared_location(location)
    for layer in range(location.num_layers):
        out = [
            moelb.dispatch_balanced_joint(
                batches[r], location, layer, ep_rank=r, all_gather=gather_of(counts)
            )
            for r in range(ranks)
        ]
        assignment = moelb.balanced_assignment(counts, joint_all, layer=layer)  # [W, W * (S + 1)]
        p2l = location.physical_to_logical[layer]
        union = np.zeros(ranks * (S + 1), np.int64)
        for r, (ids, batch) in enumerate(zip(out, batches, strict=True)):
            assert ids.shape == (len(batch), 4) and ids.dtype == np.int32
            # Each rank's pairs per slot, routed and shared, are its row of the assignment.
            per_slot = np.bincount(ids[ids >= 0], minlength=ranks * (S + 1))
            np.testing.assert_array_equal(per_slot, assignment[r])
            union += per_slot
            # Routed pairs on a replica of their expert; -1 stays -1.
            routed = ids[:, :3]
            np.testing.assert_array_equal(routed < 0, batch < 0)
            assert (routed[routed >= 0] % (S + 1) != S).all()  # never a shared slot
            plain = to_routed_slot(routed, S)
            np.testing.assert_array_equal(p2l[plain[plain >= 0]], batch[batch >= 0])
            # The shared column: a shared slot on rows with a valid id, -1 on padding rows.
            has_valid = (batch >= 0).any(axis=1)
            shared = ids[:, 3]
            np.testing.assert_array_equal(shared >= 0, has_valid)
            assert (shared[has_valid] % (S + 1) == S).all()
        # The union's largest rank load is the joint optimum: balanced_split's of the summed
        # counts, and Hall's bound on the joint placement computed here.
        loads = union.reshape(ranks, S + 1).sum(axis=1)
        split = moelb.balanced_split(counts.sum(axis=0), joint_all, layer=layer)
        assert loads.max() == split.reshape(ranks, S + 1).sum(axis=1).max()
        assert loads.max() == hall_optimum(counts.sum(axis=0), joint_all, layer)
        assert loads.sum() == counts.sum()


def test_joint_beats_or_ties_waterfill_after_the_balanced_split() -> None:
    """The joint optimum is never above SGLang's Waterfill placed after the balanced routed
    split (both place the same routed and shared pairs), and below it on some layer."""
    strictly_better = 0
    for seed in range(8):
        rng = np.random.default_rng(100 + seed)
        location = random_location(rng, 12, 4, 4, 2)
        S, P = 4, location.num_physical_experts
        batches = padded_batches(rng, 12, 4, tokens=80, top_k=3)
        counts = joint_counts(batches, 12)
        source = counts[:, :-1]
        for layer in range(location.num_layers):
            joint = [
                moelb.dispatch_balanced_joint(
                    batches[r], location, layer, ep_rank=r, all_gather=gather_of(counts)
                )
                for r in range(4)
            ]
            joint_max = np.bincount(np.concatenate([j[j >= 0] for j in joint]) // (S + 1)).max()
            assignment = moelb.balanced_assignment(source, location, layer=layer)
            balanced = [
                moelb.dispatch_by_assignment(batches[r], location, layer, assignment[r])
                for r in range(4)
            ]
            waterfill = moelb.waterfill_rank_loads(balanced, P, mode="dynamic")
            assert joint_max <= waterfill.load_waterfill.max()
            strictly_better += joint_max < waterfill.load_waterfill.max()
    assert strictly_better > 0


def test_dispatch_balanced_joint_errors() -> None:
    rng = np.random.default_rng(1)
    location = random_location(rng, 8, 2, 5, 1)
    ids = rng.integers(0, 8, (20, 2)).astype(np.int32)
    counts = joint_counts([ids, ids], 8)
    call = {"ep_rank": 0, "all_gather": gather_of(counts)}
    assert moelb.dispatch_balanced_joint(ids, location, 0, **call).shape == (20, 3)
    with pytest.raises(moelb.InvalidArgumentError, match="location must be an ExpertLocation"):
        moelb.dispatch_balanced_joint(ids, None, 0, **call)  # type: ignore[arg-type]
    with pytest.raises(moelb.InvalidArgumentError, match="dispatch='balanced_joint' needs all_ga"):
        moelb.dispatch_balanced_joint(ids, location, 0)
    with pytest.raises(moelb.InvalidArgumentError, match=r"all_gather must return .*\(2, 9\)"):
        moelb.dispatch_balanced_joint(ids, location, 0, all_gather=gather_of(counts[:, :-1]))
    with pytest.raises(moelb.InvalidArgumentError, match=r"row 1 \(ep_rank\) that is not this"):
        other = counts.copy()
        other[1, -1] += 1
        moelb.dispatch_balanced_joint(ids, location, 0, ep_rank=1, all_gather=gather_of(other))
    with pytest.raises(moelb.InvalidDTypeError, match="topk_ids must be an int32"):
        moelb.dispatch_balanced_joint(ids.astype(np.int64), location, 0, **call)
    with pytest.raises(moelb.InvalidArgumentError, match="ep_rank=2 is outside"):
        moelb.dispatch_balanced_joint(ids, location, 0, ep_rank=2, all_gather=gather_of(counts))
    with pytest.raises(moelb.InvalidArgumentError, match="call dispatch_balanced_joint"):
        moelb.dispatch_balanced(ids, location, 0, "balanced_joint", all_gather=gather_of(counts))
    assert "balanced_joint" in moelb.COLLECTIVE_DISPATCH
    assert "balanced_joint" not in moelb.DISPATCH_ALGORITHMS


# ---------------------------------------------------------------------------------------------
# The engine mode: ranks in threads with FakeGroup's collectives (test_balanced_tokens).


def never_called(buffer: np.ndarray) -> np.ndarray:
    raise AssertionError("this collective must not run")


@pytest.mark.parametrize("seed", range(4))
def test_select_experts_balanced_joint_in_waterfills_layout(seed: int) -> None:
    location, config, logits = engine_setup(seed, shared=1)
    W, P, K = location.ep_size, location.num_physical_experts, config.top_k
    S = location.num_local_physical_experts
    rsf = 2.5
    config = moelb.TopKConfig(
        top_k=K, scoring="softmax", num_fused_shared_experts=1, routed_scaling_factor=rsf
    )
    non_padded = [len(x) - r for r, x in enumerate(logits)]  # rank r pads its last r rows
    group = FakeGroup(W)
    for layer in range(location.num_layers):

        def route(r: int, dispatch: str, layer: int = layer):
            recorder = moelb.ExpertDistributionRecorder(location)
            recorder.start()
            # Dynamic Waterfill: its all_reduce runs under 'balanced', never under the joint mode.
            all_reduce = group.all_reduce(r) if dispatch == "balanced" else never_called
            waterfill = moelb.WaterfillBalancer(P, W, r, rsf, "dynamic", all_reduce)
            with recorder.forward_pass(), recorder.layer(layer):
                out = moelb.select_experts(
                    logits[r],
                    config,
                    None,
                    non_padded[r],
                    location,
                    layer,
                    r,
                    recorder,
                    dispatch=dispatch,
                    all_gather=group.all_gather(r),
                    waterfill=waterfill,
                    is_decode=False,
                    num_tokens=len(logits[r]),
                )
            return out, recorder.physical_count()[0, layer], waterfill.last_plan

        joint = group.run(lambda r: route(r, "balanced_joint"))
        balanced = group.run(lambda r: route(r, "balanced"))
        plain = [
            moelb.select_experts(x, config, None, n)
            for x, n in zip(logits, non_padded, strict=True)
        ]
        p2l = location.physical_to_logical[layer]
        counts = joint_counts([p.recorder_topk_ids for p in plain], location.num_logical_experts)
        assignment = moelb.balanced_assignment(
            counts, moelb.per_rank_shared_location(location, layer=layer), layer=0
        )
        union = np.zeros(W * (S + 1), np.int64)
        for r in range(W):
            (out, recorded, plan), (ref, _, ref_plan) = joint[r], balanced[r]
            assert plan is None and ref_plan is not None  # the joint mode ran no Waterfill plan
            # Waterfill's layout: same shape, same weights (routed ones and 1 / rsf), routed
            # ids of the same logical experts, the shared column in a shared slot on the same
            # rows.
            assert out.topk_ids.shape == ref.topk_ids.shape == (len(logits[r]), K + 1)
            np.testing.assert_array_equal(out.topk_weights, ref.topk_weights)
            assert (out.topk_weights[: non_padded[r], K] == np.float32(1 / rsf)).all()
            for ids in (out.topk_ids, ref.topk_ids):
                routed = to_routed_slot(ids[:, :K], S)
                np.testing.assert_array_equal(routed < 0, plain[r].recorder_topk_ids < 0)
                np.testing.assert_array_equal(
                    p2l[routed[routed >= 0]], plain[r].recorder_topk_ids[routed >= 0]
                )
                np.testing.assert_array_equal(ids[:, K] >= 0, np.arange(len(ids)) < non_padded[r])
                assert (ids[: non_padded[r], K] % (S + 1) == S).all()
            # The recorder counts the routed slots of the placement, as under 'balanced'.
            recorder_ids = out.recorder_topk_ids
            np.testing.assert_array_equal(recorder_ids, to_routed_slot(out.topk_ids[:, :K], S))
            np.testing.assert_array_equal(
                recorded, np.bincount(recorder_ids[recorder_ids >= 0], minlength=P)
            )
            per_slot = np.bincount(out.topk_ids[out.topk_ids >= 0], minlength=W * (S + 1))
            np.testing.assert_array_equal(per_slot, assignment[r])
            union += per_slot
        joint_loads = union.reshape(W, S + 1).sum(axis=1)
        joint_all = moelb.per_rank_shared_location(location)
        assert joint_loads.max() == hall_optimum(counts.sum(axis=0), joint_all, layer)
        ref_ids = np.concatenate([ref.topk_ids.ravel() for ref, _, _ in balanced])
        ref_loads = np.bincount(ref_ids[ref_ids >= 0] // (S + 1), minlength=W)
        assert joint_loads.sum() == ref_loads.sum()
        assert joint_loads.max() <= ref_loads.max()


def test_hash_router_balanced_joint() -> None:
    location, router, logits, input_ids = hash_setup(7)
    W, P = location.ep_size, location.num_physical_experts
    S = location.num_local_physical_experts
    group = FakeGroup(W)
    for layer in range(location.num_layers):

        def route(r: int, dispatch: str, layer: int = layer) -> moelb.TopKOutput:
            return router.select(
                logits[r],
                input_ids[r],
                len(logits[r]) - 2,
                location,
                layer,
                r,
                dispatch=dispatch,
                all_gather=group.all_gather(r),
                waterfill=moelb.WaterfillBalancer(P, W, r, router.routed_scaling_factor),
            )

        joint = group.run(lambda r: route(r, "balanced_joint"))
        balanced = group.run(lambda r: route(r, "balanced"))
        plain = [router.select(x, i, len(x) - 2) for x, i in zip(logits, input_ids, strict=True)]
        counts = joint_counts([p.recorder_topk_ids for p in plain], 12)
        joint_location = moelb.per_rank_shared_location(location, layer=layer)
        assignment = moelb.balanced_assignment(counts, joint_location, layer=0)
        union = np.zeros(W * (S + 1), np.int64)
        for r, (out, ref) in enumerate(zip(joint, balanced, strict=True)):
            np.testing.assert_array_equal(out.topk_weights, ref.topk_weights)
            np.testing.assert_array_equal(out.topk_ids[-2:], -1)
            assert (out.topk_ids[:-2, 3] % (S + 1) == S).all()
            logical = location.physical_to_logical[layer][out.recorder_topk_ids[:-2]]
            np.testing.assert_array_equal(logical, plain[r].recorder_topk_ids[:-2])
            per_slot = np.bincount(out.topk_ids[out.topk_ids >= 0], minlength=W * (S + 1))
            np.testing.assert_array_equal(per_slot, assignment[r])
            union += per_slot
        optimum = hall_optimum(counts.sum(axis=0), joint_location, 0)
        assert union.reshape(W, S + 1).sum(axis=1).max() == optimum


def one_rank_setup():
    location = moelb.ExpertLocation.trivial(2, 8, 12, ep_size=2, num_nodes=1)
    logits = np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32)
    config = moelb.TopKConfig(top_k=2, num_fused_shared_experts=1)
    return location, config, logits


def gather_as_rank0(buffer: np.ndarray) -> np.ndarray:
    return np.stack([buffer, np.zeros_like(buffer)])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"waterfill": None}, r"dispatch='balanced_joint' needs waterfill="),
        ({"all_gather": None}, r"dispatch='balanced_joint' needs all_gather="),
        ({"all_reduce": never_called}, r"takes all_gather=, not all_reduce="),
        ({"shared": 0}, r"needs num_fused_shared_experts=1, got 0"),
        ({"waterfill": "other rank"}, r"waterfill has ep_size=2, ep_rank=1 but .* as ep_rank=0"),
        ({"waterfill": "other size"}, r"waterfill has ep_size=4, .*location's ep_size=2"),
        ({"waterfill": "other slots"}, r"waterfill has num_physical_experts=8"),
        ({"location": None}, r"needs location="),
    ],
)
@pytest.mark.parametrize("router", ["select_experts", "hash"])
def test_balanced_joint_argument_errors(kwargs: dict, match: str, router: str) -> None:
    location, config, logits = one_rank_setup()
    balancers = {
        "other rank": moelb.WaterfillBalancer(12, 2, 1),
        "other size": moelb.WaterfillBalancer(12, 4, 0),
        "other slots": moelb.WaterfillBalancer(8, 2, 0),
    }
    kwargs = dict(kwargs)
    shared = kwargs.pop("shared", 1)
    if isinstance(kwargs.get("waterfill"), str):
        kwargs["waterfill"] = balancers[kwargs["waterfill"]]
    call = {
        "location": location,
        "layer": 0,
        "ep_rank": 0,
        "dispatch": "balanced_joint",
        "all_gather": never_called,
        "waterfill": moelb.WaterfillBalancer(12, 2, 0),
    } | kwargs
    with pytest.raises(moelb.InvalidArgumentError, match=match):
        if router == "hash":
            table = np.arange(16, dtype=np.int32).reshape(8, 2) % 8
            hash_router = moelb.HashRouter(table, num_fused_shared_experts=shared)
            hash_router.select(logits, np.arange(20) % 8, **call)
        else:
            config = moelb.TopKConfig(top_k=2, num_fused_shared_experts=shared)
            moelb.select_experts(logits, config, **call)


def test_an_empty_batch_still_joins_the_joint_collective() -> None:
    location, config, logits = one_rank_setup()
    calls: list[np.ndarray] = []

    def gather(buffer: np.ndarray) -> np.ndarray:
        calls.append(buffer.copy())
        return gather_as_rank0(buffer)

    for rows, non_padded in ((0, None), (5, 0)):  # no rows; rows that are all padding
        out = moelb.select_experts(
            logits[:rows],
            config,
            None,
            non_padded,
            location,
            0,
            0,
            dispatch="balanced_joint",
            all_gather=gather,
            waterfill=moelb.WaterfillBalancer(12, 2, 0),
        )
        assert out.topk_ids.shape == (rows, 3) and (out.topk_ids == -1).all()
        assert (out.topk_weights == 0).all()
    assert len(calls) == 2 and all((c == 0).all() and c.shape == (9,) for c in calls)
