#include <pybind11/pybind11.h>

#include "bindings.hpp"
#include "moelb/machine_limits.hpp"

namespace moelb::bindings {

namespace py = pybind11;

void bind_machine_limits(py::module_& m) {
    m.def(
        "measure_machine_limits",
        [](int threads, std::int64_t buffer_bytes, int passes, double seconds) {
            MachineLimitsOptions options;
            options.threads = threads;
            options.buffer_bytes = buffer_bytes;
            options.passes = passes;
            options.seconds = seconds;
            MachineLimits r;
            {
                py::gil_scoped_release release;
                r = measure_machine_limits(options);
            }
            py::dict out;
            out["threads"] = r.threads;
            out["cpu_isa"] = r.cpu_isa;
            out["read_bandwidth_gbs"] = r.read_bandwidth_gbs;
            out["fma_peak_gflops"] = r.fma_peak_gflops;
            out["bf16_dot_peak_gflops"] = r.bf16_dot_peak_gflops;
            out["bf16_dot_method"] = r.bf16_dot_method;
            out["buffer_bytes"] = r.buffer_bytes;
            out["passes"] = r.passes;
            return out;
        },
        py::arg("threads"), py::arg("buffer_bytes"), py::arg("passes"), py::arg("seconds"),
        "The machine-limit microbenchmarks (moelb/machine_limits.hpp) as a dict; use "
        "moelb.measure_machine_limits.");
}

}  // namespace moelb::bindings
