"""Balancedness: how evenly a layer's load is spread over the GPUs. One definition for the whole
library, SGLang's (``compute_utilization_rate``; reference/recorder.md section 7.2), computed in
the C++ core (``cpp/include/moelb/balancedness.hpp``):

- per layer, the utilization rate ``(mean_g load + 1e-5) / (max_g load + 1e-5)`` over the per-GPU
  loads: 1.0 for a layer without load (a dense layer, an idle pass);
- ``balancedness``: the mean of the rates over ALL layers, dense and idle layers counting 1.0, as
  SGLang averages them. This is what every value called balancedness reports: the recorder
  (``pass_balancedness``, ``balancedness()``, the dump's ``average_utilization_rate_over_window``),
  ``PlanStats.layer_balancedness`` / ``balancedness`` / ``step_balancedness`` and the CLI;
- ``layers="active"``: the mean over the layers that have load only, a variant with its own name
  (``active_balancedness``; NaN when no layer has load).

vLLM's ``PlanStats.load_weighted_balancedness`` (sum of means / sum of maxes) is another metric,
named as such. SGLang computes the rates in float32, moelb in float64 (they agree to ~1e-7).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from . import _core

__all__ = ["BALANCEDNESS_EPSILON", "balancedness", "pass_balancedness", "utilization_rate"]

#: SGLang's epsilon in ``compute_utilization_rate``.
BALANCEDNESS_EPSILON: float = _core.BALANCEDNESS_EPSILON


def _loads(value: Any, name: str) -> npt.NDArray[np.float64]:
    # np.ascontiguousarray would turn a scalar into shape (1,); a 0-d array stays 0-d here.
    if value is None:
        raise _core.InvalidArgumentError(f"{name} must be a load (a number or an array), got None")
    try:
        a = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise _core.InvalidArgumentError(f"{name} must hold numbers, got {value!r}: {e}") from None
    return a if a.flags.c_contiguous else a.copy(order="C")


def utilization_rate(mean_rank_load: Any, max_rank_load: Any) -> Any:
    """SGLang's per-layer rate ``(mean + 1e-5) / (max + 1e-5)``, elementwise.

    mean_rank_load, max_rank_load: arrays (or scalars) of one shape: a layer's mean and largest
        per-GPU load (finite, >= 0, mean <= max; else ``InvalidArgumentError``).
    Returns a float64 array of that shape (a float for scalars).
    """
    out = _core.utilization_rate(
        _loads(mean_rank_load, "mean_rank_load"), _loads(max_rank_load, "max_rank_load")
    )
    return float(out) if out.ndim == 0 else out


def balancedness(mean_rank_load: Any, max_rank_load: Any, layers: str = "all") -> Any:
    """The mean over the last axis (the layers) of ``utilization_rate``.

    mean_rank_load, max_rank_load: [..., L] of one shape (e.g. [steps, layers]), as for
        ``utilization_rate``.
    layers: ``"all"`` (SGLang's: every layer, a layer without load counts 1.0) or ``"active"``
        (the layers with load only; NaN where there is none).
    Returns [...] float64 (a float for [L] input).
    """
    out = _core.balancedness(
        _loads(mean_rank_load, "mean_rank_load"), _loads(max_rank_load, "max_rank_load"), layers
    )
    return float(out) if out.ndim == 0 else out


def pass_balancedness(counts: Any, ep_size: int, layers: str = "all") -> float:
    """SGLang's balancedness of one forward pass: counts [L, P] (integer slot counts, slot p on
    GPU p // (P // ep_size)) -> per layer the rate of the per-GPU sums, averaged over all layers
    (``layers="active"``: over the layers with counts only; NaN when none)."""
    return float(_core.pass_balancedness(counts, ep_size, layers))
