"""A drop-in for DeepSeek's ``eplb.py``: ``rebalance_experts`` with its signature and its return
triple, planned by moelb (``algorithm="moelb"``, the default) or by DeepSeek's algorithm
(``algorithm="deepseek"``, moelb's port of ``eplb.py``, ``moelb.rebalance(algorithm="deepseek")``).

Replace ``from eplb import rebalance_experts`` with
``from moelb.integrations.deepseek import rebalance_experts``. The contract is DeepSeek's
(``reference/integrations.md``): ``weight`` [L, E] on any device, converted as ``eplb.py`` does;
int64 CPU tensors ``phy2log`` [L, P], ``log2phy`` [L, E, X] (``-1``-padded to ``X =
logcnt.max()`` of the call) and ``logcnt`` [L, E]; the inputs ``eplb.py`` asserts on raise
``EnginePreconditionError`` (an ``AssertionError`` and a ``ValueError``). PyTorch is imported on
the first call.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from .._core import InvalidArgumentError
from ..eplb import rebalance
from ._common import (
    IntArray,
    as_previous,
    ascending_ranks,
    check_call_options,
    import_torch,
    loads_array,
    log2phy_table,
    names,
    positive_int,
    replica_counts,
    require,
)

__all__ = ["ALGORITHMS", "MOELB_OPTIONS", "rebalance_experts"]

logger = logging.getLogger(__name__)

#: ``algorithm=``: ``"moelb"`` (ours) or ``"deepseek"`` (DeepSeek's ``eplb.py``: hierarchical when
#: ``num_groups % num_nodes == 0``, else global).
ALGORITHMS = ("moelb", "deepseek")
#: Keywords passed on to ``moelb.rebalance`` under ``algorithm="moelb"`` (ours; DeepSeek's
#: signature has none of them). ``previous``: the placement in service, an ``ExpertLocation`` or
#: a [L, P] ``phy2log``.
MOELB_OPTIONS = ("locality", "previous", "move_cost", "max_moves")


def rebalance_experts(
    weight: Any,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    algorithm: str = "moelb",
    **options: Any,
) -> tuple[Any, Any, Any]:
    """DeepSeek's ``rebalance_experts`` (``eplb.py``), planned by moelb or by DeepSeek's algorithm.

    weight: [L, E] per-expert loads (a tensor on any device, or an array-like; finite, >= 0).
    num_replicas: physical slots per layer P (E + redundant), a multiple of ``num_gpus``.
    num_groups: expert groups K; num_nodes: nodes N; num_gpus: GPUs G (slot p on GPU p // (P/G)).
    algorithm: ``"moelb"`` (the default): ``moelb.rebalance(algorithm="moelb")`` -- node locality
        when ``num_groups % num_nodes == 0`` (DeepSeek's hierarchical condition), free placement
        otherwise, and any topology it cannot honour planned without it (logged at INFO);
        ``"deepseek"``: ``eplb.py``'s algorithm, exactly on tie-free loads (stable tie rules;
        ``eplb.py``'s own order under ties follows torch's unstable sort).
    options: ``algorithm="moelb"`` only, ``MOELB_OPTIONS`` (ours).

    Returns int64 CPU tensors ``(phy2log [L, P], log2phy [L, E, X], logcnt [L, E])``.
    ``log2phy[l, e, r]`` is the slot of replica ``r`` of expert ``e``, ``-1``-padded to ``X =
    logcnt.max()`` as ``eplb.py`` pads it. Replica order: under ``"deepseek"`` ``eplb.py``'s
    creation order (the first replica is the expert's original slot, then the copies in the order
    replication added them), recovered from the plan by replaying DeepSeek's packing; where two
    experts' per-replica loads tie and the replay cannot tell the order apart, that node's
    replicas are listed in ascending slot order instead. The replay packs an expert's own
    replicas, whose per-replica loads always tie, in creation order (a stable sort); ``eplb.py``
    sorts them with torch's unstable sort, which for more than 16 items does not keep that order:
    so which of an expert's slots ``eplb.py`` lists as replica 0, 1, ... can differ from this
    (measured with torch 2.13 on the CPU, DeepSeek-V3 at EP32 on 4 nodes: half the replicated
    experts), the slots, ``phy2log`` and ``logcnt`` being the same. Under ``"moelb"`` (no
    creation order) ascending slot order.

    Raises ``EnginePreconditionError`` (an ``AssertionError``, as ``eplb.py`` raises, and an
    ``InvalidArgumentError``) where ``eplb.py`` asserts: ``num_replicas % num_gpus != 0``,
    ``num_replicas < E`` and, under ``"deepseek"`` when ``num_groups % num_nodes == 0``,
    ``E % num_groups != 0`` or ``num_gpus % num_nodes != 0``. Under ``"moelb"`` those two are
    planned (without node locality). Other bad input: ``InvalidArgumentError`` naming the
    parameter.
    """
    torch = import_torch("moelb.integrations.deepseek.rebalance_experts")
    if algorithm not in ALGORITHMS:
        raise InvalidArgumentError(f"algorithm={algorithm!r} is not one of {names(ALGORITHMS)}")
    check_call_options(options, MOELB_OPTIONS, algorithm)
    num_replicas = positive_int(num_replicas, "num_replicas")
    num_groups = positive_int(num_groups, "num_groups")
    num_nodes = positive_int(num_nodes, "num_nodes")
    num_gpus = positive_int(num_gpus, "num_gpus")
    dtype = np.float32 if algorithm == "deepseek" else np.float64
    load = loads_array(weight, "weight", "[num_layers, num_logical_experts]", 2, dtype)
    phy2log, log2phy, logcnt = plan_deepseek_contract(
        load, num_replicas, num_groups, num_nodes, num_gpus, algorithm, options
    )
    return (
        torch.from_numpy(phy2log),
        torch.from_numpy(log2phy),
        torch.from_numpy(logcnt),
    )


def plan_deepseek_contract(
    load: np.ndarray,
    num_replicas: int,
    num_groups: int | None,
    num_nodes: int,
    num_gpus: int,
    algorithm: str,
    options: dict[str, Any],
    hierarchical: bool | None = None,
) -> tuple[IntArray, IntArray, IntArray]:
    """The DeepSeek triple as NumPy int64 arrays, for the DeepSeek and SGLang adapters.

    load: [L, E] (float32 for DeepSeek's algorithm: ``eplb.py`` plans in float32), or [T, L, E]
    for moelb's step objectives. algorithm: ``"moelb"`` or ``"deepseek"``. hierarchical:
    DeepSeek's policy; None: ``num_groups % num_nodes == 0`` (``eplb.py``'s choice; SGLang
    passes its own)."""
    num_layers, num_experts = load.shape[-2:]
    require(
        num_replicas % num_gpus == 0,
        f"num_replicas={num_replicas} is not a multiple of num_gpus={num_gpus} "
        "(every GPU holds the same number of slots)",
    )
    require(
        num_replicas >= num_experts,
        f"num_replicas={num_replicas} is smaller than the {num_experts} logical experts",
    )
    if algorithm == "deepseek":
        if hierarchical is None:
            hierarchical = num_groups is not None and num_groups % num_nodes == 0
        if hierarchical:
            if num_groups is None:
                raise InvalidArgumentError(
                    "num_groups=None: DeepSeek's hierarchical policy needs expert groups"
                )
            require(
                num_experts % num_groups == 0,
                f"num_logical_experts={num_experts} is not a multiple of num_groups={num_groups}",
            )
            require(
                num_groups % num_nodes == 0,
                f"num_groups={num_groups} is not a multiple of num_nodes={num_nodes}",
            )
            require(
                num_gpus % num_nodes == 0,
                f"num_gpus={num_gpus} is not a multiple of num_nodes={num_nodes}",
            )
            plan = rebalance(
                load, num_replicas, num_groups, num_nodes, num_gpus, "deepseek_hierarchical"
            )
            policy_groups, policy_nodes = num_groups, num_nodes
        else:
            plan = rebalance(load, num_replicas, None, 1, num_gpus, "deepseek_global")
            policy_groups, policy_nodes = 1, 1
        phy2log = plan.location.physical_to_logical.astype(np.int64)
        ranks = creation_ranks(load, phy2log, policy_groups, policy_nodes, num_gpus)
    else:
        previous = as_previous(
            options.get("previous"),
            num_layers,
            num_replicas,
            num_experts,
            num_gpus,
            num_nodes if num_gpus % num_nodes == 0 else 1,
            "previous",
            strict=True,
        )
        plan = rebalance(
            load,
            num_replicas,
            num_groups,
            num_nodes,
            num_gpus,
            "moelb",
            previous,
            **{k: v for k, v in options.items() if k != "previous"},
        )
        if plan.stats.notes:
            logger.info("moelb EPLB: %s", plan.stats.notes)
        phy2log = plan.location.physical_to_logical.astype(np.int64)
        ranks = None
    return (
        phy2log,
        log2phy_table(phy2log, num_experts, ranks),
        replica_counts(phy2log, num_experts),
    )


def creation_ranks(
    weight: np.ndarray, phy2log: IntArray, num_groups: int, num_nodes: int, num_gpus: int
) -> IntArray:
    """[L, P] int64: the replica rank ``eplb.py`` gives each slot of DeepSeek's plan ``phy2log``
    (its ``phyrank``: 0 for the expert's original slot, then its copies in the order replication
    added them), which moelb's port does not return.

    weight: the [L, E] float32 loads the plan was made from; num_groups, num_nodes: the policy's
    (1 and 1 for the global policy). Replays ``eplb.py``'s steps around the plan with its tie
    rules made stable (the port's): the groups' order on their node (descending group load; the
    node of each group is the plan's), replication within each node (each copy to the largest
    float32 load per replica, ties to the lower node-local index), and the packing of the node's
    replicas onto its GPUs (descending per-replica load, ties to the lower index; each onto the
    lightest GPU with room, float32 sums, ties to the lower GPU), which places every replica of a
    rank in a slot. A layer whose replay does not land on the plan's layout keeps ascending slot
    order (the ranks of a valid ``log2phy``; not expected from moelb's port, whose plans are
    ``eplb.py``'s)."""
    num_layers, num_slots = phy2log.shape
    num_experts = weight.shape[1]
    ranks = ascending_ranks(phy2log)
    slots_per_gpu = num_slots // num_gpus
    slots_per_node = num_slots // num_nodes
    experts_per_node = num_experts // num_nodes
    group_size = num_experts // num_groups
    gpus_per_node = num_gpus // num_nodes
    rows = num_layers * num_nodes
    layer_of_row = np.repeat(np.arange(num_layers), num_nodes)
    node_of_row = np.tile(np.arange(num_nodes), num_layers)

    # 1. Node-local expert order ("mlog"): a node's groups by descending group load (float32
    # of the float64 sum, as the port sums), ties to the lower group, experts in id order.
    node_of_expert = np.empty((num_layers, num_experts), dtype=np.int64)
    np.put_along_axis(
        node_of_expert, phy2log, np.arange(num_slots, dtype=np.int64)[None, :] // slots_per_node, 1
    )
    group_node = node_of_expert[:, ::group_size]  # [L, K]
    group_load = (
        weight.astype(np.float64).reshape(num_layers, num_groups, group_size).sum(axis=2)
    ).astype(np.float32)
    group_order = np.lexsort(
        (np.arange(num_groups)[None, :].repeat(num_layers, 0), -group_load, group_node), axis=1
    )  # by node, then descending load, then id
    groups_per_node = num_groups // num_nodes
    on_node = np.take_along_axis(group_node, group_order, 1).reshape(rows, groups_per_node)
    consistent = (on_node == node_of_row[:, None]).all(axis=1)
    node_groups = group_order.reshape(rows, groups_per_node)
    mlog2log = (
        node_groups[:, :, None] * group_size + np.arange(group_size)[None, None, :]
    ).reshape(rows, experts_per_node)
    node_weight = np.take_along_axis(weight[layer_of_row].astype(np.float32), mlog2log, 1)

    # 2. Replication within each node: item i < experts_per_node is expert i's original (rank 0),
    # item experts_per_node + s the copy added at step s.
    count = np.ones((rows, experts_per_node), dtype=np.int64)
    item_mlog = np.empty((rows, slots_per_node), dtype=np.int64)
    item_rank = np.zeros((rows, slots_per_node), dtype=np.int64)
    item_mlog[:, :experts_per_node] = np.arange(experts_per_node)
    row_index = np.arange(rows)
    for item in range(experts_per_node, slots_per_node):
        chosen = np.argmax(node_weight / count.astype(np.float32), axis=1)
        item_mlog[:, item] = chosen
        item_rank[:, item] = count[row_index, chosen]
        count[row_index, chosen] += 1

    # 3. Packing onto the node's GPUs: item -> node-local slot.
    per_replica = np.take_along_axis(node_weight / count.astype(np.float32), item_mlog, 1)
    if slots_per_gpu == 1:
        item_slot = np.broadcast_to(np.arange(slots_per_node), (rows, slots_per_node))
    else:
        order = np.argsort(-per_replica, axis=1, kind="stable")
        gpu_load = np.zeros((rows, gpus_per_node), dtype=np.float32)
        filled = np.zeros((rows, gpus_per_node), dtype=np.int64)
        item_slot = np.empty((rows, slots_per_node), dtype=np.int64)
        for step in range(slots_per_node):
            item = order[:, step]
            gpu = np.argmin(np.where(filled < slots_per_gpu, gpu_load, np.inf), axis=1)
            item_slot[row_index, item] = gpu * slots_per_gpu + filled[row_index, gpu]
            gpu_load[row_index, gpu] += per_replica[row_index, item]
            filled[row_index, gpu] += 1

    # 4. The replay's layout against the plan's, layer by layer.
    item_expert = np.take_along_axis(mlog2log, item_mlog, 1)
    slot = node_of_row[:, None] * slots_per_node + item_slot
    planned = phy2log[layer_of_row[:, None], slot]
    consistent &= (planned == item_expert).all(axis=1)
    layer_ok = consistent.reshape(num_layers, num_nodes).all(axis=1)
    replayed = np.empty((rows, slots_per_node), dtype=np.int64)
    np.put_along_axis(replayed, item_slot, item_rank, 1)
    replayed = replayed.reshape(num_layers, num_slots)
    ranks[layer_ok] = replayed[layer_ok]
    if not layer_ok.all():
        logger.info(
            "moelb: DeepSeek replica order not recovered for layer(s) %s; ascending slot order",
            np.flatnonzero(~layer_ok).tolist(),
        )
    return ranks
