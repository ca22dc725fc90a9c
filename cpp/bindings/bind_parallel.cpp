#include <algorithm>
#include <cstdint>

#include "bindings.hpp"
#include "moelb/parallel.hpp"

namespace moelb::bindings {

namespace py = pybind11;

void bind_parallel(py::module_& m) {
    m.def(
        "set_num_threads",
        [](std::int64_t num_threads) {
            // Anything <= 0 restores the default; huge values are capped (threads are per chunk).
            set_num_threads(static_cast<int>(std::clamp<std::int64_t>(num_threads, -1, 1 << 16)));
        },
        py::arg("num_threads"),
        "Sets the threads moelb's parallel loops use; <= 0 restores the default (all cores). "
        "Results do not depend on it.");
    m.def("get_num_threads", &get_num_threads, "The threads moelb's parallel loops use.");
}

}  // namespace moelb::bindings
