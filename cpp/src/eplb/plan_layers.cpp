// The planner's loops over layers (DESIGN section 4, section 8: parallel across layers, the same
// result for any thread count): DeepSeek's policy on every layer, and moelb's pipeline on every
// layer -- locality domains -> replica counts -> packing (or DeepSeek's, when lower) -> count
// searches -> per-step refinement -> matching to the previous placement -> statistics -- then,
// for a target dispatch other than an equal split, the pass over the layers in order that plans
// for what that dispatch realises (dispatch sglang_static: realised_static.cpp; balanced:
// connected.cpp). Pure planning: a
// checked request in, the layers' slots and statistics out.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "moelb/parallel.hpp"
#include "planner.hpp"

namespace moelb::planner {
namespace {

// Where moelb's plan of a layer started: its own packing, or DeepSeek's (which the same local
// search then improved) when that was lower.
enum class PackingOrigin { kMoelb, kDeepSeek };

// One planner thread's scratch for moelb's layers, reused across layers.
struct MoelbScratch {
    Packing ours, theirs, trial;
    PackScratch pack;
    std::vector<int> flat_count;  // the flat lower bound's replica counts
    std::vector<float> w32;
    std::vector<std::int32_t> deepseek_phy2log, count32;
};

// The plans of the request's layers, before any is made.
LayerPlans start_plans(const PlanRequest& r) {
    LayerPlans plans;
    plans.phy2log.resize(r.num_layers, r.num_physical_experts);
    plans.stats.layers.resize(static_cast<std::size_t>(r.num_layers));
    plans.location_nodes = r.num_nodes;
    return plans;
}

// DeepSeek under the same locality (each of choice.deepseek_variants), improved by the same
// local search: s.ours becomes whichever is lower (ours on ties), so moelb is never worse than
// DeepSeek. Only worth it when DeepSeek's own packing beats ours before its improvement.
PackingOrigin adopt_deepseek_if_lower(const double* w, const PlanRequest& r,
                                      const LocalityChoice& choice, double bound, MoelbScratch& s) {
    const int E = r.num_experts, P = r.num_physical_experts, W = r.ep_size;  // DESIGN's letters
    Packing& ours = s.ours;
    Packing& theirs = s.theirs;
    PackingOrigin origin = PackingOrigin::kMoelb;
    for (const auto& [num_groups, num_nodes] : choice.deepseek_variants) {
        if (ours.max_load() <= bound * (1 + kTargetTol)) break;
        s.w32.resize(static_cast<std::size_t>(E));
        for (int e = 0; e < E; ++e) s.w32[e] = static_cast<float>(w[e]);
        s.deepseek_phy2log.resize(static_cast<std::size_t>(P));
        deepseek_layer(s.w32.data(), E, P, num_groups, num_nodes, W, s.deepseek_phy2log.data());
        packing_of(theirs, w, s.deepseek_phy2log.data(), E, P, W, choice.num_domains);
        if (theirs.max_load() < ours.max_load() * (1 - kRelTol)) {
            theirs.repair_duplicates(theirs.max_load(), s.pack);
            theirs.swap_search(bound, s.pack);
            if (theirs.max_load() < ours.max_load() * (1 - kRelTol)) {
                std::swap(ours, theirs);
                origin = PackingOrigin::kDeepSeek;
            }
        }
    }
    return origin;
}

// moelb's plan of one layer (loads w) into phy2log, under `choice`'s locality: `bound` is the
// layer's flat lower bound (s.flat_count: the divisor method's counts behind it, for all experts
// over all slots); with `steps` (Objective::kStepPeak), the plan is then refined against the
// layer's per-step loads.
PackingOrigin plan_moelb_layer(const double* w, const PlanRequest& r, const LocalityChoice& choice,
                               double bound, const LayerSteps* steps, MoelbScratch& s,
                               std::int32_t* phy2log) {
    Packing& ours = s.ours;
    ours.reset(r.ep_size, r.ep_size / choice.num_domains, r.slots_per_rank(), r.num_experts);
    assign_domains(ours, w, r, choice);
    initial_counts(ours, w, s.flat_count);
    pack_counts(ours, w, bound, s.pack);
    const PackingOrigin origin = adopt_deepseek_if_lower(w, r, choice, bound, s);
    improve_counts(ours, s.trial, w, bound, s.pack);
    if (steps) refine_step_peak(ours, *steps);
    write_slots(ours, phy2log);
    return origin;
}

}  // namespace

LayerPlans plan_deepseek_layers(const PlanRequest& r) {
    const int E = r.num_experts, P = r.num_physical_experts, W = r.ep_size;  // DESIGN's letters
    const bool hierarchical = r.algorithm == EplbAlgorithm::kDeepSeekHierarchical;
    LayerPlans plans = start_plans(r);
    plans.algorithm = hierarchical ? "deepseek_hierarchical" : "deepseek_global";
    if (W % r.num_nodes != 0) {
        std::ostringstream note;
        note << "ep_size=" << W << " is not divisible by num_nodes=" << r.num_nodes
             << ": the location has num_nodes=1. ";
        plans.notes += note.str();
        plans.location_nodes = 1;
    }
    std::vector<float> w32(static_cast<std::size_t>(r.num_layers) * E);
    for (Index l = 0; l < r.num_layers; ++l) {
        for (int e = 0; e < E; ++e) w32[l * E + e] = static_cast<float>(r.load(l, e));
    }
    constexpr double kUnknown = std::numeric_limits<double>::quiet_NaN();
    parallel_for(r.num_layers, 1, [&](Index begin, Index end) {
        thread_local std::vector<std::int32_t> count;
        for (Index l = begin; l < end; ++l) {
            deepseek_layer(w32.data() + l * E, E, P, hierarchical ? r.num_groups : 1,
                           hierarchical ? r.num_nodes : 1, W, plans.phy2log.row(l).data());
            plans.take_stats(r, l, kUnknown, count);
        }
    });
    return plans;
}

LayerPlans plan_moelb_layers(const PlanRequest& r) {
    const int E = r.num_experts, P = r.num_physical_experts, W = r.ep_size;  // DESIGN's letters
    const LocalityChoice choice = choose_locality(r);
    LayerPlans plans = start_plans(r);
    plans.algorithm = std::string("moelb(locality=") +
                      (choice.locality == Locality::kNode ? "node" : "none") + ")";
    plans.location_nodes = choice.location_nodes;
    plans.notes = choice.notes;
    plans.lower_bounds.resize(static_cast<std::size_t>(r.num_layers));
    std::vector<PackingOrigin> origins(static_cast<std::size_t>(r.num_layers),
                                       PackingOrigin::kMoelb);
    parallel_for(r.num_layers, 1, [&](Index begin, Index end) {
        thread_local MoelbScratch scratch;
        for (Index l = begin; l < end; ++l) {
            const double* w = r.load.row(l).data();
            std::int32_t* phy2log = plans.phy2log.row(l).data();
            // The flat lower bound: no placement (under any locality) goes below it.
            const double bound = plans.lower_bounds[l] =
                flat_lower_bound(w, E, P, W, scratch.flat_count, BoundCounts::kKeep);
            const LayerSteps st = layer_steps(r.steps, l);
            origins[l] = plan_moelb_layer(w, r, choice, bound, r.step_peak ? &st : nullptr, scratch,
                                          phy2log);
            if (r.previous) match_previous(phy2log, r.previous_row(l), E, P, W, choice.num_domains);
            plans.take_stats(r, l, bound, scratch.count32);
        }
    });
    switch (r.dispatch) {  // the target dispatch's pass over the equal-split plans
        case PlanDispatch::kEqualSplit:
            break;
        case PlanDispatch::kSglangStatic:
            plan_sglang_static(r, choice, plans);
            break;
        case PlanDispatch::kBalanced:
            plan_balanced(r, choice, plans);
            break;
    }
    const auto from_deepseek = std::count(origins.begin(), origins.end(), PackingOrigin::kDeepSeek);
    if (from_deepseek > 0) {
        std::ostringstream note;
        note << from_deepseek << " layer(s) started from DeepSeek's packing. ";
        plans.notes += note.str();
    }
    return plans;
}

}  // namespace moelb::planner
