"""What the ``moelb`` commands share: the user-facing error (one line on stderr, exit status 2)
and reading the per-pass counts of an expert distribution dump (rebalance, inspect). DESIGN
section 7 (files and CLI) and the error conventions of "Conventions shared by every area"."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..io import load_expert_distribution

__all__ = ["CliError", "load_dump", "one_line"]


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def one_line(error: BaseException, limit: int = 400) -> str:
    """An error message on one line (library messages may span several), shortened to
    ``limit`` characters."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_dump(path: str, num_logical_experts: int | None = None) -> np.ndarray:
    """The logical counts [T, L, E] of the dump (file or folder) at ``path``; a missing file or
    a dump without passes is a ``CliError``."""
    if not Path(path).exists():
        raise CliError(f"dump file {path!r} does not exist")
    dump = load_expert_distribution(path, num_logical_experts)
    counts = np.asarray(dump["logical_count"])
    if counts.shape[0] == 0:
        raise CliError(f"dump file {path!r} holds no forward passes")
    return counts
