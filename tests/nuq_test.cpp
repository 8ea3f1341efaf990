// The `nuq` codec (kvslim/policy/nuq.h; kernel_table.h "NUQ page layout"): Gaussian
// Lloyd-Max levels, the per-row quantizer, every NUQ kernel on every kernel table built and
// supported here (only the forced one when KVSLIM_ISA is set; CI runs the `kernels` label once
// per ISA that way), the codec through KVCache, its recipe errors, and its quality on the real
// recordings in ../shared/data (skipped with a message if absent, a failure when CI is set).
//
// Covered and why the tolerances are what they are:
// - Levels: against the published Lloyd-Max table (Max 1960) to 1e-3, symmetric, ascending,
//   and the closed-form distortion against the published MSEs (0.3634, 0.1175, 0.03454,
//   0.009497) to 1e-4.
// - Quantizer: codes are the nearest level of x / sigma by brute force (a code may differ only
//   within 1e-9 of a midpoint, where double rounding of |y - L| can decide either way: none
//   occurs in this data), the scale is the least-squares one rounded to f16 (within half an
//   f16 ulp, 2^-11 relative, or 2^-25 absolute below the f16 normal range), every table writes
//   bit-identical codes and scales; the round-trip relative MSE on Gaussian rows falls with the
//   bit width and is below 0.015 at 4 bits (Lloyd-Max: 0.0095).
// - nuq_dequant is exactly f32(scale) * level (one float product: bit-exact on every table).
// - nuq_scores and nuq_accum against a double-precision reference over the decoded rows:
//   |error| <= kTolDot * sum of |terms| (+ the same for the initial o). A float dot product of d
//   terms in any order is within (d + 1) u sum|terms| (u = 2^-24: 1.5e-5 at d = 256, FMA or
//   not), so kTolDot = 2e-5 bounds every shape tested; typical errors are 100x smaller.
// - attend_nuq over sequences of 3-4 pages with tails (1, 7, 32, 33 tokens), masks (dead
//   slots, a fully dead page, logit biases, the causal limit, fully masked rows), nq 1/2/4/8
//   with nquery 1/2, every (kbits, vbits), head_dim {1, 3, 8, 17, 31, 64, 127, 128, 256}:
//   output vs the double reference (relative to the largest |output|) <= 2e-5, vs the scalar
//   table (output, m, l) <= 5e-5, probs = exp(logit - m) to 5e-5 absolute, the l increment =
//   the block's probs sum to 5e-6 relative, and bit-identical state without st.probs. These are
//   the tolerances of tests/kernels_fused_test.cpp's float KIVI paths (same sources of error:
//   summation order and the vector exp); the worst errors measured are printed.
// - KVCache: chunked prefill (chunks 1, 7, 33, whole) with GQA (4 query heads per kv head)
//   against double-precision causal attention over materialize(), within 1e-4 relative L2 (the
//   float rounding of scores over up to 150 tokens; materialize decodes with nuq_dequant).
// - Real recordings (residual=0, every window of both models): attention error at 2 > 3 > 4
//   bits; the nuq vs kivi table at 2, 3, 4 bits is printed, not asserted.
#include <gtest/gtest.h>

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "kvslim/kvslim.h"
#include "kvslim/kernels/kernel_table.h"
#include "kvslim/testing/recordings.h"
#include "kvslim/testing/replay.h"
#include "test_support.h"

using namespace kvslim;
using kernels::BlockMask;
using kernels::KernelTable;
using kernels::NuqPage;
using kernels::OnlineState;

namespace kvslim {
void PrintTo(Isa isa, std::ostream* os) { *os << isa_name(isa); }
}  // namespace kvslim

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr float kNegInfF = -std::numeric_limits<float>::infinity();

constexpr double kTolDot = 2e-5;      // scores / accum vs double, relative to sum |terms|
constexpr double kTolRef = 2e-5;      // attend output vs double, relative to max |output|
constexpr double kTolScalar = 5e-5;   // attend vs the scalar table: output, m (abs), l (rel)
constexpr double kTolProbs = 5e-5;    // |probs - exp(logit - m)|
constexpr double kTolLSum = 5e-6;     // l increment vs the block's probs sum, relative
constexpr double kTolCache = 1e-4;    // KVCache vs the reference over materialize(), relative L2
constexpr double kNuq4MseCeiling = 0.015;

const int kDims[] = {1, 3, 8, 17, 31, 64, 127, 128, 256};

std::vector<Isa> isas() {
  if (const char* env = std::getenv("KVSLIM_ISA"); env && *env) return {active_isa()};
  return available_isas();
}

const float* levels(int bits) { return gaussian_levels_f32(bits).data(); }

// The code of channel c in a packed row, read independently of the kernels: bits
// [c * bits, (c + 1) * bits) of the row, LSB first.
unsigned code_at(const std::uint8_t* row, int c, int bits) {
  unsigned v = 0;
  for (int b = 0; b < bits; ++b) {
    const int bit = c * bits + b;
    v |= ((row[bit >> 3] >> (bit & 7)) & 1u) << b;
  }
  return v;
}

// Rows of NUQ-coded vectors with their independent decode.
struct Coded {
  int ntok = 0, d = 0, bits = 0;
  std::vector<std::uint16_t> scale;
  std::vector<std::uint8_t> codes;
  std::vector<float> dec;  // f16_to_f32(scale_j) * L[code_jc], computed here
};
Coded encode(const KernelTable& t, const std::vector<float>& x, int ntok, int d, int bits) {
  Coded c;
  c.ntok = ntok;
  c.d = d;
  c.bits = bits;
  const int rb = kernels::row_bytes(d, bits);
  c.scale.assign(static_cast<std::size_t>(ntok), 0xBEEF);
  c.codes.assign(static_cast<std::size_t>(ntok) * rb, 0xA5);  // exact size: the sanitizers see overruns
  t.nuq_quant(x.data(), ntok, d, bits, levels(bits), c.scale.data(), c.codes.data());
  c.dec.resize(static_cast<std::size_t>(ntok) * d);
  for (int j = 0; j < ntok; ++j)
    for (int ch = 0; ch < d; ++ch)
      c.dec[static_cast<std::size_t>(j) * d + ch] =
          f16_to_f32(c.scale[j]) * levels(bits)[code_at(c.codes.data() + static_cast<std::size_t>(j) * rb, ch, bits)];
  return c;
}

// Keys with per-channel offsets and spreads (a few outlier channels: per-token scaling then
// meets non-Gaussian rows), values around 0; n01 from a seeded generator.
std::vector<float> keys(std::mt19937& rng, int ntok, int d) {
  std::normal_distribution<float> n01;
  std::vector<float> off(static_cast<std::size_t>(d)), spread(off.size()), x(static_cast<std::size_t>(ntok) * d);
  for (int c = 0; c < d; ++c) {
    off[c] = (c % 16 == 5 ? 3.0f : 0.7f) * n01(rng);
    spread[c] = (c % 16 == 5 ? 2.0f : 0.5f) + 0.5f * std::fabs(n01(rng));
  }
  for (int j = 0; j < ntok; ++j)
    for (int c = 0; c < d; ++c) x[static_cast<std::size_t>(j) * d + c] = off[c] + spread[c] * n01(rng);
  return x;
}
std::vector<float> gaussian(std::mt19937& rng, std::size_t n, float sd = 1.0f) {
  std::normal_distribution<float> n01;
  std::vector<float> x(n);
  for (float& a : x) a = sd * n01(rng);
  return x;
}

class NuqKernels : public ::testing::TestWithParam<Isa> {
 protected:
  const KernelTable& kt() const { return *kernels::table_for(static_cast<int>(GetParam())); }
  const char* isa() const { return isa_name(GetParam()); }
};

}  // namespace

// ---------------------------------------------------------------------------------------
// Levels

TEST(NuqLevels, MatchThePublishedLloydMaxTable) {
  const std::vector<std::vector<double>> positive = {
      {0.7979},
      {0.4528, 1.5104},
      {0.2451, 0.7560, 1.3440, 2.1520},
      {0.1284, 0.3881, 0.6568, 0.9423, 1.2562, 1.6181, 2.0690, 2.7326}};
  for (int bits = 1; bits <= 4; ++bits) {
    const auto L = gaussian_levels(bits);
    const auto Lf = gaussian_levels_f32(bits);
    const int n = 1 << bits;
    ASSERT_EQ(static_cast<int>(L.size()), n);
    ASSERT_EQ(static_cast<int>(Lf.size()), n);
    for (int i = 0; i < n / 2; ++i) {
      EXPECT_NEAR(L[n / 2 + i], positive[bits - 1][i], 1e-3) << bits << " bits, level " << n / 2 + i;
      EXPECT_EQ(L[n / 2 - 1 - i], -L[n / 2 + i]) << bits << " bits: symmetric";
      EXPECT_EQ(Lf[n / 2 + i], static_cast<float>(L[n / 2 + i]));
    }
    for (int i = 1; i < n; ++i) EXPECT_LT(L[i - 1], L[i]) << bits << " bits: ascending";
  }
  EXPECT_NEAR(gaussian_levels(1)[1], std::sqrt(2.0 / M_PI), 1e-10);  // the half-normal mean
  // Lloyd-Max distortion (Max 1960): 0.3634, 0.1175, 0.03454, 0.009497.
  EXPECT_NEAR(gaussian_levels_mse(1), 1.0 - 2.0 / M_PI, 1e-9);
  EXPECT_NEAR(gaussian_levels_mse(2), 0.1175, 1e-4);
  EXPECT_NEAR(gaussian_levels_mse(3), 0.03454, 1e-4);
  EXPECT_NEAR(gaussian_levels_mse(4), 0.009497, 1e-5);
  for (int bits : {0, 5}) test::expect_error([&] { (void)gaussian_levels(bits); }, ErrorCode::kInvalidArgument, {"bits="});
}

// ---------------------------------------------------------------------------------------
// Quantizer

TEST_P(NuqKernels, QuantizerCodesAreNearestLevelsAndScaleIsLeastSquares) {
  std::mt19937 rng(5);
  long rows = 0, checked_codes = 0;
  for (int d : kDims)
    for (int bits = 1; bits <= 4; ++bits) {
      const int ntok = 9, n = 1 << bits, rb = kernels::row_bytes(d, bits);
      std::vector<float> x = keys(rng, ntok, d);
      for (int c = 0; c < d; ++c) x[static_cast<std::size_t>(1) * d + c] = 0.0f;  // row 1: zero
      for (int c = 0; c < d; ++c) x[static_cast<std::size_t>(2) * d + c] = c == d / 2 ? -3.0f : 0.0f;  // one spike
      for (int c = 0; c < d; ++c) x[static_cast<std::size_t>(3) * d + c] *= 1e-3f;  // small
      const Coded got = encode(kt(), x, ntok, d, bits);
      const Coded sc = encode(kernels::scalar::kTable, x, ntok, d, bits);
      ASSERT_EQ(got.scale, sc.scale) << isa() << " d " << d << " bits " << bits << ": scales differ from scalar";
      ASSERT_EQ(got.codes, sc.codes) << isa() << " d " << d << " bits " << bits << ": codes differ from scalar";
      const auto L = gaussian_levels_f32(bits);
      for (int j = 0; j < ntok; ++j) {
        ++rows;
        const float* xr = x.data() + static_cast<std::size_t>(j) * d;
        const std::uint8_t* row = got.codes.data() + static_cast<std::size_t>(j) * rb;
        // Padding bits of the last byte are 0.
        if ((d * bits) % 8) {
          EXPECT_EQ(row[rb - 1] >> ((d * bits) % 8), 0) << "padding, d " << d;
        }
        double ss = 0.0;
        for (int c = 0; c < d; ++c) ss += static_cast<double>(xr[c]) * xr[c];
        const double sigma = std::sqrt(ss / d);
        double xl = 0.0, ll = 0.0;
        for (int c = 0; c < d; ++c) {
          const double y = sigma > 0.0 ? xr[c] / sigma : 0.0;
          int best = 0;  // brute force: the smallest |y - L_i|, the lowest index on a tie
          for (int i = 1; i < n; ++i)
            if (std::fabs(y - L[i]) < std::fabs(y - L[best])) best = i;
          const unsigned code = code_at(row, c, bits);
          if (static_cast<int>(code) != best) {
            const double mid = 0.5 * (static_cast<double>(L[std::min<int>(code, best)]) + L[std::max<int>(code, best)]);
            EXPECT_LT(std::fabs(y - mid), 1e-9) << "d " << d << " bits " << bits << " row " << j << " ch " << c
                                                << ": code " << code << ", nearest " << best << " (y " << y << ")";
          }
          ++checked_codes;
          xl += xr[c] * static_cast<double>(L[code]);
          ll += static_cast<double>(L[code]) * L[code];
        }
        const double s = f16_to_f32(got.scale[j]);
        if (sigma == 0.0) {
          EXPECT_EQ(got.scale[j], 0) << "zero row: scale 0";
          for (int c = 0; c < d; ++c) EXPECT_EQ(code_at(row, c, bits), static_cast<unsigned>(n / 2 - 1)) << "zero row";
          continue;
        }
        const double ls = xl / ll;
        EXPECT_LE(std::fabs(s - ls), std::max(std::fabs(ls) * 0x1p-11, 0x1p-25))
            << isa() << " d " << d << " bits " << bits << " row " << j << ": scale " << s << " least squares " << ls;
      }
    }
  EXPECT_GT(rows, 300);
  EXPECT_GT(checked_codes, 10000);
}

TEST_P(NuqKernels, RoundTripErrorFallsWithBitsOnGaussianRows) {
  std::mt19937 rng(11);
  const int d = 128, ntok = 2048;
  const std::vector<float> x = gaussian(rng, static_cast<std::size_t>(ntok) * d, 0.37f);
  double prev = kInf;
  for (int bits = 1; bits <= 4; ++bits) {
    const Coded c = encode(kt(), x, ntok, d, bits);
    std::vector<float> back(x.size());
    kt().nuq_dequant(c.scale.data(), c.codes.data(), ntok, d, bits, levels(bits), back.data());
    double e = 0.0, s = 0.0;
    for (std::size_t i = 0; i < x.size(); ++i) {
      e += (back[i] - static_cast<double>(x[i])) * (back[i] - static_cast<double>(x[i]));
      s += static_cast<double>(x[i]) * x[i];
    }
    const double mse = e / s;
    std::printf("[ nuq      ] %s %d-bit round trip: relative MSE %.5f (Lloyd-Max %.5f)\n", isa(), bits, mse,
                gaussian_levels_mse(bits));
    EXPECT_LT(mse, prev) << bits << " bits";
    // The least-squares scale can only lower the error of the sigma-scaled levels, up to f16.
    EXPECT_LT(mse, gaussian_levels_mse(bits) * 1.05) << bits << " bits";
    prev = mse;
  }
  EXPECT_LT(prev, kNuq4MseCeiling);
}

TEST_P(NuqKernels, DequantIsScaleTimesLevelExactly) {
  std::mt19937 rng(3);
  for (int d : kDims)
    for (int bits = 1; bits <= 4; ++bits)
      for (int ntok : {1, 7, 33}) {
        const Coded c = encode(kernels::scalar::kTable, keys(rng, ntok, d), ntok, d, bits);
        std::vector<float> got(static_cast<std::size_t>(ntok) * d + 5, -7.0f);
        kt().nuq_dequant(c.scale.data(), c.codes.data(), ntok, d, bits, levels(bits), got.data());
        for (int i = 0; i < 5; ++i) ASSERT_EQ(got[c.dec.size() + i], -7.0f) << "wrote past the output";
        got.resize(c.dec.size());
        ASSERT_EQ(got, c.dec) << isa() << " d " << d << " bits " << bits << " ntok " << ntok;
      }
}

TEST_P(NuqKernels, ScoresAndAccumMatchDoubleReferenceOverDecodedRows) {
  std::mt19937 rng(17);
  double worst_s = 0.0, worst_a = 0.0;
  int cases = 0;
  for (int d : kDims)
    for (int bits = 1; bits <= 4; ++bits)
      for (int ntok : {1, 7, 32, 33})
        for (int nq : {1, 2, 4, 8}) {
          const Coded c = encode(kernels::scalar::kTable, keys(rng, ntok, d), ntok, d, bits);
          const std::vector<float> q = gaussian(rng, static_cast<std::size_t>(nq) * d, 1.0f / std::sqrt(float(d)));
          std::vector<float> p = gaussian(rng, static_cast<std::size_t>(nq) * ntok);
          for (std::size_t i = 0; i < p.size(); ++i) p[i] = i % 5 == 2 ? 0.0f : std::fabs(p[i]);
          const std::vector<float> o0 = gaussian(rng, static_cast<std::size_t>(nq) * d);
          std::vector<float> s(static_cast<std::size_t>(nq) * ntok), o = o0;
          kt().nuq_scores(q.data(), nq, c.scale.data(), c.codes.data(), ntok, d, bits, levels(bits), s.data());
          kt().nuq_accum(p.data(), nq, c.scale.data(), c.codes.data(), ntok, d, bits, levels(bits), o.data());
          ++cases;
          for (int r = 0; r < nq; ++r) {
            for (int j = 0; j < ntok; ++j) {
              double ref = 0.0, mag = 0.0;
              for (int ch = 0; ch < d; ++ch) {
                const double t = static_cast<double>(q[r * d + ch]) * c.dec[static_cast<std::size_t>(j) * d + ch];
                ref += t;
                mag += std::fabs(t);
              }
              const double e = std::fabs(s[r * ntok + j] - ref) / std::max(mag, 1e-30);
              worst_s = std::max(worst_s, e);
              ASSERT_LE(e, kTolDot) << isa() << " scores d " << d << " bits " << bits << " ntok " << ntok << " nq " << nq
                                    << " r " << r << " j " << j;
            }
            for (int ch = 0; ch < d; ++ch) {
              double ref = o0[r * d + ch], mag = std::fabs(ref);
              for (int j = 0; j < ntok; ++j) {
                const double t = static_cast<double>(p[r * ntok + j]) * c.dec[static_cast<std::size_t>(j) * d + ch];
                ref += t;
                mag += std::fabs(t);
              }
              const double e = std::fabs(o[r * d + ch] - ref) / std::max(mag, 1e-30);
              worst_a = std::max(worst_a, e);
              ASSERT_LE(e, kTolDot) << isa() << " accum d " << d << " bits " << bits << " ntok " << ntok << " nq " << nq
                                    << " r " << r << " c " << ch;
            }
          }
        }
  std::printf("[ nuq      ] %s: %d cases, worst relative error scores %.3g, accum %.3g (tolerance %.1g)\n", isa(),
              cases, worst_s, worst_a, kTolDot);
}

// ---------------------------------------------------------------------------------------
// Fused attention over sequences of pages

namespace {

enum Mask { kNone, kDead, kCausal, kBias, kAll, kEmptyRows, kMaskCount };
const char* const kMaskNames[] = {"none", "dead", "causal", "bias", "causal+dead+bias", "fully-masked-rows"};
struct Rows {
  int nq, nquery;
};
const Rows kRows[] = {{1, 1}, {2, 1}, {4, 1}, {8, 1}, {2, 2}, {4, 2}, {8, 2}};
const std::vector<int> kSeqs[] = {{7, 33, 32}, {32, 1, 33}, {33, 7, 1, 32}, {1, 32, 7}};

struct Page {
  int ntok = 0;
  std::vector<std::uint64_t> dead;
  std::vector<float> bias;
  Coded k, v;
  bool is_dead(int j) const { return !dead.empty() && ((dead[j >> 6] >> (j & 63)) & 1u); }
  int live() const {
    int n = 0;
    for (int j = 0; j < ntok; ++j) n += !is_dead(j);
    return n;
  }
};
struct AttCase {
  int d = 0, nq = 1, nquery = 1, mask = kNone, kbits = 0, vbits = 0;
  std::int64_t base = 5, limit0 = BlockMask::kNoLimit;
  std::vector<float> q;
  std::vector<Page> pages;
  int slots() const {
    int n = 0;
    for (const Page& p : pages) n += p.ntok;
    return n;
  }
  std::string describe() const {
    std::string s = fmt::format("k{}v{} d {} nq {} nquery {} mask {} pages {{", kbits, vbits, d, nq, nquery,
                                kMaskNames[mask]);
    for (std::size_t i = 0; i < pages.size(); ++i) s += fmt::format("{}{}", i ? "," : "", pages[i].ntok);
    return s + "}";
  }
};

AttCase make_att(int d, Rows rows, int mask, const std::vector<int>& seq, int kbits, int vbits, unsigned seed) {
  std::mt19937 rng(seed);
  AttCase c;
  c.d = d;
  c.nq = rows.nq;
  c.nquery = rows.nquery;
  c.mask = mask;
  c.kbits = kbits;
  c.vbits = vbits;
  c.q = gaussian(rng, static_cast<std::size_t>(c.nq) * d, 1.2f / std::sqrt(static_cast<float>(d)));
  const bool dead = mask == kDead || mask == kAll, bias = mask == kBias || mask == kAll;
  const float kBiasValues[] = {0.0f, std::log(2.0f), std::log(3.0f), std::log(7.5f)};
  for (std::size_t b = 0; b < seq.size(); ++b) {
    Page pg;
    pg.ntok = seq[b];
    if (dead || mask == kEmptyRows) {
      pg.dead.assign(static_cast<std::size_t>((pg.ntok + 63) / 64), 0);
      for (int j = 0; j < pg.ntok; ++j)
        if ((dead && b == 1 && seq[b] > 1) || (mask == kEmptyRows && b == 0) || (dead && rng() % 4 == 0))
          pg.dead[j >> 6] |= std::uint64_t{1} << (j & 63);
    }
    if (bias) {
      std::normal_distribution<float> n01;
      for (int j = 0; j < pg.ntok; ++j) pg.bias.push_back(rng() % 2 ? kBiasValues[rng() % 4] : 0.5f * n01(rng));
    }
    pg.k = encode(kernels::scalar::kTable, keys(rng, pg.ntok, d), pg.ntok, d, kbits);
    pg.v = encode(kernels::scalar::kTable, gaussian(rng, static_cast<std::size_t>(pg.ntok) * d), pg.ntok, d, vbits);
    c.pages.push_back(std::move(pg));
  }
  if (mask == kCausal || mask == kAll) {
    std::size_t pick = 0;
    for (std::size_t b = 1; b < c.pages.size(); ++b)
      if (c.pages[b].live() > c.pages[pick].live()) pick = b;
    std::int64_t first = c.base;
    for (std::size_t b = 0; b < pick; ++b) first += c.pages[b].live();
    const int live = c.pages[pick].live(), where = static_cast<int>(rng() % 3);
    c.limit0 = first + (where == 0 ? std::max(1, live / 2) : where == 1 ? live - 1 : live);
  } else if (mask == kEmptyRows) {
    c.limit0 = c.base;  // query 0 sees nothing, query 1 one token
  }
  return c;
}

struct AttRef {
  std::vector<double> logit, out;  // [nq][slots] (-inf: masked), [nq][d]
  std::vector<char> sees;
};
AttRef att_reference(const AttCase& c) {
  const int slots = c.slots(), d = c.d;
  AttRef ref;
  ref.logit.assign(static_cast<std::size_t>(c.nq) * slots, -kInf);
  ref.out.assign(static_cast<std::size_t>(c.nq) * d, 0.0);
  ref.sees.assign(static_cast<std::size_t>(c.nq), 0);
  for (int r = 0; r < c.nq; ++r) {
    const std::int64_t limit = c.limit0 + r % c.nquery;
    double* lr = ref.logit.data() + static_cast<std::size_t>(r) * slots;
    std::int64_t index = c.base;
    int slot = 0;
    double mx = -kInf;
    for (const Page& pg : c.pages)
      for (int j = 0; j < pg.ntok; ++j, ++slot) {
        if (pg.is_dead(j)) continue;
        if (index++ >= limit) continue;
        double dot = 0.0;
        for (int ch = 0; ch < d; ++ch)
          dot += static_cast<double>(c.q[static_cast<std::size_t>(r) * d + ch]) * pg.k.dec[static_cast<std::size_t>(j) * d + ch];
        if (!pg.bias.empty()) dot += pg.bias[j];
        lr[slot] = dot;
        mx = std::max(mx, dot);
      }
    if (mx == -kInf) continue;
    ref.sees[r] = 1;
    double sum = 0.0;
    for (int j = 0; j < slots; ++j) sum += lr[j] == -kInf ? 0.0 : std::exp(lr[j] - mx);
    slot = 0;
    for (const Page& pg : c.pages)
      for (int j = 0; j < pg.ntok; ++j, ++slot) {
        if (lr[slot] == -kInf) continue;
        const double p = std::exp(lr[slot] - mx) / sum;
        for (int ch = 0; ch < d; ++ch)
          ref.out[static_cast<std::size_t>(r) * d + ch] += p * pg.v.dec[static_cast<std::size_t>(j) * d + ch];
      }
  }
  return ref;
}

struct AttRun {
  std::vector<float> m, l, o, out, probs;
  std::vector<float> m_after, l_after;  // [pages + 1][nq]
  int stride = 0;
};
AttRun att_run(const KernelTable& t, const AttCase& c, bool with_probs) {
  const int nq = c.nq, d = c.d;
  AttRun res;
  res.m.assign(static_cast<std::size_t>(nq), kNegInfF);
  res.l.assign(static_cast<std::size_t>(nq), 0.0f);
  res.o.assign(static_cast<std::size_t>(nq) * d, 0.0f);
  res.stride = c.slots() + 2;
  if (with_probs) res.probs.assign(static_cast<std::size_t>(nq) * res.stride, -123.0f);
  res.m_after = res.m;
  res.l_after = res.l;
  std::int64_t index = c.base;
  int slot = 0;
  for (const Page& pg : c.pages) {
    std::vector<float> s(static_cast<std::size_t>(nq) * pg.ntok, std::numeric_limits<float>::quiet_NaN());
    BlockMask mk;
    mk.dead = pg.dead.empty() ? nullptr : pg.dead.data();
    mk.bias = pg.bias.empty() ? nullptr : pg.bias.data();
    mk.first = index;
    mk.limit0 = c.limit0;
    mk.nquery = c.nquery;
    OnlineState st{res.m.data(), res.l.data(), res.o.data(), s.data()};
    if (with_probs) {
      st.probs = res.probs.data() + slot;
      st.probs_stride = res.stride;
    }
    // Exercise the prefetch bursts on the page's own bytes (harmless, and must not matter).
    st.prefetch = pg.k.codes.data();
    st.prefetch_bytes = pg.k.codes.size();
    const NuqPage np{pg.k.scale.data(), pg.v.scale.data(), pg.k.codes.data(), pg.v.codes.data(),
                     levels(c.kbits),   levels(c.vbits),   c.kbits,           c.vbits};
    t.attend_nuq(c.q.data(), nq, np, pg.ntok, d, mk, st);
    res.m_after.insert(res.m_after.end(), res.m.begin(), res.m.end());
    res.l_after.insert(res.l_after.end(), res.l.begin(), res.l.end());
    index += pg.live();
    slot += pg.ntok;
  }
  res.out.resize(res.o.size());
  for (int r = 0; r < nq; ++r)
    for (int ch = 0; ch < d; ++ch) res.out[r * d + ch] = res.l[r] > 0.0f ? res.o[r * d + ch] / res.l[r] : 0.0f;
  return res;
}

struct Worst {
  double err = 0.0;
  std::string where;
  int failures = 0;
  void add(double e, double tol, const AttCase& c, const char* what, const char* isa) {
    if (std::isnan(e)) e = kInf;
    if (e > err) {
      err = e;
      where = c.describe();
    }
    if (e > tol && ++failures <= 8) ADD_FAILURE() << what << " " << isa << ": " << e << " > " << tol << " in " << c.describe();
  }
};

}  // namespace

TEST_P(NuqKernels, AttendMatchesReferenceAndScalar) {
  Worst ref_w, sc_w, probs_w, lsum_w;
  int cases = 0, empty_rows = 0, exact_failures = 0;
  unsigned i = 0;
  for (int d : kDims)
    for (int pass = 0; pass < 2; ++pass)
      for (int kb = 1; kb <= 4; ++kb)
        for (int vb = 1; vb <= 4; ++vb, ++i) {
          const int mask = static_cast<int>(i % kMaskCount);
          const Rows rows = kRows[(i / kMaskCount + i) % 7];
          const AttCase c = make_att(d, rows, mask, kSeqs[(i / 3) % 4], kb, vb, 900u + i);
          const AttRef ref = att_reference(c);
          const AttRun got = att_run(kt(), c, true);
          ++cases;
          const AttRun np = att_run(kt(), c, false);
          if (!(np.m == got.m && np.l == got.l && np.o == got.o) && ++exact_failures <= 8)
            ADD_FAILURE() << isa() << ": state without probs differs in " << c.describe();
          const int nq = c.nq, slots = c.slots();
          double scale = 1e-30, err = 0.0;
          for (int r = 0; r < nq; ++r)
            if (ref.sees[r])
              for (int ch = 0; ch < d; ++ch) scale = std::max(scale, std::fabs(ref.out[r * d + ch]));
          for (int r = 0; r < nq; ++r) {
            if (!ref.sees[r]) {
              ++empty_rows;
              bool zero = got.l[r] == 0.0f && got.m[r] == kNegInfF;
              for (int ch = 0; ch < d; ++ch) zero = zero && got.o[r * d + ch] == 0.0f;
              for (int j = 0; j < slots; ++j) zero = zero && got.probs[static_cast<std::size_t>(r) * got.stride + j] == 0.0f;
              if (!zero && ++exact_failures <= 8) ADD_FAILURE() << isa() << ": masked row " << r << " in " << c.describe();
              continue;
            }
            if (!(got.l[r] > 0.0f) && ++exact_failures <= 8) ADD_FAILURE() << isa() << ": l = 0 in " << c.describe();
            for (int ch = 0; ch < d; ++ch) err = std::max(err, std::fabs(got.out[r * d + ch] - ref.out[r * d + ch]) / scale);
          }
          ref_w.add(err, kTolRef, c, "vs double reference", isa());
          if (GetParam() != Isa::kScalar) {
            const AttRun sc = att_run(kernels::scalar::kTable, c, true);
            double osc = 1e-30, e = 0.0;
            for (float x : sc.out) osc = std::max(osc, static_cast<double>(std::fabs(x)));
            for (std::size_t k = 0; k < sc.out.size(); ++k) e = std::max(e, std::fabs(got.out[k] - sc.out[k]) / osc);
            for (int r = 0; r < nq; ++r) {
              if (sc.l[r] == 0.0f) {
                if (got.l[r] != 0.0f || got.m[r] != sc.m[r]) e = kInf;
                continue;
              }
              e = std::max(e, std::fabs(static_cast<double>(got.m[r]) - sc.m[r]));
              e = std::max(e, std::fabs(static_cast<double>(got.l[r]) - sc.l[r]) / sc.l[r]);
            }
            sc_w.add(e, kTolScalar, c, "vs scalar table", isa());
          }
          // probs of every page = exp(logit - m after the page); their sum = the l increment.
          double perr = 0.0, lerr = 0.0;
          bool layout = true;
          for (int r = 0; r < nq; ++r) {
            const float* pr = got.probs.data() + static_cast<std::size_t>(r) * got.stride;
            for (int j = slots; j < got.stride; ++j) layout = layout && pr[j] == -123.0f;
            int slot = 0;
            for (std::size_t b = 0; b < c.pages.size(); ++b) {
              const float m_before = got.m_after[b * nq + r], m_now = got.m_after[(b + 1) * nq + r];
              const float l_before = got.l_after[b * nq + r], l_now = got.l_after[(b + 1) * nq + r];
              double sum = 0.0;
              for (int j = 0; j < c.pages[b].ntok; ++j, ++slot) {
                const double lg = ref.logit[static_cast<std::size_t>(r) * slots + slot];
                sum += pr[slot];
                if (lg == -kInf) {
                  layout = layout && pr[slot] == 0.0f;
                  continue;
                }
                perr = std::max(perr, std::fabs(pr[slot] - std::exp(lg - m_now)));
              }
              if (m_now != kNegInfF) {
                const double want = static_cast<double>(l_before) * std::exp(static_cast<double>(m_before) - m_now) + sum;
                lerr = std::max(lerr, std::fabs(l_now - want) / want);
              } else if (l_now != 0.0f || sum != 0.0) {
                lerr = kInf;
              }
            }
          }
          if (!layout && ++exact_failures <= 8) ADD_FAILURE() << isa() << ": probs layout in " << c.describe();
          probs_w.add(perr, kTolProbs, c, "probs = exp(logit - m)", isa());
          lsum_w.add(lerr, kTolLSum, c, "l increment = probs sum", isa());
        }
  std::printf("[ nuq      ] attend_nuq on %s: %d cases (%d fully masked rows)\n", isa(), cases, empty_rows);
  const std::pair<const char*, const Worst*> checks[] = {
      {"vs double reference", &ref_w}, {"vs scalar table", &sc_w}, {"probs = exp(logit - m)", &probs_w},
      {"l increment = probs sum", &lsum_w}};
  for (const auto& [what, w] : checks)
    std::printf("[ nuq      ]   %-24s max %.3g (%s)\n", what, w->err, w->where.c_str());
  EXPECT_EQ(ref_w.failures + sc_w.failures + probs_w.failures + lsum_w.failures + exact_failures, 0);
  EXPECT_GT(empty_rows, 0);
}

INSTANTIATE_TEST_SUITE_P(AllIsas, NuqKernels, ::testing::ValuesIn(isas()),
                         [](const ::testing::TestParamInfo<Isa>& i) { return std::string(isa_name(i.param)); });

// ---------------------------------------------------------------------------------------
// The codec: recipe, page layout, errors

TEST(NuqCodec, CanonicalTextDefaultsAndPageBytes) {
  EXPECT_EQ(build_pipeline(parse_recipe("nuq").base, 128).text,
            "nuq:kbits=3,vbits=3,levels=gaussian,group=32,residual=128,sinks=0");
  EXPECT_EQ(build_pipeline(parse_recipe("nuq:kbits=4,vbits=2,levels=gaussian,group=16,residual=0,sinks=2").base, 64).text,
            "nuq:kbits=4,vbits=2,levels=gaussian,group=16,residual=0,sinks=2");
  // kscale[G] | vscale[G] | kcodes[G][row_bytes(d, kbits)] | vcodes[G][row_bytes(d, vbits)], and
  // encode writes exactly those bytes: every one of them (the same page from buffers prefilled
  // with 0x00 and 0xA5) and none after them.
  std::mt19937 rng(2);
  for (int d : {1, 17, 64, 128})
    for (int kb = 1; kb <= 4; ++kb)
      for (int vb : {1, 3, 4}) {
        const Pipeline p = build_pipeline(parse_recipe(fmt::format("nuq:kbits={},vbits={}", kb, vb)).base, d);
        for (int ntok : {1, 7, 32}) {
          const std::size_t want = static_cast<std::size_t>(ntok) *
                                   (4 + kernels::row_bytes(d, kb) + kernels::row_bytes(d, vb));
          ASSERT_EQ(p.codec->page_bytes(ntok, d), want) << "d " << d << " k" << kb << "v" << vb << " ntok " << ntok;
          const auto k = keys(rng, ntok, d), v = gaussian(rng, static_cast<std::size_t>(ntok) * d);
          std::vector<std::byte> a(want + 16, std::byte{0}), b(want + 16, std::byte{0xA5});
          p.codec->encode(kernels::active(), k.data(), v.data(), ntok, d, a.data());
          p.codec->encode(kernels::active(), k.data(), v.data(), ntok, d, b.data());
          EXPECT_TRUE(std::equal(a.begin(), a.begin() + static_cast<std::ptrdiff_t>(want), b.begin()));
          for (std::size_t i = want; i < want + 16; ++i) ASSERT_EQ(b[i], std::byte{0xA5}) << "wrote past page_bytes";
          // The page parts are where the layout says: the key scales decode the keys.
          std::vector<float> kd(k.size()), vd(v.size());
          p.codec->decode(kernels::active(), a.data(), ntok, d, kd.data(), vd.data());
          const Coded kc = encode(kernels::scalar::kTable, k, ntok, d, kb);
          const Coded vc = encode(kernels::scalar::kTable, v, ntok, d, vb);
          EXPECT_EQ(kd, kc.dec);
          EXPECT_EQ(vd, vc.dec);
          EXPECT_EQ(std::memcmp(a.data(), kc.scale.data(), 2u * ntok), 0);
          EXPECT_EQ(std::memcmp(a.data() + 2 * ntok, vc.scale.data(), 2u * ntok), 0);
          EXPECT_EQ(std::memcmp(a.data() + 4 * ntok, kc.codes.data(), kc.codes.size()), 0);
          EXPECT_EQ(std::memcmp(a.data() + 4 * ntok + kc.codes.size(), vc.codes.data(), vc.codes.size()), 0);
        }
      }
}

TEST(NuqCodec, RecipeErrors) {
  auto build = [](const std::string& r) { return [r] { (void)build_pipeline(parse_recipe(r).base, 64); }; };
  test::expect_error(build("nuq:kbits=5"), ErrorCode::kInvalidArgument,
                     {"recipe stage 'nuq'", "kbits=5 is not a supported bit width (1, 2, 3 or 4)"});
  test::expect_error(build("nuq:vbits=0"), ErrorCode::kInvalidArgument,
                     {"recipe stage 'nuq'", "vbits=0 is not a supported bit width (1, 2, 3 or 4)"});
  // Anything but gaussian names a level file (tests/nuq_levels_test.cpp): a missing one is
  // an I/O error naming it.
  test::expect_error(build("nuq:levels=foo"), ErrorCode::kIo, {"levels=foo", "cannot open", "level file"});
  test::expect_error(build("nuq:levels=/nonexistent/levels.bin"), ErrorCode::kIo,
                     {"levels=/nonexistent/levels.bin", "cannot open"});
  test::expect_error(build("nuq:bits=3"), ErrorCode::kRecipe, {"unknown key 'bits'", "kbits", "levels"});
  test::expect_error(build("nuq:rotate=1"), ErrorCode::kInvalidArgument, {"rotate=1", "none or hadamard"});
  test::expect_error(build("nuq:rotated=v"), ErrorCode::kInvalidArgument, {"rotated=", "no rotation"});
  test::expect_error(build("nuq:kbits=two"), ErrorCode::kRecipe, {"kbits"});
  // Through the cache constructor too.
  test::expect_error([] { KVCache c(CacheConfig{1, 1, 1, 8, 10, "nuq:kbits=5"}); }, ErrorCode::kInvalidArgument,
                     {"kbits=5"});
}

TEST(NuqCodec, AppendRejectsRowsItCannotEncode) {
  const int d = 8;
  KVCache cache(CacheConfig{1, 1, 1, d, 64, "nuq:kbits=3,vbits=3,group=4,residual=0"});
  std::vector<float> ok(d, 1.0f), big(d, 70000.0f), hot(d, 60000.0f);
  auto append = [&](const std::vector<float>& k, const std::vector<float>& v) {
    cache.append(0, TensorView<const float>(k.data(), {1, 1, d}), TensorView<const float>(v.data(), {1, 1, d}));
  };
  test::expect_error([&] { append(big, ok); }, ErrorCode::kInvalidArgument, {"nuq", "key", "65504"});
  // 60000 fits f16, but the row's least-squares scale is 60000 / 0.756 (x / sigma = 1 codes to
  // the level 0.756): beyond f16.
  test::expect_error([&] { append(ok, hot); }, ErrorCode::kInvalidArgument,
                     {"codec 'nuq'", "value row 0", "scale beyond the f16 range"});
  EXPECT_EQ(cache.tokens(0, 0), 0);  // a rejected append changes nothing
  append(ok, ok);
  EXPECT_EQ(cache.tokens(0, 0), 1);
}

// ---------------------------------------------------------------------------------------
// Through KVCache: chunked prefill with GQA against double-precision causal attention over
// what the cache holds (materialize()), positions from the cache.

TEST(NuqCache, ChunkedPrefillWithGqaMatchesExactAttention) {
  constexpr int kKv = 2, kGroup = 4, kQ = kKv * kGroup, T = 150;
  for (const char* recipe : {"nuq:kbits=3,vbits=3,group=16,residual=0", "nuq:kbits=4,vbits=2,group=32,residual=8,sinks=2",
                             "nuq:kbits=1,vbits=4,group=8,residual=0,sinks=1"})
    for (int d : {16, 64})
      for (int chunk : {1, 7, 33, T}) {
        SCOPED_TRACE(fmt::format("{} d {} chunk {}", recipe, d, chunk));
        std::mt19937 rng(static_cast<unsigned>(d * 100 + chunk));
        const std::vector<float> k = gaussian(rng, static_cast<std::size_t>(kKv) * T * d);
        const std::vector<float> v = gaussian(rng, k.size());
        const std::vector<float> q = gaussian(rng, static_cast<std::size_t>(kQ) * T * d, 1.5f);
        auto view = [&](const std::vector<float>& buf, int heads, int t0, int n) {
          Layout l;
          l.rank = 3;
          l.shape = {heads, n, d, 0};
          l.strides = {static_cast<std::int64_t>(T) * d, d, 1, 0};
          return TensorView<const float>(buf.data() + static_cast<std::size_t>(t0) * d, l);
        };
        KVCache cache(CacheConfig{1, kQ, kKv, d, T, recipe});
        double worst = 0.0;
        for (int t0 = 0; t0 < T; t0 += chunk) {
          const int n = std::min(chunk, T - t0);
          cache.append(0, view(k, kKv, t0, n), view(v, kKv, t0, n));
          std::vector<DenseKV> snap;
          for (int h = 0; h < kKv; ++h) snap.push_back(cache.materialize(0, h));
          std::vector<float> out(static_cast<std::size_t>(kQ) * n * d);
          cache.attend(0, view(q, kQ, t0, n), TensorView<float>(out.data(), {kQ, n, d}));
          for (int qh = 0; qh < kQ; ++qh) {
            const DenseKV& kv = snap[qh / kGroup];
            const int held = static_cast<int>(kv.positions.size());
            for (int i = 0; i < n; ++i) {
              const float* qr = q.data() + (static_cast<std::size_t>(qh) * T + t0 + i) * d;
              const std::int64_t qpos = t0 + i;  // default positions: the token index
              std::vector<double> s(static_cast<std::size_t>(held), -kInf), o(static_cast<std::size_t>(d), 0.0);
              double mx = -kInf, sum = 0.0;
              for (int j = 0; j < held; ++j) {
                if (kv.positions[j] > qpos) continue;
                double dot = 0.0;
                for (int c = 0; c < d; ++c) dot += static_cast<double>(qr[c]) * kv.k.data()[j * d + c];
                s[j] = dot / std::sqrt(static_cast<double>(d));
                mx = std::max(mx, s[j]);
              }
              for (int j = 0; j < held; ++j)
                if (s[j] != -kInf) {
                  const double p = std::exp(s[j] - mx);
                  sum += p;
                  for (int c = 0; c < d; ++c) o[c] += p * kv.v.data()[j * d + c];
                }
              const float* got = out.data() + (static_cast<std::size_t>(qh) * n + i) * d;
              double e2 = 0.0, r2 = 0.0;
              for (int c = 0; c < d; ++c) {
                e2 += (got[c] - o[c] / sum) * (got[c] - o[c] / sum);
                r2 += (o[c] / sum) * (o[c] / sum);
              }
              worst = std::max(worst, std::sqrt(e2 / std::max(r2, 1e-30)));
            }
          }
        }
        EXPECT_LT(worst, kTolCache);
        // Pages hold the tokens beyond the window: the codec was really used.
        EXPECT_LT(cache.stats().bits_per_value, 32.0);
      }
}

// ---------------------------------------------------------------------------------------
// Real recordings

namespace {
const std::vector<kvslim::testing::Recording>& recordings() {
  static const std::vector<kvslim::testing::Recording> recs = [] {
    std::vector<kvslim::testing::Recording> r;
    for (const auto& dir : kvslim::testing::find_recordings(test::shared_path("data/dumps")))
      r.push_back(kvslim::testing::load_recording(dir));
    return r;
  }();
  return recs;
}
}  // namespace

TEST(NuqQuality, AttentionErrorFallsWithBitsOnRecordings) {
  KVSLIM_REQUIRE_SHARED("data/dumps");
  ASSERT_FALSE(recordings().empty()) << "no recordings under " << test::shared_path("data/dumps");
  double prev = kInf;
  std::printf("[ nuq      ] %-6s %-4s %12s %12s %10s\n", "codec", "bits", "rel_err", "p99", "bits/value");
  for (int bits : {2, 3, 4}) {
    const auto nuq = kvslim::testing::replay(recordings(), fmt::format("nuq:kbits={0},vbits={0},residual=0", bits));
    const auto kivi = kvslim::testing::replay(recordings(), fmt::format("kivi:kbits={0},vbits={0},residual=0", bits));
    std::printf("[ nuq      ] %-6s %-4d %12.4g %12.4g %10.3f\n", "nuq", bits, nuq.rel_err_mean, nuq.rel_err_p99,
                nuq.bits_per_value);
    std::printf("[ nuq      ] %-6s %-4d %12.4g %12.4g %10.3f\n", "kivi", bits, kivi.rel_err_mean, kivi.rel_err_p99,
                kivi.bits_per_value);
    EXPECT_LT(nuq.rel_err_mean, prev) << bits << " bits must beat fewer bits";
    EXPECT_GT(nuq.samples, 0);
    prev = nuq.rel_err_mean;
  }
  std::fflush(stdout);
}
