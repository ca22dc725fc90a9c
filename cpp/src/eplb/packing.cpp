// Replicas -> GPUs (DESIGN section 4: "minimises the maximum per-GPU load directly, never places
// two replicas of one expert on one GPU when avoidable"): the Packing of one layer's replicas into
// bins (GPUs) by LPT, the repair of duplicates by swaps, and the swap local search that lowers the
// largest bin's load; with the conversions between packings and slot rows.
#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <utility>
#include <vector>

#include "../isa/kernels.hpp"
#include "planner.hpp"

namespace moelb::planner {
namespace {

// The swap search's first test runs in float32 (vectors of kFloatLanes floats) when the loads are
// between kFloatMin and kFloatMax (its margin, isa/eplb_kernels.cpp, is far above the rounding).
constexpr int kFloatLanes = 8;
constexpr double kFloatMin = 1e-30, kFloatMax = 1e30;

// A swap of bin(a)[xi] with bin(b)[yi] (a: the heaviest bin); b < 0: none; tied: another partner
// offers an equally good swap.
using Swap = isa::SwapChoice;

// The best swap between bin a (load limit) and the partners by_load[first, last) (ascending load):
// the one that lowers max(load a, load b) the most below limit, ties to the smallest (tie_key of
// the partner, a's slot, b's slot); reports whether the best was tied with another partner's. A
// vector kernel (isa/eplb_kernels.cpp: a branch-free screen over all pairs, then the exact pass).
Swap best_swap(const Packing& p, int a, double limit, const int* by_load, int first, int last,
               const PackScratch& s) {
    isa::SwapScan scan;
    scan.bin_load = p.bin_load.data();
    scan.slot_expert = p.slot_expert.data();
    scan.size = p.size;
    scan.slot_load = s.slot_load.data();
    scan.load_stride = s.load_stride;
    scan.slot_load32 = s.slot_load32.data();
    scan.load_stride32 = s.load_stride32;
    scan.use_float = s.use_float;
    scan.tie_key = s.tie_key.data();
    scan.rel_tol = kRelTol;
    return isa::kernels().best_swap(scan, a, limit, by_load, first, last);
}

// The swap search's order of bins: by load, then index.
bool lighter(const Packing& p, int x, int y) {
    return p.bin_load[x] < p.bin_load[y] || (p.bin_load[x] == p.bin_load[y] && x < y);
}

// The swap search's state in s: each domain's bins sorted by (load, index) (s.sorted, with each
// bin's place in s.position), and every slot's replica load (s.slot_load; also in float32 in
// s.slot_load32 when the loads allow it, s.use_float).
void prepare_swap_search(const Packing& p, double target, PackScratch& s) {
    s.sorted.resize(static_cast<std::size_t>(p.num_bins));
    s.position.resize(static_cast<std::size_t>(p.num_bins));
    for (int d = 0; d < p.num_domains(); ++d) {
        const auto first = s.sorted.begin() + static_cast<Index>(d) * p.bins_per_domain;
        std::iota(first, first + p.bins_per_domain, d * p.bins_per_domain);
        std::sort(first, first + p.bins_per_domain, [&](int x, int y) { return lighter(p, x, y); });
    }
    for (int i = 0; i < p.num_bins; ++i) s.position[s.sorted[i]] = i;
    s.load_stride = (p.size + kLanes - 1) / kLanes * kLanes;
    s.slot_load.assign(static_cast<std::size_t>(p.num_bins) * s.load_stride,
                       std::numeric_limits<double>::infinity());
    for (int b = 0; b < p.num_bins; ++b) {
        for (int k = 0; k < p.size; ++k) {
            s.slot_load[static_cast<Index>(b) * s.load_stride + k] = p.replica_load[p.bin(b)[k]];
        }
    }
    // Loads from kFloatMin to kFloatMax (the largest bin's; the limit only falls, and a search
    // stops at the target, which is at least the mean): float32 keeps them to ~6e-8 relative.
    const double top = p.max_load();
    s.use_float = top <= kFloatMax && target >= kFloatMin;
    if (s.use_float) {
        s.load_stride32 = (p.size + kFloatLanes - 1) / kFloatLanes * kFloatLanes;
        s.slot_load32.assign(static_cast<std::size_t>(p.num_bins) * s.load_stride32,
                             std::numeric_limits<float>::infinity());
        for (int b = 0; b < p.num_bins; ++b) {
            for (int k = 0; k < p.size; ++k) {
                s.slot_load32[static_cast<Index>(b) * s.load_stride32 + k] =
                    static_cast<float>(p.replica_load[p.bin(b)[k]]);
            }
        }
    }
}

// The heaviest bin (ties to the lower bin) and its partners, the lighter bins of its domain: the
// first `num_partners` of the domain's sorted order. Each domain's heaviest bins end its sorted
// order, the lower bin first.
struct HeaviestBin {
    int bin = -1;
    int num_partners = 0;
};
HeaviestBin heaviest_bin(const Packing& p, const PackScratch& s) {
    HeaviestBin out;
    for (int d = 0; d < p.num_domains(); ++d) {
        const int* order = s.sorted.data() + static_cast<Index>(d) * p.bins_per_domain;
        int k = p.bins_per_domain - 1;
        const double top = p.bin_load[order[k]];
        while (k > 0 && p.bin_load[order[k - 1]] == top) --k;
        if (out.bin < 0 || top > p.bin_load[out.bin]) {
            out.bin = order[k];
            out.num_partners = k;
        }
    }
    return out;
}

// The swap for the heaviest bin a (load limit; partners by_load[0, n), lightest first, from
// heaviest_bin). The kFirstPartners lightest are tried first, ties between equally good swaps to
// the lower bin; only if none helps, all the others, ties to the earlier partner in the order
// std::nth_element left them in (the selection of the first round over the partners in index
// order).
Swap find_swap(const Packing& p, int a, int n, double limit, PackScratch& s) {
    constexpr int kFirstPartners = 16;
    const int* by_load = s.sorted.data() + static_cast<Index>(p.domain(a)) * p.bins_per_domain;
    // Round one: ties to the lower bin.
    s.tie_key.resize(static_cast<std::size_t>(p.num_bins));
    for (int k = 0; k < std::min(n, kFirstPartners); ++k) s.tie_key[by_load[k]] = by_load[k];
    Swap best = best_swap(p, a, limit, by_load, 0, std::min(n, kFirstPartners), s);
    if (best.b < 0 && n > kFirstPartners) {
        for (int k = kFirstPartners; k < n; ++k) s.tie_key[by_load[k]] = by_load[k];
        best = best_swap(p, a, limit, by_load, kFirstPartners, n, s);
        if (best.tied) {
            // Equally good swaps with different bins: the winner is the earlier partner in
            // std::nth_element's order, so rebuild that order and search again.
            s.partners.clear();
            const int first = p.domain(a) * p.bins_per_domain;
            for (int b = first; b < first + p.bins_per_domain; ++b) {
                if (b != a && p.bin_load[b] < limit) s.partners.push_back(b);
            }
            std::nth_element(s.partners.begin(), s.partners.begin() + kFirstPartners,
                             s.partners.end(), [&](int x, int y) { return lighter(p, x, y); });
            for (int k = kFirstPartners; k < n; ++k) s.tie_key[s.partners[k]] = k;
            best = best_swap(p, a, limit, by_load, kFirstPartners, n, s);
        }
    }
    return best;
}

// Restores the sorted order of b's domain after bin b's load changed.
void resort(const Packing& p, int b, PackScratch& s) {
    const int lo = p.domain(b) * p.bins_per_domain, hi = lo + p.bins_per_domain;
    int i = s.position[b];
    while (i > lo && lighter(p, b, s.sorted[i - 1])) {
        s.sorted[i] = s.sorted[i - 1];
        s.position[s.sorted[i]] = i;
        --i;
    }
    while (i + 1 < hi && lighter(p, s.sorted[i + 1], b)) {
        s.sorted[i] = s.sorted[i + 1];
        s.position[s.sorted[i]] = i;
        ++i;
    }
    s.sorted[i] = b;
    s.position[b] = i;
}

// Makes the swap (heaviest bin a) in p and in the search's state.
void make_swap(Packing& p, int a, const Swap& swap, PackScratch& s) {
    p.apply_swap(a, swap.xi, swap.b, swap.yi);
    std::swap(s.slot_load[static_cast<Index>(a) * s.load_stride + swap.xi],
              s.slot_load[static_cast<Index>(swap.b) * s.load_stride + swap.yi]);
    if (s.use_float) {
        std::swap(s.slot_load32[static_cast<Index>(a) * s.load_stride32 + swap.xi],
                  s.slot_load32[static_cast<Index>(swap.b) * s.load_stride32 + swap.yi]);
    }
    resort(p, a, s);
    resort(p, swap.b, s);
}

}  // namespace

// stable_sort_by_key: comparisons of random loads mispredict, so: a least significant digit radix
// sort on the keys' high halves (8 bits a pass, each stable, skipping digits all keys share), then
// an insertion sort on the whole keys, which only moves items within the (rare, short) runs of
// equal high halves.
void stable_sort_by_key(std::vector<std::uint64_t>& keys, std::vector<int>& items) {
    constexpr int kRadixBits = 8, kBuckets = 1 << kRadixBits, kPasses = 32 / kRadixBits;
    thread_local std::vector<std::uint64_t> next_keys;
    thread_local std::vector<int> next_items;
    const std::size_t n = keys.size();
    next_keys.resize(n);
    next_items.resize(n);
    std::uint32_t histogram[kPasses][kBuckets] = {};
    for (const std::uint64_t k : keys) {
        for (int pass = 0; pass < kPasses; ++pass) {
            ++histogram[pass][(k >> (32 + pass * kRadixBits)) & (kBuckets - 1)];
        }
    }
    for (int pass = 0; pass < kPasses && n > 0; ++pass) {
        const int shift = 32 + pass * kRadixBits;
        std::uint32_t* start = histogram[pass];
        if (start[(keys[0] >> shift) & (kBuckets - 1)] == n) continue;
        std::uint32_t sum = 0;
        for (int digit = 0; digit < kBuckets; ++digit) sum += std::exchange(start[digit], sum);
        for (std::size_t i = 0; i < n; ++i) {
            const std::uint32_t to = start[(keys[i] >> shift) & (kBuckets - 1)]++;
            next_keys[to] = keys[i];
            next_items[to] = items[i];
        }
        keys.swap(next_keys);
        items.swap(next_items);
    }
    for (std::size_t i = 1; i < n; ++i) {
        const std::uint64_t k = keys[i];
        if (keys[i - 1] <= k) continue;
        const int item = items[i];
        std::size_t j = i;
        for (; j > 0 && keys[j - 1] > k; --j) {
            keys[j] = keys[j - 1];
            items[j] = items[j - 1];
        }
        keys[j] = k;
        items[j] = item;
    }
}

// Orders each domain's experts by (replica load desc, expert asc): the order LPT places them in.
void Packing::sort_order(PackScratch& s) {
    const int E = num_experts(), D = num_domains();
    order_offset.assign(static_cast<std::size_t>(D) + 1, 0);
    for (int e = 0; e < E; ++e) {
        if (count[e] > 0) ++order_offset[domain_of[e] + 1];
    }
    for (int d = 0; d < D; ++d) order_offset[d + 1] += order_offset[d];
    // The experts in index order by their replica loads, then a stable pass by domain.
    s.keys.clear();
    s.items.clear();
    for (int e = 0; e < E; ++e) {
        if (count[e] == 0) continue;
        s.keys.push_back(descending_key(replica_load[e]));
        s.items.push_back(e);
    }
    stable_sort_by_key(s.keys, s.items);
    const std::size_t n = s.keys.size();
    order.resize(n);
    s.fill.assign(order_offset.begin(), order_offset.end() - 1);
    for (const int e : s.items) order[s.fill[domain_of[e]]++] = e;
    order_valid = true;
}

// Gives expert e `delta` more replicas (it keeps at least one), keeping the LPT order sorted.
void Packing::change_count(int e, int delta, const double* w) {
    count[e] += delta;
    replica_load[e] = w[e] / count[e];
    if (!order_valid) return;
    const auto heavier = [this](int x, int y) {
        return replica_load[x] > replica_load[y] || (replica_load[x] == replica_load[y] && x < y);
    };
    const int d = domain_of[e];
    const int lo = order_offset[d], hi = order_offset[d + 1];
    int i = static_cast<int>(std::find(order.begin() + lo, order.begin() + hi, e) - order.begin());
    while (i > lo && heavier(e, order[i - 1])) {
        order[i] = order[i - 1];
        --i;
    }
    while (i + 1 < hi && heavier(order[i + 1], e)) {
        order[i] = order[i + 1];
        ++i;
    }
    order[i] = e;
}

// Longest-processing-time first onto the lightest bin of the replica's domain with room that does
// not hold the expert yet (ties to the lower bin); duplicates only when unavoidable. Replicas go
// in `order`, so an expert's replicas are placed one after the other and "the bin holds the
// expert" means "the bin took one of its earlier replicas".
//
// The domain's bins are the leaves of a tournament tree of integer keys (load bits, bin) -- loads
// are >= +0, so their bits order like their values -- whose root is the lightest bin with room (a
// full bin and the padding to a power of two hold kNoRoom). The keys are unique, so the choice is
// the same as a scan's, and taking the smaller of two integers needs no branch.
void Packing::lpt(PackScratch& s) {
    using Key = Uint128;
    constexpr Key kNoRoom = ~Key{0};
    const auto key = [](double load, int b) {
        std::uint64_t bits;
        const double v = load + 0.0;
        std::memcpy(&bits, &v, sizeof bits);
        return (static_cast<Key>(bits) << 32) | static_cast<std::uint32_t>(b);
    };
    s.fill.assign(static_cast<std::size_t>(num_bins), 0);
    s.held.assign(static_cast<std::size_t>(num_bins), -1);
    std::fill(bin_load.begin(), bin_load.end(), 0.0);
    int leaves = 1;
    while (leaves < bins_per_domain) leaves *= 2;
    std::vector<Key>& tree = s.tree;
    tree.resize(2 * static_cast<std::size_t>(leaves));
    // Sets leaf i to k and restores the path to the root, carrying the minimum in a register.
    const auto set = [&](int i, Key k) {
        int j = leaves + i;
        tree[j] = k;
        for (; j > 1; j /= 2) {
            k = std::min(k, tree[j ^ 1]);
            tree[j / 2] = k;
        }
    };
    const auto place = [&](int b, int e) {
        bin(b)[s.fill[b]++] = e;
        bin_load[b] += replica_load[e];
        s.held[b] = e;
    };
    for (int d = 0; d < num_domains(); ++d) {
        const int first = d * bins_per_domain;
        // Round one: while a bin is empty and the replica's load positive, the lightest bin with
        // room is the lowest empty one (the others are heavier) and holds nothing yet.
        int k = order_offset[d], r = 0;
        for (int b = first; b < first + bins_per_domain && k < order_offset[d + 1]; ++b) {
            const int e = order[k];
            if (!(replica_load[e] > 0)) break;
            place(b, e);
            if (++r == count[e]) {
                ++k;
                r = 0;
            }
        }
        for (int i = 0; i < leaves; ++i) {
            const int b = first + i;
            tree[leaves + i] =
                i < bins_per_domain && s.fill[b] < size ? key(bin_load[b], b) : kNoRoom;
        }
        for (int j = leaves - 1; j >= 1; --j) tree[j] = std::min(tree[2 * j], tree[2 * j + 1]);
        for (; k < order_offset[d + 1]; ++k, r = 0) {
            const int e = order[k];
            for (; r < count[e]; ++r) {
                int b = static_cast<int>(static_cast<std::uint32_t>(tree[1]));
                if (s.held[b] == e) {
                    // The lightest bin with room that does not hold e, by a scan (rare with many
                    // bins, cheap with few); if every bin with room holds e, the lightest (b)
                    // takes the duplicate.
                    int c = -1;
                    for (int x = first; x < first + bins_per_domain; ++x) {
                        if (s.fill[x] == size || s.held[x] == e) continue;
                        if (c < 0 || bin_load[x] < bin_load[c]) c = x;
                    }
                    if (c >= 0) b = c;
                }
                place(b, e);
                set(b - first, s.fill[b] < size ? key(bin_load[b], b) : kNoRoom);
            }
        }
    }
}

// Removes duplicate experts within a bin by swaps that keep both bins at or below `limit`.
void Packing::repair_duplicates(double limit, PackScratch& s) {
    if (bins_per_domain <= 1) return;  // no bin to swap with
    // The slots of bin a whose expert also sits in an earlier slot of a, ascending. A swap below
    // replaces such a slot's expert with one a does not hold, so it never changes whether a later
    // slot of a is a duplicate: the list taken before the swaps stays exact.
    const std::size_t experts = count.size();
    // Without duplicates nothing below would change: skip the swap scans.
    bool any = false;
    for (int a = 0; a < num_bins && !any; ++a) {
        s.scan_bin(bin(a), size, experts);
        any = !s.dup_slots.empty();
    }
    if (!any) return;
    // A work budget in slots visited bounds the repair of huge bins full of (unavoidable)
    // duplicates; plans of realistic sizes never reach it.
    std::int64_t budget =
        std::max<std::int64_t>(std::int64_t{1} << 24, std::int64_t{16} * num_bins * size);
    for (int a = 0; a < num_bins && budget > 0; ++a) {
        const int stamp = s.scan_bin(bin(a), size, experts);  // in_bin[e] == stamp: a holds e
        for (const int xi : s.dup_slots) {
            if ((budget -= std::int64_t{2} * size * bins_per_domain) < 0) break;
            const int ex = bin(a)[xi];
            int best_b = -1, best_yi = -1;
            double best = std::numeric_limits<double>::infinity();
            for (int b = domain(a) * bins_per_domain; b < (domain(a) + 1) * bins_per_domain; ++b) {
                if (b == a || holds(b, ex)) continue;
                for (int yi = 0; yi < size; ++yi) {
                    const int ey = bin(b)[yi];
                    if (s.in_bin[ey] == stamp) continue;  // a holds ey
                    const double d = replica_load[ex] - replica_load[ey];
                    const double m = std::max(bin_load[a] - d, bin_load[b] + d);
                    if (m <= limit * (1 + kRelTol) && m < best) {
                        best = m;
                        best_b = b;
                        best_yi = yi;
                    }
                }
            }
            if (best_b >= 0) {
                s.in_bin[bin(best_b)[best_yi]] = stamp;  // a now holds ey (and still ex)
                apply_swap(a, xi, best_b, best_yi);
            }
        }
    }
}

// Local search: while the heaviest bin can trade a replica for a lighter one with a bin of its
// domain so that both end below its load, do the best such swap (find_swap). Stops at `target` (a
// lower bound: nothing below it is reachable). Each domain's bins are kept sorted by (load, index)
// across swaps, so the partners are a prefix of that order, lightest first.
void Packing::swap_search(double target, PackScratch& s) {
    const int max_iterations = 20 * num_bins + 100;
    prepare_swap_search(*this, target, s);
    for (int it = 0; it < max_iterations; ++it) {
        const HeaviestBin a = heaviest_bin(*this, s);
        const double limit = bin_load[a.bin];
        if (limit <= target * (1 + kTargetTol)) return;
        const Swap best = find_swap(*this, a.bin, a.num_partners, limit, s);
        if (best.b < 0) return;
        make_swap(*this, a.bin, best, s);
    }
}

void pack_counts(Packing& p, const double* w, double target, PackScratch& s) {
    if (!p.order_valid) {
        p.compute_replica_loads(w);
        p.sort_order(s);
    }
    p.lpt(s);
    p.repair_duplicates(p.max_load(), s);
    p.swap_search(target, s);
}

int avoidable_duplicates(const Packing& p, PackScratch& s, int* first) {
    if (s.mark.size() != p.count.size()) {
        s.mark.assign(p.count.size(), 0);
        s.stamp = 0;
    }
    if (++s.stamp == std::numeric_limits<int>::max()) {
        std::fill(s.mark.begin(), s.mark.end(), 0);
        s.stamp = 1;
    }
    int n = 0, smallest = -1;
    for (int b = 0; b < p.num_bins; ++b) {
        const int* slots = p.bin(b);
        s.scan_bin(slots, p.size, p.count.size());
        for (const int i : s.dup_slots) {
            const int e = slots[i];
            if (p.count[e] > p.bins_per_domain || s.mark[e] == s.stamp) continue;
            s.mark[e] = s.stamp;
            ++n;
            if (smallest < 0 || e < smallest) smallest = e;
        }
    }
    if (first) *first = smallest;
    return n;
}

void packing_of(Packing& p, const double* w, const std::int32_t* phy2log, int num_experts,
                int num_physical_experts, int ep_size, int num_domains) {
    p.reset(ep_size, ep_size / num_domains, num_physical_experts / ep_size, num_experts);
    std::fill(p.count.begin(), p.count.end(), 0);
    const int slots_per_domain = p.size * p.bins_per_domain;
    for (int s = 0; s < num_physical_experts; ++s) {
        p.slot_expert[s] = phy2log[s];
        ++p.count[phy2log[s]];
    }
    for (int d = 0; d < num_domains; ++d) {
        for (int s = d * slots_per_domain; s < (d + 1) * slots_per_domain; ++s) {
            p.domain_of[phy2log[s]] = d;
        }
    }
    p.compute_replica_loads(w);
    p.recompute_loads();
}

void write_slots(const Packing& p, std::int32_t* phy2log) {
    std::copy(p.slot_expert.begin(), p.slot_expert.end(), phy2log);
}

}  // namespace moelb::planner
