// The byte-counting Workspace of the MoE layer forward (DESIGN section 6): aligned buffers that
// add their bytes to the workspace's live count while they exist, so the forward can report its
// peak memory (MoEForwardStats::peak_bytes).
#include <algorithm>
#include <cstdint>
#include <new>
#include <utility>

#include "moelb/moe_layer.hpp"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace moelb {

template <class T>
Workspace::Buffer<T>::Buffer(Workspace* owner, Index count, std::string name)
    : owner_(owner), size_(count), name_(std::move(name)) {
    const std::size_t bytes = static_cast<std::size_t>(std::max<Index>(count, 1)) * sizeof(T);
    const std::size_t alignment = bytes >= kHugeBufferBytes ? kHugePageBytes : kAlignment;
    void* p = ::operator new[](bytes, std::align_val_t{alignment});
#ifdef MADV_HUGEPAGE
    if (alignment == kHugePageBytes) madvise(p, bytes, MADV_HUGEPAGE);  // a hint; may fail
#endif
    data_ = std::unique_ptr<T[], Free>(static_cast<T*>(p), Free{alignment});
    owner_->add(count * static_cast<Index>(sizeof(T)));
}

template <class T>
Workspace::Buffer<T>::Buffer(Buffer&& other) noexcept
    : owner_(std::exchange(other.owner_, nullptr)),
      data_(std::move(other.data_)),
      size_(std::exchange(other.size_, 0)),
      name_(std::move(other.name_)) {}

template <class T>
Workspace::Buffer<T>& Workspace::Buffer<T>::operator=(Buffer&& other) noexcept {
    if (this != &other) {
        release();
        owner_ = std::exchange(other.owner_, nullptr);
        data_ = std::move(other.data_);
        size_ = std::exchange(other.size_, 0);
        name_ = std::move(other.name_);
    }
    return *this;
}

template <class T>
void Workspace::Buffer<T>::release() {
    if (owner_) owner_->remove(size_ * static_cast<Index>(sizeof(T)));
    owner_ = nullptr;
    data_.reset();
    size_ = 0;
}

template class Workspace::Buffer<float>;
template class Workspace::Buffer<std::int32_t>;
template class Workspace::Buffer<std::uint16_t>;

}  // namespace moelb
