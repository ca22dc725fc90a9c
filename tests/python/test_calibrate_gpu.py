"""The GPU calibration scripts of issue 22 without a GPU: benchmarks/calibrate_gpu.py's token grid,
weight bytes, line fit and calibration-file validation; benchmarks/validate_step_time.py's
prediction arithmetic against a hand-computed case; the shipped calibration file; the FFN and
its float32 reference on the CPU (bf16 through torch._grouped_mm, where PyTorch has it). The
timed parts need CUDA and are skipped here."""

from __future__ import annotations

import copy
import importlib
import importlib.resources
import itertools
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from moelb.simulation.presets import MODEL_PRESETS

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def scripts() -> Iterator[tuple[ModuleType, ModuleType]]:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield (
            importlib.import_module("calibrate_gpu"),
            importlib.import_module("validate_step_time"),
        )
    finally:
        sys.path.remove(str(BENCHMARKS))


def tiny_calibration() -> dict[str, Any]:
    """A hand-made calibration file: one entry, round numbers."""
    return {
        "format": "moelb-gpu-calibration",
        "version": 1,
        "key": "test",
        "gpu": "Test GPU",
        "sm_count": 100,
        "memory_bytes": 10**10,
        "torch": "2.11.0",
        "cuda": "13.0",
        "driver": "580",
        "date": "2026-12-07",
        "command": "python benchmarks/calibrate_gpu.py --key test",
        "memory_bandwidth_bytes_per_s": 1.0e12,
        "layer_fixed_s": 10e-6,
        "gemm": [
            {
                "model": "deepseek-v3",
                "dtype": "bf16",
                "hidden_size": 7168,
                "intermediate_size": 2048,
                "weight_bytes_per_expert": 20_000_000,  # W / BW = 20 us
                "method": "test",
                "tokens": [0, 1, 100, 200],
                "seconds_per_expert": [0.0, 15e-6, 30e-6, 50e-6],
            }
        ],
        "notes": "",
    }


def test_token_grid(scripts: tuple[ModuleType, ModuleType]) -> None:
    cal, _ = scripts
    grid = cal.token_grid()
    assert grid[0] == 0 and grid[-1] == 8192
    assert all(b > a for a, b in itertools.pairwise(grid))
    assert {1, 2, 4, 8, 16, 20, 24, 28, 32, 40, 4096, 5120, 6144, 7168} <= set(grid)
    assert 3 not in grid and 12 not in grid  # dense only from 16 on
    # Log-ish: within the dense part, consecutive points differ by at most a third.
    dense = [t for t in grid if t >= 16]
    assert max(b / a for a, b in itertools.pairwise(dense)) <= 1.25 + 1e-9
    assert cal.token_grid(100, 2, 8) == [0, 1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 100]
    with pytest.raises(ValueError, match="max_tokens must be a positive integer"):
        cal.token_grid(0)
    with pytest.raises(ValueError, match="steps_per_octave"):
        cal.token_grid(64, steps_per_octave=1.5)


def test_models_match_presets(scripts: tuple[ModuleType, ModuleType]) -> None:
    cal, _ = scripts
    for name, (hidden, inter) in cal.MODELS.items():
        preset = MODEL_PRESETS[name]
        assert (preset.hidden_size, preset.intermediate_size) == (hidden, inter)
        # FP8 weights: the simulator's expert_bytes, plus the rowwise scales.
        fp8 = cal.weight_bytes_per_expert(hidden, inter, "fp8_e4m3")
        assert fp8 == preset.expert_bytes + 4 * (2 * inter + hidden)
        assert cal.weight_bytes_per_expert(hidden, inter, "bf16") == 2 * preset.expert_bytes
    assert cal.weight_bytes_per_expert(7168, 2048, "bf16") == 88_080_384
    with pytest.raises(ValueError, match="dtype must be one of"):
        cal.weight_bytes_per_expert(7168, 2048, "fp16")


def test_fit_line_and_running_max(scripts: tuple[ModuleType, ModuleType]) -> None:
    cal, _ = scripts
    intercept, slope = cal.fit_line([1, 2, 4, 8], [3 + 2 * x for x in (1, 2, 4, 8)])
    assert intercept == pytest.approx(3) and slope == pytest.approx(2)
    with pytest.raises(ValueError, match="two distinct xs"):
        cal.fit_line([1, 1], [2, 3])
    assert cal.running_max([1.0, 3.0, 2.0, 4.0, 3.5]) == [1.0, 3.0, 3.0, 4.0, 4.0]


def test_validate_calibration_accepts_and_names_bad_fields(
    scripts: tuple[ModuleType, ModuleType],
) -> None:
    cal, _ = scripts
    good = tiny_calibration()
    cal.validate_calibration(good)
    cases = [
        (("format",), "x", "format must be"),
        (("version",), 2, "version must be 1"),
        (("gpu",), "", "gpu must be a non-empty string"),
        (("date",), "07/12/2026", "date must be YYYY-MM-DD"),
        (("sm_count",), 0, "sm_count must be a positive integer"),
        (("memory_bandwidth_bytes_per_s",), float("nan"), "memory_bandwidth_bytes_per_s"),
        (("layer_fixed_s",), -1e-6, "layer_fixed_s must be a finite number >= 0"),
        (("gemm",), [], "gemm must be a non-empty list"),
        (("gemm", 0, "dtype"), "fp16", r"gemm\[0\]\.dtype must be one of"),
        (("gemm", 0, "tokens"), [1, 100, 200, 300], r"gemm\[0\]\.tokens must start at 0"),
        (("gemm", 0, "tokens"), [0, 100, 100, 200], r"strictly increasing \(tokens\[2\]=100\)"),
        (("gemm", 0, "seconds_per_expert"), [0.0, 1e-6], "as long as tokens"),
        (("gemm", 0, "seconds_per_expert"), [1e-6, 1e-6, 2e-6, 3e-6], r"\[0\] \(0 tokens\)"),
        (("gemm", 0, "seconds_per_expert"), [0.0, 0.0, 2e-6, 3e-6], r"seconds_per_expert\[1\]"),
        (("gemm", 0, "weight_bytes_per_expert"), 1.5, "weight_bytes_per_expert must be a pos"),
    ]
    for path, value, message in cases:
        doc = copy.deepcopy(good)
        target = doc
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        with pytest.raises(ValueError, match=message):
            cal.validate_calibration(doc)
    doc = copy.deepcopy(good)
    doc["gemm"].append(copy.deepcopy(doc["gemm"][0]))
    with pytest.raises(ValueError, match=r"gemm\[1\]: \(model, dtype\)"):
        cal.validate_calibration(doc)


def test_write_json_round_trip(scripts: tuple[ModuleType, ModuleType], tmp_path: Path) -> None:
    cal, _ = scripts
    path = tmp_path / "sub" / "cal.json"
    cal.write_json(path, tiny_calibration())
    back = json.loads(path.read_text())
    cal.validate_calibration(back)
    assert back == tiny_calibration()
    assert [p.name for p in path.parent.iterdir()] == ["cal.json"]  # no temporary left


def test_finish_derives_per_expert_seconds(scripts: tuple[ModuleType, ModuleType]) -> None:
    """finish(): layer_fixed_s the median intercept; per expert (layer - fixed) / group, then the
    running max; the result validates."""
    cal, _ = scripts
    env = {k: v for k, v in tiny_calibration().items() if k not in ("gemm", "notes")}
    del env["memory_bandwidth_bytes_per_s"], env["layer_fixed_s"]
    stream = {"bytes_per_s": 3e12, "read_only_sum": [{"bytes": 2**30}]}

    def entry(dtype: str, intercept: float) -> dict[str, Any]:
        return {
            "model": "deepseek-v3",
            "dtype": dtype,
            "hidden_size": 7168,
            "intermediate_size": 2048,
            "weight_bytes_per_expert": 1,
            "method": "m",
            "group_size": 4,
            "tokens": [0, 1, 2, 4],
            # 4 experts: 10 us fixed + 4 x (5, 7, 6.5) us; the dip at 4 tokens is noise.
            "layer_seconds": [0.0, 30e-6, 38e-6, 36e-6],
            "fixed_fit": {"intercept_s": intercept},
        }

    doc = cal.finish(env, stream, [entry("bf16", 9e-6), entry("fp8_e4m3", 11e-6)])
    assert doc["layer_fixed_s"] == pytest.approx(10e-6)
    assert doc["memory_bandwidth_bytes_per_s"] == 3e12
    row = doc["gemm"][0]
    assert row["measured_seconds_per_expert"] == pytest.approx([0.0, 5e-6, 7e-6, 6.5e-6])
    assert row["seconds_per_expert"] == pytest.approx([0.0, 5e-6, 7e-6, 7e-6])
    cal.validate_calibration(doc)


def test_prediction_hand_computed(scripts: tuple[ModuleType, ModuleType]) -> None:
    """W / BW = 20 us; table 0:0, 1:15, 100:30, 200:50 us; fixed 10 us. Experts with
    0, 1, 50, 150 and 300 tokens:
      0   -> nothing;
      1   -> interp 15 < 20: 20 (streaming the weights is the floor);
      50  -> 15 + 49/99 * 15 = 22.4242..;
      150 -> 30 + 0.5 * 20 = 40;
      300 -> extrapolated from (100, 30), (200, 50): 70;
    layer = 10 + 20 + 22.4242.. + 40 + 70 = 162.4242.. us."""
    _, val = scripts
    cal = tiny_calibration()
    got = val.predict_layer_seconds(cal, "deepseek-v3", "bf16", [0, 1, 50, 150, 300])
    assert got == pytest.approx((10 + 20 + (15 + 49 / 99 * 15) + 40 + 70) * 1e-6, rel=1e-12)
    assert val.predict_layer_seconds(cal, "deepseek-v3", "bf16", [0, 0]) == pytest.approx(10e-6)
    tokens, seconds = cal["gemm"][0]["tokens"], cal["gemm"][0]["seconds_per_expert"]
    assert val.interpolate(tokens, seconds, 0) == 0.0
    assert val.interpolate(tokens, seconds, 200) == pytest.approx(50e-6)
    with pytest.raises(ValueError, match="tokens_per_expert must be >= 0"):
        val.predict_layer_seconds(cal, "deepseek-v3", "bf16", [-1])
    with pytest.raises(ValueError, match="no gemm entry for model='deepseek-v3', dtype='fp8_e4m3'"):
        val.predict_layer_seconds(cal, "deepseek-v3", "fp8_e4m3", [1])


def test_prediction_monotone_in_tokens(scripts: tuple[ModuleType, ModuleType]) -> None:
    _, val = scripts
    cal = tiny_calibration()
    times = [val.predict_layer_seconds(cal, "deepseek-v3", "bf16", [t, 7]) for t in range(0, 400)]
    assert all(b >= a for a, b in itertools.pairwise(times))


def test_compare_errors_and_summary(scripts: tuple[ModuleType, ModuleType]) -> None:
    _, val = scripts
    cal = tiny_calibration()
    dists = [
        {"id": "a", "regime": "prefill", "model": "deepseek-v3", "placement": "trivial",
         "dispatch": "x", "tokens_per_gpu": 4096, "balancedness": 0.5, "rank_tokens": 150,
         "tokens_per_expert": [150, 0]},
        {"id": "b", "regime": "decode", "model": "deepseek-v3", "placement": "moelb",
         "dispatch": "x", "tokens_per_gpu": 64, "balancedness": 0.9, "rank_tokens": 1,
         "tokens_per_expert": [1]},
    ]  # fmt: skip
    # Predicted: a = 10 + 40 = 50 us, b = 10 + 20 = 30 us.
    measured = [
        {"id": "a", "dtype": "bf16", "seconds": 40e-6},
        {"id": "b", "dtype": "bf16", "seconds": 30e-6},
    ]
    out = val.compare(cal, dists, measured)
    errors = {r["id"]: r["error"] for r in out["rows"]}
    assert errors["a"] == pytest.approx(0.25) and errors["b"] == pytest.approx(0.0)
    by_regime = {s["regime"]: s for s in out["summary"]}
    assert by_regime["prefill"]["within_10_percent"] == 0
    assert by_regime["decode"]["within_10_percent"] == 1
    with pytest.raises(ValueError, match="distribution 'zz' is not in the distributions"):
        val.compare(cal, dists, [{"id": "zz", "dtype": "bf16", "seconds": 1.0}])


def shipped(name: str) -> dict[str, Any] | None:
    resource = importlib.resources.files("moelb") / "data" / "gpus" / name
    return json.loads(resource.read_text()) if resource.is_file() else None


def test_shipped_h100_table(scripts: tuple[ModuleType, ModuleType]) -> None:
    """The shipped H100 file validates, covers every model in bf16 and FP8, and its figures are
    in physical range (bandwidth below the H100's 3.35 TB/s datasheet peak; streaming a V3 bf16
    expert's weights takes what the bandwidth says)."""
    cal, _ = scripts
    doc = shipped("h100.json")
    if doc is None:
        pytest.fail("python/moelb/data/gpus/h100.json is not installed with the package")
    cal.validate_calibration(doc)
    assert "H100" in doc["gpu"] and doc["key"] == "h100"
    assert 1.5e12 < doc["memory_bandwidth_bytes_per_s"] < 3.35e12
    assert 0 <= doc["layer_fixed_s"] < 1e-4
    pairs = {(e["model"], e["dtype"]) for e in doc["gemm"]}
    assert pairs == {(m, d) for m in cal.MODELS for d in cal.DTYPES}
    for e in doc["gemm"]:
        assert e["tokens"][-1] >= 8192
        s = e["seconds_per_expert"]
        assert all(b >= a for a, b in itertools.pairwise(s))  # published running max
        stream = e["weight_bytes_per_expert"] / doc["memory_bandwidth_bytes_per_s"]
        # One token: about the time to stream the weights (within a factor 2 either way).
        assert 0.5 * stream < s[1] < 2 * stream, (e["model"], e["dtype"], s[1], stream)
        # 8,192 tokens: compute-bound, under the H100's ~1,000 (bf16) / 2,000 (FP8) TFLOP/s.
        flops = 2 * 3 * e["hidden_size"] * e["intermediate_size"] * e["tokens"][-1]
        peak = 1.0e15 if e["dtype"] == "bf16" else 2.0e15
        assert flops / s[-1] < peak


def test_ffn_matches_reference_on_cpu(scripts: tuple[ModuleType, ModuleType]) -> None:
    """The grouped FFN (bf16, torch._grouped_mm on the CPU) equals the per-expert float32
    reference on uneven counts with empty experts; a wrong grouping is caught."""
    torch = pytest.importorskip("torch")
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this PyTorch has no torch._grouped_mm")
    cal, _ = scripts
    group = cal.ExpertGroup(256, 128, 4, "bf16", "torch", seed=0, device="cpu")
    x, scale = group.inputs(64, seed=1)
    counts = [5, 0, 17, 1]
    assert cal.check_ffn(group, x, scale, counts) < 2e-2
    out = group.ffn(x[:23], None, cal.offsets([17, 0, 5, 1], "cpu"), 4)
    ref = group.reference(x[:23], None, counts)
    assert float((out.float() - ref).norm() / ref.norm()) > 0.5  # rows grouped differently
    with pytest.raises(ValueError, match="token counts must be integers >= 0"):
        cal.offsets([1, -1], "cpu")


def test_fp8_quantisation_on_cpu(scripts: tuple[ModuleType, ModuleType]) -> None:
    torch = pytest.importorskip("torch")
    cal, _ = scripts
    t = torch.randn(3, 64, 128, dtype=torch.bfloat16)
    q, scale = cal._quantize_rows(t)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (3, 64)
    assert float(q.float().abs().amax()) == 448.0  # every row's amax maps to the largest FP8
    back = q.float() * scale[..., None]
    assert float((back - t.float()).norm() / t.float().norm()) < 0.05


def test_gpu_parts_need_cuda(scripts: tuple[ModuleType, ModuleType], tmp_path: Path) -> None:
    """Without CUDA the timed modes say so and exit 2, writing nothing; with CUDA (never in CI)
    a quick calibration that validates."""
    torch = pytest.importorskip("torch")
    cal, val = scripts
    out = tmp_path / "quick.json"
    if torch.cuda.is_available():
        assert cal.main(["--quick", "--out", str(out)]) == 0
        cal.validate_calibration(json.loads(out.read_text()))
        return
    assert cal.main(["--out", str(out)]) == 2
    args = ["measure", "--distributions", str(tmp_path / "d.json"), "--out", str(out)]
    assert val.main(args) == 2
    assert not out.exists()


def test_realised_distributions_conserve_tokens(scripts: tuple[ModuleType, ModuleType]) -> None:
    """validate_step_time's distributions: one row per placement and dispatch model, the rank's
    S = P / ep_size slots, its counts summing to its load, the busiest rank, and every routed
    (token, expert) pair of the step on some rank (mean load x ranks = tokens x top-k)."""
    _, val = scripts
    rows = val.realised_distributions(
        "deepseek-v3", 8, 1, 64, 0.6, ("sglang_static", "balanced"), "decode", seed=3
    )
    assert [(r["placement"], r["dispatch"]) for r in rows] == [
        (p, d) for p in ("trivial", "deepseek", "moelb") for d in ("sglang_static", "balanced")
    ]
    top_k = MODEL_PRESETS["deepseek-v3"].topk_config().top_k
    for r in rows:
        assert len(r["tokens_per_expert"]) == (256 + 32) // 8
        assert sum(r["tokens_per_expert"]) == r["rank_tokens"] >= r["mean_rank_tokens"]
        assert r["mean_rank_tokens"] * 8 == pytest.approx(64 * 8 * top_k)
        assert r["balancedness"] == pytest.approx(r["mean_rank_tokens"] / r["rank_tokens"])
    # The balanced dispatch splits each step exactly: its busiest rank is never busier.
    by = {(r["placement"], r["dispatch"]): r["rank_tokens"] for r in rows}
    for p in ("deepseek", "moelb"):
        assert by[(p, "balanced")] <= by[(p, "sglang_static")]
