// The machine-limit microbenchmarks (moelb/machine_limits.hpp): a smoke test on small sizes --
// every figure positive and finite on every path, the option checks -- not a timing test.
#include <gtest/gtest.h>

#include <cmath>
#include <string>

#include "moelb/cpu_isa.hpp"
#include "moelb/machine_limits.hpp"
#include "moelb/parallel.hpp"
#include "test_util.hpp"

namespace {

using moelb::MachineLimits;
using moelb::MachineLimitsOptions;
using moelb::test_util::expect_invalid_argument;

MachineLimitsOptions quick(int threads) {
    MachineLimitsOptions o;
    o.threads = threads;
    o.buffer_bytes = 4 << 20;
    o.passes = 2;
    o.seconds = 0.005;
    return o;
}

TEST(MachineLimits, FiguresArePositiveAndFiniteOnEveryPath) {
    const moelb::CpuIsa saved = moelb::cpu_isa();
    for (const moelb::CpuIsa isa : moelb::available_cpu_isas()) {
        moelb::set_cpu_isa(isa);
        for (const int threads : {1, 2}) {
            if (threads > moelb::get_num_threads()) continue;
            const MachineLimits m = moelb::measure_machine_limits(quick(threads));
            const std::string what = std::string(to_string(isa)) +
                                     " threads=" + std::to_string(threads) + " " +
                                     m.bf16_dot_method;
            EXPECT_EQ(m.threads, threads);
            EXPECT_EQ(m.cpu_isa, std::string(to_string(isa)));
            EXPECT_EQ(m.passes, 2);
            EXPECT_GT(m.buffer_bytes, (4 << 20) - 256 * threads) << what;
            EXPECT_LE(m.buffer_bytes, 4 << 20) << what;
            for (const double v :
                 {m.read_bandwidth_gbs, m.fma_peak_gflops, m.bf16_dot_peak_gflops}) {
                EXPECT_TRUE(std::isfinite(v) && v > 0) << what << ": " << v;
            }
            EXPECT_FALSE(m.bf16_dot_method.empty());
        }
    }
    moelb::set_cpu_isa(saved);
}

TEST(MachineLimits, RefusesBadOptions) {
    MachineLimitsOptions o = quick(0);
    expect_invalid_argument([&] { moelb::measure_machine_limits(o); },
                            "threads must be >= 1, got 0");
    o = quick(moelb::get_num_threads() + 1);
    expect_invalid_argument([&] { moelb::measure_machine_limits(o); }, "exceeds get_num_threads()");
    o = quick(1);
    o.buffer_bytes = 1000;
    expect_invalid_argument([&] { moelb::measure_machine_limits(o); },
                            "buffer_bytes must be >= 1 MiB (1048576), got 1000");
    o = quick(1);
    o.passes = 0;
    expect_invalid_argument([&] { moelb::measure_machine_limits(o); },
                            "passes must be >= 1, got 0");
    o = quick(1);
    o.seconds = -1;
    expect_invalid_argument([&] { moelb::measure_machine_limits(o); },
                            "seconds must be finite and >= 0.001");
}

}  // namespace
