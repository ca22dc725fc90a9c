// The cluster simulator's hot loop (DESIGN section 7; moelb/simulate.hpp): per-step rank loads of
// a placement under equal split, and the per-step lower bounds.
#include "moelb/simulate.hpp"

#include <algorithm>
#include <cmath>
#include <sstream>
#include <vector>

#include "isa/kernels.hpp"
#include "moelb/errors.hpp"
#include "moelb/parallel.hpp"

namespace moelb {

namespace {

// Rows (step, layer) per parallel chunk: a chunk is about 100k counts.
constexpr Index kRowGrain = 512;

void check_counts(const StepCounts& counts) {
    MOELB_CHECK_ARG(counts.num_steps >= 0 && counts.num_layers >= 0 && counts.num_experts >= 0,
                    "counts has a negative dimension: [" << counts.num_steps << ", "
                                                         << counts.num_layers << ", "
                                                         << counts.num_experts << "]");
    const Index expected = counts.num_steps * counts.num_layers * counts.num_experts;
    MOELB_CHECK_ARG(static_cast<Index>(counts.data.size()) == expected,
                    "counts holds " << counts.data.size() << " values but its shape ["
                                    << counts.num_steps << ", " << counts.num_layers << ", "
                                    << counts.num_experts << "] needs " << expected);
}

void check_output(const MatrixMap<double>& out, const StepCounts& counts, const char* name) {
    MOELB_CHECK_ARG(out.rows() == counts.num_steps && out.cols() == counts.num_layers,
                    name << " has shape [" << out.rows() << ", " << out.cols()
                         << "] but counts has " << counts.num_steps << " steps and "
                         << counts.num_layers << " layers");
}

[[noreturn]] void negative_count(const StepCounts& counts, Index row, Index expert,
                                 std::int32_t value) {
    std::ostringstream os;
    os << "counts[" << row / counts.num_layers << ", " << row % counts.num_layers << ", " << expert
       << "] = " << value << " is negative; counts must be >= 0";
    detail::throw_invalid_argument(os.str(), "counts >= 0");
}

// (per-replica load, replicas, expert) of the divisor method's max-heap.
struct HeapItem {
    double load;
    int replicas;
    Index expert;
    bool operator<(const HeapItem& o) const { return load < o.load; }
};

// The divisor method's largest per-replica load: every expert starts with one replica and each of
// the `extras` slots goes to the expert with the largest per-replica load.
double divisor_bound(const std::int32_t* c, Index E, Index extras, std::vector<HeapItem>& heap) {
    heap.clear();
    for (Index e = 0; e < E; ++e) heap.push_back({static_cast<double>(c[e]), 1, e});
    std::make_heap(heap.begin(), heap.end());
    for (Index k = 0; k < extras && heap.front().load > 0; ++k) {
        std::pop_heap(heap.begin(), heap.end());
        HeapItem& top = heap.back();
        ++top.replicas;
        top.load = static_cast<double>(c[top.expert]) / top.replicas;
        std::push_heap(heap.begin(), heap.end());
    }
    return heap.front().load;
}

}  // namespace

void score_steps(const StepCounts& counts, const ExpertLocation& location,
                 MatrixMap<double> max_rank_load, MatrixMap<double> mean_rank_load) {
    check_counts(counts);
    MOELB_CHECK_ARG(counts.num_layers == location.num_layers(),
                    "counts has " << counts.num_layers << " layers but the location has "
                                  << location.num_layers());
    MOELB_CHECK_ARG(counts.num_experts == location.num_logical_experts(),
                    "counts has " << counts.num_experts << " experts but the location has "
                                  << location.num_logical_experts() << " logical experts");
    check_output(max_rank_load, counts, "max_rank_load");
    check_output(mean_rank_load, counts, "mean_rank_load");

    const Index L = counts.num_layers, E = counts.num_experts;
    const int W = location.ep_size();
    const int S = location.num_local_physical_experts();
    // Per layer: 1 / replicas of each expert.
    RowMatrix<double> inv_replicas(L, E);
    for (Index l = 0; l < L; ++l) {
        for (Index e = 0; e < E; ++e) {
            inv_replicas(l, e) = 1.0 / static_cast<double>(location.logical_count()(l, e));
        }
    }
    const RowMatrix<std::int32_t>& phy2log = location.physical_to_logical();
    const Index rows = counts.num_steps * L;
    // The rows' loads run on the ISA path chosen now (moelb/cpu_isa.hpp; the same bits on every
    // path).
    const isa::Kernels& kernels = isa::kernels();
    isa::ScoreRows args;
    args.counts = counts.data.data();
    args.num_layers = L;
    args.num_experts = E;
    args.inv_replicas = inv_replicas.data();
    args.phy2log = phy2log.data();
    args.num_physical_experts = location.num_physical_experts();
    args.ep_size = W;
    args.slots_per_rank = S;
    parallel_for(rows, kRowGrain, [&](Index begin, Index end) {
        std::vector<double> share(static_cast<std::size_t>(E));
        std::vector<double> max_load(static_cast<std::size_t>(end - begin)), total(max_load.size());
        const isa::Index bad =
            kernels.score_rows(args, begin, end, share.data(), max_load.data(), total.data());
        if (bad >= 0) [[unlikely]]
            negative_count(counts, bad / E, bad % E, counts.data[static_cast<std::size_t>(bad)]);
        for (Index row = begin; row < end; ++row) {
            max_rank_load(row / L, row % L) = max_load[static_cast<std::size_t>(row - begin)];
            mean_rank_load(row / L, row % L) = total[static_cast<std::size_t>(row - begin)] / W;
        }
    });
}

void step_lower_bounds(const StepCounts& counts, int num_physical_experts, int ep_size,
                       MatrixMap<double> out) {
    check_counts(counts);
    MOELB_CHECK_ARG(ep_size >= 1, "ep_size must be >= 1, got " << ep_size);
    MOELB_CHECK_ARG(num_physical_experts >= counts.num_experts,
                    "num_physical_experts=" << num_physical_experts << " is less than the "
                                            << counts.num_experts << " experts of counts");
    check_output(out, counts, "out");
    const Index L = counts.num_layers, E = counts.num_experts;
    const Index extras = num_physical_experts - E;
    const std::int32_t* data = counts.data.data();
    // The fast path runs on the ISA path chosen now (moelb/cpu_isa.hpp; the same bits on every
    // path): when every expert fits under total / ep_size with the slots available, the bound is
    // that mean (the divisor method's value cannot exceed it).
    const isa::Kernels& kernels = isa::kernels();
    parallel_for(counts.num_steps * L, kRowGrain, [&](Index begin, Index end) {
        std::vector<HeapItem> heap;
        std::vector<double> mean(static_cast<std::size_t>(end - begin));
        std::vector<Index> needed(mean.size());
        const Index bad =
            kernels.bound_rows(data, E, ep_size, begin, end, mean.data(), needed.data());
        if (bad >= 0) [[unlikely]]
            negative_count(counts, bad / E, bad % E, data[bad]);
        for (Index row = begin; row < end; ++row) {
            const std::size_t r = static_cast<std::size_t>(row - begin);
            const double bound = needed[r] > num_physical_experts
                                     ? divisor_bound(data + row * E, E, extras, heap)
                                     : 0.0;
            out(row / L, row % L) = std::max(mean[r], bound);
        }
    });
}

}  // namespace moelb
