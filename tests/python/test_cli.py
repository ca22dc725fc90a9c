"""The moelb command line: demo and simulate print consistent tables and write their files, the
SGLang round trip (.pt dump -> rebalance -> placement JSON), inspect, and one-line errors with a
non-zero exit for bad flags, missing and corrupt files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import moelb
import numpy as np
import pytest
from gpu_fixtures import shipped_or_fixture
from moelb.cli import main


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m moelb args`` with this interpreter and environment (PYTHONPATH included)."""
    return subprocess.run(
        [sys.executable, "-m", "moelb", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ),
        cwd=cwd,
    )


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Runs ``moelb args`` in process; returns (exit status, stdout, stderr)."""
    try:
        code = main(list(args))
    except SystemExit as e:  # argparse: bad flags, --help, --version
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, needle: str) -> None:
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "error" in lines[0] and needle in lines[0], err
    assert "Traceback" not in err


SIMULATE_SMALL = [
    "simulate",
    "--ep-size", "8",
    "--num-nodes", "2",
    "--num-redundant-experts", "16",
    "--num-tokens", "512",
    "--num-steps", "8",
    "--rebalance-period", "4",
    "--num-layers", "3",
    "--skew", "1.0",
]  # fmt: skip


# ------------------------------------------------------------------------------------------------
# demo and simulate.


def test_demo_prints_the_table_and_writes_the_files(tmp_path: Path) -> None:
    # The shipped default calibration when the package has one (else the test fixture): the demo
    # then also times its steps and runs the prefill-like traffic (4,096 tokens per GPU).
    gpu = shipped_or_fixture(tmp_path)
    out_dir = tmp_path / "out"
    result = run("demo", "--quick", "--output-dir", str(out_dir), "--progress", "--gpu", gpu)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "deepseek-v3, 6 MoE layers x 256 experts, 288 slots on 32 GPUs in 4 nodes" in out
    rows = ("trivial", "deepseek", "moelb", "deepseek_global", "moelb:none", "moelb:none:step_peak")
    for row in (*rows, "lower bound"):
        assert f"\n{row} " in out
    assert "simulating [" in result.stderr and "prefill-like [" in result.stderr  # progress bars
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"placement.json", "simulation.json", "simulation_prefill.json"} <= files
    # The modelled time of both regimes.
    assert "32 tokens/GPU, decode-like (DeepEP low_latency)" in out  # quick: 1,024 on 32 GPUs
    assert "prefill-like: moelb" in out and "131,072 tokens/step" in out
    assert "4,096 tokens/GPU, prefill-like (DeepEP normal)" in out
    assert out.count("ms per step") == 2
    prefill = json.loads((tmp_path / "out" / "simulation_prefill.json").read_text())
    decode = json.loads((tmp_path / "out" / "simulation.json").read_text())
    assert prefill["time_model"]["tokens_per_gpu"] == 4096
    assert decode["time_model"]["tokens_per_gpu"] == 32
    assert prefill["layer_ids"] == [3, 4] and len(decode["layer_ids"]) == 6
    for data in (prefill, decode):
        for name, a in data["algorithms"].items():
            for d in data["config"]["dispatch"]:
                t = a["realised"][d]["time"]
                assert t["seconds"] > 0 and (name != "trivial" or t["speedup"] == 1.0)
    # make test installs matplotlib (MOELB_REQUIRE_OPTIONAL=1): the plots must be there; elsewhere
    # the command must say it skipped them.
    if os.environ.get("MOELB_REQUIRE_OPTIONAL") == "1" or "plots skipped" not in out:
        assert {"balancedness_per_layer.png", "rank_load_heatmap.png"} <= files
    placement = json.loads((tmp_path / "out" / "placement.json").read_text())
    assert np.array(placement["physical_to_logical_map"]).shape == (61, 288)
    summary = json.loads((tmp_path / "out" / "simulation.json").read_text())
    a = summary["algorithms"]
    assert a["moelb"]["predictive"] > a["trivial"]["predictive"] + 0.1


def test_simulate_json_is_consistent(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, *SIMULATE_SMALL, "--algorithms", "deepseek", "moelb", "--json")
    assert code == 0, err
    data = json.loads(out)
    a = data["algorithms"]
    assert list(a) == ["trivial", "deepseek", "moelb"]
    assert data["files"] == [] and data["layer_ids"] == [3, 4, 5]
    # moelb >= deepseek >= trivial on skewed traffic, on the windows the plans were made from.
    assert a["moelb"]["in_window"] >= a["deepseek"]["in_window"] - 1e-3
    assert a["deepseek"]["in_window"] > a["trivial"]["in_window"] + 0.1
    for r in a.values():
        assert r["min_gap"] >= -1e-9  # the lower bound holds on every step and layer
        assert r["predictive"] <= data["bound_predictive"] + 1e-12
    assert len(a["moelb"]["moved_experts"]) == 2 and min(a["moelb"]["moved_experts"]) > 0


def test_simulate_bursts_and_step_peak_policy(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(
        capsys, *SIMULATE_SMALL, "--bursts", "1.5", "--waterfill", "off",
        "--algorithms", "moelb:none", "moelb:none:step_peak",
    )  # fmt: skip
    assert code == 0, err
    assert "bursts 1.5" in out and "moelb(locality=none)+step_peak" in out
    code, _, err = cli(capsys, *SIMULATE_SMALL, "--bursts", "-1")
    assert code == 2 and "Traceback" not in err


def test_simulate_table_per_layer_and_waterfill_off(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, err = cli(
        capsys, *SIMULATE_SMALL, "--per-layer", "--waterfill", "off", "--output-dir",
        str(tmp_path), "--no-plots",
    )  # fmt: skip
    assert code == 0, err
    assert "Waterfill off" in out and "predictive balancedness per layer" in out
    assert "plots skipped: --no-plots" in out
    assert "realised at token level" in out and "Under sglang_static, " in out
    moelb_row = next(line for line in out.splitlines() if line.startswith("moelb ") and
                     len(line.split()) == 4)  # fmt: skip
    assert moelb_row.split()[3] == "-"  # Waterfill off: no +WF figure
    assert sorted(p.name for p in tmp_path.iterdir()) == ["placement.json", "simulation.json"]


def test_simulate_replays_a_trace(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    counts = np.random.default_rng(0).poisson(30, (8, 4, 256)).astype(np.int32)
    path = tmp_path / "trace.json"
    moelb.save_expert_distribution(
        {"rank": 0, "logical_count": counts, "average_utilization_rate_over_window": None}, path
    )
    code, out, err = cli(
        capsys, "simulate", "--trace", str(path), "--ep-size", "8", "--num-nodes", "2",
        "--rebalance-period", "4",
    )  # fmt: skip
    assert code == 0, err
    assert f"replayed counts from {path}" in out and "8 steps" in out
    # Counts, not tokens: no Waterfill or dispatch claimed in the header, a note says why.
    assert "no token-level figures" in out and "Waterfill dynamic" not in out
    assert "the config's dispatch, waterfill and seed do not apply" in out


def test_a_renamed_flag_names_its_new_spelling(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """--ep-size became --ep-size (one vocabulary, issue 18): the old flag is a one-line error
    that says so, and nothing is written."""
    counts = np.random.default_rng(0).poisson(30, (4, 2, 16)).astype(np.int32)
    dump = tmp_path / "dump.json"
    moelb.save_expert_distribution(
        {"rank": 0, "logical_count": counts, "average_utilization_rate_over_window": None}, dump
    )
    out_file = tmp_path / "placement.json"
    code, _, err = cli(
        capsys, "rebalance", str(dump), "--num-physical-experts", "24", "--num-gpus", "8",
        "--num-groups", "4", "-o", str(out_file),
    )  # fmt: skip
    assert code == 2
    assert_one_line_error(code, err, "--num-gpus is now --ep-size")
    assert not out_file.exists()
    code, _, err = cli(
        capsys, "rebalance", str(dump), "--num-physical-experts", "24", "--ep-size", "8",
        "--num-groups", "4", "-o", str(out_file),
    )  # fmt: skip
    assert code == 0, err
    assert out_file.exists()


# ------------------------------------------------------------------------------------------------
# The SGLang round trip.


def sglang_stat_dump(path: Path, num_passes: int = 6, seed: int = 0) -> np.ndarray:
    """SGLang's stat-mode dump: torch.save of {"rank", "logical_count" int32 [T, 61, 256],
    "average_utilization_rate_over_window"}; the 3 dense layers of DeepSeek-V3 are zero rows."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(seed)
    popularity = rng.permutation(1.0 / np.arange(1, 257) ** 0.8)
    counts = rng.poisson(400 * popularity, (num_passes, 61, 256)).astype(np.int32)
    counts[:, :3] = 0
    torch.save(
        {
            "rank": 0,
            "logical_count": torch.from_numpy(counts),
            "average_utilization_rate_over_window": 0.61,
        },
        path,
    )
    return counts


def check_sglang_placement(path: Path, num_layers: int, slots: int, experts: int) -> np.ndarray:
    """What SGLang's --init-expert-location does with a .json path: json.load, then
    init_by_mapping(physical_to_logical_map) as an int tensor [L, P]; every expert needs a
    replica."""
    torch = pytest.importorskip("torch")
    obj = json.loads(path.read_text())
    assert list(obj) == ["physical_to_logical_map"]
    mapping = torch.tensor(obj["physical_to_logical_map"])
    assert mapping.dtype == torch.int64 and tuple(mapping.shape) == (num_layers, slots)
    assert int(mapping.min()) >= 0 and int(mapping.max()) < experts
    for row in mapping.numpy():
        assert set(row.tolist()) == set(range(experts))
    return mapping.numpy()


def test_rebalance_round_trip_from_a_pt_dump(capsys: pytest.CaptureFixture[str], tmp_path: Path):
    dump = tmp_path / "expert_distribution_recorder_1700000000.pt"
    counts = sglang_stat_dump(dump)
    out_file = tmp_path / "placement.json"
    code, out, err = cli(
        capsys, "rebalance", str(dump), "-o", str(out_file), "--num-physical-experts", "288",
        "--ep-size", "32", "--num-nodes", "4", "--num-groups", "8",
    )  # fmt: skip
    assert code == 0, err
    assert "6 passes x 61 layers (58 with counts) x 256 experts" in out
    assert "moelb(locality=node)" in out and "--init-expert-location" in out
    mapping = check_sglang_placement(out_file, 61, 288, 256)
    # The file is what moelb.rebalance plans for the summed counts.
    plan = moelb.rebalance(counts, 288, 8, 4, 32)
    np.testing.assert_array_equal(mapping, plan.location.physical_to_logical)

    # Re-plan against the placement in service, as JSON for machines.
    code, out, err = cli(
        capsys, "rebalance", str(dump), "-o", str(tmp_path / "next.json"),
        "--num-physical-experts", "288", "--ep-size", "32", "--num-nodes", "4",
        "--num-groups", "8", "--algorithm", "deepseek", "--previous", str(out_file),
        "--expert-bytes", "1000", "--json",
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads(out)
    assert summary["algorithm"] == "deepseek_hierarchical" and summary["baseline"] == "previous"
    assert summary["moved_bytes"] == 1000 * summary["moved_experts"]
    assert summary["num_layers_with_counts"] == 58
    assert 0 < summary["balancedness_after"] <= summary["lower_bound_balancedness"] + 1e-12
    check_sglang_placement(tmp_path / "next.json", 61, 288, 256)


def test_rebalance_reads_per_pass_dumps(capsys: pytest.CaptureFixture[str], tmp_path: Path):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    trivial = np.arange(288) % 256
    records = [
        {
            "forward_pass_id": i,
            "rank": 0,
            "gatherer_key": "primary",
            "global_physical_count": torch.from_numpy(rng.poisson(20, (4, 288)).astype(np.int32)),
        }
        for i in range(3)
    ]
    dump = tmp_path / "per_pass.pt"
    torch.save(
        {
            "records": records,
            "last_physical_to_logical_map": torch.tensor(np.tile(trivial, (4, 1))),
        },
        dump,
    )
    out_file = tmp_path / "p.json"
    code, _, err = cli(
        capsys, "rebalance", str(dump), "-o", str(out_file), "--num-physical-experts", "288",
        "--ep-size", "8", "--num-groups", "8",
    )  # fmt: skip
    assert code == 0, err
    check_sglang_placement(out_file, 4, 288, 256)


def test_rebalance_step_peak_objective(capsys: pytest.CaptureFixture[str], tmp_path: Path):
    dump = tmp_path / "dump.npz"
    counts = np.random.default_rng(4).poisson(30, (5, 3, 64)).astype(np.int32)
    counts[0, :, :8] *= 20  # experts 0-7 flare up together in pass 0, 8-15 in pass 1
    counts[1, :, 8:16] *= 20
    counts[:, 0] = 0  # a dense layer
    moelb.save_expert_distribution(
        {"rank": 0, "logical_count": counts, "average_utilization_rate_over_window": None}, dump
    )
    out_file = tmp_path / "p.json"
    args = ["rebalance", str(dump), "-o", str(out_file), "--num-physical-experts", "80",
            "--ep-size", "8", "--num-groups", "8", "--num-nodes", "2"]  # fmt: skip
    code, out, err = cli(capsys, *args, "--objective", "step_peak")
    assert code == 0, err
    assert "per-pass balancedness" in out and "+step_peak" in out
    mapping = check_sglang_placement(out_file, 3, 80, 64)
    plan = moelb.rebalance(counts, 80, 8, 2, 8, objective="step_peak")
    np.testing.assert_array_equal(mapping, plan.location.physical_to_logical)

    code, out, err = cli(capsys, *args, "--objective", "step_peak", "--json")
    summary = json.loads(out)
    assert summary["objective"] == "step_peak"
    assert summary["step_balancedness_before"] < summary["step_balancedness_after"] <= 1
    code, out, err = cli(capsys, *args, "--json")
    summary = json.loads(out)
    assert summary["objective"] == "total" and summary["step_balancedness_after"] is None
    code, out, err = cli(capsys, *args, "--objective", "step_peak", "--algorithm", "deepseek")
    assert code == 2 and "objective='step_peak' is moelb's" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------
# inspect.


def test_inspect_placement_and_dump(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    dump = tmp_path / "dump.npz"
    counts = np.random.default_rng(2).poisson(50, (3, 4, 256)).astype(np.int32)
    counts[:, 1, 7] = 10_000
    moelb.save_expert_distribution(
        {"rank": 0, "logical_count": counts, "average_utilization_rate_over_window": None}, dump
    )
    code, out, err = cli(capsys, "inspect", str(dump), "--ep-size", "8", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["kind"] == "dump" and data["num_passes"] == 3 and len(data["layers"]) == 4
    layer1 = data["layers"][1]
    assert layer1["hottest_expert"] == 7 and layer1["routed_picks"] == int(counts[:, 1].sum())
    assert layer1["trivial_balancedness"] < data["layers"][0]["trivial_balancedness"]

    placement = tmp_path / "placement.json"
    plan = moelb.rebalance(counts, 288, 8, 1, 8)
    moelb.save_placement(plan.location, placement)
    code, out, err = cli(capsys, "inspect", str(placement), "--ep-size", "8")
    assert code == 0, err
    assert "placement [4 layers, 288 slots] of 256 experts" in out
    assert "same-rank duplicates (W=8)" in out
    code, out, err = cli(capsys, "inspect", str(placement), "--json")
    layers = json.loads(out)["layers"]
    assert layers[1]["max_replicas"] > 1 and layers[1]["replicated_experts"] >= 1


# ------------------------------------------------------------------------------------------------
# Errors: one line, non-zero exit, no traceback.


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["no-such-command"], "invalid choice: 'no-such-command'"),
        (["simulate", "--ep-size", "-5"], "argument --ep-size: must be a positive integer"),
        (["simulate", "--skew", "abc"], "argument --skew: must be a number >= 0"),
        (["simulate", "--model", "gpt"], "argument --model: invalid choice"),
        (["simulate", "--algorithms", "magic"], "'magic' is not an EPLB algorithm"),
        (["simulate", "--ep-size", "7", "--num-nodes", "1"], "not divisible by ep_size=7"),
        (["simulate", "--num-steps", "3"], "fewer than two windows"),
        (["simulate", "--trace", "missing.pt"], "trace file 'missing.pt' does not exist"),
        (["rebalance", "x.pt", "--ep-size", "8"], "the following arguments are required"),
        (["inspect", "missing.json"], "file 'missing.json' does not exist"),
        (["demo", "--threads", "0"], "argument --threads: must be a positive integer"),
    ],
)
def test_bad_flags(capsys: pytest.CaptureFixture[str], args: list[str], needle: str) -> None:
    code, _, err = cli(capsys, *args)
    assert_one_line_error(code, err, needle)
    assert code == 2


def rebalance_args(dump: Path, out: Path, *extra: str) -> list[str]:
    return [
        "rebalance", str(dump), "-o", str(out), "--num-physical-experts", "288",
        "--ep-size", "8", "--num-groups", "8", *extra,
    ]  # fmt: skip


def test_bad_files(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "placement.json"
    missing = tmp_path / "missing.pt"
    assert_one_line_error(*cli(capsys, *rebalance_args(missing, out))[::2], "does not exist")
    for name, content in [
        ("corrupt.pt", b"not a torch file"),
        ("corrupt.npz", b"PK\x03\x04 truncated"),
        ("corrupt.json", b"{not json"),
        ("wrong.json", b'{"hello": 1}'),
        ("dump.txt", b"1 2 3"),
    ]:
        path = tmp_path / name
        path.write_bytes(content)
        code, _, err = cli(capsys, *rebalance_args(path, out))
        assert_one_line_error(code, err, name)
        assert code == 2
        code, _, err = cli(capsys, "inspect", str(path))
        assert_one_line_error(code, err, name)
    assert not out.exists()  # nothing written on failure

    good = tmp_path / "good.npz"
    counts = np.ones((2, 3, 256), np.int32)
    moelb.save_expert_distribution(
        {"rank": 0, "logical_count": counts, "average_utilization_rate_over_window": None}, good
    )
    # Inconsistent topology: 288 slots on 7 GPUs.
    code, _, err = cli(
        capsys, "rebalance", str(good), "-o", str(out), "--num-physical-experts", "288",
        "--ep-size", "7", "--num-groups", "8",
    )  # fmt: skip
    assert_one_line_error(code, err, "288")
    # An output folder that does not exist.
    code, _, err = cli(capsys, *rebalance_args(good, tmp_path / "nowhere" / "p.json"))
    assert_one_line_error(code, err, "does not exist")
    # A placement that is not one: bad ids.
    bad_placement = tmp_path / "bad_placement.json"
    bad_placement.write_text('{"physical_to_logical_map": [[0, 1, -3]]}')
    code, _, err = cli(capsys, "inspect", str(bad_placement))
    assert_one_line_error(code, err, "is not an expert id")
    code, _, err = cli(capsys, *rebalance_args(good, out, "--previous", str(bad_placement)))
    assert_one_line_error(code, err, "bad_placement.json")


def test_entry_point_errors_and_version() -> None:
    result = run("simulate", "--num-tokens", "-5")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = run("--version")
    assert result.returncode == 0 and result.stdout.startswith("moelb ")


def test_closed_pipe_is_not_an_error(tmp_path: Path) -> None:
    demo = subprocess.Popen(
        [sys.executable, "-m", "moelb", *SIMULATE_SMALL, "--per-layer"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ),
    )
    assert demo.stdout is not None
    demo.stdout.readline()
    demo.stdout.close()  # like `moelb simulate ... | head -1`
    _, err = demo.communicate(timeout=300)
    assert demo.returncode == 0, err.decode()
    assert b"Traceback" not in err


# ------------------------------------------------------------------------------------------------
# No silent wrong answer (issue 16).


def small_dump(path: Path, seed: int = 3) -> np.ndarray:
    """[5 passes, 3 layers, 64 experts] with a dense layer 0 (zero rows), as an .npz dump."""
    counts = np.random.default_rng(seed).poisson(3, (5, 3, 64)).astype(np.int32)
    counts[:, 1, :4] *= 10
    counts[:, 0] = 0
    moelb.save_expert_distribution(
        {"rank": 0, "logical_count": counts, "average_utilization_rate_over_window": None}, path
    )
    return counts


SMALL_TOPOLOGY = ["--num-physical-experts", "80", "--ep-size", "8", "--num-nodes", "2"]


def test_rebalance_reports_sglangs_balancedness(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """SGLang's balancedness (all layers, the dense one counting 1.0), and the variant over the
    layers with counts under its own name; the same values as the library's."""
    dump = tmp_path / "dump.npz"
    counts = small_dump(dump)
    args = ["rebalance", str(dump), "-o", str(tmp_path / "p.json"), *SMALL_TOPOLOGY]
    code, out, err = cli(capsys, *args, "--num-groups", "8", "--json")
    assert code == 0, err
    summary = json.loads(out)
    plan = moelb.rebalance(counts, 80, 8, 2, 8, move_cost=summary["move_cost"])
    trivial = moelb.evaluate_placement(counts, moelb.ExpertLocation.trivial(3, 64, 80, 8, 2))
    assert summary["balancedness_after"] == pytest.approx(plan.stats.balancedness, rel=1e-12)
    assert summary["active_balancedness_after"] == pytest.approx(
        plan.stats.active_balancedness, rel=1e-12
    )
    assert summary["balancedness_before"] == pytest.approx(trivial.balancedness, rel=1e-12)
    assert summary["active_balancedness_before"] == pytest.approx(
        trivial.active_balancedness, rel=1e-12
    )
    bound = moelb.balancedness(plan.stats.mean_rank_load, plan.stats.lower_bound)
    assert summary["lower_bound_balancedness"] == pytest.approx(bound, rel=1e-12)
    # The dense layer pulls SGLang's value towards 1.
    assert summary["balancedness_after"] > summary["active_balancedness_after"]
    code, out, err = cli(capsys, *args, "--num-groups", "8")
    assert code == 0, err
    assert "SGLang" in out and "2 layers with counts" in out


def test_rebalance_reports_what_sglangs_static_table_realises(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Beside the planned (equal split) figure, the expected balancedness under SGLang's static
    table: recomputed here from the tables, each rank sending 1/W of every expert's load."""
    dump = tmp_path / "dump.npz"
    counts = small_dump(dump)
    out_path = tmp_path / "p.json"
    args = ["rebalance", str(dump), "-o", str(out_path), *SMALL_TOPOLOGY, "--num-groups", "8"]
    code, out, err = cli(capsys, *args, "--json")
    assert code == 0, err
    summary = json.loads(out)
    location = moelb.load_placement(out_path, ep_size=8, num_nodes=2)
    load = counts.sum(axis=0).astype(np.float64)
    tables = moelb.dispatch_tables(location, "sglang_static")  # [W, L, E]
    S = location.num_local_physical_experts
    rates = []
    for layer in range(load.shape[0]):
        gpu = np.zeros(8)
        for rank in range(8):
            for e in range(load.shape[1]):
                gpu[tables[rank, layer, e] // S] += load[layer, e] / 8
        rates.append((gpu.mean() + 1e-5) / (gpu.max() + 1e-5))
    assert summary["sglang_static_balancedness_after"] == pytest.approx(np.mean(rates), rel=1e-9)
    assert summary["sglang_static_balancedness_after"] < summary["balancedness_after"]
    code, out, err = cli(capsys, *args)
    assert code == 0, err
    assert "under sglang_static" in out and "planned" in out


def test_rebalance_plans_for_sglangs_static_table(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """--dispatch sglang_static: the plan the library makes, its realised figures in the summary
    (the same model as the expected balancedness under sglang_static), above the equal-split
    plan's under SGLang's table; a target moelb does not plan for DeepSeek's algorithm is a
    one-line error naming the flag's value."""
    dump = tmp_path / "dump.npz"
    counts = small_dump(dump)
    out_path = tmp_path / "p.json"
    args = ["rebalance", str(dump), "-o", str(out_path), *SMALL_TOPOLOGY, "--num-groups", "8"]
    target = ["--locality", "none", "--dispatch", "sglang_static"]
    code, out, err = cli(capsys, *args, *target, "--json")
    assert code == 0, err
    summary = json.loads(out)
    load = counts.sum(axis=0).astype(np.float64)
    plan = moelb.rebalance(load, 80, 8, 2, 8, locality="none", dispatch="sglang_static")
    saved = moelb.load_placement(out_path, ep_size=8, num_nodes=2)
    np.testing.assert_array_equal(saved.physical_to_logical, plan.location.physical_to_logical)
    assert summary["dispatch"] == "sglang_static"
    assert summary["algorithm"] == "moelb(locality=none)+sglang_static"
    active = load.sum(axis=1) > 0
    ratio = plan.stats.realised_max_rank_load[active] / plan.stats.mean_rank_load[active]
    assert summary["realised_max_over_mean_after"] == pytest.approx(ratio.mean(), rel=1e-12)
    assert summary["sglang_static_balancedness_after"] == pytest.approx(
        plan.stats.realised_balancedness, rel=1e-9
    )
    code, out, err = cli(capsys, *args, "--locality", "none", "--json")
    assert code == 0, err
    equal = json.loads(out)
    assert equal["dispatch"] == "equal_split" and equal["realised_max_over_mean_after"] is None
    assert summary["sglang_static_balancedness_after"] > equal["sglang_static_balancedness_after"]
    code, out, err = cli(capsys, *args, *target)
    assert code == 0, err
    assert "planned for dispatch sglang_static" in out
    code, _, err = cli(capsys, *args, *target, "--algorithm", "deepseek")
    assert_one_line_error(code, err, "dispatch='sglang_static'")


def test_inspect_reports_sglangs_layer_balancedness(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    dump = tmp_path / "dump.npz"
    counts = small_dump(dump)
    code, out, err = cli(capsys, "inspect", str(dump), "--ep-size", "8", "--json")
    assert code == 0, err
    data = json.loads(out)
    load = counts.sum(axis=0).astype(np.float64)
    gpu = load.reshape(3, 8, 8).sum(axis=2)  # trivial placement, P = E = 64 on 8 GPUs
    rates = (gpu.mean(axis=1) + 1e-5) / (gpu.max(axis=1) + 1e-5)
    got = [x["trivial_balancedness"] for x in data["layers"]]
    np.testing.assert_allclose(got, rates, rtol=1e-12)
    assert data["num_physical_experts"] == 64  # said, not silently assumed
    code, out, err = cli(capsys, "inspect", str(dump), "--ep-size", "8")
    assert "P=64" in out


def test_rebalance_needs_num_groups_or_a_model(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Without expert groups the planner switches to the global policy: never silently."""
    dump = tmp_path / "dump.npz"
    small_dump(dump)
    out_file = tmp_path / "p.json"
    args = ["rebalance", str(dump), "-o", str(out_file), *SMALL_TOPOLOGY]
    code, _, err = cli(capsys, *args)
    assert_one_line_error(code, err, "--num-groups")
    assert "--model" in err and code == 2 and not out_file.exists()
    # --num-groups 0 says "no expert groups" explicitly.
    code, out, err = cli(capsys, *args, "--num-groups", "0", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["num_groups"] is None and summary["algorithm"] == "moelb(locality=none)"


def test_rebalance_model_presets_supply_num_groups(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from moelb.simulate import MODEL_PRESETS

    v3 = MODEL_PRESETS["deepseek-v3"]
    dump = tmp_path / "v3.npz"
    rng = np.random.default_rng(6)
    counts = rng.poisson(5, (2, v3.num_hidden_layers, v3.num_experts)).astype(np.int32)
    counts[:, : v3.first_moe_layer] = 0
    moelb.save_expert_distribution(
        {"rank": 0, "logical_count": counts, "average_utilization_rate_over_window": None}, dump
    )
    out_file = tmp_path / "p.json"
    args = ["rebalance", str(dump), "-o", str(out_file), "--num-physical-experts", "288",
            "--ep-size", "32", "--num-nodes", "4"]  # fmt: skip
    code, out, err = cli(capsys, *args, "--model", "deepseek-v3", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["num_groups"] == v3.num_groups == 8 and summary["model"] == "deepseek-v3"
    assert summary["algorithm"] == "moelb(locality=node)"
    plan = moelb.rebalance(counts, 288, 8, 4, 32, move_cost=summary["move_cost"])
    np.testing.assert_array_equal(
        moelb.load_placement(out_file, 32, 4).physical_to_logical,
        plan.location.physical_to_logical,
    )
    # A preset that contradicts the dump or the flags is an error, not a guess.
    code, _, err = cli(capsys, *args, "--model", "deepseek-v4-pro")
    assert_one_line_error(code, err, "--model deepseek-v4-pro")
    assert "384" in err
    code, _, err = cli(capsys, *args, "--model", "deepseek-v3", "--num-groups", "4")
    assert_one_line_error(code, err, "--num-groups 4")
    small = tmp_path / "small.npz"
    small_dump(small)
    code, _, err = cli(capsys, "rebalance", str(small), "-o", str(out_file), *SMALL_TOPOLOGY,
                       "--model", "deepseek-v3")  # fmt: skip
    assert_one_line_error(code, err, "--model deepseek-v3")


def test_cli_says_what_routed_counts_count(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    dump = tmp_path / "dump.npz"
    counts = small_dump(dump)
    total = f"{int(counts.sum()):,}"
    code, out, err = cli(capsys, "rebalance", str(dump), "-o", str(tmp_path / "p.json"),
                         *SMALL_TOPOLOGY, "--num-groups", "8")  # fmt: skip
    assert code == 0, err
    assert "routed tokens" not in out
    assert f"{total} routed (token, expert) picks (tokens x top-k, summed over layers)" in out
    code, out, err = cli(capsys, "inspect", str(dump))
    assert code == 0, err
    assert "routed tokens" not in out
    assert f"{total} routed (token, expert) picks" in out
    data = json.loads(cli(capsys, "inspect", str(dump), "--json")[1])
    assert data["routed_picks"] == int(counts.sum()) and "tokens" not in data


def test_inspect_num_nodes_without_num_gpus(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    placement = tmp_path / "placement.json"
    moelb.save_placement(moelb.ExpertLocation.trivial(2, 64, 80, 8, 4), placement)
    for path in (placement, tmp_path / "dump.npz"):
        if path.suffix == ".npz":
            small_dump(path)
        code, _, err = cli(capsys, "inspect", str(path), "--num-nodes", "4")
        assert_one_line_error(code, err, "--num-nodes 4 needs --ep-size")
        assert "ep_size" not in err and code == 2
    code, _, err = cli(capsys, "inspect", str(placement), "--num-nodes", "4", "--ep-size", "8")
    assert code == 0, err


@pytest.mark.parametrize(
    ("error", "needle", "status"),
    [
        (MemoryError(), "out of memory", 1),
        (RuntimeError("boom\nsecond line"), "internal error: RuntimeError: boom second line", 1),
        (ZeroDivisionError("division by zero"), "ZeroDivisionError: division by zero", 1),
    ],
)
def test_any_exception_is_a_one_line_error(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    error: BaseException,
    needle: str,
    status: int,
) -> None:
    """An out-of-memory simulate (or any bug) ends in one line on stderr, never a traceback."""
    import moelb.cli.simulate_cmd

    def failing(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(moelb.cli.simulate_cmd, "simulate", failing)
    code, _, err = cli(capsys, *SIMULATE_SMALL)
    assert_one_line_error(code, err, needle)
    assert code == status and err.startswith("moelb simulate: ")


def test_rebalance_default_move_cost_and_the_trade(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Re-planning a resampled window of the same traffic rewrites (almost) nothing by default,
    and the summary says what was traded: slots and bytes moved against balancedness gained."""
    from moelb.simulate import MODEL_PRESETS

    v3 = MODEL_PRESETS["deepseek-v3"]
    rng = np.random.default_rng(21)
    popularity = np.empty((v3.num_moe_layers, 256))
    for layer in range(v3.num_moe_layers):
        popularity[layer, rng.permutation(256)] = np.arange(1, 257) ** -0.6
    popularity /= popularity.sum(axis=1, keepdims=True)
    dumps = []
    for i in range(2):  # two windows of 100 passes x 4,096 tokens x top-8, summed per pass
        counts = np.zeros((1, v3.num_hidden_layers, 256), np.int32)
        counts[0, v3.first_moe_layer :] = rng.multinomial(100 * 4096 * 8, popularity)
        dumps.append(tmp_path / f"window{i}.npz")
        moelb.save_expert_distribution(
            {"rank": 0, "logical_count": counts, "average_utilization_rate_over_window": None},
            dumps[-1],
        )
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    topology = ["--num-physical-experts", "288", "--ep-size", "32", "--num-nodes", "4",
                "--model", "deepseek-v3", "--expert-bytes", str(v3.expert_bytes)]  # fmt: skip
    code, _, err = cli(capsys, "rebalance", str(dumps[0]), "-o", str(first), *topology)
    assert code == 0, err
    args = ["rebalance", str(dumps[1]), "-o", str(second), *topology, "--previous", str(first)]
    code, out, err = cli(capsys, *args, "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["move_cost"] == moelb.eplb.DEFAULT_MOVE_COST
    slots = 61 * 288
    assert summary["moved_experts"] <= 0.02 * slots
    assert summary["balancedness_gained"] == pytest.approx(
        summary["balancedness_after"] - summary["balancedness_before"], abs=1e-12
    )
    assert summary["layers_kept_previous"] >= 50
    # With move_cost 0 the same re-plan rewrites a large share of the slots, and says so.
    code, out, err = cli(capsys, *args, "--move-cost", "0")
    assert code == 0, err
    line = next(x for x in out.splitlines() if x.startswith("traded:"))
    moved = int(line.split()[1].replace(",", ""))
    assert moved > 0.3 * slots
    assert f"of {slots:,} expert slots rewritten" in line and "GB) for balancedness +" in line
    code, out, err = cli(capsys, *args)
    assert "traded:" in out and "kept their placement (gain below --move-cost 0.0001" in out


def test_rebalance_writes_what_sglang_reads(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """SGLang reads --init-expert-location as a file only for .json/.pt names, and needs a row
    per decoder layer: a dump of the 58 MoE layers of deepseek-v3 gets its 3 dense rows."""
    dump = tmp_path / "dump.npz"
    small_dump(dump)
    topology = ["--num-physical-experts", "80", "--ep-size", "8", "--num-groups", "8"]
    code, _, err = cli(capsys, "rebalance", str(dump), "-o", str(tmp_path / "p.txt"), *topology)
    assert code == 2 and "ends in .json or .pt" in err
    assert not (tmp_path / "p.txt").exists()
    counts = np.random.default_rng(0).poisson(3, (4, 58, 256)).astype(np.int32)
    moe_dump = tmp_path / "moe.npz"
    moelb.save_expert_distribution(
        {"rank": 0, "logical_count": counts, "average_utilization_rate_over_window": None},
        moe_dump,
    )
    out_path = tmp_path / "p.json"
    code, _, err = cli(
        capsys, "rebalance", str(moe_dump), "-o", str(out_path), "--model", "deepseek-v3",
        "--num-physical-experts", "288", "--ep-size", "32", "--num-nodes", "4",
    )  # fmt: skip
    assert code == 0, err
    assert "3 leading dense layers" in err
    placement = json.loads(out_path.read_text())["physical_to_logical_map"]
    assert np.array(placement).shape == (61, 288)


def test_simulate_trace_refuses_synthetic_only_flags(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    dump = tmp_path / "dump.npz"
    small_dump(dump)
    code, _, err = cli(capsys, "simulate", "--trace", str(dump), "--num-layers", "4")
    assert code == 2 and "--num-layers shapes synthetic traffic" in err
    # A replay has counts, not tokens: the token-level flags would do nothing either.
    for extra in (
        ["--dispatch", "vllm_hash"], ["--waterfill", "off"], ["--seed", "3"], ["--gpu", "h100"],
        ["--gpu-dtype", "bf16"], ["--deepep-mode", "normal"], ["--network-bytes-per-s", "1e11"],
    ):  # fmt: skip
        code, _, err = cli(capsys, "simulate", "--trace", str(dump), *extra)
        assert code == 2, extra
        assert_one_line_error(code, err, f"{extra[0]} shapes the token-level figures")


# ------------------------------------------------------------------------------------------------
# The modelled step time (issue 22): the shipped default calibration when the package has one,
# else the hand-written fixture of gpu_fixtures.py.

TIME_COLUMNS = ["placement", "dispatch", "realised", "+WF", "ms/step", "x trivial", "weights",
                "GEMM", "comm", "fixed", "mean GPU"]  # fmt: skip


def time_rows(out: str) -> dict[tuple[str, str], list[str]]:
    """The modelled-time table's rows by (placement, dispatch)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split() == [
        c for column in TIME_COLUMNS for c in column.split()])  # fmt: skip
    rows = {}
    for line in lines[start + 2 :]:
        if not line.strip():
            break
        cells = line.split()
        rows[(cells[0], cells[1])] = cells[2:]
    return rows


def test_simulate_prints_the_modelled_time(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    gpu = shipped_or_fixture(tmp_path)
    dispatch = ["--dispatch", "sglang_static", "balanced"]
    code, out, err = cli(capsys, *SIMULATE_SMALL, "--gpu", gpu, *dispatch)
    assert code == 0, err
    assert "modelled routed-MoE time per step (3 MoE layers)" in out
    assert "64 tokens/GPU, decode-like (DeepEP low_latency)" in out  # 512 tokens on 8 GPUs
    rows = time_rows(out)
    assert set(rows) == {(p, d) for p in ("trivial", "deepseek", "moelb")
                         for d in ("sglang_static", "balanced")}  # fmt: skip
    code, js, err = cli(capsys, *SIMULATE_SMALL, "--gpu", gpu, *dispatch, "--json")
    data = json.loads(js)
    for (placement, d), cells in rows.items():
        realised = data["algorithms"][placement]["realised"][d]
        t = realised["time"]
        assert cells[0] == f"{realised['routed']:.3f}"  # the balancedness beside the time
        assert cells[2] == f"{t['seconds'] * 1e3:.2f}" and cells[3] == f"{t['speedup']:.3f}"
        parts = [t[k] for k in ("slowest_weights_s", "slowest_gemm_s", "slowest_comm_s",
                                "fixed_s", "mean_gpu_s")]  # fmt: skip
        assert cells[4:] == [f"{v * 1e3:.2f}" for v in parts]
        if placement == "trivial":
            assert cells[3] == "1.000"
    assert "Under sglang_static, " in out and "ms per step" in out and "slowest layer" in out
    assert data["time_model"]["deepep_mode"] == "low_latency"
    # The balancedness table is unchanged beside it.
    assert "realised at token level (next window), per dispatch" in out


def test_gpu_flags(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = cli(capsys, *SIMULATE_SMALL, "--gpu", "none")
    assert code == 0 and "modelled" not in out
    shipped = moelb.available_gpus()
    code, _, err = cli(capsys, *SIMULATE_SMALL, "--gpu", "h900")
    assert_one_line_error(code, err, "gpu='h900' is neither a shipped GPU calibration nor a file")
    assert ("ships none" in err) if not shipped else all(repr(k) in err for k in shipped)
    code, _, err = cli(capsys, *SIMULATE_SMALL, "--nvlink-bytes-per-s", "0")
    assert_one_line_error(code, err, "argument --nvlink-bytes-per-s: must be a finite number > 0")
    code, _, err = cli(capsys, *SIMULATE_SMALL, "--deepep-mode", "fast")
    assert_one_line_error(code, err, "argument --deepep-mode: invalid choice")
    gpu = shipped_or_fixture(tmp_path)
    code, out, err = cli(
        capsys, *SIMULATE_SMALL, "--gpu", gpu, "--deepep-mode", "normal", "--gpu-dtype", "bf16",
        "--network-bytes-per-s", "25e9", "--json",
    )  # fmt: skip
    assert code == 0, err
    m = json.loads(out)["time_model"]
    assert m["deepep_mode"] == "normal" and m["table"] == "deepseek-v3/bf16"
    assert m["network_bytes_per_s"] == 25e9 and m["nvlink_bytes_per_s"] == 450e9


def test_the_regime_follows_the_tokens_per_gpu_not_the_deepep_mode(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # 64 tokens per GPU timed with DeepEP's normal kernels is still decode-like traffic: the
    # header must not call it prefill-like because of the kernels the user picked.
    gpu = shipped_or_fixture(tmp_path)
    code, out, err = cli(
        capsys, *SIMULATE_SMALL, "--gpu", gpu, "--deepep-mode", "normal",
        "--dispatch", "sglang_static",
    )  # fmt: skip
    assert code == 0, err
    assert "64 tokens/GPU, decode-like (DeepEP normal)" in out
