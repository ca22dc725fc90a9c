// The EPLB planner's own time, without Python: median wall time of rebalance() per whole-model
// plan (58 layers x 256 experts, 8 groups) for DeepSeek's policy and moelb's (locality "node" where
// the groups fit the nodes, and "none"), on the load models of benchmarks/bench_eplb.py (Zipf and
// log-normal; drawn here with the C++ library, so the figures differ slightly), at the DeepSeek-V3
// topologies of bench_eplb.py, at 1 and 2 threads. For profiling (perf record
// ./moelb_bench_planner 9 320/64 moelb-none); the Python benchmark compares against the references.
//
//   cmake -S . -B build/bench -DMOELB_BUILD_BENCHMARKS=ON && cmake --build build/bench
//   ./build/bench/moelb_bench_planner [repeats [topology filter [plan filter [threads]]]]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "moelb/eplb.hpp"
#include "moelb/parallel.hpp"

namespace {

constexpr int kLayers = 58, kExperts = 256, kGroups = 8;
constexpr double kZipfS = 1.0, kZipfSpread = 0.1;  // Zipf exponent per layer: 1 +- 0.1
constexpr double kLogNormalSigma = 1.0;
constexpr double kLayerLoad = 8.0 * (1 << 20);  // tokens x top-8 per layer

struct Topology {
    int slots, gpus, nodes;
};

struct PlanKind {
    const char* name;
    moelb::EplbAlgorithm algorithm;
    moelb::Locality locality;
};

// [L, E]: per layer 1 / rank^s over a random permutation of the experts.
moelb::RowMatrix<double> zipf_loads(std::mt19937& rng) {
    moelb::RowMatrix<double> load(kLayers, kExperts);
    std::uniform_real_distribution<double> exponent(kZipfS - kZipfSpread, kZipfS + kZipfSpread);
    std::vector<int> perm(kExperts);
    for (int l = 0; l < kLayers; ++l) {
        const double s = exponent(rng);
        std::iota(perm.begin(), perm.end(), 0);
        std::shuffle(perm.begin(), perm.end(), rng);
        double total = 0.0;
        for (int r = 0; r < kExperts; ++r) total += std::pow(r + 1.0, -s);
        for (int r = 0; r < kExperts; ++r) {
            load(l, perm[r]) = std::pow(r + 1.0, -s) / total * kLayerLoad;
        }
    }
    return load;
}

// [L, E]: exp(sigma * N(0, 1)) per expert, each layer scaled to kLayerLoad.
moelb::RowMatrix<double> lognormal_loads(std::mt19937& rng) {
    moelb::RowMatrix<double> load(kLayers, kExperts);
    std::normal_distribution<double> normal(0.0, 1.0);
    for (int l = 0; l < kLayers; ++l) {
        double total = 0.0;
        for (int e = 0; e < kExperts; ++e)
            total += load(l, e) = std::exp(kLogNormalSigma * normal(rng));
        for (int e = 0; e < kExperts; ++e) load(l, e) *= kLayerLoad / total;
    }
    return load;
}

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
    const std::string topology_filter = argc > 2 ? argv[2] : "";
    const std::string plan_filter = argc > 3 ? argv[3] : "";
    const int only_threads = argc > 4 ? std::stoi(argv[4]) : 0;
    std::mt19937 rng(0);
    const moelb::RowMatrix<double> zipf = zipf_loads(rng);
    const moelb::RowMatrix<double> lognormal = lognormal_loads(rng);
    const PlanKind kinds[] = {
        {"deepseek", moelb::EplbAlgorithm::kDeepSeek, moelb::Locality::kAuto},
        {"moelb-node", moelb::EplbAlgorithm::kMoelb, moelb::Locality::kNode},
        {"moelb-none", moelb::EplbAlgorithm::kMoelb, moelb::Locality::kNone},
    };

    std::printf("%-14s %-10s %-10s %7s %9s %9s\n", "topology", "loads", "plan", "threads",
                "median ms", "mean gap");
    for (const Topology t : {Topology{288, 32, 4}, {320, 64, 8}, {288, 72, 9}, {288, 144, 18}}) {
        const std::string name = std::to_string(t.slots) + "/" + std::to_string(t.gpus) + "g/" +
                                 std::to_string(t.nodes) + "n";
        if (name.find(topology_filter) == std::string::npos) continue;
        for (const auto& [loads_name, load] :
             {std::pair<const char*, const moelb::RowMatrix<double>&>{"zipf", zipf},
              {"lognormal", lognormal}}) {
            for (const PlanKind& kind : kinds) {
                if (std::string(kind.name).find(plan_filter) == std::string::npos) continue;
                // Node locality needs the groups to divide over the nodes (else it is "none").
                if (kind.locality == moelb::Locality::kNode && kGroups % t.nodes != 0) continue;
                for (const int threads : {1, 2}) {
                    if (only_threads > 0 && threads != only_threads) continue;
                    moelb::set_num_threads(threads);
                    moelb::RebalanceOptions options;
                    options.num_physical_experts = t.slots;
                    options.num_groups = kGroups;
                    options.num_nodes = t.nodes;
                    options.ep_size = t.gpus;
                    options.algorithm = kind.algorithm;
                    options.locality = kind.locality;
                    double gap = 0.0;
                    const double ms = median_ms(load, options, repeats, &gap);
                    std::printf("%-14s %-10s %-10s %7d %9.2f %8.4f%%\n", name.c_str(), loads_name,
                                kind.name, threads, ms, 100.0 * gap);
                }
            }
        }
    }
    moelb::set_num_threads(0);
    return 0;
}
