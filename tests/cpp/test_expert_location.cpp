// ExpertLocation and dispatch (expert_location.hpp): layouts, derived tables, validation, the
// static-dispatch rules (own rank, then same node, then everywhere, each shared evenly), and the
// static / random / round-robin dispatch of logical ids.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "moelb/errors.hpp"
#include "moelb/expert_location.hpp"
#include "moelb/parallel.hpp"
#include "test_util.hpp"

namespace {

using namespace moelb::test_util;

using moelb::ConstMatrixMap;
using moelb::DispatchAlgorithm;
using moelb::ExpertLocation;
using moelb::Index;
using moelb::InvalidArgument;
using moelb::LayerDispatcher;
using moelb::MatrixMap;
using moelb::RowMatrix;

RowMatrix<std::int32_t> dispatch(const ExpertLocation& loc, const RowMatrix<std::int32_t>& ids,
                                 int layer, int ep_rank, DispatchAlgorithm algorithm,
                                 std::uint64_t seed) {
    RowMatrix<std::int32_t> out = RowMatrix<std::int32_t>::Constant(ids.rows(), ids.cols(), -99);
    loc.dispatch(cmap(ids), layer, ep_rank, algorithm, seed, mmap(out));
    return out;
}

// A random layout: every expert gets one slot, the other slots random experts, then the slots of
// each layer are shuffled.
RowMatrix<std::int32_t> random_layout(int L, int E, int P, std::uint32_t seed) {
    std::mt19937 gen(seed);
    RowMatrix<std::int32_t> map(L, P);
    for (int l = 0; l < L; ++l) {
        std::vector<std::int32_t> row(static_cast<std::size_t>(P));
        for (int p = 0; p < P; ++p) row[p] = p < E ? p : static_cast<std::int32_t>(gen() % E);
        for (int p = P - 1; p > 0; --p) std::swap(row[p], row[gen() % (p + 1)]);
        for (int p = 0; p < P; ++p) map(l, p) = row[p];
    }
    return map;
}

// ------------------------------------------------------------------------------------------------
// Layout and derived tables.

TEST(ExpertLocation, TrivialLayout) {
    const int L = 3, E = 8, P = 20, W = 4, N = 2;
    const ExpertLocation loc = ExpertLocation::trivial(L, E, P, W, N);
    EXPECT_EQ(loc.num_layers(), L);
    EXPECT_EQ(loc.num_logical_experts(), E);
    EXPECT_EQ(loc.num_physical_experts(), P);
    EXPECT_EQ(loc.ep_size(), W);
    EXPECT_EQ(loc.num_nodes(), N);
    EXPECT_EQ(loc.num_local_physical_experts(), 5);
    EXPECT_EQ(loc.ranks_per_node(), 2);
    // 20 slots over 8 experts: experts 0..3 have 3 replicas, 4..7 have 2.
    EXPECT_EQ(loc.max_replicas(), 3);
    ASSERT_EQ(loc.logical_to_physical().rows(), L * E);
    ASSERT_EQ(loc.logical_to_physical().cols(), 3);
    for (int l = 0; l < L; ++l) {
        for (int p = 0; p < P; ++p) EXPECT_EQ(loc.physical_to_logical()(l, p), p % E);
        for (int e = 0; e < E; ++e) {
            const int count = e < 4 ? 3 : 2;
            EXPECT_EQ(loc.logical_count()(l, e), count);
            for (int x = 0; x < 3; ++x) {
                EXPECT_EQ(loc.logical_to_physical()(l * E + e, x), x < count ? e + x * E : -1);
            }
            const auto reps = loc.replicas(l, e);
            ASSERT_EQ(static_cast<int>(reps.size()), count);
            for (int x = 0; x < count; ++x) EXPECT_EQ(reps[x], e + x * E);
        }
    }
    for (int p = 0; p < P; ++p) EXPECT_EQ(loc.rank_of_slot(p), p / 5);
    for (int r = 0; r < W; ++r) EXPECT_EQ(loc.node_of_rank(r), r / 2);
}

TEST(ExpertLocation, TrivialWithoutRedundancyIsIdentity) {
    const ExpertLocation loc = ExpertLocation::trivial(1, 16, 16, 4);
    EXPECT_EQ(loc.max_replicas(), 1);
    EXPECT_EQ(loc.num_nodes(), 1);
    for (int e = 0; e < 16; ++e) {
        EXPECT_EQ(loc.logical_to_physical()(e, 0), e);
        EXPECT_EQ(loc.logical_count()(0, e), 1);
    }
}

TEST(ExpertLocation, DerivedTablesOfCustomLayout) {
    const int L = 4, E = 6, P = 12;
    const RowMatrix<std::int32_t> p2l = random_layout(L, E, P, 3);
    const ExpertLocation loc(p2l, E, 3, 1);
    EXPECT_EQ(loc.physical_to_logical(), p2l);
    // Independent derivation: collect slots per (layer, expert) in slot order.
    std::vector<std::vector<int>> slots(static_cast<std::size_t>(L * E));
    for (int l = 0; l < L; ++l) {
        for (int p = 0; p < P; ++p) slots[static_cast<std::size_t>(l * E + p2l(l, p))].push_back(p);
    }
    std::size_t widest = 0;
    for (const auto& s : slots) widest = std::max(widest, s.size());
    EXPECT_EQ(loc.max_replicas(), static_cast<int>(widest));
    ASSERT_EQ(loc.logical_to_physical().cols(), static_cast<Index>(widest));
    int total = 0;
    for (int l = 0; l < L; ++l) {
        int layer_total = 0;
        for (int e = 0; e < E; ++e) {
            const auto& want = slots[static_cast<std::size_t>(l * E + e)];
            EXPECT_EQ(loc.logical_count()(l, e), static_cast<int>(want.size()));
            EXPECT_GE(loc.logical_count()(l, e), 1);
            layer_total += loc.logical_count()(l, e);
            for (std::size_t x = 0; x < widest; ++x) {
                EXPECT_EQ(loc.logical_to_physical()(l * E + e, static_cast<Index>(x)),
                          x < want.size() ? want[x] : -1);
            }
        }
        EXPECT_EQ(layer_total, P);  // replica counts sum to P
        total += layer_total;
    }
    EXPECT_EQ(total, L * P);
}

TEST(ExpertLocation, Equality) {
    const ExpertLocation a = ExpertLocation::trivial(2, 4, 8, 2);
    EXPECT_TRUE(a == ExpertLocation::trivial(2, 4, 8, 2));
    EXPECT_FALSE(a == ExpertLocation::trivial(2, 4, 8, 4));
    EXPECT_FALSE(a == ExpertLocation::trivial(2, 4, 8, 2, 2));
    EXPECT_FALSE(a == ExpertLocation::trivial(1, 4, 8, 2));
    RowMatrix<std::int32_t> p2l = a.physical_to_logical();
    std::swap(p2l(1, 0), p2l(1, 1));
    EXPECT_FALSE(a == ExpertLocation(p2l, 4, 2));
}

TEST(ExpertLocation, ParseDispatchAlgorithm) {
    for (const auto a :
         {DispatchAlgorithm::kStatic, DispatchAlgorithm::kRandom, DispatchAlgorithm::kRoundRobin}) {
        EXPECT_EQ(moelb::parse_dispatch_algorithm(moelb::to_string(a)), a);
    }
    EXPECT_EQ(moelb::parse_dispatch_algorithm("round_robin"), DispatchAlgorithm::kRoundRobin);
    expect_invalid_argument([] { moelb::parse_dispatch_algorithm("lp"); }, "dispatch='lp'");
    expect_invalid_argument([] { moelb::parse_dispatch_algorithm("dynamic", "ep_dispatch"); },
                            "ep_dispatch='dynamic'");
}

// ------------------------------------------------------------------------------------------------
// Validation.

struct ErrorCase {
    std::string name;
    std::function<void()> call;
    std::string needle;
};

std::vector<ErrorCase> location_errors() {
    return {
        {"id_too_large",
         [] {
             ExpertLocation(matrix<std::int32_t>({{0, 1, 2, 4}}), 4, 1);
         },
         "physical_to_logical[0, 3] = 4"},
        {"id_negative",
         [] {
             ExpertLocation(matrix<std::int32_t>({{0, 1, 2, 3}, {0, -1, 2, 3}}), 4, 1);
         },
         "physical_to_logical[1, 1] = -1"},
        {"expert_without_replica",
         [] {
             ExpertLocation(matrix<std::int32_t>({{0, 1, 2, 3}, {0, 1, 1, 3}}), 4, 2);
         },
         "logical expert 2 has no replica in layer 1"},
        {"slots_not_divisible_by_ep_size",
         [] {
             ExpertLocation(matrix<std::int32_t>({{0, 1, 2, 3, 0, 1}}), 4, 4);
         },
         "ep_size=4"},
        {"ep_size_not_divisible_by_num_nodes",
         [] {
             ExpertLocation(matrix<std::int32_t>({{0, 1, 2, 3, 0, 1}}), 4, 3, 2);
         },
         "num_nodes=2"},
        {"fewer_slots_than_experts",
         [] {
             ExpertLocation(matrix<std::int32_t>({{0, 1, 2}}), 4, 1);
         },
         "num_physical_experts=3"},
        {"no_layers", [] { ExpertLocation(RowMatrix<std::int32_t>(0, 4), 4, 1); },
         "physical_to_logical"},
        {"no_logical_experts",
         [] {
             ExpertLocation(matrix<std::int32_t>({{0, 0}}), 0, 1);
         },
         "num_logical_experts"},
        {"ep_size_zero",
         [] {
             ExpertLocation(matrix<std::int32_t>({{0, 1}}), 2, 0);
         },
         "ep_size"},
        {"num_nodes_zero",
         [] {
             ExpertLocation(matrix<std::int32_t>({{0, 1}}), 2, 1, 0);
         },
         "num_nodes"},
        {"trivial_no_layers", [] { ExpertLocation::trivial(0, 4, 4, 1); }, "num_layers"},
        {"trivial_fewer_slots", [] { ExpertLocation::trivial(1, 8, 6, 2); },
         "num_physical_experts=6"},
        {"trivial_not_divisible", [] { ExpertLocation::trivial(1, 8, 10, 4); }, "ep_size=4"},
        {"trivial_nodes_not_dividing", [] { ExpertLocation::trivial(1, 8, 12, 4, 3); },
         "num_nodes=3"},
    };
}

class ExpertLocationErrors : public ::testing::TestWithParam<ErrorCase> {};

TEST_P(ExpertLocationErrors, ThrowsInvalidArgumentNamingTheParameter) {
    EXPECT_THROW(GetParam().call(), InvalidArgument);
    expect_invalid_argument(GetParam().call, GetParam().needle);
}

INSTANTIATE_TEST_SUITE_P(Cases, ExpertLocationErrors, ::testing::ValuesIn(location_errors()),
                         [](const ::testing::TestParamInfo<ErrorCase>& info) {
                             return info.param.name;
                         });

// ------------------------------------------------------------------------------------------------
// Static dispatch.

TEST(StaticDispatch, FourGpusTwoNodesExample) {
    // 4 ranks on 2 nodes, 8 slots (2 per rank); logical i at slots [2i, 2i + 1] (rank i).
    const ExpertLocation loc(matrix<std::int32_t>({{0, 0, 1, 1, 2, 2, 3, 3}}), 4, 4, 2);
    for (const std::uint64_t seed : {0ull, 1ull, 42ull, 977ull}) {
        std::vector<RowMatrix<std::int32_t>> t;
        for (int r = 0; r < 4; ++r) t.push_back(loc.static_dispatch_table(r, seed));
        // Own rank first, the lowest slot on it.
        for (int r = 0; r < 4; ++r) EXPECT_EQ(t[r](0, r), 2 * r) << "seed " << seed;
        // Rank 0 uses a replica of expert 1 on its node (rank 1's slots 2, 3); rank 1 likewise
        // for expert 0; ranks 2 and 3 for each other's experts.
        for (int r = 0; r < 4; ++r) {
            const int buddy = r ^ 1;
            const int slot = t[r](0, buddy);
            EXPECT_TRUE(slot == 2 * buddy || slot == 2 * buddy + 1) << "rank " << r;
        }
        // Experts on the other node: the two ranks of a node share its two replicas, one each.
        for (int e = 0; e < 4; ++e) {
            const int a = 2 * (1 - e / 2), b = a + 1;  // the two ranks of the other node
            std::set<int> used = {t[a](0, e), t[b](0, e)};
            EXPECT_EQ(used, (std::set<int>{2 * e, 2 * e + 1}))
                << "expert " << e << " seed " << seed;
        }
    }
}

struct StaticCase {
    const char* name;
    int num_layers, num_experts, ep_size, num_nodes, slots_per_rank;
    std::uint32_t layout_seed;
};

class StaticDispatchRules : public ::testing::TestWithParam<StaticCase> {};

TEST_P(StaticDispatchRules, OwnRankThenNodeThenAnywhereEvenly) {
    const StaticCase c = GetParam();
    const int P = c.ep_size * c.slots_per_rank, W = c.ep_size;
    const ExpertLocation loc(random_layout(c.num_layers, c.num_experts, P, c.layout_seed),
                             c.num_experts, W, c.num_nodes);
    const int S = c.slots_per_rank, rpn = W / c.num_nodes;
    auto rank_of = [&](int p) { return p / S; };
    auto node_of = [&](int r) { return r / rpn; };
    int cases_seen[3] = {0, 0, 0};
    for (const std::uint64_t seed : {0ull, 7ull, 123456789ull}) {
        std::vector<RowMatrix<std::int32_t>> tables;
        for (int r = 0; r < W; ++r) tables.push_back(loc.static_dispatch_table(r, seed));
        for (int l = 0; l < c.num_layers; ++l) {
            for (int e = 0; e < c.num_experts; ++e) {
                std::vector<int> reps;
                for (int p = 0; p < P; ++p) {
                    if (loc.physical_to_logical()(l, p) == e) reps.push_back(p);
                }
                // Serving counts per candidate: node-local case per node, global case.
                std::map<int, std::map<int, int>> node_serves;  // node -> slot -> ranks
                std::map<int, int> global_serves;
                std::map<int, int> node_case_ranks;
                int global_case_ranks = 0;
                for (int r = 0; r < W; ++r) {
                    const int slot = loc.static_dispatch_slot(l, e, r, seed);
                    ASSERT_EQ(tables[r](l, e), slot);
                    ASSERT_GE(slot, 0);
                    ASSERT_LT(slot, P);
                    ASSERT_EQ(loc.physical_to_logical()(l, slot), e)
                        << "rank " << r << " uses a slot of another expert";
                    std::vector<int> own, node;
                    for (const int p : reps) {
                        if (rank_of(p) == r) own.push_back(p);
                        if (node_of(rank_of(p)) == node_of(r)) node.push_back(p);
                    }
                    if (!own.empty()) {
                        ++cases_seen[0];
                        EXPECT_EQ(slot, own.front()) << "rank " << r << " expert " << e;
                    } else if (!node.empty()) {
                        ++cases_seen[1];
                        EXPECT_EQ(node_of(rank_of(slot)), node_of(r))
                            << "rank " << r << " expert " << e << ": replica off the node";
                        ++node_serves[node_of(r)][slot];
                        ++node_case_ranks[node_of(r)];
                    } else {
                        ++cases_seen[2];
                        ++global_serves[slot];
                        ++global_case_ranks;
                    }
                }
                // Evenness: every candidate serves floor or ceil of ranks / candidates.
                for (const auto& [node, serves] : node_serves) {
                    std::vector<int> candidates;
                    for (const int p : reps) {
                        if (node_of(rank_of(p)) == node) candidates.push_back(p);
                    }
                    const int m = node_case_ranks[node], n = static_cast<int>(candidates.size());
                    for (const int p : candidates) {
                        const int served = serves.count(p) ? serves.at(p) : 0;
                        EXPECT_TRUE(served == m / n || served == (m + n - 1) / n)
                            << "node " << node << " slot " << p << " serves " << served << " of "
                            << m << " ranks over " << n << " replicas";
                    }
                }
                if (global_case_ranks > 0) {
                    const int m = global_case_ranks, n = static_cast<int>(reps.size());
                    for (const int p : reps) {
                        const int served = global_serves.count(p) ? global_serves.at(p) : 0;
                        EXPECT_TRUE(served == m / n || served == (m + n - 1) / n)
                            << "slot " << p << " serves " << served << " of " << m << " ranks over "
                            << n << " replicas";
                    }
                }
            }
        }
        // Same seed, same table.
        for (int r = 0; r < W; ++r) EXPECT_EQ(loc.static_dispatch_table(r, seed), tables[r]);
    }
    // The layouts are chosen so the interesting cases occur.
    EXPECT_GT(cases_seen[0], 0);
    if (c.num_nodes > 1 || W > 1) {
        EXPECT_GT(cases_seen[1] + cases_seen[2], 0);
    }
}

INSTANTIATE_TEST_SUITE_P(
    Layouts, StaticDispatchRules,
    ::testing::Values(StaticCase{"w8_n2_s5_e32", 3, 32, 8, 2, 5, 1},
                      StaticCase{"w16_n4_s3_e40", 2, 40, 16, 4, 3, 2},
                      StaticCase{"w6_n3_s2_e8", 4, 8, 6, 3, 2, 3},  // many replicas
                      StaticCase{"w12_n2_s2_e23", 2, 23, 12, 2, 2, 4},
                      StaticCase{"w5_n1_s4_e12", 2, 12, 5, 1, 4, 5},  // one node
                      StaticCase{"w4_n4_s3_e9", 2, 9, 4, 4, 3, 6}),   // one rank per node
    [](const ::testing::TestParamInfo<StaticCase>& info) { return info.param.name; });

TEST(StaticDispatch, SeedsCanDiffer) {
    // Experts with replicas on another node only: their choice depends on the seed.
    const ExpertLocation loc(matrix<std::int32_t>({{0, 0, 1, 1, 2, 2, 3, 3}}), 4, 4, 2);
    const RowMatrix<std::int32_t> base = loc.static_dispatch_table(0, 0);
    bool differs = false;
    for (std::uint64_t seed = 1; seed < 32 && !differs; ++seed) {
        differs = loc.static_dispatch_table(0, seed) != base;
    }
    EXPECT_TRUE(differs) << "32 seeds gave the same static table";
    // Ranks differ from one another (they spread over replicas).
    EXPECT_NE(loc.static_dispatch_table(0, 5), loc.static_dispatch_table(1, 5));
    // Without redundancy the seed does not matter.
    const ExpertLocation plain = ExpertLocation::trivial(2, 8, 8, 4, 2);
    for (int r = 0; r < 4; ++r) {
        EXPECT_EQ(plain.static_dispatch_table(r, 1), plain.static_dispatch_table(r, 99));
        for (int e = 0; e < 8; ++e) EXPECT_EQ(plain.static_dispatch_table(r, 3)(1, e), e);
    }
}

TEST(StaticDispatch, TableRejectsBadRank) {
    const ExpertLocation loc = ExpertLocation::trivial(1, 4, 8, 4);
    expect_invalid_argument([&] { loc.static_dispatch_table(4, 0); }, "ep_rank=4");
    expect_invalid_argument([&] { loc.static_dispatch_table(-1, 0); }, "ep_rank=-1");
}

TEST(StaticDispatch, SlotRejectsOutOfRangeArguments) {
    const ExpertLocation loc = ExpertLocation::trivial(2, 4, 8, 4);
    expect_invalid_argument([&] { loc.static_dispatch_slot(2, 0, 0, 0); }, "layer=2");
    expect_invalid_argument([&] { loc.static_dispatch_slot(0, 4, 0, 0); }, "expert");
    expect_invalid_argument([&] { loc.static_dispatch_slot(0, 0, 4, 0); }, "ep_rank=4");
}

// ------------------------------------------------------------------------------------------------
// dispatch().

class Dispatch : public ::testing::Test {
  protected:
    // 2 layers, E = 6 in P = 12 slots on W = 4 ranks (S = 3), 2 nodes. Layer 1 gives expert 0
    // three replicas, expert 5 one.
    Dispatch()
        : loc_(matrix<std::int32_t>(
                   {{0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5}, {0, 1, 2, 0, 3, 4, 1, 2, 0, 3, 4, 5}}),
               6, 4, 2) {
        std::mt19937 gen(4);
        ids_ = RowMatrix<std::int32_t>(300, 4);
        for (Index t = 0; t < ids_.rows(); ++t) {
            for (int c = 0; c < 4; ++c) ids_(t, c) = static_cast<std::int32_t>(gen() % 7) - 1;
        }
    }
    ExpertLocation loc_;
    RowMatrix<std::int32_t> ids_;  // logical ids in [-1, 6)
};

TEST_F(Dispatch, StaticUsesTheTable) {
    for (int rank = 0; rank < 4; ++rank) {
        const RowMatrix<std::int32_t> table = loc_.static_dispatch_table(rank, 17);
        for (int layer = 0; layer < 2; ++layer) {
            const RowMatrix<std::int32_t> out =
                dispatch(loc_, ids_, layer, rank, DispatchAlgorithm::kStatic, 17);
            for (Index t = 0; t < ids_.rows(); ++t) {
                for (int c = 0; c < 4; ++c) {
                    const int e = ids_(t, c);
                    EXPECT_EQ(out(t, c), e < 0 ? -1 : table(layer, e));
                }
            }
        }
    }
}

TEST_F(Dispatch, RandomPicksReplicasDeterministically) {
    const RowMatrix<std::int32_t> a = dispatch(loc_, ids_, 1, 2, DispatchAlgorithm::kRandom, 5);
    const RowMatrix<std::int32_t> b = dispatch(loc_, ids_, 1, 2, DispatchAlgorithm::kRandom, 5);
    const RowMatrix<std::int32_t> other = dispatch(loc_, ids_, 1, 2, DispatchAlgorithm::kRandom, 6);
    EXPECT_EQ(a, b);
    EXPECT_NE(a, other);
    for (Index t = 0; t < ids_.rows(); ++t) {
        for (int c = 0; c < 4; ++c) {
            const int e = ids_(t, c);
            if (e < 0) {
                EXPECT_EQ(a(t, c), -1);
            } else {
                ASSERT_GE(a(t, c), 0);
                EXPECT_EQ(loc_.physical_to_logical()(1, a(t, c)), e) << "row " << t;
            }
        }
    }
}

TEST_F(Dispatch, RandomIsRoughlyUniformOverReplicas) {
    // Expert 0 of layer 1 has replicas at slots 0, 3 and 8.
    const Index T = 6000;
    RowMatrix<std::int32_t> ids = RowMatrix<std::int32_t>::Zero(T, 5);
    const RowMatrix<std::int32_t> out = dispatch(loc_, ids, 1, 1, DispatchAlgorithm::kRandom, 3);
    std::map<int, int> counts;
    for (Index t = 0; t < T; ++t) {
        for (int c = 0; c < 5; ++c) ++counts[out(t, c)];
    }
    ASSERT_EQ(counts.size(), 3u);
    for (const int slot : {0, 3, 8}) {
        // 30000 draws, expected 10000 each; 5 % is about six standard deviations.
        EXPECT_NEAR(counts[slot], 10000, 500) << "slot " << slot;
    }
    // Every column varies across tokens (the choice is per token slot, not per expert).
    for (int c = 0; c < 5; ++c) {
        std::set<int> seen;
        for (Index t = 0; t < 50; ++t) seen.insert(out(t, c));
        EXPECT_EQ(seen.size(), 3u) << "column " << c;
    }
}

TEST_F(Dispatch, RoundRobinByTokenAndRank) {
    for (int rank = 0; rank < 4; ++rank) {
        const RowMatrix<std::int32_t> out =
            dispatch(loc_, ids_, 1, rank, DispatchAlgorithm::kRoundRobin, 0);
        for (Index t = 0; t < ids_.rows(); ++t) {
            for (int c = 0; c < 4; ++c) {
                const int e = ids_(t, c);
                if (e < 0) {
                    EXPECT_EQ(out(t, c), -1);
                    continue;
                }
                std::vector<int> reps;  // ascending slots of e in layer 1
                for (int p = 0; p < 12; ++p) {
                    if (loc_.physical_to_logical()(1, p) == e) reps.push_back(p);
                }
                EXPECT_EQ(out(t, c), reps[static_cast<std::size_t>(t + rank) % reps.size()]);
            }
        }
    }
}

TEST_F(Dispatch, MinusOneStaysMinusOneAndSingleReplicaIsFixed) {
    const RowMatrix<std::int32_t> ids = matrix<std::int32_t>({{-1, 5}, {5, -1}, {-1, -1}});
    for (const auto a :
         {DispatchAlgorithm::kStatic, DispatchAlgorithm::kRandom, DispatchAlgorithm::kRoundRobin}) {
        // Expert 5 has the single slot 11 in layer 1.
        EXPECT_EQ(dispatch(loc_, ids, 1, 0, a, 9),
                  matrix<std::int32_t>({{-1, 11}, {11, -1}, {-1, -1}}))
            << moelb::to_string(a);
    }
}

TEST_F(Dispatch, InPlace) {
    RowMatrix<std::int32_t> ids = ids_;
    const RowMatrix<std::int32_t> want = dispatch(loc_, ids_, 0, 3, DispatchAlgorithm::kRandom, 2);
    loc_.dispatch(cmap(ids), 0, 3, DispatchAlgorithm::kRandom, 2, mmap(ids));
    EXPECT_EQ(ids, want);
}

TEST_F(Dispatch, IdenticalForAnyThreadCount) {
    std::mt19937 gen(12);
    RowMatrix<std::int32_t> ids(5000, 8);
    for (Index t = 0; t < ids.rows(); ++t) {
        for (int c = 0; c < 8; ++c) ids(t, c) = static_cast<std::int32_t>(gen() % 6);
    }
    std::vector<RowMatrix<std::int32_t>> outs;
    for (const int threads : {1, 2, 4}) {
        moelb::set_num_threads(threads);
        outs.push_back(dispatch(loc_, ids, 1, 2, DispatchAlgorithm::kRandom, 77));
        outs.push_back(dispatch(loc_, ids, 1, 2, DispatchAlgorithm::kRoundRobin, 0));
    }
    moelb::set_num_threads(0);
    for (std::size_t i = 2; i < outs.size(); ++i) EXPECT_EQ(outs[i], outs[i % 2]) << i;
}

TEST_F(Dispatch, Errors) {
    const RowMatrix<std::int32_t> bad_high = matrix<std::int32_t>({{0, 1}, {6, 0}});
    const RowMatrix<std::int32_t> bad_low = matrix<std::int32_t>({{0, -2}});
    for (const auto a :
         {DispatchAlgorithm::kStatic, DispatchAlgorithm::kRandom, DispatchAlgorithm::kRoundRobin}) {
        expect_invalid_argument([&] { dispatch(loc_, bad_high, 0, 0, a, 0); },
                                "topk_ids[1, 0] = 6");
        expect_invalid_argument([&] { dispatch(loc_, bad_low, 0, 0, a, 0); },
                                "topk_ids[0, 1] = -2");
        expect_invalid_argument([&] { dispatch(loc_, ids_, 2, 0, a, 0); }, "layer=2");
        expect_invalid_argument([&] { dispatch(loc_, ids_, -1, 0, a, 0); }, "layer=-1");
        expect_invalid_argument([&] { dispatch(loc_, ids_, 0, 4, a, 0); }, "ep_rank=4");
        expect_invalid_argument([&] { dispatch(loc_, ids_, 0, -1, a, 0); }, "ep_rank=-1");
        expect_invalid_argument([&] { LayerDispatcher(loc_, 5, 0, a, 0); }, "layer=5");
    }
    expect_invalid_argument(
        [&] {
            RowMatrix<std::int32_t> out(ids_.rows(), 3);
            loc_.dispatch(cmap(ids_), 0, 0, DispatchAlgorithm::kStatic, 0, mmap(out));
        },
        "out has shape");
}

TEST_F(Dispatch, LayerDispatcherMapsLikeDispatch) {
    const LayerDispatcher d(loc_, 1, 3, DispatchAlgorithm::kRandom, 8);
    EXPECT_EQ(d.layer(), 1);
    EXPECT_EQ(&d.location(), &loc_);
    const RowMatrix<std::int32_t> out = dispatch(loc_, ids_, 1, 3, DispatchAlgorithm::kRandom, 8);
    for (Index t = 0; t < ids_.rows(); ++t) {
        for (int c = 0; c < 4; ++c) {
            if (ids_(t, c) >= 0) {
                EXPECT_EQ(d.map(ids_(t, c), t, c), out(t, c));
            }
        }
    }
}

}  // namespace
