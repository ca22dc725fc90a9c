"""Behaviour fingerprint: one SHA-256 per area over the outputs of many seeded inputs.

A restructuring commit (issue 18: the planner split into one file per concern, the vocabulary
renames) must leave every output as it was. This script runs each area of moelb on a grid of
seeded inputs like the test suite's and hashes everything it returns:

- ``planner``: ``rebalance`` with every algorithm, locality and objective, on shapes that take the
  hierarchical path, the global path and each fallback (groups not divisible by nodes, GPUs not a
  multiple of nodes, no groups, one node, 1,024 GPUs), loads with ties and zeros; placements
  (``physical_to_logical``) and every statistic except the wall time.
- ``previous``: the ``previous=`` / ``move_cost`` / ``max_moves`` grid of
  ``check_previous_matching.py`` (seed 17, small).
- ``evaluate``: ``evaluate_placement`` and ``gpu_loads`` of random placements, totals and series.
- ``weight_moves``: ``plan_weight_moves`` between plans (every op and count) and
  ``apply_weight_moves``.
- ``dispatch``: every dispatch model's tables, ``dispatch_tokens`` and ``expected_gpu_loads``.
- ``waterfill``: ``WaterfillBalancer.expand`` (static, both phases) and ``waterfill_rank_loads``.
- ``recorder``: a recorder's per-pass records, summed counts and balancedness.
- ``files``: recorder dumps in every mode and format (.json, .npz, and .pt with torch), byte for
  byte and read back; a placement file. Its hash also depends on the environment: the .pt files
  are written only where torch is installed (7 cases instead of 10 without it), and the .npz
  bytes on the interpreter's ``zipfile`` (NumPy forces zip64 headers, which CPython writes
  differently from 3.11.4 / 3.12 on than in 3.10 and 3.11.0-3.11.3; the arrays read back are the
  same). Compare ``files`` under the same Python and torch; the baseline
  ``results/fingerprint_5347732_quick.json`` was made with CPython 3.11.7 and torch 2.13.0.
- ``routing``, ``moe_layer``, ``simulate``: float32 kernels (their bits may depend on the CPU's
  vector width, so compare these on one machine only).

    python benchmarks/check_fingerprint.py --save before.json       # on the old commit
    python benchmarks/check_fingerprint.py --compare before.json    # on the new one: exit 1 if any
                                                                    # area differs
    python benchmarks/check_fingerprint.py --quick --threads 1      # a smaller grid, one thread

Every area is hashed under the thread count given (default: the machine's); the results must not
depend on it (a test runs ``--quick`` at 1 and 2 threads and compares).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import moelb
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import check_previous_matching

#: Names that a later commit renamed, mapped to the names hashed (the names before issue 18), so
#: that a renamed field or keyword hashes as it did; text (notes) naming a renamed parameter is
#: read as before (check_previous_matching.hashed_text).
HASHED_NAMES = {
    **check_previous_matching.RENAMED_STATS,
    "rank_load": "gpu_load",  # the simulator's AlgorithmResult (WaterfillPlan's keeps its hash)
}
#: Keywords as issue 18 named them -> their names before (``call`` falls back to these).
OLD_KEYWORDS = {"ep_rank": "rank", "ep_size": "num_gpus"}

# (num_experts, num_physical_experts, num_groups, num_nodes, num_gpus): hierarchical, global,
# and the fallbacks (groups % nodes != 0, gpus % nodes != 0, no groups, P == E, one slot per GPU).
SHAPES = (
    (16, 16, 4, 1, 4),
    (16, 24, 4, 2, 8),
    (16, 32, 4, 4, 8),
    (12, 18, 3, 2, 6),
    (12, 16, 4, 3, 8),
    (20, 30, 5, 2, 10),
    (24, 36, 6, 4, 12),
    (32, 64, 0, 4, 16),
    (32, 32, 8, 4, 32),
    (60, 80, 6, 3, 8),
    (64, 96, 8, 4, 32),
    (256, 288, 8, 4, 32),
)
LARGE_SHAPES = ((256, 4096, 8, 128, 1024),)
ALGORITHMS = ("moelb", "deepseek", "deepseek_hierarchical", "deepseek_global")
LOCALITIES = ("auto", "node", "none")


def hashed_name(name: str) -> str:
    return HASHED_NAMES.get(name, name)


def feed(h: Any, value: Any) -> None:
    """Feeds ``value`` into the hash: arrays by dtype, shape and bytes; objects by their public
    fields (wall times left out); containers element by element."""
    if isinstance(value, np.ndarray):
        h.update(f"a{value.dtype.str}{value.shape}".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, dict):
        h.update(b"{")
        for key in sorted(value, key=lambda k: hashed_name(str(k))):
            if "seconds" in str(key) or str(key) in ("wall_time", "timings"):
                continue
            h.update(hashed_name(str(key)).encode())
            feed(h, value[key])
        h.update(b"}")
    elif isinstance(value, (list, tuple)):
        h.update(b"[")
        for item in value:
            feed(h, item)
        h.update(b"]")
    elif isinstance(value, str):  # notes and names: parameters named as before the renames
        h.update(repr(check_previous_matching.hashed_text(value)).encode())
    elif isinstance(value, (bool, int, float, type(None), np.generic)):
        h.update(repr(value.item() if isinstance(value, np.generic) else value).encode())
    elif is_dataclass(value):
        items = {f.name: getattr(value, f.name) for f in fields(value)}
        if isinstance(value, moelb.PlanStats):  # statistics added later, skipped at their default
            items = {
                k: v for k, v in items.items() if not check_previous_matching.added_at_default(k, v)
            }
        feed(h, items)
    elif isinstance(value, moelb.ExpertLocation):
        feed(h, [value.physical_to_logical, value.ep_size, value.num_nodes])
    elif callable(value):  # a method passed by mistake would hash nothing
        raise TypeError(f"feed: {value!r} is callable; pass what it returns")
    else:
        names = [n for n in dir(value) if not n.startswith("_")]
        feed(h, {n: getattr(value, n) for n in names if not callable(getattr(value, n))})


def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, retried with the keyword names before issue 18's renames when the
    new ones are not accepted (so that the script runs on both sides of the rename)."""
    try:
        return fn(*args, **kwargs)
    except TypeError as error:
        old = {OLD_KEYWORDS.get(k, k): v for k, v in kwargs.items()}
        if old == kwargs or "argument" not in str(error):
            raise
        return fn(*args, **old)


def api(name: str, old_name: str) -> Callable[..., Any]:
    """``moelb.<name>``, or its name before issue 18's renames."""
    return getattr(moelb, name, None) or getattr(moelb, old_name)


def feed_call(h: Any, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Feeds ``fn(*args, **kwargs)``, or the class of the error it raises (messages name
    parameters, which a rename may change)."""
    try:
        result = call(fn, *args, **kwargs)
    except moelb.InvalidArgumentError as error:
        h.update(f"error {type(error).__name__}".encode())
        return
    feed(h, result)


def loads(rng: np.random.Generator, layers: int, experts: int, kind: str) -> np.ndarray:
    return check_previous_matching.random_loads(rng, layers, experts, kind)


def area_planner(h: Any, quick: bool) -> int:
    rng = np.random.default_rng(101)
    count = 0
    shapes = SHAPES[::3] if quick else SHAPES + LARGE_SHAPES
    for experts, slots, groups, nodes, gpus in shapes:
        kinds = ("zipf", "ties") if quick else ("zipf", "ties", "zeros", "uniform")
        for kind in kinds:
            layers = 2 if experts >= 256 else 3
            load = loads(rng, layers, experts, kind)
            series = np.stack([loads(rng, layers, experts, kind) for _ in range(3)])
            for algorithm in ALGORITHMS:
                for locality in LOCALITIES if algorithm == "moelb" else ("auto",):
                    objectives = ("total", "step_peak") if algorithm == "moelb" else ("total",)
                    for objective in objectives:
                        data = series if objective == "step_peak" else load
                        try:
                            plan = moelb.rebalance(
                                data,
                                slots,
                                groups or None,
                                nodes,
                                gpus,
                                algorithm,
                                locality=locality,
                                objective=objective,
                                expert_bytes=1 << 20,
                            )
                        except moelb.InvalidArgumentError as error:
                            h.update(f"error {type(error).__name__}".encode())
                            continue
                        feed(h, [plan.location, plan.stats])
                        count += 1
    return count


def area_previous(h: Any, quick: bool) -> int:
    count = 0
    for description, plan in check_previous_matching.plans(17):
        if quick and count >= 300:
            break
        h.update(description.encode())
        check_previous_matching.digest_plan(h, plan)
        count += 1
    return count


def random_location(
    rng: np.random.Generator, layers: int, experts: int, slots: int, gpus: int, nodes: int
) -> moelb.ExpertLocation:
    return check_previous_matching.random_placement(rng, layers, experts, slots, gpus, nodes)


def area_evaluate(h: Any, quick: bool) -> int:
    rng = np.random.default_rng(102)
    count = 0
    for experts, slots, _, nodes, gpus in SHAPES[: 4 if quick else None]:
        nodes = nodes if gpus % nodes == 0 else 1
        location = random_location(rng, 3, experts, slots, gpus, nodes)
        previous = random_location(rng, 3, experts, slots, gpus, nodes)
        load = loads(rng, 3, experts, "zipf")
        series = np.stack([loads(rng, 3, experts, "ties") for _ in range(4)])
        feed(h, moelb.evaluate_placement(load, location))
        feed(h, moelb.evaluate_placement(series, location, previous, expert_bytes=4096))
        feed(h, moelb.evaluate_placement(series.astype(np.int32), location))
        feed(h, api("rank_loads", "gpu_loads")(load, location))
        count += 4
    return count


def area_weight_moves(h: Any, quick: bool) -> int:
    rng = np.random.default_rng(103)
    count = 0
    for experts, slots, _, nodes, gpus in SHAPES[: 5 if quick else None]:
        nodes = nodes if gpus % nodes == 0 else 1
        old = random_location(rng, 2, experts, slots, gpus, nodes)
        new = moelb.rebalance(
            loads(rng, 2, experts, "zipf"), slots, None, nodes, gpus, previous=old, move_cost=0.0
        ).location
        for layer in range(2):
            plan = moelb.plan_weight_moves(old, new, layer)
            feed(h, [plan.ops(rank) for rank in range(plan.ep_size)])
            feed(h, [plan.old_physical_to_logical, plan.new_physical_to_logical])
            feed(h, [plan.transfers, plan.local_copies, plan.unchanged_slots])
            feed(h, [plan.inter_node_transfers, plan.intra_node_transfers, plan.fingerprint])
            feed(h, plan.moved_bytes(1 << 20))
            weights = np.arange(slots * 3, dtype=np.float32).reshape(gpus, slots // gpus, 3)
            feed(h, moelb.apply_weight_moves(plan, weights, location=old))
            count += 1
    return count


def area_dispatch(h: Any, quick: bool) -> int:
    rng = np.random.default_rng(104)
    count = 0
    for experts, slots, _, nodes, gpus in SHAPES[: 5 if quick else None]:
        nodes = nodes if gpus % nodes == 0 else 1
        location = random_location(rng, 2, experts, slots, gpus, nodes)
        load = loads(rng, 2, experts, "zipf")
        ids = rng.integers(0, experts, (64, 4)).astype(np.int32)
        ids[rng.random(ids.shape) < 0.05] = -1
        for dispatch in moelb.DISPATCH_ALGORITHMS:
            feed_call(h, moelb.dispatch_tables, location, dispatch, seed=3)
            feed_call(
                h,
                api("expected_rank_loads", "expected_gpu_loads"),
                load,
                location,
                dispatch,
                seed=3,
            )
            for rank in (0, gpus - 1):
                feed_call(h, moelb.dispatch_tokens, ids, location, 1, dispatch, ep_rank=rank)
            count += 3
        feed(h, moelb.sglang_replica_lists(location, 0))
    return count


def area_waterfill(h: Any, quick: bool) -> int:
    rng = np.random.default_rng(105)
    count = 0
    for slots, ranks, top_k in ((16, 4, 4), (24, 8, 6), (288, 32, 8))[: 2 if quick else None]:
        for tokens in (0, 7, 63, 64, 500):
            batches = []
            for rank in range(ranks):
                ids = rng.integers(0, slots, (tokens, top_k)).astype(np.int32)
                if tokens:
                    ids[0] = -1
                batches.append(ids)
                for is_decode in (False, True):
                    balancer = call(
                        moelb.WaterfillBalancer,
                        slots,
                        ranks,
                        ep_rank=rank,
                        routed_scaling_factor=2.5,
                    )
                    weights = np.full(ids.shape, 0.25, dtype=np.float32)
                    feed(h, balancer.expand(ids, weights, is_decode=is_decode))
                    feed(h, balancer.last_plan)
                    count += 1
            for mode in ("static", "dynamic"):
                for is_decode in (False, True):
                    feed(h, moelb.waterfill_rank_loads(batches, slots, mode, is_decode))
                    count += 1
    return count


def area_recorder(h: Any, quick: bool) -> int:
    rng = np.random.default_rng(106)
    location = moelb.rebalance(rng.random((3, 16)) * 100, 24, 4, 2, 4).location
    count = 0
    for mode in ("stat", "per_pass", "per_token"):
        recorder = call(moelb.ExpertDistributionRecorder, location, mode, 5, ep_rank=1)
        recorder.start()
        for _ in range(3 if quick else 8):
            with recorder.forward_pass():
                for layer in range(3):
                    with recorder.layer(layer):
                        ids = rng.integers(-1, 24, (40, 4)).astype(np.int32)
                        recorder.on_select_experts(ids)
        feed(h, [recorder.physical_count(), recorder.logical_count()])
        feed(h, [recorder.forward_pass_ids(), recorder.dump(), recorder.balancedness()])
        count += 1
    return count


def area_files(h: Any, quick: bool) -> int:
    """Recorder dumps written in every mode and format (the bytes), and read back."""
    import importlib.util
    import tempfile

    rng = np.random.default_rng(109)
    first = moelb.rebalance(rng.random((3, 16)) * 100, 24, 4, 2, 4).location
    second = moelb.rebalance(rng.random((3, 16)) * 100, 24, 4, 2, 4).location
    suffixes = [".json", ".npz"] + ([".pt"] if importlib.util.find_spec("torch") else [])
    count = 0
    with tempfile.TemporaryDirectory() as folder:
        for mode in ("stat", "per_pass", "per_token"):
            recorder = moelb.ExpertDistributionRecorder(first, mode, 5)
            recorder.start()
            for step in range(3 if quick else 6):
                if step == 2:
                    recorder.set_location(second)  # records keep their own placement
                with recorder.forward_pass():
                    for layer in range(3):
                        with recorder.layer(layer):
                            ids = rng.integers(-1, 24, (10, 4)).astype(np.int32)
                            recorder.on_select_experts(ids)
            dump = recorder.dump()
            for suffix in suffixes:
                path = Path(folder) / f"{mode}{suffix}"
                moelb.save_expert_distribution(dump, path, mode)
                h.update(suffix.encode())
                h.update(path.read_bytes())
                feed(h, moelb.load_expert_distribution(path))
                count += 1
        placement = Path(folder) / "placement.json"
        moelb.save_placement(second, placement)
        h.update(placement.read_bytes())
        feed(h, moelb.load_placement(placement, 4, 2))
    return count + 1


def area_routing(h: Any, quick: bool) -> int:
    rng = np.random.default_rng(107)
    count = 0
    location = moelb.rebalance(rng.random((2, 16)) * 100, 24, 4, 2, 4).location
    configs = (
        moelb.TopKConfig(top_k=4, scoring="sigmoid", num_groups=4, topk_group=2),
        moelb.TopKConfig(top_k=4, scoring="softmax", renormalize=False),
        moelb.TopKConfig(top_k=4, scoring="sqrtsoftplus", routed_scaling_factor=1.5),
    )
    for config in configs:
        for tokens in (1, 33, 257)[: 2 if quick else None]:
            logits = rng.standard_normal((tokens, 16)).astype(np.float32)
            bias = rng.standard_normal(16).astype(np.float32)
            feed(h, tuple(moelb.select_experts(logits, config, bias)))
            out = call(moelb.select_experts, logits, config, bias, location=location, layer=1)
            feed(h, tuple(out))
            count += 2
    return count


def area_moe_layer(h: Any, quick: bool) -> int:
    rng = np.random.default_rng(108)
    shape = dict(
        hidden_size=64, intermediate_size=32, num_experts=16, top_k=4, num_groups=4, topk_group=2
    )
    v4 = dict(hidden_size=48, intermediate_size=24, num_experts=12, top_k=3, vocab_size=100)
    configs = [
        moelb.DeepSeekMoEConfig.deepseek_v3().replace(**shape),
        moelb.DeepSeekMoEConfig.deepseek_v3().replace(**shape, fuse_shared_experts=True),
        moelb.DeepSeekMoEConfig.deepseek_v4_flash(3).replace(**v4),
        moelb.DeepSeekMoEConfig.deepseek_v4_flash(0).replace(**v4),
    ]
    count = 0
    for config in configs[: 2 if quick else None]:
        layer = moelb.DeepSeekMoE(config, seed=5)
        x = rng.standard_normal((70, config.hidden_size)).astype(np.float32)
        ids = rng.integers(0, 100, 70)
        feed(h, layer(x, ids if config.is_hash_layer else None))
        count += 1
    location = moelb.rebalance(rng.random((1, 16)) * 100, 24, 4, 2, 4).location
    layer = call(moelb.DeepSeekMoE, configs[0], seed=6, location=location, layer=0, ep_rank=1)
    feed(h, layer(rng.standard_normal((50, 64)).astype(np.float32)))
    return count + 1


def area_simulate(h: Any, quick: bool) -> int:
    config = call(
        moelb.SimulationConfig,
        model="deepseek-v3",
        num_layers=3,
        ep_size=8,
        num_nodes=2,
        num_redundant_experts=32,
        num_tokens=256,
        num_steps=6 if quick else 12,
        rebalance_period=3,
        algorithms=("deepseek", "moelb", "moelb:none:step_peak"),
        dispatch=("sglang_static", "moelb_static"),
        seed=4,
    )
    result = moelb.simulate(config)
    feed(h, json.loads(json.dumps(result.to_dict())) if hasattr(result, "to_dict") else result)
    return 1


AREAS: dict[str, Callable[[Any, bool], int]] = {
    "planner": area_planner,
    "previous": area_previous,
    "evaluate": area_evaluate,
    "weight_moves": area_weight_moves,
    "dispatch": area_dispatch,
    "waterfill": area_waterfill,
    "recorder": area_recorder,
    "files": area_files,
    "routing": area_routing,
    "moe_layer": area_moe_layer,
    "simulate": area_simulate,
}


def fingerprint(areas: list[str], quick: bool) -> dict[str, dict[str, Any]]:
    out = {}
    for name in areas:
        h = hashlib.sha256()
        start = time.perf_counter()
        count = AREAS[name](h, quick)
        out[name] = {
            "sha256": h.hexdigest(),
            "cases": count,
            "seconds": round(time.perf_counter() - start, 2),
        }
        print(f"{name:13s} {out[name]['sha256']}  {count:5d} cases  {out[name]['seconds']:.1f} s")
    return out


def environment() -> dict[str, str | None]:
    """What the files area's bytes depend on besides moelb: the Python version and torch's."""
    import importlib.metadata
    import importlib.util
    import platform

    torch = None
    if importlib.util.find_spec("torch") is not None:
        torch = importlib.metadata.version("torch")
    return {"python": platform.python_version(), "torch": torch}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--areas", nargs="+", choices=list(AREAS), default=list(AREAS))
    parser.add_argument("--quick", action="store_true", help="a smaller grid (the test suite's)")
    parser.add_argument("--threads", type=int, default=None, help="moelb.set_num_threads")
    parser.add_argument("--save", type=Path, help="write the hashes to this JSON file")
    parser.add_argument("--compare", type=Path, help="exit 1 when a hash differs from this file")
    parser.add_argument("--json", type=Path, help="alias of --save (the benchmarks' flag)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        moelb.set_num_threads(args.threads)
    print(f"moelb {moelb.__version__}, {moelb.get_num_threads()} threads, quick={args.quick}")
    result = fingerprint(args.areas, args.quick)
    for path in (args.save, args.json):
        if path is not None:
            payload = {"quick": args.quick, "environment": environment(), "areas": result}
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(payload, indent=1) + "\n")
            tmp.replace(path)
    if args.compare is None:
        return 0
    before = json.loads(args.compare.read_text())
    if "environment" in before and before["environment"] != environment():
        print(
            f"note: {args.compare} was made under {before['environment']}, this run under "
            f"{environment()}: the files area depends on them (see the module docstring)"
        )
    if before.get("quick") != args.quick:
        print(f"--compare: {args.compare} was made with quick={before.get('quick')}")
        return 2
    differ = [
        name
        for name in result
        if name in before["areas"] and before["areas"][name]["sha256"] != result[name]["sha256"]
    ]
    missing = [name for name in result if name not in before["areas"]]
    for name in differ:
        print(f"DIFFERS: {name}")
    for name in missing:
        print(f"not in {args.compare}: {name}")
    print("identical" if not differ and not missing else f"{len(differ)} area(s) differ")
    return 1 if differ or missing else 0


if __name__ == "__main__":
    sys.exit(main())
