// The DeepSeek MoE layer (moe_layer.hpp): the forward against a double-precision reference
// written here (routing from select_experts / the hash table, experts and combine recomputed),
// deferred and in-place orders bitwise identical, the measured peak equal to the documented
// formula, fused vs separate shared expert, placements, threads and the error paths.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <span>
#include <vector>

#include "moelb/errors.hpp"
#include "moelb/expert_location.hpp"
#include "moelb/moe_layer.hpp"
#include "moelb/parallel.hpp"
#include "moelb/routing.hpp"
#include "test_util.hpp"

namespace {

using namespace moelb::test_util;
using moelb::DeepSeekMoE;
using moelb::DeepSeekMoEConfig;
using moelb::DeepSeekMoEWeights;
using moelb::Index;
using moelb::RowMatrix;

DeepSeekMoEConfig small_v3() {
    DeepSeekMoEConfig c = DeepSeekMoEConfig::deepseek_v3();
    c.hidden_size = 48;
    c.intermediate_size = 24;
    c.num_experts = 16;
    c.top_k = 4;
    c.num_groups = 4;
    c.topk_group = 2;
    return c;
}

DeepSeekMoEConfig small_v4(int layer_id) {
    DeepSeekMoEConfig c = DeepSeekMoEConfig::deepseek_v4_flash(layer_id);
    c.hidden_size = 40;
    c.intermediate_size = 16;
    c.num_experts = 12;
    c.top_k = 3;
    c.vocab_size = 50;
    return c;
}

RowMatrix<float> random_hidden(Index T, Index H, std::uint64_t seed, float scale = 1.0f) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal(0.0f, scale);
    RowMatrix<float> x(T, H);
    for (Index i = 0; i < x.size(); ++i) x.data()[i] = normal(rng);
    return x;
}

std::vector<std::int64_t> random_ids(Index T, int vocab, std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::uniform_int_distribution<std::int64_t> pick(0, vocab - 1);
    std::vector<std::int64_t> ids(static_cast<std::size_t>(T));
    for (auto& id : ids) id = pick(rng);
    return ids;
}

// y = W2 (silu(min(g, L)) * clamp(u, -L, L)) in double.
std::vector<double> mlp(const float* x, Index H, Index width, const float* w_gate_up,
                        const float* w_down, double limit) {
    std::vector<double> act(static_cast<std::size_t>(width));
    for (Index j = 0; j < width; ++j) {
        double g = 0, u = 0;
        for (Index h = 0; h < H; ++h) {
            g += static_cast<double>(x[h]) * w_gate_up[j * H + h];
            u += static_cast<double>(x[h]) * w_gate_up[(width + j) * H + h];
        }
        if (limit > 0) {
            g = std::min(g, limit);
            u = std::clamp(u, -limit, limit);
        }
        act[j] = g / (1 + std::exp(-g)) * u;
    }
    std::vector<double> y(static_cast<std::size_t>(H), 0.0);
    for (Index h = 0; h < H; ++h) {
        for (Index j = 0; j < width; ++j) y[h] += act[j] * w_down[h * width + j];
    }
    return y;
}

// The layer's output recomputed in double from the logical weights.
RowMatrix<double> reference(const DeepSeekMoEConfig& c, const DeepSeekMoEWeights& w,
                            const RowMatrix<float>& x, std::span<const std::int64_t> input_ids) {
    const Index T = x.rows(), H = c.hidden_size, I = c.intermediate_size;
    RowMatrix<float> logits = x * w.gate.transpose();
    moelb::TopKConfig routing = c.topk_config();
    routing.num_fused_shared_experts = 0;  // the reference adds the shared expert itself
    RowMatrix<std::int32_t> ids;
    RowMatrix<float> weights;
    if (c.is_hash_layer()) {
        moelb::HashRouter router(w.tid2eid, c.scoring, c.routed_scaling_factor, 0, false,
                                 c.num_experts);
        auto out = router.select<std::int64_t>(cmap(logits), input_ids);
        ids = out.topk_ids;
        weights = out.topk_weights;
    } else {
        auto out = moelb::select_experts(cmap(logits), routing, w.correction_bias);
        ids = out.topk_ids;
        weights = out.topk_weights;
    }
    const Index Is = c.shared_intermediate_size();
    const double shared_limit = c.effective_shared_swiglu_limit();
    RowMatrix<double> out = RowMatrix<double>::Zero(T, H);
    for (Index t = 0; t < T; ++t) {
        for (Index k = 0; k < c.top_k; ++k) {
            const Index e = ids(t, k);
            const auto y = mlp(&x(t, 0), H, I, w.w13.data() + e * 2 * I * H,
                               w.w2.data() + e * H * I, c.swiglu_limit);
            for (Index h = 0; h < H; ++h)
                out(t, h) += c.routed_scaling_factor * weights(t, k) * y[h];
        }
        if (Is > 0) {
            const auto s =
                mlp(&x(t, 0), H, Is, w.shared_gate_up.data(), w.shared_down.data(), shared_limit);
            for (Index h = 0; h < H; ++h) out(t, h) += s[h];
        }
    }
    return out;
}

RowMatrix<float> run(DeepSeekMoE& layer, RowMatrix<float> x,
                     std::span<const std::int64_t> ids = {}) {
    RowMatrix<float> out(x.rows(), x.cols());
    if (layer.config().kernel == moelb::RoutedKernel::kInplace) {
        layer.forward(mmap(x), ids, mmap(x));
        return x;
    }
    layer.forward(mmap(x), ids, mmap(out));
    return out;
}

void expect_close(const RowMatrix<float>& got, const RowMatrix<double>& want, double rel) {
    const double scale = want.cwiseAbs().maxCoeff();
    ASSERT_GT(scale, 0);
    for (Index i = 0; i < got.size(); ++i) {
        ASSERT_NEAR(got.data()[i], want.data()[i], rel * scale) << "element " << i;
    }
}

TEST(MoELayer, V3MatchesReference) {
    const DeepSeekMoEConfig c = small_v3();
    const auto w = DeepSeekMoEWeights::random(c, 1);
    DeepSeekMoE layer(c, w);
    const RowMatrix<float> x = random_hidden(150, c.hidden_size, 2);
    expect_close(run(layer, x), reference(c, w, x, {}), 1e-5);
    EXPECT_EQ(layer.last_stats().steps,
              (std::vector<std::string>{"gate", "topk", "routed", "shared", "combine"}));
    EXPECT_TRUE(layer.last_stats().deferred_shared);
}

TEST(MoELayer, V4LearnedAndHashLayersWithClamp) {
    for (const int layer_id : {0, 2, 3}) {
        DeepSeekMoEConfig c = small_v4(layer_id);
        EXPECT_EQ(c.is_hash_layer(), layer_id < 3);
        const auto w = DeepSeekMoEWeights::random(c, 10 + layer_id);
        DeepSeekMoE layer(c, w);
        // Large activations so that both clamps (gate <= 10, |up| <= 10) bite.
        const RowMatrix<float> x = random_hidden(90, c.hidden_size, 3, 6.0f);
        const auto ids = random_ids(90, c.vocab_size, 4);
        const RowMatrix<float> got = run(layer, x, ids);
        expect_close(got, reference(c, w, x, ids), 1e-5);
        c.swiglu_limit = 0;
        DeepSeekMoE unclamped(c, w);
        const RowMatrix<float> free = run(unclamped, x, ids);
        expect_close(free, reference(c, w, x, ids), 1e-5);
        EXPECT_GT((free - got).cwiseAbs().maxCoeff(), 1e-2) << "the clamp changed nothing";
    }
}

TEST(MoELayer, SharedExpertClampCanDifferFromTheRouted) {
    DeepSeekMoEConfig c = small_v4(5);
    c.shared_swiglu_limit = 0;  // HF transformers' port: routed clamped, shared not
    const auto w = DeepSeekMoEWeights::random(c, 8);
    DeepSeekMoE layer(c, w);
    const RowMatrix<float> x = random_hidden(70, c.hidden_size, 9, 6.0f);
    expect_close(run(layer, x), reference(c, w, x, {}), 1e-5);
}

TEST(MoELayer, FusedSharedExpertEqualsSeparate) {
    DeepSeekMoEConfig c = small_v3();
    c.intermediate_size = 24;
    const auto w = DeepSeekMoEWeights::random(c, 5);
    const RowMatrix<float> x = random_hidden(100, c.hidden_size, 6);
    DeepSeekMoE separate(c, w);
    c.fuse_shared_experts = true;
    DeepSeekMoE fused(c, w);
    const RowMatrix<float> a = run(separate, x), b = run(fused, x);
    expect_close(b, a.cast<double>(), 1e-5);
    EXPECT_EQ(fused.last_stats().steps, (std::vector<std::string>{"gate", "topk", "routed"}));
    EXPECT_EQ(fused.fused_shared_w13().size(), w.shared_gate_up.size());
    EXPECT_EQ(fused.routed_w13().size(), w.w13.size());
}

TEST(MoELayer, DeferredInPlaceAndEagerOrdersAreBitwiseIdentical) {
    DeepSeekMoEConfig c = small_v3();
    const auto w = DeepSeekMoEWeights::random(c, 7);
    const RowMatrix<float> x = random_hidden(333, c.hidden_size, 8);
    std::vector<RowMatrix<float>> outs;
    std::vector<std::vector<std::string>> steps;
    for (const auto& [kernel, defer] :
         {std::pair{moelb::RoutedKernel::kOutOfPlace, moelb::DeferShared::kAuto},
          std::pair{moelb::RoutedKernel::kOutOfPlace, moelb::DeferShared::kNo},
          std::pair{moelb::RoutedKernel::kInplace, moelb::DeferShared::kAuto}}) {
        c.kernel = kernel;
        c.defer_shared = defer;
        DeepSeekMoE layer(c, w);
        RowMatrix<float> in = x;
        outs.push_back(run(layer, in));
        EXPECT_EQ(in, x) << "the caller's copy changed";
        steps.push_back(layer.last_stats().steps);
    }
    EXPECT_EQ(outs[0], outs[1]);
    EXPECT_EQ(outs[0], outs[2]);
    EXPECT_EQ(steps[0], (std::vector<std::string>{"gate", "topk", "routed", "shared", "combine"}));
    EXPECT_EQ(steps[1], (std::vector<std::string>{"shared", "gate", "topk", "routed", "combine"}));
    EXPECT_EQ(steps[2], steps[1]);
    // The out-of-place kernel leaves its input intact; the in-place one overwrote it.
    c.kernel = moelb::RoutedKernel::kInplace;
    DeepSeekMoE inplace(c, w);
    RowMatrix<float> in = x;
    inplace.forward(mmap(in), {}, mmap(in));
    EXPECT_EQ(in, outs[0]);
}

TEST(MoELayer, PeakEqualsTheFormulaAndDeferralSavesOneBuffer) {
    struct Shape {
        int H, I, E, K, T, shared;
    };
    for (const Shape s : {Shape{48, 24, 16, 4, 150, 1}, Shape{64, 8, 8, 2, 1, 1},
                          Shape{32, 16, 32, 6, 700, 2}, Shape{40, 20, 12, 3, 64, 0}}) {
        for (const int threads : {1, 2}) {
            moelb::set_num_threads(threads);
            DeepSeekMoEConfig c = small_v3();
            c.hidden_size = s.H;
            c.intermediate_size = s.I;
            c.num_experts = s.E;
            c.top_k = s.K;
            c.num_groups = 0;
            c.topk_group = 0;
            c.num_shared_experts = s.shared;
            const auto w = DeepSeekMoEWeights::random(c, 11);
            const RowMatrix<float> x = random_hidden(s.T, s.H, 12);
            std::int64_t peaks[2];
            for (const bool defer : {true, false}) {
                c.defer_shared = defer ? moelb::DeferShared::kYes : moelb::DeferShared::kNo;
                DeepSeekMoE layer(c, w);
                run(layer, x);
                const auto& st = layer.last_stats();
                EXPECT_EQ(st.peak_bytes,
                          DeepSeekMoE::expected_peak_bytes(c, s.T, c.num_experts, st.routed_lanes,
                                                           st.shared_lanes))
                    << "H=" << s.H << " T=" << s.T << " defer=" << defer;
                peaks[defer] = st.peak_bytes;
            }
            if (s.shared > 0) {
                EXPECT_EQ(peaks[0] - peaks[1], 4 * static_cast<std::int64_t>(s.T) * s.H);
            } else {
                EXPECT_EQ(peaks[0], peaks[1]);
            }
        }
    }
    moelb::set_num_threads(0);
}

TEST(MoELayer, DeepSeekScaleFormula) {
    // V3 at T = 4096 (cannot be instantiated here: 45 GB of weights): deferral saves 4 T H.
    DeepSeekMoEConfig c = DeepSeekMoEConfig::deepseek_v3();
    const Index T = 4096;
    c.defer_shared = moelb::DeferShared::kNo;
    const auto eager = DeepSeekMoE::expected_peak_bytes(c, T, 256, 2, 2);
    c.defer_shared = moelb::DeferShared::kAuto;
    const auto deferred = DeepSeekMoE::expected_peak_bytes(c, T, 256, 2, 2);
    EXPECT_EQ(eager - deferred, 4 * T * 7168);
}

TEST(MoELayer, SameOutputForAnyThreadCount) {
    const DeepSeekMoEConfig c = small_v3();
    const auto w = DeepSeekMoEWeights::random(c, 13);
    const RowMatrix<float> x = random_hidden(1000, c.hidden_size, 14);
    DeepSeekMoE layer(c, w);
    moelb::set_num_threads(1);
    const RowMatrix<float> one = run(layer, x);
    moelb::set_num_threads(2);
    const RowMatrix<float> two = run(layer, x);
    moelb::set_num_threads(0);
    EXPECT_EQ(one, two);
}

TEST(MoELayer, RedundantSlotsHoldTheirExpertsWeights) {
    const DeepSeekMoEConfig c = small_v3();
    const auto w = DeepSeekMoEWeights::random(c, 15);
    // 16 experts on 20 slots over 4 ranks: experts 0-3 twice.
    RowMatrix<std::int32_t> phy2log(1, 20);
    for (int p = 0; p < 20; ++p) phy2log(0, p) = p < 16 ? p : p - 16;
    moelb::ExpertLocation location(phy2log, 16, 4, 1);
    DeepSeekMoE layer(c, w, location, 0, 3);
    EXPECT_EQ(layer.num_physical_experts(), 20);
    const auto w13 = layer.routed_w13();
    const Index row = 2 * c.intermediate_size * c.hidden_size;
    for (int p = 0; p < 20; ++p) {
        const int e = phy2log(0, p);
        EXPECT_TRUE(std::equal(w13.begin() + p * row, w13.begin() + (p + 1) * row,
                               w.w13.begin() + e * row));
    }
    const RowMatrix<float> x = random_hidden(200, c.hidden_size, 16);
    expect_close(run(layer, x), reference(c, w, x, {}), 1e-5);
}

TEST(MoELayer, EmptyBatch) {
    const DeepSeekMoEConfig c = small_v3();
    DeepSeekMoE layer(c, DeepSeekMoEWeights::random(c, 17));
    RowMatrix<float> x(0, c.hidden_size), out(0, c.hidden_size);
    layer.forward(mmap(x), {}, mmap(out));
    EXPECT_TRUE(layer.last_stats().steps.empty());
    EXPECT_EQ(layer.last_stats().peak_bytes, 0);
}

TEST(MoELayer, BadInput) {
    DeepSeekMoEConfig c = small_v3();
    const auto w = DeepSeekMoEWeights::random(c, 18);
    c.kernel = moelb::RoutedKernel::kInplace;
    c.defer_shared = moelb::DeferShared::kYes;
    expect_invalid_argument([&] { DeepSeekMoE(c, w); }, "defer_shared=True needs an out-of-place");
    c = small_v3();
    c.fuse_shared_experts = true;
    c.renormalize = false;
    expect_invalid_argument([&] { DeepSeekMoE(c, w); }, "fuse_shared_experts needs renormalize");
    c = small_v3();
    c.top_k = 17;
    expect_invalid_argument([&] { DeepSeekMoE(c, w); }, "top_k=17");
    c = small_v3();
    c.hidden_size = 50;
    expect_invalid_argument([&] { DeepSeekMoE(c, w); },
                            "gate has shape [16, 48], expected [16, 50]");
    c = small_v3();
    DeepSeekMoE layer(c, w);
    RowMatrix<float> x = random_hidden(4, 47, 1), out(4, 48);
    expect_invalid_argument([&] { layer.forward(mmap(x), {}, mmap(out)); },
                            "hidden has shape [4, 47] but hidden_size=48");
    RowMatrix<float> x48 = random_hidden(4, 48, 1);
    expect_invalid_argument([&] { layer.forward(mmap(x48), {}, mmap(x48)); },
                            "out overlaps hidden");
    const DeepSeekMoEConfig hash = small_v4(0);
    DeepSeekMoE hashed(hash, DeepSeekMoEWeights::random(hash, 2));
    RowMatrix<float> hx = random_hidden(4, hash.hidden_size, 1), hout(4, hash.hidden_size);
    expect_invalid_argument([&] { hashed.forward(mmap(hx), {}, mmap(hout)); },
                            "input_ids (the token ids) are required");
    const std::vector<std::int64_t> bad{1, 2, 50, 3};
    expect_invalid_argument([&] { hashed.forward(mmap(hx), bad, mmap(hout)); }, "50");
    const std::vector<std::int64_t> short_ids{1, 2};
    expect_invalid_argument([&] { hashed.forward(mmap(hx), short_ids, mmap(hout)); },
                            "input_ids has 2 entries but hidden has 4 rows");
}

}  // namespace
