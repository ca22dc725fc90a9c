"""The argparse parser of the ``moelb`` command: its four commands (demo, simulate, rebalance,
inspect) with their flags, named as the Python keywords they set, and one-line errors for bad flags
(exit status 2). DESIGN section 7 (CLI ``moelb``; "flag names match the Python keyword names")."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from .. import __version__
from ..dispatch import DISPATCH_ALGORITHMS
from ..eplb import ALGORITHMS, DEFAULT_MOVE_COST, OBJECTIVES, PLAN_DISPATCH
from ..gpu_calibration import DEFAULT_GPU, GPU_DTYPES, available_gpus
from ..simulate import (
    BALANCED_DISPATCH,
    MODEL_PRESETS,
    REFERENCE_DISPATCH,
    SIMULATOR_DISPATCH,
    SimulationConfig,
)
from ..step_time import DEEPEP_MODES
from .inspect_cmd import inspect_command
from .rebalance_cmd import REBALANCE_FORMATS, rebalance_command
from .simulate_cmd import DEMO_CONFIG, DEMO_PREFILL_CONFIG, demo, simulate_command

__all__ = ["build_parser"]

#: The first line of ``moelb --help``.
DESCRIPTION = (
    "The ``moelb`` command line (also ``python -m moelb``): what EPLB and Waterfill buy on a "
    "cluster."
)


#: Flags renamed by the one-vocabulary change (issue 18): old -> new. An old flag is an error that
#: names its new spelling.
RENAMED_FLAGS = {"--num-gpus": "--ep-size"}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block): ``moelb simulate: error: ...``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        # A renamed flag is named before anything else (a required flag it replaced included).
        for arg in sys.argv[1:] if args is None else args:
            old = arg.split("=", 1)[0]
            if old in RENAMED_FLAGS:
                self.error(f"{old} is now {RENAMED_FLAGS[old]}")
        return super().parse_known_args(args, namespace)


def _checked(
    convert: Callable[[str], Any], accept: Callable[[Any], bool], what: str, bad: str = ""
) -> Callable[[str], Any]:
    """An argparse type: ``convert(text)`` when ``accept`` holds, else "must be {what}" (``bad``
    for a value that converts but is refused, when it says more)."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must be {bad or what}, got {text}")
        return value

    return parse


_positive_int = _checked(int, lambda v: v > 0, "a positive integer")
_non_negative_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _checked(
    float, lambda v: bool(np.isfinite(v) and v > 0), "a number > 0", "a finite number > 0"
)
_non_negative_float = _checked(
    float, lambda v: bool(np.isfinite(v) and v >= 0), "a number >= 0", "a finite number >= 0"
)


def _add_run_flags(p: argparse.ArgumentParser, default_dir: str | None) -> None:
    p.add_argument(
        "--output-dir",
        type=Path,
        default=None if default_dir is None else Path(default_dir),
        help="write placement.json, simulation.json and PNG plots here"
        + (f" (default: {default_dir})" if default_dir else " (default: write nothing)"),
    )
    p.add_argument("--no-plots", dest="plots", action="store_false", help="do not write PNG plots")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--per-layer", action="store_true", help="also print a per-layer table")
    p.add_argument("--threads", type=_positive_int, default=None, help="threads (default: all)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )
    p.add_argument(
        "--gpu",
        default=None,
        metavar="GPU",
        help="GPU calibration of the modelled step time: a shipped key ("
        + (", ".join(available_gpus()) or "none shipped")
        + f"), a calibration JSON file, or none (default: {DEFAULT_GPU} when shipped)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="moelb",
        description=DESCRIPTION,
        epilog="Run `moelb COMMAND --help` for a command's flags.",
    )
    parser.add_argument("--version", action="version", version=f"moelb {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_demo(sub)
    _add_simulate(sub)
    _add_rebalance(sub)
    _add_inspect(sub)
    return parser


def _add_demo(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="simulate DeepSeek-V3 on 32 GPUs / 4 nodes with skewed, drifting traffic",
        description="The main job with defaults: "
        f"{DEMO_CONFIG.model}, {DEMO_CONFIG.ep_size} GPUs in {DEMO_CONFIG.num_nodes} nodes, "
        f"{DEMO_CONFIG.num_redundant_experts} redundant experts, {DEMO_CONFIG.num_steps} steps "
        f"of {DEMO_CONFIG.num_tokens} tokens, rebalance every {DEMO_CONFIG.rebalance_period}. "
        "Same as `moelb simulate` with those values.",
    )
    _add_run_flags(p, "moelb-demo")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 6 layers, 8 steps of 1,024 tokens (prefill-like: 2 layers, 4 steps)",
    )
    p.add_argument(
        "--traffic",
        choices=("both", "decode", "prefill"),
        default="both",
        help=f"decode-like ({DEMO_CONFIG.num_tokens // DEMO_CONFIG.ep_size} tokens per GPU, the "
        f"full report), prefill-like ({DEMO_PREFILL_CONFIG.num_tokens // DEMO_CONFIG.ep_size:,} "
        "tokens per GPU, "
        f"{DEMO_PREFILL_CONFIG.num_layers} layers, {DEMO_PREFILL_CONFIG.num_steps} steps), or "
        "both (default; the prefill-like run only with a GPU calibration: its modelled times)",
    )
    p.set_defaults(func=demo)


def _add_simulate(sub: Any) -> None:
    p = sub.add_parser(
        "simulate",
        help="simulate a cluster with every knob as a flag (or replay a recorded dump)",
        description="Synthetic or replayed traffic -> routers -> recorder -> periodic EPLB -> "
        "dispatch -> Waterfill -> per-GPU loads; prints the comparison table.",
    )
    d = SimulationConfig()
    p.add_argument("--model", choices=sorted(MODEL_PRESETS), default=d.model)
    p.add_argument("--ep-size", type=_positive_int, default=d.ep_size, help="GPUs (EP ranks)")
    p.add_argument("--num-nodes", type=_positive_int, default=d.num_nodes)
    p.add_argument(
        "--num-redundant-experts", type=_non_negative_int, default=d.num_redundant_experts
    )
    p.add_argument("--num-tokens", type=_positive_int, default=d.num_tokens, help="per step")
    p.add_argument("--num-steps", type=_positive_int, default=d.num_steps)
    p.add_argument("--rebalance-period", type=_positive_int, default=d.rebalance_period)
    p.add_argument("--skew", type=_non_negative_float, default=d.skew, help="Zipf exponent")
    p.add_argument(
        "--drift", type=_non_negative_float, default=d.drift, help="hot-set turnover per step"
    )
    p.add_argument(
        "--bursts",
        type=_non_negative_float,
        default=d.bursts,
        help="co-activation: logit boost of one of 16 expert sets per step (0 = none)",
    )
    p.add_argument(
        "--algorithms",
        nargs="+",
        default=list(d.algorithms),
        metavar="ALG",
        help=f"EPLB algorithms: {', '.join(ALGORITHMS)}; moelb:node / moelb:none set moelb's "
        "locality, moelb:step_peak (e.g. moelb:none:step_peak) plans each window against its "
        "per-step peaks, moelb:sglang_static (e.g. moelb:none:sglang_static) plans for what "
        "SGLang's static table realises, moelb:balanced (e.g. moelb:none:balanced) for moelb's "
        "per-step exact split (score it with --dispatch balanced)",
    )
    p.add_argument(
        "--waterfill",
        choices=("dynamic", "static", "off"),
        default=None,
        help=f"the shared-expert balancer of the realised figures (default {d.waterfill})",
    )
    p.add_argument(
        "--dispatch",
        nargs="+",
        choices=SIMULATOR_DISPATCH,
        default=None,
        metavar="NAME",
        help="dispatch models the realised figures use. The engines': "
        f"{', '.join(d for d in DISPATCH_ALGORITHMS if d != 'moelb_static')} (default "
        "sglang_static: SGLang's default with DeepEP). Ours: moelb_static (a coordinated table) "
        f"and the per-step split {', '.join(BALANCED_DISPATCH)} (balanced: exact, one "
        "all-gather of the counts; balanced_prob: per-replica fractions, one all-reduce; "
        "balanced_offline: fractions of the planning window, no collective; balanced_joint: "
        "routed and shared expert in one flow, its +joint figure in place of Waterfill). "
        f"Reference model, for measurement only: {', '.join(REFERENCE_DISPATCH)} (SGLang's "
        "--ep-dispatch-algorithm lp reproduced on the CPU)",
    )
    p.add_argument("--trace", default=None, help="replay this recorder dump (.pt/.npz/.json)")
    p.add_argument(
        "--trace-rotate",
        type=_non_negative_int,
        default=0,
        help="replay the trace from this row on (a wrapped bounded SGLang buffer: passes "
        "recorded mod buffer size)",
    )
    p.add_argument(
        "--num-layers", type=_positive_int, default=None, help="simulate the first N MoE layers"
    )
    p.add_argument("--expert-bytes", type=_non_negative_int, default=None)
    p.add_argument(
        "--gpu-dtype",
        choices=tuple(GPU_DTYPES),
        default=None,
        help="the GEMM table's dtype (default: fp8_e4m3 when calibrated, else bf16)",
    )
    p.add_argument(
        "--deepep-mode",
        choices=("auto", *DEEPEP_MODES),
        default=d.deepep_mode,
        help="how dispatch and combine move tokens in the modelled time (auto: low_latency up "
        "to 256 tokens per GPU, decode-like, else normal)",
    )
    p.add_argument(
        "--nvlink-bytes-per-s",
        type=_positive_float,
        default=d.nvlink_bytes_per_s,
        help="NVLink bandwidth per GPU and direction (default 450e9: H100 NVLink 4)",
    )
    p.add_argument(
        "--network-bytes-per-s",
        type=_positive_float,
        default=d.network_bytes_per_s,
        help="network bandwidth per GPU and direction (default 50e9: one 400 Gb/s NIC)",
    )
    _add_run_flags(p, None)
    p.set_defaults(func=simulate_command)


def _add_rebalance(sub: Any) -> None:
    p = sub.add_parser(
        "rebalance",
        help="an SGLang expert distribution dump -> a placement file for SGLang "
        "(--init-expert-location), TensorRT-LLM or moelb",
        description="Plans a placement from the summed counts of a dump (.pt with PyTorch, "
        ".npz or .json; a folder of them), or from its per-pass counts with --objective "
        "step_peak, and writes SGLang's placement JSON (or, with --format, SGLang's "
        "logical_count file, TensorRT-LLM's load balancer YAML or moelb's own JSON).",
    )
    p.add_argument("dump", help="expert_distribution_recorder dump (.pt / .npz / .json) or folder")
    p.add_argument(
        "-o",
        "--output",
        required=True,
        help="the file to write (.json; .yaml / .yml for --format trtllm)",
    )
    p.add_argument(
        "--format",
        choices=REBALANCE_FORMATS,
        default="sglang",
        help="sglang: SGLang's physical_to_logical_map for --init-expert-location (the plan); "
        "sglang-logical-count: SGLang's logical_count file (the dump's counts, [L, E], or "
        "[T, L, E] with --objective step_peak / --dispatch balanced): SGLang plans at start-up "
        "with its --eplb-algorithm (moelb's plan with --eplb-algorithm moelb and "
        "moelb.integrations.sglang installed) and builds one coordinated dispatch table; "
        "trtllm: TensorRT-LLM's MoE load balancer YAML (num_slots, initial_global_assignments; "
        "moe_config: load_balancer: FILE); json: moelb's own (the map, topology and statistics; "
        "--previous and moelb inspect read it, SGLang does not)",
    )
    p.add_argument("--num-physical-experts", type=_positive_int, required=True)
    p.add_argument("--ep-size", type=_positive_int, required=True)
    p.add_argument("--num-nodes", type=_positive_int, default=1)
    p.add_argument(
        "--model",
        choices=sorted(MODEL_PRESETS),
        default=None,
        help="the model the dump comes from: supplies --num-groups (and checks the dump's "
        "layers and experts against it); a dump of its MoE layers only gets its dense layers",
    )
    p.add_argument(
        "--dense-layers",
        type=_non_negative_int,
        default=None,
        help="leading dense decoder layers the dump lacks (it holds the MoE layers only): added "
        "as rows with no load, since the engines' files have a row per decoder layer (0: the "
        "rows already are decoder layers). --model implies it",
    )
    p.add_argument(
        "--num-groups",
        type=_non_negative_int,
        default=None,
        help="expert groups (DeepSeek-V3: 8; 0 = the model has none). Required unless --model "
        "gives it: a missing value is an error, since without groups the planner uses the "
        "global policy instead of the node-local / hierarchical one",
    )
    p.add_argument("--algorithm", choices=ALGORITHMS, default="moelb")
    p.add_argument("--locality", choices=("auto", "node", "none"), default="auto")
    p.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default="total",
        help="total: plan against the summed counts; step_peak: against each pass's peak GPU "
        "load (moelb only; spreads experts that peak in the same passes)",
    )
    p.add_argument(
        "--dispatch",
        choices=PLAN_DISPATCH,
        default="equal_split",
        help="the dispatch the plan is made for (moelb only). equal_split: each expert's load "
        "split equally over its replicas, what every planner assumes; sglang_static: what "
        "SGLang's default static dispatch realises for a placement loaded with "
        "--init-expert-location (its per-rank tables modelled exactly, each rank sending 1/W of "
        "every expert's tokens); best with --locality none: under node locality every rank "
        "without its own replica of a replicated expert falls back to a random one; balanced: "
        "moelb's per-step exact split (select_experts(dispatch='balanced'); ours): the replicas "
        "laid out to link all GPUs (one tree per node under node locality), kept per layer only "
        "where the exact split of up to 32 evenly spaced passes is lower than for the "
        "equal-split plan",
    )
    p.add_argument("--previous", default=None, help="the placement in service (JSON)")
    p.add_argument(
        "--move-cost",
        type=_non_negative_float,
        default=DEFAULT_MOVE_COST,
        help="with --previous: re-place a layer only when its largest GPU load drops by at least "
        f"this fraction per slot rewritten (default {DEFAULT_MOVE_COST:g}: 1%% per 100 slots, "
        "which at windows of 100+ passes moves nothing for sampling noise and follows real "
        "popularity changes; for ~10-pass windows use ~3e-4; 0: any gain)",
    )
    p.add_argument("--max-moves", type=_non_negative_int, default=None)
    p.add_argument("--expert-bytes", type=_non_negative_int, default=None)
    p.add_argument("--num-logical-experts", type=_positive_int, default=None)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=rebalance_command)


def _add_inspect(sub: Any) -> None:
    p = sub.add_parser(
        "inspect",
        help="per-layer statistics of a placement JSON or a dump",
        description="A placement JSON: replicas per layer (and same-GPU duplicates with "
        "--ep-size). A dump: tokens and hot experts per layer (and the trivial placement's "
        "balancedness and the bound with --ep-size).",
    )
    p.add_argument("file")
    p.add_argument("--ep-size", type=_positive_int, default=None)
    p.add_argument("--num-nodes", type=_positive_int, default=1, help="needs --ep-size")
    p.add_argument(
        "--num-physical-experts",
        type=_positive_int,
        default=None,
        help="slots of the trivial placement a dump is scored on (default: the dump's experts, "
        "no redundancy; needs --ep-size)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=inspect_command)
