// The EPLB planner (DESIGN section 4; reference/eplb.md): from per-expert loads, how many replicas
// each logical expert gets and which GPU slot holds each replica.
//
// Algorithms:
//   kDeepSeekHierarchical / kDeepSeekGlobal / kDeepSeek (hierarchical when num_groups % num_nodes
//   == 0): DeepSeek's eplb.py exactly (float32 loads and pack sums as in eplb.py), with stable
//   tie rules: sorts are descending by load with ties to the lower index, argmax/argmin ties to
//   the lower index.
//   kMoelb: ours. Locality kNode keeps every expert group and its replicas on one node (groups may
//   be spread unevenly over nodes so that heavy nodes get more redundant slots); kNone places
//   freely. Replica counts by the divisor method, packing by LPT with a no-duplicate rule and a
//   swap local search that lowers the maximum GPU load; per layer the result is never worse than
//   DeepSeek's under the same locality. Two replicas of an expert share a GPU only when that
//   expert has more replicas than its domain has GPUs, or when the duplicate balances the layer
//   (a GPU then takes 2/c of the expert's tokens) and no swap or slot rewrite removes it without
//   raising the maximum GPU load (tests/python/test_eplb.py checks this on every layer). With
//   `previous`, GPUs and slots are matched to the old placement so unchanged experts stay where
//   they are, and move_cost / max_moves keep layers whose gain does not pay for their moves.
//
// Objectives (kMoelb): kTotal plans against each expert's load summed over the window. kStepPeak
// takes the window's per-step loads and, starting from the kTotal plan, swaps replicas between
// GPUs of a domain (same counts, no new same-GPU duplicate) while that lowers the sum over steps
// of each step's largest GPU load -- what a serving step waits for -- so experts that peak in the
// same steps end up on different GPUs. Its per-step peak is never above the kTotal plan's (unless
// move_cost / max_moves keep a layer's previous placement; under kStepPeak they weigh the gain in
// the per-step peak).
//
// Target dispatch (kMoelb, RebalanceOptions::dispatch; ours): every planner minimises the largest
// GPU load under an equal split of each expert over its replicas (kEqualSplit, the default).
// kSglangStatic plans for the load SGLang's `static` dispatch realises on the
// `--init-expert-location` file path (reference/dispatch.md sections 2-3; the kSglangStatic model
// of dispatch.hpp): each rank's table is a deterministic function of the placement file, so the
// planner evaluates it exactly and chooses which GPUs hold which replicas -- and so each rank's
// nearest replica and the replica order of the ranks that fall back to random.Random(42) -- to
// make the largest realised GPU load small. Planning model: each rank originates load[e] / W of
// every expert e (only window loads are known); the realised load of a GPU is the sum over its
// slots of the load the W ranks' tables send there. Under node locality every rank that holds no
// replica of a replicated expert falls back to SGLang's random choice (its same-node rule needs a
// strict subset of the list), and the planner can only choose placements whose draws come out
// even (swaps within nodes); without locality it also builds node-spread placements (an
// expert's replicas on distinct nodes; on every node, no rank draws).
// Per layer the result realises no more than the standalone equal-split plan (kEqualSplit, the
// same options, loaded through the same file path) realises on that layer, and no more than
// the equal-split plan's layer placed after this plan's earlier layers (each rank's random
// stream runs on from layer to layer, so a layer's table depends on the earlier layers'
// placements: the planner follows the standalone plan's streams too; realised_static.cpp);
// with `previous`, move_cost / max_moves weigh the realised gain (a layer that keeps its
// previous placement afterwards changes what the later layers realise).
// kBalanced plans for moelb's per-step exact split (balanced_split in dispatch.hpp: each step's
// tokens split over the replicas at the optimal largest GPU load ceil(T*)), whose optimum is
// limited by sets of GPUs that no replica links to the others: the replicated experts' replicas
// are laid out as one spanning hypertree over the GPUs (without node locality; one per node with
// it), connected whenever the domain's redundant slots are at least its GPUs - 1; the replica
// counts by the divisor method on the window's load (no forecast: the plan is a function of the
// window). Per layer the layout is kept only when the sum of ceil(T*) over the evaluation steps
// (K = min(T, 32) evenly spaced steps of a time series, or the summed load as one step) is
// lower than the equal-split plan's, so it is never worse on the window it was planned on
// (cpp/src/eplb/connected.cpp: the steps, the integer scaling of non-integer loads). With
// `previous`, the layout is also repaired from the previous one (connected_repair.cpp: counts
// updated, the previous replicas and links kept, only what changed re-placed, every GPU still
// linked, then swaps of single-copy experts), and per layer the previous placement, the
// repaired layout after 0, 1, 2, 4, ... of its swaps, the rebuilt layout and the equal-split
// plan (the last two relabelled exactly, relabel_ranks) compete: those at or below the
// equal-split plan's sum on the window, on their relative gain over the previous placement minus
// move_cost per slot rewritten (ties: fewer slots rewritten); then move_cost / max_moves weigh
// the realised gain as for every plan.
#pragma once

#include <cstdint>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "moelb/balancedness.hpp"
#include "moelb/expert_location.hpp"
#include "moelb/views.hpp"

namespace moelb {

// The most physical expert slots per layer rebalance() plans (2**20): far above any deployment
// (DeepSeek-V3 serves 256 experts in 288 slots), low enough that a typo cannot ask for gigabytes.
inline constexpr int kMaxPhysicalExperts = 1 << 20;
// The default RebalanceOptions::move_cost (Python: rebalance(move_cost=...), the CLI's
// --move-cost): with `previous`, a layer is re-placed only when its largest GPU load drops by at
// least 0.01% per slot rewritten (1% per 100 slots). Measured at DeepSeek-V3 scale on resampled
// windows (benchmarks/bench_move_cost.py): re-planning for sampling noise gains at most 5.6e-5
// per move (100-1,000 passes of 4,096 tokens), so nothing moves for noise (move_cost 0 rewrote
// 50-60% of the slots for +0.001-0.005 balancedness, none of it left on the next window), while
// a real change of popularity gains 2e-4 to 2e-3 per move and is followed all the same.
inline constexpr double kDefaultMoveCost = 1e-4;
// The largest sum of all loads (over layers, and steps) the planner and evaluate_placement /
// rank_loads take: finite loads whose sum overflows float64 would make every statistic inf or
// NaN, so their sum must stay far below the largest double (token counts are far below it).
inline constexpr double kMaxTotalLoad = 1e300;

enum class EplbAlgorithm { kDeepSeek, kDeepSeekHierarchical, kDeepSeekGlobal, kMoelb };
enum class Locality { kAuto, kNode, kNone };
enum class Objective { kTotal, kStepPeak };
// The dispatch a plan is made for (the load the planner minimises is the one it realises).
enum class PlanDispatch { kEqualSplit, kSglangStatic, kBalanced };

EplbAlgorithm parse_eplb_algorithm(std::string_view name, std::string_view param = "algorithm");
std::string_view to_string(EplbAlgorithm algorithm);
Locality parse_locality(std::string_view name, std::string_view param = "locality");
std::string_view to_string(Locality locality);
Objective parse_objective(std::string_view name, std::string_view param = "objective");
std::string_view to_string(Objective objective);
PlanDispatch parse_plan_dispatch(std::string_view name, std::string_view param = "dispatch");
std::string_view to_string(PlanDispatch dispatch);

// A read-only view of per-step loads [num_steps, num_layers, num_experts], row-major: a time
// series of expert loads, each value finite and >= 0; float64 `data`, or int32 `counts` (a
// recorder's per-pass token counts, read as they are) when `data` is empty.
struct StepLoads {
    std::span<const double> data;
    Index num_steps = 0;
    Index num_layers = 0;
    Index num_experts = 0;
    std::span<const std::int32_t> counts;

    std::size_t size() const { return data.empty() ? counts.size() : data.size(); }
    double operator[](Index i) const {
        return data.empty() ? static_cast<double>(counts[static_cast<std::size_t>(i)])
                            : data[static_cast<std::size_t>(i)];
    }
};

struct RebalanceOptions {
    int num_physical_experts = 0;  // P (slots per layer)
    int num_groups = 0;            // expert groups (0 = none)
    int num_nodes = 1;             // N
    int ep_size = 1;               // W (EP ranks)
    EplbAlgorithm algorithm = EplbAlgorithm::kMoelb;
    Locality locality = Locality::kAuto;      // kMoelb only
    Objective objective = Objective::kTotal;  // kStepPeak: kMoelb with per-step loads only
    // kMoelb with previous: a layer keeps its previous placement unless its relative max-load
    // reduction (kStepPeak: of the sum of the steps' max loads) is at least move_cost per moved
    // expert (0: any gain re-places the layer); max_moves (>= 0) caps the slots rewritten
    // over all layers (layers with the best gain per move first). -1 = no cap.
    const ExpertLocation* previous = nullptr;
    double move_cost = kDefaultMoveCost;
    Index max_moves = -1;
    // kMoelb only; kSglangStatic and kBalanced take objective kTotal (kBalanced reads a time
    // series' steps for its never-worse check and statistics).
    PlanDispatch dispatch = PlanDispatch::kEqualSplit;
};

struct LayerPlanStats {
    double max_rank_load = 0;  // max over GPUs of the sum of their replicas' loads (equal split)
    double mean_rank_load = 0;
    // SGLang's utilization rate (mean + 1e-5) / (max + 1e-5) (balancedness.hpp; 1 without load)
    double balancedness = 0;
    double lower_bound = 0;   // max(total / W, best achievable max per-replica load)
    double gap = 0;           // max(0, max_rank_load / lower_bound - 1) (0 without load)
    Index moved_experts = 0;  // slots whose expert changes vs previous (0 without previous)
    bool kept_previous = false;
    // With per-step loads: the sum over steps of each step's largest GPU load (>= max_rank_load,
    // which is the largest GPU's sum over steps); NaN without them.
    double step_max_rank_load = std::numeric_limits<double>::quiet_NaN();
    // Under a target dispatch other than kEqualSplit (PlanStats::dispatch): the largest GPU load
    // that dispatch realises (kSglangStatic: SGLang's file-path tables, each rank originating
    // 1/W of every expert's load; kBalanced: the sum over the evaluation steps of each step's
    // optimal largest GPU load ceil(T*) -- in the integer units the loads were scaled to, scaled
    // back -- times the layer's total load over the evaluated steps' load, so that
    // mean_rank_load / realised_max_rank_load is the evaluated steps' per-step balancedness
    // under the balanced dispatch, each step weighted by its largest load); NaN under
    // kEqualSplit. Every dispatch sends all the load somewhere, so the realised mean is
    // mean_rank_load.
    double realised_max_rank_load = std::numeric_limits<double>::quiet_NaN();
};

struct PlanStats {
    std::vector<LayerPlanStats> layers;
    // SGLang's balancedness (balancedness.hpp): the mean of the layers' balancedness over all
    // layers (a layer without load counts 1.0).
    double balancedness = 0;
    // The same mean over the layers with load only (NaN when none has load).
    double active_balancedness = std::numeric_limits<double>::quiet_NaN();
    double load_weighted_balancedness = 0;  // vLLM: sum of means / sum of maxes (not SGLang's)
    double mean_gap = 0;
    double max_gap = 0;
    Index moved_experts = 0;
    double wall_time_seconds = 0;
    // With per-step loads: balancedness() of mean_rank_load over step_max_rank_load, i.e. per layer
    // SGLang's rate of the steps' mean GPU loads summed over their largest summed (SGLang's
    // per-pass balancedness with each pass weighted by its largest load), over all layers.
    bool has_steps = false;
    double step_balancedness = std::numeric_limits<double>::quiet_NaN();
    // The dispatch the statistics target; except under kEqualSplit, realised_balancedness is
    // balancedness() of mean_rank_load over realised_max_rank_load, over all layers (NaN under
    // kEqualSplit; under kBalanced the mean over the layers of each layer's per-step
    // balancedness under the balanced dispatch, its evaluation steps weighted by their largest
    // load).
    PlanDispatch dispatch = PlanDispatch::kEqualSplit;
    double realised_balancedness = std::numeric_limits<double>::quiet_NaN();
    std::string algorithm;  // what ran, e.g. "moelb(locality=node)" or "deepseek_global"
    std::string notes;      // fallbacks and why
};

struct Plan {
    ExpertLocation location;
    PlanStats stats;
};

// load: [L, E] expert loads (finite, >= 0, summing to at most kMaxTotalLoad; else an
// InvalidArgument naming `load`).
Plan rebalance(ConstMatrixMap<double> load, const RebalanceOptions& options);
// The same for a time series [T, L, E] (T >= 1): plans against the loads summed over the steps
// (options.objective == kTotal) or against the per-step peaks (kStepPeak); the statistics include
// the per-step peaks either way.
Plan rebalance(const StepLoads& steps, const RebalanceOptions& options);

// `location` with each layer's EP ranks (GPUs) permuted -- with Locality::kNode the ranks of each
// node onto the ranks of one node (location's num_nodes), nodes permuted too; with kNone freely --
// and each rank's slots reordered so that the most slots hold the expert they hold in `previous`
// (ours). Exact: no such permutation keeps more slots (the largest sum over ranks of the
// multiset overlap of a rank's experts with its previous rank's, an assignment solved as a
// min-cost flow; under kNode over node pairs, then nodes), so the fewest weights move. Each
// rank's multiset of experts is unchanged, so any dispatch that ignores which rank is which and
// the order of slots within a rank (equal split, balanced) realises the same loads; SGLang's
// static tables may change (they read the replica order). Throws InvalidArgument for a
// `previous` of another shape (layers, logical and physical experts, ep_size) or a locality
// other than kNone / kNode. Dispatch kBalanced's plans with `previous` relabel their rebuilt
// layout and their equal-split plan this way.
ExpertLocation relabel_ranks(const ExpertLocation& location, const ExpertLocation& previous,
                             Locality locality = Locality::kNone);

// Per-rank loads [L, W] of a placement under equal split of each expert's load over its replicas.
RowMatrix<double> rank_loads(ConstMatrixMap<double> load, const ExpertLocation& location);

// The statistics of a placement for a load (moved experts counted against `previous` if given;
// with a `dispatch` other than kEqualSplit, also what that dispatch realises).
PlanStats evaluate_placement(ConstMatrixMap<double> load, const ExpertLocation& location,
                             const ExpertLocation* previous = nullptr,
                             PlanDispatch dispatch = PlanDispatch::kEqualSplit);
// The same for a time series [T, L, E], with the per-step peaks (the realised load of the sum).
PlanStats evaluate_placement(const StepLoads& steps, const ExpertLocation& location,
                             const ExpertLocation* previous = nullptr,
                             PlanDispatch dispatch = PlanDispatch::kEqualSplit);

}  // namespace moelb
