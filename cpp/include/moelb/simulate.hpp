// The cluster simulator's hot loop (DESIGN section 7): scores a sequence of per-step expert counts
// against a placement. A step is one forward pass; its counts say how many (token, routed slot)
// pairs chose each logical expert in each MoE layer. Each expert's count is split equally over its
// replicas (what an ideal dispatch achieves and what EPLB plans for), so GPU g's load in a layer is
// the sum over its slots p of count[expert(p)] / replicas(expert(p)).
//
// Every (step, layer) is scored independently, in parallel, so results do not depend on the
// thread count.
#pragma once

#include <cstdint>
#include <span>

#include "moelb/expert_location.hpp"
#include "moelb/views.hpp"

namespace moelb {

// A read-only view of per-step counts [num_steps, num_layers, num_experts] int32, row-major.
struct StepCounts {
    std::span<const std::int32_t> data;  // num_steps * num_layers * num_experts values, >= 0
    Index num_steps = 0;
    Index num_layers = 0;
    Index num_experts = 0;
};

// Per-step, per-layer GPU loads of a placement.
//   counts: [T, L, E] with L = location.num_layers(), E = location.num_logical_experts().
//   max_rank_load, mean_rank_load: [T, L] outputs: the largest GPU load and total / ep_size.
// A negative count is an InvalidArgument naming the step, layer and expert.
void score_steps(const StepCounts& counts, const ExpertLocation& location,
                 MatrixMap<double> max_rank_load, MatrixMap<double> mean_rank_load);

// Per-step, per-layer flat lower bound of the largest GPU load of ANY placement of the step's
// counts on num_physical_experts slots over ep_size GPUs: max(total / ep_size, the smallest
// achievable largest per-replica load), the latter from the divisor method (each expert at least
// one replica, the extra slots given one by one to the expert with the largest per-replica load).
// It is the same bound as PlanStats::lower_bound, per step instead of per window.
//   out: [T, L].
void step_lower_bounds(const StepCounts& counts, int num_physical_experts, int ep_size,
                       MatrixMap<double> out);

}  // namespace moelb
