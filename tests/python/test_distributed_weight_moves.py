"""``execute_weight_moves`` across 3 real processes (gloo): on a fresh process group used first
for the moves every rank takes part, the idle one included (PyTorch leaves a first
``batch_isend_irecv`` that skips ranks undefined: a hang on NCCL); a plan that does not start
from the placement the weights hold, plans that differ between ranks, or bad weights on one rank
make every rank raise, none hang, and no weight changes anywhere.

Rank 2 has nothing to move: ranks 0 and 1 trade one expert (slot 0 of each)."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import moelb
import numpy as np
import numpy.typing as npt
import pytest
from moelb import ExpertLocation
from test_distributed import run_ranks

WORLD, NUM_EXPERTS = 3, 6
OLD = ExpertLocation.trivial(1, NUM_EXPERTS, NUM_EXPERTS, ep_size=WORLD)  # slots 0..5
SWAP = ExpertLocation(np.array([[2, 1, 0, 3, 4, 5]], np.int32), NUM_EXPERTS, WORLD)
OTHER = ExpertLocation(np.array([[2, 1, 0, 3, 5, 4]], np.int32), NUM_EXPERTS, WORLD)
SLOTS = NUM_EXPERTS // WORLD
# The collectives a rank may issue on a group; batch_isend_irecv is recorded with them.
COLLECTIVES = (
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_reduce",
    "barrier",
    "broadcast",
    "batch_isend_irecv",
)


def slot_weights(location: ExpertLocation, rank: int) -> npt.NDArray[np.float32]:
    """[S, 4]: each slot's weights encode the expert it holds."""
    experts = np.asarray(location.physical_to_logical[0, rank * SLOTS : (rank + 1) * SLOTS])
    return (experts[:, None] * 10 + np.arange(4)).astype(np.float32)


def _spy_on(dist: Any, group: Any, calls: list[str]) -> None:
    """Appends to ``calls`` the name of every collective this process issues on ``group``."""
    for name in COLLECTIVES:
        original = getattr(dist, name)

        def spy(*args: Any, _name: str = name, _original: Any = original, **kwargs: Any) -> Any:
            if _name == "batch_isend_irecv":
                ops = args[0] if args else kwargs["p2p_op_list"]
                on_group = any(op.group is group for op in ops)
            else:
                on_group = kwargs.get("group") is group or any(a is group for a in args)
            if on_group:
                calls.append(_name)
            return _original(*args, **kwargs)

        setattr(dist, name, spy)


def _worker(rank: int, world: int, workdir: str) -> None:
    """One EP rank (run in its own process by ``run_ranks``)."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{workdir}/store",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=20),
    )
    try:
        result: dict[str, Any] = {}
        fresh = dist.new_group(list(range(world)))
        calls: list[str] = []
        _spy_on(dist, fresh, calls)
        weights = torch.from_numpy(slot_weights(OLD, rank))
        plan = moelb.plan_weight_moves(OLD, SWAP, 0)
        moelb.execute_weight_moves(plan, weights, fresh, location=OLD)
        result["fresh_calls"] = np.array([*calls, "(end)"])
        result["moved"] = weights.numpy().copy()

        # Every failure below must leave every rank's weights as they are (SWAP's).
        back = moelb.plan_weight_moves(SWAP, OLD, 0)
        cases = {
            # The same plan again: the weights already hold SWAP.
            "twice": (plan, weights, SWAP),
            # Rank 2 kept a stale plan (from OLD) while the weights hold SWAP.
            "stale_on_one_rank": (plan if rank == 2 else back, weights, SWAP),
            # Each rank's plan starts from SWAP, but rank 2's leads elsewhere.
            "different_plans": (
                moelb.plan_weight_moves(SWAP, OTHER, 0) if rank == 2 else back,
                weights,
                SWAP,
            ),
            # Rank 1's slots are wider than the others' (the same number of slots): a message
            # would land bytes of the wrong size (a reviewer saw garbage on one rank and a gloo
            # abort on the other).
            "slot_layout_differs": (
                back,
                torch.zeros(SLOTS, 5) if rank == 1 else weights,
                SWAP,
            ),
            # Rank 0 passes weights of the wrong shape.
            "bad_weights_on_one_rank": (
                back,
                torch.zeros(SLOTS + 1, 4) if rank == 0 else weights,
                SWAP,
            ),
        }
        for name, (case_plan, case_weights, location) in cases.items():
            try:
                moelb.execute_weight_moves(case_plan, case_weights, fresh, location=location)
                result[f"{name}_error"] = ""
            except moelb.InvalidArgumentError as error:
                result[f"{name}_error"] = str(error)
            result[f"{name}_weights"] = weights.numpy().copy()
        # The group still works: no message was left in flight.
        moelb.execute_weight_moves(back, weights, fresh, location=SWAP)
        result["back"] = weights.numpy().copy()
        np.savez(Path(workdir) / f"rank{rank}.npz", **result)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_ranks("test_distributed_weight_moves", WORLD, tmp_path_factory.mktemp("moves"), 90)


def test_every_rank_takes_part_on_a_fresh_group(ranks: list[dict[str, Any]]) -> None:
    assert [op[0] for op in moelb.plan_weight_moves(OLD, SWAP, 0).ops(2)] == []  # rank 2 is idle
    firsts = [str(result["fresh_calls"][0]) for result in ranks]
    # The first collective on the group is one that every rank issues.
    assert firsts[0] in COLLECTIVES, firsts
    assert firsts == [firsts[0]] * WORLD, [list(r["fresh_calls"]) for r in ranks]
    for rank, result in enumerate(ranks):
        np.testing.assert_array_equal(result["moved"], slot_weights(SWAP, rank))


@pytest.mark.parametrize(
    ("case", "messages"),
    [
        ("twice", ["location is not the placement the plan moves from: in layer 0 slot 0"] * 3),
        (
            "stale_on_one_rank",
            ["rank 2 refused the weight moves"] * 2
            + ["location is not the placement the plan moves from: in layer 0 slot 0 .*a stale"],
        ),
        ("different_plans", ["the ranks hold different weight-move plans .* rank 2"] * 3),
        ("slot_layout_differs", ["expert slots of another dtype or shape .* rank 1"] * 3),
        (
            "bad_weights_on_one_rank",
            [r"local_weights has shape \(3, 4\)"] + ["rank 0 refused the weight moves"] * 2,
        ),
    ],
)
def test_every_rank_refuses_and_nothing_moves(
    ranks: list[dict[str, Any]], case: str, messages: list[str]
) -> None:
    for rank, (result, message) in enumerate(zip(ranks, messages, strict=True)):
        error = str(result[f"{case}_error"])
        assert error, f"rank {rank} accepted the {case} case"
        assert re.search(message, error), (rank, error)
        np.testing.assert_array_equal(result[f"{case}_weights"], slot_weights(SWAP, rank))


def test_the_group_works_after_the_refusals(ranks: list[dict[str, Any]]) -> None:
    for rank, result in enumerate(ranks):
        np.testing.assert_array_equal(result["back"], slot_weights(OLD, rank))
