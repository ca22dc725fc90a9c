// The kernels' ISA paths (moelb/cpu_isa.hpp): the choice, the refusals, and that every path this
// CPU runs computes what the others do -- the same expert ids on tie-free inputs, weights and layer
// outputs equal up to float rounding -- and, on each path, the same bits for any thread count.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "moelb/cpu_isa.hpp"
#include "moelb/eplb.hpp"
#include "moelb/hash_router.hpp"
#include "moelb/moe_layer.hpp"
#include "moelb/parallel.hpp"
#include "moelb/routing.hpp"
#include "moelb/simulate.hpp"
#include "test_util.hpp"

namespace {

using moelb::CpuIsa;
using moelb::DeepSeekMoE;
using moelb::DeepSeekMoEConfig;
using moelb::DeepSeekMoEWeights;
using moelb::EplbAlgorithm;
using moelb::HashRouter;
using moelb::Index;
using moelb::Locality;
using moelb::Objective;
using moelb::RebalanceOptions;
using moelb::RowMatrix;
using moelb::Scoring;
using moelb::StepLoads;
using moelb::TopKConfig;
using moelb::TopKOutput;
using moelb::test_util::cmap;
using moelb::test_util::expect_invalid_argument;
using moelb::test_util::mmap;

bool contains(const std::vector<CpuIsa>& isas, CpuIsa isa) {
    return std::find(isas.begin(), isas.end(), isa) != isas.end();
}

std::string names(const std::vector<CpuIsa>& isas) {
    std::string out;
    for (const CpuIsa isa : isas) out += (out.empty() ? "" : ",") + std::string(to_string(isa));
    return out;
}

// Runs f(isa) on every path this CPU runs, then restores the path in use.
void for_each_path(const std::function<void(CpuIsa)>& f) {
    const CpuIsa saved = moelb::cpu_isa();
    for (const CpuIsa isa : moelb::available_cpu_isas()) {
        moelb::set_cpu_isa(isa);
        ASSERT_EQ(moelb::cpu_isa(), isa);
        f(isa);
    }
    moelb::set_cpu_isa(saved);
}

// Runs f at 1 and 3 threads (restoring the count) and expects the same result.
template <class F>
auto same_at_any_thread_count(F f, const std::string& what) {
    const int saved = moelb::get_num_threads();
    moelb::set_num_threads(1);
    auto one = f();
    moelb::set_num_threads(3);
    auto three = f();
    moelb::set_num_threads(saved);
    EXPECT_TRUE(one == three) << what << ": results differ between 1 and 3 threads";
    return one;
}

TEST(CpuIsa, ReportsThePathInUse) {
    // Printed for logs of emulated and remote runs (make test-isa, benchmarks/README.md).
    std::cout << "cpu_isa=" << to_string(moelb::cpu_isa())
              << " available=" << names(moelb::available_cpu_isas())
              << " compiled=" << names(moelb::compiled_cpu_isas()) << std::endl;
    const std::vector<CpuIsa> available = moelb::available_cpu_isas();
    ASSERT_FALSE(available.empty());
    EXPECT_TRUE(contains(available, moelb::cpu_isa()));
    EXPECT_TRUE(available.front() == CpuIsa::kBaseline || available.front() == CpuIsa::kNative);
    for (const CpuIsa isa : available) EXPECT_TRUE(contains(moelb::compiled_cpu_isas(), isa));
    const char* env = std::getenv("MOELB_ISA");
    if (env == nullptr || std::string(env).empty() || std::string(env) == "auto") {
        EXPECT_EQ(moelb::cpu_isa(), available.back()) << "the widest available path is the default";
    }
    // MOELB_EXPECT_ISA: the path the caller knows this CPU should get (the emulated CPUs of make
    // test-isa, the remote AVX-512 run).
    if (const char* expect = std::getenv("MOELB_EXPECT_ISA")) {
        EXPECT_EQ(to_string(moelb::cpu_isa()), std::string(expect));
    }
}

TEST(CpuIsa, NamesRoundTrip) {
    for (const CpuIsa isa : {CpuIsa::kBaseline, CpuIsa::kAvx2, CpuIsa::kAvx512, CpuIsa::kAvx512Bf16,
                             CpuIsa::kNative}) {
        EXPECT_EQ(moelb::parse_cpu_isa(to_string(isa), "name"), isa);
    }
    expect_invalid_argument([] { moelb::parse_cpu_isa("sse9", "name"); },
                            "name='sse9' is not an ISA path; expected 'baseline', 'avx2', "
                            "'avx512', 'avx512_bf16' or 'native'");
}

TEST(CpuIsa, RefusesPathsTheBuildOrCpuLacks) {
    const std::vector<CpuIsa> compiled = moelb::compiled_cpu_isas();
    const std::vector<CpuIsa> available = moelb::available_cpu_isas();
    int refused = 0;
    for (const CpuIsa isa : {CpuIsa::kBaseline, CpuIsa::kAvx2, CpuIsa::kAvx512, CpuIsa::kAvx512Bf16,
                             CpuIsa::kNative}) {
        const std::string call = "set_cpu_isa('" + std::string(to_string(isa)) + "')";
        if (!contains(compiled, isa)) {
            expect_invalid_argument([&] { moelb::set_cpu_isa(isa); },
                                    call + ": this build has no " + std::string(to_string(isa)));
            ++refused;
        } else if (!contains(available, isa)) {
            expect_invalid_argument([&] { moelb::set_cpu_isa(isa); },
                                    call + ": this CPU cannot run the " +
                                        std::string(to_string(isa)) + " path; it lacks ");
            ++refused;
        }
    }
    // A portable build lacks "native", a native build the others.
    EXPECT_GE(refused, 1);
    EXPECT_TRUE(contains(available, moelb::cpu_isa()));  // a refusal keeps the path in use
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
TEST(CpuIsa, DetectionAgreesWithTheCompilersRuntime) {
    // moelb reads CPUID and XCR0 itself; libgcc's __builtin_cpu_supports checks the same levels.
    __builtin_cpu_init();
    const std::vector<CpuIsa> compiled = moelb::compiled_cpu_isas();
    const std::vector<CpuIsa> available = moelb::available_cpu_isas();
    if (contains(compiled, CpuIsa::kAvx2)) {
        EXPECT_EQ(contains(available, CpuIsa::kAvx2), __builtin_cpu_supports("x86-64-v3") != 0);
    }
    if (contains(compiled, CpuIsa::kAvx512)) {
        EXPECT_EQ(contains(available, CpuIsa::kAvx512), __builtin_cpu_supports("x86-64-v4") != 0);
    }
    if (contains(compiled, CpuIsa::kAvx512Bf16)) {
        EXPECT_EQ(
            contains(available, CpuIsa::kAvx512Bf16),
            __builtin_cpu_supports("x86-64-v4") != 0 && __builtin_cpu_supports("avx512bf16") != 0);
    }
    EXPECT_FALSE(compiled.empty());
}
#endif

// Router logits without near ties: row t ranks the G groups by a shuffled permutation, and expert
// i of a group (also shuffled) gets 0.8 * group_rank + 0.02 * expert_rank - 3. Every choice value
// (and every group's top-2 sum) is then at least ~1e-3 from any other, far above float rounding;
// the bias (under 1e-5) reorders nothing.
RowMatrix<float> tie_free_logits(Index T, int E, int G, std::uint32_t seed) {
    std::mt19937 gen(seed);
    const int per_group = E / G;
    RowMatrix<float> logits(T, E);
    std::vector<int> group_rank(static_cast<std::size_t>(G));
    std::vector<int> expert_rank(static_cast<std::size_t>(per_group));
    for (Index t = 0; t < T; ++t) {
        std::iota(group_rank.begin(), group_rank.end(), 0);
        std::shuffle(group_rank.begin(), group_rank.end(), gen);
        for (int g = 0; g < G; ++g) {
            std::iota(expert_rank.begin(), expert_rank.end(), 0);
            std::shuffle(expert_rank.begin(), expert_rank.end(), gen);
            for (int i = 0; i < per_group; ++i) {
                logits(t, g * per_group + i) = 0.8f * static_cast<float>(group_rank[g]) +
                                               0.02f * static_cast<float>(expert_rank[i]) - 3.0f;
            }
        }
    }
    return logits;
}

void expect_weights_near(const RowMatrix<float>& got, const RowMatrix<float>& want,
                         const std::string& what) {
    ASSERT_EQ(got.rows(), want.rows());
    ASSERT_EQ(got.cols(), want.cols());
    for (Index i = 0; i < got.size(); ++i) {
        const float w = want.data()[i];
        ASSERT_NEAR(got.data()[i], w, 1e-5f * std::max(1.0f, std::abs(w))) << what << " at " << i;
    }
}

std::pair<RowMatrix<std::int32_t>, RowMatrix<float>> ids_and_weights(const TopKOutput& out) {
    return {out.topk_ids, out.topk_weights};
}

struct RoutingCase {
    std::string name;
    TopKConfig config;
    int num_experts;
    int groups;  // of the tie-free logits
};

TEST(CpuIsa, RoutingPathsAgree) {
    TopKConfig softmax;
    softmax.top_k = 8;
    softmax.scoring = Scoring::kSoftmax;
    softmax.renormalize = true;
    const RoutingCase cases[] = {
        {"V3", TopKConfig::deepseek_v3(), 256, 8},
        {"V4-Flash", TopKConfig::deepseek_v4_flash(), 256, 8},
        {"V4-Pro-384", TopKConfig::deepseek_v4_pro(), 384, 12},
        {"softmax-60", softmax, 60, 6},  // E not a multiple of any packet width
    };
    for (const RoutingCase& c : cases) {
        const RowMatrix<float> logits = tie_free_logits(700, c.num_experts, c.groups, 7);
        std::vector<float> bias(static_cast<std::size_t>(c.num_experts));
        std::mt19937 gen(3);
        std::uniform_real_distribution<float> jitter(0.0f, 1e-5f);
        for (float& b : bias) b = jitter(gen);
        std::vector<RowMatrix<std::int32_t>> ids;
        std::vector<RowMatrix<float>> weights;
        for_each_path([&](CpuIsa isa) {
            const std::string what = c.name + " on " + std::string(to_string(isa));
            const auto [out_ids, out_weights] = same_at_any_thread_count(
                [&] {
                    return ids_and_weights(moelb::select_experts(cmap(logits), c.config, bias));
                },
                what);
            ids.push_back(out_ids);
            weights.push_back(out_weights);
            if (ids.size() > 1) {
                EXPECT_TRUE(ids.back() == ids.front()) << what << ": expert ids differ";
                expect_weights_near(weights.back(), weights.front(), what);
            }
        });
        EXPECT_FALSE(ids.empty());
    }
}

TEST(CpuIsa, HashRouterPathsAgree) {
    const int E = 64, K = 6, V = 50;
    RowMatrix<std::int32_t> tid2eid(V, K);
    std::mt19937 gen(11);
    for (Index v = 0; v < V; ++v) {
        for (int k = 0; k < K; ++k) tid2eid(v, k) = static_cast<std::int32_t>((v * 7 + k * 5) % E);
    }
    const RowMatrix<float> logits = tie_free_logits(333, E, 4, 9);
    std::vector<std::int64_t> input_ids(static_cast<std::size_t>(logits.rows()));
    for (auto& id : input_ids) id = static_cast<std::int64_t>(gen() % V);
    for (const Scoring scoring : {Scoring::kSoftmax, Scoring::kSigmoid, Scoring::kSqrtSoftplus}) {
        const HashRouter router(tid2eid, scoring, 1.5f);
        std::vector<RowMatrix<float>> weights;
        for_each_path([&](CpuIsa isa) {
            const std::string what =
                std::string(to_string(scoring)) + " hash on " + std::string(to_string(isa));
            const auto out = same_at_any_thread_count(
                [&] {
                    return ids_and_weights(router.select<std::int64_t>(
                        cmap(logits), std::span<const std::int64_t>(input_ids)));
                },
                what);
            weights.push_back(out.second);
            if (weights.size() > 1) expect_weights_near(weights.back(), weights.front(), what);
        });
        EXPECT_FALSE(weights.empty());
    }
}

TEST(CpuIsa, MoeLayerPathsAgree) {
    // Every token takes every expert (top_k = num_experts): the outputs are continuous in the
    // gate logits, so float rounding between paths cannot flip a selection (RoutingPathsAgree
    // covers selection).
    DeepSeekMoEConfig c = DeepSeekMoEConfig::deepseek_v3();
    c.hidden_size = 40;  // not a multiple of 16: the GEMMs' edge code runs too
    c.intermediate_size = 24;
    c.num_experts = 8;
    c.top_k = 8;
    c.num_groups = 1;
    c.topk_group = 1;
    DeepSeekMoE layer(c, DeepSeekMoEWeights::random(c, 5));
    std::mt19937_64 rng(21);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    RowMatrix<float> x(300, c.hidden_size);  // three row blocks per expert
    for (Index i = 0; i < x.size(); ++i) x.data()[i] = normal(rng);
    std::vector<RowMatrix<float>> outputs;
    for_each_path([&](CpuIsa isa) {
        const std::string what = "forward on " + std::string(to_string(isa));
        RowMatrix<float> out = same_at_any_thread_count(
            [&] {
                RowMatrix<float> hidden = x;
                RowMatrix<float> y(x.rows(), c.hidden_size);
                layer.forward(mmap(hidden), {}, mmap(y));
                return y;
            },
            what);
        outputs.push_back(out);
        if (outputs.size() > 1) {
            const float scale = outputs.front().cwiseAbs().maxCoeff();
            EXPECT_LE((outputs.back() - outputs.front()).cwiseAbs().maxCoeff(), 1e-5f * scale)
                << what;
        }
    });
    EXPECT_FALSE(outputs.empty());
}

// The planner's kernels (isa/eplb_kernels.cpp, compiled with -ffp-contract=off) compute the same
// bits on every path: plans must not depend on the CPU that makes them. Shapes that take each
// kernel: DeepSeek's small sorts and narrow packing (8 GPUs per node), the float32 and float64
// swap screens (Zipf loads; loads beyond float32's range), and the step-peak search.
TEST(CpuIsa, PlansAreTheSameOnEveryPath) {
    constexpr int L = 6, E = 64, T = 40;
    std::mt19937_64 rng(17);
    std::exponential_distribution<double> exponential(1.0);
    std::vector<double> steps(static_cast<std::size_t>(T) * L * E);
    for (double& v : steps) v = std::floor(100.0 * exponential(rng) * exponential(rng));
    RowMatrix<double> total = RowMatrix<double>::Zero(L, E);
    for (int t = 0; t < T; ++t) {
        for (Index i = 0; i < L * E; ++i)
            total.data()[i] += steps[static_cast<std::size_t>(t * L * E + i)];
    }
    RowMatrix<double> huge = total * 1e35;  // beyond float32: the float64 screen
    struct PlanCase {
        std::string name;
        EplbAlgorithm algorithm;
        Locality locality;
        Objective objective;
        int slots, gpus, nodes;
        const RowMatrix<double>* load;  // null: the per-step loads
    };
    const PlanCase cases[] = {
        {"deepseek", EplbAlgorithm::kDeepSeek, Locality::kAuto, Objective::kTotal, 80, 16, 2,
         &total},
        {"deepseek_global", EplbAlgorithm::kDeepSeekGlobal, Locality::kAuto, Objective::kTotal, 96,
         8, 1, &total},
        {"moelb-node", EplbAlgorithm::kMoelb, Locality::kNode, Objective::kTotal, 96, 16, 2,
         &total},
        {"moelb-none", EplbAlgorithm::kMoelb, Locality::kNone, Objective::kTotal, 128, 16, 2,
         &total},
        {"moelb-none-1e35", EplbAlgorithm::kMoelb, Locality::kNone, Objective::kTotal, 128, 16, 2,
         &huge},
        {"moelb-step_peak", EplbAlgorithm::kMoelb, Locality::kNone, Objective::kStepPeak, 96, 8, 1,
         nullptr},
    };
    for (const PlanCase& c : cases) {
        RebalanceOptions options;
        options.num_physical_experts = c.slots;
        options.num_groups = 8;
        options.num_nodes = c.nodes;
        options.ep_size = c.gpus;
        options.algorithm = c.algorithm;
        options.locality = c.locality;
        options.objective = c.objective;
        std::vector<RowMatrix<std::int32_t>> maps;
        std::vector<double> balancedness;
        for_each_path([&](CpuIsa isa) {
            const moelb::Plan plan =
                c.load != nullptr
                    ? moelb::rebalance(cmap(*c.load), options)
                    : moelb::rebalance(StepLoads{std::span<const double>(steps), T, L, E}, options);
            maps.push_back(plan.location.physical_to_logical());
            balancedness.push_back(plan.stats.balancedness);
            if (maps.size() > 1) {
                EXPECT_TRUE(maps.back() == maps.front())
                    << c.name << " on " << to_string(isa) << ": another plan";
                EXPECT_EQ(balancedness.back(), balancedness.front()) << c.name;
            }
        });
        EXPECT_FALSE(maps.empty());
    }
}

// The simulator's kernels (isa/simulate_kernels.cpp) also give the same bits on every path, and
// report the first negative count as before.
TEST(CpuIsa, ScoresAreTheSameOnEveryPath) {
    constexpr Index T = 300, L = 3, E = 40;
    std::mt19937 gen(23);
    std::poisson_distribution<int> poisson(50);
    std::vector<std::int32_t> counts(static_cast<std::size_t>(T * L * E));
    for (auto& c : counts) c = poisson(gen);
    RowMatrix<double> total = RowMatrix<double>::Zero(L, E);
    for (Index i = 0; i < T * L * E; ++i)
        total.data()[i % (L * E)] += counts[static_cast<std::size_t>(i)];
    RebalanceOptions options;
    options.num_physical_experts = 48;
    options.ep_size = 8;
    const moelb::ExpertLocation location = moelb::rebalance(cmap(total), options).location;
    const moelb::StepCounts view{std::span<const std::int32_t>(counts), T, L, E};
    std::vector<RowMatrix<double>> maxima, means, bounds;
    for_each_path([&](CpuIsa isa) {
        RowMatrix<double> max_load(T, L), mean_load(T, L), bound(T, L);
        moelb::score_steps(view, location, mmap(max_load), mmap(mean_load));
        moelb::step_lower_bounds(view, 41, 8, mmap(bound));  // 41 slots: the divisor path too
        maxima.push_back(max_load);
        means.push_back(mean_load);
        bounds.push_back(bound);
        EXPECT_TRUE(maxima.back() == maxima.front()) << to_string(isa);
        EXPECT_TRUE(means.back() == means.front()) << to_string(isa);
        EXPECT_TRUE(bounds.back() == bounds.front()) << to_string(isa);
        EXPECT_TRUE((bound.array() >= mean_load.array()).all());
        EXPECT_GT(max_load.minCoeff(), 0.0);
        EXPECT_TRUE((max_load.array() >= mean_load.array()).all());
    });
    std::vector<std::int32_t> bad = counts;
    bad[static_cast<std::size_t>((7 * L + 2) * E + 5)] = -3;
    bad[static_cast<std::size_t>((9 * L + 0) * E + 1)] = -4;
    const moelb::StepCounts bad_view{std::span<const std::int32_t>(bad), T, L, E};
    for_each_path([&](CpuIsa) {
        RowMatrix<double> max_load(T, L), mean_load(T, L);
        expect_invalid_argument(
            [&] { moelb::score_steps(bad_view, location, mmap(max_load), mmap(mean_load)); },
            "counts[7, 2, 5] = -3 is negative");
        expect_invalid_argument([&] { moelb::step_lower_bounds(bad_view, 48, 8, mmap(max_load)); },
                                "counts[7, 2, 5] = -3 is negative");
    });
}

}  // namespace
