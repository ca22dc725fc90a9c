"""The cluster simulator: what EPLB and Waterfill buy on a DeepSeek-scale EP deployment.

    result = moelb.simulate(moelb.SimulationConfig(model="deepseek-v3", ep_size=32, num_nodes=4))
    result.algorithms["moelb"].predictive      # balancedness of the placement actually deployed

Traffic is either synthetic or replayed. Synthetic: per step and MoE layer, ``num_tokens`` router
logits (seeded noise plus a Zipf-like per-expert popularity of exponent ``skew`` whose hot experts
move over time at rate ``drift``) go through the real routers (``select_experts`` with the model's
V3/V4 config; ``HashRouter`` on V4 hash layers, fed token ids drawn from a Zipf law) into an
``ExpertDistributionRecorder``. Replayed: per-step logical counts from a recorder dump (SGLang's
``.pt``, or ``.json`` / ``.npz``).

Every ``rebalance_period`` steps (a window) the recorder's counts are planned with each algorithm
(``rebalance`` with ``previous`` = the placement in service, so moved experts are counted) and the
new placement serves the next window; window 0 runs the trivial placement. Scores, per step and
layer (SGLang's rate (mean + 1e-5) / (max + 1e-5) of the per-GPU loads, averaged over the
simulated MoE layers and the steps -- the mean over active layers: SGLang's logged balancedness
would also count the model's dense layers as 1.0):

- ``in_window``: the placement planned on window i, scored on window i (hindsight);
- ``predictive``: the placement planned on window i, scored on window i + 1 (what serving sees);
- ``bound_*``: mean / the flat lower bound of the max GPU load of any placement, per step: no
  placement scores higher;
- ``realised``, synthetic traffic only, token level, on the placements in service (windows >= 1):
  for each dispatch model of ``config.dispatch`` (``moelb.dispatch``), each source rank's tokens
  are dispatched as that model does, and ``waterfill_rank_loads`` adds the shared expert,
  computed on the token's own rank (``shared_local``) or where Waterfill sends it
  (``waterfill``). Replayed counts carry no tokens or source ranks, so ``realised`` is empty
  there.

Balancedness from counts splits each expert's load equally over its replicas (what EPLB plans
for); the realised figures come from the dispatched tokens, which the engines do not split
equally. Source ranks hold consecutive blocks of the step's tokens; the row-based models
(``vllm_hash``, ``round_robin``, ``sglang_dynamic_rank_invariant``) pick by token row, so with
very few tokens per rank they put most tokens on an expert's first replicas (as the engines do).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from . import _core
from ._core import ExpertLocation, InvalidArgumentError, TopKConfig
from .balancedness import utilization_rate
from .dispatch import DISPATCH_ALGORITHMS, TABLE_DISPATCH, dispatch_tables, dispatch_tokens
from .eplb import ALGORITHMS, OBJECTIVES, gpu_loads, rebalance
from .io import load_expert_distribution
from .recorder import ExpertDistributionRecorder
from .routing import HashRouter, select_experts
from .waterfill import waterfill_rank_loads

__all__ = [
    "MODEL_PRESETS",
    "AlgorithmResult",
    "DispatchResult",
    "ModelPreset",
    "SimulationConfig",
    "SimulationResult",
    "parse_algorithm",
    "score_steps",
    "simulate",
    "step_lower_bounds",
]

#: Progress callback: (steps done, total steps).
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ModelPreset:
    """The shape of a model as far as expert placement goes.

    num_hidden_layers: decoder layers (the rows of SGLang's placement files, dense ones included);
    first_moe_layer: the first MoE layer (DeepSeek-V3: 3; earlier layers are dense);
    num_hash_layers: V4: the first MoE layers route by token id (``HashRouter``);
    expert_bytes: one routed expert's weights (gate, up and down projections, FP8: 1 byte each).
    """

    name: str
    num_hidden_layers: int
    first_moe_layer: int
    num_experts: int
    num_groups: int | None
    num_hash_layers: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int = 129280
    weight_bytes: int = 1

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_moe_layer

    @property
    def expert_bytes(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size * self.weight_bytes

    def topk_config(self) -> TopKConfig:
        return {
            "deepseek-v3": TopKConfig.deepseek_v3,
            "deepseek-v4-flash": TopKConfig.deepseek_v4_flash,
            "deepseek-v4-pro": TopKConfig.deepseek_v4_pro,
        }[self.name]()


MODEL_PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in (
        ModelPreset("deepseek-v3", 61, 3, 256, 8, 0, 7168, 2048),
        ModelPreset("deepseek-v4-flash", 43, 0, 256, 8, 3, 4096, 2048),
        ModelPreset("deepseek-v4-pro", 61, 0, 384, 8, 3, 7168, 3072),
    )
}


LOCALITIES = ("auto", "node", "none")


def parse_algorithm(spec: str) -> tuple[str, str, str]:
    """``"moelb"``, ``"moelb:none"``, ``"moelb:none:step_peak"``, ``"deepseek_global"``, ... ->
    (algorithm, locality, objective). moelb may take a locality and an objective, in any order."""
    name, *options = spec.split(":")
    if name not in ALGORITHMS:
        raise InvalidArgumentError(
            f"algorithms: {spec!r} is not an EPLB algorithm; expected one of {ALGORITHMS} "
            "(moelb may take a locality and an objective: moelb:none, moelb:node:step_peak)"
        )
    chosen: dict[str, str] = {}
    for option in options:
        kind = "locality" if option in LOCALITIES else "objective" if option in OBJECTIVES else ""
        if name == "moelb" and kind and kind not in chosen:
            chosen[kind] = option
        else:
            raise InvalidArgumentError(
                f"algorithms: {spec!r}: only moelb takes options, at most a locality "
                f"{LOCALITIES} and an objective {OBJECTIVES}"
            )
    return name, chosen.get("locality", "auto"), chosen.get("objective", "total")


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
        ``rebalance(objective=)``); the trivial placement is always scored.
    waterfill: ``"dynamic"``, ``"static"`` or None (no Waterfill column).
    dispatch: the dispatch models the token-level figures realise (``moelb.DISPATCH_ALGORITHMS``).
        Default ``"sglang_static"``: SGLang's default with DeepEP for a placement loaded with
        ``--init-expert-location`` (how a moelb plan reaches SGLang). SGLang's own runtime
        rebalance (``--enable-eplb``) builds its table with ``"sglang_static_runtime"``; the
        simulator lists replicas in ascending slots there (DeepSeek's creation order is not
        kept by the planner; on a DeepSeek-V3 placement the difference measured <= 6e-5).
    num_layers: simulate only the first num_layers MoE layers (None: all of the model's).
    expert_bytes: one expert's weight bytes for moved bytes (None: the model's, FP8).
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
            if name not in DISPATCH_ALGORITHMS:
                raise InvalidArgumentError(
                    f"dispatch: {name!r} is not a dispatch model; expected one of "
                    f"{DISPATCH_ALGORITHMS}"
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
        if self.trace is None and self.num_steps < 2 * self.rebalance_period:
            raise InvalidArgumentError(
                f"num_steps={self.num_steps} gives fewer than two windows of "
                f"rebalance_period={self.rebalance_period} steps: nothing to predict"
            )


@dataclass(frozen=True)
class DispatchResult:
    """What one placement realises under one dispatch model, at token level: the tokens of every
    source rank dispatched by the model, per step and simulated layer, averaged (SGLang's
    balancedness, (mean + 1e-5) / (max + 1e-5) of the per-GPU loads). routed: routed experts
    only; shared_local: plus the shared expert on each token's own rank; waterfill: plus the
    shared expert placed by Waterfill (None without Waterfill, and for ``equal_split``, whose
    fractional tokens Waterfill cannot place)."""

    routed: float
    shared_local: float
    waterfill: float | None


@dataclass(frozen=True)
class AlgorithmResult:
    """One placement policy over the run. Balancedness figures are means over steps and
    simulated layers; ``layer_*`` are per simulated layer ([L]).

    in_window / predictive: see the module doc (trivial: the same placement throughout).
    step_balancedness: [num_steps] the placement in service at each step (window 0: trivial).
    realised: token level (synthetic traffic, windows >= 1): for each dispatch model of the
        config, a ``DispatchResult``; empty for replayed counts (they carry no tokens).
    moved_experts / moved_bytes / plan_seconds: per rebalance (empty for trivial).
    gpu_load: [L, G] mean per-step load of each GPU under the placements in service (windows
        >= 1). min_gap: the smallest max-load / lower-bound - 1 over steps and layers (>= 0).
    placement: the last plan, over all of the model's layers (the ones not simulated trivial):
        what ``save_placement`` writes for SGLang's ``--init-expert-location``.
    """

    name: str
    ran: str
    in_window: float
    predictive: float
    layer_in_window: npt.NDArray[np.float64]
    layer_predictive: npt.NDArray[np.float64]
    step_balancedness: npt.NDArray[np.float64]
    realised: dict[str, DispatchResult]
    moved_experts: list[int]
    moved_bytes: list[int]
    plan_seconds: list[float]
    gpu_load: npt.NDArray[np.float64]
    min_gap: float
    placement: ExpertLocation

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["realised"] = {k: dataclasses.asdict(v) for k, v in self.realised.items()}
        return {k: _jsonable(v) for k, v in d.items() if k != "placement"}


@dataclass(frozen=True)
class SimulationResult:
    """The outcome of ``simulate``. ``algorithms`` maps "trivial" and each algorithm spec to its
    ``AlgorithmResult``; ``layer_ids`` are the model layers simulated; ``bound_in_window`` /
    ``bound_predictive`` (and ``layer_bound_predictive``) are the balancedness no placement
    exceeds over the same steps as ``in_window`` / ``predictive``. ``timings``: seconds spent
    per phase. ``notes``: what the run changed or could not know (skipped trace steps, a trace
    that may be out of time order)."""

    config: SimulationConfig
    source: str
    num_steps: int
    num_windows: int
    num_physical_experts: int
    expert_bytes: int
    layer_ids: npt.NDArray[np.int64]
    bound_in_window: float
    bound_predictive: float
    layer_bound_predictive: npt.NDArray[np.float64]
    algorithms: dict[str, AlgorithmResult]
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-ready Python values (placements excluded)."""
        return {
            "config": dataclasses.asdict(self.config),
            "source": self.source,
            "num_steps": self.num_steps,
            "num_windows": self.num_windows,
            "num_physical_experts": self.num_physical_experts,
            "expert_bytes": self.expert_bytes,
            "layer_ids": self.layer_ids.tolist(),
            "bound_in_window": self.bound_in_window,
            "bound_predictive": self.bound_predictive,
            "layer_bound_predictive": self.layer_bound_predictive.tolist(),
            "algorithms": {k: v.to_dict() for k, v in self.algorithms.items()},
            "timings": dict(self.timings),
            "notes": list(self.notes),
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def score_steps(
    counts: Any, location: ExpertLocation
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(max_gpu_load [T, L], mean_gpu_load [T, L]) of ``location`` for per-step logical counts
    [T, L, E] int32 (C-contiguous), each expert's count split equally over its replicas."""
    return _core.score_steps(counts, location)


def step_lower_bounds(counts: Any, num_physical_experts: int, num_gpus: int) -> Any:
    """[T, L]: per step and layer, a lower bound of the max GPU load of any placement of
    ``counts`` [T, L, E] int32 on num_physical_experts slots over num_gpus GPUs."""
    return _core.step_lower_bounds(counts, num_physical_experts, num_gpus)


def _balancedness(max_load: npt.NDArray[np.float64], mean_load: npt.NDArray[np.float64]) -> Any:
    """SGLang's utilization rate per entry ((mean + 1e-5) / (max + 1e-5), 1 without load)."""
    return utilization_rate(mean_load, max_load)


BURST_TOPICS = 16  # co-activated expert sets per layer (SimulationConfig.bursts)


class _SyntheticTraffic:
    """Router inputs with Zipf-like expert popularity whose hot experts drift.

    Layer l's expert e has log-popularity shift z[rank] with z = log(1 / rank^skew) centred, and
    its rank in a random permutation per (layer, phase); at step t the phase is drift * t and the
    shift is blended linearly between consecutive phases' permutations. Logits = noise + shift,
    noise standard normal (rows of a seeded bank at random offsets, its columns rotated by a random
    offset per step: cheap, and no two steps share an expert's noise). With
    bursts > 0, step t's topic (seeded by layer and step) among the layer's BURST_TOPICS fixed
    expert sets gets + bursts on its experts' logits. Token ids (hash layers) are drawn from a Zipf
    law of exponent 1 over the vocabulary (natural text).
    """

    def __init__(self, preset: ModelPreset, num_layers: int, config: SimulationConfig) -> None:
        self.num_experts = preset.num_experts
        self.num_tokens = config.num_tokens
        self.skew, self.drift, self.seed = config.skew, config.drift, config.seed
        self.bursts = config.bursts
        self.num_layers = num_layers
        self.rng = np.random.default_rng([config.seed, 1])
        z = -config.skew * np.log(np.arange(1, self.num_experts + 1, dtype=np.float64))
        self.z = z - z.mean()
        bank_rows = max(4 * config.num_tokens, 8192)
        self.bank = self.rng.standard_normal((bank_rows, self.num_experts), dtype=np.float32)
        self._phases: dict[tuple[int, int], npt.NDArray[np.float64]] = {}
        ranks = np.arange(1, preset.vocab_size + 1, dtype=np.float64)
        cdf = np.cumsum(1.0 / ranks)
        self.token_cdf = cdf / cdf[-1]
        self.token_perm = np.random.default_rng([config.seed, 2]).permutation(preset.vocab_size)

    def _phase_shift(self, layer: int, phase: int) -> npt.NDArray[np.float64]:
        key = (layer, phase)
        if key not in self._phases:
            perm = np.random.default_rng([self.seed, 3, layer, phase]).permutation(self.num_experts)
            shift = np.empty(self.num_experts)
            shift[perm] = self.z
            if len(self._phases) > 4 * self.num_layers:  # keep the recent phases only
                self._phases.pop(next(iter(self._phases)))
            self._phases[key] = shift
        return self._phases[key]

    def shift(self, layer: int, step: int) -> npt.NDArray[np.float32]:
        position = self.drift * step
        phase = int(position)
        frac = position - phase
        shift = self._phase_shift(layer, phase)
        if frac > 0:
            shift = (1 - frac) * shift + frac * self._phase_shift(layer, phase + 1)
        if self.bursts > 0:
            topics = np.random.default_rng([self.seed, 5, layer]).permutation(self.num_experts)
            size = max(1, self.num_experts // BURST_TOPICS)
            topic = int(np.random.default_rng([self.seed, 6, layer, step]).integers(BURST_TOPICS))
            shift = shift.copy()
            shift[topics[topic * size : (topic + 1) * size]] += self.bursts
        return shift.astype(np.float32)

    def logits(self, layer: int, step: int) -> npt.NDArray[np.float32]:
        start = int(self.rng.integers(0, self.bank.shape[0] - self.num_tokens + 1))
        # The bank's columns rotated by a random offset: two steps drawing overlapping rows would
        # otherwise give every expert the same noise in both, a step-to-step correlation that
        # real traffic does not have (and that a planner could learn from one window to the next).
        rotation = int(self.rng.integers(0, self.num_experts))
        noise = np.roll(self.bank[start : start + self.num_tokens], rotation, axis=1)
        return noise + self.shift(layer, step)

    def input_ids(self) -> npt.NDArray[np.int64]:
        ranks = np.searchsorted(self.token_cdf, self.rng.random(self.num_tokens))
        return self.token_perm[np.minimum(ranks, len(self.token_perm) - 1)].astype(np.int64)


@dataclass
class _Policy:
    """The running state of one placement policy."""

    name: str
    algorithm: str | None  # None: trivial
    locality: str
    objective: str
    current: ExpertLocation  # in service
    ran: str = "trivial"
    in_window: list[npt.NDArray[np.float64]] = field(default_factory=list)  # [T_w, L]
    predictive: list[npt.NDArray[np.float64]] = field(default_factory=list)
    step_balancedness: list[npt.NDArray[np.float64]] = field(default_factory=list)
    token: dict[str, list[tuple[float, float, float]]] = field(default_factory=dict)
    moved_experts: list[int] = field(default_factory=list)
    moved_bytes: list[int] = field(default_factory=list)
    plan_seconds: list[float] = field(default_factory=list)
    gpu_load_sum: npt.NDArray[np.float64] | None = None
    gpu_load_steps: int = 0
    min_gap: float = float("inf")
    tables: dict[str, npt.NDArray[np.int32]] = field(default_factory=dict)  # [W, L, E] each


def _load_trace(path: str, preset: ModelPreset) -> npt.NDArray[np.int32]:
    dump = load_expert_distribution(path)
    counts = np.ascontiguousarray(dump["logical_count"], dtype=np.int32)
    if counts.shape[2] != preset.num_experts:
        raise InvalidArgumentError(
            f"trace {path!r} has {counts.shape[2]} experts but model {preset.name} has "
            f"{preset.num_experts}; pick the matching model"
        )
    return counts


def simulate(config: SimulationConfig, progress: Progress | None = None) -> SimulationResult:
    """Runs the simulation described by ``config``; ``progress(done, total)`` is called after
    every step. Deterministic for a given config (any thread count)."""
    config.validate()
    preset = config.preset()
    timings = {"traffic": 0.0, "planning": 0.0, "scoring": 0.0, "token_level": 0.0}
    notes: list[str] = []
    start_all = time.perf_counter()
    E, W = preset.num_experts, config.ep_size
    P = E + config.num_redundant_experts
    expert_bytes = preset.expert_bytes if config.expert_bytes is None else config.expert_bytes

    trace: npt.NDArray[np.int32] | None = None
    if config.trace is not None:
        t0 = time.perf_counter()
        trace = _load_trace(config.trace, preset)
        timings["load_trace"] = time.perf_counter() - t0
        # Layers without any count (SGLang dumps hold the dense layers as zero rows) are skipped.
        active = np.flatnonzero(trace.any(axis=(0, 2)))
        if active.size == 0:
            raise InvalidArgumentError(f"trace {config.trace!r} holds no counts")
        total_layers = trace.shape[1]
        layer_ids = active.astype(np.int64)
        if active.size != total_layers:
            trace = np.ascontiguousarray(trace[:, active])
        if not 0 <= config.trace_rotate < trace.shape[0]:
            raise InvalidArgumentError(
                f"trace_rotate={config.trace_rotate} is outside [0, {trace.shape[0]}) "
                f"(the trace's rows)"
            )
        if config.trace_rotate:
            trace = np.ascontiguousarray(np.roll(trace, -config.trace_rotate, axis=0))
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
        if unused_tail == 0 and config.trace_rotate == 0:
            notes.append(
                "the trace has no unused rows at the end: if it is a bounded SGLang stat buffer "
                "that wrapped, its rows are in storage order, not time order (windows then mix "
                "old and new passes); replay from the oldest pass with trace_rotate / "
                "--trace-rotate = passes recorded mod buffer size, or record with "
                "--expert-distribution-recorder-buffer-size -1"
            )
        num_steps = trace.shape[0]
        if num_steps < 2 * config.rebalance_period:
            raise InvalidArgumentError(
                f"trace {config.trace!r} has {num_steps} steps: fewer than two windows of "
                f"rebalance_period={config.rebalance_period}"
            )
        source = f"trace {config.trace}"
    else:
        total_layers = preset.num_hidden_layers
        num_moe = config.num_layers or preset.num_moe_layers
        layer_ids = np.arange(preset.first_moe_layer, preset.first_moe_layer + num_moe)
        num_steps = config.num_steps
        source = "synthetic"
    L = len(layer_ids)
    period = config.rebalance_period
    num_windows = -(-num_steps // period)

    trivial = ExpertLocation.trivial(L, E, P, W, config.num_nodes)
    policies = [_Policy("trivial", None, "auto", "total", trivial)]
    for spec in config.algorithms:
        policies.append(_Policy(spec, *parse_algorithm(spec), trivial))
    bounds_all: list[npt.NDArray[np.float64]] = []  # per window [T_w, L] mean / bound

    token_level = trace is None
    traffic = _SyntheticTraffic(preset, L, config) if trace is None else None
    recorder: ExpertDistributionRecorder | None = None
    routers: list[Any] = []
    if traffic is not None:
        recorder = ExpertDistributionRecorder((L, E), buffer_size=period)
        recorder.start()
        topk = preset.topk_config()
        for layer in layer_ids:
            if layer < preset.num_hash_layers:
                tid2eid = np.random.default_rng([config.seed, 4, int(layer)]).integers(
                    0, E, (preset.vocab_size, topk.top_k), dtype=np.int32
                )
                routers.append(
                    HashRouter(
                        tid2eid,
                        scoring=topk.scoring,
                        routed_scaling_factor=topk.routed_scaling_factor,
                    )
                )
            else:
                routers.append(topk)
    bounds_tokens = np.linspace(0, config.num_tokens, W + 1).astype(np.int64)
    source_rank = np.repeat(np.arange(W), np.diff(bounds_tokens))

    done = 0
    for window in range(num_windows):
        first, last = window * period, min((window + 1) * period, num_steps)
        if trace is not None:
            counts = trace[first:last]
        else:
            assert traffic is not None and recorder is not None
            for step in range(first, last):
                t1 = time.perf_counter()
                routed: list[npt.NDArray[np.int32]] = []
                with recorder.forward_pass(step):
                    ids = traffic.input_ids()
                    for index, router in enumerate(routers):
                        logits = traffic.logits(index, step)
                        with recorder.layer(index):
                            if isinstance(router, HashRouter):
                                out = router.select(logits, ids, recorder=recorder, layer=index)
                            else:
                                out = select_experts(logits, router, recorder=recorder, layer=index)
                        routed.append(out.recorder_topk_ids)
                timings["traffic"] += time.perf_counter() - t1
                if token_level and window > 0:
                    t1 = time.perf_counter()
                    for policy in policies:
                        for name in config.dispatch:
                            policy.token.setdefault(name, []).append(
                                _token_level(
                                    policy,
                                    name,
                                    routed,
                                    step,
                                    bounds_tokens,
                                    source_rank,
                                    P,
                                    config,
                                )
                            )
                    timings["token_level"] += time.perf_counter() - t1
                done += 1
                if progress is not None:
                    progress(done, num_steps)
            counts = np.ascontiguousarray(recorder.dump()["logical_count"], dtype=np.int32)
            recorder.clear()
        t0 = time.perf_counter()
        mean_load = None
        bound = step_lower_bounds(counts, P, W)
        for policy in policies:
            max_load, mean_load = score_steps(counts, policy.current)
            serving = _balancedness(max_load, mean_load)
            policy.step_balancedness.append(serving.mean(axis=1))
            policy.min_gap = min(policy.min_gap, _min_gap(max_load, bound))
            if window > 0:
                policy.predictive.append(serving)
                g = gpu_loads(counts, policy.current)
                policy.gpu_load_sum = g if policy.gpu_load_sum is None else policy.gpu_load_sum + g
                policy.gpu_load_steps += counts.shape[0]
            if policy.algorithm is None:
                policy.in_window.append(serving)
        assert mean_load is not None
        bounds_all.append(_balancedness(bound, mean_load))
        timings["scoring"] += time.perf_counter() - t0
        # Plan on this window; the plan serves the next one.
        window_load = counts.sum(axis=0, dtype=np.float64)
        for policy in policies:
            if policy.algorithm is None:
                continue
            t0 = time.perf_counter()
            plan = rebalance(
                counts if policy.objective == "step_peak" else window_load,
                P,
                preset.num_groups,
                config.num_nodes,
                W,
                algorithm=policy.algorithm,
                previous=policy.current,
                locality=policy.locality,
                expert_bytes=expert_bytes,
                objective=policy.objective,
            )
            timings["planning"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            max_load, mean_load = score_steps(counts, plan.location)
            policy.in_window.append(_balancedness(max_load, mean_load))
            policy.min_gap = min(policy.min_gap, _min_gap(max_load, bound))
            timings["scoring"] += time.perf_counter() - t0
            policy.current = plan.location
            policy.ran = plan.stats.algorithm
            policy.moved_experts.append(plan.stats.moved_experts)
            policy.moved_bytes.append(int(plan.stats.moved_bytes or 0))
            policy.plan_seconds.append(plan.stats.wall_time_seconds)
            policy.tables = {}
        if trace is not None:
            done = last
            if progress is not None:
                progress(done, num_steps)

    results = {
        p.name: _result(p, L, layer_ids, total_layers, E, P, W, config.num_nodes) for p in policies
    }
    bound_in_window = np.concatenate(bounds_all)
    bound_predictive = np.concatenate(bounds_all[1:])
    timings["total"] = time.perf_counter() - start_all
    return SimulationResult(
        config=config,
        source=source,
        num_steps=num_steps,
        num_windows=num_windows,
        num_physical_experts=P,
        expert_bytes=expert_bytes,
        layer_ids=np.asarray(layer_ids, dtype=np.int64),
        bound_in_window=float(bound_in_window.mean()),
        bound_predictive=float(bound_predictive.mean()),
        layer_bound_predictive=bound_predictive.mean(axis=0),
        algorithms=results,
        timings=timings,
        notes=notes,
    )


def _min_gap(max_load: npt.NDArray[np.float64], bound: npt.NDArray[np.float64]) -> float:
    mask = bound > 0
    if not mask.any():
        return 0.0
    return float((max_load[mask] / bound[mask]).min() - 1.0)


def _token_level(
    policy: _Policy,
    dispatch: str,
    routed: Sequence[npt.NDArray[np.int32]],
    step: int,
    bounds_tokens: npt.NDArray[np.int64],
    source_rank: npt.NDArray[np.int64],
    num_physical_experts: int,
    config: SimulationConfig,
) -> tuple[float, float, float]:
    """Mean over layers of (routed, +shared local, +Waterfill) balancedness for one step, the
    tokens of every source rank dispatched by ``dispatch`` (NaN for what it cannot place)."""
    W = config.ep_size
    S = num_physical_experts // W
    location = policy.current
    if dispatch in TABLE_DISPATCH and dispatch not in policy.tables:
        policy.tables[dispatch] = dispatch_tables(location, dispatch, seed=config.seed)
    mode = config.waterfill or "static"
    tokens_per_rank = np.diff(bounds_tokens).astype(np.float64)
    step_seed = _step_seed(config.seed, step)  # one stream per step, the same for every layer
    totals = np.zeros(3)
    for layer, ids in enumerate(routed):
        if dispatch == "equal_split":
            # Every (token, expert) split equally over the expert's replicas: fractional loads.
            counts = np.bincount(ids.ravel(), minlength=location.num_logical_experts)
            p2l = location.physical_to_logical[layer]
            share = counts[p2l] / location.logical_count[layer][p2l]
            routed_load = share.reshape(W, S).sum(axis=1)
            totals += (
                _mean_over_max(routed_load),
                _mean_over_max(routed_load + tokens_per_rank),
                np.nan,
            )
            continue
        if dispatch in TABLE_DISPATCH:
            physical = policy.tables[dispatch][source_rank[:, None], layer, ids]
        else:
            physical = dispatch_tokens(
                ids,
                location,
                layer,
                dispatch,
                rank_offsets=bounds_tokens,
                seed=step_seed,
            )
        routed_load = np.bincount(physical.ravel() // S, minlength=W)
        if config.waterfill is None:
            local = _mean_over_max(routed_load + tokens_per_rank)
            totals += (_mean_over_max(routed_load), local, np.nan)
            continue
        batches = [physical[bounds_tokens[r] : bounds_tokens[r + 1]] for r in range(W)]
        loads = waterfill_rank_loads(batches, num_physical_experts, mode=mode)
        totals += (
            _mean_over_max(routed_load),
            loads.balancedness_local,
            loads.balancedness_waterfill,
        )
    return tuple(totals / len(routed))  # type: ignore[return-value]


def _mean_over_max(loads: npt.NDArray[Any]) -> float:
    """SGLang's utilization rate of one layer's per-GPU loads."""
    return float(utilization_rate(float(loads.mean()), float(loads.max())))


def _step_seed(seed: int, step: int) -> int:
    """The per-step seed of the per-token dispatch draws (a fresh stream every step)."""
    return int(np.random.default_rng([seed, 7, step]).integers(0, 2**62))


def _result(
    policy: _Policy,
    L: int,
    layer_ids: npt.NDArray[np.int64],
    total_layers: int,
    E: int,
    P: int,
    W: int,
    num_nodes: int,
) -> AlgorithmResult:
    in_window = np.concatenate(policy.in_window)
    predictive = np.concatenate(policy.predictive)
    realised = {}
    for name, rows in policy.token.items():
        token = np.asarray(rows)
        waterfill = float(token[:, 2].mean())
        realised[name] = DispatchResult(
            routed=float(token[:, 0].mean()),
            shared_local=float(token[:, 1].mean()),
            waterfill=None if np.isnan(waterfill) else waterfill,
        )
    assert policy.gpu_load_sum is not None
    # The last plan, widened to every layer of the model (the others trivial).
    full = ExpertLocation.trivial(total_layers, E, P, W, num_nodes).physical_to_logical.copy()
    full[layer_ids] = policy.current.physical_to_logical
    return AlgorithmResult(
        name=policy.name,
        ran=policy.ran,
        in_window=float(in_window.mean()),
        predictive=float(predictive.mean()),
        layer_in_window=in_window.mean(axis=0),
        layer_predictive=predictive.mean(axis=0),
        step_balancedness=np.concatenate(policy.step_balancedness),
        realised=realised,
        moved_experts=policy.moved_experts,
        moved_bytes=policy.moved_bytes,
        plan_seconds=policy.plan_seconds,
        gpu_load=policy.gpu_load_sum / max(policy.gpu_load_steps, 1),
        min_gap=policy.min_gap,
        placement=ExpertLocation(full, E, W, num_nodes),
    )
