// End-to-end attention through KVCache on every ISA, and CacheConfig::threads.
// - A cache built under each available ISA (kvslim::set_active_isa before construction:
//   the cache binds its kernel table then) attends like one built under the scalar ISA,
//   over sinks, sealed pages, the residual window and a causal prefill chunk, at head_dims
//   with and without specialized kernels. Tolerances on the relative L2 error of every
//   query head's output:
//     f32/f16/bf16  1e-5: the pages hold the same bits; only float reassociation in dot
//                   products (a few ulp) and the vector exp (< 5e-7 relative) differ;
//     kivi          1e-3: the codes are bit-identical across ISAs, but AVX-512 with VNNI
//                   rounds the scale-folded query and the value weights to 16 bits
//                   (2^-16 of their ranges, see kernels_test.cpp), which moves outputs by
//                   ~1e-5..1e-4 relative; the tolerance leaves an order of magnitude.
//   Attention mass (used by score-based eviction) is compared the same way.
// - threads > 1 gives bit-identical results to threads = 1 (heads are independent and run
//   the same kernels), attend() allocates nothing in steady state with a worker pool, two
//   threads may attend to different layers of a pooled cache at once, and threads outside
//   [1, 256] is an Error(kInvalidArgument) naming the value.
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <new>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "kvslim/kvslim.h"
#include "test_support.h"

// Allocation counting for the steady-state test: every operator new of this binary. (The
// helpers are not inlined so that the compiler does not pair `new` with `free`.)
namespace {
std::atomic<long long> g_news{0};
[[gnu::noinline]] void* counted_alloc(std::size_t n) {
  g_news.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
[[gnu::noinline]] void counted_free(void* p) noexcept { std::free(p); }
}  // namespace
void* operator new(std::size_t n) { return counted_alloc(n); }
void* operator new[](std::size_t n) { return counted_alloc(n); }
void operator delete(void* p) noexcept { counted_free(p); }
void operator delete[](void* p) noexcept { counted_free(p); }
void operator delete(void* p, std::size_t) noexcept { counted_free(p); }
void operator delete[](void* p, std::size_t) noexcept { counted_free(p); }

using namespace kvslim;
using kvslim::test::ref_attention;
using kvslim::test::rel_l2;

namespace {

struct Seq {
  int kvh, qh, d, T;
  std::vector<float> k, v, q;  // k, v [kvh][T][d]; q [qh][T][d]
  Seq(int kvh_, int qh_, int d_, int T_, unsigned seed) : kvh(kvh_), qh(qh_), d(d_), T(T_) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> n;
    k.resize(static_cast<std::size_t>(kvh) * T * d);
    v.resize(k.size());
    q.resize(static_cast<std::size_t>(qh) * T * d);
    for (auto& x : k) x = n(rng);
    for (auto& x : v) x = n(rng);
    for (auto& x : q) x = 2.0f * n(rng);
  }
  template <class T_>
  TensorView<T_> view(T_* buf, int heads, int t0, int n) const {
    Layout l;
    l.rank = 3;
    l.shape = {heads, n, d, 0};
    l.strides = {static_cast<std::int64_t>(T) * d, d, 1, 0};
    return TensorView<T_>(buf + static_cast<std::size_t>(t0) * d, l);
  }
};

struct Outputs {
  std::vector<float> out;   // [qh][T][d]
  std::vector<float> mass;  // [chunks][kvh][T]
};

// Feeds the sequence in the given chunks, attending after each; returns all outputs.
Outputs run(const Seq& s, const CacheConfig& cfg, const std::vector<int>& chunks, bool with_mass) {
  KVCache cache(cfg);
  Outputs r;
  r.out.assign(static_cast<std::size_t>(s.qh) * s.T * s.d, 0.0f);
  int t = 0;
  std::vector<float> mass(static_cast<std::size_t>(s.kvh) * s.T);
  for (int n : chunks) {
    cache.append(0, s.view(s.k.data(), s.kvh, t, n), s.view(s.v.data(), s.kvh, t, n));
    AttendOptions opt;
    if (with_mass) {
      opt.mass = mass.data();
      opt.mass_stride = s.T;
    }
    cache.attend(0, s.view(s.q.data(), s.qh, t, n), s.view(r.out.data(), s.qh, t, n), opt);
    if (with_mass) r.mass.insert(r.mass.end(), mass.begin(), mass.end());
    t += n;
  }
  return r;
}

std::vector<int> prefill_then_decode(int T, int prefill) {
  std::vector<int> c = {prefill};
  for (int t = prefill; t < T; ++t) c.push_back(1);
  return c;
}

// Restores the process-wide ISA when a test ends.
struct IsaGuard {
  Isa saved = active_isa();
  ~IsaGuard() { set_active_isa(saved); }
};

}  // namespace

TEST(AttentionAcrossIsas, MatchesScalar) {
  IsaGuard guard;
  struct Case {
    const char* recipe;
    double tol;
  };
  const Case cases[] = {
      {"f32:group=16", 1e-5},
      {"f16:group=32,sinks=2", 1e-5},
      {"bf16:group=16,residual=8", 1e-5},
      {"kivi:kbits=2,vbits=2,group=32,residual=0", 1e-3},
      {"kivi:kbits=1,vbits=1,group=32,residual=0", 1e-3},
      {"kivi:kbits=1,vbits=4,group=16,residual=8", 1e-3},
      {"kivi:kbits=4,vbits=4,group=32,residual=16,sinks=2", 1e-3},
      {"kivi:kbits=8,vbits=8,group=16,residual=0", 1e-3},
      {"kivi:kbits=3,vbits=2,group=32,residual=0", 1e-3},
      {"kivi:kbits=4,vbits=2,group=32,vgroup=16,residual=0", 1e-3},
  };
  for (int d : {64, 128, 96, 24}) {
    const Seq s(2, 8, d, 150, static_cast<unsigned>(d));
    const auto chunks = prefill_then_decode(s.T, 120);
    for (const Case& c : cases) {
      std::string recipe = c.recipe;
      if (recipe.rfind("kivi", 0) == 0 && d % 32 != 0) recipe += ",vgroup=" + std::to_string(d % 16 == 0 ? 16 : 8);
      if (recipe.find("vgroup=16,") != std::string::npos && d % 16 != 0) continue;
      const CacheConfig cfg{1, s.qh, s.kvh, d, s.T, recipe};
      set_active_isa(Isa::kScalar);
      const Outputs want = run(s, cfg, chunks, true);
      for (Isa isa : available_isas()) {
        if (isa == Isa::kScalar) continue;
        set_active_isa(isa);
        const Outputs got = run(s, cfg, chunks, true);
        for (int h = 0; h < s.qh; ++h) {
          const std::size_t o = static_cast<std::size_t>(h) * s.T * d;
          EXPECT_LT(rel_l2(got.out.data() + o, want.out.data() + o, static_cast<long>(s.T) * d), c.tol)
              << isa_name(isa) << " " << recipe << " d " << d << " query head " << h;
        }
        EXPECT_LT(rel_l2(got.mass.data(), want.mass.data(), static_cast<long>(want.mass.size())), c.tol)
            << isa_name(isa) << " " << recipe << " d " << d << " attention mass";
      }
    }
  }
}

TEST(AttentionThreads, IdenticalToOneThread) {
  const Seq s(4, 16, 128, 200, 7);
  const auto chunks = prefill_then_decode(s.T, 160);
  for (const char* recipe : {"f16", "kivi:kbits=4,vbits=2,residual=32"}) {
    CacheConfig cfg{1, s.qh, s.kvh, s.d, s.T, recipe};
    const Outputs one = run(s, cfg, chunks, true);
    for (int threads : {2, 3, 8, 256}) {
      cfg.threads = threads;
      const Outputs many = run(s, cfg, chunks, true);
      EXPECT_EQ(many.out, one.out) << recipe << " threads " << threads;
      EXPECT_EQ(many.mass, one.mass) << recipe << " threads " << threads;
    }
  }
}

// Split-KV: with fewer kv heads than threads (here MQA: 1 kv head, and GQA with 2), each
// head's pages are split over the threads and the online-softmax states merged. The merge
// changes only float rounding: within 2e-6 relative of one thread, and within the usual
// bounds of exact double-precision attention (f32: 2e-6), for a long prefill chunk (causal
// masking inside the ranges), decode steps, sinks, a residual window, and an evicting
// policy that needs no attention (streaming: the split path then evicts per head).
TEST(AttentionThreads, SplitKVMatchesOneThread) {
  for (int kvh : {1, 2}) {
    const Seq s(kvh, 8, 64, 1300, 13);
    const auto chunks = prefill_then_decode(s.T, 1200);
    for (const char* recipe : {"f32:sinks=2,residual=16", "f16", "kivi:kbits=4,vbits=4,residual=0",
                               "streaming:sinks=4,window=1100 | kivi:kbits=2,vbits=2,residual=32"}) {
      CacheConfig cfg{1, s.qh, s.kvh, s.d, s.T, recipe};
      const Outputs one = run(s, cfg, chunks, false);
      for (int threads : {2, 3, 4}) {
        cfg.threads = threads;
        const Outputs many = run(s, cfg, chunks, false);
        EXPECT_LT(rel_l2(many.out.data(), one.out.data(), static_cast<long>(one.out.size())), 2e-6)
            << recipe << " kv heads " << kvh << " threads " << threads;
      }
      if (std::string(recipe).rfind("f32", 0) == 0) {
        cfg.threads = 2;
        const Outputs two = run(s, cfg, chunks, false);
        for (int h = 0; h < s.qh; ++h)
          for (int t : {0, 700, 1199, 1250, 1299}) {
            std::vector<float> ref(s.d);
            const int kv = h / (s.qh / s.kvh);
            ref_attention(s.q.data() + (static_cast<std::size_t>(h) * s.T + t) * s.d,
                          s.k.data() + static_cast<std::size_t>(kv) * s.T * s.d,
                          s.v.data() + static_cast<std::size_t>(kv) * s.T * s.d, t + 1, s.d, s.d,
                          1.0 / std::sqrt(s.d), ref.data());
            EXPECT_LT(rel_l2(two.out.data() + (static_cast<std::size_t>(h) * s.T + t) * s.d, ref.data(), s.d), 2e-6)
                << "q head " << h << " token " << t;
          }
      }
    }
  }
}

TEST(AttentionThreads, NoAllocationInSteadyState) {
  const Seq s(4, 16, 64, 300, 9);
  CacheConfig cfg{2, s.qh, s.kvh, s.d, s.T, "kivi:kbits=2,vbits=2,residual=64"};
  cfg.threads = 2;
  KVCache cache(cfg);
  for (int layer = 0; layer < 2; ++layer) {
    cache.append(layer, s.view(s.k.data(), s.kvh, 0, s.T - 1), s.view(s.v.data(), s.kvh, 0, s.T - 1));
    cache.append(layer, s.view(s.k.data(), s.kvh, s.T - 1, 1), s.view(s.v.data(), s.kvh, s.T - 1, 1));
  }
  std::vector<float> out(static_cast<std::size_t>(s.qh) * s.d);
  const auto q = s.view(s.q.data(), s.qh, s.T - 1, 1);
  const TensorView<float> o(out.data(), {s.qh, 1, s.d});
  // Warm-up: every thread that may run a head grows its own workspace once.
  for (int i = 0; i < 8; ++i) cache.attend(i % 2, q, o);
  const long long before = g_news.load();
  for (int i = 0; i < 20; ++i) cache.attend(i % 2, q, o);
  EXPECT_EQ(g_news.load() - before, 0) << "attend() allocated in steady state";
}

TEST(AttentionThreads, LayersConcurrently) {
  const Seq s(4, 8, 64, 130, 11);
  CacheConfig cfg{2, s.qh, s.kvh, s.d, s.T, "f16"};
  cfg.threads = 4;
  KVCache cache(cfg);
  for (int layer = 0; layer < 2; ++layer)
    cache.append(layer, s.view(s.k.data(), s.kvh, 0, s.T), s.view(s.v.data(), s.kvh, 0, s.T));
  // Seal now: the first attend would otherwise read the chunk in f32 and seal it after.
  cache.flush();
  const auto q = s.view(s.q.data(), s.qh, s.T - 1, 1);
  std::vector<float> want[2];
  for (int layer = 0; layer < 2; ++layer) {
    want[layer].resize(static_cast<std::size_t>(s.qh) * s.d);
    cache.attend(layer, q, TensorView<float>(want[layer].data(), {s.qh, 1, s.d}));
  }
  // Two callers share one pool: whoever finds it busy does its heads alone.
  std::atomic<int> mismatches{0};
  auto worker = [&](int layer) {
    std::vector<float> out(want[layer].size());
    for (int i = 0; i < 200; ++i) {
      cache.attend(layer, q, TensorView<float>(out.data(), {s.qh, 1, s.d}));
      if (out != want[layer]) mismatches.fetch_add(1);
    }
  };
  std::thread a(worker, 0), b(worker, 1);
  a.join();
  b.join();
  EXPECT_EQ(mismatches.load(), 0);
}

TEST(AttentionThreads, ValidatesTheCount) {
  for (int bad : {0, -3, 257}) {
    CacheConfig cfg{1, 4, 2, 8, 10, "f32"};
    cfg.threads = bad;
    try {
      KVCache cache(cfg);
      ADD_FAILURE() << "threads = " << bad << " was accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
      EXPECT_NE(std::string(e.what()).find("CacheConfig.threads = " + std::to_string(bad)), std::string::npos)
          << e.what();
      EXPECT_NE(std::string(e.what()).find("[1, 256]"), std::string::npos) << e.what();
    }
  }
  CacheConfig cfg{1, 4, 2, 8, 10, "f32"};
  cfg.threads = 256;  // accepted; at most kv_heads - 1 workers are started
  EXPECT_NO_THROW(KVCache cache(cfg));
}
