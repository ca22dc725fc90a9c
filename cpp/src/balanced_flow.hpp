// Private to moelb's exact per-step split (ours; DESIGN section 9, reference/dispatch.md section
// 7; the public side is balanced_split / balanced_assignment in moelb/dispatch.hpp): what its
// files share. One file per concern:
//
//   makespan_flow.cpp        MakespanFlow: one layer's split at the optimal largest rank load
//                            ceil(T*), a max-flow started at the Hall bounds of its components
//                            and raised by Hall (min-cut) steps
//   min_cost_flow.cpp        MinCostFlow: the one min-cost flow (primal-dual), from zero flow or
//                            from a caller's pseudo-flow (the even shares, the assignment)
//   balanced_checks.cpp      the input checks both public functions share (layer, fixed loads,
//                            counts >= 0 and their sums within int64), naming the bad entry
//   even_shares.cpp          EvenShares: among the splits at ceil(T*), the one with the most
//                            even replica shares (a min-cost flow with convex arc costs)
//   balanced_split.cpp       balanced_split(): checks -> per layer the makespan flow (and the
//                            even shares when asked) -> slots
//   balanced_assignment.cpp  balanced_assignment(): sums and checks -> per layer the makespan
//                            flow on the summed counts, its split raised to each expert's cheap
//                            shares, overloads moved at no cost or by the MinCostFlow from that
//                            pseudo-flow over one node per (expert, node) -> per-source slots by
//                            greedy matching
//   balanced_assignment_reference.cpp  the previous balanced_assignment algorithm (a MinCostFlow
//                            over classes of sources), kept as the tests' and benchmarks' oracle
//
// DESIGN: one layer is a flow network: source -> replicated expert e (capacity n_e) -> each rank
// holding a replica of e (unbounded) -> sink (capacity T - F_r, F_r the rank's fixed load: the
// caller's fixed_loads plus every expert whose replicas all sit on that rank). T is feasible iff
// the max flow saturates every expert; the first feasible integer T is ceil(T*), and the flow is
// integral, so the token-level problem is solved exactly with no LP solver and no rounding.
// Everything is integer and deterministic: every rank computing the split gets the same one.
#pragma once

#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "moelb/expert_location.hpp"
#include "moelb/views.hpp"

namespace moelb::detail {

inline constexpr std::int64_t kInt64Max = std::numeric_limits<std::int64_t>::max();

inline std::int64_t ceil_div(std::int64_t a, std::int64_t b) {
    return a / b + (a % b != 0 ? 1 : 0);
}

// The offset of row `row` of a [rows, cols] row-major array.
inline Index row_slot(int row, int cols) { return static_cast<Index>(row) * cols; }

// Splits `total` over `n` slots as evenly as possible, the lower slots taking the remainder.
inline std::int64_t even_share(std::int64_t total, std::int64_t n, std::int64_t i) {
    return total / n + (i < total % n ? 1 : 0);
}

// The end of the run of `reps` (ascending slots) from `begin` whose slots sit on one rank: a
// rank's replicas of one expert.
inline std::size_t same_rank_end(std::span<const std::int32_t> reps, std::size_t begin,
                                 const std::vector<int>& rank_of) {
    std::size_t end = begin + 1;
    while (end < reps.size() && rank_of[reps[end]] == rank_of[reps[begin]]) ++end;
    return end;
}

// Items [0, n) grouped by key(i) in [0, num_keys) (a counting sort, stable: items ascend within a
// group): group g's items are items[begin[g], begin[g + 1]). `cursor` is scratch.
template <class Key>
void group_by(int n, int num_keys, Key key, std::vector<int>& begin, std::vector<int>& items,
              std::vector<int>& cursor) {
    begin.assign(static_cast<std::size_t>(num_keys) + 1, 0);
    for (int i = 0; i < n; ++i) ++begin[static_cast<std::size_t>(key(i)) + 1];
    for (int g = 0; g < num_keys; ++g) begin[g + 1] += begin[g];
    items.resize(static_cast<std::size_t>(n));
    cursor.assign(begin.begin(), begin.end() - 1);
    for (int i = 0; i < n; ++i) items[cursor[key(i)]++] = i;
}

// ------------------------------------------------------------------------------------------------
// Input checks (balanced_checks.cpp). Messages use the Python parameter names.

// How an input entry is named in messages: "counts[3, 17]" for all layers, "counts[17]" for one;
// "source_counts[3, 5, 17]" with a source rank.
struct Naming {
    const char* param;
    bool one_layer;
    bool per_source = false;  // rows of W source ranks per layer

    std::string at(Index row, Index col) const;
    std::string at(Index row, Index source, Index col) const;
    std::string of_layer(int layer) const;
};

// The layers a call solves: all of the location's (layer < 0) or one.
struct Shape {
    int layers;  // rows of counts per source (1 with `layer`)
    int first;   // the location layer of row 0
    bool one_layer;
};

// Checks `layer` (< 0: all layers) against the location.
Shape check_layers(const ExpertLocation& loc, int layer);

// Checks the shape of fixed_loads ([layers, W], or [W] for one layer; empty = none).
void check_fixed_loads(const ExpertLocation& loc, const Shape& shape,
                       ConstMatrixMap<std::int64_t> fixed_loads);

// Checks every layer's fixed loads and counts (>= 0, their sum within int64), the first bad entry
// named, before any layer is solved (so that a bad row anywhere leaves no work done). Layer row
// `row` of the counts is rows [row * sources, (row + 1) * sources) of `counts` (sources = 1, or W
// with name.per_source).
void check_counts(const Shape& shape, ConstMatrixMap<std::int64_t> counts, int sources,
                  const Naming& name, ConstMatrixMap<std::int64_t> fixed_loads);

// One layer row's counts summed over its sources into sums [cols] (rows [row * sources, (row +
// 1) * sources) of `counts`), with check_counts's checks decided without a branch per entry:
// true when every count is >= 0 and the counts and the layer's fixed loads (>= 0) certainly sum
// within int64 (bounded by the counts' bitwise or times their number). False when that is not
// certain: then check_counts decides (it names the first bad entry), and when it passes, the sums
// are exact (counts >= 0 summing within int64 never wrap).
bool sum_counts(ConstMatrixMap<std::int64_t> counts, Index row, int sources,
                ConstMatrixMap<std::int64_t> fixed_loads, std::int64_t* sums);

// Checks the shapes of balanced_assignment's source_counts ([layers * W, E]) and out ([layers * W,
// P]).
void check_assignment_shapes(const ExpertLocation& location, const Shape& shape,
                             ConstMatrixMap<std::int64_t> source_counts,
                             MatrixMap<std::int64_t> out);

// Layer row `row` of fixed_loads, or nullptr when there are none.
inline const std::int64_t* fixed_row(ConstMatrixMap<std::int64_t> fixed_loads, Index row) {
    return fixed_loads.size() ? fixed_loads.data() + row * fixed_loads.cols() : nullptr;
}

// The tokens of the experts with one slot in the layer: out_row[p] = counts[e] when slot p holds
// the only replica of e, else 0 (the other experts' slots are filled by their caller).
inline void fill_single_slots(const ExpertLocation& loc, int layer, const std::int64_t* counts,
                              std::int64_t* out_row) {
    const int E = loc.num_logical_experts(), P = loc.num_physical_experts();
    const std::int32_t* p2l = loc.physical_to_logical().data() + row_slot(layer, P);
    const std::int32_t* copies = loc.logical_count().data() + row_slot(layer, E);
    for (int p = 0; p < P; ++p) {
        const std::int32_t e = p2l[p];
        out_row[p] = copies[e] == 1 ? counts[e] : 0;
    }
}

// ------------------------------------------------------------------------------------------------
// The makespan flow of one layer (makespan_flow.cpp). The solver starts at a lower bound of T* (the
// largest fixed load, the mean rank load, each flow expert alone with its ranks, each connected
// component of the network) and runs Dinic's algorithm; when T is infeasible, the experts X and
// ranks R(X) still reachable from the source in the residual graph form a violated Hall set, and
// ceil((sum_X n + sum_R(X) F) / |R(X)|) is a valid lower bound of T* above T (Newton's step of the
// parametric min cut). Sink capacities only grow, so the flow found so far stays feasible and is
// augmented, never rebuilt. Reused across layers (thread_local) so that its buffers are too.

class MakespanFlow {
  public:
    // Builds the network of `layer` from the global counts [E] (checked >= 0 by the caller) and
    // the fixed loads [W] (nullptr = none). The caller checked that the totals fit in int64.
    void build(const ExpertLocation& loc, int layer, const std::int64_t* counts,
               const std::int64_t* fixed);

    // Finds T = ceil(T*) and an integral flow achieving it; returns T.
    std::int64_t solve();

    // The replicated experts (those with n > 0 and replicas on two or more ranks), in ascending
    // expert order.
    int num_flow_experts() const { return static_cast<int>(expert_id_.size()); }
    int expert_id(int i) const { return expert_id_[i]; }
    // Edges of flow expert i: [edge_begin(i), edge_begin(i + 1)), one per distinct rank,
    // ascending.
    int edge_begin(int i) const { return edge_begin_[i]; }
    int edge_rank(int edge) const { return rank_global_[edge_rank_[edge]]; }
    std::int64_t edge_flow(int edge) const { return flow_[edge]; }
    // F_r: the caller's fixed load plus the single-rank experts' tokens, [W].
    const std::vector<std::int64_t>& fixed_load() const { return fixed_; }
    // The rank of expert e when all its replicas sit on one rank, else kSpread.
    int expert_rank(int e) const { return expert_rank_[e]; }
    // The rank of every slot, [P].
    const std::vector<int>& rank_of() const { return rank_of_; }

    static constexpr int kUnseen = -1;
    static constexpr int kSpread = -2;

  private:
    void index_slots(const ExpertLocation& loc, int layer);
    void add_flow_experts(const ExpertLocation& loc, int layer, const std::int64_t* counts);
    void index_edges();
    int compact_rank(int rank);
    std::int64_t lower_bound();
    std::int64_t component_bound();
    void greedy();
    bool levels();
    std::int64_t push_expert(int e, std::int64_t limit);
    std::int64_t push_rank(int r, std::int64_t limit);
    std::int64_t hall_bound() const;

    std::vector<std::int64_t> fixed_;  // [W]
    std::vector<int> compact_of_;      // [W], -1 when the rank holds no flow expert
    std::vector<int> rank_of_;         // [P]
    int slots_per_rank_ = 0;
    std::vector<int> expert_rank_;  // [E]

    // Flow experts.
    std::vector<int> expert_id_;
    std::vector<std::int64_t> supply_, rem_;
    std::vector<int> edge_begin_;  // [k + 1]
    // Edges, expert-major.
    std::vector<int> edge_rank_, edge_expert_;
    std::vector<std::int64_t> flow_;
    // Ranks of the network (compact ids, in order of first appearance).
    std::vector<int> rank_global_;
    std::vector<std::int64_t> spare_;  // T - F_r - flow into r
    std::vector<int> rank_edge_begin_, rank_edges_;

    // Connected components (lower bound).
    std::vector<int> parent_;
    std::vector<std::int64_t> component_load_, component_ranks_;

    // Dinic's level graph.
    std::vector<int> level_e_, level_r_, cur_e_, cur_r_, frontier_, next_;
    int sink_level_ = 0;
    std::int64_t deficit_ = 0;
};

// ------------------------------------------------------------------------------------------------
// A min-cost flow (min_cost_flow.cpp; primal-dual: Dijkstra on reduced costs, then a blocking
// flow over the arcs of reduced cost 0, repeated). Arc costs are non-negative integers. Two uses:
// run(s, t), the largest s-t flow of least cost from zero flow (the reference assignment); and
// route_excess_to(t) from a given pseudo-flow -- arcs carrying an initial flow, nodes an excess --
// which must be a least-cost flow of its own supplies (no negative residual cycle): every excess
// goes to t at least cost, with potentials from Bellman-Ford first (the even shares, which start
// at the equal split and route only what that leaves; balanced_assignment, which starts from
// every expert at its own least cost and routes the ranks' overloads). Bellman-Ford starts from
// the nodes' given potentials (add_node; default 0): where the caller knows potentials under which
// its pseudo-flow is optimal, one pass over the arcs confirms them.

class MinCostFlow {
  public:
    void reset(int num_nodes) {
        num_nodes_ = num_nodes;
        from_.clear();
        to_.clear();
        cap_.clear();
        cost_.clear();
        excess_.assign(static_cast<std::size_t>(num_nodes), 0);
        start_pi_.assign(static_cast<std::size_t>(num_nodes), 0);
    }
    // A node; `potential` is where route_excess_to's Bellman-Ford starts (any value is correct).
    int add_node(std::int64_t potential = 0) {
        excess_.push_back(0);
        start_pi_.push_back(potential);
        return num_nodes_++;
    }
    // An arc u -> v of capacity cap carrying `flow` in [0, cap]; returns its id (reverse: id ^ 1).
    int add_arc(int u, int v, std::int64_t cap, std::int64_t cost, std::int64_t flow = 0) {
        const int id = static_cast<int>(to_.size());
        from_.insert(from_.end(), {u, v});
        to_.insert(to_.end(), {v, u});
        cap_.insert(cap_.end(), {cap - flow, flow});
        cost_.insert(cost_.end(), {cost, -cost});
        return id;
    }
    // The id the next add_arc returns.
    int next_arc() const { return static_cast<int>(to_.size()); }
    void add_excess(int v, std::int64_t amount) { excess_[v] += amount; }
    std::int64_t flow(int id) const { return cap_[static_cast<std::size_t>(id ^ 1)]; }
    // The largest flow from s to t of least cost (from zero flow); returns its value.
    std::int64_t run(int s, int t);
    // Routes every node's excess to t; false when the network cannot carry it.
    bool route_excess_to(int t);

  private:
    std::int64_t reduced(int id) const { return cost_[id] + pi_[from_[id]] - pi_[to_[id]]; }
    void index_arcs();
    bool potentials();
    std::int64_t augment(int s, int t, std::int64_t target);
    bool shortest_paths(int s, int t);
    bool levels(int s, int t);
    std::int64_t push(int u, int t, std::int64_t limit);

    int num_nodes_ = 0;
    std::vector<int> from_, to_;
    std::vector<std::int64_t> cap_, cost_, excess_, start_pi_;
    std::vector<int> adj_begin_, adj_;
    std::vector<std::int64_t> pi_, dist_;
    std::vector<int> level_, cur_, queue_;
    std::vector<char> queued_;
    std::vector<std::pair<std::int64_t, int>> heap_;
};

// ------------------------------------------------------------------------------------------------
// The even split at the makespan (even_shares.cpp): among the integral splits whose rank loads
// stay within `makespan`, the one minimising sum over (expert e, rank g) of x_eg^2 / (n_e m_eg)
// (m_eg: e's slots on g), up to a piecewise-linear approximation (integral breakpoints every half
// equal share; the objective's chord over each segment). Reused across layers (thread_local) like
// MakespanFlow.

class EvenShares {
  public:
    // Solves the layer whose MakespanFlow `flow` was built (and solved: `makespan` its result)
    // from `counts` [E].
    void solve(const ExpertLocation& loc, int layer, const MakespanFlow& flow,
               std::int64_t makespan, const std::int64_t* counts);
    // The tokens of each of the flow's edges (MakespanFlow's edge ids).
    const std::int64_t* edge_flows() const { return edge_flow_.data(); }

  private:
    MinCostFlow graph_;
    std::vector<int> rank_node_;           // [W], -1 when the rank has no edge
    std::vector<std::int64_t> rank_load_;  // [W], the equal split's
    std::vector<int> segments_;            // [edges + 1]: edge id -> its first arc in arcs_
    std::vector<int> arcs_;                // the segments' arc ids, edge-major
    std::vector<std::int64_t> edge_flow_;  // [edges]
};

}  // namespace moelb::detail
