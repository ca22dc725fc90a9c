#include <cmath>
#include <sstream>
#include <string>
#include <vector>

#include "arrays.hpp"
#include "bindings.hpp"
#include "moelb/balancedness.hpp"

namespace moelb::bindings {

namespace {

// "[i, j]" of flat index `flat` in an array of shape `shape`.
std::string multi_index(const py::array& a, py::ssize_t flat) {
    std::vector<py::ssize_t> index(static_cast<std::size_t>(a.ndim()));
    for (py::ssize_t d = a.ndim() - 1; d >= 0; --d) {
        index[static_cast<std::size_t>(d)] = a.shape(d) ? flat % a.shape(d) : 0;
        flat = a.shape(d) ? flat / a.shape(d) : 0;
    }
    std::ostringstream out;
    out << "[";
    for (std::size_t d = 0; d < index.size(); ++d) out << (d ? ", " : "") << index[d];
    out << "]";
    return out.str();
}

// mean_rank_load and max_rank_load: float64 C-contiguous arrays of one shape, finite, >= 0, and
// mean <= max (up to rounding): a swapped pair or a load that is not one is an error.
void check_loads(const py::array_t<double>& mean, const py::array_t<double>& max) {
    MOELB_CHECK_ARG(mean.ndim() == max.ndim() &&
                        std::equal(mean.shape(), mean.shape() + mean.ndim(), max.shape()),
                    "mean_rank_load has shape " << shape_string(mean) << " but max_rank_load has "
                                                << shape_string(max));
    const double* m = mean.data();
    const double* x = max.data();
    for (py::ssize_t i = 0; i < mean.size(); ++i) {
        MOELB_CHECK_ARG(std::isfinite(m[i]) && m[i] >= 0,
                        "mean_rank_load" << multi_index(mean, i) << " = " << m[i]
                                         << " is not a finite non-negative load");
        MOELB_CHECK_ARG(std::isfinite(x[i]) && x[i] >= 0,
                        "max_rank_load" << multi_index(max, i) << " = " << x[i]
                                        << " is not a finite non-negative load");
        MOELB_CHECK_ARG(m[i] <= x[i] * (1 + 1e-9),
                        "mean_rank_load" << multi_index(mean, i) << " = " << m[i]
                                         << " is above max_rank_load" << multi_index(max, i)
                                         << " = " << x[i]
                                         << " (a mean cannot exceed the largest load)");
    }
}

py::array_t<double> contiguous(const py::handle& obj, const char* name) {
    py::array a = py::array::ensure(obj);
    MOELB_CHECK_ARG(a,
                    name << " must be an array, got " << std::string(py::str(py::type::of(obj))));
    return strict_array<double>(a, name, static_cast<int>(a.ndim()));
}

}  // namespace

void bind_balancedness(py::module_& m) {
    m.attr("BALANCEDNESS_EPSILON") = kBalancednessEpsilon;

    m.def(
        "utilization_rate",
        [](const py::handle& mean_rank_load, const py::handle& max_rank_load) {
            const auto mean = contiguous(mean_rank_load, "mean_rank_load");
            const auto max = contiguous(max_rank_load, "max_rank_load");
            check_loads(mean, max);
            py::array_t<double> out(
                std::vector<py::ssize_t>(mean.shape(), mean.shape() + mean.ndim()));
            double* dst = out.mutable_data();
            for (py::ssize_t i = 0; i < mean.size(); ++i) {
                dst[i] = utilization_rate(mean.data()[i], max.data()[i]);
            }
            return out;
        },
        py::arg("mean_rank_load"), py::arg("max_rank_load"),
        "SGLang's per-layer utilization rate (mean + 1e-5) / (max + 1e-5), elementwise over "
        "float64 "
        "arrays of one shape.");

    m.def(
        "balancedness",
        [](const py::handle& mean_rank_load, const py::handle& max_rank_load,
           const std::string& layers) {
            const LayerSet which = parse_layer_set(layers);
            const auto mean = contiguous(mean_rank_load, "mean_rank_load");
            const auto max = contiguous(max_rank_load, "max_rank_load");
            MOELB_CHECK_ARG(mean.ndim() >= 1,
                            "mean_rank_load must have a layer axis, got a scalar");
            check_loads(mean, max);
            const py::ssize_t L = mean.shape(mean.ndim() - 1);
            std::vector<py::ssize_t> shape(mean.shape(), mean.shape() + mean.ndim() - 1);
            py::array_t<double> out(shape);
            double* dst = out.mutable_data();
            const py::ssize_t rows = L ? mean.size() / L : out.size();
            for (py::ssize_t r = 0; r < rows; ++r) {
                dst[r] = balancedness({mean.data() + r * L, static_cast<std::size_t>(L)},
                                      {max.data() + r * L, static_cast<std::size_t>(L)}, which);
            }
            return out;
        },
        py::arg("mean_rank_load"), py::arg("max_rank_load"), py::arg("layers") = "all",
        "The mean over the last axis (layers) of utilization_rate: layers='all' (SGLang: every "
        "layer, one without load counts 1.0) or 'active' (layers with load; NaN when none).");

    m.def(
        "pass_balancedness",
        [](const py::handle& counts, std::int64_t ep_size, const std::string& layers) {
            const LayerSet which = parse_layer_set(layers);
            auto a = config_array<std::int32_t>(counts, "counts", 2);
            return pass_balancedness(
                {a.data(), static_cast<std::size_t>(a.size())}, narrow(a.shape(0), "counts rows"),
                narrow(a.shape(1), "counts columns"), narrow(ep_size, "ep_size"), which);
        },
        py::arg("counts"), py::arg("ep_size"), py::arg("layers") = "all",
        "SGLang's balancedness of one pass from its [L, P] slot counts on ep_size GPUs: the mean "
        "over all layers of (mean + 1e-5) / (max + 1e-5) of the per-GPU sums (layers='active': "
        "over the layers with counts only, NaN when none).");
}

}  // namespace moelb::bindings
