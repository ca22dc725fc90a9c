// ExpertLocation (expert_location.hpp): layouts, derived tables, validation. Dispatch is
// test_dispatch.cpp.
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
using moelb::ExpertLocation;
using moelb::Index;
using moelb::InvalidArgument;
using moelb::MatrixMap;
using moelb::RowMatrix;

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

}  // namespace
