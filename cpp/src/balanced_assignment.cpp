// balanced_assignment (ours; DESIGN section 9: the exact token assignment after one all-gather of
// per-rank counts; reference/dispatch.md section 7; moelb/dispatch.hpp): the tokens each source
// rank sends to each physical slot, at the optimal largest rank load of the summed counts and,
// among such assignments, at the least total cost (kDispatchCost*: 0 on the source's rank, 1 on
// its node, 2 elsewhere). Its steps: the counts summed over the sources and checked
// (balanced_checks.cpp) -> per layer, in parallel, an AssignmentSolver: the makespan flow on the
// summed counts (makespan_flow.cpp) gives T = ceil(T*) and a split -> the least-cost tokens per
// rank of each expert at T, from that split (below) -> each source's tokens matched to those
// totals greedily, own rank first, then its node, then the rest -> the rows of `out`.
//
// DESIGN (why the small network is exact). Fix every expert's tokens per rank y_g (g in its ranks
// R(e), sum n_e). What is left is one transportation problem per expert, sources s with c_s
// tokens to ranks g with y_g, at cost d(s, g). d is the distance of a tree: each rank hangs from
// its node by an edge of length 1/2, each node from a root by 1/2 (d = 0, 1, 2 exactly). On a tree
// the least transport cost is the sum over edges of length x |supply - demand below the edge|
// (every unit whose source and rank the edge separates crosses it, and the greedy matching below
// crosses each edge only that often), so with c_g, C_nu the tokens of the expert routed on rank g
// and on the ranks of node nu, and Y_nu the node's share of the y:
//   cost_e(y) = sum_g |c_g - y_g| / 2 + sum_nu |C_nu - Y_nu| / 2
//             = 2 n_e - sum_{g in R(e)} min(c_g, y_g) - sum_{nu of R(e)} min(C_nu, Y_nu)
// (|a - b| = a + b - 2 min(a, b); ranks and nodes without a replica have y = 0). The least total
// cost at makespan T is the least sum_e cost_e(y_e) over the y that fit the ranks (y_g summed over
// the experts <= T - F_g): cost_e is separable and convex in the y_g and Y_nu, so this is the
// min-cost flow of the network: expert e (supply n_e) -> (e, nu) by two arcs, C_nu at cost 0 and
// the rest at cost 1 -> each of e's ranks g in nu by two arcs, c_g at cost 0 and the rest at 1 ->
// rank g -> sink (T - F_g). A flow filling the cheaper of two parallel arcs first costs sum_g (y_g
// - min(c_g, y_g)) + sum_nu (Y_nu - min(C_nu, Y_nu)) = cost_e(y) (both y sums are n_e), and a
// min-cost flow does (else moving a unit to the cheaper arc lowers its cost). A node holding one
// rank g of e merges (e, nu) into three arcs e -> g: c_g at 0, C_nu - c_g at 1, the rest at 2. The
// network has 2-3 arcs per (expert, rank) instead of one node per source class, and no source
// rank: its size depends on the replicated experts only. Experts without tokens or with all their
// replicas on one rank take no part (their tokens are fixed load, as in the makespan flow).
//
// The greedy matching realises cost_e(y): each source's tokens first stay on its own rank (up to
// min(c_g, y_g)), then go to its node's ranks (min(C_nu - own, Y_nu - own) of them at cost 1 per
// node), then elsewhere (cost 2): 2 n_e - sum own - sum min(C_nu, Y_nu) = cost_e(y).
//
// Solving it (route): with potentials expert 0, (e, nu) 1, ranks and sink 2, the c_g and C_nu
// arcs have reduced cost < 0 and the others 0, so a flow with those arcs saturated is optimal for
// what it routes. The start is such a flow: the makespan flow's split, each expert raised to its
// own least cost (y_g >= c_g, Y_nu >= C_nu) and cut back elsewhere by as much. If no rank is then
// above T - F_g, it is the answer (every expert at its own least cost). Else the overloads move
// along arcs of reduced cost 0 -- an expert's tokens beyond its cheap shares, from one of its
// ranks to another -- one shortest augmenting path at a time (move_overloads); such moves keep the
// flow optimal, so when they clear every overload the flow is a min-cost one. Only when an
// overload is left that just a dearer move can clear (cheap tokens must give way), the network is
// built carrying that flow and the library's min-cost flow (MinCostFlow::route_excess_to,
// min_cost_flow.cpp, started at the potentials above) routes the overloads from there.
//
// Tie rule (which of the least-cost assignments; ours): the per-rank totals y are those of the
// steps above (deterministic: a fixed start, ranks and arcs scanned in a fixed order). A rank's y
// tokens of an expert are split over its slots of that expert evenly, lower slots first, and filled
// in that order by its own source's share first, then its node share, then the rest. Sources in
// ascending order take their own rank's share, then the node share of their node's ranks
// (ascending), then the rest (the expert's ranks in ascending order, each rank's part beyond its
// node's sources). An expert with all its replicas on one rank fills its slots (evenly, lower slots
// first) with the sources' tokens in source order. Integer and deterministic: every rank computes
// the same assignment.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "balanced_flow.hpp"
#include "moelb/dispatch.hpp"
#include "moelb/errors.hpp"
#include "moelb/parallel.hpp"

namespace moelb {
namespace {

using detail::MakespanFlow;
using detail::MinCostFlow;

// Potentials under which the min-cost flow's start is optimal (see DESIGN).
constexpr int kExpertPotential = 0;
constexpr int kNodePotential = 1;
constexpr int kRankPotential = 2;

// One layer's assignment, its steps in solve(). Reused across layers and calls (thread_solver).
class AssignmentSolver {
  public:
    // counts: the layer's source counts summed over the sources [E] (sum_counts).
    void solve(const ExpertLocation& loc, int layer, ConstMatrixMap<std::int64_t> source_counts,
               Index first_row, const std::int64_t* counts, const std::int64_t* fixed,
               std::int64_t* out);

  private:
    // Source s's counts [E] of the layer being solved.
    const std::int64_t* source_row(int s) const { return rows_ + static_cast<Index>(s) * E_; }
    int edge_rank(int j) const { return makespan_.edge_rank(j); }
    int num_edges() const { return makespan_.edge_begin(k_); }

    std::int64_t solve_makespan(const ExpertLocation& loc, int layer, const std::int64_t* fixed);
    void index_runs();
    void route(std::int64_t T);
    bool move_overloads(std::int64_t T);
    bool augment(int source);
    std::int64_t free_tokens(int j) const;
    void route_overloads(std::int64_t T);
    void plan_shares();
    void make_chunks(const ExpertLocation& loc, int layer);
    void add_chunk(std::vector<int>& slot, std::vector<std::int64_t>& amount, int p,
                   std::int64_t tokens);
    void index_other_slots(const ExpertLocation& loc, int layer);
    void hand_out(std::int64_t* out);
    void from_rest_fast(int begin, int end, const std::int64_t* row, std::int64_t* out_row);
    void from_run(int r, const std::int64_t* row, std::int64_t* out_row);
    std::int64_t from_node(int r, std::int64_t tokens, std::int64_t* out_row);
    void from_rest(int i, std::int64_t tokens, std::int64_t* out_row);
    void to_stacked(int g, std::int64_t tokens, std::int64_t* out_row);

    MakespanFlow makespan_;
    MinCostFlow flow_;
    const std::int64_t* rows_ = nullptr;  // [W, E], the layer's source counts
    int W_ = 0, E_ = 0, P_ = 0, k_ = 0;   // ranks, experts, slots, flow experts
    int ranks_per_node_ = 1;
    const std::int64_t* counts_ = nullptr;  // [E], summed over the sources
    std::vector<std::int64_t> row_;         // [E], the source row being handed out
    std::vector<int> expert_ids_;           // [k], the flow experts

    // Runs: the edges of a flow expert on one node (edges ascend by rank, so by node), expert
    // by expert; run_begin_[r] is its first edge, expert_run_[i] its first run.
    std::vector<int> run_begin_, expert_run_, run_node_, run_expert_;
    std::vector<std::int64_t> run_tokens_;  // C_nu: the expert's tokens routed on the node's ranks
    std::vector<int> node_runs_begin_, node_runs_;  // [N + 1], runs by node (ascending runs)
    std::vector<int> own_begin_, own_edges_;        // [W + 1], edges by rank (ascending edges)
    std::vector<int> scratch_;

    // Per edge: the tokens routed on its rank (c_g), its arcs [arc_begin_, arc_end_) into the
    // rank, its flow y and its own, node and rest shares.
    std::vector<std::int64_t> own_tokens_, y_, own_, node_, rest_share_;
    std::vector<int> arc_begin_, arc_end_, edge_expert_;
    std::vector<int> rank_node_;           // [W], the network node of a rank, or -1
    std::vector<std::int64_t> rank_load_;  // [W], the flow experts' tokens on each rank (y)
    // move_overloads: per run its y summed; per rank T - F_g - load; per search node (ranks, then
    // flow experts, then runs) its visit stamp, the node it was reached from and by which edge.
    std::vector<int> edge_run_;
    std::vector<std::int64_t> run_sum_, spare_;
    std::vector<int> seen_, from_, via_, search_, overloaded_;
    int stamp_ = 0;

    // Chunks (slot, tokens) of the shares: own ones by edge, node ones by run, the rest by flow
    // expert, each in ascending edges and slots.
    std::vector<int> own_chunk_begin_, own_slot_, node_chunk_begin_, node_slot_;
    std::vector<int> rest_chunk_begin_, rest_slot_;
    std::vector<std::int64_t> own_amount_, node_amount_, rest_amount_;
    // Hand-out cursors: per run its node chunk and what is left of it; per flow expert its rest
    // chunk (rest_pos_) and, packed for the hot loop, its expert, the chunk's slot and what is
    // left.
    struct RestCursor {
        std::int32_t expert;
        std::int32_t slot;
        std::int64_t room;
    };
    std::vector<int> node_pos_, rest_pos_;
    std::vector<std::int64_t> run_own_;  // per run: the current source's own share (handed out)
    std::vector<std::int64_t> node_room_;
    std::vector<RestCursor> rest_;

    // The experts with one slot and their slots (ascending slots). The experts with all their
    // replicas on one rank ("stacked"): their slots reps[begin, end) and the cursor of their even
    // split.
    struct Single {
        std::int32_t expert;
        std::int32_t slot;
    };
    std::vector<Single> single_;
    std::vector<int> slot_source_;  // [P]: the expert of a one-slot expert's slot, else E
    std::vector<int> stacked_expert_;
    std::vector<const std::int32_t*> stacked_reps_;
    std::vector<int> stacked_size_, stacked_pos_;
    std::vector<std::int64_t> stacked_left_;
};

void AssignmentSolver::solve(const ExpertLocation& loc, int layer,
                             ConstMatrixMap<std::int64_t> source_counts, Index first_row,
                             const std::int64_t* counts, const std::int64_t* fixed,
                             std::int64_t* out) {
    counts_ = counts;
    W_ = loc.ep_size();
    E_ = loc.num_logical_experts();
    P_ = loc.num_physical_experts();
    ranks_per_node_ = loc.ranks_per_node();
    rows_ = source_counts.data() + first_row * E_;
    const std::int64_t T = solve_makespan(loc, layer, fixed);
    index_runs();
    route(T);
    plan_shares();
    make_chunks(loc, layer);
    index_other_slots(loc, layer);
    hand_out(out);
}

// The makespan flow on the counts summed over the sources: T = ceil(T*).
std::int64_t AssignmentSolver::solve_makespan(const ExpertLocation& loc, int layer,
                                              const std::int64_t* fixed) {
    makespan_.build(loc, layer, counts_, fixed);
    const std::int64_t T = makespan_.solve();
    k_ = makespan_.num_flow_experts();
    expert_ids_.resize(static_cast<std::size_t>(k_));
    for (int i = 0; i < k_; ++i) expert_ids_[i] = makespan_.expert_id(i);
    return T;
}

// The runs of every flow expert with their tokens C_nu, the edges' own tokens c_g, and the runs
// by node and the edges by rank for the hand-out.
void AssignmentSolver::index_runs() {
    const int m = num_edges();
    const int N = W_ / ranks_per_node_;
    run_begin_.clear();
    run_node_.clear();
    run_expert_.clear();
    run_tokens_.clear();
    expert_run_.assign(1, 0);
    own_tokens_.resize(static_cast<std::size_t>(m));
    edge_expert_.resize(static_cast<std::size_t>(m));
    edge_run_.resize(static_cast<std::size_t>(m));
    for (int i = 0; i < k_; ++i) {
        const int e = expert_ids_[i];
        for (int j = makespan_.edge_begin(i); j < makespan_.edge_begin(i + 1); ++j) {
            const int g = edge_rank(j);
            const int node = g / ranks_per_node_;
            own_tokens_[j] = source_row(g)[e];
            edge_expert_[j] = i;
            if (j > makespan_.edge_begin(i) && node == run_node_.back()) {
                edge_run_[j] = static_cast<int>(run_node_.size()) - 1;
                continue;
            }
            edge_run_[j] = static_cast<int>(run_node_.size());
            run_begin_.push_back(j);
            run_node_.push_back(node);
            run_expert_.push_back(i);
            std::int64_t tokens = 0;
            for (int s = node * ranks_per_node_; s < (node + 1) * ranks_per_node_; ++s) {
                tokens += source_row(s)[e];
            }
            run_tokens_.push_back(tokens);
        }
        expert_run_.push_back(static_cast<int>(run_begin_.size()));
    }
    run_begin_.push_back(m);
    // Runs by node and edges by rank (counting sorts, stable).
    detail::group_by(
        static_cast<int>(run_node_.size()), N, [&](int r) { return run_node_[r]; },
        node_runs_begin_, node_runs_, scratch_);
    detail::group_by(
        m, W_, [&](int j) { return edge_rank(j); }, own_begin_, own_edges_, scratch_);
}

// Each flow expert's tokens per rank y at makespan T and the least cost. The start: the makespan
// flow's y raised to the cheap shares (y_g >= c_g, and per node Y_nu >= C_nu) and cut back
// elsewhere by as much, so that every expert is at its own least cost. Where no rank is then
// above T - F_g, that y is optimal as it is; else the overloads move at the least cost: by free
// moves, or by the min-cost flow from the potentials of DESIGN.
void AssignmentSolver::route(std::int64_t T) {
    const auto& F = makespan_.fixed_load();
    const int m = num_edges();
    y_.resize(static_cast<std::size_t>(m));
    for (int j = 0; j < m; ++j) y_[j] = std::max(makespan_.edge_flow(j), own_tokens_[j]);
    for (int i = 0; i < k_; ++i) {
        std::int64_t surplus = -counts_[expert_ids_[i]];
        for (int r = expert_run_[i]; r < expert_run_[i + 1]; ++r) {
            std::int64_t sum = 0;
            for (int j = run_begin_[r]; j < run_begin_[r + 1]; ++j) sum += y_[j];
            if (sum < run_tokens_[r]) {
                y_[run_begin_[r]] += run_tokens_[r] - sum;
                sum = run_tokens_[r];
            }
            surplus += sum;
        }
        // The surplus back from the ranks above their shares, in ascending order.
        for (int r = expert_run_[i]; r < expert_run_[i + 1] && surplus > 0; ++r) {
            std::int64_t slack = -run_tokens_[r];
            for (int j = run_begin_[r]; j < run_begin_[r + 1]; ++j) slack += y_[j];
            for (int j = run_begin_[r]; j < run_begin_[r + 1] && surplus > 0 && slack > 0; ++j) {
                const std::int64_t take = std::min({surplus, slack, y_[j] - own_tokens_[j]});
                y_[j] -= take;
                surplus -= take;
                slack -= take;
            }
        }
        MOELB_CHECK(surplus == 0, "balanced_assignment: an expert's shares exceed its tokens");
    }
    rank_load_.assign(static_cast<std::size_t>(W_), 0);
    for (int j = 0; j < m; ++j) rank_load_[edge_rank(j)] += y_[j];
    bool over = false;
    for (int j = 0; j < m && !over; ++j) {
        const int g = edge_rank(j);
        over = F[static_cast<std::size_t>(g)] + rank_load_[g] > T;
    }
    if (over && !move_overloads(T)) route_overloads(T);
}

// The tokens of edge j's expert on its rank beyond the cheap shares that free moves may take:
// beyond C_nu where its node holds only this rank of the expert, else beyond c_g (then through
// the (e, nu) node).
std::int64_t AssignmentSolver::free_tokens(int j) const {
    const int r = edge_run_[j];
    const bool alone = run_begin_[r + 1] - run_begin_[r] == 1;
    return y_[j] - (alone ? run_tokens_[r] : own_tokens_[j]);
}

// The overloads moved along the network's arcs of reduced cost 0 under the start's potentials
// (free tokens: rank -> its expert or (e, nu) node -> another of the expert's ranks, and (e, nu)
// -> expert beyond C_nu), one shortest augmenting path at a time from the overloaded ranks to
// one with room: such moves keep the flow optimal for what is left, so when they clear every
// overload, y is optimal. False when an overload is left that only a dearer move can clear (then
// the min-cost flow takes over from this y).
bool AssignmentSolver::move_overloads(std::int64_t T) {
    const auto& F = makespan_.fixed_load();
    const int m = num_edges();
    const int num_runs = static_cast<int>(run_node_.size());
    const int num_search = W_ + k_ + num_runs;
    spare_.assign(static_cast<std::size_t>(W_), 0);
    overloaded_.clear();
    for (int j = 0; j < m; ++j) {
        const int g = edge_rank(j);
        spare_[g] = T - F[static_cast<std::size_t>(g)] - rank_load_[g];
        if (spare_[g] < 0) overloaded_.push_back(g);
    }
    std::sort(overloaded_.begin(), overloaded_.end());
    overloaded_.erase(std::unique(overloaded_.begin(), overloaded_.end()), overloaded_.end());
    run_sum_.assign(static_cast<std::size_t>(num_runs), 0);
    for (int j = 0; j < m; ++j) run_sum_[edge_run_[j]] += y_[j];
    if (static_cast<int>(seen_.size()) < num_search) {
        seen_.assign(static_cast<std::size_t>(num_search), 0);
        stamp_ = 0;
    }
    from_.resize(static_cast<std::size_t>(num_search));
    via_.resize(static_cast<std::size_t>(num_search));
    // The overloaded ranks in ascending order, each until its overload is gone (a path moves
    // tokens only off its first rank and onto its last).
    for (const int source : overloaded_) {
        while (spare_[source] < 0) {
            if (!augment(source)) return false;
        }
    }
    return true;
}

// One shortest path of free moves (search nodes: ranks, then flow experts, then runs) from the
// overloaded rank `source` to a rank with room, and the most tokens it can move; false when there
// is none.
bool AssignmentSolver::augment(int source) {
    const int X0 = W_, Y0 = W_ + k_;
    auto alone = [&](int r) { return run_begin_[r + 1] - run_begin_[r] == 1; };
    if (++stamp_ == 0) {
        std::fill(seen_.begin(), seen_.end(), 0);
        stamp_ = 1;
    }
    search_.assign(1, source);
    seen_[source] = stamp_;
    from_[source] = -1;
    int found = -1;
    auto reach = [&](int v, int u, int j) {
        if (seen_[v] == stamp_) return;
        seen_[v] = stamp_;
        from_[v] = u;
        via_[v] = j;
        if (v < X0 && spare_[v] > 0) found = v;
        search_.push_back(v);
    };
    for (std::size_t q = 0; q < search_.size() && found < 0; ++q) {
        const int u = search_[q];
        if (u < X0) {  // a rank: its experts' free tokens back to the expert or (e, nu) node
            for (int o = own_begin_[u]; o < own_begin_[u + 1]; ++o) {
                const int j = own_edges_[o];
                if (free_tokens(j) <= 0) continue;
                const int r = edge_run_[j];
                reach(alone(r) ? X0 + edge_expert_[j] : Y0 + r, u, j);
            }
        } else if (u < Y0) {  // an expert: to any of its ranks (through (e, nu) where shared)
            const int i = u - X0;
            for (int r = expert_run_[i]; r < expert_run_[i + 1] && found < 0; ++r) {
                if (alone(r)) {
                    reach(edge_rank(run_begin_[r]), u, run_begin_[r]);
                } else {
                    reach(Y0 + r, u, -1);
                }
            }
        } else {  // (e, nu): to its ranks, or back to the expert beyond C_nu
            const int r = u - Y0;
            for (int j = run_begin_[r]; j < run_begin_[r + 1] && found < 0; ++j) {
                reach(edge_rank(j), u, j);
            }
            if (found < 0 && run_sum_[r] > run_tokens_[r]) reach(X0 + run_expert_[r], u, -1);
        }
    }
    if (found < 0) return false;
    // The bottleneck: the overload, the room, the free tokens taken off ranks and the (e, nu)
    // nodes' tokens beyond C_nu sent back to their expert.
    std::int64_t delta = std::min(spare_[found], -spare_[source]);
    for (int v = found; v != source; v = from_[v]) {
        const int u = from_[v];
        if (u < X0) delta = std::min(delta, free_tokens(via_[v]));
        if (u >= Y0 && v >= X0) delta = std::min(delta, run_sum_[u - Y0] - run_tokens_[u - Y0]);
    }
    MOELB_CHECK(delta > 0, "balanced_assignment: an augmenting path moves nothing");
    for (int v = found; v != source; v = from_[v]) {
        const int j = via_[v];
        if (j < 0) continue;  // between an expert and its (e, nu) node: no rank's load moves
        const std::int64_t change = from_[v] < X0 ? -delta : delta;
        y_[j] += change;
        run_sum_[edge_run_[j]] += change;
        rank_load_[edge_rank(j)] += change;
        spare_[edge_rank(j)] -= change;
    }
    return true;
}

// The network at makespan T (sink 0, the ranks, per flow expert its node and its (e, nu) nodes)
// carrying y, the cheap arcs saturated, a rank's load beyond T - F_g left on the rank as its
// excess (every other node's inflow equals its outflow); the min-cost flow routes those excesses
// to the sink at the least cost, and y is read back.
void AssignmentSolver::route_overloads(std::int64_t T) {
    const auto& F = makespan_.fixed_load();
    const int m = num_edges();
    constexpr int kSink = 0;
    flow_.reset(0);
    flow_.add_node(kRankPotential);
    rank_node_.assign(static_cast<std::size_t>(W_), -1);
    // Arcs of capacity 0 are left out.
    auto arc = [&](int u, int v, std::int64_t cap, int cost, std::int64_t flow) {
        if (cap > 0) flow_.add_arc(u, v, cap, cost, flow);
    };
    // The ranks' arcs to the sink first, so that each rank's is the first it scans.
    std::int64_t overload = 0;
    for (int j = 0; j < m; ++j) {
        const int g = edge_rank(j);
        if (rank_node_[g] >= 0) continue;
        const int node = rank_node_[g] = flow_.add_node(kRankPotential);
        const std::int64_t cap = T - F[static_cast<std::size_t>(g)];
        const std::int64_t through = std::max<std::int64_t>(0, std::min(cap, rank_load_[g]));
        arc(node, kSink, cap, 0, through);
        flow_.add_excess(node, rank_load_[g] - through);
        overload += rank_load_[g] - through;
    }
    arc_begin_.resize(static_cast<std::size_t>(m));
    arc_end_.resize(static_cast<std::size_t>(m));
    for (int i = 0; i < k_; ++i) {
        const std::int64_t n = counts_[expert_ids_[i]];
        const int x = flow_.add_node(kExpertPotential);
        for (int r = expert_run_[i]; r < expert_run_[i + 1]; ++r) {
            const std::int64_t C = run_tokens_[r];
            if (run_begin_[r + 1] - run_begin_[r] == 1) {  // one rank on the node: arcs e -> g
                const int j = run_begin_[r];
                const int g = rank_node_[edge_rank(j)];
                const std::int64_t c = own_tokens_[j];
                arc_begin_[j] = flow_.next_arc();
                arc(x, g, c, 0, c);
                arc(x, g, C - c, 1, C - c);
                arc(x, g, n, 2, y_[j] - C);
                arc_end_[j] = flow_.next_arc();
                continue;
            }
            std::int64_t sum = 0;
            for (int j = run_begin_[r]; j < run_begin_[r + 1]; ++j) sum += y_[j];
            const int y = flow_.add_node(kNodePotential);
            arc(x, y, C, 0, C);
            arc(x, y, n, 1, sum - C);
            for (int j = run_begin_[r]; j < run_begin_[r + 1]; ++j) {
                const int g = rank_node_[edge_rank(j)];
                const std::int64_t c = own_tokens_[j];
                arc_begin_[j] = flow_.next_arc();
                arc(y, g, c, 0, c);
                arc(y, g, n, 1, y_[j] - c);
                arc_end_[j] = flow_.next_arc();
            }
        }
    }
    MOELB_CHECK(flow_.route_excess_to(kSink),
                "balanced_assignment: the min-cost flow could not "
                "route the overload of "
                    << overload << " tokens at T=" << T);
    for (int j = 0; j < m; ++j) {
        std::int64_t y = 0;
        for (int id = arc_begin_[j]; id < arc_end_[j]; id += 2) y += flow_.flow(id);
        y_[j] = y;
    }
}

// Per edge its flow y and its shares: own min(c_g, y); node: per run min(C_nu - own, Y_nu -
// own), taken from the run's edges in ascending order; the rest for the sources of other nodes.
void AssignmentSolver::plan_shares() {
    const int m = num_edges();
    own_.resize(static_cast<std::size_t>(m));
    node_.resize(static_cast<std::size_t>(m));
    rest_share_.resize(static_cast<std::size_t>(m));
    for (int j = 0; j < m; ++j) own_[j] = std::min(own_tokens_[j], y_[j]);
    const int num_runs = static_cast<int>(run_node_.size());
    for (int r = 0; r < num_runs; ++r) {
        std::int64_t sources = run_tokens_[r], ranks = 0;
        for (int j = run_begin_[r]; j < run_begin_[r + 1]; ++j) {
            sources -= own_[j];
            ranks += y_[j] - own_[j];
        }
        std::int64_t share = std::min(sources, ranks);
        for (int j = run_begin_[r]; j < run_begin_[r + 1]; ++j) {
            node_[j] = std::min(share, y_[j] - own_[j]);
            share -= node_[j];
            rest_share_[j] = y_[j] - own_[j] - node_[j];
        }
    }
}

void AssignmentSolver::add_chunk(std::vector<int>& slot, std::vector<std::int64_t>& amount, int p,
                                 std::int64_t tokens) {
    if (tokens == 0) return;
    slot.push_back(p);
    amount.push_back(tokens);
}

// The shares as chunks of slots: an edge's y split evenly over its rank's slots of the expert
// (lower slots first), filled by its own share, then its node share, then its rest; and the
// hand-out cursors at the first chunks.
void AssignmentSolver::make_chunks(const ExpertLocation& loc, int layer) {
    own_chunk_begin_.clear();
    node_chunk_begin_.clear();
    rest_chunk_begin_.clear();
    own_slot_.clear();
    node_slot_.clear();
    rest_slot_.clear();
    own_amount_.clear();
    node_amount_.clear();
    rest_amount_.clear();
    const std::vector<int>& rank_of = makespan_.rank_of();
    for (int i = 0; i < k_; ++i) {
        rest_chunk_begin_.push_back(static_cast<int>(rest_slot_.size()));
        const auto reps = loc.replicas(layer, expert_ids_[i]);
        std::size_t begin = 0;
        for (int r = expert_run_[i]; r < expert_run_[i + 1]; ++r) {
            node_chunk_begin_.push_back(static_cast<int>(node_slot_.size()));
            for (int j = run_begin_[r]; j < run_begin_[r + 1]; ++j) {
                own_chunk_begin_.push_back(static_cast<int>(own_slot_.size()));
                const std::size_t end = detail::same_rank_end(reps, begin, rank_of);
                const auto n = static_cast<std::int64_t>(end - begin);
                // The shares, in this order, over the slots' even split.
                std::int64_t own = own_[j], node = node_[j], rest = rest_share_[j];
                for (std::size_t q = begin; q < end; ++q) {
                    const int p = reps[q];
                    std::int64_t room = n == 1 ? y_[j] : detail::even_share(y_[j], n, q - begin);
                    std::int64_t take = std::min(own, room);
                    add_chunk(own_slot_, own_amount_, p, take);
                    own -= take;
                    room -= take;
                    take = std::min(node, room);
                    add_chunk(node_slot_, node_amount_, p, take);
                    node -= take;
                    room -= take;
                    add_chunk(rest_slot_, rest_amount_, p, room);
                    rest -= room;
                }
                MOELB_CHECK(own == 0 && node == 0 && rest == 0,
                            "balanced_assignment: an edge's shares exceed its flow");
                begin = end;
            }
        }
    }
    own_chunk_begin_.push_back(static_cast<int>(own_slot_.size()));
    node_chunk_begin_.push_back(static_cast<int>(node_slot_.size()));
    rest_chunk_begin_.push_back(static_cast<int>(rest_slot_.size()));
    const int num_runs = static_cast<int>(run_node_.size());
    run_own_.assign(static_cast<std::size_t>(num_runs), 0);
    node_pos_.resize(static_cast<std::size_t>(num_runs));
    node_room_.resize(static_cast<std::size_t>(num_runs));
    for (int r = 0; r < num_runs; ++r) {
        const int c = node_chunk_begin_[r];
        node_pos_[r] = c;
        node_room_[r] = c < node_chunk_begin_[r + 1] ? node_amount_[c] : 0;
    }
    rest_pos_.resize(static_cast<std::size_t>(k_));
    rest_.resize(static_cast<std::size_t>(k_));
    for (int i = 0; i < k_; ++i) {
        const int c = rest_chunk_begin_[i];
        // Without a rest, the cursor still points at a slot of the expert: the fast loop stores
        // a source's 0 there, and a 0 is what that source has on any of the expert's slots.
        const bool any = c < rest_chunk_begin_[i + 1];
        const int first = loc.replicas(layer, expert_ids_[i])[0];
        rest_pos_[i] = c;
        rest_[i] = {expert_ids_[i], any ? rest_slot_[c] : first, any ? rest_amount_[c] : 0};
    }
}

// The slots of the experts with one slot, and the experts with tokens whose replicas all sit on
// one rank with their even split's cursors.
void AssignmentSolver::index_other_slots(const ExpertLocation& loc, int layer) {
    const std::int32_t* copies = loc.logical_count().data() + detail::row_slot(layer, E_);
    const std::int32_t* p2l = loc.physical_to_logical().data() + detail::row_slot(layer, P_);
    single_.clear();
    slot_source_.resize(static_cast<std::size_t>(P_));
    for (int p = 0; p < P_; ++p) {
        const bool one = copies[p2l[p]] == 1;
        if (one) single_.push_back({p2l[p], p});
        slot_source_[p] = one ? p2l[p] : E_;
    }
    stacked_expert_.clear();
    stacked_reps_.clear();
    stacked_size_.clear();
    stacked_pos_.clear();
    stacked_left_.clear();
    for (int e = 0; e < E_; ++e) {
        if (counts_[e] == 0 || copies[e] == 1 || makespan_.expert_rank(e) < 0) continue;
        const auto reps = loc.replicas(layer, e);
        const auto n = static_cast<int>(reps.size());
        stacked_expert_.push_back(e);
        stacked_reps_.push_back(reps.data());
        stacked_size_.push_back(n);
        stacked_pos_.push_back(0);
        stacked_left_.push_back(detail::even_share(counts_[e], n, 0));
    }
}

// Every source's row of `out` [W, P], in source order: its one-slot experts' tokens, its flow
// experts' (the rest on the cursor's chunk, and for the experts with ranks on the source's node
// first its own rank's share, then the node share), its stacked experts'.
void AssignmentSolver::hand_out(std::int64_t* out) {
    const int num_stacked = static_cast<int>(stacked_expert_.size());
    // The source's row is read in order into a buffer that stays in the L1 cache (the reads below
    // jump across it; straight from a row out of the cache each would wait), with a 0 after it.
    row_.resize(static_cast<std::size_t>(E_) + 1);
    row_[E_] = 0;
    const int* slot_source = slot_source_.data();
    const bool dense = static_cast<int>(single_.size()) * 2 > P_;
    for (int s = 0; s < W_; ++s) {
        std::copy(source_row(s), source_row(s) + E_, row_.data());
        const std::int64_t* row = row_.data();
        std::int64_t* out_row = out + static_cast<Index>(s) * P_;
        // The one-slot experts' tokens, 0 elsewhere: mostly one-slot experts, one pass over the
        // slots; else zeros, then those slots.
        if (dense) {
            for (int p = 0; p < P_; ++p) out_row[p] = row[slot_source[p]];
        } else {
            std::fill(out_row, out_row + P_, 0);
            for (const Single& one : single_) out_row[one.slot] = row[one.expert];
        }
        // The own shares of the source's rank (edges by rank), noted on their runs; then the flow
        // experts in ascending order: those with a run on the source's node (ascending runs, so
        // experts) in full, the others through the fast loop.
        for (int o = own_begin_[s]; o < own_begin_[s + 1]; ++o) {
            const int j = own_edges_[o];
            for (int c = own_chunk_begin_[j]; c < own_chunk_begin_[j + 1]; ++c) {
                out_row[own_slot_[c]] += own_amount_[c];
            }
            run_own_[edge_run_[j]] = own_[j];
        }
        int i = 0;
        const int node = s / ranks_per_node_;
        for (int o = node_runs_begin_[node]; o < node_runs_begin_[node + 1]; ++o) {
            const int r = node_runs_[o];
            from_rest_fast(i, run_expert_[r], row, out_row);
            from_run(r, row, out_row);
            i = run_expert_[r] + 1;
        }
        from_rest_fast(i, k_, row, out_row);
        for (int q = 0; q < num_stacked; ++q) {
            const std::int64_t tokens = row[stacked_expert_[q]];
            if (tokens > 0) to_stacked(q, tokens, out_row);
        }
    }
}

// Flow experts [begin, end) without a run on the source's node: all their tokens from the rest,
// mostly onto the slot of the cursor's chunk (the row's only write there: a plain store).
void AssignmentSolver::from_rest_fast(int begin, int end, const std::int64_t* row,
                                      std::int64_t* out_row) {
    RestCursor* cursor = rest_.data();
    for (int i = begin; i < end; ++i) {
        RestCursor& c = cursor[i];
        const std::int64_t tokens = row[c.expert];
        if (tokens <= c.room) {
            c.room -= tokens;
            out_row[c.slot] = tokens;
        } else {
            from_rest(i, tokens, out_row);
        }
    }
}

// The source's tokens of run r's expert, the source on the run's node: beyond its own rank's share
// (handed out before), the node share, then the rest.
void AssignmentSolver::from_run(int r, const std::int64_t* row, std::int64_t* out_row) {
    const int i = run_expert_[r];
    std::int64_t tokens = row[expert_ids_[i]] - run_own_[r];
    run_own_[r] = 0;
    if (tokens < node_room_[r]) {  // mostly: all of them within the node cursor's chunk
        out_row[node_slot_[node_pos_[r]]] += tokens;
        node_room_[r] -= tokens;
        return;
    }
    if (tokens > 0) tokens -= from_node(r, tokens, out_row);
    if (tokens > 0) from_rest(i, tokens, out_row);
}

// Up to `tokens` from run r's node chunks; returns how many.
std::int64_t AssignmentSolver::from_node(int r, std::int64_t tokens, std::int64_t* out_row) {
    std::int64_t given = 0;
    int& c = node_pos_[r];
    while (tokens > 0 && c < node_chunk_begin_[r + 1]) {
        const std::int64_t take = std::min(tokens, node_room_[r]);
        out_row[node_slot_[c]] += take;
        node_room_[r] -= take;
        tokens -= take;
        given += take;
        if (node_room_[r] == 0 && ++c < node_chunk_begin_[r + 1]) node_room_[r] = node_amount_[c];
    }
    return given;
}

// `tokens` of flow expert i from its rest chunks.
void AssignmentSolver::from_rest(int i, std::int64_t tokens, std::int64_t* out_row) {
    RestCursor& cursor = rest_[i];
    for (;;) {
        const std::int64_t take = std::min(tokens, cursor.room);
        out_row[cursor.slot] += take;
        cursor.room -= take;
        tokens -= take;
        if (tokens == 0) return;
        const int c = ++rest_pos_[i];
        MOELB_CHECK(c < rest_chunk_begin_[i + 1],
                    "balanced_assignment: an expert's tokens overflow its ranks");
        cursor.room = rest_amount_[c];
        cursor.slot = rest_slot_[c];
    }
}

// `tokens` of stacked expert q onto its slots from its cursor (the even split, lower slots
// first).
void AssignmentSolver::to_stacked(int q, std::int64_t tokens, std::int64_t* out_row) {
    const std::int32_t* reps = stacked_reps_[q];
    const int n = stacked_size_[q];
    while (tokens > 0) {
        while (stacked_left_[q] == 0) {
            MOELB_CHECK(++stacked_pos_[q] < n, "balanced_assignment: a rank's slots overflow");
            stacked_left_[q] = detail::even_share(counts_[stacked_expert_[q]], n, stacked_pos_[q]);
        }
        const std::int64_t take = std::min(tokens, stacked_left_[q]);
        out_row[reps[stacked_pos_[q]]] += take;
        tokens -= take;
        stacked_left_[q] -= take;
    }
}

// This thread's solver, reused across calls so that its buffers are. Reached through a call,
// not named as a thread_local inside the loops: in a shared library every access to a
// thread_local object may cost a __tls_get_addr call.
[[gnu::noinline]] AssignmentSolver& thread_solver() {
    thread_local AssignmentSolver solver;
    return solver;
}

}  // namespace

void balanced_assignment(const ExpertLocation& location, ConstMatrixMap<std::int64_t> source_counts,
                         ConstMatrixMap<std::int64_t> fixed_loads, MatrixMap<std::int64_t> out,
                         int layer) {
    const detail::Shape shape = detail::check_layers(location, layer);
    detail::check_assignment_shapes(location, shape, source_counts, out);
    detail::check_fixed_loads(location, shape, fixed_loads);
    const int W = location.ep_size(), E = location.num_logical_experts();
    const int P = location.num_physical_experts();
    // Every layer's counts summed over the sources and checked before any layer is solved (so
    // that a bad row anywhere leaves no work done); check_counts names the first bad entry where
    // the fast check is not certain.
    std::vector<std::int64_t> sums(static_cast<std::size_t>(shape.layers) * E);
    std::vector<char> sure(static_cast<std::size_t>(shape.layers));
    const int grain = std::max(1, 256 / std::max(W, 1));
    parallel_for(shape.layers, grain, [&](Index begin, Index end) {
        for (Index row = begin; row < end; ++row) {
            sure[row] =
                detail::sum_counts(source_counts, row, W, fixed_loads, sums.data() + row * E);
        }
    });
    if (std::find(sure.begin(), sure.end(), 0) != sure.end()) {
        detail::check_counts(shape, source_counts, W, {"source_counts", shape.one_layer, true},
                             fixed_loads);
    }
    parallel_for(shape.layers, grain, [&](Index begin, Index end) {
        AssignmentSolver& solver = thread_solver();
        for (Index row = begin; row < end; ++row) {
            solver.solve(location, shape.first + static_cast<int>(row), source_counts, row * W,
                         sums.data() + row * E, detail::fixed_row(fixed_loads, row),
                         out.data() + row * W * P);
        }
    });
}

}  // namespace moelb
