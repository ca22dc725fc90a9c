"""Benchmark: moelb.select_experts / moelb.HashRouter against reference routers, in one run.

For DeepSeek-V3 (grouped sigmoid top-8 of 256), DeepSeek-V4-Flash and -Pro learned layers
(sqrt-softplus top-6 of 256 / 384) and a V4 hash layer (top-6 of 256 looked up from a 129,280-token
table), routes the same seeded float32 logits with

* moelb (the C++ core, ``moelb.set_num_threads(n)``),
* the PyTorch CPU reference of ``torch_reference.py`` (SGLang's torch routers, ``torch.topk``;
  ``torch.set_num_threads(n)``), when PyTorch is importable,
* the vectorised NumPy reference of ``tests/python/routing_reference.py`` (float64),

and prints tokens/s (median of ``--repeats`` timed runs after a warm-up) and moelb's speedup over
each reference at the same thread count, plus a check that the three agree on that input (same
expert ids up to float near-ties, weights within float32 rounding). The three implementations are
timed round-robin, so machine noise hits them alike. This is not a timed test: it never fails on
speed; it exits with status 1 only when the implementations disagree.

    python benchmarks/bench_routing.py                     # 16,384 tokens, 1 and 2 threads
    python benchmarks/bench_routing.py --quick             # smoke test, a few seconds
    python benchmarks/bench_routing.py --json results.json
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import moelb
import numpy as np
import numpy.typing as npt

_HERE = Path(__file__).resolve().parent
for _folder in (_HERE, _HERE.parent / "tests" / "python"):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

from bench_common import load_average, machine_summary, table, write_json  # noqa: E402
from routing_reference import reference_hash_select, reference_select_experts  # noqa: E402

DEFAULT_TOKENS = 16_384
DEFAULT_REPEATS = 15
QUICK_TOKENS = 256
QUICK_REPEATS = 2
HASH_VOCAB_SIZE = 129_280  # DeepSeek-V4's vocabulary
BIAS_STD = 0.05  # the correction bias: small next to the spread of the scores
GOAL_VS_TORCH = 3.0  # the target: moelb >= 3x the PyTorch CPU reference at equal threads
# A row whose deciding choice values are closer than this (relative, as measured by the NumPy
# reference in float64) may legitimately be routed differently by float32 implementations.
NEAR_TIE = 1e-5
WEIGHT_TOLERANCE = 1e-5

Routing = tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]


@dataclass
class Case:
    """One router on one input: three implementations computing the same (ids, weights).

    Each callable runs the whole batch; ``torch`` is None without PyTorch. ``margin`` is the NumPy
    reference's per-row relative gap of the deciding choice values ([T] float64; None for the
    hash router, whose ids do not depend on the logits)."""

    name: str
    num_experts: int
    top_k: int
    moelb: Callable[[], Any]
    numpy: Callable[[], Any]
    torch: Callable[[], Any] | None
    margin: npt.NDArray[np.float64] | None


@dataclass
class Agreement:
    """How moelb's output compares with one reference's on the same input."""

    case: str
    reference: str
    identical_rows: float  # fraction of rows with the same ids in the same order
    same_set_rows: float  # fraction of rows with the same set of ids
    near_tie_mismatches: int  # rows that differ and are float near-ties (margin < NEAR_TIE)
    other_mismatches: int  # rows that differ although not near-ties: a real disagreement
    max_weight_diff: float  # over rows with the same set of ids, weights aligned by expert id

    @property
    def ok(self) -> bool:
        return self.other_mismatches == 0 and self.max_weight_diff <= WEIGHT_TOLERANCE


@dataclass
class Timing:
    """Median seconds per call of each implementation for one case at one thread count."""

    case: str
    threads: int
    num_tokens: int
    seconds: dict[str, float] = field(default_factory=dict)

    def tokens_per_s(self, impl: str) -> float | None:
        s = self.seconds.get(impl)
        return None if s is None else self.num_tokens / s

    def speedup(self, reference: str) -> float | None:
        if reference not in self.seconds:
            return None
        return self.seconds[reference] / self.seconds["moelb"]


def _import_torch_reference() -> tuple[ModuleType, ModuleType] | None:
    try:
        import torch
        import torch_reference
    except ImportError:
        return None
    return torch, torch_reference


def _ids_weights(output: Any) -> Routing:
    """(ids, weights) as NumPy arrays from any implementation's return value."""
    if isinstance(output, moelb.TopKOutput):
        return output.topk_ids, output.topk_weights
    ids, weights = output[0], output[1]
    if hasattr(ids, "numpy"):  # torch tensors
        ids, weights = ids.numpy(), weights.numpy()
    return np.asarray(ids), np.asarray(weights)


def _config_kwargs(config: moelb.TopKConfig) -> dict[str, Any]:
    """The TopKConfig's fields as keyword arguments of the references."""
    return {
        "top_k": config.top_k,
        "renormalize": config.renormalize,
        "routed_scaling_factor": config.routed_scaling_factor,
        "apply_routed_scaling_factor_on_output": config.apply_routed_scaling_factor_on_output,
        "num_fused_shared_experts": config.num_fused_shared_experts,
    }


def _learned_case(
    name: str,
    config: moelb.TopKConfig,
    num_experts: int,
    num_tokens: int,
    rng: np.random.Generator,
    torch_ref: tuple[ModuleType, ModuleType] | None,
) -> Case:
    logits = rng.standard_normal((num_tokens, num_experts), dtype=np.float32)
    bias = (BIAS_STD * rng.standard_normal(num_experts)).astype(np.float32)
    common = _config_kwargs(config)
    grouped = config.num_groups is not None

    def run_numpy() -> Any:
        return reference_select_experts(
            logits,
            scoring=config.scoring,
            num_groups=config.num_groups,
            topk_group=config.topk_group,
            group_score=config.group_score,
            correction_bias=bias,
            **common,
        )

    run_torch: Callable[[], Any] | None = None
    if torch_ref is not None:
        torch, ref = torch_ref
        t_logits, t_bias = torch.from_numpy(logits), torch.from_numpy(bias)
        if grouped:
            if config.group_score != "top2_sum" or config.scoring != "sigmoid":
                raise ValueError(f"{name}: the torch reference is V3's sigmoid top2_sum router")

            def run_torch() -> Any:
                return ref.biased_grouped_topk(
                    t_logits,
                    t_bias,
                    num_groups=config.num_groups,
                    topk_group=config.topk_group,
                    **common,
                )
        else:

            def run_torch() -> Any:
                return ref.biased_topk(t_logits, t_bias, scoring=config.scoring, **common)

    _, _, margin = run_numpy()
    return Case(
        name=name,
        num_experts=num_experts,
        top_k=config.top_k,
        moelb=lambda: moelb.select_experts(logits, config, bias),
        numpy=run_numpy,
        torch=run_torch,
        margin=margin,
    )


def _hash_table(rng: np.random.Generator, vocab_size: int, num_experts: int, top_k: int) -> Any:
    """[vocab_size, top_k] int32: top_k distinct experts per token (a random start, then random
    strides whose sum stays below num_experts)."""
    start = rng.integers(0, num_experts, (vocab_size, 1))
    strides = rng.integers(1, num_experts // top_k + 1, (vocab_size, top_k))
    strides[:, 0] = 0
    return ((start + np.cumsum(strides, axis=1)) % num_experts).astype(np.int32)


def _hash_case(
    name: str,
    num_experts: int,
    top_k: int,
    vocab_size: int,
    routed_scaling_factor: float,
    num_tokens: int,
    rng: np.random.Generator,
    torch_ref: tuple[ModuleType, ModuleType] | None,
) -> Case:
    scoring = "sqrtsoftplus"
    logits = rng.standard_normal((num_tokens, num_experts), dtype=np.float32)
    tid2eid = _hash_table(rng, vocab_size, num_experts, top_k)
    input_ids = rng.integers(0, vocab_size, num_tokens, dtype=np.int64)
    router = moelb.HashRouter(
        tid2eid,
        scoring=scoring,
        routed_scaling_factor=routed_scaling_factor,
        num_experts=num_experts,
    )

    def run_numpy() -> Any:
        return reference_hash_select(
            logits, input_ids, tid2eid, scoring=scoring, routed_scaling_factor=routed_scaling_factor
        )

    run_torch: Callable[[], Any] | None = None
    if torch_ref is not None:
        torch, ref = torch_ref
        t_logits, t_ids = torch.from_numpy(logits), torch.from_numpy(input_ids)
        t_table = torch.from_numpy(tid2eid)

        def run_torch() -> Any:
            return ref.hash_topk(
                t_logits,
                t_ids,
                t_table,
                scoring=scoring,
                routed_scaling_factor=routed_scaling_factor,
            )

    return Case(
        name=name,
        num_experts=num_experts,
        top_k=top_k,
        moelb=lambda: router.select(logits, input_ids),
        numpy=run_numpy,
        torch=run_torch,
        margin=None,
    )


def make_cases(
    num_tokens: int, seed: int, torch_ref: tuple[ModuleType, ModuleType] | None
) -> list[Case]:
    """The benchmarked routers, each on its own seeded standard-normal float32 logits."""
    rng = np.random.default_rng(seed)
    v3 = moelb.TopKConfig.deepseek_v3()
    flash = moelb.TopKConfig.deepseek_v4_flash()
    pro = moelb.TopKConfig.deepseek_v4_pro()
    return [
        _learned_case("V3", v3, 256, num_tokens, rng, torch_ref),
        _learned_case("V4-Flash", flash, 256, num_tokens, rng, torch_ref),
        _learned_case("V4-Pro", pro, 384, num_tokens, rng, torch_ref),
        _hash_case(
            "V4-hash",
            num_experts=256,
            top_k=flash.top_k,
            vocab_size=HASH_VOCAB_SIZE,
            routed_scaling_factor=flash.routed_scaling_factor,
            num_tokens=num_tokens,
            rng=rng,
            torch_ref=torch_ref,
        ),
    ]


def check_agreement(case: Case, reference: str, ref_output: Any, output: Any) -> Agreement:
    """Compares moelb's (ids, weights) with a reference's on the same input."""
    ids, weights = _ids_weights(output)
    ref_ids, ref_weights = _ids_weights(ref_output)
    if ids.shape != ref_ids.shape:
        raise ValueError(f"{case.name}: moelb ids {ids.shape} but {reference} {ref_ids.shape}")
    identical = (ids == ref_ids).all(axis=1)
    order, ref_order = np.argsort(ids, axis=1), np.argsort(ref_ids, axis=1)
    sorted_ids = np.take_along_axis(ids, order, axis=1)
    same_set = (sorted_ids == np.take_along_axis(ref_ids, ref_order, axis=1)).all(axis=1)
    diff = np.abs(
        np.take_along_axis(weights, order, axis=1).astype(np.float64)
        - np.take_along_axis(ref_weights, ref_order, axis=1)
    )[same_set]
    mismatch = ~identical
    if case.margin is None:
        near_tie = np.zeros_like(mismatch)
    else:
        near_tie = mismatch & (case.margin < NEAR_TIE)
    num_rows = max(len(ids), 1)
    return Agreement(
        case=case.name,
        reference=reference,
        identical_rows=float(identical.sum()) / num_rows,
        same_set_rows=float(same_set.sum()) / num_rows,
        near_tie_mismatches=int(near_tie.sum()),
        other_mismatches=int((mismatch & ~near_tie).sum()),
        max_weight_diff=float(diff.max()) if diff.size else 0.0,
    )


def _implementations(case: Case) -> dict[str, Callable[[], Any]]:
    impls = {"moelb": case.moelb}
    if case.torch is not None:
        impls["torch"] = case.torch
    impls["numpy"] = case.numpy
    return impls


def time_case(
    case: Case, threads: int, repeats: int, torch_mod: ModuleType | None, num_tokens: int
) -> Timing:
    """Median seconds per call of each implementation with ``threads`` threads for moelb and
    torch (NumPy's element-wise work is single-threaded either way). One warm-up call each, then
    ``repeats`` rounds timing every implementation once, in an order rotating from round to
    round."""
    moelb.set_num_threads(threads)
    if torch_mod is not None:
        torch_mod.set_num_threads(threads)
    impls = _implementations(case)
    for run in impls.values():
        run()
    names = list(impls)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            start = time.perf_counter()
            impls[name]()
            samples[name].append(time.perf_counter() - start)
    return Timing(
        case=case.name,
        threads=threads,
        num_tokens=num_tokens,
        seconds={name: statistics.median(s) for name, s in samples.items()},
    )


def _fmt_rate(rate: float | None) -> str:
    return "-" if rate is None else f"{rate / 1e6:.2f}"


def _fmt_ratio(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.1f}x"


def format_timings(timings: Sequence[Timing]) -> str:
    header = (
        "case",
        "threads",
        "moelb Mtok/s",
        "torch Mtok/s",
        "numpy Mtok/s",
        "vs torch",
        "vs numpy",
    )
    rows = [
        (
            t.case,
            str(t.threads),
            _fmt_rate(t.tokens_per_s("moelb")),
            _fmt_rate(t.tokens_per_s("torch")),
            _fmt_rate(t.tokens_per_s("numpy")),
            _fmt_ratio(t.speedup("torch")),
            _fmt_ratio(t.speedup("numpy")),
        )
        for t in timings
    ]
    return table(header, rows)


def format_agreement(agreements: Sequence[Agreement]) -> str:
    header = ("case", "vs", "identical rows", "same set", "near ties", "other", "max |dw|", "ok?")
    rows = [
        (
            a.case,
            a.reference,
            f"{a.identical_rows:.4%}",
            f"{a.same_set_rows:.4%}",
            str(a.near_tie_mismatches),
            str(a.other_mismatches),
            f"{a.max_weight_diff:.1e}",
            "ok" if a.ok else "DISAGREE",
        )
        for a in agreements
    ]
    return table(header, rows)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, help=f"tokens per batch (default {DEFAULT_TOKENS})")
    parser.add_argument(
        "--repeats", type=int, help=f"timed runs per measurement (default {DEFAULT_REPEATS})"
    )
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[1, 2], help="thread counts (default: 1 2)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: {QUICK_TOKENS} tokens, {QUICK_REPEATS} repeats unless given",
    )
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    parser.add_argument("--seed", type=int, default=0, help="seed of the inputs (default 0)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results as JSON")
    args = parser.parse_args(argv)
    if args.tokens is None:
        args.tokens = QUICK_TOKENS if args.quick else DEFAULT_TOKENS
    if args.repeats is None:
        args.repeats = QUICK_REPEATS if args.quick else DEFAULT_REPEATS
    if args.tokens < 1 or args.repeats < 1 or min(args.threads) < 1:
        parser.error("--tokens, --repeats and --threads must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch_ref = None if args.no_torch else _import_torch_reference()
    torch_mod = torch_ref[0] if torch_ref is not None else None
    versions = {
        "moelb": moelb.__version__,
        "numpy": np.__version__,
        "torch": torch_mod.__version__ if torch_mod is not None else None,
        "python": platform.python_version(),
    }
    load = load_average()
    print(
        f"select_experts: {args.tokens} tokens, median of {args.repeats} runs; "
        + machine_summary(load, versions)
    )
    if torch_ref is None:
        reason = "--no-torch" if args.no_torch else "PyTorch is not installed"
        print(f"torch reference skipped ({reason})")

    saved_threads = moelb.get_num_threads()
    saved_torch_threads = torch_mod.get_num_threads() if torch_mod is not None else None
    agreements: list[Agreement] = []
    timings: list[Timing] = []
    try:
        cases = make_cases(args.tokens, args.seed, torch_ref)
        for case in cases:
            output = case.moelb()
            agreements.append(check_agreement(case, "numpy", case.numpy(), output))
            if case.torch is not None:
                agreements.append(check_agreement(case, "torch", case.torch(), output))
        for case in cases:
            for threads in args.threads:
                timings.append(time_case(case, threads, args.repeats, torch_mod, args.tokens))
    finally:
        moelb.set_num_threads(saved_threads)
        if torch_mod is not None and saved_torch_threads is not None:
            torch_mod.set_num_threads(saved_torch_threads)

    print()
    print(format_timings(timings))
    below = [t for t in timings if (t.speedup("torch") or GOAL_VS_TORCH) < GOAL_VS_TORCH]
    if torch_ref is not None:
        print(
            f"goal: moelb >= {GOAL_VS_TORCH:g}x torch at equal threads: "
            + (
                "met everywhere"
                if not below
                else "not met for " + ", ".join(f"{t.case}/{t.threads}t" for t in below)
            )
        )
    print()
    print("agreement with moelb on the same input (near ties: rows within a relative")
    print(f"{NEAR_TIE:g} of a tie, where float32 rounding may legitimately pick differently)")
    print(format_agreement(agreements))

    if args.json is not None:
        payload = {
            "benchmark": "select_experts",
            "num_tokens": args.tokens,
            "repeats": args.repeats,
            "seed": args.seed,
            "cpu_count": os.cpu_count(),
            "load_average_before": load,
            "machine": platform.machine(),
            "versions": versions,
            "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
            "results": [
                {
                    "case": t.case,
                    "threads": t.threads,
                    "median_seconds": t.seconds,
                    "tokens_per_s": {k: t.tokens_per_s(k) for k in t.seconds},
                    "speedup_vs_torch": t.speedup("torch"),
                    "speedup_vs_numpy": t.speedup("numpy"),
                }
                for t in timings
            ],
            "agreement": [asdict(a) | {"ok": a.ok} for a in agreements],
        }
        write_json(args.json, payload)
        print(f"\nwrote {args.json}")

    failed = [a for a in agreements if not a.ok]
    if failed:
        print(
            "\nDISAGREEMENT: " + ", ".join(f"{a.case} vs {a.reference}" for a in failed),
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
