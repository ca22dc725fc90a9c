"""A float32 PyTorch CPU reference of SGLang's DeepSeek MoE layer forward, for benchmarking
moelb's ``DeepSeekMoE`` against.

Written from the behavioural specification (``reference/moe_layer.md`` sections 6-8): the gate
GEMM, the routers of ``torch_reference.py`` (V3 ``biased_grouped_topk``, V4 ``biased_topk``,
``hash_topk``), the routed experts as the per-expert loop that SGLang's CPU fallback without AMX
runs (``moe_forward_native``, section 7.2), ``routed_scaling_factor`` applied once to the routed
sum (section 7.4) and the separate shared expert MLP added at the end (section 8.3):

    out = rsf * sum_k w_k * W2_e (silu(min(g, L)) * clamp(u, -L, L)) + shared(x)

The routed loop sorts the (token, k) pairs by expert; per expert it gathers the tokens
(``index_select``), runs ``F.linear`` (gate/up) -> SwiGLU -> ``F.linear`` (down), multiplies by
the routing weights and ``index_add_``s the rows into the output. SGLang's loop instead scatters
every pair's output into a [T * K, H] buffer and sums over K; the arithmetic is the same and the
``index_add_`` form needs less memory. ``TorchDeepSeekMoE`` runs everything in float32 (SGLang
runs bf16 activations), in whatever threads ``torch.set_num_threads`` allows; call it under
``torch.inference_mode()``. ``TorchFormatDeepSeekMoE`` is the same layer over weights in moelb's
weight formats (bf16, FP8 E4M3 with block scales, int8 per channel) and bf16 or float32
activations, computed as a weight-only PyTorch CPU fallback does: each expert's matrices
dequantised right before its GEMM, the GEMMs in bf16 when the activations are.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
import torch_reference

__all__ = [
    "ACTIVATION_DTYPES",
    "TorchDeepSeekMoE",
    "TorchFormatDeepSeekMoE",
    "stored_tensor",
    "swiglu",
]


def swiglu(gate_up: torch.Tensor, limit: float | None) -> torch.Tensor:
    """silu(min(g, L)) * clamp(u, -L, L) of gate_up [n, 2 width] (gate columns first); L = limit,
    None: no clamp (SGLang's ``SiluAndMul`` / ``silu_and_mul_clamp``). Returns [n, width]."""
    gate, up = gate_up.chunk(2, dim=-1)
    if limit is not None:
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
    return F.silu(gate) * up


class TorchDeepSeekMoE:
    """The MoE layer of ``config`` (a ``moelb.DeepSeekMoEConfig`` or any object with its fields)
    over ``weights`` (the arrays of ``moelb.random_moe_weights``: gate [E, H], correction_bias
    [E] or None, w13 [E, 2I, H], w2 [E, H, I], shared_gate_up [2 Is, H], shared_down [H, Is],
    tid2eid [vocab, K]; float32 NumPy arrays, shared with the tensors, not copied).

    The shared expert must be separate (``fuse_shared_experts`` False)."""

    def __init__(self, config: Any, weights: Mapping[str, Any]) -> None:
        if config.fuse_shared_experts:
            raise ValueError("the torch reference runs a separate shared expert only")

        def tensor(name: str) -> torch.Tensor | None:
            array = weights.get(name)
            return None if array is None else torch.from_numpy(array)

        self.config = config
        self.gate = tensor("gate")
        self.correction_bias = tensor("correction_bias")
        self.w13 = tensor("w13")
        self.w2 = tensor("w2")
        self.shared_gate_up = tensor("shared_gate_up")
        self.shared_down = tensor("shared_down")
        self.tid2eid = tensor("tid2eid")
        self.swiglu_limit = config.swiglu_limit
        self.shared_swiglu_limit = (
            config.swiglu_limit
            if config.shared_swiglu_limit is None
            else config.shared_swiglu_limit
        )
        self.has_shared = config.num_shared_experts > 0

    def route(
        self, hidden: torch.Tensor, input_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The gate GEMM and top-k: (topk_ids int32 [T, K], topk_weights float32 [T, K]),
        renormalised, without rsf (the layer applies it to the routed sum)."""
        c = self.config
        logits = F.linear(hidden, self.gate)
        if c.is_hash_layer:
            if input_ids is None:
                raise ValueError("a hash layer needs input_ids")
            return torch_reference.hash_topk(
                logits,
                input_ids,
                self.tid2eid,
                scoring=c.scoring,
                routed_scaling_factor=c.routed_scaling_factor,
            )
        bias = self.correction_bias
        if bias is None:
            bias = torch.zeros(c.num_experts, dtype=torch.float32)
        common = {
            "top_k": c.top_k,
            "renormalize": c.renormalize,
            "routed_scaling_factor": c.routed_scaling_factor,
        }
        if c.num_groups is not None:
            if c.scoring != "sigmoid":
                raise ValueError("grouped routing is V3's sigmoid router")
            return torch_reference.biased_grouped_topk(
                logits, bias, num_groups=c.num_groups, topk_group=c.topk_group, **common
            )
        return torch_reference.biased_topk(logits, bias, scoring=c.scoring, **common)

    def routed(
        self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        """sum_k w_k * expert_{id_k}(x) [T, H] (no rsf), one expert at a time."""
        top_k = topk_ids.shape[1]
        out = torch.zeros_like(hidden)
        flat_ids = topk_ids.reshape(-1).long()
        order = flat_ids.argsort(stable=True)
        tokens = order // top_k
        weights = topk_weights.reshape(-1)[order].unsqueeze(1)
        counts = torch.bincount(flat_ids, minlength=self.config.num_experts).tolist()
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            rows = tokens[start : start + count]
            x = hidden.index_select(0, rows)
            act = swiglu(F.linear(x, self.w13[expert]), self.swiglu_limit)
            y = F.linear(act, self.w2[expert])
            out.index_add_(0, rows, y.mul_(weights[start : start + count]))
            start += count
        return out

    def shared(self, hidden: torch.Tensor) -> torch.Tensor:
        """The shared expert MLP [T, H]."""
        act = swiglu(F.linear(hidden, self.shared_gate_up), self.shared_swiglu_limit)
        return F.linear(act, self.shared_down)

    def forward(self, hidden: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [T, H] float32 -> [T, H] float32: rsf * routed + shared."""
        topk_ids, topk_weights = self.route(hidden, input_ids)
        out = self.routed(hidden, topk_ids, topk_weights)
        out.mul_(self.config.routed_scaling_factor)
        if self.has_shared:
            out.add_(self.shared(hidden))
        return out

    __call__ = forward


#: The torch dtype of each moelb activation dtype.
ACTIVATION_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def stored_tensor(array: Any) -> torch.Tensor | None:
    """A NumPy weight array in its stored dtype (float32, int8, ml_dtypes bfloat16 or
    float8_e4m3fn) as the torch tensor of the same bytes (shared, not copied)."""
    if array is None:
        return None
    name = array.dtype.name
    if name == "bfloat16":
        return torch.from_numpy(array.view("int16")).view(torch.bfloat16)
    if name == "float8_e4m3fn":
        return torch.from_numpy(array.view("uint8")).view(torch.float8_e4m3fn)
    return torch.from_numpy(array)


class TorchFormatDeepSeekMoE(TorchDeepSeekMoE):
    """The same layer over weights stored in a moelb weight format, computed as PyTorch on CPU
    would compute it in that format:

    * the router: ``F.linear`` of the float32 values of the input with the float32 gate, then the
      routers as above (float32);
    * the compute dtype C is bfloat16 when the activations are bfloat16 and the weights are not
      float32, else float32; the input is cast to C once;
    * each expert projection's weight becomes a C matrix right before its ``F.linear``:
      float32 as stored; bfloat16 as stored (C bf16) or ``.float()`` (C float32); fp8_e4m3
      ``q.float() * scale_inv`` expanded over its blocks (``repeat_interleave``), then ``.to(C)``;
      int8 ``q.float() * scale_inv[:, None]``, then ``.to(C)`` -- dequantised per expert and call,
      as a weight-only PyTorch fallback does (nothing dequantised is kept between calls);
    * ``F.linear`` -> SwiGLU -> ``F.linear`` in C (bf16 GEMMs: PyTorch's oneDNN / MKL bf16 path
      with float32 accumulation and bf16 outputs), the routed sum accumulated in float32 with
      ``index_add_``, rsf, plus the shared expert; the output cast to the input's dtype.

    weights: the moelb weights dict (``w13`` / ``w2`` / ``shared_*`` in the stored dtype, with
    ``*_scale_inv`` for fp8 and int8). activation_dtype: 'float32' or 'bfloat16'."""

    def __init__(
        self,
        config: Any,
        weights: Mapping[str, Any],
        *,
        weight_format: str,
        activation_dtype: str,
        block_size: tuple[int, int] = (128, 128),
    ) -> None:
        routing = {k: weights.get(k) for k in ("gate", "correction_bias", "tid2eid")}
        super().__init__(config, routing)
        self.weight_format = weight_format
        self.block_size = block_size
        act = ACTIVATION_DTYPES[activation_dtype]
        self.compute = (
            torch.bfloat16
            if act == torch.bfloat16 and weight_format != "float32"
            else (torch.float32)
        )
        for name in ("w13", "w2", "shared_gate_up", "shared_down"):
            setattr(self, name, stored_tensor(weights.get(name)))
            scale = weights.get(name + "_scale_inv")
            setattr(self, name + "_scale", None if scale is None else torch.from_numpy(scale))

    def dense(self, q: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        """The weight matrix ``q`` [rows, cols] (with its scales) as a compute-dtype matrix."""
        fmt = self.weight_format
        if fmt == "float32":
            return q
        if fmt == "bfloat16":
            return q if self.compute == torch.bfloat16 else q.float()
        w = q.float()
        if fmt == "int8":
            w.mul_(scale[:, None])
        else:
            rows, cols = w.shape
            br, bc = self.block_size
            full = scale.repeat_interleave(br, 0)[:rows].repeat_interleave(bc, 1)[:, :cols]
            w.mul_(full)
        return w.to(self.compute)

    def routed(
        self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        """sum_k w_k * expert_{id_k}(x) [T, H] float32 (no rsf); hidden in the compute dtype."""
        top_k = topk_ids.shape[1]
        out = torch.zeros(hidden.shape, dtype=torch.float32)
        flat_ids = topk_ids.reshape(-1).long()
        order = flat_ids.argsort(stable=True)
        tokens = order // top_k
        weights = topk_weights.reshape(-1)[order].unsqueeze(1)
        counts = torch.bincount(flat_ids, minlength=self.config.num_experts).tolist()
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            rows = tokens[start : start + count]
            x = hidden.index_select(0, rows)
            s13 = None if self.w13_scale is None else self.w13_scale[expert]
            s2 = None if self.w2_scale is None else self.w2_scale[expert]
            act = swiglu(F.linear(x, self.dense(self.w13[expert], s13)), self.swiglu_limit)
            y = F.linear(act, self.dense(self.w2[expert], s2))
            out.index_add_(0, rows, y.float().mul_(weights[start : start + count]))
            start += count
        return out

    def shared(self, hidden: torch.Tensor) -> torch.Tensor:
        """The shared expert MLP [T, H] float32; hidden in the compute dtype."""
        gate_up = self.dense(self.shared_gate_up, self.shared_gate_up_scale)
        act = swiglu(F.linear(hidden, gate_up), self.shared_swiglu_limit)
        return F.linear(act, self.dense(self.shared_down, self.shared_down_scale)).float()

    def forward(self, hidden: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [T, H] float32 or bfloat16 -> [T, H] of the same dtype."""
        topk_ids, topk_weights = self.route(hidden.float(), input_ids)
        x = hidden.to(self.compute)
        out = self.routed(x, topk_ids, topk_weights)
        out.mul_(self.config.routed_scaling_factor)
        if self.has_shared:
            out.add_(self.shared(x))
        return out.to(hidden.dtype)

    __call__ = forward
