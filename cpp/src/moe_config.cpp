// The DeepSeek MoE layer's configuration (DESIGN section 6; reference/moe_layer.md section 1):
// the routed-kernel names, DeepSeekMoEConfig's derived settings, validation and model presets,
// and seeded random weights of a config's shapes.
#include <cmath>
#include <cstdint>
#include <random>
#include <utility>
#include <vector>

#include "enum_names.hpp"
#include "moelb/errors.hpp"
#include "moelb/moe_layer.hpp"

namespace moelb {
namespace {

constexpr detail::EnumNames<RoutedKernel, 2> kKernelNames{{
    {"inplace", RoutedKernel::kInplace},
    {"out_of_place", RoutedKernel::kOutOfPlace},
}};

}  // namespace

RoutedKernel parse_routed_kernel(std::string_view name, std::string_view param) {
    return detail::parse_enum(kKernelNames, name, param, "a routed kernel");
}

std::string_view to_string(RoutedKernel kernel) { return detail::enum_name(kKernelNames, kernel); }

// ---------------------------------------------------------------------------------------------
// Config

bool DeepSeekMoEConfig::defers_shared() const {
    if (num_shared_experts == 0 || fuse_shared_experts) return false;
    switch (defer_shared) {
        case DeferShared::kYes:
            return true;
        case DeferShared::kNo:
            return false;
        case DeferShared::kAuto:
            break;
    }
    return kernel == RoutedKernel::kOutOfPlace;
}

TopKConfig DeepSeekMoEConfig::topk_config() const {
    TopKConfig c;
    c.top_k = top_k;
    c.scoring = scoring;
    c.num_groups = num_groups;
    c.topk_group = topk_group;
    c.renormalize = renormalize;
    c.routed_scaling_factor = routed_scaling_factor;
    c.apply_routed_scaling_factor_on_output = false;  // the layer multiplies the routed sum
    c.num_fused_shared_experts = num_fused_shared();
    return c;
}

void DeepSeekMoEConfig::validate() const {
    MOELB_CHECK_ARG(hidden_size >= 1, "hidden_size must be positive, got " << hidden_size);
    MOELB_CHECK_ARG(intermediate_size >= 1,
                    "intermediate_size must be positive, got " << intermediate_size);
    MOELB_CHECK_ARG(num_experts >= 1, "num_experts must be positive, got " << num_experts);
    MOELB_CHECK_ARG(top_k >= 1 && top_k <= num_experts,
                    "top_k=" << top_k << " must be in [1, num_experts=" << num_experts << "]");
    MOELB_CHECK_ARG(num_shared_experts >= 0,
                    "num_shared_experts must be non-negative, got " << num_shared_experts);
    MOELB_CHECK_ARG(!fuse_shared_experts || num_shared_experts == 1,
                    "fuse_shared_experts needs num_shared_experts=1, got " << num_shared_experts);
    MOELB_CHECK_ARG(!fuse_shared_experts || renormalize,
                    "fuse_shared_experts needs renormalize=True (the fused shared weight is 1/rsf "
                    "only after renormalisation)");
    MOELB_CHECK_ARG(
        std::isfinite(routed_scaling_factor) && routed_scaling_factor > 0,
        "routed_scaling_factor must be positive and finite, got " << routed_scaling_factor);
    MOELB_CHECK_ARG(std::isfinite(swiglu_limit) && swiglu_limit >= 0,
                    "swiglu_limit must be finite and >= 0 (0: no clamp), got " << swiglu_limit);
    MOELB_CHECK_ARG(std::isfinite(shared_swiglu_limit),
                    "shared_swiglu_limit must be finite, got " << shared_swiglu_limit);
    MOELB_CHECK_ARG(num_hash_layers >= 0,
                    "num_hash_layers must be non-negative, got " << num_hash_layers);
    MOELB_CHECK_ARG(layer_id >= 0, "layer_id must be non-negative, got " << layer_id);
    MOELB_CHECK_ARG(!is_hash_layer() || vocab_size >= 1,
                    "layer " << layer_id << " is a hash layer (num_hash_layers=" << num_hash_layers
                             << ") and needs vocab_size >= 1, got " << vocab_size);
    MOELB_CHECK_ARG(!(defer_shared == DeferShared::kYes && kernel == RoutedKernel::kInplace),
                    "defer_shared=True needs an out-of-place routed kernel: the in-place kernel "
                    "overwrites the shared expert's input");
    MOELB_CHECK_ARG(weight_block_size.rows >= 1 && weight_block_size.cols >= 1,
                    "weight_block_size must be positive, got (" << weight_block_size.rows << ", "
                                                                << weight_block_size.cols << ")");
    if (weight_format == WeightFormat::kFp8E4M3) {
        // w13 concatenates the gate and up projections along rows, and with them their scale
        // grids: a scale block may not straddle the two.
        MOELB_CHECK_ARG(intermediate_size % weight_block_size.rows == 0,
                        "weight_format='fp8_e4m3' stores w13 as the gate and up projections "
                        "concatenated, which needs intermediate_size to be a multiple of "
                        "weight_block_size[0]; got intermediate_size="
                            << intermediate_size
                            << " and weight_block_size[0]=" << weight_block_size.rows);
        // Implied by the check above (Is = I * n_shared), checked for the shared expert's sake.
        MOELB_CHECK_ARG(
            shared_intermediate_size() % weight_block_size.rows == 0,
            "weight_format='fp8_e4m3' needs the shared expert's intermediate size "
                << shared_intermediate_size()
                << " to be a multiple of weight_block_size[0]=" << weight_block_size.rows);
    }
    if (!is_hash_layer()) topk_config().validate_for(num_experts);
}

DeepSeekMoEConfig DeepSeekMoEConfig::deepseek_v3(int layer_id) {
    DeepSeekMoEConfig c;
    c.hidden_size = 7168;
    c.intermediate_size = 2048;
    c.num_experts = 256;
    c.top_k = 8;
    c.num_shared_experts = 1;
    c.scoring = Scoring::kSigmoid;
    c.num_groups = 8;
    c.topk_group = 4;
    c.renormalize = true;
    c.routed_scaling_factor = 2.5f;
    c.layer_id = layer_id;
    return c;
}

DeepSeekMoEConfig DeepSeekMoEConfig::deepseek_v4_flash(int layer_id) {
    DeepSeekMoEConfig c;
    c.hidden_size = 4096;
    c.intermediate_size = 2048;
    c.num_experts = 256;
    c.top_k = 6;
    c.num_shared_experts = 1;
    c.scoring = Scoring::kSqrtSoftplus;
    c.renormalize = true;
    c.routed_scaling_factor = 1.5f;
    c.num_hash_layers = 3;
    c.layer_id = layer_id;
    c.vocab_size = 129280;
    c.swiglu_limit = 10.0f;
    return c;
}

DeepSeekMoEConfig DeepSeekMoEConfig::deepseek_v4_pro(int layer_id) {
    DeepSeekMoEConfig c = deepseek_v4_flash(layer_id);
    c.hidden_size = 7168;
    c.intermediate_size = 3072;
    c.num_experts = 384;
    c.routed_scaling_factor = 2.5f;
    return c;
}

// ---------------------------------------------------------------------------------------------
// Weights

DeepSeekMoEWeights DeepSeekMoEWeights::random(const DeepSeekMoEConfig& config, std::uint64_t seed) {
    config.validate();
    const Index H = config.hidden_size, I = config.intermediate_size, E = config.num_experts;
    const Index Is = config.shared_intermediate_size();
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    const auto fill = [&](float* data, Index n, float scale) {
        for (Index i = 0; i < n; ++i) data[i] = normal(rng) * scale;
    };
    const float in_scale = 1.0f / std::sqrt(static_cast<float>(H));
    DeepSeekMoEWeights w;
    w.gate.resize(E, H);
    fill(w.gate.data(), w.gate.size(), in_scale);
    if (!config.is_hash_layer()) {
        w.correction_bias.resize(static_cast<std::size_t>(E));
        fill(w.correction_bias.data(), E, 0.05f);
    }
    // Drawn in float32 (in the same order for every format), then quantised.
    const auto draw = [&](const char* name, Index rows, Index cols, Index count, float scale) {
        std::vector<float> values(static_cast<std::size_t>(count * rows * cols));
        fill(values.data(), count * rows * cols, scale);
        return WeightTensor::quantize(values, config.weight_format, count, rows, cols,
                                      config.weight_block_size, name);
    };
    w.w13 = draw("w13", 2 * I, H, E, in_scale);
    w.w2 = draw("w2", H, I, E, 1.0f / std::sqrt(static_cast<float>(I)));
    if (Is > 0) {
        w.shared_gate_up = draw("shared_gate_up", 2 * Is, H, 1, in_scale);
        w.shared_down = draw("shared_down", H, Is, 1, 1.0f / std::sqrt(static_cast<float>(Is)));
    }
    if (config.is_hash_layer()) {
        // K distinct experts per token id.
        const int K = config.top_k;
        w.tid2eid.resize(config.vocab_size, K);
        std::vector<std::int32_t> experts(static_cast<std::size_t>(E));
        for (Index v = 0; v < config.vocab_size; ++v) {
            for (int k = 0; k < K; ++k) {
                std::uniform_int_distribution<Index> pick(k, E - 1);
                if (v == 0 && k == 0) {
                    for (Index e = 0; e < E; ++e) experts[e] = static_cast<std::int32_t>(e);
                }
                std::swap(experts[k], experts[pick(rng)]);
                w.tid2eid(v, k) = experts[k];
            }
        }
    }
    return w;
}

}  // namespace moelb
