// Array views the core takes: row-major Eigen maps over caller-owned memory. The core never
// allocates its outputs; callers (the bindings, tests) own every buffer.
#pragma once

#include <Eigen/Core>
#include <cstdint>
#include <span>

namespace moelb {

using Index = std::int64_t;

template <class T>
using RowMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
// A writable [rows, cols] row-major view.
template <class T>
using MatrixMap = Eigen::Map<RowMatrix<T>>;
// A read-only [rows, cols] row-major view.
template <class T>
using ConstMatrixMap = Eigen::Map<const RowMatrix<T>>;

}  // namespace moelb
