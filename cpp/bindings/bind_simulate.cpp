#include <span>

#include "arrays.hpp"
#include "bindings.hpp"
#include "moelb/simulate.hpp"

namespace moelb::bindings {

namespace {

// counts: [T, L, E] int32, C-contiguous (token-sized: never copied or converted).
StepCounts step_counts(const py::array_t<std::int32_t>& a) {
    StepCounts c;
    c.num_steps = a.shape(0);
    c.num_layers = a.shape(1);
    c.num_experts = a.shape(2);
    c.data = std::span<const std::int32_t>(a.data(), static_cast<std::size_t>(a.size()));
    return c;
}

}  // namespace

void bind_simulate(py::module_& m) {
    m.def(
        "score_steps",
        [](const py::handle& counts, const ExpertLocation& location) {
            auto a = strict_array<std::int32_t>(counts, "counts", 3);
            const StepCounts c = step_counts(a);
            auto max_load = new_matrix<double>(c.num_steps, c.num_layers);
            auto mean_load = new_matrix<double>(c.num_steps, c.num_layers);
            {
                py::gil_scoped_release release;
                score_steps(c, location, mutable_matrix(max_load), mutable_matrix(mean_load));
            }
            return py::make_tuple(max_load, mean_load);
        },
        py::arg("counts"), py::arg("location"),
        "(max_rank_load [T, L], mean_rank_load [T, L]) of a placement for per-step counts "
        "[T, L, E] int32 (each expert's count split equally over its replicas).");

    m.def(
        "step_lower_bounds",
        [](const py::handle& counts, std::int64_t num_physical_experts, std::int64_t ep_size) {
            auto a = strict_array<std::int32_t>(counts, "counts", 3);
            const StepCounts c = step_counts(a);
            const int P = narrow(num_physical_experts, "num_physical_experts");
            const int W = narrow(ep_size, "ep_size");
            auto out = new_matrix<double>(c.num_steps, c.num_layers);
            {
                py::gil_scoped_release release;
                step_lower_bounds(c, P, W, mutable_matrix(out));
            }
            return out;
        },
        py::arg("counts"), py::arg("num_physical_experts"), py::arg("ep_size"),
        "[T, L] lower bound of the largest GPU load of any placement, per step and layer.");
}

}  // namespace moelb::bindings
