"""moelb.integrations.vllm: vLLM 0.33's ``AbstractEplbPolicy`` contract (reference/integrations.md)
and ``install()``, against fake vLLM modules (tests/python/fake_engines.py; vLLM is not installed
in CI).

- ``MoelbEplbPolicy.rebalance_experts``: ``physical_to_logical_map`` [L, P] int64 on the CPU
  whatever the weight's device (as vLLM's default policy; its async worker asserts it), every
  expert placed, moelb's plan; ``old_global_expert_indices`` honoured through
  ``previous`` (a placement of the plan's balance is kept as it is; one of another shape is not
  used); the divisibility vLLM's default policy asserts as ``AssertionError``.
- ``install()``: replaces the registry's ``"default"`` entry with a subclass of the policy and of
  vLLM's ``AbstractEplbPolicy``, idempotently; vLLM's call path (``eplb_state``) reaches moelb;
  a missing vLLM or another contract is refused without a change; the launcher installs it in a
  worker vLLM spawns.
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
from moelb.integrations.vllm import MoelbEplbPolicy, install  # noqa: E402

POLICY_MODULE = "vllm.distributed.eplb.policy"


def weight(seed: int, num_layers: int, num_experts: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.permutation(num_layers * num_experts).reshape(num_layers, num_experts) * 5 + 10


def check_map(phy2log: torch.Tensor, num_layers: int, num_experts: int, num_slots: int) -> None:
    assert isinstance(phy2log, torch.Tensor) and phy2log.dtype == torch.int64
    assert tuple(phy2log.shape) == (num_layers, num_slots)
    for row in phy2log.numpy():
        assert (np.bincount(row, minlength=num_experts) >= 1).all()  # every expert placed
        assert row.max() < num_experts


@pytest.mark.parametrize(
    ("num_slots", "num_groups", "num_nodes", "num_ranks"),
    [(24, 4, 2, 8), (16, 1, 1, 4), (20, 4, 1, 4), (32, 3, 2, 8), (16, 4, 2, 16)],
)
def test_contract(num_slots: int, num_groups: int, num_nodes: int, num_ranks: int) -> None:
    load = weight(num_slots, 3, 16)
    phy2log = MoelbEplbPolicy.rebalance_experts(
        torch.from_numpy(load), num_slots, num_groups, num_nodes, num_ranks
    )
    check_map(phy2log, 3, 16, num_slots)
    assert phy2log.device == torch.device("cpu")
    plan = moelb.rebalance(load, num_slots, num_groups, num_nodes, num_ranks, "moelb")
    assert (phy2log.numpy() == plan.location.physical_to_logical).all()


class WindowOnAccelerator:
    """A load window held on an accelerator, as far as the policy can tell: ``device`` names a
    CUDA device and ``detach()`` gives the values (copied to the host, as ``.cpu()`` would)."""

    device = torch.device("cuda", 0)

    def __init__(self, values: torch.Tensor) -> None:
        self.values = values

    def detach(self) -> torch.Tensor:
        return self.values


@pytest.mark.parametrize("on_accelerator", ["duck-typed", "cuda"])
def test_map_is_on_the_cpu_whatever_the_weight_device(on_accelerator: str) -> None:
    """vLLM's DefaultEplbPolicy returns ``torch.from_numpy(...)``, a CPU tensor, and vLLM's async
    worker asserts ``new_physical_to_logical_map.device == torch.device("cpu")``: a map moved to
    the weight's device would break that path."""
    load = torch.from_numpy(weight(4, 3, 16))
    if on_accelerator == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        window = load.cuda()
    else:
        window = WindowOnAccelerator(load)
    phy2log = MoelbEplbPolicy.rebalance_experts(window, 24, 4, 2, 8)
    assert phy2log.device == torch.device("cpu")
    plan = moelb.rebalance(load.numpy(), 24, 4, 2, 8, "moelb")
    assert (phy2log.numpy() == plan.location.physical_to_logical).all()


def test_old_placement_is_kept_when_it_is_as_good() -> None:
    load = torch.from_numpy(weight(1, 3, 16))
    fresh = MoelbEplbPolicy.rebalance_experts(load, 24, 4, 2, 8)
    in_service = fresh.reshape(3, 8, 3).flip(2).reshape(3, 24).contiguous()
    assert not torch.equal(in_service, fresh)
    kept = MoelbEplbPolicy.rebalance_experts(
        load, 24, 4, 2, 8, old_global_expert_indices=in_service
    )
    assert torch.equal(kept, in_service)


def test_old_placement_follows_a_shift_with_fewer_moves() -> None:
    """When the load shifts, moelb re-plans against the map in service and rewrites fewer slots
    than planning from scratch, for a placement as balanced."""
    before = weight(2, 4, 32)
    after = before.copy()
    after[:, :4] *= 6  # four experts get hot
    old = MoelbEplbPolicy.rebalance_experts(torch.from_numpy(before), 48, 4, 2, 8)
    fresh = MoelbEplbPolicy.rebalance_experts(torch.from_numpy(after), 48, 4, 2, 8)
    moved = MoelbEplbPolicy.rebalance_experts(
        torch.from_numpy(after), 48, 4, 2, 8, old_global_expert_indices=old
    )
    check_map(moved, 4, 32, 48)
    assert int((moved != old).sum()) < int((fresh != old).sum())
    location = moelb.ExpertLocation(moved.numpy().astype(np.int32), 32, 8, 2)
    fresh_location = moelb.ExpertLocation(fresh.numpy().astype(np.int32), 32, 8, 2)
    ours = moelb.evaluate_placement(after, location).balancedness
    assert ours >= moelb.evaluate_placement(after, fresh_location).balancedness - 0.01


def test_old_placement_of_another_shape_is_not_used() -> None:
    load = torch.from_numpy(weight(3, 2, 16))
    fresh = MoelbEplbPolicy.rebalance_experts(load, 24, 4, 2, 8)
    for old in (torch.arange(32).repeat(2, 1) % 16, torch.full((2, 24), -1)):
        assert torch.equal(
            MoelbEplbPolicy.rebalance_experts(load, 24, 4, 2, 8, old_global_expert_indices=old),
            fresh,
        )


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((25, 4, 2, 8), "num_replicas=25 is not a multiple of num_ranks=8"),
        ((8, 4, 2, 8), "num_replicas=8 is smaller than the 16 logical experts"),
    ],
)
def test_asserts_as_vllm(args: tuple, match: str) -> None:
    with pytest.raises(AssertionError, match=match) as info:
        MoelbEplbPolicy.rebalance_experts(torch.from_numpy(weight(0, 2, 16)), *args)
    assert isinstance(info.value, moelb.InvalidArgumentError)


def test_bad_input() -> None:
    with pytest.raises(moelb.InvalidArgumentError, match=r"weight must have shape \[num_layers"):
        MoelbEplbPolicy.rebalance_experts(torch.ones(16), 16, 1, 1, 4)
    with pytest.raises(moelb.InvalidArgumentError, match="num_ranks must be a positive integer"):
        MoelbEplbPolicy.rebalance_experts(torch.ones(2, 16), 16, 1, 1, 0)
    with pytest.raises(moelb.InvalidArgumentError, match=r"weight\[1, 3\] = inf"):
        load = torch.ones(2, 16)
        load[1, 3] = float("inf")
        MoelbEplbPolicy.rebalance_experts(load, 16, 1, 1, 4)


# ---------------------------------------------------------------------------------------------
# install()
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def vllm(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    modules = fake_engines.inject(monkeypatch, fake_engines.VLLM)
    return SimpleNamespace(
        policy=modules[POLICY_MODULE],
        default=modules[POLICY_MODULE + ".default"],
        state=modules["vllm.distributed.eplb.eplb_state"],
    )


def test_install_replaces_the_default_entry(vllm: SimpleNamespace) -> None:
    replaced = vllm.policy.EPLB_POLICIES["default"]
    install()
    registered = vllm.policy.EPLB_POLICIES["default"]
    assert set(vllm.policy.EPLB_POLICIES) == {"default"}  # still the one name vLLM accepts
    assert issubclass(registered, MoelbEplbPolicy)
    assert issubclass(registered, vllm.policy.AbstractEplbPolicy)
    assert registered.replaced is replaced
    assert not getattr(registered, "__abstractmethods__", None)  # a concrete policy


def test_install_is_idempotent(vllm: SimpleNamespace) -> None:
    install()
    registered = vllm.policy.EPLB_POLICIES["default"]
    install(locality="none")
    assert vllm.policy.EPLB_POLICIES["default"] is registered
    assert registered.options == {"locality": "none"}
    assert MoelbEplbPolicy.options == {}  # the standalone class is untouched


RELOAD_SCRIPT = """
import importlib, json, sys
import moelb.integrations.vllm as adapter
from vllm.distributed.eplb import policy
from vllm.distributed.eplb.policy.default import DefaultEplbPolicy

adapter.install()
adapter = importlib.reload(adapter)
adapter.install(locality="none")
registered = policy.EPLB_POLICIES["default"]
json.dump(
    {
        "replaced_is_vllms": registered.replaced is DefaultEplbPolicy,
        "current_class": issubclass(registered, adapter.MoelbEplbPolicy),
        "options": registered.options,
    },
    sys.stdout,
)
"""


def test_install_after_a_reload_keeps_vllms_policy_as_replaced(tmp_path: Path) -> None:
    """install() again after importlib.reload(moelb.integrations.vllm) registers the reloaded
    class and keeps vLLM's DefaultEplbPolicy as ``replaced`` (not the earlier moelb class).
    In a subprocess: a reload here would leave this test module with stale classes."""
    fake_engines.write(tmp_path / "site", fake_engines.VLLM)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(tmp_path / "site"), *filter(None, [env.get("PYTHONPATH")])]
    )
    done = subprocess.run(
        [sys.executable, "-c", RELOAD_SCRIPT], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "replaced_is_vllms": True,
        "current_class": True,
        "options": {"locality": "none"},
    }


def test_call_path_reaches_moelb(vllm: SimpleNamespace) -> None:
    install(locality="none")
    load = torch.from_numpy(weight(4, 3, 16))
    result = vllm.state.rearrange("default", load, 24, 4, 2, 8)
    check_map(result, 3, 16, 24)
    plan = moelb.rebalance(load.numpy(), 24, 4, 2, 8, "moelb", locality="none")
    assert (result.numpy() == plan.location.physical_to_logical).all()
    assert vllm.default.CALLS == []  # vLLM's default policy did not plan
    # vLLM's caller forces num_nodes to 1 when the ranks do not divide into the nodes.
    result = vllm.state.rearrange("default", load, 24, 4, 3, 8)
    plan = moelb.rebalance(load.numpy(), 24, 4, 1, 8, "moelb", locality="none")
    assert (result.numpy() == plan.location.physical_to_logical).all()


def test_install_without_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules: `import vllm` fails, as without vLLM (whether or not this environment
    # has it: tests/integrations/install_real_engines.sh installs it).
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(EngineNotFoundError, match="vLLM is not installed"):
        install()


def test_install_with_a_vllm_that_fails_to_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM installed without a module its package imports: an EngineNotFoundError naming vLLM
    and the missing module."""
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text("import moelb_test_no_such_module\n")
    for name in [n for n in sys.modules if n == "vllm" or n.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(
        EngineNotFoundError,
        match="vLLM is installed but `import vllm` failed: No module named "
        "'moelb_test_no_such_module'",
    ):
        install()


def test_install_refuses_the_triple_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM before 0.33: rebalance_experts returns (phy2log, log2phy, logcnt)."""
    sources = dict(fake_engines.VLLM)
    sources[POLICY_MODULE + ".abstract"] = sources[POLICY_MODULE + ".abstract"].replace(
        "old_global_expert_indices=None,\n            ):",
        "old_global_expert_indices=None,\n            ) -> tuple[int, int, int]:",
    )
    modules = fake_engines.inject(monkeypatch, sources)
    registry = modules[POLICY_MODULE].EPLB_POLICIES
    before = dict(registry)
    with pytest.raises(EngineLayoutError, match="returns tuple"):
        install()
    assert registry == before


def test_install_refuses_another_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    sources = dict(fake_engines.VLLM)
    sources[POLICY_MODULE + ".abstract"] = sources[POLICY_MODULE + ".abstract"].replace(
        "                old_global_expert_indices=None,\n", ""
    )
    modules = fake_engines.inject(monkeypatch, sources)
    registry = modules[POLICY_MODULE].EPLB_POLICIES
    with pytest.raises(EngineLayoutError, match=r"AbstractEplbPolicy\.rebalance_experts takes"):
        install()
    assert registry["default"] is modules[POLICY_MODULE + ".default"].DefaultEplbPolicy


def test_install_refuses_a_missing_registry(vllm: SimpleNamespace) -> None:
    del vllm.policy.EPLB_POLICIES
    with pytest.raises(EngineLayoutError, match="EPLB_POLICIES has no 'default' entry"):
        install()


def test_install_unknown_option(vllm: SimpleNamespace) -> None:
    with pytest.raises(moelb.InvalidArgumentError, match="unknown option"):
        install(objective="step_peak")
    with pytest.raises(moelb.InvalidArgumentError, match="dispatch='fast' is not a dispatch"):
        install(dispatch="fast")
    assert vllm.policy.EPLB_POLICIES["default"].__name__ == "DefaultEplbPolicy"


def test_launcher_installs_in_spawned_workers(tmp_path: Path) -> None:
    """python -m moelb.integrations.vllm_launch serve ...: the worker vLLM spawns plans with
    moelb."""
    fake_engines.write(tmp_path / "site", fake_engines.VLLM)
    load = weight(5, 2, 16)
    out = tmp_path / "result.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(tmp_path / "site"), *filter(None, [env.get("PYTHONPATH")])]
    )
    command = [
        sys.executable,
        "-m",
        "moelb.integrations.vllm_launch",
        "serve",
        "--out",
        str(out),
        "--weight",
        json.dumps(load.tolist()),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["policy"] == "moelb.integrations.vllm"
    plan = moelb.rebalance(load, 16, 2, 2, 4, "moelb")
    assert result["physical_to_logical_map"] == plan.location.physical_to_logical.tolist()


def test_launcher_with_a_bad_option_is_a_one_line_error(tmp_path: Path) -> None:
    fake_engines.write(tmp_path / "site", fake_engines.VLLM)
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"), MOELB_VLLM_OPTIONS='{"x": 1}')
    done = subprocess.run(
        [sys.executable, "-m", "moelb.integrations.vllm_launch", "serve"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown option(s) 'x'" in lines[0], done.stderr
