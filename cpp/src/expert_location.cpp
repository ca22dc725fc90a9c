// Expert placement (DESIGN section 2; moelb/expert_location.hpp): the physical->logical map per
// layer, checked, its logical->physical replica lists and the trivial placement.
#include "moelb/expert_location.hpp"

#include <algorithm>

#include "moelb/errors.hpp"
#include "moelb/parallel.hpp"

namespace moelb {
ExpertLocation::ExpertLocation(RowMatrix<std::int32_t> physical_to_logical, int num_logical_experts,
                               int ep_size, int num_nodes)
    : physical_to_logical_(std::move(physical_to_logical)),
      num_logical_experts_(num_logical_experts),
      ep_size_(ep_size),
      num_nodes_(num_nodes) {
    const Index L = physical_to_logical_.rows();
    const Index P = physical_to_logical_.cols();
    const int E = num_logical_experts;
    MOELB_CHECK_ARG(L >= 1, "physical_to_logical must have at least one layer, got shape ["
                                << L << ", " << P << "]");
    MOELB_CHECK_ARG(E >= 1, "num_logical_experts must be positive, got " << E);
    MOELB_CHECK_ARG(ep_size >= 1, "ep_size must be positive, got " << ep_size);
    MOELB_CHECK_ARG(num_nodes >= 1, "num_nodes must be positive, got " << num_nodes);
    MOELB_CHECK_ARG(P >= E, "num_physical_experts=" << P << " is smaller than num_logical_experts="
                                                    << E << ": some expert would have no replica");
    MOELB_CHECK_ARG(P % ep_size == 0,
                    "num_physical_experts=" << P << " is not divisible by ep_size=" << ep_size);
    MOELB_CHECK_ARG(ep_size % num_nodes == 0,
                    "ep_size=" << ep_size << " is not divisible by num_nodes=" << num_nodes);

    // Per layer (in parallel; an error is that of the lowest bad layer, as a serial scan finds):
    // the replica counts, then the replicas of each expert in slot order, padded with -1.
    constexpr Index kLayerGrain = 8;
    logical_count_ = RowMatrix<std::int32_t>::Zero(L, E);
    parallel_for(L, kLayerGrain, [&](Index begin, Index end) {
        for (Index l = begin; l < end; ++l) {
            for (Index p = 0; p < P; ++p) {
                const std::int32_t e = physical_to_logical_(l, p);
                MOELB_CHECK_ARG(e >= 0 && e < E, "physical_to_logical["
                                                     << l << ", " << p << "] = " << e
                                                     << " is outside [0, num_logical_experts=" << E
                                                     << ")");
                ++logical_count_(l, e);
            }
            for (int e = 0; e < E; ++e) {
                MOELB_CHECK_ARG(logical_count_(l, e) > 0, "logical expert "
                                                              << e << " has no replica in layer "
                                                              << l << " of physical_to_logical");
            }
        }
    });
    max_replicas_ = logical_count_.maxCoeff();
    const Index X = max_replicas_;
    logical_to_physical_.clear();
    logical_to_physical_.resize(static_cast<std::size_t>(L * E * X));  // unwritten (PooledVector)
    parallel_for(L, kLayerGrain, [&](Index begin, Index end) {
        std::vector<int> fill(static_cast<std::size_t>(E));
        for (Index l = begin; l < end; ++l) {
            // The layer's rows are contiguous: pad them, then place each slot.
            std::int32_t* rows = logical_to_physical_.data() + l * E * X;
            std::fill(rows, rows + E * X, -1);
            std::fill(fill.begin(), fill.end(), 0);
            for (Index p = 0; p < P; ++p) {
                const int e = physical_to_logical_(l, p);
                rows[e * X + fill[static_cast<std::size_t>(e)]++] = static_cast<std::int32_t>(p);
            }
        }
    });
}

ExpertLocation ExpertLocation::trivial(int num_layers, int num_logical_experts,
                                       int num_physical_experts, int ep_size, int num_nodes) {
    MOELB_CHECK_ARG(num_layers >= 1, "num_layers must be positive, got " << num_layers);
    MOELB_CHECK_ARG(num_logical_experts >= 1,
                    "num_logical_experts must be positive, got " << num_logical_experts);
    MOELB_CHECK_ARG(
        num_physical_experts >= num_logical_experts,
        "num_physical_experts=" << num_physical_experts
                                << " is smaller than num_logical_experts=" << num_logical_experts);
    RowMatrix<std::int32_t> map(num_layers, num_physical_experts);
    for (int l = 0; l < num_layers; ++l) {
        for (int p = 0; p < num_physical_experts; ++p) map(l, p) = p % num_logical_experts;
    }
    return ExpertLocation(std::move(map), num_logical_experts, ep_size, num_nodes);
}

bool ExpertLocation::operator==(const ExpertLocation& other) const {
    return num_logical_experts_ == other.num_logical_experts_ && ep_size_ == other.ep_size_ &&
           num_nodes_ == other.num_nodes_ &&
           physical_to_logical_.rows() == other.physical_to_logical_.rows() &&
           physical_to_logical_.cols() == other.physical_to_logical_.cols() &&
           physical_to_logical_ == other.physical_to_logical_;
}

}  // namespace moelb
