"""The DeepSeek MoE layer forward on CPU (``DeepSeekMoE``) and its configuration
(``DeepSeekMoEConfig``): SGLang's DeepseekV2MoE maths, with the shared expert deferred after an
out-of-place routed kernel (PR #25279) and every temporary counted by a byte-counting workspace."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np
import numpy.typing as npt

from . import _core
from ._core import ExpertLocation, InvalidArgumentError
from .weight_moves import WeightMovePlan, apply_weight_moves

__all__ = [
    "ACTIVATION_DTYPES",
    "WEIGHT_FORMATS",
    "WEIGHT_NAMES",
    "DeepSeekMoE",
    "DeepSeekMoEConfig",
    "gemm_scratch_bytes",
    "quantize_weights",
    "random_moe_weights",
    "stored_dtype",
]

#: The stored formats of the experts' matrices (``DeepSeekMoEConfig.weight_format``).
WEIGHT_FORMATS = ("float32", "bfloat16", "fp8_e4m3", "int8")
#: The dtypes of ``hidden`` and of the output (``DeepSeekMoEConfig.activation_dtype``).
ACTIVATION_DTYPES = ("float32", "bfloat16")

#: The arrays of a layer's weights (``DeepSeekMoE(config, weights)``). The expert matrices are in
#: the config's stored dtype (``stored_dtype(weight_format)``); the ``*_scale_inv`` arrays are
#: float32 scales for fp8_e4m3 (per block: [..., ceil(rows / br), ceil(cols / bc)]) and int8 (per
#: row: [..., rows]), absent or None otherwise.
WEIGHT_NAMES = (
    "gate",  # [E, H] float32
    "correction_bias",  # [E] or None (hash layers have none)
    "w13",  # [E, 2I, H]: rows [0, I) gate projection, [I, 2I) up projection
    "w2",  # [E, H, I]
    "shared_gate_up",  # [2 Is, H] or None (no shared expert)
    "shared_down",  # [H, Is] or None
    "tid2eid",  # [vocab_size, K] int, hash layers only
    "w13_scale_inv",  # fp8 [E, ceil(2I / br), ceil(H / bc)], int8 [E, 2I]
    "w2_scale_inv",  # fp8 [E, ceil(H / br), ceil(I / bc)], int8 [E, H]
    "shared_gate_up_scale_inv",  # fp8 [ceil(2 Is / br), ceil(H / bc)], int8 [2 Is]
    "shared_down_scale_inv",  # fp8 [ceil(H / br), ceil(Is / bc)], int8 [H]
)


def _block_size(block: Any, name: str) -> tuple[int, int]:
    """``block`` as a (rows, cols) tuple of Python ints; anything else (not two values, bools,
    floats, strings) is an InvalidArgumentError naming ``name`` and the value."""
    try:
        values = tuple(block)
    except TypeError:
        values = None
    if (
        values is None
        or len(values) != 2
        or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in values
        )
    ):
        raise InvalidArgumentError(f"{name} must be (rows, cols) of two integers, got {block!r}")
    return (int(values[0]), int(values[1]))


def gemm_scratch_bytes(rows: int, k: int) -> int:
    """Bytes of scratch the layer's quantised GEMM takes per lane for ``rows`` rows of input with
    ``k`` columns, on the ISA path this process runs (``moelb.cpu_isa()``): the ``D`` of the
    memory model in ``expected_peak_bytes`` (the layer asks for 128 rows). It differs slightly
    between ISA paths (vector width)."""
    return _core.moe_gemm_scratch_bytes(rows, k)


def stored_dtype(weight_format: str) -> np.dtype:
    """The NumPy dtype a weight format's elements are stored in: float32, ml_dtypes.bfloat16,
    ml_dtypes.float8_e4m3fn or int8."""
    dtypes = {
        "float32": np.dtype(np.float32),
        "bfloat16": np.dtype(ml_dtypes.bfloat16),
        "fp8_e4m3": np.dtype(ml_dtypes.float8_e4m3fn),
        "int8": np.dtype(np.int8),
    }
    if weight_format not in dtypes:
        raise InvalidArgumentError(
            f"weight_format={weight_format!r} is not a weight format; expected one of "
            f"{WEIGHT_FORMATS}"
        )
    return dtypes[weight_format]


def quantize_weights(
    array: Any, weight_format: str, block_size: tuple[int, int] = (128, 128)
) -> tuple[npt.NDArray[Any], npt.NDArray[np.float32] | None]:
    """Quantises float32 weights ``array`` [..., rows, cols] (each trailing matrix on its own)
    into ``weight_format``; returns ``(q, scale_inv)`` with ``q`` in ``stored_dtype(weight_format)``
    and the float32 scales (None for float32 / bfloat16):

    - ``"bfloat16"``: round to nearest even;
    - ``"fp8_e4m3"``: per ``block_size`` (rows, cols) block, ``scale_inv = amax / 448``
      (DeepSeek's convention; an all-zero block gets 1), ``q = fp8(w / scale_inv)`` rounded to
      nearest even; ``scale_inv`` [..., ceil(rows / br), ceil(cols / bc)];
    - ``"int8"``: per row, ``scale_inv = amax / 127`` (all-zero row: 1), ``q = round_half_even(w /
      scale_inv)`` clamped to [-127, 127]; ``scale_inv`` [..., rows];
    - ``"float32"``: a float32 copy.

    Dequantised: ``q * scale_inv`` broadcast over each block / row (moelb's contract for every
    format). fp8 and int8 refuse non-finite weights."""
    q, scale = _core.quantize_weights(array, weight_format, _block_size(block_size, "block_size"))
    return q, scale


@dataclass(frozen=True)
class DeepSeekMoEConfig:
    """One MoE layer's shape and behaviour (reference/moe_layer.md sections 1-11).

    hidden_size H, intermediate_size I (per routed expert), num_experts E, top_k K;
    num_shared_experts: the shared expert's intermediate size is I * num_shared_experts (0: none);
    fuse_shared_experts: the shared expert is routed expert E, chosen by every token with weight
        1/rsf (needs num_shared_experts=1 and renormalize);
    scoring ('sigmoid', 'sqrtsoftplus', 'softmax'), num_groups / topk_group (grouped selection,
        None: ungrouped), renormalize, routed_scaling_factor (applied once, to the routed sum);
    num_hash_layers, layer_id: layers below num_hash_layers route by token id (tid2eid,
        vocab_size rows); swiglu_limit: the SwiGLU clamp (gate <= L, |up| <= L; None: none) of the
        routed experts, shared_swiglu_limit that of the shared expert (None: the same);
    kernel: 'out_of_place' (the input survives the routed kernel) or 'inplace' (the routed kernel
        writes its output into the input, SGLang's Triton path); defer_shared: 'auto' (defer the
        shared expert exactly when the kernel is out-of-place), True or False;
    weight_format: the stored format of the routed and shared experts' matrices ('float32',
        'bfloat16', 'fp8_e4m3' with DeepSeek's block scales, 'int8' per output channel; the router
        gate stays float32); weight_block_size: (rows, cols) of one fp8 scale block (fp8 needs
        intermediate_size % rows == 0: w13 concatenates the gate and up projections);
    activation_dtype: 'float32' or 'bfloat16', the dtype of ``hidden`` and of the output.

    Presets: ``deepseek_v3()``, ``deepseek_v4_flash()``, ``deepseek_v4_pro()``; ``replace(...)``
    for custom (e.g. scaled-down) shapes.
    """

    hidden_size: int
    intermediate_size: int
    num_experts: int
    top_k: int
    num_shared_experts: int = 1
    fuse_shared_experts: bool = False
    scoring: str = "sigmoid"
    num_groups: int | None = None
    topk_group: int | None = None
    renormalize: bool = True
    routed_scaling_factor: float = 1.0
    num_hash_layers: int = 0
    layer_id: int = 0
    vocab_size: int = 0
    swiglu_limit: float | None = None
    shared_swiglu_limit: float | None = None
    kernel: str = "out_of_place"
    defer_shared: bool | str = "auto"
    weight_format: str = "float32"
    weight_block_size: tuple[int, int] = (128, 128)
    activation_dtype: str = "float32"

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "weight_block_size", _block_size(self.weight_block_size, "weight_block_size")
        )
        _core.moe_config_validate(self.as_dict())

    @classmethod
    def deepseek_v3(cls, layer_id: int = 3) -> DeepSeekMoEConfig:
        """DeepSeek-V3/R1: H 7168, I 2048, 256 experts top-8, sigmoid, 8 groups keep 4, rsf 2.5."""
        return cls(**_core.moe_config_preset("deepseek_v3", layer_id))

    @classmethod
    def deepseek_v4_flash(cls, layer_id: int = 3) -> DeepSeekMoEConfig:
        """DeepSeek-V4-Flash: H 4096, I 2048, 256 experts top-6, sqrt-softplus, rsf 1.5, hash
        routing in layers 0-2, SwiGLU clamp 10."""
        return cls(**_core.moe_config_preset("deepseek_v4_flash", layer_id))

    @classmethod
    def deepseek_v4_pro(cls, layer_id: int = 3) -> DeepSeekMoEConfig:
        """DeepSeek-V4-Pro: H 7168, I 3072, 384 experts top-6, rsf 2.5, otherwise as Flash."""
        return cls(**_core.moe_config_preset("deepseek_v4_pro", layer_id))

    def replace(self, **changes: Any) -> DeepSeekMoEConfig:
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def is_hash_layer(self) -> bool:
        return self.layer_id < self.num_hash_layers

    @property
    def shared_intermediate_size(self) -> int:
        return self.intermediate_size * self.num_shared_experts

    def expected_peak_bytes(
        self,
        num_tokens: int,
        num_physical_experts: int | None = None,
        routed_lanes: int = 1,
        shared_lanes: int = 1,
        gate_lanes: int = 1,
    ) -> int:
        """The forward's peak workspace bytes from the documented formula (moe_layer.cpp): works
        for shapes too large to instantiate. Lanes: parallel lanes of the routed, shared and gate
        steps (``last_stats()`` reports them; the gate's count with bf16 activations only)."""
        return _core.moe_expected_peak_bytes(
            self.as_dict(),
            num_tokens,
            self.num_experts if num_physical_experts is None else num_physical_experts,
            routed_lanes,
            shared_lanes,
            gate_lanes,
        )


def random_moe_weights(config: DeepSeekMoEConfig, seed: int = 0) -> dict[str, Any]:
    """Seeded random weights of ``config``'s shapes (the arrays of ``WEIGHT_NAMES``): drawn in
    float32 (the same draws for every format) and quantised into ``config.weight_format``."""
    return _core.moe_random_weights(config.as_dict(), seed)


class DeepSeekMoE(_core.DeepSeekMoE):
    """The DeepSeek MoE layer on CPU: ``out = rsf * sum_k w_k * expert_k(x) + shared(x)``.

    config: a ``DeepSeekMoEConfig``.
    weights: a mapping with the arrays of ``WEIGHT_NAMES`` (logical experts; the expert matrices
        in ``stored_dtype(config.weight_format)`` with their ``*_scale_inv`` arrays for fp8 / int8
        -- a float32 layer converts float16, float64 and integer arrays other than int8; bf16 and
        int8 arrays are refused there, as they are surely meant for another format --, the gate
        and bias float32), or None for
        ``random_moe_weights(config, seed)``. ``quantize_weights`` makes the stored arrays.
    location, layer, ep_rank: the routed weights are held per physical slot of ``location``'s MoE
        layer ``layer`` (default: the trivial placement); tokens are dispatched to replicas as seen
        from ``ep_rank`` (static dispatch).
    """

    def __init__(
        self,
        config: DeepSeekMoEConfig,
        weights: Mapping[str, Any] | None = None,
        *,
        seed: int = 0,
        location: ExpertLocation | None = None,
        layer: int = 0,
        ep_rank: int = 0,
    ) -> None:
        if not isinstance(config, DeepSeekMoEConfig):
            raise InvalidArgumentError(
                f"config must be a DeepSeekMoEConfig, got {type(config).__name__}"
            )
        if weights is None:
            weights = random_moe_weights(config, seed)
        unknown = set(weights) - set(WEIGHT_NAMES)
        if unknown:
            raise InvalidArgumentError(
                f"weights has unknown arrays {sorted(unknown)}; expected {WEIGHT_NAMES}"
            )
        if "gate" not in weights or "w13" not in weights or "w2" not in weights:
            raise InvalidArgumentError("weights needs at least 'gate', 'w13' and 'w2'")
        super().__init__(
            config.as_dict(),
            *(weights.get(name) for name in WEIGHT_NAMES),
            location,
            layer,
            ep_rank,
        )
        self.config = config

    def forward(self, hidden: Any, input_ids: Any = None) -> npt.NDArray[Any]:  # type: ignore[override]
        """hidden: [T, H] in ``config.activation_dtype`` (float32, or ``ml_dtypes.bfloat16``),
        C-contiguous (with the in-place kernel it is overwritten and returned). input_ids: [T]
        token ids, required on hash layers. Returns [T, H] of hidden's dtype. Deterministic for
        any thread count."""
        return super().forward(hidden, input_ids)

    __call__ = forward

    def get_moe_weights(self) -> list[npt.NDArray[Any]]:
        """SGLang's ``get_moe_weights``: writable views ``[w13 [P, 2I, H], w2 [P, H, I]]`` in the
        stored dtype, plus ``[w13_scale_inv, w2_scale_inv]`` (float32, leading dimension P) for
        fp8_e4m3 / int8, of the routed physical slots only -- never the fused shared expert's
        rows (SGLang PR #27150), so EPLB weight moves cannot touch it."""
        return [view for view in self.routed_weights() if view is not None]

    def apply_weight_moves(self, plan: WeightMovePlan, new_location: ExpertLocation) -> None:
        """Runs ``plan`` (``moelb.plan_weight_moves(self.location, new_location, layer)``) over
        the routed slots' weights (their stored bytes and their scales together) and switches
        the layer to ``new_location``.

        The plan must start from the placement the layer holds (``self.location``'s layer
        ``self.layer``) and lead to ``new_location``'s; anything else (a stale plan, the
        same plan a second time, another layer's plan) is an InvalidArgumentError and leaves the
        weights and the placement as they were."""
        if not isinstance(plan, WeightMovePlan):
            raise TypeError(f"plan must be a WeightMovePlan, got {type(plan).__name__}")
        if not isinstance(new_location, ExpertLocation):
            raise TypeError(
                f"new_location must be an ExpertLocation, got {type(new_location).__name__}"
            )
        if plan.layer != self.layer:
            raise InvalidArgumentError(
                f"plan is for layer {plan.layer} but the layer holds layer {self.layer}"
            )
        ep_size, slots = plan.ep_size, plan.slots_per_rank
        if ep_size * slots != self.num_physical_experts:
            raise InvalidArgumentError(
                f"plan moves {ep_size} x {slots} slots but the layer has "
                f"{self.num_physical_experts}"
            )
        if (
            new_location.num_physical_experts != self.num_physical_experts
            or new_location.num_logical_experts != self.config.num_experts
            or not 0 <= self.layer < new_location.num_layers
        ):
            raise InvalidArgumentError(
                f"new_location has {new_location.num_logical_experts} logical / "
                f"{new_location.num_physical_experts} physical experts in "
                f"{new_location.num_layers} layers; the layer needs {self.config.num_experts} / "
                f"{self.num_physical_experts} and layer {self.layer}"
            )
        held = self.location
        plan.check_source(held, "the layer's location")
        plan.check_target(new_location, "new_location")
        views = self.get_moe_weights()
        moved = [
            apply_weight_moves(plan, view.reshape(ep_size, slots, *view.shape[1:]), location=held)
            for view in views
        ]
        # Nothing is written until every check passed and every result exists; set_location
        # validates new_location against the layer (e.g. ep_rank) before the weights change.
        self.set_location(new_location, self.layer)
        for view, result in zip(views, moved, strict=True):
            view[...] = result.reshape(view.shape)
