"""Expert distribution dumps (DESIGN.md section 7, reference/recorder.md sections 6, 10, 11, 14):
round trips through .pt / .npz / .json in every mode, SGLang's exact .pt layouts, SGLang's
folder readers (read_mode_stat / read_mode_per_pass), atomic writes and malformed files."""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import moelb
import numpy as np
import pytest

Recorder = moelb.ExpertDistributionRecorder
SUFFIXES = (".pt", ".npz", ".json")
MODES = ("stat", "per_pass", "per_token")
STAT_KEYS = {"rank", "logical_count", "average_utilization_rate_over_window"}
RECORD_KEYS = {"forward_pass_id", "rank", "gatherer_key", "global_physical_count"}


def need_torch(suffix: str):
    return pytest.importorskip("torch") if suffix == ".pt" else None


def sample_location(ep_size: int = 2) -> moelb.ExpertLocation:
    """L=3, E=6, P=8: every expert has a replica, two have two."""
    rng = np.random.default_rng(0)
    rows = [rng.permutation([0, 1, 2, 3, 4, 5, 1, 4]) for _ in range(3)]
    return moelb.ExpertLocation(np.array(rows), 6, ep_size)


def to_logical(physical: np.ndarray, physical_to_logical: np.ndarray, num_experts: int):
    out = np.zeros((*physical.shape[:-1], num_experts), np.int64)
    for layer, row in enumerate(physical_to_logical):
        for slot, expert in enumerate(row):
            out[..., layer, expert] += physical[..., layer, slot]
    return out


def record(rec: Recorder, num_passes: int = 4, seed: int = 0, first_id: int | None = None):
    """Records random passes (layer 2 stays dense); returns the physical counts recorded."""
    rng = np.random.default_rng(seed)
    rec.start()
    for i in range(num_passes):
        with rec.forward_pass(None if first_id is None else first_id + i):
            for layer in (0, 1):
                ids = rng.integers(-1, rec.num_physical_experts, (5, 2)).astype(np.int32)
                with rec.layer(layer):
                    rec.on_select_experts(ids)
    return rec.physical_count()


def write_stat(path: Path, logical_count: np.ndarray, rate: float | None, rank: int = 0) -> None:
    """A stat dump as SGLang (torch.save) or moelb (.npz/.json) writes it."""
    if path.suffix == ".pt":
        torch = need_torch(".pt")
        torch.save(
            {
                "rank": rank,
                "logical_count": torch.from_numpy(logical_count.astype(np.int32)),
                "average_utilization_rate_over_window": rate,
            },
            path,
        )
    else:
        dump = {
            "rank": rank,
            "logical_count": logical_count,
            "average_utilization_rate_over_window": rate,
        }
        moelb.save_expert_distribution(dump, path)


# ------------------------------------------------------------------------------------------------
# Round trips and layouts.


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("suffix", SUFFIXES)
def test_round_trip(tmp_path: Path, suffix: str, mode: str) -> None:
    need_torch(suffix)
    location = sample_location()
    rec = Recorder(location, mode=mode, ep_rank=1)
    physical = record(rec, first_id=20)
    path = tmp_path / f"expert_distribution_recorder_1754900000.123{suffix}"
    dump = rec.dump(path)
    expected = to_logical(physical, location.physical_to_logical, 6)
    np.testing.assert_array_equal(dump["logical_count"], expected)
    assert dump["logical_count"].sum() == physical.sum() > 0
    assert rec.num_passes == 0  # dump(path) cleared the window too

    loaded = moelb.load_expert_distribution(path)
    assert loaded["logical_count"].dtype == np.int32
    assert loaded["logical_count"].shape == (4, 3, 6)
    np.testing.assert_array_equal(loaded["logical_count"], dump["logical_count"])
    if mode == "stat":
        assert loaded["rank"] == 1
        assert loaded["average_utilization_rate_over_window"] == pytest.approx(
            dump["average_utilization_rate_over_window"]
        )
        assert 0 < loaded["average_utilization_rate_over_window"] <= 1
    else:
        np.testing.assert_array_equal(
            moelb.load_expert_distribution(path, num_logical_experts=6)["logical_count"], expected
        )
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left


def test_stat_pt_is_sglang_layout(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    rec = Recorder(sample_location())
    physical = record(rec, num_passes=3)
    path = tmp_path / "dump.pt"
    dump = rec.dump(path)
    data = torch.load(path, weights_only=True)
    assert set(data) == STAT_KEYS
    assert type(data["rank"]) is int and data["rank"] == 0
    count = data["logical_count"]
    assert isinstance(count, torch.Tensor) and count.dtype == torch.int32
    assert tuple(count.shape) == (3, 3, 6)
    np.testing.assert_array_equal(
        count.numpy(), to_logical(physical, rec.location.physical_to_logical, 6)
    )
    rate = data["average_utilization_rate_over_window"]
    assert type(rate) is float and rate == dump["average_utilization_rate_over_window"]


@pytest.mark.parametrize("mode", ["per_pass", "per_token"])
def test_per_pass_pt_is_sglang_layout(tmp_path: Path, mode: str) -> None:
    torch = pytest.importorskip("torch")
    location = sample_location()
    rec = Recorder(location, mode=mode, ep_rank=1)
    physical = record(rec, num_passes=3, first_id=5)
    path = tmp_path / "dump_1.pt"
    rec.dump(path)
    data = torch.load(path, weights_only=True)
    assert set(data) == {"records", "last_physical_to_logical_map"}
    np.testing.assert_array_equal(
        data["last_physical_to_logical_map"].numpy(), location.physical_to_logical
    )
    records = data["records"]
    assert isinstance(records, list) and len(records) == 3
    for i, r in enumerate(records):
        extra = {"topk_ids_of_layer"} if mode == "per_token" else set()
        assert set(r) == RECORD_KEYS | extra
        assert (r["forward_pass_id"], r["rank"], r["gatherer_key"]) == (5 + i, 1, "primary")
        count = r["global_physical_count"]
        assert count.dtype == torch.int32 and tuple(count.shape) == (3, 8)
        np.testing.assert_array_equal(count.numpy(), physical[i])
        if mode == "per_token":
            ids = r["topk_ids_of_layer"]
            assert ids.dtype == torch.int32 and tuple(ids.shape) == (3, 5, 2)
            assert (ids[2] == -1).all()
            ids = ids.numpy()
            np.testing.assert_array_equal(
                [np.bincount(ids[layer][ids[layer] >= 0], minlength=8) for layer in range(3)],
                physical[i],
            )


def test_json_and_npz_layouts(tmp_path: Path) -> None:
    rec = Recorder(sample_location())
    record(rec, num_passes=2)
    dump = rec.dump(tmp_path / "a.json")
    data = json.loads((tmp_path / "a.json").read_text())
    assert set(data) == STAT_KEYS
    assert data["logical_count"] == dump["logical_count"].tolist()
    moelb.save_expert_distribution(dump, tmp_path / "a.npz")
    with np.load(tmp_path / "a.npz", allow_pickle=False) as npz:
        assert set(npz.files) == STAT_KEYS
        assert npz["logical_count"].dtype == np.int32
        np.testing.assert_array_equal(npz["logical_count"], dump["logical_count"])


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_none_rate_is_kept(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"x{suffix}"
    count = np.arange(24, dtype=np.int32).reshape(2, 3, 4)
    write_stat(path, count, None)
    loaded = moelb.load_expert_distribution(path)
    assert loaded["average_utilization_rate_over_window"] is None
    np.testing.assert_array_equal(loaded["logical_count"], count)


def test_two_dimensional_count_is_one_step(tmp_path: Path) -> None:
    """SGLang's init_by_eplb accepts an [L, E] count as one step."""
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"rank": 0, "logical_count": [[1, 2], [3, 4]]}))
    loaded = moelb.load_expert_distribution(path)
    np.testing.assert_array_equal(loaded["logical_count"], [[[1, 2], [3, 4]]])
    assert loaded["average_utilization_rate_over_window"] is None


# ------------------------------------------------------------------------------------------------
# SGLang's readers (reference section 10.3).


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_read_stat_folder_single_file(tmp_path: Path, suffix: str) -> None:
    count = np.arange(24, dtype=np.int32).reshape(2, 3, 4)
    write_stat(tmp_path / f"expert_distribution_recorder_1754900000.1{suffix}", count, 0.42)
    loaded = moelb.load_expert_distribution(tmp_path)
    np.testing.assert_array_equal(loaded["logical_count"], count)
    assert loaded["average_utilization_rate_over_window"] == pytest.approx(0.42)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_read_stat_folder_concatenates_in_file_name_order(tmp_path: Path, suffix: str) -> None:
    first = tmp_path / f"expert_distribution_recorder_1754900001.5{suffix}"
    second = tmp_path / f"expert_distribution_recorder_1754900002.5{suffix}"
    # The file with the larger name is written first (and is the older file on disk).
    write_stat(second, np.full((3, 3, 4), 7, np.int32), 0.2)
    os.utime(second, (1_000_000, 1_000_000))
    write_stat(first, np.zeros((2, 3, 4), np.int32), 0.1)
    loaded = moelb.load_expert_distribution(tmp_path)
    count = loaded["logical_count"]
    assert count.shape == (5, 3, 4)
    assert (count[:2] == 0).all() and (count[2:] == 7).all()
    assert loaded["average_utilization_rate_over_window"] == pytest.approx(0.2)  # the latest


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_read_stat_folder_rejects_other_ranks(tmp_path: Path, suffix: str) -> None:
    write_stat(tmp_path / f"a{suffix}", np.zeros((1, 3, 4), np.int32), 0.1)
    bad = tmp_path / f"b{suffix}"
    write_stat(bad, np.zeros((1, 3, 4), np.int32), 0.1, rank=1)
    with pytest.raises(moelb.InvalidArgumentError, match=rf"{re.escape(bad.name)}.*rank=1"):
        moelb.load_expert_distribution(tmp_path)


def test_read_folder_errors(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a dump")
    with pytest.raises(moelb.InvalidArgumentError, match="holds no"):
        moelb.load_expert_distribution(tmp_path)
    write_stat(tmp_path / "a.json", np.zeros((1, 3, 4), np.int32), None)
    write_stat(tmp_path / "b.json", np.zeros((1, 3, 5), np.int32), None)
    with pytest.raises(moelb.InvalidArgumentError, match="different shapes"):
        moelb.load_expert_distribution(tmp_path)
    (tmp_path / "b.json").unlink()
    rec = Recorder(sample_location(), mode="per_pass")
    record(rec, num_passes=1)
    rec.dump(tmp_path / "c.json")
    with pytest.raises(moelb.InvalidArgumentError, match="mixes stat and per-pass"):
        moelb.load_expert_distribution(tmp_path)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_read_per_pass_folder_sums_ranks_pass_by_pass(tmp_path: Path, suffix: str) -> None:
    need_torch(suffix)
    location = sample_location(ep_size=2)
    ranks = [Recorder(location, mode="per_pass", ep_rank=r) for r in (0, 1)]
    # Rank 1 joined one pass late: passes 10..13 and 11..14.
    physical = [record(rec, num_passes=4, seed=r, first_id=10 + r) for r, rec in enumerate(ranks)]
    for r, rec in enumerate(ranks):
        rec.dump(tmp_path / f"expert_distribution_recorder_1754900000.0_{r}{suffix}")
    summed = np.zeros((5, 3, 8), np.int64)
    summed[:4] += physical[0]
    summed[1:] += physical[1]
    loaded = moelb.load_expert_distribution(tmp_path)
    np.testing.assert_array_equal(
        loaded["logical_count"], to_logical(summed, location.physical_to_logical, 6)
    )
    assert loaded["average_utilization_rate_over_window"] is None


def test_read_per_pass_files_written_by_sglang(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    mapping = torch.tensor([[0, 1, 2, 0], [2, 1, 0, 1]])  # int64, as SGLang's map
    for rank in (0, 1):
        records = [
            {
                "forward_pass_id": pass_id,
                "rank": rank,
                "gatherer_key": "primary",
                "global_physical_count": torch.full((2, 4), pass_id + rank, dtype=torch.int32),
            }
            for pass_id in (3, 1, 2)  # not in order
        ]
        torch.save(
            {"records": records, "last_physical_to_logical_map": mapping},
            tmp_path / f"expert_distribution_recorder_1.0_{rank}.pt",
        )
    loaded = moelb.load_expert_distribution(tmp_path)
    per_pass = np.array([2 * p + 1 for p in (1, 2, 3)])[:, None, None]  # ids sorted, ranks summed
    expected = to_logical(np.ones((3, 2, 4), np.int64) * per_pass, mapping.numpy(), 3)
    np.testing.assert_array_equal(loaded["logical_count"], expected)
    loaded = moelb.load_expert_distribution(tmp_path, num_logical_experts=5)
    assert loaded["logical_count"].shape == (3, 2, 5) and not loaded["logical_count"][..., 3:].any()
    with pytest.raises(moelb.InvalidArgumentError, match="num_logical_experts=2"):
        moelb.load_expert_distribution(tmp_path, num_logical_experts=2)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_read_per_pass_duplicate_pass_is_an_error(tmp_path: Path, suffix: str) -> None:
    need_torch(suffix)
    rec = Recorder(sample_location(), mode="per_pass", ep_rank=1)
    record(rec, num_passes=2)
    dump = rec.dump()
    moelb.save_expert_distribution(dump, tmp_path / f"a{suffix}", mode="per_pass")
    moelb.save_expert_distribution(dump, tmp_path / f"b{suffix}", mode="per_pass")
    with pytest.raises(
        moelb.InvalidArgumentError, match="forward_pass_id=0 of rank 1 appears twice"
    ):
        moelb.load_expert_distribution(tmp_path)


def test_read_per_pass_folder_with_different_maps_is_an_error(tmp_path: Path) -> None:
    a = Recorder(sample_location(), mode="per_pass")
    b = Recorder(moelb.ExpertLocation.trivial(3, 6, 8, ep_size=2), mode="per_pass", ep_rank=1)
    for rec, name in ((a, "a.json"), (b, "b.json")):
        record(rec, num_passes=1)
        rec.dump(tmp_path / name)
    with pytest.raises(moelb.InvalidArgumentError, match=r"b\.json.*different physical_to_logical"):
        moelb.load_expert_distribution(tmp_path)


# ------------------------------------------------------------------------------------------------
# Dumping: nothing recorded, atomic writes.


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_dump_with_nothing_recorded(tmp_path: Path, suffix: str) -> None:
    rec = Recorder(sample_location())
    path = tmp_path / f"dump{suffix}"
    with pytest.raises(moelb.InvalidArgumentError, match="nothing to dump"):
        rec.dump(path)
    rec.start()
    with pytest.raises(moelb.InvalidArgumentError, match="nothing to dump"):
        rec.dump(path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("failing", ["replace", "fsync"])
@pytest.mark.parametrize("suffix", SUFFIXES)
def test_failed_dump_leaves_the_old_file_and_the_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str, failing: str
) -> None:
    need_torch(suffix)
    path = tmp_path / f"dump{suffix}"
    old = Recorder(sample_location())
    record(old, num_passes=1, seed=9)
    old_count = old.dump(path)["logical_count"]
    before = path.read_bytes()

    rec = Recorder(sample_location(), mode="per_pass")
    record(rec, num_passes=3)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, failing, boom)
    with pytest.raises(OSError, match="disk full"):
        rec.dump(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    np.testing.assert_array_equal(moelb.load_expert_distribution(path)["logical_count"], old_count)
    assert rec.num_passes == 3  # a failed dump keeps the window; retrying works
    dump = rec.dump(path)
    np.testing.assert_array_equal(
        moelb.load_expert_distribution(path)["logical_count"], dump["logical_count"]
    )


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("missing/dump.json", r"missing/dump\.json.*folder .* does not exist"),
        ("dump.txt", r"dump\.txt.*unknown dump format '\.txt'"),
        ("dump", "unknown dump format"),
    ],
)
def test_dump_to_a_bad_path(tmp_path: Path, name: str, message: str) -> None:
    rec = Recorder(sample_location())
    record(rec, num_passes=2)
    with pytest.raises(moelb.InvalidArgumentError, match=message):
        rec.dump(tmp_path / name)
    assert rec.num_passes == 2
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------
# Malformed files: a clear InvalidArgumentError naming the file; never code execution.


def valid_bytes(tmp_path: Path, suffix: str, mode: str = "stat") -> bytes:
    rec = Recorder(sample_location(), mode=mode)
    record(rec, num_passes=3)
    path = tmp_path / f"valid{suffix}"
    rec.dump(path)
    data = path.read_bytes()
    path.unlink()
    return data


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "flipped"])
def test_damaged_file(tmp_path: Path, suffix: str, damage: str) -> None:
    need_torch(suffix)
    data = valid_bytes(tmp_path, suffix)
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "empty":
        data = b""
    elif damage == "garbage":
        data = np.random.default_rng(0).bytes(500)
    else:  # corrupt the middle of the file
        middle = len(data) // 2
        data = (
            data[:middle]
            + bytes(b ^ 0xFF for b in data[middle : middle + 64])
            + data[middle + 64 :]
        )
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(data)
    with pytest.raises(moelb.InvalidArgumentError, match=re.escape(path.name)):
        moelb.load_expert_distribution(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(moelb.InvalidArgumentError, match=r"nope\.pt.* does not exist"):
        moelb.load_expert_distribution(tmp_path / "nope.pt")
    with pytest.raises(moelb.InvalidArgumentError, match=r"unknown dump format '\.csv'"):
        moelb.load_expert_distribution(tmp_path / "x.csv")


class Exploit:
    """Unpickling this runs code that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_npz_with_pickled_objects_is_rejected_unopened(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    path = tmp_path / "evil.npz"
    payload = np.empty(1, dtype=object)
    payload[0] = Exploit(marker)
    np.savez(path, rank=np.array(0), logical_count=payload)
    with pytest.raises(moelb.InvalidArgumentError, match=r"evil\.npz.*allow_pickle"):
        moelb.load_expert_distribution(path)
    assert not marker.exists()


@pytest.mark.parametrize("writer", ["torch_save", "pickle"])
def test_pt_with_pickled_objects_does_not_execute(tmp_path: Path, writer: str) -> None:
    torch = pytest.importorskip("torch")
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pt"
    obj = {"rank": 0, "logical_count": Exploit(marker)}
    if writer == "torch_save":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(moelb.InvalidArgumentError, match=r"evil\.pt.* not a readable PyTorch"):
        moelb.load_expert_distribution(path)
    assert not marker.exists()


COUNT = [[[1, 2], [3, 4]]]
MAP = [[0, 1], [1, 0]]
RECORD = {"forward_pass_id": 0, "rank": 0, "global_physical_count": [[1, 2], [3, 4]]}


def per_pass(**changes) -> dict:
    record = dict(RECORD)
    record.update(changes)
    return {"records": [record], "last_physical_to_logical_map": MAP}


BAD_CONTENT = {
    "list": ([COUNT], r"expected a dict, got list"),
    "number": (3, r"expected a dict, got int"),
    "no_known_keys": ({"foo": 1}, r"not an expert distribution dump.*'foo'"),
    "no_rank": ({"logical_count": COUNT}, r"missing keys \['rank'\]"),
    "no_count": (
        {"rank": 0, "average_utilization_rate_over_window": 0.5},
        "not an expert distribution dump",
    ),
    "rank_str": ({"rank": "0", "logical_count": COUNT}, "rank must be an integer, got '0'"),
    "rank_float": ({"rank": 0.0, "logical_count": COUNT}, "rank must be an integer"),
    "rank_bool": ({"rank": False, "logical_count": COUNT}, "rank must be an integer"),
    "count_str": ({"rank": 0, "logical_count": "abc"}, "logical_count must hold integers"),
    "count_float": ({"rank": 0, "logical_count": [[[1.5, 2.0]]]}, "must hold integers"),
    "count_bool": ({"rank": 0, "logical_count": [[[True]]]}, "must hold integers"),
    "count_null": ({"rank": 0, "logical_count": [[[None]]]}, "must hold integers"),
    "count_negative": ({"rank": 0, "logical_count": [[[1, -2]]]}, r"outside \[0, 2\*\*31\)"),
    "count_huge": ({"rank": 0, "logical_count": [[[2**31]]]}, r"outside \[0, 2\*\*31\)"),
    "count_1d": ({"rank": 0, "logical_count": [1, 2]}, r"must be 3-D, got shape \(2,\)"),
    "count_4d": ({"rank": 0, "logical_count": [COUNT]}, r"must be 3-D, got shape \(1, 1, 2, 2\)"),
    "rate_str": (
        {"rank": 0, "logical_count": COUNT, "average_utilization_rate_over_window": "high"},
        "average_utilization_rate_over_window must be a number or None",
    ),
    "rate_list": (
        {"rank": 0, "logical_count": COUNT, "average_utilization_rate_over_window": [0.5]},
        "must be a number or None",
    ),
    "records_not_list": (
        {"records": {"0": RECORD}, "last_physical_to_logical_map": MAP},
        "records must be a list",
    ),
    "no_map": ({"records": [RECORD]}, "missing key 'last_physical_to_logical_map'"),
    "map_1d": (
        {"records": [RECORD], "last_physical_to_logical_map": [0, 1]},
        "last_physical_to_logical_map must be 2-D",
    ),
    "map_negative": (
        {"records": [RECORD], "last_physical_to_logical_map": [[0, -1], [1, 0]]},
        "last_physical_to_logical_map holds values outside",
    ),
    "record_not_dict": (
        {"records": [[0, 0]], "last_physical_to_logical_map": MAP},
        r"records\[0\] needs forward_pass_id",
    ),
    "record_missing_count": (
        {"records": [{"forward_pass_id": 0, "rank": 0}], "last_physical_to_logical_map": MAP},
        r"records\[0\] needs forward_pass_id, rank and global_physical_count",
    ),
    "record_count_shape": (
        per_pass(global_physical_count=[[1, 2, 3], [3, 4, 5]]),
        r"records\[0\]\.global_physical_count has shape \(2, 3\) but .* \(2, 2\)",
    ),
    "record_count_float": (
        per_pass(global_physical_count=[[1.5, 2], [3, 4]]),
        r"records\[0\]\.global_physical_count must hold integers",
    ),
    "map_empty": (
        {"records": [], "last_physical_to_logical_map": [[]]},
        r"last_physical_to_logical_map has shape \(1, 0\)",
    ),
    "ranks_sum_beyond_int32": (  # two ranks' counts of one pass, each valid, sum to 2**31
        {
            "records": [
                dict(RECORD, global_physical_count=[[2**31 - 1, 0], [0, 0]]),
                dict(RECORD, rank=1, global_physical_count=[[1, 0], [0, 0]]),
            ],
            "last_physical_to_logical_map": MAP,
        },
        r"logical count of 2147483648 .* does not fit",
    ),
}

# Regressions: malformed values that once escaped as bare ValueError/TypeError.
REGRESSIONS = {
    "count_ragged": (
        {"rank": 0, "logical_count": [[[1, 2], [3]]]},
        "logical_count",
    ),
    "record_id_str": (
        per_pass(forward_pass_id="x"),
        "forward_pass_id",
    ),
    "record_id_null": (
        per_pass(forward_pass_id=None),
        "forward_pass_id",
    ),
    "record_rank_str": (
        per_pass(rank="zero"),
        "rank",
    ),
    "record_id_float": (
        per_pass(forward_pass_id=1.5),
        "forward_pass_id",
    ),
    "rate_bool": (
        {"rank": 0, "logical_count": COUNT, "average_utilization_rate_over_window": True},
        "average_utilization_rate_over_window",
    ),
}


TENSOR_KEYS = {"logical_count", "global_physical_count", "last_physical_to_logical_map"}


def write_json_or_pt(path: Path, content) -> None:
    if path.suffix == ".json":
        path.write_text(json.dumps(content))
        return
    torch = need_torch(".pt")

    def tensors(value):  # SGLang's .pt files hold tensors where JSON holds nested lists
        if isinstance(value, dict):
            return {k: tensor(v) if k in TENSOR_KEYS else tensors(v) for k, v in value.items()}
        if isinstance(value, list):
            return [tensors(v) for v in value]
        return value

    def tensor(value):
        try:
            return torch.tensor(value) if isinstance(value, list) else value
        except (TypeError, ValueError, RuntimeError, OverflowError):
            return value  # ragged, mixed, too big: stored as the list

    torch.save(tensors(content), path)


@pytest.mark.parametrize("suffix", [".json", ".pt"])
@pytest.mark.parametrize("case", list(BAD_CONTENT))
def test_bad_content(tmp_path: Path, suffix: str, case: str) -> None:
    content, message = BAD_CONTENT[case]
    path = tmp_path / f"bad_{case}{suffix}"
    write_json_or_pt(path, content)
    with pytest.raises(moelb.InvalidArgumentError, match=message) as info:
        moelb.load_expert_distribution(path)
    assert path.name in str(info.value)


@pytest.mark.parametrize("case", list(REGRESSIONS))
def test_bad_content_regressions(tmp_path: Path, case: str) -> None:
    content, key = REGRESSIONS[case]
    path = tmp_path / f"bad_{case}.json"
    path.write_text(json.dumps(content))
    with pytest.raises(moelb.InvalidArgumentError, match=key) as info:
        moelb.load_expert_distribution(path)
    assert path.name in str(info.value)


BAD_NPZ = {
    "no_keys": ({"foo": np.zeros(2)}, "not an expert distribution dump"),
    "count_float": (
        {"rank": np.array(0), "logical_count": np.zeros((1, 2, 2), np.float32) + 0.5},
        "logical_count must hold integers",
    ),
    "count_2d_strings": (
        {"rank": np.array(0), "logical_count": np.array([["a"]])},
        "must hold integers",
    ),
    "records_missing": (
        {"forward_pass_id": np.array([0]), "global_physical_count": np.zeros((1, 2, 2), np.int32)},
        r"missing keys \['record_rank', 'last_physical_to_logical_map'\]",
    ),
    "records_lengths": (
        {
            "forward_pass_id": np.array([0, 1]),
            "record_rank": np.array([0]),
            "global_physical_count": np.zeros((2, 2, 2), np.int32),
            "last_physical_to_logical_map": np.array(MAP),
        },
        "record arrays have different lengths",
    ),
}

# Regressions: values that once escaped as bare TypeError/ValueError.
BAD_NPZ_REGRESSIONS = {
    "rank_vector": ({"rank": np.array([0, 1]), "logical_count": np.zeros((1, 2, 2), np.int32)},),
    "rate_string": (
        {
            "rank": np.array(0),
            "logical_count": np.zeros((1, 2, 2), np.int32),
            "average_utilization_rate_over_window": np.array("abc"),
        },
    ),
    "record_ids_scalar": (
        {
            "forward_pass_id": np.array(0),
            "record_rank": np.array(0),
            "global_physical_count": np.zeros((2, 2), np.int32),
            "last_physical_to_logical_map": np.array(MAP),
        },
    ),
}


@pytest.mark.parametrize(
    "case",
    list(BAD_NPZ) + list(BAD_NPZ_REGRESSIONS),
)
def test_bad_npz_content(tmp_path: Path, case: str) -> None:
    arrays, message = BAD_NPZ[case] if case in BAD_NPZ else (BAD_NPZ_REGRESSIONS[case][0], "")
    path = tmp_path / f"bad_{case}.npz"
    np.savez(path, **arrays)
    with pytest.raises(moelb.InvalidArgumentError, match=message or None) as info:
        moelb.load_expert_distribution(path)
    assert path.name in str(info.value)


def test_stat_file_with_wrong_number_of_experts(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    write_stat(path, np.zeros((1, 2, 4), np.int32), None)
    with pytest.raises(moelb.InvalidArgumentError, match="4 experts but num_logical_experts=6"):
        moelb.load_expert_distribution(path, num_logical_experts=6)


# ------------------------------------------------------------------------------------------------
# Values are written exactly or not at all (issue 17).


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (3_000_000_000, r"logical_count\[0, 1, 2\] = 3000000000 is outside \[0, 2\*\*31 - 1\]"),
        (-5, r"logical_count\[0, 1, 2\] = -5 is outside"),
        (1.7, r"logical_count\[0, 1, 2\] = 1\.7 is not an integer"),
        (np.nan, r"logical_count holds nan"),
    ],
)
@pytest.mark.parametrize("suffix", SUFFIXES)
def test_save_refuses_counts_it_cannot_store_exactly(
    tmp_path: Path, suffix: str, value: float, message: str
) -> None:
    need_torch(suffix)
    count = np.zeros((2, 3, 4), np.int64 if isinstance(value, int) else np.float64)
    count[0, 1, 2] = value
    dump = {"rank": 0, "logical_count": count, "average_utilization_rate_over_window": None}
    path = tmp_path / f"x{suffix}"
    with pytest.raises(moelb.InvalidArgumentError, match=message):
        moelb.save_expert_distribution(dump, path)
    assert list(tmp_path.iterdir()) == []  # no file, no temporary


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_save_keeps_integral_float_and_wide_counts(tmp_path: Path, suffix: str) -> None:
    """Counts given as int64 or as integral floats are stored with their exact values."""
    need_torch(suffix)
    count = np.arange(24, dtype=np.float64).reshape(2, 3, 4)
    count[1, 2, 3] = 2**31 - 1
    for given in (count, count.astype(np.int64), count.astype(np.uint32)):
        dump = {"rank": 0, "logical_count": given, "average_utilization_rate_over_window": 0.5}
        moelb.save_expert_distribution(dump, tmp_path / f"x{suffix}")
        loaded = moelb.load_expert_distribution(tmp_path / f"x{suffix}")["logical_count"]
        assert loaded.dtype == np.int32
        np.testing.assert_array_equal(loaded, count)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_save_refuses_record_counts_it_cannot_store_exactly(tmp_path: Path, suffix: str) -> None:
    need_torch(suffix)
    rec = Recorder(sample_location(), mode="per_pass")
    record(rec, num_passes=2)
    dump = rec.dump()
    dump["records"][1]["global_physical_count"] = (
        dump["records"][1]["global_physical_count"].astype(np.int64) + 3_000_000_000
    )
    with pytest.raises(
        moelb.InvalidArgumentError,
        match=r"records\[1\]\.global_physical_count\[0, 0\] = 300000000\d is outside",
    ):
        moelb.save_expert_distribution(dump, tmp_path / f"x{suffix}", mode="per_pass")
    assert list(tmp_path.iterdir()) == []


def record_across_a_rebalance(mode: str) -> tuple[Recorder, list[np.ndarray], np.ndarray]:
    """Two passes with one placement, set_location, two with another, one with a third, as
    the EPLB loop does mid-window. Returns the recorder, each pass's map and physical counts."""
    first = sample_location()
    rng = np.random.default_rng(3)
    second = moelb.ExpertLocation(
        np.array([rng.permutation(r) for r in first.physical_to_logical]), 6, 2
    )
    third = moelb.ExpertLocation.trivial(3, 6, 8, ep_size=2)
    rec = Recorder(first, mode=mode, ep_rank=1)
    rec.start()
    maps = []
    for i, location in enumerate([first, first, second, second, third]):
        if location is not rec.location and i:
            rec.set_location(location)
        with rec.forward_pass(10 + i):
            for layer in (0, 1):
                with rec.layer(layer):
                    rec.on_select_experts(rng.integers(-1, 8, (5, 2)).astype(np.int32))
        maps.append(location.physical_to_logical)
    return rec, maps, rec.physical_count()


@pytest.mark.parametrize("mode", ["per_pass", "per_token"])
@pytest.mark.parametrize("suffix", SUFFIXES)
def test_window_spanning_a_rebalance_round_trips(tmp_path: Path, suffix: str, mode: str) -> None:
    need_torch(suffix)
    rec, maps, physical = record_across_a_rebalance(mode)
    expected = np.stack([to_logical(physical[t], maps[t], 6) for t in range(len(maps))])
    path = tmp_path / f"expert_distribution_recorder_1754900000.5_1{suffix}"
    dump = rec.dump(path)
    np.testing.assert_array_equal(dump["logical_count"], expected)
    assert not np.array_equal(expected[0], to_logical(physical[0], maps[-1], 6))  # maps matter
    for loaded in (
        moelb.load_expert_distribution(path),
        moelb.load_expert_distribution(path, num_logical_experts=6),
        moelb.load_expert_distribution(tmp_path),  # SGLang's folder reader
    ):
        np.testing.assert_array_equal(loaded["logical_count"], dump["logical_count"])
    # The dump dict itself round-trips through save_expert_distribution too.
    moelb.save_expert_distribution(dump, tmp_path / f"again{suffix}", mode=mode)
    np.testing.assert_array_equal(
        moelb.load_expert_distribution(tmp_path / f"again{suffix}")["logical_count"], expected
    )


def test_window_spanning_a_rebalance_keeps_sglang_pt_layout(tmp_path: Path) -> None:
    """SGLang's keys stay; only records of earlier placements carry their own map."""
    torch = pytest.importorskip("torch")
    rec, maps, physical = record_across_a_rebalance("per_pass")
    rec.dump(tmp_path / "dump.pt")
    data = torch.load(tmp_path / "dump.pt", weights_only=True)
    assert set(data) == {"records", "last_physical_to_logical_map"}
    np.testing.assert_array_equal(data["last_physical_to_logical_map"].numpy(), maps[-1])
    for t, r in enumerate(data["records"]):
        np.testing.assert_array_equal(r["global_physical_count"].numpy(), physical[t])
        if t == len(maps) - 1:
            assert set(r) == RECORD_KEYS
        else:
            assert set(r) == RECORD_KEYS | {"physical_to_logical_map"}
            assert r["physical_to_logical_map"].dtype == torch.int32
            np.testing.assert_array_equal(r["physical_to_logical_map"].numpy(), maps[t])
    # Passes of one placement share one stored map.
    assert (
        data["records"][0]["physical_to_logical_map"].data_ptr()
        == data["records"][1]["physical_to_logical_map"].data_ptr()
    )


# Review findings: values that slipped through the save-side checks.


@pytest.mark.parametrize("suffix", [".npz", ".json", ".pt"])
def test_float32_count_of_two_to_the_31_is_refused(tmp_path: Path, suffix: str) -> None:
    """float32(2**31 - 1) is 2**31: compared in float32 it passed and was written as -2**31."""
    if suffix == ".pt":
        pytest.importorskip("torch")
    counts = np.array([[[2**31 - 1, 1]]], np.float32)
    dump = {"rank": 0, "logical_count": counts, "average_utilization_rate_over_window": None}
    path = tmp_path / f"d{suffix}"
    with pytest.raises(moelb.InvalidArgumentError, match=r"logical_count\[0, 0, 0\] = 2147483648"):
        moelb.save_expert_distribution(dump, path)
    assert not path.exists()


@pytest.mark.parametrize("bad", [7.9, 1.5, "x", 2**63 + 5])
def test_per_pass_ids_are_integers_or_nothing_is_written(tmp_path: Path, bad: object) -> None:
    """.npz truncated a forward_pass_id of 7.9 to 7 (and 2**63 + 5 was a bare OverflowError)."""
    dump = {
        "records": [
            {"forward_pass_id": bad, "rank": 0, "global_physical_count": np.ones((1, 2), np.int32)}
        ],
        "last_physical_to_logical_map": np.array([[0, 1]], np.int32),
    }
    path = tmp_path / "d.npz"
    with pytest.raises(moelb.InvalidArgumentError, match=r"records\[0\]\.forward_pass_id"):
        moelb.save_expert_distribution(dump, path, mode="per_pass")
    assert not path.exists()


def test_rate_is_a_number_or_none_and_sglangs_per_pass_dict_saves(tmp_path: Path) -> None:
    counts = np.ones((1, 1, 2), np.int32)
    with pytest.raises(moelb.InvalidArgumentError, match="average_utilization_rate_over_window"):
        moelb.save_expert_distribution(
            {"rank": 0, "logical_count": counts, "average_utilization_rate_over_window": "abc"},
            tmp_path / "d.json",
        )
    assert not (tmp_path / "d.json").exists()
    # SGLang's own per_pass dict has no rate key.
    dump = {
        "records": [
            {"forward_pass_id": 3, "rank": 0, "global_physical_count": np.ones((1, 2), np.int32)}
        ],
        "last_physical_to_logical_map": np.array([[0, 1]], np.int32),
    }
    moelb.save_expert_distribution(dump, tmp_path / "p.npz", mode="per_pass")
    assert moelb.load_expert_distribution(tmp_path / "p.npz")["logical_count"].shape == (1, 1, 2)


def test_bf16_torch_counts_are_read_exactly(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    counts = torch.tensor([[[3.0, 256.0]]], dtype=torch.bfloat16)
    dump = {"rank": 0, "logical_count": counts, "average_utilization_rate_over_window": None}
    moelb.save_expert_distribution(dump, tmp_path / "d.npz")
    loaded = moelb.load_expert_distribution(tmp_path / "d.npz")["logical_count"]
    np.testing.assert_array_equal(loaded, [[[3, 256]]])


@pytest.mark.parametrize(
    ("dump", "mode", "needle"),
    [
        ({"logical_count": np.zeros((1, 1, 2), np.int32)}, "stat", r"no \['rank'\]"),
        ({"rank": 0}, "stat", r"no \['logical_count'\]"),
        ({"rank": 1.5, "logical_count": np.zeros((1, 1, 2), np.int32)}, "stat", "rank must be"),
        (
            {"records": [{"rank": 0}], "last_physical_to_logical_map": np.zeros((1, 2), np.int32)},
            "per_pass",
            r"records\[0\] has no \['forward_pass_id', 'global_physical_count'\]",
        ),
    ],
    ids=["no-rank", "no-counts", "float-rank", "record-keys"],
)
@pytest.mark.parametrize("suffix", [".json", ".npz"])
def test_save_names_a_missing_key_and_writes_nothing(
    tmp_path: Path, dump: dict, mode: str, needle: str, suffix: str
) -> None:
    path = tmp_path / f"dump{suffix}"
    with pytest.raises(moelb.InvalidArgumentError, match=needle):
        moelb.save_expert_distribution(dump, path, mode)
    assert not path.exists() and list(tmp_path.iterdir()) == []
