"""Waterfill against the literal reference (waterfill_reference.py, written from
reference/routing_waterfill.md section 8), the section's worked examples, edge cases, invariants,
the routers' Waterfill mode with the recorder, the rank-load evaluator and every error path."""

from __future__ import annotations

import zlib

import moelb
import numpy as np
import pytest
import waterfill_reference as ref
from hypothesis import given, settings
from hypothesis import strategies as st


def zipf_popularity(rng: np.random.Generator, num_physical: int) -> np.ndarray:
    popularity = 1.0 / np.arange(1, num_physical + 1) ** 1.2
    popularity = popularity[rng.permutation(num_physical)]
    return popularity / popularity.sum()


def skewed_batch(
    rng: np.random.Generator,
    n: int,
    k: int,
    num_physical: int,
    pad: float = 0.1,
    popularity: np.ndarray | None = None,
) -> np.ndarray:
    """[n, k] int32 physical ids, distinct per row, Zipf-like popularity (the given one, else a
    fresh one), some padded rows and some padded entries."""
    if popularity is None:
        popularity = zipf_popularity(rng, num_physical)
    k_eff = min(k, num_physical)
    ids = np.full((n, k), -1, dtype=np.int32)
    for t in range(n):
        ids[t, :k_eff] = rng.choice(num_physical, size=k_eff, replace=False, p=popularity)
    ids[rng.random((n, k)) < pad / 4] = -1
    ids[rng.random(n) < pad] = -1
    return ids


def random_weights(rng: np.random.Generator, ids: np.ndarray) -> np.ndarray:
    return rng.random(ids.shape).astype(np.float32)


def seeded(*parts) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(parts).encode()))


# ---------------------------------------------------------------------------------------------
# The worked examples of section 8.10.


EXAMPLE_IDS = np.array([[0, 5], [1, 9], [4, 13], [-1, -1]], dtype=np.int32)
EXAMPLE_WEIGHTS = np.tile(np.array([0.6, 0.4], dtype=np.float32), (4, 1))


def test_worked_example_static_prefill() -> None:
    b = moelb.WaterfillBalancer(16, 4, 1, 2.5)
    ids, weights = b.expand(EXAMPLE_IDS, EXAMPLE_WEIGHTS, num_tokens=64)
    np.testing.assert_array_equal(ids, [[0, 6, 14], [1, 11, 19], [5, 16, 19], [-1, -1, -1]])
    np.testing.assert_array_equal(
        weights, np.array([[0.6, 0.4, 0.4]] * 3 + [[0, 0, 0]], dtype=np.float32)
    )
    assert b.last_plan.kind == "token_count"
    assert list(b.last_plan.rank_load) == [2, 2, 1, 1]
    assert b.last_plan.allow_all_ranks


def test_worked_example_small_batch_stays_local() -> None:
    b = moelb.WaterfillBalancer(16, 4, 1, 2.5)
    ids, _ = b.expand(EXAMPLE_IDS, EXAMPLE_WEIGHTS)  # num_tokens = N = 4 < 64
    np.testing.assert_array_equal(ids[:, 2], [9, 9, 9, -1])
    assert b.last_plan.kind == "local"


@pytest.mark.parametrize("n", [63, 64])
def test_the_64_token_threshold(n: int) -> None:
    rng = seeded("threshold", n)
    ids = skewed_batch(rng, n, 4, 32, pad=0.0)
    b = moelb.WaterfillBalancer(32, 4, 0)
    b.expand(ids, random_weights(rng, ids))
    assert b.last_plan.kind == ("local" if n < 64 else "token_count")
    # num_tokens, not the row count, decides (SGLang passes hidden_states rows, padding included).
    b.expand(ids, random_weights(rng, ids), num_tokens=64 if n < 64 else 63)
    assert b.last_plan.kind == ("token_count" if n < 64 else "local")


# ---------------------------------------------------------------------------------------------
# Against the reference.


STATIC_CASES = [
    # (W, S, K, N)
    (1, 16, 4, 100),
    (2, 8, 4, 0),
    (4, 4, 2, 64),
    (8, 32, 8, 300),
    (8, 33, 8, 100),
    (16, 16, 8, 257),
    (16, 16, 8, 256),
    (33, 4, 6, 200),
    (64, 4, 8, 500),
]


@pytest.mark.parametrize("is_decode", [False, True], ids=["prefill", "decode"])
@pytest.mark.parametrize("case", STATIC_CASES, ids=lambda c: "W{}-S{}-K{}-N{}".format(*c))
def test_static_mode_matches_reference(case, is_decode: bool) -> None:
    w_count, slots, k, n = case
    num_physical = w_count * slots
    rng = seeded("static", case, is_decode)
    ids = skewed_batch(rng, n, k, num_physical)
    weights = random_weights(rng, ids)
    for rank in sorted({0, w_count // 2, w_count - 1}):
        b = moelb.WaterfillBalancer(num_physical, w_count, rank, 2.5)
        got_ids, got_w = b.expand(ids, weights, is_decode=is_decode)
        want_ids, want_w, want_plan = ref.expand(
            ids, weights, num_physical, w_count, rank, 2.5, is_decode=is_decode
        )
        np.testing.assert_array_equal(got_ids, want_ids)
        np.testing.assert_array_equal(got_w, want_w)
        kind, load, _target, _allow_all, dest = want_plan
        assert b.last_plan.kind == kind
        assert list(b.last_plan.rank_load) == load
        assert b.last_plan.destination == dest


@pytest.mark.parametrize("is_decode", [False, True], ids=["prefill", "decode"])
@pytest.mark.parametrize("w_count", [2, 4, 16, 40])
def test_dynamic_mode_matches_reference(w_count: int, is_decode: bool) -> None:
    slots, k = 8, 6
    num_physical = w_count * slots
    rng = seeded("dynamic", w_count, is_decode)
    # Uneven batches: some ranks idle, some below 64 tokens, one heavy.
    sizes = [int(s) for s in rng.choice([0, 10, 70, 200], size=w_count)]
    sizes[0] = 300
    batches = [skewed_batch(rng, n, k, num_physical) for n in sizes]
    total = np.sum(
        [
            ref.exchange_buffer(batches[r], num_physical, w_count, r, sizes[r], is_decode)
            for r in range(w_count)
        ],
        axis=0,
    )
    calls = []

    def all_reduce(buffer: np.ndarray) -> np.ndarray:
        calls.append(buffer.copy())
        return total.copy()

    for rank in range(w_count):
        b = moelb.WaterfillBalancer(num_physical, w_count, rank, 1.5, "dynamic", all_reduce)
        weights = random_weights(rng, batches[rank])
        got_ids, got_w = b.expand(batches[rank], weights, is_decode=is_decode)
        want_ids, want_w, want_plan = ref.expand(
            batches[rank],
            weights,
            num_physical,
            w_count,
            rank,
            1.5,
            is_decode=is_decode,
            dynamic=True,
            reduced=list(total),
        )
        np.testing.assert_array_equal(got_ids, want_ids)
        np.testing.assert_array_equal(got_w, want_w)
        assert b.last_plan.kind == want_plan[0]
        assert b.last_plan.target_total == want_plan[2]
        assert b.last_plan.allow_all_ranks == want_plan[3]
        # The buffer this rank contributed, laid out as SGLang's.
        np.testing.assert_array_equal(
            calls[-1],
            ref.exchange_buffer(batches[rank], num_physical, w_count, rank, sizes[rank], is_decode),
        )
        assert calls[-1].dtype == np.int64
    assert len(calls) == w_count  # every rank joined the collective, empty batches included


def test_restricted_candidates_beyond_32_ranks() -> None:
    # Dynamic prefill where one rank is overloaded, so only a token's own ranks are candidates,
    # with ids on ranks >= 32 (SGLang's 32-bit mask could not hold them).
    w_count, slots, k = 48, 4, 4
    num_physical = w_count * slots
    rng = seeded("restricted48")
    ids = rng.integers(33 * slots, num_physical, size=(128, k)).astype(np.int32)
    weights = random_weights(rng, ids)
    total = np.zeros(2 * w_count, dtype=np.int64)
    total[:w_count] = 10
    total[40] = 5000  # rank 40 is far above the target
    total[w_count + 3] = 128
    b = moelb.WaterfillBalancer(num_physical, w_count, 3, 1.0, "dynamic", lambda _: total)
    got_ids, _ = b.expand(ids, weights)
    assert not b.last_plan.allow_all_ranks
    want_ids, _, _ = ref.expand(
        ids, weights, num_physical, w_count, 3, dynamic=True, reduced=list(total)
    )
    np.testing.assert_array_equal(got_ids, want_ids)
    dest = got_ids[:, k] // (slots + 1)
    for t in range(len(ids)):
        assert dest[t] in {3, *(ids[t] // slots)}
    assert len(set(dest.tolist()) - {3}) > 1  # remote ranks above 32 were chosen


# ---------------------------------------------------------------------------------------------
# Edge cases and invariants.


@pytest.mark.parametrize("mode", ["static", "dynamic"])
@pytest.mark.parametrize("is_decode", [False, True], ids=["prefill", "decode"])
def test_empty_batch(mode: str, is_decode: bool) -> None:
    calls = []

    def all_reduce(buffer):
        calls.append(len(buffer))
        return buffer

    b = moelb.WaterfillBalancer(32, 4, 2, 2.5, mode, all_reduce if mode == "dynamic" else None)
    ids, weights = b.expand(
        np.zeros((0, 6), np.int32), np.zeros((0, 6), np.float32), is_decode=is_decode
    )
    assert ids.shape == (0, 7) and weights.shape == (0, 7)
    assert ids.dtype == np.int32 and weights.dtype == np.float32
    assert calls == ([32 if is_decode else 8] if mode == "dynamic" else [])


@pytest.mark.parametrize("is_decode", [False, True], ids=["prefill", "decode"])
def test_all_padded(is_decode: bool) -> None:
    b = moelb.WaterfillBalancer(32, 4, 2)
    ids, weights = b.expand(
        np.full((100, 4), -1, np.int32), np.ones((100, 4), np.float32), is_decode=is_decode
    )
    assert (ids == -1).all() and (weights == 0).all()


def test_ids_of_the_last_rank() -> None:
    w_count, slots = 8, 32
    b = moelb.WaterfillBalancer(w_count * slots, w_count, 0)
    ids = np.array([[255, 224], [254, -1]], dtype=np.int32)
    out, _ = b.expand(ids, np.ones((2, 2), np.float32))
    np.testing.assert_array_equal(out[:, :2], [[255 + 7, 224 + 7], [254 + 7, -1]])
    assert b.shared_slot(7) == 7 * 33 + 32 == 263
    assert out[0, 2] % 33 == 32


def test_single_rank_everything_stays_home() -> None:
    rng = seeded("w1")
    ids = skewed_batch(rng, 500, 8, 64)
    for is_decode in (False, True):
        b = moelb.WaterfillBalancer(64, 1, 0)
        out, _ = b.expand(ids, random_weights(rng, ids), is_decode=is_decode)
        valid = (ids >= 0).any(axis=1)
        np.testing.assert_array_equal(out[valid, 8], 64)
        np.testing.assert_array_equal(out[:, :8], ids)  # id + id // 64 == id


def test_shared_weight_contract() -> None:
    # SGLang's tests: 1/2.5, 1/4, 1.0; 1.0 when rsf is folded (pre-folded backends).
    assert moelb.WaterfillBalancer(8, 2, 0, 2.5).shared_weight == np.float32(0.4)
    assert moelb.WaterfillBalancer(8, 2, 0, 4.0).shared_weight == np.float32(0.25)
    assert moelb.WaterfillBalancer(8, 2, 0, 1.0).shared_weight == 1.0
    assert moelb.WaterfillBalancer(8, 2, 0, 0.0).shared_weight == 1.0
    folded = moelb.WaterfillBalancer(8, 2, 0, 2.5, apply_routed_scaling_factor_on_output=True)
    assert folded.shared_weight == 1.0
    # The historical remap example: W=8, S=32: [0, 32, ..., 224] -> [0, 33, ..., 231].
    b = moelb.WaterfillBalancer(256, 8, 0)
    ids = np.arange(0, 256, 32, dtype=np.int32)[None, :]
    out, _ = b.expand(ids, np.ones_like(ids, dtype=np.float32))
    np.testing.assert_array_equal(out[0, :8], [0, 33, 66, 99, 132, 165, 198, 231])
    assert b.shared_slot(0) == 32


@settings(max_examples=60, deadline=None)
@given(
    w_count=st.integers(1, 40),
    slots=st.integers(1, 12),
    k=st.integers(1, 8),
    n=st.integers(0, 150),
    rank_frac=st.floats(0, 0.999),
    is_decode=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_invariants(w_count, slots, k, n, rank_frac, is_decode, seed) -> None:
    num_physical = w_count * slots
    rank = int(rank_frac * w_count)
    rng = np.random.default_rng(seed)
    ids = skewed_batch(rng, n, k, num_physical, pad=0.2)
    weights = random_weights(rng, ids)
    b = moelb.WaterfillBalancer(num_physical, w_count, rank, 1.5)
    out, out_w = b.expand(ids, weights, num_tokens=max(n, 64), is_decode=is_decode)
    assert out.shape == (n, k + 1)
    # Routed columns: only widened.
    np.testing.assert_array_equal(out[:, :k], np.where(ids >= 0, ids + ids // slots, -1))
    np.testing.assert_array_equal(out_w[:, :k], np.where(ids >= 0, weights, 0))
    # Exactly one shared slot per valid row, none for padded rows.
    valid = (ids >= 0).any(axis=1)
    shared = out[:, k]
    assert (shared[~valid] == -1).all() and (out_w[~valid, k] == 0).all()
    assert (shared[valid] % (slots + 1) == slots).all()
    assert (out_w[valid, k] == np.float32(1 / 1.5)).all()
    dest = shared[valid] // (slots + 1)
    assert ((dest >= 0) & (dest < w_count)).all()
    plan = b.last_plan
    if plan.kind == "token_count" and not plan.allow_all_ranks:
        for t, d in zip(np.flatnonzero(valid), dest, strict=True):
            assert d == rank or d in set((ids[t][ids[t] >= 0] // slots).tolist())
    if plan.kind in ("fewest_active", "fused_fewest_active"):
        assert (dest == plan.destination).all()
    # And the reference agrees.
    want, want_w, _ = ref.expand(
        ids, weights, num_physical, w_count, rank, 1.5, num_tokens=max(n, 64), is_decode=is_decode
    )
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(out_w, want_w)


def test_same_result_for_any_thread_count(restore_num_threads) -> None:
    rng = seeded("threads")
    ids = skewed_batch(rng, 30_000, 8, 256)
    weights = random_weights(rng, ids)
    b = moelb.WaterfillBalancer(256, 16, 5, 2.5)
    moelb.set_num_threads(1)
    one = b.expand(ids, weights)
    moelb.set_num_threads(2)
    two = b.expand(ids, weights)
    np.testing.assert_array_equal(one[0], two[0])
    np.testing.assert_array_equal(one[1], two[1])


# ---------------------------------------------------------------------------------------------
# The routers in Waterfill mode, with the recorder.


def v4_router(
    rng: np.random.Generator, vocab: int = 1000, num_experts: int = 64, k: int = 6, shared: int = 1
) -> moelb.HashRouter:
    table = np.argsort(rng.random((vocab, num_experts)), axis=1)[:, :k].astype(np.int32)
    return moelb.HashRouter(
        table,
        scoring="sqrtsoftplus",
        routed_scaling_factor=1.5,
        num_fused_shared_experts=shared,
        num_experts=num_experts,
    )


def test_v4_layers_through_waterfill_with_the_recorder() -> None:
    """Three hash layers and two learned layers of a V4-style model, rank 2 of 8, routed through
    Waterfill and recorded; the recorder counts equal those of the same routing without it."""
    rng = seeded("v4-e2e")
    num_experts, k, w_count, rank, tokens = 64, 6, 8, 2, 200
    location = moelb.ExpertLocation.trivial(5, num_experts, num_experts, ep_size=w_count)
    hash_layers = [v4_router(rng, num_experts=num_experts, k=k) for _ in range(3)]
    config = moelb.TopKConfig(
        top_k=k, scoring="sqrtsoftplus", routed_scaling_factor=1.5, num_fused_shared_experts=1
    )
    bias = (rng.standard_normal(num_experts) * 0.05).astype(np.float32)
    logits = rng.standard_normal((5, tokens, num_experts)).astype(np.float32)
    input_ids = rng.integers(0, 1000, tokens).astype(np.int64)
    balancers = [moelb.WaterfillBalancer(num_experts, w_count, rank, 1.5) for _ in range(5)]

    def run(waterfill: bool):
        recorder = moelb.ExpertDistributionRecorder(location)
        recorder.start()
        outputs = []
        with recorder.forward_pass():
            for layer in range(5):
                extra = {"waterfill": balancers[layer]} if waterfill else {}
                with recorder.layer(layer):
                    if layer < 3:
                        out = hash_layers[layer].select(
                            logits[layer],
                            input_ids,
                            num_token_non_padded=190,
                            location=location,
                            layer=layer,
                            ep_rank=rank,
                            recorder=recorder,
                            **extra,
                        )
                    else:
                        out = moelb.select_experts(
                            logits[layer],
                            config,
                            bias,
                            num_token_non_padded=190,
                            location=location,
                            layer=layer,
                            ep_rank=rank,
                            recorder=recorder,
                            **extra,
                        )
                outputs.append(out)
        return recorder.dump(), outputs

    plain_dump, plain = run(False)
    wf_dump, wf = run(True)
    np.testing.assert_array_equal(plain_dump["logical_count"], wf_dump["logical_count"])
    assert plain_dump["logical_count"].sum() == 5 * 190 * k  # routed ids only
    slots = num_experts // w_count
    for layer in range(5):
        p, w = plain[layer], wf[layer]
        assert w.topk_ids.shape == (tokens, k + 1)
        np.testing.assert_array_equal(w.recorder_topk_ids, p.recorder_topk_ids)
        routed = p.topk_ids[:, :k]
        np.testing.assert_array_equal(
            w.topk_ids[:, :k], np.where(routed >= 0, routed + routed // slots, -1)
        )
        np.testing.assert_array_equal(w.topk_weights[:, :k], p.topk_weights[:, :k])
        assert (w.topk_ids[190:] == -1).all() and (w.topk_weights[190:] == 0).all()
        assert (w.topk_ids[:190, k] % (slots + 1) == slots).all()
        np.testing.assert_array_equal(w.topk_weights[:190, k], np.float32(1 / 1.5))
        # Exactly what the balancer gives on the routed columns.
        want, _ = balancers[layer].expand(
            p.recorder_topk_ids, np.ascontiguousarray(p.topk_weights[:, :k])
        )
        np.testing.assert_array_equal(w.topk_ids, want)
    # 200 tokens >= 64: the shared experts were spread over several ranks.
    assert len(set((wf[0].topk_ids[:190, k] // (slots + 1)).tolist())) > 1


def test_router_waterfill_decode_and_num_tokens() -> None:
    rng = seeded("router-decode")
    router = v4_router(rng)
    logits = rng.standard_normal((16, 64)).astype(np.float32)
    input_ids = rng.integers(0, 1000, 16).astype(np.int32)
    b = moelb.WaterfillBalancer(64, 4, 1, 1.5)
    out = router.select(logits, input_ids, waterfill=b, is_decode=True)
    assert b.last_plan.kind == "fused_fewest_active"
    assert (out.topk_ids[:, 6] == b.shared_slot(b.last_plan.destination)).all()
    router.select(logits, input_ids, waterfill=b, num_tokens=64)
    assert b.last_plan.kind == "token_count"


def test_router_waterfill_errors() -> None:
    rng = seeded("router-errors")
    logits = rng.standard_normal((8, 64)).astype(np.float32)
    config = moelb.TopKConfig(top_k=4, scoring="sigmoid")
    b = moelb.WaterfillBalancer(64, 4, 0)
    with pytest.raises(moelb.InvalidArgumentError, match="num_fused_shared_experts=1, got 0"):
        moelb.select_experts(logits, config, waterfill=b)
    shared = moelb.TopKConfig(top_k=4, scoring="sigmoid", num_fused_shared_experts=1)
    with pytest.raises(moelb.InvalidArgumentError, match=r"num_physical_experts=32 .* 64"):
        moelb.select_experts(logits, shared, waterfill=moelb.WaterfillBalancer(32, 4, 0))
    location = moelb.ExpertLocation.trivial(1, 64, 72, ep_size=4)
    with pytest.raises(moelb.InvalidArgumentError, match="72 experts \\(from location\\)"):
        moelb.select_experts(logits, shared, location=location, layer=0, waterfill=b)
    with pytest.raises(moelb.InvalidArgumentError, match="must be a WaterfillBalancer"):
        moelb.select_experts(logits, shared, waterfill="yes")
    router = v4_router(rng, shared=0)
    with pytest.raises(moelb.InvalidArgumentError, match="num_fused_shared_experts=1"):
        router.select(logits, np.zeros(8, np.int32), waterfill=b)
    # With redundant slots the balancer counts physical slots (SGLang PR #25367).
    out = moelb.select_experts(
        logits, shared, location=location, layer=0, waterfill=moelb.WaterfillBalancer(72, 4, 0)
    )
    assert out.topk_ids.shape == (8, 5)


# ---------------------------------------------------------------------------------------------
# The rank-load evaluator.


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_rank_loads_match_the_reference_and_improve_balance(mode: str) -> None:
    rng = seeded("rank-loads", mode)
    w_count, slots, k = 16, 16, 8
    num_physical = w_count * slots
    sizes = [int(v) for v in rng.integers(64, 1024, w_count)]
    popularity = zipf_popularity(rng, num_physical)  # the same hot experts on every rank
    batches = [skewed_batch(rng, n, k, num_physical, 0.05, popularity) for n in sizes]
    loads = moelb.waterfill_rank_loads(batches, num_physical, mode)
    routed = np.zeros(w_count, np.int64)
    local = np.zeros(w_count, np.int64)
    waterfill = np.zeros(w_count, np.int64)
    total = np.sum(
        [
            ref.exchange_buffer(b, num_physical, w_count, r, len(b), False)
            for r, b in enumerate(batches)
        ],
        axis=0,
    )
    for r, ids in enumerate(batches):
        valid_ids = ids[ids >= 0]
        routed += np.bincount(valid_ids // slots, minlength=w_count)
        valid_rows = (ids >= 0).any(axis=1)
        local[r] += valid_rows.sum()
        out, _, _ = ref.expand(
            ids,
            np.ones(ids.shape, np.float32),
            num_physical,
            w_count,
            r,
            dynamic=mode == "dynamic",
            reduced=list(total),
        )
        waterfill += np.bincount(out[valid_rows, k] // (slots + 1), minlength=w_count)
    np.testing.assert_array_equal(loads.routed, routed)
    np.testing.assert_array_equal(loads.shared_local, local)
    np.testing.assert_array_equal(loads.shared_waterfill, waterfill)
    for load, value in (
        (loads.load_local, loads.balancedness_local),
        (loads.load_waterfill, loads.balancedness_waterfill),
    ):
        assert value == pytest.approx(load.mean() / load.max())
    assert loads.balancedness_waterfill > loads.balancedness_local


def test_rank_loads_errors() -> None:
    ids = np.zeros((4, 2), np.int32)
    with pytest.raises(moelb.InvalidArgumentError, match="one batch per EP rank"):
        moelb.waterfill_rank_loads([], 16)
    with pytest.raises(moelb.InvalidArgumentError, match="batches\\[1\\] has 3 columns"):
        moelb.waterfill_rank_loads([ids, np.zeros((4, 3), np.int32)], 16)
    with pytest.raises(moelb.InvalidDTypeError, match="batches\\[0\\] must have dtype int32"):
        moelb.waterfill_rank_loads([ids.astype(np.int64)], 16)
    with pytest.raises(moelb.InvalidArgumentError, match="num_tokens has 1 entries"):
        moelb.waterfill_rank_loads([ids, ids], 16, num_tokens=[4])
    with pytest.raises(moelb.InvalidArgumentError, match="not divisible by ep_size=3"):
        moelb.waterfill_rank_loads([ids, ids, ids], 16)


# ---------------------------------------------------------------------------------------------
# Bad input.


def test_bad_input() -> None:
    with pytest.raises(
        moelb.InvalidArgumentError, match="num_physical_experts=10 is not divisible"
    ):
        moelb.WaterfillBalancer(10, 4, 0)
    with pytest.raises(moelb.InvalidArgumentError, match="ep_rank=4 is outside \\[0, ep_size=4\\)"):
        moelb.WaterfillBalancer(16, 4, 4)
    with pytest.raises(moelb.InvalidArgumentError, match="mode='fast' is not a Waterfill mode"):
        moelb.WaterfillBalancer(16, 4, 0, mode="fast")
    with pytest.raises(moelb.InvalidArgumentError, match="needs an all_reduce"):
        moelb.WaterfillBalancer(16, 4, 0, mode="dynamic")
    with pytest.raises(moelb.InvalidArgumentError, match="all_reduce must be callable"):
        moelb.WaterfillBalancer(16, 4, 0, mode="dynamic", all_reduce=3)
    b = moelb.WaterfillBalancer(16, 4, 0)
    w = np.ones((2, 2), np.float32)
    with pytest.raises(
        moelb.InvalidArgumentError, match="topk_ids\\[1, 1\\] = 16 is not a physical"
    ):
        b.expand(np.array([[0, 1], [2, 16]], np.int32), w)
    with pytest.raises(moelb.InvalidArgumentError, match="topk_weights has shape \\[2, 3\\]"):
        b.expand(np.zeros((2, 2), np.int32), np.ones((2, 3), np.float32))
    with pytest.raises(moelb.InvalidDTypeError, match="topk_ids must have dtype int32"):
        b.expand(np.zeros((2, 2), np.int64), w)
    with pytest.raises(moelb.InvalidDTypeError, match="topk_weights must have dtype float32"):
        b.expand(np.zeros((2, 2), np.int32), w.astype(np.float64))
    with pytest.raises(moelb.InvalidArgumentError, match="topk_ids must be C-contiguous"):
        b.expand(np.zeros((2, 4), np.int32)[:, ::2], w)
    with pytest.raises(moelb.InvalidArgumentError, match="num_tokens must be non-negative"):
        b.expand(np.zeros((2, 2), np.int32), w, num_tokens=-1)
    dynamic = moelb.WaterfillBalancer(16, 4, 0, mode="dynamic", all_reduce=lambda x: x[:3])
    with pytest.raises(moelb.InvalidArgumentError, match=r"all_reduce must return .* shape \(8,\)"):
        dynamic.expand(np.zeros((2, 2), np.int32), w)
    negative = moelb.WaterfillBalancer(16, 4, 0, mode="dynamic", all_reduce=lambda x: -x - 1)
    with pytest.raises(moelb.InvalidArgumentError, match="negative value"):
        negative.expand(np.zeros((2, 2), np.int32), w)


# ---------------------------------------------------------------------------------------------
# torch.distributed.


def test_torch_all_reduce_single_process(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    with pytest.raises(moelb.InvalidArgumentError, match=r"initialised torch\.distributed"):
        moelb.torch_all_reduce()
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        rng = seeded("torch")
        ids = skewed_batch(rng, 100, 4, 16)
        weights = random_weights(rng, ids)
        b = moelb.WaterfillBalancer(16, 1, 0, mode="dynamic", all_reduce=moelb.torch_all_reduce())
        out, _ = b.expand(ids, weights)
        want, _, _ = ref.expand(
            ids,
            weights,
            16,
            1,
            0,
            dynamic=True,
            reduced=ref.exchange_buffer(ids, 16, 1, 0, 100, False),
        )
        np.testing.assert_array_equal(out, want)
    finally:
        dist.destroy_process_group()
