// The previous balanced_assignment (ours): the old algorithm, kept unchanged but for names as the
// test oracle that tests and benchmarks/bench_dispatch.py compare the production solver in
// balanced_assignment.cpp with, reachable only from them through the private binding
// _core._balanced_assignment_reference. The makespan flow on the summed counts, then the
// library's one min-cost flow (MinCostFlow::run from zero flow, min_cost_flow.cpp; no solver of
// its own) over one node per class of sources per replicated expert. Same contract as
// balanced_assignment (the same makespan and the same least total cost; the assignment may differ
// where ties exist).
//
// DESIGN: sources whose costs to an expert's ranks are the same form one class (a node of the
// min-cost network): the rank itself when it holds a replica, the other ranks of a node holding
// one, and the ranks of every other node (kDispatchCost* 0 / 1 / 2). A class's flow is handed
// back to its sources in ascending order (any split of a class is equally cheap), and a rank's
// tokens of an expert to its slots of that expert (evenly, lower slots first, each source's in
// source order). Integer and deterministic.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "balanced_flow.hpp"
#include "moelb/dispatch.hpp"
#include "moelb/errors.hpp"
#include "moelb/parallel.hpp"

namespace moelb::detail {
namespace {

// One layer's assignment, its steps in solve(). Reused across layers (thread_local).
class ReferenceSolver {
  public:
    void solve(const ExpertLocation& loc, int layer, ConstMatrixMap<std::int64_t> source_counts,
               Index first_row, const std::int64_t* fixed, std::int64_t* out);

  private:
    int num_ranks(int i) const { return makespan_.edge_begin(i + 1) - makespan_.edge_begin(i); }
    int rank(int i, int j) const { return makespan_.edge_rank(makespan_.edge_begin(i) + j); }
    // Source s's counts [E] of the layer being solved.
    const std::int64_t* source_row(int s) const { return rows_ + static_cast<Index>(s) * E_; }

    std::int64_t solve_makespan(const ExpertLocation& loc, int layer, const std::int64_t* fixed);
    void classify_sources(const ExpertLocation& loc);
    void add_class_supplies();
    void route_classes(std::int64_t T);
    std::int64_t class_cost(int i, int key, int j) const;
    void make_groups(const ExpertLocation& loc, int layer);
    // A group: one expert's slots on one rank, reps[begin, end), with `tokens` to hand out.
    int add_group(const std::int32_t* reps, int begin, int end, std::int64_t tokens);
    void hand_out(const ExpertLocation& loc, int layer, std::int64_t* out);
    void from_class(int i, int c, std::int64_t tokens, std::int64_t* out_row);
    void to_slots(int g, std::int64_t tokens, std::int64_t* out_row);

    MakespanFlow makespan_;
    MinCostFlow mcf_;
    const std::int64_t* rows_ = nullptr;  // [W, E], the layer's source counts
    int W_ = 0, E_ = 0, k_ = 0;           // ranks, experts, flow experts
    std::vector<std::int64_t> counts_;    // [E], summed over sources
    std::vector<int> node_of_;            // [W]
    std::vector<int> rank_node_;          // [W], the network node of a rank, or -1
    // Classes: j = the source is rank j of the expert's ranks (ascending), |R| + j = another
    // rank of the node of rank j (the node's first), 2 |R| = another node.
    std::vector<int> keys_;                   // [W, k]
    std::vector<int> position_, node_first_;  // [W], [N]: scratch, -1 outside the expert's ranks
    // Per flow expert i, 2 |R_i| + 1 class keys from key_begin_[i]: supply, first arc (or -1),
    // and the hand-back cursor (rank position, flow left there).
    std::vector<int> key_begin_;
    std::vector<std::int64_t> class_supply_, class_left_;
    std::vector<int> class_arc_, class_pos_;
    // Groups: one per flow edge (same ids), then one per expert with several slots on its one
    // rank.
    std::vector<const std::int32_t*> group_reps_;
    std::vector<int> group_begin_, group_end_, group_pos_;
    std::vector<std::int64_t> group_tokens_, group_left_;
    std::vector<int> stacked_expert_;  // the experts of the groups after the flow edges
};

void ReferenceSolver::solve(const ExpertLocation& loc, int layer,
                            ConstMatrixMap<std::int64_t> source_counts, Index first_row,
                            const std::int64_t* fixed, std::int64_t* out) {
    W_ = loc.ep_size();
    E_ = loc.num_logical_experts();
    rows_ = source_counts.data() + first_row * E_;
    const std::int64_t T = solve_makespan(loc, layer, fixed);
    classify_sources(loc);
    add_class_supplies();
    route_classes(T);
    make_groups(loc, layer);
    hand_out(loc, layer, out);
}

// The makespan flow on the counts summed over the sources: T = ceil(T*).
std::int64_t ReferenceSolver::solve_makespan(const ExpertLocation& loc, int layer,
                                             const std::int64_t* fixed) {
    counts_.assign(static_cast<std::size_t>(E_), 0);
    for (int s = 0; s < W_; ++s) {
        const std::int64_t* row = source_row(s);
        for (int e = 0; e < E_; ++e) counts_[e] += row[e];
    }
    makespan_.build(loc, layer, counts_.data(), fixed);
    const std::int64_t T = makespan_.solve();
    k_ = makespan_.num_flow_experts();
    node_of_.resize(static_cast<std::size_t>(W_));
    for (int r = 0; r < W_; ++r) node_of_[r] = loc.node_of_rank(r);
    return T;
}

// The class of every (source, flow expert), [W, k], expert by expert through per-rank and
// per-node tables.
void ReferenceSolver::classify_sources(const ExpertLocation& loc) {
    const int k = k_;
    key_begin_.assign(1, 0);
    for (int i = 0; i < k; ++i) key_begin_.push_back(key_begin_.back() + 2 * num_ranks(i) + 1);
    keys_.resize(static_cast<std::size_t>(W_) * k);
    position_.assign(static_cast<std::size_t>(W_), -1);
    node_first_.assign(static_cast<std::size_t>(loc.num_nodes()), -1);
    for (int i = 0; i < k; ++i) {
        const int num = num_ranks(i);
        for (int j = 0; j < num; ++j) {
            position_[rank(i, j)] = j;
            int& first = node_first_[node_of_[rank(i, j)]];
            if (first < 0) first = j;
        }
        for (int s = 0; s < W_; ++s) {
            const int own = position_[s], node = node_first_[node_of_[s]];
            keys_[static_cast<std::size_t>(s) * k + i] =
                own >= 0 ? own : (node >= 0 ? num + node : 2 * num);
        }
        for (int j = 0; j < num; ++j) {
            position_[rank(i, j)] = -1;
            node_first_[node_of_[rank(i, j)]] = -1;
        }
    }
}

// The classes' supplies, source by source (rows are contiguous).
void ReferenceSolver::add_class_supplies() {
    const int k = k_;
    class_supply_.assign(static_cast<std::size_t>(key_begin_.back()), 0);
    for (int s = 0; s < W_; ++s) {
        const std::int64_t* row = source_row(s);
        const int* keys = keys_.data() + static_cast<std::size_t>(s) * k;
        for (int i = 0; i < k; ++i) {
            const std::int64_t tokens = row[makespan_.expert_id(i)];
            if (tokens > 0) class_supply_[key_begin_[i] + keys[i]] += tokens;
        }
    }
}

// The min-cost network at makespan T -- source 0, sink 1, the ranks (capacity T - F_r to the
// sink), then the classes (their supply from the source, an arc to each of the expert's ranks at
// the class's cost) -- and its flow, which must route every class's supply.
void ReferenceSolver::route_classes(std::int64_t T) {
    const auto& F = makespan_.fixed_load();
    mcf_.reset(2);
    rank_node_.assign(static_cast<std::size_t>(W_), -1);
    for (int i = 0; i < k_; ++i) {
        for (int j = 0; j < num_ranks(i); ++j) {
            const int r = rank(i, j);
            if (rank_node_[r] >= 0) continue;
            rank_node_[r] = mcf_.add_node();
            mcf_.add_arc(rank_node_[r], 1, T - F[static_cast<std::size_t>(r)], 0);
        }
    }
    class_arc_.assign(class_supply_.size(), -1);
    std::int64_t want = 0;
    for (int i = 0; i < k_; ++i) {
        for (int key = 0; key <= 2 * num_ranks(i); ++key) {
            const std::int64_t supply = class_supply_[key_begin_[i] + key];
            if (supply == 0) continue;
            const int node = mcf_.add_node();
            mcf_.add_arc(0, node, supply, 0);
            want += supply;
            for (int j = 0; j < num_ranks(i); ++j) {
                const int arc =
                    mcf_.add_arc(node, rank_node_[rank(i, j)], supply, class_cost(i, key, j));
                if (j == 0) class_arc_[key_begin_[i] + key] = arc;
            }
        }
    }
    const std::int64_t routed = mcf_.run(0, 1);
    MOELB_CHECK(routed == want, "balanced_assignment: the min-cost flow routed "
                                    << routed << " of " << want << " tokens at T=" << T);
}

// The per-token cost (kDispatchCost*) of class `key` of flow expert i served on its rank j.
std::int64_t ReferenceSolver::class_cost(int i, int key, int j) const {
    const int num = num_ranks(i);
    if (key == j) return kDispatchCostOwnRank;
    if (key < 2 * num) {
        const int home = key < num ? key : key - num;
        if (node_of_[rank(i, home)] == node_of_[rank(i, j)]) return kDispatchCostSameNode;
    }
    return kDispatchCostOtherNode;
}

// The hand-back cursors: classes at their first rank, groups at their first slot. A group per
// flow edge (the rank's tokens of the expert, summed over the classes), then one per expert with
// several slots on its one rank.
void ReferenceSolver::make_groups(const ExpertLocation& loc, int layer) {
    class_pos_.assign(class_arc_.size(), 0);
    class_left_.assign(class_arc_.size(), 0);
    for (std::size_t c = 0; c < class_arc_.size(); ++c) {
        if (class_arc_[c] >= 0) class_left_[c] = mcf_.flow(class_arc_[c]);
    }
    group_reps_.clear();
    group_begin_.clear();
    group_end_.clear();
    group_pos_.clear();
    group_tokens_.clear();
    group_left_.clear();
    stacked_expert_.clear();
    const std::vector<int>& rank_of = makespan_.rank_of();
    for (int i = 0; i < k_; ++i) {
        const auto reps = loc.replicas(layer, makespan_.expert_id(i));
        int begin = 0;
        for (int j = 0; j < num_ranks(i); ++j) {
            const int end =
                static_cast<int>(same_rank_end(reps, static_cast<std::size_t>(begin), rank_of));
            std::int64_t tokens = 0;
            for (int key = 0; key <= 2 * num_ranks(i); ++key) {
                const int arc = class_arc_[key_begin_[i] + key];
                if (arc >= 0) tokens += mcf_.flow(arc + 2 * j);
            }
            add_group(reps.data(), begin, end, tokens);  // id = makespan_.edge_begin(i) + j
            begin = end;
        }
    }
    const std::int32_t* copies = loc.logical_count().data() + row_slot(layer, E_);
    for (int e = 0; e < E_; ++e) {
        if (counts_[e] == 0 || copies[e] == 1 || makespan_.expert_rank(e) < 0) continue;
        const auto reps = loc.replicas(layer, e);
        add_group(reps.data(), 0, static_cast<int>(reps.size()), counts_[e]);
        stacked_expert_.push_back(e);
    }
}

int ReferenceSolver::add_group(const std::int32_t* reps, int begin, int end, std::int64_t tokens) {
    group_reps_.push_back(reps);
    group_begin_.push_back(begin);
    group_end_.push_back(end);
    group_pos_.push_back(begin);
    group_tokens_.push_back(tokens);
    group_left_.push_back(even_share(tokens, end - begin, 0));
    return static_cast<int>(group_reps_.size()) - 1;
}

// Every source's row of `out` [W, P], in source order: its one-slot experts' tokens, its flow
// experts' tokens through its classes, its single-rank experts' through their groups.
void ReferenceSolver::hand_out(const ExpertLocation& loc, int layer, std::int64_t* out) {
    const int P = loc.num_physical_experts();
    const int num_edges = makespan_.edge_begin(k_);
    for (int s = 0; s < W_; ++s) {
        const std::int64_t* row = source_row(s);
        std::int64_t* out_row = out + static_cast<Index>(s) * P;
        fill_single_slots(loc, layer, row, out_row);
        for (int i = 0; i < k_; ++i) {
            const std::int64_t tokens = row[makespan_.expert_id(i)];
            if (tokens == 0) continue;
            from_class(i, key_begin_[i] + keys_[static_cast<std::size_t>(s) * k_ + i], tokens,
                       out_row);
        }
        for (std::size_t j = 0; j < stacked_expert_.size(); ++j) {
            const std::int64_t tokens = row[stacked_expert_[j]];
            if (tokens > 0) to_slots(num_edges + static_cast<int>(j), tokens, out_row);
        }
    }
}

// `tokens` of flow expert i from class c's flow, rank by rank from the class's cursor.
void ReferenceSolver::from_class(int i, int c, std::int64_t tokens, std::int64_t* out_row) {
    while (tokens > 0) {
        while (class_left_[c] == 0) {
            MOELB_CHECK(++class_pos_[c] < num_ranks(i),
                        "balanced_assignment: a class's flow overflows");
            class_left_[c] = mcf_.flow(class_arc_[c] + 2 * class_pos_[c]);
        }
        const std::int64_t take = std::min(tokens, class_left_[c]);
        to_slots(makespan_.edge_begin(i) + class_pos_[c], take, out_row);
        tokens -= take;
        class_left_[c] -= take;
    }
}

// `tokens` of group g onto its slots from the group's cursor.
void ReferenceSolver::to_slots(int g, std::int64_t tokens, std::int64_t* out_row) {
    const std::int32_t* reps = group_reps_[g];
    const int n = group_end_[g] - group_begin_[g];
    if (n == 1) {
        out_row[reps[group_begin_[g]]] += tokens;
        return;
    }
    while (tokens > 0) {
        while (group_left_[g] == 0) {
            MOELB_CHECK(++group_pos_[g] < group_end_[g],
                        "balanced_assignment: a rank's slots overflow");
            group_left_[g] = even_share(group_tokens_[g], n, group_pos_[g] - group_begin_[g]);
        }
        const std::int64_t take = std::min(tokens, group_left_[g]);
        out_row[reps[group_pos_[g]]] += take;
        tokens -= take;
        group_left_[g] -= take;
    }
}

// This thread's solver, reached through a call (as balanced_assignment.cpp's): inlined, every
// access to the thread_local object in a shared library may cost a __tls_get_addr call, which made
// this copy several times slower from Python than the solver it preserves.
[[gnu::noinline]] ReferenceSolver& thread_solver() {
    thread_local ReferenceSolver solver;
    return solver;
}

}  // namespace

void balanced_assignment_reference(const ExpertLocation& location,
                                   ConstMatrixMap<std::int64_t> source_counts,
                                   ConstMatrixMap<std::int64_t> fixed_loads,
                                   MatrixMap<std::int64_t> out, int layer) {
    const Shape shape = check_layers(location, layer);
    check_assignment_shapes(location, shape, source_counts, out);
    check_fixed_loads(location, shape, fixed_loads);
    const int W = location.ep_size(), P = location.num_physical_experts();
    check_counts(shape, source_counts, W, {"source_counts", shape.one_layer, true}, fixed_loads);
    const int grain = std::max(1, 256 / std::max(W, 1));
    parallel_for(shape.layers, grain, [&](Index begin, Index end) {
        ReferenceSolver& solver = thread_solver();
        for (Index row = begin; row < end; ++row) {
            solver.solve(location, shape.first + static_cast<int>(row), source_counts, row * W,
                         fixed_row(fixed_loads, row), out.data() + row * W * P);
        }
    });
}

}  // namespace moelb::detail
