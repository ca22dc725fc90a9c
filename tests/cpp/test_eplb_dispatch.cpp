// The planner's target dispatch (eplb.hpp, RebalanceOptions::dispatch): names and errors; under
// kSglangStatic, the realised statistics against SGLang's tables recomputed here from
// dispatch_tables (each rank sending 1/W of every expert's load to its table's slot), the per-layer
// guarantee against the equal-split plan, the previous-placement trade-off, thread independence,
// and kEqualSplit left as it was.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "moelb/dispatch.hpp"
#include "moelb/eplb.hpp"
#include "moelb/errors.hpp"
#include "moelb/expert_location.hpp"
#include "moelb/parallel.hpp"
#include "test_util.hpp"

namespace {

using namespace moelb::test_util;

using moelb::DispatchAlgorithm;
using moelb::EplbAlgorithm;
using moelb::ExpertLocation;
using moelb::Index;
using moelb::Locality;
using moelb::Objective;
using moelb::Plan;
using moelb::PlanDispatch;
using moelb::PlanStats;
using moelb::RebalanceOptions;
using moelb::RowMatrix;

// Per layer, the largest GPU load of SGLang's file-path tables: rank r sends load(l, e) / W of
// expert e to table_r[l, e] (dispatch_tables, the engine model of dispatch.hpp).
std::vector<double> table_max_loads(const RowMatrix<double>& load, const ExpertLocation& loc) {
    const RowMatrix<std::int32_t> tables =
        moelb::dispatch_tables(loc, DispatchAlgorithm::kSglangStatic);
    const int L = loc.num_layers(), E = loc.num_logical_experts(), W = loc.ep_size();
    const int S = loc.num_local_physical_experts();
    std::vector<double> out;
    for (int l = 0; l < L; ++l) {
        std::vector<double> gpu(static_cast<std::size_t>(W), 0.0);
        for (int r = 0; r < W; ++r) {
            for (int e = 0; e < E; ++e) {
                const std::int32_t p = tables(r, static_cast<Index>(l) * E + e);
                EXPECT_EQ(loc.physical_to_logical()(l, p), e);
                gpu[p / S] += load(l, e) / W;
            }
        }
        out.push_back(*std::max_element(gpu.begin(), gpu.end()));
    }
    return out;
}

struct Shape {
    const char* name;
    int L, E, P, num_groups, N, W;
    std::uint32_t seed;
};

RowMatrix<double> skewed_load(const Shape& s) {
    Rng rng(s.seed);
    RowMatrix<double> load(s.L, s.E);
    for (int l = 0; l < s.L; ++l) {
        for (int e = 0; e < s.E; ++e) {
            const double u = rng.uniform(0, 1);
            load(l, e) = 1000 * u * u * u + rng.uniform(0, 10);
        }
    }
    if (s.L > 2) {
        for (int e = 0; e < s.E; ++e) load(2, e) = 0.0;  // a layer without load
    }
    return load;
}

RebalanceOptions options(const Shape& s, Locality locality, PlanDispatch dispatch) {
    return {.num_physical_experts = s.P,
            .num_groups = s.num_groups,
            .num_nodes = s.N,
            .ep_size = s.W,
            .algorithm = EplbAlgorithm::kMoelb,
            .locality = locality,
            .dispatch = dispatch};
}

// Equal relative to the scale of the values compared (sums in another order).
void expect_close(double a, double b) { EXPECT_NEAR(a, b, 1e-12 * std::max(1.0, std::abs(b))); }

class SglangStaticTarget : public ::testing::TestWithParam<Shape> {
  protected:
    void TearDown() override { moelb::set_num_threads(0); }
};

// The plan's realised statistics are what SGLang's tables give; evaluate_placement agrees; every
// replica is in place and node locality is kept.
TEST_P(SglangStaticTarget, RealisedLoadsAreWhatSglangTablesGive) {
    const Shape s = GetParam();
    const RowMatrix<double> load = skewed_load(s);
    for (const Locality locality : {Locality::kNode, Locality::kNone}) {
        SCOPED_TRACE(moelb::to_string(locality));
        const Plan plan =
            moelb::rebalance(cmap(load), options(s, locality, PlanDispatch::kSglangStatic));
        EXPECT_EQ(plan.stats.dispatch, PlanDispatch::kSglangStatic);
        EXPECT_NE(plan.stats.algorithm.find("+sglang_static"), std::string::npos);
        const std::vector<double> want = table_max_loads(load, plan.location);
        const PlanStats evaluated = moelb::evaluate_placement(cmap(load), plan.location, nullptr,
                                                              PlanDispatch::kSglangStatic);
        std::vector<double> mean, realised;
        for (int l = 0; l < s.L; ++l) {
            const auto& x = plan.stats.layers[static_cast<std::size_t>(l)];
            expect_close(x.realised_max_rank_load, want[static_cast<std::size_t>(l)]);
            EXPECT_EQ(evaluated.layers[static_cast<std::size_t>(l)].realised_max_rank_load,
                      x.realised_max_rank_load);
            EXPECT_GE(x.realised_max_rank_load, x.mean_rank_load * (1 - 1e-12));
            mean.push_back(x.mean_rank_load);
            realised.push_back(x.realised_max_rank_load);
        }
        EXPECT_DOUBLE_EQ(plan.stats.realised_balancedness,
                         moelb::balancedness(mean, realised, moelb::LayerSet::kAll));
        for (int l = 0; l < s.L; ++l) {
            for (int e = 0; e < s.E; ++e) EXPECT_GE(plan.location.logical_count()(l, e), 1);
        }
        if (locality == Locality::kNode &&
            plan.stats.algorithm.find("locality=node") != std::string::npos) {
            // Every group's replicas on one node.
            const int group = s.E / s.num_groups, node_slots = s.P / s.N;
            for (int l = 0; l < s.L; ++l) {
                std::vector<int> node_of(static_cast<std::size_t>(s.num_groups), -1);
                for (int p = 0; p < s.P; ++p) {
                    const int g = plan.location.physical_to_logical()(l, p) / group;
                    if (node_of[g] < 0) node_of[g] = p / node_slots;
                    EXPECT_EQ(node_of[g], p / node_slots) << "layer " << l << " slot " << p;
                }
            }
        }
    }
}

// Per layer, the plan realises no more than the standalone equal-split plan (rebalance with
// kEqualSplit, loaded through the same file path, on its own random streams), and no more than
// the equal-split plan's layer would after this plan's earlier layers (SGLang's random streams
// run on across layers, so the two differ); the realised total over layers is lower.
TEST_P(SglangStaticTarget, NeverWorseThanTheEqualSplitPlanOnAnyLayer) {
    const Shape s = GetParam();
    const RowMatrix<double> load = skewed_load(s);
    for (const Locality locality : {Locality::kNode, Locality::kNone}) {
        SCOPED_TRACE(moelb::to_string(locality));
        const Plan ours =
            moelb::rebalance(cmap(load), options(s, locality, PlanDispatch::kSglangStatic));
        const Plan equal =
            moelb::rebalance(cmap(load), options(s, locality, PlanDispatch::kEqualSplit));
        const PlanStats equal_realised = moelb::evaluate_placement(
            cmap(load), equal.location, nullptr, PlanDispatch::kSglangStatic);
        double ours_sum = 0, equal_sum = 0;
        for (int l = 0; l < s.L; ++l) {
            RowMatrix<std::int32_t> hybrid = ours.location.physical_to_logical();
            hybrid.row(l) = equal.location.physical_to_logical().row(l);
            const ExpertLocation mixed(hybrid, s.E, s.W, ours.location.num_nodes());
            const PlanStats m =
                moelb::evaluate_placement(cmap(load), mixed, nullptr, PlanDispatch::kSglangStatic);
            const double mine =
                ours.stats.layers[static_cast<std::size_t>(l)].realised_max_rank_load;
            const double standalone =
                equal_realised.layers[static_cast<std::size_t>(l)].realised_max_rank_load;
            EXPECT_LE(mine, m.layers[static_cast<std::size_t>(l)].realised_max_rank_load)
                << "layer " << l;
            EXPECT_LE(mine, standalone) << "layer " << l;
            ours_sum += mine;
            equal_sum += standalone;
        }
        EXPECT_LE(ours_sum, equal_sum);
        // With replicas to place on more than one GPU per node, the equal-split plan leaves
        // something to gain on these loads.
        if (s.P > s.E && s.W > s.N) EXPECT_LT(ours_sum, equal_sum);
    }
}

TEST_P(SglangStaticTarget, IdenticalForAnyThreadCount) {
    const Shape s = GetParam();
    const RowMatrix<double> load = skewed_load(s);
    std::vector<Plan> plans;
    for (const int threads : {1, 2, 3}) {
        moelb::set_num_threads(threads);
        plans.push_back(
            moelb::rebalance(cmap(load), options(s, Locality::kAuto, PlanDispatch::kSglangStatic)));
    }
    for (const Plan& p : plans) {
        EXPECT_EQ(p.location.physical_to_logical(), plans[0].location.physical_to_logical());
        EXPECT_EQ(p.stats.realised_balancedness, plans[0].stats.realised_balancedness);
    }
}

// With previous and move_cost, the trade-off weighs the realised gain: a huge move cost keeps
// every layer's previous placement, and the statistics are then those of the previous placement.
TEST_P(SglangStaticTarget, MoveCostWeighsTheRealisedGain) {
    const Shape s = GetParam();
    const RowMatrix<double> load = skewed_load(s);
    const ExpertLocation trivial = ExpertLocation::trivial(s.L, s.E, s.P, s.W, s.N);
    RebalanceOptions o = options(s, Locality::kNone, PlanDispatch::kSglangStatic);
    o.previous = &trivial;
    o.move_cost = 0;
    const Plan moved = moelb::rebalance(cmap(load), o);
    const PlanStats before =
        moelb::evaluate_placement(cmap(load), trivial, nullptr, PlanDispatch::kSglangStatic);
    const std::vector<double> want = table_max_loads(load, moved.location);
    for (int l = 0; l < s.L; ++l) {
        const auto& x = moved.stats.layers[static_cast<std::size_t>(l)];
        expect_close(x.realised_max_rank_load, want[static_cast<std::size_t>(l)]);
        if (x.kept_previous) {
            EXPECT_EQ(moved.location.physical_to_logical().row(l),
                      trivial.physical_to_logical().row(l));
        }
    }
    EXPECT_GT(moved.stats.realised_balancedness, before.realised_balancedness);
    o.move_cost = 1e9;
    const Plan kept = moelb::rebalance(cmap(load), o);
    EXPECT_EQ(kept.location.physical_to_logical(), trivial.physical_to_logical());
    for (int l = 0; l < s.L; ++l) {
        EXPECT_EQ(kept.stats.layers[static_cast<std::size_t>(l)].realised_max_rank_load,
                  before.layers[static_cast<std::size_t>(l)].realised_max_rank_load);
    }
    o.move_cost = 0;
    o.max_moves = 0;
    const Plan capped = moelb::rebalance(cmap(load), o);
    EXPECT_EQ(capped.location.physical_to_logical(), trivial.physical_to_logical());
}

INSTANTIATE_TEST_SUITE_P(Shapes, SglangStaticTarget,
                         ::testing::Values(Shape{"v3_like", 4, 64, 80, 8, 4, 16, 3},
                                           Shape{"two_nodes", 3, 24, 32, 4, 2, 8, 5},
                                           Shape{"one_node", 3, 16, 24, 4, 1, 8, 7},
                                           Shape{"one_gpu_per_node", 3, 16, 24, 4, 4, 4, 11},
                                           Shape{"no_redundancy", 3, 32, 32, 8, 4, 8, 13},
                                           Shape{"few_extra_slots", 3, 30, 32, 0, 4, 8, 17},
                                           Shape{"demo", 3, 256, 288, 8, 4, 32, 19}),
                         [](const ::testing::TestParamInfo<Shape>& info) {
                             return std::string(info.param.name);
                         });

TEST(PlanDispatch, ParseAndPrintRoundTrip) {
    for (const PlanDispatch d : {PlanDispatch::kEqualSplit, PlanDispatch::kSglangStatic}) {
        EXPECT_EQ(moelb::parse_plan_dispatch(moelb::to_string(d)), d);
    }
    EXPECT_EQ(moelb::to_string(PlanDispatch::kSglangStatic), "sglang_static");
    EXPECT_EQ(RebalanceOptions{}.dispatch, PlanDispatch::kEqualSplit);
    expect_invalid_argument([] { moelb::parse_plan_dispatch("sglang_dynamic"); },
                            "dispatch='sglang_dynamic'");
    expect_invalid_argument([] { moelb::parse_plan_dispatch("x", "target"); }, "target='x'");
}

// The default target plans, names and reports exactly as without one.
TEST(PlanDispatch, EqualSplitReportsNoRealisedLoad) {
    const Shape s{"small", 2, 16, 24, 4, 2, 8, 23};
    const RowMatrix<double> load = skewed_load(s);
    const Plan plan =
        moelb::rebalance(cmap(load), options(s, Locality::kAuto, PlanDispatch::kEqualSplit));
    EXPECT_EQ(plan.stats.dispatch, PlanDispatch::kEqualSplit);
    EXPECT_TRUE(std::isnan(plan.stats.realised_balancedness));
    EXPECT_EQ(plan.stats.algorithm, "moelb(locality=node)");
    for (const auto& x : plan.stats.layers) EXPECT_TRUE(std::isnan(x.realised_max_rank_load));
    const PlanStats e = moelb::evaluate_placement(cmap(load), plan.location);
    EXPECT_TRUE(std::isnan(e.realised_balancedness));
}

TEST(PlanDispatch, ErrorsNameTheParameter) {
    const Shape s{"small", 2, 16, 24, 4, 2, 8, 29};
    const RowMatrix<double> load = skewed_load(s);
    RebalanceOptions o = options(s, Locality::kAuto, PlanDispatch::kSglangStatic);
    o.algorithm = EplbAlgorithm::kDeepSeek;
    expect_invalid_argument([&] { moelb::rebalance(cmap(load), o); },
                            "dispatch='sglang_static' is moelb's target; algorithm='deepseek'");
    o.algorithm = EplbAlgorithm::kMoelb;
    o.objective = Objective::kStepPeak;
    std::vector<double> series(static_cast<std::size_t>(2 * s.L * s.E), 1.0);
    const moelb::StepLoads steps{series, 2, s.L, s.E};
    expect_invalid_argument([&] { moelb::rebalance(steps, o); }, "objective='step_peak'");
    // Too many table entries to model: num_experts x ep_size above 2**22.
    const RowMatrix<double> wide = RowMatrix<double>::Ones(1, 8192);
    RebalanceOptions big{.num_physical_experts = 8192,
                         .num_nodes = 8,
                         .ep_size = 1024,
                         .dispatch = PlanDispatch::kSglangStatic};
    expect_invalid_argument([&] { moelb::rebalance(cmap(wide), big); },
                            "num_experts x ep_size = 8192 x 1024");
    const ExpertLocation huge = ExpertLocation::trivial(1, 8192, 8192, 1024, 8);
    expect_invalid_argument(
        [&] { moelb::evaluate_placement(cmap(wide), huge, nullptr, PlanDispatch::kSglangStatic); },
        "dispatch='sglang_static' models every rank's table");
}

// A tiny case checked by hand: 2 nodes of 2 GPUs with 2 slots each, expert 0 as hot as the other
// four together. The plan gives expert 0 a replica on every GPU, so every rank's nearest replica
// is its own and none draws: each replica takes a quarter of expert 0 (2), each GPU one other
// expert (2), and the realised maximum is the mean, 4.
TEST(SglangStaticTarget, EveryRankWithItsOwnReplicaRealisesTheEqualSplit) {
    RowMatrix<double> load(1, 5);
    load << 8, 2, 2, 2, 2;
    const RebalanceOptions o{.num_physical_experts = 8,
                             .num_groups = 0,
                             .num_nodes = 2,
                             .ep_size = 4,
                             .locality = Locality::kNone,
                             .dispatch = PlanDispatch::kSglangStatic};
    const Plan plan = moelb::rebalance(cmap(load), o);
    EXPECT_EQ(plan.location.logical_count()(0, 0), 4);
    EXPECT_EQ(plan.stats.layers[0].realised_max_rank_load, 4.0);
    EXPECT_EQ(plan.stats.layers[0].mean_rank_load, 4.0);
    EXPECT_DOUBLE_EQ(table_max_loads(load, plan.location)[0], 4.0);
}

// The per-layer guarantee against the standalone equal-split plan over many small random
// configurations (integer counts of skewed popularity, 0-2 extra slots per GPU, several layers
// so that the streams run on), under every locality; and the statistics are what the returned
// placement realises from scratch.
TEST(SglangStaticTarget, NeverWorseThanTheStandaloneEqualSplitPlanOnRandomConfigurations) {
    Rng rng(2027);
    int strictly_better = 0;
    const int configurations = 300;
    for (int i = 0; i < configurations; ++i) {
        const int W = 2 << rng.below(4);  // 2 .. 16
        int N = 1 << rng.below(3);        // 1, 2, 4
        while (W % N != 0) N /= 2;
        const int E = 2 + static_cast<int>(rng.below(38));
        const int P = W * ((E + W - 1) / W + static_cast<int>(rng.below(3)));
        const int L = 1 + static_cast<int>(rng.below(6));
        RowMatrix<double> load(L, E);
        for (int l = 0; l < L; ++l) {
            for (int e = 0; e < E; ++e) {
                const double u = rng.uniform(0, 1);
                load(l, e) = std::floor(400 * u * u * u * u);
            }
        }
        const Locality locality =
            std::array{Locality::kNone, Locality::kNode, Locality::kAuto}[i % 3];
        RebalanceOptions o{.num_physical_experts = P,
                           .num_groups = 0,
                           .num_nodes = N,
                           .ep_size = W,
                           .locality = locality,
                           .dispatch = PlanDispatch::kSglangStatic};
        SCOPED_TRACE(testing::Message() << "configuration " << i << ": L " << L << " E " << E
                                        << " P " << P << " N " << N << " W " << W);
        const Plan ours = moelb::rebalance(cmap(load), o);
        o.dispatch = PlanDispatch::kEqualSplit;
        const Plan equal = moelb::rebalance(cmap(load), o);
        const PlanStats theirs = moelb::evaluate_placement(cmap(load), equal.location, nullptr,
                                                           PlanDispatch::kSglangStatic);
        const PlanStats again = moelb::evaluate_placement(cmap(load), ours.location, nullptr,
                                                          PlanDispatch::kSglangStatic);
        bool better = false;
        for (int l = 0; l < L; ++l) {
            const auto k = static_cast<std::size_t>(l);
            const double mine = ours.stats.layers[k].realised_max_rank_load;
            EXPECT_LE(mine, theirs.layers[k].realised_max_rank_load) << "layer " << l;
            EXPECT_EQ(mine, again.layers[k].realised_max_rank_load) << "layer " << l;
            better |= mine < theirs.layers[k].realised_max_rank_load;
        }
        strictly_better += better;
    }
    // The guarantee is not met by returning the equal-split plan.
    EXPECT_GT(strictly_better, configurations / 2);
}

}  // namespace
