#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "bindings.hpp"
#include "moelb/cpu_isa.hpp"

namespace moelb::bindings {

namespace py = pybind11;

namespace {

std::vector<std::string> names(const std::vector<CpuIsa>& isas) {
    std::vector<std::string> out;
    for (const CpuIsa isa : isas) out.emplace_back(to_string(isa));
    return out;
}

}  // namespace

void bind_cpu_isa(py::module_& m) {
    m.def(
        "cpu_isa", [] { return std::string(to_string(cpu_isa())); },
        "The ISA path of the hot kernels: 'baseline', 'avx2', 'avx512', 'avx512_bf16' (avx512 "
        "with vdpbf16ps for bf16 activations) or (a MOELB_NATIVE=ON build) 'native'. Chosen at import: MOELB_ISA when set, else the widest this CPU runs.");
    m.def(
        "available_cpu_isas", [] { return names(available_cpu_isas()); },
        "The ISA paths this build has and this CPU runs, narrowest first.");
    m.def(
        "compiled_cpu_isas", [] { return names(compiled_cpu_isas()); },
        "The ISA paths compiled into this build, narrowest first (whether or not this CPU runs "
        "them).");
    m.def(
        "set_cpu_isa", [](const std::string& name) { set_cpu_isa(parse_cpu_isa(name, "name")); },
        py::arg("name"),
        "Switches the hot kernels to the ISA path `name` (for tests and benchmarks); "
        "InvalidArgumentError if this build or CPU lacks it. Paths may differ in float rounding.");
    // The first choice (MOELB_ISA) is made now, so that a bad MOELB_ISA fails the import.
    cpu_isa();
}

}  // namespace moelb::bindings
