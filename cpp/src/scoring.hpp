// Private: the vectorised score functions shared by select_experts and HashRouter. Inputs must be
// sanitised first (sanitize_logits): NaN counts as -inf and +inf as the largest float.
#pragma once

#include <Eigen/Core>
#include <limits>

#include "moelb/routing.hpp"

namespace moelb::detail {

using ArrayXf = Eigen::Array<float, Eigen::Dynamic, 1>;

inline constexpr float kNegInf = -std::numeric_limits<float>::infinity();
inline constexpr float kMaxFloat = std::numeric_limits<float>::max();

// Scratch arrays of the score functions (sized to the input on use).
struct ScoreScratch {
    ArrayXf a, b, c;
};

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
    ArrayXf& h = s.a;
    ArrayXf& L = s.b;
    ArrayXf& pos = s.c;
    h = (-0.5f * x.abs()).exp();
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
    pos = (x.max(0.0f) + h.square() * L).sqrt();
    L = h * L.sqrt();
    float* xs = x.data();
    const float* neg = L.data();
    const float* nonneg = pos.data();
    for (Eigen::Index i = 0; i < x.size(); ++i) xs[i] = xs[i] < 0.0f ? neg[i] : nonneg[i];
}

// x <- score(x) element by element for kSigmoid / kSqrtSoftplus.
inline void elementwise_scores(Scoring scoring, ArrayXf& x, ScoreScratch& s) {
    if (scoring == Scoring::kSigmoid) {
        x = 1.0f / (1.0f + (-x).exp());
    } else {
        sqrt_softplus(x, s);
    }
}

// x <- softmax(x) in place. A row whose logits are all -inf (or NaN) has no probability mass:
// all zeros.
inline void softmax(ArrayXf& x) {
    const float m = x.maxCoeff();
    if (m == kNegInf) {
        x.setZero();
        return;
    }
    x = (x - m).exp();
    x *= 1.0f / x.sum();
}

}  // namespace moelb::detail
