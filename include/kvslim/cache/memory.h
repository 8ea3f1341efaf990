// Byte accounting. Every allocation a cache makes goes through a TrackedAllocator bound to a
// ByteCounter, so stats() reports bytes actually handed out by the allocator — pages, the
// full-precision window, position runs, scores — not a formula.
#pragma once

#include <cstddef>
#include <cstdint>
#include <new>

namespace kvslim {

/// Live bytes allocated through allocators bound to this counter.
struct ByteCounter {
  std::int64_t bytes = 0;
};

/// std-compatible allocator that adds to / subtracts from a ByteCounter.
template <class T>
class TrackedAllocator {
 public:
  using value_type = T;
  explicit TrackedAllocator(ByteCounter* counter) noexcept : counter_(counter) {}
  template <class U>
  TrackedAllocator(const TrackedAllocator<U>& o) noexcept : counter_(o.counter()) {}

  T* allocate(std::size_t n) {
    T* p = static_cast<T*>(::operator new(n * sizeof(T)));
    counter_->bytes += static_cast<std::int64_t>(n * sizeof(T));
    return p;
  }
  void deallocate(T* p, std::size_t n) noexcept {
    counter_->bytes -= static_cast<std::int64_t>(n * sizeof(T));
    ::operator delete(p);
  }
  ByteCounter* counter() const noexcept { return counter_; }
  template <class U>
  bool operator==(const TrackedAllocator<U>& o) const noexcept { return counter_ == o.counter(); }

  // Containers keep their counter when copied/moved/swapped.
  using propagate_on_container_copy_assignment = std::true_type;
  using propagate_on_container_move_assignment = std::true_type;
  using propagate_on_container_swap = std::true_type;

 private:
  ByteCounter* counter_;
};

}  // namespace kvslim
