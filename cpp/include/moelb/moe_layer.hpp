// The DeepSeek MoE layer forward on CPU (DESIGN section 6; reference/moe_layer.md):
//
//     out(x) = rsf * sum_k w_k * expert_{id_k}(x) + shared(x),
//     expert(x) = W2 (silu(g) * u),  g = min(W1 x, L),  u = clamp(W3 x, -L, L)   (L: swiglu_limit)
//
// with the router of DeepSeek-V3 (sigmoid, grouped top-k with correction bias) or V4 (sqrt-softplus
// top-k; hash routing from the token id in the first num_hash_layers layers), the shared expert
// separate or fused as routed expert E, and the routed weights held per physical slot of an
// ExpertLocation (so EPLB weight moves apply to them). The experts' matrices are stored in the
// config's weight_format (float32, bfloat16, fp8_e4m3 with block scales, int8 per channel;
// moelb/weight_format.hpp) and hidden / the output are in its activation_dtype (float32 or bf16).
//
// Memory: every temporary of the forward comes from a byte-counting Workspace, and the order of
// the steps follows SGLang's forward_normal, including PR #25279: with an out-of-place routed
// kernel the shared expert runs after the routed experts ("deferred"), when the routed
// workspace is already freed, which lowers the peak by one [T, H] buffer. The peak formulas are
// documented at DeepSeekMoE::expected_peak_bytes (moe_layer.cpp).
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "moelb/dispatch.hpp"
#include "moelb/expert_location.hpp"
#include "moelb/hash_router.hpp"
#include "moelb/routing.hpp"
#include "moelb/views.hpp"
#include "moelb/weight_format.hpp"

namespace moelb {

// kInplace: the routed kernel writes the layer output into its input buffer (SGLang's Triton
// path), so the shared expert must read the input first. kOutOfPlace: the input stays intact.
enum class RoutedKernel { kInplace, kOutOfPlace };
// kAuto: defer the shared expert exactly when the routed kernel is out-of-place.
enum class DeferShared { kAuto, kYes, kNo };

RoutedKernel parse_routed_kernel(std::string_view name, std::string_view param = "kernel");
std::string_view to_string(RoutedKernel kernel);

struct DeepSeekMoEConfig {
    int hidden_size = 0;        // H
    int intermediate_size = 0;  // I: per routed expert
    int num_experts = 0;        // E: routed (logical) experts
    int top_k = 0;              // K
    // n_shared: the shared expert's intermediate size is I * n_shared (0: no shared expert).
    int num_shared_experts = 1;
    // F = 1: the shared expert is routed expert E (row E of w13 / w2, after the physical slots),
    // chosen by every token with weight 1/rsf (needs num_shared_experts = 1 and renormalize).
    bool fuse_shared_experts = false;
    Scoring scoring = Scoring::kSigmoid;
    int num_groups = 0;  // grouped selection (0: ungrouped)
    int topk_group = 0;
    bool renormalize = true;
    float routed_scaling_factor = 1.0f;
    int num_hash_layers = 0;  // layers [0, num_hash_layers) route by token id (V4)
    int layer_id = 0;
    int vocab_size = 0;  // hash layers: rows of tid2eid
    // SwiGLU clamp L (gate <= L, |up| <= L) for the routed experts and for the shared expert; 0 is
    // none. shared_swiglu_limit < 0: the same as swiglu_limit.
    float swiglu_limit = 0.0f;
    float shared_swiglu_limit = -1.0f;
    RoutedKernel kernel = RoutedKernel::kOutOfPlace;
    DeferShared defer_shared = DeferShared::kAuto;
    // The stored format of the routed and shared experts' matrices (moelb/weight_format.hpp; the
    // router gate stays float32), the fp8 scale block (rows, cols) and the dtype of hidden and of
    // the output.
    WeightFormat weight_format = WeightFormat::kFloat32;
    BlockSize weight_block_size{};
    ActivationDType activation_dtype = ActivationDType::kFloat32;

    bool is_hash_layer() const { return layer_id < num_hash_layers; }
    int shared_intermediate_size() const { return intermediate_size * num_shared_experts; }
    int num_fused_shared() const { return fuse_shared_experts ? 1 : 0; }
    float effective_shared_swiglu_limit() const {
        return shared_swiglu_limit < 0 ? swiglu_limit : shared_swiglu_limit;
    }
    // Whether the shared expert (separate, not fused) runs after the routed experts.
    bool defers_shared() const;
    // Float32 weights and activations: the forward's original Eigen kernels (moe_kernels.cpp);
    // otherwise every expert projection is the quantised GEMM (expert_gemm.hpp).
    bool uses_float32_kernels() const {
        return weight_format == WeightFormat::kFloat32 &&
               activation_dtype == ActivationDType::kFloat32;
    }
    // The routing of non-hash layers (F included; rsf applied by the layer, not in the weights).
    TopKConfig topk_config() const;
    // InvalidArgument naming the field.
    void validate() const;

    // reference/moe_layer.md section 1. layer_id decides hash routing (V4: layers 0-2).
    static DeepSeekMoEConfig deepseek_v3(int layer_id = 3);
    static DeepSeekMoEConfig deepseek_v4_flash(int layer_id = 3);
    static DeepSeekMoEConfig deepseek_v4_pro(int layer_id = 3);
};

// Logical weights, row-major. The expert matrices are in the config's weight_format (with its
// scales; fp8 blocks of weight_block_size), the gate and bias float32. w13 rows [0, I) are the
// gate projection, [I, 2I) the up projection (SGLang's w13_weight layout); for fp8 their scale
// grids concatenate too (hence intermediate_size % weight_block_size.rows == 0).
struct DeepSeekMoEWeights {
    RowMatrix<float> gate;               // [E, H]
    std::vector<float> correction_bias;  // [E], or empty (none; hash layers have none)
    WeightTensor w13;                    // [E, 2I, H]
    WeightTensor w2;                     // [E, H, I]
    WeightTensor shared_gate_up;         // [1, 2 Is, H] (gate rows first), or empty without shared
    WeightTensor shared_down;            // [1, H, Is]
    RowMatrix<std::int32_t> tid2eid;     // [vocab_size, K], hash layers only

    // Seeded random weights of the config's shapes (scaled like a trained layer: unit-variance
    // activations through each projection), drawn in float32 and quantised into the config's
    // weight_format (WeightTensor::quantize). The float32 draws do not depend on the format.
    static DeepSeekMoEWeights random(const DeepSeekMoEConfig& config, std::uint64_t seed);
};

// A counter of live bytes: every temporary buffer of a forward is allocated here.
class Workspace {
  public:
    static constexpr std::size_t kAlignment = 64;
    // Buffers of at least kHugeBufferBytes are aligned to kHugePageBytes and, on Linux, backed by
    // transparent huge pages where the system allows it (madvise): a [T K', H] buffer of 4 KiB
    // pages costs one page fault per page on every forward.
    static constexpr std::size_t kHugePageBytes = std::size_t{2} << 20;
    static constexpr std::size_t kHugeBufferBytes = 4 * kHugePageBytes;

    // An owned float, int32 or uint16 (bf16) buffer; returns its bytes to the count when
    // destroyed.
    template <class T>
    class Buffer {
      public:
        Buffer() = default;
        Buffer(Workspace* owner, Index count, std::string name);
        Buffer(Buffer&& other) noexcept;
        Buffer& operator=(Buffer&& other) noexcept;
        Buffer(const Buffer&) = delete;
        Buffer& operator=(const Buffer&) = delete;
        ~Buffer() { release(); }
        T* data() { return data_.get(); }
        const T* data() const { return data_.get(); }
        Index size() const { return size_; }
        const std::string& name() const { return name_; }
        void release();

      private:
        struct Free {
            std::size_t alignment = kAlignment;
            void operator()(T* p) const { ::operator delete[](p, std::align_val_t{alignment}); }
        };
        Workspace* owner_ = nullptr;
        // Uninitialised (every buffer is written before it is read) and 64-byte aligned, so that
        // the vectorised kernels see the same alignment on every call: Eigen's kernels may split
        // a sum differently at another alignment, which would change the last bits.
        std::unique_ptr<T[], Free> data_;
        Index size_ = 0;
        std::string name_;
    };

    template <class T>
    Buffer<T> allocate(Index count, std::string name) {
        return Buffer<T>(this, count, std::move(name));
    }
    std::int64_t live_bytes() const { return live_; }
    std::int64_t peak_bytes() const { return peak_; }
    // Counts memory owned elsewhere (the caller's output) as live, or no longer live.
    void track(std::int64_t bytes) { add(bytes); }
    void untrack(std::int64_t bytes) { remove(bytes); }

  private:
    void add(std::int64_t bytes) {
        live_ += bytes;
        if (live_ > peak_) peak_ = live_;
    }
    void remove(std::int64_t bytes) { live_ -= bytes; }
    std::int64_t live_ = 0;
    std::int64_t peak_ = 0;
};

struct MoEForwardStats {
    std::int64_t peak_bytes = 0;     // peak live workspace bytes (the input and output excluded)
    std::vector<std::string> steps;  // e.g. gate, topk, routed, shared, combine
    bool deferred_shared = false;
    // Parallel lanes whose scratch was live: min(threads, row blocks) of the routed and shared
    // steps, and of the gate with bf16 activations (0 with float32 activations: no scratch).
    int routed_lanes = 0;
    int shared_lanes = 0;
    int gate_lanes = 0;
};

class DeepSeekMoE {
  public:
    // The layer with its routed weights per physical slot of `location`'s layer `layer`
    // (default: the trivial placement, slot = expert), routing from the view of `ep_rank` (static
    // dispatch).
    DeepSeekMoE(DeepSeekMoEConfig config, const DeepSeekMoEWeights& weights,
                std::optional<ExpertLocation> location = std::nullopt, int layer = 0,
                int ep_rank = 0);

    const DeepSeekMoEConfig& config() const { return config_; }
    int num_physical_experts() const { return num_physical_; }  // P
    const ExpertLocation& location() const { return location_; }
    int layer() const { return layer_; }

    // hidden [T, H] in the config's activation_dtype (float32, or bf16 bits as uint16); input_ids
    // [T] (hash layers only, each in [0, vocab_size)); out [T, H] of the same dtype. Out-of-place
    // kernel: hidden is read only and out must not overlap it. In-place kernel: out must be hidden
    // itself (the result overwrites the input). The overload of the other dtype is an
    // InvalidArgument.
    // Threads: forwards of one layer may run concurrently (they only read the weights and the
    // placement; each publishes its statistics under a lock). set_location and writes through
    // routed_w13 / routed_w2 must not overlap a forward.
    void forward(MatrixMap<float> hidden, std::span<const std::int64_t> input_ids,
                 MatrixMap<float> out);
    void forward(MatrixMap<std::uint16_t> hidden, std::span<const std::int64_t> input_ids,
                 MatrixMap<std::uint16_t> out);
    // The statistics of the last forward that completed.
    MoEForwardStats last_stats() const;

    // Routed weights per physical slot, in the stored format: the bytes of w13 [P, 2I, H] and w2
    // [P, H, I], and their scales (fp8: [P, ceil(2I / br), ceil(H / bc)] and [P, ceil(H / br),
    // ceil(I / bc)]; int8: [P, 2I] and [P, H]; empty otherwise). The fused shared expert, if any,
    // is slot P, after them, and is not part of these spans.
    std::span<std::byte> routed_w13() {
        return w13_.bytes().first(w13_.matrix_bytes() * num_physical_);
    }
    std::span<std::byte> routed_w2() {
        return w2_.bytes().first(w2_.matrix_bytes() * num_physical_);
    }
    std::span<float> routed_w13_scale_inv() {
        return w13_.scale_inv().first(w13_.matrix_scales() * num_physical_);
    }
    std::span<float> routed_w2_scale_inv() {
        return w2_.scale_inv().first(w2_.matrix_scales() * num_physical_);
    }
    // All P + F slots ([P + F, 2I, H] and [P + F, H, I]); the fused shared expert is matrix P.
    const WeightTensor& w13() const { return w13_; }
    const WeightTensor& w2() const { return w2_; }
    // The separate shared expert's matrices ([1, 2 Is, H], [1, H, Is]; empty without one).
    const WeightTensor& shared_gate_up() const { return shared_gate_up_; }
    const WeightTensor& shared_down() const { return shared_down_; }

    // Switches to another placement of the same shape (after its weight moves were applied to
    // the routed slots' bytes and scales).
    void set_location(ExpertLocation location, int layer);

    // The peak workspace bytes of a forward of T tokens over P physical slots whose routed,
    // shared and gate steps ran on `routed_lanes` / `shared_lanes` / `gate_lanes` lanes
    // (MoEForwardStats; gate_lanes counts with bf16 activations only), in the step
    // order of `config` (deferred or not; in-place or not) and its weight format and activation
    // dtype, from the formulas documented in moe_layer.cpp (in element sizes). Needs no weights:
    // it sizes DeepSeek-scale layers that do not fit in memory.
    // Bytes of scratch the quantised GEMM needs per lane for `rows` rows of x with k columns on
    // the ISA path this process runs (4 D(k) in moe_layer.cpp's memory model, for rows = M =
    // 128): its x panel, accumulators and dequantised W panel.
    static std::int64_t gemm_scratch_bytes(Index rows, Index k);

    static std::int64_t expected_peak_bytes(const DeepSeekMoEConfig& config, Index num_tokens,
                                            int num_physical_experts, int routed_lanes,
                                            int shared_lanes, int gate_lanes = 0);

  private:
    // One forward's buffers and statistics, and the routed pairs sorted by slot (moe_layer.cpp).
    struct Forward;
    struct SlotPairs;
    struct ExpertOutputs;

    // The forward's steps, in the order run_forward calls them.
    void run_forward(Forward& f, std::span<const std::int64_t> input_ids) const;
    void check_forward_args(ActivationDType dtype, const void* hidden, Index rows, Index cols,
                            std::span<const std::int64_t> input_ids, const void* out,
                            Index out_rows, Index out_cols) const;
    void run_shared_expert(Forward& f) const;
    void run_shared_expert_quantized(Forward& f) const;
    void compute_router_logits(Forward& f) const;
    void select_topk(Forward& f, std::span<const std::int64_t> input_ids) const;
    void run_routed_experts(Forward& f) const;
    SlotPairs sort_pairs_by_slot(Forward& f) const;
    ExpertOutputs run_expert_blocks(Forward& f, const SlotPairs& pairs) const;
    ExpertOutputs run_expert_blocks_quantized(Forward& f, const SlotPairs& pairs) const;
    void combine_routed(Forward& f, const ExpertOutputs& y) const;
    void add_shared_output(Forward& f) const;

    DeepSeekMoEConfig config_;
    ExpertLocation location_;
    int layer_;
    int ep_rank_;
    int num_physical_;
    RowMatrix<float> gate_;
    std::vector<float> bias_;
    WeightTensor w13_;  // [P + F, 2I, H]
    WeightTensor w2_;   // [P + F, H, I]
    WeightTensor shared_gate_up_;
    WeightTensor shared_down_;
    std::optional<HashRouter> hash_router_;
    MoEForwardStats stats_;
    std::unique_ptr<std::mutex> stats_mutex_ = std::make_unique<std::mutex>();
};

}  // namespace moelb
