"""Fake SGLang and vLLM modules for the integration tests (the engines are not installed in CI).

Each fake holds only what ``reference/integrations.md`` says moelb's ``install()`` touches, laid
out as in SGLang 0.5.23 and vLLM 0.33.0, plus the engine's call path into it (SGLang's
``ExpertLocationMetadata.init_by_eplb``, vLLM's policy lookup in ``eplb_state``) and, for the
launcher tests, an entry point that starts a process with ``multiprocessing`` ``spawn`` and runs
that call path there. The engines' own algorithms are stand-ins that record their calls and
return a marker, so a test can tell which function planned.

``inject(monkeypatch, SGLANG)`` puts the modules into ``sys.modules`` (undone after the test);
``write(folder, SGLANG)`` writes them as files, for a subprocess whose ``PYTHONPATH`` holds
``folder``.
"""

from __future__ import annotations

import importlib.machinery
import sys
import textwrap
import types
from pathlib import Path

import pytest

SGLANG: dict[str, str] = {
    "sglang": '__version__ = "0.5.23"\n',
    "sglang.srt": "",
    "sglang.srt.eplb": "",
    # srt/eplb/eplb_algorithms/__init__.py: the closed enum, the dispatch function, auto.
    "sglang.srt.eplb.eplb_algorithms": """
        from enum import Enum, auto
        from typing import Optional

        CALLS = []


        class EplbAlgorithm(Enum):
            deepseek = auto()
            deepseek_hierarchical = auto()
            deepseek_vec = auto()
            deepseek_vec_hierarchical = auto()
            elasticity_aware = auto()
            elasticity_aware_hierarchical = auto()


        def rebalance_experts(
            tokens_per_expert,
            num_physical_experts: int,
            num_local_physical_experts: int,
            num_groups: Optional[int],
            num_nodes: int,
            algorithm: EplbAlgorithm,
        ):
            CALLS.append((num_physical_experts, num_local_physical_experts, num_groups,
                          num_nodes, algorithm))
            if algorithm in list(EplbAlgorithm):
                return ("sglang", algorithm.name)
            raise NotImplementedError


        def compute_algorithm(raw_algorithm: str, num_groups: Optional[int], num_nodes: int):
            if raw_algorithm != "auto":
                return EplbAlgorithm[raw_algorithm]
            if (num_groups is not None) and (num_groups % num_nodes == 0):
                return EplbAlgorithm.deepseek_hierarchical
            return EplbAlgorithm.deepseek
    """,
    # srt/runtime_context.py: the resolved config init_by_eplb reads and the process's resources
    # (the location metadata in service). SGLang publishes them from its ServerArgs; the fake's
    # configure() (not SGLang's) sets the four fields init_by_eplb reads, under SGLang's names.
    "sglang.srt.runtime_context": """
        from types import SimpleNamespace

        _exec = SimpleNamespace(
            moe=SimpleNamespace(eplb_algorithm="auto", ep_num_redundant_experts=0)
        )
        _parallel = SimpleNamespace(ep_size=1, nnodes=1)
        _resources = SimpleNamespace(expert_location_metadata=None)


        def configure(eplb_algorithm, ep_num_redundant_experts, ep_size, nnodes):
            _exec.moe.eplb_algorithm = eplb_algorithm
            _exec.moe.ep_num_redundant_experts = ep_num_redundant_experts
            _parallel.ep_size = ep_size
            _parallel.nnodes = nnodes


        def get_exec():
            return _exec


        def get_parallel():
            return _parallel


        def get_resources():
            return _resources
    """,
    # srt/eplb/expert_location.py: init_by_eplb's call into the module (imported in its body, as
    # 0.5.23 does), the metadata in service. The fake's init_by_eplb returns the algorithm's
    # triple where SGLang's builds an ExpertLocationMetadata from it, and reads num_groups from
    # model_config where SGLang derives it from the model's architecture.
    "sglang.srt.eplb.expert_location": """
        from sglang.srt.runtime_context import get_exec, get_parallel, get_resources


        class ExpertLocationMetadata:
            @staticmethod
            def init_by_eplb(model_config, logical_count, *, use_flat_topology=False):
                import torch

                if not isinstance(logical_count, torch.Tensor):
                    logical_count = torch.tensor(logical_count)
                if len(logical_count.shape) == 2:
                    logical_count = logical_count.unsqueeze(0)
                num_physical_experts = (
                    logical_count.shape[-1] + get_exec().moe.ep_num_redundant_experts
                )
                num_groups = model_config.num_groups
                num_nodes = 1 if use_flat_topology else get_parallel().nnodes

                from sglang.srt.eplb import eplb_algorithms

                return eplb_algorithms.rebalance_experts(
                    tokens_per_expert=logical_count,
                    num_physical_experts=num_physical_experts,
                    num_local_physical_experts=num_physical_experts // get_parallel().ep_size,
                    num_groups=num_groups,
                    num_nodes=num_nodes,
                    algorithm=eplb_algorithms.compute_algorithm(
                        raw_algorithm=get_exec().moe.eplb_algorithm,
                        num_groups=num_groups,
                        num_nodes=num_nodes,
                    ),
                )


        def get_global_expert_location_metadata():
            return get_resources().expert_location_metadata


        def set_global_expert_location_metadata(value, allow_overwrite=False):
            resources = get_resources()
            if not allow_overwrite:
                assert resources.expert_location_metadata is None
            resources.expert_location_metadata = value
    """,
    # A scheduler process: runs the start-up plan of a logical_count file in a spawned process.
    "sglang.srt.scheduler": """
        import json
        from types import SimpleNamespace


        def run_scheduler_process(out_path, logical_count):
            from sglang.srt import runtime_context
            from sglang.srt.eplb import eplb_algorithms, expert_location

            runtime_context.configure(
                eplb_algorithm="moelb", ep_num_redundant_experts=4, ep_size=4, nnodes=2
            )
            result = expert_location.ExpertLocationMetadata.init_by_eplb(
                SimpleNamespace(num_groups=2), logical_count
            )
            with open(out_path, "w") as f:
                json.dump(
                    {
                        "patched": hasattr(eplb_algorithms.rebalance_experts,
                                           "__moelb_original__"),
                        "physical_to_logical_map": result[0].tolist(),
                    },
                    f,
                )
    """,
    # python -m sglang.launch_server: the server's entry point, which spawns a scheduler.
    "sglang.launch_server": """
        import json
        import multiprocessing as mp
        import sys

        from sglang.srt.scheduler import run_scheduler_process

        if __name__ == "__main__":
            argv = sys.argv[1:]
            out_path = argv[argv.index("--out") + 1]
            logical_count = json.loads(argv[argv.index("--logical-count") + 1])
            process = mp.get_context("spawn").Process(
                target=run_scheduler_process, args=(out_path, logical_count)
            )
            process.start()
            process.join()
            sys.exit(process.exitcode)
    """,
}

VLLM: dict[str, str] = {
    "vllm": '__version__ = "0.33.0"\n',
    "vllm.config": "",
    "vllm.config.parallel": """
        from typing import Literal

        EPLBPolicyOption = Literal["default"]
    """,
    "vllm.distributed": "",
    "vllm.distributed.eplb": "",
    # distributed/eplb/policy/{abstract,default,__init__}.py
    "vllm.distributed.eplb.policy.abstract": """
        from abc import ABC, abstractmethod


        class AbstractEplbPolicy(ABC):
            @classmethod
            @abstractmethod
            def rebalance_experts(
                cls,
                weight,
                num_replicas: int,
                num_groups: int,
                num_nodes: int,
                num_ranks: int,
                old_global_expert_indices=None,
            ):
                raise NotImplementedError
    """,
    "vllm.distributed.eplb.policy.default": """
        from .abstract import AbstractEplbPolicy

        CALLS = []


        class DefaultEplbPolicy(AbstractEplbPolicy):
            @classmethod
            def rebalance_experts(cls, weight, num_replicas, num_groups, num_nodes, num_ranks,
                                  old_global_expert_indices=None):
                CALLS.append((num_replicas, num_groups, num_nodes, num_ranks))
                return "vllm-default"
    """,
    "vllm.distributed.eplb.policy": """
        from typing import get_args

        from vllm.config.parallel import EPLBPolicyOption

        from .abstract import AbstractEplbPolicy
        from .default import DefaultEplbPolicy

        EPLB_POLICIES = {"default": DefaultEplbPolicy}

        assert set(EPLB_POLICIES.keys()) == set(get_args(EPLBPolicyOption))

        __all__ = ["AbstractEplbPolicy", "DefaultEplbPolicy", "EPLB_POLICIES"]
    """,
    # eplb_state.py: the rearrangement's call into the configured policy.
    "vllm.distributed.eplb.eplb_state": """
        from vllm.distributed.eplb.policy import EPLB_POLICIES


        def rearrange(policy, weight, num_replicas, num_groups, num_nodes, num_ranks,
                      old_global_expert_indices=None):
            if num_ranks % num_nodes != 0:
                num_nodes = 1
            return EPLB_POLICIES[policy].rebalance_experts(
                weight, num_replicas, num_groups, num_nodes, num_ranks,
                old_global_expert_indices=old_global_expert_indices,
            )
    """,
    # A worker process: one rearrangement in a spawned process.
    "vllm.worker": """
        import json


        def run_worker(out_path, weight):
            import torch

            from vllm.distributed.eplb import eplb_state
            from vllm.distributed.eplb.policy import EPLB_POLICIES

            result = eplb_state.rearrange("default", torch.tensor(weight), 16, 2, 2, 4)
            with open(out_path, "w") as f:
                json.dump(
                    {
                        "policy": EPLB_POLICIES["default"].__module__,
                        "physical_to_logical_map": result.tolist(),
                    },
                    f,
                )
    """,
    "vllm.entrypoints": "",
    "vllm.entrypoints.cli": "",
    # The `vllm` command: `serve` spawns a worker.
    "vllm.entrypoints.cli.main": """
        import json
        import multiprocessing as mp
        import sys

        from vllm.worker import run_worker


        def main():
            argv = sys.argv[1:]
            assert argv[0] == "serve", argv
            out_path = argv[argv.index("--out") + 1]
            weight = json.loads(argv[argv.index("--weight") + 1])
            process = mp.get_context("spawn").Process(target=run_worker, args=(out_path, weight))
            process.start()
            process.join()
            sys.exit(process.exitcode)


        if __name__ == "__main__":
            main()
    """,
}


def _is_package(name: str, sources: dict[str, str]) -> bool:
    return any(other.startswith(name + ".") for other in sources)


def inject(monkeypatch: pytest.MonkeyPatch, sources: dict[str, str]) -> dict[str, types.ModuleType]:
    """Creates the modules of ``sources`` in ``sys.modules`` (parents first), each with a spec,
    so that ``importlib`` finds them as installed, and runs their code in the listing's order;
    ``monkeypatch`` removes them after the test. Returns them by name."""
    modules: dict[str, types.ModuleType] = {}
    for name in sorted(sources, key=lambda n: n.count(".")):
        package = _is_package(name, sources)
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=package)
        if package:
            module.__path__ = []
        module.__package__ = name if package else name.rpartition(".")[0]
        monkeypatch.setitem(sys.modules, name, module)
        parent, _, child = name.rpartition(".")
        if parent:
            monkeypatch.setattr(modules[parent], child, module, raising=False)
        modules[name] = module
    for name in sources:  # in the listing's order: a module after those it imports
        exec(compile(textwrap.dedent(sources[name]), f"<fake {name}>", "exec"), vars(modules[name]))
    return modules


def write(folder: Path, sources: dict[str, str]) -> None:
    """Writes ``sources`` as a package tree under ``folder``."""
    for name, source in sources.items():
        parts = name.split(".")
        if _is_package(name, sources):
            path = folder.joinpath(*parts, "__init__.py")
        else:
            path = folder.joinpath(*parts[:-1], parts[-1] + ".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
