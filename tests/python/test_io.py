"""Placement files (SGLang's --init-expert-location JSON): round trip, format, atomic writes and
malformed files; the offline dispatch fractions written beside them (ours). DESIGN.md sections 7
and 9."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import moelb
import numpy as np
import pytest


def sample_location() -> moelb.ExpertLocation:
    rng = np.random.default_rng(0)
    rows = [
        rng.permutation(np.concatenate([np.arange(16), rng.integers(0, 16, 8)])) for _ in range(3)
    ]
    return moelb.ExpertLocation(np.array(rows), 16, ep_size=4, num_nodes=2)


def test_round_trip(tmp_path: Path) -> None:
    loc = sample_location()
    path = tmp_path / "placement.json"
    moelb.save_placement(loc, path)
    loaded = moelb.load_placement(path, ep_size=4, num_nodes=2, num_logical_experts=16)
    assert loaded == loc
    np.testing.assert_array_equal(loaded.physical_to_logical, loc.physical_to_logical)
    # str paths work too, and num_logical_experts defaults to the largest id + 1.
    again = moelb.load_placement(str(path), 4, 2)
    assert again == loc


def test_file_is_sglang_json(tmp_path: Path) -> None:
    loc = sample_location()
    path = tmp_path / "placement.json"
    moelb.save_placement(loc, path)
    data = json.loads(path.read_text())
    assert list(data) == ["physical_to_logical_map"]
    rows = data["physical_to_logical_map"]
    assert rows == loc.physical_to_logical.tolist()
    assert all(isinstance(v, int) for row in rows for v in row)


def test_reads_files_written_by_others(tmp_path: Path) -> None:
    path = tmp_path / "sglang.json"
    path.write_text(json.dumps({"physical_to_logical_map": [[0, 1, 2, 3, 0, 1]] * 2}))
    loc = moelb.load_placement(path, ep_size=3)
    assert loc.num_layers == 2 and loc.num_physical_experts == 6 and loc.num_logical_experts == 4
    np.testing.assert_array_equal(loc.logical_count, [[2, 2, 1, 1]] * 2)


def test_overwrite_replaces_the_file(tmp_path: Path) -> None:
    path = tmp_path / "placement.json"
    moelb.save_placement(moelb.ExpertLocation.trivial(1, 4, 8, 2), path)
    moelb.save_placement(sample_location(), path)
    assert moelb.load_placement(path, 4, 2) == sample_location()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["placement.json"]


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_failed_write_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    path = tmp_path / "placement.json"
    old = moelb.ExpertLocation.trivial(1, 4, 8, 2)
    moelb.save_placement(old, path)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, failing, boom)
    with pytest.raises(OSError, match="disk full"):
        moelb.save_placement(sample_location(), path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["placement.json"]
    assert moelb.load_placement(path, 2) == old


def test_failed_first_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        moelb.save_placement(sample_location(), tmp_path / "placement.json")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_save_errors(tmp_path: Path) -> None:
    with pytest.raises(moelb.InvalidArgumentError, match="location"):
        moelb.save_placement(np.zeros((1, 4), dtype=np.int32), tmp_path / "x.json")
    with pytest.raises(moelb.InvalidArgumentError, match="does not exist"):
        moelb.save_placement(sample_location(), tmp_path / "missing" / "x.json")
    assert list(tmp_path.iterdir()) == []


MALFORMED = {
    "not_json": "{physical_to_logical_map: [[0, 1]]",
    "not_utf8": b"\xff\xfe\x00{",
    "not_an_object": "[[0, 1, 2, 3]]",
    "missing_key": '{"physical_to_logical": [[0, 1, 2, 3]]}',
    "empty_list": '{"physical_to_logical_map": []}',
    "not_a_list": '{"physical_to_logical_map": "0,1,2,3"}',
    "flat_list": '{"physical_to_logical_map": [0, 1, 2, 3]}',
    "ragged_rows": '{"physical_to_logical_map": [[0, 1, 2, 3], [0, 1, 2]]}',
    "float_id": '{"physical_to_logical_map": [[0, 1, 2.0, 3]]}',
    "string_id": '{"physical_to_logical_map": [[0, 1, "2", 3]]}',
    "bool_id": '{"physical_to_logical_map": [[0, 1, true, 3]]}',
    "null_id": '{"physical_to_logical_map": [[0, 1, null, 3]]}',
    "negative_id": '{"physical_to_logical_map": [[0, 1, -1, 3]]}',
    "id_out_of_range": '{"physical_to_logical_map": [[0, 1, 2, 3]]}',
    "expert_without_replica": '{"physical_to_logical_map": [[0, 1, 3, 3]]}',
    "not_divisible": '{"physical_to_logical_map": [[0, 1, 2]]}',
    "huge_id_with_num_logical_experts": '{"physical_to_logical_map": [[0, 1, 2, 99999999999]]}',
    "huge_id": '{"physical_to_logical_map": [[0, 1, 2, 99999999999]]}',
    "empty_file": "",
    "empty_row": '{"physical_to_logical_map": [[]]}',
    "nan_id": '{"physical_to_logical_map": [[0, 1, NaN, 3]]}',
    "nested_too_deep": '{"physical_to_logical_map": ' + "[" * 100_000 + "]" * 100_000 + "}",
}
NUM_LOGICAL = {"id_out_of_range": 3, "huge_id_with_num_logical_experts": 4}


@pytest.mark.parametrize(
    "name",
    sorted(MALFORMED),
)
def test_malformed_files_name_the_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.json"
    content = MALFORMED[name]
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(moelb.InvalidArgumentError) as info:
        moelb.load_placement(path, ep_size=2, num_logical_experts=NUM_LOGICAL.get(name))
    assert str(path) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(moelb.InvalidArgumentError, match=r"nope\.json"):
        moelb.load_placement(path, ep_size=1)


def test_bad_cluster_shape_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "placement.json"
    moelb.save_placement(moelb.ExpertLocation.trivial(1, 4, 8, 2), path)
    with pytest.raises(moelb.InvalidArgumentError, match=r"placement\.json.*ep_size=3"):
        moelb.load_placement(path, ep_size=3)
    with pytest.raises(moelb.InvalidArgumentError, match=r"placement\.json.*expert 4 has no"):
        moelb.load_placement(path, ep_size=2, num_logical_experts=5)


def test_written_files_get_the_usual_mode(tmp_path) -> None:
    location = moelb.ExpertLocation.trivial(1, 4, 4, ep_size=1)
    path = tmp_path / "placement.json"
    moelb.save_placement(location, path)
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


# ---------------------------------------------------------------------------------------------
# Offline dispatch fractions beside the placement (ours): save_placement(..., fractions=),
# load_placement_fractions.


def window_fractions(location: moelb.ExpertLocation) -> np.ndarray:
    """balanced_fractions of a window's expected counts (summed over its passes)."""
    rng = np.random.default_rng(4)
    rates = rng.gamma(1.0, 40.0, (location.num_layers, 16))
    window = rng.poisson(rates, (50, location.num_layers, 16))  # [passes, L, E]
    return moelb.balanced_fractions(window.sum(axis=0), location)


def test_fractions_round_trip_beside_the_placement(tmp_path: Path) -> None:
    loc = sample_location()
    fractions = window_fractions(loc)
    assert (fractions[loc.logical_to_physical >= 0] % 1 != 0).any()  # not only 0 / 1
    path = tmp_path / "placement.json"
    moelb.save_placement(loc, path, fractions=fractions)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "placement.fractions.json",
        "placement.json",
    ]
    # SGLang passes every key of the placement file to init_by_mapping as a keyword argument:
    # the file keeps its one key.
    assert list(json.loads(path.read_text())) == ["physical_to_logical_map"]
    side = json.loads((tmp_path / "placement.fractions.json").read_text())
    assert sorted(side) == ["moelb_replica_fractions", "physical_to_logical_map"]
    assert side["physical_to_logical_map"] == loc.physical_to_logical.tolist()
    loaded = moelb.load_placement(path, 4, 2)
    back = moelb.load_placement_fractions(path, loaded)
    assert back is not None and back.dtype == np.float64
    np.testing.assert_array_equal(back, fractions)  # exactly: floats are written as repr
    # What an engine does with them: per-token picks without a collective.
    ids = np.random.default_rng(1).integers(0, 16, (50, 2)).astype(np.int32)
    out = moelb.dispatch_by_fractions(ids, loaded, 2, back[2], seed=3)
    np.testing.assert_array_equal(loaded.physical_to_logical[2][out], ids)


def test_saving_without_fractions_removes_stale_ones(tmp_path: Path) -> None:
    """Fractions of an earlier save describe another window: a save without fractions removes
    them, so they are never read back beside the new placement (even when its map is equal)."""
    loc = sample_location()
    path = tmp_path / "placement.json"
    moelb.save_placement(loc, path, fractions=window_fractions(loc))
    assert moelb.load_placement_fractions(path, loc) is not None
    moelb.save_placement(loc, path)
    assert moelb.load_placement_fractions(path, loc) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["placement.json"]


def test_no_fractions_file_gives_none(tmp_path: Path) -> None:
    path = tmp_path / "placement.json"
    moelb.save_placement(sample_location(), path)
    assert moelb.load_placement_fractions(path, sample_location()) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["placement.json"]


@pytest.mark.parametrize(
    ("name", "expected"),
    [("placement.json", "placement.fractions.json"), ("plan.JSON", "plan.fractions.json"),
     ("plan", "plan.fractions.json"), ("a.b.json", "a.b.fractions.json")],
)  # fmt: skip
def test_fractions_path(tmp_path: Path, name: str, expected: str) -> None:
    assert moelb.io.placement_fractions_path(tmp_path / name) == tmp_path / expected


def test_fractions_of_another_placement_are_refused(tmp_path: Path) -> None:
    loc = sample_location()
    path = tmp_path / "placement.json"
    moelb.save_placement(loc, path, fractions=window_fractions(loc))
    other = moelb.ExpertLocation.trivial(3, 16, 24, ep_size=4, num_nodes=2)
    # The map changes under the fractions file (a crash between the two writes, or another
    # tool rewriting placement.json): the fractions no longer belong to it.
    path.write_text(json.dumps({"physical_to_logical_map": other.physical_to_logical.tolist()}))
    with pytest.raises(moelb.InvalidArgumentError, match="written for another placement"):
        moelb.load_placement_fractions(path, moelb.load_placement(path, 4, 2))
    with pytest.raises(moelb.InvalidArgumentError, match="location must be an ExpertLocation"):
        moelb.load_placement_fractions(path, None)  # type: ignore[arg-type]


def bad_fractions(kind: str) -> tuple[np.ndarray, str]:
    loc = sample_location()
    fractions = window_fractions(loc)
    l2p = loc.logical_to_physical
    layer, expert = (int(i) for i in np.argwhere((l2p >= 0).sum(axis=2) == 1)[0])
    if kind == "shape":
        return fractions[:, :, :-1], r"fractions must be numbers of shape \[num_layers"
    if kind == "dtype":
        return fractions.astype(str), "fractions must be numbers of shape"
    if kind == "nan":
        fractions[layer, expert, 0] = np.nan
        return fractions, rf"fractions\[{layer}, {expert}\] = .* is not finite"
    if kind == "negative":
        fractions[layer, expert, :2] = [1.5, -0.5]
        return fractions, rf"fractions\[{layer}, {expert}\] = .* has a negative fraction"
    if kind == "padding":  # an expert with one replica and a share on its padding column
        fractions[layer, expert, :2] = [0.5, 0.5]
        return fractions, rf"fractions\[{layer}, {expert}\] = .* on a padding column"
    assert kind == "sum"
    fractions[layer, expert, 0] = 1 + 2e-6
    return fractions, rf"fractions\[{layer}, {expert}\] = .* does not sum to 1 \(within 1e-06\)"


@pytest.mark.parametrize("kind", ["shape", "dtype", "nan", "negative", "padding", "sum"])
def test_bad_fractions_are_refused_and_nothing_is_written(tmp_path: Path, kind: str) -> None:
    fractions, match = bad_fractions(kind)
    with pytest.raises(moelb.InvalidArgumentError, match=match):
        moelb.save_placement(sample_location(), tmp_path / "placement.json", fractions=fractions)
    assert list(tmp_path.iterdir()) == []


def test_fractions_within_the_tolerance_are_accepted(tmp_path: Path) -> None:
    loc = sample_location()
    fractions = window_fractions(loc)
    fractions[0, 0, 0] += 5e-7
    moelb.save_placement(loc, tmp_path / "p.json", fractions=fractions)
    back = moelb.load_placement_fractions(tmp_path / "p.json", loc)
    assert back is not None and back[0, 0, 0] == fractions[0, 0, 0]


MALFORMED_FRACTIONS = {
    "not_json": ("{moelb_replica_fractions: []}", "is not valid JSON"),
    "no_map": ('{"moelb_replica_fractions": []}', "no key 'physical_to_logical_map'"),
    "no_fractions": (None, "no key 'moelb_replica_fractions'"),
    "ragged": ([[[1.0]], [[0.5, 0.5]]], "moelb_replica_fractions is not an array"),
    "strings": ("strings", "moelb_replica_fractions must be numbers"),
    "booleans": ("booleans", "moelb_replica_fractions must be numbers"),
    "sum": ("sum", "does not sum to 1"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED_FRACTIONS))
def test_malformed_fractions_files_name_the_file(tmp_path: Path, name: str) -> None:
    loc = sample_location()
    path = tmp_path / "placement.json"
    moelb.save_placement(loc, path, fractions=window_fractions(loc))
    side = tmp_path / "placement.fractions.json"
    content, match = MALFORMED_FRACTIONS[name]
    if isinstance(content, str) and content.startswith("{"):
        side.write_text(content)
    else:
        data = json.loads(side.read_text())
        fractions = np.array(data["moelb_replica_fractions"])
        if content is None:
            del data["moelb_replica_fractions"]
        elif content == "strings":
            data["moelb_replica_fractions"] = fractions.astype(str).tolist()
        elif content == "booleans":
            data["moelb_replica_fractions"] = (fractions > 0).tolist()
        elif content == "sum":
            data["moelb_replica_fractions"] = (fractions * 1.01).tolist()
        else:
            data["moelb_replica_fractions"] = content
        side.write_text(json.dumps(data))
    with pytest.raises(moelb.InvalidArgumentError, match=match) as info:
        moelb.load_placement_fractions(path, loc)
    assert str(side) in str(info.value)
