"""Benchmark: the cost of recording routed experts against the cost of routing them, in one run.

An engine with the expert distribution recorder on calls, in every MoE layer of every forward pass,
``recorder.on_select_experts(topk_ids)`` on the ids ``moelb.select_experts`` just produced. This
script measures that hook next to the routing it follows, on the same ids, for DeepSeek-V3
(``TopKConfig.deepseek_v3()``, top-8 of 256, correction bias) and DeepSeek-V4-Flash (top-6 of
256), mapped to the physical slots of a 288-slot placement on 32 ranks in 4 nodes (static
dispatch), 61 layers of which 58 are MoE layers:

* (a) ``select_experts(logits, config, bias, location=, layer=i)`` alone,
* (b) ``recorder.on_select_experts(recorder_topk_ids)`` alone, inside ``forward_pass()`` and
  ``layer(i)`` scopes of a recording recorder,
* (c) ``select_experts(..., recorder=recorder, layer=i)``: routing and recording in one call,
* the ``layer(i)`` scope (enter + exit, per layer) and the ``forward_pass()`` scope (enter +
  exit, per pass: the exit computes the pass's balancedness over L x P counts and appends the pass
  to the bounded window, dropping the oldest),

timed round-robin (each MoE layer runs (a), (b) and (c) once, cycling through their six orders)
over whole forward passes, at each thread count (``moelb.set_num_threads``; the hook itself is
serial). Each recorder keeps ``--buffer-size`` passes and is filled to that size before timing,
so every timed pass also drops one. Prints medians and lower quartiles, from each the overheads
(b)/(a), ((c)-(a))/(a) and all recording of a pass against all its routing, whether recording
stays within 5% of routing, and checks that every recorded pass counted, per MoE layer, exactly
the routed ids (tokens x top_k). This is not a timed test: it never fails on speed; it exits
with status 1 only when a count is wrong.

    python benchmarks/bench_recorder.py             # 4,096 (and 100,000) tokens, 1 and 2 threads
    python benchmarks/bench_recorder.py --quick     # smoke test, a few seconds
    python benchmarks/bench_recorder.py --json results.json
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import moelb
import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import load_average, machine_summary, table, write_json

DEFAULT_TOKENS = 4_096
DEFAULT_REPEATS = 10  # timed forward passes per measurement, each timing every MoE layer
QUICK_TOKENS = 256
QUICK_REPEATS = 2
LARGE_TOKENS = 100_000  # the optional large batch (V3 only); 0 skips it
LARGE_REPEATS = 1
BUFFER_SIZE = 1000  # passes each recorder keeps (SGLang's default window)
NUM_INPUTS = 4  # distinct seeded logits per case, cycled over the layers
LARGE_NUM_INPUTS = 1
# DeepSeek-V3's shape: 61 layers, the first 3 dense (first_k_dense_replace); 256 routed experts
# on 288 physical slots (32 redundant) over 32 ranks in 4 nodes. V4-Flash is run on the same
# placement: only the forward_pass() row depends on L x P.
NUM_LAYERS = 61
FIRST_MOE_LAYER = 3
NUM_EXPERTS = 256
NUM_PHYSICAL_EXPERTS = 288
EP_SIZE = 32
NUM_NODES = 4
BIAS_STD = 0.05  # the correction bias: small next to the spread of the scores
GOAL = 0.05  # the target: recording adds at most 5% to routing

# Measurements, each a median in seconds: per call of one MoE layer, or per forward pass.
SELECT = "select_experts"  # (a)
RECORD = "on_select_experts"  # (b)
SELECT_RECORD = "select_experts_recorder"  # (c)
LAYER_SCOPE = "layer_scope"  # layer() enter + exit, per layer
PASS_ENTER = "forward_pass_enter"  # per pass
PASS_EXIT = "forward_pass_exit"  # per pass


@dataclass
class Case:
    """One router on one batch size: seeded [T, E] float32 logits (layer ``i`` routes
    ``logits[i % len(logits)]``), the correction bias, and per MoE layer the routed physical ids
    select_experts produced ([T, K] int32, what the recorder counts; set by the warm-up pass)."""

    name: str
    config: moelb.TopKConfig
    num_tokens: int
    repeats: int
    logits: list[npt.NDArray[np.float32]]
    bias: npt.NDArray[np.float32]
    recorder_ids: dict[int, npt.NDArray[np.int32]] = field(default_factory=dict)

    @property
    def top_k(self) -> int:
        return self.config.top_k

    def input_of(self, layer: int) -> int:
        return layer % len(self.logits)


@dataclass
class Timing:
    """One case at one thread count: per measurement the median and the lower quartile of its
    samples (seconds). On a shared machine other work only ever adds time, and it comes and goes,
    so a sample is either clean or slowed down; the lower quartile estimates the clean time, the
    median what a busy machine gives. The ratios are computed from each."""

    case: str
    threads: int
    num_tokens: int
    top_k: int
    num_moe_layers: int
    passes: int
    median: dict[str, float]
    lower_quartile: dict[str, float]

    def ratios(self, statistic: str) -> dict[str, float]:
        """Against (a), from ``statistic`` ("median" or "lower_quartile"):

        record: (b)/(a), the hook against the routing that produced its ids;
        recorder_arg: ((c)-(a))/(a), what passing recorder= adds to a select_experts call (a
            small difference of two large times: noisier than (b)/(a), can come out negative);
        forward_pass: the forward_pass() scope against the routing of a pass (58 x (a));
        per_pass: all recording of a pass (per MoE layer (b) and the layer() scope, plus the
            forward_pass() scope) against all its routing.
        """
        s = self.median if statistic == "median" else self.lower_quartile
        routing = self.num_moe_layers * s[SELECT]
        pass_scope = s[PASS_ENTER] + s[PASS_EXIT]
        recording = self.num_moe_layers * (s[RECORD] + s[LAYER_SCOPE]) + pass_scope
        return {
            "record": s[RECORD] / s[SELECT],
            "recorder_arg": (s[SELECT_RECORD] - s[SELECT]) / s[SELECT],
            "forward_pass": pass_scope / routing,
            "per_pass": recording / routing,
        }

    @property
    def goal_met(self) -> bool:
        """(b)/(a) and all recording per pass within the goal, by both statistics."""
        return all(
            r["record"] <= GOAL and r["per_pass"] <= GOAL
            for r in (self.ratios("median"), self.ratios("lower_quartile"))
        )


@dataclass
class Check:
    """Whether a recorder's window holds what was routed: every pass ended since the window was
    filled counted, per MoE layer, exactly the bincount of the routed ids (tokens x top_k ids in
    all) and nothing on the dense layers, and the window kept its bound."""

    case: str
    threads: int
    recorder: str
    passes_ended: int
    passes_kept: int
    passes_checked: int
    ids_per_layer: int  # tokens x top_k
    min_counted: int  # the smallest and largest per-layer total over the checked passes
    max_counted: int
    counts_match: bool  # each layer's [P] counts equal np.bincount of its ids
    window_bounded: bool

    @property
    def ok(self) -> bool:
        return (
            self.counts_match
            and self.window_bounded
            and self.min_counted == self.max_counted == self.ids_per_layer
        )


def make_location() -> moelb.ExpertLocation:
    return moelb.ExpertLocation.trivial(
        NUM_LAYERS, NUM_EXPERTS, NUM_PHYSICAL_EXPERTS, ep_size=EP_SIZE, num_nodes=NUM_NODES
    )


def moe_layers() -> range:
    return range(FIRST_MOE_LAYER, NUM_LAYERS)


def make_case(
    name: str,
    config: moelb.TopKConfig,
    num_tokens: int,
    repeats: int,
    num_inputs: int,
    rng: np.random.Generator,
) -> Case:
    logits = [
        rng.standard_normal((num_tokens, NUM_EXPERTS), dtype=np.float32) for _ in range(num_inputs)
    ]
    bias = (BIAS_STD * rng.standard_normal(NUM_EXPERTS)).astype(np.float32)
    return Case(name, config, num_tokens, repeats, logits, bias)


def make_cases(
    num_tokens: int,
    repeats: int,
    large_tokens: int,
    large_repeats: int,
    seed: int,
) -> list[Case]:
    rng = np.random.default_rng(seed)
    v3 = moelb.TopKConfig.deepseek_v3()
    flash = moelb.TopKConfig.deepseek_v4_flash()
    cases = [
        make_case("V3", v3, num_tokens, repeats, NUM_INPUTS, rng),
        make_case("V4-Flash", flash, num_tokens, repeats, NUM_INPUTS, rng),
    ]
    if large_tokens:
        cases.append(make_case("V3", v3, large_tokens, large_repeats, LARGE_NUM_INPUTS, rng))
    return cases


def _filled_recorder(
    location: moelb.ExpertLocation, buffer_size: int
) -> moelb.ExpertDistributionRecorder:
    """A recording recorder whose window already holds ``buffer_size`` (empty) passes, so that
    every further pass drops the oldest, as in a server that has been up for a while."""
    recorder = moelb.ExpertDistributionRecorder(location, buffer_size=buffer_size)
    recorder.start()
    for _ in range(buffer_size):
        with recorder.forward_pass():
            pass
    return recorder


def time_case(
    case: Case, threads: int, location: moelb.ExpertLocation, buffer_size: int
) -> tuple[Timing, list[Check]]:
    """One warm-up pass, then ``case.repeats`` timed forward passes over all MoE layers. In each
    layer (a), (b) and (c) run once, cycling through their six orders; (b) records into
    one recorder, (c) into another, so that each counts every layer once. (b) records the ids
    (a) produced for that layer in the warm-up pass."""
    moelb.set_num_threads(threads)
    rec_b = _filled_recorder(location, buffer_size)
    rec_c = _filled_recorder(location, buffer_size)
    config, bias = case.config, case.bias
    layers = moe_layers()
    clock = time.perf_counter

    def run_select(layer: int) -> dict[str, float]:
        logits = case.logits[case.input_of(layer)]
        start = clock()
        out = moelb.select_experts(logits, config, bias, location=location, layer=layer)
        seconds = clock() - start
        case.recorder_ids.setdefault(layer, out.recorder_topk_ids)
        return {SELECT: seconds}

    def run_record(layer: int) -> dict[str, float]:
        ids = case.recorder_ids[layer]
        scope = rec_b.layer(layer)
        t0 = clock()
        scope.__enter__()
        t1 = clock()
        rec_b.on_select_experts(ids)
        t2 = clock()
        scope.__exit__(None, None, None)
        t3 = clock()
        return {RECORD: t2 - t1, LAYER_SCOPE: (t1 - t0) + (t3 - t2)}

    def run_select_record(layer: int) -> dict[str, float]:
        logits = case.logits[case.input_of(layer)]
        with rec_c.layer(layer):
            start = clock()
            moelb.select_experts(
                logits, config, bias, location=location, layer=layer, recorder=rec_c
            )
            return {SELECT_RECORD: clock() - start}

    # The layer's logits are in cache for whichever of (a) and (c) runs second: cycling through
    # all orders of the three gives each the same share of every position.
    orders = list(itertools.permutations([run_select, run_record, run_select_record]))
    samples: dict[str, list[float]] = {
        k: [] for k in (SELECT, RECORD, SELECT_RECORD, LAYER_SCOPE, PASS_ENTER, PASS_EXIT)
    }
    passes_ended = buffer_size
    for p in range(-1, case.repeats):  # pass -1 is the warm-up, in the order (a), (b), (c)
        timed = p >= 0
        pass_b, pass_c = rec_b.forward_pass(), rec_c.forward_pass()
        t0 = clock()
        pass_b.__enter__()
        t1 = clock()
        pass_c.__enter__()
        for n, layer in enumerate(layers):
            order = orders[(p * len(layers) + n) % len(orders)] if timed else orders[0]
            for run in order:
                measured = run(layer)
                if timed:
                    for name, seconds in measured.items():
                        samples[name].append(seconds)
        pass_c.__exit__(None, None, None)
        t2 = clock()
        pass_b.__exit__(None, None, None)
        t3 = clock()
        passes_ended += 1
        if timed:
            samples[PASS_ENTER].append(t1 - t0)
            samples[PASS_EXIT].append(t3 - t2)

    timing = Timing(
        case=case.name,
        threads=threads,
        num_tokens=case.num_tokens,
        top_k=case.top_k,
        num_moe_layers=len(layers),
        passes=case.repeats,
        median={k: statistics.median(v) for k, v in samples.items()},
        lower_quartile={k: float(np.quantile(v, 0.25)) for k, v in samples.items()},
    )
    checks = [
        check_recorder(case, threads, name, rec, passes_ended, buffer_size)
        for name, rec in (("(b) on_select_experts", rec_b), ("(c) recorder=", rec_c))
    ]
    return timing, checks


def check_recorder(
    case: Case,
    threads: int,
    name: str,
    recorder: moelb.ExpertDistributionRecorder,
    passes_ended: int,
    buffer_size: int,
) -> Check:
    """Compares the last passes of the window (those routed, warm-up included) with a NumPy
    bincount of the ids each layer routed."""
    counts = recorder.physical_count()  # [passes kept, L, P] int32
    routed = min(case.repeats + 1, counts.shape[0])
    recent = counts[counts.shape[0] - routed :]
    expected = np.zeros(recent.shape[1:], dtype=np.int64)
    for layer in moe_layers():
        ids = case.recorder_ids[layer]
        expected[layer] = np.bincount(ids[ids >= 0].ravel(), minlength=recent.shape[2])
    per_layer = recent[:, list(moe_layers()), :].sum(axis=2)
    return Check(
        case=case.name,
        threads=threads,
        recorder=name,
        passes_ended=passes_ended,
        passes_kept=int(recorder.num_passes),
        passes_checked=routed,
        ids_per_layer=case.num_tokens * case.top_k,
        min_counted=int(per_layer.min()),
        max_counted=int(per_layer.max()),
        counts_match=bool((recent == expected).all()),
        window_bounded=int(recorder.num_passes) == min(buffer_size, passes_ended),
    )


def _fmt_time(seconds: float) -> str:
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds * 1e6:.1f} us"


def _fmt_share(ratio: float) -> str:
    return f"{ratio:+.2%}" if ratio < 0 else f"{ratio:.2%}"


def _pass_scope(s: dict[str, float], num_moe_layers: int) -> float:
    return s[PASS_ENTER] + s[PASS_EXIT]


def _all_recording(s: dict[str, float], num_moe_layers: int) -> float:
    return num_moe_layers * (s[RECORD] + s[LAYER_SCOPE]) + _pass_scope(s, num_moe_layers)


# The rows printed per case and thread count: label, unit, time from the statistics and the
# number of MoE layers, and the key of Timing.ratios shown beside it (None: no ratio).
ROWS: list[tuple[str, str, Callable[[dict[str, float], int], float], str | None]] = [
    ("(a) select_experts", "layer", lambda s, _: s[SELECT], None),
    ("(b) on_select_experts", "layer", lambda s, _: s[RECORD], "record"),
    ("(c) select_experts(recorder=)", "layer", lambda s, _: s[SELECT_RECORD], "recorder_arg"),
    ("layer() enter+exit", "layer", lambda s, _: s[LAYER_SCOPE], None),
    (
        f"forward_pass() enter+exit ({NUM_LAYERS}x{NUM_PHYSICAL_EXPERTS})",
        "pass",
        _pass_scope,
        "forward_pass",
    ),
    ("all recording vs {layers} x (a)", "pass", _all_recording, "per_pass"),
]


def format_timings(timings: Sequence[Timing]) -> str:
    header = (
        "case",
        "tokens",
        "threads",
        "measurement",
        "per",
        "median",
        "vs routing",
        "lower quartile",
        "vs routing",
    )
    rows: list[list[str]] = []
    for t in timings:
        stats = (t.median, t.lower_quartile)
        ratios = (t.ratios("median"), t.ratios("lower_quartile"))
        for label, per, seconds, ratio in ROWS:
            cells = [t.case, str(t.num_tokens), str(t.threads)]
            cells += [label.format(layers=t.num_moe_layers), per]
            for s, r in zip(stats, ratios, strict=True):
                cells.append(_fmt_time(seconds(s, t.num_moe_layers)))
                cells.append("-" if ratio is None else _fmt_share(r[ratio]))
            rows.append(cells)
    return table(header, rows, left=(0, 3, 4), separate_every=len(ROWS))


def format_checks(checks: Sequence[Check]) -> str:
    header = (
        "case",
        "threads",
        "recorder",
        "kept/ended",
        "checked",
        "ids/layer",
        "counted/layer",
        "= bincount",
        "ok?",
    )
    rows = [
        (
            c.case,
            str(c.threads),
            c.recorder,
            f"{c.passes_kept}/{c.passes_ended}",
            str(c.passes_checked),
            str(c.ids_per_layer),
            str(c.min_counted)
            if c.min_counted == c.max_counted
            else f"{c.min_counted}-{c.max_counted}",
            "yes" if c.counts_match else "NO",
            "ok" if c.ok else "WRONG",
        )
        for c in checks
    ]
    return table(header, rows, left=(0, 2))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, help=f"tokens per batch (default {DEFAULT_TOKENS})")
    parser.add_argument(
        "--repeats",
        type=int,
        help=f"timed forward passes per measurement (default {DEFAULT_REPEATS})",
    )
    parser.add_argument(
        "--large-tokens",
        type=int,
        help=f"tokens of the extra large V3 batch, 0 to skip (default {LARGE_TOKENS}; "
        "0 with --quick)",
    )
    parser.add_argument(
        "--large-repeats",
        type=int,
        default=LARGE_REPEATS,
        help=f"timed forward passes of the large batch (default {LARGE_REPEATS})",
    )
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[1, 2], help="thread counts (default: 1 2)"
    )
    parser.add_argument(
        "--buffer-size",
        type=int,
        default=BUFFER_SIZE,
        help=f"passes each recorder keeps (default {BUFFER_SIZE})",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: {QUICK_TOKENS} tokens, {QUICK_REPEATS} passes, no large batch "
        "unless given",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the inputs (default 0)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results as JSON")
    args = parser.parse_args(argv)
    if args.tokens is None:
        args.tokens = QUICK_TOKENS if args.quick else DEFAULT_TOKENS
    if args.repeats is None:
        args.repeats = QUICK_REPEATS if args.quick else DEFAULT_REPEATS
    if args.large_tokens is None:
        args.large_tokens = 0 if args.quick else LARGE_TOKENS
    if (
        args.tokens < 1
        or args.repeats < 1
        or args.large_repeats < 1
        or args.buffer_size < 1
        or min(args.threads) < 1
    ):
        parser.error(
            "--tokens, --repeats, --large-repeats, --buffer-size and --threads must be positive"
        )
    if args.large_tokens < 0:
        parser.error("--large-tokens must be positive, or 0 to skip the large batch")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    versions = {
        "moelb": moelb.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
    load = load_average()
    batches = f"{args.tokens} tokens x {args.repeats} passes" + (
        f" and {args.large_tokens} tokens x {args.large_repeats}" if args.large_tokens else ""
    )
    print(
        f"expert distribution recorder vs select_experts: {batches}, "
        f"{len(moe_layers())} MoE layers of {NUM_LAYERS} per pass; "
        + machine_summary(load, versions)
    )
    print(
        f"placement: {NUM_EXPERTS} experts on {NUM_PHYSICAL_EXPERTS} physical slots, "
        f"ep_size {EP_SIZE}, {NUM_NODES} nodes, static dispatch from rank 0; recorder mode "
        f"'stat', buffer_size {args.buffer_size} (filled before timing)"
    )

    location = make_location()
    saved_threads = moelb.get_num_threads()
    timings: list[Timing] = []
    checks: list[Check] = []
    try:
        cases = make_cases(
            args.tokens,
            args.repeats,
            args.large_tokens,
            args.large_repeats,
            args.seed,
        )
        for case in cases:
            for threads in args.threads:
                timing, case_checks = time_case(case, threads, location, args.buffer_size)
                timings.append(timing)
                checks += case_checks
    finally:
        moelb.set_num_threads(saved_threads)

    print()
    print(format_timings(timings))
    missed = [t for t in timings if not t.goal_met]
    print(
        f"goal: recording adds <= {GOAL:.0%} to routing ((b)/(a) and all recording per pass, "
        "by both statistics): "
        + (
            "met everywhere"
            if not missed
            else "not met for " + ", ".join(f"{t.case}/{t.num_tokens}/{t.threads}t" for t in missed)
        )
    )
    print()
    print("sanity: every routed pass counted exactly the routed ids (tokens x top_k per MoE")
    print("layer, = np.bincount of the ids), and each window holds the last buffer_size passes")
    print(format_checks(checks))

    if args.json is not None:
        payload = {
            "benchmark": "recorder",
            "num_tokens": args.tokens,
            "repeats": args.repeats,
            "large_tokens": args.large_tokens,
            "large_repeats": args.large_repeats,
            "buffer_size": args.buffer_size,
            "seed": args.seed,
            "placement": {
                "num_layers": NUM_LAYERS,
                "moe_layers": [moe_layers().start, moe_layers().stop],
                "num_logical_experts": NUM_EXPERTS,
                "num_physical_experts": NUM_PHYSICAL_EXPERTS,
                "ep_size": EP_SIZE,
                "num_nodes": NUM_NODES,
                "dispatch": "sglang_static",
            },
            "goal": GOAL,
            "cpu_count": os.cpu_count(),
            "load_average_before": load,
            "machine": platform.machine(),
            "versions": versions,
            "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
            "results": [
                {
                    "case": t.case,
                    "num_tokens": t.num_tokens,
                    "threads": t.threads,
                    "top_k": t.top_k,
                    "num_moe_layers": t.num_moe_layers,
                    "passes": t.passes,
                    "median_seconds": t.median,
                    "lower_quartile_seconds": t.lower_quartile,
                    "ratios_of_medians": t.ratios("median"),
                    "ratios_of_lower_quartiles": t.ratios("lower_quartile"),
                    "goal_met": t.goal_met,
                }
                for t in timings
            ],
            "checks": [asdict(c) | {"ok": c.ok} for c in checks],
        }
        write_json(args.json, payload)
        print(f"\nwrote {args.json}")

    failed = [c for c in checks if not c.ok]
    if failed:
        print(
            "\nWRONG COUNTS: " + ", ".join(f"{c.case}/{c.threads}t {c.recorder}" for c in failed),
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
