// Balancedness (DESIGN section 3; moelb/balancedness.hpp): SGLang's utilization rate per layer
// and its means over layers, the one definition every figure of moelb uses.
#include "moelb/balancedness.hpp"

#include <algorithm>
#include <limits>

#include "enum_names.hpp"
#include "moelb/errors.hpp"
#include "moelb/views.hpp"

namespace moelb {

constexpr detail::EnumNames<LayerSet, 2> kLayerSetNames{{
    {"all", LayerSet::kAll},
    {"active", LayerSet::kActive},
}};

LayerSet parse_layer_set(std::string_view name, std::string_view param) {
    return detail::parse_enum(kLayerSetNames, name, param, "a set of layers");
}

std::string_view to_string(LayerSet value) { return detail::enum_name(kLayerSetNames, value); }

double balancedness(std::span<const double> mean_rank_load, std::span<const double> max_rank_load,
                    LayerSet layers) {
    MOELB_CHECK_ARG(mean_rank_load.size() == max_rank_load.size(),
                    "mean_rank_load has " << mean_rank_load.size()
                                          << " layers but max_rank_load has "
                                          << max_rank_load.size());
    double sum = 0.0;
    std::size_t n = 0;
    for (std::size_t l = 0; l < mean_rank_load.size(); ++l) {
        if (layers == LayerSet::kActive && !(max_rank_load[l] > 0)) continue;
        sum += utilization_rate(mean_rank_load[l], max_rank_load[l]);
        ++n;
    }
    return n == 0 ? std::numeric_limits<double>::quiet_NaN() : sum / static_cast<double>(n);
}

double pass_balancedness(std::span<const std::int32_t> counts, int num_layers,
                         int num_physical_experts, int ep_size, LayerSet layers) {
    MOELB_CHECK_ARG(num_layers >= 0, "num_layers=" << num_layers << " must be non-negative");
    MOELB_CHECK_ARG(
        num_physical_experts >= 1 && ep_size >= 1 && num_physical_experts % ep_size == 0,
        "num_physical_experts=" << num_physical_experts
                                << " is not a positive multiple of ep_size=" << ep_size);
    MOELB_CHECK_ARG(
        static_cast<Index>(counts.size()) == static_cast<Index>(num_layers) * num_physical_experts,
        "counts has " << counts.size() << " entries but num_layers * "
                      << "num_physical_experts = "
                      << static_cast<Index>(num_layers) * num_physical_experts);
    const int S = num_physical_experts / ep_size;
    double sum = 0.0;
    int n = 0;
    for (int l = 0; l < num_layers; ++l) {
        const std::int32_t* row = counts.data() + static_cast<Index>(l) * num_physical_experts;
        double total = 0.0, max_gpu = 0.0;
        for (int g = 0; g < ep_size; ++g) {
            double gpu = 0.0;
            for (int s = 0; s < S; ++s) {
                MOELB_CHECK_ARG(row[g * S + s] >= 0, "counts[" << l << ", " << g * S + s << "] = "
                                                               << row[g * S + s] << " is negative");
                gpu += row[g * S + s];
            }
            total += gpu;
            max_gpu = std::max(max_gpu, gpu);
        }
        if (layers == LayerSet::kActive && !(max_gpu > 0)) continue;
        sum += utilization_rate(total / ep_size, max_gpu);
        ++n;
    }
    return n == 0 ? std::numeric_limits<double>::quiet_NaN() : sum / n;
}

}  // namespace moelb
