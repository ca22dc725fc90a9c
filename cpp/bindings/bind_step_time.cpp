#include <span>
#include <string>

#include "arrays.hpp"
#include "bindings.hpp"
#include "moelb/step_time.hpp"

namespace moelb::bindings {

void bind_step_time(py::module_& m) {
    m.def(
        "token_copies",
        [](const py::handle& physical, const py::handle& source_rank,
           std::int64_t num_physical_experts, std::int64_t ep_size, std::int64_t num_nodes,
           const std::string& mode) {
            MOELB_CHECK_ARG(mode == "normal" || mode == "low_latency",
                            "mode='" << mode << "', expected 'normal' or 'low_latency'");
            auto ids = strict_array<std::int32_t>(physical, "physical", 2);
            auto source = strict_array<std::int32_t>(source_rank, "source_rank", 1);
            const int P = narrow(num_physical_experts, "num_physical_experts");
            const int W = narrow(ep_size, "ep_size");
            const int N = narrow(num_nodes, "num_nodes");
            MOELB_CHECK_ARG(W >= 1, "ep_size must be >= 1, got " << W);
            auto out = new_matrix<std::int64_t>(4, W);
            MOELB_CHECK_ARG(P >= 1, "num_physical_experts must be >= 1, got " << P);
            py::array_t<std::int64_t> slots(P);
            {
                py::gil_scoped_release release;
                token_copies(
                    const_matrix(ids),
                    std::span<const std::int32_t>(source.data(),
                                                  static_cast<std::size_t>(source.size())),
                    P, W, N, mode == "normal" ? DeepEPMode::kNormal : DeepEPMode::kLowLatency,
                    mutable_matrix(out),
                    std::span<std::int64_t>(slots.mutable_data(), static_cast<std::size_t>(P)));
            }
            return py::make_tuple(out, slots);
        },
        py::arg("physical"), py::arg("source_rank"), py::arg("num_physical_experts"),
        py::arg("ep_size"), py::arg("num_nodes"), py::arg("mode"),
        "(copies [4, W] int64, slot_tokens [P] int64) of one layer's dispatch: the token copies "
        "each GPU sends and receives (rows: NVLink sent, NVLink received, network sent, network "
        "received) and the (token, expert) pairs of each slot; physical [T, C] int32 slot ids "
        "(-1: none), source_rank [T] int32; mode 'normal' | 'low_latency' (DeepEP's kernels).");
}

}  // namespace moelb::bindings
