// Private: the hot kernels compiled once per ISA path (moelb/cpu_isa.hpp) and the table the core
// calls them through.
//
// Each path's translation units (cpp/src/isa/*_kernels.cpp, kernel_table.cpp) are compiled with
// that path's flags and
//   -DMOELB_ISA_NS=isa_<path>  their functions' namespace, moelb::isa_<path>,
//   -DEigen=moelb_isa_<path>_Eigen  Eigen's namespace renamed,
// so that no function they define -- theirs or an inline/template one from a header -- has the
// name of one compiled for another path. (Otherwise the linker keeps one copy of each inline
// function, possibly an AVX-512 one for the baseline path.) They therefore include nothing that
// declares moelb's public types: this header uses plain pointers and integers only, and
// cmake/check_isa_symbols.cmake fails the build if a path's object files define any external
// symbol without its tag.
#pragma once

#include <cstddef>
#include <cstdint>

namespace moelb::isa {

using Index = std::int64_t;

// The score function of a routing row (moelb::Scoring, whose values these mirror).
enum class ScoreFn : int { kSoftmax = 0, kSigmoid = 1, kSqrtSoftplus = 2 };

// One routing problem: rows of router logits and the top-k rule (moelb::TopKConfig).
struct RouteRowsArgs {
    const float* logits = nullptr;  // [T, E] float32, row-major, row stride = num_experts
    int num_experts = 0;            // E
    int top_k = 0;                  // K
    ScoreFn scoring = ScoreFn::kSoftmax;
    int num_groups = 0;           // 0: ungrouped; else E % num_groups == 0
    int topk_group = 0;           // groups kept (grouped only)
    bool group_max = false;       // group score: the max (true) or the sum of the top two (false)
    const float* bias = nullptr;  // [E] correction bias (selection only), or null
};

// The EPLB packing's swap search state (planner::Packing, planner::PackScratch), for best_swap.
struct SwapScan {
    const double* bin_load = nullptr;    // [bins]
    const int* slot_expert = nullptr;    // [bins * size]: bin b's experts at [b * size, ...)
    int size = 0;                        // slots per bin
    const double* slot_load = nullptr;   // [bins * load_stride]: each slot's replica load (+inf
    int load_stride = 0;                 //   padding to a multiple of 4)
    const float* slot_load32 = nullptr;  // the same in float32 ([bins * load_stride32], padding to
    int load_stride32 = 0;               //   a multiple of 8), when use_float
    bool use_float = false;
    const int* tie_key = nullptr;  // [bins]: ties between partners go to the smaller key
    double rel_tol = 0.0;          // a load must drop by this much (relative) to count as lower
};

// A swap of bin(a)[xi] with bin(b)[yi]; b < 0: none. tied: another partner offers an equally
// good swap.
struct SwapChoice {
    int b = -1, xi = -1, yi = -1;
    bool tied = false;
};

// The simulator's scoring of steps (moelb::score_steps): rows of per-step counts (row = step * L
// + layer) on one placement.
struct ScoreRows {
    const std::int32_t* counts = nullptr;   // [rows, E] int32 token counts
    Index num_layers = 0;                   // L
    Index num_experts = 0;                  // E
    const double* inv_replicas = nullptr;   // [L, E]: 1 / replicas of each expert
    const std::int32_t* phy2log = nullptr;  // [L, P]: physical_to_logical
    Index num_physical_experts = 0;         // P
    int ep_size = 0;                        // W
    int slots_per_rank = 0;                 // S = P / W
};

// The stored type of a weight matrix (quant_gemm's right-hand side); moelb::WeightFormat's values.
enum class WeightType : int { kFloat32 = 0, kBfloat16 = 1, kFp8E4m3 = 2, kInt8 = 3 };
// The type of quant_gemm's left-hand side (moelb's activation dtype).
enum class ActivationType : int { kFloat32 = 0, kBfloat16 = 1 };

// A weight matrix W [rows, cols] (row-major, row stride = cols) in its stored type, with the scales
// that dequantise it (docs/architecture.md, "Weight formats"):
//   kFloat32   float;
//   kBfloat16  std::uint16_t, the bf16 bits (w = the bf16 value);
//   kFp8E4m3   std::uint8_t, E4M3FN (bias 7, no inf, 0x7F / 0xFF NaN), w[r, c] = fp8(q[r, c]) *
//              scale_inv[(r / block_rows) * ceil(cols / block_cols) + c / block_cols] (the block
//              grid [ceil(rows / block_rows), ceil(cols / block_cols)] row-major; partial last
//              blocks);
//   kInt8      std::int8_t, w[r, c] = q[r, c] * scale_inv[r] (one scale per row).
// quant_gemm applies the scales after the products (quant_kernels.cpp's header has the exact
// order): int8 y = (sum of x * q) * scale_inv[r], fp8 each lane's sum over one scale block times
// that block's scale, so every product is x * q (exact codes) rounded once. A bf16 W and its
// float32 values give the same bits; int8 and fp8 W do not match their float32 dequantisation bit
// for bit (the usual float32 dot-product error bound holds).
struct QuantWeights {
    WeightType type = WeightType::kFloat32;
    const void* data = nullptr;
    Index rows = 0;                    // n
    Index cols = 0;                    // k
    const float* scale_inv = nullptr;  // kFp8E4m3 and kInt8 (see above); unused otherwise
    Index block_rows = 128;            // kFp8E4m3 only, >= 1
    Index block_cols = 128;            // kFp8E4m3 only, >= 1
};

// One call of quant_gemm: y[i, j] = sum over c of x[i, c] * w[j, c] for i in [0, m) and j in
// [n_begin, n_end).
struct QuantGemmArgs {
    const void* x = nullptr;  // [m, w.cols]: float, or std::uint16_t bf16 bits
    ActivationType x_type = ActivationType::kFloat32;
    Index m = 0;
    Index x_stride = 0;  // elements between rows of x (>= w.cols)
    QuantWeights w;
    Index n_begin = 0, n_end = 0;  // 0 <= n_begin <= n_end <= w.rows
    float* y = nullptr;            // y[i, j] at y[i * y_stride + j] (j absolute, not - n_begin)
    Index y_stride = 0;
    void* scratch = nullptr;  // >= quant_gemm_scratch_bytes(m, w.cols) bytes, any alignment
    std::size_t scratch_bytes = 0;
};

// order_descending and replica_order rank at most this many items by vector comparisons.
inline constexpr int kSmallSortItems = 96;

struct Kernels {
    // Routing of rows [begin, end) of args.logits: per row r = t - begin, ids[r K, r K + K) gets
    // the K expert ids in descending selection score (score + bias; NaN logits last; ties to the
    // lowest id), scores[r K, r K + K) their unbiased scores.
    void (*route_rows)(const RouteRowsArgs& args, Index begin, Index end, std::int32_t* ids,
                       float* scores);
    // The hash router's weights of `rows` rows: values[r K + k] = the score of expert
    // expert_ids[r K + k] in row r of logits [rows, E] (row-major) -- the softmax over the whole
    // (sanitised) row, or sigmoid / sqrt-softplus of that logit alone.
    void (*hash_scores)(ScoreFn scoring, const float* logits, Index num_experts, Index rows,
                        const std::int32_t* expert_ids, int top_k, float* values);

    // logits [rows, E] (row-major) = x [rows, H] (row-major) * gate [E, H]^T (row-major).
    void (*gate_rows)(const float* x, Index rows, Index hidden_size, const float* gate,
                      Index num_experts, float* logits);
    // One SwiGLU MLP: y_cm [rows, H] (column-major) from x [rows, H] (row-major) through gate_up
    // [rows, 2 I] (scratch), with w_gate_up [2 I, H] and w_down [H, I] row-major and the clamp
    // `limit` (0: none). x and y_cm may be the same memory.
    void (*mlp_rows)(const float* x, Index rows, Index hidden_size, Index intermediate_size,
                     const float* w_gate_up, const float* w_down, float limit, float* gate_up,
                     float* y_cm);
    // Row r of y_cm [rows, H] (column-major) to dst + (dst_rows ? dst_rows[r] : r) * H.
    void (*store_rows)(const float* y_cm, Index rows, Index hidden_size, float* dst,
                       const std::int32_t* dst_rows);
    // For t in [begin, end): out row t = rsf * sum over k with ids[t K' + k] >= 0, in k order, of
    // weights[t K' + k] * y row (t K' + k); K' = num_columns, out [T, H] and y [T K', H]
    // row-major.
    void (*combine_rows)(const float* y, const std::int32_t* ids, const float* weights,
                         Index num_columns, Index hidden_size, float rsf, Index begin, Index end,
                         float* out);
    // out[0, n) += in[0, n).
    void (*add_values)(float* out, const float* in, Index n);

    // EPLB (cpp/src/eplb/; compiled with -ffp-contract=off, so plans are the same bits on every
    // path). The descriptions are at the callers: packing.cpp's best_swap, deepseek.cpp's
    // rank_descending (order_descending for n < kSmallSortItems), replica_order and
    // narrow_balanced_packing, step_peak.cpp's search_pairs (peak_change, other_change).
    SwapChoice (*best_swap)(const SwapScan& scan, int a, double limit, const int* by_load,
                            int first, int last);
    void (*rank_descending)(const float* w, int num_items, int* order);
    bool (*replica_order)(const float* u, const int* count, const int* phy2exp, int num_items,
                          int slots, int* order);
    void (*narrow_balanced_packing)(const float* w, const int* order, int num_items, int num_packs,
                                    int* pack, int* rank, int instances);
    double (*peak_change)(const double* cx, const double* cy, const double* ga, const double* gb,
                          const double* rest, Index stride);
    Index (*other_change)(const double* ux, const double* uy, const double* la, const double* lb,
                          const double* rest, const double* top1, const double* other_a,
                          const double* reach, Index chunks, Index chunk_steps, double peak_change,
                          double bound, double* change);

    // The simulator (simulate.cpp; -ffp-contract=off too): for rows [begin, end), max_load[r] =
    // the largest rank's sum of its slots' shares (count / replicas) and total[r] = the row's
    // count, r = row - begin; share: [E] scratch. Returns -1, or row * E + e of the first
    // negative count (the outputs are then unspecified).
    Index (*score_rows)(const ScoreRows& args, Index begin, Index end, double* share,
                        double* max_load, double* total);
    // moelb::step_lower_bounds' fast path for rows [begin, end) of counts [rows, E]: mean[r] =
    // the row's count / ep_size, and needed[r] = the replicas that keep every expert at or below
    // the mean (sum of max(1, ceil(count / mean))), 0 when the mean is 0. Returns -1, or row * E
    // + e of the first negative count.
    Index (*bound_rows)(const std::int32_t* counts, Index num_experts, int ep_size, Index begin,
                        Index end, double* mean, Index* needed);

    // The GEMM with a quantised right-hand side (quant_kernels.cpp), every expert projection's:
    // y[i, j] = sum_c x[i, c] * w[j, c] in float32 (see QuantGemmArgs). y[i, j]'s bits depend
    // only on x row i, W row j (with its scales) and the path: not on m, the column range, the
    // scratch or the caller's threads, so callers may split rows and columns any way. A bf16 x
    // and its float32 values give the same bits (except on the avx512_bf16 path, where a bf16 x
    // with a bf16, int8 or fp8 W runs vdpbf16ps), and so do a bf16 W and its float32 values; int8
    // scales the row's sum, fp8 each scale block's lane sums (see QuantWeights). A NaN fp8 code
    // makes its row's outputs NaN. Small m streams W once (each weight converted in registers and
    // used for every row of x); large m converts blocks of W rows into float32 panels in the
    // scratch and reuses them across all rows. Throws std::invalid_argument (naming the field) on
    // inconsistent arguments.
    void (*quant_gemm)(const QuantGemmArgs& args);
    // The scratch quant_gemm needs for m rows of x and cols = k (this path's; grows as m * k: the
    // caller bounds it by splitting rows).
    std::size_t (*quant_gemm_scratch_bytes)(Index m, Index k);

    // The machine-limit microbenchmarks' loops (limits_kernels.cpp; moelb/machine_limits.hpp).
    // The sum of data[0, n) (n a multiple of 64 floats, data 64-byte aligned), read once with
    // vector loads (AVX paths: 8 streams, the eighths of the range, in lockstep).
    double (*read_sum)(const float* data, Index n);
    // `iterations` rounds of independent float32 FMA chains seeded from `seed`: returns the flops
    // done (2 per lane of each FMA); *sink = a value that depends on every chain.
    std::int64_t (*fma_loop)(std::int64_t iterations, float seed, float* sink);
    // The same with bf16 x bf16 -> float32 dot products (2 flops per product) as this path does
    // them: vdpbf16ps on the avx512_bf16 path, else one operand widened to float32 in registers
    // and FMA.
    std::int64_t (*bf16_dot_loop)(std::int64_t iterations, float seed, float* sink);
    // How bf16_dot_loop computes ("avx512_bf16 vdpbf16ps", "avx2 convert + fma", ...).
    const char* (*bf16_dot_method)();
};

}  // namespace moelb::isa

// Each path's kernel table, defined by its kernel_table.cpp.
namespace moelb::isa_baseline {
const isa::Kernels& kernels();
}
namespace moelb::isa_avx2 {
const isa::Kernels& kernels();
}
namespace moelb::isa_avx512 {
const isa::Kernels& kernels();
}
namespace moelb::isa_avx512_bf16 {
const isa::Kernels& kernels();
}
namespace moelb::isa_native {
const isa::Kernels& kernels();
}

#if defined(MOELB_ISA_NS)
// The kernels of the path being compiled (kernel_table.cpp collects them).
namespace moelb::MOELB_ISA_NS {
void route_rows(const isa::RouteRowsArgs& args, isa::Index begin, isa::Index end, std::int32_t* ids,
                float* scores);
void hash_scores(isa::ScoreFn scoring, const float* logits, isa::Index num_experts, isa::Index rows,
                 const std::int32_t* expert_ids, int top_k, float* values);
void gate_rows(const float* x, isa::Index rows, isa::Index hidden_size, const float* gate,
               isa::Index num_experts, float* logits);
void mlp_rows(const float* x, isa::Index rows, isa::Index hidden_size, isa::Index intermediate_size,
              const float* w_gate_up, const float* w_down, float limit, float* gate_up,
              float* y_cm);
void store_rows(const float* y_cm, isa::Index rows, isa::Index hidden_size, float* dst,
                const std::int32_t* dst_rows);
void combine_rows(const float* y, const std::int32_t* ids, const float* weights,
                  isa::Index num_columns, isa::Index hidden_size, float rsf, isa::Index begin,
                  isa::Index end, float* out);
void add_values(float* out, const float* in, isa::Index n);
isa::SwapChoice best_swap(const isa::SwapScan& scan, int a, double limit, const int* by_load,
                          int first, int last);
void rank_descending(const float* w, int num_items, int* order);
bool replica_order(const float* u, const int* count, const int* phy2exp, int num_items, int slots,
                   int* order);
void narrow_balanced_packing(const float* w, const int* order, int num_items, int num_packs,
                             int* pack, int* rank, int instances);
double peak_change(const double* cx, const double* cy, const double* ga, const double* gb,
                   const double* rest, isa::Index stride);
isa::Index other_change(const double* ux, const double* uy, const double* la, const double* lb,
                        const double* rest, const double* top1, const double* other_a,
                        const double* reach, isa::Index chunks, isa::Index chunk_steps,
                        double peak_change, double bound, double* change);
isa::Index score_rows(const isa::ScoreRows& args, isa::Index begin, isa::Index end, double* share,
                      double* max_load, double* total);
isa::Index bound_rows(const std::int32_t* counts, isa::Index num_experts, int ep_size,
                      isa::Index begin, isa::Index end, double* mean, isa::Index* needed);
void quant_gemm(const isa::QuantGemmArgs& args);
std::size_t quant_gemm_scratch_bytes(isa::Index m, isa::Index k);
double read_sum(const float* data, isa::Index n);
std::int64_t fma_loop(std::int64_t iterations, float seed, float* sink);
std::int64_t bf16_dot_loop(std::int64_t iterations, float seed, float* sink);
const char* bf16_dot_method();
}  // namespace moelb::MOELB_ISA_NS
#else
namespace moelb::isa {
// The current path's table (moelb::cpu_isa()); read it once per operation, so that an operation
// runs on one path even if set_cpu_isa is called meanwhile.
const Kernels& kernels();
}  // namespace moelb::isa
#endif
