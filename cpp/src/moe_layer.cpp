// The DeepSeek MoE layer and its forward on CPU (DESIGN section 6; reference/moe_layer.md): the
// routed weights held per physical slot, the placement they follow, the memory model of the
// forward's workspace, and the forward itself, step by step (shared expert, gate, top-k, routed
// experts, combine).
#include "moelb/moe_layer.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>

#include "expert_gemm.hpp"
#include "isa/kernels.hpp"
#include "moelb/errors.hpp"
#include "moelb/parallel.hpp"

// =============================================================================================
// Memory model (the counterpart of reference/moe_layer.md section 13, for our own buffers), in
// element sizes.
//
// b = element_size(activation_dtype) (4 float32, 2 bf16): hidden, the output and the activation
// buffers; 4 bytes: int32 ids, float32 logits / weights / GEMM outputs / the shared output. T
// tokens, H hidden, I expert intermediate, Is = I * n_shared, E routed experts, K top-k, F fused
// shared (0 / 1), K' = K + F, P physical slots, P' = P + F, M = kBlockRows, M_t = min(M, T) (the
// rows of the largest block: a slot holds each token at most once), D(k) = the quantised
// GEMM's scratch in floats for M_t rows of x with k columns (detail::expert_gemm_scratch_floats:
// the kernel's x panel, accumulators and, from kPrefillRows rows on, its dequantised W panel; it
// differs slightly between ISA paths), D_r = max(D(H), D(I)), D_s = max(D(H), D(Is)); lanes_g =
// threads with bf16 activations, else 0. Workspace buffers of one forward:
//
//   L    router logits [T, E]                                   4 T E
//   G    the gate's GEMM scratch (bf16 activations only; freed    4 lanes_g D_g(H)
//          before top-k)
//   TK   top-k ids + weights [T, K'], recorder ids [T, K]       4 T (2K' + K)
//   W_r  routed workspace                                       4 (T K' + 2 (P' + 1))    sort
//          pairs sorted by slot, slot offsets, block offsets  + y T K' H                   Y
//          Y: every (token, k) pair's expert output           + lanes_r R                 scratch
//   O    the output [T, H] (the caller's; counted from the routed step on, 0 when in-place)
//                                                               b T H
//   S    shared output [T, H], float32 in every format          4 T H
//   P_sh shared step: S + per lane scratch                      4 T H + lanes_s R_s
//
// Float32 weights and activations (the original Eigen kernels): y = 4, R = 4 M (H + 2I) (the
// gathered rows [M, H], then the expert's output, column-major; gate/up [M, 2I]), R_s = 4 M
// (2 Is + H) (gate/up [M, 2 Is] and the block's output [M, H], column-major).
// Otherwise (the quantised GEMM, its lane buffers sized by M_t): y = b, R = b M_t (H + I) +
// 4 (M_t (2I + H) + D_r) (gathered rows [M_t, H] and silu * up [M_t, I] in the activation dtype;
// gate/up [M_t, 2I] and the down projection [M_t, H] in float32; the GEMM's scratch), R_s =
// b M_t Is + 4 (2 M_t Is + D_s) (the block's input rows are read in place and its down
// projection is written straight into S).
//
// The input X is the caller's and is not counted. The logits are freed right after top-k (SGLang
// keeps them until the layer returns), TK and W_r after the routed combine.
//
// Deferred (out-of-place kernel: gate, top-k, routed, shared, combine):
//   Peak_new = max(L + G,  L + TK,  TK + W_r + O,  O + P_sh)
// Not deferred (shared, gate, top-k, routed, combine; the only order for an in-place kernel):
//   Peak_old = max(P_sh,  S + L + G,  S + L + TK,  S + TK + W_r + O)
// Without a separate shared expert (n_shared = 0, or fused): max(L + G, L + TK, TK + W_r + O).
//
// Saving Peak_old - Peak_new = S = 4 T H (one float32 [T, H] buffer) whenever the routed step is
// the peak of both orders; for DeepSeek shapes Y alone (y T K' H) dwarfs P_sh, at any T. S stays
// float32 with bf16 activations too: the final output is bf16(shared + rsf * routed) with the
// shared expert's float32 value (sgl-kernel's rounding point), and both orders must give the same
// bits. With lanes_r = min(threads, routed row blocks) and lanes_s = min(threads, ceil(T / M))
// (float32 kernels) or threads (the quantised GEMM: with fewer row blocks than threads every lane
// takes a share of each block's columns) the peak depends on the thread count through the
// scratch only.
//
// Rounding points with bf16 activations (reference/moe_layer.md section 7.5, sgl-kernel CPU):
// every GEMM accumulates in float32 from bf16 inputs (hidden, silu * up); silu(g) * u is computed
// in float32 and written bf16; the down projection's float32 output times the routing weight (in
// float32) is written bf16 (Y); each token's sum over its K' rows of Y is taken in float32 in k
// order and written bf16 (into the output); the output is then bf16(S + rsf * that) with S the
// shared expert's float32 output (no shared expert: bf16(rsf * that)). The router logits are
// float32 (the gate's float32 weights times the bf16 hidden, exactly widened).
// =============================================================================================

namespace moelb {
namespace {

// Rows of one GEMM block: tokens of one expert (routed) or consecutive tokens (shared, gate).
constexpr Index kBlockRows = 128;
constexpr Index kCombineRows = 256;

using ConstRowMap = Eigen::Map<const RowMatrix<float>>;

void check_config_shape(const char* name, Index rows, Index cols, Index want_rows,
                        Index want_cols) {
    MOELB_CHECK_ARG(rows == want_rows && cols == want_cols,
                    name << " has shape [" << rows << ", " << cols << "], expected [" << want_rows
                         << ", " << want_cols << "]");
}

// One stored expert tensor: its format, block size and shape [count, rows, cols].
void check_weight_tensor(const char* name, const WeightTensor& t, const DeepSeekMoEConfig& config,
                         Index count, Index rows, Index cols) {
    MOELB_CHECK_ARG(t.format() == config.weight_format,
                    name << " is stored as " << to_string(t.format()) << " but weight_format='"
                         << to_string(config.weight_format) << "'");
    MOELB_CHECK_ARG(t.format() != WeightFormat::kFp8E4M3 || t.block() == config.weight_block_size,
                    name << " has fp8 scale blocks of (" << t.block().rows << ", " << t.block().cols
                         << ") but weight_block_size=(" << config.weight_block_size.rows << ", "
                         << config.weight_block_size.cols << ")");
    MOELB_CHECK_ARG(t.count() == count && t.rows() == rows && t.cols() == cols,
                    name << " has shape [" << t.count() << ", " << t.rows() << ", " << t.cols()
                         << "], expected [" << count << ", " << rows << ", " << cols << "]");
    // A NaN or infinite scale would turn a whole block (or row) into NaN or zeros.
    const auto scales = t.scale_inv();
    for (std::size_t i = 0; i < scales.size(); ++i) {
        MOELB_CHECK_ARG(std::isfinite(scales[i]), name << "_scale_inv has the non-finite value "
                                                       << scales[i] << " at flat index " << i);
    }
}

// The shapes of the expert weights: w13 [E, 2I, H], w2 [E, H, I], the separate shared expert's
// gate/up [1, 2 Is, H] and down [1, H, Is], in the config's format.
void check_expert_weights(const DeepSeekMoEConfig& config, const DeepSeekMoEWeights& weights) {
    const Index H = config.hidden_size, I = config.intermediate_size, E = config.num_experts;
    const Index Is = config.shared_intermediate_size();
    check_weight_tensor("w13", weights.w13, config, E, 2 * I, H);
    check_weight_tensor("w2", weights.w2, config, E, H, I);
    if (Is > 0) {
        check_weight_tensor("shared_gate_up", weights.shared_gate_up, config, 1, 2 * Is, H);
        check_weight_tensor("shared_down", weights.shared_down, config, 1, H, Is);
    }
}

// silu(min(g, L)) * clamp(u, -L, L) in float32 (L = 0: no clamp).
inline float swiglu(float g, float u, float limit) {
    if (limit > 0) {
        g = std::min(g, limit);
        u = std::clamp(u, -limit, limit);
    }
    return g / (1.0f + std::exp(-g)) * u;
}

// Columns [0, n) in `lanes` contiguous shares (boundaries on multiples of 16 columns where n
// allows), fn(lane, c0, c1) for each non-empty share, the lanes in parallel.
template <class Fn>
void split_columns(int lanes, Index n, const Fn& fn) {
    parallel_for(lanes, 1, [&](Index begin, Index end) {
        for (Index lane = begin; lane < end; ++lane) {
            const auto bound = [&](Index l) { return std::min(n, (n * l / lanes + 15) / 16 * 16); };
            const Index c0 = bound(lane), c1 = lane + 1 == lanes ? n : bound(lane + 1);
            if (c0 < c1) fn(lane, c0, c1);
        }
    });
}

// a[r, j] = swiglu(gu[r, j], gu[r, W + j]) for rows r < rows of gu [rows, 2W] (float32), into a
// [rows, W] in the activation dtype (bf16: rounded to nearest even).
void swiglu_rows(const float* gu, Index rows, Index width, float limit, ActivationDType dtype,
                 std::byte* a) {
    for (Index r = 0; r < rows; ++r) {
        const float* g = gu + r * 2 * width;
        if (dtype == ActivationDType::kBFloat16) {
            auto* dst = reinterpret_cast<std::uint16_t*>(a) + r * width;
            for (Index j = 0; j < width; ++j) {
                dst[j] = float_to_bf16_bits(swiglu(g[j], g[width + j], limit));
            }
        } else {
            auto* dst = reinterpret_cast<float*>(a) + r * width;
            for (Index j = 0; j < width; ++j) dst[j] = swiglu(g[j], g[width + j], limit);
        }
    }
}

// A buffer of activations in the forward's dtype (float32 or bf16 bits), counted by a workspace.
struct ActivationBuffer {
    ActivationBuffer() = default;
    ActivationBuffer(Workspace& ws, ActivationDType dtype, Index count, std::string name) {
        if (dtype == ActivationDType::kBFloat16) {
            bf16 = ws.allocate<std::uint16_t>(count, std::move(name));
        } else {
            f32 = ws.allocate<float>(count, std::move(name));
        }
    }
    std::byte* data() {
        return f32.data() ? reinterpret_cast<std::byte*>(f32.data())
                          : reinterpret_cast<std::byte*>(bf16.data());
    }
    const std::byte* data() const {
        return f32.data() ? reinterpret_cast<const std::byte*>(f32.data())
                          : reinterpret_cast<const std::byte*>(bf16.data());
    }
    Workspace::Buffer<float> f32;
    Workspace::Buffer<std::uint16_t> bf16;
};

}  // namespace

// One forward's state: its input and output, the workspace every temporary comes from, the
// buffers that live from one step to a later one, and the statistics it reports.
struct DeepSeekMoE::Forward {
    Forward(ActivationDType activation_dtype, const void* hidden, void* output, Index rows,
            Index cols, MoEForwardStats& forward_stats)
        : dtype(activation_dtype),
          act_bytes(static_cast<Index>(element_size(activation_dtype))),
          x(static_cast<const std::byte*>(hidden)),
          out(static_cast<std::byte*>(output)),
          num_tokens(rows),
          hidden_size(cols),
          threads(get_num_threads()),
          kernels(isa::kernels()),
          stats(forward_stats) {}

    ActivationDType dtype;
    Index act_bytes;     // b
    const std::byte* x;  // hidden [T, H]
    std::byte* out;      // [T, H]
    Index num_tokens;    // T
    Index hidden_size;   // H
    int threads;
    const isa::Kernels& kernels;  // the GEMM and SwiGLU kernels' ISA path (moelb/cpu_isa.hpp)
    MoEForwardStats& stats;
    Workspace ws;
    Workspace::Buffer<float> shared_out;           // [T, H]: the separate shared expert's output
    Workspace::Buffer<float> logits;               // [T, E]: router logits, until top-k
    Workspace::Buffer<std::int32_t> topk_ids;      // [T, K']: physical slots (-1: none)
    Workspace::Buffer<float> topk_weights;         // [T, K']
    Workspace::Buffer<std::int32_t> recorder_ids;  // [T, K]

    const float* x_f32() const { return reinterpret_cast<const float*>(x); }
    float* out_f32() { return reinterpret_cast<float*>(out); }
    std::uint16_t* out_bf16() { return reinterpret_cast<std::uint16_t*>(out); }
};

// The (token, k) pairs of a batch sorted by physical slot (stably), each slot's pairs cut into
// blocks of kBlockRows rows: block b belongs to the slot s with block_offsets[s] <= b <
// block_offsets[s + 1].
struct DeepSeekMoE::SlotPairs {
    Workspace::Buffer<std::int32_t> order;          // [T K']: pair indices t * K' + k, by slot
    Workspace::Buffer<std::int32_t> offsets;        // [P' + 1]: slot s's pairs in order
    Workspace::Buffer<std::int32_t> block_offsets;  // [P' + 1]: slot s's first row block
    Index num_blocks = 0;
};

// Y [T K', H]: row t * K' + k is the output of pair (t, k)'s expert (rows of padded pairs are
// not written): float32 and unweighted with float32 activations; bf16 and already multiplied by
// the pair's routing weight with bf16 activations (sgl-kernel's ic2).
struct DeepSeekMoE::ExpertOutputs {
    ActivationBuffer y;
};

DeepSeekMoE::DeepSeekMoE(DeepSeekMoEConfig config, const DeepSeekMoEWeights& weights,
                         std::optional<ExpertLocation> location, int layer, int ep_rank)
    : config_(std::move(config)),
      location_(location ? std::move(*location)
                         : ExpertLocation::trivial(1, config_.num_experts, config_.num_experts, 1)),
      layer_(layer),
      ep_rank_(ep_rank),
      num_physical_(0) {
    config_.validate();
    const Index H = config_.hidden_size, E = config_.num_experts, I = config_.intermediate_size;
    const Index Is = config_.shared_intermediate_size();
    MOELB_CHECK_ARG(location_.num_logical_experts() == E,
                    "location has " << location_.num_logical_experts()
                                    << " logical experts but num_experts=" << E);
    MOELB_CHECK_ARG(layer >= 0 && layer < location_.num_layers(),
                    "layer=" << layer << " is outside [0, " << location_.num_layers() << ")");
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
    check_expert_weights(config_, weights);

    gate_ = weights.gate;
    bias_ = weights.correction_bias;
    // Routed weights per physical slot (bytes and scales); the fused shared expert after them.
    const int F = config_.num_fused_shared();
    const WeightFormat format = config_.weight_format;
    const BlockSize block = config_.weight_block_size;
    w13_ = WeightTensor(format, num_physical_ + F, 2 * I, H, block);
    w2_ = WeightTensor(format, num_physical_ + F, H, I, block);
    for (int p = 0; p < num_physical_; ++p) {
        const Index e = location_.physical_to_logical()(layer_, p);
        w13_.copy_matrix_from(weights.w13, e, p);
        w2_.copy_matrix_from(weights.w2, e, p);
    }
    if (F == 1) {
        w13_.copy_matrix_from(weights.shared_gate_up, 0, num_physical_);
        w2_.copy_matrix_from(weights.shared_down, 0, num_physical_);
    } else if (Is > 0) {
        shared_gate_up_ = weights.shared_gate_up;
        shared_down_ = weights.shared_down;
    }
}

void DeepSeekMoE::set_location(ExpertLocation location, int layer) {
    MOELB_CHECK_ARG(location.num_logical_experts() == config_.num_experts &&
                        location.num_physical_experts() == num_physical_,
                    "location has " << location.num_logical_experts() << " logical and "
                                    << location.num_physical_experts()
                                    << " physical experts but the layer has " << config_.num_experts
                                    << " and " << num_physical_);
    MOELB_CHECK_ARG(layer >= 0 && layer < location.num_layers(),
                    "layer=" << layer << " is outside [0, " << location.num_layers() << ")");
    MOELB_CHECK_ARG(
        ep_rank_ < location.ep_size(),
        "ep_rank=" << ep_rank_ << " is outside [0, ep_size=" << location.ep_size() << ")");
    location_ = std::move(location);
    layer_ = layer;
}

std::int64_t DeepSeekMoE::gemm_scratch_bytes(Index rows, Index k) {
    MOELB_CHECK_ARG(rows >= 0 && k >= 0,
                    "gemm_scratch_bytes: rows=" << rows << " and k=" << k << " must be >= 0");
    // About 4 rows k + 4 * 32 k bytes (the x panel and the W panel): far below 2^62 here.
    constexpr Index kMax = Index{1} << 28;
    MOELB_CHECK_ARG(
        rows <= kMax && k <= kMax,
        "gemm_scratch_bytes: rows=" << rows << " and k=" << k << " must be <= " << kMax);
    return static_cast<std::int64_t>(detail::expert_gemm_scratch_floats(rows, k) * sizeof(float));
}

namespace {

// The memory model's peak (the comment at the top of this file) in the number type N: double to
// bound it, then int64 for the exact bytes.
template <class N>
N peak_formula(const DeepSeekMoEConfig& config, Index num_tokens, int num_physical_experts,
               int routed_lanes, int shared_lanes, int gate_lanes, Index M) {
    const N T = static_cast<N>(num_tokens), H = static_cast<N>(config.hidden_size);
    const N I = static_cast<N>(config.intermediate_size), E = static_cast<N>(config.num_experts);
    const N K = static_cast<N>(config.top_k), F = static_cast<N>(config.num_fused_shared());
    const N Kp = K + F, Pp = static_cast<N>(num_physical_experts) + F;
    const Index mt = std::min(M, num_tokens);  // the quantised GEMM's lanes: rows of the largest
    const N Mt = static_cast<N>(mt), Mb = static_cast<N>(M);  // block
    const N Is = static_cast<N>(config.shared_intermediate_size());
    const N b = static_cast<N>(element_size(config.activation_dtype));
    const auto D = [&](Index k) {
        return static_cast<N>(detail::expert_gemm_scratch_floats(mt, k));
    };
    const bool f32 = config.uses_float32_kernels();
    const N L = 4 * T * E;
    const N G = b == 4 ? N{0} : static_cast<N>(gate_lanes) * 4 * D(config.hidden_size);
    const N TK = 4 * T * (2 * Kp + K);
    const N y = f32 ? N{4} : b;
    const N R =
        f32 ? 4 * Mb * (H + 2 * I)
            : b * Mt * (H + I) + 4 * (Mt * (2 * I + H) +
                                      std::max(D(config.hidden_size), D(config.intermediate_size)));
    const N W_r = 4 * (T * Kp + 2 * (Pp + 1)) + y * T * Kp * H + static_cast<N>(routed_lanes) * R;
    const N O = config.kernel == RoutedKernel::kInplace ? N{0} : b * T * H;
    const bool has_shared = config.shared_intermediate_size() > 0 && !config.fuse_shared_experts;
    if (!has_shared) return std::max({L + G, L + TK, TK + W_r + O});
    const N S = 4 * T * H;
    const N R_s =
        f32 ? 4 * Mb * (2 * Is + H)
            : b * Mt * Is + 4 * (2 * Mt * Is + std::max(D(config.hidden_size),
                                                        D(config.shared_intermediate_size())));
    const N P_sh = S + static_cast<N>(shared_lanes) * R_s;
    if (config.defers_shared()) return std::max({L + G, L + TK, TK + W_r + O, O + P_sh});
    return std::max({P_sh, S + L + G, S + L + TK, S + TK + W_r + O});
}

}  // namespace

std::int64_t DeepSeekMoE::expected_peak_bytes(const DeepSeekMoEConfig& config, Index num_tokens,
                                              int num_physical_experts, int routed_lanes,
                                              int shared_lanes, int gate_lanes) {
    MOELB_CHECK_ARG(num_tokens >= 0, "num_tokens must be >= 0, got " << num_tokens);
    MOELB_CHECK_ARG(num_physical_experts >= config.num_experts,
                    "num_physical_experts=" << num_physical_experts << " is below num_experts="
                                            << config.num_experts << " (every expert has a slot)");
    MOELB_CHECK_ARG(routed_lanes >= 0 && shared_lanes >= 0 && gate_lanes >= 0,
                    "lanes must be >= 0, got routed_lanes=" << routed_lanes
                                                            << ", shared_lanes=" << shared_lanes
                                                            << ", gate_lanes=" << gate_lanes);
    if (num_tokens == 0) return 0;
    const double bound = peak_formula<double>(config, num_tokens, num_physical_experts,
                                              routed_lanes, shared_lanes, gate_lanes, kBlockRows);
    MOELB_CHECK_ARG(bound < 0x1p62, "the peak of num_tokens=" << num_tokens << " (" << bound
                                                              << " bytes) does not fit int64");
    return peak_formula<std::int64_t>(config, num_tokens, num_physical_experts, routed_lanes,
                                      shared_lanes, gate_lanes, kBlockRows);
}

void DeepSeekMoE::forward(MatrixMap<float> hidden, std::span<const std::int64_t> input_ids,
                          MatrixMap<float> out) {
    MOELB_CHECK_ARG(
        config_.activation_dtype == ActivationDType::kFloat32,
        "hidden is float32 but activation_dtype='" << to_string(config_.activation_dtype) << "'");
    check_forward_args(ActivationDType::kFloat32, hidden.data(), hidden.rows(), hidden.cols(),
                       input_ids, out.data(), out.rows(), out.cols());
    // The forward only reads the layer; its statistics are gathered locally and published under
    // a lock, so several threads may run forwards of one layer at once.
    MoEForwardStats stats;
    Forward f(ActivationDType::kFloat32, hidden.data(), out.data(), hidden.rows(), hidden.cols(),
              stats);
    run_forward(f, input_ids);
    const std::lock_guard lock(*stats_mutex_);
    stats_ = std::move(stats);
}

void DeepSeekMoE::forward(MatrixMap<std::uint16_t> hidden, std::span<const std::int64_t> input_ids,
                          MatrixMap<std::uint16_t> out) {
    MOELB_CHECK_ARG(
        config_.activation_dtype == ActivationDType::kBFloat16,
        "hidden is bfloat16 but activation_dtype='" << to_string(config_.activation_dtype) << "'");
    check_forward_args(ActivationDType::kBFloat16, hidden.data(), hidden.rows(), hidden.cols(),
                       input_ids, out.data(), out.rows(), out.cols());
    MoEForwardStats stats;
    Forward f(ActivationDType::kBFloat16, hidden.data(), out.data(), hidden.rows(), hidden.cols(),
              stats);
    run_forward(f, input_ids);
    const std::lock_guard lock(*stats_mutex_);
    stats_ = std::move(stats);
}

MoEForwardStats DeepSeekMoE::last_stats() const {
    const std::lock_guard lock(*stats_mutex_);
    return stats_;
}

// ---------------------------------------------------------------------------------------------
// The forward, step by step (the step order and the buffers' lifetimes are the memory model
// above).

void DeepSeekMoE::run_forward(Forward& f, std::span<const std::int64_t> input_ids) const {
    MoEForwardStats& stats = f.stats;
    stats = MoEForwardStats{};
    stats.deferred_shared = config_.defers_shared();
    if (f.num_tokens == 0) return;

    const bool has_shared = config_.shared_intermediate_size() > 0 && !config_.fuse_shared_experts;
    const bool inplace = config_.kernel == RoutedKernel::kInplace;
    // The caller's output counts as live from the routed step on (in place, it is the input).
    const Index out_bytes = f.num_tokens * config_.hidden_size * f.act_bytes;

    if (has_shared && !stats.deferred_shared) run_shared_expert(f);
    compute_router_logits(f);
    select_topk(f, input_ids);
    if (!inplace) f.ws.track(out_bytes);
    run_routed_experts(f);
    if (has_shared && stats.deferred_shared) run_shared_expert(f);
    if (has_shared) add_shared_output(f);
    if (!inplace) f.ws.untrack(out_bytes);
    stats.peak_bytes = f.ws.peak_bytes();
}

void DeepSeekMoE::check_forward_args(ActivationDType dtype, const void* hidden, Index rows,
                                     Index cols, std::span<const std::int64_t> input_ids,
                                     const void* out, Index out_rows, Index out_cols) const {
    const Index T = rows, H = config_.hidden_size;
    const Index b = static_cast<Index>(element_size(dtype));
    MOELB_CHECK_ARG(cols == H,
                    "hidden has shape [" << T << ", " << cols << "] but hidden_size=" << H);
    MOELB_CHECK_ARG(out_rows == T && out_cols == H, "out has shape [" << out_rows << ", "
                                                                      << out_cols << "], expected ["
                                                                      << T << ", " << H << "]");
    const auto* x_begin = static_cast<const std::byte*>(hidden);
    const std::byte* x_end = x_begin + T * H * b;
    const auto* o_begin = static_cast<const std::byte*>(out);
    if (config_.kernel == RoutedKernel::kInplace) {
        MOELB_CHECK_ARG(out == hidden,
                        "the in-place routed kernel writes its output into hidden: out must be "
                        "hidden");
    } else {
        MOELB_CHECK_ARG(T == 0 || o_begin + T * H * b <= x_begin || o_begin >= x_end,
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
}

// Shared expert: shared_out [T, H] = the separate shared MLP of every token, in row blocks.
void DeepSeekMoE::run_shared_expert(Forward& f) const {
    if (!config_.uses_float32_kernels()) {
        run_shared_expert_quantized(f);
        return;
    }
    const Index T = f.num_tokens, H = config_.hidden_size;
    const Index Is = config_.shared_intermediate_size();
    f.shared_out = f.ws.allocate<float>(T * H, "shared_out");
    const Index blocks = (T + kBlockRows - 1) / kBlockRows;
    const int lanes = static_cast<int>(std::min<Index>(f.threads, blocks));
    auto scratch = f.ws.allocate<float>(lanes * kBlockRows * (2 * Is + H), "shared_scratch");
    const float limit = config_.effective_shared_swiglu_limit();
    const auto* w_gate_up = reinterpret_cast<const float*>(shared_gate_up_.matrix(0));
    const auto* w_down = reinterpret_cast<const float*>(shared_down_.matrix(0));
    parallel_for(lanes, 1, [&](Index begin, Index end) {
        for (Index lane = begin; lane < end; ++lane) {
            float* gu = scratch.data() + lane * kBlockRows * (2 * Is + H);
            float* y_cm = gu + kBlockRows * 2 * Is;
            for (Index blk = lane; blk < blocks; blk += lanes) {
                const Index r0 = blk * kBlockRows, rows = std::min(kBlockRows, T - r0);
                f.kernels.mlp_rows(f.x_f32() + r0 * H, rows, H, Is, w_gate_up, w_down, limit, gu,
                                   y_cm);
                f.kernels.store_rows(y_cm, rows, H, f.shared_out.data() + r0 * H, nullptr);
            }
        }
    });
    f.stats.shared_lanes = lanes;
    f.stats.steps.emplace_back("shared");
}

// The shared expert through the quantised GEMM: per row block, gate/up [rows, 2 Is] (float32),
// silu * up [rows, Is] (activation dtype), and the down projection straight into shared_out.
void DeepSeekMoE::run_shared_expert_quantized(Forward& f) const {
    const Index T = f.num_tokens, H = config_.hidden_size;
    const Index Is = config_.shared_intermediate_size();
    f.shared_out = f.ws.allocate<float>(T * H, "shared_out");
    const Index blocks = (T + kBlockRows - 1) / kBlockRows;
    const Index Mt = std::min(kBlockRows, T);  // rows of the largest block
    const int lanes = f.threads;
    const Index D = static_cast<Index>(std::max(detail::expert_gemm_scratch_floats(Mt, H),
                                                detail::expert_gemm_scratch_floats(Mt, Is)));
    const Index lane_floats = Mt * 2 * Is + D;
    auto scratch = f.ws.allocate<float>(lanes * lane_floats, "shared_scratch");
    ActivationBuffer act(f.ws, f.dtype, lanes * Mt * Is, "shared_act");
    const float limit = config_.effective_shared_swiglu_limit();
    const detail::QuantMatrix w_gate_up = detail::quant_matrix(shared_gate_up_, 0);
    const detail::QuantMatrix w_down = detail::quant_matrix(shared_down_, 0);
    const auto lane_gu = [&](Index lane) { return scratch.data() + lane * lane_floats; };
    const auto lane_dequant = [&](Index lane) { return lane_gu(lane) + Mt * 2 * Is; };
    if (blocks < lanes) {
        // Fewer row blocks than lanes (decode): each block's projections split by columns over
        // every lane (the bits do not depend on the split), silu * up between them on one.
        float* gu = lane_gu(0);
        std::byte* a = act.data();
        for (Index blk = 0; blk < blocks; ++blk) {
            const Index r0 = blk * kBlockRows, rows = std::min(kBlockRows, T - r0);
            split_columns(lanes, 2 * Is, [&](Index lane, Index c0, Index c1) {
                detail::expert_gemm(f.x + r0 * H * f.act_bytes, f.dtype, rows, w_gate_up, c0, c1,
                                    gu, 2 * Is, lane_dequant(lane));
            });
            swiglu_rows(gu, rows, Is, limit, f.dtype, a);
            split_columns(lanes, H, [&](Index lane, Index c0, Index c1) {
                detail::expert_gemm(a, f.dtype, rows, w_down, c0, c1, f.shared_out.data() + r0 * H,
                                    H, lane_dequant(lane));
            });
        }
    } else {
        parallel_for(lanes, 1, [&](Index begin, Index end) {
            for (Index lane = begin; lane < end; ++lane) {
                float* gu = lane_gu(lane);
                std::byte* a = act.data() + lane * Mt * Is * f.act_bytes;
                for (Index blk = lane; blk < blocks; blk += lanes) {
                    const Index r0 = blk * kBlockRows, rows = std::min(kBlockRows, T - r0);
                    detail::expert_gemm(f.x + r0 * H * f.act_bytes, f.dtype, rows, w_gate_up, 0,
                                        2 * Is, gu, 2 * Is, lane_dequant(lane));
                    swiglu_rows(gu, rows, Is, limit, f.dtype, a);
                    detail::expert_gemm(a, f.dtype, rows, w_down, 0, H,
                                        f.shared_out.data() + r0 * H, H, lane_dequant(lane));
                }
            }
        });
    }
    f.stats.shared_lanes = lanes;
    f.stats.steps.emplace_back("shared");
}

// Gate: router logits [T, E], in fixed row blocks (bf16 hidden: through the quantised GEMM with
// the float32 gate, which reads the bf16 rows widened exactly).
void DeepSeekMoE::compute_router_logits(Forward& f) const {
    const Index T = f.num_tokens, E = config_.num_experts, H = config_.hidden_size;
    f.logits = f.ws.allocate<float>(T * E, "router_logits");
    const Index blocks = (T + kBlockRows - 1) / kBlockRows;
    if (f.dtype == ActivationDType::kFloat32) {
        parallel_for(blocks, 1, [&](Index begin, Index end) {
            for (Index blk = begin; blk < end; ++blk) {
                const Index r0 = blk * kBlockRows, rows = std::min(kBlockRows, T - r0);
                f.kernels.gate_rows(f.x_f32() + r0 * H, rows, H, gate_.data(), E,
                                    f.logits.data() + r0 * E);
            }
        });
    } else {
        // One GEMM scratch per lane (G in the memory model), freed before top-k. Fewer row
        // blocks than lanes (decode): each block's experts split over every lane.
        const int lanes = f.threads;
        const Index Mt = std::min(kBlockRows, T);  // rows of the largest block
        const Index G = static_cast<Index>(detail::expert_gemm_scratch_floats(Mt, H));
        auto scratch = f.ws.allocate<float>(lanes * G, "gate_scratch");
        const detail::QuantMatrix gate{WeightFormat::kFloat32, gate_.data(), nullptr, E, H, {}};
        if (blocks < lanes) {
            for (Index blk = 0; blk < blocks; ++blk) {
                const Index r0 = blk * kBlockRows, rows = std::min(kBlockRows, T - r0);
                split_columns(lanes, E, [&](Index lane, Index c0, Index c1) {
                    detail::expert_gemm(f.x + r0 * H * f.act_bytes, f.dtype, rows, gate, c0, c1,
                                        f.logits.data() + r0 * E, E, scratch.data() + lane * G);
                });
            }
        } else {
            parallel_for(lanes, 1, [&](Index begin, Index end) {
                for (Index lane = begin; lane < end; ++lane) {
                    for (Index blk = lane; blk < blocks; blk += lanes) {
                        const Index r0 = blk * kBlockRows, rows = std::min(kBlockRows, T - r0);
                        detail::expert_gemm(f.x + r0 * H * f.act_bytes, f.dtype, rows, gate, 0, E,
                                            f.logits.data() + r0 * E, E, scratch.data() + lane * G);
                    }
                }
            });
        }
        f.stats.gate_lanes = lanes;
    }
    f.stats.steps.emplace_back("gate");
}

// Top-k: each token's routed experts (hash or learned routing) as physical slot ids of this
// layer's placement, seen from ep_rank (static dispatch); the fused shared expert is slot P. The
// logits are freed here.
void DeepSeekMoE::select_topk(Forward& f, std::span<const std::int64_t> input_ids) const {
    const Index T = f.num_tokens, E = config_.num_experts, K = config_.top_k;
    const Index Kp = K + config_.num_fused_shared();
    f.topk_ids = f.ws.allocate<std::int32_t>(T * Kp, "topk_ids");
    f.topk_weights = f.ws.allocate<float>(T * Kp, "topk_weights");
    f.recorder_ids = f.ws.allocate<std::int32_t>(T * K, "recorder_topk_ids");
    {
        const LayerDispatcher dispatcher(location_, layer_, ep_rank_,
                                         DispatchAlgorithm::kSglangStatic, 0);
        TopKOutputView view{MatrixMap<std::int32_t>(f.topk_ids.data(), T, Kp),
                            MatrixMap<float>(f.topk_weights.data(), T, Kp),
                            MatrixMap<std::int32_t>(f.recorder_ids.data(), T, K)};
        const ConstMatrixMap<float> logits(f.logits.data(), T, E);
        if (hash_router_) {
            hash_router_->select<std::int64_t>(logits, input_ids, std::nullopt, &dispatcher, view);
        } else {
            select_experts(logits, config_.topk_config(), bias_, std::nullopt, &dispatcher, view);
        }
    }
    f.logits.release();
    f.stats.steps.emplace_back("topk");
}

// Routed experts: the (token, k) pairs sorted by slot, each slot's MLP over its pairs in row
// blocks (every pair's output in its own row of Y), then each token sums its K' rows in column
// order (the same order for any thread count). The routed buffers and the top-k are freed here.
void DeepSeekMoE::run_routed_experts(Forward& f) const {
    {
        const SlotPairs pairs = sort_pairs_by_slot(f);
        const ExpertOutputs y = config_.uses_float32_kernels()
                                    ? run_expert_blocks(f, pairs)
                                    : run_expert_blocks_quantized(f, pairs);
        combine_routed(f, y);
    }
    f.topk_ids.release();
    f.topk_weights.release();
    f.recorder_ids.release();
    f.stats.steps.emplace_back("routed");
}

// A stable counting sort of the pairs by slot (padding, -1, dropped), then each slot's row blocks.
DeepSeekMoE::SlotPairs DeepSeekMoE::sort_pairs_by_slot(Forward& f) const {
    const Index num_pairs = f.num_tokens * (config_.top_k + config_.num_fused_shared());
    const Index Pp = num_physical_ + config_.num_fused_shared();
    SlotPairs pairs{f.ws.allocate<std::int32_t>(num_pairs, "pair_order"),
                    f.ws.allocate<std::int32_t>(Pp + 1, "slot_offsets"),
                    f.ws.allocate<std::int32_t>(Pp + 1, "block_offsets")};
    std::int32_t* order = pairs.order.data();
    std::int32_t* offsets = pairs.offsets.data();
    std::int32_t* block_offsets = pairs.block_offsets.data();
    const std::int32_t* ids = f.topk_ids.data();
    std::fill(offsets, offsets + Pp + 1, 0);
    for (Index i = 0; i < num_pairs; ++i) {
        if (ids[i] >= 0) ++offsets[ids[i] + 1];
    }
    for (Index s = 0; s < Pp; ++s) offsets[s + 1] += offsets[s];
    // block_offsets serves as the per-slot cursor first.
    std::copy(offsets, offsets + Pp, block_offsets);
    for (Index i = 0; i < num_pairs; ++i) {
        if (ids[i] >= 0) order[block_offsets[ids[i]]++] = static_cast<std::int32_t>(i);
    }
    block_offsets[0] = 0;
    for (Index s = 0; s < Pp; ++s) {
        const Index n = offsets[s + 1] - offsets[s];
        block_offsets[s + 1] =
            block_offsets[s] + static_cast<std::int32_t>((n + kBlockRows - 1) / kBlockRows);
    }
    pairs.num_blocks = block_offsets[Pp];
    return pairs;
}

namespace {

// Block `blk`'s slot, first pair (in the sorted order) and rows.
struct RowBlock {
    Index slot, first, rows;
};

RowBlock row_block(const std::int32_t* offsets, const std::int32_t* block_begin,
                   const std::int32_t* block_end, Index blk, Index block_rows) {
    const Index s =
        std::upper_bound(block_begin, block_end, static_cast<std::int32_t>(blk)) - block_begin - 1;
    const Index first = offsets[s] + (blk - block_begin[s]) * block_rows;
    return {s, first, std::min<Index>(block_rows, offsets[s + 1] - first)};
}

}  // namespace

// Y [T K', H] float32: each lane gathers a block's input rows, runs the slot's MLP over them in
// place (the original Eigen kernels) and scatters the outputs.
DeepSeekMoE::ExpertOutputs DeepSeekMoE::run_expert_blocks(Forward& f,
                                                          const SlotPairs& pairs) const {
    const Index T = f.num_tokens, H = config_.hidden_size, I = config_.intermediate_size;
    const Index Kp = config_.top_k + config_.num_fused_shared();
    const Index Pp = num_physical_ + config_.num_fused_shared();
    const Index blocks = pairs.num_blocks;
    const int lanes = static_cast<int>(std::max<Index>(1, std::min<Index>(f.threads, blocks)));
    ExpertOutputs out{ActivationBuffer(f.ws, ActivationDType::kFloat32, T * Kp * H, "expert_out")};
    float* y = out.y.f32.data();
    auto scratch = f.ws.allocate<float>(lanes * kBlockRows * (H + 2 * I), "routed_scratch");
    const float limit = config_.swiglu_limit;
    const std::int32_t* offsets = pairs.offsets.data();
    const std::int32_t* block_begin = pairs.block_offsets.data();
    const std::int32_t* block_end = block_begin + Pp + 1;
    parallel_for(lanes, 1, [&](Index begin, Index end) {
        for (Index lane = begin; lane < end; ++lane) {
            float* rows_in = scratch.data() + lane * kBlockRows * (H + 2 * I);
            float* gate_up = rows_in + kBlockRows * H;
            for (Index blk = lane; blk < blocks; blk += lanes) {
                const auto [s, first, rows] =
                    row_block(offsets, block_begin, block_end, blk, kBlockRows);
                const std::int32_t* block_pairs = pairs.order.data() + first;
                for (Index r = 0; r < rows; ++r) {
                    std::memcpy(rows_in + r * H, f.x_f32() + (block_pairs[r] / Kp) * H,
                                H * sizeof(float));
                }
                // The expert's output overwrites its gathered inputs, then scatters.
                f.kernels.mlp_rows(
                    rows_in, rows, H, I, reinterpret_cast<const float*>(w13_.matrix(s)),
                    reinterpret_cast<const float*>(w2_.matrix(s)), limit, gate_up, rows_in);
                f.kernels.store_rows(rows_in, rows, H, y, block_pairs);
            }
        }
    });
    f.stats.routed_lanes = lanes;
    return out;
}

// Y [T K', H] through the quantised GEMM: per block, the gathered rows [rows, H] and silu * up
// [rows, I] in the activation dtype, gate/up [rows, 2I] and the down projection [rows, H] in
// float32; the down projection's rows scatter to Y (bf16: times the routing weight, rounded).
DeepSeekMoE::ExpertOutputs DeepSeekMoE::run_expert_blocks_quantized(Forward& f,
                                                                    const SlotPairs& pairs) const {
    const Index T = f.num_tokens, H = config_.hidden_size, I = config_.intermediate_size;
    const Index Kp = config_.top_k + config_.num_fused_shared();
    const Index Pp = num_physical_ + config_.num_fused_shared();
    const Index blocks = pairs.num_blocks;
    const Index b = f.act_bytes;
    const int lanes = static_cast<int>(std::max<Index>(1, std::min<Index>(f.threads, blocks)));
    ExpertOutputs out{ActivationBuffer(f.ws, f.dtype, T * Kp * H, "expert_out")};
    // Rows of the largest block: a slot holds each token at most once.
    const Index Mt = std::min(kBlockRows, T);
    const Index D = static_cast<Index>(std::max(detail::expert_gemm_scratch_floats(Mt, H),
                                                detail::expert_gemm_scratch_floats(Mt, I)));
    const Index lane_floats = Mt * (2 * I + H) + D;
    auto scratch = f.ws.allocate<float>(lanes * lane_floats, "routed_scratch");
    ActivationBuffer act(f.ws, f.dtype, lanes * Mt * (H + I), "routed_rows");
    const float limit = config_.swiglu_limit;
    const std::int32_t* offsets = pairs.offsets.data();
    const std::int32_t* block_begin = pairs.block_offsets.data();
    const std::int32_t* block_end = block_begin + Pp + 1;
    const float* weights = f.topk_weights.data();
    std::byte* y = out.y.data();
    parallel_for(lanes, 1, [&](Index begin, Index end) {
        for (Index lane = begin; lane < end; ++lane) {
            float* gate_up = scratch.data() + lane * lane_floats;
            float* down = gate_up + Mt * 2 * I;
            float* dequant = down + Mt * H;
            std::byte* rows_in = act.data() + lane * Mt * (H + I) * b;
            std::byte* a = rows_in + Mt * H * b;
            for (Index blk = lane; blk < blocks; blk += lanes) {
                const auto [s, first, rows] =
                    row_block(offsets, block_begin, block_end, blk, kBlockRows);
                const std::int32_t* block_pairs = pairs.order.data() + first;
                for (Index r = 0; r < rows; ++r) {
                    std::memcpy(rows_in + r * H * b, f.x + (block_pairs[r] / Kp) * H * b, H * b);
                }
                detail::expert_gemm(rows_in, f.dtype, rows, detail::quant_matrix(w13_, s), 0, 2 * I,
                                    gate_up, 2 * I, dequant);
                swiglu_rows(gate_up, rows, I, limit, f.dtype, a);
                detail::expert_gemm(a, f.dtype, rows, detail::quant_matrix(w2_, s), 0, H, down, H,
                                    dequant);
                for (Index r = 0; r < rows; ++r) {
                    const Index pair = block_pairs[r];
                    const float* src = down + r * H;
                    if (f.dtype == ActivationDType::kBFloat16) {
                        auto* dst = reinterpret_cast<std::uint16_t*>(y) + pair * H;
                        const float w = weights[pair];
                        for (Index h = 0; h < H; ++h) dst[h] = float_to_bf16_bits(src[h] * w);
                    } else {
                        std::memcpy(reinterpret_cast<float*>(y) + pair * H, src, H * sizeof(float));
                    }
                }
            }
        }
    });
    f.stats.routed_lanes = lanes;
    return out;
}

// float32: out = rsf * sum_k w_k y_k, columns in order. bf16: out = bf16(sum_k y_k) (the weights
// are in Y already), then, without a separate shared expert, out = bf16(rsf * out); with one,
// add_shared_output applies rsf. In place, out is hidden, read above only.
void DeepSeekMoE::combine_routed(Forward& f, const ExpertOutputs& y) const {
    const Index T = f.num_tokens, H = config_.hidden_size;
    const Index Kp = config_.top_k + config_.num_fused_shared();
    const std::int32_t* ids = f.topk_ids.data();
    const float* weights = f.topk_weights.data();
    const float rsf = config_.routed_scaling_factor;
    const Index combine_blocks = (T + kCombineRows - 1) / kCombineRows;
    if (f.dtype == ActivationDType::kFloat32) {
        parallel_for(combine_blocks, 1, [&](Index begin, Index end) {
            f.kernels.combine_rows(y.y.f32.data(), ids, weights, Kp, H, rsf, begin * kCombineRows,
                                   std::min(T, end * kCombineRows), f.out_f32());
        });
        return;
    }
    const bool scale_here = config_.shared_intermediate_size() == 0 || config_.fuse_shared_experts;
    const std::uint16_t* yb = y.y.bf16.data();
    parallel_for(combine_blocks, 1, [&](Index begin, Index end) {
        for (Index t = begin * kCombineRows; t < std::min(T, end * kCombineRows); ++t) {
            std::uint16_t* o = f.out_bf16() + t * H;
            for (Index h = 0; h < H; ++h) {
                float sum = 0.0f;
                for (Index k = 0; k < Kp; ++k) {
                    if (ids[t * Kp + k] >= 0) sum += bf16_bits_to_float(yb[(t * Kp + k) * H + h]);
                }
                const std::uint16_t routed = float_to_bf16_bits(sum);
                o[h] = scale_here ? float_to_bf16_bits(rsf * bf16_bits_to_float(routed)) : routed;
            }
        }
    });
}

// Combine: out += shared_out (float32), or out = bf16(shared_out + rsf * out) (bf16); shared_out
// is freed here.
void DeepSeekMoE::add_shared_output(Forward& f) const {
    const Index n = f.num_tokens * config_.hidden_size;
    if (f.dtype == ActivationDType::kFloat32) {
        f.kernels.add_values(f.out_f32(), f.shared_out.data(), n);
    } else {
        const float rsf = config_.routed_scaling_factor;
        std::uint16_t* o = f.out_bf16();
        const float* s = f.shared_out.data();
        for (Index i = 0; i < n; ++i) {
            o[i] = float_to_bf16_bits(s[i] + rsf * bf16_bits_to_float(o[i]));
        }
    }
    f.shared_out.release();
    f.stats.steps.emplace_back("combine");
}

}  // namespace moelb
