"""File formats. Placement files are SGLang's ``--init-expert-location`` JSON:
``{"physical_to_logical_map": [[...], ...]}`` ([num_layers, num_physical_experts] logical ids).
Every file is written to a temporary name in the target folder and renamed, so a failure never
leaves a partial file behind."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ._core import ExpertLocation, InvalidArgumentError

__all__ = ["atomic_write_bytes", "load_placement", "save_placement"]

PLACEMENT_KEY = "physical_to_logical_map"
_MAX_EXPERT_ID = 2**31 - 1  # ids are int32


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically (temporary file in the same folder, fsync, rename)."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InvalidArgumentError(f"path={str(path)!r}: folder {str(folder)!r} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
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
