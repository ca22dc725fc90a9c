"""Placement files for the engines beyond SGLang's placement map (``moelb.save_placement``):
SGLang's ``logical_count`` file, TensorRT-LLM's MoE load balancer YAML and moelb's own placement
JSON (``reference/integrations.md``). Each is written to a temporary name in the target folder and
renamed (``moelb.io.atomic_write_bytes``): a failure never leaves a partial file.

- ``save_logical_count(counts, path)``: ``{"logical_count": [L][E] or [T][L][E]}``, what SGLang's
  ``--init-expert-location`` hands to ``init_by_eplb``: SGLang plans the placement at start-up
  with its ``--eplb-algorithm`` (``auto``: DeepSeek's; ``moelb`` with
  ``moelb.integrations.sglang`` installed) and builds one coordinated static dispatch table from
  it (the runtime table, ``reference/dispatch.md`` sections 2-3).
- ``save_trtllm_load_balancer(location, path, layers=None)``: the file ``moe_config:
  load_balancer:`` names: ``num_slots``, ``layer_updates_per_iter`` (0: static) and
  ``initial_global_assignments`` ``{layer index: [expert of each slot]}``, slots in rank order,
  ``num_slots / ep_size`` per rank (moelb's layout).
- ``save_moelb_placement(plan, path)``: ours, the map with its topology and the plan's
  statistics; ``moelb.load_placement`` and ``moelb rebalance --previous`` read it (SGLang does
  not: it passes every key of a placement file to ``init_by_mapping``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ._core import ExpertLocation, InvalidArgumentError, __version__
from .eplb import Plan
from .io import PLACEMENT_KEY, atomic_write_bytes

__all__ = [
    "LOGICAL_COUNT_KEY",
    "MOELB_PLACEMENT_FORMAT",
    "save_logical_count",
    "save_moelb_placement",
    "save_trtllm_load_balancer",
]

#: The key of SGLang's ``logical_count`` file (``compute_initial_expert_location_metadata``).
LOGICAL_COUNT_KEY = "logical_count"
#: The ``format`` field of moelb's placement JSON.
MOELB_PLACEMENT_FORMAT = "moelb-placement/1"


def _json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, inf: no JSON value) replaced by None."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _rows(array: np.ndarray) -> str:
    """A JSON list of the array's last-axis rows, one per line."""
    flat = array.reshape(-1, array.shape[-1])
    return ",\n".join("  " + json.dumps(r, separators=(",", ":")) for r in flat.tolist())


def save_logical_count(counts: Any, path: str | os.PathLike[str]) -> None:
    """Writes SGLang's ``logical_count`` file: ``counts`` [L, E] (a window's summed counts) or
    [T, L, E] (per pass, for algorithms that read the steps) of non-negative integers, L = the
    model's decoder layers (dense ones included, without load)."""
    array = np.asarray(counts)
    if array.dtype.kind not in "iu" or array.ndim not in (2, 3) or 0 in array.shape:
        raise InvalidArgumentError(
            f"counts must be integer counts of shape [L, E] or [T, L, E], got {array.dtype} of "
            f"shape {array.shape}"
        )
    if (array < 0).any():
        where = [int(i) for i in np.argwhere(array < 0)[0]]
        raise InvalidArgumentError(f"counts{where} = {array[tuple(where)]} is negative")
    if array.ndim == 2:
        body = "[\n" + _rows(array) + "\n]"
    else:
        body = "[\n" + ",\n".join("[\n" + _rows(step) + "\n]" for step in array) + "\n]"
    atomic_write_bytes(path, ("{" + f'"{LOGICAL_COUNT_KEY}": {body}' + "}\n").encode())


def save_trtllm_load_balancer(
    location: ExpertLocation,
    path: str | os.PathLike[str],
    layers: Sequence[int] | None = None,
    layer_updates_per_iter: int = 0,
) -> None:
    """Writes TensorRT-LLM's MoE load balancer YAML (``moe_config.load_balancer``) for
    ``location``: ``num_slots`` = P, ``layer_updates_per_iter`` (0: a static placement) and
    ``initial_global_assignments``, the expert of each slot of every layer in ``layers`` (row
    indices of ``location``, which are the keys: TensorRT-LLM looks each MoE layer up by its
    decoder-layer index and ignores other keys; None: every row). Plain YAML, no dependency."""
    if not isinstance(location, ExpertLocation):
        raise InvalidArgumentError(
            f"location must be an ExpertLocation, got {type(location).__name__}"
        )
    num_layers = location.num_layers
    rows = list(range(num_layers)) if layers is None else [int(i) for i in layers]
    bad = [i for i in rows if not 0 <= i < num_layers]
    if bad or len(set(rows)) != len(rows) or not rows:
        raise InvalidArgumentError(
            f"layers must be distinct row indices in [0, {num_layers}), got {list(layers or [])}"
        )
    if isinstance(layer_updates_per_iter, bool) or int(layer_updates_per_iter) < 0:
        raise InvalidArgumentError(
            f"layer_updates_per_iter must be an integer >= 0, got {layer_updates_per_iter!r}"
        )
    mapping = location.physical_to_logical
    lines = [
        f"# TensorRT-LLM MoE load balancer (moe_config: load_balancer: <this file>), moelb "
        f"{__version__}: {location.num_physical_experts} slots on {location.ep_size} ranks, "
        f"{location.num_local_physical_experts} per rank",
        f"num_slots: {location.num_physical_experts}",
        f"layer_updates_per_iter: {int(layer_updates_per_iter)}",
        "initial_global_assignments:",
    ]
    lines += [f"  {i}: [{', '.join(str(e) for e in mapping[i].tolist())}]" for i in rows]
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def save_moelb_placement(
    plan: Plan,
    path: str | os.PathLike[str],
    num_groups: int | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Writes moelb's placement JSON (ours): ``format``, the topology (``num_layers``,
    ``num_logical_experts``, ``num_physical_experts``, ``ep_size``, ``num_nodes``,
    ``num_groups``), ``algorithm`` and ``notes``, ``physical_to_logical_map`` [L][P],
    ``logical_to_physical_map`` [L][E][X] (ascending slots, -1 padded), ``replica_count`` [L][E]
    and ``stats`` (the plan's overall statistics and per-layer ``max_rank_load``,
    ``mean_rank_load``, ``lower_bound``, ``layer_balancedness``); ``extra`` adds keys (the
    command's summary)."""
    if not isinstance(plan, Plan):
        raise InvalidArgumentError(f"plan must be a moelb Plan, got {type(plan).__name__}")
    location, stats = plan.location, plan.stats
    document: dict[str, Any] = {
        "format": MOELB_PLACEMENT_FORMAT,
        "moelb_version": __version__,
        "num_layers": location.num_layers,
        "num_logical_experts": location.num_logical_experts,
        "num_physical_experts": location.num_physical_experts,
        "ep_size": location.ep_size,
        "num_nodes": location.num_nodes,
        "num_groups": num_groups,
        "algorithm": stats.algorithm,
        "notes": stats.notes,
        "stats": {
            "balancedness": stats.balancedness,
            "active_balancedness": stats.active_balancedness,
            "load_weighted_balancedness": stats.load_weighted_balancedness,
            "mean_gap": stats.mean_gap,
            "max_gap": stats.max_gap,
            "moved_experts": stats.moved_experts,
            "layer_balancedness": stats.layer_balancedness.tolist(),
            "max_rank_load": stats.max_rank_load.tolist(),
            "mean_rank_load": stats.mean_rank_load.tolist(),
            "lower_bound": stats.lower_bound.tolist(),
        },
        **(extra or {}),
    }
    head = json.dumps(_json_safe(document), indent=1, allow_nan=False)[:-2]  # no closing "\n}"
    arrays = {
        PLACEMENT_KEY: location.physical_to_logical,
        "logical_to_physical_map": location.logical_to_physical,
        "replica_count": location.logical_count,
    }
    body = ",\n".join(
        f' "{key}": [\n'
        + (
            _rows(value)
            if value.ndim == 2
            else ",\n".join("[\n" + _rows(layer) + "\n]" for layer in value)
        )
        + "\n]"
        for key, value in arrays.items()
    )
    atomic_write_bytes(path, (head + ",\n" + body + "\n}\n").encode())
