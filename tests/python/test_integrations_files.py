"""``moelb rebalance --format``: each engine file, read back by a reader written here from
reference/integrations.md (what the engine does with the file), holds the plan (or the counts)
the command reports; files are written atomically.

- ``sglang``: ``{"physical_to_logical_map": [L][P]}``, the key SGLang's ``init_by_mapping`` takes;
- ``sglang-logical-count``: ``{"logical_count": [L][E] or [T][L][E]}``; through (fake) SGLang's
  ``init_by_eplb`` with ``--eplb-algorithm moelb`` installed, the same placement as ``sglang``;
- ``trtllm``: TensorRT-LLM's load balancer YAML: ``num_slots``, ``layer_updates_per_iter: 0``,
  ``initial_global_assignments`` keyed by decoder-layer index (the model's MoE layers with
  ``--model``), slots in rank order, every expert in every row;
- ``json``: moelb's own, read back by ``moelb.load_placement`` and ``--previous``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import fake_engines
import moelb
import moelb.io
import numpy as np
import pytest
from moelb.cli import main

TOPOLOGY = [
    "--num-physical-experts",
    "80",
    "--ep-size",
    "8",
    "--num-nodes",
    "2",
    "--num-groups",
    "8",
]


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        code = main(list(args))
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def small_dump(path: Path, num_passes: int = 5, num_layers: int = 4, seed: int = 0) -> np.ndarray:
    """A stat dump [T, L, 64] (.json, no PyTorch needed); layer 0 is dense (no counts)."""
    rng = np.random.default_rng(seed)
    popularity = rng.permutation(1.0 / np.arange(1, 65) ** 0.9)
    counts = rng.poisson(300 * popularity, (num_passes, num_layers, 64)).astype(np.int32)
    counts[:, 0] = 0
    moelb.save_expert_distribution(
        {"rank": 0, "logical_count": counts, "average_utilization_rate_over_window": None}, path
    )
    return counts


def read_trtllm_yaml(text: str) -> dict:
    """The load balancer file as TensorRT-LLM's YAML loader sees it, for the subset moelb
    writes: comments, ``key: int`` and ``initial_global_assignments:`` with ``  layer: [ids]``
    entries (flow sequences)."""
    config: dict = {}
    assignments = None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.startswith("  "):
            assert assignments is not None, line
            match = re.fullmatch(r"  (\d+): \[([0-9, ]*)\]", line)
            assert match, line
            layer = int(match.group(1))
            assert layer not in assignments
            assignments[layer] = [int(x) for x in match.group(2).split(",")]
            continue
        key, _, value = line.partition(":")
        if key == "initial_global_assignments":
            assert value.strip() == ""
            assignments = config[key] = {}
        else:
            config[key] = int(value)
    return config


def test_sglang_format_is_the_placement_map(capsys: pytest.CaptureFixture[str], tmp_path: Path):
    counts = small_dump(tmp_path / "dump.json")
    out_file = tmp_path / "placement.json"
    code, _, err = cli(capsys, "rebalance", str(tmp_path / "dump.json"), "-o", str(out_file),
                       *TOPOLOGY, "--format", "sglang")  # fmt: skip
    assert code == 0, err
    obj = json.loads(out_file.read_text())
    assert list(obj) == ["physical_to_logical_map"]  # init_by_mapping's one keyword
    plan = moelb.rebalance(counts, 80, 8, 2, 8)
    assert obj["physical_to_logical_map"] == plan.location.physical_to_logical.tolist()


@pytest.mark.parametrize("objective", ["total", "step_peak"])
def test_logical_count_format_holds_the_counts(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, objective: str
) -> None:
    counts = small_dump(tmp_path / "dump.json")
    out_file = tmp_path / "logical_count.json"
    code, out, err = cli(capsys, "rebalance", str(tmp_path / "dump.json"), "-o", str(out_file),
                         *TOPOLOGY, "--format", "sglang-logical-count",
                         "--objective", objective)  # fmt: skip
    assert code == 0, err
    obj = json.loads(out_file.read_text())
    # compute_initial_expert_location_metadata: the dict's keys become init_by_eplb's keywords.
    assert list(obj) == ["logical_count"]
    expected = counts.sum(axis=0) if objective == "total" else counts
    assert np.array(obj["logical_count"]).dtype.kind == "i"
    assert obj["logical_count"] == expected.tolist()
    assert "--eplb-algorithm" in out


def test_logical_count_file_through_sglang_with_moelb_installed(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SGLang's start-up path for the logical_count file, with --eplb-algorithm moelb installed,
    lands on the placement the sglang file holds."""
    pytest.importorskip("torch")
    from moelb.integrations import sglang as adapter

    small_dump(tmp_path / "dump.json")
    for file_format, name in [("sglang", "placement.json"), ("sglang-logical-count", "lc.json")]:
        code, _, err = cli(capsys, "rebalance", str(tmp_path / "dump.json"),
                           "-o", str(tmp_path / name), *TOPOLOGY,
                           "--format", file_format)  # fmt: skip
        assert code == 0, err
    modules = fake_engines.inject(monkeypatch, fake_engines.SGLANG)
    monkeypatch.setattr(adapter, "_installed_options", None)
    adapter.install()
    data = json.loads((tmp_path / "lc.json").read_text())
    modules["sglang.srt.runtime_context"].configure(
        eplb_algorithm="moelb", ep_num_redundant_experts=16, ep_size=8, nnodes=2
    )
    metadata = modules["sglang.srt.eplb.expert_location"].ExpertLocationMetadata
    result = metadata.init_by_eplb(SimpleNamespace(num_groups=8), **data)
    placement = json.loads((tmp_path / "placement.json").read_text())
    assert result[0].tolist() == placement["physical_to_logical_map"]


def test_logical_count_refuses_previous(capsys: pytest.CaptureFixture[str], tmp_path: Path):
    small_dump(tmp_path / "dump.json")
    cli(capsys, "rebalance", str(tmp_path / "dump.json"), "-o", str(tmp_path / "p.json"),
        *TOPOLOGY)  # fmt: skip
    code, _, err = cli(capsys, "rebalance", str(tmp_path / "dump.json"),
                       "-o", str(tmp_path / "lc.json"), *TOPOLOGY, "--format",
                       "sglang-logical-count", "--previous", str(tmp_path / "p.json"))  # fmt: skip
    assert code == 2 and "--previous does not apply" in err
    assert not (tmp_path / "lc.json").exists()


def test_trtllm_format(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    counts = small_dump(tmp_path / "dump.json")
    out_file = tmp_path / "moe_load_balancer.yaml"
    code, out, err = cli(capsys, "rebalance", str(tmp_path / "dump.json"), "-o", str(out_file),
                         *TOPOLOGY, "--format", "trtllm")  # fmt: skip
    assert code == 0, err
    assert f"load_balancer: {out_file}" in out
    config = read_trtllm_yaml(out_file.read_text())
    assert set(config) == {"num_slots", "layer_updates_per_iter", "initial_global_assignments"}
    assert config["num_slots"] == 80 and config["layer_updates_per_iter"] == 0
    plan = moelb.rebalance(counts, 80, 8, 2, 8)
    assignments = config["initial_global_assignments"]
    assert sorted(assignments) == [0, 1, 2, 3]  # every row without --model
    for layer, row in assignments.items():
        assert len(row) == config["num_slots"] and set(row) == set(range(64))
        # Slots in rank order, num_slots / ep_size per rank: moelb's layout, slot for slot.
        assert row == plan.location.physical_to_logical[layer].tolist()
    try:
        import yaml
    except ImportError:
        return
    assert yaml.safe_load(out_file.read_text()) == config  # a YAML parser agrees


def test_trtllm_format_with_a_model_lists_its_moe_layers(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """--model deepseek-v3: keys 3..60, TensorRT-LLM's MoE layer indices (generate_eplb_config's
    layout), from a dump of the 58 MoE layers."""
    rng = np.random.default_rng(1)
    counts = rng.poisson(50, (2, 58, 256)).astype(np.int32)
    moelb.save_expert_distribution(
        {"rank": 0, "logical_count": counts, "average_utilization_rate_over_window": None},
        tmp_path / "dump.json",
    )
    out_file = tmp_path / "lb.yml"
    code, _, err = cli(capsys, "rebalance", str(tmp_path / "dump.json"), "-o", str(out_file),
                       "--model", "deepseek-v3", "--num-physical-experts", "288", "--ep-size",
                       "32", "--num-nodes", "4", "--format", "trtllm")  # fmt: skip
    assert code == 0, err
    assignments = read_trtllm_yaml(out_file.read_text())["initial_global_assignments"]
    assert sorted(assignments) == list(range(3, 61))
    plan = moelb.rebalance(counts, 288, 8, 4, 32)
    for layer, row in assignments.items():
        assert row == plan.location.physical_to_logical[layer - 3].tolist()


def moe_only_dump(path: Path, num_layers: int = 58, seed: int = 2) -> np.ndarray:
    """A dump of [2, num_layers, 256] counts: DeepSeek-V3's 58 MoE layers by default."""
    counts = np.random.default_rng(seed).poisson(50, (2, num_layers, 256)).astype(np.int32)
    moelb.save_expert_distribution(
        {"rank": 0, "logical_count": counts, "average_utilization_rate_over_window": None}, path
    )
    return counts


V3_TOPOLOGY = ["--num-physical-experts", "288", "--ep-size", "32", "--num-nodes", "4"]


@pytest.mark.parametrize(
    ("file_format", "name"),
    [("sglang", "p.json"), ("sglang-logical-count", "lc.json"), ("trtllm", "lb.yaml")],
)
def test_engine_files_refuse_a_dump_of_moe_layers_only_without_the_dense_layers(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, file_format: str, name: str
) -> None:
    """58 layers x 256 experts is DeepSeek-V3's MoE layers: written as is, every row of the
    engine's file (a row per decoder layer) would be 3 layers off. Without --model or
    --dense-layers the command refuses and names both; --dense-layers 0 says the rows already
    are decoder layers."""
    moe_only_dump(tmp_path / "dump.json")
    out_file = tmp_path / name
    args = ["rebalance", str(tmp_path / "dump.json"), "-o", str(out_file), *V3_TOPOLOGY,
            "--num-groups", "8", "--format", file_format]  # fmt: skip
    code, _, err = cli(capsys, *args)
    assert code == 2
    assert "MoE layers of deepseek-v3" in err and "--model deepseek-v3" in err
    assert "--dense-layers 3" in err and "--dense-layers 0" in err
    assert not out_file.exists()
    code, _, err = cli(capsys, *args, "--dense-layers", "0")
    assert code == 0, err
    assert "leading dense layers" not in err


def test_dense_layers_shift_the_rows_like_model(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """--dense-layers 3 gives the same files as --model deepseek-v3 for a dump of the 58 MoE
    layers: SGLang's map with 61 rows (3 dense rows first, planned with no load), TensorRT-LLM's
    keys 3..60; a --dense-layers that contradicts --model is refused."""
    counts = moe_only_dump(tmp_path / "dump.json")
    files = {}
    for fmt, name in (("sglang", "p.json"), ("trtllm", "lb.yaml")):
        for how in (["--model", "deepseek-v3"], ["--num-groups", "8", "--dense-layers", "3"]):
            out_file = tmp_path / f"{how[1]}-{name}"
            code, _, err = cli(capsys, "rebalance", str(tmp_path / "dump.json"), "-o",
                               str(out_file), *V3_TOPOLOGY, "--format", fmt, *how)  # fmt: skip
            assert code == 0, err
            assert "3 leading dense layers" in err
            files[fmt, how[0]] = out_file.read_text()
        assert files[fmt, "--model"] == files[fmt, "--num-groups"]
    placement = np.array(json.loads(files["sglang", "--model"])["physical_to_logical_map"])
    plan = moelb.rebalance(counts, 288, 8, 4, 32)
    assert placement.shape == (61, 288)
    np.testing.assert_array_equal(placement[3:], plan.location.physical_to_logical)
    assert sorted(read_trtllm_yaml(files["trtllm", "--model"])["initial_global_assignments"]) == (
        list(range(3, 61))
    )
    code, _, err = cli(capsys, "rebalance", str(tmp_path / "dump.json"), "-o",
                       str(tmp_path / "x.json"), *V3_TOPOLOGY, "--model", "deepseek-v3",
                       "--dense-layers", "0")  # fmt: skip
    assert code == 2 and "--dense-layers 0 contradicts --model deepseek-v3" in err
    assert not (tmp_path / "x.json").exists()


def test_json_format_reads_back(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    counts = small_dump(tmp_path / "dump.json")
    out_file = tmp_path / "plan.json"
    code, _, err = cli(capsys, "rebalance", str(tmp_path / "dump.json"), "-o", str(out_file),
                       *TOPOLOGY, "--format", "json")  # fmt: skip
    assert code == 0, err
    obj = json.loads(out_file.read_text())
    plan = moelb.rebalance(counts, 80, 8, 2, 8)
    location = plan.location
    assert obj["format"] == "moelb-placement/1"
    assert (obj["num_layers"], obj["num_logical_experts"], obj["num_physical_experts"]) == (
        4, 64, 80,
    )  # fmt: skip
    assert (obj["ep_size"], obj["num_nodes"], obj["num_groups"]) == (8, 2, 8)
    assert obj["algorithm"] == plan.stats.algorithm
    assert obj["physical_to_logical_map"] == location.physical_to_logical.tolist()
    assert obj["logical_to_physical_map"] == location.logical_to_physical.tolist()
    assert obj["replica_count"] == location.logical_count.tolist()
    assert obj["stats"]["balancedness"] == pytest.approx(plan.stats.balancedness)
    assert obj["summary"]["balancedness_after"] == pytest.approx(plan.stats.balancedness)
    assert moelb.load_placement(out_file, 8, 2, 64) == location
    # --previous reads it: the same dump moves nothing.
    code, out, err = cli(capsys, "rebalance", str(tmp_path / "dump.json"),
                         "-o", str(tmp_path / "next.json"), *TOPOLOGY, "--previous",
                         str(out_file), "--json")  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["moved_experts"] == 0
    # A moelb file names its cluster: read for other ranks or nodes it is refused (the same
    # map on 4 ranks would put its slots on other GPUs).
    with pytest.raises(
        moelb.InvalidArgumentError, match="planned for ep_size=8, not the ep_size=4"
    ):
        moelb.load_placement(out_file, 4, 2, 64)
    with pytest.raises(moelb.InvalidArgumentError, match="planned for num_nodes=2"):
        moelb.load_placement(out_file, 8, 1, 64)


@pytest.mark.parametrize(
    ("file_format", "name", "needle"),
    [
        ("trtllm", "lb.json", "give a .yaml or .yml name"),
        ("json", "plan.yaml", "give a .json name"),
        ("sglang-logical-count", "lc.pt", "give a name ending in .json"),
        # SGLang's compute_initial_expert_location_metadata tests data.endswith(".json"):
        # "p.JSON" would be parsed as inline JSON and SGLang would not start.
        ("sglang", "p.JSON", "give a name ending in .json"),
        ("sglang-logical-count", "lc.Json", "give a name ending in .json"),
    ],
)
def test_output_names(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, file_format: str, name: str, needle: str
) -> None:
    small_dump(tmp_path / "dump.json")
    code, _, err = cli(capsys, "rebalance", str(tmp_path / "dump.json"), "-o",
                       str(tmp_path / name), *TOPOLOGY, "--format", file_format)  # fmt: skip
    assert code == 2 and needle in err
    assert not (tmp_path / name).exists()


@pytest.mark.parametrize(
    ("file_format", "name"),
    [("sglang", "p.json"), ("sglang-logical-count", "lc.json"), ("trtllm", "lb.yaml"),
     ("json", "plan.json")],
)  # fmt: skip
def test_a_failed_write_leaves_the_old_file(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    file_format: str,
    name: str,
) -> None:
    """Written to a temporary name and renamed: a failure at the rename leaves the file that
    was there, and no temporary file."""
    small_dump(tmp_path / "dump.json")
    target = tmp_path / name
    target.write_text("old contents\n")

    def failing_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(moelb.io.os, "replace", failing_replace)
    code, _, err = cli(capsys, "rebalance", str(tmp_path / "dump.json"), "-o", str(target),
                       *TOPOLOGY, "--format", file_format)  # fmt: skip
    assert code != 0 and "Traceback" not in err
    assert target.read_text() == "old contents\n"
    assert sorted(os.listdir(tmp_path)) == sorted(["dump.json", name])
