// The target dispatch kSglangStatic (rebalance(dispatch="sglang_static"); DESIGN section 4,
// reference/dispatch.md sections 2-3): planning for the load SGLang's static table realises on the
// `--init-expert-location` file path. Ours: SGLang plans for an equal split like every planner.
//
// The model. Rank r's table entry for expert e is its nearest replica (own GPU, else own node when
// the node's replicas are a strict subset of the list), else -- r "falls back" -- element pos of
// `_fair_choices(list, k, rng)` (the list repeated k / n times, `rng.sample(list, k % n)`,
// `rng.shuffle`), k the number of ranks without a nearest replica and pos r's place among them.
// Each rank draws from its own random.Random(42), only where it falls back, layer after layer and
// expert after expert, so a rank's stream is one sequence (the same for every rank) read from a
// cursor that each fallback moves on. Planning model: each rank originates load[e] / W of every
// expert e; a slot's realised load is that share times the ranks whose table sends e there.
//
// StaticLayer evaluates one layer exactly and incrementally: a swap of two slots recomputes the
// two experts' columns, the draws of the ranks whose fallback changed (their cursors move, so all
// their later draws in the layer), and the other ranks' draws of the two experts only (same
// cursor, another place among the ranks that fall back). The pass over a plan's layers keeps, per
// layer, the candidate with the lowest realised largest GPU load (ties: the earlier): the
// equal-split plan; without locality on several nodes, two node-spread placements (replicas on
// distinct nodes: whole, an expert on every node so that no rank draws; partial, one node more
// at a time) improved by swaps; and the equal-split plan improved by swaps within its domains,
// unless a node-spread placement already realises what the equal-split plan promises. Then it
// moves every rank's cursor past the chosen layer.
//
// Never worse per layer than the standalone equal-split plan (issue 20): that plan, loaded on
// its own, reads the streams its own earlier layers leave, so its layer l may realise less than
// the same layer after this plan's earlier layers. The pass follows the standalone plan's
// streams beside its own; when no candidate of layer l realises at most what the standalone's
// layer l does, it re-rolls layer l's streams: a walk of random swaps in layer l - 1 (within its
// domains; each kept when that layer realises no more than it did, so layer l - 1 keeps its
// guarantees) until layer l's failed best or the equal-split layer realises at most that from
// the streams layer l - 1 now leaves (kRerollTries swaps at most; measured, 1-131 swaps on
// DeepSeek-V3-scale loads). Failing that, layers 0 .. l - 1 become the standalone plan's (the
// streams are then its streams, and layer l's first candidate realises exactly its value) and
// layer l is planned again. Each layer is planned at most twice. The guarantee is before the move
// trade-off: previous.cpp may then keep a layer's previous placement, and that layer and the
// later ones may realise more (rebalance.cpp realises the final plan again).
#include <algorithm>
#include <cstdint>
#include <limits>
#include <numeric>
#include <queue>
#include <tuple>
#include <utility>
#include <vector>

#include "../py_random.hpp"
#include "planner.hpp"

namespace moelb::planner {
namespace {

// The time knobs of a layer's swap search: at most kSearchEvaluations exact evaluations (swaps
// tried) and kSearchWork draws (random numbers read plus fair-choice places traced; an
// evaluation's draws grow as W^2 where ranks draw). A step tries at most kTriesPerStep swaps, in
// the order of their estimated gain: past that the estimate no longer predicts a gain well.
constexpr int kSearchEvaluations = 1500;
constexpr std::size_t kSearchWork = std::size_t{1} << 21;
constexpr int kTriesPerStep = 24;
// A node-spread placement that realises within this fraction of the largest GPU load the
// equal-split plan promises is kept without searching the equal-split plan's swaps.
constexpr double kPromiseTolerance = 1e-3;
// The most swaps a re-roll of a layer's streams tries (the pass's guarantee; see above).
constexpr int kRerollTries = 512;

// The outputs of random.Random(42)'s generator, as far as a stream has read them.
class Stream42 {
  public:
    std::uint32_t operator[](std::size_t i) {
        while (i >= outputs_.size()) {
            for (int k = 0; k < kBlock; ++k) outputs_.push_back(generator_.genrand_uint32());
        }
        return outputs_[i];
    }

  private:
    static constexpr int kBlock = 1 << 14;
    detail::PyRandom generator_{42};
    std::vector<std::uint32_t> outputs_;
};

// A rank's random.Random(42) from its cursor (detail::py_* draw from it).
struct Cursor {
    Stream42* stream;
    std::size_t position;
    std::uint32_t genrand_uint32() { return (*stream)[position++]; }
};

// The layer's shape in DESIGN's letters: E experts, P slots, W ranks of S slots, N nodes of
// ranks_per_node ranks.
struct Geometry {
    int E, P, W, S, N, ranks_per_node;
};

Geometry geometry(int num_experts, int num_physical_experts, int ep_size, int num_nodes) {
    return {num_experts, num_physical_experts, ep_size, num_physical_experts / ep_size,
            num_nodes,   ep_size / num_nodes};
}

// Every rank's SGLang table of one layer and the load it realises, kept exact across swaps.
class StaticLayer {
  public:
    explicit StaticLayer(Stream42& stream) : stream_(&stream) {}

    // The layer with loads w [E] and slots phy2log [P], each rank r's stream at start[r].
    void reset(const Geometry& g, const double* w, const std::int32_t* phy2log,
               const std::size_t* start) {
        g_ = g;
        w_ = w;
        const int E = g.E, W = g.W;
        phy2log_.assign(phy2log, phy2log + g.P);
        reps_.resize(static_cast<std::size_t>(E));
        for (auto& r : reps_) r.clear();
        for (int p = 0; p < g.P; ++p) reps_[phy2log[p]].push_back(p);  // ascending slots
        near_.resize(static_cast<std::size_t>(E) * W);
        pos_.resize(static_cast<std::size_t>(E) * W);
        k_.resize(static_cast<std::size_t>(E));
        pick_.resize(static_cast<std::size_t>(E) * W);
        cursor_.resize(static_cast<std::size_t>(E + 1) * W);
        count_.assign(static_cast<std::size_t>(g.P), 0);
        own_.assign(static_cast<std::size_t>(W), -1);
        node_first_.resize(static_cast<std::size_t>(g.N));
        node_count_.resize(static_cast<std::size_t>(g.N));
        std::copy(start, start + W, cursor_.begin());
        for (int e = 0; e < E; ++e) {
            column(e);
            for (int r = 0; r < W; ++r) {
                const Index i = at(e, r);
                std::size_t c = cursor_[i];
                std::int32_t p = near_[i];
                if (p < 0) p = draw(e, r, c);
                cursor_[i + W] = c;
                pick_[i] = p;
                ++count_[p];
            }
        }
        load_.resize(static_cast<std::size_t>(W));
        for (int g2 = 0; g2 < W; ++g2) load_[g2] = gpu_load(g2);
        find_max();
    }

    // Swaps the experts of slots x and y (a no-op when they hold the same expert).
    void swap_slots(int x, int y) {
        const int ex = phy2log_[x], ey = phy2log_[y];
        if (ex == ey) return;
        const int E = g_.E, W = g_.W;
        std::swap(phy2log_[x], phy2log_[y]);
        move_slot(reps_[ex], x, y);
        move_slot(reps_[ey], y, x);
        first_dirty_.assign(static_cast<std::size_t>(W), E);
        touched_.assign(static_cast<std::size_t>(W), false);
        touched_[x / g_.S] = touched_[y / g_.S] = true;
        for (const int f : {ex, ey}) {
            // A rank's stream reads differently from f on when its fallback at f changes (the
            // draws depend on n, unchanged, and k).
            const Index base = at(f, 0);
            old_near_.assign(near_.begin() + base, near_.begin() + base + W);
            const int old_k = k_[f];
            column(f);
            for (int r = 0; r < W; ++r) {
                const int before = old_near_[r] < 0 ? old_k : -1;
                const int after = near_[base + r] < 0 ? k_[f] : -1;
                if (before != after) first_dirty_[r] = std::min(first_dirty_[r], f);
            }
        }
        const int lo = std::min(ex, ey), hi = std::max(ex, ey);
        for (int r = 0; r < W; ++r) {
            const int f0 = first_dirty_[r];
            if (lo < f0) refresh(lo, r);
            if (hi < f0) refresh(hi, r);
            if (f0 == E) continue;
            std::size_t c = cursor_[at(f0, r)];
            for (int e = f0; e < E; ++e) {
                const Index i = at(e, r);
                std::int32_t p = near_[i];
                if (p < 0) p = draw(e, r, c);
                cursor_[i + W] = c;
                set_pick(i, p);
            }
        }
        for (int g = 0; g < W; ++g) {
            if (touched_[g]) load_[g] = gpu_load(g);
        }
        find_max();
    }

    // Rank r's stream from cursor c at the layer's start instead (its draws again).
    void restart_rank(int r, std::size_t c) {
        const int E = g_.E, W = g_.W;
        touched_.assign(static_cast<std::size_t>(W), false);
        for (int e = 0; e < E; ++e) {
            const Index i = at(e, r);
            cursor_[i] = c;
            std::int32_t p = near_[i];
            if (p < 0) p = draw(e, r, c);
            set_pick(i, p);
        }
        cursor_[at(E, r)] = c;
        for (int g = 0; g < W; ++g) {
            if (touched_[g]) load_[g] = gpu_load(g);
        }
        find_max();
    }

    double max_load() const { return max_; }
    int heaviest() const { return heaviest_; }
    double rank_load(int g) const { return load_[g]; }
    // The load the tables send to slot p.
    double slot_load(int p) const { return w_[phy2log_[p]] * count_[p] / g_.W; }
    int expert(int p) const { return phy2log_[p]; }
    const std::vector<std::int32_t>& phy2log() const { return phy2log_; }
    // Rank r's cursor after the layer.
    std::size_t end_cursor(int r) const { return cursor_[at(g_.E, r)]; }
    const Geometry& shape() const { return g_; }
    // Expert e's number of replicas.
    int replicas(int e) const { return static_cast<int>(reps_[e].size()); }
    // The draws made so far (random numbers read plus fair choices built), the search's budget.
    std::size_t work() const { return work_; }

  private:
    Index at(int e, int r) const { return static_cast<Index>(e) * g_.W + r; }

    // Keeps an expert's ascending slot list sorted as its slot `from` becomes `to`.
    static void move_slot(std::vector<std::int32_t>& slots, int from, int to) {
        auto it = std::find(slots.begin(), slots.end(), from);
        *it = to;
        while (it != slots.begin() && *(it - 1) > *it) {
            std::iter_swap(it - 1, it);
            --it;
        }
        while (it + 1 != slots.end() && *(it + 1) < *it) {
            std::iter_swap(it, it + 1);
            ++it;
        }
    }

    // Expert e's column: each rank's nearest replica (sglang_nearest_replica: the first on its
    // GPU, else the first on its node when the node holds some but not all of the list; -1: none),
    // each remaining rank's place among the remaining (ascending), and their number.
    void column(int e) {
        const auto& reps = reps_[e];
        const int n = static_cast<int>(reps.size()), W = g_.W;
        std::int32_t* near = near_.data() + at(e, 0);
        int* pos = pos_.data() + at(e, 0);
        if (n == 1) {
            std::fill(near, near + W, reps[0]);
            std::fill(pos, pos + W, -1);
            k_[e] = 0;
            return;
        }
        std::fill(node_first_.begin(), node_first_.end(), -1);
        std::fill(node_count_.begin(), node_count_.end(), 0);
        for (const std::int32_t p : reps) {
            const int g = p / g_.S, node = g / g_.ranks_per_node;
            if (own_[g] < 0) own_[g] = p;
            if (node_first_[node] < 0) node_first_[node] = p;
            ++node_count_[node];
        }
        int k = 0;
        for (int r = 0; r < W; ++r) {
            std::int32_t p = own_[r];
            if (p < 0) {
                const int node = r / g_.ranks_per_node;
                const int c = node_count_[node];
                p = c > 0 && c < n ? node_first_[node] : -1;
            }
            near[r] = p;
            pos[r] = p < 0 ? k++ : -1;
        }
        k_[e] = k;
        for (const std::int32_t p : reps) own_[p / g_.S] = -1;
    }

    // Rank r's fallback for expert e from cursor c (moved on): SGLang's `_fair_choices` on the
    // list's indices (the draws depend on n and k only) -- the list repeated k / n times, then
    // `rng.sample(list, k % n)`, then `rng.shuffle` -- and element pos of the result. The shuffle
    // is not carried out: its swaps' partners j_i are drawn (they move the cursor), and the
    // element that ends at pos is traced back through them to its place before the shuffle.
    std::int32_t draw(int e, int r, std::size_t& c) {
        const auto& reps = reps_[e];
        const int n = static_cast<int>(reps.size()), k = k_[e], whole = k / n * n;
        Cursor rng{stream_, c};
        population_.resize(static_cast<std::size_t>(n));
        std::iota(population_.begin(), population_.end(), 0);
        detail::py_sample(rng, std::span<const int>(population_),
                          static_cast<std::size_t>(k - whole), sampled_, pool_);
        // random.shuffle: for i = k - 1 down to 1, swap x[i] with x[j_i], j_i = randbelow(i + 1).
        partner_.resize(static_cast<std::size_t>(k));
        for (int i = k - 1; i >= 1; --i) {
            partner_[i] =
                static_cast<int>(detail::py_randbelow(rng, static_cast<std::uint32_t>(i + 1)));
        }
        // x[pos] is final once step pos has put x[j_pos] there (later steps swap lower places
        // only); the place q held that value before the steps k - 1 .. pos + 1 undone in reverse.
        const int pos = pos_[at(e, r)];
        int q = pos >= 1 ? partner_[pos] : 0;
        for (int i = std::max(pos + 1, 1); i < k; ++i) {
            if (q == i) {
                q = partner_[i];
            } else if (q == partner_[i]) {
                q = i;
            }
        }
        work_ += rng.position - c + static_cast<std::size_t>(k);
        c = rng.position;
        const int index = q < whole ? q % n : sampled_[static_cast<std::size_t>(q - whole)];
        return reps[static_cast<std::size_t>(index)];
    }

    // Rank r's entry for expert e again, its cursor unchanged.
    void refresh(int e, int r) {
        const Index i = at(e, r);
        std::int32_t p = near_[i];
        if (p < 0) {
            std::size_t c = cursor_[i];
            p = draw(e, r, c);
        }
        set_pick(i, p);
    }

    void set_pick(Index i, std::int32_t p) {
        const std::int32_t old = pick_[i];
        if (old == p) return;
        --count_[old];
        ++count_[p];
        touched_[old / g_.S] = touched_[p / g_.S] = true;
        pick_[i] = p;
    }

    // GPU g's realised load: its slots' expert loads times the ranks sent there, over W.
    double gpu_load(int g) const {
        double sum = 0.0;
        for (int p = g * g_.S; p < (g + 1) * g_.S; ++p) sum += w_[phy2log_[p]] * count_[p];
        return sum / g_.W;
    }

    void find_max() {
        heaviest_ = static_cast<int>(std::max_element(load_.begin(), load_.end()) - load_.begin());
        max_ = load_[heaviest_];
    }

    Stream42* stream_;
    Geometry g_{};
    const double* w_ = nullptr;
    std::vector<std::int32_t> phy2log_;
    std::vector<std::vector<std::int32_t>> reps_;  // each expert's slots, ascending
    // [E * W], expert-major: nearest replica (-1: none), place among the remaining (-1: none),
    // the table's slot, and the cursor before the expert ([(E + 1) * W]: then after the layer).
    std::vector<std::int32_t> near_;
    std::vector<int> pos_;
    std::vector<std::int32_t> pick_;
    std::vector<std::size_t> cursor_;
    std::vector<int> k_;               // [E] ranks without a nearest replica
    std::vector<std::int32_t> count_;  // [P] ranks whose table sends the slot's expert there
    std::vector<double> load_;         // [W] realised GPU loads
    double max_ = 0.0;
    int heaviest_ = 0;
    std::size_t work_ = 0;
    // Scratch.
    std::vector<std::int32_t> own_, node_first_, old_near_;
    std::vector<int> node_count_, first_dirty_, partner_, population_, sampled_, pool_;
    std::vector<bool> touched_;
};

// One swap: slots x (on the heaviest GPU) and y, with the estimated largest load of the two GPUs.
struct SwapCandidate {
    double estimate;
    int x, y;
};

// Lowers m's realised largest GPU load by swaps between the heaviest GPU and the other GPUs of its
// domain (bins_per_domain consecutive GPUs), never putting an expert twice on a GPU: each step
// tries the candidates whose estimate (each slot's realised load moving with it) lowers the
// largest load, best first, exactly, and keeps the first that does. Stops at `bound` (no
// placement goes below it), when a step finds none, or after `evaluations` exact evaluations or
// kSearchWork draws.
void static_swap_search(StaticLayer& m, int bins_per_domain, double bound, int evaluations,
                        std::vector<SwapCandidate>& candidates) {
    const int S = m.shape().S;
    const std::size_t work_end = m.work() + kSearchWork;
    while (evaluations > 0 && m.work() < work_end && m.max_load() > bound * (1 + kTargetTol)) {
        const int h = m.heaviest();
        const double top = m.max_load();
        const int first = h / bins_per_domain * bins_per_domain;
        candidates.clear();
        for (int b = first; b < first + bins_per_domain; ++b) {
            if (b == h) continue;
            for (int x = h * S; x < (h + 1) * S; ++x) {
                const int ex = m.expert(x);
                bool b_holds_ex = false;
                for (int p = b * S; p < (b + 1) * S; ++p) b_holds_ex |= m.expert(p) == ex;
                if (b_holds_ex) continue;
                for (int y = b * S; y < (b + 1) * S; ++y) {
                    const int ey = m.expert(y);
                    bool h_holds_ey = false;
                    for (int p = h * S; p < (h + 1) * S; ++p) h_holds_ey |= m.expert(p) == ey;
                    if (h_holds_ey) continue;
                    const double d = m.slot_load(x) - m.slot_load(y);
                    const double estimate = std::max(top - d, m.rank_load(b) + d);
                    if (d > 0 && estimate < top * (1 - kRelTol)) {
                        candidates.push_back({estimate, x, y});
                    }
                }
            }
        }
        std::sort(candidates.begin(), candidates.end(),
                  [](const SwapCandidate& a, const SwapCandidate& b) {
                      return std::tie(a.estimate, a.x, a.y) < std::tie(b.estimate, b.x, b.y);
                  });
        bool improved = false;
        const int tries = std::min<int>(kTriesPerStep, static_cast<int>(candidates.size()));
        for (int i = 0; i < tries && evaluations > 0 && m.work() < work_end; ++i, --evaluations) {
            m.swap_slots(candidates[i].x, candidates[i].y);
            if (m.max_load() < top * (1 - kRelTol)) {
                improved = true;
                break;
            }
            m.swap_slots(candidates[i].x, candidates[i].y);  // back
        }
        if (!improved) return;
    }
}

// The node-spread placement's scratch.
struct SpreadScratch {
    Packing packing;
    PackScratch pack;
    std::vector<int> nodes;     // [E] the nodes holding each expert (one replica on each)
    std::vector<int> per_node;  // [E * N] replicas on each node once an expert is on all N
    std::vector<int> item_expert, item_node, item_first, node_free, bin_of;
    std::vector<std::uint64_t> keys;
    std::vector<int> flexible;
    std::vector<double> item_load, node_load;
};

// The expected load of the largest piece of expert e, and (*node) the node it is on (-1: on a
// node still to choose). On j < N nodes, one replica each: the j nodes' ranks use their node's
// replica, the others draw one at random, w / j each in expectation. On all N nodes with m
// replicas on a node: each holder serves its own rank, 1/W of w, and the node's lowest holder
// also the node's other ranks, (W / N - m + 1) / W of w: the piece is that of the node with the
// fewest (the lowest such node).
double largest_piece(const double* w, int e, const Geometry& g, const SpreadScratch& s, int* node) {
    *node = -1;
    const int j = s.nodes[e];
    if (j < g.N) return w[e] / j;
    const int* m = s.per_node.data() + static_cast<std::size_t>(e) * g.N;
    *node = static_cast<int>(std::min_element(m, m + g.N) - m);
    return w[e] * (g.ranks_per_node - m[*node] + 1) / g.W;
}

// How node_spread gives an expert more replicas.
enum class Spread {
    kWhole,    // a single expert goes onto every node at once (N - 1 slots): no rank draws
    kPartial,  // one node more at a time: the ranks of nodes without a replica draw
};

// A placement of one layer (loads w) into phy2log in which each expert's replicas sit on distinct
// nodes, one each, until it is on every node; then more on a node make its holders serve their
// own ranks (SGLang's nearest replica is the rank's own, else the first on its node when the
// node holds part of the list). Slots go one step at a time to the expert with the largest
// expected piece (largest_piece): a step is one node more (kPartial; under kWhole a single
// expert goes onto all N nodes at once), or, on all nodes, one holder more on the node of its
// largest piece (at most W / N). A piece that cannot take its step leaves the next largest to
// take it. Experts on all nodes are placed on every node; the others, by decreasing piece, on
// the least loaded nodes with a free slot (LPT); then the planner's packing puts each node's
// items on its GPUs, and the first replica of each expert on a node is moved to the lowest GPU
// holding it there. Under kWhole no rank draws: every rank has a nearest replica. False (nothing
// written) when the slots cannot be spent so (one node; kWhole with fewer than N - 1 extra slots).
bool node_spread(const double* w, const Geometry& g, Spread mode, SpreadScratch& s,
                 std::int32_t* phy2log) {
    const int E = g.E, P = g.P, N = g.N, rpn = g.ranks_per_node;
    int budget = P - E;
    if (N < 2 || (mode == Spread::kWhole && budget < N - 1)) return false;
    s.nodes.assign(static_cast<std::size_t>(E), 1);
    s.per_node.assign(static_cast<std::size_t>(E) * N, 1);
    // (largest piece, -expert): one entry per expert; the largest piece first, ties to the lower
    // expert. An expert that cannot take its step leaves the queue (the budget only shrinks).
    std::priority_queue<std::pair<double, int>> queue;
    for (int e = 0; e < E; ++e) queue.emplace(w[e], -e);
    while (budget > 0 && !queue.empty()) {
        const int e = -queue.top().second;
        queue.pop();
        int node;
        largest_piece(w, e, g, s, &node);
        int* m = s.per_node.data() + static_cast<std::size_t>(e) * N;
        if (node >= 0) {
            if (m[node] == rpn) continue;
            ++m[node];
            --budget;
        } else if (mode == Spread::kPartial) {
            ++s.nodes[e];
            --budget;
        } else {
            if (budget < N - 1) continue;
            s.nodes[e] = N;
            budget -= N - 1;
        }
        queue.emplace(largest_piece(w, e, g, s, &node), -e);
    }
    if (budget > 0) return false;
    // The items: the experts on every node first, then the others by LPT over the nodes.
    s.item_expert.clear();
    s.item_node.clear();
    s.item_load.clear();
    s.item_first.clear();
    s.node_free.assign(static_cast<std::size_t>(N), P / N);
    s.node_load.assign(static_cast<std::size_t>(N), 0.0);
    const auto add = [&](int e, int node, double load, bool first) {
        s.item_expert.push_back(e);
        s.item_node.push_back(node);
        s.item_load.push_back(load);
        s.item_first.push_back(first);
        --s.node_free[node];
        s.node_load[node] += load;
    };
    s.flexible.clear();
    for (int e = 0; e < E; ++e) {
        if (s.nodes[e] < N) {
            s.flexible.push_back(e);
            continue;
        }
        const int* m = s.per_node.data() + static_cast<std::size_t>(e) * N;
        for (int k = 0; k < N; ++k) {
            add(e, k, w[e] * (rpn - m[k] + 1) / g.W, true);
            for (int i = 1; i < m[k]; ++i) add(e, k, w[e] / g.W, false);
        }
    }
    for (int k = 0; k < N; ++k) {
        if (s.node_free[k] < 0) return false;
    }
    s.keys.resize(s.flexible.size());
    for (std::size_t i = 0; i < s.flexible.size(); ++i) {
        const int e = s.flexible[i];
        s.keys[i] = descending_key(w[e] / s.nodes[e]);
    }
    stable_sort_by_key(s.keys, s.flexible);
    for (const int e : s.flexible) {
        const double piece = w[e] / s.nodes[e];
        for (int r = 0; r < s.nodes[e]; ++r) {
            // The least loaded node with a free slot not holding e yet (items of e go in a row).
            int best = -1;
            for (int k = 0; k < N; ++k) {
                const bool holds = r > 0 && std::find(s.item_node.end() - r, s.item_node.end(),
                                                      k) != s.item_node.end();
                if (s.node_free[k] == 0 || holds) continue;
                if (best < 0 || s.node_load[k] < s.node_load[best]) best = k;
            }
            if (best < 0) return false;
            add(e, best, piece, true);
        }
    }
    // The items as experts of one replica each, in their node's domain, packed.
    Packing& p = s.packing;
    p.reset(g.W, rpn, g.S, P);
    double total = 0.0, largest = 0.0;
    for (int i = 0; i < P; ++i) {
        p.count[i] = 1;
        p.domain_of[i] = s.item_node[i];
        total += s.item_load[i];
        largest = std::max(largest, s.item_load[i]);
    }
    pack_counts(p, s.item_load.data(), std::max(total / g.W, largest), s.pack);
    // Each node's first replica of an expert on the lowest GPU holding the expert there: else
    // exchange the two GPUs' contents (a relabelling of the node's GPUs).
    s.bin_of.resize(static_cast<std::size_t>(P));
    for (int slot = 0; slot < P; ++slot) s.bin_of[p.slot_expert[slot]] = slot / g.S;
    for (int i = 0; i < P; ++i) {
        if (!s.item_first[i]) continue;
        const int e = s.item_expert[i], node = s.item_node[i];
        int b = s.bin_of[i];  // the lowest GPU of the node holding e
        for (int x = node * rpn; x < b; ++x) {
            for (int slot = x * g.S; slot < (x + 1) * g.S; ++slot) {
                if (s.item_expert[p.slot_expert[slot]] == e) b = std::min(b, x);
            }
        }
        const int a = s.bin_of[i];
        if (a == b) continue;
        std::swap_ranges(p.bin(a), p.bin(a) + g.S, p.bin(b));
        for (int slot = 0; slot < g.S; ++slot) {
            s.bin_of[p.bin(a)[slot]] = a;
            s.bin_of[p.bin(b)[slot]] = b;
        }
    }
    for (int slot = 0; slot < P; ++slot) phy2log[slot] = s.item_expert[p.slot_expert[slot]];
    return true;
}

// One thread's planning state: the stream, the layer being evaluated, the best candidate.
struct StaticPass {
    Stream42 stream;
    StaticLayer layer{stream};
    std::vector<std::size_t> cursor;  // [W] every rank's stream before the current layer
    StaticLayer equal_split{stream};  // the equal-split layer from `cursor`, kept for its search
    std::vector<std::int32_t> best, spread;
    std::vector<std::size_t> best_end;
    double best_max = 0;
    std::vector<SwapCandidate> candidates;
    SpreadScratch spread_scratch;

    // Keeps the layer's current placement when it realises less than the best so far.
    void consider() {
        if (!best.empty() && !(layer.max_load() < best_max)) return;
        best = layer.phy2log();
        best_max = layer.max_load();
        best_end.resize(cursor.size());
        for (std::size_t r = 0; r < cursor.size(); ++r) {
            best_end[r] = layer.end_cursor(static_cast<int>(r));
        }
    }
};

}  // namespace

void plan_sglang_static(const PlanRequest& r, const LocalityChoice& choice, LayerPlans& plans) {
    const int N = plans.location_nodes;
    const Geometry g = geometry(r.num_experts, r.num_physical_experts, r.ep_size, N);
    const int domain_bins = r.ep_size / choice.num_domains;
    const bool spread = choice.locality == Locality::kNone && N >= 2;
    const auto W = static_cast<std::size_t>(g.W);
    // The standalone equal-split plan (what rebalance(dispatch="equal_split") returns): its rows
    // and statistics, and every rank's stream as SGLang reads it under that plan.
    const RowMatrix<std::int32_t> equal_rows = plans.phy2log;
    const std::vector<LayerPlanStats> equal_stats = plans.stats.layers;
    std::vector<std::size_t> equal_cursor(W, 0), equal_end(W);
    std::vector<std::size_t> equal_starts;  // [L * W] with previous: its streams before each layer
    std::vector<double> equal_realised(static_cast<std::size_t>(r.num_layers));
    StaticPass pass;
    pass.cursor.assign(W, 0);
    pass.spread.resize(static_cast<std::size_t>(g.P));
    if (r.previous) plans.previous_realised.assign(static_cast<std::size_t>(r.num_layers), 0.0);
    std::vector<std::int32_t> count;
    // Layers 0 .. synced are the standalone plan's (the streams after them are its streams).
    Index synced = -1;
    // The least realised candidate of layer l from pass.cursor (pass.best, best_max, best_end).
    // When the streams are the standalone plan's, pass.layer holds its layer l on entry.
    const auto plan_layer = [&](Index l, bool on_standalone_streams) {
        const double* w = r.load.row(l).data();
        const double bound = plans.lower_bounds[static_cast<std::size_t>(l)];
        const std::int32_t* equal_split = equal_rows.row(l).data();
        pass.best.clear();
        if (!on_standalone_streams) pass.layer.reset(g, w, equal_split, pass.cursor.data());
        pass.consider();
        pass.equal_split = pass.layer;
        for (const Spread mode : {Spread::kWhole, Spread::kPartial}) {
            if (!spread || !node_spread(w, g, mode, pass.spread_scratch, pass.spread.data())) {
                continue;
            }
            if (r.previous) {
                match_previous(pass.spread.data(), r.previous_row(l), g.E, g.P, g.W, N);
            }
            pass.layer.reset(g, w, pass.spread.data(), pass.cursor.data());
            pass.consider();
            static_swap_search(pass.layer, g.W, bound, kSearchEvaluations, pass.candidates);
            pass.consider();
        }
        // The equal-split plan improved by swaps within its domains (the costliest search: most
        // of its replicated experts have ranks that draw), unless a node-spread placement already
        // realises what the equal-split plan promises (within kPromiseTolerance).
        const double promise = equal_stats[static_cast<std::size_t>(l)].max_rank_load;
        if (!(pass.best_max <= promise * (1 + kPromiseTolerance))) {
            pass.layer = pass.equal_split;
            static_swap_search(pass.layer, domain_bins, bound, kSearchEvaluations, pass.candidates);
            pass.consider();
        }
    };
    // Re-rolls the streams layer l reads: a walk of swaps in layer l - 1 (within its domains,
    // each kept when layer l - 1 realises no more than it did) until layer l's failed placement or
    // the equal-split layer realises at most `limit` from the streams layer l - 1 leaves. Both
    // are followed rank by rank: a swap moves the end cursors of the few ranks whose fallbacks
    // it changed.
    std::vector<std::size_t> before_start(W);  // the streams before layer l - 1 under this plan
    StaticLayer before{pass.stream}, probe_failed{pass.stream}, probe_equal{pass.stream};
    std::vector<std::size_t> probe(W);
    const auto reroll = [&](Index l, double limit) -> bool {
        const Index k = l - 1;
        const auto ku = static_cast<std::size_t>(k);
        if (domain_bins < 2) return false;
        const double before_max = plans.stats.layers[ku].realised_max_rank_load;
        before.reset(g, r.load.row(k).data(), plans.phy2log.row(k).data(), before_start.data());
        const double* w = r.load.row(l).data();
        probe = pass.cursor;
        probe_failed.reset(g, w, pass.best.data(), probe.data());
        probe_equal.reset(g, w, equal_rows.row(l).data(), probe.data());
        std::uint64_t state = static_cast<std::uint64_t>(l) * 0x9E3779B97F4A7C15ULL;
        const auto next = [&state](int n) {  // SplitMix64, reduced to [0, n)
            state += 0x9E3779B97F4A7C15ULL;
            std::uint64_t z = state;
            z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
            z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
            return static_cast<int>((z ^ (z >> 31)) % static_cast<std::uint64_t>(n));
        };
        const auto holds = [&](int gpu, int e) {
            for (int p = gpu * g.S; p < (gpu + 1) * g.S; ++p) {
                if (before.expert(p) == e) return true;
            }
            return false;
        };
        for (int t = 0; t < kRerollTries; ++t) {
            const int x = next(g.P), gx = x / g.S, first = gx / domain_bins * domain_bins;
            int gy = first + next(domain_bins - 1);
            if (gy >= gx) ++gy;
            const int y = gy * g.S + next(g.S);
            const int ex = before.expert(x), ey = before.expert(y);
            if (ex == ey || (before.replicas(ex) < 2 && before.replicas(ey) < 2) || holds(gy, ex) ||
                holds(gx, ey)) {
                continue;
            }
            before.swap_slots(x, y);
            if (before.max_load() > before_max) {
                before.swap_slots(x, y);
                continue;
            }
            for (int q = 0; q < g.W; ++q) {
                const std::size_t c = before.end_cursor(q);
                if (c == probe[static_cast<std::size_t>(q)]) continue;
                probe[static_cast<std::size_t>(q)] = c;
                probe_failed.restart_rank(q, c);
                probe_equal.restart_rank(q, c);
            }
            if (probe_failed.max_load() <= limit || probe_equal.max_load() <= limit) {
                std::copy(before.phy2log().begin(), before.phy2log().end(),
                          plans.phy2log.row(k).data());
                plans.take_stats(r, k, plans.lower_bounds[ku], count);
                plans.stats.layers[ku].realised_max_rank_load = before.max_load();
                pass.cursor = probe;
                return true;
            }
        }
        return false;
    };
    for (Index l = 0; l < r.num_layers; ++l) {
        const auto layer = static_cast<std::size_t>(l);
        const double* w = r.load.row(l).data();
        // The standalone plan's layer l on its streams: the value not to exceed.
        if (r.previous)
            equal_starts.insert(equal_starts.end(), equal_cursor.begin(), equal_cursor.end());
        pass.layer.reset(g, w, equal_rows.row(l).data(), equal_cursor.data());
        equal_realised[layer] = pass.layer.max_load();
        for (std::size_t k = 0; k < W; ++k)
            equal_end[k] = pass.layer.end_cursor(static_cast<int>(k));
        plan_layer(l, pass.cursor == equal_cursor);
        if (pass.best_max > equal_realised[layer] && reroll(l, equal_realised[layer])) {
            // Layer l again from the new streams, its failed best among the candidates.
            const std::vector<std::int32_t> failed = probe_failed.phy2log();
            plan_layer(l, false);
            pass.layer.reset(g, w, failed.data(), pass.cursor.data());
            pass.consider();
        }
        if (pass.best_max > equal_realised[layer]) {
            // The streams this plan's earlier layers left realise more than the standalone plan
            // on this layer: the earlier layers become the standalone plan's (its streams then),
            // and layer l is planned again (its first candidate is the standalone's layer l).
            for (Index j = synced + 1; j < l; ++j) {
                const auto k = static_cast<std::size_t>(j);
                plans.phy2log.row(j) = equal_rows.row(j);
                plans.stats.layers[k] = equal_stats[k];
                plans.stats.layers[k].realised_max_rank_load = equal_realised[k];
                if (r.previous) {
                    pass.layer.reset(g, r.load.row(j).data(), r.previous_row(j),
                                     equal_starts.data() + k * W);
                    plans.previous_realised[k] = pass.layer.max_load();
                }
            }
            synced = l - 1;
            pass.cursor = equal_cursor;
            pass.layer.reset(g, w, equal_rows.row(l).data(), pass.cursor.data());
            plan_layer(l, true);
        }
        if (r.previous) {
            pass.layer.reset(g, w, r.previous_row(l), pass.cursor.data());
            plans.previous_realised[layer] = pass.layer.max_load();
        }
        std::copy(pass.best.begin(), pass.best.end(), plans.phy2log.row(l).data());
        plans.take_stats(r, l, plans.lower_bounds[layer], count);
        plans.stats.layers[layer].realised_max_rank_load = pass.best_max;
        if (synced == l - 1 && pass.cursor == equal_cursor &&
            std::equal(pass.best.begin(), pass.best.end(), equal_rows.row(l).data())) {
            synced = l;
        }
        before_start = pass.cursor;
        pass.cursor = pass.best_end;
        equal_cursor = equal_end;
    }
}

void realise_sglang_static(ConstMatrixMap<double> load, const std::int32_t* phy2log,
                           int num_experts, int num_physical_experts, int ep_size, int num_nodes,
                           std::vector<LayerPlanStats>& layers) {
    const Geometry g = geometry(num_experts, num_physical_experts, ep_size, num_nodes);
    StaticPass pass;
    pass.cursor.assign(static_cast<std::size_t>(g.W), 0);
    for (Index l = 0; l < load.rows(); ++l) {
        pass.layer.reset(g, load.row(l).data(), phy2log + l * g.P, pass.cursor.data());
        layers[static_cast<std::size_t>(l)].realised_max_rank_load = pass.layer.max_load();
        for (int r = 0; r < g.W; ++r) pass.cursor[r] = pass.layer.end_cursor(r);
    }
}

}  // namespace moelb::planner
