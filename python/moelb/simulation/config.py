"""What to simulate: ``SimulationConfig`` (synthetic traffic or a replayed dump, the cluster, the
algorithms and dispatch models compared) and its validation, and ``parse_algorithm`` for the
algorithm specs it lists (``"moelb:none:step_peak"``). DESIGN section 7 (the simulator)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._core import InvalidArgumentError
from ..dispatch import DISPATCH_ALGORITHMS
from ..eplb import ALGORITHMS, OBJECTIVES, PLAN_DISPATCH
from .presets import MODEL_PRESETS, ModelPreset
from .timing import check_time_config

__all__ = [
    "BALANCED_DISPATCH",
    "LOCALITIES",
    "REFERENCE_DISPATCH",
    "SIMULATOR_DISPATCH",
    "SimulationConfig",
    "parse_algorithm",
]


LOCALITIES = ("auto", "node", "none")

#: moelb's per-step dispatch as the simulator realises it (ours; DESIGN section 9), beside the
#: engines' models: ``balanced`` (exact: every rank's counts all-gathered, ``balanced_assignment``,
#: each rank's tokens by ``dispatch_by_assignment``), ``balanced_prob`` (the step's global counts
#: all-reduced, ``balanced_fractions``, seeded per-token picks), ``balanced_offline`` (fractions
#: from the counts of the window the placement in service was planned from: no per-step
#: collective), ``balanced_joint`` (the routed replicas and the shared expert balanced in one
#: flow, in place of Waterfill).
BALANCED_DISPATCH = ("balanced", "balanced_prob", "balanced_offline", "balanced_joint")
#: Reference models of other engines' per-step solvers, for measurement only
#: (``moelb.reference_dispatch``): ``sglang_lp``, SGLang's ``--ep-dispatch-algorithm lp``.
REFERENCE_DISPATCH = ("sglang_lp",)
#: Every dispatch model the simulator realises: the engines' and moelb's table models
#: (``moelb.DISPATCH_ALGORITHMS``), then moelb's per-step models, then the reference models.
SIMULATOR_DISPATCH = DISPATCH_ALGORITHMS + BALANCED_DISPATCH + REFERENCE_DISPATCH


#: What a moelb algorithm spec's options may set, and the names each takes.
_SPEC_OPTIONS = (("locality", LOCALITIES), ("objective", OBJECTIVES), ("dispatch", PLAN_DISPATCH))


def parse_algorithm(spec: str) -> tuple[str, str, str, str]:
    """``"moelb"``, ``"moelb:none"``, ``"moelb:none:step_peak"``,
    ``"moelb:none:sglang_static"``, ``"deepseek_global"``, ... -> (algorithm, locality,
    objective, dispatch). moelb may take a locality, an objective and a target dispatch
    (``rebalance(dispatch=)``), each at most once, in any order."""
    name, *options = spec.split(":")
    if name not in ALGORITHMS:
        raise InvalidArgumentError(
            f"algorithms: {spec!r} is not an EPLB algorithm; expected one of {ALGORITHMS} "
            "(moelb may take a locality, an objective and a target dispatch: moelb:none, "
            "moelb:node:step_peak, moelb:none:sglang_static, moelb:none:balanced)"
        )
    chosen: dict[str, str] = {}
    for option in options:
        kind = next((k for k, names in _SPEC_OPTIONS if option in names), "")
        if name == "moelb" and kind and kind not in chosen:
            chosen[kind] = option
        else:
            raise InvalidArgumentError(
                f"algorithms: {spec!r}: only moelb takes options, at most a locality "
                f"{LOCALITIES}, an objective {OBJECTIVES} and a dispatch {PLAN_DISPATCH}"
            )
    objective = chosen.get("objective", "total")
    dispatch = chosen.get("dispatch", "equal_split")
    if objective != "total" and dispatch != "equal_split":
        # rebalance() refuses the pair too; said here, before a simulation starts.
        raise InvalidArgumentError(
            f"algorithms: {spec!r}: objective {objective!r} plans an equal split of every step; "
            f"dispatch {dispatch!r} plans against its own model of the window (use one of them)"
        )
    return name, chosen.get("locality", "auto"), objective, dispatch


@dataclass(frozen=True)
class SimulationConfig:
    """What to simulate. Synthetic traffic unless ``trace`` names a recorder dump to replay.

    model: a ``MODEL_PRESETS`` name. ep_size / num_nodes: GPUs (EP ranks) and nodes.
    num_redundant_experts: extra slots per layer (P = E + redundant, a multiple of ep_size).
    num_tokens: tokens per step over all ranks (synthetic). num_steps: steps (synthetic; a trace
        replays all its steps). rebalance_period: steps per window.
    skew: Zipf exponent of expert popularity (0 = uniform). drift: how fast the hot experts move:
        the popularity ranking is replaced by a new random one every 1 / drift steps, blended
        smoothly (0 = static). bursts: co-activation: every step, one of 16 fixed topics per layer
        (random sets of 1/16 of the experts) has its experts' logits raised by ``bursts`` for all
        the step's tokens, so those experts peak together (0 = none; 1-2 is strong).
    algorithms: EPLB algorithms to compare (``"moelb"``, ``"moelb:none"``, ``"deepseek"``, ...;
        ``"moelb:none:step_peak"`` plans each window against its per-step peaks, see
        ``rebalance(objective=)``; ``"moelb:none:sglang_static"`` plans for what SGLang's static
        table realises, see ``rebalance(dispatch=)``; ``"moelb:none:balanced"`` plans each window
        for moelb's per-step exact split -- the connected replica layout, checked on the
        window's steps -- to be scored with ``dispatch=("balanced",)``); the trivial placement
        is always scored.
    waterfill: ``"dynamic"``, ``"static"`` or None (no Waterfill column).
    dispatch: the dispatch models the token-level figures realise (``SIMULATOR_DISPATCH``: the
        engines' models of ``moelb.DISPATCH_ALGORITHMS``, moelb's per-step ``BALANCED_DISPATCH``
        and the measurement-only ``REFERENCE_DISPATCH``; ``moelb.simulate``'s module doc).
        Default ``"sglang_static"``: SGLang's default with DeepEP for a placement loaded with
        ``--init-expert-location`` (how a moelb plan reaches SGLang). SGLang's own runtime
        rebalance (``--enable-eplb``) builds its table with ``"sglang_static_runtime"``; the
        simulator lists replicas in ascending slots there (DeepSeek's creation order is not
        kept by the planner; on a DeepSeek-V3 placement the difference measured <= 6e-5).
    num_layers: simulate only the first num_layers MoE layers (None: all of the model's).
    expert_bytes: one expert's weight bytes for moved bytes (None: the model's, FP8).
    gpu: the GPU calibration of the modelled step time (``moelb.step_time``): a shipped key
        (``"h100"``, ``moelb.available_gpus()``), a calibration file's path, ``"default"`` (the
        shipped H100 calibration when the package has it, else no time figures) or None (no
        time figures). gpu_dtype: the GEMM table's dtype (None: FP8 when calibrated, else bf16).
    deepep_mode: how dispatch and combine move tokens in the time model (``"normal"``,
        ``"low_latency"``; ``"auto"``: low_latency up to ``DECODE_TOKENS_PER_GPU`` tokens per
        GPU, decode-like, else normal). nvlink_bytes_per_s / network_bytes_per_s: per-GPU,
        per-direction bandwidths of the communication term (defaults: H100 NVLink 4, one
        400 Gb/s NIC per GPU).
    trace_rotate: replay the trace's rows from this index on, wrapping (``np.roll``): a bounded
        SGLang stat buffer is dumped in storage order, so after it wrapped its oldest pass sits at
        the buffer index at dump time (passes recorded mod buffer size); give that index.
        Steps without any load (unused buffer rows, idle passes) are skipped either way.
    """

    model: str = "deepseek-v3"
    ep_size: int = 32
    num_nodes: int = 4
    num_redundant_experts: int = 32
    num_tokens: int = 4096
    num_steps: int = 24
    rebalance_period: int = 6
    skew: float = 0.6
    drift: float = 0.02
    algorithms: tuple[str, ...] = ("deepseek", "moelb")
    waterfill: str | None = "dynamic"
    trace: str | None = None
    trace_rotate: int = 0
    num_layers: int | None = None
    expert_bytes: int | None = None
    seed: int = 0
    bursts: float = 0.0
    dispatch: tuple[str, ...] = ("sglang_static",)
    gpu: str | None = "default"
    gpu_dtype: str | None = None
    deepep_mode: str = "auto"
    nvlink_bytes_per_s: float = 450e9
    network_bytes_per_s: float = 50e9

    def preset(self) -> ModelPreset:
        if self.model not in MODEL_PRESETS:
            raise InvalidArgumentError(
                f"model={self.model!r} is not a preset; expected one of {sorted(MODEL_PRESETS)}"
            )
        return MODEL_PRESETS[self.model]

    def validate(self) -> None:
        """Raises ``InvalidArgumentError`` naming the first bad field."""
        preset = self.preset()
        for name in ("ep_size", "num_nodes", "num_tokens", "num_steps", "rebalance_period"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(f"{name} must be a positive integer, got {value!r}")
        if self.num_redundant_experts < 0:
            raise InvalidArgumentError(
                f"num_redundant_experts must be >= 0, got {self.num_redundant_experts}"
            )
        if self.ep_size % self.num_nodes:
            raise InvalidArgumentError(
                f"ep_size={self.ep_size} is not divisible by num_nodes={self.num_nodes}"
            )
        slots = preset.num_experts + self.num_redundant_experts
        if slots % self.ep_size:
            raise InvalidArgumentError(
                f"num_physical_experts={slots} ({preset.num_experts} experts + "
                f"{self.num_redundant_experts} redundant) is not divisible by "
                f"ep_size={self.ep_size}"
            )
        if not (np.isfinite(self.skew) and self.skew >= 0):
            raise InvalidArgumentError(f"skew must be finite and >= 0, got {self.skew}")
        if not (np.isfinite(self.drift) and self.drift >= 0):
            raise InvalidArgumentError(f"drift must be finite and >= 0, got {self.drift}")
        if not (np.isfinite(self.bursts) and self.bursts >= 0):
            raise InvalidArgumentError(f"bursts must be finite and >= 0, got {self.bursts}")
        if not self.algorithms:
            raise InvalidArgumentError("algorithms must name at least one EPLB algorithm")
        for spec in self.algorithms:
            parse_algorithm(spec)
        if len(set(self.algorithms)) != len(self.algorithms):
            raise InvalidArgumentError(f"algorithms lists one twice: {list(self.algorithms)}")
        if not self.dispatch:
            raise InvalidArgumentError("dispatch must name at least one dispatch model")
        for name in self.dispatch:
            if name not in SIMULATOR_DISPATCH:
                raise InvalidArgumentError(
                    f"dispatch: {name!r} is not a dispatch model; expected one of "
                    f"{SIMULATOR_DISPATCH}"
                )
        if len(set(self.dispatch)) != len(self.dispatch):
            raise InvalidArgumentError(f"dispatch lists one twice: {list(self.dispatch)}")
        if self.waterfill not in (None, "static", "dynamic"):
            raise InvalidArgumentError(
                f"waterfill must be 'dynamic', 'static' or None, got {self.waterfill!r}"
            )
        if self.num_layers is not None and not 1 <= self.num_layers <= preset.num_moe_layers:
            raise InvalidArgumentError(
                f"num_layers must be in [1, {preset.num_moe_layers}] for {preset.name}, "
                f"got {self.num_layers}"
            )
        if self.expert_bytes is not None and self.expert_bytes < 0:
            raise InvalidArgumentError(f"expert_bytes must be >= 0, got {self.expert_bytes}")
        if isinstance(self.trace_rotate, bool) or not isinstance(self.trace_rotate, int):
            raise InvalidArgumentError(
                f"trace_rotate must be an integer, got {self.trace_rotate!r}"
            )
        if self.trace_rotate != 0 and self.trace is None:
            raise InvalidArgumentError("trace_rotate applies to a replayed trace only")
        check_time_config(self)
        if self.trace is None and self.num_steps < 2 * self.rebalance_period:
            raise InvalidArgumentError(
                f"num_steps={self.num_steps} gives fewer than two windows of "
                f"rebalance_period={self.rebalance_period} steps: nothing to predict"
            )
