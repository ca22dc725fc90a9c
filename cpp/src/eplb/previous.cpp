// Planning against the previous placement (DESIGN section 4: "with `previous` keeps unchanged
// experts in their slots and can trade a bounded balance loss for fewer moves"): a layer's new
// GPUs (and nodes) relabelled and its slots reordered to match the previous placement, and the
// movement trade-off that keeps a layer's previous placement when its gain does not pay for its
// moves (move_cost) or the moves are over budget (max_moves). Two relabellings: the greedy one
// (match_previous, every moelb plan) and the exact one (relabel_exactly, ours: the balanced
// target's candidates and relabel_ranks), an assignment of the GPUs (and nodes) that keeps the
// most slots, solved as a min-cost flow.
#include <algorithm>
#include <cstdint>
#include <numeric>
#include <sstream>
#include <tuple>
#include <vector>

#include "../balanced_flow.hpp"
#include "moelb/errors.hpp"
#include "planner.hpp"

namespace moelb::planner {
namespace {

// Run-length (expert, multiplicity) lists of each block's sorted slots, in CSR form: block a's
// runs at [first[a], first[a + 1]).
struct BlockRuns {
    std::vector<int> first;  // [num_blocks + 1]
    std::vector<std::int32_t> expert;
    std::vector<int> times;
};

BlockRuns block_runs(const std::int32_t* blocks, int num_blocks, int block_size) {
    BlockRuns r;
    r.first.assign(static_cast<std::size_t>(num_blocks) + 1, 0);
    std::vector<std::int32_t> sorted(static_cast<std::size_t>(block_size));
    for (int a = 0; a < num_blocks; ++a) {
        const std::int32_t* block = blocks + static_cast<Index>(a) * block_size;
        std::copy(block, block + block_size, sorted.begin());
        std::sort(sorted.begin(), sorted.end());
        for (int i = 0; i < block_size;) {
            int j = i + 1;
            while (j < block_size && sorted[j] == sorted[i]) ++j;
            r.expert.push_back(sorted[i]);
            r.times.push_back(j - i);
            i = j;
        }
        r.first[a + 1] = static_cast<int>(r.expert.size());
    }
    return r;
}

// The old blocks holding each expert, in block order, with the expert's multiplicity there:
// expert e's at [first[e], first[e + 1]).
struct Holders {
    std::vector<int> first;  // [num_experts + 1]
    std::vector<int> block, times;
};

Holders holders_of(const BlockRuns& prior, int num_blocks, int num_experts) {
    Holders h;
    h.first.assign(static_cast<std::size_t>(num_experts) + 1, 0);
    for (const std::int32_t e : prior.expert) ++h.first[e + 1];
    std::partial_sum(h.first.begin(), h.first.end(), h.first.begin());
    h.block.resize(prior.expert.size());
    h.times.resize(prior.expert.size());
    std::vector<int> fill(h.first.begin(), h.first.end() - 1);
    for (int b = 0; b < num_blocks; ++b) {
        for (int i = prior.first[b]; i < prior.first[b + 1]; ++i) {
            const int k = fill[prior.expert[i]]++;
            h.block[k] = b;
            h.times[k] = prior.times[i];
        }
    }
    return h;
}

// The pairs (new block, old block) of overlap >= min_overlap as (-overlap, new, old), sorted,
// counted through the experts they share.
std::vector<std::tuple<int, int, int>> overlapping_pairs(const BlockRuns& fresh,
                                                         const Holders& holders, int num_blocks,
                                                         int block_size, int min_overlap = 2) {
    std::vector<std::tuple<int, int, int>> pairs;
    std::vector<int> overlap(static_cast<std::size_t>(num_blocks), 0);
    std::vector<int> touched;
    // (Block size 1 overlaps by at most 1.)
    for (int a = 0; a < num_blocks && block_size >= min_overlap; ++a) {
        for (int i = fresh.first[a]; i < fresh.first[a + 1]; ++i) {
            const std::int32_t e = fresh.expert[i];
            for (int k = holders.first[e]; k < holders.first[e + 1]; ++k) {
                const int b = holders.block[k];
                if (overlap[b] == 0) touched.push_back(b);
                overlap[b] += std::min(fresh.times[i], holders.times[k]);
            }
        }
        for (const int b : touched) {
            if (overlap[b] >= min_overlap) pairs.emplace_back(-overlap[b], a, b);
            overlap[b] = 0;
        }
        touched.clear();
    }
    std::sort(pairs.begin(), pairs.end());
    return pairs;
}

// Greedy maximum-overlap matching of `num_blocks` new blocks to `num_blocks` old blocks of
// `block_size` slots each (new block a: cur[a * block_size, (a + 1) * block_size), old block b
// likewise in old; expert ids in [0, num_experts)). The overlap of two blocks is the size of their
// multiset intersection. The result is the greedy over every pair with a positive overlap sorted
// by (-overlap, a, b): a pair is taken when both blocks are still free; new blocks left over take
// the free old blocks in order. Returns the old block of each new block.
//
// Computed sparsely instead of over all num_blocks^2 pairs (each copied and sorted):
// - each block's slots are sorted once into (expert, multiplicity) runs, and the old blocks are
//   indexed by expert (the blocks holding e, with e's multiplicity there, in block order);
// - overlaps are accumulated only through shared experts, and only pairs of overlap >= 2 are
//   listed and sorted;
// - overlap-1 pairs are never listed: once every pair of overlap >= 2 is decided, no such pair
//   has both blocks free, so the first free old block sharing any expert with new block a is the
//   first free overlap-1 partner the sorted greedy would give it. Blocks only become used, so one
//   cursor per expert walks its block list once.
// Time: O(P log block_size) for the P = num_blocks * block_size slots, plus the accumulation, sum
// over experts of (new blocks holding e) x (old blocks holding e): O(P) when replicas are few, up
// to the square of a hot expert's replica count (a few 100,000 additions at 4,096 slots).
std::vector<int> match_blocks(const std::int32_t* cur, const std::int32_t* old, int num_blocks,
                              int block_size, int num_experts) {
    const auto n = static_cast<std::size_t>(num_blocks);
    const BlockRuns fresh = block_runs(cur, num_blocks, block_size);
    const Holders holders =
        holders_of(block_runs(old, num_blocks, block_size), num_blocks, num_experts);
    std::vector<int> target(n, -1);
    std::vector<bool> used(n, false);
    for (const auto& [o, a, b] : overlapping_pairs(fresh, holders, num_blocks, block_size)) {
        if (target[a] < 0 && !used[b]) {
            target[a] = b;
            used[b] = true;
        }
    }
    // Overlap 1: the first free old block sharing an expert, new blocks in order.
    std::vector<int> cursor(holders.first.begin(), holders.first.end() - 1);
    for (int a = 0; a < num_blocks; ++a) {
        if (target[a] >= 0) continue;
        int best = num_blocks;
        for (int i = fresh.first[a]; i < fresh.first[a + 1]; ++i) {
            const std::int32_t e = fresh.expert[i];
            int& k = cursor[e];
            while (k < holders.first[e + 1] && used[holders.block[k]]) ++k;
            if (k < holders.first[e + 1]) best = std::min(best, holders.block[k]);
        }
        if (best < num_blocks) {
            target[a] = best;
            used[best] = true;
        }
    }
    int next = 0;
    for (int a = 0; a < num_blocks; ++a) {
        if (target[a] >= 0) continue;
        while (used[next]) ++next;
        target[a] = next;
        used[next] = true;
    }
    return target;
}

// Moves the blocks of `block_size` slots at cur[0, num_blocks * block_size) to the places
// match_blocks gives them against `old`, into `out`.
void move_blocks(const std::int32_t* cur, const std::int32_t* old, int num_blocks, int block_size,
                 int num_experts, std::int32_t* out) {
    const std::vector<int> target = match_blocks(cur, old, num_blocks, block_size, num_experts);
    for (int a = 0; a < num_blocks; ++a) {
        std::copy(cur + static_cast<Index>(a) * block_size,
                  cur + static_cast<Index>(a + 1) * block_size,
                  out + static_cast<Index>(target[a]) * block_size);
    }
}

// An assignment of n new blocks to n old blocks with the most overlap in all: `pairs` lists the
// pairs of positive overlap as (-overlap, new block, old block), every other pair overlaps by 0.
// Returns the old block of each new block; *kept (if given) receives the total overlap.
//
// Exact, as a min-cost flow (detail::MinCostFlow) of value n: source -> new block a (capacity
// 1) -> old block b (capacity 1, cost M - overlap) for each listed pair, or a -> hub (capacity 1,
// cost M) -> b (capacity 1, cost 0) for any other, then b -> sink (capacity 1); M is the largest
// overlap. A perfect assignment costs n M minus its overlap (a pair taken through the hub overlaps
// by at least 0), so the least-cost flow, integral, is an assignment of the most overlap; the hub
// keeps the network at O(n + pairs) arcs instead of n^2. Deterministic (arcs in a fixed order).
std::vector<int> best_assignment(int n, const std::vector<std::tuple<int, int, int>>& pairs,
                                 Index* kept = nullptr) {
    int largest = 0;
    for (const auto& [o, a, b] : pairs) largest = std::max(largest, -o);
    detail::MinCostFlow flow;
    const int source = 2 * n, hub = 2 * n + 1, sink = 2 * n + 2;
    flow.reset(2 * n + 3);
    for (int a = 0; a < n; ++a) flow.add_arc(source, a, 1, 0);
    std::vector<int> direct;  // arc ids of the listed pairs, in `pairs` order
    direct.reserve(pairs.size());
    for (const auto& [o, a, b] : pairs) direct.push_back(flow.add_arc(a, n + b, 1, largest + o));
    std::vector<int> to_hub(static_cast<std::size_t>(n)), from_hub(static_cast<std::size_t>(n));
    for (int a = 0; a < n; ++a) to_hub[a] = flow.add_arc(a, hub, 1, largest);
    for (int b = 0; b < n; ++b) from_hub[b] = flow.add_arc(hub, n + b, 1, 0);
    for (int b = 0; b < n; ++b) flow.add_arc(n + b, sink, 1, 0);
    const std::int64_t sent = flow.run(source, sink);
    MOELB_CHECK(sent == n, "the relabelling's assignment sent " << sent << " of " << n);
    std::vector<int> target(static_cast<std::size_t>(n), -1);
    Index total = 0;
    for (std::size_t i = 0; i < pairs.size(); ++i) {
        if (flow.flow(direct[i]) == 0) continue;
        const auto& [o, a, b] = pairs[i];
        target[a] = b;
        total -= o;
    }
    // The pairs through the hub: new and old blocks in ascending order (any pairing costs the
    // same).
    int b = 0;
    for (int a = 0; a < n; ++a) {
        if (flow.flow(to_hub[a]) == 0) continue;
        while (flow.flow(from_hub[b]) == 0) ++b;
        target[a] = b++;
    }
    if (kept) *kept = total;
    return target;
}

// The old GPU of each new GPU that keeps the most slots: GPUs of `num_domains` nodes, each node
// onto one node when num_domains > 1. With nodes: the best assignment of the GPUs of each pair
// (new node, old node) that shares an expert, then the best assignment of the nodes by those
// values -- which is the best assignment of all GPUs that maps nodes onto nodes (its total is a
// sum over the node pairs it uses, each at most that pair's best).
std::vector<int> exact_targets(const std::int32_t* cur, const std::int32_t* old, int num_experts,
                               int num_physical_experts, int ep_size, int num_domains) {
    const int W = ep_size, S = num_physical_experts / ep_size;  // DESIGN's letters
    const BlockRuns fresh = block_runs(cur, W, S);
    const Holders holders = holders_of(block_runs(old, W, S), W, num_experts);
    std::vector<std::tuple<int, int, int>> pairs = overlapping_pairs(fresh, holders, W, S, 1);
    if (num_domains <= 1) return best_assignment(W, pairs);
    const int R = W / num_domains;  // GPUs per node
    // The GPU pairs grouped by node pair: (new node, old node, -overlap, new GPU, old GPU).
    std::vector<std::tuple<int, int, int, int, int>> grouped;
    grouped.reserve(pairs.size());
    for (const auto& [o, a, b] : pairs) grouped.emplace_back(a / R, b / R, o, a % R, b % R);
    std::sort(grouped.begin(), grouped.end());
    // Each node pair's best GPU assignment (first: its range in `grouped`).
    struct NodePair {
        int new_node, old_node;
        std::size_t first;
        std::vector<int> target;
    };
    std::vector<NodePair> node_pairs;
    std::vector<std::tuple<int, int, int>> node_values, inner;
    for (std::size_t i = 0; i < grouped.size();) {
        const int na = std::get<0>(grouped[i]), nb = std::get<1>(grouped[i]);
        inner.clear();
        std::size_t j = i;
        for (; j < grouped.size() && std::get<0>(grouped[j]) == na && std::get<1>(grouped[j]) == nb;
             ++j) {
            const auto& [x, y, o, a, b] = grouped[j];
            inner.emplace_back(o, a, b);
        }
        std::sort(inner.begin(), inner.end());
        Index value = 0;
        node_pairs.push_back({na, nb, i, best_assignment(R, inner, &value)});
        node_values.emplace_back(-static_cast<int>(value), na, nb);
        i = j;
    }
    std::sort(node_values.begin(), node_values.end());
    const std::vector<int> node_target = best_assignment(num_domains, node_values);
    std::vector<int> target(static_cast<std::size_t>(W));
    for (int na = 0; na < num_domains; ++na) {
        const int nb = node_target[na];
        const auto it = std::find_if(node_pairs.begin(), node_pairs.end(), [&](const NodePair& p) {
            return p.new_node == na && p.old_node == nb;
        });
        for (int a = 0; a < R; ++a) {
            target[na * R + a] = nb * R + (it == node_pairs.end() ? a : it->target[a]);
        }
    }
    return target;
}

// Inside each GPU of `relabelled` (a layer's slots with its GPUs matched to old's): experts
// already in a slot of `old` stay there (each previous slot, in order, takes the first of the
// GPU's pending replicas of its expert); the rest fill the free slots in order. Writes phy2log.
void keep_slots_in_place(const std::int32_t* relabelled, const std::int32_t* old, int num_experts,
                         int ep_size, int slots_per_rank, std::int32_t* phy2log) {
    const int S = slots_per_rank;  // DESIGN's letter
    // `pending[e]` counts e's untaken replicas, `taken[e]` those kept in place.
    std::vector<int> pending(static_cast<std::size_t>(num_experts), 0),
        taken(static_cast<std::size_t>(num_experts), 0);
    std::vector<bool> filled(static_cast<std::size_t>(S));
    for (int g = 0; g < ep_size; ++g) {
        std::int32_t* dst = phy2log + static_cast<Index>(g) * S;
        const std::int32_t* src = relabelled + static_cast<Index>(g) * S;
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

// The move trade-off's candidate: a layer whose new placement gains `gain` (relative) in the
// plan's objective for `moves` rewritten slots.
struct MoveCandidate {
    Index layer;
    double gain;
    Index moves;
};

// The layers whose new placement changes slots and pays for its moves at move_cost; marks those
// that do not in keep_previous. The gain is in the plan's objective: the largest GPU load of the
// total, or the sum of the steps' largest, or the largest realised by the target dispatch (each
// layer's previous placement measured after the plan's earlier layers, plans.previous_realised).
std::vector<MoveCandidate> move_candidates(const PlanRequest& r, const LayerPlans& plans,
                                           std::vector<bool>& keep_previous) {
    std::vector<MoveCandidate> candidates;
    std::vector<std::int32_t> count;
    for (Index l = 0; l < r.num_layers; ++l) {
        const std::int32_t* old = r.previous_row(l);
        const LayerSteps st = layer_steps(r.steps, l);
        const LayerPlanStats before =
            layer_stats(r.load.row(l).data(), old, r.num_experts, r.num_physical_experts, r.ep_size,
                        plans.lower_bounds[l], nullptr, r.step_peak ? &st : nullptr, count);
        const LayerPlanStats& after = plans.stats.layers[static_cast<std::size_t>(l)];
        double old_max = r.step_peak ? before.step_max_rank_load : before.max_rank_load;
        double new_max = r.step_peak ? after.step_max_rank_load : after.max_rank_load;
        if (r.dispatch != PlanDispatch::kEqualSplit) {
            old_max = plans.previous_realised[static_cast<std::size_t>(l)];
            new_max = after.realised_max_rank_load;
        }
        Index moves = 0;
        for (int p = 0; p < r.num_physical_experts; ++p) moves += plans.phy2log(l, p) != old[p];
        const double gain = old_max > 0 ? (old_max - new_max) / old_max : 0.0;
        if (moves == 0) continue;
        if (gain <= 0 || gain < r.move_cost * static_cast<double>(moves)) {
            keep_previous[l] = true;
            continue;
        }
        candidates.push_back({l, gain, moves});
    }
    return candidates;
}

// max_moves: the candidates with the best gain per move first take the budget; marks the others
// in keep_previous.
void spend_move_budget(std::vector<MoveCandidate>& candidates, Index max_moves,
                       std::vector<bool>& keep_previous) {
    std::stable_sort(
        candidates.begin(), candidates.end(), [](const MoveCandidate& a, const MoveCandidate& b) {
            return a.gain / static_cast<double>(a.moves) > b.gain / static_cast<double>(b.moves);
        });
    Index budget = max_moves;
    for (const MoveCandidate& c : candidates) {
        if (c.moves <= budget) {
            budget -= c.moves;
        } else {
            keep_previous[c.layer] = true;
        }
    }
}

}  // namespace

void match_previous(std::int32_t* phy2log, const std::int32_t* old, int num_experts,
                    int num_physical_experts, int ep_size, int num_domains) {
    const int E = num_experts, P = num_physical_experts, W = ep_size, S = P / W;  // DESIGN's
    std::vector<std::int32_t> cur(phy2log, phy2log + P);
    std::vector<std::int32_t> out(static_cast<std::size_t>(P));
    if (num_domains > 1) {
        // The nodes first, then the GPUs inside each node.
        const int ranks_per_node = W / num_domains;
        move_blocks(cur.data(), old, num_domains, ranks_per_node * S, E, out.data());
        cur = out;
        for (int n = 0; n < num_domains; ++n) {
            const Index first = static_cast<Index>(n) * ranks_per_node * S;
            move_blocks(cur.data() + first, old + first, ranks_per_node, S, E, out.data() + first);
        }
    } else {
        move_blocks(cur.data(), old, W, S, E, out.data());
    }
    keep_slots_in_place(out.data(), old, E, W, S, phy2log);
}

void relabel_exactly(std::int32_t* phy2log, const std::int32_t* old, int num_experts,
                     int num_physical_experts, int ep_size, int num_domains) {
    const int P = num_physical_experts, S = P / ep_size;  // DESIGN's letters
    const std::vector<int> target =
        exact_targets(phy2log, old, num_experts, P, ep_size, num_domains);
    std::vector<std::int32_t> out(static_cast<std::size_t>(P));
    for (int g = 0; g < ep_size; ++g) {
        std::copy(phy2log + static_cast<Index>(g) * S, phy2log + static_cast<Index>(g + 1) * S,
                  out.begin() + static_cast<Index>(target[g]) * S);
    }
    keep_slots_in_place(out.data(), old, num_experts, ep_size, S, phy2log);
}

void trade_moves_for_balance(const PlanRequest& r, LayerPlans& plans) {
    if (r.algorithm != EplbAlgorithm::kMoelb || !r.previous ||
        !(r.move_cost > 0 || r.max_moves >= 0)) {
        return;
    }
    std::vector<bool> keep_previous(static_cast<std::size_t>(r.num_layers), false);
    std::vector<MoveCandidate> candidates = move_candidates(r, plans, keep_previous);
    if (r.max_moves >= 0) spend_move_budget(candidates, r.max_moves, keep_previous);
    Index kept = 0;
    std::vector<std::int32_t> count;
    for (Index l = 0; l < r.num_layers; ++l) {
        if (!keep_previous[l]) continue;
        plans.phy2log.row(l) = r.previous->physical_to_logical().row(l);
        plans.take_stats(r, l, plans.lower_bounds[l], count);
        plans.stats.layers[static_cast<std::size_t>(l)].kept_previous = true;
        ++kept;
    }
    if (kept > 0) {
        std::ostringstream note;
        note << kept << " layer(s) kept their previous placement. ";
        plans.notes += note.str();
    }
}

}  // namespace moelb::planner
