// Kernel tables. Every entry of every table built and supported here (scalar always) is
// compared with the scalar table, the `_ref` oracle, over head_dims
// {1,3,7,8,9,15,16,17,31,32,33,64,80,96,100,127,128,256}, token counts with tails of every unroll
// (1..65, so batches of 2, 4, 16 and 32 tokens all have remainders) and query-row counts
// with tails of the 4-row register blocks.
//
// What must be exact, and the tolerances for the rest (why each is what it is):
// - Conversions are bit-exact, NaN payloads included: f16 -> f32 and bf16 -> f32 for all
//   65536 patterns, f32 -> f16/bf16 over a sweep of 2^32 patterns plus rounding ties.
// - KIVI codes, scales and zero points are bit-exact at every bit width {1, 2, 3, 4, 8}
//   (kernel_table.h specifies the rounding so that they can be); dequantization differs from scalar only by FMA's single rounding
//   (1e-6 relative) and is within half a step (plus the f16 rounding of the zero point) of
//   the input.
// - Dense scores and accumulation: each SIMD lane accumulates d/kL products in order and a
//   tree adds the lanes, so the error is a few ulp of the sum of |terms| (bounded by
//   (d/8 + 8) * 2^-24 * sum|terms| <= 2.4e-6 sum|terms| at d = 256); tolerance 1e-5 of it.
// - KIVI scores and accumulation on the codes, float paths: as dense, 1e-5 * sum|terms|.
//   AVX-512 with VNNI computes them in integers, which adds a bounded rounding term:
//     scores: q_c s_c is rounded to a multiple of S = max_c |q_c s_c| / 32512, so
//             |error| <= S/2 * sum_c code_c;
//     accumulation: p_j s_jg is rounded to a multiple of W = max_j |p_j| * max_jg s_jg /
//             32767 (per 32-token chunk), so |error| <= W/2 * sum_j code_jc.
//   The tolerance is 1e-5 * sum|terms| plus that term (a rigorous bound; it vanishes where
//   the float path runs, and is ~2^-16 relative where the integer path runs).
// - softmax_block matches a double-precision online softmax: given the float argument
//   s - m (which every implementation, the scalar one included, rounds to float first), the
//   vector exp's relative error is a few ulp (Cody-Waite reduction + Cephes polynomial;
//   measured < 2.5e-7; tolerance 5e-7); logits below -87.3 (where expf is denormal) give
//   exactly 0, -inf gives 0, and fully masked rows leave m, l, o alone. l is a sum of
//   positive terms, reassociated across lanes: 1e-5 relative.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <ostream>
#include <random>

#include "kvslim/cpu/isa.h"
#include "kvslim/kernels/kernel_table.h"
#include "kvslim/tensor/dtype.h"

using namespace kvslim;
using kernels::KernelTable;

namespace kvslim {
// Without a PrintTo gtest prints an enum class parameter as raw bytes in --gtest_list_tests
// and failure messages; print the ISA's name.
void PrintTo(Isa isa, std::ostream* os) { *os << isa_name(isa); }
}  // namespace kvslim

namespace {

const int kDims[] = {1, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 64, 80, 96, 100, 127, 128, 256};
const int kTokens[] = {1, 2, 5, 15, 16, 17, 31, 32, 33, 65};
const int kRows[] = {1, 3, 4, 5, 8};
const int kBits[] = {1, 2, 3, 4, 8};  // every width the codec accepts

std::vector<float> randn(std::size_t n, unsigned seed, float scale = 1.0f, float shift = 0.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d;
  std::vector<float> v(n);
  for (auto& x : v) x = shift + scale * d(rng);
  return v;
}

std::uint32_t bits_of(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float from_bits(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

unsigned code_at(const std::uint8_t* row, int c, int bits) {
  const int bit = c * bits;
  unsigned w = row[bit >> 3];
  if ((bit & 7) + bits > 8) w |= static_cast<unsigned>(row[(bit >> 3) + 1]) << 8;
  return (w >> (bit & 7)) & ((1u << bits) - 1u);
}

// Value groups to test for head_dim d: 1, d, and the divisors of d that are multiples of 16
// (the SIMD fast paths), 4 (a group that does not tile vectors) or 20 and 25 (the default
// vgroups at head_dim 80 and 100).
std::vector<int> vgroups(int d) {
  std::vector<int> g = {1, d};
  for (int v : {4, 16, 20, 25, 32, 64})
    if (v < d && d % v == 0) g.push_back(v);
  return g;
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

TEST_P(Kernels, TableIsComplete) {
  const KernelTable& t = kt();
  EXPECT_STREQ(t.name, isa_name(GetParam()));
  const void* entries[] = {
      reinterpret_cast<const void*>(t.f32_to_f16),      reinterpret_cast<const void*>(t.f16_to_f32),
      reinterpret_cast<const void*>(t.f32_to_bf16),     reinterpret_cast<const void*>(t.bf16_to_f32),
      reinterpret_cast<const void*>(t.scores_f32),      reinterpret_cast<const void*>(t.scores_f16),
      reinterpret_cast<const void*>(t.scores_bf16),     reinterpret_cast<const void*>(t.accum_f32),
      reinterpret_cast<const void*>(t.accum_f16),       reinterpret_cast<const void*>(t.accum_bf16),
      reinterpret_cast<const void*>(t.softmax_block),   reinterpret_cast<const void*>(t.kivi_quant_keys),
      reinterpret_cast<const void*>(t.kivi_quant_values), reinterpret_cast<const void*>(t.kivi_dequant_keys),
      reinterpret_cast<const void*>(t.kivi_dequant_values), reinterpret_cast<const void*>(t.kivi_scores),
      reinterpret_cast<const void*>(t.kivi_accum)};
  for (const void* e : entries) EXPECT_NE(e, nullptr);
}

TEST_P(Kernels, ConversionsAreExact) {
  // Every f16 and bf16 pattern back to f32 (signaling NaNs stay signaling).
  std::vector<std::uint16_t> all(65536);
  for (std::size_t i = 0; i < all.size(); ++i) all[i] = static_cast<std::uint16_t>(i);
  std::vector<float> back(all.size());
  kt().f16_to_f32(all.data(), back.data(), all.size());
  for (std::size_t i = 0; i < all.size(); ++i) ASSERT_EQ(bits_of(back[i]), bits_of(f16_to_f32(all[i]))) << i;
  kt().bf16_to_f32(all.data(), back.data(), all.size());
  for (std::size_t i = 0; i < all.size(); ++i) ASSERT_EQ(bits_of(back[i]), bits_of(bf16_to_f32(all[i]))) << i;

  // f32 -> f16/bf16: a sweep over all exponents and mantissas, the halfway cases of both
  // formats (ties to even), overflow, subnormals, infinities and NaNs.
  std::vector<float> x;
  for (std::uint64_t u = 0; u < (1ull << 32); u += 65537) x.push_back(from_bits(static_cast<std::uint32_t>(u)));
  for (std::uint32_t e = 0; e < 256; ++e)
    for (std::uint32_t m : {0x1000u, 0x3000u, 0x0fffu, 0x1001u, 0x8000u, 0x18000u, 0x7fffu, 0x400000u})
      for (std::uint32_t s : {0u, 0x80000000u}) x.push_back(from_bits(s | (e << 23) | m));
  for (float f : {65504.0f, 65519.0f, 65520.0f, 1e-7f, 6e-8f, 2.9e-8f, 3e-8f, -0.0f, 0.0f,
                  std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                  std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::signaling_NaN(),
                  std::numeric_limits<float>::denorm_min()})
    x.push_back(f);
  for (std::size_t n : {x.size(), std::size_t{1}, std::size_t{7}, std::size_t{9}, std::size_t{17}}) {
    std::vector<std::uint16_t> h(n), b(n);
    kt().f32_to_f16(x.data(), h.data(), n);
    kt().f32_to_bf16(x.data(), b.data(), n);
    for (std::size_t i = 0; i < n; ++i) {
      ASSERT_EQ(h[i], f32_to_f16(x[i])) << std::hex << bits_of(x[i]);
      ASSERT_EQ(b[i], f32_to_bf16(x[i])) << std::hex << bits_of(x[i]);
    }
  }
}

// Test data for quantization: a normal spread plus the awkward cases: exact ties, repeated
// values, constant groups, zeros of both signs as group extremes, and a subnormal scale.
std::vector<float> quant_data(int ntok, int d, unsigned seed) {
  auto x = randn(static_cast<std::size_t>(ntok) * d, seed, 2.0f, 0.5f);
  std::mt19937 rng(seed + 1);
  for (auto& v : x) {
    const unsigned r = rng() % 16;
    if (r == 0) v = std::round(v * 4.0f) / 4.0f;  // on a grid: ties to even matter
    if (r == 1) v = 0.0f;
    if (r == 2) v = -0.0f;
  }
  if (ntok > 2 && d > 2) {
    for (int j = 0; j < ntok; ++j) x[static_cast<std::size_t>(j) * d + 1] = 1.5f;  // constant channel
    for (int c = 0; c < d; ++c) x[static_cast<std::size_t>(2) * d + c] = 3e-8f * static_cast<float>(c % 3);
  }
  return x;
}

TEST_P(Kernels, KiviQuantizeBitExactAndWithinHalfStep) {
  for (int bits : kBits)
    for (int d : kDims)
      for (int ntok : kTokens) {
        const auto x = quant_data(ntok, d, static_cast<unsigned>(bits * 1000 + d * 10 + ntok));
        const int rb = kernels::row_bytes(d, bits);
        std::vector<std::uint16_t> s1(d), z1(d), s2(d), z2(d);
        std::vector<std::uint8_t> c1(static_cast<std::size_t>(ntok) * rb, 0xAB), c2(c1.size());
        kt().kivi_quant_keys(x.data(), ntok, d, bits, s1.data(), z1.data(), c1.data());
        ref().kivi_quant_keys(x.data(), ntok, d, bits, s2.data(), z2.data(), c2.data());
        ASSERT_EQ(s1, s2) << bits << " bits d " << d << " ntok " << ntok;
        ASSERT_EQ(z1, z2) << bits << " bits d " << d << " ntok " << ntok;
        ASSERT_EQ(c1, c2) << bits << " bits d " << d << " ntok " << ntok;
        std::vector<float> back(x.size()), back_ref(x.size());
        kt().kivi_dequant_keys(s1.data(), z1.data(), c1.data(), ntok, d, bits, back.data());
        ref().kivi_dequant_keys(s1.data(), z1.data(), c1.data(), ntok, d, bits, back_ref.data());
        for (int j = 0; j < ntok; ++j)
          for (int c = 0; c < d; ++c) {
            const std::size_t i = static_cast<std::size_t>(j) * d + c;
            ASSERT_NEAR(back[i], back_ref[i], 1e-6f * (1.0f + std::fabs(back_ref[i])));
            // Half a step, plus the f16 rounding of the zero point (which may clip the minimum).
            const float step = f16_to_f32(s1[c]);
            const float zerr = std::fabs(f16_to_f32(z1[c])) * 1e-3f;
            ASSERT_LE(std::fabs(back[i] - x[i]), 0.5f * step * 1.001f + zerr + 1e-6f)
                << "bits " << bits << " d " << d << " token " << j << " channel " << c;
          }
        // Values: per token, groups of vg channels.
        for (int vg : vgroups(d)) {
          const int ng = d / vg;
          std::vector<std::uint16_t> vs1(static_cast<std::size_t>(ntok) * ng), vz1(vs1.size()), vs2(vs1.size()),
              vz2(vs1.size());
          std::fill(c1.begin(), c1.end(), 0xCD);
          kt().kivi_quant_values(x.data(), ntok, d, bits, vg, vs1.data(), vz1.data(), c1.data());
          ref().kivi_quant_values(x.data(), ntok, d, bits, vg, vs2.data(), vz2.data(), c2.data());
          ASSERT_EQ(vs1, vs2) << bits << " bits d " << d << " ntok " << ntok << " vgroup " << vg;
          ASSERT_EQ(vz1, vz2) << bits << " bits d " << d << " ntok " << ntok << " vgroup " << vg;
          ASSERT_EQ(c1, c2) << bits << " bits d " << d << " ntok " << ntok << " vgroup " << vg;
          kt().kivi_dequant_values(vs1.data(), vz1.data(), c1.data(), ntok, d, bits, vg, back.data());
          ref().kivi_dequant_values(vs1.data(), vz1.data(), c1.data(), ntok, d, bits, vg, back_ref.data());
          for (std::size_t i = 0; i < x.size(); ++i)
            ASSERT_NEAR(back[i], back_ref[i], 1e-6f * (1.0f + std::fabs(back_ref[i])));
        }
      }
}

TEST_P(Kernels, ScoresAndAccumulationOnCodes) {
  for (int bits : kBits)
    for (int d : kDims)
      for (int ntok : kTokens)
        for (int nq : {1, 4, 5}) {
          const unsigned seed = static_cast<unsigned>(bits * 7919 + d * 31 + ntok * 3 + nq);
          const auto k = randn(static_cast<std::size_t>(ntok) * d, seed, 1.5f, -0.3f);
          const auto q = randn(static_cast<std::size_t>(nq) * d, seed + 1);
          // Probabilities as softmax_block leaves them (in [0, 1], max 1), plus a few negative
          // weights: the kernel contract is any p.
          auto p = randn(static_cast<std::size_t>(nq) * ntok, seed + 2, 0.3f, 0.5f);
          for (std::size_t i = 0; i < p.size(); i += 7) p[i] = 0.0f;
          const int rb = kernels::row_bytes(d, bits);
          const int vg = (d % 32 == 0) ? 32 : ((d % 4 == 0) ? d / 4 : d);
          const int ng = d / vg;
          std::vector<std::uint16_t> ks(d), kz(d), vs(static_cast<std::size_t>(ntok) * ng), vz(vs.size());
          std::vector<std::uint8_t> kc(static_cast<std::size_t>(ntok) * rb), vc(kc.size());
          ref().kivi_quant_keys(k.data(), ntok, d, bits, ks.data(), kz.data(), kc.data());
          ref().kivi_quant_values(k.data(), ntok, d, bits, vg, vs.data(), vz.data(), vc.data());
          std::vector<float> kd(k.size()), vd(k.size());
          ref().kivi_dequant_keys(ks.data(), kz.data(), kc.data(), ntok, d, bits, kd.data());
          ref().kivi_dequant_values(vs.data(), vz.data(), vc.data(), ntok, d, bits, vg, vd.data());

          std::vector<float> s(static_cast<std::size_t>(nq) * ntok);
          kt().kivi_scores(q.data(), nq, ks.data(), kz.data(), kc.data(), ntok, d, bits, s.data());
          for (int r = 0; r < nq; ++r) {
            double amax = 0.0;  // max |q_c s_c|: the integer path's rounding unit is amax / 32512
            for (int c = 0; c < d; ++c) amax = std::max(amax, std::fabs(double{q[r * d + c]} * f16_to_f32(ks[c])));
            for (int j = 0; j < ntok; ++j) {
              double want = 0.0, mag = 0.0, codes = 0.0;
              for (int c = 0; c < d; ++c) {
                want += static_cast<double>(q[r * d + c]) * kd[j * d + c];
                mag += std::fabs(static_cast<double>(q[r * d + c]) * kd[j * d + c]) +
                       std::fabs(q[r * d + c] * f16_to_f32(kz[c]));
                codes += code_at(kc.data() + j * rb, c, bits);
              }
              const double tol = 1e-5 * mag + 1e-6 + 0.5 * amax / 32512.0 * codes * 1.001;
              ASSERT_NEAR(s[r * ntok + j], want, tol)
                  << "bits " << bits << " d " << d << " ntok " << ntok << " nq " << nq << " row " << r << " tok " << j;
            }
          }
          std::vector<float> o(static_cast<std::size_t>(nq) * d, 0.25f);
          kt().kivi_accum(p.data(), nq, vs.data(), vz.data(), vc.data(), ntok, d, bits, vg, o.data());
          double smax = 0.0;
          for (std::uint16_t h : vs) smax = std::max(smax, static_cast<double>(f16_to_f32(h)));
          for (int r = 0; r < nq; ++r) {
            double pmax = 0.0;
            for (int j = 0; j < ntok; ++j) pmax = std::max(pmax, std::fabs(double{p[r * ntok + j]}));
            for (int c = 0; c < d; ++c) {
              double want = 0.25, mag = 0.25, codes = 0.0;
              for (int j = 0; j < ntok; ++j) {
                want += static_cast<double>(p[r * ntok + j]) * vd[j * d + c];
                mag += std::fabs(static_cast<double>(p[r * ntok + j]) * vd[j * d + c]) +
                       std::fabs(p[r * ntok + j] * f16_to_f32(vz[(j * ng) + c / vg]));
                codes += code_at(vc.data() + j * rb, c, bits);
              }
              const double tol = 1e-5 * mag + 1e-6 + 0.5 * pmax * smax / 32767.0 * codes * 1.001;
              ASSERT_NEAR(o[r * d + c], want, tol)
                  << "bits " << bits << " d " << d << " ntok " << ntok << " nq " << nq << " row " << r << " ch " << c;
            }
          }
        }
}

// Softmax weights far below 1 (a chunk of tokens 180 logits under the running max leaves
// 1e-37 after exp) and queries of tiny magnitude: the integer paths scale by max / 32767,
// whose inverse overflows there (0 * inf = NaN took a whole output row on AVX-512 VNNI).
// Outputs stay finite and equal the reference within f32 rounding of the untouched o.
TEST_P(Kernels, TinyWeightsAndQueriesStayFinite) {
  for (int bits : kBits)
    for (int d : {64, 128}) {
      const int ntok = 32, nq = 4, vg = 32, ng = d / vg, rb = kernels::row_bytes(d, bits);
      const auto k = randn(static_cast<std::size_t>(ntok) * d, 11u + bits, 40.0f, -3.0f);
      std::vector<std::uint16_t> ks(d), kz(d), vs(static_cast<std::size_t>(ntok) * ng), vz(vs.size());
      std::vector<std::uint8_t> kc(static_cast<std::size_t>(ntok) * rb), vc(kc.size());
      ref().kivi_quant_keys(k.data(), ntok, d, bits, ks.data(), kz.data(), kc.data());
      ref().kivi_quant_values(k.data(), ntok, d, bits, vg, vs.data(), vz.data(), vc.data());
      for (float tiny : {6.8e-38f, 1e-35f, 1e-31f}) {
        std::vector<float> p(static_cast<std::size_t>(nq) * ntok, 0.0f);
        for (int r = 0; r < nq; ++r) p[r * ntok + (5 * r + 3) % ntok] = tiny;
        std::vector<float> o(static_cast<std::size_t>(nq) * d, 0.5f);
        kt().kivi_accum(p.data(), nq, vs.data(), vz.data(), vc.data(), ntok, d, bits, vg, o.data());
        for (std::size_t i = 0; i < o.size(); ++i)
          ASSERT_NEAR(o[i], 0.5f, 1e-6f) << "bits " << bits << " d " << d << " p " << tiny << " entry " << i;
        std::vector<float> q(static_cast<std::size_t>(nq) * d, tiny), s(static_cast<std::size_t>(nq) * ntok);
        kt().kivi_scores(q.data(), nq, ks.data(), kz.data(), kc.data(), ntok, d, bits, s.data());
        for (std::size_t i = 0; i < s.size(); ++i)
          ASSERT_NEAR(s[i], 0.0f, 1e-20f) << "bits " << bits << " d " << d << " q " << tiny << " logit " << i;
      }
    }
}

TEST_P(Kernels, DenseScoresAndAccumulation) {
  for (int d : kDims)
    for (int ntok : kTokens)
      for (int nq : kRows) {
        const unsigned seed = static_cast<unsigned>(d * 131 + ntok * 7 + nq);
        const auto k = randn(static_cast<std::size_t>(ntok) * d, seed);
        const auto q = randn(static_cast<std::size_t>(nq) * d, seed + 1);
        const auto p = randn(static_cast<std::size_t>(nq) * ntok, seed + 2, 0.2f, 0.3f);
        std::vector<std::uint16_t> kh(k.size()), kb(k.size());
        ref().f32_to_f16(k.data(), kh.data(), k.size());
        ref().f32_to_bf16(k.data(), kb.data(), k.size());
        for (int fmt = 0; fmt < 3; ++fmt) {
          std::vector<float> kv(k.size());
          for (std::size_t i = 0; i < k.size(); ++i)
            kv[i] = fmt == 0 ? k[i] : (fmt == 1 ? f16_to_f32(kh[i]) : bf16_to_f32(kb[i]));
          std::vector<float> s(static_cast<std::size_t>(nq) * ntok), o(static_cast<std::size_t>(nq) * d, 0.5f);
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
              ASSERT_NEAR(s[r * ntok + j], want, 1e-5 * mag + 1e-7)
                  << "format " << fmt << " d " << d << " ntok " << ntok << " nq " << nq;
            }
            for (int c = 0; c < d; ++c) {
              double want = 0.5, mag = 0.5;
              for (int j = 0; j < ntok; ++j) {
                want += static_cast<double>(p[r * ntok + j]) * kv[j * d + c];
                mag += std::fabs(static_cast<double>(p[r * ntok + j]) * kv[j * d + c]);
              }
              ASSERT_NEAR(o[r * d + c], want, 1e-5 * mag + 1e-7)
                  << "format " << fmt << " d " << d << " ntok " << ntok << " nq " << nq;
            }
          }
        }
      }
}

TEST_P(Kernels, SoftmaxBlockIsAnOnlineSoftmax) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  for (int d : {1, 8, 17, 128})
    for (int ntok : kTokens)
      for (int nq : {3, 17}) {
        auto s1 = randn(static_cast<std::size_t>(nq) * ntok, 21u + static_cast<unsigned>(ntok), 3.0f);
        auto s2 = randn(static_cast<std::size_t>(nq) * ntok, 22u + static_cast<unsigned>(ntok), 3.0f, 2.0f);
        s2[0] = kNegInf;                                            // one masked token
        for (int j = 0; j < ntok; ++j) s1[2 * ntok + j] = kNegInf;  // row 2 fully masked in block 1
        std::vector<float> m(nq, kNegInf), l(nq, 0.0f), o(static_cast<std::size_t>(nq) * d, 0.0f);
        auto b1 = s1, b2 = s2;
        kt().softmax_block(b1.data(), nq, ntok, m.data(), l.data(), o.data(), d);
        EXPECT_EQ(m[2], kNegInf);  // fully masked: state untouched
        EXPECT_EQ(l[2], 0.0f);
        for (int r = 0; r < nq; ++r)
          for (int c = 0; c < d; ++c) o[r * d + c] = 1.0f;  // pretend accumulated values
        kt().softmax_block(b2.data(), nq, ntok, m.data(), l.data(), o.data(), d);
        for (int r = 0; r < nq; ++r) {
          double mx = -INFINITY;
          for (int j = 0; j < ntok; ++j)
            mx = std::max({mx, static_cast<double>(s1[r * ntok + j]), static_cast<double>(s2[r * ntok + j])});
          double sum = 0.0;
          for (int j = 0; j < ntok; ++j) sum += std::exp(s1[r * ntok + j] - mx) + std::exp(s2[r * ntok + j] - mx);
          EXPECT_FLOAT_EQ(m[r], static_cast<float>(mx));
          EXPECT_NEAR(l[r], sum, 1e-5 * sum);
          // Every implementation forms the argument s - m in float first (as the scalar
          // oracle does); that rounding is not the exp's, so the reference uses it too.
          const float mf = static_cast<float>(mx);
          for (int j = 0; j < ntok; ++j) {
            const double want = std::exp(static_cast<double>(s2[r * ntok + j] - mf));
            EXPECT_NEAR(b2[r * ntok + j], want, 5e-7 * want + 1e-37) << "row " << r << " token " << j;
          }
          // o was 1 after block 1 and is rescaled by exp(m1 - m2).
          float m1 = -std::numeric_limits<float>::infinity();
          for (int j = 0; j < ntok; ++j) m1 = std::max(m1, s1[r * ntok + j]);
          const double alpha = std::isinf(m1) ? 0.0 : std::exp(static_cast<double>(m1 - mf));
          for (int c = 0; c < d; ++c) EXPECT_NEAR(o[r * d + c], alpha, 5e-7 * alpha + 1e-37) << "row " << r;
        }
        for (int j = 0; j < ntok; ++j) EXPECT_EQ(b1[2 * ntok + j], 0.0f);  // fully masked row gives p = 0
        EXPECT_EQ(b2[0], 0.0f);                                          // -inf gives exactly 0
      }
}

// The vector exp over the whole softmax range: one logit at 0 (the max) and the others at x.
TEST_P(Kernels, SoftmaxExpAccuracy) {
  std::vector<float> xs;
  for (float x = 0.0f; x > -90.0f; x -= 0.0137f) xs.push_back(x);
  const int n = static_cast<int>(xs.size());
  std::vector<float> s(static_cast<std::size_t>(n) + 1);
  s[0] = 0.0f;
  std::copy(xs.begin(), xs.end(), s.begin() + 1);
  float m = -std::numeric_limits<float>::infinity(), l = 0.0f, o = 0.0f;
  kt().softmax_block(s.data(), 1, n + 1, &m, &l, &o, 1);
  double worst = 0.0;
  for (int i = 0; i < n; ++i) {
    const double want = std::exp(static_cast<double>(xs[i]));
    if (xs[i] < -87.3f) {
      EXPECT_LE(s[i + 1], 1.25e-38f) << xs[i];  // SIMD: flushed to 0; scalar: <= exp(-87.3)
      continue;
    }
    worst = std::max(worst, std::fabs(s[i + 1] - want) / want);
  }
  EXPECT_LT(worst, 5e-7) << "worst relative error of exp over [-87.3, 0]";
}

// Non-finite inputs (only reachable with NonFinitePolicy::kAllow) must not turn into finite
// garbage on the integer paths: NaN and infinities reach the same outputs as in scalar.
TEST_P(Kernels, NonFiniteInputsPropagate) {
  const int d = 128, ntok = 32, nq = 4, vg = 32, ng = d / vg;
  for (int bits : kBits) {
    const auto k = randn(static_cast<std::size_t>(ntok) * d, 5u, 1.0f);
    const int rb = kernels::row_bytes(d, bits);
    std::vector<std::uint16_t> ks(d), kz(d), vs(static_cast<std::size_t>(ntok) * ng), vz(vs.size());
    std::vector<std::uint8_t> kc(static_cast<std::size_t>(ntok) * rb), vc(kc.size());
    ref().kivi_quant_keys(k.data(), ntok, d, bits, ks.data(), kz.data(), kc.data());
    ref().kivi_quant_values(k.data(), ntok, d, bits, vg, vs.data(), vz.data(), vc.data());
    auto q = randn(static_cast<std::size_t>(nq) * d, 6u);
    auto p = randn(static_cast<std::size_t>(nq) * ntok, 7u, 0.1f, 0.5f);
    q[1 * d + 5] = std::numeric_limits<float>::quiet_NaN();  // row 1 of the scores
    p[2 * ntok + 9] = std::numeric_limits<float>::infinity();  // row 2 of the accumulation
    auto run = [&](const KernelTable& t, std::vector<float>& s, std::vector<float>& o) {
      s.assign(static_cast<std::size_t>(nq) * ntok, 0.0f);
      o.assign(static_cast<std::size_t>(nq) * d, 0.0f);
      t.kivi_scores(q.data(), nq, ks.data(), kz.data(), kc.data(), ntok, d, bits, s.data());
      t.kivi_accum(p.data(), nq, vs.data(), vz.data(), vc.data(), ntok, d, bits, vg, o.data());
    };
    std::vector<float> s1, o1, s2, o2;
    run(kt(), s1, o1);
    run(ref(), s2, o2);
    for (std::size_t i = 0; i < s1.size(); ++i) EXPECT_EQ(std::isfinite(s1[i]), std::isfinite(s2[i])) << bits << " score " << i;
    for (std::size_t i = 0; i < o1.size(); ++i) EXPECT_EQ(std::isfinite(o1[i]), std::isfinite(o2[i])) << bits << " out " << i;
    // A non-finite value scale (an f16 infinity) poisons that token's contribution.
    vs[3 * ng + 1] = 0x7c00;
    run(kt(), s1, o1);
    run(ref(), s2, o2);
    for (std::size_t i = 0; i < o1.size(); ++i) EXPECT_EQ(std::isfinite(o1[i]), std::isfinite(o2[i])) << bits << " out " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(AllIsas, Kernels, ::testing::ValuesIn(isas()),
                         [](const ::testing::TestParamInfo<Isa>& i) { return std::string(isa_name(i.param)); });
