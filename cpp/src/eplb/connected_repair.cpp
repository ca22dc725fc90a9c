// The balanced target's repair (ours; issue 20): with `previous`, the connected layout rebuilt
// from scratch (connected.cpp) rewrites most slots every window although the loads drift slowly
// (about 13,300 of 16,704 slots per window on the demo configuration at move_cost 0). The repair
// starts from the previous layout instead and changes only what the new window asks for, per
// domain (all GPUs without node locality, one node with it; an expert's domain is the one
// connected.cpp gives it):
//   1. every expert of the domain keeps its previous slots on the domain's GPUs (one per GPU;
//      a second replica on a GPU, or an expert of another domain, frees its slot);
//   2. an expert holding more replicas than its new count (the divisor method, as the rebuild's)
//      gives up those on the GPUs with the largest equal-split load (load / count summed over a
//      GPU's experts), the heaviest experts first;
//   3. an expert holding fewer, the heaviest first, takes a free slot on a GPU that does not hold
//      it, preferring a GPU of another piece of the replica hypergraph than its replicas (so that
//      the new replica links two pieces), then the smallest equal-split load; when no such GPU
//      has a free slot, it displaces a single-copy expert (which then counts as unplaced);
//      two replicas share a GPU only when every GPU without one is full of replicated experts;
//   4. the unplaced single-copy experts, heaviest first, go to the free slot of the GPU with the
//      smallest equal-split load;
//   5. while the domain's hypergraph has several pieces and enough redundant slots to be one
//      (slots - experts >= GPUs - 1): the first replica (heaviest experts first) that closes a
//      cycle (removing it leaves its GPU linked) and can swap with a single-copy expert of
//      another piece does, with the one that leaves the pair's larger equal-split load
//      smallest; each such swap joins two pieces.
// Then a swap search on the single-copy experts (replicas stay, so the hypergraph does too):
// while a swap of a single-copy expert of the most loaded GPU (of the domain whose most loaded
// GPU is the most loaded, among those where a swap still helps) with a lighter one of another
// GPU of its domain lowers the larger of the two GPUs' loads, the best such swap. The repaired
// layout and its prefixes of swaps are candidates of connected.cpp's choice, which solves them
// exactly on the window's steps and weighs their moves (move_cost).
#include <algorithm>
#include <cstdint>
#include <numeric>
#include <tuple>
#include <vector>

#include "moelb/errors.hpp"
#include "planner.hpp"

namespace moelb::planner {
namespace {

constexpr std::int32_t kFree = -1;

// One layer's repair: the layout being repaired and what it tracks.
class Repair {
  public:
    Repair(const double* w, const std::vector<int>& count, const std::vector<int>& domain_of,
           int slots_per_rank, RepairScratch& s, std::int32_t* slots)
        : w_(w), count_(count), domain_of_(domain_of), S_(slots_per_rank), s_(s), slots_(slots) {}

    // Steps 1-5 for domain d: GPUs [first, first + R), from the previous slots `old` [P].
    // Returns false when the domain could be one piece but is not.
    bool domain(int d, int first, int R, const std::int32_t* old);
    // The swap search on the single-copy experts, domains of R GPUs: the swaps made, in order,
    // as pairs of slots.
    void balance_singles(int num_domains, int R, std::vector<std::pair<int, int>>& swaps);

  private:
    double share(int e) const { return w_[e] / count_[e]; }
    bool holds(int e, int g) const {
        const auto& h = s_.holders[e];
        return std::find(h.begin(), h.end(), g) != h.end();
    }
    std::int32_t* gpu(int g) const { return slots_ + static_cast<Index>(g) * S_; }
    int slot_of(int e, int g) const {
        const std::int32_t* x = gpu(g);
        return static_cast<int>(std::find(x, x + S_, e) - x);
    }
    int find(int g) {
        while (s_.parent[g] != g) g = s_.parent[g] = s_.parent[s_.parent[g]];
        return g;
    }
    void join(int a, int b) {
        a = find(a);
        b = find(b);
        if (a != b) s_.parent[std::max(a, b)] = std::min(a, b);
    }
    void put(int e, int g, int j);
    // The swap of a single-copy expert of the most loaded GPU of [first, first + R) with a
    // lighter one of another GPU there that leaves the larger of the two loads smallest, if it
    // is below the most loaded GPU's (as slots a, b).
    bool best_single_swap(int first, int R, std::pair<int, int>& swap) const;
    void add_replica(int e, int first, int R);
    // Step 5; returns whether the domain is one piece.
    bool connect(int first, int R);

    const double* w_;
    const std::vector<int>& count_;
    const std::vector<int>& domain_of_;
    int S_;
    RepairScratch& s_;
    std::int32_t* slots_;
};

void Repair::put(int e, int g, int j) {
    gpu(g)[j] = e;
    if (!s_.holders[e].empty()) join(s_.holders[e].front(), g);
    s_.holders[e].push_back(g);
    s_.rank_load[g] += share(e);
}

bool Repair::domain(int d, int first, int R, const std::int32_t* old) {
    const int end = first + R;
    // The domain's experts, heaviest first (ties to the lower expert).
    auto& order = s_.order;
    order.clear();
    for (int e = 0; e < static_cast<int>(count_.size()); ++e) {
        if (domain_of_[e] == d) {
            order.push_back(e);
            s_.holders[e].clear();
        }
    }
    std::sort(order.begin(), order.end(),
              [&](int a, int b) { return w_[a] > w_[b] || (w_[a] == w_[b] && a < b); });
    // 1. Keep.
    for (int g = first; g < end; ++g) {
        s_.rank_load[g] = 0;
        s_.parent[g] = g;
        for (int j = 0; j < S_; ++j) {
            const std::int32_t e = old[static_cast<Index>(g) * S_ + j];
            if (domain_of_[e] != d || holds(e, g)) {
                gpu(g)[j] = kFree;
            } else {
                gpu(g)[j] = e;
                s_.holders[e].push_back(g);
                s_.rank_load[g] += share(e);
            }
        }
    }
    // 2. Give up replicas beyond the new count.
    for (const int e : order) {
        auto& h = s_.holders[e];
        while (static_cast<int>(h.size()) > count_[e]) {
            auto worst = h.begin();
            for (auto it = h.begin(); it != h.end(); ++it) {
                const double a = s_.rank_load[*it], b = s_.rank_load[*worst];
                if (a > b || (a == b && *it < *worst)) worst = it;
            }
            gpu(*worst)[slot_of(e, *worst)] = kFree;
            s_.rank_load[*worst] -= share(e);
            h.erase(worst);
        }
    }
    for (const int e : order) {
        const auto& h = s_.holders[e];
        for (std::size_t i = 1; i < h.size(); ++i) join(h.front(), h[i]);
    }
    // 3. Add the replicated experts' missing replicas; 4. place the single-copy experts.
    for (const int e : order) {
        while (count_[e] >= 2 && static_cast<int>(s_.holders[e].size()) < count_[e]) {
            add_replica(e, first, R);
        }
    }
    for (const int e : order) {
        if (count_[e] != 1 || !s_.holders[e].empty()) continue;
        int best = -1, best_slot = -1;
        for (int g = first; g < end; ++g) {
            const std::int32_t* x = gpu(g);
            const int j = static_cast<int>(std::find(x, x + S_, kFree) - x);
            if (j < S_ && (best < 0 || s_.rank_load[g] < s_.rank_load[best])) {
                best = g;
                best_slot = j;
            }
        }
        MOELB_CHECK(best >= 0, "the repair found no free slot for expert " << e);
        put(e, best, best_slot);
    }
    for (int g = first; g < end; ++g) {
        MOELB_CHECK(std::find(gpu(g), gpu(g) + S_, kFree) == gpu(g) + S_,
                    "the repair left a slot of GPU " << g << " empty");
    }
    // 5. One piece.
    const int slots = R * S_, experts = static_cast<int>(order.size());
    return R == 1 || slots - experts < R - 1 || connect(first, R);
}

void Repair::add_replica(int e, int first, int R) {
    const auto& h = s_.holders[e];
    const int root = h.empty() ? -1 : find(h.front());
    // A free slot on a GPU without e: (same piece, load, GPU) smallest.
    int best = -1, best_slot = -1;
    std::tuple<bool, double, int> best_key;
    for (int g = first; g < first + R; ++g) {
        if (holds(e, g)) continue;
        const std::int32_t* x = gpu(g);
        const int j = static_cast<int>(std::find(x, x + S_, kFree) - x);
        if (j == S_) continue;
        const auto key = std::make_tuple(find(g) == root, s_.rank_load[g], g);
        if (best < 0 || key < best_key) {
            best = g;
            best_slot = j;
            best_key = key;
        }
    }
    if (best < 0) {
        // Displace a single-copy expert of a GPU without e: (same piece, the GPU's load without
        // it, GPU, slot) smallest.
        std::tuple<bool, double, int, int> displace_key;
        for (int g = first; g < first + R; ++g) {
            if (holds(e, g)) continue;
            for (int j = 0; j < S_; ++j) {
                const std::int32_t t = gpu(g)[j];
                if (t == kFree || count_[t] != 1) continue;
                const auto key = std::make_tuple(find(g) == root, s_.rank_load[g] - w_[t], g, j);
                if (best < 0 || key < displace_key) {
                    best = g;
                    best_slot = j;
                    displace_key = key;
                }
            }
        }
        if (best >= 0) {
            const std::int32_t t = gpu(best)[best_slot];
            s_.holders[t].clear();
            s_.rank_load[best] -= w_[t];
        }
    }
    if (best < 0) {
        // Every GPU without e is full of replicated experts: a free slot anywhere.
        for (int g = first; g < first + R; ++g) {
            const std::int32_t* x = gpu(g);
            const int j = static_cast<int>(std::find(x, x + S_, kFree) - x);
            if (j < S_ && (best < 0 || s_.rank_load[g] < s_.rank_load[best])) {
                best = g;
                best_slot = j;
            }
        }
    }
    MOELB_CHECK(best >= 0, "the repair found no slot for a replica of expert " << e);
    put(e, best, best_slot);
}

bool Repair::connect(int first, int R) {
    const int end = first + R;
    for (int round = 0;; ++round) {
        // The hypergraph as a forest of each expert's replicas joined to its first; a replica
        // whose GPU is already linked closes a cycle (redundant).
        for (int g = first; g < end; ++g) s_.parent[g] = g;
        s_.redundant.clear();
        for (const int e : s_.order) {
            const auto& h = s_.holders[e];
            for (int i = 1; i < static_cast<int>(h.size()); ++i) {
                if (find(h.front()) == find(h[i])) {
                    s_.redundant.emplace_back(e, i);
                } else {
                    join(h.front(), h[i]);
                }
            }
        }
        int pieces = 0;
        for (int g = first; g < end; ++g) pieces += find(g) == g;
        if (pieces <= 1) return true;
        if (round == R) return false;
        // The first redundant replica (heaviest experts first) that can swap with a single-copy
        // expert of another piece, with the one that leaves the larger of the two GPUs' loads
        // smallest.
        std::tuple<double, int, int> best_key;
        int best_e = -1, best_i = -1, best_g = -1, best_j = -1;
        for (std::size_t k = 0; k < s_.redundant.size() && best_e < 0; ++k) {
            const auto [e, i] = s_.redundant[k];
            const int h = s_.holders[e][i], root = find(s_.holders[e].front());
            for (int g = first; g < end; ++g) {
                if (find(g) == root || holds(e, g)) continue;
                for (int j = 0; j < S_; ++j) {
                    const std::int32_t t = gpu(g)[j];
                    if (count_[t] != 1) continue;
                    const double larger = std::max(s_.rank_load[h] - share(e) + w_[t],
                                                   s_.rank_load[g] + share(e) - w_[t]);
                    const auto key = std::make_tuple(larger, g, j);
                    if (best_e < 0 || key < best_key) {
                        best_key = key;
                        best_e = e;
                        best_i = i;
                        best_g = g;
                        best_j = j;
                    }
                }
            }
        }
        if (best_e < 0) return false;
        const int h = s_.holders[best_e][best_i];
        const std::int32_t t = gpu(best_g)[best_j];
        gpu(h)[slot_of(best_e, h)] = t;
        gpu(best_g)[best_j] = best_e;
        s_.holders[best_e][best_i] = best_g;
        s_.holders[t].assign(1, h);
        s_.rank_load[h] += w_[t] - share(best_e);
        s_.rank_load[best_g] += share(best_e) - w_[t];
    }
}

bool Repair::best_single_swap(int first, int R, std::pair<int, int>& swap) const {
    const int end = first + R;
    int top = first;
    for (int g = first; g < end; ++g) {
        if (s_.rank_load[g] > s_.rank_load[top]) top = g;
    }
    const double peak = s_.rank_load[top];
    double best = peak * (1 - kRelTol);
    bool found = false;
    for (int j = 0; j < S_; ++j) {
        const std::int32_t a = gpu(top)[j];
        if (count_[a] != 1) continue;
        for (int g = first; g < end; ++g) {
            if (g == top) continue;
            for (int k = 0; k < S_; ++k) {
                const std::int32_t b = gpu(g)[k];
                if (count_[b] != 1 || !(w_[b] < w_[a])) continue;
                const double larger =
                    std::max(peak - w_[a] + w_[b], s_.rank_load[g] - w_[b] + w_[a]);
                if (larger < best) {
                    best = larger;
                    swap = {top * S_ + j, g * S_ + k};
                    found = true;
                }
            }
        }
    }
    return found;
}

void Repair::balance_singles(int num_domains, int R, std::vector<std::pair<int, int>>& swaps) {
    swaps.clear();
    std::vector<char> done(static_cast<std::size_t>(num_domains), 0);
    const int limit = R * S_ * num_domains;
    while (static_cast<int>(swaps.size()) < limit) {
        // The unfinished domain whose most loaded GPU is the most loaded (ties: the lower).
        int d = -1;
        double top = 0;
        for (int x = 0; x < num_domains; ++x) {
            if (done[x]) continue;
            const double peak = *std::max_element(&s_.rank_load[x * R], &s_.rank_load[x * R] + R);
            if (d < 0 || peak > top) {
                d = x;
                top = peak;
            }
        }
        if (d < 0) break;
        std::pair<int, int> swap;
        if (!best_single_swap(d * R, R, swap)) {
            done[d] = 1;
            continue;
        }
        const std::int32_t a = slots_[swap.first], b = slots_[swap.second];
        slots_[swap.first] = b;
        slots_[swap.second] = a;
        s_.rank_load[swap.first / S_] += w_[b] - w_[a];
        s_.rank_load[swap.second / S_] += w_[a] - w_[b];
        swaps.push_back(swap);
    }
}

}  // namespace

bool repair_connected(const double* w, const std::int32_t* old, const std::vector<int>& count,
                      const std::vector<int>& domain_of, int num_domains, int num_physical_experts,
                      int ep_size, RepairScratch& s, std::vector<std::int32_t>& repaired,
                      std::vector<std::pair<int, int>>& swaps) {
    const int P = num_physical_experts, W = ep_size, S = P / W;  // DESIGN's letters
    const int R = W / num_domains;
    s.holders.resize(count.size());
    s.rank_load.assign(static_cast<std::size_t>(W), 0.0);
    s.parent.resize(static_cast<std::size_t>(W));
    repaired.resize(static_cast<std::size_t>(P));
    Repair repair(w, count, domain_of, S, s, repaired.data());
    bool connected = true;
    for (int d = 0; d < num_domains; ++d) connected = repair.domain(d, d * R, R, old) && connected;
    // The swap search runs on a copy, from the loads the repair left.
    s.balanced = repaired;
    Repair singles(w, count, domain_of, S, s, s.balanced.data());
    singles.balance_singles(num_domains, R, swaps);
    return connected;
}

}  // namespace moelb::planner
