// The Waterfill shared-expert balancer (DESIGN section 5; reference/routing_waterfill.md section
// 8): every token must visit the shared expert, and with expert parallelism each EP rank holds one
// shared slot after its S routed slots (the per-rank layout S + 1). Waterfill treats the shared
// expert as one more routed column (K -> K + 1) and chooses, per token, the rank whose shared slot
// computes it, steering tokens toward ranks with little routed work. The routed experts never
// change; their ids are only widened to the S + 1 layout.
//
// SGLang's behaviour, exactly:
//   - prefill ("token-count" mode): ranks are loaded by their routed ids (static: this rank's own
//     batch; dynamic: the whole EP group's, through an all-reduce); each token's shared slot goes
//     to a candidate rank drawn by a deterministic hash with probability proportional to its
//     spare capacity below a target, remote ranks discounted by 10/11; batches of fewer than 64
//     tokens stay local.
//   - decode ("fewest active experts"): the whole batch's shared expert goes to the rank that
//     activates the fewest distinct routed experts.
// Unlike SGLang's kernel, which keeps a token's candidate ranks in a 32-bit mask, any number of
// ranks works.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string_view>
#include <vector>

#include "moelb/views.hpp"

namespace moelb {

// kStatic: plan from this rank's batch only (no communication).
// kDynamic: plan from the EP group's totals, summed by an all-reduce of exchange_buffer().
enum class WaterfillMode { kStatic, kDynamic };

WaterfillMode parse_waterfill_mode(std::string_view name, std::string_view param = "mode");
std::string_view to_string(WaterfillMode mode);

// SGLang's constants.
inline constexpr Index kWaterfillMinBatch = 64;            // prefill batches below it stay local
inline constexpr std::int64_t kLocalPreferenceNumer = 11;  // local rank preferred 11 : 10
inline constexpr std::int64_t kLocalPreferenceDenom = 10;
// Static decode batches up to this many tokens on ranks of at most kFusedActiveMaxSlots slots use
// the fused active-expert rule (SGLang's one-block kernel with a 32-bit expert mask per rank).
inline constexpr Index kFusedActiveMaxTokens = 256;
inline constexpr int kFusedActiveMaxSlots = 32;

// How one batch's shared experts are placed (SGLang's dispatch plan).
struct WaterfillPlan {
    enum class Kind {
        kLocal,              // every token's shared expert on this rank
        kTokenCount,         // per token: hashed draw over candidate ranks' spare capacity
        kFewestActive,       // one rank for the batch: 11/10-preference scan, then strict minimum
        kFusedFewestActive,  // one rank for the batch: minimum, ties to this rank, else the lowest
    };
    Kind kind = Kind::kLocal;
    // [W]: routed ids per rank (token-count; plus each rank's token count in dynamic mode), or
    // distinct routed experts per rank (fewest-active kinds). Empty for kLocal.
    std::vector<std::int64_t> rank_load;
    // Token-count: the per-rank target (0: derived per row from rank_load, static mode).
    std::int64_t target_total = 0;
    // Token-count: every rank is a candidate (else only this rank and the ranks a token visits).
    bool allow_all_ranks = true;
    // Fewest-active kinds: the rank that computes every shared expert of the batch.
    int destination = -1;
};

std::string_view to_string(WaterfillPlan::Kind kind);

// The Waterfill balancer of one MoE layer on one EP rank.
class WaterfillBalancer {
  public:
    // Sums `buffer` element-wise over the EP ranks, in place (an all-reduce).
    using AllReduce = std::function<void(std::span<std::int64_t> buffer)>;

    // num_physical_experts: P routed slots (logical + redundant), a multiple of ep_size; S = P / W
    // per rank. ep_rank: this rank in [0, ep_size). routed_scaling_factor: the shared column's
    // weight is 1 / rsf (1.0 when rsf is 0, or when apply_routed_scaling_factor_on_output: rsf is
    // then already folded into the routed weights).
    WaterfillBalancer(int num_physical_experts, int ep_size, int ep_rank,
                      double routed_scaling_factor = 1.0,
                      WaterfillMode mode = WaterfillMode::kStatic,
                      bool apply_routed_scaling_factor_on_output = false);

    int num_physical_experts() const { return num_physical_; }
    int ep_size() const { return ep_size_; }
    int ep_rank() const { return ep_rank_; }
    int slots_per_rank() const { return slots_; }  // S
    double routed_scaling_factor() const { return rsf_; }
    bool apply_routed_scaling_factor_on_output() const { return fold_rsf_; }
    WaterfillMode mode() const { return mode_; }
    float shared_weight() const { return shared_weight_; }
    // The id of rank r's shared slot in the S + 1 layout: r * (S + 1) + S.
    std::int32_t shared_slot(int r) const;

    // Dynamic mode: the length of the all-reduced buffer: 2W in prefill, P in decode.
    Index exchange_size(bool is_decode) const;
    // Dynamic mode: this rank's part of the all-reduce. Prefill: int64 [2W], this rank's routed
    // ids per rank, then num_tokens at index W + rank. Decode: [P], 1 where a routed expert is used
    // by this batch. topk_ids: [N, K] int32 physical routed ids in [0, P), -1 for padding.
    void exchange_buffer(ConstMatrixMap<std::int32_t> topk_ids, Index num_tokens, bool is_decode,
                         std::span<std::int64_t> out) const;

    // The plan for this batch. num_tokens: the batch's token count as the engine sees it
    // (hidden_states rows, padding included; usually N). reduced: dynamic mode only, the sum over
    // ranks of exchange_buffer() (length exchange_size()).
    WaterfillPlan plan(ConstMatrixMap<std::int32_t> topk_ids, Index num_tokens, bool is_decode,
                       std::span<const std::int64_t> reduced = {}) const;

    // Writes ids [N, K + 1] (routed ids p -> p + p / S, the shared column at the chosen rank's
    // shared slot) and weights [N, K + 1] (routed weights, the shared weight); rows without a
    // valid id get -1 and 0 everywhere. topk_weights: [N, K] float32.
    void materialise(ConstMatrixMap<std::int32_t> topk_ids, ConstMatrixMap<float> topk_weights,
                     const WaterfillPlan& plan, MatrixMap<std::int32_t> out_ids,
                     MatrixMap<float> out_weights) const;

    // plan + materialise. Dynamic mode needs `reduced` (or use the all_reduce overload).
    WaterfillPlan expand(ConstMatrixMap<std::int32_t> topk_ids, ConstMatrixMap<float> topk_weights,
                         Index num_tokens, bool is_decode, std::span<const std::int64_t> reduced,
                         MatrixMap<std::int32_t> out_ids, MatrixMap<float> out_weights) const;
    WaterfillPlan expand(ConstMatrixMap<std::int32_t> topk_ids, ConstMatrixMap<float> topk_weights,
                         Index num_tokens, bool is_decode, const AllReduce& all_reduce,
                         MatrixMap<std::int32_t> out_ids, MatrixMap<float> out_weights) const;

  private:
    void check_ids(ConstMatrixMap<std::int32_t> topk_ids) const;
    void write_rows(ConstMatrixMap<std::int32_t> topk_ids, ConstMatrixMap<float> topk_weights,
                    const WaterfillPlan& plan, MatrixMap<std::int32_t> out_ids,
                    MatrixMap<float> out_weights, bool ids_checked) const;
    std::vector<std::int64_t> routed_counts(ConstMatrixMap<std::int32_t> topk_ids) const;
    std::vector<std::int64_t> active_experts(ConstMatrixMap<std::int32_t> topk_ids) const;

    int num_physical_;
    int ep_size_;
    int ep_rank_;
    int slots_;
    double rsf_;
    WaterfillMode mode_;
    bool fold_rsf_;
    float shared_weight_;
    std::vector<int> rank_of_;  // [P]: the rank of each physical slot
};

// Per-rank work of one step in which each of W ranks routes its own batch, with and without
// Waterfill. A unit is one (token, expert) pair: a rank's routed load is the valid routed ids that
// land in its slots; its shared load is the tokens whose shared expert it computes (without
// Waterfill: its own tokens that have a valid id).
struct WaterfillRankLoads {
    std::vector<std::int64_t> routed;            // [W]
    std::vector<std::int64_t> shared_local;      // [W]
    std::vector<std::int64_t> shared_waterfill;  // [W]
    // SGLang's utilization rate (balancedness.hpp) of routed + shared over the ranks: (mean +
    // 1e-5) / (max + 1e-5), 1 when no rank has work.
    double balancedness_local = 1.0;
    double balancedness_waterfill = 1.0;
};

// batches[w]: rank w's topk_ids [N_w, K] (physical routed ids in [0, P), -1 for padding; the same
// K on every rank). num_tokens: per rank (empty: N_w). Runs every rank's balancer (mode; dynamic
// mode sums the ranks' exchange buffers in process) and counts where the work lands.
WaterfillRankLoads waterfill_rank_loads(std::span<const ConstMatrixMap<std::int32_t>> batches,
                                        int num_physical_experts, WaterfillMode mode,
                                        bool is_decode, std::span<const Index> num_tokens = {});

}  // namespace moelb
