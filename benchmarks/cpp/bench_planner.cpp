// The EPLB planner's own time, without Python: median wall time of rebalance() per whole-model
// plan (58 layers x 256 experts, 8 groups, log-normal loads) for DeepSeek's policy and moelb's, at
// the DeepSeek-V3 topologies of benchmarks/bench_eplb.py, at 1 and 2 threads. For profiling
// (perf record ./moelb_bench_planner); the Python benchmark compares against the references.
//
//   cmake -S . -B build/bench -DMOELB_BUILD_BENCHMARKS=ON && cmake --build build/bench
//   ./build/bench/moelb_bench_planner [repeats]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "moelb/eplb.hpp"
#include "moelb/parallel.hpp"

namespace {

struct Topology {
    int slots, gpus, nodes;
};

double median_ms(const moelb::RowMatrix<double>& load, const moelb::RebalanceOptions& options,
                 int repeats, double* gap) {
    std::vector<double> times;
    for (int r = 0; r < repeats; ++r) {
        const auto start = std::chrono::steady_clock::now();
        const moelb::Plan plan = moelb::rebalance(
            moelb::ConstMatrixMap<double>(load.data(), load.rows(), load.cols()), options);
        times.push_back(
            std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
                .count());
        *gap = plan.stats.mean_gap;
    }
    std::sort(times.begin(), times.end());
    return times[times.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
    const int repeats = argc > 1 ? std::max(1, std::stoi(argv[1])) : 9;
    constexpr int kLayers = 58, kExperts = 256, kGroups = 8;
    moelb::RowMatrix<double> load(kLayers, kExperts);
    std::mt19937 rng(0);
    std::normal_distribution<double> normal(0.0, 1.0);
    for (moelb::Index i = 0; i < load.size(); ++i) load.data()[i] = 1000.0 * std::exp(normal(rng));

    std::printf("%-14s %-9s %7s %9s %9s\n", "topology", "algorithm", "threads", "median ms",
                "mean gap");
    for (const Topology t : {Topology{288, 32, 4}, {320, 64, 8}, {288, 72, 9}, {288, 144, 18}}) {
        for (const auto algorithm :
             {moelb::EplbAlgorithm::kDeepSeek, moelb::EplbAlgorithm::kMoelb}) {
            for (const int threads : {1, 2}) {
                moelb::set_num_threads(threads);
                moelb::RebalanceOptions options;
                options.num_physical_experts = t.slots;
                options.num_groups = kGroups;
                options.num_nodes = t.nodes;
                options.num_gpus = t.gpus;
                options.algorithm = algorithm;
                double gap = 0.0;
                const double ms = median_ms(load, options, repeats, &gap);
                const std::string name = std::to_string(t.slots) + "/" + std::to_string(t.gpus) +
                                         "g/" + std::to_string(t.nodes) + "n";
                std::printf("%-14s %-9s %7d %9.2f %8.4f%%\n", name.c_str(),
                            std::string(moelb::to_string(algorithm)).c_str(), threads, ms,
                            100.0 * gap);
            }
        }
    }
    moelb::set_num_threads(0);
    return 0;
}
