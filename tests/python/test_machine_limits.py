"""moelb.measure_machine_limits: a smoke test on small sizes (positive, finite figures on 1 and 2
threads; the option checks), not a timing test."""

from __future__ import annotations

import math

import moelb
import pytest

QUICK = {"buffer_bytes": 4 << 20, "passes": 2, "seconds": 0.005}


@pytest.mark.parametrize("threads", [1, 2])
def test_figures_are_positive_and_finite(threads: int) -> None:
    if threads > moelb.get_num_threads():
        pytest.skip("fewer worker threads than asked")
    limits = moelb.measure_machine_limits(threads, **QUICK)
    assert isinstance(limits, moelb.MachineLimits)
    assert limits.threads == threads
    assert limits.cpu_isa == moelb.cpu_isa()
    assert limits.passes == 2
    assert 0 < limits.buffer_bytes <= 4 << 20
    for value in (limits.read_bandwidth_gbs, limits.fma_peak_gflops, limits.bf16_dot_peak_gflops):
        assert math.isfinite(value) and value > 0
    assert limits.bf16_dot_method
    assert limits.as_dict()["read_bandwidth_gbs"] == limits.read_bandwidth_gbs


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"threads": 0}, "threads must be >= 1, got 0"),
        ({"buffer_bytes": 1000}, r"buffer_bytes must be >= 1 MiB \(1048576\), got 1000"),
        ({"passes": 0}, "passes must be >= 1, got 0"),
        ({"seconds": 0.0}, "seconds must be finite and >= 0.001"),
        ({"seconds": 1e-9}, "seconds must be finite and >= 0.001"),
        ({"seconds": float("inf")}, "seconds must be finite and >= 0.001"),
    ],
)
def test_refuses_bad_options(options: dict[str, float], message: str) -> None:
    kwargs = {"threads": 1, **QUICK, **options}
    with pytest.raises(moelb.InvalidArgumentError, match=message):
        moelb.measure_machine_limits(**kwargs)  # type: ignore[arg-type]
