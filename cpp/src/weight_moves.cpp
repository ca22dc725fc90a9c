#include "moelb/weight_moves.hpp"

#include <algorithm>
#include <limits>
#include <map>
#include <tuple>

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

WeightMovePlan plan_weight_moves(const ExpertLocation& old_location,
                                 const ExpertLocation& new_location, int layer) {
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
    const int W = old_location.ep_size(), S = old_location.num_local_physical_experts();
    const int E = old_location.num_logical_experts();
    const auto old_row = old_location.physical_to_logical().row(layer);
    const auto new_row = new_location.physical_to_logical().row(layer);
    auto node_of = [&](int rank) { return old_location.node_of_rank(rank); };

    // holds_old[e]: ranks holding e in the old placement (ascending, unique), first slot each.
    std::vector<std::vector<std::pair<int, int>>> holders(static_cast<std::size_t>(E));
    for (int p = 0; p < W * S; ++p) {
        const int e = old_row[p], r = p / S;
        auto& h = holders[e];
        if (h.empty() || h.back().first != r) h.emplace_back(r, p % S);
    }
    auto old_slot_on = [&](int e, int r) {
        for (const auto& [rank, slot] : holders[e]) {
            if (rank == r) return slot;
        }
        return -1;
    };
    // needing[e]: ranks that hold e in the new placement but not in the old one (ascending).
    std::vector<std::vector<int>> needing(static_cast<std::size_t>(E));
    for (int p = 0; p < W * S; ++p) {
        const int e = new_row[p], r = p / S;
        if (old_slot_on(e, r) >= 0) continue;
        auto& n = needing[e];
        if (n.empty() || n.back() != r) n.push_back(r);
    }
    // Pair every needing rank with a source rank: same node when possible, spread evenly.
    std::map<std::pair<int, int>, int> source_of;  // (expert, needing rank) -> source rank
    for (int e = 0; e < E; ++e) {
        if (needing[e].empty()) continue;
        MOELB_CHECK(!holders[e].empty(), "expert " << e << " is needed but held by no rank");
        std::map<int, std::vector<int>> sources_by_node, needing_by_node;
        for (const auto& [r, slot] : holders[e]) sources_by_node[node_of(r)].push_back(r);
        std::vector<int> remote;  // needing ranks whose node holds no copy
        for (const int r : needing[e]) {
            if (sources_by_node.count(node_of(r))) {
                needing_by_node[node_of(r)].push_back(r);
            } else {
                remote.push_back(r);
            }
        }
        auto share = [&](const std::vector<int>& needers, const std::vector<int>& sources) {
            const auto k = static_cast<Index>(needers.size());
            const auto m = static_cast<Index>(sources.size());
            for (Index j = 0; j < k; ++j) {
                source_of[{e, needers[static_cast<std::size_t>(j)]}] =
                    sources[static_cast<std::size_t>(j * m / k)];
            }
        };
        for (const auto& [node, needers] : needing_by_node) share(needers, sources_by_node[node]);
        if (!remote.empty()) {
            std::vector<int> all;
            for (const auto& [r, slot] : holders[e]) all.push_back(r);
            share(remote, all);
        }
    }

    WeightMovePlan plan;
    plan.layer = layer;
    plan.ep_size = W;
    plan.num_local_slots = S;
    plan.ops.assign(static_cast<std::size_t>(W), {});
    plan.old_physical_to_logical.assign(old_row.begin(), old_row.end());
    plan.new_physical_to_logical.assign(new_row.begin(), new_row.end());
    std::vector<std::vector<MoveOp>> reads(static_cast<std::size_t>(W)),
        receives(static_cast<std::size_t>(W)), fanouts(static_cast<std::size_t>(W));
    for (int r = 0; r < W; ++r) {
        std::map<int, int> first_new_slot;  // expert -> first slot of rank r receiving it
        for (int d = 0; d < S; ++d) {
            const int p = r * S + d;
            const int e = new_row[p];
            if (old_row[p] == e) {
                ++plan.unchanged_slots;
                continue;
            }
            const int local = old_slot_on(e, r);
            if (local >= 0) {
                reads[r].push_back({MoveKind::kCopy, e, local, d, -1});
                ++plan.local_copies;
                continue;
            }
            const auto it = first_new_slot.find(e);
            if (it != first_new_slot.end()) {
                fanouts[r].push_back({MoveKind::kFanout, e, it->second, d, -1});
                ++plan.local_copies;
                continue;
            }
            first_new_slot[e] = d;
            const int src = source_of.at({e, r});
            receives[r].push_back({MoveKind::kRecv, e, -1, d, src});
            reads[src].push_back({MoveKind::kSend, e, old_slot_on(e, src), -1, r});
            if (node_of(src) == node_of(r)) {
                ++plan.intra_node_transfers;
            } else {
                ++plan.inter_node_transfers;
            }
        }
    }
    auto by_expert_peer = [](const MoveOp& a, const MoveOp& b) {
        return std::tie(a.expert, a.peer, a.dst_slot) < std::tie(b.expert, b.peer, b.dst_slot);
    };
    for (int r = 0; r < W; ++r) {
        // Copies first (in slot order), then sends; then receives; then fan-outs.
        std::stable_partition(reads[r].begin(), reads[r].end(),
                              [](const MoveOp& op) { return op.kind == MoveKind::kCopy; });
        const auto sends = std::find_if(reads[r].begin(), reads[r].end(), [](const MoveOp& op) {
            return op.kind == MoveKind::kSend;
        });
        std::stable_sort(sends, reads[r].end(), by_expert_peer);
        std::stable_sort(receives[r].begin(), receives[r].end(), by_expert_peer);
        auto& ops = plan.ops[r];
        ops.insert(ops.end(), reads[r].begin(), reads[r].end());
        ops.insert(ops.end(), receives[r].begin(), receives[r].end());
        ops.insert(ops.end(), fanouts[r].begin(), fanouts[r].end());
    }
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
    mix(plan.num_local_slots);
    for (const auto* row : {&plan.old_physical_to_logical, &plan.new_physical_to_logical}) {
        mix(static_cast<std::int64_t>(row->size()));
        for (const std::int32_t e : *row) mix(e);
    }
    return hash;
}

void check_plan_placement(const WeightMovePlan& plan, const ExpertLocation& location, PlanEnd end,
                          std::string_view parameter) {
    const Index slots = static_cast<Index>(plan.ep_size) * plan.num_local_slots;
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
                      << " slot " << p << " (rank " << p / plan.num_local_slots << ") holds expert "
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
    const int W = plan.ep_size, S = plan.num_local_slots;
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
