"""Benchmark: what the step-time model costs the simulator, against a NumPy reference, in one run.

The simulator times every realised step of every placement under every dispatch model: per MoE
layer it counts the slots' tokens and the dispatch copies each GPU sends and receives over NVLink
and the network (``moelb.step_time.dispatch_traffic``, one pass in the core), then applies the
GPU calibration (``StepTimeModel.step_time``, on [L, P] slot loads). This script times the
counting against a NumPy reference written here (a sort of each token's destination GPUs, first
occurrences, the network copies deduplicated per (token, node): what the first implementation
did), on DeepSeek-V3's demo cluster (288 slots on 32 GPUs in 4 nodes, top-8) at a decode-like
(128 tokens per GPU) and a prefill-like (4,096 per GPU) step, in both DeepEP modes; checks that
both give the same counts (exit status 1 otherwise); and times the model on a step's 58 layers.
Not a timed test: it never fails on speed.

    python benchmarks/bench_step_time.py             # both sizes, 20 repeats
    python benchmarks/bench_step_time.py --quick     # smoke test, a second
    python benchmarks/bench_step_time.py --json results.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import moelb
import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import load_average, machine_summary, table, write_json

EP_SIZE, NUM_NODES, NUM_PHYSICAL_EXPERTS, TOP_K, NUM_MOE_LAYERS = 32, 4, 288, 8, 58
TOKENS_PER_GPU = (128, 4096)
QUICK_TOKENS_PER_GPU = (16, 128)


def numpy_copies(
    physical: npt.NDArray[np.int32], source: npt.NDArray[np.int64], mode: str
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """The reference: (slot_tokens [P], copies [4, W]) by NumPy array operations."""
    W, G, N = EP_SIZE, EP_SIZE // NUM_NODES, NUM_NODES
    S = NUM_PHYSICAL_EXPERTS // W
    slots = np.bincount(physical[physical >= 0], minlength=NUM_PHYSICAL_EXPERTS)
    dest = np.where(physical >= 0, physical // S, -1).astype(np.int64)
    if mode == "normal":
        dest = np.sort(dest, axis=1)
        first = np.ones(dest.shape, dtype=bool)
        first[:, 1:] = dest[:, 1:] != dest[:, :-1]
        keep = first & (dest >= 0)
    else:
        keep = dest >= 0
    rows = np.nonzero(keep)[0]
    d = dest[keep]
    s = source[rows]
    same = d // G == s // G

    def count(index: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        return np.bincount(index, minlength=W)

    intra = same & (d != s)
    out = np.zeros((4, W), dtype=np.int64)
    out[0], out[1] = count(s[intra]), count(d[intra])
    cross = ~same
    if mode == "normal":
        relay = (d // G) * G + s % G
        key = rows * N + d // G
        new = np.ones(len(d), dtype=bool)
        new[1:] = key[1:] != key[:-1]
        out[2], out[3] = count(s[cross & new]), count(relay[cross & new])
        forward = cross & (d != relay)
        out[0] += count(relay[forward])
        out[1] += count(d[forward])
    else:
        out[2], out[3] = count(s[cross]), count(d[cross])
    return slots, out


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 20)
    sizes = QUICK_TOKENS_PER_GPU if args.quick else TOKENS_PER_GPU
    print(machine_summary(load_average(), {"moelb": moelb.__version__, "numpy": np.__version__}))
    rng = np.random.default_rng(0)
    rows, results, problems = [], [], []
    for per_gpu in sizes:
        T = per_gpu * EP_SIZE
        # Each token's top-8 slots, distinct within the token, on a random placement.
        physical = np.argsort(rng.random((T, NUM_PHYSICAL_EXPERTS)), axis=1)[:, :TOP_K]
        physical = np.ascontiguousarray(physical, dtype=np.int32)
        source = np.repeat(np.arange(EP_SIZE), per_gpu)
        source32 = source.astype(np.int32)
        for mode in moelb.DEEPEP_MODES:
            slots, copies = moelb.step_time.dispatch_traffic(
                physical, source32, NUM_PHYSICAL_EXPERTS, EP_SIZE, NUM_NODES, mode
            )
            ref_slots, ref_copies = numpy_copies(physical, source, mode)
            got = np.stack([getattr(copies, f) for f in moelb.LinkCopies.__dataclass_fields__])
            if not (np.array_equal(slots, ref_slots) and np.array_equal(got, ref_copies)):
                problems.append(f"{per_gpu} tokens/GPU, {mode}: the core and NumPy disagree")
            core = median_seconds(
                lambda ids=physical, src=source32, m=mode: moelb.step_time.dispatch_traffic(
                    ids, src, NUM_PHYSICAL_EXPERTS, EP_SIZE, NUM_NODES, m
                ),
                repeats,
            )
            ref = median_seconds(
                lambda ids=physical, src=source, m=mode: numpy_copies(ids, src, m), repeats
            )
            results.append(
                {"tokens_per_gpu": per_gpu, "mode": mode, "core_ms": core * 1e3,
                 "numpy_ms": ref * 1e3, "ratio": ref / core}
            )  # fmt: skip
            rows.append(
                [f"{per_gpu:,}", mode, f"{core * 1e3:.3f}", f"{ref * 1e3:.3f}", f"{ref / core:.1f}"]
            )
    print("\none layer's slot loads and dispatch copies, 288 slots on 32 GPUs in 4 nodes, top-8")
    print(table(["tokens/GPU", "mode", "core ms", "NumPy ms", "NumPy / core"], rows, left=(1,)))
    # The model on a step: 58 layers of slot loads and copies.
    cal = moelb.gpu_calibration.gpu_calibration_from_dict(_fixture(), "fixture")
    model = moelb.StepTimeModel(cal)
    slot_tokens = rng.integers(0, 4000, (NUM_MOE_LAYERS, NUM_PHYSICAL_EXPERTS))
    link = moelb.LinkCopies(*(rng.random((NUM_MOE_LAYERS, EP_SIZE)) * 1e4 for _ in range(4)))
    step = median_seconds(lambda: model.step_time(slot_tokens, EP_SIZE, link), repeats)
    print(f"\nStepTimeModel.step_time on one step of {NUM_MOE_LAYERS} layers: {step * 1e3:.3f} ms")
    for p in problems:
        print(f"PROBLEM: {p}")
    if args.json is not None:
        write_json(
            args.json,
            {"results": results, "model_step_ms": step * 1e3, "problems": problems,
             "load_average": load_average()},
        )  # fmt: skip
    return 1 if problems else 0


def _fixture() -> dict[str, Any]:
    """A calibration for timing the arithmetic only (its numbers do not matter here): the
    shipped default when the package has one, else round numbers."""
    if moelb.DEFAULT_GPU in moelb.available_gpus():
        import json

        return json.loads(Path(moelb.load_gpu_calibration().source).read_text())
    return {
        "format": "moelb-gpu-calibration", "version": 1, "key": "bench", "gpu": "bench",
        "memory_bandwidth_bytes_per_s": 3e12, "layer_fixed_s": 1e-5,
        "gemm": [{"model": "deepseek-v3", "dtype": "fp8_e4m3", "hidden_size": 7168,
                  "intermediate_size": 2048, "weight_bytes_per_expert": 3 * 7168 * 2048,
                  "method": "none", "tokens": [0, 128, 8192],
                  "seconds_per_expert": [0.0, 2e-5, 8e-4]}],
    }  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
