"""Calls from several Python threads at once (the bindings release the GIL) give exactly the
results of serial calls: select_experts, HashRouter.select, rebalance, evaluate_placement,
WaterfillBalancer.expand, DeepSeekMoE forward (one layer per thread, and one layer shared: its
forwards only read the layer), and a recorder fed from several threads loses no count.

Threading contracts checked here: routers, placements, balancers and layers are read-only in
their calls and may be shared; the recorder's hooks take a lock and may be called from several
threads inside the layer scope one thread opened (the scopes themselves are per recorder, not per
thread, so threads share the open pass and layer).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import moelb
import numpy as np
import pytest

NUM_THREADS = 8
ROUNDS = 4


@pytest.fixture(params=[1, 0], ids=["core-1-thread", "core-default-threads"])
def core_threads(request: pytest.FixtureRequest) -> Iterator[int]:
    """Each test runs with moelb's own parallel loops on one thread and on the default count:
    Python threads then run alone or next to moelb's worker threads."""
    moelb.set_num_threads(request.param)
    try:
        yield request.param
    finally:
        moelb.set_num_threads(0)


def concurrently(jobs: list[Callable[[], Any]], rounds: int = ROUNDS) -> list[list[Any]]:
    """Runs every job `rounds` times, all jobs at once on their own threads (started together
    behind a barrier); returns each job's results in order. Exceptions propagate."""
    barrier = threading.Barrier(len(jobs))

    def run(job: Callable[[], Any]) -> list[Any]:
        barrier.wait()
        return [job() for _ in range(rounds)]

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = [pool.submit(run, job) for job in jobs]
        return [f.result(timeout=300) for f in futures]


def assert_same(a: Any, b: Any, where: str) -> None:
    """Bitwise equality of arrays, tuples, lists, dicts and dataclass-like results."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape, where
        np.testing.assert_array_equal(a, b, err_msg=where)
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, moelb.ExpertLocation):
        assert_same(a.physical_to_logical, b.physical_to_logical, where)
    elif hasattr(a, "__dataclass_fields__"):
        for name in a.__dataclass_fields__:
            if name != "wall_time_seconds":
                assert_same(getattr(a, name), getattr(b, name), f"{where}.{name}")
    elif isinstance(a, float) and np.isnan(a):
        assert isinstance(b, float) and np.isnan(b), where
    else:
        assert a == b, where


def check_against_serial(jobs: list[Callable[[], Any]]) -> None:
    expected = [job() for job in jobs]
    for i, results in enumerate(concurrently(jobs)):
        for r, result in enumerate(results):
            assert_same(result, expected[i], f"job {i} round {r}")


# ------------------------------------------------------------------------------------------------
# Routing.


def test_select_experts(core_threads: int) -> None:
    rng = np.random.default_rng(0)
    location = moelb.ExpertLocation(
        np.array([rng.permutation(np.arange(72) % 64) for _ in range(3)]), 64, 8, 2
    )
    configs = [
        moelb.TopKConfig(top_k=8, scoring="sigmoid", num_groups=8, topk_group=4),
        moelb.TopKConfig(top_k=6, scoring="sqrtsoftplus", routed_scaling_factor=1.5),
        moelb.TopKConfig(top_k=4, scoring="softmax", num_fused_shared_experts=1),
    ]
    jobs = []
    for i in range(NUM_THREADS):
        logits = rng.normal(size=(200 + 97 * i, 64)).astype(np.float32)
        logits[rng.random(logits.shape) < 0.01] = np.nan
        bias = rng.normal(size=64).astype(np.float32) * 0.1
        config = configs[i % len(configs)]
        kwargs: dict[str, Any] = {"num_token_non_padded": logits.shape[0] - i}
        if i % 2:
            kwargs.update(location=location, layer=i % 3, ep_rank=i % 8)
        jobs.append(
            lambda logits=logits, bias=bias, config=config, kwargs=kwargs: moelb.select_experts(
                logits, config, bias, **kwargs
            )
        )
    check_against_serial(jobs)


def test_hash_router_shared_between_threads(core_threads: int) -> None:
    rng = np.random.default_rng(1)
    router = moelb.HashRouter(rng.integers(0, 32, (500, 6)).astype(np.int32))
    location = moelb.ExpertLocation.trivial(2, 32, 40, 8)
    jobs = []
    for i in range(NUM_THREADS):
        logits = rng.normal(size=(150 + 61 * i, 32)).astype(np.float32)
        ids = rng.integers(0, 500, logits.shape[0]).astype(np.int64 if i % 2 else np.int32)
        kwargs = {"location": location, "layer": i % 2, "ep_rank": i} if i % 3 == 0 else {}
        jobs.append(
            lambda logits=logits, ids=ids, kwargs=kwargs: router.select(logits, ids, **kwargs)
        )
    check_against_serial(jobs)


def test_waterfill_balancer_shared_between_threads(core_threads: int) -> None:
    rng = np.random.default_rng(2)
    balancer = moelb.WaterfillBalancer(64, 8, 3, routed_scaling_factor=2.5)
    jobs = []
    for i in range(NUM_THREADS):
        tokens = [40, 64, 300, 1000][i % 4]
        ids = rng.integers(-1, 64, (tokens, 8)).astype(np.int32)
        weights = rng.random((tokens, 8)).astype(np.float32)
        is_decode = bool(i % 2)
        jobs.append(
            lambda ids=ids, weights=weights, is_decode=is_decode: balancer.expand(
                ids, weights, is_decode=is_decode
            )
        )
    check_against_serial(jobs)


# ------------------------------------------------------------------------------------------------
# Planning.


def test_rebalance_and_evaluate_placement(core_threads: int) -> None:
    rng = np.random.default_rng(3)
    previous = moelb.ExpertLocation.trivial(4, 64, 80, 8, 2)
    jobs = []
    for i in range(NUM_THREADS):
        load = rng.zipf(1.5, (4, 64)).astype(np.float64).clip(max=1e6)
        algorithm = ["moelb", "deepseek", "deepseek_global", "moelb"][i % 4]
        kwargs: dict[str, Any] = {"previous": previous if i % 2 else None}
        if i == 3:
            kwargs.update(move_cost=0.01, max_moves=50)
        jobs.append(
            lambda load=load, algorithm=algorithm, kwargs=kwargs: moelb.rebalance(
                load, 80, 8, 2, 8, algorithm, **kwargs
            )
        )
        jobs.append(
            lambda load=load: moelb.evaluate_placement(load, previous, previous, expert_bytes=10)
        )
    check_against_serial(jobs)


# ------------------------------------------------------------------------------------------------
# The MoE layer.

SMALL_V3 = moelb.DeepSeekMoEConfig.deepseek_v3().replace(
    hidden_size=64, intermediate_size=32, num_experts=16, top_k=4, num_groups=4, topk_group=2
)
SMALL_V4_HASH = moelb.DeepSeekMoEConfig.deepseek_v4_flash(layer_id=0).replace(
    hidden_size=64, intermediate_size=32, num_experts=16, top_k=4, vocab_size=100
)


def moe_jobs(layers: list[moelb.DeepSeekMoE], rng: np.random.Generator) -> list[Callable[[], Any]]:
    jobs = []
    for i, layer in enumerate(layers):
        hidden = rng.normal(size=(33 + 41 * i, 64)).astype(np.float32)
        ids = rng.integers(0, 100, hidden.shape[0]) if layer.config.is_hash_layer else None
        jobs.append(lambda layer=layer, hidden=hidden, ids=ids: layer.forward(hidden, ids))
    return jobs


@pytest.mark.parametrize("config", [SMALL_V3, SMALL_V4_HASH], ids=["v3", "v4-hash"])
def test_moe_forward_one_layer_per_thread(core_threads: int, config: Any) -> None:
    rng = np.random.default_rng(4)
    layers = [moelb.DeepSeekMoE(config, seed=i % 3) for i in range(NUM_THREADS)]
    check_against_serial(moe_jobs(layers, rng))


@pytest.mark.parametrize("config", [SMALL_V3, SMALL_V4_HASH], ids=["v3", "v4-hash"])
def test_moe_forward_one_layer_shared(core_threads: int, config: Any) -> None:
    """One layer, forwards from every thread at once (each forward only reads the layer)."""
    rng = np.random.default_rng(5)
    layer = moelb.DeepSeekMoE(config, seed=1)
    check_against_serial(moe_jobs([layer] * NUM_THREADS, rng))
    stats = layer.last_stats()
    assert stats["steps"][:2] == ["gate", "topk"], stats


# ------------------------------------------------------------------------------------------------
# The recorder.


def test_recorder_fed_from_threads_loses_no_count(core_threads: int) -> None:
    """Threads route their own token batches with recorder= (and the low-latency counts hook)
    inside the pass and layer scopes the main thread opened; every count arrives."""
    rng = np.random.default_rng(6)
    location = moelb.ExpertLocation(
        np.array([rng.permutation(np.arange(48) % 40) for _ in range(2)]), 40, 4
    )
    recorder = moelb.ExpertDistributionRecorder(location, "per_pass", buffer_size=-1)
    recorder.start()
    config = moelb.TopKConfig(top_k=6, scoring="sigmoid", num_groups=4, topk_group=2)
    slots = location.num_local_physical_experts
    batches = [rng.normal(size=(100 + 13 * i, 40)).astype(np.float32) for i in range(NUM_THREADS)]
    dispatch = [rng.integers(0, 50, slots + 1) for _ in range(NUM_THREADS)]
    expected = np.zeros((2, 2, 48), np.int64)  # [pass, layer, P]
    for p in range(2):
        for layer in range(2):
            for i, logits in enumerate(batches):
                out = moelb.select_experts(
                    logits, config, location=location, layer=layer, ep_rank=i % 4
                )
                ids = out.recorder_topk_ids
                np.add.at(expected[p, layer], ids[ids >= 0], 1)
                rank = i % 4
                expected[p, layer, rank * slots : (rank + 1) * slots] += dispatch[i][:slots]

    def job(i: int, layer: int) -> Callable[[], None]:
        def run() -> None:
            moelb.select_experts(
                batches[i],
                config,
                location=location,
                layer=layer,
                ep_rank=i % 4,
                recorder=recorder,
            )
            recorder.on_dispatch_counts(dispatch[i], i % 4, num_trailing_shared_slots=1)

        return run

    for _ in range(2):
        with recorder.forward_pass():
            for layer in range(2):
                with recorder.layer(layer):
                    concurrently([job(i, layer) for i in range(NUM_THREADS)], rounds=1)
    counts = recorder.physical_count()
    np.testing.assert_array_equal(counts, expected)
    logical = recorder.logical_count()
    assert logical.sum() == expected.sum()


def test_recorder_hooks_race_with_reads_and_scopes(core_threads: int) -> None:
    """Hooks from worker threads while the main thread opens and closes passes and reads the
    window: every hook either counts in exactly one pass or fails with a typed error (outside a
    scope), and the counts add up."""
    location = moelb.ExpertLocation.trivial(1, 16, 16, 4)
    recorder = moelb.ExpertDistributionRecorder(location, buffer_size=-1)
    recorder.start()
    ids = np.arange(32, dtype=np.int32).reshape(8, 4) % 16
    stop = threading.Event()
    counted = [0] * 4
    refused = [0] * 4

    def hook(i: int) -> None:
        while not stop.is_set():
            try:
                recorder.on_select_experts(ids)
                counted[i] += 1
            except moelb.InvalidArgumentError:
                refused[i] += 1

    threads = [threading.Thread(target=hook, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        for _ in range(100):
            with recorder.forward_pass(), recorder.layer(0):
                recorder.physical_count()
                time.sleep(0.001)  # let the hooks in
            recorder.average_balancedness(10)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert sum(counted) > 0  # hooks did land inside the scopes
    assert recorder.physical_count().sum() == sum(counted) * ids.size
