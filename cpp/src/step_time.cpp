#include "moelb/step_time.hpp"

#include <algorithm>
#include <vector>

#include "moelb/errors.hpp"
#include "moelb/parallel.hpp"

namespace moelb {

namespace {

// Tokens per parallel chunk: each chunk counts into its own buffers, summed in chunk order.
constexpr Index kTokenGrain = 8192;

struct Topology {
    int P, W, N, S, G;
};

// Counts tokens [begin, end) into `copies` [4 * W] (row-major rows of the output) and `slots` [P].
void count_chunk(ConstMatrixMap<std::int32_t> physical, std::span<const std::int32_t> source_rank,
                 const Topology& top, DeepEPMode mode, Index begin, Index end, std::int64_t* copies,
                 std::int64_t* slots) {
    const int W = top.W;
    std::int64_t* nvl_sent = copies + kNvlinkSent * W;
    std::int64_t* nvl_recv = copies + kNvlinkReceived * W;
    std::int64_t* net_sent = copies + kNetworkSent * W;
    std::int64_t* net_recv = copies + kNetworkReceived * W;
    // The last token that reached each GPU / node (normal mode's one copy per (token, GPU) and
    // one network copy per (token, node)).
    std::vector<Index> gpu_seen(static_cast<std::size_t>(W), -1);
    std::vector<Index> node_seen(static_cast<std::size_t>(top.N), -1);
    const Index C = physical.cols();
    for (Index t = begin; t < end; ++t) {
        const int s = source_rank[static_cast<std::size_t>(t)];
        MOELB_CHECK_ARG(s >= 0 && s < W,
                        "source_rank[" << t << "]=" << s << " is not a rank in [0, " << W << ")");
        const int s_node = s / top.G;
        for (Index c = 0; c < C; ++c) {
            const std::int32_t p = physical(t, c);
            MOELB_CHECK_ARG(p >= -1 && p < top.P, "physical[" << t << ", " << c << "]=" << p
                                                              << " is not a slot in [-1, " << top.P
                                                              << ")");
            if (p < 0) continue;
            ++slots[p];
            const int d = p / top.S;
            if (mode == DeepEPMode::kNormal) {
                if (gpu_seen[static_cast<std::size_t>(d)] == t) continue;
                gpu_seen[static_cast<std::size_t>(d)] = t;
            }
            if (d == s) continue;
            const int d_node = d / top.G;
            if (d_node == s_node) {
                ++nvl_sent[s];
                ++nvl_recv[d];
            } else if (mode == DeepEPMode::kLowLatency) {
                ++net_sent[s];
                ++net_recv[d];
            } else {
                const int relay = d_node * top.G + s % top.G;
                if (node_seen[static_cast<std::size_t>(d_node)] != t) {
                    node_seen[static_cast<std::size_t>(d_node)] = t;
                    ++net_sent[s];
                    ++net_recv[relay];
                }
                if (d != relay) {
                    ++nvl_sent[relay];
                    ++nvl_recv[d];
                }
            }
        }
    }
}

}  // namespace

void token_copies(ConstMatrixMap<std::int32_t> physical, std::span<const std::int32_t> source_rank,
                  int num_physical_experts, int ep_size, int num_nodes, DeepEPMode mode,
                  MatrixMap<std::int64_t> out, std::span<std::int64_t> slot_tokens) {
    MOELB_CHECK_ARG(
        num_nodes >= 1 && ep_size >= 1 && ep_size % num_nodes == 0,
        "ep_size=" << ep_size << " must be a positive multiple of num_nodes=" << num_nodes);
    MOELB_CHECK_ARG(
        num_physical_experts >= 1 && num_physical_experts % ep_size == 0,
        "num_physical_experts=" << num_physical_experts
                                << " is not a positive multiple of ep_size=" << ep_size);
    const Index T = physical.rows();
    MOELB_CHECK_ARG(
        static_cast<Index>(source_rank.size()) == T,
        "source_rank has " << source_rank.size() << " entries for " << T << " rows of physical");
    MOELB_CHECK_ARG(
        out.rows() == 4 && out.cols() == ep_size,
        "out must be [4, " << ep_size << "], got [" << out.rows() << ", " << out.cols() << "]");
    MOELB_CHECK_ARG(
        slot_tokens.empty() || static_cast<int>(slot_tokens.size()) == num_physical_experts,
        "slot_tokens has " << slot_tokens.size() << " entries, expected " << num_physical_experts);
    const Topology top{num_physical_experts, ep_size, num_nodes, num_physical_experts / ep_size,
                       ep_size / num_nodes};
    const Index chunks = (T + kTokenGrain - 1) / kTokenGrain;
    const std::size_t width = static_cast<std::size_t>(4 * ep_size + num_physical_experts);
    std::vector<std::int64_t> partial(static_cast<std::size_t>(chunks) * width, 0);
    parallel_for(chunks, 1, [&](Index first, Index last) {
        for (Index k = first; k < last; ++k) {
            std::int64_t* base = partial.data() + static_cast<std::size_t>(k) * width;
            count_chunk(physical, source_rank, top, mode, k * kTokenGrain,
                        std::min(T, (k + 1) * kTokenGrain), base, base + 4 * ep_size);
        }
    });
    out.setZero();
    std::fill(slot_tokens.begin(), slot_tokens.end(), 0);
    for (Index k = 0; k < chunks; ++k) {
        const std::int64_t* base = partial.data() + static_cast<std::size_t>(k) * width;
        for (int r = 0; r < 4; ++r) {
            for (int g = 0; g < ep_size; ++g) out(r, g) += base[r * ep_size + g];
        }
        for (std::size_t p = 0; p < slot_tokens.size(); ++p)
            slot_tokens[p] += base[4 * ep_size + p];
    }
}

}  // namespace moelb
