// RazorAttention: the razor stage (sinks + window + one compensation token per head), retrieval-
// head calibration (RetrievalScores) and recipe files.
//   - the compensation token is the mean of every dropped key and value, weight N (f32, 1e-6),
//     through decode steps and chunked prefill, whatever segment the tokens left from;
//   - attention with it equals exact attention over the kept tokens plus N copies of the mean
//     (double-precision reference, GQA);
//   - memory per head stays constant during decode;
//   - compensate=0 is streaming, bit for bit;
//   - on the generator with planted induction heads, calibration ranks exactly the planted
//     heads on top, and the recipe it writes beats streaming at the same memory;
//   - bad input: window < 1, compensate outside {0, 1}, calibration lengths too short for the
//     repeats, fractions outside (0, 1), recipe files that are missing, a directory or
//     malformed (line and column named).
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <cmath>
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <vector>

#include "kvslim/kvslim.h"
#include "kvslim/testing/synthetic.h"
#include "test_support.h"

using namespace kvslim;
using kvslim::test::expect_error;

namespace {


using kvslim::test::random_rows;

// One layer, kv_heads heads, rows [kv_heads][n][d] contiguous.
void append_rows(KVCache& c, const float* k, const float* v, int kv_heads, int n, int d) {
  c.append(0, TensorView<const float>(k, {kv_heads, n, d}), TensorView<const float>(v, {kv_heads, n, d}));
}

}  // namespace

TEST(Razor, CompensationTokenIsTheMeanOfDroppedTokens) {
  // Tokens leave from the window (f32 codec, residual 0: pages of 4) and from sealed pages
  // alike; a prefill chunk folds many at once, decode steps one each.
  for (const char* codec : {"f32:group=4", "f32:group=32,residual=16"}) {
    SCOPED_TRACE(codec);
    const int d = 16, S = 3, W = 10;
    KVCache cache(CacheConfig{1, 1, 1, d, 4096, fmt::format("razor:sinks={},window={} | {}", S, W, codec)});
    std::mt19937 rng(7);
    std::vector<float> all_k, all_v;
    auto step = [&](int n) {
      const auto k = random_rows(rng, n, d), v = random_rows(rng, n, d);
      append_rows(cache, k.data(), v.data(), 1, n, d);
      cache.flush();
      all_k.insert(all_k.end(), k.begin(), k.end());
      all_v.insert(all_v.end(), v.begin(), v.end());
    };
    step(37);  // prefill: 24 tokens folded at once
    for (int i = 0; i < 60; ++i) step(1);
    step(9);
    const std::int64_t seen = static_cast<std::int64_t>(all_k.size()) / d;
    const std::int64_t folded = seen - S - W;
    const TokenStore& st = cache.store(0, 0);
    ASSERT_EQ(st.size(), S + W + 1);
    ASSERT_EQ(st.compensated(), folded);
    ASSERT_EQ(st.compensation_index(), S + W);
    const DenseKV m = cache.materialize(0, 0);
    // Sinks, window: the original rows.
    for (int j = 0; j < S + W; ++j) {
      const std::int64_t src = j < S ? j : seen - W + (j - S);
      for (int c = 0; c < d; ++c) ASSERT_EQ(m.k.data()[static_cast<std::size_t>(j) * d + c], all_k[static_cast<std::size_t>(src) * d + c]);
    }
    // The compensation token: the mean of tokens S .. seen - W - 1, weight N.
    for (int c = 0; c < d; ++c) {
      double sk = 0.0, sv = 0.0;
      for (std::int64_t t = S; t < seen - W; ++t) {
        sk += all_k[static_cast<std::size_t>(t) * d + c];
        sv += all_v[static_cast<std::size_t>(t) * d + c];
      }
      EXPECT_NEAR(m.k.data()[static_cast<std::size_t>(S + W) * d + c], sk / static_cast<double>(folded), 1e-6);
      EXPECT_NEAR(m.v.data()[static_cast<std::size_t>(S + W) * d + c], sv / static_cast<double>(folded), 1e-6);
    }
    EXPECT_NEAR(m.log_weights[static_cast<std::size_t>(S + W)], std::log(static_cast<double>(folded)), 1e-6);
    // Its position is the newest one folded.
    EXPECT_EQ(cache.positions(0, 0).back(), seen - W - 1);
    const CacheStats s = cache.stats();
    EXPECT_EQ(s.total_tokens, S + W + 1);
    EXPECT_EQ(s.total_seen, seen);
  }
}

TEST(Razor, AttentionEqualsNCopiesOfTheMean) {
  // GQA 4 query heads on 2 kv heads; a prefill chunk then decode steps, each attending.
  const int d = 32, qh = 4, kvh = 2, S = 2, W = 16, g = qh / kvh;
  KVCache cache(CacheConfig{1, qh, kvh, d, 4096, fmt::format("razor:sinks={},window={}", S, W)});
  std::mt19937 rng(11);
  std::vector<std::vector<float>> hk(kvh), hv(kvh);  // every token per kv head
  double worst = 0.0;
  for (int step = 0; step < 40; ++step) {
    const int n = step == 0 ? 50 : 1;
    const auto k = random_rows(rng, kvh * n, d), v = random_rows(rng, kvh * n, d), q = random_rows(rng, qh * n, d);
    append_rows(cache, k.data(), v.data(), kvh, n, d);
    for (int h = 0; h < kvh; ++h) {
      hk[h].insert(hk[h].end(), k.begin() + h * n * d, k.begin() + (h + 1) * n * d);
      hv[h].insert(hv[h].end(), v.begin() + h * n * d, v.begin() + (h + 1) * n * d);
    }
    std::vector<float> out(static_cast<std::size_t>(qh) * n * d);
    cache.attend(0, TensorView<const float>(q.data(), {qh, n, d}), TensorView<float>(out.data(), {qh, n, d}));
    if (step < 2) continue;  // the first attend sees everything (eviction runs after it)
    // Before this step's append, the head held sinks + window + compensation over the tokens
    // seen until then; the new token is the newest of the window.
    const std::int64_t seen_before = static_cast<std::int64_t>(hk[0].size()) / d - 1;
    const std::int64_t N = seen_before - S - W;
    for (int h = 0; h < qh; ++h) {
      const int kv = h / g;
      std::vector<float> rk, rv, lw;
      auto push = [&](const float* kr, const float* vr, float w) {
        rk.insert(rk.end(), kr, kr + d);
        rv.insert(rv.end(), vr, vr + d);
        lw.push_back(w);
      };
      for (std::int64_t t = 0; t < S; ++t) push(&hk[kv][t * d], &hv[kv][t * d], 0.0f);
      for (std::int64_t t = seen_before - W; t <= seen_before; ++t) push(&hk[kv][t * d], &hv[kv][t * d], 0.0f);
      // N explicit copies of the mean (no log-weight trick in the reference).
      std::vector<float> mk(d), mv(d);
      for (int c = 0; c < d; ++c) {
        double a = 0.0, b = 0.0;
        for (std::int64_t t = S; t < seen_before - W; ++t) {
          a += hk[kv][t * d + c];
          b += hv[kv][t * d + c];
        }
        mk[c] = static_cast<float>(a / static_cast<double>(N));
        mv[c] = static_cast<float>(b / static_cast<double>(N));
      }
      for (std::int64_t i = 0; i < N; ++i) push(mk.data(), mv.data(), 0.0f);
      std::vector<float> ref(d);
      test::ref_attention(&q[static_cast<std::size_t>(h) * d], rk.data(), rv.data(), static_cast<long>(lw.size()), d, d,
                          1.0 / std::sqrt(d), ref.data());
      worst = std::max(worst, test::rel_l2(&out[static_cast<std::size_t>(h) * d], ref.data(), d));
    }
  }
  EXPECT_LT(worst, 2e-5);
}

TEST(Razor, MemoryStaysConstantDuringDecode) {
  const int d = 64;
  for (const char* recipe : {"razor:sinks=4,window=64", "razor:sinks=4,window=64 | kivi:kbits=4,vbits=4,residual=32"}) {
    SCOPED_TRACE(recipe);
    KVCache cache(CacheConfig{1, 2, 1, d, 8192, recipe});
    std::mt19937 rng(3);
    std::int64_t early_max = 0, late_max = 0, late_min = INT64_MAX;
    std::vector<float> all_k;
    const int steps = 1500;
    for (int t = 0; t < steps; ++t) {
      const auto k = random_rows(rng, 1, d), v = random_rows(rng, 1, d), q = random_rows(rng, 2, d);
      all_k.insert(all_k.end(), k.begin(), k.end());
      append_rows(cache, k.data(), v.data(), 1, 1, d);
      std::vector<float> out(2 * d);
      cache.attend(0, TensorView<const float>(q.data(), {2, 1, d}), TensorView<float>(out.data(), {2, 1, d}));
      const CacheStats s = cache.stats();
      if (t >= 200) {
        ASSERT_EQ(s.total_tokens, 4 + 64 + 1) << "step " << t;
      }
      if (t >= 200 && t < 500) early_max = std::max(early_max, s.total_bytes);
      if (t >= 500) {
        late_max = std::max(late_max, s.total_bytes);
        late_min = std::min(late_min, s.total_bytes);
      }
    }
    // Pages fill and re-pack, so bytes move within a page's worth; they never grow.
    EXPECT_LE(late_max, early_max);
    EXPECT_GT(late_min, 0);
    // After 1431 folds (one per step) the f32 running mean is still the exact mean.
    if (std::string(recipe).find("kivi") == std::string::npos) {
      const DenseKV m = cache.materialize(0, 0);
      const std::int64_t N = steps - 4 - 64;
      for (int c = 0; c < d; ++c) {
        double sum = 0.0;
        for (std::int64_t t = 4; t < 4 + N; ++t) sum += all_k[static_cast<std::size_t>(t) * d + c];
        ASSERT_NEAR(m.k.data()[static_cast<std::size_t>(68) * d + c], sum / static_cast<double>(N), 1e-6) << c;
      }
    }
  }
}

TEST(Razor, WithoutCompensationIsStreaming) {
  const int d = 16;
  KVCache a(CacheConfig{1, 2, 1, d, 4096, "razor:sinks=2,window=20,compensate=0 | kivi:kbits=4,vbits=4,group=8"});
  KVCache b(CacheConfig{1, 2, 1, d, 4096, "streaming:sinks=2,window=20 | kivi:kbits=4,vbits=4,group=8"});
  EXPECT_EQ(a.recipe_for(0, 0).rfind("razor:sinks=2,window=20,compensate=0 | kivi:", 0), 0u);
  std::mt19937 rng(5);
  for (int t = 0; t < 120; ++t) {
    const int n = t == 0 ? 30 : 1;
    const auto k = random_rows(rng, n, d), v = random_rows(rng, n, d), q = random_rows(rng, 2 * n, d);
    std::vector<float> oa(2 * n * d), ob(oa.size());
    for (KVCache* c : {&a, &b}) append_rows(*c, k.data(), v.data(), 1, n, d);
    a.attend(0, TensorView<const float>(q.data(), {2, n, d}), TensorView<float>(oa.data(), {2, n, d}));
    b.attend(0, TensorView<const float>(q.data(), {2, n, d}), TensorView<float>(ob.data(), {2, n, d}));
    ASSERT_EQ(oa, ob) << "step " << t;
  }
  EXPECT_EQ(a.store(0, 0).specials(), 0);
  EXPECT_EQ(a.stats().total_tokens, 22);
}

TEST(Razor, BadParameters) {
  expect_error([] { KVCache c(CacheConfig{1, 1, 1, 8, 100, "razor:sinks=4,window=0"}); }, ErrorCode::kInvalidArgument,
               {"razor", "window=0"});
  expect_error([] { KVCache c(CacheConfig{1, 1, 1, 8, 100, "razor:window=8,compensate=2"}); },
               ErrorCode::kInvalidArgument, {"compensate=2"});
  expect_error([] { KVCache c(CacheConfig{1, 1, 1, 8, 100, "razor:window=8,sink=3"}); }, ErrorCode::kRecipe, {"sink"});
  // The budget (sinks + window + the compensation token) must fit the cache.
  expect_error([] { KVCache c(CacheConfig{1, 1, 1, 8, 100, "razor:sinks=4,window=96"}); }, ErrorCode::kCapacity,
               {"101"});
}

// ---- calibration ----

TEST(RetrievalCalibration, TokensRepeatAndErrorsNameTheValues) {
  const std::vector<int> ids = retrieval_calibration_tokens(103, 4, 9, 3, 512);
  ASSERT_EQ(ids.size(), 100u);  // 103 / 4 = 25 per repeat
  for (int i = 0; i < 75; ++i) EXPECT_EQ(ids[i], ids[i + 25]);
  for (int i = 0; i < 25; ++i)
    for (int j = 0; j < i; ++j) EXPECT_NE(ids[i], ids[j]);
  for (int x : ids) EXPECT_TRUE(x >= 3 && x < 512);
  EXPECT_EQ(ids, retrieval_calibration_tokens(103, 4, 9, 3, 512));
  EXPECT_NE(ids, retrieval_calibration_tokens(103, 4, 10, 3, 512));
  expect_error([] { retrieval_calibration_tokens(12, 4, 1, 0, 100); }, ErrorCode::kInvalidArgument,
               {"length=12", "too short", "repeats=4"});
  expect_error([] { retrieval_calibration_tokens(100, 1, 1, 0, 100); }, ErrorCode::kInvalidArgument, {"repeats=1"});
  expect_error([] { retrieval_calibration_tokens(400, 2, 1, 3, 100); }, ErrorCode::kInvalidArgument,
               {"200 distinct tokens", "[3, 100)"});
  RetrievalScores rs(2, 4, 2, ids);
  for (double p : {0.0, 1.0, -0.5, 1.5, std::nan("")})
    expect_error([&] { (void)rs.select(p); }, ErrorCode::kInvalidArgument, {"(0, 1)"});
  expect_error([&] { rs.add(0, 4, 3, std::vector<float>(4)); }, ErrorCode::kOutOfRange, {"q head 4"});
  expect_error([&] { rs.add(0, 0, 3, std::vector<float>(3)); }, ErrorCode::kShapeMismatch, {"needs 4"});
  expect_error([] { RetrievalScores bad(1, 6, 4, {1, 2}); }, ErrorCode::kInvalidArgument, {"q_heads=6"});
}

TEST(RetrievalCalibration, EchoAndInductionFollowTheirDefinitions) {
  // Sequence a b c a b c: the query at 3 ('a') has echo target 0 and induction target 1.
  RetrievalScores rs(1, 2, 1, {5, 6, 7, 5, 6, 7});
  rs.add(0, 0, 3, std::vector<float>{0.5f, 0.25f, 0.125f, 0.125f});
  rs.add(0, 0, 1, std::vector<float>{0.5f, 0.5f});  // first occurrence: not counted
  rs.add(0, 1, 5, std::vector<float>{0.0f, 0.0f, 0.25f, 0.0f, 0.0f, 0.75f});  // echo 2, induction 3
  EXPECT_EQ(rs.queries(0, 0), 1);
  EXPECT_DOUBLE_EQ(rs.echo(0, 0), 0.5);
  EXPECT_DOUBLE_EQ(rs.induction(0, 0), 0.25);
  EXPECT_DOUBLE_EQ(rs.echo(0, 1), 0.25);
  EXPECT_DOUBLE_EQ(rs.induction(0, 1), 0.0);
  const auto h = rs.heads();
  ASSERT_EQ(h.size(), 1u);
  EXPECT_DOUBLE_EQ(h[0].score, 0.75);  // max over the group of echo + induction
  EXPECT_EQ(h[0].q_head, 0);
}

namespace {

struct Planted {
  kvslim::testing::SyntheticOptions o;
  std::vector<kvslim::testing::SyntheticLayer> layers;
};

Planted planted_model() {
  Planted p;
  p.o.q_heads = 8;
  p.o.kv_heads = 4;
  // head_dim 128 and 2 heavy hitters per query: with more targets or fewer channels the
  // generator's unrelated logits get noisy enough to pull attention anywhere.
  p.o.head_dim = 128;
  p.o.targets_per_query = 2;
  p.o.tokens = 512;
  p.o.period = 128;
  p.o.outlier_channels = 0;
  p.o.seed = 42;
  p.o.retrieval_heads = {{1, 2}, {2, 0}, {3, 3}};
  p.o.local_window = 24;  // the other heads are local, as the paper finds
  for (int l = 0; l < 4; ++l) p.layers.push_back(kvslim::testing::generate_layer(p.o, l));
  return p;
}

// The generator's [heads][tokens][d] as the [tokens][heads][d] rows add_chunk takes.
std::vector<float> token_major(const std::vector<float>& x, int heads, int tokens, int d) {
  std::vector<float> out(x.size());
  for (int h = 0; h < heads; ++h)
    for (int t = 0; t < tokens; ++t)
      std::copy_n(&x[(static_cast<std::size_t>(h) * tokens + t) * d], d, &out[(static_cast<std::size_t>(t) * heads + h) * d]);
  return out;
}

RetrievalScores calibrate(const Planted& p) {
  RetrievalScores rs(4, p.o.q_heads, p.o.kv_heads, p.layers[0].token_ids);
  for (int l = 0; l < 4; ++l) {
    const auto& L = p.layers[l];
    const auto q = token_major(L.q, L.q_heads, L.tokens, L.head_dim), k = token_major(L.k, L.kv_heads, L.tokens, L.head_dim);
    rs.add_chunk(l, 0, L.tokens, L.head_dim, q.data(), k.data(), 1.0f / std::sqrt(static_cast<float>(L.head_dim)));
  }
  return rs;
}

// Decode every layer token by token; mean relative error of the attention outputs of the last
// `last` queries against exact attention over every token. Also returns the final bytes.
std::pair<double, std::int64_t> decode_error(const Planted& p, const std::string& recipe, int last) {
  const int d = p.o.head_dim, T = p.o.tokens, qh = p.o.q_heads, kvh = p.o.kv_heads, g = qh / kvh;
  KVCache cache(CacheConfig{4, qh, kvh, d, T, recipe});
  double sum = 0.0;
  long n = 0;
  std::vector<float> out(static_cast<std::size_t>(qh) * d), ref(d);
  for (int t = 0; t < T; ++t)
    for (int l = 0; l < 4; ++l) {
      const auto& L = p.layers[l];
      Layout kv;
      kv.rank = 3;
      kv.shape = {kvh, 1, d, 0};
      kv.strides = {static_cast<std::int64_t>(T) * d, d, 1, 0};
      cache.append(l, TensorView<const float>(L.k.data() + static_cast<std::size_t>(t) * d, kv),
                   TensorView<const float>(L.v.data() + static_cast<std::size_t>(t) * d, kv));
      Layout ql = kv;
      ql.shape[0] = qh;
      cache.attend(l, TensorView<const float>(L.q.data() + static_cast<std::size_t>(t) * d, ql),
                   TensorView<float>(out.data(), {qh, 1, d}));
      if (t < T - last) continue;
      for (int h = 0; h < qh; ++h) {
        test::ref_attention(L.q_head(h) + static_cast<std::size_t>(t) * d, L.k_head(h / g), L.v_head(h / g), t + 1, d, d,
                            1.0 / std::sqrt(d), ref.data());
        sum += test::rel_l2(out.data() + static_cast<std::size_t>(h) * d, ref.data(), d);
        ++n;
      }
    }
  return {sum / static_cast<double>(n), cache.stats().total_bytes};
}

}  // namespace

TEST(RetrievalCalibration, RanksThePlantedInductionHeadsOnTop) {
  const Planted p = planted_model();
  const RetrievalScores rs = calibrate(p);
  const auto ranked = rs.ranked();
  std::vector<std::pair<int, int>> top;
  for (int i = 0; i < 3; ++i) top.emplace_back(ranked[i].layer, ranked[i].kv_head);
  std::sort(top.begin(), top.end());
  EXPECT_EQ(top, p.o.retrieval_heads);
  // A clear margin: the planted heads' induction mass against every other head's.
  EXPECT_GT(ranked[2].induction, 0.3);
  EXPECT_LT(ranked[3].score, 0.1);
  for (std::size_t i = 0; i < 4; ++i)
    std::printf("rank %zu: layer %d kv head %d echo %.4f induction %.4f\n", i + 1, ranked[i].layer, ranked[i].kv_head,
                ranked[i].echo, ranked[i].induction);
  const auto chosen = rs.select(3.0 / 16.0);
  ASSERT_EQ(chosen.size(), 3u);
  // The recipe: every head razor, the chosen ones full.
  const std::string recipe = retrieval_recipe(chosen, "f32", "razor:sinks=4,window=32", {"planted test"});
  KVCache c(CacheConfig{4, 8, 4, 128, 512, recipe});
  for (int l = 0; l < 4; ++l)
    for (int h = 0; h < 4; ++h) {
      const bool full = std::find(p.o.retrieval_heads.begin(), p.o.retrieval_heads.end(), std::pair(l, h)) !=
                        p.o.retrieval_heads.end();
      EXPECT_EQ(c.recipe_for(l, h).rfind(full ? "f32:" : "razor:sinks=4,window=32 | f32:", 0), 0u)
          << l << "," << h << ": " << c.recipe_for(l, h);
    }
}

TEST(RetrievalCalibration, RazorBeatsStreamingAtTheSameMemory) {
  const Planted p = planted_model();
  const auto chosen = calibrate(p).select(3.0 / 16.0);
  const std::string razor = retrieval_recipe(chosen, "f32", "razor:sinks=4,window=32");
  // Same tokens per head on average: 3 full heads of 512 and 13 of 4 + 32 + 1, over 16.
  const int per_head = (3 * 512 + 13 * 37) / 16;
  const std::string streaming = fmt::format("streaming:sinks=4,window={}", per_head - 4);
  const auto [e_razor, b_razor] = decode_error(p, razor, 128);
  const auto [e_stream, b_stream] = decode_error(p, streaming, 128);
  const auto [e_nocomp, b_nocomp] = decode_error(p, retrieval_recipe(chosen, "f32", "razor:sinks=4,window=32,compensate=0"), 128);
  std::printf("razor %.4f (%lld B), razor without compensation %.4f (%lld B), %s %.4f (%lld B)\n", e_razor,
              static_cast<long long>(b_razor), e_nocomp, static_cast<long long>(b_nocomp), streaming.c_str(), e_stream,
              static_cast<long long>(b_stream));
  EXPECT_LE(static_cast<double>(b_razor), static_cast<double>(b_stream) * 1.05);  // no more memory than streaming
  EXPECT_LT(e_razor, 0.5 * e_stream);   // and half the error: the retrieval heads kept their past
  EXPECT_LT(e_razor, e_nocomp);         // the compensation token helps the other heads
}

// ---- recipe files ----

TEST(RecipeFile, LoadsCommentsAndLineBreaks) {
  const auto dir = std::filesystem::temp_directory_path() / "kvslim_recipe_file_test";
  std::filesystem::create_directories(dir);
  const auto path = (dir / "heads.recipe").string();
  {
    std::ofstream f(path);
    f << "# calibrated heads\nrazor:sinks=4,window=16   # the rest\n[layers=1 heads=0] f32\n[layers=0 heads=1]\n  kivi:kbits=8,vbits=8\n";
  }
  const std::string text = load_recipe(path);
  EXPECT_EQ(resolve_recipe(test::at_file(path)), text);
  EXPECT_EQ(resolve_recipe("f16"), "f16");
  KVCache c(CacheConfig{2, 2, 2, 8, 64, resolve_recipe(test::at_file(path))});
  EXPECT_EQ(c.recipe_for(1, 0).rfind("f32:", 0), 0u);
  EXPECT_EQ(c.recipe_for(0, 0).rfind("razor:sinks=4,window=16 | f32:", 0), 0u);
  EXPECT_EQ(c.recipe_for(0, 1).rfind("kivi:kbits=8,vbits=8", 0), 0u);

  expect_error([&] { (void)load_recipe((dir / "missing.recipe").string()); }, ErrorCode::kIo,
               {"missing.recipe", "cannot be opened"});
  expect_error([&] { (void)resolve_recipe(test::at_file(dir.string())); }, ErrorCode::kIo, {dir.string(), "directory"});
  expect_error([] { (void)resolve_recipe("@"); }, ErrorCode::kIo, {"path is empty"});
  {
    std::ofstream f(path);
    f << "# bad\nrazor:sinks=4,window=16\n[layers=1 heads=0 f32\n";
  }
  expect_error([&] { (void)load_recipe(path); }, ErrorCode::kRecipe, {path, "line 3, column"});
  {
    std::ofstream f(path);
    f << "# only a comment\n";
  }
  expect_error([&] { (void)load_recipe(path); }, ErrorCode::kRecipe, {path, "empty"});
  std::filesystem::remove_all(dir);
}
