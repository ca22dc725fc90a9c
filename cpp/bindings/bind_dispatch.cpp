#include <pybind11/stl.h>

#include "arrays.hpp"
#include "bindings.hpp"
#include "moelb/dispatch.hpp"

namespace moelb::bindings {

std::optional<LayerDispatcher> make_dispatcher(const ExpertLocation* location,
                                               std::optional<std::int64_t> layer,
                                               std::int64_t ep_rank, const std::string& dispatch,
                                               std::int64_t seed) {
    const DispatchAlgorithm algorithm = parse_dispatch_algorithm(dispatch, "dispatch");
    MOELB_CHECK_ARG(seed >= 0, "seed must be non-negative, got " << seed);
    if (location == nullptr) return std::nullopt;
    MOELB_CHECK_ARG(layer.has_value(),
                    "layer is required when a location is given (the MoE layer "
                    "whose placement maps the ids)");
    return LayerDispatcher(*location, narrow(*layer, "layer"), narrow(ep_rank, "ep_rank"),
                           algorithm, static_cast<std::uint64_t>(seed));
}

namespace {

std::uint64_t checked_seed(std::int64_t seed) {
    MOELB_CHECK_ARG(seed >= 0, "seed must be non-negative, got " << seed);
    return static_cast<std::uint64_t>(seed);
}

// replica_order [L, E, X'] (a log2phy) flattened to [L * E, X'], or empty.
py::array_t<std::int32_t, py::array::c_style> replica_order_array(const ExpertLocation& loc,
                                                                  const py::object& order) {
    if (order.is_none()) return py::array_t<std::int32_t, py::array::c_style>();
    auto a = config_array<std::int32_t>(order, "replica_order", 3);
    MOELB_CHECK_ARG(a.shape(0) == loc.num_layers() && a.shape(1) == loc.num_logical_experts(),
                    "replica_order has shape " << shape_string(a) << " but the location has "
                                               << loc.num_layers() << " layers and "
                                               << loc.num_logical_experts() << " logical experts");
    return a;
}

ConstMatrixMap<std::int32_t> order_map(const py::array_t<std::int32_t, py::array::c_style>& a) {
    if (a.size() == 0) return {nullptr, 0, 0};
    return {a.data(), a.shape(0) * a.shape(1), a.shape(2)};
}

py::array_t<std::int32_t> to_array3(const RowMatrix<std::int32_t>& m, Index d0, Index d1,
                                    Index d2) {
    py::array_t<std::int32_t> out(
        {static_cast<py::ssize_t>(d0), static_cast<py::ssize_t>(d1), static_cast<py::ssize_t>(d2)});
    std::copy(m.data(), m.data() + m.size(), out.mutable_data());
    return out;
}

// The rows of a balanced_split / balanced_assignment call: -1 (all layers) or the checked layer.
int balanced_layer(const ExpertLocation& loc, std::optional<std::int64_t> layer) {
    if (!layer) return -1;
    MOELB_CHECK_ARG(*layer >= 0 && *layer < loc.num_layers(),
                    "layer=" << *layer << " is outside [0, num_layers=" << loc.num_layers() << ")");
    return static_cast<int>(*layer);
}

// An integer array of `dims` (the expected shape, named by `what` in the error), as int64.
py::array_t<std::int64_t, py::array::c_style> balanced_input(const py::handle& obj,
                                                             const char* name,
                                                             const std::vector<Index>& dims,
                                                             const std::string& what) {
    auto a = config_array<std::int64_t>(obj, name, static_cast<int>(dims.size()));
    bool same = true;
    for (std::size_t i = 0; i < dims.size(); ++i) same = same && a.shape(i) == dims[i];
    MOELB_CHECK_ARG(same, name << " has shape " << shape_string(a) << " but " << what);
    return a;
}

py::array_t<std::int64_t, py::array::c_style> balanced_fixed_loads(const ExpertLocation& loc,
                                                                   const py::object& fixed_loads,
                                                                   int layer) {
    if (fixed_loads.is_none()) return py::array_t<std::int64_t, py::array::c_style>();
    const Index W = loc.ep_size();
    if (layer >= 0) {
        return balanced_input(fixed_loads, "fixed_loads", {W},
                              "one layer needs (ep_size=" + std::to_string(W) + ",)");
    }
    return balanced_input(fixed_loads, "fixed_loads", {loc.num_layers(), W},
                          "the location needs (num_layers=" + std::to_string(loc.num_layers()) +
                              ", ep_size=" + std::to_string(W) + ")");
}

ConstMatrixMap<std::int64_t> rows_of(const py::array_t<std::int64_t, py::array::c_style>& a,
                                     Index cols) {
    if (a.size() == 0) return {nullptr, 0, 0};  // none (a location has ranks and layers)
    return {a.data(), static_cast<Index>(a.size()) / cols, cols};
}

// A balanced_assignment-like core function as a Python function of (source_counts, location,
// fixed_loads, layer).
using AssignmentFn = void (*)(const ExpertLocation&, ConstMatrixMap<std::int64_t>,
                              ConstMatrixMap<std::int64_t>, MatrixMap<std::int64_t>, int);

auto assignment_binding(AssignmentFn solve) {
    return [solve](const py::handle& source_counts, const ExpertLocation& loc,
                   const py::object& fixed_loads, std::optional<std::int64_t> layer) {
        const int l = balanced_layer(loc, layer);
        const Index L = loc.num_layers(), E = loc.num_logical_experts();
        const Index P = loc.num_physical_experts(), W = loc.ep_size();
        const auto c = l >= 0
                           ? balanced_input(source_counts, "source_counts", {W, E},
                                            "one layer needs (ep_size=" + std::to_string(W) +
                                                ", num_experts=" + std::to_string(E) + ")")
                           : balanced_input(source_counts, "source_counts", {L, W, E},
                                            "the location needs (num_layers=" + std::to_string(L) +
                                                ", ep_size=" + std::to_string(W) +
                                                ", num_experts=" + std::to_string(E) + ")");
        const auto fixed = balanced_fixed_loads(loc, fixed_loads, l);
        const Index rows = (l >= 0 ? 1 : L) * W;
        py::array_t<std::int64_t> out =
            l >= 0 ? new_matrix<std::int64_t>(W, P)
                   : py::array_t<std::int64_t>({static_cast<py::ssize_t>(L),
                                                static_cast<py::ssize_t>(W),
                                                static_cast<py::ssize_t>(P)});
        MatrixMap<std::int64_t> out_map(out.mutable_data(), rows, P);
        {
            py::gil_scoped_release release;
            solve(loc, ConstMatrixMap<std::int64_t>(c.data(), rows, E), rows_of(fixed, W), out_map,
                  l);
        }
        return out;
    };
}

}  // namespace

void bind_dispatch(py::module_& m) {
    m.attr("DISPATCH_COST_OWN_RANK") = kDispatchCostOwnRank;
    m.attr("DISPATCH_COST_SAME_NODE") = kDispatchCostSameNode;
    m.attr("DISPATCH_COST_OTHER_NODE") = kDispatchCostOtherNode;
    m.def(
        "balanced_split",
        [](const py::handle& counts, const ExpertLocation& loc, const py::object& fixed_loads,
           std::optional<std::int64_t> layer, const std::string& shares) {
            const SplitShares which = parse_split_shares(shares);
            const int l = balanced_layer(loc, layer);
            const Index L = loc.num_layers(), E = loc.num_logical_experts();
            const Index P = loc.num_physical_experts(), W = loc.ep_size();
            const auto c =
                l >= 0 ? balanced_input(counts, "counts", {E},
                                        "the location has num_experts=" + std::to_string(E))
                       : balanced_input(counts, "counts", {L, E},
                                        "the location needs (num_layers=" + std::to_string(L) +
                                            ", num_experts=" + std::to_string(E) + ")");
            const auto fixed = balanced_fixed_loads(loc, fixed_loads, l);
            const Index rows = l >= 0 ? 1 : L;
            py::array_t<std::int64_t> out =
                l >= 0 ? py::array_t<std::int64_t>(static_cast<py::ssize_t>(P))
                       : new_matrix<std::int64_t>(L, P);
            MatrixMap<std::int64_t> out_map(out.mutable_data(), rows, P);
            {
                py::gil_scoped_release release;
                balanced_split(loc, ConstMatrixMap<std::int64_t>(c.data(), rows, E),
                               rows_of(fixed, W), out_map, l, which);
            }
            return out;
        },
        py::arg("counts"), py::arg("location"), py::arg("fixed_loads") = py::none(),
        py::arg("layer") = py::none(), py::arg("shares") = "any");
    m.def("balanced_assignment", assignment_binding(&balanced_assignment), py::arg("source_counts"),
          py::arg("location"), py::arg("fixed_loads") = py::none(), py::arg("layer") = py::none());
    // The previous solver, for tests and benchmarks only (not part of the public API).
    m.def("_balanced_assignment_reference",
          assignment_binding(&detail::balanced_assignment_reference), py::arg("source_counts"),
          py::arg("location"), py::arg("fixed_loads") = py::none(), py::arg("layer") = py::none());
    m.def(
        "dispatch_table",
        [](const ExpertLocation& loc, const std::string& dispatch, std::int64_t ep_rank,
           std::int64_t seed, const py::object& replica_order) {
            const DispatchAlgorithm a = parse_dispatch_algorithm(dispatch, "dispatch");
            const auto order = replica_order_array(loc, replica_order);
            const std::uint64_t s = checked_seed(seed);
            const int rank = narrow(ep_rank, "ep_rank");
            RowMatrix<std::int32_t> table;
            {
                py::gil_scoped_release release;
                table = dispatch_table(loc, a, rank, s, order_map(order));
            }
            auto out = new_matrix<std::int32_t>(table.rows(), table.cols());
            mutable_matrix(out) = table;
            return out;
        },
        py::arg("location"), py::arg("dispatch"), py::arg("ep_rank"), py::arg("seed") = 0,
        py::arg("replica_order") = py::none());
    m.def(
        "dispatch_tables",
        [](const ExpertLocation& loc, const std::string& dispatch, std::int64_t seed,
           const py::object& replica_order) {
            const DispatchAlgorithm a = parse_dispatch_algorithm(dispatch, "dispatch");
            const auto order = replica_order_array(loc, replica_order);
            const std::uint64_t s = checked_seed(seed);
            RowMatrix<std::int32_t> tables;
            {
                py::gil_scoped_release release;
                tables = dispatch_tables(loc, a, s, order_map(order));
            }
            return to_array3(tables, loc.ep_size(), loc.num_layers(), loc.num_logical_experts());
        },
        py::arg("location"), py::arg("dispatch"), py::arg("seed") = 0,
        py::arg("replica_order") = py::none());
    m.def(
        "sglang_replica_lists",
        [](const ExpertLocation& loc, std::optional<std::int64_t> ep_rank,
           const py::object& replica_order) {
            const auto order = replica_order_array(loc, replica_order);
            const int rank = ep_rank ? narrow(*ep_rank, "ep_rank") : -1;
            MOELB_CHECK_ARG(
                !ep_rank || *ep_rank >= 0,
                "ep_rank=" << *ep_rank << " is outside [0, ep_size=" << loc.ep_size() << ")");
            RowMatrix<std::int32_t> lists;
            {
                py::gil_scoped_release release;
                lists = sglang_replica_lists(loc, order_map(order), rank);
            }
            return to_array3(lists, loc.num_layers(), loc.num_logical_experts(),
                             loc.max_replicas());
        },
        py::arg("location"), py::arg("ep_rank") = py::none(),
        py::arg("replica_order") = py::none());
    m.def(
        "dispatch_tokens",
        [](const py::handle& topk_ids, const ExpertLocation& loc, std::int64_t layer,
           const std::string& dispatch, std::optional<std::int64_t> ep_rank,
           const py::object& rank_offsets, std::int64_t seed) {
            auto ids = strict_array<std::int32_t>(topk_ids, "topk_ids", 2);
            const DispatchAlgorithm a = parse_dispatch_algorithm(dispatch, "dispatch");
            const std::uint64_t s = checked_seed(seed);
            const Index T = ids.shape(0);
            const int W = loc.ep_size();
            std::vector<Index> offsets(static_cast<std::size_t>(W) + 1, 0);
            MOELB_CHECK_ARG(!(ep_rank && !rank_offsets.is_none()),
                            "give ep_rank (all rows from one rank) or rank_offsets, not both");
            if (!rank_offsets.is_none()) {
                auto o = config_array<std::int64_t>(rank_offsets, "rank_offsets", 1);
                MOELB_CHECK_ARG(o.shape(0) == W + 1, "rank_offsets has " << o.shape(0)
                                                                         << " entries but ep_size "
                                                                            "+ 1 = "
                                                                         << W + 1);
                for (int r = 0; r <= W; ++r) offsets[static_cast<std::size_t>(r)] = o.at(r);
            } else {
                const int rank = narrow(ep_rank.value_or(0), "ep_rank");
                MOELB_CHECK_ARG(rank >= 0 && rank < W,
                                "ep_rank=" << rank << " is outside [0, ep_size=" << W << ")");
                for (int r = rank + 1; r <= W; ++r) offsets[static_cast<std::size_t>(r)] = T;
            }
            auto out = new_matrix<std::int32_t>(T, ids.shape(1));
            auto out_map = mutable_matrix(out);
            const int l = narrow(layer, "layer");
            {
                py::gil_scoped_release release;
                dispatch_tokens(loc, a, l, const_matrix(ids), offsets, s, out_map);
            }
            return out;
        },
        py::arg("topk_ids"), py::arg("location"), py::arg("layer"),
        py::arg("dispatch") = "sglang_static", py::arg("ep_rank") = py::none(),
        py::arg("rank_offsets") = py::none(), py::arg("seed") = 0);
}

}  // namespace moelb::bindings
