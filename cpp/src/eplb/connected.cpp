// The target dispatch kBalanced (ours; issue 20; the research behind it:
// benchmarks/study_balanced_planning.py): plans for moelb's per-step exact split (balanced_split,
// reference/dispatch.md section 7), where each step's tokens are split over the replicas at the
// optimal largest GPU load ceil(T*). That optimum is bounded by every set of GPUs whose experts
// have no replica outside the set, so what limits it is how the replicas connect the GPUs: GPUs
// are vertices, each replicated expert a hyperedge over its GPUs. The connected layout makes that
// hypergraph one spanning hypertree per domain (all GPUs without node locality, one tree per node
// with it) whenever the domain has enough redundant slots (P_d - E_d >= W_d - 1).
//
// Per layer (layers in parallel, each independent of the others, so the result is the same at
// any thread count):
//   1. weights: each expert's load over the window (its mean up to a factor; no forecast, so
//      the plan is a function of the window it is judged on);
//   2. replica counts per domain by the divisor method (one each, then every further slot to the
//      largest load / count, ties to the lower expert; at most one replica per GPU of the domain);
//   3. the hypertree: the domain's GPUs in order (without node locality interleaved over the
//      nodes: node 0's first GPU, node 1's first, ..., then every node's second, ...); the
//      replicated experts by load, descending (ties to the lower id): the first takes the first r
//      GPUs of that order, each later one the next r - 1 GPUs not yet covered plus one covered GPU
//      (fewest slots taken first, then not on a node of the new GPUs, then the lower GPU); once
//      every GPU is covered, the replicas go to the GPUs with the fewest slots taken. No two
//      replicas of an expert share a GPU unless no other GPU has a free slot;
//   4. the single-copy experts by load, descending, each onto the GPU of the domain with the
//      smallest equal-split load that has a free slot (ties to the lower GPU);
//   5. without `previous`, the never-worse check: the layout and the equal-split plan are both
//      solved exactly on the same evaluation steps (below) and the layout is kept only when its
//      sum of the steps' ceil(T*) is lower (an integer comparison; ties keep the equal-split
//      plan);
//   6. with `previous` (choose_with_previous), candidates instead: the previous placement, the
//      layout repaired from it (connected_repair.cpp) after 0, 1, 2, 4, ... and all of its swap
//      search's swaps, the rebuilt layout and the equal-split plan -- the last two relabelled
//      exactly onto the previous placement (relabel_exactly: GPUs, and nodes under node
//      locality, permuted to keep the most slots; the optimum does not depend on which GPU is
//      which) -- each solved on the evaluation steps; those whose sum is at most the equal-split
//      plan's compete on their relative gain over the previous placement minus move_cost per
//      slot rewritten, ties to fewer slots rewritten. Rebuilding every window rewrote ~13,300 of
//      16,704 slots per window on the demo configuration at move_cost 0 (benchmarks/README.md).
//
// Evaluation steps: K = min(T, 32) steps of a time series of T steps, evenly spaced (step
// floor((2k + 1) T / 2K) for k < K); the summed load as one step without a time series (or when
// the chosen steps carry no load). Integer scaling (MakespanFlow works on token counts): a layer
// whose evaluated loads are all integers with the largest evaluated step total below 2^52 is
// solved as it is (token counts, int32 or float64); any other layer's loads are multiplied by the
// power of two that puts the largest evaluated step total in [2^31, 2^32) and rounded to the
// nearest integer (relative resolution <= 2^-31 of that step). The statistic realised_max_rank_load
// is the sum over the evaluated steps of ceil(T*) (scaled back), times the layer's total load over
// the evaluated steps' load, so that mean_rank_load / realised_max_rank_load is the evaluated
// steps' summed mean over their summed largest GPU load: the per-step balancedness under the
// balanced dispatch, each step weighted by its largest load.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <queue>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "../balanced_flow.hpp"
#include "moelb/parallel.hpp"
#include "planner.hpp"

namespace moelb::planner {
namespace {

// The most steps of a window the never-worse check (and the statistic) solves per layer.
constexpr Index kMaxEvaluationSteps = 32;
// Integer loads are solved as they are when the largest evaluated step total is below this.
constexpr double kExactLimit = 4503599627370496.0;  // 2^52
// Other loads are scaled so that the largest evaluated step total lies in [2^31, 2^32).
constexpr int kScaledExponent = 31;

// One layer's evaluation steps as integers: counts[k * E + e], and what turns a sum of the steps'
// ceil(T*) into realised_max_rank_load.
struct EvaluationSteps {
    std::vector<std::int64_t> counts;  // [K, E]
    Index num_steps = 0;               // K
    int exponent = 0;                  // the counts are the loads x 2^exponent
    double evaluated = 0.0;            // the evaluated steps' total load
    double layer_total = 0.0;          // the layer's total load

    // realised_max_rank_load of a sum of the steps' ceil(T*): scaled back, then by the layer's
    // total over the evaluated total (in this order, so that neither factor overflows alone).
    double realised(std::int64_t sum) const {
        if (!(evaluated > 0)) return 0.0;
        return std::ldexp(static_cast<double>(sum), -exponent) / evaluated * layer_total;
    }
};

// What evaluation_steps reads: the summed loads [L, E] and the series (or nullptr).
struct LoadView {
    ConstMatrixMap<double> load;
    const StepLoads* steps;
    int num_experts;
};

// The evaluated step indices of a series of T steps.
Index evaluated_step(Index k, Index K, Index T) { return (2 * k + 1) * T / (2 * K); }

// Layer l's evaluation steps (from the series when there is one, else the summed load `w`).
void evaluation_steps(const LoadView& v, Index l, EvaluationSteps& out) {
    const int E = v.num_experts;  // DESIGN's letter
    const double* w = v.load.row(l).data();
    double layer_total = 0;
    for (int e = 0; e < E; ++e) layer_total += w[e];
    thread_local std::vector<double> values;
    Index K = 1;
    if (v.steps) {
        const LayerSteps st = layer_steps(v.steps, l);
        K = std::min(st.num_steps, kMaxEvaluationSteps);
        values.resize(static_cast<std::size_t>(K * E));
        double evaluated = 0;
        for (Index k = 0; k < K; ++k) {
            const Index t = evaluated_step(k, K, st.num_steps);
            for (int e = 0; e < E; ++e) evaluated += values[k * E + e] = st(t, e);
        }
        if (!(evaluated > 0)) K = 0;  // the chosen steps carry no load: the summed load instead
    }
    if (!v.steps || K == 0) {
        K = 1;
        values.assign(w, w + E);
    }
    double largest = 0, evaluated = 0;
    bool integral = true;
    for (Index k = 0; k < K; ++k) {
        double step = 0;
        for (int e = 0; e < E; ++e) {
            const double x = values[k * E + e];
            step += x;
            integral = integral && x == std::floor(x);
        }
        largest = std::max(largest, step);
        evaluated += step;
    }
    // The scale as a power-of-two exponent applied by ldexp (2^exponent itself overflows a double
    // for step totals below about 2^-992).
    int exponent = 0;
    if (largest > 0 && !(integral && largest < kExactLimit)) {
        exponent = kScaledExponent - std::ilogb(largest);
    }
    out.num_steps = K;
    out.counts.resize(static_cast<std::size_t>(K * E));
    for (Index i = 0; i < K * E; ++i) out.counts[i] = std::llround(std::ldexp(values[i], exponent));
    out.exponent = exponent;
    out.evaluated = evaluated;
    out.layer_total = layer_total;
}

// One planner thread's scratch.
struct BalancedScratch {
    EvaluationSteps steps;
    detail::MakespanFlow flow;
    RowMatrix<std::int32_t> row;
    std::vector<std::int32_t> layout, count32;
    // The layout's construction.
    std::vector<int> count, domain_of, order, chosen, rest, experts;
    std::vector<std::vector<int>> rank_slots;
    std::vector<double> rank_load;
    std::vector<char> is_new_node, in_chosen;
    // With previous: choose_with_previous's layouts and the repair's scratch.
    std::vector<std::int32_t> work, repaired, best;
    std::vector<std::pair<int, int>> swaps;
    RepairScratch repair;
};

// The sum over the evaluation steps of ceil(T*) of a layer placement phy2log [P].
std::int64_t step_optimum_sum(const std::int32_t* phy2log, int num_experts,
                              int num_physical_experts, int ep_size, BalancedScratch& s) {
    s.row.resize(1, num_physical_experts);
    std::copy(phy2log, phy2log + num_physical_experts, s.row.data());
    const ExpertLocation location(s.row, num_experts, ep_size);
    std::int64_t sum = 0;
    for (Index k = 0; k < s.steps.num_steps; ++k) {
        s.flow.build(location, 0, s.steps.counts.data() + k * num_experts, nullptr);
        sum += s.flow.solve();
    }
    return sum;
}

// Step 2: count[e] for the experts of one domain (the divisor method on `slots` slots, at most
// `cap` replicas each while the experts' caps hold the slots; past experts x cap, every slot
// still goes to an expert, the method continuing without the cap, so that no slot is left empty).
void divisor_counts(const double* w, const std::vector<int>& experts, int slots, int cap,
                    std::vector<int>& count) {
    // (load per replica, -expert): the largest first, ties to the lower expert.
    std::priority_queue<std::pair<double, int>> heap;
    for (const int e : experts) {
        count[e] = 1;
        if (cap > 1) heap.emplace(w[e], -e);
    }
    int extra = slots - static_cast<int>(experts.size());
    for (; extra > 0 && !heap.empty(); --extra) {
        const int e = -heap.top().second;
        heap.pop();
        if (++count[e] < cap) heap.emplace(w[e] / count[e], -e);
    }
    if (extra <= 0) return;
    for (const int e : experts) heap.emplace(w[e] / count[e], -e);  // every expert at its cap
    for (; extra > 0; --extra) {
        const int e = -heap.top().second;
        heap.pop();
        heap.emplace(w[e] / ++count[e], -e);
    }
}

// Steps 2-4 for one domain: its experts `experts`, its GPUs `ranks` in tree order, S slots each;
// s.rank_slots[g] receives each GPU's experts.
void connected_domain(const double* w, const std::vector<int>& experts,
                      const std::vector<int>& ranks, int slots_per_rank, int ranks_per_node,
                      BalancedScratch& s) {
    const int S = slots_per_rank;  // DESIGN's letter
    const int R = static_cast<int>(ranks.size());
    divisor_counts(w, experts, R * S, R, s.count);
    std::vector<int> replicated, singles;
    for (const int e : experts) (s.count[e] > 1 ? replicated : singles).push_back(e);
    const auto by_load = [&](int a, int b) { return w[a] > w[b] || (w[a] == w[b] && a < b); };
    std::sort(replicated.begin(), replicated.end(), by_load);
    std::sort(singles.begin(), singles.end(), by_load);
    auto taken = [&](int g) { return static_cast<int>(s.rank_slots[g].size()); };
    std::vector<int> pool;
    // The GPUs the tree covers (any GPU that holds a replica: a replica attached outside the
    // pool, when the pool's slots are taken, covers its GPU too).
    std::vector<char> in_tree(s.in_chosen.size(), 0);
    int covered = 0;
    for (const int e : replicated) {
        const int r = s.count[e];
        const int fresh = std::min(covered == 0 ? r : r - 1, R - covered);
        s.chosen.clear();
        for (const int g : ranks) {
            if (static_cast<int>(s.chosen.size()) == fresh) break;
            if (!in_tree[g]) s.chosen.push_back(g);
        }
        if (static_cast<int>(s.chosen.size()) < r) {
            // Attach to covered GPUs: fewest slots taken, then not on a new GPU's node, then the
            // lower GPU. When the new GPUs fall short (every GPU covered), any GPU.
            for (const int g : s.chosen) s.is_new_node[g / ranks_per_node] = 1;
            pool.clear();
            for (const int g : ranks) {
                if (fresh != r - 1 || in_tree[g]) pool.push_back(g);
            }
            std::sort(pool.begin(), pool.end(), [&](int a, int b) {
                const auto key = [&](int g) {
                    return std::make_tuple(taken(g), s.is_new_node[g / ranks_per_node], g);
                };
                return key(a) < key(b);
            });
            for (const int g : s.chosen) s.is_new_node[g / ranks_per_node] = 0;
            // A pool too small: any GPU, fewest slots taken first (the study's rest).
            s.rest.assign(ranks.begin(), ranks.end());
            std::sort(s.rest.begin(), s.rest.end(), [&](int a, int b) {
                return std::make_pair(taken(a), a) < std::make_pair(taken(b), b);
            });
            for (const int g : s.chosen) s.in_chosen[g] = 1;
            for (const std::vector<int>* list : {&pool, &s.rest}) {
                for (const int g : *list) {
                    if (static_cast<int>(s.chosen.size()) == r) break;
                    if (!s.in_chosen[g] && taken(g) < S) {
                        s.chosen.push_back(g);
                        s.in_chosen[g] = 1;
                    }
                }
            }
            // Fewer GPUs with a free slot than replicas: the rest share GPUs (the emptiest).
            while (static_cast<int>(s.chosen.size()) < r) {
                int best = -1, best_used = S;
                for (const int g : ranks) {
                    const int used = taken(g) + static_cast<int>(std::count(s.chosen.begin(),
                                                                            s.chosen.end(), g));
                    if (used < best_used) {
                        best = g;
                        best_used = used;
                    }
                }
                s.chosen.push_back(best);
            }
            for (const int g : s.chosen) s.in_chosen[g] = 0;
        }
        for (const int g : s.chosen) {
            s.rank_slots[g].push_back(e);
            covered += in_tree[g] == 0;
            in_tree[g] = 1;
        }
    }
    for (const int g : ranks) {
        s.rank_load[g] = 0;
        for (const int e : s.rank_slots[g]) s.rank_load[g] += w[e] / s.count[e];
    }
    for (const int e : singles) {
        int best = -1;
        for (const int g : ranks) {
            if (taken(g) < S && (best < 0 || s.rank_load[g] < s.rank_load[best] ||
                                 (s.rank_load[g] == s.rank_load[best] && g < best))) {
                best = g;
            }
        }
        s.rank_slots[best].push_back(e);
        s.rank_load[best] += w[e];
    }
}

// The connected layout of layer l into s.layout [P]: `equal_split` gives each expert's node
// under node locality (num_domains > 1).
void connected_layout(const double* w, const PlanRequest& r, int num_domains, int num_nodes,
                      const std::int32_t* equal_split, BalancedScratch& s) {
    const int E = r.num_experts, P = r.num_physical_experts, W = r.ep_size;  // DESIGN's letters
    const int S = P / W, per_domain = W / num_domains, per_node = W / num_nodes;
    s.count.assign(static_cast<std::size_t>(E), 0);
    s.domain_of.assign(static_cast<std::size_t>(E), 0);
    if (num_domains > 1) {
        for (int p = 0; p < P; ++p) s.domain_of[equal_split[p]] = p / S / per_domain;
    }
    s.rank_slots.resize(static_cast<std::size_t>(W));
    for (auto& slots : s.rank_slots) slots.clear();
    s.rank_load.assign(static_cast<std::size_t>(W), 0.0);
    s.is_new_node.assign(static_cast<std::size_t>(num_nodes), 0);
    s.in_chosen.assign(static_cast<std::size_t>(W), 0);
    for (int d = 0; d < num_domains; ++d) {
        s.experts.clear();
        for (int e = 0; e < E; ++e) {
            if (s.domain_of[e] == d) s.experts.push_back(e);
        }
        s.order.clear();
        if (num_domains > 1) {
            for (int g = d * per_domain; g < (d + 1) * per_domain; ++g) s.order.push_back(g);
        } else {  // interleaved over the nodes
            for (int i = 0; i < per_node; ++i) {
                for (int n = 0; n < num_nodes; ++n) s.order.push_back(n * per_node + i);
            }
        }
        connected_domain(w, s.experts, s.order, S, per_node, s);
    }
    s.layout.resize(static_cast<std::size_t>(P));
    for (int g = 0; g < W; ++g) {
        std::copy(s.rank_slots[g].begin(), s.rank_slots[g].end(), s.layout.begin() + g * S);
    }
}

// The layouts a layer can take with `previous`, in the order ties between them are decided.
enum class Layout { kPrevious, kRepaired, kRebuilt, kEqualSplit };

struct Choice {
    Layout layout;
    std::int64_t value;  // the sum of the evaluation steps' ceil(T*)
};

// The slots of `a` whose expert differs from `b`'s ([P] each).
Index moved_slots(const std::vector<std::int32_t>& a, const std::int32_t* b) {
    Index moves = 0;
    for (std::size_t p = 0; p < a.size(); ++p) moves += a[p] != b[p];
    return moves;
}

// Whether layer placement `old` keeps every expert on the domain connected_layout gave it.
bool in_domains(const std::int32_t* old, int num_physical_experts, int num_domains,
                const std::vector<int>& domain_of) {
    const int slots_per_domain = num_physical_experts / num_domains;
    for (int p = 0; p < num_physical_experts && num_domains > 1; ++p) {
        if (domain_of[old[p]] != p / slots_per_domain) return false;
    }
    return true;
}

// With `previous` (layer slots `old`, its sum of ceil(T*) `before`), the candidates, each solved
// on the evaluation steps: the previous placement itself (when it keeps the domains), the
// repaired layout (connected_repair.cpp) and the repaired layout after the first 1, 2, 4, ...
// and all of the swap search's swaps (when the repair is one piece wherever the domain has the
// redundant slots to be), the rebuilt layout (s.layout) and the equal-split plan
// (phy2log), the last two relabelled exactly onto `old`. Those at or below the equal-split plan's
// sum (`equal`) compete on their relative gain over `old` minus move_cost per rewritten slot
// (ties: fewer slots rewritten, then the order above). The winner's slots land in s.best; it
// never sums above the equal-split plan on the window.
Choice choose_with_previous(const double* w, const PlanRequest& r, int num_domains,
                            const std::int32_t* phy2log, const std::int32_t* old,
                            std::int64_t equal, std::int64_t before, BalancedScratch& s) {
    const int E = r.num_experts, P = r.num_physical_experts, W = r.ep_size;  // DESIGN's letters
    Choice best{Layout::kEqualSplit, equal};
    bool found = false;
    double best_score = 0;
    Index best_moves = 0;
    // No layout sums below the steps' mean GPU loads rounded up (ceil(T*) >= ceil(total / W)),
    // so a candidate whose score at that floor cannot beat the best so far is not solved (the
    // choice is the same as solving it).
    std::int64_t floor = 0;
    for (Index k = 0; k < s.steps.num_steps; ++k) {
        const std::int64_t* step = s.steps.counts.data() + k * E;
        floor += detail::ceil_div(std::accumulate(step, step + E, std::int64_t{0}), W);
    }
    const auto score_of = [&](std::int64_t value, Index moves) {
        const double gain =
            before > 0 ? static_cast<double>(before - value) / static_cast<double>(before) : 0;
        return gain - r.move_cost * static_cast<double>(moves);
    };
    const auto beats = [&](double score, Index moves) {
        return !found || score > best_score || (score == best_score && moves < best_moves);
    };
    // `value` solves the candidate when it is needed.
    const auto consider = [&](Layout layout, const std::vector<std::int32_t>& slots,
                              const auto& value) {
        const Index moves = moved_slots(slots, old);
        if (!beats(score_of(floor, moves), moves)) return;
        const std::int64_t v = value();
        if (v > equal || !beats(score_of(v, moves), moves)) return;
        found = true;
        best = {layout, v};
        best_score = score_of(v, moves);
        best_moves = moves;
        s.best = slots;
    };
    const auto solve = [&](const std::vector<std::int32_t>& slots) {
        return [&] { return step_optimum_sum(slots.data(), E, P, W, s); };
    };
    const auto known = [](std::int64_t v) { return [v] { return v; }; };
    s.work.assign(old, old + P);
    if (in_domains(old, P, num_domains, s.domain_of)) {
        consider(Layout::kPrevious, s.work, known(before));
    }
    if (repair_connected(w, old, s.count, s.domain_of, num_domains, P, W, s.repair, s.repaired,
                         s.swaps)) {
        if (s.repaired == s.work) {
            consider(Layout::kRepaired, s.repaired, known(before));
        } else {
            consider(Layout::kRepaired, s.repaired, solve(s.repaired));
        }
        s.work = s.repaired;
        for (std::size_t done = 0, next = 1; done < s.swaps.size(); next *= 2) {
            for (const std::size_t until = std::min(next, s.swaps.size()); done < until; ++done) {
                std::swap(s.work[s.swaps[done].first], s.work[s.swaps[done].second]);
            }
            consider(Layout::kRepaired, s.work, solve(s.work));
        }
    }
    s.work = s.layout;
    relabel_exactly(s.work.data(), old, E, P, W, num_domains);
    consider(Layout::kRebuilt, s.work, solve(s.work));
    s.work.assign(phy2log, phy2log + P);
    relabel_exactly(s.work.data(), old, E, P, W, num_domains);
    consider(Layout::kEqualSplit, s.work, known(equal));
    return best;
}

}  // namespace

void plan_balanced(const PlanRequest& r, const LocalityChoice& choice, LayerPlans& plans) {
    const int E = r.num_experts, P = r.num_physical_experts, W = r.ep_size;  // DESIGN's letters
    const int N = plans.location_nodes;
    if (r.previous) plans.previous_realised.assign(static_cast<std::size_t>(r.num_layers), 0.0);
    std::vector<Layout> chosen(static_cast<std::size_t>(r.num_layers), Layout::kEqualSplit);
    parallel_for(r.num_layers, 1, [&](Index begin, Index end) {
        thread_local BalancedScratch s;
        for (Index l = begin; l < end; ++l) {
            const double* w = r.load.row(l).data();
            std::int32_t* phy2log = plans.phy2log.row(l).data();
            evaluation_steps({r.load, r.steps, E}, l, s.steps);
            connected_layout(w, r, choice.num_domains, N, phy2log, s);
            const std::int64_t equal = step_optimum_sum(phy2log, E, P, W, s);
            auto& layer = plans.stats.layers[static_cast<std::size_t>(l)];
            if (r.previous) {
                const std::int32_t* old = r.previous_row(l);
                const std::int64_t before = step_optimum_sum(old, E, P, W, s);
                plans.previous_realised[static_cast<std::size_t>(l)] = s.steps.realised(before);
                const Choice c =
                    choose_with_previous(w, r, choice.num_domains, phy2log, old, equal, before, s);
                chosen[static_cast<std::size_t>(l)] = c.layout;
                std::copy(s.best.begin(), s.best.end(), phy2log);
                plans.take_stats(r, l, plans.lower_bounds[static_cast<std::size_t>(l)], s.count32);
                layer.kept_previous = c.layout == Layout::kPrevious;
                layer.realised_max_rank_load = s.steps.realised(c.value);
                continue;
            }
            const std::int64_t ours = step_optimum_sum(s.layout.data(), E, P, W, s);
            if (ours < equal) {
                std::copy(s.layout.begin(), s.layout.end(), phy2log);
                plans.take_stats(r, l, plans.lower_bounds[static_cast<std::size_t>(l)], s.count32);
                chosen[static_cast<std::size_t>(l)] = Layout::kRebuilt;
            }
            layer.realised_max_rank_load = s.steps.realised(std::min(ours, equal));
        }
    });
    const auto count = [&](Layout layout) {
        return std::to_string(std::count(chosen.begin(), chosen.end(), layout));
    };
    if (r.previous) {
        plans.notes += "Against the previous placement: " + count(Layout::kRepaired) +
                       " layer(s) repaired, " + count(Layout::kRebuilt) + " rebuilt, " +
                       count(Layout::kEqualSplit) + " took the equal-split plan, " +
                       count(Layout::kPrevious) + " kept. ";
    } else if (const auto kept = std::count(chosen.begin(), chosen.end(), Layout::kEqualSplit);
               kept > 0) {
        plans.notes += std::to_string(kept) +
                       " layer(s) kept the equal-split plan (the connected layout was not lower "
                       "on the window's steps). ";
    }
}

void realise_balanced(ConstMatrixMap<double> load, const StepLoads* steps,
                      const std::int32_t* phy2log, int num_experts, int num_physical_experts,
                      int ep_size, std::vector<LayerPlanStats>& layers) {
    const int P = num_physical_experts;  // DESIGN's letter
    parallel_for(load.rows(), 1, [&](Index begin, Index end) {
        thread_local BalancedScratch s;
        for (Index l = begin; l < end; ++l) {
            evaluation_steps({load, steps, num_experts}, l, s.steps);
            layers[static_cast<std::size_t>(l)].realised_max_rank_load =
                s.steps.realised(step_optimum_sum(phy2log + l * P, num_experts, P, ep_size, s));
        }
    });
}

}  // namespace moelb::planner
