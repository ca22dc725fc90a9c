"""Shared fixtures of moelb's pytest suite."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# routing_reference.py sits beside the tests; make it importable however pytest is invoked.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import moelb

settings.register_profile(
    "moelb",
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
settings.load_profile("moelb")


@pytest.fixture
def restore_num_threads() -> Iterator[None]:
    """Puts moelb's thread count back to the default after a test that changes it."""
    try:
        yield
    finally:
        moelb.set_num_threads(0)
