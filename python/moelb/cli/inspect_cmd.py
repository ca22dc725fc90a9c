"""``moelb inspect FILE``: per-layer statistics of a placement JSON (replicas, same-GPU duplicates,
trivial layers) or of an expert distribution dump (routed picks, the hottest expert, idle experts,
and with --ep-size the trivial placement's balancedness and the bound). DESIGN sections 3
(balancedness) and 7 (files and CLI)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from .._core import ExpertLocation
from ..balancedness import utilization_rate
from ..eplb import PlanStats, evaluate_placement
from ..io import PLACEMENT_KEY, load_placement
from .common import CliError, load_dump
from .output import fixed, print_json, table

__all__ = ["inspect_command"]


def inspect_command(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.exists():
        raise CliError(f"file {args.file!r} does not exist")
    if args.ep_size is None:
        # Without GPUs there is no topology to give nodes or slots to: say so rather than
        # building one the user never asked for.
        for flag, value, default in (
            ("--num-nodes", args.num_nodes, 1),
            ("--num-physical-experts", args.num_physical_experts, None),
        ):
            if value != default:
                raise CliError(f"{flag} {value} needs --ep-size (the EP ranks that hold the slots)")
    if path.is_file() and _looks_like_placement(path):
        return _inspect_placement(path, args)
    return _inspect_dump(path, args)


def _looks_like_placement(path: Path) -> bool:
    if path.suffix.lower() != ".json":
        return False
    with open(path, "rb") as f:
        head = f.read(4096)
    return f'"{PLACEMENT_KEY}"'.encode() in head  # dumps hold "last_physical_to_logical_map"


def _inspect_placement(path: Path, args: argparse.Namespace) -> int:
    location = load_placement(path, args.ep_size or 1, args.num_nodes)
    phy2log = location.physical_to_logical
    count = location.logical_count
    L, P = phy2log.shape
    S = P // location.ep_size
    layers = []
    for layer in range(L):
        per_gpu = phy2log[layer].reshape(location.ep_size, S)
        duplicates = sum(S - len(np.unique(row)) for row in per_gpu)
        layers.append(
            {
                "layer": layer,
                "replicated_experts": int((count[layer] > 1).sum()),
                "max_replicas": int(count[layer].max()),
                "same_rank_duplicates": int(duplicates) if args.ep_size else None,
                "trivial": bool(np.array_equal(phy2log[layer], np.arange(P) % count.shape[1])),
            }
        )
    summary = {
        "kind": "placement",
        "file": str(path),
        "num_layers": L,
        "num_physical_experts": P,
        "num_logical_experts": location.num_logical_experts,
        "ep_size": args.ep_size,
        "trivial_layers": sum(x["trivial"] for x in layers),
        "layers": layers,
    }
    if args.json:
        print_json(summary)
        return 0
    print(
        f"{path}: placement [{L} layers, {P} slots] of {location.num_logical_experts} experts; "
        f"{summary['trivial_layers']} layer(s) trivial"
    )
    headers = ["layer", "replicated experts", "max replicas", "trivial"]
    if args.ep_size:
        headers.insert(3, f"same-rank duplicates (W={args.ep_size})")
    rows = []
    for x in layers:
        row = [str(x["layer"]), str(x["replicated_experts"]), str(x["max_replicas"])]
        if args.ep_size:
            row.append(str(x["same_rank_duplicates"]))
        rows.append([*row, "yes" if x["trivial"] else "no"])
    print(table(headers, rows))
    return 0


def _inspect_dump(path: Path, args: argparse.Namespace) -> int:
    counts = load_dump(str(path))
    summary, trivial_stats = _dump_summary(path, counts, args)
    if args.json:
        print_json(summary)
        return 0
    _print_dump(summary, trivial_stats)
    return 0


def _dump_summary(
    path: Path, counts: np.ndarray, args: argparse.Namespace
) -> tuple[dict[str, Any], PlanStats | None]:
    """What ``--json`` prints for a dump of counts [T, L, E], and the statistics of the trivial
    placement on --ep-size GPUs (None without)."""
    T, L, E = counts.shape
    load = counts.sum(axis=0, dtype=np.float64)
    totals = load.sum(axis=1)
    gpus = args.ep_size
    slots = None
    trivial_stats = None
    if gpus:
        slots = args.num_physical_experts or E
        trivial = ExpertLocation.trivial(L, E, slots, gpus, args.num_nodes)
        trivial_stats = evaluate_placement(load, trivial)
    summary = {
        "kind": "dump",
        "file": str(path),
        "num_passes": T,
        "num_layers": L,
        "num_logical_experts": E,
        "ep_size": gpus,
        "num_physical_experts": slots,
        # The dump's counts summed: one per (token, routed expert) pick, over passes and layers.
        "routed_picks": int(totals.sum()),
        "layers_with_counts": int((totals > 0).sum()),
        # SGLang's balancedness of the trivial placement (all layers, dense ones 1.0).
        "trivial_balancedness": None if trivial_stats is None else trivial_stats.balancedness,
        "layers": _dump_layers(load, totals, trivial_stats),
    }
    return summary, trivial_stats


def _dump_layers(
    load: np.ndarray, totals: np.ndarray, trivial_stats: PlanStats | None
) -> list[dict[str, Any]]:
    """Per layer of the summed counts ``load`` [L, E] (``totals`` [L]: their sums): routed
    picks, the hottest expert, idle experts, and the trivial placement's and the bound's
    balancedness (None without GPUs)."""
    mean = totals / load.shape[1]
    hottest = load.max(axis=1)
    trivial_bal = bound_bal = None
    if trivial_stats is not None:
        # SGLang's per-layer rate (moelb.utilization_rate) of the trivial placement and of the
        # lower bound.
        trivial_bal = trivial_stats.layer_balancedness
        bound_bal = utilization_rate(trivial_stats.mean_rank_load, trivial_stats.lower_bound)
    layers = []
    for layer in range(load.shape[0]):
        layers.append(
            {
                "layer": layer,
                "routed_picks": int(totals[layer]),
                "hottest_expert": int(load[layer].argmax()),
                "hottest_over_mean": float(hottest[layer] / mean[layer]) if mean[layer] else None,
                "idle_experts": int((load[layer] == 0).sum()),
                "trivial_balancedness": None if trivial_bal is None else float(trivial_bal[layer]),
                "bound_balancedness": None if bound_bal is None else float(bound_bal[layer]),
            }
        )
    return layers


def _print_dump(summary: dict[str, Any], trivial_stats: PlanStats | None) -> None:
    """The text report of a dump: one line on the dump, the per-layer table, and the trivial
    placement's balancedness with --ep-size."""
    L, gpus = summary["num_layers"], summary["ep_size"]
    print(
        f"{summary['file']}: expert distribution dump, {summary['num_passes']:,} passes x {L} "
        f"layers ({summary['layers_with_counts']} with counts) x "
        f"{summary['num_logical_experts']} experts, {summary['routed_picks']:,} routed (token, "
        "expert) picks (tokens x top-k, summed over layers)"
    )
    headers = ["layer", "routed picks", "hottest expert", "hottest / mean", "idle experts"]
    if gpus:
        headers += [f"trivial bal. (W={gpus}, P={summary['num_physical_experts']})", "bound bal."]
    rows = []
    for x in summary["layers"]:
        row = [
            str(x["layer"]),
            f"{x['routed_picks']:,}",
            str(x["hottest_expert"]),
            fixed(x["hottest_over_mean"], 2),
            str(x["idle_experts"]),
        ]
        if gpus:
            row += [fixed(x["trivial_balancedness"]), fixed(x["bound_balancedness"])]
        rows.append(row)
    print(table(headers, rows))
    if trivial_stats is not None:
        print(
            f"trivial placement: balancedness {fixed(trivial_stats.balancedness)} (SGLang's, all "
            f"{L} layers), {fixed(trivial_stats.active_balancedness)} over the "
            f"{summary['layers_with_counts']} layers with counts"
        )
