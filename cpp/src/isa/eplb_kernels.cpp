// The EPLB planner's vector kernels of one ISA path (isa/kernels.hpp; compiled once per path, with
// -ffp-contract=off so that every path computes the same bits): the packing's swap scan
// (packing.cpp), DeepSeek's small sorts and narrow packing (deepseek.cpp) and the step-peak
// search's sums (step_peak.cpp). Written with GCC/Clang vector extensions of 256 bits: one AVX2
// register; the baseline path runs them as pairs of SSE2 registers or lane by lane.
#if defined(__AVX__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "kernels.hpp"
#include "path_allocator.hpp"

namespace moelb::MOELB_ISA_NS {
namespace {

using isa::Index;

// Vectors of kLanes doubles and kFloatLanes floats (one AVX2 register each).
constexpr int kLanes = 4;
using Lanes = double __attribute__((vector_size(kLanes * sizeof(double))));
constexpr int kFloatLanes = 8;
using FloatLanes = float __attribute__((vector_size(kFloatLanes * sizeof(float))));

// Bit i set where lane i of the comparison mask m (a 256-bit vector of 4 or 8 lanes) is.
template <class Mask>
unsigned lane_bits(const Mask& m) {
    constexpr int lanes = static_cast<int>(sizeof(Mask) / sizeof(m[0]));
#if defined(__AVX__)
    static_assert(sizeof(Mask) == 32);
    if constexpr (lanes == 4) {
        return static_cast<unsigned>(_mm256_movemask_pd(std::bit_cast<__m256d>(m)));
    } else {
        return static_cast<unsigned>(_mm256_movemask_ps(std::bit_cast<__m256>(m)));
    }
#else
    unsigned bits = 0;
    for (int i = 0; i < lanes; ++i) bits |= static_cast<unsigned>(m[i] != 0) << i;
    return bits;
#endif
}

// Whether some x of a[0, size) and y of b[0, stride) (b padded with +inf to whole vectors V of
// T) have lower < x - y < upper: branch-free, a vector of b's slots at a time.
template <typename V, typename T>
bool any_difference_in(const T* a, const T* b, int size, int stride, T lower, T upper) {
    constexpr int kWidth = sizeof(V) / sizeof(T);
    decltype(V{} < V{}) hit{};
    for (int y0 = 0; y0 < stride; y0 += kWidth) {
        V y;
        std::memcpy(&y, b + y0, sizeof y);
        for (int xi = 0; xi < size; ++xi) {
            const V d = a[xi] - y;
            hit |= (d > lower) & (d < upper);
        }
    }
    std::uint64_t words[sizeof hit / sizeof(std::uint64_t)];
    std::memcpy(words, &hit, sizeof hit);
    std::uint64_t any = 0;
    for (const std::uint64_t w : words) any |= w;
    return any != 0;
}

// Swaps bin(a)[xi] with bin(b)[yi] when allowed by the no-duplicate rule (planner::Packing).
bool swap_allowed(const isa::SwapScan& s, int a, int xi, int b, int yi) {
    const int* bin_a = s.slot_expert + static_cast<Index>(a) * s.size;
    const int* bin_b = s.slot_expert + static_cast<Index>(b) * s.size;
    const int ex = bin_a[xi], ey = bin_b[yi];
    if (ex == ey) return false;  // changes nothing
    for (int k = 0; k < s.size; ++k) {
        if (k != yi && bin_b[k] == ex) return false;
    }
    for (int k = 0; k < s.size; ++k) {
        if (k != xi && bin_a[k] == ey) return false;
    }
    return true;
}

// kLanes doubles from p (unaligned).
inline Lanes lanes_at(const double* p) {
    Lanes v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

// kLanes steps' largest load after a swap moves the load y - x of replicas (x[i], y[i]: their
// loads in step i) onto bin a (load ga) from bin b (gb); rest: the largest load of the other bins.
inline Lanes peak_after_swap(const double* x, const double* y, Lanes ga, Lanes gb, Lanes rest) {
    const Lanes delta = lanes_at(y) - lanes_at(x);
    const Lanes na = ga + delta, nb = gb - delta;
    const Lanes m = na > nb ? na : nb;
    return m > rest ? m : rest;
}

}  // namespace

// The best swap between bin a (load limit) and the partners by_load[first, last) (ascending load):
// the one that lowers max(load a, load b) the most below limit, ties to the smallest (tie_key of
// the partner, a's slot, b's slot). Reports whether the best was tied with another partner's.
//
// A swap with b cannot end below (limit + load b) / 2, so once that exceeds the best found (with a
// margin far above rounding), no heavier partner can win, not even a tie. Most partners offer no
// swap at or below the best so far: a branch-free pass over all their pairs, kLanes of b's slots
// at a time, tests that first, with a condition the exact pass's implies (load differences in an
// interval widened by a margin), so it only skips partners the exact pass would skip.
isa::SwapChoice best_swap(const isa::SwapScan& s, int a, double limit, const int* by_load,
                          int first, int last) {
    constexpr double kBoundSlack = 1e-12;  // relative; rounding moves m by ~1e-16
    constexpr double kFloatSlack = 1e-6;
    const double* a_loads = s.slot_load + static_cast<Index>(a) * s.load_stride;
    double best = limit * (1 - s.rel_tol);
    isa::SwapChoice out;
    for (int k = first; k < last; ++k) {
        const int b = by_load[k];
        const double load_b = s.bin_load[b];
        if ((limit + load_b) * 0.5 * (1 - kBoundSlack) > best) break;
        const double* b_loads = s.slot_load + static_cast<Index>(b) * s.load_stride;
        const double gap = limit - load_b;
        // The pass keeps a pair when its d = x - y lies in (lower, upper): 0 < d < gap, and
        // max(limit - d, load_b + d) <= best up to a margin far above rounding, so it keeps
        // every pair the exact pass accepts.
        const double margin = kBoundSlack * limit;
        const double lower = std::max(0.0, limit - best - margin);
        const double upper = std::min(gap, best - load_b + margin);
        if (lower >= upper) continue;
        if (s.use_float) {
            // In float32 with a margin (kFloatSlack of the limit) far above its rounding of the
            // loads and the differences (~2e-7 of the limit): still keeps every such pair.
            const float slack = static_cast<float>(kFloatSlack * limit);
            if (!any_difference_in<FloatLanes>(
                    s.slot_load32 + static_cast<Index>(a) * s.load_stride32,
                    s.slot_load32 + static_cast<Index>(b) * s.load_stride32, s.size,
                    s.load_stride32, static_cast<float>(lower) - slack,
                    static_cast<float>(upper) + slack)) {
                continue;
            }
        } else if (!any_difference_in<Lanes>(a_loads, b_loads, s.size, s.load_stride, lower,
                                             upper)) {
            continue;
        }
        // The exact pass, in the same order (a's slot, then b's) over the pairs the test passes
        // (with the best as it is by then).
        for (int xi = 0; xi < s.size; ++xi) {
            for (int y0 = 0; y0 < s.load_stride; y0 += kLanes) {
                Lanes y;
                std::memcpy(&y, b_loads + y0, sizeof y);
                const Lanes dy = a_loads[xi] - y;
                const Lanes lo = limit - dy, hi = load_b + dy;
                unsigned pairs = lane_bits((dy > 0) & (dy < gap) & ((lo < hi ? hi : lo) <= best));
                for (; pairs != 0; pairs &= pairs - 1) {
                    const int yi = y0 + std::countr_zero(pairs);
                    const double d = a_loads[xi] - b_loads[yi];
                    if (d <= 0 || d >= gap) continue;
                    const double m = std::max(limit - d, load_b + d);
                    if (m > best || (m == best && (out.b < 0 || out.b == b))) continue;
                    if (!swap_allowed(s, a, xi, b, yi)) continue;
                    if (m == best) {  // as good as another partner's best swap
                        out.tied = true;
                        if (s.tie_key[b] > s.tie_key[out.b]) continue;
                    } else {
                        out.tied = false;
                    }
                    best = m;
                    out.b = b;
                    out.xi = xi;
                    out.yi = yi;
                }
            }
        }
    }
    return out;
}

// order_descending for num_items < kSmallSortItems: each one's rank is the number of smaller keys
// (the keys are unique), counted for a block of items at once (a vector of 64-bit lanes) against
// each key in turn, by branch-free comparisons. The keys are compared as signed integers with the
// top bit flipped, which orders them like unsigned ones; spare lanes are padded. Blocks go in
// pairs (one broadcast key serves both), so their count is even.
void rank_descending(const float* w, int num_items, int* order) {
    constexpr int kBlock = 4;
    constexpr int kMaxBlocks = ((isa::kSmallSortItems + kBlock - 1) / kBlock + 1) / 2 * 2;
    using Block = std::int64_t __attribute__((vector_size(kBlock * sizeof(std::int64_t))));
    const int blocks = ((num_items + kBlock - 1) / kBlock + 1) / 2 * 2;
    Block block_keys[kMaxBlocks], block_ranks[kMaxBlocks];
    std::int64_t* k = reinterpret_cast<std::int64_t*>(block_keys);
    for (int i = 0; i < num_items; ++i) {
        std::uint32_t bits;
        const float v = w[i] + 0.0f;
        std::memcpy(&bits, &v, sizeof bits);
        const std::uint64_t key =
            (static_cast<std::uint64_t>(~bits) << 32) | static_cast<std::uint32_t>(i);
        k[i] = static_cast<std::int64_t>(key ^ (std::uint64_t{1} << 63));
    }
    for (int i = num_items; i < blocks * kBlock; ++i)
        k[i] = std::numeric_limits<std::int64_t>::max();
    for (int b = 0; b < blocks; b += 2) {
        const Block mine0 = block_keys[b], mine1 = block_keys[b + 1];
        Block rank0{}, rank1{};
        for (int j = 0; j < num_items; ++j) {
            const Block kj = Block{} + k[j];  // k[j] in every lane
            rank0 -= mine0 > kj;              // a true lane is -1
            rank1 -= mine1 > kj;
        }
        block_ranks[b] = rank0;
        block_ranks[b + 1] = rank1;
    }
    const std::int64_t* rank = reinterpret_cast<const std::int64_t*>(block_ranks);
    for (int i = 0; i < num_items; ++i) order[rank[i]] = i;
}

// The order_descending of a layer's replica loads, from its experts instead of its replicas:
// expert i (of num_items) has count[i] replicas of load u[i] each (u >= 0, never -0), in slot i and
// then, in slot order, the slots s in [num_items, slots) with phy2exp[s] == i. When no two experts'
// u are equal, sorting the num_items experts and listing each one's replicas in slot order is the
// stable sort of the replicas (a tie is then only between replicas of one expert). Ranks are
// counted for blocks of 8 experts at once against each expert's u, as 32-bit integers (the bits of
// a float >= +0 order like it). Returns false, leaving `order` unspecified, when two experts' u are
// equal (the caller then sorts the replicas) or num_items is above kSmallSortItems.
bool replica_order(const float* u, const int* count, const int* phy2exp, int num_items, int slots,
                   int* order) {
    constexpr int kMaxItems = isa::kSmallSortItems;
    if (num_items > kMaxItems) return false;
    // Blocks go in fours (one broadcast key serves four), so their count is a multiple of 4.
    constexpr int kBlock = 8, kGroup = 4;
    using Block = std::int32_t __attribute__((vector_size(kBlock * sizeof(std::int32_t))));
    constexpr int kMaxBlocks = (kMaxItems + kBlock * kGroup - 1) / (kBlock * kGroup) * kGroup;
    Block keys[kMaxBlocks], ranks[kMaxBlocks];
    const int blocks = (num_items + kBlock * kGroup - 1) / (kBlock * kGroup) * kGroup;
    std::int32_t* k = reinterpret_cast<std::int32_t*>(keys);
    for (int i = 0; i < num_items; ++i) std::memcpy(&k[i], &u[i], sizeof k[i]);
    for (int i = num_items; i < blocks * kBlock; ++i) k[i] = 0;
    for (int b = 0; b < blocks; b += kGroup) {
        const Block mine0 = keys[b], mine1 = keys[b + 1], mine2 = keys[b + 2], mine3 = keys[b + 3];
        Block rank0{}, rank1{}, rank2{}, rank3{};
        for (int j = 0; j < num_items; ++j) {
            const Block kj = Block{} + k[j];  // k[j] in every lane
            rank0 -= kj > mine0;              // a true lane is -1
            rank1 -= kj > mine1;
            rank2 -= kj > mine2;
            rank3 -= kj > mine3;
        }
        ranks[b] = rank0;
        ranks[b + 1] = rank1;
        ranks[b + 2] = rank2;
        ranks[b + 3] = rank3;
    }
    // Distinct keys give distinct ranks, a permutation of [0, num_items): then every expert finds
    // itself at its rank. (Equal keys share a rank, and only one of them is written there.)
    const std::int32_t* rank = reinterpret_cast<const std::int32_t*>(ranks);
    int by_rank[kMaxItems];
    for (int i = 0; i < num_items; ++i) by_rank[rank[i]] = i;
    bool distinct = true;
    for (int i = 0; i < num_items; ++i) distinct &= by_rank[rank[i]] == i;
    if (!distinct) return false;
    // Each expert's first position in `order`, then its replicas' slots in slot order.
    int next[kMaxItems];
    for (int r = 0, at = 0; r < num_items; ++r) {
        const int i = by_rank[r];
        order[at] = i;
        next[i] = at + 1;
        at += count[i];
    }
    for (int s = num_items; s < slots; ++s) order[next[phy2exp[s]]++] = s;
    return true;
}

// balanced_packing for num_packs <= 8 packs: each instance's pack keys (the float32 load's bits,
// which order like the load since loads are >= +0; a full pack's key is the largest integer) are
// the lanes of one vector, and a step is branch-free vector work: the minimum key reaches every
// lane in three pairwise minima, and the lowest lane equal to it is the pack.
void narrow_balanced_packing(const float* w, const int* order, int num_items, int num_packs,
                             int* pack, int* rank, int instances) {
    constexpr int kNarrowPacks = 8;
    using PackKeys =
        std::uint32_t __attribute__((vector_size(kNarrowPacks * sizeof(std::uint32_t))));
    constexpr std::uint32_t kNoRoom = std::numeric_limits<std::uint32_t>::max();
    const int per_pack = num_items / num_packs;
    PackKeys lane{};
    for (int p = 0; p < kNarrowPacks; ++p) lane[p] = static_cast<std::uint32_t>(p);
    thread_local Vector<PackKeys> keys;
    thread_local Vector<float> loads;
    thread_local Vector<int> counts;
    keys.assign(static_cast<std::size_t>(instances), PackKeys{} + kNoRoom);
    const PackKeys used = PackKeys{} + static_cast<std::uint32_t>(num_packs);
    for (PackKeys& k : keys) k = lane < used ? PackKeys{} : k;  // the packs start at +0
    loads.assign(static_cast<std::size_t>(num_packs) * instances, 0.0f);
    counts.assign(loads.size(), 0);
    for (int o = 0; o < num_items; ++o) {
        for (int t = 0; t < instances; ++t) {
            PackKeys k = keys[t];
            // (Lane-wise minima written out: a function returning a vector would warn -Wpsabi
            // in builds without AVX.)
            PackKeys other = __builtin_shufflevector(k, k, 4, 5, 6, 7, 0, 1, 2, 3);
            PackKeys least = k < other ? k : other;
            other = __builtin_shufflevector(least, least, 2, 3, 0, 1, 6, 7, 4, 5);
            least = least < other ? least : other;
            other = __builtin_shufflevector(least, least, 1, 0, 3, 2, 5, 4, 7, 6);
            least = least < other ? least : other;
            const int best = std::countr_zero(lane_bits(k == least));
            float* load = loads.data() + num_packs * t;
            int* count = counts.data() + num_packs * t;
            const int i = order[t * num_items + o];
            pack[t * num_items + i] = best;
            rank[t * num_items + i] = count[best]++;
            load[best] += w[t * num_items + i];
            std::uint32_t bits;
            std::memcpy(&bits, &load[best], sizeof bits);
            if (count[best] == per_pack) bits = kNoRoom;
            keys[t] = lane == PackKeys{} + static_cast<std::uint32_t>(best) ? PackKeys{} + bits : k;
        }
    }
}

// The step-peak search's change over a's peak steps (stride: a multiple of 4, zero-padded) when
// replica x (loads cx) on bin a (ga) swaps with y (cy) on bin b (gb); rest: the largest load of
// the other bins. Lanes summed as (0 + 1) + (2 + 3).
double peak_change(const double* cx, const double* cy, const double* ga, const double* gb,
                   const double* rest, isa::Index stride) {
    Lanes acc = {0, 0, 0, 0};
    for (Index i = 0; i < stride; i += kLanes) {
        const Lanes a = lanes_at(ga + i);
        acc += peak_after_swap(cx + i, cy + i, a, lanes_at(gb + i), lanes_at(rest + i)) -
               a;  // a is the step's largest load
    }
    return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

// The same swap's change over the other steps, in step order, chunk by chunk (chunk_steps steps,
// a multiple of 4): *change = peak_change + the sum so far; stops after chunk c when *change -
// reach[c + 1] >= bound. Returns the chunks summed (chunks: all of them).
isa::Index other_change(const double* ux, const double* uy, const double* la, const double* lb,
                        const double* rest, const double* top1, const double* other_a,
                        const double* reach, isa::Index chunks, isa::Index chunk_steps,
                        double peak_change, double bound, double* change) {
    Lanes acc = {0, 0, 0, 0};
    double sum = peak_change;
    Index c = 0;
    for (; c < chunks; ++c) {
        for (Index t = c * chunk_steps; t < (c + 1) * chunk_steps; t += kLanes) {
            const Lanes m = peak_after_swap(ux + t, uy + t, lanes_at(la + t), lanes_at(lb + t),
                                            lanes_at(rest + t));
            acc += (m - lanes_at(top1 + t)) * lanes_at(other_a + t);
        }
        sum = peak_change + ((acc[0] + acc[1]) + (acc[2] + acc[3]));
        if (sum - reach[c + 1] >= bound) break;
    }
    *change = sum;
    return c;
}

}  // namespace moelb::MOELB_ISA_NS
