"""Behaviour fingerprint over the test suite's own inputs: every plan the tests make, hashed.

Runs pytest on the given test files with this module as a plugin. The plugin wraps the planner's
public functions (``moelb.rebalance``, ``moelb.evaluate_placement``, ``moelb.plan_weight_moves``)
before the tests import them and hashes, call by call in test order, what each returns: the
placement (``physical_to_logical``, nodes) and every statistic except the wall time, a weight-move
plan's operations, or the class and message of the error it raised. The tests' inputs are seeded
(Hypothesis derandomised by the suite's profile), so two commits whose tests differ only by
renames make the same calls; their hashes are equal when the planner behaves the same. Property
tests (Hypothesis) are left out: their derandomised seed is a digest of the test's source, which a
rename changes (check_fingerprint.py's seeded grid covers random inputs).

    python benchmarks/fingerprint_tests.py --out new.json                      # this checkout
    PYTHONPATH=OLD_PACKAGE python benchmarks/fingerprint_tests.py \\
        --tests-dir OLD_TESTS --out old.json                                   # an older one
    python benchmarks/fingerprint_tests.py --compare old.json                  # exit 1 if not equal

Names renamed by issue 18 (num_gpus -> ep_size, gpu_load -> rank_load, rank -> ep_rank,
location_layer -> layer) hash as one spelling on both sides, in statistics and in messages.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

#: Test files whose calls are hashed: the planner's and the weight moves' (their inputs did not
#: change in issue 18, only keyword names).
TEST_FILES = ("test_eplb.py", "test_scale.py", "test_weight_moves.py")
#: One spelling for each renamed name (applied to both sides, so the hash ignores the rename).
CANONICAL = (
    ("num_gpus", "ep_size"),
    ("gpu_load", "rank_load"),
    ("location_layer", "layer"),
    ("ep_rank", "rank"),
    ("num_local_slots", "slots_per_rank"),
)
WRAPPED = ("rebalance", "evaluate_placement", "plan_weight_moves")


def canonical(text: str) -> str:
    for old, new in CANONICAL:
        text = text.replace(old, new)
    return text


class Recorder:
    """Hashes the wrapped calls in order."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.calls: dict[str, int] = {}
        self.digests: list[str] = []  # per call: "name sha256", in order

    def feed(self, value: Any) -> None:
        h = self.hash
        if isinstance(value, np.ndarray):
            h.update(f"a{value.dtype.str}{value.shape}".encode())
            h.update(np.ascontiguousarray(value).tobytes())
        elif isinstance(value, dict):
            for key in sorted(value, key=lambda k: canonical(str(k))):
                if "seconds" not in str(key):
                    h.update(canonical(str(key)).encode())
                    self.feed(value[key])
        elif isinstance(value, (list, tuple)):
            h.update(f"[{len(value)}".encode())
            for item in value:
                self.feed(item)
        elif isinstance(value, str):
            h.update(repr(canonical(value)).encode())
        else:
            h.update(repr(value).encode())

    def result(self, name: str, value: Any) -> None:
        import moelb

        self.calls[name] = self.calls.get(name, 0) + 1
        self.hash = hashlib.sha256()
        self.hash.update(name.encode())
        if isinstance(value, moelb.Plan):
            self.feed([value.location.physical_to_logical, value.location.num_nodes])
            self.feed(vars(value.stats))
        elif isinstance(value, moelb.PlanStats):
            self.feed(vars(value))
        else:  # a WeightMovePlan
            ep_size = value.ep_size
            self.feed([value.ops(r) for r in range(ep_size)])
            self.feed([value.transfers, value.local_copies, value.unchanged_slots])
        self.digests.append(f"{name} {self.hash.hexdigest()}")

    def error(self, name: str, error: BaseException) -> None:
        self.calls[name + " (error)"] = self.calls.get(name + " (error)", 0) + 1
        text = f"{name} {type(error).__name__} {canonical(str(error))}"
        self.digests.append(f"{name} {hashlib.sha256(text.encode()).hexdigest()}")

    def total(self) -> str:
        return hashlib.sha256("\n".join(self.digests).encode()).hexdigest()


RECORDER = Recorder()


def _wrap(module: Any, name: str) -> None:
    original = getattr(module, name)

    @functools.wraps(original)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            value = original(*args, **kwargs)
        except Exception as error:
            RECORDER.error(name, error)
            raise
        RECORDER.result(name, value)
        return value

    setattr(module, name, wrapped)


def pytest_configure(config: Any) -> None:
    """The plugin hook: wrap before any test module imports moelb's names."""
    import moelb

    for name in WRAPPED:
        _wrap(moelb, name)


def pytest_collection_modifyitems(session: Any, config: Any, items: list[Any]) -> None:
    """Property tests (Hypothesis) are left out: their examples follow a seed derived from the
    test's source, which a rename in its body changes, so two commits would not make the same
    calls. The table-driven and fixed-seed tests stay."""
    kept = [item for item in items if not _is_property_test(item)]
    config.hook.pytest_deselected(items=[item for item in items if item not in kept])
    items[:] = kept


def _is_property_test(item: Any) -> bool:
    function = getattr(item, "function", None)
    return bool(getattr(function, "is_hypothesis_test", False))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_dir = Path(__file__).resolve().parents[1] / "tests" / "python"
    parser.add_argument("--tests-dir", type=Path, default=default_dir)
    parser.add_argument("--out", type=Path, help="write the hash and call counts here")
    parser.add_argument("--compare", type=Path, help="exit 1 unless equal to this file's hash")
    args = parser.parse_args(argv)

    import pytest

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    files = [str(args.tests_dir / name) for name in TEST_FILES]
    code = pytest.main(
        [
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "fingerprint_tests",
            "-x",
            *files,
        ],
        plugins=[],
    )
    module = sys.modules.get("fingerprint_tests", sys.modules[__name__])
    recorder = module.RECORDER
    result = {"sha256": recorder.total(), "calls": recorder.calls, "pytest": int(code)}
    print(json.dumps(result, indent=1))
    result["digests"] = recorder.digests
    if args.out is not None:
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(args.out)
    if code != 0:
        print(f"pytest failed ({code}): the hash covers only the calls before the failure")
        return 2
    if args.compare is not None:
        before = json.loads(args.compare.read_text())
        same = before["sha256"] == result["sha256"]
        print("identical" if same else f"DIFFERS from {args.compare}")
        for i, (a, b) in enumerate(zip(before.get("digests", []), recorder.digests, strict=False)):
            if a != b:
                print(f"first differing call: #{i} ({b.split()[0]})")
                break
        return 0 if same else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
