"""The simulator's time axis (moelb.simulation.timing): every realised (placement, dispatch) row
timed, its parts adding up to the step time, speed-ups against the trivial placement, the
DeepEP mode following the tokens per GPU, one step re-timed by hand from the dispatched tokens,
and the configuration's errors. Times use the shipped default calibration when the package has
one, else the hand-written fixture (gpu_fixtures.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import moelb
import numpy as np
import pytest
from gpu_fixtures import shipped_or_fixture, write_calibration
from moelb.simulation.config import SimulationConfig
from moelb.simulation.policies import Cluster, make_policies
from moelb.simulation.timing import DECODE_TOKENS_PER_GPU, deepep_mode
from moelb.simulation.token_level import TokenLevel
from moelb.simulation.traffic import SyntheticRouting

SMALL = dict(
    model="deepseek-v3", ep_size=8, num_nodes=2, num_redundant_experts=16, num_tokens=1024,
    num_steps=8, rebalance_period=4, num_layers=3, skew=1.0, algorithms=("deepseek", "moelb"),
    dispatch=("sglang_static", "equal_split", "balanced", "balanced_joint"),
)  # fmt: skip


@pytest.fixture(scope="module")
def gpu(tmp_path_factory: pytest.TempPathFactory) -> str:
    return shipped_or_fixture(tmp_path_factory.mktemp("gpu"))


@pytest.fixture(scope="module")
def timed(gpu: str) -> moelb.SimulationResult:
    return moelb.simulate(moelb.SimulationConfig(**SMALL, gpu=gpu))


def test_every_realised_row_is_timed_and_its_parts_add_up(timed) -> None:
    realised_steps = timed.num_steps - timed.config.rebalance_period  # window 0 is not realised
    L = len(timed.layer_ids)
    for name, a in timed.algorithms.items():
        for d in timed.config.dispatch:
            t = a.realised[d].time
            assert t is not None, (name, d)
            assert len(t.step_seconds) == realised_steps and len(t.layer_seconds) == L
            assert t.seconds == pytest.approx(np.mean(t.step_seconds))
            assert t.seconds == pytest.approx(sum(t.layer_seconds))
            # A layer takes its slowest GPU + the fixed term: the slowest GPU's parts add up.
            parts = t.slowest_weights_s + t.slowest_gemm_s + t.slowest_comm_s + t.fixed_s
            assert t.seconds == pytest.approx(parts)
            assert t.fixed_s == pytest.approx(L * timed.time_model["layer_fixed_s"])
            # The mean GPU never takes longer than the slowest.
            assert t.mean_gpu_s <= t.seconds - t.fixed_s + 1e-15
            assert sum(t.slowest_share) == pytest.approx(1.0) and len(t.slowest_share) == 8
            assert t.worst.startswith("step ") and "slowest at" in t.worst
            trivial = timed.algorithms["trivial"].realised[d].time
            assert t.speedup == pytest.approx(trivial.seconds / t.seconds)
    assert all(a.realised[d].time.speedup == 1.0 for d in timed.config.dispatch
               for a in [timed.algorithms["trivial"]])  # fmt: skip


def test_eplb_is_faster_than_trivial_on_skewed_traffic(timed) -> None:
    # Skew 1.0: the trivial placement's hottest GPU computes far more than the mean; DeepSeek's
    # and moelb's placements spread it (and keep groups on nodes), so they take less time.
    for name in ("deepseek", "moelb"):
        for d in ("sglang_static", "balanced"):
            assert timed.algorithms[name].realised[d].time.speedup > 1.05, (name, d)


def test_time_model_summary_and_json(timed, gpu: str) -> None:
    m = timed.time_model
    assert m["deepep_mode"] == "low_latency"  # 1024 tokens / 8 GPUs = 128 per GPU: decode-like
    assert m["tokens_per_gpu"] == 128 and m["table"] in ("deepseek-v3/fp8_e4m3", "deepseek-v3/bf16")
    assert m["dispatch_bytes_per_copy"] == 7168 + 4 * 56 and m["combine_bytes_per_copy"] == 14336
    d = timed.to_dict()
    row = d["algorithms"]["moelb"]["realised"]["balanced"]["time"]
    assert row["seconds"] == timed.algorithms["moelb"].realised["balanced"].time.seconds
    assert d["time_model"] == m
    # The balancedness fields are unchanged.
    assert {"routed", "shared_local", "waterfill", "time"} == set(
        d["algorithms"]["moelb"]["realised"]["balanced"]
    )


def test_deepep_mode_follows_tokens_per_gpu() -> None:
    c = moelb.SimulationConfig(ep_size=8, num_nodes=2, num_tokens=8 * DECODE_TOKENS_PER_GPU)
    assert deepep_mode(c) == "low_latency"
    assert deepep_mode(dataclasses.replace(c, num_tokens=c.num_tokens + 8)) == "normal"
    assert deepep_mode(dataclasses.replace(c, deepep_mode="normal")) == "normal"


def test_one_step_timed_by_hand(gpu: str) -> None:
    # The simulator's figure for a step equals the model applied to that step's dispatched
    # tokens: the slot loads by bincount, the copies by token_copies from consecutive source
    # blocks, the layer time the slowest GPU plus the fixed term.
    config = moelb.SimulationConfig(**SMALL, gpu=gpu)
    config = dataclasses.replace(config, num_steps=2, rebalance_period=1, num_tokens=1000)
    preset = config.preset()
    layers = np.arange(preset.first_moe_layer, preset.first_moe_layer + config.num_layers)
    routed = SyntheticRouting(preset, layers, config).route(0)
    cluster = Cluster.of(config, preset)
    model = moelb.StepTimeModel(gpu)
    level = TokenLevel(config, cluster.num_physical_experts, model)
    policy = make_policies(config, cluster.trivial(len(layers)))[0]
    level.realise([policy], routed, step=0)
    got = level.timer.results()[("trivial", "sglang_static")].seconds
    bounds = np.linspace(0, 1000, 9).astype(int)  # source rank r: tokens bounds[r]:bounds[r+1]
    source = np.repeat(np.arange(8), np.diff(bounds))
    expected = 0.0
    for physical in level.dispatch(policy, "sglang_static", routed, 0):
        slots = np.bincount(physical[physical >= 0], minlength=cluster.num_physical_experts)
        compute = model.expert_seconds(slots).reshape(8, -1).sum(axis=1)
        c = moelb.token_copies(physical, source, cluster.num_physical_experts, 8, 2, "low_latency")
        expected += (compute + model.comm_seconds(c)).max() + model.calibration.layer_fixed_s
    assert got == pytest.approx(expected, rel=1e-12)


def test_without_replicas_every_dispatch_takes_the_same_time(gpu: str) -> None:
    # No redundant slots: every expert has one replica, so every table model sends each token
    # to the same slot, and the step times agree.
    config = moelb.SimulationConfig(
        **{**SMALL, "num_redundant_experts": 0, "dispatch": ("sglang_static", "sglang_dynamic",
           "moelb_static", "balanced", "equal_split")}, gpu=gpu,
    )  # fmt: skip
    r = moelb.simulate(config)
    for a in r.algorithms.values():
        seconds = [a.realised[d].time.seconds for d in config.dispatch]
        # equal_split times its fractional loads with uniform sources: its compute is the same,
        # its communication an expectation, so it agrees only roughly.
        assert seconds[:4] == pytest.approx([seconds[0]] * 4, rel=1e-12)
        assert seconds[4] == pytest.approx(seconds[0], rel=0.25)


def test_no_time_without_a_calibration(tmp_path: Path) -> None:
    r = moelb.simulate(moelb.SimulationConfig(**SMALL, gpu=None))
    assert r.time_model is None
    assert all(x.time is None for a in r.algorithms.values() for x in a.realised.values())
    default = moelb.simulate(moelb.SimulationConfig(**SMALL))
    if moelb.DEFAULT_GPU in moelb.available_gpus():
        assert default.time_model is not None and default.time_model["gpu"] == moelb.DEFAULT_GPU
    else:
        assert default.time_model is None
        assert any("no modelled time" in n for n in default.notes)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"gpu": "h900"}, "gpu='h900' is neither a shipped GPU calibration nor a file"),
        ({"gpu_dtype": "int4"}, "dtype='int4'"),
        ({"deepep_mode": "fast"}, "deepep_mode must be 'auto' or one of"),
        ({"nvlink_bytes_per_s": 0.0}, "nvlink_bytes_per_s must be a bandwidth"),
        ({"network_bytes_per_s": float("nan")}, "network_bytes_per_s must be a bandwidth"),
        ({"model": "deepseek-v4-pro", "num_redundant_experts": 0}, "no GEMM table for deepseek-v4"),
    ],
)
def test_time_config_errors(tmp_path: Path, changes: dict, message: str) -> None:
    config = SimulationConfig(**{**SMALL, "gpu": str(write_calibration(tmp_path)), **changes})
    with pytest.raises(moelb.InvalidArgumentError, match=message):
        config.validate()


def test_without_replicas_equal_split_takes_about_the_time_of_a_token_dispatch_in_prefill(
    gpu: str,
) -> None:
    # No redundant slots: equal_split and sglang_static put every token on the same slot, so the
    # slot loads agree exactly; only the communication model differs, and a row's ms/step (and
    # its speed-up) should not depend on which of the two computed it.
    config = moelb.SimulationConfig(
        **{**SMALL, "num_redundant_experts": 0, "num_tokens": 8 * 4096, "num_layers": 2,
           "num_steps": 4, "rebalance_period": 2, "dispatch": ("sglang_static", "equal_split")},
        gpu=gpu,
    )  # fmt: skip
    r = moelb.simulate(config)
    assert deepep_mode(config) == "normal"
    for a in r.algorithms.values():
        static, split = (a.realised[d].time for d in config.dispatch)
        assert split.slowest_gemm_s == pytest.approx(static.slowest_gemm_s, rel=0.05)
        assert split.seconds == pytest.approx(static.seconds, rel=0.25)
