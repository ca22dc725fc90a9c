"""Helpers shared by the benchmark scripts: plain-text tables, atomic JSON results, the machine's
load average and the line that describes the machine."""

from __future__ import annotations

import json
import os
import platform
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    left: Sequence[int] = (0,),
    separate_every: int | None = None,
) -> str:
    """Columns padded to their widest cell: those in ``left`` left-aligned, the others right; a
    blank line every ``separate_every`` rows."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        padded = (
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )
        return "  ".join(padded).rstrip()

    rule = "  ".join("-" * w for w in widths)
    lines = [line(header), rule]
    for i, r in enumerate(rows):
        if separate_every and i and i % separate_every == 0:
            lines.append("")
        lines.append(line(r))
    return "\n".join(lines)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Writes ``payload`` to ``path`` atomically (a temporary file beside it, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_average() -> float | None:
    """The 1-minute load average (other work competing for the CPUs), where the OS reports it."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def machine_summary(load: float | None, versions: dict[str, str | None]) -> str:
    """ "2 CPUs (x86_64), load average 0.61; moelb 0.1.0, numpy 2.4.6, ...": the CPUs, the load
    average when known and the versions that are not None, for a benchmark's first line."""
    return (
        f"{os.cpu_count()} CPUs ({platform.machine()})"
        + ("" if load is None else f", load average {load:.2f}")
        + "; "
        + ", ".join(f"{k} {v}" for k, v in versions.items() if v is not None)
    )
