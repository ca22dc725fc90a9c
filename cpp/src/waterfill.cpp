// The Waterfill balancer of one MoE layer on one EP rank (DESIGN section 5;
// reference/routing_waterfill.md section 8): the exchange buffer of dynamic mode, the plan of a
// batch, and the rows it writes (routed ids widened to the S + 1 layout, the shared column at the
// chosen rank).
#include "moelb/waterfill.hpp"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <utility>
#include <vector>

#include "enum_names.hpp"
#include "moelb/errors.hpp"
#include "moelb/parallel.hpp"

namespace moelb {
namespace {

// Rows per parallel chunk: the per-row work is a few tens of nanoseconds, so only large batches
// are worth splitting across threads.
constexpr Index kRowsPerChunk = 16384;

constexpr detail::EnumNames<WaterfillMode, 2> kModeNames{{
    {"static", WaterfillMode::kStatic},
    {"dynamic", WaterfillMode::kDynamic},
}};

constexpr detail::EnumNames<WaterfillPlan::Kind, 4> kKindNames{{
    {"local", WaterfillPlan::Kind::kLocal},
    {"token_count", WaterfillPlan::Kind::kTokenCount},
    {"fewest_active", WaterfillPlan::Kind::kFewestActive},
    {"fused_fewest_active", WaterfillPlan::Kind::kFusedFewestActive},
}};

// SGLang's per-token hash: a linear congruential step over the row index mixed with the source
// rank (uint32 arithmetic, wrapping).
std::uint32_t token_hash(Index row, int source) {
    std::uint32_t seed = static_cast<std::uint32_t>(row) ^
                         (static_cast<std::uint32_t>(source) * std::uint32_t{0x9E3779B9u});
    return seed * std::uint32_t{1664525u} + std::uint32_t{1013904223u};
}

// u = hash mod total, in 32 bits when total fits (a much cheaper division).
std::int64_t draw(std::uint32_t hash, std::int64_t total) {
    if (total <= std::int64_t{UINT32_MAX}) return hash % static_cast<std::uint32_t>(total);
    return static_cast<std::int64_t>(hash % static_cast<std::uint64_t>(total));
}

// A remote rank's spare capacity counts 10/11 of a local one's.
std::int64_t discounted(std::int64_t cap, bool local) {
    return local ? cap : cap * kLocalPreferenceDenom / kLocalPreferenceNumer;
}

// The all-reduced buffer: dynamic mode needs one of exchange_size() non-negative entries, static
// mode none.
void check_reduced(std::span<const std::int64_t> reduced, bool dynamic, Index exchange_size) {
    if (!dynamic) {
        MOELB_CHECK_ARG(reduced.empty(), "static mode takes no all-reduced buffer");
        return;
    }
    MOELB_CHECK_ARG(static_cast<Index>(reduced.size()) == exchange_size,
                    "dynamic mode needs the all-reduced exchange buffer of length "
                        << exchange_size << ", got length " << reduced.size());
    for (std::size_t i = 0; i < reduced.size(); ++i) {
        MOELB_CHECK_ARG(reduced[i] >= 0, "the all-reduced buffer has a negative value "
                                             << reduced[i] << " at index " << i);
    }
}

// Dynamic prefill: each rank's load is the EP group's routed ids on it plus the tokens it holds;
// the target is the total work, shared experts included, over the ranks; every rank is a
// candidate unless one is already above the target.
WaterfillPlan dynamic_token_count_plan(std::span<const std::int64_t> reduced, int ep_size,
                                       Index top_k) {
    const int W = ep_size;
    WaterfillPlan plan;
    plan.kind = WaterfillPlan::Kind::kTokenCount;
    plan.rank_load.resize(static_cast<std::size_t>(W));
    std::int64_t routed_total = 0, load_total = 0;
    for (int w = 0; w < W; ++w) {
        routed_total += reduced[w];
        plan.rank_load[w] = reduced[w] + reduced[W + w];  // routed ids + tokens from w
        load_total += plan.rank_load[w];
    }
    const std::int64_t tokens_global = routed_total / top_k;
    plan.target_total = (load_total + tokens_global + W - 1) / W;
    plan.allow_all_ranks =
        *std::max_element(plan.rank_load.begin(), plan.rank_load.end()) <= plan.target_total;
    return plan;
}

// Decode, SGLang's fused kernel: the rank with the fewest active experts, ties to this rank, else
// to the lowest rank.
WaterfillPlan fused_fewest_active_plan(std::vector<std::int64_t> rank_load, int this_rank) {
    WaterfillPlan plan;
    plan.kind = WaterfillPlan::Kind::kFusedFewestActive;
    plan.rank_load = std::move(rank_load);
    const std::vector<std::int64_t>& load = plan.rank_load;
    int best = 0;
    for (int w = 1; w < static_cast<int>(load.size()); ++w) {
        if (load[w] < load[best] || (load[w] == load[best] && w == this_rank)) best = w;
    }
    plan.destination = best;
    return plan;
}

// Decode: starting from this rank, a rank whose count is below 10/11 of the best so far takes
// over; then the strict minimum.
WaterfillPlan fewest_active_plan(std::vector<std::int64_t> rank_load, int this_rank) {
    WaterfillPlan plan;
    plan.kind = WaterfillPlan::Kind::kFewestActive;
    plan.rank_load = std::move(rank_load);
    const std::vector<std::int64_t>& load = plan.rank_load;
    const int W = static_cast<int>(load.size());
    int best = this_rank;
    std::int64_t best_count = load[this_rank];
    for (int w = 0; w < W; ++w) {
        if (load[w] * kLocalPreferenceNumer < best_count * kLocalPreferenceDenom) {
            best = w;
            best_count = load[w];
        }
    }
    for (int w = 0; w < W; ++w) {
        if (load[w] < best_count) {
            best = w;
            best_count = load[w];
        }
    }
    plan.destination = best;
    return plan;
}

void check_write_args(ConstMatrixMap<std::int32_t> topk_ids, ConstMatrixMap<float> topk_weights,
                      const WaterfillPlan& plan, const MatrixMap<std::int32_t>& out_ids,
                      const MatrixMap<float>& out_weights, int ep_size) {
    const Index N = topk_ids.rows(), K = topk_ids.cols();
    const int W = ep_size;
    MOELB_CHECK_ARG(topk_weights.rows() == N && topk_weights.cols() == K,
                    "topk_weights has shape [" << topk_weights.rows() << ", " << topk_weights.cols()
                                               << "] but topk_ids has [" << N << ", " << K << "]");
    MOELB_CHECK_ARG(out_ids.rows() == N && out_ids.cols() == K + 1 && out_weights.rows() == N &&
                        out_weights.cols() == K + 1,
                    "the outputs must have shape [" << N << ", " << K + 1 << "]");
    const bool sampled = plan.kind == WaterfillPlan::Kind::kTokenCount;
    if (plan.kind != WaterfillPlan::Kind::kLocal) {
        MOELB_CHECK_ARG(
            static_cast<int>(plan.rank_load.size()) == W,
            "the plan has " << plan.rank_load.size() << " rank loads but ep_size=" << W);
    }
    if (!sampled && plan.kind != WaterfillPlan::Kind::kLocal) {
        MOELB_CHECK_ARG(plan.destination >= 0 && plan.destination < W,
                        "the plan's destination " << plan.destination << " is not a rank");
    }
}

// Writes a row's routed columns in the S + 1 layout (slot p -> p + rank_of[p], i.e. p + p / S)
// with their weights, padding as -1 / 0; returns whether the row has a valid id.
bool widen_routed_row(const std::int32_t* ids, const float* weights, Index top_k,
                      const int* rank_of, std::int32_t* out_ids, float* out_weights) {
    bool has_valid = false;
    for (Index c = 0; c < top_k; ++c) {
        const std::int32_t id = ids[c];
        if (id >= 0) {
            out_ids[c] = id + rank_of[id];
            out_weights[c] = weights[c];
            has_valid = true;
        } else {
            out_ids[c] = -1;
            out_weights[c] = 0.0f;
        }
    }
    return has_valid;
}

// The rank whose shared slot computes a token's shared expert, under one plan.
class SharedRankChooser {
  public:
    SharedRankChooser(const WaterfillPlan& plan, const std::vector<int>& rank_of, int ep_size,
                      int this_rank, Index top_k)
        : plan_(plan), rank_of_(rank_of), ep_size_(ep_size), this_rank_(this_rank), top_k_(top_k) {
        if (plan.kind == WaterfillPlan::Kind::kTokenCount) init_capacities();
    }

    // The rank for the token of batch row `row` with routed ids `ids` (at least one valid).
    // candidates: room for max(K + 1, 64) ranks.
    int choose(Index row, const std::int32_t* ids, int* candidates) const {
        switch (plan_.kind) {
            case WaterfillPlan::Kind::kFewestActive:
            case WaterfillPlan::Kind::kFusedFewestActive:
                return plan_.destination;
            case WaterfillPlan::Kind::kTokenCount: {
                const std::uint32_t hash = token_hash(row, this_rank_);
                return plan_.allow_all_ranks ? draw_over_all_ranks(hash, ids)
                                             : draw_over_token_ranks(hash, ids, candidates);
            }
            case WaterfillPlan::Kind::kLocal:
                break;
        }
        return this_rank_;
    }

  private:
    // Token-count mode: the target (static mode derives it from the loads) and the capacities
    // (the same for every token), with their cumulative sums for the all-ranks draw.
    void init_capacities() {
        const std::vector<std::int64_t>& load = plan_.rank_load;
        const int W = ep_size_;
        std::int64_t target = plan_.target_total;
        if (target <= 0) {
            const std::int64_t total = std::accumulate(load.begin(), load.end(), std::int64_t{0});
            target = (total + total / top_k_ + W - 1) / W;
        }
        cap_.resize(static_cast<std::size_t>(W));
        all_cum_.assign(static_cast<std::size_t>(W) + 1, 0);
        for (int w = 0; w < W; ++w) {
            cap_[w] = discounted(std::max<std::int64_t>(target - load[w], 0), w == this_rank_);
            all_cum_[w + 1] = all_cum_[w] + cap_[w];
        }
    }

    // u = hash mod (all capacity); the rank whose interval [cum_w, cum_w + cap_w) holds u.
    int draw_over_all_ranks(std::uint32_t hash, const std::int32_t* ids) const {
        const std::int64_t total = all_cum_[ep_size_];
        if (total == 0) return preferred(ids);
        const std::int64_t u = draw(hash, total);
        return static_cast<int>(std::upper_bound(all_cum_.begin() + 1, all_cum_.end(), u) -
                                all_cum_.begin()) -
               1;
    }

    // The same draw over this rank and the token's ranks only.
    int draw_over_token_ranks(std::uint32_t hash, const std::int32_t* ids, int* candidates) const {
        const int count = token_ranks(ids, candidates);
        std::int64_t total = 0;
        for (int j = 0; j < count; ++j) total += cap_[candidates[j]];
        if (total == 0) return preferred(ids);
        const std::int64_t u = draw(hash, total);
        std::int64_t cum = 0;
        for (int j = 0; j < count; ++j) {
            cum += cap_[candidates[j]];
            if (u < cum) return candidates[j];
        }
        return this_rank_;
    }

    // This rank and the token's ranks, ascending, each once, into candidates; returns how many.
    // A bit mask when the ranks fit 64 bits, else an insertion sort of at most K + 1 ranks.
    int token_ranks(const std::int32_t* ids, int* candidates) const {
        int count = 0;
        if (ep_size_ <= 64) {
            std::uint64_t mask = std::uint64_t{1} << this_rank_;
            for (Index c = 0; c < top_k_; ++c) {
                if (ids[c] >= 0) mask |= std::uint64_t{1} << rank_of_[ids[c]];
            }
            for (; mask != 0; mask &= mask - 1) candidates[count++] = std::countr_zero(mask);
            return count;
        }
        candidates[count++] = this_rank_;
        for (Index c = 0; c < top_k_; ++c) {
            if (ids[c] < 0) continue;
            const int w = rank_of_[ids[c]];
            int at = count;
            while (at > 0 && candidates[at - 1] > w) --at;
            if (at > 0 && candidates[at - 1] == w) continue;
            for (int j = count; j > at; --j) candidates[j] = candidates[j - 1];
            candidates[at] = w;
            ++count;
        }
        return count;
    }

    // The fallback when no candidate has spare capacity: this rank unless a candidate's load is
    // below 10/11 of the best so far (candidates: all ranks, or the token's ranks in column order).
    int preferred(const std::int32_t* ids) const {
        const std::vector<std::int64_t>& load = plan_.rank_load;
        int best = this_rank_;
        std::int64_t best_count = load[this_rank_];
        const auto consider = [&](int w) {
            if (load[w] * kLocalPreferenceNumer < best_count * kLocalPreferenceDenom) {
                best = w;
                best_count = load[w];
            }
        };
        if (plan_.allow_all_ranks) {
            for (int w = 0; w < ep_size_; ++w) consider(w);
        } else {
            for (Index c = 0; c < top_k_; ++c) {
                if (ids[c] >= 0) consider(rank_of_[ids[c]]);
            }
        }
        return best;
    }

    const WaterfillPlan& plan_;
    const std::vector<int>& rank_of_;
    int ep_size_;
    int this_rank_;
    Index top_k_;
    std::vector<std::int64_t> cap_;      // [W]: each rank's (discounted) spare capacity
    std::vector<std::int64_t> all_cum_;  // [W + 1]: all_cum_[w + 1] = cap_[0] + ... + cap_[w]
};

}  // namespace

WaterfillMode parse_waterfill_mode(std::string_view name, std::string_view param) {
    return detail::parse_enum(kModeNames, name, param, "a Waterfill mode");
}

std::string_view to_string(WaterfillMode mode) { return detail::enum_name(kModeNames, mode); }

std::string_view to_string(WaterfillPlan::Kind kind) { return detail::enum_name(kKindNames, kind); }

WaterfillBalancer::WaterfillBalancer(int num_physical_experts, int ep_size, int ep_rank,
                                     double routed_scaling_factor, WaterfillMode mode,
                                     bool apply_routed_scaling_factor_on_output)
    : num_physical_(num_physical_experts),
      ep_size_(ep_size),
      ep_rank_(ep_rank),
      slots_(0),
      rsf_(routed_scaling_factor),
      mode_(mode),
      fold_rsf_(apply_routed_scaling_factor_on_output),
      shared_weight_(1.0f) {
    MOELB_CHECK_ARG(ep_size >= 1, "ep_size must be positive, got " << ep_size);
    MOELB_CHECK_ARG(num_physical_experts >= 1,
                    "num_physical_experts must be positive, got " << num_physical_experts);
    MOELB_CHECK_ARG(num_physical_experts % ep_size == 0,
                    "num_physical_experts=" << num_physical_experts
                                            << " is not divisible by ep_size=" << ep_size);
    MOELB_CHECK_ARG(ep_rank >= 0 && ep_rank < ep_size,
                    "ep_rank=" << ep_rank << " is outside [0, ep_size=" << ep_size << ")");
    MOELB_CHECK_ARG(
        std::isfinite(routed_scaling_factor) && routed_scaling_factor >= 0,
        "routed_scaling_factor must be finite and non-negative, got " << routed_scaling_factor);
    // The shared slot ids of the widened layout must fit int32.
    MOELB_CHECK_ARG(
        static_cast<Index>(num_physical_experts) + ep_size <= INT32_MAX,
        "num_physical_experts + ep_size = " << static_cast<Index>(num_physical_experts) + ep_size
                                            << " does not fit int32 ids");
    slots_ = num_physical_experts / ep_size;
    // Slot -> rank by lookup: an integer division per id would dominate the per-token work.
    rank_of_.resize(static_cast<std::size_t>(num_physical_experts));
    for (int p = 0; p < num_physical_experts; ++p) rank_of_[p] = p / slots_;
    // SGLang computes 1 / rsf in double precision and stores it in the float32 weights.
    if (!fold_rsf_ && routed_scaling_factor != 0) {
        shared_weight_ = static_cast<float>(1.0 / routed_scaling_factor);
    }
}

std::int32_t WaterfillBalancer::shared_slot(int r) const {
    MOELB_CHECK_ARG(r >= 0 && r < ep_size_,
                    "ep_rank=" << r << " is outside [0, ep_size=" << ep_size_ << ")");
    return static_cast<std::int32_t>(r * (slots_ + 1) + slots_);
}

Index WaterfillBalancer::exchange_size(bool is_decode) const {
    return is_decode ? num_physical_ : 2 * static_cast<Index>(ep_size_);
}

void WaterfillBalancer::check_ids(ConstMatrixMap<std::int32_t> topk_ids) const {
    const Index K = topk_ids.cols();
    MOELB_CHECK_ARG(K >= 1, "topk_ids must have at least one column, got shape ["
                                << topk_ids.rows() << ", " << K << "]");
    const std::int32_t P = num_physical_;
    parallel_for(topk_ids.rows(), kRowsPerChunk, [&](Index begin, Index end) {
        // A vectorised range scan; the offending id is looked up only when there is one.
        const std::int32_t* ids = topk_ids.data() + begin * K;
        const Index n = (end - begin) * K;
        std::int32_t lo = 0, hi = 0;
        for (Index i = 0; i < n; ++i) {
            lo = std::min(lo, ids[i]);
            hi = std::max(hi, ids[i]);
        }
        if (lo >= -1 && hi < P) return;
        for (Index i = 0; i < n; ++i) {
            MOELB_CHECK_ARG(ids[i] >= -1 && ids[i] < P,
                            "topk_ids[" << begin + i / K << ", " << i % K << "] = " << ids[i]
                                        << " is not a physical expert id in [0, "
                                           "num_physical_experts="
                                        << P << ") or -1");
        }
    });
}

std::vector<std::int64_t> WaterfillBalancer::routed_counts(
    ConstMatrixMap<std::int32_t> topk_ids) const {
    const Index N = topk_ids.rows(), K = topk_ids.cols();
    const Index chunks = (N + kRowsPerChunk - 1) / kRowsPerChunk;
    std::vector<std::int64_t> partial(static_cast<std::size_t>(chunks * ep_size_), 0);
    parallel_for(N, kRowsPerChunk, [&](Index begin, Index end) {
        // Four interleaved histograms: consecutive ids often hit the same (hot) rank, and one
        // histogram would serialise on that counter.
        constexpr int kLanes = 4;
        std::vector<std::int32_t> lanes(static_cast<std::size_t>(kLanes) * (ep_size_ + 1), 0);
        const std::int32_t* ids = topk_ids.data() + begin * K;
        const Index n = (end - begin) * K;
        for (Index i = 0; i < n; ++i) {
            const std::int32_t id = ids[i];
            // Padding (-1) counts into a spare bin at index ep_size_.
            const int w = id >= 0 ? rank_of_[id] : ep_size_;
            ++lanes[(i % kLanes) * (ep_size_ + 1) + w];
        }
        std::int64_t* counts = partial.data() + (begin / kRowsPerChunk) * ep_size_;
        for (int lane = 0; lane < kLanes; ++lane) {
            for (int w = 0; w < ep_size_; ++w) counts[w] += lanes[lane * (ep_size_ + 1) + w];
        }
    });
    std::vector<std::int64_t> counts(static_cast<std::size_t>(ep_size_), 0);
    for (Index chunk = 0; chunk < chunks; ++chunk) {
        for (int w = 0; w < ep_size_; ++w) counts[w] += partial[chunk * ep_size_ + w];
    }
    return counts;
}

std::vector<std::int64_t> WaterfillBalancer::active_experts(
    ConstMatrixMap<std::int32_t> topk_ids) const {
    std::vector<std::int64_t> used(static_cast<std::size_t>(num_physical_), 0);
    const std::int32_t* ids = topk_ids.data();
    for (Index i = 0; i < topk_ids.size(); ++i) {
        if (ids[i] >= 0) used[ids[i]] = 1;
    }
    return used;
}

void WaterfillBalancer::exchange_buffer(ConstMatrixMap<std::int32_t> topk_ids, Index num_tokens,
                                        bool is_decode, std::span<std::int64_t> out) const {
    check_ids(topk_ids);
    MOELB_CHECK_ARG(num_tokens >= 0, "num_tokens must be non-negative, got " << num_tokens);
    MOELB_CHECK_ARG(static_cast<Index>(out.size()) == exchange_size(is_decode),
                    "the exchange buffer has length " << out.size() << " but "
                                                      << (is_decode ? "decode" : "prefill")
                                                      << " exchanges " << exchange_size(is_decode));
    if (is_decode) {
        const std::vector<std::int64_t> used = active_experts(topk_ids);
        std::copy(used.begin(), used.end(), out.begin());
        return;
    }
    const std::vector<std::int64_t> counts = routed_counts(topk_ids);
    std::fill(out.begin(), out.end(), 0);
    std::copy(counts.begin(), counts.end(), out.begin());
    out[ep_size_ + ep_rank_] = num_tokens;
}

WaterfillPlan WaterfillBalancer::plan(ConstMatrixMap<std::int32_t> topk_ids, Index num_tokens,
                                      bool is_decode, std::span<const std::int64_t> reduced) const {
    check_ids(topk_ids);
    MOELB_CHECK_ARG(num_tokens >= 0, "num_tokens must be non-negative, got " << num_tokens);
    const bool dynamic = mode_ == WaterfillMode::kDynamic;
    check_reduced(reduced, dynamic, exchange_size(is_decode));
    if (!is_decode) {
        if (num_tokens < kWaterfillMinBatch) return WaterfillPlan{};  // small batches stay local
        if (dynamic) return dynamic_token_count_plan(reduced, ep_size_, topk_ids.cols());
        WaterfillPlan plan;
        plan.kind = WaterfillPlan::Kind::kTokenCount;
        plan.rank_load = routed_counts(topk_ids);
        return plan;
    }
    // Decode: the rank that activates the fewest distinct routed experts takes the whole batch.
    std::vector<std::int64_t> active_per_rank(static_cast<std::size_t>(ep_size_), 0);
    const std::vector<std::int64_t> used =
        dynamic ? std::vector<std::int64_t>(reduced.begin(), reduced.end())
                : active_experts(topk_ids);
    for (int p = 0; p < num_physical_; ++p) active_per_rank[p / slots_] += used[p] != 0;
    if (!dynamic && topk_ids.rows() <= kFusedActiveMaxTokens && slots_ <= kFusedActiveMaxSlots) {
        return fused_fewest_active_plan(std::move(active_per_rank), ep_rank_);
    }
    return fewest_active_plan(std::move(active_per_rank), ep_rank_);
}

void WaterfillBalancer::materialise(ConstMatrixMap<std::int32_t> topk_ids,
                                    ConstMatrixMap<float> topk_weights, const WaterfillPlan& plan,
                                    MatrixMap<std::int32_t> out_ids,
                                    MatrixMap<float> out_weights) const {
    write_rows(topk_ids, topk_weights, plan, out_ids, out_weights, false);
}

void WaterfillBalancer::write_rows(ConstMatrixMap<std::int32_t> topk_ids,
                                   ConstMatrixMap<float> topk_weights, const WaterfillPlan& plan,
                                   MatrixMap<std::int32_t> out_ids, MatrixMap<float> out_weights,
                                   bool ids_checked) const {
    check_write_args(topk_ids, topk_weights, plan, out_ids, out_weights, ep_size_);
    if (!ids_checked) check_ids(topk_ids);
    const Index N = topk_ids.rows(), K = topk_ids.cols();
    const int S = slots_;
    const SharedRankChooser chooser(plan, rank_of_, ep_size_, ep_rank_, K);
    parallel_for(N, kRowsPerChunk, [&](Index begin, Index end) {
        std::vector<int> candidates(static_cast<std::size_t>(std::max<Index>(K + 1, 64)));
        for (Index t = begin; t < end; ++t) {
            const std::int32_t* ids = topk_ids.data() + t * K;
            std::int32_t* row_ids = out_ids.data() + t * (K + 1);
            float* row_weights = out_weights.data() + t * (K + 1);
            if (!widen_routed_row(ids, topk_weights.data() + t * K, K, rank_of_.data(), row_ids,
                                  row_weights)) {
                row_ids[K] = -1;
                row_weights[K] = 0.0f;
                continue;
            }
            const int dest = chooser.choose(t, ids, candidates.data());
            row_ids[K] = static_cast<std::int32_t>(dest * (S + 1) + S);
            row_weights[K] = shared_weight_;
        }
    });
}

WaterfillPlan WaterfillBalancer::expand(ConstMatrixMap<std::int32_t> topk_ids,
                                        ConstMatrixMap<float> topk_weights, Index num_tokens,
                                        bool is_decode, std::span<const std::int64_t> reduced,
                                        MatrixMap<std::int32_t> out_ids,
                                        MatrixMap<float> out_weights) const {
    WaterfillPlan p = plan(topk_ids, num_tokens, is_decode, reduced);
    write_rows(topk_ids, topk_weights, p, out_ids, out_weights, true);
    return p;
}

WaterfillPlan WaterfillBalancer::expand(ConstMatrixMap<std::int32_t> topk_ids,
                                        ConstMatrixMap<float> topk_weights, Index num_tokens,
                                        bool is_decode, const AllReduce& all_reduce,
                                        MatrixMap<std::int32_t> out_ids,
                                        MatrixMap<float> out_weights) const {
    if (mode_ == WaterfillMode::kStatic) {
        return expand(topk_ids, topk_weights, num_tokens, is_decode,
                      std::span<const std::int64_t>{}, out_ids, out_weights);
    }
    MOELB_CHECK_ARG(static_cast<bool>(all_reduce), "dynamic mode needs an all_reduce");
    std::vector<std::int64_t> buffer(static_cast<std::size_t>(exchange_size(is_decode)));
    exchange_buffer(topk_ids, num_tokens, is_decode, buffer);
    all_reduce(buffer);
    return expand(topk_ids, topk_weights, num_tokens, is_decode, buffer, out_ids, out_weights);
}

}  // namespace moelb
