"""One rebalance round across 4 real processes with torch.distributed (gloo on CPU).

Each process is an EP rank: it routes and records its own tokens, the ranks merge their counts
with ``ExpertDistributionRecorder.all_reduce``, each plans the new placement on its own, moves
its expert weights with ``execute_weight_moves`` (point-to-point messages), and runs Waterfill's
dynamic mode with ``moelb.torch_all_reduce()``. The processes save what they ended with; the tests
compare it with the same work done in this one process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import moelb
import numpy as np
import numpy.typing as npt
import pytest
from moelb import ExpertDistributionRecorder, ExpertLocation, TopKConfig

NUM_LAYERS, NUM_EXPERTS, NUM_PHYSICAL = 2, 16, 24
EP_SIZE, NUM_NODES, NUM_GROUPS = 4, 2, 4
NUM_TOKENS, NUM_PASSES = 96, 2  # >= 64 tokens: Waterfill's prefill rule spreads the batch
CONFIG = TopKConfig(top_k=4, scoring="softmax")
TIMEOUT_SECONDS = 150  # the whole 4-process run; a hang fails instead of blocking the suite


def logits(rank: int, forward_pass: int, layer: int) -> npt.NDArray[np.float32]:
    """The router logits of one rank's batch: skewed towards the low experts, differently per
    layer, so the planner has something to move."""
    rng = np.random.default_rng([7, rank, forward_pass, layer])
    skew = np.roll(np.linspace(2.5, 0.0, NUM_EXPERTS), 5 * layer)
    return (rng.standard_normal((NUM_TOKENS, NUM_EXPERTS)) + skew).astype(np.float32)


def signature(layer: int, experts: npt.NDArray[np.int32]) -> tuple[npt.NDArray, npt.NDArray]:
    """The weights of each expert in ``experts``: [n, 3, 5] float32 keyed by (layer, expert) and
    [n, 2] int64 (its id and layer), as two tensors that must move together."""
    w13 = np.stack(
        [np.random.default_rng([11, layer, int(e)]).standard_normal((3, 5)) for e in experts]
    ).astype(np.float32)
    w2 = np.stack([[int(e), layer] for e in experts]).astype(np.int64)
    return w13, w2


def old_location() -> ExpertLocation:
    return ExpertLocation.trivial(
        NUM_LAYERS, NUM_EXPERTS, NUM_PHYSICAL, ep_size=EP_SIZE, num_nodes=NUM_NODES
    )


def record(recorder: ExpertDistributionRecorder, rank: int, passes: int = NUM_PASSES) -> None:
    location = recorder.location
    for p in range(passes):
        with recorder.forward_pass():
            for layer in range(NUM_LAYERS):
                with recorder.layer(layer):
                    moelb.select_experts(
                        logits(rank, p, layer),
                        CONFIG,
                        location=location,
                        layer=layer,
                        ep_rank=rank,
                        recorder=recorder,
                    )


def shuffled_placement() -> npt.NDArray[np.int32]:
    """[L, P]: the trivial placement with each rank's slots reversed (layer 0) and each rank
    holding the next rank's slots (layer 1)."""
    p2l = np.asarray(old_location().physical_to_logical).copy()
    by_rank = p2l.reshape(NUM_LAYERS, EP_SIZE, -1)
    return np.stack([by_rank[0, :, ::-1].ravel(), np.roll(by_rank[1], -1, axis=0).ravel()])


def plan(logical_count: Any) -> moelb.Plan:
    return moelb.rebalance(
        logical_count, NUM_PHYSICAL, NUM_GROUPS, NUM_NODES, EP_SIZE, previous=old_location()
    )


def waterfill_batch(rank: int) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]:
    out = moelb.select_experts(logits(rank, 9, 0), CONFIG, location=old_location(), layer=0)
    return out.recorder_topk_ids, np.ascontiguousarray(out.topk_weights)


def _worker(rank: int, world: int, workdir: str) -> None:
    """One EP rank (run in its own process by ``cluster``)."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    moelb.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{workdir}/store",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        result: dict[str, Any] = {}
        old = old_location()
        recorder = ExpertDistributionRecorder(old, ep_rank=rank)
        recorder.start()
        record(recorder, rank)
        result["local_count"] = recorder.physical_count()
        recorder.all_reduce()
        result["merged_count"] = recorder.physical_count()
        result["merged_balancedness"] = recorder.pass_balancedness()
        new = plan(recorder.dump()["logical_count"]).location
        p2l = np.asarray(new.physical_to_logical)
        result["physical_to_logical"] = p2l
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, p2l.tolist())
        result["identical_everywhere"] = all(g == p2l.tolist() for g in gathered)

        # Weight moves: layer 0 as [torch w13, NumPy w2], layer 1 as one torch tensor.
        slots = NUM_PHYSICAL // EP_SIZE
        mine = slice(rank * slots, (rank + 1) * slots)
        old_p2l = np.asarray(old.physical_to_logical)
        for layer in range(NUM_LAYERS):
            w13, w2 = signature(layer, old_p2l[layer, mine])
            tensors: Any = [torch.from_numpy(w13).clone(), w2] if layer == 0 else torch.tensor(w13)
            moves = moelb.plan_weight_moves(old, new, layer)
            returned = moelb.execute_weight_moves(moves, tensors, location=old)
            assert returned is tensors
            first = tensors[0] if layer == 0 else tensors
            result[f"w13_{layer}"] = first.numpy()
            if layer == 0:
                result["w2_0"] = w2

        # Slots that trade places: each rank reverses its slots (local copies whose sources are
        # overwritten) in layer 0 and takes the next rank's slots (every rank sends and receives)
        # in layer 1.
        shuffled = ExpertLocation(shuffled_placement(), NUM_EXPERTS, EP_SIZE, NUM_NODES)
        for layer in range(NUM_LAYERS):
            w13, _ = signature(layer, old_p2l[layer, mine])
            tensor = torch.from_numpy(w13)
            moelb.execute_weight_moves(
                moelb.plan_weight_moves(old, shuffled, layer), tensor, location=old
            )
            result[f"shuffled_w13_{layer}"] = tensor.numpy()

        # Waterfill's dynamic mode with the real collective, prefill then decode.
        balancer = moelb.WaterfillBalancer(
            NUM_PHYSICAL, EP_SIZE, rank, mode="dynamic", all_reduce=moelb.torch_all_reduce()
        )
        ids, weights = waterfill_batch(rank)
        result["waterfill_ids"], result["waterfill_weights"] = balancer.expand(ids, weights)
        decode_ids, _ = balancer.expand(ids[:5], weights[:5], is_decode=True)
        result["waterfill_decode_ids"] = decode_ids

        # per_token mode: counts and the other ranks' routed ids merge too.
        per_token = ExpertDistributionRecorder(old, mode="per_token", ep_rank=rank)
        per_token.start()
        record(per_token, rank, passes=1)
        per_token.all_reduce()
        result["per_token_count"] = per_token.physical_count()
        for layer in range(NUM_LAYERS):
            result[f"per_token_ids_{layer}"] = per_token.token_ids(0, layer)

        # Bad input is refused before any message is sent.
        errors = []
        moves = moelb.plan_weight_moves(old, new, 0)
        two_ranks = ExpertLocation.trivial(NUM_LAYERS, NUM_EXPERTS, NUM_PHYSICAL, ep_size=2)
        for bad_plan, weights in (
            (moves, torch.zeros(slots + 1, 3)),
            (moves, torch.zeros(3, slots).t()),
            (moves, [torch.zeros(slots, 3), np.zeros((slots, 3))[:, ::2]]),
            (moelb.plan_weight_moves(two_ranks, two_ranks, 0), np.zeros((12, 3))),
        ):
            try:
                moelb.execute_weight_moves(bad_plan, weights, location=old)
                errors.append("")
            except moelb.InvalidArgumentError as error:
                errors.append(str(error))
        result["bad_input_errors"] = np.array(errors)

        # Ranks out of lockstep: every rank raises the same error, none hangs.
        uneven = ExpertDistributionRecorder(old, ep_rank=rank)
        uneven.start()
        record(uneven, rank, passes=2 if rank == 0 else 1)
        try:
            uneven.all_reduce()
            result["uneven_error"] = ""
        except moelb.InvalidArgumentError as error:
            result["uneven_error"] = str(error)
        result["uneven_count"] = uneven.physical_count()
        np.savez(Path(workdir) / f"rank{rank}.npz", **result)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Runs ``_worker`` in EP_SIZE processes; returns what each saved, by rank."""
    return run_ranks("test_distributed", EP_SIZE, tmp_path_factory.mktemp("distributed"))


def run_ranks(
    module: str, world: int, workdir: Path, timeout: float = TIMEOUT_SECONDS
) -> list[dict[str, Any]]:
    """Runs ``module._worker(rank, world, workdir)`` in ``world`` processes (gloo, a file store in
    ``workdir``), each saving ``rank{r}.npz``; returns what each saved, by rank. A process that
    fails or outlives ``timeout`` fails the test with every rank's log."""
    pytest.importorskip("torch")
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    here = str(Path(__file__).resolve().parent)
    code = (
        f"import sys; sys.path.insert(0, {here!r}); from {module} import _worker; "
        f"_worker(int(sys.argv[1]), {world}, {str(workdir)!r})"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if "GLOO_SOCKET_IFNAME" not in env and Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # all ranks are local; skip resolving the host name
    logs = [open(workdir / f"rank{r}.log", "w+") for r in range(world)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(r)], stdout=logs[r], stderr=subprocess.STDOUT, env=env
        )
        for r in range(world)
    ]
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    output = ""
    for r, log in enumerate(logs):
        log.seek(0)
        output += f"--- rank {r} (exit {procs[r].returncode}) ---\n{log.read()[-3000:]}\n"
        log.close()
    assert all(p.returncode == 0 for p in procs), output
    return [dict(np.load(workdir / f"rank{r}.npz")) for r in range(world)]


def single_process_counts(passes: int = NUM_PASSES) -> npt.NDArray[np.int32]:
    """The counts of every rank's tokens recorded by one recorder in this process."""
    recorder = ExpertDistributionRecorder(old_location())
    recorder.start()
    location = recorder.location
    for p in range(passes):
        with recorder.forward_pass():
            for layer in range(NUM_LAYERS):
                with recorder.layer(layer):
                    for rank in range(EP_SIZE):
                        moelb.select_experts(
                            logits(rank, p, layer),
                            CONFIG,
                            location=location,
                            layer=layer,
                            ep_rank=rank,
                            recorder=recorder,
                        )
    return recorder.physical_count()


def test_merged_counts_equal_single_process_counts(cluster: list[dict[str, Any]]) -> None:
    expected = single_process_counts()
    assert expected.sum() == EP_SIZE * NUM_PASSES * NUM_LAYERS * NUM_TOKENS * CONFIG.top_k
    for rank, result in enumerate(cluster):
        assert not np.array_equal(result["local_count"], expected), rank  # really merged
        np.testing.assert_array_equal(result["merged_count"], expected)
    np.testing.assert_array_equal(sum(r["local_count"] for r in cluster), expected)
    reference = ExpertDistributionRecorder(old_location())
    reference.start()
    record(reference, 0)
    for rank in range(1, EP_SIZE):
        other = ExpertDistributionRecorder(old_location())
        other.start()
        record(other, rank)
        reference.merge(other)
    np.testing.assert_allclose(cluster[0]["merged_balancedness"], reference.pass_balancedness())


def test_every_rank_plans_the_same_placement(cluster: list[dict[str, Any]]) -> None:
    logical = single_process_logical_count()
    p2l = np.asarray(plan(logical).location.physical_to_logical)
    assert not np.array_equal(p2l, np.asarray(old_location().physical_to_logical))
    for rank, result in enumerate(cluster):
        assert bool(result["identical_everywhere"]), rank
        np.testing.assert_array_equal(result["physical_to_logical"], p2l)


def single_process_logical_count() -> npt.NDArray[np.int32]:
    recorder = ExpertDistributionRecorder(old_location())
    recorder.start()
    for rank in range(EP_SIZE):
        other = ExpertDistributionRecorder(old_location())
        other.start()
        record(other, rank)
        if rank == 0:
            recorder = other
        else:
            recorder.merge(other)
    return recorder.logical_count()


def test_expert_weights_follow_the_new_placement(cluster: list[dict[str, Any]]) -> None:
    old = old_location()
    new_p2l = cluster[0]["physical_to_logical"]
    new = ExpertLocation(new_p2l, NUM_EXPERTS, EP_SIZE, NUM_NODES)
    slots = NUM_PHYSICAL // EP_SIZE
    old_p2l = np.asarray(old.physical_to_logical)
    transfers = 0
    for layer in range(NUM_LAYERS):
        moves = moelb.plan_weight_moves(old, new, layer)
        transfers += moves.transfers
        before, _ = signature(layer, old_p2l[layer])
        in_process = moelb.apply_weight_moves(
            moves, before.reshape(EP_SIZE, slots, 3, 5), location=old
        )
        for rank, result in enumerate(cluster):
            mine = new_p2l[layer, rank * slots : (rank + 1) * slots]
            w13, w2 = signature(layer, mine)
            np.testing.assert_array_equal(result[f"w13_{layer}"], w13, err_msg=f"rank {rank}")
            np.testing.assert_array_equal(result[f"w13_{layer}"], in_process[rank])
            if layer == 0:
                np.testing.assert_array_equal(result["w2_0"], w2, err_msg=f"rank {rank}")
    assert transfers > 0  # weights really crossed processes


def test_slots_that_trade_places(cluster: list[dict[str, Any]]) -> None:
    shuffled = ExpertLocation(shuffled_placement(), NUM_EXPERTS, EP_SIZE, NUM_NODES)
    old = old_location()
    kinds = {
        op[0] for r in range(EP_SIZE) for op in moelb.plan_weight_moves(old, shuffled, 0).ops(r)
    }
    assert kinds == {"copy"}
    slots = NUM_PHYSICAL // EP_SIZE
    p2l = shuffled_placement()
    for layer in range(NUM_LAYERS):
        for rank, result in enumerate(cluster):
            w13, _ = signature(layer, p2l[layer, rank * slots : (rank + 1) * slots])
            np.testing.assert_array_equal(
                result[f"shuffled_w13_{layer}"], w13, err_msg=f"layer {layer} rank {rank}"
            )


def test_waterfill_dynamic_mode_with_torch_all_reduce(cluster: list[dict[str, Any]]) -> None:
    balancers = [
        moelb.WaterfillBalancer(NUM_PHYSICAL, EP_SIZE, r, mode="dynamic", all_reduce=lambda b: b)
        for r in range(EP_SIZE)
    ]
    batches = [waterfill_batch(r) for r in range(EP_SIZE)]
    for is_decode, rows, key in (
        (False, NUM_TOKENS, "waterfill_ids"),
        (True, 5, "waterfill_decode_ids"),
    ):
        reduced = sum(
            b.exchange_buffer(ids[:rows], None, is_decode)
            for b, (ids, _) in zip(balancers, batches, strict=True)
        )
        destinations = set()
        for rank, (balancer, (ids, weights)) in enumerate(zip(balancers, batches, strict=True)):
            expected_ids, expected_weights, _ = balancer.expand_reduced(
                ids[:rows], weights[:rows], None, is_decode, reduced
            )
            np.testing.assert_array_equal(cluster[rank][key], expected_ids)
            if not is_decode:
                np.testing.assert_array_equal(cluster[rank]["waterfill_weights"], expected_weights)
            destinations |= set(
                (cluster[rank][key][:, -1] // (NUM_PHYSICAL // EP_SIZE + 1)).tolist()
            )
        if not is_decode:
            assert len(destinations) > 1  # the shared experts were spread, not kept local


def test_per_token_mode_merges_ids_in_rank_order(cluster: list[dict[str, Any]]) -> None:
    counts = single_process_counts(passes=1)

    def routed(rank: int, layer: int) -> npt.NDArray[np.int32]:
        return moelb.select_experts(
            logits(rank, 0, layer), CONFIG, location=old_location(), layer=layer, ep_rank=rank
        ).recorder_topk_ids

    for rank, result in enumerate(cluster):
        np.testing.assert_array_equal(result["per_token_count"], counts)
        for layer in range(NUM_LAYERS):
            order = [rank] + [r for r in range(EP_SIZE) if r != rank]
            expected = np.concatenate([routed(r, layer) for r in order])
            np.testing.assert_array_equal(result[f"per_token_ids_{layer}"], expected)


def test_bad_weights_are_refused(cluster: list[dict[str, Any]]) -> None:
    messages = [
        r"local_weights has shape \(7, 3\) but the plan needs \[S, \.\.\.\] with S=6",
        r"local_weights must be contiguous",
        r"local_weights\[1\] must be a writable C-contiguous array",
        r"the plan is for ep_size=2 ranks but the process group has 4",
    ]
    for rank, result in enumerate(cluster):
        for error, message in zip(result["bad_input_errors"], messages, strict=True):
            assert re.search(message, str(error)), (rank, error)


def test_ranks_out_of_lockstep_raise_everywhere(cluster: list[dict[str, Any]]) -> None:
    for rank, result in enumerate(cluster):
        assert "different passes" in str(result["uneven_error"]), rank
        # Nothing was merged.
        assert result["uneven_count"].sum() == (
            (2 if rank == 0 else 1) * NUM_LAYERS * NUM_TOKENS * CONFIG.top_k
        )


def test_needs_an_initialised_process_group() -> None:
    pytest.importorskip("torch")
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    recorder = ExpertDistributionRecorder(old_location())
    with pytest.raises(moelb.InvalidArgumentError, match=r"initialised torch\.distributed"):
        recorder.all_reduce()
    moves = moelb.plan_weight_moves(old_location(), old_location(), 0)
    with pytest.raises(moelb.InvalidArgumentError, match=r"initialised torch\.distributed"):
        moelb.execute_weight_moves(
            moves, np.zeros((NUM_PHYSICAL // EP_SIZE, 3), np.float32), location=old_location()
        )
