// The simulator's kernel of one ISA path (isa/kernels.hpp; compiled once per path, with
// -ffp-contract=off so that every path computes the same bits): the largest rank load of each
// step and layer on a placement (moelb::score_steps).
#include <algorithm>

#include "kernels.hpp"

namespace moelb::MOELB_ISA_NS {

isa::Index score_rows(const isa::ScoreRows& args, isa::Index begin, isa::Index end, double* share,
                      double* max_load, double* total) {
    const isa::Index L = args.num_layers, E = args.num_experts;
    const int S = args.slots_per_rank;
    for (isa::Index row = begin; row < end; ++row) {
        const isa::Index l = row % L;
        const std::int32_t* c = args.counts + row * E;
        const double* inv = args.inv_replicas + l * E;
        // Branch-free (vectorised); a negative count is looked for only if the row has one.
        double sum = 0.0;
        bool negative = false;
        for (isa::Index e = 0; e < E; ++e) {
            negative |= c[e] < 0;
            sum += c[e];
            share[e] = c[e] * inv[e];
        }
        if (negative) [[unlikely]] {
            for (isa::Index e = 0; e < E; ++e) {
                if (c[e] < 0) return row * E + e;
            }
        }
        const std::int32_t* slots = args.phy2log + l * args.num_physical_experts;
        double largest = 0.0;
        for (int g = 0; g < args.ep_size; ++g) {
            double load = 0.0;
            for (int p = g * S; p < (g + 1) * S; ++p) load += share[slots[p]];
            largest = std::max(largest, load);
        }
        max_load[row - begin] = largest;
        total[row - begin] = sum;
    }
    return -1;
}

}  // namespace moelb::MOELB_ISA_NS
