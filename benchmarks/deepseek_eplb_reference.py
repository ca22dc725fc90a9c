"""A faithful port of DeepSeek's EPLB greedy (``deepseek-ai/EPLB:eplb.py@d52c72d``), to compare
moelb against.

Written from the behavioural specification (``reference/eplb.md`` sections 1.2-1.9), not copied.
Two ports with one behaviour:

* pure Python / NumPy: :func:`rebalance_experts` and its helpers :func:`balanced_packing`,
  :func:`replicate_experts`, :func:`rebalance_experts_hierarchical`. The packing greedy is a plain
  Python loop over items and packs, like the original, so its speed is what a Python planner costs;
  the replication loop is vectorised over rows, like the original's.
* PyTorch (when importable): :func:`rebalance_experts_torch` and its ``*_torch`` helpers, mirroring
  the original tensor code, with ``torch.sort(..., stable=True)``.

Semantics (identical in both ports):

* Loads are converted to float32 first; every sum, quotient and comparison below is in float32.
* ``balanced_packing``: with one item per pack, item i goes to pack i (no sort). Otherwise items are
  sorted by weight, descending, with a *stable* sort (equal weights keep ascending index order;
  the original's unstable default sort is implementation-defined there, reference 1.9), and each
  goes to the pack with room whose float32 running sum is smallest (ties to the lower pack).
* ``replicate_experts``: slots 0..E-1 hold experts 0..E-1; each further slot goes to the expert with
  the largest float32 ``weight / count`` (ties to the lower index).
* ``rebalance_experts``: hierarchical when ``num_groups % num_nodes == 0``, else the same routine
  with one group and one node (the global policy). Returns ``(phy2log [L, R], log2phy [L, E, X],
  logcnt [L, E])``, int64, where X is the largest replica count of the call, ``log2phy`` lists each
  expert's physical slots in replica-creation order and pads with -1.

Preconditions are checked with ``ValueError`` (the original uses ``assert``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

try:
    import torch
except ImportError:  # the NumPy port works without PyTorch
    torch = None  # type: ignore[assignment]

__all__ = [
    "HAS_TORCH",
    "balanced_packing",
    "balanced_packing_torch",
    "rebalance_experts",
    "rebalance_experts_hierarchical",
    "rebalance_experts_hierarchical_torch",
    "rebalance_experts_torch",
    "replicate_experts",
    "replicate_experts_torch",
]

HAS_TORCH = torch is not None

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float32]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


# --------------------------------------------------------------------------------------------
# Pure Python / NumPy port
# --------------------------------------------------------------------------------------------


def balanced_packing(weight: FloatArray, num_packs: int) -> tuple[IntArray, IntArray]:
    """Packs the n items of each row of ``weight`` [X, n] into ``num_packs`` packs of exactly
    n / num_packs items, greedily (reference 1.3). Returns ``pack_index`` and ``rank_in_pack``,
    both [X, n] int64."""
    weight = np.asarray(weight, dtype=np.float32)
    num_rows, num_items = weight.shape
    _require(num_items % num_packs == 0, "the item count must be a multiple of the pack count")
    items_per_pack = num_items // num_packs
    if items_per_pack == 1:
        pack_index = np.broadcast_to(np.arange(num_items, dtype=np.int64), weight.shape).copy()
        return pack_index, np.zeros(weight.shape, dtype=np.int64)

    # Descending by weight, equal weights in ascending index order (a stable sort of -weight).
    order = np.argsort(-weight, axis=-1, kind="stable")
    pack_index = np.full(weight.shape, -1, dtype=np.int64)
    rank_in_pack = np.full(weight.shape, -1, dtype=np.int64)
    for row in range(num_rows):
        row_weight = weight[row]
        pack_weights = [np.float32(0.0)] * num_packs  # float32 running sums
        pack_items = [0] * num_packs
        for item in order[row].tolist():
            # min() keeps the first of equal keys: ties go to the lower pack.
            pack = min(
                (p for p in range(num_packs) if pack_items[p] < items_per_pack),
                key=pack_weights.__getitem__,
            )
            pack_index[row, item] = pack
            rank_in_pack[row, item] = pack_items[pack]
            pack_weights[pack] = pack_weights[pack] + row_weight[item]
            pack_items[pack] += 1
    return pack_index, rank_in_pack


def replicate_experts(weight: FloatArray, num_phy: int) -> tuple[IntArray, IntArray, IntArray]:
    """Gives the E' experts of each row of ``weight`` [X, E'] ``num_phy`` slots: one each, then
    every further slot to the expert with the largest load per replica (reference 1.4). Returns
    ``phy2log`` [X, num_phy], the replica ``rank`` of each slot [X, num_phy] and ``logcnt``
    [X, E'], all int64."""
    weight = np.asarray(weight, dtype=np.float32)
    num_rows, num_log = weight.shape
    _require(num_phy >= num_log, "need at least one slot per expert")
    phy2log = np.broadcast_to(np.arange(num_phy, dtype=np.int64), (num_rows, num_phy)).copy()
    rank = np.zeros((num_rows, num_phy), dtype=np.int64)
    logcnt = np.ones((num_rows, num_log), dtype=np.int64)
    rows = np.arange(num_rows)
    for slot in range(num_log, num_phy):
        # float32 / float32 as the original's float32 / int64 tensor division; argmax keeps the
        # first maximum (ties to the lower index).
        chosen = np.argmax(weight / logcnt.astype(np.float32), axis=-1)
        phy2log[:, slot] = chosen
        rank[:, slot] = logcnt[rows, chosen]
        logcnt[rows, chosen] += 1
    return phy2log, rank, logcnt


def _inverse(perm: IntArray) -> IntArray:
    """The inverse of each row of a [X, n] permutation."""
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
    return inv


def rebalance_experts_hierarchical(
    weight: FloatArray,
    num_physical_experts: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
) -> tuple[IntArray, IntArray, IntArray]:
    """DeepSeek's hierarchical policy (reference 1.5): groups to nodes, replication within each
    node, replicas to the node's GPUs. Returns ``phy2log`` [L, R], ``phyrank`` [L, R] and
    ``logcnt`` [L, E], int64."""
    weight = np.asarray(weight, dtype=np.float32)
    num_layers, num_logical = weight.shape
    _require(num_logical % num_groups == 0, "experts must be a multiple of groups")
    _require(num_groups % num_nodes == 0, "groups must be a multiple of nodes")
    _require(num_gpus % num_nodes == 0, "GPUs must be a multiple of nodes")
    _require(num_physical_experts % num_gpus == 0, "slots must be a multiple of GPUs")
    group_size = num_logical // num_groups
    groups_per_node = num_groups // num_nodes
    slots_per_gpu = num_physical_experts // num_gpus
    experts_per_node = num_logical // num_nodes

    # 1. Groups to nodes, and the node-major ("mlog") relabelling of the experts.
    tokens_per_group = weight.reshape(num_layers, num_groups, group_size).sum(
        axis=-1, dtype=np.float32
    )
    group_pack, group_rank = balanced_packing(tokens_per_group, num_nodes)
    log2mlog = (
        ((group_pack * groups_per_node + group_rank) * group_size)[:, :, None]
        + np.arange(group_size, dtype=np.int64)
    ).reshape(num_layers, num_logical)
    mlog2log = _inverse(log2mlog)

    # 2. Replication within each node: one row per (layer, node).
    tokens_per_mlog = np.take_along_axis(weight, mlog2log, axis=-1).reshape(-1, experts_per_node)
    phy2mlog, phyrank, mlogcnt = replicate_experts(
        tokens_per_mlog, num_physical_experts // num_nodes
    )

    # 3. The node's replicas to its GPUs.
    tokens_per_phy = np.take_along_axis(
        tokens_per_mlog / mlogcnt.astype(np.float32), phy2mlog, axis=-1
    )
    pack_index, rank_in_pack = balanced_packing(tokens_per_phy, num_gpus // num_nodes)
    phy2pphy = pack_index * slots_per_gpu + rank_in_pack
    pphy2phy = _inverse(phy2pphy)

    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, axis=-1)
    node_offset = np.arange(0, num_logical, experts_per_node, dtype=np.int64)
    pphy2mlog = (pphy2mlog.reshape(num_layers, num_nodes, -1) + node_offset[None, :, None]).reshape(
        num_layers, -1
    )
    pphy2log = np.take_along_axis(mlog2log, pphy2mlog, axis=-1)
    pphyrank = np.take_along_axis(phyrank, pphy2phy, axis=-1).reshape(num_layers, -1)
    logcnt = np.take_along_axis(mlogcnt.reshape(num_layers, -1), log2mlog, axis=-1)
    return pphy2log, pphyrank, logcnt


def _log2phy(phy2log: IntArray, phyrank: IntArray, logcnt: IntArray) -> IntArray:
    num_layers, num_replicas = phy2log.shape
    num_logical = logcnt.shape[1]
    max_count = int(logcnt.max())
    log2phy = np.full((num_layers, num_logical * max_count), -1, dtype=np.int64)
    np.put_along_axis(
        log2phy,
        phy2log * max_count + phyrank,
        np.broadcast_to(np.arange(num_replicas, dtype=np.int64), phy2log.shape),
        axis=-1,
    )
    return log2phy.reshape(num_layers, num_logical, max_count)


def rebalance_experts(
    weight: Any, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[IntArray, IntArray, IntArray]:
    """DeepSeek's entry point (reference 1.2): ``weight`` [L, E] (any numeric array-like) ->
    ``(phy2log [L, R], log2phy [L, E, max count], logcnt [L, E])``, int64 NumPy arrays."""
    if hasattr(weight, "detach"):  # a torch tensor
        weight = weight.detach().cpu().numpy()
    weight = np.asarray(weight).astype(np.float32)
    _require(weight.ndim == 2, "weight must be [num_layers, num_logical_experts]")
    if num_groups % num_nodes == 0:
        phy2log, phyrank, logcnt = rebalance_experts_hierarchical(
            weight, num_replicas, num_groups, num_nodes, num_gpus
        )
    else:
        phy2log, phyrank, logcnt = rebalance_experts_hierarchical(
            weight, num_replicas, 1, 1, num_gpus
        )
    return phy2log, _log2phy(phy2log, phyrank, logcnt), logcnt


# --------------------------------------------------------------------------------------------
# PyTorch port (the original's tensor code, with a stable sort)
# --------------------------------------------------------------------------------------------


def _need_torch() -> None:
    if torch is None:
        raise ImportError("the PyTorch port of DeepSeek's EPLB needs PyTorch")


def balanced_packing_torch(weight: Any, num_packs: int) -> tuple[Any, Any]:
    """:func:`balanced_packing` on a [X, n] tensor, the original's way (a Python loop over
    tensor elements; pack sums are float32 0-d tensors)."""
    _need_torch()
    num_rows, num_items = weight.shape
    _require(num_items % num_packs == 0, "the item count must be a multiple of the pack count")
    items_per_pack = num_items // num_packs
    if items_per_pack == 1:
        pack_index = torch.arange(num_items, dtype=torch.int64).expand(weight.shape).clone()
        return pack_index, torch.zeros_like(weight, dtype=torch.int64)

    indices = weight.float().sort(dim=-1, descending=True, stable=True).indices.cpu()
    pack_index = torch.full_like(weight, fill_value=-1, dtype=torch.int64, device="cpu")
    rank_in_pack = torch.full_like(pack_index, fill_value=-1)
    for row in range(num_rows):
        pack_weights: list[Any] = [0] * num_packs
        pack_items = [0] * num_packs
        for item in indices[row]:
            pack = min(
                (p for p in range(num_packs) if pack_items[p] < items_per_pack),
                key=pack_weights.__getitem__,
            )
            pack_index[row, item] = pack
            rank_in_pack[row, item] = pack_items[pack]
            pack_weights[pack] += weight[row, item]
            pack_items[pack] += 1
    return pack_index, rank_in_pack


def replicate_experts_torch(weight: Any, num_phy: int) -> tuple[Any, Any, Any]:
    """:func:`replicate_experts` on a [X, E'] float32 tensor."""
    _need_torch()
    num_rows, num_log = weight.shape
    _require(num_phy >= num_log, "need at least one slot per expert")
    phy2log = torch.arange(num_phy, dtype=torch.int64).repeat(num_rows, 1)
    rank = torch.zeros(num_rows, num_phy, dtype=torch.int64)
    logcnt = torch.ones(num_rows, num_log, dtype=torch.int64)
    rows = torch.arange(num_rows, dtype=torch.int64)
    for slot in range(num_log, num_phy):
        chosen = (weight / logcnt).max(dim=-1).indices
        phy2log[:, slot] = chosen
        rank[:, slot] = logcnt[rows, chosen]
        logcnt[rows, chosen] += 1
    return phy2log, rank, logcnt


def _inverse_torch(perm: Any) -> Any:
    inv = torch.empty_like(perm)
    inv.scatter_(1, perm, torch.arange(perm.size(1), dtype=torch.int64).expand(perm.shape))
    return inv


def rebalance_experts_hierarchical_torch(
    weight: Any,
    num_physical_experts: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
) -> tuple[Any, Any, Any]:
    """:func:`rebalance_experts_hierarchical` on a [L, E] float32 tensor."""
    _need_torch()
    num_layers, num_logical = weight.shape
    _require(num_logical % num_groups == 0, "experts must be a multiple of groups")
    _require(num_groups % num_nodes == 0, "groups must be a multiple of nodes")
    _require(num_gpus % num_nodes == 0, "GPUs must be a multiple of nodes")
    _require(num_physical_experts % num_gpus == 0, "slots must be a multiple of GPUs")
    group_size = num_logical // num_groups
    groups_per_node = num_groups // num_nodes
    slots_per_gpu = num_physical_experts // num_gpus

    tokens_per_group = weight.unflatten(-1, (num_groups, group_size)).sum(-1)
    group_pack, group_rank = balanced_packing_torch(tokens_per_group, num_nodes)
    log2mlog = (
        ((group_pack * groups_per_node + group_rank) * group_size).unsqueeze(-1)
        + torch.arange(group_size, dtype=torch.int64)
    ).flatten(-2)
    mlog2log = _inverse_torch(log2mlog)

    tokens_per_mlog = weight.gather(-1, mlog2log).view(-1, num_logical // num_nodes)
    phy2mlog, phyrank, mlogcnt = replicate_experts_torch(
        tokens_per_mlog, num_physical_experts // num_nodes
    )

    tokens_per_phy = (tokens_per_mlog / mlogcnt).gather(-1, phy2mlog)
    pack_index, rank_in_pack = balanced_packing_torch(tokens_per_phy, num_gpus // num_nodes)
    phy2pphy = pack_index * slots_per_gpu + rank_in_pack
    pphy2phy = _inverse_torch(phy2pphy)

    pphy2mlog = phy2mlog.gather(-1, pphy2phy)
    node_offset = torch.arange(0, num_logical, num_logical // num_nodes, dtype=torch.int64)
    pphy2mlog = (pphy2mlog.view(num_layers, num_nodes, -1) + node_offset.view(1, -1, 1)).flatten(-2)
    pphy2log = mlog2log.gather(-1, pphy2mlog)
    pphyrank = phyrank.gather(-1, pphy2phy).view(num_layers, -1)
    logcnt = mlogcnt.view(num_layers, -1).gather(-1, log2mlog)
    return pphy2log, pphyrank, logcnt


def rebalance_experts_torch(
    weight: Any, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[Any, Any, Any]:
    """:func:`rebalance_experts` the original's way; ``weight`` is a tensor or array-like.
    Returns int64 CPU tensors ``(phy2log, log2phy, logcnt)``."""
    _need_torch()
    weight = torch.as_tensor(weight).float().cpu()
    _require(weight.dim() == 2, "weight must be [num_layers, num_logical_experts]")
    num_layers, num_logical = weight.shape
    if num_groups % num_nodes == 0:
        phy2log, phyrank, logcnt = rebalance_experts_hierarchical_torch(
            weight, num_replicas, num_groups, num_nodes, num_gpus
        )
    else:
        phy2log, phyrank, logcnt = rebalance_experts_hierarchical_torch(
            weight, num_replicas, 1, 1, num_gpus
        )
    max_count = int(logcnt.max().item())
    log2phy = torch.full((num_layers, num_logical, max_count), -1, dtype=torch.int64)
    log2phy.view(num_layers, -1).scatter_(
        -1,
        phy2log * max_count + phyrank,
        torch.arange(num_replicas, dtype=torch.int64).expand(num_layers, -1),
    )
    return phy2log, log2phy, logcnt
