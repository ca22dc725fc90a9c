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
#include <functional>
#include <utility>
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

    // Nodes: the sink, the flow experts, the ranks (created when first reached). Every arc starts
    // at the equal split (its segments up to the equal share full), which is the least-cost flow
    // without the ranks' capacities; what that leaves on an expert (rounding) or above a rank's
    // capacity is then routed to the sink at least cost.
    graph_.reset();
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
    MOELB_CHECK(graph_.route_to(t), "even shares: the makespan " << makespan << " is infeasible");

    edge_flow_.assign(static_cast<std::size_t>(num_edges), 0);
    for (int id = 0; id < num_edges; ++id) {
        for (int a = segments_[id]; a < segments_[id + 1]; ++a)
            edge_flow_[id] += graph_.flow(arcs_[a]);
    }
}

// ------------------------------------------------------------------------------------------------
// WarmFlow: successive shortest paths from a pseudo-flow.

int WarmFlow::add_arc(int u, int v, std::int64_t cap, std::int64_t cost, std::int64_t flow) {
    const int id = static_cast<int>(to_.size());
    from_.insert(from_.end(), {u, v});
    to_.insert(to_.end(), {v, u});
    cap_.insert(cap_.end(), {cap - flow, flow});
    cost_.insert(cost_.end(), {cost, -cost});
    return id;
}

void WarmFlow::index_arcs() {
    const int n = num_nodes_;
    adj_begin_.assign(static_cast<std::size_t>(n) + 1, 0);
    for (const int u : from_) ++adj_begin_[static_cast<std::size_t>(u) + 1];
    for (int u = 0; u < n; ++u) adj_begin_[u + 1] += adj_begin_[u];
    adj_.resize(from_.size());
    cur_.assign(adj_begin_.begin(), adj_begin_.end() - 1);
    for (int id = 0; id < static_cast<int>(from_.size()); ++id) adj_[cur_[from_[id]]++] = id;
}

// Potentials with every residual arc's reduced cost >= 0: shortest distances from a virtual node
// joined to every node at cost 0 (Bellman-Ford with a queue). The start is a least-cost flow of
// its own supplies, so the residual graph has no negative cycle; a pass count past the node count
// would mean one, and is an internal error.
bool WarmFlow::potentials() {
    const int n = num_nodes_;
    pi_.assign(static_cast<std::size_t>(n), 0);
    queue_.resize(static_cast<std::size_t>(n));
    for (int v = 0; v < n; ++v) queue_[v] = v;
    std::vector<char>& queued = queued_;
    queued.assign(static_cast<std::size_t>(n), 1);
    std::size_t relaxations = 0;
    const std::size_t limit = static_cast<std::size_t>(n) * (from_.size() + 1);
    for (std::size_t q = 0; q < queue_.size(); ++q) {
        const int u = queue_[q];
        queued[u] = 0;
        for (int j = adj_begin_[u]; j < adj_begin_[u + 1]; ++j) {
            const int id = adj_[j];
            if (cap_[id] == 0) continue;
            const int v = to_[id];
            if (pi_[u] + cost_[id] < pi_[v]) {
                pi_[v] = pi_[u] + cost_[id];
                if (++relaxations > limit) return false;
                if (!queued[v]) {
                    queued[v] = 1;
                    queue_.push_back(v);
                }
            }
        }
    }
    return true;
}

bool WarmFlow::route_to(int t) {
    // A super source feeding every node's excess.
    const int s = add_node();
    std::int64_t total = 0;
    for (int v = 0; v < s; ++v) {
        if (excess_[v] > 0) {
            add_arc(s, v, excess_[v], 0, 0);
            total += excess_[v];
        }
    }
    if (total == 0) return true;
    index_arcs();
    if (!potentials()) return false;
    const int n = num_nodes_;
    level_.resize(static_cast<std::size_t>(n));
    std::int64_t routed = 0;
    while (routed < total && shortest_paths(s, t)) {
        const std::int64_t d_t = dist_[t];
        for (int v = 0; v < n; ++v) pi_[v] += std::min(dist_[v], d_t);
        while (levels(s, t)) {
            std::copy(adj_begin_.begin(), adj_begin_.end() - 1, cur_.begin());
            routed += push(s, t, kInt64Max);
        }
    }
    return routed == total;
}

bool WarmFlow::shortest_paths(int s, int t) {
    dist_.assign(static_cast<std::size_t>(num_nodes_), kInt64Max);
    heap_.clear();
    dist_[s] = 0;
    heap_.emplace_back(0, s);
    const auto later = std::greater<std::pair<std::int64_t, int>>();
    while (!heap_.empty()) {
        std::pop_heap(heap_.begin(), heap_.end(), later);
        const auto [d, u] = heap_.back();
        heap_.pop_back();
        if (d != dist_[u]) continue;
        for (int j = adj_begin_[u]; j < adj_begin_[u + 1]; ++j) {
            const int id = adj_[j];
            if (cap_[id] == 0) continue;
            const int v = to_[id];
            const std::int64_t dv = d + reduced(id);
            if (dv < dist_[v]) {
                dist_[v] = dv;
                heap_.emplace_back(dv, v);
                std::push_heap(heap_.begin(), heap_.end(), later);
            }
        }
    }
    return dist_[t] < kInt64Max;
}

bool WarmFlow::levels(int s, int t) {
    std::fill(level_.begin(), level_.end(), -1);
    queue_.assign(1, s);
    level_[s] = 0;
    for (std::size_t q = 0; q < queue_.size(); ++q) {
        const int u = queue_[q];
        for (int j = adj_begin_[u]; j < adj_begin_[u + 1]; ++j) {
            const int id = adj_[j];
            const int v = to_[id];
            if (cap_[id] == 0 || level_[v] >= 0 || reduced(id) != 0) continue;
            level_[v] = level_[u] + 1;
            queue_.push_back(v);
        }
    }
    return level_[t] >= 0;
}

std::int64_t WarmFlow::push(int u, int t, std::int64_t limit) {
    if (u == t) return limit;
    std::int64_t pushed = 0;
    for (int& j = cur_[u]; j < adj_begin_[u + 1]; ++j) {
        const int id = adj_[j];
        const int v = to_[id];
        if (cap_[id] == 0 || level_[v] != level_[u] + 1 || reduced(id) != 0) continue;
        if (v != t && level_[v] >= level_[t]) continue;
        const std::int64_t g = push(v, t, std::min(limit - pushed, cap_[id]));
        if (g == 0) continue;
        cap_[id] -= g;
        cap_[id ^ 1] += g;
        pushed += g;
        if (pushed == limit) break;
    }
    return pushed;
}

}  // namespace moelb::detail
