"""Output helpers of the ``moelb`` command: plain-text tables, the progress bar on stderr, number
formatting, JSON on stdout and atomically written text files. DESIGN section 7 ("results print as
a table and can be saved as JSON"; "long work shows progress")."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from ..io import atomic_write_bytes

__all__ = ["ProgressBar", "fixed", "gigabytes", "print_json", "table", "write_text"]


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([fmt(headers), "  ".join("-" * w for w in widths), *map(fmt, rows)])


class ProgressBar:
    """A one-line progress bar on a terminal (stderr); silent when the stream is not a terminal
    unless forced."""

    def __init__(
        self, label: str, stream: TextIO | None = None, enabled: bool | None = None
    ) -> None:
        # sys.stderr as it is now (a redirect after import is followed), not at import time.
        self.label, self.stream = label, sys.stderr if stream is None else stream
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.start = time.perf_counter()
        self.last_draw = -1.0
        self.width = 30

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if done < total and now - self.last_draw < 0.1:
            return
        self.last_draw = now
        fraction = done / total if total else 1.0
        filled = int(self.width * fraction)
        bar = "#" * filled + "-" * (self.width - filled)
        elapsed = now - self.start
        eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
        self.stream.write(
            f"\r{self.label} [{bar}] {done}/{total} {elapsed:5.1f}s (eta {eta:4.1f}s)"
        )
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()


def fixed(value: float | None, digits: int = 3) -> str:
    """``value`` with ``digits`` decimals; "-" for None."""
    return "-" if value is None else f"{value:.{digits}f}"


def gigabytes(values: Sequence[int]) -> str:
    """The mean of byte counts in GB with one decimal; "-" for none."""
    return f"{np.mean(values) / 1e9:.1f}" if values else "-"


def print_json(payload: Any) -> None:
    json.dump(payload, sys.stdout, indent=2)
    sys.stdout.write("\n")


def write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())
