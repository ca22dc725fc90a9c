"""Shared fixtures of moelb's pytest suite, and its two Hypothesis profiles:

- ``moelb`` (the default, what CI runs): 60 examples per property, derandomized, so every run
  explores the same inputs and a red CI run is reproducible;
- ``fuzz`` (``make fuzz``): random inputs under the seed in ``MOELB_FUZZ_SEED`` (printed in the
  header; ``make fuzz SEED=N`` replays a run), ``MOELB_FUZZ_EXAMPLES`` examples per property
  (default 500) and ten times the fixed budgets of test_fuzz.py. A failure it finds is kept as a
  regression test.

With ``MOELB_REQUIRE_OPTIONAL=1`` (``make test`` sets it: it installs every optional dependency)
a test skipped because an import failed (matplotlib, nbclient, torch, ...) is a failure: the
notebooks and plots must run there, not skip silently. Tests marked ``real_engine``
(test_integrations_real_engines.py: the real SGLang and vLLM, which ``make test`` does not
install) are exempt: their skip without the engine stays a skip.
"""

from __future__ import annotations

import os
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
settings.register_profile(
    "fuzz",
    max_examples=int(os.environ.get("MOELB_FUZZ_EXAMPLES", "500")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=False,
    database=None,
    print_blob=True,
)
settings.load_profile("moelb")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "real_engine: runs against an installed SGLang / vLLM (tests/integrations/"
        "install_real_engines.sh); skips without it, even under MOELB_REQUIRE_OPTIONAL=1",
    )


def fuzz_seed() -> int | None:
    """The seed of a ``make fuzz`` run, None in normal runs."""
    value = os.environ.get("MOELB_FUZZ_SEED")
    return None if value is None else int(value)


def pytest_report_header(config: pytest.Config) -> str | None:
    seed = fuzz_seed()
    return None if seed is None else f"moelb fuzz seed {seed} (replay: make fuzz SEED={seed})"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if (
        os.environ.get("MOELB_REQUIRE_OPTIONAL") == "1"
        and report.skipped
        and isinstance(report.longrepr, tuple)
        and "could not import" in str(report.longrepr[2])
        and item.get_closest_marker("real_engine") is None
    ):
        report.outcome = "failed"
        report.longrepr = (
            f"{report.longrepr[2]}: MOELB_REQUIRE_OPTIONAL=1 (make test installs every optional "
            "dependency), so a skip for a missing import is a failure"
        )


@pytest.fixture
def restore_num_threads() -> Iterator[None]:
    """Puts moelb's thread count back to the default after a test that changes it."""
    try:
        yield
    finally:
        moelb.set_num_threads(0)
