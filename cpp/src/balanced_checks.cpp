// The input checks balanced_split and balanced_assignment share (ours; DESIGN section 9 and its
// "Conventions": bad input raises InvalidArgument naming the Python parameter and the offending
// value; reference/dispatch.md section 7 asks for integer counts n_e >= 0 and fixed loads f_g >=
// 0): the layer argument, the shape of fixed_loads, and every layer's counts and fixed loads
// (>= 0, summing within int64 so that no flow capacity overflows), the first bad entry named.
#include <algorithm>
#include <cstdint>
#include <sstream>
#include <string>

#include "balanced_flow.hpp"
#include "moelb/errors.hpp"

namespace moelb::detail {
namespace {

// Checks one layer's fixed loads (>= 0) and returns their sum.
std::int64_t fixed_sum(ConstMatrixMap<std::int64_t> fixed_loads, Index row, const Naming& name,
                       int layer) {
    if (fixed_loads.size() == 0) return 0;
    std::int64_t sum = 0;
    for (Index r = 0; r < fixed_loads.cols(); ++r) {
        const std::int64_t f = fixed_loads(row, r);
        MOELB_CHECK_ARG(f >= 0, name.at(row, r) << " = " << f << " is negative");
        MOELB_CHECK_ARG(!__builtin_add_overflow(sum, f, &sum), name.of_layer(layer)
                                                                   << " sums past the int64 range");
    }
    return sum;
}

}  // namespace

std::string Naming::at(Index row, Index col) const {
    std::ostringstream os;
    os << param << "[";
    if (!one_layer) os << row << ", ";
    os << col << "]";
    return os.str();
}

std::string Naming::at(Index row, Index source, Index col) const {
    std::ostringstream os;
    os << param << "[";
    if (!one_layer) os << row << ", ";
    os << source << ", " << col << "]";
    return os.str();
}

std::string Naming::of_layer(int layer) const {
    std::ostringstream os;
    os << param;
    if (!one_layer) os << " of layer " << layer;
    return os.str();
}

Shape check_layers(const ExpertLocation& loc, int layer) {
    if (layer < 0) return {loc.num_layers(), 0, false};
    MOELB_CHECK_ARG(layer < loc.num_layers(),
                    "layer=" << layer << " is outside [0, num_layers=" << loc.num_layers() << ")");
    return {1, layer, true};
}

void check_fixed_loads(const ExpertLocation& loc, const Shape& shape,
                       ConstMatrixMap<std::int64_t> fixed_loads) {
    if (fixed_loads.size() == 0) return;
    const int W = loc.ep_size();
    if (shape.one_layer) {
        MOELB_CHECK_ARG(fixed_loads.rows() == 1 && fixed_loads.cols() == W,
                        "fixed_loads has " << fixed_loads.size() << " entries but ep_size=" << W);
    } else {
        MOELB_CHECK_ARG(fixed_loads.rows() == shape.layers && fixed_loads.cols() == W,
                        "fixed_loads has shape (" << fixed_loads.rows() << ", "
                                                  << fixed_loads.cols() << ") but the location has "
                                                  << shape.layers << " layers and ep_size=" << W);
    }
}

void check_counts(const Shape& shape, ConstMatrixMap<std::int64_t> counts, int sources,
                  const Naming& name, ConstMatrixMap<std::int64_t> fixed_loads) {
    const Naming fixed_name{"fixed_loads", shape.one_layer};
    for (Index row = 0; row < shape.layers; ++row) {
        const int l = shape.first + static_cast<int>(row);
        std::int64_t sum = fixed_sum(fixed_loads, row, fixed_name, l);
        for (int s = 0; s < sources; ++s) {
            for (Index e = 0; e < counts.cols(); ++e) {
                const std::int64_t n = counts(row * sources + s, e);
                MOELB_CHECK_ARG(n >= 0, (name.per_source ? name.at(row, s, e) : name.at(row, e))
                                            << " = " << n << " is negative");
                MOELB_CHECK_ARG(!__builtin_add_overflow(sum, n, &sum),
                                name.of_layer(l) << (fixed_loads.size() ? " and fixed_loads" : "")
                                                 << " sum past the int64 range");
            }
        }
    }
}

bool sum_counts(ConstMatrixMap<std::int64_t> counts, Index row, int sources,
                ConstMatrixMap<std::int64_t> fixed_loads, std::int64_t* sums) {
    const Index cols = counts.cols();
    // Unsigned adds: bad input may wrap, which is defined there (and then reported below).
    auto* total = reinterpret_cast<std::uint64_t*>(sums);
    std::fill(total, total + cols, 0);
    std::uint64_t bits = 0;
    for (int s = 0; s < sources; ++s) {
        const auto* c =
            reinterpret_cast<const std::uint64_t*>(counts.data()) + (row * sources + s) * cols;
        for (Index e = 0; e < cols; ++e) {
            total[e] += c[e];
            bits |= c[e];
        }
    }
    if (fixed_loads.size()) {
        for (Index r = 0; r < fixed_loads.cols(); ++r) {
            bits |= static_cast<std::uint64_t>(fixed_loads(row, r));
        }
    }
    // Every entry is >= 0 and at most `bits`, so their number times `bits` bounds their sum.
    const auto max = static_cast<std::uint64_t>(kInt64Max);
    const auto entries = static_cast<std::uint64_t>(sources) * static_cast<std::uint64_t>(cols) +
                         static_cast<std::uint64_t>(fixed_loads.size() ? fixed_loads.cols() : 0);
    std::uint64_t bound = 0;
    return bits <= max && !__builtin_mul_overflow(bits, entries, &bound) && bound <= max;
}

void check_assignment_shapes(const ExpertLocation& location, const Shape& shape,
                             ConstMatrixMap<std::int64_t> source_counts,
                             MatrixMap<std::int64_t> out) {
    const int W = location.ep_size(), E = location.num_logical_experts();
    const int P = location.num_physical_experts();
    const Index rows = static_cast<Index>(shape.layers) * W;
    if (shape.one_layer) {
        MOELB_CHECK_ARG(source_counts.rows() == W && source_counts.cols() == E,
                        "source_counts has shape ("
                            << source_counts.rows() << ", " << source_counts.cols()
                            << ") but (ep_size=" << W << ", num_experts=" << E << ") is needed");
    } else {
        MOELB_CHECK_ARG(source_counts.rows() == rows && source_counts.cols() == E,
                        "source_counts has "
                            << source_counts.rows() << " rows of " << source_counts.cols()
                            << " but (num_layers=" << shape.layers << ") x (ep_size=" << W
                            << ") rows of num_experts=" << E << " are needed");
    }
    MOELB_CHECK_ARG(out.rows() == rows && out.cols() == P,
                    "out has shape (" << out.rows() << ", " << out.cols() << ") but (" << rows
                                      << ", " << P << ") is needed");
}

}  // namespace moelb::detail
