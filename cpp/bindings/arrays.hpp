// Binding helpers: turn Python arrays into core views with the array-passing rules of STYLE.md.
// Token-sized inputs must already be C-contiguous with the exact dtype (no silent copies);
// config-sized inputs may be converted. Errors name the Python parameter.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <string>

#include "moelb/errors.hpp"
#include "moelb/views.hpp"

namespace moelb::bindings {

namespace py = pybind11;

template <class T>
const char* dtype_name() {
    if constexpr (std::is_same_v<T, float>) return "float32";
    if constexpr (std::is_same_v<T, double>) return "float64";
    if constexpr (std::is_same_v<T, std::int32_t>) return "int32";
    if constexpr (std::is_same_v<T, std::int64_t>) return "int64";
    return "?";
}

inline std::string shape_string(const py::array& a) {
    std::string s = "(";
    for (py::ssize_t i = 0; i < a.ndim(); ++i) {
        if (i) s += ", ";
        s += std::to_string(a.shape(i));
    }
    if (a.ndim() == 1) s += ",";
    return s + ")";
}

// A torch.Tensor (or subclass, e.g. nn.Parameter), recognised without importing torch.
inline bool is_torch_tensor(const py::handle& obj) {
    const py::handle type = py::type::handle_of(obj);
    if (!py::hasattr(type, "__module__")) return false;
    const std::string module = py::str(type.attr("__module__"));
    return (module == "torch" || module.rfind("torch.", 0) == 0) && py::hasattr(obj, "detach") &&
           py::hasattr(obj, "numpy") && py::hasattr(obj, "device") && py::hasattr(obj, "dtype");
}

// The NumPy view of a CPU torch tensor's memory (never a copy: detach() shares the storage, so a
// requires_grad tensor is read as it is). A tensor off the CPU, or of a dtype NumPy cannot hold
// (bfloat16, ...), is an InvalidDType naming `name`, its dtype and `expected`. With
// `convert_float` (small config-sized inputs only) such a floating tensor is converted to float32.
inline py::array torch_tensor_array(const py::handle& obj, const char* name, const char* expected,
                                    bool convert_float = false) {
    const std::string dtype = py::str(obj.attr("dtype"));
    const std::string device = py::str(obj.attr("device").attr("type"));
    if (device != "cpu") {
        throw InvalidDType(std::string(name) + " is a " + dtype + " tensor on device '" + device +
                           "'; moelb reads CPU memory: pass a CPU tensor or NumPy array of " +
                           "dtype " + expected + " (e.g. " + name + ".cpu())");
    }
    py::object tensor = obj.attr("detach")();
    try {
        return py::array::ensure(tensor.attr("numpy")());
    } catch (const py::error_already_set&) {
        // NumPy has no such dtype (bfloat16, float8, ...).
    }
    if (convert_float && py::bool_(tensor.attr("is_floating_point")())) {
        return py::array::ensure(tensor.attr("float")().attr("numpy")());
    }
    throw InvalidDType(std::string(name) + " must have dtype " + expected + ", got " + dtype +
                       ", which NumPy cannot read; convert it first (e.g. " + name +
                       ".float()), at the cost of a copy");
}

// Converts any array-like (NumPy array, CPU torch tensor, ...) without copying when possible; a
// null array when `obj` is not array-like. `expected` names the dtype wanted (for errors).
inline py::array as_array(const py::handle& obj, const char* name, const char* expected = "?",
                          bool convert_float = false) {
    if (is_torch_tensor(obj)) return torch_tensor_array(obj, name, expected, convert_float);
    return py::array::ensure(obj);
}

// Checks that `obj` is a C-contiguous `ndim`-D array of exactly T; never copies. CPU torch
// tensors are read in place (requires_grad ones too).
template <class T>
py::array_t<T> strict_array(const py::handle& obj, const char* name, int ndim) {
    py::array a = as_array(obj, name, dtype_name<T>());
    MOELB_CHECK_ARG(a,
                    name << " must be an array, got " << std::string(py::str(py::type::of(obj))));
    if (!a.dtype().is(py::dtype::of<T>())) {
        throw InvalidDType(std::string(name) + " must have dtype " + dtype_name<T>() + ", got " +
                           std::string(py::str(a.dtype())));
    }
    MOELB_CHECK_ARG(a.ndim() == ndim,
                    name << " must be " << ndim << "-D, got shape " << shape_string(a));
    MOELB_CHECK_ARG(
        a.flags() & py::array::c_style,
        name << " must be C-contiguous (row-major); pass np.ascontiguousarray(" << name << ")");
    return py::reinterpret_borrow<py::array_t<T>>(a);
}

// Converts a small config-sized array-like to a C-contiguous array of T. Integer targets accept
// only integer inputs (a float array of ids is an error, not a silent truncation).
template <class T>
py::array_t<T, py::array::c_style> config_array(const py::handle& obj, const char* name, int ndim) {
    // A C-contiguous NumPy array of exactly T and rank: itself, as the checks below would return
    // it (per-layer calls pay for every microsecond here).
    if (py::isinstance<py::array>(obj)) {
        const auto a = py::reinterpret_borrow<py::array>(obj);
        if (a.dtype().is(py::dtype::of<T>()) && a.ndim() == ndim &&
            (a.flags() & py::array::c_style)) {
            return py::reinterpret_borrow<py::array_t<T, py::array::c_style>>(a);
        }
    }
    py::array a = as_array(obj, name, dtype_name<T>(), !std::is_integral_v<T>);
    MOELB_CHECK_ARG(a,
                    name << " must be an array, got " << std::string(py::str(py::type::of(obj))));
    if constexpr (std::is_integral_v<T>) {
        const char kind = a.dtype().kind();
        if (kind != 'i' && kind != 'u') {
            throw InvalidDType(std::string(name) + " must hold integers, got dtype " +
                               std::string(py::str(a.dtype())));
        }
    } else {
        const char kind = a.dtype().kind();
        if (kind != 'f' && kind != 'i' && kind != 'u') {
            throw InvalidDType(std::string(name) + " must hold numbers, got dtype " +
                               std::string(py::str(a.dtype())));
        }
    }
    MOELB_CHECK_ARG(a.ndim() == ndim,
                    name << " must be " << ndim << "-D, got shape " << shape_string(a));
    if constexpr (std::is_integral_v<T>) {
        // Range check before narrowing so 2**40 is an error, not a wrapped id (and a uint64
        // above 2**63 - 1 is checked before it could wrap to a negative int64).
        if (a.dtype().kind() == 'u' && a.dtype().itemsize() == 8) {
            py::array_t<std::uint64_t, py::array::c_style | py::array::forcecast> u(a);
            for (py::ssize_t i = 0; i < u.size(); ++i) {
                MOELB_CHECK_ARG(
                    u.data()[i] <= static_cast<std::uint64_t>(std::numeric_limits<T>::max()),
                    name << " holds " << u.data()[i] << ", which does not fit in "
                         << dtype_name<T>());
            }
        }
        py::array_t<std::int64_t, py::array::c_style | py::array::forcecast> wide(a);
        const std::int64_t* p = wide.data();
        for (py::ssize_t i = 0; i < wide.size(); ++i) {
            MOELB_CHECK_ARG(
                p[i] >= std::numeric_limits<T>::min() && p[i] <= std::numeric_limits<T>::max(),
                name << " holds " << p[i] << ", which does not fit in " << dtype_name<T>());
        }
    }
    return py::array_t<T, py::array::c_style | py::array::forcecast>(a);
}

// Python ints arrive as int64 and are narrowed here, so an out-of-range value is an
// InvalidArgument naming the parameter rather than pybind11's "incompatible arguments".
inline int narrow(std::int64_t value, const char* name) {
    MOELB_CHECK_ARG(
        value >= std::numeric_limits<int>::min() && value <= std::numeric_limits<int>::max(),
        name << "=" << value << " does not fit in a 32-bit integer");
    return static_cast<int>(value);
}

inline std::optional<int> narrow(std::optional<std::int64_t> value, const char* name) {
    if (!value) return std::nullopt;
    return narrow(*value, name);
}

template <class T, int Flags>
ConstMatrixMap<T> const_matrix(const py::array_t<T, Flags>& a) {
    return ConstMatrixMap<T>(a.data(), a.shape(0), a.shape(1));
}

template <class T, int Flags>
MatrixMap<T> mutable_matrix(py::array_t<T, Flags>& a) {
    return MatrixMap<T>(a.mutable_data(), a.shape(0), a.shape(1));
}

// A new C-contiguous [rows, cols] array.
template <class T>
py::array_t<T> new_matrix(Index rows, Index cols) {
    return py::array_t<T>({static_cast<py::ssize_t>(rows), static_cast<py::ssize_t>(cols)});
}

// A read-only NumPy view of memory owned by `owner` (kept alive by the view).
template <class T>
py::array readonly_view(const T* data, std::vector<py::ssize_t> shape, const py::handle& owner) {
    py::array_t<T> a(std::move(shape), data, owner);
    py::detail::array_proxy(a.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
    return a;
}

}  // namespace moelb::bindings
