// Private to the EPLB planner (DESIGN section 4, the public side in moelb/eplb.hpp): what the
// planner's concerns share. One file per concern, roughly in the order a plan goes through them:
//
//   validate.cpp        rebalance()'s and evaluate_placement()'s input checks -> a PlanRequest
//   deepseek.cpp        DeepSeek's eplb.py, per layer (algorithm deepseek*, and a start for moelb)
//   locality.cpp        moelb's locality: which node (domain) holds each expert group
//   replica_counts.cpp  how many replicas each expert gets; the layer's flat lower bound
//   packing.cpp         replicas -> GPUs: LPT, duplicate repair, swap search (the Packing)
//   step_peak.cpp       the per-step peak objective's swap search (Objective::kStepPeak)
//   realised_static.cpp the target dispatch sglang_static: SGLang's file-path tables evaluated
//                       exactly, the swap search on them, the node-spread placement
//   connected.cpp       the target dispatch balanced: the connected replica layout, the
//                       never-worse check on the window's steps by the exact per-step split,
//                       and with previous the choice among rebuilt and repaired layouts
//   connected_repair.cpp  the balanced target's layout repaired from the previous one
//   previous.cpp        matching to the previous placement (greedy, and exact), and the move /
//                       balance trade-off
//   stats.cpp           a placement's statistics (LayerPlanStats, PlanStats)
//   plan_layers.cpp     the layer loops: DeepSeek's, and moelb's pipeline per layer
//   rebalance.cpp       the public API (eplb.hpp): validate -> plan the layers -> trade moves ->
//                       summarise
//
// Vocabulary (DESIGN "Conventions"): parameters carry full names -- num_layers, num_experts
// (E, logical experts), num_physical_experts (P, slots per layer), num_groups (expert groups; 0 =
// none), num_nodes, ep_size (W, EP ranks = GPUs), slots_per_rank
// (S = P / W). A function body may alias them with DESIGN's letters E, P, W, N, S, saying so where
// it does (never K: DESIGN's K is the top-k). Two arrays that almost every function takes keep
// short names: `w`, one layer's expert loads [num_experts] (eplb.py's `weight`), and `phy2log`, one
// layer's physical_to_logical [num_physical_experts] (eplb.py's name).
//
// The packing's words: a bin is an EP rank (GPU) with slots_per_rank slots; a domain is the bins
// of one node (node locality) or all of them; every expert's replicas live in one domain.
#pragma once

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "moelb/eplb.hpp"

namespace moelb::planner {

// =============================================================================================
// Vectors and keys (GCC/Clang extensions).
// =============================================================================================

// The swap searches scan pairs of replicas and steps kLanes doubles at a time (one AVX2 register;
// the vector kernels are in isa/eplb_kernels.cpp, compiled per ISA path): their arrays are padded
// to multiples of kLanes.
constexpr int kLanes = 4;

// 128-bit integers for (double bits, index) keys (a GCC/Clang extension; __extension__ tells
// -Wpedantic so).
__extension__ typedef unsigned __int128 Uint128;

// The complement of a load's bits: ascending keys order loads descending (non-negative doubles
// order like their bits; -0 is normalised to +0).
inline std::uint64_t descending_key(double load) {
    std::uint64_t bits;
    const double v = load + 0.0;
    std::memcpy(&bits, &v, sizeof bits);
    return ~bits;
}

// Sorts items by keys ascending, keeping the given order among equal keys (both arrays are
// permuted). packing.cpp.
void stable_sort_by_key(std::vector<std::uint64_t>& keys, std::vector<int>& items);

// =============================================================================================
// The divisor method (DeepSeek's replication, moelb's counts and bounds).
// =============================================================================================

// The divisor method: `num_extra` further replicas go one at a time to the item with the largest
// key(i, count) = weight(i) / count (ties to the lower i), never beyond `max_count` replicas.
// count[0, num_items) starts at 1; each extra is reported through give(i) in order.
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
T divisor_method(int num_items, int num_extra, int max_count, const Weight& weight, int* count,
                 const Give& give) {
    if (num_extra <= 0) return T(-1);
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
    while (leaves < num_items) leaves *= 2;
    thread_local std::vector<Key> tree;
    tree.resize(2 * static_cast<std::size_t>(leaves));
    for (int i = 0; i < num_items; ++i) tree[leaves + i] = key(i);  // (no branch: vectorises)
    for (int i = 0; i < num_items; ++i) {
        if (count[i] >= max_count) tree[leaves + i] = Key{0};
    }
    for (int i = num_items; i < leaves; ++i) tree[leaves + i] = Key{0};
    for (int j = leaves - 1; j >= 1; --j) tree[j] = std::max(tree[2 * j], tree[2 * j + 1]);
    for (int s = 0; s < num_extra && tree[1] != Key{0}; ++s) {  // stops if every item is capped
        const int i = static_cast<int>(kLow - static_cast<std::uint32_t>(tree[1]));
        give(i);
        ++count[i];
        // Up from the leaf, carrying the new maximum (a register, not a reload of the store).
        Key k = count[i] < max_count ? key(i) : Key{0};
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

// =============================================================================================
// Tolerances of moelb's searches.
// =============================================================================================

// Relative: a load must drop by this much to count as lower (rounding moves loads by ~1e-16).
constexpr double kRelTol = 1e-12;
// Relative: a maximum this close to the lower bound is at the bound (a search stops there).
constexpr double kTargetTol = 1e-9;

// =============================================================================================
// The packing: replicas in bins (packing.cpp).
// =============================================================================================

struct PackScratch;

// Replicas packed into bins (GPUs) of `size` slots. Bins come in domains (nodes) of
// bins_per_domain consecutive bins; every expert's replicas live in one domain and swaps stay
// inside a domain. All replicas of an expert carry the same load (its load / its replica count),
// so a slot only records its expert. Flat arrays, reused from packing to packing.
struct Packing {
    int size = 0;  // slots per bin (slots_per_rank)
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

    // `num_bins` bins of `slots_per_bin` slots in domains of `bins_per_domain`, for
    // `num_experts` experts.
    void reset(int num_bins_, int bins_per_domain_, int slots_per_bin, int num_experts) {
        num_bins = num_bins_;
        bins_per_domain = bins_per_domain_;
        size = slots_per_bin;
        slot_expert.resize(static_cast<std::size_t>(num_bins) * size);
        bin_load.assign(static_cast<std::size_t>(num_bins), 0.0);
        count.resize(static_cast<std::size_t>(num_experts));
        replica_load.resize(static_cast<std::size_t>(num_experts));
        domain_of.resize(static_cast<std::size_t>(num_experts));
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

    // Orders each domain's experts by (replica load desc, expert asc): the order LPT places them.
    void sort_order(PackScratch& s);
    // Gives expert e `delta` more replicas (it keeps at least one), keeping the LPT order sorted.
    void change_count(int e, int delta, const double* w);
    // Longest-processing-time first: every replica onto the lightest bin of its domain with room
    // that does not hold its expert yet.
    void lpt(PackScratch& s);
    // Removes duplicate experts within a bin by swaps that keep both bins at or below `limit`.
    void repair_duplicates(double limit, PackScratch& s);
    // Swaps replicas between the heaviest bin and lighter ones while that lowers the maximum,
    // down to `target` (a lower bound).
    void swap_search(double target, PackScratch& s);

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
    // The same in float32 (8 to a vector), for a quicker first test when the loads are in a range
    // where float32's rounding stays far below its margin (use_float).
    std::vector<float> slot_load32;
    int load_stride32 = 0;
    bool use_float = false;
    int stamp = 0;
    // Duplicate scans: in_bin[e] == bin_stamp marks the experts of the bin being scanned (a new
    // stamp per scan, so a scan costs its slots, not their square); dup_slots lists its slots
    // whose expert sits in an earlier slot.
    std::vector<int> in_bin, dup_slots;
    int bin_stamp = 0;
    // trial_lower_bound (replica_counts.cpp): a domain's replicas before and after a trial's move.
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

// Packs p.count replicas of each expert into the bins of its domain p.domain_of: LPT, duplicate
// repair, swap search down to `target`.
void pack_counts(Packing& p, const double* w, double target, PackScratch& s);

// The number of experts of `p` with two replicas on one bin although they have no more replicas
// than their domain has bins (so the duplicate could be avoided); *first (if given) is the
// smallest such expert.
int avoidable_duplicates(const Packing& p, PackScratch& s, int* first = nullptr);

// The packing of an existing layer placement phy2log, with equal-split loads w; bins (GPUs) in
// `num_domains` domains of consecutive GPUs.
void packing_of(Packing& p, const double* w, const std::int32_t* phy2log, int num_experts,
                int num_physical_experts, int ep_size, int num_domains);

// Writes a packing's bins as slots: bin b -> GPU b, experts in bin order.
void write_slots(const Packing& p, std::int32_t* phy2log);

// =============================================================================================
// The request: one rebalance() call's checked inputs (validate.cpp).
// =============================================================================================

struct PlanRequest {
    ConstMatrixMap<double> load;  // [num_layers, num_experts]; a series' sum over its steps
    const StepLoads* steps;       // the per-step loads [T, num_layers, num_experts], or nullptr
    Index num_layers;
    int num_experts;           // E
    int num_physical_experts;  // P
    int num_groups;            // 0 = none
    int num_nodes;
    int ep_size;  // W
    // kMoelb, or DeepSeek's policy that runs: kDeepSeekHierarchical or kDeepSeekGlobal (never
    // kDeepSeek, which is resolved to one of them).
    EplbAlgorithm algorithm;
    Locality locality;  // as asked (kMoelb only; may be kAuto)
    bool step_peak;     // Objective::kStepPeak
    const ExpertLocation* previous;
    double move_cost;
    Index max_moves;
    PlanDispatch dispatch;  // the target dispatch (kMoelb only)

    int slots_per_rank() const { return num_physical_experts / ep_size; }  // S
    // Layer l's previous slots, or nullptr without previous.
    const std::int32_t* previous_row(Index l) const {
        return previous ? previous->physical_to_logical().row(l).data() : nullptr;
    }
};

// Every load finite and >= 0, their sum at most kMaxTotalLoad (else an InvalidArgument naming
// `load`); num_steps > 1 says in the message that the sum runs over steps too.
void check_load_values(ConstMatrixMap<double> load, Index num_steps = 1);
// load's shape against the location's layers and logical experts, and its values.
void check_load_shape(ConstMatrixMap<double> load, const ExpertLocation& location);
// evaluate_placement's checks of the shapes of load, location and previous, and of the loads.
void check_evaluate_args(ConstMatrixMap<double> load, const ExpertLocation& location,
                         const ExpertLocation* previous);
// The largest num_experts x ep_size that dispatch kSglangStatic models (every rank's table entry
// of every expert, a few arrays of that size per layer): 2**22.
constexpr Index kMaxSglangStaticEntries = Index{1} << 22;
// A target dispatch's size limit (an InvalidArgument naming `dispatch`).
void check_dispatch_size(PlanDispatch dispatch, int num_experts, int ep_size);
// Validates a time series and sums it over the steps (in step order) into [L, E].
RowMatrix<double> sum_steps(const StepLoads& steps);
// Checks rebalance()'s arguments (load: a series' sum when `steps`), in the order its errors are
// documented to come, and returns them as a request.
PlanRequest check_rebalance_args(ConstMatrixMap<double> load, const RebalanceOptions& options,
                                 const StepLoads* steps);

// =============================================================================================
// The plan as it is made (rebalance.cpp's steps share it).
// =============================================================================================

struct LayerPlans {
    RowMatrix<std::int32_t> phy2log;  // [num_layers, num_physical_experts]
    // stats.layers: each layer's, taken right after it is planned (its data still in cache).
    PlanStats stats;
    std::vector<double> lower_bounds;  // moelb: each layer's flat lower bound (else empty)
    // dispatch kSglangStatic with previous: each layer's previous placement's realised largest
    // GPU load, after the plan's earlier layers (else empty).
    std::vector<double> previous_realised;
    std::string algorithm;   // what ran, e.g. "moelb(locality=node)"
    int location_nodes = 1;  // the location's num_nodes
    std::string notes;       // fallbacks and why, each sentence ending in ". "

    // Sets layer l's statistics from its slots, against `bound` (its flat lower bound; NaN:
    // computed here). `count` is scratch.
    void take_stats(const PlanRequest& request, Index l, double bound,
                    std::vector<std::int32_t>& count);
};

// =============================================================================================
// The concerns' entry points.
// =============================================================================================

// deepseek.cpp: rebalance_experts_hierarchical of DeepSeek's eplb.py for one layer, in float32
// like the original: `num_groups` groups over `num_nodes` nodes, `ep_size` GPUs. The global policy
// is num_groups = num_nodes = 1. Writes phy2log[0, num_physical_experts).
void deepseek_layer(const float* w, int num_experts, int num_physical_experts, int num_groups,
                    int num_nodes, int ep_size, std::int32_t* phy2log);

// locality.cpp: moelb's locality for a request (auto resolved, impossible node locality
// fallen back from, with the reasons in `notes`).
struct LocalityChoice {
    Locality locality = Locality::kNone;  // kNode or kNone
    int num_domains = 1;                  // num_nodes under node locality on several nodes, else 1
    int location_nodes = 1;               // the location's num_nodes
    std::string notes;
    // DeepSeek's policies whose placements satisfy this locality, as (num_groups, num_nodes).
    std::vector<std::pair<int, int>> deepseek_variants;
};
LocalityChoice choose_locality(const PlanRequest& request);
// locality.cpp: each expert's domain in p.domain_of (p reset with choice.num_domains domains):
// with several, the expert groups are assigned to nodes; else every expert is in domain 0.
void assign_domains(Packing& p, const double* w, const PlanRequest& request,
                    const LocalityChoice& choice);

// What flat_lower_bound leaves in its `count`: scratch (the bound may then come from the mean
// alone), or the divisor method's counts behind the bound, for all experts over all slots.
enum class BoundCounts { kScratch, kKeep };
// replica_counts.cpp: the flat lower bound of a layer: no placement of the experts (loads w) on
// num_physical_experts slots of ep_size GPUs has a lower maximum GPU load than max(total / ep_size,
// the divisor method's largest per-replica load).
double flat_lower_bound(const double* w, int num_experts, int num_physical_experts, int ep_size,
                        std::vector<int>& count, BoundCounts counts = BoundCounts::kScratch);
// replica_counts.cpp: p.count by the divisor method per domain, capped at the domain's bins
// (flat_count: flat_lower_bound's counts for this layer).
void initial_counts(Packing& p, const double* w, const std::vector<int>& flat_count);
// replica_counts.cpp: after packing, the count searches that lower p's maximum (down to `bound`)
// or remove avoidable duplicates, each trial repacked. `trial` is scratch.
void improve_counts(Packing& p, Packing& trial, const double* w, double bound, PackScratch& s);

// step_peak.cpp: one layer's per-step loads: expert e's load in step t (< num_steps) is the
// series' value offset + t * stride + e.
struct LayerSteps {
    const StepLoads* steps = nullptr;
    Index offset = 0;  // the layer's first value in step 0
    Index num_steps = 0;
    Index stride = 0;

    // Expert e's load in step t.
    double operator()(Index t, int e) const { return (*steps)[offset + t * stride + e]; }
};
// The per-step loads of layer l of a time series (empty without one).
inline LayerSteps layer_steps(const StepLoads* steps, Index l) {
    if (!steps) return {};
    const Index E = steps->num_experts;
    return {steps, l * E, steps->num_steps, steps->num_layers * E};
}
// step_peak.cpp: lowers the sum over steps of each step's largest GPU load by swaps of replicas
// between GPUs of a domain (counts and domains unchanged; p.bin_load follows).
void refine_step_peak(Packing& p, const LayerSteps& steps);

// previous.cpp: reorders a layer's GPUs (and nodes, with num_domains > 1 node domains) and the
// slots inside each GPU to match the previous placement `old` as well as possible.
void match_previous(std::int32_t* phy2log, const std::int32_t* old, int num_experts,
                    int num_physical_experts, int ep_size, int num_domains);
// previous.cpp: the exact relabelling (ours): permutes a layer's GPUs -- each node onto a node
// and GPUs within nodes when num_domains > 1 -- so that the most slots keep the expert they hold
// in `old` (the largest sum over GPUs of the multiset overlap of their experts; an assignment
// solved exactly as a min-cost flow), then keeps each GPU's shared experts in their old slots.
void relabel_exactly(std::int32_t* phy2log, const std::int32_t* old, int num_experts,
                     int num_physical_experts, int ep_size, int num_domains);
// previous.cpp: moelb with previous and a move_cost or max_moves: puts back the previous placement
// of every layer whose gain does not pay for its moves (or beyond the max_moves budget), with its
// statistics and a note.
void trade_moves_for_balance(const PlanRequest& request, LayerPlans& plans);

// realised_static.cpp: dispatch kSglangStatic on a moelb plan (plans.phy2log: the equal-split
// plan, matched to the previous placement): layer after layer, each rank's random stream
// carried on, the candidate placement with the lowest realised largest GPU load (the equal-split
// plan first, so never above it; then that plan improved by swaps within `choice`'s domains; and
// without locality on several nodes, the node-spread placement improved by swaps), never above
// what the standalone equal-split plan realises on its own streams (the previous layer re-rolled,
// else the standalone plan's earlier layers taken), its statistics with realised_max_rank_load,
// and plans.previous_realised with previous.
void plan_sglang_static(const PlanRequest& request, const LocalityChoice& choice,
                        LayerPlans& plans);
// realised_static.cpp: layers[l].realised_max_rank_load of every layer l of a placement
// (phy2log: [load.rows(), num_physical_experts] row-major) under SGLang's file-path tables, each
// rank originating load(l, e) / ep_size of every expert.
void realise_sglang_static(ConstMatrixMap<double> load, const std::int32_t* phy2log,
                           int num_experts, int num_physical_experts, int ep_size, int num_nodes,
                           std::vector<LayerPlanStats>& layers);

// connected.cpp: dispatch kBalanced on a moelb plan (plans.phy2log: the equal-split plan, matched
// to the previous placement): per layer (in parallel) the connected replica layout (one spanning
// hypertree per `choice` domain), matched to the previous placement, kept when its sum of the
// evaluation steps' ceil(T*) is below the equal-split plan's; realised_max_rank_load of every
// layer, and plans.previous_realised with previous.
void plan_balanced(const PlanRequest& request, const LocalityChoice& choice, LayerPlans& plans);
// connected_repair.cpp: scratch reused across layers.
struct RepairScratch {
    std::vector<std::vector<int>> holders;       // [E]: the GPUs holding a replica of each expert
    std::vector<double> rank_load;               // [W]: the equal-split load of each GPU
    std::vector<int> parent;                     // [W]: the pieces of the hypergraph (union-find)
    std::vector<int> order;                      // a domain's experts, heaviest first
    std::vector<std::pair<int, int>> redundant;  // (expert, index in holders) closing a cycle
    std::vector<std::int32_t> balanced;          // [P]: the swap search's layout
};
// connected_repair.cpp: the connected layout of a layer (loads w) repaired from its previous
// slots `old` [P]: the new replica counts `count` [E] and each expert's domain `domain_of` [E]
// (num_domains domains of consecutive GPUs) as the rebuilt layout's. Writes the repaired layout
// into `repaired` [P] and the swap search's swaps of single-copy experts that follow it, in
// order, into `swaps` (pairs of slots). Returns whether every domain with enough redundant
// slots to be one piece of the replica hypergraph (slots - experts >= GPUs - 1) is one.
bool repair_connected(const double* w, const std::int32_t* old, const std::vector<int>& count,
                      const std::vector<int>& domain_of, int num_domains, int num_physical_experts,
                      int ep_size, RepairScratch& s, std::vector<std::int32_t>& repaired,
                      std::vector<std::pair<int, int>>& swaps);
// connected.cpp: layers[l].realised_max_rank_load of every layer l of a placement (phy2log:
// [load.rows(), num_physical_experts] row-major) under the per-step exact split, on the
// evaluation steps of `steps` (or the summed load `load` when nullptr).
void realise_balanced(ConstMatrixMap<double> load, const StepLoads* steps,
                      const std::int32_t* phy2log, int num_experts, int num_physical_experts,
                      int ep_size, std::vector<LayerPlanStats>& layers);

// stats.cpp: the statistics of one layer of a placement: loads w, slots phy2log, `bound` the
// layer's flat lower bound (NaN: computed here), `previous` the previous slots (or nullptr),
// `steps` the layer's per-step loads (or nullptr). `count` is scratch.
LayerPlanStats layer_stats(const double* w, const std::int32_t* phy2log, int num_experts,
                           int num_physical_experts, int ep_size, double bound,
                           const std::int32_t* previous, const LayerSteps* steps,
                           std::vector<std::int32_t>& count);
// stats.cpp: layers[l].realised_max_rank_load of every layer of a placement (phy2log
// [load.rows(), num_physical_experts] row-major) as the target `dispatch` realises it (nothing
// under kEqualSplit): load [L, E] (a series' sum), `steps` the series or nullptr.
void realise(PlanDispatch dispatch, ConstMatrixMap<double> load, const StepLoads* steps,
             const std::int32_t* phy2log, int num_experts, int num_physical_experts, int ep_size,
             int num_nodes, std::vector<LayerPlanStats>& layers);
// stats.cpp: the whole plan's statistics from its layers' (and, under a target dispatch other
// than kEqualSplit, stats.dispatch, the realised balancedness).
void summarise(PlanStats& stats, bool has_steps);
// stats.cpp: evaluate_placement (arguments checked).
PlanStats evaluate(ConstMatrixMap<double> load, const ExpertLocation& location,
                   const ExpertLocation* previous, const StepLoads* steps, PlanDispatch dispatch);

// plan_layers.cpp: every layer by DeepSeek's policy (request.algorithm), with statistics.
LayerPlans plan_deepseek_layers(const PlanRequest& request);
// plan_layers.cpp: every layer by moelb, matched to the previous placement, with statistics.
LayerPlans plan_moelb_layers(const PlanRequest& request);

}  // namespace moelb::planner
