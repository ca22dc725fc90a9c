#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "arrays.hpp"
#include "bindings.hpp"
#include "moelb/weight_format.hpp"
#include "weight_arrays.hpp"

namespace moelb::bindings {

void bind_weight_format(py::module_& m) {
    m.def(
        "quantize_weights",
        [](const py::handle& array, const std::string& weight_format,
           std::vector<std::int64_t> block_size) -> py::tuple {
            const WeightFormat format = parse_weight_format(weight_format);
            MOELB_CHECK_ARG(block_size.size() == 2, "block_size must be (rows, cols), got "
                                                        << block_size.size() << " values");
            const BlockSize block{block_size[0], block_size[1]};
            MOELB_CHECK_ARG(block.rows >= 1 && block.cols >= 1, "block_size must be positive, got ("
                                                                    << block.rows << ", "
                                                                    << block.cols << ")");
            py::array probe = as_array(array, "array", "float32", true);
            MOELB_CHECK_ARG(
                probe, "array must be an array, got " << std::string(py::str(py::type::of(array))));
            MOELB_CHECK_ARG(probe.ndim() >= 2,
                            "array must be at least 2-D ([..., rows, cols]), "
                            "got shape "
                                << shape_string(probe));
            auto a = config_array<float>(probe, "array", static_cast<int>(probe.ndim()));
            std::vector<py::ssize_t> shape(a.shape(), a.shape() + a.ndim());
            const Index rows = shape[shape.size() - 2], cols = shape.back();
            Index count = 1;
            for (std::size_t i = 0; i + 2 < shape.size(); ++i) count *= shape[i];
            WeightTensor t;
            {
                const std::span<const float> values(a.data(), static_cast<std::size_t>(a.size()));
                py::gil_scoped_release release;
                t = WeightTensor::quantize(values, format, count, rows, cols, block, "array");
            }
            py::array q = stored_copy(format, t.bytes().data(), shape);
            if (!has_scales(format)) return py::make_tuple(q, py::none());
            std::vector<py::ssize_t> scale_shape(shape.begin(), shape.end() - 2);
            scale_shape.push_back(t.scale_rows());
            if (format == WeightFormat::kFp8E4M3) scale_shape.push_back(t.scale_cols());
            py::array_t<float> s(scale_shape);
            std::memcpy(s.mutable_data(), t.scale_inv().data(),
                        t.scale_inv().size() * sizeof(float));
            return py::make_tuple(q, s);
        },
        py::arg("array"), py::arg("weight_format"), py::arg("block_size"));
}

}  // namespace moelb::bindings
