#include <pybind11/stl.h>

#include "arrays.hpp"
#include "bindings.hpp"
#include "moelb/hash_router.hpp"

namespace moelb::bindings {

namespace {

template <class TokenId>
void run_select(const HashRouter& router, ConstMatrixMap<float> logits, const py::array& ids,
                std::optional<Index> non_padded, const LayerDispatcher* dispatcher,
                TopKOutputView out) {
    auto typed = py::reinterpret_borrow<py::array_t<TokenId>>(ids);
    std::span<const TokenId> span(typed.data(), static_cast<std::size_t>(typed.size()));
    py::gil_scoped_release release;
    router.select<TokenId>(logits, span, non_padded, dispatcher, out);
}

}  // namespace

void bind_hash_router(py::module_& m) {
    py::class_<HashRouter>(m, "HashRouter", R"doc(
The DeepSeek-V4 hash router: the routed experts of a token are tid2eid[token id].

tid2eid: [vocab_size, top_k] integer array of expert ids. Weights are the looked-up experts'
scores, renormalized except under softmax scoring; rsf and the fused shared column as in
TopKConfig. num_experts: E when known (tid2eid is checked now), else checked per call.
)doc")
        .def(py::init([](const py::handle& tid2eid, const std::string& scoring,
                         float routed_scaling_factor, std::int64_t num_fused_shared_experts,
                         bool apply_routed_scaling_factor_on_output,
                         std::optional<std::int64_t> num_experts) {
                 auto a = config_array<std::int32_t>(tid2eid, "tid2eid", 2);
                 return HashRouter(const_matrix(a), parse_scoring(scoring), routed_scaling_factor,
                                   narrow(num_fused_shared_experts, "num_fused_shared_experts"),
                                   apply_routed_scaling_factor_on_output,
                                   narrow(num_experts, "num_experts").value_or(-1));
             }),
             py::arg("tid2eid"), py::kw_only(), py::arg("scoring") = "sqrtsoftplus",
             py::arg("routed_scaling_factor") = 1.0f, py::arg("num_fused_shared_experts") = 0,
             py::arg("apply_routed_scaling_factor_on_output") = false,
             py::arg("num_experts") = py::none())
        .def_property_readonly("vocab_size", &HashRouter::vocab_size)
        .def_property_readonly("top_k", &HashRouter::top_k)
        .def_property_readonly(
            "num_experts",
            [](const HashRouter& r) {
                return r.num_experts() > 0 ? py::object(py::int_(r.num_experts())) : py::none();
            })
        .def_property_readonly(
            "scoring", [](const HashRouter& r) { return std::string(to_string(r.scoring())); })
        .def_property_readonly("routed_scaling_factor", &HashRouter::routed_scaling_factor)
        .def_property_readonly("num_fused_shared_experts", &HashRouter::num_fused_shared_experts)
        .def_property_readonly("apply_routed_scaling_factor_on_output",
                               &HashRouter::apply_routed_scaling_factor_on_output)
        .def_property_readonly("renormalize", &HashRouter::renormalize)
        .def_property_readonly(
            "tid2eid",
            [](py::object self) {
                const auto& r = self.cast<const HashRouter&>();
                return readonly_view(r.tid2eid().data(), {r.vocab_size(), r.top_k()}, self);
            },
            "[vocab_size, top_k] int32 (read-only view).")
        .def(
            "select",
            [](const HashRouter& router, const py::handle& router_logits,
               const py::handle& input_ids, std::optional<Index> num_token_non_padded,
               const ExpertLocation* location, std::optional<std::int64_t> layer,
               std::int64_t ep_rank, const std::string& dispatch, std::int64_t seed) {
                auto logits = strict_array<float>(router_logits, "router_logits", 2);
                py::array ids = as_array(input_ids, "input_ids", "int32 or int64");
                MOELB_CHECK_ARG(ids, "input_ids must be an array");
                if (ids.dtype().is(py::dtype::of<std::int64_t>())) {
                    ids = strict_array<std::int64_t>(input_ids, "input_ids", 1);
                } else if (ids.dtype().is(py::dtype::of<std::int32_t>())) {
                    ids = strict_array<std::int32_t>(input_ids, "input_ids", 1);
                } else {
                    throw InvalidDType("input_ids must have dtype int32 or int64, got " +
                                       std::string(py::str(ids.dtype())));
                }
                const auto dispatcher = make_dispatcher(location, layer, ep_rank, dispatch, seed);
                const Index T = logits.shape(0);
                const int width = router.top_k() + router.num_fused_shared_experts();
                auto out_ids = new_matrix<std::int32_t>(T, width);
                auto weights = new_matrix<float>(T, width);
                auto recorder_ids = new_matrix<std::int32_t>(T, router.top_k());
                TopKOutputView out{mutable_matrix(out_ids), mutable_matrix(weights),
                                   mutable_matrix(recorder_ids)};
                const LayerDispatcher* d = dispatcher ? &*dispatcher : nullptr;
                if (ids.dtype().is(py::dtype::of<std::int64_t>())) {
                    run_select<std::int64_t>(router, const_matrix(logits), ids,
                                             num_token_non_padded, d, out);
                } else {
                    run_select<std::int32_t>(router, const_matrix(logits), ids,
                                             num_token_non_padded, d, out);
                }
                return py::make_tuple(out_ids, weights, recorder_ids);
            },
            py::arg("router_logits"), py::arg("input_ids"),
            py::arg("num_token_non_padded") = py::none(), py::arg("location") = py::none(),
            py::arg("layer") = py::none(), py::arg("ep_rank") = 0,
            py::arg("dispatch") = "sglang_static", py::arg("seed") = 0,
            "Routes tokens by token id; returns (topk_ids, topk_weights, recorder_topk_ids).");
}

}  // namespace moelb::bindings
