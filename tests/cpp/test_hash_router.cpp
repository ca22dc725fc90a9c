// The DeepSeek-V4 hash router (hash_router.hpp): expert ids looked up from token ids, weights from
// the router logits, compared with a double-precision reference written here; padding, dispatch,
// threads and every error path.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "moelb/errors.hpp"
#include "moelb/expert_location.hpp"
#include "moelb/hash_router.hpp"
#include "moelb/parallel.hpp"
#include "moelb/routing.hpp"
#include "test_util.hpp"

namespace {

using namespace moelb::test_util;

using moelb::ConstMatrixMap;
using moelb::DispatchAlgorithm;
using moelb::ExpertLocation;
using moelb::HashRouter;
using moelb::Index;
using moelb::InvalidArgument;
using moelb::LayerDispatcher;
using moelb::MatrixMap;
using moelb::RowMatrix;
using moelb::Scoring;
using moelb::TopKOutput;
using moelb::TopKOutputView;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

template <class TokenId>
TopKOutput select(const HashRouter& router, const RowMatrix<float>& logits,
                  const std::vector<TokenId>& input_ids,
                  std::optional<Index> non_padded = std::nullopt,
                  const LayerDispatcher* dispatcher = nullptr) {
    return router.select(cmap(logits), std::span<const TokenId>(input_ids), non_padded, dispatcher);
}

// Reference weights [K + F] of one token, in double.
std::vector<double> reference_weights(const float* logits, int E, const std::vector<int>& ids,
                                      Scoring scoring, double rsf, int shared, bool fold) {
    std::vector<double> w;
    if (scoring == Scoring::kSoftmax) {
        double m = -std::numeric_limits<double>::infinity(), z = 0.0;
        for (int e = 0; e < E; ++e) m = std::max(m, static_cast<double>(logits[e]));
        for (int e = 0; e < E; ++e) z += std::exp(logits[e] - m);
        for (const int id : ids) w.push_back(std::exp(logits[id] - m) / z);
    } else {
        for (const int id : ids) {
            const double x = logits[id];
            // sqrt(softplus) with PyTorch's threshold: x itself above 20.
            const double softplus = x > 20.0 ? x : std::log1p(std::exp(x));
            w.push_back(scoring == Scoring::kSigmoid ? 1.0 / (1.0 + std::exp(-x))
                                                     : std::sqrt(softplus));
        }
    }
    double sum = 0.0;
    for (const double x : w) sum += x;
    const bool renormalize = scoring != Scoring::kSoftmax;
    for (double& x : w) {
        if (renormalize) x /= sum;
        if (fold) x *= rsf;
    }
    if (shared == 1) {
        const double net = renormalize ? 1.0 : sum;
        w.push_back(fold ? net : net / rsf);
    }
    return w;
}

// ------------------------------------------------------------------------------------------------

TEST(HashRouter, WorkedExample) {
    // Reference section 6.4: E = 4, logits [0, 1, 2, 3], tid2eid[t] = [2, 0], rsf 1.5, F = 1.
    const RowMatrix<std::int32_t> tid2eid = matrix<std::int32_t>({{1, 3}, {2, 0}, {0, 1}});
    const RowMatrix<float> logits = matrix<float>({{0.0f, 1.0f, 2.0f, 3.0f}});
    const HashRouter router(tid2eid, Scoring::kSqrtSoftplus, 1.5f, 1);
    const TopKOutput out = select<std::int32_t>(router, logits, {1});
    ASSERT_EQ(out.topk_ids.cols(), 3);
    EXPECT_EQ(out.topk_ids(0, 0), 2);
    EXPECT_EQ(out.topk_ids(0, 1), 0);
    EXPECT_EQ(out.topk_ids(0, 2), 4);
    const double s2 = std::sqrt(std::log1p(std::exp(2.0))), s0 = std::sqrt(std::log(2.0));
    EXPECT_NEAR(out.topk_weights(0, 0), s2 / (s2 + s0), 1e-6);
    EXPECT_NEAR(out.topk_weights(0, 1), s0 / (s2 + s0), 1e-6);
    EXPECT_NEAR(out.topk_weights(0, 2), 1.0 / 1.5, 1e-6);
    EXPECT_NEAR(out.topk_weights(0, 0), 0.636590, 1e-5);
    EXPECT_NEAR(out.topk_weights(0, 1), 0.363410, 1e-5);
    EXPECT_NEAR(out.topk_weights(0, 2), 0.666667, 1e-5);
    EXPECT_EQ(out.recorder_topk_ids.cols(), 2);
    EXPECT_EQ(out.recorder_topk_ids(0, 0), 2);
    EXPECT_EQ(out.recorder_topk_ids(0, 1), 0);

    // Softmax scoring: probabilities over all four experts, not renormalised; the shared
    // column is their sum / rsf.
    const HashRouter softmax(tid2eid, Scoring::kSoftmax, 1.5f, 1);
    const TopKOutput sm = select<std::int64_t>(softmax, logits, {1});
    const double z = 1.0 + std::exp(1.0) + std::exp(2.0) + std::exp(3.0);
    EXPECT_EQ(sm.topk_ids(0, 2), 4);
    EXPECT_NEAR(sm.topk_weights(0, 0), std::exp(2.0) / z, 1e-6);
    EXPECT_NEAR(sm.topk_weights(0, 1), 1.0 / z, 1e-6);
    EXPECT_NEAR(sm.topk_weights(0, 2), (1.0 + std::exp(2.0)) / z / 1.5, 1e-6);
    EXPECT_NEAR(sm.topk_weights(0, 0), 0.236883, 1e-5);
    EXPECT_NEAR(sm.topk_weights(0, 1), 0.032059, 1e-5);
    EXPECT_NEAR(sm.topk_weights(0, 2), 0.179294, 1e-5);
}

TEST(HashRouter, Accessors) {
    const RowMatrix<std::int32_t> tid2eid = matrix<std::int32_t>({{0, 1, 2}, {3, 4, 5}});
    const HashRouter router(tid2eid, Scoring::kSigmoid, 2.0f, 1, true, 8);
    EXPECT_EQ(router.vocab_size(), 2);
    EXPECT_EQ(router.top_k(), 3);
    EXPECT_EQ(router.num_experts(), 8);
    EXPECT_EQ(router.scoring(), Scoring::kSigmoid);
    EXPECT_FLOAT_EQ(router.routed_scaling_factor(), 2.0f);
    EXPECT_EQ(router.num_fused_shared_experts(), 1);
    EXPECT_TRUE(router.apply_routed_scaling_factor_on_output());
    EXPECT_TRUE(router.renormalize());
    EXPECT_EQ(router.tid2eid(), tid2eid);
    const HashRouter defaults(tid2eid);
    EXPECT_EQ(defaults.scoring(), Scoring::kSqrtSoftplus);
    EXPECT_EQ(defaults.num_experts(), -1);
    EXPECT_EQ(defaults.num_fused_shared_experts(), 0);
    EXPECT_FALSE(defaults.apply_routed_scaling_factor_on_output());
    EXPECT_FALSE(HashRouter(tid2eid, Scoring::kSoftmax).renormalize());
}

// ------------------------------------------------------------------------------------------------
// Reference comparison: scoring x fused shared x rsf folding, int32 and int64 token ids.

using HashParam = std::tuple<Scoring, int /*F*/, bool /*fold*/>;

std::string hash_name(const ::testing::TestParamInfo<HashParam>& info) {
    const auto& [scoring, shared, fold] = info.param;
    return std::string(moelb::to_string(scoring)) + "_F" + std::to_string(shared) +
           (fold ? "_folded" : "_unfolded");
}

class HashRouterReference : public ::testing::TestWithParam<HashParam> {};

TEST_P(HashRouterReference, MatchesReference) {
    const auto [scoring, shared, fold] = GetParam();
    const int V = 50, K = 3, E = 16;
    const Index T = 300;
    const float rsf = 2.5f;
    Rng rng(8);
    RowMatrix<std::int32_t> tid2eid(V, K);
    for (int v = 0; v < V; ++v) {
        for (int k = 0; k < K; ++k) tid2eid(v, k) = static_cast<std::int32_t>(rng.below(E));
    }
    RowMatrix<float> logits(T, E);
    std::vector<std::int32_t> ids32(static_cast<std::size_t>(T));
    for (Index t = 0; t < T; ++t) {
        for (int e = 0; e < E; ++e) logits(t, e) = static_cast<float>(rng.uniform(-4, 4));
        ids32[t] = static_cast<std::int32_t>(rng.below(V));
    }
    const std::vector<std::int64_t> ids64(ids32.begin(), ids32.end());
    const HashRouter router(tid2eid, scoring, rsf, shared, fold);
    const TopKOutput out = select(router, logits, ids32);
    const TopKOutput out64 = select(router, logits, ids64);
    ASSERT_EQ(out.topk_ids.cols(), K + shared);
    for (Index t = 0; t < T; ++t) {
        std::vector<int> want_ids;
        for (int k = 0; k < K; ++k) want_ids.push_back(tid2eid(ids32[t], k));
        const std::vector<double> want =
            reference_weights(logits.row(t).data(), E, want_ids, scoring, rsf, shared, fold);
        for (int k = 0; k < K; ++k) {
            EXPECT_EQ(out.topk_ids(t, k), want_ids[k]) << "row " << t;
            EXPECT_EQ(out.recorder_topk_ids(t, k), want_ids[k]) << "row " << t;
        }
        if (shared == 1) {
            EXPECT_EQ(out.topk_ids(t, K), E);
        }
        for (int k = 0; k < K + shared; ++k) {
            EXPECT_NEAR(out.topk_weights(t, k), want[k], 1e-5 * std::abs(want[k]) + 1e-7)
                << "row " << t << " column " << k;
        }
    }
    EXPECT_EQ(out.topk_ids, out64.topk_ids);
    EXPECT_EQ(out.topk_weights, out64.topk_weights);
    EXPECT_EQ(out.recorder_topk_ids, out64.recorder_topk_ids);
}

INSTANTIATE_TEST_SUITE_P(Matrix, HashRouterReference,
                         ::testing::Combine(::testing::Values(Scoring::kSoftmax, Scoring::kSigmoid,
                                                              Scoring::kSqrtSoftplus),
                                            ::testing::Values(0, 1), ::testing::Bool()),
                         hash_name);

// ------------------------------------------------------------------------------------------------

TEST(HashRouter, NaNLogitsGiveFiniteWeights) {
    const RowMatrix<std::int32_t> tid2eid = matrix<std::int32_t>({{0, 1}, {2, 3}});
    const RowMatrix<float> logits =
        matrix<float>({{kNaN, 1.0f, 0.0f, 0.0f}, {0.0f, 0.0f, kNaN, kNaN}});
    for (const Scoring s : {Scoring::kSoftmax, Scoring::kSigmoid, Scoring::kSqrtSoftplus}) {
        const HashRouter router(tid2eid, s, 1.0f, 1);
        const TopKOutput out = select<std::int32_t>(router, logits, {0, 1});
        for (Index t = 0; t < 2; ++t) {
            for (int k = 0; k < 3; ++k) {
                EXPECT_TRUE(std::isfinite(out.topk_weights(t, k)))
                    << moelb::to_string(s) << " row " << t;
            }
        }
        // A NaN expert weighs nothing; every gathered logit NaN gives zero routed weights.
        EXPECT_EQ(out.topk_weights(0, 0), 0.0f) << moelb::to_string(s);
        EXPECT_GT(out.topk_weights(0, 1), 0.0f) << moelb::to_string(s);
        EXPECT_EQ(out.topk_weights(1, 0), 0.0f) << moelb::to_string(s);
        EXPECT_EQ(out.topk_weights(1, 1), 0.0f) << moelb::to_string(s);
        if (s != Scoring::kSoftmax) {
            EXPECT_FLOAT_EQ(out.topk_weights(0, 1), 1.0f);
        }
    }
}

TEST(HashRouter, PaddedRowsAreMaskedAndTheirTokenIdsNotChecked) {
    const RowMatrix<std::int32_t> tid2eid = matrix<std::int32_t>({{0, 1}, {2, 3}, {3, 0}});
    const RowMatrix<float> logits = RowMatrix<float>::Constant(5, 4, 0.5f);
    const HashRouter router(tid2eid, Scoring::kSqrtSoftplus, 1.5f, 1);
    // Rows 3 and 4 are padding; their token ids are garbage and must not be looked up.
    const TopKOutput out = select<std::int64_t>(router, logits, {2, 0, 1, -7, 1LL << 40}, 3);
    const int expected[3][2] = {{3, 0}, {0, 1}, {2, 3}};
    for (Index t = 0; t < 5; ++t) {
        for (int k = 0; k < 3; ++k) {
            if (t >= 3) {
                EXPECT_EQ(out.topk_ids(t, k), -1);
                EXPECT_EQ(out.topk_weights(t, k), 0.0f);
            } else {
                EXPECT_EQ(out.topk_ids(t, k), k < 2 ? expected[t][k] : 4);
                EXPECT_FLOAT_EQ(out.topk_weights(t, k), k < 2 ? 0.5f : 1.0f / 1.5f);
            }
        }
        for (int k = 0; k < 2; ++k) {
            EXPECT_EQ(out.recorder_topk_ids(t, k), t >= 3 ? -1 : expected[t][k]);
        }
    }
    // Zero non-padded rows: everything is padding.
    const TopKOutput none = select<std::int32_t>(router, logits, {9, 9, 9, 9, 9}, 0);
    EXPECT_TRUE((none.topk_ids.array() == -1).all());
    EXPECT_TRUE((none.topk_weights.array() == 0.0f).all());
}

TEST(HashRouter, PaddingStartingInsideALaterBlockOfRows) {
    // Long inputs are processed in blocks of rows; padding may start anywhere.
    const int V = 40, K = 4, E = 32;
    Rng rng(77);
    RowMatrix<std::int32_t> tid2eid(V, K);
    for (int v = 0; v < V; ++v) {
        for (int k = 0; k < K; ++k) tid2eid(v, k) = static_cast<std::int32_t>(rng.below(E));
    }
    const Index T = 300;
    RowMatrix<float> logits(T, E);
    for (Index t = 0; t < T; ++t) {
        for (int e = 0; e < E; ++e) logits(t, e) = static_cast<float>(rng.uniform(-6, 6));
    }
    for (const Scoring scoring : {Scoring::kSoftmax, Scoring::kSigmoid, Scoring::kSqrtSoftplus}) {
        const HashRouter router(tid2eid, scoring, 1.5f, 1);
        for (const Index non_padded : {Index{1}, Index{63}, Index{64}, Index{65}, Index{150}}) {
            std::vector<std::int64_t> ids(static_cast<std::size_t>(T), 1LL << 40);  // garbage
            for (Index t = 0; t < non_padded; ++t) ids[t] = rng.below(V);
            const TopKOutput out = select(router, logits, ids, non_padded);
            for (Index t = 0; t < T; ++t) {
                if (t >= non_padded) {
                    for (int k = 0; k < K + 1; ++k) {
                        ASSERT_EQ(out.topk_ids(t, k), -1) << "row " << t;
                        ASSERT_EQ(out.topk_weights(t, k), 0.0f) << "row " << t;
                    }
                    continue;
                }
                std::vector<int> want_ids;
                for (int k = 0; k < K; ++k) want_ids.push_back(tid2eid(ids[t], k));
                const std::vector<double> want =
                    reference_weights(logits.row(t).data(), E, want_ids, scoring, 1.5, 1, false);
                for (int k = 0; k < K + 1; ++k) {
                    ASSERT_EQ(out.topk_ids(t, k), k < K ? want_ids[k] : E) << "row " << t;
                    ASSERT_NEAR(out.topk_weights(t, k), want[k], 1e-5 * want[k] + 1e-7)
                        << moelb::to_string(scoring) << " row " << t << " column " << k;
                }
            }
        }
    }
}

TEST(HashRouter, WeightsAccurateOverTheWholeFloatRange) {
    // Two looked-up experts with logits x and 0: renormalised weights s(x) / (s(x) + s(0)).
    std::vector<float> xs;
    for (float x = -170.0f; x < -30.0f; x += 9.1f) xs.push_back(x);
    for (float x = -30.0f; x <= 30.0f; x += 0.37f) xs.push_back(x);
    for (const float x : {20.0f, 20.01f, 100.0f, 1e10f, 1e30f, std::numeric_limits<float>::max()}) {
        xs.push_back(x);
    }
    const Index T = static_cast<Index>(xs.size());
    RowMatrix<float> logits = RowMatrix<float>::Zero(T, 3);
    for (Index t = 0; t < T; ++t) logits(t, 0) = xs[static_cast<std::size_t>(t)];
    const std::vector<std::int32_t> ids(static_cast<std::size_t>(T), 0);
    for (const Scoring scoring : {Scoring::kSigmoid, Scoring::kSqrtSoftplus}) {
        const HashRouter router(matrix<std::int32_t>({{0, 1}}), scoring);
        const TopKOutput out = select(router, logits, ids);
        for (Index t = 0; t < T; ++t) {
            const double x = xs[static_cast<std::size_t>(t)];
            if (scoring == Scoring::kSigmoid && x < -80.0) continue;  // below float's range
            const std::vector<double> want =
                reference_weights(logits.row(t).data(), 3, {0, 1}, scoring, 1.0, 0, false);
            EXPECT_NEAR(out.topk_weights(t, 0), want[0], 4e-6 * want[0] + 1e-12)
                << moelb::to_string(scoring) << "(" << x << ")";
            EXPECT_NEAR(out.topk_weights(t, 1), want[1], 4e-6 * want[1] + 1e-12)
                << moelb::to_string(scoring) << "(" << x << ")";
        }
    }
}

TEST(HashRouter, DispatchMapsLogicalIdsToSlots) {
    // E = 8 logical experts in P = 12 slots on W = 4 ranks; logical e < 4 also lives at 8 + e.
    const int E = 8, P = 12, W = 4, rank = 3;
    const ExpertLocation loc = ExpertLocation::trivial(2, E, P, W);
    RowMatrix<std::int32_t> tid2eid(E, 2);
    for (int v = 0; v < E; ++v) {
        tid2eid(v, 0) = v;
        tid2eid(v, 1) = (v + 3) % E;
    }
    const HashRouter router(tid2eid, Scoring::kSigmoid, 2.5f, 1, false, E);
    const RowMatrix<float> logits = RowMatrix<float>::Constant(20, E, 0.0f);
    std::vector<std::int32_t> ids(20);
    for (int t = 0; t < 20; ++t) ids[t] = t % E;
    const LayerDispatcher rr(loc, 1, rank, DispatchAlgorithm::kRoundRobin, 0);
    const TopKOutput out = select(router, logits, ids, 18, &rr);
    for (Index t = 0; t < 18; ++t) {
        for (int k = 0; k < 2; ++k) {
            const auto reps = loc.replicas(1, tid2eid(ids[t], k));
            const int want = reps[static_cast<std::size_t>((t + rank) % Index(reps.size()))];
            EXPECT_EQ(out.topk_ids(t, k), want) << "row " << t;
            EXPECT_EQ(out.recorder_topk_ids(t, k), want) << "row " << t;
            EXPECT_FLOAT_EQ(out.topk_weights(t, k), 0.5f);
        }
        EXPECT_EQ(out.topk_ids(t, 2), P);
        EXPECT_FLOAT_EQ(out.topk_weights(t, 2), 0.4f);
    }
    for (int k = 0; k < 3; ++k) EXPECT_EQ(out.topk_ids(19, k), -1);
    EXPECT_EQ(out.recorder_topk_ids(18, 0), -1);

    const LayerDispatcher st(loc, 0, 1, DispatchAlgorithm::kSglangStatic, 5);
    const TopKOutput out_static = select(router, logits, ids, std::nullopt, &st);
    const RowMatrix<std::int32_t> table =
        moelb::dispatch_table(loc, DispatchAlgorithm::kSglangStatic, 1);
    for (Index t = 0; t < 20; ++t) {
        for (int k = 0; k < 2; ++k) {
            EXPECT_EQ(out_static.topk_ids(t, k), table(0, tid2eid(ids[t], k)));
        }
    }
}

TEST(HashRouter, ViewOverloadAndThreads) {
    const int V = 1000, K = 6, E = 64;
    const Index T = 5000;
    Rng rng(31);
    RowMatrix<std::int32_t> tid2eid(V, K);
    for (int v = 0; v < V; ++v) {
        for (int k = 0; k < K; ++k) tid2eid(v, k) = (v * 7 + k * 11) % E;
    }
    RowMatrix<float> logits(T, E);
    std::vector<std::int64_t> ids(static_cast<std::size_t>(T));
    for (Index t = 0; t < T; ++t) {
        for (int e = 0; e < E; ++e) logits(t, e) = static_cast<float>(rng.uniform(-5, 5));
        ids[t] = rng.below(V);
    }
    const HashRouter router(tid2eid, Scoring::kSqrtSoftplus, 1.5f, 1);
    const ExpertLocation loc = ExpertLocation::trivial(1, E, 80, 8, 2);
    const LayerDispatcher d(loc, 0, 6, DispatchAlgorithm::kSglangDynamic, 9);
    std::vector<TopKOutput> outs;
    for (const int threads : {1, 2, 4}) {
        moelb::set_num_threads(threads);
        TopKOutput out(T, K, 1);
        router.select(cmap(logits), std::span<const std::int64_t>(ids), T - 3, &d, out.view());
        outs.push_back(std::move(out));
    }
    moelb::set_num_threads(0);
    for (std::size_t i = 1; i < outs.size(); ++i) {
        EXPECT_EQ(std::memcmp(outs[0].topk_weights.data(), outs[i].topk_weights.data(),
                              sizeof(float) * static_cast<std::size_t>(T * (K + 1))),
                  0);
        EXPECT_EQ(outs[0].topk_ids, outs[i].topk_ids);
        EXPECT_EQ(outs[0].recorder_topk_ids, outs[i].recorder_topk_ids);
    }
    // The owning overload agrees with the view overload.
    const TopKOutput owned = select(router, logits, ids, T - 3, &d);
    EXPECT_EQ(owned.topk_ids, outs[0].topk_ids);
    EXPECT_EQ(owned.topk_weights, outs[0].topk_weights);
    EXPECT_EQ(owned.topk_ids(T - 1, 0), -1);
}

// ------------------------------------------------------------------------------------------------
// Errors.

struct ErrorCase {
    std::string name;
    std::function<void()> call;
    std::string needle;
};

RowMatrix<std::int32_t> small_table() { return matrix<std::int32_t>({{0, 1}, {2, 3}, {3, 1}}); }

void select_into(Index ids_rows, int ids_cols, Index w_rows, int w_cols, Index rec_rows,
                 int rec_cols) {
    const HashRouter router(small_table(), Scoring::kSigmoid, 1.0f, 1);
    const RowMatrix<float> logits = RowMatrix<float>::Zero(2, 4);
    const std::vector<std::int32_t> ids = {0, 1};
    RowMatrix<std::int32_t> out_ids(ids_rows, ids_cols);
    RowMatrix<float> w(w_rows, w_cols);
    RowMatrix<std::int32_t> rec(rec_rows, rec_cols);
    router.select(cmap(logits), std::span<const std::int32_t>(ids), std::nullopt, nullptr,
                  TopKOutputView{mmap(out_ids), mmap(w), mmap(rec)});
}

std::vector<ErrorCase> hash_errors() {
    const RowMatrix<float> logits4 = RowMatrix<float>::Zero(3, 4);
    return {
        {"input_id_too_large",
         [=] {
             select<std::int32_t>(HashRouter(small_table()), logits4, {0, 3, 1});
         },
         "input_ids[1] = 3"},
        {"input_id_negative",
         [=] {
             select<std::int32_t>(HashRouter(small_table()), logits4, {0, 1, -1});
         },
         "input_ids[2] = -1"},
        {"input_id_int64_huge",
         [=] {
             select<std::int64_t>(HashRouter(small_table()), logits4, {1LL << 33, 0, 0});
         },
         "input_ids[0]"},
        {"input_id_out_of_range_before_padding",
         [=] {
             select<std::int32_t>(HashRouter(small_table()), logits4, {0, 5, 9}, 2);
         },
         "input_ids[1] = 5"},
        {"input_ids_wrong_length",
         [=] {
             select<std::int32_t>(HashRouter(small_table()), logits4, {0, 1});
         },
         "input_ids has 2"},
        {"tid2eid_id_beyond_logit_columns",
         [] {
             select<std::int32_t>(HashRouter(small_table()), RowMatrix<float>::Zero(2, 3), {0, 0});
         },
         "tid2eid holds expert id 3"},
        {"tid2eid_negative",
         [] {
             (void)HashRouter(matrix<std::int32_t>({{0, 1}, {-1, 2}}));
         },
         "tid2eid[1, 0] = -1"},
        {"tid2eid_beyond_num_experts",
         [] { (void)HashRouter(small_table(), Scoring::kSqrtSoftplus, 1.0f, 0, false, 3); },
         "tid2eid[1, 1] = 3"},
        {"tid2eid_empty", [] { (void)HashRouter(RowMatrix<std::int32_t>(0, 2)); }, "tid2eid"},
        {"num_experts_mismatch",
         [] {
             const HashRouter router(small_table(), Scoring::kSqrtSoftplus, 1.0f, 0, false, 8);
             select<std::int32_t>(router, RowMatrix<float>::Zero(2, 4), {0, 1});
         },
         "num_experts=8"},
        {"num_experts_zero",
         [] { (void)HashRouter(small_table(), Scoring::kSqrtSoftplus, 1.0f, 0, false, 0); },
         "num_experts"},
        {"rsf_zero", [] { (void)HashRouter(small_table(), Scoring::kSigmoid, 0.0f); },
         "routed_scaling_factor"},
        {"rsf_nan", [] { (void)HashRouter(small_table(), Scoring::kSigmoid, kNaN); },
         "routed_scaling_factor"},
        {"two_shared_experts", [] { (void)HashRouter(small_table(), Scoring::kSigmoid, 1.0f, 2); },
         "num_fused_shared_experts"},
        {"non_padded_too_large",
         [=] {
             select<std::int32_t>(HashRouter(small_table()), logits4, {0, 1, 2}, 4);
         },
         "num_token_non_padded=4"},
        {"non_padded_negative",
         [=] {
             select<std::int32_t>(HashRouter(small_table()), logits4, {0, 1, 2}, -1);
         },
         "num_token_non_padded=-1"},
        {"topk_ids_shape", [] { select_into(2, 2, 2, 3, 2, 2); }, "topk_ids"},
        {"topk_weights_shape", [] { select_into(2, 3, 1, 3, 2, 2); }, "topk_weights"},
        {"recorder_topk_ids_shape", [] { select_into(2, 3, 2, 3, 2, 3); }, "recorder_topk_ids"},
        {"location_with_other_num_experts",
         [=] {
             const ExpertLocation loc = ExpertLocation::trivial(1, 6, 6, 1);
             const LayerDispatcher d(loc, 0, 0, DispatchAlgorithm::kSglangStatic, 0);
             select<std::int32_t>(HashRouter(small_table()), logits4, {0, 1, 2}, std::nullopt, &d);
         },
         "num_logical_experts=6"},
    };
}

class HashRouterErrors : public ::testing::TestWithParam<ErrorCase> {};

TEST_P(HashRouterErrors, ThrowsInvalidArgumentNamingTheParameter) {
    EXPECT_THROW(GetParam().call(), InvalidArgument);
    expect_invalid_argument(GetParam().call, GetParam().needle);
}

INSTANTIATE_TEST_SUITE_P(Cases, HashRouterErrors, ::testing::ValuesIn(hash_errors()),
                         [](const ::testing::TestParamInfo<ErrorCase>& info) {
                             return info.param.name;
                         });

}  // namespace
