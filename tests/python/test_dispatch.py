"""Dispatch models against independent re-implementations written here from
reference/dispatch.md (sections 2-4, 6) and routing_waterfill.md section 7.2. SGLang's tables use
Python's own ``random.Random(42)``, ``sample`` and ``shuffle``, so they must match bit for bit."""

from __future__ import annotations

import random

import moelb
import numpy as np
import pytest
from moelb import ExpertLocation, InvalidArgumentError

# ------------------------------------------------------------------------------------------------
# The reference, from the spec.


def nearest(candidates: list[int], rank: int, S: int, ranks_per_node: int) -> int:
    """SGLang's _find_nearest_expert with same-node preference."""
    if len(candidates) == 1:
        return candidates[0]
    for p in candidates:
        if p // S == rank:
            return p
    node = rank // ranks_per_node
    same = [p for p in candidates if p // (S * ranks_per_node) == node]
    if same and len(same) < len(candidates):
        return same[0]
    return -1


def lists_of(location: ExpertLocation, order: np.ndarray | None = None) -> list[list[list[int]]]:
    p2l = location.physical_to_logical
    L, P = p2l.shape
    E = location.num_logical_experts
    if order is not None:
        return [[[int(p) for p in order[i, e] if p >= 0] for e in range(E)] for i in range(L)]
    return [[[p for p in range(P) if p2l[i, p] == e] for e in range(E)] for i in range(L)]


def collapse(lists: list[list[list[int]]], rank: int, S: int, rpn: int) -> list[list[list[int]]]:
    out = []
    for layer in lists:
        row = []
        for cands in layer:
            near = nearest(cands, rank, S, rpn)
            row.append([near] if near >= 0 else list(cands))
        out.append(row)
    return out


def fair_choices(arr: list[int], k: int, rng: random.Random) -> list[int]:
    quotient, remainder = divmod(k, len(arr))
    ans = arr * quotient + rng.sample(arr, k=remainder)
    rng.shuffle(ans)
    return ans


def sglang_rows(lists: list[list[list[int]]], W: int, S: int, rpn: int) -> np.ndarray:
    """[W, L, E]: _init_raw's loop with Random(42) over these lists, every rank's row."""
    rng = random.Random(42)
    L, E = len(lists), len(lists[0])
    out = np.full((W, L, E), -1, dtype=np.int32)
    for layer in range(L):
        for e in range(E):
            cands = lists[layer][e]
            res = [nearest(cands, g, S, rpn) for g in range(W)]
            remaining = [g for g in range(W) if res[g] == -1]
            if remaining:
                for g, c in zip(remaining, fair_choices(cands, len(remaining), rng), strict=True):
                    res[g] = c
            out[:, layer, e] = res
    return out


def sglang_file_tables(location: ExpertLocation) -> np.ndarray:
    """Every rank runs the loop over its own collapsed lists and keeps its own row."""
    W = location.ep_size
    S, rpn = location.num_local_physical_experts, W // location.num_nodes
    base = lists_of(location)
    return np.stack([sglang_rows(collapse(base, r, S, rpn), W, S, rpn)[r] for r in range(W)])


def sglang_runtime_tables(location: ExpertLocation, order: np.ndarray | None = None) -> np.ndarray:
    W = location.ep_size
    S, rpn = location.num_local_physical_experts, W // location.num_nodes
    return sglang_rows(lists_of(location, order), W, S, rpn)


# ------------------------------------------------------------------------------------------------
# Placements with several replicas per expert across nodes.


def scattered(L: int, E: int, P: int, W: int, N: int, seed: int) -> ExpertLocation:
    """Every expert once, the other slots random experts (a few hot ones get many), shuffled."""
    rng = np.random.default_rng(seed)
    p2l = np.empty((L, P), dtype=np.int32)
    for layer in range(L):
        extra = rng.choice(E, size=P - E, p=np.arange(E, 0, -1) / (E * (E + 1) / 2))
        row = np.concatenate([np.arange(E), extra])
        p2l[layer] = rng.permutation(row)
    return ExpertLocation(p2l, E, W, N)


CASES = [
    ("4 nodes x 2", lambda: scattered(3, 16, 48, 8, 4, 1)),
    ("2 nodes x 4", lambda: scattered(3, 16, 48, 8, 2, 2)),
    ("1 node", lambda: scattered(2, 12, 36, 6, 1, 3)),
    ("16 ranks 4 nodes", lambda: scattered(2, 24, 64, 16, 4, 4)),
    ("trivial 288/32/4", lambda: ExpertLocation.trivial(2, 256, 288, 32, 4)),
]


@pytest.mark.parametrize(("name", "make"), CASES, ids=[c[0] for c in CASES])
def test_sglang_static_file_path_is_bit_exact(name: str, make) -> None:
    location = make()
    want = sglang_file_tables(location)
    got = moelb.dispatch_tables(location, "sglang_static")
    np.testing.assert_array_equal(got, want)
    for rank in (0, location.ep_size - 1):
        np.testing.assert_array_equal(
            moelb.dispatch_table(location, "sglang_static", rank), want[rank]
        )


@pytest.mark.parametrize(("name", "make"), CASES, ids=[c[0] for c in CASES])
def test_sglang_static_runtime_is_one_coordinated_table(name: str, make) -> None:
    location = make()
    np.testing.assert_array_equal(
        moelb.dispatch_tables(location, "sglang_static_runtime"), sglang_runtime_tables(location)
    )


def test_runtime_table_follows_the_replica_order() -> None:
    location = scattered(3, 16, 48, 8, 2, 7)
    rng = np.random.default_rng(0)
    order = np.full((3, 16, location.max_replicas), -1, dtype=np.int32)
    for layer in range(3):
        for e in range(16):
            slots = np.flatnonzero(location.physical_to_logical[layer] == e)
            order[layer, e, : len(slots)] = rng.permutation(slots)
    got = moelb.dispatch_tables(location, "sglang_static_runtime", replica_order=order)
    np.testing.assert_array_equal(got, sglang_runtime_tables(location, order))
    assert not np.array_equal(got, moelb.dispatch_tables(location, "sglang_static_runtime"))
    bad = order.copy()
    bad[1, 3, 0] = int(np.flatnonzero(location.physical_to_logical[1] != 3)[0])
    with pytest.raises(InvalidArgumentError, match=r"replica_order\[1, 3\]"):
        moelb.dispatch_tables(location, "sglang_static_runtime", replica_order=bad)


def test_file_path_ranks_draw_independently() -> None:
    """The file path differs from the coordinated table (that is the point of modelling it)."""
    location = scattered(3, 16, 48, 8, 4, 1)
    assert not np.array_equal(
        moelb.dispatch_tables(location, "sglang_static"),
        moelb.dispatch_tables(location, "sglang_static_runtime"),
    )


def test_python_sample_set_branch() -> None:
    """An expert with 27 replicas and 5 ranks left: random.sample takes its set-based branch."""
    W, S = 32, 2
    p2l = np.tile(np.arange(1, 4, dtype=np.int32), 22)[: W * S]
    p2l[: 27 * S : S] = 0  # expert 0 in the first slot of ranks 0..26
    location = ExpertLocation(p2l[None, :], 4, W, 1)
    assert location.logical_count[0, 0] == 27
    np.testing.assert_array_equal(
        moelb.dispatch_tables(location, "sglang_static"), sglang_file_tables(location)
    )


@pytest.mark.parametrize(("name", "make"), CASES[:3], ids=[c[0] for c in CASES[:3]])
def test_replica_lists(name: str, make) -> None:
    location = make()
    W = location.ep_size
    S, rpn = location.num_local_physical_experts, W // location.num_nodes
    X = location.max_replicas

    def padded(lists):
        out = np.full((len(lists), len(lists[0]), X), -1, dtype=np.int32)
        for layer, row in enumerate(lists):
            for e, cands in enumerate(row):
                out[layer, e, : len(cands)] = cands
        return out

    base = lists_of(location)
    np.testing.assert_array_equal(moelb.sglang_replica_lists(location), padded(base))
    for rank in range(W):
        np.testing.assert_array_equal(
            moelb.sglang_replica_lists(location, rank), padded(collapse(base, rank, S, rpn))
        )


# ------------------------------------------------------------------------------------------------
# Per-token models.


def tokens(location: ExpertLocation, T: int, K: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, location.num_logical_experts, (T, K), dtype=np.int32)


def test_per_token_formulas() -> None:
    location = scattered(2, 16, 48, 8, 2, 5)
    ids = tokens(location, 200, 4, 1)
    offsets = np.array([0, 10, 40, 40, 90, 120, 150, 190, 200])
    l2p = lists_of(location)
    for dispatch in ("vllm_hash", "round_robin", "sglang_dynamic_rank_invariant"):
        got = moelb.dispatch_tokens(ids, location, 1, dispatch, rank_offsets=offsets)
        for r in range(8):
            for t in range(offsets[r], offsets[r + 1]):
                row = t - offsets[r]
                for c in range(4):
                    reps = l2p[1][ids[t, c]]
                    if dispatch == "vllm_hash":
                        want = reps[((row * 2654435769) & 0xFFFFFFFF) % len(reps)]
                    elif dispatch == "round_robin":
                        want = reps[(row + r) % len(reps)]
                    else:
                        want = reps[t % len(reps)]  # global rows, uncollapsed lists
                    assert got[t, c] == want, (dispatch, t, c)


def test_sglang_dynamic_uses_the_collapsed_list_then_a_uniform_pick() -> None:
    location = scattered(1, 8, 32, 8, 2, 11)
    S, rpn = location.num_local_physical_experts, 4
    base = lists_of(location)
    T = 4000
    ids = np.tile(np.arange(8, dtype=np.int32), (T, 1))
    for rank in range(8):
        got = moelb.dispatch_tokens(ids, location, 0, "sglang_dynamic", ep_rank=rank, seed=3)
        for e in range(8):
            cands = base[0][e]
            near = nearest(cands, rank, S, rpn)
            if near >= 0:
                assert (got[:, e] == near).all()
            else:
                counts = np.array([(got[:, e] == p).sum() for p in cands])
                assert counts.sum() == T
                # Uniform up to the modulo bias of 65536 % n (< 0.01 %); 6 sigma slack.
                sigma = np.sqrt(T / len(cands))
                assert np.abs(counts - T / len(cands)).max() < 6 * sigma
    a = moelb.dispatch_tokens(ids, location, 0, "sglang_dynamic", ep_rank=0, seed=3)
    b = moelb.dispatch_tokens(ids, location, 0, "sglang_dynamic", ep_rank=0, seed=4)
    assert not np.array_equal(a, b) or all(nearest(base[0][e], 0, S, rpn) >= 0 for e in range(8))


def test_select_experts_uses_sglang_static_by_default() -> None:
    E, W = 16, 8
    location = scattered(2, E, 48, W, 2, 9)
    logits = np.random.default_rng(0).standard_normal((64, E)).astype(np.float32)
    config = moelb.TopKConfig(top_k=4, scoring="softmax")
    logical = moelb.select_experts(logits, config).topk_ids
    table = sglang_file_tables(location)
    for rank in (0, 5):
        out = moelb.select_experts(logits, config, location=location, layer=1, ep_rank=rank)
        np.testing.assert_array_equal(out.topk_ids, table[rank, 1][logical])
    # A different placement is a different table (the memo compares content), an equal copy the
    # same one.
    other = scattered(2, E, 48, W, 2, 10)
    out = moelb.select_experts(logits, config, location=other, layer=1, ep_rank=5)
    np.testing.assert_array_equal(out.topk_ids, sglang_file_tables(other)[5, 1][logical])
    copy = ExpertLocation(location.physical_to_logical.copy(), E, W, 2)
    out = moelb.select_experts(logits, config, location=copy, layer=1, ep_rank=5)
    np.testing.assert_array_equal(out.topk_ids, table[5, 1][logical])


def test_errors_name_the_parameter() -> None:
    location = scattered(1, 8, 16, 4, 2, 1)
    ids = tokens(location, 10, 2, 0)
    with pytest.raises(InvalidArgumentError, match="dispatch='static'"):
        moelb.dispatch_tokens(ids, location, 0, "static")
    with pytest.raises(InvalidArgumentError, match="equal_split"):
        moelb.dispatch_tokens(ids, location, 0, "equal_split")
    with pytest.raises(InvalidArgumentError, match="no table"):
        moelb.dispatch_table(location, "vllm_hash", 0)
    with pytest.raises(InvalidArgumentError, match="ep_rank=4"):
        moelb.dispatch_table(location, "sglang_static", 4)
    with pytest.raises(InvalidArgumentError, match="rank_offsets"):
        moelb.dispatch_tokens(ids, location, 0, rank_offsets=[0, 5, 10])
    with pytest.raises(InvalidArgumentError, match="not both"):
        moelb.dispatch_tokens(ids, location, 0, ep_rank=1, rank_offsets=[0, 5, 5, 5, 10])
    with pytest.raises(InvalidArgumentError, match="layer=1"):
        moelb.dispatch_tokens(ids, location, 1)
    with pytest.raises(InvalidArgumentError, match=r"seed must be in \[0, 2\*\*63\)"):
        moelb.dispatch_tokens(ids, location, 0, seed=2**63)
    with pytest.raises(InvalidArgumentError, match="does not fit"):
        moelb.dispatch_tokens(
            ids, location, 0, rank_offsets=np.array([0, 1, 2**63, 3, 10], dtype=np.uint64)
        )
    order = moelb.sglang_replica_lists(location).copy()
    with pytest.raises(InvalidArgumentError, match="sglang_static_runtime' only"):
        moelb.dispatch_tables(location, "sglang_static", replica_order=order)
    order[0, 0, -1] = -5
    with pytest.raises(InvalidArgumentError, match="-1 marks padding"):
        moelb.dispatch_tables(location, "sglang_static_runtime", replica_order=order)
    assert set(moelb.DISPATCH_ALGORITHMS) == set(moelb.ENGINE_DISPATCH) | {"moelb_static"}


# ------------------------------------------------------------------------------------------------
# Expected loads.


@pytest.mark.parametrize("dispatch", ["sglang_static", "sglang_static_runtime", "moelb_static"])
def test_expected_loads_of_table_models_are_the_dispatched_tokens(dispatch: str) -> None:
    """W tokens per (layer, expert) unit of load, one from each source rank: the dispatched tokens'
    GPU counts are exactly W x the expected load."""
    location = scattered(3, 16, 48, 8, 2, 12)
    W, S = 8, location.num_local_physical_experts
    load = np.random.default_rng(1).integers(0, 5, (3, 16)).astype(np.float64)
    want = np.zeros((3, W))
    for layer in range(3):
        ids = np.repeat(np.arange(16, dtype=np.int32), load[layer].astype(int))[:, None]
        ids = np.ascontiguousarray(np.tile(ids, (W, 1)))  # every rank sends the same tokens
        offsets = np.arange(W + 1) * (len(ids) // W)
        physical = moelb.dispatch_tokens(ids, location, layer, dispatch, rank_offsets=offsets)
        want[layer] = np.bincount(physical.ravel() // S, minlength=W) / W
    np.testing.assert_allclose(moelb.expected_rank_loads(load, location, dispatch), want)


def test_expected_loads_of_equal_split_and_dynamic() -> None:
    location = scattered(2, 16, 48, 8, 1, 13)  # one node: ranks without a replica draw
    load = np.random.default_rng(2).random((2, 16)) * 100
    np.testing.assert_allclose(
        moelb.expected_rank_loads(load, location, "equal_split"), moelb.rank_loads(load, location)
    )
    got = moelb.expected_rank_loads(load, location, "sglang_dynamic")
    np.testing.assert_allclose(got.sum(axis=1), load.sum(axis=1))
    # The exact weights, from the spec: rank r's share of expert e goes to its collapsed list,
    # index x with probability #{u in [0, 65536) : u % n == x} / 65536.
    W, S = 8, location.num_local_physical_experts
    want = np.zeros((2, W))
    for rank in range(W):
        lists = collapse(lists_of(location), rank, S, W)
        for layer in range(2):
            for e in range(16):
                n = len(lists[layer][e])
                hits = np.bincount(np.arange(65536) % n, minlength=n) / 65536
                for x, p in enumerate(lists[layer][e]):
                    want[layer, p // S] += load[layer, e] / W * hits[x]
    np.testing.assert_allclose(got, want)
    with pytest.raises(InvalidArgumentError, match="token row"):
        moelb.expected_rank_loads(load, location, "vllm_hash")
    with pytest.raises(InvalidArgumentError, match="load has shape"):
        moelb.expected_rank_loads(load[:1], location)
    with pytest.raises(InvalidArgumentError, match="finite"):
        moelb.expected_rank_loads(-load, location)


def test_expected_loads_refuse_overflow() -> None:
    location = ExpertLocation.trivial(1, 4, 4, 2)
    with pytest.raises(InvalidArgumentError, match="more than 1e300"):
        moelb.expected_rank_loads([[1e308, 1e308, 0, 0]], location, "equal_split")
    with pytest.raises(InvalidArgumentError, match=r"load\[0, 2\] = nan"):
        moelb.expected_rank_loads([[1, 1, np.nan, 0]], location)
