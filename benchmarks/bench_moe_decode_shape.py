"""Decode at DeepSeek-V3's own expert shape: the MoE layer's achieved read bandwidth against the
machine's (issue 23's decode goal, >= 60% of the measured read bandwidth).

`bench_moe.py --sections formats` times the V3-scaled layer (H 1024, I 256: 256 experts that fit
this machine next to PyTorch's copies); its down projection's rows are 256 values long (512 bytes
in bf16), so every few kilobytes the kernel starts new rows and the per-call work of the layer
weighs more than at DeepSeek's size. This script keeps V3's expert shape (H 7168, I 2048, one
shared expert) and fewer experts (16, top-8, ungrouped), so one token reads 8 routed experts, the
shared one and the gate as DeepSeek-V3 does (0.8 GB in bf16, 0.4 GB in fp8 / int8), and reports
the layer's GB/s (the bytes the batch reads / the median time, cycling through distinct batches)
next to ``moelb.measure_machine_limits``' read bandwidth in the same run, at each thread count.
No PyTorch: the reference is the machine's bandwidth.

    python benchmarks/bench_moe_decode_shape.py                   # bf16, fp8, int8; T = 1, 4
    python benchmarks/bench_moe_decode_shape.py --quick           # a tiny shape (smoke test)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import moelb
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_moe
from bench_common import load_average, machine_summary, table, write_json

GOAL = bench_moe.GOAL_DECODE_BANDWIDTH


def shape(quick: bool) -> moelb.DeepSeekMoEConfig:
    """DeepSeek-V3's experts, 16 of them, top-8 (quick: H 256, I 128, 9 experts)."""
    v3 = moelb.DeepSeekMoEConfig.deepseek_v3().replace(
        num_experts=16, top_k=8, num_groups=None, topk_group=None
    )
    return v3.replace(hidden_size=256, intermediate_size=128, num_experts=9) if quick else v3


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", nargs="+", default=["bfloat16", "fp8_e4m3", "int8"])
    parser.add_argument("--activation", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median)")
    parser.add_argument("--inputs", type=int, default=4, help="distinct batches per round")
    parser.add_argument("--quick", action="store_true", help="a tiny shape, 2 rounds")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.inputs = 2, 2
    config = shape(args.quick)
    case = bench_moe.Case("V3-shape" if not args.quick else "V3-shape-quick", config, 1.0)
    saved = moelb.get_num_threads()
    print(
        f"MoE layer decode at DeepSeek-V3's expert shape: {bench_moe._describe(case)}; "
        + machine_summary(load_average(), {"moelb": moelb.__version__, "numpy": np.__version__})
    )
    limits = {}
    rows = []
    results = []
    try:
        for n in args.threads:
            limits[n] = bench_moe.machine_limits(n, args.quick)
        base = moelb.random_moe_weights(config, 0)
        for fmt in args.formats:
            weights = bench_moe.format_weights(base, fmt, bench_moe._block_size(config))
            layer_config = bench_moe._format_config(config, fmt).replace(
                activation_dtype=args.activation
            )
            layer = moelb.DeepSeekMoE(layer_config, weights)
            for t in args.tokens:
                xs = [
                    bench_moe._as_activation(bench_moe._hidden(case, t, 1 + j), args.activation)
                    for j in range(args.inputs)
                ]
                nbytes = statistics.fmean(bench_moe.bytes_read(config, weights, x) for x in xs)
                for n in args.threads:
                    moelb.set_num_threads(n)
                    for x in xs:  # warm-up
                        layer(x)
                    samples = []
                    for _ in range(args.repeats):
                        start = time.perf_counter()
                        for x in xs:
                            layer(x)
                        samples.append((time.perf_counter() - start) / len(xs))
                    seconds = statistics.median(samples)
                    gbs = nbytes / seconds / 1e9
                    ratio = gbs / limits[n]["read_gbs"]
                    results.append(
                        {
                            "weight_format": fmt,
                            "activation_dtype": args.activation,
                            "num_tokens": t,
                            "threads": n,
                            "bytes_read": nbytes,
                            "median_seconds": seconds,
                            "gbs": gbs,
                            "read_bandwidth_ratio": ratio,
                        }
                    )
                    rows.append(
                        [
                            fmt,
                            str(t),
                            str(n),
                            f"{seconds * 1e3:.2f}",
                            f"{nbytes / 1e6:.0f}",
                            f"{gbs:.1f}",
                            f"{limits[n]['read_gbs']:.1f}",
                            f"{ratio:.2f}",
                        ]
                    )
            del layer, weights
    finally:
        moelb.set_num_threads(saved)
    print(
        table(
            ["format", "T", "thr", "ms", "MB read", "GB/s", "read BW", "/ read BW"],
            rows,
            left=(0,),
        )
    )
    met = [r for r in results if r["read_bandwidth_ratio"] >= GOAL]
    worst = min(results, key=lambda r: r["read_bandwidth_ratio"])
    print(
        f"goal: decode GB/s >= {GOAL} x the measured read bandwidth: met on {len(met)} of "
        f"{len(results)}; worst {worst['read_bandwidth_ratio']:.2f} ({worst['weight_format']}, "
        f"T={worst['num_tokens']}, {worst['threads']}t)"
    )
    if args.json:
        write_json(
            args.json,
            {
                "config": config.as_dict(),
                "machine_limits": {str(n): lim for n, lim in limits.items()},
                "results": results,
                "goal": GOAL,
                "command": " ".join(sys.argv),
            },
        )
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
