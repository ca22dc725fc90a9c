"""The cluster simulator: the C++ scoring loop against NumPy, the figures' consistency on skewed
traffic (moelb >= deepseek >= trivial, the lower bound respected, moves counted), replay of
recorded counts, V4 hash layers, determinism, plots and every configuration error."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import moelb
import numpy as np
import pytest
from moelb.simulate import parse_algorithm

SMALL = moelb.SimulationConfig(
    model="deepseek-v3",
    ep_size=8,
    num_nodes=2,
    num_redundant_experts=16,
    num_tokens=512,
    num_steps=12,
    rebalance_period=4,
    skew=1.0,
    drift=0.05,
    algorithms=("deepseek", "moelb", "deepseek_global", "moelb:none"),
    num_layers=4,
)


@pytest.fixture(scope="module")
def small() -> moelb.SimulationResult:
    return moelb.simulate(SMALL)


def random_counts(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scale = 1.0 / np.arange(1, shape[2] + 1) ** 0.8
    return rng.poisson(200 * rng.permutation(scale), shape).astype(np.int32)


# ------------------------------------------------------------------------------------------------
# The C++ scoring loop.


def test_score_steps_matches_rank_loads() -> None:
    counts = random_counts((5, 3, 16))
    rng = np.random.default_rng(1)
    phy2log = np.concatenate([np.tile(np.arange(16), (3, 1)), rng.integers(0, 16, (3, 8))], 1)
    location = moelb.ExpertLocation(rng.permuted(phy2log, axis=1), 16, ep_size=4)
    max_load, mean_load = moelb.score_steps(counts, location)
    assert max_load.shape == mean_load.shape == (5, 3)
    for t in range(5):
        loads = moelb.rank_loads(counts[t], location)  # [L, G], independent implementation
        np.testing.assert_allclose(max_load[t], loads.max(axis=1), rtol=1e-12)
        np.testing.assert_allclose(mean_load[t], counts[t].sum(axis=1) / 4, rtol=1e-12)


def test_step_lower_bounds_is_the_flat_bound_per_step() -> None:
    counts = random_counts((4, 2, 16), seed=2)
    counts[0, 0] = 0
    counts[1, 1, 3] = 5000  # one very hot expert: the replica bound exceeds the mean
    bounds = moelb.step_lower_bounds(counts, 20, 10)
    for t in range(4):
        stats = moelb.evaluate_placement(
            counts[t], moelb.ExpertLocation.trivial(2, 16, 20, ep_size=10)
        )
        np.testing.assert_allclose(bounds[t], stats.lower_bound, rtol=1e-12)
    assert bounds[0, 0] == 0
    assert bounds[1, 1] == 1000 > counts[1, 1].sum() / 10  # 5000 over 5 replicas


def test_scoring_errors() -> None:
    counts = random_counts((2, 3, 16))
    location = moelb.ExpertLocation.trivial(3, 16, 16, ep_size=4)
    with pytest.raises(moelb.InvalidDTypeError, match="counts must have dtype int32"):
        moelb.score_steps(counts.astype(np.int64), location)
    with pytest.raises(moelb.InvalidArgumentError, match="counts must be 3-D"):
        moelb.score_steps(counts[0], location)
    with pytest.raises(moelb.InvalidArgumentError, match="C-contiguous"):
        moelb.score_steps(counts[:, :, ::2], moelb.ExpertLocation.trivial(3, 8, 8, ep_size=4))
    with pytest.raises(moelb.InvalidArgumentError, match="counts has 3 layers but the location"):
        moelb.score_steps(counts, moelb.ExpertLocation.trivial(2, 16, 16, ep_size=4))
    bad = counts.copy()
    bad[1, 2, 5] = -1
    with pytest.raises(moelb.InvalidArgumentError, match=r"counts\[1, 2, 5\] = -1 is negative"):
        moelb.score_steps(bad, location)
    with pytest.raises(moelb.InvalidArgumentError, match="num_physical_experts=8 is less than"):
        moelb.step_lower_bounds(counts, 8, 4)
    with pytest.raises(moelb.InvalidArgumentError, match="ep_size must be >= 1"):
        moelb.step_lower_bounds(counts, 16, 0)


# ------------------------------------------------------------------------------------------------
# Synthetic traffic end to end.


def test_eplb_beats_trivial_and_moelb_matches_or_beats_deepseek(
    small: moelb.SimulationResult,
) -> None:
    a = small.algorithms
    assert list(a) == ["trivial", "deepseek", "moelb", "deepseek_global", "moelb:none"]
    assert a["deepseek"].ran == "deepseek_hierarchical"
    assert a["moelb"].ran == "moelb(locality=node)"
    assert a["moelb:none"].ran == "moelb(locality=none)"
    for field in ("in_window", "predictive"):
        trivial = getattr(a["trivial"], field)
        for name in ("deepseek", "moelb", "deepseek_global", "moelb:none"):
            assert getattr(a[name], field) > trivial + 0.1, (field, name)
    # On the planning window moelb matches DeepSeek (same locality): it never has a higher peak on
    # the window's total (test_eplb.py), and per step it is within 0.01 of DeepSeek or better
    # (it does not optimise each step). The next window is not compared here: at 512 tokens per
    # step its scores are mostly sampling noise (benchmarks compare them at scale).
    for deepseek, ours in (("deepseek", "moelb"), ("deepseek_global", "moelb:none")):
        assert a[ours].in_window >= a[deepseek].in_window - 0.01, ours
    # The default dispatch (SGLang's static table) and Waterfill are simulated at token level on
    # the placements in service.
    for r in a.values():
        assert list(r.realised) == ["sglang_static"]
        d = r.realised["sglang_static"]
        assert d.waterfill is not None
        assert 0 < d.routed <= 1 and 0 < d.shared_local <= 1 and 0 < d.waterfill <= 1


def test_lower_bound_is_respected(small: moelb.SimulationResult) -> None:
    for r in small.algorithms.values():
        assert r.min_gap >= -1e-9, r.name
        assert r.in_window <= small.bound_in_window + 1e-12
        assert r.predictive <= small.bound_predictive + 1e-12
        assert np.all(r.layer_predictive <= small.layer_bound_predictive + 1e-12)
    assert 0 < small.bound_predictive <= 1


def test_moves_are_counted(small: moelb.SimulationResult) -> None:
    assert small.num_windows == 3
    preset = moelb.MODEL_PRESETS["deepseek-v3"]
    assert small.expert_bytes == preset.expert_bytes == 3 * 7168 * 2048
    assert small.algorithms["trivial"].moved_experts == []
    for name in ("deepseek", "moelb"):
        r = small.algorithms[name]
        assert len(r.moved_experts) == len(r.plan_seconds) == small.num_windows
        assert all(0 < m <= 4 * 272 for m in r.moved_experts)  # 4 layers x 272 slots
        assert r.moved_bytes == [m * small.expert_bytes for m in r.moved_experts]
        assert all(s > 0 for s in r.plan_seconds)
    # The written placement covers the model: dense layers 0-2 and layers 7+ stay trivial.
    placement = small.algorithms["moelb"].placement
    assert placement.physical_to_logical.shape == (61, 272)
    trivial_row = np.arange(272) % 256
    for layer in (0, 1, 2, 7, 60):
        np.testing.assert_array_equal(placement.physical_to_logical[layer], trivial_row)
    assert not np.array_equal(placement.physical_to_logical[3], trivial_row)
    assert list(small.layer_ids) == [3, 4, 5, 6]


def test_deterministic(small: moelb.SimulationResult, restore_num_threads: None) -> None:
    moelb.set_num_threads(1)
    again = moelb.simulate(SMALL)
    first, second = small.to_dict(), again.to_dict()
    for d in (first, second):
        d.pop("timings")
        for r in d["algorithms"].values():
            r.pop("plan_seconds")
    assert first == second


def test_no_drift_predicts_better_than_fast_drift() -> None:
    base = dataclasses.replace(SMALL, algorithms=("moelb",), waterfill=None, num_tokens=2048)
    still = moelb.simulate(dataclasses.replace(base, drift=0.0)).algorithms["moelb"]
    moving = moelb.simulate(dataclasses.replace(base, drift=0.5)).algorithms["moelb"]
    assert still.predictive > moving.predictive + 0.05
    realised = still.realised["sglang_static"]
    assert realised.waterfill is None and realised.routed > 0  # waterfill=None: no Waterfill


def test_equal_split_realises_the_planned_figure() -> None:
    """Token-level equal split is the planner's assumption: the same figure as 'planned'."""
    config = dataclasses.replace(
        SMALL, algorithms=("moelb", "moelb:none"), dispatch=("equal_split", "sglang_static")
    )
    for r in moelb.simulate(config).algorithms.values():
        assert r.realised["equal_split"].routed == pytest.approx(r.predictive, rel=1e-9)
        assert r.realised["equal_split"].waterfill is None


def test_without_replicas_every_dispatch_realises_the_same() -> None:
    """With one replica per expert there is nothing to choose: all models give the planned
    figure; with replicas the engines' picks differ from the equal split."""
    dispatch = tuple(d for d in moelb.DISPATCH_ALGORITHMS)
    config = dataclasses.replace(
        SMALL, algorithms=("moelb:none",), num_redundant_experts=0, dispatch=dispatch,
        waterfill=None,
    )  # fmt: skip
    for r in moelb.simulate(config).algorithms.values():
        for d in dispatch:
            assert r.realised[d].routed == pytest.approx(r.predictive, rel=1e-9), d
    config = dataclasses.replace(config, num_redundant_experts=32)
    r = moelb.simulate(config).algorithms["moelb:none"]
    assert r.realised["sglang_static"].routed != pytest.approx(r.predictive, abs=1e-3)


def test_dispatch_config_errors() -> None:
    for bad, match in (((), "at least one"), (("lp",), "'lp' is not a dispatch model"),
                       (("sglang_static", "sglang_static"), "twice")):  # fmt: skip
        with pytest.raises(moelb.InvalidArgumentError, match=match):
            moelb.simulate(dataclasses.replace(SMALL, dispatch=bad))


# ------------------------------------------------------------------------------------------------
# moelb's per-step dispatch (ours) and SGLang lp's reference model in the simulator (issue 19).

ENGINE_MODELS = tuple(d for d in moelb.DISPATCH_ALGORITHMS if d != "equal_split")  # per token
PER_STEP = ("balanced", "balanced_prob", "balanced_offline", "balanced_joint", "sglang_lp")


def hall_optimum(counts: np.ndarray, location: moelb.ExpertLocation, layer: int) -> int:
    """The least integer largest rank load of any split of ``counts`` [E] over the replicas,
    by Hall's condition over sets of ranks (independent of the max-flow): every set G of ranks
    must take the experts whose replicas all lie in G, so the optimum is
    max over G of ceil(sum of those counts / |G|) (an integral split attains it)."""
    W, S = location.ep_size, location.num_local_physical_experts
    masks = np.zeros(location.num_logical_experts, dtype=np.int64)
    ranks = np.arange(location.num_physical_experts) // S
    np.bitwise_or.at(masks, location.physical_to_logical[layer], 1 << ranks)
    best = 0
    for group in range(1, 1 << W):
        inside = counts[(masks & ~group) == 0].sum()
        best = max(best, -(-int(inside) // bin(group).count("1")))
    return best


@pytest.fixture(scope="module")
def served_step() -> tuple:
    """One step of DeepSeek-V3 traffic on 8 ranks, the token level and a moelb placement (with
    replicas) planned on two earlier steps, the step's routed ids and its per-source counts."""
    from moelb.simulation.policies import Policy
    from moelb.simulation.token_level import TokenLevel
    from moelb.simulation.traffic import SyntheticRouting

    config = dataclasses.replace(SMALL, num_tokens=1024, bursts=1.0)
    preset = config.preset()
    layer_ids = np.arange(preset.first_moe_layer, preset.first_moe_layer + config.num_layers)
    routing = SyntheticRouting(preset, layer_ids, config)
    for step in range(2):
        routing.route(step)
    plan = moelb.rebalance(
        routing.window_counts().sum(axis=0, dtype=np.float64), 272, preset.num_groups, 2, 8
    )
    policy = Policy("moelb", "moelb", "auto", "total", plan.location)
    routed = routing.route(2)
    token_level = TokenLevel(config, 272)
    return token_level, policy, routed, token_level.source_counts(routed)


def test_per_step_models_run_end_to_end() -> None:
    config = dataclasses.replace(
        SMALL, algorithms=("moelb", "moelb:none"), dispatch=(*ENGINE_MODELS, *PER_STEP)
    )
    result = moelb.simulate(config)
    for a in result.algorithms.values():
        r = a.realised
        assert set(r) == set(config.dispatch)
        for d in r.values():
            assert 0 < d.routed <= 1 and 0 < d.shared_local <= 1 and 0 < d.waterfill <= 1
        # balanced is the optimum of every step and layer: no model realises a lower peak.
        for other in (*ENGINE_MODELS, "balanced_prob", "balanced_offline", "sglang_lp"):
            assert r["balanced"].routed >= r[other].routed - 1e-12, (a.name, other)
        # The joint flow's routed + shared peak is the least of any placement of both; its
        # routed part alone leaves room for the shared expert.
        for other in (*ENGINE_MODELS, "balanced", "balanced_prob", "balanced_offline"):
            assert r["balanced_joint"].waterfill >= r[other].waterfill - 1e-12, (a.name, other)
        assert r["balanced_joint"].routed <= r["balanced"].routed + 1e-12
    # Without Waterfill the joint flow still places the shared expert (its own figure).
    off = moelb.simulate(dataclasses.replace(config, waterfill=None, dispatch=PER_STEP))
    for a in off.algorithms.values():
        assert a.realised["balanced"].waterfill is None
        assert a.realised["balanced_joint"].waterfill == pytest.approx(
            result.algorithms[a.name].realised["balanced_joint"].waterfill, rel=1e-12
        )


def test_balanced_realises_the_optimum_of_every_step(served_step: tuple) -> None:
    token_level, policy, routed, source = served_step
    location = policy.current
    S = location.num_local_physical_experts
    bounds = token_level.bounds_tokens
    dispatched = token_level.dispatch(policy, "balanced", routed, 2)
    engines = {d: token_level.dispatch(policy, d, routed, 2) for d in ENGINE_MODELS}
    for layer, (ids, physical) in enumerate(zip(routed, dispatched, strict=True)):
        p2l = location.physical_to_logical[layer]
        assert np.array_equal(p2l[physical], ids)  # every pair on a replica of its expert
        rebuilt = np.stack(  # each source rank's counts, rebuilt from the dispatched ids
            [np.bincount(p2l[physical[bounds[r] : bounds[r + 1]]].ravel(), minlength=256)
             for r in range(8)]
        )  # fmt: skip
        np.testing.assert_array_equal(rebuilt, source[layer])
        loads = np.bincount(physical.ravel() // S, minlength=8)
        optimum = hall_optimum(rebuilt.sum(axis=0), location, layer)
        assert loads.max() == optimum
        for name, other in engines.items():
            assert np.bincount(other[layer].ravel() // S, minlength=8).max() >= optimum, name
    assert any(  # the test has teeth: some engine model misses the optimum
        np.bincount(other[layer].ravel() // S, minlength=8).max()
        > hall_optimum(source[layer].sum(axis=0), location, layer)
        for other in engines.values()
        for layer in range(len(routed))
    )


@pytest.mark.parametrize("waterfill", [None, "dynamic"])
def test_shared_local_counts_only_rows_with_a_valid_id(served_step: tuple, waterfill) -> None:
    """The "+shared local" score puts one shared token on its source rank per row with a valid
    id, under every model: padding rows (all -1) carry none, as in the joint flow's counts."""
    from moelb.simulation.policies import Policy
    from moelb.simulation.token_level import TokenLevel

    served, policy, routed, _ = served_step
    models = ("equal_split", "sglang_static", "balanced", "balanced_joint")
    config = dataclasses.replace(served.config, dispatch=models, waterfill=waterfill)
    token_level = TokenLevel(config, 272)
    padded = [ids.copy() for ids in routed]
    bounds = token_level.bounds_tokens
    for ids in padded:
        ids[bounds[2] : bounds[2] + 100] = -1  # most of rank 2's batch is padding
        ids[bounds[5] : bounds[6]] = -1  # all of rank 5's
    shared = np.bincount(np.repeat(np.arange(8), np.diff(bounds)), minlength=8)
    shared[2] -= 100
    shared[5] = 0
    fresh = Policy(policy.name, "moelb", "auto", "total", policy.current)
    token_level.realise([fresh], padded, 3)

    def rate(loads: np.ndarray) -> float:
        return float(moelb.utilization_rate(float(loads.mean()), float(loads.max())))

    S = 34
    for name in models:
        local = []
        for layer, ids in enumerate(padded):
            if name == "equal_split":
                p2l = policy.current.physical_to_logical[layer]
                counts = np.bincount(ids[ids >= 0], minlength=256)
                share = counts[p2l] / policy.current.logical_count[layer][p2l]
                routed_load = share.reshape(8, S).sum(axis=1)
            else:
                physical = token_level.dispatch(fresh, name, padded, 3)[layer]
                if name == "balanced_joint":
                    np.testing.assert_array_equal(physical[:, -1] >= 0, (ids >= 0).any(axis=1))
                    joint = physical[:, :-1]
                    physical = np.where(joint >= 0, joint - joint // (S + 1), -1)
                routed_load = np.bincount(physical[physical >= 0] // S, minlength=8)
            local.append(rate(routed_load + shared))
        assert fresh.token[name][0][1] == pytest.approx(np.mean(local), rel=1e-12), name


def test_balanced_joint_places_routed_and_shared_at_the_joint_optimum(served_step: tuple) -> None:
    token_level, policy, routed, source = served_step
    location = policy.current
    joint = moelb.per_rank_shared_location(location)
    assert (joint.num_logical_experts, joint.num_physical_experts) == (257, 8 * 35)
    np.testing.assert_array_equal(joint.physical_to_logical[:, 34::35], 256)
    dispatched = token_level.dispatch(policy, "balanced_joint", routed, 2)
    balanced = token_level.dispatch(policy, "balanced", routed, 2)
    bounds = token_level.bounds_tokens
    for layer, (ids, physical) in enumerate(zip(routed, dispatched, strict=True)):
        assert physical.shape == (1024, ids.shape[1] + 1)
        routed_slots, shared_slots = physical[:, :-1], physical[:, -1]
        # Routed pairs on a replica of their expert (slot p of rank r is r * 35 + p % 34).
        plain = routed_slots - routed_slots // 35
        np.testing.assert_array_equal(location.physical_to_logical[layer][plain], ids)
        assert np.all(shared_slots % 35 == 34)  # every token's shared expert in a shared slot
        load = np.bincount(physical.ravel() // 35, minlength=8)
        # Independently: the shared expert may go to any rank, so the joint optimum is Hall's
        # bound of the routed counts and of all the work over all ranks.
        counts = source[layer].sum(axis=0)
        optimum = max(hall_optimum(counts, location, layer), -(-(counts.sum() + 1024) // 8))
        assert load.max() == optimum
        # No worse than SGLang's Waterfill after the balanced routed split.
        batches = [balanced[layer][bounds[r] : bounds[r + 1]] for r in range(8)]
        waterfill = moelb.waterfill_rank_loads(batches, 272, mode="dynamic")
        assert load.max() <= waterfill.load_waterfill.max()
        assert load.sum() == waterfill.load_waterfill.sum()
        # The joint score: routed, routed + own-rank shared, routed + joint shared.
        scores = token_level._joint(physical)
        routed_load = np.bincount(routed_slots.ravel() // 35, minlength=8)
        assert scores[2] == pytest.approx(moelb.utilization_rate(load.mean(), load.max()))
        assert scores[0] == pytest.approx(
            moelb.utilization_rate(routed_load.mean(), routed_load.max())
        )


def test_balanced_offline_uses_the_planning_windows_counts(served_step: tuple) -> None:
    """balanced_offline draws from the even fractions of the planning window's counts with the
    step's seed; balanced_prob from the max-flow's fractions of the step's own counts."""
    from moelb.simulation.token_level import _step_seed

    token_level, policy, routed, source = served_step
    location, seed = policy.current, _step_seed(token_level.config.seed, 2)

    def by(fractions: np.ndarray) -> list[np.ndarray]:
        return [
            moelb.dispatch_by_fractions(ids, location, layer, fractions[layer], seed=seed)
            for layer, ids in enumerate(routed)
        ]

    counts = source.sum(axis=1)
    policy.expect(counts)
    offline = token_level.dispatch(policy, "balanced_offline", routed, 2)
    prob = token_level.dispatch(policy, "balanced_prob", routed, 2)
    expected_offline = by(moelb.balanced_fractions(counts, location))
    expected_prob = by(moelb.balanced_fractions(counts, location, shares="any"))
    for a, b in zip(offline, expected_offline, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(prob, expected_prob, strict=True):
        np.testing.assert_array_equal(a, b)
    policy.expect(np.ones_like(counts))  # a flat expectation: other fractions
    flat = token_level.dispatch(policy, "balanced_offline", routed, 2)
    assert any(not np.array_equal(a, b) for a, b in zip(flat, offline, strict=True))


def test_simulator_dispatch_names() -> None:
    from moelb.simulate import BALANCED_DISPATCH, REFERENCE_DISPATCH, SIMULATOR_DISPATCH

    assert SIMULATOR_DISPATCH == moelb.DISPATCH_ALGORITHMS + BALANCED_DISPATCH + REFERENCE_DISPATCH
    assert set(PER_STEP) == set(BALANCED_DISPATCH) | set(REFERENCE_DISPATCH)
    assert not set(PER_STEP) & set(moelb.DISPATCH_ALGORITHMS)  # engine-side names unchanged
    with pytest.raises(moelb.InvalidArgumentError, match="'balance' is not a dispatch model") as e:
        moelb.simulate(dataclasses.replace(SMALL, dispatch=("balanced", "balance")))
    for name in SIMULATOR_DISPATCH:  # the message lists every valid name
        assert repr(name) in str(e.value)


def test_per_step_models_from_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    from moelb.cli import main

    args = ["simulate", "--ep-size", "8", "--num-nodes", "2", "--num-redundant-experts", "16",
            "--num-tokens", "256", "--num-steps", "4", "--rebalance-period", "2",
            "--num-layers", "2", "--algorithms", "moelb"]  # fmt: skip
    assert main([*args, "--dispatch", "balanced", "balanced_joint", "sglang_lp"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("placement") and
                  "balanced" in line)  # fmt: skip
    assert header.split() == ["placement", "planned", "balanced", "+WF", "balanced_joint",
                              "+joint", "sglang_lp", "+WF"]  # fmt: skip
    assert "reference model of SGLang's --ep-dispatch-algorithm lp" in out
    with pytest.raises(SystemExit) as e:
        main([*args, "--dispatch", "lp"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'lp'" in err and "balanced_joint" in err


def test_v4_hash_layers() -> None:
    config = dataclasses.replace(
        SMALL, model="deepseek-v4-flash", num_layers=4, algorithms=("moelb",)
    )
    result = moelb.simulate(config)
    assert list(result.layer_ids) == [0, 1, 2, 3]  # layers 0-2 route by token id
    assert result.algorithms["moelb"].placement.physical_to_logical.shape == (43, 272)
    assert result.algorithms["moelb"].predictive > result.algorithms["trivial"].predictive


def test_progress_is_reported() -> None:
    calls: list[tuple[int, int]] = []
    config = dataclasses.replace(SMALL, num_steps=8, algorithms=("moelb",), waterfill=None)
    moelb.simulate(config, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 8) for i in range(1, 9)]


# ------------------------------------------------------------------------------------------------
# Replay of recorded counts.


def _save_trace(counts: np.ndarray, path: Path) -> str:
    moelb.save_expert_distribution(
        {"rank": 0, "logical_count": counts, "average_utilization_rate_over_window": None}, path
    )
    return str(path)


def _replay(counts: np.ndarray, path: Path, **changes) -> moelb.SimulationResult:
    """moelb planned every 4 replayed steps on 8 GPUs in 2 nodes, 288 slots."""
    config = moelb.SimulationConfig(
        ep_size=8, num_nodes=2, num_redundant_experts=32, rebalance_period=4,
        algorithms=("moelb",), trace=_save_trace(counts, path),
    )  # fmt: skip
    return moelb.simulate(dataclasses.replace(config, **changes))


def test_replay_skips_steps_without_load(tmp_path: Path) -> None:
    """A bounded SGLang buffer that never filled ends in all-zero rows: they are not perfectly
    balanced steps (scoring them as 1.0 inflated a trivial placement from 0.28 to 0.84)."""
    counts = random_counts((12, 3, 256), seed=5)
    padded = np.concatenate([counts, np.zeros((28, 3, 256), dtype=np.int32)])
    plain = _replay(counts, tmp_path / "a.npz")
    full = _replay(padded, tmp_path / "b.npz")
    assert full.num_steps == 12
    for name in ("trivial", "moelb"):
        assert full.algorithms[name].predictive == plain.algorithms[name].predictive
        assert full.algorithms[name].in_window == plain.algorithms[name].in_window
    assert any("skipped 28 of 40 trace steps" in n for n in full.notes)
    # No unused rows: the run says the order may be the buffer's storage order.
    assert any("storage order" in n for n in plain.notes)
    assert not any("storage order" in n for n in full.notes)


def test_replay_rotates_a_wrapped_buffer(tmp_path: Path) -> None:
    counts = random_counts((12, 3, 256), seed=6)
    in_order = _replay(counts, tmp_path / "a.npz")
    wrapped = np.roll(counts, 5, axis=0)  # the oldest pass at row 5, as a wrapped ring buffer
    rotated = _replay(wrapped, tmp_path / "b.npz", trace_rotate=5)
    for name in ("trivial", "moelb"):
        np.testing.assert_array_equal(
            rotated.algorithms[name].step_balancedness, in_order.algorithms[name].step_balancedness
        )
    with pytest.raises(moelb.InvalidArgumentError, match="trace_rotate=12"):
        _replay(wrapped, tmp_path / "c.npz", trace_rotate=12)
    with pytest.raises(moelb.InvalidArgumentError, match="replayed trace only"):
        moelb.simulate(dataclasses.replace(SMALL, trace_rotate=1))


def test_replay_scores_the_recorded_counts(tmp_path: Path) -> None:
    counts = random_counts((9, 5, 256), seed=3)
    counts[:, 0] = 0  # a dense layer, as SGLang dumps hold them: skipped
    path = tmp_path / "dump.npz"
    moelb.save_expert_distribution(
        {"rank": 0, "logical_count": counts, "average_utilization_rate_over_window": None}, path
    )
    config = moelb.SimulationConfig(
        ep_size=8, num_nodes=2, num_redundant_experts=32, rebalance_period=4, trace=str(path)
    )
    calls: list[tuple[int, int]] = []
    result = moelb.simulate(config, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(4, 9), (8, 9), (9, 9)]
    assert result.num_steps == 9 and result.num_windows == 3
    assert list(result.layer_ids) == [1, 2, 3, 4]
    r = result.algorithms["moelb"]
    assert r.realised == {}  # counts carry no tokens
    assert r.placement.physical_to_logical.shape == (5, 288)
    # Trivial, recomputed with NumPy: SGLang's rate (mean + 1e-5) / (max + 1e-5) per step and
    # layer.
    trivial = moelb.ExpertLocation.trivial(4, 256, 288, ep_size=8)
    per_step = [moelb.rank_loads(counts[t, 1:], trivial) for t in range(9)]
    bal = np.array([(g.mean(axis=1) + 1e-5) / (g.max(axis=1) + 1e-5) for g in per_step])
    assert result.algorithms["trivial"].in_window == pytest.approx(bal.mean(), rel=1e-12)
    assert result.algorithms["trivial"].predictive == pytest.approx(bal[4:].mean(), rel=1e-12)
    np.testing.assert_allclose(result.algorithms["trivial"].step_balancedness, bal.mean(axis=1))
    # The first plan (on window 0) serves window 1: its predictive score is recomputed here.
    plan = moelb.rebalance(counts[:4, 1:], 288, 8, 2, 8, previous=trivial)
    loads = [moelb.rank_loads(counts[t, 1:], plan.location) for t in range(4, 8)]
    expected = np.mean([(g.mean(axis=1) + 1e-5) / (g.max(axis=1) + 1e-5) for g in loads])
    np.testing.assert_allclose(r.step_balancedness[4:8].mean(), expected, rtol=1e-12)
    assert r.moved_experts[0] == plan.stats.moved_experts


def test_replay_errors(tmp_path: Path) -> None:
    def dump(counts: np.ndarray, name: str) -> str:
        path = tmp_path / name
        moelb.save_expert_distribution(
            {"rank": 0, "logical_count": counts, "average_utilization_rate_over_window": None},
            path,
        )
        return str(path)

    base = moelb.SimulationConfig(ep_size=8, num_nodes=2, rebalance_period=4)
    wrong = dump(random_counts((8, 2, 384)), "v4pro.npz")
    with pytest.raises(moelb.InvalidArgumentError, match="has 384 experts but model deepseek-v3"):
        moelb.simulate(dataclasses.replace(base, trace=wrong))
    short = dump(random_counts((5, 2, 256)), "short.npz")
    with pytest.raises(moelb.InvalidArgumentError, match="has 5 steps: fewer than two windows"):
        moelb.simulate(dataclasses.replace(base, trace=short))
    empty = dump(np.zeros((8, 2, 256), np.int32), "empty.npz")
    with pytest.raises(moelb.InvalidArgumentError, match="holds no counts"):
        moelb.simulate(dataclasses.replace(base, trace=empty))
    with pytest.raises(moelb.InvalidArgumentError, match="does not exist"):
        moelb.simulate(dataclasses.replace(base, trace=str(tmp_path / "missing.npz")))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model": "gpt"}, "model='gpt' is not a preset"),
        ({"ep_size": 0}, "ep_size must be a positive integer"),
        ({"num_tokens": 2.5}, "num_tokens must be a positive integer"),
        ({"num_nodes": 3}, "ep_size=8 is not divisible by num_nodes=3"),
        ({"num_redundant_experts": -1}, "num_redundant_experts must be >= 0"),
        ({"num_redundant_experts": 4}, "num_physical_experts=260 .* not divisible by ep_size=8"),
        ({"skew": -1.0}, "skew must be finite and >= 0"),
        ({"drift": float("nan")}, "drift must be finite and >= 0"),
        ({"bursts": -0.5}, "bursts must be finite and >= 0"),
        ({"bursts": float("inf")}, "bursts must be finite and >= 0"),
        ({"algorithms": ()}, "algorithms must name at least one"),
        ({"algorithms": ("magic",)}, "'magic' is not an EPLB algorithm"),
        ({"algorithms": ("deepseek:none",)}, "only moelb takes options"),
        ({"algorithms": ("moelb:far",)}, "only moelb takes options"),
        ({"algorithms": ("moelb", "moelb")}, "lists one twice"),
        ({"waterfill": "sometimes"}, "waterfill must be 'dynamic', 'static' or None"),
        ({"num_layers": 59}, r"num_layers must be in \[1, 58\]"),
        ({"expert_bytes": -1}, "expert_bytes must be >= 0"),
        ({"num_steps": 7}, "num_steps=7 gives fewer than two windows"),
    ],
)
def test_config_errors(changes: dict, message: str) -> None:
    with pytest.raises(moelb.InvalidArgumentError, match=message):
        moelb.simulate(dataclasses.replace(SMALL, **changes))


def test_parse_algorithm() -> None:
    assert parse_algorithm("moelb") == ("moelb", "auto", "total", "equal_split")
    assert parse_algorithm("moelb:none") == ("moelb", "none", "total", "equal_split")
    assert parse_algorithm("moelb:none:step_peak") == ("moelb", "none", "step_peak", "equal_split")
    assert parse_algorithm("moelb:step_peak:node") == ("moelb", "node", "step_peak", "equal_split")
    assert parse_algorithm("deepseek_global") == ("deepseek_global", "auto", "total", "equal_split")
    bad_specs = ("moelb:none:none", "moelb:auto:node", "moelb:total:step_peak", "moelb:auto:auto")
    for bad in (*bad_specs, "moelb:", "moelb:peak", "deepseek:none", "deepseek:step_peak", "ds"):
        with pytest.raises(moelb.InvalidArgumentError, match="algorithms"):
            parse_algorithm(bad)


def test_bursts_make_experts_peak_together_and_step_peak_follows() -> None:
    """bursts > 0 raises one fixed topic per step (the same experts every time it comes back), so
    the per-step counts of a topic's experts move together; the step_peak policy then serves the
    next windows better than the total one. bursts = 0 is the traffic without the option."""
    base = dataclasses.replace(
        SMALL, algorithms=("moelb:none", "moelb:none:step_peak"), waterfill=None, num_steps=16
    )
    plain = moelb.simulate(base)
    assert moelb.simulate(dataclasses.replace(base, bursts=0.0)).algorithms[
        "moelb:none"
    ].predictive == pytest.approx(plain.algorithms["moelb:none"].predictive, abs=0)
    bursty = moelb.simulate(dataclasses.replace(base, bursts=2.0))
    total = bursty.algorithms["moelb:none"]
    peak = bursty.algorithms["moelb:none:step_peak"]
    assert peak.ran.endswith("+step_peak")
    assert peak.in_window > total.in_window
    assert peak.predictive > total.predictive
    # Bursts make the steps less even for every placement.
    trivial_plain = plain.algorithms["trivial"].in_window
    assert bursty.algorithms["trivial"].in_window < trivial_plain


def test_step_peak_policy_in_a_replay(tmp_path: Path) -> None:
    """A replayed trace whose experts flare up in pairs: the step_peak policy serves the next
    window better than the total one when the pattern repeats, and is reported."""
    rng = np.random.default_rng(9)
    steps, layers, experts = 24, 2, 256
    counts = rng.poisson(20, (steps, layers, experts)).astype(np.int32)
    for t in range(steps):  # 16 fixed bursts of 8 experts, one per step
        counts[t, :, (t % 16) * 8 : (t % 16) * 8 + 8] += 400
    trace = tmp_path / "trace.npz"
    moelb.save_expert_distribution(
        {"rank": 0, "logical_count": counts, "average_utilization_rate_over_window": None}, trace
    )
    config = dataclasses.replace(
        SMALL,
        trace=str(trace),
        rebalance_period=12,
        algorithms=("moelb:none", "moelb:none:step_peak"),
        waterfill=None,
    )
    result = moelb.simulate(config)
    total = result.algorithms["moelb:none"]
    peak = result.algorithms["moelb:none:step_peak"]
    assert peak.ran.endswith("+step_peak")
    assert peak.predictive > total.predictive + 0.05


# ------------------------------------------------------------------------------------------------
# Plots.


def test_plots(small: moelb.SimulationResult, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from moelb.plots import plot_simulation

    written = plot_simulation(small, tmp_path)
    assert [p.name for p in written] == [
        "balancedness_per_layer.png",
        "rank_load_heatmap.png",
        "balancedness_over_time.png",
    ]
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_without_matplotlib(
    small: moelb.SimulationResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moelb.plots import PlotsUnavailable, plot_simulation

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(PlotsUnavailable, match="pip install 'moelb\\[plots\\]'"):
        plot_simulation(small, tmp_path)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------
# The benchmark scripts (smoke runs; speed is measured by running them directly).

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_bench_simulate_and_run_all_quick(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "run_all.py"), "--quick", "--only", "bench_simulate",
         "--output-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=dict(os.environ),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    payload = json.loads((tmp_path / "latest.json").read_text())
    bench = payload["benchmarks"]["bench_simulate"]
    assert bench["ok"] and "goal: replay under 10 s" in bench["stdout"]
    data = bench["results"]
    assert data["steps"] == 400 and {r["threads"] for r in data["results"]} == {1, 2}
    assert all(r["seconds_min"] > 0 for r in data["results"])
    quality = data["quality"]
    assert quality["moelb"]["in_window"] >= quality["deepseek"]["in_window"] - 1e-3
    assert quality["deepseek"]["in_window"] > quality["trivial"]["in_window"]
    assert all(q["min_gap"] >= -1e-9 for q in quality.values())
    markdown = (tmp_path / "latest.md").read_text()
    assert "| `bench_simulate` | ok |" in markdown and "## `bench_simulate`" in markdown
