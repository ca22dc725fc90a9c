"""Weight-move plans: what every EP rank copies, sends and receives so that a layer's expert
slots change from one placement to another (``plan_weight_moves``), and a one-process executor
over NumPy arrays (``apply_weight_moves``) that runs every rank's operations.

A plan records the layer's rows of both placements (``old_physical_to_logical``,
``new_physical_to_logical``); every executor is told which placement the weights hold and refuses
a plan made from another one (a stale plan would scramble the experts)."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from . import _core
from ._core import ExpertLocation, InvalidArgumentError, WeightMovePlan

__all__ = ["WeightMovePlan", "apply_weight_moves", "plan_weight_moves"]


def plan_weight_moves(old: ExpertLocation, new: ExpertLocation, layer: int) -> WeightMovePlan:
    """The moves of MoE layer ``layer`` from placement ``old`` to ``new``.

    Node-aware: a rank that needs an expert it does not hold receives it from a rank of its own
    node when one holds it, else from any holder; needing ranks are shared out evenly over the
    holders. Every expert a rank needs arrives once (further slots of that rank are filled by a
    local 'fanout'); unchanged slots are not touched. ``plan.ops(ep_rank)`` lists
    ``(kind, expert, src_slot, dst_slot, peer)``; see ``WeightMovePlan`` for the execution order.
    The plan applies only to weights that hold ``old``'s layer ``layer``.
    """
    return _core.plan_weight_moves(old, new, layer)


def check_plan_types(plan: Any, location: Any, holder: str) -> None:
    """TypeError unless ``plan`` is a WeightMovePlan and ``location`` an ExpertLocation (the
    placement ``holder`` holds): the executors' first check."""
    if not isinstance(plan, WeightMovePlan):
        raise TypeError(f"plan must be a WeightMovePlan, got {type(plan).__name__}")
    if not isinstance(location, ExpertLocation):
        raise TypeError(
            f"location must be an ExpertLocation (the placement {holder} hold), got "
            f"{type(location).__name__}"
        )


def _as_array(weights: Any) -> npt.NDArray[Any]:
    """``weights`` as a NumPy array: a CPU torch tensor through ``detach()`` (the result is a new
    array, so reading it needs no gradient), else an InvalidDTypeError naming ``weights``."""
    if hasattr(weights, "detach") and hasattr(weights, "numpy"):
        tensor = weights.detach()
        if str(tensor.device.type) != "cpu":
            raise _core.InvalidDTypeError(
                f"weights is a tensor on device '{tensor.device.type}'; apply_weight_moves runs "
                "in NumPy: pass CPU weights (execute_weight_moves moves GPU weights)"
            )
        try:
            return tensor.numpy()
        except TypeError:
            raise _core.InvalidDTypeError(
                f"weights has dtype {tensor.dtype}, which NumPy cannot hold; apply_weight_moves "
                "runs in NumPy (execute_weight_moves moves tensors of any dtype)"
            ) from None
    return np.asarray(weights)


def apply_weight_moves(
    plan: WeightMovePlan, weights: Any, *, location: ExpertLocation
) -> npt.NDArray[Any]:
    """Runs every rank's operations of ``plan`` on ``weights`` in one process; returns the new
    array (``weights`` is not modified).

    weights: [ep_size, S, ...], one array per slot (e.g. an expert's w13 rows).
    location: the placement ``weights`` hold now (required, keyword only); its layer
        ``plan.layer`` must be the placement the plan moves from, else InvalidArgumentError and
        nothing is computed. The result holds ``plan``'s new placement: track it (``location =
        new``) so that the same plan cannot be applied twice.

    Sends and copies read the old contents, as they do on real ranks (receive into staging
    buffers before writing)."""
    check_plan_types(plan, location, "weights")
    plan.check_source(location, "location")
    old = _as_array(weights)
    expected = (plan.ep_size, plan.slots_per_rank)
    if old.ndim < 2 or old.shape[:2] != expected:
        raise InvalidArgumentError(
            f"weights has shape {old.shape} but the plan needs [ep_size, S, ...] = "
            f"[{expected[0]}, {expected[1]}, ...]"
        )
    new = old.copy()
    messages: dict[tuple[int, int, int], list[npt.NDArray[Any]]] = {}
    for rank in range(plan.ep_size):
        for kind, expert, src, _dst, peer in plan.ops(rank):
            if kind == "send":
                messages.setdefault((rank, peer, expert), []).append(old[rank, src])
    for rank in range(plan.ep_size):
        ops = plan.ops(rank)
        for kind, expert, _src, dst, peer in ops:
            if kind == "recv":
                queue = messages.get((peer, rank, expert))
                if not queue:
                    raise _core.Error(
                        f"rank {rank} receives expert {expert} from rank {peer}, which sends "
                        "nothing matching"
                    )
                new[rank, dst] = queue.pop(0)
        for kind, _expert, src, dst, _peer in ops:
            if kind == "copy":
                new[rank, dst] = old[rank, src]
        for kind, _expert, src, dst, _peer in ops:
            if kind == "fanout":
                new[rank, dst] = new[rank, src]
    if any(messages.values()):
        raise _core.Error("a send has no matching receive")
    return new
