// moelb's exact per-step split (ours; DESIGN section 9, reference/dispatch.md section 7):
// balanced_split (tokens per physical slot at the optimal largest rank load) and
// balanced_assignment (tokens per (source rank, slot): the same optimum, then the fewest tokens
// leaving their rank and node).
//
// One layer is a flow network: source -> replicated expert e (capacity n_e) -> each rank holding
// a replica of e (unbounded) -> sink (capacity T - F_r, F_r the rank's fixed load: the caller's
// fixed_loads plus every expert whose replicas all sit on that rank). T is feasible iff the max
// flow saturates every expert. The solver starts at a lower bound of T* and runs Dinic's
// algorithm; when T is infeasible, the experts X and ranks R(X) still reachable from the source
// in the residual graph form a violated Hall set, and ceil((sum_X n + sum_R(X) F) / |R(X)|) is a
// valid lower bound of T* above T (Newton's step of the parametric min cut). Sink capacities only
// grow, so the flow found so far stays feasible and is augmented, never rebuilt; the first
// feasible integer T is ceil(T*), and the flow is integral.
#include <algorithm>
#include <cstdint>
#include <functional>
#include <limits>
#include <span>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "moelb/dispatch.hpp"
#include "moelb/errors.hpp"
#include "moelb/parallel.hpp"

namespace moelb {
namespace {

constexpr std::int64_t kInt64Max = std::numeric_limits<std::int64_t>::max();

std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return a / b + (a % b != 0 ? 1 : 0); }

// The offset of row `row` of a [rows, cols] row-major array.
Index row_slot(int row, int cols) { return static_cast<Index>(row) * cols; }

// Splits `total` over `n` slots as evenly as possible, the lower slots taking the remainder.
std::int64_t even_share(std::int64_t total, std::int64_t n, std::int64_t i) {
    return total / n + (i < total % n ? 1 : 0);
}

// How an input row is named in messages: "counts[3, 17]" for all layers, "counts[17]" for one.
struct Naming {
    const char* param;
    bool one_layer;

    std::string at(Index row, Index col) const {
        std::ostringstream os;
        os << param << "[";
        if (!one_layer) os << row << ", ";
        os << col << "]";
        return os.str();
    }
    std::string of_layer(int layer) const {
        std::ostringstream os;
        os << param;
        if (!one_layer) os << " of layer " << layer;
        return os.str();
    }
};

// ------------------------------------------------------------------------------------------------
// The makespan flow of one layer.

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
    int compact_rank(int rank);
    void greedy();
    bool levels();
    std::int64_t push_expert(int e, std::int64_t limit);
    std::int64_t push_rank(int r, std::int64_t limit);
    std::int64_t hall_bound() const;
    std::int64_t component_bound();

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

int MakespanFlow::compact_rank(int rank) {
    int& c = compact_of_[static_cast<std::size_t>(rank)];
    if (c < 0) {
        c = static_cast<int>(rank_global_.size());
        rank_global_.push_back(rank);
    }
    return c;
}

void MakespanFlow::build(const ExpertLocation& loc, int layer, const std::int64_t* counts,
                         const std::int64_t* fixed) {
    const int W = loc.ep_size(), E = loc.num_logical_experts();
    const int S = loc.num_local_physical_experts(), P = loc.num_physical_experts();
    if (static_cast<int>(rank_of_.size()) != P || S != slots_per_rank_) {
        // Slot -> rank, once per shape: no division per slot and layer.
        rank_of_.resize(static_cast<std::size_t>(P));
        for (int p = 0; p < P; ++p) rank_of_[p] = p / S;
        slots_per_rank_ = S;
    }
    if (fixed != nullptr) {
        fixed_.assign(fixed, fixed + W);
    } else {
        fixed_.assign(static_cast<std::size_t>(W), 0);
    }
    // Each expert's rank when all its replicas sit on one, else kSpread (slots in rank order).
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
    const int k = num_flow_experts(), m = static_cast<int>(rank_global_.size());
    const int num_edges = static_cast<int>(edge_rank_.size());
    rem_ = supply_;
    flow_.assign(static_cast<std::size_t>(num_edges), 0);
    // Rank-side adjacency (edges of each rank in ascending expert order).
    rank_edge_begin_.assign(static_cast<std::size_t>(m) + 1, 0);
    for (const int r : edge_rank_) ++rank_edge_begin_[static_cast<std::size_t>(r) + 1];
    for (int r = 0; r < m; ++r) rank_edge_begin_[r + 1] += rank_edge_begin_[r];
    rank_edges_.resize(static_cast<std::size_t>(num_edges));
    cur_r_.assign(rank_edge_begin_.begin(), rank_edge_begin_.end() - 1);
    for (int id = 0; id < num_edges; ++id) rank_edges_[cur_r_[edge_rank_[id]]++] = id;
    level_e_.resize(static_cast<std::size_t>(k));
    cur_e_.resize(static_cast<std::size_t>(k));
    level_r_.resize(static_cast<std::size_t>(m));
    spare_.resize(static_cast<std::size_t>(m));
}

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

std::int64_t MakespanFlow::solve() {
    // Lower bounds: the largest fixed load, the mean rank load, and each flow expert alone with
    // its ranks' fixed loads.
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
    T = std::max(T, component_bound());
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

// ------------------------------------------------------------------------------------------------
// A min-cost max-flow (primal-dual: Dijkstra on reduced costs, then a blocking flow over the
// arcs of reduced cost 0, repeated). Arc costs are small non-negative integers here.

class MinCostFlow {
  public:
    void reset(int num_nodes) {
        num_nodes_ = num_nodes;
        from_.clear();
        to_.clear();
        cap_.clear();
        cost_.clear();
    }
    int add_node() { return num_nodes_++; }
    // Returns the arc's id; its reverse arc is id ^ 1.
    int add_arc(int u, int v, std::int64_t cap, std::int64_t cost) {
        const int id = static_cast<int>(to_.size());
        from_.insert(from_.end(), {u, v});
        to_.insert(to_.end(), {v, u});
        cap_.insert(cap_.end(), {cap, 0});
        cost_.insert(cost_.end(), {cost, -cost});
        return id;
    }
    std::int64_t flow(int id) const { return cap_[static_cast<std::size_t>(id ^ 1)]; }
    // The largest flow from s to t of least cost; returns its value.
    std::int64_t run(int s, int t);

  private:
    std::int64_t reduced(int id) const { return cost_[id] + pi_[from_[id]] - pi_[to_[id]]; }
    bool shortest_paths(int s, int t);
    bool levels(int s, int t);
    std::int64_t push(int u, int t, std::int64_t limit);

    int num_nodes_ = 0;
    std::vector<int> from_, to_;
    std::vector<std::int64_t> cap_, cost_;
    std::vector<int> adj_begin_, adj_;
    std::vector<std::int64_t> pi_, dist_;
    std::vector<int> level_, cur_, queue_;
    std::vector<std::pair<std::int64_t, int>> heap_;
};

std::int64_t MinCostFlow::run(int s, int t) {
    const int n = num_nodes_;
    const int num_arcs = static_cast<int>(to_.size());
    adj_begin_.assign(static_cast<std::size_t>(n) + 1, 0);
    for (const int u : from_) ++adj_begin_[static_cast<std::size_t>(u) + 1];
    for (int u = 0; u < n; ++u) adj_begin_[u + 1] += adj_begin_[u];
    adj_.resize(static_cast<std::size_t>(num_arcs));
    cur_.assign(adj_begin_.begin(), adj_begin_.end() - 1);
    for (int id = 0; id < num_arcs; ++id) adj_[cur_[from_[id]]++] = id;
    pi_.assign(static_cast<std::size_t>(n), 0);
    level_.resize(static_cast<std::size_t>(n));
    std::int64_t total = 0;
    while (shortest_paths(s, t)) {
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

// BFS levels over the admissible arcs (residual, reduced cost 0); true when t is reached.
bool MinCostFlow::levels(int s, int t) {
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

// ------------------------------------------------------------------------------------------------
// Input checks.

struct Shape {
    int layers;  // rows of counts per source (1 with `layer`)
    int first;   // the location layer of row 0
    bool one_layer;
};

Shape check_layers(const ExpertLocation& loc, int layer) {
    if (layer < 0) return {loc.num_layers(), 0, false};
    MOELB_CHECK_ARG(layer < loc.num_layers(),
                    "layer=" << layer << " is outside [0, num_layers=" << loc.num_layers() << ")");
    return {1, layer, true};
}

void check_fixed_loads(const ExpertLocation& loc, const Shape& shape,
                       ConstMatrixMap<std::int64_t> fixed_loads) {
    if (fixed_loads.size() == 0) return;
    const int W = loc.ep_size();
    if (shape.one_layer) {
        MOELB_CHECK_ARG(fixed_loads.rows() == 1 && fixed_loads.cols() == W,
                        "fixed_loads has " << fixed_loads.size() << " entries but ep_size=" << W);
    } else {
        MOELB_CHECK_ARG(fixed_loads.rows() == shape.layers && fixed_loads.cols() == W,
                        "fixed_loads has shape (" << fixed_loads.rows() << ", "
                                                  << fixed_loads.cols() << ") but the location has "
                                                  << shape.layers << " layers and ep_size=" << W);
    }
}

// Checks one layer's fixed loads (>= 0) and returns their sum.
std::int64_t fixed_sum(ConstMatrixMap<std::int64_t> fixed_loads, Index row, const Naming& name,
                       int layer) {
    if (fixed_loads.size() == 0) return 0;
    std::int64_t sum = 0;
    for (Index r = 0; r < fixed_loads.cols(); ++r) {
        const std::int64_t f = fixed_loads(row, r);
        MOELB_CHECK_ARG(f >= 0, name.at(row, r) << " = " << f << " is negative");
        MOELB_CHECK_ARG(!__builtin_add_overflow(sum, f, &sum), name.of_layer(layer)
                                                                   << " sums past the int64 range");
    }
    return sum;
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// balanced_split

void balanced_split(const ExpertLocation& location, ConstMatrixMap<std::int64_t> counts,
                    ConstMatrixMap<std::int64_t> fixed_loads, MatrixMap<std::int64_t> out,
                    int layer) {
    const Shape shape = check_layers(location, layer);
    const int E = location.num_logical_experts(), P = location.num_physical_experts();
    if (shape.one_layer) {
        MOELB_CHECK_ARG(counts.rows() == 1 && counts.cols() == E,
                        "counts has " << counts.size() << " entries but the location has " << E
                                      << " logical experts");
        MOELB_CHECK_ARG(out.rows() == 1 && out.cols() == P,
                        "out has " << out.size() << " entries but num_physical_experts=" << P);
    } else {
        MOELB_CHECK_ARG(counts.rows() == shape.layers && counts.cols() == E,
                        "counts has shape (" << counts.rows() << ", " << counts.cols()
                                             << ") but the location has " << shape.layers
                                             << " layers and " << E << " logical experts");
        MOELB_CHECK_ARG(out.rows() == shape.layers && out.cols() == P,
                        "out has shape (" << out.rows() << ", " << out.cols() << ") but ("
                                          << shape.layers << ", " << P << ") is needed");
    }
    check_fixed_loads(location, shape, fixed_loads);
    const Naming counts_name{"counts", shape.one_layer};
    const Naming fixed_name{"fixed_loads", shape.one_layer};
    // Every row is checked before any is solved, so that a bad row anywhere leaves no work done
    // and the error names the first bad entry.
    for (Index row = 0; row < shape.layers; ++row) {
        const int l = shape.first + static_cast<int>(row);
        std::int64_t sum = fixed_sum(fixed_loads, row, fixed_name, l);
        for (Index e = 0; e < E; ++e) {
            const std::int64_t n = counts(row, e);
            MOELB_CHECK_ARG(n >= 0, counts_name.at(row, e) << " = " << n << " is negative");
            MOELB_CHECK_ARG(!__builtin_add_overflow(sum, n, &sum),
                            counts_name.of_layer(l)
                                << (fixed_loads.size() ? " and fixed_loads" : "")
                                << " sum past the int64 range");
        }
    }
    const int grain = std::max(1, 4096 / std::max(P, 1));
    parallel_for(shape.layers, grain, [&](Index begin, Index end) {
        thread_local MakespanFlow flow;
        for (Index row = begin; row < end; ++row) {
            const int l = shape.first + static_cast<int>(row);
            const std::int64_t* c = counts.data() + row * E;
            flow.build(
                location, l, c,
                fixed_loads.size() ? fixed_loads.data() + row * fixed_loads.cols() : nullptr);
            flow.solve();
            std::int64_t* o = out.data() + row * P;
            // Experts with one slot take their count there; the others below.
            const std::int32_t* p2l = location.physical_to_logical().data() + row_slot(l, P);
            const std::int32_t* copies = location.logical_count().data() + row_slot(l, E);
            for (int p = 0; p < P; ++p) {
                const std::int32_t e = p2l[p];
                o[p] = copies[e] == 1 ? c[e] : 0;
            }
            const std::vector<int>& rank_of = flow.rank_of();
            // Tokens of a rank's copies of one expert: split evenly, lower slots first.
            auto spread = [&](std::span<const std::int32_t> slots, std::int64_t tokens) {
                const auto k = static_cast<std::int64_t>(slots.size());
                for (std::int64_t j = 0; j < k; ++j) o[slots[j]] = even_share(tokens, k, j);
            };
            int next_flow = 0;
            for (int e = 0; e < E; ++e) {
                if (c[e] == 0 || copies[e] == 1) continue;
                const auto reps = location.replicas(l, e);
                if (flow.expert_rank(e) >= 0) {
                    spread(reps, c[e]);
                    continue;
                }
                MOELB_CHECK(next_flow < flow.num_flow_experts() && flow.expert_id(next_flow) == e,
                            "balanced_split: flow experts out of order");
                // One edge per distinct rank, in the replicas' (ascending) order.
                int id = flow.edge_begin(next_flow++);
                std::size_t j = 0;
                while (j < reps.size()) {
                    std::size_t j_end = j + 1;
                    while (j_end < reps.size() && rank_of[reps[j_end]] == rank_of[reps[j]]) ++j_end;
                    spread(reps.subspan(j, j_end - j), flow.edge_flow(id++));
                    j = j_end;
                }
            }
        }
    });
}

// ------------------------------------------------------------------------------------------------
// balanced_assignment

namespace {

// One layer's assignment: the makespan flow on the summed counts gives T = ceil(T*); then a
// min-cost flow at that T routes each source's tokens. Sources whose costs to an expert's ranks
// are the same form one class (a node of the network): the rank itself when it holds a replica,
// the other ranks of a node holding one, and the ranks of every other node. Each class's flow is
// handed back to its sources in ascending order (any split of a class is equally cheap), and a
// rank's tokens of an expert to its slots of that expert (evenly, lower slots first).
class AssignmentSolver {
  public:
    void solve(const ExpertLocation& loc, int layer, ConstMatrixMap<std::int64_t> source_counts,
               Index first_row, const std::int64_t* fixed, std::int64_t* out);

  private:
    int num_ranks(int i) const { return makespan_.edge_begin(i + 1) - makespan_.edge_begin(i); }
    int rank(int i, int j) const { return makespan_.edge_rank(makespan_.edge_begin(i) + j); }
    std::int64_t class_cost(int i, int key, int j) const;
    // A group: one expert's slots on one rank, reps[begin, end), with `tokens` to hand out.
    int add_group(const std::int32_t* reps, int begin, int end, std::int64_t tokens);
    void to_slots(int g, std::int64_t tokens, std::int64_t* out_row);

    MakespanFlow makespan_;
    MinCostFlow mcf_;
    std::vector<std::int64_t> counts_;  // [E], summed over sources
    std::vector<int> node_of_;          // [W]
    std::vector<int> rank_node_;        // [W], the network node of a rank, or -1
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

// The per-token cost (kDispatchCost*) of class `key` of flow expert i served on its rank j.
std::int64_t AssignmentSolver::class_cost(int i, int key, int j) const {
    const int num = num_ranks(i);
    if (key == j) return kDispatchCostOwnRank;
    if (key < 2 * num) {
        const int home = key < num ? key : key - num;
        if (node_of_[rank(i, home)] == node_of_[rank(i, j)]) return kDispatchCostSameNode;
    }
    return kDispatchCostOtherNode;
}

int AssignmentSolver::add_group(const std::int32_t* reps, int begin, int end, std::int64_t tokens) {
    group_reps_.push_back(reps);
    group_begin_.push_back(begin);
    group_end_.push_back(end);
    group_pos_.push_back(begin);
    group_tokens_.push_back(tokens);
    group_left_.push_back(even_share(tokens, end - begin, 0));
    return static_cast<int>(group_reps_.size()) - 1;
}

void AssignmentSolver::to_slots(int g, std::int64_t tokens, std::int64_t* out_row) {
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

void AssignmentSolver::solve(const ExpertLocation& loc, int layer,
                             ConstMatrixMap<std::int64_t> source_counts, Index first_row,
                             const std::int64_t* fixed, std::int64_t* out) {
    const int W = loc.ep_size(), E = loc.num_logical_experts(), P = loc.num_physical_experts();
    auto source_row = [&](int s) { return source_counts.data() + (first_row + s) * E; };
    counts_.assign(static_cast<std::size_t>(E), 0);
    for (int s = 0; s < W; ++s) {
        const std::int64_t* row = source_row(s);
        for (int e = 0; e < E; ++e) counts_[e] += row[e];
    }
    makespan_.build(loc, layer, counts_.data(), fixed);
    const std::int64_t T = makespan_.solve();
    const auto& F = makespan_.fixed_load();
    const int k = makespan_.num_flow_experts();
    node_of_.resize(static_cast<std::size_t>(W));
    for (int r = 0; r < W; ++r) node_of_[r] = loc.node_of_rank(r);

    // The class of every (source, flow expert), [W, k], expert by expert through per-rank and
    // per-node tables; then the class supplies, source by source (rows are contiguous).
    key_begin_.assign(1, 0);
    for (int i = 0; i < k; ++i) key_begin_.push_back(key_begin_.back() + 2 * num_ranks(i) + 1);
    keys_.resize(static_cast<std::size_t>(W) * k);
    position_.assign(static_cast<std::size_t>(W), -1);
    node_first_.assign(static_cast<std::size_t>(loc.num_nodes()), -1);
    for (int i = 0; i < k; ++i) {
        const int num = num_ranks(i);
        for (int j = 0; j < num; ++j) {
            position_[rank(i, j)] = j;
            int& first = node_first_[node_of_[rank(i, j)]];
            if (first < 0) first = j;
        }
        for (int s = 0; s < W; ++s) {
            const int own = position_[s], node = node_first_[node_of_[s]];
            keys_[static_cast<std::size_t>(s) * k + i] =
                own >= 0 ? own : (node >= 0 ? num + node : 2 * num);
        }
        for (int j = 0; j < num; ++j) {
            position_[rank(i, j)] = -1;
            node_first_[node_of_[rank(i, j)]] = -1;
        }
    }
    class_supply_.assign(static_cast<std::size_t>(key_begin_.back()), 0);
    for (int s = 0; s < W; ++s) {
        const std::int64_t* row = source_row(s);
        const int* keys = keys_.data() + static_cast<std::size_t>(s) * k;
        for (int i = 0; i < k; ++i) {
            const std::int64_t tokens = row[makespan_.expert_id(i)];
            if (tokens > 0) class_supply_[key_begin_[i] + keys[i]] += tokens;
        }
    }

    // The network: source 0, sink 1, the ranks, then the classes.
    mcf_.reset(2);
    rank_node_.assign(static_cast<std::size_t>(W), -1);
    for (int i = 0; i < k; ++i) {
        for (int j = 0; j < num_ranks(i); ++j) {
            const int r = rank(i, j);
            if (rank_node_[r] >= 0) continue;
            rank_node_[r] = mcf_.add_node();
            mcf_.add_arc(rank_node_[r], 1, T - F[static_cast<std::size_t>(r)], 0);
        }
    }
    class_arc_.assign(class_supply_.size(), -1);
    std::int64_t want = 0;
    for (int i = 0; i < k; ++i) {
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

    // Hand-back cursors: classes at their first rank, groups at their first slot.
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
    for (int i = 0; i < k; ++i) {
        const auto reps = loc.replicas(layer, makespan_.expert_id(i));
        int begin = 0;
        for (int j = 0; j < num_ranks(i); ++j) {
            int end = begin + 1;
            while (end < static_cast<int>(reps.size()) &&
                   rank_of[reps[end]] == rank_of[reps[begin]]) {
                ++end;
            }
            std::int64_t tokens = 0;
            for (int key = 0; key <= 2 * num_ranks(i); ++key) {
                const int arc = class_arc_[key_begin_[i] + key];
                if (arc >= 0) tokens += mcf_.flow(arc + 2 * j);
            }
            add_group(reps.data(), begin, end, tokens);  // id = makespan_.edge_begin(i) + j
            begin = end;
        }
    }
    const std::int32_t* copies = loc.logical_count().data() + row_slot(layer, E);
    for (int e = 0; e < E; ++e) {
        if (counts_[e] == 0 || copies[e] == 1 || makespan_.expert_rank(e) < 0) continue;
        const auto reps = loc.replicas(layer, e);
        add_group(reps.data(), 0, static_cast<int>(reps.size()), counts_[e]);
        stacked_expert_.push_back(e);
    }
    const int num_edges = makespan_.edge_begin(k);

    const std::int32_t* p2l = loc.physical_to_logical().data() + row_slot(layer, P);
    for (int s = 0; s < W; ++s) {
        const std::int64_t* row = source_row(s);
        std::int64_t* out_row = out + static_cast<Index>(s) * P;
        // Experts with one slot: all of the source's tokens there.
        for (int p = 0; p < P; ++p) {
            const std::int32_t e = p2l[p];
            out_row[p] = copies[e] == 1 ? row[e] : 0;
        }
        for (int i = 0; i < k; ++i) {
            std::int64_t tokens = row[makespan_.expert_id(i)];
            if (tokens == 0) continue;
            const int c = key_begin_[i] + keys_[static_cast<std::size_t>(s) * k + i];
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
        for (std::size_t j = 0; j < stacked_expert_.size(); ++j) {
            const std::int64_t tokens = row[stacked_expert_[j]];
            if (tokens > 0) to_slots(num_edges + static_cast<int>(j), tokens, out_row);
        }
    }
}

}  // namespace

void balanced_assignment(const ExpertLocation& location, ConstMatrixMap<std::int64_t> source_counts,
                         ConstMatrixMap<std::int64_t> fixed_loads, MatrixMap<std::int64_t> out,
                         int layer) {
    const Shape shape = check_layers(location, layer);
    const int W = location.ep_size(), E = location.num_logical_experts();
    const int P = location.num_physical_experts();
    const Index rows = static_cast<Index>(shape.layers) * W;
    if (shape.one_layer) {
        MOELB_CHECK_ARG(source_counts.rows() == W && source_counts.cols() == E,
                        "source_counts has shape ("
                            << source_counts.rows() << ", " << source_counts.cols()
                            << ") but (ep_size=" << W << ", num_experts=" << E << ") is needed");
    } else {
        MOELB_CHECK_ARG(source_counts.rows() == rows && source_counts.cols() == E,
                        "source_counts has "
                            << source_counts.rows() << " rows of " << source_counts.cols()
                            << " but (num_layers=" << shape.layers << ") x (ep_size=" << W
                            << ") rows of num_experts=" << E << " are needed");
    }
    MOELB_CHECK_ARG(out.rows() == rows && out.cols() == P,
                    "out has shape (" << out.rows() << ", " << out.cols() << ") but (" << rows
                                      << ", " << P << ") is needed");
    check_fixed_loads(location, shape, fixed_loads);
    const Naming fixed_name{"fixed_loads", shape.one_layer};
    for (Index row = 0; row < shape.layers; ++row) {
        const int l = shape.first + static_cast<int>(row);
        std::int64_t total = fixed_sum(fixed_loads, row, fixed_name, l);
        for (int s = 0; s < W; ++s) {
            for (int e = 0; e < E; ++e) {
                const std::int64_t n = source_counts(row * W + s, e);
                if (n >= 0 && !__builtin_add_overflow(total, n, &total)) continue;
                std::ostringstream os;
                os << "source_counts[";
                if (!shape.one_layer) os << row << ", ";
                os << s << ", " << e << "] = " << n;
                MOELB_CHECK_ARG(n >= 0, os.str() << " is negative");
                MOELB_CHECK_ARG(false, "source_counts"
                                           << (shape.one_layer ? std::string()
                                                               : " of layer " + std::to_string(l))
                                           << (fixed_loads.size() ? " and fixed_loads" : "")
                                           << " sum past the int64 range");
            }
        }
    }
    const int grain = std::max(1, 256 / std::max(W, 1));
    parallel_for(shape.layers, grain, [&](Index begin, Index end) {
        thread_local AssignmentSolver solver;
        for (Index row = begin; row < end; ++row) {
            solver.solve(
                location, shape.first + static_cast<int>(row), source_counts, row * W,
                fixed_loads.size() ? fixed_loads.data() + row * fixed_loads.cols() : nullptr,
                out.data() + row * W * P);
        }
    });
}

}  // namespace moelb
