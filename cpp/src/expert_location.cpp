#include "moelb/expert_location.hpp"

#include <algorithm>

#include "enum_names.hpp"
#include "moelb/errors.hpp"
#include "moelb/parallel.hpp"

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
constexpr std::uint64_t kSaltRandom = 3;

}  // namespace

constexpr detail::EnumNames<DispatchAlgorithm, 3> kDispatchNames{{
    {"static", DispatchAlgorithm::kStatic},
    {"random", DispatchAlgorithm::kRandom},
    {"round_robin", DispatchAlgorithm::kRoundRobin},
}};

DispatchAlgorithm parse_dispatch_algorithm(std::string_view name, std::string_view param) {
    return detail::parse_enum(kDispatchNames, name, param, "a dispatch algorithm");
}

std::string_view to_string(DispatchAlgorithm value) {
    return detail::enum_name(kDispatchNames, value);
}

ExpertLocation::ExpertLocation(RowMatrix<std::int32_t> physical_to_logical, int num_logical_experts,
                               int ep_size, int num_nodes)
    : physical_to_logical_(std::move(physical_to_logical)),
      num_logical_experts_(num_logical_experts),
      ep_size_(ep_size),
      num_nodes_(num_nodes) {
    const Index L = physical_to_logical_.rows();
    const Index P = physical_to_logical_.cols();
    const int E = num_logical_experts;
    MOELB_CHECK_ARG(L >= 1, "physical_to_logical must have at least one layer, got shape ["
                                << L << ", " << P << "]");
    MOELB_CHECK_ARG(E >= 1, "num_logical_experts must be positive, got " << E);
    MOELB_CHECK_ARG(ep_size >= 1, "ep_size must be positive, got " << ep_size);
    MOELB_CHECK_ARG(num_nodes >= 1, "num_nodes must be positive, got " << num_nodes);
    MOELB_CHECK_ARG(P >= E, "num_physical_experts=" << P << " is smaller than num_logical_experts="
                                                    << E << ": some expert would have no replica");
    MOELB_CHECK_ARG(P % ep_size == 0,
                    "num_physical_experts=" << P << " is not divisible by ep_size=" << ep_size);
    MOELB_CHECK_ARG(ep_size % num_nodes == 0,
                    "ep_size=" << ep_size << " is not divisible by num_nodes=" << num_nodes);

    // Per layer (in parallel; an error is that of the lowest bad layer, as a serial scan finds):
    // the replica counts, then the replicas of each expert in slot order, padded with -1.
    constexpr Index kLayerGrain = 8;
    logical_count_ = RowMatrix<std::int32_t>::Zero(L, E);
    parallel_for(L, kLayerGrain, [&](Index begin, Index end) {
        for (Index l = begin; l < end; ++l) {
            for (Index p = 0; p < P; ++p) {
                const std::int32_t e = physical_to_logical_(l, p);
                MOELB_CHECK_ARG(e >= 0 && e < E, "physical_to_logical["
                                                     << l << ", " << p << "] = " << e
                                                     << " is outside [0, num_logical_experts=" << E
                                                     << ")");
                ++logical_count_(l, e);
            }
            for (int e = 0; e < E; ++e) {
                MOELB_CHECK_ARG(logical_count_(l, e) > 0, "logical expert "
                                                              << e << " has no replica in layer "
                                                              << l << " of physical_to_logical");
            }
        }
    });
    max_replicas_ = logical_count_.maxCoeff();
    const Index X = max_replicas_;
    logical_to_physical_.clear();
    logical_to_physical_.resize(static_cast<std::size_t>(L * E * X));  // unwritten (PooledVector)
    parallel_for(L, kLayerGrain, [&](Index begin, Index end) {
        std::vector<int> fill(static_cast<std::size_t>(E));
        for (Index l = begin; l < end; ++l) {
            // The layer's rows are contiguous: pad them, then place each slot.
            std::int32_t* rows = logical_to_physical_.data() + l * E * X;
            std::fill(rows, rows + E * X, -1);
            std::fill(fill.begin(), fill.end(), 0);
            for (Index p = 0; p < P; ++p) {
                const int e = physical_to_logical_(l, p);
                rows[e * X + fill[static_cast<std::size_t>(e)]++] = static_cast<std::int32_t>(p);
            }
        }
    });
}

ExpertLocation ExpertLocation::trivial(int num_layers, int num_logical_experts,
                                       int num_physical_experts, int ep_size, int num_nodes) {
    MOELB_CHECK_ARG(num_layers >= 1, "num_layers must be positive, got " << num_layers);
    MOELB_CHECK_ARG(num_logical_experts >= 1,
                    "num_logical_experts must be positive, got " << num_logical_experts);
    MOELB_CHECK_ARG(
        num_physical_experts >= num_logical_experts,
        "num_physical_experts=" << num_physical_experts
                                << " is smaller than num_logical_experts=" << num_logical_experts);
    RowMatrix<std::int32_t> map(num_layers, num_physical_experts);
    for (int l = 0; l < num_layers; ++l) {
        for (int p = 0; p < num_physical_experts; ++p) map(l, p) = p % num_logical_experts;
    }
    return ExpertLocation(std::move(map), num_logical_experts, ep_size, num_nodes);
}

bool ExpertLocation::operator==(const ExpertLocation& other) const {
    return num_logical_experts_ == other.num_logical_experts_ && ep_size_ == other.ep_size_ &&
           num_nodes_ == other.num_nodes_ &&
           physical_to_logical_.rows() == other.physical_to_logical_.rows() &&
           physical_to_logical_.cols() == other.physical_to_logical_.cols() &&
           physical_to_logical_ == other.physical_to_logical_;
}

std::int32_t ExpertLocation::static_dispatch_slot(int layer, int expert, int ep_rank,
                                                  std::uint64_t seed) const {
    MOELB_CHECK_ARG(layer >= 0 && layer < num_layers(),
                    "layer=" << layer << " is outside [0, num_layers=" << num_layers() << ")");
    MOELB_CHECK_ARG(expert >= 0 && expert < num_logical_experts_,
                    "expert=" << expert << " is outside [0, num_logical_experts="
                              << num_logical_experts_ << ")");
    MOELB_CHECK_ARG(ep_rank >= 0 && ep_rank < ep_size_,
                    "ep_rank=" << ep_rank << " is outside [0, ep_size=" << ep_size_ << ")");
    const auto reps = replicas(layer, expert);
    const int rank_node = node_of_rank(ep_rank);
    const int rpn = ranks_per_node();
    // 1. A replica on the rank itself (replicas are ascending, so the first found is the lowest).
    for (const std::int32_t p : reps) {
        if (rank_of_slot(p) == ep_rank) return p;
    }
    // Replicas are ascending by slot, hence by rank and node: count holders before ep_rank.
    const int node_begin = rank_node * rpn;
    int node_reps_begin = -1, node_reps_end = -1;
    int holder_ranks_in_node_before = 0;
    int holder_nodes_before = 0;
    int last_rank = -1, last_node = -1;
    for (int i = 0; i < static_cast<int>(reps.size()); ++i) {
        const int r = rank_of_slot(reps[i]);
        const int n = node_of_rank(r);
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

RowMatrix<std::int32_t> ExpertLocation::static_dispatch_table(int ep_rank,
                                                              std::uint64_t seed) const {
    MOELB_CHECK_ARG(ep_rank >= 0 && ep_rank < ep_size_,
                    "ep_rank=" << ep_rank << " is outside [0, ep_size=" << ep_size_ << ")");
    RowMatrix<std::int32_t> table(num_layers(), num_logical_experts_);
    for (int l = 0; l < num_layers(); ++l) {
        for (int e = 0; e < num_logical_experts_; ++e) {
            table(l, e) = static_dispatch_slot(l, e, ep_rank, seed);
        }
    }
    return table;
}

void ExpertLocation::dispatch(ConstMatrixMap<std::int32_t> topk_ids, int layer, int ep_rank,
                              DispatchAlgorithm algorithm, std::uint64_t seed,
                              MatrixMap<std::int32_t> out) const {
    MOELB_CHECK_ARG(out.rows() == topk_ids.rows() && out.cols() == topk_ids.cols(),
                    "out has shape [" << out.rows() << ", " << out.cols()
                                      << "] but topk_ids has shape [" << topk_ids.rows() << ", "
                                      << topk_ids.cols() << "]");
    const LayerDispatcher dispatcher(*this, layer, ep_rank, algorithm, seed);
    const int E = num_logical_experts_;
    const Index C = topk_ids.cols();
    parallel_for(topk_ids.rows(), 1024, [&](Index begin, Index end) {
        for (Index t = begin; t < end; ++t) {
            for (Index c = 0; c < C; ++c) {
                const std::int32_t e = topk_ids(t, c);
                MOELB_CHECK_ARG(e >= -1 && e < E, "topk_ids[" << t << ", " << c << "] = " << e
                                                              << " is outside [-1, "
                                                                 "num_logical_experts="
                                                              << E << ")");
                out(t, c) = e < 0 ? -1 : dispatcher.map(e, t, static_cast<int>(c));
            }
        }
    });
}

LayerDispatcher::LayerDispatcher(const ExpertLocation& location, int layer, int ep_rank,
                                 DispatchAlgorithm algorithm, std::uint64_t seed)
    : location_(&location), layer_(layer), ep_rank_(ep_rank), algorithm_(algorithm), seed_(seed) {
    MOELB_CHECK_ARG(
        layer >= 0 && layer < location.num_layers(),
        "layer=" << layer << " is outside [0, num_layers=" << location.num_layers() << ")");
    MOELB_CHECK_ARG(
        ep_rank >= 0 && ep_rank < location.ep_size(),
        "ep_rank=" << ep_rank << " is outside [0, ep_size=" << location.ep_size() << ")");
    if (algorithm == DispatchAlgorithm::kStatic) {
        static_row_.resize(static_cast<std::size_t>(location.num_logical_experts()));
        for (int e = 0; e < location.num_logical_experts(); ++e) {
            static_row_[static_cast<std::size_t>(e)] =
                location.static_dispatch_slot(layer, e, ep_rank, seed);
        }
    }
}

std::int32_t LayerDispatcher::map(std::int32_t expert, Index token, int column) const {
    switch (algorithm_) {
        case DispatchAlgorithm::kStatic:
            return static_row_[static_cast<std::size_t>(expert)];
        case DispatchAlgorithm::kRandom: {
            const auto reps = location_->replicas(layer_, expert);
            if (reps.size() == 1) return reps[0];
            const std::uint64_t h = hash_combine(
                seed_, kSaltRandom, static_cast<std::uint64_t>(layer_) << 32 | ep_rank_,
                static_cast<std::uint64_t>(token) << 16 | static_cast<std::uint64_t>(column));
            return reps[h % reps.size()];
        }
        case DispatchAlgorithm::kRoundRobin: {
            const auto reps = location_->replicas(layer_, expert);
            return reps[static_cast<std::size_t>(token + ep_rank_) % reps.size()];
        }
    }
    return -1;
}

}  // namespace moelb
