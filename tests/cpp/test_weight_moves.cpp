// Weight-move plans (weight_moves.hpp, reference/eplb.md 2.9): a hand-checked plan, the plan's
// rules on random old/new placements (node-aware pairing shared out evenly, each expert arrives
// once per rank, unchanged slots untouched, sends and receives pair up in the same order, counts),
// the one-process simulation reproducing the new placement, and errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <random>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "moelb/eplb.hpp"
#include "moelb/errors.hpp"
#include "moelb/expert_location.hpp"
#include "moelb/weight_moves.hpp"
#include "test_util.hpp"

namespace {

using namespace moelb::test_util;

using moelb::ExpertLocation;
using moelb::Index;
using moelb::MoveKind;
using moelb::MoveOp;
using moelb::RowMatrix;
using moelb::WeightMovePlan;

std::vector<std::int64_t> contents_of(const ExpertLocation& loc, int layer) {
    const auto row = loc.physical_to_logical().row(layer);
    return {row.data(), row.data() + row.size()};
}

// A readable form of one op for failure messages and hand-written expectations.
std::string str(const MoveOp& op) {
    return std::string(moelb::to_string(op.kind)) + "(e" + std::to_string(op.expert) + " " +
           std::to_string(op.src_slot) + "->" + std::to_string(op.dst_slot) + " peer " +
           std::to_string(op.peer) + ")";
}

std::vector<std::string> strs(const std::vector<MoveOp>& ops) {
    std::vector<std::string> out;
    for (const MoveOp& op : ops) out.push_back(str(op));
    return out;
}

MoveOp copy(int e, int src, int dst) { return {MoveKind::kCopy, e, src, dst, -1}; }
MoveOp send(int e, int src, int peer) { return {MoveKind::kSend, e, src, -1, peer}; }
MoveOp recv(int e, int dst, int peer) { return {MoveKind::kRecv, e, -1, dst, peer}; }
MoveOp fanout(int e, int src, int dst) { return {MoveKind::kFanout, e, src, dst, -1}; }

// ------------------------------------------------------------------------------------------------
// A plan worked out by hand: 4 ranks on 2 nodes (ranks 0-1, 2-3), 3 slots each, 6 experts.

TEST(WeightMovePlan, HandCheckedExample) {
    //                rank 0     rank 1     rank 2     rank 3
    // old:          [0, 1, 2] [3, 4, 5] [0, 1, 1] [2, 4, 5]
    // new:          [0, 5, 5] [4, 3, 2] [3, 3, 1] [2, 4, 0]
    const ExpertLocation old_loc(matrix<std::int32_t>({{0, 1, 2, 3, 4, 5, 0, 1, 1, 2, 4, 5}}), 6, 4,
                                 2);
    const ExpertLocation new_loc(matrix<std::int32_t>({{0, 5, 5, 4, 3, 2, 3, 3, 1, 2, 4, 0}}), 6, 4,
                                 2);
    const WeightMovePlan plan = moelb::plan_weight_moves(old_loc, new_loc, 0);
    EXPECT_EQ(plan.layer, 0);
    EXPECT_EQ(plan.ep_size, 4);
    EXPECT_EQ(plan.slots_per_rank, 3);
    ASSERT_EQ(plan.ops.size(), 4u);
    // Rank 0 needs 5 (holders 1 and 3: its node's rank 1), once; slot 2 is filled from slot 1.
    // It sends 2 to rank 1 (holders 0 and 3: rank 1's node has rank 0).
    EXPECT_EQ(strs(plan.ops[0]), strs({send(2, 2, 1), recv(5, 1, 1), fanout(5, 1, 2)}));
    // Rank 1 swaps 3 and 4 locally; sends 3 (only rank 1 has it: to rank 2 across nodes) and 5.
    EXPECT_EQ(strs(plan.ops[1]),
              strs({copy(4, 1, 0), copy(3, 0, 1), send(3, 0, 2), send(5, 2, 0), recv(2, 2, 0)}));
    // Rank 2 receives 3 from the other node (its node has none) once, fans it out; sends 0.
    EXPECT_EQ(strs(plan.ops[2]), strs({send(0, 0, 3), recv(3, 0, 1), fanout(3, 0, 1)}));
    // Rank 3 needs 0 (holders 0 and 2: its node's rank 2).
    EXPECT_EQ(strs(plan.ops[3]), strs({recv(0, 2, 2)}));
    EXPECT_EQ(plan.local_copies, 4);
    EXPECT_EQ(plan.intra_node_transfers, 3);
    EXPECT_EQ(plan.inter_node_transfers, 1);
    EXPECT_EQ(plan.unchanged_slots, 4);
    EXPECT_EQ(moelb::simulate_weight_moves(plan, contents_of(old_loc, 0)), contents_of(new_loc, 0));
    // Bytes for experts of 1,000 bytes; a negative size or an overflowing product is an error.
    const moelb::MovedBytes bytes = moelb::moved_bytes(plan, 1000);
    EXPECT_EQ(bytes.intra_node, 3000);
    EXPECT_EQ(bytes.inter_node, 1000);
    EXPECT_EQ(bytes.local, 4000);
    EXPECT_EQ(moelb::moved_bytes(plan, 0).local, 0);
    expect_invalid_argument([&] { moelb::moved_bytes(plan, -1); },
                            "expert_bytes must be non-negative, got -1");
    expect_invalid_argument([&] { moelb::moved_bytes(plan, std::int64_t{1} << 62); },
                            "overflows a 64-bit byte count");
}

TEST(WeightMovePlan, NeedersAreSharedOutEvenlyInContiguousRuns) {
    // One node of 6 ranks, 3 slots each. Expert 0 is on ranks 0 and 1; ranks 2-5 need it in their
    // last slot: ranks 2, 3 take it from rank 0 and ranks 4, 5 from rank 1.
    const ExpertLocation old_loc(
        matrix<std::int32_t>({{0, 1, 2, 0, 3, 4, 5, 6, 1, 5, 6, 2, 5, 6, 3, 5, 6, 4}}), 7, 6);
    const ExpertLocation new_loc(
        matrix<std::int32_t>({{0, 1, 2, 0, 3, 4, 5, 6, 0, 5, 6, 0, 5, 6, 0, 5, 6, 0}}), 7, 6);
    const WeightMovePlan plan = moelb::plan_weight_moves(old_loc, new_loc, 0);
    EXPECT_EQ(strs(plan.ops[0]), strs({send(0, 0, 2), send(0, 0, 3)}));
    EXPECT_EQ(strs(plan.ops[1]), strs({send(0, 0, 4), send(0, 0, 5)}));
    for (int r = 2; r < 6; ++r) {
        EXPECT_EQ(strs(plan.ops[r]), strs({recv(0, 2, r < 4 ? 0 : 1)})) << "rank " << r;
    }
    EXPECT_EQ(plan.intra_node_transfers, 4);
    EXPECT_EQ(plan.inter_node_transfers, 0);
    EXPECT_EQ(plan.local_copies, 0);
    EXPECT_EQ(plan.unchanged_slots, 14);
    EXPECT_EQ(moelb::simulate_weight_moves(plan, contents_of(old_loc, 0)), contents_of(new_loc, 0));
}

TEST(WeightMovePlan, IdenticalPlacementsMoveNothing) {
    const ExpertLocation loc = ExpertLocation::trivial(2, 10, 16, 4, 2);
    for (int l = 0; l < 2; ++l) {
        const WeightMovePlan plan = moelb::plan_weight_moves(loc, loc, l);
        for (const auto& ops : plan.ops) EXPECT_TRUE(ops.empty());
        EXPECT_EQ(plan.unchanged_slots, 16);
        EXPECT_EQ(plan.local_copies + plan.intra_node_transfers + plan.inter_node_transfers, 0);
        EXPECT_EQ(moelb::simulate_weight_moves(plan, contents_of(loc, l)), contents_of(loc, l));
    }
}

// ------------------------------------------------------------------------------------------------
// The plan's rules on random transitions.

struct MoveCase {
    const char* name;
    int ep_size, num_nodes, slots_per_rank, num_experts, num_layers;
    std::uint32_t seed;
};

// A random layer: every expert once, the other slots random experts, shuffled.
std::vector<std::int32_t> random_row(int E, int P, std::mt19937& gen) {
    std::vector<std::int32_t> row(static_cast<std::size_t>(P));
    for (int p = 0; p < P; ++p) row[p] = p < E ? p : static_cast<std::int32_t>(gen() % E);
    for (int p = P - 1; p > 0; --p) std::swap(row[p], row[gen() % (p + 1)]);
    return row;
}

// Old and new placements whose layers cover: fully random pairs, a few swapped slots, a few
// extra replicas overwritten, and identical layers.
std::pair<ExpertLocation, ExpertLocation> random_transition(const MoveCase& c) {
    std::mt19937 gen(c.seed);
    const int P = c.ep_size * c.slots_per_rank, E = c.num_experts, L = c.num_layers;
    RowMatrix<std::int32_t> old_map(L, P), new_map(L, P);
    for (int l = 0; l < L; ++l) {
        const std::vector<std::int32_t> a = random_row(E, P, gen);
        std::vector<std::int32_t> b;
        switch (l % 4) {
            case 0:
                b = random_row(E, P, gen);
                break;
            case 1:  // a few swaps keep every expert
                b = a;
                for (int k = 0; k < 3; ++k) std::swap(b[gen() % P], b[gen() % P]);
                break;
            case 2: {  // overwrite slots of experts with several replicas
                b = a;
                for (int k = 0; k < P / 4; ++k) {
                    const int p = static_cast<int>(gen() % P);
                    if (std::count(b.begin(), b.end(), b[p]) > 1) {
                        b[p] = static_cast<std::int32_t>(gen() % E);
                    }
                }
                break;
            }
            default:
                b = a;
                break;
        }
        for (int p = 0; p < P; ++p) {
            old_map(l, p) = a[p];
            new_map(l, p) = b[p];
        }
    }
    return {ExpertLocation(old_map, E, c.ep_size, c.num_nodes),
            ExpertLocation(new_map, E, c.ep_size, c.num_nodes)};
}

// Checks every documented rule of one plan.
void check_plan(const ExpertLocation& old_loc, const ExpertLocation& new_loc, int layer,
                const WeightMovePlan& plan) {
    const int W = old_loc.ep_size(), S = old_loc.num_local_physical_experts();
    const auto old_row = old_loc.physical_to_logical().row(layer);
    const auto new_row = new_loc.physical_to_logical().row(layer);
    auto node = [&](int r) { return old_loc.node_of_rank(r); };
    auto held = [&](int r, int e) {  // rank r holds e in the old placement
        for (int d = 0; d < S; ++d) {
            if (old_row[r * S + d] == e) return true;
        }
        return false;
    };
    auto node_holds = [&](int n, int e) {
        for (int r = 0; r < W; ++r) {
            if (node(r) == n && held(r, e)) return true;
        }
        return false;
    };
    ASSERT_EQ(plan.layer, layer);
    ASSERT_EQ(plan.ep_size, W);
    ASSERT_EQ(plan.slots_per_rank, S);
    ASSERT_EQ(static_cast<int>(plan.ops.size()), W);

    Index copies = 0, fanouts = 0, intra = 0, inter = 0, unchanged = 0;
    std::multiset<std::tuple<int, int, int>> sent, received;             // (sender, receiver, e)
    std::map<std::pair<int, int>, std::vector<int>> sent_seq, recv_seq;  // (a, b) -> experts
    // (expert, pool) -> receiving ranks and their sources; pool = node, or -1 for "no copy on
    // my node".
    std::map<std::pair<int, int>, std::vector<std::pair<int, int>>> pools;
    for (int r = 0; r < W; ++r) {
        SCOPED_TRACE("rank " + std::to_string(r));
        const std::vector<MoveOp>& ops = plan.ops[r];
        std::vector<int> writes(static_cast<std::size_t>(S), 0);
        std::set<int> received_experts;
        std::map<int, int> recv_slot;  // expert -> slot its receive writes
        int phase = 0;                 // 0: copies and sends, 1: receives, 2: fan-outs
        const MoveOp* last_send = nullptr;
        const MoveOp* last_recv = nullptr;
        for (const MoveOp& op : ops) {
            SCOPED_TRACE(str(op));
            const int op_phase = op.kind == MoveKind::kRecv     ? 1
                                 : op.kind == MoveKind::kFanout ? 2
                                                                : 0;
            EXPECT_GE(op_phase, phase) << "out of execution order";
            phase = std::max(phase, op_phase);
            switch (op.kind) {
                case MoveKind::kCopy:
                    ++copies;
                    EXPECT_EQ(op.peer, -1);
                    ASSERT_TRUE(op.src_slot >= 0 && op.src_slot < S);
                    ASSERT_TRUE(op.dst_slot >= 0 && op.dst_slot < S);
                    EXPECT_EQ(old_row[r * S + op.src_slot], op.expert);
                    EXPECT_EQ(new_row[r * S + op.dst_slot], op.expert);
                    EXPECT_EQ(last_send, nullptr) << "a copy after a send";
                    ++writes[op.dst_slot];
                    break;
                case MoveKind::kSend:
                    EXPECT_EQ(op.dst_slot, -1);
                    ASSERT_TRUE(op.src_slot >= 0 && op.src_slot < S);
                    ASSERT_TRUE(op.peer >= 0 && op.peer < W && op.peer != r);
                    EXPECT_EQ(old_row[r * S + op.src_slot], op.expert);
                    if (last_send) {
                        EXPECT_LE(std::tie(last_send->expert, last_send->peer),
                                  std::tie(op.expert, op.peer))
                            << "sends not sorted by (expert, peer)";
                    }
                    last_send = &op;
                    sent.emplace(r, op.peer, op.expert);
                    sent_seq[{r, op.peer}].push_back(op.expert);
                    break;
                case MoveKind::kRecv: {
                    EXPECT_EQ(op.src_slot, -1);
                    ASSERT_TRUE(op.dst_slot >= 0 && op.dst_slot < S);
                    ASSERT_TRUE(op.peer >= 0 && op.peer < W && op.peer != r);
                    EXPECT_EQ(new_row[r * S + op.dst_slot], op.expert);
                    EXPECT_FALSE(held(r, op.expert)) << "received an expert the rank holds";
                    EXPECT_TRUE(held(op.peer, op.expert)) << "the sender does not hold it";
                    EXPECT_TRUE(received_experts.insert(op.expert).second)
                        << "expert arrives twice at this rank";
                    recv_slot[op.expert] = op.dst_slot;
                    // Node-aware: from my node whenever my node holds the expert.
                    const bool local = node_holds(node(r), op.expert);
                    if (local) {
                        EXPECT_EQ(node(op.peer), node(r)) << "crossed nodes needlessly";
                    }
                    pools[{op.expert, local ? node(r) : -1}].emplace_back(r, op.peer);
                    if (node(op.peer) == node(r)) {
                        ++intra;
                    } else {
                        ++inter;
                    }
                    if (last_recv) {
                        EXPECT_LE(std::tie(last_recv->expert, last_recv->peer),
                                  std::tie(op.expert, op.peer))
                            << "receives not sorted by (expert, peer)";
                    }
                    last_recv = &op;
                    received.emplace(op.peer, r, op.expert);
                    recv_seq[{op.peer, r}].push_back(op.expert);
                    ++writes[op.dst_slot];
                    break;
                }
                case MoveKind::kFanout:
                    ++fanouts;
                    EXPECT_EQ(op.peer, -1);
                    ASSERT_TRUE(op.src_slot >= 0 && op.src_slot < S);
                    ASSERT_TRUE(op.dst_slot >= 0 && op.dst_slot < S);
                    EXPECT_EQ(new_row[r * S + op.dst_slot], op.expert);
                    ASSERT_TRUE(recv_slot.count(op.expert)) << "fan-out of nothing received";
                    EXPECT_EQ(recv_slot.at(op.expert), op.src_slot);
                    ++writes[op.dst_slot];
                    break;
            }
        }
        // Every changed slot is written exactly once; unchanged slots never.
        for (int d = 0; d < S; ++d) {
            const bool same = old_row[r * S + d] == new_row[r * S + d];
            unchanged += same;
            EXPECT_EQ(writes[d], same ? 0 : 1) << "slot " << d;
        }
    }
    // Sends and receives pair up, in the same order between every two ranks.
    EXPECT_EQ(sent, received);
    EXPECT_EQ(sent_seq, recv_seq);
    // Every rank needing an expert gets it (exactly once: checked above).
    for (int r = 0; r < W; ++r) {
        for (int d = 0; d < S; ++d) {
            const int e = new_row[r * S + d];
            if (held(r, e)) continue;
            bool arrives = false;
            for (const MoveOp& op : plan.ops[r]) {
                arrives |= op.kind == MoveKind::kRecv && op.expert == e;
            }
            EXPECT_TRUE(arrives) << "rank " << r << " never receives expert " << e;
        }
    }
    // Evenness: the receivers of one pool are cut into contiguous, near-equal runs, one per source
    // (in rank order).
    for (const auto& [key, pairs] : pools) {
        const auto [e, pool_node] = key;
        std::vector<int> sources;
        for (int r = 0; r < W; ++r) {
            if (held(r, e) && (pool_node < 0 || node(r) == pool_node)) sources.push_back(r);
        }
        const int k = static_cast<int>(pairs.size()), m = static_cast<int>(sources.size());
        std::map<int, int> served;
        int previous_index = -1;
        for (const auto& [receiver, source] : pairs) {  // receivers ascend
            const auto it = std::find(sources.begin(), sources.end(), source);
            ASSERT_NE(it, sources.end()) << "expert " << e << ": source " << source
                                         << " outside the pool of receiver " << receiver;
            const int index = static_cast<int>(it - sources.begin());
            EXPECT_GE(index, previous_index) << "expert " << e << ": runs not contiguous";
            previous_index = index;
            ++served[source];
        }
        for (const int source : sources) {
            const int n = served.count(source) ? served.at(source) : 0;
            EXPECT_TRUE(n == k / m || n == (k + m - 1) / m)
                << "expert " << e << ": source " << source << " serves " << n << " of " << k
                << " receivers over " << m << " sources";
        }
    }
    EXPECT_EQ(plan.local_copies, copies + fanouts);
    EXPECT_EQ(plan.intra_node_transfers, intra);
    EXPECT_EQ(plan.inter_node_transfers, inter);
    EXPECT_EQ(plan.unchanged_slots, unchanged);
    EXPECT_EQ(unchanged + copies + fanouts + intra + inter, static_cast<Index>(W) * S);
}

class WeightMoveRules : public ::testing::TestWithParam<MoveCase> {};

TEST_P(WeightMoveRules, PlanFollowsTheRulesAndSimulationGivesTheNewPlacement) {
    const MoveCase c = GetParam();
    const auto [old_loc, new_loc] = random_transition(c);
    const int W = c.ep_size, S = c.slots_per_rank, P = W * S;
    Index transfers = 0, inter = 0, copies = 0, unchanged = 0;
    for (int l = 0; l < c.num_layers; ++l) {
        SCOPED_TRACE("layer " + std::to_string(l));
        const WeightMovePlan plan = moelb::plan_weight_moves(old_loc, new_loc, l);
        check_plan(old_loc, new_loc, l, plan);
        transfers += plan.intra_node_transfers + plan.inter_node_transfers;
        inter += plan.inter_node_transfers;
        copies += plan.local_copies;
        unchanged += plan.unchanged_slots;
        // Simulating on expert ids gives the new placement.
        EXPECT_EQ(moelb::simulate_weight_moves(plan, contents_of(old_loc, l)),
                  contents_of(new_loc, l));
        // On slot ids: every changed slot ends with the contents of an old slot holding its new
        // expert (a slot of the same rank unless received); unchanged slots keep their own.
        std::vector<std::int64_t> ids(static_cast<std::size_t>(P));
        for (int p = 0; p < P; ++p) ids[p] = p;
        const std::vector<std::int64_t> moved = moelb::simulate_weight_moves(plan, ids);
        const auto old_row = old_loc.physical_to_logical().row(l);
        const auto new_row = new_loc.physical_to_logical().row(l);
        for (int p = 0; p < P; ++p) {
            ASSERT_TRUE(moved[p] >= 0 && moved[p] < P);
            EXPECT_EQ(old_row[moved[p]], new_row[p]) << "slot " << p;
            if (old_row[p] == new_row[p]) EXPECT_EQ(moved[p], p) << "slot " << p;
        }
    }
    // The random layers exercise every kind of move.
    if (W > 1) {
        EXPECT_GT(transfers, 0);
    } else {
        EXPECT_EQ(transfers, 0);
    }
    EXPECT_GT(copies, 0);
    EXPECT_GT(unchanged, 0);
    if (c.num_nodes > 1) EXPECT_GT(inter, 0);
}

INSTANTIATE_TEST_SUITE_P(
    Transitions, WeightMoveRules,
    ::testing::Values(MoveCase{"w8_n2_s4_e20", 8, 2, 4, 20, 8, 1},
                      MoveCase{"w4_n1_s3_e6", 4, 1, 3, 6, 8, 2},  // one node
                      MoveCase{"w16_n4_s3_e40", 16, 4, 3, 40, 8, 3},
                      MoveCase{"w6_n3_s2_e8", 6, 3, 2, 8, 12, 4},   // many replicas
                      MoveCase{"w4_n4_s5_e12", 4, 4, 5, 12, 8, 5},  // one rank per node
                      MoveCase{"w2_n1_s8_e4", 2, 1, 8, 4, 8, 6},    // heavy redundancy
                      MoveCase{"w12_n2_s2_e23", 12, 2, 2, 23, 8, 7},
                      MoveCase{"w16_n2_s2_e5", 16, 2, 2, 5, 8, 10},     // many receivers each
                      MoveCase{"w32_n4_s9_e256", 32, 4, 9, 256, 4, 8},  // DeepSeek-V3 like
                      MoveCase{"w1_n1_s6_e4", 1, 1, 6, 4, 8, 9}),       // one rank: copies only
    [](const ::testing::TestParamInfo<MoveCase>& info) { return info.param.name; });

TEST(WeightMovePlan, ReachesAPlannedPlacementFromTheTrivialLayout) {
    moelb::test_util::Rng rng(21);
    RowMatrix<double> load(3, 32);
    for (Index l = 0; l < 3; ++l) {
        for (int e = 0; e < 32; ++e) {
            const double u = rng.uniform(0, 1);
            load(l, e) = 1000 * u * u * u;
        }
    }
    const ExpertLocation trivial = ExpertLocation::trivial(3, 32, 48, 8, 2);
    const moelb::Plan plan = moelb::rebalance(
        cmap(load), {.num_physical_experts = 48, .num_groups = 8, .num_nodes = 2, .ep_size = 8});
    ASSERT_EQ(plan.location.num_nodes(), 2);
    for (int l = 0; l < 3; ++l) {
        const WeightMovePlan moves = moelb::plan_weight_moves(trivial, plan.location, l);
        check_plan(trivial, plan.location, l, moves);
        EXPECT_EQ(moelb::simulate_weight_moves(moves, contents_of(trivial, l)),
                  contents_of(plan.location, l));
    }
}

// ------------------------------------------------------------------------------------------------
// Errors.

TEST(WeightMoveErrors, MismatchedLocationsAndBadLayer) {
    const ExpertLocation base = ExpertLocation::trivial(2, 8, 12, 4, 2);
    const ExpertLocation more_layers = ExpertLocation::trivial(3, 8, 12, 4, 2);
    const ExpertLocation more_slots = ExpertLocation::trivial(2, 8, 16, 4, 2);
    const ExpertLocation more_experts = ExpertLocation::trivial(2, 10, 12, 4, 2);
    const ExpertLocation other_ep_size = ExpertLocation::trivial(2, 8, 12, 6, 2);
    const ExpertLocation other_nodes = ExpertLocation::trivial(2, 8, 12, 4, 1);
    for (const ExpertLocation* other :
         {&more_layers, &more_slots, &more_experts, &other_ep_size, &other_nodes}) {
        expect_invalid_argument([&] { moelb::plan_weight_moves(base, *other, 0); },
                                "old and new locations differ in shape");
        expect_invalid_argument([&] { moelb::plan_weight_moves(*other, base, 0); },
                                "old and new locations differ in shape");
    }
    expect_invalid_argument([&] { moelb::plan_weight_moves(base, base, -1); }, "layer=-1");
    expect_invalid_argument([&] { moelb::plan_weight_moves(base, base, 2); }, "layer=2");
    const WeightMovePlan plan = moelb::plan_weight_moves(base, base, 0);
    expect_invalid_argument(
        [&] { moelb::simulate_weight_moves(plan, std::vector<std::int64_t>(11, 0)); },
        "contents has 11 slots");
}

// A plan records what it moves from and to and applies only there.
TEST(WeightMovePlanEnds, RecordsBothRowsAndRefusesAnyOtherPlacement) {
    const MoveCase c{"w4_n2_s3_e8", 4, 2, 3, 8, 2, 5};
    const auto [old_loc, new_loc] = random_transition(c);
    for (int l = 0; l < 2; ++l) {
        const WeightMovePlan plan = moelb::plan_weight_moves(old_loc, new_loc, l);
        const auto row = [](const ExpertLocation& loc, int layer) {
            const auto r = loc.physical_to_logical().row(layer);
            return std::vector<std::int32_t>(r.data(), r.data() + r.size());
        };
        EXPECT_EQ(plan.old_physical_to_logical, row(old_loc, l));
        EXPECT_EQ(plan.new_physical_to_logical, row(new_loc, l));
        EXPECT_NO_THROW(moelb::check_plan_placement(plan, old_loc, moelb::PlanEnd::kOld, "old"));
        EXPECT_NO_THROW(moelb::check_plan_placement(plan, new_loc, moelb::PlanEnd::kNew, "new"));
        // The new placement is not where the plan starts (the plan run twice), and vice versa.
        ASSERT_NE(row(old_loc, l), row(new_loc, l));
        expect_invalid_argument(
            [&] { moelb::check_plan_placement(plan, new_loc, moelb::PlanEnd::kOld, "location"); },
            "location is not the placement the plan moves from: in layer " + std::to_string(l));
        expect_invalid_argument(
            [&] { moelb::check_plan_placement(plan, old_loc, moelb::PlanEnd::kNew, "target"); },
            "target is not the placement the plan moves to");
        // The same transition planned twice has the same fingerprint; others differ.
        EXPECT_EQ(moelb::plan_fingerprint(plan),
                  moelb::plan_fingerprint(moelb::plan_weight_moves(old_loc, new_loc, l)));
        EXPECT_NE(moelb::plan_fingerprint(plan),
                  moelb::plan_fingerprint(moelb::plan_weight_moves(new_loc, old_loc, l)));
        EXPECT_NE(moelb::plan_fingerprint(plan),
                  moelb::plan_fingerprint(moelb::plan_weight_moves(old_loc, new_loc, 1 - l)));
    }
    const WeightMovePlan plan = moelb::plan_weight_moves(old_loc, new_loc, 1);
    for (const ExpertLocation& other :
         {ExpertLocation::trivial(1, 8, 12, 4, 2), ExpertLocation::trivial(2, 8, 24, 4, 2),
          ExpertLocation::trivial(2, 8, 12, 2, 2)}) {
        expect_invalid_argument(
            [&] { moelb::check_plan_placement(plan, other, moelb::PlanEnd::kOld, "location"); },
            "but the plan moves layer 1 of 12 slots on 4 ranks");
    }
}

// A plan whose two ends disagree is a broken invariant (moelb::Error), not bad input.
TEST(WeightMoveErrors, CorruptedPlansFailTheSimulation) {
    const MoveCase c{"w8_n2_s4_e20", 8, 2, 4, 20, 1, 11};
    const auto [old_loc, new_loc] = random_transition(c);
    const WeightMovePlan plan = moelb::plan_weight_moves(old_loc, new_loc, 0);
    const std::vector<std::int64_t> contents = contents_of(old_loc, 0);
    ASSERT_EQ(moelb::simulate_weight_moves(plan, contents), contents_of(new_loc, 0));
    auto find = [&](MoveKind kind) -> std::pair<int, std::size_t> {
        for (int r = 0; r < plan.ep_size; ++r) {
            for (std::size_t i = 0; i < plan.ops[r].size(); ++i) {
                if (plan.ops[r][i].kind == kind) return {r, i};
            }
        }
        return {-1, 0};
    };
    const auto [send_rank, send_index] = find(MoveKind::kSend);
    const auto [recv_rank, recv_index] = find(MoveKind::kRecv);
    ASSERT_GE(send_rank, 0);
    ASSERT_GE(recv_rank, 0);
    {
        WeightMovePlan broken = plan;  // a receive without its send
        broken.ops[send_rank].erase(broken.ops[send_rank].begin() + send_index);
        EXPECT_THROW(moelb::simulate_weight_moves(broken, contents), moelb::Error);
    }
    {
        WeightMovePlan broken = plan;  // a send nobody receives
        broken.ops[recv_rank].erase(broken.ops[recv_rank].begin() + recv_index);
        EXPECT_THROW(moelb::simulate_weight_moves(broken, contents), moelb::Error);
    }
    {
        WeightMovePlan broken = plan;  // a receive naming the wrong sender
        MoveOp& op = broken.ops[recv_rank][recv_index];
        op.peer = (op.peer + 1) % plan.ep_size == recv_rank ? (op.peer + 2) % plan.ep_size
                                                            : (op.peer + 1) % plan.ep_size;
        EXPECT_THROW(moelb::simulate_weight_moves(broken, contents), moelb::Error);
    }
    {
        WeightMovePlan broken = plan;  // a receive of another expert than was sent
        broken.ops[recv_rank][recv_index].expert =
            (broken.ops[recv_rank][recv_index].expert + 1) % 20;
        EXPECT_THROW(moelb::simulate_weight_moves(broken, contents), moelb::Error);
    }
}

}  // namespace
