// Top-k routing of tokens to experts (DESIGN section 1; reference/routing_waterfill.md sections
// 2-5): softmax / sigmoid / sqrt-softplus scores, DeepSeek-V3 grouped selection with a correction
// bias, the fused shared-expert column, padded rows, logical -> physical dispatch, and the
// per-rank shared-slot layout.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string_view>

#include "moelb/dispatch.hpp"
#include "moelb/expert_location.hpp"
#include "moelb/views.hpp"

namespace moelb {

// How router logits become expert scores.
//   kSoftmax:      softmax over the E experts of the row.
//   kSigmoid:      1 / (1 + exp(-x)).
//   kSqrtSoftplus: sqrt(softplus(x)), softplus(x) = x for x > 20 else log1p(exp(x)) (DeepSeek-V4).
enum class Scoring { kSoftmax, kSigmoid, kSqrtSoftplus };

// How a group of experts is scored in grouped selection.
//   kTop2Sum: the sum of the group's two best biased scores (DeepSeek-V3; a group of one expert
//             scores that expert's biased score).
//   kMax:     the group's best biased score (DeepSeek-V2).
enum class GroupScore { kTop2Sum, kMax };

Scoring parse_scoring(std::string_view name, std::string_view param = "scoring");
std::string_view to_string(Scoring scoring);
GroupScore parse_group_score(std::string_view name, std::string_view param = "group_score");
std::string_view to_string(GroupScore group_score);

// The routing configuration of one MoE layer.
struct TopKConfig {
    // K: routed experts per token (the fused shared column is not counted here).
    int top_k = 1;
    Scoring scoring = Scoring::kSoftmax;
    // Grouped selection: experts form num_groups contiguous groups of E / num_groups; the
    // topk_group best groups are kept and the top_k experts are picked among them. 0 = ungrouped.
    int num_groups = 0;
    int topk_group = 0;
    GroupScore group_score = GroupScore::kTop2Sum;
    // Divide the routed weights by their sum (plus 1e-20, so an all-zero row stays zero).
    bool renormalize = true;
    // rsf: folded into the top-k weights when apply_routed_scaling_factor_on_output is true,
    // otherwise left for the MoE output (the caller multiplies the combined output by rsf).
    float routed_scaling_factor = 1.0f;
    bool apply_routed_scaling_factor_on_output = false;
    // F: 0 or 1. With 1, column K is the shared expert (id E, or P after dispatch) whose weight is
    // 1/rsf when renormalizing (1.0 when rsf is folded), else sum(routed scores)/rsf (times rsf
    // when folded) -- the shared expert's net contribution equals the routed weights' sum.
    int num_fused_shared_experts = 0;

    // Checks the fields on their own (InvalidArgument naming the field).
    void validate() const;
    // Checks the fields against a router with num_experts logical experts.
    void validate_for(int num_experts) const;
    // K + F: the width of topk_ids / topk_weights.
    int output_columns() const { return top_k + num_fused_shared_experts; }
    bool grouped() const { return num_groups > 0; }
    bool operator==(const TopKConfig&) const = default;

    // DeepSeek-V3/R1: sigmoid, 8 groups keep 4 (top-2 sum), K = 8, rsf 2.5, renormalize.
    static TopKConfig deepseek_v3();
    // DeepSeek-V4-Flash learned layers: sqrt-softplus, ungrouped, K = 6, rsf 1.5, renormalize.
    static TopKConfig deepseek_v4_flash();
    // DeepSeek-V4-Pro learned layers: as Flash with rsf 2.5.
    static TopKConfig deepseek_v4_pro();
};

// Where select_experts writes: topk_ids [T, K+F] int32, topk_weights [T, K+F] float32 and
// recorder_topk_ids [T, K] int32 (the routed columns only: what the expert distribution recorder
// counts).
struct TopKOutputView {
    MatrixMap<std::int32_t> topk_ids;
    MatrixMap<float> topk_weights;
    MatrixMap<std::int32_t> recorder_topk_ids;
};

// The same, owning its arrays.
struct TopKOutput {
    RowMatrix<std::int32_t> topk_ids;
    RowMatrix<float> topk_weights;
    RowMatrix<std::int32_t> recorder_topk_ids;

    TopKOutput(Index num_tokens, int top_k, int num_fused_shared_experts);
    TopKOutputView view();
};

// Routes T tokens.
//   router_logits [T, E] float32: raw router outputs. NaN never wins a slot (its choice score is
//     -inf and its weight 0); +inf counts as the largest float.
//   correction_bias [E] float32 or empty: added to the scores for selection only.
//   num_token_non_padded: rows >= it are padding (ids -1, weights 0); nullopt = none padded.
//   dispatcher: maps logical ids to physical slots (the shared column becomes slot P); null = none.
// Output columns are in descending choice score (score + bias); ties go to the lowest expert id.
// Parallel over tokens; identical results for any thread count.
void select_experts(ConstMatrixMap<float> router_logits, const TopKConfig& config,
                    std::span<const float> correction_bias,
                    std::optional<Index> num_token_non_padded, const LayerDispatcher* dispatcher,
                    TopKOutputView out);

TopKOutput select_experts(ConstMatrixMap<float> router_logits, const TopKConfig& config,
                          std::span<const float> correction_bias = {},
                          std::optional<Index> num_token_non_padded = std::nullopt,
                          const LayerDispatcher* dispatcher = nullptr);

// The per-rank shared-slot layout of DeepEP-class backends: rank r's slots are its S routed slots
// followed by F shared slots, W * (S + F) in all. topk_ids [T, K+F] holds physical routed ids in
// [0, P) (or -1) in the first K columns and the shared column(s) last; out [T, K+F] gets routed
// id p -> p + (p / S) * F and shared column j -> ep_rank * (S + F) + S + j. Rows whose routed ids
// are all -1 (padding) keep -1 in every column, so no phantom shared expert is dispatched.
void remap_topk_for_per_rank_shared_slots(ConstMatrixMap<std::int32_t> topk_ids,
                                          int num_physical_experts, int ep_size, int ep_rank,
                                          int num_fused_shared_experts,
                                          MatrixMap<std::int32_t> out);

}  // namespace moelb
