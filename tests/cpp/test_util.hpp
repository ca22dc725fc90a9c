// Helpers shared by the GoogleTest files: views over owned matrices, matrix literals, error
// expectations and a portable random source.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "moelb/errors.hpp"
#include "moelb/views.hpp"

namespace moelb::test_util {

template <class T>
ConstMatrixMap<T> cmap(const RowMatrix<T>& m) {
    return ConstMatrixMap<T>(m.data(), m.rows(), m.cols());
}

template <class T>
MatrixMap<T> mmap(RowMatrix<T>& m) {
    return MatrixMap<T>(m.data(), m.rows(), m.cols());
}

// A matrix from a list of equally long rows.
template <class T>
RowMatrix<T> matrix(const std::vector<std::vector<T>>& rows) {
    RowMatrix<T> m(static_cast<Index>(rows.size()), static_cast<Index>(rows.at(0).size()));
    for (Index r = 0; r < m.rows(); ++r) {
        for (Index c = 0; c < m.cols(); ++c) m(r, c) = rows[r][c];
    }
    return m;
}

// A random layout [L, P]: every expert gets one slot, the other slots random experts, then the
// slots of each layer are shuffled.
inline RowMatrix<std::int32_t> random_layout(int L, int E, int P, std::uint32_t seed) {
    std::mt19937 gen(seed);
    RowMatrix<std::int32_t> map(L, P);
    for (int l = 0; l < L; ++l) {
        std::vector<std::int32_t> row(static_cast<std::size_t>(P));
        for (int p = 0; p < P; ++p) row[p] = p < E ? p : static_cast<std::int32_t>(gen() % E);
        for (int p = P - 1; p > 0; --p) std::swap(row[p], row[gen() % (p + 1)]);
        for (int p = 0; p < P; ++p) map(l, p) = row[p];
    }
    return map;
}

// Runs f and expects an InvalidArgument whose message contains `needle`.
template <class F>
void expect_invalid_argument(F&& f, const std::string& needle) {
    try {
        f();
        ADD_FAILURE() << "expected InvalidArgument mentioning '" << needle << "'";
    } catch (const InvalidArgument& e) {
        EXPECT_NE(std::string(e.what()).find(needle), std::string::npos)
            << "message '" << e.what() << "' does not mention '" << needle << "'";
    }
}

// A portable uniform source (std::uniform_real_distribution is not portable across libraries).
class Rng {
  public:
    explicit Rng(std::uint32_t seed) : gen_(seed) {}
    double uniform(double lo, double hi) {
        return lo + (hi - lo) * static_cast<double>(gen_() >> 8) * (1.0 / 16777216.0);
    }
    std::uint32_t below(std::uint32_t n) { return gen_() % n; }

  private:
    std::mt19937 gen_;
};

}  // namespace moelb::test_util
