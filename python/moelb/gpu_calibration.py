"""Measured GPU calibrations for the step-time model (``moelb.step_time``): what one GPU takes to
stream an expert's weights and to run one routed expert's FFN at a given number of tokens, read
from a calibration file (``benchmarks/calibrate_gpu.py`` writes them; the package ships its
files in ``moelb/data/gpus/<key>.json``, the H100 one the default). DESIGN section 7 (a modelled
MoE step time from a measured GPU table).

The file is a JSON object (``"format": "moelb-gpu-calibration", "version": 1``):

- ``key`` (the name ``--gpu`` takes), ``gpu`` (the device name), ``sm_count``, ``memory_bytes``,
  ``torch``, ``cuda``, ``driver``, ``date``, ``command`` (how it was measured), ``notes``;
- ``memory_bandwidth_bytes_per_s``: measured weight streaming, bytes read per second;
- ``layer_fixed_s``: the measured fixed cost of one MoE layer in seconds (launches, syncs: what
  a layer costs with about no tokens);
- ``gemm``: one table per (model, dtype): ``model``, ``dtype`` (``"bf16"`` | ``"fp8_e4m3"``),
  ``hidden_size``, ``intermediate_size``, ``weight_bytes_per_expert`` (gate + up + down in that
  dtype, with the FP8 scales), ``method`` (the kernel timed), ``tokens`` (strictly increasing,
  from 0) and ``seconds_per_expert`` (the median time of one expert's routed FFN at that many
  tokens, weights streamed from memory; 0 at 0 tokens).

Every field is checked on loading; a bad one raises ``InvalidArgumentError`` naming the field,
its value and the file.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ._core import InvalidArgumentError

__all__ = [
    "CALIBRATION_FORMAT",
    "CALIBRATION_VERSION",
    "DEFAULT_GPU",
    "GPU_DTYPES",
    "GemmTable",
    "GpuCalibration",
    "available_gpus",
    "gpu_calibration_from_dict",
    "load_gpu_calibration",
]

CALIBRATION_FORMAT = "moelb-gpu-calibration"
CALIBRATION_VERSION = 1
#: The calibration ``--gpu`` uses when none is named.
DEFAULT_GPU = "h100"
#: The GEMM dtypes a table may hold, and the weight bytes per parameter of each (FP8 tables add
#: their scales on top).
GPU_DTYPES = {"bf16": 2, "fp8_e4m3": 1}
#: The dtype the step-time model picks when a model has tables of several: DeepSeek serves its
#: routed experts in FP8 (the simulator's moved bytes are FP8 too).
_DTYPE_PREFERENCE = ("fp8_e4m3", "bf16")

# Plausible ranges: a value outside them is almost surely in the wrong unit (GB/s for bytes/s,
# milliseconds for seconds), and is refused rather than turned into a time off by 1,000x.
_BANDWIDTH_RANGE = (1e9, 1e15)  # bytes per second
_LAYER_FIXED_MAX = 0.1  # seconds
_EXPERT_SECONDS_MAX = 1.0  # one expert's FFN at 8,192 tokens is about a millisecond
# One expert's FFN at T tokens takes at most this many times streaming its weights plus its
# 6 * hidden * intermediate * T FLOPs at this rate (any GPU is faster): a table in milliseconds
# whose values all stay under _EXPERT_SECONDS_MAX (an FP8 one) still fails this by ~1,000x.
_STREAMING_SLOWDOWN_MAX = 100.0
_FLOPS_MIN = 1e12  # FLOP per second


@dataclass(frozen=True)
class GemmTable:
    """One measured table: one routed expert's FFN time (gate + up GEMM, SiLU * up, down GEMM)
    against its token count, for one model shape and dtype.

    tokens: [n] float64, strictly increasing from 0. seconds_per_expert: [n] float64 seconds,
    0 at 0 tokens, as measured. ``seconds(T)`` reads it (see there)."""

    model: str
    dtype: str
    hidden_size: int
    intermediate_size: int
    weight_bytes_per_expert: int
    method: str
    tokens: npt.NDArray[np.float64]
    seconds_per_expert: npt.NDArray[np.float64]
    #: The table as the model reads it: the running maximum of ``seconds_per_expert`` (a
    #: measured dip -- noise where the time is flat -- would let an expert with more tokens run
    #: faster; it is lifted to the largest earlier time).
    envelope: npt.NDArray[np.float64] = field(repr=False)

    def seconds(self, num_tokens: Any) -> npt.NDArray[np.float64]:
        """One expert's FFN seconds at ``num_tokens`` (any shape, >= 0, fractions allowed):
        linear interpolation of the envelope between table points, linear extrapolation beyond
        the last from the last point and the last one below it (its last two points when the
        time still rises there; further back when the envelope lifted a dip at the end, which
        would otherwise price any number of tokens beyond the table at the last point's time);
        0 at 0 tokens. Never decreases with the tokens."""
        t = np.asarray(num_tokens, dtype=np.float64)
        out = np.interp(t, self.tokens, self.envelope)
        beyond = t > self.tokens[-1]
        if beyond.any():
            lower = np.flatnonzero(self.envelope < self.envelope[-1])
            j = int(lower[-1]) if lower.size else len(self.tokens) - 2
            slope = (self.envelope[-1] - self.envelope[j]) / (self.tokens[-1] - self.tokens[j])
            out = np.where(beyond, self.envelope[-1] + slope * (t - self.tokens[-1]), out)
        return out

    @property
    def max_dip(self) -> float:
        """The largest relative amount by which the envelope lifted a measured time (0 when the
        measured times never decrease)."""
        lifted = self.envelope - self.seconds_per_expert
        positive = self.envelope > 0
        return float((lifted[positive] / self.envelope[positive]).max(initial=0.0))


@dataclass(frozen=True)
class GpuCalibration:
    """A GPU's measured calibration (the module doc describes each field). ``source``: the file
    it was read from."""

    key: str
    gpu: str
    memory_bandwidth_bytes_per_s: float
    layer_fixed_s: float
    gemm: tuple[GemmTable, ...]
    source: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def gemm_table(self, model: str, dtype: str | None = None) -> GemmTable:
        """The table of ``model`` (a ``MODEL_PRESETS`` name) in ``dtype``; with ``dtype=None``,
        FP8 when the calibration has it for that model, else bf16."""
        if dtype is not None and dtype not in GPU_DTYPES:
            raise InvalidArgumentError(
                f"dtype={dtype!r} is not a calibration dtype; expected one of {list(GPU_DTYPES)}"
            )
        tables = {t.dtype: t for t in self.gemm if t.model == model}
        for name in (dtype,) if dtype is not None else _DTYPE_PREFERENCE:
            if name in tables:
                return tables[name]
        have = ", ".join(f"{t.model}/{t.dtype}" for t in self.gemm)
        wanted = model if dtype is None else f"{model}/{dtype}"
        raise InvalidArgumentError(
            f"GPU calibration {self.key!r} ({self.source}) has no GEMM table for {wanted}; "
            f"it has {have}"
        )


def _data_dir() -> Path:
    return Path(str(resources.files("moelb"))) / "data" / "gpus"


def available_gpus() -> list[str]:
    """The keys of the calibrations shipped in the package (``moelb/data/gpus/<key>.json``)."""
    folder = _data_dir()
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.json"))


def load_gpu_calibration(gpu: str | os.PathLike[str] = DEFAULT_GPU) -> GpuCalibration:
    """Reads a calibration: ``gpu`` is a shipped key (``"h100"``, see ``available_gpus()``) or
    the path of a calibration JSON file. Raises ``InvalidArgumentError`` naming what is missing
    or the bad field."""
    name = os.fspath(gpu)
    shipped = _data_dir() / f"{name}.json"
    if os.sep not in name and not name.endswith(".json") and shipped.is_file():
        path = shipped
    elif Path(name).is_file():
        path = Path(name)
    else:
        have = available_gpus()
        raise InvalidArgumentError(
            f"gpu={name!r} is neither a shipped GPU calibration nor a file; the package ships "
            + (", ".join(repr(k) for k in have) if have else "none")
            + " (give the path of a calibration JSON written by benchmarks/calibrate_gpu.py)"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidArgumentError(f"gpu={name!r}: cannot read {str(path)!r} as JSON: {e}") from e
    return gpu_calibration_from_dict(data, source=str(path))


def gpu_calibration_from_dict(data: Any, source: str = "<dict>") -> GpuCalibration:
    """A ``GpuCalibration`` from the parsed JSON object ``data``; every field checked."""
    where = f"GPU calibration {source}"
    if not isinstance(data, dict):
        raise InvalidArgumentError(f"{where}: expected a JSON object, got {type(data).__name__}")
    if data.get("format") != CALIBRATION_FORMAT:
        raise InvalidArgumentError(
            f"{where}: format={data.get('format')!r}, expected {CALIBRATION_FORMAT!r}"
        )
    if data.get("version") != CALIBRATION_VERSION:
        raise InvalidArgumentError(
            f"{where}: version={data.get('version')!r}, this moelb reads version "
            f"{CALIBRATION_VERSION}"
        )
    key = _string(data, "key", where)
    gpu = _string(data, "gpu", where)
    bandwidth = _number(data, "memory_bandwidth_bytes_per_s", where)
    if not _BANDWIDTH_RANGE[0] <= bandwidth <= _BANDWIDTH_RANGE[1]:
        raise InvalidArgumentError(
            f"{where}: memory_bandwidth_bytes_per_s={bandwidth!r} is not a bandwidth in bytes "
            f"per second (expected {_BANDWIDTH_RANGE[0]:.0e}..{_BANDWIDTH_RANGE[1]:.0e})"
        )
    fixed = _number(data, "layer_fixed_s", where)
    if not 0 <= fixed <= _LAYER_FIXED_MAX:
        raise InvalidArgumentError(
            f"{where}: layer_fixed_s={fixed!r} is not a per-layer time in seconds "
            f"(expected 0..{_LAYER_FIXED_MAX})"
        )
    entries = data.get("gemm")
    if not isinstance(entries, list) or not entries:
        raise InvalidArgumentError(f"{where}: gemm must be a non-empty list, got {entries!r:.80}")
    tables = tuple(_gemm_table(e, f"{where}: gemm[{i}]", bandwidth) for i, e in enumerate(entries))
    seen = set()
    for t in tables:
        if (t.model, t.dtype) in seen:
            raise InvalidArgumentError(f"{where}: gemm lists {t.model}/{t.dtype} twice")
        seen.add((t.model, t.dtype))
    known = {"format", "version", "key", "gpu", "memory_bandwidth_bytes_per_s"}
    known |= {"layer_fixed_s", "gemm"}
    metadata = {k: v for k, v in data.items() if k not in known}
    return GpuCalibration(key, gpu, bandwidth, fixed, tables, source, metadata)


def _gemm_table(entry: Any, where: str, bandwidth: float) -> GemmTable:
    if not isinstance(entry, dict):
        raise InvalidArgumentError(f"{where}: expected an object, got {type(entry).__name__}")
    model = _string(entry, "model", where)
    dtype = _string(entry, "dtype", where)
    if dtype not in GPU_DTYPES:
        raise InvalidArgumentError(f"{where}: dtype={dtype!r}, expected one of {list(GPU_DTYPES)}")
    hidden = _positive_int(entry, "hidden_size", where)
    intermediate = _positive_int(entry, "intermediate_size", where)
    weight_bytes = _positive_int(entry, "weight_bytes_per_expert", where)
    plain = 3 * hidden * intermediate * GPU_DTYPES[dtype]
    # FP8 tables carry their scales (a few percent more); bf16 ones are exact.
    if not plain <= weight_bytes <= plain * (1.1 if dtype != "bf16" else 1.0):
        raise InvalidArgumentError(
            f"{where}: weight_bytes_per_expert={weight_bytes} does not fit 3 x hidden_size x "
            f"intermediate_size in {dtype} ({plain} bytes"
            + (", plus at most 10% of scales)" if dtype != "bf16" else ")")
        )
    method = entry.get("method", "")
    if not isinstance(method, str):
        raise InvalidArgumentError(f"{where}: method must be a string, got {method!r}")
    tokens = _float_list(entry, "tokens", where)
    seconds = _float_list(entry, "seconds_per_expert", where)
    if len(tokens) < 2:
        raise InvalidArgumentError(f"{where}: tokens needs at least 2 points, got {len(tokens)}")
    if len(seconds) != len(tokens):
        raise InvalidArgumentError(
            f"{where}: seconds_per_expert has {len(seconds)} values for {len(tokens)} tokens"
        )
    if tokens[0] != 0:
        raise InvalidArgumentError(f"{where}: tokens must start at 0, got {tokens[0]:g}")
    steps = np.diff(tokens)
    if (steps <= 0).any():
        i = int(np.argmax(steps <= 0))
        raise InvalidArgumentError(
            f"{where}: tokens must be strictly increasing, got {tokens[i]:g} then {tokens[i + 1]:g}"
        )
    if (seconds < 0).any() or (seconds > _EXPERT_SECONDS_MAX).any():
        i = int(np.argmax((seconds < 0) | (seconds > _EXPERT_SECONDS_MAX)))
        raise InvalidArgumentError(
            f"{where}: seconds_per_expert[{i}]={float(seconds[i])!r} is not one expert's time in "
            f"seconds (expected 0..{_EXPERT_SECONDS_MAX})"
        )
    bound = (
        _STREAMING_SLOWDOWN_MAX * weight_bytes / bandwidth
        + 6 * hidden * intermediate * tokens / _FLOPS_MIN
    )
    if (seconds > bound).any():
        i = int(np.argmax(seconds > bound))
        raise InvalidArgumentError(
            f"{where}: seconds_per_expert[{i}]={float(seconds[i])!r} at {tokens[i]:g} tokens is "
            f"not one expert's time in seconds: over {_STREAMING_SLOWDOWN_MAX:g}x streaming its "
            f"weights ({weight_bytes / bandwidth:.3g} s at memory_bandwidth_bytes_per_s) plus "
            f"its FLOPs at {_FLOPS_MIN:.0e} FLOP/s ({float(bound[i]):.3g} s; milliseconds?)"
        )
    if seconds[0] != 0:
        raise InvalidArgumentError(
            f"{where}: seconds_per_expert at 0 tokens must be 0 (an expert without tokens is "
            f"not computed), got {float(seconds[0])!r}"
        )
    return GemmTable(
        model, dtype, hidden, intermediate, weight_bytes, method, tokens, seconds,
        envelope=np.maximum.accumulate(seconds),
    )  # fmt: skip


def _string(d: dict[str, Any], name: str, where: str) -> str:
    value = d.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidArgumentError(f"{where}: {name} must be a non-empty string, got {value!r}")
    return value


def _number(d: dict[str, Any], name: str, where: str) -> float:
    value = d.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidArgumentError(f"{where}: {name} must be a finite number, got {value!r}")
    return float(value)


def _positive_int(d: dict[str, Any], name: str, where: str) -> int:
    value = d.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgumentError(f"{where}: {name} must be a positive integer, got {value!r}")
    return value


def _float_list(d: dict[str, Any], name: str, where: str) -> npt.NDArray[np.float64]:
    value = d.get(name)
    if not isinstance(value, list) or not all(
        not isinstance(v, bool) and isinstance(v, int | float) and math.isfinite(v) for v in value
    ):
        raise InvalidArgumentError(
            f"{where}: {name} must be a list of finite numbers, got {value!r:.80}"
        )
    return np.asarray(value, dtype=np.float64)
