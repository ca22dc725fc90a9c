// Input checks of the planner's public API (DESIGN "Conventions": bad input raises
// InvalidArgument naming the Python parameter and the offending value): the loads, the shapes of
// a placement against its loads, and rebalance()'s options, which become a PlanRequest in the
// planner's vocabulary (DeepSeek's auto policy resolved).
#include <cmath>
#include <cstdint>
#include <limits>

#include "moelb/errors.hpp"
#include "planner.hpp"

namespace moelb::planner {

// (Finite loads whose sum overflows, 1e308 on two experts, would make every statistic inf or NaN.)
void check_load_values(ConstMatrixMap<double> load, Index num_steps) {
    double total = 0;
    for (Index l = 0; l < load.rows(); ++l) {
        for (Index e = 0; e < load.cols(); ++e) {
            const double v = load(l, e);
            MOELB_CHECK_ARG(
                std::isfinite(v) && v >= 0,
                "load[" << l << ", " << e << "] = " << v << " is not a finite non-negative load");
            total += v;
        }
    }
    MOELB_CHECK_ARG(total <= kMaxTotalLoad,
                    "load sums to " << total << " over its " << load.rows() << " layers"
                                    << (num_steps > 1 ? " and steps" : "")
                                    << ": its values are finite but their sums overflow the "
                                       "statistics; scale the loads down (moelb takes loads "
                                       "summing to at most "
                                    << kMaxTotalLoad << ")");
}

void check_load_shape(ConstMatrixMap<double> load, const ExpertLocation& location) {
    MOELB_CHECK_ARG(
        load.rows() == location.num_layers() && load.cols() == location.num_logical_experts(),
        "load has shape [" << load.rows() << ", " << load.cols() << "] but the location has "
                           << location.num_layers() << " layers and "
                           << location.num_logical_experts() << " logical experts");
    check_load_values(load);
}

void check_evaluate_args(ConstMatrixMap<double> load, const ExpertLocation& location,
                         const ExpertLocation* previous) {
    check_load_shape(load, location);
    const int L = location.num_layers();
    const int E = location.num_logical_experts(), P = location.num_physical_experts();
    if (previous) {
        MOELB_CHECK_ARG(previous->num_layers() == L && previous->num_physical_experts() == P &&
                            previous->num_logical_experts() == E &&
                            previous->ep_size() == location.ep_size(),
                        "previous has num_layers="
                            << previous->num_layers()
                            << ", num_logical_experts=" << previous->num_logical_experts()
                            << ", num_physical_experts=" << previous->num_physical_experts()
                            << ", ep_size=" << previous->ep_size() << " but location has " << L
                            << ", " << E << ", " << P << ", " << location.ep_size());
    }
}

void check_dispatch_size(PlanDispatch dispatch, int num_experts, int ep_size) {
    if (dispatch != PlanDispatch::kSglangStatic) return;
    const Index entries = static_cast<Index>(num_experts) * ep_size;
    MOELB_CHECK_ARG(entries <= kMaxSglangStaticEntries,
                    "dispatch='sglang_static' models every rank's table entry of every expert: "
                    "num_experts x ep_size = "
                        << num_experts << " x " << ep_size << " is above the "
                        << kMaxSglangStaticEntries << " it models");
}

RowMatrix<double> sum_steps(const StepLoads& steps) {
    const Index T = steps.num_steps, L = steps.num_layers, E = steps.num_experts;
    MOELB_CHECK_ARG(T >= 1 && L >= 1 && E >= 1,
                    "load must have shape [num_steps, num_layers, num_experts] with all positive, "
                    "got ["
                        << T << ", " << L << ", " << E << "]");
    MOELB_CHECK_ARG(
        static_cast<Index>(steps.size()) == T * L * E,
        "load holds " << steps.size() << " values, not " << T << " x " << L << " x " << E);
    RowMatrix<double> total = RowMatrix<double>::Zero(L, E);
    for (Index t = 0; t < T; ++t) {
        for (Index l = 0; l < L; ++l) {
            for (Index e = 0; e < E; ++e) {
                const double v = steps[(t * L + l) * E + e];
                MOELB_CHECK_ARG(std::isfinite(v) && v >= 0, "load[" << t << ", " << l << ", " << e
                                                                    << "] = " << v
                                                                    << " is not a finite "
                                                                       "non-negative load");
                total(l, e) += v;
            }
        }
    }
    for (Index l = 0; l < L; ++l) {
        for (Index e = 0; e < E; ++e) {
            MOELB_CHECK_ARG(std::isfinite(total(l, e)), "load summed over the "
                                                            << T << " steps overflows at layer "
                                                            << l << ", expert " << e);
        }
    }
    return total;
}

namespace {

// The shape of the loads and the counts of the request (the loads' values too).
void check_shape_args(ConstMatrixMap<double> load, const RebalanceOptions& o, Index num_steps) {
    const Index L = load.rows();
    const int E = static_cast<int>(load.cols());
    const int P = o.num_physical_experts, N = o.num_nodes, W = o.ep_size;  // DESIGN's
    const int num_groups = o.num_groups;
    MOELB_CHECK_ARG(L >= 1 && E >= 1,
                    "load must have shape [num_layers, num_experts] with both "
                    "positive, got ["
                        << L << ", " << E << "]");
    check_load_values(load, num_steps);
    MOELB_CHECK_ARG(W >= 1, "ep_size must be positive, got " << W);
    MOELB_CHECK_ARG(N >= 1, "num_nodes must be positive, got " << N);
    MOELB_CHECK_ARG(num_groups >= 0, "num_groups must be non-negative, got " << num_groups);
    MOELB_CHECK_ARG(
        P >= E, "num_physical_experts=" << P << " is smaller than the " << E << " logical experts");
    MOELB_CHECK_ARG(P <= kMaxPhysicalExperts,
                    "num_physical_experts=" << P << " is above the " << kMaxPhysicalExperts
                                            << " slots per layer moelb plans");
    MOELB_CHECK_ARG(P % W == 0,
                    "num_physical_experts=" << P << " is not divisible by ep_size=" << W);
}

// previous's shape, move_cost, max_moves and the objective.
void check_option_args(ConstMatrixMap<double> load, const RebalanceOptions& o,
                       const StepLoads* steps) {
    const Index L = load.rows();
    const int E = static_cast<int>(load.cols()), P = o.num_physical_experts, W = o.ep_size;
    if (o.previous) {
        MOELB_CHECK_ARG(o.previous->num_layers() == L && o.previous->num_logical_experts() == E &&
                            o.previous->num_physical_experts() == P && o.previous->ep_size() == W,
                        "previous has num_layers="
                            << o.previous->num_layers()
                            << ", num_logical_experts=" << o.previous->num_logical_experts()
                            << ", num_physical_experts=" << o.previous->num_physical_experts()
                            << ", ep_size=" << o.previous->ep_size() << " but the plan has " << L
                            << ", " << E << ", " << P << ", " << W);
    }
    MOELB_CHECK_ARG(o.move_cost >= 0 && std::isfinite(o.move_cost),
                    "move_cost must be finite and non-negative, got " << o.move_cost);
    MOELB_CHECK_ARG(o.max_moves >= -1, "max_moves must be >= 0 (or None), got " << o.max_moves);
    if (o.objective == Objective::kStepPeak) {
        MOELB_CHECK_ARG(steps,
                        "objective='step_peak' needs per-step loads: load must be a time "
                        "series [num_steps, num_layers, num_experts]");
        MOELB_CHECK_ARG(o.algorithm == EplbAlgorithm::kMoelb,
                        "objective='step_peak' is moelb's; algorithm='"
                            << to_string(o.algorithm) << "' plans against the total load");
    }
    if (o.dispatch != PlanDispatch::kEqualSplit) {
        MOELB_CHECK_ARG(o.algorithm == EplbAlgorithm::kMoelb,
                        "dispatch='" << to_string(o.dispatch) << "' is moelb's target; algorithm='"
                                     << to_string(o.algorithm)
                                     << "' plans for an equal split (dispatch='equal_split')");
    }
    check_dispatch_size(o.dispatch, E, W);
    if (o.dispatch == PlanDispatch::kSglangStatic) {
        MOELB_CHECK_ARG(o.objective == Objective::kTotal,
                        "dispatch='sglang_static' plans SGLang's static table against the total "
                        "load; objective='"
                            << to_string(o.objective) << "' plans an equal split of every step");
    }
    if (o.dispatch == PlanDispatch::kBalanced) {
        MOELB_CHECK_ARG(o.objective == Objective::kTotal,
                        "dispatch='balanced' plans for the per-step exact split (it reads the "
                        "steps itself); objective='"
                            << to_string(o.objective) << "' plans an equal split of every step");
    }
}

// The algorithm that runs: kMoelb, or DeepSeek's hierarchical policy (asked for, or kDeepSeek
// when num_groups % num_nodes == 0; its shape constraints checked) or global policy.
EplbAlgorithm resolve_algorithm(int num_experts, const RebalanceOptions& o) {
    if (o.algorithm == EplbAlgorithm::kMoelb) return EplbAlgorithm::kMoelb;
    const int E = num_experts, N = o.num_nodes, W = o.ep_size;  // DESIGN's letters
    const int num_groups = o.num_groups;
    const bool hierarchical =
        o.algorithm == EplbAlgorithm::kDeepSeekHierarchical ||
        (o.algorithm == EplbAlgorithm::kDeepSeek && num_groups > 0 && num_groups % N == 0);
    if (!hierarchical) return EplbAlgorithm::kDeepSeekGlobal;
    MOELB_CHECK_ARG(W % N == 0, "ep_size=" << W << " is not divisible by num_nodes=" << N
                                           << " (the hierarchical policy requires it)");
    MOELB_CHECK_ARG(num_groups > 0, "the hierarchical policy needs num_groups");
    MOELB_CHECK_ARG(E % num_groups == 0,
                    "num_experts=" << E << " is not divisible by num_groups=" << num_groups
                                   << " (DeepSeek's EPLB requires it)");
    MOELB_CHECK_ARG(num_groups % N == 0, "num_groups=" << num_groups
                                                       << " is not divisible by num_nodes=" << N
                                                       << " (the hierarchical policy "
                                                          "requires it)");
    return EplbAlgorithm::kDeepSeekHierarchical;
}

}  // namespace

PlanRequest check_rebalance_args(ConstMatrixMap<double> load, const RebalanceOptions& options,
                                 const StepLoads* steps) {
    check_shape_args(load, options, steps ? steps->num_steps : 1);
    check_option_args(load, options, steps);
    const int num_experts = static_cast<int>(load.cols());
    return PlanRequest{.load = load,
                       .steps = steps,
                       .num_layers = load.rows(),
                       .num_experts = num_experts,
                       .num_physical_experts = options.num_physical_experts,
                       .num_groups = options.num_groups,
                       .num_nodes = options.num_nodes,
                       .ep_size = options.ep_size,
                       .algorithm = resolve_algorithm(num_experts, options),
                       .locality = options.locality,
                       .step_peak = options.objective == Objective::kStepPeak,
                       .previous = options.previous,
                       .move_cost = options.move_cost,
                       .max_moves = options.max_moves,
                       .dispatch = options.dispatch};
}

}  // namespace moelb::planner
