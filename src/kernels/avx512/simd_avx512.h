// AVX-512 vector helpers for the generic kernel bodies (kernels-inl.h): 16 float lanes.
// Requires AVX-512 F/BW/DQ/VL, FMA and F16C. Included only by kernels_avx512.cpp, inside
// namespace kvslim::kernels::avx512::{anonymous}, after <immintrin.h>, <cstddef>, <cstdint>.
// Tails use masked loads/stores, so nothing is read or written past the buffers' ends.

constexpr int kL = 16;   // float lanes
constexpr int kCB = 4;   // vectors per column block in accumulation loops (4 x 4 accumulators)
using VF = __m512;
using VI = __m512i;

inline __mmask16 lanes(int n) noexcept { return static_cast<__mmask16>((1u << n) - 1u); }

// Lane i = p[i / ng] for ng dividing 16; reads only the 16 / ng floats it uses.
inline __m512 vexpand(const float* p, int ng) noexcept {
  switch (ng) {
    case 1: return _mm512_loadu_ps(p);
    case 2:
      return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7),
                                   _mm512_castps256_ps512(_mm256_loadu_ps(p)));
    case 4:
      return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
                                   _mm512_castps128_ps512(_mm_loadu_ps(p)));
    case 8:
      return _mm512_permutexvar_ps(
          _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
          _mm512_castps128_ps512(_mm_castsi128_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))));
    default: return _mm512_set1_ps(*p);
  }
}
inline VF vzero() noexcept { return _mm512_setzero_ps(); }
inline VF vset1(float x) noexcept { return _mm512_set1_ps(x); }
inline VF vload(const float* p) noexcept { return _mm512_loadu_ps(p); }
inline VF vload_n(const float* p, int n) noexcept { return _mm512_maskz_loadu_ps(lanes(n), p); }
inline VF vload_n_fill(const float* p, int n, float fill) noexcept {
  return _mm512_mask_loadu_ps(_mm512_set1_ps(fill), lanes(n), p);
}
inline void vstore(float* p, VF v) noexcept { _mm512_storeu_ps(p, v); }
inline void vstore_n(float* p, VF v, int n) noexcept { _mm512_mask_storeu_ps(p, lanes(n), v); }
inline VF vkeep_n(VF v, int n) noexcept { return _mm512_maskz_mov_ps(lanes(n), v); }

inline VF vadd(VF a, VF b) noexcept { return _mm512_add_ps(a, b); }
inline VF vsub(VF a, VF b) noexcept { return _mm512_sub_ps(a, b); }
inline VF vmul(VF a, VF b) noexcept { return _mm512_mul_ps(a, b); }
inline VF vdiv(VF a, VF b) noexcept { return _mm512_div_ps(a, b); }
inline VF vfma(VF a, VF b, VF c) noexcept { return _mm512_fmadd_ps(a, b, c); }
// (a < b) ? a : b and (a > b) ? a : b, exactly as the scalar code's comparisons.
inline VF vmin(VF a, VF b) noexcept { return _mm512_min_ps(a, b); }
inline VF vmax(VF a, VF b) noexcept { return _mm512_max_ps(a, b); }

inline float vreduce_add(VF v) noexcept {
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}
inline float vreduce_max(VF v) noexcept {
  const __m256 h = _mm256_max_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  x = _mm_max_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}
inline float vreduce_min(VF v) noexcept {
  const __m256 h = _mm256_min_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  __m128 x = _mm_min_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  x = _mm_min_ps(x, _mm_movehl_ps(x, x));
  x = _mm_min_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

// Transposed reductions: lane i of the result is the sum (min, max) of all lanes of a[i].
// Four levels of "combine the two halves of each block of 2w lanes of x into the low half
// and those of y into the high half" (w = 1, 2, 4, 8): 15 blend + permute + op steps.
struct OpAdd {
  static VF apply(VF a, VF b) noexcept { return _mm512_add_ps(a, b); }
};
struct OpMin {
  static VF apply(VF a, VF b) noexcept { return _mm512_min_ps(a, b); }
};
struct OpMax {
  static VF apply(VF a, VF b) noexcept { return _mm512_max_ps(a, b); }
};
template <class Op>
inline VF vcombine(VF x, VF y, __mmask16 hi, __m512i idx) noexcept {
  // lower half of each 2w block: op(x_lo, x_hi); upper half: op(y_hi, y_lo).
  return Op::apply(_mm512_mask_blend_ps(hi, x, y), _mm512_permutex2var_ps(x, idx, y));
}
template <class Op>
inline VF vhreduce(const VF* a) noexcept {
  const __m512i i1 = _mm512_setr_epi32(1, 16, 3, 18, 5, 20, 7, 22, 9, 24, 11, 26, 13, 28, 15, 30);
  const __m512i i2 = _mm512_setr_epi32(2, 3, 16, 17, 6, 7, 20, 21, 10, 11, 24, 25, 14, 15, 28, 29);
  const __m512i i4 = _mm512_setr_epi32(4, 5, 6, 7, 16, 17, 18, 19, 12, 13, 14, 15, 24, 25, 26, 27);
  const __m512i i8 = _mm512_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23);
  VF b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i) b[i] = vcombine<Op>(a[2 * i], a[2 * i + 1], 0xAAAA, i1);
  for (int i = 0; i < 4; ++i) c[i] = vcombine<Op>(b[2 * i], b[2 * i + 1], 0xCCCC, i2);
  for (int i = 0; i < 2; ++i) d[i] = vcombine<Op>(c[2 * i], c[2 * i + 1], 0xF0F0, i4);
  return vcombine<Op>(d[0], d[1], 0xFF00, i8);
}
inline VF vhsum(const VF* a) noexcept { return vhreduce<OpAdd>(a); }
// Stores a full vhsum block (4 rows x 4 tokens, lane r*4 + t) to s[r*stride + t].
inline void vstore_block(float* s, std::ptrdiff_t stride, VF res) noexcept {
  _mm_storeu_ps(s, _mm512_castps512_ps128(res));
  _mm_storeu_ps(s + stride, _mm512_extractf32x4_ps(res, 1));
  _mm_storeu_ps(s + 2 * stride, _mm512_extractf32x4_ps(res, 2));
  _mm_storeu_ps(s + 3 * stride, _mm512_extractf32x4_ps(res, 3));
}
// Lane i of v in every lane.
// The Walsh-Hadamard stages h = 1, 2, 4, 8 inside one vector (kernel_table.h, hadamard_rows):
// lane i gets x_i + x_(i^h) where i & h == 0, else x_(i^h) - x_i: the scalar a + b, a - b.
inline VF vhadamard_lanes(VF v) noexcept {
  VF w = _mm512_permute_ps(v, 0xB1);
  v = _mm512_mask_blend_ps(0xAAAA, _mm512_add_ps(v, w), _mm512_sub_ps(w, v));
  w = _mm512_permute_ps(v, 0x4E);
  v = _mm512_mask_blend_ps(0xCCCC, _mm512_add_ps(v, w), _mm512_sub_ps(w, v));
  w = _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(2, 3, 0, 1));  // 128-bit lanes 1 0 3 2
  v = _mm512_mask_blend_ps(0xF0F0, _mm512_add_ps(v, w), _mm512_sub_ps(w, v));
  w = _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(1, 0, 3, 2));  // 2 3 0 1
  return _mm512_mask_blend_ps(0xFF00, _mm512_add_ps(v, w), _mm512_sub_ps(w, v));
}
inline VF vlane(VF v, int i) noexcept { return _mm512_permutexvar_ps(_mm512_set1_epi32(i), v); }

// f16 / bf16 loads and stores (raw uint16 bit patterns).
inline VF vload_h(const std::uint16_t* p) noexcept {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline VF vload_h_n(const std::uint16_t* p, int n) noexcept {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes(n), p));
}
inline VF bf16_widen(__m256i h) noexcept {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline VF vload_b(const std::uint16_t* p) noexcept {
  return bf16_widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline VF vload_b_n(const std::uint16_t* p, int n) noexcept {
  return bf16_widen(_mm256_maskz_loadu_epi16(lanes(n), p));
}
inline __m256i f16_bits(VF v) noexcept { return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// Round to nearest even on the integer bits (as kvslim::f32_to_bf16); NaN -> quiet NaN.
// (VCVTNEPS2BF16 would flush subnormals, so it is not used.)
inline __m256i bf16_bits(VF v) noexcept {
  const __m512i x = _mm512_castps_si512(v);
  const __m512i hi = _mm512_srli_epi32(x, 16);
  const __m512i lsb = _mm512_and_si512(hi, _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(x, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan =
      _mm512_cmpgt_epu32_mask(_mm512_and_si512(x, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
  return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, r, _mm512_or_si512(hi, _mm512_set1_epi32(0x40))));
}
inline void vstore_h(std::uint16_t* p, VF v) noexcept {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), f16_bits(v));
}
inline void vstore_h_n(std::uint16_t* p, VF v, int n) noexcept { _mm256_mask_storeu_epi16(p, lanes(n), f16_bits(v)); }
inline void vstore_b(std::uint16_t* p, VF v) noexcept {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bf16_bits(v));
}
inline void vstore_b_n(std::uint16_t* p, VF v, int n) noexcept { _mm256_mask_storeu_epi16(p, lanes(n), bf16_bits(v)); }
// Exact f16 -> f32 bits, including signaling NaNs (which the hardware would quiet).
inline VF h_exact(__m256i h) noexcept {
  const VF f = _mm512_cvtph_ps(h);
  const __m512i w = _mm512_cvtepu16_epi32(h);
  const __mmask16 snan =
      _mm512_cmpeq_epi32_mask(_mm512_and_si512(w, _mm512_set1_epi32(0x7e00)), _mm512_set1_epi32(0x7c00)) &
      _mm512_test_epi32_mask(w, _mm512_set1_epi32(0x01ff));
  return _mm512_castsi512_ps(
      _mm512_mask_andnot_epi32(_mm512_castps_si512(f), snan, _mm512_set1_epi32(0x00400000), _mm512_castps_si512(f)));
}
inline VF vload_h_exact(const std::uint16_t* p) noexcept {
  return h_exact(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline VF vload_h_exact_n(const std::uint16_t* p, int n) noexcept { return h_exact(_mm256_maskz_loadu_epi16(lanes(n), p)); }

// exp(x) for the softmax arguments x <= 0. Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2,
// then the Cephes expf polynomial (degree 7 in r, max relative error about 2 ulp on this
// range) and 2^n by VSCALEFPS. x < -87.3 (where expf is denormal or 0), -inf and NaN give
// exactly 0, so masked tokens get probability 0.
inline VF vexp(VF x) noexcept {
  const VF n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  VF r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  VF p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const VF y = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __mmask16 ok = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_GE_OQ);
  return _mm512_maskz_scalef_ps(ok, y, n);
}

// clamp(nearbyint(y), 0, qmax) as integers. Clamping first to the integer bounds and then
// rounding (ties to even, the default MXCSR mode that nearbyint also uses) gives the same
// result; a NaN gives 0.
inline VI vquant(VF y, VF qmax) noexcept {
  return _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(y, _mm512_setzero_ps()), qmax));
}
// 1/s where s > 0, else 0 (IEEE division, as the scalar code).
inline VF vinv_pos(VF s) noexcept {
  return _mm512_maskz_div_ps(_mm512_cmp_ps_mask(s, _mm512_setzero_ps(), _CMP_GT_OQ), _mm512_set1_ps(1.0f), s);
}

// --- packed code rows (LSB-first bit stream, see kernel_table.h) ---
// Codes of channels [c, c+n) as floats; p = row + c*B/8 with c a multiple of 16 (byte
// aligned). Reads exactly ceil(n*B/8) bytes.
template <int B, bool kFull>
inline VI vcodes_i(const std::uint8_t* p, int n) noexcept {
  const int nbytes = kFull ? 2 * B : (n * B + 7) / 8;
  const __m128i x = kFull && B == 8 ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p))
                                    : _mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << nbytes) - 1u), p);
  if constexpr (B == 8) {
    return _mm512_cvtepu8_epi32(x);
  } else if constexpr (B == 1) {
    // 16 codes are one 16-bit word: bit l is lane l's code, so the word is a lane mask.
    return _mm512_maskz_set1_epi32(static_cast<__mmask16>(_mm_cvtsi128_si32(x)), 1);
  } else if constexpr (B == 2) {
    // 16 codes are one 32-bit word: lane l takes bits [2l, 2l+2).
    const __m512i sh = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    return _mm512_and_si512(_mm512_srlv_epi32(_mm512_broadcastd_epi32(x), sh), _mm512_set1_epi32(3));
  } else if constexpr (B == 4) {
    // 64 bits: lanes 0-7 from the low word, 8-15 from the high word.
    const __m512i idx = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    const __m512i sh = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
    return _mm512_and_si512(_mm512_srlv_epi32(_mm512_permutexvar_epi32(idx, _mm512_castsi128_si512(x)), sh),
                            _mm512_set1_epi32(15));
  } else {
    // 48 bits: lanes 0-7 from bits [0, 24), lanes 8-15 from bits [24, 48).
    static_assert(B == 3, "bits must be 1, 2, 3, 4 or 8");
    const __m128i x24 = _mm_unpacklo_epi32(x, _mm_srli_epi64(x, 24));  // words: bits 0.., bits 24..
    const __m512i idx = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    const __m512i sh = _mm512_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21, 0, 3, 6, 9, 12, 15, 18, 21);
    return _mm512_and_si512(_mm512_srlv_epi32(_mm512_permutexvar_epi32(idx, _mm512_castsi128_si512(x24)), sh),
                            _mm512_set1_epi32(7));
  }
}
template <int B, bool kFull>
inline VF vcodes(const std::uint8_t* p, int n) noexcept {
  return _mm512_cvtepi32_ps(vcodes_i<B, kFull>(p, n));
}
// Two full vectors of codes (channels [c, c + 32), p = row + c*B/8): for B = 2 one 32-bit
// broadcast load per vector instead of a masked load and a register broadcast.
template <int B>
inline void vcodes2(const std::uint8_t* p, VF* x) noexcept {
  if constexpr (B == 2) {
    const __m512i sh = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    for (int i = 0; i < 2; ++i) {
      std::uint32_t w;
      __builtin_memcpy(&w, p + 4 * i, 4);
      x[i] = _mm512_cvtepi32_ps(
          _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(w)), sh), _mm512_set1_epi32(3)));
    }
  } else {
    x[0] = vcodes<B, true>(p, kL);
    x[1] = vcodes<B, true>(p + 2 * B, kL);
  }
}
// The AVX-512 kernels keep plain codes (the lane-scaled unpack of simd_avx2.h answers a Zen 2
// cost); these let the shared kernels use one spelling.
template <int B>
inline constexpr bool kScaledCodes = false;
template <int B>
inline VF vcode_scale() noexcept { return _mm512_set1_ps(1.0f); }
template <int B>
inline VF vcode_unscale() noexcept { return _mm512_set1_ps(1.0f); }
template <int B>
inline void vcodes2s(const std::uint8_t* p, VF* x) noexcept { vcodes2<B>(p, x); }

// Bytes of the 16 codes (each < 256) in lane order.
inline __m128i vcode_bytes(VI codes) noexcept { return _mm512_cvtepi32_epi8(codes); }

// Packs the 64 codes of c[0..3] (channels in order) into 8*B bytes at p, LSB-first.
// The lanes may hold any int32: they are saturated to [0, 2^B - 1] (signed packs to 16
// bits, unsigned packs to bytes, then an unsigned byte minimum), so raw VCVTPS2DQ results
// of the quantization rule can be passed in (a NaN converts to INT_MIN and gives 0, as
// the clamp-then-round of vquant). The byte packs are lane-interleaved, fixed by one
// dword permutation; multiply-adds then merge neighbouring codes.
template <int B>
inline void vstore_codes4(std::uint8_t* p, const VI* c) noexcept {
  __m512i b = _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15),
                                       _mm512_packus_epi16(_mm512_packs_epi32(c[0], c[1]),
                                                           _mm512_packs_epi32(c[2], c[3])));
  if constexpr (B != 8) b = _mm512_min_epu8(b, _mm512_set1_epi8(static_cast<char>((1 << B) - 1)));
  if constexpr (B == 8) {
    _mm512_storeu_si512(p, b);
  } else if constexpr (B == 1) {
    // Bytes are 0 or 1: VPTESTMB gives bit i = code i, the 64 codes LSB-first.
    const std::uint64_t m = _mm512_test_epi8_mask(b, b);
    __builtin_memcpy(p, &m, 8);
  } else if constexpr (B == 4) {
    const __m512i w = _mm512_maddubs_epi16(b, _mm512_set1_epi16(16 << 8 | 1));  // c0 + 16 c1
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi16_epi8(w));
  } else if constexpr (B == 3) {
    // 8 codes make 24 bits: words c0 + 8 c1, dwords of 4 codes (12 bits), then each qword's
    // high dword is shifted down next to its low one; the qwords are narrowed to dwords and
    // bytes 0-2 of every dword gathered (12 per 128-bit lane, then one dword permutation).
    const __m512i w = _mm512_maddubs_epi16(b, _mm512_set1_epi16(8 << 8 | 1));
    const __m512i d = _mm512_madd_epi16(w, _mm512_set1_epi32(64 << 16 | 1));
    const __m256i q = _mm512_cvtepi64_epi32(_mm512_or_si512(d, _mm512_srli_epi64(d, 20)));
    const __m256i g = _mm256_shuffle_epi8(q, _mm256_setr_epi8(0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1,
                                                               0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1));
    _mm256_mask_storeu_epi8(p, 0x00FFFFFFu,
                            _mm256_permutevar8x32_epi32(g, _mm256_setr_epi32(0, 1, 2, 4, 5, 6, 7, 7)));
  } else {
    static_assert(B == 2, "vstore_codes4 packs 1, 2, 3, 4 or 8 bits");
    const __m512i w = _mm512_maddubs_epi16(b, _mm512_set1_epi16(4 << 8 | 1));     // c0 + 4 c1
    const __m512i d = _mm512_madd_epi16(w, _mm512_set1_epi32(16 << 16 | 1));     // + 16 (c2 + 4 c3)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtepi32_epi8(d));
  }
}

// nearbyint(y) as int32, unclamped (ties to even; NaN and |y| >= 2^31 give INT_MIN).
inline VI vround_i(VF y) noexcept { return _mm512_cvtps_epi32(y); }
// f16 bits of v stored at p (16 of them), and the f32 value of those bits.
inline VF vstore_h_round(std::uint16_t* p, VF v) noexcept {
  const __m256i h = f16_bits(v);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
  return _mm512_cvtph_ps(h);
}
inline VF vstore_h_round_n(std::uint16_t* p, VF v, int n) noexcept {
  const __m256i h = f16_bits(v);
  _mm256_mask_storeu_epi16(p, lanes(n), h);
  return _mm512_cvtph_ps(h);
}
// Bit i set where lane i is +0 or -0.
inline unsigned vzero_lanes(VF v) noexcept {
  return static_cast<unsigned>(_mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_EQ_OQ));
}
constexpr int kKB = 8;  // channel vectors per block in the key min/max pass (16 accumulators)

// --- NUQ level lookup: a table of up to 16 levels in one register (kernel_table.h, NUQ) ---
// VPERMPS zmm picks lane codes[i] & 15: any table of up to 16 levels is one permute.
struct VLevels {
  __m512 t;
};
inline VLevels vlevels(const float* levels, int n) noexcept { return {_mm512_maskz_loadu_ps(lanes(n), levels)}; }
template <int B>
inline VF vlookup(VI codes, const VLevels& t) noexcept {
  return _mm512_permutexvar_ps(codes, t.t);
}
// Code indices of 16 full channels (p = row + c*B/8) for vlookup: exact codes (VPERMPS zmm
// reads 4 bits of each lane).
template <int B>
inline VI vcode_idx(const std::uint8_t* p) noexcept {
  return vcodes_i<B, true>(p, kL);
}
