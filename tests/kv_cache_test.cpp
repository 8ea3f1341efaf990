// KVCache behaviour against exact double-precision attention:
// - f32 decode and chunked prefill (causal within the chunk) match the reference, and any
//   chunking gives the same outputs as token-by-token appends (lossless format);
// - KIVI: a prefill chunk attends to its own tokens in full precision (deferred sealing, as
//   in the paper), and older tokens are read from quantized pages;
// - GQA: every query head reads its own kv head; engine layouts [tokens][heads][dim] work
//   through strides; attention mass equals the reference probabilities; weighted special
//   tokens count as w copies; sinks stay exact; materialize/positions/reset.
// - The 1-bit KIVI codec: page layout, bytes equal across ISAs, decode = group min or max.
// Tolerances: f32 paths differ from the double reference only by float rounding over at
// most a few hundred terms, so 2e-6 relative is ample; KIVI bounds are loose on purpose
// (they check the segment logic, not quantization quality, which quality_test judges).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "kvslim/kvslim.h"
#include "kvslim/kernels/kernel_table.h"
#include "test_support.h"

using namespace kvslim;
using kvslim::test::ref_attention;
using kvslim::test::rel_l2;

namespace {

struct Data {
  int kvh, qh, d, T;
  std::vector<float> k, v, q;  // k,v [kvh][T][d], q [qh][T][d]
  Data(int kvh_, int qh_, int d_, int T_, unsigned seed) : kvh(kvh_), qh(qh_), d(d_), T(T_) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> n(0.0f, 1.0f);
    k.resize(static_cast<std::size_t>(kvh) * T * d);
    v.resize(k.size());
    q.resize(static_cast<std::size_t>(qh) * T * d);
    for (auto& x : k) x = n(rng);
    for (auto& x : v) x = n(rng);
    for (auto& x : q) x = 1.5f * n(rng);
  }
  // [heads][n][d] view of tokens [t0, t0+n) of a [heads][T][d] buffer.
  TensorView<const float> view(const std::vector<float>& buf, int heads, int t0, int n) const {
    Layout l;
    l.rank = 3;
    l.shape = {heads, n, d, 0};
    l.strides = {static_cast<std::int64_t>(T) * d, d, 1, 0};
    return TensorView<const float>(buf.data() + static_cast<std::size_t>(t0) * d, l);
  }
  // Reference output of query head h at token t over tokens [0, t].
  std::vector<float> ref(int h, int t) const {
    std::vector<float> out(d);
    const int kv = h / (qh / kvh);
    ref_attention(q.data() + (static_cast<std::size_t>(h) * T + t) * d, k.data() + static_cast<std::size_t>(kv) * T * d,
                  v.data() + static_cast<std::size_t>(kv) * T * d, t + 1, d, d, 1.0 / std::sqrt(d), out.data());
    return out;
  }
};

// Run the whole sequence through a cache with a given chunking; returns out [qh][T][d].
std::vector<float> run(const Data& x, const std::string& recipe, const std::vector<int>& chunks) {
  KVCache cache(CacheConfig{1, x.qh, x.kvh, x.d, x.T, recipe});
  std::vector<float> out(static_cast<std::size_t>(x.qh) * x.T * x.d);
  int t = 0;
  for (int n : chunks) {
    cache.append(0, x.view(x.k, x.kvh, t, n), x.view(x.v, x.kvh, t, n));
    Layout l;
    l.rank = 3;
    l.shape = {x.qh, n, x.d, 0};
    l.strides = {static_cast<std::int64_t>(x.T) * x.d, x.d, 1, 0};
    cache.attend(0, x.view(x.q, x.qh, t, n), TensorView<float>(out.data() + static_cast<std::size_t>(t) * x.d, l));
    t += n;
  }
  EXPECT_EQ(t, x.T);
  return out;
}

std::vector<int> chunks_of(int T, int n) {
  std::vector<int> c;
  for (int t = 0; t < T; t += n) c.push_back(std::min(n, T - t));
  return c;
}

}  // namespace

TEST(KVCache, F32DecodeMatchesExactAttentionWithGqa) {
  const Data x(2, 6, 24, 100, 1);
  const auto out = run(x, "f32", chunks_of(x.T, 1));
  for (int h = 0; h < x.qh; ++h)
    for (int t = 0; t < x.T; t += 7) {
      const auto r = x.ref(h, t);
      EXPECT_LT(rel_l2(out.data() + (static_cast<std::size_t>(h) * x.T + t) * x.d, r.data(), x.d), 2e-6)
          << "head " << h << " token " << t;
    }
}

TEST(KVCache, F32ChunkedPrefillEqualsTokenByToken) {
  const Data x(2, 4, 16, 150, 2);
  const auto one = run(x, "f32", chunks_of(x.T, 1));
  for (const auto& chunks : {chunks_of(x.T, 150), chunks_of(x.T, 32), chunks_of(x.T, 7),
                             std::vector<int>{1, 63, 2, 40, 44}}) {
    const auto got = run(x, "f32", chunks);
    EXPECT_LT(rel_l2(got.data(), one.data(), static_cast<long>(got.size())), 1e-6);
    // Causality: token t's output must equal the exact attention over tokens [0, t].
    for (int t : {0, 31, 32, 99, 149}) {
      const auto r = x.ref(3, t);
      EXPECT_LT(rel_l2(got.data() + (3 * static_cast<std::size_t>(x.T) + t) * x.d, r.data(), x.d), 2e-6) << t;
    }
  }
}

TEST(KVCache, EngineLayoutTokensHeadsDim) {
  const Data x(2, 4, 8, 20, 3);
  // Re-lay the same data out as [tokens][heads][dim] and feed it with permuted strides.
  std::vector<float> k(x.k.size()), v(x.v.size()), q(x.q.size()), out(x.q.size());
  for (int t = 0; t < x.T; ++t)
    for (int c = 0; c < x.d; ++c) {
      for (int h = 0; h < x.kvh; ++h) {
        k[(t * x.kvh + h) * x.d + c] = x.k[(h * x.T + t) * x.d + c];
        v[(t * x.kvh + h) * x.d + c] = x.v[(h * x.T + t) * x.d + c];
      }
      for (int h = 0; h < x.qh; ++h) q[(t * x.qh + h) * x.d + c] = x.q[(h * x.T + t) * x.d + c];
    }
  KVCache cache(CacheConfig{1, x.qh, x.kvh, x.d, x.T, "f32"});
  cache.append(0, TensorView<const float>::tokens_heads_dim(k.data(), x.T, x.kvh, x.d),
               TensorView<const float>::tokens_heads_dim(v.data(), x.T, x.kvh, x.d));
  cache.attend(0, TensorView<const float>::tokens_heads_dim(q.data(), x.T, x.qh, x.d),
               TensorView<float>::tokens_heads_dim(out.data(), x.T, x.qh, x.d));
  for (int h = 0; h < x.qh; ++h)
    for (int t = 0; t < x.T; ++t) {
      const auto r = x.ref(h, t);
      EXPECT_LT(rel_l2(out.data() + (static_cast<std::size_t>(t) * x.qh + h) * x.d, r.data(), x.d), 2e-6);
    }
}

TEST(KVCache, KiviPrefillChunkAttendsItsOwnTokensInFullPrecision) {
  // residual=0: every complete group is quantized — but only at the next append, so the
  // chunk that was just appended is still exact for its own queries.
  const Data x(1, 2, 16, 96, 4);
  const std::string recipe = "kivi:kbits=2,vbits=2,group=32,residual=0";
  const auto got = run(x, recipe, {96});
  const auto exact = run(x, "f32", {96});
  EXPECT_LT(rel_l2(got.data(), exact.data(), static_cast<long>(got.size())), 1e-6);

  // Two chunks: the second chunk sees the first one quantized (3 pages), itself exact.
  const auto two = run(x, recipe, {64, 32});
  const auto exact2 = run(x, "f32", {64, 32});
  const std::size_t off = 64 * x.d;
  double e_first = 0.0, e_second = 0.0;
  for (int h = 0; h < x.qh; ++h) {
    e_first += rel_l2(two.data() + h * x.T * x.d, exact2.data() + h * x.T * x.d, 64L * x.d);
    e_second += rel_l2(two.data() + h * x.T * x.d + off, exact2.data() + h * x.T * x.d + off, 32L * x.d);
  }
  EXPECT_LT(e_first, 1e-6);   // first chunk: its own tokens, exact
  EXPECT_GT(e_second, 1e-3);  // second chunk reads 2-bit pages for tokens 0..63

  KVCache cache(CacheConfig{1, 2, 1, 16, 200, recipe});
  cache.append(0, x.view(x.k, 1, 0, 64), x.view(x.v, 1, 0, 64));
  EXPECT_EQ(cache.store(0, 0).window_count(), 64);  // nothing sealed before it attends
  cache.append(0, x.view(x.k, 1, 64, 1), x.view(x.v, 1, 64, 1));
  EXPECT_EQ(cache.store(0, 0).sealed_tokens(), 64);
  EXPECT_EQ(cache.store(0, 0).window_count(), 1);
}

TEST(KVCache, AttendSealsSoStatsAreSteadyStateRightAfterIt) {
  // A whole prompt in one chunk: once it has attended, the cache holds it compressed (the
  // bug was that stats() reported it in f32 until the next append).
  const Data x(1, 2, 16, 96, 14);
  const std::string recipe = "kivi:kbits=2,vbits=2,group=32,residual=0";
  KVCache cache(CacheConfig{1, 2, 1, 16, 200, recipe});
  cache.append(0, x.view(x.k, 1, 0, 96), x.view(x.v, 1, 0, 96));
  const std::int64_t before = cache.stats().total_bytes;
  EXPECT_EQ(cache.store(0, 0).window_count(), 96);
  std::vector<float> out(2 * 96 * 16);
  cache.attend(0, x.view(x.q, 2, 0, 96), TensorView<float>(out.data(), {2, 96, 16}));
  EXPECT_EQ(cache.store(0, 0).sealed_tokens(), 96);
  EXPECT_EQ(cache.store(0, 0).window_count(), 0);
  const CacheStats st = cache.stats();
  EXPECT_LT(st.total_bytes * 3, before) << "2-bit pages must be far smaller than the f32 chunk";
  EXPECT_GT(st.ratio_vs_f32, 5.0);
  // A second attend over the same (now sealed) append stays causal and reads the pages.
  std::vector<float> again(out.size());
  cache.attend(0, x.view(x.q, 2, 0, 96), TensorView<float>(again.data(), {2, 96, 16}));
  const auto exact = run(x, "f32", {96});
  EXPECT_LT(rel_l2(again.data(), exact.data(), static_cast<long>(exact.size())), 0.5);
  EXPECT_GT(rel_l2(again.data(), out.data(), static_cast<long>(out.size())), 1e-4);

  // flush() does the same for an engine that appends without attending through kvslim.
  KVCache other(CacheConfig{1, 2, 1, 16, 200, recipe});
  other.append(0, x.view(x.k, 1, 0, 96), x.view(x.v, 1, 0, 96));
  other.flush();
  EXPECT_EQ(other.store(0, 0).sealed_tokens(), 96);
  EXPECT_EQ(other.stats().total_bytes, st.total_bytes);
  other.flush();  // idempotent
  EXPECT_EQ(other.stats().total_bytes, st.total_bytes);
}

TEST(KVCache, DefaultValueGroupFitsRealHeadSizes) {
  // head_dim 80, 96 and 100 are real (e.g. phi, some Qwen sizes): the default kivi recipe
  // must accept them, with vgroup the largest divisor <= 32.
  for (const auto& [d, vg] : std::vector<std::pair<int, int>>{{80, 20}, {96, 32}, {100, 25}, {112, 28}, {128, 32}, {8, 8}}) {
    KVCache cache(CacheConfig{1, 2, 1, d, 64, "kivi"});
    EXPECT_NE(cache.recipe_for(0, 0).find("vgroup=" + std::to_string(vg) + ","), std::string::npos)
        << d << ": " << cache.recipe_for(0, 0);
    const Data x(1, 2, d, 40, 15);
    cache.append(0, x.view(x.k, 1, 0, 40), x.view(x.v, 1, 0, 40));
    std::vector<float> out(2 * 40 * static_cast<std::size_t>(d));
    cache.attend(0, x.view(x.q, 2, 0, 40), TensorView<float>(out.data(), {2, 40, d}));
    const auto r = x.ref(1, 39);
    EXPECT_LT(rel_l2(out.data() + (40 + 39) * static_cast<std::size_t>(d), r.data(), d), 1e-5);
  }
}

TEST(KVCache, KiviKeepsResidualWindowInFullPrecision) {
  const Data x(1, 1, 16, 300, 5);
  KVCache cache(CacheConfig{1, 1, 1, 16, 400, "kivi:kbits=2,vbits=2,group=32,residual=128"});
  for (int t = 0; t < x.T; ++t) cache.append(0, x.view(x.k, 1, t, 1), x.view(x.v, 1, t, 1));
  const TokenStore& s = cache.store(0, 0);
  // Window between residual and residual + group (sealing is deferred to the next append).
  EXPECT_GE(s.window_count(), 128);
  EXPECT_LE(s.window_count(), 128 + 32);
  EXPECT_EQ(s.sealed_tokens() + s.window_count(), 300);
  const DenseKV dense = cache.materialize(0, 0);
  // The newest `residual` tokens come back bit-exact; the sealed ones do not.
  const std::int64_t w0 = s.sealed_tokens();
  for (std::int64_t t = w0; t < 300; ++t)
    for (int c = 0; c < 16; ++c) ASSERT_EQ(dense.k[t * 16 + c], x.k[t * 16 + c]);
  EXPECT_GT(rel_l2(dense.k.data(), x.k.data(), w0 * 16), 1e-3);
  EXPECT_EQ(dense.positions.size(), 300u);
  EXPECT_EQ(dense.positions[299], 299);
}

TEST(KVCache, AttentionMassMatchesReferenceProbabilities) {
  const Data x(2, 4, 16, 77, 6);
  for (const char* recipe : {"f32:group=16", "kivi:kbits=4,vbits=4,group=16,residual=0,sinks=2"}) {
    KVCache cache(CacheConfig{1, x.qh, x.kvh, x.d, x.T, recipe});
    for (int t = 0; t < x.T - 1; ++t) cache.append(0, x.view(x.k, x.kvh, t, 1), x.view(x.v, x.kvh, t, 1));
    cache.append(0, x.view(x.k, x.kvh, x.T - 1, 1), x.view(x.v, x.kvh, x.T - 1, 1));
    std::vector<float> out(static_cast<std::size_t>(x.qh) * x.d), mass(2 * 100, -1.0f);
    AttendOptions ao;
    ao.mass = mass.data();
    ao.mass_stride = 100;
    Layout l;
    l.rank = 3;
    l.shape = {x.qh, 1, x.d, 0};
    l.strides = {static_cast<std::int64_t>(x.T) * x.d, x.d, 1, 0};
    cache.attend(0, TensorView<const float>(x.q.data() + (x.T - 1) * x.d, l), TensorView<float>(out.data(), {x.qh, 1, x.d}), ao);
    for (int h = 0; h < x.kvh; ++h) {
      // Reference: probabilities over the cache's own (decoded) keys, summed over the group.
      const DenseKV dense = cache.materialize(0, h);
      std::vector<double> sum(x.T, 0.0), p(x.T);
      std::vector<float> o(x.d);
      double total = 0.0;
      for (int g = 0; g < 2; ++g) {
        ref_attention(x.q.data() + (static_cast<std::size_t>(h * 2 + g) * x.T + x.T - 1) * x.d, dense.k.data(),
                      dense.v.data(), x.T, x.d, x.d, 1.0 / 4.0, o.data(), p.data());
        for (int j = 0; j < x.T; ++j) sum[j] += p[j];
        EXPECT_LT(rel_l2(out.data() + (h * 2 + g) * x.d, o.data(), x.d), 1e-5) << recipe;
      }
      for (int j = 0; j < x.T; ++j) {
        EXPECT_NEAR(mass[h * 100 + j], sum[j], 1e-5) << recipe << " token " << j;
        total += mass[h * 100 + j];
      }
      EXPECT_NEAR(total, 2.0, 1e-5);  // one unit of probability per query head
    }
  }
}

TEST(KVCache, SpecialTokenOfWeightWCountsAsWCopies) {
  const int d = 8;
  std::vector<float> k(4 * d), v(4 * d), q(d);
  std::mt19937 rng(9);
  std::normal_distribution<float> n;
  for (auto& a : k) a = n(rng);
  for (auto& a : v) a = n(rng);
  for (auto& a : q) a = n(rng);
  // Cache A: 3 tokens + special(token 3, weight 5). Reference: tokens 0..2 + 5 copies of 3.
  KVCache a(CacheConfig{1, 1, 1, d, 16, "f32"});
  a.append(0, TensorView<const float>(k.data(), {1, 3, d}), TensorView<const float>(v.data(), {1, 3, d}));
  a.store(0, 0).add_special(k.data() + 3 * d, v.data() + 3 * d, 5.0f, 3);
  std::vector<float> out(d), ref(d);
  a.attend(0, TensorView<const float>(q.data(), {1, 1, d}), TensorView<float>(out.data(), {1, 1, d}));
  std::vector<float> kk(k.begin(), k.begin() + 3 * d), vv(v.begin(), v.begin() + 3 * d);
  for (int c = 0; c < 5; ++c) {
    kk.insert(kk.end(), k.begin() + 3 * d, k.begin() + 4 * d);
    vv.insert(vv.end(), v.begin() + 3 * d, v.begin() + 4 * d);
  }
  ref_attention(q.data(), kk.data(), vv.data(), 8, d, d, 1.0 / std::sqrt(d), ref.data());
  EXPECT_LT(rel_l2(out.data(), ref.data(), d), 2e-6);
  EXPECT_EQ(a.tokens(0, 0), 4);
  const auto dense = a.materialize(0, 0);
  EXPECT_NEAR(dense.log_weights[3], std::log(5.0f), 1e-6);
  EXPECT_THROW(a.store(0, 0).add_special(k.data(), v.data(), 0.5f, 9), Error);
}

TEST(KVCache, SinksStayFullPrecision) {
  const Data x(1, 1, 16, 80, 10);
  KVCache cache(CacheConfig{1, 1, 1, 16, 100, "kivi:kbits=2,vbits=2,group=16,residual=0,sinks=3"});
  for (int t = 0; t < x.T; ++t) cache.append(0, x.view(x.k, 1, t, 1), x.view(x.v, 1, t, 1));
  EXPECT_EQ(cache.store(0, 0).sink_count(), 3);
  const DenseKV dense = cache.materialize(0, 0);
  for (int i = 0; i < 3 * 16; ++i) ASSERT_EQ(dense.k[i], x.k[i]);
  EXPECT_EQ(cache.positions(0, 0)[3], 3);
}

TEST(KVCache, ExplicitPositionsAndReset) {
  KVCache cache(CacheConfig{2, 2, 1, 4, 32, "f16"});
  std::vector<float> kv(3 * 4, 0.25f);
  const std::int64_t pos[3] = {10, 11, 20};
  cache.append(1, TensorView<const float>(kv.data(), {1, 3, 4}), TensorView<const float>(kv.data(), {1, 3, 4}), pos);
  cache.append(1, TensorView<const float>(kv.data(), {1, 1, 4}), TensorView<const float>(kv.data(), {1, 1, 4}));
  EXPECT_EQ(cache.positions(1, 0), (std::vector<std::int64_t>{10, 11, 20, 21}));
  EXPECT_EQ(cache.tokens(0, 0), 0);
  EXPECT_GT(cache.stats().head(1, 0).bytes, 0);
  cache.reset();
  EXPECT_EQ(cache.tokens(1, 0), 0);
  EXPECT_EQ(cache.stats().head(1, 0).bytes, 0);
  cache.append(1, TensorView<const float>(kv.data(), {1, 1, 4}), TensorView<const float>(kv.data(), {1, 1, 4}));
  EXPECT_EQ(cache.positions(1, 0), (std::vector<std::int64_t>{0}));
}

TEST(KVCache, StatsBitsPerValueFollowTheFormat) {
  // Long enough that pages dominate: f16 must approach 16 bits, 4-bit KIVI at d=128 approach
  // 4 + metadata (keys: 32 bits per channel per 32 tokens = 1; values: 32 bits per 32 channels = 1).
  const int d = 128, T = 4096;
  std::vector<float> kv(static_cast<std::size_t>(T) * d);
  std::mt19937 rng(1);
  std::normal_distribution<float> n;
  for (auto& a : kv) a = n(rng);
  auto bits = [&](const char* recipe) {
    KVCache cache(CacheConfig{1, 1, 1, d, T + 1, recipe});
    cache.append(0, TensorView<const float>(kv.data(), {1, T, d}), TensorView<const float>(kv.data(), {1, T, d}));
    std::vector<float> one(d, 0.0f);
    cache.append(0, TensorView<const float>(one.data(), {1, 1, d}), TensorView<const float>(one.data(), {1, 1, d}));
    return cache.stats().bits_per_value;
  };
  EXPECT_NEAR(bits("f16:group=64"), 16.0, 0.3);
  EXPECT_NEAR(bits("kivi:kbits=4,vbits=4,residual=0"), 5.0, 0.15);
  EXPECT_NEAR(bits("kivi:kbits=2,vbits=2,residual=0"), 3.0, 0.15);
  EXPECT_NEAR(bits("kivi:kbits=3,vbits=3,residual=0"), 4.0, 0.15);
  EXPECT_NEAR(bits("kivi:kbits=1,vbits=1,residual=0"), 2.0, 0.15);
}

// The uniform 1-bit KIVI baseline (kivi:kbits=1,vbits=1) through the codec on every ISA: the
// page is exactly the layout of docs/formats.md (one bit per code, rows of ceil(d / 8) bytes),
// the encoded bytes match the scalar table's, and decoding gives, per key channel and per value
// (token, group), only the two values f16(min) and f16(min) + f16(max - f16(min)): the group's
// minimum or maximum up to the f16 rounding of zero point and scale (1e-3 of their size), the
// nearer one of the two for every element (a midpoint goes to the minimum).
TEST(KiviCodec, OneBitRoundTripGivesGroupMinOrMax) {
  struct Shape {
    int d, ntok;
    std::size_t bytes;  // written out by hand from docs/formats.md
  };
  // d 64 (vgroup 32), 32 tokens: 4*64 | 32*8 | 2*32*2 scale + 2*32*2 zero | 32*8 = 256 + 256 + 256 + 256.
  // d 20 (vgroup 20), 5 tokens: 80 | 5*3 = 15, padded to 96 | 4*5*1 = 20 | 5*3 = 15 -> 131.
  // d 128 (vgroup 32), 17 tokens: 512 | 17*16 | 4*17*4 | 17*16 = 512 + 272 + 272 + 272.
  const Shape shapes[] = {{64, 32, 1024}, {20, 5, 131}, {128, 17, 1328}};
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.3f, 1.7f);
  for (const Shape& sh : shapes) {
    const int d = sh.d, ntok = sh.ntok;
    const auto codec = build_pipeline(parse_recipe("kivi:kbits=1,vbits=1,residual=0").base, d).codec;
    ASSERT_NE(codec, nullptr);
    const int vg = d % 32 == 0 ? 32 : d;  // the default vgroup at these head_dims
    EXPECT_EQ(codec->describe(), "kivi:kbits=1,vbits=1,group=32,vgroup=" + std::to_string(vg) + ",residual=0,sinks=0");
    const std::size_t rb = static_cast<std::size_t>((d + 7) / 8);
    std::size_t predicted = 4u * d + ntok * rb;
    predicted += predicted & 1u;
    predicted += 4u * ntok * static_cast<std::size_t>(d / vg) + ntok * rb;
    ASSERT_EQ(codec->page_bytes(ntok, d), predicted) << "d " << d;
    ASSERT_EQ(codec->page_bytes(ntok, d), sh.bytes) << "d " << d;

    std::vector<float> k(static_cast<std::size_t>(ntok) * d), v(k.size());
    for (float& x : k) x = nd(rng);
    for (float& x : v) x = nd(rng);
    // Both buffers start with the same filler: encode does not write the alignment pad byte
    // between the key codes and the value scales (offset 95 at d 20), so it keeps the filler.
    std::vector<std::byte> want(predicted, std::byte{0x5A});
    codec->encode(kernels::scalar::kTable, k.data(), v.data(), ntok, d, want.data());

    // Expected decoded value of x in a group with extremes mn, mx (the rule of kernel_table.h).
    auto expect_group = [&](const float* x, std::ptrdiff_t stride, int n, const float* got, const std::string& where) {
      float mn = x[0], mx = x[0];
      for (int i = 1; i < n; ++i) mn = std::min(mn, x[i * stride]), mx = std::max(mx, x[i * stride]);
      const float z = f16_to_f32(f32_to_f16(mn)), s = f16_to_f32(f32_to_f16(mx - z));
      const float inv = s > 0.0f ? 1.0f / s : 0.0f;
      const float tol = 1e-3f * (std::fabs(mn) + (mx - mn)) + 1e-7f;
      bool saw_min = false, saw_max = false;
      for (int i = 0; i < n; ++i) {
        const float xi = x[i * stride], gi = got[i * stride];
        ASSERT_EQ(gi, (xi - z) * inv > 0.5f ? z + s : z) << where << " element " << i;
        ASSERT_TRUE(gi == z || gi == z + s) << where << " element " << i << ": " << gi;
        const bool at_min = std::fabs(gi - mn) <= tol, at_max = std::fabs(gi - mx) <= tol;
        ASSERT_TRUE(at_min || at_max) << where << " element " << i << ": " << gi << " not min " << mn << " or max " << mx;
        // The nearer extreme (with the midpoint band of the f16 roundings left to the rule).
        if (std::fabs(xi - mn) < std::fabs(xi - mx) - 2 * tol) {
          ASSERT_TRUE(at_min) << where << " element " << i;
        }
        if (std::fabs(xi - mx) < std::fabs(xi - mn) - 2 * tol) {
          ASSERT_TRUE(at_max) << where << " element " << i;
        }
        saw_min = saw_min || (xi == mn && gi == z);
        saw_max = saw_max || (xi == mx && gi == z + s);
      }
      EXPECT_TRUE(saw_min && saw_max) << where << ": the minimum and the maximum decode to themselves";
    };
    for (Isa isa : available_isas()) {
      const kernels::KernelTable& kt = *kernels::table_for(static_cast<int>(isa));
      std::vector<std::byte> page(predicted, std::byte{0x5A});
      codec->encode(kt, k.data(), v.data(), ntok, d, page.data());
      ASSERT_EQ(page, want) << isa_name(isa) << " d " << d << ": encoded bytes differ from the scalar table's";
      std::vector<float> dk(k.size()), dv(v.size());
      codec->decode(kt, page.data(), ntok, d, dk.data(), dv.data());
      const std::string at = std::string(isa_name(isa)) + " d " + std::to_string(d);
      for (int c = 0; c < d; ++c) expect_group(k.data() + c, d, ntok, dk.data() + c, at + " key channel " + std::to_string(c));
      for (int j = 0; j < ntok; ++j)
        for (int g = 0; g < d / vg; ++g) {
          const std::size_t o = static_cast<std::size_t>(j) * d + static_cast<std::size_t>(g) * vg;
          expect_group(v.data() + o, 1, vg, dv.data() + o,
                       at + " value token " + std::to_string(j) + " group " + std::to_string(g));
        }
    }
  }
}
