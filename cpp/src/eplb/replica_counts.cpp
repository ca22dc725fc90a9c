// How many replicas each expert gets (DESIGN section 4): the divisor method's counts per domain
// (the replica counts that minimise the largest per-replica load), the layer's flat lower bound on
// the largest GPU load, and the count searches that move a replica between experts when that
// lowers the largest GPU load or removes an avoidable duplicate (each trial repacked by
// packing.cpp).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <utility>
#include <vector>

#include "planner.hpp"

namespace moelb::planner {
namespace {

constexpr double kBoundMargin = 1e-9;  // a bound this far above a load is above it despite rounding
constexpr int kCountSearchBudget = 2;  // repacks per layer in search_counts
constexpr std::int64_t kSmallLayerWork = 1 << 16;  // E^4 * P up to which search_all_counts runs
constexpr double kCountSearchGap = 5e-3;           // relative gap to the bound worth a count search

// Divisor-method replica counts count[0, num_items) for experts[0, num_items) (loads w) over
// `num_slots` slots, each expert at most `max_replicas` replicas (when the slots allow):
// minimises the largest per-replica load. Ties go to the earlier expert in the list.
void divisor_counts(const double* w, const int* experts, int num_items, int num_slots,
                    int max_replicas, int* count) {
    std::fill(count, count + num_items, 1);
    int cap = max_replicas;
    if (static_cast<Index>(cap) * num_items < num_slots) {
        cap = (num_slots + num_items - 1) / num_items;  // cannot honour the cap
    }
    divisor_method<double>(
        num_items, num_slots - num_items, cap, [&](int i) { return w[experts[i]]; }, count,
        [](int) {});
}

// Removes avoidable duplicates that swaps could not: moves one replica of the duplicated expert
// to another expert of its domain (the best few by the divisor rule) and repacks, keeping a
// result only if it has fewer avoidable duplicates and no higher maximum load. `q` is scratch.
void remove_avoidable_duplicates(Packing& p, Packing& q, const double* w, double target,
                                 PackScratch& s) {
    constexpr int kCandidates = 8;
    const int bins_per_domain = p.bins_per_domain;
    std::vector<std::pair<double, int>> donors_to;  // (-w/(c+1), f)
    for (int attempt = 0; attempt < 4; ++attempt) {
        int e = -1;
        const int dups = avoidable_duplicates(p, s, &e);
        if (dups == 0) return;
        const int d = p.domain_of[e];
        donors_to.clear();
        for (int f = 0; f < p.num_experts(); ++f) {
            const int c = p.count[f];
            if (c > 0 && p.domain_of[f] == d && f != e && c < bins_per_domain) {
                donors_to.emplace_back(-w[f] / (c + 1), f);
            }
        }
        std::sort(donors_to.begin(), donors_to.end());
        if (static_cast<int>(donors_to.size()) > kCandidates) donors_to.resize(kCandidates);
        bool improved = false;
        for (const auto& [key, f] : donors_to) {
            q = p;
            q.change_count(e, -1, w);
            q.change_count(f, +1, w);
            pack_counts(q, w, target, s);
            if (q.max_load() <= p.max_load() * (1 + kRelTol) && avoidable_duplicates(q, s) < dups) {
                std::swap(p, q);
                improved = true;
                break;
            }
        }
        if (!improved) return;
    }
}

// Sorts the replicas of p's domain d as (replica load, replicas, expert), ascending, into
// s.bound_base: the base trial_lower_bound edits.
void sort_domain_replicas(const Packing& p, int d, const double* w, PackScratch& s) {
    s.bound_base.clear();
    for (int f = 0; f < p.num_experts(); ++f) {
        if (p.domain_of[f] == d) s.bound_base.push_back({w[f] / p.count[f], p.count[f], f});
    }
    std::sort(s.bound_base.begin(), s.bound_base.end(), [](const auto& x, const auto& y) {
        return x.load < y.load || (x.load == y.load && x.expert < y.expert);
    });
}

// A lower bound on the maximum bin load of any packing of domain d = p.domain_of[e] after one
// replica moves from `donor` to `e` (s.bound_base: d's replicas before the move, from
// sort_domain_replicas). Every bin holds exactly p.size replicas, so with replica loads
// r_1 >= r_2 >= ... and U_n the sum of the n smallest: the domain's mean bin load, and for each
// h, either two of the h largest replicas share a bin (>= r_{h-1} + r_h) or they sit in h bins
// whose other h (size - 1) slots weigh at least U_{h(size-1)}, so one of those bins weighs
// >= (r_1 + ... + r_h + U_{h(size-1)}) / h.
double trial_lower_bound(const Packing& p, int e, int donor, const double* w, PackScratch& s) {
    auto& values = s.bound_values;
    values.clear();
    double total = 0.0;
    const PackScratch::Replicas moved[2] = {
        {w[e] / (p.count[e] + 1), p.count[e] + 1, e},
        {w[donor] / (p.count[donor] - 1), p.count[donor] - 1, donor}};
    // The base without e and donor, with their new entries merged in (any order among equal
    // loads gives the same bound).
    const auto before = [](const PackScratch::Replicas& x, const PackScratch::Replicas& y) {
        return x.load < y.load;
    };
    PackScratch::Replicas extra[2] = {moved[0], moved[1]};
    if (before(extra[1], extra[0])) std::swap(extra[0], extra[1]);
    int next = 0;
    for (const auto& v : s.bound_base) {
        if (v.expert == e || v.expert == donor) continue;
        while (next < 2 && before(extra[next], v)) values.push_back(extra[next++]);
        values.push_back(v);
        total += w[v.expert];
    }
    while (next < 2) values.push_back(extra[next++]);
    total += w[e] + w[donor];
    const int bins = p.bins_per_domain, fill = p.size - 1;
    double bound = total / bins;
    // Walks: `top` down from the largest replica, `low` up from the smallest.
    std::size_t top = values.size(), low = 0;
    int top_left = 0, low_left = values.empty() ? 0 : values[0].count;
    double top_sum = 0.0, low_sum = 0.0, previous = 0.0;
    int low_taken = 0;
    for (int h = 1; h <= bins; ++h) {
        if (top_left == 0) {
            if (top == 0) break;
            --top;
            top_left = values[top].count;
        }
        const double r = values[top].load;
        --top_left;
        top_sum += r;
        if (h >= 2 && previous + r <= bound) break;  // every later pair bound is lower still
        for (; low_taken < h * fill && low < values.size(); ++low_taken) {
            while (low_left == 0 && ++low < values.size()) low_left = values[low].count;
            if (low >= values.size()) break;
            low_sum += values[low].load;
            --low_left;
        }
        const double spread = (top_sum + low_sum) / h;
        bound = std::max(bound, h >= 2 ? std::min(previous + r, spread) : spread);
        previous = r;
    }
    return bound;
}

// The count searches' keep rule: the repacked trial q replaces p (which has `dups` avoidable
// duplicates) when its maximum drops without adding avoidable duplicates, or stays and avoidable
// duplicates drop.
bool keep_trial(Packing& p, Packing& q, int dups, PackScratch& s) {
    const double qm = q.max_load(), pm = p.max_load();
    const int qdups = avoidable_duplicates(q, s);
    if ((qm < pm * (1 - kRelTol) && qdups <= dups) || (qm <= pm * (1 + kRelTol) && qdups < dups)) {
        std::swap(p, q);
        return true;
    }
    return false;
}

// Replica-count search: the divisor method minimises the largest per-replica load, not the
// largest GPU load. Gives one more replica to an expert of the heaviest GPU, taken from the
// expert that loses least (smallest load per replica after losing one), repacks, and keeps the
// result when the maximum drops without adding avoidable duplicates, or stays and avoidable
// duplicates drop. At most `budget` repacks. `q` is scratch.
void search_counts(Packing& p, Packing& q, const double* w, double target, int budget,
                   PackScratch& s) {
    const int bins_per_domain = p.bins_per_domain;
    std::vector<int> receivers, items;
    for (int tries = 0; tries < budget;) {
        if (p.max_load() <= target * (1 + kTargetTol)) return;
        int a = 0;
        for (int b = 1; b < p.num_bins; ++b) {
            if (p.bin_load[b] > p.bin_load[a]) a = b;
        }
        const int d = p.domain(a);
        // Receivers: the experts on the heaviest GPU, heaviest replica first.
        items.assign(p.bin(a), p.bin(a) + p.size);
        std::sort(items.begin(), items.end(), [&](int x, int y) {
            return p.replica_load[x] > p.replica_load[y] ||
                   (p.replica_load[x] == p.replica_load[y] && x < y);
        });
        receivers.clear();
        for (const int e : items) {
            if (p.count[e] < bins_per_domain &&
                std::find(receivers.begin(), receivers.end(), e) == receivers.end()) {
                receivers.push_back(e);
            }
        }
        bool improved = false;
        const int dups = avoidable_duplicates(p, s);
        sort_domain_replicas(p, d, w, s);
        for (const int e : receivers) {
            if (tries >= budget) break;
            int donor = -1;
            double donor_key = std::numeric_limits<double>::infinity();
            for (int f = 0; f < p.num_experts(); ++f) {
                const int c = p.count[f];
                if (f == e || c < 2 || p.domain_of[f] != d) continue;
                const double key = w[f] / (c - 1);
                if (key < donor_key) {
                    donor_key = key;
                    donor = f;
                }
            }
            if (donor < 0) break;
            ++tries;
            // A trial whose packing cannot get below p's maximum would be rejected: skip the
            // repack (the trial still counts against the budget, so the result is the same).
            if (trial_lower_bound(p, e, donor, w, s) > p.max_load() * (1 + kBoundMargin)) continue;
            q = p;
            q.change_count(e, +1, w);
            q.change_count(donor, -1, w);
            pack_counts(q, w, target, s);
            if (keep_trial(p, q, dups, s)) {
                improved = true;
                break;
            }
        }
        if (!improved) return;
    }
}

// The replica-count search of small layers (E^4 * P <= kSmallLayerWork): any expert of a domain
// may take a replica from any other expert of that domain with two or more, not only the experts
// of the heaviest GPU (the optimum sometimes gives one to an expert of a lighter GPU), one move
// at a time and, when no single move helps, two at once (a move that only pays off with another,
// e.g. a second replica of a tiny expert as a filler). Moves are tried in (receiver, donor) order
// and a result is kept as in search_counts. `q` is scratch.
void search_all_counts(Packing& p, Packing& q, const double* w, double target, PackScratch& s) {
    const int E = p.num_experts();
    std::vector<std::pair<int, int>> moves;  // (receiver, donor)
    const auto try_moves = [&](std::initializer_list<std::pair<int, int>> changes, int dups) {
        q = p;
        for (const auto& [e, f] : changes) {
            if (q.count[e] >= q.bins_per_domain || q.count[f] < 2) return false;
            q.change_count(e, +1, w);
            q.change_count(f, -1, w);
        }
        pack_counts(q, w, target, s);
        return keep_trial(p, q, dups, s);
    };
    for (int round = 0; round < 4 * E; ++round) {
        if (p.max_load() <= target * (1 + kTargetTol)) return;
        const int dups = avoidable_duplicates(p, s);
        moves.clear();
        for (int e = 0; e < E; ++e) {
            for (int f = 0; f < E; ++f) {
                if (f != e && p.domain_of[f] == p.domain_of[e]) moves.emplace_back(e, f);
            }
        }
        bool improved = false;
        for (std::size_t i = 0; i < moves.size() && !improved; ++i) {
            improved = try_moves({moves[i]}, dups);
        }
        for (std::size_t i = 0; i < moves.size() && !improved; ++i) {
            for (std::size_t j = i + 1; j < moves.size() && !improved; ++j) {
                improved = try_moves({moves[i], moves[j]}, dups);
            }
        }
        if (!improved) return;
    }
}

}  // namespace

double flat_lower_bound(const double* w, int num_experts, int num_physical_experts, int ep_size,
                        std::vector<int>& count, BoundCounts counts) {
    const int E = num_experts, P = num_physical_experts, W = ep_size;  // DESIGN's letters
    double total = 0.0;
    for (int e = 0; e < E; ++e) total += w[e];
    const double mean = total / W;
    // Often the mean decides: when some counts (summing to at most `P`) bring every w / count
    // to the mean or below, so does the divisor method's optimum (it minimises the largest
    // w / count, in floating point too, since w / c rounds monotonically in c). Each expert needs
    // the fewest replicas c with w / c <= mean.
    if (mean > 0 && counts == BoundCounts::kScratch) {
        Index needed = 0;
        for (int e = 0; e < E && needed <= P; ++e) {
            if (w[e] <= mean) {
                ++needed;
                continue;
            }
            const double q = std::ceil(w[e] / mean);
            if (q > P) {
                needed = Index{P} + 1;
                break;
            }
            int c = std::max(1, static_cast<int>(q));
            while (w[e] / c > mean) ++c;
            while (c > 1 && w[e] / (c - 1) <= mean) --c;
            needed += c;
        }
        if (needed <= P) return mean;
    }
    count.assign(static_cast<std::size_t>(E), 1);
    // The largest per-replica load: the method's largest key left (w / count, as below), unless
    // it gave no extra or capped an item.
    double m = divisor_method<double>(
        E, P - E, P, [w](int i) { return w[i]; }, count.data(), [](int) {});
    if (m < 0) {
        m = 0.0;
        for (int e = 0; e < E; ++e) m = std::max(m, w[e] / count[e]);
    }
    return std::max(mean, m);
}

void initial_counts(Packing& p, const double* w, const std::vector<int>& flat_count) {
    const int num_domains = p.num_domains(), ranks_per_domain = p.bins_per_domain;
    const int slots_per_domain = p.size * p.bins_per_domain;
    // With one domain these are the flat bound's counts unless its cap binds: a method whose cap
    // never stops an item makes the same choices as one without a cap.
    if (num_domains == 1 &&
        *std::max_element(flat_count.begin(), flat_count.end()) <= ranks_per_domain) {
        std::copy(flat_count.begin(), flat_count.end(), p.count.begin());
        return;
    }
    thread_local std::vector<int> experts, count;
    for (int d = 0; d < num_domains; ++d) {
        experts.clear();
        for (int e = 0; e < p.num_experts(); ++e) {
            if (p.domain_of[e] == d) experts.push_back(e);
        }
        const int n = static_cast<int>(experts.size());
        count.resize(static_cast<std::size_t>(n));
        divisor_counts(w, experts.data(), n, slots_per_domain, ranks_per_domain, count.data());
        for (int i = 0; i < n; ++i) p.count[experts[i]] = count[i];
    }
}

void improve_counts(Packing& p, Packing& trial, const double* w, double bound, PackScratch& s) {
    // A few count changes when the plan is >0.5% above the bound, or keeps an avoidable
    // duplicate (bounded: each try is a full repack of the layer).
    if (p.max_load() > bound * (1 + kCountSearchGap) || avoidable_duplicates(p, s) > 0) {
        search_counts(p, trial, w, bound, kCountSearchBudget, s);
    }
    const std::int64_t E = p.num_experts(), P = std::int64_t{p.num_bins} * p.size;
    if (E * E * E * E * P <= kSmallLayerWork) search_all_counts(p, trial, w, bound, s);
    if (avoidable_duplicates(p, s) > 0) remove_avoidable_duplicates(p, trial, w, bound, s);
}

}  // namespace moelb::planner
