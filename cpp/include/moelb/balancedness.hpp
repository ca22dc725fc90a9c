// Balancedness: how evenly a layer's load is spread over the GPUs (EP ranks). One definition for
// the whole library (DESIGN section 3; reference/recorder.md section 7.2):
//
//   per layer, SGLang's utilization rate (compute_utilization_rate):
//       rate = (mean_g load[g] + 1e-5) / (max_g load[g] + 1e-5)
//   which is 1 for a layer without load (a dense layer, an idle pass);
//   balancedness = the mean of the rates over ALL layers (LayerSet::kAll), dense and idle layers
//   counting 1.0, as SGLang averages them.
//
// Every value moelb reports as "balancedness" is this (the recorder's per-pass value and its
// window averages, SGLang's average_utilization_rate_over_window, PlanStats.layer_balancedness /
// balancedness / step_balancedness, the CLI). The mean over the layers that have load only
// (LayerSet::kActive) is a variant with its own name, "active balancedness" (NaN when no layer
// has load). SGLang computes the rates in float32; moelb in double (they agree to ~1e-7).
#pragma once

#include <cstdint>
#include <span>
#include <string_view>

namespace moelb {

// SGLang's epsilon: 0/0 is 1, and a layer with a tiny load is not judged by rounding.
inline constexpr double kBalancednessEpsilon = 1e-5;

// Which layers the mean runs over: kAll (SGLang: every layer, a layer without load counts 1.0)
// or kActive (the layers with load only; no such layer: NaN).
enum class LayerSet { kAll, kActive };

// Parses "all" | "active"; a bad name is an InvalidArgument naming `param`.
LayerSet parse_layer_set(std::string_view name, std::string_view param = "layers");
std::string_view to_string(LayerSet layers);

// SGLang's utilization rate of one layer from its mean and largest per-GPU load (finite, >= 0,
// mean <= max): (mean + 1e-5) / (max + 1e-5). No checks (hot loops); callers validate input.
// Clamped to 1: a mean is never above the max, but rounding in the caller's sums can put it there
// by an ulp, and a balancedness above 1 would be a wrong number.
inline double utilization_rate(double mean_rank_load, double max_rank_load) {
    const double rate =
        (mean_rank_load + kBalancednessEpsilon) / (max_rank_load + kBalancednessEpsilon);
    return rate < 1.0 ? rate : 1.0;
}

// The mean over layers of utilization_rate(mean_rank_load[l], max_rank_load[l]) (spans of equal
// length L): kAll averages all L layers (NaN when L == 0); kActive the layers with
// max_rank_load > 0 (NaN when there is none). Input as for utilization_rate, unchecked but for the
// lengths (an InvalidArgument).
double balancedness(std::span<const double> mean_rank_load, std::span<const double> max_rank_load,
                    LayerSet layers = LayerSet::kAll);

// The balancedness of one forward pass from its per-slot counts: counts [num_layers,
// num_physical_experts] row-major, slot p on GPU p / (num_physical_experts / ep_size); each
// layer's per-GPU sums, then balancedness() over the layers. The recorder's per-pass value.
double pass_balancedness(std::span<const std::int32_t> counts, int num_layers,
                         int num_physical_experts, int ep_size, LayerSet layers = LayerSet::kAll);

}  // namespace moelb
