// The DeepSeek MoE layer and its forward on CPU (DESIGN section 6; reference/moe_layer.md): the
// routed weights held per physical slot, the placement they follow, the memory model of the
// forward's workspace, and the forward itself, step by step (shared expert, gate, top-k, routed
// experts, combine).
#include "moelb/moe_layer.hpp"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>

#include "isa/kernels.hpp"
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

using ConstRowMap = Eigen::Map<const RowMatrix<float>>;

void check_config_shape(const char* name, Index rows, Index cols, Index want_rows,
                        Index want_cols) {
    MOELB_CHECK_ARG(rows == want_rows && cols == want_cols,
                    name << " has shape [" << rows << ", " << cols << "], expected [" << want_rows
                         << ", " << want_cols << "]");
}

// The shapes of the expert weights: w13 [E, 2I, H], w2 [E, H, I], the separate shared expert's
// gate/up [2 Is, H] and down [H, Is].
void check_expert_weights(const DeepSeekMoEConfig& config, const DeepSeekMoEWeights& weights) {
    const Index H = config.hidden_size, I = config.intermediate_size, E = config.num_experts;
    const Index Is = config.shared_intermediate_size();
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
}

}  // namespace

// One forward's state: its input and output, the workspace every temporary comes from, the
// buffers that live from one step to a later one, and the statistics it reports.
struct DeepSeekMoE::Forward {
    Forward(MatrixMap<float> hidden, MatrixMap<float> output, MoEForwardStats& forward_stats)
        : x(hidden.data(), hidden.rows(), hidden.cols()),
          out(output),
          num_tokens(hidden.rows()),
          threads(get_num_threads()),
          kernels(isa::kernels()),
          stats(forward_stats) {}

    ConstRowMap x;         // hidden [T, H]
    MatrixMap<float> out;  // [T, H]
    Index num_tokens;      // T
    int threads;
    const isa::Kernels& kernels;  // the GEMM and SwiGLU kernels' ISA path (moelb/cpu_isa.hpp)
    MoEForwardStats& stats;
    Workspace ws;
    Workspace::Buffer<float> shared_out;           // [T, H]: the separate shared expert's output
    Workspace::Buffer<float> logits;               // [T, E]: router logits, until top-k
    Workspace::Buffer<std::int32_t> topk_ids;      // [T, K']: physical slots (-1: none)
    Workspace::Buffer<float> topk_weights;         // [T, K']
    Workspace::Buffer<std::int32_t> recorder_ids;  // [T, K]
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

DeepSeekMoE::DeepSeekMoE(DeepSeekMoEConfig config, const DeepSeekMoEWeights& weights,
                         std::optional<ExpertLocation> location, int layer, int ep_rank)
    : config_(std::move(config)),
      location_(location ? std::move(*location)
                         : ExpertLocation::trivial(1, config_.num_experts, config_.num_experts, 1)),
      layer_(layer),
      ep_rank_(ep_rank),
      num_physical_(0) {
    config_.validate();
    const Index H = config_.hidden_size, E = config_.num_experts;
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
    // Routed weights per physical slot; the fused shared expert after them.
    const std::size_t w13_row = w13_row_elements(), w2_row = w2_row_elements();
    const int F = config_.num_fused_shared();
    w13_.resize(w13_row * (num_physical_ + F));
    w2_.resize(w2_row * (num_physical_ + F));
    for (int p = 0; p < num_physical_; ++p) {
        const std::size_t e = location_.physical_to_logical()(layer_, p);
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

std::int64_t DeepSeekMoE::expected_peak_bytes(const DeepSeekMoEConfig& config, Index num_tokens,
                                              int num_physical_experts, int routed_lanes,
                                              int shared_lanes) {
    if (num_tokens == 0) return 0;
    const std::int64_t b = 4, T = num_tokens, H = config.hidden_size, I = config.intermediate_size;
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

// ---------------------------------------------------------------------------------------------
// The forward, step by step (the step order and the buffers' lifetimes are the memory model
// above).

void DeepSeekMoE::run_forward(MatrixMap<float> hidden, std::span<const std::int64_t> input_ids,
                              MatrixMap<float> out, MoEForwardStats& stats) const {
    check_forward_args(hidden, input_ids, out);
    stats = MoEForwardStats{};
    stats.deferred_shared = config_.defers_shared();
    if (hidden.rows() == 0) return;

    Forward f(hidden, out, stats);
    const bool has_shared = config_.shared_intermediate_size() > 0 && !config_.fuse_shared_experts;
    const bool inplace = config_.kernel == RoutedKernel::kInplace;
    // The caller's output counts as live from the routed step on (in place, it is the input).
    const Index out_bytes = f.num_tokens * config_.hidden_size * static_cast<Index>(sizeof(float));

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

void DeepSeekMoE::check_forward_args(MatrixMap<float> hidden,
                                     std::span<const std::int64_t> input_ids,
                                     MatrixMap<float> out) const {
    const Index T = hidden.rows(), H = config_.hidden_size;
    MOELB_CHECK_ARG(hidden.cols() == H, "hidden has shape [" << T << ", " << hidden.cols()
                                                             << "] but hidden_size=" << H);
    MOELB_CHECK_ARG(out.rows() == T && out.cols() == H,
                    "out has shape [" << out.rows() << ", " << out.cols() << "], expected [" << T
                                      << ", " << H << "]");
    const float* x_begin = hidden.data();
    const float* x_end = x_begin + T * H;
    if (config_.kernel == RoutedKernel::kInplace) {
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
}

// Shared expert: shared_out [T, H] = the separate shared MLP of every token, in row blocks.
void DeepSeekMoE::run_shared_expert(Forward& f) const {
    const Index T = f.num_tokens, H = config_.hidden_size;
    const Index Is = config_.shared_intermediate_size();
    f.shared_out = f.ws.allocate<float>(T * H, "shared_out");
    const Index blocks = (T + kBlockRows - 1) / kBlockRows;
    const int lanes = static_cast<int>(std::min<Index>(f.threads, blocks));
    auto scratch = f.ws.allocate<float>(lanes * kBlockRows * (2 * Is + H), "shared_scratch");
    const float limit = config_.effective_shared_swiglu_limit();
    parallel_for(lanes, 1, [&](Index begin, Index end) {
        for (Index lane = begin; lane < end; ++lane) {
            float* gu = scratch.data() + lane * kBlockRows * (2 * Is + H);
            float* y_cm = gu + kBlockRows * 2 * Is;
            for (Index blk = lane; blk < blocks; blk += lanes) {
                const Index r0 = blk * kBlockRows, rows = std::min(kBlockRows, T - r0);
                f.kernels.mlp_rows(f.x.data() + r0 * H, rows, H, Is, shared_gate_up_.data(),
                                   shared_down_.data(), limit, gu, y_cm);
                f.kernels.store_rows(y_cm, rows, H, f.shared_out.data() + r0 * H, nullptr);
            }
        }
    });
    f.stats.shared_lanes = lanes;
    f.stats.steps.emplace_back("shared");
}

// Gate: router logits [T, E], in fixed row blocks.
void DeepSeekMoE::compute_router_logits(Forward& f) const {
    const Index T = f.num_tokens, E = config_.num_experts;
    f.logits = f.ws.allocate<float>(T * E, "router_logits");
    const Index blocks = (T + kBlockRows - 1) / kBlockRows;
    parallel_for(blocks, 1, [&](Index begin, Index end) {
        for (Index blk = begin; blk < end; ++blk) {
            const Index r0 = blk * kBlockRows, rows = std::min(kBlockRows, T - r0);
            f.kernels.gate_rows(f.x.data() + r0 * f.x.cols(), rows, f.x.cols(), gate_.data(), E,
                                f.logits.data() + r0 * E);
        }
    });
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
        const Workspace::Buffer<float> y = run_expert_blocks(f, pairs);
        combine_routed(f, y.data());
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

// Y [T K', H]: row t * K' + k is the output of pair (t, k)'s expert (rows of padded pairs are
// not written). Each lane gathers a block's input rows, runs the slot's MLP over them in place
// and scatters the outputs.
Workspace::Buffer<float> DeepSeekMoE::run_expert_blocks(Forward& f, const SlotPairs& pairs) const {
    const Index T = f.num_tokens, H = config_.hidden_size, I = config_.intermediate_size;
    const Index Kp = config_.top_k + config_.num_fused_shared();
    const Index Pp = num_physical_ + config_.num_fused_shared();
    const Index blocks = pairs.num_blocks;
    const int lanes = static_cast<int>(std::max<Index>(1, std::min<Index>(f.threads, blocks)));
    auto y = f.ws.allocate<float>(T * Kp * H, "expert_out");
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
                const Index s =
                    std::upper_bound(block_begin, block_end, static_cast<std::int32_t>(blk)) -
                    block_begin - 1;
                const Index first = offsets[s] + (blk - block_begin[s]) * kBlockRows;
                const Index rows = std::min<Index>(kBlockRows, offsets[s + 1] - first);
                const std::int32_t* block_pairs = pairs.order.data() + first;
                for (Index r = 0; r < rows; ++r) {
                    std::memcpy(rows_in + r * H, f.x.data() + (block_pairs[r] / Kp) * H,
                                H * sizeof(float));
                }
                // The expert's output overwrites its gathered inputs, then scatters.
                f.kernels.mlp_rows(rows_in, rows, H, I, w13_.data() + s * w13_row_elements(),
                                   w2_.data() + s * w2_row_elements(), limit, gate_up, rows_in);
                f.kernels.store_rows(rows_in, rows, H, y.data(), block_pairs);
            }
        }
    });
    f.stats.routed_lanes = lanes;
    return y;
}

// out = rsf * sum_k w_k y_k, columns in order. In place, out is hidden, read above only.
void DeepSeekMoE::combine_routed(Forward& f, const float* y) const {
    const Index T = f.num_tokens, H = config_.hidden_size;
    const Index Kp = config_.top_k + config_.num_fused_shared();
    const std::int32_t* ids = f.topk_ids.data();
    const float* weights = f.topk_weights.data();
    const float rsf = config_.routed_scaling_factor;
    const Index combine_blocks = (T + kCombineRows - 1) / kCombineRows;
    parallel_for(combine_blocks, 1, [&](Index begin, Index end) {
        f.kernels.combine_rows(y, ids, weights, Kp, H, rsf, begin * kCombineRows,
                               std::min(T, end * kCombineRows), f.out.data());
    });
}

// Combine: out += shared_out (freed here).
void DeepSeekMoE::add_shared_output(Forward& f) const {
    f.kernels.add_values(f.out.data(), f.shared_out.data(), f.num_tokens * config_.hidden_size);
    f.shared_out.release();
    f.stats.steps.emplace_back("combine");
}

}  // namespace moelb
