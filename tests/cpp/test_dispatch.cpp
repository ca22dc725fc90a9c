// Dispatch models (dispatch.hpp): moelb_static's rules (own rank, then same node, then everywhere,
// each shared evenly), the per-token models, and dispatch_tokens. SGLang's tables are checked bit
// for bit against Python's random in tests/python/test_dispatch.py; here their invariants.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <limits>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "../../cpp/src/py_random.hpp"
#include "moelb/dispatch.hpp"
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
    std::vector<Index> offsets(static_cast<std::size_t>(loc.ep_size()) + 1, 0);
    for (int r = ep_rank + 1; r <= loc.ep_size(); ++r)
        offsets[static_cast<std::size_t>(r)] = ids.rows();
    if (ep_rank < 0 || ep_rank >= loc.ep_size()) {
        // An out-of-range rank goes through LayerDispatcher for its error.
        const LayerDispatcher d(loc, layer, ep_rank, algorithm, seed);
    }
    moelb::dispatch_tokens(loc, algorithm, layer, cmap(ids), offsets, seed, mmap(out));
    return out;
}

RowMatrix<std::int32_t> moelb_table(const ExpertLocation& loc, int ep_rank, std::uint64_t seed) {
    return moelb::dispatch_table(loc, DispatchAlgorithm::kMoelbStatic, ep_rank, seed);
}

TEST(DispatchNames, ParseAndPrint) {
    for (const auto a :
         {DispatchAlgorithm::kSglangStatic, DispatchAlgorithm::kSglangStaticRuntime,
          DispatchAlgorithm::kSglangDynamic, DispatchAlgorithm::kSglangDynamicRankInvariant,
          DispatchAlgorithm::kVllmHash, DispatchAlgorithm::kRoundRobin,
          DispatchAlgorithm::kEqualSplit, DispatchAlgorithm::kMoelbStatic}) {
        EXPECT_EQ(moelb::parse_dispatch_algorithm(moelb::to_string(a)), a);
    }
    EXPECT_EQ(moelb::parse_dispatch_algorithm("round_robin"), DispatchAlgorithm::kRoundRobin);
    expect_invalid_argument([] { moelb::parse_dispatch_algorithm("lp"); }, "dispatch='lp'");
    expect_invalid_argument([] { moelb::parse_dispatch_algorithm("dynamic", "ep_dispatch"); },
                            "ep_dispatch='dynamic'");
}

// ------------------------------------------------------------------------------------------------
// Static dispatch.

TEST(StaticDispatch, FourGpusTwoNodesExample) {
    // 4 ranks on 2 nodes, 8 slots (2 per rank); logical i at slots [2i, 2i + 1] (rank i).
    const ExpertLocation loc(matrix<std::int32_t>({{0, 0, 1, 1, 2, 2, 3, 3}}), 4, 4, 2);
    for (const std::uint64_t seed : {0ull, 1ull, 42ull, 977ull}) {
        std::vector<RowMatrix<std::int32_t>> t;
        for (int r = 0; r < 4; ++r) t.push_back(moelb_table(loc, r, seed));
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
        for (int r = 0; r < W; ++r) tables.push_back(moelb_table(loc, r, seed));
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
                    const int slot = moelb_table(loc, r, seed)(l, e);
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
        for (int r = 0; r < W; ++r) EXPECT_EQ(moelb_table(loc, r, seed), tables[r]);
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
    const RowMatrix<std::int32_t> base = moelb_table(loc, 0, 0);
    bool differs = false;
    for (std::uint64_t seed = 1; seed < 32 && !differs; ++seed) {
        differs = moelb_table(loc, 0, seed) != base;
    }
    EXPECT_TRUE(differs) << "32 seeds gave the same static table";
    // Ranks differ from one another (they spread over replicas).
    EXPECT_NE(moelb_table(loc, 0, 5), moelb_table(loc, 1, 5));
    // Without redundancy the seed does not matter.
    const ExpertLocation plain = ExpertLocation::trivial(2, 8, 8, 4, 2);
    for (int r = 0; r < 4; ++r) {
        EXPECT_EQ(moelb_table(plain, r, 1), moelb_table(plain, r, 99));
        for (int e = 0; e < 8; ++e) EXPECT_EQ(moelb_table(plain, r, 3)(1, e), e);
    }
}

TEST(StaticDispatch, TableRejectsBadRank) {
    const ExpertLocation loc = ExpertLocation::trivial(1, 4, 8, 4);
    expect_invalid_argument([&] { moelb_table(loc, 4, 0); }, "ep_rank=4");
    expect_invalid_argument([&] { moelb_table(loc, -1, 0); }, "ep_rank=-1");
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
    // The same slots on one node: a rank without a replica then keeps the whole list under
    // SGLang's collapse (no strict same-node subset), so sglang_dynamic draws among replicas.
    ExpertLocation flat_{loc_.physical_to_logical(), 6, 4, 1};
    RowMatrix<std::int32_t> ids_;  // logical ids in [-1, 6)
};

TEST_F(Dispatch, StaticUsesTheTable) {
    for (int rank = 0; rank < 4; ++rank) {
        const RowMatrix<std::int32_t> table = moelb_table(loc_, rank, 17);
        for (int layer = 0; layer < 2; ++layer) {
            const RowMatrix<std::int32_t> out =
                dispatch(loc_, ids_, layer, rank, DispatchAlgorithm::kMoelbStatic, 17);
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
    const RowMatrix<std::int32_t> a =
        dispatch(flat_, ids_, 1, 3, DispatchAlgorithm::kSglangDynamic, 5);
    const RowMatrix<std::int32_t> b =
        dispatch(flat_, ids_, 1, 3, DispatchAlgorithm::kSglangDynamic, 5);
    const RowMatrix<std::int32_t> other =
        dispatch(flat_, ids_, 1, 3, DispatchAlgorithm::kSglangDynamic, 6);
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
    const RowMatrix<std::int32_t> out =
        dispatch(flat_, ids, 1, 3, DispatchAlgorithm::kSglangDynamic, 3);
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
    for (const auto a : {DispatchAlgorithm::kMoelbStatic, DispatchAlgorithm::kSglangDynamic,
                         DispatchAlgorithm::kRoundRobin}) {
        // Expert 5 has the single slot 11 in layer 1.
        EXPECT_EQ(dispatch(loc_, ids, 1, 0, a, 9),
                  matrix<std::int32_t>({{-1, 11}, {11, -1}, {-1, -1}}))
            << moelb::to_string(a);
    }
}

TEST_F(Dispatch, InPlace) {
    RowMatrix<std::int32_t> ids = ids_;
    const RowMatrix<std::int32_t> want =
        dispatch(loc_, ids_, 0, 3, DispatchAlgorithm::kSglangDynamic, 2);
    const std::vector<Index> offsets{0, 0, 0, 0, ids.rows()};
    moelb::dispatch_tokens(loc_, DispatchAlgorithm::kSglangDynamic, 0, cmap(ids), offsets, 2,
                           mmap(ids));
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
        outs.push_back(dispatch(loc_, ids, 1, 2, DispatchAlgorithm::kSglangDynamic, 77));
        outs.push_back(dispatch(loc_, ids, 1, 2, DispatchAlgorithm::kRoundRobin, 0));
    }
    moelb::set_num_threads(0);
    for (std::size_t i = 2; i < outs.size(); ++i) EXPECT_EQ(outs[i], outs[i % 2]) << i;
}

TEST_F(Dispatch, Errors) {
    const RowMatrix<std::int32_t> bad_high = matrix<std::int32_t>({{0, 1}, {6, 0}});
    const RowMatrix<std::int32_t> bad_low = matrix<std::int32_t>({{0, -2}});
    for (const auto a : {DispatchAlgorithm::kMoelbStatic, DispatchAlgorithm::kSglangDynamic,
                         DispatchAlgorithm::kRoundRobin}) {
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
            const std::vector<Index> offsets{0, ids_.rows(), ids_.rows(), ids_.rows(), ids_.rows()};
            moelb::dispatch_tokens(loc_, DispatchAlgorithm::kMoelbStatic, 0, cmap(ids_), offsets, 0,
                                   mmap(out));
        },
        "out has shape");
}

TEST_F(Dispatch, LayerDispatcherMapsLikeDispatch) {
    const LayerDispatcher d(loc_, 1, 3, DispatchAlgorithm::kSglangDynamic, 8);
    EXPECT_EQ(d.layer(), 1);
    EXPECT_EQ(&d.location(), &loc_);
    const RowMatrix<std::int32_t> out =
        dispatch(loc_, ids_, 1, 3, DispatchAlgorithm::kSglangDynamic, 8);
    for (Index t = 0; t < ids_.rows(); ++t) {
        for (int c = 0; c < 4; ++c) {
            if (ids_(t, c) >= 0) {
                EXPECT_EQ(d.map(ids_(t, c), t, c), out(t, c));
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// SGLang's models: invariants (the bit-exact checks against Python's random are in pytest).

TEST(PyRandom, MatchesCPythonRandom42) {
    // random.Random(42).random() == 0.6394267984578837 (two 32-bit draws, 53 bits).
    moelb::detail::PyRandom rng(42);
    const std::uint32_t a = rng.genrand_uint32() >> 5, b = rng.genrand_uint32() >> 6;
    EXPECT_DOUBLE_EQ((a * 67108864.0 + b) * (1.0 / 9007199254740992.0), 0.6394267984578837);
}

TEST(SglangNearest, Rules) {
    // S = 2 slots per rank, 2 ranks per node: node 0 = slots 0..3, node 1 = slots 4..7.
    const std::vector<std::int32_t> one{5}, two{1, 6}, node1{6, 7}, mixed{2, 5, 7};
    EXPECT_EQ(moelb::sglang_nearest_replica(one, 0, 2, 2), 5);     // the only candidate
    EXPECT_EQ(moelb::sglang_nearest_replica(two, 0, 2, 2), 1);     // own GPU
    EXPECT_EQ(moelb::sglang_nearest_replica(two, 1, 2, 2), 1);     // own node, strict subset
    EXPECT_EQ(moelb::sglang_nearest_replica(two, 3, 2, 2), 6);     // own node (rank 3 = slots 6, 7)
    EXPECT_EQ(moelb::sglang_nearest_replica(node1, 3, 2, 2), 6);   // own GPU
    EXPECT_EQ(moelb::sglang_nearest_replica(node1, 2, 2, 2), -1);  // all on the node: not a subset
    EXPECT_EQ(moelb::sglang_nearest_replica(node1, 0, 2, 2), -1);  // none on the node
    EXPECT_EQ(moelb::sglang_nearest_replica(mixed, 2, 2, 2), 5);   // first of the node's {5, 7}
}

class SglangTables : public ::testing::TestWithParam<std::uint32_t> {};

TEST_P(SglangTables, EveryEntryIsAReplicaAndNearestWins) {
    const int L = 3, E = 12, P = 24, W = 8, N = 2;
    const ExpertLocation loc(random_layout(L, E, P, GetParam()), E, W, N);
    const int S = P / W;
    for (const auto a :
         {DispatchAlgorithm::kSglangStatic, DispatchAlgorithm::kSglangStaticRuntime}) {
        const RowMatrix<std::int32_t> all = moelb::dispatch_tables(loc, a);
        for (int r = 0; r < W; ++r) {
            const RowMatrix<std::int32_t> t = moelb::dispatch_table(loc, a, r);
            for (int l = 0; l < L; ++l) {
                for (int e = 0; e < E; ++e) {
                    const std::int32_t p = t(l, e);
                    EXPECT_EQ(all(r, l * E + e), p);
                    ASSERT_GE(p, 0);
                    EXPECT_EQ(loc.physical_to_logical()(l, p), e);
                    const std::int32_t near =
                        moelb::sglang_nearest_replica(loc.replicas(l, e), r, S, W / N);
                    if (near >= 0) EXPECT_EQ(p, near) << moelb::to_string(a);
                }
            }
        }
    }
}

TEST_P(SglangTables, FilePathCollapsesPerRank) {
    const int L = 2, E = 10, P = 20, W = 4, N = 2;
    const ExpertLocation loc(random_layout(L, E, P, GetParam()), E, W, N);
    for (int r = 0; r < W; ++r) {
        const RowMatrix<std::int32_t> lists = moelb::sglang_replica_lists(loc, {nullptr, 0, 0}, r);
        for (int l = 0; l < L; ++l) {
            for (int e = 0; e < E; ++e) {
                const auto reps = loc.replicas(l, e);
                const std::int32_t near = moelb::sglang_nearest_replica(reps, r, P / W, W / N);
                const Index row = static_cast<Index>(l) * E + e;
                if (near >= 0) {
                    EXPECT_EQ(lists(row, 0), near);
                    for (Index x = 1; x < lists.cols(); ++x) EXPECT_EQ(lists(row, x), -1);
                } else {
                    for (std::size_t x = 0; x < reps.size(); ++x)
                        EXPECT_EQ(lists(row, Index(x)), reps[x]);
                }
            }
        }
    }
}

INSTANTIATE_TEST_SUITE_P(Seeds, SglangTables, ::testing::Values(1u, 2u, 3u, 4u));

TEST(SglangTables, RuntimeOrderIsValidatedAndUsed) {
    // One layer, 2 experts, 4 slots on 4 ranks (1 node): expert 0 in slots 0 and 2.
    const ExpertLocation loc(matrix<std::int32_t>({{0, 1, 0, 1}}), 2, 4, 1);
    const RowMatrix<std::int32_t> good = matrix<std::int32_t>({{2, 0}, {3, 1}});
    const RowMatrix<std::int32_t> lists = moelb::sglang_replica_lists(loc, cmap(good), -1);
    EXPECT_EQ(lists, good);
    const RowMatrix<std::int32_t> bad = matrix<std::int32_t>({{2, 1}, {3, 1}});
    expect_invalid_argument([&] { moelb::sglang_replica_lists(loc, cmap(bad), -1); },
                            "replica_order[0, 0]");
    // Ranks 1 and 3 hold no replica of expert 0: the fair choice hands out slots 2 and 0 in an
    // order that depends on the list's order, never a slot of another expert.
    for (const auto& order : {good, RowMatrix<std::int32_t>(loc.logical_to_physical())}) {
        const RowMatrix<std::int32_t> t =
            moelb::dispatch_tables(loc, DispatchAlgorithm::kSglangStaticRuntime, 0, cmap(order));
        EXPECT_EQ(t(0, 0), 0);
        EXPECT_EQ(t(2, 0), 2);
        std::set<int> handed{t(1, 0), t(3, 0)};
        EXPECT_EQ(handed, (std::set<int>{0, 2}));
    }
}

TEST(DispatchTokens, RowsFollowTheirSourceRank) {
    const int L = 1, E = 8, P = 16, W = 4;
    const ExpertLocation loc(random_layout(L, E, P, 9), E, W, 2);
    std::mt19937 gen(5);
    RowMatrix<std::int32_t> ids(40, 3);
    for (Index t = 0; t < ids.rows(); ++t) {
        for (int c = 0; c < 3; ++c) ids(t, c) = static_cast<std::int32_t>(gen() % E);
    }
    const std::vector<Index> offsets{0, 7, 7, 25, 40};
    for (const auto a :
         {DispatchAlgorithm::kSglangStatic, DispatchAlgorithm::kSglangStaticRuntime,
          DispatchAlgorithm::kSglangDynamic, DispatchAlgorithm::kSglangDynamicRankInvariant,
          DispatchAlgorithm::kVllmHash, DispatchAlgorithm::kRoundRobin,
          DispatchAlgorithm::kMoelbStatic}) {
        RowMatrix<std::int32_t> out(ids.rows(), 3);
        moelb::dispatch_tokens(loc, a, 0, cmap(ids), offsets, 3, mmap(out));
        for (int r = 0; r < W; ++r) {
            const LayerDispatcher d(loc, 0, r, a, 3);
            for (Index t = offsets[r]; t < offsets[r + 1]; ++t) {
                const Index row =
                    a == DispatchAlgorithm::kSglangDynamicRankInvariant ? t : t - offsets[r];
                for (int c = 0; c < 3; ++c) {
                    EXPECT_EQ(out(t, c), d.map(ids(t, c), row, c)) << moelb::to_string(a);
                    EXPECT_EQ(loc.physical_to_logical()(0, out(t, c)), ids(t, c));
                }
            }
        }
    }
    // vLLM's hash and the rank-invariant row pick, by their formulas.
    RowMatrix<std::int32_t> out(ids.rows(), 3);
    moelb::dispatch_tokens(loc, DispatchAlgorithm::kVllmHash, 0, cmap(ids), offsets, 0, mmap(out));
    for (Index t = 25; t < 40; ++t) {
        const auto reps = loc.replicas(0, ids(t, 0));
        const std::uint64_t h =
            (static_cast<std::uint64_t>(t - 25) * 2654435769ull) & 0xFFFFFFFFull;
        EXPECT_EQ(out(t, 0), reps[h % reps.size()]);
    }
    expect_invalid_argument(
        [&] {
            moelb::dispatch_tokens(loc, DispatchAlgorithm::kEqualSplit, 0, cmap(ids), offsets, 0,
                                   mmap(out));
        },
        "equal_split");
    const std::vector<Index> short_offsets{0, 40};
    expect_invalid_argument(
        [&] {
            moelb::dispatch_tokens(loc, DispatchAlgorithm::kVllmHash, 0, cmap(ids), short_offsets,
                                   0, mmap(out));
        },
        "rank_offsets");
}

TEST(DispatchTokens, ABadIdLeavesAnAliasedInputUntouched) {
    const ExpertLocation loc = ExpertLocation::trivial(1, 8, 16, 4, 2);
    RowMatrix<std::int32_t> ids = RowMatrix<std::int32_t>::Constant(4096, 2, 3);
    ids(4095, 1) = 99;
    const RowMatrix<std::int32_t> before = ids;
    const std::vector<Index> offsets{0, 1024, 2048, 3072, 4096};
    expect_invalid_argument(
        [&] {
            moelb::dispatch_tokens(loc, DispatchAlgorithm::kRoundRobin, 0, cmap(ids), offsets, 0,
                                   mmap(ids));
        },
        "topk_ids[4095, 1] = 99");
    EXPECT_EQ(ids, before);
}

TEST(DispatchTokens, RoundRobinOnHugeRowsIsTheFormula) {
    // Expert 1 has replicas at slots 1 and 9 (P = 16, E = 8).
    const ExpertLocation loc = ExpertLocation::trivial(1, 8, 16, 4, 2);
    const LayerDispatcher d(loc, 0, 3, DispatchAlgorithm::kRoundRobin, 0);
    const Index big = std::numeric_limits<Index>::max();
    EXPECT_EQ(d.map(1, big, 0), (big % 2 + 3) % 2 == 0 ? 1 : 9);
}

}  // namespace
