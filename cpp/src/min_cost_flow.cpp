// A min-cost flow (ours; DESIGN section 9, reference/dispatch.md section 7: "several optima
// usually exist; a second criterion picks among them: a min-cost flow at makespan ceil(T*)"):
// balanced_flow.hpp's MinCostFlow, the library's one min-cost flow. balanced_assignment runs it at
// the makespan flow's T from its own pseudo-flow (every expert at its least cost, the ranks'
// overloads routed) with the potentials that make that pseudo-flow optimal, the even shares
// (even_shares.cpp) from the equal split's pseudo-flow, and the reference assignment
// (balanced_assignment_reference.cpp) from zero flow.
//
// DESIGN: primal-dual. Dijkstra on reduced costs (arc costs are small non-negative integers, the
// potentials keep reduced costs >= 0) gives the distances; the potentials move so that every
// shortest s-t path has reduced cost 0; then Dinic's blocking flows over the admissible arcs
// (residual, reduced cost 0) until none is left; repeated until t is unreachable. Deterministic:
// arcs are scanned in the order they were added.
#include <algorithm>
#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

#include "balanced_flow.hpp"

namespace moelb::detail {

std::int64_t MinCostFlow::run(int s, int t) {
    index_arcs();
    pi_.assign(static_cast<std::size_t>(num_nodes_), 0);
    return augment(s, t, kInt64Max);
}

bool MinCostFlow::route_excess_to(int t) {
    // A super source feeding every node's excess, its potential the highest of theirs (its arcs
    // then start at reduced cost >= 0 under the given potentials).
    std::int64_t top = 0;
    bool any = false;
    for (int v = 0; v < num_nodes_; ++v) {
        if (excess_[v] <= 0) continue;
        top = any ? std::max(top, start_pi_[v]) : start_pi_[v];
        any = true;
    }
    const int s = add_node(top);
    std::int64_t total = 0;
    for (int v = 0; v < s; ++v) {
        if (excess_[v] > 0) {
            add_arc(s, v, excess_[v], 0);
            total += excess_[v];
        }
    }
    if (total == 0) return true;
    index_arcs();
    return potentials() && augment(s, t, total) == total;
}

// Shortest paths then blocking flows over the zero-reduced-cost arcs, until `target` is sent or t
// is unreachable; pi_ must keep every residual arc's reduced cost >= 0. Returns the flow sent.
std::int64_t MinCostFlow::augment(int s, int t, std::int64_t target) {
    const int n = num_nodes_;
    level_.resize(static_cast<std::size_t>(n));
    std::int64_t total = 0;
    while (total < target && shortest_paths(s, t)) {
        // Potentials: reduced costs stay >= 0 and every shortest s-t path has reduced cost 0.
        const std::int64_t d_t = dist_[t];
        for (int v = 0; v < n; ++v) pi_[v] += std::min(dist_[v], d_t);
        while (levels(s, t)) {
            std::copy(adj_begin_.begin(), adj_begin_.end() - 1, cur_.begin());
            total += push(s, t, kInt64Max);
        }
    }
    return total;
}

// Potentials with every residual arc's reduced cost >= 0: shortest distances from a virtual node
// joined to every node v at cost start_pi_[v] (Bellman-Ford with a queue, from the given
// potentials: where they already are such potentials, nothing is relaxed). A pseudo-flow that is a
// least-cost flow of its own supplies has no negative residual cycle; more relaxations than nodes
// x arcs would mean one, and route_excess_to then fails.
bool MinCostFlow::potentials() {
    const int n = num_nodes_;
    pi_.assign(start_pi_.begin(), start_pi_.end());
    queue_.resize(static_cast<std::size_t>(n));
    for (int v = 0; v < n; ++v) queue_[v] = v;
    queued_.assign(static_cast<std::size_t>(n), 1);
    std::size_t relaxations = 0;
    const std::size_t limit = static_cast<std::size_t>(n) * (from_.size() + 1);
    for (std::size_t q = 0; q < queue_.size(); ++q) {
        const int u = queue_[q];
        queued_[u] = 0;
        for (int j = adj_begin_[u]; j < adj_begin_[u + 1]; ++j) {
            const int id = adj_[j];
            if (cap_[id] == 0) continue;
            const int v = to_[id];
            if (pi_[u] + cost_[id] < pi_[v]) {
                pi_[v] = pi_[u] + cost_[id];
                if (++relaxations > limit) return false;
                if (!queued_[v]) {
                    queued_[v] = 1;
                    queue_.push_back(v);
                }
            }
        }
    }
    return true;
}

// The arcs leaving each node, in the order they were added.
void MinCostFlow::index_arcs() {
    group_by(
        static_cast<int>(to_.size()), num_nodes_, [&](int id) { return from_[id]; }, adj_begin_,
        adj_, cur_);
}

// Dijkstra from s on the reduced costs, stopped when t is settled: every node closer than d_t is
// settled by then and every other one is at d_t or farther, so augment's min(dist, d_t) gives the
// same potentials as a full search would (and so the same flow).
bool MinCostFlow::shortest_paths(int s, int t) {
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
        if (u == t) break;
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

// BFS levels over the admissible arcs (residual, reduced cost 0) up to t's level (push uses no
// node at or past it but t); true when t is reached.
bool MinCostFlow::levels(int s, int t) {
    std::fill(level_.begin(), level_.end(), -1);
    queue_.assign(1, s);
    level_[s] = 0;
    for (std::size_t q = 0; q < queue_.size(); ++q) {
        const int u = queue_[q];
        if (level_[t] >= 0 && level_[u] >= level_[t]) break;
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

std::int64_t MinCostFlow::push(int u, int t, std::int64_t limit) {
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
