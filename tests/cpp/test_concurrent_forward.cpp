// Regression test: forwards of one DeepSeekMoE layer from several threads at once. The Python
// binding releases the GIL around forward, so two Python threads sharing a layer ran forward
// concurrently, and each forward rewrote the layer's statistics (a vector of step names) without
// a lock: a data race that could corrupt the heap. Now the forward only reads the layer and
// publishes its statistics under a lock; results equal the serial ones bit for bit.
#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "moelb/moe_layer.hpp"
#include "moelb/parallel.hpp"
#include "test_util.hpp"

namespace {

using moelb::DeepSeekMoE;
using moelb::DeepSeekMoEConfig;
using moelb::DeepSeekMoEWeights;
using moelb::Index;
using moelb::RowMatrix;
using moelb::test_util::mmap;

RowMatrix<float> random_hidden(Index T, Index H, std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    RowMatrix<float> x(T, H);
    for (Index i = 0; i < x.size(); ++i) x.data()[i] = normal(rng);
    return x;
}

TEST(ConcurrentForward, OneLayerManyThreadsMatchesSerial) {
    DeepSeekMoEConfig c = DeepSeekMoEConfig::deepseek_v3();
    c.hidden_size = 32;
    c.intermediate_size = 16;
    c.num_experts = 16;
    c.top_k = 4;
    c.num_groups = 4;
    c.topk_group = 2;
    DeepSeekMoE layer(c, DeepSeekMoEWeights::random(c, 3));
    constexpr int kThreads = 6, kRounds = 20;
    std::vector<RowMatrix<float>> inputs, expected;
    for (int i = 0; i < kThreads; ++i) {
        inputs.push_back(random_hidden(17 + 23 * i, c.hidden_size, 100 + i));
        RowMatrix<float> out(inputs.back().rows(), c.hidden_size);
        layer.forward(mmap(inputs.back()), {}, mmap(out));
        expected.push_back(out);
    }
    const std::vector<std::string> steps = layer.last_stats().steps;
    ASSERT_FALSE(steps.empty());

    const int saved_threads = moelb::get_num_threads();
    moelb::set_num_threads(1);  // the concurrency comes from the callers
    std::vector<int> mismatches(kThreads, 0);
    std::vector<std::thread> threads;
    for (int i = 0; i < kThreads; ++i) {
        threads.emplace_back([&, i] {
            RowMatrix<float> x = inputs[static_cast<std::size_t>(i)];
            RowMatrix<float> out(x.rows(), c.hidden_size);
            for (int round = 0; round < kRounds; ++round) {
                layer.forward(mmap(x), {}, mmap(out));
                if (out != expected[static_cast<std::size_t>(i)]) ++mismatches[i];
                if (layer.last_stats().steps != steps) ++mismatches[i];
            }
        });
    }
    for (auto& t : threads) t.join();
    moelb::set_num_threads(saved_threads);
    for (int i = 0; i < kThreads; ++i) EXPECT_EQ(mismatches[i], 0) << "thread " << i;
}

}  // namespace
