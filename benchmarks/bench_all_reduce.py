"""Benchmark: ``ExpertDistributionRecorder.all_reduce`` across real processes against a plain
``torch.distributed.all_reduce`` of the same bytes.

Each case starts ``ranks`` gloo processes on this machine. Every rank records ``passes`` forward
passes of a DeepSeek-V3-shaped model (61 layers, 256 experts on 288 slots, 256-token top-8 batches
per layer, seeded per rank), then times, median of ``repeats``: (a) ``dist.all_reduce`` of its
[passes, 61, 288] int32 counts (the bytes the merge has to move, the floor), and (b)
``recorder.all_reduce()``. The result must equal the plain sum (checked on every rank; the run
fails otherwise). The issue's goal: (b) within 5x of (a) at 1,000 passes.

This is not a timed test: it prints figures and never fails on speed. ``--quick`` runs a small
case in a few seconds (the test suite's smoke test). Other scripts can call ``measure(...)``:

    python benchmarks/bench_all_reduce.py               # 2 and 4 ranks, 400 and 1,000 passes
    python benchmarks/bench_all_reduce.py --ranks 2 --passes 1000 --repeats 5
    python benchmarks/bench_all_reduce.py --quick --json results.json
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

from bench_common import load_average, table, write_json  # noqa: E402

NUM_LAYERS = 61  # DeepSeek-V3's decoder layers (the recorder's L counts dense layers too)
NUM_EXPERTS = 256
NUM_PHYSICAL = 288
TOKENS = 256
TOP_K = 8
FULL_CASES = ((2, 400), (2, 1000), (4, 400), (4, 1000))
QUICK_CASES = ((2, 20),)


@dataclass
class Result:
    ranks: int
    passes: int
    layers: int
    mode: str
    megabytes: float  # int32 counts of the window, per rank
    all_reduce_seconds: float  # plain dist.all_reduce of the same bytes
    recorder_seconds: float  # recorder.all_reduce()
    ratio: float
    agrees: bool


def _rank_main(
    rank: int, world: int, init: str, spec: dict[str, Any], queue: Any
) -> None:  # pragma: no cover - runs in the child processes
    import moelb
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        layers, passes, repeats = spec["layers"], spec["passes"], spec["repeats"]
        location = moelb.ExpertLocation.trivial(layers, NUM_EXPERTS, NUM_PHYSICAL, ep_size=world)
        recorder = moelb.ExpertDistributionRecorder(location, mode=spec["mode"], ep_rank=rank)
        rng = np.random.default_rng(rank)
        batches = [
            rng.integers(-1, NUM_PHYSICAL, (TOKENS, TOP_K), dtype=np.int32) for _ in range(8)
        ]
        recorder.start()
        for p in range(passes):
            recorder.begin_forward_pass()
            for layer in range(layers):
                recorder.begin_layer(layer)
                recorder.on_select_experts(batches[(p + layer) % len(batches)])
                recorder.end_layer()
            recorder.end_forward_pass()
        counts = recorder.physical_count()

        plain = []
        for _ in range(repeats):
            tensor = torch.from_numpy(counts.copy())
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            plain.append(time.perf_counter() - start)
        expected = tensor.numpy()

        merged = []
        agrees = True
        for i in range(repeats):
            # Later repeats merge the merged window again: the same work on larger counts.
            dist.barrier()
            start = time.perf_counter()
            recorder.all_reduce()
            merged.append(time.perf_counter() - start)
            if i == 0:
                agrees = bool(np.array_equal(recorder.physical_count(), expected))
        flags = torch.tensor([int(agrees)])
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        if rank == 0:
            queue.put(
                {
                    "all_reduce_seconds": statistics.median(plain),
                    "recorder_seconds": statistics.median(merged),
                    "agrees": bool(flags.item()),
                }
            )
    finally:
        dist.destroy_process_group()


def measure(
    ranks: int,
    passes: int,
    layers: int = NUM_LAYERS,
    repeats: int = 3,
    mode: str = "stat",
    timeout: float = 1200,
) -> Result:
    """Times ``recorder.all_reduce()`` and a plain ``dist.all_reduce`` of the same counts across
    ``ranks`` gloo processes (``passes`` DeepSeek-V3 passes of ``layers`` layers each)."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    spec = {"layers": layers, "passes": passes, "repeats": repeats, "mode": mode}
    with tempfile.TemporaryDirectory() as folder:
        init = f"file://{folder}/rendezvous"
        processes = [
            context.Process(target=_rank_main, args=(r, ranks, init, spec, queue))
            for r in range(ranks)
        ]
        for p in processes:
            p.start()
        try:
            raw = queue.get(timeout=timeout)
        finally:
            for p in processes:
                p.join(timeout=60)
                if p.is_alive():
                    p.kill()
        failed = [p.exitcode for p in processes if p.exitcode != 0]
        if failed:
            raise RuntimeError(f"a rank process failed (exit codes {failed})")
    return Result(
        ranks=ranks,
        passes=passes,
        layers=layers,
        mode=mode,
        megabytes=passes * layers * NUM_PHYSICAL * 4 / 1e6,
        ratio=raw["recorder_seconds"] / raw["all_reduce_seconds"],
        **raw,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small case, a few seconds")
    parser.add_argument("--ranks", type=int, nargs="+", help="process counts (default 2 4)")
    parser.add_argument("--passes", type=int, nargs="+", help="window sizes (default 400 1000)")
    parser.add_argument("--layers", type=int, help=f"layers (default {NUM_LAYERS})")
    parser.add_argument("--repeats", type=int, help="timed calls per case (median; default 3)")
    parser.add_argument("--mode", default="stat", choices=("stat", "per_pass", "per_token"))
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    import moelb

    layers = args.layers or (4 if args.quick else NUM_LAYERS)
    repeats = args.repeats or (1 if args.quick else 3)
    cases = QUICK_CASES if args.quick else FULL_CASES
    if args.ranks or args.passes:
        cases = tuple(
            (r, p)
            for r in (args.ranks or sorted({c[0] for c in cases}))
            for p in (args.passes or sorted({c[1] for c in cases}))
        )
    load = load_average()
    print(
        f"moelb {moelb.__version__}, {platform.machine()}, Python {platform.python_version()}, "
        f"load average {load:.2f}; gloo processes on this machine; {layers} layers x "
        f"{NUM_PHYSICAL} slots, {args.mode} mode, median of {repeats}"
    )
    results = [measure(r, p, layers, repeats, args.mode) for r, p in cases]
    print(
        table(
            [
                "ranks",
                "passes",
                "MB",
                "dist.all_reduce ms",
                "recorder.all_reduce ms",
                "ratio",
                "ok",
            ],
            [
                [
                    str(r.ranks),
                    str(r.passes),
                    f"{r.megabytes:.1f}",
                    f"{r.all_reduce_seconds * 1e3:.1f}",
                    f"{r.recorder_seconds * 1e3:.1f}",
                    f"{r.ratio:.2f}x",
                    "yes" if r.agrees else "NO",
                ]
                for r in results
            ],
        )
    )
    if args.json:
        write_json(
            args.json,
            {"load_average": load, "results": [asdict(r) for r in results]},
        )
    return 0 if all(r.agrees for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
