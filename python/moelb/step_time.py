"""The step-time model: what a placement and a dispatch buy in time, not only in balancedness.
DESIGN section 7 (a modelled MoE step time from a measured GPU table).

Per MoE layer and GPU g, over the routed experts (physical slots) e on g with T_e > 0 tokens::

    t_g = sum_e [ W / BW + gemm(T_e) ] + comm_g
    gemm(T) = max(0, seconds_per_expert(T) - W / BW)

W: one expert's weight bytes and BW the measured memory bandwidth (an expert with tokens streams
its weights once; one without is neither read nor computed); ``seconds_per_expert``: the measured
table of the GPU calibration (``moelb.gpu_calibration``: one expert's FFN at T tokens with its
weights streamed from memory, read by linear interpolation, extrapolated linearly beyond the last
point, never decreasing), so the compute part of an active expert is ``max(W / BW,
seconds_per_expert(T))``. The layer takes its slowest GPU plus the calibration's fixed per-layer
term (``layer_fixed_s``); the step takes the sum over the MoE layers simulated.

comm_g, per phase (dispatch, then combine): ``max(nvlink_bytes_g / nvlink_bytes_per_s,
network_bytes_g / network_bytes_per_s)`` -- the two links run concurrently, and each link is full
duplex, so a GPU's bytes on it are the larger of what it sends and what it receives. Bytes per
token copy (``DeepEP``): dispatch sends the hidden state in FP8 with one float32 scale per 128
channels (``hidden + 4 * ceil(hidden / 128)`` bytes: 7,392 for DeepSeek-V3), combine returns it
in bf16 (``2 * hidden``: 14,336). Which copies cross which link (``DEEPEP_MODES``):

- ``normal`` (DeepEP's normal kernels, SGLang's prefill path): a token goes once to every other
  GPU of its node that holds one of its experts (NVLink), and once to every other node holding one
  (the network, to the GPU of the same local index there), which forwards it over NVLink to the
  GPUs of that node that need it;
- ``low_latency`` (DeepEP's low-latency kernels, SGLang's decode path): one copy per (token,
  expert) whose GPU is not the token's own, over NVLink inside the node (DeepEP's
  ``allow_nvlink_for_low_latency_mode``), straight over the network across nodes.

A copy to the token's own GPU costs nothing. Interconnect defaults (``Interconnect``): NVLink
450 GB/s per direction per GPU (H100 and H200 SXM: NVLink 4, 18 links, 900 GB/s bidirectional per
GPU -- NVIDIA's H100 / H200 datasheets); network 50 GB/s per direction per GPU (one 400 Gb/s
ConnectX-7 InfiniBand NIC per GPU, as in DeepEP's README, which gives it about 50 GB/s at most and
measures 43-47 GB/s of RDMA bottleneck bandwidth for its internode normal kernels at EP16-32).
These are peaks, so the communication term is optimistic by about 10% (and leaves out latency);
they are parameters, not measured: only one GPU is lent to calibrate.

What the model leaves out: the shared expert, attention and everything outside the routed MoE;
overlap of communication with computation (two-batch overlap would hide part of comm_g); the
waiting of a GPU for its slowest sender inside a phase. It compares placements and dispatches on
one cluster, where those are the same for all.

Where the source rank of the tokens is not known (counts without tokens:
``uniform_copies``), every (token, expert) copy is assumed to come from a source rank drawn
uniformly over the ranks, without per-GPU deduplication: an upper bound of ``normal``'s bytes and
the expectation of ``low_latency``'s.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from . import _core
from ._core import InvalidArgumentError
from .gpu_calibration import DEFAULT_GPU, GemmTable, GpuCalibration, load_gpu_calibration

__all__ = [
    "DEEPEP_MODES",
    "Interconnect",
    "LinkCopies",
    "StepTime",
    "StepTimeModel",
    "dispatch_traffic",
    "token_copies",
    "uniform_copies",
]

#: How dispatch and combine move tokens (the module doc).
DEEPEP_MODES = ("normal", "low_latency")
#: DeepEP quantizes the dispatched hidden state to FP8 in blocks of this many channels, with one
#: float32 scale per block.
DEEPEP_FP8_BLOCK = 128


@dataclass(frozen=True)
class Interconnect:
    """Per-GPU, per-direction bandwidths in bytes per second (the module doc gives their
    sources): nvlink_bytes_per_s inside a node, network_bytes_per_s between nodes."""

    nvlink_bytes_per_s: float = 450e9
    network_bytes_per_s: float = 50e9

    def __post_init__(self) -> None:
        for name in ("nvlink_bytes_per_s", "network_bytes_per_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 1e6):
                raise InvalidArgumentError(
                    f"{name} must be a bandwidth in bytes per second (>= 1e6), got {value!r}"
                )


@dataclass(frozen=True)
class LinkCopies:
    """Token copies each GPU sends and receives in one dispatch, per link ([..., W] float64
    each; fractions where they are expectations). Combine moves the same copies back."""

    nvlink_sent: npt.NDArray[np.float64]
    nvlink_received: npt.NDArray[np.float64]
    network_sent: npt.NDArray[np.float64]
    network_received: npt.NDArray[np.float64]

    @property
    def nvlink(self) -> npt.NDArray[np.float64]:
        """[..., W]: copies on each GPU's busier NVLink direction."""
        return np.maximum(self.nvlink_sent, self.nvlink_received)

    @property
    def network(self) -> npt.NDArray[np.float64]:
        """[..., W]: copies on each GPU's busier network direction."""
        return np.maximum(self.network_sent, self.network_received)

    @staticmethod
    def stack(layers: list[LinkCopies]) -> LinkCopies:
        """Per-layer copies [W] stacked into [L, W]."""
        return LinkCopies(
            *(np.stack([getattr(c, f) for c in layers]) for f in LinkCopies.__dataclass_fields__)
        )


def _check_cluster(num_physical_experts: int, ep_size: int, num_nodes: int) -> None:
    if ep_size < 1 or num_nodes < 1 or ep_size % num_nodes:
        raise InvalidArgumentError(
            f"ep_size={ep_size} must be a positive multiple of num_nodes={num_nodes}"
        )
    if num_physical_experts < 1 or num_physical_experts % ep_size:
        raise InvalidArgumentError(
            f"num_physical_experts={num_physical_experts} is not a positive multiple of "
            f"ep_size={ep_size}"
        )


def token_copies(
    physical: Any,
    source_rank: Any,
    num_physical_experts: int,
    ep_size: int,
    num_nodes: int = 1,
    mode: str = "normal",
) -> LinkCopies:
    """The copies of one layer's dispatch ([W] each): ``physical`` [T, C] int physical slot ids
    (-1: none; slot p lives on GPU p // (P / W)), ``source_rank`` [T] int the GPU each token
    starts on; GPU r lives on node r // (W / N). ``mode``: ``DEEPEP_MODES`` (the module doc).
    Both arrays are converted to C-contiguous int32 (no copy when they already are); the count
    runs in the core (``moelb::token_copies``), one pass over the ids."""
    _, copies = dispatch_traffic(
        physical, source_rank, num_physical_experts, ep_size, num_nodes, mode
    )
    return copies


def dispatch_traffic(
    physical: Any,
    source_rank: Any,
    num_physical_experts: int,
    ep_size: int,
    num_nodes: int = 1,
    mode: str = "normal",
) -> tuple[npt.NDArray[np.int64], LinkCopies]:
    """One layer's inputs to the step-time model in one pass: (slot_tokens [P] int64, the
    (token, expert) pairs each physical slot computes; the ``token_copies``)."""
    if mode not in DEEPEP_MODES:
        raise InvalidArgumentError(f"mode={mode!r}, expected one of {DEEPEP_MODES}")
    ids = np.asarray(physical)
    source = np.asarray(source_rank)
    if ids.ndim != 2 or source.shape != (ids.shape[0],):
        raise InvalidArgumentError(
            f"physical must be [T, C] and source_rank [T], got {ids.shape} and {source.shape}"
        )
    for name, a in (("physical", ids), ("source_rank", source)):
        if a.size and not np.issubdtype(a.dtype, np.integer):
            raise InvalidArgumentError(f"{name} must hold integers, got dtype {a.dtype}")
    counts, slots = _core.token_copies(
        _int32(ids, "physical"),
        _int32(source, "source_rank"),
        num_physical_experts,
        ep_size,
        num_nodes,
        mode,
    )
    return slots, LinkCopies(*counts.astype(np.float64))


def _int32(a: npt.NDArray[Any], name: str) -> npt.NDArray[np.int32]:
    """``a`` as C-contiguous int32, refusing values that do not fit."""
    if a.dtype != np.int32 and a.size and (a.min() < -(2**31) or a.max() >= 2**31):
        raise InvalidArgumentError(f"{name} holds values that do not fit in int32")
    return np.ascontiguousarray(a, dtype=np.int32)


def uniform_copies(slot_tokens: Any, ep_size: int, num_nodes: int = 1) -> LinkCopies:
    """The expected copies of dispatches whose source ranks are unknown ([..., W] each, over
    the leading axes of ``slot_tokens`` [..., P], the (token, expert) copies each slot
    receives): every copy comes from a source rank drawn uniformly over the W ranks, one copy
    per (token, expert) (no deduplication). A GPU receives its copies from the other GPUs of
    its node ((G - 1) / W of them) over NVLink and from the other nodes ((W - G) / W) over the
    network; it sends 1 / W of every other GPU's copies, over NVLink to those of its node and
    over the network to the others."""
    tokens = np.asarray(slot_tokens, dtype=np.float64)
    P = tokens.shape[-1]
    _check_cluster(P, ep_size, num_nodes)
    W, G = ep_size, ep_size // num_nodes
    received = tokens.reshape(*tokens.shape[:-1], W, P // W).sum(axis=-1)
    total = received.sum(axis=-1, keepdims=True)
    # [..., W]: the copies the GPUs of each GPU's node receive.
    node = np.repeat(received.reshape(*received.shape[:-1], W // G, G).sum(axis=-1), G, axis=-1)
    in_node, other_nodes = (G - 1) / W, (W - G) / W
    return LinkCopies(
        (node - received) / W, received * in_node, (total - node) / W, received * other_nodes
    )


@dataclass(frozen=True)
class StepTime:
    """One step's modelled time, per simulated layer L and GPU W (seconds).

    weights_s: W / BW per active expert, summed per GPU. gemm_s: sum over active experts of
    gemm(T_e). comm_s: dispatch + combine. active_experts / tokens: the slots with tokens and
    the (token, expert) copies computed on each GPU. nvlink_copies / network_copies: the token
    copies on each GPU's busier direction of each link (zeros without copies). layer_fixed_s:
    the calibration's per-layer term."""

    weights_s: npt.NDArray[np.float64]
    gemm_s: npt.NDArray[np.float64]
    comm_s: npt.NDArray[np.float64]
    active_experts: npt.NDArray[np.int64]
    tokens: npt.NDArray[np.float64]
    layer_fixed_s: float
    nvlink_copies: npt.NDArray[np.float64]
    network_copies: npt.NDArray[np.float64]

    @property
    def gpu_s(self) -> npt.NDArray[np.float64]:
        """[L, W]: each GPU's time in each layer (without the fixed term)."""
        return self.weights_s + self.gemm_s + self.comm_s

    @property
    def slowest_gpu(self) -> npt.NDArray[np.int64]:
        """[L]: the slowest GPU of each layer (the lowest rank on a tie)."""
        return np.argmax(self.gpu_s, axis=1)

    @property
    def layer_s(self) -> npt.NDArray[np.float64]:
        """[L]: each layer's time: its slowest GPU plus the fixed term."""
        return self.gpu_s.max(axis=1) + self.layer_fixed_s

    @property
    def seconds(self) -> float:
        """The step's modelled MoE time: the sum of the layer times."""
        return float(self.layer_s.sum())

    @property
    def slowest_layer(self) -> int:
        """The layer (index among the simulated ones) that takes longest."""
        return int(np.argmax(self.layer_s))

    def explain(self, layer: int | None = None) -> str:
        """One line: which GPU is slowest in ``layer`` (default: the slowest layer) and what
        its time is made of, beside the mean GPU of that layer."""
        layer = self.slowest_layer if layer is None else layer
        g = int(self.slowest_gpu[layer])
        us = 1e6
        return (
            f"layer {layer}: GPU {g} slowest at {self.gpu_s[layer, g] * us:.1f} us = weights "
            f"{self.weights_s[layer, g] * us:.1f} ({self.active_experts[layer, g]} experts) + "
            f"GEMM {self.gemm_s[layer, g] * us:.1f} ({self.tokens[layer, g]:,.0f} token copies)"
            f" + comm {self.comm_s[layer, g] * us:.1f} ({self.network_copies[layer, g]:,.0f} "
            f"network, {self.nvlink_copies[layer, g]:,.0f} NVLink copies); mean GPU "
            f"{self.gpu_s[layer].mean() * us:.1f} us ({self.tokens[layer].mean():,.0f} token "
            f"copies, {self.network_copies[layer].mean():,.0f} network, "
            f"{self.nvlink_copies[layer].mean():,.0f} NVLink)"
        )


class StepTimeModel:
    """The step-time model of one GPU calibration, one model shape and one interconnect.

    calibration: a ``GpuCalibration``, a shipped key (``"h100"``) or a calibration file's path.
    model: the ``MODEL_PRESETS`` name whose GEMM table is used; dtype: its table's dtype (None:
    FP8 when the calibration has it, else bf16). interconnect: the bandwidths of the
    communication term."""

    def __init__(
        self,
        calibration: GpuCalibration | str | os.PathLike[str] = DEFAULT_GPU,
        model: str = "deepseek-v3",
        dtype: str | None = None,
        interconnect: Interconnect | None = None,
    ) -> None:
        if not isinstance(calibration, GpuCalibration):
            calibration = load_gpu_calibration(calibration)
        self.calibration = calibration
        self.table: GemmTable = calibration.gemm_table(model, dtype)
        self.interconnect = Interconnect() if interconnect is None else interconnect
        hidden = self.table.hidden_size
        #: bytes of one token copy: dispatch (FP8 + float32 block scales), combine (bf16).
        self.dispatch_bytes = hidden + 4 * -(-hidden // DEEPEP_FP8_BLOCK)
        self.combine_bytes = 2 * hidden
        #: seconds to stream one expert's weights.
        self.weight_seconds = self.table.weight_bytes_per_expert / (
            calibration.memory_bandwidth_bytes_per_s
        )

    def expert_seconds(self, num_tokens: Any) -> npt.NDArray[np.float64]:
        """One expert's compute seconds at ``num_tokens`` (any shape, >= 0): 0 without tokens,
        else W / BW + gemm(T) = max(W / BW, seconds_per_expert(T))."""
        t = np.asarray(num_tokens, dtype=np.float64)
        return np.where(t > 0, self.weight_seconds + self.gemm_seconds(t), 0.0)

    def gemm_seconds(self, num_tokens: Any) -> npt.NDArray[np.float64]:
        """gemm(T) of one expert at ``num_tokens`` (any shape, >= 0): the measured time beyond
        streaming its weights, ``max(0, seconds_per_expert(T) - W / BW)``; 0 without tokens."""
        t = np.asarray(num_tokens, dtype=np.float64)
        if (t < 0).any() or not np.isfinite(t).all():
            raise InvalidArgumentError("num_tokens must be finite and >= 0")
        excess = np.maximum(0.0, self.table.seconds(t) - self.weight_seconds)
        return np.where(t > 0, excess, 0.0)

    def comm_seconds(self, copies: LinkCopies) -> npt.NDArray[np.float64]:
        """[..., W] dispatch + combine seconds of each GPU for ``copies``."""
        nvlink, network = copies.nvlink, copies.network
        bw = self.interconnect
        return sum(
            np.maximum(
                nvlink * size / bw.nvlink_bytes_per_s, network * size / bw.network_bytes_per_s
            )
            for size in (self.dispatch_bytes, self.combine_bytes)
        )  # type: ignore[return-value]

    def step_time(self, slot_tokens: Any, ep_size: int, copies: LinkCopies | None) -> StepTime:
        """The step's time from ``slot_tokens`` [L, P] (the (token, expert) copies each physical
        slot computes, per simulated layer; fractions allowed) over ``ep_size`` GPUs and the
        dispatch ``copies`` ([L, W] each; None: no communication term)."""
        tokens = np.asarray(slot_tokens, dtype=np.float64)
        if tokens.ndim != 2 or tokens.shape[1] % ep_size:
            raise InvalidArgumentError(
                f"slot_tokens must be [L, P] with P a multiple of ep_size={ep_size}, got "
                f"{tokens.shape}"
            )
        L, P = tokens.shape
        per_gpu = tokens.reshape(L, ep_size, P // ep_size)
        active = (per_gpu > 0).sum(axis=2)
        weights = active * self.weight_seconds
        if copies is None:
            comm = nvlink = network = np.zeros((L, ep_size))
        else:
            comm = np.asarray(self.comm_seconds(copies), dtype=np.float64)
            if comm.shape != (L, ep_size):
                raise InvalidArgumentError(
                    f"copies are {comm.shape}, expected [L, W] = {(L, ep_size)}"
                )
            nvlink, network = copies.nvlink, copies.network
        return StepTime(
            weights_s=weights,
            gemm_s=self.gemm_seconds(per_gpu).sum(axis=2),
            comm_s=comm,
            active_experts=active,
            tokens=per_gpu.sum(axis=2),
            layer_fixed_s=self.calibration.layer_fixed_s,
            nvlink_copies=nvlink,
            network_copies=network,
        )
