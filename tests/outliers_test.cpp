// Outlier-aware quantization on the generator's outliers (issue 13): dense-and-sparse side
// lists (kivi:outliers=F) and Hadamard rotation (rotate=hadamard[,rotated=k|v]).
//
// Mechanics are asserted exactly (planted outliers come back exactly, the others' channel
// range no longer includes them, stats() counts the side lists). Quality is asserted only as
// far as the generator shows it (the measured factors are in docs/outliers.md):
//   - side lists at 1% lower the K and V reconstruction error and the attention error at 2,
//     3 and 4 bits when the data has massive activations and value outlier channels;
//   - rotating the values (rotated=v) lowers KIVI's attention error where values have
//     outlier channels; rotating KIVI's keys does not help (its per-channel key scales
//     already isolate outlier channels), which docs/outliers.md reports.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "kvslim/kernels/kernel_table.h"
#include "kvslim/kvslim.h"
#include "kvslim/testing/synthetic.h"
#include "test_support.h"

using namespace kvslim;

namespace {

kvslim::testing::SyntheticLayer outlier_layer(int tokens) {
  kvslim::testing::SyntheticOptions o;
  o.q_heads = 8;
  o.kv_heads = 2;
  o.head_dim = 128;
  o.tokens = tokens;
  o.outlier_channels = 4;
  o.value_outlier_channels = 4;
  o.massive_tokens = 8;
  return kvslim::testing::generate_layer(o);
}

struct Recon {
  double k = 0, v = 0;
  CacheStats st;
};

// Append the whole layer, seal it, and compare what the cache holds with the originals.
Recon reconstruct(const kvslim::testing::SyntheticLayer& L, const std::string& recipe) {
  const int d = L.head_dim, T = L.tokens;
  KVCache cache(CacheConfig{1, L.q_heads, L.kv_heads, d, T, recipe});
  cache.append(0, TensorView<const float>(L.k.data(), {L.kv_heads, T, d}),
               TensorView<const float>(L.v.data(), {L.kv_heads, T, d}));
  cache.flush();
  Recon r;
  for (int h = 0; h < L.kv_heads; ++h) {
    const DenseKV x = cache.materialize(0, h);
    r.k += test::rel_l2(x.k.data(), L.k_head(h), static_cast<long>(T) * d) / L.kv_heads;
    r.v += test::rel_l2(x.v.data(), L.v_head(h), static_cast<long>(T) * d) / L.kv_heads;
  }
  r.st = cache.stats();
  return r;
}

std::string kivi(int bits) {
  return "kivi:kbits=" + std::to_string(bits) + ",vbits=" + std::to_string(bits) + ",residual=0";
}

TEST(Outliers, PlantedOutliersComeBackExactlyAndLeaveTheScale) {
  const int d = 16, T = 32;
  std::vector<float> k(static_cast<std::size_t>(T) * d), v(k.size());
  for (int j = 0; j < T; ++j)
    for (int c = 0; c < d; ++c) {
      k[j * d + c] = static_cast<float>(std::sin(0.37 * j + 0.11 * c));
      v[j * d + c] = static_cast<float>(std::cos(0.23 * j - 0.17 * c));
    }
  // 5 planted key outliers (0.01 * 32 * 16 rounds up to 6 entries per page, 0.05 to 26) and
  // two planted value outliers (one entry per token: round(0.01 * 16) is 0, at least 1;
  // round(0.05 * 16) = 1).
  const int planted[5][2] = {{4, 2}, {9, 2}, {17, 7}, {30, 15}, {0, 0}};
  for (const auto& p : planted) k[p[0] * d + p[1]] = (p[0] % 2 ? -1.0f : 1.0f) * 250.0f;
  v[5 * d + 4] = 300.0f;
  v[6 * d + 9] = -300.0f;
  for (const char* recipe : {"kivi:kbits=2,vbits=2,residual=0,outliers=0.01", "kivi:kbits=2,vbits=2,residual=0,outliers=0.05"}) {
    KVCache cache(CacheConfig{1, 1, 1, d, T, recipe});
    cache.append(0, TensorView<const float>(k.data(), {1, T, d}), TensorView<const float>(v.data(), {1, T, d}));
    cache.flush();
    const DenseKV x = cache.materialize(0, 0);
    for (const auto& p : planted)
      EXPECT_NEAR(x.k.data()[p[0] * d + p[1]], k[p[0] * d + p[1]], 0.25f) << recipe << " key " << p[0] << "," << p[1];
    EXPECT_NEAR(x.v.data()[5 * d + 4], 300.0f, 0.25f);
    EXPECT_NEAR(x.v.data()[6 * d + 9], -300.0f, 0.25f);
    // Every other key is quantized over its channel's range without the outliers: |x| <= 1,
    // so at 2 bits the error is at most half a step of a range <= 2 (plus f16 rounding).
    for (int j = 0; j < T; ++j)
      for (int c = 0; c < d; ++c) {
        bool is_planted = false;
        for (const auto& p : planted) is_planted |= p[0] == j && p[1] == c;
        if (!is_planted) {
          ASSERT_LT(std::fabs(x.k.data()[j * d + c] - k[j * d + c]), 2.0 / 3.0 / 2.0 + 0.01) << j << "," << c;
        }
      }
    const CacheStats st = cache.stats();
    // One page: nk key entries x 6 bytes (token, channel, f16) + 32 tokens x 1 x 4 bytes.
    const int nk = std::string(recipe).find("0.05") != std::string::npos ? 26 : 6;
    EXPECT_EQ(st.outlier_bytes, nk * 6 + T * 1 * 4) << recipe;
    EXPECT_EQ(st.heads[0].outlier_bytes, st.outlier_bytes);
  }
  // Without the side list the planted keys stretch their channels' ranges.
  KVCache plain(CacheConfig{1, 1, 1, d, T, "kivi:kbits=2,vbits=2,residual=0"});
  plain.append(0, TensorView<const float>(k.data(), {1, T, d}), TensorView<const float>(v.data(), {1, T, d}));
  plain.flush();
  const DenseKV y = plain.materialize(0, 0);
  double worst = 0.0;
  for (int j = 0; j < T; ++j) worst = std::max(worst, double(std::fabs(y.k.data()[j * d + 2] - k[j * d + 2])));
  EXPECT_GT(worst, 20.0) << "an unprotected outlier crushes its channel";
  EXPECT_EQ(plain.stats().outlier_bytes, 0);
}

// Every byte of a KIVI page is written, the alignment pads included (0), with and without a
// side list: equal rows give equal bytes whatever the buffer held before.
TEST(Outliers, PadBytesAreZero) {
  const int d = 8, ntok = 1;  // 3-bit keys: 3 bytes of key codes, so the value scales need a pad
  std::vector<float> k(d), v(d);
  for (int c = 0; c < d; ++c) {
    k[c] = 0.1f * static_cast<float>(c);
    v[c] = -0.2f * static_cast<float>(c);
  }
  for (const char* recipe : {"kivi:kbits=3,vbits=3,vgroup=8", "kivi:kbits=3,vbits=3,vgroup=8,outliers=0.1"}) {
    const Pipeline p = build_pipeline(parse_recipe(recipe).base, d);
    const std::size_t n = p.codec->page_bytes(ntok, d);
    std::vector<std::byte> a(n, std::byte{0xAB}), b(n, std::byte{0x54});
    p.codec->encode(kernels::active(), k.data(), v.data(), ntok, d, a.data());
    p.codec->encode(kernels::active(), k.data(), v.data(), ntok, d, b.data());
    EXPECT_EQ(a, b) << recipe;
    EXPECT_EQ(a[4 * d + 3], std::byte{0}) << recipe << ": the pad after the key codes";
  }
}

TEST(Outliers, RecipeErrors) {
  auto make = [](const char* r) { return [r] { KVCache x(CacheConfig{1, 1, 1, 32, 64, r}); }; };
  test::expect_error(make("kivi:outliers=0.2"), ErrorCode::kInvalidArgument, {"outliers=0.2", "[0, 0.1]"});
  test::expect_error(make("kivi:outliers=-0.01"), ErrorCode::kInvalidArgument, {"outliers=-0.01"});
  test::expect_error(make("kivi:outliers=lots"), ErrorCode::kRecipe, {"outliers", "lots"});
  test::expect_error(make("kivi:outliers=0.01,qbits=8"), ErrorCode::kInvalidArgument, {"outliers=0.01", "qbits=8"});
  test::expect_error(make("f16:outliers=0.01"), ErrorCode::kRecipe, {"unknown key 'outliers'"});
  KVCache ok(CacheConfig{1, 1, 1, 32, 64, "kivi:kbits=3,vbits=3,outliers=0.01"});
  EXPECT_NE(ok.recipe_for(0, 0).find("outliers=0.01"), std::string::npos) << ok.recipe_for(0, 0);
}

TEST(OutliersGenerator, SideListsLowerReconstructionAndAttentionError) {
  const auto L = outlier_layer(1024);
  const auto A = outlier_layer(384);
  for (int bits : {2, 3, 4}) {
    const Recon plain = reconstruct(L, kivi(bits));
    const Recon sparse = reconstruct(L, kivi(bits) + ",outliers=0.01");
    std::printf("kivi %d bits: K %.4f -> %.4f, V %.4f -> %.4f, bits/value %.2f -> %.2f\n", bits, plain.k, sparse.k,
                plain.v, sparse.v, plain.st.bits_per_value, sparse.st.bits_per_value);
    EXPECT_LT(sparse.k * 1.25, plain.k) << bits << " bits";
    EXPECT_LT(sparse.v * 1.25, plain.v) << bits << " bits";
    EXPECT_GT(sparse.st.outlier_bytes, 0);
    const double ea = test::synthetic_decode(A, kivi(bits), 64).error;
    const double eb = test::synthetic_decode(A, kivi(bits) + ",outliers=0.01", 64).error;
    std::printf("   attention error %.4f -> %.4f (%.2fx)\n", ea, eb, ea / eb);
    EXPECT_LT(eb * 1.2, ea) << bits << " bits";
  }
}

TEST(OutliersGenerator, RotatingValuesLowersKiviAttentionError) {
  const auto A = outlier_layer(384);
  for (int bits : {2, 3, 4}) {
    const double plain = test::synthetic_decode(A, kivi(bits), 64).error;
    const double rv = test::synthetic_decode(A, kivi(bits) + ",rotate=hadamard,rotated=v", 64).error;
    const double rkv = test::synthetic_decode(A, kivi(bits) + ",rotate=hadamard", 64).error;
    std::printf("kivi %d bits: attention error %.4f, values rotated %.4f (%.2fx), keys and values rotated %.4f\n", bits,
                plain, rv, plain / rv, rkv);
    EXPECT_LT(rv * 1.2, plain) << bits << " bits";
    EXPECT_LT(rv, rkv) << "rotating KIVI's per-channel keys as well costs";
  }
}

// Gaussian Lloyd-Max levels (nuq) assume near-Gaussian rows, which a Hadamard rotation makes
// of rows with outlier channels (TurboQuant): the rotation lowers nuq's attention error at
// least 2x at 3 and 4 bits (measured 2.65x, 3.03x) and 1.8x at 2 bits (measured 1.90x) on
// the outlier generator. Against KIVI at about equal bits per value (nuq at b+1 bits with its
// one f16 scale per row, KIVI at b bits with per-page scales) the two are within 10% here;
// docs/outliers.md has both and the real recordings.
TEST(OutliersGenerator, RotationMakesGaussianLevelsFit) {
  const auto A = outlier_layer(384);
  for (int bits : {2, 3, 4}) {
    const std::string nuq = "nuq:kbits=" + std::to_string(bits) + ",vbits=" + std::to_string(bits) + ",residual=0";
    const double plain = test::synthetic_decode(A, nuq, 64).error;
    const double rot = test::synthetic_decode(A, nuq + ",rotate=hadamard", 64).error;
    std::printf("nuq %d bits: attention error %.4f, rotated %.4f (%.2fx)\n", bits, plain, rot, plain / rot);
    EXPECT_LT(rot * (bits == 2 ? 1.8 : 2.0), plain) << bits << " bits";
  }
}

}  // namespace
