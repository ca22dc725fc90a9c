#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "arrays.hpp"
#include "bindings.hpp"
#include "moelb/moe_layer.hpp"
#include "weight_arrays.hpp"

namespace moelb::bindings {

namespace {

// The config crosses the boundary as a dict of the Python dataclass's fields (moelb.moe_layer).
template <class T>
T field(const py::dict& d, const char* key) {
    MOELB_CHECK_ARG(d.contains(key), "config has no field '" << key << "'");
    try {
        return d[key].cast<T>();
    } catch (const py::cast_error&) {
        throw InvalidArgument(std::string("config field '") + key + "' has the wrong type: " +
                              std::string(py::str(py::type::of(d[key]))) + " " +
                              std::string(py::repr(d[key])));
    }
}

DeepSeekMoEConfig config_from(const py::dict& d) {
    DeepSeekMoEConfig c;
    c.hidden_size = narrow(field<std::int64_t>(d, "hidden_size"), "hidden_size");
    c.intermediate_size = narrow(field<std::int64_t>(d, "intermediate_size"), "intermediate_size");
    c.num_experts = narrow(field<std::int64_t>(d, "num_experts"), "num_experts");
    c.top_k = narrow(field<std::int64_t>(d, "top_k"), "top_k");
    c.num_shared_experts =
        narrow(field<std::int64_t>(d, "num_shared_experts"), "num_shared_experts");
    c.fuse_shared_experts = field<bool>(d, "fuse_shared_experts");
    c.scoring = parse_scoring(field<std::string>(d, "scoring"));
    c.num_groups =
        narrow(field<std::optional<std::int64_t>>(d, "num_groups").value_or(0), "num_groups");
    c.topk_group =
        narrow(field<std::optional<std::int64_t>>(d, "topk_group").value_or(0), "topk_group");
    c.renormalize = field<bool>(d, "renormalize");
    c.routed_scaling_factor = field<float>(d, "routed_scaling_factor");
    c.num_hash_layers = narrow(field<std::int64_t>(d, "num_hash_layers"), "num_hash_layers");
    c.layer_id = narrow(field<std::int64_t>(d, "layer_id"), "layer_id");
    c.vocab_size = narrow(field<std::int64_t>(d, "vocab_size"), "vocab_size");
    c.swiglu_limit = field<std::optional<float>>(d, "swiglu_limit").value_or(0.0f);
    const auto shared_limit = field<std::optional<float>>(d, "shared_swiglu_limit");
    c.shared_swiglu_limit = shared_limit ? *shared_limit : -1.0f;
    MOELB_CHECK_ARG(!shared_limit || *shared_limit >= 0,
                    "shared_swiglu_limit must be >= 0 (0: no clamp) or None (as swiglu_limit), got "
                        << *shared_limit);
    c.kernel = parse_routed_kernel(field<std::string>(d, "kernel"));
    const py::object defer = d["defer_shared"];
    if (py::isinstance<py::bool_>(defer)) {
        c.defer_shared = defer.cast<bool>() ? DeferShared::kYes : DeferShared::kNo;
    } else {
        MOELB_CHECK_ARG(
            py::isinstance<py::str>(defer) && defer.cast<std::string>() == "auto",
            "defer_shared must be 'auto', True or False, got " << std::string(py::repr(defer)));
        c.defer_shared = DeferShared::kAuto;
    }
    c.weight_format = parse_weight_format(field<std::string>(d, "weight_format"));
    const auto block = field<std::vector<std::int64_t>>(d, "weight_block_size");
    MOELB_CHECK_ARG(block.size() == 2,
                    "weight_block_size must be (rows, cols), got " << block.size() << " values");
    c.weight_block_size = {narrow(block[0], "weight_block_size[0]"),
                           narrow(block[1], "weight_block_size[1]")};
    c.activation_dtype = parse_activation_dtype(field<std::string>(d, "activation_dtype"));
    return c;
}

py::dict config_to_dict(const DeepSeekMoEConfig& c) {
    py::dict d;
    d["hidden_size"] = c.hidden_size;
    d["intermediate_size"] = c.intermediate_size;
    d["num_experts"] = c.num_experts;
    d["top_k"] = c.top_k;
    d["num_shared_experts"] = c.num_shared_experts;
    d["fuse_shared_experts"] = c.fuse_shared_experts;
    d["scoring"] = std::string(to_string(c.scoring));
    d["num_groups"] = c.num_groups > 0 ? py::object(py::int_(c.num_groups)) : py::none();
    d["topk_group"] = c.num_groups > 0 ? py::object(py::int_(c.topk_group)) : py::none();
    d["renormalize"] = c.renormalize;
    d["routed_scaling_factor"] = c.routed_scaling_factor;
    d["num_hash_layers"] = c.num_hash_layers;
    d["layer_id"] = c.layer_id;
    d["vocab_size"] = c.vocab_size;
    d["swiglu_limit"] = c.swiglu_limit > 0 ? py::object(py::float_(c.swiglu_limit)) : py::none();
    d["shared_swiglu_limit"] =
        c.shared_swiglu_limit >= 0 ? py::object(py::float_(c.shared_swiglu_limit)) : py::none();
    d["kernel"] = std::string(to_string(c.kernel));
    d["defer_shared"] = c.defer_shared == DeferShared::kAuto
                            ? py::object(py::str("auto"))
                            : py::object(py::bool_(c.defer_shared == DeferShared::kYes));
    d["weight_format"] = std::string(to_string(c.weight_format));
    d["weight_block_size"] = py::make_tuple(c.weight_block_size.rows, c.weight_block_size.cols);
    d["activation_dtype"] = std::string(to_string(c.activation_dtype));
    return d;
}

template <class T>
RowMatrix<T> matrix_arg(const py::handle& obj, const char* name) {
    auto a = config_array<T>(obj, name, 2);
    return const_matrix(a);
}

// d[name]: a stored tensor's matrices as an array of `shape` (a copy); d[name + "_scale_inv"]:
// its scales (fp8: `shape`'s leading dimensions + the scale grid; int8: + rows) or None.
void put_tensor(py::dict& d, const std::string& name, const WeightTensor& t,
                const std::vector<py::ssize_t>& shape) {
    d[py::str(name)] = stored_copy(t.format(), t.bytes().data(), shape);
    const py::str scale_name(name + "_scale_inv");
    if (!has_scales(t.format())) {
        d[scale_name] = py::none();
        return;
    }
    std::vector<py::ssize_t> scale_shape(shape.begin(), shape.end() - 2);
    scale_shape.push_back(t.scale_rows());
    if (t.format() == WeightFormat::kFp8E4M3) scale_shape.push_back(t.scale_cols());
    py::array_t<float> s(scale_shape);
    std::memcpy(s.mutable_data(), t.scale_inv().data(), t.scale_inv().size() * sizeof(float));
    d[scale_name] = s;
}

py::dict weights_to_dict(const DeepSeekMoEWeights& w, const DeepSeekMoEConfig& c) {
    const py::ssize_t E = c.num_experts, H = c.hidden_size, I = c.intermediate_size;
    const py::ssize_t Is = c.shared_intermediate_size();
    py::dict d;
    d["gate"] = py::array_t<float>({E, H}, w.gate.data());
    d["correction_bias"] = w.correction_bias.empty()
                               ? py::object(py::none())
                               : py::object(py::array_t<float>(E, w.correction_bias.data()));
    put_tensor(d, "w13", w.w13, {E, 2 * I, H});
    put_tensor(d, "w2", w.w2, {E, H, I});
    if (!w.shared_gate_up.empty()) {
        put_tensor(d, "shared_gate_up", w.shared_gate_up, {2 * Is, H});
        put_tensor(d, "shared_down", w.shared_down, {H, Is});
    } else {
        for (const char* name : {"shared_gate_up", "shared_down", "shared_gate_up_scale_inv",
                                 "shared_down_scale_inv"}) {
            d[name] = py::none();
        }
    }
    d["tid2eid"] =
        w.tid2eid.size() > 0
            ? py::object(py::array_t<std::int32_t>({static_cast<py::ssize_t>(w.tid2eid.rows()),
                                                    static_cast<py::ssize_t>(w.tid2eid.cols())},
                                                   w.tid2eid.data()))
            : py::object(py::none());
    return d;
}

// The arrays of moelb.moe_layer.WEIGHT_NAMES, in that order.
struct WeightArgs {
    py::handle gate, bias, w13, w2, shared_gate_up, shared_down, tid2eid;
    py::handle w13_scale, w2_scale, shared_gate_up_scale, shared_down_scale;
};

DeepSeekMoEWeights weights_from(const DeepSeekMoEConfig& c, const WeightArgs& a) {
    const Index E = c.num_experts, H = c.hidden_size, I = c.intermediate_size;
    const Index Is = c.shared_intermediate_size();
    const WeightFormat format = c.weight_format;
    const BlockSize block = c.weight_block_size;
    DeepSeekMoEWeights w;
    w.gate = matrix_arg<float>(a.gate, "gate");
    if (!a.bias.is_none()) {
        auto bias = config_array<float>(a.bias, "correction_bias", 1);
        MOELB_CHECK_ARG(bias.shape(0) == E, "correction_bias has shape " << shape_string(bias)
                                                                         << ", expected (" << E
                                                                         << ",)");
        w.correction_bias.assign(bias.data(), bias.data() + E);
    }
    w.w13 = weight_tensor_arg(a.w13, a.w13_scale, "w13", format, block, {E, 2 * I, H});
    w.w2 = weight_tensor_arg(a.w2, a.w2_scale, "w2", format, block, {E, H, I});
    MOELB_CHECK_ARG(
        Is == 0 || (!a.shared_gate_up.is_none() && !a.shared_down.is_none()),
        "num_shared_experts=" << c.num_shared_experts << " needs shared_gate_up and shared_down");
    for (const auto& [arg, name] : {std::pair{&a.shared_gate_up, "shared_gate_up"},
                                    {&a.shared_down, "shared_down"},
                                    {&a.shared_gate_up_scale, "shared_gate_up_scale_inv"},
                                    {&a.shared_down_scale, "shared_down_scale_inv"}}) {
        MOELB_CHECK_ARG(Is > 0 || arg->is_none(),
                        name << " was given but num_shared_experts=" << c.num_shared_experts
                             << " (the layer has no shared expert): pass None or set "
                                "num_shared_experts");
    }
    if (Is > 0) {
        w.shared_gate_up = weight_tensor_arg(a.shared_gate_up, a.shared_gate_up_scale,
                                             "shared_gate_up", format, block, {2 * Is, H});
        w.shared_down = weight_tensor_arg(a.shared_down, a.shared_down_scale, "shared_down", format,
                                          block, {H, Is});
    }
    if (!a.tid2eid.is_none()) w.tid2eid = matrix_arg<std::int32_t>(a.tid2eid, "tid2eid");
    MOELB_CHECK_ARG(!c.is_hash_layer() || !a.tid2eid.is_none(),
                    "layer " << c.layer_id << " is a hash layer and needs tid2eid");
    return w;
}

// hidden as the config's activation dtype: float32, or ml_dtypes.bfloat16 (bits read as uint16);
// C-contiguous and 2-D, never copied.
py::array hidden_arg(const py::handle& obj, ActivationDType dtype) {
    if (dtype == ActivationDType::kFloat32) return strict_array<float>(obj, "hidden", 2);
    py::array a;
    if (is_torch_tensor(obj) && std::string(py::str(obj.attr("dtype"))) == "torch.bfloat16" &&
        std::string(py::str(obj.attr("device").attr("type"))) == "cpu") {
        // NumPy cannot hold a torch bf16 tensor: its bits as int16, viewed as ml_dtypes'
        // bfloat16 (the tensor's memory, not a copy).
        py::object bits =
            obj.attr("detach")().attr("view")(py::module_::import("torch").attr("int16"));
        a = py::array::ensure(
            bits.attr("numpy")().attr("view")(stored_dtype(WeightFormat::kBFloat16)));
    } else {
        a = as_array(obj, "hidden", "bfloat16");
    }
    MOELB_CHECK_ARG(a, "hidden must be an array, got " << std::string(py::str(py::type::of(obj))));
    if (dtype_name(a.dtype()) != "bfloat16" || a.dtype().itemsize() != 2) {
        throw InvalidDType(
            "hidden must have dtype bfloat16 (ml_dtypes.bfloat16) for "
            "activation_dtype='bfloat16', got " +
            dtype_name(a.dtype()));
    }
    MOELB_CHECK_ARG(a.ndim() == 2, "hidden must be 2-D, got shape " << shape_string(a));
    MOELB_CHECK_ARG(a.flags() & py::array::c_style,
                    "hidden must be C-contiguous (row-major); pass np.ascontiguousarray(hidden)");
    return a;
}

}  // namespace

void bind_moe_layer(py::module_& m) {
    m.def(
        "moe_config_preset",
        [](const std::string& name, std::int64_t layer_id) {
            const int l = narrow(layer_id, "layer_id");
            if (name == "deepseek_v3") return config_to_dict(DeepSeekMoEConfig::deepseek_v3(l));
            if (name == "deepseek_v4_flash") {
                return config_to_dict(DeepSeekMoEConfig::deepseek_v4_flash(l));
            }
            MOELB_CHECK_ARG(name == "deepseek_v4_pro",
                            "preset='" << name << "' is not a DeepSeek MoE preset");
            return config_to_dict(DeepSeekMoEConfig::deepseek_v4_pro(l));
        },
        py::arg("name"), py::arg("layer_id"));
    m.def(
        "moe_config_validate", [](const py::dict& d) { config_from(d).validate(); },
        py::arg("config"));
    m.def(
        "moe_random_weights",
        [](const py::dict& d, std::uint64_t seed) {
            const DeepSeekMoEConfig c = config_from(d);
            DeepSeekMoEWeights w;
            {
                py::gil_scoped_release release;
                w = DeepSeekMoEWeights::random(c, seed);
            }
            return weights_to_dict(w, c);
        },
        py::arg("config"), py::arg("seed"));
    m.def("moe_gemm_scratch_bytes", &DeepSeekMoE::gemm_scratch_bytes, py::arg("rows"),
          py::arg("k"));
    m.def(
        "moe_expected_peak_bytes",
        [](const py::dict& d, std::int64_t num_tokens, std::int64_t num_physical_experts,
           std::int64_t routed_lanes, std::int64_t shared_lanes, std::int64_t gate_lanes) {
            const DeepSeekMoEConfig c = config_from(d);
            c.validate();
            MOELB_CHECK_ARG(num_tokens >= 0, "num_tokens must be non-negative, got " << num_tokens);
            return DeepSeekMoE::expected_peak_bytes(
                c, num_tokens, narrow(num_physical_experts, "num_physical_experts"),
                narrow(routed_lanes, "routed_lanes"), narrow(shared_lanes, "shared_lanes"),
                narrow(gate_lanes, "gate_lanes"));
        },
        py::arg("config"), py::arg("num_tokens"), py::arg("num_physical_experts"),
        py::arg("routed_lanes"), py::arg("shared_lanes"), py::arg("gate_lanes"));

    py::class_<DeepSeekMoE>(m, "DeepSeekMoE", R"doc(
The DeepSeek MoE layer forward on CPU. Use moelb.DeepSeekMoE.
)doc")
        .def(py::init(
                 [](const py::dict& config, const py::handle& gate,
                    const py::handle& correction_bias, const py::handle& w13, const py::handle& w2,
                    const py::handle& shared_gate_up, const py::handle& shared_down,
                    const py::handle& tid2eid, const py::handle& w13_scale_inv,
                    const py::handle& w2_scale_inv, const py::handle& shared_gate_up_scale_inv,
                    const py::handle& shared_down_scale_inv, std::optional<ExpertLocation> location,
                    std::int64_t layer, std::int64_t ep_rank) {
                     const DeepSeekMoEConfig c = config_from(config);
                     c.validate();
                     DeepSeekMoEWeights w =
                         weights_from(c, {gate, correction_bias, w13, w2, shared_gate_up,
                                          shared_down, tid2eid, w13_scale_inv, w2_scale_inv,
                                          shared_gate_up_scale_inv, shared_down_scale_inv});
                     py::gil_scoped_release release;
                     return DeepSeekMoE(c, w, std::move(location), narrow(layer, "layer"),
                                        narrow(ep_rank, "ep_rank"));
                 }),
             py::arg("config"), py::arg("gate"), py::arg("correction_bias"), py::arg("w13"),
             py::arg("w2"), py::arg("shared_gate_up"), py::arg("shared_down"), py::arg("tid2eid"),
             py::arg("w13_scale_inv"), py::arg("w2_scale_inv"), py::arg("shared_gate_up_scale_inv"),
             py::arg("shared_down_scale_inv"), py::arg("location"), py::arg("layer"),
             py::arg("ep_rank"))
        .def_property_readonly("num_physical_experts", &DeepSeekMoE::num_physical_experts)
        .def_property_readonly("location", &DeepSeekMoE::location)
        .def_property_readonly("layer", &DeepSeekMoE::layer)
        .def("config_dict", [](const DeepSeekMoE& l) { return config_to_dict(l.config()); })
        .def(
            "forward",
            [](DeepSeekMoE& layer, const py::handle& hidden, const py::handle& input_ids) {
                const ActivationDType dtype = layer.config().activation_dtype;
                py::array x = hidden_arg(hidden, dtype);
                std::vector<std::int64_t> ids;
                if (!input_ids.is_none()) {
                    auto a = config_array<std::int64_t>(input_ids, "input_ids", 1);
                    ids.assign(a.data(), a.data() + a.size());
                }
                const Index T = x.shape(0), H = x.shape(1);
                const bool inplace = layer.config().kernel == RoutedKernel::kInplace;
                MOELB_CHECK_ARG(
                    !inplace || x.writeable(),
                    "the in-place routed kernel writes into hidden, which is read-only");
                // A write behind autograd's back would leave its gradients silently wrong.
                MOELB_CHECK_ARG(!inplace || !is_torch_tensor(hidden) ||
                                    !py::bool_(hidden.attr("requires_grad")),
                                "the in-place routed kernel writes into hidden, a tensor that "
                                "requires grad (autograd would not see the write); pass "
                                "hidden.detach() or use kernel='out_of_place'");
                py::array out = inplace ? x
                                        : py::array(x.dtype(), std::vector<py::ssize_t>{
                                                                   static_cast<py::ssize_t>(T),
                                                                   static_cast<py::ssize_t>(H)});
                void* in_data = inplace ? x.mutable_data() : const_cast<void*>(x.data());
                void* out_data = out.mutable_data();
                {
                    py::gil_scoped_release release;
                    if (dtype == ActivationDType::kFloat32) {
                        layer.forward(MatrixMap<float>(static_cast<float*>(in_data), T, H), ids,
                                      MatrixMap<float>(static_cast<float*>(out_data), T, H));
                    } else {
                        using Bits = std::uint16_t;
                        layer.forward(MatrixMap<Bits>(static_cast<Bits*>(in_data), T, H), ids,
                                      MatrixMap<Bits>(static_cast<Bits*>(out_data), T, H));
                    }
                }
                return out;
            },
            py::arg("hidden"), py::arg("input_ids") = py::none())
        .def("last_stats",
             [](const DeepSeekMoE& layer) {
                 const MoEForwardStats& s = layer.last_stats();
                 py::dict d;
                 d["peak_bytes"] = s.peak_bytes;
                 d["steps"] = s.steps;
                 d["deferred_shared"] = s.deferred_shared;
                 d["routed_lanes"] = s.routed_lanes;
                 d["shared_lanes"] = s.shared_lanes;
                 d["gate_lanes"] = s.gate_lanes;
                 return d;
             })
        .def(
            "routed_weights",
            [](py::object self) {
                auto& layer = self.cast<DeepSeekMoE&>();
                const DeepSeekMoEConfig& c = layer.config();
                const py::ssize_t P = layer.num_physical_experts(), H = c.hidden_size,
                                  I = c.intermediate_size;
                const WeightFormat format = c.weight_format;
                py::object s13 = py::none(), s2 = py::none();
                if (has_scales(format)) {
                    const WeightTensor& w13 = layer.w13();
                    const WeightTensor& w2 = layer.w2();
                    std::vector<py::ssize_t> g13{P, w13.scale_rows()}, g2{P, w2.scale_rows()};
                    if (format == WeightFormat::kFp8E4M3) {
                        g13.push_back(w13.scale_cols());
                        g2.push_back(w2.scale_cols());
                    }
                    s13 = float_view(layer.routed_w13_scale_inv().data(), g13, self);
                    s2 = float_view(layer.routed_w2_scale_inv().data(), g2, self);
                }
                return py::make_tuple(
                    stored_view(format, layer.routed_w13().data(), {P, 2 * I, H}, self, true),
                    stored_view(format, layer.routed_w2().data(), {P, H, I}, self, true), s13, s2);
            },
            "(w13 [P, 2I, H], w2 [P, H, I], w13_scale_inv, w2_scale_inv): writable views of the "
            "routed slots' weights in the stored dtype and their scales (None without).")
        .def(
            "fused_shared_weights",
            [](py::object self) -> py::object {
                const auto& layer = self.cast<const DeepSeekMoE&>();
                const DeepSeekMoEConfig& c = layer.config();
                if (!c.fuse_shared_experts) return py::none();
                const py::ssize_t H = c.hidden_size, I = c.intermediate_size;
                const Index P = layer.num_physical_experts();
                return py::make_tuple(
                    stored_view(c.weight_format, layer.w13().matrix(P), {2 * I, H}, self, false),
                    stored_view(c.weight_format, layer.w2().matrix(P), {H, I}, self, false));
            },
            "(gate_up [2I, H], down [H, I]) of the fused shared expert in the stored dtype "
            "(read-only), or None.")
        .def(
            "set_location",
            [](DeepSeekMoE& moe, ExpertLocation location, std::int64_t layer) {
                moe.set_location(std::move(location), narrow(layer, "layer"));
            },
            py::arg("location"), py::arg("layer"));
}

}  // namespace moelb::bindings
