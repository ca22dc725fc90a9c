#include "moelb/moe_layer.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <utility>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "enum_names.hpp"
#include "moelb/errors.hpp"
#include "moelb/parallel.hpp"

// =============================================================================================
// Memory model (the counterpart of reference/moe_layer.md section 13, for our own buffers).
//
// b = 4 bytes (float32 / int32), T tokens, H hidden, I expert intermediate, Is = I * n_shared, E
// routed experts, K top-k, F fused shared (0 / 1), K' = K + F, P physical slots, P' = P + F,
// M = kBlockRows. Workspace buffers of one forward:
//
//   L    router logits [T, E]                                   4 T E
//   TK   top-k ids + weights [T, K'], recorder ids [T, K]       4 T (2K' + K)
//   W_r  routed workspace                                       4 (T K' + 2 (P' + 1))    sort
//          pairs sorted by slot, slot offsets, block offsets  + 4 T K' H                  Y
//          Y: every (token, k) pair's expert output           + 4 lanes_r M (H + 2I)     scratch
//          per lane: gathered rows [M, H] (then the expert's
//          output, column-major), gate/up [M, 2I]
//   O    the output [T, H] (the caller's; counted from the routed step on, 0 when in-place)
//   S    shared output [T, H]                                   4 T H
//   P_sh shared step: S + per lane gate/up [M, 2 Is] and        4 T H + 4 lanes_s M (2 Is + H)
//        the block's output [M, H] (column-major)
//
// The input X is the caller's and is not counted. The logits are freed right after top-k (SGLang
// keeps them until the layer returns), TK and W_r after the routed combine.
//
// Deferred (out-of-place kernel: gate, top-k, routed, shared, combine):
//   Peak_new = max(L + TK,  TK + W_r + O,  O + P_sh)
// Not deferred (shared, gate, top-k, routed, combine; the only order for an in-place kernel):
//   Peak_old = max(P_sh,  S + L + TK,  S + TK + W_r + O)
// Without a separate shared expert (n_shared = 0, or fused): max(L + TK, TK + W_r + O).
//
// Saving Peak_old - Peak_new = S = 4 T H (one [T, H] buffer) whenever the routed step is the
// peak of both orders, i.e. TK + W_r >= P_sh - S + ... ; for DeepSeek shapes Y alone (4 T K' H)
// dwarfs P_sh, at any T. With lanes_r = min(threads, routed row blocks) and lanes_s = min(threads,
// ceil(T / M)) the peak depends on the thread count through the scratch only.
// =============================================================================================

namespace moelb {
namespace {

// Rows of one GEMM block: tokens of one expert (routed) or consecutive tokens (shared, gate).
constexpr Index kBlockRows = 128;
constexpr Index kCombineRows = 256;

constexpr detail::EnumNames<RoutedKernel, 2> kKernelNames{{
    {"inplace", RoutedKernel::kInplace},
    {"out_of_place", RoutedKernel::kOutOfPlace},
}};

using RowMap = Eigen::Map<RowMatrix<float>>;
using ConstRowMap = Eigen::Map<const RowMatrix<float>>;
using ColMap = Eigen::Map<Eigen::MatrixXf>;
using ConstColMap = Eigen::Map<const Eigen::MatrixXf>;

// One SwiGLU MLP over `rows` input rows: x [rows, H] (row-major) -> y_cm [rows, H], stored
// column-major, through gate_up [rows, 2 width] (scratch, column-major: the gate columns, then the
// up columns). w_gate_up [2 width, H], w_down [H, width], row-major; L = limit (0: no clamp).
//
// Column-major results put the weights on the right-hand side of both products, where Eigen packs
// a row-major weight matrix by copying contiguous rows; on the left-hand side it would transpose
// every expert's weights on every block (the forward's largest cost after the products).
void mlp_rows(const float* x, Index rows, Index H, Index width, const float* w_gate_up,
              const float* w_down, float limit, float* gate_up, float* y_cm) {
    ColMap gu(gate_up, rows, 2 * width);
    gu.noalias() = ConstRowMap(x, rows, H) * ConstRowMap(w_gate_up, 2 * width, H).transpose();
    // a = silu(min(g, L)) * clamp(u, -L, L), into the gate columns.
    Eigen::Map<Eigen::ArrayXf> gate(gate_up, rows * width);
    Eigen::Map<Eigen::ArrayXf> up(gate_up + rows * width, rows * width);
    if (limit > 0) {
        gate = gate.min(limit);
        up = up.max(-limit).min(limit);
    }
    gate = gate / (1.0f + (-gate).exp()) * up;
    ColMap(y_cm, rows, H).noalias() =
        ConstColMap(gate_up, rows, width) * ConstRowMap(w_down, H, width).transpose();
}

// Copies y_cm [rows, H] (column-major) row by row to dst_row(r) (H contiguous floats each), in
// tiles of 16 columns so that each tile's reads stay in cache.
template <class DstRow>
void store_rows(const float* y_cm, Index rows, Index H, DstRow dst_row) {
    constexpr Index kTile = 16;
    for (Index h0 = 0; h0 < H; h0 += kTile) {
        const Index width = std::min(kTile, H - h0);
        for (Index r = 0; r < rows; ++r) {
            float* dst = dst_row(r) + h0;
            const float* src = y_cm + h0 * rows + r;
            for (Index h = 0; h < width; ++h) dst[h] = src[h * rows];
        }
    }
}

void check_config_shape(const char* name, Index rows, Index cols, Index want_rows,
                        Index want_cols) {
    MOELB_CHECK_ARG(rows == want_rows && cols == want_cols,
                    name << " has shape [" << rows << ", " << cols << "], expected [" << want_rows
                         << ", " << want_cols << "]");
}

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
    w.w13.resize(static_cast<std::size_t>(E * 2 * I * H));
    fill(w.w13.data(), E * 2 * I * H, in_scale);
    w.w2.resize(static_cast<std::size_t>(E * H * I));
    fill(w.w2.data(), E * H * I, 1.0f / std::sqrt(static_cast<float>(I)));
    if (Is > 0) {
        w.shared_gate_up.resize(2 * Is, H);
        fill(w.shared_gate_up.data(), w.shared_gate_up.size(), in_scale);
        w.shared_down.resize(H, Is);
        fill(w.shared_down.data(), w.shared_down.size(), 1.0f / std::sqrt(static_cast<float>(Is)));
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

// ---------------------------------------------------------------------------------------------
// Workspace

template <class T>
Workspace::Buffer<T>::Buffer(Workspace* owner, Index count, std::string name)
    : owner_(owner), size_(count), name_(std::move(name)) {
    const std::size_t bytes = static_cast<std::size_t>(std::max<Index>(count, 1)) * sizeof(T);
    const std::size_t alignment = bytes >= kHugeBufferBytes ? kHugePageBytes : kAlignment;
    void* p = ::operator new[](bytes, std::align_val_t{alignment});
#ifdef MADV_HUGEPAGE
    if (alignment == kHugePageBytes) madvise(p, bytes, MADV_HUGEPAGE);  // a hint; may fail
#endif
    data_ = std::unique_ptr<T[], Free>(static_cast<T*>(p), Free{alignment});
    owner_->add(count * static_cast<Index>(sizeof(T)));
}

template <class T>
Workspace::Buffer<T>::Buffer(Buffer&& other) noexcept
    : owner_(std::exchange(other.owner_, nullptr)),
      data_(std::move(other.data_)),
      size_(std::exchange(other.size_, 0)),
      name_(std::move(other.name_)) {}

template <class T>
Workspace::Buffer<T>& Workspace::Buffer<T>::operator=(Buffer&& other) noexcept {
    if (this != &other) {
        release();
        owner_ = std::exchange(other.owner_, nullptr);
        data_ = std::move(other.data_);
        size_ = std::exchange(other.size_, 0);
        name_ = std::move(other.name_);
    }
    return *this;
}

template <class T>
void Workspace::Buffer<T>::release() {
    if (owner_) owner_->remove(size_ * static_cast<Index>(sizeof(T)));
    owner_ = nullptr;
    data_.reset();
    size_ = 0;
}

template class Workspace::Buffer<float>;
template class Workspace::Buffer<std::int32_t>;

// ---------------------------------------------------------------------------------------------
// Layer

DeepSeekMoE::DeepSeekMoE(DeepSeekMoEConfig config, const DeepSeekMoEWeights& weights,
                         std::optional<ExpertLocation> location, int location_layer, int ep_rank)
    : config_(std::move(config)),
      location_(location ? std::move(*location)
                         : ExpertLocation::trivial(1, config_.num_experts, config_.num_experts, 1)),
      location_layer_(location_layer),
      ep_rank_(ep_rank),
      num_physical_(0) {
    config_.validate();
    const Index H = config_.hidden_size, I = config_.intermediate_size, E = config_.num_experts;
    const Index Is = config_.shared_intermediate_size();
    MOELB_CHECK_ARG(location_.num_logical_experts() == E,
                    "location has " << location_.num_logical_experts()
                                    << " logical experts but num_experts=" << E);
    MOELB_CHECK_ARG(
        location_layer >= 0 && location_layer < location_.num_layers(),
        "location_layer=" << location_layer << " is outside [0, " << location_.num_layers() << ")");
    MOELB_CHECK_ARG(
        ep_rank >= 0 && ep_rank < location_.ep_size(),
        "ep_rank=" << ep_rank << " is outside [0, ep_size=" << location_.ep_size() << ")");
    num_physical_ = location_.num_physical_experts();

    check_config_shape("gate", weights.gate.rows(), weights.gate.cols(), E, H);
    if (config_.is_hash_layer()) {
        MOELB_CHECK_ARG(weights.correction_bias.empty(),
                        "correction_bias must be empty on a hash layer (the gate has none)");
        check_config_shape("tid2eid", weights.tid2eid.rows(), weights.tid2eid.cols(),
                           config_.vocab_size, config_.top_k);
        hash_router_.emplace(weights.tid2eid, config_.scoring, config_.routed_scaling_factor,
                             config_.num_fused_shared(), false, config_.num_experts);
    } else {
        MOELB_CHECK_ARG(weights.correction_bias.empty() ||
                            static_cast<Index>(weights.correction_bias.size()) == E,
                        "correction_bias has " << weights.correction_bias.size()
                                               << " values but num_experts=" << E);
    }
    MOELB_CHECK_ARG(static_cast<Index>(weights.w13.size()) == E * 2 * I * H,
                    "w13 has " << weights.w13.size() << " values, expected [num_experts=" << E
                               << ", 2 * intermediate_size=" << 2 * I << ", hidden_size=" << H
                               << "]");
    MOELB_CHECK_ARG(static_cast<Index>(weights.w2.size()) == E * H * I,
                    "w2 has " << weights.w2.size() << " values, expected [num_experts=" << E
                              << ", hidden_size=" << H << ", intermediate_size=" << I << "]");
    if (Is > 0) {
        check_config_shape("shared_gate_up", weights.shared_gate_up.rows(),
                           weights.shared_gate_up.cols(), 2 * Is, H);
        check_config_shape("shared_down", weights.shared_down.rows(), weights.shared_down.cols(), H,
                           Is);
    }

    gate_ = weights.gate;
    bias_ = weights.correction_bias;
    // Routed weights per physical slot; the fused shared expert after them.
    const std::size_t w13_row = w13_row_elements(), w2_row = w2_row_elements();
    const int F = config_.num_fused_shared();
    w13_.resize(w13_row * (num_physical_ + F));
    w2_.resize(w2_row * (num_physical_ + F));
    for (int p = 0; p < num_physical_; ++p) {
        const std::size_t e = location_.physical_to_logical()(location_layer_, p);
        std::memcpy(w13_.data() + p * w13_row, weights.w13.data() + e * w13_row,
                    w13_row * sizeof(float));
        std::memcpy(w2_.data() + p * w2_row, weights.w2.data() + e * w2_row,
                    w2_row * sizeof(float));
    }
    if (F == 1) {
        std::memcpy(w13_.data() + num_physical_ * w13_row, weights.shared_gate_up.data(),
                    w13_row * sizeof(float));
        std::memcpy(w2_.data() + num_physical_ * w2_row, weights.shared_down.data(),
                    w2_row * sizeof(float));
    } else if (Is > 0) {
        shared_gate_up_ = weights.shared_gate_up;
        shared_down_ = weights.shared_down;
    }
}

std::size_t DeepSeekMoE::w13_row_elements() const {
    return static_cast<std::size_t>(2) * config_.intermediate_size * config_.hidden_size;
}

std::size_t DeepSeekMoE::w2_row_elements() const {
    return static_cast<std::size_t>(config_.hidden_size) * config_.intermediate_size;
}

std::span<const float> DeepSeekMoE::fused_shared_w13() const {
    if (!config_.fuse_shared_experts) return {};
    return {w13_.data() + w13_row_elements() * num_physical_, w13_row_elements()};
}

std::span<const float> DeepSeekMoE::fused_shared_w2() const {
    if (!config_.fuse_shared_experts) return {};
    return {w2_.data() + w2_row_elements() * num_physical_, w2_row_elements()};
}

void DeepSeekMoE::set_location(ExpertLocation location, int location_layer) {
    MOELB_CHECK_ARG(location.num_logical_experts() == config_.num_experts &&
                        location.num_physical_experts() == num_physical_,
                    "location has " << location.num_logical_experts() << " logical and "
                                    << location.num_physical_experts()
                                    << " physical experts but the layer has " << config_.num_experts
                                    << " and " << num_physical_);
    MOELB_CHECK_ARG(
        location_layer >= 0 && location_layer < location.num_layers(),
        "location_layer=" << location_layer << " is outside [0, " << location.num_layers() << ")");
    MOELB_CHECK_ARG(
        ep_rank_ < location.ep_size(),
        "ep_rank=" << ep_rank_ << " is outside [0, ep_size=" << location.ep_size() << ")");
    location_ = std::move(location);
    location_layer_ = location_layer;
}

std::int64_t DeepSeekMoE::expected_peak_bytes(const DeepSeekMoEConfig& config, Index T,
                                              int num_physical_experts, int routed_lanes,
                                              int shared_lanes) {
    if (T == 0) return 0;
    const std::int64_t b = 4, H = config.hidden_size, I = config.intermediate_size;
    const std::int64_t E = config.num_experts, K = config.top_k, F = config.num_fused_shared();
    const std::int64_t Kp = K + F, Pp = num_physical_experts + F;
    const std::int64_t Is = config.shared_intermediate_size();
    const std::int64_t L = b * T * E;
    const std::int64_t TK = b * T * (2 * Kp + K);
    const std::int64_t W_r =
        b * (T * Kp + 2 * (Pp + 1)) + b * T * Kp * H + b * routed_lanes * kBlockRows * (H + 2 * I);
    const std::int64_t O = config.kernel == RoutedKernel::kInplace ? 0 : b * T * H;
    const bool has_shared = Is > 0 && !config.fuse_shared_experts;
    if (!has_shared) return std::max(L + TK, TK + W_r + O);
    const std::int64_t S = b * T * H;
    const std::int64_t P_sh = S + b * shared_lanes * kBlockRows * (2 * Is + H);
    if (config.defers_shared()) return std::max({L + TK, TK + W_r + O, O + P_sh});
    return std::max({P_sh, S + L + TK, S + TK + W_r + O});
}

void DeepSeekMoE::run_forward(MatrixMap<float> hidden, std::span<const std::int64_t> input_ids,
                              MatrixMap<float> out, MoEForwardStats& stats) const {
    const Index T = hidden.rows(), H = config_.hidden_size, I = config_.intermediate_size;
    const Index E = config_.num_experts, K = config_.top_k, F = config_.num_fused_shared();
    const Index Kp = K + F, Pp = num_physical_ + F, Is = config_.shared_intermediate_size();
    MOELB_CHECK_ARG(hidden.cols() == H, "hidden has shape [" << T << ", " << hidden.cols()
                                                             << "] but hidden_size=" << H);
    MOELB_CHECK_ARG(out.rows() == T && out.cols() == H,
                    "out has shape [" << out.rows() << ", " << out.cols() << "], expected [" << T
                                      << ", " << H << "]");
    const bool inplace = config_.kernel == RoutedKernel::kInplace;
    const float* x_begin = hidden.data();
    const float* x_end = x_begin + T * H;
    if (inplace) {
        MOELB_CHECK_ARG(out.data() == hidden.data(),
                        "the in-place routed kernel writes its output into hidden: out must be "
                        "hidden");
    } else {
        MOELB_CHECK_ARG(T == 0 || out.data() + T * H <= x_begin || out.data() >= x_end,
                        "out overlaps hidden, but the routed kernel is out-of-place");
    }
    if (config_.is_hash_layer()) {
        MOELB_CHECK_ARG(!input_ids.empty() || T == 0,
                        "layer " << config_.layer_id
                                 << " is a hash layer: input_ids (the token ids) are required");
        MOELB_CHECK_ARG(
            static_cast<Index>(input_ids.size()) == T,
            "input_ids has " << input_ids.size() << " entries but hidden has " << T << " rows");
    }
    stats = MoEForwardStats{};
    stats.deferred_shared = config_.defers_shared();
    if (T == 0) return;

    const int threads = get_num_threads();
    const bool has_shared = Is > 0 && !config_.fuse_shared_experts;
    Workspace ws;
    Workspace::Buffer<float> shared_out;
    const ConstRowMap x(hidden.data(), T, H);

    const auto run_shared = [&] {
        shared_out = ws.allocate<float>(T * H, "shared_out");
        const Index blocks = (T + kBlockRows - 1) / kBlockRows;
        const int lanes = static_cast<int>(std::min<Index>(threads, blocks));
        auto scratch = ws.allocate<float>(lanes * kBlockRows * (2 * Is + H), "shared_scratch");
        const float limit = config_.effective_shared_swiglu_limit();
        parallel_for(lanes, 1, [&](Index begin, Index end) {
            for (Index lane = begin; lane < end; ++lane) {
                float* gu = scratch.data() + lane * kBlockRows * (2 * Is + H);
                float* y_cm = gu + kBlockRows * 2 * Is;
                for (Index blk = lane; blk < blocks; blk += lanes) {
                    const Index r0 = blk * kBlockRows, rows = std::min(kBlockRows, T - r0);
                    mlp_rows(x.data() + r0 * H, rows, H, Is, shared_gate_up_.data(),
                             shared_down_.data(), limit, gu, y_cm);
                    float* dst = shared_out.data() + r0 * H;
                    store_rows(y_cm, rows, H, [&](Index r) { return dst + r * H; });
                }
            }
        });
        stats.shared_lanes = lanes;
        stats.steps.emplace_back("shared");
    };

    if (has_shared && !stats.deferred_shared) run_shared();

    // Gate: router logits [T, E], in fixed row blocks.
    auto logits = ws.allocate<float>(T * E, "router_logits");
    {
        const Index blocks = (T + kBlockRows - 1) / kBlockRows;
        parallel_for(blocks, 1, [&](Index begin, Index end) {
            for (Index blk = begin; blk < end; ++blk) {
                const Index r0 = blk * kBlockRows, rows = std::min(kBlockRows, T - r0);
                RowMap(logits.data() + r0 * E, rows, E).noalias() =
                    x.middleRows(r0, rows) * gate_.transpose();
            }
        });
    }
    stats.steps.emplace_back("gate");

    // Top-k (physical slot ids of this layer's placement; the fused shared expert is slot P).
    auto topk_ids = ws.allocate<std::int32_t>(T * Kp, "topk_ids");
    auto topk_weights = ws.allocate<float>(T * Kp, "topk_weights");
    auto recorder_ids = ws.allocate<std::int32_t>(T * K, "recorder_topk_ids");
    {
        const LayerDispatcher dispatcher(location_, location_layer_, ep_rank_,
                                         DispatchAlgorithm::kSglangStatic, 0);
        TopKOutputView view{MatrixMap<std::int32_t>(topk_ids.data(), T, Kp),
                            MatrixMap<float>(topk_weights.data(), T, Kp),
                            MatrixMap<std::int32_t>(recorder_ids.data(), T, K)};
        const ConstMatrixMap<float> l(logits.data(), T, E);
        if (hash_router_) {
            hash_router_->select<std::int64_t>(l, input_ids, std::nullopt, &dispatcher, view);
        } else {
            select_experts(l, config_.topk_config(), bias_, std::nullopt, &dispatcher, view);
        }
    }
    logits.release();
    stats.steps.emplace_back("topk");

    // Routed experts: (token, k) pairs sorted by slot, each slot's rows in blocks of kBlockRows;
    // every pair's expert output lands in its own row of Y, then each token sums its K' rows in
    // column order (the same order for any thread count).
    if (!inplace) ws.track(T * H * static_cast<Index>(sizeof(float)));
    {
        auto order = ws.allocate<std::int32_t>(T * Kp, "pair_order");
        auto offsets = ws.allocate<std::int32_t>(Pp + 1, "slot_offsets");
        auto block_offsets = ws.allocate<std::int32_t>(Pp + 1, "block_offsets");
        std::fill(offsets.data(), offsets.data() + Pp + 1, 0);
        const std::int32_t* ids = topk_ids.data();
        for (Index i = 0; i < T * Kp; ++i) {
            if (ids[i] >= 0) ++offsets.data()[ids[i] + 1];
        }
        for (Index s = 0; s < Pp; ++s) offsets.data()[s + 1] += offsets.data()[s];
        // Counting sort, stable: block_offsets serves as the per-slot cursor first.
        std::copy(offsets.data(), offsets.data() + Pp, block_offsets.data());
        for (Index i = 0; i < T * Kp; ++i) {
            if (ids[i] >= 0)
                order.data()[block_offsets.data()[ids[i]]++] = static_cast<std::int32_t>(i);
        }
        block_offsets.data()[0] = 0;
        for (Index s = 0; s < Pp; ++s) {
            const Index n = offsets.data()[s + 1] - offsets.data()[s];
            block_offsets.data()[s + 1] =
                block_offsets.data()[s] +
                static_cast<std::int32_t>((n + kBlockRows - 1) / kBlockRows);
        }
        const Index blocks = block_offsets.data()[Pp];
        const int lanes = static_cast<int>(std::max<Index>(1, std::min<Index>(threads, blocks)));
        auto y = ws.allocate<float>(T * Kp * H, "expert_out");
        {
            auto scratch = ws.allocate<float>(lanes * kBlockRows * (H + 2 * I), "routed_scratch");
            const float limit = config_.swiglu_limit;
            const std::int32_t* block_begin = block_offsets.data();
            const std::int32_t* block_end = block_begin + Pp + 1;
            parallel_for(lanes, 1, [&](Index begin, Index end) {
                for (Index lane = begin; lane < end; ++lane) {
                    float* rows_in = scratch.data() + lane * kBlockRows * (H + 2 * I);
                    float* gate_up = rows_in + kBlockRows * H;
                    for (Index blk = lane; blk < blocks; blk += lanes) {
                        const Index s = std::upper_bound(block_begin, block_end,
                                                         static_cast<std::int32_t>(blk)) -
                                        block_begin - 1;
                        const Index first =
                            offsets.data()[s] + (blk - block_offsets.data()[s]) * kBlockRows;
                        const Index rows =
                            std::min<Index>(kBlockRows, offsets.data()[s + 1] - first);
                        const std::int32_t* pairs = order.data() + first;
                        for (Index r = 0; r < rows; ++r) {
                            std::memcpy(rows_in + r * H, x.data() + (pairs[r] / Kp) * H,
                                        H * sizeof(float));
                        }
                        // The expert's output overwrites its gathered inputs, then scatters.
                        mlp_rows(rows_in, rows, H, I, w13_.data() + s * w13_row_elements(),
                                 w2_.data() + s * w2_row_elements(), limit, gate_up, rows_in);
                        store_rows(rows_in, rows, H,
                                   [&](Index r) { return y.data() + pairs[r] * H; });
                    }
                }
            });
            stats.routed_lanes = lanes;
        }
        // out = rsf * sum_k w_k y_k, columns in order. In-place: out is hidden, read above only.
        const float rsf = config_.routed_scaling_factor;
        const Index combine_blocks = (T + kCombineRows - 1) / kCombineRows;
        parallel_for(combine_blocks, 1, [&](Index begin, Index end) {
            for (Index t = begin * kCombineRows; t < std::min(T, end * kCombineRows); ++t) {
                auto row = out.row(t);
                row.setZero();
                for (Index k = 0; k < Kp; ++k) {
                    if (ids[t * Kp + k] < 0) continue;
                    row += topk_weights.data()[t * Kp + k] *
                           ConstRowMap(y.data() + (t * Kp + k) * H, 1, H);
                }
                row *= rsf;
            }
        });
    }
    topk_ids.release();
    topk_weights.release();
    recorder_ids.release();
    stats.steps.emplace_back("routed");

    if (has_shared && stats.deferred_shared) run_shared();
    if (has_shared) {
        out.noalias() += ConstRowMap(shared_out.data(), T, H);
        shared_out.release();
        stats.steps.emplace_back("combine");
    }
    if (!inplace) ws.untrack(T * H * static_cast<Index>(sizeof(float)));
    stats.peak_bytes = ws.peak_bytes();
}

void DeepSeekMoE::forward(MatrixMap<float> hidden, std::span<const std::int64_t> input_ids,
                          MatrixMap<float> out) {
    // The forward only reads the layer; its statistics are gathered locally and published under
    // a lock, so several threads may run forwards of one layer at once.
    MoEForwardStats stats;
    run_forward(hidden, input_ids, out, stats);
    const std::lock_guard lock(*stats_mutex_);
    stats_ = std::move(stats);
}

MoEForwardStats DeepSeekMoE::last_stats() const {
    const std::lock_guard lock(*stats_mutex_);
    return stats_;
}

}  // namespace moelb
