"""The DeepSeek MoE layer against a float32 NumPy reference written here (routing from the float64
routing reference), the deferred / in-place orders, the peak-memory formula, get_moe_weights
(SGLang's test), EPLB weight moves applied to the layer, threads and bad input."""

from __future__ import annotations

import moelb
import numpy as np
import pytest
from routing_reference import reference_route


def small_v3(**changes) -> moelb.DeepSeekMoEConfig:
    shape = dict(
        hidden_size=64, intermediate_size=32, num_experts=16, top_k=4, num_groups=4, topk_group=2
    )
    return moelb.DeepSeekMoEConfig.deepseek_v3().replace(**{**shape, **changes})


def small_v4(layer_id: int, **changes) -> moelb.DeepSeekMoEConfig:
    shape = dict(hidden_size=48, intermediate_size=24, num_experts=12, top_k=3, vocab_size=100)
    return moelb.DeepSeekMoEConfig.deepseek_v4_flash(layer_id).replace(**{**shape, **changes})


def swiglu_mlp(
    x: np.ndarray, gate_up: np.ndarray, down: np.ndarray, limit: float | None
) -> np.ndarray:
    """float32: down(silu(min(g, L)) * clamp(u, -L, L)), gate_up [2W, H], down [H, W]."""
    width = down.shape[1]
    gu = x @ gate_up.T
    g, u = gu[:, :width], gu[:, width:]
    if limit:
        g = np.minimum(g, np.float32(limit))
        u = np.clip(u, -np.float32(limit), np.float32(limit))
    act = g / (np.float32(1) + np.exp(-g)) * u
    return act @ down.T


def reference_forward(
    config: moelb.DeepSeekMoEConfig, w: dict, x: np.ndarray, input_ids: np.ndarray | None = None
) -> np.ndarray:
    """out = rsf * sum_k w_k expert_k(x) + shared(x), in float32 (routing in float64)."""
    logits = x @ w["gate"].T
    ids, weights = reference_route(config, logits, w, input_ids)
    out = np.zeros_like(x)
    for e in range(config.num_experts):
        rows, cols = np.nonzero(ids == e)
        if len(rows) == 0:
            continue
        y = swiglu_mlp(x[rows], w["w13"][e], w["w2"][e], config.swiglu_limit)
        np.add.at(out, rows, weights[rows, cols, None].astype(np.float32) * y)
    out *= np.float32(config.routed_scaling_factor)
    if config.num_shared_experts > 0:
        limit = (
            config.swiglu_limit
            if config.shared_swiglu_limit is None
            else (config.shared_swiglu_limit)
        )
        out += swiglu_mlp(x, w["shared_gate_up"], w["shared_down"], limit)
    return out


def assert_close(got: np.ndarray, want: np.ndarray, rel: float = 1e-5) -> None:
    scale = float(np.abs(want).max())
    assert scale > 0
    np.testing.assert_allclose(got, want, rtol=0, atol=rel * scale)


CASES = {
    "v3-separate": (small_v3(), 2.0),
    "v3-fused": (small_v3(fuse_shared_experts=True), 2.0),
    "v3-no-shared": (small_v3(num_shared_experts=0), 2.0),
    "v3-two-shared": (small_v3(num_shared_experts=2), 2.0),
    "v4-learned-clamp": (small_v4(3), 6.0),
    "v4-learned-no-clamp": (small_v4(3, swiglu_limit=None), 6.0),
    "v4-learned-routed-clamp-only": (small_v4(4, shared_swiglu_limit=0.0), 6.0),
    "v4-hash-clamp": (small_v4(0), 6.0),
    "v4-hash-no-clamp": (small_v4(2, swiglu_limit=None), 6.0),
    "v4-hash-fused": (small_v4(1, fuse_shared_experts=True), 2.0),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_numpy_reference(name: str) -> None:
    config, scale = CASES[name]
    rng = np.random.default_rng(sorted(CASES).index(name))
    weights = moelb.random_moe_weights(config, seed=7)
    x = (rng.standard_normal((200, config.hidden_size)) * scale).astype(np.float32)
    ids = rng.integers(0, config.vocab_size, 200) if config.is_hash_layer else None
    layer = moelb.DeepSeekMoE(config, weights)
    got = layer(x, ids)
    want_config = config.replace(fuse_shared_experts=False)  # fused == separate mathematically
    assert_close(got, reference_forward(want_config, weights, x, ids))
    if config.swiglu_limit:  # the clamp matters for these activations
        unclamped = reference_forward(
            want_config.replace(swiglu_limit=None, shared_swiglu_limit=None), weights, x, ids
        )
        assert np.abs(unclamped - got).max() > 1e-3 * np.abs(got).max()


def test_rsf_applied_exactly_once() -> None:
    base = small_v3(num_shared_experts=0)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((50, base.hidden_size)).astype(np.float32)
    w = moelb.random_moe_weights(base, 3)
    one = moelb.DeepSeekMoE(base.replace(routed_scaling_factor=1.0), w)(x)
    four = moelb.DeepSeekMoE(base.replace(routed_scaling_factor=4.0), w)(x)
    np.testing.assert_allclose(four, 4 * one, rtol=1e-6, atol=1e-6)


def test_orders_bitwise_identical_and_peak_formula() -> None:
    config = small_v3()
    w = moelb.random_moe_weights(config, 11)
    x = np.random.default_rng(2).standard_normal((300, config.hidden_size)).astype(np.float32)
    results = {}
    for kernel, defer in (
        ("out_of_place", "auto"),
        ("out_of_place", False),
        ("inplace", "auto"),
        ("inplace", False),
    ):
        cfg = config.replace(kernel=kernel, defer_shared=defer)
        layer = moelb.DeepSeekMoE(cfg, w)
        hidden = x.copy()
        out = layer(hidden)
        stats = layer.last_stats()
        if kernel == "inplace":
            assert out is hidden  # written into the input
        else:
            np.testing.assert_array_equal(hidden, x)  # the input survived
        assert stats["peak_bytes"] == cfg.expected_peak_bytes(
            300,
            routed_lanes=stats["routed_lanes"],
            shared_lanes=stats["shared_lanes"],
            gate_lanes=stats["gate_lanes"],
        )
        results[kernel, defer] = (out.copy(), stats)
    deferred_out, deferred = results["out_of_place", "auto"]
    eager_out, eager = results["out_of_place", False]
    assert deferred["steps"] == ["gate", "topk", "routed", "shared", "combine"]
    assert eager["steps"] == ["shared", "gate", "topk", "routed", "combine"]
    assert results["inplace", "auto"][1]["steps"] == eager["steps"]  # auto: no deferral
    for out, _ in results.values():
        np.testing.assert_array_equal(out, deferred_out)
    np.testing.assert_array_equal(eager_out, deferred_out)
    # Deferring saves exactly one [T, H] float32 buffer.
    assert eager["peak_bytes"] - deferred["peak_bytes"] == 4 * 300 * config.hidden_size


@pytest.mark.parametrize("tokens", [1, 64, 65, 1000])
def test_peak_formula_for_several_shapes(tokens: int) -> None:
    for config in (small_v3(), small_v4(0, num_shared_experts=2), small_v3(num_shared_experts=0)):
        layer = moelb.DeepSeekMoE(config, seed=4)
        x = (
            np.random.default_rng(tokens)
            .standard_normal((tokens, config.hidden_size))
            .astype(np.float32)
        )
        ids = np.arange(tokens) % config.vocab_size if config.is_hash_layer else None
        layer(x, ids)
        s = layer.last_stats()
        assert s["peak_bytes"] == config.expected_peak_bytes(
            tokens,
            routed_lanes=s["routed_lanes"],
            shared_lanes=s["shared_lanes"],
            gate_lanes=s["gate_lanes"],
        )


def test_deepseek_v3_scale_saving() -> None:
    v3 = moelb.DeepSeekMoEConfig.deepseek_v3()
    deferred = v3.expected_peak_bytes(4096, 256, 2, 2)
    eager = v3.replace(defer_shared=False).expected_peak_bytes(4096, 256, 2, 2)
    assert eager - deferred == 4 * 4096 * 7168


def test_inplace_kernel_cannot_defer() -> None:
    with pytest.raises(moelb.InvalidArgumentError, match="defer_shared=True needs an out-of-place"):
        small_v3(kernel="inplace", defer_shared=True)
    readonly = np.zeros((4, 64), np.float32)
    readonly.setflags(write=False)
    layer = moelb.DeepSeekMoE(small_v3(kernel="inplace"), seed=1)
    with pytest.raises(moelb.InvalidArgumentError, match="read-only"):
        layer(readonly)


def test_get_moe_weights_excludes_the_fused_shared_expert() -> None:
    """SGLang's test_deepep_waterfill_eplb: with a fused shared expert the views have the routed
    rows only; writing through them changes the routed rows and leaves the shared rows alone."""
    config = small_v3(fuse_shared_experts=True)
    w = moelb.random_moe_weights(config, 5)
    layer = moelb.DeepSeekMoE(config, w)
    w13, w2 = layer.get_moe_weights()
    assert w13.shape == (16, 64, 64) and w2.shape == (16, 64, 32)
    shared_before = [a.copy() for a in layer.fused_shared_weights()]
    np.testing.assert_array_equal(shared_before[0], w["shared_gate_up"])
    x = np.random.default_rng(3).standard_normal((40, 64)).astype(np.float32)
    before = layer(x).copy()
    w13[-1] = 0  # the last routed slot
    w2[-1] = 0
    np.testing.assert_array_equal(layer.get_moe_weights()[0][-1], 0)
    for got, want in zip(layer.fused_shared_weights(), shared_before, strict=True):
        np.testing.assert_array_equal(got, want)
    assert not np.array_equal(layer(x), before)  # the forward uses the written weights
    # Without fusion: the same routed views, nothing else.
    plain = moelb.DeepSeekMoE(small_v3(), w)
    assert [a.shape for a in plain.get_moe_weights()] == [(16, 64, 64), (16, 64, 32)]
    assert plain.fused_shared_weights() is None
    with pytest.raises(ValueError, match="read-only"):
        layer.fused_shared_weights()[0][0, 0] = 1


def test_rebalance_and_weight_moves_keep_the_output() -> None:
    config = small_v3()
    w = moelb.random_moe_weights(config, 9)
    rng = np.random.default_rng(4)
    # 16 experts on 24 slots over 4 ranks in 2 nodes, as an earlier plan left them.
    start = moelb.rebalance(rng.random((1, 16)) * 100, 24, 4, 2, 4).location
    layer = moelb.DeepSeekMoE(config, w, location=start, layer=0, ep_rank=1)
    x = rng.standard_normal((300, 64)).astype(np.float32)
    before = layer(x).copy()
    # New loads: a few hot experts.
    load = np.ones((1, 16))
    load[0, [2, 7, 11]] = [400, 250, 120]
    new = moelb.rebalance(load, 24, 4, 2, 4, previous=start).location
    assert not np.array_equal(new.physical_to_logical, start.physical_to_logical)
    plan = moelb.plan_weight_moves(start, new, 0)
    layer.apply_weight_moves(plan, new)
    w13, w2 = layer.get_moe_weights()
    for slot, expert in enumerate(new.physical_to_logical[0]):
        np.testing.assert_array_equal(w13[slot], w["w13"][expert])
        np.testing.assert_array_equal(w2[slot], w["w2"][expert])
    assert layer.location is not None
    np.testing.assert_array_equal(layer.location.physical_to_logical, new.physical_to_logical)
    assert_close(layer(x), before, 1e-6)


def test_a_stale_weight_move_plan_is_refused_and_changes_nothing() -> None:
    """A plan made from another placement than the layer holds (or applied a second time) would
    scramble the expert weights; it is refused and the layer is left as it was."""
    config = small_v3()
    w = moelb.random_moe_weights(config, 9)
    rng = np.random.default_rng(4)
    start = moelb.rebalance(rng.random((1, 16)) * 100, 24, 4, 2, 4).location
    trivial = moelb.ExpertLocation.trivial(1, 16, 24, ep_size=4, num_nodes=2)
    load = np.ones((1, 16))
    load[0, [2, 7, 11]] = [400, 250, 120]
    new = moelb.rebalance(load, 24, 4, 2, 4, previous=start).location
    assert not np.array_equal(start.physical_to_logical, trivial.physical_to_logical)
    layer = moelb.DeepSeekMoE(config, w, location=start, layer=0, ep_rank=1)
    x = rng.standard_normal((300, 64)).astype(np.float32)
    before = layer(x).copy()

    def assert_unchanged(weights: list[np.ndarray], location: moelb.ExpertLocation) -> None:
        for now, then in zip(layer.get_moe_weights(), weights, strict=True):
            np.testing.assert_array_equal(now, then)
        np.testing.assert_array_equal(
            layer.location.physical_to_logical, location.physical_to_logical
        )

    held = [view.copy() for view in layer.get_moe_weights()]
    stale = moelb.plan_weight_moves(trivial, new, 0)  # made from another placement
    with pytest.raises(moelb.InvalidArgumentError, match="not the placement the plan moves from"):
        layer.apply_weight_moves(stale, new)
    assert_unchanged(held, start)
    plan = moelb.plan_weight_moves(start, new, 0)
    # The plan leads to `new`, so new_location must be `new`.
    with pytest.raises(moelb.InvalidArgumentError, match=r"new_location is not .* moves to"):
        layer.apply_weight_moves(plan, trivial)
    assert_unchanged(held, start)
    np.testing.assert_array_equal(layer(x), before)

    layer.apply_weight_moves(plan, new)
    assert_close(layer(x), before, 1e-6)
    moved = [view.copy() for view in layer.get_moe_weights()]
    # The weights now hold `new`: the same plan a second time is stale.
    with pytest.raises(moelb.InvalidArgumentError, match="already moved"):
        layer.apply_weight_moves(plan, new)
    assert_unchanged(moved, new)
    assert_close(layer(x), before, 1e-6)


def test_same_output_for_any_thread_count(restore_num_threads) -> None:
    config = small_v4(5)
    layer = moelb.DeepSeekMoE(config, seed=2)
    x = (np.random.default_rng(5).standard_normal((700, 48)) * 4).astype(np.float32)
    moelb.set_num_threads(1)
    one = layer(x)
    moelb.set_num_threads(2)
    np.testing.assert_array_equal(layer(x), one)


def test_empty_batch() -> None:
    layer = moelb.DeepSeekMoE(small_v4(0), seed=1)
    out = layer(np.zeros((0, 48), np.float32), np.zeros(0, np.int64))
    assert out.shape == (0, 48)
    assert layer.last_stats()["steps"] == [] and layer.last_stats()["peak_bytes"] == 0


def test_presets() -> None:
    v3 = moelb.DeepSeekMoEConfig.deepseek_v3()
    assert (v3.hidden_size, v3.intermediate_size, v3.num_experts, v3.top_k) == (7168, 2048, 256, 8)
    assert (v3.num_groups, v3.topk_group, v3.routed_scaling_factor) == (8, 4, 2.5)
    assert not v3.is_hash_layer and v3.swiglu_limit is None
    flash = moelb.DeepSeekMoEConfig.deepseek_v4_flash(2)
    assert flash.is_hash_layer and flash.swiglu_limit == 10.0 and flash.scoring == "sqrtsoftplus"
    assert not moelb.DeepSeekMoEConfig.deepseek_v4_flash(3).is_hash_layer
    pro = moelb.DeepSeekMoEConfig.deepseek_v4_pro()
    assert (pro.hidden_size, pro.intermediate_size, pro.num_experts) == (7168, 3072, 384)


def test_bad_input() -> None:
    config = small_v3()
    layer = moelb.DeepSeekMoE(config, seed=1)
    with pytest.raises(moelb.InvalidDTypeError, match="hidden must have dtype float32"):
        layer(np.zeros((4, 64)))
    with pytest.raises(moelb.InvalidArgumentError, match=r"hidden has shape \[4, 63\]"):
        layer(np.zeros((4, 63), np.float32))
    with pytest.raises(moelb.InvalidArgumentError, match="C-contiguous"):
        layer(np.zeros((64, 4), np.float32).T)
    hashed = moelb.DeepSeekMoE(small_v4(0), seed=1)
    x = np.zeros((3, 48), np.float32)
    with pytest.raises(moelb.InvalidArgumentError, match=r"input_ids .* required"):
        hashed(x)
    with pytest.raises(moelb.InvalidArgumentError, match="100"):
        hashed(x, np.array([1, 100, 2]))
    with pytest.raises(moelb.InvalidArgumentError, match="input_ids has 2 entries"):
        hashed(x, np.array([1, 2]))
    with pytest.raises(moelb.InvalidArgumentError, match="top_k=17"):
        small_v3(top_k=17)
    with pytest.raises(moelb.InvalidArgumentError, match="fuse_shared_experts needs renormalize"):
        small_v3(fuse_shared_experts=True, renormalize=False)
    with pytest.raises(moelb.InvalidArgumentError, match="kernel='fast'"):
        small_v3(kernel="fast")
    with pytest.raises(moelb.InvalidArgumentError, match="defer_shared must be"):
        small_v3(defer_shared="later")
    w = moelb.random_moe_weights(config, 1)
    with pytest.raises(moelb.InvalidArgumentError, match="w13 has shape"):
        moelb.DeepSeekMoE(config, {**w, "w13": w["w13"][:, :10]})
    with pytest.raises(moelb.InvalidArgumentError, match="unknown arrays"):
        moelb.DeepSeekMoE(config, {**w, "bias": w["correction_bias"]})
    with pytest.raises(moelb.InvalidArgumentError, match="needs shared_gate_up"):
        moelb.DeepSeekMoE(config, {**w, "shared_gate_up": None, "shared_down": None})
    with pytest.raises(moelb.InvalidArgumentError, match="needs tid2eid"):
        moelb.DeepSeekMoE(
            small_v4(0), {**moelb.random_moe_weights(small_v4(0), 1), "tid2eid": None}
        )
    location = moelb.ExpertLocation.trivial(1, 16, 20, ep_size=4)
    other = moelb.ExpertLocation.trivial(1, 16, 24, ep_size=4)
    placed = moelb.DeepSeekMoE(config, w, location=location)
    plan = moelb.plan_weight_moves(location, location, 0)
    with pytest.raises(moelb.InvalidArgumentError, match="new_location has 16 logical / 24"):
        placed.apply_weight_moves(plan, other)
