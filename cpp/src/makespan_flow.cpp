// The makespan flow of one layer (ours; DESIGN section 9, reference/dispatch.md section 7): the
// split of a step's global counts over the replicas at the optimal largest rank load ceil(T*), as
// an integral max-flow (balanced_flow.hpp's MakespanFlow); used by balanced_split as is and by
// balanced_assignment for its makespan.
//
// DESIGN: experts with all their replicas on one rank are fixed load there; the others ("flow
// experts") feed source -> expert (n_e) -> its ranks -> sink (T - F_r). T starts at a lower bound
// of T* -- the largest fixed load, the mean rank load, each flow expert alone with its ranks, and
// the Hall bound of each connected component, which is the optimum on node-local placements --
// then a greedy pass and Dinic's blocking flows fill the network. When T is infeasible, the source
// side of the residual graph is a violated Hall set whose bound exceeds T (Newton's step of the
// parametric min cut, Gallo-Grigoriadis-Tarjan); the sink capacities grow by the difference and the
// flow so far is augmented, never rebuilt. The first feasible integer T is ceil(T*).
#include <algorithm>
#include <cstdint>
#include <vector>

#include "balanced_flow.hpp"
#include "moelb/errors.hpp"

namespace moelb::detail {

// ------------------------------------------------------------------------------------------------
// The network of one layer.

void MakespanFlow::build(const ExpertLocation& loc, int layer, const std::int64_t* counts,
                         const std::int64_t* fixed) {
    const int W = loc.ep_size();
    if (fixed != nullptr) {
        fixed_.assign(fixed, fixed + W);
    } else {
        fixed_.assign(static_cast<std::size_t>(W), 0);
    }
    index_slots(loc, layer);
    add_flow_experts(loc, layer, counts);
    index_edges();
}

// The rank of every slot (once per shape: no division per slot and layer) and of every expert
// whose replicas all sit on one rank (else kSpread).
void MakespanFlow::index_slots(const ExpertLocation& loc, int layer) {
    const int W = loc.ep_size(), E = loc.num_logical_experts();
    const int S = loc.num_local_physical_experts(), P = loc.num_physical_experts();
    if (static_cast<int>(rank_of_.size()) != P || S != slots_per_rank_) {
        rank_of_.resize(static_cast<std::size_t>(P));
        for (int p = 0; p < P; ++p) rank_of_[p] = p / S;
        slots_per_rank_ = S;
    }
    // Slots in rank order.
    const std::int32_t* p2l = loc.physical_to_logical().data() + static_cast<Index>(layer) * P;
    expert_rank_.assign(static_cast<std::size_t>(E), kUnseen);
    for (int r = 0, p = 0; r < W; ++r) {
        for (int j = 0; j < S; ++j, ++p) {
            int& seen = expert_rank_[p2l[p]];
            if (seen == kUnseen) {
                seen = r;
            } else if (seen != r) {
                seen = kSpread;
            }
        }
    }
}

int MakespanFlow::compact_rank(int rank) {
    int& c = compact_of_[static_cast<std::size_t>(rank)];
    if (c < 0) {
        c = static_cast<int>(rank_global_.size());
        rank_global_.push_back(rank);
    }
    return c;
}

// Single-rank experts add their tokens to their rank's fixed load; the others become flow
// experts with one edge per distinct rank holding a replica.
void MakespanFlow::add_flow_experts(const ExpertLocation& loc, int layer,
                                    const std::int64_t* counts) {
    const int W = loc.ep_size(), E = loc.num_logical_experts();
    compact_of_.assign(static_cast<std::size_t>(W), -1);
    expert_id_.clear();
    supply_.clear();
    edge_begin_.assign(1, 0);
    edge_rank_.clear();
    edge_expert_.clear();
    rank_global_.clear();
    deficit_ = 0;
    for (int e = 0; e < E; ++e) {
        const std::int64_t n = counts[e];
        if (n == 0) continue;
        const int rank = expert_rank_[e];
        MOELB_CHECK(rank != kUnseen,
                    "logical expert " << e << " has no replica in layer " << layer);
        if (rank >= 0) {  // one rank: a fixed load
            fixed_[static_cast<std::size_t>(rank)] += n;
            continue;
        }
        const int i = static_cast<int>(expert_id_.size());
        expert_id_.push_back(e);
        supply_.push_back(n);
        deficit_ += n;
        int prev = -1;
        for (const std::int32_t p : loc.replicas(layer, e)) {  // ascending slots, so ranks
            const int r = rank_of_[p];
            if (r == prev) continue;
            prev = r;
            edge_rank_.push_back(compact_rank(r));
            edge_expert_.push_back(i);
        }
        edge_begin_.push_back(static_cast<int>(edge_rank_.size()));
    }
}

// The flows at zero, the rank-side adjacency (edges of each rank in ascending expert order) and
// the solver's buffers sized.
void MakespanFlow::index_edges() {
    const int k = num_flow_experts(), m = static_cast<int>(rank_global_.size());
    const int num_edges = static_cast<int>(edge_rank_.size());
    rem_ = supply_;
    flow_.assign(static_cast<std::size_t>(num_edges), 0);
    group_by(
        num_edges, m, [&](int id) { return edge_rank_[id]; }, rank_edge_begin_, rank_edges_,
        cur_r_);
    level_e_.resize(static_cast<std::size_t>(k));
    cur_e_.resize(static_cast<std::size_t>(k));
    level_r_.resize(static_cast<std::size_t>(m));
    spare_.resize(static_cast<std::size_t>(m));
}

// ------------------------------------------------------------------------------------------------
// Lower bounds of T*.

// The largest fixed load, the mean rank load, each flow expert alone with its ranks' fixed loads,
// and each connected component.
std::int64_t MakespanFlow::lower_bound() {
    const auto W = static_cast<std::int64_t>(fixed_.size());
    std::int64_t total = 0, T = 0;
    for (const std::int64_t f : fixed_) {
        total += f;
        T = std::max(T, f);
    }
    for (const std::int64_t n : supply_) total += n;
    T = std::max(T, ceil_div(total, W));
    for (int i = 0; i < num_flow_experts(); ++i) {
        std::int64_t load = supply_[i];
        for (int id = edge_begin_[i]; id < edge_begin_[i + 1]; ++id) {
            load += fixed_[static_cast<std::size_t>(rank_global_[edge_rank_[id]])];
        }
        T = std::max(T, ceil_div(load, edge_begin_[i + 1] - edge_begin_[i]));
    }
    return std::max(T, component_bound());
}

// The Hall bound of every connected component of the network (its experts' tokens and its
// ranks' fixed loads over its ranks): with node-local placements, about one per node.
std::int64_t MakespanFlow::component_bound() {
    const int m = static_cast<int>(rank_global_.size());
    // Union-find over the ranks; every expert joins its ranks.
    parent_.resize(static_cast<std::size_t>(m));
    for (int r = 0; r < m; ++r) parent_[r] = r;
    auto root = [&](int r) {
        while (parent_[r] != r) r = parent_[r] = parent_[parent_[r]];
        return r;
    };
    for (int i = 0; i < num_flow_experts(); ++i) {
        const int a = root(edge_rank_[edge_begin_[i]]);
        for (int id = edge_begin_[i] + 1; id < edge_begin_[i + 1]; ++id) {
            const int b = root(edge_rank_[id]);
            if (a != b) parent_[b] = a;
        }
    }
    component_load_.assign(static_cast<std::size_t>(m), 0);
    component_ranks_.assign(static_cast<std::size_t>(m), 0);
    for (int r = 0; r < m; ++r) {
        const int c = root(r);
        component_load_[c] += fixed_[static_cast<std::size_t>(rank_global_[r])];
        ++component_ranks_[c];
    }
    for (int i = 0; i < num_flow_experts(); ++i) {
        component_load_[root(edge_rank_[edge_begin_[i]])] += supply_[i];
    }
    std::int64_t bound = 0;
    for (int r = 0; r < m; ++r) {
        if (component_ranks_[r] > 0) {
            bound = std::max(bound, ceil_div(component_load_[r], component_ranks_[r]));
        }
    }
    return bound;
}

// The Hall bound of the residual source side after a failed `levels()`.
std::int64_t MakespanFlow::hall_bound() const {
    std::int64_t load = 0, ranks = 0;
    for (int i = 0; i < num_flow_experts(); ++i) {
        if (level_e_[i] >= 0) load += supply_[i];
    }
    for (int r = 0; r < static_cast<int>(rank_global_.size()); ++r) {
        if (level_r_[r] < 0) continue;
        load += fixed_[static_cast<std::size_t>(rank_global_[r])];
        ++ranks;
    }
    MOELB_CHECK(ranks > 0, "balanced_split: an infeasible step reached no rank");
    return ceil_div(load, ranks);
}

// ------------------------------------------------------------------------------------------------
// The flow.

// Each expert in turn fills its ranks' spare capacity in rank order: most of the flow, cheaply.
void MakespanFlow::greedy() {
    for (int i = 0; i < num_flow_experts(); ++i) {
        for (int id = edge_begin_[i]; id < edge_begin_[i + 1] && rem_[i] > 0; ++id) {
            std::int64_t& spare = spare_[edge_rank_[id]];
            const std::int64_t g = std::min(rem_[i], spare);
            flow_[id] += g;
            spare -= g;
            rem_[i] -= g;
            deficit_ -= g;
        }
    }
}

// Dinic's BFS from every expert with supply left: experts at even levels, ranks at odd ones, up
// to the first level holding a rank with spare capacity (then true). When no such rank is
// reachable, the levels >= 0 mark the residual graph's source side (then false).
bool MakespanFlow::levels() {
    std::fill(level_e_.begin(), level_e_.end(), -1);
    std::fill(level_r_.begin(), level_r_.end(), -1);
    frontier_.clear();
    for (int i = 0; i < num_flow_experts(); ++i) {
        if (rem_[i] > 0) {
            level_e_[i] = 0;
            frontier_.push_back(i);
        }
    }
    int level = 0;
    while (!frontier_.empty()) {
        next_.clear();
        bool found = false;
        for (const int i : frontier_) {
            for (int id = edge_begin_[i]; id < edge_begin_[i + 1]; ++id) {
                const int r = edge_rank_[id];
                if (level_r_[r] >= 0) continue;
                level_r_[r] = level + 1;
                next_.push_back(r);
                found = found || spare_[r] > 0;
            }
        }
        if (found) {
            sink_level_ = level + 1;
            return true;
        }
        frontier_.clear();
        for (const int r : next_) {
            for (int j = rank_edge_begin_[r]; j < rank_edge_begin_[r + 1]; ++j) {
                const int id = rank_edges_[j];
                const int i = edge_expert_[id];
                if (flow_[id] == 0 || level_e_[i] >= 0) continue;
                level_e_[i] = level + 2;
                frontier_.push_back(i);
            }
        }
        level += 2;
    }
    return false;
}

std::int64_t MakespanFlow::push_expert(int i, std::int64_t limit) {
    std::int64_t pushed = 0;
    for (int& id = cur_e_[i]; id < edge_begin_[i + 1]; ++id) {
        const int r = edge_rank_[id];
        if (level_r_[r] != level_e_[i] + 1) continue;
        const std::int64_t g = push_rank(r, limit - pushed);
        if (g == 0) continue;
        flow_[id] += g;
        pushed += g;
        if (pushed == limit) break;
    }
    return pushed;
}

std::int64_t MakespanFlow::push_rank(int r, std::int64_t limit) {
    if (level_r_[r] == sink_level_) {
        const std::int64_t g = std::min(limit, spare_[r]);
        spare_[r] -= g;
        return g;
    }
    // Below the sink level a rank has no spare capacity: it passes the flow on by moving tokens
    // of another expert it holds to that expert's other ranks.
    std::int64_t pushed = 0;
    for (int& j = cur_r_[r]; j < rank_edge_begin_[r + 1]; ++j) {
        const int id = rank_edges_[j];
        const int i = edge_expert_[id];
        if (flow_[id] == 0 || level_e_[i] != level_r_[r] + 1) continue;
        const std::int64_t g = push_expert(i, std::min(limit - pushed, flow_[id]));
        if (g == 0) continue;
        flow_[id] -= g;
        pushed += g;
        if (pushed == limit) break;
    }
    return pushed;
}

std::int64_t MakespanFlow::solve() {
    std::int64_t T = lower_bound();
    for (int r = 0; r < static_cast<int>(rank_global_.size()); ++r) {
        spare_[r] = T - fixed_[static_cast<std::size_t>(rank_global_[r])];
    }
    greedy();
    for (;;) {
        while (deficit_ > 0 && levels()) {
            std::copy(edge_begin_.begin(), edge_begin_.end() - 1, cur_e_.begin());
            std::copy(rank_edge_begin_.begin(), rank_edge_begin_.end() - 1, cur_r_.begin());
            for (int i = 0; i < num_flow_experts(); ++i) {
                if (level_e_[i] != 0) continue;
                const std::int64_t g = push_expert(i, rem_[i]);
                rem_[i] -= g;
                deficit_ -= g;
            }
        }
        if (deficit_ == 0) return T;
        const std::int64_t next = hall_bound();
        MOELB_CHECK(next > T,
                    "balanced_split: the Hall bound " << next << " does not exceed T=" << T);
        for (std::int64_t& s : spare_) s += next - T;
        T = next;
    }
}

}  // namespace moelb::detail
