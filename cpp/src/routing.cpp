// Top-k routing (DESIGN section 1; moelb/routing.hpp): select_experts with its scoring, grouped
// selection, fused shared column and padded rows, and the per-rank shared-slot remap.
#include "moelb/routing.hpp"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <utility>
#include <vector>

#include "enum_names.hpp"
#include "moelb/errors.hpp"
#include "moelb/parallel.hpp"
#include "scoring.hpp"
#include "topk_epilogue.hpp"

namespace moelb {
namespace {

using detail::ArrayXf;
using detail::kNegInf;
constexpr Index kRowsPerChunk = 256;

// The k best (value, id) pairs seen so far, in descending value; among equal values the earlier
// pushed stays ahead. Pushing ids in ascending order therefore breaks ties to the lowest id.
class TopKList {
  public:
    explicit TopKList(int k) : k_(k), values_(static_cast<std::size_t>(k)), ids_(values_.size()) {}

    void clear() { size_ = 0; }

    void push(float value, std::int32_t id) {
        int pos;
        if (size_ < k_) {
            pos = size_++;
        } else {
            if (!(value > values_[static_cast<std::size_t>(k_ - 1)])) return;
            pos = k_ - 1;
        }
        while (pos > 0 && value > values_[static_cast<std::size_t>(pos - 1)]) {
            values_[static_cast<std::size_t>(pos)] = values_[static_cast<std::size_t>(pos - 1)];
            ids_[static_cast<std::size_t>(pos)] = ids_[static_cast<std::size_t>(pos - 1)];
            --pos;
        }
        values_[static_cast<std::size_t>(pos)] = value;
        ids_[static_cast<std::size_t>(pos)] = id;
    }

    // Pushes values[e] (id e) for e in the ascending, disjoint ranges [begin, end) of `ranges`,
    // skipping values that cannot be among the k largest. The values are split into kLanes sets
    // (offset within its range mod kLanes); the k-th largest of the sets' maxima is a lower bound
    // of the k-th largest value (k sets each hold a value at least that large), so only values at
    // or above it are pushed -- in ascending id order, which keeps ties on the lowest id.
    void push_ranges(const float* values, std::span<const std::pair<int, int>> ranges) {
        float lane_max[kLanes];
        std::fill(lane_max, lane_max + kLanes, kNegInf);
        int count = 0;
        for (const auto& [begin, end] : ranges) {
            int e = begin;
            for (; e + kLanes <= end; e += kLanes) {
                for (int j = 0; j < kLanes; ++j) {
                    lane_max[j] = values[e + j] > lane_max[j] ? values[e + j] : lane_max[j];
                }
            }
            for (int j = 0; e < end; ++e, ++j) {
                lane_max[j] = values[e] > lane_max[j] ? values[e] : lane_max[j];
            }
            count += end - begin;
        }
        // Empty lanes keep -inf, which makes the bound -inf (everything is a candidate).
        const float bound = k_ <= kLanes ? kth_largest(lane_max, kLanes) : kNegInf;
        candidates_.resize(static_cast<std::size_t>(count + kLanes));  // slack for SIMD stores
        int n = 0;
        for (const auto& [begin, end] : ranges) {
            n += collect_at_least(values, begin, end, bound, candidates_.data() + n);
        }
        for (int j = 0; j < n; ++j) push(values[candidates_[j]], candidates_[j]);
    }

    int size() const { return size_; }
    const std::int32_t* ids() const { return ids_.data(); }

  private:
    static constexpr int kLanes = 16;

    // The k-th largest of xs[0, n) (k <= n).
    float kth_largest(const float* xs, int n) {
        float* top = scratch_top_.data();
        int size = 0;
        for (int i = 0; i < n; ++i) {
            const float x = xs[i];
            if (size == k_ && !(x > top[k_ - 1])) continue;
            int pos = size < k_ ? size++ : k_ - 1;
            while (pos > 0 && x > top[pos - 1]) {
                top[pos] = top[pos - 1];
                --pos;
            }
            top[pos] = x;
        }
        return top[k_ - 1];
    }

    // Writes the ids e in [begin, end) with values[e] >= bound to out, ascending; returns how many.
    static int collect_at_least(const float* values, int begin, int end, float bound,
                                std::int32_t* out) {
        int n = 0;
        int e = begin;
#if defined(__AVX512F__)
        const __m512 b = _mm512_set1_ps(bound);
        const __m512i lane_ids =
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        for (; e + 16 <= end; e += 16) {
            const __mmask16 m = _mm512_cmp_ps_mask(_mm512_loadu_ps(values + e), b, _CMP_GE_OQ);
            if (m == 0) continue;
            // Compress in a register, then a plain store (a compressing store to memory is
            // microcoded and slow on some CPUs); out has room for 16 more ids.
            _mm512_storeu_si512(out + n, _mm512_maskz_compress_epi32(
                                             m, _mm512_add_epi32(lane_ids, _mm512_set1_epi32(e))));
            n += __builtin_popcount(m);
        }
#endif
        for (; e < end; ++e) {  // branch-free compaction
            out[n] = e;
            n += values[e] >= bound ? 1 : 0;
        }
        return n;
    }

    int k_;
    int size_ = 0;
    std::vector<float> values_;
    std::vector<std::int32_t> ids_;
    std::vector<float> scratch_top_ = std::vector<float>(static_cast<std::size_t>(k_));
    std::vector<std::int32_t> candidates_;
};

// Per-thread scratch of select_experts.
struct Scratch {
    ArrayXf scores;  // [E] unbiased scores
    ArrayXf choice;  // [E] selection scores (score + bias; -inf for NaN logits)
    ArrayXf groups;  // [G] group scores
    detail::ScoreScratch score_scratch;
    std::vector<std::pair<int, int>> kept_groups;  // expert ranges of the kept groups
    TopKList experts;
    TopKList group_list;
    std::vector<float> chosen_scores;

    Scratch(int E, const TopKConfig& c)
        : scores(E),
          choice(E),
          groups(std::max(c.num_groups, 1)),
          experts(c.top_k),
          group_list(std::max(c.topk_group, 1)),
          chosen_scores(static_cast<std::size_t>(c.top_k)) {}
};

// scores <- f(logits), choice <- scores + bias with NaN logits at -inf.
void compute_scores(const float* logits, int E, Scoring scoring, const float* bias, Scratch& s) {
    detail::sanitize_logits(logits, E, s.scores);
    if (scoring == Scoring::kSoftmax) {
        detail::softmax(s.scores, s.score_scratch);
    } else {
        detail::elementwise_scores(scoring, s.scores, s.score_scratch);
    }
    // A plain loop the compiler vectorises (compare + blend); x != x only for NaN.
    float* choice = s.choice.data();
    const float* scores = s.scores.data();
    for (int e = 0; e < E; ++e) {
        const float x = logits[e];
        const float biased = bias != nullptr ? scores[e] + bias[e] : scores[e];
        choice[e] = x != x ? kNegInf : biased;
    }
}

void select_row(const TopKConfig& c, int E, Scratch& s) {
    s.experts.clear();
    const float* choice = s.choice.data();
    if (!c.grouped()) {
        const std::pair<int, int> all{0, E};
        s.experts.push_ranges(choice, {&all, 1});
        return;
    }
    const int per_group = E / c.num_groups;
    for (int g = 0; g < c.num_groups; ++g) {
        const float* v = choice + static_cast<Index>(g) * per_group;
        float best = kNegInf, second = kNegInf;
        for (int i = 0; i < per_group; ++i) {
            if (v[i] > best) {
                second = best;
                best = v[i];
            } else if (v[i] > second) {
                second = v[i];
            }
        }
        s.groups[g] = (c.group_score == GroupScore::kMax || per_group == 1) ? best : best + second;
    }
    s.group_list.clear();
    for (int g = 0; g < c.num_groups; ++g) s.group_list.push(s.groups[g], g);
    // Scan the kept groups in ascending id order so expert ties go to the lowest id.
    s.kept_groups.clear();
    for (int i = 0; i < s.group_list.size(); ++i) {
        const int g = s.group_list.ids()[i];
        s.kept_groups.emplace_back(g * per_group, (g + 1) * per_group);
    }
    std::sort(s.kept_groups.begin(), s.kept_groups.end());
    s.experts.push_ranges(choice, s.kept_groups);
}

}  // namespace

constexpr detail::EnumNames<Scoring, 3> kScoringNames{{
    {"softmax", Scoring::kSoftmax},
    {"sigmoid", Scoring::kSigmoid},
    {"sqrtsoftplus", Scoring::kSqrtSoftplus},
}};

Scoring parse_scoring(std::string_view name, std::string_view param) {
    return detail::parse_enum(kScoringNames, name, param, "a scoring function");
}

std::string_view to_string(Scoring value) { return detail::enum_name(kScoringNames, value); }

constexpr detail::EnumNames<GroupScore, 2> kGroupScoreNames{{
    {"top2_sum", GroupScore::kTop2Sum},
    {"max", GroupScore::kMax},
}};

GroupScore parse_group_score(std::string_view name, std::string_view param) {
    return detail::parse_enum(kGroupScoreNames, name, param, "a group score");
}

std::string_view to_string(GroupScore value) { return detail::enum_name(kGroupScoreNames, value); }

void TopKConfig::validate() const {
    MOELB_CHECK_ARG(top_k >= 1, "top_k must be at least 1, got " << top_k);
    MOELB_CHECK_ARG(num_groups >= 0, "num_groups must be positive (or None), got " << num_groups);
    if (num_groups > 0) {
        MOELB_CHECK_ARG(
            topk_group >= 1 && topk_group <= num_groups,
            "topk_group=" << topk_group << " must be in [1, num_groups=" << num_groups << "]");
    } else {
        MOELB_CHECK_ARG(topk_group == 0,
                        "topk_group=" << topk_group << " needs num_groups (grouped selection)");
    }
    MOELB_CHECK_ARG(
        std::isfinite(routed_scaling_factor) && routed_scaling_factor > 0.0f,
        "routed_scaling_factor must be positive and finite, got " << routed_scaling_factor);
    MOELB_CHECK_ARG(num_fused_shared_experts == 0 || num_fused_shared_experts == 1,
                    "num_fused_shared_experts must be 0 or 1, got " << num_fused_shared_experts);
}

void TopKConfig::validate_for(int num_experts) const {
    validate();
    MOELB_CHECK_ARG(num_experts >= 1, "router_logits must have at least one expert column");
    MOELB_CHECK_ARG(top_k <= num_experts,
                    "top_k=" << top_k << " exceeds the number of experts " << num_experts);
    if (grouped()) {
        MOELB_CHECK_ARG(
            num_experts % num_groups == 0,
            "num_experts=" << num_experts << " is not divisible by num_groups=" << num_groups);
        const int kept = topk_group * (num_experts / num_groups);
        MOELB_CHECK_ARG(top_k <= kept, "top_k=" << top_k << " exceeds the " << kept
                                                << " experts of topk_group=" << topk_group
                                                << " groups of " << num_experts / num_groups);
    }
}

TopKConfig TopKConfig::deepseek_v3() {
    TopKConfig c;
    c.top_k = 8;
    c.scoring = Scoring::kSigmoid;
    c.num_groups = 8;
    c.topk_group = 4;
    c.group_score = GroupScore::kTop2Sum;
    c.renormalize = true;
    c.routed_scaling_factor = 2.5f;
    return c;
}

TopKConfig TopKConfig::deepseek_v4_flash() {
    TopKConfig c;
    c.top_k = 6;
    c.scoring = Scoring::kSqrtSoftplus;
    c.renormalize = true;
    c.routed_scaling_factor = 1.5f;
    return c;
}

TopKConfig TopKConfig::deepseek_v4_pro() {
    TopKConfig c = deepseek_v4_flash();
    c.routed_scaling_factor = 2.5f;
    return c;
}

TopKOutput::TopKOutput(Index num_tokens, int top_k, int num_fused_shared_experts)
    : topk_ids(num_tokens, top_k + num_fused_shared_experts),
      topk_weights(num_tokens, top_k + num_fused_shared_experts),
      recorder_topk_ids(num_tokens, top_k) {}

TopKOutputView TopKOutput::view() {
    return {MatrixMap<std::int32_t>(topk_ids.data(), topk_ids.rows(), topk_ids.cols()),
            MatrixMap<float>(topk_weights.data(), topk_weights.rows(), topk_weights.cols()),
            MatrixMap<std::int32_t>(recorder_topk_ids.data(), recorder_topk_ids.rows(),
                                    recorder_topk_ids.cols())};
}

namespace detail {

void check_output_shapes(const TopKOutputView& out, Index T, int K, int F) {
    MOELB_CHECK_ARG(out.topk_ids.rows() == T && out.topk_ids.cols() == K + F,
                    "topk_ids has shape [" << out.topk_ids.rows() << ", " << out.topk_ids.cols()
                                           << "] but [" << T << ", " << K + F << "] is needed");
    MOELB_CHECK_ARG(out.topk_weights.rows() == T && out.topk_weights.cols() == K + F,
                    "topk_weights has shape [" << out.topk_weights.rows() << ", "
                                               << out.topk_weights.cols() << "] but [" << T << ", "
                                               << K + F << "] is needed");
    MOELB_CHECK_ARG(out.recorder_topk_ids.rows() == T && out.recorder_topk_ids.cols() == K,
                    "recorder_topk_ids has shape [" << out.recorder_topk_ids.rows() << ", "
                                                    << out.recorder_topk_ids.cols() << "] but ["
                                                    << T << ", " << K << "] is needed");
}

void check_num_token_non_padded(std::optional<Index> n, Index T) {
    if (n) {
        MOELB_CHECK_ARG(*n >= 0 && *n <= T, "num_token_non_padded=" << *n << " is outside [0, " << T
                                                                    << "] (the token count)");
    }
}

void check_dispatcher(const LayerDispatcher* dispatcher, int E) {
    if (dispatcher) {
        MOELB_CHECK_ARG(dispatcher->location().num_logical_experts() == E,
                        "location has num_logical_experts="
                            << dispatcher->location().num_logical_experts()
                            << " but router_logits has " << E << " expert columns");
    }
}

}  // namespace detail

void select_experts(ConstMatrixMap<float> router_logits, const TopKConfig& config,
                    std::span<const float> correction_bias,
                    std::optional<Index> num_token_non_padded, const LayerDispatcher* dispatcher,
                    TopKOutputView out) {
    const Index T = router_logits.rows();
    const int E = static_cast<int>(router_logits.cols());
    config.validate_for(E);
    detail::check_output_shapes(out, T, config.top_k, config.num_fused_shared_experts);
    detail::check_num_token_non_padded(num_token_non_padded, T);
    detail::check_dispatcher(dispatcher, E);
    const float* bias = nullptr;
    if (!correction_bias.empty()) {
        MOELB_CHECK_ARG(static_cast<int>(correction_bias.size()) == E,
                        "correction_bias has " << correction_bias.size() << " entries but "
                                               << "router_logits has " << E << " expert columns");
        for (int e = 0; e < E; ++e) {
            MOELB_CHECK_ARG(
                std::isfinite(correction_bias[static_cast<std::size_t>(e)]),
                "correction_bias[" << e << "] = " << correction_bias[e] << " is not finite");
        }
        bias = correction_bias.data();
    }
    const detail::TopKEpilogue epilogue(config.top_k, config.num_fused_shared_experts,
                                        config.renormalize, config.routed_scaling_factor,
                                        config.apply_routed_scaling_factor_on_output, E,
                                        num_token_non_padded, dispatcher, out);
    const Index non_padded = num_token_non_padded.value_or(T);
    parallel_for(T, kRowsPerChunk, [&](Index begin, Index end) {
        Scratch s(E, config);
        for (Index t = begin; t < end; ++t) {
            if (t >= non_padded) {
                epilogue.write(t, nullptr, nullptr);
                continue;
            }
            compute_scores(router_logits.row(t).data(), E, config.scoring, bias, s);
            select_row(config, E, s);
            const std::int32_t* ids = s.experts.ids();
            for (int c = 0; c < config.top_k; ++c) {
                s.chosen_scores[static_cast<std::size_t>(c)] = s.scores[ids[c]];
            }
            epilogue.write(t, ids, s.chosen_scores.data());
        }
    });
}

TopKOutput select_experts(ConstMatrixMap<float> router_logits, const TopKConfig& config,
                          std::span<const float> correction_bias,
                          std::optional<Index> num_token_non_padded,
                          const LayerDispatcher* dispatcher) {
    config.validate();
    TopKOutput out(router_logits.rows(), config.top_k, config.num_fused_shared_experts);
    select_experts(router_logits, config, correction_bias, num_token_non_padded, dispatcher,
                   out.view());
    return out;
}

void remap_topk_for_per_rank_shared_slots(ConstMatrixMap<std::int32_t> topk_ids,
                                          int num_physical_experts, int ep_size, int ep_rank,
                                          int num_fused_shared_experts,
                                          MatrixMap<std::int32_t> out) {
    const int P = num_physical_experts, W = ep_size, F = num_fused_shared_experts;
    MOELB_CHECK_ARG(W >= 1, "ep_size must be positive, got " << W);
    MOELB_CHECK_ARG(P >= 1 && P % W == 0, "num_physical_experts=" << P
                                                                  << " is not a positive multiple "
                                                                     "of ep_size="
                                                                  << W);
    MOELB_CHECK_ARG(ep_rank >= 0 && ep_rank < W,
                    "ep_rank=" << ep_rank << " is outside [0, ep_size=" << W << ")");
    MOELB_CHECK_ARG(F >= 1, "num_fused_shared_experts must be at least 1, got " << F);
    MOELB_CHECK_ARG(topk_ids.cols() > F, "topk_ids has " << topk_ids.cols()
                                                         << " columns; it needs the routed "
                                                            "columns and "
                                                         << F << " shared column(s)");
    MOELB_CHECK_ARG(out.rows() == topk_ids.rows() && out.cols() == topk_ids.cols(),
                    "out has shape [" << out.rows() << ", " << out.cols()
                                      << "] but topk_ids has shape [" << topk_ids.rows() << ", "
                                      << topk_ids.cols() << "]");
    const int S = P / W;
    const int K = static_cast<int>(topk_ids.cols()) - F;
    parallel_for(topk_ids.rows(), 4096, [&](Index begin, Index end) {
        for (Index t = begin; t < end; ++t) {
            bool any = false;
            for (int c = 0; c < K; ++c) {
                const std::int32_t p = topk_ids(t, c);
                MOELB_CHECK_ARG(p >= -1 && p < P, "topk_ids[" << t << ", " << c << "] = " << p
                                                              << " is outside [-1, "
                                                                 "num_physical_experts="
                                                              << P << ")");
                any = any || p >= 0;
                out(t, c) = p < 0 ? -1 : p + (p / S) * F;
            }
            for (int j = 0; j < F; ++j) out(t, K + j) = any ? ep_rank * (S + F) + S + j : -1;
        }
    });
}

}  // namespace moelb
