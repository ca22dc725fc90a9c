// balanced_split (ours; DESIGN section 9, reference/dispatch.md section 7; moelb/dispatch.hpp):
// the tokens per physical slot when a step's global counts are split over the replicas at the
// optimal largest rank load ceil(T*). Its steps: check the inputs (balanced_checks.cpp) -> per
// layer, in parallel, the makespan flow (makespan_flow.cpp) -> the flow's tokens per rank onto the
// rank's slots. With SplitShares::kEven, the even shares (even_shares.cpp) choose among the
// optimal splits.
//
// DESIGN: an expert with one slot takes its count there, one with all its replicas on one rank
// spreads its count over them, and a flow expert's flow on each of its ranks is spread over that
// rank's replicas -- evenly, lower slots first -- so the slots realise the flow's rank loads
// exactly. Every layer is independent, so the layers run in parallel, each thread reusing one
// MakespanFlow's buffers; the result does not depend on the thread count.
#include <algorithm>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "balanced_flow.hpp"
#include "enum_names.hpp"
#include "moelb/dispatch.hpp"
#include "moelb/errors.hpp"
#include "moelb/parallel.hpp"

namespace moelb {
namespace {

using detail::MakespanFlow;

void check_split_shapes(const ExpertLocation& location, const detail::Shape& shape,
                        ConstMatrixMap<std::int64_t> counts, MatrixMap<std::int64_t> out) {
    const int E = location.num_logical_experts(), P = location.num_physical_experts();
    if (shape.one_layer) {
        MOELB_CHECK_ARG(counts.rows() == 1 && counts.cols() == E,
                        "counts has " << counts.size() << " entries but the location has " << E
                                      << " logical experts");
        MOELB_CHECK_ARG(out.rows() == 1 && out.cols() == P,
                        "out has " << out.size() << " entries but num_physical_experts=" << P);
    } else {
        MOELB_CHECK_ARG(counts.rows() == shape.layers && counts.cols() == E,
                        "counts has shape (" << counts.rows() << ", " << counts.cols()
                                             << ") but the location has " << shape.layers
                                             << " layers and " << E << " logical experts");
        MOELB_CHECK_ARG(out.rows() == shape.layers && out.cols() == P,
                        "out has shape (" << out.rows() << ", " << out.cols() << ") but ("
                                          << shape.layers << ", " << P << ") is needed");
    }
}

// The slots of `layer` [P] from its solved flow, the tokens of each of the flow's edges and its
// counts [E].
void flow_to_slots(const ExpertLocation& location, int layer, const MakespanFlow& flow,
                   const std::int64_t* edge_flows, const std::int64_t* c, std::int64_t* o) {
    const int E = location.num_logical_experts();
    // Experts with one slot take their count there; the others below.
    detail::fill_single_slots(location, layer, c, o);
    const std::int32_t* copies = location.logical_count().data() + detail::row_slot(layer, E);
    const std::vector<int>& rank_of = flow.rank_of();
    // Tokens of a rank's copies of one expert: split evenly, lower slots first.
    auto spread = [&](std::span<const std::int32_t> slots, std::int64_t tokens) {
        const auto k = static_cast<std::int64_t>(slots.size());
        for (std::int64_t j = 0; j < k; ++j) o[slots[j]] = detail::even_share(tokens, k, j);
    };
    int next_flow = 0;
    for (int e = 0; e < E; ++e) {
        if (c[e] == 0 || copies[e] == 1) continue;
        const auto reps = location.replicas(layer, e);
        if (flow.expert_rank(e) >= 0) {
            spread(reps, c[e]);
            continue;
        }
        MOELB_CHECK(next_flow < flow.num_flow_experts() && flow.expert_id(next_flow) == e,
                    "balanced_split: flow experts out of order");
        // One edge per distinct rank, in the replicas' (ascending) order.
        int id = flow.edge_begin(next_flow++);
        for (std::size_t j = 0; j < reps.size();) {
            const std::size_t j_end = detail::same_rank_end(reps, j, rank_of);
            spread(reps.subspan(j, j_end - j), edge_flows[id++]);
            j = j_end;
        }
    }
}

constexpr detail::EnumNames<SplitShares, 2> kSharesNames{{
    {"any", SplitShares::kAny},
    {"even", SplitShares::kEven},
}};

}  // namespace

SplitShares parse_split_shares(std::string_view name, std::string_view param) {
    return detail::parse_enum(kSharesNames, name, param, "a choice of optimal split");
}

std::string_view to_string(SplitShares shares) { return detail::enum_name(kSharesNames, shares); }

void balanced_split(const ExpertLocation& location, ConstMatrixMap<std::int64_t> counts,
                    ConstMatrixMap<std::int64_t> fixed_loads, MatrixMap<std::int64_t> out,
                    int layer, SplitShares shares) {
    const detail::Shape shape = detail::check_layers(location, layer);
    check_split_shapes(location, shape, counts, out);
    detail::check_fixed_loads(location, shape, fixed_loads);
    detail::check_counts(shape, counts, 1, {"counts", shape.one_layer}, fixed_loads);
    const int E = location.num_logical_experts(), P = location.num_physical_experts();
    const int grain = std::max(1, 4096 / std::max(P, 1));
    parallel_for(shape.layers, grain, [&](Index begin, Index end) {
        thread_local MakespanFlow flow;
        thread_local detail::EvenShares even;
        thread_local std::vector<std::int64_t> edge_flows;
        for (Index row = begin; row < end; ++row) {
            const int l = shape.first + static_cast<int>(row);
            const std::int64_t* c = counts.data() + row * E;
            flow.build(location, l, c, detail::fixed_row(fixed_loads, row));
            const std::int64_t makespan = flow.solve();
            const std::int64_t* tokens = nullptr;
            if (shares == SplitShares::kEven) {
                even.solve(location, l, flow, makespan, c);
                tokens = even.edge_flows();
            } else {
                const int num_edges = flow.edge_begin(flow.num_flow_experts());
                edge_flows.resize(static_cast<std::size_t>(num_edges));
                for (int id = 0; id < num_edges; ++id) edge_flows[id] = flow.edge_flow(id);
                tokens = edge_flows.data();
            }
            flow_to_slots(location, l, flow, tokens, c, out.data() + row * P);
        }
    });
}

}  // namespace moelb
