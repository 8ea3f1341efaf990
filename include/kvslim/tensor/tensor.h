// TensorView (non-owning, shape + strides) and Tensor (owning, 64-byte aligned).
//
// Engines hand keys, values and queries to kvslim as views, in whatever layout they keep
// them, without copying. A cache call always sees the *logical* layout
// [heads][tokens][head_dim]; an engine that stores [tokens][heads][head_dim] builds the view
// with permuted strides:
//
//   // engine buffer: float kbuf[tokens][kv_heads][head_dim]
//   auto k = kvslim::TensorView<const float>::tokens_heads_dim(kbuf, tokens, kv_heads, head_dim);
//   cache.append(layer, k, v);
//
// Strides are in elements. The innermost (head_dim) stride must be 1; other strides are free.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <new>
#include <string>
#include <type_traits>
#include <utility>

namespace kvslim {

/// Maximum tensor rank supported by views.
inline constexpr int kMaxRank = 4;

/// Shape and strides (elements) of up to kMaxRank dimensions.
struct Layout {
  int rank = 0;
  std::array<std::int64_t, kMaxRank> shape{};
  std::array<std::int64_t, kMaxRank> strides{};

  std::int64_t numel() const noexcept {
    std::int64_t n = 1;
    for (int i = 0; i < rank; ++i) n *= shape[i];
    return n;
  }
  /// Row-major contiguous layout for the given shape.
  static Layout contiguous(std::initializer_list<std::int64_t> dims) noexcept {
    Layout l;
    l.rank = static_cast<int>(dims.size());
    int i = 0;
    for (auto d : dims) l.shape[i++] = d;
    std::int64_t s = 1;
    for (int j = l.rank - 1; j >= 0; --j) {
      l.strides[j] = s;
      s *= l.shape[j];
    }
    return l;
  }
  /// "[2, 5, 8] strides [40, 8, 1]" for error messages.
  std::string describe() const;
};

/// Non-owning strided view of T (T may be const-qualified).
template <class T>
class TensorView {
 public:
  TensorView() = default;
  TensorView(T* data, const Layout& layout) noexcept : data_(data), layout_(layout) {}
  /// Contiguous row-major view.
  TensorView(T* data, std::initializer_list<std::int64_t> dims) noexcept
      : data_(data), layout_(Layout::contiguous(dims)) {}
  /// A mutable view converts to a const view.
  template <class U, class = std::enable_if_t<std::is_same_v<const U, T> && !std::is_same_v<U, T>>>
  TensorView(const TensorView<U>& other) noexcept : data_(other.data()), layout_(other.layout()) {}

  /// Logical [heads][tokens][dim] over a buffer laid out [heads][tokens][dim].
  static TensorView heads_tokens_dim(T* data, std::int64_t heads, std::int64_t tokens, std::int64_t dim) noexcept {
    return TensorView(data, {heads, tokens, dim});
  }
  /// Logical [heads][tokens][dim] over a buffer laid out [tokens][heads][dim].
  static TensorView tokens_heads_dim(T* data, std::int64_t tokens, std::int64_t heads, std::int64_t dim) noexcept {
    Layout l;
    l.rank = 3;
    l.shape = {heads, tokens, dim, 0};
    l.strides = {dim, heads * dim, 1, 0};
    return TensorView(data, l);
  }

  T* data() const noexcept { return data_; }
  const Layout& layout() const noexcept { return layout_; }
  int rank() const noexcept { return layout_.rank; }
  std::int64_t dim(int i) const noexcept { return layout_.shape[i]; }
  std::int64_t stride(int i) const noexcept { return layout_.strides[i]; }
  std::int64_t numel() const noexcept { return layout_.numel(); }
  bool empty() const noexcept { return data_ == nullptr; }

  T& operator()(std::int64_t i) const noexcept { return data_[i * layout_.strides[0]]; }
  T& operator()(std::int64_t i, std::int64_t j) const noexcept {
    return data_[i * layout_.strides[0] + j * layout_.strides[1]];
  }
  T& operator()(std::int64_t i, std::int64_t j, std::int64_t k) const noexcept {
    return data_[i * layout_.strides[0] + j * layout_.strides[1] + k * layout_.strides[2]];
  }
  /// Pointer to the start of row (i, j) of a rank-3 view (innermost dimension contiguous).
  T* row(std::int64_t i, std::int64_t j) const noexcept {
    return data_ + i * layout_.strides[0] + j * layout_.strides[1];
  }

 private:
  T* data_ = nullptr;
  Layout layout_{};
};

namespace detail {
void* aligned_alloc_bytes(std::size_t bytes);  // 64-byte aligned, throws std::bad_alloc
void aligned_free_bytes(void* p) noexcept;
}  // namespace detail

/// Owning, row-major contiguous, 64-byte aligned tensor of trivially copyable T.
template <class T>
class Tensor {
  static_assert(std::is_trivially_copyable_v<T>);

 public:
  static constexpr std::size_t kAlignment = 64;

  Tensor() = default;
  explicit Tensor(std::initializer_list<std::int64_t> dims) : layout_(Layout::contiguous(dims)) {
    allocate();
  }
  explicit Tensor(const Layout& contiguous_layout) : layout_(contiguous_layout) { allocate(); }
  Tensor(const Tensor& o) : layout_(o.layout_) {
    allocate();
    if (o.data_ && layout_.numel() > 0) std::memcpy(data_, o.data_, bytes());
  }
  Tensor& operator=(const Tensor& o) {
    if (this != &o) {
      Tensor tmp(o);
      swap(tmp);
    }
    return *this;
  }
  Tensor(Tensor&& o) noexcept : data_(std::exchange(o.data_, nullptr)), layout_(o.layout_) {}
  Tensor& operator=(Tensor&& o) noexcept {
    Tensor tmp(std::move(o));
    swap(tmp);
    return *this;
  }
  ~Tensor() { detail::aligned_free_bytes(data_); }

  void swap(Tensor& o) noexcept {
    std::swap(data_, o.data_);
    std::swap(layout_, o.layout_);
  }

  T* data() noexcept { return data_; }
  const T* data() const noexcept { return data_; }
  const Layout& layout() const noexcept { return layout_; }
  std::int64_t numel() const noexcept { return layout_.numel(); }
  std::int64_t dim(int i) const noexcept { return layout_.shape[i]; }
  std::size_t bytes() const noexcept { return static_cast<std::size_t>(numel()) * sizeof(T); }
  T& operator[](std::int64_t i) noexcept { return data_[i]; }
  const T& operator[](std::int64_t i) const noexcept { return data_[i]; }

  TensorView<T> view() noexcept { return TensorView<T>(data_, layout_); }
  TensorView<const T> view() const noexcept { return TensorView<const T>(data_, layout_); }
  TensorView<const T> cview() const noexcept { return TensorView<const T>(data_, layout_); }

 private:
  void allocate() {
    const std::size_t n = bytes();
    data_ = n ? static_cast<T*>(detail::aligned_alloc_bytes(n)) : nullptr;
    if (n) std::memset(static_cast<void*>(data_), 0, n);
  }
  T* data_ = nullptr;
  Layout layout_{};
};

}  // namespace kvslim
