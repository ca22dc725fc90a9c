// The DeepSeek MoE layer (moe_layer.hpp): the forward against a double-precision reference
// written here (routing from select_experts / the hash table, experts and combine recomputed),
// deferred and in-place orders bitwise identical, the measured peak equal to the documented
// formula, fused vs separate shared expert, placements, threads and the error paths.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
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

// E4M3FN from its definition: (-1)^s 2^(e - 7) (1 + m / 8), subnormal 2^-6 (m / 8).
double fp8_value(std::uint8_t bits) {
    const int s = bits >> 7, e = (bits >> 3) & 15, m = bits & 7;
    const double v = e == 0 ? std::ldexp(m / 8.0, -6) : std::ldexp(1 + m / 8.0, e - 7);
    return s ? -v : v;
}

// A stored tensor's matrices [count, rows, cols] dequantised here from its bytes and scales
// (issue 23's definition: fp8 q * scale_inv[r / br, c / bc], int8 q * scale_inv[r], bf16 exact).
std::vector<double> dequantize(const moelb::WeightTensor& t) {
    const Index rows = t.rows(), cols = t.cols();
    std::vector<double> w(static_cast<std::size_t>(t.count() * rows * cols));
    const auto* bytes = reinterpret_cast<const unsigned char*>(t.bytes().data());
    const auto scales = t.scale_inv();
    const Index br = t.block().rows, bc = t.block().cols;
    const Index grid_rows = (rows + br - 1) / br, grid_cols = (cols + bc - 1) / bc;
    for (Index i = 0; i < static_cast<Index>(w.size()); ++i) {
        const Index m = i / (rows * cols), r = (i / cols) % rows, c = i % cols;
        switch (t.format()) {
            case moelb::WeightFormat::kFloat32: {
                float v;
                std::memcpy(&v, bytes + 4 * i, 4);
                w[i] = v;
                break;
            }
            case moelb::WeightFormat::kBFloat16: {
                std::uint32_t v = 0;
                std::memcpy(reinterpret_cast<unsigned char*>(&v) + 2, bytes + 2 * i, 2);
                w[i] = std::bit_cast<float>(v);
                break;
            }
            case moelb::WeightFormat::kFp8E4M3:
                w[i] = fp8_value(bytes[i]) * scales[(m * grid_rows + r / br) * grid_cols + c / bc];
                break;
            case moelb::WeightFormat::kInt8:
                w[i] =
                    static_cast<signed char>(bytes[i]) * static_cast<double>(scales[m * rows + r]);
                break;
        }
    }
    return w;
}

// y = W2 (silu(min(g, L)) * clamp(u, -L, L)) in double.
std::vector<double> mlp(const float* x, Index H, Index width, const double* w_gate_up,
                        const double* w_down, double limit) {
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
    const auto w13 = dequantize(w.w13), w2 = dequantize(w.w2);
    std::vector<double> shared_gate_up, shared_down;
    if (Is > 0) {
        shared_gate_up = dequantize(w.shared_gate_up);
        shared_down = dequantize(w.shared_down);
    }
    RowMatrix<double> out = RowMatrix<double>::Zero(T, H);
    for (Index t = 0; t < T; ++t) {
        for (Index k = 0; k < c.top_k; ++k) {
            const Index e = ids(t, k);
            const auto y = mlp(&x(t, 0), H, I, w13.data() + e * 2 * I * H, w2.data() + e * H * I,
                               c.swiglu_limit);
            for (Index h = 0; h < H; ++h)
                out(t, h) += c.routed_scaling_factor * weights(t, k) * y[h];
        }
        if (Is > 0) {
            const auto s =
                mlp(&x(t, 0), H, Is, shared_gate_up.data(), shared_down.data(), shared_limit);
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
    EXPECT_EQ(fused.w13().count(), c.num_experts + 1);  // the fused shared expert is slot P
    EXPECT_EQ(fused.routed_w13().size(), w.w13.bytes().size());
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
                                                           st.shared_lanes, st.gate_lanes))
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
    const auto src = w.w13.bytes();
    const Index row = 2 * c.intermediate_size * c.hidden_size * 4;
    for (int p = 0; p < 20; ++p) {
        const int e = phy2log(0, p);
        EXPECT_TRUE(
            std::equal(w13.begin() + p * row, w13.begin() + (p + 1) * row, src.begin() + e * row));
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

// ---------------------------------------------------------------------------------------------
// Weight formats x activation dtypes (issue 23).

struct FormatCase {
    moelb::WeightFormat format;
    moelb::ActivationDType dtype;
    // Tolerance relative to the reference's largest |value|: float32 activations differ from the
    // double reference by float32 accumulation only (the reference uses the same quantised
    // weights); bf16 activations by the bf16 roundings of silu * up, Y, the K' sum and the output.
    double rel;
};

std::string case_name(const testing::TestParamInfo<FormatCase>& info) {
    return std::string(moelb::to_string(info.param.format)) + "_" +
           std::string(moelb::to_string(info.param.dtype));
}

class MoELayerFormats : public testing::TestWithParam<FormatCase> {};

// The forward in the case's activation dtype: bf16 hidden is x rounded to bf16 (x is replaced by
// the values the layer sees); the output widened to float.
RowMatrix<float> run_as(DeepSeekMoE& layer, RowMatrix<float>& x,
                        std::span<const std::int64_t> ids = {}) {
    if (layer.config().activation_dtype == moelb::ActivationDType::kFloat32)
        return run(layer, x, ids);
    const Index T = x.rows(), H = x.cols();
    RowMatrix<std::uint16_t> bits(T, H), out(T, H);
    for (Index i = 0; i < x.size(); ++i) {
        bits.data()[i] = moelb::float_to_bf16_bits(x.data()[i]);
        x.data()[i] = moelb::bf16_bits_to_float(bits.data()[i]);
    }
    if (layer.config().kernel == moelb::RoutedKernel::kInplace) {
        layer.forward(mmap(bits), ids, mmap(bits));
        out = bits;
    } else {
        layer.forward(mmap(bits), ids, mmap(out));
    }
    RowMatrix<float> y(T, H);
    for (Index i = 0; i < y.size(); ++i) y.data()[i] = moelb::bf16_bits_to_float(out.data()[i]);
    return y;
}

DeepSeekMoEConfig format_config(const FormatCase& fc) {
    DeepSeekMoEConfig c = small_v3();  // H 48, I 24
    c.weight_format = fc.format;
    c.activation_dtype = fc.dtype;
    c.weight_block_size = {8, 32};  // partial column blocks of w13 (48 = 32 + 16)
    return c;
}

TEST_P(MoELayerFormats, MatchesReferenceOfTheSameQuantisedWeights) {
    for (const bool fused : {false, true}) {
        DeepSeekMoEConfig c = format_config(GetParam());
        c.fuse_shared_experts = fused;
        const auto w = DeepSeekMoEWeights::random(c, 21);
        EXPECT_EQ(w.w13.format(), c.weight_format);
        DeepSeekMoE layer(c, w);
        RowMatrix<float> x = random_hidden(150, c.hidden_size, 22);
        const RowMatrix<float> got = run_as(layer, x);
        c.fuse_shared_experts = false;  // the reference adds the shared expert separately
        expect_close(got, reference(c, w, x, {}), GetParam().rel);
    }
}

TEST_P(MoELayerFormats, V4HashLayerWithClamp) {
    DeepSeekMoEConfig c = small_v4(1);  // H 40, I 16
    c.weight_format = GetParam().format;
    c.activation_dtype = GetParam().dtype;
    c.weight_block_size = {16, 16};
    const auto w = DeepSeekMoEWeights::random(c, 23);
    DeepSeekMoE layer(c, w);
    RowMatrix<float> x = random_hidden(90, c.hidden_size, 24, 6.0f);
    const auto ids = random_ids(90, c.vocab_size, 25);
    expect_close(run_as(layer, x, ids), reference(c, w, x, ids), GetParam().rel);
}

TEST_P(MoELayerFormats, SameBitsForAnyThreadCountAndOrder) {
    // T = 1 and 100: fewer row blocks than threads (the shared expert and the bf16 gate split
    // their columns over the lanes); T = 700: six blocks.
    DeepSeekMoEConfig c = format_config(GetParam());
    const auto w = DeepSeekMoEWeights::random(c, 26);
    for (const int T : {1, 100, 700}) {
        const RowMatrix<float> x0 = random_hidden(T, c.hidden_size, 27);
        std::vector<RowMatrix<float>> outs;
        for (const int threads : {1, 2, 3}) {
            for (const auto defer : {moelb::DeferShared::kAuto, moelb::DeferShared::kNo}) {
                moelb::set_num_threads(threads);
                c.defer_shared = defer;
                DeepSeekMoE layer(c, w);
                RowMatrix<float> x = x0;
                outs.push_back(run_as(layer, x));
            }
        }
        for (const auto& out : outs) EXPECT_EQ(out, outs[0]) << "T=" << T;
    }
    moelb::set_num_threads(0);
}

TEST_P(MoELayerFormats, PeakEqualsTheFormula) {
    for (const int T : {1, 150, 700}) {
        for (const int threads : {1, 2}) {
            moelb::set_num_threads(threads);
            DeepSeekMoEConfig c = format_config(GetParam());
            const auto w = DeepSeekMoEWeights::random(c, 28);
            std::int64_t peaks[2];
            for (const bool defer : {true, false}) {
                c.defer_shared = defer ? moelb::DeferShared::kYes : moelb::DeferShared::kNo;
                DeepSeekMoE layer(c, w);
                RowMatrix<float> x = random_hidden(T, c.hidden_size, 29);
                run_as(layer, x);
                const auto& st = layer.last_stats();
                EXPECT_EQ(st.peak_bytes,
                          DeepSeekMoE::expected_peak_bytes(c, T, c.num_experts, st.routed_lanes,
                                                           st.shared_lanes, st.gate_lanes))
                    << "T=" << T << " threads=" << threads << " defer=" << defer;
                peaks[defer] = st.peak_bytes;
            }
            // The shared output stays float32 in every format: deferral saves 4 T H.
            EXPECT_EQ(peaks[0] - peaks[1], 4 * static_cast<std::int64_t>(T) * c.hidden_size);
        }
    }
    moelb::set_num_threads(0);
}

constexpr double kFloat32Tolerance = 2e-5;
constexpr double kBf16Tolerance = 2e-2;

INSTANTIATE_TEST_SUITE_P(
    Formats, MoELayerFormats,
    testing::Values(
        FormatCase{moelb::WeightFormat::kFloat32, moelb::ActivationDType::kBFloat16,
                   kBf16Tolerance},
        FormatCase{moelb::WeightFormat::kBFloat16, moelb::ActivationDType::kFloat32,
                   kFloat32Tolerance},
        FormatCase{moelb::WeightFormat::kBFloat16, moelb::ActivationDType::kBFloat16,
                   kBf16Tolerance},
        FormatCase{moelb::WeightFormat::kFp8E4M3, moelb::ActivationDType::kFloat32,
                   kFloat32Tolerance},
        FormatCase{moelb::WeightFormat::kFp8E4M3, moelb::ActivationDType::kBFloat16,
                   kBf16Tolerance},
        FormatCase{moelb::WeightFormat::kInt8, moelb::ActivationDType::kFloat32, kFloat32Tolerance},
        FormatCase{moelb::WeightFormat::kInt8, moelb::ActivationDType::kBFloat16, kBf16Tolerance}),
    case_name);

TEST(MoELayer, QuantisedWeightsChangeTheOutputByTheirError) {
    // The same float32 draws quantised: the fp8 layer is close to, but not, the float32 one.
    DeepSeekMoEConfig c = small_v3();
    const RowMatrix<float> x = random_hidden(100, c.hidden_size, 30);
    DeepSeekMoE f32(c, DeepSeekMoEWeights::random(c, 31));
    c.weight_format = moelb::WeightFormat::kFp8E4M3;
    c.weight_block_size = {8, 16};
    DeepSeekMoE fp8(c, DeepSeekMoEWeights::random(c, 31));
    const RowMatrix<float> a = run(f32, x), b = run(fp8, x);
    const double diff = (a - b).cwiseAbs().maxCoeff(), scale = a.cwiseAbs().maxCoeff();
    EXPECT_GT(diff, 1e-4 * scale);
    EXPECT_LT(diff, 0.2 * scale);
}

TEST(MoELayer, FormatErrors) {
    DeepSeekMoEConfig c = small_v3();
    c.weight_format = moelb::WeightFormat::kFp8E4M3;  // I = 24, blocks of 128 rows
    expect_invalid_argument([&] { c.validate(); },
                            "needs intermediate_size to be a multiple of weight_block_size[0]; "
                            "got intermediate_size=24 and weight_block_size[0]=128");
    c.weight_block_size = {0, 128};
    expect_invalid_argument([&] { c.validate(); }, "weight_block_size must be positive");
    c.weight_block_size = {8, 8};
    const auto fp8 = DeepSeekMoEWeights::random(c, 1);
    DeepSeekMoEConfig other = c;
    other.weight_format = moelb::WeightFormat::kInt8;
    expect_invalid_argument([&] { DeepSeekMoE(other, fp8); },
                            "w13 is stored as fp8_e4m3 but weight_format='int8'");
    other = c;
    other.weight_block_size = {8, 16};
    expect_invalid_argument([&] { DeepSeekMoE(other, fp8); },
                            "w13 has fp8 scale blocks of (8, 8) but weight_block_size=(8, 16)");
    // The block size matters to fp8 only: int8 weights of another block size are accepted.
    other = c;
    other.weight_format = moelb::WeightFormat::kInt8;
    auto int8 = DeepSeekMoEWeights::random(other, 1);
    other.weight_block_size = {128, 128};
    EXPECT_NO_THROW(DeepSeekMoE(other, int8));
    DeepSeekMoE layer(c, fp8);
    RowMatrix<std::uint16_t> bits(4, c.hidden_size), out(4, c.hidden_size);
    expect_invalid_argument([&] { layer.forward(mmap(bits), {}, mmap(out)); },
                            "hidden is bfloat16 but activation_dtype='float32'");
}

}  // namespace
