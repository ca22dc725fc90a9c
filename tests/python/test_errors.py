"""moelb's exception hierarchy, how C++ errors arrive in Python, and the package version."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import moelb
import numpy as np
import pytest


def test_hierarchy() -> None:
    assert issubclass(moelb.InvalidArgumentError, ValueError)
    assert not issubclass(moelb.InvalidArgumentError, TypeError)
    assert issubclass(moelb.InvalidDTypeError, moelb.InvalidArgumentError)
    assert issubclass(moelb.InvalidDTypeError, ValueError)
    assert issubclass(moelb.InvalidDTypeError, TypeError)
    assert issubclass(moelb.Error, RuntimeError)
    assert not issubclass(moelb.Error, ValueError)
    assert not issubclass(moelb.InvalidArgumentError, RuntimeError)


def test_exported_names() -> None:
    for name in moelb.__all__:
        assert hasattr(moelb, name), name
    for name in ("Error", "InvalidArgumentError", "InvalidDTypeError"):
        assert name in moelb.__all__


def test_core_errors_arrive_with_their_python_class() -> None:
    config = moelb.TopKConfig(top_k=2)
    with pytest.raises(moelb.InvalidDTypeError) as dtype_error:
        moelb.select_experts(np.zeros((2, 4), dtype=np.float64), config)
    assert type(dtype_error.value) is moelb.InvalidDTypeError
    with pytest.raises(moelb.InvalidArgumentError) as argument_error:
        moelb.select_experts(np.zeros((2, 4), dtype=np.float32), config, num_token_non_padded=3)
    assert type(argument_error.value) is moelb.InvalidArgumentError
    # Both are catchable as the builtin classes callers already handle.
    with pytest.raises(TypeError):
        moelb.select_experts(np.zeros((2, 4), dtype=np.float64), config)
    with pytest.raises(ValueError, match="top_k"):
        moelb.TopKConfig(top_k=-3)


def test_messages_name_parameter_and_value() -> None:
    with pytest.raises(moelb.InvalidArgumentError) as info:
        moelb.select_experts(np.zeros((2, 4), dtype=np.float32), moelb.TopKConfig(top_k=5))
    message = str(info.value)
    assert "top_k=5" in message and "4" in message
    with pytest.raises(moelb.InvalidDTypeError) as info:
        moelb.select_experts(np.zeros((2, 4), dtype=np.float16), moelb.TopKConfig(top_k=1))
    assert "router_logits" in str(info.value) and "float16" in str(info.value)


def test_errors_can_be_raised_and_caught_from_python() -> None:
    with pytest.raises(RuntimeError, match="broken"):
        raise moelb.Error("broken")
    with pytest.raises(ValueError, match="bad"):
        raise moelb.InvalidArgumentError("bad")
    with pytest.raises(TypeError, match="dtype"):
        raise moelb.InvalidDTypeError("dtype")


def project_version() -> str:
    """The version in CMakeLists.txt, the source of the package metadata (pyproject.toml)."""
    cmake = Path(__file__).resolve().parents[2] / "CMakeLists.txt"
    match = re.search(r"project\(moelb VERSION ([0-9][0-9.]*)", cmake.read_text())
    assert match, "no version in CMakeLists.txt"
    return match.group(1)


def test_version_matches_package_metadata() -> None:
    assert isinstance(moelb.__version__, str)
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", moelb.__version__)
    try:
        metadata = importlib.metadata.version("moelb")
    except importlib.metadata.PackageNotFoundError:
        metadata = None  # running from a build tree: compare with the metadata's source instead
    if metadata is not None:
        assert moelb.__version__ == metadata
    cmake = Path(__file__).resolve().parents[2] / "CMakeLists.txt"
    if cmake.exists():
        assert moelb.__version__ == project_version()
    assert metadata is not None or cmake.exists()


HUGE = 2**40  # a Python int that does not fit the core's 32-bit parameters


@pytest.mark.parametrize(
    ("name", "call"),
    [
        ("top_k", lambda: moelb.TopKConfig(top_k=HUGE)),
        ("num_groups", lambda: moelb.TopKConfig(top_k=2, num_groups=HUGE, topk_group=1)),
        ("num_logical_experts", lambda: moelb.ExpertLocation(np.zeros((1, 4), int), HUGE, 1)),
        ("ep_size", lambda: moelb.ExpertLocation.trivial(1, 4, 4, HUGE)),
        ("num_experts", lambda: moelb.HashRouter([[0]], num_experts=HUGE)),
        (
            "ep_rank",
            lambda: moelb.remap_topk_for_per_rank_shared_slots(
                np.zeros((1, 2), np.int32), 4, 2, HUGE
            ),
        ),
        (
            "layer",
            lambda: moelb.select_experts(
                np.zeros((1, 4), np.float32),
                moelb.TopKConfig(top_k=1),
                location=moelb.ExpertLocation.trivial(1, 4, 4, 1),
                layer=HUGE,
            ),
        ),
    ],
)
def test_out_of_range_integers_name_the_parameter(name: str, call) -> None:
    with pytest.raises(moelb.InvalidArgumentError, match=f"{name}={HUGE}"):
        call()
