// Hadamard rotation (rotate=hadamard, kvslim/policy/rotation.h): the kernel against an
// independent double-precision matrix product, every ISA's table bit-identical to the scalar
// one, the cache reproducing unrotated attention, the recipe keys and their errors. Quality
// claims (rotation against outliers) are in rotation_quality_test.cpp.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "kvslim/kernels/kernel_table.h"
#include "kvslim/kvslim.h"
#include "test_support.h"

using namespace kvslim;

namespace {

std::vector<Isa> isas() {
  if (const char* env = std::getenv("KVSLIM_ISA"); env && *env) return {active_isa()};
  return available_isas();
}

class Rotation : public ::testing::TestWithParam<Isa> {
 protected:
  const kernels::KernelTable& kt() const { return *kernels::table_for(static_cast<int>(GetParam())); }
};

// R as a dense matrix in double: block-diagonal Sylvester Hadamard blocks over the binary
// digits of d (largest first), H[i][j] = (-1)^popcount(i & j) / sqrt(block), times the signs.
std::vector<double> dense_rotation(const HadamardRotation& r) {
  const int d = r.head_dim();
  std::vector<double> R(static_cast<std::size_t>(d) * d, 0.0);
  int base = 0;
  for (int bit = 12; bit >= 0; --bit) {
    const int blk = 1 << bit;
    if (!(d & blk)) continue;
    for (int i = 0; i < blk; ++i)
      for (int j = 0; j < blk; ++j) {
        const double h = (std::popcount(static_cast<unsigned>(i & j)) & 1 ? -1.0 : 1.0) / std::sqrt(double(blk));
        const double sign = r.factors()[base + j] < 0 ? -1.0 : 1.0;
        R[static_cast<std::size_t>(base + i) * d + base + j] = h * sign;
      }
    base += blk;
  }
  return R;
}

const int kDims[] = {1, 3, 8, 17, 31, 64, 96, 127, 128, 256};

TEST_P(Rotation, MatchesDenseDoubleProductAndIsOrthogonal) {
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (int d : kDims) {
    const HadamardRotation rot(d, 11);
    const std::vector<double> R = dense_rotation(rot);
    const int n = 5;
    std::vector<float> x(static_cast<std::size_t>(n) * d);
    for (float& v : x) v = nd(rng);
    std::vector<float> y = x;
    rot.forward(kt(), y.data(), n);
    for (int r = 0; r < n; ++r) {
      double e2 = 0.0, n2 = 0.0, ny2 = 0.0;
      for (int i = 0; i < d; ++i) {
        double ref = 0.0;
        for (int j = 0; j < d; ++j) ref += R[static_cast<std::size_t>(i) * d + j] * x[r * d + j];
        e2 += (y[r * d + i] - ref) * (y[r * d + i] - ref);
        n2 += double(x[r * d + i]) * x[r * d + i];
        ny2 += double(y[r * d + i]) * y[r * d + i];
      }
      EXPECT_LT(std::sqrt(e2 / n2), 1e-6) << "d=" << d << " row " << r;
      EXPECT_NEAR(std::sqrt(ny2 / n2), 1.0, 1e-6) << "norm preserved, d=" << d;
    }
    std::vector<float> z = y;
    rot.inverse(kt(), z.data(), n);
    EXPECT_LT(test::rel_l2(z.data(), x.data(), n * static_cast<long>(d)), 1e-6) << "inverse, d=" << d;
  }
}

TEST_P(Rotation, BitIdenticalToScalarTable) {
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.0f, 3.0f);
  for (int d : {1, 2, 3, 7, 8, 9, 16, 17, 24, 31, 32, 48, 64, 80, 96, 100, 127, 128, 256, 4096}) {
    const HadamardRotation rot(d, 3);
    const int n = 3;
    std::vector<float> x(static_cast<std::size_t>(n) * d);
    for (float& v : x) v = nd(rng);
    for (int dir = 0; dir < 2; ++dir) {
      std::vector<float> a = x, b = x;
      if (dir == 0) {
        rot.forward(kt(), a.data(), n);
        rot.forward(kernels::scalar::kTable, b.data(), n);
      } else {
        rot.inverse(kt(), a.data(), n);
        rot.inverse(kernels::scalar::kTable, b.data(), n);
      }
      for (std::size_t i = 0; i < a.size(); ++i)
        ASSERT_EQ(std::bit_cast<std::uint32_t>(a[i]), std::bit_cast<std::uint32_t>(b[i]))
            << kt().name << " d=" << d << " dir=" << dir << " i=" << i;
    }
    // No pre/post factors: the plain butterfly network.
    std::vector<float> a = x, b = x;
    kt().hadamard_rows(a.data(), n, d, nullptr, nullptr);
    kernels::scalar::kTable.hadamard_rows(b.data(), n, d, nullptr, nullptr);
    EXPECT_EQ(a, b) << "d=" << d;
  }
}

TEST(RotationSpec, SeedsGiveDifferentSignsAndTheSameNorms) {
  const HadamardRotation a(128, 0), b(128, 1), c(128, 0);
  EXPECT_EQ(a.factors(), c.factors()) << "deterministic";
  EXPECT_NE(a.factors(), b.factors());
  int neg = 0;
  for (float f : a.factors()) {
    EXPECT_FLOAT_EQ(std::fabs(f), 1.0f / std::sqrt(128.0f));
    neg += f < 0;
  }
  EXPECT_GT(neg, 40);
  EXPECT_LT(neg, 88);
  const HadamardRotation odd(96, 0);  // blocks 64 + 32
  EXPECT_FLOAT_EQ(std::fabs(odd.factors()[0]), 0.125f);
  EXPECT_FLOAT_EQ(std::fabs(odd.factors()[64]), 1.0f / std::sqrt(32.0f));
}

// Through the cache: a rotated f32 cache gives the unrotated cache's attention (float
// rounding), chunked prefill with GQA, and materialize() returns the original rows.
TEST_P(Rotation, CacheAttentionEqualsUnrotated) {
  set_active_isa(GetParam());
  const int L = 1, H = 2, G = 3, T = 70;
  for (int d : {16, 96, 128}) {
    std::mt19937 rng(static_cast<unsigned>(d));
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::vector<float> k(static_cast<std::size_t>(H) * T * d), v(k.size()), q(static_cast<std::size_t>(H * G) * T * d);
    for (float& x : k) x = nd(rng);
    for (float& x : v) x = nd(rng);
    for (float& x : q) x = 2.0f * nd(rng);
    KVCache plain(CacheConfig{L, H * G, H, d, T, "f32:group=8,residual=4"});
    KVCache rot(CacheConfig{L, H * G, H, d, T, "f32:group=8,residual=4,rotate=hadamard,seed=5"});
    double worst = 0.0;
    for (int t0 = 0; t0 < T;) {
      const int n = std::min(T - t0, t0 < 20 ? 13 : 1);
      Layout kv;
      kv.rank = 3;
      kv.shape = {H, n, d, 0};
      kv.strides = {static_cast<std::int64_t>(T) * d, d, 1, 0};
      Layout ql = kv;
      ql.shape[0] = H * G;
      const TensorView<const float> kk(k.data() + static_cast<std::size_t>(t0) * d, kv),
          vv(v.data() + static_cast<std::size_t>(t0) * d, kv), qq(q.data() + static_cast<std::size_t>(t0) * d, ql);
      std::vector<float> o1(static_cast<std::size_t>(H * G) * n * d), o2(o1.size());
      plain.append(0, kk, vv);
      rot.append(0, kk, vv);
      plain.attend(0, qq, TensorView<float>(o1.data(), {H * G, n, d}));
      rot.attend(0, qq, TensorView<float>(o2.data(), {H * G, n, d}));
      worst = std::max(worst, test::rel_l2(o2.data(), o1.data(), static_cast<long>(o1.size())));
      t0 += n;
    }
    EXPECT_LT(worst, 2e-6) << "d=" << d;
    for (int h = 0; h < H; ++h) {
      const DenseKV a = rot.materialize(0, h);
      EXPECT_LT(test::rel_l2(a.k.data(), k.data() + static_cast<std::size_t>(h) * T * d, static_cast<long>(T) * d),
                1e-6);
      EXPECT_LT(test::rel_l2(a.v.data(), v.data() + static_cast<std::size_t>(h) * T * d, static_cast<long>(T) * d),
                1e-6);
    }
  }
  set_active_isa(isas().back());
}

INSTANTIATE_TEST_SUITE_P(Isas, Rotation, ::testing::ValuesIn(isas()),
                         [](const auto& p) { return std::string(isa_name(p.param)); });

TEST(RotationRecipe, KeysDescribeAndErrors) {
  KVCache c(CacheConfig{1, 2, 1, 32, 64, "kivi:kbits=4,vbits=4,rotate=hadamard,seed=9"});
  EXPECT_EQ(c.recipe_for(0, 0).find("rotate=hadamard,seed=9") != std::string::npos, true) << c.recipe_for(0, 0);
  KVCache f(CacheConfig{1, 2, 1, 32, 64, "f16:rotate=hadamard"});
  EXPECT_NE(f.recipe_for(0, 0).find("rotate=hadamard,seed=0"), std::string::npos) << f.recipe_for(0, 0);
  KVCache none(CacheConfig{1, 2, 1, 32, 64, "f16"});
  EXPECT_EQ(none.recipe_for(0, 0).find("rotate"), std::string::npos);
  // Per layer and head through overrides.
  KVCache ov(CacheConfig{2, 2, 2, 32, 64, "kivi:kbits=2,vbits=2 ; [layers=1 heads=0] kivi:kbits=2,vbits=2,rotate=hadamard"});
  EXPECT_EQ(ov.recipe_for(0, 0).find("rotate"), std::string::npos);
  EXPECT_NE(ov.recipe_for(1, 0).find("rotate=hadamard"), std::string::npos);
  EXPECT_EQ(ov.recipe_for(1, 1).find("rotate"), std::string::npos);

  auto make = [](const char* r) { return [r] { KVCache x(CacheConfig{1, 2, 1, 32, 64, r}); }; };
  test::expect_error(make("kivi:rotate=random"), ErrorCode::kInvalidArgument, {"rotate=random", "hadamard"});
  test::expect_error(make("f16:seed=3"), ErrorCode::kInvalidArgument, {"seed=", "rotate=hadamard"});
  test::expect_error(make("f16:rotate=hadamard,seed=-1"), ErrorCode::kInvalidArgument, {"seed=-1"});
  test::expect_error(make("cq:channels=4,bits=2,rotate=hadamard"), ErrorCode::kRecipe,
                     {"cq", "unknown key 'rotate'"});
  test::expect_error(make("mikv:budget=32,lo=(kivi:kbits=2,vbits=2) | f16:rotate=hadamard"), ErrorCode::kRecipe,
                     {"demotion codec", "same rotation"});
}

}  // namespace
