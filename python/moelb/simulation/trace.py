"""Replayed traffic of the simulator: the per-step logical counts of a recorder dump (SGLang's
``.pt``, or ``.json`` / ``.npz``), reduced to the layers and steps that carry load and put back in
time order. DESIGN sections 3 and 7 (recorder dumps, the simulator)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .._core import InvalidArgumentError
from ..io import load_expert_distribution
from .config import SimulationConfig
from .presets import ModelPreset

__all__ = ["Trace", "replay_trace"]


@dataclass(frozen=True)
class Trace:
    """A trace ready to replay. counts: [T, L, E] int32 per-step logical counts of the layers
    with counts, steps with load only, oldest first; layer_ids: [L] their rows in the dump;
    total_layers: the dump's layers (its placement rows)."""

    counts: npt.NDArray[np.int32]
    layer_ids: npt.NDArray[np.int64]
    total_layers: int


def replay_trace(
    path: str,
    config: SimulationConfig,
    preset: ModelPreset,
    timings: dict[str, float],
    notes: list[str],
) -> Trace:
    """Loads the trace at ``path`` (``config.trace``; the time it took in
    ``timings["load_trace"]``), keeps the layers with counts, rotates it by
    ``config.trace_rotate``, skips the steps without load (saying so in ``notes``, and warning
    there when the rows may be out of time order) and checks that two windows remain."""
    t0 = time.perf_counter()
    trace = _load_trace(path, preset)
    timings["load_trace"] = time.perf_counter() - t0
    total_layers = trace.shape[1]
    trace, layer_ids = _active_layers(trace, path)
    if not 0 <= config.trace_rotate < trace.shape[0]:
        raise InvalidArgumentError(
            f"trace_rotate={config.trace_rotate} is outside [0, {trace.shape[0]}) "
            f"(the trace's rows)"
        )
    if config.trace_rotate:
        trace = np.ascontiguousarray(np.roll(trace, -config.trace_rotate, axis=0))
    trace = _loaded_steps(trace, config.trace_rotate, notes)
    notes.append(
        "a replay has per-expert counts, not tokens: no realised (token-level) figures, so the "
        "config's dispatch, waterfill and seed do not apply"
    )
    num_steps = trace.shape[0]
    if num_steps < 2 * config.rebalance_period:
        raise InvalidArgumentError(
            f"trace {path!r} has {num_steps} steps: fewer than two windows of "
            f"rebalance_period={config.rebalance_period}"
        )
    return Trace(trace, layer_ids, total_layers)


def _load_trace(path: str, preset: ModelPreset) -> npt.NDArray[np.int32]:
    dump = load_expert_distribution(path)
    counts = np.ascontiguousarray(dump["logical_count"], dtype=np.int32)
    if counts.shape[2] != preset.num_experts:
        raise InvalidArgumentError(
            f"trace {path!r} has {counts.shape[2]} experts but model {preset.name} has "
            f"{preset.num_experts}; pick the matching model"
        )
    return counts


def _active_layers(
    trace: npt.NDArray[np.int32], path: str
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int64]]:
    """The layers with any count, and their ids: SGLang dumps hold the dense layers as zero
    rows."""
    active = np.flatnonzero(trace.any(axis=(0, 2)))
    if active.size == 0:
        raise InvalidArgumentError(f"trace {path!r} holds no counts")
    if active.size != trace.shape[1]:
        trace = np.ascontiguousarray(trace[:, active])
    return trace, active.astype(np.int64)


def _loaded_steps(
    trace: npt.NDArray[np.int32], trace_rotate: int, notes: list[str]
) -> npt.NDArray[np.int32]:
    """The steps with load (unused buffer rows and idle passes are not balanced steps), with a
    note on what was skipped, and one when no unused rows end an unrotated trace: a bounded
    SGLang buffer that wrapped is in storage order."""
    loaded = trace.any(axis=(1, 2))
    unused_tail = int(np.argmax(loaded[::-1])) if loaded.any() else trace.shape[0]
    skipped = int((~loaded).sum())
    if skipped:
        trace = np.ascontiguousarray(trace[loaded])
        notes.append(
            f"skipped {skipped} of {loaded.size} trace steps without load "
            f"({unused_tail} unused buffer rows at the end, {skipped - unused_tail} idle "
            "passes): they are not balanced steps"
        )
    if unused_tail == 0 and trace_rotate == 0:
        notes.append(
            "the trace has no unused rows at the end: if it is a bounded SGLang stat buffer "
            "that wrapped, its rows are in storage order, not time order (windows then mix "
            "old and new passes); replay from the oldest pass with trace_rotate / "
            "--trace-rotate = passes recorded mod buffer size, or record with "
            "--expert-distribution-recorder-buffer-size -1"
        )
    return trace
