// H2O's claim where the data has the trait: on the LLM-like generator (an attention sink and
// Zipf-distributed heavy hitters), decode-time eviction at a 25% budget, token by token with
// the f32 codec, is compared by attention-output error against exact full attention.
// H2O must have at most half the error of random eviction and of StreamingLLM at the same
// budget (the paper's ordering). On the small real models this ordering does not hold for
// every pair (docs: random is as good as H2O on stories260K), so it is asserted here only.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "kvslim/kvslim.h"
#include "kvslim/testing/synthetic.h"
#include "test_support.h"

using namespace kvslim;

namespace {


}  // namespace

TEST(EvictionGenerator, H2OHalvesTheErrorOfRandomAndStreamingWhereHeavyHittersExist) {
  kvslim::testing::SyntheticOptions o;
  o.q_heads = 4;
  o.kv_heads = 1;
  o.head_dim = 64;
  o.tokens = 1024;
  o.seed = 7;
  const kvslim::testing::SyntheticLayer L = kvslim::testing::generate_layer(o);
  const int budget = o.tokens / 4;
  const double h2o = test::synthetic_decode(L, "h2o:budget=" + std::to_string(budget) + " | f32", budget).error;
  const double rnd = test::synthetic_decode(L, "random:budget=" + std::to_string(budget) + ",seed=1 | f32", budget).error;
  const double str = test::synthetic_decode(L, "streaming:sinks=4,window=" + std::to_string(budget - 4) + " | f32", budget).error;
  std::printf("generator, 25%% budget, attention error: h2o %.4f, random %.4f, streaming %.4f\n", h2o, rnd, str);
  EXPECT_LE(h2o, 0.5 * rnd);
  EXPECT_LE(h2o, 0.5 * str);
}

// Re-packing KIVI pages re-quantizes keys over the merged page's range (values keep their
// codes up to rounding). Bound the extra error: after a long H2O decode that re-packs pages
// many times, the kept keys' mean relative error (decoded vs original) is at most
// kRepackKeyErrorFactor times that of the same codec without eviction, where every key was
// quantized once. Values, per token, must stay within 1.05x.
TEST(EvictionGenerator, RepackedKiviKeysStayCloseToOneQuantization) {
  constexpr double kRepackKeyErrorFactor = 2.0;  // measured 1.60 (0.0855 -> 0.1368)
  kvslim::testing::SyntheticOptions o;
  o.q_heads = 4;
  o.kv_heads = 1;
  o.head_dim = 64;
  o.tokens = 3000;
  o.seed = 11;
  const kvslim::testing::SyntheticLayer L = kvslim::testing::generate_layer(o);
  const int d = o.head_dim, T = o.tokens;
  auto key_value_error = [&](const std::string& recipe, int* repacked) {
    KVCache cache(CacheConfig{1, o.q_heads, 1, d, T, recipe});
    std::vector<float> out(static_cast<std::size_t>(o.q_heads) * d);
    for (int t = 0; t < T; ++t) {
      cache.append(0, TensorView<const float>(L.k.data() + static_cast<std::size_t>(t) * d, {1, 1, d}),
                   TensorView<const float>(L.v.data() + static_cast<std::size_t>(t) * d, {1, 1, d}));
      Layout ql;
      ql.rank = 3;
      ql.shape = {o.q_heads, 1, d, 0};
      ql.strides = {static_cast<std::int64_t>(T) * d, d, 1, 0};
      cache.attend(0, TensorView<const float>(L.q.data() + static_cast<std::size_t>(t) * d, ql),
                   TensorView<float>(out.data(), {o.q_heads, 1, d}));
    }
    const TokenStore& s = cache.store(0, 0);
    *repacked = static_cast<int>(s.repacked_pages());
    const DenseKV kv = cache.materialize(0, 0);
    double ek = 0.0, ev = 0.0;
    const std::int64_t pages = s.sink_count() + s.sealed_tokens();  // judge page tokens only
    for (std::int64_t j = 0; j < pages; ++j) {
      const std::int64_t p = kv.positions[j];
      ek += test::rel_l2(kv.k.data() + j * d, L.k.data() + p * d, d);
      ev += test::rel_l2(kv.v.data() + j * d, L.v.data() + p * d, d);
    }
    return std::pair<double, double>{ek / static_cast<double>(pages), ev / static_cast<double>(pages)};
  };
  int repacked = 0, none = 0;
  const auto [k1, v1] = key_value_error("kivi:kbits=4,vbits=4,residual=0", &none);
  const auto [k2, v2] = key_value_error("h2o:budget=600,recent=64 | kivi:kbits=4,vbits=4,residual=0", &repacked);
  std::printf("4-bit key error: once %.4f, after re-packing %.4f; values %.4f vs %.4f; %d pages re-packed\n", k1,
              k2, v1, v2, repacked);
  EXPECT_EQ(none, 0);
  EXPECT_GT(repacked, 20) << "the decode must have re-packed pages for this test to mean anything";
  EXPECT_LE(k2, kRepackKeyErrorFactor * k1);
  EXPECT_LE(v2, 1.05 * v1);
}
