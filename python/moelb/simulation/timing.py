"""The simulator's time axis: every realised step of every placement under every dispatch model
timed by the step-time model (``moelb.step_time``), and the summary ``simulate`` reports: the
modelled routed-MoE seconds per step, the speed-up over the trivial placement, what the slowest
GPUs spent their time on. DESIGN section 7 (a modelled MoE step time from a measured GPU table).

What the simulator knows per step: at token level, each layer's physical slot of every (token,
routed expert) pair and the source rank of every token (source ranks hold consecutive blocks of the
step's tokens), so the slot loads and the dispatch copies are exact (``token_copies``).
``equal_split`` splits every expert's tokens equally over its replicas (fractional loads, no
tokens): its slot loads are those fractions and its copies those of the same tokens dealt over each
expert's replicas in turn (``round_robin``: the equal split within one token per replica), from
their real source ranks, so DeepEP's per-(token, GPU) deduplication stays exact. The shared expert
is not timed (see ``moelb.step_time``): ``balanced_joint`` is timed on its routed columns, which
leave room for the shared expert on purpose, so its time is not comparable with the routed-only
models' as a whole-layer figure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from .._core import InvalidArgumentError
from ..gpu_calibration import DEFAULT_GPU, available_gpus
from ..step_time import (
    DEEPEP_MODES,
    Interconnect,
    LinkCopies,
    StepTime,
    StepTimeModel,
    dispatch_traffic,
)

if TYPE_CHECKING:  # config imports this module
    from .config import SimulationConfig

__all__ = [
    "DECODE_TOKENS_PER_GPU",
    "StepTimeResult",
    "StepTimer",
    "check_time_config",
    "deepep_mode",
    "step_time_model",
]

#: Up to this many tokens per GPU a step is decode-like: ``deepep_mode="auto"`` times it with
#: DeepEP's low-latency kernels (SGLang's decode path), above with its normal ones (prefill).
DECODE_TOKENS_PER_GPU = 256


def deepep_mode(config: SimulationConfig) -> str:
    """The ``DEEPEP_MODES`` entry the config's steps are timed with."""
    if config.deepep_mode != "auto":
        return config.deepep_mode
    per_gpu = config.num_tokens / config.ep_size
    return "low_latency" if per_gpu <= DECODE_TOKENS_PER_GPU else "normal"


def step_time_model(config: SimulationConfig) -> tuple[StepTimeModel | None, str | None]:
    """The config's step-time model, or None with the reason (no calibration ships for the
    default, or the time axis is off)."""
    gpu = config.gpu
    if gpu is None:
        return None, None
    if gpu == "default":
        if DEFAULT_GPU not in available_gpus():
            return None, (
                f"no modelled time: the package ships no {DEFAULT_GPU} GPU calibration "
                "(give one with --gpu FILE)"
            )
        gpu = DEFAULT_GPU
    interconnect = Interconnect(config.nvlink_bytes_per_s, config.network_bytes_per_s)
    return StepTimeModel(gpu, config.model, config.gpu_dtype, interconnect), None


@dataclass(frozen=True)
class StepTimeResult:
    """One placement under one dispatch model, timed over the realised steps (seconds).

    seconds: the mean modelled routed-MoE time of a step (the sum over the simulated layers of
    the slowest GPU plus the fixed term). speedup: the trivial placement's ``seconds`` under the
    same dispatch model over this one's (1.0 for trivial). step_seconds: [steps] each step's.
    layer_seconds: [L] mean per layer. slowest_weights_s / slowest_gemm_s / slowest_comm_s: the
    slowest GPU's terms summed over the layers (mean over steps); fixed_s: the fixed terms;
    mean_gpu_s: the mean GPU's time summed over the layers (what a perfectly even layer would
    take, fixed terms excluded). slowest_share: [W] how often each GPU was a layer's slowest
    (over steps x layers). worst: the slowest layer of the slowest step, explained."""

    seconds: float
    speedup: float
    step_seconds: list[float]
    layer_seconds: list[float]
    slowest_weights_s: float
    slowest_gemm_s: float
    slowest_comm_s: float
    fixed_s: float
    mean_gpu_s: float
    slowest_share: list[float]
    worst: str


@dataclass
class _Accumulator:
    """Per-step sums of one (placement, dispatch): what ``StepTimeResult`` averages."""

    step_seconds: list[float] = field(default_factory=list)
    layer_seconds: npt.NDArray[np.float64] | None = None
    parts: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(4))
    slowest_count: npt.NDArray[np.int64] | None = None
    worst: tuple[float, int, str] = (-1.0, -1, "")

    def add(self, time: StepTime, step: int) -> None:
        seconds = time.seconds
        self.step_seconds.append(seconds)
        layer = time.layer_s
        self.layer_seconds = layer if self.layer_seconds is None else self.layer_seconds + layer
        L = np.arange(len(layer))
        g = time.slowest_gpu
        self.parts += (
            time.weights_s[L, g].sum(),
            time.gemm_s[L, g].sum(),
            time.comm_s[L, g].sum(),
            time.gpu_s.mean(axis=1).sum(),
        )
        counts = np.bincount(g, minlength=time.gpu_s.shape[1])
        self.slowest_count = counts if self.slowest_count is None else self.slowest_count + counts
        if seconds > self.worst[0]:
            self.worst = (seconds, step, time.explain())

    def result(self, fixed_s: float, trivial_seconds: float | None) -> StepTimeResult:
        assert self.layer_seconds is not None and self.slowest_count is not None
        n = len(self.step_seconds)
        seconds = float(np.mean(self.step_seconds))
        weights, gemm, comm, mean_gpu = (self.parts / n).tolist()
        return StepTimeResult(
            seconds=seconds,
            speedup=1.0 if trivial_seconds is None else trivial_seconds / seconds,
            step_seconds=list(self.step_seconds),
            layer_seconds=(self.layer_seconds / n).tolist(),
            slowest_weights_s=weights,
            slowest_gemm_s=gemm,
            slowest_comm_s=comm,
            fixed_s=fixed_s * len(self.layer_seconds),
            mean_gpu_s=mean_gpu,
            slowest_share=(self.slowest_count / self.slowest_count.sum()).tolist(),
            worst=f"step {self.worst[1]}, {self.worst[2]}",
        )


class StepTimer:
    """Times the realised steps of a simulation (``TokenLevel`` feeds it each layer's
    dispatched tokens) and summarises them per (placement, dispatch)."""

    def __init__(
        self,
        model: StepTimeModel,
        config: SimulationConfig,
        num_physical_experts: int,
        source_rank: npt.NDArray[np.int64],
    ) -> None:
        self.model = model
        self.mode = deepep_mode(config)
        self.num_physical_experts = num_physical_experts
        self.ep_size, self.num_nodes = config.ep_size, config.num_nodes
        self.source_rank = np.ascontiguousarray(source_rank, dtype=np.int32)
        self._sums: dict[tuple[str, str], _Accumulator] = {}

    def slot_tokens_and_copies(
        self, physical: npt.NDArray[np.int32]
    ) -> tuple[npt.NDArray[np.int64], LinkCopies]:
        """One layer's [P] slot loads and dispatch copies from its routed physical ids [T, K]
        (rows in source-rank order)."""
        return dispatch_traffic(
            physical,
            self.source_rank,
            self.num_physical_experts,
            self.ep_size,
            self.num_nodes,
            self.mode,
        )

    def add(
        self,
        policy: str,
        dispatch: str,
        step: int,
        slot_tokens: Sequence[npt.NDArray[np.float64]] | npt.NDArray[np.float64],
        copies: LinkCopies,
    ) -> None:
        """Adds one step of ``policy`` under ``dispatch``: its per-layer slot loads [L, P] and
        copies [L, W]."""
        time = self.model.step_time(np.asarray(slot_tokens), self.ep_size, copies)
        self._sums.setdefault((policy, dispatch), _Accumulator()).add(time, step)

    def results(self) -> dict[tuple[str, str], StepTimeResult]:
        """Per (placement, dispatch) the summary; speed-ups against "trivial"."""
        fixed = self.model.calibration.layer_fixed_s
        out = {}
        for (policy, dispatch), acc in self._sums.items():
            trivial = self._sums.get(("trivial", dispatch))
            base = None if trivial is None else float(np.mean(trivial.step_seconds))
            out[(policy, dispatch)] = acc.result(fixed, base)
        return out


def check_time_config(config: SimulationConfig) -> None:
    """Raises ``InvalidArgumentError`` for a bad ``gpu`` / ``gpu_dtype`` / ``deepep_mode`` /
    bandwidth (called by ``SimulationConfig.validate``)."""
    if config.deepep_mode not in ("auto", *DEEPEP_MODES):
        raise InvalidArgumentError(
            f"deepep_mode must be 'auto' or one of {DEEPEP_MODES}, got {config.deepep_mode!r}"
        )
    if config.gpu is not None and not isinstance(config.gpu, str):
        raise InvalidArgumentError(f"gpu must be a string or None, got {config.gpu!r}")
    step_time_model(config)  # loads and checks the calibration and its table for the model
