"""Hand-written GPU calibrations for the tests of the step-time model: test fixtures with round
numbers a test can compute by hand, never measured data and never shipped (the package's
measured calibrations live in python/moelb/data/gpus/). ``shipped_or_fixture`` gives the shipped
default calibration when the package has it, else the fixture, for the tests that hold for any
calibration."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import moelb

#: DeepSeek-V3's routed expert: 3 x 7168 x 2048 parameters.
V3_PARAMETERS = 3 * 7168 * 2048

TOY_CALIBRATION: dict[str, Any] = {
    "format": "moelb-gpu-calibration",
    "version": 1,
    "key": "toy",
    "gpu": "hand-written test fixture (not a measurement)",
    "sm_count": 1,
    "memory_bytes": 1,
    "torch": "-",
    "cuda": "-",
    "driver": "-",
    "date": "2026-01-01",
    "command": "written by hand in tests/python/gpu_fixtures.py",
    "memory_bandwidth_bytes_per_s": 2e12,
    "layer_fixed_s": 1e-5,
    "gemm": [
        {
            "model": "deepseek-v3",
            "dtype": "fp8_e4m3",
            "hidden_size": 7168,
            "intermediate_size": 2048,
            "weight_bytes_per_expert": V3_PARAMETERS,  # W / BW = 22.020096 us
            "method": "fixture",
            "tokens": [0, 64, 128, 256, 512, 1024],
            "seconds_per_expert": [0.0, 2.0e-5, 2.5e-5, 4.0e-5, 7.0e-5, 1.3e-4],
        },
        {
            "model": "deepseek-v3",
            "dtype": "bf16",
            "hidden_size": 7168,
            "intermediate_size": 2048,
            "weight_bytes_per_expert": 2 * V3_PARAMETERS,
            "method": "fixture",
            "tokens": [0, 128, 1024],
            "seconds_per_expert": [0.0, 5.0e-5, 2.0e-4],
        },
    ],
    "notes": "fixture",
}


def toy_calibration() -> dict[str, Any]:
    """A fresh copy of the fixture (tests may break it)."""
    return copy.deepcopy(TOY_CALIBRATION)


def write_calibration(folder: Path, data: dict[str, Any] | None = None) -> Path:
    """Writes ``data`` (default: the fixture) to ``folder/toy.json``; returns the path."""
    path = folder / "toy.json"
    path.write_text(json.dumps(toy_calibration() if data is None else data))
    return path


def shipped_or_fixture(folder: Path) -> str:
    """The shipped default calibration's key when the package has it, else the fixture's path
    (written to ``folder``)."""
    if moelb.DEFAULT_GPU in moelb.available_gpus():
        return moelb.DEFAULT_GPU
    return str(write_calibration(folder))
