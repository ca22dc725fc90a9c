// The routing kernels of one ISA path (isa/kernels.hpp; compiled once per path): select_experts'
// scores and grouped top-k per row, and HashRouter's score functions.
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <memory>
#include <span>
#include <vector>

#include "kernels.hpp"
#include "path_allocator.hpp"
#include "scoring.hpp"

namespace moelb::MOELB_ISA_NS {
namespace {

// The expert ids [begin, end) of a kept group.
struct Range {
    int begin;
    int end;
    bool operator<(const Range& other) const { return begin < other.begin; }
};

// The k best (value, id) pairs seen so far, in descending value; among equal values the earlier
// pushed stays ahead. Pushing ids in ascending order therefore breaks ties to the lowest id.
class TopKList {
  public:
    explicit TopKList(int k)
        : k_(k),
          values_(static_cast<std::size_t>(k)),
          ids_(values_.size()),
          scratch_top_(values_.size()) {}

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

    // Pushes values[e] (id e) for e in the ascending, disjoint ranges of `ranges`, skipping values
    // that cannot be among the k largest. The values are split into kLanes sets (offset within its
    // range mod kLanes); the k-th largest of the sets' maxima is a lower bound of the k-th largest
    // value (k sets each hold a value at least that large), so only values at or above it are
    // pushed -- in ascending id order, which keeps ties on the lowest id.
    void push_ranges(const float* values, std::span<const Range> ranges) {
        float lane_max[kLanes];
        std::fill(lane_max, lane_max + kLanes, kNegInf);
        int count = 0;
        for (const Range& r : ranges) {
            int e = r.begin;
            for (; e + kLanes <= r.end; e += kLanes) {
                for (int j = 0; j < kLanes; ++j) {
                    lane_max[j] = values[e + j] > lane_max[j] ? values[e + j] : lane_max[j];
                }
            }
            for (int j = 0; e < r.end; ++e, ++j) {
                lane_max[j] = values[e] > lane_max[j] ? values[e] : lane_max[j];
            }
            count += r.end - r.begin;
        }
        // Empty lanes keep -inf, which makes the bound -inf (everything is a candidate).
        const float bound = k_ <= kLanes ? kth_largest(lane_max, kLanes) : kNegInf;
        candidates_.resize(static_cast<std::size_t>(count + kLanes));  // slack for SIMD stores
        int n = 0;
        for (const Range& r : ranges) {
            n += collect_at_least(values, r.begin, r.end, bound, candidates_.data() + n);
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
    Vector<float> values_;
    Vector<std::int32_t> ids_;
    Vector<float> scratch_top_;
    Vector<std::int32_t> candidates_;
};

// Per-call scratch of route_rows.
struct Scratch {
    ArrayXf scores;  // [E] unbiased scores
    ArrayXf choice;  // [E] selection scores (score + bias; -inf for NaN logits)
    ArrayXf groups;  // [G] group scores
    ScoreScratch score_scratch;
    Vector<Range> kept_groups;  // expert ranges of the kept groups
    TopKList experts;
    TopKList group_list;

    Scratch(int E, const isa::RouteRowsArgs& a)
        : scores(E),
          choice(E),
          groups(std::max(a.num_groups, 1)),
          experts(a.top_k),
          group_list(std::max(a.topk_group, 1)) {}
};

// scores <- f(logits), choice <- scores + bias with NaN logits at -inf.
void compute_scores(const float* logits, int E, isa::ScoreFn scoring, const float* bias,
                    Scratch& s) {
    sanitize_logits(logits, E, s.scores);
    if (scoring == isa::ScoreFn::kSoftmax) {
        softmax(s.scores, s.score_scratch);
    } else {
        elementwise_scores(scoring, s.scores, s.score_scratch);
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

void select_row(const isa::RouteRowsArgs& a, Scratch& s) {
    const int E = a.num_experts;
    s.experts.clear();
    const float* choice = s.choice.data();
    if (a.num_groups == 0) {
        const Range all{0, E};
        s.experts.push_ranges(choice, {&all, 1});
        return;
    }
    const int per_group = E / a.num_groups;
    for (int g = 0; g < a.num_groups; ++g) {
        const float* v = choice + static_cast<isa::Index>(g) * per_group;
        float best = kNegInf, second = kNegInf;
        for (int i = 0; i < per_group; ++i) {
            if (v[i] > best) {
                second = best;
                best = v[i];
            } else if (v[i] > second) {
                second = v[i];
            }
        }
        s.groups[g] = (a.group_max || per_group == 1) ? best : best + second;
    }
    s.group_list.clear();
    for (int g = 0; g < a.num_groups; ++g) s.group_list.push(s.groups[g], g);
    // Scan the kept groups in ascending id order so expert ties go to the lowest id.
    s.kept_groups.clear();
    for (int i = 0; i < s.group_list.size(); ++i) {
        const int g = s.group_list.ids()[i];
        s.kept_groups.push_back({g * per_group, (g + 1) * per_group});
    }
    std::sort(s.kept_groups.begin(), s.kept_groups.end());
    s.experts.push_ranges(choice, s.kept_groups);
}

}  // namespace

void route_rows(const isa::RouteRowsArgs& args, isa::Index begin, isa::Index end, std::int32_t* ids,
                float* scores) {
    const int E = args.num_experts, K = args.top_k;
    Scratch s(E, args);
    for (isa::Index t = begin; t < end; ++t) {
        compute_scores(args.logits + t * E, E, args.scoring, args.bias, s);
        select_row(args, s);
        const std::int32_t* chosen = s.experts.ids();
        std::int32_t* row_ids = ids + (t - begin) * K;
        float* row_scores = scores + (t - begin) * K;
        for (int c = 0; c < K; ++c) {
            row_ids[c] = chosen[c];
            row_scores[c] = s.scores[chosen[c]];
        }
    }
}

void hash_scores(isa::ScoreFn scoring, const float* logits, isa::Index num_experts, isa::Index rows,
                 const std::int32_t* expert_ids, int top_k, float* values) {
    const isa::Index E = num_experts, K = top_k;
    ArrayXf x;
    ScoreScratch scratch;
    if (scoring == isa::ScoreFn::kSoftmax) {
        // Probabilities over all E experts of the row.
        for (isa::Index r = 0; r < rows; ++r) {
            sanitize_logits(logits + r * E, E, x);
            softmax(x, scratch);
            for (isa::Index k = 0; k < K; ++k) values[r * K + k] = x[expert_ids[r * K + k]];
        }
        return;
    }
    // The looked-up logits of all rows, scored as one vectorised batch.
    for (isa::Index r = 0; r < rows; ++r) {
        for (isa::Index k = 0; k < K; ++k)
            values[r * K + k] = logits[r * E + expert_ids[r * K + k]];
    }
    sanitize_logits(values, rows * K, x);
    elementwise_scores(scoring, x, scratch);
    std::copy(x.data(), x.data() + rows * K, values);
}

}  // namespace moelb::MOELB_ISA_NS
