// The DeepSeek-V4 hash router (DESIGN section 1; moelb/hash_router.hpp): expert ids from the
// token id, weights from the router logits.
#include "moelb/hash_router.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "isa/kernels.hpp"
#include "moelb/errors.hpp"
#include "moelb/parallel.hpp"
#include "topk_epilogue.hpp"

namespace moelb {
namespace {

constexpr Index kRowsPerChunk = 1024;
// Rows gathered and scored together: their K looked-up logits form one vectorised batch, and
// the scattered loads of a block overlap in the memory system.
constexpr Index kRowsPerBlock = 64;

}  // namespace

HashRouter::HashRouter(RowMatrix<std::int32_t> tid2eid, Scoring scoring,
                       float routed_scaling_factor, int num_fused_shared_experts,
                       bool apply_routed_scaling_factor_on_output, int num_experts)
    : tid2eid_(std::move(tid2eid)),
      scoring_(scoring),
      rsf_(routed_scaling_factor),
      num_shared_(num_fused_shared_experts),
      fold_rsf_(apply_routed_scaling_factor_on_output),
      num_experts_(num_experts) {
    MOELB_CHECK_ARG(tid2eid_.rows() >= 1 && tid2eid_.cols() >= 1,
                    "tid2eid must have shape [vocab_size, top_k] with both positive, got ["
                        << tid2eid_.rows() << ", " << tid2eid_.cols() << "]");
    MOELB_CHECK_ARG(std::isfinite(rsf_) && rsf_ > 0.0f,
                    "routed_scaling_factor must be positive and finite, got " << rsf_);
    MOELB_CHECK_ARG(num_shared_ == 0 || num_shared_ == 1,
                    "num_fused_shared_experts must be 0 or 1, got " << num_shared_);
    MOELB_CHECK_ARG(num_experts == -1 || num_experts >= 1,
                    "num_experts must be positive (or None), got " << num_experts);
    for (Index v = 0; v < tid2eid_.rows(); ++v) {
        for (Index k = 0; k < tid2eid_.cols(); ++k) {
            const std::int32_t e = tid2eid_(v, k);
            MOELB_CHECK_ARG(e >= 0 && (num_experts < 0 || e < num_experts),
                            "tid2eid[" << v << ", " << k << "] = " << e << " is outside [0, "
                                       << (num_experts < 0 ? std::string("num_experts")
                                                           : std::to_string(num_experts))
                                       << ")");
            max_expert_id_ = std::max(max_expert_id_, e);
        }
    }
}

template <class TokenId>
void HashRouter::select(ConstMatrixMap<float> router_logits, std::span<const TokenId> input_ids,
                        std::optional<Index> num_token_non_padded,
                        const LayerDispatcher* dispatcher, TopKOutputView out) const {
    const Index T = router_logits.rows();
    const int E = static_cast<int>(router_logits.cols());
    const int K = top_k();
    MOELB_CHECK_ARG(
        static_cast<Index>(input_ids.size()) == T,
        "input_ids has " << input_ids.size() << " tokens but router_logits has " << T << " rows");
    MOELB_CHECK_ARG(num_experts_ < 0 || E == num_experts_,
                    "router_logits has " << E << " expert columns but the router was built for "
                                         << "num_experts=" << num_experts_);
    MOELB_CHECK_ARG(max_expert_id_ < E, "tid2eid holds expert id " << max_expert_id_
                                                                   << " but router_logits has " << E
                                                                   << " expert columns");
    detail::check_output_shapes(out, T, K, num_shared_);
    detail::check_num_token_non_padded(num_token_non_padded, T);
    detail::check_dispatcher(dispatcher, E);
    const Index non_padded = num_token_non_padded.value_or(T);
    const Index V = tid2eid_.rows();
    // Token ids of padded rows are not looked up (they may be anything).
    for (Index t = 0; t < non_padded; ++t) {
        const TokenId id = input_ids[static_cast<std::size_t>(t)];
        MOELB_CHECK_ARG(id >= 0 && static_cast<Index>(id) < V,
                        "input_ids[" << t << "] = " << id << " is outside the hash table [0, "
                                     << "vocab_size=" << V << ")");
    }
    const detail::TopKEpilogue epilogue(K, num_shared_, renormalize(), rsf_, fold_rsf_, E,
                                        num_token_non_padded, dispatcher, out);
    // The weights run on the ISA path chosen now (moelb/cpu_isa.hpp).
    const isa::Kernels& kernels = isa::kernels();
    const isa::ScoreFn scoring = detail::to_score_fn(scoring_);
    parallel_for(T, kRowsPerChunk, [&](Index begin, Index end) {
        std::vector<std::int32_t> ids(static_cast<std::size_t>(kRowsPerBlock * K));
        std::vector<float> values(ids.size());  // the looked-up experts' scores
        for (Index block = begin; block < end; block += kRowsPerBlock) {
            const Index rows = std::min(kRowsPerBlock, end - block);
            const Index valid = std::clamp<Index>(non_padded - block, 0, rows);
            for (Index r = 0; r < valid; ++r) {
                const std::int32_t* row_ids = tid2eid_.row(input_ids[block + r]).data();
                std::copy(row_ids, row_ids + K, ids.begin() + r * K);
            }
            kernels.hash_scores(scoring, router_logits.row(block).data(), E, valid, ids.data(), K,
                                values.data());
            for (Index r = 0; r < rows; ++r) {
                const Index t = block + r;
                if (r >= valid) {
                    epilogue.write(t, nullptr, nullptr);
                } else {
                    epilogue.write(t, ids.data() + r * K, values.data() + r * K);
                }
            }
        }
    });
}

template <class TokenId>
TopKOutput HashRouter::select(ConstMatrixMap<float> router_logits,
                              std::span<const TokenId> input_ids,
                              std::optional<Index> num_token_non_padded,
                              const LayerDispatcher* dispatcher) const {
    TopKOutput out(router_logits.rows(), top_k(), num_shared_);
    select(router_logits, input_ids, num_token_non_padded, dispatcher, out.view());
    return out;
}

template void HashRouter::select<std::int32_t>(ConstMatrixMap<float>, std::span<const std::int32_t>,
                                               std::optional<Index>, const LayerDispatcher*,
                                               TopKOutputView) const;
template void HashRouter::select<std::int64_t>(ConstMatrixMap<float>, std::span<const std::int64_t>,
                                               std::optional<Index>, const LayerDispatcher*,
                                               TopKOutputView) const;
template TopKOutput HashRouter::select<std::int32_t>(ConstMatrixMap<float>,
                                                     std::span<const std::int32_t>,
                                                     std::optional<Index>,
                                                     const LayerDispatcher*) const;
template TopKOutput HashRouter::select<std::int64_t>(ConstMatrixMap<float>,
                                                     std::span<const std::int64_t>,
                                                     std::optional<Index>,
                                                     const LayerDispatcher*) const;

}  // namespace moelb
