#include <pybind11/stl.h>

#include <cmath>

#include "arrays.hpp"
#include "bindings.hpp"
#include "moelb/recorder.hpp"

namespace moelb::bindings {

namespace {

using Recorder = ExpertDistributionRecorder;

py::array_t<std::int32_t> new_3d(Index a, Index b, Index c) {
    return py::array_t<std::int32_t>(
        {static_cast<py::ssize_t>(a), static_cast<py::ssize_t>(b), static_cast<py::ssize_t>(c)});
}

// A NumPy array that takes over `data` (no copy); it frees the vector when collected.
template <class T>
py::array_t<T> owning_array(std::vector<T>&& data, std::vector<Index> shape) {
    auto* owned = new std::vector<T>(std::move(data));
    py::capsule free(owned, [](void* p) { delete static_cast<std::vector<T>*>(p); });
    std::vector<py::ssize_t> dims(shape.begin(), shape.end());
    return py::array_t<T>(std::move(dims), owned->data(), free);
}

}  // namespace

void bind_recorder(py::module_& m) {
    py::class_<Recorder>(m, "ExpertDistributionRecorder")
        .def(py::init([](const ExpertLocation& location, const std::string& mode,
                         std::int64_t buffer_size, std::int64_t ep_rank) {
                 return std::make_unique<Recorder>(location, parse_recorder_mode(mode), buffer_size,
                                                   narrow(ep_rank, "ep_rank"));
             }),
             py::arg("location"), py::arg("mode") = "stat", py::arg("buffer_size") = 1000,
             py::arg("ep_rank") = 0)
        .def_property_readonly("mode",
                               [](const Recorder& r) { return std::string(to_string(r.mode())); })
        .def_property_readonly("buffer_size", &Recorder::buffer_size)
        .def_property_readonly("ep_rank", &Recorder::ep_rank)
        .def_property_readonly("num_layers", &Recorder::num_layers)
        .def_property_readonly("num_physical_experts", &Recorder::num_physical_experts)
        .def_property_readonly("location", [](const Recorder& r) { return *r.location(); })
        .def("set_location", &Recorder::set_location, py::arg("location"))
        .def("start", &Recorder::start)
        .def("stop", &Recorder::stop)
        .def_property_readonly("recording", &Recorder::recording)
        .def("begin_forward_pass", &Recorder::begin_forward_pass,
             py::arg("forward_pass_id") = py::none())
        .def("end_forward_pass", &Recorder::end_forward_pass)
        .def("abandon_forward_pass", &Recorder::abandon_forward_pass)
        .def(
            "begin_layer",
            [](Recorder& r, std::int64_t layer) { r.begin_layer(narrow(layer, "layer")); },
            py::arg("layer"))
        .def("end_layer", &Recorder::end_layer)
        .def_property_readonly("current_layer", &Recorder::current_layer)
        .def(
            "on_select_experts",
            [](Recorder& r, const py::handle& topk_ids, std::optional<std::int64_t> layer) {
                auto ids = strict_array<std::int32_t>(topk_ids, "topk_ids", 2);
                const std::optional<int> expected = narrow(layer, "layer");
                py::gil_scoped_release release;
                r.on_select_experts(const_matrix(ids), expected);
            },
            py::arg("topk_ids"), py::arg("layer") = py::none())
        .def(
            "on_dispatch_counts",
            [](Recorder& r, const py::handle& local_counts, std::int64_t ep_rank,
               std::int64_t num_trailing_shared_slots) {
                auto counts = config_array<std::int64_t>(local_counts, "local_counts", 1);
                const int rank = narrow(ep_rank, "ep_rank");
                const int trailing = narrow(num_trailing_shared_slots, "num_trailing_shared_slots");
                py::gil_scoped_release release;
                r.on_dispatch_counts({counts.data(), static_cast<std::size_t>(counts.size())}, rank,
                                     trailing);
            },
            py::arg("local_counts"), py::arg("ep_rank"), py::arg("num_trailing_shared_slots") = 0)
        .def(
            "check_id_space",
            [](const Recorder& r, const ExpertLocation* location, std::int64_t num_experts) {
                r.check_id_space(location, narrow(num_experts, "num_experts"));
            },
            py::arg("location"), py::arg("num_experts"),
            "Raises InvalidArgumentError (naming location) unless ids routed with `location` "
            "(None: logical ids of num_experts experts) are slots of the recorder's placement.")
        .def_property_readonly("num_passes", &Recorder::num_passes)
        .def("logical_count",
             [](const Recorder& r) {
                 std::vector<std::int32_t> data;
                 {
                     py::gil_scoped_release release;
                     data = r.logical_count();
                 }
                 const auto loc = r.location();
                 const Index L = loc->num_layers(), E = loc->num_logical_experts();
                 auto out =
                     new_3d(static_cast<Index>(data.size()) / std::max<Index>(L * E, 1), L, E);
                 std::copy(data.begin(), data.end(), out.mutable_data());
                 return out;
             })
        .def("physical_count",
             [](const Recorder& r) {
                 const Index L = r.num_layers(), P = r.num_physical_experts();
                 std::vector<std::int32_t> data;
                 {
                     py::gil_scoped_release release;
                     data = r.physical_count();
                 }
                 const Index T = static_cast<Index>(data.size()) / std::max<Index>(L * P, 1);
                 return owning_array(std::move(data), {T, L, P});
             })
        .def("forward_pass_ids",
             [](const Recorder& r) {
                 auto ids = r.forward_pass_ids();
                 const auto n = static_cast<Index>(ids.size());
                 return owning_array(std::move(ids), {n});
             })
        .def(
            "pass_placements",
            [](const Recorder& r) {
                const auto passes = r.passes();
                const auto current = r.location();
                std::vector<std::shared_ptr<const ExpertLocation>> distinct;
                py::array_t<std::int64_t> index(static_cast<py::ssize_t>(passes.size()));
                auto* out = index.mutable_data();
                for (std::size_t t = 0; t < passes.size(); ++t) {
                    const auto& loc = passes[t].location;
                    std::int64_t found = -1;
                    if (loc == current || *loc == *current) {
                        out[t] = -1;
                        continue;
                    }
                    for (std::size_t j = 0; j < distinct.size(); ++j) {
                        if (distinct[j] == loc || *distinct[j] == *loc) {
                            found = static_cast<std::int64_t>(j);
                            break;
                        }
                    }
                    if (found < 0) {
                        found = static_cast<std::int64_t>(distinct.size());
                        distinct.push_back(loc);
                    }
                    out[t] = found;
                }
                py::list maps;
                for (const auto& loc : distinct) {
                    const auto& m = loc->physical_to_logical();
                    auto a = new_matrix<std::int32_t>(m.rows(), m.cols());
                    std::int32_t* dst = a.mutable_data();
                    for (Index l = 0; l < m.rows(); ++l)
                        for (Index p = 0; p < m.cols(); ++p) *dst++ = m(l, p);
                    maps.append(a);
                }
                return py::make_tuple(index, maps);
            },
            "(index int64 [T], maps): the placement each pass of the window was recorded with: "
            "-1 for the current one, else an index into maps (distinct earlier placements, "
            "[L, P] int32 physical_to_logical each, in order of first use).")
        .def("num_passes_with_other_placement", &Recorder::num_passes_with_other_placement,
             "Passes of the window recorded with another placement than the current one.")
        .def("pass_balancedness",
             [](const Recorder& r) {
                 std::vector<double> b;
                 for (const auto& p : r.passes()) b.push_back(p.balancedness);
                 return py::array_t<double>(static_cast<py::ssize_t>(b.size()), b.data());
             })
        .def(
            "token_ids",
            [](const Recorder& r, std::int64_t pass_index, std::int64_t layer) {
                MOELB_CHECK_ARG(r.mode() == RecorderMode::kPerToken,
                                "token_ids needs mode='per_token', the recorder has mode='"
                                    << to_string(r.mode()) << "'");
                const auto pass = r.pass_at(pass_index);  // one pass, not all of them
                MOELB_CHECK_ARG(
                    layer >= 0 && layer < r.num_layers(),
                    "layer=" << layer << " is outside [0, num_layers=" << r.num_layers() << ")");
                const auto& ids = pass.token_ids[static_cast<std::size_t>(layer)];
                const Index k = pass.token_top_k[static_cast<std::size_t>(layer)];
                auto out = new_matrix<std::int32_t>(k ? static_cast<Index>(ids.size()) / k : 0, k);
                std::copy(ids.begin(), ids.end(), out.mutable_data());
                return out;
            },
            py::arg("pass_index"), py::arg("layer"),
            "per_token mode: [tokens, top_k] int32 routed ids offered in that pass and layer.")
        .def(
            "average_balancedness",
            [](const Recorder& r, std::int64_t window) -> py::object {
                const double v = r.average_balancedness(narrow(window, "window"));
                return std::isnan(v) ? py::none() : py::object(py::float_(v));
            },
            py::arg("window"))
        .def(
            "packed_token_ids",
            [](const Recorder& r) {
                std::vector<std::int32_t> data;
                {
                    py::gil_scoped_release release;
                    data = r.packed_token_ids();
                }
                return py::array_t<std::int32_t>(static_cast<py::ssize_t>(data.size()),
                                                 data.data());
            },
            "int32 [2 * T * L + ids]: the window's per-token ids packed for a collective: top_k "
            "[T * L], number of ids [T * L] (pass-major), then the ids (per_token mode; zero "
            "headers otherwise).")
        .def(
            "merge_summed_counts",
            [](Recorder& r, const py::handle& summed, const py::list& others) {
                py::array a = as_array(summed, "summed");
                const bool wide = a && a.dtype().is(py::dtype::of<std::int64_t>());
                std::vector<py::array_t<std::int32_t>> packs;
                std::vector<std::span<const std::int32_t>> spans;
                for (std::size_t i = 0; i < others.size(); ++i) {
                    const std::string name = "others[" + std::to_string(i) + "]";
                    packs.push_back(strict_array<std::int32_t>(others[i], name.c_str(), 1));
                    spans.emplace_back(packs.back().data(),
                                       static_cast<std::size_t>(packs.back().size()));
                }
                if (wide) {
                    auto s = strict_array<std::int64_t>(summed, "summed", 3);
                    py::gil_scoped_release release;
                    r.merge_summed_counts(
                        std::span<const std::int64_t>(s.data(), static_cast<std::size_t>(s.size())),
                        spans);
                } else {
                    auto s = strict_array<std::int32_t>(summed, "summed", 3);
                    py::gil_scoped_release release;
                    r.merge_summed_counts(
                        std::span<const std::int32_t>(s.data(), static_cast<std::size_t>(s.size())),
                        spans);
                }
            },
            py::arg("summed"), py::arg("others") = py::list(),
            "Sets each pass's counts to summed [T, L, P] (int32 or int64: every rank's counts "
            "summed pass by pass, this recorder's included) and appends the other ranks' "
            "packed_token_ids() (per_token), as merge() would; validates before changing "
            "anything.")
        .def("clear", &Recorder::clear)
        .def("merge", &Recorder::merge, py::arg("other"), py::call_guard<py::gil_scoped_release>());
}

}  // namespace moelb::bindings
