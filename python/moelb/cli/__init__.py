"""The ``moelb`` command line (also ``python -m moelb``): what EPLB and Waterfill buy on a cluster.

  moelb demo                     the main job: a DeepSeek-V3-like model on 32 GPUs in 4 nodes with
                                 32 redundant experts and skewed, drifting traffic; prints the
                                 comparison table, writes a placement JSON and PNG plots
  moelb simulate [flags]         the same with every knob as a flag, or replaying a recorded dump
  moelb rebalance DUMP -o FILE   an SGLang expert distribution dump -> a placement JSON for
                                 SGLang's --init-expert-location
  moelb inspect FILE             per-layer statistics of a placement or a dump

Errors are one line on stderr and a non-zero exit status (2: bad flags or input, 1: other).

This package is DESIGN section 7's CLI, one module per concern: ``parser`` (the flags),
``simulate_cmd`` and ``simulate_report`` (demo / simulate and their report), ``rebalance_cmd``,
``inspect_cmd``, ``output`` (tables, progress, JSON) and ``common`` (the user-facing error, dumps);
``main`` here runs a command and turns its errors into one line and an exit status.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from .._core import Error, InvalidArgumentError
from .common import CliError, one_line
from .parser import build_parser

__all__ = ["build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (CliError, InvalidArgumentError) as e:
        print(f"moelb {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`moelb demo | head`): not an error
        sys.stdout = open(os.devnull, "w")  # keeps the interpreter quiet at exit
        return 0
    except OSError as e:  # unwritable output folder, disk full, ...
        print(f"moelb {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 1
    except MemoryError:
        print(
            f"moelb {args.command}: error: out of memory (try fewer layers, tokens, steps or "
            "passes)",
            file=sys.stderr,
        )
        return 1
    except Error as e:
        print(f"moelb {args.command}: internal error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"moelb {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: still one line, with the exception's type
        message = f"{type(e).__name__}: {one_line(e)}" if str(e) else type(e).__name__
        print(f"moelb {args.command}: internal error: {message}", file=sys.stderr)
        return 1
