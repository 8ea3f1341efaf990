// Quality on the real recordings in ../shared/data/dumps (both models, all windows), replayed
// token by token through KVCache exactly as kvslim-eval does:
// - f32 reproduces the recorded attn_out within 1e-5 relative (mean and p99: float rounding
//   only); f16 within 2e-3 (f16 has 11 significant bits: ~5e-4 per value);
// - KIVI attention error is ordered 8 < 4 < 3 < 2 < 1 bits, each under a named ceiling set
//   with about 2x headroom over the measured value (the `cases` table below lists them); the
//   uniform 1-bit pages (codes = group min/max) are the baseline 1-bit CQ is judged against;
// - KIVI's observation holds on these real keys: per-channel key quantization beats
//   per-token at 2 bits (data README: 0.017 vs 0.071 relative MSE on stories260K), while
//   values prefer per-token.
// Skips with a message if ../shared is absent.
#include <gtest/gtest.h>

#include <fmt/format.h>

#include <cmath>

#include "kvslim/cpu/isa.h"
#include "kvslim/kernels/kernel_table.h"
#include "kvslim/testing/recordings.h"
#include "kvslim/testing/replay.h"
#include "test_support.h"

using namespace kvslim;
using namespace kvslim::testing;

namespace {
// Ceilings on mean attention-output relative error, residual=0 so every complete group of
// 32 tokens is read from quantized pages (the hardest setting).
// Measured (8 windows, both models): 2.1e-3, 3.7e-2, 8.7e-2, 0.30, 1.61 (1-bit: worse than
// an all-zero output, whose relative error is 1).
constexpr double kKivi8Ceiling = 5e-3;
constexpr double kKivi4Ceiling = 8e-2;
constexpr double kKivi3Ceiling = 0.18;
constexpr double kKivi2Ceiling = 0.6;
constexpr double kKivi1Ceiling = 3.2;

const std::vector<Recording>& recordings() {
  static const std::vector<Recording> recs = [] {
    std::vector<Recording> r;
    for (const auto& dir : find_recordings(kvslim::test::shared_path("data/dumps"))) r.push_back(load_recording(dir));
    return r;
  }();
  return recs;
}
}  // namespace

#define REQUIRE_DUMPS()                 \
  KVSLIM_REQUIRE_SHARED("data/dumps");  \
  ASSERT_FALSE(recordings().empty()) << "no recordings under " << kvslim::test::shared_path("data/dumps")

TEST(Quality, F32AndF16ReproduceRecordedAttention) {
  REQUIRE_DUMPS();
  ASSERT_EQ(recordings().size(), 8u);
  const auto f32 = replay(recordings(), "f32");
  EXPECT_LT(f32.rel_err_mean, 1e-5);
  EXPECT_LT(f32.rel_err_p99, 1e-5);
  EXPECT_EQ(f32.samples, 8LL * 512 * 8 * (5 + 2) / 2);  // 4 windows x (5 layers) + 4 x (2 layers), 8 heads
  const auto f16 = replay(recordings(), "f16");
  EXPECT_LT(f16.rel_err_mean, 2e-3);
  EXPECT_GT(f16.rel_err_mean, f32.rel_err_mean);
  EXPECT_LT(f16.bits_per_value, 0.6 * f32.bits_per_value);
}

TEST(Quality, F32ChunkedPrefillMatchesRecording) {
  REQUIRE_DUMPS();
  ReplayOptions o;
  o.chunk = 100;
  EXPECT_LT(replay(recordings(), "f32", o).rel_err_p99, 1e-5);
}

TEST(Quality, KiviErrorOrderedByBits) {
  REQUIRE_DUMPS();
  double prev = 0.0, prev_bits = 0.0, two_bit = 0.0;
  const std::pair<int, double> cases[] = {
      {8, kKivi8Ceiling}, {4, kKivi4Ceiling}, {3, kKivi3Ceiling}, {2, kKivi2Ceiling}, {1, kKivi1Ceiling}};
  for (const auto& [bits, ceiling] : cases) {
    const auto r = replay(recordings(), fmt::format("kivi:kbits={},vbits={},residual=0", bits, bits));
    std::printf("kivi %d-bit: rel_err %.4g (p99 %.4g), cosine %.6f, %.2f bits/value\n", bits, r.rel_err_mean,
                r.rel_err_p99, r.cosine_mean, r.bits_per_value);
    EXPECT_LT(r.rel_err_mean, ceiling) << bits << " bits";
    EXPECT_GT(r.rel_err_mean, prev) << bits << " bits must be worse than more bits";
    if (prev_bits > 0) {
      EXPECT_LT(r.bits_per_value, prev_bits);
    }
    prev = r.rel_err_mean;
    prev_bits = r.bits_per_value;
    if (bits == 2) two_bit = r.rel_err_mean;
  }
  // The residual window is exact: with the default residual=128 the error drops.
  const auto res = replay(recordings(), "kivi:kbits=2,vbits=2,residual=128");
  EXPECT_LT(res.rel_err_mean, two_bit * 0.5);
}

TEST(Quality, PerChannelKeysBeatPerTokenKeysAtTwoBits) {
  REQUIRE_DUMPS();
  const kernels::KernelTable& kt = kernels::scalar::kTable;
  for (const Recording& r : recordings()) {
    const int d = r.head_dim, G = 32;
    std::vector<std::uint16_t> sc(64 * 32), zp(64 * 32);
    std::vector<std::uint8_t> codes(static_cast<std::size_t>(G) * d);
    std::vector<float> back(static_cast<std::size_t>(G) * d);
    // Relative MSE sum(err^2)/sum(x^2) of each scheme over all pages of all heads.
    auto rel_mse = [&](const std::vector<float>& x, bool per_channel) {
      double e = 0.0, s = 0.0;
      for (std::size_t off = 0; off + static_cast<std::size_t>(G) * d <= x.size(); off += static_cast<std::size_t>(G) * d) {
        const float* page = x.data() + off;
        if (per_channel) {
          kt.kivi_quant_keys(page, G, d, 2, sc.data(), zp.data(), codes.data());
          kt.kivi_dequant_keys(sc.data(), zp.data(), codes.data(), G, d, 2, back.data());
        } else {  // per token over all d channels (one group)
          kt.kivi_quant_values(page, G, d, 2, d, sc.data(), zp.data(), codes.data());
          kt.kivi_dequant_values(sc.data(), zp.data(), codes.data(), G, d, 2, d, back.data());
        }
        for (int i = 0; i < G * d; ++i) {
          e += (back[i] - page[i]) * static_cast<double>(back[i] - page[i]);
          s += static_cast<double>(page[i]) * page[i];
        }
      }
      return e / s;
    };
    const double k_channel = rel_mse(r.k, true), k_token = rel_mse(r.k, false);
    const double v_channel = rel_mse(r.v, true), v_token = rel_mse(r.v, false);
    std::printf("%s: keys per-channel %.4f per-token %.4f | values per-channel %.4f per-token %.4f\n",
                r.name.c_str(), k_channel, k_token, v_channel, v_token);
    EXPECT_LT(k_channel, k_token) << r.name;
    EXPECT_LT(v_token, v_channel) << r.name;
  }
}

// Issue 9 rewrote the attention kernels (fused per-page kernels, value scales folded into the
// softmax weights). Its rule: with full-precision queries, the attention error of every
// recipe may rise by at most 10% over the error before the rewrite. The baselines are
// kvslim-eval's rel_err_mean and rel_err_p99 at commit a783382 (token-by-token decode, the
// first 160 tokens of all 8 recordings, `--tokens 160`), identical to 5 digits on the scalar,
// AVX2 and AVX-512 tables. Checked on every table this machine has (a cache binds the active
// table when it is built). The recordings have head_dim 8 and 16: the head_dim 64/128/256
// specializations are covered by the kernel tests against double precision instead.
TEST(Quality, KernelRewriteKeepsAttentionErrorWithinTenPercent) {
  REQUIRE_DUMPS();
  struct Baseline {
    const char* recipe;
    double mean, p99;
  };
  const Baseline baseline[] = {
      {"f16", 1.86542e-4, 1.80085e-3},
      {"bf16", 1.43577e-3, 1.41198e-2},
      {"kivi:kbits=8,vbits=8,residual=0", 1.70944e-3, 1.28403e-2},
      {"kivi:kbits=4,vbits=4,residual=0", 2.95693e-2, 0.229587},
      {"kivi:kbits=3,vbits=3,residual=0", 6.69946e-2, 0.504887},
      {"kivi:kbits=2,vbits=2,residual=0", 0.210771, 1.47131},
      {"kivi:kbits=4,vbits=2,residual=0", 6.86908e-2, 0.360623},
      {"kivi:kbits=2,vbits=2,residual=0,vgroup=4", 0.192848, 1.44317},
      {"h2o:budget=64|kivi:kbits=4,vbits=4,residual=0", 8.41122e-2, 0.733751},
  };
  ReplayOptions o;
  o.max_tokens = 160;
  const Isa saved = active_isa();
  for (Isa isa : available_isas()) {
    set_active_isa(isa);
    for (const Baseline& b : baseline) {
      const ReplayResult r = replay(recordings(), b.recipe, o);
      EXPECT_LE(r.rel_err_mean, 1.10 * b.mean) << isa_name(isa) << " " << b.recipe << " (before: " << b.mean << ")";
      EXPECT_LE(r.rel_err_p99, 1.10 * b.p99) << isa_name(isa) << " " << b.recipe << " (before: " << b.p99 << ")";
    }
  }
  set_active_isa(saved);
}
