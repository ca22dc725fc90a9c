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

// min(n, floor(j * n * m / (2 r))): the breakpoints of an arc, every half equal share, capped at
// the expert's count (n up to the int64 range, so the product in 128 bits; the last breakpoint
// past n may not fit in int64 when 2 r / m is not an integer).
std::int64_t breakpoint(std::int64_t j, std::int64_t n, std::int64_t m, std::int64_t r) {
    const __int128 num = static_cast<__int128>(n) * (j * m);
    const __int128 point = num / (2 * r);
    return point < n ? static_cast<std::int64_t>(point) : n;
}

// Unit cost of the segment [lo, hi) of an arc with n tokens and m slots: the chord slope of
// x^2 / (n m) over it, (lo + hi) / (n m) <= 2, times kScale and rounded -- small integers, so
// path costs never overflow. The breakpoints are integers, so the piecewise-linear cost equals
// the objective at every breakpoint.
constexpr std::int64_t kScale = std::int64_t{1} << 20;

std::int64_t segment_cost(std::int64_t lo, std::int64_t hi, std::int64_t n, std::int64_t m) {
    const __int128 den = static_cast<__int128>(n) * m;
    // lo + hi reaches 2 n: summed in 128 bits (n may exceed 2^62).
    return static_cast<std::int64_t>(((static_cast<__int128>(lo) + hi) * kScale + den / 2) / den);
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

    // Nodes: the sink, the flow experts, the ranks (created when first reached). Every arc starts
    // at the equal split (its segments up to the equal share full), which is the least-cost flow
    // without the ranks' capacities; what that leaves on an expert (rounding) or above a rank's
    // capacity is then routed to the sink at least cost.
    graph_.reset(0);
    const int t = graph_.add_node();
    rank_node_.assign(static_cast<std::size_t>(W), -1);
    rank_load_.assign(static_cast<std::size_t>(W), 0);
    segments_.assign(static_cast<std::size_t>(num_edges) + 1, 0);
    arcs_.clear();
    for (int i = 0; i < k; ++i) {
        const int e = flow.expert_id(i);
        const std::int64_t n = counts[e], r = copies[e];
        const int u = graph_.add_node();
        std::int64_t placed = 0;
        const auto reps = loc.replicas(layer, e);
        int id = flow.edge_begin(i);
        for (std::size_t j = 0; j < reps.size(); ++id) {
            const std::size_t j_end = same_rank_end(reps, j, rank_of);
            const std::int64_t m = static_cast<std::int64_t>(j_end - j);
            const int g = rank_of[reps[j]];
            MOELB_CHECK(flow.edge_rank(id) == g, "even shares: edges out of slot order");
            int& v = rank_node_[static_cast<std::size_t>(g)];
            if (v < 0) v = graph_.add_node();
            // Segments of half an equal share up to the expert's whole count; the first two (up to
            // the equal share, breakpoint 2) start full.
            const std::int64_t equal = breakpoint(2, n, m, r);
            segments_[id] = static_cast<int>(arcs_.size());
            for (std::int64_t seg = 0;; ++seg) {
                const std::int64_t lo = breakpoint(seg, n, m, r);
                const std::int64_t hi = std::min(n, breakpoint(seg + 1, n, m, r));
                if (hi > lo) {
                    const std::int64_t full = hi <= equal ? hi - lo : 0;
                    arcs_.push_back(
                        graph_.add_arc(u, v, hi - lo, segment_cost(lo, hi, n, m), full));
                    placed += full;
                    rank_load_[g] += full;
                }
                if (hi >= n) break;
            }
            j = j_end;
        }
        segments_[id] = static_cast<int>(arcs_.size());
        graph_.add_excess(u, n - placed);
    }
    for (int g = 0; g < W; ++g) {
        const int v = rank_node_[static_cast<std::size_t>(g)];
        if (v < 0) continue;
        const std::int64_t capacity = makespan - flow.fixed_load()[g];
        const std::int64_t through = std::min(rank_load_[g], capacity);
        graph_.add_arc(v, t, capacity, 0, through);
        graph_.add_excess(v, rank_load_[g] - through);
    }
    MOELB_CHECK(graph_.route_excess_to(t),
                "even shares: the makespan " << makespan << " is infeasible");

    edge_flow_.assign(static_cast<std::size_t>(num_edges), 0);
    for (int id = 0; id < num_edges; ++id) {
        for (int a = segments_[id]; a < segments_[id + 1]; ++a)
            edge_flow_[id] += graph_.flow(arcs_[a]);
    }
}

}  // namespace moelb::detail
