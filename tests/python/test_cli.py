"""The moelb command line: the demo runs and prints its table; bad flags fail clearly."""

from __future__ import annotations

import subprocess
import sys


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "moelb", *args], capture_output=True, text=True, timeout=120
    )


def test_demo_prints_the_routing_table() -> None:
    result = run("demo", "--num-tokens", "512", "--repeats", "1", "--threads", "1")
    assert result.returncode == 0, result.stderr
    for router in ("DeepSeek-V3", "DeepSeek-V4-Flash", "DeepSeek-V4 hash layer"):
        assert router in result.stdout
    assert "rank balancedness" in result.stdout
    assert "token 0:" in result.stdout


def test_demo_rejects_an_ep_size_that_does_not_divide_the_experts() -> None:
    result = run("demo", "--num-tokens", "64", "--repeats", "1", "--ep-size", "7")
    assert result.returncode == 2
    assert "num_physical_experts=256 is not divisible by ep_size=7" in result.stderr


def test_bad_flags_exit_non_zero() -> None:
    assert run("demo", "--num-tokens", "-5").returncode != 0
    assert run("no-such-command").returncode != 0
    result = run("--version")
    assert result.returncode == 0 and result.stdout.startswith("moelb ")


def test_closed_pipe_is_not_an_error() -> None:
    demo = subprocess.Popen(
        [sys.executable, "-m", "moelb", "demo", "--num-tokens", "256", "--repeats", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert demo.stdout is not None
    demo.stdout.readline()
    demo.stdout.close()  # like `moelb demo | head -1`
    _, err = demo.communicate(timeout=120)
    assert demo.returncode == 0, err.decode()
    assert b"Traceback" not in err
