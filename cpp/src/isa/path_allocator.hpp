// Private to the per-ISA translation units (isa/kernels.hpp): std::allocator under a name of the
// including path's namespace, so that the member functions of std::vector<T, PathAllocator<T>>
// (inline, emitted in each object file) carry the path's tag and cannot be merged by the linker
// with another path's copy (cmake/check_isa_symbols.cmake checks the tags).
#pragma once

#include <memory>
#include <vector>

namespace moelb::MOELB_ISA_NS {
namespace {

template <class T>
struct PathAllocator : std::allocator<T> {
    PathAllocator() noexcept = default;
    template <class U>
    PathAllocator(const PathAllocator<U>&) noexcept {}  // NOLINT(google-explicit-constructor)
};
template <class T>
using Vector = std::vector<T, PathAllocator<T>>;

}  // namespace
}  // namespace moelb::MOELB_ISA_NS
