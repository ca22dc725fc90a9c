"""File formats. Placement files are SGLang's ``--init-expert-location`` JSON:
``{"physical_to_logical_map": [[...], ...]}`` ([num_layers, num_physical_experts] logical ids).
Per-replica dispatch fractions (ours) go to a file of their own beside it (``save_placement(...,
fractions=)``). Every file is written to a temporary name in the target folder and renamed, so a
failure never leaves a partial file behind."""

from __future__ import annotations

import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ._core import ExpertLocation, InvalidArgumentError

__all__ = [
    "atomic_write_bytes",
    "load_expert_distribution",
    "load_placement",
    "load_placement_fractions",
    "placement_fractions_path",
    "save_expert_distribution",
    "save_placement",
]

PLACEMENT_KEY = "physical_to_logical_map"
#: moelb's key for per-replica dispatch fractions [L, E, X], in the file beside a placement.
FRACTIONS_KEY = "moelb_replica_fractions"
#: How far a fractions row of an expert may sum from 1.
FRACTIONS_SUM_TOLERANCE = 1e-6
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


def save_placement(
    location: ExpertLocation, path: str | os.PathLike[str], *, fractions: Any = None
) -> None:
    """Writes ``location`` as SGLang's placement JSON (``--init-expert-location path``).

    fractions: optional per-replica dispatch fractions [L, E, X] (X = ``location.max_replicas``,
    columns in the order of ``location.logical_to_physical``, padding 0), typically
    ``moelb.balanced_fractions(expected_counts, location)`` of a window's counts: the offline
    form of moelb's balanced dispatch, no per-step collective (safe inside CUDA graphs). Each
    row must be finite, >= 0, 0 on padding and sum to 1 (within 1e-6). They are written to
    ``placement_fractions_path(path)`` (``placement.json`` -> ``placement.fractions.json``) as
    ``{"moelb_replica_fractions": [...], "physical_to_logical_map": [...]}``, the map repeated so
    that a reader can tell which placement they belong to; read them back with
    ``load_placement_fractions``. Not in the placement file itself: SGLang passes every key of
    that file to ``ExpertLocationMetadata.init_by_mapping`` as a keyword argument, so an extra
    key would stop it from starting. The fractions file is written first, then the placement,
    each atomically; an error leaves both as they were (a failure between the two leaves a
    fractions file whose map no longer matches, which ``load_placement_fractions`` refuses).
    Without ``fractions``, a fractions file left beside ``path`` by an earlier save is removed
    (it would describe another window's counts).
    """
    if not isinstance(location, ExpertLocation):
        raise InvalidArgumentError(
            f"location must be an ExpertLocation, got {type(location).__name__}"
        )
    map_text = _map_json(location)
    if fractions is not None:
        shares = _checked_fractions(np.asarray(fractions), location, "fractions")
        layers = ",\n".join(
            "  " + json.dumps(layer.tolist(), separators=(",", ":")) for layer in shares
        )
        text = "{" + f'"{FRACTIONS_KEY}": [\n{layers}\n],\n"{PLACEMENT_KEY}": {map_text}' + "}\n"
        atomic_write_bytes(placement_fractions_path(path), text.encode())
    atomic_write_bytes(path, ("{" + f'"{PLACEMENT_KEY}": {map_text}' + "}\n").encode())
    if fractions is None:
        # Fractions of an earlier save would describe another window: never leave them beside
        # a placement written without any.
        placement_fractions_path(path).unlink(missing_ok=True)


def _map_json(location: ExpertLocation) -> str:
    """The map as a JSON list, one layer per line."""
    rows = location.physical_to_logical.tolist()
    return "[\n" + ",\n".join("  " + json.dumps(r, separators=(",", ":")) for r in rows) + "\n]"


def placement_fractions_path(path: str | os.PathLike[str]) -> Path:
    """The file that holds the dispatch fractions of placement file ``path``:
    ``dir/name.json`` -> ``dir/name.fractions.json`` (any other name gets ``.fractions.json``
    appended)."""
    path = Path(path)
    stem = path.stem if path.suffix.lower() == ".json" else path.name
    return path.with_name(stem + ".fractions.json")


def _checked_fractions(
    shares: np.ndarray, location: ExpertLocation, source: str
) -> npt.NDArray[np.float64]:
    """``shares`` as float64 [L, E, X] once they are fractions of ``location``'s replicas, else
    an InvalidArgumentError naming ``source`` and the first offending (layer, expert)."""
    l2p = location.logical_to_physical
    if shares.dtype.kind not in "iuf" or shares.shape != l2p.shape:
        raise InvalidArgumentError(
            f"{source} must be numbers of shape [num_layers, num_experts, max_replicas] = "
            f"{l2p.shape} (the order of location.logical_to_physical), got {shares.dtype} "
            f"of shape {shares.shape}"
        )
    values = shares.astype(np.float64)
    problems = (
        (~np.isfinite(values).all(axis=2), "is not finite"),
        ((values < 0).any(axis=2), "has a negative fraction"),
        (((values > 0) & (l2p < 0)).any(axis=2), "has a fraction on a padding column"),
        (
            np.abs(values.sum(axis=2) - 1.0) > FRACTIONS_SUM_TOLERANCE,
            f"does not sum to 1 (within {FRACTIONS_SUM_TOLERANCE})",
        ),
    )
    for bad, what in problems:
        if bad.any():
            layer, expert = (int(i) for i in np.argwhere(bad)[0])
            raise InvalidArgumentError(
                f"{source}[{layer}, {expert}] = {values[layer, expert].tolist()} {what}: each "
                "expert's row is its shares over its replicas"
            )
    return values


def load_placement_fractions(
    path: str | os.PathLike[str], location: ExpertLocation
) -> npt.NDArray[np.float64] | None:
    """The per-replica dispatch fractions [L, E, X] float64 that ``save_placement(location,
    path, fractions=)`` wrote beside placement file ``path`` (in
    ``placement_fractions_path(path)``), or None when there is no such file.

    location: the placement they are for (``load_placement(path, ...)``); the map stored with
    the fractions must equal its ``physical_to_logical`` (a fractions file left from another
    placement is refused), and the fractions are checked like ``save_placement``'s. Row
    ``[layer]`` is what ``moelb.dispatch_by_fractions(topk_ids, location, layer, ...)`` takes.
    """
    if not isinstance(location, ExpertLocation):
        raise InvalidArgumentError(
            f"location must be an ExpertLocation, got {type(location).__name__}"
        )
    side = placement_fractions_path(path)
    source = f"fractions file {str(side)!r}"
    try:
        with open(side, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidArgumentError(f"{source} is not valid JSON: {e}") from None
    except RecursionError:
        raise InvalidArgumentError(f"{source} is nested too deeply") from None
    array = _placement_array(obj, source)
    if FRACTIONS_KEY not in obj:
        raise InvalidArgumentError(f"{source}: no key {FRACTIONS_KEY!r} (keys: {sorted(obj)!r})")
    p2l = location.physical_to_logical
    if array.shape != p2l.shape or not np.array_equal(array, p2l):
        raise InvalidArgumentError(
            f"{source} was written for another placement: its {PLACEMENT_KEY} differs from "
            "location's (save the fractions again with the placement they were computed for)"
        )
    try:
        shares = np.array(obj[FRACTIONS_KEY])
    except ValueError as e:  # ragged lists
        raise InvalidArgumentError(f"{source}: {FRACTIONS_KEY} is not an array: {e}") from None
    return _checked_fractions(shares, location, f"{source}: {FRACTIONS_KEY}")


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
    # moelb's own file (``moelb rebalance --format json``) also names its cluster: a placement
    # planned for other ranks or nodes is refused, not read onto these.
    for key, given in (("ep_size", ep_size), ("num_nodes", num_nodes)):
        stored = obj.get(key) if isinstance(obj, dict) else None
        if stored is not None and stored != given:
            raise InvalidArgumentError(
                f"{source} was planned for {key}={stored!r}, not the {key}={given} given"
            )
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
#                      per_token: "topk_ids_of_layer": int32 [L, tokens, K],
#                      moelb, only for a pass recorded before a set_location:
#                      "physical_to_logical_map": int32 [L, P]}, ...],
#                      "last_physical_to_logical_map": int [L, P]}
# .pt uses torch.save / torch.load(weights_only=True); .npz and .json hold the same keys (records
# flattened into arrays in .npz). Loading never executes code from a file.
#
# A record's own physical_to_logical_map (the placement its pass was recorded with, when that is
# not the last one) is moelb's addition: SGLang writes none because its buffer converts every pass
# with the map current at dump time. moelb's loader converts each such record with its own map, so
# a window that spans a rebalance reloads to exactly what dump() returned. SGLang's
# read_mode_per_pass ignores the extra key and converts every record with
# last_physical_to_logical_map, as SGLang itself does; dump before set_location to give it files
# whose passes all share one placement.

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


_INT32_MAX = int(np.iinfo(np.int32).max)
# Arrays a dump may hold, with the smallest value each may take (-1 marks an unused id).
_RECORD_ARRAYS = {"global_physical_count": 0, "topk_ids_of_layer": -1, PLACEMENT_KEY: 0}


def _int32_field(value: Any, key: str, low: int = 0) -> np.ndarray:
    """``value`` as an int32 array holding exactly the same numbers, or an InvalidArgumentError
    naming ``key`` and the first value that is not an integer in [low, 2**31 - 1] (checked
    before any narrowing: 3e9 never wraps, 1.7 is never truncated)."""
    if hasattr(value, "detach"):  # a torch tensor
        tensor = value.detach().cpu()
        try:
            value = tensor.numpy()
        except TypeError:  # bfloat16 & co.: NumPy has no such dtype; float32 holds them exactly
            if not tensor.is_floating_point():
                raise InvalidArgumentError(f"{key} has dtype {tensor.dtype}, not counts") from None
            value = tensor.float().numpy()
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(f"{key} is not an array: {e}") from None
    kind = array.dtype.kind
    if kind not in "iuf" or (kind == "f" and array.size and not np.isfinite(array).all()):
        if kind == "f":
            bad = array[~np.isfinite(array)].flat[0].item()
            raise InvalidArgumentError(f"{key} holds {bad!r}, which is not an integer count")
        raise InvalidArgumentError(f"{key} must hold integers, got dtype {array.dtype}")
    if kind == "f" and array.size:
        fractional = array != np.floor(array)
        if fractional.any():
            where = tuple(int(i) for i in np.argwhere(fractional)[0])
            raise InvalidArgumentError(
                f"{key}{list(where)} = {array[where].item()!r} is not an integer; counts and "
                "ids are stored as int32 and are never rounded"
            )
    if array.size:
        # Compared in float64 / the integers themselves: in float32, 2**31 - 1 rounds to 2**31,
        # and a count of 2**31 would pass and wrap.
        wide = array.astype(np.float64) if kind == "f" else array
        outside = (wide < low) | (wide > _INT32_MAX)
        if outside.any():
            where = tuple(int(i) for i in np.argwhere(outside)[0])
            value = array[where].item()
            raise InvalidArgumentError(
                f"{key}{list(where)} = {value!r} is outside [{low}, 2**31 - 1]: the dump stores "
                "int32 (SGLang's layout) and never writes a value different from the one given"
            )
    return np.ascontiguousarray(array, dtype=np.int32)


#: The keys every record of a per_pass / per_token dump has (SGLang's layout).
_RECORD_KEYS = ("forward_pass_id", "rank", "global_physical_count")


def _checked_records(
    dump: dict[str, Any],
) -> tuple[list[dict[str, Any]], np.ndarray, list[np.ndarray], np.ndarray]:
    """The records with their arrays checked (int32), the last map, the distinct earlier
    placements and, per record, the index of its placement there (-1: the last map)."""
    if "records" not in dump or "last_physical_to_logical_map" not in dump:
        raise InvalidArgumentError(
            "dump must hold 'records' and 'last_physical_to_logical_map' for a per_pass or "
            f"per_token file (keys: {sorted(dump)!r})"
        )
    last = _int32_field(dump["last_physical_to_logical_map"], "last_physical_to_logical_map")
    records: list[dict[str, Any]] = []
    placements: list[np.ndarray] = []
    placement_of: dict[int, int] = {}  # id() of a given map -> index in placements
    index = np.full(len(dump["records"]), -1, np.int64)
    for i, r in enumerate(dump["records"]):
        record = dict(r)
        missing = [key for key in _RECORD_KEYS if key not in record]
        if missing:
            raise InvalidArgumentError(
                f"dump: records[{i}] has no {missing} (keys: {sorted(record)!r})"
            )
        for key in ("forward_pass_id", "rank"):
            if key in record:  # stored as int64: an integer in range, never truncated
                value = _int_field(record[key], "dump", f"records[{i}].{key}")
                if not -(2**63) <= value < 2**63:
                    raise InvalidArgumentError(
                        f"dump: records[{i}].{key} = {value} does not fit in int64"
                    )
                record[key] = value
        for key, low in _RECORD_ARRAYS.items():
            if key in record:
                record[key] = _int32_field(record[key], f"records[{i}].{key}", low)
        if PLACEMENT_KEY in record:
            given = id(r[PLACEMENT_KEY])
            if given not in placement_of:
                match = [
                    j for j, p in enumerate(placements) if np.array_equal(p, record[PLACEMENT_KEY])
                ]
                placement_of[given] = match[0] if match else len(placements)
                if not match:
                    placements.append(record[PLACEMENT_KEY])
            index[i] = placement_of[given]
            record[PLACEMENT_KEY] = placements[index[i]]
        records.append(record)
    return records, last, placements, index


def save_expert_distribution(
    dump: dict[str, Any], path: str | os.PathLike[str], mode: str = "stat"
) -> None:
    """Writes a recorder dump in SGLang's layout for ``mode`` (``stat`` keys, or ``records`` and
    ``last_physical_to_logical_map`` for ``per_pass`` / ``per_token``), atomically.

    Counts and ids are stored as int32 (SGLang's layout) in every format and are checked first:
    a value that is not an integer in int32 range (a count of 3e9, a float count 1.7) raises
    ``InvalidArgumentError`` naming the key and the value, and nothing is written. A record of a
    pass recorded with an earlier placement keeps that placement (its ``physical_to_logical_map``),
    so the file reloads to exactly the counts ``dump()`` returned."""
    suffix = _suffix(path)
    checked = _checked_dump(dump, detail=mode != "stat")
    if suffix == ".pt":
        data = _encode_pt(checked, path)
    elif suffix == ".npz":
        data = _encode_npz(checked)
    else:
        data = _encode_json(checked)
    atomic_write_bytes(path, data)


@dataclass
class _StatDump:
    """A ``stat`` dump to write, checked."""

    rank: int
    logical_count: np.ndarray
    rate: float | None


@dataclass
class _RecordsDump:
    """A ``per_pass`` / ``per_token`` dump to write, checked: records and their placements."""

    records: list[dict[str, Any]]
    last: np.ndarray
    placements: list[np.ndarray]
    placement_index: np.ndarray


def _checked_dump(dump: dict[str, Any], detail: bool) -> _StatDump | _RecordsDump:
    # A number or None (SGLang's per_pass dicts have no such key); NaN is stored as None.
    rate = _rate_field(dump.get("average_utilization_rate_over_window"), "dump")
    if detail:
        return _RecordsDump(*_checked_records(dump))
    missing = [key for key in ("rank", "logical_count") if key not in dump]
    if missing:
        raise InvalidArgumentError(
            f"dump has no {missing} for a stat file (keys: {sorted(dump)!r})"
        )
    logical_count = _int32_field(dump["logical_count"], "logical_count")
    return _StatDump(_int_field(dump["rank"], "dump", "rank"), logical_count, rate)


def _encode_pt(d: _StatDump | _RecordsDump, path: str | os.PathLike[str]) -> bytes:
    torch = _import_torch(path)
    obj: Any
    if isinstance(d, _RecordsDump):
        # Records of one placement share one tensor, which torch.save stores once.
        maps = [torch.from_numpy(p) for p in d.placements]
        obj = {
            "records": [
                {
                    k: maps[d.placement_index[i]]
                    if k == PLACEMENT_KEY
                    else torch.from_numpy(v)
                    if isinstance(v, np.ndarray)
                    else v
                    for k, v in r.items()
                }
                for i, r in enumerate(d.records)
            ],
            "last_physical_to_logical_map": torch.from_numpy(d.last),
        }
    else:
        obj = {
            "rank": d.rank,
            "logical_count": torch.from_numpy(d.logical_count),
            "average_utilization_rate_over_window": d.rate,
        }
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _encode_npz(d: _StatDump | _RecordsDump) -> bytes:
    arrays: dict[str, np.ndarray]
    if isinstance(d, _RecordsDump):
        records = d.records
        arrays = {
            "forward_pass_id": np.array([r["forward_pass_id"] for r in records], np.int64),
            "record_rank": np.array([r["rank"] for r in records], np.int64),
            "global_physical_count": np.stack([r["global_physical_count"] for r in records])
            if records
            else np.zeros((0, *d.last.shape), np.int32),
            "last_physical_to_logical_map": d.last,
        }
        if records and "topk_ids_of_layer" in records[0]:
            arrays.update(_pack_token_ids([r["topk_ids_of_layer"] for r in records]))
        if d.placements:
            arrays["record_placement"] = d.placement_index
            arrays["placements"] = np.stack(d.placements)
    else:
        arrays = {
            "rank": np.array(d.rank, np.int64),
            "logical_count": d.logical_count,
            # NaN stands for None (a balancedness is never NaN).
            "average_utilization_rate_over_window": np.array(
                np.nan if d.rate is None else d.rate, np.float64
            ),
        }
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _encode_json(d: _StatDump | _RecordsDump) -> bytes:
    obj: Any
    if isinstance(d, _RecordsDump):
        obj = {
            "records": [
                {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in r.items()}
                for r in d.records
            ],
            "last_physical_to_logical_map": d.last.tolist(),
        }
    else:
        obj = {
            "rank": d.rank,
            "logical_count": d.logical_count.tolist(),
            "average_utilization_rate_over_window": d.rate,
        }
    return json.dumps(obj, separators=(",", ":")).encode()


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
    if "record_placement" in obj or "placements" in obj:
        if not ("record_placement" in obj and "placements" in obj):
            raise InvalidArgumentError(f"{source}: record_placement and placements go together")
        index, placements = obj["record_placement"], obj["placements"]
        if index.shape != ids.shape or index.dtype.kind not in "iu" or placements.ndim != 3:
            raise InvalidArgumentError(
                f"{source}: record_placement must be {ids.shape} integers and placements 3-D"
            )
        if index.size and (index.min() < -1 or index.max() >= len(placements)):
            raise InvalidArgumentError(
                f"{source}: record_placement holds an index outside [-1, {len(placements)})"
            )
        for record, j in zip(records, index.tolist(), strict=True):
            if j >= 0:
                record[PLACEMENT_KEY] = placements[j]
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


Record = tuple[int, int, np.ndarray, np.ndarray]  # pass id, rank, counts [L, P], map [L, P]


def _records_from(obj: Any, source: str) -> tuple[list[Record], np.ndarray]:
    records = obj["records"]
    if "last_physical_to_logical_map" not in obj:
        raise InvalidArgumentError(f"{source}: missing key 'last_physical_to_logical_map'")
    mapping = _as_int_array(
        obj["last_physical_to_logical_map"], source, "last_physical_to_logical_map", 2
    )
    if not isinstance(records, list):
        raise InvalidArgumentError(f"{source}: records must be a list")
    out = []
    distinct = {mapping.tobytes(): mapping}
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
        own = mapping
        if PLACEMENT_KEY in r:  # moelb: the pass was recorded with an earlier placement
            own = _as_int_array(r[PLACEMENT_KEY], source, f"records[{i}].{PLACEMENT_KEY}", 2)
            if own.shape != mapping.shape:
                raise InvalidArgumentError(
                    f"{source}: records[{i}].{PLACEMENT_KEY} has shape {own.shape} but "
                    f"last_physical_to_logical_map has {mapping.shape}"
                )
            own = distinct.setdefault(own.tobytes(), own)  # one array per placement
        out.append(
            (
                _int_field(r["forward_pass_id"], source, f"records[{i}].forward_pass_id"),
                _int_field(r["rank"], source, f"records[{i}].rank"),
                counts,
                own,
            )
        )
    return out, mapping


def _logical_from_records(
    records: list[Record],
    mapping: np.ndarray,
    num_logical_experts: int | None,
    source: str,
) -> np.ndarray:
    """SGLang's read_mode_per_pass: sum the ranks' counts of each pass (ids in ascending order),
    converted to logical counts with the map (a record's own map where it carries one, else
    last_physical_to_logical_map)."""
    seen: set[tuple[int, int]] = set()
    for pass_id, rank, _, _ in records:
        if (pass_id, rank) in seen:
            raise InvalidArgumentError(
                f"{source}: forward_pass_id={pass_id} of rank {rank} appears twice"
            )
        seen.add((pass_id, rank))
    pass_ids = sorted({p for p, _ in seen})
    num_layers, num_physical = mapping.shape
    if mapping.size == 0:
        raise InvalidArgumentError(
            f"{source}: last_physical_to_logical_map has shape {mapping.shape}; a placement "
            "needs at least one layer and one slot"
        )
    # One entry per distinct placement (files of a folder hold equal but separate arrays).
    content: dict[int, bytes] = {}
    maps: dict[bytes, np.ndarray] = {}
    for own in [mapping] + [r[3] for r in records]:
        if id(own) not in content:
            content[id(own)] = own.tobytes()
            maps.setdefault(content[id(own)], own)
    largest = max(int(m.max()) for m in maps.values())
    num_experts = largest + 1 if num_logical_experts is None else num_logical_experts
    if largest >= num_experts:
        raise InvalidArgumentError(
            f"{source}: a physical_to_logical map holds expert {largest} but "
            f"num_logical_experts={num_experts}"
        )
    # Records that share a map are summed in physical space, then converted once.
    index = {p: i for i, p in enumerate(pass_ids)}
    physical: dict[bytes, np.ndarray] = {}
    for pass_id, _, counts, own in records:
        key = content[id(own)]
        if key not in physical:
            physical[key] = np.zeros((len(pass_ids), num_layers, num_physical), np.int64)
        physical[key][index[pass_id]] += counts
    logical = np.zeros((len(pass_ids), num_layers, num_experts), np.int64)
    for key, counts in physical.items():
        for layer in range(num_layers):
            np.add.at(logical[:, layer], (slice(None), maps[key][layer]), counts[:, layer])
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
    records: list[Record] = []
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
