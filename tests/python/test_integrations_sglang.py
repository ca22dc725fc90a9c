"""moelb.integrations.sglang: SGLang 0.5.23's ``eplb_algorithms.rebalance_experts`` contract and
``install()`` (reference/integrations.md), against fake SGLang modules
(tests/python/fake_engines.py; SGLang is not installed in CI).

- ``rebalance_experts``: [T, L, E] counts in, SGLang's return triple out (int64, log2phy padded to
  the call's largest count, every expert placed); the DeepSeek algorithms as SGLang's deepseek.py
  runs them (counts summed over T, global or hierarchical as asked) equal eplb.py's port; moelb's
  plan under ``"moelb"`` (of the steps with ``objective="step_peak"``); SGLang's asserts as
  ``AssertionError``.
- ``install()``: adds ``EplbAlgorithm.moelb``, wraps ``rebalance_experts`` (other algorithms reach
  SGLang's function unchanged), is idempotent, refuses a missing SGLang or another module layout
  without patching; SGLang's call path (``init_by_eplb`` with ``--eplb-algorithm moelb``) reaches
  moelb, and a runtime rebalance plans against the placement in service; the launcher patches a
  process SGLang spawns.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import fake_engines
import moelb
import numpy as np
import pytest
from moelb.integrations import EngineLayoutError, EngineNotFoundError

torch = pytest.importorskip("torch")
from moelb.integrations import sglang as adapter  # noqa: E402

sys.path.append(str(Path(__file__).resolve().parents[2] / "benchmarks"))
import deepseek_eplb_reference as ds_ref  # noqa: E402

ALGORITHMS_MODULE = "sglang.srt.eplb.eplb_algorithms"


def steps(seed: int, num_steps: int, num_layers: int, num_experts: int) -> np.ndarray:
    """int32 counts [T, L, E] whose sums over T are distinct (no ties in eplb.py's sorts)."""
    rng = np.random.default_rng(seed)
    total = rng.permutation(num_layers * num_experts).reshape(num_layers, num_experts) * 7 + 50
    split = rng.dirichlet(np.ones(num_steps), size=(num_layers, num_experts))  # [L, E, T]
    counts = np.floor(split * total[..., None]).astype(np.int64)
    counts[..., 0] += total - counts.sum(axis=2)  # exact sums
    return np.ascontiguousarray(counts.transpose(2, 0, 1), dtype=np.int32)


def check_triple(result: tuple, num_layers: int, num_experts: int, num_slots: int) -> None:
    phy2log, log2phy, count = result
    for tensor in result:
        assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.int64
    assert tuple(phy2log.shape) == (num_layers, num_slots)
    assert tuple(count.shape) == (num_layers, num_experts)
    assert tuple(log2phy.shape) == (num_layers, num_experts, int(count.max()))
    p2l, l2p, cnt = phy2log.numpy(), log2phy.numpy(), count.numpy()
    assert (cnt >= 1).all()  # every expert placed
    for layer in range(num_layers):
        assert (np.bincount(p2l[layer], minlength=num_experts) == cnt[layer]).all()
        for expert in range(num_experts):
            c = cnt[layer, expert]
            assert sorted(l2p[layer, expert, :c]) == np.flatnonzero(p2l[layer] == expert).tolist()
            assert (l2p[layer, expert, c:] == -1).all()


# ---------------------------------------------------------------------------------------------
# rebalance_experts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", adapter.ALGORITHMS)
def test_contract(algorithm: str) -> None:
    counts = torch.from_numpy(steps(0, 5, 4, 16))
    result = adapter.rebalance_experts(counts, 24, 3, 4, 2, algorithm)
    check_triple(result, 4, 16, 24)


@pytest.mark.parametrize(
    ("num_slots", "num_local", "num_groups", "num_nodes"),
    [(24, 3, 4, 2), (48, 6, 8, 2), (20, 5, 4, 4), (32, 4, 4, 1)],
)
def test_deepseek_algorithms_equal_eplb_py(
    num_slots: int, num_local: int, num_groups: int, num_nodes: int
) -> None:
    """SGLang's deepseek.py: the counts summed over T; ``deepseek`` is the global policy,
    ``deepseek_hierarchical`` the hierarchical one, whatever num_groups % num_nodes."""
    counts = torch.from_numpy(steps(num_slots, 6, 3, 16))
    summed = counts.sum(dim=0)
    num_gpus = num_slots // num_local
    ours = adapter.rebalance_experts(
        counts, num_slots, num_local, num_groups, num_nodes, "deepseek"
    )
    theirs = ds_ref.rebalance_experts_torch(summed, num_slots, 1, 1, num_gpus)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    ours = adapter.rebalance_experts(
        counts, num_slots, num_local, num_groups, num_nodes, "deepseek_hierarchical"
    )
    theirs = ds_ref.rebalance_experts_torch(summed, num_slots, num_groups, num_nodes, num_gpus)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_moelb_is_moelbs_plan() -> None:
    counts = steps(1, 8, 3, 16)
    phy2log, _, _ = adapter.rebalance_experts(counts, 24, 3, None, 2, "moelb")
    plan = moelb.rebalance(counts.sum(axis=0).astype(np.float64), 24, None, 2, 8, "moelb")
    assert (phy2log.numpy() == plan.location.physical_to_logical).all()
    phy2log, _, _ = adapter.rebalance_experts(counts, 24, 3, 4, 2, "moelb", objective="step_peak")
    plan = moelb.rebalance(counts, 24, 4, 2, 8, "moelb", objective="step_peak")
    assert (phy2log.numpy() == plan.location.physical_to_logical).all()


def test_enum_member_is_read_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    modules = fake_engines.inject(monkeypatch, fake_engines.SGLANG)
    enum_class = modules[ALGORITHMS_MODULE].EplbAlgorithm
    counts = steps(2, 3, 2, 16)
    by_member = adapter.rebalance_experts(counts, 24, 3, 4, 2, enum_class.deepseek_hierarchical)
    by_name = adapter.rebalance_experts(counts, 24, 3, 4, 2, "deepseek_hierarchical")
    assert all(torch.equal(a, b) for a, b in zip(by_member, by_name, strict=True))
    with pytest.raises(moelb.InvalidArgumentError, match="deepseek_vec"):
        adapter.rebalance_experts(counts, 24, 3, 4, 2, enum_class.deepseek_vec)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((25, 3, 4, 2, "moelb"), "num_physical_experts=25 is not a multiple of "),
        ((12, 3, 4, 2, "deepseek"), "num_replicas=12 is smaller than the 16 logical experts"),
        ((24, 3, 3, 2, "deepseek_hierarchical"), "num_logical_experts=16 is not a multiple"),
        ((24, 3, 4, 3, "deepseek_hierarchical"), "num_groups=4 is not a multiple of num_nodes=3"),
        ((24, 4, 4, 4, "deepseek_hierarchical"), "num_gpus=6 is not a multiple of num_nodes=4"),
    ],
)
def test_asserts_as_sglang(args: tuple, match: str) -> None:
    with pytest.raises(AssertionError, match=match) as info:
        adapter.rebalance_experts(steps(0, 2, 2, 16), *args)
    assert isinstance(info.value, moelb.InvalidArgumentError)


@pytest.mark.parametrize(
    ("counts", "args", "kwargs", "match"),
    [
        (np.ones((2, 16)), (24, 3, 4, 2, "moelb"), {}, r"tokens_per_expert must have shape \[nu"),
        (-np.ones((1, 2, 16)), (24, 3, 4, 2, "moelb"), {}, r"tokens_per_expert\[0, 0\] = -1.0"),
        (np.ones((1, 2, 16)), (24, 3, None, 2, "deepseek_hierarchical"), {}, "num_groups=None"),
        (np.ones((1, 2, 16)), (24, 3, 4, 2, "flash_lb"), {}, "algorithm='flash_lb' is not one"),
        (np.ones((1, 2, 16)), (24, 3, 4, 2, "deepseek"), {"locality": "none"}, "apply to alg"),
        (np.ones((1, 2, 16)), (24, 3, 4, 2, "moelb"), {"step": 1}, "unknown option"),
    ],
)
def test_bad_input(counts: np.ndarray, args: tuple, kwargs: dict, match: str) -> None:
    with pytest.raises(moelb.InvalidArgumentError, match=match) as info:
        adapter.rebalance_experts(counts, *args, **kwargs)
    assert not isinstance(info.value, AssertionError)


# ---------------------------------------------------------------------------------------------
# install()
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def sglang(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """The fake SGLang in sys.modules, and install()'s state restored after the test."""
    modules = fake_engines.inject(monkeypatch, fake_engines.SGLANG)
    monkeypatch.setattr(adapter, "_installed_options", None)
    return SimpleNamespace(
        algorithms=modules[ALGORITHMS_MODULE],
        location=modules["sglang.srt.eplb.expert_location"],
        runtime=modules["sglang.srt.runtime_context"],
    )


def init_by_eplb(
    sglang: SimpleNamespace, algorithm: str, num_groups: int, logical_count: object
) -> object:
    """SGLang's start-up / runtime planning call, started with --eplb-algorithm ``algorithm``,
    --ep-num-redundant-experts 8, EP 8, --nnodes 2."""
    sglang.runtime.configure(
        eplb_algorithm=algorithm, ep_num_redundant_experts=8, ep_size=8, nnodes=2
    )
    model_config = SimpleNamespace(num_groups=num_groups)
    return sglang.location.ExpertLocationMetadata.init_by_eplb(model_config, logical_count)


def serve(sglang: SimpleNamespace, physical_to_logical_map: torch.Tensor) -> None:
    """Makes ``physical_to_logical_map`` the placement in service."""
    metadata = SimpleNamespace(physical_to_logical_map_cpu=physical_to_logical_map)
    sglang.location.set_global_expert_location_metadata(metadata, allow_overwrite=True)


def test_install_patches_the_module(sglang: SimpleNamespace) -> None:
    module = sglang.algorithms
    original = module.rebalance_experts
    adapter.install()
    assert module.EplbAlgorithm["moelb"] is module.EplbAlgorithm.moelb
    assert module.compute_algorithm("moelb", 4, 2) is module.EplbAlgorithm.moelb
    assert len(module.EplbAlgorithm) == 7
    assert module.rebalance_experts is not original
    assert module.rebalance_experts.__moelb_original__ is original
    # auto and every SGLang algorithm are SGLang's, unchanged.
    assert module.compute_algorithm("auto", 4, 2) is module.EplbAlgorithm.deepseek_hierarchical
    counts = torch.from_numpy(steps(3, 2, 2, 16))
    for member in list(module.EplbAlgorithm)[:6]:
        assert module.rebalance_experts(counts, 24, 3, 4, 2, member) == ("sglang", member.name)
    assert [call[-1] for call in module.CALLS] == list(module.EplbAlgorithm)[:6]


def test_install_is_idempotent(sglang: SimpleNamespace) -> None:
    module = sglang.algorithms
    adapter.install()
    wrapper, member = module.rebalance_experts, module.EplbAlgorithm.moelb
    adapter.install(locality="none")
    assert module.rebalance_experts is wrapper and module.EplbAlgorithm.moelb is member
    assert len(module.EplbAlgorithm) == 7
    assert adapter.installed_options() == {"locality": "none", "previous_from_engine": True}


def test_call_path_reaches_moelb(sglang: SimpleNamespace) -> None:
    """init_by_eplb (a logical_count file at start-up, or a runtime rebalance) with
    --eplb-algorithm moelb plans with moelb; SGLang's function is not called."""
    adapter.install()
    logical_count = steps(4, 1, 3, 16)[0].tolist()  # [L, E], as a logical_count file holds
    result = init_by_eplb(sglang, "moelb", 4, logical_count)
    check_triple(result, 3, 16, 24)
    plan = moelb.rebalance(np.array(logical_count, dtype=np.float64), 24, 4, 2, 8, "moelb")
    assert (result[0].numpy() == plan.location.physical_to_logical).all()
    assert sglang.algorithms.CALLS == []
    # The default stays SGLang's.
    assert init_by_eplb(sglang, "auto", 4, logical_count) == (
        "sglang",
        "deepseek_hierarchical",
    )


def test_options_reach_the_plan(sglang: SimpleNamespace) -> None:
    adapter.install(locality="none")
    logical_count = steps(5, 1, 2, 16)[0]
    result = init_by_eplb(sglang, "moelb", 4, logical_count.tolist())
    plan = moelb.rebalance(logical_count, 24, 4, 2, 8, "moelb", locality="none")
    assert (result[0].numpy() == plan.location.physical_to_logical).all()


def test_runtime_rebalance_keeps_the_placement_in_service(sglang: SimpleNamespace) -> None:
    """A placement in service with each GPU's slots permuted has the fresh plan's balance: moelb
    keeps it as it is (nothing moves) unless told to plan from scratch."""
    logical_count = steps(6, 1, 3, 16)[0]
    fresh = moelb.rebalance(logical_count, 24, 4, 2, 8, "moelb").location.physical_to_logical
    in_service = fresh.reshape(3, 8, 3)[:, :, ::-1].reshape(3, 24).copy()
    assert not (in_service == fresh).all()
    serve(sglang, torch.from_numpy(in_service).long())
    adapter.install()
    kept = init_by_eplb(sglang, "moelb", 4, logical_count.tolist())
    assert (kept[0].numpy() == in_service).all()
    adapter.install(previous_from_engine=False)
    replanned = init_by_eplb(sglang, "moelb", 4, logical_count.tolist())
    assert (replanned[0].numpy() == fresh).all()


def test_placement_in_service_of_another_shape_is_not_used(sglang: SimpleNamespace) -> None:
    logical_count = steps(6, 1, 3, 16)[0]
    fresh = moelb.rebalance(logical_count, 24, 4, 2, 8, "moelb").location.physical_to_logical
    trivial = torch.arange(32).repeat(3, 1) % 16  # 32 slots: another redundant count
    serve(sglang, trivial)
    adapter.install()
    result = init_by_eplb(sglang, "moelb", 4, logical_count.tolist())
    assert (result[0].numpy() == fresh).all()


def test_install_without_sglang(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules: `import sglang` fails, as without SGLang (whether or not this
    # environment has it: tests/integrations/install_real_engines.sh installs it).
    monkeypatch.setitem(sys.modules, "sglang", None)
    with pytest.raises(EngineNotFoundError, match="SGLang is not installed"):
        adapter.install()


def test_install_with_an_sglang_that_fails_to_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SGLang installed without a module its package imports (on a machine without a GPU stack:
    triton): an EngineNotFoundError naming SGLang and the missing module."""
    (tmp_path / "sglang").mkdir()
    (tmp_path / "sglang" / "__init__.py").write_text("import moelb_test_no_such_module\n")
    for name in [n for n in sys.modules if n == "sglang" or n.startswith("sglang.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(
        EngineNotFoundError,
        match="SGLang is installed but `import sglang` failed: No module named "
        "'moelb_test_no_such_module'",
    ):
        adapter.install()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            lambda m: m.__dict__.pop("EplbAlgorithm"),
            "EplbAlgorithm is not an Enum",
        ),
        (
            lambda m: setattr(m, "rebalance_experts", lambda weight, num_replicas: None),
            r"rebalance_experts takes \('weight', 'num_replicas'\)",
        ),
        (
            lambda m: m.__dict__.pop("compute_algorithm"),
            "has no function compute_algorithm",
        ),
    ],
    ids=["no-enum", "other-signature", "no-compute-algorithm"],
)
def test_install_refuses_another_layout(
    sglang: SimpleNamespace, change: object, match: str
) -> None:
    module = sglang.algorithms
    change(module)  # type: ignore[operator]
    before = dict(vars(module))
    with pytest.raises(EngineLayoutError, match=match):
        adapter.install()
    assert dict(vars(module)) == before  # nothing patched
    assert adapter.installed_options() is None


def test_install_refuses_a_direct_import(sglang: SimpleNamespace) -> None:
    """expert_location holding rebalance_experts itself (from-import) would bypass the patch."""
    sglang.location.rebalance_experts = sglang.algorithms.rebalance_experts
    with pytest.raises(EngineLayoutError, match=r"does not call .* through the module"):
        adapter.install()
    assert not hasattr(sglang.algorithms.rebalance_experts, "__moelb_original__")


def _init_by_eplb_importing_the_function(model_config, logical_count, *, use_flat_topology=False):  # type: ignore[no-untyped-def]
    from sglang.srt.eplb.eplb_algorithms import rebalance_experts  # a copy: misses the patch

    return rebalance_experts(logical_count, 24, 3, 4, 2, None)


def _init_by_eplb_not_planning(model_config, logical_count, *, use_flat_topology=False):  # type: ignore[no-untyped-def]
    return logical_count


@pytest.mark.parametrize(
    ("caller", "match"),
    [
        (_init_by_eplb_importing_the_function, "init_by_eplb imports rebalance_experts itself"),
        (_init_by_eplb_not_planning, "init_by_eplb does not call rebalance_experts"),
        (None, "it has no ExpertLocationMetadata.init_by_eplb"),
    ],
    ids=["from-import-in-body", "no-call", "no-caller"],
)
def test_install_refuses_a_caller_the_patch_misses(
    sglang: SimpleNamespace, monkeypatch: pytest.MonkeyPatch, caller: object, match: str
) -> None:
    """SGLang 0.5.23's ExpertLocationMetadata.init_by_eplb imports eplb_algorithms in its body and
    reads rebalance_experts from it at call time (accepted: every other test here); a body that
    binds the function itself, or no planning call, is refused before anything is patched."""
    metadata = sglang.location.ExpertLocationMetadata
    if caller is None:
        monkeypatch.delattr(metadata, "init_by_eplb")
    else:
        monkeypatch.setattr(metadata, "init_by_eplb", staticmethod(caller))
    with pytest.raises(EngineLayoutError, match=match):
        adapter.install()
    assert not hasattr(sglang.algorithms.rebalance_experts, "__moelb_original__")
    assert "moelb" not in sglang.algorithms.EplbAlgorithm.__members__


def test_install_option_errors(sglang: SimpleNamespace) -> None:
    with pytest.raises(moelb.InvalidArgumentError, match="unknown option"):
        adapter.install(previous=None)
    with pytest.raises(moelb.InvalidArgumentError, match="locality='far' is not a locality"):
        adapter.install(locality="far")
    with pytest.raises(moelb.InvalidArgumentError, match="move_cost must be finite"):
        adapter.install(move_cost=-1.0)
    with pytest.raises(moelb.InvalidArgumentError, match="a value has the wrong type"):
        adapter.install(max_moves="many")
    # MOELB_SGLANG_OPTIONS='{"previous_from_engine": "false"}': a string, not JSON's false;
    # read as a truth value it would silently keep planning against the placement in service.
    for value in ("false", 0, None):
        with pytest.raises(moelb.InvalidArgumentError, match="previous_from_engine must be"):
            adapter.install(previous_from_engine=value)
    assert not hasattr(sglang.algorithms.rebalance_experts, "__moelb_original__")


def test_launcher_patches_spawned_processes(tmp_path: Path) -> None:
    """python -m moelb.integrations.sglang_launch runs SGLang's entry point; the scheduler
    process it spawns plans a logical_count file with moelb (--eplb-algorithm moelb)."""
    fake_engines.write(tmp_path / "site", fake_engines.SGLANG)
    logical_count = steps(7, 1, 3, 16)[0]
    out = tmp_path / "result.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(tmp_path / "site"), *filter(None, [env.get("PYTHONPATH")])]
    )
    env["MOELB_SGLANG_OPTIONS"] = '{"locality": "none"}'
    command = [
        sys.executable,
        "-m",
        "moelb.integrations.sglang_launch",
        "--out",
        str(out),
        "--logical-count",
        json.dumps(logical_count.tolist()),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["patched"] is True
    plan = moelb.rebalance(logical_count, 20, 2, 2, 4, "moelb", locality="none")
    assert result["physical_to_logical_map"] == plan.location.physical_to_logical.tolist()


def test_launcher_without_sglang_is_a_one_line_error() -> None:
    # `python -m moelb.integrations.sglang_launch --model-path x` where `import sglang` fails
    # (None in sys.modules), whether or not this environment has SGLang.
    run_launcher = (
        "import runpy, sys; sys.modules['sglang'] = None; "
        "runpy.run_module('moelb.integrations.sglang_launch', run_name='__main__')"
    )
    done = subprocess.run(
        [sys.executable, "-c", run_launcher, "--model-path", "x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "moelb.integrations.sglang_launch: SGLang is not installed in this Python environment "
        "(import sglang failed): moelb.integrations.sglang.install() patches SGLang 0.5.23's "
        "sglang.srt.eplb.eplb_algorithms"
    ]
