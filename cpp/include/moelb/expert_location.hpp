// Expert placement: which logical expert every physical expert slot holds, per MoE layer (DESIGN
// section 2). How tokens pick among an expert's replicas is moelb/dispatch.hpp.
//
// Shapes: L layers, E logical experts, P physical slots (P = E + redundant), W EP ranks, N nodes,
// S = P / W slots per rank. Slot p lives on rank p / S; rank r lives on node r / (W / N).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "moelb/buffer_pool.hpp"
#include "moelb/views.hpp"

namespace moelb {

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
    int node_of_rank(int ep_rank) const { return ep_rank / ranks_per_node(); }

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

}  // namespace moelb
