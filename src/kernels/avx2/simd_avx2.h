// AVX2 vector helpers for the generic kernel bodies (kernels-inl.h): 8 float lanes.
// Requires AVX2, FMA and F16C. Included only by kernels_avx2.cpp, inside namespace
// kvslim::kernels::avx2::{anonymous}, after <immintrin.h>, <cstddef>, <cstdint>.
// Float tails use VMASKMOVPS; 16-bit and byte tails go through a small stack copy, so
// nothing is read or written past the buffers' ends.

constexpr int kL = 8;    // float lanes
constexpr int kCB = 2;   // vectors per column block in accumulation loops (4 x 2 accumulators)
using VF = __m256;
using VI = __m256i;

inline __m256i lanes(int n) noexcept {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

inline VF vzero() noexcept { return _mm256_setzero_ps(); }
inline VF vset1(float x) noexcept { return _mm256_set1_ps(x); }
inline VF vload(const float* p) noexcept { return _mm256_loadu_ps(p); }
inline VF vload_n(const float* p, int n) noexcept { return _mm256_maskload_ps(p, lanes(n)); }
inline VF vload_n_fill(const float* p, int n, float fill) noexcept {
  const __m256i m = lanes(n);
  return _mm256_blendv_ps(_mm256_set1_ps(fill), _mm256_maskload_ps(p, m), _mm256_castsi256_ps(m));
}
inline void vstore(float* p, VF v) noexcept { _mm256_storeu_ps(p, v); }
inline void vstore_n(float* p, VF v, int n) noexcept { _mm256_maskstore_ps(p, lanes(n), v); }
inline VF vkeep_n(VF v, int n) noexcept { return _mm256_and_ps(v, _mm256_castsi256_ps(lanes(n))); }

inline VF vadd(VF a, VF b) noexcept { return _mm256_add_ps(a, b); }
inline VF vsub(VF a, VF b) noexcept { return _mm256_sub_ps(a, b); }
inline VF vmul(VF a, VF b) noexcept { return _mm256_mul_ps(a, b); }
inline VF vdiv(VF a, VF b) noexcept { return _mm256_div_ps(a, b); }
inline VF vfma(VF a, VF b, VF c) noexcept { return _mm256_fmadd_ps(a, b, c); }
// (a < b) ? a : b and (a > b) ? a : b, exactly as the scalar code's comparisons.
inline VF vmin(VF a, VF b) noexcept { return _mm256_min_ps(a, b); }
inline VF vmax(VF a, VF b) noexcept { return _mm256_max_ps(a, b); }

inline float vreduce_add(VF v) noexcept {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}
inline float vreduce_max(VF v) noexcept {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  x = _mm_max_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}
inline float vreduce_min(VF v) noexcept {
  __m128 x = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_min_ps(x, _mm_movehl_ps(x, x));
  x = _mm_min_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

// Transposed reductions: lane i of the result is the sum (min, max) of all lanes of a[i].
// Sums use two levels of HADDPS, then the 128-bit halves; min/max combine halves of blocks
// of 2, 4 and 8 lanes with blends and shuffles.
struct OpAdd {
  static VF apply(VF a, VF b) noexcept { return _mm256_add_ps(a, b); }
};
struct OpMin {
  static VF apply(VF a, VF b) noexcept { return _mm256_min_ps(a, b); }
};
struct OpMax {
  static VF apply(VF a, VF b) noexcept { return _mm256_max_ps(a, b); }
};
template <class Op>
inline VF vhreduce(const VF* a) noexcept {
  VF b[4], c[2];
  for (int i = 0; i < 4; ++i) {  // pairs: [x0 y1 x2 y3 ..] op [x1 y0 x3 y2 ..]
    const VF x = a[2 * i], y = a[2 * i + 1];
    b[i] = Op::apply(_mm256_blend_ps(x, y, 0xAA),
                     _mm256_blend_ps(_mm256_permute_ps(x, 0xB1), _mm256_permute_ps(y, 0xB1), 0xAA));
  }
  for (int i = 0; i < 2; ++i) {  // blocks of 4: [x0 x1 y2 y3] op [x2 x3 y0 y1]
    const VF x = b[2 * i], y = b[2 * i + 1];
    c[i] = Op::apply(_mm256_blend_ps(x, y, 0xCC), _mm256_shuffle_ps(x, y, 0x4E));
  }
  return Op::apply(_mm256_blend_ps(c[0], c[1], 0xF0), _mm256_permute2f128_ps(c[0], c[1], 0x21));
}
inline VF vhsum(const VF* a) noexcept {
  const VF h0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const VF h1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20), _mm256_permute2f128_ps(h0, h1, 0x31));
}
// Stores a full vhsum block (4 rows x 2 tokens, lane r*2 + t) to s[r*stride + t] from the
// registers. Going through a stack copy costs a store-forwarding stall per row on Zen 2 (a
// 256-bit store read back as 64-bit loads): a quarter of the KIVI score pass in a profile.
inline void vstore_block(float* s, std::ptrdiff_t stride, VF res) noexcept {
  const __m128 lo = _mm256_castps256_ps128(res), hi = _mm256_extractf128_ps(res, 1);
  _mm_storel_pi(reinterpret_cast<__m64*>(s), lo);
  _mm_storeh_pi(reinterpret_cast<__m64*>(s + stride), lo);
  _mm_storel_pi(reinterpret_cast<__m64*>(s + 2 * stride), hi);
  _mm_storeh_pi(reinterpret_cast<__m64*>(s + 3 * stride), hi);
}
// Lane i = p[i / ng] for ng dividing 8; reads only the 8 / ng floats it uses.
inline VF vexpand(const float* p, int ng) noexcept {
  switch (ng) {
    case 1: return _mm256_loadu_ps(p);
    case 2:
      return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(p)), _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
    case 4:
      return _mm256_permutevar8x32_ps(
          _mm256_castps128_ps256(_mm_castsi128_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))),
          _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
    default: return _mm256_broadcast_ss(p);
  }
}
// Lane i of v in every lane.
// The Walsh-Hadamard stages h = 1, 2, 4 inside one vector (kernel_table.h, hadamard_rows):
// lane i gets x_i + x_(i^h) where i & h == 0, else x_(i^h) - x_i: the scalar a + b, a - b.
inline VF vhadamard_lanes(VF v) noexcept {
  VF w = _mm256_permute_ps(v, 0xB1);  // lanes 1 0 3 2 ...
  v = _mm256_blend_ps(_mm256_add_ps(v, w), _mm256_sub_ps(w, v), 0xAA);
  w = _mm256_permute_ps(v, 0x4E);  // lanes 2 3 0 1 ...
  v = _mm256_blend_ps(_mm256_add_ps(v, w), _mm256_sub_ps(w, v), 0xCC);
  w = _mm256_permute2f128_ps(v, v, 1);  // the two 128-bit halves swapped
  return _mm256_blend_ps(_mm256_add_ps(v, w), _mm256_sub_ps(w, v), 0xF0);
}
inline VF vlane(VF v, int i) noexcept { return _mm256_permutevar8x32_ps(v, _mm256_set1_epi32(i)); }

// 16-bit tails: copy n <= 8 elements into a zeroed 8-element buffer.
inline __m128i load_u16_n(const std::uint16_t* p, int n) noexcept {
  std::uint16_t t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int i = 0; i < n; ++i) t[i] = p[i];
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(t));
}
inline void store_u16_n(std::uint16_t* p, __m128i v, int n) noexcept {
  alignas(16) std::uint16_t t[8];
  _mm_store_si128(reinterpret_cast<__m128i*>(t), v);
  for (int i = 0; i < n; ++i) p[i] = t[i];
}

inline VF vload_h(const std::uint16_t* p) noexcept {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline VF vload_h_n(const std::uint16_t* p, int n) noexcept { return _mm256_cvtph_ps(load_u16_n(p, n)); }
inline VF bf16_widen(__m128i h) noexcept {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline VF vload_b(const std::uint16_t* p) noexcept {
  return bf16_widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline VF vload_b_n(const std::uint16_t* p, int n) noexcept { return bf16_widen(load_u16_n(p, n)); }
inline __m128i f16_bits(VF v) noexcept { return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// Round to nearest even on the integer bits (as kvslim::f32_to_bf16); NaN -> quiet NaN.
inline __m128i bf16_bits(VF v) noexcept {
  const __m256i x = _mm256_castps_si256(v);
  const __m256i hi = _mm256_srli_epi32(x, 16);
  const __m256i lsb = _mm256_and_si256(hi, _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(x, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  // |x| > 0x7f800000 as signed compare is safe: both sides are non-negative.
  const __m256i nan =
      _mm256_cmpgt_epi32(_mm256_and_si256(x, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
  const __m256i b = _mm256_blendv_epi8(r, _mm256_or_si256(hi, _mm256_set1_epi32(0x40)), nan);
  // 32 -> 16 bits: values fit, so unsigned saturation is exact; then fix the lane order.
  const __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi32(b, b), 0x08);
  return _mm256_castsi256_si128(p);
}
inline void vstore_h(std::uint16_t* p, VF v) noexcept {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), f16_bits(v));
}
inline void vstore_h_n(std::uint16_t* p, VF v, int n) noexcept { store_u16_n(p, f16_bits(v), n); }
inline void vstore_b(std::uint16_t* p, VF v) noexcept {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), bf16_bits(v));
}
inline void vstore_b_n(std::uint16_t* p, VF v, int n) noexcept { store_u16_n(p, bf16_bits(v), n); }
// Exact f16 -> f32 bits, including signaling NaNs (which the hardware would quiet).
inline VF h_exact(__m128i h) noexcept {
  const VF f = _mm256_cvtph_ps(h);
  const __m256i w = _mm256_cvtepu16_epi32(h);
  const __m256i exp_nq = _mm256_cmpeq_epi32(_mm256_and_si256(w, _mm256_set1_epi32(0x7e00)), _mm256_set1_epi32(0x7c00));
  const __m256i payload = _mm256_cmpgt_epi32(_mm256_and_si256(w, _mm256_set1_epi32(0x01ff)), _mm256_setzero_si256());
  const __m256i snan = _mm256_and_si256(exp_nq, payload);
  return _mm256_castsi256_ps(_mm256_andnot_si256(_mm256_and_si256(snan, _mm256_set1_epi32(0x00400000)),
                                                 _mm256_castps_si256(f)));
}
inline VF vload_h_exact(const std::uint16_t* p) noexcept {
  return h_exact(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline VF vload_h_exact_n(const std::uint16_t* p, int n) noexcept { return h_exact(load_u16_n(p, n)); }

// exp(x) for the softmax arguments x <= 0. Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2,
// then the Cephes expf polynomial (max relative error about 2 ulp on this range) and 2^n
// built in the exponent field (n >= -126 here, so it is a normal number). x < -87.3, -inf
// and NaN give exactly 0, so masked tokens get probability 0.
inline VF vexp(VF x) noexcept {
  const VF n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  VF r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  VF p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const VF y = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const VF ok = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_GE_OQ);
  // n is in [-126, 0] wherever ok is set; elsewhere the lane is discarded.
  const __m256i ni = _mm256_cvtps_epi32(_mm256_and_ps(n, ok));
  const VF scale = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(ni, _mm256_set1_epi32(127)), 23));
  return _mm256_and_ps(_mm256_mul_ps(y, scale), ok);
}

// clamp(nearbyint(y), 0, qmax) as integers. Clamping first to the integer bounds and then
// rounding (ties to even, the default MXCSR mode that nearbyint also uses) gives the same
// result; a NaN gives 0.
inline VI vquant(VF y, VF qmax) noexcept {
  return _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(y, _mm256_setzero_ps()), qmax));
}
// 1/s where s > 0, else 0 (IEEE division, as the scalar code).
inline VF vinv_pos(VF s) noexcept {
  const VF pos = _mm256_cmp_ps(s, _mm256_setzero_ps(), _CMP_GT_OQ);
  return _mm256_and_ps(_mm256_div_ps(_mm256_set1_ps(1.0f), s), pos);
}

// --- packed code rows (LSB-first bit stream, see kernel_table.h) ---
// Codes of channels [c, c+n) as floats; p = row + c*B/8 with c a multiple of 8 (byte
// aligned). Reads exactly ceil(n*B/8) bytes.
template <int B, bool kFull>
inline VI vcodes_i(const std::uint8_t* p, int n) noexcept {
  const int nbytes = kFull ? B : (n * B + 7) / 8;
  if constexpr (B == 8) {
    std::uint64_t w = 0;
    if (kFull) {
      __builtin_memcpy(&w, p, 8);
    } else {
      for (int i = 0; i < nbytes; ++i) w |= static_cast<std::uint64_t>(p[i]) << (8 * i);
    }
    return _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(w)));
  } else {
    // 8 codes are B bytes (<= 32 bits): lane l takes bits [B*l, B*l + B) (B = 1: one byte,
    // lane l its bit l).
    std::uint32_t w = 0;
    if (kFull && B == 3) {
      // Assembled in registers: a 3-byte memcpy into w goes through the stack, and the 4-byte
      // reload then misses store forwarding (measured: 3-bit KIVI / NUQ pages 4-5x slower).
      std::uint16_t lo;
      __builtin_memcpy(&lo, p, 2);
      w = lo | static_cast<std::uint32_t>(p[2]) << 16;
    } else if (kFull) {
      __builtin_memcpy(&w, p, B);
    } else {
      for (int i = 0; i < nbytes; ++i) w |= static_cast<std::uint32_t>(p[i]) << (8 * i);
    }
    const __m256i sh = _mm256_setr_epi32(0, B, 2 * B, 3 * B, 4 * B, 5 * B, 6 * B, 7 * B);
    return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(w)), sh),
                            _mm256_set1_epi32((1 << B) - 1));
  }
}
template <int B, bool kFull>
inline VF vcodes(const std::uint8_t* p, int n) noexcept {
  return _mm256_cvtepi32_ps(vcodes_i<B, kFull>(p, n));
}

// Two full vectors of codes (channels [c, c + 16), p = row + c*B/8): one broadcast load per
// 16 codes (B = 1, 2) or 8 (B = 4), so the unpacking is a shift, a mask and a convert per
// vector and no scalar load or register broadcast.
template <int B>
inline void vcodes2(const std::uint8_t* p, VF* x) noexcept {
  if constexpr (B == 1) {
    std::uint16_t w;
    __builtin_memcpy(&w, p, 2);
    const __m256i b = _mm256_set1_epi32(w), m = _mm256_set1_epi32(1);
    x[0] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(b, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)), m));
    x[1] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(b, _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15)), m));
  } else if constexpr (B == 2) {
    std::uint32_t w;
    __builtin_memcpy(&w, p, 4);
    const __m256i b = _mm256_set1_epi32(static_cast<int>(w)), m = _mm256_set1_epi32(3);
    x[0] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(b, _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14)), m));
    x[1] = _mm256_cvtepi32_ps(
        _mm256_and_si256(_mm256_srlv_epi32(b, _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30)), m));
  } else if constexpr (B == 8) {
    x[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
    x[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8))));
  } else {
    x[0] = vcodes<B, true>(p, kL);
    x[1] = vcodes<B, true>(p + B, kL);
  }
}

// The codes of 16 channels as two vectors, without variable shifts: vpsrlvd costs about 1.8
// cycles per vector on Zen 2 (measured: the KIVI value loop ran at 9.1 cycles per 8 FMAs with
// it and 5.5 with this), so each lane instead picks its code's byte (vpshufb) and masks the
// code in place. Lane i then holds code * vcode_scale<B>()[i], a power of two; callers fold
// the inverse into the query (scores) or unscale the sums (values), both exact.
template <int B>
inline constexpr bool kScaledCodes = B == 1 || B == 2 || B == 4;
template <int B>
inline VF vcode_scale() noexcept {
  if constexpr (B == 1) return _mm256_setr_ps(1, 2, 4, 8, 16, 32, 64, 128);
  if constexpr (B == 2) return _mm256_setr_ps(1, 4, 16, 64, 1, 4, 16, 64);
  if constexpr (B == 4) return _mm256_setr_ps(1, 16, 1, 16, 1, 16, 1, 16);
  return _mm256_set1_ps(1.0f);
}
// The inverse, exact for powers of two; GCC folds the division of the constants.
template <int B>
inline VF vcode_unscale() noexcept {
  return _mm256_div_ps(_mm256_set1_ps(1.0f), vcode_scale<B>());
}
template <int B>
inline void vcodes2s(const std::uint8_t* p, VF* x) noexcept {
  // Byte selectors: c[h] puts, in every dword lane i of vector h, the byte holding that
  // lane's code into the lane's low byte (the source is broadcast to both 128-bit halves).
  if constexpr (B == 1) {
    std::uint16_t w;
    __builtin_memcpy(&w, p, 2);
    const __m256i b = _mm256_set1_epi16(static_cast<short>(w));
    const __m256i m = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i c0 = _mm256_set1_epi32(static_cast<int>(0xFFFFFF00u)), c1 = _mm256_set1_epi32(static_cast<int>(0xFFFFFF01u));
    x[0] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_shuffle_epi8(b, c0), m));
    x[1] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_shuffle_epi8(b, c1), m));
  } else if constexpr (B == 2) {
    std::uint32_t w;
    __builtin_memcpy(&w, p, 4);
    const __m256i b = _mm256_set1_epi32(static_cast<int>(w));
    const __m256i m = _mm256_setr_epi32(3, 12, 48, 192, 3, 12, 48, 192);
    const __m256i c0 = _mm256_setr_epi32(-256, -256, -256, -256, -255, -255, -255, -255);  // bytes 0, 1
    const __m256i c1 = _mm256_setr_epi32(-254, -254, -254, -254, -253, -253, -253, -253);  // bytes 2, 3
    x[0] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_shuffle_epi8(b, c0), m));
    x[1] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_shuffle_epi8(b, c1), m));
  } else if constexpr (B == 4) {
    std::uint64_t w;
    __builtin_memcpy(&w, p, 8);
    const __m256i b = _mm256_set1_epi64x(static_cast<long long>(w));
    const __m256i m = _mm256_setr_epi32(15, 240, 15, 240, 15, 240, 15, 240);
    const __m256i c0 = _mm256_setr_epi32(-256, -256, -255, -255, -254, -254, -253, -253);  // bytes 0-3
    const __m256i c1 = _mm256_setr_epi32(-252, -252, -251, -251, -250, -250, -249, -249);  // bytes 4-7
    x[0] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_shuffle_epi8(b, c0), m));
    x[1] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_shuffle_epi8(b, c1), m));
  } else {
    vcodes2<B>(p, x);
  }
}

// Bytes of the 8 codes (each < 256) in lane order, in the low 8 bytes.
inline __m128i vcode_bytes(VI codes) noexcept {
  const __m256i sel = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                       0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i t = _mm256_shuffle_epi8(codes, sel);
  return _mm_unpacklo_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
}

// Packs the 32 codes of c[0..3] (channels in order) into 4*B bytes at p, LSB-first.
// The lanes may hold any int32: they are saturated to [0, 2^B - 1] (signed packs to 16
// bits, unsigned packs to bytes, then an unsigned byte minimum), so raw VCVTPS2DQ results
// of the quantization rule can be passed in (a NaN converts to INT_MIN and gives 0, as
// the clamp-then-round of vquant). The byte packs are lane-interleaved, fixed by one
// dword permutation; multiply-adds then merge neighbouring codes.
template <int B>
inline void vstore_codes4(std::uint8_t* p, const VI* c) noexcept {
  __m256i b = _mm256_permutevar8x32_epi32(
      _mm256_packus_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3])),
      _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  if constexpr (B != 8) b = _mm256_min_epu8(b, _mm256_set1_epi8(static_cast<char>((1 << B) - 1)));
  if constexpr (B == 8) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), b);
  } else if constexpr (B == 1) {
    // Bytes are 0 or 1: a 16-bit shift by 7 moves each byte's bit 0 to its bit 7 (no set bit
    // crosses into the next byte), and VPMOVMSKB gathers the 32 of them LSB-first.
    const std::uint32_t m = static_cast<std::uint32_t>(_mm256_movemask_epi8(_mm256_slli_epi16(b, 7)));
    __builtin_memcpy(p, &m, 4);
  } else if constexpr (B == 4) {
    const __m256i w = _mm256_maddubs_epi16(b, _mm256_set1_epi16(16 << 8 | 1));  // c0 + 16 c1
    const __m256i x = _mm256_permute4x64_epi64(_mm256_packus_epi16(w, w), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(x));
  } else if constexpr (B == 3) {
    // 8 codes make 24 bits: words c0 + 8 c1, dwords of 4 codes (12 bits), then each qword's
    // high dword is shifted down next to its low one; bytes 0-2 of every qword are gathered.
    const __m256i w = _mm256_maddubs_epi16(b, _mm256_set1_epi16(8 << 8 | 1));
    const __m256i d = _mm256_madd_epi16(w, _mm256_set1_epi32(64 << 16 | 1));
    const __m256i q = _mm256_or_si256(d, _mm256_srli_epi64(d, 20));
    const __m256i g = _mm256_shuffle_epi8(q, _mm256_setr_epi8(0, 1, 2, 8, 9, 10, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                                               0, 1, 2, 8, 9, 10, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1));
    const __m128i x = _mm_or_si128(_mm256_castsi256_si128(g), _mm_slli_si128(_mm256_extracti128_si256(g, 1), 6));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p), x);
    const std::uint32_t hi = static_cast<std::uint32_t>(_mm_extract_epi32(x, 2));
    __builtin_memcpy(p + 8, &hi, 4);
  } else {
    static_assert(B == 2, "vstore_codes4 packs 1, 2, 3, 4 or 8 bits");
    const __m256i w = _mm256_maddubs_epi16(b, _mm256_set1_epi16(4 << 8 | 1));  // c0 + 4 c1
    const __m256i d = _mm256_madd_epi16(w, _mm256_set1_epi32(16 << 16 | 1));  // + 16 (c2 + 4 c3)
    const __m256i x = _mm256_packus_epi16(_mm256_packus_epi32(d, d), _mm256_setzero_si256());
    const __m128i lo = _mm256_castsi256_si128(x), hi = _mm256_extracti128_si256(x, 1);
    const std::uint64_t v = static_cast<std::uint32_t>(_mm_cvtsi128_si32(lo)) |
                            static_cast<std::uint64_t>(static_cast<std::uint32_t>(_mm_cvtsi128_si32(hi))) << 32;
    __builtin_memcpy(p, &v, 8);
  }
}

// nearbyint(y) as int32, unclamped (ties to even; NaN and |y| >= 2^31 give INT_MIN).
inline VI vround_i(VF y) noexcept { return _mm256_cvtps_epi32(y); }
// f16 bits of v stored at p (8 of them), and the f32 value of those bits.
inline VF vstore_h_round(std::uint16_t* p, VF v) noexcept {
  const __m128i h = f16_bits(v);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
  return _mm256_cvtph_ps(h);
}
inline VF vstore_h_round_n(std::uint16_t* p, VF v, int n) noexcept {
  const __m128i h = f16_bits(v);
  store_u16_n(p, h, n);
  return _mm256_cvtph_ps(h);
}
// Bit i set where lane i is +0 or -0.
inline unsigned vzero_lanes(VF v) noexcept {
  return static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_EQ_OQ)));
}
constexpr int kKB = 4;  // channel vectors per block in the key min/max pass (8 accumulators)

// --- NUQ level lookup: a table of up to 16 levels in registers (kernel_table.h, NUQ) ---
// vlookup<B> reads only the low B bits of each lane's code: VPERMPS picks lane codes[i] & 7
// of an 8-float table (3 bits); 16 levels take one permute per half and a blend on code bit 3
// (shifted into the sign bit, which is all BLENDVPS reads); up to 4 levels use the in-lane
// VPERMILPS (codes[i] & 3) on the table copied into both 128-bit halves (2 levels: twice).
struct VLevels {
  __m256 lo, hi, dup;
};
inline VLevels vlevels(const float* levels, int n) noexcept {
  VLevels t;
  t.lo = n >= 8 ? _mm256_loadu_ps(levels) : vload_n(levels, n);
  t.hi = n == 16 ? _mm256_loadu_ps(levels + 8) : _mm256_setzero_ps();
  const __m128 q = n >= 4 ? _mm_loadu_ps(levels) : _mm_setr_ps(levels[0], levels[1], levels[0], levels[1]);
  t.dup = _mm256_insertf128_ps(_mm256_castps128_ps256(q), q, 1);
  return t;
}
template <int B>
inline VF vlookup(VI codes, const VLevels& t) noexcept {
  if constexpr (B <= 2) return _mm256_permutevar_ps(t.dup, codes);
  const VF lo = _mm256_permutevar8x32_ps(t.lo, codes);
  if constexpr (B < 4) {
    return lo;
  } else {
    const VF hi = _mm256_permutevar8x32_ps(t.hi, codes);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(codes, 28)));
  }
}
// Code indices of 8 full channels (p = row + c*B/8) for vlookup: lane i holds code_i in its
// low B bits, with other bits above them (vlookup ignores those). For 1, 2 and 4 bits each
// lane takes the byte holding its code into its byte 1 (VPSHUFB of the broadcast row word),
// and an unsigned 16-bit high multiply by 2^(8 - shift) moves the code down to bit 0: a
// per-lane shift without VPSRLVD (about 2 cycles per vector on Zen 2, see vcodes2s).
template <int B>
inline VI vcode_idx(const std::uint8_t* p) noexcept {
  if constexpr (B == 1 || B == 2 || B == 4) {
    std::uint32_t w = 0;
    __builtin_memcpy(&w, p, B);
    const __m256i b = _mm256_set1_epi32(static_cast<int>(w));
    // Lane i: byte (i*B)/8 into byte 1, zeros elsewhere (selector bytes 0x80).
    constexpr auto sel = [](int i) { return static_cast<int>(0x80800080u | static_cast<unsigned>((i * B) / 8) << 8); };
    constexpr auto mul = [](int i) { return 1 << (8 - (i * B) % 8); };
    const __m256i s = _mm256_setr_epi32(sel(0), sel(1), sel(2), sel(3), sel(4), sel(5), sel(6), sel(7));
    const __m256i m = _mm256_setr_epi32(mul(0), mul(1), mul(2), mul(3), mul(4), mul(5), mul(6), mul(7));
    return _mm256_mulhi_epu16(_mm256_shuffle_epi8(b, s), m);
  } else {
    return vcodes_i<B, true>(p, kL);
  }
}
