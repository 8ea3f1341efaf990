// layer_similarity (kvslim/testing/similarity.h): the cosines of adjacent layers' key and value
// states on a hand-built recording whose cosines are known by hand (identical, orthogonal,
// opposite, zero-vector and 3-4-5 pairs, with the strict "< threshold" at a cosine equal to
// it); on a real recording, equality with an independent double loop and, for keys, with the
// pre-RoPE cosine (RoPE rotates both layers alike); pooling over recordings weighted by
// pairs; and the errors (threshold outside [-1, 1], recordings of two models, short tensors).
#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "kvslim/testing/recordings.h"
#include "kvslim/testing/similarity.h"
#include "test_support.h"

namespace kvslim {
namespace {

using testing::LayerPairSimilarity;
using testing::Recording;
using testing::layer_similarity;

using Row = std::array<float, 2>;

/// A recording of 1 kv head and head_dim 2 from rows [layer][token] of K and V.
Recording make(const std::string& dir, const std::vector<std::vector<Row>>& k,
               const std::vector<std::vector<Row>>& v) {
  Recording r;
  r.dir = dir;
  r.layers = static_cast<int>(k.size());
  r.q_heads = r.kv_heads = 1;
  r.head_dim = 2;
  r.tokens = static_cast<int>(k.front().size());
  for (const auto& layer : k)
    for (const Row& row : layer) r.k.insert(r.k.end(), row.begin(), row.end());
  for (const auto& layer : v)
    for (const Row& row : layer) r.v.insert(r.v.end(), row.begin(), row.end());
  return r;
}

// 3 layers, 3 tokens. Cosines per token, by hand:
//   K 0→1: (1,0)·(2,0) = 1 | (1,0)·(0,3) = 0 | (0,1)·(0,-1) = -1
//   K 1→2: (2,0)·(0,0): zero vector = 0 | (0,3)·(1,1) = 3/(3√2) = 1/√2 | (0,-1)·(3,-4) = 4/5
//   V 0→1: (1,2)·(-2,-4) = -1 | (-1,0)·(-3,0) = 1 | (5,5)·(1,0) = 5/(5√2) = 1/√2
//   V 1→2: (-2,-4)·(4,-2) = 0 | (-3,0)·(-0.5,0) = 1 | (1,0)·(0,-2) = 0
const std::vector<std::vector<Row>> kK = {{{1, 0}, {1, 0}, {0, 1}},  //
                                          {{2, 0}, {0, 3}, {0, -1}},
                                          {{0, 0}, {1, 1}, {3, -4}}};
const std::vector<std::vector<Row>> kV = {{{1, 2}, {-1, 0}, {5, 5}},  //
                                          {{-2, -4}, {-3, 0}, {1, 0}},
                                          {{4, -2}, {-0.5f, 0}, {0, -2}}};
const double kR2 = std::sqrt(0.5);  // 1/√2

TEST(LayerSimilarity, HandBuiltCosinesAtThresholdHalf) {
  const auto s = layer_similarity(make("hand", kK, kV), 0.5);
  ASSERT_EQ(s.size(), 2u);
  EXPECT_EQ(s[0].lower, 0);
  EXPECT_EQ(s[0].upper, 1);
  EXPECT_EQ(s[1].lower, 1);
  EXPECT_EQ(s[1].upper, 2);
  for (const auto& p : s) EXPECT_EQ(p.pairs, 3);
  // K 0→1: mean (1 + 0 - 1)/3 = 0; below 0.5: 0 and -1, 2 of 3.
  EXPECT_NEAR(s[0].k_cos, 0.0, 1e-15);
  EXPECT_DOUBLE_EQ(s[0].k_below, 2.0 / 3);
  // K 1→2: mean (0 + 1/√2 + 0.8)/3 = 0.502369; below 0.5: only the zero vector, 1 of 3.
  EXPECT_NEAR(s[1].k_cos, (kR2 + 0.8) / 3, 1e-15);
  EXPECT_DOUBLE_EQ(s[1].k_below, 1.0 / 3);
  // V 0→1: mean (-1 + 1 + 1/√2)/3 = 0.235702; below 0.5: -1 only, 1 of 3.
  EXPECT_NEAR(s[0].v_cos, kR2 / 3, 1e-15);
  EXPECT_DOUBLE_EQ(s[0].v_below, 1.0 / 3);
  // V 1→2: mean (0 + 1 + 0)/3 = 1/3; below 0.5: the two zeros, 2 of 3.
  EXPECT_NEAR(s[1].v_cos, 1.0 / 3, 1e-15);
  EXPECT_DOUBLE_EQ(s[1].v_below, 2.0 / 3);
}

TEST(LayerSimilarity, HandBuiltFractionsAtOtherThresholds) {
  const Recording r = make("hand", kK, kV);
  // Threshold 0.8: "below" is strict, so K 1→2's 4/5 (exactly 0.8 in double) is not below,
  // 1/√2 and 0 are: 2 of 3. K 0→1: 0 and -1. V 0→1: -1 and 1/√2. V 1→2: both zeros.
  auto s = layer_similarity(r, 0.8);
  EXPECT_DOUBLE_EQ(s[0].k_below, 2.0 / 3);
  EXPECT_DOUBLE_EQ(s[1].k_below, 2.0 / 3);
  EXPECT_DOUBLE_EQ(s[0].v_below, 2.0 / 3);
  EXPECT_DOUBLE_EQ(s[1].v_below, 2.0 / 3);
  // Threshold 0: only the opposite pairs (K 0→1 token 2, V 0→1 token 0); cosine 0 is not below.
  s = layer_similarity(r, 0.0);
  EXPECT_DOUBLE_EQ(s[0].k_below, 1.0 / 3);
  EXPECT_DOUBLE_EQ(s[1].k_below, 0.0);
  EXPECT_DOUBLE_EQ(s[0].v_below, 1.0 / 3);
  EXPECT_DOUBLE_EQ(s[1].v_below, 0.0);
  // The ends of the range: nothing is below -1; below 1 is everything but the exact 1s
  // (K 0→1 token 0, V 0→1 token 1, V 1→2 token 1).
  s = layer_similarity(r, -1.0);
  for (const auto& p : s) EXPECT_EQ(p.k_below + p.v_below, 0.0);
  s = layer_similarity(r, 1.0);
  EXPECT_DOUBLE_EQ(s[0].k_below, 2.0 / 3);
  EXPECT_DOUBLE_EQ(s[1].k_below, 1.0);
  EXPECT_DOUBLE_EQ(s[0].v_below, 2.0 / 3);
  EXPECT_DOUBLE_EQ(s[1].v_below, 2.0 / 3);
  // The means do not depend on the threshold.
  EXPECT_NEAR(s[1].k_cos, (kR2 + 0.8) / 3, 1e-15);
}

TEST(LayerSimilarity, PoolingIsWeightedByPairs) {
  // A second recording of the same model with one token (token 0 of the first): per pair
  // 3 + 1 = 4 pairs, means (3 * mean_a + cos_token0) / 4.
  const Recording a = make("a", kK, kV);
  const Recording b = make("b", {{kK[0][0]}, {kK[1][0]}, {kK[2][0]}}, {{kV[0][0]}, {kV[1][0]}, {kV[2][0]}});
  const auto s = layer_similarity(std::vector<Recording>{a, b}, 0.5);
  ASSERT_EQ(s.size(), 2u);
  EXPECT_EQ(s[0].pairs, 4);
  // K 0→1: (1 + 0 - 1 + 1)/4; below: 2 of 4. K 1→2: (0 + 1/√2 + 0.8 + 0)/4; below 2 of 4.
  EXPECT_NEAR(s[0].k_cos, 0.25, 1e-15);
  EXPECT_DOUBLE_EQ(s[0].k_below, 0.5);
  EXPECT_NEAR(s[1].k_cos, (kR2 + 0.8) / 4, 1e-15);
  EXPECT_DOUBLE_EQ(s[1].k_below, 0.5);
  // V 0→1: (-1 + 1 + 1/√2 - 1)/4; below 2 of 4. V 1→2: (0 + 1 + 0 + 0)/4; below 3 of 4.
  EXPECT_NEAR(s[0].v_cos, (kR2 - 1) / 4, 1e-15);
  EXPECT_DOUBLE_EQ(s[0].v_below, 0.5);
  EXPECT_NEAR(s[1].v_cos, 0.25, 1e-15);
  EXPECT_DOUBLE_EQ(s[1].v_below, 0.75);
}

TEST(LayerSimilarity, ThresholdOutsideTheCosineRangeIsNamed) {
  const Recording r = make("hand", kK, kV);
  for (const double t : {1.5, -1.25, std::nan("")}) {
    test::expect_error([&] { layer_similarity(r, t); }, ErrorCode::kInvalidArgument,
                       {"threshold " + fmt::format("{}", t), "[-1, 1]"});
    test::expect_error([&] { layer_similarity(std::vector<Recording>{r}, t); }, ErrorCode::kInvalidArgument,
                       {"threshold " + fmt::format("{}", t)});
  }
}

TEST(LayerSimilarity, RecordingsOfTwoModelsAreNamed) {
  const Recording a = make("model_a/w0", kK, kV);
  Recording b = a;
  b.dir = "model_b/w0";
  b.head_dim = 1;  // same floats, read as 6 tokens of head_dim 1
  b.tokens = 6;
  test::expect_error([&] { layer_similarity(std::vector<Recording>{a, b}, 0.5); }, ErrorCode::kInvalidArgument,
                     {"one model", "'model_a/w0' has 3 layers, 1 kv heads, head_dim 2",
                      "'model_b/w0' has 3 layers, 1 kv heads, head_dim 1"});
  Recording c = a;
  c.dir = "model_c/w0";
  c.layers = 2;
  c.k.resize(c.k.size() / 3 * 2);
  c.v.resize(c.v.size() / 3 * 2);
  test::expect_error([&] { layer_similarity(std::vector<Recording>{a, c}, 0.5); }, ErrorCode::kInvalidArgument,
                     {"'model_c/w0' has 2 layers"});
  test::expect_error([&] { layer_similarity(std::vector<Recording>{}, 0.5); }, ErrorCode::kInvalidArgument,
                     {"no recordings"});
}

TEST(LayerSimilarity, ShortTensorsAreRejected) {
  Recording r = make("short", kK, kV);
  r.v.pop_back();
  test::expect_error([&] { layer_similarity(r, 0.5); }, ErrorCode::kShapeMismatch,
                     {"'short' has 18 k and 17 v floats", "needs 18"});
}

double ref_cosine(const float* a, const float* b, int d) {
  double dot = 0.0, na = 0.0, nb = 0.0;
  for (int c = 0; c < d; ++c) {
    dot += static_cast<double>(a[c]) * static_cast<double>(b[c]);
    na += static_cast<double>(a[c]) * static_cast<double>(a[c]);
    nb += static_cast<double>(b[c]) * static_cast<double>(b[c]);
  }
  return na > 0.0 && nb > 0.0 ? dot / (std::sqrt(na) * std::sqrt(nb)) : 0.0;
}

constexpr const char* kWindow = "data/dumps/stories260K/tsval_w0";

TEST(LayerSimilarity, RealRecordingMatchesAnIndependentLoop) {
  KVSLIM_REQUIRE_SHARED(kWindow);
  const Recording r = testing::load_recording(test::shared_path(kWindow));
  const double threshold = 0.5;
  const auto s = layer_similarity(r, threshold);
  ASSERT_EQ(s.size(), static_cast<std::size_t>(r.layers - 1));
  const int d = r.head_dim, T = r.tokens, H = r.kv_heads;
  // Indexing the flat [layers][kv_heads][tokens][head_dim] arrays directly, token-major
  // (the library walks heads, then tokens, through the accessors).
  const auto at = [&](const std::vector<float>& x, int l, int h, int t) {
    return x.data() + ((static_cast<std::size_t>(l) * H + h) * T + t) * d;
  };
  for (int l = 1; l < r.layers; ++l) {
    double kc = 0, vc = 0, kpre = 0;
    long kb = 0, vb = 0, count = 0;
    for (int t = 0; t < T; ++t)
      for (int h = 0; h < H; ++h) {
        const double k = ref_cosine(at(r.k, l - 1, h, t), at(r.k, l, h, t), d);
        const double v = ref_cosine(at(r.v, l - 1, h, t), at(r.v, l, h, t), d);
        kc += k;
        vc += v;
        kb += k < threshold;
        vb += v < threshold;
        kpre += ref_cosine(at(r.k_pre, l - 1, h, t), at(r.k_pre, l, h, t), d);
        ++count;
      }
    const double n = static_cast<double>(count);
    const LayerPairSimilarity& p = s[static_cast<std::size_t>(l - 1)];
    EXPECT_EQ(p.lower, l - 1);
    EXPECT_EQ(p.upper, l);
    EXPECT_EQ(p.pairs, count);
    EXPECT_NEAR(p.k_cos, kc / n, 1e-12) << "layers " << l - 1 << "-" << l;
    EXPECT_NEAR(p.v_cos, vc / n, 1e-12) << "layers " << l - 1 << "-" << l;
    EXPECT_NEAR(p.k_below, static_cast<double>(kb) / n, 1e-12) << "layers " << l - 1 << "-" << l;
    EXPECT_NEAR(p.v_below, static_cast<double>(vb) / n, 1e-12) << "layers " << l - 1 << "-" << l;
    // RoPE rotates both layers' keys at one position alike: the post-RoPE cosine is the
    // pre-RoPE one up to the recording's f32 rounding of the rotation.
    EXPECT_NEAR(p.k_cos, kpre / n, 1e-5) << "layers " << l - 1 << "-" << l;
  }
  // One recording pooled alone is the same recording.
  const auto pooled = layer_similarity(std::vector<Recording>{r}, threshold);
  ASSERT_EQ(pooled.size(), s.size());
  for (std::size_t i = 0; i < s.size(); ++i) {
    EXPECT_EQ(pooled[i].k_cos, s[i].k_cos);
    EXPECT_EQ(pooled[i].v_below, s[i].v_below);
    EXPECT_EQ(pooled[i].pairs, s[i].pairs);
  }
}

}  // namespace
}  // namespace kvslim
