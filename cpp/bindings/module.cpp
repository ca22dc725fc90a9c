#include "bindings.hpp"

PYBIND11_MODULE(_core, m) {
    m.doc() = "moelb's compiled core. Use the public API in the moelb package.";
    m.attr("__version__") = MOELB_VERSION;
    moelb::bindings::bind_errors(m);
    moelb::bindings::bind_parallel(m);
    moelb::bindings::bind_cpu_isa(m);
    moelb::bindings::bind_balancedness(m);
    moelb::bindings::bind_expert_location(m);
    moelb::bindings::bind_dispatch(m);
    moelb::bindings::bind_routing(m);
    moelb::bindings::bind_hash_router(m);
    moelb::bindings::bind_recorder(m);
    moelb::bindings::bind_eplb(m);
    moelb::bindings::bind_weight_moves(m);
    moelb::bindings::bind_waterfill(m);
    moelb::bindings::bind_weight_format(m);
    moelb::bindings::bind_moe_layer(m);
    moelb::bindings::bind_simulate(m);
    moelb::bindings::bind_step_time(m);
    moelb::bindings::bind_machine_limits(m);
}
