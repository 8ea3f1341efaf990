#include <cstdlib>
#include <new>

#include "check.h"
#include "kvslim/tensor/tensor.h"

namespace kvslim {

std::string Layout::describe() const {
  std::string s = "[";
  for (int i = 0; i < rank; ++i) s += fmt::format("{}{}", i ? ", " : "", shape[i]);
  s += "] strides [";
  for (int i = 0; i < rank; ++i) s += fmt::format("{}{}", i ? ", " : "", strides[i]);
  return s + "]";
}

namespace detail {
void* aligned_alloc_bytes(std::size_t bytes) {
  return ::operator new(bytes, std::align_val_t{64});
}
void aligned_free_bytes(void* p) noexcept {
  if (p) ::operator delete(p, std::align_val_t{64});
}
}  // namespace detail

}  // namespace kvslim
