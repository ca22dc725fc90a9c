// select_experts, TopKConfig and remap_topk_for_per_rank_shared_slots (routing.hpp).
//
// The main check compares select_experts with a scalar, sort-based reference written here in
// double precision, on random logits drawn so that every selection is unambiguous (rows whose
// reference has a near-tie that float rounding could flip are redrawn). Exact ties, NaN and inf
// logits, padding, dispatch, threads and every error path have their own tests.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <optional>
#include <random>
#include <set>
#include <span>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "moelb/errors.hpp"
#include "moelb/expert_location.hpp"
#include "moelb/parallel.hpp"
#include "moelb/routing.hpp"
#include "test_util.hpp"

namespace {

using namespace moelb::test_util;

using moelb::ConstMatrixMap;
using moelb::DispatchAlgorithm;
using moelb::ExpertLocation;
using moelb::GroupScore;
using moelb::Index;
using moelb::InvalidArgument;
using moelb::LayerDispatcher;
using moelb::MatrixMap;
using moelb::RowMatrix;
using moelb::Scoring;
using moelb::TopKConfig;
using moelb::TopKOutput;
using moelb::TopKOutputView;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

// ------------------------------------------------------------------------------------------------
// Helpers

TopKOutput route(const RowMatrix<float>& logits, const TopKConfig& config,
                 const std::vector<float>& bias = {},
                 std::optional<Index> non_padded = std::nullopt,
                 const LayerDispatcher* dispatcher = nullptr) {
    return moelb::select_experts(cmap(logits), config, std::span<const float>(bias), non_padded,
                                 dispatcher);
}

// ------------------------------------------------------------------------------------------------
// The reference router (double precision, sorts with ties to the lowest id).

double ref_activation(double x, Scoring scoring) {
    if (scoring == Scoring::kSigmoid) return 1.0 / (1.0 + std::exp(-x));
    return std::sqrt(x > 20.0 ? x : std::log1p(std::exp(x)));  // sqrt(softplus)
}

std::vector<double> ref_scores(const float* logits, int E, Scoring scoring) {
    std::vector<double> s(static_cast<std::size_t>(E));
    if (scoring == Scoring::kSoftmax) {
        double m = -std::numeric_limits<double>::infinity();
        for (int e = 0; e < E; ++e) m = std::max(m, static_cast<double>(logits[e]));
        double sum = 0.0;
        for (int e = 0; e < E; ++e) sum += std::exp(logits[e] - m);
        for (int e = 0; e < E; ++e) s[e] = std::exp(logits[e] - m) / sum;
    } else {
        for (int e = 0; e < E; ++e) s[e] = ref_activation(logits[e], scoring);
    }
    return s;
}

// Two different values closer than float rounding of the computation could be trusted to order.
bool near_tie(double a, double b) {
    return a != b && std::abs(a - b) < std::max(1e-4 * std::max(std::abs(a), std::abs(b)), 1e-6);
}

struct Reference {
    std::vector<double> score;   // [E] unbiased scores
    std::vector<double> choice;  // [E] score + bias
    std::vector<double> group_score;
    std::vector<int> kept_groups;  // ascending
    std::vector<int> ids;          // [K] routed, descending choice
    std::vector<double> weights;   // [K + F]
    bool ambiguous = false;
};

// Indices 0..n-1 sorted by value descending, ties to the lowest index.
std::vector<int> argsort_desc(const std::vector<double>& v) {
    std::vector<int> order(v.size());
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return v[a] > v[b]; });
    return order;
}

// The [K + F] weights of the experts a reference picked, under c's renormalize / rsf / shared
// settings.
std::vector<double> reference_weights(const Reference& r, const TopKConfig& c) {
    double sum = 0.0;
    for (const int id : r.ids) sum += r.score[id];
    const double rsf = c.routed_scaling_factor;
    const bool fold = c.apply_routed_scaling_factor_on_output;
    std::vector<double> weights;
    for (const int id : r.ids) {
        const double w = c.renormalize ? r.score[id] / sum : r.score[id];
        weights.push_back(fold ? w * rsf : w);
    }
    if (c.num_fused_shared_experts == 1) {
        // The shared expert's net contribution (weight x rsf applied somewhere) is the routed
        // weights' sum: 1 after renormalisation, else the raw sum.
        const double net = c.renormalize ? 1.0 : sum;
        weights.push_back(fold ? net : net / rsf);
    }
    return weights;
}

Reference reference_route(const float* logits, int E, const TopKConfig& c, const float* bias) {
    Reference r;
    r.score = ref_scores(logits, E, c.scoring);
    r.choice.resize(static_cast<std::size_t>(E));
    for (int e = 0; e < E; ++e) r.choice[e] = r.score[e] + (bias ? bias[e] : 0.0);

    std::vector<int> candidates;
    if (c.num_groups > 0) {
        const int per = E / c.num_groups;
        r.group_score.resize(static_cast<std::size_t>(c.num_groups));
        for (int g = 0; g < c.num_groups; ++g) {
            std::vector<double> v(r.choice.begin() + g * per, r.choice.begin() + (g + 1) * per);
            std::sort(v.begin(), v.end(), std::greater<>());
            const bool two = c.group_score == GroupScore::kTop2Sum && per >= 2;
            r.group_score[g] = two ? v[0] + v[1] : v[0];
        }
        const std::vector<int> order = argsort_desc(r.group_score);
        if (c.topk_group < c.num_groups &&
            near_tie(r.group_score[order[c.topk_group - 1]], r.group_score[order[c.topk_group]])) {
            r.ambiguous = true;
        }
        r.kept_groups.assign(order.begin(), order.begin() + c.topk_group);
        std::sort(r.kept_groups.begin(), r.kept_groups.end());
        for (const int g : r.kept_groups) {
            for (int i = 0; i < per; ++i) candidates.push_back(g * per + i);
        }
    } else {
        candidates.resize(static_cast<std::size_t>(E));
        std::iota(candidates.begin(), candidates.end(), 0);
    }
    std::stable_sort(candidates.begin(), candidates.end(),
                     [&](int a, int b) { return r.choice[a] > r.choice[b]; });
    const int K = c.top_k;
    r.ids.assign(candidates.begin(), candidates.begin() + K);
    if (K < static_cast<int>(candidates.size()) &&
        near_tie(r.choice[candidates[K - 1]], r.choice[candidates[K]])) {
        r.ambiguous = true;
    }
    for (int k = 0; k + 1 < K; ++k) {
        if (near_tie(r.choice[r.ids[k]], r.choice[r.ids[k + 1]])) r.ambiguous = true;
    }

    r.weights = reference_weights(r, c);
    return r;
}

// ------------------------------------------------------------------------------------------------
// Reference comparison over the configuration matrix.

struct Shape {
    const char* name;
    int num_experts;
    int top_k;
    int num_groups;
    int topk_group;
    GroupScore group_score;
};

const Shape kShapes[] = {
    {"e64k6", 64, 6, 0, 0, GroupScore::kTop2Sum},
    {"e7k3", 7, 3, 0, 0, GroupScore::kTop2Sum},
    {"e256k8_top2sum_g8tg4", 256, 8, 8, 4, GroupScore::kTop2Sum},
    {"e48k5_max_g6tg3", 48, 5, 6, 3, GroupScore::kMax},
    {"e16k4_top2sum_g16tg4", 16, 4, 16, 4, GroupScore::kTop2Sum},  // groups of one expert
    {"e32k8_max_g4tg1", 32, 8, 4, 1, GroupScore::kMax},            // K = every kept expert
    {"e24k3_top2sum_g3tg3", 24, 3, 3, 3, GroupScore::kTop2Sum},    // every group kept
    {"e9k9", 9, 9, 0, 0, GroupScore::kTop2Sum},                    // K = E
    {"e384k8", 384, 8, 0, 0, GroupScore::kTop2Sum},                // Kimi-K2 width
    {"e40k16", 40, 16, 0, 0, GroupScore::kTop2Sum},                // K = 16
    {"e64k20", 64, 20, 0, 0, GroupScore::kTop2Sum},                // K > 16
    {"e96k17_top2sum_g4tg2", 96, 17, 4, 2, GroupScore::kTop2Sum},
};

// The selection depends on the shape, the scoring and the bias; every test of this suite runs
// all eight renormalize x fused shared x rsf-folding output variants on the same logits.
using RoutingParam = std::tuple<Shape, Scoring, bool /*bias*/>;

struct OutputVariant {
    bool renormalize;
    int shared;
    bool fold;
};

std::vector<OutputVariant> output_variants() {
    std::vector<OutputVariant> v;
    for (const bool renormalize : {true, false}) {
        for (const int shared : {0, 1}) {
            for (const bool fold : {false, true}) v.push_back({renormalize, shared, fold});
        }
    }
    return v;
}

std::string describe(const OutputVariant& v) {
    return std::string(v.renormalize ? "renormalize" : "raw") + " F=" + std::to_string(v.shared) +
           (v.fold ? " rsf folded" : " rsf unfolded");
}

TopKConfig config_of(const RoutingParam& p, const OutputVariant& v) {
    const auto& [shape, scoring, bias] = p;
    TopKConfig c;
    c.top_k = shape.top_k;
    c.scoring = scoring;
    c.num_groups = shape.num_groups;
    c.topk_group = shape.topk_group;
    c.group_score = shape.group_score;
    c.renormalize = v.renormalize;
    c.routed_scaling_factor = 2.5f;
    c.apply_routed_scaling_factor_on_output = v.fold;
    c.num_fused_shared_experts = v.shared;
    return c;
}

std::string routing_name(const ::testing::TestParamInfo<RoutingParam>& info) {
    const auto& [shape, scoring, bias] = info.param;
    return std::string(shape.name) + "_" + std::string(moelb::to_string(scoring)) +
           (bias ? "_bias" : "_nobias");
}

std::vector<float> draw_bias(Rng& rng, int E, Scoring scoring) {
    // Biases of the order of the scores, so they change the selection.
    const double range = scoring == Scoring::kSoftmax ? 0.02 : 0.5;
    std::vector<float> b(static_cast<std::size_t>(E));
    for (auto& x : b) x = static_cast<float>(rng.uniform(-range, range));
    return b;
}

class RoutingReference : public ::testing::TestWithParam<RoutingParam> {};

// Properties of one output that hold whatever the ties.
void check_invariants(const RowMatrix<float>& logits, const TopKConfig& c,
                      const std::vector<float>& bias) {
    const Index T = logits.rows();
    const int E = static_cast<int>(logits.cols()), K = c.top_k;
    const TopKOutput out = route(logits, c, bias);
    const double rsf = c.routed_scaling_factor;
    const double target = c.apply_routed_scaling_factor_on_output ? rsf : 1.0;
    for (Index t = 0; t < T; ++t) {
        const Reference r =
            reference_route(logits.row(t).data(), E, c, bias.empty() ? nullptr : bias.data());
        std::set<int> seen;
        double sum = 0.0;
        for (int k = 0; k < K; ++k) {
            const int id = out.topk_ids(t, k);
            ASSERT_GE(id, 0);
            ASSERT_LT(id, E);
            EXPECT_TRUE(seen.insert(id).second) << "row " << t << ": expert " << id << " twice";
            EXPECT_GE(out.topk_weights(t, k), 0.0f);
            sum += out.topk_weights(t, k);
            if (k > 0) {
                const double prev = r.choice[out.topk_ids(t, k - 1)], cur = r.choice[id];
                EXPECT_TRUE(prev >= cur || near_tie(prev, cur))
                    << "row " << t << ": column " << k << " out of choice order";
            }
        }
        if (c.renormalize) {
            EXPECT_NEAR(sum, target, 1e-5 * target) << "row " << t;
        }
        if (c.num_fused_shared_experts == 1) {
            EXPECT_EQ(out.topk_ids(t, K), E);
            // Net of rsf, the shared expert contributes what the routed experts contribute
            // together (1 after renormalisation).
            const bool fold = c.apply_routed_scaling_factor_on_output;
            const double shared_net = out.topk_weights(t, K) * (fold ? 1.0 : rsf);
            const double routed_net = sum / (fold ? rsf : 1.0);
            EXPECT_NEAR(shared_net, routed_net, 1e-5 * (1.0 + routed_net)) << "row " << t;
        }
        if (c.grouped()) {
            // Every pick lies in a group whose score is among the topk_group best.
            std::vector<double> sorted = r.group_score;
            std::sort(sorted.begin(), sorted.end(), std::greater<>());
            const double threshold = sorted[c.topk_group - 1];
            const int per = E / c.num_groups;
            std::set<int> groups;
            for (int k = 0; k < K; ++k) {
                const int g = out.topk_ids(t, k) / per;
                groups.insert(g);
                const double gs = r.group_score[g];
                EXPECT_TRUE(gs >= threshold || near_tie(gs, threshold))
                    << "row " << t << ": pick from group " << g << " outside the best groups";
            }
            EXPECT_LE(static_cast<int>(groups.size()), c.topk_group);
        }
        // The choice order means the K-th pick is at least as good as any unpicked candidate of
        // a kept group; for ungrouped routing, as any unpicked expert.
        if (!c.grouped()) {
            const double kth = r.choice[out.topk_ids(t, K - 1)];
            for (int e = 0; e < E; ++e) {
                if (seen.count(e)) continue;
                EXPECT_TRUE(kth >= r.choice[e] || near_tie(kth, r.choice[e]))
                    << "row " << t << ": expert " << e << " beats the last pick";
            }
        }
    }
}

TEST_P(RoutingReference, MatchesScalarReference) {
    const Shape shape = std::get<0>(GetParam());
    const bool use_bias = std::get<2>(GetParam());
    const TopKConfig base = config_of(GetParam(), output_variants()[0]);
    const int E = shape.num_experts, K = base.top_k;
    const Index T = 120;
    Rng rng(1234u + static_cast<std::uint32_t>(E * 7 + K));
    const std::vector<float> bias =
        use_bias ? draw_bias(rng, E, base.scoring) : std::vector<float>{};

    // Draw rows whose selection is unambiguous (no near-ties that float rounding could flip).
    RowMatrix<float> logits(T, E);
    std::vector<Reference> refs;
    int redraws = 0;
    for (Index t = 0; t < T; ++t) {
        for (;;) {
            for (int e = 0; e < E; ++e) logits(t, e) = static_cast<float>(rng.uniform(-4.0, 4.0));
            Reference r =
                reference_route(logits.row(t).data(), E, base, use_bias ? bias.data() : nullptr);
            if (!r.ambiguous) {
                refs.push_back(std::move(r));
                break;
            }
            ASSERT_LT(++redraws, 20 * T) << "too many ambiguous rows; the generator is broken";
        }
    }

    for (const OutputVariant& v : output_variants()) {
        SCOPED_TRACE(describe(v));
        const TopKConfig c = config_of(GetParam(), v);
        const int F = c.num_fused_shared_experts;
        const TopKOutput out = route(logits, c, bias);
        ASSERT_EQ(out.topk_ids.rows(), T);
        ASSERT_EQ(out.topk_ids.cols(), K + F);
        ASSERT_EQ(out.topk_weights.cols(), K + F);
        ASSERT_EQ(out.recorder_topk_ids.cols(), K);
        for (Index t = 0; t < T; ++t) {
            const Reference& r = refs[static_cast<std::size_t>(t)];
            const std::vector<double> want = reference_weights(r, c);
            for (int k = 0; k < K; ++k) {
                ASSERT_EQ(out.topk_ids(t, k), r.ids[k]) << "row " << t << " column " << k;
                ASSERT_EQ(out.recorder_topk_ids(t, k), r.ids[k]) << "row " << t << " column " << k;
            }
            if (F == 1) {
                ASSERT_EQ(out.topk_ids(t, K), E) << "row " << t;
            }
            for (int k = 0; k < K + F; ++k) {
                ASSERT_NEAR(out.topk_weights(t, k), want[k], 1e-5 * std::abs(want[k]) + 1e-7)
                    << "row " << t << " column " << k;
            }
        }
    }
}

TEST_P(RoutingReference, Invariants) {
    // On unfiltered random input (near-ties allowed): properties that hold whatever the ties.
    const bool use_bias = std::get<2>(GetParam());
    const int E = std::get<0>(GetParam()).num_experts;
    const Index T = 100;
    Rng rng(99u + static_cast<std::uint32_t>(E));
    const std::vector<float> bias =
        use_bias ? draw_bias(rng, E, std::get<1>(GetParam())) : std::vector<float>{};
    RowMatrix<float> logits(T, E);
    for (Index t = 0; t < T; ++t) {
        // Coarse values on half the rows so exact ties are frequent.
        for (int e = 0; e < E; ++e) {
            const double x = rng.uniform(-3.0, 3.0);
            logits(t, e) = static_cast<float>(t % 2 == 0 ? std::round(x) : x);
        }
    }
    for (const OutputVariant& v : output_variants()) {
        SCOPED_TRACE(describe(v));
        check_invariants(logits, config_of(GetParam(), v), bias);
    }
}

INSTANTIATE_TEST_SUITE_P(Matrix, RoutingReference,
                         ::testing::Combine(::testing::ValuesIn(kShapes),
                                            ::testing::Values(Scoring::kSoftmax, Scoring::kSigmoid,
                                                              Scoring::kSqrtSoftplus),
                                            ::testing::Bool()),
                         routing_name);

// ------------------------------------------------------------------------------------------------
// Exact ties: the lowest expert id wins.

class RoutingTies : public ::testing::TestWithParam<Scoring> {};

std::string scoring_name(const ::testing::TestParamInfo<Scoring>& info) {
    return std::string(moelb::to_string(info.param));
}

TEST_P(RoutingTies, AllEqualLogitsPickLowestIds) {
    for (const bool grouped : {false, true}) {
        TopKConfig c;
        c.top_k = 5;
        c.scoring = GetParam();
        if (grouped) {
            c.num_groups = 4;
            c.topk_group = 2;
        }
        const RowMatrix<float> logits = RowMatrix<float>::Constant(3, 16, 0.75f);
        const TopKOutput out = route(logits, c);
        for (Index t = 0; t < 3; ++t) {
            for (int k = 0; k < 5; ++k) {
                EXPECT_EQ(out.topk_ids(t, k), k) << "grouped=" << grouped;
                EXPECT_FLOAT_EQ(out.topk_weights(t, k), 0.2f) << "grouped=" << grouped;
            }
        }
    }
}

TEST_P(RoutingTies, DuplicatedValuesPickLowestIdFirst) {
    TopKConfig c;
    c.top_k = 3;
    c.scoring = GetParam();
    c.renormalize = false;
    // Experts 1, 3 and 4 tie for the best value, 0 and 2 for the second.
    const RowMatrix<float> logits =
        matrix<float>({{1.0f, 3.0f, 1.0f, 3.0f, 3.0f}, {2.0f, -1.0f, 2.0f, 0.5f, 2.0f}});
    const TopKOutput out = route(logits, c);
    EXPECT_EQ(out.topk_ids(0, 0), 1);
    EXPECT_EQ(out.topk_ids(0, 1), 3);
    EXPECT_EQ(out.topk_ids(0, 2), 4);
    EXPECT_EQ(out.topk_ids(1, 0), 0);
    EXPECT_EQ(out.topk_ids(1, 1), 2);
    EXPECT_EQ(out.topk_ids(1, 2), 4);
    // Equal logits, equal weights.
    EXPECT_EQ(out.topk_weights(0, 0), out.topk_weights(0, 2));
    EXPECT_EQ(out.topk_weights(1, 0), out.topk_weights(1, 1));
}

TEST_P(RoutingTies, QuantizedLogitsMatchReference) {
    // Logits from a few values: many exact ties, which the reference breaks by lowest id too.
    // Group scores use "max" here (a max of equal values is exact; top-2 sums of different pairs
    // could be near-ties).
    const Shape shapes[] = {
        {"e12k4", 12, 4, 0, 0, GroupScore::kMax},
        {"e100k20", 100, 20, 0, 0, GroupScore::kMax},
        {"e256k8_g8tg4", 256, 8, 8, 4, GroupScore::kMax},
        {"e64k17_g4tg2", 64, 17, 4, 2, GroupScore::kMax},
    };
    Rng rng(7);
    const float values[] = {-1.0f, 0.0f, 0.5f, 2.0f};
    for (const Shape& shape : shapes) {
        SCOPED_TRACE(shape.name);
        TopKConfig c;
        c.top_k = shape.top_k;
        c.scoring = GetParam();
        c.num_groups = shape.num_groups;
        c.topk_group = shape.topk_group;
        c.group_score = shape.group_score;
        const int E = shape.num_experts;
        RowMatrix<float> logits(100, E);
        for (Index t = 0; t < logits.rows(); ++t) {
            for (int e = 0; e < E; ++e) logits(t, e) = values[rng.below(4)];
        }
        const TopKOutput out = route(logits, c);
        for (Index t = 0; t < logits.rows(); ++t) {
            const Reference r = reference_route(logits.row(t).data(), E, c, nullptr);
            for (int k = 0; k < c.top_k; ++k) {
                ASSERT_EQ(out.topk_ids(t, k), r.ids[k]) << "row " << t << " column " << k;
            }
        }
    }
}

TEST_P(RoutingTies, TiedGroupsKeepLowestGroupIds) {
    TopKConfig c;
    c.top_k = 2;
    c.scoring = GetParam();
    c.num_groups = 4;
    c.topk_group = 2;
    // Groups of two; groups 1, 2 and 3 tie (both top2_sum and max); group 0 is worse.
    const RowMatrix<float> logits =
        matrix<float>({{0.0f, 0.0f, 3.0f, 1.0f, 1.0f, 3.0f, 3.0f, 1.0f}});
    for (const GroupScore gs : {GroupScore::kTop2Sum, GroupScore::kMax}) {
        c.group_score = gs;
        const TopKOutput out = route(logits, c);
        // Groups 1 and 2 are kept: experts 2..5; the best two are 2 and 5 (expert 6 is dropped).
        EXPECT_EQ(out.topk_ids(0, 0), 2) << moelb::to_string(gs);
        EXPECT_EQ(out.topk_ids(0, 1), 5) << moelb::to_string(gs);
    }
}

INSTANTIATE_TEST_SUITE_P(Scorings, RoutingTies,
                         ::testing::Values(Scoring::kSoftmax, Scoring::kSigmoid,
                                           Scoring::kSqrtSoftplus),
                         scoring_name);

TEST(Routing, Top2SumCountsADuplicatedMaximumTwice) {
    // Group 0 = {3, 3, -5, -5}: top-2 sum 6 (the maximum twice). Group 1 = {4, 1, 1, 1}: 5.
    // With "max", group 1 (4) beats group 0 (3).
    TopKConfig c;
    c.top_k = 1;
    c.scoring = Scoring::kSigmoid;
    c.renormalize = false;
    c.num_groups = 2;
    c.topk_group = 1;
    // Sigmoid is monotone but not linear, so compare sums of sigmoids: 2*s(3)=1.905 > s(4)+s(1)
    // = 1.713.
    const RowMatrix<float> logits = matrix<float>({{3, 3, -5, -5, 4, 1, 1, 1}});
    c.group_score = GroupScore::kTop2Sum;
    EXPECT_EQ(route(logits, c).topk_ids(0, 0), 0);
    c.group_score = GroupScore::kMax;
    EXPECT_EQ(route(logits, c).topk_ids(0, 0), 4);
}

TEST(Routing, WeightsAreUnbiasedScoresOfBiasedChoice) {
    // The bias decides the selection; the weights stay the bias-free scores.
    TopKConfig c;
    c.top_k = 2;
    c.scoring = Scoring::kSigmoid;
    c.renormalize = false;
    const RowMatrix<float> logits = matrix<float>({{2.0f, 1.0f, 0.0f, -1.0f}});
    const std::vector<float> bias = {-1.0f, 0.0f, 0.5f, 2.0f};
    const TopKOutput out = route(logits, c, bias);
    // choice = [0.88-1, 0.73, 0.5+0.5, 0.27+2] -> experts 3, 2.
    EXPECT_EQ(out.topk_ids(0, 0), 3);
    EXPECT_EQ(out.topk_ids(0, 1), 2);
    EXPECT_NEAR(out.topk_weights(0, 0), 1.0 / (1.0 + std::exp(1.0)), 1e-6);
    EXPECT_NEAR(out.topk_weights(0, 1), 0.5, 1e-6);
}

// ------------------------------------------------------------------------------------------------
// NaN and infinite logits.

class RoutingNonFinite : public ::testing::TestWithParam<Scoring> {};

TEST_P(RoutingNonFinite, NaNNeverSelectedWhileEnoughFiniteExperts) {
    TopKConfig c;
    c.top_k = 3;
    c.scoring = GetParam();
    const RowMatrix<float> logits = matrix<float>({{kNaN, -2.0f, kNaN, -3.0f, kNaN, -4.0f, kNaN},
                                                   {kNaN, kNaN, kNaN, kNaN, 0.5f, -0.5f, 7.0f},
                                                   {1.0f, kNaN, 2.0f, kNaN, 3.0f, kNaN, kNaN}});
    const TopKOutput out = route(logits, c);
    const int expected[3][3] = {{1, 3, 5}, {6, 4, 5}, {4, 2, 0}};
    for (Index t = 0; t < 3; ++t) {
        double sum = 0.0;
        for (int k = 0; k < 3; ++k) {
            EXPECT_EQ(out.topk_ids(t, k), expected[t][k]) << "row " << t;
            EXPECT_TRUE(std::isfinite(out.topk_weights(t, k))) << "row " << t;
            EXPECT_GT(out.topk_weights(t, k), 0.0f) << "row " << t;
            sum += out.topk_weights(t, k);
        }
        EXPECT_NEAR(sum, 1.0, 1e-5);
    }
}

TEST_P(RoutingNonFinite, NaNInGroupedSelection) {
    TopKConfig c;
    c.top_k = 2;
    c.scoring = GetParam();
    c.num_groups = 2;
    c.topk_group = 1;
    c.group_score = GroupScore::kMax;
    // Group 0 holds NaNs and the best finite value; its experts other than the NaNs win.
    const RowMatrix<float> logits =
        matrix<float>({{kNaN, 5.0f, kNaN, 4.0f, 1.0f, 1.0f, 1.0f, 1.0f}});
    const TopKOutput out = route(logits, c);
    EXPECT_EQ(out.topk_ids(0, 0), 1);
    EXPECT_EQ(out.topk_ids(0, 1), 3);
}

TEST_P(RoutingNonFinite, AllNaNRowGivesFiniteZeroWeights) {
    for (const bool renormalize : {true, false}) {
        TopKConfig c;
        c.top_k = 3;
        c.scoring = GetParam();
        c.renormalize = renormalize;
        c.num_fused_shared_experts = 1;
        c.routed_scaling_factor = 2.0f;
        const RowMatrix<float> logits =
            matrix<float>({{kNaN, kNaN, kNaN, kNaN, kNaN}, {0.0f, 1.0f, 2.0f, 3.0f, 4.0f}});
        const TopKOutput out = route(logits, c);
        std::set<int> ids;
        for (int k = 0; k < 3; ++k) {
            const int id = out.topk_ids(0, k);
            EXPECT_TRUE(id >= 0 && id < 5) << id;
            ids.insert(id);
            EXPECT_EQ(out.topk_weights(0, k), 0.0f) << "renormalize=" << renormalize;
        }
        EXPECT_EQ(ids.size(), 3u);
        EXPECT_EQ(out.topk_ids(0, 3), 5);
        EXPECT_TRUE(std::isfinite(out.topk_weights(0, 3)));
        // Renormalised, the shared weight is 1/rsf regardless; raw, it is the (zero) sum / rsf.
        EXPECT_FLOAT_EQ(out.topk_weights(0, 3), renormalize ? 0.5f : 0.0f);
        // The healthy row next to it is unaffected.
        EXPECT_EQ(out.topk_ids(1, 0), 4);
    }
}

TEST_P(RoutingNonFinite, InfiniteLogitsGiveNoNaN) {
    for (const bool renormalize : {true, false}) {
        for (const bool grouped : {false, true}) {
            TopKConfig c;
            c.top_k = 3;
            c.scoring = GetParam();
            c.renormalize = renormalize;
            if (grouped) {
                c.num_groups = 2;
                c.topk_group = 1;
            }
            const RowMatrix<float> logits =
                matrix<float>({{0.0f, kInf, -kInf, 1.0f, 2.0f, -1.0f},
                               {kInf, 1.0f, kInf, -kInf, kNaN, 0.0f},
                               {-kInf, -kInf, -kInf, -kInf, -kInf, -kInf}});
            const TopKOutput out = route(logits, c);
            for (Index t = 0; t < logits.rows(); ++t) {
                std::set<int> ids;
                for (int k = 0; k < 3; ++k) {
                    EXPECT_TRUE(std::isfinite(out.topk_weights(t, k)))
                        << "row " << t << " renormalize=" << renormalize << " grouped=" << grouped;
                    EXPECT_GE(out.topk_weights(t, k), 0.0f);
                    ids.insert(out.topk_ids(t, k));
                }
                EXPECT_EQ(ids.size(), 3u);
            }
            // +inf wins (the lowest of equal +inf ids first). Under sigmoid a group's score is
            // bounded (1 per expert), so in row 0 the group {1, 2, -1} outscores {0, inf, -inf}.
            const bool sigmoid = GetParam() == Scoring::kSigmoid;
            EXPECT_EQ(out.topk_ids(0, 0), grouped && sigmoid ? 4 : 1);
            EXPECT_EQ(out.topk_ids(1, 0), 0);
            if (!grouped) {
                EXPECT_EQ(out.topk_ids(1, 1), 2);
            }
            if (renormalize) {
                double sum = 0.0;
                for (int k = 0; k < 3; ++k) sum += out.topk_weights(0, k);
                EXPECT_NEAR(sum, 1.0, 1e-5);
                // The +inf expert takes (nearly) all the weight except under sigmoid, where it
                // scores 1 like any large logit.
                if (!sigmoid) {
                    EXPECT_NEAR(out.topk_weights(0, 0), 1.0, 1e-5);
                }
            }
        }
    }
}

TEST_P(RoutingNonFinite, UnderflowingRowsGiveFiniteWeights) {
    // Regression of SGLang issue #30989: logits near -100 with a large bias make every chosen
    // score underflow; renormalisation must not produce 0/0.
    const int E = 256;
    RowMatrix<float> logits(4, E);
    Rng rng(30989);
    for (int e = 0; e < E; ++e) {
        logits(0, e) = static_cast<float>(rng.uniform(-101.0, -99.0));
        logits(1, e) = static_cast<float>(rng.uniform(-2.0, 2.0));
        logits(2, e) = -1e30f;
        logits(3, e) = static_cast<float>(rng.uniform(-101.0, -99.0));
    }
    std::vector<float> bias(E);
    for (auto& b : bias) b = static_cast<float>(rng.uniform(11.0, 11.4));
    for (const bool grouped : {false, true}) {
        TopKConfig c = TopKConfig::deepseek_v3();
        c.scoring = GetParam();
        if (!grouped) c.num_groups = c.topk_group = 0;
        const TopKOutput out = route(logits, c, bias);
        for (Index t = 0; t < 4; ++t) {
            double sum = 0.0;
            for (int k = 0; k < 8; ++k) {
                EXPECT_TRUE(std::isfinite(out.topk_weights(t, k))) << "row " << t;
                sum += out.topk_weights(t, k);
            }
            if (t == 1) {
                EXPECT_NEAR(sum, 1.0, 1e-5);
            }
            EXPECT_LE(sum, 1.0 + 1e-5);
        }
    }
}

INSTANTIATE_TEST_SUITE_P(Scorings, RoutingNonFinite,
                         ::testing::Values(Scoring::kSoftmax, Scoring::kSigmoid,
                                           Scoring::kSqrtSoftplus),
                         scoring_name);

// ------------------------------------------------------------------------------------------------
// Worked values of the scoring functions and the renormalize x rsf x shared matrix.

TEST(Routing, ScoringFunctionValues) {
    const RowMatrix<float> logits = matrix<float>({{0.0f, 1.0f, 2.0f, 3.0f}});
    TopKConfig c;
    c.top_k = 4;
    c.renormalize = false;
    c.scoring = Scoring::kSqrtSoftplus;
    TopKOutput out = route(logits, c);
    for (int k = 0; k < 4; ++k) {
        EXPECT_EQ(out.topk_ids(0, k), 3 - k);
        EXPECT_NEAR(out.topk_weights(0, k), std::sqrt(std::log(1.0 + std::exp(3.0 - k))), 1e-6);
    }
    // Reference section 6.4 lists these scores for logits [0, 1, 2, 3].
    EXPECT_NEAR(out.topk_weights(0, 3), 0.832555, 1e-5);
    EXPECT_NEAR(out.topk_weights(0, 0), 1.746020, 1e-5);
    c.scoring = Scoring::kSoftmax;
    out = route(logits, c);
    const double z = 1.0 + std::exp(1.0) + std::exp(2.0) + std::exp(3.0);
    for (int k = 0; k < 4; ++k) EXPECT_NEAR(out.topk_weights(0, k), std::exp(3.0 - k) / z, 1e-6);
    c.scoring = Scoring::kSigmoid;
    out = route(logits, c);
    for (int k = 0; k < 4; ++k) {
        EXPECT_NEAR(out.topk_weights(0, k), 1.0 / (1.0 + std::exp(-(3.0 - k))), 1e-6);
    }
    // Past the softplus threshold (x > 20) sqrt(x) is used.
    c.scoring = Scoring::kSqrtSoftplus;
    c.top_k = 1;
    out = route(matrix<float>({{25.0f, 0.0f}}), c);
    EXPECT_NEAR(out.topk_weights(0, 0), 5.0, 1e-5);
}

TEST(Routing, ScoresAccurateOverTheWholeFloatRange) {
    // One expert per row, raw weights: the weight is the score of the logit. Compared with the
    // double-precision definitions over logits from deep in the tails to the largest float.
    std::vector<float> xs;
    for (float x = -170.0f; x < -30.0f; x += 7.3f) xs.push_back(x);
    for (float x = -30.0f; x <= 30.0f; x += 0.173f) xs.push_back(x);
    for (const float x : {-20.0f, -1e-3f, -1e-7f, 0.0f, 1e-7f, 1e-3f, 19.99f, 20.0f, 20.01f, 45.0f,
                          100.0f, 1e4f, 1e10f, 1e30f, std::numeric_limits<float>::max()}) {
        xs.push_back(x);
    }
    RowMatrix<float> logits(static_cast<Index>(xs.size()), 2);
    for (Index t = 0; t < logits.rows(); ++t) {
        logits(t, 0) = xs[static_cast<std::size_t>(t)];
        logits(t, 1) = -std::numeric_limits<float>::infinity();  // never chosen over column 0
    }
    for (const Scoring scoring : {Scoring::kSigmoid, Scoring::kSqrtSoftplus}) {
        TopKConfig c;
        c.top_k = 1;
        c.scoring = scoring;
        c.renormalize = false;
        const TopKOutput out = route(logits, c);
        for (Index t = 0; t < logits.rows(); ++t) {
            const double x = xs[static_cast<std::size_t>(t)];
            double want;
            if (scoring == Scoring::kSigmoid) {
                want = 1.0 / (1.0 + std::exp(-x));
            } else {
                // sqrt(softplus): log1p(exp(x)) without overflow, PyTorch's threshold 20.
                want = std::sqrt(x > 20.0 ? x : std::log1p(std::exp(x)));
            }
            ASSERT_EQ(out.topk_ids(t, 0), 0);
            if (scoring == Scoring::kSigmoid && x < -80.0) continue;  // below float's range
            EXPECT_NEAR(out.topk_weights(t, 0), want, 4e-6 * want)
                << moelb::to_string(scoring) << "(" << x << ")";
        }
    }
    // Softmax of two logits d apart: 1 / (1 + exp(-d)).
    TopKConfig c;
    c.top_k = 1;
    c.renormalize = false;
    for (Index t = 0; t < logits.rows(); ++t) logits(t, 1) = 0.0f;
    const TopKOutput out = route(logits, c);
    for (Index t = 0; t < logits.rows(); ++t) {
        const double x = xs[static_cast<std::size_t>(t)];
        const int best = x >= 0.0 ? 0 : 1;
        EXPECT_EQ(out.topk_ids(t, 0), best) << x;
        const double want = 1.0 / (1.0 + std::exp(-std::abs(x)));
        EXPECT_NEAR(out.topk_weights(t, 0), want, 4e-6 * want) << "softmax(" << x << ", 0)";
    }
}

TEST(Routing, SharedColumnAndScalingMatrix) {
    // Sigmoid scores of logits 0 and ln 3: 0.5 and 0.75, sum 1.25; rsf 2.5.
    const RowMatrix<float> logits = matrix<float>({{0.0f, std::log(3.0f), -30.0f}});
    struct Row {
        bool renormalize, fold;
        double w0, w1, shared;
    };
    const Row rows[] = {
        {true, false, 0.6, 0.4, 1.0 / 2.5},          // weights sum 1; shared 1/rsf
        {true, true, 1.5, 1.0, 1.0},                 // weights sum rsf; shared 1
        {false, false, 0.75, 0.5, 1.25 / 2.5},       // raw; shared sum/rsf
        {false, true, 0.75 * 2.5, 0.5 * 2.5, 1.25},  // raw x rsf; shared sum
    };
    for (const Row& r : rows) {
        TopKConfig c;
        c.top_k = 2;
        c.scoring = Scoring::kSigmoid;
        c.renormalize = r.renormalize;
        c.apply_routed_scaling_factor_on_output = r.fold;
        c.routed_scaling_factor = 2.5f;
        c.num_fused_shared_experts = 1;
        const TopKOutput out = route(logits, c);
        const std::string what =
            "renormalize=" + std::to_string(r.renormalize) + " fold=" + std::to_string(r.fold);
        EXPECT_EQ(out.topk_ids(0, 0), 1) << what;
        EXPECT_EQ(out.topk_ids(0, 1), 0) << what;
        EXPECT_EQ(out.topk_ids(0, 2), 3) << what;
        EXPECT_NEAR(out.topk_weights(0, 0), r.w0, 1e-6) << what;
        EXPECT_NEAR(out.topk_weights(0, 1), r.w1, 1e-6) << what;
        EXPECT_NEAR(out.topk_weights(0, 2), r.shared, 1e-6) << what;
        EXPECT_EQ(out.recorder_topk_ids.cols(), 2);
        EXPECT_EQ(out.recorder_topk_ids(0, 0), 1);
        EXPECT_EQ(out.recorder_topk_ids(0, 1), 0);
    }
}

// ------------------------------------------------------------------------------------------------
// Padding and dispatch.

class RoutingPadding : public ::testing::TestWithParam<std::tuple<int, bool>> {};

TEST_P(RoutingPadding, PaddedRowsAreMasked) {
    const auto [shared, with_location] = GetParam();
    TopKConfig c = TopKConfig::deepseek_v3();
    c.num_fused_shared_experts = shared;
    const int E = 64, T = 40;
    Rng rng(5);
    RowMatrix<float> logits(T, E);
    for (Index t = 0; t < T; ++t) {
        for (int e = 0; e < E; ++e) logits(t, e) = static_cast<float>(rng.uniform(-3, 3));
    }
    const ExpertLocation loc = ExpertLocation::trivial(1, E, 80, 4);
    const LayerDispatcher dispatcher(loc, 0, 1, DispatchAlgorithm::kSglangStatic, 3);
    const LayerDispatcher* d = with_location ? &dispatcher : nullptr;
    const TopKOutput full = route(logits, c, {}, std::nullopt, d);
    for (const Index non_padded : {Index{0}, Index{1}, Index{25}, Index{T}}) {
        const TopKOutput out = route(logits, c, {}, non_padded, d);
        for (Index t = 0; t < T; ++t) {
            for (int k = 0; k < c.output_columns(); ++k) {
                if (t >= non_padded) {
                    EXPECT_EQ(out.topk_ids(t, k), -1) << "row " << t;
                    EXPECT_EQ(out.topk_weights(t, k), 0.0f) << "row " << t;
                } else {
                    // Rows before the padding are as without padding.
                    EXPECT_EQ(out.topk_ids(t, k), full.topk_ids(t, k));
                    EXPECT_EQ(out.topk_weights(t, k), full.topk_weights(t, k));
                }
            }
            for (int k = 0; k < c.top_k; ++k) {
                EXPECT_EQ(out.recorder_topk_ids(t, k), t >= non_padded ? -1 : full.topk_ids(t, k));
            }
        }
    }
}

INSTANTIATE_TEST_SUITE_P(Cases, RoutingPadding,
                         ::testing::Combine(::testing::Values(0, 1), ::testing::Bool()),
                         [](const ::testing::TestParamInfo<std::tuple<int, bool>>& info) {
                             return "F" + std::to_string(std::get<0>(info.param)) +
                                    (std::get<1>(info.param) ? "_location" : "_logical");
                         });

class RoutingDispatch : public ::testing::TestWithParam<DispatchAlgorithm> {};

TEST_P(RoutingDispatch, LogicalIdsAreMappedToReplicas) {
    // E = 16 logical experts, P = 24 slots over W = 4 ranks (2 nodes); logical e lives at e and,
    // for e < 8, also at 16 + e.
    const int E = 16, P = 24, W = 4, layer = 1, rank = 2;
    const ExpertLocation loc = ExpertLocation::trivial(2, E, P, W, 2);
    const LayerDispatcher dispatcher(loc, layer, rank, GetParam(), 11);
    TopKConfig c;
    c.top_k = 4;
    c.scoring = Scoring::kSigmoid;
    c.num_fused_shared_experts = 1;
    Rng rng(3);
    RowMatrix<float> logits(60, E);
    for (Index t = 0; t < logits.rows(); ++t) {
        for (int e = 0; e < E; ++e) logits(t, e) = static_cast<float>(rng.uniform(-3, 3));
    }
    const TopKOutput logical = route(logits, c);
    const TopKOutput physical = route(logits, c, {}, std::nullopt, &dispatcher);
    const RowMatrix<std::int32_t> table =
        moelb::dispatch_table(loc, DispatchAlgorithm::kSglangStatic, rank);
    for (Index t = 0; t < logits.rows(); ++t) {
        for (int k = 0; k < c.top_k; ++k) {
            const int e = logical.topk_ids(t, k);
            const int p = physical.topk_ids(t, k);
            ASSERT_GE(p, 0);
            ASSERT_LT(p, P);
            EXPECT_EQ(loc.physical_to_logical()(layer, p), e) << "row " << t;
            EXPECT_EQ(physical.recorder_topk_ids(t, k), p);
            EXPECT_EQ(physical.topk_weights(t, k), logical.topk_weights(t, k));
            const auto reps = loc.replicas(layer, e);
            if (GetParam() == DispatchAlgorithm::kSglangStatic) {
                EXPECT_EQ(p, table(layer, e));
            } else if (GetParam() == DispatchAlgorithm::kRoundRobin) {
                EXPECT_EQ(p, reps[static_cast<std::size_t>((t + rank) % Index(reps.size()))]);
            }
        }
        // The shared column is slot P, not dispatched.
        EXPECT_EQ(physical.topk_ids(t, c.top_k), P);
        EXPECT_EQ(physical.topk_weights(t, c.top_k), logical.topk_weights(t, c.top_k));
    }
}

INSTANTIATE_TEST_SUITE_P(Algorithms, RoutingDispatch,
                         ::testing::Values(DispatchAlgorithm::kSglangStatic,
                                           DispatchAlgorithm::kSglangDynamic,
                                           DispatchAlgorithm::kRoundRobin),
                         [](const ::testing::TestParamInfo<DispatchAlgorithm>& info) {
                             return std::string(moelb::to_string(info.param));
                         });

// ------------------------------------------------------------------------------------------------
// Threads, output views, presets.

template <class T>
bool bitwise_equal(const RowMatrix<T>& a, const RowMatrix<T>& b) {
    return a.rows() == b.rows() && a.cols() == b.cols() &&
           std::memcmp(a.data(), b.data(), sizeof(T) * static_cast<std::size_t>(a.size())) == 0;
}

TEST(Routing, IdenticalForAnyThreadCount) {
    TopKConfig c = TopKConfig::deepseek_v3();
    c.num_fused_shared_experts = 1;
    const int E = 256;
    const Index T = 600;  // several chunks of rows
    Rng rng(21);
    RowMatrix<float> logits(T, E);
    for (Index t = 0; t < T; ++t) {
        for (int e = 0; e < E; ++e) logits(t, e) = static_cast<float>(rng.uniform(-4, 4));
    }
    const std::vector<float> bias = draw_bias(rng, E, Scoring::kSigmoid);
    const ExpertLocation loc = ExpertLocation::trivial(1, E, 288, 8, 2);
    std::vector<TopKOutput> outs;
    for (const int threads : {1, 2, 4}) {
        moelb::set_num_threads(threads);
        for (const auto algorithm :
             {DispatchAlgorithm::kSglangDynamic, DispatchAlgorithm::kSglangStatic}) {
            const LayerDispatcher d(loc, 0, 5, algorithm, 42);
            outs.push_back(route(logits, c, bias, T - 7, &d));
        }
        outs.push_back(route(logits, c, bias));
    }
    moelb::set_num_threads(0);
    for (std::size_t i = 3; i < outs.size(); ++i) {
        const TopKOutput& a = outs[i % 3];
        const TopKOutput& b = outs[i];
        EXPECT_TRUE(bitwise_equal(a.topk_ids, b.topk_ids)) << "output " << i;
        EXPECT_TRUE(bitwise_equal(a.topk_weights, b.topk_weights)) << "output " << i;
        EXPECT_TRUE(bitwise_equal(a.recorder_topk_ids, b.recorder_topk_ids)) << "output " << i;
    }
    // The three variants differ from one another (so the comparison is not vacuous).
    EXPECT_NE(outs[0].topk_ids, outs[2].topk_ids);
}

TEST(Routing, ViewOverloadWritesCallerBuffers) {
    TopKConfig c;
    c.top_k = 2;
    c.num_fused_shared_experts = 1;
    const RowMatrix<float> logits = matrix<float>({{0.0f, 2.0f, 1.0f}, {3.0f, 1.0f, 2.0f}});
    RowMatrix<std::int32_t> ids = RowMatrix<std::int32_t>::Constant(2, 3, -99);
    RowMatrix<float> weights = RowMatrix<float>::Constant(2, 3, -99.0f);
    RowMatrix<std::int32_t> rec = RowMatrix<std::int32_t>::Constant(2, 2, -99);
    moelb::select_experts(cmap(logits), c, {}, std::nullopt, nullptr,
                          TopKOutputView{mmap(ids), mmap(weights), mmap(rec)});
    const TopKOutput owned = route(logits, c);
    EXPECT_EQ(ids, owned.topk_ids);
    EXPECT_EQ(weights, owned.topk_weights);
    EXPECT_EQ(rec, owned.recorder_topk_ids);
    EXPECT_EQ(ids(0, 0), 1);
    EXPECT_EQ(ids(0, 1), 2);
    EXPECT_EQ(ids(1, 0), 0);
    EXPECT_EQ(ids(1, 2), 3);
}

TEST(Routing, ZeroTokens) {
    const RowMatrix<float> logits(0, 256);
    const TopKOutput out = route(logits, TopKConfig::deepseek_v3());
    EXPECT_EQ(out.topk_ids.rows(), 0);
    EXPECT_EQ(out.topk_ids.cols(), 8);
    EXPECT_EQ(out.recorder_topk_ids.cols(), 8);
}

TEST(Routing, Presets) {
    const TopKConfig v3 = TopKConfig::deepseek_v3();
    EXPECT_EQ(v3.top_k, 8);
    EXPECT_EQ(v3.scoring, Scoring::kSigmoid);
    EXPECT_EQ(v3.num_groups, 8);
    EXPECT_EQ(v3.topk_group, 4);
    EXPECT_EQ(v3.group_score, GroupScore::kTop2Sum);
    EXPECT_TRUE(v3.renormalize);
    EXPECT_FLOAT_EQ(v3.routed_scaling_factor, 2.5f);
    EXPECT_FALSE(v3.apply_routed_scaling_factor_on_output);
    EXPECT_EQ(v3.num_fused_shared_experts, 0);
    EXPECT_TRUE(v3.grouped());
    EXPECT_EQ(v3.output_columns(), 8);
    EXPECT_NO_THROW(v3.validate_for(256));

    const TopKConfig flash = TopKConfig::deepseek_v4_flash();
    EXPECT_EQ(flash.top_k, 6);
    EXPECT_EQ(flash.scoring, Scoring::kSqrtSoftplus);
    EXPECT_FALSE(flash.grouped());
    EXPECT_EQ(flash.num_groups, 0);
    EXPECT_EQ(flash.topk_group, 0);
    EXPECT_TRUE(flash.renormalize);
    EXPECT_FLOAT_EQ(flash.routed_scaling_factor, 1.5f);
    EXPECT_FALSE(flash.apply_routed_scaling_factor_on_output);
    EXPECT_EQ(flash.num_fused_shared_experts, 0);
    EXPECT_NO_THROW(flash.validate_for(256));

    TopKConfig pro = TopKConfig::deepseek_v4_pro();
    EXPECT_FLOAT_EQ(pro.routed_scaling_factor, 2.5f);
    EXPECT_NE(pro, flash);
    pro.routed_scaling_factor = 1.5f;
    EXPECT_EQ(pro, flash);  // otherwise as Flash

    TopKConfig shared = flash;
    shared.num_fused_shared_experts = 1;
    EXPECT_EQ(shared.output_columns(), 7);
}

TEST(Routing, ParseNames) {
    for (const Scoring s : {Scoring::kSoftmax, Scoring::kSigmoid, Scoring::kSqrtSoftplus}) {
        EXPECT_EQ(moelb::parse_scoring(moelb::to_string(s)), s);
    }
    EXPECT_EQ(moelb::parse_scoring("sqrtsoftplus"), Scoring::kSqrtSoftplus);
    for (const GroupScore g : {GroupScore::kTop2Sum, GroupScore::kMax}) {
        EXPECT_EQ(moelb::parse_group_score(moelb::to_string(g)), g);
    }
    EXPECT_EQ(moelb::parse_group_score("top2_sum"), GroupScore::kTop2Sum);
    expect_invalid_argument([] { moelb::parse_scoring("tanh"); }, "scoring='tanh'");
    expect_invalid_argument([] { moelb::parse_scoring("Softmax", "scoring_func"); },
                            "scoring_func='Softmax'");
    expect_invalid_argument([] { moelb::parse_group_score("sum"); }, "group_score='sum'");
}

// ------------------------------------------------------------------------------------------------
// Errors: every bad input names its parameter.

struct ErrorCase {
    std::string name;
    std::function<void()> call;
    std::string needle;
};

RowMatrix<float> ones(Index T, int E) { return RowMatrix<float>::Constant(T, E, 1.0f); }

TopKConfig simple(int top_k) {
    TopKConfig c;
    c.top_k = top_k;
    return c;
}

TopKConfig grouped(int top_k, int num_groups, int topk_group) {
    TopKConfig c = simple(top_k);
    c.scoring = Scoring::kSigmoid;
    c.num_groups = num_groups;
    c.topk_group = topk_group;
    return c;
}

void route_into(Index ids_rows, int ids_cols, Index w_rows, int w_cols, Index rec_rows,
                int rec_cols) {
    TopKConfig c = simple(2);
    c.num_fused_shared_experts = 1;
    const RowMatrix<float> logits = ones(4, 6);
    RowMatrix<std::int32_t> ids(ids_rows, ids_cols);
    RowMatrix<float> w(w_rows, w_cols);
    RowMatrix<std::int32_t> rec(rec_rows, rec_cols);
    moelb::select_experts(cmap(logits), c, {}, std::nullopt, nullptr,
                          TopKOutputView{mmap(ids), mmap(w), mmap(rec)});
}

std::vector<ErrorCase> routing_errors() {
    auto with = [](TopKConfig c, auto change) {
        change(c);
        return c;
    };
    return {
        {"top_k_exceeds_experts", [] { route(ones(2, 4), simple(5)); }, "top_k=5"},
        {"top_k_zero", [] { route(ones(2, 4), simple(0)); }, "top_k"},
        {"top_k_negative", [] { route(ones(2, 4), simple(-1)); }, "top_k"},
        {"topk_group_exceeds_num_groups", [] { route(ones(2, 16), grouped(2, 4, 5)); },
         "topk_group=5"},
        {"topk_group_zero", [] { route(ones(2, 16), grouped(2, 4, 0)); }, "topk_group=0"},
        {"topk_group_without_groups", [] { route(ones(2, 16), grouped(2, 0, 2)); }, "topk_group=2"},
        {"num_groups_negative", [] { route(ones(2, 16), grouped(2, -2, 1)); }, "num_groups"},
        {"experts_not_divisible_by_groups", [] { route(ones(2, 10), grouped(2, 4, 2)); },
         "num_groups=4"},
        {"top_k_exceeds_kept_experts", [] { route(ones(2, 16), grouped(5, 4, 1)); }, "top_k=5"},
        {"no_expert_columns", [] { route(ones(2, 0), simple(1)); }, "router_logits"},
        {"bias_too_short",
         [] {
             route(ones(2, 4), simple(2), {0.0f, 0.0f, 0.0f});
         },
         "correction_bias"},
        {"bias_too_long", [] { route(ones(2, 4), simple(2), std::vector<float>(5, 0.0f)); },
         "correction_bias"},
        {"bias_nan",
         [] {
             route(ones(2, 4), simple(2), {0.0f, 0.0f, kNaN, 0.0f});
         },
         "correction_bias[2]"},
        {"bias_inf",
         [] {
             route(ones(2, 4), simple(2), {-kInf, 0.0f, 0.0f, 0.0f});
         },
         "correction_bias[0]"},
        {"non_padded_negative", [] { route(ones(3, 4), simple(2), {}, -1); },
         "num_token_non_padded=-1"},
        {"non_padded_too_large", [] { route(ones(3, 4), simple(2), {}, 4); },
         "num_token_non_padded=4"},
        {"topk_ids_too_few_columns", [] { route_into(4, 2, 4, 3, 4, 2); }, "topk_ids"},
        {"topk_ids_too_few_rows", [] { route_into(3, 3, 4, 3, 4, 2); }, "topk_ids"},
        {"topk_weights_shape", [] { route_into(4, 3, 4, 2, 4, 2); }, "topk_weights"},
        {"recorder_topk_ids_shape", [] { route_into(4, 3, 4, 3, 4, 3); }, "recorder_topk_ids"},
        {"rsf_zero",
         [=] { route(ones(2, 4), with(simple(2), [](auto& c) { c.routed_scaling_factor = 0; })); },
         "routed_scaling_factor"},
        {"rsf_negative",
         [=] {
             route(ones(2, 4), with(simple(2), [](auto& c) { c.routed_scaling_factor = -2.5f; }));
         },
         "routed_scaling_factor"},
        {"rsf_nan",
         [=] {
             route(ones(2, 4), with(simple(2), [](auto& c) { c.routed_scaling_factor = kNaN; }));
         },
         "routed_scaling_factor"},
        {"rsf_inf",
         [=] {
             route(ones(2, 4), with(simple(2), [](auto& c) { c.routed_scaling_factor = kInf; }));
         },
         "routed_scaling_factor"},
        {"two_shared_experts",
         [=] {
             route(ones(2, 4), with(simple(2), [](auto& c) { c.num_fused_shared_experts = 2; }));
         },
         "num_fused_shared_experts"},
        {"negative_shared_experts",
         [=] {
             route(ones(2, 4), with(simple(2), [](auto& c) { c.num_fused_shared_experts = -1; }));
         },
         "num_fused_shared_experts"},
        {"location_with_other_num_experts",
         [] {
             const ExpertLocation loc = ExpertLocation::trivial(1, 8, 8, 2);
             const LayerDispatcher d(loc, 0, 0, DispatchAlgorithm::kSglangStatic, 0);
             route(ones(2, 6), simple(2), {}, std::nullopt, &d);
         },
         "num_logical_experts=8"},
    };
}

class RoutingErrors : public ::testing::TestWithParam<ErrorCase> {};

TEST_P(RoutingErrors, ThrowsInvalidArgumentNamingTheParameter) {
    EXPECT_THROW(GetParam().call(), InvalidArgument);
    expect_invalid_argument(GetParam().call, GetParam().needle);
}

INSTANTIATE_TEST_SUITE_P(Cases, RoutingErrors, ::testing::ValuesIn(routing_errors()),
                         [](const ::testing::TestParamInfo<ErrorCase>& info) {
                             return info.param.name;
                         });

TEST(Routing, ValidateChecksFieldsOnTheirOwn) {
    EXPECT_NO_THROW(simple(3).validate());
    expect_invalid_argument([] { simple(0).validate(); }, "top_k");
    expect_invalid_argument([] { grouped(2, 4, 6).validate(); }, "topk_group=6");
    // validate() does not know E; validate_for does.
    EXPECT_NO_THROW(simple(9).validate());
    expect_invalid_argument([] { simple(9).validate_for(8); }, "top_k=9");
    EXPECT_NO_THROW(grouped(8, 8, 4).validate_for(256));
    EXPECT_NO_THROW(grouped(8, 8, 1).validate_for(64));  // exactly the 8 experts of one group
    expect_invalid_argument([] { grouped(5, 8, 1).validate_for(32); }, "top_k=5");
}

// ------------------------------------------------------------------------------------------------
// remap_topk_for_per_rank_shared_slots.

RowMatrix<std::int32_t> remap(const RowMatrix<std::int32_t>& ids, int P, int W, int rank,
                              int F = 1) {
    RowMatrix<std::int32_t> out = RowMatrix<std::int32_t>::Constant(ids.rows(), ids.cols(), -77);
    moelb::remap_topk_for_per_rank_shared_slots(cmap(ids), P, W, rank, F, mmap(out));
    return out;
}

TEST(RemapPerRankSharedSlots, WorkedExamples) {
    // P = 264, W = 8 (S = 33), rank 7: shared slot 7 * 34 + 33 = 271.
    EXPECT_EQ(remap(matrix<std::int32_t>({{0, 33, 263, 256}}), 264, 8, 7),
              matrix<std::int32_t>({{0, 34, 270, 271}}));
    // P = 256, W = 4 (S = 64), rank 2: shared slot 2 * 65 + 64 = 194; the input shared column
    // is overwritten whatever it held.
    EXPECT_EQ(remap(matrix<std::int32_t>({{0, 65, 256}, {63, 127, -5}}), 256, 4, 2),
              matrix<std::int32_t>({{0, 66, 194}, {63, 128, 194}}));
    // P = 256, W = 8 (S = 32), rank 0: shared slot 32.
    EXPECT_EQ(remap(matrix<std::int32_t>({{5, 40, 100, 999}}), 256, 8, 0),
              matrix<std::int32_t>({{5, 41, 103, 32}}));
}

TEST(RemapPerRankSharedSlots, PaddedRowsStayPadded) {
    const RowMatrix<std::int32_t> ids = matrix<std::int32_t>({{-1, -1, -1, 256}, {-1, 3, -1, 256}});
    const RowMatrix<std::int32_t> out = remap(ids, 256, 8, 3);
    // An all -1 row gets no phantom shared expert; a -1 among real ids stays -1.
    EXPECT_EQ(out, matrix<std::int32_t>({{-1, -1, -1, -1}, {-1, 3, -1, 3 * 33 + 32}}));
}

TEST(RemapPerRankSharedSlots, LayoutProperties) {
    // Random ids for several (P, W, rank): a routed slot keeps its rank and lands on a routed
    // position of that rank's S + 1 slots; the shared slot is the last position of ep_rank;
    // distinct ids stay distinct.
    Rng rng(17);
    const std::vector<std::pair<int, int>> shapes = {{8, 8}, {264, 8}, {96, 4}, {30, 1}};
    for (const auto& [P, W] : shapes) {
        const int S = P / W;
        for (int rank = 0; rank < W; rank += std::max(1, W / 3)) {
            RowMatrix<std::int32_t> ids(50, 5);
            for (Index t = 0; t < ids.rows(); ++t) {
                for (int c = 0; c < 5; ++c) ids(t, c) = static_cast<std::int32_t>(rng.below(P));
            }
            const RowMatrix<std::int32_t> out = remap(ids, P, W, rank);
            for (Index t = 0; t < ids.rows(); ++t) {
                for (int c = 0; c < 4; ++c) {
                    const int p = ids(t, c), q = out(t, c);
                    EXPECT_EQ(q / (S + 1), p / S) << "P=" << P << " W=" << W;
                    EXPECT_EQ(q % (S + 1), p % S) << "P=" << P << " W=" << W;
                    for (int d = 0; d < c; ++d) EXPECT_EQ(ids(t, d) == p, out(t, d) == q);
                }
                EXPECT_EQ(out(t, 4) / (S + 1), rank);
                EXPECT_EQ(out(t, 4) % (S + 1), S);
            }
        }
    }
}

TEST(RemapPerRankSharedSlots, AfterRoutingWithLocation) {
    // End to end: routed with a location the shared column is P; the remap puts it on the rank.
    const int E = 16, P = 20, W = 4;
    const ExpertLocation loc = ExpertLocation::trivial(1, E, P, W);
    const LayerDispatcher d(loc, 0, 1, DispatchAlgorithm::kSglangStatic, 0);
    TopKConfig c = simple(3);
    c.num_fused_shared_experts = 1;
    RowMatrix<float> logits(4, E);
    for (int e = 0; e < E; ++e) logits.col(e).setConstant(static_cast<float>(e % 5));
    const TopKOutput out = route(logits, c, {}, 3, &d);
    const RowMatrix<std::int32_t> remapped = remap(out.topk_ids, P, W, 1);
    for (Index t = 0; t < 3; ++t) {
        EXPECT_EQ(out.topk_ids(t, 3), P);
        EXPECT_EQ(remapped(t, 3), 1 * 6 + 5);
        for (int k = 0; k < 3; ++k) {
            const int p = out.topk_ids(t, k);
            EXPECT_EQ(remapped(t, k), p + p / 5);
        }
    }
    for (int k = 0; k < 4; ++k) EXPECT_EQ(remapped(3, k), -1);
}

TEST(RemapPerRankSharedSlots, Errors) {
    const RowMatrix<std::int32_t> ok = matrix<std::int32_t>({{0, 1, 256}});
    expect_invalid_argument(
        [&] {
            remap(matrix<std::int32_t>({{0, 256, 256}}), 256, 8, 0);
        },
        "topk_ids[0, 1] = 256");
    expect_invalid_argument(
        [&] {
            remap(matrix<std::int32_t>({{-2, 3, 256}}), 256, 8, 0);
        },
        "topk_ids[0, 0] = -2");
    expect_invalid_argument([&] { remap(ok, 250, 8, 0); }, "num_physical_experts=250");
    expect_invalid_argument([&] { remap(ok, 256, 0, 0); }, "ep_size");
    expect_invalid_argument([&] { remap(ok, 256, 8, 8); }, "ep_rank=8");
    expect_invalid_argument([&] { remap(ok, 256, 8, -1); }, "ep_rank=-1");
    expect_invalid_argument([&] { remap(ok, 256, 8, 0, 0); }, "num_fused_shared_experts");
    expect_invalid_argument([&] { remap(matrix<std::int32_t>({{256}}), 256, 8, 0); }, "columns");
    expect_invalid_argument(
        [&] {
            RowMatrix<std::int32_t> out(2, 3);
            moelb::remap_topk_for_per_rank_shared_slots(cmap(ok), 256, 8, 0, 1, mmap(out));
        },
        "out has shape [2, 3]");
}

}  // namespace
