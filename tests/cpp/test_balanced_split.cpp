// moelb's exact per-step split (dispatch.hpp: balanced_split, balanced_assignment): hand-made
// instances with a known optimum, random layouts against a brute-force Hall bound, conservation,
// replicas only, fixed loads, zero counts, thread-count independence and every error path. The
// LP optimum from an independent solver (scipy's HiGHS) and the least cost of the assignment are
// checked in tests/python/test_balanced_split.py.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include "moelb/dispatch.hpp"
#include "moelb/errors.hpp"
#include "moelb/expert_location.hpp"
#include "moelb/parallel.hpp"
#include "test_util.hpp"

namespace {

using namespace moelb::test_util;

using moelb::ConstMatrixMap;
using moelb::ExpertLocation;
using moelb::Index;
using moelb::MatrixMap;
using moelb::RowMatrix;

using Counts = RowMatrix<std::int64_t>;

const Counts kNoFixed;

Counts split(const ExpertLocation& loc, const Counts& counts, const Counts& fixed = kNoFixed,
             int layer = -1, moelb::SplitShares shares = moelb::SplitShares::kAny) {
    Counts out = Counts::Constant(counts.rows(), loc.num_physical_experts(), -7);
    moelb::balanced_split(loc, cmap(counts), cmap(fixed), mmap(out), layer, shares);
    return out;
}

Counts assign(const ExpertLocation& loc, const Counts& source_counts,
              const Counts& fixed = kNoFixed, int layer = -1) {
    Counts out = Counts::Constant(source_counts.rows(), loc.num_physical_experts(), -7);
    moelb::balanced_assignment(loc, cmap(source_counts), cmap(fixed), mmap(out), layer);
    return out;
}

// [W]: the rank loads of one row of slot tokens plus the fixed loads.
std::vector<std::int64_t> rank_loads(const ExpertLocation& loc, const std::int64_t* slots,
                                     const std::int64_t* fixed) {
    const int W = loc.ep_size(), S = loc.num_local_physical_experts();
    std::vector<std::int64_t> load(static_cast<std::size_t>(W), 0);
    for (int p = 0; p < loc.num_physical_experts(); ++p) load[p / S] += slots[p];
    if (fixed != nullptr) {
        for (int r = 0; r < W; ++r) load[r] += fixed[r];
    }
    return load;
}

std::int64_t max_load(const ExpertLocation& loc, const Counts& out, Index row, const Counts& fixed,
                      Index fixed_row) {
    const auto load = rank_loads(loc, out.data() + row * out.cols(),
                                 fixed.size() ? fixed.data() + fixed_row * fixed.cols() : nullptr);
    return *std::max_element(load.begin(), load.end());
}

std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

// ceil(T*) by brute force over every set X of experts spread over several ranks (dispatch.md
// section 7): max(max_r F_r, ceil((sum_X n + sum_{R(X)} F) / |R(X)|)), F_r the fixed load plus
// the experts whose replicas all sit on rank r.
std::int64_t brute_force_optimum(const ExpertLocation& loc, int layer, const std::int64_t* counts,
                                 const std::int64_t* fixed) {
    const int W = loc.ep_size(), S = loc.num_local_physical_experts();
    std::vector<std::int64_t> F(static_cast<std::size_t>(W), 0);
    if (fixed != nullptr) F.assign(fixed, fixed + W);
    std::vector<std::int64_t> n;
    std::vector<std::uint64_t> ranks;  // bit masks
    for (int e = 0; e < loc.num_logical_experts(); ++e) {
        if (counts[e] == 0) continue;
        std::uint64_t mask = 0;
        for (const int p : loc.replicas(layer, e)) mask |= std::uint64_t{1} << (p / S);
        if ((mask & (mask - 1)) == 0) {
            F[static_cast<std::size_t>(std::countr_zero(mask))] += counts[e];
        } else {
            n.push_back(counts[e]);
            ranks.push_back(mask);
        }
    }
    std::int64_t best = *std::max_element(F.begin(), F.end());
    const std::size_t k = n.size();
    EXPECT_LE(k, 16u) << "too many replicated experts for the brute force";
    for (std::uint64_t set = 1; set < (std::uint64_t{1} << k); ++set) {
        std::int64_t load = 0;
        std::uint64_t mask = 0;
        for (std::size_t i = 0; i < k; ++i) {
            if (set >> i & 1) {
                load += n[i];
                mask |= ranks[i];
            }
        }
        for (int r = 0; r < W; ++r) {
            if (mask >> r & 1) load += F[r];
        }
        best = std::max(best, ceil_div(load, std::popcount(mask)));
    }
    return best;
}

// Every expert's slots sum to its count, and no slot gets tokens of another expert.
void expect_conserved(const ExpertLocation& loc, int layer, const std::int64_t* counts,
                      const std::int64_t* slots) {
    std::vector<std::int64_t> got(static_cast<std::size_t>(loc.num_logical_experts()), 0);
    for (int p = 0; p < loc.num_physical_experts(); ++p) {
        ASSERT_GE(slots[p], 0) << "slot " << p;
        got[loc.physical_to_logical()(layer, p)] += slots[p];
    }
    for (int e = 0; e < loc.num_logical_experts(); ++e) {
        EXPECT_EQ(got[e], counts[e]) << "layer " << layer << " expert " << e;
    }
}

// ------------------------------------------------------------------------------------------------
// Hand-made instances with a known optimum.

struct HandCase {
    const char* name;
    std::vector<std::int32_t> physical_to_logical;  // one layer
    int num_experts, ep_size, num_nodes;
    std::vector<std::int64_t> counts, fixed;  // fixed empty = none
    std::int64_t optimum;
    std::vector<std::int64_t> slots;  // expected tokens per slot, empty = not unique
};

class BalancedSplitHand : public ::testing::TestWithParam<HandCase> {};

TEST_P(BalancedSplitHand, ReachesTheKnownOptimum) {
    const HandCase& c = GetParam();
    const ExpertLocation loc(matrix<std::int32_t>({c.physical_to_logical}), c.num_experts,
                             c.ep_size, c.num_nodes);
    const Counts counts = matrix<std::int64_t>({c.counts});
    const Counts fixed = c.fixed.empty() ? Counts() : matrix<std::int64_t>({c.fixed});
    const Counts out = split(loc, counts, fixed);
    expect_conserved(loc, 0, counts.data(), out.data());
    EXPECT_EQ(max_load(loc, out, 0, fixed, 0), c.optimum);
    EXPECT_EQ(brute_force_optimum(loc, 0, counts.data(), c.fixed.empty() ? nullptr : fixed.data()),
              c.optimum);
    if (!c.slots.empty()) {
        EXPECT_EQ(std::vector<std::int64_t>(out.data(), out.data() + out.size()), c.slots);
    }
    // One layer through `layer`: the same row.
    EXPECT_EQ(split(loc, counts, fixed, 0), out);
}

INSTANTIATE_TEST_SUITE_P(
    Instances, BalancedSplitHand,
    ::testing::Values(
        // One expert on two ranks: 7 tokens as 4 + 3.
        HandCase{"two_ranks_odd", {0, 0}, 1, 2, 1, {7}, {}, 4, {4, 3}},
        // The fixed load of rank 0 exceeds the rest: all tokens go to rank 1.
        HandCase{"fixed_dominates", {0, 1, 0, 2}, 3, 2, 1, {4, 0, 0}, {10, 0}, 10, {0, 0, 4, 0}},
        // Single-copy experts are fixed: expert 1 (8 tokens) on rank 0 pushes expert 0 to rank 1.
        HandCase{"single_copy_fixed", {0, 1, 0, 2}, 3, 2, 1, {6, 8, 1}, {}, 8, {0, 8, 6, 1}},
        // Two copies of expert 0 on rank 0 (slots 0, 1) and one on rank 1; rank 1 has 5 fixed:
        // T* = 14 / 2 = 7 exactly, so rank 0 takes 7 (4 + 3, lower slot first), rank 1 takes 2.
        HandCase{"copies_on_one_rank", {0, 0, 0, 1}, 2, 2, 1, {9, 0}, {0, 5}, 7, {4, 3, 2, 0}},
        // An expert whose replicas all sit on one rank is split over them evenly: 5 = 3 + 2.
        HandCase{"one_rank_two_slots", {0, 0, 1, 1}, 2, 2, 1, {5, 2}, {}, 5, {3, 2, 1, 1}},
        // All zero: no tokens anywhere.
        HandCase{"zero_counts", {0, 1, 0, 1}, 2, 2, 1, {0, 0}, {}, 0, {0, 0, 0, 0}},
        // Zero counts with fixed loads: the optimum is the largest fixed load.
        HandCase{"zero_counts_fixed", {0, 1, 0, 1}, 2, 2, 1, {0, 0}, {3, 9}, 9, {0, 0, 0, 0}},
        // A ring over 4 ranks on 2 nodes: expert 0 on ranks {0, 1}, 1 on {1, 2}, 2 on {2, 3},
        // 3 on {3, 0}; no subset is denser than the whole: ceil(50 / 4) = 13.
        HandCase{"ring", {0, 3, 0, 1, 1, 2, 2, 3}, 4, 4, 2, {10, 10, 10, 20}, {}, 13, {}},
        // The Hall set is not the whole graph: experts 0, 1 (60 tokens) share ranks {0, 1};
        // expert 2 (4 tokens) sits on ranks {2, 3}: optimum 60 / 2 = 30.
        HandCase{"hall_subset",
                 {0, 1, 0, 1, 2, 3, 2, 3},  // S = 2: ranks 0:{0,1} 1:{0,1} 2:{2,3} 3:{2,3}
                 4,
                 4,
                 1,
                 {31, 29, 4, 0},
                 {},
                 30,
                 {}},
        // A min-cut step: one connected component over 4 ranks (122 tokens, bound 31), no expert
        // denser alone (30), but experts 0 and 1 together hold 120 tokens on ranks {0, 1}: the
        // search starts at 31 and its residual source side raises it to 60.
        HandCase{"hall_step",
                 {0, 1, 4, 0, 1, 2, 2, 3, 5, 3, 6, 7},
                 8,
                 4,
                 2,
                 {60, 60, 1, 1, 0, 0, 0, 0},
                 {},
                 60,
                 {}},
        // Fractional LP optimum: 3 experts of 1 token on ranks {0, 1}: T* = 1.5, ceil 2.
        HandCase{"fractional", {0, 1, 2, 0, 1, 2}, 3, 2, 1, {1, 1, 1}, {}, 2, {}}),
    [](const ::testing::TestParamInfo<HandCase>& info) { return info.param.name; });

// ------------------------------------------------------------------------------------------------
// Random layouts against the brute-force optimum.

struct RandomCase {
    const char* name;
    int num_layers, num_experts, ep_size, num_nodes, slots_per_rank;
    std::int64_t max_count, max_fixed;  // max_fixed 0 = no fixed loads
    std::uint32_t seed;
};

class BalancedSplitRandom : public ::testing::TestWithParam<RandomCase> {};

TEST_P(BalancedSplitRandom, OptimalConservedReplicasOnly) {
    const RandomCase c = GetParam();
    const int W = c.ep_size, P = W * c.slots_per_rank, E = c.num_experts;
    const ExpertLocation loc(random_layout(c.num_layers, E, P, c.seed), E, W, c.num_nodes);
    Rng rng(c.seed + 100);
    for (int trial = 0; trial < 20; ++trial) {
        Counts counts(c.num_layers, E);
        for (Index i = 0; i < counts.size(); ++i) {
            // About a quarter of the experts get no tokens.
            counts.data()[i] =
                rng.below(4) == 0 ? 0 : rng.below(static_cast<std::uint32_t>(c.max_count) + 1);
        }
        Counts fixed;
        if (c.max_fixed > 0) {
            fixed.resize(c.num_layers, W);
            for (Index i = 0; i < fixed.size(); ++i) {
                fixed.data()[i] = rng.below(static_cast<std::uint32_t>(c.max_fixed) + 1);
            }
        }
        const Counts out = split(loc, counts, fixed);
        for (int l = 0; l < c.num_layers; ++l) {
            expect_conserved(loc, l, counts.data() + l * E, out.data() + l * P);
            const std::int64_t want = brute_force_optimum(
                loc, l, counts.data() + l * E, fixed.size() ? fixed.data() + l * W : nullptr);
            ASSERT_EQ(max_load(loc, out, l, fixed, l), want) << "trial " << trial << " layer " << l;
        }
        // Per-source counts: the assignment reaches the same optimum and conserves every source.
        Counts source(static_cast<Index>(c.num_layers) * W, E);
        for (int l = 0; l < c.num_layers; ++l) {
            for (int e = 0; e < E; ++e) {
                std::int64_t left = counts(l, e);
                for (int s = 0; s < W; ++s) {
                    const std::int64_t take =
                        s == W - 1 ? left
                                   : std::min<std::int64_t>(
                                         left, rng.below(static_cast<std::uint32_t>(left) + 1));
                    source(l * W + s, e) = take;
                    left -= take;
                }
            }
        }
        const Counts routed = assign(loc, source, fixed);
        for (int l = 0; l < c.num_layers; ++l) {
            std::vector<std::int64_t> slots(static_cast<std::size_t>(P), 0);
            for (int s = 0; s < W; ++s) {
                expect_conserved(loc, l, source.data() + (l * W + s) * E,
                                 routed.data() + (l * W + s) * P);
                for (int p = 0; p < P; ++p) slots[p] += routed(l * W + s, p);
            }
            const auto load =
                rank_loads(loc, slots.data(), fixed.size() ? fixed.data() + l * W : nullptr);
            EXPECT_EQ(*std::max_element(load.begin(), load.end()), max_load(loc, out, l, fixed, l))
                << "trial " << trial << " layer " << l;
        }
    }
}

INSTANTIATE_TEST_SUITE_P(
    Layouts, BalancedSplitRandom,
    ::testing::Values(RandomCase{"w4_n2_s3_e9", 3, 9, 4, 2, 3, 50, 0, 1},
                      RandomCase{"w4_n2_s3_e9_fixed", 3, 9, 4, 2, 3, 50, 40, 2},
                      RandomCase{"w8_n2_s2_e12_fixed", 2, 12, 8, 2, 2, 1000, 300, 3},
                      RandomCase{"w6_n3_s2_e8", 3, 8, 6, 3, 2, 20, 5, 4},   // many replicas
                      RandomCase{"w5_n1_s3_e11", 2, 11, 5, 1, 3, 7, 3, 5},  // tiny counts
                      RandomCase{"w3_n1_s4_e10_fixed", 2, 10, 3, 1, 4, 100000, 50000, 6},
                      RandomCase{"w4_n2_s4_e6_fixed", 3, 6, 4, 2, 4, 60, 30, 7}),  // dense
    [](const ::testing::TestParamInfo<RandomCase>& info) { return info.param.name; });

TEST(BalancedSplit, SameResultForAnyThreadCount) {
    const int L = 24, E = 256, W = 32, P = 288;
    const ExpertLocation loc(random_layout(L, E, P, 77), E, W, 4);
    Rng rng(5);
    Counts counts(L, E), fixed(L, W), source(static_cast<Index>(L) * W, E);
    for (Index i = 0; i < counts.size(); ++i) counts.data()[i] = rng.below(400);
    for (Index i = 0; i < fixed.size(); ++i) fixed.data()[i] = rng.below(300);
    for (Index i = 0; i < source.size(); ++i) source.data()[i] = rng.below(20);
    const int before = moelb::get_num_threads();
    moelb::set_num_threads(1);
    const Counts one = split(loc, counts, fixed);
    const Counts one_assigned = assign(loc, source, fixed);
    moelb::set_num_threads(4);
    const Counts four = split(loc, counts, fixed);
    const Counts four_assigned = assign(loc, source, fixed);
    moelb::set_num_threads(before);
    EXPECT_EQ(one, four);
    EXPECT_EQ(one_assigned, four_assigned);
    // One layer at a time gives the same rows.
    for (const int l : {0, 13, L - 1}) {
        EXPECT_EQ(split(loc, Counts(counts.row(l)), Counts(fixed.row(l)), l), Counts(one.row(l)));
    }
}

// ------------------------------------------------------------------------------------------------
// SplitShares::kEven: optimal like any split, the same at any thread count, and the equal split
// where that is optimal.

TEST(BalancedSplitEven, OptimalConservedAndThreadInvariant) {
    const int L = 24, E = 256, W = 32, P = 288;
    const ExpertLocation loc(random_layout(L, E, P, 78), E, W, 4);
    Rng rng(6);
    Counts counts(L, E), fixed(L, W);
    for (Index i = 0; i < counts.size(); ++i) counts.data()[i] = rng.below(400);
    for (Index i = 0; i < fixed.size(); ++i) fixed.data()[i] = rng.below(300);
    const int before = moelb::get_num_threads();
    moelb::set_num_threads(1);
    const Counts any = split(loc, counts, fixed);
    const Counts one = split(loc, counts, fixed, -1, moelb::SplitShares::kEven);
    moelb::set_num_threads(4);
    const Counts four = split(loc, counts, fixed, -1, moelb::SplitShares::kEven);
    moelb::set_num_threads(before);
    EXPECT_EQ(one, four);
    for (Index l = 0; l < L; ++l) {
        EXPECT_EQ(max_load(loc, one, l, fixed, l), max_load(loc, any, l, fixed, l)) << l;
        std::vector<std::int64_t> per_expert(static_cast<std::size_t>(E), 0);
        for (int p = 0; p < P; ++p) {
            EXPECT_GE(one(l, p), 0);
            per_expert[loc.physical_to_logical()(l, p)] += one(l, p);
        }
        for (int e = 0; e < E; ++e) EXPECT_EQ(per_expert[e], counts(l, e)) << l << " " << e;
    }
}

TEST(BalancedSplitEven, IsTheEqualSplitWhereThatIsOptimal) {
    // Every expert once on each of 4 ranks: the equal split is optimal, the even split is it.
    const int E = 6, W = 4;
    RowMatrix<std::int32_t> p2l(1, E * W);
    for (int r = 0; r < W; ++r) {
        for (int e = 0; e < E; ++e) p2l(0, r * E + e) = e;
    }
    const ExpertLocation loc(p2l, E, W, 2);
    Counts counts(1, E);
    counts << 400, 7, 0, 1, 1000003, 12;
    const Counts even = split(loc, counts, kNoFixed, -1, moelb::SplitShares::kEven);
    for (int e = 0; e < E; ++e) {
        for (int r = 0; r < W; ++r) {
            EXPECT_LE(std::abs(even(0, r * E + e) * W - counts(0, e)), W) << e << " " << r;
        }
    }
}

TEST(BalancedSplitEven, ParsesItsNames) {
    EXPECT_EQ(moelb::parse_split_shares("even"), moelb::SplitShares::kEven);
    EXPECT_EQ(moelb::to_string(moelb::SplitShares::kAny), "any");
    EXPECT_THROW(moelb::parse_split_shares("flat"), moelb::InvalidArgument);
}

// ------------------------------------------------------------------------------------------------
// balanced_assignment: the least cost among the optimal assignments.

TEST(BalancedAssignment, KeepsTokensOnTheirSourceRank) {
    // Expert 0 on ranks 0 and 1: each rank's 3 tokens stay home (cost 0), 3 + 3 is optimal.
    const ExpertLocation loc(matrix<std::int32_t>({{0, 0}}), 1, 2, 1);
    const Counts out = assign(loc, matrix<std::int64_t>({{3}, {3}}));
    EXPECT_EQ(out, matrix<std::int64_t>({{3, 0}, {0, 3}}));
}

TEST(BalancedAssignment, PrefersTheSourcesNodeWhenTheOptimumMovesTokens) {
    // 4 ranks on 2 nodes, one slot each: expert 1 on rank 0, expert 0 on ranks 1 (node 0) and
    // 2 (node 1), expert 2 on rank 3. Source rank 0 (node 0) routes 6 tokens to expert 0, source
    // rank 3 (node 1) routes 2: the optimum puts 4 on each of ranks 1 and 2, and the cheapest way
    // sends 4 of rank 0's to rank 1 (its node, cost 1) and the rest of them and rank 3's to
    // rank 2.
    const ExpertLocation loc(matrix<std::int32_t>({{1, 0, 0, 2}}), 3, 4, 2);
    const Counts source = matrix<std::int64_t>({{6, 0, 0}, {0, 0, 0}, {0, 0, 0}, {2, 0, 0}});
    const Counts out = assign(loc, source);
    EXPECT_EQ(out, matrix<std::int64_t>({{0, 4, 2, 0}, {0, 0, 0, 0}, {0, 0, 0, 0}, {0, 0, 2, 0}}));
}

TEST(BalancedAssignment, SplitsARanksCopiesEvenlyOwnShareFirst) {
    // Expert 0 has two slots on rank 0 (0, 1) and one on rank 1 (2); rank 1 has 6 fixed. Sources
    // 0 and 1 route 5 tokens each: T* = 16 / 2 = 8, so rank 0 takes 8 (4 + 4 over its slots) and
    // rank 1 takes 2 (source 1's own tokens stay home first). Rank 0's slots fill with its own
    // source's 5 first (4 + 1), then source 1's 3 (node share).
    const ExpertLocation loc(matrix<std::int32_t>({{0, 0, 0, 1}}), 2, 2, 1);
    const Counts out =
        assign(loc, matrix<std::int64_t>({{5, 0}, {5, 0}}), matrix<std::int64_t>({{0, 6}}));
    EXPECT_EQ(out, matrix<std::int64_t>({{4, 1, 0, 0}, {0, 3, 2, 0}}));
}

TEST(BalancedAssignment, FillsARanksSlotsWithItsOwnSourceBeforeEarlierSources) {
    // One node of 3 ranks, 2 slots each: expert 0 on rank 1 (slots 2, 3) and rank 2 (slot 4);
    // rank 2 carries 6 fixed. Source 0 (no replica) routes 4 tokens of expert 0, source 1 routes
    // 2: T* = (6 + 6) / 2 = 6, all 6 on rank 1 (3 + 3 over its slots). The tie rule fills rank
    // 1's slots with its own source's 2 first, then source 0's 4 (node share): slot 2 takes 2 + 1,
    // slot 3 takes 3 -- although source 0 comes first in source order.
    const ExpertLocation loc(matrix<std::int32_t>({{1, 2, 0, 0, 0, 3}}), 4, 3, 1);
    const Counts out = assign(loc, matrix<std::int64_t>({{4, 0, 0, 0}, {2, 0, 0, 0}, {0, 0, 0, 0}}),
                              matrix<std::int64_t>({{0, 0, 6}}));
    EXPECT_EQ(out,
              matrix<std::int64_t>({{0, 0, 1, 3, 0, 0}, {0, 0, 2, 0, 0, 0}, {0, 0, 0, 0, 0, 0}}));
}

TEST(BalancedAssignment, CheapTokensGiveWayToTheMakespan) {
    // Two ranks on two nodes: expert 0 on both (slots 0, 2), expert 1 only on rank 0 (slot 1).
    // Source 0 routes 4 tokens of each: expert 1's 4 fix rank 0 at 4, so T* = 8 / 2 = 4 and
    // expert 0's tokens must all leave their own rank for the other node (cost 2 each), although
    // each expert alone would keep them home.
    const ExpertLocation loc(matrix<std::int32_t>({{0, 1, 0, 2}}), 3, 2, 2);
    const Counts source = matrix<std::int64_t>({{4, 4, 0}, {0, 0, 0}});
    EXPECT_EQ(assign(loc, source), matrix<std::int64_t>({{0, 4, 4, 0}, {0, 0, 0, 0}}));
}

// The total cost (kDispatchCost*) of one layer's assignment rows [W, P].
std::int64_t total_cost(const ExpertLocation& loc, const std::int64_t* rows) {
    const int W = loc.ep_size(), P = loc.num_physical_experts();
    std::int64_t cost = 0;
    for (int s = 0; s < W; ++s) {
        for (int p = 0; p < P; ++p) {
            const int g = loc.rank_of_slot(p);
            const std::int64_t c = g == s ? 0 : loc.node_of_rank(g) == loc.node_of_rank(s) ? 1 : 2;
            cost += c * rows[static_cast<Index>(s) * P + p];
        }
    }
    return cost;
}

TEST(BalancedAssignment, SameMakespanAndCostAsThePreviousSolver) {
    // Random layouts over several nodes (replicas on one rank, one node or several), sources
    // leaning towards the experts of their own rank and node (so that the cheap shares matter),
    // zero counts and tight fixed loads: the makespan and the least total cost equal those of the
    // previous solver (a generic min-cost flow over classes of sources).
    int layers = 0, costly = 0;
    for (std::uint32_t seed = 1; seed <= 30; ++seed) {
        Rng rng(seed);
        const int W = std::vector<int>{4, 6, 8, 12}[seed % 4];
        std::vector<int> nodes;
        for (const int n : {2, 3, 4}) {
            if (W % n == 0) nodes.push_back(n);
        }
        const int N = nodes[seed % nodes.size()];
        const int S = 1 + static_cast<int>(seed % 3), P = W * S, E = std::max(2, P * 2 / 3);
        const int L = 6;
        const ExpertLocation loc(random_layout(L, E, P, seed), E, W, N);
        Counts source(static_cast<Index>(L) * W, E), fixed(L, W);
        for (int l = 0; l < L; ++l) {
            const std::uint32_t scale = std::vector<std::uint32_t>{3, 40, 500}[rng.below(3)];
            for (int s = 0; s < W; ++s) {
                for (int e = 0; e < E; ++e) {
                    std::uint32_t n = rng.below(4) == 0 ? 0 : rng.below(scale + 1);
                    // Tokens of an expert with a replica on the source's rank: often many more.
                    for (const std::int32_t p : loc.replicas(l, e)) {
                        if (loc.rank_of_slot(p) == s && rng.below(2) == 0) n += scale;
                    }
                    source(l * W + s, e) = n;
                }
            }
            for (int r = 0; r < W; ++r) fixed(l, r) = rng.below(2) ? rng.below(scale * 4) : 0;
        }
        const Counts ours = assign(loc, source, fixed);
        Counts theirs = Counts::Constant(source.rows(), P, -7);
        moelb::detail::balanced_assignment_reference(loc, cmap(source), cmap(fixed), mmap(theirs));
        for (int l = 0; l < L; ++l) {
            const std::int64_t* a = ours.data() + static_cast<Index>(l) * W * P;
            const std::int64_t* b = theirs.data() + static_cast<Index>(l) * W * P;
            std::vector<std::int64_t> slots_a(static_cast<std::size_t>(P), 0), slots_b = slots_a;
            for (Index i = 0; i < static_cast<Index>(W) * P; ++i) {
                slots_a[i % P] += a[i];
                slots_b[i % P] += b[i];
            }
            const auto load_a = rank_loads(loc, slots_a.data(), fixed.data() + l * W);
            const auto load_b = rank_loads(loc, slots_b.data(), fixed.data() + l * W);
            ASSERT_EQ(*std::max_element(load_a.begin(), load_a.end()),
                      *std::max_element(load_b.begin(), load_b.end()))
                << "seed " << seed << " layer " << l;
            ASSERT_EQ(total_cost(loc, a), total_cost(loc, b)) << "seed " << seed << " layer " << l;
            for (int s = 0; s < W; ++s) {
                expect_conserved(loc, l, source.data() + (l * W + s) * E, a + s * P);
            }
            ++layers;
            costly += total_cost(loc, a) > 0;
        }
    }
    EXPECT_EQ(layers, 180);
    EXPECT_GT(costly, 120);
}

// ------------------------------------------------------------------------------------------------
// Errors.

TEST(BalancedSplit, RejectsBadInput) {
    const ExpertLocation loc(matrix<std::int32_t>({{0, 1, 0, 1}, {1, 0, 1, 0}}), 2, 2, 1);
    Counts out(2, 4), one(1, 4);
    auto run = [&](const Counts& counts, const Counts& fixed, int layer = -1) {
        Counts& o = layer < 0 ? out : one;
        moelb::balanced_split(loc, cmap(counts), cmap(fixed), mmap(o), layer);
    };
    const Counts good = matrix<std::int64_t>({{1, 2}, {3, 4}});
    expect_invalid_argument(
        [&] {
            run(matrix<std::int64_t>({{1, 2}, {3, -4}}), kNoFixed);
        },
        "counts[1, 1] = -4 is negative");
    expect_invalid_argument(
        [&] {
            run(matrix<std::int64_t>({{1, 2, 3}, {3, 4, 5}}), kNoFixed);
        },
        "counts has shape (2, 3) but the location has 2 layers and 2");
    expect_invalid_argument(
        [&] {
            run(matrix<std::int64_t>({{1, 2}}), kNoFixed);
        },
        "counts has shape (1, 2)");
    expect_invalid_argument(
        [&] {
            run(good, matrix<std::int64_t>({{1, 2, 3}, {1, 2, 3}}));
        },
        "fixed_loads has shape (2, 3) but the location has 2 layers and "
        "ep_size=2");
    expect_invalid_argument(
        [&] {
            run(good, matrix<std::int64_t>({{1, 2}, {-1, 2}}));
        },
        "fixed_loads[1, 0] = -1 is negative");
    const std::int64_t big = std::numeric_limits<std::int64_t>::max() / 2 + 1;
    expect_invalid_argument(
        [&] {
            run(matrix<std::int64_t>({{1, 2}, {big, big}}), kNoFixed);
        },
        "counts of layer 1 sum past the int64 range");
    expect_invalid_argument(
        [&] {
            run(matrix<std::int64_t>({{1, 2}, {big, 0}}), matrix<std::int64_t>({{0, 0}, {0, big}}));
        },
        "counts of layer 1 and fixed_loads sum past the int64 range");
    expect_invalid_argument(
        [&] {
            run(matrix<std::int64_t>({{1, -2}}), kNoFixed, 1);
        },
        "counts[1] = -2 is negative");
    expect_invalid_argument(
        [&] {
            run(matrix<std::int64_t>({{1, 2}}), kNoFixed, 2);
        },
        "layer=2 is outside [0, num_layers=2)");
    expect_invalid_argument(
        [&] {
            run(matrix<std::int64_t>({{1, 2, 3}}), kNoFixed, 0);
        },
        "counts has 3 entries but the location has 2 logical experts");
    expect_invalid_argument(
        [&] {
            run(matrix<std::int64_t>({{1, 2}}), matrix<std::int64_t>({{1, 2, 3}}), 0);
        },
        "fixed_loads has 3 entries but ep_size=2");
    // A bad entry in a late layer leaves the output untouched.
    out.setConstant(-5);
    EXPECT_THROW(run(matrix<std::int64_t>({{1, 2}, {3, -4}}), kNoFixed), moelb::InvalidArgument);
    EXPECT_TRUE((out.array() == -5).all());
}

TEST(BalancedAssignment, RejectsBadInput) {
    const ExpertLocation loc(matrix<std::int32_t>({{0, 1, 0, 1}, {1, 0, 1, 0}}), 2, 2, 1);
    auto run = [&](const Counts& source, const Counts& fixed, int layer = -1) {
        Counts out(source.rows(), 4);
        moelb::balanced_assignment(loc, cmap(source), cmap(fixed), mmap(out), layer);
    };
    expect_invalid_argument(
        [&] {
            run(matrix<std::int64_t>({{1, 2}, {3, 4}, {5, 6}, {7, -8}}), kNoFixed);
        },
        "source_counts[1, 1, 1] = -8 is negative");
    expect_invalid_argument(
        [&] {
            run(matrix<std::int64_t>({{1, 2}, {3, -4}}), kNoFixed, 0);
        },
        "source_counts[1, 1] = -4 is negative");
    expect_invalid_argument(
        [&] {
            run(matrix<std::int64_t>({{1, 2}, {3, 4}}), kNoFixed);
        },
        "source_counts has 2 rows of 2");
    expect_invalid_argument(
        [&] {
            run(matrix<std::int64_t>({{1, 2, 3}, {3, 4, 5}}), kNoFixed, 0);
        },
        "source_counts has shape (2, 3) but (ep_size=2, num_experts=2)");
    const std::int64_t big = std::numeric_limits<std::int64_t>::max() / 2 + 1;
    expect_invalid_argument(
        [&] {
            run(matrix<std::int64_t>({{big, 0}, {big, 0}}), kNoFixed, 1);
        },
        "source_counts sum past the int64 range");
    expect_invalid_argument(
        [&] {
            run(matrix<std::int64_t>({{1, 2}, {3, 4}}), matrix<std::int64_t>({{1, -2}}), 1);
        },
        "fixed_loads[1] = -2 is negative");
}

}  // namespace
