// Kernel tables. For every ISA built and supported here (scalar always), over head_dims and
// token counts with tails:
// - conversions are bit-exact with the scalar dtype functions;
// - KIVI codes and scales are bit-exact with the scalar table (the rounding rule is
//   specified to make that possible), and dequantization error is at most half a step;
// - scores on codes equal q . dequant(k), and accumulation on codes equals p . dequant(v),
//   within a tolerance of 1e-5 x sum of |terms| (float reassociation across SIMD lanes);
// - softmax_block matches a double-precision online softmax, including -inf masks.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <random>

#include "kvslim/cpu/isa.h"
#include "kvslim/kernels/kernel_table.h"
#include "kvslim/tensor/dtype.h"

using namespace kvslim;
using kernels::KernelTable;

namespace {

const int kDims[] = {1, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 64, 127, 128, 256};
const int kTokens[] = {1, 5, 16, 31, 32, 33};

std::vector<float> randn(std::size_t n, unsigned seed, float scale = 1.0f, float shift = 0.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d;
  std::vector<float> v(n);
  for (auto& x : v) x = shift + scale * d(rng);
  return v;
}

class Kernels : public ::testing::TestWithParam<Isa> {
 protected:
  const KernelTable& kt() const { return *kernels::table_for(static_cast<int>(GetParam())); }
  const KernelTable& ref() const { return kernels::scalar::kTable; }
};

// Every ISA available here; only the forced one when KVSLIM_ISA is set (CI runs this binary
// once per ISA that way, and the scalar table is always the comparison).
std::vector<Isa> isas() {
  if (const char* env = std::getenv("KVSLIM_ISA"); env && *env) return {active_isa()};
  return available_isas();
}

}  // namespace

TEST_P(Kernels, ConversionsAreExact) {
  for (std::size_t n : {1u, 7u, 8u, 15u, 16u, 17u, 33u, 1000u}) {
    auto x = randn(n, static_cast<unsigned>(n), 100.0f);
    if (n > 3) {
      x[0] = 65519.0f;  // largest value rounding to finite f16
      x[1] = 1e-7f;     // f16 subnormal
      x[2] = -0.0f;
    }
    std::vector<std::uint16_t> h(n), b(n);
    std::vector<float> back(n);
    kt().f32_to_f16(x.data(), h.data(), n);
    kt().f32_to_bf16(x.data(), b.data(), n);
    for (std::size_t i = 0; i < n; ++i) {
      ASSERT_EQ(h[i], f32_to_f16(x[i])) << i;
      ASSERT_EQ(b[i], f32_to_bf16(x[i])) << i;
    }
    kt().f16_to_f32(h.data(), back.data(), n);
    for (std::size_t i = 0; i < n; ++i) ASSERT_EQ(back[i], f16_to_f32(h[i]));
    kt().bf16_to_f32(b.data(), back.data(), n);
    for (std::size_t i = 0; i < n; ++i) ASSERT_EQ(back[i], bf16_to_f32(b[i]));
  }
}

TEST_P(Kernels, KiviQuantizeBitExactAndWithinHalfStep) {
  for (int bits : {2, 3, 4, 8})
    for (int d : kDims)
      for (int ntok : kTokens) {
        const auto x = randn(static_cast<std::size_t>(ntok) * d, static_cast<unsigned>(bits * 1000 + d * 10 + ntok), 2.0f, 0.5f);
        const int rb = kernels::row_bytes(d, bits);
        std::vector<std::uint16_t> s1(d), z1(d), s2(d), z2(d);
        std::vector<std::uint8_t> c1(static_cast<std::size_t>(ntok) * rb), c2(c1.size());
        kt().kivi_quant_keys(x.data(), ntok, d, bits, s1.data(), z1.data(), c1.data());
        ref().kivi_quant_keys(x.data(), ntok, d, bits, s2.data(), z2.data(), c2.data());
        ASSERT_EQ(s1, s2) << bits << " bits d " << d << " ntok " << ntok;
        ASSERT_EQ(z1, z2);
        ASSERT_EQ(c1, c2);
        std::vector<float> back(x.size());
        kt().kivi_dequant_keys(s1.data(), z1.data(), c1.data(), ntok, d, bits, back.data());
        for (int j = 0; j < ntok; ++j)
          for (int c = 0; c < d; ++c) {
            // Half a step, plus the f16 rounding of the zero point (which may clip the minimum).
            const float step = f16_to_f32(s1[c]);
            const float zerr = std::fabs(f16_to_f32(z1[c])) * 1e-3f;
            ASSERT_LE(std::fabs(back[j * d + c] - x[j * d + c]), 0.5f * step * 1.001f + zerr + 1e-6f)
                << "bits " << bits << " d " << d << " token " << j << " channel " << c;
          }
        // Values: per token, groups of vgroup channels (every divisor of d that we use).
        for (int vg : {1, d}) {
          const int ng = d / vg;
          std::vector<std::uint16_t> vs1(static_cast<std::size_t>(ntok) * ng), vz1(vs1.size()), vs2(vs1.size()), vz2(vs1.size());
          kt().kivi_quant_values(x.data(), ntok, d, bits, vg, vs1.data(), vz1.data(), c1.data());
          ref().kivi_quant_values(x.data(), ntok, d, bits, vg, vs2.data(), vz2.data(), c2.data());
          ASSERT_EQ(vs1, vs2);
          ASSERT_EQ(vz1, vz2);
          ASSERT_EQ(c1, c2);
          kt().kivi_dequant_values(vs1.data(), vz1.data(), c1.data(), ntok, d, bits, vg, back.data());
          std::vector<float> back2(x.size());
          ref().kivi_dequant_values(vs1.data(), vz1.data(), c1.data(), ntok, d, bits, vg, back2.data());
          for (std::size_t i = 0; i < x.size(); ++i) ASSERT_NEAR(back[i], back2[i], 1e-6f * (1.0f + std::fabs(back2[i])));
        }
      }
}

TEST_P(Kernels, ScoresAndAccumulationOnCodes) {
  for (int bits : {2, 3, 4, 8})
    for (int d : kDims)
      for (int ntok : kTokens) {
        const int nq = 3;
        const auto k = randn(static_cast<std::size_t>(ntok) * d, 7u + static_cast<unsigned>(d), 1.5f, -0.3f);
        const auto q = randn(static_cast<std::size_t>(nq) * d, 11u + static_cast<unsigned>(ntok));
        const auto p = randn(static_cast<std::size_t>(nq) * ntok, 13u, 0.3f, 0.5f);
        const int rb = kernels::row_bytes(d, bits);
        const int vg = (d % 4 == 0) ? d / 4 : d;
        std::vector<std::uint16_t> ks(d), kz(d), vs(static_cast<std::size_t>(ntok) * (d / vg)), vz(vs.size());
        std::vector<std::uint8_t> kc(static_cast<std::size_t>(ntok) * rb), vc(kc.size());
        ref().kivi_quant_keys(k.data(), ntok, d, bits, ks.data(), kz.data(), kc.data());
        ref().kivi_quant_values(k.data(), ntok, d, bits, vg, vs.data(), vz.data(), vc.data());
        std::vector<float> kd(k.size()), vd(k.size());
        ref().kivi_dequant_keys(ks.data(), kz.data(), kc.data(), ntok, d, bits, kd.data());
        ref().kivi_dequant_values(vs.data(), vz.data(), vc.data(), ntok, d, bits, vg, vd.data());

        std::vector<float> s(static_cast<std::size_t>(nq) * ntok);
        kt().kivi_scores(q.data(), nq, ks.data(), kz.data(), kc.data(), ntok, d, bits, s.data());
        for (int r = 0; r < nq; ++r)
          for (int j = 0; j < ntok; ++j) {
            double want = 0.0, mag = 0.0;
            for (int c = 0; c < d; ++c) {
              want += static_cast<double>(q[r * d + c]) * kd[j * d + c];
              mag += std::fabs(static_cast<double>(q[r * d + c]) * kd[j * d + c]) +
                     std::fabs(q[r * d + c] * f16_to_f32(kz[c]));
            }
            ASSERT_NEAR(s[r * ntok + j], want, 1e-5 * mag + 1e-6) << "bits " << bits << " d " << d;
          }
        std::vector<float> o(static_cast<std::size_t>(nq) * d, 0.25f);
        kt().kivi_accum(p.data(), nq, vs.data(), vz.data(), vc.data(), ntok, d, bits, vg, o.data());
        for (int r = 0; r < nq; ++r)
          for (int c = 0; c < d; ++c) {
            double want = 0.25, mag = 0.25;
            for (int j = 0; j < ntok; ++j) {
              want += static_cast<double>(p[r * ntok + j]) * vd[j * d + c];
              mag += std::fabs(static_cast<double>(p[r * ntok + j]) * vd[j * d + c]) +
                     std::fabs(p[r * ntok + j] * f16_to_f32(vz[(j * (d / vg)) + c / vg]));
            }
            ASSERT_NEAR(o[r * d + c], want, 1e-5 * mag + 1e-6) << "bits " << bits << " d " << d;
          }
      }
}

TEST_P(Kernels, DenseScoresAndAccumulation) {
  for (int d : kDims)
    for (int ntok : kTokens) {
      const int nq = 4;
      const auto k = randn(static_cast<std::size_t>(ntok) * d, 3u + static_cast<unsigned>(d));
      const auto q = randn(static_cast<std::size_t>(nq) * d, 5u);
      const auto p = randn(static_cast<std::size_t>(nq) * ntok, 6u, 0.2f, 0.3f);
      std::vector<std::uint16_t> kh(k.size()), kb(k.size());
      ref().f32_to_f16(k.data(), kh.data(), k.size());
      ref().f32_to_bf16(k.data(), kb.data(), k.size());
      for (int fmt = 0; fmt < 3; ++fmt) {
        std::vector<float> kv(k.size());
        for (std::size_t i = 0; i < k.size(); ++i)
          kv[i] = fmt == 0 ? k[i] : (fmt == 1 ? f16_to_f32(kh[i]) : bf16_to_f32(kb[i]));
        std::vector<float> s(static_cast<std::size_t>(nq) * ntok), o(static_cast<std::size_t>(nq) * d, 0.0f);
        if (fmt == 0) {
          kt().scores_f32(q.data(), nq, k.data(), ntok, d, s.data());
          kt().accum_f32(p.data(), nq, k.data(), ntok, d, o.data());
        } else if (fmt == 1) {
          kt().scores_f16(q.data(), nq, kh.data(), ntok, d, s.data());
          kt().accum_f16(p.data(), nq, kh.data(), ntok, d, o.data());
        } else {
          kt().scores_bf16(q.data(), nq, kb.data(), ntok, d, s.data());
          kt().accum_bf16(p.data(), nq, kb.data(), ntok, d, o.data());
        }
        for (int r = 0; r < nq; ++r) {
          for (int j = 0; j < ntok; ++j) {
            double want = 0.0, mag = 0.0;
            for (int c = 0; c < d; ++c) {
              want += static_cast<double>(q[r * d + c]) * kv[j * d + c];
              mag += std::fabs(static_cast<double>(q[r * d + c]) * kv[j * d + c]);
            }
            ASSERT_NEAR(s[r * ntok + j], want, 1e-5 * mag + 1e-7) << "format " << fmt << " d " << d;
          }
          for (int c = 0; c < d; ++c) {
            double want = 0.0, mag = 0.0;
            for (int j = 0; j < ntok; ++j) {
              want += static_cast<double>(p[r * ntok + j]) * kv[j * d + c];
              mag += std::fabs(static_cast<double>(p[r * ntok + j]) * kv[j * d + c]);
            }
            ASSERT_NEAR(o[r * d + c], want, 1e-5 * mag + 1e-7) << "format " << fmt << " d " << d;
          }
        }
      }
    }
}

TEST_P(Kernels, SoftmaxBlockIsAnOnlineSoftmax) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  for (int d : {1, 8, 17, 128})
    for (int ntok : kTokens) {
      const int nq = 3;
      auto s1 = randn(static_cast<std::size_t>(nq) * ntok, 21u + static_cast<unsigned>(ntok), 3.0f);
      auto s2 = randn(static_cast<std::size_t>(nq) * ntok, 22u + static_cast<unsigned>(ntok), 3.0f, 2.0f);
      s2[0] = kNegInf;                                // one masked token
      for (int j = 0; j < ntok; ++j) s1[2 * ntok + j] = kNegInf;  // row 2 fully masked in block 1
      std::vector<float> m(nq, kNegInf), l(nq, 0.0f), o(static_cast<std::size_t>(nq) * d, 0.0f);
      std::vector<double> all_s;
      auto b1 = s1, b2 = s2;
      kt().softmax_block(b1.data(), nq, ntok, m.data(), l.data(), o.data(), d);
      for (int r = 0; r < nq; ++r)
        for (int c = 0; c < d; ++c) o[r * d + c] = 1.0f;  // pretend accumulated values
      kt().softmax_block(b2.data(), nq, ntok, m.data(), l.data(), o.data(), d);
      for (int r = 0; r < nq; ++r) {
        double mx = -INFINITY;
        for (int j = 0; j < ntok; ++j) mx = std::max({mx, static_cast<double>(s1[r * ntok + j]), static_cast<double>(s2[r * ntok + j])});
        double sum = 0.0;
        for (int j = 0; j < ntok; ++j) sum += std::exp(s1[r * ntok + j] - mx) + std::exp(s2[r * ntok + j] - mx);
        EXPECT_FLOAT_EQ(m[r], static_cast<float>(mx));
        EXPECT_NEAR(l[r], sum, 1e-5 * sum);
        for (int j = 0; j < ntok; ++j) EXPECT_NEAR(b2[r * ntok + j], std::exp(s2[r * ntok + j] - mx), 1e-6);
        // o was 1 after block 1 and is rescaled by exp(m1 - m2).
        double m1 = -INFINITY;
        for (int j = 0; j < ntok; ++j) m1 = std::max(m1, static_cast<double>(s1[r * ntok + j]));
        const double alpha = std::isinf(m1) ? 0.0 : std::exp(m1 - mx);
        EXPECT_NEAR(o[r * d], alpha, 1e-6) << "row " << r;
      }
      for (int j = 0; j < ntok; ++j) EXPECT_EQ(b1[2 * ntok + j], 0.0f);  // fully masked row gives p = 0
    }
}

INSTANTIATE_TEST_SUITE_P(AllIsas, Kernels, ::testing::ValuesIn(isas()),
                         [](const ::testing::TestParamInfo<Isa>& i) { return std::string(isa_name(i.param)); });
