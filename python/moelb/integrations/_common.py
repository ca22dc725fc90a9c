"""What the engine adapters share (ours): their errors, PyTorch imported on first use, the loads
and integer arguments checked under the engine's parameter names, and the ``log2phy`` table."""

from __future__ import annotations

import importlib
import json
import operator
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from .._core import ExpertLocation, InvalidArgumentError

__all__ = [
    "EngineLayoutError",
    "EngineNotFoundError",
    "EnginePreconditionError",
    "as_previous",
    "check_rebalance_options",
    "import_torch",
    "loads_array",
    "log2phy_table",
    "options_from_environment",
    "positive_int",
    "replica_counts",
    "require",
]

IntArray = npt.NDArray[np.int64]


class EnginePreconditionError(InvalidArgumentError, AssertionError):
    """An input the engine's own policy rejects with an ``assert`` (a slot count that is not a
    multiple of the GPU count, fewer slots than experts, and for DeepSeek's algorithm its group
    and node divisibility): an ``AssertionError``, as the engine raises it (and as its tests
    expect), and moelb's ``InvalidArgumentError`` (a ``ValueError``) whose message names the
    parameter and the value. Raised under ``python -O`` too, where the engine's ``assert`` is not.
    """


class EngineNotFoundError(ImportError):
    """``install()`` was called in a Python environment without the engine."""


class EngineLayoutError(ImportError):
    """The installed engine's modules are not laid out as in the version ``install()`` patches
    (a module, a name or a signature it needs is missing or different): nothing was patched."""


def import_torch(caller: str) -> Any:
    """PyTorch, imported on first use (``import moelb`` never imports it)."""
    try:
        return importlib.import_module("torch")
    except ImportError:
        raise ImportError(
            f"{caller} returns PyTorch tensors, as the engine's policy does: install PyTorch "
            "(pip install torch)"
        ) from None


def require(condition: bool, message: str) -> None:
    """``EnginePreconditionError(message)`` unless ``condition``: where the engine asserts."""
    if not condition:
        raise EnginePreconditionError(message)


def positive_int(value: Any, name: str) -> int:
    """``value`` as an int >= 1 (a bool is not a count), else InvalidArgumentError naming it."""
    if isinstance(value, bool):
        raise InvalidArgumentError(f"{name} must be a positive integer, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise InvalidArgumentError(f"{name} must be a positive integer, got {value!r}") from None
    if number < 1:
        raise InvalidArgumentError(f"{name} must be a positive integer, got {number}")
    return number


def loads_array(
    value: Any,
    name: str,
    shape: str,
    ndim: int,
    dtype: type[np.floating[Any]],
    sum_steps: bool = False,
) -> npt.NDArray[Any]:
    """``value`` (a tensor on any device, or an array-like) as a ``dtype`` NumPy array of
    ``ndim`` dimensions holding finite loads >= 0, else InvalidArgumentError naming ``name``
    (``shape`` is how the message spells the expected shape). ``sum_steps``: a [T, L, E] input is
    summed over T first, in its own dtype, as SGLang's ``tokens_per_expert.sum(dim=0)`` does,
    and converted after. A float32 ``dtype`` converts as the engines' ``.float()`` does."""
    if hasattr(value, "detach"):  # a torch tensor
        tensor = value.detach()
        if tensor.is_complex():
            raise InvalidArgumentError(f"{name} must hold real numbers, got {tensor.dtype}")
        if tensor.dim() != ndim:
            raise InvalidArgumentError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")
        if sum_steps:
            tensor = tensor.sum(dim=0)
        tensor = tensor.float() if dtype is np.float32 else tensor.double()
        array = tensor.cpu().numpy()
    else:
        try:
            array = np.asarray(value)
        except (TypeError, ValueError) as e:
            raise InvalidArgumentError(f"{name} is not an array: {e}") from None
        if array.dtype.kind not in "iuf":
            raise InvalidArgumentError(f"{name} must hold numbers, got dtype {array.dtype}")
        if array.ndim != ndim:
            raise InvalidArgumentError(f"{name} must have shape {shape}, got {array.shape}")
        if sum_steps:
            array = array.sum(axis=0)
        array = array.astype(dtype)
    if 0 in array.shape:
        raise InvalidArgumentError(f"{name} must have shape {shape} with no empty axis")
    bad = ~np.isfinite(array) | (array < 0)
    if bad.any():
        where = [int(i) for i in np.argwhere(bad)[0]]
        raise InvalidArgumentError(
            f"{name}{where} = {array[tuple(where)].item()!r} is not a finite load >= 0"
            + (" (summed over the steps)" if sum_steps else "")
        )
    return np.ascontiguousarray(array)


def replica_counts(phy2log: IntArray, num_logical_experts: int) -> IntArray:
    """[L, E] int64: how many slots of each layer hold each expert."""
    num_layers = phy2log.shape[0]
    flat = phy2log + np.arange(num_layers, dtype=np.int64)[:, None] * num_logical_experts
    return np.bincount(flat.ravel(), minlength=num_layers * num_logical_experts).reshape(
        num_layers, num_logical_experts
    )


def ascending_ranks(phy2log: IntArray) -> IntArray:
    """[L, P] int64: each slot's position among its expert's slots in ascending slot order."""
    num_layers, num_slots = phy2log.shape
    order = np.argsort(phy2log, axis=1, kind="stable")  # slots grouped by expert, ascending
    grouped = np.take_along_axis(phy2log, order, axis=1)
    first = np.ones((num_layers, num_slots), dtype=bool)
    first[:, 1:] = grouped[:, 1:] != grouped[:, :-1]
    index = np.broadcast_to(np.arange(num_slots, dtype=np.int64), (num_layers, num_slots))
    group_start = np.maximum.accumulate(np.where(first, index, 0), axis=1)
    ranks = np.empty((num_layers, num_slots), dtype=np.int64)
    np.put_along_axis(ranks, order, index - group_start, axis=1)
    return ranks


def log2phy_table(
    phy2log: IntArray, num_logical_experts: int, ranks: IntArray | None = None
) -> IntArray:
    """DeepSeek's ``log2phy`` [L, E, X] int64 of ``phy2log`` [L, P]: entry ``[l, e, r]`` is the
    slot of the replica of rank ``r`` of expert ``e`` (``ranks`` [L, P], default: ascending slot
    order), ``-1``-padded to ``X = logcnt.max()`` over the whole call, filled as ``eplb.py``
    fills it (a scatter of every slot to ``phy2log * X + rank``)."""
    num_layers, num_slots = phy2log.shape
    if ranks is None:
        ranks = ascending_ranks(phy2log)
    width = int(replica_counts(phy2log, num_logical_experts).max())
    table = np.full((num_layers, num_logical_experts * width), -1, dtype=np.int64)
    np.put_along_axis(
        table,
        phy2log * width + ranks,
        np.broadcast_to(np.arange(num_slots, dtype=np.int64), phy2log.shape),
        axis=1,
    )
    return table.reshape(num_layers, num_logical_experts, width)


def as_previous(
    previous: Any,
    num_layers: int,
    num_slots: int,
    num_logical_experts: int,
    ep_size: int,
    num_nodes: int,
    name: str,
    strict: bool,
) -> ExpertLocation | None:
    """The placement in service (an ``ExpertLocation``, or a [L, P] tensor / array of logical ids,
    the engines' ``physical_to_logical_map``) as moelb's ``previous``. A map of another shape or
    that is not a placement of these experts (ids out of range, an expert without a slot) is an
    InvalidArgumentError naming ``name`` when ``strict``, else None (planned without it)."""
    if previous is None or isinstance(previous, ExpertLocation):
        return previous
    if hasattr(previous, "detach"):
        previous = previous.detach().cpu().numpy()
    array = np.asarray(previous)
    problem = None
    if array.dtype.kind not in "iu":
        problem = f"must hold integer expert ids, got dtype {array.dtype}"
    elif array.shape != (num_layers, num_slots):
        problem = (
            f"has shape {array.shape}, not [num_layers, num_slots] = {(num_layers, num_slots)}"
        )
    if problem is None:
        try:
            return ExpertLocation(
                np.ascontiguousarray(array, dtype=np.int32),
                num_logical_experts,
                ep_size,
                num_nodes,
            )
        except (InvalidArgumentError, OverflowError) as e:
            problem = f"is not a placement of {num_logical_experts} experts: {e}"
    if strict:
        raise InvalidArgumentError(f"{name} {problem}")
    return None


def check_rebalance_options(options: dict[str, Any], allowed: Sequence[str], caller: str) -> None:
    """Checks ``moelb.rebalance`` keywords once, where they are given (``install()``), rather than
    at the engine's first rebalance: unknown names, and the values by a plan of a tiny load with
    them; an InvalidArgumentError naming the option otherwise."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise InvalidArgumentError(
            f"unknown option(s) {names(unknown)}: {caller} takes {names(allowed)}"
        )
    from ..eplb import rebalance  # (moelb.eplb imports nothing from here)

    steps = options.get("objective", "total") != "total" or options.get("dispatch") == "balanced"
    probe = np.ones((1, 1, 2) if steps else (1, 2))
    try:
        rebalance(probe, 2, None, 1, 1, "moelb", **options)
    except InvalidArgumentError as e:
        raise InvalidArgumentError(f"{caller} options {options!r}: {e}") from None
    except TypeError:
        raise InvalidArgumentError(
            f"{caller} options {options!r}: a value has the wrong type (locality, objective, "
            "dispatch: str; move_cost: a number; max_moves: an int or None)"
        ) from None


def check_call_options(
    options: dict[str, Any], allowed: Sequence[str], algorithm: str, moelb_name: str = "moelb"
) -> None:
    """A rebalance_experts call's extra keywords: names in ``allowed`` (moelb's options), and
    only with moelb's algorithm (``algorithm`` as the engine names it)."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise InvalidArgumentError(
            f"unknown option(s) {names(unknown)}: moelb's options here are {names(allowed)}"
        )
    if options and algorithm != moelb_name:
        raise InvalidArgumentError(
            f"options {names(sorted(options))} apply to algorithm {moelb_name!r} only, "
            f"not {algorithm!r}"
        )


def install_at_launch(install: Any, variable: str, module_name: str, spec_name: str) -> None:
    """A launcher module's ``install(**options from environment variable)``. Imported (SGLang's or
    vLLM's spawned processes re-import the launcher as ``__mp_main__``, or as a module), errors
    propagate; run as the launcher they end the process with one line, no traceback (no engine,
    another layout, a bad option)."""
    try:
        install(**options_from_environment(variable))
    except (ImportError, ValueError) as e:
        if module_name not in ("__main__", "__mp_main__"):
            raise
        raise SystemExit(f"{spec_name}: {e}") from None


def options_from_environment(variable: str) -> dict[str, Any]:
    """The JSON object in environment variable ``variable`` (the launchers' ``install()``
    keywords), {} when it is unset or empty; exits with a one-line message when it is not a JSON
    object."""
    text = os.environ.get(variable, "").strip()
    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as e:
        raise SystemExit(f"moelb: {variable} is not JSON: {e}") from None
    if not isinstance(options, dict):
        raise SystemExit(f"moelb: {variable} must be a JSON object, got {text!r}")
    return options


def names(values: Sequence[str]) -> str:
    return ", ".join(repr(v) for v in values)
