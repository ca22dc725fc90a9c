"""The ``moelb`` command line (also ``python -m moelb``).

``moelb demo``: routes a skewed synthetic batch through the DeepSeek-V3 and V4 routers and prints
what the routers do and how unevenly the trivial placement loads the EP ranks -- the load that
EPLB exists to even out. (The end-to-end cluster simulator replaces this demo in a later release.)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np

from . import __version__
from ._core import ExpertLocation, InvalidArgumentError, TopKConfig, set_num_threads
from .routing import HashRouter, TopKOutput, select_experts

__all__ = ["main"]


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([fmt(headers), "  ".join("-" * w for w in widths), *map(fmt, rows)])


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _rank_balancedness(ids: np.ndarray, location: ExpertLocation) -> float:
    """mean/max of the tokens each EP rank receives (1.0 = perfectly even)."""
    valid = ids[ids >= 0]
    ranks = valid // location.num_local_physical_experts
    load = np.bincount(ranks, minlength=location.ep_size).astype(np.float64)
    return float((load.mean() + 1e-5) / (load.max() + 1e-5))


def demo(args: argparse.Namespace) -> int:
    rng = np.random.default_rng(args.seed)
    num_tokens, num_experts, ep_size = args.num_tokens, 256, args.ep_size
    # Skewed traffic: a Zipf-like popularity per expert shifts the router logits, so some experts
    # are hot; which ones is a seeded shuffle.
    popularity = 1.0 / np.arange(1, num_experts + 1) ** args.skew
    popularity = rng.permutation(popularity)
    shift = np.log(popularity / popularity.mean()).astype(np.float32)
    logits = rng.standard_normal((num_tokens, num_experts), dtype=np.float32) + shift
    bias = (0.05 * rng.standard_normal(num_experts)).astype(np.float32)
    input_ids = rng.integers(0, 129280, num_tokens, dtype=np.int64)
    tid2eid = rng.integers(0, num_experts, (129280, 6), dtype=np.int32)
    hash_router = HashRouter(tid2eid, scoring="sqrtsoftplus", routed_scaling_factor=1.5)
    location = ExpertLocation.trivial(1, num_experts, num_experts, ep_size)
    set_num_threads(args.threads)

    v3, v4 = TopKConfig.deepseek_v3(), TopKConfig.deepseek_v4_flash()
    routers: list[tuple[str, str, Callable[[], TopKOutput]]] = [
        ("DeepSeek-V3", "8 keep 4", lambda: select_experts(logits, v3, bias)),
        ("DeepSeek-V4-Flash", "-", lambda: select_experts(logits, v4, bias)),
        ("DeepSeek-V4 hash layer", "-", lambda: hash_router.select(logits, input_ids)),
    ]
    print(
        f"moelb {__version__} routing demo: {num_tokens:,} tokens over {num_experts} experts, "
        f"skew {args.skew}, {args.threads} thread(s), seed {args.seed}\n"
    )
    rows = []
    outputs: list[TopKOutput] = []
    for name, groups, fn in routers:
        seconds = _median_seconds(fn, args.repeats)
        out = fn()
        outputs.append(out)
        counts = np.bincount(out.recorder_topk_ids.ravel(), minlength=num_experts)
        rows.append(
            [
                name,
                str(out.recorder_topk_ids.shape[1]),
                groups,
                f"{num_tokens / seconds:,.0f}",
                f"{counts.max() / counts.sum():.1%}",
                f"{np.sort(counts)[-8:].sum() / counts.sum():.1%}",
                f"{_rank_balancedness(out.recorder_topk_ids, location):.3f}",
            ]
        )
    print(
        _table(
            [
                "router",
                "K",
                "groups",
                "tokens/s",
                "hottest expert",
                "top-8 experts",
                f"rank balancedness (W={ep_size})",
            ],
            rows,
        )
    )
    print(
        f"\nrank balancedness = mean/max tokens per EP rank under the trivial placement "
        f"({num_experts // ep_size} experts per rank); EPLB raises it towards 1.\n"
    )
    print(
        "DeepSeek-V3, first tokens (expert:weight, weights sum to 1; the MoE output is then "
        "scaled by rsf 2.5):"
    )
    for t in range(min(4, num_tokens)):
        row = zip(outputs[0].topk_ids[t], outputs[0].topk_weights[t], strict=True)
        pairs = ", ".join(f"{e}:{w:.3f}" for e, w in row)
        print(f"  token {t}: {pairs}")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moelb", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"moelb {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="route a skewed synthetic batch and print a summary table")
    p.add_argument("--num-tokens", type=_positive_int, default=16384)
    p.add_argument("--ep-size", type=_positive_int, default=32, help="EP ranks (divides 256)")
    p.add_argument("--skew", type=float, default=0.6, help="Zipf exponent of expert popularity")
    p.add_argument("--threads", type=_positive_int, default=2)
    p.add_argument("--repeats", type=_positive_int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except InvalidArgumentError as e:
        print(f"moelb: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (e.g. `moelb demo | head`): not an error
        sys.stdout = open(os.devnull, "w")  # keeps the interpreter quiet at exit
        return 0
