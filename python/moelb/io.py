"""File formats. Placement files are SGLang's ``--init-expert-location`` JSON:
``{"physical_to_logical_map": [[...], ...]}`` ([num_layers, num_physical_experts] logical ids).
Every file is written to a temporary name in the target folder and renamed, so a failure never
leaves a partial file behind."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ._core import ExpertLocation, InvalidArgumentError

__all__ = [
    "atomic_write_bytes",
    "load_expert_distribution",
    "load_placement",
    "save_expert_distribution",
    "save_placement",
]

PLACEMENT_KEY = "physical_to_logical_map"
_MAX_EXPERT_ID = 2**31 - 1  # ids are int32


def _new_file_mode() -> int:
    """0666 & ~umask, the mode open() gives a new file. The umask is read from /proc (setting and
    restoring it with os.umask would race with other threads); 0644 where /proc is missing."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    return 0o644


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically (temporary file in the same folder, fsync, rename)."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InvalidArgumentError(f"path={str(path)!r}: folder {str(folder)!r} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        # mkstemp creates the file 0600; give it the mode a plain open() would.
        os.fchmod(fd, _new_file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def save_placement(location: ExpertLocation, path: str | os.PathLike[str]) -> None:
    """Writes ``location`` as SGLang's placement JSON (``--init-expert-location path``)."""
    if not isinstance(location, ExpertLocation):
        raise InvalidArgumentError(
            f"location must be an ExpertLocation, got {type(location).__name__}"
        )
    rows = location.physical_to_logical.tolist()
    text = "{" + f'"{PLACEMENT_KEY}": [\n'
    text += ",\n".join("  " + json.dumps(row, separators=(",", ":")) for row in rows)
    text += "\n]}\n"
    atomic_write_bytes(path, text.encode())


def _placement_array(obj: Any, source: str) -> np.ndarray:
    if not isinstance(obj, dict):
        raise InvalidArgumentError(
            f"{source}: expected a JSON object with key {PLACEMENT_KEY!r}, got {type(obj).__name__}"
        )
    if PLACEMENT_KEY not in obj:
        raise InvalidArgumentError(f"{source}: no key {PLACEMENT_KEY!r} (keys: {sorted(obj)!r})")
    rows = obj[PLACEMENT_KEY]
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) for r in rows):
        raise InvalidArgumentError(
            f"{source}: {PLACEMENT_KEY} must be a non-empty list of lists (one per layer)"
        )
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise InvalidArgumentError(
            f"{source}: {PLACEMENT_KEY} rows have different lengths {sorted(widths)!r}"
        )
    for layer, row in enumerate(rows):
        for slot, value in enumerate(row):
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidArgumentError(
                    f"{source}: {PLACEMENT_KEY}[{layer}][{slot}] = {value!r} is not an integer"
                )
            if not 0 <= value < _MAX_EXPERT_ID:
                raise InvalidArgumentError(
                    f"{source}: {PLACEMENT_KEY}[{layer}][{slot}] = {value} is not an expert id "
                    f"(expected 0 <= id < {_MAX_EXPERT_ID})"
                )
    return np.asarray(rows, dtype=np.int64)


def load_placement(
    path: str | os.PathLike[str],
    ep_size: int,
    num_nodes: int = 1,
    num_logical_experts: int | None = None,
) -> ExpertLocation:
    """Reads SGLang's placement JSON into an ``ExpertLocation``.

    num_logical_experts defaults to the largest id + 1; pass the model's value to catch a file
    in which the last experts have no replica."""
    source = f"placement file {str(path)!r}"
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise InvalidArgumentError(f"{source} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidArgumentError(f"{source} is not valid JSON: {e}") from None
    except RecursionError:
        raise InvalidArgumentError(f"{source} is nested too deeply to be a placement") from None
    array = _placement_array(obj, source)
    if num_logical_experts is None:
        num_logical_experts = int(array.max()) + 1 if array.size else 0
    try:
        return ExpertLocation(array, num_logical_experts, ep_size, num_nodes)
    except InvalidArgumentError as e:
        raise InvalidArgumentError(f"{source}: {e}") from None


# --------------------------------------------------------------------------------------------
# Expert distribution dumps (SGLang's expert_distribution_recorder_*.pt layouts).
#
# stat:               {"rank": int, "logical_count": int32 [T, L, E],
#                      "average_utilization_rate_over_window": float | None}
# per_pass/per_token: {"records": [{"forward_pass_id", "rank", "gatherer_key",
#                      "global_physical_count": int32 [L, P],
#                      per_token: "topk_ids_of_layer": int32 [L, tokens, K]}, ...],
#                      "last_physical_to_logical_map": int [L, P]}
# .pt uses torch.save / torch.load(weights_only=True); .npz and .json hold the same keys (records
# flattened into arrays in .npz). Loading never executes code from a file.

STAT_KEYS = ("rank", "logical_count", "average_utilization_rate_over_window")
DETAIL_KEYS = ("records", "last_physical_to_logical_map")
DUMP_SUFFIXES = (".pt", ".npz", ".json")


def _suffix(path: str | os.PathLike[str]) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in DUMP_SUFFIXES:
        raise InvalidArgumentError(
            f"path={str(path)!r}: unknown dump format {suffix!r}; use one of {DUMP_SUFFIXES}"
        )
    return suffix


def _import_torch(path: str | os.PathLike[str]) -> Any:
    try:
        import torch
    except ImportError:
        raise InvalidArgumentError(
            f"path={str(path)!r}: .pt files need PyTorch (pip install torch); "
            "use .npz or .json instead"
        ) from None
    return torch


def save_expert_distribution(
    dump: dict[str, Any], path: str | os.PathLike[str], mode: str = "stat"
) -> None:
    """Writes a recorder dump in SGLang's layout for ``mode`` (``stat`` keys, or ``records`` and
    ``last_physical_to_logical_map`` for ``per_pass`` / ``per_token``), atomically."""
    suffix = _suffix(path)
    detail = mode != "stat"
    rate = dump["average_utilization_rate_over_window"]
    if suffix == ".pt":
        torch = _import_torch(path)
        if detail:
            obj: Any = {
                "records": [
                    {
                        k: torch.from_numpy(np.ascontiguousarray(v))
                        if isinstance(v, np.ndarray)
                        else v
                        for k, v in r.items()
                    }
                    for r in dump["records"]
                ],
                "last_physical_to_logical_map": torch.from_numpy(
                    np.ascontiguousarray(dump["last_physical_to_logical_map"])
                ),
            }
        else:
            obj = {
                "rank": int(dump["rank"]),
                "logical_count": torch.from_numpy(np.ascontiguousarray(dump["logical_count"])),
                "average_utilization_rate_over_window": rate,
            }
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        atomic_write_bytes(path, buffer.getvalue())
    elif suffix == ".npz":
        arrays: dict[str, np.ndarray]
        if detail:
            records = dump["records"]
            arrays = {
                "forward_pass_id": np.array([r["forward_pass_id"] for r in records], np.int64),
                "record_rank": np.array([r["rank"] for r in records], np.int64),
                "global_physical_count": np.stack([r["global_physical_count"] for r in records]),
                "last_physical_to_logical_map": np.asarray(dump["last_physical_to_logical_map"]),
            }
            if records and "topk_ids_of_layer" in records[0]:
                arrays.update(_pack_token_ids([r["topk_ids_of_layer"] for r in records]))
        else:
            arrays = {
                "rank": np.array(int(dump["rank"]), np.int64),
                "logical_count": np.asarray(dump["logical_count"], np.int32),
                # NaN stands for None (a balancedness is never NaN).
                "average_utilization_rate_over_window": np.array(
                    np.nan if rate is None else rate, np.float64
                ),
            }
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        atomic_write_bytes(path, buffer.getvalue())
    else:
        if detail:
            obj = {
                "records": [
                    {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in r.items()}
                    for r in dump["records"]
                ],
                "last_physical_to_logical_map": np.asarray(
                    dump["last_physical_to_logical_map"]
                ).tolist(),
            }
        else:
            obj = {
                "rank": int(dump["rank"]),
                "logical_count": np.asarray(dump["logical_count"]).tolist(),
                "average_utilization_rate_over_window": rate,
            }
        atomic_write_bytes(path, json.dumps(obj, separators=(",", ":")).encode())


def _pack_token_ids(per_pass: list[np.ndarray]) -> dict[str, np.ndarray]:
    """[L, tokens_i, K_i] per pass -> one [L, sum tokens, max K] array (-1 padded) + offsets."""
    num_layers = per_pass[0].shape[0]
    top_k = max(a.shape[2] for a in per_pass)
    offsets = np.zeros(len(per_pass) + 1, np.int64)
    offsets[1:] = np.cumsum([a.shape[1] for a in per_pass])
    packed = np.full((num_layers, int(offsets[-1]), top_k), -1, np.int32)
    for i, a in enumerate(per_pass):
        packed[:, offsets[i] : offsets[i + 1], : a.shape[2]] = a
    return {"topk_ids_of_layer": packed, "token_offsets": offsets}


def _as_int_array(value: Any, source: str, key: str, ndim: int) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(f"{source}: {key} is not an array: {e}") from None
    if array.dtype.kind not in "iu" and not (array.size == 0 and array.dtype.kind == "f"):
        raise InvalidArgumentError(f"{source}: {key} must hold integers, got dtype {array.dtype}")
    if array.ndim != ndim:
        raise InvalidArgumentError(
            f"{source}: {key} must be {ndim}-D, got shape {tuple(array.shape)}"
        )
    if array.size and (array.min() < 0 or array.max() > np.iinfo(np.int32).max):
        raise InvalidArgumentError(f"{source}: {key} holds values outside [0, 2**31)")
    return array.astype(np.int32)


def _scalar(value: Any) -> Any:
    """A 0-d array or tensor as its Python value; anything else unchanged."""
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value.item() if value.ndim == 0 else value
    if isinstance(value, np.generic):
        return value.item()
    return value


def _int_field(value: Any, source: str, key: str) -> int:
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(f"{source}: {key} must be an integer, got {value!r}")
    return value


def _rate_field(value: Any, source: str) -> float | None:
    """average_utilization_rate_over_window: a number or None (NaN also means None)."""
    value = _scalar(value)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgumentError(
            f"{source}: average_utilization_rate_over_window must be a number or None, "
            f"got {value!r}"
        )
    return None if np.isnan(value) else float(value)


def _read_file(path: Path) -> Any:
    source = f"dump file {str(path)!r}"
    suffix = _suffix(path)
    if not path.is_file():
        raise InvalidArgumentError(f"{source} does not exist")
    if suffix == ".pt":
        torch = _import_torch(path)
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # any unreadable or unsafe content
            raise InvalidArgumentError(f"{source} is not a readable PyTorch file: {e}") from None
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                obj: dict[str, Any] = {k: data[k] for k in data.files}
        except Exception as e:  # truncated zip, pickled objects, ...
            raise InvalidArgumentError(f"{source} is not a readable .npz file: {e}") from None
        if "records" not in obj and "forward_pass_id" in obj:
            obj = _unpack_npz_records(obj, source)
        return obj
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidArgumentError(f"{source} is not valid JSON: {e}") from None
    except RecursionError:
        raise InvalidArgumentError(f"{source} is nested too deeply") from None


def _unpack_npz_records(obj: dict[str, Any], source: str) -> dict[str, Any]:
    needed = (
        "forward_pass_id",
        "record_rank",
        "global_physical_count",
        "last_physical_to_logical_map",
    )
    missing = [k for k in needed if k not in obj]
    if missing:
        raise InvalidArgumentError(f"{source}: missing keys {missing}")
    ids, ranks, counts = obj["forward_pass_id"], obj["record_rank"], obj["global_physical_count"]
    if not (ids.ndim == ranks.ndim == 1 and counts.ndim == 3):
        raise InvalidArgumentError(
            f"{source}: forward_pass_id and record_rank must be 1-D and global_physical_count 3-D"
        )
    if not (len(ids) == len(ranks) == len(counts)):
        raise InvalidArgumentError(f"{source}: record arrays have different lengths")
    records = [
        {"forward_pass_id": ids[i], "rank": ranks[i], "global_physical_count": counts[i]}
        for i in range(len(ids))
    ]
    return {"records": records, "last_physical_to_logical_map": obj["last_physical_to_logical_map"]}


def _stat_from(obj: Any, source: str) -> dict[str, Any]:
    missing = [k for k in ("rank", "logical_count") if k not in obj]
    if missing:
        raise InvalidArgumentError(f"{source}: missing keys {missing} (keys: {sorted(obj)!r})")
    rank = _int_field(obj["rank"], source, "rank")
    count = obj["logical_count"]
    try:  # SGLang accepts an [L, E] count as one step
        logical = _as_int_array(count, source, "logical_count", 2)[None]
    except InvalidArgumentError:
        logical = _as_int_array(count, source, "logical_count", 3)
    rate = _rate_field(obj.get("average_utilization_rate_over_window"), source)
    return {"rank": rank, "logical_count": logical, "average_utilization_rate_over_window": rate}


def _records_from(obj: Any, source: str) -> tuple[list[tuple[int, int, np.ndarray]], np.ndarray]:
    records = obj["records"]
    if "last_physical_to_logical_map" not in obj:
        raise InvalidArgumentError(f"{source}: missing key 'last_physical_to_logical_map'")
    mapping = _as_int_array(
        obj["last_physical_to_logical_map"], source, "last_physical_to_logical_map", 2
    )
    if not isinstance(records, list):
        raise InvalidArgumentError(f"{source}: records must be a list")
    out = []
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not {
            "forward_pass_id",
            "rank",
            "global_physical_count",
        } <= set(r):
            raise InvalidArgumentError(
                f"{source}: records[{i}] needs forward_pass_id, rank and global_physical_count"
            )
        counts = _as_int_array(
            r["global_physical_count"], source, f"records[{i}].global_physical_count", 2
        )
        if counts.shape != mapping.shape:
            raise InvalidArgumentError(
                f"{source}: records[{i}].global_physical_count has shape {counts.shape} but "
                f"last_physical_to_logical_map has {mapping.shape}"
            )
        out.append(
            (
                _int_field(r["forward_pass_id"], source, f"records[{i}].forward_pass_id"),
                _int_field(r["rank"], source, f"records[{i}].rank"),
                counts,
            )
        )
    return out, mapping


def _logical_from_records(
    records: list[tuple[int, int, np.ndarray]],
    mapping: np.ndarray,
    num_logical_experts: int | None,
    source: str,
) -> np.ndarray:
    """SGLang's read_mode_per_pass: sum the ranks' counts of each pass (ids in ascending order),
    then convert to logical counts with the map."""
    seen: dict[tuple[int, int], np.ndarray] = {}
    for pass_id, rank, counts in records:
        if (pass_id, rank) in seen:
            raise InvalidArgumentError(
                f"{source}: forward_pass_id={pass_id} of rank {rank} appears twice"
            )
        seen[(pass_id, rank)] = counts
    pass_ids = sorted({p for p, _ in seen})
    num_layers, num_physical = mapping.shape
    physical = np.zeros((len(pass_ids), num_layers, num_physical), np.int64)
    index = {p: i for i, p in enumerate(pass_ids)}
    for (pass_id, _), counts in seen.items():
        physical[index[pass_id]] += counts
    if mapping.size == 0:
        raise InvalidArgumentError(
            f"{source}: last_physical_to_logical_map has shape {mapping.shape}; a placement "
            "needs at least one layer and one slot"
        )
    num_experts = int(mapping.max()) + 1 if num_logical_experts is None else num_logical_experts
    if mapping.max() >= num_experts:
        raise InvalidArgumentError(
            f"{source}: last_physical_to_logical_map holds expert {int(mapping.max())} but "
            f"num_logical_experts={num_experts}"
        )
    logical = np.zeros((len(pass_ids), num_layers, num_experts), np.int64)
    for layer in range(num_layers):
        np.add.at(logical[:, layer], (slice(None), mapping[layer]), physical[:, layer])
    if logical.size and logical.max() > np.iinfo(np.int32).max:
        raise InvalidArgumentError(
            f"{source}: a logical count of {int(logical.max())} (summed over ranks and replicas) "
            "does not fit the int32 logical_count"
        )
    return logical.astype(np.int32)


def load_expert_distribution(
    path: str | os.PathLike[str], num_logical_experts: int | None = None
) -> dict[str, Any]:
    """Reads expert distribution dumps into SGLang's stat form
    ``{"rank", "logical_count" int32 [T, L, E], "average_utilization_rate_over_window"}``.

    ``path`` is a ``.pt`` (read with ``weights_only=True``), ``.npz`` or ``.json`` dump in the
    stat or per-pass layout, or a folder of them: stat dumps are concatenated in file-name order
    (SGLang's read_mode_stat; they must come from rank 0), per-pass dumps of several ranks are
    summed pass by pass (read_mode_per_pass). For per-pass dumps, ``num_logical_experts``
    defaults to the largest id in the map + 1.
    """
    root = Path(path)
    if root.is_dir():
        files = sorted(p for p in root.iterdir() if p.suffix.lower() in DUMP_SUFFIXES)
        if not files:
            raise InvalidArgumentError(f"folder {str(root)!r} holds no {DUMP_SUFFIXES} dump")
    else:
        files = [root]
    stats: list[dict[str, Any]] = []
    records: list[tuple[int, int, np.ndarray]] = []
    mapping: np.ndarray | None = None
    for file in files:
        source = f"dump file {str(file)!r}"
        obj = _read_file(file)
        if not isinstance(obj, dict):
            raise InvalidArgumentError(f"{source}: expected a dict, got {type(obj).__name__}")
        if "records" in obj:
            found, file_map = _records_from(obj, source)
            if mapping is not None and not np.array_equal(mapping, file_map):
                raise InvalidArgumentError(f"{source}: a different physical_to_logical map")
            mapping = file_map
            records.extend(found)
        elif "logical_count" in obj:
            stat = _stat_from(obj, source)
            if len(files) > 1 and stat["rank"] != 0:
                raise InvalidArgumentError(
                    f"{source}: rank={stat['rank']}; stat dumps are written by rank 0 only"
                )
            stats.append(stat)
        else:
            raise InvalidArgumentError(
                f"{source}: not an expert distribution dump (keys: {sorted(obj)!r}; expected "
                f"{list(STAT_KEYS)} or {list(DETAIL_KEYS)})"
            )
    if stats and mapping is not None:
        raise InvalidArgumentError(f"{str(path)!r} mixes stat and per-pass dumps")
    if mapping is not None:  # per-pass dumps, possibly with no records: [0, L, E] counts
        logical = _logical_from_records(records, mapping, num_logical_experts, str(path))
        return {"rank": 0, "logical_count": logical, "average_utilization_rate_over_window": None}
    shapes = {s["logical_count"].shape[1:] for s in stats}
    if len(shapes) > 1:
        raise InvalidArgumentError(f"{str(path)!r}: dumps of different shapes {sorted(shapes)}")
    logical = np.concatenate([s["logical_count"] for s in stats], axis=0)
    if num_logical_experts is not None and logical.shape[2] != num_logical_experts:
        raise InvalidArgumentError(
            f"{str(path)!r}: logical_count has {logical.shape[2]} experts but "
            f"num_logical_experts={num_logical_experts}"
        )
    rate = stats[-1]["average_utilization_rate_over_window"]
    return {
        "rank": stats[0]["rank"],
        "logical_count": logical,
        "average_utilization_rate_over_window": rate,
    }
