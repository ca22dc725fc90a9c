"""moelb's engine adapters against the real SGLang and vLLM modules, not the fakes.

Every test here skips, with the reason, where the engine is not installed (CI installs neither;
``tests/integrations/install_real_engines.sh`` installs both, ``--no-deps``, with the few pure
Python packages their EPLB modules import). ``MOELB_REQUIRE_OPTIONAL=1`` does not turn these
skips into failures (the ``real_engine`` marker, ``conftest.py``). An engine that is installed
but fails to import fails the test: the install is broken, and a skip would hide it.

What is not the engine's code:

- ``triton``, stubbed in ``sys.modules`` while SGLang is imported, and only where it is not
  installed (a CPU machine: the wheel is 1 GB): SGLang's package imports it
  (``sglang/srt/utils/common.py``: ``import triton``, then ``setattr(triton, "next_power_of_2",
  ...)``) but nothing these tests call uses it. ``torch._dynamo`` is imported first, so PyTorch
  has already found that triton is absent (``has_triton_package`` is cached) and never sees the
  stub, which is removed right after the import.
- For ``sglang.srt.eplb.expert_location`` (``ExpertLocationMetadata.init_by_eplb``,
  ``init_by_mapping``, ``compute_initial_expert_location_metadata``), stand-ins for what a server
  sets up: the module's ``get_exec`` / ``get_parallel`` / ``get_device`` (the config SGLang
  publishes from its ServerArgs; every field is checked to be a ServerArgs field of that
  namespace), ``ModelConfigForExpertLocation.from_model_config`` (a model's layers, experts and
  groups, which SGLang reads from the model class), and a one-process gloo group for the
  ``torch.distributed.get_rank()`` of the static dispatch table.

The SGLang deepseek comparisons use loads on which DeepSeek's algorithm has no ties and no
rounding (``exact_loads``): SGLang's copy of ``eplb.py`` sums pack loads in Python floats
(float64), ``eplb.py`` and moelb's port in float32, so on loads where two GPUs' sums differ by less
than float32 rounding the maps can differ (``test_sglang_deepseek_loads_agree_on_any_input``).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import inspect
import json
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import fake_engines
import moelb
import numpy as np
import pytest
from moelb.cli import main

pytestmark = pytest.mark.real_engine

SGLANG_REASON = (
    "SGLang is not installed (bash tests/integrations/install_real_engines.sh installs the "
    "wheel --no-deps with the pure-Python modules its EPLB code imports)"
)
VLLM_REASON = (
    "vLLM is not installed (bash tests/integrations/install_real_engines.sh installs the "
    "wheel --no-deps with the pure-Python modules its EPLB code imports)"
)
ALGORITHMS_MODULE = "sglang.srt.eplb.eplb_algorithms"
EXPERT_LOCATION_MODULE = "sglang.srt.eplb.expert_location"
POLICY_MODULE = "vllm.distributed.eplb.policy"


def import_engine(
    package: str, modules: list[str], reason: str, stub_triton: bool = False
) -> list[Any]:
    """``modules`` of ``package``; the test skips (``reason``) when ``package`` is not
    installed. Installed, every module must import. ``stub_triton``: with a ``triton`` stub
    while they import, where triton is not installed (SGLang; vLLM's modules do not need it)."""
    if importlib.util.find_spec(package) is None:
        pytest.importorskip(package, reason=reason)
    pytest.importorskip("torch", reason=f"{package} needs PyTorch")
    import torch._dynamo  # noqa: F401  (PyTorch's triton probe runs, and is cached, now)

    stub = None
    if stub_triton and importlib.util.find_spec("triton") is None and "triton" not in sys.modules:
        stub = types.ModuleType("triton")
        stub.__spec__ = importlib.machinery.ModuleSpec("triton", None)
        sys.modules["triton"] = stub
    try:
        return [importlib.import_module(name) for name in modules]
    finally:
        if stub is not None and sys.modules.get("triton") is stub:
            del sys.modules["triton"]


@pytest.fixture(scope="module")
def real_sglang() -> SimpleNamespace:
    algorithms, location = import_engine(
        "sglang", [ALGORITHMS_MODULE, EXPERT_LOCATION_MODULE], SGLANG_REASON, stub_triton=True
    )
    from sglang.srt import runtime_context
    from sglang.srt.arg_groups.arg_utils import namespace_of
    from sglang.srt.server_args import ServerArgs

    return SimpleNamespace(
        algorithms=algorithms,
        location=location,
        runtime_context=runtime_context,
        original=getattr(algorithms.rebalance_experts, "__moelb_original__", None)
        or algorithms.rebalance_experts,
        namespaces=namespace_of(ServerArgs),
        version=sys.modules["sglang"].__version__,
    )


@pytest.fixture
def sglang(real_sglang: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """The real SGLang with install()'s patch undone after the test (the enum member it adds
    stays: a second install() finds it, as in a process that installs twice)."""
    from moelb.integrations import sglang as adapter

    monkeypatch.setattr(real_sglang.algorithms, "rebalance_experts", real_sglang.original)
    monkeypatch.setattr(adapter, "_installed_options", None)
    return real_sglang


@pytest.fixture(scope="module")
def real_vllm() -> SimpleNamespace:
    policy, parallel = import_engine("vllm", [POLICY_MODULE, "vllm.config.parallel"], VLLM_REASON)
    return SimpleNamespace(
        policy=policy,
        parallel=parallel,
        default=policy.EPLB_POLICIES["default"],
        version=sys.modules["vllm"].__version__,
    )


@pytest.fixture
def vllm(real_vllm: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """The real vLLM with its registry restored after the test."""
    monkeypatch.setitem(real_vllm.policy.EPLB_POLICIES, "default", real_vllm.default)
    return real_vllm


# ---------------------------------------------------------------------------------------------
# Inputs and checks
# ---------------------------------------------------------------------------------------------


def exact_loads(seed: int, num_layers: int, num_experts: int, num_groups: int) -> np.ndarray:
    """[L, E] int64 loads on which DeepSeek's algorithm has neither ties nor rounding: twice
    distinct primes of [2200, 4400) (273 of them), so no load is twice another and no expert gets
    a third replica before every expert of its node has a second (with P - E <= E, as here):
    every replica's load w / c is an integer, equal for two experts only when their weights are
    (2p / c = 2q / c' has no solution in distinct odd primes with c, c' <= 2), and every sum stays
    below 2**24 (exact in float32 and float64); each layer's group sums are distinct."""
    rng = np.random.default_rng(seed)
    pool = [n for n in range(2200, 4400) if all(n % d for d in range(2, int(n**0.5) + 1))]
    assert num_experts <= len(pool)
    rows = []
    for _ in range(num_layers):
        row = 2 * rng.choice(pool, size=num_experts, replace=False)
        group_sums = row.reshape(num_groups, -1).sum(axis=1)
        assert len(set(group_sums.tolist())) == num_groups  # a tie would need another seed
        rows.append(row)
    loads = np.array(rows, dtype=np.int64)
    assert loads.sum(axis=1).max() < 2**24
    return loads


def split_steps(loads: np.ndarray, num_steps: int, seed: int) -> np.ndarray:
    """[T, L, E] int64 counts summing over T to ``loads`` (SGLang sums them first)."""
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.integers(0, loads[None] + 1, size=(num_steps - 1, *loads.shape)), axis=0)
    edges = np.concatenate([np.zeros((1, *loads.shape), np.int64), cuts, loads[None]])
    return np.diff(edges, axis=0)


def check_exact(logcnt: Any) -> None:
    """What ``exact_loads`` relies on: no expert has more than 2 replicas."""
    assert int(logcnt.max()) <= 2, "exact_loads needs at most 2 replicas per expert"


def check_triple(result: tuple[Any, Any, Any], num_layers: int, num_experts: int, slots: int):
    """What SGLang's callers take from ``rebalance_experts``: int64 CPU tensors
    ``physical_to_logical_map`` [L, P] (every expert in a slot), ``logical_to_all_physical_map``
    [L, E, X] (the slots of each expert, then -1) and ``expert_count`` [L, E]."""
    import torch

    phy2log, log2phy, count = result
    for tensor in result:
        assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.int64
        assert tensor.device.type == "cpu"
    assert tuple(phy2log.shape) == (num_layers, slots)
    assert tuple(count.shape) == (num_layers, num_experts)
    assert log2phy.shape[:2] == (num_layers, num_experts) and log2phy.shape[2] == count.max()
    for layer in range(num_layers):
        row = phy2log[layer].tolist()
        assert sorted(set(row)) == list(range(num_experts))
        for expert in range(num_experts):
            replicas = log2phy[layer, expert].tolist()
            n = int(count[layer, expert])
            assert replicas[n:] == [-1] * (len(replicas) - n)
            assert sorted(replicas[:n]) == [s for s in range(slots) if row[s] == expert]


def same_replica_sets(a: Any, b: Any) -> bool:
    """Two ``log2phy`` tables list the same slots for every expert (in any order)."""
    return bool((a.sort(dim=-1).values == b.sort(dim=-1).values).all())


def parameters(function: Any) -> list[tuple[str, Any, Any]]:
    """A signature without annotations (SGLang's module has ``from __future__ import
    annotations``, the fakes have none): each parameter's name, kind and default."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


# ---------------------------------------------------------------------------------------------
# SGLang: stand-ins for a server's configuration
# ---------------------------------------------------------------------------------------------


def server_config(sglang: SimpleNamespace, **fields: Any) -> SimpleNamespace:
    """The resolved config expert_location reads (``get_exec().moe``, ``get_parallel()``,
    ``get_device()``), each field checked to be a ServerArgs field of that namespace."""
    defaults = {
        "moe": {
            "eplb_algorithm": "auto",
            "ep_num_redundant_experts": 0,
            "ep_dispatch_algorithm": "static",
            "moe_a2a_backend": "deepep",
            "ep_join_mode": None,
            "init_expert_location": "trivial",
        },
        "parallel": {
            "nnodes": 1,
            "ep_size": 1,
            "tp_size": 1,
            "elastic_ep_initial_size": None,
            "ep_join_rank_offset": 0,
        },
        "device": {"device": "cpu"},
    }
    namespaces = {"moe": "exec.moe", "parallel": "parallel", "device": "device"}
    bags = {}
    for bag, values in defaults.items():
        for name in values:
            assert sglang.namespaces.get(name) == namespaces[bag], (name, namespaces[bag])
        given = {k: v for k, v in fields.items() if k in values}
        bags[bag] = SimpleNamespace(**{**values, **given})
    unknown = set(fields) - {k for values in defaults.values() for k in values}
    assert not unknown, unknown
    return SimpleNamespace(exec=SimpleNamespace(moe=bags["moe"]), **bags)


@pytest.fixture
def serve(sglang: SimpleNamespace, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """``serve(layers, experts, groups, **server fields)``: expert_location as in a server
    started with those fields, for a model of that shape; a one-process gloo group for the static
    dispatch table's ``torch.distributed.get_rank()``; the global metadata restored after."""
    import torch.distributed as dist

    location = sglang.location
    before = location.get_global_expert_location_metadata()
    started = False
    if not dist.is_initialized():
        dist.init_process_group(
            "gloo", init_method=f"file://{tmp_path / 'gloo'}", rank=0, world_size=1
        )
        started = True

    def configure(layers: int, experts: int, groups: int | None, **fields: Any) -> Any:
        config = server_config(sglang, **fields)
        monkeypatch.setattr(location, "get_exec", lambda: config.exec)
        monkeypatch.setattr(location, "get_parallel", lambda: config.parallel)
        monkeypatch.setattr(location, "get_device", lambda: config.device)
        model = location.ModelConfigForExpertLocation(
            num_layers=layers, num_logical_experts=experts, num_groups=groups
        )
        monkeypatch.setattr(
            location.ModelConfigForExpertLocation,
            "from_model_config",
            staticmethod(lambda model_config: model),
        )
        return config

    yield configure
    location.set_global_expert_location_metadata(before, allow_overwrite=True)
    if started:
        dist.destroy_process_group()


def check_metadata(sglang: SimpleNamespace, metadata: Any, phy2log: Any, ep_size: int) -> None:
    """An ExpertLocationMetadata SGLang built from ``phy2log``: the map as given, each expert's
    slots (padded to P with -1) and their count, and SGLang's static dispatch table of every
    rank sending each expert to a slot that holds it."""
    import torch

    num_layers, slots = phy2log.shape
    num_experts = int(phy2log.max()) + 1
    assert (metadata.physical_to_logical_map == phy2log).all()
    assert (metadata.physical_to_logical_map_cpu == phy2log).all()
    table = metadata.logical_to_all_physical_map
    assert tuple(table.shape) == (num_layers, num_experts, slots)
    counts = torch.stack([torch.bincount(row, minlength=num_experts) for row in phy2log])
    assert (metadata.logical_to_all_physical_map_num_valid == counts).all()
    for rank in range(ep_size):
        dispatch = sglang.location.compute_logical_to_rank_dispatch_physical_map(
            table, ep_size, slots, rank
        )
        assert (phy2log.gather(1, dispatch) == torch.arange(num_experts)).all()


# ---------------------------------------------------------------------------------------------
# SGLang
# ---------------------------------------------------------------------------------------------


def test_sglang_fakes_agree_with_the_real_modules(
    sglang: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every name of the real SGLang that moelb's adapter or fake_engines.SGLANG uses exists in
    the fake with the real parameters (names, kinds, defaults) and enum members."""
    from moelb.integrations import sglang as adapter

    fake = fake_engines.inject(monkeypatch, fake_engines.SGLANG)
    real_algorithms, real_location = sglang.algorithms, sglang.location
    fake_algorithms = fake[ALGORITHMS_MODULE]
    fake_location = fake[EXPERT_LOCATION_MODULE]
    assert sglang.version == fake["sglang"].__version__ == adapter.SGLANG_VERSION
    assert list(real_algorithms.EplbAlgorithm.__members__)[:6] == list(
        fake_algorithms.EplbAlgorithm.__members__
    )
    for name in ("rebalance_experts", "compute_algorithm"):
        real = getattr(real_algorithms, name)
        assert parameters(getattr(real, "__moelb_original__", real)) == parameters(
            getattr(fake_algorithms, name)
        )
    for name in ("get_global_expert_location_metadata", "set_global_expert_location_metadata"):
        assert parameters(getattr(real_location, name)) == parameters(getattr(fake_location, name))
    assert parameters(real_location.ExpertLocationMetadata.init_by_eplb) == parameters(
        fake_location.ExpertLocationMetadata.init_by_eplb
    )
    # The attribute the runtime rebalance reads the placement in service from.
    fields = real_location.ExpertLocationMetadata.__dataclass_fields__
    assert "physical_to_logical_map_cpu" in fields
    # The fake runtime_context's names, and its configure() fields where SGLang declares them.
    runtime_context = sglang.runtime_context
    for name in ("get_exec", "get_parallel", "get_resources"):
        assert callable(getattr(runtime_context, name))
    assert sglang.namespaces["eplb_algorithm"] == "exec.moe"
    assert sglang.namespaces["ep_num_redundant_experts"] == "exec.moe"
    assert sglang.namespaces["ep_size"] == sglang.namespaces["nnodes"] == "parallel"
    assert "expert_location_metadata" in runtime_context.Resources.__struct_fields__
    # Both call rebalance_experts through the module, as install() requires.
    assert adapter._caller_problem(real_location, real_algorithms) is None
    assert adapter._caller_problem(fake_location, fake_algorithms) is None


def test_sglang_install_patches_the_real_module(sglang: SimpleNamespace) -> None:
    from moelb.integrations import sglang as adapter

    module = sglang.algorithms
    sglang_members = [m for m in module.EplbAlgorithm if m.name != "moelb"]
    adapter.install(locality="none")
    assert module.EplbAlgorithm["moelb"] is module.EplbAlgorithm.moelb
    assert module.compute_algorithm("moelb", 8, 4) is module.EplbAlgorithm.moelb
    assert list(module.EplbAlgorithm) == [*sglang_members, module.EplbAlgorithm.moelb]
    assert module.rebalance_experts.__moelb_original__ is sglang.original
    # auto stays SGLang's.
    assert module.compute_algorithm("auto", 8, 4) is module.EplbAlgorithm.deepseek_hierarchical
    assert module.compute_algorithm("auto", None, 4) is module.EplbAlgorithm.deepseek
    wrapper = module.rebalance_experts
    adapter.install()
    assert module.rebalance_experts is wrapper
    assert adapter.installed_options() == {"previous_from_engine": True}


@pytest.mark.parametrize("num_steps", [1, 3])
def test_sglang_dispatch_with_moelb_returns_the_adapters_plan(
    sglang: SimpleNamespace, num_steps: int
) -> None:
    """SGLang's rebalance_experts(..., EplbAlgorithm.moelb) after install(): the adapter's
    triple, as SGLang's callers take it; SGLang's own algorithms still plan as before."""
    import torch
    from moelb.integrations import sglang as adapter

    module = sglang.algorithms
    adapter.install()
    counts = torch.from_numpy(split_steps(exact_loads(1, 3, 32, 8), num_steps, 2))
    result = module.rebalance_experts(counts, 40, 5, 8, 2, module.EplbAlgorithm.moelb)
    check_triple(result, 3, 32, 40)
    expected = adapter.rebalance_experts(counts, 40, 5, 8, 2, "moelb")
    for got, want in zip(result, expected, strict=True):
        assert torch.equal(got, want)
    for name in ("deepseek", "deepseek_hierarchical"):
        member = module.EplbAlgorithm[name]
        through = module.rebalance_experts(counts, 40, 5, 8, 2, member)
        direct = sglang.original(counts, 40, 5, 8, 2, member)
        assert all(torch.equal(a, b) for a, b in zip(through, direct, strict=True))


@pytest.mark.parametrize(
    ("num_steps", "layers", "experts", "slots", "per_gpu", "groups", "nodes"),
    [
        (1, 3, 16, 24, 3, 4, 2),
        (2, 2, 64, 80, 10, 8, 2),
        (3, 2, 64, 72, 9, 8, 4),
        (1, 2, 256, 288, 9, 8, 4),  # DeepSeek-V3 on 32 GPUs in 4 nodes
        (2, 3, 60, 64, 8, 5, 2),  # 5 groups on 2 nodes: auto is the global policy
    ],
)
def test_sglang_deepseek_equals_moelbs_port(
    sglang: SimpleNamespace,
    num_steps: int,
    layers: int,
    experts: int,
    slots: int,
    per_gpu: int,
    groups: int,
    nodes: int,
) -> None:
    """SGLang's own copy of DeepSeek's algorithm against moelb's port, on loads without ties or
    rounding: the same maps and counts from SGLang's rebalance_experts, moelb's SGLang adapter
    and moelb's DeepSeek drop-in; each expert's replicas in the same slots (their order may
    differ: torch's unstable sort orders an expert's tied replicas)."""
    import torch
    from moelb.integrations import deepseek
    from moelb.integrations import sglang as adapter

    module = sglang.algorithms
    loads = exact_loads(3, layers, experts, groups)
    counts = torch.from_numpy(split_steps(loads, num_steps, 4))
    gpus = slots // per_gpu
    names = ["deepseek"] + (["deepseek_hierarchical"] if groups % nodes == 0 else [])
    for name in names:
        real = sglang.original(counts, slots, per_gpu, groups, nodes, module.EplbAlgorithm[name])
        check_exact(real[2])
        check_triple(real, layers, experts, slots)
        ours = adapter.rebalance_experts(counts, slots, per_gpu, groups, nodes, name)
        assert torch.equal(real[0], ours[0]), name
        assert torch.equal(real[2], ours[2]), name
        assert same_replica_sets(real[1], ours[1]), name
    # DeepSeek's drop-in picks the policy as eplb.py (and SGLang's auto) does.
    auto = module.compute_algorithm("auto", groups, nodes)
    real = sglang.original(counts, slots, per_gpu, groups, nodes, auto)
    ours = deepseek.rebalance_experts(
        torch.from_numpy(loads), slots, groups, nodes, gpus, algorithm="deepseek"
    )
    assert torch.equal(real[0], ours[0]) and torch.equal(real[2], ours[2])
    assert same_replica_sets(real[1], ours[1])


def test_sglang_deepseek_loads_agree_on_any_input(sglang: SimpleNamespace) -> None:
    """On float loads SGLang's copy (pack loads summed as float64) and moelb's port (float32, as
    eplb.py) may place two replicas differently where two GPUs' sums are within float32
    rounding: the same replica counts, and sorted GPU loads equal to float32 rounding."""
    import torch
    from moelb.integrations import sglang as adapter

    module = sglang.algorithms
    rng = np.random.default_rng(5)
    counts = torch.from_numpy(rng.uniform(1.0, 2.0, size=(1, 4, 256)).astype(np.float32))
    weight = counts.sum(0).double()
    for name in ("deepseek", "deepseek_hierarchical"):
        real = sglang.original(counts, 288, 9, 8, 4, module.EplbAlgorithm[name])
        ours = adapter.rebalance_experts(counts, 288, 9, 8, 4, name)
        assert torch.equal(real[2], ours[2]), name
        for layer in range(4):
            loads = []
            for phy2log, count in ((real[0], real[2]), (ours[0], ours[2])):
                per_slot = weight[layer, phy2log[layer]] / count[layer, phy2log[layer]]
                loads.append(per_slot.reshape(32, 9).sum(1).sort().values)
            assert torch.allclose(loads[0], loads[1], rtol=1e-6, atol=0), (name, layer)


def test_sglang_init_by_eplb_plans_with_moelb(sglang: SimpleNamespace, serve: Any) -> None:
    """SGLang's ExpertLocationMetadata.init_by_eplb (a logical_count file at start-up, and every
    runtime rebalance) under --eplb-algorithm moelb: moelb's plan, built into SGLang's metadata
    and static dispatch tables; --eplb-algorithm auto stays DeepSeek's."""
    import torch
    from moelb.integrations import sglang as adapter

    adapter.install()
    location = sglang.location
    counts = torch.from_numpy(split_steps(exact_loads(6, 4, 64, 8), 2, 7))
    serve(4, 64, 8, eplb_algorithm="moelb", ep_num_redundant_experts=16, ep_size=8, nnodes=2)
    metadata = location.ExpertLocationMetadata.init_by_eplb(None, counts)
    plan = moelb.rebalance(counts.sum(0).double().numpy(), 80, 8, 2, 8, "moelb")
    expected = torch.from_numpy(plan.location.physical_to_logical.astype(np.int64))
    check_metadata(sglang, metadata, expected, 8)
    # A [L, E] logical_count (a file's) is the same plan.
    metadata = location.ExpertLocationMetadata.init_by_eplb(None, counts.sum(0).tolist())
    assert torch.equal(metadata.physical_to_logical_map, expected)
    serve(4, 64, 8, eplb_algorithm="auto", ep_num_redundant_experts=16, ep_size=8, nnodes=2)
    metadata = location.ExpertLocationMetadata.init_by_eplb(None, counts)
    deepseek = sglang.original(counts, 80, 10, 8, 2, sglang.algorithms.EplbAlgorithm["deepseek"])
    hierarchical = sglang.original(
        counts, 80, 10, 8, 2, sglang.algorithms.EplbAlgorithm["deepseek_hierarchical"]
    )
    assert torch.equal(metadata.physical_to_logical_map, hierarchical[0])
    assert not torch.equal(hierarchical[0], deepseek[0])  # auto picked the hierarchical one


def test_sglang_runtime_rebalance_keeps_the_placement_in_service(
    sglang: SimpleNamespace, serve: Any
) -> None:
    """A runtime rebalance (init_by_eplb while SGLang serves a placement): the placement in
    service, read from SGLang's global metadata, is moelb's ``previous``. One with each GPU's
    slots permuted has the fresh plan's balance: kept as it is, nothing moves."""
    import torch
    from moelb.integrations import sglang as adapter

    location = sglang.location
    counts = torch.from_numpy(split_steps(exact_loads(8, 3, 64, 8), 3, 9))
    serve(3, 64, 8, eplb_algorithm="moelb", ep_num_redundant_experts=16, ep_size=8, nnodes=2)
    fresh = moelb.rebalance(counts.sum(0).double().numpy(), 80, 8, 2, 8, "moelb")
    fresh_map = torch.from_numpy(fresh.location.physical_to_logical.astype(np.int64))
    in_service = fresh_map.reshape(3, 8, 10).flip(-1).reshape(3, 80).contiguous()
    assert not torch.equal(in_service, fresh_map)
    serving = location.ExpertLocationMetadata.init_by_mapping(None, in_service, moe_ep_rank=0)
    location.set_global_expert_location_metadata(serving, allow_overwrite=True)
    adapter.install()
    kept = location.ExpertLocationMetadata.init_by_eplb(None, counts)
    assert torch.equal(kept.physical_to_logical_map, in_service)
    adapter.install(previous_from_engine=False)
    replanned = location.ExpertLocationMetadata.init_by_eplb(None, counts)
    assert torch.equal(replanned.physical_to_logical_map, fresh_map)


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> None:
    try:
        code = main(list(args))
    except SystemExit as e:
        code = int(e.code or 0)
    _, err = capsys.readouterr()
    assert code == 0, err


def test_sglang_loads_moelbs_files(
    sglang: SimpleNamespace, serve: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """``moelb rebalance --format sglang`` and ``--format sglang-logical-count`` files through
    SGLang's own loader (compute_initial_expert_location_metadata, --init-expert-location):
    the placement file is served as written (init_by_mapping, per-rank tables for an a2a
    backend); the logical_count file, planned at start-up under --eplb-algorithm moelb, lands on
    the same placement."""
    import torch
    from moelb.integrations import sglang as adapter

    counts = split_steps(exact_loads(10, 4, 64, 8), 5, 11)
    counts[:, 0] = 0  # a dense layer: SGLang's maps have a row per decoder layer
    moelb.save_expert_distribution(
        {"rank": 0, "logical_count": counts, "average_utilization_rate_over_window": None},
        tmp_path / "dump.json",
    )
    topology = ["--num-physical-experts", "80", "--ep-size", "8", "--num-nodes", "2"]
    topology += ["--num-groups", "8"]
    for file_format, name in [("sglang", "placement.json"), ("sglang-logical-count", "lc.json")]:
        cli(capsys, "rebalance", str(tmp_path / "dump.json"), "-o", str(tmp_path / name),
            *topology, "--format", file_format)  # fmt: skip
    written = torch.tensor(json.loads((tmp_path / "placement.json").read_text())[
        "physical_to_logical_map"
    ])  # fmt: skip
    for backend in ("deepep", "none"):
        serve(4, 64, 8, ep_num_redundant_experts=16, ep_size=8, nnodes=2, moe_a2a_backend=backend,
              init_expert_location=str(tmp_path / "placement.json"))  # fmt: skip
        for rank in (0, 5):
            metadata = sglang.location.compute_initial_expert_location_metadata(None, rank)
            assert torch.equal(metadata.physical_to_logical_map, written)
            dispatch = metadata.logical_to_rank_dispatch_physical_map
            assert (written.gather(1, dispatch) == torch.arange(64)).all()
            if backend == "none":
                check_metadata(sglang, metadata, written, 8)
            else:  # each rank's replica lists, collapsed to a nearest replica where one is
                table = metadata.logical_to_all_physical_map
                held = written.gather(1, table.clamp(min=0).flatten(1)).reshape(table.shape)
                assert ((table == -1) | (held == torch.arange(64)[:, None])).all()
                assert (metadata.logical_to_all_physical_map_num_valid >= 1).all()
    adapter.install()
    serve(4, 64, 8, eplb_algorithm="moelb", ep_num_redundant_experts=16, ep_size=8, nnodes=2,
          init_expert_location=str(tmp_path / "lc.json"))  # fmt: skip
    metadata = sglang.location.compute_initial_expert_location_metadata(None, 0)
    assert torch.equal(metadata.physical_to_logical_map, written)


# ---------------------------------------------------------------------------------------------
# vLLM
# ---------------------------------------------------------------------------------------------


def test_vllm_fakes_agree_with_the_real_modules(
    vllm: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The registry, the accepted policy names and the policy contract of the real vLLM, in
    fake_engines.VLLM and in moelb's MoelbEplbPolicy."""
    from moelb.integrations import vllm as adapter

    real_policy, real_parallel = vllm.policy, vllm.parallel
    real_default = vllm.default
    fake = fake_engines.inject(monkeypatch, fake_engines.VLLM)
    fake_policy = fake[POLICY_MODULE]
    assert vllm.version == fake["vllm"].__version__ == adapter.VLLM_VERSION
    assert set(real_policy.EPLB_POLICIES) == set(fake_policy.EPLB_POLICIES) == {"default"}
    assert typing.get_args(real_parallel.EPLBPolicyOption) == typing.get_args(
        fake["vllm.config.parallel"].EPLBPolicyOption
    )
    contract = parameters(real_policy.AbstractEplbPolicy.rebalance_experts)
    assert [name for name, _, _ in contract] == list(adapter.POLICY_PARAMETERS)
    assert contract == parameters(fake_policy.AbstractEplbPolicy.rebalance_experts)
    assert contract == parameters(real_default.rebalance_experts)
    assert contract == parameters(fake_policy.DefaultEplbPolicy.rebalance_experts)
    assert contract == parameters(adapter.MoelbEplbPolicy.rebalance_experts)
    assert (
        "tuple"
        not in str(
            inspect.signature(real_policy.AbstractEplbPolicy.rebalance_experts).return_annotation
        ).lower()
    )
    assert real_default.__name__ == "DefaultEplbPolicy"
    assert issubclass(real_default, real_policy.AbstractEplbPolicy)


def test_vllm_install_registers_moelbs_policy(vllm: SimpleNamespace) -> None:
    """install(): EPLB_POLICIES["default"] is moelb's policy, a subclass of vLLM's
    AbstractEplbPolicy; vLLM's registry check still holds and its config still accepts only
    "default", which now plans with moelb."""
    from moelb.integrations import vllm as adapter

    adapter.install(locality="none")
    registry = vllm.policy.EPLB_POLICIES
    policy = registry["default"]
    assert issubclass(policy, adapter.MoelbEplbPolicy)
    assert issubclass(policy, vllm.policy.AbstractEplbPolicy)
    assert policy.replaced is vllm.default
    assert policy.options == {"locality": "none"}
    assert set(registry) == set(typing.get_args(vllm.parallel.EPLBPolicyOption))
    config = vllm.parallel.EPLBConfig()
    assert registry[config.policy] is policy
    with pytest.raises(ValueError, match="policy"):
        vllm.parallel.EPLBConfig(policy="moelb")
    adapter.install()
    assert registry["default"] is policy and policy.options == {}


def test_vllm_policy_call_as_eplb_state_makes_it(vllm: SimpleNamespace) -> None:
    """The call vLLM's rearrangement makes (eplb_state.py, async_worker.py): the window's load
    on the CPU, the map in service as the sixth positional argument; the same int64 CPU
    [L, P] map as vLLM's DefaultEplbPolicy returns, with every expert placed, planned by moelb."""
    import torch
    from moelb.integrations import vllm as adapter

    adapter.install()
    loads = torch.from_numpy(exact_loads(12, 3, 64, 8)).float()
    trivial = torch.arange(80).repeat(3, 1) % 64
    ours = vllm.policy.EPLB_POLICIES["default"].rebalance_experts(loads, 80, 8, 2, 8, trivial)
    theirs = vllm.default.rebalance_experts(loads, 80, 8, 2, 8, trivial)
    for result in (ours, theirs):
        assert result.dtype == torch.int64 and result.device.type == "cpu"
        assert tuple(result.shape) == (3, 80)
        for row in result.tolist():
            assert sorted(set(row)) == list(range(64))
    previous = moelb.ExpertLocation(trivial.numpy().astype(np.int32), 64, 8, 2)
    plan = moelb.rebalance(loads.double().numpy(), 80, 8, 2, 8, "moelb", previous)
    assert ours.tolist() == plan.location.physical_to_logical.tolist()


def test_vllm_old_global_expert_indices_contract(vllm: SimpleNamespace) -> None:
    """old_global_expert_indices, the placement in service: a placement with each GPU's slots
    permuted keeps its slots under vLLM's DefaultEplbPolicy (preserve_intragpu_slots) and under
    moelb's policy alike; a map of another shape is not used."""
    import torch
    from moelb.integrations import vllm as adapter

    loads = torch.from_numpy(exact_loads(13, 3, 64, 8)).float()
    theirs = vllm.default.rebalance_experts(loads, 80, 8, 2, 8)
    permuted = theirs.reshape(3, 8, 10).flip(-1).reshape(3, 80).contiguous()
    assert torch.equal(vllm.default.rebalance_experts(loads, 80, 8, 2, 8, permuted), permuted)
    fresh = adapter.MoelbEplbPolicy.rebalance_experts(loads, 80, 8, 2, 8)
    in_service = fresh.reshape(3, 8, 10).flip(-1).reshape(3, 80).contiguous()
    kept = adapter.MoelbEplbPolicy.rebalance_experts(loads, 80, 8, 2, 8, in_service)
    assert torch.equal(kept, in_service)
    other = torch.arange(96).repeat(3, 1) % 64  # 96 slots: another deployment
    assert torch.equal(adapter.MoelbEplbPolicy.rebalance_experts(loads, 80, 8, 2, 8, other), fresh)


@pytest.mark.parametrize(
    ("layers", "experts", "slots", "groups", "nodes", "ranks"),
    [(3, 16, 24, 4, 2, 8), (2, 64, 80, 8, 2, 8), (2, 256, 288, 8, 4, 32), (2, 60, 64, 5, 2, 8)],
)
def test_vllm_default_equals_moelbs_deepseek_port(
    vllm: SimpleNamespace,
    layers: int,
    experts: int,
    slots: int,
    groups: int,
    nodes: int,
    ranks: int,
) -> None:
    """vLLM's DefaultEplbPolicy (its NumPy restatement of DeepSeek's algorithm) and moelb's
    DeepSeek port, on loads without ties or rounding: the same map."""
    import torch
    from moelb.integrations import deepseek

    loads = torch.from_numpy(exact_loads(14, layers, experts, groups))
    theirs = vllm.default.rebalance_experts(loads, slots, groups, nodes, ranks)
    ours = deepseek.rebalance_experts(loads, slots, groups, nodes, ranks, algorithm="deepseek")
    check_exact(ours[2])
    assert torch.equal(theirs, ours[0])


@pytest.fixture(autouse=True)
def _no_leftover_stub() -> Iterator[None]:
    yield
    triton = sys.modules.get("triton")
    assert triton is None or getattr(triton, "__file__", None) is not None
