"""Calibrates moelb's step-time model on a GPU (issue 22): times the routed experts' FFN of the
DeepSeek models as real grouped GEMMs with PyTorch, per tokens per expert from 0 to 8,192, plus a
weight-streaming microbenchmark and the fixed per-MoE-layer term, and writes the calibration file
that ``moelb`` ships as ``python/moelb/data/gpus/<key>.json`` (format: the contract
``moelb-gpu-calibration`` version 1, described in benchmarks/README.md, "GPU calibration (issue
22)", with the H100 run's figures).

    python benchmarks/calibrate_gpu.py --key h100 --out h100.json          # on the GPU machine
    python benchmarks/calibrate_gpu.py --quick --key h100 --out quick.json  # a smoke run, seconds

What one expert's FFN is here (what an engine runs for the routed experts of one MoE layer on one
GPU, the tokens already dispatched and grouped by expert): gate+up GEMM [T, H] x [H, 2I], SiLU(gate)
* up, down GEMM [T, I] x [I, H], all of a GPU's experts in ONE grouped GEMM per projection
(``torch._grouped_mm`` for bf16; ``torch._scaled_grouped_mm`` for FP8 E4M3 with rowwise scales:
one float32 scale per token row of the activations and per output channel of the weights), the
SiLU*mul (and, for FP8, the requantisation of its output) fused in one Triton kernel as engines
fuse it (plain PyTorch operations where Triton is missing, said in ``method``). FP8 activations
arrive quantised (DeepEP dispatches them in FP8), so their quantisation is not timed.

Timing: each configuration is captured in a CUDA graph (as engines serve decode) and replayed
after warm-up, back to back for at least ``--min-seconds`` (0.25 s: under dense GEMMs the GPU
lowers its clock within that time) and ``2 * --repeats`` replays, CUDA events around every
replay, the median of the second half. A group of ``--group-size`` experts with distinct weights
runs at once (one expert's weights alone exceed the H100's 50 MB L2 in bf16 and FP8 V4-Pro, not
in FP8 V3 (44 MB) or FP8 V4-Flash (25 MB); a group of 8 holds 200 MB and more, so its weights
stream from HBM on every replay). With ``layer_fixed_s`` the intercept of the layer time against
the number of experts (1 token each, 1 to 16 experts), ``seconds_per_expert[T]`` is (median
layer time of the group at T tokens per expert - layer_fixed_s) / group size, so that a layer of
experts with token counts T_e takes layer_fixed_s + sum_e seconds_per_expert[T_e]. The published
table is the running maximum over tokens of those figures (more tokens never run faster; the raw
medians are kept in ``measured_seconds_per_expert``).

Only PyTorch (and Triton, which comes with it) is needed on the GPU machine: this script does not
import moelb. Its pure parts (the token grid, the file's validation, the weight bytes) run without
PyTorch and are tested in tests/python/test_calibrate_gpu.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

FORMAT = "moelb-gpu-calibration"
VERSION = 1
DTYPES = ("bf16", "fp8_e4m3")
#: Routed-expert shapes (hidden size, MoE intermediate size): moelb's MODEL_PRESETS.
MODELS: dict[str, tuple[int, int]] = {
    "deepseek-v3": (7168, 2048),
    "deepseek-v4-flash": (4096, 2048),
    "deepseek-v4-pro": (7168, 3072),
}
FP8_MAX = 448.0  # the largest finite float8_e4m3fn
#: The experts per layer of the fixed-term fit (1 token each).
FIXED_FIT_EXPERTS = (1, 2, 3, 4, 6, 8, 12, 16)


# ---------------------------------------------------------------------------------------------
# Pure parts (no PyTorch): the grid, weight bytes, the calibration file and its validation.


def token_grid(
    max_tokens: int = 8192, steps_per_octave: int = 4, dense_from: int = 16
) -> list[int]:
    """0, the powers of two 1 .. ``max_tokens``, and from ``dense_from`` on ``steps_per_octave - 1``
    evenly spaced points inside every octave (16, 20, 24, 28, 32, 40, ...): a log-ish grid, dense
    enough that linear interpolation follows the GEMM's tile steps. ``max_tokens`` is included."""
    for name, value in (
        ("max_tokens", max_tokens),
        ("steps_per_octave", steps_per_octave),
        ("dense_from", dense_from),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    points = {0, max_tokens}
    p = 1
    while p <= max_tokens:
        points.add(p)
        if p >= dense_from:
            step = p / steps_per_octave
            for i in range(1, steps_per_octave):
                t = round(p + i * step)
                if t < 2 * p and t <= max_tokens:
                    points.add(t)
        p *= 2
    return sorted(points)


def weight_bytes_per_expert(hidden_size: int, intermediate_size: int, dtype: str) -> int:
    """Bytes of one routed expert's weights read by its FFN: gate, up and down projections
    (3 H I elements; bf16 2 bytes, FP8 1 byte plus the rowwise float32 scales of the kernel
    measured: one per output channel, 2 I for gate+up and H for down)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    elements = 3 * hidden_size * intermediate_size
    if dtype == "bf16":
        return 2 * elements
    return elements + 4 * (2 * intermediate_size + hidden_size)


def running_max(values: Sequence[float]) -> list[float]:
    """The running maximum: the published table never decreases with tokens."""
    out: list[float] = []
    for v in values:
        out.append(v if not out else max(out[-1], v))
    return out


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of ys against xs (at least two distinct xs)."""
    if len(xs) != len(ys) or len(set(xs)) < 2:
        raise ValueError("fit_line needs equally many xs and ys and at least two distinct xs")
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return my - slope * mx, slope


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"calibration file: {message}")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def validate_calibration(doc: Any) -> None:
    """Raises ``ValueError`` naming the first field of ``doc`` (a parsed calibration file) that
    breaks the format ``moelb-gpu-calibration`` version 1. Keys beyond the format's are allowed
    (provenance, raw measurements) and ignored by readers."""
    _check(isinstance(doc, dict), f"expected a JSON object, got {type(doc).__name__}")
    _check(doc.get("format") == FORMAT, f"format must be {FORMAT!r}, got {doc.get('format')!r}")
    _check(doc.get("version") == VERSION, f"version must be {VERSION}, got {doc.get('version')!r}")
    for name in ("key", "gpu", "torch", "cuda", "driver", "date", "command"):
        _check(
            isinstance(doc.get(name), str) and doc[name] != "",
            f"{name} must be a non-empty string, got {doc.get(name)!r}",
        )
    try:
        datetime.date.fromisoformat(doc["date"])
    except ValueError:
        _check(False, f"date must be YYYY-MM-DD, got {doc['date']!r}")
    for name in ("sm_count", "memory_bytes"):
        _check(
            _positive_int(doc.get(name)),
            f"{name} must be a positive integer, got {doc.get(name)!r}",
        )
    bw = doc.get("memory_bandwidth_bytes_per_s")
    _check(
        _finite_number(bw) and bw > 0,
        f"memory_bandwidth_bytes_per_s must be a finite number > 0, got {bw!r}",
    )
    fixed = doc.get("layer_fixed_s")
    _check(
        _finite_number(fixed) and fixed >= 0,
        f"layer_fixed_s must be a finite number >= 0, got {fixed!r}",
    )
    gemm = doc.get("gemm")
    _check(isinstance(gemm, list) and len(gemm) > 0, "gemm must be a non-empty list")
    seen: set[tuple[str, str]] = set()
    for i, entry in enumerate(gemm):
        where = f"gemm[{i}]"
        _check(isinstance(entry, dict), f"{where} must be an object")
        _check(
            isinstance(entry.get("model"), str) and entry["model"] != "",
            f"{where}.model must be a non-empty string, got {entry.get('model')!r}",
        )
        _check(
            entry.get("dtype") in DTYPES,
            f"{where}.dtype must be one of {DTYPES}, got {entry.get('dtype')!r}",
        )
        pair = (entry["model"], entry["dtype"])
        _check(pair not in seen, f"{where}: (model, dtype) {pair} appears twice")
        seen.add(pair)
        for name in ("hidden_size", "intermediate_size", "weight_bytes_per_expert"):
            _check(
                _positive_int(entry.get(name)),
                f"{where}.{name} must be a positive integer, got {entry.get(name)!r}",
            )
        _check(
            isinstance(entry.get("method"), str) and entry["method"] != "",
            f"{where}.method must be a non-empty string",
        )
        tokens, seconds = entry.get("tokens"), entry.get("seconds_per_expert")
        _check(
            isinstance(tokens, list) and len(tokens) >= 3,
            f"{where}.tokens must be a list of at least 3 token counts",
        )
        _check(
            all(isinstance(t, int) and not isinstance(t, bool) for t in tokens),
            f"{where}.tokens must hold integers",
        )
        _check(tokens[0] == 0, f"{where}.tokens must start at 0, got {tokens[0]}")
        bad = next((k for k in range(1, len(tokens)) if tokens[k] <= tokens[k - 1]), None)
        _check(
            bad is None,
            f"{where}.tokens must be strictly increasing (tokens[{bad}]="
            f"{tokens[bad] if bad is not None else ''})",
        )
        _check(
            isinstance(seconds, list) and len(seconds) == len(tokens),
            f"{where}.seconds_per_expert must be a list as long as tokens ({len(tokens)})",
        )
        _check(
            all(_finite_number(s) for s in seconds),
            f"{where}.seconds_per_expert must hold finite numbers",
        )
        _check(seconds[0] == 0, f"{where}.seconds_per_expert[0] (0 tokens) must be 0")
        bad = next((k for k in range(1, len(seconds)) if not seconds[k] > 0), None)
        _check(bad is None, f"{where}.seconds_per_expert[{bad}] must be > 0")


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Writes ``payload`` to ``path`` atomically (a temporary file beside it, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------
# GPU parts: PyTorch (and Triton) imported only here.


def _torch() -> Any:
    import torch

    return torch


try:  # Triton comes with CUDA builds of PyTorch; the CPU parts and the tests need neither.
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:

    @triton.jit
    def _silu_mul_triton(h_ptr, out_ptr, scale_ptr, stride_h, stride_out, inter,
                         BLOCK: tl.constexpr, FP8: tl.constexpr):  # fmt: skip
        """One token row: SiLU(gate) * up of h [rows, 2 I] (bf16); FP8: the row's amax / 448 as
        its scale and the row quantised to float8_e4m3fn; else the row in bf16."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < inter
        gate = tl.load(h_ptr + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(h_ptr + row * stride_h + inter + cols, mask=mask, other=0.0).to(tl.float32)
        a = gate / (1.0 + tl.exp(-gate)) * up
        if FP8:
            amax = tl.max(tl.abs(a), axis=0)
            scale = tl.maximum(amax, 1e-12) / 448.0
            tl.store(out_ptr + row * stride_out + cols, (a / scale).to(tl.float8e4nv), mask=mask)
            tl.store(scale_ptr + row, scale)
        else:
            tl.store(out_ptr + row * stride_out + cols, a.to(tl.bfloat16), mask=mask)


def _silu_mul_kernel() -> Any:
    """The fused SiLU(gate) * up Triton kernel (FP8: with the rowwise requantisation of its
    output), one program per token row; None where Triton is missing."""
    return None if triton is None else _silu_mul_triton


class ExpertGroup:
    """``num_experts`` routed experts of one model shape with distinct random weights on the GPU,
    in one dtype, and their FFN over token rows grouped by expert (``ffn``)."""

    def __init__(
        self,
        hidden: int,
        inter: int,
        num_experts: int,
        dtype: str,
        elementwise: str,
        seed: int,
        device: str = "cuda",
    ) -> None:
        torch = _torch()
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if elementwise not in ("triton", "torch"):
            raise ValueError(f"elementwise must be 'triton' or 'torch', got {elementwise!r}")
        self.hidden, self.inter, self.num_experts, self.dtype = hidden, inter, num_experts, dtype
        self.device = device
        self.kernel = _silu_mul_kernel() if elementwise == "triton" and device != "cpu" else None
        gen = torch.Generator(device=device).manual_seed(seed)
        bf16 = torch.bfloat16
        # nn.Linear layout [out, in]; the GEMMs take the transposed (column-major) view.
        w13 = torch.randn(num_experts, 2 * inter, hidden, device=device, dtype=bf16, generator=gen)
        w2 = torch.randn(num_experts, hidden, inter, device=device, dtype=bf16, generator=gen)
        w13 /= math.sqrt(hidden)
        w2 /= math.sqrt(inter)
        if dtype == "bf16":
            self.w13, self.w2 = w13, w2
            self.s13 = self.s2 = None
        else:
            self.w13, self.s13 = _quantize_rows(w13)  # scales [G, 2I], [G, H]
            self.w2, self.s2 = _quantize_rows(w2)
            del w13, w2

    def method(self) -> str:
        elementwise = (
            "SiLU*mul" + (" + rowwise FP8 requantisation" if self.dtype != "bf16" else "")
        ) + (" fused in one Triton kernel" if self.kernel is not None else " in PyTorch ops")
        if self.dtype == "bf16":
            gemm = "torch._grouped_mm (bf16, one grouped GEMM over the layer's experts)"
        else:
            gemm = (
                "torch._scaled_grouped_mm (FP8 E4M3, rowwise scales: per token row of the "
                "activations, per output channel of the weights; one grouped GEMM over the "
                "layer's experts)"
            )
        return f"{gemm} for gate+up and down; {elementwise}; replayed in a CUDA graph"

    def inputs(self, max_rows: int, seed: int) -> tuple[Any, Any]:
        """Random activations [max_rows, H] in the GEMM's input dtype, and their rowwise scales
        (FP8; None for bf16)."""
        torch = _torch()
        gen = torch.Generator(device=self.device).manual_seed(seed)
        x = torch.randn(
            max_rows, self.hidden, device=self.device, dtype=torch.bfloat16, generator=gen
        )
        if self.dtype == "bf16":
            return x, None
        return _quantize_rows(x)

    def ffn(self, x: Any, x_scale: Any, offs: Any, num_experts: int) -> Any:
        """The routed FFN of the first ``num_experts`` experts over rows ``x`` grouped by expert
        (``offs``: int32 [num_experts], the cumulative end row of each expert's tokens)."""
        torch = _torch()
        w13 = self.w13[:num_experts].transpose(-2, -1)
        w2 = self.w2[:num_experts].transpose(-2, -1)
        if self.dtype == "bf16":
            h = torch._grouped_mm(x, w13, offs=offs)
            a, a_scale = self._silu_mul(h)
            return torch._grouped_mm(a, w2, offs=offs)
        h = torch._scaled_grouped_mm(
            x, w13, x_scale, self.s13[:num_experts], offs=offs, out_dtype=torch.bfloat16
        )
        a, a_scale = self._silu_mul(h)
        return torch._scaled_grouped_mm(
            a, w2, a_scale, self.s2[:num_experts], offs=offs, out_dtype=torch.bfloat16
        )

    def _silu_mul(self, h: Any) -> tuple[Any, Any]:
        torch = _torch()
        rows, inter = h.shape[0], self.inter
        fp8 = self.dtype != "bf16"
        if self.kernel is None:
            a = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
            return _quantize_rows(a) if fp8 else (a, None)
        out = torch.empty(
            rows, inter, device=self.device, dtype=torch.float8_e4m3fn if fp8 else torch.bfloat16
        )
        scale = torch.empty(rows, device=self.device, dtype=torch.float32) if fp8 else out
        if rows > 0:
            block = 1 << (inter - 1).bit_length()
            self.kernel[(rows,)](
                h, out, scale, h.stride(0), out.stride(0), inter, BLOCK=block, FP8=fp8,
                num_warps=8,
            )  # fmt: skip
        return out, (scale if fp8 else None)

    def reference(self, x: Any, x_scale: Any, counts: Sequence[int]) -> Any:
        """The FFN in float32, expert by expert, from the same (dequantised) inputs."""
        torch = _torch()
        out = []
        start = 0
        for e, n in enumerate(counts):
            xe = x[start : start + n].float()
            if x_scale is not None:
                xe = xe * x_scale[start : start + n, None]
            w13, w2 = self.w13[e].float(), self.w2[e].float()
            if self.s13 is not None:
                w13 = w13 * self.s13[e][:, None]
                w2 = w2 * self.s2[e][:, None]
            h = xe @ w13.T
            a = torch.nn.functional.silu(h[:, : self.inter]) * h[:, self.inter :]
            out.append(a @ w2.T)
            start += n
        return torch.cat(out)


def _quantize_rows(t: Any) -> tuple[Any, Any]:
    """Rowwise FP8 E4M3: (t / scale) in float8_e4m3fn and the float32 scale of every row
    (amax / 448) over the last dimension."""
    torch = _torch()
    amax = t.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12)
    scale = amax / FP8_MAX
    q = (t.float() / scale).to(torch.float8_e4m3fn)
    return q, scale.squeeze(-1).contiguous()


def offsets(counts: Sequence[int], device: str = "cuda") -> Any:
    """int32 cumulative end rows of the experts' token counts (``offs`` of the grouped GEMMs)."""
    torch = _torch()
    ends, total = [], 0
    for c in counts:
        if isinstance(c, bool) or not isinstance(c, int) or c < 0:
            raise ValueError(f"token counts must be integers >= 0, got {c!r}")
        total += c
        ends.append(total)
    return torch.tensor(ends, device=device, dtype=torch.int32)


#: Seconds of back-to-back replays every timed configuration runs for (at least ``repeats``):
#: long enough that the GPU's clocks settle to what sustained work of that kind runs at (under
#: dense GEMMs an H100 draws up to its power limit and lowers its clock); the median is taken
#: over the second half of the replays.
MIN_SECONDS = 0.25


def timed_replays(run: Callable[[], Any], repeats: int, min_seconds: float) -> list[float]:
    """Seconds of each of ``max(repeats, min_seconds / t)`` back-to-back calls of ``run``, each
    between two CUDA events (t: a first estimate from 3 calls; at most 20,000 calls)."""
    torch = _torch()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        run()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 3e3, 1e-7)
    n = min(20_000, max(repeats, math.ceil(min_seconds / estimate)))
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(n)
    ]
    for a, b in events:
        a.record()
        run()
        b.record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) / 1e3 for a, b in events]


def time_graph(
    fn: Callable[[], Any],
    warmup: int,
    repeats: int,
    graph: bool = True,
    min_seconds: float | None = None,
) -> float:
    """Median seconds of ``fn`` on the GPU: captured in a CUDA graph (``graph``) after a warm-up
    call, ``warmup`` untimed replays, then replays back to back for at least ``min_seconds``
    (default ``MIN_SECONDS``) and ``2 * repeats`` replays, each between two CUDA events; the
    median of the second half."""
    torch = _torch()
    fn()
    torch.cuda.synchronize()
    run = fn
    keep = None
    if graph:
        g = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.cuda.graph(g):
            keep = fn()
        torch.cuda.current_stream().wait_stream(stream)
        run = g.replay
    for _ in range(warmup):
        run()
    seconds = timed_replays(run, 2 * repeats, MIN_SECONDS if min_seconds is None else min_seconds)
    del keep
    return statistics.median(seconds[len(seconds) // 2 :])


def time_layer(
    group: ExpertGroup, x: Any, x_scale: Any, counts: Sequence[int], warmup: int, repeats: int
) -> float:
    """Median seconds of one MoE layer's routed FFN: ``group``'s first len(counts) experts with
    ``counts[e]`` tokens each (rows of ``x`` from the top)."""
    rows = sum(counts)
    if rows > x.shape[0]:
        raise ValueError(f"counts need {rows} activation rows, only {x.shape[0]} allocated")
    offs = offsets(counts, group.device)
    xs = x[:rows]
    ss = None if x_scale is None else x_scale[:rows]
    return time_graph(lambda: group.ffn(xs, ss, offs, len(counts)), warmup, repeats)


def check_ffn(group: ExpertGroup, x: Any, x_scale: Any, counts: Sequence[int]) -> float:
    """Relative error ||ffn - reference|| / ||reference|| on uneven counts; raises RuntimeError
    past the dtype's tolerance (bf16 2e-2, FP8 8e-2: one extra rounding of the intermediate)."""
    torch = _torch()
    rows = sum(counts)
    scale = None if x_scale is None else x_scale[:rows]
    out = group.ffn(x[:rows], scale, offsets(counts, group.device), len(counts))
    ref = group.reference(x[:rows], scale, counts)
    err = float(torch.linalg.norm(out.float() - ref) / torch.linalg.norm(ref))
    tol = 2e-2 if group.dtype == "bf16" else 8e-2
    if not math.isfinite(err) or err > tol:
        raise RuntimeError(
            f"{group.dtype} FFN disagrees with its float32 reference: relative error {err:.3g} "
            f"> {tol} on counts {list(counts)}"
        )
    return err


def stream_bandwidth(sizes_bytes: Sequence[int], repeats: int) -> dict[str, Any]:
    """Read-only bandwidth: a float32 sum over a buffer far larger than L2 (bytes read / median
    time), the best over ``sizes_bytes``; a device-to-device copy (bytes read + written) for
    reference."""
    torch = _torch()
    rows = []
    for size in sizes_bytes:
        buf = torch.randn(size // 4, device="cuda", dtype=torch.float32)
        t = time_graph(lambda buf=buf: buf.sum(), 3, repeats, graph=False)
        rows.append({"bytes": size, "seconds": t, "bytes_per_s": size / t})
        del buf
        torch.cuda.empty_cache()
    size = max(sizes_bytes)
    src = torch.randn(size // 8, device="cuda", dtype=torch.float32)
    dst = torch.empty_like(src)
    t_copy = time_graph(lambda src=src, dst=dst: dst.copy_(src), 3, repeats, graph=False)
    del src, dst
    torch.cuda.empty_cache()
    best = max(r["bytes_per_s"] for r in rows)
    return {
        "read_only_sum": rows,
        "bytes_per_s": best,
        "copy_bytes": size,
        "copy_read_plus_written_bytes_per_s": size / t_copy,
    }


def environment(key: str, command: str) -> dict[str, Any]:
    """The GPU and software the calibration ran on."""
    torch = _torch()
    props = torch.cuda.get_device_properties(0)
    try:
        driver = (
            subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                check=True,
                timeout=30,
            )
            .stdout.split("\n")[0]
            .strip()
        )
    except (OSError, subprocess.SubprocessError):
        driver = "unknown"
    return {
        "format": FORMAT,
        "version": VERSION,
        "key": key,
        "gpu": torch.cuda.get_device_name(0),
        "sm_count": props.multi_processor_count,
        "memory_bytes": props.total_memory,
        "l2_cache_bytes": getattr(props, "L2_cache_size", None),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "driver": driver or "unknown",
        "date": datetime.date.today().isoformat(),
        "command": command,
    }


def calibrate_entry(
    model: str,
    dtype: str,
    grid: Sequence[int],
    args: argparse.Namespace,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """One (model, dtype) row: the checked FFN, the fixed-term fit and the per-token-count
    medians of the group (raw: the layer's time; the file's figures are derived in ``finish``)."""
    torch = _torch()
    hidden, inter = MODELS[model]
    num_experts = max(args.group_size, max(FIXED_FIT_EXPERTS))
    group = ExpertGroup(hidden, inter, num_experts, dtype, args.elementwise, seed=args.seed)
    x, x_scale = group.inputs(args.group_size * max(grid), seed=args.seed + 1)
    check_counts = [5, 0, 17, 130, 1, 64, 0, 33][: args.group_size] or [5]
    err = check_ffn(group, x, x_scale, check_counts)
    fit_points = []
    for g in FIXED_FIT_EXPERTS:
        fit_points.append((g, time_layer(group, x, x_scale, [1] * g, args.warmup, args.repeats)))
    intercept, slope = fit_line([p[0] for p in fit_points], [p[1] for p in fit_points])
    layer_seconds = [0.0]
    for t in grid[1:]:
        layer_seconds.append(
            time_layer(group, x, x_scale, [t] * args.group_size, args.warmup, args.repeats)
        )
    wbytes = weight_bytes_per_expert(hidden, inter, dtype)
    log(
        f"{model:18s} {dtype:8s} check err {err:.2e}; fixed fit {intercept * 1e6:6.2f} us + "
        f"{slope * 1e6:6.2f} us/expert (1 token: {wbytes / slope / 1e12:.2f} TB/s); "
        f"{args.group_size} experts x {grid[-1]} tokens: {layer_seconds[-1] * 1e3:.3f} ms"
    )
    entry = {
        "model": model,
        "dtype": dtype,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "weight_bytes_per_expert": wbytes,
        "method": group.method(),
        "group_size": args.group_size,
        "tokens": list(grid),
        "layer_seconds": layer_seconds,
        "fixed_fit": {
            "experts": [p[0] for p in fit_points],
            "layer_seconds": [p[1] for p in fit_points],
            "intercept_s": intercept,
            "slope_s_per_expert": slope,
        },
        "check_relative_error": err,
    }
    del group, x, x_scale
    torch.cuda.empty_cache()
    return entry


def finish(
    env: dict[str, Any], stream: dict[str, Any], entries: list[dict[str, Any]]
) -> dict[str, Any]:
    """The calibration file from the raw measurements: ``layer_fixed_s`` the median of the
    entries' fitted intercepts; per entry, seconds_per_expert = running max of
    (layer time - layer_fixed_s) / group size."""
    fixed = statistics.median(e["fixed_fit"]["intercept_s"] for e in entries)
    fixed = max(fixed, 0.0)
    gemm = []
    for e in entries:
        per_expert = [0.0] + [
            max((s - fixed) / e["group_size"], 1e-9) for s in e["layer_seconds"][1:]
        ]
        row = {k: v for k, v in e.items() if k != "layer_seconds"}
        row["seconds_per_expert"] = [0.0, *running_max(per_expert[1:])]
        row["measured_seconds_per_expert"] = per_expert
        row["measured_layer_seconds"] = e["layer_seconds"]
        gemm.append(row)
    doc = dict(env)
    doc["memory_bandwidth_bytes_per_s"] = stream["bytes_per_s"]
    doc["layer_fixed_s"] = fixed
    doc["gemm"] = gemm
    doc["streaming"] = stream
    doc["notes"] = (
        "memory_bandwidth_bytes_per_s: a float32 torch.sum over buffers of "
        + ", ".join(f"{r['bytes'] / 2**30:g} GiB" for r in stream["read_only_sum"])
        + " (bytes read / median time, the best size). layer_fixed_s: the median over the gemm "
        "entries of the intercept of a least-squares line through the layer time (one MoE "
        f"layer's routed FFN, CUDA graph) against the number of experts {list(FIXED_FIT_EXPERTS)} "
        "at 1 token each (fixed_fit holds each entry's points and line). seconds_per_expert[T]: "
        "(median layer time of group_size experts with T tokens each, distinct weights - "
        "layer_fixed_s) / group_size, then the running maximum over T (measured_seconds_per_expert "
        "holds the figures before it). 0 tokens: 0 (an expert without tokens is not computed). "
        "Not timed: routing, dispatch/combine, the permutation of tokens into expert order, the "
        "shared expert, FP8 quantisation of the dispatched activations."
    )
    validate_calibration(doc)
    return doc


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--key", default="h100", help="the file's short name (moelb simulate --gpu)")
    p.add_argument("--out", type=Path, required=True, help="the calibration JSON to write")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--group-size", type=int, default=8, help="experts timed at once")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument(
        "--min-seconds",
        type=float,
        default=MIN_SECONDS,
        help="replay every configuration back to back for at least this long (clocks settle)",
    )
    p.add_argument("--stream-gib", type=float, nargs="+", default=[1.0, 4.0])
    p.add_argument("--elementwise", choices=("triton", "torch"), default="triton")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--quick", action="store_true", help="smoke run: DeepSeek-V3, 6 token counts, 5 repeats"
    )
    args = p.parse_args(argv)
    for name in ("max_tokens", "group_size", "warmup", "repeats"):
        value = getattr(args, name)
        if value < (0 if name == "warmup" else 1):
            p.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    global MIN_SECONDS
    args = parse_args(argv)
    command = " ".join(
        ["python", "benchmarks/calibrate_gpu.py", *(argv if argv is not None else sys.argv[1:])]
    )
    torch = _torch()
    if not torch.cuda.is_available():
        print("calibrate_gpu.py: no CUDA device: nothing to calibrate", file=sys.stderr)
        return 2
    if args.elementwise == "triton" and _silu_mul_kernel() is None:
        print("calibrate_gpu.py: Triton missing: SiLU*mul in PyTorch ops", file=sys.stderr)
        args.elementwise = "torch"
    if args.quick:
        args.models, args.repeats, args.warmup, args.min_seconds = ["deepseek-v3"], 5, 2, 0.01
        grid = [0, 1, 16, 128, 1024, min(args.max_tokens, 4096)]
        args.stream_gib = [1.0]
    else:
        grid = token_grid(args.max_tokens)
    MIN_SECONDS = args.min_seconds
    env = environment(args.key, command)
    print(f"{env['gpu']} ({env['sm_count']} SMs), torch {env['torch']}, CUDA {env['cuda']}, "
          f"driver {env['driver']}", flush=True)  # fmt: skip
    stream = stream_bandwidth([int(g * 2**30) for g in args.stream_gib], args.repeats)
    print(
        f"streaming: read-only {stream['bytes_per_s'] / 1e12:.3f} TB/s, copy (read + written) "
        f"{stream['copy_read_plus_written_bytes_per_s'] / 1e12:.3f} TB/s",
        flush=True,
    )
    entries = []
    for model in args.models:
        for dtype in args.dtypes:
            entries.append(
                calibrate_entry(model, dtype, grid, args, lambda s: print(s, flush=True))
            )
    doc = finish(env, stream, entries)
    write_json(args.out, doc)
    print(f"layer_fixed_s {doc['layer_fixed_s'] * 1e6:.2f} us; wrote {args.out}")
    header = "tokens " + " ".join(f"{e['model'][9:]}/{e['dtype'][:4]:>4s}" for e in doc["gemm"])
    print(header + "   (us per expert)")
    for i, t in enumerate(grid):
        print(
            f"{t:6d} " + " ".join(f"{e['seconds_per_expert'][i] * 1e6:12.2f}" for e in doc["gemm"])
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
