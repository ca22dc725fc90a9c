// The even split at the optimal makespan (ours; DESIGN section 9, reference/dispatch.md section 7:
// "several optima usually exist; a second criterion picks among them"): balanced_flow.hpp's
// EvenShares, which balanced_split(shares = kEven) runs after the makespan flow to choose, among
// the splits whose largest rank load is ceil(T*), one whose replicas' shares are as even as the
// optimum allows.
//
// DESIGN: the max-flow returns some vertex of the optimal face -- typically many experts wholly on
// one of their replicas. As per-replica fractions for a later step (SGLang `lp`'s contract, or
// fractions fixed for a window) a vertex hedges nothing: an expert whose count moves moves one
// rank. The even split minimises sum over (expert e, rank g) of x_eg^2 / (n_e m_eg) (m_eg: e's
// slots on g; its unconstrained minimum is the equal split per slot, and it weighs an expert by
// its count, as the variance of a Poisson count would), subject to every rank load <= T. Convex
// separable, so a min-cost flow with piecewise-linear arc costs: the arc e -> g is cut at the
// integers floor(j h), h = n_e m_eg / (2 r_e) tokens (half an equal share; r_e: e's slots), and
// each segment's unit cost is the objective's chord slope over it. The result is the least
// piecewise-linear cost over the integral optimal splits, whose objective exceeds the least one
// by at most ceil(h)^2 / (4 n_e m_eg) per (expert, rank) (the chord's gap over one segment), and
// is exact where h <= 1. Integral; deterministic (the min-cost flow scans its arcs in the order
// they were added: experts ascending, their ranks in slot order).
#include <algorithm>
#include <cstdint>
#include <vector>

#include "balanced_flow.hpp"
#include "moelb/errors.hpp"

namespace moelb::detail {

namespace {

// floor(j * n * m / (2 r)): the breakpoints of an arc, every half equal share (n up to the int64
// range, so the product in 128 bits).
std::int64_t breakpoint(std::int64_t j, std::int64_t n, std::int64_t m, std::int64_t r) {
    const __int128 num = static_cast<__int128>(n) * (j * m);
    return static_cast<std::int64_t>(num / (2 * r));
}

// Unit cost of the segment [lo, hi) of an arc with n tokens and m slots: the chord slope of
// x^2 / (n m) over it, (lo + hi) / (n m) <= 2, times kScale and rounded -- small integers, so
// path costs never overflow. The breakpoints are integers, so the piecewise-linear cost equals
// the objective at every breakpoint.
constexpr std::int64_t kScale = std::int64_t{1} << 20;

std::int64_t segment_cost(std::int64_t lo, std::int64_t hi, std::int64_t n, std::int64_t m) {
    const __int128 den = static_cast<__int128>(n) * m;
    return static_cast<std::int64_t>((static_cast<__int128>(lo + hi) * kScale + den / 2) / den);
}

}  // namespace

void EvenShares::solve(const ExpertLocation& loc, int layer, const MakespanFlow& flow,
                       std::int64_t makespan, const std::int64_t* counts) {
    const int E = loc.num_logical_experts();
    const std::int32_t* copies = loc.logical_count().data() + row_slot(layer, E);
    const int k = flow.num_flow_experts();
    const int num_edges = flow.edge_begin(k);
    const int W = loc.ep_size();
    const std::vector<int>& rank_of = flow.rank_of();

    // Nodes: source, sink, the flow experts, the ranks (created when first reached).
    graph_.reset(0);
    const int s = graph_.add_node(), t = graph_.add_node();
    rank_node_.assign(static_cast<std::size_t>(W), -1);
    segments_.assign(static_cast<std::size_t>(num_edges) + 1, 0);
    arcs_.clear();
    std::int64_t supply = 0;
    for (int i = 0; i < k; ++i) {
        const int e = flow.expert_id(i);
        const std::int64_t n = counts[e], r = copies[e];
        supply += n;
        const int u = graph_.add_node();
        graph_.add_arc(s, u, n, 0);
        const auto reps = loc.replicas(layer, e);
        int id = flow.edge_begin(i);
        for (std::size_t j = 0; j < reps.size(); ++id) {
            const std::size_t j_end = same_rank_end(reps, j, rank_of);
            const std::int64_t m = static_cast<std::int64_t>(j_end - j);
            const int g = rank_of[reps[j]];
            MOELB_CHECK(flow.edge_rank(id) == g, "even shares: edges out of slot order");
            int& v = rank_node_[static_cast<std::size_t>(g)];
            if (v < 0) v = graph_.add_node();
            // Segments of half an equal share up to the expert's whole count.
            segments_[id] = static_cast<int>(arcs_.size());
            for (std::int64_t seg = 0;; ++seg) {
                const std::int64_t lo = breakpoint(seg, n, m, r);
                const std::int64_t hi = std::min(n, breakpoint(seg + 1, n, m, r));
                if (hi > lo)
                    arcs_.push_back(graph_.add_arc(u, v, hi - lo, segment_cost(lo, hi, n, m)));
                if (hi >= n) break;
            }
            j = j_end;
        }
        segments_[id] = static_cast<int>(arcs_.size());
    }
    for (int g = 0; g < W; ++g) {
        const int v = rank_node_[static_cast<std::size_t>(g)];
        if (v >= 0) graph_.add_arc(v, t, makespan - flow.fixed_load()[g], 0);
    }
    const std::int64_t routed = graph_.run(s, t);
    MOELB_CHECK(routed == supply, "even shares: the makespan " << makespan << " is infeasible");

    edge_flow_.assign(static_cast<std::size_t>(num_edges), 0);
    for (int id = 0; id < num_edges; ++id) {
        for (int a = segments_[id]; a < segments_[id + 1]; ++a)
            edge_flow_[id] += graph_.flow(arcs_[a]);
    }
}

}  // namespace moelb::detail
