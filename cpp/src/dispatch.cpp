// Replica dispatch models (DESIGN sections 2 and 9; reference/dispatch.md sections 1-6).
#include "moelb/dispatch.hpp"

#include <algorithm>
#include <memory>
#include <mutex>

#include "enum_names.hpp"
#include "moelb/errors.hpp"
#include "moelb/parallel.hpp"
#include "py_random.hpp"

namespace moelb {
namespace {

// SplitMix64 finaliser: a well-mixed 64-bit hash of a 64-bit key.
std::uint64_t mix64(std::uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

std::uint64_t hash_combine(std::uint64_t seed, std::uint64_t a, std::uint64_t b = 0,
                           std::uint64_t c = 0) {
    std::uint64_t h = mix64(seed);
    h = mix64(h ^ a);
    h = mix64(h ^ b);
    return mix64(h ^ c);
}

// Salts that keep the seeded choices of different purposes independent.
constexpr std::uint64_t kSaltNode = 1;
constexpr std::uint64_t kSaltGlobal = 2;
constexpr std::uint64_t kSaltDynamic = 3;

// SGLang seeds every static table with random.Random(42).
constexpr std::uint64_t kSglangTableSeed = 42;
// vLLM's multiplicative hash of the token row.
constexpr std::uint64_t kVllmHashMultiplier = 2654435769ull;

void check_rank(const ExpertLocation& location, int ep_rank) {
    MOELB_CHECK_ARG(
        ep_rank >= 0 && ep_rank < location.ep_size(),
        "ep_rank=" << ep_rank << " is outside [0, ep_size=" << location.ep_size() << ")");
}

void check_layer(const ExpertLocation& location, int layer) {
    MOELB_CHECK_ARG(
        layer >= 0 && layer < location.num_layers(),
        "layer=" << layer << " is outside [0, num_layers=" << location.num_layers() << ")");
}

// --- moelb_static (ours) ------------------------------------------------------------------------

std::int32_t moelb_static_slot(const ExpertLocation& loc, int layer, int expert, int ep_rank,
                               std::uint64_t seed) {
    const auto reps = loc.replicas(layer, expert);
    const int rank_node = loc.node_of_rank(ep_rank);
    const int rpn = loc.ranks_per_node();
    // 1. A replica on the rank itself (replicas are ascending, so the first found is the lowest).
    for (const std::int32_t p : reps) {
        if (loc.rank_of_slot(p) == ep_rank) return p;
    }
    // Replicas are ascending by slot, hence by rank and node: count holders before ep_rank.
    const int node_begin = rank_node * rpn;
    int node_reps_begin = -1, node_reps_end = -1;
    int holder_ranks_in_node_before = 0;
    int holder_nodes_before = 0;
    int last_rank = -1, last_node = -1;
    for (int i = 0; i < static_cast<int>(reps.size()); ++i) {
        const int r = loc.rank_of_slot(reps[i]);
        const int n = loc.node_of_rank(r);
        if (n == rank_node) {
            if (node_reps_begin < 0) node_reps_begin = i;
            node_reps_end = i + 1;
            if (r != last_rank && r < ep_rank) ++holder_ranks_in_node_before;
        }
        if (n != last_node && n < rank_node) ++holder_nodes_before;
        last_rank = r;
        last_node = n;
    }
    // 2. Replicas on the same node: the node's ranks without a replica take them in turn.
    if (node_reps_begin >= 0) {
        const int n = node_reps_end - node_reps_begin;
        const int i = (ep_rank - node_begin) - holder_ranks_in_node_before;
        const auto offset = static_cast<int>(
            hash_combine(seed, kSaltNode, static_cast<std::uint64_t>(layer) << 32 | expert,
                         static_cast<std::uint64_t>(rank_node)) %
            static_cast<std::uint64_t>(n));
        return reps[static_cast<std::size_t>(node_reps_begin + (i + offset) % n)];
    }
    // 3. No replica on the node: ranks of nodes without a replica share all replicas in turn.
    const int n = static_cast<int>(reps.size());
    const int i = ep_rank - holder_nodes_before * rpn;
    const auto offset = static_cast<int>(
        hash_combine(seed, kSaltGlobal, static_cast<std::uint64_t>(layer) << 32 | expert) %
        static_cast<std::uint64_t>(n));
    return reps[static_cast<std::size_t>((i + offset) % n)];
}

RowMatrix<std::int32_t> moelb_static_table(const ExpertLocation& loc, int ep_rank,
                                           std::uint64_t seed) {
    RowMatrix<std::int32_t> table(loc.num_layers(), loc.num_logical_experts());
    for (int l = 0; l < loc.num_layers(); ++l) {
        for (int e = 0; e < loc.num_logical_experts(); ++e) {
            table(l, e) = moelb_static_slot(loc, l, e, ep_rank, seed);
        }
    }
    return table;
}

// --- SGLang's static table (compute_logical_to_rank_dispatch_physical_map) ----------------------

// The candidates of (layer, expert) in `lists` [L * E, X].
std::span<const std::int32_t> list_of(const RowMatrix<std::int32_t>& lists, Index row) {
    const std::int32_t* begin = lists.data() + row * lists.cols();
    std::size_t n = 0;
    while (n < static_cast<std::size_t>(lists.cols()) && begin[n] >= 0) ++n;
    return {begin, n};
}

// SGLang's `_init_raw` loop with random.Random(42) over `lists`; writes the row of every rank in
// `ranks` (all ranks see the same lists: the runtime path), or of `only_rank` (>= 0: this rank's
// own collapsed lists, the file path) into tables[r] ([L, E] each).
void sglang_static_loop(const ExpertLocation& loc, const RowMatrix<std::int32_t>& lists,
                        int only_rank, std::vector<RowMatrix<std::int32_t>>& tables) {
    const int L = loc.num_layers(), E = loc.num_logical_experts(), W = loc.ep_size();
    const int S = loc.num_local_physical_experts(), rpn = loc.ranks_per_node();
    detail::PyRandom rng(kSglangTableSeed);
    std::vector<std::int32_t> nearest(static_cast<std::size_t>(W));
    std::vector<int> remaining;
    for (int l = 0; l < L; ++l) {
        for (int e = 0; e < E; ++e) {
            const auto candidates = list_of(lists, static_cast<Index>(l) * E + e);
            remaining.clear();
            for (int g = 0; g < W; ++g) {
                nearest[static_cast<std::size_t>(g)] =
                    sglang_nearest_replica(candidates, g, S, rpn);
                if (nearest[static_cast<std::size_t>(g)] < 0) remaining.push_back(g);
            }
            if (!remaining.empty()) {
                const std::size_t k = remaining.size(), n = candidates.size();
                std::vector<std::int32_t> choices;
                choices.reserve(k);
                for (std::size_t q = 0; q < k / n; ++q) {
                    choices.insert(choices.end(), candidates.begin(), candidates.end());
                }
                const auto sampled = rng.sample(candidates, k % n);
                choices.insert(choices.end(), sampled.begin(), sampled.end());
                rng.shuffle(choices);
                for (std::size_t i = 0; i < k; ++i) {
                    nearest[static_cast<std::size_t>(remaining[i])] = choices[i];
                }
            }
            if (only_rank >= 0) {
                tables[static_cast<std::size_t>(only_rank)](l, e) =
                    nearest[static_cast<std::size_t>(only_rank)];
            } else {
                for (int g = 0; g < W; ++g) tables[static_cast<std::size_t>(g)](l, e) = nearest[g];
            }
        }
    }
}

RowMatrix<std::int32_t> empty_table(const ExpertLocation& loc) {
    return RowMatrix<std::int32_t>::Constant(loc.num_layers(), loc.num_logical_experts(), -1);
}

// --- A memo of SGLang's per-rank tables for LayerDispatcher -------------------------------------
//
// SGLang's file-path table of a rank depends on every earlier (layer, expert) through the random
// stream, so one layer's row costs the whole table. select_experts maps one layer of one rank per
// call; the memo keeps the tables of the last few placements (compared by content, so a placement
// rebuilt with the same map hits, and a different one never does), within a byte budget: at
// 1,024 ranks all of a placement's runtime tables would be 64 MB, so past the budget only the
// asked rank's table is kept and the oldest placements are dropped.

struct TableMemo {
    struct Entry {
        RowMatrix<std::int32_t> physical_to_logical;
        int num_logical_experts, ep_size, num_nodes;
        DispatchAlgorithm algorithm;
        std::vector<std::shared_ptr<const RowMatrix<std::int32_t>>> tables;  // [W], lazily
    };
    static constexpr std::size_t kEntries = 8;
    static constexpr std::size_t kBudgetBytes = std::size_t{64} << 20;
    std::mutex mutex;
    std::vector<std::shared_ptr<Entry>> entries;  // most recent last
};

TableMemo& table_memo() {
    static TableMemo memo;
    return memo;
}

std::shared_ptr<const RowMatrix<std::int32_t>> memo_table(const ExpertLocation& loc,
                                                          DispatchAlgorithm algorithm,
                                                          int ep_rank) {
    TableMemo& memo = table_memo();
    std::shared_ptr<TableMemo::Entry> entry;
    {
        std::lock_guard lock(memo.mutex);
        for (auto it = memo.entries.begin(); it != memo.entries.end(); ++it) {
            const auto& c = **it;
            if (c.algorithm == algorithm && c.num_logical_experts == loc.num_logical_experts() &&
                c.ep_size == loc.ep_size() && c.num_nodes == loc.num_nodes() &&
                c.physical_to_logical.rows() == loc.physical_to_logical().rows() &&
                c.physical_to_logical.cols() == loc.physical_to_logical().cols() &&
                c.physical_to_logical == loc.physical_to_logical()) {
                entry = *it;
                memo.entries.erase(it);
                memo.entries.push_back(entry);
                break;
            }
        }
        if (entry == nullptr) {
            entry = std::make_shared<TableMemo::Entry>(
                TableMemo::Entry{loc.physical_to_logical(), loc.num_logical_experts(),
                                 loc.ep_size(), loc.num_nodes(), algorithm,
                                 std::vector<std::shared_ptr<const RowMatrix<std::int32_t>>>(
                                     static_cast<std::size_t>(loc.ep_size()))});
            if (memo.entries.size() >= TableMemo::kEntries)
                memo.entries.erase(memo.entries.begin());
            memo.entries.push_back(entry);
        }
        if (auto t = entry->tables[static_cast<std::size_t>(ep_rank)]) return t;
    }
    // Computed outside the lock; two threads racing compute the same table.
    std::vector<std::shared_ptr<const RowMatrix<std::int32_t>>> made(
        static_cast<std::size_t>(loc.ep_size()));
    if (algorithm == DispatchAlgorithm::kSglangStaticRuntime) {
        const RowMatrix<std::int32_t> all = dispatch_tables(loc, algorithm);
        for (int r = 0; r < loc.ep_size(); ++r) {
            made[static_cast<std::size_t>(r)] = std::make_shared<const RowMatrix<std::int32_t>>(
                Eigen::Map<const RowMatrix<std::int32_t>>(all.row(r).data(), loc.num_layers(),
                                                          loc.num_logical_experts()));
        }
    } else {
        made[static_cast<std::size_t>(ep_rank)] = std::make_shared<const RowMatrix<std::int32_t>>(
            dispatch_table(loc, algorithm, ep_rank));
    }
    const auto table_bytes = [](const std::shared_ptr<const RowMatrix<std::int32_t>>& t) {
        return t == nullptr ? std::size_t{0}
                            : static_cast<std::size_t>(t->size()) * sizeof(std::int32_t);
    };
    std::lock_guard lock(memo.mutex);
    std::size_t adding = 0;
    for (const auto& t : made) adding += table_bytes(t);
    if (adding > TableMemo::kBudgetBytes) {  // keep the asked rank's table only
        for (std::size_t r = 0; r < made.size(); ++r) {
            if (r != static_cast<std::size_t>(ep_rank)) made[r] = nullptr;
        }
    }
    for (std::size_t r = 0; r < made.size(); ++r) {
        if (made[r] != nullptr && entry->tables[r] == nullptr) entry->tables[r] = made[r];
    }
    const auto result = entry->tables[static_cast<std::size_t>(ep_rank)];
    // Drop the oldest placements (never this one) until the memo fits its budget.
    const auto held = [&] {
        std::size_t bytes = 0;
        for (const auto& e : memo.entries) {
            for (const auto& t : e->tables) bytes += table_bytes(t);
        }
        return bytes;
    };
    while (memo.entries.size() > 1 && memo.entries.front() != entry &&
           held() > TableMemo::kBudgetBytes) {
        memo.entries.erase(memo.entries.begin());
    }
    return result;
}

}  // namespace

constexpr detail::EnumNames<DispatchAlgorithm, 8> kDispatchNames{{
    {"sglang_static", DispatchAlgorithm::kSglangStatic},
    {"sglang_static_runtime", DispatchAlgorithm::kSglangStaticRuntime},
    {"sglang_dynamic", DispatchAlgorithm::kSglangDynamic},
    {"sglang_dynamic_rank_invariant", DispatchAlgorithm::kSglangDynamicRankInvariant},
    {"vllm_hash", DispatchAlgorithm::kVllmHash},
    {"round_robin", DispatchAlgorithm::kRoundRobin},
    {"equal_split", DispatchAlgorithm::kEqualSplit},
    {"moelb_static", DispatchAlgorithm::kMoelbStatic},
}};

DispatchAlgorithm parse_dispatch_algorithm(std::string_view name, std::string_view param) {
    return detail::parse_enum(kDispatchNames, name, param, "a dispatch algorithm");
}

std::string_view to_string(DispatchAlgorithm value) {
    return detail::enum_name(kDispatchNames, value);
}

bool is_table_dispatch(DispatchAlgorithm algorithm) {
    return algorithm == DispatchAlgorithm::kSglangStatic ||
           algorithm == DispatchAlgorithm::kSglangStaticRuntime ||
           algorithm == DispatchAlgorithm::kMoelbStatic;
}

std::int32_t sglang_nearest_replica(std::span<const std::int32_t> candidates, int rank,
                                    int num_local_physical_experts, int ranks_per_node) {
    if (candidates.size() == 1) return candidates[0];
    for (const std::int32_t p : candidates) {
        if (p / num_local_physical_experts == rank) return p;
    }
    // Same-node preference: the first candidate on the rank's node, only when the node's subset
    // is non-empty and strictly smaller than the whole list.
    const int node = rank / ranks_per_node;
    const int slots_per_node = num_local_physical_experts * ranks_per_node;
    std::int32_t first = -1;
    std::size_t on_node = 0;
    for (const std::int32_t p : candidates) {
        if (p / slots_per_node == node) {
            if (first < 0) first = p;
            ++on_node;
        }
    }
    return on_node > 0 && on_node < candidates.size() ? first : -1;
}

RowMatrix<std::int32_t> sglang_replica_lists(const ExpertLocation& location,
                                             ConstMatrixMap<std::int32_t> replica_order,
                                             int collapse_for_rank) {
    const Index L = location.num_layers(), E = location.num_logical_experts();
    const Index X = location.max_replicas();
    if (collapse_for_rank >= 0) check_rank(location, collapse_for_rank);
    RowMatrix<std::int32_t> lists(L * E, X);
    if (replica_order.data() == nullptr || replica_order.size() == 0) {
        lists = location.logical_to_physical();
    } else {
        MOELB_CHECK_ARG(replica_order.rows() == L * E && replica_order.cols() >= X,
                        "replica_order has shape ["
                            << replica_order.rows() << ", " << replica_order.cols()
                            << "] (flattened) but the location needs [" << L * E << ", >= " << X
                            << "]");
        std::vector<std::int32_t> mine, given;
        for (Index row = 0; row < L * E; ++row) {
            const auto reps =
                location.replicas(static_cast<int>(row / E), static_cast<int>(row % E));
            mine.assign(reps.begin(), reps.end());
            given.clear();
            for (Index x = 0; x < replica_order.cols(); ++x) {
                const std::int32_t p = replica_order(row, x);
                MOELB_CHECK_ARG(p >= -1, "replica_order[" << row / E << ", " << row % E << ", " << x
                                                          << "] = " << p
                                                          << ": -1 marks padding, slots are >= 0");
                if (p >= 0) given.push_back(p);
            }
            std::vector<std::int32_t> sorted = given;
            std::sort(sorted.begin(), sorted.end());
            MOELB_CHECK_ARG(sorted == mine, "replica_order[" << row / E << ", " << row % E
                                                             << "] does not list exactly the "
                                                                "slots of that expert in the "
                                                                "location");
            for (Index x = 0; x < X; ++x) {
                lists(row, x) =
                    x < static_cast<Index>(given.size()) ? given[static_cast<std::size_t>(x)] : -1;
            }
        }
    }
    if (collapse_for_rank >= 0) {
        const int S = location.num_local_physical_experts(), rpn = location.ranks_per_node();
        for (Index row = 0; row < L * E; ++row) {
            const auto candidates = list_of(lists, row);
            const std::int32_t near = sglang_nearest_replica(candidates, collapse_for_rank, S, rpn);
            if (near < 0) continue;
            lists(row, 0) = near;
            for (Index x = 1; x < X; ++x) lists(row, x) = -1;
        }
    }
    return lists;
}

namespace {

void check_replica_order_use(DispatchAlgorithm algorithm,
                             ConstMatrixMap<std::int32_t> replica_order) {
    MOELB_CHECK_ARG(replica_order.data() == nullptr || replica_order.size() == 0 ||
                        algorithm == DispatchAlgorithm::kSglangStaticRuntime,
                    "replica_order applies to dispatch='sglang_static_runtime' only (SGLang's "
                    "file path lists replicas in ascending slots), got dispatch='"
                        << to_string(algorithm) << "'");
}

}  // namespace

RowMatrix<std::int32_t> dispatch_table(const ExpertLocation& location, DispatchAlgorithm algorithm,
                                       int ep_rank, std::uint64_t seed,
                                       ConstMatrixMap<std::int32_t> replica_order) {
    check_rank(location, ep_rank);
    check_replica_order_use(algorithm, replica_order);
    switch (algorithm) {
        case DispatchAlgorithm::kMoelbStatic:
            return moelb_static_table(location, ep_rank, seed);
        case DispatchAlgorithm::kSglangStatic: {
            const auto lists = sglang_replica_lists(location, {nullptr, 0, 0}, ep_rank);
            std::vector<RowMatrix<std::int32_t>> tables(
                static_cast<std::size_t>(location.ep_size()));
            tables[static_cast<std::size_t>(ep_rank)] = empty_table(location);
            sglang_static_loop(location, lists, ep_rank, tables);
            return std::move(tables[static_cast<std::size_t>(ep_rank)]);
        }
        case DispatchAlgorithm::kSglangStaticRuntime: {
            const auto lists = sglang_replica_lists(location, replica_order, -1);
            std::vector<RowMatrix<std::int32_t>> tables(
                static_cast<std::size_t>(location.ep_size()), empty_table(location));
            sglang_static_loop(location, lists, -1, tables);
            return std::move(tables[static_cast<std::size_t>(ep_rank)]);
        }
        default:
            break;
    }
    MOELB_CHECK_ARG(false, "dispatch='" << to_string(algorithm)
                                        << "' picks a replica per token, it has no table; "
                                           "tables exist for 'sglang_static', "
                                           "'sglang_static_runtime' and 'moelb_static'");
    return {};
}

RowMatrix<std::int32_t> dispatch_tables(const ExpertLocation& location, DispatchAlgorithm algorithm,
                                        std::uint64_t seed,
                                        ConstMatrixMap<std::int32_t> replica_order) {
    check_replica_order_use(algorithm, replica_order);
    const int W = location.ep_size();
    const Index LE = static_cast<Index>(location.num_layers()) * location.num_logical_experts();
    RowMatrix<std::int32_t> out(W, LE);
    if (algorithm == DispatchAlgorithm::kSglangStaticRuntime) {
        const auto lists = sglang_replica_lists(location, replica_order, -1);
        std::vector<RowMatrix<std::int32_t>> tables(static_cast<std::size_t>(W),
                                                    empty_table(location));
        sglang_static_loop(location, lists, -1, tables);
        for (int r = 0; r < W; ++r) {
            out.row(r) = Eigen::Map<const Eigen::Matrix<std::int32_t, 1, Eigen::Dynamic>>(
                tables[static_cast<std::size_t>(r)].data(), LE);
        }
        return out;
    }
    if (!is_table_dispatch(algorithm)) dispatch_table(location, algorithm, 0, seed);  // throws
    parallel_for(W, 1, [&](Index begin, Index end) {
        for (Index r = begin; r < end; ++r) {
            const auto table = dispatch_table(location, algorithm, static_cast<int>(r), seed);
            out.row(r) =
                Eigen::Map<const Eigen::Matrix<std::int32_t, 1, Eigen::Dynamic>>(table.data(), LE);
        }
    });
    return out;
}

LayerDispatcher::LayerDispatcher(const ExpertLocation& location, int layer, int ep_rank,
                                 DispatchAlgorithm algorithm, std::uint64_t seed)
    : location_(&location), layer_(layer), ep_rank_(ep_rank), algorithm_(algorithm), seed_(seed) {
    check_layer(location, layer);
    check_rank(location, ep_rank);
    const int E = location.num_logical_experts();
    switch (algorithm) {
        case DispatchAlgorithm::kMoelbStatic:
            table_row_.resize(static_cast<std::size_t>(E));
            for (int e = 0; e < E; ++e) {
                table_row_[static_cast<std::size_t>(e)] =
                    moelb_static_slot(location, layer, e, ep_rank, seed);
            }
            break;
        case DispatchAlgorithm::kSglangStatic:
        case DispatchAlgorithm::kSglangStaticRuntime: {
            const auto table = memo_table(location, algorithm, ep_rank);
            table_row_.assign(table->row(layer).data(), table->row(layer).data() + E);
            break;
        }
        case DispatchAlgorithm::kSglangDynamic: {
            // This rank's collapsed lists of this layer only (the collapse is per list).
            const int S = location.num_local_physical_experts(), rpn = location.ranks_per_node();
            width_ = location.max_replicas();
            lists_.assign(static_cast<std::size_t>(E) * width_, -1);
            counts_.resize(static_cast<std::size_t>(E));
            for (int e = 0; e < E; ++e) {
                const auto reps = location.replicas(layer, e);
                std::int32_t* row = lists_.data() + static_cast<std::size_t>(e) * width_;
                const std::int32_t near = sglang_nearest_replica(reps, ep_rank, S, rpn);
                if (near >= 0) {
                    row[0] = near;
                    counts_[static_cast<std::size_t>(e)] = 1;
                } else {
                    std::copy(reps.begin(), reps.end(), row);
                    counts_[static_cast<std::size_t>(e)] = static_cast<std::int32_t>(reps.size());
                }
            }
            break;
        }
        case DispatchAlgorithm::kEqualSplit:
            MOELB_CHECK_ARG(false,
                            "dispatch='equal_split' splits every token over all replicas; it "
                            "picks no slot per token (the simulator scores it from counts)");
            break;
        default:
            break;
    }
}

std::int32_t LayerDispatcher::map(std::int32_t expert, Index token, int column) const {
    switch (algorithm_) {
        case DispatchAlgorithm::kSglangStatic:
        case DispatchAlgorithm::kSglangStaticRuntime:
        case DispatchAlgorithm::kMoelbStatic:
            return table_row_[static_cast<std::size_t>(expert)];
        case DispatchAlgorithm::kSglangDynamic: {
            const std::int32_t n = counts_[static_cast<std::size_t>(expert)];
            const std::int32_t* row = lists_.data() + static_cast<std::size_t>(expert) * width_;
            if (n == 1) return row[0];
            // randint(0, 65536) % num_valid: a 16-bit draw, then the modulo (its bias kept).
            const std::uint64_t draw =
                hash_combine(
                    seed_, kSaltDynamic,
                    static_cast<std::uint64_t>(layer_) << 32 | static_cast<std::uint32_t>(ep_rank_),
                    static_cast<std::uint64_t>(token) << 16 | static_cast<std::uint64_t>(column)) &
                0xFFFFu;
            return row[draw % static_cast<std::uint64_t>(n)];
        }
        case DispatchAlgorithm::kSglangDynamicRankInvariant: {
            const auto reps = location_->replicas(layer_, expert);
            return reps[static_cast<std::size_t>(token) % reps.size()];
        }
        case DispatchAlgorithm::kVllmHash: {
            const auto reps = location_->replicas(layer_, expert);
            const std::uint64_t h =
                (static_cast<std::uint64_t>(token) * kVllmHashMultiplier) & 0xFFFFFFFFull;
            return reps[h % reps.size()];
        }
        case DispatchAlgorithm::kRoundRobin: {
            const auto reps = location_->replicas(layer_, expert);
            return reps[(static_cast<std::uint64_t>(token) % reps.size() +
                         static_cast<std::uint64_t>(ep_rank_)) %
                        reps.size()];
        }
        case DispatchAlgorithm::kEqualSplit:
            break;
    }
    return -1;
}

void dispatch_tokens(const ExpertLocation& location, DispatchAlgorithm algorithm, int layer,
                     ConstMatrixMap<std::int32_t> topk_ids, std::span<const Index> rank_offsets,
                     std::uint64_t seed, MatrixMap<std::int32_t> out) {
    const int W = location.ep_size();
    const Index T = topk_ids.rows(), C = topk_ids.cols();
    MOELB_CHECK_ARG(out.rows() == T && out.cols() == C,
                    "out has shape [" << out.rows() << ", " << out.cols()
                                      << "] but topk_ids has shape [" << T << ", " << C << "]");
    MOELB_CHECK_ARG(
        static_cast<int>(rank_offsets.size()) == W + 1,
        "rank_offsets has " << rank_offsets.size() << " entries but ep_size + 1 = " << W + 1);
    MOELB_CHECK_ARG(rank_offsets.front() == 0 && rank_offsets.back() == T,
                    "rank_offsets must run from 0 to the number of tokens "
                        << T << ", got " << rank_offsets.front() << " .. " << rank_offsets.back());
    for (int r = 0; r < W; ++r) {
        MOELB_CHECK_ARG(rank_offsets[static_cast<std::size_t>(r)] <=
                            rank_offsets[static_cast<std::size_t>(r + 1)],
                        "rank_offsets must be non-decreasing, got "
                            << rank_offsets[static_cast<std::size_t>(r)] << " before "
                            << rank_offsets[static_cast<std::size_t>(r + 1)]);
    }
    std::vector<LayerDispatcher> dispatchers;
    dispatchers.reserve(static_cast<std::size_t>(W));
    for (int r = 0; r < W; ++r) dispatchers.emplace_back(location, layer, r, algorithm, seed);
    const bool global_rows = algorithm == DispatchAlgorithm::kSglangDynamicRankInvariant;
    const int E = location.num_logical_experts();
    // Every id is checked before any is written: `out` may alias `topk_ids`, and a bad id must
    // leave it as it was. The error names the first bad id in row-major order.
    std::vector<Index> first_bad(static_cast<std::size_t>((T + 1023) / 1024), -1);
    parallel_for(T, 1024, [&](Index begin, Index end) {
        for (Index t = begin; t < end; ++t) {
            for (Index c = 0; c < C; ++c) {
                const std::int32_t e = topk_ids(t, c);
                if (e < -1 || e >= E) {
                    first_bad[static_cast<std::size_t>(begin / 1024)] = t * C + c;
                    return;
                }
            }
        }
    });
    for (const Index bad : first_bad) {
        if (bad < 0) continue;
        const Index t = bad / C, c = bad % C;
        MOELB_CHECK_ARG(false, "topk_ids[" << t << ", " << c << "] = " << topk_ids(t, c)
                                           << " is outside [-1, num_logical_experts=" << E << ")");
    }
    parallel_for(T, 1024, [&](Index begin, Index end) {
        int r = static_cast<int>(std::upper_bound(rank_offsets.begin(), rank_offsets.end(), begin) -
                                 rank_offsets.begin() - 1);
        for (Index t = begin; t < end; ++t) {
            while (t >= rank_offsets[static_cast<std::size_t>(r + 1)]) ++r;
            const Index row = global_rows ? t : t - rank_offsets[static_cast<std::size_t>(r)];
            const LayerDispatcher& d = dispatchers[static_cast<std::size_t>(r)];
            for (Index c = 0; c < C; ++c) {
                const std::int32_t e = topk_ids(t, c);
                out(t, c) = e < 0 ? -1 : d.map(e, row, static_cast<int>(c));
            }
        }
    });
}

}  // namespace moelb
