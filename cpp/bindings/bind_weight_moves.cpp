#include <pybind11/stl.h>

#include "arrays.hpp"
#include "bindings.hpp"
#include "moelb/weight_moves.hpp"

namespace moelb::bindings {

namespace {

py::array_t<std::int32_t> row_array(const std::vector<std::int32_t>& row) {
    py::array_t<std::int32_t> out(static_cast<py::ssize_t>(row.size()), row.data());
    out.attr("setflags")(py::arg("write") = false);
    return out;
}

}  // namespace

void bind_weight_moves(py::module_& m) {
    py::class_<WeightMovePlan>(m, "WeightMovePlan", R"doc(
The weight moves of one layer from an old placement to a new one, per EP rank.

ops(ep_rank) lists (kind, expert, src_slot, dst_slot, peer) in execution order. Every rank runs:
(1) 'copy' and 'send' read the OLD contents of src_slot; (2) 'recv' writes the expert received
from peer into dst_slot; (3) 'copy' writes what it read into dst_slot; (4) 'fanout' copies the
NEW contents of src_slot into dst_slot. Sends and receives are sorted by (expert, peer), so both
ends of every transfer issue them in the same order.

The plan records what it moves from and to (old_physical_to_logical, new_physical_to_logical: the
layer's rows of both placements); the executors refuse weights that hold anything else.
)doc")
        .def_readonly("layer", &WeightMovePlan::layer)
        .def_readonly("ep_size", &WeightMovePlan::ep_size)
        .def_readonly("slots_per_rank", &WeightMovePlan::slots_per_rank)
        .def_readonly("local_copies", &WeightMovePlan::local_copies)
        .def_readonly("intra_node_transfers", &WeightMovePlan::intra_node_transfers)
        .def_readonly("inter_node_transfers", &WeightMovePlan::inter_node_transfers)
        .def_readonly("unchanged_slots", &WeightMovePlan::unchanged_slots)
        .def_property_readonly(
            "old_physical_to_logical",
            [](const WeightMovePlan& p) { return row_array(p.old_physical_to_logical); },
            "[ep_size * S] int32: the layer's slots in the placement the plan moves from.")
        .def_property_readonly(
            "new_physical_to_logical",
            [](const WeightMovePlan& p) { return row_array(p.new_physical_to_logical); },
            "[ep_size * S] int32: the layer's slots in the placement the plan moves to.")
        .def_property_readonly(
            "fingerprint", [](const WeightMovePlan& p) { return plan_fingerprint(p); },
            "A 64-bit digest of (layer, ep_size, S, both rows): equal on every process that "
            "planned the same transition.")
        .def(
            "check_source",
            [](const WeightMovePlan& p, const ExpertLocation& location,
               const std::string& parameter) {
                check_plan_placement(p, location, PlanEnd::kOld, parameter);
            },
            py::arg("location"), py::arg("parameter") = "location",
            "Raises InvalidArgumentError (naming `parameter`) unless location's layer `layer` is "
            "the placement the plan moves from.")
        .def(
            "check_target",
            [](const WeightMovePlan& p, const ExpertLocation& location,
               const std::string& parameter) {
                check_plan_placement(p, location, PlanEnd::kNew, parameter);
            },
            py::arg("location"), py::arg("parameter") = "location",
            "Raises InvalidArgumentError (naming `parameter`) unless location's layer `layer` is "
            "the placement the plan moves to.")
        .def_property_readonly(
            "transfers",
            [](const WeightMovePlan& p) { return p.intra_node_transfers + p.inter_node_transfers; })
        .def(
            "ops",
            [](const WeightMovePlan& p, std::int64_t ep_rank) {
                MOELB_CHECK_ARG(
                    ep_rank >= 0 && ep_rank < p.ep_size,
                    "ep_rank=" << ep_rank << " is outside [0, ep_size=" << p.ep_size << ")");
                py::list out;
                for (const MoveOp& op : p.ops[static_cast<std::size_t>(ep_rank)]) {
                    out.append(py::make_tuple(std::string(to_string(op.kind)), op.expert,
                                              op.src_slot, op.dst_slot, op.peer));
                }
                return out;
            },
            py::arg("ep_rank"))
        .def(
            "moved_bytes",
            [](const WeightMovePlan& p, std::int64_t expert_bytes) {
                const MovedBytes b = moved_bytes(p, expert_bytes);
                py::dict d;
                d["intra_node"] = b.intra_node;
                d["inter_node"] = b.inter_node;
                d["transferred"] = b.intra_node + b.inter_node;
                d["local"] = b.local;
                return d;
            },
            py::arg("expert_bytes"),
            "Bytes moved when one expert's weights take expert_bytes: {'intra_node', "
            "'inter_node', 'transferred' (their sum: over the network), 'local' (copies within "
            "ranks)}.")
        .def(
            "simulate",
            [](const WeightMovePlan& p, const py::handle& contents) {
                auto a = config_array<std::int64_t>(contents, "contents", 1);
                std::vector<std::int64_t> v(a.data(), a.data() + a.size());
                const std::vector<std::int64_t> out = simulate_weight_moves(p, v);
                return py::array_t<std::int64_t>(static_cast<py::ssize_t>(out.size()), out.data());
            },
            py::arg("contents"),
            "Runs the plan over all ranks on per-slot contents [ep_size * S] (e.g. expert ids).");

    m.def(
        "plan_weight_moves",
        [](const ExpertLocation& old_location, const ExpertLocation& new_location,
           std::int64_t layer) {
            const int l = narrow(layer, "layer");
            py::gil_scoped_release release;
            return plan_weight_moves(old_location, new_location, l);
        },
        py::arg("old"), py::arg("new"), py::arg("layer"));
}

}  // namespace moelb::bindings
