// The dispatch copies of the step-time model (DESIGN section 7; python/moelb/step_time.py
// documents the whole model): for one MoE layer's dispatched tokens, how many token copies each
// GPU sends and receives over NVLink (inside a node) and over the network (between nodes), as
// DeepEP's kernels move them. Combine moves the same copies back.
//
// GPU r lives on node r / (W / N); physical slot p lives on GPU p / (P / W). A copy to the
// token's own GPU crosses no link.
//   kNormal (DeepEP's normal kernels, SGLang's prefill path): one copy per (token, destination
//     GPU). Inside the token's node it goes over NVLink. To another node it goes once per
//     (token, node) over the network, to the GPU of the token's local index there (the relay),
//     which forwards it over NVLink to every other destination GPU of that node.
//   kLowLatency (DeepEP's low-latency kernels, SGLang's decode path): one copy per (token,
//     routed column) whose GPU is not the token's: NVLink inside the node, the network across.
#pragma once

#include <array>
#include <cstdint>
#include <span>

#include "moelb/views.hpp"

namespace moelb {

enum class DeepEPMode { kNormal, kLowLatency };

// Rows of token_copies' output.
inline constexpr int kNvlinkSent = 0;
inline constexpr int kNvlinkReceived = 1;
inline constexpr int kNetworkSent = 2;
inline constexpr int kNetworkReceived = 3;

// Counts one layer's dispatch copies, and the (token, expert) pairs of each slot.
//   physical: [T, C] physical slot ids in [-1, num_physical_experts) (-1: no expert).
//   source_rank: [T] the GPU each token starts on, in [0, ep_size).
//   out: [4, ep_size] int64 (rows kNvlinkSent .. kNetworkReceived), overwritten.
//   slot_tokens: [num_physical_experts] int64, overwritten (empty: not counted).
// ep_size must be a positive multiple of num_nodes and num_physical_experts a positive multiple
// of ep_size; an id or rank out of range is an InvalidArgument naming the first bad row. One
// pass over the ids, in parallel over chunks of tokens whose integer counts are summed: the same
// result for any thread count.
void token_copies(ConstMatrixMap<std::int32_t> physical, std::span<const std::int32_t> source_rank,
                  int num_physical_experts, int ep_size, int num_nodes, DeepEPMode mode,
                  MatrixMap<std::int64_t> out, std::span<std::int64_t> slot_tokens = {});

}  // namespace moelb
