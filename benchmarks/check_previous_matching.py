"""Equivalence check for ``rebalance(..., previous=)``: one SHA-256 over many seeded plans.

Hashes the placement (``physical_to_logical``) and every statistic except the wall time of a few
hundred random plans made with a ``previous`` placement: one node and several, locality node and
none, move_cost 0 / the default / 1e-2 and max_moves, algorithms deepseek and moelb, total and
step_peak objectives, tied loads (small integers), zero loads (whole experts and whole layers), and
previous placements that are trivial, random, or an earlier plan of drifted loads. A change of the
planner's matching to the previous placement must leave the hash as it was (issue 17: the O(G^2)
matching was replaced by a sparse one with bit-identical plans).

    python benchmarks/check_previous_matching.py                # seed 17, against RECORDED
    python benchmarks/check_previous_matching.py --seed 19 --small
    python benchmarks/check_previous_matching.py --expect HASH  # exit 1 when it differs
    python benchmarks/check_previous_matching.py --time         # 58-layer plans, timed

Exits 1 when the hash differs from the one recorded on the old pairwise matching (``RECORDED``)
for that seed, or from ``--expect``.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import sys
import time
from typing import Any

import moelb
import numpy as np

#: The hashes on the old O(G^2) pairwise matching (commit cd98031): (seed, small) -> SHA-256.
RECORDED = {
    (17, False): "25bd70fd17b21e92b6528f56f7c837985abcdc765f966cd48b9ed20cbd9427db",  # 2,123 plans
    (18, False): "0bc8763195b5ce1aef375c6849aa2aeee91a454aed07e3d4624c717b0d2a5338",  # 2,123 plans
    (19, True): "fb341ea7b31000d4382685204d3bd8b1946d6825fa1acf5ea88814edc897851e",  # 2,111 plans
}

# (num_experts, num_physical_experts, num_groups, num_nodes, ep_size)
SHAPES = (
    (16, 16, 4, 1, 4),
    (16, 24, 4, 1, 8),
    (16, 32, 4, 2, 8),
    (24, 36, 4, 2, 6),
    (32, 64, 8, 4, 16),
    (32, 48, 8, 2, 16),
    (64, 96, 8, 4, 32),
    (64, 128, 8, 8, 64),
    (60, 80, 6, 3, 8),
    (64, 72, 8, 1, 8),
    (32, 64, 0, 4, 16),
    (48, 96, 8, 3, 24),
    (256, 288, 8, 4, 32),
    (256, 512, 8, 8, 128),
)
# Larger shapes (1,024 GPUs at the end), skewed loads and move_cost 0 only: 2 layers each.
LARGE_SHAPES = (
    (256, 1024, 8, 32, 256),
    (384, 2048, 8, 64, 512),
    (256, 4096, 8, 128, 1024),
)
MOVE_OPTIONS = (
    {"move_cost": 0.0},
    {},
    {"move_cost": 1e-2},
    {"move_cost": 0.0, "max_moves": 20},
    {"max_moves": 0},
)


def random_loads(rng: np.random.Generator, layers: int, experts: int, kind: str) -> np.ndarray:
    if kind == "zipf":
        w = 1.0 / np.arange(1, experts + 1) ** rng.uniform(0.5, 1.2)
        return np.stack([rng.permutation(w) * 1000 * rng.uniform(0.5, 1.5) for _ in range(layers)])
    if kind == "ties":  # small integers: many equal loads
        return rng.integers(0, 4, (layers, experts)).astype(np.float64)
    if kind == "zeros":  # zero experts and an all-zero layer
        load = rng.integers(0, 100, (layers, experts)).astype(np.float64)
        load[rng.random((layers, experts)) < 0.4] = 0
        load[0] = 0
        return load
    return np.ones((layers, experts))  # "uniform": every load tied


def random_placement(
    rng: np.random.Generator, layers: int, experts: int, slots: int, gpus: int, nodes: int
) -> moelb.ExpertLocation:
    rows = []
    for _ in range(layers):
        row = np.concatenate([np.arange(experts), rng.integers(0, experts, slots - experts)])
        rows.append(rng.permutation(row))
    return moelb.ExpertLocation(np.array(rows, dtype=np.int32), experts, gpus, nodes)


#: Statistics renamed by issue 18 (one vocabulary: a rank's load) -> the names the RECORDED
#: hashes were made with; and the parameter its notes name (num_gpus became ep_size).
RENAMED_STATS = {
    "max_rank_load": "max_gpu_load",
    "mean_rank_load": "mean_gpu_load",
    "step_max_rank_load": "step_max_gpu_load",
}
RENAMED_TEXT = (("ep_size=", "num_gpus="),)
#: Statistics added after the RECORDED hashes (issue 20: the target dispatch), with the value
#: they take for what the hashes cover (an equal-split plan); skipped at that value.
ADDED_STATS = {
    "dispatch": "equal_split",
    "realised_max_rank_load": None,
    "realised_balancedness": None,
}


def added_at_default(name: str, value: Any) -> bool:
    """True for a statistic added after the RECORDED hashes, at the value they imply."""
    return (
        name in ADDED_STATS
        and isinstance(value, (str, type(None)))
        and (value == ADDED_STATS[name])
    )


def hashed_text(text: str) -> str:
    """``text`` as the hashes before issue 18's renames saw it (no plan note said ep_size=)."""
    for new, old in RENAMED_TEXT:
        text = text.replace(new, old)
    return text


def digest_plan(h: Any, plan: moelb.Plan) -> None:
    h.update(np.ascontiguousarray(plan.location.physical_to_logical, dtype=np.int32).tobytes())
    h.update(str(plan.location.num_nodes).encode())
    stats = {RENAMED_STATS.get(name, name): value for name, value in vars(plan.stats).items()}
    for name, value in sorted(stats.items()):
        if name == "wall_time_seconds" or added_at_default(name, value):
            continue
        h.update(name.encode())
        if isinstance(value, np.ndarray):
            h.update(str(value.dtype).encode())
            h.update(np.ascontiguousarray(value).tobytes())
        elif isinstance(value, str):
            h.update(repr(hashed_text(value)).encode())
        else:
            h.update(repr(value).encode())


def plans(seed: int = 17):
    """Yields (description, plan) for every case, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    layers = 3
    for shape in SHAPES:
        experts, slots, groups, nodes, gpus = shape
        for kind in ("zipf", "ties", "zeros", "uniform"):
            load = random_loads(rng, layers, experts, kind)
            drifted = load * rng.uniform(0.5, 1.5, load.shape) + rng.integers(0, 3, load.shape)
            earlier = moelb.rebalance(drifted, slots, groups or None, nodes, gpus, move_cost=0.0)
            location_nodes = nodes if gpus % nodes == 0 else 1
            previous_kinds = {
                "trivial": moelb.ExpertLocation.trivial(
                    layers, experts, slots, gpus, location_nodes
                ),
                "random": random_placement(rng, layers, experts, slots, gpus, location_nodes),
                "earlier": earlier.location,
            }
            for prev_name, previous in previous_kinds.items():
                for locality in ("auto", "node", "none"):
                    for options in MOVE_OPTIONS:
                        if locality != "auto" and len(options) != 1:
                            continue  # the movement options once per previous
                        plan = moelb.rebalance(
                            load,
                            slots,
                            groups or None,
                            nodes,
                            gpus,
                            previous=previous,
                            locality=locality,
                            **options,
                        )
                        yield f"{shape} {kind} {prev_name} {locality} {options}", plan
                for algorithm in ("deepseek", "deepseek_global"):
                    if algorithm == "deepseek" and kind != "zipf":
                        continue
                    try:
                        plan = moelb.rebalance(
                            load, slots, groups or None, nodes, gpus, algorithm, previous=previous
                        )
                    except moelb.InvalidArgumentError:
                        continue  # the hierarchical policy's shape constraints
                    yield f"{shape} {kind} {prev_name} {algorithm}", plan
            # step_peak over a short series, once per shape and load kind
            series = np.stack([random_loads(rng, layers, experts, kind) for _ in range(4)])
            plan = moelb.rebalance(
                series,
                slots,
                groups or None,
                nodes,
                gpus,
                previous=previous_kinds["earlier"],
                objective="step_peak",
                move_cost=0.0,
            )
            yield f"{shape} {kind} step_peak", plan


def large_plans(seed: int):
    """Yields (description, plan) at the LARGE_SHAPES."""
    rng = np.random.default_rng(seed + 1)
    layers = 2
    for shape in LARGE_SHAPES:
        experts, slots, groups, nodes, gpus = shape
        load = random_loads(rng, layers, experts, "zipf")
        drifted = load * rng.uniform(0.5, 1.5, load.shape)
        earlier = moelb.rebalance(drifted, slots, groups, nodes, gpus, move_cost=0.0)
        previous_kinds = {
            "random": random_placement(rng, layers, experts, slots, gpus, nodes),
            "earlier": earlier.location,
        }
        for prev_name, previous in previous_kinds.items():
            for locality in ("node", "none"):
                plan = moelb.rebalance(
                    load,
                    slots,
                    groups,
                    nodes,
                    gpus,
                    previous=previous,
                    locality=locality,
                    move_cost=0.0,
                )
                yield f"{shape} zipf {prev_name} {locality}", plan


# (num_experts, num_physical_experts, ep_size, num_nodes) timed by --time, 58 layers each.
TIMED_SHAPES = (
    (256, 1024, 256, 32),
    (256, 2048, 1024, 128),
    (256, 4096, 1024, 128),
    (256, 4096, 4096, 512),
)


def time_previous() -> None:
    """One moelb plan each without previous, with the trivial placement and with an earlier plan
    (bench_scale.py's Zipf loads, 58 layers): the before/after figures of issue 17."""
    from bench_scale import NUM_GROUPS, zipf_loads

    layers = 58
    for experts, slots, gpus, nodes in TIMED_SHAPES:
        load = zipf_loads(layers, experts, seed=gpus * 1000 + experts)
        args = (slots, NUM_GROUPS, nodes, gpus)
        currents = {
            "none": None,
            "trivial": moelb.ExpertLocation.trivial(layers, experts, slots, gpus, nodes),
            "earlier plan": moelb.rebalance(zipf_loads(layers, experts, seed=1), *args).location,
        }
        times = []
        for name, current in currents.items():
            start = time.perf_counter()
            moelb.rebalance(load, *args, previous=current)
            times.append(f"{name} {(time.perf_counter() - start) * 1e3:.0f} ms")
        print(f"E={experts} P={slots} GPUs={gpus} nodes={nodes}: " + ", ".join(times), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--expect", help="the expected SHA-256; exit 1 when it differs")
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--small", action="store_true", help="skip the large shapes")
    parser.add_argument("--verbose", action="store_true", help="print a hash per plan")
    parser.add_argument("--time", action="store_true", help="time 58-layer plans instead")
    args = parser.parse_args(argv)
    if args.time:
        time_previous()
        return 0
    total = hashlib.sha256()
    count = 0
    cases = plans(args.seed)
    if not args.small:
        cases = itertools.chain(cases, large_plans(args.seed))
    for description, plan in cases:
        one = hashlib.sha256()
        digest_plan(one, plan)
        total.update(one.digest())
        count += 1
        if args.verbose:
            print(one.hexdigest()[:16], description)
    digest = total.hexdigest()
    print(f"{count} plans, sha256 {digest}")
    expect = args.expect or RECORDED.get((args.seed, args.small))
    if expect is None:
        recorded = ", ".join(f"--seed {k[0]}{' --small' if k[1] else ''}" for k in RECORDED)
        print(
            f"no recorded hash for seed {args.seed}{' --small' if args.small else ''}: nothing was "
            f"checked (recorded: {recorded}; or give --expect)",
            file=sys.stderr,
        )
        return 2
    elif expect != digest:
        print(f"MISMATCH: expected {expect}", file=sys.stderr)
        return 1
    else:
        print("matches the recorded hash")
    return 0


if __name__ == "__main__":
    sys.exit(main())
