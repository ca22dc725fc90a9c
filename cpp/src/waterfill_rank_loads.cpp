// Where the work of one step lands when every EP rank routes its own batch and runs Waterfill
// (DESIGN section 5, used by the simulator, section 7): per-rank routed and shared loads with and
// without Waterfill, computed by running every rank's balancer in one process.
#include <algorithm>
#include <cstdint>
#include <span>
#include <vector>

#include "moelb/balancedness.hpp"
#include "moelb/errors.hpp"
#include "moelb/parallel.hpp"
#include "moelb/waterfill.hpp"

namespace moelb {
namespace {

// Dynamic mode's all-reduce, in process: the sum of every rank's exchange buffer.
std::vector<std::int64_t> reduce_exchange_buffers(
    const std::vector<WaterfillBalancer>& balancers,
    std::span<const ConstMatrixMap<std::int32_t>> batches, std::span<const Index> num_tokens,
    bool is_decode) {
    std::vector<std::int64_t> reduced(
        static_cast<std::size_t>(balancers[0].exchange_size(is_decode)), 0);
    std::vector<std::int64_t> part(reduced.size());
    for (std::size_t w = 0; w < balancers.size(); ++w) {
        balancers[w].exchange_buffer(batches[w], num_tokens[w], is_decode, part);
        for (std::size_t i = 0; i < part.size(); ++i) reduced[i] += part[i];
    }
    return reduced;
}

// Expands one rank's batch (topk_ids [N, K], unit weights) and counts the work it puts on each
// rank: routed_by[g] valid routed ids in rank g's slots, waterfill_by[g] shared experts rank g
// computes with Waterfill. Returns the shared experts the rank keeps without Waterfill (its
// tokens with a valid id).
std::int64_t count_batch_work(const WaterfillBalancer& balancer,
                              ConstMatrixMap<std::int32_t> topk_ids, Index num_tokens,
                              bool is_decode, std::span<const std::int64_t> reduced,
                              std::int64_t* routed_by, std::int64_t* waterfill_by) {
    const Index N = topk_ids.rows(), K = topk_ids.cols();
    const int S = balancer.slots_per_rank();
    RowMatrix<std::int32_t> wide_ids(N, K + 1);
    RowMatrix<float> wide_weights(N, K + 1);
    const RowMatrix<float> weights = RowMatrix<float>::Ones(N, K);
    balancer.expand(topk_ids, ConstMatrixMap<float>(weights.data(), N, K), num_tokens, is_decode,
                    reduced, MatrixMap<std::int32_t>(wide_ids.data(), N, K + 1),
                    MatrixMap<float>(wide_weights.data(), N, K + 1));
    std::int64_t local = 0;
    for (Index t = 0; t < N; ++t) {
        bool has_valid = false;
        for (Index c = 0; c < K; ++c) {
            if (topk_ids(t, c) >= 0) {
                ++routed_by[topk_ids(t, c) / S];
                has_valid = true;
            }
        }
        local += has_valid;
        if (wide_ids(t, K) >= 0) ++waterfill_by[wide_ids(t, K) / (S + 1)];
    }
    return local;
}

// SGLang's utilization rate of routed + shared over the ranks.
double rank_balancedness(const std::vector<std::int64_t>& routed,
                         const std::vector<std::int64_t>& shared) {
    const int W = static_cast<int>(routed.size());
    std::int64_t total = 0, peak = 0;
    for (int w = 0; w < W; ++w) {
        total += routed[w] + shared[w];
        peak = std::max(peak, routed[w] + shared[w]);
    }
    return utilization_rate(static_cast<double>(total) / W, static_cast<double>(peak));
}

}  // namespace

WaterfillRankLoads waterfill_rank_loads(std::span<const ConstMatrixMap<std::int32_t>> batches,
                                        int num_physical_experts, WaterfillMode mode,
                                        bool is_decode, std::span<const Index> num_tokens) {
    const int W = static_cast<int>(batches.size());
    MOELB_CHECK_ARG(W >= 1, "batches must hold one batch per EP rank, got none");
    MOELB_CHECK_ARG(
        num_tokens.empty() || static_cast<int>(num_tokens.size()) == W,
        "num_tokens has " << num_tokens.size() << " entries but there are " << W << " ranks");
    const Index K = batches[0].cols();
    for (int w = 0; w < W; ++w) {
        MOELB_CHECK_ARG(batches[w].cols() == K, "batches[" << w << "] has " << batches[w].cols()
                                                           << " columns but batches[0] has " << K);
    }
    std::vector<WaterfillBalancer> balancers;
    balancers.reserve(static_cast<std::size_t>(W));
    for (int w = 0; w < W; ++w) balancers.emplace_back(num_physical_experts, W, w, 1.0, mode);
    std::vector<Index> tokens(static_cast<std::size_t>(W));
    for (int w = 0; w < W; ++w) tokens[w] = num_tokens.empty() ? batches[w].rows() : num_tokens[w];
    const std::vector<std::int64_t> reduced =
        mode == WaterfillMode::kDynamic
            ? reduce_exchange_buffers(balancers, batches, tokens, is_decode)
            : std::vector<std::int64_t>{};

    WaterfillRankLoads out;
    out.routed.assign(static_cast<std::size_t>(W), 0);
    out.shared_local.assign(out.routed.size(), 0);
    out.shared_waterfill.assign(out.routed.size(), 0);
    // Every rank expands its own batch (in parallel); its counts per target rank are integers,
    // summed afterwards, so the result does not depend on the thread count.
    std::vector<std::int64_t> routed_by(static_cast<std::size_t>(W) * W, 0);
    std::vector<std::int64_t> waterfill_by(static_cast<std::size_t>(W) * W, 0);
    parallel_for(W, 1, [&](Index begin, Index end) {
        for (Index w = begin; w < end; ++w) {
            out.shared_local[static_cast<std::size_t>(w)] =
                count_batch_work(balancers[w], batches[w], tokens[w], is_decode, reduced,
                                 routed_by.data() + w * W, waterfill_by.data() + w * W);
        }
    });
    for (int w = 0; w < W; ++w) {
        for (int g = 0; g < W; ++g) {
            out.routed[static_cast<std::size_t>(g)] +=
                routed_by[static_cast<std::size_t>(w) * W + g];
            out.shared_waterfill[static_cast<std::size_t>(g)] +=
                waterfill_by[static_cast<std::size_t>(w) * W + g];
        }
    }
    out.balancedness_local = rank_balancedness(out.routed, out.shared_local);
    out.balancedness_waterfill = rank_balancedness(out.routed, out.shared_waterfill);
    return out;
}

}  // namespace moelb
