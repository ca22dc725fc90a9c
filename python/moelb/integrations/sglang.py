"""moelb inside SGLang (0.5.23's ``sglang.srt.eplb.eplb_algorithms``; reference/integrations.md).

- ``rebalance_experts(tokens_per_expert, num_physical_experts, num_local_physical_experts,
  num_groups, num_nodes, algorithm)``: SGLang's dispatch function's signature and return triple,
  planned by moelb (``"moelb"``) or by moelb's port of DeepSeek's algorithm (``"deepseek"``: the
  global policy, ``"deepseek_hierarchical"``), as SGLang's ``deepseek`` algorithms plan.
- ``install()``: patches the running SGLang so that ``--eplb-algorithm moelb`` plans with moelb,
  both the start-up plan of a ``logical_count`` file (``--init-expert-location``) and every
  runtime rebalance (``--enable-eplb``). Exactly two changes, both in
  ``sglang.srt.eplb.eplb_algorithms`` (SGLang has no registry: this module's enum and dispatch
  function are the only way in):

  1. ``EplbAlgorithm`` gains a member ``moelb``, so ``EplbAlgorithm["moelb"]`` (what
     ``compute_algorithm("moelb", ...)`` returns for ``--eplb-algorithm moelb``) resolves;
  2. ``rebalance_experts`` becomes a wrapper: ``algorithm=EplbAlgorithm.moelb`` plans with
     ``moelb.integrations.sglang.rebalance_experts``, every other algorithm calls SGLang's own
     function, unchanged. During a runtime rebalance the placement in service
     (``sglang.srt.eplb.expert_location.get_global_expert_location_metadata()``) is moelb's
     ``previous``: experts that stay keep their slots, and a layer is re-placed only when its
     gain pays for its moves (``move_cost``).

  ``--eplb-algorithm auto`` and every SGLang algorithm are left as they were. Calling
  ``install()`` again changes nothing but the options. SGLang starts its schedulers in processes
  of their own (``spawn``), where a patch made in the parent is absent: run SGLang through
  ``python -m moelb.integrations.sglang_launch`` (which patches every process it starts), or call
  ``install()`` at the top level of your own ``__main__`` module, outside the ``if __name__ ==
  "__main__"`` block, so that spawned processes, which re-run that module, patch themselves.
"""

from __future__ import annotations

import enum
import importlib
import importlib.util
import inspect
import logging
import sys
import threading
from typing import Any

import numpy as np

from .._core import InvalidArgumentError
from ._common import (
    EngineLayoutError,
    EngineNotFoundError,
    as_previous,
    check_call_options,
    check_rebalance_options,
    import_torch,
    loads_array,
    names,
    positive_int,
    require,
)
from .deepseek import plan_deepseek_contract

__all__ = [
    "ALGORITHMS",
    "MOELB_OPTIONS",
    "SGLANG_VERSION",
    "install",
    "installed_options",
    "rebalance_experts",
]

logger = logging.getLogger(__name__)

#: The SGLang release whose module layout ``install()`` patches (``reference/integrations.md``).
SGLANG_VERSION = "0.5.23"
#: The module ``install()`` patches, and the names and parameters it needs there.
ALGORITHMS_MODULE = "sglang.srt.eplb.eplb_algorithms"
EXPERT_LOCATION_MODULE = "sglang.srt.eplb.expert_location"
REBALANCE_PARAMETERS = (
    "tokens_per_expert",
    "num_physical_experts",
    "num_local_physical_experts",
    "num_groups",
    "num_nodes",
    "algorithm",
)
COMPUTE_ALGORITHM_PARAMETERS = ("raw_algorithm", "num_groups", "num_nodes")
#: The ``algorithm`` names ``rebalance_experts`` plans (an ``EplbAlgorithm`` member or its name):
#: ``"moelb"`` (ours); ``"deepseek"`` and ``"deepseek_hierarchical"`` as SGLang's ``deepseek``
#: algorithms plan (DeepSeek's global and hierarchical policies).
ALGORITHMS = ("moelb", "deepseek", "deepseek_hierarchical")
#: Keywords passed on to ``moelb.rebalance`` under ``"moelb"`` (ours). ``objective="step_peak"``
#: plans against the [T, L, E] steps SGLang passes; ``previous``: the placement in service.
MOELB_OPTIONS = ("locality", "objective", "dispatch", "move_cost", "max_moves", "previous")
#: The options ``install()`` takes (``previous`` comes from SGLang itself).
INSTALL_OPTIONS = tuple(o for o in MOELB_OPTIONS if o != "previous")

_WRAPPER_MARK = "__moelb_original__"
_lock = threading.Lock()
_installed_options: dict[str, Any] | None = None


def _algorithm_name(algorithm: Any) -> str:
    name = algorithm.name if isinstance(algorithm, enum.Enum) else algorithm
    if name not in ALGORITHMS:
        raise InvalidArgumentError(
            f"algorithm={algorithm!r} is not one moelb plans; expected one of {names(ALGORITHMS)} "
            "(or the EplbAlgorithm member of that name)"
        )
    return str(name)


def rebalance_experts(
    tokens_per_expert: Any,
    num_physical_experts: int,
    num_local_physical_experts: int,
    num_groups: int | None,
    num_nodes: int,
    algorithm: Any,
    **options: Any,
) -> tuple[Any, Any, Any]:
    """SGLang's ``eplb_algorithms.rebalance_experts``, planned by moelb.

    tokens_per_expert: [T, L, E] logical counts per step (SGLang's ``logical_count``; a tensor
        on any device or an array-like; finite, >= 0). L counts every decoder layer, dense ones
        included (rows without load).
    num_physical_experts: P (E + redundant); num_local_physical_experts: S, slots per GPU, so
        ``P / S`` GPUs; num_groups: the model's expert groups, or None; num_nodes: nodes.
    algorithm: ``"moelb"`` (ours: ``moelb.rebalance`` of the counts summed over T, or of the steps
        with ``objective="step_peak"``; node locality when ``num_groups % num_nodes == 0``, a
        topology it cannot honour planned without it and logged), ``"deepseek"`` (DeepSeek's
        global policy) or ``"deepseek_hierarchical"`` (its hierarchical one), as SGLang's
        ``deepseek`` algorithms run them: the counts summed over T, then ``.float()``. An
        ``EplbAlgorithm`` member is read by its name.
    options: ``"moelb"`` only, ``MOELB_OPTIONS`` (ours).

    Returns int64 CPU tensors ``(physical_to_logical_map [L, P], logical_to_all_physical_map
    [L, E, X], expert_count [L, E])``, X = the largest replica count of the call (SGLang pads it
    to P itself); replica order as ``moelb.integrations.deepseek.rebalance_experts`` gives it
    (DeepSeek's creation order under the DeepSeek algorithms, with an expert's own replicas in
    a stable order where SGLang's ``deepseek.py`` uses torch's unstable sort; ascending slots
    under moelb), the order SGLang's runtime dispatch table follows.

    Raises ``EnginePreconditionError`` (an ``AssertionError``, as SGLang's DeepSeek code asserts,
    and an ``InvalidArgumentError``) when P is not a multiple of S or P < E, and under
    ``"deepseek_hierarchical"`` when ``E % num_groups``, ``num_groups % num_nodes`` or
    ``(P / S) % num_nodes`` is not 0; ``InvalidArgumentError`` naming the parameter otherwise.
    """
    torch = import_torch("moelb.integrations.sglang.rebalance_experts")
    name = _algorithm_name(algorithm)
    check_call_options(options, MOELB_OPTIONS, name)
    num_physical_experts = positive_int(num_physical_experts, "num_physical_experts")
    num_local = positive_int(num_local_physical_experts, "num_local_physical_experts")
    if num_groups is not None:
        num_groups = positive_int(num_groups, "num_groups")
    num_nodes = positive_int(num_nodes, "num_nodes")
    require(
        num_physical_experts % num_local == 0,
        f"num_physical_experts={num_physical_experts} is not a multiple of "
        f"num_local_physical_experts={num_local}",
    )
    num_gpus = num_physical_experts // num_local
    steps = name == "moelb" and (
        options.get("objective", "total") != "total"
        or options.get("dispatch", "equal_split") == "balanced"
    )
    load = loads_array(
        tokens_per_expert,
        "tokens_per_expert",
        "[num_steps, num_layers, num_logical_experts]",
        3,
        np.float64 if name == "moelb" else np.float32,
        sum_steps=not steps,
    )
    if name == "moelb":
        plan = plan_deepseek_contract(
            load, num_physical_experts, num_groups, num_nodes, num_gpus, "moelb", options
        )
    else:
        plan = plan_deepseek_contract(
            load,
            num_physical_experts,
            num_groups,
            num_nodes,
            num_gpus,
            "deepseek",
            {},
            hierarchical=name == "deepseek_hierarchical",
        )
    return tuple(torch.from_numpy(a) for a in plan)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# install()
# ---------------------------------------------------------------------------------------------


def installed_options() -> dict[str, Any] | None:
    """The options of the last ``install()`` in this process, or None before any."""
    with _lock:
        return None if _installed_options is None else dict(_installed_options)


def install(*, previous_from_engine: bool = True, **options: Any) -> None:
    """Patches the running SGLang so that ``--eplb-algorithm moelb`` plans with moelb (the
    module docstring lists the two changes). Idempotent: a second call only replaces the options.

    previous_from_engine: during a runtime rebalance, plan against the placement in service
        (moelb's ``previous``: fewer weight moves); False plans from scratch every time.
    options: ``moelb.rebalance`` keywords for every plan (``INSTALL_OPTIONS``): ``locality``,
        ``objective`` (``"step_peak"`` plans against the recorder's per-pass counts),
        ``dispatch``, ``move_cost``, ``max_moves``.

    Raises ``EngineNotFoundError`` (an ``ImportError``) without SGLang, ``EngineLayoutError``
    (an ``ImportError``) when SGLang's modules differ from 0.5.23's layout (nothing is patched
    then), ``InvalidArgumentError`` for an unknown option, a bad value or a
    ``previous_from_engine`` that is not a bool.
    """
    global _installed_options
    if not isinstance(previous_from_engine, bool):  # "false" from a JSON string would be true
        raise InvalidArgumentError(
            f"previous_from_engine must be true or false, got {previous_from_engine!r}"
        )
    check_rebalance_options(options, INSTALL_OPTIONS, "install()")
    module = _algorithms_module()
    with _lock:
        enum_class = module.EplbAlgorithm
        if "moelb" not in enum_class.__members__:
            _add_member(enum_class, "moelb")
        current = module.rebalance_experts
        if getattr(current, _WRAPPER_MARK, None) is None:
            module.rebalance_experts = _make_wrapper(module, current)
        _installed_options = dict(options, previous_from_engine=previous_from_engine)


def _algorithms_module() -> Any:
    """SGLang's ``eplb_algorithms`` module once it has the names and parameters install() uses,
    else EngineNotFoundError / EngineLayoutError naming what is missing."""
    if importlib.util.find_spec("sglang") is None:
        raise EngineNotFoundError(
            "SGLang is not installed in this Python environment (import sglang failed): "
            f"moelb.integrations.sglang.install() patches SGLang {SGLANG_VERSION}'s "
            f"{ALGORITHMS_MODULE}"
        )
    try:
        version = getattr(importlib.import_module("sglang"), "__version__", "unknown")
    except ImportError as e:  # installed, but a module `import sglang` needs is missing
        raise EngineNotFoundError(
            f"SGLang is installed but `import sglang` failed: {e}: "
            f"moelb.integrations.sglang.install() patches SGLang {SGLANG_VERSION}'s "
            f"{ALGORITHMS_MODULE} in the environment SGLang runs in"
        ) from None
    where = f"SGLang {version} (moelb patches the layout of SGLang {SGLANG_VERSION})"
    try:
        module = importlib.import_module(ALGORITHMS_MODULE)
    except ImportError as e:
        raise EngineLayoutError(f"{where}: cannot import {ALGORITHMS_MODULE}: {e}") from None
    enum_class = getattr(module, "EplbAlgorithm", None)
    if not (isinstance(enum_class, type) and issubclass(enum_class, enum.Enum)):
        raise EngineLayoutError(f"{where}: {ALGORITHMS_MODULE}.EplbAlgorithm is not an Enum")
    missing = {"deepseek", "deepseek_hierarchical"} - set(enum_class.__members__)
    if missing:
        raise EngineLayoutError(f"{where}: EplbAlgorithm has no member(s) {names(sorted(missing))}")
    _check_parameters(module, "rebalance_experts", REBALANCE_PARAMETERS, where)
    _check_parameters(module, "compute_algorithm", COMPUTE_ALGORITHM_PARAMETERS, where)
    # expert_location must reach the dispatch function through the module (so that the patch is
    # the function it calls). 0.5.23's ExpertLocationMetadata.init_by_eplb imports the module in
    # its body (`from sglang.srt.eplb import eplb_algorithms`) and calls
    # `eplb_algorithms.rebalance_experts(...)`: the attribute is read at call time.
    try:
        location = importlib.import_module(EXPERT_LOCATION_MODULE)
    except ImportError as e:
        raise EngineLayoutError(f"{where}: cannot import {EXPERT_LOCATION_MODULE}: {e}") from None
    problem = _caller_problem(location, module)
    if problem is not None:
        raise EngineLayoutError(
            f"{where}: {EXPERT_LOCATION_MODULE} does not call "
            f"{ALGORITHMS_MODULE}.rebalance_experts through the module ({problem}), so a patch "
            "would not reach it"
        )
    return module


def _caller_problem(location: Any, module: Any) -> str | None:
    """Why ``expert_location``'s planning call (``ExpertLocationMetadata.init_by_eplb``) would
    not see a patched ``eplb_algorithms.rebalance_experts``, or None when it reads the function
    from the module at call time: a copy of the function bound in ``expert_location`` or in
    ``init_by_eplb`` itself (a from-import), another ``eplb_algorithms``, or no such call."""
    if hasattr(location, "rebalance_experts"):
        return "it binds rebalance_experts itself"
    if getattr(location, "eplb_algorithms", module) is not module:
        return "its eplb_algorithms is another module"
    caller = getattr(getattr(location, "ExpertLocationMetadata", None), "init_by_eplb", None)
    code = getattr(inspect.unwrap(caller), "__code__", None) if callable(caller) else None
    if code is None:
        return "it has no ExpertLocationMetadata.init_by_eplb"
    if "rebalance_experts" in code.co_varnames:
        return "init_by_eplb imports rebalance_experts itself"
    if "rebalance_experts" not in code.co_names:
        return "init_by_eplb does not call rebalance_experts"
    return None


def _check_parameters(module: Any, name: str, expected: tuple[str, ...], where: str) -> None:
    function = getattr(module, name, None)
    if not callable(function):
        raise EngineLayoutError(f"{where}: {ALGORITHMS_MODULE} has no function {name}")
    original = getattr(function, _WRAPPER_MARK, None) or function
    try:
        parameters = tuple(inspect.signature(original).parameters)
    except (TypeError, ValueError) as e:
        raise EngineLayoutError(f"{where}: cannot read the signature of {name}: {e}") from None
    if parameters[: len(expected)] != expected:
        raise EngineLayoutError(
            f"{where}: {ALGORITHMS_MODULE}.{name} takes {parameters}, not {expected}"
        )


def _add_member(enum_class: type[enum.Enum], name: str) -> None:
    """Adds member ``name`` to an existing Enum class (Enums are closed to subclassing and to
    ``setattr`` of new members; this writes the tables ``Enum`` looks members up in). The value:
    the largest int value + 1 when all are ints (``auto()``), else the name."""
    values = [m.value for m in enum_class]
    value: Any = max(values) + 1 if values and all(isinstance(v, int) for v in values) else name
    member = object.__new__(enum_class)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_class  # type: ignore[attr-defined]
    member._sort_order_ = len(enum_class._member_names_)  # type: ignore[attr-defined]
    enum_class._member_map_[name] = member
    enum_class._value2member_map_[value] = member
    enum_class._member_names_.append(name)
    type.__setattr__(enum_class, name, member)


def _make_wrapper(module: Any, original: Any) -> Any:
    """SGLang's ``rebalance_experts`` with ``EplbAlgorithm.moelb`` sent to moelb."""

    def rebalance_experts_with_moelb(
        tokens_per_expert: Any,
        num_physical_experts: int,
        num_local_physical_experts: int,
        num_groups: int | None,
        num_nodes: int,
        algorithm: Any,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        if getattr(algorithm, "name", algorithm) != "moelb":
            return original(
                tokens_per_expert,
                num_physical_experts,
                num_local_physical_experts,
                num_groups,
                num_nodes,
                algorithm,
                *args,
                **kwargs,
            )
        options = installed_options() or {}
        use_previous = options.pop("previous_from_engine", True)
        if use_previous:
            previous = _placement_in_service(
                tokens_per_expert, num_physical_experts, num_local_physical_experts, num_nodes
            )
            if previous is not None:
                options["previous"] = previous
        return rebalance_experts(
            tokens_per_expert,
            num_physical_experts,
            num_local_physical_experts,
            num_groups,
            num_nodes,
            algorithm,
            **options,
        )

    setattr(rebalance_experts_with_moelb, _WRAPPER_MARK, original)
    rebalance_experts_with_moelb.__doc__ = (
        f"SGLang's rebalance_experts ({original.__module__}), with EplbAlgorithm.moelb planned by "
        "moelb.integrations.sglang.rebalance_experts (moelb.integrations.sglang.install())."
    )
    return rebalance_experts_with_moelb


def _placement_in_service(
    tokens_per_expert: Any, num_physical_experts: int, num_local: int, num_nodes: int
) -> Any:
    """The physical_to_logical_map SGLang serves now, as moelb's previous, or None (at start-up,
    or when its shape or contents do not fit this plan)."""
    location_module = sys.modules.get(EXPERT_LOCATION_MODULE)
    getter = getattr(location_module, "get_global_expert_location_metadata", None)
    metadata = getter() if callable(getter) else None
    mapping = getattr(metadata, "physical_to_logical_map_cpu", None)
    if mapping is None or num_local < 1 or num_physical_experts % num_local != 0:
        return None
    shape = tuple(getattr(tokens_per_expert, "shape", ()))
    if len(shape) != 3:
        return None
    num_gpus = num_physical_experts // num_local
    previous = as_previous(
        mapping,
        shape[1],
        num_physical_experts,
        shape[2],
        num_gpus,
        num_nodes if num_gpus % num_nodes == 0 else 1,
        "the placement in service",
        strict=False,
    )
    if previous is None:
        logger.info("moelb: the placement in service does not fit this plan; planned without it")
    return previous
