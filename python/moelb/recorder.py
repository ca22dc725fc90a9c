"""The expert distribution recorder: what an engine calls on every MoE layer of every forward
pass to count which physical experts the tokens chose; its dump feeds the EPLB planner and
SGLang's ``--init-expert-location``.

    recorder = moelb.ExpertDistributionRecorder(location)        # or (num_layers, P)
    recorder.start()
    with recorder.forward_pass():
        for i in moe_layers:
            with recorder.layer(i):
                out = moelb.select_experts(logits[i], config, location=location, layer=i,
                                           recorder=recorder)
    dump = recorder.dump("expert_distribution_recorder.pt")       # or .npz / .json

Hooks outside a layer scope, nested scopes, a layer out of range or an id >= P raise
``InvalidArgumentError`` and count nothing. The hooks release the GIL and are safe to call from
several threads.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from . import _core
from ._core import ExpertLocation, InvalidArgumentError
from .balancedness import pass_balancedness

__all__ = ["BALANCEDNESS_WINDOWS", "ExpertDistributionRecorder", "pass_balancedness"]

#: The windows (in passes) over which balancedness is averaged, as in SGLang.
BALANCEDNESS_WINDOWS = (10, 100, 1000)


class ExpertDistributionRecorder(_core.ExpertDistributionRecorder):
    """Counts routed (token, slot) pairs per MoE layer and forward pass.

    location: the ``ExpertLocation`` whose physical slots the hooks receive, or a shape
        ``(num_layers, num_physical_experts)`` (then logical = physical, on ``ep_size`` ranks).
    mode: ``"stat"`` (counts per pass), ``"per_pass"`` (the same, dumped as SGLang's per-pass
        records) or ``"per_token"`` (also the routed ids of every token).
    buffer_size: passes kept, oldest dropped first; negative = unbounded.
    ep_rank: this process's EP rank (written into dumps).
    """

    def __init__(
        self,
        location: ExpertLocation | tuple[int, int],
        mode: str = "stat",
        buffer_size: int = 1000,
        ep_rank: int = 0,
        *,
        ep_size: int = 1,
    ) -> None:
        if not isinstance(location, ExpertLocation):
            try:
                num_layers, num_physical = (int(v) for v in location)
            except (TypeError, ValueError):
                raise InvalidArgumentError(
                    "location must be an ExpertLocation or (num_layers, num_physical_experts), "
                    f"got {location!r}"
                ) from None
            location = ExpertLocation.trivial(
                num_layers, num_physical, num_physical, ep_size=ep_size
            )
        super().__init__(location, mode, buffer_size, ep_rank)

    @contextmanager
    def forward_pass(self, forward_pass_id: int | None = None) -> Iterator[None]:
        """One forward pass; on exit the pass joins the window (when recording). A pass whose
        body raises is dropped."""
        self.begin_forward_pass(forward_pass_id)
        try:
            yield
        except BaseException:
            self.abandon_forward_pass()
            raise
        self.end_forward_pass()

    @contextmanager
    def layer(self, layer: int) -> Iterator[None]:
        """The MoE layer that hooks inside this scope count into."""
        self.begin_layer(layer)
        try:
            yield
        finally:
            self.end_layer()

    def on_dispatch_counts(  # type: ignore[override]
        self, local_counts: Any, ep_rank: int, num_trailing_shared_slots: int = 0
    ) -> None:
        """Counts EP rank ``ep_rank`` received per local slot (DeepEP low-latency ``masked_m``):
        local_counts [S + num_trailing_shared_slots]; the trailing shared slots are dropped."""
        if isinstance(num_trailing_shared_slots, bool) or not isinstance(
            num_trailing_shared_slots, (int, np.integer)
        ):
            raise TypeError(
                "num_trailing_shared_slots must be an int, got "
                f"{type(num_trailing_shared_slots).__name__}"
            )
        super().on_dispatch_counts(local_counts, ep_rank, int(num_trailing_shared_slots))

    def all_reduce(self, group: Any = None) -> None:
        """Sums the counts recorded by every rank of a ``torch.distributed`` process group (the
        EP group; default the world) into this recorder, on every rank: afterwards each rank's
        ``physical_count()``, ``logical_count()`` and ``dump()`` hold the whole group's counts
        (the sum of the ranks' counts, pass by pass, exactly as ``merge`` adds them) and the
        balancedness of the merged passes. Needs PyTorch and an initialised process group (gloo
        or NCCL; see ``moelb.distributed``).

        Collective: every rank of the group must call it. The ranks must record in lockstep:
        the same number of passes with the same forward-pass ids, the same mode and the same
        current placement, which every pass of the window was recorded with (call it before
        ``set_location``); otherwise every rank raises the same ``InvalidArgumentError`` and
        nothing changes. In ``per_token`` mode the other ranks' routed ids are appended after this
        rank's, in rank order. Cost: one ``all_reduce`` of the window's counts (int32, or int64
        when a sum could pass 2**31 - 1), one ``all_gather`` of the routed ids in ``per_token``
        mode, two small ``all_gather``s of shapes and pass ids, and a native merge; memory: about
        two copies of the window's counts.
        """
        from .distributed import all_reduce_recorder

        all_reduce_recorder(self, group)

    def balancedness(self) -> dict[int, float | None]:
        """Mean balancedness over the last 10, 100 and 1000 passes, as SGLang logs it: each
        pass's ``pass_balancedness`` (per layer (mean + 1e-5) / (max + 1e-5) of the per-GPU
        counts, averaged over all layers, dense and idle layers counting 1.0; an idle pass is
        1.0); None before the first pass. Over the layers with counts only:
        ``moelb.pass_balancedness(counts, ep_size, layers="active")`` on ``physical_count()``."""
        return {w: self.average_balancedness(w) for w in BALANCEDNESS_WINDOWS}

    def dump(self, path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
        """Returns the recorded window and clears it (recording continues if it was on).

        The dict has SGLang's stat keys: ``rank``, ``logical_count`` (int32 [T, L, E], each
        pass converted with the placement current when it was recorded, oldest first) and
        ``average_utilization_rate_over_window`` (SGLang's: the mean balancedness of the last
        1000 passes, see ``balancedness()``, or None). In ``per_pass`` / ``per_token`` mode it
        also has SGLang's ``records`` and ``last_physical_to_logical_map``; a record of a pass
        recorded before a ``set_location`` also carries the ``physical_to_logical_map`` it was
        recorded with (moelb's addition; SGLang's reader converts every record with the last
        map), so its file reloads to exactly this ``logical_count``. With ``path`` (``.pt``,
        ``.npz`` or ``.json``) the dump is also written there, atomically, in SGLang's layout for
        the mode; on any error nothing is written and the window is kept.
        """
        from .io import save_expert_distribution

        if self.num_passes == 0:
            raise InvalidArgumentError(
                "nothing to dump: no forward pass was recorded (call start() and record passes "
                "inside forward_pass() scopes)"
            )
        dump: dict[str, Any] = {
            "rank": self.ep_rank,
            "logical_count": self.logical_count(),
            "average_utilization_rate_over_window": self.average_balancedness(1000),
        }
        if self.mode != "stat":
            dump["records"] = self._records()
            dump["last_physical_to_logical_map"] = np.array(self.location.physical_to_logical)
        if path is not None:
            save_expert_distribution(dump, path, mode=self.mode)
        self.clear()
        return dump

    def _records(self) -> list[dict[str, Any]]:
        counts = self.physical_count()
        placement_index, placements = self.pass_placements()
        records: list[dict[str, Any]] = []
        for i, pass_id in enumerate(self.forward_pass_ids()):
            record: dict[str, Any] = {
                "forward_pass_id": int(pass_id),
                "rank": self.ep_rank,
                "gatherer_key": "primary",
                "global_physical_count": counts[i],
            }
            if placement_index[i] >= 0:  # recorded before a set_location
                record["physical_to_logical_map"] = placements[placement_index[i]]
            if self.mode == "per_token":
                layers = [self.token_ids(i, layer) for layer in range(self.num_layers)]
                tokens = max(ids.shape[0] for ids in layers)
                top_k = max(ids.shape[1] for ids in layers)
                topk = np.full((self.num_layers, tokens, top_k), -1, dtype=np.int32)
                for layer, ids in enumerate(layers):
                    topk[layer, : ids.shape[0], : ids.shape[1]] = ids
                record["topk_ids_of_layer"] = topk
            records.append(record)
        return records
