// f16 / bf16 conversions. Covered: every one of the 65536 f16 and bf16 bit patterns converts
// to float and back unchanged (exactness of the widening), and f32 -> f16 / bf16 rounds to the
// nearest representable value with ties to even, checked against a brute-force search over
// the sorted f16 values for random and hand-picked halfway inputs.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "kvslim/tensor/dtype.h"

using namespace kvslim;

namespace {
float bits(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Nearest f16 by exhaustive comparison of the two neighbours in a sorted table.
std::uint16_t ref_f16(float x) {
  static const std::vector<std::pair<float, std::uint16_t>> table = [] {
    std::vector<std::pair<float, std::uint16_t>> t;
    for (std::uint32_t h = 0; h < 0x7c00; ++h) t.emplace_back(f16_to_f32(static_cast<std::uint16_t>(h)), h);
    return t;
  }();
  const float ax = std::fabs(x);
  const std::uint16_t sign = std::signbit(x) ? 0x8000 : 0;
  if (ax >= 65520.0f) return sign | 0x7c00;
  auto it = std::lower_bound(table.begin(), table.end(), ax, [](const auto& p, float v) { return p.first < v; });
  if (it == table.begin()) return sign | it->second;
  auto lo = it - 1;
  if (it == table.end()) return sign | lo->second;
  const double dlo = ax - static_cast<double>(lo->first), dhi = static_cast<double>(it->first) - ax;
  if (dlo < dhi) return sign | lo->second;
  if (dhi < dlo) return sign | it->second;
  return sign | ((lo->second & 1) ? it->second : lo->second);
}
}  // namespace

TEST(DType, F16RoundTripAllPatterns) {
  for (std::uint32_t h = 0; h < 0x10000; ++h) {
    const auto hh = static_cast<std::uint16_t>(h);
    const float f = f16_to_f32(hh);
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(f16_to_f32(f32_to_f16(f)))) << h;
      continue;
    }
    ASSERT_EQ(f32_to_f16(f), hh) << "pattern " << h;
  }
}

TEST(DType, Bf16RoundTripAllPatterns) {
  for (std::uint32_t b = 0; b < 0x10000; ++b) {
    const auto bb = static_cast<std::uint16_t>(b);
    const float f = bf16_to_f32(bb);
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(f))));
      continue;
    }
    ASSERT_EQ(f32_to_bf16(f), bb);
  }
}

TEST(DType, F16RoundsToNearestEven) {
  std::mt19937 rng(7);
  std::uniform_int_distribution<std::uint32_t> any;
  for (int i = 0; i < 200000; ++i) {
    // Spread over the f16 range and beyond: exponents 2^-30 .. 2^17.
    const std::uint32_t e = 97 + any(rng) % 48;
    const float x = bits(((any(rng) & 1u) << 31) | (e << 23) | (any(rng) & 0x7fffff));
    ASSERT_EQ(f32_to_f16(x), ref_f16(x)) << x;
  }
  // Exact halfway cases between neighbours: ties go to the even mantissa.
  for (int hi : {0x0001, 0x0002, 0x03ff, 0x0400, 0x3c00, 0x3c01, 0x7bfe, 0x7bff}) {
    const auto h = static_cast<std::uint16_t>(hi);
    const float a = f16_to_f32(h), b = f16_to_f32(static_cast<std::uint16_t>(h + 1));
    const float mid = static_cast<float>((static_cast<double>(a) + b) / 2);
    EXPECT_EQ(f32_to_f16(mid), ref_f16(mid)) << "halfway after " << h;
    EXPECT_EQ(f32_to_f16(mid) & 1, 0) << "tie must be even";
  }
  EXPECT_EQ(f32_to_f16(65519.0f), 0x7bff);
  EXPECT_EQ(f32_to_f16(65520.0f), 0x7c00);  // halfway to 2^16 rounds up to Inf
  EXPECT_EQ(f32_to_f16(-1e9f), 0xfc00);
  EXPECT_TRUE(std::isnan(f16_to_f32(f32_to_f16(NAN))));
}

TEST(DType, Bf16RoundsToNearestEven) {
  EXPECT_EQ(f32_to_bf16(bits(0x3f808000u)), 0x3f80);  // tie, even stays
  EXPECT_EQ(f32_to_bf16(bits(0x3f818000u)), 0x3f82);  // tie, odd rounds up
  EXPECT_EQ(f32_to_bf16(bits(0x3f808001u)), 0x3f81);  // above tie
  std::mt19937 rng(3);
  std::uniform_int_distribution<std::uint32_t> any;
  for (int i = 0; i < 100000; ++i) {
    const float x = bits(any(rng) & 0xbfffffffu);  // finite exponents only
    if (!std::isfinite(x)) continue;
    const std::uint16_t b = f32_to_bf16(x);
    const double err = std::fabs(static_cast<double>(bf16_to_f32(b)) - x);
    const double alt1 = std::fabs(static_cast<double>(bf16_to_f32(static_cast<std::uint16_t>(b + 1))) - x);
    const double alt2 = std::fabs(static_cast<double>(bf16_to_f32(static_cast<std::uint16_t>(b - 1))) - x);
    if (!std::isnan(alt1)) {
      ASSERT_LE(err, alt1);
    }
    if (!std::isnan(alt2)) {
      ASSERT_LE(err, alt2);
    }
  }
}
