"""Count-level scoring of the simulator: per step and layer, the max and mean GPU load of a
placement (each expert's count split equally over its replicas, what EPLB plans for), the lower
bound of the max load of any placement, and SGLang's balancedness of both. DESIGN sections 3
(balancedness) and 6-7 (the simulator)."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from .. import _core
from .._core import ExpertLocation

__all__ = ["score_steps", "smallest_gap", "step_lower_bounds"]


def score_steps(
    counts: Any, location: ExpertLocation
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(max_rank_load [T, L], mean_rank_load [T, L]) of ``location`` for per-step logical counts
    [T, L, E] int32 (C-contiguous), each expert's count split equally over its replicas."""
    return _core.score_steps(counts, location)


def step_lower_bounds(counts: Any, num_physical_experts: int, ep_size: int) -> Any:
    """[T, L]: per step and layer, a lower bound of the max GPU load of any placement of
    ``counts`` [T, L, E] int32 on num_physical_experts slots over ep_size GPUs."""
    return _core.step_lower_bounds(counts, num_physical_experts, ep_size)


def smallest_gap(max_load: npt.NDArray[np.float64], bound: npt.NDArray[np.float64]) -> float:
    """The smallest max-load / lower-bound - 1 over the entries with a positive bound (0 without
    any)."""
    mask = bound > 0
    if not mask.any():
        return 0.0
    return float((max_load[mask] / bound[mask]).min() - 1.0)
