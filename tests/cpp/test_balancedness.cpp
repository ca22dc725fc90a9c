// One balancedness (balancedness.hpp; DESIGN section 3, reference/recorder.md section 7.2):
// SGLang's per-layer utilization rate and its layer means, the "all layers" mean (dense and idle
// layers count 1.0) and the "active" variant.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "moelb/balancedness.hpp"
#include "moelb/errors.hpp"
#include "test_util.hpp"

namespace {

using moelb::LayerSet;
using moelb::test_util::expect_invalid_argument;

constexpr double kEps = 1e-5;

TEST(Balancedness, UtilizationRateIsSGLangs) {
    EXPECT_DOUBLE_EQ(moelb::utilization_rate(2.0, 4.0), (2.0 + kEps) / (4.0 + kEps));
    EXPECT_EQ(moelb::utilization_rate(0.0, 0.0), 1.0);           // a dense layer, an idle pass
    EXPECT_DOUBLE_EQ(moelb::utilization_rate(1e-5, 3e-5), 0.5);  // the epsilon shows on tiny loads
    EXPECT_EQ(moelb::kBalancednessEpsilon, 1e-5);
}

TEST(Balancedness, LayerMeanOverAllOrActiveLayers) {
    const std::vector<double> mean = {2.0, 0.0, 3.0};
    const std::vector<double> max = {4.0, 0.0, 3.0};
    const double r0 = (2.0 + kEps) / (4.0 + kEps);
    EXPECT_DOUBLE_EQ(moelb::balancedness(mean, max), (r0 + 1.0 + 1.0) / 3.0);
    EXPECT_DOUBLE_EQ(moelb::balancedness(mean, max, LayerSet::kActive), (r0 + 1.0) / 2.0);
    const std::vector<double> idle = {0.0, 0.0};
    EXPECT_EQ(moelb::balancedness(idle, idle), 1.0);
    EXPECT_TRUE(std::isnan(moelb::balancedness(idle, idle, LayerSet::kActive)));
    EXPECT_TRUE(std::isnan(moelb::balancedness({}, {})));
    expect_invalid_argument([&] { moelb::balancedness(mean, idle); },
                            "mean_rank_load has 3 layers but max_rank_load has 2");
}

TEST(Balancedness, PassBalancednessSumsSlotsPerGpu) {
    // L=2, P=4, W=2: layer 0 GPUs [4, 0], layer 1 dense.
    const std::vector<std::int32_t> counts = {1, 3, 0, 0, /**/ 0, 0, 0, 0};
    const double r0 = (2.0 + kEps) / (4.0 + kEps);
    EXPECT_DOUBLE_EQ(moelb::pass_balancedness(counts, 2, 4, 2), (r0 + 1.0) / 2.0);
    EXPECT_DOUBLE_EQ(moelb::pass_balancedness(counts, 2, 4, 2, LayerSet::kActive), r0);
    const std::vector<std::int32_t> negative = {1, -3, 0, 0};
    expect_invalid_argument([&] { moelb::pass_balancedness(negative, 1, 4, 2); },
                            "counts[0, 1] = -3 is negative");
}

TEST(Balancedness, ParseLayerSet) {
    EXPECT_EQ(moelb::parse_layer_set("all"), LayerSet::kAll);
    EXPECT_EQ(moelb::parse_layer_set("active"), LayerSet::kActive);
    EXPECT_EQ(moelb::to_string(LayerSet::kActive), "active");
    expect_invalid_argument([] { moelb::parse_layer_set("moe"); }, "layers='moe'");
}

}  // namespace
