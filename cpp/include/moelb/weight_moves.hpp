// Weight-move plans (DESIGN section 4; reference/eplb.md section 2.9): what every EP rank copies,
// sends and receives so that one layer's slots change from an old placement to a new one.
//
// Node-aware like SGLang's updater: a rank that needs an expert it does not hold receives it from
// a rank of its own node when one holds it, else from any holder; the needing ranks are shared
// out evenly (in contiguous runs) over the holders. Every expert a rank needs arrives once; further
// slots of the same rank needing it are filled locally; unchanged slots are not touched.
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

#include "moelb/expert_location.hpp"

namespace moelb {

// Execution order on every rank: (1) kCopy and kSend read the OLD contents of their source slot;
// (2) kRecv writes the received expert into its slot; (3) kCopy writes what it read; (4) kFanout
// copies a slot's NEW contents (after 2-3) into another slot of the same rank.
enum class MoveKind { kCopy, kSend, kRecv, kFanout };
std::string_view to_string(MoveKind kind);

struct MoveOp {
    MoveKind kind;
    std::int32_t expert;    // logical expert moved
    std::int32_t src_slot;  // local slot read (kCopy, kSend, kFanout), else -1
    std::int32_t dst_slot;  // local slot written (kCopy, kRecv, kFanout), else -1
    std::int32_t peer;      // the other rank (kSend: receiver, kRecv: sender), else -1
};

struct WeightMovePlan {
    int layer = 0;
    int ep_size = 0;
    int slots_per_rank = 0;                // S
    std::vector<std::vector<MoveOp>> ops;  // per rank, in execution order; sends and receives
                                           // sorted by (expert, peer) so both ends match
    Index local_copies = 0;                // kCopy + kFanout
    Index intra_node_transfers = 0;        // receives from the same node
    Index inter_node_transfers = 0;        // receives from another node
    Index unchanged_slots = 0;
    // What the plan was made from and to: layer `layer` of the old and the new placement's
    // physical_to_logical, [ep_size * S] each. A plan applies only to weights that hold
    // old_physical_to_logical (check_plan_placement, PlanEnd::kOld) and leaves them holding
    // new_physical_to_logical.
    std::vector<std::int32_t> old_physical_to_logical;
    std::vector<std::int32_t> new_physical_to_logical;
};

// The moves for layer `layer` from `old_location` to `new_location` (same layers, logical and
// physical experts, ep_size and nodes).
WeightMovePlan plan_weight_moves(const ExpertLocation& old_location,
                                 const ExpertLocation& new_location, int layer);

// A 64-bit digest of what the plan moves from and to (layer, ep_size, S and both rows): equal on
// every process that planned the same transition, so ranks can check they hold the same plan.
std::uint64_t plan_fingerprint(const WeightMovePlan& plan);

// Throws InvalidArgument (naming `parameter`) unless `location` has the plan's shape (ep_size,
// ep_size * S slots, a layer `plan.layer`) and its row `plan.layer` equals the placement the plan
// moves from (end = kOld: the weights to move must hold it) or to (end = kNew). The message names
// the first slot that differs: a stale plan, or weights already moved.
enum class PlanEnd { kOld, kNew };
void check_plan_placement(const WeightMovePlan& plan, const ExpertLocation& location, PlanEnd end,
                          std::string_view parameter);

// The bytes a plan moves when one expert's weights take expert_bytes (>= 0): received from a rank
// of the same node, received from another node, and copied within ranks (kCopy and kFanout). An
// expert_bytes whose product with the counts (or with the transfers' sum) overflows is an error.
struct MovedBytes {
    Index intra_node = 0;
    Index inter_node = 0;
    Index local = 0;
};
MovedBytes moved_bytes(const WeightMovePlan& plan, Index expert_bytes);

// Runs a plan over all ranks in one process on slot contents (e.g. the expert id each slot holds),
// [ep_size * S]; returns the new contents. Every receive must match a send of the same expert
// between the same ranks (else Error).
std::vector<std::int64_t> simulate_weight_moves(const WeightMovePlan& plan,
                                                const std::vector<std::int64_t>& contents);

}  // namespace moelb
