// The expert distribution recorder (recorder.hpp; DESIGN section 3, reference/recorder.md
// sections 5-7, 9, 14, 15).
//
// The main check is a table-driven property test: random placements with redundant slots, random
// ids with -1 padding, several passes and layers, ring-buffer wrap-around, relocation between
// passes and the merge of two ranks, all compared with histograms counted here independently.
// Then: the regression cases of SGLang's recorder failures (hooks outside scopes, nested scopes,
// layers and ids out of range; each an error that counts nothing anywhere), the DeepEP dispatch
// counts of reference section 5.3, modes, recording state, balancedness, merge and threads.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "moelb/errors.hpp"
#include "moelb/expert_location.hpp"
#include "moelb/recorder.hpp"
#include "test_util.hpp"

namespace {

using namespace moelb::test_util;

using moelb::ExpertDistributionRecorder;
using moelb::ExpertLocation;
using moelb::Index;
using moelb::InvalidArgument;
using moelb::RecorderMode;
using moelb::RowMatrix;

using Recorder = ExpertDistributionRecorder;
using PassScope = ExpertDistributionRecorder::ForwardPassScope;
using LayerScope = ExpertDistributionRecorder::LayerScope;
using Ids = RowMatrix<std::int32_t>;
using Counts = std::vector<std::int32_t>;

constexpr double kEps = 1e-5;  // the balancedness epsilon of reference section 7.2
const double kNaN = std::numeric_limits<double>::quiet_NaN();

// ------------------------------------------------------------------------------------------------
// Helpers

// A random placement: every expert gets one slot, the other slots random experts, then the slots
// of each layer are shuffled.
Ids random_layout(int L, int E, int P, Rng& rng) {
    Ids map(L, P);
    for (int l = 0; l < L; ++l) {
        std::vector<std::int32_t> row(static_cast<std::size_t>(P));
        for (int p = 0; p < P; ++p) row[p] = p < E ? p : static_cast<std::int32_t>(rng.below(E));
        for (int p = P - 1; p > 0; --p) std::swap(row[p], row[rng.below(p + 1)]);
        for (int p = 0; p < P; ++p) map(l, p) = row[p];
    }
    return map;
}

// [T, K] ids in [-1, P), about a third of them -1.
Ids random_ids(int T, int K, int P, Rng& rng) {
    Ids ids(T, K);
    for (int t = 0; t < T; ++t) {
        for (int k = 0; k < K; ++k) {
            ids(t, k) = rng.below(3) == 0 ? -1 : static_cast<std::int32_t>(rng.below(P));
        }
    }
    return ids;
}

std::vector<std::int32_t> flat(const Ids& ids) { return {ids.data(), ids.data() + ids.size()}; }

// Adds the per-slot histogram of the non-(-1) ids into row `layer` of counts [L, P].
void add_histogram(Counts& counts, int P, int layer, const Ids& ids) {
    for (Index i = 0; i < ids.size(); ++i) {
        if (ids.data()[i] != -1) ++counts[static_cast<std::size_t>(layer) * P + ids.data()[i]];
    }
}

Counts histogram(int L, int P, int layer, const Ids& ids) {
    Counts counts(static_cast<std::size_t>(L) * P, 0);
    add_histogram(counts, P, layer, ids);
    return counts;
}

Counts zeros(int L, int P) { return Counts(static_cast<std::size_t>(L) * P, 0); }

// One complete pass: `ids` offered to `layer` (RAII scopes).
void record(Recorder& r, int layer, const Ids& ids) {
    PassScope pass(r);
    LayerScope scope(r, layer);
    r.on_select_experts(cmap(ids));
}

// The balancedness of one layer from its per-GPU counts (reference section 7.2), written plainly.
double rate(const std::vector<double>& gpu) {
    double sum = 0.0, max = 0.0;
    for (double g : gpu) {
        sum += g;
        max = std::max(max, g);
    }
    return (sum / static_cast<double>(gpu.size()) + kEps) / (max + kEps);
}

// ------------------------------------------------------------------------------------------------
// Count conservation, ring buffer, per-pass placements and merge: a property test over random
// placements and batches, compared with histograms counted here.

struct ConservationCase {
    std::string name;
    int L, E, P, W, K;
    int num_passes;
    Index buffer_size;
    RecorderMode mode;
    bool relocate;  // a new random placement every third pass
    std::uint32_t seed;
};

// What one pass offered to one recorder, counted independently.
struct Offered {
    Counts counts;                               // [L, P]
    std::vector<Index> valid;                    // [L]: non-(-1) ids offered to each layer
    std::vector<std::vector<std::int32_t>> ids;  // per layer, every call's ids appended
    std::vector<int> top_k;                      // per layer, 0 = no call
};

// Offers 0 to 3 random batches (1 to 5 tokens) to every layer of one pass, through the RAII scopes
// or the begin/end calls.
Offered offer_random_pass(Recorder& r, int K, Rng& rng, bool use_scopes) {
    const int L = r.num_layers(), P = r.num_physical_experts();
    Offered o{zeros(L, P), std::vector<Index>(L, 0), std::vector<std::vector<std::int32_t>>(L),
              std::vector<int>(L, 0)};
    auto layer_body = [&](int l) {
        const int calls = static_cast<int>(rng.below(4));
        for (int c = 0; c < calls; ++c) {
            const Ids ids = random_ids(1 + static_cast<int>(rng.below(5)), K, P, rng);
            r.on_select_experts(cmap(ids), c == 0 ? std::optional<int>(l) : std::nullopt);
            add_histogram(o.counts, P, l, ids);
            for (Index i = 0; i < ids.size(); ++i) o.valid[l] += ids.data()[i] != -1;
            o.ids[l].insert(o.ids[l].end(), ids.data(), ids.data() + ids.size());
            o.top_k[l] = K;
        }
    };
    if (use_scopes) {
        PassScope pass(r);
        for (int l = 0; l < L; ++l) {
            LayerScope layer(r, l);
            layer_body(l);
        }
    } else {
        r.begin_forward_pass();
        for (int l = 0; l < L; ++l) {
            r.begin_layer(l);
            layer_body(l);
            r.end_layer();
        }
        r.end_forward_pass();
    }
    return o;
}

// [L, E] logical counts of one pass, converted with `map` [L, P].
Counts to_logical(const Counts& counts, const Ids& map, int E) {
    const int L = static_cast<int>(map.rows()), P = static_cast<int>(map.cols());
    Counts out(static_cast<std::size_t>(L) * E, 0);
    for (int l = 0; l < L; ++l) {
        for (int p = 0; p < P; ++p) {
            out[static_cast<std::size_t>(l) * E + map(l, p)] +=
                counts[static_cast<std::size_t>(l) * P + p];
        }
    }
    return out;
}

class RecorderConservation : public ::testing::TestWithParam<ConservationCase> {};

TEST_P(RecorderConservation, CountsConservedAcrossWrapAroundRelocationAndMerge) {
    const ConservationCase& c = GetParam();
    Rng rng(c.seed);
    Ids map = random_layout(c.L, c.E, c.P, rng);
    Recorder r0(ExpertLocation(map, c.E, c.W), c.mode, c.buffer_size, 0);
    Recorder r1(ExpertLocation(map, c.E, c.W), c.mode, c.buffer_size, c.W - 1);
    r0.start();
    r1.start();

    std::vector<Offered> offered0, offered1;
    std::vector<Ids> maps;  // the placement current when each pass was recorded
    for (int t = 0; t < c.num_passes; ++t) {
        if (c.relocate && t % 3 == 2) {
            map = random_layout(c.L, c.E, c.P, rng);
            r0.set_location(ExpertLocation(map, c.E, c.W));
            r1.set_location(ExpertLocation(map, c.E, c.W));
        }
        maps.push_back(map);
        offered0.push_back(offer_random_pass(r0, c.K, rng, /*use_scopes=*/true));
        offered1.push_back(offer_random_pass(r1, c.K, rng, /*use_scopes=*/false));
    }

    const int kept = c.buffer_size < 0
                         ? c.num_passes
                         : static_cast<int>(std::min<Index>(c.num_passes, c.buffer_size));
    const int first = c.num_passes - kept;  // the oldest pass still in the window
    ASSERT_EQ(r0.num_passes(), kept);
    ASSERT_EQ(r1.num_passes(), kept);
    const std::vector<Recorder::Pass> passes = r0.passes();
    ASSERT_EQ(static_cast<int>(passes.size()), kept);

    // Every kept pass, in time order, with its id, placement and exact per-slot counts; the sum of
    // each layer's counts is the number of non-(-1) ids offered to that layer in that pass.
    for (int i = 0; i < kept; ++i) {
        const int t = first + i;
        const Recorder::Pass& pass = passes[i];
        EXPECT_EQ(pass.forward_pass_id, t);
        ASSERT_NE(pass.location, nullptr);
        EXPECT_EQ(pass.location->physical_to_logical(), maps[t]) << "pass " << t;
        EXPECT_EQ(pass.counts, offered0[t].counts) << "pass " << t;
        for (int l = 0; l < c.L; ++l) {
            Index sum = 0;
            for (int p = 0; p < c.P; ++p) sum += pass.counts[static_cast<std::size_t>(l) * c.P + p];
            EXPECT_EQ(sum, offered0[t].valid[l]) << "pass " << t << " layer " << l;
        }
        if (c.mode == RecorderMode::kPerToken) {
            EXPECT_EQ(pass.token_ids, offered0[t].ids) << "pass " << t;
            EXPECT_EQ(pass.token_top_k, offered0[t].top_k) << "pass " << t;
        } else {
            EXPECT_TRUE(pass.token_ids.empty());
            EXPECT_TRUE(pass.token_top_k.empty());
        }
    }

    // logical_count(): [T, L, E], each pass converted with its own placement.
    const Counts logical = r0.logical_count();
    ASSERT_EQ(logical.size(), static_cast<std::size_t>(kept) * c.L * c.E);
    for (int i = 0; i < kept; ++i) {
        const int t = first + i;
        const Counts expected = to_logical(offered0[t].counts, maps[t], c.E);
        const Counts got(logical.begin() + static_cast<std::ptrdiff_t>(i) * c.L * c.E,
                         logical.begin() + static_cast<std::ptrdiff_t>(i + 1) * c.L * c.E);
        EXPECT_EQ(got, expected) << "pass " << t;
    }

    // Merge: the counts add exactly, pass by pass; the other recorder is unchanged.
    r0.merge(r1);
    const std::vector<Recorder::Pass> merged = r0.passes();
    const std::vector<Recorder::Pass> other = r1.passes();
    ASSERT_EQ(static_cast<int>(merged.size()), kept);
    for (int i = 0; i < kept; ++i) {
        const int t = first + i;
        Counts sum = offered0[t].counts;
        for (std::size_t j = 0; j < sum.size(); ++j) sum[j] += offered1[t].counts[j];
        EXPECT_EQ(merged[i].counts, sum) << "pass " << t;
        EXPECT_EQ(merged[i].forward_pass_id, t);
        EXPECT_EQ(other[i].counts, offered1[t].counts) << "pass " << t;
        if (c.mode == RecorderMode::kPerToken) {
            for (int l = 0; l < c.L; ++l) {
                std::vector<std::int32_t> ids = offered0[t].ids[l];
                ids.insert(ids.end(), offered1[t].ids[l].begin(), offered1[t].ids[l].end());
                EXPECT_EQ(merged[i].token_ids[l], ids) << "pass " << t << " layer " << l;
                EXPECT_EQ(merged[i].token_top_k[l],
                          std::max(offered0[t].top_k[l], offered1[t].top_k[l]));
            }
        }
    }
    const Counts merged_logical = r0.logical_count();
    const Counts logical1 = r1.logical_count();
    ASSERT_EQ(merged_logical.size(), logical.size());
    ASSERT_EQ(logical1.size(), logical.size());
    for (std::size_t j = 0; j < logical.size(); ++j) {
        ASSERT_EQ(merged_logical[j], logical[j] + logical1[j]) << "entry " << j;
    }
}

INSTANTIATE_TEST_SUITE_P(
    Cases, RecorderConservation,
    ::testing::ValuesIn(std::vector<ConservationCase>{
        {"stat_unbounded_relocated", 3, 6, 8, 2, 2, 6, -1, RecorderMode::kStat, true, 1},
        {"stat_wraps_relocated", 2, 12, 16, 4, 4, 9, 4, RecorderMode::kStat, true, 2},
        {"stat_buffer_of_one", 4, 5, 10, 5, 3, 5, 1, RecorderMode::kStat, false, 3},
        {"stat_buffer_larger_than_passes", 2, 4, 4, 1, 1, 3, 10, RecorderMode::kStat, false, 4},
        {"per_pass_wraps_relocated", 3, 6, 9, 3, 2, 11, 5, RecorderMode::kPerPass, true, 5},
        {"per_token_wraps_relocated", 2, 8, 12, 4, 6, 7, 3, RecorderMode::kPerToken, true, 6},
        {"per_token_exact_fit", 3, 4, 6, 2, 2, 5, 5, RecorderMode::kPerToken, false, 7},
        {"many_layers_top8", 8, 16, 20, 4, 8, 4, 2, RecorderMode::kStat, true, 8},
    }),
    [](const ::testing::TestParamInfo<ConservationCase>& info) { return info.param.name; });

// ------------------------------------------------------------------------------------------------
// logical_count(): each pass converted with the placement current when it was recorded.

TEST(RecorderLogicalCount, EachPassUsesItsOwnPlacement) {
    // L=2, E=4, P=6, W=2 (S=3).
    const Ids map_a = matrix<std::int32_t>({{0, 1, 2, 3, 0, 1}, {3, 2, 1, 0, 3, 2}});
    const Ids map_b = matrix<std::int32_t>({{1, 0, 3, 2, 1, 0}, {0, 1, 2, 3, 1, 0}});
    const Ids layer0 = matrix<std::int32_t>({{0, 4}, {5, -1}});  // slots 0, 4, 5
    const Ids layer1 = matrix<std::int32_t>({{2, 3}});           // slots 2, 3
    Recorder r(ExpertLocation(map_a, 4, 2));
    r.start();
    for (int t = 0; t < 2; ++t) {
        if (t == 1) r.set_location(ExpertLocation(map_b, 4, 2));
        PassScope pass(r);
        {
            LayerScope l(r, 0);
            r.on_select_experts(cmap(layer0));
        }
        LayerScope l(r, 1);
        r.on_select_experts(cmap(layer1));
    }
    // Pass 0 (map A): layer 0 slots 0,4,5 -> experts 0,0,1; layer 1 slots 2,3 -> experts 1,0.
    // Pass 1 (map B): layer 0 slots 0,4,5 -> experts 1,1,0; layer 1 slots 2,3 -> experts 2,3.
    const Counts expected = {2, 1, 0, 0, /**/ 1, 1, 0, 0,   // pass 0: [L=2, E=4]
                             1, 2, 0, 0, /**/ 0, 0, 1, 1};  // pass 1
    EXPECT_EQ(r.logical_count(), expected);
    EXPECT_EQ(r.passes()[0].location->physical_to_logical(), map_a);
    EXPECT_EQ(r.passes()[1].location->physical_to_logical(), map_b);
    EXPECT_EQ(r.location()->physical_to_logical(), map_b);
    // The physical counts are the same in both passes.
    EXPECT_EQ(r.passes()[0].counts, r.passes()[1].counts);
}

TEST(RecorderLogicalCount, EmptyRecorderGivesNoRows) {
    Recorder r(ExpertLocation::trivial(2, 4, 6, 2));
    EXPECT_TRUE(r.logical_count().empty());
    r.start();
    { PassScope pass(r); }  // an idle pass is still a row (of zeros)
    EXPECT_EQ(r.logical_count(), Counts(2 * 4, 0));
}

TEST(RecorderLocation, SetLocationRejectsADifferentShape) {
    Recorder r(ExpertLocation::trivial(2, 4, 6, 2));
    expect_invalid_argument([&] { r.set_location(ExpertLocation::trivial(3, 4, 6, 2)); },
                            "num_layers=3");
    expect_invalid_argument([&] { r.set_location(ExpertLocation::trivial(2, 4, 8, 2)); },
                            "num_physical_experts=8");
    expect_invalid_argument([&] { r.set_location(ExpertLocation::trivial(2, 4, 6, 3)); },
                            "ep_size=3");
    EXPECT_EQ(*r.location(), ExpertLocation::trivial(2, 4, 6, 2));
}

TEST(RecorderLocation, SetLocationRejectsADifferentNumberOfLogicalExperts) {
    // logical_count() is [T, L, E] with one E, so a placement with another E must be refused.
    Recorder r(ExpertLocation::trivial(1, 4, 4, 2));
    expect_invalid_argument([&] { r.set_location(ExpertLocation::trivial(1, 2, 4, 2)); },
                            "num_logical_experts");
    EXPECT_EQ(r.location()->num_logical_experts(), 4);
}

TEST(RecorderLocation, CheckIdSpaceAcceptsOnlyTheRecordersSlots) {
    // Redundant slots: logical ids (no location) are not slots; an equal placement is accepted,
    // another one (or another ep_size) is not.
    Ids map(2, 6);
    map << 3, 0, 1, 2, 0, 1,  //
        0, 1, 2, 3, 3, 2;
    const ExpertLocation mine(map, 4, 2);
    Recorder r(mine);
    EXPECT_NO_THROW(r.check_id_space(&mine, 4));
    const ExpertLocation copy(map, 4, 2);
    EXPECT_NO_THROW(r.check_id_space(&copy, 4));
    expect_invalid_argument([&] { r.check_id_space(nullptr, 4); }, "location=None");
    const ExpertLocation trivial = ExpertLocation::trivial(2, 4, 6, 2);
    expect_invalid_argument([&] { r.check_id_space(&trivial, 4); }, "another placement");
    const ExpertLocation other_ranks(map, 4, 3);
    expect_invalid_argument([&] { r.check_id_space(&other_ranks, 4); }, "ep_size=3");
    r.set_location(trivial);
    EXPECT_NO_THROW(r.check_id_space(&trivial, 4));
    expect_invalid_argument([&] { r.check_id_space(&mine, 4); }, "location is the placement");

    // The identity layout (a recorder of a shape (L, P)): logical ids of P experts are slots.
    Recorder identity(ExpertLocation::trivial(2, 4, 4, 2));
    EXPECT_NO_THROW(identity.check_id_space(nullptr, 4));
    expect_invalid_argument([&] { identity.check_id_space(nullptr, 3); }, "3 experts");
    Ids swapped(2, 4);
    swapped << 1, 0, 2, 3,  //
        0, 1, 2, 3;
    identity.set_location(ExpertLocation(swapped, 4, 2));
    expect_invalid_argument([&] { identity.check_id_space(nullptr, 4); },
                            "slot p does not hold expert p");
}

// ------------------------------------------------------------------------------------------------
// Regression cases for SGLang's failures (reference sections 9 and 15): every misuse is an
// InvalidArgument naming the problem and counts nothing anywhere.

enum class State { kNoPass, kInPass, kInLayer };

struct MisuseCase {
    std::string name;
    State state;  // where the call is made: after pass 1, inside pass 1, inside its layer(1)
    std::function<void(Recorder&)> call;
    std::string needle;
};

// L=3, E=4, P=8, W=2 (S=4). Pass 0 gets kFirst on layer 0, pass 1 gets kSecond on layer 1, then
// the bad call is made; per_token mode, so token ids are checked too.
const Ids kFirst = matrix<std::int32_t>({{0, 5}, {7, -1}});
const Ids kSecond = matrix<std::int32_t>({{2, 2}, {-1, 6}, {1, 3}});

std::vector<MisuseCase> misuse_cases() {
    auto select = [](Ids ids, std::optional<int> expected_layer = std::nullopt) {
        return
            [ids, expected_layer](Recorder& r) { r.on_select_experts(cmap(ids), expected_layer); };
    };
    auto dispatch = [](std::vector<std::int64_t> counts, int rank, int trailing = 0) {
        return
            [counts, rank, trailing](Recorder& r) { r.on_dispatch_counts(counts, rank, trailing); };
    };
    const Ids good = matrix<std::int32_t>({{1, 2}, {3, 4}});
    // Valid rows first, the bad id in the last row: none of the earlier rows may be counted.
    const Ids bad_p = matrix<std::int32_t>({{1, 2}, {3, 4}, {5, 8}});
    const Ids bad_minus2 = matrix<std::int32_t>({{1, 2}, {3, 4}, {-2, 0}});
    constexpr std::int32_t kMax = std::numeric_limits<std::int32_t>::max();
    constexpr std::int32_t kMin = std::numeric_limits<std::int32_t>::min();
    const Ids bad_max = matrix<std::int32_t>({{1, 2}, {kMax, 0}});
    const Ids bad_min = matrix<std::int32_t>({{kMin, 2}});
    const Ids three_columns = matrix<std::int32_t>({{1, 2, 3}});
    constexpr std::int64_t kTooMany = std::int64_t{1} << 31;
    using S = State;
    return {
        // Hooks outside the scopes (SGLang: layer_idx=None broadcast / crash / row 0).
        {"select_outside_layer_scope", S::kInPass, select(good), "outside a layer() scope"},
        {"select_outside_pass_scope", S::kNoPass, select(good), "outside a forward_pass() scope"},
        {"dispatch_outside_layer_scope", S::kInPass, dispatch({1, 1, 1, 1}, 0),
         "outside a layer() scope"},
        {"dispatch_outside_pass_scope", S::kNoPass, dispatch({1, 1, 1, 1}, 0),
         "outside a forward_pass() scope"},
        // Scopes.
        {"nested_layer_scopes", S::kInLayer, [](Recorder& r) { r.begin_layer(2); },
         "layer() scopes cannot be nested"},
        {"nested_same_layer", S::kInLayer, [](Recorder& r) { r.begin_layer(1); },
         "layer() scopes cannot be nested"},
        {"nested_pass_scopes", S::kInPass, [](Recorder& r) { r.begin_forward_pass(); },
         "forward_pass() scopes cannot be nested"},
        {"nested_pass_in_layer", S::kInLayer, [](Recorder& r) { r.begin_forward_pass(7); },
         "forward_pass() scopes cannot be nested"},
        {"nested_pass_scope_object", S::kInPass, [](Recorder& r) { PassScope inner(r); },
         "forward_pass() scopes cannot be nested"},
        {"layer_out_of_range", S::kInPass, [](Recorder& r) { r.begin_layer(3); },
         "layer=3 is outside [0, num_layers=3)"},
        {"layer_negative", S::kInPass, [](Recorder& r) { r.begin_layer(-1); }, "layer=-1"},
        {"layer_scope_object_out_of_range", S::kInPass, [](Recorder& r) { LayerScope l(r, 9); },
         "layer=9"},
        {"layer_outside_pass", S::kNoPass, [](Recorder& r) { r.begin_layer(0); },
         "outside a forward_pass() scope"},
        {"end_layer_not_open", S::kInPass, [](Recorder& r) { r.end_layer(); },
         "layer() scope that is not open"},
        {"end_pass_not_open", S::kNoPass, [](Recorder& r) { r.end_forward_pass(); },
         "forward_pass() scope that is not open"},
        {"end_pass_inside_layer", S::kInLayer, [](Recorder& r) { r.end_forward_pass(); },
         "inside the layer(1) scope"},
        {"start_inside_layer", S::kInLayer, [](Recorder& r) { r.start(); },
         "start() inside the layer(1) scope"},
        {"stop_inside_layer", S::kInLayer, [](Recorder& r) { r.stop(); },
         "stop() inside the layer(1) scope"},
        // Ids out of range.
        {"id_equal_to_num_physical_experts", S::kInLayer, select(bad_p),
         "topk_ids[2, 1] = 8 is outside [-1, num_physical_experts=8)"},
        {"id_below_minus_one", S::kInLayer, select(bad_minus2), "topk_ids[2, 0] = -2"},
        {"id_int32_max", S::kInLayer, select(bad_max), "topk_ids[1, 0] = 2147483647"},
        {"id_int32_min", S::kInLayer, select(bad_min), "topk_ids[0, 0] = -2147483648"},
        // The layer guard.
        {"expected_layer_differs", S::kInLayer, select(good, 0),
         "layer=0 but the recorder's current scope is layer(1)"},
        {"expected_layer_out_of_range", S::kInLayer, select(good, 5), "layer=5"},
        // per_token: another top_k for the same layer within a pass.
        {"per_token_other_top_k", S::kInLayer, select(three_columns),
         "topk_ids has 3 columns but layer 1 was given 2"},
        // on_dispatch_counts (reference section 5.3).
        {"dispatch_too_long", S::kInLayer, dispatch({1, 2, 3, 4, 5}, 0),
         "local_counts has 5 entries; expected 4"},
        {"dispatch_too_short", S::kInLayer, dispatch({1, 2, 3}, 1), "local_counts has 3 entries"},
        {"dispatch_too_long_after_trailing", S::kInLayer, dispatch({1, 2, 3, 4, 5, 6}, 0, 1),
         "local_counts has 6 entries"},
        {"dispatch_trailing_negative", S::kInLayer, dispatch({1, 2, 3, 4}, 0, -1),
         "num_trailing_shared_slots=-1 is outside [0, len(local_counts)=4]"},
        {"dispatch_trailing_beyond_length", S::kInLayer, dispatch({1, 2, 3, 4}, 0, 5),
         "num_trailing_shared_slots=5"},
        {"dispatch_negative_count", S::kInLayer, dispatch({1, -1, 0, 0}, 0),
         "local_counts[1] = -1"},
        {"dispatch_negative_last_count", S::kInLayer, dispatch({5, 5, 5, -3}, 1),
         "local_counts[3] = -3"},
        {"dispatch_count_beyond_int32", S::kInLayer, dispatch({kTooMany, 0, 0, 0}, 0),
         "local_counts[0]"},
        {"dispatch_rank_out_of_range", S::kInLayer, dispatch({1, 1, 1, 1}, 2),
         "ep_rank=2 is outside [0, ep_size=2)"},
        {"dispatch_rank_negative", S::kInLayer, dispatch({1, 1, 1, 1}, -1), "ep_rank=-1"},
    };
}

class RecorderMisuse : public ::testing::TestWithParam<MisuseCase> {};

TEST_P(RecorderMisuse, ThrowsNamingTheProblemAndCountsNothing) {
    const MisuseCase& c = GetParam();
    const int L = 3, P = 8;
    Recorder r(ExpertLocation::trivial(L, 4, P, 2), RecorderMode::kPerToken);
    r.start();
    record(r, 0, kFirst);
    r.begin_forward_pass();
    r.begin_layer(1);
    r.on_select_experts(cmap(kSecond));
    if (c.state != State::kInLayer) r.end_layer();
    if (c.state == State::kNoPass) r.end_forward_pass();

    expect_invalid_argument([&] { c.call(r); }, c.needle);

    // The scopes the setup opened are still open, and nothing else is.
    EXPECT_TRUE(r.recording());
    EXPECT_EQ(r.current_layer(), c.state == State::kInLayer ? std::optional<int>(1) : std::nullopt);
    if (c.state == State::kInLayer) {
        ASSERT_NO_THROW(r.end_layer());
    }
    if (c.state != State::kNoPass) {
        ASSERT_NO_THROW(r.end_forward_pass());
    }

    // Nothing counted anywhere: every layer of both passes holds exactly what the setup offered.
    const std::vector<Recorder::Pass> passes = r.passes();
    ASSERT_EQ(passes.size(), 2u);
    EXPECT_EQ(passes[0].forward_pass_id, 0);
    EXPECT_EQ(passes[1].forward_pass_id, 1);
    EXPECT_EQ(passes[0].counts, histogram(L, P, 0, kFirst));
    EXPECT_EQ(passes[1].counts, histogram(L, P, 1, kSecond));
    const std::vector<std::vector<std::int32_t>> ids0 = {flat(kFirst), {}, {}};
    const std::vector<std::vector<std::int32_t>> ids1 = {{}, flat(kSecond), {}};
    EXPECT_EQ(passes[0].token_ids, ids0);
    EXPECT_EQ(passes[1].token_ids, ids1);
    EXPECT_EQ(passes[1].token_top_k, (std::vector<int>{0, 2, 0}));

    // The recorder still works, and the failed call did not consume a pass id.
    const Ids next = matrix<std::int32_t>({{4, -1}});
    record(r, 2, next);
    ASSERT_EQ(r.num_passes(), 3);
    EXPECT_EQ(r.passes()[2].forward_pass_id, 2);
    EXPECT_EQ(r.passes()[2].counts, histogram(L, P, 2, next));
}

INSTANTIATE_TEST_SUITE_P(Cases, RecorderMisuse, ::testing::ValuesIn(misuse_cases()),
                         [](const ::testing::TestParamInfo<MisuseCase>& info) {
                             return info.param.name;
                         });

TEST(RecorderMisuse, HookOutsideLayerInsidePassScopeAbandonsThePass) {
    // In C++ the error propagates out of the RAII scopes: the pass is abandoned, not appended.
    Recorder r(ExpertLocation::trivial(2, 4, 4, 2));
    r.start();
    EXPECT_THROW(
        {
            PassScope pass(r);
            {
                LayerScope layer(r, 0);
                r.on_select_experts(cmap(matrix<std::int32_t>({{0, 3}})));
            }
            r.on_select_experts(cmap(matrix<std::int32_t>({{1, 2}})));
        },
        InvalidArgument);
    EXPECT_EQ(r.num_passes(), 0);
    EXPECT_EQ(r.current_layer(), std::nullopt);
    EXPECT_TRUE(r.logical_count().empty());
}

// ------------------------------------------------------------------------------------------------
// on_dispatch_counts: the DeepEP low-latency counts of reference sections 5.3 and 5.5.

TEST(RecorderDispatchCounts, TrailingSharedSlotsDropped) {
    // [3, 5, 101, 103] with 2 trailing slots on S=2 -> [3, 5] in that rank's columns.
    for (int rank = 0; rank < 2; ++rank) {
        Recorder r(ExpertLocation::trivial(2, 4, 4, 2));
        r.start();
        {
            PassScope pass(r);
            LayerScope layer(r, 0);
            const std::vector<std::int64_t> counts = {3, 5, 101, 103};
            r.on_dispatch_counts(counts, rank, 2);
        }
        Counts expected = zeros(2, 4);
        expected[2 * rank] = 3;
        expected[2 * rank + 1] = 5;
        ASSERT_EQ(r.num_passes(), 1);
        EXPECT_EQ(r.passes()[0].counts, expected) << "rank " << rank;
    }
}

TEST(RecorderDispatchCounts, CallsAccumulateAndMixWithSelectExperts) {
    // reference 5.3: [1, 2, 99] and [3, 4, 99] with 1 trailing slot -> [4, 6].
    // reference 5.5 (L=2, P=4, S=2, rank 1): layer 0 select [[0, 3]], layer 1 dispatch [5, 7]
    // -> [[1, 0, 0, 1], [0, 0, 5, 7]].
    Recorder r(ExpertLocation::trivial(2, 4, 4, 2), RecorderMode::kStat, 10, 1);
    r.start();
    {
        PassScope pass(r);
        LayerScope layer(r, 1);
        const std::vector<std::int64_t> a = {1, 2, 99}, b = {3, 4, 99};
        r.on_dispatch_counts(a, 0, 1);
        r.on_dispatch_counts(b, 0, 1);
    }
    {
        PassScope pass(r);
        {
            LayerScope layer(r, 0);
            r.on_select_experts(cmap(matrix<std::int32_t>({{0, 3}})));
        }
        LayerScope layer(r, 1);
        const std::vector<std::int64_t> counts = {5, 7};
        r.on_dispatch_counts(counts, 1);
    }
    ASSERT_EQ(r.num_passes(), 2);
    EXPECT_EQ(r.passes()[0].counts, (Counts{0, 0, 0, 0, 4, 6, 0, 0}));
    EXPECT_EQ(r.passes()[1].counts, (Counts{1, 0, 0, 1, 0, 0, 5, 7}));
}

TEST(RecorderDispatchCounts, SelectExpertsExamplesFromReference) {
    // reference 5.5, extend pass: select([[0, 3], [3, -1]]) -> [[1, 0, 0, 2], [0, 0, 0, 0]];
    // reference 5.2 uses ids 4 and 9 on P=4, which are errors here (never silently dropped).
    Recorder r(ExpertLocation::trivial(2, 4, 4, 2));
    r.start();
    {
        PassScope pass(r);
        LayerScope layer(r, 0);
        r.on_select_experts(cmap(matrix<std::int32_t>({{0, 3}, {3, -1}})));
        expect_invalid_argument(
            [&] {
                r.on_select_experts(cmap(matrix<std::int32_t>({{-1, 0, 3, 4, 9}})));
            },
            "topk_ids[0, 3] = 4");
    }
    ASSERT_EQ(r.num_passes(), 1);
    EXPECT_EQ(r.passes()[0].counts, (Counts{1, 0, 0, 2, 0, 0, 0, 0}));
}

TEST(RecorderDispatchCounts, AccumulationBeyondInt32IsAnError) {
    Recorder r(ExpertLocation::trivial(1, 2, 2, 1));
    r.start();
    r.begin_forward_pass();
    r.begin_layer(0);
    const std::vector<std::int64_t> big = {std::numeric_limits<std::int32_t>::max(), 0};
    const std::vector<std::int64_t> one = {1, 0};
    r.on_dispatch_counts(big, 0);
    expect_invalid_argument([&] { r.on_dispatch_counts(one, 0); }, "local_counts");
    r.end_layer();
    r.end_forward_pass();
    EXPECT_EQ(r.passes()[0].counts, (Counts{std::numeric_limits<std::int32_t>::max(), 0}));
}

TEST(RecorderDispatchCounts, SelectExpertsAfterAFullSlotIsAnErrorThatCountsNothing) {
    // Found by the fuzzer (tests/python/test_fuzz.py): a dispatch of INT32_MAX tokens, then one
    // more token selected for the same slot, wrapped the count to -2**31.
    constexpr std::int32_t kMax = std::numeric_limits<std::int32_t>::max();
    Recorder r(ExpertLocation::trivial(1, 2, 2, 1));
    r.start();
    r.begin_forward_pass();
    r.begin_layer(0);
    r.on_dispatch_counts(std::vector<std::int64_t>{kMax - 1, 0}, 0);
    Ids twice(2, 2);  // slot 0 twice: one too many
    twice << 0, 1, 0, -1;
    expect_invalid_argument([&] { r.on_select_experts(cmap(twice)); }, "slot 0");
    Ids fits(1, 2);
    fits << 0, 1;
    r.on_select_experts(cmap(fits));
    r.end_layer();
    r.end_forward_pass();
    EXPECT_EQ(r.passes()[0].counts, (Counts{kMax, 1}));
}

// ------------------------------------------------------------------------------------------------
// Modes.

TEST(RecorderModes, ParseAndName) {
    EXPECT_EQ(moelb::parse_recorder_mode("stat"), RecorderMode::kStat);
    EXPECT_EQ(moelb::parse_recorder_mode("per_pass"), RecorderMode::kPerPass);
    EXPECT_EQ(moelb::parse_recorder_mode("per_token"), RecorderMode::kPerToken);
    for (RecorderMode m : {RecorderMode::kStat, RecorderMode::kPerPass, RecorderMode::kPerToken}) {
        EXPECT_EQ(moelb::parse_recorder_mode(moelb::to_string(m)), m);
    }
    expect_invalid_argument([] { moelb::parse_recorder_mode("stat_approx"); },
                            "mode='stat_approx'");
    expect_invalid_argument([] { moelb::parse_recorder_mode("", "recorder_mode"); },
                            "recorder_mode=''");
}

TEST(RecorderModes, PerTokenKeepsIdsPerLayer) {
    Recorder r(ExpertLocation::trivial(2, 4, 4, 2), RecorderMode::kPerToken);
    EXPECT_EQ(r.mode(), RecorderMode::kPerToken);
    r.start();
    {
        PassScope pass(r);
        LayerScope layer(r, 0);
        r.on_select_experts(cmap(matrix<std::int32_t>({{0, 1}, {2, -1}})));
        r.on_select_experts(cmap(matrix<std::int32_t>({{3, 3}})));
    }
    {
        // Another top_k on another layer, and on the same layer in the next pass, is fine.
        PassScope pass(r);
        {
            LayerScope layer(r, 1);
            r.on_select_experts(cmap(matrix<std::int32_t>({{0, 1, 2}})));
        }
        LayerScope layer(r, 0);
        r.on_select_experts(cmap(matrix<std::int32_t>({{-1}, {2}})));
    }
    const std::vector<Recorder::Pass> passes = r.passes();
    ASSERT_EQ(passes.size(), 2u);
    EXPECT_EQ(passes[0].token_ids,
              (std::vector<std::vector<std::int32_t>>{{0, 1, 2, -1, 3, 3}, {}}));
    EXPECT_EQ(passes[0].token_top_k, (std::vector<int>{2, 0}));
    EXPECT_EQ(passes[0].counts, (Counts{1, 1, 1, 2, 0, 0, 0, 0}));
    EXPECT_EQ(passes[1].token_ids, (std::vector<std::vector<std::int32_t>>{{-1, 2}, {0, 1, 2}}));
    EXPECT_EQ(passes[1].token_top_k, (std::vector<int>{1, 3}));
    EXPECT_EQ(passes[1].counts, (Counts{0, 0, 1, 0, 1, 1, 1, 0}));
}

TEST(RecorderModes, PerTokenRejectsAnotherTopKForTheSameLayerWithinAPass) {
    Recorder r(ExpertLocation::trivial(1, 4, 4, 2), RecorderMode::kPerToken);
    r.start();
    r.begin_forward_pass();
    r.begin_layer(0);
    r.on_select_experts(cmap(matrix<std::int32_t>({{0, 1}})));
    expect_invalid_argument(
        [&] {
            r.on_select_experts(cmap(matrix<std::int32_t>({{2, 3, 1}})));
        },
        "topk_ids has 3 columns but layer 0 was given 2");
    r.end_layer();
    r.end_forward_pass();
    EXPECT_EQ(r.passes()[0].token_ids, (std::vector<std::vector<std::int32_t>>{{0, 1}}));
    EXPECT_EQ(r.passes()[0].counts, (Counts{1, 1, 0, 0}));
}

TEST(RecorderModes, StatAndPerPassKeepNoIds) {
    for (RecorderMode mode : {RecorderMode::kStat, RecorderMode::kPerPass}) {
        Recorder r(ExpertLocation::trivial(2, 4, 4, 2), mode);
        r.start();
        {
            PassScope pass(r);
            LayerScope layer(r, 0);
            r.on_select_experts(cmap(matrix<std::int32_t>({{0, 1}, {2, -1}})));
            // No per-token state, so another top_k is accepted.
            r.on_select_experts(cmap(matrix<std::int32_t>({{3, 3, 3}})));
        }
        const std::vector<Recorder::Pass> passes = r.passes();
        ASSERT_EQ(passes.size(), 1u) << moelb::to_string(mode);
        EXPECT_TRUE(passes[0].token_ids.empty()) << moelb::to_string(mode);
        EXPECT_TRUE(passes[0].token_top_k.empty()) << moelb::to_string(mode);
        EXPECT_EQ(passes[0].counts, (Counts{1, 1, 1, 3, 0, 0, 0, 0})) << moelb::to_string(mode);
    }
}

// ------------------------------------------------------------------------------------------------
// Recording state.

TEST(RecorderState, HooksValidateButCountNothingWhenNotRecording) {
    const Ids ids = matrix<std::int32_t>({{0, 1}, {3, -1}});
    Recorder r(ExpertLocation::trivial(2, 4, 4, 2), RecorderMode::kPerToken);
    EXPECT_FALSE(r.recording());
    auto offer_and_misuse = [&] {
        PassScope pass(r);
        LayerScope layer(r, 1);
        r.on_select_experts(cmap(ids));
        const std::vector<std::int64_t> counts = {2, 2};
        r.on_dispatch_counts(counts, 1);
        expect_invalid_argument([&] { r.on_select_experts(cmap(matrix<std::int32_t>({{4}}))); },
                                "topk_ids[0, 0] = 4");
        expect_invalid_argument([&] { r.on_select_experts(cmap(ids), 0); }, "layer=0");
        const std::vector<std::int64_t> bad = {2, 2, 2};
        expect_invalid_argument([&] { r.on_dispatch_counts(bad, 1); }, "local_counts has 3");
        expect_invalid_argument([&] { r.on_dispatch_counts(counts, 5); }, "ep_rank=5");
    };
    // Before start(): validated, nothing counted, no pass kept.
    offer_and_misuse();
    EXPECT_EQ(r.num_passes(), 0);
    expect_invalid_argument([&] { r.on_select_experts(cmap(ids)); }, "forward_pass()");

    // start(): recording; passes are kept.
    r.start();
    EXPECT_TRUE(r.recording());
    record(r, 1, ids);
    ASSERT_EQ(r.num_passes(), 1);
    EXPECT_EQ(r.passes()[0].counts, (Counts{0, 0, 0, 0, 1, 1, 0, 1}));

    // stop(): the data stays; later passes are validated but neither counted nor kept.
    r.stop();
    EXPECT_FALSE(r.recording());
    offer_and_misuse();
    ASSERT_EQ(r.num_passes(), 1);
    EXPECT_EQ(r.passes()[0].counts, (Counts{0, 0, 0, 0, 1, 1, 0, 1}));
    EXPECT_EQ(r.logical_count(), (Counts{0, 0, 0, 0, 1, 1, 0, 1}));

    // start() again clears what was kept.
    r.start();
    EXPECT_EQ(r.num_passes(), 0);
    EXPECT_TRUE(r.logical_count().empty());
    EXPECT_TRUE(std::isnan(r.average_balancedness(10)));
    record(r, 0, ids);
    ASSERT_EQ(r.num_passes(), 1);
    EXPECT_EQ(r.passes()[0].counts, (Counts{1, 1, 0, 1, 0, 0, 0, 0}));
}

TEST(RecorderState, StopAndStartOutsideLayerButInsideAPass) {
    // stop() inside a pass (outside a layer): that pass is not kept. start() inside a pass:
    // counting starts at the next hook and the pass is kept.
    const Ids ids = matrix<std::int32_t>({{0, 1}});
    Recorder r(ExpertLocation::trivial(1, 2, 2, 1));
    r.start();
    {
        PassScope pass(r);
        {
            LayerScope layer(r, 0);
            r.on_select_experts(cmap(ids));
        }
        r.stop();
    }
    EXPECT_EQ(r.num_passes(), 0);
    {
        PassScope pass(r);
        {
            LayerScope layer(r, 0);
            r.on_select_experts(cmap(ids));  // not recording: not counted
        }
        r.start();
        LayerScope layer(r, 0);
        r.on_select_experts(cmap(matrix<std::int32_t>({{1, 1}})));
    }
    ASSERT_EQ(r.num_passes(), 1);
    EXPECT_EQ(r.passes()[0].counts, (Counts{0, 2}));
}

TEST(RecorderState, ClearKeepsRecording) {
    Recorder r(ExpertLocation::trivial(1, 2, 2, 2));
    r.start();
    record(r, 0, matrix<std::int32_t>({{0, 1}}));
    record(r, 0, matrix<std::int32_t>({{1, 1}}));
    ASSERT_EQ(r.num_passes(), 2);
    r.clear();
    EXPECT_TRUE(r.recording());
    EXPECT_EQ(r.num_passes(), 0);
    EXPECT_TRUE(r.passes().empty());
    EXPECT_TRUE(r.logical_count().empty());
    // The balancedness history is a rolling monitor: it survives clear() (start() resets it).
    const double b0 = 1.0, b1 = (1.0 + kEps) / (2.0 + kEps), b2 = (0.5 + kEps) / (1.0 + kEps);
    EXPECT_DOUBLE_EQ(r.average_balancedness(10), (b0 + b1) / 2.0);
    record(r, 0, matrix<std::int32_t>({{0, -1}}));
    ASSERT_EQ(r.num_passes(), 1);
    EXPECT_EQ(r.passes()[0].counts, (Counts{1, 0}));
    EXPECT_EQ(r.passes()[0].forward_pass_id, 2);  // ids keep counting
    EXPECT_DOUBLE_EQ(r.average_balancedness(1), b2);
    EXPECT_DOUBLE_EQ(r.average_balancedness(10), (b0 + b1 + b2) / 3.0);
}

TEST(RecorderState, PassUnwoundByAnExceptionIsNotAppended) {
    Recorder r(ExpertLocation::trivial(2, 4, 4, 2), RecorderMode::kPerToken);
    r.start();
    record(r, 0, matrix<std::int32_t>({{1, 1}}));
    const double before = r.average_balancedness(10);
    EXPECT_THROW(
        {
            PassScope pass(r);
            LayerScope layer(r, 1);
            r.on_select_experts(cmap(matrix<std::int32_t>({{0, 2}, {3, 3}})));
            throw std::runtime_error("model forward failed");
        },
        std::runtime_error);
    EXPECT_EQ(r.num_passes(), 1);
    EXPECT_EQ(r.current_layer(), std::nullopt);
    EXPECT_DOUBLE_EQ(r.average_balancedness(10), before);
    // The recorder is usable again and nothing of the abandoned pass leaks into the next one.
    const Ids next = matrix<std::int32_t>({{2, -1}});
    record(r, 1, next);
    const std::vector<Recorder::Pass> passes = r.passes();
    ASSERT_EQ(passes.size(), 2u);
    EXPECT_EQ(passes[1].counts, histogram(2, 4, 1, next));
    EXPECT_EQ(passes[1].token_ids, (std::vector<std::vector<std::int32_t>>{{}, {2, -1}}));
    EXPECT_GT(passes[1].forward_pass_id, passes[0].forward_pass_id);
}

TEST(RecorderState, PassCompletedDuringUnrelatedUnwindingIsAppended) {
    Recorder r(ExpertLocation::trivial(1, 2, 2, 1));
    r.start();
    struct RecordsOnDestruction {
        Recorder* r;
        ~RecordsOnDestruction() { record(*r, 0, matrix<std::int32_t>({{0, 1}})); }
    };
    try {
        RecordsOnDestruction guard{&r};
        throw std::runtime_error("unrelated");
    } catch (const std::runtime_error&) {
    }
    ASSERT_EQ(r.num_passes(), 1);
    EXPECT_EQ(r.passes()[0].counts, (Counts{1, 1}));
}

TEST(RecorderState, ForwardPassIds) {
    Recorder r(ExpertLocation::trivial(1, 2, 2, 1));
    r.start();
    { PassScope pass(r); }
    { PassScope pass(r, 100); }
    { PassScope pass(r); }
    r.begin_forward_pass(500);
    r.end_forward_pass();
    { PassScope pass(r); }
    const std::vector<Recorder::Pass> passes = r.passes();
    ASSERT_EQ(passes.size(), 5u);
    EXPECT_EQ(passes[0].forward_pass_id, 0);
    EXPECT_EQ(passes[1].forward_pass_id, 100);
    EXPECT_EQ(passes[2].forward_pass_id, 101);
    EXPECT_EQ(passes[3].forward_pass_id, 500);
    EXPECT_EQ(passes[4].forward_pass_id, 501);
}

TEST(RecorderState, ConstructorErrors) {
    expect_invalid_argument(
        [] { Recorder(ExpertLocation::trivial(1, 2, 2, 1), RecorderMode::kStat, 0); },
        "buffer_size must be positive");
    expect_invalid_argument(
        [] { Recorder(ExpertLocation::trivial(1, 4, 4, 2), RecorderMode::kStat, 10, 2); },
        "ep_rank=2 is outside [0, ep_size=2)");
    expect_invalid_argument(
        [] { Recorder(ExpertLocation::trivial(1, 4, 4, 2), RecorderMode::kStat, 10, -1); },
        "ep_rank=-1");
    const Recorder r(ExpertLocation::trivial(3, 4, 8, 2), RecorderMode::kPerPass, 7, 1);
    EXPECT_EQ(r.mode(), RecorderMode::kPerPass);
    EXPECT_EQ(r.buffer_size(), 7);
    EXPECT_EQ(r.ep_rank(), 1);
    EXPECT_EQ(r.num_layers(), 3);
    EXPECT_EQ(r.num_physical_experts(), 8);
    EXPECT_FALSE(r.recording());
    EXPECT_EQ(r.current_layer(), std::nullopt);
}

TEST(RecorderState, NegativeBufferSizeIsUnbounded) {
    Recorder r(ExpertLocation::trivial(1, 2, 2, 1), RecorderMode::kStat, -1);
    r.start();
    const int n = 2000;
    for (int t = 0; t < n; ++t) {
        PassScope pass(r);
        LayerScope layer(r, 0);
        r.on_select_experts(cmap(matrix<std::int32_t>({{t % 2}})));
    }
    const std::vector<Recorder::Pass> passes = r.passes();
    ASSERT_EQ(static_cast<int>(passes.size()), n);
    for (int t = 0; t < n; ++t) {
        ASSERT_EQ(passes[t].forward_pass_id, t);
        ASSERT_EQ(passes[t].counts, (Counts{t % 2 == 0, t % 2 == 1})) << "pass " << t;
    }
    EXPECT_EQ(r.logical_count().size(), static_cast<std::size_t>(n) * 2);
}

// ------------------------------------------------------------------------------------------------
// Balancedness.

TEST(RecorderBalancedness, PassBalancednessByHand) {
    // L=2, W=4, S=2 (P=8). Layer 0: per-GPU [2, 2, 0, 4] (mean 2, max 4); layer 1: [2, 2, 2, 2].
    const Counts counts = {1, 1, 2, 0, 0, 0, 4, 0, /**/ 1, 1, 0, 2, 2, 0, 1, 1};
    const double layer0 = (2.0 + kEps) / (4.0 + kEps);
    EXPECT_DOUBLE_EQ(moelb::pass_balancedness(counts, 2, 8, 4), (layer0 + 1.0) / 2.0);
    // Layer 1 idle (a dense layer): 1.0 in SGLang's mean; left out of the active variant.
    const Counts dense = {1, 1, 2, 0, 0, 0, 4, 0, /**/ 0, 0, 0, 0, 0, 0, 0, 0};
    EXPECT_DOUBLE_EQ(moelb::pass_balancedness(dense, 2, 8, 4), (layer0 + 1.0) / 2.0);
    EXPECT_DOUBLE_EQ(moelb::pass_balancedness(dense, 2, 8, 4, moelb::LayerSet::kActive), layer0);
    // The same counts seen as 2 GPUs of 4 slots: [4, 4] and [4, 4] -> 1.0.
    EXPECT_DOUBLE_EQ(moelb::pass_balancedness(counts, 2, 8, 2), 1.0);
    // One GPU: always 1.
    EXPECT_DOUBLE_EQ(moelb::pass_balancedness(dense, 2, 8, 1), 1.0);
    // One hot GPU of 8: (1/8 + eps) / (1 + eps).
    const Counts hot = {0, 0, 0, 0, 0, 0, 0, 5};
    EXPECT_DOUBLE_EQ(moelb::pass_balancedness(hot, 1, 8, 8), (5.0 / 8 + kEps) / (5.0 + kEps));
    // No tokens anywhere: 1.0 (SGLang), NaN for the active variant; no layers: NaN.
    EXPECT_DOUBLE_EQ(moelb::pass_balancedness(zeros(2, 8), 2, 8, 4), 1.0);
    EXPECT_TRUE(
        std::isnan(moelb::pass_balancedness(zeros(2, 8), 2, 8, 4, moelb::LayerSet::kActive)));
    EXPECT_TRUE(std::isnan(moelb::pass_balancedness({}, 0, 8, 4)));
}

TEST(RecorderBalancedness, PassBalancednessErrors) {
    const Counts counts(16, 1);
    expect_invalid_argument([&] { moelb::pass_balancedness(counts, 3, 8, 4); }, "counts has 16");
    expect_invalid_argument([&] { moelb::pass_balancedness(counts, 2, 8, 3); }, "ep_size=3");
    expect_invalid_argument([&] { moelb::pass_balancedness(counts, 2, 8, 0); }, "ep_size=0");
    expect_invalid_argument([&] { moelb::pass_balancedness(counts, 2, 0, 1); },
                            "num_physical_experts=0");
}

TEST(RecorderBalancedness, NegativeNumLayersIsNamed) {
    expect_invalid_argument([] { moelb::pass_balancedness(Counts(8, 1), -1, 8, 4); },
                            "num_layers=-1");
}

TEST(RecorderBalancedness, RecordedPassesCarryTheirBalancedness) {
    // L=2, P=8, W=4 as above, recorded through on_select_experts.
    Recorder r(ExpertLocation::trivial(2, 8, 8, 4));
    r.start();
    {
        PassScope pass(r);
        {
            LayerScope layer(r, 0);  // per-GPU [2, 2, 0, 4]
            r.on_select_experts(cmap(matrix<std::int32_t>({{0, 1}, {2, 2}, {6, 6}, {6, 6}})));
        }
        LayerScope layer(r, 1);  // per-GPU [2, 2, 2, 2]
        r.on_select_experts(
            cmap(matrix<std::int32_t>({{0, 1, -1}, {2, 3, -1}, {4, 5, 6}, {7, -1, -1}})));
    }
    { PassScope pass(r); }  // routed nothing
    {
        PassScope pass(r);
        LayerScope layer(r, 1);  // layer 0 idle; per-GPU [0, 0, 0, 3]
        r.on_select_experts(cmap(matrix<std::int32_t>({{7, 6, 7}, {-1, -1, -1}})));
    }
    const std::vector<Recorder::Pass> passes = r.passes();
    ASSERT_EQ(passes.size(), 3u);
    const double b0 = (rate({2, 2, 0, 4}) + rate({2, 2, 2, 2})) / 2.0;
    const double b2 = (1.0 + rate({0, 0, 0, 3})) / 2.0;  // the dense layer 0 counts 1.0
    EXPECT_DOUBLE_EQ(passes[0].balancedness, b0);
    EXPECT_DOUBLE_EQ(passes[1].balancedness, 1.0);  // an idle pass, as in SGLang
    EXPECT_DOUBLE_EQ(passes[2].balancedness, b2);
    EXPECT_DOUBLE_EQ(r.average_balancedness(1), b2);
    EXPECT_DOUBLE_EQ(r.average_balancedness(2), (1.0 + b2) / 2.0);
    EXPECT_DOUBLE_EQ(r.average_balancedness(3), (b0 + 1.0 + b2) / 3.0);
    EXPECT_DOUBLE_EQ(r.average_balancedness(1000), (b0 + 1.0 + b2) / 3.0);
}

TEST(RecorderBalancedness, AverageOverTheLastWindowIdlePassesCountOne) {
    // L=1, W=2, S=1: a pass offering a tokens to slot 0 and b to slot 1 has balancedness
    // rate({a, b}); (0, 0) routes nothing: 1.0, as SGLang appends it.
    const std::vector<std::pair<int, int>> loads = {{1, 1}, {3, 1}, {0, 0}, {1, 0}, {2, 2}, {0, 0}};
    Recorder r(ExpertLocation::trivial(1, 2, 2, 2), RecorderMode::kStat, 2);
    r.start();
    std::vector<double> expected;
    for (const auto& [a, b] : loads) {
        PassScope pass(r);
        LayerScope layer(r, 0);
        Ids ids = Ids::Constant(1, a + b + 1, -1);
        for (int i = 0; i < a + b; ++i) ids(0, i) = i < a ? 0 : 1;
        r.on_select_experts(cmap(ids));
        expected.push_back(a + b == 0 ? 1.0 : rate({double(a), double(b)}));
    }
    auto mean_of_last = [&](int window) {
        double sum = 0.0;
        int n = 0;
        for (int i = std::max(0, static_cast<int>(expected.size()) - window);
             i < static_cast<int>(expected.size()); ++i) {
            sum += expected[i];
            ++n;
        }
        return n == 0 ? kNaN : sum / n;
    };
    // The history outlives the buffer (buffer_size=2 here).
    EXPECT_EQ(r.num_passes(), 2);
    EXPECT_DOUBLE_EQ(r.average_balancedness(1), 1.0);  // only the last (idle) pass
    for (int window : {2, 3, 4, 5, 6, 10, 1000, std::numeric_limits<int>::max()}) {
        EXPECT_DOUBLE_EQ(r.average_balancedness(window), mean_of_last(window))
            << "window " << window;
    }
    EXPECT_DOUBLE_EQ(r.average_balancedness(2), (rate({2, 2}) + 1.0) / 2.0);
    r.start();  // no pass since start(): NaN (None in Python)
    EXPECT_TRUE(std::isnan(r.average_balancedness(10)));
    expect_invalid_argument([&] { r.average_balancedness(0); }, "window must be positive, got 0");
    expect_invalid_argument([&] { r.average_balancedness(-3); }, "got -3");
}

TEST(RecorderBalancedness, HistoryKeepsTheLast1000Passes) {
    // One skewed pass (rate 0.5-ish), then 1000 perfectly balanced ones: the skewed one has left
    // the history, whatever the window.
    Recorder r(ExpertLocation::trivial(1, 2, 2, 2), RecorderMode::kStat, 1);
    r.start();
    record(r, 0, matrix<std::int32_t>({{0}}));
    EXPECT_DOUBLE_EQ(r.average_balancedness(5), (0.5 + kEps) / (1.0 + kEps));
    for (int t = 0; t < 999; ++t) record(r, 0, matrix<std::int32_t>({{0, 1}}));
    EXPECT_LT(r.average_balancedness(5000), 1.0);  // 1000 passes: the skewed one still counts
    record(r, 0, matrix<std::int32_t>({{0, 1}}));
    EXPECT_DOUBLE_EQ(r.average_balancedness(5000), 1.0);
}

// ------------------------------------------------------------------------------------------------
// merge.

TEST(RecorderMerge, RanksAddAndBalancednessIsRecomputed) {
    // L=1, P=4, W=2 (S=2). Each rank counts only what it received (dispatch counts), so alone each
    // looks fully unbalanced; merged, the pass is perfectly balanced.
    Recorder r0(ExpertLocation::trivial(1, 4, 4, 2), RecorderMode::kStat, 10, 0);
    Recorder r1(ExpertLocation::trivial(1, 4, 4, 2), RecorderMode::kStat, 10, 1);
    r0.start();
    r1.start();
    for (Recorder* r : {&r0, &r1}) {
        PassScope pass(*r);
        LayerScope layer(*r, 0);
        const std::vector<std::int64_t> counts = {3, 1};
        r->on_dispatch_counts(counts, r->ep_rank());
    }
    const double alone = rate({4, 0});
    EXPECT_DOUBLE_EQ(r0.average_balancedness(10), alone);
    r0.merge(r1);
    ASSERT_EQ(r0.num_passes(), 1);
    EXPECT_EQ(r0.passes()[0].counts, (Counts{3, 1, 3, 1}));
    EXPECT_DOUBLE_EQ(r0.passes()[0].balancedness, 1.0);
    EXPECT_DOUBLE_EQ(r0.average_balancedness(10), 1.0);
    EXPECT_EQ(r0.logical_count(), (Counts{3, 1, 3, 1}));
    // The other recorder is unchanged.
    EXPECT_EQ(r1.passes()[0].counts, (Counts{0, 0, 3, 1}));
    EXPECT_DOUBLE_EQ(r1.average_balancedness(10), alone);
}

TEST(RecorderMerge, IdleOnOneRankBecomesMeasuredAfterMerge) {
    Recorder r0(ExpertLocation::trivial(1, 2, 2, 2), RecorderMode::kStat, 10, 0);
    Recorder r1(ExpertLocation::trivial(1, 2, 2, 2), RecorderMode::kStat, 10, 1);
    r0.start();
    r1.start();
    { PassScope pass(r0); }
    record(r1, 0, matrix<std::int32_t>({{0, 1, 1}}));
    EXPECT_DOUBLE_EQ(r0.average_balancedness(10), 1.0);  // idle: SGLang's 1.0
    r0.merge(r1);
    EXPECT_DOUBLE_EQ(r0.passes()[0].balancedness, rate({1, 2}));
    EXPECT_DOUBLE_EQ(r0.average_balancedness(10), rate({1, 2}));
}

// Starts `r` and records one pass with `ids` on layer 0.
void start_with_one_pass(Recorder& r, const Ids& ids) {
    r.start();
    record(r, 0, ids);
}

TEST(RecorderMerge, MismatchesAreErrorsAndChangeNothing) {
    const Ids ids = matrix<std::int32_t>({{0, 1}, {2, 3}});
    const Counts original = {1, 1, 1, 1};
    auto expect_unchanged = [&](const Recorder& r) {
        ASSERT_EQ(r.num_passes(), 1);
        EXPECT_EQ(r.passes()[0].counts, original);
        EXPECT_DOUBLE_EQ(r.average_balancedness(10), 1.0);
    };
    Recorder r(ExpertLocation::trivial(1, 4, 4, 2));
    start_with_one_pass(r, ids);

    expect_invalid_argument([&] { r.merge(r); }, "cannot be merged with itself");
    expect_unchanged(r);

    Recorder per_pass(ExpertLocation::trivial(1, 4, 4, 2), RecorderMode::kPerPass, 10, 1);
    start_with_one_pass(per_pass, ids);
    expect_invalid_argument([&] { r.merge(per_pass); },
                            "other has mode 'per_pass' but this recorder has 'stat'");
    expect_unchanged(r);

    Recorder two(ExpertLocation::trivial(1, 4, 4, 2), RecorderMode::kStat, 10, 1);
    start_with_one_pass(two, ids);
    record(two, 0, ids);
    expect_invalid_argument([&] { r.merge(two); },
                            "other holds 2 passes but this recorder holds 1");
    expect_unchanged(r);
    expect_invalid_argument([&] { two.merge(r); }, "other holds 1 passes");

    Recorder empty(ExpertLocation::trivial(1, 4, 4, 2));
    expect_invalid_argument([&] { r.merge(empty); }, "other holds 0 passes");
    expect_unchanged(r);

    // Another placement in the last of three passes: nothing merged, not even the first two.
    Recorder a(ExpertLocation::trivial(1, 4, 4, 2));
    Recorder b(ExpertLocation::trivial(1, 4, 4, 2), RecorderMode::kStat, 10, 1);
    a.start();
    b.start();
    for (int t = 0; t < 3; ++t) {
        if (t == 2) b.set_location(ExpertLocation(matrix<std::int32_t>({{1, 0, 2, 3}}), 4, 2));
        record(a, 0, ids);
        record(b, 0, ids);
    }
    expect_invalid_argument([&] { a.merge(b); }, "pass 2 was recorded with different placements");
    for (const Recorder::Pass& pass : a.passes()) EXPECT_EQ(pass.counts, original);

    // Other shapes (L, P or E) are other placements.
    Recorder wide(ExpertLocation::trivial(1, 4, 8, 2), RecorderMode::kStat, 10, 1);
    start_with_one_pass(wide, ids);
    expect_invalid_argument([&] { r.merge(wide); }, "different placements");
    expect_unchanged(r);
    Recorder fewer(ExpertLocation::trivial(1, 2, 4, 2), RecorderMode::kStat, 10, 1);
    start_with_one_pass(fewer, ids);
    expect_invalid_argument([&] { r.merge(fewer); }, "different placements");
    expect_unchanged(r);
}

TEST(RecorderMerge, PerTokenTopKConflictIsAnErrorAndChangesNothing) {
    Recorder r(ExpertLocation::trivial(1, 4, 4, 2), RecorderMode::kPerToken);
    start_with_one_pass(r, matrix<std::int32_t>({{0, 1}}));
    Recorder other(ExpertLocation::trivial(1, 4, 4, 2), RecorderMode::kPerToken, 10, 1);
    start_with_one_pass(other, matrix<std::int32_t>({{2, 3, 3}}));
    expect_invalid_argument([&] { r.merge(other); }, "has top_k 2 here and 3 in other");
    EXPECT_EQ(r.passes()[0].token_ids, (std::vector<std::vector<std::int32_t>>{{0, 1}}));
    EXPECT_EQ(r.passes()[0].counts, (Counts{1, 1, 0, 0}));
    // A rank whose layer saw no call (top_k 0) merges with any top_k.
    Recorder idle(ExpertLocation::trivial(1, 4, 4, 2), RecorderMode::kPerToken);
    idle.start();
    { PassScope pass(idle); }
    idle.merge(other);
    EXPECT_EQ(idle.passes()[0].token_ids, (std::vector<std::vector<std::int32_t>>{{2, 3, 3}}));
    EXPECT_EQ(idle.passes()[0].token_top_k, (std::vector<int>{3}));
    EXPECT_EQ(idle.passes()[0].counts, (Counts{0, 0, 1, 2}));
}

// merge_summed_counts: the native half of all_reduce (the ranks' summed counts and the other
// ranks' packed ids) must leave exactly what merge() of the other ranks' recorders leaves.

// kRanks recorders of one placement, each with the same seeded passes (some layers idle).
std::vector<std::unique_ptr<Recorder>> recorded_ranks(const ExpertLocation& location,
                                                      RecorderMode mode, int num_ranks,
                                                      int num_passes) {
    Rng rng(17);
    std::vector<std::unique_ptr<Recorder>> ranks;
    for (int r = 0; r < num_ranks; ++r) {
        ranks.push_back(std::make_unique<Recorder>(location, mode, -1, r % location.ep_size()));
        ranks.back()->start();
    }
    for (int t = 0; t < num_passes; ++t) {
        for (int r = 0; r < num_ranks; ++r) {
            PassScope pass(*ranks[r]);
            for (int l = 0; l < location.num_layers(); ++l) {
                if ((t + l + r) % 4 == 0) continue;
                LayerScope layer(*ranks[r], l);
                ranks[r]->on_select_experts(
                    cmap(random_ids(1 + t + r, 2, location.num_physical_experts(), rng)));
            }
        }
    }
    return ranks;
}

TEST(RecorderMergeSummed, EqualsMergeOfTheOtherRanks) {
    const int L = 3, P = 8, kRanks = 3, kPasses = 4;
    Rng rng(5);
    const ExpertLocation location(random_layout(L, 6, P, rng), 6, 2);
    for (RecorderMode mode : {RecorderMode::kStat, RecorderMode::kPerToken}) {
        auto reference = recorded_ranks(location, mode, kRanks, kPasses);
        for (int r = 1; r < kRanks; ++r) reference[0]->merge(*reference[r]);

        auto ranks = recorded_ranks(location, mode, kRanks, kPasses);
        std::vector<std::int32_t> summed(static_cast<std::size_t>(kPasses) * L * P, 0);
        for (const auto& rank : ranks) {
            std::size_t i = 0;
            for (const auto& pass : rank->passes()) {
                for (std::int32_t c : pass.counts) summed[i++] += c;
            }
        }
        std::vector<std::vector<std::int32_t>> packs;
        for (int r = 1; r < kRanks; ++r) packs.push_back(ranks[r]->packed_token_ids());
        std::vector<std::span<const std::int32_t>> others;
        if (mode == RecorderMode::kPerToken) {
            for (const auto& pack : packs) others.emplace_back(pack);
        }
        ranks[0]->merge_summed_counts(std::span<const std::int32_t>(summed), others);

        const auto got = ranks[0]->passes();
        const auto want = reference[0]->passes();
        ASSERT_EQ(got.size(), want.size());
        for (std::size_t t = 0; t < got.size(); ++t) {
            EXPECT_EQ(got[t].counts, want[t].counts) << "pass " << t;
            EXPECT_EQ(got[t].token_ids, want[t].token_ids) << "pass " << t;
            EXPECT_EQ(got[t].token_top_k, want[t].token_top_k) << "pass " << t;
            EXPECT_DOUBLE_EQ(got[t].balancedness, want[t].balancedness) << "pass " << t;
        }
        EXPECT_DOUBLE_EQ(ranks[0]->average_balancedness(1000),
                         reference[0]->average_balancedness(1000));
        EXPECT_EQ(ranks[0]->logical_count(), reference[0]->logical_count());
        // The int64 overload gives the same result.
        auto wide_ranks = recorded_ranks(location, mode, kRanks, kPasses);
        const std::vector<std::int64_t> wide(summed.begin(), summed.end());
        wide_ranks[0]->merge_summed_counts(std::span<const std::int64_t>(wide), others);
        EXPECT_EQ(wide_ranks[0]->logical_count(), reference[0]->logical_count());
    }
}

TEST(RecorderMergeSummed, BadInputIsAnErrorAndChangesNothing) {
    const ExpertLocation location = ExpertLocation::trivial(1, 4, 4, 2);
    auto ranks = recorded_ranks(location, RecorderMode::kPerToken, 2, 2);
    Recorder& r = *ranks[0];
    const auto before = r.passes();
    auto expect_unchanged = [&] {
        const auto now = r.passes();
        for (std::size_t t = 0; t < now.size(); ++t) {
            EXPECT_EQ(now[t].counts, before[t].counts);
            EXPECT_EQ(now[t].token_ids, before[t].token_ids);
        }
    };
    std::vector<std::int64_t> summed;
    for (const auto& pass : before)
        summed.insert(summed.end(), pass.counts.begin(), pass.counts.end());
    using Span64 = std::span<const std::int64_t>;

    std::vector<std::int64_t> short_sum(summed.begin(), summed.end() - 1);
    expect_invalid_argument([&] { r.merge_summed_counts(Span64(short_sum)); },
                            "summed has 7 counts but the recorder holds 2 passes of [1, 4] (8)");
    auto smaller = summed;
    smaller[1] -= 1;
    if (before[0].counts[1] == 0) smaller[1] = -1;
    expect_invalid_argument([&] { r.merge_summed_counts(Span64(smaller)); }, "summed[0, 0, 1]");
    auto huge = summed;
    huge[2] = std::int64_t{1} << 31;
    expect_invalid_argument([&] { r.merge_summed_counts(Span64(huge)); }, "fits in int32");
    expect_unchanged();

    std::vector<std::int32_t> pack = ranks[1]->packed_token_ids();
    auto truncated = pack;
    truncated.pop_back();
    expect_invalid_argument(
        [&] { r.merge_summed_counts(Span64(summed), {std::span<const std::int32_t>(truncated)}); },
        "header describes");
    auto bad_id = pack;
    bad_id.back() = 4;
    expect_invalid_argument(
        [&] { r.merge_summed_counts(Span64(summed), {std::span<const std::int32_t>(bad_id)}); },
        "holds the id 4");
    auto other_k = pack;
    other_k[0] = 3;  // pass 0, layer 0: top_k 3 but the ids were recorded with 2
    expect_invalid_argument(
        [&] { r.merge_summed_counts(Span64(summed), {std::span<const std::int32_t>(other_k)}); },
        "top_k");
    expect_unchanged();

    Recorder stat(location);
    stat.start();
    record(stat, 0, matrix<std::int32_t>({{0, 1}}));
    const std::vector<std::int64_t> one = {1, 1, 0, 0};
    expect_invalid_argument(
        [&] { stat.merge_summed_counts(Span64(one), {std::span<const std::int32_t>(pack)}); },
        "need mode='per_token'");
    // A pass recorded before set_location cannot take counts summed in the current placement.
    EXPECT_EQ(stat.num_passes_with_other_placement(), 0);
    stat.set_location(ExpertLocation(matrix<std::int32_t>({{1, 0, 2, 3}}), 4, 2));
    EXPECT_EQ(stat.num_passes_with_other_placement(), 1);
    expect_invalid_argument([&] { stat.merge_summed_counts(Span64(one)); },
                            "pass 0 (forward_pass_id=0) was recorded with different placements");
    EXPECT_EQ(stat.passes()[0].counts, (Counts{1, 1, 0, 0}));
}

TEST(RecorderMergeSummed, PackedTokenIdsLayout) {
    Recorder r(ExpertLocation::trivial(2, 4, 4, 2), RecorderMode::kPerToken);
    r.start();
    {
        PassScope pass(r);
        LayerScope layer(r, 1);
        r.on_select_experts(cmap(matrix<std::int32_t>({{0, 1}, {3, -1}})));
    }
    { PassScope pass(r); }
    // top_k [2 passes x 2 layers], num_ids [4], then the ids.
    EXPECT_EQ(r.packed_token_ids(),
              (std::vector<std::int32_t>{0, 2, 0, 0, 0, 4, 0, 0, 0, 1, 3, -1}));
    Recorder stat(ExpertLocation::trivial(2, 4, 4, 2));
    stat.start();
    record(stat, 0, matrix<std::int32_t>({{0, 1}}));
    EXPECT_EQ(stat.packed_token_ids(), (std::vector<std::int32_t>{0, 0, 0, 0}));
}

// ------------------------------------------------------------------------------------------------
// Threads.

TEST(RecorderThreads, ConcurrentHooksInOneLayerLoseNoCount) {
    const int L = 2, P = 16, kThreads = 8, kCalls = 300;
    Recorder r(ExpertLocation::trivial(L, 12, P, 4), RecorderMode::kPerToken);
    r.start();
    std::vector<Counts> expected(kThreads, zeros(L, P));
    std::vector<std::vector<std::int32_t>> offered(kThreads);
    {
        PassScope pass(r);
        LayerScope layer(r, 1);
        std::vector<std::thread> threads;
        for (int i = 0; i < kThreads; ++i) {
            threads.emplace_back([&, i] {
                Rng rng(1000 + i);
                for (int c = 0; c < kCalls; ++c) {
                    const Ids ids = random_ids(4, 2, P, rng);
                    r.on_select_experts(cmap(ids), 1);
                    const std::vector<std::int64_t> counts = {1, 0, 2, 0};
                    r.on_dispatch_counts(counts, i % 4);
                    add_histogram(expected[i], P, 1, ids);
                    for (int s = 0; s < 4; ++s) {
                        expected[i][static_cast<std::size_t>(P) + (i % 4) * 4 + s] +=
                            static_cast<std::int32_t>(counts[s]);
                    }
                    offered[i].insert(offered[i].end(), ids.data(), ids.data() + ids.size());
                }
            });
        }
        for (std::thread& t : threads) t.join();
    }
    Counts total = zeros(L, P);
    std::vector<std::int32_t> all_ids;
    for (int i = 0; i < kThreads; ++i) {
        for (std::size_t j = 0; j < total.size(); ++j) total[j] += expected[i][j];
        all_ids.insert(all_ids.end(), offered[i].begin(), offered[i].end());
    }
    ASSERT_EQ(r.num_passes(), 1);
    const Recorder::Pass pass = r.passes()[0];
    EXPECT_EQ(pass.counts, total);
    // Every call's ids are kept, each call's [4, 2] block whole (never interleaved with another).
    auto blocks = [](const std::vector<std::int32_t>& ids) {
        std::vector<std::vector<std::int32_t>> out;
        for (std::size_t i = 0; i + 8 <= ids.size(); i += 8) {
            out.emplace_back(ids.begin() + i, ids.begin() + i + 8);
        }
        std::sort(out.begin(), out.end());
        return out;
    };
    ASSERT_EQ(pass.token_ids[1].size(), all_ids.size());
    EXPECT_EQ(blocks(pass.token_ids[1]), blocks(all_ids));
    EXPECT_EQ(pass.token_top_k, (std::vector<int>{0, 2}));
}

}  // namespace
