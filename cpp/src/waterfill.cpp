#include "moelb/waterfill.hpp"

#include <algorithm>
#include <bit>
#include <cmath>
#include <numeric>
#include <string>

#include "enum_names.hpp"
#include "moelb/balancedness.hpp"
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

}  // namespace

WaterfillMode parse_waterfill_mode(std::string_view name, std::string_view param) {
    return detail::parse_enum(kModeNames, name, param, "a Waterfill mode");
}

std::string_view to_string(WaterfillMode mode) { return detail::enum_name(kModeNames, mode); }

std::string_view to_string(WaterfillPlan::Kind kind) { return detail::enum_name(kKindNames, kind); }

WaterfillBalancer::WaterfillBalancer(int num_physical_experts, int ep_size, int rank,
                                     double routed_scaling_factor, WaterfillMode mode,
                                     bool apply_routed_scaling_factor_on_output)
    : num_physical_(num_physical_experts),
      ep_size_(ep_size),
      rank_(rank),
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
    MOELB_CHECK_ARG(rank >= 0 && rank < ep_size,
                    "rank=" << rank << " is outside [0, ep_size=" << ep_size << ")");
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
    MOELB_CHECK_ARG(r >= 0 && r < ep_size_, "rank=" << r << " is outside [0, " << ep_size_ << ")");
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
    out[ep_size_ + rank_] = num_tokens;
}

WaterfillPlan WaterfillBalancer::plan(ConstMatrixMap<std::int32_t> topk_ids, Index num_tokens,
                                      bool is_decode, std::span<const std::int64_t> reduced) const {
    check_ids(topk_ids);
    MOELB_CHECK_ARG(num_tokens >= 0, "num_tokens must be non-negative, got " << num_tokens);
    const int W = ep_size_, S = slots_;
    const Index N = topk_ids.rows(), K = topk_ids.cols();
    const bool dynamic = mode_ == WaterfillMode::kDynamic;
    if (dynamic) {
        MOELB_CHECK_ARG(static_cast<Index>(reduced.size()) == exchange_size(is_decode),
                        "dynamic mode needs the all-reduced exchange buffer of length "
                            << exchange_size(is_decode) << ", got length " << reduced.size());
        for (std::size_t i = 0; i < reduced.size(); ++i) {
            MOELB_CHECK_ARG(reduced[i] >= 0, "the all-reduced buffer has a negative value "
                                                 << reduced[i] << " at index " << i);
        }
    } else {
        MOELB_CHECK_ARG(reduced.empty(), "static mode takes no all-reduced buffer");
    }

    WaterfillPlan plan;
    if (!is_decode) {
        if (num_tokens < kWaterfillMinBatch) return plan;  // small batches stay local
        plan.kind = WaterfillPlan::Kind::kTokenCount;
        if (!dynamic) {
            plan.rank_load = routed_counts(topk_ids);
            return plan;
        }
        plan.rank_load.resize(static_cast<std::size_t>(W));
        std::int64_t routed_total = 0, load_total = 0;
        for (int w = 0; w < W; ++w) {
            routed_total += reduced[w];
            plan.rank_load[w] = reduced[w] + reduced[W + w];  // routed ids + tokens from w
            load_total += plan.rank_load[w];
        }
        const std::int64_t tokens_global = routed_total / K;
        plan.target_total = (load_total + tokens_global + W - 1) / W;
        plan.allow_all_ranks =
            *std::max_element(plan.rank_load.begin(), plan.rank_load.end()) <= plan.target_total;
        return plan;
    }

    // Decode: the rank that activates the fewest distinct routed experts takes the whole batch.
    plan.rank_load.assign(static_cast<std::size_t>(W), 0);
    const std::vector<std::int64_t> used =
        dynamic ? std::vector<std::int64_t>(reduced.begin(), reduced.end())
                : active_experts(topk_ids);
    for (int p = 0; p < num_physical_; ++p) plan.rank_load[p / S] += used[p] != 0;
    const std::vector<std::int64_t>& load = plan.rank_load;
    if (!dynamic && N <= kFusedActiveMaxTokens && S <= kFusedActiveMaxSlots) {
        plan.kind = WaterfillPlan::Kind::kFusedFewestActive;
        int best = 0;
        for (int w = 1; w < W; ++w) {
            if (load[w] < load[best] || (load[w] == load[best] && w == rank_)) best = w;
        }
        plan.destination = best;
        return plan;
    }
    plan.kind = WaterfillPlan::Kind::kFewestActive;
    int best = rank_;
    std::int64_t best_count = load[rank_];
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
    const Index N = topk_ids.rows(), K = topk_ids.cols();
    const int W = ep_size_, S = slots_, s = rank_;
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
    if (!ids_checked) check_ids(topk_ids);

    // Token-count mode: the target and, when every rank is a candidate, the capacities (the same
    // for every token) as cumulative sums.
    const std::vector<std::int64_t>& load = plan.rank_load;
    std::int64_t target = 0;
    std::vector<std::int64_t> cap;      // cap[w]: rank w's (discounted) spare capacity
    std::vector<std::int64_t> all_cum;  // all_cum[w + 1] = caps of ranks 0..w
    if (sampled) {
        target = plan.target_total;
        if (target <= 0) {
            const std::int64_t total = std::accumulate(load.begin(), load.end(), std::int64_t{0});
            target = (total + total / K + W - 1) / W;
        }
        cap.resize(static_cast<std::size_t>(W));
        all_cum.assign(static_cast<std::size_t>(W) + 1, 0);
        for (int w = 0; w < W; ++w) {
            cap[w] = discounted(std::max<std::int64_t>(target - load[w], 0), w == s);
            all_cum[w + 1] = all_cum[w] + cap[w];
        }
    }
    // The fallback when no candidate has spare capacity: this rank unless a candidate's load is
    // below 10/11 of the best so far (candidates: all ranks, or the token's ranks in column order).
    const auto preferred = [&](const std::int32_t* ids) {
        int best = s;
        std::int64_t best_count = load[s];
        const auto consider = [&](int w) {
            if (load[w] * kLocalPreferenceNumer < best_count * kLocalPreferenceDenom) {
                best = w;
                best_count = load[w];
            }
        };
        if (plan.allow_all_ranks) {
            for (int w = 0; w < W; ++w) consider(w);
        } else {
            for (Index c = 0; c < K; ++c) {
                if (ids[c] >= 0) consider(rank_of_[ids[c]]);
            }
        }
        return best;
    };

    parallel_for(N, kRowsPerChunk, [&](Index begin, Index end) {
        std::vector<int> candidates(static_cast<std::size_t>(std::max<Index>(K + 1, 64)));
        for (Index t = begin; t < end; ++t) {
            const std::int32_t* ids = topk_ids.data() + t * K;
            bool has_valid = false;
            for (Index c = 0; c < K; ++c) {
                const std::int32_t id = ids[c];
                if (id >= 0) {
                    out_ids(t, c) = id + rank_of_[id];
                    out_weights(t, c) = topk_weights(t, c);
                    has_valid = true;
                } else {
                    out_ids(t, c) = -1;
                    out_weights(t, c) = 0.0f;
                }
            }
            if (!has_valid) {
                out_ids(t, K) = -1;
                out_weights(t, K) = 0.0f;
                continue;
            }
            int dest = s;
            if (plan.kind == WaterfillPlan::Kind::kFewestActive ||
                plan.kind == WaterfillPlan::Kind::kFusedFewestActive) {
                dest = plan.destination;
            } else if (sampled) {
                const std::uint32_t hash = token_hash(t, s);
                if (plan.allow_all_ranks) {
                    const std::int64_t total = all_cum[W];
                    if (total == 0) {
                        dest = preferred(ids);
                    } else {
                        const std::int64_t u = draw(hash, total);
                        // The rank whose interval [cum_w, cum_w + cap_w) holds u.
                        dest = static_cast<int>(
                                   std::upper_bound(all_cum.begin() + 1, all_cum.end(), u) -
                                   all_cum.begin()) -
                               1;
                    }
                } else {
                    // This rank and the token's ranks, ascending, each once: a bit mask when
                    // the ranks fit 64 bits, else an insertion sort of at most K + 1 ranks.
                    int* cand = candidates.data();
                    int count = 0;
                    if (W <= 64) {
                        std::uint64_t mask = std::uint64_t{1} << s;
                        for (Index c = 0; c < K; ++c) {
                            if (ids[c] >= 0) mask |= std::uint64_t{1} << rank_of_[ids[c]];
                        }
                        for (; mask != 0; mask &= mask - 1) cand[count++] = std::countr_zero(mask);
                    } else {
                        cand[count++] = s;
                        for (Index c = 0; c < K; ++c) {
                            if (ids[c] < 0) continue;
                            const int w = rank_of_[ids[c]];
                            int at = count;
                            while (at > 0 && cand[at - 1] > w) --at;
                            if (at > 0 && cand[at - 1] == w) continue;
                            for (int j = count; j > at; --j) cand[j] = cand[j - 1];
                            cand[at] = w;
                            ++count;
                        }
                    }
                    std::int64_t total = 0;
                    for (int j = 0; j < count; ++j) total += cap[cand[j]];
                    if (total == 0) {
                        dest = preferred(ids);
                    } else {
                        const std::int64_t u = draw(hash, total);
                        std::int64_t cum = 0;
                        for (int j = 0; j < count; ++j) {
                            cum += cap[cand[j]];
                            if (u < cum) {
                                dest = cand[j];
                                break;
                            }
                        }
                    }
                }
            }
            out_ids(t, K) = static_cast<std::int32_t>(dest * (S + 1) + S);
            out_weights(t, K) = shared_weight_;
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
    const int S = balancers[0].slots_per_rank();
    const auto tokens_of = [&](int w) {
        return num_tokens.empty() ? batches[w].rows() : num_tokens[w];
    };

    std::vector<std::int64_t> reduced;
    if (mode == WaterfillMode::kDynamic) {  // the all-reduce, in process
        reduced.assign(static_cast<std::size_t>(balancers[0].exchange_size(is_decode)), 0);
        std::vector<std::int64_t> part(reduced.size());
        for (int w = 0; w < W; ++w) {
            balancers[w].exchange_buffer(batches[w], tokens_of(w), is_decode, part);
            for (std::size_t i = 0; i < part.size(); ++i) reduced[i] += part[i];
        }
    }

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
            const ConstMatrixMap<std::int32_t>& ids = batches[w];
            const Index N = ids.rows();
            RowMatrix<std::int32_t> wide_ids(N, K + 1);
            RowMatrix<float> wide_weights(N, K + 1);
            const RowMatrix<float> weights = RowMatrix<float>::Ones(N, K);
            balancers[w].expand(ids, ConstMatrixMap<float>(weights.data(), N, K),
                                tokens_of(static_cast<int>(w)), is_decode, reduced,
                                MatrixMap<std::int32_t>(wide_ids.data(), N, K + 1),
                                MatrixMap<float>(wide_weights.data(), N, K + 1));
            std::int64_t* routed = routed_by.data() + w * W;
            std::int64_t* waterfill = waterfill_by.data() + w * W;
            std::int64_t local = 0;
            for (Index t = 0; t < N; ++t) {
                bool has_valid = false;
                for (Index c = 0; c < K; ++c) {
                    if (ids(t, c) >= 0) {
                        ++routed[ids(t, c) / S];
                        has_valid = true;
                    }
                }
                local += has_valid;
                if (wide_ids(t, K) >= 0) ++waterfill[wide_ids(t, K) / (S + 1)];
            }
            out.shared_local[static_cast<std::size_t>(w)] = local;
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
    const auto balancedness = [&](const std::vector<std::int64_t>& shared) {
        std::int64_t total = 0, peak = 0;
        for (int w = 0; w < W; ++w) {
            total += out.routed[w] + shared[w];
            peak = std::max(peak, out.routed[w] + shared[w]);
        }
        return utilization_rate(static_cast<double>(total) / W, static_cast<double>(peak));
    };
    out.balancedness_local = balancedness(out.shared_local);
    out.balancedness_waterfill = balancedness(out.shared_waterfill);
    return out;
}

}  // namespace moelb
