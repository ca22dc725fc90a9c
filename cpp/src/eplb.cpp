#include "moelb/eplb.hpp"

#include <algorithm>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <sstream>
#include <utility>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "enum_names.hpp"
#include "moelb/errors.hpp"
#include "moelb/parallel.hpp"

namespace moelb {
namespace {

// Vectors of kLanes doubles (GCC/Clang vector extensions; one AVX2 register), for the swap search's
// scan over pairs of replicas. A comparison gives a LaneMask with all bits set in the lanes where
// it holds.
constexpr int kLanes = 4;
using Lanes = double __attribute__((vector_size(kLanes * sizeof(double))));
using LaneMask = std::int64_t __attribute__((vector_size(kLanes * sizeof(double))));

// The same for floats: 8 lanes (one AVX2 register), for the swap search's first test in float32,
// with loads between kFloatMin and kFloatMax and a margin of kFloatSlack of the largest load.
constexpr int kFloatLanes = 8;
using FloatLanes = float __attribute__((vector_size(kFloatLanes * sizeof(float))));
constexpr double kFloatMin = 1e-30, kFloatMax = 1e30, kFloatSlack = 1e-6;

// 128-bit integers for (double bits, index) keys (a GCC/Clang extension like the vector types;
// __extension__ tells -Wpedantic so).
__extension__ typedef unsigned __int128 Uint128;

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

// =============================================================================================
// DeepSeek's eplb.py, per layer, in float32 like the original.
// =============================================================================================

// order_descending sorts this many items or more by radix, fewer by counting each one's rank.
constexpr int kRadixMinItems = 96;

// Indices of w[0, n) by descending value, ties to the lower index (what a stable sort gives).
// Sorts one integer key per item: the float's bits (order-preserving for values >= 0; -0 is
// normalised to +0) complemented in the high half, the index in the low half. A least significant
// digit radix sort on the high half (kRadixBits at a time, each pass stable, skipping digits all
// keys share) keeps equal values in index order.
void order_descending(const float* w, int n, std::vector<int>& order) {
    constexpr int kRadixBits = 8, kBuckets = 1 << kRadixBits, kPasses = 32 / kRadixBits;
    thread_local std::vector<std::uint64_t> keys, next;
    order.resize(static_cast<std::size_t>(n));
    if (n < kRadixMinItems) {
        // Few items: each one's rank is the number of smaller keys (the keys are unique), counted
        // for a block of items at once (a vector of 64-bit lanes) against each key in turn, by
        // branch-free comparisons. The keys are compared as signed integers with the top bit
        // flipped, which orders them like unsigned ones; spare lanes are padded. Blocks go in
        // pairs (one broadcast key serves both), so their count is even.
        constexpr int kBlock = 4;
        using Block = std::int64_t __attribute__((vector_size(kBlock * sizeof(std::int64_t))));
        const int blocks = ((n + kBlock - 1) / kBlock + 1) / 2 * 2;
        thread_local std::vector<Block> block_keys, block_ranks;
        block_keys.resize(static_cast<std::size_t>(blocks));
        block_ranks.resize(block_keys.size());
        std::int64_t* k = reinterpret_cast<std::int64_t*>(block_keys.data());
        for (int i = 0; i < n; ++i) {
            std::uint32_t bits;
            const float v = w[i] + 0.0f;
            std::memcpy(&bits, &v, sizeof bits);
            const std::uint64_t key =
                (static_cast<std::uint64_t>(~bits) << 32) | static_cast<std::uint32_t>(i);
            k[i] = static_cast<std::int64_t>(key ^ (std::uint64_t{1} << 63));
        }
        for (int i = n; i < blocks * kBlock; ++i) k[i] = std::numeric_limits<std::int64_t>::max();
        for (int b = 0; b < blocks; b += 2) {
            const Block mine0 = block_keys[b], mine1 = block_keys[b + 1];
            Block rank0{}, rank1{};
            for (int j = 0; j < n; ++j) {
                const Block kj = Block{} + k[j];  // k[j] in every lane
                rank0 -= mine0 > kj;              // a true lane is -1
                rank1 -= mine1 > kj;
            }
            block_ranks[b] = rank0;
            block_ranks[b + 1] = rank1;
        }
        const std::int64_t* rank = reinterpret_cast<const std::int64_t*>(block_ranks.data());
        for (int i = 0; i < n; ++i) order[rank[i]] = i;
        return;
    }
    keys.resize(static_cast<std::size_t>(n));
    next.resize(keys.size());
    std::uint32_t histogram[kPasses][kBuckets] = {};
    for (int i = 0; i < n; ++i) {
        std::uint32_t bits;
        const float v = w[i] + 0.0f;
        std::memcpy(&bits, &v, sizeof bits);
        bits = ~bits;
        keys[i] = (static_cast<std::uint64_t>(bits) << 32) | static_cast<std::uint32_t>(i);
        for (int pass = 0; pass < kPasses; ++pass) {
            ++histogram[pass][(bits >> (pass * kRadixBits)) & (kBuckets - 1)];
        }
    }
    for (int pass = 0; pass < kPasses && n > 0; ++pass) {
        const int shift = 32 + pass * kRadixBits;
        std::uint32_t* count = histogram[pass];
        if (count[(keys[0] >> shift) & (kBuckets - 1)] == static_cast<std::uint32_t>(n)) continue;
        std::uint32_t start = 0;
        for (int d = 0; d < kBuckets; ++d) start += std::exchange(count[d], start);
        for (const std::uint64_t k : keys) next[count[(k >> shift) & (kBuckets - 1)]++] = k;
        keys.swap(next);
    }
    for (int i = 0; i < n; ++i) order[i] = static_cast<int>(keys[i] & 0xffffffffu);
}

// The order_descending of a layer's replica loads, from its experts instead of its replicas:
// expert i (of n) has count[i] replicas of load u[i] each (u >= 0, never -0), in slot i and then,
// in slot order, the slots s in [n, slots) with phy2exp[s] == i. When no two experts' u are equal,
// sorting the n experts and listing each one's replicas in slot order is the stable sort of the
// replicas (a tie is then only between replicas of one expert). Ranks are counted for blocks of 8
// experts at once against each expert's u, as 32-bit integers (the bits of a float >= +0 order like
// it). Returns false, leaving `order` unspecified, when two experts' u are equal (the caller then
// sorts the replicas) or n is above kRadixMinItems.
bool replica_order(const float* u, const int* count, const int* phy2exp, int n, int slots,
                   int* order) {
    if (n > kRadixMinItems) return false;
    // Blocks go in fours (one broadcast key serves four), so their count is a multiple of 4.
    constexpr int kBlock = 8, kGroup = 4;
    using Block = std::int32_t __attribute__((vector_size(kBlock * sizeof(std::int32_t))));
    constexpr int kMaxBlocks = (kRadixMinItems + kBlock * kGroup - 1) / (kBlock * kGroup) * kGroup;
    Block keys[kMaxBlocks], ranks[kMaxBlocks];
    const int blocks = (n + kBlock * kGroup - 1) / (kBlock * kGroup) * kGroup;
    std::int32_t* k = reinterpret_cast<std::int32_t*>(keys);
    for (int i = 0; i < n; ++i) std::memcpy(&k[i], &u[i], sizeof k[i]);
    for (int i = n; i < blocks * kBlock; ++i) k[i] = 0;
    for (int b = 0; b < blocks; b += kGroup) {
        const Block mine0 = keys[b], mine1 = keys[b + 1], mine2 = keys[b + 2], mine3 = keys[b + 3];
        Block rank0{}, rank1{}, rank2{}, rank3{};
        for (int j = 0; j < n; ++j) {
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
    // Distinct keys give distinct ranks, a permutation of [0, n): then every expert finds itself
    // at its rank. (Equal keys share a rank, and only one of them is written there.)
    const std::int32_t* rank = reinterpret_cast<const std::int32_t*>(ranks);
    int by_rank[kRadixMinItems];
    for (int i = 0; i < n; ++i) by_rank[rank[i]] = i;
    bool distinct = true;
    for (int i = 0; i < n; ++i) distinct &= by_rank[rank[i]] == i;
    if (!distinct) return false;
    // Each expert's first position in `order`, then its replicas' slots in slot order.
    int next[kRadixMinItems];
    for (int r = 0, at = 0; r < n; ++r) {
        const int i = by_rank[r];
        order[at] = i;
        next[i] = at + 1;
        at += count[i];
    }
    for (int s = n; s < slots; ++s) order[next[phy2exp[s]]++] = s;
    return true;
}

// balanced_packing (below) for m <= kNarrowPacks packs: each instance's pack keys (the float32
// load's bits, which order like the load since loads are >= +0; a full pack's key is the largest
// integer) are the lanes of one vector, and a step is branch-free vector work: the minimum key
// reaches every lane in three pairwise minima, and the lowest lane equal to it is the pack.
constexpr int kNarrowPacks = 8;
using PackKeys = std::uint32_t __attribute__((vector_size(kNarrowPacks * sizeof(std::uint32_t))));

void narrow_balanced_packing(const float* w, const int* order, int n, int m, int* pack, int* rank,
                             int instances) {
    constexpr std::uint32_t kNoRoom = std::numeric_limits<std::uint32_t>::max();
    const int per_pack = n / m;
    PackKeys lane{};
    for (int p = 0; p < kNarrowPacks; ++p) lane[p] = static_cast<std::uint32_t>(p);
    thread_local std::vector<PackKeys> keys;
    thread_local std::vector<float> loads;
    thread_local std::vector<int> counts;
    keys.assign(static_cast<std::size_t>(instances), PackKeys{} + kNoRoom);
    const PackKeys used = PackKeys{} + static_cast<std::uint32_t>(m);
    for (PackKeys& k : keys) k = lane < used ? PackKeys{} : k;  // the packs start at +0
    loads.assign(static_cast<std::size_t>(m) * instances, 0.0f);
    counts.assign(loads.size(), 0);
    for (int o = 0; o < n; ++o) {
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
            float* load = loads.data() + m * t;
            int* count = counts.data() + m * t;
            const int i = order[t * n + o];
            pack[t * n + i] = best;
            rank[t * n + i] = count[best]++;
            load[best] += w[t * n + i];
            std::uint32_t bits;
            std::memcpy(&bits, &load[best], sizeof bits);
            if (count[best] == per_pack) bits = kNoRoom;
            keys[t] = lane == PackKeys{} + static_cast<std::uint32_t>(best) ? PackKeys{} + bits : k;
        }
    }
}

// balanced_packing: n items into m packs of n / m items each (greedy by descending weight onto
// the lightest pack with room, ties to the lower pack). Pack sums accumulate in float32.
// `order` is the items' order_descending (ties to the lower index).
//
// Runs `instances` independent packings at once (instance t: w, order, pack and rank at offset
// t * n), a step of each in turn: one packing is a chain of dependent steps, and interleaving
// chains lets the processor overlap them.
void balanced_packing(const float* w, const int* order, int n, int m, int* pack, int* rank,
                      int instances = 1) {
    const int per_pack = n / m;
    if (per_pack == 1) {
        for (int i = 0; i < n * instances; ++i) {
            pack[i] = i % n;
            rank[i] = 0;
        }
        return;
    }
    if (m <= kNarrowPacks) {
        narrow_balanced_packing(w, order, n, m, pack, rank, instances);
        return;
    }
    // Each instance's packs in a tournament tree of keys (float32 load bits, pack): its root is
    // the lightest pack with room, ties to the lower pack. Loads are >= +0 (never -0: they start
    // at +0 and only grow), so their bits order like their values; a full pack's key is kNoRoom.
    constexpr std::uint64_t kNoRoom = std::numeric_limits<std::uint64_t>::max();
    const auto key = [](float load, int p) {
        std::uint32_t bits;
        std::memcpy(&bits, &load, sizeof bits);
        return (static_cast<std::uint64_t>(bits) << 32) | static_cast<std::uint32_t>(p);
    };
    int leaves = 1;
    while (leaves < m) leaves *= 2;
    thread_local std::vector<std::uint64_t> trees;
    thread_local std::vector<float> loads;
    thread_local std::vector<int> counts;
    trees.assign(2 * static_cast<std::size_t>(leaves) * instances, kNoRoom);
    loads.assign(static_cast<std::size_t>(m) * instances, 0.0f);
    counts.assign(loads.size(), 0);
    for (int t = 0; t < instances; ++t) {
        std::uint64_t* tree = trees.data() + 2 * leaves * t;
        for (int p = 0; p < m; ++p) tree[leaves + p] = key(0.0f, p);
        for (int j = leaves - 1; j >= 1; --j) tree[j] = std::min(tree[2 * j], tree[2 * j + 1]);
    }
    for (int o = 0; o < n; ++o) {
        for (int t = 0; t < instances; ++t) {
            std::uint64_t* tree = trees.data() + 2 * leaves * t;
            float* load = loads.data() + m * t;
            int* count = counts.data() + m * t;
            const int i = order[t * n + o];
            const int best = static_cast<int>(tree[1] & 0xffffffffu);
            pack[t * n + i] = best;
            rank[t * n + i] = count[best]++;
            load[best] += w[t * n + i];
            // Up from the leaf, carrying the new minimum (a register, not a reload of the store).
            std::uint64_t k = count[best] < per_pack ? key(load[best], best) : kNoRoom;
            int j = leaves + best;
            tree[j] = k;
            for (; j > 1; j /= 2) {
                k = std::min(k, tree[j ^ 1]);
                tree[j / 2] = k;
            }
        }
    }
}

void balanced_packing(const float* w, int n, int m, int* pack, int* rank) {
    thread_local std::vector<int> order;
    if (n / m > 1) order_descending(w, n, order);
    balanced_packing(w, order.data(), n, m, pack, rank);
}

// The divisor method shared by DeepSeek's replication and moelb's counts: `extra` further replicas
// go one at a time to the item with the largest key(i, count) = weight(i) / count (ties to the
// lower i), never beyond `cap` replicas. count[0, n) starts at 1; each extra is reported through
// give(i) in order.
//
// The items are the leaves of a tournament tree of integer keys (key bits, complemented item):
// keys are >= +0, so their bits order like their values, and equal keys go to the lower item. The
// root is the largest; a capped item's leaf is 0. Taking the larger of two integers needs no
// branch, where comparing (key, item) pairs mispredicts on random loads.
//
// Returns the largest key left (w / count of the items below the cap; they are its candidates, so
// it is the largest w / count of all items when none reached the cap), -1 if no extra was given or
// every item reached the cap.
template <typename T, typename Weight, typename Give>
T divisor_method(int n, int extra, int cap, const Weight& weight, int* count, const Give& give) {
    if (extra <= 0) return T(-1);
    using Bits = std::conditional_t<sizeof(T) == 8, std::uint64_t, std::uint32_t>;
    using Key = std::conditional_t<sizeof(T) == 8, Uint128, std::uint64_t>;
    static_assert(sizeof(T) == sizeof(Bits));
    constexpr std::uint32_t kLow = 0xffffffffu;
    const auto key = [&](int i) {
        // (Dividing by a count of 1 is exact: no branch.)
        const T v = static_cast<T>(weight(i)) / static_cast<T>(count[i]) + T(0);  // -0 -> +0
        Bits bits;
        std::memcpy(&bits, &v, sizeof bits);
        return (static_cast<Key>(bits) << 32) | (kLow - static_cast<std::uint32_t>(i));
    };
    int leaves = 1;
    while (leaves < n) leaves *= 2;
    thread_local std::vector<Key> tree;
    tree.resize(2 * static_cast<std::size_t>(leaves));
    for (int i = 0; i < n; ++i) tree[leaves + i] = key(i);  // (no branch: vectorises)
    for (int i = 0; i < n; ++i) {
        if (count[i] >= cap) tree[leaves + i] = Key{0};
    }
    for (int i = n; i < leaves; ++i) tree[leaves + i] = Key{0};
    for (int j = leaves - 1; j >= 1; --j) tree[j] = std::max(tree[2 * j], tree[2 * j + 1]);
    for (int s = 0; s < extra && tree[1] != Key{0}; ++s) {  // stops if every item is capped
        const int i = static_cast<int>(kLow - static_cast<std::uint32_t>(tree[1]));
        give(i);
        ++count[i];
        // Up from the leaf, carrying the new maximum (a register, not a reload of the store).
        Key k = count[i] < cap ? key(i) : Key{0};
        int j = leaves + i;
        tree[j] = k;
        for (; j > 1; j /= 2) {
            k = std::max(k, tree[j ^ 1]);
            tree[j / 2] = k;
        }
    }
    if (tree[1] == Key{0}) return T(-1);
    const Bits bits = static_cast<Bits>(tree[1] >> 32);
    T largest;
    std::memcpy(&largest, &bits, sizeof largest);
    return largest;
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
    // Scratch reused across layers (deepseek_layer runs once per layer).
    thread_local std::vector<float> group_load, node_w, replica_w;
    thread_local std::vector<int> group_pack, group_rank, mlog2log, phy2mlog, phy_rank, mlog_count,
        node_order, order, pack, rank;
    group_load.resize(static_cast<std::size_t>(K));
    // Each group's sum in index order, the groups side by side (independent additions overlap).
    thread_local std::vector<double> group_sum;
    group_sum.assign(static_cast<std::size_t>(K), 0.0);
    for (int j = 0; j < group_size; ++j) {
        for (int g = 0; g < K; ++g) group_sum[g] += w[g * group_size + j];
    }
    for (int g = 0; g < K; ++g) group_load[g] = static_cast<float>(group_sum[g]);
    group_pack.resize(static_cast<std::size_t>(K));
    group_rank.resize(group_pack.size());
    balanced_packing(group_load.data(), K, N, group_pack.data(), group_rank.data());
    mlog2log.resize(static_cast<std::size_t>(E));
    for (int g = 0; g < K; ++g) {
        const int first = (group_pack[g] * groups_per_node + group_rank[g]) * group_size;
        for (int j = 0; j < group_size; ++j) mlog2log[first + j] = g * group_size + j;
    }
    // Per node: replicate, then pack the replicas (all nodes' packings at once).
    node_w.resize(static_cast<std::size_t>(experts_per_node));
    mlog_count.resize(node_w.size());
    phy2mlog.resize(static_cast<std::size_t>(R));
    phy_rank.resize(phy2mlog.size());
    replica_w.resize(phy2mlog.size());
    order.resize(phy2mlog.size());
    pack.resize(phy2mlog.size());
    rank.resize(phy2mlog.size());
    for (int n = 0; n < N; ++n) {
        for (int i = 0; i < experts_per_node; ++i) {
            node_w[i] = w[mlog2log[n * experts_per_node + i]];
        }
        int* node_phy2mlog = phy2mlog.data() + n * slots_per_node;
        replicate_experts(node_w.data(), experts_per_node, slots_per_node, node_phy2mlog,
                          phy_rank.data(), mlog_count.data());
        for (int i = 0; i < experts_per_node; ++i) {
            node_w[i] = node_w[i] / static_cast<float>(mlog_count[i]) + 0.0f;  // per replica
        }
        float* node_replica_w = replica_w.data() + n * slots_per_node;
        for (int j = 0; j < slots_per_node; ++j) node_replica_w[j] = node_w[node_phy2mlog[j]];
        if (slots_per_node > gpus_per_node &&
            !replica_order(node_w.data(), mlog_count.data(), node_phy2mlog, experts_per_node,
                           slots_per_node, order.data() + n * slots_per_node)) {
            order_descending(node_replica_w, slots_per_node, node_order);
            std::copy(node_order.begin(), node_order.end(), order.begin() + n * slots_per_node);
        }
    }
    balanced_packing(replica_w.data(), order.data(), slots_per_node, gpus_per_node, pack.data(),
                     rank.data(), N);
    for (int n = 0; n < N; ++n) {
        for (int j = n * slots_per_node; j < (n + 1) * slots_per_node; ++j) {
            const int slot = n * slots_per_node + pack[j] * S + rank[j];
            phy2log[slot] = mlog2log[n * experts_per_node + phy2mlog[j]];
        }
    }
}

// =============================================================================================
// moelb's planner.
// =============================================================================================

constexpr double kRelTol = 1e-12;
constexpr double kTargetTol = 1e-9;
constexpr double kBoundMargin = 1e-9;  // a bound this far above a load is above it despite rounding
constexpr int kCountSearchBudget = 2;  // repacks per layer in search_counts
constexpr std::int64_t kSmallLayerWork = 1 << 16;  // E^4 * R up to which search_all_counts runs
// assign_groups memoises node costs per subset of groups (a bitmask) up to this many groups.
constexpr int kMaxMemoGroups = 12;

// Divisor-method replica counts count[0, n) for experts[0, n) (loads w) over `slots` slots, each
// expert at most `cap` replicas (when slots allow): minimises the largest per-replica load. Ties
// go to the earlier expert in the list.
void divisor_counts(const double* w, const int* experts, int n, int slots, int cap, int* count) {
    std::fill(count, count + n, 1);
    if (static_cast<Index>(cap) * n < slots) cap = (slots + n - 1) / n;  // cannot honour the cap
    divisor_method<double>(
        n, slots - n, cap, [&](int i) { return w[experts[i]]; }, count, [](int) {});
}

// The flat lower bound of a layer: no placement of E experts (loads w) on `slots` slots of
// `gpus` GPUs has a lower maximum GPU load than max(total / gpus, the divisor method's largest
// per-replica load). With `counts`, count holds the divisor method's counts behind the bound for
// all experts over all slots; else it is scratch.
double flat_lower_bound(const double* w, int E, int slots, int gpus, std::vector<int>& count,
                        bool counts = false) {
    double total = 0.0;
    for (int e = 0; e < E; ++e) total += w[e];
    const double mean = total / gpus;
    // Often the mean decides: when some counts (summing to at most `slots`) bring every w / count
    // to the mean or below, so does the divisor method's optimum (it minimises the largest
    // w / count, in floating point too, since w / c rounds monotonically in c). Each expert needs
    // the fewest replicas c with w / c <= mean.
    if (mean > 0 && !counts) {
        Index needed = 0;
        for (int e = 0; e < E && needed <= slots; ++e) {
            if (w[e] <= mean) {
                ++needed;
                continue;
            }
            const double q = std::ceil(w[e] / mean);
            if (q > slots) {
                needed = Index{slots} + 1;
                break;
            }
            int c = std::max(1, static_cast<int>(q));
            while (w[e] / c > mean) ++c;
            while (c > 1 && w[e] / (c - 1) <= mean) --c;
            needed += c;
        }
        if (needed <= slots) return mean;
    }
    count.assign(static_cast<std::size_t>(E), 1);
    // The largest per-replica load: the method's largest key left (w / count, as below), unless
    // it gave no extra or capped an item.
    double m = divisor_method<double>(
        E, slots - E, slots, [w](int i) { return w[i]; }, count.data(), [](int) {});
    if (m < 0) {
        m = 0.0;
        for (int e = 0; e < E; ++e) m = std::max(m, w[e] / count[e]);
    }
    return std::max(mean, m);
}

// Sorts items by keys ascending, keeping the given order among equal keys (both arrays are
// permuted). Comparisons of random loads mispredict, so: a least significant digit radix sort on
// the keys' high halves (8 bits a pass, each stable, skipping digits all keys share), then an
// insertion sort on the whole keys, which only moves items within the (rare, short) runs of equal
// high halves.
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

// The complement of a load's bits: ascending keys order loads descending (non-negative doubles
// order like their bits; -0 is normalised to +0).
std::uint64_t descending_key(double load) {
    std::uint64_t bits;
    const double v = load + 0.0;
    std::memcpy(&bits, &v, sizeof bits);
    return ~bits;
}

struct PackScratch;

// Replicas packed into bins (GPUs) of `size` slots. Bins come in domains (nodes) of
// bins_per_domain consecutive bins; every expert's replicas live in one domain and swaps stay
// inside a domain. All replicas of an expert carry the same load (its load / its replica count),
// so a slot only records its expert. Flat arrays, reused from packing to packing.
struct Packing {
    int size = 0;  // slots per bin
    int num_bins = 0;
    int bins_per_domain = 0;
    std::vector<int> slot_expert;      // [num_bins * size]: bin b's experts at [b * size, ...)
    std::vector<double> bin_load;      // [num_bins]
    std::vector<int> count;            // [E]: replicas of each expert
    std::vector<double> replica_load;  // [E]: load of one replica
    std::vector<int> domain_of;        // [E]: the domain of each expert's replicas
    // LPT's order: each domain's experts by (replica load desc, expert asc), domain d's at
    // [order_offset[d], order_offset[d + 1]). Kept up to date by change_count once sorted.
    std::vector<int> order, order_offset;
    bool order_valid = false;

    int num_experts() const { return static_cast<int>(count.size()); }
    int num_domains() const { return num_bins / bins_per_domain; }
    int domain(int b) const { return b / bins_per_domain; }
    const int* bin(int b) const { return slot_expert.data() + static_cast<Index>(b) * size; }
    int* bin(int b) { return slot_expert.data() + static_cast<Index>(b) * size; }

    bool holds(int b, int expert) const {
        const int* s = bin(b);
        for (int k = 0; k < size; ++k) {
            if (s[k] == expert) return true;
        }
        return false;
    }

    double max_load() const {
        return bin_load.empty() ? 0.0 : *std::max_element(bin_load.begin(), bin_load.end());
    }

    // Bins of `size` slots in domains of bins_per_domain, for `experts` experts.
    void reset(int num_bins_, int bins_per_domain_, int size_, int experts) {
        num_bins = num_bins_;
        bins_per_domain = bins_per_domain_;
        size = size_;
        slot_expert.resize(static_cast<std::size_t>(num_bins) * size);
        bin_load.assign(static_cast<std::size_t>(num_bins), 0.0);
        count.resize(static_cast<std::size_t>(experts));
        replica_load.resize(static_cast<std::size_t>(experts));
        domain_of.resize(static_cast<std::size_t>(experts));
        order_valid = false;
    }

    void compute_replica_loads(const double* w) {
        for (int e = 0; e < num_experts(); ++e) {
            replica_load[e] = count[e] > 0 ? w[e] / count[e] : 0.0;
        }
    }

    // The sum of each bin's replica loads, in slot order.
    void recompute_loads() {
        for (int b = 0; b < num_bins; ++b) {
            double load = 0.0;
            for (int k = 0; k < size; ++k) load += replica_load[bin(b)[k]];
            bin_load[b] = load;
        }
    }

    void sort_order(PackScratch& s);
    void change_count(int e, int delta, const double* w);
    void lpt(PackScratch& s);
    void repair_duplicates(double limit, PackScratch& s);
    void swap_search(double target, PackScratch& s);
    struct Swap {
        int b = -1, xi = -1, yi = -1;  // bin(a)[xi] <-> bin(b)[yi]; b < 0: none
        bool tied = false;             // another partner offers an equally good swap
    };
    Swap best_swap(int a, double limit, const int* by_load, int first, int last,
                   PackScratch& s) const;

    // Swaps x = bin(a)[xi] with y = bin(b)[yi] when allowed by the no-duplicate rule.
    bool swap_allowed(int a, int xi, int b, int yi) const {
        const int ex = bin(a)[xi], ey = bin(b)[yi];
        if (ex == ey) return false;  // changes nothing
        for (int k = 0; k < size; ++k) {
            if (k != yi && bin(b)[k] == ex) return false;
        }
        for (int k = 0; k < size; ++k) {
            if (k != xi && bin(a)[k] == ey) return false;
        }
        return true;
    }

    void apply_swap(int a, int xi, int b, int yi) {
        const int x = bin(a)[xi], y = bin(b)[yi];
        bin(a)[xi] = y;
        bin(b)[yi] = x;
        const double d = replica_load[x] - replica_load[y];
        bin_load[a] -= d;
        bin_load[b] += d;
    }
};

// Scratch buffers of the packing steps, reused across calls (one per thread).
struct PackScratch {
    std::vector<int> fill, held, partners, mark, sorted, position, tie_key;
    std::vector<Uint128> tree;        // lpt
    std::vector<std::uint64_t> keys;  // sort_order
    std::vector<int> items;
    // swap_search: the replica load of each slot, bin b's at [b * load_stride, ...) padded with
    // +inf to a multiple of kLanes (a padding "replica" never makes a useful swap).
    std::vector<double> slot_load;
    int load_stride = 0;
    // The same in float32 (kFloatLanes to a vector), for a quicker first test when the loads are
    // in a range where float32's rounding stays far below its margin (use_float).
    std::vector<float> slot_load32;
    int load_stride32 = 0;
    bool use_float = false;
    int stamp = 0;
    // Duplicate scans: in_bin[e] == bin_stamp marks the experts of the bin being scanned (a new
    // stamp per scan, so a scan costs its slots, not their square); dup_slots lists its slots
    // whose expert sits in an earlier slot.
    std::vector<int> in_bin, dup_slots;
    int bin_stamp = 0;
    // trial_lower_bound: a domain's replicas before and after a trial's move.
    struct Replicas {
        double load;  // of one replica
        int count;
        int expert;
    };
    std::vector<Replicas> bound_base, bound_values;

    // Starts a bin scan over `experts` experts; returns its stamp.
    int next_bin_stamp(std::size_t experts) {
        if (in_bin.size() != experts) {
            in_bin.assign(experts, 0);
            bin_stamp = 0;
        }
        if (++bin_stamp == std::numeric_limits<int>::max()) {
            std::fill(in_bin.begin(), in_bin.end(), 0);
            bin_stamp = 1;
        }
        return bin_stamp;
    }
    // Marks the experts of the `size` slots at `slots`; fills dup_slots. Returns the stamp.
    int scan_bin(const int* slots, int size, std::size_t experts) {
        const int stamp = next_bin_stamp(experts);
        dup_slots.clear();
        for (int i = 0; i < size; ++i) {
            if (in_bin[slots[i]] == stamp) {
                dup_slots.push_back(i);
            } else {
                in_bin[slots[i]] = stamp;
            }
        }
        return stamp;
    }
};

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
// domain so that both end below its load, do the best such swap. Stops at `target` (a lower
// bound: nothing below it is reachable).
//
// The partners of the heaviest bin a are the bins of its domain lighter than it. The
// kFirstPartners lightest (by load, then index) are tried first, ties between equally good swaps
// to the lower bin; only if none helps, all the others, ties to the earlier partner in the order
// std::nth_element left them in (the selection of the first round over the partners in index
// order). Each domain's bins are kept sorted by (load, index) across swaps, so the partners are a
// prefix of that order, lightest first.
void Packing::swap_search(double target, PackScratch& s) {
    constexpr int kFirstPartners = 16;
    const int max_iterations = 20 * num_bins + 100;
    const auto lighter = [&](int x, int y) {
        return bin_load[x] < bin_load[y] || (bin_load[x] == bin_load[y] && x < y);
    };
    s.sorted.resize(static_cast<std::size_t>(num_bins));
    s.position.resize(static_cast<std::size_t>(num_bins));
    for (int d = 0; d < num_domains(); ++d) {
        const auto first = s.sorted.begin() + static_cast<Index>(d) * bins_per_domain;
        std::iota(first, first + bins_per_domain, d * bins_per_domain);
        std::sort(first, first + bins_per_domain, lighter);
    }
    for (int i = 0; i < num_bins; ++i) s.position[s.sorted[i]] = i;
    s.load_stride = (size + kLanes - 1) / kLanes * kLanes;
    s.slot_load.assign(static_cast<std::size_t>(num_bins) * s.load_stride,
                       std::numeric_limits<double>::infinity());
    for (int b = 0; b < num_bins; ++b) {
        for (int k = 0; k < size; ++k) {
            s.slot_load[static_cast<Index>(b) * s.load_stride + k] = replica_load[bin(b)[k]];
        }
    }
    // Loads from kFloatMin to kFloatMax (the largest bin's; the limit only falls, and a search
    // stops at the target, which is at least the mean): float32 keeps them to ~6e-8 relative.
    const double top = max_load();
    s.use_float = top <= kFloatMax && target >= kFloatMin;
    if (s.use_float) {
        s.load_stride32 = (size + kFloatLanes - 1) / kFloatLanes * kFloatLanes;
        s.slot_load32.assign(static_cast<std::size_t>(num_bins) * s.load_stride32,
                             std::numeric_limits<float>::infinity());
        for (int b = 0; b < num_bins; ++b) {
            for (int k = 0; k < size; ++k) {
                s.slot_load32[static_cast<Index>(b) * s.load_stride32 + k] =
                    static_cast<float>(replica_load[bin(b)[k]]);
            }
        }
    }
    // Restores the order after bin b's load changed.
    const auto resort = [&](int b) {
        const int lo = domain(b) * bins_per_domain, hi = lo + bins_per_domain;
        int i = s.position[b];
        while (i > lo && lighter(b, s.sorted[i - 1])) {
            s.sorted[i] = s.sorted[i - 1];
            s.position[s.sorted[i]] = i;
            --i;
        }
        while (i + 1 < hi && lighter(s.sorted[i + 1], b)) {
            s.sorted[i] = s.sorted[i + 1];
            s.position[s.sorted[i]] = i;
            ++i;
        }
        s.sorted[i] = b;
        s.position[b] = i;
    };
    for (int it = 0; it < max_iterations; ++it) {
        // The heaviest bin a (ties to the lower bin): each domain's heaviest bins end its sorted
        // order, the lower bin first. Its partners, the lighter bins, come before them.
        int a = -1, n = 0;  // partners: by_load[0, n)
        for (int d = 0; d < num_domains(); ++d) {
            const int* order = s.sorted.data() + static_cast<Index>(d) * bins_per_domain;
            int k = bins_per_domain - 1;
            const double top = bin_load[order[k]];
            while (k > 0 && bin_load[order[k - 1]] == top) --k;
            if (a < 0 || top > bin_load[a]) {
                a = order[k];
                n = k;
            }
        }
        const double limit = bin_load[a];
        if (limit <= target * (1 + kTargetTol)) return;
        const int* by_load = s.sorted.data() + static_cast<Index>(domain(a)) * bins_per_domain;
        // Round one: ties to the lower bin.
        s.tie_key.resize(static_cast<std::size_t>(num_bins));
        for (int k = 0; k < std::min(n, kFirstPartners); ++k) s.tie_key[by_load[k]] = by_load[k];
        Swap best = best_swap(a, limit, by_load, 0, std::min(n, kFirstPartners), s);
        if (best.b < 0 && n > kFirstPartners) {
            for (int k = kFirstPartners; k < n; ++k) s.tie_key[by_load[k]] = by_load[k];
            best = best_swap(a, limit, by_load, kFirstPartners, n, s);
            if (best.tied) {
                // Equally good swaps with different bins: the winner is the earlier partner in
                // std::nth_element's order, so rebuild that order and search again.
                s.partners.clear();
                for (int b = domain(a) * bins_per_domain; b < (domain(a) + 1) * bins_per_domain;
                     ++b) {
                    if (b != a && bin_load[b] < limit) s.partners.push_back(b);
                }
                std::nth_element(s.partners.begin(), s.partners.begin() + kFirstPartners,
                                 s.partners.end(), lighter);
                for (int k = kFirstPartners; k < n; ++k) s.tie_key[s.partners[k]] = k;
                best = best_swap(a, limit, by_load, kFirstPartners, n, s);
            }
        }
        if (best.b < 0) return;
        apply_swap(a, best.xi, best.b, best.yi);
        std::swap(s.slot_load[static_cast<Index>(a) * s.load_stride + best.xi],
                  s.slot_load[static_cast<Index>(best.b) * s.load_stride + best.yi]);
        if (s.use_float) {
            std::swap(s.slot_load32[static_cast<Index>(a) * s.load_stride32 + best.xi],
                      s.slot_load32[static_cast<Index>(best.b) * s.load_stride32 + best.yi]);
        }
        resort(a);
        resort(best.b);
    }
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

// The best swap between bin a (load limit) and the partners by_load[first, last) (ascending load):
// the one that lowers max(load a, load b) the most below limit, ties to the smallest (tie_key of
// the partner, a's slot, b's slot). Reports whether the best was tied with another partner's.
//
// A swap with b cannot end below (limit + load b) / 2, so once that exceeds the best found (with a
// margin far above rounding), no heavier partner can win, not even a tie. Most partners offer no
// swap at or below the best so far: a branch-free pass over all their pairs, kLanes of b's slots
// at a time, tests that first, with a condition the exact pass's implies (load differences in an
// interval widened by a margin), so it only skips partners the exact pass would skip.
Packing::Swap Packing::best_swap(int a, double limit, const int* by_load, int first, int last,
                                 PackScratch& s) const {
    constexpr double kBoundSlack = 1e-12;  // relative; rounding moves m by ~1e-16
    const double* a_loads = s.slot_load.data() + static_cast<Index>(a) * s.load_stride;
    double best = limit * (1 - kRelTol);
    Swap out;
    for (int k = first; k < last; ++k) {
        const int b = by_load[k];
        const double load_b = bin_load[b];
        if ((limit + load_b) * 0.5 * (1 - kBoundSlack) > best) break;
        const double* b_loads = s.slot_load.data() + static_cast<Index>(b) * s.load_stride;
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
                    s.slot_load32.data() + static_cast<Index>(a) * s.load_stride32,
                    s.slot_load32.data() + static_cast<Index>(b) * s.load_stride32, size,
                    s.load_stride32, static_cast<float>(lower) - slack,
                    static_cast<float>(upper) + slack)) {
                continue;
            }
        } else if (!any_difference_in<Lanes>(a_loads, b_loads, size, s.load_stride, lower, upper)) {
            continue;
        }
        // The exact pass, in the same order (a's slot, then b's) over the pairs the test passes
        // (with the best as it is by then).
        for (int xi = 0; xi < size; ++xi) {
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
                    if (!swap_allowed(a, xi, b, yi)) continue;
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

// Packs p.count replicas of each expert into the bins of its domain p.domain_of: LPT, duplicate
// repair, swap search down to `target`.
void pack_counts(Packing& p, const double* w, double target, PackScratch& s) {
    if (!p.order_valid) {
        p.compute_replica_loads(w);
        p.sort_order(s);
    }
    p.lpt(s);
    p.repair_duplicates(p.max_load(), s);
    p.swap_search(target, s);
}

// The number of experts of `p` with two replicas on one bin although they have no more replicas
// than their domain has bins (so the duplicate could be avoided); *first (if given) is the
// smallest such expert.
int avoidable_duplicates(const Packing& p, PackScratch& s, int* first = nullptr) {
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

// The replica-count search of small layers (E^4 * R <= kSmallLayerWork): any expert of a domain
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

// The packing of an existing layer placement (slot -> expert), with equal-split loads; bins in
// `domains` domains of consecutive GPUs.
void packing_of(Packing& p, const double* w, const std::int32_t* phy2log, int E, int R, int G,
                int domains) {
    p.reset(G, G / domains, R / G, E);
    std::fill(p.count.begin(), p.count.end(), 0);
    const int slots_per_domain = p.size * p.bins_per_domain;
    for (int s = 0; s < R; ++s) {
        p.slot_expert[s] = phy2log[s];
        ++p.count[phy2log[s]];
    }
    for (int d = 0; d < domains; ++d) {
        for (int s = d * slots_per_domain; s < (d + 1) * slots_per_domain; ++s) {
            p.domain_of[phy2log[s]] = d;
        }
    }
    p.compute_replica_loads(w);
    p.recompute_loads();
}

// Scratch of assign_groups: a node's cost depends only on its set of groups, so costs are
// memoised per group bitmask (when there are few groups) for the duration of one call.
struct GroupScratch {
    std::vector<double> group_load, cost, memo;
    std::vector<unsigned> memo_stamp;
    unsigned stamp = 0;
    std::vector<int> order, count, groups, by_weight, head, top, replicas, experts;
    std::vector<std::uint64_t> keys;
};

// Node-locality estimate of a node's best max GPU load: max(load / GPUs, best per-replica max),
// for the node holding groups[0, num_groups) (ascending) of gs experts each. by_weight: each
// group's experts by (load desc, expert asc).
//
// The best per-replica max is that of the divisor method (capped at the node's GPUs), computed on
// the heaviest experts only: an expert gets its first extra replica only once every heavier one
// (ties: lower id) has one, so only the `extra` heaviest can get any, and the others keep their
// load as their replica's. The result equals running the method on all of the node's experts.
double node_cost(const double* w, const int* groups, int num_groups, int gs, const int* by_weight,
                 int slots, int gpus, GroupScratch& s) {
    if (num_groups == 0) return 0.0;
    const int n = num_groups * gs;
    double total = 0.0;  // in ascending expert order, as a sum over the node's experts
    for (int i = 0; i < num_groups; ++i) {
        for (int j = 0; j < gs; ++j) total += w[groups[i] * gs + j];
    }
    const int extra = slots - n;
    int cap = gpus;
    if (static_cast<Index>(cap) * n < slots) cap = (slots + n - 1) / n;  // cannot honour the cap
    const int t = std::clamp(extra, 0, n);  // the experts that can get extras
    const int take = std::min(t + 1, n);    // ... and the heaviest of the others
    // The `take` heaviest by (load desc, expert asc): a merge of the groups' sorted lists.
    s.head.assign(static_cast<std::size_t>(num_groups), 0);
    s.top.clear();
    for (int k = 0; k < take; ++k) {
        int best = -1, best_e = -1;
        for (int i = 0; i < num_groups; ++i) {
            if (s.head[i] == gs) continue;
            const int e = by_weight[groups[i] * gs + s.head[i]];
            if (best < 0 || w[e] > w[best_e] || (w[e] == w[best_e] && e < best_e)) {
                best = i;
                best_e = e;
            }
        }
        ++s.head[best];
        s.top.push_back(best_e);
    }
    // The divisor method on the t heaviest, never beyond cap. Its ties go to the earlier of the t
    // (not the lower expert), which does not change the value: every order of equally good
    // choices reaches the same smallest largest w / count.
    s.replicas.assign(static_cast<std::size_t>(t), 1);
    divisor_method<double>(
        t, extra, cap, [&](int i) { return w[s.top[i]]; }, s.replicas.data(), [](int) {});
    double m = take > t ? w[s.top[t]] : 0.0;
    for (int i = 0; i < t; ++i) m = std::max(m, w[s.top[i]] / s.replicas[i]);
    return std::max(total / gpus, m);
}

// Groups -> nodes for node locality: DeepSeek's balanced packing of group loads when K % N == 0
// (else LPT under capacity), then moves and swaps of groups between nodes that lower the largest
// node cost. Every node must end with at least one group and at most slots_per_node experts.
// Writes node[0, K).
void assign_groups(const double* w, int E, int K, int N, int slots_per_node, int gpus_per_node,
                   GroupScratch& s, int* node) {
    const int gs = E / K;
    const int max_groups = slots_per_node / gs;
    s.group_load.assign(static_cast<std::size_t>(K), 0.0);
    for (int g = 0; g < K; ++g) {
        for (int j = 0; j < gs; ++j) s.group_load[g] += w[g * gs + j];
    }
    // Each group's experts by (load desc, expert asc): all experts sorted, then a stable pass by
    // group.
    s.keys.resize(static_cast<std::size_t>(E));
    s.experts.resize(static_cast<std::size_t>(E));
    for (int e = 0; e < E; ++e) {
        s.keys[e] = descending_key(w[e]);
        s.experts[e] = e;
    }
    stable_sort_by_key(s.keys, s.experts);
    s.by_weight.resize(static_cast<std::size_t>(E));
    s.head.assign(static_cast<std::size_t>(K), 0);
    for (const int e : s.experts) s.by_weight[e / gs * gs + s.head[e / gs]++] = e;
    s.order.resize(static_cast<std::size_t>(K));
    std::iota(s.order.begin(), s.order.end(), 0);
    std::stable_sort(s.order.begin(), s.order.end(),
                     [&](int a, int b) { return s.group_load[a] > s.group_load[b]; });
    // Every node gets one group first (heaviest groups spread), then LPT with capacity.
    std::vector<double>& cost = s.cost;
    cost.assign(static_cast<std::size_t>(N), 0.0);  // the node loads, then their costs
    s.count.assign(static_cast<std::size_t>(N), 0);
    const int per_node = (K % N == 0 && K / N <= max_groups) ? K / N : max_groups;
    for (int i = 0; i < K; ++i) {
        const int g = s.order[i];
        int best = -1;
        for (int n = 0; n < N; ++n) {
            const bool must_fill = i < N;
            if (must_fill && s.count[n] > 0) continue;
            if (s.count[n] >= per_node) continue;
            if (best < 0 || cost[n] < cost[best]) best = n;
        }
        node[g] = best;
        ++s.count[best];
        cost[best] += s.group_load[g];
    }
    const bool memo = K <= kMaxMemoGroups;
    if (memo) {
        const std::size_t size = std::size_t{1} << K;
        if (s.memo.size() < size) {
            s.memo.resize(size);
            s.memo_stamp.assign(size, 0);
            s.stamp = 0;
        }
        if (++s.stamp == 0) {  // wrapped: forget every stamp
            std::fill(s.memo_stamp.begin(), s.memo_stamp.end(), 0);
            s.stamp = 1;
        }
    }
    // The cost of node n when group g1 goes to node n1 and group g2 (if >= 0) to node n2.
    const auto cost_of = [&](int n, int g1, int n1, int g2, int n2) {
        const auto on = [&](int g) { return g == g1 ? n1 : g == g2 ? n2 : node[g]; };
        std::uint64_t mask = 0;
        if (memo) {
            for (int g = 0; g < K; ++g) {
                if (on(g) == n) mask |= std::uint64_t{1} << g;
            }
            if (s.memo_stamp[mask] == s.stamp) return s.memo[mask];
        }
        s.groups.clear();
        for (int g = 0; g < K; ++g) {
            if (on(g) == n) s.groups.push_back(g);
        }
        const double c = node_cost(w, s.groups.data(), static_cast<int>(s.groups.size()), gs,
                                   s.by_weight.data(), slots_per_node, gpus_per_node, s);
        if (memo) {
            s.memo[mask] = c;
            s.memo_stamp[mask] = s.stamp;
        }
        return c;
    };
    for (int n = 0; n < N; ++n) cost[n] = cost_of(n, -1, -1, -1, -1);
    for (int it = 0; it < 4 * K * N + 16; ++it) {
        const int a = static_cast<int>(std::max_element(cost.begin(), cost.end()) - cost.begin());
        double best = cost[a] * (1 - kTargetTol);
        double best_ca = 0.0, best_cb = 0.0;
        int best_b = -1, best_g = -1, best_h = -1;
        for (int g = 0; g < K; ++g) {
            if (node[g] != a) continue;
            for (int b = 0; b < N; ++b) {
                if (b == a) continue;
                // Keeps the trial (g to b, and h to a if h >= 0) if it lowers the larger of the
                // two nodes' costs the most so far.
                const auto consider = [&](int h) {
                    const double ca = cost_of(a, g, b, h, a);
                    const double cb = cost_of(b, g, b, h, a);
                    if (std::max(ca, cb) < best) {
                        best = std::max(ca, cb);
                        best_ca = ca;
                        best_cb = cb;
                        best_b = b;
                        best_g = g;
                        best_h = h;
                    }
                };
                if (s.count[a] > 1 && s.count[b] < max_groups) consider(-1);  // move g to b
                for (int h = 0; h < K; ++h) {  // swap g with a group h of b
                    if (node[h] == b) consider(h);
                }
            }
        }
        if (best_b < 0) break;
        node[best_g] = best_b;
        if (best_h >= 0) node[best_h] = a;
        std::fill(s.count.begin(), s.count.end(), 0);
        for (int g = 0; g < K; ++g) ++s.count[node[g]];
        cost[a] = best_ca;
        cost[best_b] = best_cb;
    }
}

// Writes a packing's bins as slots: bin b -> GPU b, experts in bin order.
void write_slots(const Packing& p, std::int32_t* phy2log) {
    std::copy(p.slot_expert.begin(), p.slot_expert.end(), phy2log);
}

// Greedy maximum-overlap matching of `count` new blocks to `count` old blocks of `width` slots
// each (new block a: cur[a * width, (a + 1) * width), old block b likewise in old; expert ids in
// [0, E)). The overlap of two blocks is the size of their multiset intersection. The result is
// the greedy over every pair with a positive overlap sorted by (-overlap, a, b): a pair is taken
// when both blocks are still free; new blocks left over take the free old blocks in order.
// Returns the old block of each new block.
//
// Computed sparsely instead of over all count^2 pairs (each copied and sorted):
// - each block's slots are sorted once into (expert, multiplicity) runs, and the old blocks are
//   indexed by expert (the blocks holding e, with e's multiplicity there, in block order);
// - overlaps are accumulated only through shared experts, and only pairs of overlap >= 2 are
//   listed and sorted;
// - overlap-1 pairs are never listed: once every pair of overlap >= 2 is decided, no such pair
//   has both blocks free, so the first free old block sharing any expert with new block a is the
//   first free overlap-1 partner the sorted greedy would give it. Blocks only become used, so one
//   cursor per expert walks its block list once.
// Time: O(P log width) for the P = count * width slots, plus the accumulation, sum over experts
// of (new blocks holding e) x (old blocks holding e): O(P) when replicas are few, up to the
// square of a hot expert's replica count (a few 100,000 additions at 4,096 slots).
std::vector<int> match_blocks(const std::int32_t* cur, const std::int32_t* old, int count,
                              int width, int E) {
    const auto n = static_cast<std::size_t>(count);
    // Run-length (expert, multiplicity) lists of each block's sorted slots, in CSR form.
    struct Runs {
        std::vector<int> first;  // [count + 1]
        std::vector<std::int32_t> expert;
        std::vector<int> times;
    };
    std::vector<std::int32_t> sorted(static_cast<std::size_t>(width));
    auto runs_of = [&](const std::int32_t* blocks) {
        Runs r;
        r.first.assign(n + 1, 0);
        for (int a = 0; a < count; ++a) {
            const std::int32_t* block = blocks + static_cast<Index>(a) * width;
            std::copy(block, block + width, sorted.begin());
            std::sort(sorted.begin(), sorted.end());
            for (int i = 0; i < width;) {
                int j = i + 1;
                while (j < width && sorted[j] == sorted[i]) ++j;
                r.expert.push_back(sorted[i]);
                r.times.push_back(j - i);
                i = j;
            }
            r.first[a + 1] = static_cast<int>(r.expert.size());
        }
        return r;
    };
    const Runs fresh = runs_of(cur);
    const Runs prior = runs_of(old);
    // The old blocks holding each expert, in block order, with the expert's multiplicity there.
    std::vector<int> holders_first(static_cast<std::size_t>(E) + 1, 0);
    for (const std::int32_t e : prior.expert) ++holders_first[e + 1];
    std::partial_sum(holders_first.begin(), holders_first.end(), holders_first.begin());
    std::vector<int> holder(prior.expert.size()), holder_times(prior.expert.size());
    {
        std::vector<int> fill(holders_first.begin(), holders_first.end() - 1);
        for (int b = 0; b < count; ++b) {
            for (int i = prior.first[b]; i < prior.first[b + 1]; ++i) {
                const int k = fill[prior.expert[i]]++;
                holder[k] = b;
                holder_times[k] = prior.times[i];
            }
        }
    }
    // Pairs of overlap >= 2, counted through the experts they share.
    std::vector<std::tuple<int, int, int>> pairs;  // (-overlap, new, old)
    std::vector<int> overlap(n, 0);
    std::vector<int> touched;
    for (int a = 0; a < count && width >= 2; ++a) {  // one-slot blocks overlap by at most 1
        for (int i = fresh.first[a]; i < fresh.first[a + 1]; ++i) {
            const std::int32_t e = fresh.expert[i];
            for (int k = holders_first[e]; k < holders_first[e + 1]; ++k) {
                const int b = holder[k];
                if (overlap[b] == 0) touched.push_back(b);
                overlap[b] += std::min(fresh.times[i], holder_times[k]);
            }
        }
        for (const int b : touched) {
            if (overlap[b] >= 2) pairs.emplace_back(-overlap[b], a, b);
            overlap[b] = 0;
        }
        touched.clear();
    }
    std::sort(pairs.begin(), pairs.end());
    std::vector<int> target(n, -1);
    std::vector<bool> used(n, false);
    for (const auto& [o, a, b] : pairs) {
        if (target[a] < 0 && !used[b]) {
            target[a] = b;
            used[b] = true;
        }
    }
    // Overlap 1: the first free old block sharing an expert, new blocks in order.
    std::vector<int> cursor(holders_first.begin(), holders_first.end() - 1);
    for (int a = 0; a < count; ++a) {
        if (target[a] >= 0) continue;
        int best = count;
        for (int i = fresh.first[a]; i < fresh.first[a + 1]; ++i) {
            const std::int32_t e = fresh.expert[i];
            int& k = cursor[e];
            while (k < holders_first[e + 1] && used[holder[k]]) ++k;
            if (k < holders_first[e + 1]) best = std::min(best, holder[k]);
        }
        if (best < count) {
            target[a] = best;
            used[best] = true;
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
}

// Reorders a layer's GPUs (and nodes) and the slots inside each GPU to match the previous
// placement as well as possible: same expert sets per GPU, only relabelled.
void match_previous(std::int32_t* phy2log, const std::int32_t* old, int E, int R, int G, int N,
                    bool node_locality) {
    const int S = R / G;
    const int gpn = G / N;
    std::vector<std::int32_t> cur(phy2log, phy2log + R);
    std::vector<std::int32_t> out(static_cast<std::size_t>(R));
    if (node_locality && N > 1) {
        const std::vector<int> node_target = match_blocks(cur.data(), old, N, gpn * S, E);
        for (int n = 0; n < N; ++n) {
            std::copy(cur.begin() + static_cast<Index>(n) * gpn * S,
                      cur.begin() + static_cast<Index>(n + 1) * gpn * S,
                      out.begin() + static_cast<Index>(node_target[n]) * gpn * S);
        }
        cur = out;
        for (int n = 0; n < N; ++n) {
            const Index first = static_cast<Index>(n) * gpn * S;
            const std::vector<int> gpu_target =
                match_blocks(cur.data() + first, old + first, gpn, S, E);
            for (int g = 0; g < gpn; ++g) {
                std::copy(cur.begin() + first + static_cast<Index>(g) * S,
                          cur.begin() + first + static_cast<Index>(g + 1) * S,
                          out.begin() + first + static_cast<Index>(gpu_target[g]) * S);
            }
        }
    } else {
        const std::vector<int> gpu_target = match_blocks(cur.data(), old, G, S, E);
        for (int g = 0; g < G; ++g) {
            std::copy(cur.begin() + static_cast<Index>(g) * S,
                      cur.begin() + static_cast<Index>(g + 1) * S,
                      out.begin() + static_cast<Index>(gpu_target[g]) * S);
        }
    }
    // Inside each GPU: experts already in a slot stay there (each previous slot, in order, takes
    // the first of the GPU's pending replicas of its expert); the rest fill the free slots in
    // order. `pending[e]` counts e's untaken replicas, `taken[e]` those kept in place.
    std::vector<int> pending(static_cast<std::size_t>(E), 0), taken(static_cast<std::size_t>(E), 0);
    std::vector<bool> filled(static_cast<std::size_t>(S));
    for (int g = 0; g < G; ++g) {
        std::int32_t* dst = phy2log + static_cast<Index>(g) * S;
        const std::int32_t* src = out.data() + static_cast<Index>(g) * S;
        const std::int32_t* prev = old + static_cast<Index>(g) * S;
        for (int s = 0; s < S; ++s) ++pending[src[s]];
        for (int s = 0; s < S; ++s) {
            filled[s] = pending[prev[s]] > 0;
            if (filled[s]) {
                dst[s] = prev[s];
                --pending[prev[s]];
                ++taken[prev[s]];
            }
        }
        int free_slot = 0;
        for (int s = 0; s < S; ++s) {
            const std::int32_t e = src[s];
            pending[e] = 0;
            if (taken[e] > 0) {  // the first taken[e] replicas of e stayed in place
                --taken[e];
                continue;
            }
            while (filled[free_slot]) ++free_slot;
            dst[free_slot++] = e;
        }
    }
}

// The largest GPU load of a layer placement whose experts have count[e] replicas.
double layer_max_gpu_load(const double* w, const std::int32_t* phy2log, const std::int32_t* count,
                          int E, int R, int G) {
    thread_local std::vector<double> share;  // an expert's load per replica
    share.resize(static_cast<std::size_t>(E));
    for (int e = 0; e < E; ++e) share[e] = w[e] / count[e];
    const int S = R / G;
    double m = 0.0;
    for (int g = 0; g < G; ++g) {
        double load = 0.0;
        for (int s = g * S; s < (g + 1) * S; ++s) load += share[phy2log[s]];
        m = std::max(m, load);
    }
    return m;
}

// ---------------------------------------------------------------------------------------------
// The per-step peak objective (Objective::kStepPeak).
// ---------------------------------------------------------------------------------------------

// One layer's per-step loads: expert e's load in step t (< num_steps) is the series' value
// offset + t * stride + e.
struct LayerSteps {
    const StepLoads* steps = nullptr;
    Index offset = 0;  // the layer's first value in step 0
    Index num_steps = 0;
    Index stride = 0;

    // Expert e's load in step t.
    double operator()(Index t, int e) const { return (*steps)[offset + t * stride + e]; }
};

// The sum over steps of each step's largest GPU load of a layer placement whose experts have
// count[e] replicas (each expert's step load split equally over them).
double layer_step_peak(const LayerSteps& steps, const std::int32_t* phy2log,
                       const std::int32_t* count, int E, int R, int G) {
    thread_local std::vector<double> share;
    share.resize(static_cast<std::size_t>(E));
    const int S = R / G;
    double sum = 0.0;
    for (Index t = 0; t < steps.num_steps; ++t) {
        for (int e = 0; e < E; ++e) share[e] = steps(t, e) / count[e];
        double m = 0.0;
        for (int g = 0; g < G; ++g) {
            double load = 0.0;
            for (int s = g * S; s < (g + 1) * S; ++s) load += share[phy2log[s]];
            m = std::max(m, load);
        }
        sum += m;
    }
    return sum;
}

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

// kLanes doubles from p (unaligned).
Lanes lanes_at(const double* p) {
    Lanes v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

// kLanes steps' largest load after a swap moves the load y - x of replicas (x[i], y[i]: their
// loads in step i) onto bin a (load ga) from bin b (gb); rest: the largest load of the other bins.
Lanes peak_after_swap(const double* x, const double* y, Lanes ga, Lanes gb, Lanes rest) {
    const Lanes delta = lanes_at(y) - lanes_at(x);
    const Lanes na = ga + delta, nb = gb - delta;
    const Lanes m = na > nb ? na : nb;
    return m > rest ? m : rest;
}

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
void refine_step_peak(Packing& p, const LayerSteps& steps, StepScratch& s) {
    // A swap must lower the objective by this much (relative): smaller gains are mostly the
    // window's sampling noise (they do not carry over to the next window) and cost time.
    constexpr double kStepTol = 1e-4;
    constexpr Index kStepChunk = 8 * kLanes;
    const int E = p.num_experts(), B = p.num_bins, S = p.size;
    if (steps.num_steps <= 0 || B < 2) return;
    const Index T = (steps.num_steps + kStepChunk - 1) / kStepChunk * kStepChunk;
    const Index chunks = T / kStepChunk;
    const auto sz = [](Index n) { return static_cast<std::size_t>(n); };
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
    const int max_swaps = 4 * B * S;
    for (int swaps = 0; swaps < max_swaps; ++swaps) {
        // Each step's three largest bin loads (ties to the lower bin), and the objective.
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
        if (!(objective > 0)) return;
        // Peak counts, and each bin's steps among the two largest (a counting sort by bin).
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
        const double margin = objective * kStepTol;
        // The screens compare sums taken in another order than the exact one: they skip only
        // candidates that miss the best by more than this, far above that rounding.
        const double slack = objective * 1e-11;
        bool improved = false;
        for (const int a : s.by_peaks) {
            // a's peak steps, padded with zero steps to whole vectors, and what is gathered on
            // them; rest_a and the gain each step allows when only a is excluded.
            s.peak_steps.clear();
            for (Index t = 0; t < T; ++t) {
                if (s.arg1[t] == a) s.peak_steps.push_back(static_cast<int>(t));
            }
            const Index k = static_cast<Index>(s.peak_steps.size());
            const Index K = (k + kLanes - 1) / kLanes * kLanes;
            s.peak_share.assign(sz(E * K), 0.0);
            for (int e = 0; e < E; ++e) {
                const double* u = &s.share[e * T];
                double* c = &s.peak_share[e * K];
                double sum = 0.0;
                for (Index i = 0; i < k; ++i) sum += c[i] = u[s.peak_steps[i]];
                s.peak_sum[e] = sum;
            }
            for (auto* v : {&s.peak_a, &s.peak_b, &s.peak_top2, &s.peak_top3, &s.peak_rest}) {
                v->assign(sz(K), 0.0);
            }
            s.peak_arg2.assign(sz(K), -1);
            for (Index i = 0; i < k; ++i) {
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
            // The most a swap can gain in a's peak steps: each step down to the next largest.
            double reach_a = 0.0;
            for (Index i = 0; i < k; ++i) reach_a += s.peak_a[i] - s.peak_top3[i];
            const int d = p.domain(a);
            double best = -margin;  // the best change of the objective so far (negative: lower)
            int best_b = -1, best_xi = -1, best_yi = -1;
            const double* la = &s.load[a * T];
            for (int b = d * p.bins_per_domain; b < (d + 1) * p.bins_per_domain; ++b) {
                if (b == a) continue;
                // rest with b excluded too: it differs from rest_a only where b is one of the two
                // largest. reach: what b's peak steps can give back from each chunk on.
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
                const double reach_b = s.reach[0];
                if (-(reach_a + reach_b) >= best + slack) continue;
                for (Index i = 0; i < k; ++i) {
                    const int t = s.peak_steps[i];
                    s.peak_b[i] = s.load[b * T + t];
                    s.peak_rest[i] = s.peak_arg2[i] != b ? s.peak_top2[i] : s.peak_top3[i];
                }
                const double* lb = &s.load[b * T];
                for (int xi = 0; xi < S; ++xi) {
                    const int x = p.bin(a)[xi];
                    for (int yi = 0; yi < S; ++yi) {
                        const int y = p.bin(b)[yi];
                        if (s.peak_sum[y] - s.peak_sum[x] - reach_b >= best + slack ||
                            !p.swap_allowed(a, xi, b, yi)) {
                            continue;
                        }
                        // The terms of a's peak steps.
                        double change = 0.0;
                        {
                            const double* cx = &s.peak_share[x * K];
                            const double* cy = &s.peak_share[y * K];
                            Lanes acc = {0, 0, 0, 0};
                            for (Index i = 0; i < K; i += kLanes) {
                                const Lanes ga = lanes_at(s.peak_a.data() + i);
                                acc += peak_after_swap(cx + i, cy + i, ga,
                                                       lanes_at(s.peak_b.data() + i),
                                                       lanes_at(s.peak_rest.data() + i)) -
                                       ga;  // ga is the step's largest load
                            }
                            change = (acc[0] + acc[1]) + (acc[2] + acc[3]);
                            if (change - reach_b >= best + slack) continue;
                        }
                        // The terms of the other steps, in step order.
                        const double* ux = &s.share[x * T];
                        const double* uy = &s.share[y * T];
                        const double peak_change = change;
                        Lanes acc = {0, 0, 0, 0};
                        Index c = 0;
                        for (; c < chunks; ++c) {
                            for (Index t = c * kStepChunk; t < (c + 1) * kStepChunk; t += kLanes) {
                                const Lanes m =
                                    peak_after_swap(ux + t, uy + t, lanes_at(la + t),
                                                    lanes_at(lb + t), lanes_at(s.rest.data() + t));
                                acc += (m - lanes_at(s.top1.data() + t)) *
                                       lanes_at(s.other_a.data() + t);
                            }
                            change = peak_change + ((acc[0] + acc[1]) + (acc[2] + acc[3]));
                            if (change - s.reach[c + 1] >= best + slack) break;
                        }
                        if (c == chunks && change < best) {
                            best = change;
                            best_b = b;
                            best_xi = xi;
                            best_yi = yi;
                        }
                    }
                }
            }
            if (best_b < 0) continue;
            const double* ux = &s.share[p.bin(a)[best_xi] * T];
            const double* uy = &s.share[p.bin(best_b)[best_yi] * T];
            double* ga = &s.load[a * T];
            double* gb = &s.load[best_b * T];
            for (Index t = 0; t < T; ++t) {
                const double delta = uy[t] - ux[t];
                ga[t] += delta;
                gb[t] -= delta;
            }
            p.apply_swap(a, best_xi, best_b, best_yi);
            improved = true;
            break;
        }
        if (!improved) return;
    }
}

// One thread's scratch for moelb's layers.
struct MoelbScratch {
    Packing ours, theirs, trial;
    PackScratch pack;
    GroupScratch groups;
    std::vector<int> node, experts, count, flat_count;
    std::vector<float> w32;
    std::vector<std::int32_t> ds, count32;
    StepScratch steps;
};

// Plans one layer (loads w[0, E)) with moelb into phy2log[0, R): `domains` domains (node
// locality: one per node, with K groups; else one), `bound` the layer's flat lower bound (and
// s.flat_count the divisor method's counts behind it, for all experts over all slots),
// `deepseek_variants` DeepSeek's policies (groups, nodes) whose placements satisfy the locality.
// With `steps` (Objective::kStepPeak), the plan is then refined against the layer's per-step loads.
// Returns whether the plan started from DeepSeek's packing.
bool moelb_layer(const double* w, int E, int R, int K, int N, int G, int domains, double bound,
                 const std::vector<std::pair<int, int>>& deepseek_variants, const LayerSteps* steps,
                 MoelbScratch& s, std::int32_t* phy2log) {
    constexpr double kCountSearchGap = 5e-3;  // relative gap to the bound worth a count search
    const int gpus_per_domain = G / domains;
    const int slots_per_domain = R / domains;
    Packing& ours = s.ours;
    ours.reset(G, gpus_per_domain, R / G, E);
    if (domains > 1) {
        s.node.resize(static_cast<std::size_t>(K));
        assign_groups(w, E, K, N, slots_per_domain, gpus_per_domain, s.groups, s.node.data());
        const int gs = E / K;
        for (int e = 0; e < E; ++e) ours.domain_of[e] = s.node[e / gs];
    } else {
        std::fill(ours.domain_of.begin(), ours.domain_of.end(), 0);
    }
    // Counts by the divisor method per domain, capped at the domain's bins. With one domain these
    // are the flat bound's counts unless its cap binds: a method whose cap never stops an item
    // makes the same choices as one without a cap.
    const bool flat = domains == 1 && *std::max_element(s.flat_count.begin(), s.flat_count.end()) <=
                                          gpus_per_domain;
    if (flat) std::copy(s.flat_count.begin(), s.flat_count.end(), ours.count.begin());
    for (int d = 0; d < domains && !flat; ++d) {
        s.experts.clear();
        for (int e = 0; e < E; ++e) {
            if (ours.domain_of[e] == d) s.experts.push_back(e);
        }
        const int n = static_cast<int>(s.experts.size());
        s.count.resize(static_cast<std::size_t>(n));
        divisor_counts(w, s.experts.data(), n, slots_per_domain, gpus_per_domain, s.count.data());
        for (int i = 0; i < n; ++i) ours.count[s.experts[i]] = s.count[i];
    }
    pack_counts(ours, w, bound, s.pack);
    // DeepSeek under the same locality, improved by the same local search: keep whichever is
    // lower (ours on ties), so we are never worse than DeepSeek. Only worth it when DeepSeek's
    // own packing beats ours before its improvement.
    bool from_deepseek = false;
    for (const auto& [groups, nodes] : deepseek_variants) {
        if (ours.max_load() <= bound * (1 + kTargetTol)) break;
        s.w32.resize(static_cast<std::size_t>(E));
        for (int e = 0; e < E; ++e) s.w32[e] = static_cast<float>(w[e]);
        s.ds.resize(static_cast<std::size_t>(R));
        deepseek_layer(s.w32.data(), E, R, groups, nodes, G, s.ds.data());
        Packing& theirs = s.theirs;
        packing_of(theirs, w, s.ds.data(), E, R, G, domains);
        if (theirs.max_load() < ours.max_load() * (1 - kRelTol)) {
            theirs.repair_duplicates(theirs.max_load(), s.pack);
            theirs.swap_search(bound, s.pack);
            if (theirs.max_load() < ours.max_load() * (1 - kRelTol)) {
                std::swap(ours, theirs);
                from_deepseek = true;
            }
        }
    }
    // A few count changes when the plan is >0.5% above the bound, or keeps an avoidable
    // duplicate (bounded: each try is a full repack of the layer).
    if (ours.max_load() > bound * (1 + kCountSearchGap) || avoidable_duplicates(ours, s.pack) > 0) {
        search_counts(ours, s.trial, w, bound, kCountSearchBudget, s.pack);
    }
    if (static_cast<std::int64_t>(E) * E * E * E * R <= kSmallLayerWork) {
        search_all_counts(ours, s.trial, w, bound, s.pack);
    }
    if (avoidable_duplicates(ours, s.pack) > 0) {
        remove_avoidable_duplicates(ours, s.trial, w, bound, s.pack);
    }
    if (steps) {
        refine_step_peak(ours, *steps, s.steps);
        s.steps.release_if_large();
    }
    write_slots(ours, phy2log);
    return from_deepseek;
}

// The statistics of one layer of a placement: loads w[0, E), slots phy2log[0, R) on G GPUs,
// `bound` the layer's flat lower bound (NaN: computed here), `previous` the previous slots (or
// nullptr), `steps` the layer's per-step loads (or nullptr). `count` is scratch.
LayerPlanStats layer_stats(const double* w, const std::int32_t* phy2log, int E, int R, int G,
                           double bound, const std::int32_t* previous, const LayerSteps* steps,
                           std::vector<std::int32_t>& count) {
    LayerPlanStats s;
    count.assign(static_cast<std::size_t>(E), 0);
    for (int p = 0; p < R; ++p) ++count[phy2log[p]];
    double total = 0;
    for (int e = 0; e < E; ++e) total += w[e];
    s.max_gpu_load = layer_max_gpu_load(w, phy2log, count.data(), E, R, G);
    s.mean_gpu_load = total / G;
    s.balancedness = utilization_rate(s.mean_gpu_load, s.max_gpu_load);
    if (std::isnan(bound)) {
        thread_local std::vector<int> scratch;
        bound = flat_lower_bound(w, E, R, G, scratch);
    }
    s.lower_bound = bound;
    // Never below 0: a maximum under the bound is rounding (a subnormal load split over replicas
    // rounds to 0 per replica).
    s.gap = s.lower_bound > 0 ? std::max(0.0, s.max_gpu_load / s.lower_bound - 1) : 0.0;
    if (steps) s.step_max_gpu_load = layer_step_peak(*steps, phy2log, count.data(), E, R, G);
    if (previous) {
        for (int p = 0; p < R; ++p) s.moved_experts += previous[p] != phy2log[p];
    }
    return s;
}

// The per-step loads of layer l of a time series (empty without one).
LayerSteps layer_steps(const StepLoads* steps, Index l) {
    if (!steps) return {};
    const Index E = steps->num_experts;
    return {steps, l * E, steps->num_steps, steps->num_layers * E};
}

// The whole plan's statistics from its layers'.
void summarise(PlanStats& stats, bool has_steps) {
    const auto L = static_cast<double>(stats.layers.size());
    double sum_mean = 0, sum_max = 0;
    std::vector<double> mean, max, step_max;
    for (const LayerPlanStats& s : stats.layers) {
        stats.mean_gap += s.gap / L;
        stats.max_gap = std::max(stats.max_gap, s.gap);
        stats.moved_experts += s.moved_experts;
        sum_mean += s.mean_gpu_load;
        sum_max += s.max_gpu_load;
        mean.push_back(s.mean_gpu_load);
        max.push_back(s.max_gpu_load);
        step_max.push_back(s.step_max_gpu_load);
    }
    stats.balancedness = balancedness(mean, max, LayerSet::kAll);
    stats.active_balancedness = balancedness(mean, max, LayerSet::kActive);
    stats.load_weighted_balancedness = sum_max > 0 ? sum_mean / sum_max : 1.0;
    if (has_steps) {
        stats.has_steps = true;
        stats.step_balancedness = balancedness(mean, step_max, LayerSet::kAll);
    }
}

// evaluate_placement.
PlanStats evaluate(ConstMatrixMap<double> load, const ExpertLocation& location,
                   const ExpertLocation* previous, const StepLoads* steps) {
    const int L = location.num_layers(), G = location.ep_size();
    const int E = location.num_logical_experts(), R = location.num_physical_experts();
    constexpr double kUnknown = std::numeric_limits<double>::quiet_NaN();
    PlanStats stats;
    stats.layers.resize(static_cast<std::size_t>(L));
    parallel_for(L, 1, [&](Index begin, Index end) {
        std::vector<std::int32_t> count;
        for (Index l = begin; l < end; ++l) {
            const LayerSteps st = layer_steps(steps, l);
            stats.layers[static_cast<std::size_t>(l)] = layer_stats(
                load.row(l).data(), location.physical_to_logical().row(l).data(), E, R, G, kUnknown,
                previous ? previous->physical_to_logical().row(l).data() : nullptr,
                steps ? &st : nullptr, count);
        }
    });
    summarise(stats, steps != nullptr);
    return stats;
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

constexpr detail::EnumNames<Objective, 2> kObjectiveNames{{
    {"total", Objective::kTotal},
    {"step_peak", Objective::kStepPeak},
}};

Objective parse_objective(std::string_view name, std::string_view param) {
    return detail::parse_enum(kObjectiveNames, name, param, "an EPLB objective");
}

std::string_view to_string(Objective value) { return detail::enum_name(kObjectiveNames, value); }

namespace {

// Every load finite and >= 0, and their sum over all layers at most kMaxTotalLoad: finite loads
// whose sum overflows (1e308 on two experts) would make every statistic inf or NaN.
void check_load_values(ConstMatrixMap<double> load, Index num_steps = 1) {
    double total = 0;
    for (Index l = 0; l < load.rows(); ++l) {
        for (Index e = 0; e < load.cols(); ++e) {
            const double v = load(l, e);
            MOELB_CHECK_ARG(
                std::isfinite(v) && v >= 0,
                "load[" << l << ", " << e << "] = " << v << " is not a finite non-negative load");
            total += v;
        }
    }
    MOELB_CHECK_ARG(total <= kMaxTotalLoad,
                    "load sums to " << total << " over its " << load.rows() << " layers"
                                    << (num_steps > 1 ? " and steps" : "")
                                    << ": its values are finite but their sums overflow the "
                                       "statistics; scale the loads down (moelb takes loads "
                                       "summing to at most "
                                    << kMaxTotalLoad << ")");
}

}  // namespace

RowMatrix<double> gpu_loads(ConstMatrixMap<double> load, const ExpertLocation& location) {
    MOELB_CHECK_ARG(
        load.rows() == location.num_layers() && load.cols() == location.num_logical_experts(),
        "load has shape [" << load.rows() << ", " << load.cols() << "] but the location has "
                           << location.num_layers() << " layers and "
                           << location.num_logical_experts() << " logical experts");
    check_load_values(load);
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

namespace {

// evaluate_placement's checks of the shapes of load, location and previous.
void check_evaluate_args(ConstMatrixMap<double> load, const ExpertLocation& location,
                         const ExpertLocation* previous) {
    MOELB_CHECK_ARG(
        load.rows() == location.num_layers() && load.cols() == location.num_logical_experts(),
        "load has shape [" << load.rows() << ", " << load.cols() << "] but the location has "
                           << location.num_layers() << " layers and "
                           << location.num_logical_experts() << " logical experts");
    check_load_values(load);
    const int L = location.num_layers();
    const int E = location.num_logical_experts(), R = location.num_physical_experts();
    if (previous) {
        MOELB_CHECK_ARG(previous->num_layers() == L && previous->num_physical_experts() == R &&
                            previous->num_logical_experts() == E,
                        "previous has a different shape (layers, logical or physical experts)");
    }
}

// Validates a time series and sums it over the steps (in step order) into [L, E].
RowMatrix<double> sum_steps(const StepLoads& steps) {
    const Index T = steps.num_steps, L = steps.num_layers, E = steps.num_experts;
    MOELB_CHECK_ARG(T >= 1 && L >= 1 && E >= 1,
                    "load must have shape [num_steps, num_layers, num_experts] with all positive, "
                    "got ["
                        << T << ", " << L << ", " << E << "]");
    MOELB_CHECK_ARG(
        static_cast<Index>(steps.size()) == T * L * E,
        "load holds " << steps.size() << " values, not " << T << " x " << L << " x " << E);
    RowMatrix<double> total = RowMatrix<double>::Zero(L, E);
    for (Index t = 0; t < T; ++t) {
        for (Index l = 0; l < L; ++l) {
            for (Index e = 0; e < E; ++e) {
                const double v = steps[(t * L + l) * E + e];
                MOELB_CHECK_ARG(std::isfinite(v) && v >= 0, "load[" << t << ", " << l << ", " << e
                                                                    << "] = " << v
                                                                    << " is not a finite "
                                                                       "non-negative load");
                total(l, e) += v;
            }
        }
    }
    for (Index l = 0; l < L; ++l) {
        for (Index e = 0; e < E; ++e) {
            MOELB_CHECK_ARG(std::isfinite(total(l, e)), "load summed over the "
                                                            << T << " steps overflows at layer "
                                                            << l << ", expert " << e);
        }
    }
    return total;
}

Plan rebalance_impl(ConstMatrixMap<double> load, const RebalanceOptions& o, const StepLoads* steps,
                    std::chrono::steady_clock::time_point started) {
    const Index L = load.rows();
    const int E = static_cast<int>(load.cols());
    const int R = o.num_physical_experts, K = o.num_groups, N = o.num_nodes, G = o.num_gpus;
    MOELB_CHECK_ARG(L >= 1 && E >= 1,
                    "load must have shape [num_layers, num_experts] with both "
                    "positive, got ["
                        << L << ", " << E << "]");
    check_load_values(load, steps ? steps->num_steps : 1);
    MOELB_CHECK_ARG(G >= 1, "num_gpus must be positive, got " << G);
    MOELB_CHECK_ARG(N >= 1, "num_nodes must be positive, got " << N);
    MOELB_CHECK_ARG(K >= 0, "num_groups must be non-negative, got " << K);
    MOELB_CHECK_ARG(
        R >= E, "num_physical_experts=" << R << " is smaller than the " << E << " logical experts");
    MOELB_CHECK_ARG(R <= kMaxPhysicalExperts,
                    "num_physical_experts=" << R << " is above the " << kMaxPhysicalExperts
                                            << " slots per layer moelb plans");
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
    if (o.objective == Objective::kStepPeak) {
        MOELB_CHECK_ARG(steps,
                        "objective='step_peak' needs per-step loads: load must be a time "
                        "series [num_steps, num_layers, num_experts]");
        MOELB_CHECK_ARG(o.algorithm == EplbAlgorithm::kMoelb,
                        "objective='step_peak' is moelb's; algorithm='"
                            << to_string(o.algorithm) << "' plans against the total load");
    }
    const bool step_peak = o.objective == Objective::kStepPeak;

    std::ostringstream notes;
    RowMatrix<std::int32_t> phy2log(L, R);
    // Each layer's statistics, taken right after it is planned (its data still in cache).
    PlanStats stats;
    stats.layers.resize(static_cast<std::size_t>(L));
    auto take_stats = [&](Index l, double bound, std::vector<std::int32_t>& count) {
        const LayerSteps st = layer_steps(steps, l);
        stats.layers[static_cast<std::size_t>(l)] =
            layer_stats(load.row(l).data(), phy2log.row(l).data(), E, R, G, bound,
                        o.previous ? o.previous->physical_to_logical().row(l).data() : nullptr,
                        steps ? &st : nullptr, count);
    };
    constexpr double kUnknown = std::numeric_limits<double>::quiet_NaN();
    std::vector<double> lower_bounds;  // per layer when the planner computed them
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
            thread_local std::vector<std::int32_t> count;
            for (Index l = begin; l < end; ++l) {
                deepseek_layer(w32.data() + l * E, E, R, hierarchical ? K : 1, hierarchical ? N : 1,
                               G, phy2log.row(l).data());
                take_stats(l, kUnknown, count);
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
        lower_bounds.resize(static_cast<std::size_t>(L));
        parallel_for(L, 1, [&](Index begin, Index end) {
            thread_local MoelbScratch scratch;
            for (Index l = begin; l < end; ++l) {
                const double* w = load.row(l).data();
                // The flat lower bound: no placement (under any locality) goes below it.
                lower_bounds[l] = flat_lower_bound(w, E, R, G, scratch.flat_count, true);
                const LayerSteps st = layer_steps(steps, l);
                kept_deepseek[l] = moelb_layer(
                    w, E, R, K, N, G, node_locality ? N : 1, lower_bounds[l], deepseek_variants,
                    step_peak ? &st : nullptr, scratch, phy2log.row(l).data());
                if (o.previous) {
                    match_previous(phy2log.row(l).data(),
                                   o.previous->physical_to_logical().row(l).data(), E, R, G,
                                   node_locality ? N : 1, node_locality);
                }
                take_stats(l, lower_bounds[l], scratch.count32);
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
        std::vector<std::int32_t> count;
        for (Index l = 0; l < L; ++l) {
            const std::int32_t* old = o.previous->physical_to_logical().row(l).data();
            // The gain in the plan's objective: the largest GPU load of the total, or the sum
            // of the steps' largest.
            const LayerSteps st = layer_steps(steps, l);
            const LayerPlanStats before =
                layer_stats(load.row(l).data(), old, E, R, G, lower_bounds[l], nullptr,
                            step_peak ? &st : nullptr, count);
            const LayerPlanStats& after = stats.layers[static_cast<std::size_t>(l)];
            const double old_max = step_peak ? before.step_max_gpu_load : before.max_gpu_load;
            const double new_max = step_peak ? after.step_max_gpu_load : after.max_gpu_load;
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
            take_stats(l, lower_bounds[l], count);
            ++kept;
        }
        if (kept > 0) notes << kept << " layer(s) kept their previous placement. ";
    }

    for (Index l = 0; l < L; ++l) stats.layers[l].kept_previous = keep_previous[l];
    summarise(stats, steps != nullptr);
    Plan plan{ExpertLocation(std::move(phy2log), E, G, location_nodes), std::move(stats)};
    plan.stats.algorithm = step_peak ? name + "+step_peak" : name;
    plan.stats.notes = notes.str();
    if (!plan.stats.notes.empty() && plan.stats.notes.back() == ' ') plan.stats.notes.pop_back();
    plan.stats.wall_time_seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    return plan;
}

}  // namespace

PlanStats evaluate_placement(ConstMatrixMap<double> load, const ExpertLocation& location,
                             const ExpertLocation* previous) {
    check_evaluate_args(load, location, previous);
    return evaluate(load, location, previous, nullptr);
}

Plan rebalance(ConstMatrixMap<double> load, const RebalanceOptions& options) {
    return rebalance_impl(load, options, nullptr, std::chrono::steady_clock::now());
}

Plan rebalance(const StepLoads& steps, const RebalanceOptions& options) {
    const auto started = std::chrono::steady_clock::now();
    const RowMatrix<double> total = sum_steps(steps);
    return rebalance_impl(ConstMatrixMap<double>(total.data(), total.rows(), total.cols()), options,
                          &steps, started);
}

PlanStats evaluate_placement(const StepLoads& steps, const ExpertLocation& location,
                             const ExpertLocation* previous) {
    const RowMatrix<double> total = sum_steps(steps);
    const ConstMatrixMap<double> load(total.data(), total.rows(), total.cols());
    check_evaluate_args(load, location, previous);
    return evaluate(load, location, previous, &steps);
}

}  // namespace moelb
