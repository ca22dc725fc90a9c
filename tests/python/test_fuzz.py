"""Fuzzing with a fixed budget: random and malformed input to the file loaders, the routers, the
planners, Waterfill, the recorder hooks and the MoE layer must end in a result or a typed error
(``moelb.InvalidArgumentError`` / ``InvalidDTypeError`` / ``moelb.Error``, or a ``TypeError`` from
argument conversion) -- never a crash, a hang or memory that grows call after call.

The budget is fixed and deterministic (Hypothesis ``derandomize=True`` with per-test
``max_examples``; seeded NumPy generators for the byte-level mutations), so CI runs the same
inputs every time. Each call goes through ``fuzz_call``, which arms a watchdog (``faulthandler``
kills the process with a traceback if one call hangs) and counts inputs, errors and time per
target. The counts are written to ``$MOELB_FUZZ_SUMMARY`` (default:
``<tmp>/moelb_fuzz_summary.json``; under pytest-xdist one file per worker,
``moelb_fuzz_summary.<worker>.json``) and printed in pytest's terminal summary.

Inputs that once crashed, hung or escaped with an untyped error are kept below as explicit
tests: ``test_per_pass_dump_without_records`` (a bare ValueError from io),
``test_recorder_select_after_a_full_slot_regression`` (an int32 count wrapped to -2**31) and
``test_rebalance_huge_slot_counts_regression`` (2**31 - 1 slots on one GPU ran for hours).
"""

from __future__ import annotations

import collections
import faulthandler
import gc
import io
import json
import os
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import moelb
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

#: What a bad input may raise. InvalidArgumentError is a ValueError and InvalidDTypeError also a
#: TypeError; a TypeError also comes from pybind11 when an argument does not convert at all.
TYPED_ERRORS = (moelb.InvalidArgumentError, moelb.Error, TypeError)
#: A call taking longer than this is a hang: the watchdog prints the input and every thread's
#: stack to the real stderr (pytest's capture would swallow them) and ends the process.
HANG_SECONDS = 60.0
#: Where the watchdog writes; set by the module fixture to the stderr pytest saved.
WATCHDOG_FD: list[int] = [2]


@dataclass
class TargetStats:
    inputs: int = 0
    seconds: float = 0.0
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    messages: collections.Counter[str] = field(default_factory=collections.Counter)


STATS: dict[str, TargetStats] = collections.defaultdict(TargetStats)


def fuzz_call(target: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Calls fn; returns its result, or None after a typed error (counted). Anything else
    propagates and fails the test; a hang kills the run with a traceback."""
    stats = STATS[target]
    stats.inputs += 1
    start = time.perf_counter()
    # Two guards: a Python timer names the input (if the call released the GIL), then
    # faulthandler, which needs no GIL, dumps the stacks and exits.
    timer = threading.Timer(HANG_SECONDS, _report_hang, (target, args, kwargs))
    timer.daemon = True
    timer.start()
    faulthandler.dump_traceback_later(HANG_SECONDS + 5, exit=True, file=WATCHDOG_FD[0])
    try:
        return fn(*args, **kwargs)
    except TYPED_ERRORS as e:
        stats.errors[type(e).__name__] += 1
        stats.messages[str(e).split(",")[0].split(":")[0][:60]] += 1
        return None
    finally:
        faulthandler.cancel_dump_traceback_later()
        timer.cancel()
        stats.seconds += time.perf_counter() - start


def _report_hang(target: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    text = f"\nmoelb fuzz: {target} hangs (> {HANG_SECONDS:.0f} s) on args={args!r} {kwargs=}\n"
    os.write(WATCHDOG_FD[0], text.encode(errors="replace"))


def succeeded(target: str, fn: Callable[..., Any], *args: Any) -> bool:
    """fuzz_call for functions that return None: True when the call did not raise."""
    return fuzz_call(target, lambda: (fn(*args), True)[1]) is True


def summary_path() -> Path:
    """The summary file; under pytest-xdist one per worker process (each counts its own tests),
    ``<name>.<worker>.json``."""
    default = Path(tempfile.gettempdir()) / "moelb_fuzz_summary.json"
    path = Path(os.environ.get("MOELB_FUZZ_SUMMARY", default))
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    return path.with_name(f"{path.stem}.{worker}{path.suffix}") if worker else path


_START = [0.0]  # when this process's first test of the module started


class _SummaryPlugin:
    """Prints the per-target figures at the end of the pytest run."""

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not STATS:
            return
        terminalreporter.section("moelb fuzz budget")
        for target, s in sorted(STATS.items()):
            errors = ", ".join(f"{k} {v}" for k, v in sorted(s.errors.items())) or "none"
            terminalreporter.write_line(
                f"{target:28s} {s.inputs:6d} inputs {s.seconds:7.2f} s  errors: {errors}"
            )
        terminalreporter.write_line(f"written to {summary_path()}")


@pytest.fixture(scope="module", autouse=True)
def fuzz_summary(request: pytest.FixtureRequest) -> Iterator[None]:
    # Once per process: under pytest-xdist's work stealing a worker may run this module's tests in
    # several stretches, each setting this fixture up again (STATS keeps counting across them).
    if not request.config.pluginmanager.has_plugin("moelb_fuzz_summary"):
        request.config.pluginmanager.register(_SummaryPlugin(), "moelb_fuzz_summary")
        _START[0] = time.perf_counter()
    capture = request.config.pluginmanager.getplugin("capturemanager")
    saved = getattr(
        getattr(getattr(capture, "_global_capturing", None), "err", None), "targetfd_save", None
    )
    if isinstance(saved, int):  # pytest's fd capture keeps the real stderr here
        WATCHDOG_FD[0] = saved
    yield
    data = {
        "wall_seconds": round(time.perf_counter() - _START[0], 3),
        "targets": {
            t: {
                "inputs": s.inputs,
                "seconds": round(s.seconds, 3),
                "errors": dict(s.errors),
                "top_messages": dict(s.messages.most_common(8)),
            }
            for t, s in sorted(STATS.items())
        },
    }
    try:
        summary_path().write_text(json.dumps(data, indent=1) + "\n")
    except OSError:  # pragma: no cover - a read-only tmp must not fail the suite
        pass


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


#: ``make fuzz`` (conftest.py): random inputs and ten times the budget; else the fixed CI budget.
FUZZ_SEED = (
    None if os.environ.get("MOELB_FUZZ_SEED") is None else int(os.environ["MOELB_FUZZ_SEED"])
)


def budget(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples if FUZZ_SEED is None else 10 * max_examples,
        deadline=None,
        derandomize=FUZZ_SEED is None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


def mutation_seed(base: int) -> int | list[int]:
    """The seed of a byte-level mutation generator: fixed in CI, mixed with the fuzz seed."""
    return base if FUZZ_SEED is None else [base, FUZZ_SEED]


# ------------------------------------------------------------------------------------------------
# Strategies.

SPECIAL_FLOATS = [0.0, -0.0, 1.0, -1.0, 1e30, -1e30, 1e-40, np.inf, -np.inf, np.nan]
SPECIAL_INTS = [0, 1, -1, 2, 7, 2**31 - 1, 2**31, -(2**31) - 1, 2**40, 2**63 - 1, -(2**63)]

small_ints = st.integers(-2, 9)
any_ints = st.one_of(small_ints, st.sampled_from(SPECIAL_INTS))
maybe_ints = st.one_of(st.none(), any_ints)


@st.composite
def float_arrays(draw: st.DrawFn, shape: tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
    """Random values with NaN, infinities, huge, tiny and negative ones sprinkled in."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(mutation_seed(seed))
    a = rng.normal(0.0, draw(st.sampled_from([1.0, 10.0, 1e6])), shape)
    if a.size and draw(st.booleans()):
        mask = rng.random(shape) < draw(st.sampled_from([0.05, 0.3, 1.0]))
        a[mask] = rng.choice(np.array(SPECIAL_FLOATS), int(mask.sum()))
    with np.errstate(over="ignore", invalid="ignore"):
        return a.astype(dtype)


@st.composite
def odd_layout(draw: st.DrawFn, a: np.ndarray) -> Any:
    """The array as given, or in a wrong dtype, non-contiguous, a list, a scalar or a string."""
    kind = draw(st.sampled_from(["same"] * 6 + ["f64", "i64", "fortran", "strided", "list", "odd"]))
    with np.errstate(invalid="ignore", over="ignore"):
        if kind == "f64":
            return a.astype(np.float64)
        if kind == "i64":
            return np.nan_to_num(a.astype(np.float64)).clip(-(2**62), 2**62).astype(np.int64)
        if kind == "fortran" and a.ndim == 2:
            return np.asfortranarray(a) if a.shape[0] > 1 and a.shape[1] > 1 else a.T
        if kind == "strided" and a.ndim >= 1:
            return np.repeat(a, 2, axis=0)[::2]
        if kind == "list":
            return a.tolist()
        if kind == "odd":
            return draw(st.sampled_from([None, 3, "ids", object(), np.zeros(0), b"\x00"]))
    return a


@st.composite
def int_arrays(draw: st.DrawFn, shape: tuple[int, ...], low: int, high: int) -> np.ndarray:
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(mutation_seed(seed))
    a = rng.integers(low, max(high, low + 1), shape, dtype=np.int64)
    if a.size and draw(st.booleans()):
        mask = rng.random(shape) < 0.2
        a[mask] = rng.choice(np.array([-1, -2, high, high + 1, 2**31 - 1, -(2**31)]), mask.sum())
    return a.astype(draw(mostly(st.just(np.int32), st.just(np.int64))))


def trivial_location(
    num_layers: int, num_experts: int, num_physical: int, ep_size: int, num_nodes: Any = 1
) -> Any:
    return fuzz_call(
        "ExpertLocation",
        moelb.ExpertLocation.trivial,
        num_layers,
        num_experts,
        num_physical,
        ep_size,
        num_nodes,
    )


def mostly(valid: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """valid 11 times in 12, else bad: most inputs get past the first checks."""
    return st.sampled_from([False] * 11 + [True]).flatmap(lambda use_bad: bad if use_bad else valid)


@st.composite
def locations(draw: st.DrawFn, num_experts: int | None = None) -> Any:
    """A random placement, valid most of the time (every expert has a replica), or None when
    the constructor refused it."""
    num_layers = draw(mostly(st.integers(1, 3), st.integers(-1, 0)))
    if num_experts is None:
        num_experts = draw(mostly(st.integers(1, 8), st.integers(-1, 0)))
    ep_size = draw(mostly(st.integers(1, 4), st.integers(-1, 0)))
    per_rank = -(-max(num_experts, 1) // max(ep_size, 1)) + draw(st.integers(0, 2))
    num_physical = draw(mostly(st.just(per_rank * max(ep_size, 1)), st.integers(0, 12)))
    num_nodes = draw(mostly(st.sampled_from([n for n in (1, 2) if ep_size % n == 0]), any_ints))
    if draw(st.booleans()):
        return trivial_location(num_layers, num_experts, num_physical, ep_size, num_nodes)
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(mutation_seed(seed))
    rows = max(num_layers, 0)
    p2l = np.array(
        [rng.permutation(np.arange(num_physical) % max(num_experts, 1)) for _ in range(rows)],
        dtype=np.int64,
    ).reshape(rows, num_physical)
    if p2l.size and draw(st.integers(0, 6)) == 0:
        p2l.flat[int(rng.integers(0, p2l.size))] = draw(st.sampled_from([-1, num_experts, 2**31]))
    return fuzz_call("ExpertLocation", moelb.ExpertLocation, p2l, num_experts, ep_size, num_nodes)


# ------------------------------------------------------------------------------------------------
# Placement files.

json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.sampled_from(SPECIAL_INTS),
        st.integers(-3, 300),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=4),
    ),
    lambda children: (
        st.lists(children, max_size=6)
        | st.dictionaries(
            st.sampled_from(["physical_to_logical_map", "x", ""]), children, max_size=3
        )
    ),
    max_leaves=40,
)


@st.composite
def placement_documents(draw: st.DrawFn) -> Any:
    """Near-valid placement objects (rows of ints with odd values), or any JSON value."""
    if draw(st.booleans()):
        return draw(json_values)
    num_layers, num_physical = draw(st.integers(0, 4)), draw(st.integers(0, 10))
    rows = draw(int_arrays((num_layers, num_physical), 0, 8)).tolist()
    if rows and draw(st.booleans()):
        layer = draw(st.integers(0, len(rows) - 1))
        rows[layer] = draw(st.lists(json_values, max_size=num_physical + 1))
    key = draw(st.sampled_from(["physical_to_logical_map"] * 4 + ["physical_to_logical", "map"]))
    return {key: rows}


@budget(250)
@given(document=placement_documents(), ep_size=any_ints, num_nodes=any_ints, num_logical=maybe_ints)
def test_load_placement_json_documents(
    work_dir: Path, document: Any, ep_size: int, num_nodes: int, num_logical: int | None
) -> None:
    path = work_dir / "placement.json"
    path.write_text(json.dumps(document))
    location = fuzz_call(
        "load_placement", moelb.load_placement, path, ep_size, num_nodes, num_logical
    )
    if location is not None:
        assert isinstance(location, moelb.ExpertLocation)
        assert (location.logical_count >= 1).all()
        assert location.num_physical_experts % location.ep_size == 0


def mutations(data: bytes, rng: np.random.Generator) -> Iterator[bytes]:
    """Truncations, bit flips, byte runs and splices of a valid file."""
    n = len(data)
    for cut in sorted({0, 1, n // 2, n - 1, *rng.integers(0, n, 6).tolist()}):
        yield data[:cut]
    for _ in range(10):
        b = bytearray(data)
        for pos in rng.integers(0, n, rng.integers(1, 8)):
            b[pos] ^= 1 << int(rng.integers(0, 8))
        yield bytes(b)
    for _ in range(6):
        b = bytearray(data)
        pos = int(rng.integers(0, n))
        b[pos : pos + 16] = (
            rng.choice(list(b'09-.eE[]{},":\xff\x00'), 16).astype(np.uint8).tobytes()
        )
        yield bytes(b)
    yield data + data
    yield data[n // 2 :] + data[: n // 2]
    yield rng.integers(0, 256, n, dtype=np.uint8).tobytes()


def test_load_placement_corrupt_bytes(work_dir: Path) -> None:
    rng = np.random.default_rng(mutation_seed(11))
    location = moelb.ExpertLocation(
        np.array([rng.permutation([0, 1, 2, 3, 4, 5, 0, 3]) for _ in range(3)]), 6, 2
    )
    valid = work_dir / "valid_placement.json"
    moelb.save_placement(location, valid)
    path = work_dir / "corrupt_placement.json"
    for data in mutations(valid.read_bytes(), rng):
        path.write_bytes(data)
        result = fuzz_call("load_placement", moelb.load_placement, path, 2)
        if result is not None:
            assert result.num_physical_experts == result.physical_to_logical.shape[1]


def test_load_placement_deeply_nested(work_dir: Path) -> None:
    path = work_dir / "nested.json"
    for depth in (100, 10_000, 200_000):
        path.write_text("[" * depth + "]" * depth)
        with pytest.raises(moelb.InvalidArgumentError, match="placement"):
            fuzz_call_strict("load_placement", moelb.load_placement, path, 1)
        path.write_text('{"physical_to_logical_map": ' + "[" * depth + "]" * depth + "}")
        with pytest.raises(moelb.InvalidArgumentError, match="placement"):
            fuzz_call_strict("load_placement", moelb.load_placement, path, 1)


def fuzz_call_strict(target: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Counted like fuzz_call, but the error propagates (for pytest.raises)."""
    stats = STATS[target]
    stats.inputs += 1
    start = time.perf_counter()
    try:
        return fn(*args)
    finally:
        stats.seconds += time.perf_counter() - start


# ------------------------------------------------------------------------------------------------
# Expert distribution dumps.

DUMP_FORMATS = (".json", ".npz", ".pt")


def odd_values(rng: np.random.Generator) -> list[Any]:
    """Values a malformed dump may hold in place of the right one."""
    return [
        None,
        "x",
        1.5,
        True,
        2**40,
        -1,
        [],
        [[1, 2], [3]],
        {"a": 1},
        np.zeros((0,), np.int32),
        np.zeros((2, 3, 4, 5), np.int32),
        np.full((2, 3), np.nan),
        np.full((1, 2, 3), -5, np.int64),
        np.full((1, 2, 3), 2**40, np.int64),
        np.array([True, False]),
        np.array(["a", "b"]),
        np.array(3.0),
        rng.normal(size=(1, 2, 3)).astype(np.float16),
        np.zeros((2, 3), np.uint64) + np.uint64(2**63),
    ]


def valid_dump(rng: np.random.Generator, per_pass: bool) -> dict[str, Any]:
    num_layers, num_experts = int(rng.integers(1, 4)), int(rng.integers(1, 6))
    if not per_pass:
        return {
            "rank": 0,
            "logical_count": rng.integers(
                0, 50, (int(rng.integers(1, 4)), num_layers, num_experts)
            ).astype(np.int32),
            "average_utilization_rate_over_window": float(rng.random()),
        }
    num_physical = num_experts + int(rng.integers(0, 3))
    mapping = np.array(
        [rng.permutation(np.arange(num_physical) % num_experts) for _ in range(num_layers)]
    )
    records = [
        {
            "forward_pass_id": i,
            "rank": 0,
            "gatherer_key": "primary",
            "global_physical_count": rng.integers(0, 9, (num_layers, num_physical)).astype(
                np.int32
            ),
        }
        for i in range(int(rng.integers(1, 3)))
    ]
    return {"records": records, "last_physical_to_logical_map": mapping}


def corrupt_dump(dump: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """Drops, renames or replaces keys (top level or inside a record) with odd values."""
    dump = dict(dump)
    for _ in range(int(rng.integers(1, 3))):
        action = int(rng.integers(0, 5))
        keys = list(dump)
        key = keys[int(rng.integers(0, len(keys)))]
        values = odd_values(rng)
        if action == 0:
            del dump[key]
        elif action == 1:
            dump[key + "_"] = dump.pop(key)
        elif action == 2 and isinstance(dump.get("records"), list) and dump["records"]:
            records = [dict(r) for r in dump["records"]]
            record = records[int(rng.integers(0, len(records)))]
            rkey = list(record)[int(rng.integers(0, len(record)))]
            record[rkey] = values[int(rng.integers(0, len(values)))]
            dump["records"] = records
        else:
            dump[key] = values[int(rng.integers(0, len(values)))]
    return dump


def write_dump(obj: Any, path: Path) -> bool:
    """Writes obj in path's format the way a foreign writer might; False if it cannot be."""
    if path.suffix == ".json":

        def plain(v: Any) -> Any:
            if isinstance(v, np.ndarray):
                return v.tolist()
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            if isinstance(v, list):
                return [plain(x) for x in v]
            return v

        path.write_text(json.dumps(plain(obj)))
        return True
    if path.suffix == ".npz":
        if not isinstance(obj, dict):
            return False
        arrays = {}
        for k, v in obj.items():
            if k == "records" and isinstance(v, list):
                try:
                    arrays["forward_pass_id"] = np.array([r["forward_pass_id"] for r in v])
                    arrays["record_rank"] = np.array([r["rank"] for r in v])
                    arrays["global_physical_count"] = np.array(
                        [r["global_physical_count"] for r in v]
                    )
                except (KeyError, TypeError, ValueError):
                    arrays[k] = np.array(len(v))
                continue
            try:
                arrays[k] = np.asarray(v)
            except ValueError:
                arrays[k] = np.array(repr(v))
        buffer = io.BytesIO()
        try:
            np.savez(buffer, **arrays)  # object arrays are pickled: the loader must refuse them
        except (ValueError, TypeError):
            return False
        path.write_bytes(buffer.getvalue())
        return True
    torch = pytest.importorskip("torch")

    def tensors(v: Any) -> Any:
        if isinstance(v, np.ndarray) and v.dtype.kind in "iufb" and v.dtype != np.uint64:
            return torch.from_numpy(np.ascontiguousarray(v))
        if isinstance(v, dict):
            return {k: tensors(x) for k, x in v.items()}
        if isinstance(v, list):
            return [tensors(x) for x in v]
        return v

    buffer = io.BytesIO()
    torch.save(tensors(obj), buffer)
    path.write_bytes(buffer.getvalue())
    return True


def load_dump(path: Path, num_logical: int | None) -> Any:
    target = f"load_expert_distribution{path.suffix}"
    result = fuzz_call(target, moelb.load_expert_distribution, path, num_logical)
    if result is not None:
        count = result["logical_count"]
        assert count.dtype == np.int32 and count.ndim == 3, count
        assert (count >= 0).all()
        rate = result["average_utilization_rate_over_window"]
        assert rate is None or isinstance(rate, float)
    return result


@pytest.mark.parametrize("suffix", DUMP_FORMATS)
def test_load_expert_distribution_malformed_keys_and_values(work_dir: Path, suffix: str) -> None:
    if suffix == ".pt":
        pytest.importorskip("torch")
    rng = np.random.default_rng(mutation_seed(21))
    path = work_dir / f"dump{suffix}"
    for i in range(120):
        dump = corrupt_dump(valid_dump(rng, per_pass=bool(i % 2)), rng)
        if write_dump(dump, path):
            load_dump(path, [None, 3, 0, -1][i % 4])


@pytest.mark.parametrize("suffix", DUMP_FORMATS)
def test_load_expert_distribution_corrupt_bytes(work_dir: Path, suffix: str) -> None:
    if suffix == ".pt":
        pytest.importorskip("torch")
    rng = np.random.default_rng(mutation_seed(22))
    valid = work_dir / f"valid{suffix}"
    path = work_dir / f"corrupt{suffix}"
    for per_pass in (False, True):
        assert write_dump(valid_dump(rng, per_pass), valid)
        assert load_dump(valid, None) is not None
        for data in mutations(valid.read_bytes(), rng):
            path.write_bytes(data)
            load_dump(path, None)


@budget(60)
@given(document=json_values)
def test_load_expert_distribution_any_json(work_dir: Path, document: Any) -> None:
    path = work_dir / "any.json"
    path.write_text(json.dumps(document))
    load_dump(path, None)


def test_load_expert_distribution_npz_with_pickled_objects(work_dir: Path) -> None:
    """Object arrays need pickle, which the loader never runs."""
    path = work_dir / "pickled.npz"
    np.savez(path, rank=np.array(0), logical_count=np.array([{"a": 1}], dtype=object))
    with pytest.raises(moelb.InvalidArgumentError, match=r"not a readable \.npz"):
        moelb.load_expert_distribution(path)
    with zipfile.ZipFile(path) as z:  # really pickled, so the test means something
        assert any(b"pickle" in z.read(n) or b"\x80" in z.read(n)[:256] for n in z.namelist())


@pytest.mark.parametrize("suffix", [".json", ".pt"])
def test_per_pass_dump_without_records(work_dir: Path, suffix: str) -> None:
    if suffix == ".pt":
        pytest.importorskip("torch")
    path = work_dir / f"no_records{suffix}"
    dump = {"records": [], "last_physical_to_logical_map": np.array([[0, 1, 0]])}
    assert write_dump(dump, path)
    result = moelb.load_expert_distribution(path)  # found by this fuzzer: once a bare ValueError
    assert result["logical_count"].shape == (0, 1, 2)
    assert result["logical_count"].dtype == np.int32
    result = moelb.load_expert_distribution(path, num_logical_experts=3)
    assert result["logical_count"].shape == (0, 1, 3)


# ------------------------------------------------------------------------------------------------
# Routing.

SCORINGS = ["softmax", "sigmoid", "sqrtsoftplus", "relu"]


@st.composite
def topk_configs(draw: st.DrawFn, num_experts: int) -> Any:
    divisors = [g for g in range(1, num_experts + 1) if num_experts % g == 0]
    groups = draw(mostly(st.one_of(st.none(), st.sampled_from(divisors)), st.integers(-1, 9)))
    per_group = num_experts // groups if groups and groups > 0 else num_experts
    topk_group = None
    if groups is not None:
        topk_group = draw(mostly(st.integers(1, max(groups, 1)), st.integers(-1, 10)))
    kept = per_group * (topk_group or 1) if groups else num_experts
    return fuzz_call(
        "TopKConfig",
        moelb.TopKConfig,
        top_k=draw(mostly(st.integers(1, max(min(kept, num_experts), 1)), st.integers(-1, 20))),
        scoring=draw(mostly(st.sampled_from(SCORINGS[:3]), st.just("relu"))),
        num_groups=groups,
        topk_group=topk_group,
        group_score=draw(mostly(st.sampled_from(["top2_sum", "max"]), st.just("sum"))),
        renormalize=draw(st.booleans()),
        routed_scaling_factor=draw(
            mostly(st.sampled_from([1.0, 2.5]), st.sampled_from([0.0, -1.0, np.nan, np.inf]))
        ),
        apply_routed_scaling_factor_on_output=draw(st.booleans()),
        num_fused_shared_experts=draw(mostly(st.integers(0, 1), st.sampled_from([-1, 2]))),
    )


def check_topk(out: Any, num_tokens: int, max_id: int) -> None:
    ids, weights, recorder_ids = out
    assert ids.dtype == np.int32 and weights.dtype == np.float32 and recorder_ids.dtype == np.int32
    assert ids.shape == weights.shape and ids.shape[0] == num_tokens
    assert recorder_ids.shape[0] == num_tokens and recorder_ids.shape[1] <= ids.shape[1]
    assert ((ids >= -1) & (ids <= max_id)).all(), ids
    assert ((recorder_ids >= -1) & (recorder_ids < max_id)).all(), recorder_ids
    assert not weights[ids == -1].any()


@budget(300)
@given(data=st.data())
def test_select_experts_random_input(data: st.DataObject) -> None:
    num_tokens = data.draw(st.integers(0, 9))
    num_experts = data.draw(mostly(st.sampled_from([1, 4, 6, 8, 12]), st.integers(0, 13)))
    config = data.draw(topk_configs(max(num_experts, 1)))
    logits = data.draw(float_arrays((num_tokens, num_experts)))
    logits = data.draw(mostly(st.just(logits), odd_layout(logits)))
    bias = data.draw(
        mostly(
            st.one_of(st.none(), float_arrays((num_experts,))),
            st.one_of(float_arrays((num_experts + 1,)), float_arrays((1, num_experts))),
        )
    )
    location = data.draw(st.one_of(st.none(), locations(num_experts)))
    recorder = None
    if location is not None and data.draw(st.booleans()):
        recorder = moelb.ExpertDistributionRecorder(location)
        recorder.start()
        recorder.begin_forward_pass()
        if location.num_layers:
            recorder.begin_layer(0)
    kwargs = {
        "num_token_non_padded": data.draw(
            mostly(st.one_of(st.none(), st.integers(0, num_tokens)), any_ints)
        ),
        "location": location,
        "layer": data.draw(mostly(st.one_of(st.none(), st.integers(0, 2)), any_ints)),
        "ep_rank": data.draw(mostly(st.integers(0, 3), any_ints)),
        "recorder": recorder,
        "dispatch": data.draw(
            mostly(
                st.sampled_from([d for d in moelb.DISPATCH_ALGORITHMS if d != "equal_split"]),
                st.just("none"),
            )
        ),
        "seed": data.draw(mostly(st.integers(0, 9), any_ints)),
    }
    if config is None:
        config = moelb.TopKConfig(top_k=1)
    out = fuzz_call("select_experts", moelb.select_experts, logits, config, bias, **kwargs)
    if out is not None:
        max_id = num_experts if location is None else location.num_physical_experts
        check_topk(out, np.shape(logits)[0], max_id)


@budget(250)
@given(data=st.data())
def test_hash_router_random_input(data: st.DataObject) -> None:
    vocab = data.draw(mostly(st.integers(1, 6), st.just(0)))
    top_k = data.draw(mostly(st.integers(1, 4), st.just(0)))
    num_experts = data.draw(mostly(st.integers(max(top_k, 1), 8), st.integers(0, 1)))
    tid2eid = data.draw(int_arrays((vocab, top_k), 0, max(num_experts, 1)))
    tid2eid = data.draw(mostly(st.just(tid2eid), odd_layout(tid2eid)))
    router = fuzz_call(
        "HashRouter",
        moelb.HashRouter,
        tid2eid,
        scoring=data.draw(mostly(st.sampled_from(SCORINGS[:3]), st.just("relu"))),
        routed_scaling_factor=data.draw(
            mostly(st.sampled_from([1.0, 1.5]), st.sampled_from([0.0, -2.0, np.nan]))
        ),
        num_fused_shared_experts=data.draw(mostly(st.integers(0, 1), st.just(2))),
        apply_routed_scaling_factor_on_output=data.draw(st.booleans()),
        num_experts=data.draw(mostly(st.sampled_from([None, num_experts]), st.integers(-1, 9))),
    )
    if router is None:
        return
    num_tokens = data.draw(st.integers(0, 8))
    width = data.draw(mostly(st.just(num_experts), st.sampled_from([num_experts + 1, 0])))
    logits = data.draw(float_arrays((num_tokens, width)))
    logits = data.draw(mostly(st.just(logits), odd_layout(logits)))
    input_ids = data.draw(int_arrays((num_tokens,), 0, max(vocab, 1)))
    input_ids = data.draw(mostly(st.just(input_ids), odd_layout(input_ids)))
    location = data.draw(st.one_of(st.none(), locations(num_experts)))
    out = fuzz_call(
        "HashRouter.select",
        router.select,
        logits,
        input_ids,
        data.draw(maybe_ints),
        location,
        data.draw(mostly(st.one_of(st.none(), st.integers(0, 2)), any_ints)),
        data.draw(mostly(st.integers(0, 3), any_ints)),
        dispatch=data.draw(
            st.sampled_from([d for d in moelb.DISPATCH_ALGORITHMS if d != "equal_split"])
        ),
    )
    if out is not None:
        max_id = width if location is None else location.num_physical_experts
        check_topk(out, np.shape(logits)[0], max(max_id, num_experts))


# ------------------------------------------------------------------------------------------------
# Planners.

ALGORITHMS = ["moelb", "deepseek", "deepseek_hierarchical", "deepseek_global", "greedy"]


@pytest.mark.parametrize("algorithm", ["moelb", "deepseek"])
def test_rebalance_huge_slot_counts_regression(algorithm: str) -> None:
    """Slot counts above 2**20 per layer are refused at once; at 2**20 the planner is quick even
    with every slot on one or two GPUs (the duplicate repair was once quadratic in slots per GPU:
    2**20 slots on 2 GPUs took minutes)."""
    load = np.arange(1, 9, dtype=np.float64)[None]
    for slots in (2**20 + 1, 2**31 - 1):
        with pytest.raises(moelb.InvalidArgumentError, match=rf"num_physical_experts={slots} "):
            moelb.rebalance(load, slots, None, 1, 1, algorithm)
    for gpus in (1, 2):
        started = time.perf_counter()
        plan = moelb.rebalance(load, 2**20, None, 1, gpus, algorithm)
        assert time.perf_counter() - started < 60  # minutes before the fix, ~0.1 s now
        assert plan.location.logical_count.sum() == 2**20


@budget(250)
@given(data=st.data())
def test_rebalance_random_input(data: st.DataObject) -> None:
    num_layers = data.draw(mostly(st.integers(1, 3), st.just(0)))
    num_experts = data.draw(mostly(st.sampled_from([2, 4, 6, 8, 12, 16]), st.integers(0, 3)))
    shape = data.draw(
        mostly(
            st.just((num_layers, num_experts)),
            st.sampled_from([(2, num_layers, num_experts), (num_experts,), (1, 1, 1, 1)]),
        )
    )
    load = data.draw(float_arrays(shape, np.float64))  # NaN, inf, negative, huge
    if data.draw(mostly(st.just(True), st.just(False))):
        load = np.nan_to_num(np.abs(load), nan=1.0, posinf=1e6)
        load = load.round() if data.draw(st.booleans()) else load
    load = data.draw(mostly(st.just(load), odd_layout(load)))
    ep_size = data.draw(mostly(st.sampled_from([1, 2, 4]), st.sampled_from([-1, 0, 3, 2**31])))
    num_nodes = data.draw(mostly(st.sampled_from([1, 2]), st.sampled_from([-1, 0, 3])))
    num_groups = data.draw(mostly(st.sampled_from([None, 1, 2, 4]), st.sampled_from([-1, 0, 3])))
    slots = -(-max(num_experts, 1) // max(ep_size, 1)) + data.draw(st.integers(0, 2))
    # 2**31 - 1 fits int32 but is above the 2**20 slots a layer may have: once accepted, it ran
    # for hours (and allocated gigabytes) with one GPU.
    num_physical = data.draw(
        mostly(
            st.just(slots * max(ep_size, 1)),
            st.sampled_from([-1, 0, 7, 2**20 + 1, 2**31 - 1, 2**31, -(2**63)]),
        )
    )
    previous = data.draw(st.one_of(st.none(), locations(num_experts)))
    plan = fuzz_call(
        "rebalance",
        moelb.rebalance,
        load,
        num_physical,
        num_groups,
        num_nodes,
        ep_size,
        data.draw(mostly(st.sampled_from(ALGORITHMS[:4]), st.just("greedy"))),
        previous,
        locality=data.draw(mostly(st.sampled_from(["auto", "node", "none"]), st.just("rack"))),
        move_cost=data.draw(mostly(st.sampled_from([0.0, 0.1]), st.sampled_from([-1, np.nan]))),
        max_moves=data.draw(mostly(st.one_of(st.none(), st.integers(0, 20)), st.just(-1))),
        expert_bytes=data.draw(mostly(st.one_of(st.none(), st.integers(0, 100)), st.just(-1))),
    )
    if plan is not None:
        location = plan.location
        assert location.num_physical_experts == num_physical
        assert (location.logical_count >= 1).all()
        stats = fuzz_call("evaluate_placement", moelb.evaluate_placement, load, location, previous)
        assert stats is not None
        assert np.isfinite(stats.max_rank_load).all()


@budget(200)
@given(data=st.data(), layer=mostly(st.integers(0, 2), any_ints))
def test_plan_weight_moves_random_input(data: st.DataObject, layer: int) -> None:
    num_experts = data.draw(mostly(st.integers(1, 8), st.integers(-1, 9)))
    old = data.draw(locations(num_experts))
    if old is None:
        return
    if data.draw(mostly(st.just(True), st.just(False))):  # the same shape, slots shuffled
        rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
        shuffled = np.array([rng.permutation(row) for row in old.physical_to_logical])
        new = moelb.ExpertLocation(shuffled, old.num_logical_experts, old.ep_size, old.num_nodes)
    else:
        new = data.draw(locations(num_experts))
        if new is None:
            return
    plan = fuzz_call("plan_weight_moves", moelb.plan_weight_moves, old, new, layer)
    if plan is not None:
        slots = old.physical_to_logical[layer].reshape(plan.ep_size, plan.slots_per_rank)
        moved = moelb.apply_weight_moves(plan, slots, location=old)
        np.testing.assert_array_equal(moved.reshape(-1), new.physical_to_logical[layer])


@budget(250)
@given(data=st.data())
def test_waterfill_expand_random_input(data: st.DataObject) -> None:
    ep_size = data.draw(mostly(st.integers(1, 5), st.integers(-1, 0)))
    num_physical = data.draw(
        mostly(st.integers(1, 4).map(lambda s: s * max(ep_size, 1)), st.integers(-1, 16))
    )
    balancer = fuzz_call(
        "WaterfillBalancer",
        moelb.WaterfillBalancer,
        num_physical,
        ep_size,
        data.draw(mostly(st.integers(0, max(ep_size - 1, 0)), st.integers(-1, 6))),
        data.draw(mostly(st.sampled_from([1.0, 2.5]), st.sampled_from([0.0, -1.0, np.nan]))),
        data.draw(mostly(st.just("static"), st.sampled_from(["dynamic", "none"]))),
        data.draw(mostly(st.just(None), st.sampled_from([lambda b: b, lambda b: b[:1]]))),
        apply_routed_scaling_factor_on_output=data.draw(st.booleans()),
    )
    if balancer is None:
        return
    num_tokens = data.draw(st.integers(0, 80))
    top_k = data.draw(mostly(st.integers(1, 4), st.just(0)))
    ids = data.draw(int_arrays((num_tokens, top_k), -1, num_physical))
    ids = data.draw(mostly(st.just(ids), odd_layout(ids)))
    weight_shape = data.draw(mostly(st.just((num_tokens, top_k)), st.just((num_tokens, top_k + 1))))
    weights = data.draw(float_arrays(weight_shape))
    weights = data.draw(mostly(st.just(weights), odd_layout(weights)))
    out = fuzz_call(
        "WaterfillBalancer.expand",
        balancer.expand,
        ids,
        weights,
        data.draw(mostly(st.one_of(st.none(), st.integers(0, 100)), any_ints)),
        data.draw(st.booleans()),
    )
    if out is not None:
        new_ids, new_weights = out
        rows, cols = np.shape(ids)
        assert new_ids.shape == (rows, cols + 1) == new_weights.shape
        slots = balancer.num_physical_experts + balancer.ep_size
        assert ((new_ids >= -1) & (new_ids < slots)).all()


# ------------------------------------------------------------------------------------------------
# Recorder hooks.

RECORDER_OPS = [
    "begin_pass",
    "end_pass",
    "abandon_pass",
    "begin_layer",
    "end_layer",
    "select",
    "select",
    "select",
    "dispatch",
    "dispatch",
]


@st.composite
def recorder_programs(draw: st.DrawFn) -> tuple[Any, list[tuple[str, Any]]]:
    num_layers, ep_size = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    num_physical = ep_size * draw(st.integers(1, 4))
    location = moelb.ExpertLocation.trivial(num_layers, num_physical, num_physical, ep_size)

    def hook() -> tuple[str, Any]:
        if draw(st.booleans()):
            shape = (draw(st.integers(0, 6)), draw(st.integers(0, 3)))
            ids = draw(int_arrays(shape, -1, num_physical))
            ids = draw(mostly(st.just(ids), odd_layout(ids)))
            layer = draw(mostly(st.none(), st.integers(-1, num_layers)))
            return "select", (ids, layer)
        slots = num_physical // ep_size
        trailing = draw(mostly(st.integers(0, 1), st.sampled_from([-1, 2])))
        size = slots + max(trailing, 0) + draw(mostly(st.just(0), st.sampled_from([-1, 1])))
        counts = draw(int_arrays((size,), 0, 9))
        counts = draw(
            mostly(
                st.just(counts),
                st.sampled_from([-1, 2**33]).map(lambda f: counts.astype(np.int64) * f),
            )
        )
        return "dispatch", (
            counts,
            draw(mostly(st.integers(0, ep_size - 1), st.just(ep_size))),
            trailing,
        )

    program: list[tuple[str, Any]] = []
    for _ in range(draw(st.integers(1, 4))):
        if draw(mostly(st.just(True), st.just(False))):  # a well-formed pass
            program.append(("begin_pass", None))
            for _ in range(draw(st.integers(0, 3))):
                program.append(("begin_layer", draw(st.integers(0, num_layers - 1))))
                program.extend(hook() for _ in range(draw(st.integers(0, 3))))
                program.append(("end_layer", None))
            program.append((draw(mostly(st.just("end_pass"), st.just("abandon_pass"))), None))
        else:  # anything in any order
            for _ in range(draw(st.integers(1, 6))):
                op = draw(st.sampled_from(RECORDER_OPS))
                if op in ("select", "dispatch"):
                    program.append(hook())
                elif op == "begin_layer":
                    program.append((op, draw(st.integers(-1, num_layers))))
                else:
                    program.append((op, None))
    return location, program


def run_recorder_program(rec: Any, program: list[tuple[str, Any]]) -> tuple[int, list[int]]:
    """Runs the program; returns the counts offered in the open pass and those of each pass that
    ended (as the successful calls say they should be counted)."""
    open_pass = 0
    ended: list[int] = []
    slots = rec.num_physical_experts // rec.location.ep_size
    for op, arg in program:
        target = "recorder." + op
        if op == "begin_pass":
            if succeeded(target, rec.begin_forward_pass):
                open_pass = 0
        elif op == "end_pass":
            if succeeded(target, rec.end_forward_pass):
                ended.append(open_pass)
                open_pass = 0
        elif op == "abandon_pass":
            if succeeded(target, rec.abandon_forward_pass):
                open_pass = 0
        elif op == "begin_layer":
            fuzz_call(target, rec.begin_layer, arg)
        elif op == "end_layer":
            fuzz_call(target, rec.end_layer)
        elif op == "select":
            ids, layer = arg
            if succeeded(target, rec.on_select_experts, ids, layer):
                open_pass += int((np.asarray(ids) >= 0).sum())
        else:
            counts, rank, trailing = arg
            if succeeded(target, rec.on_dispatch_counts, counts, rank, trailing):
                open_pass += int(np.asarray(counts)[:slots].sum())
    return open_pass, ended


@budget(300)
@given(setup=recorder_programs(), mode=st.sampled_from(["stat", "per_pass", "per_token"]))
def test_recorder_hooks_random_programs(
    setup: tuple[Any, list[tuple[str, Any]]], mode: str
) -> None:
    """Whatever the order of scopes and hooks, successful hooks are counted exactly once in the
    pass they were made in, and failed ones not at all."""
    location, program = setup
    rec = moelb.ExpertDistributionRecorder(location, mode, buffer_size=-1)
    rec.start()
    _, ended = run_recorder_program(rec, program)
    counts = rec.physical_count()
    assert counts.shape[0] == len(ended)
    assert counts.sum(axis=(1, 2)).tolist() == ended
    assert (counts >= 0).all()
    if ended:
        logical = rec.logical_count()
        np.testing.assert_array_equal(logical.sum(axis=(1, 2)), counts.sum(axis=(1, 2)))


@pytest.mark.parametrize("mode", ["stat", "per_pass", "per_token"])
def test_recorder_select_after_a_full_slot_regression(mode: str) -> None:
    """Found by CI's fresh run of the program fuzzer above: a dispatch of 2**31 - 1 tokens to a
    slot, then one more selected for it, wrapped the slot's int32 count to -2**31. The select
    must be refused and count nothing."""
    location = moelb.ExpertLocation.trivial(1, 1, 1, 1)
    rec = moelb.ExpertDistributionRecorder(location, mode, buffer_size=-1)
    rec.start()
    program: list[tuple[str, Any]] = [
        ("begin_pass", None),
        ("begin_layer", 0),
        ("dispatch", (np.array([2**31 - 1], dtype=np.int32), 0, 0)),
        ("select", (np.array([[0]], dtype=np.int32), None)),
        ("end_layer", None),
        ("end_pass", None),
    ]
    _, ended = run_recorder_program(rec, program)
    assert ended == [2**31 - 1]
    assert rec.physical_count().tolist() == [[[2**31 - 1]]]
    with rec.forward_pass(), rec.layer(0):
        rec.on_dispatch_counts(np.array([2**31 - 2]), 0)
        with pytest.raises(moelb.InvalidArgumentError, match=r"adds 2 to slot 0"):
            rec.on_select_experts(np.array([[0], [0]], dtype=np.int32))
        rec.on_select_experts(np.array([[0], [-1]], dtype=np.int32))
    assert rec.physical_count()[-1].tolist() == [[2**31 - 1]]


@budget(100)
@given(
    setup=recorder_programs(),
    buffer_size=st.sampled_from([-1, 1, 2, 1000]),
    control=st.lists(st.sampled_from(["start", "stop", "clear", "dump", "merge"]), max_size=4),
)
def test_recorder_life_cycle_random(
    setup: tuple[Any, list[tuple[str, Any]]], buffer_size: int, control: list[str]
) -> None:
    location, program = setup
    rec = moelb.ExpertDistributionRecorder(location, "per_token", buffer_size=buffer_size)
    half = len(program) // 2
    for chunk, op in zip((program[:half], program[half:]), [*control, "start"][:2], strict=False):
        run_recorder_program(rec, chunk)
        if op == "merge":
            fuzz_call("recorder.merge", rec.merge, moelb.ExpertDistributionRecorder(location))
        elif op == "dump":
            fuzz_call("recorder.dump", rec.dump)
        else:
            fuzz_call(f"recorder.{op}", getattr(rec, op))
    counts = rec.physical_count()
    assert (counts >= 0).all()
    assert buffer_size < 0 or counts.shape[0] <= buffer_size
    if rec.num_passes:
        for layer in range(rec.num_layers):
            rec.token_ids(rec.num_passes - 1, layer)


# ------------------------------------------------------------------------------------------------
# The MoE layer.


@st.composite
def moe_configs(draw: st.DrawFn) -> Any:
    num_experts = draw(st.sampled_from([1, 2, 4, 6]))
    groups = draw(mostly(st.sampled_from([None, None, 1, 2]), st.just(3)))
    hash_layers = draw(st.sampled_from([0, 0, 1]))
    shared = draw(mostly(st.integers(0, 1), st.just(2)))
    return fuzz_call(
        "DeepSeekMoEConfig",
        moelb.DeepSeekMoEConfig,
        hidden_size=draw(st.integers(1, 8)),
        intermediate_size=draw(st.integers(1, 4)),
        num_experts=num_experts,
        top_k=draw(mostly(st.integers(1, max(num_experts // (groups or 1), 1)), st.just(9))),
        num_shared_experts=shared,
        fuse_shared_experts=draw(mostly(st.just(False), st.just(True))) if shared else False,
        scoring=draw(st.sampled_from(SCORINGS[:3])),
        num_groups=groups,
        topk_group=None if groups is None else draw(mostly(st.just(groups), st.just(0))),
        renormalize=draw(mostly(st.just(True), st.just(False))),
        routed_scaling_factor=draw(mostly(st.sampled_from([1.0, 2.5]), st.just(np.nan))),
        num_hash_layers=hash_layers,
        layer_id=0,
        vocab_size=draw(st.integers(1, 5)) if hash_layers else 0,
        swiglu_limit=draw(mostly(st.sampled_from([None, 10.0, 0.0]), st.just(np.nan))),
        kernel=draw(mostly(st.sampled_from(["out_of_place", "inplace"]), st.just("fast"))),
    )


@budget(150)
@given(config=moe_configs(), data=st.data())
def test_moe_forward_random_input(config: Any, data: st.DataObject) -> None:
    if config is None:
        return
    weights = moelb.random_moe_weights(config, seed=data.draw(st.integers(0, 3)))
    if data.draw(st.integers(0, 3)) == 0:  # one array of the wrong shape or dtype
        name = data.draw(st.sampled_from(sorted(k for k, v in weights.items() if v is not None)))
        a = weights[name]
        weights[name] = data.draw(
            st.sampled_from(
                [a[..., :-1] if a.shape[-1] > 1 else a[:0], a.astype(np.float16), a[None], a.T]
            )
        )
    location = data.draw(st.one_of(st.none(), locations(config.num_experts)))
    layer = fuzz_call(
        "DeepSeekMoE",
        moelb.DeepSeekMoE,
        config,
        weights,
        location=location,
        layer=data.draw(mostly(st.just(0), st.integers(-1, 2))),
        ep_rank=data.draw(mostly(st.just(0), st.integers(-1, 2))),
    )
    if layer is None:
        return
    num_tokens = data.draw(st.integers(0, 6))
    width = data.draw(st.sampled_from([config.hidden_size] * 3 + [config.hidden_size + 1]))
    hidden = data.draw(float_arrays((num_tokens, width)))
    hidden = data.draw(mostly(st.just(hidden), odd_layout(hidden)))
    vocab = max(config.vocab_size, 1)
    valid_ids = st.integers(0, 2**32 - 1).map(
        lambda seed: np.random.default_rng(seed).integers(0, vocab, num_tokens)
    )
    input_ids = data.draw(
        mostly(
            valid_ids if config.is_hash_layer else st.none(),
            st.one_of(st.none(), int_arrays((num_tokens,), -1, vocab + 1)),
        )
    )
    out = fuzz_call("DeepSeekMoE.forward", layer.forward, hidden, input_ids)
    if out is not None:
        assert out.shape == (num_tokens, config.hidden_size) and out.dtype == np.float32


# ------------------------------------------------------------------------------------------------
# Memory: repeated calls, successful and failing, must not grow the resident set.


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def steady_rss_growth(fn: Callable[[], Any], calls: int) -> int:
    """RSS growth over `calls` calls after as many warm-up calls (allocator pools settle)."""
    for _ in range(calls):
        fn()
    gc.collect()
    before = resident_bytes()
    for _ in range(calls):
        fn()
    gc.collect()
    return resident_bytes() - before


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc")
@pytest.mark.skipif(
    "libasan" in os.environ.get("LD_PRELOAD", ""),
    reason="AddressSanitizer's quarantine holds freed memory, so RSS grows by design",
)
def test_repeated_calls_do_not_grow_memory(work_dir: Path) -> None:
    rng = np.random.default_rng(mutation_seed(5))
    logits = rng.normal(size=(512, 64)).astype(np.float32)
    config = moelb.TopKConfig(top_k=8, scoring="sigmoid", num_groups=8, topk_group=4)
    location = moelb.ExpertLocation.trivial(2, 64, 72, 8)
    recorder = moelb.ExpertDistributionRecorder(location, buffer_size=4)
    recorder.start()
    hash_router = moelb.HashRouter(rng.integers(0, 64, (1000, 6)).astype(np.int32))
    token_ids = rng.integers(0, 1000, 512).astype(np.int32)
    balancer = moelb.WaterfillBalancer(72, 8, 0)
    moe_config = moelb.DeepSeekMoEConfig(
        hidden_size=32, intermediate_size=16, num_experts=8, top_k=2
    )
    layer = moelb.DeepSeekMoE(moe_config)
    hidden = rng.normal(size=(64, 32)).astype(np.float32)
    load = rng.random((2, 64)) * 100
    bad_placement = work_dir / "bad_placement.json"
    bad_placement.write_text('{"physical_to_logical_map": [[0, 1, 2], [0, 1]]}')
    bad_npz = work_dir / "bad.npz"
    bad_npz.write_bytes(b"PK\x03\x04" + bytes(200))

    def routed_and_recorded() -> None:
        with recorder.forward_pass(), recorder.layer(1):
            out = moelb.select_experts(
                logits, config, location=location, layer=1, recorder=recorder
            )
        balancer.expand(out.recorder_topk_ids, out.topk_weights[:, :8])

    def failing() -> None:
        for fn, args in (
            (moelb.select_experts, (logits[:, :63], config)),  # 63 experts, 8 groups
            (hash_router.select, (logits, token_ids + 1000)),  # ids out of range
            (moelb.rebalance, (load, 70, 8, 1, 8)),  # 70 % 8 != 0
            (moelb.load_placement, (bad_placement, 1)),
            (moelb.load_expert_distribution, (bad_npz,)),
            (layer.forward, (hidden[:, :31],)),
            (recorder.on_select_experts, (np.full((512, 8), 99, np.int32),)),
        ):
            with pytest.raises(TYPED_ERRORS):
                fn(*args)

    cases = {
        "select_experts+recorder+waterfill": routed_and_recorded,
        "HashRouter.select": lambda: hash_router.select(logits, token_ids),
        "rebalance": lambda: moelb.rebalance(load, 72, 8, 1, 8),
        "DeepSeekMoE.forward": lambda: layer.forward(hidden),
        "error paths": failing,
    }
    limit = 8 << 20
    for name, fn in cases.items():
        start = time.perf_counter()
        growth = steady_rss_growth(fn, 300)
        stats = STATS[f"memory: {name}"]
        stats.inputs += 600
        stats.seconds += time.perf_counter() - start
        assert growth < limit, f"{name}: RSS grew {growth / 2**20:.1f} MiB over 300 calls"


def test_corrupt_dump_after_records_were_replaced_regression() -> None:
    """make fuzz (seed 12345) found the mutator itself failing when an earlier mutation had
    replaced ``records`` by an array (its truth value is ambiguous); every mutation of such a
    dump must now go through."""
    for seed in range(300):
        rng = np.random.default_rng(seed)
        dump = {"records": np.zeros((2, 3), dtype=np.int32), "last_physical_to_logical_map": [[0]]}
        corrupt_dump(dump, rng)
