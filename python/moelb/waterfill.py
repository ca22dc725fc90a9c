"""Waterfill: SGLang's shared-expert balancer for expert parallelism (``WaterfillBalancer``), a
``torch.distributed`` all-reduce for its dynamic mode, and the per-rank load evaluator
(``waterfill_rank_loads``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from . import _core
from ._core import InvalidArgumentError, WaterfillPlan
from .distributed import torch_all_reduce

__all__ = [
    "RankLoads",
    "WaterfillBalancer",
    "WaterfillPlan",
    "torch_all_reduce",
    "waterfill_rank_loads",
]

AllReduce = Callable[[npt.NDArray[np.int64]], Any]


class WaterfillBalancer(_core.WaterfillBalancer):
    """The Waterfill shared-expert balancer of one MoE layer on one EP rank, SGLang's exactly
    (reference/routing_waterfill.md section 8).

    With expert parallelism each rank holds S = P / W routed slots and then one shared slot (the
    per-rank layout S + 1). ``expand`` widens the routed ids to that layout and appends a shared
    column that sends each token's shared expert to a rank chosen to even out the work: in prefill
    a deterministic hashed draw over the ranks' spare capacity (remote ranks weighted 10/11,
    batches under 64 tokens stay local); in decode the rank activating the fewest distinct experts
    takes the batch. Any number of ranks works (SGLang's kernel is limited to 32).

    num_physical_experts: P routed slots (logical + redundant), a multiple of ep_size.
    ep_size: W ranks; ep_rank: this rank in [0, W).
    routed_scaling_factor: the shared column's weight is 1 / rsf (1.0 when rsf is 0 or when
        ``apply_routed_scaling_factor_on_output``: rsf is then already in the routed weights).
    mode: ``"static"`` (plan from this rank's batch) or ``"dynamic"`` (plan from the whole EP
        group's, through ``all_reduce``).
    all_reduce: dynamic mode: a callable that sums an int64 NumPy buffer over the EP ranks and
        returns the sum (or returns None after summing in place), e.g. ``torch_all_reduce()``.
        Every rank must call ``expand`` for every batch, even an empty one.
    """

    def __init__(
        self,
        num_physical_experts: int,
        ep_size: int,
        ep_rank: int,
        routed_scaling_factor: float = 1.0,
        mode: str = "static",
        all_reduce: AllReduce | None = None,
        *,
        apply_routed_scaling_factor_on_output: bool = False,
    ) -> None:
        super().__init__(
            num_physical_experts,
            ep_size,
            ep_rank,
            routed_scaling_factor,
            mode,
            apply_routed_scaling_factor_on_output=apply_routed_scaling_factor_on_output,
        )
        if self.mode == "dynamic" and all_reduce is None:
            raise InvalidArgumentError("mode='dynamic' needs an all_reduce callable")
        if all_reduce is not None and not callable(all_reduce):
            raise InvalidArgumentError(
                f"all_reduce must be callable, got {type(all_reduce).__name__}"
            )
        self.all_reduce = all_reduce
        self.last_plan: WaterfillPlan | None = None

    def _reduced(
        self, topk_ids: Any, num_tokens: int | None, is_decode: bool
    ) -> npt.NDArray[np.int64] | None:
        if self.mode != "dynamic":
            return None
        buffer = self.exchange_buffer(topk_ids, num_tokens, is_decode)
        assert self.all_reduce is not None  # checked in __init__
        result = self.all_reduce(buffer)
        if hasattr(result, "detach"):  # a torch tensor
            reduced = result.detach().cpu().numpy()
        else:
            reduced = np.asarray(buffer if result is None else result)
        if reduced.shape != buffer.shape or reduced.dtype.kind not in "iu":
            raise InvalidArgumentError(
                f"all_reduce must return the summed integer buffer of shape {buffer.shape}, "
                f"got {reduced.dtype} of shape {reduced.shape}"
            )
        return np.ascontiguousarray(reduced, dtype=np.int64)

    def plan(  # type: ignore[override]
        self, topk_ids: Any, num_tokens: int | None = None, is_decode: bool = False
    ) -> WaterfillPlan:
        """The dispatch plan ``expand`` would follow for this batch (dynamic mode: runs the
        all-reduce)."""
        return super().plan(
            topk_ids, num_tokens, is_decode, self._reduced(topk_ids, num_tokens, is_decode)
        )

    def expand(
        self,
        topk_ids: Any,
        topk_weights: Any,
        num_tokens: int | None = None,
        is_decode: bool = False,
    ) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]:
        """Appends the shared column.

        topk_ids: [N, K] int32 physical routed ids in [0, P), -1 for padding (C-contiguous).
        topk_weights: [N, K] float32.
        num_tokens: the batch's token count as the engine sees it (padding included); default N.
            Prefill batches under 64 tokens stay local.
        is_decode: use the decode rule (the rank with the fewest active experts takes the batch).

        Returns (ids [N, K + 1] int32, weights [N, K + 1] float32): routed id p becomes
        p + p // S with its weight; the last column is the chosen rank's shared slot
        dest * (S + 1) + S with ``shared_weight``; rows without a valid id are -1 / 0. The plan
        used is kept in ``last_plan``.
        """
        reduced = self._reduced(topk_ids, num_tokens, is_decode)
        ids, weights, plan = self.expand_reduced(
            topk_ids, topk_weights, num_tokens, is_decode, reduced
        )
        self.last_plan = plan
        return ids, weights


@dataclass(frozen=True)
class RankLoads:
    """Per-rank work of one step where each of W ranks routes its own batch, with and without
    Waterfill. A unit is one (token, expert) pair.

    routed: [W] valid routed ids landing in each rank's slots. shared_local: [W] shared experts
    each rank computes without Waterfill (its own tokens with a valid id). shared_waterfill: [W]
    with Waterfill. load_local / load_waterfill: routed + shared. balancedness_*: SGLang's rate
    (mean + 1e-5) / (max + 1e-5) of those loads (1.0 when there is no work).
    """

    routed: npt.NDArray[np.int64]
    shared_local: npt.NDArray[np.int64]
    shared_waterfill: npt.NDArray[np.int64]
    balancedness_local: float
    balancedness_waterfill: float

    @property
    def load_local(self) -> npt.NDArray[np.int64]:
        return self.routed + self.shared_local

    @property
    def load_waterfill(self) -> npt.NDArray[np.int64]:
        return self.routed + self.shared_waterfill


def waterfill_rank_loads(
    batches: Sequence[Any],
    num_physical_experts: int,
    mode: str = "static",
    is_decode: bool = False,
    num_tokens: Sequence[int] | None = None,
) -> RankLoads:
    """Where the work of one step lands when every rank w routes ``batches[w]`` ([N_w, K] int32
    physical routed ids, -1 for padding; the same K everywhere) and runs Waterfill (``mode``;
    dynamic mode's all-reduce is summed in process). num_tokens: per rank (default N_w)."""
    raw = _core.waterfill_rank_loads(
        list(batches),
        num_physical_experts,
        mode,
        is_decode,
        None if num_tokens is None else [int(n) for n in num_tokens],
    )
    return RankLoads(**raw)
