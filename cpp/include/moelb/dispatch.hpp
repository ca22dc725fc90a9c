// Replica dispatch (DESIGN sections 2 and 9; reference/dispatch.md): how a logical expert id
// becomes one of the expert's physical slots, per (layer, source rank, token, column). A placement
// is judged by the load this realises, not by the equal split every planner assumes.
//
// Two kinds, never confused:
// - Engine models, exact, named after the engine (reference/dispatch.md sections 1-6):
//   kSglangStatic               SGLang `static` on the `--init-expert-location` file path: each
//                               rank collapses every replica list to its nearest replica (own GPU,
//                               else own node when that is a strict subset), then fills what is
//                               left with `_fair_choices` drawn from its own random.Random(42)
//                               stream over its own lists -- bit-exact, ranks draw independently.
//   kSglangStaticRuntime        SGLang `static` after a runtime EPLB rebalance: uncollapsed lists
//                               in the algorithm's log2phy order, one coordinated table.
//   kSglangDynamic              SGLang `dynamic` with an a2a backend: the rank's collapsed list,
//                               then `randint(0, 65536) % num_valid` per (token, column) (the
//                               engine's draws come from torch's global RNG; ours from a seeded
//                               counter hash with the same distribution).
//   kSglangDynamicRankInvariant SGLang `dynamic` without an a2a backend: uncollapsed lists,
//                               replica `token_row % num_valid`, the same on every rank.
//   kVllmHash                   vLLM 0.33: replica `((token_row * 2654435769) & 0xFFFFFFFF) %
//                               replica_count` over the slots in ascending order.
//   kRoundRobin                 replica `(token_row + ep_rank) % replica_count` over ascending
//                               slots (TensorRT-LLM's per-block offset is not modelled).
//   kEqualSplit                 what the planners assume: every token split equally over the
//                               replicas. Fractional, so no per-token slot: scored from counts.
// - moelb's own dispatch, named as ours:
//   kMoelbStatic                a coordinated table: own rank's replica, else the node's replicas
//                               shared evenly among the node's ranks that have none, else all
//                               replicas shared evenly among the ranks of nodes that hold none.
//   balanced_split /            the exact per-step split of the tokens over the replicas at the
//   balanced_assignment         optimal largest rank load (below; cpp/src/balanced_flow.hpp).
//
// Tables are [L, E] per rank (kSglangStatic, kSglangStaticRuntime, kMoelbStatic); the other models
// pick per token. Token rows are the row within the source rank's batch, except for
// kSglangDynamicRankInvariant, where every rank sees the whole batch and the row is global.
#pragma once

#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "moelb/expert_location.hpp"
#include "moelb/views.hpp"

namespace moelb {

enum class DispatchAlgorithm {
    kSglangStatic,
    kSglangStaticRuntime,
    kSglangDynamic,
    kSglangDynamicRankInvariant,
    kVllmHash,
    kRoundRobin,
    kEqualSplit,
    kMoelbStatic,
};

// Parses the names above ("sglang_static", ..., "moelb_static"); a bad name is an InvalidArgument
// naming `param` and listing the valid names.
DispatchAlgorithm parse_dispatch_algorithm(std::string_view name,
                                           std::string_view param = "dispatch");
std::string_view to_string(DispatchAlgorithm algorithm);

// True for the models that are one table per rank.
bool is_table_dispatch(DispatchAlgorithm algorithm);

// Replica lists as an engine builds them, [L * E, X] padded with -1 (X = location.max_replicas()):
// row l * E + e lists the slots of expert e in layer l.
//   replica_order: optional [L * E, X] (a log2phy in the algorithm's creation order, -1 padded);
//     each row must hold exactly the expert's slots. Empty = ascending slots (a placement file).
//   collapse_for_rank: >= 0: SGLang's per-rank collapse (reference/dispatch.md section 2): every
//     list becomes its nearest replica for that rank where one exists; -1 = no collapse.
RowMatrix<std::int32_t> sglang_replica_lists(const ExpertLocation& location,
                                             ConstMatrixMap<std::int32_t> replica_order,
                                             int collapse_for_rank);

// SGLang's `_find_nearest_expert` (routing_waterfill.md section 7.2, same-node preference on):
// the slot of `candidates` nearest to `rank`, or -1.
std::int32_t sglang_nearest_replica(std::span<const std::int32_t> candidates, int rank,
                                    int num_local_physical_experts, int ranks_per_node);

// The dispatch table [L, E] of `ep_rank` for a table model (kSglangStatic, kSglangStaticRuntime,
// kMoelbStatic). replica_order applies to kSglangStaticRuntime only (empty = ascending); seed to
// kMoelbStatic only (SGLang's tables always use random.Random(42)).
RowMatrix<std::int32_t> dispatch_table(const ExpertLocation& location, DispatchAlgorithm algorithm,
                                       int ep_rank, std::uint64_t seed = 0,
                                       ConstMatrixMap<std::int32_t> replica_order = {nullptr, 0,
                                                                                     0});

// All ranks' tables, [W, L * E] (row r = dispatch_table(..., r, ...) flattened), in parallel.
RowMatrix<std::int32_t> dispatch_tables(const ExpertLocation& location, DispatchAlgorithm algorithm,
                                        std::uint64_t seed = 0,
                                        ConstMatrixMap<std::int32_t> replica_order = {nullptr, 0,
                                                                                      0});

// The logical -> physical mapping of one layer as seen by one rank: built once per call (validates
// layer and ep_rank; fetches the rank's table or lists), then applied per (token, column).
// kEqualSplit has no per-token slot and is an InvalidArgument here.
class LayerDispatcher {
  public:
    LayerDispatcher(const ExpertLocation& location, int layer, int ep_rank,
                    DispatchAlgorithm algorithm, std::uint64_t seed);

    const ExpertLocation& location() const { return *location_; }
    int layer() const { return layer_; }

    // The physical slot for logical expert `expert` (in [0, E)) chosen by the token in row
    // `token` (see the row convention above), column `column`.
    std::int32_t map(std::int32_t expert, Index token, int column) const;

  private:
    const ExpertLocation* location_;
    int layer_;
    int ep_rank_;
    DispatchAlgorithm algorithm_;
    std::uint64_t seed_;
    std::vector<std::int32_t> table_row_;  // [E], table models
    std::vector<std::int32_t> lists_;      // [E * X], the rank's lists (kSglangDynamic)
    std::vector<std::int32_t> counts_;     // [E], their lengths
    int width_ = 0;                        // X
};

// Maps logical ids [T, C] of one layer to physical slots (out [T, C], may alias topk_ids): rows
// [rank_offsets[r], rank_offsets[r + 1]) come from source rank r (rank_offsets: W + 1 ascending
// values from 0 to T). -1 stays -1; any other id outside [0, E) is an InvalidArgument.
void dispatch_tokens(const ExpertLocation& location, DispatchAlgorithm algorithm, int layer,
                     ConstMatrixMap<std::int32_t> topk_ids, std::span<const Index> rank_offsets,
                     std::uint64_t seed, MatrixMap<std::int32_t> out);

// --- moelb's exact per-step split (ours; DESIGN section 9, reference/dispatch.md section 7) ---
//
// For one step, the tokens of every logical expert split over its replicas so that the largest
// rank load, max_r (fixed_r + the tokens of r's slots), is as small as possible: exactly ceil(T*),
// T* the optimum of the LP of reference/dispatch.md section 7, in integers. An expert whose
// replicas all sit on one rank is a fixed load of that rank; only experts replicated over two or
// more ranks are split. Several replicas of one expert on one rank share that rank's tokens as
// evenly as possible, the lower slots taking the remainder. Solved as a max-flow (source ->
// expert -> the ranks of its replicas -> sink, the sink capacities raised from a lower bound by
// Hall/min-cut steps, the flow augmented, never rebuilt), with no LP solver. Deterministic:
// a pure function of its inputs, the same for any thread count (parallel over layers), so every
// rank that computes it from the same counts gets the same split.
//
// Arguments shared by both functions:
//   layer: -1 = all of the location's layers (L' = L, row i of every array is layer i); >= 0 =
//     that layer only (L' = 1).
//   fixed_loads: [L', W] int64 >= 0, load every rank carries besides the routed tokens (a shared
//     expert, attention, ...); an empty map (0 rows) = none.
// Bad input is an InvalidArgument naming the Python parameter (counts, source_counts,
// fixed_loads, layer): a wrong shape, a negative entry, or a layer whose counts and fixed loads
// sum past the int64 range. On error `out` is left untouched. (A validated ExpertLocation gives
// every logical expert a replica in every layer, so every count has somewhere to go.)

// Which of the optimal splits balanced_split returns.
//   kAny:  the max-flow's (the fastest): a vertex of the optimal set, where many experts sit
//          wholly on one of their replicas.
//   kEven: the one whose replica shares are the most even: the least sum over (expert e, rank g)
//          of x_eg^2 / (n_e m_eg), m_eg = e's slots on g (least, per expert, at the equal split
//          per slot), up to a piecewise-linear approximation (integral breakpoints every half
//          equal share, exact at them). For fractions used on other steps' tokens (the
//          probabilities mode, offline fractions), where an expert spread over its replicas
//          hedges its own variation. Slower (a min-cost flow after the max-flow).
enum class SplitShares { kAny, kEven };

// Parses "any" / "even"; a bad name is an InvalidArgument naming `param`.
SplitShares parse_split_shares(std::string_view name, std::string_view param = "shares");
std::string_view to_string(SplitShares shares);

// balanced_split: the tokens per physical slot.
//   counts: [L', E] int64 >= 0, the global tokens routed to each logical expert in the step.
//   out: [L', P] int64, the tokens each physical slot receives; each expert's slots sum to its
//     count, and the largest rank load is ceil(T*).
//   shares: which optimal split (above).
void balanced_split(const ExpertLocation& location, ConstMatrixMap<std::int64_t> counts,
                    ConstMatrixMap<std::int64_t> fixed_loads, MatrixMap<std::int64_t> out,
                    int layer = -1, SplitShares shares = SplitShares::kAny);

// The costs balanced_assignment minimises among the optimal splits, per token: a token served on
// its source rank costs 0, on another rank of the source's node 1, on another node 2.
inline constexpr std::int64_t kDispatchCostOwnRank = 0;
inline constexpr std::int64_t kDispatchCostSameNode = 1;
inline constexpr std::int64_t kDispatchCostOtherNode = 2;

// balanced_assignment (the "exact" engine mode: every rank holds every rank's counts after one
// all-gather and computes the same assignment): the tokens each source rank sends to each slot.
//   source_counts: [L' * W, E] int64 >= 0; row l' * W + s = the tokens source rank s routed to
//     each logical expert in layer l'.
//   out: [L' * W, P] int64; row l' * W + s = the tokens source rank s sends to each slot. Each row
//     sums to its source's counts, expert by expert; tokens go only to the expert's replicas;
//     the largest rank load is ceil(T*) of the summed counts (the same as balanced_split's); and
//     among such assignments the total cost (kDispatchCost*) is the least (a min-cost flow at that
//     makespan over one node per (expert, node), exact because the cost is a tree distance; see
//     balanced_assignment.cpp). Ties (ours): each source's tokens of an expert go first to its own
//     rank, then to its node's ranks, then to the others (sources ascending, ranks ascending); a
//     rank's tokens of an expert are split over its slots of that expert as evenly as possible,
//     lower slots first, filled by its own source's share, then its node's sources', then the
//     rest; an expert with all its replicas on one rank fills them in source order.
void balanced_assignment(const ExpertLocation& location, ConstMatrixMap<std::int64_t> source_counts,
                         ConstMatrixMap<std::int64_t> fixed_loads, MatrixMap<std::int64_t> out,
                         int layer = -1);

namespace detail {
// The previous balanced_assignment (a generic min-cost flow over one node per class of sources;
// the same contract, ties broken otherwise): kept only as the reference that tests and
// benchmarks compare balanced_assignment with (Python: moelb._core._balanced_assignment_reference).
void balanced_assignment_reference(const ExpertLocation& location,
                                   ConstMatrixMap<std::int64_t> source_counts,
                                   ConstMatrixMap<std::int64_t> fixed_loads,
                                   MatrixMap<std::int64_t> out, int layer = -1);
}  // namespace detail

}  // namespace moelb
