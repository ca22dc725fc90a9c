// The simulator's scoring loop (simulate.hpp): per-step GPU loads against a naive recomputation
// over a table of topologies, the lower bound against brute force and against every placement,
// thread-count independence, and input errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "moelb/eplb.hpp"
#include "moelb/errors.hpp"
#include "moelb/expert_location.hpp"
#include "moelb/parallel.hpp"
#include "moelb/simulate.hpp"
#include "test_util.hpp"

namespace {

using namespace moelb::test_util;

using moelb::ExpertLocation;
using moelb::Index;
using moelb::RowMatrix;
using moelb::StepCounts;

struct Counts {
    std::vector<std::int32_t> data;
    Index T = 0, L = 0, E = 0;
    StepCounts view() const { return {data, T, L, E}; }
    std::int32_t at(Index t, Index l, Index e) const { return data[(t * L + l) * E + e]; }
};

// Skewed random counts: expert e's count is uniform in [0, 1000 / (1 + e % 7)).
Counts random_counts(Index T, Index L, Index E, std::uint32_t seed) {
    Rng rng(seed);
    Counts c{std::vector<std::int32_t>(static_cast<std::size_t>(T * L * E)), T, L, E};
    for (Index i = 0; i < T * L * E; ++i) {
        const auto top = static_cast<std::uint32_t>(1000 / (1 + (i % E) % 7));
        c.data[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(rng.below(top));
    }
    return c;
}

// A placement with random replica choices: slot p < E holds p, the others random experts.
ExpertLocation random_location(int L, int E, int P, int G, std::uint32_t seed) {
    Rng rng(seed);
    RowMatrix<std::int32_t> map(L, P);
    for (int l = 0; l < L; ++l) {
        for (int p = 0; p < P; ++p) {
            map(l, p) = p < E ? p : static_cast<std::int32_t>(rng.below(E));
        }
        // Shuffle the layer so replicas land anywhere.
        for (int p = P - 1; p > 0; --p) std::swap(map(l, p), map(l, rng.below(p + 1)));
    }
    return ExpertLocation(map, E, G);
}

struct Topology {
    std::string name;
    int L, E, P, G;
};

class ScoreSteps : public ::testing::TestWithParam<Topology> {};

TEST_P(ScoreSteps, MatchesANaiveRecomputation) {
    const Topology& t = GetParam();
    const Counts c = random_counts(5, t.L, t.E, 7);
    const ExpertLocation loc = random_location(t.L, t.E, t.P, t.G, 11);
    RowMatrix<double> max_load(c.T, t.L), mean_load(c.T, t.L), bound(c.T, t.L);
    moelb::score_steps(c.view(), loc, mmap(max_load), mmap(mean_load));
    moelb::step_lower_bounds(c.view(), t.P, t.G, mmap(bound));
    const int S = t.P / t.G;
    for (Index s = 0; s < c.T; ++s) {
        for (int l = 0; l < t.L; ++l) {
            std::vector<int> replicas(static_cast<std::size_t>(t.E), 0);
            for (int p = 0; p < t.P; ++p) ++replicas[loc.physical_to_logical()(l, p)];
            std::vector<double> gpu(static_cast<std::size_t>(t.G), 0.0);
            double total = 0;
            for (int p = 0; p < t.P; ++p) {
                const int e = loc.physical_to_logical()(l, p);
                gpu[p / S] += static_cast<double>(c.at(s, l, e)) / replicas[e];
            }
            for (int e = 0; e < t.E; ++e) total += c.at(s, l, e);
            const double expected_max = *std::max_element(gpu.begin(), gpu.end());
            EXPECT_NEAR(max_load(s, l), expected_max, 1e-9 * (1 + expected_max));
            EXPECT_DOUBLE_EQ(mean_load(s, l), total / t.G);
            EXPECT_GE(max_load(s, l), mean_load(s, l) - 1e-9);
            // The bound holds for this placement and is at least the mean.
            EXPECT_LE(bound(s, l), max_load(s, l) + 1e-9);
            EXPECT_GE(bound(s, l), mean_load(s, l) - 1e-12);
        }
    }
}

TEST_P(ScoreSteps, BoundHoldsForPlannedPlacements) {
    const Topology& t = GetParam();
    const Counts c = random_counts(4, t.L, t.E, 3);
    RowMatrix<double> load(t.L, t.E);
    load.setZero();
    for (Index s = 0; s < c.T; ++s) {
        for (int l = 0; l < t.L; ++l) {
            for (int e = 0; e < t.E; ++e) load(l, e) += c.at(s, l, e);
        }
    }
    RowMatrix<double> bound(c.T, t.L), max_load(c.T, t.L), mean_load(c.T, t.L);
    moelb::step_lower_bounds(c.view(), t.P, t.G, mmap(bound));
    for (auto algorithm : {moelb::EplbAlgorithm::kMoelb, moelb::EplbAlgorithm::kDeepSeekGlobal}) {
        moelb::RebalanceOptions o;
        o.num_physical_experts = t.P;
        o.ep_size = t.G;
        o.algorithm = algorithm;
        const moelb::Plan plan = moelb::rebalance(cmap(load), o);
        moelb::score_steps(c.view(), plan.location, mmap(max_load), mmap(mean_load));
        for (Index s = 0; s < c.T; ++s) {
            for (int l = 0; l < t.L; ++l) EXPECT_LE(bound(s, l), max_load(s, l) + 1e-9);
        }
    }
}

TEST_P(ScoreSteps, SameResultAtAnyThreadCount) {
    const Topology& t = GetParam();
    const Counts c = random_counts(400, t.L, t.E, 5);  // enough rows for several chunks
    const ExpertLocation loc = random_location(t.L, t.E, t.P, t.G, 13);
    auto run = [&](int threads) {
        moelb::set_num_threads(threads);
        RowMatrix<double> max_load(c.T, t.L), mean_load(c.T, t.L), bound(c.T, t.L);
        moelb::score_steps(c.view(), loc, mmap(max_load), mmap(mean_load));
        moelb::step_lower_bounds(c.view(), t.P, t.G, mmap(bound));
        return std::vector<RowMatrix<double>>{max_load, mean_load, bound};
    };
    const auto one = run(1), four = run(4);
    moelb::set_num_threads(0);
    for (std::size_t i = 0; i < one.size(); ++i) EXPECT_EQ(one[i], four[i]);
}

INSTANTIATE_TEST_SUITE_P(Topologies, ScoreSteps,
                         ::testing::Values(Topology{"E8_P8_G2", 2, 8, 8, 2},
                                           Topology{"E8_P12_G4", 3, 8, 12, 4},
                                           Topology{"E16_P24_G8", 2, 16, 24, 8},
                                           Topology{"E256_P288_G32", 3, 256, 288, 32}),
                         [](const auto& info) { return info.param.name; });

// The smallest max per-replica load over every replica count vector, by enumeration.
double brute_force_replica_bound(const std::vector<int>& w, int slots) {
    const int E = static_cast<int>(w.size());
    double best = 1e300;
    std::vector<int> c(static_cast<std::size_t>(E), 1);
    std::function<void(int, int)> go = [&](int e, int left) {
        if (e == E - 1) {
            c[e] = 1 + left;
            double m = 0;
            for (int i = 0; i < E; ++i) m = std::max(m, static_cast<double>(w[i]) / c[i]);
            best = std::min(best, m);
            return;
        }
        for (int k = 0; k <= left; ++k) {
            c[e] = 1 + k;
            go(e + 1, left - k);
        }
    };
    go(0, slots - E);
    return best;
}

TEST(StepLowerBounds, EqualsBruteForce) {
    Rng rng(17);
    for (int trial = 0; trial < 50; ++trial) {
        const int E = 2 + static_cast<int>(rng.below(4)), extra = static_cast<int>(rng.below(5));
        const int G = 1 + static_cast<int>(rng.below(4));
        Counts c{std::vector<std::int32_t>(static_cast<std::size_t>(E)), 1, 1, E};
        std::vector<int> w(static_cast<std::size_t>(E));
        double total = 0;
        for (int e = 0; e < E; ++e) {
            w[e] = static_cast<int>(rng.below(100));
            c.data[e] = w[e];
            total += w[e];
        }
        RowMatrix<double> bound(1, 1);
        moelb::step_lower_bounds(c.view(), E + extra, G, mmap(bound));
        EXPECT_DOUBLE_EQ(bound(0, 0), std::max(total / G, brute_force_replica_bound(w, E + extra)));
    }
}

TEST(StepLowerBounds, ZeroCountsAndEmptyInput) {
    Counts zeros{std::vector<std::int32_t>(16, 0), 2, 2, 4};
    RowMatrix<double> bound(2, 2), max_load(2, 2), mean_load(2, 2);
    moelb::step_lower_bounds(zeros.view(), 8, 4, mmap(bound));
    EXPECT_TRUE((bound.array() == 0).all());
    moelb::score_steps(zeros.view(), ExpertLocation::trivial(2, 4, 8, 4), mmap(max_load),
                       mmap(mean_load));
    EXPECT_TRUE((max_load.array() == 0).all());
    Counts empty{{}, 0, 2, 4};
    RowMatrix<double> none(0, 2);
    moelb::step_lower_bounds(empty.view(), 8, 4, mmap(none));
    moelb::score_steps(empty.view(), ExpertLocation::trivial(2, 4, 8, 4), mmap(none), mmap(none));
}

TEST(ScoreStepsErrors, NameTheProblem) {
    Counts c = random_counts(2, 2, 4, 1);
    const ExpertLocation loc = ExpertLocation::trivial(2, 4, 8, 4);
    RowMatrix<double> a(2, 2), b(2, 2), wrong(3, 2);
    expect_invalid_argument(
        [&] {
            moelb::score_steps(c.view(), ExpertLocation::trivial(3, 4, 8, 4), mmap(a), mmap(b));
        },
        "counts has 2 layers but the location has 3");
    expect_invalid_argument(
        [&] {
            moelb::score_steps(c.view(), ExpertLocation::trivial(2, 5, 10, 5), mmap(a), mmap(b));
        },
        "counts has 4 experts but the location has 5 logical experts");
    expect_invalid_argument([&] { moelb::score_steps(c.view(), loc, mmap(wrong), mmap(b)); },
                            "max_rank_load has shape [3, 2]");
    expect_invalid_argument([&] { moelb::step_lower_bounds(c.view(), 8, 4, mmap(wrong)); },
                            "out has shape [3, 2]");
    expect_invalid_argument([&] { moelb::step_lower_bounds(c.view(), 3, 4, mmap(a)); },
                            "num_physical_experts=3 is less than the 4 experts");
    expect_invalid_argument([&] { moelb::step_lower_bounds(c.view(), 8, 0, mmap(a)); },
                            "ep_size must be >= 1, got 0");
    StepCounts short_view{std::span<const std::int32_t>(c.data.data(), 5), 2, 2, 4};
    expect_invalid_argument([&] { moelb::step_lower_bounds(short_view, 8, 4, mmap(a)); },
                            "counts holds 5 values but its shape [2, 2, 4] needs 16");
    c.data[(1 * 2 + 0) * 4 + 3] = -7;  // step 1, layer 0, expert 3
    expect_invalid_argument([&] { moelb::score_steps(c.view(), loc, mmap(a), mmap(b)); },
                            "counts[1, 0, 3] = -7 is negative");
    expect_invalid_argument([&] { moelb::step_lower_bounds(c.view(), 8, 4, mmap(a)); },
                            "counts[1, 0, 3] = -7 is negative");
}

}  // namespace
