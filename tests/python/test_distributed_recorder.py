"""ExpertDistributionRecorder.all_reduce across 2 real gloo processes: cases the 4-rank round of
test_distributed.py does not reach. Every rank must raise the same error (none merges alone)."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path
from typing import Any

import numpy as np
import pytest

WORLD = 2


def _worker(rank: int, init: str, queue: Any) -> None:  # runs in a spawned process
    import moelb
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        first = moelb.ExpertLocation.trivial(2, 4, 6, ep_size=WORLD)
        second = moelb.ExpertLocation(np.array([[3, 2, 1, 0, 0, 1]] * 2), 4, WORLD)
        recorder = moelb.ExpertDistributionRecorder(first, ep_rank=rank)
        if rank == 1:
            recorder.set_location(second)  # rank 1's window is all in the new placement
        recorder.start()
        for p in range(2):
            if rank == 0 and p == 1:
                recorder.set_location(second)  # rank 0 rebalanced mid-window
            with recorder.forward_pass(), recorder.layer(0):
                recorder.on_select_experts(np.array([[0, 1], [2, 5]], np.int32))
        before = recorder.physical_count()
        try:
            recorder.all_reduce()
            error = ""
        except moelb.InvalidArgumentError as e:
            error = str(e)
        unchanged = bool(np.array_equal(recorder.physical_count(), before))
        queue.put((rank, error, unchanged))
    finally:
        dist.destroy_process_group()


def test_a_window_spanning_set_location_on_one_rank_raises_on_every_rank(tmp_path: Path) -> None:
    pytest.importorskip("torch.distributed")
    context = mp.get_context("spawn")
    queue = context.Queue()
    init = f"file://{tmp_path}/rendezvous"
    procs = [context.Process(target=_worker, args=(r, init, queue)) for r in range(WORLD)]
    for p in procs:
        p.start()
    try:
        results = {r: (e, u) for r, e, u in (queue.get(timeout=120) for _ in range(WORLD))}
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    errors = {e for e, _ in results.values()}
    assert len(errors) == 1, results  # the same error on both ranks
    (error,) = errors
    assert "rank 0 holds 1 recorded with an earlier one" in error
    assert "before set_location" in error
    assert all(unchanged for _, unchanged in results.values())
