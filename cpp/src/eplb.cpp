#include "moelb/eplb.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <numeric>
#include <queue>
#include <sstream>
#include <utility>

#include "enum_names.hpp"
#include "moelb/errors.hpp"
#include "moelb/parallel.hpp"

namespace moelb {
namespace {

// =============================================================================================
// DeepSeek's eplb.py, per layer, in float32 like the original.
// =============================================================================================

// Indices of w[0, n) by descending value, ties to the lower index (what a stable sort gives).
// Sorts one integer key per item: the float's bits (order-preserving for values >= 0; -0 is
// normalised to +0) complemented in the high half, the index in the low half. The keys are unique,
// so any sort gives the stable order.
void order_descending(const float* w, int n, std::vector<int>& order) {
    thread_local std::vector<std::uint64_t> keys;
    keys.resize(static_cast<std::size_t>(n));
    for (int i = 0; i < n; ++i) {
        std::uint32_t bits;
        const float v = w[i] + 0.0f;
        std::memcpy(&bits, &v, sizeof bits);
        keys[i] = (static_cast<std::uint64_t>(~bits) << 32) | static_cast<std::uint32_t>(i);
    }
    std::sort(keys.begin(), keys.end());
    order.resize(static_cast<std::size_t>(n));
    for (int i = 0; i < n; ++i) order[i] = static_cast<int>(keys[i] & 0xffffffffu);
}

// balanced_packing: n items into m packs of n / m items each (greedy by descending weight onto
// the lightest pack with room, ties to the lower pack). Pack sums accumulate in float32.
void balanced_packing(const float* w, int n, int m, int* pack, int* rank) {
    const int per_pack = n / m;
    if (per_pack == 1) {
        for (int i = 0; i < n; ++i) {
            pack[i] = i;
            rank[i] = 0;
        }
        return;
    }
    thread_local std::vector<int> order, count;
    order_descending(w, n, order);
    count.assign(static_cast<std::size_t>(m), 0);
    if (m <= 32) {
        // Few packs: a branch-free scan for the lightest (ties to the lower pack). A full pack
        // scans as +inf; should a pack with room also reach +inf (float32 overflow), the choice
        // is made again among the packs with room only.
        constexpr float kFull = std::numeric_limits<float>::infinity();
        thread_local std::vector<float> load, scan;
        load.assign(static_cast<std::size_t>(m), 0.0f);
        scan.assign(static_cast<std::size_t>(m), 0.0f);
        for (const int i : order) {
            int best = 0;
            float lightest = scan[0];
            for (int p = 1; p < m; ++p) {
                const bool lighter = scan[p] < lightest;
                lightest = lighter ? scan[p] : lightest;
                best = lighter ? p : best;
            }
            if (count[best] == per_pack) {
                best = -1;
                for (int p = 0; p < m; ++p) {
                    if (count[p] < per_pack && (best < 0 || load[p] < load[best])) best = p;
                }
            }
            pack[i] = best;
            rank[i] = count[best]++;
            load[best] += w[i];
            scan[best] = count[best] < per_pack ? load[best] : kFull;
        }
        return;
    }
    // Packs with room in a binary min-heap of (float32 load, pack): the lightest, ties to the
    // lower pack -- the same choice as eplb.py's scan.
    using Entry = std::pair<float, int>;
    thread_local std::vector<Entry> heap;
    heap.resize(static_cast<std::size_t>(m));
    for (int p = 0; p < m; ++p) heap[p] = {0.0f, p};  // already a heap
    const auto after = std::greater<>();
    for (const int i : order) {
        std::pop_heap(heap.begin(), heap.end(), after);
        const auto [load, best] = heap.back();
        heap.pop_back();
        pack[i] = best;
        rank[i] = count[best]++;
        if (count[best] < per_pack) {
            heap.emplace_back(load + w[i], best);
            std::push_heap(heap.begin(), heap.end(), after);
        }
    }
}

// The divisor method shared by DeepSeek's replication and moelb's counts: `extra` further replicas
// go one at a time to the item with the largest key(i, count) = weight(i) / count (ties to the
// lower i), never beyond `cap` replicas. count[0, n) starts at 1; each extra is reported through
// give(i) in order. Only a prefix of the items by (weight desc, index asc) can receive extras (an
// item gets its first extra only once every heavier item has one), so without a binding cap only
// the `extra` heaviest items enter the heap.
template <typename T, typename Weight, typename Give>
void divisor_method(int n, int extra, int cap, const Weight& weight, int* count, const Give& give) {
    if (extra <= 0) return;
    using Entry = std::pair<T, int>;
    auto less = [](const Entry& a, const Entry& b) {
        return a.first < b.first || (a.first == b.first && a.second > b.second);
    };
    thread_local std::vector<Entry> heap;
    heap.resize(static_cast<std::size_t>(n));
    for (int i = 0; i < n; ++i) {
        const T v = static_cast<T>(weight(i));
        heap[i] = {count[i] == 1 ? v : v / static_cast<T>(count[i]), i};
    }
    if (static_cast<Index>(cap) > extra && extra < n) {
        std::nth_element(heap.begin(), heap.begin() + extra, heap.end(),
                         [&](const Entry& a, const Entry& b) { return less(b, a); });
        heap.resize(static_cast<std::size_t>(extra));
    }
    std::make_heap(heap.begin(), heap.end(), less);
    for (int s = 0; s < extra; ++s) {
        while (count[heap.front().second] >= cap) {
            std::pop_heap(heap.begin(), heap.end(), less);
            heap.pop_back();
        }
        std::pop_heap(heap.begin(), heap.end(), less);
        const int i = heap.back().second;
        give(i);
        ++count[i];
        heap.back() = {static_cast<T>(weight(i)) / static_cast<T>(count[i]), i};
        std::push_heap(heap.begin(), heap.end(), less);
    }
}

// replicate_experts: slots 0..n-1 hold experts 0..n-1; each further slot goes to the expert with
// the largest w / count (float32, ties to the lower index).
void replicate_experts(const float* w, int n, int num_slots, int* phy2log, int* rank, int* count) {
    for (int i = 0; i < n; ++i) {
        phy2log[i] = i;
        rank[i] = 0;
        count[i] = 1;
    }
    int s = n;
    divisor_method<float>(
        n, num_slots - n, num_slots, [w](int i) { return w[i]; }, count,
        [&](int e) {
            phy2log[s] = e;
            rank[s] = count[e];
            ++s;
        });
}

// rebalance_experts_hierarchical for one layer: K groups, N nodes, G GPUs, R slots. The global
// policy is K = N = 1. Writes phy2log [R].
void deepseek_layer(const float* w, int E, int R, int K, int N, int G, std::int32_t* phy2log) {
    const int group_size = E / K, groups_per_node = K / N, S = R / G;
    const int experts_per_node = E / N, slots_per_node = R / N, gpus_per_node = G / N;
    std::vector<float> group_load(static_cast<std::size_t>(K));
    for (int g = 0; g < K; ++g) {
        double sum = 0.0;
        for (int j = 0; j < group_size; ++j) sum += w[g * group_size + j];
        group_load[g] = static_cast<float>(sum);
    }
    std::vector<int> group_pack(static_cast<std::size_t>(K)), group_rank(group_pack.size());
    balanced_packing(group_load.data(), K, N, group_pack.data(), group_rank.data());
    std::vector<int> mlog2log(static_cast<std::size_t>(E));
    for (int e = 0; e < E; ++e) {
        const int g = e / group_size;
        mlog2log[(group_pack[g] * groups_per_node + group_rank[g]) * group_size + e % group_size] =
            e;
    }
    std::vector<float> node_w(static_cast<std::size_t>(experts_per_node));
    std::vector<int> phy2mlog(static_cast<std::size_t>(slots_per_node));
    std::vector<int> phy_rank(phy2mlog.size()), mlog_count(node_w.size());
    std::vector<float> replica_w(phy2mlog.size());
    std::vector<int> pack(phy2mlog.size()), rank(phy2mlog.size());
    for (int n = 0; n < N; ++n) {
        for (int i = 0; i < experts_per_node; ++i) {
            node_w[i] = w[mlog2log[n * experts_per_node + i]];
        }
        replicate_experts(node_w.data(), experts_per_node, slots_per_node, phy2mlog.data(),
                          phy_rank.data(), mlog_count.data());
        for (int j = 0; j < slots_per_node; ++j) {
            replica_w[j] = node_w[phy2mlog[j]] / static_cast<float>(mlog_count[phy2mlog[j]]);
        }
        balanced_packing(replica_w.data(), slots_per_node, gpus_per_node, pack.data(), rank.data());
        for (int j = 0; j < slots_per_node; ++j) {
            const int slot = n * slots_per_node + pack[j] * S + rank[j];
            phy2log[slot] = mlog2log[n * experts_per_node + phy2mlog[j]];
        }
    }
}

// =============================================================================================
// moelb's planner.
// =============================================================================================

constexpr double kRelTol = 1e-12;
constexpr int kCountSearchBudget = 2;  // repacks per layer in search_counts

// Divisor-method replica counts for experts `experts` (loads w) over `slots` slots, each expert at
// most `cap` replicas (when slots allow): minimises the largest per-replica load. Ties go to the
// earlier expert in the list.
std::vector<int> divisor_counts(const double* w, const std::vector<int>& experts, int slots,
                                int cap) {
    const int n = static_cast<int>(experts.size());
    std::vector<int> count(static_cast<std::size_t>(n), 1);
    if (static_cast<Index>(cap) * n < slots) cap = (slots + n - 1) / n;  // cannot honour the cap
    divisor_method<double>(
        n, slots - n, cap, [&](int i) { return w[experts[i]]; }, count.data(), [](int) {});
    return count;
}

double max_replica_load(const double* w, const std::vector<int>& experts,
                        const std::vector<int>& count) {
    double m = 0.0;
    for (std::size_t i = 0; i < experts.size(); ++i) m = std::max(m, w[experts[i]] / count[i]);
    return m;
}

// Replicas packed into bins (GPUs) of `size` slots. Bins carry a domain (node); swaps stay inside
// a domain.
struct Packing {
    int size = 0;                   // slots per bin
    std::vector<double> item_load;  // per replica
    std::vector<int> item_expert;
    std::vector<int> bin_domain;
    std::vector<std::vector<int>> bins;  // item ids per bin
    std::vector<double> bin_load;

    int num_bins() const { return static_cast<int>(bins.size()); }

    bool holds(int b, int expert) const {
        for (const int i : bins[b]) {
            if (item_expert[i] == expert) return true;
        }
        return false;
    }

    void recompute_loads() {
        bin_load.assign(bins.size(), 0.0);
        for (int b = 0; b < num_bins(); ++b) {
            for (const int i : bins[b]) bin_load[b] += item_load[i];
        }
    }

    double max_load() const {
        return bin_load.empty() ? 0.0 : *std::max_element(bin_load.begin(), bin_load.end());
    }

    // Longest-processing-time first onto the lightest bin of the item's domain with room that
    // does not hold the expert yet (ties to the lower bin); duplicates only when unavoidable.
    // items_of_domain[d]: the items to place into domain d's bins.
    void lpt(const std::vector<std::vector<int>>& items_of_domain) {
        bins.assign(bin_domain.size(), {});
        bin_load.assign(bin_domain.size(), 0.0);
        for (std::size_t d = 0; d < items_of_domain.size(); ++d) {
            std::vector<int> order = items_of_domain[d];
            std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
                return item_load[a] > item_load[b] ||
                       (item_load[a] == item_load[b] && item_expert[a] < item_expert[b]);
            });
            using Entry = std::pair<double, int>;  // (load, bin): min-heap
            std::priority_queue<Entry, std::vector<Entry>, std::greater<>> heap;
            for (int b = 0; b < num_bins(); ++b) {
                if (bin_domain[b] == static_cast<int>(d)) heap.emplace(0.0, b);
            }
            std::vector<Entry> skipped;
            for (const int item : order) {
                skipped.clear();
                while (!heap.empty() && holds(heap.top().second, item_expert[item])) {
                    skipped.push_back(heap.top());
                    heap.pop();
                }
                Entry chosen;
                if (heap.empty()) {  // every bin with room holds this expert: duplicate
                    chosen = skipped.front();
                    skipped.erase(skipped.begin());
                } else {
                    chosen = heap.top();
                    heap.pop();
                }
                const int b = chosen.second;
                bins[b].push_back(item);
                bin_load[b] += item_load[item];
                if (static_cast<int>(bins[b].size()) < size) heap.emplace(bin_load[b], b);
                for (const Entry& e : skipped) heap.push(e);
            }
        }
    }

    // Swaps x in bin a with y in bin b when allowed by the no-duplicate rule.
    bool swap_allowed(int a, int x, int b, int y) const {
        const int ex = item_expert[x], ey = item_expert[y];
        if (ex == ey) return false;  // changes nothing
        for (const int i : bins[b]) {
            if (i != y && item_expert[i] == ex) return false;
        }
        for (const int i : bins[a]) {
            if (i != x && item_expert[i] == ey) return false;
        }
        return true;
    }

    void apply_swap(int a, int xi, int b, int yi) {
        const int x = bins[a][xi], y = bins[b][yi];
        bins[a][xi] = y;
        bins[b][yi] = x;
        const double d = item_load[x] - item_load[y];
        bin_load[a] -= d;
        bin_load[b] += d;
    }

    // Removes duplicate experts within a bin by swaps that keep both bins at or below `limit`.
    void repair_duplicates(double limit) {
        for (int a = 0; a < num_bins(); ++a) {
            for (std::size_t xi = 0; xi < bins[a].size(); ++xi) {
                const int x = bins[a][xi];
                bool duplicate = false;
                for (std::size_t k = 0; k < xi; ++k) {
                    if (item_expert[bins[a][k]] == item_expert[x]) duplicate = true;
                }
                if (!duplicate) continue;
                int best_b = -1, best_yi = -1;
                double best = std::numeric_limits<double>::infinity();
                for (int b = 0; b < num_bins(); ++b) {
                    if (b == a || bin_domain[b] != bin_domain[a] || holds(b, item_expert[x])) {
                        continue;
                    }
                    for (std::size_t yi = 0; yi < bins[b].size(); ++yi) {
                        const int y = bins[b][yi];
                        if (holds(a, item_expert[y])) continue;
                        const double d = item_load[x] - item_load[y];
                        const double m = std::max(bin_load[a] - d, bin_load[b] + d);
                        if (m <= limit * (1 + kRelTol) && m < best) {
                            best = m;
                            best_b = b;
                            best_yi = static_cast<int>(yi);
                        }
                    }
                }
                if (best_b >= 0) apply_swap(a, static_cast<int>(xi), best_b, best_yi);
            }
        }
    }

    // Local search: while the heaviest bin can trade a replica for a lighter one with a bin of
    // its domain so that both end below its load, do the best such swap. Stops at `target` (a
    // lower bound: nothing below it is reachable).
    void swap_search(double target = 0.0) {
        const int B = num_bins();
        std::vector<int> partners;
        const int max_iterations = 20 * B + 100;
        constexpr int kFirstPartners = 16;  // lightest bins tried first; all bins if none helps
        for (int it = 0; it < max_iterations; ++it) {
            int a = 0;
            for (int b = 1; b < B; ++b) {
                if (bin_load[b] > bin_load[a]) a = b;
            }
            const double limit = bin_load[a];
            if (limit <= target * (1 + 1e-9)) return;
            partners.clear();
            for (int b = 0; b < B; ++b) {
                if (b != a && bin_domain[b] == bin_domain[a] && bin_load[b] < limit) {
                    partners.push_back(b);
                }
            }
            const auto lighter = [&](int x, int y) {
                return bin_load[x] < bin_load[y] || (bin_load[x] == bin_load[y] && x < y);
            };
            bool swapped = false;
            for (int round = 0; round < 2 && !swapped; ++round) {
                std::size_t first = 0, last = partners.size();
                if (round == 0 && static_cast<int>(partners.size()) > kFirstPartners) {
                    std::nth_element(partners.begin(), partners.begin() + kFirstPartners,
                                     partners.end(), lighter);
                    std::sort(partners.begin(), partners.begin() + kFirstPartners);
                    last = kFirstPartners;
                } else if (round == 1) {
                    if (static_cast<int>(partners.size()) <= kFirstPartners) break;
                    first = kFirstPartners;
                }
                swapped = best_swap(a, limit, partners, first, last);
            }
            if (!swapped) return;
        }
    }

    // The best swap between bin a (load limit) and partners[first, last); applies it and returns
    // true if one lowers max(load a, load b) below limit.
    bool best_swap(int a, double limit, const std::vector<int>& partners, std::size_t first,
                   std::size_t last) {
        double best = limit * (1 - 1e-12);
        int best_b = -1, best_xi = -1, best_yi = -1;
        for (std::size_t k = first; k < last; ++k) {
            const int b = partners[k];
            const double gap = limit - bin_load[b];
            for (std::size_t xi = 0; xi < bins[a].size(); ++xi) {
                const int x = bins[a][xi];
                for (std::size_t yi = 0; yi < bins[b].size(); ++yi) {
                    const int y = bins[b][yi];
                    const double d = item_load[x] - item_load[y];
                    if (d <= 0 || d >= gap) continue;
                    const double m = std::max(limit - d, bin_load[b] + d);
                    if (m < best && swap_allowed(a, x, b, y)) {
                        best = m;
                        best_b = b;
                        best_xi = static_cast<int>(xi);
                        best_yi = static_cast<int>(yi);
                    }
                }
            }
        }
        if (best_b < 0) return false;
        apply_swap(a, best_xi, best_b, best_yi);
        return true;
    }
};

// Packs replicas with given counts: domain d's experts (domain_experts[d]) with counts
// domain_counts[d] into its bins_per_domain bins of S slots; LPT, duplicate repair, swap search.
Packing pack_counts(const double* w, const std::vector<std::vector<int>>& domain_experts,
                    const std::vector<std::vector<int>>& domain_counts, int bins_per_domain, int S,
                    double target) {
    Packing p;
    p.size = S;
    const int D = static_cast<int>(domain_experts.size());
    std::vector<std::vector<int>> items_of_domain(static_cast<std::size_t>(D));
    for (int d = 0; d < D; ++d) {
        const auto& experts = domain_experts[d];
        const auto& count = domain_counts[d];
        for (std::size_t i = 0; i < experts.size(); ++i) {
            for (int c = 0; c < count[i]; ++c) {
                items_of_domain[d].push_back(static_cast<int>(p.item_load.size()));
                p.item_load.push_back(w[experts[i]] / count[i]);
                p.item_expert.push_back(experts[i]);
            }
        }
        for (int b = 0; b < bins_per_domain; ++b) p.bin_domain.push_back(d);
    }
    p.lpt(items_of_domain);
    p.repair_duplicates(p.max_load());
    p.swap_search(target);
    return p;
}

// Builds the packing of one layer for a given expert -> domain split: counts by the divisor
// method per domain (capped at the domain's bins), then pack_counts.
Packing pack_domains(const double* w, const std::vector<std::vector<int>>& domain_experts,
                     int slots_per_domain, int bins_per_domain, int S, double target) {
    std::vector<std::vector<int>> counts;
    for (const auto& experts : domain_experts) {
        counts.push_back(divisor_counts(w, experts, slots_per_domain, bins_per_domain));
    }
    return pack_counts(w, domain_experts, counts, bins_per_domain, S, target);
}

// Experts of `p` with two replicas on one bin although they have no more replicas than their
// domain has bins (so the duplicate could be avoided), in ascending id order.
std::vector<int> avoidable_duplicates(const Packing& p, int bins_per_domain) {
    std::map<int, int> replicas;
    for (const int e : p.item_expert) ++replicas[e];
    std::vector<int> out;
    for (int b = 0; b < p.num_bins(); ++b) {
        for (std::size_t i = 0; i < p.bins[b].size(); ++i) {
            for (std::size_t j = 0; j < i; ++j) {
                const int e = p.item_expert[p.bins[b][i]];
                if (e == p.item_expert[p.bins[b][j]] && replicas[e] <= bins_per_domain) {
                    out.push_back(e);
                }
            }
        }
    }
    std::sort(out.begin(), out.end());
    out.erase(std::unique(out.begin(), out.end()), out.end());
    return out;
}

// Removes avoidable duplicates that swaps could not: moves one replica of the duplicated expert
// to another expert of its domain (the best few by the divisor rule) and repacks, keeping a
// result only if it has fewer avoidable duplicates and no higher maximum load.
void remove_avoidable_duplicates(Packing& p, const double* w, int bins_per_domain, double target) {
    constexpr int kCandidates = 8;
    for (int attempt = 0; attempt < 4; ++attempt) {
        const std::vector<int> dups = avoidable_duplicates(p, bins_per_domain);
        if (dups.empty()) return;
        // Current domains and counts.
        const int D = p.num_bins() / bins_per_domain;
        std::vector<std::map<int, int>> counts(static_cast<std::size_t>(D));
        for (int b = 0; b < p.num_bins(); ++b) {
            for (const int i : p.bins[b]) ++counts[p.bin_domain[b]][p.item_expert[i]];
        }
        const int e = dups.front();
        int d = 0;
        while (!counts[d].count(e)) ++d;
        std::vector<std::pair<double, int>> donors_to;  // (-w/(c+1), f)
        for (const auto& [f, c] : counts[d]) {
            if (f != e && c < bins_per_domain) donors_to.emplace_back(-w[f] / (c + 1), f);
        }
        std::sort(donors_to.begin(), donors_to.end());
        if (static_cast<int>(donors_to.size()) > kCandidates) donors_to.resize(kCandidates);
        bool improved = false;
        for (const auto& [key, f] : donors_to) {
            std::vector<std::vector<int>> experts(static_cast<std::size_t>(D));
            std::vector<std::vector<int>> cnt(static_cast<std::size_t>(D));
            for (int dd = 0; dd < D; ++dd) {
                for (const auto& [x, c] : counts[dd]) {
                    const int changed = c - (dd == d && x == e) + (dd == d && x == f);
                    experts[dd].push_back(x);
                    cnt[dd].push_back(changed);
                }
            }
            Packing q = pack_counts(w, experts, cnt, bins_per_domain, p.size, target);
            if (q.max_load() <= p.max_load() * (1 + 1e-12) &&
                avoidable_duplicates(q, bins_per_domain).size() < dups.size()) {
                p = std::move(q);
                improved = true;
                break;
            }
        }
        if (!improved) return;
    }
}

// Replica-count search: the divisor method minimises the largest per-replica load, not the
// largest GPU load. Gives one more replica to an expert of the heaviest GPU, taken from the
// expert that loses least (smallest load per replica after losing one), repacks, and keeps the
// result when the maximum drops without adding avoidable duplicates, or stays and avoidable
// duplicates drop. At most `budget` repacks.
void search_counts(Packing& p, const double* w, int bins_per_domain, double target, int budget) {
    const int D = p.num_bins() / bins_per_domain;
    for (int tries = 0; tries < budget;) {
        if (p.max_load() <= target * (1 + 1e-9)) return;
        int a = 0;
        for (int b = 1; b < p.num_bins(); ++b) {
            if (p.bin_load[b] > p.bin_load[a]) a = b;
        }
        const int d = p.bin_domain[a];
        std::map<int, int> counts;
        std::vector<std::map<int, int>> all(static_cast<std::size_t>(D));
        for (int b = 0; b < p.num_bins(); ++b) {
            for (const int i : p.bins[b]) ++all[p.bin_domain[b]][p.item_expert[i]];
        }
        counts = all[d];
        // Receivers: the experts on the heaviest GPU, heaviest replica first.
        std::vector<int> receivers;
        std::vector<int> items = p.bins[a];
        std::sort(items.begin(), items.end(), [&](int x, int y) {
            return p.item_load[x] > p.item_load[y] ||
                   (p.item_load[x] == p.item_load[y] && p.item_expert[x] < p.item_expert[y]);
        });
        for (const int i : items) {
            const int e = p.item_expert[i];
            if (counts[e] < bins_per_domain &&
                std::find(receivers.begin(), receivers.end(), e) == receivers.end()) {
                receivers.push_back(e);
            }
        }
        bool improved = false;
        const std::size_t dups = avoidable_duplicates(p, bins_per_domain).size();
        for (const int e : receivers) {
            if (tries >= budget) break;
            int donor = -1;
            double donor_key = std::numeric_limits<double>::infinity();
            for (const auto& [f, c] : counts) {
                if (f == e || c < 2) continue;
                const double key = w[f] / (c - 1);
                if (key < donor_key) {
                    donor_key = key;
                    donor = f;
                }
            }
            if (donor < 0) break;
            std::vector<std::vector<int>> experts(static_cast<std::size_t>(D));
            std::vector<std::vector<int>> cnt(static_cast<std::size_t>(D));
            for (int dd = 0; dd < D; ++dd) {
                for (const auto& [x, c] : all[dd]) {
                    experts[dd].push_back(x);
                    cnt[dd].push_back(c + (dd == d && x == e) - (dd == d && x == donor));
                }
            }
            ++tries;
            Packing q = pack_counts(w, experts, cnt, bins_per_domain, p.size, target);
            const double qm = q.max_load(), pm = p.max_load();
            const std::size_t qdups = avoidable_duplicates(q, bins_per_domain).size();
            if ((qm < pm * (1 - 1e-12) && qdups <= dups) ||
                (qm <= pm * (1 + 1e-12) && qdups < dups)) {
                p = std::move(q);
                improved = true;
                break;
            }
        }
        if (!improved) return;
    }
}

// The packing of an existing layer placement (slot -> expert), with equal-split loads.
Packing packing_of(const double* w, const std::int32_t* phy2log, int E, int R, int G, int N) {
    Packing p;
    const int S = R / G;
    p.size = S;
    std::vector<int> count(static_cast<std::size_t>(E), 0);
    for (int s = 0; s < R; ++s) ++count[phy2log[s]];
    p.bins.assign(static_cast<std::size_t>(G), {});
    for (int g = 0; g < G; ++g) p.bin_domain.push_back(N > 0 ? g / (G / N) : 0);
    for (int s = 0; s < R; ++s) {
        p.bins[s / S].push_back(s);
        p.item_expert.push_back(phy2log[s]);
        p.item_load.push_back(w[phy2log[s]] / count[phy2log[s]]);
    }
    p.recompute_loads();
    return p;
}

// Node-locality estimate of a node's best max GPU load: max(load / GPUs, best per-replica max).
double node_cost(const double* w, const std::vector<int>& experts, int slots, int gpus) {
    if (experts.empty()) return 0.0;
    double total = 0.0;
    for (const int e : experts) total += w[e];
    const std::vector<int> count = divisor_counts(w, experts, slots, gpus);
    return std::max(total / gpus, max_replica_load(w, experts, count));
}

// Groups -> nodes for node locality: DeepSeek's balanced packing of group loads when K % N == 0
// (else LPT under capacity), then moves and swaps of groups between nodes that lower the largest
// node cost. Every node must end with at least one group and at most slots_per_node experts.
std::vector<int> assign_groups(const double* w, int E, int K, int N, int slots_per_node,
                               int gpus_per_node) {
    const int gs = E / K;
    const int max_groups = slots_per_node / gs;
    std::vector<double> group_load(static_cast<std::size_t>(K), 0.0);
    for (int g = 0; g < K; ++g) {
        for (int j = 0; j < gs; ++j) group_load[g] += w[g * gs + j];
    }
    std::vector<int> node(static_cast<std::size_t>(K));
    std::vector<int> order(static_cast<std::size_t>(K));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int a, int b) { return group_load[a] > group_load[b]; });
    // Every node gets one group first (heaviest groups spread), then LPT with capacity.
    std::vector<double> load(static_cast<std::size_t>(N), 0.0);
    std::vector<int> count(static_cast<std::size_t>(N), 0);
    const int per_node = (K % N == 0 && K / N <= max_groups) ? K / N : max_groups;
    for (std::size_t i = 0; i < order.size(); ++i) {
        const int g = order[i];
        int best = -1;
        for (int n = 0; n < N; ++n) {
            const bool must_fill = static_cast<int>(i) < N;
            if (must_fill && count[n] > 0) continue;
            if (count[n] >= per_node) continue;
            if (best < 0 || load[n] < load[best]) best = n;
        }
        node[g] = best;
        ++count[best];
        load[best] += group_load[g];
    }
    auto experts_of = [&](int n, const std::vector<int>& assign) {
        std::vector<int> ex;
        for (int g = 0; g < K; ++g) {
            if (assign[g] == n) {
                for (int j = 0; j < gs; ++j) ex.push_back(g * gs + j);
            }
        }
        return ex;
    };
    std::vector<double> cost(static_cast<std::size_t>(N));
    for (int n = 0; n < N; ++n) {
        cost[n] = node_cost(w, experts_of(n, node), slots_per_node, gpus_per_node);
    }
    for (int it = 0; it < 4 * K * N + 16; ++it) {
        const int a = static_cast<int>(std::max_element(cost.begin(), cost.end()) - cost.begin());
        double best = cost[a] * (1 - 1e-9);
        std::vector<int> best_assign;
        std::pair<double, double> best_costs;
        int best_b = -1;
        for (int g = 0; g < K; ++g) {
            if (node[g] != a) continue;
            for (int b = 0; b < N; ++b) {
                if (b == a) continue;
                // Keeps `trial` if it lowers the larger of the two nodes' costs the most so far.
                const auto consider = [&](const std::vector<int>& trial) {
                    const double ca =
                        node_cost(w, experts_of(a, trial), slots_per_node, gpus_per_node);
                    const double cb =
                        node_cost(w, experts_of(b, trial), slots_per_node, gpus_per_node);
                    if (std::max(ca, cb) < best) {
                        best = std::max(ca, cb);
                        best_assign = trial;
                        best_costs = {ca, cb};
                        best_b = b;
                    }
                };
                if (count[a] > 1 && count[b] < max_groups) {  // move g to b
                    std::vector<int> trial = node;
                    trial[g] = b;
                    consider(trial);
                }
                for (int h = 0; h < K; ++h) {  // swap g with a group h of b
                    if (node[h] != b) continue;
                    std::vector<int> trial = node;
                    trial[g] = b;
                    trial[h] = a;
                    consider(trial);
                }
            }
        }
        if (best_b < 0) break;
        node = best_assign;
        std::fill(count.begin(), count.end(), 0);
        for (int g = 0; g < K; ++g) ++count[node[g]];
        cost[a] = best_costs.first;
        cost[best_b] = best_costs.second;
    }
    return node;
}

// Writes a packing's bins as slots: bin b -> GPU b, items in bin order.
void write_slots(const Packing& p, std::int32_t* phy2log) {
    for (int b = 0; b < p.num_bins(); ++b) {
        for (std::size_t k = 0; k < p.bins[b].size(); ++k) {
            phy2log[static_cast<Index>(b) * p.size + static_cast<Index>(k)] =
                p.item_expert[p.bins[b][k]];
        }
    }
}

// Reorders a layer's GPUs (and nodes) and the slots inside each GPU to match the previous
// placement as well as possible: same expert sets per GPU, only relabelled.
void match_previous(std::int32_t* phy2log, const std::int32_t* old, int R, int G, int N,
                    bool node_locality) {
    const int S = R / G;
    const int gpn = G / N;
    auto overlap = [&](const std::int32_t* a, const std::int32_t* b, int n) {
        // Multiset intersection size of a[0, n) and b[0, n) (n is small).
        std::vector<int> x(a, a + n), y(b, b + n);
        std::sort(x.begin(), x.end());
        std::sort(y.begin(), y.end());
        int i = 0, j = 0, common = 0;
        while (i < n && j < n) {
            if (x[i] == y[j]) {
                ++common;
                ++i;
                ++j;
            } else if (x[i] < y[j]) {
                ++i;
            } else {
                ++j;
            }
        }
        return common;
    };
    // Greedy maximum-overlap matching of `count` new blocks to old blocks of `width` slots
    // (blocks are contiguous runs of slots starting at new_first / old_first).
    auto match = [&](const std::int32_t* cur, int new_first, int old_first, int count, int width) {
        std::vector<std::tuple<int, int, int>> pairs;  // (-overlap, new, old)
        for (int a = 0; a < count; ++a) {
            for (int b = 0; b < count; ++b) {
                const int o = overlap(cur + static_cast<Index>(new_first + a) * width,
                                      old + static_cast<Index>(old_first + b) * width, width);
                if (o > 0) pairs.emplace_back(-o, a, b);
            }
        }
        std::sort(pairs.begin(), pairs.end());
        std::vector<int> target(static_cast<std::size_t>(count), -1);
        std::vector<bool> used(static_cast<std::size_t>(count), false);
        for (const auto& [o, a, b] : pairs) {
            if (target[a] < 0 && !used[b]) {
                target[a] = b;
                used[b] = true;
            }
        }
        int next = 0;
        for (int a = 0; a < count; ++a) {
            if (target[a] >= 0) continue;
            while (used[next]) ++next;
            target[a] = next;
            used[next] = true;
        }
        return target;
    };
    std::vector<std::int32_t> cur(phy2log, phy2log + R);
    std::vector<std::int32_t> out(static_cast<std::size_t>(R));
    if (node_locality && N > 1) {
        const std::vector<int> node_target = match(cur.data(), 0, 0, N, gpn * S);
        for (int n = 0; n < N; ++n) {
            std::copy(cur.begin() + static_cast<Index>(n) * gpn * S,
                      cur.begin() + static_cast<Index>(n + 1) * gpn * S,
                      out.begin() + static_cast<Index>(node_target[n]) * gpn * S);
        }
        cur = out;
        for (int n = 0; n < N; ++n) {
            const std::vector<int> gpu_target = match(cur.data(), n * gpn, n * gpn, gpn, S);
            for (int g = 0; g < gpn; ++g) {
                std::copy(cur.begin() + static_cast<Index>(n * gpn + g) * S,
                          cur.begin() + static_cast<Index>(n * gpn + g + 1) * S,
                          out.begin() + static_cast<Index>(n * gpn + gpu_target[g]) * S);
            }
        }
    } else {
        const std::vector<int> gpu_target = match(cur.data(), 0, 0, G, S);
        for (int g = 0; g < G; ++g) {
            std::copy(cur.begin() + static_cast<Index>(g) * S,
                      cur.begin() + static_cast<Index>(g + 1) * S,
                      out.begin() + static_cast<Index>(gpu_target[g]) * S);
        }
    }
    // Inside each GPU: experts already in a slot stay there; the rest fill the free slots.
    for (int g = 0; g < G; ++g) {
        std::int32_t* dst = phy2log + static_cast<Index>(g) * S;
        const std::int32_t* src = out.data() + static_cast<Index>(g) * S;
        const std::int32_t* prev = old + static_cast<Index>(g) * S;
        std::vector<std::int32_t> pending(src, src + S);
        std::vector<bool> filled(static_cast<std::size_t>(S), false);
        for (int s = 0; s < S; ++s) {
            const auto it = std::find(pending.begin(), pending.end(), prev[s]);
            if (it != pending.end()) {
                dst[s] = prev[s];
                filled[s] = true;
                pending.erase(it);
            }
        }
        std::size_t k = 0;
        for (int s = 0; s < S; ++s) {
            if (!filled[s]) dst[s] = pending[k++];
        }
    }
}

double layer_max_gpu_load(const double* w, const std::int32_t* phy2log, int E, int R, int G) {
    std::vector<int> count(static_cast<std::size_t>(E), 0);
    for (int s = 0; s < R; ++s) ++count[phy2log[s]];
    const int S = R / G;
    double m = 0.0;
    for (int g = 0; g < G; ++g) {
        double load = 0.0;
        for (int s = g * S; s < (g + 1) * S; ++s) load += w[phy2log[s]] / count[phy2log[s]];
        m = std::max(m, load);
    }
    return m;
}

}  // namespace

constexpr detail::EnumNames<EplbAlgorithm, 4> kEplbAlgorithmNames{{
    {"moelb", EplbAlgorithm::kMoelb},
    {"deepseek", EplbAlgorithm::kDeepSeek},
    {"deepseek_hierarchical", EplbAlgorithm::kDeepSeekHierarchical},
    {"deepseek_global", EplbAlgorithm::kDeepSeekGlobal},
}};

EplbAlgorithm parse_eplb_algorithm(std::string_view name, std::string_view param) {
    return detail::parse_enum(kEplbAlgorithmNames, name, param, "an EPLB algorithm");
}

std::string_view to_string(EplbAlgorithm value) {
    return detail::enum_name(kEplbAlgorithmNames, value);
}

constexpr detail::EnumNames<Locality, 3> kLocalityNames{{
    {"auto", Locality::kAuto},
    {"node", Locality::kNode},
    {"none", Locality::kNone},
}};

Locality parse_locality(std::string_view name, std::string_view param) {
    return detail::parse_enum(kLocalityNames, name, param, "a locality");
}

std::string_view to_string(Locality value) { return detail::enum_name(kLocalityNames, value); }

RowMatrix<double> gpu_loads(ConstMatrixMap<double> load, const ExpertLocation& location) {
    MOELB_CHECK_ARG(
        load.rows() == location.num_layers() && load.cols() == location.num_logical_experts(),
        "load has shape [" << load.rows() << ", " << load.cols() << "] but the location has "
                           << location.num_layers() << " layers and "
                           << location.num_logical_experts() << " logical experts");
    const int L = location.num_layers(), G = location.ep_size();
    const int R = location.num_physical_experts(), S = R / G;
    RowMatrix<double> out = RowMatrix<double>::Zero(L, G);
    for (int l = 0; l < L; ++l) {
        for (int p = 0; p < R; ++p) {
            const int e = location.physical_to_logical()(l, p);
            out(l, p / S) += load(l, e) / location.logical_count()(l, e);
        }
    }
    return out;
}

PlanStats evaluate_placement(ConstMatrixMap<double> load, const ExpertLocation& location,
                             const ExpertLocation* previous) {
    MOELB_CHECK_ARG(
        load.rows() == location.num_layers() && load.cols() == location.num_logical_experts(),
        "load has shape [" << load.rows() << ", " << load.cols() << "] but the location has "
                           << location.num_layers() << " layers and "
                           << location.num_logical_experts() << " logical experts");
    const int L = location.num_layers(), G = location.ep_size();
    const int E = location.num_logical_experts(), R = location.num_physical_experts();
    if (previous) {
        MOELB_CHECK_ARG(previous->num_layers() == L && previous->num_physical_experts() == R &&
                            previous->num_logical_experts() == E,
                        "previous has a different shape (layers, logical or physical experts)");
    }
    PlanStats stats;
    stats.layers.resize(static_cast<std::size_t>(L));
    parallel_for(L, 1, [&](Index begin, Index end) {
        std::vector<int> experts(static_cast<std::size_t>(E));
        std::iota(experts.begin(), experts.end(), 0);
        for (Index l = begin; l < end; ++l) {
            LayerPlanStats& s = stats.layers[static_cast<std::size_t>(l)];
            const double* w = load.row(l).data();
            double total = 0;
            for (int e = 0; e < E; ++e) total += w[e];
            s.max_gpu_load =
                layer_max_gpu_load(w, location.physical_to_logical().row(l).data(), E, R, G);
            s.mean_gpu_load = total / G;
            s.balancedness = s.max_gpu_load > 0 ? s.mean_gpu_load / s.max_gpu_load : 1.0;
            const std::vector<int> best = divisor_counts(w, experts, R, R);
            s.lower_bound = std::max(total / G, max_replica_load(w, experts, best));
            s.gap = s.lower_bound > 0 ? s.max_gpu_load / s.lower_bound - 1 : 0.0;
            if (previous) {
                for (int p = 0; p < R; ++p) {
                    s.moved_experts += previous->physical_to_logical()(l, p) !=
                                       location.physical_to_logical()(l, p);
                }
            }
        }
    });
    double sum_mean = 0, sum_max = 0;
    for (const LayerPlanStats& s : stats.layers) {
        stats.balancedness += s.balancedness / L;
        stats.mean_gap += s.gap / L;
        stats.max_gap = std::max(stats.max_gap, s.gap);
        stats.moved_experts += s.moved_experts;
        sum_mean += s.mean_gpu_load;
        sum_max += s.max_gpu_load;
    }
    stats.load_weighted_balancedness = sum_max > 0 ? sum_mean / sum_max : 1.0;
    return stats;
}

Plan rebalance(ConstMatrixMap<double> load, const RebalanceOptions& o) {
    const auto started = std::chrono::steady_clock::now();
    const Index L = load.rows();
    const int E = static_cast<int>(load.cols());
    const int R = o.num_physical_experts, K = o.num_groups, N = o.num_nodes, G = o.num_gpus;
    MOELB_CHECK_ARG(L >= 1 && E >= 1,
                    "load must have shape [num_layers, num_experts] with both "
                    "positive, got ["
                        << L << ", " << E << "]");
    for (Index l = 0; l < L; ++l) {
        for (int e = 0; e < E; ++e) {
            const double v = load(l, e);
            MOELB_CHECK_ARG(
                std::isfinite(v) && v >= 0,
                "load[" << l << ", " << e << "] = " << v << " is not a finite non-negative load");
        }
    }
    MOELB_CHECK_ARG(G >= 1, "num_gpus must be positive, got " << G);
    MOELB_CHECK_ARG(N >= 1, "num_nodes must be positive, got " << N);
    MOELB_CHECK_ARG(K >= 0, "num_groups must be non-negative, got " << K);
    MOELB_CHECK_ARG(
        R >= E, "num_physical_experts=" << R << " is smaller than the " << E << " logical experts");
    MOELB_CHECK_ARG(R % G == 0,
                    "num_physical_experts=" << R << " is not divisible by num_gpus=" << G);
    if (o.previous) {
        MOELB_CHECK_ARG(o.previous->num_layers() == L && o.previous->num_logical_experts() == E &&
                            o.previous->num_physical_experts() == R && o.previous->ep_size() == G,
                        "previous has num_layers="
                            << o.previous->num_layers()
                            << ", num_logical_experts=" << o.previous->num_logical_experts()
                            << ", num_physical_experts=" << o.previous->num_physical_experts()
                            << ", ep_size=" << o.previous->ep_size() << " but the plan has " << L
                            << ", " << E << ", " << R << ", " << G);
    }
    MOELB_CHECK_ARG(o.move_cost >= 0 && std::isfinite(o.move_cost),
                    "move_cost must be finite and non-negative, got " << o.move_cost);
    MOELB_CHECK_ARG(o.max_moves >= -1, "max_moves must be >= 0 (or None), got " << o.max_moves);

    std::ostringstream notes;
    RowMatrix<std::int32_t> phy2log(L, R);
    std::string name;
    int location_nodes = N;
    const bool deepseek = o.algorithm != EplbAlgorithm::kMoelb;
    if (deepseek) {
        bool hierarchical = o.algorithm == EplbAlgorithm::kDeepSeekHierarchical ||
                            (o.algorithm == EplbAlgorithm::kDeepSeek && K > 0 && K % N == 0);
        if (hierarchical) {
            MOELB_CHECK_ARG(G % N == 0, "num_gpus=" << G << " is not divisible by num_nodes=" << N
                                                    << " (the hierarchical policy requires it)");
            MOELB_CHECK_ARG(K > 0, "the hierarchical policy needs num_groups");
            MOELB_CHECK_ARG(E % K == 0, "num_experts=" << E << " is not divisible by num_groups="
                                                       << K << " (DeepSeek's EPLB requires it)");
            MOELB_CHECK_ARG(K % N == 0, "num_groups=" << K << " is not divisible by num_nodes=" << N
                                                      << " (the hierarchical policy "
                                                         "requires it)");
        }
        name = hierarchical ? "deepseek_hierarchical" : "deepseek_global";
        if (G % N != 0) {
            notes << "num_gpus=" << G << " is not divisible by num_nodes=" << N
                  << ": the location has num_nodes=1. ";
            location_nodes = 1;
        }
        std::vector<float> w32(static_cast<std::size_t>(L) * E);
        for (Index l = 0; l < L; ++l) {
            for (int e = 0; e < E; ++e) w32[l * E + e] = static_cast<float>(load(l, e));
        }
        parallel_for(L, 1, [&](Index begin, Index end) {
            for (Index l = begin; l < end; ++l) {
                deepseek_layer(w32.data() + l * E, E, R, hierarchical ? K : 1, hierarchical ? N : 1,
                               G, phy2log.row(l).data());
            }
        });
    } else {
        Locality locality = o.locality;
        if (locality == Locality::kAuto) {
            locality = (K > 0 && K % N == 0) ? Locality::kNode : Locality::kNone;
        }
        if (G % N != 0) {
            notes << "num_gpus=" << G << " is not divisible by num_nodes=" << N
                  << ": planned without node locality, location has num_nodes=1. ";
            locality = Locality::kNone;
            location_nodes = 1;
        }
        if (locality == Locality::kNode) {
            const int gs = K > 0 && E % K == 0 ? E / K : 0;
            const char* why = nullptr;
            if (K <= 0)
                why = "there are no expert groups";
            else if (E % K != 0)
                why = "num_experts is not divisible by num_groups";
            else if (K < N)
                why = "there are fewer groups than nodes";
            else if (gs > R / N)
                why = "a group has more experts than a node has slots";
            else if (static_cast<Index>(R / N / gs) * N < K) {
                why = "the groups do not fit the nodes' slots";
            }
            if (why) {
                notes << "node locality impossible (" << why << "): planned without it. ";
                locality = Locality::kNone;
            }
        }
        const bool node_locality = locality == Locality::kNode && N > 1;
        name =
            std::string("moelb(locality=") + (locality == Locality::kNode ? "node" : "none") + ")";
        // DeepSeek's policies whose placements satisfy this locality: (groups, nodes) pairs.
        std::vector<std::pair<int, int>> deepseek_variants;
        const bool hierarchical_valid = K > 0 && E % K == 0 && K % N == 0 && G % N == 0;
        if (node_locality) {
            if (hierarchical_valid) deepseek_variants.emplace_back(K, N);
        } else {
            deepseek_variants.emplace_back(1, 1);
            // Node locality on one node runs unconstrained, but must still not lose to
            // DeepSeek's hierarchical policy (which breaks ties differently from the global one).
            if (hierarchical_valid && locality == Locality::kNode && K > 1) {
                deepseek_variants.emplace_back(K, N);
            }
        }
        std::vector<int> kept_deepseek(static_cast<std::size_t>(L), 0);
        parallel_for(L, 1, [&](Index begin, Index end) {
            std::vector<float> w32_local(static_cast<std::size_t>(E));
            std::vector<std::int32_t> ds(static_cast<std::size_t>(R));
            for (Index l = begin; l < end; ++l) {
                const double* w = load.row(l).data();
                const int domains = node_locality ? N : 1;
                const int gpus_per_domain = G / domains;
                const int slots_per_domain = R / domains;
                std::vector<std::vector<int>> domain_experts(static_cast<std::size_t>(domains));
                if (node_locality) {
                    const std::vector<int> node =
                        assign_groups(w, E, K, N, slots_per_domain, gpus_per_domain);
                    const int gs = E / K;
                    for (int e = 0; e < E; ++e) domain_experts[node[e / gs]].push_back(e);
                } else {
                    for (int e = 0; e < E; ++e) domain_experts[0].push_back(e);
                }
                // The flat lower bound: no placement (under any locality) goes below it.
                double total = 0.0;
                for (int e = 0; e < E; ++e) total += w[e];
                std::vector<int> all(static_cast<std::size_t>(E));
                std::iota(all.begin(), all.end(), 0);
                const double bound =
                    std::max(total / G, max_replica_load(w, all, divisor_counts(w, all, R, R)));
                Packing ours = pack_domains(w, domain_experts, slots_per_domain, gpus_per_domain,
                                            R / G, bound);
                // DeepSeek under the same locality, improved by the same local search: keep
                // whichever is lower (ours on ties), so we are never worse than DeepSeek. Only
                // worth it when DeepSeek's own packing beats ours before its improvement.
                for (const auto& [groups, nodes] : deepseek_variants) {
                    if (ours.max_load() <= bound * (1 + 1e-9)) break;
                    for (int e = 0; e < E; ++e) w32_local[e] = static_cast<float>(w[e]);
                    deepseek_layer(w32_local.data(), E, R, groups, nodes, G, ds.data());
                    Packing theirs = packing_of(w, ds.data(), E, R, G, node_locality ? N : 1);
                    if (theirs.max_load() < ours.max_load() * (1 - 1e-12)) {
                        theirs.repair_duplicates(theirs.max_load());
                        theirs.swap_search(bound);
                        if (theirs.max_load() < ours.max_load() * (1 - 1e-12)) {
                            ours = std::move(theirs);
                            kept_deepseek[l] = 1;
                        }
                    }
                }
                // A few count changes when the plan is >0.5% above the bound, or keeps an avoidable
                // duplicate (bounded: each try is a full repack of the layer).
                if (ours.max_load() > bound * (1 + 5e-3) ||
                    !avoidable_duplicates(ours, gpus_per_domain).empty()) {
                    search_counts(ours, w, gpus_per_domain, bound, kCountSearchBudget);
                }
                if (!avoidable_duplicates(ours, gpus_per_domain).empty()) {
                    remove_avoidable_duplicates(ours, w, gpus_per_domain, bound);
                }
                write_slots(ours, phy2log.row(l).data());
                if (o.previous) {
                    match_previous(phy2log.row(l).data(),
                                   o.previous->physical_to_logical().row(l).data(), R, G,
                                   node_locality ? N : 1, node_locality);
                }
            }
        });
        const int from_deepseek = std::accumulate(kept_deepseek.begin(), kept_deepseek.end(), 0);
        if (from_deepseek > 0) {
            notes << from_deepseek << " layer(s) started from DeepSeek's packing. ";
        }
    }

    // Movement trade-off against the previous placement (moelb only).
    std::vector<bool> keep_previous(static_cast<std::size_t>(L), false);
    if (!deepseek && o.previous && (o.move_cost > 0 || o.max_moves >= 0)) {
        struct Candidate {
            Index layer;
            double gain;
            Index moves;
        };
        std::vector<Candidate> candidates;
        for (Index l = 0; l < L; ++l) {
            const double* w = load.row(l).data();
            const std::int32_t* old = o.previous->physical_to_logical().row(l).data();
            const double old_max = layer_max_gpu_load(w, old, E, R, G);
            const double new_max = layer_max_gpu_load(w, phy2log.row(l).data(), E, R, G);
            Index moves = 0;
            for (int p = 0; p < R; ++p) moves += phy2log(l, p) != old[p];
            const double gain = old_max > 0 ? (old_max - new_max) / old_max : 0.0;
            if (moves == 0) continue;
            if (gain <= 0 || gain < o.move_cost * static_cast<double>(moves)) {
                keep_previous[l] = true;
                continue;
            }
            candidates.push_back({l, gain, moves});
        }
        if (o.max_moves >= 0) {
            std::stable_sort(candidates.begin(), candidates.end(),
                             [](const Candidate& a, const Candidate& b) {
                                 return a.gain / static_cast<double>(a.moves) >
                                        b.gain / static_cast<double>(b.moves);
                             });
            Index budget = o.max_moves;
            for (const Candidate& c : candidates) {
                if (c.moves <= budget) {
                    budget -= c.moves;
                } else {
                    keep_previous[c.layer] = true;
                }
            }
        }
        Index kept = 0;
        for (Index l = 0; l < L; ++l) {
            if (!keep_previous[l]) continue;
            phy2log.row(l) = o.previous->physical_to_logical().row(l);
            ++kept;
        }
        if (kept > 0) notes << kept << " layer(s) kept their previous placement. ";
    }

    Plan plan{ExpertLocation(std::move(phy2log), E, G, location_nodes), {}};
    plan.stats = evaluate_placement(load, plan.location, o.previous);
    for (Index l = 0; l < L; ++l) plan.stats.layers[l].kept_previous = keep_previous[l];
    plan.stats.algorithm = name;
    plan.stats.notes = notes.str();
    if (!plan.stats.notes.empty() && plan.stats.notes.back() == ' ') plan.stats.notes.pop_back();
    plan.stats.wall_time_seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    return plan;
}

}  // namespace moelb
