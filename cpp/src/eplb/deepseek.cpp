// DeepSeek's EPLB (DESIGN section 4, reference/eplb.md section 1): eplb.py's
// rebalance_experts_hierarchical for one layer, in float32 like the original, with stable tie rules
// (sorts descending by load with ties to the lower index, argmax/argmin ties to the lower index).
// Runs algorithm deepseek* and gives moelb a starting packing to beat (plan_layers.cpp). The
// helpers keep eplb.py's names (balanced_packing, replicate_experts, phy2log, mlog2log).
#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "../isa/kernels.hpp"
#include "planner.hpp"

namespace moelb::planner {
namespace {

// order_descending sorts this many items or more by radix, fewer by counting each one's rank.
// replica_order (isa/eplb_kernels.cpp: the stable order of a layer's replicas from its experts'
// loads, when no two are equal) takes at most this many experts.
constexpr int kRadixMinItems = isa::kSmallSortItems;

// Indices of w[0, num_items) by descending value, ties to the lower index (what a stable sort
// gives). Sorts one integer key per item: the float's bits (order-preserving for values >= 0; -0 is
// normalised to +0) complemented in the high half, the index in the low half. A least significant
// digit radix sort on the high half (kRadixBits at a time, each pass stable, skipping digits all
// keys share) keeps equal values in index order.
void order_descending(const float* w, int num_items, std::vector<int>& order) {
    constexpr int kRadixBits = 8, kBuckets = 1 << kRadixBits, kPasses = 32 / kRadixBits;
    order.resize(static_cast<std::size_t>(num_items));
    if (num_items < kRadixMinItems) {
        // Few items: each one's rank counted by vector comparisons (isa/eplb_kernels.cpp).
        isa::kernels().rank_descending(w, num_items, order.data());
        return;
    }
    thread_local std::vector<std::uint64_t> keys, next;
    keys.resize(static_cast<std::size_t>(num_items));
    next.resize(keys.size());
    std::uint32_t histogram[kPasses][kBuckets] = {};
    for (int i = 0; i < num_items; ++i) {
        std::uint32_t bits;
        const float v = w[i] + 0.0f;
        std::memcpy(&bits, &v, sizeof bits);
        bits = ~bits;
        keys[i] = (static_cast<std::uint64_t>(bits) << 32) | static_cast<std::uint32_t>(i);
        for (int pass = 0; pass < kPasses; ++pass) {
            ++histogram[pass][(bits >> (pass * kRadixBits)) & (kBuckets - 1)];
        }
    }
    for (int pass = 0; pass < kPasses && num_items > 0; ++pass) {
        const int shift = 32 + pass * kRadixBits;
        std::uint32_t* count = histogram[pass];
        if (count[(keys[0] >> shift) & (kBuckets - 1)] == static_cast<std::uint32_t>(num_items))
            continue;
        std::uint32_t start = 0;
        for (int d = 0; d < kBuckets; ++d) start += std::exchange(count[d], start);
        for (const std::uint64_t k : keys) next[count[(k >> shift) & (kBuckets - 1)]++] = k;
        keys.swap(next);
    }
    for (int i = 0; i < num_items; ++i) order[i] = static_cast<int>(keys[i] & 0xffffffffu);
}

// balanced_packing (below) for num_packs <= kNarrowPacks packs runs as vector work
// (isa/eplb_kernels.cpp's narrow_balanced_packing: the packs' keys are the lanes of one vector).
constexpr int kNarrowPacks = 8;

// balanced_packing: num_items items into num_packs packs of num_items / num_packs items each
// (greedy by descending weight onto the lightest pack with room, ties to the lower pack). Pack sums
// accumulate in float32. `order` is the items' order_descending (ties to the lower index).
//
// Runs `instances` independent packings at once (instance t: w, order, pack and rank at offset
// t * num_items), a step of each in turn: one packing is a chain of dependent steps, and
// interleaving chains lets the processor overlap them.
void balanced_packing(const float* w, const int* order, int num_items, int num_packs, int* pack,
                      int* rank, int instances = 1) {
    const int per_pack = num_items / num_packs;
    if (per_pack == 1) {
        for (int i = 0; i < num_items * instances; ++i) {
            pack[i] = i % num_items;
            rank[i] = 0;
        }
        return;
    }
    if (num_packs <= kNarrowPacks) {
        isa::kernels().narrow_balanced_packing(w, order, num_items, num_packs, pack, rank,
                                               instances);
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
    while (leaves < num_packs) leaves *= 2;
    thread_local std::vector<std::uint64_t> trees;
    thread_local std::vector<float> loads;
    thread_local std::vector<int> counts;
    trees.assign(2 * static_cast<std::size_t>(leaves) * instances, kNoRoom);
    loads.assign(static_cast<std::size_t>(num_packs) * instances, 0.0f);
    counts.assign(loads.size(), 0);
    for (int t = 0; t < instances; ++t) {
        std::uint64_t* tree = trees.data() + 2 * leaves * t;
        for (int p = 0; p < num_packs; ++p) tree[leaves + p] = key(0.0f, p);
        for (int j = leaves - 1; j >= 1; --j) tree[j] = std::min(tree[2 * j], tree[2 * j + 1]);
    }
    for (int o = 0; o < num_items; ++o) {
        for (int t = 0; t < instances; ++t) {
            std::uint64_t* tree = trees.data() + 2 * leaves * t;
            float* load = loads.data() + num_packs * t;
            int* count = counts.data() + num_packs * t;
            const int i = order[t * num_items + o];
            const int best = static_cast<int>(tree[1] & 0xffffffffu);
            pack[t * num_items + i] = best;
            rank[t * num_items + i] = count[best]++;
            load[best] += w[t * num_items + i];
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

void balanced_packing(const float* w, int num_items, int num_packs, int* pack, int* rank) {
    thread_local std::vector<int> order;
    if (num_items / num_packs > 1) order_descending(w, num_items, order);
    balanced_packing(w, order.data(), num_items, num_packs, pack, rank);
}

// replicate_experts: slots 0..num_items-1 hold experts 0..num_items-1; each further slot goes to
// the expert with the largest w / count (float32, ties to the lower index).
void replicate_experts(const float* w, int num_items, int num_slots, int* phy2log, int* rank,
                       int* count) {
    for (int i = 0; i < num_items; ++i) {
        phy2log[i] = i;
        rank[i] = 0;
        count[i] = 1;
    }
    int s = num_items;
    divisor_method<float>(
        num_items, num_slots - num_items, num_slots, [w](int i) { return w[i]; }, count,
        [&](int e) {
            phy2log[s] = e;
            rank[s] = count[e];
            ++s;
        });
}

}  // namespace

void deepseek_layer(const float* w, int num_experts, int num_physical_experts, int num_groups,
                    int num_nodes, int ep_size, std::int32_t* phy2log) {
    // DESIGN's letters: E experts, P slots, W GPUs, S slots per GPU.
    const int E = num_experts, P = num_physical_experts, W = ep_size, S = P / W;
    const int group_size = E / num_groups, groups_per_node = num_groups / num_nodes;
    const int experts_per_node = E / num_nodes, slots_per_node = P / num_nodes;
    const int ranks_per_node = W / num_nodes;
    // Scratch reused across layers (deepseek_layer runs once per layer).
    thread_local std::vector<float> group_load, node_w, replica_w;
    thread_local std::vector<int> group_pack, group_rank, mlog2log, phy2mlog, phy_rank, mlog_count,
        node_order, order, pack, rank;
    group_load.resize(static_cast<std::size_t>(num_groups));
    // Each group's sum in index order, the groups side by side (independent additions overlap).
    thread_local std::vector<double> group_sum;
    group_sum.assign(static_cast<std::size_t>(num_groups), 0.0);
    for (int j = 0; j < group_size; ++j) {
        for (int g = 0; g < num_groups; ++g) group_sum[g] += w[g * group_size + j];
    }
    for (int g = 0; g < num_groups; ++g) group_load[g] = static_cast<float>(group_sum[g]);
    group_pack.resize(static_cast<std::size_t>(num_groups));
    group_rank.resize(group_pack.size());
    balanced_packing(group_load.data(), num_groups, num_nodes, group_pack.data(),
                     group_rank.data());
    mlog2log.resize(static_cast<std::size_t>(E));
    for (int g = 0; g < num_groups; ++g) {
        const int first = (group_pack[g] * groups_per_node + group_rank[g]) * group_size;
        for (int j = 0; j < group_size; ++j) mlog2log[first + j] = g * group_size + j;
    }
    // Per node: replicate, then pack the replicas (all nodes' packings at once).
    node_w.resize(static_cast<std::size_t>(experts_per_node));
    mlog_count.resize(node_w.size());
    phy2mlog.resize(static_cast<std::size_t>(P));
    phy_rank.resize(phy2mlog.size());
    replica_w.resize(phy2mlog.size());
    order.resize(phy2mlog.size());
    pack.resize(phy2mlog.size());
    rank.resize(phy2mlog.size());
    for (int n = 0; n < num_nodes; ++n) {
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
        if (slots_per_node > ranks_per_node &&
            !isa::kernels().replica_order(node_w.data(), mlog_count.data(), node_phy2mlog,
                                          experts_per_node, slots_per_node,
                                          order.data() + n * slots_per_node)) {
            order_descending(node_replica_w, slots_per_node, node_order);
            std::copy(node_order.begin(), node_order.end(), order.begin() + n * slots_per_node);
        }
    }
    balanced_packing(replica_w.data(), order.data(), slots_per_node, ranks_per_node, pack.data(),
                     rank.data(), num_nodes);
    for (int n = 0; n < num_nodes; ++n) {
        for (int j = n * slots_per_node; j < (n + 1) * slots_per_node; ++j) {
            const int slot = n * slots_per_node + pack[j] * S + rank[j];
            phy2log[slot] = mlog2log[n * experts_per_node + phy2mlog[j]];
        }
    }
}

}  // namespace moelb::planner
