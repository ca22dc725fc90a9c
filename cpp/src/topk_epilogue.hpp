// Private: the per-row epilogue shared by select_experts and HashRouter::select. Given the chosen
// logical experts of a token and their scores, writes the weights (renormalised, rsf folded or
// not), the fused shared column, the dispatched physical ids and the recorder ids. Also the score
// function's name for the routing kernels (isa/kernels.hpp).
#pragma once

#include <cstdint>

#include "isa/kernels.hpp"
#include "moelb/dispatch.hpp"
#include "moelb/expert_location.hpp"
#include "moelb/routing.hpp"

namespace moelb::detail {

inline isa::ScoreFn to_score_fn(Scoring scoring) {
    switch (scoring) {
        case Scoring::kSigmoid:
            return isa::ScoreFn::kSigmoid;
        case Scoring::kSqrtSoftplus:
            return isa::ScoreFn::kSqrtSoftplus;
        case Scoring::kSoftmax:
            break;
    }
    return isa::ScoreFn::kSoftmax;
}

// SGLang's renormalisation epsilon: an all-zero row stays zero instead of 0/0.
inline constexpr float kRenormalizeEpsilon = 1e-20f;

class TopKEpilogue {
  public:
    TopKEpilogue(int top_k, int num_fused_shared_experts, bool renormalize,
                 float routed_scaling_factor, bool fold_rsf, int num_logical_experts,
                 std::optional<Index> num_token_non_padded, const LayerDispatcher* dispatcher,
                 TopKOutputView out)
        : top_k_(top_k),
          num_shared_(num_fused_shared_experts),
          renormalize_(renormalize),
          rsf_(routed_scaling_factor),
          fold_rsf_(fold_rsf),
          non_padded_(num_token_non_padded.value_or(out.topk_ids.rows())),
          dispatcher_(dispatcher),
          shared_id_(dispatcher ? dispatcher->location().num_physical_experts()
                                : num_logical_experts),
          out_(out) {}

    // ids [K]: logical expert ids; scores [K]: their unbiased scores.
    void write(Index t, const std::int32_t* ids, const float* scores) const {
        std::int32_t* out_ids = out_.topk_ids.row(t).data();
        float* out_w = out_.topk_weights.row(t).data();
        std::int32_t* rec = out_.recorder_topk_ids.row(t).data();
        const int width = top_k_ + num_shared_;
        if (t >= non_padded_) {
            for (int c = 0; c < width; ++c) {
                out_ids[c] = -1;
                out_w[c] = 0.0f;
            }
            for (int c = 0; c < top_k_; ++c) rec[c] = -1;
            return;
        }
        float sum = 0.0f;
        for (int c = 0; c < top_k_; ++c) sum += scores[c];
        const float scale =
            (renormalize_ ? 1.0f / (sum + kRenormalizeEpsilon) : 1.0f) * (fold_rsf_ ? rsf_ : 1.0f);
        for (int c = 0; c < top_k_; ++c) {
            const std::int32_t id = dispatcher_ ? dispatcher_->map(ids[c], t, c) : ids[c];
            out_ids[c] = id;
            rec[c] = id;
            out_w[c] = scores[c] * scale;
        }
        if (num_shared_ > 0) {
            float shared;
            if (renormalize_) {
                shared = fold_rsf_ ? 1.0f : 1.0f / rsf_;
            } else {
                shared = fold_rsf_ ? sum : sum / rsf_;
            }
            for (int j = 0; j < num_shared_; ++j) {
                out_ids[top_k_ + j] = shared_id_ + j;
                out_w[top_k_ + j] = shared;
            }
        }
    }

  private:
    int top_k_;
    int num_shared_;
    bool renormalize_;
    float rsf_;
    bool fold_rsf_;
    Index non_padded_;
    const LayerDispatcher* dispatcher_;
    std::int32_t shared_id_;
    mutable TopKOutputView out_;  // written through by the const write()
};

// Checks the shapes of a TopKOutputView for T tokens and K + F columns.
void check_output_shapes(const TopKOutputView& out, Index num_tokens, int top_k,
                         int num_fused_shared_experts);
// Checks num_token_non_padded against T.
void check_num_token_non_padded(std::optional<Index> num_token_non_padded, Index num_tokens);
// Checks that a dispatcher's location has num_experts logical experts.
void check_dispatcher(const LayerDispatcher* dispatcher, int num_experts);

}  // namespace moelb::detail
