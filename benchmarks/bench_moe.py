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

**Weight formats** (issue 23). On ``V3-scaled``, for every weight format this moelb's layer
takes (float32, bfloat16, fp8_e4m3 with 128 x 128 block scales, int8 per channel; quantised from
the same seeded float32 weights by ``moelb.quantize_weights``) and every activation dtype
(float32, bfloat16):

* decode, T in {1, 4, 16, 64}: 16 different seeded batches are run in turn (so the experts read
  change from call to call, as in serving, instead of staying in the cache); tokens/s and GB/s =
  the weight bytes a forward reads (the router gate, the shared expert and the distinct routed
  experts the batch picks, w13 + w2 with their scales, in the stored format) / time;
* prefill, T = 4,096: GFLOP/s = 2 x (T E H + T K 3 H I + T 3 H Is) / time;

at 1 and 2 threads, moelb against ``torch_moe_reference.TorchFormatDeepSeekMoE``: PyTorch doing
the same math in the same dtype (bf16 activations with non-float32 weights: bf16 ``F.linear``;
fp8 and int8: each expert's matrices dequantised right before its GEMM, ``q.float() * scale``
expanded over the blocks / rows, then cast to the compute dtype; float32 activations: float32
GEMMs), and against the machine's limits measured in the same run by
``moelb.measure_machine_limits`` (read bandwidth, float32 FMA peak, bf16-dot peak). The goals
are printed as ratios, never asserted: decode >= 60% of the read bandwidth, prefill with bf16
weights and activations >= 40% of the bf16-dot peak, moelb >= 1x PyTorch's tokens/s at prefill
and >= 1.5x at decode per format at equal threads. Formats, activation dtypes and the machine
limits that this moelb does not have yet are reported as not run. Agreement with torch: within
1e-4 (float32 activations) or 3e-2 (bf16 activations: torch rounds each GEMM's output to bf16)
of torch's largest magnitude, and bitwise the same output at every thread count.

**Peak memory.** For the real DeepSeek-V3 shape at T = 4,096 (45 GB of weights: not
instantiated), ``config.expected_peak_bytes`` with the shared expert deferred after the
out-of-place routed kernel (``defer_shared='auto'``), not deferred (``defer_shared=False``), and
with the in-place kernel (which cannot defer); deferral saves exactly one [T, H] float32 buffer,
4 T H bytes (restated for the bf16, fp8 and int8 weight formats where the layer has them). On
``V3-scaled`` at the largest T the same three variants are run (per weight format) and
``last_stats()['peak_bytes']`` (the byte-counting workspace) is compared with
``expected_peak_bytes`` for the lanes the forward used: they must be equal, the saving must be
4 T H, and the three outputs bitwise identical.

This is not a timed test: it never fails on speed; it exits with status 1 only when the
implementations disagree or a measured peak differs from the formula.

    python benchmarks/bench_moe.py               # everything; 1 and 2 threads
    python benchmarks/bench_moe.py --quick       # smoke test: tiny layers, a few seconds
    python benchmarks/bench_moe.py --sections formats --json results.json
"""

from __future__ import annotations

import argparse
import gc
import math
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
SECTIONS = ("throughput", "formats", "memory")


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


def formula_rows(num_tokens: int, lanes: int, weight_format: str = "float32") -> list[PeakRow]:
    """DeepSeek-V3 with weights in ``weight_format`` at ``num_tokens``: the formula's peak of
    each variant, ``lanes`` lanes."""
    v3 = _format_config(moelb.DeepSeekMoEConfig.deepseek_v3(), weight_format)
    rows = []
    for label, changes in VARIANTS:
        config = v3.replace(**changes)
        rows.append(
            PeakRow(
                case="DeepSeek-V3"
                if weight_format == "float32"
                else f"DeepSeek-V3 {weight_format}",
                variant=label,
                num_tokens=num_tokens,
                threads=None,
                steps=_steps(config),
                expected_bytes=config.expected_peak_bytes(
                    num_tokens, routed_lanes=lanes, shared_lanes=lanes, gate_lanes=lanes
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
                        gate_lanes=s["gate_lanes"],
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


# --------------------------------------------------------------------------------------------
# Weight formats: decode and prefill per weight format and activation dtype, against PyTorch in
# the same dtype and the machine's measured limits.

ALL_FORMATS = ("float32", "bfloat16", "fp8_e4m3", "int8")
ALL_ACTIVATIONS = ("float32", "bfloat16")
DECODE_TOKENS = (1, 4, 16, 64)
PREFILL_TOKENS = 4096
DECODE_INPUTS = 16  # distinct decode batches cycled through, so the experts read change per call
QUICK_DECODE_TOKENS = (1,)
QUICK_PREFILL_TOKENS = 128
QUICK_DECODE_INPUTS = 2
DEFAULT_FORMAT_REPEATS = 5
BLOCK_SIZE = (128, 128)
# The goals (ratios, printed, never asserted).
GOAL_DECODE_BANDWIDTH = 0.60  # moelb's decode GB/s over the measured read bandwidth
GOAL_PREFILL_BF16_PEAK = 0.40  # moelb's bf16 prefill GFLOP/s over the measured bf16-dot peak
GOAL_PREFILL_VS_TORCH = 1.0
GOAL_DECODE_VS_TORCH = 1.5
# Agreement of moelb with PyTorch in the same dtype, relative to torch's largest magnitude:
# float32 activations (both compute float32 on the same dequantised weights), bfloat16
# activations (torch rounds every GEMM's output to bf16, moelb only the layer's output).
FORMAT_TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2}
ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "fp8_e4m3": 1, "int8": 1}


def format_case(quick: bool) -> Case:
    """The layer of the formats section: V3-scaled (H 1024, I 256, 256 experts); quick: H 256,
    I 128, 32 experts. I and H are multiples of the 128 x 128 FP8 blocks."""
    v3 = moelb.DeepSeekMoEConfig.deepseek_v3()
    if quick:
        return Case(
            "V3-scaled-quick",
            v3.replace(hidden_size=256, intermediate_size=128, num_experts=32),
            1.0,
        )
    return Case("V3-scaled", v3.replace(hidden_size=1024, intermediate_size=256), 1.0)


def quantize(
    array: npt.NDArray[np.float32],
    weight_format: str,
    block_size: tuple[int, int] = BLOCK_SIZE,
) -> tuple[Any, Any]:
    """(stored array, scale_inv or None) of a float32 matrix or stack of matrices, quantised by
    ``moelb.quantize_weights`` one matrix at a time (fp8 blocks never straddle two experts)."""
    if weight_format == "float32":
        return array, None
    if array.ndim == 2:
        return moelb.quantize_weights(array, weight_format, block_size)
    parts = [moelb.quantize_weights(a, weight_format, block_size) for a in array]
    q = np.stack([p[0] for p in parts])
    return q, None if parts[0][1] is None else np.stack([p[1] for p in parts])


def format_weights(
    weights: dict[str, Any], weight_format: str, block_size: tuple[int, int] = BLOCK_SIZE
) -> dict[str, Any]:
    """The float32 weights dict in ``weight_format`` (the contract's dict: scales as
    ``<name>_scale_inv`` for fp8 and int8)."""
    out = dict(weights)
    for name in ("w13", "w2", "shared_gate_up", "shared_down"):
        if weights.get(name) is None:
            continue
        q, scale = quantize(weights[name], weight_format, block_size)
        out[name] = q
        if scale is not None:
            out[name + "_scale_inv"] = scale
    return out


def stored_bytes(weights: dict[str, Any], name: str, index: int | None = None) -> int:
    """Bytes of one weight array (one expert's slice with ``index``) and its scales."""
    total = 0
    for key in (name, name + "_scale_inv"):
        a = weights.get(key)
        if a is not None:
            total += (a[index] if index is not None else a).nbytes
    return total


def routed_experts(config: moelb.DeepSeekMoEConfig, weights: dict[str, Any], x: Any) -> Any:
    """The distinct experts the tokens of ``x`` pick (moelb's router on float32 logits)."""
    topk = moelb.TopKConfig(
        top_k=config.top_k,
        scoring=config.scoring,
        num_groups=config.num_groups,
        topk_group=config.topk_group,
        renormalize=config.renormalize,
        routed_scaling_factor=config.routed_scaling_factor,
    )
    logits = np.ascontiguousarray(np.asarray(x, dtype=np.float32) @ weights["gate"].T)
    ids = moelb.select_experts(logits, topk, weights["correction_bias"]).topk_ids
    return np.unique(np.asarray(ids))


def bytes_read(config: moelb.DeepSeekMoEConfig, weights: dict[str, Any], x: Any) -> int:
    """Weight bytes one forward of ``x`` must read: the router gate, the shared expert and the
    distinct routed experts the batch touches (w13 + w2 with their scales)."""
    per_expert = stored_bytes(weights, "w13", 0) + stored_bytes(weights, "w2", 0)
    shared = stored_bytes(weights, "shared_gate_up") + stored_bytes(weights, "shared_down")
    return weights["gate"].nbytes + shared + per_expert * len(routed_experts(config, weights, x))


def forward_flops(config: moelb.DeepSeekMoEConfig, num_tokens: int) -> int:
    """2 x multiply-adds of one forward: the gate, K routed experts and the shared expert per
    token (3 GEMMs of H x I each)."""
    h, i = config.hidden_size, config.intermediate_size
    return (
        2
        * num_tokens
        * (
            config.num_experts * h
            + config.top_k * 3 * h * i
            + 3 * h * config.shared_intermediate_size
        )
    )


def machine_limits(threads: int, quick: bool) -> dict[str, Any]:
    """``moelb.measure_machine_limits`` at ``threads`` threads: the read bandwidth (GB/s), float32
    FMA and bf16-dot peaks (GFLOP/s) and the whole result (``raw``). ``quick``: a 256 MiB buffer
    and short passes (a smoke test's figures, not the machine's)."""
    moelb.set_num_threads(threads)
    options = {"buffer_bytes": 256 << 20, "passes": 2, "seconds": 0.02} if quick else {}
    result = moelb.measure_machine_limits(threads, **options)
    return {
        "threads": threads,
        "raw": result.as_dict(),
        "read_gbs": result.read_bandwidth_gbs,
        "fma_gflops": result.fma_peak_gflops,
        "bf16_gflops": result.bf16_dot_peak_gflops,
    }


@dataclass
class FormatTiming:
    """Median seconds per forward of moelb and torch for one format, activation dtype, phase,
    T and thread count, with the weight bytes a forward reads and its flops."""

    weight_format: str
    activation_dtype: str
    phase: str  # "decode" or "prefill"
    num_tokens: int
    threads: int
    bytes_read: float  # mean over the inputs
    flops: int
    seconds: dict[str, float] = field(default_factory=dict)

    def tokens_per_s(self, impl: str) -> float | None:
        s = self.seconds.get(impl)
        return None if s is None else self.num_tokens / s

    def gbs(self, impl: str) -> float | None:
        s = self.seconds.get(impl)
        return None if s is None else self.bytes_read / s / 1e9

    def gflops(self, impl: str) -> float | None:
        s = self.seconds.get(impl)
        return None if s is None else self.flops / s / 1e9

    def vs_torch(self) -> float | None:
        if "torch" not in self.seconds:
            return None
        return self.seconds["torch"] / self.seconds["moelb"]


@dataclass
class FormatAgreement:
    """moelb against torch in the same dtype on one input, and moelb across thread counts."""

    weight_format: str
    activation_dtype: str
    num_tokens: int
    max_abs_diff: float | None
    max_abs_reference: float | None
    same_for_all_threads: bool

    @property
    def relative_diff(self) -> float | None:
        if self.max_abs_diff is None:
            return None
        return self.max_abs_diff / max(self.max_abs_reference or 0.0, 1e-30)

    @property
    def ok(self) -> bool:
        rel = self.relative_diff
        return self.same_for_all_threads and (
            rel is None or rel <= FORMAT_TOLERANCE[self.activation_dtype]
        )


def _as_activation(x: npt.NDArray[np.float32], activation_dtype: str) -> Any:
    if activation_dtype == "float32":
        return x
    import ml_dtypes

    return x.astype(ml_dtypes.bfloat16)


def _torch_input(torch_mod: ModuleType, x: Any) -> Any:
    if x.dtype == np.float32:
        return torch_mod.from_numpy(x)
    return torch_mod.from_numpy(x.view(np.int16)).view(torch_mod.bfloat16)


def _to_float64(y: Any) -> npt.NDArray[np.float64]:
    if hasattr(y, "numpy"):  # a torch tensor
        y = y.float().numpy()
    return np.asarray(y).astype(np.float64)


def time_cycle(
    impls: dict[str, Callable[[Any], Any]],
    inputs: dict[str, Sequence[Any]],
    threads: int,
    repeats: int,
    torch_mod: ModuleType | None,
) -> dict[str, float]:
    """Median seconds per forward: one warm-up pass each, then ``repeats`` rounds timing one pass
    over every input of each implementation, in an order rotating from round to round."""
    moelb.set_num_threads(threads)
    if torch_mod is not None:
        torch_mod.set_num_threads(threads)
    names = list(impls)
    for name in names:
        for x in inputs[name]:
            impls[name](x)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            run, xs = impls[name], inputs[name]
            start = time.perf_counter()
            for x in xs:
                run(x)
            samples[name].append((time.perf_counter() - start) / len(xs))
    return {name: statistics.median(s) for name, s in samples.items()}


def run_formats(
    case: Case,
    formats: Sequence[str],
    activations: Sequence[str],
    decode_tokens: Sequence[int],
    prefill_tokens: int,
    decode_inputs: int,
    threads: Sequence[int],
    repeats: int,
    seed: int,
    torch_ref: tuple[ModuleType, ModuleType] | None,
) -> tuple[list[FormatTiming], list[FormatAgreement]]:
    """Times every (format, activation dtype, phase, T, threads) of ``case``'s layer."""
    config = case.config
    base = moelb.random_moe_weights(config, seed)
    torch_mod = torch_ref[0] if torch_ref is not None else None
    timings: list[FormatTiming] = []
    agreements: list[FormatAgreement] = []
    batches: list[tuple[str, int, list[npt.NDArray[np.float32]]]] = [
        ("decode", t, [_hidden(case, t, seed + 1 + j) for j in range(decode_inputs)])
        for t in decode_tokens
    ]
    batches.append(("prefill", prefill_tokens, [_hidden(case, prefill_tokens, seed)]))
    for fmt in formats:
        weights = format_weights(base, fmt)
        for act in activations:
            # the experts a batch touches, routed on the input as the layer sees it (bf16-rounded
            # for bfloat16 activations)
            reads = {
                (phase, t): statistics.fmean(
                    bytes_read(config, weights, _as_activation(x, act)) for x in xs
                )
                for phase, t, xs in batches
            }
            changes = {}
            if fmt != "float32" or act != "float32":
                changes = {"weight_format": fmt, "activation_dtype": act}
                if fmt == "fp8_e4m3":
                    changes["weight_block_size"] = BLOCK_SIZE
            layer_config = config.replace(**changes)
            layer = moelb.DeepSeekMoE(layer_config, weights)
            reference = None
            if torch_ref is not None:
                reference = torch_ref[1].TorchFormatDeepSeekMoE(
                    config, weights, weight_format=fmt, activation_dtype=act, block_size=BLOCK_SIZE
                )
            for phase, t, xs in batches:
                moelb_inputs = [_as_activation(x, act) for x in xs]
                impls: dict[str, Callable[[Any], Any]] = {"moelb": layer}
                inputs: dict[str, Sequence[Any]] = {"moelb": moelb_inputs}
                outputs = []
                for n in threads:
                    moelb.set_num_threads(n)
                    outputs.append(layer(moelb_inputs[0]))
                same = all(
                    np.array_equal(
                        np.asarray(outputs[0]).view(np.uint8), np.asarray(o).view(np.uint8)
                    )
                    for o in outputs[1:]
                )
                diff = ref_max = None
                if reference is not None:

                    def run_torch(x: Any, reference: Any = reference) -> Any:
                        with torch_mod.inference_mode():
                            return reference(x)

                    impls["torch"] = run_torch
                    inputs["torch"] = [_torch_input(torch_mod, x) for x in moelb_inputs]
                    torch_mod.set_num_threads(threads[0])
                    expected = _to_float64(run_torch(inputs["torch"][0]))
                    diff = float(np.abs(_to_float64(outputs[0]) - expected).max(initial=0.0))
                    ref_max = float(np.abs(expected).max(initial=0.0))
                agreements.append(FormatAgreement(fmt, act, t, diff, ref_max, same))
                del outputs
                for n in threads:
                    seconds = time_cycle(impls, inputs, n, repeats, torch_mod)
                    timings.append(
                        FormatTiming(
                            fmt,
                            act,
                            phase,
                            t,
                            n,
                            reads[(phase, t)],
                            forward_flops(config, t),
                            seconds,
                        )
                    )
                    # progress on stderr: a run cut short still shows what it measured
                    times = ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in seconds.items())
                    print(f"  {fmt}/{act} {phase} T={t} {n}t: {times}", file=sys.stderr, flush=True)
            del layer, reference
            gc.collect()
        del weights
        gc.collect()
    return timings, agreements


def _ratio(value: float | None, limit: float | None) -> str:
    if value is None or not limit:
        return "-"
    return f"{value / limit:.2f}"


def format_format_timings(
    timings: Sequence[FormatTiming], limits: dict[int, dict[str, Any]]
) -> str:
    """The decode rows (tokens/s, GB/s, share of the read bandwidth) then the prefill rows
    (GFLOP/s, share of the FMA peak for float32 activations / of the bf16-dot peak for bf16)."""
    out = []
    header = (
        "format",
        "act",
        "T",
        "thr",
        "moelb tok/s",
        "torch tok/s",
        "vs torch",
        "moelb GB/s",
        "torch GB/s",
        "/ read BW",
    )
    rows = []
    for t in timings:
        if t.phase != "decode":
            continue
        lim = limits.get(t.threads) or {}
        rows.append(
            (
                t.weight_format,
                t.activation_dtype,
                str(t.num_tokens),
                str(t.threads),
                _fmt_rate(t.tokens_per_s("moelb")),
                _fmt_rate(t.tokens_per_s("torch")),
                "-" if t.vs_torch() is None else f"{t.vs_torch():.2f}x",
                _fmt_float(t.gbs("moelb")),
                _fmt_float(t.gbs("torch")),
                _ratio(t.gbs("moelb"), lim.get("read_gbs")),
            )
        )
    if rows:
        out.append("decode (GB/s: the weight bytes the batch reads / time)")
        out.append(table(header, rows, left=(0, 1)))
    header = (
        "format",
        "act",
        "T",
        "thr",
        "moelb tok/s",
        "torch tok/s",
        "vs torch",
        "moelb GFLOP/s",
        "torch GFLOP/s",
        "/ peak",
    )
    rows = []
    for t in timings:
        if t.phase != "prefill":
            continue
        lim = limits.get(t.threads) or {}
        peak = lim.get("bf16_gflops" if t.activation_dtype == "bfloat16" else "fma_gflops")
        rows.append(
            (
                t.weight_format,
                t.activation_dtype,
                str(t.num_tokens),
                str(t.threads),
                _fmt_rate(t.tokens_per_s("moelb")),
                _fmt_rate(t.tokens_per_s("torch")),
                "-" if t.vs_torch() is None else f"{t.vs_torch():.2f}x",
                _fmt_float(t.gflops("moelb")),
                _fmt_float(t.gflops("torch")),
                _ratio(t.gflops("moelb"), peak),
            )
        )
    if rows:
        out.append(
            "prefill (/ peak: float32 activations against the FMA peak, bf16 against "
            "the bf16-dot peak)"
        )
        out.append(table(header, rows, left=(0, 1)))
    return "\n\n".join(out)


def _fmt_float(x: float | None) -> str:
    return "-" if x is None else f"{x:,.1f}"


def format_goals(timings: Sequence[FormatTiming], limits: dict[int, dict[str, Any]]) -> list[str]:
    """The issue's goals as ratios (worst row of each), never asserted."""
    lines = []

    def worst(label: str, pairs: list[tuple[str, float]], goal: float, unit: str) -> None:
        if not pairs:
            lines.append(f"{label}: not measured")
            return
        where, value = min(pairs, key=lambda p: p[1])
        met = sum(v >= goal for _, v in pairs)
        lines.append(
            f"{label}: goal {goal:g}{unit}; worst {value:.2f}{unit} ({where}); "
            f"met on {met} of {len(pairs)}"
        )

    def key(t: FormatTiming) -> str:
        return f"{t.weight_format}/{t.activation_dtype}/T={t.num_tokens}/{t.threads}t"

    bw = []
    for t in timings:
        lim = limits.get(t.threads) or {}
        if t.phase == "decode" and lim.get("read_gbs"):
            bw.append((key(t), t.gbs("moelb") / lim["read_gbs"]))
    worst("decode GB/s / measured read bandwidth", bw, GOAL_DECODE_BANDWIDTH, "")
    peak = []
    for t in timings:
        lim = limits.get(t.threads) or {}
        if (
            t.phase == "prefill"
            and t.weight_format == "bfloat16"
            and t.activation_dtype == "bfloat16"
            and lim.get("bf16_gflops")
        ):
            peak.append((key(t), t.gflops("moelb") / lim["bf16_gflops"]))
    worst("prefill bf16 GFLOP/s / measured bf16-dot peak", peak, GOAL_PREFILL_BF16_PEAK, "")
    for phase, goal in (("prefill", GOAL_PREFILL_VS_TORCH), ("decode", GOAL_DECODE_VS_TORCH)):
        pairs = [(key(t), t.vs_torch()) for t in timings if t.phase == phase and t.vs_torch()]
        worst(f"{phase} moelb / torch (same dtype, equal threads)", pairs, goal, "x")
    return lines


def format_format_agreement(agreements: Sequence[FormatAgreement]) -> str:
    header = (
        "format",
        "act",
        "T",
        "max |moelb - torch|",
        "/ max |torch|",
        "tolerance",
        "same 1t/2t",
        "ok?",
    )
    rows = [
        (
            a.weight_format,
            a.activation_dtype,
            str(a.num_tokens),
            "-" if a.max_abs_diff is None else f"{a.max_abs_diff:.2e}",
            "-" if a.relative_diff is None else f"{a.relative_diff:.1e}",
            f"{FORMAT_TOLERANCE[a.activation_dtype]:g}",
            "yes" if a.same_for_all_threads else "NO",
            "ok" if a.ok else "DISAGREE",
        )
        for a in agreements
    ]
    return table(header, rows, left=(0, 1))


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
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=SECTIONS,
        default=list(SECTIONS),
        help="what to run (default: all): the float32 layers against torch, the weight "
        "formats, the peak memory",
    )
    parser.add_argument(
        "--formats",
        nargs="+",
        choices=ALL_FORMATS,
        help="weight formats of the formats section (default: every one this moelb supports)",
    )
    parser.add_argument(
        "--activations",
        nargs="+",
        choices=ALL_ACTIVATIONS,
        help="activation dtypes of the formats section (default: every one supported)",
    )
    parser.add_argument(
        "--decode-tokens",
        type=int,
        nargs="+",
        help=f"decode batch sizes (default {' '.join(map(str, DECODE_TOKENS))})",
    )
    parser.add_argument(
        "--prefill-tokens", type=int, help=f"prefill batch size (default {PREFILL_TOKENS})"
    )
    parser.add_argument(
        "--format-repeats",
        type=int,
        help=f"timed rounds per measurement of the formats section (default "
        f"{DEFAULT_FORMAT_REPEATS})",
    )
    args = parser.parse_args(argv)
    if args.tokens is None:
        args.tokens = list(QUICK_TOKENS if args.quick else DEFAULT_TOKENS)
    if args.repeats is None:
        args.repeats = QUICK_REPEATS if args.quick else DEFAULT_REPEATS
    if args.decode_tokens is None:
        args.decode_tokens = list(QUICK_DECODE_TOKENS if args.quick else DECODE_TOKENS)
    if args.prefill_tokens is None:
        args.prefill_tokens = QUICK_PREFILL_TOKENS if args.quick else PREFILL_TOKENS
    if args.format_repeats is None:
        args.format_repeats = QUICK_REPEATS if args.quick else DEFAULT_FORMAT_REPEATS
    positive = [*args.tokens, *args.decode_tokens, *args.threads]
    if min(positive) < 1 or min(args.repeats, args.format_repeats, args.prefill_tokens) < 1:
        parser.error(
            "--tokens, --decode-tokens, --prefill-tokens, --repeats, --format-repeats and "
            "--threads must be positive"
        )
    return args


def _describe(case: Case) -> str:
    c = case.config
    return (
        f"{case.name}: H {c.hidden_size}, I {c.intermediate_size}, E {c.num_experts}, "
        f"top-{c.top_k}, {c.scoring}"
        + (f", {c.num_groups} groups keep {c.topk_group}" if c.num_groups else "")
        + f", rsf {c.routed_scaling_factor:g}, shared I {c.shared_intermediate_size}"
        + (f", clamp {c.swiglu_limit:g}" if c.swiglu_limit else "")
        + f"; weights {weight_bytes(c) / MIB:,.0f} MiB in float32; input x{case.hidden_scale:g}"
    )


def _block_size(config: moelb.DeepSeekMoEConfig) -> tuple[int, int]:
    """DeepSeek's 128 x 128 FP8 blocks where the layer's H and I are multiples of 128 (the
    DeepSeek shapes and the formats section); otherwise the largest square block up to 128 that
    divides both (the scaled layers of ``--quick``: the layer refuses blocks that straddle the
    gate/up halves of w13)."""
    b = math.gcd(math.gcd(config.hidden_size, config.intermediate_size), BLOCK_SIZE[0])
    return (b, b)


def _format_config(config: moelb.DeepSeekMoEConfig, weight_format: str) -> Any:
    """``config`` in ``weight_format`` (float32 activations); unchanged for float32."""
    if weight_format == "float32":
        return config
    changes: dict[str, Any] = {"weight_format": weight_format}
    if weight_format == "fp8_e4m3":
        changes["weight_block_size"] = _block_size(config)
    return config.replace(**changes)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sections = set(args.sections)
    torch_ref = None if args.no_torch else _import_torch_reference()
    torch_mod = torch_ref[0] if torch_ref is not None else None
    versions = {
        "moelb": moelb.__version__,
        "numpy": np.__version__,
        "torch": torch_mod.__version__ if torch_mod is not None else None,
        "python": platform.python_version(),
    }
    formats = list(args.formats or ALL_FORMATS)
    activations = list(args.activations or ALL_ACTIVATIONS)
    load_before = load_average()
    cases = make_cases(args.quick)
    fcase = format_case(args.quick)
    print(
        f"DeepSeek MoE layer forward: T = {', '.join(map(str, args.tokens))}, median of "
        f"{args.repeats} runs; " + machine_summary(load_before, versions)
    )
    if sections & {"throughput", "memory"}:
        for case in cases:
            print(_describe(case))
    if "formats" in sections:
        print(
            f"formats section: {_describe(fcase)}; weight formats {', '.join(formats)}; "
            f"activations {', '.join(activations)}"
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
    memory_formats = [f for f in formats if f != "float32"]
    limits: dict[int, dict[str, Any]] = {}
    ftimings: list[FormatTiming] = []
    fagreements: list[FormatAgreement] = []
    try:
        for case in cases:
            weights = None
            if "throughput" in sections:
                t, a, weights = run_case(
                    case, args.tokens, args.threads, args.repeats, args.seed, torch_ref
                )
                timings += t
                agreements += a
            if "memory" in sections and case is cases[0]:
                if weights is None:
                    weights = moelb.random_moe_weights(case.config, args.seed)
                for fmt in ["float32", *memory_formats]:
                    fmt_case = Case(
                        case.name if fmt == "float32" else f"{case.name} {fmt}",
                        _format_config(case.config, fmt),
                        case.hidden_scale,
                    )
                    rows, identical = measured_rows(
                        fmt_case,
                        format_weights(weights, fmt, _block_size(case.config)),
                        memory_tokens,
                        args.threads,
                        args.seed,
                    )
                    measured += rows
                    outputs_identical &= identical
            del weights
            gc.collect()
        if "formats" in sections:
            limits = {n: machine_limits(n, args.quick) for n in args.threads}
            ftimings, fagreements = run_formats(
                fcase,
                formats,
                activations,
                args.decode_tokens,
                args.prefill_tokens,
                QUICK_DECODE_INPUTS if args.quick else DECODE_INPUTS,
                args.threads,
                args.format_repeats,
                args.seed,
                torch_ref,
            )
    finally:
        moelb.set_num_threads(saved_threads)
        if torch_mod is not None and saved_torch_threads is not None:
            torch_mod.set_num_threads(saved_torch_threads)
    load_after = load_average()

    if "throughput" in sections:
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

    if "formats" in sections:
        print()
        print("measured machine limits (moelb.measure_machine_limits):")
        for n in args.threads:
            lim = limits[n]
            print(
                f"  {n} thread(s): read {_fmt_float(lim['read_gbs'])} GB/s, FMA peak "
                f"{_fmt_float(lim['fma_gflops'])} GFLOP/s, bf16-dot peak "
                f"{_fmt_float(lim['bf16_gflops'])} GFLOP/s ({lim['raw']['bf16_dot_method']}, "
                f"{lim['raw']['cpu_isa']} path)"
            )
        print()
        print(format_format_timings(ftimings, limits))
        print()
        for line in format_goals(ftimings, limits):
            print("goal: " + line)
        print()
        print("agreement with torch in the same dtype (first input of each batch size)")
        print(format_format_agreement(fagreements))

    formula: list[PeakRow] = []
    saving_ok = True
    if "memory" in sections:
        lanes = max(args.threads)
        v3 = moelb.DeepSeekMoEConfig.deepseek_v3()
        one_buffer = 4 * MEMORY_TOKENS * v3.hidden_size
        for fmt in ["float32", *memory_formats]:
            rows = formula_rows(MEMORY_TOKENS, lanes, fmt)
            formula += rows
            print()
            print(
                f"peak workspace bytes, DeepSeek-V3 shape (H {v3.hidden_size}, "
                f"I {v3.intermediate_size}, E {v3.num_experts}, top-{v3.top_k}), weights "
                f"{fmt}, float32 activations, at T = {MEMORY_TOKENS}, from "
                "config.expected_peak_bytes (the input and weights excluded)"
            )
            print(format_peaks(rows, measured=False))
            formula_saving = savings(rows)[0][2]
            saving_ok &= formula_saving == one_buffer
            print(
                f"deferral saves {_fmt_mib(formula_saving)} MiB = {formula_saving:,} bytes; "
                f"4 T H = {one_buffer:,} bytes (one [T, H] float32 buffer): "
                + ("equal" if formula_saving == one_buffer else "NOT EQUAL")
            )
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
                    f"{deferred.case}, {deferred.threads} thread(s): deferral saves "
                    f"{_fmt_mib(saving)} MiB = {saving:,} bytes; 4 T H = {want:,}: "
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
            "sections": sorted(sections),
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
            "formats": {
                "case": {"case": fcase.name, "config": fcase.config.as_dict()},
                "weight_formats": formats,
                "activation_dtypes": activations,
                "decode_tokens": args.decode_tokens,
                "prefill_tokens": args.prefill_tokens,
                "repeats": args.format_repeats,
                "machine_limits": {str(n): lim for n, lim in limits.items()},
                "goals": format_goals(ftimings, limits) if ftimings else [],
                "results": [
                    asdict(t)
                    | {
                        "tokens_per_s": {k: t.tokens_per_s(k) for k in t.seconds},
                        "gb_per_s": {k: t.gbs(k) for k in t.seconds},
                        "gflop_per_s": {k: t.gflops(k) for k in t.seconds},
                        "moelb_over_torch": t.vs_torch(),
                    }
                    for t in ftimings
                ],
                "agreement": [
                    asdict(a) | {"relative_diff": a.relative_diff, "ok": a.ok} for a in fagreements
                ],
            },
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
    failures += [
        f"{a.weight_format}/{a.activation_dtype}/T={a.num_tokens}" for a in fagreements if not a.ok
    ]
    failures += [f"peak {r.case} {r.variant} {r.threads}t" for r in measured if not r.ok]
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
