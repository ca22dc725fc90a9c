// The DeepSeek-V4 hash router (reference/routing_waterfill.md section 6): in the first MoE layers
// the routed experts of a token are a fixed function of its token id, looked up in tid2eid; the
// router logits only give the weights.
#pragma once

#include <cstdint>
#include <optional>
#include <span>

#include "moelb/dispatch.hpp"
#include "moelb/expert_location.hpp"
#include "moelb/routing.hpp"
#include "moelb/views.hpp"

namespace moelb {

class HashRouter {
  public:
    // tid2eid [V, K] int32: the K expert ids of every token id (all >= 0). Weights: the scores of
    // the looked-up experts (scoring as in TopKConfig), renormalised to sum 1 unless scoring is
    // softmax (softmax weights stay probabilities over all experts, as in SGLang), rsf folded when
    // apply_routed_scaling_factor_on_output; with num_fused_shared_experts = 1 a shared column as
    // in TopKConfig. num_experts: E if known (checks tid2eid now), or -1 (checked per call
    // against router_logits).
    HashRouter(RowMatrix<std::int32_t> tid2eid, Scoring scoring = Scoring::kSqrtSoftplus,
               float routed_scaling_factor = 1.0f, int num_fused_shared_experts = 0,
               bool apply_routed_scaling_factor_on_output = false, int num_experts = -1);

    int vocab_size() const { return static_cast<int>(tid2eid_.rows()); }
    int top_k() const { return static_cast<int>(tid2eid_.cols()); }
    int num_experts() const { return num_experts_; }
    Scoring scoring() const { return scoring_; }
    float routed_scaling_factor() const { return rsf_; }
    int num_fused_shared_experts() const { return num_shared_; }
    bool apply_routed_scaling_factor_on_output() const { return fold_rsf_; }
    bool renormalize() const { return scoring_ != Scoring::kSoftmax; }
    const RowMatrix<std::int32_t>& tid2eid() const { return tid2eid_; }

    // router_logits [T, E] float32; input_ids [T] token ids (int32 or int64), each in [0, V);
    // the rest as select_experts. Columns are in tid2eid order.
    template <class TokenId>
    void select(ConstMatrixMap<float> router_logits, std::span<const TokenId> input_ids,
                std::optional<Index> num_token_non_padded, const LayerDispatcher* dispatcher,
                TopKOutputView out) const;

    template <class TokenId>
    TopKOutput select(ConstMatrixMap<float> router_logits, std::span<const TokenId> input_ids,
                      std::optional<Index> num_token_non_padded = std::nullopt,
                      const LayerDispatcher* dispatcher = nullptr) const;

  private:
    RowMatrix<std::int32_t> tid2eid_;
    Scoring scoring_;
    float rsf_;
    int num_shared_;
    bool fold_rsf_;
    int num_experts_;
    std::int32_t max_expert_id_ = 0;
};

extern template void HashRouter::select<std::int32_t>(ConstMatrixMap<float>,
                                                      std::span<const std::int32_t>,
                                                      std::optional<Index>, const LayerDispatcher*,
                                                      TopKOutputView) const;
extern template void HashRouter::select<std::int64_t>(ConstMatrixMap<float>,
                                                      std::span<const std::int64_t>,
                                                      std::optional<Index>, const LayerDispatcher*,
                                                      TopKOutputView) const;
extern template TopKOutput HashRouter::select<std::int32_t>(ConstMatrixMap<float>,
                                                            std::span<const std::int32_t>,
                                                            std::optional<Index>,
                                                            const LayerDispatcher*) const;
extern template TopKOutput HashRouter::select<std::int64_t>(ConstMatrixMap<float>,
                                                            std::span<const std::int64_t>,
                                                            std::optional<Index>,
                                                            const LayerDispatcher*) const;

}  // namespace moelb
