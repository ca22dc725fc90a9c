// Private: the vectorised score functions of the routing kernels (select_experts and HashRouter),
// included by the per-path translation units only (isa/kernels.hpp: Eigen is renamed there).
// Inputs must be sanitised first (sanitize_logits): NaN counts as -inf and +inf as the largest
// float.
#pragma once

#include <Eigen/Core>
#include <limits>

#include "kernels.hpp"

namespace moelb::MOELB_ISA_NS {

using ArrayXf = Eigen::Array<float, Eigen::Dynamic, 1>;

inline constexpr float kNegInf = -std::numeric_limits<float>::infinity();
inline constexpr float kMaxFloat = std::numeric_limits<float>::max();

// Scratch arrays of the score functions (sized to the input on use).
struct ScoreScratch {
    ArrayXf a, b, c, padded;
};

// Eigen evaluates an array expression in packets and the last size % packet elements with scalar
// code, whose exp rounds differently (by an ulp; and the vector exp of some ISAs gives a denormal,
// not 0, for -inf). An element's score would then depend on its position: equal logits would not
// tie (the lowest-id rule broken in builds without AVX-512) and a token's weights would depend on
// its place in a block. So the score functions evaluate a copy padded to a multiple of kScoreLanes
// (the widest float packet, AVX-512's), where every element takes the vector path, and give -inf
// (a NaN logit) a score of exactly 0.
inline constexpr Eigen::Index kScoreLanes = 16;

// padded <- x followed by `fill` up to a multiple of kScoreLanes.
inline void pad_scores(const ArrayXf& x, ArrayXf& padded, float fill) {
    const Eigen::Index n = x.size();
    padded.resize((n + kScoreLanes - 1) / kScoreLanes * kScoreLanes);
    padded.head(n) = x;
    padded.tail(padded.size() - n).setConstant(fill);
}

// out <- logits with NaN -> -inf and +inf -> the largest float. (A plain loop: the compiler
// vectorises it as a compare and a blend, which Eigen 3.4's scalar select() does not.)
inline void sanitize_logits(const float* logits, Eigen::Index n, ArrayXf& out) {
    out.resize(n);
    float* o = out.data();
    for (Eigen::Index i = 0; i < n; ++i) {
        const float v = logits[i];
        o[i] = v != v ? kNegInf : (v < kMaxFloat ? v : kMaxFloat);
    }
}

// x <- sqrt(softplus(x)) in place, vectorised.
// With h = exp(-|x|/2), z = h^2 and u = z / (2 + z) <= 1/3:
//   log1p(z) = 2 atanh(u) = z L,  L = 2 / (2 + z) (1 + u^2/3 + u^4/5 + ... + u^12/13)
// (truncation below 2e-8 relative), so softplus(x) = max(x, 0) + log1p(exp(-|x|)) gives
//   x >= 0: sqrt(x + z L)        x < 0: h sqrt(L)
// The second form keeps full relative precision down to x = -176 where exp(x) itself would
// underflow. Equals PyTorch's softplus (x for x > 20, else log1p(exp(x))) to float rounding;
// -inf gives 0.
inline void sqrt_softplus(ArrayXf& x, ScoreScratch& s) {
    ArrayXf& v = s.padded;
    pad_scores(x, v, 0.0f);
    ArrayXf& h = s.a;
    ArrayXf& L = s.b;
    ArrayXf& pos = s.c;
    h = (-0.5f * v.abs()).exp();
    L = h.square();                   // z
    pos = (L / (L + 2.0f)).square();  // u^2, evaluated once rather than per use
    const ArrayXf& u2 = pos;
    L = 2.0f / (L + 2.0f) *
        (1.0f +
         u2 * (1.0f / 3 +
               u2 * (1.0f / 5 +
                     u2 * (1.0f / 7 + u2 * (1.0f / 9 + u2 * (1.0f / 11 + u2 * (1.0f / 13)))))));
    // L = log1p(z) / z. Both forms are evaluated vectorised, then blended in a plain loop
    // (Eigen 3.4's select() is not vectorised).
    pos = (v.max(0.0f) + h.square() * L).sqrt();
    L = h * L.sqrt();
    float* xs = x.data();
    const float* neg = L.data();
    const float* nonneg = pos.data();
    for (Eigen::Index i = 0; i < x.size(); ++i) {
        const float xi = xs[i];
        xs[i] = xi == kNegInf ? 0.0f : (xi < 0.0f ? neg[i] : nonneg[i]);
    }
}

// x <- score(x) element by element for kSigmoid / kSqrtSoftplus.
inline void elementwise_scores(isa::ScoreFn scoring, ArrayXf& x, ScoreScratch& s) {
    if (scoring == isa::ScoreFn::kSigmoid) {
        ArrayXf& v = s.padded;
        pad_scores(x, v, 0.0f);
        v = 1.0f / (1.0f + (-v).exp());
        float* xs = x.data();
        const float* scores = v.data();
        for (Eigen::Index i = 0; i < x.size(); ++i) xs[i] = xs[i] == kNegInf ? 0.0f : scores[i];
    } else {
        sqrt_softplus(x, s);
    }
}

// x <- softmax(x) in place. A row whose logits are all -inf (or NaN) has no probability mass:
// all zeros. A probability below the smallest normal float is 0: exp(-inf) and the underflowing
// exp of a logit more than ~87 below the maximum are exactly 0 whatever the ISA (SSE2's vector
// exp gives 3e-39 for them, AVX-512's 0), so such experts tie at 0 and go to the lowest id.
inline void softmax(ArrayXf& x, ScoreScratch& s) {
    const float m = x.maxCoeff();
    if (m == kNegInf) {
        x.setZero();
        return;
    }
    ArrayXf& v = s.padded;
    pad_scores(x, v, kNegInf);
    v = (v - m).exp();
    float* xs = x.data();
    const float* e = v.data();
    constexpr float kMinNormal = std::numeric_limits<float>::min();
    for (Eigen::Index i = 0; i < x.size(); ++i) xs[i] = e[i] < kMinNormal ? 0.0f : e[i];
    x *= 1.0f / x.sum();
}

}  // namespace moelb::MOELB_ISA_NS
