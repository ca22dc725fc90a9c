"""The expert distribution recorder (DESIGN.md section 3, reference/recorder.md sections 4-9, 14,
15): count conservation (property tests), SGLang's failure modes as clear errors that count
nothing, low-latency dispatch counts, balancedness against a NumPy computation, threads and the
start / stop / dump / set_location life cycle. File formats are in test_recorder_files.py."""

from __future__ import annotations

import math
import threading

import moelb
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

EPS = 1e-5  # SGLang's balancedness epsilon
Recorder = moelb.ExpertDistributionRecorder


# ------------------------------------------------------------------------------------------------
# NumPy references, written from DESIGN.md section 3 independently of moelb.


def random_location(
    rng: np.random.Generator, num_layers: int, num_experts: int, ep_size: int, slots_per_rank: int
) -> moelb.ExpertLocation:
    """Every logical expert gets a replica, the remaining slots random ones, shuffled per layer."""
    num_physical = ep_size * slots_per_rank
    rows = [
        rng.permutation(
            np.concatenate(
                [np.arange(num_experts), rng.integers(0, num_experts, num_physical - num_experts)]
            )
        )
        for _ in range(num_layers)
    ]
    return moelb.ExpertLocation(np.array(rows), num_experts, ep_size)


def to_logical(physical: np.ndarray, physical_to_logical: np.ndarray, num_experts: int):
    """[T, L, P] physical counts -> [T, L, E] with the map [L, P]."""
    num_passes, num_layers, _ = physical.shape
    out = np.zeros((num_passes, num_layers, num_experts), np.int64)
    for layer in range(num_layers):
        for slot, expert in enumerate(physical_to_logical[layer]):
            out[:, layer, expert] += physical[:, layer, slot]
    return out


def reference_balancedness(counts: np.ndarray, ep_size: int) -> float:
    """One pass, as SGLang's compute_utilization_rate: per layer (mean_g + eps) / (max_g + eps)
    of the per-GPU counts, averaged over ALL layers (a layer without tokens counts 1.0)."""
    gpu = counts.reshape(counts.shape[0], ep_size, -1).sum(axis=2).astype(np.float64)
    rates = (gpu.mean(axis=1) + EPS) / (gpu.max(axis=1) + EPS)
    return float(rates.mean())


def count_ids(ids: np.ndarray, num_physical: int) -> np.ndarray:
    return np.bincount(ids[ids >= 0].ravel(), minlength=num_physical)


@st.composite
def placements(draw) -> moelb.ExpertLocation:
    num_layers = draw(st.integers(1, 3))
    ep_size = draw(st.integers(1, 4))
    slots = draw(st.integers(1, 3))
    num_experts = draw(st.integers(1, ep_size * slots))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    return random_location(rng, num_layers, num_experts, ep_size, slots)


buffer_sizes = st.one_of(st.just(-1), st.integers(1, 7))
seeds = st.integers(0, 2**32 - 1)


def random_ids(rng: np.random.Generator, num_physical: int) -> np.ndarray:
    """[T, K] physical ids with padded rows at the end and scattered -1 slots."""
    num_tokens, top_k = int(rng.integers(0, 7)), int(rng.integers(1, 5))
    ids = rng.integers(0, num_physical, (num_tokens, top_k)).astype(np.int32)
    ids[rng.random(ids.shape) < 0.2] = -1
    ids[int(rng.integers(0, num_tokens + 1)) :] = -1  # num_token_non_padded
    return ids


def record_random_pass(rec: Recorder, rng: np.random.Generator) -> np.ndarray:
    """One pass of hooks on a random subset of layers (the others stay dense); returns the
    [L, P] counts offered."""
    num_layers, num_physical = rec.num_layers, rec.num_physical_experts
    offered = np.zeros((num_layers, num_physical), np.int64)
    with rec.forward_pass():
        for layer in rng.permutation(num_layers)[: rng.integers(0, num_layers + 1)]:
            with rec.layer(int(layer)):
                for _ in range(int(rng.integers(1, 3))):
                    ids = random_ids(rng, num_physical)
                    rec.on_select_experts(ids, layer=int(layer) if rng.random() < 0.5 else None)
                    offered[layer] += count_ids(ids, num_physical)
    return offered


def kept(passes: list[np.ndarray], buffer_size: int) -> list[np.ndarray]:
    return passes if buffer_size < 0 else passes[-buffer_size:]


def stack(passes: list[np.ndarray], location: moelb.ExpertLocation) -> np.ndarray:
    shape = (0, location.num_layers, location.num_physical_experts)
    return np.stack(passes) if passes else np.zeros(shape, np.int64)


# ------------------------------------------------------------------------------------------------
# Conservation.


@given(location=placements(), num_passes=st.integers(1, 6), buffer_size=buffer_sizes, seed=seeds)
def test_conservation_on_select_experts(location, num_passes, buffer_size, seed) -> None:
    rng = np.random.default_rng(seed)
    rec = Recorder(location, buffer_size=buffer_size)
    rec.start()
    offered = [record_random_pass(rec, rng) for _ in range(num_passes)]
    expected = stack(kept(offered, buffer_size), location)  # oldest dropped first (wrap-around)

    physical = rec.physical_count()
    assert physical.dtype == np.int32
    np.testing.assert_array_equal(physical, expected)
    # Per layer and pass: the non-padded (token, slot) pairs offered.
    np.testing.assert_array_equal(physical.sum(axis=2), expected.sum(axis=2))
    logical = rec.logical_count()
    assert logical.dtype == np.int32
    assert logical.shape == (len(expected), location.num_layers, location.num_logical_experts)
    np.testing.assert_array_equal(
        logical, to_logical(expected, location.physical_to_logical, location.num_logical_experts)
    )
    np.testing.assert_array_equal(logical.sum(axis=2), expected.sum(axis=2))
    assert rec.num_passes == len(expected)
    np.testing.assert_array_equal(
        rec.forward_pass_ids(), np.arange(num_passes)[num_passes - len(expected) :]
    )


@given(
    location=placements(),
    num_passes=st.integers(1, 4),
    buffer_size=buffer_sizes,
    fused_shared=st.booleans(),
    dispatch=st.sampled_from([d for d in moelb.DISPATCH_ALGORITHMS if d != "equal_split"]),
    seed=seeds,
)
def test_conservation_select_experts(
    location, num_passes, buffer_size, fused_shared, dispatch, seed
) -> None:
    rng = np.random.default_rng(seed)
    num_layers, num_experts = location.num_layers, location.num_logical_experts
    num_physical = location.num_physical_experts
    ep_rank = int(rng.integers(0, location.ep_size))
    rec = Recorder(location, buffer_size=buffer_size)
    rec.start()
    offered_physical, offered_logical, pairs = [], [], []
    for _ in range(num_passes):
        physical = np.zeros((num_layers, num_physical), np.int64)
        logical = np.zeros((num_layers, num_experts), np.int64)
        routed = np.zeros(num_layers, np.int64)
        with rec.forward_pass():
            for layer in range(num_layers):
                top_k = int(rng.integers(1, num_experts + 1))
                config = moelb.TopKConfig(top_k=top_k, num_fused_shared_experts=int(fused_shared))
                num_tokens = int(rng.integers(0, 9))
                logits = rng.standard_normal((num_tokens, num_experts)).astype(np.float32)
                non_padded = None if rng.random() < 0.3 else int(rng.integers(0, num_tokens + 1))
                with rec.layer(layer):
                    out = moelb.select_experts(
                        logits,
                        config,
                        num_token_non_padded=non_padded,
                        location=location,
                        layer=layer,
                        ep_rank=ep_rank,
                        recorder=rec,
                        dispatch=dispatch,
                        seed=seed,
                    )
                n = num_tokens if non_padded is None else non_padded
                routed[layer] = n * top_k
                physical[layer] = count_ids(out.topk_ids[:n, :top_k], num_physical)
                if fused_shared:  # the shared column holds id P and is not routed
                    assert (out.topk_ids[:n, top_k] == num_physical).all()
                # The logical choice, without a placement, is what the logical counts hold.
                plain = moelb.select_experts(logits, config, num_token_non_padded=non_padded)
                logical[layer] = np.bincount(
                    plain.recorder_topk_ids[:n].ravel(), minlength=num_experts
                )
        offered_physical.append(physical)
        offered_logical.append(logical)
        pairs.append(routed)

    count = rec.physical_count()
    np.testing.assert_array_equal(count.sum(axis=2), np.stack(kept(pairs, buffer_size)))
    np.testing.assert_array_equal(count, np.stack(kept(offered_physical, buffer_size)))
    np.testing.assert_array_equal(rec.logical_count(), np.stack(kept(offered_logical, buffer_size)))


@given(
    location=placements(),
    num_ranks=st.integers(2, 4),
    num_passes=st.integers(1, 5),
    buffer_size=buffer_sizes,
    seed=seeds,
)
def test_merge_of_ranks_sums_exactly(location, num_ranks, num_passes, buffer_size, seed) -> None:
    rng = np.random.default_rng(seed)
    ranks = [
        Recorder(location, buffer_size=buffer_size, ep_rank=r % location.ep_size)
        for r in range(num_ranks)
    ]
    offered: list[list[np.ndarray]] = [[] for _ in ranks]
    for rec in ranks:
        rec.start()
    for _ in range(num_passes):  # the ranks step in lockstep
        for rec, mine in zip(ranks, offered, strict=True):
            mine.append(record_random_pass(rec, rng))
    logical_before = [rec.logical_count() for rec in ranks]
    others_before = [rec.physical_count() for rec in ranks[1:]]

    merged = ranks[0]
    for other in ranks[1:]:
        merged.merge(other)
    expected = sum(stack(kept(mine, buffer_size), location) for mine in offered)
    np.testing.assert_array_equal(merged.physical_count(), expected)
    np.testing.assert_array_equal(merged.logical_count(), sum(logical_before))
    assert merged.num_passes == len(kept(offered[0], buffer_size))
    # The other recorders are left as they were.
    for rec, before in zip(ranks[1:], others_before, strict=True):
        np.testing.assert_array_equal(rec.physical_count(), before)
    # The merged passes' balancedness is that of the summed counts ...
    merged_rates = [reference_balancedness(c, location.ep_size) for c in expected]
    np.testing.assert_allclose(merged.pass_balancedness(), merged_rates, rtol=1e-9)
    # ... and replaces them in the history; passes already dropped from the buffer keep this
    # rank's own rate.
    own = [reference_balancedness(c, location.ep_size) for c in offered[0]]
    history = np.array(own[: num_passes - len(merged_rates)] + merged_rates)
    for window, value in merged.balancedness().items():
        recent = history[-window:]
        if np.isnan(recent).all():
            assert value is None
        else:
            assert value == pytest.approx(np.nanmean(recent), rel=1e-9)


def test_fused_shared_column_is_never_counted() -> None:
    location = moelb.ExpertLocation.trivial(2, 8, 12, ep_size=4)
    config = moelb.TopKConfig(top_k=3, num_fused_shared_experts=1)
    logits = np.random.default_rng(1).standard_normal((10, 8)).astype(np.float32)
    rec = Recorder(location)
    rec.start()
    with rec.forward_pass(), rec.layer(1):
        out = moelb.select_experts(
            logits, config, num_token_non_padded=7, location=location, layer=1, recorder=rec
        )
        assert out.topk_ids.shape == (10, 4) and (out.topk_ids[:7, 3] == 12).all()
        # The full output, shared column included, is not something the recorder accepts.
        with pytest.raises(moelb.InvalidArgumentError, match="num_physical_experts=12"):
            rec.on_select_experts(out.topk_ids)
    count = rec.physical_count()
    assert count[0, 1].sum() == 7 * 3  # routed pairs only, no shared column
    assert count[0, 0].sum() == 0
    np.testing.assert_array_equal(count[0, 1], count_ids(out.topk_ids[:, :3], 12))


def test_hash_router_layers_are_counted_like_the_others() -> None:
    """DeepSeek-V4: the first layers route by token id (HashRouter), the others by score."""
    rng = np.random.default_rng(2)
    num_experts, vocab, top_k, num_tokens, non_padded = 8, 50, 3, 9, 6
    location = random_location(rng, 3, num_experts, ep_size=4, slots_per_rank=3)  # P=12
    tid2eid = rng.integers(0, num_experts, (vocab, top_k)).astype(np.int32)
    router = moelb.HashRouter(tid2eid, num_fused_shared_experts=1, num_experts=num_experts)
    config = moelb.TopKConfig(top_k=top_k, num_fused_shared_experts=1)
    input_ids = rng.integers(0, vocab, num_tokens).astype(np.int32)
    rec = Recorder(location)
    rec.start()
    expected_logical, expected_physical = [], []
    with rec.forward_pass():
        for layer in range(3):
            logits = rng.standard_normal((num_tokens, num_experts)).astype(np.float32)
            with rec.layer(layer):
                if layer < 2:
                    out = router.select(logits, input_ids, non_padded, location, layer, 1, rec)
                    chosen = tid2eid[input_ids[:non_padded]]
                else:
                    out = moelb.select_experts(
                        logits, config, None, non_padded, location, layer, 1, rec
                    )
                    plain = moelb.select_experts(logits, config, num_token_non_padded=non_padded)
                    chosen = plain.recorder_topk_ids[:non_padded]
            assert (out.topk_ids[:non_padded, top_k] == 12).all()  # shared column, not counted
            expected_logical.append(np.bincount(chosen.ravel(), minlength=num_experts))
            expected_physical.append(count_ids(out.topk_ids[:, :top_k], 12))
    np.testing.assert_array_equal(rec.logical_count()[0], expected_logical)
    np.testing.assert_array_equal(rec.physical_count()[0], expected_physical)
    np.testing.assert_array_equal(rec.physical_count()[0].sum(axis=1), [non_padded * top_k] * 3)


# ------------------------------------------------------------------------------------------------
# SGLang's failures (reference sections 9 and 15) are clear errors that count nothing anywhere.

LOCATION = moelb.ExpertLocation.trivial(3, 6, 8, ep_size=2)  # L=3, E=6, P=8, S=4
IDS = np.array([[0, 1], [7, -1], [5, 2]], np.int32)


def hook_outside_layer(rec: Recorder) -> None:
    rec.on_select_experts(IDS)


def dispatch_outside_layer(rec: Recorder) -> None:
    rec.on_dispatch_counts(np.array([1, 2, 3, 4]), ep_rank=1)


def nested_layers(rec: Recorder) -> None:
    with rec.layer(0), rec.layer(1):
        rec.on_select_experts(IDS)


def layer_out_of_range(rec: Recorder) -> None:
    with rec.layer(3):
        rec.on_select_experts(IDS)


def negative_layer(rec: Recorder) -> None:
    with rec.layer(-1):
        rec.on_select_experts(IDS)


def id_equal_to_p(rec: Recorder) -> None:
    with rec.layer(1):
        rec.on_select_experts(np.array([[0, 1], [2, 3], [4, 8]], np.int32))


def id_far_beyond_p(rec: Recorder) -> None:
    with rec.layer(1):
        rec.on_select_experts(np.array([[0, 1], [2, 100]], np.int32))


def id_below_minus_one(rec: Recorder) -> None:
    with rec.layer(1):
        rec.on_select_experts(np.array([[0, 1], [-2, 3]], np.int32))


def select_experts_wrong_layer(rec: Recorder) -> None:
    logits = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    with rec.layer(1):
        moelb.select_experts(
            logits, moelb.TopKConfig(top_k=2), location=LOCATION, layer=2, recorder=rec
        )


def hash_router_wrong_layer(rec: Recorder) -> None:
    router = moelb.HashRouter(np.array([[0, 1], [2, 3], [4, 5]], np.int32))
    logits = np.zeros((3, 6), np.float32)
    with rec.layer(1):
        router.select(
            logits, np.array([0, 1, 2], np.int32), location=LOCATION, layer=0, recorder=rec
        )


def hook_layer_argument_out_of_range(rec: Recorder) -> None:
    with rec.layer(1):
        rec.on_select_experts(IDS, layer=3)


def dispatch_rank_out_of_range(rec: Recorder) -> None:
    with rec.layer(1):
        rec.on_dispatch_counts(np.array([1, 2, 3, 4]), ep_rank=2)


FAILURES = {
    "hook_outside_layer": (hook_outside_layer, r"outside a layer\(\) scope"),
    "dispatch_outside_layer": (dispatch_outside_layer, r"on_dispatch_counts called outside"),
    "nested_layers": (nested_layers, r"cannot be nested.*layer\(0\) is open, layer\(1\)"),
    "layer_out_of_range": (layer_out_of_range, r"layer=3 is outside \[0, num_layers=3\)"),
    "negative_layer": (negative_layer, r"layer=-1 is outside \[0, num_layers=3\)"),
    "id_equal_to_p": (id_equal_to_p, r"topk_ids\[2, 1\] = 8 is outside .*num_physical_experts=8"),
    "id_far_beyond_p": (id_far_beyond_p, r"topk_ids\[1, 1\] = 100 is outside"),
    "id_below_minus_one": (id_below_minus_one, r"topk_ids\[1, 0\] = -2 is outside"),
    "select_experts_wrong_layer": (
        select_experts_wrong_layer,
        r"layer=2 but the recorder's current scope is layer\(1\)",
    ),
    "hash_router_wrong_layer": (
        hash_router_wrong_layer,
        r"layer=0 but the recorder's current scope is layer\(1\)",
    ),
    "hook_layer_argument_out_of_range": (
        hook_layer_argument_out_of_range,
        r"layer=3 but the recorder's current scope is layer\(1\)",
    ),
    "dispatch_rank_out_of_range": (
        dispatch_rank_out_of_range,
        r"ep_rank=2 is outside \[0, ep_size=2",
    ),
}


@pytest.mark.parametrize("name", list(FAILURES))
def test_sglang_failure_is_a_clear_error_that_counts_nothing(name: str) -> None:
    failing, message = FAILURES[name]
    rec = Recorder(LOCATION)
    rec.start()
    with rec.forward_pass(), rec.layer(2):  # an earlier, good pass
        rec.on_select_experts(IDS)
    before = rec.physical_count()
    with rec.forward_pass():
        with pytest.raises(moelb.InvalidArgumentError, match=message):
            failing(rec)
        assert rec.current_layer is None  # the scopes unwound
    count = rec.physical_count()
    assert count.shape == (2, 3, 8)
    np.testing.assert_array_equal(count[0], before[0])
    assert not count[1].any(), "a failed hook counted something"
    # The recorder still works, on the right layer.
    with rec.forward_pass(), rec.layer(0):
        rec.on_select_experts(IDS)
    np.testing.assert_array_equal(rec.physical_count()[2, 0], count_ids(IDS, 8))
    assert not rec.physical_count()[2, 1:].any()


def test_hook_outside_any_forward_pass() -> None:
    rec = Recorder(LOCATION)
    rec.start()
    with pytest.raises(moelb.InvalidArgumentError, match=r"outside a forward_pass\(\) scope"):
        rec.on_select_experts(IDS)
    with pytest.raises(moelb.InvalidArgumentError, match=r"layer\(0\) outside a forward_pass"):
        rec.begin_layer(0)
    assert rec.num_passes == 0


def test_nested_forward_passes_and_unbalanced_scopes() -> None:
    rec = Recorder(LOCATION)
    rec.start()
    with rec.forward_pass(7):
        with pytest.raises(moelb.InvalidArgumentError, match=r"cannot be nested \(pass 7"):
            rec.begin_forward_pass()
        with rec.layer(0):
            with pytest.raises(moelb.InvalidArgumentError, match=r"ends inside the layer\(0\)"):
                rec.end_forward_pass()
            with pytest.raises(moelb.InvalidArgumentError, match=r"start\(\) inside the layer"):
                rec.start()
            rec.on_select_experts(IDS)
        with pytest.raises(moelb.InvalidArgumentError, match="not open"):
            rec.end_layer()
    with pytest.raises(moelb.InvalidArgumentError, match="not open"):
        rec.end_forward_pass()
    np.testing.assert_array_equal(rec.forward_pass_ids(), [7])
    np.testing.assert_array_equal(rec.physical_count()[0, 0], count_ids(IDS, 8))


def test_a_bad_id_anywhere_counts_nothing_of_the_call() -> None:
    """Validation precedes counting: the good ids before the bad one are not counted either."""
    rec = Recorder(LOCATION)
    rec.start()
    ids = np.arange(16, dtype=np.int32).reshape(8, 2) % 8
    ids[-1, -1] = 8
    with rec.forward_pass(), rec.layer(0):
        with pytest.raises(moelb.InvalidArgumentError):
            rec.on_select_experts(ids)
        rec.on_select_experts(ids[:-1])
    np.testing.assert_array_equal(rec.physical_count()[0, 0], count_ids(ids[:-1], 8))


# ------------------------------------------------------------------------------------------------
# The ids the routers hand the recorder must be slots of the recorder's placement (issue 16).


def _routers(num_experts: int, top_k: int):
    """select_experts and HashRouter.select as one signature: (logits, location, layer, rec)."""
    config = moelb.TopKConfig(top_k=top_k)
    tid2eid = np.stack([np.roll(np.arange(num_experts), -i)[:top_k] for i in range(num_experts)])
    router = moelb.HashRouter(tid2eid.astype(np.int32), num_experts=num_experts)

    def by_score(logits, location, layer, rec):
        return moelb.select_experts(logits, config, location=location, layer=layer, recorder=rec)

    def by_hash(logits, location, layer, rec):
        input_ids = np.zeros(len(logits), np.int32)  # token 0: experts 0..top_k-1, the hot one
        return router.select(logits, input_ids, location=location, layer=layer, recorder=rec)

    return {"select_experts": by_score, "HashRouter": by_hash}


ID_SPACE_ROUTERS = ("select_experts", "HashRouter")


def _hot_logits(num_tokens: int, num_experts: int) -> np.ndarray:
    """Every token's best expert is expert 0 (the hot expert)."""
    logits = -np.tile(np.arange(num_experts, dtype=np.float32), (num_tokens, 1))
    return np.ascontiguousarray(logits)


@pytest.mark.parametrize("router", ID_SPACE_ROUTERS)
def test_logical_ids_are_refused_by_a_recorder_of_a_placement(router: str) -> None:
    """A recorder built from a placement with redundant slots, fed the routers' logical ids (no
    location): expert e would be counted on slot e, i.e. on whatever expert slot e holds."""
    num_experts = 8
    # Slot p holds expert (p + 3) % 8 for p < 8, then replicas of experts 0..3.
    phy2log = np.array([[(p + 3) % num_experts for p in range(8)] + [0, 1, 2, 3]] * 2, np.int32)
    location = moelb.ExpertLocation(phy2log, num_experts, ep_size=4)
    select = _routers(num_experts, 2)[router]
    rec = Recorder(location)
    rec.start()
    with rec.forward_pass(), rec.layer(1):
        with pytest.raises(moelb.InvalidArgumentError, match="location") as info:
            select(_hot_logits(num_experts, num_experts), None, 1, rec)
        assert "logical" in str(info.value)
        # The same call with the recorder's placement is counted, on the hot expert's slots.
        out = select(_hot_logits(num_experts, num_experts), location, 1, rec)
    logical = rec.logical_count()
    assert logical.shape == (1, 2, num_experts)
    chosen = phy2log[1][out.recorder_topk_ids]  # the experts the slots hold
    np.testing.assert_array_equal(logical[0, 1], np.bincount(chosen.ravel(), minlength=8))
    assert logical[0, 1, 0] == num_experts  # every token's first choice: the hot expert
    assert logical[0, 0].sum() == 0


@pytest.mark.parametrize("router", ID_SPACE_ROUTERS)
def test_another_placement_is_refused(router: str) -> None:
    num_experts = 8
    rng = np.random.default_rng(4)
    mine = random_location(rng, 2, num_experts, ep_size=4, slots_per_rank=3)
    other = random_location(rng, 2, num_experts, ep_size=4, slots_per_rank=3)
    assert not np.array_equal(mine.physical_to_logical, other.physical_to_logical)
    select = _routers(num_experts, 2)[router]
    logits = _hot_logits(5, num_experts)
    rec = Recorder(mine)
    rec.start()
    with rec.forward_pass(), rec.layer(0):
        with pytest.raises(moelb.InvalidArgumentError, match="location"):
            select(logits, other, 0, rec)
        # An equal placement built separately is the same id space.
        copy = moelb.ExpertLocation(mine.physical_to_logical, num_experts, mine.ep_size)
        out = select(logits, copy, 0, rec)
    np.testing.assert_array_equal(rec.physical_count()[0, 0], count_ids(out.recorder_topk_ids, 12))
    # After set_location the old placement is another id space; the new one is accepted.
    rec.set_location(other)
    with rec.forward_pass(), rec.layer(0):
        with pytest.raises(moelb.InvalidArgumentError, match="location"):
            select(logits, mine, 0, rec)
        select(logits, other, 0, rec)
    assert rec.physical_count()[1, 0].sum() == 5 * 2


@pytest.mark.parametrize("router", ID_SPACE_ROUTERS)
def test_shape_recorder_takes_unmapped_ids_only_when_slots_are_experts(router: str) -> None:
    num_experts = 8
    select = _routers(num_experts, 2)[router]
    logits = _hot_logits(6, num_experts)
    # (L, P) with P == E: logical = physical, the ids are slots; counted as they are.
    rec = Recorder((2, num_experts), ep_size=2)
    rec.start()
    with rec.forward_pass(), rec.layer(1):
        out = select(logits, None, 1, rec)
    np.testing.assert_array_equal(
        rec.logical_count()[0, 1], np.bincount(out.recorder_topk_ids.ravel(), minlength=8)
    )
    # (L, P) with P != E: slot e is not expert e's slot (experts 8..11 do not exist).
    wide = Recorder((2, 12))
    wide.start()
    with wide.forward_pass(), wide.layer(1):
        with pytest.raises(moelb.InvalidArgumentError, match="location"):
            select(logits, None, 1, wide)
    assert not wide.physical_count().any()


@pytest.mark.parametrize("router", ID_SPACE_ROUTERS)
def test_a_placement_is_refused_by_a_shape_recorder_of_other_slots(router: str) -> None:
    """location given (P = 12 slots) but the recorder was built for (L, 16) slots: the ids fit
    its range, and would be read as experts 0..15 of a layout where slot p holds expert p."""
    num_experts = 8
    location = moelb.ExpertLocation.trivial(2, num_experts, 12, ep_size=4)
    select = _routers(num_experts, 2)[router]
    for shape in ((2, 16), (2, 12), (2, 8)):
        rec = Recorder(shape)
        rec.start()
        with rec.forward_pass(), rec.layer(0):
            with pytest.raises(moelb.InvalidArgumentError, match="location"):
                select(_hot_logits(4, num_experts), location, 0, rec)
        assert not rec.physical_count().any(), shape
    # A shape recorder and a location with the identity layout (P == E) agree.
    identity = moelb.ExpertLocation.trivial(2, num_experts, num_experts, ep_size=2)
    rec = Recorder((2, num_experts), ep_size=2)
    rec.start()
    with rec.forward_pass(), rec.layer(0):
        select(_hot_logits(4, num_experts), identity, 0, rec)
    assert rec.physical_count()[0, 0].sum() == 4 * 2


# ------------------------------------------------------------------------------------------------
# Bad topk_ids.


@pytest.mark.parametrize(
    ("ids", "error", "message"),
    [
        (
            IDS.astype(np.int64),
            moelb.InvalidDTypeError,
            "topk_ids must have dtype int32, got int64",
        ),
        (IDS.astype(np.float32), moelb.InvalidDTypeError, "topk_ids must have dtype int32"),
        (IDS.astype(np.uint32), moelb.InvalidDTypeError, "topk_ids must have dtype int32"),
        (IDS.tolist(), moelb.InvalidDTypeError, "topk_ids must have dtype int32"),
        (IDS.ravel(), moelb.InvalidArgumentError, r"topk_ids must be 2-D, got shape \(6,\)"),
        (IDS[None], moelb.InvalidArgumentError, r"topk_ids must be 2-D, got shape \(1, 3, 2\)"),
        (np.zeros((3, 4), np.int32)[:, ::2], moelb.InvalidArgumentError, "C-contiguous"),
        (np.asfortranarray(np.zeros((3, 2), np.int32)), moelb.InvalidArgumentError, "C-contiguous"),
        ("0 1", moelb.InvalidDTypeError, "topk_ids"),
    ],
    ids=["int64", "float32", "uint32", "list", "1d", "3d", "strided", "fortran", "str"],
)
def test_bad_topk_ids(ids, error, message) -> None:
    rec = Recorder(LOCATION)
    rec.start()
    with rec.forward_pass(), rec.layer(0):
        with pytest.raises(error, match=message) as info:
            rec.on_select_experts(ids)
    assert isinstance(info.value, moelb.InvalidArgumentError)
    if error is moelb.InvalidDTypeError:
        assert isinstance(info.value, TypeError)
    assert not rec.physical_count().any()


def test_torch_ids() -> None:
    torch = pytest.importorskip("torch")
    rec = Recorder(LOCATION)
    rec.start()
    with rec.forward_pass(), rec.layer(1):
        rec.on_select_experts(torch.from_numpy(IDS))
        with pytest.raises(moelb.InvalidDTypeError, match="topk_ids must have dtype int32"):
            rec.on_select_experts(torch.from_numpy(IDS).long())
    np.testing.assert_array_equal(rec.physical_count()[0, 1], count_ids(IDS, 8))


def test_empty_ids_count_nothing() -> None:
    rec = Recorder(LOCATION)
    rec.start()
    with rec.forward_pass(), rec.layer(0):
        rec.on_select_experts(np.zeros((0, 8), np.int32))
        rec.on_select_experts(np.full((5, 8), -1, np.int32))
    assert rec.num_passes == 1 and not rec.physical_count().any()


# ------------------------------------------------------------------------------------------------
# Low-latency dispatch counts (reference section 5.3).


def test_low_latency_counts_drop_trailing_shared_slots() -> None:
    location = moelb.ExpertLocation.trivial(2, 4, 4, ep_size=2)  # S=2
    rec = Recorder(location)
    rec.start()
    with rec.forward_pass():
        with rec.layer(0):
            rec.on_dispatch_counts(
                np.array([3, 5, 101, 103]), ep_rank=1, num_trailing_shared_slots=2
            )
            rec.on_dispatch_counts([1, 2], ep_rank=0)
        with rec.layer(1):
            rec.on_dispatch_counts(np.array([1, 2, 99], np.int32), 0, num_trailing_shared_slots=1)
            rec.on_dispatch_counts([3, 4, 5, 99], 0, num_trailing_shared_slots=np.int64(2))
    np.testing.assert_array_equal(rec.physical_count()[0], [[1, 2, 3, 5], [4, 6, 0, 0]])


@pytest.mark.parametrize("value", [True, False, 1.5, "1", None, np.bool_(True)])
def test_low_latency_trailing_slots_type(value) -> None:
    rec = Recorder(moelb.ExpertLocation.trivial(1, 4, 4, ep_size=2))
    rec.start()
    with rec.forward_pass(), rec.layer(0):
        with pytest.raises(TypeError, match="num_trailing_shared_slots must be an int"):
            rec.on_dispatch_counts([3, 5, 101, 103], 0, num_trailing_shared_slots=value)
    assert not rec.physical_count().any()


@pytest.mark.parametrize(
    ("counts", "trailing", "message"),
    [
        ([3, 5, 101, 103], -1, r"num_trailing_shared_slots=-1 is outside \[0, len\(local_counts\)"),
        ([3, 5, 101, 103], 5, r"num_trailing_shared_slots=5 is outside \[0, len\(local_counts\)=4"),
        ([3, 5, 101, 103], 1, "local_counts has 4 entries; expected 2"),
        ([1, 2, 3], 0, "local_counts has 3 entries; expected 2"),
        ([1], 0, "expected 2"),
        ([1, -2], 0, r"local_counts\[1\] = -2 is not a token count"),
        ([1, 2**31], 0, r"local_counts\[1\] = 2147483648 is not a token count"),
        ([[1, 2]], 0, "local_counts must be 1-D"),
        ([1.0, 2.0], 0, "local_counts must hold integers"),
    ],
)
def test_low_latency_bad_counts(counts, trailing, message) -> None:
    rec = Recorder(moelb.ExpertLocation.trivial(1, 4, 4, ep_size=2))
    rec.start()
    with rec.forward_pass(), rec.layer(0):
        with pytest.raises(moelb.InvalidArgumentError, match=message):
            rec.on_dispatch_counts(counts, 1, num_trailing_shared_slots=trailing)
    assert not rec.physical_count().any()


# ------------------------------------------------------------------------------------------------
# Buffer.


def test_infinite_buffer_keeps_every_pass_in_order() -> None:
    """reference section 14, test_expert_distribution_buffer.py: rows 0..129 (and more)."""
    rec = Recorder((1, 4), buffer_size=-1)
    rec.start()
    num_passes = 135
    for i in range(num_passes):
        with rec.forward_pass(), rec.layer(0):
            rec.on_dispatch_counts([i, 1, 0, 2], ep_rank=0)
    count = rec.physical_count()
    assert count.shape == (num_passes, 1, 4)
    np.testing.assert_array_equal(count[:, 0, 0], np.arange(num_passes))
    np.testing.assert_array_equal(rec.forward_pass_ids(), np.arange(num_passes))
    np.testing.assert_array_equal(rec.logical_count()[:, 0, 0], np.arange(num_passes))


def test_ring_buffer_keeps_the_latest_passes_in_time_order() -> None:
    rec = Recorder((1, 4), buffer_size=5)
    rec.start()
    for i in range(13):
        with rec.forward_pass(100 + i), rec.layer(0):
            rec.on_dispatch_counts([i, 0, 0, 0], ep_rank=0)
    np.testing.assert_array_equal(rec.physical_count()[:, 0, 0], np.arange(8, 13))
    np.testing.assert_array_equal(rec.forward_pass_ids(), np.arange(108, 113))
    assert rec.logical_count().shape == (5, 1, 4)


def test_idle_passes_are_kept_as_zero_rows() -> None:
    rec = Recorder((2, 4))
    rec.start()
    with rec.forward_pass():
        pass
    with rec.forward_pass(), rec.layer(1):
        rec.on_select_experts(np.array([[3]], np.int32))
    np.testing.assert_array_equal(rec.physical_count(), [[[0] * 4] * 2, [[0] * 4, [0, 0, 0, 1]]])


# ------------------------------------------------------------------------------------------------
# Balancedness (reference section 7.2: SGLang's, dense and idle layers count 1.0; more in
# test_balancedness.py).


@given(
    num_layers=st.integers(1, 4),
    ep_size=st.integers(1, 5),
    slots=st.integers(1, 4),
    seed=seeds,
)
def test_pass_balancedness_matches_numpy(num_layers, ep_size, slots, seed) -> None:
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 20, (num_layers, ep_size * slots)).astype(np.int32)
    counts[rng.random(num_layers) < 0.3] = 0  # dense layers
    counts[rng.random(counts.shape) < 0.3] = 0
    got = moelb.pass_balancedness(counts, ep_size)
    assert got == pytest.approx(reference_balancedness(counts, ep_size), rel=1e-12)
    assert 0 < got <= 1


def test_pass_balancedness_examples() -> None:
    # Layer 0: GPUs [4, 0] -> (2 + eps) / (4 + eps); layer 1 is dense and counts 1.0, as in
    # SGLang (the variant over the layers with tokens has its own name: layers="active").
    counts = np.array([[1, 3, 0, 0], [0, 0, 0, 0]], np.int32)
    rate = (2 + EPS) / (4 + EPS)
    assert moelb.pass_balancedness(counts, 2) == pytest.approx((rate + 1) / 2, rel=1e-12)
    assert moelb.pass_balancedness(counts, 2, layers="active") == pytest.approx(rate, rel=1e-12)
    assert moelb.pass_balancedness(np.array([[5, 5, 5, 5]]), 4) == pytest.approx(1.0)
    assert moelb.pass_balancedness(np.zeros((3, 4), np.int32), 2) == 1.0
    assert math.isnan(moelb.pass_balancedness(np.zeros((3, 4), np.int32), 2, layers="active"))
    with pytest.raises(moelb.InvalidArgumentError, match="ep_size=3"):
        moelb.pass_balancedness(counts, 3)
    with pytest.raises(moelb.InvalidArgumentError, match="counts must be 2-D"):
        moelb.pass_balancedness(counts.ravel(), 2)


def test_recorder_balancedness_windows() -> None:
    rng = np.random.default_rng(3)
    ep_size, num_passes = 4, 1100
    location = random_location(rng, 3, 10, ep_size=ep_size, slots_per_rank=3)
    unbounded = Recorder(location, buffer_size=-1)
    bounded = Recorder(location)  # buffer_size=1000
    small = Recorder(location, buffer_size=5)  # the history keeps 1000 passes regardless
    recorders = (unbounded, bounded, small)
    for rec in recorders:
        rec.start()
    for _ in range(num_passes):
        ids = rng.integers(0, 12, (int(rng.integers(1, 6)), 2)).astype(np.int32)
        layer = int(rng.integers(0, 3))
        for rec in recorders:
            with rec.forward_pass(), rec.layer(layer):
                rec.on_select_experts(ids)
    expected = np.array([reference_balancedness(c, ep_size) for c in unbounded.physical_count()])
    assert expected.shape == (num_passes,) and not np.isnan(expected).any()
    np.testing.assert_allclose(unbounded.pass_balancedness(), expected, rtol=1e-12)
    np.testing.assert_allclose(bounded.pass_balancedness(), expected[-1000:], rtol=1e-12)
    np.testing.assert_allclose(small.pass_balancedness(), expected[-5:], rtol=1e-12)
    for rec in recorders:
        windows = rec.balancedness()
        assert sorted(windows) == [10, 100, 1000]
        for window, value in windows.items():
            assert value == pytest.approx(expected[-window:].mean(), rel=1e-9), window
    # The stat dump's window average is the 1000-pass mean.
    dump = bounded.dump()
    assert dump["average_utilization_rate_over_window"] == pytest.approx(
        expected[-1000:].mean(), rel=1e-9
    )
    assert dump["logical_count"].shape == (1000, 3, 10)
    # The history is a rolling monitor: it survives dump(), only start() clears it.
    assert bounded.num_passes == 0
    assert bounded.balancedness() == pytest.approx(windows)
    bounded.start()
    assert bounded.balancedness() == {10: None, 100: None, 1000: None}


def test_idle_passes_count_one_as_in_sglang() -> None:
    rec = Recorder((2, 4), ep_size=2)
    rec.start()
    with rec.forward_pass(), rec.layer(0):
        rec.on_select_experts(np.array([[0, 1, 2]], np.int32))  # GPUs [2, 1]
    for _ in range(3):
        with rec.forward_pass():
            pass
    with rec.forward_pass(), rec.layer(1):
        rec.on_select_experts(np.array([[0, 3]], np.int32))  # GPUs [1, 1]
    rates = rec.pass_balancedness()
    # Pass 0: layer 0 GPUs [2, 1], layer 1 dense (1.0); passes 1-3 idle: 1.0 (SGLang appends
    # every pass); pass 4: layer 0 dense, layer 1 GPUs [1, 1].
    assert rates[0] == pytest.approx(((1.5 + EPS) / (2 + EPS) + 1) / 2)
    np.testing.assert_array_equal(rates[1:4], 1.0)
    assert rates[4] == pytest.approx(1.0)
    mean = rates.mean()
    assert mean == pytest.approx((4 + rates[0]) / 5)
    assert rec.balancedness() == pytest.approx({10: mean, 100: mean, 1000: mean})
    assert rec.dump()["average_utilization_rate_over_window"] == pytest.approx(mean)


def test_no_pass_gives_no_balancedness_and_an_idle_one_gives_one() -> None:
    rec = Recorder((2, 4), ep_size=2)
    rec.start()
    assert rec.balancedness() == {10: None, 100: None, 1000: None}
    with rec.forward_pass():
        pass
    assert rec.balancedness() == {10: 1.0, 100: 1.0, 1000: 1.0}
    assert rec.dump()["average_utilization_rate_over_window"] == 1.0
    with pytest.raises(moelb.InvalidArgumentError, match="window must be positive"):
        rec.average_balancedness(0)


# ------------------------------------------------------------------------------------------------
# Threads.


def test_concurrent_hooks_lose_no_count() -> None:
    num_threads, calls = 8, 150
    rng = np.random.default_rng(4)
    location = moelb.ExpertLocation.trivial(2, 64, 64, ep_size=8)
    batches = []
    for _ in range(num_threads):
        ids = rng.integers(0, 64, (256, 8)).astype(np.int32)
        ids[rng.random(ids.shape) < 0.1] = -1
        batches.append(ids)
    rec = Recorder(location)
    rec.start()
    barrier = threading.Barrier(num_threads)
    errors: list[BaseException] = []

    def work(ids: np.ndarray) -> None:
        try:
            barrier.wait()
            for _ in range(calls):
                rec.on_select_experts(ids, layer=1)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    with rec.forward_pass(), rec.layer(1):
        threads = [threading.Thread(target=work, args=(ids,)) for ids in batches]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    expected = calls * sum(count_ids(ids, 64) for ids in batches)
    count = rec.physical_count()
    np.testing.assert_array_equal(count[0, 1], expected)
    assert not count[0, 0].any()
    assert count.sum() == calls * sum(int((ids >= 0).sum()) for ids in batches)


# ------------------------------------------------------------------------------------------------
# Life cycle.


def test_not_recording_until_start_and_stop_keeps_data() -> None:
    rec = Recorder(LOCATION)
    assert not rec.recording
    with rec.forward_pass(), rec.layer(0):
        rec.on_select_experts(IDS)  # validated, not counted
        with pytest.raises(moelb.InvalidArgumentError):  # still validated while not recording
            rec.on_select_experts(np.array([[9]], np.int32))
    assert rec.num_passes == 0
    rec.start()
    assert rec.recording
    with rec.forward_pass(), rec.layer(0):
        rec.on_select_experts(IDS)
    rec.stop()
    assert not rec.recording
    with rec.forward_pass(), rec.layer(0):
        rec.on_select_experts(IDS)
    assert rec.num_passes == 1  # stop() keeps what was recorded and records no more
    np.testing.assert_array_equal(rec.physical_count()[0, 0], count_ids(IDS, 8))
    assert rec.dump()["logical_count"].sum() == count_ids(IDS, 8).sum()


def test_start_clears() -> None:
    rec = Recorder(LOCATION)
    rec.start()
    for _ in range(3):
        with rec.forward_pass(), rec.layer(0):
            rec.on_select_experts(IDS)
    rec.start()  # restarting clears the window and the balancedness history
    assert rec.num_passes == 0 and rec.recording
    assert rec.balancedness() == {10: None, 100: None, 1000: None}
    with rec.forward_pass(), rec.layer(2):
        rec.on_select_experts(IDS)
    assert rec.num_passes == 1
    assert rec.physical_count()[0, 2].sum() == 5


def test_dump_clears_the_window_and_recording_continues() -> None:
    rec = Recorder(LOCATION)
    rec.start()
    for layer in range(3):
        with rec.forward_pass(), rec.layer(layer):
            rec.on_select_experts(IDS)
    dump = rec.dump()
    assert set(dump) == {"rank", "logical_count", "average_utilization_rate_over_window"}
    assert dump["rank"] == 0
    assert dump["logical_count"].dtype == np.int32 and dump["logical_count"].shape == (3, 3, 6)
    np.testing.assert_array_equal(dump["logical_count"].sum(axis=2), np.eye(3) * 5)
    assert rec.recording and rec.num_passes == 0
    assert rec.balancedness()[10] == pytest.approx(dump["average_utilization_rate_over_window"])
    with pytest.raises(moelb.InvalidArgumentError, match="nothing to dump"):
        rec.dump()
    with rec.forward_pass(), rec.layer(1):
        rec.on_select_experts(IDS)
    second = rec.dump()
    assert second["logical_count"].shape == (1, 3, 6)
    assert second["logical_count"][0, 1].sum() == 5 and second["logical_count"].sum() == 5


def test_failed_forward_pass_is_dropped() -> None:
    rec = Recorder(LOCATION)
    rec.start()
    with pytest.raises(RuntimeError, match="model failed"):
        with rec.forward_pass(), rec.layer(0):
            rec.on_select_experts(IDS)
            raise RuntimeError("model failed")
    assert rec.num_passes == 0 and rec.current_layer is None
    with rec.forward_pass(), rec.layer(1):  # the next pass is not blocked
        rec.on_select_experts(IDS)
    assert rec.num_passes == 1 and rec.physical_count()[0, 0].sum() == 0


def test_forward_pass_ids() -> None:
    rec = Recorder(LOCATION)
    rec.start()
    for pass_id in (None, None, 10, None):
        with rec.forward_pass(pass_id):
            pass
    np.testing.assert_array_equal(rec.forward_pass_ids(), [0, 1, 10, 11])


def test_set_location_applies_to_later_passes() -> None:
    rng = np.random.default_rng(5)
    first = moelb.ExpertLocation.trivial(3, 6, 8, ep_size=2)
    second = random_location(rng, 3, 6, ep_size=2, slots_per_rank=4)
    assert not np.array_equal(first.physical_to_logical, second.physical_to_logical)
    rec = Recorder(first)
    rec.start()
    ids = rng.integers(0, 8, (20, 3)).astype(np.int32)
    for location in (first, second):
        if location is second:
            rec.set_location(second)
        with rec.forward_pass():
            for layer in range(3):
                with rec.layer(layer):
                    rec.on_select_experts(ids)
    assert rec.location == second
    physical = rec.physical_count()
    np.testing.assert_array_equal(physical[0], physical[1])  # same physical ids
    logical = rec.logical_count()
    np.testing.assert_array_equal(
        logical[:1], to_logical(physical[:1], first.physical_to_logical, 6)
    )
    np.testing.assert_array_equal(
        logical[1:], to_logical(physical[1:], second.physical_to_logical, 6)
    )
    assert not np.array_equal(logical[0], logical[1])
    with pytest.raises(moelb.InvalidArgumentError, match="the new location has num_layers=2"):
        rec.set_location(moelb.ExpertLocation.trivial(2, 6, 8, ep_size=2))
    with pytest.raises(moelb.InvalidArgumentError, match="num_physical_experts=12"):
        rec.set_location(moelb.ExpertLocation.trivial(3, 6, 12, ep_size=2))


def test_set_location_inside_a_pass_is_refused() -> None:
    """Slots counted after a switch between layers were converted with the old placement."""
    rng = np.random.default_rng(6)
    first = moelb.ExpertLocation.trivial(3, 6, 8, ep_size=2)
    second = random_location(rng, 3, 6, ep_size=2, slots_per_rank=4)
    rec = Recorder(first)
    rec.start()
    ids = rng.integers(0, 8, (20, 3)).astype(np.int32)
    with rec.forward_pass():
        with rec.layer(0):
            rec.on_select_experts(ids)
        with pytest.raises(moelb.InvalidArgumentError, match="set_location inside a forward pass"):
            rec.set_location(second)
        with rec.layer(1):
            rec.on_select_experts(ids)
    assert rec.location == first
    rec.set_location(second)  # between passes: fine
    assert rec.location == second
    with pytest.raises(moelb.InvalidArgumentError, match="ep_size=4"):
        rec.set_location(moelb.ExpertLocation.trivial(3, 6, 8, ep_size=4))
    assert rec.location == second


def test_merge_errors_change_nothing() -> None:
    a, b = Recorder(LOCATION), Recorder(LOCATION, ep_rank=1)
    for rec in (a, b):
        rec.start()
        with rec.forward_pass(), rec.layer(0):
            rec.on_select_experts(IDS)
    with b.forward_pass():  # b holds one more pass
        pass
    with pytest.raises(
        moelb.InvalidArgumentError, match="other holds 2 passes but this recorder holds 1"
    ):
        a.merge(b)
    with pytest.raises(moelb.InvalidArgumentError, match="cannot be merged with itself"):
        a.merge(a)
    with pytest.raises(moelb.InvalidArgumentError, match="other has mode 'per_pass'"):
        a.merge(Recorder(LOCATION, mode="per_pass"))
    c = Recorder(LOCATION)
    c.start()
    c.set_location(moelb.ExpertLocation(np.tile([5, 4, 3, 2, 1, 0, 0, 1], (3, 1)), 6, 2))
    with c.forward_pass(), c.layer(0):
        c.on_select_experts(IDS)
    with pytest.raises(moelb.InvalidArgumentError, match="different placements"):
        a.merge(c)
    assert a.num_passes == 1
    np.testing.assert_array_equal(a.physical_count()[0, 0], count_ids(IDS, 8))


# ------------------------------------------------------------------------------------------------
# Construction and per-token mode.


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "stat_approx"}, "mode='stat_approx' is not a recorder mode"),
        ({"buffer_size": 0}, "buffer_size must be positive"),
        ({"ep_rank": 2}, r"ep_rank=2 is outside \[0, ep_size=2\)"),
        ({"ep_rank": -1}, r"ep_rank=-1 is outside"),
    ],
)
def test_constructor_errors(kwargs, message) -> None:
    with pytest.raises(moelb.InvalidArgumentError, match=message):
        Recorder(LOCATION, **kwargs)


@pytest.mark.parametrize("location", ["abc", (3,), (3, "x"), None])
def test_bad_location(location) -> None:
    with pytest.raises(moelb.InvalidArgumentError, match="location must be an ExpertLocation"):
        Recorder(location)


def test_shape_location_is_trivial() -> None:
    rec = Recorder((2, 8), ep_size=4, ep_rank=3)
    assert (rec.num_layers, rec.num_physical_experts, rec.ep_rank) == (2, 8, 3)
    np.testing.assert_array_equal(rec.location.physical_to_logical, np.tile(np.arange(8), (2, 1)))
    assert rec.location.ep_size == 4 and rec.mode == "stat" and rec.buffer_size == 1000


def test_per_token_mode_keeps_the_ids() -> None:
    rec = Recorder(LOCATION, mode="per_token")
    rec.start()
    more = np.array([[6, 6], [-1, -1]], np.int32)
    with rec.forward_pass():
        with rec.layer(1):
            rec.on_select_experts(IDS)
            rec.on_select_experts(more)
            with pytest.raises(moelb.InvalidArgumentError, match="topk_ids has 3 columns"):
                rec.on_select_experts(np.zeros((1, 3), np.int32))
    np.testing.assert_array_equal(rec.token_ids(0, 1), np.concatenate([IDS, more]))
    assert rec.token_ids(0, 0).shape[0] == 0
    np.testing.assert_array_equal(
        rec.physical_count()[0, 1], count_ids(IDS, 8) + count_ids(more, 8)
    )
    # Merging another rank's per-token recorder appends its tokens.
    other = Recorder(LOCATION, mode="per_token", ep_rank=1)
    other.start()
    with other.forward_pass(), other.layer(1):
        other.on_select_experts(more[::-1].copy())
    rec.merge(other)
    np.testing.assert_array_equal(rec.token_ids(0, 1), np.concatenate([IDS, more, more[::-1]]))
    np.testing.assert_array_equal(
        rec.physical_count()[0, 1], count_ids(IDS, 8) + 2 * count_ids(more, 8)
    )
    with pytest.raises(moelb.InvalidArgumentError, match=r"pass_index=1 is outside \[-1, 1\)"):
        rec.token_ids(1, 0)
    with pytest.raises(moelb.InvalidArgumentError, match="layer=3 is outside"):
        rec.token_ids(0, 3)
    with pytest.raises(moelb.InvalidArgumentError, match="token_ids needs mode='per_token'"):
        Recorder(LOCATION).token_ids(0, 0)
    record = rec.dump()["records"][0]
    assert record["topk_ids_of_layer"].shape == (3, 7, 2)
    np.testing.assert_array_equal(
        record["topk_ids_of_layer"][1], np.concatenate([IDS, more, more[::-1]])
    )
    assert (record["topk_ids_of_layer"][[0, 2]] == -1).all()


def test_explicit_forward_pass_ids_must_grow() -> None:
    recorder = moelb.ExpertDistributionRecorder((1, 4))
    recorder.start()
    with recorder.forward_pass(5):
        pass
    with pytest.raises(moelb.InvalidArgumentError, match="forward_pass_id=5 does not increase"):
        recorder.begin_forward_pass(5)
    with recorder.forward_pass():  # the default continues after the last id
        pass
    assert recorder.forward_pass_ids().tolist() == [5, 6]
