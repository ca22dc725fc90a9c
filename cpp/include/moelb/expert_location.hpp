// Expert placement: which logical expert every physical expert slot holds, per MoE layer, and the
// dispatch of logical expert ids to physical slots.
//
// Shapes: L layers, E logical experts, P physical slots (P = E + redundant), W EP ranks, N nodes,
// S = P / W slots per rank. Slot p lives on rank p / S; rank r lives on node r / (W / N).
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

#include "moelb/buffer_pool.hpp"
#include "moelb/views.hpp"

namespace moelb {

// How a logical expert id becomes a physical slot when the expert has several replicas.
//   kStatic:     one fixed replica per (layer, rank, expert): a replica on the rank itself (lowest
//                slot), else the node's replicas shared evenly among the node's ranks that have
//                none, else all replicas shared evenly among the ranks of nodes that hold none.
//                "Evenly" means each candidate serves floor or ceil of (ranks / candidates) ranks;
//                which one starts is a seeded choice per (layer, expert[, node]).
//   kRandom:     a seeded pseudo-random replica per (token, column) slot.
//   kRoundRobin: replica (token + ep_rank) mod replica count.
enum class DispatchAlgorithm { kStatic, kRandom, kRoundRobin };

// Parses "static" | "random" | "round_robin"; bad names are an InvalidArgument naming `param`.
DispatchAlgorithm parse_dispatch_algorithm(std::string_view name,
                                           std::string_view param = "dispatch");
std::string_view to_string(DispatchAlgorithm algorithm);

class ExpertLocation {
  public:
    // physical_to_logical: [L, P] int32, the logical expert of every slot. Validated: ids in
    // [0, num_logical_experts), every logical expert has a replica in every layer, P % ep_size ==
    // 0, ep_size % num_nodes == 0.
    ExpertLocation(RowMatrix<std::int32_t> physical_to_logical, int num_logical_experts,
                   int ep_size, int num_nodes = 1);

    // Slot p holds logical expert p % num_logical_experts in every layer (SGLang's trivial layout).
    static ExpertLocation trivial(int num_layers, int num_logical_experts, int num_physical_experts,
                                  int ep_size, int num_nodes = 1);

    int num_layers() const { return static_cast<int>(physical_to_logical_.rows()); }
    int num_logical_experts() const { return num_logical_experts_; }
    int num_physical_experts() const { return static_cast<int>(physical_to_logical_.cols()); }
    int ep_size() const { return ep_size_; }
    int num_nodes() const { return num_nodes_; }
    // S: physical slots per rank.
    int num_local_physical_experts() const { return num_physical_experts() / ep_size_; }
    int ranks_per_node() const { return ep_size_ / num_nodes_; }
    // X: the most replicas any logical expert has in any layer (width of logical_to_physical).
    int max_replicas() const { return max_replicas_; }

    int rank_of_slot(int slot) const { return slot / num_local_physical_experts(); }
    int node_of_rank(int rank) const { return rank / ranks_per_node(); }

    // [L, P]
    const RowMatrix<std::int32_t>& physical_to_logical() const { return physical_to_logical_; }
    // [L * E, X]: row l * E + e lists the slots of expert e in layer l, ascending, padded with -1.
    ConstMatrixMap<std::int32_t> logical_to_physical() const {
        return {logical_to_physical_.data(),
                physical_to_logical_.rows() * static_cast<Index>(num_logical_experts_),
                max_replicas_};
    }
    // [L, E]: the number of replicas of each logical expert (DeepSeek's logcnt).
    const RowMatrix<std::int32_t>& logical_count() const { return logical_count_; }

    // The replicas of expert e in layer l (ascending slots).
    std::span<const std::int32_t> replicas(int layer, int expert) const {
        const Index row = static_cast<Index>(layer) * num_logical_experts_ + expert;
        return {logical_to_physical_.data() + row * max_replicas_,
                static_cast<std::size_t>(logical_count_(layer, expert))};
    }

    // The static-dispatch slot rank `ep_rank` uses for expert e of layer l (see kStatic).
    std::int32_t static_dispatch_slot(int layer, int expert, int ep_rank, std::uint64_t seed) const;
    // [L, E]: static_dispatch_slot for every (layer, expert) of one rank.
    RowMatrix<std::int32_t> static_dispatch_table(int ep_rank, std::uint64_t seed) const;

    // Maps logical ids [T, C] of one layer to physical slots (out [T, C], may alias topk_ids);
    // -1 stays -1; any other id outside [0, E) is an InvalidArgument.
    void dispatch(ConstMatrixMap<std::int32_t> topk_ids, int layer, int ep_rank,
                  DispatchAlgorithm algorithm, std::uint64_t seed,
                  MatrixMap<std::int32_t> out) const;

    bool operator==(const ExpertLocation& other) const;

  private:
    RowMatrix<std::int32_t> physical_to_logical_;
    int num_logical_experts_;
    int ep_size_;
    int num_nodes_;
    int max_replicas_ = 0;
    // [L * E, X], rebuilt with every placement: pooled, so its pages stay mapped.
    PooledVector<std::int32_t> logical_to_physical_;
    RowMatrix<std::int32_t> logical_count_;
};

// The logical -> physical mapping of one layer as seen by one rank: built once per call (validates
// layer and ep_rank; precomputes the static table row), then applied per (token, column).
class LayerDispatcher {
  public:
    LayerDispatcher(const ExpertLocation& location, int layer, int ep_rank,
                    DispatchAlgorithm algorithm, std::uint64_t seed);

    const ExpertLocation& location() const { return *location_; }
    int layer() const { return layer_; }

    // The physical slot for logical expert `expert` chosen by token `token` in column `column`.
    // `expert` must be in [0, E).
    std::int32_t map(std::int32_t expert, Index token, int column) const;

  private:
    const ExpertLocation* location_;
    int layer_;
    int ep_rank_;
    DispatchAlgorithm algorithm_;
    std::uint64_t seed_;
    std::vector<std::int32_t> static_row_;  // [E], only for kStatic
};

}  // namespace moelb
