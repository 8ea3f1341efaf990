// Reading and writing the saved-cache format (docs/formats.md, "Saved cache"): the byte
// writer and the bounds-checked reader one section's payload goes through. Internal.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <iosfwd>
#include <memory>
#include <string>
#include <string_view>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "check.h"
#include "kvslim/cache/config.h"
#include "kvslim/cache/memory.h"
#include "kvslim/error.h"

namespace kvslim {
class Codebooks;
class TokenStore;
namespace kernels {
struct KernelTable;
}
}  // namespace kvslim

namespace kvslim::detail {

class RopeTable;

static_assert(std::endian::native == std::endian::little,
              "the saved-cache format is little-endian and is written by copying bytes");

/// Appends little-endian fields to a byte string.
class StateWriter {
 public:
  template <class T>
  void put(T v) {
    static_assert(std::is_arithmetic_v<T>);
    const auto* p = reinterpret_cast<const char*>(&v);
    buf_.append(p, sizeof(T));
  }
  void put_bool(bool b) { put<std::uint8_t>(b ? 1 : 0); }
  void put_raw(const void* p, std::size_t n) {
    if (n) buf_.append(static_cast<const char*>(p), n);
  }
  /// A count, then the elements.
  template <class T>
  void put_array(const T* p, std::size_t n) {
    put<std::uint64_t>(n);
    put_raw(p, n * sizeof(T));
  }
  void put_str(std::string_view s) { put_array(s.data(), s.size()); }
  std::string& bytes() noexcept { return buf_; }

 private:
  std::string buf_;
};

/// Reads one section's payload. Every read is bounds-checked; a short or inconsistent
/// payload throws Error(kFormat) naming the section and what was being read, so a corrupted
/// file is reported, never read past.
class StateReader {
 public:
  StateReader(const std::byte* p, std::size_t n, std::string section) : p_(p), n_(n), section_(std::move(section)) {}

  template <class T>
  T get(const char* what) {
    static_assert(std::is_arithmetic_v<T>);
    need(sizeof(T), what);
    T v;
    std::memcpy(&v, p_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }
  bool get_bool(const char* what) {
    const auto b = get<std::uint8_t>(what);
    check(b <= 1, what, "a flag must be 0 or 1, got {}", b);
    return b == 1;
  }
  /// A count written by put_array, checked against `max` elements and against the bytes
  /// left, so a corrupted count cannot make the reader allocate more than the file holds.
  template <class T>
  std::size_t get_count(const char* what, std::uint64_t max) {
    const auto n = get<std::uint64_t>(what);
    check(n <= max, what, "count {} is larger than {}", n, max);
    need(n * sizeof(T), what);
    return static_cast<std::size_t>(n);
  }
  /// Reads put_array's elements into `out` (resized).
  template <class V>
  void get_array(V& out, const char* what, std::uint64_t max) {
    using T = typename V::value_type;
    const std::size_t n = get_count<T>(what, max);
    out.resize(n);
    get_raw(out.data(), n * sizeof(T), what);
  }
  /// Exactly `n` elements (a count written by put_array that must equal n).
  template <class V>
  void get_exact(V& out, std::uint64_t n, const char* what) {
    using T = typename V::value_type;
    const auto got = get<std::uint64_t>(what);
    check(got == n, what, "holds {} values, expected {}", got, n);
    need(n * sizeof(T), what);
    out.resize(static_cast<std::size_t>(n));
    get_raw(out.data(), static_cast<std::size_t>(n) * sizeof(T), what);
  }
  std::string get_str(const char* what, std::uint64_t max = 1u << 20) {
    std::string s;
    get_array(s, what, max);
    return s;
  }
  void get_raw(void* out, std::size_t n, const char* what) {
    need(n, what);
    if (n) std::memcpy(out, p_ + pos_, n);
    pos_ += n;
  }
  bool done() const noexcept { return pos_ == n_; }
  void expect_end() {
    check(pos_ == n_, "the end of the section", "{} bytes are left over after the last field", n_ - pos_);
  }
  const std::string& section() const noexcept { return section_; }

  /// Throws Error(kFormat) "saved cache: section S: <what>: <message>" unless ok.
  template <class... Args>
  void check(bool ok, const char* what, fmt::format_string<Args...> f, Args&&... args) const {
    if (!ok)
      throw Error(ErrorCode::kFormat, fmt::format("saved cache: section {}: {}: {}", section_, what,
                                                  fmt::format(f, std::forward<Args>(args)...)));
  }

 private:
  void need(std::uint64_t bytes, const char* what) const {
    check(bytes <= n_ - pos_, what, "needs {} bytes but the section has {} left (truncated or corrupted)", bytes,
          n_ - pos_);
  }
  const std::byte* p_;
  std::size_t n_;
  std::size_t pos_ = 0;
  std::string section_;
};

/// MiniCache direction pages both layers of a pair reference: written once, in the SHARED
/// section, and referenced from the pages by index.
using SharedBytes = std::vector<std::byte, TrackedAllocator<std::byte>>;
struct SharedPages {
  std::vector<const SharedBytes*> saved;                   // save: in index order
  std::unordered_map<const SharedBytes*, std::uint32_t> index;  // save: page -> index
  std::vector<std::shared_ptr<const SharedBytes>> loaded;  // load: the pages read
  std::uint32_t index_of(const SharedBytes* p) {
    const auto [it, added] = index.try_emplace(p, static_cast<std::uint32_t>(saved.size()));
    if (added) saved.push_back(p);
    return it->second;
  }
};

/// What a store's saved state is checked against when it is loaded.
struct StoreLimits {
  std::int64_t max_tokens = 0;  // CacheConfig::max_tokens
  bool finite_rows = true;      // full-precision rows must be finite (NonFinitePolicy::kReject)
};

/// What KVCache::save / load read and replace (KVCache::Impl's parts).
struct CacheParts {
  const CacheConfig& cfg;
  const kernels::KernelTable& kt;
  std::vector<TokenStore*, TrackedAllocator<TokenStore*>>& stores;  // [layer * kv_heads + head]
  ByteCounter& shared;
  const std::vector<std::pair<std::string, std::shared_ptr<const Codebooks>>>& codebooks;
  const RopeTable* rope;  // or null
};
/// Writes the saved-cache format (the caller flushed first). Throws Error(kIo).
void save_cache(const CacheParts& c, std::ostream& os);
/// Reads and checks a saved cache, then swaps new stores into c.stores (only if everything
/// passed). Throws Error(kFormat / kVersion / kMismatch / kIo).
void load_cache(CacheParts& c, std::istream& is);

}  // namespace kvslim::detail
