"""Study (ours, issue 20): what limits ``rebalance(dispatch="sglang_static")`` under bursty
traffic? Issue 20's goal: the realised max/mean within 0.02 of what the equal-split plan
promises. Met without bursts; with ``moelb simulate --bursts 1.0`` it is missed. A Python study;
nothing here is in the library.

Traffic: the simulator's own (``moelb.simulation.traffic.SyntheticRouting``, the demo
configuration: 288 slots on 32 GPUs in 4 nodes, 4,096 tokens per step, windows of 6 steps). Each
window's summed counts are planned on with ``previous`` (as the simulator does); the plan is
scored on the next window, per step and layer, balancedness = (mean + 1e-5) / (max + 1e-5) of
the GPU loads, averaged (SGLang's rate; the simulator's "planned" and "sglang_static" columns):

- ``equal split``: every expert's step load split equally over its replicas (the promise);
- ``table``: SGLang's file-path tables (``dispatch_tables``), each rank originating 1/W of every
  expert's step load (the planner's model);
- ``token``: each source rank's own tokens through its table (the simulator's figure).

Rows: the equal-split plan (``moelb:none``); the sglang_static plan (``moelb:none:sglang_static``);
per layer the one of the two with the lower score on the planning window -- the sum over its
steps of the largest GPU load under the tables (``pick: window steps``), or the largest over GPUs
of mean + 3 standard deviations with independent experts (``pick: variance``) -- and, as a bound
on any such choice, the lower sum on the next window itself (``pick: next window``, hindsight).
Then, per plan of the first window: experts with replicas (layers summed) and the per-step GPU
variance proxy sum_e var_e * sum_p share_p^2 (independent experts).

    python benchmarks/study_sglang_static_bursts.py                             # about 1 minute
    python benchmarks/study_sglang_static_bursts.py --model deepseek-v4-flash
    python benchmarks/study_sglang_static_bursts.py --bursts 0

Results: benchmarks/README.md ("sglang_static under bursts"). Never fails on quality.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import moelb
import numpy as np
import numpy.typing as npt
from moelb.simulation.config import SimulationConfig
from moelb.simulation.traffic import SyntheticRouting

Counts = npt.NDArray[np.int32]


def rate(loads: npt.NDArray[np.float64]) -> float:
    """SGLang's utilization rate of GPU loads [..., W], averaged over the leading axes."""
    return float(((loads.mean(-1) + 1e-5) / (loads.max(-1) + 1e-5)).mean())


class Study:
    def __init__(self, config: SimulationConfig) -> None:
        preset = config.preset()
        self.L = preset.num_moe_layers
        self.E = preset.num_experts
        self.P = self.E + config.num_redundant_experts
        self.W, self.N = config.ep_size, config.num_nodes
        self.S = self.P // self.W
        self.groups = preset.num_groups or None
        layers = np.arange(preset.first_moe_layer, preset.first_moe_layer + self.L)
        routing = SyntheticRouting(preset, layers, config)
        bounds = np.linspace(0, config.num_tokens, self.W + 1).astype(np.int64)
        self.source = np.repeat(np.arange(self.W), np.diff(bounds))
        self.windows: list[tuple[Counts, list[list[Counts]]]] = []
        period = config.rebalance_period
        for w in range(config.num_steps // period):
            routed = [routing.route(step) for step in range(w * period, (w + 1) * period)]
            self.windows.append((routing.window_counts(), routed))

    def shares(self, loc: moelb.ExpertLocation) -> npt.NDArray[np.float64]:
        """[L, P]: the fraction of ranks whose table sends the slot's expert to the slot."""
        tables = moelb.dispatch_tables(loc, "sglang_static")  # [W, L, E]
        out = np.empty((self.L, self.P))
        for layer in range(self.L):
            out[layer] = np.bincount(tables[:, layer].ravel(), minlength=self.P) / self.W
        return out

    def gpu_steps(self, loc: moelb.ExpertLocation, counts: Counts) -> npt.NDArray[np.float64]:
        """[T, L, W]: per step the GPU loads under the tables (each rank 1/W of every expert)."""
        share = self.shares(loc)
        p2l = loc.physical_to_logical
        x = np.take_along_axis(counts.astype(np.float64), p2l[None], axis=2) * share[None]
        return x.reshape(counts.shape[0], self.L, self.W, self.S).sum(-1)

    def score(self, loc: moelb.ExpertLocation, routed: Sequence[Sequence[Counts]]) -> list[float]:
        """(equal split, table, token) balancedness of ``loc`` on the steps ``routed``."""
        p2l, count = loc.physical_to_logical, loc.logical_count
        tables = moelb.dispatch_tables(loc, "sglang_static")
        share = self.shares(loc)
        eq, table, token = [], [], []
        for step in routed:
            for layer, ids in enumerate(step):
                c = np.bincount(ids[ids >= 0], minlength=self.E).astype(np.float64)
                slots = c[p2l[layer]]
                eq.append(rate((slots / count[layer][p2l[layer]]).reshape(self.W, -1).sum(1)))
                table.append(rate((slots * share[layer]).reshape(self.W, -1).sum(1)))
                valid = ids >= 0
                ranks = np.broadcast_to(self.source[:, None], ids.shape)[valid]
                phys = tables[ranks, layer, ids[valid]]
                token.append(rate(np.bincount(phys // self.S, minlength=self.W).astype(float)))
        return [float(np.mean(eq)), float(np.mean(table)), float(np.mean(token))]

    def variance_score(self, loc: moelb.ExpertLocation, counts: Counts) -> npt.NDArray[np.float64]:
        """[L]: max over GPUs of the window's mean step load + 3 sd (independent experts)."""
        share = self.shares(loc)
        p2l = loc.physical_to_logical
        c = counts.astype(np.float64)
        mean = np.take_along_axis(c.mean(0), p2l, axis=1) * share
        var = np.take_along_axis(c.var(0), p2l, axis=1) * share**2
        mean_g = mean.reshape(self.L, self.W, self.S).sum(-1)
        sd_g = np.sqrt(var.reshape(self.L, self.W, self.S).sum(-1))
        return (mean_g + 3 * sd_g).max(-1)

    def run(self) -> None:
        L, E, P, W, N = self.L, self.E, self.P, self.W, self.N
        rows = ("equal-split plan", "sglang_static plan", "pick: window steps", "pick: variance",
                "pick: next window")  # fmt: skip
        results: dict[str, list[list[float]]] = {r: [] for r in rows}
        current = {d: moelb.ExpertLocation.trivial(L, E, P, W, N) for d in ("eq", "st")}
        stats: list[str] = []
        for w in range(len(self.windows) - 1):
            counts, _ = self.windows[w]
            following, routed = self.windows[w + 1]
            total = counts.sum(axis=0, dtype=np.float64)
            plans = {}
            for d, dispatch in (("eq", "equal_split"), ("st", "sglang_static")):
                plans[d] = moelb.rebalance(
                    total, P, self.groups, N, W, previous=current[d], locality="none",
                    dispatch=dispatch,
                ).location  # fmt: skip
                current[d] = plans[d]
            results[rows[0]].append(self.score(plans["eq"], routed))
            results[rows[1]].append(self.score(plans["st"], routed))
            picks = {
                rows[2]: [self.gpu_steps(plans[d], counts).max(-1).sum(0) for d in ("eq", "st")],
                rows[3]: [self.variance_score(plans[d], counts) for d in ("eq", "st")],
                rows[4]: [self.gpu_steps(plans[d], following).max(-1).sum(0) for d in ("eq", "st")],
            }
            for row, (a, b) in picks.items():
                eq_rows, st_rows = plans["eq"].physical_to_logical, plans["st"].physical_to_logical
                mixed = np.where((a < b)[:, None], eq_rows, st_rows)
                loc = moelb.ExpertLocation(np.ascontiguousarray(mixed), E, W, N)
                results[row].append(self.score(loc, routed))
            if w == 0:
                var = counts.astype(np.float64).var(axis=0)
                for d in ("eq", "st"):
                    loc = plans[d]
                    replicated = int((loc.logical_count > 1).sum())
                    for name, share in (("equal split", 1.0 / loc.logical_count), ("table", None)):
                        if share is not None:
                            s = np.take_along_axis(share, loc.physical_to_logical, axis=1)
                        else:
                            s = self.shares(loc)
                        v = np.take_along_axis(var, loc.physical_to_logical, axis=1)
                        stats.append(
                            f"  {rows[0] if d == 'eq' else rows[1]:20s} {name:11s}: "
                            f"replicated experts {replicated}, sum var*share^2 "
                            f"{float((v * s**2).sum()):.4g}"
                        )
        print("next-window balancedness (max/mean in brackets)")
        print(f"  {'plan':20s} {'equal split':>16s} {'table':>16s} {'token':>16s}")
        for row in rows:
            m = np.mean(results[row], axis=0)
            cells = " ".join(f"{x:.4f} ({1 / x:.3f})" for x in m)
            print(f"  {row:20s} {cells}")
        print("first window's plans:")
        print("\n".join(stats))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="deepseek-v3")
    parser.add_argument("--bursts", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config = SimulationConfig(model=args.model, bursts=args.bursts, seed=args.seed)
    print(f"{args.model}, bursts {args.bursts}, seed {args.seed}; moelb {moelb.__version__}")
    Study(config).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
