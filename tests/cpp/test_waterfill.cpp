// The Waterfill shared-expert balancer (waterfill.hpp): the worked examples of
// reference/routing_waterfill.md section 8.10, each decision rule on hand-checked batches, the
// decode modes, dynamic mode with an in-process all-reduce, invariants on random batches, threads,
// the rank-load evaluator and every error path.
#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <set>
#include <span>
#include <vector>

#include "moelb/errors.hpp"
#include "moelb/parallel.hpp"
#include "moelb/waterfill.hpp"
#include "test_util.hpp"

namespace {

using namespace moelb::test_util;
using moelb::Index;
using moelb::RowMatrix;
using moelb::WaterfillBalancer;
using moelb::WaterfillMode;
using moelb::WaterfillPlan;
using Kind = moelb::WaterfillPlan::Kind;

struct Expanded {
    RowMatrix<std::int32_t> ids;
    RowMatrix<float> weights;
    WaterfillPlan plan;
};

RowMatrix<float> uniform_weights(Index rows, Index cols, float value) {
    return RowMatrix<float>::Constant(rows, cols, value);
}

Expanded expand(const WaterfillBalancer& b, const RowMatrix<std::int32_t>& ids,
                const RowMatrix<float>& weights, Index num_tokens, bool is_decode = false,
                std::span<const std::int64_t> reduced = {}) {
    Expanded out{RowMatrix<std::int32_t>(ids.rows(), ids.cols() + 1),
                 RowMatrix<float>(ids.rows(), ids.cols() + 1),
                 {}};
    out.plan = b.expand(cmap(ids), cmap(weights), num_tokens, is_decode, reduced, mmap(out.ids),
                        mmap(out.weights));
    return out;
}

// The hash of SGLang's kernel, written out: u = (((t ^ s * 0x9E3779B9) * 1664525 + 1013904223)
// mod 2^32) mod total.
std::int64_t hashed(std::uint32_t t, std::uint32_t s, std::int64_t total) {
    const std::uint32_t seed = (t ^ (s * 0x9E3779B9u)) * 1664525u + 1013904223u;
    return static_cast<std::int64_t>(seed % static_cast<std::uint64_t>(total));
}

// Section 8.10, first table: W=4, P=16 (S=4), rank 1, K=2, shared weight 0.4.
const RowMatrix<std::int32_t> kExampleIds =
    matrix<std::int32_t>({{0, 5}, {1, 9}, {4, 13}, {-1, -1}});

TEST(Waterfill, WorkedExampleStaticPrefill) {
    const WaterfillBalancer b(16, 4, 1, 2.5);
    EXPECT_FLOAT_EQ(b.shared_weight(), 0.4f);
    RowMatrix<float> weights =
        matrix<float>({{0.6f, 0.4f}, {0.6f, 0.4f}, {0.6f, 0.4f}, {0.6f, 0.4f}});
    const Expanded e = expand(b, kExampleIds, weights, 64);
    EXPECT_EQ(e.plan.kind, Kind::kTokenCount);
    EXPECT_EQ(e.plan.rank_load, (std::vector<std::int64_t>{2, 2, 1, 1}));
    EXPECT_TRUE(e.plan.allow_all_ranks);
    EXPECT_EQ(e.ids, matrix<std::int32_t>({{0, 6, 14}, {1, 11, 19}, {5, 16, 19}, {-1, -1, -1}}));
    EXPECT_EQ(
        e.weights,
        matrix<float>(
            {{0.6f, 0.4f, 0.4f}, {0.6f, 0.4f, 0.4f}, {0.6f, 0.4f, 0.4f}, {0.0f, 0.0f, 0.0f}}));
    // The draws of the table: target (6 + 6 / 2 + 3) / 4 = 3, caps [0, 1, 1, 1], total 3.
    EXPECT_EQ(hashed(0, 1, 3), 1);
    EXPECT_EQ(hashed(1, 1, 3), 2);
    EXPECT_EQ(hashed(2, 1, 3), 2);
}

TEST(Waterfill, SmallPrefillBatchStaysLocal) {
    const WaterfillBalancer b(16, 4, 1, 2.5);
    const RowMatrix<float> weights = uniform_weights(4, 2, 0.5f);
    for (const Index num_tokens : {Index{4}, Index{63}}) {
        const Expanded e = expand(b, kExampleIds, weights, num_tokens);
        EXPECT_EQ(e.plan.kind, Kind::kLocal);
        EXPECT_EQ(e.ids.col(2), (Eigen::Vector<std::int32_t, 4>{9, 9, 9, -1}));
    }
    EXPECT_EQ(expand(b, kExampleIds, weights, 64).plan.kind, Kind::kTokenCount);
}

TEST(Waterfill, RestrictedCandidatesExample) {
    // Section 8.10, second example: rank_load [10, 2, 7, 3], target 9, only the token's ranks.
    const WaterfillBalancer b(16, 4, 1, 1.0);
    WaterfillPlan plan;
    plan.kind = Kind::kTokenCount;
    plan.rank_load = {10, 2, 7, 3};
    plan.target_total = 9;
    plan.allow_all_ranks = false;
    const auto ids = matrix<std::int32_t>({{0, 5}, {-1, -1}, {6, 13}});
    const RowMatrix<float> weights = uniform_weights(3, 2, 0.5f);
    RowMatrix<std::int32_t> out_ids(3, 3);
    RowMatrix<float> out_weights(3, 3);
    b.materialise(cmap(ids), cmap(weights), plan, mmap(out_ids), mmap(out_weights));
    EXPECT_EQ(hashed(0, 1, 7), 5);   // caps {0: 0, 1: 7}
    EXPECT_EQ(hashed(2, 1, 12), 2);  // caps {1: 7, 3: 60 / 11 = 5}
    EXPECT_EQ(out_ids(0, 2), 9);     // rank 1
    EXPECT_EQ(out_ids(1, 2), -1);
    EXPECT_EQ(out_ids(2, 2), 9);
    EXPECT_FLOAT_EQ(out_weights(2, 2), 1.0f);
}

TEST(Waterfill, NoSpareCapacityFallsBackToThePreferenceScan) {
    // Every candidate is at or above the target: the local rank unless one is below 10/11 of it.
    const WaterfillBalancer b(8, 4, 2);
    WaterfillPlan plan;
    plan.kind = Kind::kTokenCount;
    plan.target_total = 5;
    plan.allow_all_ranks = true;
    const auto ids = matrix<std::int32_t>({{0, 7}});
    const RowMatrix<float> weights = uniform_weights(1, 2, 0.5f);
    RowMatrix<std::int32_t> out_ids(1, 3);
    RowMatrix<float> out_weights(1, 3);
    const auto dest_for = [&](std::vector<std::int64_t> load, bool all) {
        plan.rank_load = std::move(load);
        plan.allow_all_ranks = all;
        b.materialise(cmap(ids), cmap(weights), plan, mmap(out_ids), mmap(out_weights));
        return out_ids(0, 2) / 3;  // S + 1 = 3
    };
    EXPECT_EQ(dest_for({11, 10, 11, 10}, true), 2);  // 10 * 11 < 11 * 10 is false: stay local
    EXPECT_EQ(dest_for({9, 10, 11, 10}, true), 0);   // 9 * 11 < 11 * 10
    EXPECT_EQ(dest_for({9, 8, 11, 10}, true), 1);    // then 8 * 11 < 9 * 10
    // Restricted: only the token's ranks (0 and 3) in column order, never rank 1.
    EXPECT_EQ(dest_for({9, 5, 11, 8}, false), 3);  // rank 0: 99 < 110; rank 3: 88 < 90
    EXPECT_EQ(dest_for({12, 5, 11, 12}, false), 2);
}

TEST(Waterfill, DynamicPrefillWithAnInProcessAllReduce) {
    // Two ranks, P = 8 (S = 4), K = 2; rank 0 routes 64 tokens to rank 1's experts only, rank 1
    // routes 70 tokens half to each rank.
    RowMatrix<std::int32_t> ids0(64, 2), ids1(70, 2);
    for (Index t = 0; t < 64; ++t) ids0.row(t) << 4, 5;
    for (Index t = 0; t < 70; ++t) ids1.row(t) << static_cast<std::int32_t>(t % 2 * 4), 6;
    const WaterfillBalancer b0(8, 2, 0, 1.0, WaterfillMode::kDynamic);
    const WaterfillBalancer b1(8, 2, 1, 1.0, WaterfillMode::kDynamic);
    std::vector<std::int64_t> part0(4), part1(4), reduced(4);
    b0.exchange_buffer(cmap(ids0), 64, false, part0);
    b1.exchange_buffer(cmap(ids1), 70, false, part1);
    EXPECT_EQ(part0, (std::vector<std::int64_t>{0, 128, 64, 0}));
    EXPECT_EQ(part1, (std::vector<std::int64_t>{35, 105, 0, 70}));
    for (int i = 0; i < 4; ++i) reduced[i] = part0[i] + part1[i];
    const WaterfillPlan plan = b0.plan(cmap(ids0), 64, false, reduced);
    // rank_load = G + T = [35 + 64, 233 + 70]; tokens = 268 / 2 = 134;
    // target = ceil((99 + 303 + 134) / 2) = 268; max load 303 > 268: restricted candidates.
    EXPECT_EQ(plan.kind, Kind::kTokenCount);
    EXPECT_EQ(plan.rank_load, (std::vector<std::int64_t>{99, 303}));
    EXPECT_EQ(plan.target_total, 268);
    EXPECT_FALSE(plan.allow_all_ranks);
    // Rank 0's tokens visit only rank 1 (load above target): candidates {0, 1}, caps {169, 0}.
    const RowMatrix<float> w0 = uniform_weights(64, 2, 0.5f);
    const Expanded e = expand(b0, ids0, w0, 64, false, reduced);
    for (Index t = 0; t < 64; ++t) EXPECT_EQ(e.ids(t, 2), 4);  // rank 0's shared slot
    // The all_reduce overload gives the same.
    std::vector<std::int64_t> seen;
    RowMatrix<std::int32_t> ids_out(64, 3);
    RowMatrix<float> weights_out(64, 3);
    b0.expand(
        cmap(ids0), cmap(w0), 64, false,
        [&](std::span<std::int64_t> buffer) {
            seen.assign(buffer.begin(), buffer.end());
            for (int i = 0; i < 4; ++i) buffer[i] += part1[i];
        },
        mmap(ids_out), mmap(weights_out));
    EXPECT_EQ(seen, part0);
    EXPECT_EQ(ids_out, e.ids);
    // A small batch on this rank: no plan, but the collective still ran.
    EXPECT_EQ(b0.plan(cmap(ids0), 10, false, reduced).kind, Kind::kLocal);
}

TEST(Waterfill, FusedDecodePicksTheRankWithFewestActiveExperts) {
    // W = 4, S = 4; rank 2 is the source. Distinct experts used per rank: [2, 1, 1, 3].
    const WaterfillBalancer b(16, 4, 2);
    const auto ids = matrix<std::int32_t>({{0, 1, 4}, {0, 8, 12}, {13, 14, -1}, {-1, -1, -1}});
    const RowMatrix<float> weights = uniform_weights(4, 3, 0.25f);
    const Expanded e = expand(b, ids, weights, 4, true);
    EXPECT_EQ(e.plan.kind, Kind::kFusedFewestActive);
    EXPECT_EQ(e.plan.rank_load, (std::vector<std::int64_t>{2, 1, 1, 3}));
    EXPECT_EQ(e.plan.destination, 2);  // ties with rank 1: the source rank wins
    EXPECT_EQ(e.ids.col(3), (Eigen::Vector<std::int32_t, 4>{14, 14, 14, -1}));
    // From rank 3 the tie goes to the lower rank.
    const WaterfillBalancer b3(16, 4, 3);
    EXPECT_EQ(expand(b3, ids, weights, 4, true).plan.destination, 1);
}

TEST(Waterfill, LargeDecodeBatchUsesThePreferenceScanThenTheMinimum) {
    // N = 257 > 256: counted, then the 11/10 scan from the source and a strict-minimum scan.
    RowMatrix<std::int32_t> ids(257, 2);
    for (Index t = 0; t < 257; ++t) {
        ids(t, 0) = static_cast<std::int32_t>(t % 10);       // rank 0: 10 experts (S = 16)
        ids(t, 1) = static_cast<std::int32_t>(16 + t % 11);  // rank 1: 11 experts
    }
    const RowMatrix<float> weights = uniform_weights(257, 2, 0.5f);
    const WaterfillBalancer b1(64, 4, 1);
    const Expanded e = expand(b1, ids, weights, 257, true);
    EXPECT_EQ(e.plan.kind, Kind::kFewestActive);
    EXPECT_EQ(e.plan.rank_load, (std::vector<std::int64_t>{10, 11, 0, 0}));
    EXPECT_EQ(e.plan.destination, 2);
    // S > 32 takes the same path even for a small batch.
    const WaterfillBalancer wide(264, 4, 0);
    EXPECT_EQ(expand(wide, matrix<std::int32_t>({{0, 70}}), uniform_weights(1, 2, 1.0f), 1, true)
                  .plan.kind,
              Kind::kFewestActive);
}

TEST(Waterfill, DynamicDecodeCountsTheUnionOfActiveExperts) {
    const WaterfillBalancer b0(8, 2, 0, 1.0, WaterfillMode::kDynamic);
    const WaterfillBalancer b1(8, 2, 1, 1.0, WaterfillMode::kDynamic);
    const auto ids0 = matrix<std::int32_t>({{0, 1}, {4, -1}});
    const auto ids1 = matrix<std::int32_t>({{0, 2}, {3, 1}});
    std::vector<std::int64_t> p0(8), p1(8), reduced(8);
    b0.exchange_buffer(cmap(ids0), 2, true, p0);
    b1.exchange_buffer(cmap(ids1), 2, true, p1);
    EXPECT_EQ(p0, (std::vector<std::int64_t>{1, 1, 0, 0, 1, 0, 0, 0}));
    for (int i = 0; i < 8; ++i) reduced[i] = p0[i] + p1[i];
    const WaterfillPlan plan = b1.plan(cmap(ids1), 2, true, reduced);
    EXPECT_EQ(plan.kind, Kind::kFewestActive);
    EXPECT_EQ(plan.rank_load, (std::vector<std::int64_t>{4, 1}));
    EXPECT_EQ(plan.destination, 1);
}

TEST(Waterfill, EmptyAndPaddedBatches) {
    for (const WaterfillMode mode : {WaterfillMode::kStatic, WaterfillMode::kDynamic}) {
        const WaterfillBalancer b(16, 4, 3, 2.0, mode);
        for (const bool decode : {false, true}) {
            const RowMatrix<std::int32_t> none(0, 6);
            std::vector<std::int64_t> reduced;
            if (mode == WaterfillMode::kDynamic) {
                reduced.assign(static_cast<std::size_t>(b.exchange_size(decode)), 0);
                b.exchange_buffer(cmap(none), 0, decode, reduced);
            }
            const Expanded e = expand(b, none, RowMatrix<float>(0, 6), 0, decode, reduced);
            EXPECT_EQ(e.ids.rows(), 0);
            EXPECT_EQ(e.ids.cols(), 7);
            const RowMatrix<std::int32_t> padded = RowMatrix<std::int32_t>::Constant(100, 6, -1);
            if (mode == WaterfillMode::kDynamic)
                b.exchange_buffer(cmap(padded), 100, decode, reduced);
            const Expanded p =
                expand(b, padded, uniform_weights(100, 6, 0.3f), 100, decode, reduced);
            EXPECT_TRUE((p.ids.array() == -1).all());
            EXPECT_TRUE((p.weights.array() == 0.0f).all());
        }
    }
}

TEST(Waterfill, SharedWeight) {
    EXPECT_FLOAT_EQ(WaterfillBalancer(8, 2, 0, 2.5).shared_weight(), 0.4f);
    EXPECT_FLOAT_EQ(WaterfillBalancer(8, 2, 0, 4.0).shared_weight(), 0.25f);
    EXPECT_FLOAT_EQ(WaterfillBalancer(8, 2, 0, 0.0).shared_weight(), 1.0f);
    EXPECT_FLOAT_EQ(WaterfillBalancer(8, 2, 0, 2.5, WaterfillMode::kStatic, true).shared_weight(),
                    1.0f);
    EXPECT_EQ(WaterfillBalancer(256, 8, 0).shared_slot(0), 32);
    EXPECT_EQ(WaterfillBalancer(264, 8, 7).shared_slot(7), 7 * 34 + 33);
}

// Invariants on random batches, for W from 1 to 64 (beyond a 32-bit rank mask).
TEST(Waterfill, InvariantsOnRandomBatches) {
    std::mt19937 rng(7);
    for (const int W : {1, 2, 3, 8, 33, 64}) {
        const int S = 4, P = W * S, K = 4;
        for (const bool decode : {false, true}) {
            const Index N = 300;
            RowMatrix<std::int32_t> ids(N, K);
            std::uniform_int_distribution<int> expert(0, P - 1), pad(0, 9);
            for (Index t = 0; t < N; ++t) {
                for (Index c = 0; c < K; ++c) ids(t, c) = pad(rng) == 0 ? -1 : expert(rng);
            }
            // A skew: the first rank's experts are popular.
            for (Index t = 0; t < N; t += 2) ids(t, 0) = t % S;
            const RowMatrix<float> weights = uniform_weights(N, K, 0.25f);
            const int s = W - 1;
            const WaterfillBalancer b(P, W, s);
            const Expanded e = expand(b, ids, weights, N, decode);
            for (Index t = 0; t < N; ++t) {
                std::set<int> visited{s};
                bool valid = false;
                for (Index c = 0; c < K; ++c) {
                    const std::int32_t id = ids(t, c);
                    EXPECT_EQ(e.ids(t, c), id >= 0 ? id + id / S : -1);
                    EXPECT_EQ(e.weights(t, c), id >= 0 ? 0.25f : 0.0f);
                    if (id >= 0) {
                        visited.insert(id / S);
                        valid = true;
                    }
                }
                const std::int32_t shared = e.ids(t, K);
                if (!valid) {
                    EXPECT_EQ(shared, -1);
                    continue;
                }
                ASSERT_EQ(shared % (S + 1), S) << "row " << t;  // a shared slot
                const int dest = shared / (S + 1);
                ASSERT_GE(dest, 0);
                ASSERT_LT(dest, W);
                if (e.plan.kind == Kind::kTokenCount && !e.plan.allow_all_ranks) {
                    EXPECT_TRUE(visited.count(dest)) << "row " << t;
                }
            }
        }
    }
}

TEST(Waterfill, SameResultForAnyThreadCount) {
    std::mt19937 rng(3);
    const int W = 16, P = 256, K = 8;
    const Index N = 20000;
    RowMatrix<std::int32_t> ids(N, K);
    std::uniform_int_distribution<int> expert(0, P - 1);
    for (Index i = 0; i < ids.size(); ++i) ids.data()[i] = expert(rng);
    const RowMatrix<float> weights = uniform_weights(N, K, 0.125f);
    const WaterfillBalancer b(P, W, 5, 2.5);
    moelb::set_num_threads(1);
    const Expanded one = expand(b, ids, weights, N);
    moelb::set_num_threads(2);
    const Expanded two = expand(b, ids, weights, N);
    moelb::set_num_threads(0);
    EXPECT_EQ(one.ids, two.ids);
    EXPECT_EQ(one.plan.rank_load, two.plan.rank_load);
}

TEST(Waterfill, RankLoadsConserveWorkAndBalanceSkew) {
    // 4 ranks; rank 0's batch is large and its tokens route to ranks 0 and 1.
    const int W = 4, P = 32, K = 2;
    std::vector<RowMatrix<std::int32_t>> owned;
    for (int w = 0; w < W; ++w) {
        const Index N = w == 0 ? 512 : 64;
        RowMatrix<std::int32_t> ids(N, K);
        for (Index t = 0; t < N; ++t) {
            ids(t, 0) = static_cast<std::int32_t>(t % 16);
            ids(t, 1) = t % 7 == 0 ? -1 : static_cast<std::int32_t>(16 + t % 16);
        }
        owned.push_back(ids);
    }
    std::vector<moelb::ConstMatrixMap<std::int32_t>> views;
    for (const auto& m : owned) views.push_back(cmap(m));
    for (const WaterfillMode mode : {WaterfillMode::kStatic, WaterfillMode::kDynamic}) {
        const moelb::WaterfillRankLoads r = moelb::waterfill_rank_loads(views, P, mode, false);
        std::int64_t routed = 0, local = 0, waterfill = 0;
        for (int w = 0; w < W; ++w) {
            routed += r.routed[w];
            local += r.shared_local[w];
            waterfill += r.shared_waterfill[w];
        }
        std::int64_t valid = 0;
        for (const auto& m : owned) valid += (m.array() >= 0).count();
        EXPECT_EQ(routed, valid);
        EXPECT_EQ(local, 512 + 3 * 64);
        EXPECT_EQ(waterfill, local);
        EXPECT_GT(r.balancedness_waterfill, r.balancedness_local);
    }
}

TEST(Waterfill, BadInput) {
    expect_invalid_argument([] { WaterfillBalancer(10, 4, 0); }, "not divisible by ep_size=4");
    expect_invalid_argument([] { WaterfillBalancer(16, 4, 4); }, "ep_rank=4 is outside");
    expect_invalid_argument([] { WaterfillBalancer(16, 4, -1); }, "ep_rank=-1");
    expect_invalid_argument([] { WaterfillBalancer(16, 0, 0); }, "ep_size must be positive");
    expect_invalid_argument([] { WaterfillBalancer(16, 4, 0, -1.0); }, "routed_scaling_factor");
    expect_invalid_argument([] { (void)moelb::parse_waterfill_mode("fast"); }, "mode='fast'");
    const WaterfillBalancer b(16, 4, 0);
    const RowMatrix<float> w = uniform_weights(2, 2, 0.5f);
    expect_invalid_argument(
        [&] {
            expand(b, matrix<std::int32_t>({{0, 16}, {1, 2}}), w, 64);
        },
        "topk_ids[0, 1] = 16");
    expect_invalid_argument(
        [&] {
            expand(b, matrix<std::int32_t>({{0, 1}, {-2, 2}}), w, 64);
        },
        "topk_ids[1, 0] = -2");
    expect_invalid_argument(
        [&] {
            expand(b, matrix<std::int32_t>({{0, 1}, {1, 2}}), uniform_weights(2, 3, 0.f), 64);
        },
        "topk_weights has shape [2, 3]");
    expect_invalid_argument(
        [&] {
            expand(b, matrix<std::int32_t>({{0, 1}}), w, -1);
        },
        "num_tokens must be non-negative");
    const WaterfillBalancer dynamic(16, 4, 0, 1.0, WaterfillMode::kDynamic);
    expect_invalid_argument(
        [&] {
            expand(dynamic, matrix<std::int32_t>({{0, 1}, {1, 2}}), w, 64);
        },
        "all-reduced exchange buffer of length 8");
    const std::vector<std::int64_t> negative{1, 2, 3, -4, 0, 0, 0, 0};
    expect_invalid_argument(
        [&] {
            expand(dynamic, matrix<std::int32_t>({{0, 1}, {1, 2}}), w, 64, false, negative);
        },
        "negative value -4 at index 3");
    const std::vector<std::int64_t> some(8, 0);
    expect_invalid_argument(
        [&] {
            expand(b, matrix<std::int32_t>({{0, 1}, {1, 2}}), w, 64, false, some);
        },
        "static mode takes no all-reduced buffer");
    expect_invalid_argument([&] { (void)b.shared_slot(4); }, "ep_rank=4");
    std::vector<moelb::ConstMatrixMap<std::int32_t>> none;
    expect_invalid_argument(
        [&] { moelb::waterfill_rank_loads(none, 16, WaterfillMode::kStatic, false); },
        "one batch per EP rank");
}

}  // namespace
