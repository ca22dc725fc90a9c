#include <pybind11/stl.h>

#include <vector>

#include "arrays.hpp"
#include "bindings.hpp"
#include "moelb/waterfill.hpp"

namespace moelb::bindings {

namespace {

py::array_t<std::int64_t> int64_vector(const std::vector<std::int64_t>& v) {
    return py::array_t<std::int64_t>(static_cast<py::ssize_t>(v.size()), v.data());
}

Index tokens_or_rows(std::optional<std::int64_t> num_tokens, Index rows) {
    return num_tokens ? *num_tokens : rows;
}

// The all-reduced buffer passed from Python (None in static mode).
std::vector<std::int64_t> reduced_buffer(const py::handle& reduced) {
    if (reduced.is_none()) return {};
    auto a = config_array<std::int64_t>(reduced, "reduced", 1);
    return {a.data(), a.data() + a.size()};
}

}  // namespace

void bind_waterfill(py::module_& m) {
    py::class_<WaterfillPlan>(m, "WaterfillPlan", R"doc(
How one batch's shared experts are placed (SGLang's dispatch plan).

kind: 'local' (every token on this rank), 'token_count' (per token, a hashed draw over the
candidate ranks' spare capacity), 'fewest_active' / 'fused_fewest_active' (one rank, the one with
the fewest distinct routed experts, takes the whole decode batch). rank_load: [W] int64 routed ids
per rank (token-count; dynamic mode adds each rank's token count) or distinct routed experts per
rank (fewest-active kinds); empty for 'local'. target_total: the token-count target (0: derived
from rank_load). allow_all_ranks: every rank is a candidate. destination: the fewest-active rank.
)doc")
        .def_property_readonly(
            "kind", [](const WaterfillPlan& p) { return std::string(to_string(p.kind)); })
        .def_property_readonly("rank_load",
                               [](const WaterfillPlan& p) { return int64_vector(p.rank_load); })
        .def_readonly("target_total", &WaterfillPlan::target_total)
        .def_readonly("allow_all_ranks", &WaterfillPlan::allow_all_ranks)
        .def_property_readonly("destination",
                               [](const WaterfillPlan& p) {
                                   return p.destination >= 0 ? py::object(py::int_(p.destination))
                                                             : py::none();
                               })
        .def("__repr__", [](const WaterfillPlan& p) {
            std::string loads;
            for (std::size_t i = 0; i < p.rank_load.size(); ++i) {
                loads += (i ? ", " : "") + std::to_string(p.rank_load[i]);
            }
            return "WaterfillPlan(kind='" + std::string(to_string(p.kind)) + "', rank_load=[" +
                   loads + "], target_total=" + std::to_string(p.target_total) +
                   ", allow_all_ranks=" + (p.allow_all_ranks ? "True" : "False") +
                   ", destination=" + std::to_string(p.destination) + ")";
        });

    py::class_<WaterfillBalancer>(m, "WaterfillBalancer", R"doc(
The Waterfill shared-expert balancer of one MoE layer on one EP rank (SGLang's, exactly).
)doc")
        .def(py::init([](std::int64_t num_physical_experts, std::int64_t ep_size,
                         std::int64_t ep_rank, double routed_scaling_factor,
                         const std::string& mode, bool apply_routed_scaling_factor_on_output) {
                 return WaterfillBalancer(narrow(num_physical_experts, "num_physical_experts"),
                                          narrow(ep_size, "ep_size"), narrow(ep_rank, "ep_rank"),
                                          routed_scaling_factor, parse_waterfill_mode(mode),
                                          apply_routed_scaling_factor_on_output);
             }),
             py::arg("num_physical_experts"), py::arg("ep_size"), py::arg("ep_rank"),
             py::arg("routed_scaling_factor") = 1.0, py::arg("mode") = "static", py::kw_only(),
             py::arg("apply_routed_scaling_factor_on_output") = false)
        .def_property_readonly("num_physical_experts", &WaterfillBalancer::num_physical_experts)
        .def_property_readonly("ep_size", &WaterfillBalancer::ep_size)
        .def_property_readonly("ep_rank", &WaterfillBalancer::ep_rank)
        .def_property_readonly("slots_per_rank", &WaterfillBalancer::slots_per_rank)
        .def_property_readonly("routed_scaling_factor", &WaterfillBalancer::routed_scaling_factor)
        .def_property_readonly("apply_routed_scaling_factor_on_output",
                               &WaterfillBalancer::apply_routed_scaling_factor_on_output)
        .def_property_readonly(
            "mode", [](const WaterfillBalancer& b) { return std::string(to_string(b.mode())); })
        .def_property_readonly("shared_weight", &WaterfillBalancer::shared_weight)
        .def(
            "shared_slot",
            [](const WaterfillBalancer& b, std::int64_t ep_rank) {
                return b.shared_slot(narrow(ep_rank, "ep_rank"));
            },
            py::arg("ep_rank"), "The id of a rank's shared slot: ep_rank * (S + 1) + S.")
        .def("exchange_size", &WaterfillBalancer::exchange_size, py::arg("is_decode") = false)
        .def(
            "exchange_buffer",
            [](const WaterfillBalancer& b, const py::handle& topk_ids,
               std::optional<std::int64_t> num_tokens, bool is_decode) {
                auto ids = strict_array<std::int32_t>(topk_ids, "topk_ids", 2);
                std::vector<std::int64_t> out(static_cast<std::size_t>(b.exchange_size(is_decode)));
                const Index tokens = tokens_or_rows(num_tokens, ids.shape(0));
                {
                    py::gil_scoped_release release;
                    b.exchange_buffer(const_matrix(ids), tokens, is_decode, out);
                }
                return int64_vector(out);
            },
            py::arg("topk_ids"), py::arg("num_tokens") = py::none(), py::arg("is_decode") = false)
        .def(
            "plan",
            [](const WaterfillBalancer& b, const py::handle& topk_ids,
               std::optional<std::int64_t> num_tokens, bool is_decode, const py::handle& reduced) {
                auto ids = strict_array<std::int32_t>(topk_ids, "topk_ids", 2);
                const std::vector<std::int64_t> r = reduced_buffer(reduced);
                const Index tokens = tokens_or_rows(num_tokens, ids.shape(0));
                py::gil_scoped_release release;
                return b.plan(const_matrix(ids), tokens, is_decode, r);
            },
            py::arg("topk_ids"), py::arg("num_tokens") = py::none(), py::arg("is_decode") = false,
            py::arg("reduced") = py::none())
        .def(
            "expand_reduced",
            [](const WaterfillBalancer& b, const py::handle& topk_ids,
               const py::handle& topk_weights, std::optional<std::int64_t> num_tokens,
               bool is_decode, const py::handle& reduced) {
                auto ids = strict_array<std::int32_t>(topk_ids, "topk_ids", 2);
                auto weights = strict_array<float>(topk_weights, "topk_weights", 2);
                const std::vector<std::int64_t> r = reduced_buffer(reduced);
                const Index N = ids.shape(0), K = ids.shape(1);
                auto out_ids = new_matrix<std::int32_t>(N, K + 1);
                auto out_weights = new_matrix<float>(N, K + 1);
                const Index tokens = tokens_or_rows(num_tokens, N);
                WaterfillPlan plan;
                {
                    py::gil_scoped_release release;
                    plan = b.expand(const_matrix(ids), const_matrix(weights), tokens, is_decode, r,
                                    mutable_matrix(out_ids), mutable_matrix(out_weights));
                }
                return py::make_tuple(out_ids, out_weights, plan);
            },
            py::arg("topk_ids"), py::arg("topk_weights"), py::arg("num_tokens") = py::none(),
            py::arg("is_decode") = false, py::arg("reduced") = py::none(),
            "expand given the all-reduced exchange buffer (dynamic mode; None in static mode); "
            "returns (ids, weights, plan).");

    m.def(
        "waterfill_rank_loads",
        [](const py::list& batches, std::int64_t num_physical_experts, const std::string& mode,
           bool is_decode, const std::optional<std::vector<std::int64_t>>& num_tokens) {
            std::vector<py::array_t<std::int32_t>> arrays;
            std::vector<ConstMatrixMap<std::int32_t>> views;
            for (std::size_t w = 0; w < batches.size(); ++w) {
                const std::string name = "batches[" + std::to_string(w) + "]";
                arrays.push_back(strict_array<std::int32_t>(batches[w], name.c_str(), 2));
                views.push_back(const_matrix(arrays.back()));
            }
            std::vector<Index> tokens;
            if (num_tokens) tokens.assign(num_tokens->begin(), num_tokens->end());
            const WaterfillMode m = parse_waterfill_mode(mode);
            const int P = narrow(num_physical_experts, "num_physical_experts");
            WaterfillRankLoads loads;
            {
                py::gil_scoped_release release;
                loads = waterfill_rank_loads(views, P, m, is_decode, tokens);
            }
            py::dict out;
            out["routed"] = int64_vector(loads.routed);
            out["shared_local"] = int64_vector(loads.shared_local);
            out["shared_waterfill"] = int64_vector(loads.shared_waterfill);
            out["balancedness_local"] = loads.balancedness_local;
            out["balancedness_waterfill"] = loads.balancedness_waterfill;
            return out;
        },
        py::arg("batches"), py::arg("num_physical_experts"), py::arg("mode") = "static",
        py::arg("is_decode") = false, py::arg("num_tokens") = py::none());
}

}  // namespace moelb::bindings
