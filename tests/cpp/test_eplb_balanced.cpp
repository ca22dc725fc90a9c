// The planner's target dispatch kBalanced (eplb.hpp; cpp/src/eplb/connected.cpp): the realised
// statistics recomputed here from the public balanced_split on the documented evaluation steps;
// never worse than the equal-split plan on any layer; one connected piece of the replica graph
// (checked here by a union-find of the GPUs over the replicated experts) when the redundant slots
// allow it; identical for any thread count; the previous-placement trade-off; errors. With
// previous along a drifting chain of windows (the repaired layouts, connected_repair.cpp): never
// worse than the equal-split plan per layer, one piece, far fewer slots rewritten than the rebuilt
// plan relabelled at the same value; relabel_ranks against a brute force over all rank
// permutations.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <numeric>
#include <string>
#include <vector>

#include "moelb/dispatch.hpp"
#include "moelb/eplb.hpp"
#include "moelb/errors.hpp"
#include "moelb/expert_location.hpp"
#include "moelb/parallel.hpp"
#include "test_util.hpp"

namespace {

using namespace moelb::test_util;

using moelb::EplbAlgorithm;
using moelb::ExpertLocation;
using moelb::Index;
using moelb::Locality;
using moelb::Objective;
using moelb::Plan;
using moelb::PlanDispatch;
using moelb::PlanStats;
using moelb::RebalanceOptions;
using moelb::RowMatrix;
using moelb::StepLoads;

struct Shape {
    const char* name;
    int T, L, E, P, num_groups, N, W;
    std::uint32_t seed;
};

// A window of per-step token counts [T, L, E] (int32): skewed popularity, each step's counts
// noisy around it (a multiplicative factor in [0.5, 1.5] per step and expert), so the steps differ
// and the per-step split has something to balance. Layer 1 is idle in one step.
std::vector<std::int32_t> window_counts(const Shape& s) {
    Rng rng(s.seed);
    std::vector<double> popularity(static_cast<std::size_t>(s.L * s.E));
    for (double& x : popularity) {
        const double u = rng.uniform(0, 1);
        x = 400 * u * u * u + rng.uniform(1, 20);
    }
    std::vector<std::int32_t> out(static_cast<std::size_t>(s.T * s.L * s.E));
    for (int t = 0; t < s.T; ++t) {
        for (int l = 0; l < s.L; ++l) {
            for (int e = 0; e < s.E; ++e) {
                const double x = popularity[static_cast<std::size_t>(l * s.E + e)];
                const bool idle = l == 1 && t == 0;
                out[static_cast<std::size_t>((t * s.L + l) * s.E + e)] =
                    idle ? 0 : static_cast<std::int32_t>(std::lround(x * rng.uniform(0.5, 1.5)));
            }
        }
    }
    return out;
}

RebalanceOptions options(const Shape& s, Locality locality, PlanDispatch dispatch) {
    return {.num_physical_experts = s.P,
            .num_groups = s.num_groups,
            .num_nodes = s.N,
            .ep_size = s.W,
            .algorithm = EplbAlgorithm::kMoelb,
            .locality = locality,
            .dispatch = dispatch};
}

// The documented evaluation steps of a series of T steps: K = min(T, 32), step
// floor((2k + 1) T / 2K).
std::vector<Index> evaluation_steps(Index T) {
    const Index K = std::min<Index>(T, 32);
    std::vector<Index> out;
    for (Index k = 0; k < K; ++k) out.push_back((2 * k + 1) * T / (2 * K));
    return out;
}

// Per layer, what kBalanced reports as realised_max_rank_load, recomputed from balanced_split on
// integer counts: the evaluated steps' largest GPU loads summed, times the layer's total over the
// evaluated steps' total.
std::vector<double> balanced_realised(const std::vector<std::int32_t>& counts, const Shape& s,
                                      const ExpertLocation& loc) {
    const int S = s.P / s.W;
    std::vector<double> out;
    for (int l = 0; l < s.L; ++l) {
        double total = 0, evaluated = 0, sum_max = 0;
        for (int t = 0; t < s.T; ++t) {
            for (int e = 0; e < s.E; ++e)
                total += counts[static_cast<std::size_t>((t * s.L + l) * s.E + e)];
        }
        for (const Index t : evaluation_steps(s.T)) {
            RowMatrix<std::int64_t> step(1, s.E);
            for (int e = 0; e < s.E; ++e) {
                step(0, e) = counts[static_cast<std::size_t>((t * s.L + l) * s.E + e)];
                evaluated += static_cast<double>(step(0, e));
            }
            RowMatrix<std::int64_t> slots(1, s.P);
            moelb::balanced_split(loc, cmap(step), cmap(RowMatrix<std::int64_t>()), mmap(slots), l);
            std::int64_t largest = 0;
            for (int g = 0; g < s.W; ++g) {
                std::int64_t load = 0;
                for (int p = g * S; p < (g + 1) * S; ++p) load += slots(0, p);
                largest = std::max(largest, load);
            }
            sum_max += static_cast<double>(largest);
        }
        out.push_back(evaluated > 0 ? sum_max * total / evaluated : 0.0);
    }
    return out;
}

// The number of connected pieces of layer l's replica graph: GPUs joined by every expert with
// replicas on several GPUs.
int pieces(const ExpertLocation& loc, int l) {
    const int W = loc.ep_size(), E = loc.num_logical_experts();
    std::vector<int> parent(static_cast<std::size_t>(W));
    std::iota(parent.begin(), parent.end(), 0);
    auto root = [&](int g) {
        while (parent[g] != g) g = parent[g];
        return g;
    };
    for (int e = 0; e < E; ++e) {
        const auto reps = loc.replicas(l, e);
        for (std::size_t i = 1; i < reps.size(); ++i) {
            const int a = root(loc.rank_of_slot(reps[0])), b = root(loc.rank_of_slot(reps[i]));
            if (a != b) parent[b] = a;
        }
    }
    int n = 0;
    for (int g = 0; g < W; ++g) n += root(g) == g;
    return n;
}

class BalancedTarget : public ::testing::TestWithParam<Shape> {
  protected:
    void TearDown() override { moelb::set_num_threads(0); }
};

// The realised statistics are balanced_split's on the evaluation steps; evaluate_placement
// agrees; the realised balancedness is balancedness() of them.
TEST_P(BalancedTarget, RealisedLoadsAreWhatBalancedSplitGives) {
    const Shape s = GetParam();
    const std::vector<std::int32_t> counts = window_counts(s);
    const StepLoads steps{
        .num_steps = s.T, .num_layers = s.L, .num_experts = s.E, .counts = counts};
    for (const Locality locality : {Locality::kNode, Locality::kNone}) {
        SCOPED_TRACE(moelb::to_string(locality));
        const Plan plan = moelb::rebalance(steps, options(s, locality, PlanDispatch::kBalanced));
        EXPECT_EQ(plan.stats.dispatch, PlanDispatch::kBalanced);
        EXPECT_NE(plan.stats.algorithm.find("+balanced"), std::string::npos);
        const std::vector<double> want = balanced_realised(counts, s, plan.location);
        const PlanStats evaluated =
            moelb::evaluate_placement(steps, plan.location, nullptr, PlanDispatch::kBalanced);
        std::vector<double> mean, realised;
        for (int l = 0; l < s.L; ++l) {
            const auto& x = plan.stats.layers[static_cast<std::size_t>(l)];
            EXPECT_NEAR(x.realised_max_rank_load, want[static_cast<std::size_t>(l)],
                        1e-12 * std::max(1.0, want[static_cast<std::size_t>(l)]));
            EXPECT_EQ(evaluated.layers[static_cast<std::size_t>(l)].realised_max_rank_load,
                      x.realised_max_rank_load);
            mean.push_back(x.mean_rank_load);
            realised.push_back(x.realised_max_rank_load);
        }
        EXPECT_DOUBLE_EQ(plan.stats.realised_balancedness,
                         moelb::balancedness(mean, realised, moelb::LayerSet::kAll));
    }
}

// Per layer the realised load is never above the equal-split plan's on the same steps, and the
// plan is better overall; without locality, with redundant slots >= W - 1, every layer whose
// placement differs from the equal-split plan's is one connected piece, and most layers do.
TEST_P(BalancedTarget, NeverWorseThanTheEqualSplitPlanAndConnected) {
    const Shape s = GetParam();
    const std::vector<std::int32_t> counts = window_counts(s);
    const StepLoads steps{
        .num_steps = s.T, .num_layers = s.L, .num_experts = s.E, .counts = counts};
    for (const Locality locality : {Locality::kNode, Locality::kNone}) {
        SCOPED_TRACE(moelb::to_string(locality));
        const Plan ours = moelb::rebalance(steps, options(s, locality, PlanDispatch::kBalanced));
        const Plan equal = moelb::rebalance(steps, options(s, locality, PlanDispatch::kEqualSplit));
        const std::vector<double> mine = balanced_realised(counts, s, ours.location);
        const std::vector<double> theirs = balanced_realised(counts, s, equal.location);
        double mine_sum = 0, theirs_sum = 0;
        int changed = 0;
        for (int l = 0; l < s.L; ++l) {
            EXPECT_LE(mine[l], theirs[l]) << "layer " << l;
            mine_sum += mine[l];
            theirs_sum += theirs[l];
            const bool differs = ours.location.physical_to_logical().row(l) !=
                                 equal.location.physical_to_logical().row(l);
            changed += differs;
            if (locality == Locality::kNone && differs && s.P - s.E >= s.W - 1) {
                EXPECT_EQ(pieces(ours.location, l), 1) << "layer " << l;
            }
        }
        if (locality == Locality::kNone && s.P - s.E >= s.W - 1) {
            EXPECT_LT(mine_sum, theirs_sum);
            EXPECT_GE(2 * changed, s.L);
        }
        EXPECT_EQ(ours.location.num_nodes(), equal.location.num_nodes());
        if (locality == Locality::kNode &&
            ours.stats.algorithm.find("locality=node") != std::string::npos) {
            // Every expert's replicas on one node.
            const int node_slots = s.P / s.N;
            for (int l = 0; l < s.L; ++l) {
                for (int e = 0; e < s.E; ++e) {
                    const auto reps = ours.location.replicas(l, e);
                    for (const std::int32_t p : reps)
                        EXPECT_EQ(p / node_slots, reps[0] / node_slots);
                }
            }
        }
    }
}

TEST_P(BalancedTarget, IdenticalForAnyThreadCount) {
    const Shape s = GetParam();
    const std::vector<std::int32_t> counts = window_counts(s);
    const StepLoads steps{
        .num_steps = s.T, .num_layers = s.L, .num_experts = s.E, .counts = counts};
    std::vector<Plan> plans;
    for (const int threads : {1, 2, 3}) {
        moelb::set_num_threads(threads);
        plans.push_back(
            moelb::rebalance(steps, options(s, Locality::kNone, PlanDispatch::kBalanced)));
    }
    for (const Plan& p : plans) {
        EXPECT_EQ(p.location.physical_to_logical(), plans[0].location.physical_to_logical());
        EXPECT_EQ(p.stats.realised_balancedness, plans[0].stats.realised_balancedness);
    }
}

// With previous: a huge move cost keeps every previous placement (statistics those of the
// previous placement); no move cost takes the better realised plan; planning again on the same
// window from the plan moves nothing.
TEST_P(BalancedTarget, MovesWeighTheRealisedGain) {
    const Shape s = GetParam();
    const std::vector<std::int32_t> counts = window_counts(s);
    const StepLoads steps{
        .num_steps = s.T, .num_layers = s.L, .num_experts = s.E, .counts = counts};
    const ExpertLocation trivial = ExpertLocation::trivial(s.L, s.E, s.P, s.W, s.N);
    RebalanceOptions o = options(s, Locality::kNone, PlanDispatch::kBalanced);
    o.previous = &trivial;
    o.move_cost = 0;
    const Plan moved = moelb::rebalance(steps, o);
    const PlanStats before =
        moelb::evaluate_placement(steps, trivial, nullptr, PlanDispatch::kBalanced);
    EXPECT_GT(moved.stats.realised_balancedness, before.realised_balancedness);
    const std::vector<double> want = balanced_realised(counts, s, moved.location);
    for (int l = 0; l < s.L; ++l) {
        const auto& x = moved.stats.layers[static_cast<std::size_t>(l)];
        EXPECT_NEAR(x.realised_max_rank_load, want[l], 1e-12 * std::max(1.0, want[l]));
        EXPECT_LE(x.realised_max_rank_load,
                  before.layers[static_cast<std::size_t>(l)].realised_max_rank_load);
    }
    // Planning the same window again from the plan: a layer moves only for a strict gain (the
    // repair of the plan is a new candidate), and one that does not move keeps its placement.
    o.previous = &moved.location;
    const Plan again = moelb::rebalance(steps, o);
    for (int l = 0; l < s.L; ++l) {
        const auto& x = again.stats.layers[static_cast<std::size_t>(l)];
        const double was = moved.stats.layers[static_cast<std::size_t>(l)].realised_max_rank_load;
        if (x.moved_experts > 0) {
            EXPECT_LT(x.realised_max_rank_load, was) << "layer " << l;
        } else {
            EXPECT_EQ(x.realised_max_rank_load, was) << "layer " << l;
            EXPECT_EQ(again.location.physical_to_logical().row(l),
                      moved.location.physical_to_logical().row(l));
        }
    }
    o.previous = &trivial;
    o.move_cost = 1e9;
    const Plan kept = moelb::rebalance(steps, o);
    EXPECT_EQ(kept.location.physical_to_logical(), trivial.physical_to_logical());
    for (int l = 0; l < s.L; ++l) {
        EXPECT_EQ(kept.stats.layers[static_cast<std::size_t>(l)].realised_max_rank_load,
                  before.layers[static_cast<std::size_t>(l)].realised_max_rank_load);
    }
}

// A layer's ranks as multisets of experts (sorted), in rank order.
std::vector<std::vector<int>> rank_experts(const ExpertLocation& loc, int l) {
    const int W = loc.ep_size(), S = loc.num_local_physical_experts();
    std::vector<std::vector<int>> out(static_cast<std::size_t>(W));
    for (int p = 0; p < W * S; ++p) out[p / S].push_back(loc.physical_to_logical()(l, p));
    for (auto& r : out) std::sort(r.begin(), r.end());
    return out;
}

// The layer up to which rank is which.
std::vector<std::vector<int>> canonical(const ExpertLocation& loc, int l) {
    auto out = rank_experts(loc, l);
    std::sort(out.begin(), out.end());
    return out;
}

// The size of the multiset intersection of two sorted lists.
int overlap(const std::vector<int>& a, const std::vector<int>& b) {
    std::vector<int> both;
    std::set_intersection(a.begin(), a.end(), b.begin(), b.end(), std::back_inserter(both));
    return static_cast<int>(both.size());
}

// The most slots of `old`'s layer l that any permutation of `loc`'s ranks keeps (each of
// `nodes` nodes onto one node): every permutation of the W ranks tried.
int brute_force_kept(const ExpertLocation& loc, const ExpertLocation& old, int l, int nodes) {
    const auto a = rank_experts(loc, l), b = rank_experts(old, l);
    const int W = loc.ep_size(), R = W / nodes;
    std::vector<int> perm(static_cast<std::size_t>(W));
    std::iota(perm.begin(), perm.end(), 0);
    int best = 0;
    do {
        bool onto_nodes = true;
        for (int g = 0; g < W && onto_nodes; ++g) {
            onto_nodes = perm[g] / R == perm[g - g % R] / R;
        }
        if (!onto_nodes) continue;
        int kept = 0;
        for (int g = 0; g < W; ++g) kept += overlap(a[g], b[perm[g]]);
        best = std::max(best, kept);
    } while (std::next_permutation(perm.begin(), perm.end()));
    return best;
}

// A random layer row of P slots over E experts (each expert at least once, duplicates allowed).
std::vector<std::int32_t> random_row(Rng& rng, int E, int P) {
    std::vector<std::int32_t> row(static_cast<std::size_t>(P));
    for (int p = 0; p < P; ++p) row[p] = p < E ? p : static_cast<std::int32_t>(rng.below(E));
    for (int p = P - 1; p > 0; --p) std::swap(row[p], row[rng.below(p + 1)]);
    return row;
}

struct RelabelCase {
    int E, P, W, nodes;
};

TEST(RelabelRanks, KeepsTheMostSlotsOfAnyRankPermutation) {
    for (const RelabelCase c :
         {RelabelCase{6, 12, 4, 1}, RelabelCase{8, 12, 6, 1}, RelabelCase{9, 14, 7, 1},
          RelabelCase{8, 16, 8, 2}, RelabelCase{9, 12, 6, 3}}) {
        Rng rng(static_cast<std::uint32_t>(c.E * 100 + c.P + c.W));
        const int L = 6, S = c.P / c.W;
        RowMatrix<std::int32_t> old(L, c.P), fresh(L, c.P);
        for (int l = 0; l < L; ++l) {
            const auto a = random_row(rng, c.E, c.P);
            std::copy(a.begin(), a.end(), old.row(l).data());
            // Odd layers: old's ranks in reverse with a few slots rewritten; even: unrelated.
            auto b = random_row(rng, c.E, c.P);
            if (l % 2) {
                for (int p = 0; p < c.P; ++p) b[p] = a[(c.W - 1 - p / S) * S + p % S];
                for (int k = 0; k < c.P / 3; ++k) {
                    const int p = static_cast<int>(rng.below(c.P));
                    if (std::count(b.begin(), b.end(), b[p]) > 1) b[p] = rng.below(c.E);
                }
            }
            std::copy(b.begin(), b.end(), fresh.row(l).data());
        }
        const ExpertLocation previous(old, c.E, c.W, c.nodes), location(fresh, c.E, c.W, c.nodes);
        const Locality locality = c.nodes > 1 ? Locality::kNode : Locality::kNone;
        const ExpertLocation out = moelb::relabel_ranks(location, previous, locality);
        const int R = c.W / c.nodes;
        for (int l = 0; l < L; ++l) {
            int kept = 0;
            for (int p = 0; p < c.P; ++p) {
                kept += out.physical_to_logical()(l, p) == previous.physical_to_logical()(l, p);
            }
            EXPECT_EQ(kept, brute_force_kept(location, previous, l, c.nodes))
                << "W=" << c.W << " layer " << l;
            // The ranks permuted, nodes onto nodes.
            const auto before = rank_experts(location, l), after = rank_experts(out, l);
            for (int n = 0; n < c.nodes; ++n) {
                std::vector<std::vector<int>> mine(before.begin() + n * R,
                                                   before.begin() + (n + 1) * R);
                std::sort(mine.begin(), mine.end());
                bool found = false;
                for (int m = 0; m < c.nodes && !found; ++m) {
                    std::vector<std::vector<int>> theirs(after.begin() + m * R,
                                                         after.begin() + (m + 1) * R);
                    std::sort(theirs.begin(), theirs.end());
                    found = mine == theirs;
                }
                EXPECT_TRUE(found) << "W=" << c.W << " layer " << l << " node " << n;
            }
        }
    }
}

TEST(RelabelRanks, Errors) {
    const ExpertLocation a = ExpertLocation::trivial(2, 8, 12, 4, 2);
    EXPECT_THROW(moelb::relabel_ranks(a, ExpertLocation::trivial(3, 8, 12, 4, 2)),
                 moelb::InvalidArgument);
    EXPECT_THROW(moelb::relabel_ranks(a, ExpertLocation::trivial(2, 9, 12, 4, 2)),
                 moelb::InvalidArgument);
    EXPECT_THROW(moelb::relabel_ranks(a, ExpertLocation::trivial(2, 8, 16, 4, 2)),
                 moelb::InvalidArgument);
    EXPECT_THROW(moelb::relabel_ranks(a, ExpertLocation::trivial(2, 8, 12, 6, 2)),
                 moelb::InvalidArgument);
    try {
        moelb::relabel_ranks(a, a, Locality::kAuto);
        ADD_FAILURE() << "no error";
    } catch (const moelb::InvalidArgument& e) {
        EXPECT_NE(std::string(e.what()).find("locality='auto'"), std::string::npos) << e.what();
    }
}

// Counts [T, L, E] of `windows` windows of T / windows steps whose popularity drifts: each window
// blends a fifth of a new random popularity in.
std::vector<std::int32_t> drifting_counts(const Shape& s, int windows) {
    Rng rng(s.seed);
    std::vector<double> popularity(static_cast<std::size_t>(s.L * s.E));
    const auto fresh = [&] {
        const double u = rng.uniform(0, 1);
        return 400 * u * u * u + rng.uniform(1, 20);
    };
    for (double& x : popularity) x = fresh();
    std::vector<std::int32_t> out;
    for (int w = 0; w < windows; ++w) {
        for (double& x : popularity) x = 0.8 * x + 0.2 * fresh();
        for (int t = 0; t < s.T; ++t) {
            for (const double x : popularity) {
                out.push_back(static_cast<std::int32_t>(std::lround(x * rng.uniform(0.5, 1.5))));
            }
        }
    }
    return out;
}

// Along a chain of drifting windows, each planned from the plan before (the trivial placement
// first): per layer at or below the equal-split plan on its window (at move_cost 0; with a
// move cost where the layer did not keep its previous placement); a layer that is neither the
// equal-split plan nor its previous placement is one piece when the slots allow; at move_cost 0
// at or below the plan made without previous, and at the same value no more slots rewritten
// than that plan relabelled onto the previous placement (relabel_ranks: one of the candidates).
TEST_P(BalancedTarget, RepairsAlongADriftingChain) {
    const Shape s = GetParam();
    const int windows = 4;
    const std::vector<std::int32_t> all = drifting_counts(s, windows);
    const std::size_t per_window = static_cast<std::size_t>(s.T * s.L * s.E);
    for (const double move_cost : {0.0, moelb::kDefaultMoveCost}) {
        ExpertLocation current = ExpertLocation::trivial(s.L, s.E, s.P, s.W, s.N);
        for (int w = 0; w < windows; ++w) {
            const std::vector<std::int32_t> counts(all.begin() + w * per_window,
                                                   all.begin() + (w + 1) * per_window);
            const StepLoads steps{
                .num_steps = s.T, .num_layers = s.L, .num_experts = s.E, .counts = counts};
            RebalanceOptions o = options(s, Locality::kNone, PlanDispatch::kBalanced);
            o.previous = &current;
            o.move_cost = move_cost;
            const Plan plan = moelb::rebalance(steps, o);
            o.dispatch = PlanDispatch::kEqualSplit;
            const Plan equal = moelb::rebalance(steps, o);
            o.dispatch = PlanDispatch::kBalanced;
            o.previous = nullptr;
            const Plan fresh = moelb::rebalance(steps, o);
            const ExpertLocation relabelled = moelb::relabel_ranks(fresh.location, current);
            const std::vector<double> mine = balanced_realised(counts, s, plan.location);
            const std::vector<double> theirs = balanced_realised(counts, s, equal.location);
            for (int l = 0; l < s.L; ++l) {
                const auto& x = plan.stats.layers[static_cast<std::size_t>(l)];
                EXPECT_NEAR(x.realised_max_rank_load, mine[l], 1e-12 * std::max(1.0, mine[l]));
                if (move_cost == 0 || !x.kept_previous) {
                    EXPECT_LE(mine[l], theirs[l]) << "window " << w << " layer " << l;
                }
                const auto form = canonical(plan.location, l);
                if (s.P - s.E >= s.W - 1 && form != canonical(equal.location, l) &&
                    form != canonical(current, l)) {
                    EXPECT_EQ(pieces(plan.location, l), 1) << "window " << w << " layer " << l;
                }
                if (move_cost > 0) continue;
                const double rebuilt =
                    fresh.stats.layers[static_cast<std::size_t>(l)].realised_max_rank_load;
                EXPECT_LE(x.realised_max_rank_load, rebuilt) << "window " << w << " layer " << l;
                Index moves = 0;
                for (int p = 0; p < s.P; ++p) {
                    moves += relabelled.physical_to_logical()(l, p) !=
                             current.physical_to_logical()(l, p);
                }
                if (x.realised_max_rank_load == rebuilt) {
                    EXPECT_LE(x.moved_experts, moves) << "window " << w << " layer " << l;
                }
                Index changed = 0;
                for (int p = 0; p < s.P; ++p) {
                    changed += plan.location.physical_to_logical()(l, p) !=
                               current.physical_to_logical()(l, p);
                }
                EXPECT_EQ(x.moved_experts, changed);
            }
            current = plan.location;
        }
    }
}

INSTANTIATE_TEST_SUITE_P(Shapes, BalancedTarget,
                         ::testing::Values(Shape{"v3_like", 12, 4, 64, 80, 8, 4, 16, 3},
                                           Shape{"two_nodes", 8, 3, 24, 32, 4, 2, 8, 5},
                                           Shape{"one_node", 5, 3, 16, 24, 4, 1, 8, 7},
                                           Shape{"few_extra_slots", 40, 3, 30, 32, 0, 4, 8, 17},
                                           Shape{"no_redundancy", 6, 3, 32, 32, 8, 4, 8, 13},
                                           Shape{"demo", 6, 3, 256, 288, 8, 4, 32, 19}),
                         [](const ::testing::TestParamInfo<Shape>& info) {
                             return std::string(info.param.name);
                         });

// Without a time series the summed load is the one evaluation step; non-integer loads are scaled
// to integers, so the realised load stays within the documented resolution of ceil(T*) of the
// loads as they are: at least their mean GPU load, and never above the equal-split plan's.
TEST(BalancedTarget, FractionalTotalsAreOneStep) {
    const Shape s{"fractional", 1, 3, 32, 40, 4, 2, 8, 31};
    Rng rng(s.seed);
    RowMatrix<double> load(s.L, s.E);
    for (int l = 0; l < s.L; ++l) {
        for (int e = 0; e < s.E; ++e) load(l, e) = rng.uniform(0, 1) * rng.uniform(0, 1) * 1e-3;
    }
    const Plan ours =
        moelb::rebalance(cmap(load), options(s, Locality::kNone, PlanDispatch::kBalanced));
    const Plan equal =
        moelb::rebalance(cmap(load), options(s, Locality::kNone, PlanDispatch::kEqualSplit));
    const PlanStats theirs =
        moelb::evaluate_placement(cmap(load), equal.location, nullptr, PlanDispatch::kBalanced);
    for (int l = 0; l < s.L; ++l) {
        const auto& x = ours.stats.layers[static_cast<std::size_t>(l)];
        EXPECT_GE(x.realised_max_rank_load, x.mean_rank_load * (1 - 1e-9));
        EXPECT_LE(x.realised_max_rank_load,
                  theirs.layers[static_cast<std::size_t>(l)].realised_max_rank_load);
        // The exact split can do no worse than the equal split of the same placement.
        EXPECT_LE(x.realised_max_rank_load, x.max_rank_load * (1 + 1e-9));
    }
}

TEST(BalancedTarget, ErrorsNameTheParameter) {
    const Shape s{"small", 4, 2, 16, 24, 4, 2, 8, 29};
    const std::vector<std::int32_t> counts = window_counts(s);
    const StepLoads steps{
        .num_steps = s.T, .num_layers = s.L, .num_experts = s.E, .counts = counts};
    EXPECT_EQ(moelb::parse_plan_dispatch("balanced"), PlanDispatch::kBalanced);
    EXPECT_EQ(moelb::to_string(PlanDispatch::kBalanced), "balanced");
    RebalanceOptions o = options(s, Locality::kAuto, PlanDispatch::kBalanced);
    o.algorithm = EplbAlgorithm::kDeepSeek;
    expect_invalid_argument([&] { moelb::rebalance(steps, o); },
                            "dispatch='balanced' is moelb's target; algorithm='deepseek'");
    o.algorithm = EplbAlgorithm::kMoelb;
    o.objective = Objective::kStepPeak;
    expect_invalid_argument([&] { moelb::rebalance(steps, o); }, "objective='step_peak'");
}

}  // namespace
