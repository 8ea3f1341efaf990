// Storage dtypes and exact scalar conversions.
//
// f32 -> f16 and f32 -> bf16 round to nearest, ties to even, exactly as IEEE 754 and as
// the F16C / AVX512-BF16 instructions do, so scalar and SIMD encoders agree bit for bit.
// NaN stays NaN (quiet), overflow in f16 becomes +-Inf, f16 subnormals are kept.
#pragma once

#include <cstdint>
#include <cstring>

namespace kvslim {

enum class DType : std::uint8_t { kF32 = 0, kF16 = 1, kBF16 = 2 };

/// Bytes per element of a dtype.
constexpr int dtype_size(DType t) noexcept { return t == DType::kF32 ? 4 : 2; }
/// "f32", "f16", "bf16".
constexpr const char* dtype_name(DType t) noexcept {
  return t == DType::kF32 ? "f32" : (t == DType::kF16 ? "f16" : "bf16");
}

namespace detail {
inline std::uint32_t f32_bits(float f) noexcept {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_f32(std::uint32_t u) noexcept {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
}  // namespace detail

/// IEEE binary16 bits of f, round to nearest even.
inline std::uint16_t f32_to_f16(float f) noexcept {
  const std::uint32_t x = detail::f32_bits(f);
  const std::uint32_t sign = (x >> 16) & 0x8000u;
  const std::uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) {  // Inf or NaN: keep NaN quiet with its top payload bits
    return static_cast<std::uint16_t>(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u | ((ax >> 13) & 0x3ffu) : 0u));
  }
  if (ax >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: Inf
  if (ax < 0x38800000u) {
    // Result is f16 subnormal (or zero): value = m * 2^-24. Add the float to 0.5 (2^-1)
    // so that the FPU's own round-to-nearest-even lands the bits where we want them.
    const float magic = detail::bits_f32(0x3f000000u);  // 0.5
    const float r = detail::bits_f32(ax) + magic;
    return static_cast<std::uint16_t>(sign | (detail::f32_bits(r) - 0x3f000000u));
  }
  // Normal: rebias exponent (127 -> 15) and round the 13 dropped mantissa bits to even.
  const std::uint32_t odd = (ax >> 13) & 1u;
  const std::uint32_t r = ax + 0xc8000fffu + odd;  // (-112 << 23) + 0xfff + odd
  return static_cast<std::uint16_t>(sign | (r >> 13));
}

/// float value of IEEE binary16 bits (exact).
inline float f16_to_f32(std::uint16_t h) noexcept {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu;
  std::uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return detail::bits_f32(sign | 0x7f800000u | (mant << 13));
  if (exp == 0) {
    if (mant == 0) return detail::bits_f32(sign);
    // subnormal: m * 2^-24, exact in float
    const float v = static_cast<float>(mant) * detail::bits_f32(0x33800000u);
    return sign ? -v : v;
  }
  return detail::bits_f32(sign | ((exp + 112u) << 23) | (mant << 13));
}

/// bfloat16 bits of f, round to nearest even; NaN stays a quiet NaN.
inline std::uint16_t f32_to_bf16(float f) noexcept {
  const std::uint32_t x = detail::f32_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((x >> 16) | 0x40u);
  const std::uint32_t rounding = 0x7fffu + ((x >> 16) & 1u);
  return static_cast<std::uint16_t>((x + rounding) >> 16);
}

/// float value of bfloat16 bits (exact).
inline float bf16_to_f32(std::uint16_t b) noexcept {
  return detail::bits_f32(static_cast<std::uint32_t>(b) << 16);
}

}  // namespace kvslim
