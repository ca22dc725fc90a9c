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

}  // namespace

void bind_dispatch(py::module_& m) {
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
