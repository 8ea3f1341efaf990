// Memory honesty. This binary replaces global operator new/delete to count live heap bytes:
// - stats().total_bytes equals, byte for byte, the heap the cache grew by after
//   construction (pages, window, positions, everything), through appends, sealing and reset;
// - attend() allocates no dequantized copy of the cache: after one warm-up call, the peak
//   extra heap during further calls is zero, and even the first call needs only
//   O(q rows x (head_dim + page)) scratch, far below one decoded head.
#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <new>
#include <random>

#include "kvslim/kvslim.h"

namespace {
std::atomic<long long> g_live{0}, g_peak{0};
constexpr std::size_t kHeader = 16;  // we store the size in front of each block

void* counted_alloc(std::size_t n, std::size_t align) {
  align = std::max(align, kHeader);
  void* raw = std::aligned_alloc(align, ((n + align + align - 1) / align) * align);
  if (!raw) throw std::bad_alloc();
  char* user = static_cast<char*>(raw) + align;
  reinterpret_cast<std::size_t*>(user)[-1] = n;
  reinterpret_cast<std::size_t*>(user)[-2] = align;
  const long long live = g_live.fetch_add(static_cast<long long>(n)) + static_cast<long long>(n);
  long long p = g_peak.load();
  while (live > p && !g_peak.compare_exchange_weak(p, live)) {
  }
  return user;
}
void counted_free(void* p) noexcept {
  if (!p) return;
  char* user = static_cast<char*>(p);
  const std::size_t n = reinterpret_cast<std::size_t*>(user)[-1];
  const std::size_t align = reinterpret_cast<std::size_t*>(user)[-2];
  g_live.fetch_sub(static_cast<long long>(n));
  std::free(user - align);
}
}  // namespace

void* operator new(std::size_t n) { return counted_alloc(n, 16); }
void* operator new[](std::size_t n) { return counted_alloc(n, 16); }
void* operator new(std::size_t n, std::align_val_t a) { return counted_alloc(n, static_cast<std::size_t>(a)); }
void* operator new[](std::size_t n, std::align_val_t a) { return counted_alloc(n, static_cast<std::size_t>(a)); }
// The nothrow forms too (std::stable_sort's temporary buffer uses them): a block from the
// default allocator freed through counted_free would read a header that is not there.
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
  try {
    return counted_alloc(n, 16);
  } catch (...) {
    return nullptr;
  }
}
void* operator new[](std::size_t n, const std::nothrow_t& t) noexcept { return operator new(n, t); }
void* operator new(std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
  try {
    return counted_alloc(n, static_cast<std::size_t>(a));
  } catch (...) {
    return nullptr;
  }
}
void* operator new[](std::size_t n, std::align_val_t a, const std::nothrow_t& t) noexcept {
  return operator new(n, a, t);
}
void operator delete(void* p, const std::nothrow_t&) noexcept { counted_free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { counted_free(p); }
void operator delete(void* p, std::align_val_t, const std::nothrow_t&) noexcept { counted_free(p); }
void operator delete[](void* p, std::align_val_t, const std::nothrow_t&) noexcept { counted_free(p); }
void operator delete(void* p) noexcept { counted_free(p); }
void operator delete[](void* p) noexcept { counted_free(p); }
void operator delete(void* p, std::size_t) noexcept { counted_free(p); }
void operator delete[](void* p, std::size_t) noexcept { counted_free(p); }
void operator delete(void* p, std::align_val_t) noexcept { counted_free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { counted_free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { counted_free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { counted_free(p); }

using namespace kvslim;

namespace {
std::vector<float> random_rows(std::size_t n, unsigned seed) {
  std::vector<float> v(n);
  std::mt19937 rng(seed);
  std::normal_distribution<float> d;
  for (auto& x : v) x = d(rng);
  return v;
}
}  // namespace

TEST(Memory, StatsEqualHeapGrowthExactly) {
  for (const char* recipe : {"f32", "f16", "kivi:kbits=2,vbits=2,group=32,residual=64",
                             "kivi:kbits=3,vbits=4,group=16,residual=0,sinks=2 ; [layers=1] bf16",
                             "kvmerger:budget=64,recent=16,threshold=0 | f16",
                             "kivi:kbits=4,vbits=4,group=16,residual=8 ; [layers=1] minicache:retain=0.1 | "
                             "kivi:kbits=4,vbits=4,group=16,residual=8"}) {
    const int L = 2, H = 2, d = 24, T = 310;
    const auto data = random_rows(static_cast<std::size_t>(H) * T * d, 1);
    KVCache cache(CacheConfig{L, 4, H, d, 1000, recipe});
    // Everything allocated from here on must show up in stats() — and nothing else may.
    const long long base = g_live.load() - cache.stats().total_bytes;
    auto check = [&](const char* when) {
      const CacheStats st = cache.stats();  // stats() itself allocates a vector: measure first
      const long long live = g_live.load();
      // The CacheStats object holds one vector of L*H HeadStats.
      const long long stats_vec = static_cast<long long>(st.heads.capacity() * sizeof(HeadStats));
      EXPECT_EQ(live - stats_vec - base, st.total_bytes) << recipe << " " << when;
    };
    check("empty");
    int t = 0;
    for (int n : {1, 1, 5, 40, 1, 120, 1, 1, 31, 100}) {
      Layout l;
      l.rank = 3;
      l.shape = {H, n, d, 0};
      l.strides = {static_cast<std::int64_t>(T) * d, d, 1, 0};
      for (int layer = 0; layer < L; ++layer) {
        TensorView<const float> v(data.data() + static_cast<std::size_t>(t) * d, l);
        cache.append(layer, v, v);
      }
      t += n;
      check("after append");
    }
    EXPECT_GT(cache.stats().total_bytes, 0);
    cache.reset();
    check("after reset");
    // After reset only the fixed per-cache bookkeeping remains.
    EXPECT_EQ(cache.stats().total_bytes, cache.stats().shared_bytes) << recipe;
  }
}

TEST(Memory, AttendAllocatesNoDequantizedCopy) {
  const int H = 2, QH = 8, d = 128, T = 2048;
  const auto data = random_rows(static_cast<std::size_t>(H) * T * d, 2);
  const auto q = random_rows(static_cast<std::size_t>(QH) * d, 3);
  std::vector<float> out(static_cast<std::size_t>(QH) * d);
  for (const char* recipe : {"f16", "kivi:kbits=2,vbits=2,residual=128"}) {
    KVCache cache(CacheConfig{1, QH, H, d, T + 1, recipe});
    cache.append(0, TensorView<const float>(data.data(), {H, T, d}), TensorView<const float>(data.data(), {H, T, d}));
    cache.append(0, TensorView<const float>(data.data(), {H, 1, d}), TensorView<const float>(data.data(), {H, 1, d}));
    const TensorView<const float> qv(q.data(), {QH, 1, d});
    const TensorView<float> ov(out.data(), {QH, 1, d});
    // First call: scratch for 4 rows x (d + a 64-token block) floats, plus bookkeeping.
    long long before = g_live.load();
    g_peak.store(before);
    cache.attend(0, qv, ov);
    const long long first = g_peak.load() - before;
    EXPECT_LT(first, 64 * 1024) << recipe << ": first attend allocated " << first << " bytes";
    const long long decoded_head = static_cast<long long>(T) * d * 4 * 2;  // one head's K and V in f32
    EXPECT_LT(first * 20, decoded_head);
    // Steady state: not a byte.
    before = g_live.load();
    g_peak.store(before);
    for (int i = 0; i < 3; ++i) cache.attend(0, qv, ov);
    EXPECT_EQ(g_peak.load() - before, 0) << recipe;
  }
}
