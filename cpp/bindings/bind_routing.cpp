#include <pybind11/operators.h>
#include <pybind11/stl.h>

#include "arrays.hpp"
#include "bindings.hpp"
#include "moelb/routing.hpp"

namespace moelb::bindings {

namespace {

std::string config_repr(const TopKConfig& c) {
    std::ostringstream os;
    os << "TopKConfig(top_k=" << c.top_k << ", scoring='" << to_string(c.scoring) << "'";
    if (c.grouped()) {
        os << ", num_groups=" << c.num_groups << ", topk_group=" << c.topk_group
           << ", group_score='" << to_string(c.group_score) << "'";
    }
    os << ", renormalize=" << (c.renormalize ? "True" : "False")
       << ", routed_scaling_factor=" << c.routed_scaling_factor
       << ", apply_routed_scaling_factor_on_output="
       << (c.apply_routed_scaling_factor_on_output ? "True" : "False")
       << ", num_fused_shared_experts=" << c.num_fused_shared_experts << ")";
    return os.str();
}

TopKConfig make_config(std::int64_t top_k, const std::string& scoring,
                       std::optional<std::int64_t> num_groups_arg,
                       std::optional<std::int64_t> topk_group_arg, const std::string& group_score,
                       bool renormalize, float routed_scaling_factor,
                       bool apply_routed_scaling_factor_on_output,
                       std::int64_t num_fused_shared_experts) {
    const std::optional<int> num_groups = narrow(num_groups_arg, "num_groups");
    const std::optional<int> topk_group = narrow(topk_group_arg, "topk_group");
    TopKConfig c;
    c.top_k = narrow(top_k, "top_k");
    c.scoring = parse_scoring(scoring);
    MOELB_CHECK_ARG(!num_groups || *num_groups >= 1,
                    "num_groups must be positive (or None for ungrouped), got " << *num_groups);
    MOELB_CHECK_ARG(num_groups.has_value() == topk_group.has_value(),
                    "num_groups and topk_group go together (grouped selection), got num_groups="
                        << (num_groups ? std::to_string(*num_groups) : "None")
                        << ", topk_group=" << (topk_group ? std::to_string(*topk_group) : "None"));
    c.num_groups = num_groups.value_or(0);
    c.topk_group = topk_group.value_or(0);
    c.group_score = parse_group_score(group_score);
    c.renormalize = renormalize;
    c.routed_scaling_factor = routed_scaling_factor;
    c.apply_routed_scaling_factor_on_output = apply_routed_scaling_factor_on_output;
    c.num_fused_shared_experts = narrow(num_fused_shared_experts, "num_fused_shared_experts");
    c.validate();
    return c;
}

py::object optional_int(int value) { return value > 0 ? py::object(py::int_(value)) : py::none(); }

}  // namespace

void bind_routing(py::module_& m) {
    py::class_<TopKConfig>(m, "TopKConfig", R"doc(
The routing configuration of one MoE layer (immutable).

top_k: routed experts per token (K; the fused shared column is extra).
scoring: 'softmax' | 'sigmoid' | 'sqrtsoftplus'.
num_groups, topk_group: grouped selection (None = ungrouped): keep the topk_group best of
    num_groups contiguous expert groups, then pick top_k among their experts.
group_score: 'top2_sum' (sum of a group's two best biased scores, DeepSeek-V3) or 'max' (V2).
renormalize: divide the routed weights by their sum.
routed_scaling_factor: rsf; folded into the weights when apply_routed_scaling_factor_on_output,
    else left for the MoE output.
num_fused_shared_experts: 0 or 1; 1 appends the shared expert column (id E; weight 1/rsf when
    renormalizing, 1.0 when rsf is folded).
)doc")
        .def(py::init(&make_config), py::kw_only(), py::arg("top_k"),
             py::arg("scoring") = "softmax", py::arg("num_groups") = py::none(),
             py::arg("topk_group") = py::none(), py::arg("group_score") = "top2_sum",
             py::arg("renormalize") = true, py::arg("routed_scaling_factor") = 1.0f,
             py::arg("apply_routed_scaling_factor_on_output") = false,
             py::arg("num_fused_shared_experts") = 0)
        .def_static("deepseek_v3", &TopKConfig::deepseek_v3,
                    "DeepSeek-V3/R1: sigmoid, 8 groups keep 4 (top-2 sum), top_k 8, rsf 2.5.")
        .def_static("deepseek_v4_flash", &TopKConfig::deepseek_v4_flash,
                    "DeepSeek-V4-Flash learned layers: sqrtsoftplus, ungrouped, top_k 6, rsf 1.5.")
        .def_static("deepseek_v4_pro", &TopKConfig::deepseek_v4_pro,
                    "DeepSeek-V4-Pro learned layers: sqrtsoftplus, ungrouped, top_k 6, rsf 2.5.")
        .def_property_readonly("top_k", [](const TopKConfig& c) { return c.top_k; })
        .def_property_readonly(
            "scoring", [](const TopKConfig& c) { return std::string(to_string(c.scoring)); })
        .def_property_readonly("num_groups",
                               [](const TopKConfig& c) { return optional_int(c.num_groups); })
        .def_property_readonly("topk_group",
                               [](const TopKConfig& c) { return optional_int(c.topk_group); })
        .def_property_readonly(
            "group_score",
            [](const TopKConfig& c) { return std::string(to_string(c.group_score)); })
        .def_property_readonly("renormalize", [](const TopKConfig& c) { return c.renormalize; })
        .def_property_readonly("routed_scaling_factor",
                               [](const TopKConfig& c) { return c.routed_scaling_factor; })
        .def_property_readonly(
            "apply_routed_scaling_factor_on_output",
            [](const TopKConfig& c) { return c.apply_routed_scaling_factor_on_output; })
        .def_property_readonly("num_fused_shared_experts",
                               [](const TopKConfig& c) { return c.num_fused_shared_experts; })
        .def_property_readonly("output_columns", &TopKConfig::output_columns,
                               "top_k + num_fused_shared_experts: the width of topk_ids.")
        .def("__repr__", &config_repr)
        .def(py::self == py::self)
        .def(py::pickle(
            [](const TopKConfig& c) {
                return py::make_tuple(
                    c.top_k, std::string(to_string(c.scoring)), optional_int(c.num_groups),
                    optional_int(c.topk_group), std::string(to_string(c.group_score)),
                    c.renormalize, c.routed_scaling_factor, c.apply_routed_scaling_factor_on_output,
                    c.num_fused_shared_experts);
            },
            [](const py::tuple& s) {
                MOELB_CHECK_ARG(s.size() == 9, "invalid TopKConfig pickle state");
                return make_config(s[0].cast<std::int64_t>(), s[1].cast<std::string>(),
                                   s[2].cast<std::optional<std::int64_t>>(),
                                   s[3].cast<std::optional<std::int64_t>>(),
                                   s[4].cast<std::string>(), s[5].cast<bool>(), s[6].cast<float>(),
                                   s[7].cast<bool>(), s[8].cast<std::int64_t>());
            }));

    m.def(
        "select_experts",
        [](const py::handle& router_logits, const TopKConfig& config,
           const py::handle& correction_bias, std::optional<Index> num_token_non_padded,
           const ExpertLocation* location, std::optional<std::int64_t> layer, std::int64_t ep_rank,
           const std::string& dispatch, std::int64_t seed) {
            auto logits = strict_array<float>(router_logits, "router_logits", 2);
            py::array_t<float, py::array::c_style> bias;
            if (!correction_bias.is_none()) {
                bias = config_array<float>(correction_bias, "correction_bias", 1);
            }
            const auto dispatcher = make_dispatcher(location, layer, ep_rank, dispatch, seed);
            const Index T = logits.shape(0);
            auto ids = new_matrix<std::int32_t>(T, config.output_columns());
            auto weights = new_matrix<float>(T, config.output_columns());
            auto recorder_ids = new_matrix<std::int32_t>(T, config.top_k);
            TopKOutputView out{mutable_matrix(ids), mutable_matrix(weights),
                               mutable_matrix(recorder_ids)};
            std::span<const float> bias_span;
            if (bias) bias_span = {bias.data(), static_cast<std::size_t>(bias.size())};
            {
                py::gil_scoped_release release;
                select_experts(const_matrix(logits), config, bias_span, num_token_non_padded,
                               dispatcher ? &*dispatcher : nullptr, out);
            }
            return py::make_tuple(ids, weights, recorder_ids);
        },
        py::arg("router_logits"), py::arg("config"), py::arg("correction_bias") = py::none(),
        py::arg("num_token_non_padded") = py::none(), py::arg("location") = py::none(),
        py::arg("layer") = py::none(), py::arg("ep_rank") = 0,
        py::arg("dispatch") = "sglang_static", py::arg("seed") = 0,
        "Routes tokens; returns (topk_ids, topk_weights, recorder_topk_ids). See "
        "moelb.select_experts.");

    m.def(
        "remap_topk_for_per_rank_shared_slots",
        [](const py::handle& topk_ids, std::int64_t num_physical_experts, std::int64_t ep_size,
           std::int64_t ep_rank, std::int64_t num_fused_shared_experts) {
            auto ids = strict_array<std::int32_t>(topk_ids, "topk_ids", 2);
            auto out = new_matrix<std::int32_t>(ids.shape(0), ids.shape(1));
            auto out_map = mutable_matrix(out);
            {
                py::gil_scoped_release release;
                remap_topk_for_per_rank_shared_slots(
                    const_matrix(ids), narrow(num_physical_experts, "num_physical_experts"),
                    narrow(ep_size, "ep_size"), narrow(ep_rank, "ep_rank"),
                    narrow(num_fused_shared_experts, "num_fused_shared_experts"), out_map);
            }
            return out;
        },
        py::arg("topk_ids"), py::arg("num_physical_experts"), py::arg("ep_size"),
        py::arg("ep_rank"), py::arg("num_fused_shared_experts") = 1,
        "Per-rank shared-slot layout: routed p -> p + p // S, shared -> ep_rank * (S + 1) + S.");
}

}  // namespace moelb::bindings
