"""moelb as vLLM's EPLB policy (vLLM 0.33's ``vllm.distributed.eplb.policy``;
``reference/integrations.md``).

- ``MoelbEplbPolicy``: the ``AbstractEplbPolicy`` contract, ``rebalance_experts(weight,
  num_replicas, num_groups, num_nodes, num_ranks, old_global_expert_indices=None) ->
  physical_to_logical_map`` [L, P], planned by ``moelb.rebalance``, with the map in service
  (``old_global_expert_indices``) as moelb's ``previous``. Usable without vLLM.
- ``install()``: vLLM accepts no policy name but ``"default"`` (``EPLBPolicyOption =
  Literal["default"]``, checked against the registry), so ``install()`` makes one change, in
  ``vllm.distributed.eplb.policy``: ``EPLB_POLICIES["default"]`` becomes a subclass of
  ``MoelbEplbPolicy`` and vLLM's ``AbstractEplbPolicy`` (the class it replaced is kept as its
  ``replaced`` attribute). Every EPLB rearrangement then plans with moelb, with vLLM's flags as
  they are (``--enable-eplb``, ``--eplb-config``). Call it before the engine starts, in every
  process that runs the policy (vLLM's workers): ``python -m moelb.integrations.vllm_launch serve
  ...`` does that. Calling it again changes nothing but the options.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import threading
from typing import Any, ClassVar

import numpy as np

from ..eplb import rebalance
from ._common import (
    EngineLayoutError,
    EngineNotFoundError,
    as_previous,
    check_rebalance_options,
    import_torch,
    loads_array,
    positive_int,
    require,
)

__all__ = ["MOELB_OPTIONS", "VLLM_VERSION", "MoelbEplbPolicy", "install"]

logger = logging.getLogger(__name__)

#: The vLLM release whose policy contract and registry this module follows.
VLLM_VERSION = "0.33.0"
POLICY_MODULE = "vllm.distributed.eplb.policy"
POLICY_PARAMETERS = (
    "weight",
    "num_replicas",
    "num_groups",
    "num_nodes",
    "num_ranks",
    "old_global_expert_indices",
)
#: ``moelb.rebalance`` keywords a policy passes on (ours): ``install(**options)``.
MOELB_OPTIONS = ("locality", "move_cost", "max_moves", "dispatch")

_lock = threading.Lock()
#: Set on the class install() registers (found again after a reload of this module).
_REGISTERED_MARK = "__moelb_registered__"


class MoelbEplbPolicy:
    """vLLM's ``AbstractEplbPolicy`` (0.33) planned by moelb (ours).

    ``options``: ``moelb.rebalance`` keywords for every plan (``MOELB_OPTIONS``; set by
    ``install(**options)`` on the class it registers)."""

    options: ClassVar[dict[str, Any]] = {}

    @classmethod
    def rebalance_experts(
        cls,
        weight: Any,
        num_replicas: int,
        num_groups: int | None,
        num_nodes: int,
        num_ranks: int,
        old_global_expert_indices: Any = None,
    ) -> Any:
        """The placement of ``num_replicas`` slots on ``num_ranks`` GPUs for ``weight``.

        weight: [L, E] per-expert loads (a tensor on any device, or an array-like; finite,
            >= 0). num_groups: the model's expert groups (or None); num_nodes: nodes (vLLM
            passes 1 when ``num_ranks % num_nodes != 0``).
        old_global_expert_indices: [L, P] the placement in service, or None: moelb's
            ``previous`` -- experts that stay keep their slots (what vLLM's
            ``preserve_intragpu_slots`` does), and a layer whose gain does not pay for its
            moves keeps its placement (``move_cost``). A map of another shape (the GPU count or
            slots changed) or that is not a placement of the E experts is not used (logged).

        Returns ``physical_to_logical_map`` [L, P], an int64 CPU tensor whatever ``weight``'s
        device, as vLLM's default policy returns it (``torch.from_numpy``; vLLM's async worker
        asserts a CPU map). Node locality when ``num_groups % num_nodes == 0``; a topology moelb
        cannot honour is planned without it (logged). Raises ``EnginePreconditionError`` (an
        ``AssertionError``, as vLLM's default policy asserts, and an ``InvalidArgumentError``)
        when ``num_replicas % num_ranks != 0`` or ``num_replicas < E``;
        ``InvalidArgumentError`` naming the parameter for other bad input.
        """
        torch = import_torch("moelb.integrations.vllm.MoelbEplbPolicy.rebalance_experts")
        num_replicas = positive_int(num_replicas, "num_replicas")
        if num_groups is not None:
            num_groups = positive_int(num_groups, "num_groups")
        num_nodes = positive_int(num_nodes, "num_nodes")
        num_ranks = positive_int(num_ranks, "num_ranks")
        load = loads_array(weight, "weight", "[num_layers, num_logical_experts]", 2, np.float64)
        num_layers, num_experts = load.shape
        require(
            num_replicas % num_ranks == 0,
            f"num_replicas={num_replicas} is not a multiple of num_ranks={num_ranks}",
        )
        require(
            num_replicas >= num_experts,
            f"num_replicas={num_replicas} is smaller than the {num_experts} logical experts",
        )
        previous = as_previous(
            old_global_expert_indices,
            num_layers,
            num_replicas,
            num_experts,
            num_ranks,
            num_nodes if num_ranks % num_nodes == 0 else 1,
            "old_global_expert_indices",
            strict=False,
        )
        if old_global_expert_indices is not None and previous is None:
            logger.info(
                "moelb: old_global_expert_indices does not fit this plan (shape %s); planned "
                "without it",
                tuple(getattr(old_global_expert_indices, "shape", ())),
            )
        plan = rebalance(
            load, num_replicas, num_groups, num_nodes, num_ranks, "moelb", previous, **cls.options
        )
        if plan.stats.notes:
            logger.info("moelb EPLB: %s", plan.stats.notes)
        return torch.from_numpy(plan.location.physical_to_logical.astype(np.int64))


def install(**options: Any) -> None:
    """Registers ``MoelbEplbPolicy`` as vLLM's ``"default"`` EPLB policy in this process (the
    module docstring says what changes). Idempotent: a second call only replaces the options.

    options: ``moelb.rebalance`` keywords for every plan (``MOELB_OPTIONS``).

    Raises ``EngineNotFoundError`` (an ``ImportError``) without vLLM, ``EngineLayoutError``
    (an ``ImportError``) when vLLM's policy module differs from 0.33's (nothing is changed then),
    ``InvalidArgumentError`` for an unknown option.
    """
    check_rebalance_options(options, MOELB_OPTIONS, "install()")
    module = _policy_module()
    with _lock:
        registry = module.EPLB_POLICIES
        current = registry["default"]
        if not (isinstance(current, type) and issubclass(current, MoelbEplbPolicy)):
            # A class registered by an earlier copy of this module (after importlib.reload)
            # is replaced too, keeping the engine's policy it had replaced.
            replaced = current.replaced if getattr(current, _REGISTERED_MARK, False) else current
            current = type(
                "MoelbEplbPolicy",
                (MoelbEplbPolicy, module.AbstractEplbPolicy),
                {
                    "__module__": __name__,
                    "__doc__": MoelbEplbPolicy.__doc__,
                    "replaced": replaced,
                    _REGISTERED_MARK: True,
                },
            )
            registry["default"] = current
        current.options = dict(options)


def _policy_module() -> Any:
    """vLLM's policy module once it has the registry and contract install() relies on, else
    EngineNotFoundError / EngineLayoutError naming what differs."""
    if importlib.util.find_spec("vllm") is None:
        raise EngineNotFoundError(
            "vLLM is not installed in this Python environment (import vllm failed): "
            f"moelb.integrations.vllm.install() registers a policy in vLLM {VLLM_VERSION}'s "
            f"{POLICY_MODULE}"
        )
    try:
        vllm = importlib.import_module("vllm")
    except ImportError as e:  # installed, but a module `import vllm` needs is missing
        raise EngineNotFoundError(
            f"vLLM is installed but `import vllm` failed: {e}: "
            f"moelb.integrations.vllm.install() registers a policy in vLLM {VLLM_VERSION}'s "
            f"{POLICY_MODULE} in the environment vLLM runs in"
        ) from None
    where = (
        f"vLLM {getattr(vllm, '__version__', 'unknown')} (moelb follows vLLM {VLLM_VERSION}'s "
        "policy contract)"
    )
    try:
        module = importlib.import_module(POLICY_MODULE)
    except ImportError as e:
        raise EngineLayoutError(f"{where}: cannot import {POLICY_MODULE}: {e}") from None
    registry = getattr(module, "EPLB_POLICIES", None)
    if not isinstance(registry, dict) or "default" not in registry:
        raise EngineLayoutError(f"{where}: {POLICY_MODULE}.EPLB_POLICIES has no 'default' entry")
    abstract = getattr(module, "AbstractEplbPolicy", None)
    method = getattr(abstract, "rebalance_experts", None)
    if not isinstance(abstract, type) or method is None:
        raise EngineLayoutError(
            f"{where}: {POLICY_MODULE} has no AbstractEplbPolicy with a rebalance_experts"
        )
    try:
        signature = inspect.signature(method)
    except (TypeError, ValueError) as e:
        raise EngineLayoutError(f"{where}: cannot read rebalance_experts' signature: {e}") from None
    parameters = tuple(signature.parameters)
    if parameters[: len(POLICY_PARAMETERS)] != POLICY_PARAMETERS:
        raise EngineLayoutError(
            f"{where}: AbstractEplbPolicy.rebalance_experts takes {parameters}, not "
            f"{POLICY_PARAMETERS}"
        )
    returns = signature.return_annotation
    if returns is not inspect.Signature.empty and "tuple" in str(returns).lower():
        raise EngineLayoutError(
            f"{where}: AbstractEplbPolicy.rebalance_experts returns {returns} (the DeepSeek "
            "triple of vLLM before 0.33), not the physical_to_logical_map alone"
        )
    return module
