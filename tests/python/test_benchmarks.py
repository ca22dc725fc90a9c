"""Smoke runs of the benchmark scripts: they must run end to end and agree with their reference
implementations. Speed is measured by running them directly, never asserted here."""

from __future__ import annotations

import importlib
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def run_quick(tmp_path: Path, script: str, *args: str) -> tuple[str, dict]:
    """Runs ``benchmarks/<script> --quick --json <tmp> args...``; returns (stdout, the JSON)."""
    out = tmp_path / f"{script}.json"
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick", *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout, json.loads(out.read_text())


@pytest.mark.parametrize("extra", [[], ["--no-torch"]], ids=["with-torch", "no-torch"])
def test_bench_routing_quick(tmp_path: Path, extra: list[str]) -> None:
    stdout, data = run_quick(tmp_path, "bench_routing.py", *extra)
    assert "moelb" in stdout
    cases = {r["case"] for r in data["results"]}
    assert {"V3", "V4-Flash", "V4-Pro", "V4-hash"} <= cases
    assert all(a["ok"] for a in data["agreement"]), data["agreement"]


@pytest.mark.parametrize("threads", [["1"], ["1", "2"]], ids=["1-thread", "1-2-threads"])
def test_bench_recorder_quick(tmp_path: Path, threads: list[str]) -> None:
    stdout, data = run_quick(
        tmp_path,
        "bench_recorder.py",
        "--buffer-size",
        "2",  # fewer passes than are routed: the window must drop the oldest
        "--threads",
        *threads,
    )
    assert "on_select_experts" in stdout
    results = data["results"]
    assert {(r["case"], r["threads"]) for r in results} == {
        (case, int(t)) for case in ("V3", "V4-Flash") for t in threads
    }
    for r in results:
        seconds = r["median_seconds"]
        assert {"select_experts", "on_select_experts", "forward_pass_exit"} <= set(seconds)
        assert all(s > 0 for s in seconds.values()), r
        for ratios in (r["ratios_of_medians"], r["ratios_of_lower_quartiles"]):
            assert ratios["record"] > 0 and ratios["per_pass"] > ratios["forward_pass"] > 0
    checks = data["checks"]
    assert len(checks) == 2 * len(results)
    assert all(c["ok"] for c in checks), checks
    top_k = {"V3": 8, "V4-Flash": 6}
    for c in checks:
        assert c["passes_kept"] == 2 < c["passes_ended"]
        assert c["min_counted"] == c["max_counted"] == c["ids_per_layer"] == 256 * top_k[c["case"]]


def test_bench_eplb_quick(tmp_path: Path) -> None:
    stdout, data = run_quick(tmp_path, "bench_eplb.py")
    assert "goal:" in stdout
    cases = {t["name"] for t in data["topologies"]}
    assert {(t["case"], t["loads"]) for t in data["timings"]} == {
        (case, loads) for case in cases for loads in ("zipf", "lognormal")
    }
    for t in data["timings"]:
        assert {"deepseek@1", "deepseek@2", "none@1", "none@2", "python"} <= set(t["seconds"])
        assert all(s > 0 for s in t["seconds"].values()), t
    # moelb's deepseek mode equals the ports: replica counts and per-GPU loads on every layer
    references = {a["reference"] for a in data["agreement"]}
    assert "python" in references
    assert all(a["ok"] for a in data["agreement"]), data["agreement"]
    for q in data["quality"]:
        assert 0.0 < q["balancedness"] <= 1.0 + 1e-12, q
        assert -1e-9 <= q["mean_gap"] <= q["max_gap"] + 1e-12, q
        if q["plan"].startswith("moelb"):
            assert q["worse_layers"] is not None and q["same_at_2_threads"] is not None, q
    assert len(data["goals"]) == 6 and all(isinstance(g["met"], bool) for g in data["goals"])


def test_bench_plan_dispatch_quick(tmp_path: Path) -> None:
    stdout, data = run_quick(tmp_path, "bench_plan_dispatch.py")
    assert "goal (" in stdout
    plans = {r["plan"] for r in data["results"]}
    assert {"deepseek", "moelb:none", "moelb:none:sglang_static"} <= plans
    assert len(data["results"]) == 2 * 2 * len(plans)  # two load models, two clusters
    for r in data["results"]:
        # the largest GPU load is at least the mean, under either dispatch
        assert r["equal_split"] >= 1 - 1e-9 and r["sglang_static"] >= 1 - 1e-9, r
        assert r["ran"].endswith("+sglang_static") == r["plan"].endswith(":sglang_static")
        assert all(t > 0 for t in r["median_seconds"].values()), r
    assert len(data["goals"]) == 8


def bench_module(name: str) -> Any:
    """A benchmark script imported as a module (benchmarks/ is not a package)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


def _optimum(w: np.ndarray, slots: int, gpus: int) -> float:
    """The smallest max GPU load over every placement (slot -> expert, each expert at least once,
    equal split over replicas), by enumeration."""
    best = np.inf
    per_gpu = slots // gpus
    for row in itertools.product(range(len(w)), repeat=slots):
        counts = np.bincount(row, minlength=len(w))
        if (counts == 0).any():
            continue
        loads = (w[list(row)] / counts[list(row)]).reshape(gpus, per_gpu).sum(axis=1)
        best = min(best, float(loads.max()))
    return best


def test_slot_lower_bound_is_a_lower_bound() -> None:
    """bench_eplb.slot_lower_bound (behind the 'unreachable' note of the gap goal): never above
    the optimum of a placement, never below the flat bound, and above the flat bound where each
    GPU must carry more than its one big replica."""
    slot_lower_bound = bench_module("bench_eplb").slot_lower_bound
    import moelb

    rng = np.random.default_rng(3)
    above_flat = 0
    for _ in range(60):
        experts, gpus = int(rng.integers(2, 5)), int(rng.integers(1, 4))
        options = [p for p in range(experts, 7) if p % gpus == 0]
        if not options:
            continue
        slots = int(rng.choice(options))
        w = (
            rng.integers(0, 6, experts).astype(float)
            if rng.random() < 0.3
            else rng.uniform(0, 100, experts)
        )
        bound = slot_lower_bound(w, slots, gpus)
        flat = moelb.rebalance(w[None], slots, None, 1, gpus).stats.lower_bound[0]
        optimum = _optimum(w, slots, gpus)
        assert flat * (1 - 1e-12) <= bound <= optimum * (1 + 1e-12), (w, slots, gpus)
        above_flat += bound > flat * (1 + 1e-9)
    assert above_flat > 0
    # Two GPUs of two slots, loads 10, 1, 1, 1: the flat bound is 10, but expert 0's GPU holds
    # another replica, so every placement is at least 11 (which {0, 1} {2, 3} reaches).
    assert slot_lower_bound(np.array([10.0, 1.0, 1.0, 1.0]), 4, 2) == 11.0


def best_packing(r: np.ndarray, per_gpu: int) -> float:
    """The smallest largest GPU sum over every split of ``r`` into groups of ``per_gpu`` (by
    enumeration: the first item left, with each choice of per_gpu - 1 companions, recursively;
    9 items in 3 groups are 280 splits instead of 9! orders)."""

    def rest(items: tuple[int, ...]) -> float:
        if not items:
            return 0.0
        first, others = items[0], items[1:]
        best = np.inf
        for mates in itertools.combinations(others, per_gpu - 1):
            left = tuple(i for i in others if i not in mates)
            group = float(r[first] + sum(r[m] for m in mates))
            best = min(best, max(group, rest(left)))
        return best

    return rest(tuple(range(len(r))))


def test_packing_lower_bound_is_a_lower_bound() -> None:
    """bench_eplb.packing_lower_bound (the 'packing gap' column): never above the best packing of
    the given replicas (by enumeration), at least the mean and the largest replica plus the
    S - 1 smallest others."""
    packing_lower_bound = bench_module("bench_eplb").packing_lower_bound

    rng = np.random.default_rng(5)
    tight = 0
    for _ in range(80):
        gpus, per_gpu = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        r = rng.uniform(0, 100, gpus * per_gpu) ** rng.uniform(1, 3)
        bound = packing_lower_bound(r, gpus)
        best = best_packing(r, per_gpu)
        others = np.sort(np.delete(r, r.argmax()))[: per_gpu - 1].sum()
        assert r.sum() / gpus * (1 - 1e-12) <= bound <= best * (1 + 1e-12), (r, gpus)
        assert bound >= (r.max() + others) * (1 - 1e-12), (r, gpus)
        tight += bound >= best * (1 - 1e-12)
    assert tight > 0
    # Two GPUs of two: 10, 1, 1, 1 cannot do better than 11, and the bound says so.
    assert packing_lower_bound(np.array([10.0, 1.0, 1.0, 1.0]), 2) == 11.0


def test_bench_waterfill_quick(tmp_path: Path) -> None:
    stdout, data = run_quick(tmp_path, "bench_waterfill.py", "--threads", "1", "2")
    assert "goal:" in stdout
    assert {(r["variant"], r["threads"]) for r in data["timing"]["results"]} == {
        (v, t) for v in ("static prefill", "static decode", "dynamic prefill") for t in (1, 2)
    }
    assert all(r["expand_ms"] > 0 and r["route_ms"] > 0 for r in data["timing"]["results"])
    assert all(c["identical"] for c in data["timing"]["checks"]), data["timing"]["checks"]
    assert {(r["phase"], r["placement"].split()[0], r["mode"]) for r in data["balance"]} == {
        (p, placement, m)
        for p in ("prefill", "decode")
        for placement in ("trivial", "eplb")
        for m in ("static", "dynamic")
    }
    for r in data["balance"]:
        assert 0 < r["balancedness_local"] <= 1 and 0 < r["balancedness_waterfill"] <= 1


def test_bench_moe_quick(tmp_path: Path) -> None:
    stdout, data = run_quick(tmp_path, "bench_moe.py")
    assert "goal:" in stdout
    assert data["results"] and all(r["median_seconds"]["moelb"] > 0 for r in data["results"])
    assert all(a["ok"] for a in data["agreement"]), data["agreement"]
    peak = data["peak_bytes"]
    assert peak["variant_outputs_identical"] and peak["savings_equal_4TH"]
    assert all(m["ok"] for m in peak["measured"])
    # the weight formats section: every format x activation x phase x T x threads this moelb
    # has, moelb and torch timed, the bytes read and flops positive, agreement within tolerance
    fm = data["formats"]
    assert "float32" in fm["weight_formats"] and "float32" in fm["activation_dtypes"]
    combos = len(fm["weight_formats"]) * len(fm["activation_dtypes"])
    sizes = len(fm["decode_tokens"]) + 1
    assert len(fm["results"]) == combos * sizes * len(data["threads"])
    for r in fm["results"]:
        assert r["seconds"]["moelb"] > 0 and r["seconds"]["torch"] > 0
        assert r["bytes_read"] > 0 and r["flops"] > 0
    assert len(fm["agreement"]) == combos * sizes
    assert all(a["ok"] for a in fm["agreement"]), fm["agreement"]
    decode = [
        r for r in fm["results"] if r["phase"] == "decode" and r["weight_format"] == "float32"
    ]
    # one token reads the gate, the shared expert and exactly top_k routed experts
    cfg = fm["case"]["config"]
    h, i, e, k = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_experts"], cfg["top_k"]
    one = [r for r in decode if r["num_tokens"] == 1]
    assert one and all(r["bytes_read"] == 4 * (e * h + 3 * h * i * (1 + k)) for r in one)


def test_bench_objective_quick(tmp_path: Path) -> None:
    stdout, data = run_quick(tmp_path, "bench_objective.py", "--threads", "1")
    assert "conclusion:" in stdout
    assert data["inconsistencies"] == []
    topologies = [t["name"] for t in data["topologies"]]
    assert [(c["strength"], c["window_steps"], c["topology"]) for c in data["cases"]] == list(
        itertools.product(data["strengths"], data["windows"], topologies)
    )
    assert data["strengths"] == [0.0, 0.5, 1.0, 3.0]
    for c in data["cases"]:
        assert [p["window"] for p in c["pairs"]] == list(range(data["pairs"]))
        for p in c["pairs"]:
            for objective in ("total", "step_peak"):
                # a step's peak GPU is at least its share of the sum's peak GPU
                for when in ("in", "next"):
                    step, summed = p[f"step_{when}"][objective], p[f"summed_{when}"][objective]
                    assert 0.0 < step <= summed + 1e-12 <= 1.0 + 2e-12, (c, p)
                assert p["seconds"][objective] > 0 and p["planner_seconds"][objective] > 0
            # step_peak's per-step peaks are never above total's on the window it planned from
            assert p["step_in"]["step_peak"] >= p["step_in"]["total"] - 1e-12, (c, p)
        assert c["next_better_pairs"] == sum(
            p["step_next"]["step_peak"] > p["step_next"]["total"] for p in c["pairs"]
        )
    lines = data["conclusions"]
    assert [line.split(":")[0] for line in lines[: len(data["strengths"])]] == [
        f"s={s:g}" for s in data["strengths"]
    ]
    assert "the next window better in every window pair" in lines[len(data["strengths"])]

    # The same traffic and plans at 2 threads (the planner is deterministic).
    _, again = run_quick(tmp_path, "bench_objective.py", "--threads", "2")
    quality = ("step_in", "step_next", "summed_in", "summed_next")
    assert [[{k: p[k] for k in quality} for p in c["pairs"]] for c in again["cases"]] == [
        [{k: p[k] for k in quality} for p in c["pairs"]] for c in data["cases"]
    ]


def test_bench_objective_drift() -> None:
    """bench_objective --drift: phase 0 is the base popularity, later phases put the same values
    on new expert orders, in between a linear blend of the logs; the quick run goes through."""
    bench = bench_module("bench_objective")
    model = bench.make_model(np.random.default_rng(1), 2, seed=4)
    base = np.log(model.popularity)
    np.testing.assert_array_equal(model.log_popularity(0, 0.1), base)
    later = model.log_popularity(10, 0.1)  # phase 1 exactly
    np.testing.assert_allclose(np.sort(later, axis=1), np.sort(base, axis=1))
    assert not np.array_equal(later, base)
    np.testing.assert_allclose(model.log_popularity(5, 0.1), 0.5 * base + 0.5 * later)
    counts = bench.sample_counts(model, np.random.default_rng(2), 12, 0.0, drift=0.1)
    assert counts.shape == (12, 2, bench.NUM_EXPERTS)
    assert (counts.sum(axis=2) == bench.TOKENS * bench.TOP_K).all()
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_objective.py"), "--quick", "--drift", "0.05"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "drift 0.05/step" in result.stdout


def test_bench_objective_flags_inconsistency() -> None:
    """bench_objective's consistency check (behind its exit status): silent on the library's two
    plans of a window, and reports step_peak's per-step peak above total's when they are
    swapped."""
    bench = bench_module("bench_objective")
    import moelb

    rng = np.random.default_rng(5)
    series = bench.sample_counts(bench.make_model(rng, 2), rng, 10, strength=3.0)
    for topology in bench.TOPOLOGIES:
        plans = {
            objective: moelb.rebalance(
                series, *topology.args(), locality=topology.locality, objective=objective
            )
            for objective in ("total", "step_peak")
        }
        scores = {o: moelb.evaluate_placement(series, p.location) for o, p in plans.items()}
        assert bench._check("ok", series, topology, plans, scores) == []
        swapped = {"total": plans["step_peak"], "step_peak": plans["total"]}
        swapped_scores = {"total": scores["step_peak"], "step_peak": scores["total"]}
        problems = bench._check("swapped", series, topology, swapped, swapped_scores)
        assert any("above total's" in p for p in problems), problems


def test_bench_dispatch_quick(tmp_path: Path) -> None:
    """bench_dispatch: moelb's SGLang table equals the benchmark's Python loop (else it exits 1),
    equal split is what the plan's own statistic says, every model is scored, and the exact split
    is timed at every size (no worse than the equal split it improves on)."""
    stdout, data = run_quick(tmp_path, "bench_dispatch.py")
    assert data["problems"] == []
    assert "SGLang static table of one rank" in stdout
    for r in data["results"]:
        assert set(r["realised"]) >= {"equal_split", "sglang_static", "moelb_static", "vllm_hash"}
        assert all(0 < v <= 1 for v in r["realised"].values())
    assert data["table_timing"]["moelb_ms"] > 0
    # The exact split: every size timed, and (the benchmark exits 1 otherwise) its largest rank
    # load equal to linprog's ceil(optimum) where SciPy is installed.
    split = data["balanced_split_timing"]
    assert [(r["ep_size"], r["num_physical_experts"]) for r in split] == [
        (32, 288),
        (64, 320),
        (144, 288),
        (256, 512),
    ]
    for r in split:
        assert r["us_per_layer"] > 0
        # (the integer optimum may exceed a fractional equal split by under one token per layer)
        assert 1 <= r["max_over_mean_balanced"] <= r["max_over_mean_equal_split"] + 0.01
        if r["linprog_ratio"] is not None:
            assert r["linprog_us_per_layer"] > 0 and r["linprog_ratio"] > 0
    assert "exact per-step split (balanced_split, ours)" in stdout
    # SGLang's lp (reference model) on the same inputs: never below the exact optimum (the
    # benchmark reports a problem otherwise), its fallbacks counted.
    lp = data["sglang_lp"]
    assert [r["ep_size"] for r in lp] == [32, 64, 144, 256]
    for r in lp:
        assert r["solves"] >= 1 and 0 <= r["sglang_lp_fallbacks"] <= r["solves"]
        assert r["sglang_lp_max_over_mean"] >= r["balanced_max_over_mean"] - 3e-3
    # DeepSeek LPLB's test cases, each with its bound and the exact split's max/mean.
    lplb = {r["case"]: r for r in data["lplb"]}
    assert {"cube_ep32", "cube_ep64", "hypercube_ep16", "torus_8x4_ep32"} <= set(lplb)
    for r in lplb.values():
        assert 1 <= r["balanced_max_over_mean"] <= r["balanced_worst"]
        assert r["bound"] > 1 and 0 <= r["balanced_under_bound"] <= r["draws"]
    assert "DeepSeek LPLB's test inputs" in stdout


def test_bench_move_cost_quick(tmp_path: Path) -> None:
    stdout, data = run_quick(tmp_path, "bench_move_cost.py")
    assert "conclusion:" in stdout and "default move_cost 0.0001" in stdout
    assert data["inconsistencies"] == []
    assert data["default_move_cost"] == 1e-4 and 1e-4 in data["move_costs"]
    assert [(c["shift"], c["passes"]) for c in data["cases"]] == list(
        itertools.product(data["shifts"], data["windows"])
    )
    slots = data["num_layers"] * data["num_physical_experts"]
    for c in data["cases"]:
        moved = [c[f"{m:g}"]["moved_slots"] for m in data["move_costs"]]
        # Each layer's plan does not depend on move_cost, only whether it is taken: a larger
        # move_cost never moves more.
        assert moved == sorted(moved, reverse=True), c
        assert 0 < moved[0] <= slots
        for m in data["move_costs"]:
            s = c[f"{m:g}"]
            assert s["moved_gb"] == pytest.approx(s["moved_slots"] * data["expert_bytes"] / 1e9)
            assert 0 <= s["layers_kept"] <= data["num_layers"]
    # A real shift is followed at the default: most of the move_cost-0 gain on the next window.
    for c in data["cases"]:
        if c["shift"] >= 0.1:
            assert c["0.0001"]["gain_next_window"] >= 0.9 * c["0"]["gain_next_window"] > 0.1


def test_bench_move_cost_flags_inconsistency() -> None:
    """bench_move_cost's check (behind its exit status): silent on the library's re-plan, and
    reports a re-placed layer whose gain is below move_cost x its moves."""
    bench = bench_module("bench_move_cost")
    import moelb

    rng = np.random.default_rng(3)
    popularity = bench.make_popularity(rng, 2)
    args = (bench.NUM_PHYSICAL, bench.NUM_GROUPS, bench.NUM_NODES, bench.NUM_GPUS)
    first = moelb.rebalance(bench.sample_window(popularity, rng, 10), *args)
    window = bench.sample_window(popularity, rng, 10)
    before = moelb.evaluate_placement(window, first.location)
    plan = moelb.rebalance(window, *args, previous=first.location, move_cost=0.0)
    assert plan.stats.moved_experts > 0
    assert bench._check("ok", plan, first.location, before, 0.0) == []
    problems = bench._check("strict", plan, first.location, before, 1.0)
    assert any("below move_cost 1 per move" in p for p in problems), problems
    assert bench.shift_popularity(popularity, rng, 0.5).sum() == pytest.approx(2.0)


def test_bench_all_reduce_quick(tmp_path: Path) -> None:
    pytest.importorskip("torch.distributed")
    stdout, data = run_quick(tmp_path, "bench_all_reduce.py")
    assert "recorder.all_reduce ms" in stdout
    (result,) = data["results"]
    assert (result["ranks"], result["passes"], result["layers"]) == (2, 20, 4)
    assert result["agrees"]  # the merged counts equal a plain all_reduce's sum, on every rank
    assert result["all_reduce_seconds"] > 0 and result["recorder_seconds"] > 0


def test_check_fingerprint_is_thread_invariant_and_sees_a_change(tmp_path: Path) -> None:
    """The behaviour fingerprint (benchmarks/check_fingerprint.py) hashes every area, the same at
    1 and 2 threads (its --compare passes), and --compare fails on a file whose hash differs."""
    _, one = run_quick(tmp_path, "check_fingerprint.py", "--threads", "1")
    assert set(one["areas"]) >= {"planner", "previous", "dispatch", "waterfill", "moe_layer"}
    assert all(area["cases"] > 0 for area in one["areas"].values())
    saved = tmp_path / "one.json"
    saved.write_text(json.dumps(one))
    script = str(BENCHMARKS / "check_fingerprint.py")
    same = subprocess.run(
        [sys.executable, script, "--quick", "--threads", "2", "--compare", str(saved)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert same.returncode == 0 and "identical" in same.stdout, same.stdout + same.stderr
    one["areas"]["planner"]["sha256"] = "0" * 64
    saved.write_text(json.dumps(one))
    changed = subprocess.run(
        [sys.executable, script, "--quick", "--areas", "planner", "--compare", str(saved)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert changed.returncode == 1 and "DIFFERS: planner" in changed.stdout, changed.stdout


def test_bench_step_time_quick(tmp_path: Path) -> None:
    """bench_step_time: the core's slot loads and dispatch copies equal the NumPy reference
    (else it exits 1) in both DeepEP modes at both sizes, and the model's step is timed."""
    stdout, data = run_quick(tmp_path, "bench_step_time.py")
    assert data["problems"] == []
    assert [(r["tokens_per_gpu"], r["mode"]) for r in data["results"]] == [
        (t, m) for t in (16, 128) for m in ("normal", "low_latency")
    ]
    assert all(r["core_ms"] > 0 and r["numpy_ms"] > 0 for r in data["results"])
    assert data["model_step_ms"] > 0 and "NumPy / core" in stdout


def test_bench_isa_quick(tmp_path: Path) -> None:
    """Every ISA path of the installed moelb, each script's smoke test once."""
    import moelb

    _, data = run_quick(tmp_path, "bench_isa.py")
    variants = [v["name"] for v in data["variants"]]
    assert variants == moelb.available_cpu_isas()
    assert [v["moelb"].split()[-1] for v in data["variants"]] == variants  # MOELB_ISA took effect
    assert not data["failures"]
    for script in ("routing", "eplb", "moe"):
        seconds = data["results"][script]["seconds"]
        assert set(seconds) == set(variants), script
        keys = set(seconds[variants[0]])
        assert keys and all(set(seconds[v]) == keys for v in variants), script
        # A case's entry: its seconds, or one per repeat.
        times = [np.ravel(s) for per in seconds.values() for s in per.values()]
        assert all(t.size and (t > 0).all() for t in times), script
        ratios = data["results"][script]["ratio_to_first"]
        assert set(ratios) == set(variants[1:]), script
        assert all(set(per) == keys for per in ratios.values()), script


def test_bench_isa_variant_specs(tmp_path: Path) -> None:
    bench_isa = bench_module("bench_isa")
    (tmp_path / "moelb").mkdir()
    v = bench_isa.parse_variant(f"portable={tmp_path}:baseline")
    assert (v.name, v.folder, v.isa) == ("portable", tmp_path, "baseline")
    assert bench_isa.parse_variant("avx2=:avx2").folder is None
    assert bench_isa.parse_variant(f"here={tmp_path}").isa is None
    env = bench_isa.parse_variant(f"p={tmp_path}:avx2").env()
    assert env["MOELB_ISA"] == "avx2" and env["PYTHONPATH"].split(os.pathsep)[0] == str(tmp_path)
    with pytest.raises(ValueError, match="is not NAME="):
        bench_isa.parse_variant("portable")
    with pytest.raises(ValueError, match="holds no moelb package"):
        bench_isa.parse_variant(f"x={tmp_path / 'missing'}")


def test_bench_moe_decode_shape_quick(tmp_path: Path) -> None:
    stdout, data = run_quick(tmp_path, "bench_moe_decode_shape.py")
    assert "goal: decode GB/s" in stdout
    rows = data["results"]
    assert {(r["weight_format"], r["num_tokens"], r["threads"]) for r in rows} == {
        (f, t, n) for f in ("bfloat16", "fp8_e4m3", "int8") for t in (1, 4) for n in (1, 2)
    }
    for r in rows:
        assert r["median_seconds"] > 0 and r["bytes_read"] > 0
        assert r["gbs"] == pytest.approx(r["bytes_read"] / r["median_seconds"] / 1e9)
