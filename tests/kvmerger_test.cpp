// KVMerger (include/kvslim/policy/merge/kvmerger.h):
//   - a merged set of n identical tokens gives exactly the attention of the n tokens (f32, 1e-6);
//   - a brute-force oracle of the merge step: sets, pivot, Gaussian weights, merged key and
//     value, weight, position and importance, which pairs are joined first;
//   - the budget holds exactly at every decode step (merging, then the eviction fallback), and
//     merged states absorb their neighbours as a run leaves the recent window;
//   - on the generator with planted runs of similar adjacent keys, merging beats dropping the
//     same tokens (keep=pivot) and H2O at the same budget;
//   - bad input: threshold outside [-1, 1], sigma <= 0, keep=, a budget over the capacity,
//     pre-RoPE keys.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "kvslim/kvslim.h"
#include "kvslim/kernels/kernel_table.h"
#include "kvslim/testing/synthetic.h"
#include "test_support.h"

using namespace kvslim;
using kvslim::test::expect_error;

namespace {

using kvslim::test::random_rows;

void append_rows(KVCache& c, const std::vector<float>& k, const std::vector<float>& v, int first, int n, int d) {
  c.append(0, TensorView<const float>(k.data() + static_cast<std::size_t>(first) * d, {1, n, d}),
           TensorView<const float>(v.data() + static_cast<std::size_t>(first) * d, {1, n, d}));
}

TEST(KVMerger, IdenticalTokensMergedGiveTheSameAttention) {
  const int d = 16, distinct = 6, copies = 7, recent = 4;
  std::mt19937 rng(5);
  auto k = random_rows(rng, distinct + copies + recent + 1, d);
  auto v = random_rows(rng, distinct + copies + recent + 1, d);
  for (int j = distinct + 1; j < distinct + copies; ++j)
    for (int c = 0; c < d; ++c) {
      k[j * d + c] = k[distinct * d + c];
      v[j * d + c] = v[distinct * d + c];
    }
  const int n = distinct + copies + recent;  // the prompt
  // Budget: exactly the copies' excess (copies - 1) over the prompt.
  const std::string recipe = "kvmerger:budget=" + std::to_string(n - (copies - 1)) + ",recent=" +
                             std::to_string(recent) + ",threshold=0.9999";
  KVCache merged(CacheConfig{1, 1, 1, d, 64, recipe});
  KVCache full(CacheConfig{1, 1, 1, d, 64, "f32"});
  std::vector<float> q = random_rows(rng, n + 1, d), out(static_cast<std::size_t>(n) * d), ref(out.size());
  for (KVCache* c : {&merged, &full}) {
    append_rows(*c, k, v, 0, n, d);
    c->attend(0, TensorView<const float>(q.data(), {1, n, d}), TensorView<float>(out.data(), {1, n, d}));
  }
  ASSERT_EQ(merged.tokens(0, 0), n - (copies - 1));
  ASSERT_EQ(merged.store(0, 0).specials(), 1);
  const DenseKV x = merged.materialize(0, 0);
  EXPECT_NEAR(x.log_weights.back(), std::log(static_cast<float>(copies)), 1e-6);
  // The decode step after the merge: its query sees the merged state in place of the copies.
  std::vector<float> o1(d), o2(d);
  append_rows(merged, k, v, n, 1, d);
  append_rows(full, k, v, n, 1, d);
  merged.attend(0, TensorView<const float>(q.data() + static_cast<std::size_t>(n) * d, {1, 1, d}),
                TensorView<float>(o1.data(), {1, 1, d}));
  full.attend(0, TensorView<const float>(q.data() + static_cast<std::size_t>(n) * d, {1, 1, d}),
              TensorView<float>(o2.data(), {1, 1, d}));
  for (int c = 0; c < d; ++c) EXPECT_NEAR(o1[c], o2[c], 1e-6) << "channel " << c;
}

// The merge step, checked against a brute-force computation of what the header promises.
TEST(KVMerger, MergeStepMatchesABruteForceOracle) {
  const int d = 8, n = 14, recent = 3;
  std::mt19937 rng(11);
  auto k = random_rows(rng, n, d);
  auto v = random_rows(rng, n, d);
  // Planted runs: tokens 2-5 (4 tokens) and 8-9 (2 tokens) are small perturbations of their
  // first token; token 12 (inside the recent window) copies 11 and must not be merged.
  std::normal_distribution<float> noise(0.0f, 0.05f);
  auto plant = [&](int from, int to) {
    for (int j = from + 1; j <= to; ++j)
      for (int c = 0; c < d; ++c) k[j * d + c] = k[from * d + c] + noise(rng);
  };
  plant(2, 5);
  plant(8, 9);
  plant(11, 12);
  const double threshold = 0.95, sigma = 0.3;
  const std::vector<float> importance = {5, 1, 0.5f, 3, 2, 7, 1, 1, 4, 9, 1, 1, 1, 1};
  for (int budget : {n - 4, n - 2}) {  // every planted pair, and the two most similar only
    const std::string recipe = "kvmerger:budget=" + std::to_string(budget) + ",recent=" + std::to_string(recent) +
                               ",threshold=0.95,sigma=0.3";
    const Pipeline pipe = build_pipeline(parse_recipe(recipe).base, d);
    TokenStore store(d, &pipe);
    std::vector<std::int64_t> pos(n);
    for (int j = 0; j < n; ++j) pos[j] = 10 + j;
    const auto& kt = kernels::active();
    store.append(kt, k.data(), d, v.data(), d, n, pos.data());
    ASSERT_EQ(store.importance().size(), static_cast<std::size_t>(n));
    std::copy(importance.begin(), importance.end(), store.importance().begin());
    store.flush(kt);

    // Oracle: adjacent cosines among the candidates [0, n - recent); the n - budget most
    // similar pairs at or above the threshold are joined; each chain of joined pairs is a set.
    auto cosine = [&](int a, int b) {
      double ab = 0, aa = 0, bb = 0;
      for (int c = 0; c < d; ++c) {
        ab += double{k[a * d + c]} * k[b * d + c];
        aa += double{k[a * d + c]} * k[a * d + c];
        bb += double{k[b * d + c]} * k[b * d + c];
      }
      return ab / std::sqrt(aa * bb);
    };
    std::vector<std::pair<double, int>> pairs;
    for (int i = 1; i < n - recent; ++i)
      if (cosine(i - 1, i) >= threshold) pairs.emplace_back(cosine(i - 1, i), i);
    ASSERT_EQ(pairs.size(), 4u) << "the planted runs 2-5 and 8-9 (12 is recent)";
    std::sort(pairs.begin(), pairs.end(), [](auto& a, auto& b) { return a.first > b.first; });
    std::vector<bool> joined(n, false);
    for (int t = 0; t < n - budget; ++t) joined[pairs[t].second] = true;
    struct Set {
      int first, len;
    };
    std::vector<Set> sets;
    for (int a = 0; a < n - recent;) {
      int b = a + 1;
      while (b < n - recent && joined[b]) ++b;
      if (b - a >= 2) sets.push_back({a, b - a});
      a = b;
    }
    const int removed = n - budget;
    ASSERT_EQ(store.size(), n - removed);
    ASSERT_EQ(store.specials(), static_cast<std::int64_t>(sets.size()));
    std::vector<float> mk(static_cast<std::size_t>(store.size()) * d), mv(mk.size()), lw(store.size());
    store.materialize(kt, mk.data(), mv.data(), lw.data());
    const std::vector<std::int64_t> kept = store.positions();
    for (std::size_t si = 0; si < sets.size(); ++si) {
      const Set& s = sets[si];
      int p = s.first;
      for (int i = s.first + 1; i < s.first + s.len; ++i)
        if (importance[i] > importance[p]) p = i;
      double np = 0;
      for (int c = 0; c < d; ++c) np += double{k[p * d + c]} * k[p * d + c];
      std::vector<double> ek(d, 0), ev(d, 0);
      double gs = 0, is = 0;
      for (int i = s.first; i < s.first + s.len; ++i) {
        double dist = 0;
        for (int c = 0; c < d; ++c) dist += (double{k[i * d + c]} - k[p * d + c]) * (double{k[i * d + c]} - k[p * d + c]);
        const double g = std::exp(-dist / (2 * sigma * sigma * np));
        gs += g;
        is += importance[i];
        for (int c = 0; c < d; ++c) {
          ek[c] += g * k[i * d + c];
          ev[c] += g * v[i * d + c];
        }
      }
      const std::size_t row = static_cast<std::size_t>(store.specials_first()) + si;
      for (int c = 0; c < d; ++c) {
        EXPECT_NEAR(mk[row * d + c], ek[c] / gs, 1e-6) << "budget " << budget << " set " << si << " ch " << c;
        EXPECT_NEAR(mv[row * d + c], ev[c] / gs, 1e-6) << "budget " << budget << " set " << si << " ch " << c;
      }
      EXPECT_NEAR(lw[row], std::log(static_cast<double>(s.len)), 1e-6);
      EXPECT_EQ(kept[row], pos[p]) << "the pivot's position";
      EXPECT_NEAR(store.importance()[row], is, 1e-5) << "the set's summed importance";
      // The set's tokens are gone from the ordinary tokens.
      for (int i = s.first; i < s.first + s.len; ++i)
        EXPECT_EQ(std::find(kept.begin(), kept.begin() + store.ordinary(), pos[i]), kept.begin() + store.ordinary());
    }
    if (budget == n - 4) {
      EXPECT_EQ(sets.size(), 2u);
    }
    int joined_pairs = 0;
    for (const Set& st : sets) joined_pairs += st.len - 1;
    EXPECT_EQ(joined_pairs, removed) << "one entry less per joined pair";
  }
}

TEST(KVMerger, HoldsTheBudgetAtEveryDecodeStep) {
  const int d = 16, T = 400, budget = 64;
  std::mt19937 rng(3);
  auto k = random_rows(rng, T, d);
  auto v = random_rows(rng, T, d);
  // Half the stream comes in runs of near-copies, so both merging and the fallback run.
  std::normal_distribution<float> noise(0.0f, 0.1f);
  for (int j = 1; j < T; ++j)
    if ((j / 5) % 2 == 0)
      for (int c = 0; c < d; ++c) k[j * d + c] = k[(j - 1) * d + c] + noise(rng);
  for (const char* extra : {"", ",keep=pivot"}) {
    KVCache c(CacheConfig{1, 2, 1, d, T, "kvmerger:budget=64,recent=16,threshold=0.95" + std::string(extra)});
    const auto q = random_rows(rng, 2, d);
    std::vector<float> out(2 * d);
    std::int64_t specials_max = 0;
    float weight_max = 0.0f;
    for (int t = 0; t < T; ++t) {
      append_rows(c, k, v, t, 1, d);
      c.attend(0, TensorView<const float>(q.data(), {2, 1, d}), TensorView<float>(out.data(), {2, 1, d}));
      ASSERT_EQ(c.tokens(0, 0), std::min(t + 1, budget)) << "step " << t << extra;
      for (float x : out) ASSERT_TRUE(std::isfinite(x));
      specials_max = std::max(specials_max, c.store(0, 0).specials());
      for (std::int64_t sp = 0; sp < c.store(0, 0).specials(); ++sp)
        weight_max = std::max(weight_max, std::exp(c.store(0, 0).special_log_weight(sp)));
    }
    if (*extra)
      EXPECT_EQ(specials_max, 0) << "keep=pivot merges nothing";
    else
      EXPECT_GE(weight_max, 5.5f) << "a run of 6 near-copies leaving the recent window one token per step became one state";
    EXPECT_EQ(c.stats().total_seen, T);
  }
}

// Generator data with planted runs of similar adjacent keys (and values): merging must beat
// dropping the same tokens, which keep=pivot does.
TEST(KVMerger, BeatsDroppingTheSameTokensOnPlantedRuns) {
  kvslim::testing::SyntheticOptions o;
  o.q_heads = 4;
  o.kv_heads = 2;
  o.head_dim = 64;
  o.tokens = 640;
  o.seed = 21;
  auto L = kvslim::testing::generate_layer(o);
  std::mt19937 rng(7);
  std::normal_distribution<float> noise(0.0f, 0.05f);
  std::uniform_int_distribution<int> len(2, 6);
  for (int h = 0; h < L.kv_heads; ++h) {
    float* k = L.k.data() + static_cast<std::size_t>(h) * L.tokens * L.head_dim;
    float* v = L.v.data() + static_cast<std::size_t>(h) * L.tokens * L.head_dim;
    for (int t = 0; t < L.tokens;) {
      const int n = len(rng);
      for (int j = t + 1; j < std::min(t + n, L.tokens); ++j)
        for (int c = 0; c < L.head_dim; ++c) {
          k[j * L.head_dim + c] = k[t * L.head_dim + c] * (1.0f + noise(rng));
          v[j * L.head_dim + c] = v[t * L.head_dim + c] + noise(rng);
        }
      t += n;
    }
  }
  const std::string b = "budget=160,recent=48";
  const double merged = test::synthetic_decode(L, "kvmerger:" + b + ",threshold=0.9", 160).error;
  const double pivot = test::synthetic_decode(L, "kvmerger:" + b + ",threshold=0.9,keep=pivot", 160).error;
  const double h2o = test::synthetic_decode(L, "h2o:" + b, 160).error;
  std::printf("planted runs, budget 160 of 640: attention error kvmerger %.4f, same tokens dropped %.4f, h2o %.4f\n",
              merged, pivot, h2o);
  EXPECT_LT(merged * 2.0, pivot);
  EXPECT_LT(merged * 2.0, h2o);
}

TEST(KVMerger, RecipeErrors) {
  auto make = [](std::string r, bool pre = false) {
    return [r, pre] {
      CacheConfig c{1, 1, 1, 32, 64, r};
      if (pre) {
        c.pre_rope_keys = true;
        c.rope = RopeSpec{};
      }
      KVCache x(c);
    };
  };
  expect_error(make("kvmerger:budget=32,threshold=1.5"), ErrorCode::kInvalidArgument, {"threshold", "1.5"});
  expect_error(make("kvmerger:budget=32,threshold=-2"), ErrorCode::kInvalidArgument, {"threshold", "-2"});
  expect_error(make("kvmerger:budget=32,sigma=0"), ErrorCode::kInvalidArgument, {"sigma", "0"});
  expect_error(make("kvmerger:budget=32,keep=all"), ErrorCode::kInvalidArgument, {"keep=all"});
  expect_error(make("kvmerger:budget=128"), ErrorCode::kCapacity, {"merge budget 128", "max_tokens 64"});
  expect_error(make("kvmerger:budget=32,recent=32"), ErrorCode::kInvalidArgument, {"recent=32", "budget=32"});
  expect_error(make("kvmerger:threshold=0.9"), ErrorCode::kInvalidArgument, {"budget"});
  expect_error(make("kvmerger:budget=32,tau=0.9"), ErrorCode::kRecipe, {"tau"});
  expect_error(make("kvmerger:budget=32", true), ErrorCode::kInvalidArgument, {"pre-RoPE", "kvmerger"});
  KVCache ok(CacheConfig{1, 1, 1, 32, 64, "kvmerger:ratio=0.5 | kivi:kbits=4,vbits=4"});
  EXPECT_EQ(ok.recipe_for(0, 0), "kvmerger:ratio=0.5,recent=32,threshold=0.9,sigma=0.5 | " +
                                     build_pipeline(parse_recipe("kivi:kbits=4,vbits=4").base, 32).text);
}

}  // namespace
