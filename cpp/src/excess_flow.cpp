// A min-cost flow from a pseudo-flow (ours; balanced_flow.hpp's ExcessFlow): balanced_assignment
// starts from every token on its cheapest arcs, which may overload ranks and leaves the tokens
// without such a place as excesses, and routes those excesses to the sink at the least cost.
//
// DESIGN: primal-dual on the residual graph with potentials pi (successive shortest paths, all
// paths of one length at once). The caller's pseudo-flow is optimal for its excesses under its
// potentials: every residual arc has reduced cost cost + pi(u) - pi(v) >= 0. A phase first runs
// Dinic's blocking flows from the nodes with excess over the admissible arcs (residual, reduced
// cost 0) until t is out of their reach: flow on arcs of reduced cost 0 keeps the pseudo-flow
// optimal for what is left. Then a Dijkstra from the nodes with excess, its queue a bucket per
// distance (reduced costs are small integers), stopped when t is settled at d_t; pi(v) +=
// min(dist(v), d_t) keeps every reduced cost >= 0 and gives the shortest paths to t reduced cost
// 0, admissible for the next phase. When every excess has reached t, the flow is a min-cost one.
// Integer and deterministic: arcs are scanned in the order they were added.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "balanced_flow.hpp"
#include "moelb/errors.hpp"

namespace moelb::detail {
namespace {

constexpr int kUnreached = std::numeric_limits<int>::max();
// The longest path the greedy pass follows (expert -> (e, nu) -> rank -> sink).
constexpr int kGreedyDepth = 3;

}  // namespace

std::int64_t ExcessFlow::run(int t) {
    index_arcs();
    active_.clear();
    for (int v = 0; v < num_nodes_; ++v) {
        if (v == t) continue;
        MOELB_CHECK(excess_[v] >= 0, "ExcessFlow: node " << v << " has a deficit");
        if (excess_[v] > 0) active_.push_back(v);
    }
    for (;;) {
        index_admissible();
        for (const int v : active_) {
            const std::int64_t g = greedy(v, t, excess_[v], kGreedyDepth);
            excess_[v] -= g;
            excess_[t] += g;
        }
        for (;;) {
            if (pending(t) == 0) return 0;
            if (!levels(t)) break;
            std::copy(adm_begin_.begin(), adm_begin_.end() - 1, cur_.begin());
            for (const int v : active_) {
                if (level_[v] != 0) continue;
                const std::int64_t g = push(v, t, excess_[v]);
                excess_[v] -= g;
                excess_[t] += g;
            }
        }
        if (!shortest_paths(t)) return pending(t);
        const int d_t = dist_[t];
        for (int v = 0; v < num_nodes_; ++v) pi_[v] += std::min(dist_[v], d_t);
    }
}

// The residual arcs in adjacency order (each node's in the order they were added) with their
// reverses' places.
void ExcessFlow::index_arcs() {
    const int n = num_nodes_;
    const int num_arcs = static_cast<int>(to_.size());
    begin_.assign(static_cast<std::size_t>(n) + 1, 0);
    for (const int u : from_) ++begin_[static_cast<std::size_t>(u) + 1];
    for (int u = 0; u < n; ++u) begin_[u + 1] += begin_[u];
    head_.resize(static_cast<std::size_t>(num_arcs));
    rcost_.resize(static_cast<std::size_t>(num_arcs));
    res_.resize(static_cast<std::size_t>(num_arcs));
    mate_.resize(static_cast<std::size_t>(num_arcs));
    slot_.resize(static_cast<std::size_t>(num_arcs));
    cur_.assign(begin_.begin(), begin_.end() - 1);
    for (int id = 0; id < num_arcs; ++id) {
        const int a = cur_[from_[id]]++;
        slot_[id] = a;
        head_[a] = to_[id];
        rcost_[a] = cost_[id];
        res_[a] = cap_[id];
    }
    for (int id = 0; id < num_arcs; ++id) mate_[slot_[id]] = slot_[id ^ 1];
    level_.resize(static_cast<std::size_t>(n));
}

// The admissible arcs (reduced cost 0, whether residual or not: augmenting along them keeps both
// directions at 0) of every node, for this phase's potentials.
void ExcessFlow::index_admissible() {
    const int n = num_nodes_;
    adm_begin_.resize(static_cast<std::size_t>(n) + 1);
    adm_.clear();
    for (int u = 0; u < n; ++u) {
        adm_begin_[u] = static_cast<int>(adm_.size());
        for (int a = begin_[u]; a < begin_[u + 1]; ++a) {
            if (reduced(u, a) == 0) adm_.push_back(a);
        }
    }
    adm_begin_[n] = static_cast<int>(adm_.size());
}

// Up to `limit` from u to t along admissible arcs, depth-first without levels, at most `depth`
// arcs deep: most of the flow, cheaply, before Dinic's levels.
std::int64_t ExcessFlow::greedy(int u, int t, std::int64_t limit, int depth) {
    if (u == t) return limit;
    if (depth == 0) return 0;
    std::int64_t pushed = 0;
    for (int j = adm_begin_[u]; j < adm_begin_[u + 1]; ++j) {
        const int a = adm_[j];
        if (res_[a] == 0) continue;
        const std::int64_t g = greedy(head_[a], t, std::min(limit - pushed, res_[a]), depth - 1);
        if (g == 0) continue;
        res_[a] -= g;
        res_[mate_[a]] += g;
        pushed += g;
        if (pushed == limit) break;
    }
    return pushed;
}

// Drops the nodes without excess left (and t) from active_; returns the excess left on them.
std::int64_t ExcessFlow::pending(int t) {
    std::int64_t left = 0;
    std::size_t kept = 0;
    for (const int v : active_) {
        if (v == t || excess_[v] == 0) continue;
        left += excess_[v];
        active_[kept++] = v;
    }
    active_.resize(kept);
    return left;
}

// BFS levels from the nodes with excess over the admissible arcs, up to t's level; true when t
// is reached.
bool ExcessFlow::levels(int t) {
    std::fill(level_.begin(), level_.end(), -1);
    queue_.clear();
    for (const int v : active_) {
        level_[v] = 0;
        queue_.push_back(v);
    }
    for (std::size_t q = 0; q < queue_.size(); ++q) {
        const int u = queue_[q];
        if (level_[t] >= 0 && level_[u] >= level_[t]) break;
        for (int j = adm_begin_[u]; j < adm_begin_[u + 1]; ++j) {
            const int a = adm_[j];
            const int v = head_[a];
            if (res_[a] == 0 || level_[v] >= 0) continue;
            level_[v] = level_[u] + 1;
            queue_.push_back(v);
        }
    }
    return level_[t] >= 0;
}

std::int64_t ExcessFlow::push(int u, int t, std::int64_t limit) {
    if (u == t) return limit;
    std::int64_t pushed = 0;
    const int next = level_[u] + 1;
    for (int& j = cur_[u]; j < adm_begin_[u + 1]; ++j) {
        const int a = adm_[j];
        const int v = head_[a];
        if (res_[a] == 0 || level_[v] != next) continue;
        if (v != t && next >= level_[t]) continue;
        const std::int64_t g = push(v, t, std::min(limit - pushed, res_[a]));
        if (g == 0) continue;
        res_[a] -= g;
        res_[mate_[a]] += g;
        pushed += g;
        if (pushed == limit) break;
    }
    return pushed;
}

// Distances in reduced costs from the nodes with excess, up to t's; false when t is out of reach.
bool ExcessFlow::shortest_paths(int t) {
    dist_.assign(static_cast<std::size_t>(num_nodes_), kUnreached);
    if (buckets_.empty()) buckets_.resize(1);
    for (const int v : active_) {
        dist_[v] = 0;
        buckets_[0].push_back(v);
    }
    bool found = false;
    for (std::size_t d = 0; d < buckets_.size() && !found; ++d) {
        // Arcs of reduced cost 0 append to the bucket being scanned: index, not iterators.
        for (std::size_t q = 0; q < buckets_[d].size(); ++q) {
            const int u = buckets_[d][q];
            if (dist_[u] != static_cast<int>(d)) continue;  // settled closer before
            if (u == t) {
                found = true;
                break;
            }
            for (int a = begin_[u]; a < begin_[u + 1]; ++a) {
                if (res_[a] == 0) continue;
                const int v = head_[a];
                const int dv = static_cast<int>(d) + reduced(u, a);
                if (dv >= dist_[v]) continue;
                dist_[v] = dv;
                if (static_cast<std::size_t>(dv) >= buckets_.size()) buckets_.resize(dv + 1);
                buckets_[dv].push_back(v);
            }
        }
    }
    for (auto& b : buckets_) b.clear();
    return found;
}

}  // namespace moelb::detail
