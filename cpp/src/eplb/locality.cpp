// moelb's locality (DESIGN section 4: locality="node" keeps each expert group and its replicas on
// one node, "none" places freely): the choice of locality for a request -- auto resolved, node
// locality fallen back from when the shape does not allow it, with the reason in the plan's notes
// -- and, under node locality, which node (the packing's domain) holds each expert group.
#include <algorithm>
#include <cstdint>
#include <numeric>
#include <sstream>
#include <string>
#include <vector>

#include "planner.hpp"

namespace moelb::planner {
namespace {

// assign_groups memoises node costs per subset of groups (a bitmask) up to this many groups.
constexpr int kMaxMemoGroups = 12;

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
// for the node holding groups[0, num_node_groups) (ascending) of group_size experts each, on
// slots_per_node slots of ranks_per_node GPUs. by_weight: each group's experts by (load desc,
// expert asc).
//
// The best per-replica max is that of the divisor method (capped at the node's GPUs), computed on
// the heaviest experts only: an expert gets its first extra replica only once every heavier one
// (ties: lower id) has one, so only the `extra` heaviest can get any, and the others keep their
// load as their replica's. The result equals running the method on all of the node's experts.
double node_cost(const double* w, const int* groups, int num_node_groups, int group_size,
                 const int* by_weight, int slots_per_node, int ranks_per_node, GroupScratch& s) {
    if (num_node_groups == 0) return 0.0;
    const int n = num_node_groups * group_size;  // the node's experts
    double total = 0.0;  // in ascending expert order, as a sum over the node's experts
    for (int i = 0; i < num_node_groups; ++i) {
        for (int j = 0; j < group_size; ++j) total += w[groups[i] * group_size + j];
    }
    const int extra = slots_per_node - n;
    int cap = ranks_per_node;
    if (static_cast<Index>(cap) * n < slots_per_node) {
        cap = (slots_per_node + n - 1) / n;  // cannot honour the cap
    }
    const int t = std::clamp(extra, 0, n);  // the experts that can get extras
    const int take = std::min(t + 1, n);    // ... and the heaviest of the others
    // The `take` heaviest by (load desc, expert asc): a merge of the groups' sorted lists.
    s.head.assign(static_cast<std::size_t>(num_node_groups), 0);
    s.top.clear();
    for (int k = 0; k < take; ++k) {
        int best = -1, best_e = -1;
        for (int i = 0; i < num_node_groups; ++i) {
            if (s.head[i] == group_size) continue;
            const int e = by_weight[groups[i] * group_size + s.head[i]];
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
    return std::max(total / ranks_per_node, m);
}

// One assign_groups call: a layer's loads w over num_groups groups of group_size experts, nodes
// of slots_per_node slots on ranks_per_node GPUs holding at most max_groups groups each, and the
// assignment node[0, num_groups) as it is made.
struct GroupAssignment {
    const double* w;
    int num_experts, num_groups, num_nodes, group_size, slots_per_node, ranks_per_node, max_groups;
    GroupScratch& s;
    int* node;
    bool memo = false;  // node costs memoised per group bitmask

    // The first assignment: every node gets one group first (heaviest groups spread), then LPT
    // of the group loads under capacity (DeepSeek's balanced packing when num_groups % num_nodes
    // == 0). Leaves the node loads in s.cost and the groups per node in s.count.
    void assign_by_lpt() {
        const int E = num_experts;
        s.group_load.assign(static_cast<std::size_t>(num_groups), 0.0);
        for (int g = 0; g < num_groups; ++g) {
            for (int j = 0; j < group_size; ++j) s.group_load[g] += w[g * group_size + j];
        }
        // Each group's experts by (load desc, expert asc): all experts sorted, then a stable pass
        // by group.
        s.keys.resize(static_cast<std::size_t>(E));
        s.experts.resize(static_cast<std::size_t>(E));
        for (int e = 0; e < E; ++e) {
            s.keys[e] = descending_key(w[e]);
            s.experts[e] = e;
        }
        stable_sort_by_key(s.keys, s.experts);
        s.by_weight.resize(static_cast<std::size_t>(E));
        s.head.assign(static_cast<std::size_t>(num_groups), 0);
        for (const int e : s.experts) {
            s.by_weight[e / group_size * group_size + s.head[e / group_size]++] = e;
        }
        s.order.resize(static_cast<std::size_t>(num_groups));
        std::iota(s.order.begin(), s.order.end(), 0);
        std::stable_sort(s.order.begin(), s.order.end(),
                         [&](int a, int b) { return s.group_load[a] > s.group_load[b]; });
        std::vector<double>& load = s.cost;  // the node loads (costs later)
        load.assign(static_cast<std::size_t>(num_nodes), 0.0);
        s.count.assign(static_cast<std::size_t>(num_nodes), 0);
        const int per_node = (num_groups % num_nodes == 0 && num_groups / num_nodes <= max_groups)
                                 ? num_groups / num_nodes
                                 : max_groups;
        for (int i = 0; i < num_groups; ++i) {
            const int g = s.order[i];
            int best = -1;
            for (int n = 0; n < num_nodes; ++n) {
                const bool must_fill = i < num_nodes;
                if (must_fill && s.count[n] > 0) continue;
                if (s.count[n] >= per_node) continue;
                if (best < 0 || load[n] < load[best]) best = n;
            }
            node[g] = best;
            ++s.count[best];
            load[best] += s.group_load[g];
        }
    }

    // Starts the memo of node costs for this call (with few enough groups).
    void start_memo() {
        memo = num_groups <= kMaxMemoGroups;
        if (!memo) return;
        const std::size_t size = std::size_t{1} << num_groups;
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
    double cost_of(int n, int g1, int n1, int g2, int n2) {
        const auto on = [&](int g) { return g == g1 ? n1 : g == g2 ? n2 : node[g]; };
        std::uint64_t mask = 0;
        if (memo) {
            for (int g = 0; g < num_groups; ++g) {
                if (on(g) == n) mask |= std::uint64_t{1} << g;
            }
            if (s.memo_stamp[mask] == s.stamp) return s.memo[mask];
        }
        s.groups.clear();
        for (int g = 0; g < num_groups; ++g) {
            if (on(g) == n) s.groups.push_back(g);
        }
        const double c =
            node_cost(w, s.groups.data(), static_cast<int>(s.groups.size()), group_size,
                      s.by_weight.data(), slots_per_node, ranks_per_node, s);
        if (memo) {
            s.memo[mask] = c;
            s.memo_stamp[mask] = s.stamp;
        }
        return c;
    }

    // Moves and swaps of groups between nodes while one lowers the largest node cost (s.cost):
    // each round, the move or swap of a group of the costliest node that lowers the larger of the
    // two nodes' costs the most.
    void improve() {
        std::vector<double>& cost = s.cost;
        for (int n = 0; n < num_nodes; ++n) cost[n] = cost_of(n, -1, -1, -1, -1);
        for (int it = 0; it < 4 * num_groups * num_nodes + 16; ++it) {
            const int a =
                static_cast<int>(std::max_element(cost.begin(), cost.end()) - cost.begin());
            double best = cost[a] * (1 - kTargetTol);
            double best_ca = 0.0, best_cb = 0.0;
            int best_b = -1, best_g = -1, best_h = -1;
            for (int g = 0; g < num_groups; ++g) {
                if (node[g] != a) continue;
                for (int b = 0; b < num_nodes; ++b) {
                    if (b == a) continue;
                    // Keeps the trial (g to b, and h to a if h >= 0) if it lowers the larger of
                    // the two nodes' costs the most so far.
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
                    for (int h = 0; h < num_groups; ++h) {  // swap g with a group h of b
                        if (node[h] == b) consider(h);
                    }
                }
            }
            if (best_b < 0) break;
            node[best_g] = best_b;
            if (best_h >= 0) node[best_h] = a;
            std::fill(s.count.begin(), s.count.end(), 0);
            for (int g = 0; g < num_groups; ++g) ++s.count[node[g]];
            cost[a] = best_ca;
            cost[best_b] = best_cb;
        }
    }
};

// Groups -> nodes for node locality: the LPT assignment of group loads, then moves and swaps of
// groups between nodes that lower the largest node cost (node_cost). Every node must end with
// at least one group and at most slots_per_node experts. Writes node[0, num_groups).
void assign_groups(const double* w, int num_experts, int num_groups, int num_nodes,
                   int slots_per_node, int ranks_per_node, GroupScratch& s, int* node) {
    const int group_size = num_experts / num_groups;
    GroupAssignment assignment{w,
                               num_experts,
                               num_groups,
                               num_nodes,
                               group_size,
                               slots_per_node,
                               ranks_per_node,
                               slots_per_node / group_size,
                               s,
                               node};
    assignment.assign_by_lpt();
    assignment.start_memo();
    assignment.improve();
}

// Why node locality cannot hold for this request (nullptr: it can).
const char* node_locality_impossible(const PlanRequest& r) {
    const int E = r.num_experts, P = r.num_physical_experts;  // DESIGN's letters
    const int num_groups = r.num_groups, num_nodes = r.num_nodes;
    const int group_size = num_groups > 0 && E % num_groups == 0 ? E / num_groups : 0;
    if (num_groups <= 0) return "there are no expert groups";
    if (E % num_groups != 0) return "num_experts is not divisible by num_groups";
    if (num_groups < num_nodes) return "there are fewer groups than nodes";
    if (group_size > P / num_nodes) return "a group has more experts than a node has slots";
    if (static_cast<Index>(P / num_nodes / group_size) * num_nodes < num_groups) {
        return "the groups do not fit the nodes' slots";
    }
    return nullptr;
}

// DeepSeek's policies whose placements satisfy a locality, as (num_groups, num_nodes) pairs.
std::vector<std::pair<int, int>> deepseek_variants(const PlanRequest& r, Locality locality,
                                                   bool node_locality) {
    const int num_groups = r.num_groups, num_nodes = r.num_nodes;
    std::vector<std::pair<int, int>> variants;
    const bool hierarchical_valid = num_groups > 0 && r.num_experts % num_groups == 0 &&
                                    num_groups % num_nodes == 0 && r.ep_size % num_nodes == 0;
    if (node_locality) {
        if (hierarchical_valid) variants.emplace_back(num_groups, num_nodes);
    } else {
        variants.emplace_back(1, 1);
        // Node locality on one node runs unconstrained, but must still not lose to DeepSeek's
        // hierarchical policy (which breaks ties differently from the global one).
        if (hierarchical_valid && locality == Locality::kNode && num_groups > 1) {
            variants.emplace_back(num_groups, num_nodes);
        }
    }
    return variants;
}

}  // namespace

LocalityChoice choose_locality(const PlanRequest& r) {
    LocalityChoice out;
    std::ostringstream notes;
    Locality locality = r.locality;
    if (locality == Locality::kAuto) {
        locality = (r.num_groups > 0 && r.num_groups % r.num_nodes == 0) ? Locality::kNode
                                                                         : Locality::kNone;
    }
    out.location_nodes = r.num_nodes;
    if (r.ep_size % r.num_nodes != 0) {
        notes << "ep_size=" << r.ep_size << " is not divisible by num_nodes=" << r.num_nodes
              << ": planned without node locality, location has num_nodes=1. ";
        locality = Locality::kNone;
        out.location_nodes = 1;
    }
    if (locality == Locality::kNode) {
        if (const char* why = node_locality_impossible(r)) {
            notes << "node locality impossible (" << why << "): planned without it. ";
            locality = Locality::kNone;
        }
    }
    const bool node_locality = locality == Locality::kNode && r.num_nodes > 1;
    out.locality = locality;
    out.num_domains = node_locality ? r.num_nodes : 1;
    out.notes = notes.str();
    out.deepseek_variants = deepseek_variants(r, locality, node_locality);
    return out;
}

void assign_domains(Packing& p, const double* w, const PlanRequest& r,
                    const LocalityChoice& choice) {
    if (choice.num_domains == 1) {
        std::fill(p.domain_of.begin(), p.domain_of.end(), 0);
        return;
    }
    thread_local GroupScratch scratch;
    thread_local std::vector<int> node;  // each group's node
    node.resize(static_cast<std::size_t>(r.num_groups));
    assign_groups(w, r.num_experts, r.num_groups, r.num_nodes,
                  r.num_physical_experts / choice.num_domains, r.ep_size / choice.num_domains,
                  scratch, node.data());
    const int group_size = r.num_experts / r.num_groups;
    for (int e = 0; e < r.num_experts; ++e) p.domain_of[e] = node[e / group_size];
}

}  // namespace moelb::planner
