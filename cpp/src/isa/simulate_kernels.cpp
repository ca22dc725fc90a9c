// The simulator's kernel of one ISA path (isa/kernels.hpp; compiled once per path, with
// -ffp-contract=off so that every path computes the same bits): the largest rank load of each
// step and layer on a placement (moelb::score_steps) and the fast path of the per-step lower
// bounds (moelb::step_lower_bounds).
#include <algorithm>
#include <cmath>

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

isa::Index bound_rows(const std::int32_t* counts, isa::Index num_experts, int ep_size,
                      isa::Index begin, isa::Index end, double* mean, isa::Index* needed) {
    const isa::Index E = num_experts;
    for (isa::Index row = begin; row < end; ++row) {
        const std::int32_t* c = counts + row * E;
        double total = 0.0;
        bool negative = false;
        for (isa::Index e = 0; e < E; ++e) {
            negative |= c[e] < 0;
            total += c[e];
        }
        if (negative) [[unlikely]] {
            for (isa::Index e = 0; e < E; ++e) {
                if (c[e] < 0) return row * E + e;
            }
        }
        const double m = total / ep_size;
        isa::Index n = 0;
        if (m > 0) {
            const double inv_mean = 1.0 / m;
            for (isa::Index e = 0; e < E; ++e) {
                const double q = c[e] * inv_mean;  // 0 <= q <= ep_size
#if defined(__SSE4_1__) || !defined(__x86_64__)
                const auto up = static_cast<isa::Index>(std::ceil(q));
#else
                // Before SSE4.1 there is no rounding instruction, and std::ceil is a library call
                // per expert: the same integer by truncation.
                const auto whole = static_cast<isa::Index>(q);
                const isa::Index up = whole + (static_cast<double>(whole) < q ? 1 : 0);
#endif
                n += std::max<isa::Index>(1, up);
            }
        }
        mean[row - begin] = m;
        needed[row - begin] = n;
    }
    return -1;
}

}  // namespace moelb::MOELB_ISA_NS
