// Weight-move plans (DESIGN section 4, "plan_weight_moves"; moelb/weight_moves.hpp): for one layer,
// what every EP rank copies, sends and receives so that its slots change from the old placement to
// the new one (node-aware sources), their fingerprint, and the byte counts and one-process
// simulation that check them.
#include "moelb/weight_moves.hpp"

#include <algorithm>
#include <limits>
#include <map>
#include <span>
#include <tuple>
#include <vector>

#include "moelb/errors.hpp"

namespace moelb {

std::string_view to_string(MoveKind kind) {
    switch (kind) {
        case MoveKind::kCopy:
            return "copy";
        case MoveKind::kSend:
            return "send";
        case MoveKind::kRecv:
            return "recv";
        case MoveKind::kFanout:
            return "fanout";
    }
    return "?";
}

namespace {

// The steps of plan_weight_moves for one layer: who holds each expert before, who needs it after,
// which holder sends it to each needing rank, then each rank's operations in execution order.

void check_same_shape(const ExpertLocation& old_location, const ExpertLocation& new_location,
                      int layer) {
    MOELB_CHECK_ARG(
        old_location.num_layers() == new_location.num_layers() &&
            old_location.num_logical_experts() == new_location.num_logical_experts() &&
            old_location.num_physical_experts() == new_location.num_physical_experts() &&
            old_location.ep_size() == new_location.ep_size() &&
            old_location.num_nodes() == new_location.num_nodes(),
        "old and new locations differ in shape: "
            << old_location.num_layers() << "x" << old_location.num_physical_experts()
            << " slots on " << old_location.ep_size() << " ranks / " << old_location.num_nodes()
            << " nodes vs " << new_location.num_layers() << "x"
            << new_location.num_physical_experts() << " on " << new_location.ep_size() << " / "
            << new_location.num_nodes());
    MOELB_CHECK_ARG(
        layer >= 0 && layer < old_location.num_layers(),
        "layer=" << layer << " is outside [0, num_layers=" << old_location.num_layers() << ")");
}

// One layer's rows and shape, and who holds each expert in the old placement.
struct LayerMoves {
    const ExpertLocation& location;  // the old one (shape and nodes are those of both)
    std::span<const std::int32_t> old_row, new_row;
    int W, S, E;
    // holders[e]: ranks holding e in the old placement (ascending, unique), first slot each.
    std::vector<std::vector<std::pair<int, int>>> holders;

    LayerMoves(const ExpertLocation& old_location, const ExpertLocation& new_location, int layer)
        : location(old_location),
          old_row(old_location.physical_to_logical().row(layer).data(),
                  static_cast<std::size_t>(old_location.num_physical_experts())),
          new_row(new_location.physical_to_logical().row(layer).data(),
                  static_cast<std::size_t>(new_location.num_physical_experts())),
          W(old_location.ep_size()),
          S(old_location.num_local_physical_experts()),
          E(old_location.num_logical_experts()),
          holders(static_cast<std::size_t>(E)) {
        for (int p = 0; p < W * S; ++p) {
            const int e = old_row[p], r = p / S;
            auto& h = holders[e];
            if (h.empty() || h.back().first != r) h.emplace_back(r, p % S);
        }
    }

    int node_of(int rank) const { return location.node_of_rank(rank); }

    // The old slot of expert e on rank r, or -1.
    int old_slot_on(int e, int r) const {
        for (const auto& [rank, slot] : holders[e]) {
            if (rank == r) return slot;
        }
        return -1;
    }

    // needing[e]: ranks that hold e in the new placement but not in the old one (ascending).
    std::vector<std::vector<int>> needing() const {
        std::vector<std::vector<int>> out(static_cast<std::size_t>(E));
        for (int p = 0; p < W * S; ++p) {
            const int e = new_row[p], r = p / S;
            if (old_slot_on(e, r) >= 0) continue;
            auto& n = out[e];
            if (n.empty() || n.back() != r) n.push_back(r);
        }
        return out;
    }
};

using SourceOf = std::map<std::pair<int, int>, int>;  // (expert, needing rank) -> source rank

// Pairs every rank that needs expert e with a holder: one of its own node when the node has one,
// spread evenly over them; the ranks of nodes without a holder spread evenly over all holders.
void pair_sources(const LayerMoves& m, int e, const std::vector<int>& needers,
                  SourceOf& source_of) {
    MOELB_CHECK(!m.holders[e].empty(), "expert " << e << " is needed but held by no rank");
    std::map<int, std::vector<int>> sources_by_node, needing_by_node;
    for (const auto& [r, slot] : m.holders[e]) sources_by_node[m.node_of(r)].push_back(r);
    std::vector<int> remote;  // needing ranks whose node holds no copy
    for (const int r : needers) {
        if (sources_by_node.count(m.node_of(r))) {
            needing_by_node[m.node_of(r)].push_back(r);
        } else {
            remote.push_back(r);
        }
    }
    auto share = [&](const std::vector<int>& ranks, const std::vector<int>& sources) {
        const auto k = static_cast<Index>(ranks.size());
        const auto n = static_cast<Index>(sources.size());
        for (Index j = 0; j < k; ++j) {
            source_of[{e, ranks[static_cast<std::size_t>(j)]}] =
                sources[static_cast<std::size_t>(j * n / k)];
        }
    };
    for (const auto& [node, ranks] : needing_by_node) share(ranks, sources_by_node[node]);
    if (!remote.empty()) {
        std::vector<int> all;
        for (const auto& [r, slot] : m.holders[e]) all.push_back(r);
        share(remote, all);
    }
}

// Each rank's operations by kind, before ordering.
struct RankOps {
    std::vector<std::vector<MoveOp>> reads, receives, fanouts;  // [W] each
};

// Classifies every changed slot: a local copy, a fan-out of an expert the rank receives for an
// earlier slot, or a receive (with the matching send on its source); counts them in `plan`.
RankOps classify_slots(const LayerMoves& m, const SourceOf& source_of, WeightMovePlan& plan) {
    const auto W = static_cast<std::size_t>(m.W);
    RankOps ops{std::vector<std::vector<MoveOp>>(W), std::vector<std::vector<MoveOp>>(W),
                std::vector<std::vector<MoveOp>>(W)};
    for (int r = 0; r < m.W; ++r) {
        std::map<int, int> first_new_slot;  // expert -> first slot of rank r receiving it
        for (int d = 0; d < m.S; ++d) {
            const int p = r * m.S + d;
            const int e = m.new_row[p];
            if (m.old_row[p] == e) {
                ++plan.unchanged_slots;
                continue;
            }
            const int local = m.old_slot_on(e, r);
            if (local >= 0) {
                ops.reads[r].push_back({MoveKind::kCopy, e, local, d, -1});
                ++plan.local_copies;
                continue;
            }
            const auto it = first_new_slot.find(e);
            if (it != first_new_slot.end()) {
                ops.fanouts[r].push_back({MoveKind::kFanout, e, it->second, d, -1});
                ++plan.local_copies;
                continue;
            }
            first_new_slot[e] = d;
            const int src = source_of.at({e, r});
            ops.receives[r].push_back({MoveKind::kRecv, e, -1, d, src});
            ops.reads[src].push_back({MoveKind::kSend, e, m.old_slot_on(e, src), -1, r});
            if (m.node_of(src) == m.node_of(r)) {
                ++plan.intra_node_transfers;
            } else {
                ++plan.inter_node_transfers;
            }
        }
    }
    return ops;
}

// Each rank's execution order: copies first (in slot order), then sends; then receives; then
// fan-outs. Sends and receives by (expert, peer, slot), so that both ends of a pair agree.
void order_ops(RankOps& ops, WeightMovePlan& plan) {
    auto by_expert_peer = [](const MoveOp& a, const MoveOp& b) {
        return std::tie(a.expert, a.peer, a.dst_slot) < std::tie(b.expert, b.peer, b.dst_slot);
    };
    for (std::size_t r = 0; r < plan.ops.size(); ++r) {
        auto& reads = ops.reads[r];
        std::stable_partition(reads.begin(), reads.end(),
                              [](const MoveOp& op) { return op.kind == MoveKind::kCopy; });
        const auto sends = std::find_if(reads.begin(), reads.end(), [](const MoveOp& op) {
            return op.kind == MoveKind::kSend;
        });
        std::stable_sort(sends, reads.end(), by_expert_peer);
        std::stable_sort(ops.receives[r].begin(), ops.receives[r].end(), by_expert_peer);
        auto& out = plan.ops[r];
        out.insert(out.end(), reads.begin(), reads.end());
        out.insert(out.end(), ops.receives[r].begin(), ops.receives[r].end());
        out.insert(out.end(), ops.fanouts[r].begin(), ops.fanouts[r].end());
    }
}

}  // namespace

WeightMovePlan plan_weight_moves(const ExpertLocation& old_location,
                                 const ExpertLocation& new_location, int layer) {
    check_same_shape(old_location, new_location, layer);
    const LayerMoves moves(old_location, new_location, layer);
    const std::vector<std::vector<int>> needing = moves.needing();
    SourceOf source_of;
    for (int e = 0; e < moves.E; ++e) {
        if (!needing[e].empty()) pair_sources(moves, e, needing[e], source_of);
    }
    WeightMovePlan plan;
    plan.layer = layer;
    plan.ep_size = moves.W;
    plan.slots_per_rank = moves.S;
    plan.ops.assign(static_cast<std::size_t>(moves.W), {});
    plan.old_physical_to_logical.assign(moves.old_row.begin(), moves.old_row.end());
    plan.new_physical_to_logical.assign(moves.new_row.begin(), moves.new_row.end());
    RankOps ops = classify_slots(moves, source_of, plan);
    order_ops(ops, plan);
    return plan;
}

std::uint64_t plan_fingerprint(const WeightMovePlan& plan) {
    // FNV-1a over the fields' 32-bit values: stable across processes and platforms.
    std::uint64_t hash = 14695981039346656037ULL;
    auto mix = [&](std::int64_t value) {
        auto bits = static_cast<std::uint32_t>(value);
        for (int byte = 0; byte < 4; ++byte, bits >>= 8) {
            hash = (hash ^ (bits & 0xffU)) * 1099511628211ULL;
        }
    };
    mix(plan.layer);
    mix(plan.ep_size);
    mix(plan.slots_per_rank);
    for (const auto* row : {&plan.old_physical_to_logical, &plan.new_physical_to_logical}) {
        mix(static_cast<std::int64_t>(row->size()));
        for (const std::int32_t e : *row) mix(e);
    }
    return hash;
}

void check_plan_placement(const WeightMovePlan& plan, const ExpertLocation& location, PlanEnd end,
                          std::string_view parameter) {
    const Index slots = static_cast<Index>(plan.ep_size) * plan.slots_per_rank;
    MOELB_CHECK_ARG(
        location.ep_size() == plan.ep_size && location.num_physical_experts() == slots &&
            plan.layer < location.num_layers(),
        parameter << " has " << location.num_layers() << " layers of "
                  << location.num_physical_experts() << " slots on " << location.ep_size()
                  << " ranks but the plan moves layer " << plan.layer << " of " << slots
                  << " slots on " << plan.ep_size << " ranks");
    const std::vector<std::int32_t>& expected =
        end == PlanEnd::kOld ? plan.old_physical_to_logical : plan.new_physical_to_logical;
    MOELB_CHECK(static_cast<Index>(expected.size()) == slots,
                "the plan records " << expected.size() << " slots but moves " << slots);
    const auto row = location.physical_to_logical().row(plan.layer);
    for (Index p = 0; p < slots; ++p) {
        const std::int32_t want = expected[static_cast<std::size_t>(p)];
        MOELB_CHECK_ARG(
            row[p] == want,
            parameter << " is not the placement the plan moves "
                      << (end == PlanEnd::kOld ? "from" : "to") << ": in layer " << plan.layer
                      << " slot " << p << " (rank " << p / plan.slots_per_rank << ") holds expert "
                      << row[p] << " where the plan has expert " << want
                      << (end == PlanEnd::kOld
                              ? " (a stale plan, or weights that were already moved); nothing "
                                "was changed"
                              : "; nothing was changed"));
    }
}

MovedBytes moved_bytes(const WeightMovePlan& plan, Index expert_bytes) {
    MOELB_CHECK_ARG(expert_bytes >= 0, "expert_bytes must be non-negative, got " << expert_bytes);
    // The largest product taken: the transfers' sum (intra + inter) or the local copies.
    const Index most = std::max(
        {plan.intra_node_transfers + plan.inter_node_transfers, plan.local_copies, Index{1}});
    MOELB_CHECK_ARG(expert_bytes <= std::numeric_limits<Index>::max() / most,
                    "expert_bytes=" << expert_bytes << " times " << most
                                    << " moved experts overflows a 64-bit byte count");
    return {plan.intra_node_transfers * expert_bytes, plan.inter_node_transfers * expert_bytes,
            plan.local_copies * expert_bytes};
}

std::vector<std::int64_t> simulate_weight_moves(const WeightMovePlan& plan,
                                                const std::vector<std::int64_t>& contents) {
    const int W = plan.ep_size, S = plan.slots_per_rank;
    MOELB_CHECK_ARG(static_cast<Index>(contents.size()) == static_cast<Index>(W) * S,
                    "contents has " << contents.size() << " slots but the plan has "
                                    << static_cast<Index>(W) * S);
    std::vector<std::int64_t> next = contents;
    // (1) reads from the old contents.
    std::map<std::tuple<int, int, int>, std::vector<std::int64_t>> in_flight;  // (src, dst, e)
    std::vector<std::vector<std::pair<int, std::int64_t>>> copies(static_cast<std::size_t>(W));
    for (int r = 0; r < W; ++r) {
        for (const MoveOp& op : plan.ops[r]) {
            if (op.kind == MoveKind::kSend) {
                in_flight[{r, op.peer, op.expert}].push_back(contents[r * S + op.src_slot]);
            } else if (op.kind == MoveKind::kCopy) {
                copies[r].emplace_back(op.dst_slot, contents[r * S + op.src_slot]);
            }
        }
    }
    // (2) receives, (3) copies, (4) fan-outs.
    for (int r = 0; r < W; ++r) {
        for (const MoveOp& op : plan.ops[r]) {
            if (op.kind != MoveKind::kRecv) continue;
            auto it = in_flight.find({op.peer, r, op.expert});
            MOELB_CHECK(it != in_flight.end() && !it->second.empty(),
                        "rank " << r << " receives expert " << op.expert << " from rank " << op.peer
                                << " which sends nothing matching");
            next[r * S + op.dst_slot] = it->second.front();
            it->second.erase(it->second.begin());
            if (it->second.empty()) in_flight.erase(it);
        }
        for (const auto& [slot, value] : copies[r]) next[r * S + slot] = value;
        for (const MoveOp& op : plan.ops[r]) {
            if (op.kind == MoveKind::kFanout) next[r * S + op.dst_slot] = next[r * S + op.src_slot];
        }
    }
    MOELB_CHECK(in_flight.empty(), "a send has no matching receive");
    return next;
}

}  // namespace moelb
