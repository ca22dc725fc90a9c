// A placement's statistics (DESIGN section 4, "stats"): per layer the largest and mean GPU load
// under equal split, SGLang's balancedness, the flat lower bound and the gap to it, the slots
// moved against the previous placement, with per-step loads the sum of the steps' largest GPU
// loads, and under a target dispatch the largest GPU load it realises; and the plan's summary
// over its layers. Used by rebalance() on its own plans and by
// evaluate_placement() on any placement.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "moelb/balancedness.hpp"
#include "moelb/parallel.hpp"
#include "planner.hpp"

namespace moelb::planner {
namespace {

// The largest GPU load of a layer placement whose experts have count[e] replicas.
double layer_max_rank_load(const double* w, const std::int32_t* phy2log, const std::int32_t* count,
                           int num_experts, int num_physical_experts, int ep_size) {
    const int E = num_experts, W = ep_size, S = num_physical_experts / ep_size;  // DESIGN's
    thread_local std::vector<double> share;  // an expert's load per replica
    share.resize(static_cast<std::size_t>(E));
    for (int e = 0; e < E; ++e) share[e] = w[e] / count[e];
    double m = 0.0;
    for (int g = 0; g < W; ++g) {
        double load = 0.0;
        for (int s = g * S; s < (g + 1) * S; ++s) load += share[phy2log[s]];
        m = std::max(m, load);
    }
    return m;
}

// The sum over steps of each step's largest GPU load of a layer placement whose experts have
// count[e] replicas (each expert's step load split equally over them).
double layer_step_peak(const LayerSteps& steps, const std::int32_t* phy2log,
                       const std::int32_t* count, int num_experts, int num_physical_experts,
                       int ep_size) {
    const int E = num_experts, W = ep_size, S = num_physical_experts / ep_size;  // DESIGN's
    thread_local std::vector<double> share;
    share.resize(static_cast<std::size_t>(E));
    double sum = 0.0;
    for (Index t = 0; t < steps.num_steps; ++t) {
        for (int e = 0; e < E; ++e) share[e] = steps(t, e) / count[e];
        double m = 0.0;
        for (int g = 0; g < W; ++g) {
            double load = 0.0;
            for (int s = g * S; s < (g + 1) * S; ++s) load += share[phy2log[s]];
            m = std::max(m, load);
        }
        sum += m;
    }
    return sum;
}

}  // namespace

LayerPlanStats layer_stats(const double* w, const std::int32_t* phy2log, int num_experts,
                           int num_physical_experts, int ep_size, double bound,
                           const std::int32_t* previous, const LayerSteps* steps,
                           std::vector<std::int32_t>& count) {
    const int E = num_experts, P = num_physical_experts, W = ep_size;  // DESIGN's letters
    LayerPlanStats s;
    count.assign(static_cast<std::size_t>(E), 0);
    for (int p = 0; p < P; ++p) ++count[phy2log[p]];
    double total = 0;
    for (int e = 0; e < E; ++e) total += w[e];
    s.max_rank_load = layer_max_rank_load(w, phy2log, count.data(), E, P, W);
    s.mean_rank_load = total / W;
    s.balancedness = utilization_rate(s.mean_rank_load, s.max_rank_load);
    if (std::isnan(bound)) {
        thread_local std::vector<int> scratch;
        bound = flat_lower_bound(w, E, P, W, scratch);
    }
    s.lower_bound = bound;
    // Never below 0: a maximum under the bound is rounding (a subnormal load split over replicas
    // rounds to 0 per replica).
    s.gap = s.lower_bound > 0 ? std::max(0.0, s.max_rank_load / s.lower_bound - 1) : 0.0;
    if (steps) s.step_max_rank_load = layer_step_peak(*steps, phy2log, count.data(), E, P, W);
    if (previous) {
        for (int p = 0; p < P; ++p) s.moved_experts += previous[p] != phy2log[p];
    }
    return s;
}

void LayerPlans::take_stats(const PlanRequest& request, Index l, double bound,
                            std::vector<std::int32_t>& count) {
    const LayerSteps st = layer_steps(request.steps, l);
    stats.layers[static_cast<std::size_t>(l)] =
        layer_stats(request.load.row(l).data(), phy2log.row(l).data(), request.num_experts,
                    request.num_physical_experts, request.ep_size, bound, request.previous_row(l),
                    request.steps ? &st : nullptr, count);
}

void realise(PlanDispatch dispatch, ConstMatrixMap<double> load, const StepLoads* steps,
             const std::int32_t* phy2log, int num_experts, int num_physical_experts, int ep_size,
             int num_nodes, std::vector<LayerPlanStats>& layers) {
    switch (dispatch) {
        case PlanDispatch::kEqualSplit:
            return;
        case PlanDispatch::kSglangStatic:
            realise_sglang_static(load, phy2log, num_experts, num_physical_experts, ep_size,
                                  num_nodes, layers);
            return;
        case PlanDispatch::kBalanced:
            realise_balanced(load, steps, phy2log, num_experts, num_physical_experts, ep_size,
                             layers);
            return;
    }
}

void summarise(PlanStats& stats, bool has_steps) {
    const auto L = static_cast<double>(stats.layers.size());
    double sum_mean = 0, sum_max = 0;
    std::vector<double> mean, max, step_max;
    for (const LayerPlanStats& s : stats.layers) {
        stats.mean_gap += s.gap / L;
        stats.max_gap = std::max(stats.max_gap, s.gap);
        stats.moved_experts += s.moved_experts;
        sum_mean += s.mean_rank_load;
        sum_max += s.max_rank_load;
        mean.push_back(s.mean_rank_load);
        max.push_back(s.max_rank_load);
        step_max.push_back(s.step_max_rank_load);
    }
    stats.balancedness = balancedness(mean, max, LayerSet::kAll);
    stats.active_balancedness = balancedness(mean, max, LayerSet::kActive);
    stats.load_weighted_balancedness = sum_max > 0 ? sum_mean / sum_max : 1.0;
    if (has_steps) {
        stats.has_steps = true;
        stats.step_balancedness = balancedness(mean, step_max, LayerSet::kAll);
    }
    if (stats.dispatch != PlanDispatch::kEqualSplit) {
        std::vector<double> realised_max;
        for (const LayerPlanStats& s : stats.layers)
            realised_max.push_back(s.realised_max_rank_load);
        stats.realised_balancedness = balancedness(mean, realised_max, LayerSet::kAll);
    }
}

PlanStats evaluate(ConstMatrixMap<double> load, const ExpertLocation& location,
                   const ExpertLocation* previous, const StepLoads* steps, PlanDispatch dispatch) {
    const int L = location.num_layers(), W = location.ep_size();  // DESIGN's letters
    const int E = location.num_logical_experts(), P = location.num_physical_experts();
    constexpr double kUnknown = std::numeric_limits<double>::quiet_NaN();
    PlanStats stats;
    stats.layers.resize(static_cast<std::size_t>(L));
    parallel_for(L, 1, [&](Index begin, Index end) {
        std::vector<std::int32_t> count;
        for (Index l = begin; l < end; ++l) {
            const LayerSteps st = layer_steps(steps, l);
            stats.layers[static_cast<std::size_t>(l)] = layer_stats(
                load.row(l).data(), location.physical_to_logical().row(l).data(), E, P, W, kUnknown,
                previous ? previous->physical_to_logical().row(l).data() : nullptr,
                steps ? &st : nullptr, count);
        }
    });
    realise(dispatch, load, steps, location.physical_to_logical().data(), E, P, W,
            location.num_nodes(), stats.layers);
    stats.dispatch = dispatch;
    summarise(stats, steps != nullptr);
    return stats;
}

}  // namespace moelb::planner
