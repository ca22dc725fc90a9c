"""The step-time model (moelb.step_time) and GPU calibrations (moelb.gpu_calibration): the
arithmetic against cases computed by hand below, the communication copies of DeepEP's two modes
on a hand-traced dispatch, monotonicity (more tokens never faster; a more even load never slows
the slowest GPU's compute at equal totals), units, and the calibration file's checks. The
numbers come from the hand-written fixture of gpu_fixtures.py (never a measurement); the
properties run on the shipped default calibration when the package has one."""

from __future__ import annotations

import json
import math
from pathlib import Path

import moelb
import numpy as np
import pytest
from gpu_fixtures import shipped_or_fixture, toy_calibration, write_calibration
from hypothesis import given
from hypothesis import strategies as st


def toy_model(**kwargs) -> moelb.StepTimeModel:
    """The step-time model of the hand-written fixture calibration."""
    calibration = moelb.gpu_calibration.gpu_calibration_from_dict(toy_calibration(), "toy")
    return moelb.StepTimeModel(calibration, **kwargs)


@pytest.fixture(scope="module")
def any_model(tmp_path_factory: pytest.TempPathFactory) -> moelb.StepTimeModel:
    """The shipped default calibration when the package has one, else the fixture."""
    return moelb.StepTimeModel(shipped_or_fixture(tmp_path_factory.mktemp("gpu")))


# ------------------------------------------------------------------------------------------------
# Arithmetic, by hand.


def test_one_layer_by_hand() -> None:
    # Fixture: BW = 2e12 bytes/s, W = 3 * 7168 * 2048 = 44,040,192 bytes (FP8), so W / BW =
    # 22.020096 us; table (tokens: us) 0: 0, 64: 20, 128: 25, 256: 40, 512: 70, 1024: 130;
    # layer_fixed_s = 10 us. Two GPUs with two slots each, one layer:
    #   GPU 0: slot 0 has 100 tokens -> interp 20 + 36/64 * 5 = 22.8125 us >= W/BW, so
    #          weights 22.020096 + GEMM 0.792404; slot 1 has none -> 0.
    #   GPU 1: slot 2 has 300 tokens -> 40 + 44/256 * 30 = 45.15625 us;
    #          slot 3 has 1,200 tokens -> beyond the table: 130 + 176 * (60 / 512) = 150.625 us.
    #          Total 195.78125 us = weights 2 * 22.020096 + GEMM 151.740958.
    # Layer: the slowest GPU (1) + 10 us = 205.78125 us.
    model = toy_model()
    assert model.table.dtype == "fp8_e4m3"  # FP8 preferred when calibrated
    assert model.weight_seconds == pytest.approx(22.020096e-6, rel=1e-12)
    t = model.step_time([[100, 0, 300, 1200]], ep_size=2, copies=None)
    assert t.gpu_s[0] == pytest.approx([22.8125e-6, 195.78125e-6], rel=1e-12)
    assert t.weights_s[0] == pytest.approx([22.020096e-6, 2 * 22.020096e-6], rel=1e-12)
    assert t.gemm_s[0] == pytest.approx([0.792404e-6, 195.78125e-6 - 44.040192e-6], rel=1e-9)
    assert t.active_experts.tolist() == [[1, 2]] and t.tokens.tolist() == [[100, 1500]]
    assert t.slowest_gpu.tolist() == [1]
    assert t.seconds == pytest.approx(205.78125e-6, rel=1e-12)
    assert "GPU 1 slowest at 195.8 us" in t.explain()


def test_weight_streaming_floor_by_hand() -> None:
    # 10 tokens: the table says 20 * 10/64 = 3.125 us, less than streaming the weights
    # (22.020096 us): the expert costs W / BW and its GEMM term is 0.
    model = toy_model()
    assert model.expert_seconds([0, 10, 64]) == pytest.approx([0, 22.020096e-6, 22.020096e-6])
    assert model.gemm_seconds([10]) == [0.0]
    # bf16: twice the bytes, its own table.
    bf16 = toy_model(dtype="bf16")
    assert bf16.weight_seconds == pytest.approx(44.040192e-6)
    assert bf16.expert_seconds([128]) == pytest.approx([50e-6])


def test_steps_add_layers_and_the_fixed_term() -> None:
    model = toy_model()
    slots = np.array([[64, 0, 0, 0], [0, 0, 512, 512]])
    t = model.step_time(slots, ep_size=2, copies=None)
    assert t.layer_s == pytest.approx([22.020096e-6 + 10e-6, 140e-6 + 10e-6])
    assert t.seconds == pytest.approx(t.layer_s.sum())
    assert t.slowest_layer == 1


# ------------------------------------------------------------------------------------------------
# Communication.

# W = 4 GPUs on N = 2 nodes (G = 2), P = 8 slots (S = 2; slot p on GPU p // 2). Four tokens:
#   t0 from GPU 0 to slots 2, 3, 4 -> GPUs 1, 1, 2
#   t1 from GPU 1 to slots 6, 7, 0, 1 -> GPUs 3, 3, 0, 0
#   t2 from GPU 3 to slots 4, 6, 1 -> GPUs 2, 3 (itself), 0
#   t3 from GPU 2 to slots 0, 2 -> GPUs 0, 1
PHYSICAL = np.array([[2, 3, 4, -1], [6, 7, 0, 1], [4, 6, 1, -1], [0, 2, -1, -1]], dtype=np.int32)
SOURCE = np.array([0, 1, 3, 2])


def test_normal_mode_copies_by_hand() -> None:
    # One copy per (token, GPU), one network copy per (token, other node) to the GPU of the
    # same local index there, forwarded over NVLink to the node's other destinations:
    #   NVLink: t0 0->1; t1 1->0; t2 3->2 and the forward 1->0 (t2 arrives at GPU 1 = node 0's
    #           local index 1); t3 forward 0->1 (t3 arrives at GPU 0, local index 0).
    #   network: t0 0->2; t1 1->3; t2 3->1; t3 2->0 (one copy for GPUs 0 and 1).
    c = moelb.token_copies(PHYSICAL, SOURCE, 8, 4, 2, mode="normal")
    assert c.nvlink_sent.tolist() == [2, 2, 0, 1]
    assert c.nvlink_received.tolist() == [2, 2, 1, 0]
    assert c.network_sent.tolist() == [1, 1, 1, 1]
    assert c.network_received.tolist() == [1, 1, 1, 1]


def test_low_latency_mode_copies_by_hand() -> None:
    # One copy per (token, expert) not on the token's GPU, straight to the expert's GPU:
    #   NVLink: t0 0->1 x2; t1 1->0 x2; t2 3->2.
    #   network: t0 0->2; t1 1->3 x2; t2 3->0; t3 2->0, 2->1.
    c = moelb.token_copies(PHYSICAL, SOURCE, 8, 4, 2, mode="low_latency")
    assert c.nvlink_sent.tolist() == [2, 2, 0, 1]
    assert c.nvlink_received.tolist() == [2, 2, 1, 0]
    assert c.network_sent.tolist() == [1, 2, 2, 1]
    assert c.network_received.tolist() == [2, 1, 1, 2]


def test_comm_seconds_by_hand() -> None:
    # Bytes per copy for hidden 7168: dispatch 7168 + 4 * 56 = 7,392 (FP8 + float32 scales per
    # 128 channels), combine 2 * 7168 = 14,336 (bf16). GPU 1 in low-latency mode: NVLink
    # max(2 sent, 2 received) = 2 copies, network max(2, 1) = 2 copies; per phase the slower
    # link: dispatch max(2 * 7392 / 450e9, 2 * 7392 / 50e9) = 295.68 ns, combine 2 * 14336 /
    # 50e9 = 573.44 ns; total 869.12 ns.
    model = toy_model()
    assert (model.dispatch_bytes, model.combine_bytes) == (7392, 14336)
    c = moelb.token_copies(PHYSICAL, SOURCE, 8, 4, 2, mode="low_latency")
    assert model.comm_seconds(c)[1] == pytest.approx(869.12e-9, rel=1e-12)
    # A fast network: NVLink decides. GPU 0 in low-latency mode: NVLink 2 copies.
    fast = toy_model(interconnect=moelb.Interconnect(450e9, 1e15))
    assert fast.comm_seconds(c)[0] == pytest.approx(2 * (7392 + 14336) / 450e9, rel=1e-12)
    # The comm term is added to the GPU's time.
    slots = np.zeros((1, 8))
    t = model.step_time(slots, 4, moelb.LinkCopies.stack([c]))
    assert t.gpu_s[0] == pytest.approx(model.comm_seconds(c))
    # Busier directions: NVLink max(sent, received) = 2, 2, 1, 1; network 2, 2, 2, 2. Every GPU
    # is network-bound at 2 copies, so all tie and GPU 0 (the lowest) is named.
    assert t.nvlink_copies.tolist() == [[2, 2, 1, 1]] and t.network_copies.tolist() == [[2] * 4]
    line = t.explain()
    assert "GPU 0 slowest at 0.9 us" in line and "(2 network, 2 NVLink copies)" in line


def test_copies_within_one_gpu_are_free_and_one_node_uses_no_network() -> None:
    physical = np.array([[0, 1], [2, 3]], dtype=np.int32)  # S = 2: each token stays home
    for mode in moelb.DEEPEP_MODES:
        c = moelb.token_copies(physical, [0, 1], 4, 2, 1, mode=mode)
        assert not any(getattr(c, f).any() for f in moelb.LinkCopies.__dataclass_fields__)
    rng = np.random.default_rng(0)
    physical = rng.integers(-1, 16, (50, 8)).astype(np.int32)
    c = moelb.token_copies(physical, rng.integers(0, 4, 50), 16, 4, 1, mode="normal")
    assert c.network_sent.sum() == 0 and c.network_received.sum() == 0


@given(st.integers(0, 2**31), st.sampled_from([(4, 1), (4, 2), (8, 2), (8, 4), (8, 8)]))
def test_copies_are_conserved_and_normal_mode_sends_fewer(seed: int, cluster) -> None:
    W, N = cluster
    rng = np.random.default_rng(seed)
    P, T = 4 * W, int(rng.integers(1, 40))
    physical = rng.integers(-1, P, (T, 6)).astype(np.int32)
    source = rng.integers(0, W, T)
    normal = moelb.token_copies(physical, source, P, W, N, mode="normal")
    low = moelb.token_copies(physical, source, P, W, N, mode="low_latency")
    for c in (normal, low):
        assert c.nvlink_sent.sum() == c.nvlink_received.sum()
        assert c.network_sent.sum() == c.network_received.sum()
    # low latency: every remote (token, expert) pair crosses exactly one link.
    dest = np.where(physical >= 0, physical // 4, -1)
    remote = (dest >= 0) & (dest != source[:, None])
    assert low.nvlink_sent.sum() + low.network_sent.sum() == remote.sum()
    # normal mode deduplicates: never more network copies, and every token with a remote
    # destination GPU reaches it.
    assert normal.network_sent.sum() <= low.network_sent.sum()
    remote_gpus = sum(len(set(dest[t][remote[t]])) for t in range(T))
    assert normal.network_sent.sum() <= remote_gpus


def test_uniform_copies() -> None:
    # 4 GPUs in 2 nodes: a copy comes from the receiving GPU itself 1/4 of the time, from its
    # node's other GPU 1/4, from the other node 2/4.
    slots = np.array([8.0, 0, 4, 4, 0, 0, 0, 0])  # GPU loads 8, 8, 0, 0
    c = moelb.uniform_copies(slots, 4, 2)
    assert c.nvlink_received.tolist() == [2, 2, 0, 0]
    assert c.network_received.tolist() == [4, 4, 0, 0]
    # Every GPU sends 1/4 of each GPU's copies, over the link that leads there: GPU 0 sends 8 / 4
    # to GPU 1 over NVLink and none over the network (GPUs 2 and 3 receive nothing); GPU 2 sends
    # (8 + 8) / 4 to node 0 over the network and none over NVLink.
    assert c.nvlink_sent.tolist() == [2, 2, 0, 0]
    assert c.network_sent.tolist() == [0, 0, 4, 4]


@given(st.integers(0, 2**31), st.sampled_from([(4, 1), (4, 2), (8, 2), (8, 8)]))
def test_uniform_copies_are_the_expectation_over_source_ranks(seed: int, cluster) -> None:
    # The expectation of token_copies' low-latency counts when every copy's source rank is
    # drawn uniformly: enumerate the sources by hand (each with probability 1 / W).
    W, N = cluster
    G, S = W // N, 3
    loads = np.random.default_rng(seed).integers(0, 50, W * S).astype(np.float64)
    received = loads.reshape(W, S).sum(axis=1)
    expected = {f: np.zeros(W) for f in moelb.LinkCopies.__dataclass_fields__}
    for s in range(W):
        for d in range(W):
            if d == s:
                continue
            link = "nvlink" if s // G == d // G else "network"
            expected[f"{link}_sent"][s] += received[d] / W
            expected[f"{link}_received"][d] += received[d] / W
    c = moelb.uniform_copies(loads, W, N)
    for f, want in expected.items():
        assert getattr(c, f) == pytest.approx(want, rel=1e-12, abs=1e-12), f


# ------------------------------------------------------------------------------------------------
# Monotonicity and units, on the shipped calibration when there is one.


@given(st.floats(0, 20000), st.floats(0, 20000))
def test_more_tokens_never_lower_an_experts_time(any_model, a: float, b: float) -> None:
    lo, hi = sorted((a, b))
    assert any_model.expert_seconds(hi) >= any_model.expert_seconds(lo)
    assert any_model.gemm_seconds(hi) >= any_model.gemm_seconds(lo)


def test_the_envelope_lifts_a_measured_dip() -> None:
    data = toy_calibration()
    data["gemm"][0]["seconds_per_expert"] = [0.0, 2.0e-5, 1.9e-5, 4.0e-5, 7.0e-5, 1.3e-4]
    cal = moelb.gpu_calibration.gpu_calibration_from_dict(data, "dip")
    table = cal.gemm_table("deepseek-v3")
    assert table.seconds([64, 96, 128]) == pytest.approx([2.0e-5, 2.0e-5, 2.0e-5])
    assert table.max_dip == pytest.approx(0.05)
    assert toy_model().table.max_dip == 0.0


def test_extrapolation_keeps_rising_past_a_dip_at_the_last_point() -> None:
    # The last measured point dips below the one before (noise where the time is flat, or a
    # clock change): the envelope lifts it, so its last two points are equal. Extrapolating
    # from those two alone would price every expert beyond the table at the last point's time
    # (1e5 tokens as cheap as 1,024). The slope comes from the last point back to the last
    # point below it (256 tokens, 40 us): 30 us / 768 tokens.
    data = toy_calibration()
    data["gemm"][0]["seconds_per_expert"] = [0.0, 2.0e-5, 2.5e-5, 4.0e-5, 7.0e-5, 6.9e-5]
    table = moelb.gpu_calibration.gpu_calibration_from_dict(data, "dip").gemm_table("deepseek-v3")
    assert table.seconds([512, 1024]) == pytest.approx([7.0e-5, 7.0e-5])
    assert table.seconds(4096) > table.seconds(1024)
    assert table.seconds(4096) == pytest.approx(7.0e-5 + 3072 * 3.0e-5 / 768, rel=1e-12)


@given(st.integers(0, 2**31), st.floats(0, 1))
def test_a_more_even_load_never_slows_the_slowest_gpus_compute(
    any_model, seed: int, alpha: float
) -> None:
    # GPU loads L_g, each GPU's load split over its S slots in the same proportions phi_e:
    # compute_g = sum_e t(L_g * phi_e), nondecreasing in L_g. Drawing every load towards the mean
    # (L' = mean + alpha * (L - mean), equal totals, max L' <= max L) never raises the slowest
    # GPU's compute.
    rng = np.random.default_rng(seed)
    W, S = 8, 9
    loads = rng.integers(0, 40000, W).astype(np.float64)
    phi = rng.dirichlet(np.ones(S))
    evened = loads.mean() + alpha * (loads - loads.mean())
    assert evened.sum() == pytest.approx(loads.sum())
    before = any_model.step_time((loads[:, None] * phi).reshape(1, -1), W, None)
    after = any_model.step_time((evened[:, None] * phi).reshape(1, -1), W, None)
    assert after.gpu_s.max() <= before.gpu_s.max() * (1 + 1e-12)
    # And the slowest GPU is the most loaded one.
    assert before.gpu_s[0, before.slowest_gpu[0]] == before.gpu_s[0, loads.argmax()]


def test_units_are_seconds_and_bytes_per_second(any_model) -> None:
    cal = any_model.calibration
    # A memory bandwidth in bytes/s (HBM: 1e12..1e14), a fixed term and expert times in seconds.
    assert 1e11 < cal.memory_bandwidth_bytes_per_s < 1e14
    assert 0 <= cal.layer_fixed_s < 1e-3
    assert 1e-7 < any_model.weight_seconds < 1e-3
    # One DeepSeek-V3 expert at 128 tokens on a datacenter GPU takes microseconds, not ms or ns.
    assert 1e-6 < float(any_model.expert_seconds(128)) < 1e-3
    # Doubling the network bandwidth halves a network-bound comm term.
    c = moelb.LinkCopies(*(np.array([0.0, 100.0]) for _ in range(4)))
    slow = moelb.StepTimeModel(cal, interconnect=moelb.Interconnect(1e15, 50e9))
    fast = moelb.StepTimeModel(cal, interconnect=moelb.Interconnect(1e15, 100e9))
    assert slow.comm_seconds(c)[1] == pytest.approx(2 * fast.comm_seconds(c)[1])
    assert slow.comm_seconds(c)[1] == pytest.approx(100 * (7392 + 14336) / 50e9)


# ------------------------------------------------------------------------------------------------
# Calibration files.


def test_load_by_path_and_unknown_names(tmp_path: Path) -> None:
    path = write_calibration(tmp_path)
    cal = moelb.load_gpu_calibration(str(path))
    assert cal.key == "toy" and cal.source == str(path)
    assert cal.metadata["date"] == "2026-01-01" and "gpu" not in cal.metadata
    assert [f"{t.model}/{t.dtype}" for t in cal.gemm] == [
        "deepseek-v3/fp8_e4m3",
        "deepseek-v3/bf16",
    ]
    shipped = moelb.available_gpus()
    with pytest.raises(moelb.InvalidArgumentError, match=r"gpu='h900' is neither.*ships") as e:
        moelb.load_gpu_calibration("h900")
    for key in shipped:
        assert repr(key) in str(e.value)
    if "h200" not in shipped:
        with pytest.raises(moelb.InvalidArgumentError, match="gpu='h200'"):
            moelb.load_gpu_calibration("h200")
    for key in shipped:  # every shipped file loads and holds a DeepSeek-V3 table
        assert moelb.load_gpu_calibration(key).gemm_table("deepseek-v3").tokens[0] == 0


def test_missing_model_or_dtype(tmp_path: Path) -> None:
    cal = moelb.load_gpu_calibration(str(write_calibration(tmp_path)))
    with pytest.raises(moelb.InvalidArgumentError, match="no GEMM table for deepseek-v4-pro; it"):
        cal.gemm_table("deepseek-v4-pro")
    with pytest.raises(moelb.InvalidArgumentError, match="dtype='int4'"):
        cal.gemm_table("deepseek-v3", "int4")
    data = toy_calibration()
    del data["gemm"][0]
    only_bf16 = moelb.gpu_calibration.gpu_calibration_from_dict(data)
    assert only_bf16.gemm_table("deepseek-v3").dtype == "bf16"
    with pytest.raises(moelb.InvalidArgumentError, match="deepseek-v3/fp8_e4m3; it has"):
        only_bf16.gemm_table("deepseek-v3", "fp8_e4m3")


def _set(path: str, value):
    def change(d):
        keys = path.split(".")
        target = d
        for k in keys[:-1]:
            target = target[int(k)] if k.isdigit() else target[k]
        last = keys[-1]
        if value is KeyError:
            del target[last]
        else:
            target[int(last) if last.isdigit() else last] = value

    return change


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_set("format", "other"), "format='other'"),
        (_set("version", 2), "version=2"),
        (_set("key", ""), "key must be a non-empty string"),
        (_set("gpu", KeyError), "gpu must be a non-empty string, got None"),
        (_set("memory_bandwidth_bytes_per_s", 3000), "memory_bandwidth_bytes_per_s=3000.0 is not"),
        (_set("memory_bandwidth_bytes_per_s", "fast"), "memory_bandwidth_bytes_per_s must be a"),
        (_set("memory_bandwidth_bytes_per_s", math.inf), "must be a finite number, got inf"),
        (_set("layer_fixed_s", 12.0), "layer_fixed_s=12.0 is not a per-layer time in seconds"),
        (_set("layer_fixed_s", -1e-6), "layer_fixed_s=-1e-06"),
        (_set("gemm", []), "gemm must be a non-empty list"),
        (_set("gemm.0", 5), r"gemm\[0\]: expected an object"),
        (_set("gemm.0.dtype", "fp4"), r"gemm\[0\]: dtype='fp4'"),
        (_set("gemm.1.dtype", "fp8_e4m3"), "weight_bytes_per_expert=88080384 does not fit"),
        (_set("gemm.0.hidden_size", 0), "hidden_size must be a positive integer, got 0"),
        (_set("gemm.0.hidden_size", 7168.0), "hidden_size must be a positive integer"),
        (_set("gemm.0.weight_bytes_per_expert", 1000), "weight_bytes_per_expert=1000"),
        (_set("gemm.0.tokens", [0, 64, 64, 256, 512, 1024]), "strictly increasing, got 64 then 64"),
        (_set("gemm.0.tokens", [1, 64, 128, 256, 512, 1024]), "tokens must start at 0, got 1"),
        (_set("gemm.0.tokens", [0]), "at least 2 points"),
        (_set("gemm.0.tokens", [0, 64, None, 256, 512, 1024]), "list of finite numbers"),
        (_set("gemm.0.seconds_per_expert", [0, 1, 2]), "has 3 values for 6 tokens"),
        (_set("gemm.0.seconds_per_expert.2", 25.0), r"seconds_per_expert\[2\]=25.0 is not"),
        (_set("gemm.0.seconds_per_expert.2", -1e-6), r"seconds_per_expert\[2\]=-1e-06"),
        (_set("gemm.0.seconds_per_expert.0", 1e-6), "at 0 tokens must be 0"),
        # The FP8 table written in milliseconds (all its values under 1): 20 "seconds" at 64 tokens
        # is 900x what streaming the expert's weights takes (22 us).
        (
            _set("gemm.0.seconds_per_expert", [0.0, 0.020, 0.025, 0.040, 0.070, 0.130]),
            r"seconds_per_expert\[1\]=0.02 at 64 tokens is not",
        ),
        (_set("gemm.1.method", 3), "method must be a string, got 3"),
    ],
)
def test_calibration_errors_name_the_field(tmp_path: Path, change, message) -> None:
    data = toy_calibration()
    change(data)
    path = write_calibration(tmp_path, data)
    with pytest.raises(moelb.InvalidArgumentError, match=message) as e:
        moelb.load_gpu_calibration(str(path))
    assert str(path) in str(e.value)


def test_duplicate_tables_and_bad_json(tmp_path: Path) -> None:
    data = toy_calibration()
    data["gemm"].append(data["gemm"][0])
    with pytest.raises(moelb.InvalidArgumentError, match="deepseek-v3/fp8_e4m3 twice"):
        moelb.gpu_calibration.gpu_calibration_from_dict(data)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(moelb.InvalidArgumentError, match=r"cannot read .* as JSON"):
        moelb.load_gpu_calibration(str(bad))
    bad.write_text(json.dumps([1, 2]))
    with pytest.raises(moelb.InvalidArgumentError, match="expected a JSON object, got list"):
        moelb.load_gpu_calibration(str(bad))


def test_model_input_errors() -> None:
    model = toy_model()
    with pytest.raises(moelb.InvalidArgumentError, match="slot_tokens must be"):
        model.step_time(np.zeros((1, 5)), 2, None)
    with pytest.raises(moelb.InvalidArgumentError, match="num_tokens must be finite and >= 0"):
        model.expert_seconds([-1])
    with pytest.raises(moelb.InvalidArgumentError, match="copies are"):
        model.step_time(np.zeros((1, 4)), 2, moelb.LinkCopies(*(np.zeros(3) for _ in range(4))))
    with pytest.raises(moelb.InvalidArgumentError, match="mode='fast'"):
        moelb.token_copies(PHYSICAL, SOURCE, 8, 4, 2, mode="fast")
    with pytest.raises(moelb.InvalidArgumentError, match="ep_size=4 must be a positive multiple"):
        moelb.token_copies(PHYSICAL, SOURCE, 8, 4, 3)
    with pytest.raises(moelb.InvalidArgumentError, match=r"physical\[0, 0\]=10 is not a slot"):
        moelb.token_copies(PHYSICAL + 8, SOURCE, 8, 4, 2)
    with pytest.raises(moelb.InvalidArgumentError, match=r"source_rank\[0\]=4 is not a rank"):
        moelb.token_copies(PHYSICAL, SOURCE + 4, 8, 4, 2)
    with pytest.raises(moelb.InvalidArgumentError, match="physical must hold integers"):
        moelb.token_copies(PHYSICAL * 1.0, SOURCE, 8, 4, 2)
    with pytest.raises(moelb.InvalidArgumentError, match="source_rank holds values that do not"):
        moelb.token_copies(PHYSICAL, SOURCE + 2**40, 8, 4, 2)
    with pytest.raises(moelb.InvalidArgumentError, match=r"physical must be \[T, C\]"):
        moelb.token_copies(PHYSICAL, SOURCE[:2], 8, 4, 2)
    with pytest.raises(moelb.InvalidArgumentError, match="network_bytes_per_s must be a bandwidth"):
        moelb.Interconnect(450e9, 50)


# ------------------------------------------------------------------------------------------------
# Against the calibration contract's other implementation (benchmarks/validate_step_time.py,
# written on its own from the same contract: benchmarks/README.md, "GPU calibration") on the
# realised distributions it validated on the H100.

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.skipif(
    "h100" not in moelb.available_gpus(), reason="the package ships no H100 calibration"
)
def test_matches_validate_step_time_on_the_validated_distributions() -> None:
    import importlib
    import sys

    sys.path.insert(0, str(BENCHMARKS))
    try:
        validate = importlib.import_module("validate_step_time")
    finally:
        sys.path.remove(str(BENCHMARKS))
    calibration = json.loads(Path(moelb.load_gpu_calibration("h100").source).read_text())
    rows = json.loads((BENCHMARKS / "results" / "step_time_distributions.json").read_text())[
        "distributions"
    ]
    assert len(rows) >= 20
    for dtype in ("bf16", "fp8_e4m3"):
        model = moelb.StepTimeModel("h100", dtype=dtype)
        for row in rows:
            slots = np.asarray(row["tokens_per_expert"])[None, :]  # one GPU's slots, one layer
            ours = model.step_time(slots, ep_size=1, copies=None).seconds
            theirs = validate.predict_layer_seconds(
                calibration, "deepseek-v3", dtype, row["tokens_per_expert"]
            )
            assert ours == pytest.approx(theirs, rel=1e-12), (row["id"], dtype)
