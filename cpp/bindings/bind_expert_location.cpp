#include <pybind11/operators.h>
#include <pybind11/stl.h>

#include "arrays.hpp"
#include "bindings.hpp"
#include "moelb/expert_location.hpp"

namespace moelb::bindings {

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
