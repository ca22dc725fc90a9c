// One registration function per area; module.cpp calls them in dependency order.
#pragma once

#include <pybind11/pybind11.h>

namespace moelb::bindings {

void bind_errors(pybind11::module_& m);
void bind_parallel(pybind11::module_& m);
void bind_cpu_isa(pybind11::module_& m);
void bind_balancedness(pybind11::module_& m);
void bind_expert_location(pybind11::module_& m);
void bind_dispatch(pybind11::module_& m);
void bind_routing(pybind11::module_& m);
void bind_hash_router(pybind11::module_& m);
void bind_recorder(pybind11::module_& m);
void bind_eplb(pybind11::module_& m);
void bind_weight_moves(pybind11::module_& m);
void bind_waterfill(pybind11::module_& m);
void bind_weight_format(pybind11::module_& m);
void bind_moe_layer(pybind11::module_& m);
void bind_simulate(pybind11::module_& m);
void bind_step_time(pybind11::module_& m);
void bind_machine_limits(pybind11::module_& m);

}  // namespace moelb::bindings

#include <optional>
#include <string>

#include "moelb/dispatch.hpp"
#include "moelb/expert_location.hpp"

namespace moelb::bindings {

// The dispatcher for select_experts-like calls: none without a location; with one, `layer` is
// required. Errors name the Python parameters.
std::optional<LayerDispatcher> make_dispatcher(const ExpertLocation* location,
                                               std::optional<std::int64_t> layer,
                                               std::int64_t ep_rank, const std::string& dispatch,
                                               std::int64_t seed);

}  // namespace moelb::bindings
