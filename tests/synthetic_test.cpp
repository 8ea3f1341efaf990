// The LLM-like generator: deterministic per seed; key outlier channels 10-20x the median
// channel; values without outliers; an attention sink on the first token; attention over the
// rest heavy-tailed (a small share of tokens takes most of the mass).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "kvslim/testing/synthetic.h"
#include "test_support.h"

using namespace kvslim::testing;

namespace {
// Mean |x| per channel over all tokens of head 0.
std::vector<double> channel_magnitude(const float* x, int T, int d) {
  std::vector<double> m(d, 0.0);
  for (int t = 0; t < T; ++t)
    for (int c = 0; c < d; ++c) m[c] += std::fabs(static_cast<double>(x[t * d + c])) / T;
  return m;
}
double median(std::vector<double> v) {
  std::nth_element(v.begin(), v.begin() + static_cast<long>(v.size() / 2), v.end());
  return v[v.size() / 2];
}
}  // namespace

TEST(Synthetic, DeterministicPerSeed) {
  SyntheticOptions o;
  o.tokens = 64;
  o.q_heads = 4;
  o.kv_heads = 2;
  o.head_dim = 64;
  const auto a = generate_layer(o), b = generate_layer(o);
  EXPECT_EQ(a.k, b.k);
  EXPECT_EQ(a.q, b.q);
  o.seed = 2;
  EXPECT_NE(generate_layer(o).k, a.k);
  EXPECT_NE(generate_layer(SyntheticOptions{o}, 1).k, generate_layer(o, 0).k);
}

TEST(Synthetic, LlmLikeTraits) {
  SyntheticOptions o;
  o.tokens = 1024;
  o.q_heads = 8;
  o.kv_heads = 2;
  o.head_dim = 128;
  const auto L = generate_layer(o);
  const int d = o.head_dim, T = o.tokens;
  for (int h = 0; h < o.kv_heads; ++h) {
    const auto km = channel_magnitude(L.k_head(h) + 4 * d, T - 4, d);  // skip the sink token
    const double med = median(km);
    for (int c : L.outlier_channels) {
      EXPECT_GT(km[c] / med, 10.0) << "channel " << c;
      EXPECT_LT(km[c] / med, 20.0) << "channel " << c;
    }
    const auto vm = channel_magnitude(L.v_head(h), T, d);
    EXPECT_LT(*std::max_element(vm.begin(), vm.end()) / median(vm), 3.0);
  }
  // Attention statistics of the last 256 queries of every head.
  double sink = 0.0, top10 = 0.0;
  int n = 0;
  for (int h = 0; h < o.q_heads; ++h) {
    const int kv = h / (o.q_heads / o.kv_heads);
    for (int t = T - 256; t < T; t += 8) {
      std::vector<float> out(d);
      std::vector<double> p(t + 1);
      kvslim::test::ref_attention(L.q_head(h) + t * d, L.k_head(kv), L.v_head(kv), t + 1, d, d, 1.0 / std::sqrt(d),
                                  out.data(), p.data());
      sink += p[0];
      std::vector<double> rest(p.begin() + 1, p.end());
      std::sort(rest.rbegin(), rest.rend());
      double s = 0.0, all = 0.0;
      for (std::size_t j = 0; j < rest.size(); ++j) {
        all += rest[j];
        if (j < rest.size() / 10) s += rest[j];
      }
      top10 += s / all;
      ++n;
    }
  }
  sink /= n;
  top10 /= n;
  EXPECT_GT(sink, 0.2) << "first token should be an attention sink";
  EXPECT_LT(sink, 0.9);
  EXPECT_GT(top10, 0.6) << "top 10% of the other tokens should take most of their mass";
  std::printf("synthetic: sink mass %.3f, top-10%% share of the rest %.3f\n", sink, top10);
}
