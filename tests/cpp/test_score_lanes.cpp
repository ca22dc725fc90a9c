// Regression tests: an expert's score must not depend on its position in the row (or a token's on
// its place in the batch). Eigen computes the tail of an array that is not a whole number of
// packets with scalar code that rounds differently from its vector code, so in builds without
// AVX-512 (MOELB_NATIVE=OFF, as `make test-asan` builds) equal logits did not tie -- sqrt-softplus
// scored expert 4 of five above experts 0 and 2 -- and a NaN logit got a weight of 3e-39 rather
// than 0. Every row length from 1 to 40 crosses the packet boundaries of SSE, AVX and AVX-512.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "moelb/hash_router.hpp"
#include "moelb/routing.hpp"
#include "test_util.hpp"

namespace {

using moelb::HashRouter;
using moelb::Index;
using moelb::RowMatrix;
using moelb::Scoring;
using moelb::TopKConfig;
using moelb::TopKOutput;
using moelb::test_util::cmap;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr Scoring kScorings[] = {Scoring::kSoftmax, Scoring::kSigmoid, Scoring::kSqrtSoftplus};
constexpr float kValues[] = {2.0f, -1.0f, 0.5f, 0.0f, 7.25f, -30.0f, 25.0f};

std::string name(Scoring s, Index n, float v) {
    return std::string(moelb::to_string(s)) + " E=" + std::to_string(n) +
           " logit=" + std::to_string(v);
}

TEST(ScoreLanes, EqualLogitsTieAtEveryRowLength) {
    for (const Scoring s : kScorings) {
        for (Index n = 1; n <= 40; ++n) {
            for (const float v : kValues) {
                TopKConfig c;
                c.top_k = static_cast<int>(n);
                c.scoring = s;
                c.renormalize = false;
                RowMatrix<float> logits(1, n);
                logits.setConstant(v);
                const TopKOutput out = moelb::select_experts(cmap(logits), c);
                for (Index k = 0; k < n; ++k) {
                    // Ties go to the lowest id, so the columns are 0, 1, 2, ...
                    ASSERT_EQ(out.topk_ids(0, k), k) << name(s, n, v);
                    ASSERT_EQ(out.topk_weights(0, k), out.topk_weights(0, 0)) << name(s, n, v);
                }
            }
        }
    }
}

TEST(ScoreLanes, TiedExpertsAmongOthersKeepIdOrder) {
    // Three experts tie at 2.0 in a row of others, the last tied one in the row's tail.
    for (const Scoring s : kScorings) {
        for (Index n = 5; n <= 40; ++n) {
            TopKConfig c;
            c.top_k = 3;
            c.scoring = s;
            c.renormalize = false;
            RowMatrix<float> logits(1, n);
            for (Index e = 0; e < n; ++e) logits(0, e) = -1.0f - 0.01f * static_cast<float>(e);
            const Index tied[] = {0, n / 2, n - 1};
            for (const Index e : tied) logits(0, e) = 2.0f;
            const TopKOutput out = moelb::select_experts(cmap(logits), c);
            for (int k = 0; k < 3; ++k) ASSERT_EQ(out.topk_ids(0, k), tied[k]) << name(s, n, 2.0f);
            ASSERT_EQ(out.topk_weights(0, 0), out.topk_weights(0, 2)) << name(s, n, 2.0f);
        }
    }
}

TEST(ScoreLanes, NaNLogitsWeighExactlyZeroAtEveryRowLength) {
    for (const Scoring s : kScorings) {
        for (Index n = 2; n <= 40; ++n) {
            TopKConfig c;
            c.top_k = static_cast<int>(n);
            c.scoring = s;
            c.renormalize = false;
            RowMatrix<float> logits(2, n);
            logits.setConstant(kNaN);
            logits(0, 0) = 1.0f;  // row 0: one finite logit; row 1: all NaN
            const TopKOutput out = moelb::select_experts(cmap(logits), c);
            EXPECT_EQ(out.topk_ids(0, 0), 0) << name(s, n, kNaN);
            EXPECT_GT(out.topk_weights(0, 0), 0.0f) << name(s, n, kNaN);
            for (Index k = 1; k < n; ++k) {
                ASSERT_EQ(out.topk_weights(0, k), 0.0f) << name(s, n, kNaN) << " column " << k;
            }
            for (Index k = 0; k < n; ++k) {
                ASSERT_EQ(out.topk_weights(1, k), 0.0f) << name(s, n, kNaN) << " column " << k;
            }
        }
    }
}

TEST(ScoreLanes, HashRouterWeightsDoNotDependOnTheTokensRow) {
    // A guard (the hash router scores 64-row blocks, a whole number of packets, so it was not hit):
    // the same token (same logits, same id) at every fifth row of batches of 1..70 tokens, the
    // other rows holding different logits, gets bitwise the same weights everywhere, and its
    // three experts, tied below the row's maximum (expert 1), weigh the same.
    constexpr int E = 7, K = 3;
    RowMatrix<std::int32_t> tid2eid(2, K);
    tid2eid << 0, 3, 6, 1, 2, 5;
    for (const Scoring s : kScorings) {
        const HashRouter router(tid2eid, s, 1.0f, 0, false, E);
        for (const float v : kValues) {
            std::optional<std::vector<float>> expected;
            for (Index tokens = 1; tokens <= 70; tokens += 3) {
                for (Index row = 0; row < tokens; row += 5) {
                    RowMatrix<float> logits(tokens, E);
                    std::vector<std::int32_t> ids(static_cast<std::size_t>(tokens), 1);
                    for (Index t = 0; t < tokens; ++t) {
                        for (int e = 0; e < E; ++e) logits(t, e) = 0.1f * static_cast<float>(t + e);
                    }
                    for (int e = 0; e < E; ++e) logits(row, e) = e == 1 ? v + 1.0f : v;
                    ids[static_cast<std::size_t>(row)] = 0;
                    const TopKOutput out =
                        router.select(cmap(logits), std::span<const std::int32_t>(ids));
                    const float* w = out.topk_weights.row(row).data();
                    const std::vector<float> got(w, w + K);
                    if (!expected) expected = got;
                    ASSERT_EQ(got, *expected) << name(s, E, v) << " T=" << tokens << " row=" << row;
                    ASSERT_EQ(got[0], got[2]) << name(s, E, v);
                }
            }
        }
    }
}

}  // namespace
