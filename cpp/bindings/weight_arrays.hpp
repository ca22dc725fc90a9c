// Binding helpers for weights in a stored format (moelb/weight_format.hpp): the NumPy dtype of
// each format (ml_dtypes' bfloat16 and float8_e4m3fn), arrays <-> WeightTensor, and views of
// layer memory in the stored dtype.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "arrays.hpp"
#include "moelb/weight_format.hpp"

namespace moelb::bindings {

// The NumPy dtype a format's elements are stored in.
inline py::dtype stored_dtype(WeightFormat format) {
    switch (format) {
        case WeightFormat::kFloat32:
            return py::dtype::of<float>();
        case WeightFormat::kInt8:
            return py::dtype::of<std::int8_t>();
        case WeightFormat::kBFloat16:
            return py::dtype::from_args(py::module_::import("ml_dtypes").attr("bfloat16"));
        case WeightFormat::kFp8E4M3:
            return py::dtype::from_args(py::module_::import("ml_dtypes").attr("float8_e4m3fn"));
    }
    return py::dtype::of<float>();
}

inline std::string dtype_name(const py::dtype& dtype) { return py::str(dtype.attr("name")); }

inline std::string shape_of(const std::vector<Index>& shape) {
    std::string s = "(";
    for (std::size_t i = 0; i < shape.size(); ++i) {
        if (i) s += ", ";
        s += std::to_string(shape[i]);
    }
    if (shape.size() == 1) s += ",";
    return s + ")";
}

// `obj` as a C-contiguous array of shape `shape` and the dtype of `format` (float32: any real
// array, converted; other formats: exactly their dtype), else an InvalidArgument (InvalidDType
// for the dtype) naming `name`, its dtype or shape and the expected one.
inline py::array stored_array(const py::handle& obj, const char* name, WeightFormat format,
                              const std::vector<Index>& shape) {
    const py::dtype want = stored_dtype(format);
    py::array a = as_array(obj, name, dtype_name(want).c_str());
    MOELB_CHECK_ARG(a,
                    name << " must be an array, got " << std::string(py::str(py::type::of(obj))));
    // float32 accepts any real array (converted, as before the formats); the others their dtype.
    const char kind = a.dtype().kind();
    const bool real = kind == 'f' || kind == 'i' || kind == 'u';
    const bool ok_dtype = format == WeightFormat::kFloat32
                              ? real && dtype_name(a.dtype()) != "int8"
                              : dtype_name(a.dtype()) == dtype_name(want);
    if (!ok_dtype) {
        throw InvalidDType(std::string(name) + " has dtype " + dtype_name(a.dtype()) +
                           " but weight_format='" + std::string(to_string(format)) + "' stores " +
                           dtype_name(want));
    }
    if (format == WeightFormat::kFloat32) {
        a = config_array<float>(a, name, static_cast<int>(a.ndim()));
    } else {
        a = py::module_::import("numpy").attr("ascontiguousarray")(a);
    }
    bool ok = a.ndim() == static_cast<py::ssize_t>(shape.size());
    for (std::size_t i = 0; ok && i < shape.size(); ++i) ok = a.shape(i) == shape[i];
    MOELB_CHECK_ARG(ok,
                    name << " has shape " << shape_string(a) << ", expected " << shape_of(shape));
    return a;
}

// A WeightTensor [count, rows, cols] from the stored array `q` (shape `shape`, whose product is
// count * rows * cols) and its scales (`scale`, named `scale_name`: fp8 [..., ceil(rows / br),
// ceil(cols / bc)], int8 [..., rows] with the leading dimensions of `shape`; None otherwise).
inline WeightTensor weight_tensor_arg(const py::handle& q, const py::handle& scale,
                                      const std::string& name, WeightFormat format, BlockSize block,
                                      std::vector<Index> shape) {
    const std::string scale_name = name + "_scale_inv";
    const Index rows = shape[shape.size() - 2], cols = shape[shape.size() - 1];
    Index count = 1;
    for (std::size_t i = 0; i + 2 < shape.size(); ++i) count *= shape[i];
    WeightTensor t(format, count, rows, cols, block);
    const py::array a = stored_array(q, name.c_str(), format, shape);
    std::memcpy(t.bytes().data(), a.data(), t.bytes().size());
    if (!has_scales(format)) {
        MOELB_CHECK_ARG(scale.is_none(), scale_name << " must be None: weight_format='"
                                                    << to_string(format) << "' has no scales");
        return t;
    }
    MOELB_CHECK_ARG(!scale.is_none(), "weight_format='" << to_string(format) << "' needs "
                                                        << scale_name << " (float32 scales)");
    std::vector<Index> scale_shape(shape.begin(), shape.end() - 2);
    scale_shape.push_back(t.scale_rows());
    if (format == WeightFormat::kFp8E4M3) scale_shape.push_back(t.scale_cols());
    auto s = config_array<float>(scale, scale_name.c_str(), static_cast<int>(scale_shape.size()));
    bool ok = true;
    for (std::size_t i = 0; ok && i < scale_shape.size(); ++i) ok = s.shape(i) == scale_shape[i];
    MOELB_CHECK_ARG(ok, scale_name << " has shape " << shape_string(s) << ", expected "
                                   << shape_of(scale_shape) << " (weight_format='"
                                   << to_string(format) << "'"
                                   << (format == WeightFormat::kFp8E4M3
                                           ? ", weight_block_size=(" + std::to_string(block.rows) +
                                                 ", " + std::to_string(block.cols) + ")"
                                           : std::string())
                                   << ")");
    std::memcpy(t.scale_inv().data(), s.data(), t.scale_inv().size() * sizeof(float));
    // Wider scales (float64) must fit float32: a value that overflows, or that underflows to zero
    // or to a subnormal, would silently change the dequantised weights (non-finite values are
    // refused by the layer with their own message).
    if (!py::isinstance<py::array_t<float>>(scale)) {
        const auto wide =
            config_array<double>(scale, scale_name.c_str(), static_cast<int>(scale_shape.size()));
        for (py::ssize_t i = 0; i < wide.size(); ++i) {
            const double d = wide.data()[i];
            const float f = t.scale_inv()[static_cast<std::size_t>(i)];
            const bool fits =
                !std::isfinite(d) || d == 0 ||
                (std::fabs(d) >= std::numeric_limits<float>::min() && std::isfinite(f));
            MOELB_CHECK_ARG(fits, scale_name << " has the value " << d << " at flat index " << i
                                             << ", which float32 cannot hold (it would become " << f
                                             << ")");
        }
    }
    return t;
}

// A NumPy array (a copy) of `bytes` in the stored dtype of `format`, shape `shape`.
inline py::array stored_copy(WeightFormat format, const std::byte* bytes,
                             const std::vector<py::ssize_t>& shape) {
    py::array a(stored_dtype(format), shape);
    std::memcpy(a.mutable_data(), bytes, static_cast<std::size_t>(a.nbytes()));
    return a;
}

// A view of layer memory in the stored dtype, keeping `owner` alive; read-only unless writable.
inline py::array stored_view(WeightFormat format, const void* data,
                             const std::vector<py::ssize_t>& shape, const py::handle& owner,
                             bool writable) {
    py::array a(stored_dtype(format), shape, {}, data, owner);
    if (!writable)
        py::detail::array_proxy(a.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
    return a;
}

inline py::array float_view(const float* data, const std::vector<py::ssize_t>& shape,
                            const py::handle& owner) {
    return py::array_t<float>(shape, data, owner);
}

}  // namespace moelb::bindings
