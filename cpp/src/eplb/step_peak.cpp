// The per-step peak objective (DESIGN section 4: rebalance(objective="step_peak"), eplb.hpp):
// starting from a layer's packing for its total load, swaps of replicas between GPUs of a domain
// (same counts, no new same-GPU duplicate) while that lowers the sum over the window's steps of
// each step's largest GPU load -- what a serving step waits for -- so that experts that peak in
// the same steps end up on different GPUs.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <vector>

#include "../isa/kernels.hpp"
#include "planner.hpp"

namespace moelb::planner {
namespace {

// A swap must lower the objective by this much (relative): smaller gains are mostly the window's
// sampling noise (they do not carry over to the next window) and cost time.
constexpr double kStepTol = 1e-4;
// Steps are padded to whole chunks of this many; a candidate's sum is checked once per chunk.
constexpr Index kStepChunk = 8 * kLanes;

// Scratch of refine_step_peak, reused across layers (one per thread). Step arrays are padded with
// zero steps to whole chunks (a zero step's largest load stays 0 whatever moves).
struct StepScratch {
    std::vector<double> share;             // [E, steps]: an expert's load per replica in each step
    std::vector<double> load;              // [bins, steps]: each bin's load in each step
    std::vector<double> top1, top2, top3;  // [steps]: the three largest bin loads of a step
    std::vector<int> arg1, arg2;           // [steps]: the bins of the two largest
    std::vector<int> peaks, by_peaks;      // [bins]: steps each bin is the largest in
    // Steps where a bin is one of the two largest: bin b's at [near_offset[b], near_offset[b+1])
    // (near_fill: where the next one goes while filling).
    std::vector<int> near, near_offset, near_fill;
    // Bin a's search: its peak steps (peak_steps) and, gathered over them, each expert's load per
    // replica ([E, peak stride]), a's and the partner's loads, the second and third largest
    // loads and the second largest's bin.
    std::vector<int> peak_steps, peak_arg2;
    std::vector<double> peak_share, peak_a, peak_b, peak_top2, peak_top3, peak_rest, peak_sum;
    // Bin a's search with partner b: the largest load of the other bins in every step (rest_a:
    // of the bins other than a); other_a: 0 in a's peak steps, else 1; the most b's peak steps
    // can give back from each chunk on.
    std::vector<double> rest_a, rest, other_a, reach;

    // Frees the buffers when they hold more than kKeepBytes (a long series), so that a planner
    // thread does not keep them after the call; smaller ones are reused by the next layer.
    void release_if_large() {
        constexpr std::size_t kKeepBytes = std::size_t{64} << 20;
        std::size_t bytes = 0;
        for (const auto* v : {&share, &load, &peak_share}) bytes += v->capacity() * sizeof(double);
        if (bytes > kKeepBytes) *this = StepScratch();
    }
};

// The best swap of the search so far: bin(a)[xi] <-> bin(b)[yi] changes the objective by
// `change` (negative: lower); b < 0: none yet.
struct StepSwap {
    double change = 0.0;
    int b = -1, xi = -1, yi = -1;
};

// One refine_step_peak run: the layer's packing p, its per-step loads, the scratch, and the sizes
// (DESIGN's letters where it has them): E experts, B bins (GPUs), S slots per bin, T steps padded
// with zero steps to whole chunks.
struct StepPeakSearch {
    Packing& p;
    const LayerSteps& steps;
    StepScratch& s;
    int E = 0, B = 0, S = 0;
    Index T = 0, chunks = 0;  // chunks = T / kStepChunk
    // Bin a's search: its number of peak steps, and that padded to whole vectors.
    Index num_peak_steps = 0, peak_stride = 0;

    static std::size_t sz(Index n) { return static_cast<std::size_t>(n); }

    // Each expert's load per replica and each bin's load in each step; sizes the step arrays.
    void load_steps() {
        s.share.assign(sz(E * T), 0.0);
        for (Index t = 0; t < steps.num_steps; ++t) {
            for (int e = 0; e < E; ++e) {
                s.share[e * T + t] = p.count[e] > 0 ? steps(t, e) / p.count[e] : 0.0;
            }
        }
        s.load.resize(sz(B * T));
        for (auto* v : {&s.top1, &s.top2, &s.top3, &s.rest_a, &s.rest, &s.other_a}) {
            v->resize(sz(T));
        }
        s.arg1.resize(sz(T));
        s.arg2.resize(sz(T));
        s.reach.resize(sz(chunks + 1));
        s.peaks.resize(sz(B));
        s.near_offset.resize(sz(B + 1));
        s.near.resize(sz(2 * T));
        s.peak_sum.resize(sz(E));
        for (int b = 0; b < B; ++b) {
            double* l = s.load.data() + b * T;
            std::fill(l, l + T, 0.0);
            for (int k = 0; k < S; ++k) {
                const double* u = s.share.data() + p.bin(b)[k] * T;
                for (Index t = 0; t < T; ++t) l[t] += u[t];
            }
        }
    }

    // Each step's three largest bin loads (ties to the lower bin) and the two largest's bins;
    // returns the objective, the sum of the steps' largest.
    double rank_steps() {
        std::fill(s.top1.begin(), s.top1.end(), 0.0);
        std::fill(s.top2.begin(), s.top2.end(), 0.0);
        std::fill(s.top3.begin(), s.top3.end(), 0.0);
        std::fill(s.arg1.begin(), s.arg1.end(), -1);
        std::fill(s.arg2.begin(), s.arg2.end(), -1);
        for (int b = 0; b < B; ++b) {
            const double* l = s.load.data() + b * T;
            for (Index t = 0; t < T; ++t) {
                const double v = l[t];
                if (v > s.top1[t]) {
                    s.top3[t] = s.top2[t];
                    s.top2[t] = s.top1[t];
                    s.arg2[t] = s.arg1[t];
                    s.top1[t] = v;
                    s.arg1[t] = b;
                } else if (v > s.top2[t]) {
                    s.top3[t] = s.top2[t];
                    s.top2[t] = v;
                    s.arg2[t] = b;
                } else if (v > s.top3[t]) {
                    s.top3[t] = v;
                }
            }
        }
        double objective = 0.0;
        for (Index t = 0; t < T; ++t) objective += s.top1[t];
        return objective;
    }

    // Peak counts, each bin's steps among the two largest (a counting sort by bin), and the bins
    // that are the largest in some step, most such steps first (ties to the lower bin).
    void index_peak_bins() {
        std::fill(s.peaks.begin(), s.peaks.end(), 0);
        std::fill(s.near_offset.begin(), s.near_offset.end(), 0);
        for (Index t = 0; t < T; ++t) {
            if (s.arg1[t] >= 0) {
                ++s.peaks[s.arg1[t]];
                ++s.near_offset[s.arg1[t] + 1];
            }
            if (s.arg2[t] >= 0) ++s.near_offset[s.arg2[t] + 1];
        }
        for (int b = 0; b < B; ++b) s.near_offset[b + 1] += s.near_offset[b];
        s.near_fill.assign(s.near_offset.begin(), s.near_offset.end() - 1);
        for (Index t = 0; t < T; ++t) {
            if (s.arg1[t] >= 0) s.near[s.near_fill[s.arg1[t]]++] = static_cast<int>(t);
            if (s.arg2[t] >= 0) s.near[s.near_fill[s.arg2[t]]++] = static_cast<int>(t);
        }
        s.by_peaks.clear();
        for (int b = 0; b < B; ++b) {
            if (s.peaks[b] > 0) s.by_peaks.push_back(b);
        }
        std::stable_sort(s.by_peaks.begin(), s.by_peaks.end(),
                         [&](int x, int y) { return s.peaks[x] > s.peaks[y]; });
    }

    // a's peak steps, padded with zero steps to whole vectors, and what is gathered on them;
    // rest_a and the gain each step allows when only a is excluded. Returns the most a swap can
    // gain in a's peak steps: each step down to the next largest.
    double gather_peak_steps(int a) {
        s.peak_steps.clear();
        for (Index t = 0; t < T; ++t) {
            if (s.arg1[t] == a) s.peak_steps.push_back(static_cast<int>(t));
        }
        const Index n = num_peak_steps = static_cast<Index>(s.peak_steps.size());
        const Index stride = peak_stride = (n + kLanes - 1) / kLanes * kLanes;
        s.peak_share.assign(sz(E * stride), 0.0);
        for (int e = 0; e < E; ++e) {
            const double* u = &s.share[e * T];
            double* c = &s.peak_share[e * stride];
            double sum = 0.0;
            for (Index i = 0; i < n; ++i) sum += c[i] = u[s.peak_steps[i]];
            s.peak_sum[e] = sum;
        }
        for (auto* v : {&s.peak_a, &s.peak_b, &s.peak_top2, &s.peak_top3, &s.peak_rest}) {
            v->assign(sz(stride), 0.0);
        }
        s.peak_arg2.assign(sz(stride), -1);
        for (Index i = 0; i < n; ++i) {
            const int t = s.peak_steps[i];
            s.peak_a[i] = s.load[a * T + t];
            s.peak_top2[i] = s.top2[t];
            s.peak_top3[i] = s.top3[t];
            s.peak_arg2[i] = s.arg2[t];
        }
        for (Index t = 0; t < T; ++t) {
            s.rest_a[t] = s.arg1[t] != a ? s.top1[t] : s.top2[t];
            s.other_a[t] = s.arg1[t] != a ? 1.0 : 0.0;
        }
        double reach_a = 0.0;
        for (Index i = 0; i < n; ++i) reach_a += s.peak_a[i] - s.peak_top3[i];
        return reach_a;
    }

    // rest with b excluded too: it differs from rest_a only where b is one of the two largest.
    // reach: what b's peak steps can give back from each chunk on. Returns reach[0].
    double partner_reach(int a, int b) {
        std::copy(s.rest_a.begin(), s.rest_a.end(), s.rest.begin());
        std::fill(s.reach.begin(), s.reach.end(), 0.0);
        for (int j = s.near_offset[b]; j < s.near_offset[b + 1]; ++j) {
            const int t = s.near[j];
            const bool first = s.arg1[t] != a && s.arg1[t] != b;
            const bool second = s.arg2[t] != a && s.arg2[t] != b;
            s.rest[t] = first ? s.top1[t] : second ? s.top2[t] : s.top3[t];
            if (s.arg1[t] == b) s.reach[t / kStepChunk] += s.top1[t] - s.rest[t];
        }
        for (Index c = chunks - 1; c >= 0; --c) s.reach[c] += s.reach[c + 1];
        return s.reach[0];
    }

    // The swaps of a replica of a with one of b (b's reach: reach_b): keeps in `best` the one that
    // changes the objective the least (ties to the earlier slots), among those that beat it.
    void search_pairs(int a, int b, double reach_b, double slack, StepSwap& best) {
        const Index n = num_peak_steps, stride = peak_stride;
        for (Index i = 0; i < n; ++i) {
            const int t = s.peak_steps[i];
            s.peak_b[i] = s.load[b * T + t];
            s.peak_rest[i] = s.peak_arg2[i] != b ? s.peak_top2[i] : s.peak_top3[i];
        }
        const double* la = &s.load[a * T];
        const double* lb = &s.load[b * T];
        const isa::Kernels& kernels = isa::kernels();
        for (int xi = 0; xi < S; ++xi) {
            const int x = p.bin(a)[xi];
            for (int yi = 0; yi < S; ++yi) {
                const int y = p.bin(b)[yi];
                if (s.peak_sum[y] - s.peak_sum[x] - reach_b >= best.change + slack ||
                    !p.swap_allowed(a, xi, b, yi)) {
                    continue;
                }
                // The terms of a's peak steps, then of the other steps in step order, chunk by
                // chunk until the sum cannot beat the best (isa/eplb_kernels.cpp).
                const double peak_change = kernels.peak_change(
                    &s.peak_share[x * stride], &s.peak_share[y * stride], s.peak_a.data(),
                    s.peak_b.data(), s.peak_rest.data(), stride);
                if (peak_change - reach_b >= best.change + slack) continue;
                double change = peak_change;
                const Index c =
                    kernels.other_change(&s.share[x * T], &s.share[y * T], la, lb, s.rest.data(),
                                         s.top1.data(), s.other_a.data(), s.reach.data(), chunks,
                                         kStepChunk, peak_change, best.change + slack, &change);
                if (c == chunks && change < best.change) best = {change, b, xi, yi};
            }
        }
    }

    // The best swap of bin a with a bin of its domain, if one lowers the objective by more than
    // `margin`; the screens skip only candidates that miss the best by more than `slack`.
    StepSwap best_swap(int a, double margin, double slack) {
        const double reach_a = gather_peak_steps(a);
        StepSwap best{-margin};  // the best change of the objective so far (negative: lower)
        const int d = p.domain(a);
        for (int b = d * p.bins_per_domain; b < (d + 1) * p.bins_per_domain; ++b) {
            if (b == a) continue;
            const double reach_b = partner_reach(a, b);
            if (-(reach_a + reach_b) >= best.change + slack) continue;
            search_pairs(a, b, reach_b, slack, best);
        }
        return best;
    }

    // Makes the swap of bin a's replica, in the step loads and in p.
    void apply(int a, const StepSwap& swap) {
        const double* ux = &s.share[p.bin(a)[swap.xi] * T];
        const double* uy = &s.share[p.bin(swap.b)[swap.yi] * T];
        double* ga = &s.load[a * T];
        double* gb = &s.load[swap.b * T];
        for (Index t = 0; t < T; ++t) {
            const double delta = uy[t] - ux[t];
            ga[t] += delta;
            gb[t] -= delta;
        }
        p.apply_swap(a, swap.xi, swap.b, swap.yi);
    }

    void run() {
        E = p.num_experts();
        B = p.num_bins;
        S = p.size;
        if (steps.num_steps <= 0 || B < 2) return;
        T = (steps.num_steps + kStepChunk - 1) / kStepChunk * kStepChunk;
        chunks = T / kStepChunk;
        load_steps();
        const int max_swaps = 4 * B * S;
        for (int swaps = 0; swaps < max_swaps; ++swaps) {
            const double objective = rank_steps();
            if (!(objective > 0)) return;
            index_peak_bins();
            const double margin = objective * kStepTol;
            // The screens compare sums taken in another order than the exact one: they skip only
            // candidates that miss the best by more than this, far above that rounding.
            const double slack = objective * 1e-11;
            bool improved = false;
            for (const int a : s.by_peaks) {
                const StepSwap best = best_swap(a, margin, slack);
                if (best.b < 0) continue;
                apply(a, best);
                improved = true;
                break;
            }
            if (!improved) return;
        }
    }
};

}  // namespace

// Lowers the sum over steps of each step's largest bin load by swaps of replicas between bins of
// a domain that keep the no-duplicate rule (counts and domains unchanged; p.bin_load follows).
// Repeatedly: for the bins that are the largest in some step (most such steps first, ties to the
// lower bin), the best swap with another bin of the domain (ties to the lower partner, then
// slots); the first bin that has one that lowers the objective by more than kStepTol of it
// makes it. Stops when none has, or after 4 * slots swaps. Sequential, in float64 with a fixed
// summation order: the same result for any thread count.
//
// A swap of x on bin a with y on bin b changes the objective by the sum over steps of
// max(rest, new load of a, new load of b) - largest, where rest is the largest load of the other
// bins. The term is never negative in a step whose largest bin is neither a nor b, at least
// rest - largest where it is b, and at least y - x where it is a. So a candidate's change is
// summed over a's peak steps first (after a screen by the sum of y - x over them), then over
// the other steps in step order, stopping as soon as the sum so far, less the most b's remaining
// peak steps can give back, cannot beat the best swap found (checked every kStepChunk steps).
void refine_step_peak(Packing& p, const LayerSteps& steps) {
    thread_local StepScratch scratch;
    StepPeakSearch{p, steps, scratch}.run();
    scratch.release_if_large();
}

}  // namespace moelb::planner
