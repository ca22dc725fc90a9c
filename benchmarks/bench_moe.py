"""Benchmark: the DeepSeek MoE layer forward (``moelb.DeepSeekMoE``) against a float32 PyTorch
reference, in one run, and the peak memory that deferring the shared expert saves.

**Throughput.** Two DeepSeek-shaped layers, scaled down so that their weights fit this 2-CPU,
24 GiB machine next to a copy in the layer and a forward of 4,096 tokens takes about a second:

* ``V3-scaled``: ``DeepSeekMoEConfig.deepseek_v3()`` with H = 1024 and I = 256 (V3: 7168 and 2048,
  so H / I = 4 against 3.5). Everything that shapes the routing and the work per expert is V3's:
  256 routed experts, top-8, sigmoid scores with a correction bias, 8 groups keep 4 (top-2 sum),
  renormalised, rsf 2.5, one shared expert of size I. With E and K unchanged, each expert gets
  T K / E = T / 32 tokens on average, as in V3, so the GEMM shapes per expert (and how often its
  weights are reused) match the real layer's; only the GEMMs are narrower. 768 MiB of weights.
* ``V4-Flash-scaled``: a learned (non-hash) layer of ``deepseek_v4_flash()`` with H = 512, I = 256
  (V4-Flash: 4096, 2048): 256 experts, top-6 of sqrt-softplus scores with a correction bias,
  ungrouped, rsf 1.5, and the SwiGLU clamp at 10 on the routed and shared experts. Its input is
  scaled by 4 so that the clamp acts (about 0.6% of the gate values and 1.2% of the up values
  exceed 10). 384 MiB of weights.

For each layer, T in {256, 4096} seeded float32 hidden states are run through

* moelb: ``layer.forward(hidden)`` (the out-of-place kernel, shared expert deferred), threads set
  with ``moelb.set_num_threads(n)``;
* torch: ``torch_moe_reference.TorchDeepSeekMoE`` (our float32 reading of SGLang's CPU fallback:
  the gate GEMM, the routers of ``torch_reference.py``, the per-expert loop of
  ``moe_forward_native`` with ``F.linear``, then the shared expert MLP), under
  ``torch.inference_mode()``, threads set with ``torch.set_num_threads(n)``;

at 1 and 2 threads. After one warm-up call each, ``--repeats`` rounds time both once, in an order
alternating from round to round so that machine noise hits them alike; the table gives tokens/s
from the median wall time, and moelb's ratio to torch. The goal: moelb at least matches the
PyTorch reference's throughput at equal threads.

Agreement: moelb's output must equal torch's within 1e-4 of the largest magnitude of torch's
output (float32 GEMMs summing in different orders differ by ~1e-6 of it), and moelb's output must
be bitwise the same at every thread count.

**Peak memory.** For the real DeepSeek-V3 shape at T = 4,096 (45 GB of weights: not
instantiated), ``config.expected_peak_bytes`` with the shared expert deferred after the
out-of-place routed kernel (``defer_shared='auto'``), not deferred (``defer_shared=False``), and
with the in-place kernel (which cannot defer); deferral saves exactly one [T, H] float32 buffer,
4 T H bytes. On ``V3-scaled`` at the largest T the same three variants are run and
``last_stats()['peak_bytes']`` (the byte-counting workspace) is compared with
``expected_peak_bytes`` for the lanes the forward used: they must be equal, the saving must be
4 T H, and the three outputs bitwise identical.

This is not a timed test: it never fails on speed; it exits with status 1 only when the
implementations disagree or a measured peak differs from the formula.

    python benchmarks/bench_moe.py               # T = 256 and 4,096; 1 and 2 threads; ~3 min
    python benchmarks/bench_moe.py --quick       # smoke test: tiny layers, a few seconds
    python benchmarks/bench_moe.py --json results.json
"""

from __future__ import annotations

import argparse
import gc
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
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

from bench_common import load_average, machine_summary, table, write_json  # noqa: E402

DEFAULT_TOKENS = (256, 4096)
DEFAULT_REPEATS = 7
QUICK_TOKENS = (64,)
QUICK_REPEATS = 2
MEMORY_TOKENS = 4096  # the DeepSeek-V3 formula rows
GOAL_VS_TORCH = 1.0  # the target: moelb >= the PyTorch CPU reference at equal threads
RELATIVE_TOLERANCE = 1e-4  # of the largest magnitude of the reference output
MIB = 1 << 20


@dataclass
class Case:
    """One scaled DeepSeek layer: its config and the scale of its seeded standard-normal input."""

    name: str
    config: moelb.DeepSeekMoEConfig
    hidden_scale: float


def make_cases(quick: bool) -> list[Case]:
    """The benchmarked layers (tiny versions of the same with ``quick``)."""
    v3 = moelb.DeepSeekMoEConfig.deepseek_v3()
    flash = moelb.DeepSeekMoEConfig.deepseek_v4_flash(layer_id=3)  # a learned (non-hash) layer
    if quick:
        return [
            Case("V3-scaled", v3.replace(hidden_size=128, intermediate_size=32), 1.0),
            Case("V4-Flash-scaled", flash.replace(hidden_size=64, intermediate_size=32), 4.0),
        ]
    return [
        Case("V3-scaled", v3.replace(hidden_size=1024, intermediate_size=256), 1.0),
        Case("V4-Flash-scaled", flash.replace(hidden_size=512, intermediate_size=256), 4.0),
    ]


def weight_bytes(config: moelb.DeepSeekMoEConfig) -> int:
    """float32 bytes of the routed and shared expert weights and the gate."""
    h, i, e = config.hidden_size, config.intermediate_size, config.num_experts
    return 4 * (e * 3 * i * h + 3 * config.shared_intermediate_size * h + e * h)


@dataclass
class Agreement:
    """moelb's output against torch's on one input."""

    case: str
    num_tokens: int
    max_abs_diff: float
    max_abs_reference: float
    same_for_all_threads: bool

    @property
    def relative_diff(self) -> float:
        return self.max_abs_diff / max(self.max_abs_reference, 1e-30)

    @property
    def ok(self) -> bool:
        return self.same_for_all_threads and self.relative_diff <= RELATIVE_TOLERANCE


@dataclass
class Timing:
    """Median seconds per forward of each implementation for one case, T and thread count."""

    case: str
    num_tokens: int
    threads: int
    seconds: dict[str, float] = field(default_factory=dict)

    def tokens_per_s(self, impl: str) -> float | None:
        s = self.seconds.get(impl)
        return None if s is None else self.num_tokens / s

    def ratio(self) -> float | None:
        """moelb's throughput over torch's."""
        if "torch" not in self.seconds:
            return None
        return self.seconds["torch"] / self.seconds["moelb"]


@dataclass
class PeakRow:
    """One variant's peak workspace bytes (measured: None for formula-only rows)."""

    case: str
    variant: str
    num_tokens: int
    threads: int | None
    steps: list[str]
    expected_bytes: int
    measured_bytes: int | None = None
    routed_lanes: int | None = None
    shared_lanes: int | None = None

    @property
    def ok(self) -> bool:
        return self.measured_bytes is None or self.measured_bytes == self.expected_bytes


# (label, config changes): the three orders of the forward.
VARIANTS = (
    ("deferred (out-of-place, defer_shared='auto')", {"defer_shared": "auto"}),
    ("not deferred (out-of-place, defer_shared=False)", {"defer_shared": False}),
    ("in-place kernel (cannot defer)", {"kernel": "inplace", "defer_shared": "auto"}),
)


def _import_torch_reference() -> tuple[ModuleType, ModuleType] | None:
    try:
        import torch
        import torch_moe_reference
    except ImportError:
        return None
    return torch, torch_moe_reference


def _hidden(case: Case, num_tokens: int, seed: int) -> npt.NDArray[np.float32]:
    rng = np.random.default_rng([seed, num_tokens])
    x = rng.standard_normal((num_tokens, case.config.hidden_size), dtype=np.float32)
    x *= np.float32(case.hidden_scale)
    return x


def time_impls(
    impls: dict[str, Callable[[], Any]],
    threads: int,
    repeats: int,
    torch_mod: ModuleType | None,
) -> dict[str, float]:
    """Median seconds per call of each implementation at ``threads`` threads: one warm-up call
    each, then ``repeats`` rounds timing each once, in an order rotating from round to round."""
    moelb.set_num_threads(threads)
    if torch_mod is not None:
        torch_mod.set_num_threads(threads)
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
    return {name: statistics.median(s) for name, s in samples.items()}


def run_case(
    case: Case,
    tokens: Sequence[int],
    threads: Sequence[int],
    repeats: int,
    seed: int,
    torch_ref: tuple[ModuleType, ModuleType] | None,
) -> tuple[list[Timing], list[Agreement], dict[str, Any]]:
    """Times and checks one layer; returns its timings, agreements and weights (reused by the
    peak-memory measurement)."""
    weights = moelb.random_moe_weights(case.config, seed)
    layer = moelb.DeepSeekMoE(case.config, weights)
    reference = None
    if torch_ref is not None:
        torch, ref_mod = torch_ref
        reference = ref_mod.TorchDeepSeekMoE(case.config, weights)
    timings: list[Timing] = []
    agreements: list[Agreement] = []
    for num_tokens in tokens:
        x = _hidden(case, num_tokens, seed)
        outputs = []
        for n in threads:
            moelb.set_num_threads(n)
            outputs.append(layer(x))
        same = all(np.array_equal(outputs[0], o) for o in outputs[1:])
        impls: dict[str, Callable[[], Any]] = {"moelb": lambda x=x: layer(x)}
        if reference is not None:
            tx = torch.from_numpy(x)

            def run_torch(tx: Any = tx) -> Any:
                with torch.inference_mode():
                    return reference(tx)

            impls["torch"] = run_torch
            torch.set_num_threads(threads[0])
            expected = run_torch().numpy()
            agreements.append(
                Agreement(
                    case=case.name,
                    num_tokens=num_tokens,
                    max_abs_diff=float(
                        np.abs(outputs[0].astype(np.float64) - expected).max(initial=0.0)
                    ),
                    max_abs_reference=float(np.abs(expected).max(initial=0.0)),
                    same_for_all_threads=same,
                )
            )
        elif not same:
            agreements.append(Agreement(case.name, num_tokens, 0.0, 0.0, same))
        del outputs
        for n in threads:
            seconds = time_impls(impls, n, repeats, torch_ref[0] if torch_ref else None)
            timings.append(Timing(case.name, num_tokens, n, seconds))
    return timings, agreements, weights


def formula_rows(num_tokens: int, lanes: int) -> list[PeakRow]:
    """DeepSeek-V3 at ``num_tokens``: the formula's peak of each variant, ``lanes`` lanes."""
    v3 = moelb.DeepSeekMoEConfig.deepseek_v3()
    rows = []
    for label, changes in VARIANTS:
        config = v3.replace(**changes)
        rows.append(
            PeakRow(
                case="DeepSeek-V3",
                variant=label,
                num_tokens=num_tokens,
                threads=None,
                steps=_steps(config),
                expected_bytes=config.expected_peak_bytes(
                    num_tokens, routed_lanes=lanes, shared_lanes=lanes
                ),
                routed_lanes=lanes,
                shared_lanes=lanes,
            )
        )
    return rows


def _steps(config: moelb.DeepSeekMoEConfig) -> list[str]:
    """The order of the forward's steps under ``config`` (as ``last_stats()['steps']``)."""
    routed = ["gate", "topk", "routed"]
    deferred = config.kernel == "out_of_place" and config.defer_shared in ("auto", True)
    return [*routed, "shared", "combine"] if deferred else ["shared", *routed, "combine"]


def measured_rows(
    case: Case, weights: dict[str, Any], num_tokens: int, threads: Sequence[int], seed: int
) -> tuple[list[PeakRow], bool]:
    """Runs the three variants of ``case`` at ``num_tokens`` at each thread count; returns the
    rows and whether their outputs were bitwise identical."""
    x = _hidden(case, num_tokens, seed)
    rows: list[PeakRow] = []
    outputs: list[npt.NDArray[np.float32]] = []
    for label, changes in VARIANTS:
        config = case.config.replace(**changes)
        layer = moelb.DeepSeekMoE(config, weights)
        for n in threads:
            moelb.set_num_threads(n)
            out = layer(x.copy())  # the in-place kernel overwrites its input
            s = layer.last_stats()
            if n == threads[0]:
                outputs.append(out)
            rows.append(
                PeakRow(
                    case=case.name,
                    variant=label,
                    num_tokens=num_tokens,
                    threads=n,
                    steps=list(s["steps"]),
                    expected_bytes=config.expected_peak_bytes(
                        num_tokens,
                        routed_lanes=s["routed_lanes"],
                        shared_lanes=s["shared_lanes"],
                    ),
                    measured_bytes=s["peak_bytes"],
                    routed_lanes=s["routed_lanes"],
                    shared_lanes=s["shared_lanes"],
                )
            )
        del layer
        gc.collect()
    identical = all(np.array_equal(outputs[0], o) for o in outputs[1:])
    return rows, identical


def savings(rows: Sequence[PeakRow]) -> list[tuple[PeakRow, PeakRow, int]]:
    """(deferred, not deferred, saving in bytes) per case, T and thread count."""
    by_key: dict[tuple[str, int, int | None], dict[str, PeakRow]] = {}
    for r in rows:
        by_key.setdefault((r.case, r.num_tokens, r.threads), {})[r.variant] = r
    result = []
    for variants in by_key.values():
        deferred, eager = variants[VARIANTS[0][0]], variants[VARIANTS[1][0]]

        def peak(r: PeakRow) -> int:
            return r.measured_bytes if r.measured_bytes is not None else r.expected_bytes

        result.append((deferred, eager, peak(eager) - peak(deferred)))
    return result


def _fmt_rate(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:,.0f}"


def _fmt_mib(n: int | None) -> str:
    return "-" if n is None else f"{n / MIB:,.2f}"


def format_timings(timings: Sequence[Timing]) -> str:
    header = ("case", "tokens", "threads", "moelb tok/s", "torch tok/s", "moelb/torch")
    rows = [
        (
            t.case,
            str(t.num_tokens),
            str(t.threads),
            _fmt_rate(t.tokens_per_s("moelb")),
            _fmt_rate(t.tokens_per_s("torch")),
            "-" if t.ratio() is None else f"{t.ratio():.2f}x",
        )
        for t in timings
    ]
    return table(header, rows)


def format_agreement(agreements: Sequence[Agreement]) -> str:
    header = ("case", "tokens", "max |moelb - torch|", "/ max |torch|", "same 1t/2t", "ok?")
    rows = [
        (
            a.case,
            str(a.num_tokens),
            f"{a.max_abs_diff:.2e}",
            f"{a.relative_diff:.1e}",
            "yes" if a.same_for_all_threads else "NO",
            "ok" if a.ok else "DISAGREE",
        )
        for a in agreements
    ]
    return table(header, rows)


def format_peaks(rows: Sequence[PeakRow], measured: bool) -> str:
    header = ["variant", "steps", "lanes r/s", "expected MiB"]
    if measured:
        header = ["threads", *header, "measured MiB", "equal?"]
    out = []
    for r in rows:
        cells = [
            r.variant,
            " > ".join(r.steps),
            f"{r.routed_lanes}/{r.shared_lanes}",
            _fmt_mib(r.expected_bytes),
        ]
        if measured:
            cells = [
                str(r.threads),
                *cells,
                _fmt_mib(r.measured_bytes),
                "yes" if r.ok else "NO",
            ]
        out.append(cells)
    return table(header, out, left=(0, 1, 2) if measured else (0, 1))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tokens",
        type=int,
        nargs="+",
        help=f"batch sizes T (default {' '.join(map(str, DEFAULT_TOKENS))})",
    )
    parser.add_argument(
        "--repeats", type=int, help=f"timed runs per measurement (default {DEFAULT_REPEATS})"
    )
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[1, 2], help="thread counts (default: 1 2)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: tiny layers, {QUICK_TOKENS[0]} tokens, {QUICK_REPEATS} repeats",
    )
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and inputs")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results as JSON")
    args = parser.parse_args(argv)
    if args.tokens is None:
        args.tokens = list(QUICK_TOKENS if args.quick else DEFAULT_TOKENS)
    if args.repeats is None:
        args.repeats = QUICK_REPEATS if args.quick else DEFAULT_REPEATS
    if min(args.tokens) < 1 or args.repeats < 1 or min(args.threads) < 1:
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
    load_before = load_average()
    cases = make_cases(args.quick)
    print(
        f"DeepSeek MoE layer forward: T = {', '.join(map(str, args.tokens))}, median of "
        f"{args.repeats} runs; " + machine_summary(load_before, versions)
    )
    for case in cases:
        c = case.config
        print(
            f"{case.name}: H {c.hidden_size}, I {c.intermediate_size}, E {c.num_experts}, "
            f"top-{c.top_k}, {c.scoring}"
            + (f", {c.num_groups} groups keep {c.topk_group}" if c.num_groups else "")
            + f", rsf {c.routed_scaling_factor:g}, shared I {c.shared_intermediate_size}"
            + (f", clamp {c.swiglu_limit:g}" if c.swiglu_limit else "")
            + f"; weights {weight_bytes(c) / MIB:,.0f} MiB; input x{case.hidden_scale:g}"
        )
    if torch_ref is None:
        reason = "--no-torch" if args.no_torch else "PyTorch is not installed"
        print(f"torch reference skipped ({reason})")

    saved_threads = moelb.get_num_threads()
    saved_torch_threads = torch_mod.get_num_threads() if torch_mod is not None else None
    timings: list[Timing] = []
    agreements: list[Agreement] = []
    measured: list[PeakRow] = []
    outputs_identical = True
    memory_tokens = max(args.tokens)
    try:
        for case in cases:
            t, a, weights = run_case(
                case, args.tokens, args.threads, args.repeats, args.seed, torch_ref
            )
            timings += t
            agreements += a
            if case is cases[0]:
                measured, outputs_identical = measured_rows(
                    case, weights, memory_tokens, args.threads, args.seed
                )
            del weights
            gc.collect()
    finally:
        moelb.set_num_threads(saved_threads)
        if torch_mod is not None and saved_torch_threads is not None:
            torch_mod.set_num_threads(saved_torch_threads)
    load_after = load_average()

    print()
    print(format_timings(timings))
    below = [t for t in timings if t.ratio() is not None and t.ratio() < GOAL_VS_TORCH]
    if torch_ref is not None:
        print(
            "goal: moelb >= the torch reference's tokens/s at equal threads: "
            + (
                "met everywhere"
                if not below
                else "NOT met for "
                + ", ".join(f"{t.case}/T={t.num_tokens}/{t.threads}t" for t in below)
            )
        )
        print()
        print(f"agreement with the torch reference (tolerance {RELATIVE_TOLERANCE:g} relative)")
        print(format_agreement(agreements))

    lanes = max(args.threads)
    formula = formula_rows(MEMORY_TOKENS, lanes)
    v3 = moelb.DeepSeekMoEConfig.deepseek_v3()
    one_buffer = 4 * MEMORY_TOKENS * v3.hidden_size
    print()
    print(
        f"peak workspace bytes, DeepSeek-V3 shape (H {v3.hidden_size}, I {v3.intermediate_size}, "
        f"E {v3.num_experts}, top-{v3.top_k}) at T = {MEMORY_TOKENS}, from "
        "config.expected_peak_bytes (the input and weights excluded)"
    )
    print(format_peaks(formula, measured=False))
    formula_saving = savings(formula)[0][2]
    print(
        f"deferral saves {_fmt_mib(formula_saving)} MiB = {formula_saving:,} bytes; "
        f"4 T H = {one_buffer:,} bytes (one [T, H] float32 buffer): "
        + ("equal" if formula_saving == one_buffer else "NOT EQUAL")
    )

    saving_ok = formula_saving == one_buffer
    if measured:
        h = cases[0].config.hidden_size
        print()
        print(
            f"peak workspace bytes measured on {cases[0].name} at T = {memory_tokens} "
            "(last_stats()['peak_bytes'] against expected_peak_bytes for the lanes used)"
        )
        print(format_peaks(measured, measured=True))
        for deferred, _, saving in savings(measured):
            want = 4 * memory_tokens * h
            saving_ok &= saving == want
            print(
                f"{deferred.threads} thread(s): deferral saves {_fmt_mib(saving)} MiB = "
                f"{saving:,} bytes; 4 T H = {want:,}: "
                + ("equal" if saving == want else "NOT EQUAL")
            )
        print(
            "outputs of the three variants: "
            + ("bitwise identical" if outputs_identical else "DIFFERENT")
        )
    if load_after is not None:
        print(f"\nload average at the end: {load_after:.2f}")

    if args.json is not None:
        payload = {
            "benchmark": "moe_layer_forward",
            "tokens": args.tokens,
            "threads": args.threads,
            "repeats": args.repeats,
            "seed": args.seed,
            "cpu_count": os.cpu_count(),
            "load_average_before": load_before,
            "load_average_after": load_after,
            "machine": platform.machine(),
            "versions": versions,
            "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
            "cases": [
                {
                    "case": c.name,
                    "config": c.config.as_dict(),
                    "hidden_scale": c.hidden_scale,
                    "weight_bytes": weight_bytes(c.config),
                }
                for c in cases
            ],
            "results": [
                {
                    "case": t.case,
                    "num_tokens": t.num_tokens,
                    "threads": t.threads,
                    "median_seconds": t.seconds,
                    "tokens_per_s": {k: t.tokens_per_s(k) for k in t.seconds},
                    "moelb_over_torch": t.ratio(),
                }
                for t in timings
            ],
            "agreement": [
                asdict(a) | {"relative_diff": a.relative_diff, "ok": a.ok} for a in agreements
            ],
            "peak_bytes": {
                "formula": [asdict(r) for r in formula],
                "measured": [asdict(r) | {"ok": r.ok} for r in measured],
                "variant_outputs_identical": outputs_identical,
                "savings_equal_4TH": saving_ok,
            },
        }
        write_json(args.json, payload)
        print(f"\nwrote {args.json}")

    failures = [f"{a.case}/T={a.num_tokens}" for a in agreements if not a.ok]
    failures += [f"peak {r.variant} {r.threads}t" for r in measured if not r.ok]
    if not saving_ok:
        failures.append("deferral saving != 4 T H")
    if not outputs_identical:
        failures.append("variant outputs differ")
    if failures:
        print("\nDISAGREEMENT: " + ", ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
