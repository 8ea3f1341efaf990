// Token eviction (issue 8) on synthetic data: h2o, streaming, l2norm, random and snapkv stages
// chained with every codec. Real-recording oracles (H2O, SnapKV) are in
// eviction_quality_test.cpp. What is covered, one block per test below:
//   - a dropped token contributes exactly nothing to attention (masked page slots and
//     re-packed pages included): output == attention over a fresh cache of the kept tokens;
//   - StreamingLLM, L2-norm and random keep exactly the tokens their rules name;
//   - the budget holds after every append+attend, for every decode-time policy, codec and
//     chunk size, and CacheStats tokens/seen/kept/ratio_seen agree with what was appended;
//   - memory is released: the bytes at 20K decode steps are within 1.1x of those at 2K;
//   - every policy composes with every codec; per-layer (PyramidKV-style) budgets;
//   - typed errors naming the bad value.
// Tolerances are written at each check.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "kvslim/kvslim.h"
#include "kvslim/testing/synthetic.h"
#include "test_support.h"

using namespace kvslim;

namespace {

// Random (normal) keys, values and queries: k, v [kv][T][d], q [qh][T][d].
struct Data {
  int qh, kvh, d, T;
  std::vector<float> k, v, q;
  Data(int qh_, int kvh_, int d_, int T_, unsigned seed, float qscale = 1.5f) : qh(qh_), kvh(kvh_), d(d_), T(T_) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> n(0.0f, 1.0f);
    k.resize(static_cast<std::size_t>(kvh) * T * d);
    v.resize(k.size());
    q.resize(static_cast<std::size_t>(qh) * T * d);
    for (auto& x : k) x = n(rng);
    for (auto& x : v) x = n(rng);
    for (auto& x : q) x = qscale * n(rng);
  }
  const float* krow(int h, int t) const { return k.data() + (static_cast<std::size_t>(h) * T + t) * d; }
  const float* vrow(int h, int t) const { return v.data() + (static_cast<std::size_t>(h) * T + t) * d; }
  const float* qrow(int h, int t) const { return q.data() + (static_cast<std::size_t>(h) * T + t) * d; }
};

// [heads][n][d] view of tokens [t0, t0 + n) of a [heads][T][d] buffer.
TensorView<const float> view(const float* buf, int heads, int T, int d, int t0, int n) {
  Layout l;
  l.rank = 3;
  l.shape = {heads, n, d, 0};
  l.strides = {static_cast<std::int64_t>(T) * d, d, 1, 0};
  return TensorView<const float>(buf + static_cast<std::size_t>(t0) * d, l);
}

// Append tokens [t0, t0 + n) and attend their queries; returns out [qh][n][d].
std::vector<float> step(KVCache& cache, int layer, const Data& x, int t0, int n) {
  cache.append(layer, view(x.k.data(), x.kvh, x.T, x.d, t0, n), view(x.v.data(), x.kvh, x.T, x.d, t0, n));
  std::vector<float> out(static_cast<std::size_t>(x.qh) * n * x.d);
  cache.attend(layer, view(x.q.data(), x.qh, x.T, x.d, t0, n), TensorView<float>(out.data(), {x.qh, n, x.d}));
  return out;
}

double rel_err(const float* got, const float* ref, int d) {
  double e = 0.0, r = 0.0;
  for (int c = 0; c < d; ++c) {
    e += (static_cast<double>(got[c]) - ref[c]) * (static_cast<double>(got[c]) - ref[c]);
    r += static_cast<double>(ref[c]) * ref[c];
  }
  return std::sqrt(e / std::max(r, 1e-30));
}

std::vector<std::int64_t> iota(std::int64_t a, std::int64_t b) {
  std::vector<std::int64_t> v;
  for (std::int64_t i = a; i < b; ++i) v.push_back(i);
  return v;
}

// ---------------------------------------------------------------------------------------
// 1. Dropped tokens contribute exactly nothing. After a decode run with eviction (f32
// codec, pages of 32 and of 8 so masked slots and re-packed pages occur), the output for a
// new token equals that of a FRESH f32 cache (no eviction) holding only the kept tokens,
// appended from materialize() with their positions, plus the same new token.
// Tolerance 1e-6 relative: both are f32 online softmaxes over the same rows in different
// block orders (masked slots give exp(-inf) = 0 exactly), so they differ by float rounding
// only (~1e-7 at d = 64, 41 tokens); a dropped token leaking in would cost ~1e-2.
// The double-precision reference over materialize() rows: 2e-5 (float vs double rounding,
// as in prefill_reference_test). materialize() of a lossless codec must also return the
// original rows bit for bit at the kept positions.
TEST(EvictionExact, DroppedTokensContributeNothing) {
  constexpr int kQ = 8, kKv = 2, kG = kQ / kKv, kD = 64, kT = 201;
  const Data x(kQ, kKv, kD, kT, 11);
  for (const char* recipe : {"h2o:budget=40,recent=8 | f32", "h2o:budget=40,recent=8 | f32:group=8",
                             "random:budget=40,recent=8,seed=3 | f32", "random:budget=40,recent=8,seed=3 | f32:group=8",
                             "h2o:budget=40,recent=8 | f32:group=8,residual=4"}) {
    SCOPED_TRACE(recipe);
    KVCache cache(CacheConfig{1, kQ, kKv, kD, 256, recipe});
    bool masked = false, repacked = false;
    for (int t = 0; t < kT - 1; ++t) {
      step(cache, 0, x, t, 1);
      for (int h = 0; h < kKv; ++h) {
        const TokenStore& s = cache.store(0, h);
        masked |= s.page_slots() > s.sealed_tokens();
        // Every sealed slot ever written is seen - window; fewer slots now = pages re-packed.
        repacked |= s.page_slots() < s.seen() - s.window_count() - s.sink_count();
        ASSERT_LE(cache.tokens(0, h), 40);
      }
    }
    EXPECT_TRUE(masked) << "no page ever held a masked (dropped) slot";
    EXPECT_TRUE(repacked) << "no page was ever re-packed";
    std::vector<DenseKV> kept;
    for (int h = 0; h < kKv; ++h) {
      kept.push_back(cache.materialize(0, h));
      ASSERT_EQ(kept[h].positions, cache.positions(0, h));
      ASSERT_EQ(static_cast<std::int64_t>(kept[h].positions.size()), 40);
      for (std::size_t j = 0; j < kept[h].positions.size(); ++j)
        for (int c = 0; c < kD; ++c)
          ASSERT_EQ(kept[h].k.data()[j * kD + c], x.krow(h, static_cast<int>(kept[h].positions[j]))[c]);
    }
    const int tn = kT - 1;
    const std::vector<float> out = step(cache, 0, x, tn, 1);
    for (int h = 0; h < kKv; ++h) {
      const DenseKV& kv = kept[h];
      const int n = static_cast<int>(kv.positions.size());
      // Fresh cache: one kv head, its query-head group, the kept tokens then the new one.
      KVCache fresh(CacheConfig{1, kG, 1, kD, 256, "f32"});
      fresh.append(0, TensorView<const float>(kv.k.data(), {1, n, kD}), TensorView<const float>(kv.v.data(), {1, n, kD}),
                   kv.positions);
      const std::int64_t pnew = tn;
      fresh.append(0, TensorView<const float>(x.krow(h, tn), {1, 1, kD}), TensorView<const float>(x.vrow(h, tn), {1, 1, kD}),
                   std::span<const std::int64_t>(&pnew, 1));
      std::vector<float> qg(static_cast<std::size_t>(kG) * kD), og(qg.size());
      for (int g = 0; g < kG; ++g) std::copy_n(x.qrow(h * kG + g, tn), kD, qg.data() + g * kD);
      fresh.attend(0, TensorView<const float>(qg.data(), {kG, 1, kD}), TensorView<float>(og.data(), {kG, 1, kD}));
      // Double reference over kept rows + the new row.
      std::vector<float> rk(kv.k.data(), kv.k.data() + static_cast<std::size_t>(n) * kD);
      std::vector<float> rv(kv.v.data(), kv.v.data() + static_cast<std::size_t>(n) * kD);
      rk.insert(rk.end(), x.krow(h, tn), x.krow(h, tn) + kD);
      rv.insert(rv.end(), x.vrow(h, tn), x.vrow(h, tn) + kD);
      for (int g = 0; g < kG; ++g) {
        const float* got = out.data() + static_cast<std::size_t>(h * kG + g) * kD;
        EXPECT_LT(rel_err(got, og.data() + g * kD, kD), 1e-6) << "kv head " << h << " q " << g << " vs fresh cache";
        std::vector<float> ref(kD);
        test::ref_attention(x.qrow(h * kG + g, tn), rk.data(), rv.data(), n + 1, kD, kD, 1.0 / std::sqrt(double(kD)),
                            ref.data());
        EXPECT_LT(rel_err(got, ref.data(), kD), 2e-5) << "kv head " << h << " q " << g << " vs double reference";
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// 3a. StreamingLLM keeps exactly the first S and the newest W positions at every step, in
// decode and in chunks of 7 (f16: the policy does not depend on the codec).
TEST(EvictionRules, StreamingKeepsSinksAndWindow) {
  constexpr int kS = 4, kW = 60, kT = 300;
  const Data x(8, 2, 64, kT, 5);
  for (int chunk : {1, 7}) {
    SCOPED_TRACE("chunk " + std::to_string(chunk));
    KVCache cache(CacheConfig{1, 8, 2, 64, 128, "streaming:sinks=4,window=60 | f16"});
    for (int t = 0; t < kT; t += chunk) {
      const int n = std::min(chunk, kT - t);
      step(cache, 0, x, t, n);
      const std::int64_t seen = t + n;
      std::vector<std::int64_t> want;
      if (seen <= kS + kW) {
        want = iota(0, seen);
      } else {
        want = iota(0, kS);
        const auto w = iota(seen - kW, seen);
        want.insert(want.end(), w.begin(), w.end());
      }
      for (int h = 0; h < 2; ++h) ASSERT_EQ(cache.positions(0, h), want) << "after " << seen << " tokens";
    }
  }
}

// 3b. L2-norm keeps the lowest-norm keys outside the recent window. Oracle: the scores never
// change, so the evictable kept tokens are always the budget - R lowest-norm keys of all that
// ever left the recent window (ties: the older token is evicted first, as the policy says).
// Norms are compared as the float the scorer stores (sqrt in double, rounded), so the oracle
// is exact, not tolerant.
TEST(EvictionRules, L2NormKeepsLowestNormKeys) {
  constexpr int kB = 48, kR = 16, kT = 300;
  const Data x(8, 2, 64, kT, 6);
  for (const char* recipe : {"l2norm:budget=48,recent=16 | f32", "l2norm:budget=48,recent=16 | kivi:kbits=4,vbits=4,residual=0"}) {
    SCOPED_TRACE(recipe);
    KVCache cache(CacheConfig{1, 8, 2, 64, 128, recipe});
    for (int t = 0; t < kT; ++t) {
      step(cache, 0, x, t, 1);
      for (int h = 0; h < 2; ++h) {
        const int seen = t + 1;
        std::vector<std::int64_t> want;
        if (seen <= kB) {
          want = iota(0, seen);
        } else {
          std::vector<std::pair<float, int>> pool;  // (norm, position) of tokens out of the window
          for (int p = 0; p < seen - kR; ++p) {
            double n2 = 0.0;
            for (int c = 0; c < 64; ++c) n2 += static_cast<double>(x.krow(h, p)[c]) * x.krow(h, p)[c];
            pool.push_back({static_cast<float>(std::sqrt(n2)), p});
          }
          // Keep the smallest norms; among equal norms the newer token stays.
          std::sort(pool.begin(), pool.end(),
                    [](auto a, auto b) { return a.first < b.first || (a.first == b.first && a.second > b.second); });
          for (int i = 0; i < kB - kR; ++i) want.push_back(pool[i].second);
          for (int p = seen - kR; p < seen; ++p) want.push_back(p);
          std::sort(want.begin(), want.end());
        }
        ASSERT_EQ(cache.positions(0, h), want) << "kv head " << h << " after " << seen << " tokens";
      }
    }
  }
}

// 3c. Random eviction: the same seed keeps the same positions at every step, another seed
// keeps other ones, and the newest `recent` tokens are always kept.
TEST(EvictionRules, RandomIsSeededAndKeepsRecent) {
  constexpr int kR = 16, kT = 300;
  const Data x(8, 2, 64, kT, 7);
  KVCache a(CacheConfig{1, 8, 2, 64, 128, "random:budget=48,recent=16,seed=5 | f16"});
  KVCache b(CacheConfig{1, 8, 2, 64, 128, "random:budget=48,recent=16,seed=5 | f16"});
  KVCache c(CacheConfig{1, 8, 2, 64, 128, "random:budget=48,recent=16,seed=6 | f16"});
  int differ = 0;
  for (int t = 0; t < kT; ++t) {
    step(a, 0, x, t, 1);
    step(b, 0, x, t, 1);
    step(c, 0, x, t, 1);
    for (int h = 0; h < 2; ++h) {
      const auto pa = a.positions(0, h);
      ASSERT_EQ(pa, b.positions(0, h)) << "same seed, step " << t;
      ASSERT_EQ(pa.size(), std::min<std::size_t>(48, t + 1));
      const std::set<std::int64_t> s(pa.begin(), pa.end());
      for (int p = std::max(0, t + 1 - kR); p <= t; ++p) ASSERT_TRUE(s.count(p)) << "recent position " << p << " evicted";
      differ += pa != c.positions(0, h);
    }
  }
  EXPECT_GT(differ, 100) << "seeds 5 and 6 kept the same positions at almost every step";
  // Both kv heads are sampled with the same sequence numbers, hence the same positions.
  EXPECT_EQ(a.positions(0, 0), a.positions(0, 1));
}

// ---------------------------------------------------------------------------------------
// 5. The budget holds after every append+attend for every decode-time policy x codec x chunk
// size, GQA 8 q / 2 kv heads, d = 64; CacheStats agree with what was appended. ratio_seen
// and kept are recomputed from the integer counts (1e-12 relative: double division only).
struct BudgetCase {
  const char* policy;
  std::int64_t budget;  // 0: ratio policy, budget from the formula below
  int recent;
};

TEST(EvictionBudget, HoldsAfterEveryAttendWithConsistentStats) {
  constexpr int kT = 300;
  const Data x(8, 2, 64, kT, 9);
  const BudgetCase policies[] = {{"h2o:budget=48,recent=8", 48, 8},
                                 {"h2o:ratio=0.25,recent=8", 0, 8},
                                 {"streaming:sinks=4,window=44", 48, 44},
                                 {"l2norm:budget=48,recent=8", 48, 8},
                                 {"random:budget=48,recent=8,seed=2", 48, 8}};
  for (const BudgetCase& pc : policies)
    for (const char* codec : {"f16", "kivi:kbits=4,vbits=4,residual=0"})
      for (int chunk : {1, 7, 64}) {
        const std::string recipe = std::string(pc.policy) + " | " + codec;
        SCOPED_TRACE(recipe + ", chunk " + std::to_string(chunk));
        KVCache cache(CacheConfig{1, 8, 2, 64, 512, recipe});
        for (int t = 0; t < kT; t += chunk) {
          const int n = std::min(chunk, kT - t);
          const std::int64_t before = cache.tokens(0, 0);
          cache.append(0, view(x.k.data(), 2, kT, 64, t, n), view(x.v.data(), 2, kT, 64, t, n));
          ASSERT_EQ(cache.tokens(0, 0), before + n) << "append evicted before attending";
          std::vector<float> out(static_cast<std::size_t>(8) * n * 64);
          cache.attend(0, view(x.q.data(), 8, kT, 64, t, n), TensorView<float>(out.data(), {8, n, 64}));
          const std::int64_t seen = t + n;
          const std::int64_t budget =
              pc.budget > 0 ? pc.budget : std::max<std::int64_t>({1, pc.recent, static_cast<std::int64_t>(0.25 * static_cast<double>(seen))});
          const std::int64_t want = std::min(seen, budget);
          const CacheStats st = cache.stats();
          std::int64_t tokens = 0;
          for (int h = 0; h < 2; ++h) {
            ASSERT_EQ(cache.tokens(0, h), want) << "after " << seen << " tokens";
            const auto pos = cache.positions(0, h);
            ASSERT_TRUE(std::is_sorted(pos.begin(), pos.end()));
            for (std::int64_t p = std::max<std::int64_t>(0, seen - pc.recent); p < seen; ++p)
              ASSERT_TRUE(std::binary_search(pos.begin(), pos.end(), p)) << "recent position " << p << " evicted";
            EXPECT_EQ(st.head(0, h).tokens, want);
            EXPECT_EQ(st.head(0, h).seen, seen);
            tokens += st.head(0, h).tokens;
          }
          EXPECT_EQ(st.total_tokens, tokens);
          EXPECT_EQ(st.total_seen, 2 * seen);
          EXPECT_NEAR(st.kept, static_cast<double>(tokens) / (2.0 * static_cast<double>(seen)), 1e-12);
          EXPECT_NEAR(st.ratio_seen, 2.0 * static_cast<double>(seen) * 64 * 2 * 4 / static_cast<double>(st.total_bytes), 1e-12 * st.ratio_seen);
        }
      }
}

// ---------------------------------------------------------------------------------------
// 6. Memory really released: a 20K-step decode on generator data (1 layer, 4 q / 1 kv heads,
// d = 64) with budget 1K: bytes at step 20K are at most 1.1x the bytes at step 2K (the
// issue's criterion). A page is re-packed once more than a quarter of its slots are dead,
// so page slots stay below 4/3 of the live sealed tokens plus one page (checked every 1K
// steps), and bytes after 10K stay within 1.1x of those at 10K. Measured: 1.077x (kivi) and
// 1.010x (f16) of the 2K bytes at 20K. With the first design's 1/2 threshold this was
// 1.147x / 1.119x (slack settling over several budget turnovers, not a leak).
TEST(EvictionMemory, LongDecodeHoldsSteadyBytes) {
  constexpr int kT = 20000;
  kvslim::testing::SyntheticOptions o;
  o.q_heads = 4;
  o.kv_heads = 1;
  o.head_dim = 64;
  o.tokens = kT;
  o.seed = 3;
  const kvslim::testing::SyntheticLayer L = kvslim::testing::generate_layer(o);
  for (const char* recipe : {"h2o:budget=1024,recent=128 | kivi:kbits=4,vbits=4,residual=32",
                             "h2o:budget=1024,recent=128 | f16"}) {
    SCOPED_TRACE(recipe);
    const auto t0 = std::chrono::steady_clock::now();
    KVCache cache(CacheConfig{1, 4, 1, 64, 2048, recipe});
    std::vector<float> out(4 * 64);
    std::int64_t bytes_2k = 0, bytes_4k = 0, bytes_10k = 0, peak_after_10k = 0;
    for (int t = 0; t < kT; ++t) {
      cache.append(0, view(L.k.data(), 1, kT, 64, t, 1), view(L.v.data(), 1, kT, 64, t, 1));
      cache.attend(0, view(L.q.data(), 4, kT, 64, t, 1), TensorView<float>(out.data(), {4, 1, 64}));
      ASSERT_LE(cache.tokens(0, 0), 1024);
      if (t + 1 == 2000) bytes_2k = cache.stats().total_bytes;
      if (t + 1 == 4000) bytes_4k = cache.stats().total_bytes;
      if (t + 1 == 10000) bytes_10k = cache.stats().total_bytes;
      if (t + 1 > 10000 && (t + 1) % 1000 == 0) peak_after_10k = std::max(peak_after_10k, cache.stats().total_bytes);
      if ((t + 1) % 1000 == 0) {
        const TokenStore& s = cache.store(0, 0);
        ASSERT_LE(3 * s.page_slots(), 4 * s.sealed_tokens() + 3 * s.codec().page_tokens()) << "step " << t + 1;
      }
    }
    const CacheStats st = cache.stats();
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("[ info ] %s: %d steps in %.2f s; bytes at 2K %lld, 4K %lld, 10K %lld, 20K %lld (%.3fx 2K, %.3fx 4K), "
                "peak after 10K %lld, ratio_seen %.1f\n",
                recipe, kT, secs, static_cast<long long>(bytes_2k), static_cast<long long>(bytes_4k),
                static_cast<long long>(bytes_10k), static_cast<long long>(st.total_bytes),
                static_cast<double>(st.total_bytes) / static_cast<double>(bytes_2k),
                static_cast<double>(st.total_bytes) / static_cast<double>(bytes_4k),
                static_cast<long long>(peak_after_10k), st.ratio_seen);
    EXPECT_EQ(st.total_tokens, 1024);
    EXPECT_EQ(st.total_seen, kT);
    EXPECT_LE(static_cast<double>(peak_after_10k), 1.1 * static_cast<double>(bytes_10k));
    EXPECT_LE(static_cast<double>(st.total_bytes), 1.1 * static_cast<double>(bytes_2k));
  }
}

// ---------------------------------------------------------------------------------------
// 7a. Every policy with every codec builds, keeps its budget after every attend (chunked
// prefill of 64 then decode) and reports the chain it runs.
TEST(EvictionComposition, EveryPolicyWithEveryCodec) {
  constexpr int kT = 700;
  const Data x(4, 2, 32, kT, 13);
  const char* policies[] = {"h2o:budget=512,recent=64", "streaming:sinks=4,window=508", "l2norm:budget=512,recent=64",
                            "random:budget=512,recent=64", "snapkv:budget=512,window=32,kernel=7"};
  const char* codecs[] = {"f32", "f16", "bf16", "kivi:kbits=2,vbits=2,residual=32", "kivi:kbits=4,vbits=4,residual=0",
                          "kivi:kbits=8,vbits=8"};
  for (const char* p : policies)
    for (const char* c : codecs) {
      const std::string recipe = std::string(p) + " | " + c;
      SCOPED_TRACE(recipe);
      KVCache cache(CacheConfig{1, 4, 2, 32, 1024, recipe});
      const std::string chain = cache.recipe_for(0, 0);
      EXPECT_NE(chain.find(std::string(p).substr(0, std::string(p).find(':'))), std::string::npos) << chain;
      int t = 0;
      for (; t < 640; t += 64) {
        step(cache, 0, x, t, 64);
        for (int h = 0; h < 2; ++h) ASSERT_EQ(cache.tokens(0, h), std::min(t + 64, 512));
      }
      for (; t < kT; ++t) {
        step(cache, 0, x, t, 1);
        // SnapKV compresses the prompt only: decode tokens are kept on top of its budget.
        const std::int64_t want = std::string(p).rfind("snapkv", 0) == 0 ? 512 + (t + 1 - 640) : 512;
        for (int h = 0; h < 2; ++h) ASSERT_EQ(cache.tokens(0, h), want);
      }
    }
}

// 7b. PyramidKV-style per-layer budgets: layer 1 keeps 16 tokens, layers 0 and 2 keep 64.
TEST(EvictionComposition, PerLayerBudgets) {
  constexpr int kT = 200;
  const Data x(4, 2, 32, kT, 17);
  KVCache cache(CacheConfig{3, 4, 2, 32, 256, "h2o:budget=64 | kivi ; [layers=1] h2o:budget=16 | kivi"});
  for (int t = 0; t < kT; ++t)
    for (int l = 0; l < 3; ++l) step(cache, l, x, t, 1);
  const CacheStats st = cache.stats();
  EXPECT_EQ(st.layer_tokens(0), 2 * 64);
  EXPECT_EQ(st.layer_tokens(1), 2 * 16);
  EXPECT_EQ(st.layer_tokens(2), 2 * 64);
  EXPECT_LT(st.layer_bytes(1), st.layer_bytes(0));
  EXPECT_NE(cache.recipe_for(1, 0).find("budget=16"), std::string::npos) << cache.recipe_for(1, 0);
  EXPECT_NE(cache.recipe_for(0, 0).find("budget=64"), std::string::npos) << cache.recipe_for(0, 0);
  EXPECT_EQ(st.total_seen, 3 * 2 * kT);
}

// ---------------------------------------------------------------------------------------
// 8. Errors: typed, and the message names the offending value.
void expect_error(const std::string& recipe, std::int64_t max_tokens, ErrorCode code, const std::string& needle) {
  SCOPED_TRACE(recipe);
  try {
    KVCache cache(CacheConfig{1, 4, 2, 32, max_tokens, recipe});
    ADD_FAILURE() << "no error for '" << recipe << "'";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), code) << e.what();
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << "message does not name '" << needle
                                                                     << "': " << e.what();
  }
}

TEST(EvictionErrors, TypedAndNamed) {
  expect_error("h2o:budget=300", 256, ErrorCode::kCapacity, "300");
  expect_error("streaming:sinks=4,window=300", 256, ErrorCode::kCapacity, "304");
  expect_error("snapkv:budget=2000 | f16", 1024, ErrorCode::kCapacity, "2000");
  expect_error("h2o:budget=64,recent=64", 256, ErrorCode::kInvalidArgument, "recent=64");
  expect_error("l2norm:budget=64,recent=100", 256, ErrorCode::kInvalidArgument, "recent=100");
  expect_error("random:budget=8,recent=9", 256, ErrorCode::kInvalidArgument, "recent=9");
  expect_error("h2o:ratio=0", 256, ErrorCode::kInvalidArgument, "ratio=0");
  expect_error("h2o:ratio=1.5", 256, ErrorCode::kInvalidArgument, "ratio=1.5");
  expect_error("l2norm:ratio=-1", 256, ErrorCode::kInvalidArgument, "ratio=-1");
  expect_error("snapkv:budget=16,window=32", 256, ErrorCode::kInvalidArgument, "window=32");
  expect_error("h2o:budget=64,ratio=0.5", 256, ErrorCode::kInvalidArgument, "exactly one of budget");
  expect_error("h2o:recent=8", 256, ErrorCode::kInvalidArgument, "exactly one of budget");
  expect_error("h2o:budget=64,bogus=1", 256, ErrorCode::kRecipe, "bogus");
  expect_error("streaming:sinks=4,budget=10", 256, ErrorCode::kRecipe, "budget");
  expect_error("snapkv:budget=64,recent=8", 256, ErrorCode::kRecipe, "recent");
  expect_error("random:budget=64,sed=1", 256, ErrorCode::kRecipe, "sed");
  expect_error("snapkv:budget=64,pool=mean", 256, ErrorCode::kInvalidArgument, "mean");
  // ratio=1 is allowed (keep everything); budget == max_tokens too.
  EXPECT_NO_THROW(KVCache(CacheConfig{1, 4, 2, 32, 256, "h2o:ratio=1,recent=8"}));
  EXPECT_NO_THROW(KVCache(CacheConfig{1, 4, 2, 32, 256, "h2o:budget=256"}));
}

// accumulate_mass sums calls whose token order eviction changes: refused for a recipe whose
// scorer needs attention (h2o, snapkv); fine for one that does not (l2norm).
TEST(EvictionErrors, AccumulateMassWithAttentionScorer) {
  const Data x(4, 2, 32, 4, 19);
  for (const char* recipe : {"h2o:budget=16 | f16", "snapkv:budget=16,window=4", "l2norm:budget=16"}) {
    SCOPED_TRACE(recipe);
    KVCache cache(CacheConfig{1, 4, 2, 32, 64, recipe});
    cache.append(0, view(x.k.data(), 2, 4, 32, 0, 4), view(x.v.data(), 2, 4, 32, 0, 4));
    std::vector<float> out(4 * 4 * 32), mass(2 * 8, 0.0f);
    AttendOptions ao;
    ao.mass = mass.data();
    ao.mass_stride = 8;
    ao.accumulate_mass = true;
    const bool refused = std::string(recipe).rfind("l2norm", 0) != 0;
    try {
      cache.attend(0, view(x.q.data(), 4, 4, 32, 0, 4), TensorView<float>(out.data(), {4, 4, 32}), ao);
      EXPECT_FALSE(refused) << "accumulate_mass accepted";
    } catch (const Error& e) {
      EXPECT_TRUE(refused) << e.what();
      EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument) << e.what();
      EXPECT_NE(std::string(e.what()).find("accumulate_mass"), std::string::npos) << e.what();
      // Nothing changed: the tokens are still there and a plain attend works.
      EXPECT_EQ(cache.tokens(0, 0), 4);
      ao.accumulate_mass = false;
      EXPECT_NO_THROW(cache.attend(0, view(x.q.data(), 4, 4, 32, 0, 4), TensorView<float>(out.data(), {4, 4, 32}), ao));
    }
  }
}

}  // namespace
