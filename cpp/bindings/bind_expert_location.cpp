#include <pybind11/operators.h>
#include <pybind11/stl.h>

#include "arrays.hpp"
#include "bindings.hpp"
#include "moelb/expert_location.hpp"

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

void bind_expert_location(py::module_& m) {
    py::class_<ExpertLocation>(m, "ExpertLocation", R"doc(
Expert placement: the logical expert held by every physical slot of every MoE layer.

physical_to_logical: [num_layers, num_physical_experts] integer array. Slot p lives on rank
p // (num_physical_experts // ep_size); rank r on node r // (ep_size // num_nodes).
Validated: ids in [0, num_logical_experts), every logical expert has a replica in every layer,
num_physical_experts % ep_size == 0, ep_size % num_nodes == 0.
)doc")
        .def(py::init([](const py::handle& physical_to_logical, std::int64_t num_logical_experts,
                         std::int64_t ep_size, std::int64_t num_nodes) {
                 auto a = config_array<std::int32_t>(physical_to_logical, "physical_to_logical", 2);
                 RowMatrix<std::int32_t> map = const_matrix(a);
                 return ExpertLocation(std::move(map),
                                       narrow(num_logical_experts, "num_logical_experts"),
                                       narrow(ep_size, "ep_size"), narrow(num_nodes, "num_nodes"));
             }),
             py::arg("physical_to_logical"), py::arg("num_logical_experts"), py::arg("ep_size"),
             py::arg("num_nodes") = 1)
        .def_static(
            "trivial",
            [](std::int64_t num_layers, std::int64_t num_logical_experts,
               std::int64_t num_physical_experts, std::int64_t ep_size, std::int64_t num_nodes) {
                return ExpertLocation::trivial(narrow(num_layers, "num_layers"),
                                               narrow(num_logical_experts, "num_logical_experts"),
                                               narrow(num_physical_experts, "num_physical_experts"),
                                               narrow(ep_size, "ep_size"),
                                               narrow(num_nodes, "num_nodes"));
            },
            py::arg("num_layers"), py::arg("num_logical_experts"), py::arg("num_physical_experts"),
            py::arg("ep_size"), py::arg("num_nodes") = 1,
            "Slot p holds logical expert p % num_logical_experts in every layer.")
        .def_property_readonly("num_layers", &ExpertLocation::num_layers)
        .def_property_readonly("num_logical_experts", &ExpertLocation::num_logical_experts)
        .def_property_readonly("num_physical_experts", &ExpertLocation::num_physical_experts)
        .def_property_readonly("ep_size", &ExpertLocation::ep_size)
        .def_property_readonly("num_nodes", &ExpertLocation::num_nodes)
        .def_property_readonly("num_local_physical_experts",
                               &ExpertLocation::num_local_physical_experts,
                               "S = num_physical_experts // ep_size: slots per rank.")
        .def_property_readonly("max_replicas", &ExpertLocation::max_replicas,
                               "X: the most replicas any expert has (logical_to_physical width).")
        .def_property_readonly(
            "physical_to_logical",
            [](py::object self) {
                const auto& loc = self.cast<const ExpertLocation&>();
                return readonly_view(loc.physical_to_logical().data(),
                                     {loc.num_layers(), loc.num_physical_experts()}, self);
            },
            "[L, P] int32 (read-only view).")
        .def_property_readonly(
            "logical_to_physical",
            [](py::object self) {
                const auto& loc = self.cast<const ExpertLocation&>();
                return readonly_view(
                    loc.logical_to_physical().data(),
                    {loc.num_layers(), loc.num_logical_experts(), loc.max_replicas()}, self);
            },
            "[L, E, X] int32 (read-only view): each expert's slots, ascending, padded with -1.")
        .def_property_readonly(
            "logical_count",
            [](py::object self) {
                const auto& loc = self.cast<const ExpertLocation&>();
                return readonly_view(loc.logical_count().data(),
                                     {loc.num_layers(), loc.num_logical_experts()}, self);
            },
            "[L, E] int32 (read-only view): replicas per logical expert (DeepSeek's logcnt).")
        .def(
            "static_dispatch_table",
            [](const ExpertLocation& loc, std::int64_t ep_rank, std::int64_t seed) {
                MOELB_CHECK_ARG(seed >= 0, "seed must be non-negative, got " << seed);
                RowMatrix<std::int32_t> table = loc.static_dispatch_table(
                    narrow(ep_rank, "ep_rank"), static_cast<std::uint64_t>(seed));
                auto out = new_matrix<std::int32_t>(table.rows(), table.cols());
                mutable_matrix(out) = table;
                return out;
            },
            py::arg("ep_rank"), py::arg("seed") = 0,
            "[L, E] int32: the slot rank ep_rank uses for each expert under static dispatch.")
        .def(
            "dispatch",
            [](const ExpertLocation& loc, const py::handle& topk_ids, std::int64_t layer,
               std::int64_t ep_rank, const std::string& algorithm, std::int64_t seed) {
                auto ids = strict_array<std::int32_t>(topk_ids, "topk_ids", 2);
                MOELB_CHECK_ARG(seed >= 0, "seed must be non-negative, got " << seed);
                const DispatchAlgorithm a = parse_dispatch_algorithm(algorithm, "algorithm");
                auto out = new_matrix<std::int32_t>(ids.shape(0), ids.shape(1));
                auto out_map = mutable_matrix(out);
                {
                    py::gil_scoped_release release;
                    loc.dispatch(const_matrix(ids), narrow(layer, "layer"),
                                 narrow(ep_rank, "ep_rank"), a, static_cast<std::uint64_t>(seed),
                                 out_map);
                }
                return out;
            },
            py::arg("topk_ids"), py::arg("layer"), py::arg("ep_rank") = 0,
            py::arg("algorithm") = "static", py::arg("seed") = 0,
            "Maps logical ids [T, C] int32 of one layer to physical slots; -1 stays -1.")
        .def(py::self == py::self)
        .def("__repr__",
             [](const ExpertLocation& loc) {
                 return "ExpertLocation(num_layers=" + std::to_string(loc.num_layers()) +
                        ", num_logical_experts=" + std::to_string(loc.num_logical_experts()) +
                        ", num_physical_experts=" + std::to_string(loc.num_physical_experts()) +
                        ", ep_size=" + std::to_string(loc.ep_size()) +
                        ", num_nodes=" + std::to_string(loc.num_nodes()) + ")";
             })
        .def(py::pickle(
            [](py::object self) {
                const auto& loc = self.cast<const ExpertLocation&>();
                auto map = new_matrix<std::int32_t>(loc.num_layers(), loc.num_physical_experts());
                mutable_matrix(map) = loc.physical_to_logical();
                return py::make_tuple(map, loc.num_logical_experts(), loc.ep_size(),
                                      loc.num_nodes());
            },
            [](const py::tuple& state) {
                MOELB_CHECK_ARG(state.size() == 4, "invalid ExpertLocation pickle state");
                auto a = config_array<std::int32_t>(state[0], "physical_to_logical", 2);
                return ExpertLocation(const_matrix(a), state[1].cast<int>(), state[2].cast<int>(),
                                      state[3].cast<int>());
            }));
}

}  // namespace moelb::bindings
