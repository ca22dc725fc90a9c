// The EPLB planner's public API (DESIGN section 4; moelb/eplb.hpp): the enum names, and
// rebalance() as the algorithm's steps -- validate the request, plan every layer (DeepSeek's
// policy or moelb's pipeline, plan_layers.cpp), trade moves against the previous placement,
// summarise -- plus evaluate_placement(), relabel_ranks() and rank_loads() on any placement.
#include <chrono>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "../enum_names.hpp"
#include "moelb/eplb.hpp"
#include "moelb/errors.hpp"
#include "moelb/parallel.hpp"
#include "planner.hpp"

namespace moelb {

constexpr detail::EnumNames<EplbAlgorithm, 4> kEplbAlgorithmNames{{
    {"moelb", EplbAlgorithm::kMoelb},
    {"deepseek", EplbAlgorithm::kDeepSeek},
    {"deepseek_hierarchical", EplbAlgorithm::kDeepSeekHierarchical},
    {"deepseek_global", EplbAlgorithm::kDeepSeekGlobal},
}};

EplbAlgorithm parse_eplb_algorithm(std::string_view name, std::string_view param) {
    return detail::parse_enum(kEplbAlgorithmNames, name, param, "an EPLB algorithm");
}

std::string_view to_string(EplbAlgorithm value) {
    return detail::enum_name(kEplbAlgorithmNames, value);
}

constexpr detail::EnumNames<Locality, 3> kLocalityNames{{
    {"auto", Locality::kAuto},
    {"node", Locality::kNode},
    {"none", Locality::kNone},
}};

Locality parse_locality(std::string_view name, std::string_view param) {
    return detail::parse_enum(kLocalityNames, name, param, "a locality");
}

std::string_view to_string(Locality value) { return detail::enum_name(kLocalityNames, value); }

constexpr detail::EnumNames<Objective, 2> kObjectiveNames{{
    {"total", Objective::kTotal},
    {"step_peak", Objective::kStepPeak},
}};

Objective parse_objective(std::string_view name, std::string_view param) {
    return detail::parse_enum(kObjectiveNames, name, param, "an EPLB objective");
}

std::string_view to_string(Objective value) { return detail::enum_name(kObjectiveNames, value); }

constexpr detail::EnumNames<PlanDispatch, 3> kPlanDispatchNames{{
    {"equal_split", PlanDispatch::kEqualSplit},
    {"sglang_static", PlanDispatch::kSglangStatic},
    {"balanced", PlanDispatch::kBalanced},
}};

PlanDispatch parse_plan_dispatch(std::string_view name, std::string_view param) {
    return detail::parse_enum(kPlanDispatchNames, name, param, "a dispatch the planner targets");
}

std::string_view to_string(PlanDispatch value) {
    return detail::enum_name(kPlanDispatchNames, value);
}

namespace {

using Clock = std::chrono::steady_clock;

// The finished plan: the location of the layers' slots, their statistics summarised, what ran
// and why (the notes), and the wall time since `started`.
Plan finish_plan(const planner::PlanRequest& request, planner::LayerPlans plans,
                 Clock::time_point started) {
    plans.stats.dispatch = request.dispatch;
    planner::summarise(plans.stats, request.steps != nullptr);
    Plan plan{ExpertLocation(std::move(plans.phy2log), request.num_experts, request.ep_size,
                             plans.location_nodes),
              std::move(plans.stats)};
    plan.stats.algorithm = request.step_peak ? plans.algorithm + "+step_peak" : plans.algorithm;
    if (request.dispatch != PlanDispatch::kEqualSplit) {
        plan.stats.algorithm += "+";
        plan.stats.algorithm += to_string(request.dispatch);
    }
    plan.stats.notes = std::move(plans.notes);
    if (!plan.stats.notes.empty() && plan.stats.notes.back() == ' ') plan.stats.notes.pop_back();
    plan.stats.wall_time_seconds = std::chrono::duration<double>(Clock::now() - started).count();
    return plan;
}

// rebalance(): load [L, E] (a series' sum over its steps when `steps`).
Plan rebalance_impl(ConstMatrixMap<double> load, const RebalanceOptions& options,
                    const StepLoads* steps, Clock::time_point started) {
    const planner::PlanRequest request = planner::check_rebalance_args(load, options, steps);
    planner::LayerPlans plans = request.algorithm == EplbAlgorithm::kMoelb
                                    ? planner::plan_moelb_layers(request)
                                    : planner::plan_deepseek_layers(request);
    if (request.dispatch == PlanDispatch::kEqualSplit) {
        planner::trade_moves_for_balance(request, plans);
        return finish_plan(request, std::move(plans), started);
    }
    std::vector<double> planned;  // what the planning pass found each layer to realise
    for (const LayerPlanStats& s : plans.stats.layers) planned.push_back(s.realised_max_rank_load);
    planner::trade_moves_for_balance(request, plans);
    // What the final plan realises, from scratch (a layer that kept its previous placement may
    // change what the later layers realise: SGLang's random streams run on across layers).
    planner::realise(request.dispatch, request.load, request.steps, plans.phy2log.data(),
                     request.num_experts, request.num_physical_experts, request.ep_size,
                     plans.location_nodes, plans.stats.layers);
    for (std::size_t l = 0; l < planned.size(); ++l) {
        if (plans.stats.layers[l].kept_previous) break;
        MOELB_CHECK(plans.stats.layers[l].realised_max_rank_load == planned[l],
                    "the " << to_string(request.dispatch) << " model of layer " << l << " realised "
                           << planned[l] << " while planning but "
                           << plans.stats.layers[l].realised_max_rank_load << " from scratch");
    }
    return finish_plan(request, std::move(plans), started);
}

}  // namespace

Plan rebalance(ConstMatrixMap<double> load, const RebalanceOptions& options) {
    return rebalance_impl(load, options, nullptr, Clock::now());
}

Plan rebalance(const StepLoads& steps, const RebalanceOptions& options) {
    const auto started = Clock::now();
    const RowMatrix<double> total = planner::sum_steps(steps);
    return rebalance_impl(ConstMatrixMap<double>(total.data(), total.rows(), total.cols()), options,
                          &steps, started);
}

ExpertLocation relabel_ranks(const ExpertLocation& location, const ExpertLocation& previous,
                             Locality locality) {
    const int L = location.num_layers(), E = location.num_logical_experts();  // DESIGN's letters
    const int P = location.num_physical_experts(), W = location.ep_size();
    MOELB_CHECK_ARG(
        previous.num_layers() == L && previous.num_logical_experts() == E &&
            previous.num_physical_experts() == P && previous.ep_size() == W,
        "previous has num_layers=" << previous.num_layers()
                                   << ", num_logical_experts=" << previous.num_logical_experts()
                                   << ", num_physical_experts=" << previous.num_physical_experts()
                                   << ", ep_size=" << previous.ep_size() << " but location has "
                                   << L << ", " << E << ", " << P << ", " << W);
    MOELB_CHECK_ARG(locality == Locality::kNone || locality == Locality::kNode,
                    "locality='" << to_string(locality)
                                 << "' is not one relabel_ranks takes; expected 'none' or 'node'");
    const int nodes = locality == Locality::kNode ? location.num_nodes() : 1;
    RowMatrix<std::int32_t> out = location.physical_to_logical();
    parallel_for(L, 1, [&](Index begin, Index end) {
        for (Index l = begin; l < end; ++l) {
            planner::relabel_exactly(out.row(l).data(),
                                     previous.physical_to_logical().row(l).data(), E, P, W, nodes);
        }
    });
    return ExpertLocation(std::move(out), E, W, location.num_nodes());
}

RowMatrix<double> rank_loads(ConstMatrixMap<double> load, const ExpertLocation& location) {
    planner::check_load_shape(load, location);
    const int L = location.num_layers(), W = location.ep_size();  // DESIGN's letters
    const int P = location.num_physical_experts(), S = P / W;
    RowMatrix<double> out = RowMatrix<double>::Zero(L, W);
    for (int l = 0; l < L; ++l) {
        for (int p = 0; p < P; ++p) {
            const int e = location.physical_to_logical()(l, p);
            out(l, p / S) += load(l, e) / location.logical_count()(l, e);
        }
    }
    return out;
}

PlanStats evaluate_placement(ConstMatrixMap<double> load, const ExpertLocation& location,
                             const ExpertLocation* previous, PlanDispatch dispatch) {
    planner::check_evaluate_args(load, location, previous);
    planner::check_dispatch_size(dispatch, location.num_logical_experts(), location.ep_size());
    return planner::evaluate(load, location, previous, nullptr, dispatch);
}

PlanStats evaluate_placement(const StepLoads& steps, const ExpertLocation& location,
                             const ExpertLocation* previous, PlanDispatch dispatch) {
    const RowMatrix<double> total = planner::sum_steps(steps);
    const ConstMatrixMap<double> load(total.data(), total.rows(), total.cols());
    planner::check_evaluate_args(load, location, previous);
    planner::check_dispatch_size(dispatch, location.num_logical_experts(), location.ep_size());
    return planner::evaluate(load, location, previous, &steps, dispatch);
}

}  // namespace moelb
