#include <pybind11/stl.h>

#include <cmath>

#include "arrays.hpp"
#include "bindings.hpp"
#include "moelb/eplb.hpp"

namespace moelb::bindings {

namespace {

py::dict stats_dict(const PlanStats& s) {
    const auto n = static_cast<py::ssize_t>(s.layers.size());
    py::array_t<double> max_load(n), mean_load(n), balancedness(n), lower_bound(n), gap(n);
    py::array_t<std::int64_t> moved(n);
    py::array_t<bool> kept(n);
    for (py::ssize_t l = 0; l < n; ++l) {
        const auto& x = s.layers[static_cast<std::size_t>(l)];
        max_load.mutable_at(l) = x.max_rank_load;
        mean_load.mutable_at(l) = x.mean_rank_load;
        balancedness.mutable_at(l) = x.balancedness;
        lower_bound.mutable_at(l) = x.lower_bound;
        gap.mutable_at(l) = x.gap;
        moved.mutable_at(l) = x.moved_experts;
        kept.mutable_at(l) = x.kept_previous;
    }
    py::dict d;
    d["max_rank_load"] = max_load;
    d["mean_rank_load"] = mean_load;
    d["layer_balancedness"] = balancedness;
    d["lower_bound"] = lower_bound;
    d["gap"] = gap;
    d["layer_moved_experts"] = moved;
    d["layer_kept_previous"] = kept;
    d["balancedness"] = s.balancedness;
    d["active_balancedness"] = std::isnan(s.active_balancedness)
                                   ? py::object(py::none())
                                   : py::float_(s.active_balancedness);
    d["load_weighted_balancedness"] = s.load_weighted_balancedness;
    d["mean_gap"] = s.mean_gap;
    d["max_gap"] = s.max_gap;
    d["moved_experts"] = s.moved_experts;
    d["wall_time_seconds"] = s.wall_time_seconds;
    d["algorithm"] = s.algorithm;
    d["notes"] = s.notes;
    if (s.has_steps) {
        py::array_t<double> step_max(n);
        for (py::ssize_t l = 0; l < n; ++l) {
            step_max.mutable_at(l) = s.layers[static_cast<std::size_t>(l)].step_max_rank_load;
        }
        d["step_max_rank_load"] = step_max;
        d["step_balancedness"] = s.step_balancedness;
    } else {
        d["step_max_rank_load"] = py::none();
        d["step_balancedness"] = py::none();
    }
    d["dispatch"] = std::string(to_string(s.dispatch));
    if (s.dispatch != PlanDispatch::kEqualSplit) {
        py::array_t<double> realised_max(n);
        for (py::ssize_t l = 0; l < n; ++l) {
            realised_max.mutable_at(l) =
                s.layers[static_cast<std::size_t>(l)].realised_max_rank_load;
        }
        d["realised_max_rank_load"] = realised_max;
        d["realised_balancedness"] = s.realised_balancedness;
    } else {
        d["realised_max_rank_load"] = py::none();
        d["realised_balancedness"] = py::none();
    }
    return d;
}

// A load [L, E] (float64) or a time series [T, L, E] (float64, or int32 counts), C-contiguous.
// Holds the array while the core reads it.
struct LoadArg {
    py::array_t<double> array;
    py::array_t<std::int32_t> counts;
    bool steps = false;
    bool int_counts = false;  // a series of int32 counts (in `counts`)

    LoadArg(const py::handle& load) {
        py::array a = py::array::ensure(load);
        steps = a && a.ndim() == 3;
        if (steps && a.dtype().is(py::dtype::of<std::int32_t>())) {
            int_counts = true;
            counts = strict_array<std::int32_t>(load, "load", 3);
        } else {
            array = strict_array<double>(load, "load", steps ? 3 : 2);
        }
    }
    StepLoads step_loads() const {
        if (int_counts) {
            return {{},
                    counts.shape(0),
                    counts.shape(1),
                    counts.shape(2),
                    std::span<const std::int32_t>(counts.data(),
                                                  static_cast<std::size_t>(counts.size()))};
        }
        return {std::span<const double>(array.data(), static_cast<std::size_t>(array.size())),
                array.shape(0), array.shape(1), array.shape(2)};
    }
};

}  // namespace

void bind_eplb(py::module_& m) {
    m.attr("DEFAULT_MOVE_COST") = kDefaultMoveCost;
    m.def(
        "rebalance",
        [](const py::handle& load, std::int64_t num_physical_experts, std::int64_t num_groups,
           std::int64_t num_nodes, std::int64_t ep_size, const std::string& algorithm,
           const std::string& locality, const ExpertLocation* previous, double move_cost,
           std::optional<std::int64_t> max_moves, const std::string& objective,
           const std::string& dispatch) {
            const LoadArg w(load);
            RebalanceOptions o;
            o.num_physical_experts = narrow(num_physical_experts, "num_physical_experts");
            o.num_groups = narrow(num_groups, "num_groups");
            o.num_nodes = narrow(num_nodes, "num_nodes");
            o.ep_size = narrow(ep_size, "ep_size");
            o.algorithm = parse_eplb_algorithm(algorithm);
            o.locality = parse_locality(locality);
            o.objective = parse_objective(objective);
            o.dispatch = parse_plan_dispatch(dispatch);
            o.previous = previous;
            o.move_cost = move_cost;
            MOELB_CHECK_ARG(!max_moves || *max_moves >= 0,
                            "max_moves must be >= 0 (or None), got " << *max_moves);
            o.max_moves = max_moves.value_or(-1);
            std::optional<Plan> plan;
            {
                py::gil_scoped_release release;
                plan.emplace(w.steps ? rebalance(w.step_loads(), o)
                                     : rebalance(const_matrix(w.array), o));
            }
            return py::make_tuple(py::cast(std::move(plan->location)), stats_dict(plan->stats));
        },
        py::arg("load"), py::arg("num_physical_experts"), py::arg("num_groups"),
        py::arg("num_nodes"), py::arg("ep_size"), py::arg("algorithm") = "moelb",
        py::arg("locality") = "auto", py::arg("previous") = py::none(),
        py::arg("move_cost") = kDefaultMoveCost, py::arg("max_moves") = py::none(),
        py::arg("objective") = "total", py::arg("dispatch") = "equal_split",
        "Plans a placement from load [L, E] or per-step loads [T, L, E] float64; returns "
        "(location, stats dict).");

    m.def(
        "evaluate_placement",
        [](const py::handle& load, const ExpertLocation& location, const ExpertLocation* previous,
           const std::string& dispatch) {
            const LoadArg w(load);
            const PlanDispatch target = parse_plan_dispatch(dispatch);
            std::optional<PlanStats> stats;
            {
                py::gil_scoped_release release;
                stats.emplace(
                    w.steps
                        ? evaluate_placement(w.step_loads(), location, previous, target)
                        : evaluate_placement(const_matrix(w.array), location, previous, target));
            }
            return stats_dict(*stats);
        },
        py::arg("load"), py::arg("location"), py::arg("previous") = py::none(),
        py::arg("dispatch") = "equal_split",
        "The statistics of a placement for load [L, E] or per-step loads [T, L, E] float64.");

    m.def(
        "relabel_ranks",
        [](const ExpertLocation& location, const ExpertLocation& previous,
           const std::string& locality) {
            const Locality parsed = parse_locality(locality);
            py::gil_scoped_release release;
            return relabel_ranks(location, previous, parsed);
        },
        py::arg("location"), py::arg("previous"), py::arg("locality") = "none",
        "location with each layer's ranks permuted (and slots reordered) to keep the most slots "
        "of previous.");

    m.def(
        "rank_loads",
        [](const py::handle& load, const ExpertLocation& location) {
            auto w = strict_array<double>(load, "load", 2);
            const RowMatrix<double> g = rank_loads(const_matrix(w), location);
            auto out = new_matrix<double>(g.rows(), g.cols());
            mutable_matrix(out) = g;
            return out;
        },
        py::arg("load"), py::arg("location"),
        "[L, W] per-rank loads of a placement (equal split over replicas).");
}

}  // namespace moelb::bindings
