"""Expert-parallel load balancing across real processes with ``torch.distributed``.

Each EP rank runs its own process: it routes and records its own tokens, the ranks merge their
recorder counts, every rank runs the (deterministic) planner on the same merged counts and so gets
the same new placement, and the ranks then exchange expert weights point to point. One rebalance
round on EP rank ``rank`` of ``W``:

    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=..., rank=rank, world_size=W)
    recorder = moelb.ExpertDistributionRecorder(location, ep_rank=rank)
    recorder.start()
    for batch in batches:                                  # this rank's tokens only
        with recorder.forward_pass():
            for layer in range(L):
                with recorder.layer(layer):
                    moelb.select_experts(logits[layer], config, location=location, layer=layer,
                                         ep_rank=rank, recorder=recorder)
    recorder.all_reduce()                                  # every rank now holds the merged counts
    plan = moelb.rebalance(recorder.dump()["logical_count"], P, groups, nodes, W,
                           previous=location)              # identical on every rank
    for layer in range(L):
        moves = moelb.plan_weight_moves(location, plan.location, layer)
        moelb.execute_weight_moves(moves, [w13[layer], w2[layer]],    # [S, ...] tensors, in place
                                   location=location)              # what the weights hold now
    location = plan.location
    recorder.set_location(location)

Nothing here is a home-made transport: the counts are summed with ``dist.all_reduce`` and the
weights move with ``dist.batch_isend_irecv`` (``isend`` / ``irecv`` pairs), on whatever backend
the process group has. PyTorch stays optional: it is imported when a function here is called.

**On GPUs with NCCL** the same code runs unchanged with ``dist.init_process_group("nccl")``,
``torch.cuda.set_device(local_rank)`` called first (NCCL's batched point-to-point hangs without
it), and the expert weights as CUDA tensors: ``execute_weight_moves`` stages its receives and
copies with ``torch.empty_like`` / ``clone`` on the weights' own device, and
``ExpertDistributionRecorder.all_reduce`` puts its count buffers on the current CUDA device when
the group's backend is NCCL. Before any message, every rank of the group joins one small
``all_gather`` (on the current CUDA device) in which the ranks check that they hold the same plan
and that it starts from the placement their weights hold; so the batched sends and receives that
follow are never the group's first collective, and ranks with nothing to move may skip them, as
PyTorch requires for ``batch_isend_irecv`` on NCCL. NCCL ignores message tags and pairs the sends
and receives between two ranks by their order; ``WeightMovePlan`` sorts both ends by (expert,
peer), so the order matches.

The per-step collectives of moelb's callables -- ``torch_all_reduce(group)`` (Waterfill's dynamic
mode, ``dispatch="balanced_prob"``) and ``torch_all_gather(group)`` (``dispatch="balanced"`` and
``"balanced_joint"``) -- move small int64 buffers: on a CPU tensor for gloo, on the current CUDA
device for NCCL (then copied back to the host, as the dispatch is computed there). A CPU group
beside the NCCL one (``dist.new_group(backend="gloo")``), as SGLang uses for its small metadata
collectives, avoids that round trip.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ._core import ExpertLocation, InvalidArgumentError, WeightMovePlan
from .weight_moves import check_plan_types

if TYPE_CHECKING:
    from .recorder import ExpertDistributionRecorder

__all__ = ["all_reduce_recorder", "execute_weight_moves", "torch_all_gather", "torch_all_reduce"]

_MODES = ("stat", "per_pass", "per_token")


def _torch_distributed(what: str) -> tuple[Any, Any]:
    try:
        import torch
        import torch.distributed as dist
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(f"{what} needs PyTorch (pip install 'moelb[torch]')") from error
    if not dist.is_available() or not dist.is_initialized():
        raise InvalidArgumentError(
            f"{what} needs an initialised torch.distributed process group "
            "(call torch.distributed.init_process_group first)"
        )
    return torch, dist


def _collective_device(torch: Any, dist: Any, group: Any) -> Any:
    """Where count buffers live for collectives on ``group``: the current CUDA device for NCCL,
    the CPU otherwise."""
    if "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather_int64(
    torch: Any, dist: Any, group: Any, device: Any, values: npt.NDArray[np.int64]
) -> npt.NDArray[np.int64]:
    """[world, n]: every rank's ``values`` (the same length n on every rank)."""
    local = torch.as_tensor(np.ascontiguousarray(values, dtype=np.int64), device=device)
    out = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, local, group=group)
    return np.stack([t.cpu().numpy() for t in out])


def torch_all_reduce(group: Any = None) -> Callable[[npt.NDArray[np.int64]], Any]:
    """An ``all_reduce`` callable over a ``torch.distributed`` process group (default: the
    world), for Waterfill's dynamic mode and ``select_experts(..., dispatch="balanced_prob")``:
    sums an int64 NumPy buffer over the ranks with ``dist.all_reduce`` and returns the sum as a
    new int64 NumPy array (the buffer is left as it was). The tensor lives on the CPU for gloo
    and on the current CUDA device for NCCL. Every rank of the group must call it, in the same
    order. Raises ``InvalidArgumentError`` when no process group is initialised."""
    torch, dist = _torch_distributed("torch_all_reduce")

    def all_reduce(buffer: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        device = _collective_device(torch, dist, group)
        values = np.array(buffer, dtype=np.int64, copy=True)
        tensor = torch.from_numpy(values).to(device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        return np.asarray(tensor.cpu().numpy(), dtype=np.int64)

    return all_reduce


def torch_all_gather(group: Any = None) -> Callable[[npt.NDArray[np.int64]], Any]:
    """An ``all_gather`` callable over a ``torch.distributed`` process group (default: the
    world), for ``select_experts(..., dispatch="balanced" | "balanced_joint")``: every rank's
    int64 NumPy buffer (the same length n on every rank) stacked in the group's rank order,
    [world, n] int64, with ``dist.all_gather`` (CPU tensors for gloo, the current CUDA device
    for NCCL). The EP rank passed to ``select_experts`` must be this process's rank in
    ``group``. Every rank of the group must call it, in the same order. Raises
    ``InvalidArgumentError`` when no process group is initialised."""
    torch, dist = _torch_distributed("torch_all_gather")

    def all_gather(buffer: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        device = _collective_device(torch, dist, group)
        return _all_gather_int64(torch, dist, group, device, np.asarray(buffer))

    return all_gather


def all_reduce_recorder(recorder: ExpertDistributionRecorder, group: Any = None) -> None:
    """Sums the recorded counts of every rank of ``group`` into ``recorder`` on every rank; see
    ``ExpertDistributionRecorder.all_reduce``.

    Collectives: two small ``all_gather``s (the ranks' shapes, modes, placements and pass ids,
    checked before any count moves, so every rank raises the same error), one ``all_reduce`` of
    the window's [T, L, P] counts (int32; int64 when the sum could overflow int32) and, in
    ``per_token`` mode, one ``all_gather`` of the packed routed ids. The merge runs natively
    (``merge_summed_counts``)."""
    torch, dist = _torch_distributed("ExpertDistributionRecorder.all_reduce")
    device = _collective_device(torch, dist, group)
    world = dist.get_world_size(group)
    location = recorder.location
    p2l = np.ascontiguousarray(location.physical_to_logical, dtype=np.int32)
    ids = np.asarray(recorder.forward_pass_ids(), dtype=np.int64)
    num_passes = int(ids.shape[0])
    num_layers, num_physical = recorder.num_layers, recorder.num_physical_experts
    counts = recorder.physical_count()  # [T, L, P] int32, a copy this function owns
    per_token = recorder.mode == "per_token"
    packed = recorder.packed_token_ids() if per_token and world > 1 else None
    # Check that the ranks can be merged before summing anything; every rank sees the same
    # gathered values, so every rank raises the same error (none is left waiting).
    meta_names = ("passes", "layers", "physical experts", "mode", "ep_size", "placement")
    meta = np.array(
        [
            num_passes,
            num_layers,
            num_physical,
            _MODES.index(recorder.mode),
            location.ep_size,
            zlib.crc32(p2l.tobytes()),
            # Not compared: the largest count (picks the sum's width), the packed ids' length
            # and the passes recorded before a set_location (refused on every rank below).
            int(counts.max()) if counts.size else 0,
            0 if packed is None else packed.shape[0],
            recorder.num_passes_with_other_placement(),
        ],
        dtype=np.int64,
    )
    metas = _all_gather_int64(torch, dist, group, device, meta)
    for column, name in enumerate(meta_names):
        values = metas[:, column]
        if (values != values[0]).any():
            shown = values if name != "mode" else [_MODES[v] for v in values]
            if name == "placement":
                shown = ["rank " + str(r) for r in np.flatnonzero(values != values[0])]
                raise InvalidArgumentError(
                    "recorders cannot be merged: the current placement differs from rank 0's on "
                    + ", ".join(shown)
                )
            raise InvalidArgumentError(
                f"recorders cannot be merged: the ranks hold different {name} "
                f"(per rank: {[str(v) for v in shown]}); ranks must record in lockstep"
            )
    stale = np.flatnonzero(metas[:, 8])
    if stale.size:
        raise InvalidArgumentError(
            "all_reduce merges passes recorded with the recorder's current placement, but "
            + ", ".join(f"rank {r} holds {metas[r, 8]}" for r in stale)
            + " recorded with an earlier one: call all_reduce (or dump) before set_location"
        )
    if num_passes == 0:
        return
    all_ids = _all_gather_int64(torch, dist, group, device, ids)
    differ = np.flatnonzero((all_ids != all_ids[0]).any(axis=1))
    if differ.size:
        raise InvalidArgumentError(
            f"recorders cannot be merged: rank {int(differ[0])} recorded forward passes "
            f"{all_ids[differ[0]].tolist()} but rank 0 recorded {all_ids[0].tolist()}"
        )
    if world == 1:
        return

    # int32 whenever no sum can pass INT32_MAX (world * the largest count); the merge refuses
    # an int64 sum that does not fit the recorder's int32 counts, on every rank alike.
    wide = int(metas[:, 6].max()) * world > np.iinfo(np.int32).max
    total = torch.from_numpy(counts.astype(np.int64) if wide else counts).to(device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    others: list[npt.NDArray[np.int32]] = []
    if packed is not None:
        others = _other_ranks_packed_ids(torch, dist, group, device, packed, metas[:, 7])
    try:
        recorder.merge_summed_counts(total.cpu().numpy(), others)
    except InvalidArgumentError as error:
        if "different placements" not in str(error):
            raise
        raise InvalidArgumentError(
            "all_reduce merges passes recorded with the recorder's current placement, but a pass "
            "in the window was recorded with an earlier one: call all_reduce (or dump) before "
            f"set_location ({error})"
        ) from None


def _other_ranks_packed_ids(
    torch: Any,
    dist: Any,
    group: Any,
    device: Any,
    packed: npt.NDArray[np.int32],
    lengths: npt.NDArray[np.int64],
) -> list[npt.NDArray[np.int32]]:
    """per_token mode: every other rank's ``packed_token_ids()``, in rank order (one
    ``all_gather`` of buffers padded to the longest)."""
    longest = int(lengths.max())
    local = torch.zeros(longest, dtype=torch.int32)
    local[: packed.shape[0]] = torch.from_numpy(packed)
    local = local.to(device)
    gathered = [torch.empty_like(local) for _ in range(lengths.shape[0])]
    dist.all_gather(gathered, local, group=group)
    me = dist.get_rank(group)
    return [
        np.ascontiguousarray(g.cpu().numpy()[: int(lengths[r])])
        for r, g in enumerate(gathered)
        if r != me
    ]


def _slot_tensors(torch: Any, local_weights: Any, slots_per_rank: int) -> list[Any]:
    items = (
        list(local_weights)
        if isinstance(local_weights, (list, tuple)) and not hasattr(local_weights, "shape")
        else [local_weights]
    )
    if not items:
        raise InvalidArgumentError("local_weights is empty: give a tensor [S, ...] or a list")
    tensors = []
    for i, item in enumerate(items):
        name = "local_weights" if len(items) == 1 else f"local_weights[{i}]"
        if isinstance(item, np.ndarray):
            if not (item.flags.c_contiguous and item.flags.writeable):
                raise InvalidArgumentError(
                    f"{name} must be a writable C-contiguous array (it is updated in place)"
                )
            item = torch.from_numpy(item)
        elif not isinstance(item, torch.Tensor):
            raise TypeError(
                f"{name} must be a torch tensor or a NumPy array, got {type(item).__name__}"
            )
        if item.dim() < 1 or item.shape[0] != slots_per_rank:
            raise InvalidArgumentError(
                f"{name} has shape {tuple(item.shape)} but the plan needs [S, ...] with "
                f"S={slots_per_rank} local slots"
            )
        if not item.is_contiguous():
            raise InvalidArgumentError(f"{name} must be contiguous (slots are sent as views)")
        tensors.append(item)
    return tensors


def _layout_fingerprint(tensors: list[Any]) -> int:
    """A 32-bit digest of the per-slot layout (dtype and shape of one slot of each tensor): a
    message between ranks whose slots differ would write bytes of the wrong size or kind."""
    layout = [(str(t.dtype), tuple(t.shape[1:])) for t in tensors]
    return zlib.crc32(repr(layout).encode())


def _agree_on_weight_moves(
    torch: Any, dist: Any, group: Any, plan: Any, refusal: Exception | None, layout: int
) -> None:
    """Every rank of ``group`` says whether it accepts its plan, which plan it holds and the
    layout of its slots, in one all_gather that every rank issues (also the group's first
    collective when the moves are, as PyTorch requires before a ``batch_isend_irecv`` that leaves
    some ranks out). Raises on every rank, the same decision everywhere, unless all accept the
    same plan with the same slot layout: no rank is left waiting for a message and no weight has
    moved."""
    fingerprint = 0
    if isinstance(plan, WeightMovePlan):
        fingerprint = int(np.array(plan.fingerprint, np.uint64).view(np.int64))
    mine = torch.tensor(
        [int(refusal is None), fingerprint, layout],
        dtype=torch.int64,
        device=_collective_device(torch, dist, group),
    )
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    votes = np.stack([t.cpu().numpy() for t in gathered])
    refused = np.flatnonzero(votes[:, 0] == 0).tolist()
    if refusal is not None:
        raise refusal
    if refused:
        ranks = ", ".join(str(r) for r in refused)
        raise InvalidArgumentError(
            f"rank{'s' if len(refused) > 1 else ''} {ranks} refused the weight moves (the error "
            "raised there says why); no rank moved anything"
        )
    for column, what in (
        (1, "hold different weight-move plans (the plan's fingerprint differs from rank 0's"),
        (2, "hold expert slots of another dtype or shape (local_weights differ from rank 0's"),
    ):
        differ = np.flatnonzero(votes[:, column] != votes[0, column]).tolist()
        if differ:
            raise InvalidArgumentError(
                f"the ranks {what} on rank {', '.join(str(r) for r in differ)}): every rank must "
                "plan the layer from the same old and new placements, with the same tensors per "
                "slot; no rank moved anything"
            )


def execute_weight_moves(
    plan: WeightMovePlan,
    local_weights: Any,
    group: Any = None,
    *,
    location: ExpertLocation,
) -> Any:
    """Runs this rank's part of ``plan`` with ``torch.distributed`` point-to-point messages,
    updating ``local_weights`` in place; returns ``local_weights``.

    plan: the layer's ``WeightMovePlan`` (``plan_weight_moves(old, new, layer)``), the same on
        every rank; this rank's EP rank is its rank in ``group`` and ``plan.ep_size`` must equal the
        group's size.
    local_weights: this rank's expert weights of that layer, one row per local slot: a contiguous
        tensor [S, ...] (any dtype, on the device of the backend: CPU for gloo, CUDA for NCCL) or a
        writable C-contiguous NumPy array (gloo), or a list of such (e.g. ``[w13, w2]``), each
        [S, ...]; every tensor of a slot moves with it.
    group: the EP process group (default: the world).
    location: the placement the weights hold now (required, keyword only): its layer
        ``plan.layer`` must be the placement the plan moves from. Afterwards they hold the plan's
        new placement; track it (``location = new``) so that the same plan is never run twice.

    Every rank of the group must call this with the same plan. Each rank first checks its own
    input (plan, weights, ``location``); then all ranks exchange, in one ``all_gather`` on the
    group, whether they accept and a fingerprint of their plan. Unless every rank accepts the
    same plan, every rank raises (a rank that refused: its own error; the others:
    InvalidArgumentError naming it) and no weight moves anywhere (no rank is left waiting).
    That collective is issued by every rank, so it is also the group's first when the moves are:
    PyTorch allows a ``batch_isend_irecv`` that involves only some ranks of a group only after
    such a collective, and ranks with nothing to send or receive return after it.

    Order (``WeightMovePlan``'s): sends and local copies read the OLD contents; receives land in
    staging buffers and copies are staged too; after every message completed the received and
    copied experts are written to their slots, then 'fanout' ops copy NEW contents to further
    slots. Extra memory: one slot per receive and per copy.

    On NCCL: call ``torch.cuda.set_device(local_rank)`` first and give CUDA tensors; the check's
    all_gather runs on the current CUDA device (a 16-byte tensor per rank), then the sends and
    receives run as one NCCL group (``batch_isend_irecv``) between the ranks that have messages.
    """
    torch, dist = _torch_distributed("execute_weight_moves")
    refusal: Exception | None = None
    tensors: list[Any] = []
    try:
        check_plan_types(plan, location, "local_weights")
        tensors = _slot_tensors(torch, local_weights, plan.slots_per_rank)
        world = dist.get_world_size(group)
        if world != plan.ep_size:
            raise InvalidArgumentError(
                f"the plan is for ep_size={plan.ep_size} ranks but the process group has {world}"
            )
        plan.check_source(location, "location")
        layout = _layout_fingerprint(tensors)
    except Exception as error:  # raised on this rank after the vote, so no rank is left waiting
        refusal = error
        layout = 0
    _agree_on_weight_moves(torch, dist, group, plan, refusal, layout)
    rank = dist.get_rank(group)
    ops = plan.ops(rank)
    messages: list[Any] = []
    staged: list[tuple[int, list[Any]]] = []
    for kind, expert, src, dst, peer in ops:
        if kind not in ("send", "recv"):
            continue
        peer_rank = peer if group is None else dist.get_global_rank(group, peer)
        buffers = (
            [t[src] for t in tensors]
            if kind == "send"
            else [torch.empty_like(t[dst]) for t in tensors]
        )
        if kind == "recv":
            staged.append((dst, buffers))
        function = dist.isend if kind == "send" else dist.irecv
        for j, buffer in enumerate(buffers):
            # Tags keep gloo's pairs apart; NCCL ignores them and pairs by order, which the
            # plan's (expert, peer) sort makes the same on both ends.
            tag = expert * len(tensors) + j
            messages.append(dist.P2POp(function, buffer, peer_rank, group=group, tag=tag))
    staged += [
        (dst, [t[src].clone() for t in tensors]) for kind, _, src, dst, _ in ops if kind == "copy"
    ]
    # A rank without messages skips the batch: PyTorch allows that because every rank of the group
    # issued the check's all_gather first.
    if messages:
        for request in dist.batch_isend_irecv(messages):
            request.wait()
    for dst, buffers in staged:
        for t, buffer in zip(tensors, buffers, strict=True):
            t[dst].copy_(buffer)
    for kind, _expert, src, dst, _peer in ops:
        if kind == "fanout":
            for t in tensors:
                t[dst].copy_(t[src])
    return local_weights
