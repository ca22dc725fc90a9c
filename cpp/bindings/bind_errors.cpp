#include "bindings.hpp"
#include "moelb/errors.hpp"

namespace moelb::bindings {

namespace py = pybind11;

void bind_errors(py::module_& m) {
    // The Python classes live for the whole process (module state is never torn down before
    // the interpreter), so raw owned references are fine here.
    static PyObject* error = PyErr_NewExceptionWithDoc(
        "moelb._core.Error", "An internal invariant of moelb broke (a bug; please report it).",
        PyExc_RuntimeError, nullptr);
    static PyObject* invalid_argument = PyErr_NewExceptionWithDoc(
        "moelb._core.InvalidArgumentError",
        "Bad input to moelb: the message names the parameter and the offending value.",
        PyExc_ValueError, nullptr);
    static PyObject* invalid_dtype = [] {
        py::tuple bases = py::make_tuple(py::handle(invalid_argument), py::handle(PyExc_TypeError));
        return PyErr_NewExceptionWithDoc(
            "moelb._core.InvalidDTypeError",
            "An array argument has the wrong dtype (both an InvalidArgumentError and a TypeError).",
            bases.ptr(), nullptr);
    }();
    if (!error || !invalid_argument || !invalid_dtype) throw py::error_already_set();
    m.add_object("Error", py::handle(error).inc_ref());
    m.add_object("InvalidArgumentError", py::handle(invalid_argument).inc_ref());
    m.add_object("InvalidDTypeError", py::handle(invalid_dtype).inc_ref());

    py::register_exception_translator([](std::exception_ptr p) {
        if (!p) return;
        try {
            std::rethrow_exception(p);
        } catch (const InvalidDType& e) {
            PyErr_SetString(invalid_dtype, e.what());
        } catch (const InvalidArgument& e) {
            PyErr_SetString(invalid_argument, e.what());
        } catch (const Error& e) {
            PyErr_SetString(error, e.what());
        }
    });
}

}  // namespace moelb::bindings
