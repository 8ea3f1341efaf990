// AVX-512 kernel table. Requires AVX-512 F/BW/DQ/VL, FMA and F16C (this file alone is
// compiled with AVX-512 flags; dispatch only hands it out when cpuid + xgetbv say they run).
// Everything but kTable has internal linkage, so no AVX-512 copy of an inline function can
// leak into the rest of the library (see STYLE.md, "Dispatch").
//
// GCC 12 reports its own _mm512_undefined_*() self-initialisation inside AVX-512 intrinsics
// as -W(maybe-)uninitialized (GCC bug 105593, fixed in GCC 13); silenced for this file only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <cpuid.h>
#include <immintrin.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "kvslim/kernels/kernel_table.h"

namespace kvslim::kernels::avx512 {
namespace {

#include "kernels/avx512/simd_avx512.h"
#include "kernels/kernels-inl.h"
#include "kernels/hadamard-inl.h"
// The AVX2 integer kernels of KIVI q8 attention (AVX2 intrinsics compile here too, with 32
// vector registers).
#include "kernels/avx2/kivi_q8-inl.h"

// ---------------------------------------------------------------------------------------
// VNNI fast paths for KIVI attention (AVX512_VNNI is checked at run time: the table itself
// only needs F/BW/DQ/VL, so these run only where VPDPBUSD/VPDPWSSD exist).

bool has_vnni() noexcept {
  static const bool v = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    return __get_cpuid_count(7, 0, &a, &b, &c, &d) && (c & (1u << 11)) != 0;
  }();
  return v;
}

// One 32-bit load broadcast to 16 lanes (VPBROADCASTD m32: a load-port uop only).
inline __m512i bcast32(const std::uint8_t* p) noexcept { return _mm512_broadcastd_epi32(_mm_loadu_si32(p)); }

// acc += dot products with the 32-bit word at w broadcast to all lanes ({1to16} operand).
// Inline asm ties acc to its register: with the intrinsics GCC 12 copies every
// loop-carried accumulator to a scratch register and back around each instruction.
inline void dpwssd_b(__m512i& acc, __m512i x, const std::uint8_t* w) noexcept {
  __asm__("vpdpwssd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(x), "m"(*reinterpret_cast<const int*>(w)));
}

// 16x16 transpose of 32-bit words: r[t] is token t's 16 dwords; afterwards r[m] holds dword m
// of tokens 0..15 (lane t = token t). 64 shuffles.
inline void transpose16(__m512i* r) noexcept {
  __m512i u[16];
  for (int g = 0; g < 4; ++g) {
    const __m512i t0 = _mm512_unpacklo_epi32(r[4 * g], r[4 * g + 1]);
    const __m512i t1 = _mm512_unpackhi_epi32(r[4 * g], r[4 * g + 1]);
    const __m512i t2 = _mm512_unpacklo_epi32(r[4 * g + 2], r[4 * g + 3]);
    const __m512i t3 = _mm512_unpackhi_epi32(r[4 * g + 2], r[4 * g + 3]);
    u[4 * g + 0] = _mm512_unpacklo_epi64(t0, t2);  // lane L: rows 4g..4g+3, dword 4L
    u[4 * g + 1] = _mm512_unpackhi_epi64(t0, t2);  // dword 4L+1
    u[4 * g + 2] = _mm512_unpacklo_epi64(t1, t3);
    u[4 * g + 3] = _mm512_unpackhi_epi64(t1, t3);
  }
  for (int j = 0; j < 4; ++j) {
    const __m512i a = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x88);
    const __m512i b = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xDD);
    const __m512i c = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x88);
    const __m512i d = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xDD);
    r[j] = _mm512_shuffle_i32x4(a, c, 0x88);
    r[8 + j] = _mm512_shuffle_i32x4(a, c, 0xDD);
    r[4 + j] = _mm512_shuffle_i32x4(b, d, 0x88);
    r[12 + j] = _mm512_shuffle_i32x4(b, d, 0xDD);
  }
}

// 16 rows of 8 dwords, loaded as z[i] = [row a_i | row b_i] with (a, b) = (i, i+4) for
// i < 4 and (i+4, i+8) after; afterwards z[m] holds dword m of tokens 0..15. 32 shuffles.
inline void transpose16x8(__m512i* z) noexcept {
  __m512i u[8];
  for (int g = 0; g < 2; ++g) {
    const __m512i t0 = _mm512_unpacklo_epi32(z[4 * g], z[4 * g + 1]);
    const __m512i t1 = _mm512_unpackhi_epi32(z[4 * g], z[4 * g + 1]);
    const __m512i t2 = _mm512_unpacklo_epi32(z[4 * g + 2], z[4 * g + 3]);
    const __m512i t3 = _mm512_unpackhi_epi32(z[4 * g + 2], z[4 * g + 3]);
    u[4 * g + 0] = _mm512_unpacklo_epi64(t0, t2);
    u[4 * g + 1] = _mm512_unpackhi_epi64(t0, t2);
    u[4 * g + 2] = _mm512_unpacklo_epi64(t1, t3);
    u[4 * g + 3] = _mm512_unpackhi_epi64(t1, t3);
  }
  for (int j = 0; j < 4; ++j) {
    z[j] = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x88);
    z[4 + j] = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xDD);
  }
}

// Query preparation for the integer key scores. q_c s_c (key scale folded in) is rounded
// to q16 = nearbyint(q_c s_c / S), S = max|q_c s_c| / 32512, and split into two signed
// bytes q16 = 256 hi + lo (hi in [-127, 127], lo in [-128, 127]) so that VPDPBUSD
// (unsigned codes x signed bytes) computes the dot product exactly in two passes.
// Byte layout: code dword m of a row holds, for plane k (bits [B*k, B*k+B) of each byte),
// channels 4P*m + P*i + k (i = byte 0..3, P = 8/B). Combination n = m*P + k owns the hi
// dword at 16*(n/2) + 4*(n%2) and the lo dword 8 bytes further.
template <int P>
struct WeightShuffle {
  alignas(64) short idx[32];
  constexpr WeightShuffle() : idx() {
    for (int w = 0; w < 32; ++w) {
      const int n = 2 * (w / 8) + (w % 8) / 4, i = w % 4;
      const int ch = 4 * P * (n / P) + P * i + n % P;
      // word position of channel ch after _mm512_packs_epi32(a = ch 0..15, b = ch 16..31)
      idx[w] = static_cast<short>(ch < 16 ? 8 * (ch / 4) + ch % 4 : 8 * ((ch - 16) / 4) + 4 + (ch - 16) % 4);
    }
  }
};
template <int P>
constexpr WeightShuffle<P> kWeightShuffle{};

// A maximum |q| or weight at or below this gets an inverse step of 0 (as kQ8Tiny in the
// scalar table and kTiny in the AVX2 q8 kernels): 32767 / x overflows below about 1e-34.
constexpr float kTinyMax = 0x1p-100f;

struct RowWeights {
  float S, bias;
  bool ok;
};
template <int B, int D>
inline RowWeights prepare_query_row(const float* q, const float* sf, const float* zf, std::uint8_t* w) noexcept {
  constexpr int P = 8 / B;
  alignas(64) float qs[D];
  __m512 amax = _mm512_setzero_ps(), b = _mm512_setzero_ps();
  __mmask16 nan = 0;
#pragma GCC unroll 16
  for (int c = 0; c < D; c += 16) {
    const __m512 qv = _mm512_loadu_ps(q + c);
    const __m512 x = _mm512_mul_ps(qv, _mm512_load_ps(sf + c));
    _mm512_store_ps(qs + c, x);
    nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    amax = _mm512_range_ps(amax, x, 0x0B);  // max(|amax|, |x|)
    b = _mm512_fmadd_ps(qv, _mm512_load_ps(zf + c), b);
  }
  const float am = _mm512_reduce_max_ps(amax);
  RowWeights rw{am / 32512.0f, _mm512_reduce_add_ps(b), nan == 0 && am < __builtin_inff()};
  if (!rw.ok) return rw;  // non-finite query or scale: caller takes the float path
  // Below kTinyMax the inverse step would overflow to inf (and 0 * inf = NaN): such a row
  // contributes less than f32 rounding of any logit, and its int16 codes are all 0.
  const __m512 inv = _mm512_set1_ps(am > kTinyMax ? 32512.0f / am : 0.0f);
  const __m512i perm = _mm512_load_si512(kWeightShuffle<P>.idx);
  const __m512i sel = _mm512_broadcast_i32x4(_mm_setr_epi8(1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6, 8, 10, 12, 14));
  const __m512i flip = _mm512_broadcast_i32x4(_mm_setr_epi32(0, 0, static_cast<int>(0x80808080u), static_cast<int>(0x80808080u)));
  // q16 + 128 = nearbyint(qs * inv) + 128 = nearbyint(qs * inv + 128) (exact: integers < 2^24).
  const __m512 bias = _mm512_set1_ps(128.0f);
#pragma GCC unroll 8
  for (int c = 0; c < D; c += 32) {
    // words q16 + 128: high byte = hi, low byte = lo + 128 (flipped to lo by the XOR).
    const __m512i a = _mm512_cvtps_epi32(_mm512_fmadd_ps(_mm512_load_ps(qs + c), inv, bias));
    const __m512i bb = _mm512_cvtps_epi32(_mm512_fmadd_ps(_mm512_load_ps(qs + c + 16), inv, bias));
    const __m512i words = _mm512_permutexvar_epi16(perm, _mm512_packs_epi32(a, bb));
    _mm512_store_si512(w + 2 * c, _mm512_xor_si512(_mm512_shuffle_epi8(words, sel), flip));
  }
  return rw;
}

// s[r][j] = q[r] . dequant(k[j]) for rows r0..r0+3 over tokens in batches of 16: codes are
// transposed so that lane t is token t, each code plane is multiplied by the broadcast
// weights of 4 channels (VPDPBUSD), hi and lo accumulated apart and combined at the end:
// s = S * (256 acc_hi + acc_lo) + bias. |256 acc_hi + acc_lo| <= 32512 * 255 * 256 < 2^31.
// The only VNNI intrinsic in the table: this function alone is compiled for AVX512-VNNI
// (the file's flags are plain AVX-512 F/BW/DQ/VL), and it only runs after has_vnni().
template <int B, int D>
__attribute__((target("avx512vnni"))) bool kivi_scores_vnni(const float* q, int nq, const std::uint16_t* scale, const std::uint16_t* zero,
                      const std::uint8_t* codes, int ntok, float* s) noexcept {
  constexpr int P = 8 / B, R = D * B / 8, NM = R / 4;
  static_assert(R == 32 || R % 64 == 0, "row bytes must be 32 or a multiple of 64");
  alignas(64) std::uint8_t w[4][2 * D];
  alignas(64) float sf[D], zf[D];
  for (int c = 0; c < D; c += 16) {
    _mm512_store_ps(sf + c, vload_h(scale + c));
    _mm512_store_ps(zf + c, vload_h(zero + c));
  }
  const __m512i low = _mm512_set1_epi8(static_cast<char>((1 << B) - 1));
  for (int r0 = 0; r0 < nq; r0 += 4) {
    const int nr = imin(4, nq - r0);
    RowWeights rw[4];
    for (int r = 0; r < 4; ++r) {
      rw[r] = prepare_query_row<B, D>(q + off(r0 + imin(r, nr - 1), D), sf, zf, w[r]);
      if (!rw[r].ok) return false;
    }
    for (int j0 = 0; j0 < ntok; j0 += 16) {
      const int nt = imin(16, ntok - j0);
      // Opaque to the optimizer: keeps each weight a one-load broadcast operand instead of
      // 2 * P * NM vectors hoisted out of this loop and spilled.
      const std::uint8_t* wp = &w[0][0];
      __asm__("" : "+r"(wp));
      __m512i hi[4], lo[4];
      for (int r = 0; r < 4; ++r) hi[r] = lo[r] = _mm512_setzero_si512();
      for (int chunk = 0; chunk < (R + 63) / 64; ++chunk) {
        __m512i y[16];
        if constexpr (R == 32) {
          for (int i = 0; i < 8; ++i) {
            const int a = i < 4 ? i : i + 4, b = a + 4;
            const std::uint8_t* pa = codes + off(j0 + imin(a, nt - 1), R);
            const std::uint8_t* pb = codes + off(j0 + imin(b, nt - 1), R);
            y[i] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(pa))),
                                      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pb)), 1);
          }
          transpose16x8(y);
        } else {
          for (int t = 0; t < 16; ++t) y[t] = _mm512_loadu_si512(codes + off(j0 + imin(t, nt - 1), R) + 64 * chunk);
          transpose16(y);
        }
        // Combination n = m*P + k: for P >= 2 its weights sit at 8*P*m + 16*(k/2) + 4*(k%2);
        // for P = 1 two dwords m share one 16-byte unit, so step m by 2.
        constexpr int nm = NM < 16 ? NM : 16, step = P == 1 ? 2 : 1;
        for (int m = 0; m < nm; m += step) {
          const std::uint8_t* wm = wp + 8 * P * (chunk * 16 + m);
#pragma GCC unroll 4
          for (int u = 0; u < step * P; ++u) {
            const int mm = m + u / P, k = u % P, o = 16 * (u / 2) + 4 * (u % 2);
            const __m512i plane =
                _mm512_and_si512(k == 0 ? y[mm] : _mm512_srli_epi16(y[mm], static_cast<unsigned>(B * k)), low);
#pragma GCC unroll 4
            for (int r = 0; r < 4; ++r) {
              hi[r] = _mm512_dpbusd_epi32(hi[r], plane, bcast32(wm + 2 * D * r + o));
              lo[r] = _mm512_dpbusd_epi32(lo[r], plane, bcast32(wm + 2 * D * r + o + 8));
            }
          }
        }
      }
      const __mmask16 mask = lanes(nt);
      for (int r = 0; r < nr; ++r) {
        const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(hi[r], 8), lo[r]));
        _mm512_mask_storeu_ps(s + off(r0 + r, ntok) + j0, mask,
                              _mm512_fmadd_ps(dot, _mm512_set1_ps(rw[r].S), _mm512_set1_ps(rw[r].bias)));
      }
    }
  }
  return true;
}

void kivi_scores_k(const float* q, int nq, const std::uint16_t* scale, const std::uint16_t* zero,
                   const std::uint8_t* codes, int ntok, int d, int bits, float* s) noexcept {
  if (has_vnni()) {
    bool done = false;
    switch (bits * 1000 + d) {
      case 2128: done = kivi_scores_vnni<2, 128>(q, nq, scale, zero, codes, ntok, s); break;
      case 2256: done = kivi_scores_vnni<2, 256>(q, nq, scale, zero, codes, ntok, s); break;
      case 4064: done = kivi_scores_vnni<4, 64>(q, nq, scale, zero, codes, ntok, s); break;
      case 4128: done = kivi_scores_vnni<4, 128>(q, nq, scale, zero, codes, ntok, s); break;
      case 4256: done = kivi_scores_vnni<4, 256>(q, nq, scale, zero, codes, ntok, s); break;
      case 8064: done = kivi_scores_vnni<8, 64>(q, nq, scale, zero, codes, ntok, s); break;
      case 8128: done = kivi_scores_vnni<8, 128>(q, nq, scale, zero, codes, ntok, s); break;
      case 8256: done = kivi_scores_vnni<8, 256>(q, nq, scale, zero, codes, ntok, s); break;
      default: break;
    }
    if (done) return;
  }
  kivi_scores_generic(q, nq, scale, zero, codes, ntok, d, bits, s);
}


// --- value accumulation on the codes, 16-bit weights ---
// o[r][c] += sum_j p[r][j] (s_jg code_jc + z_jg). Per chunk of 32 tokens and row, the
// weights p_j s_jg are rounded to int16 against W = max|p| max s (so |w16| <= 32767);
// tokens are taken in pairs (A, B) and every 16-channel block is formed as dwords
// codeA_c | codeB_c << 16 in channel order, so VPDPWSSD with the broadcast dword
// (w16_A,g | w16_B,g << 16) adds both tokens to each channel; a block lies in one value
// group because vgroup is a multiple of 16. The int32 sums (<= 32 * 255 * 32767 < 2^31)
// are scaled back to float once per chunk, together with sum_j p_j z_jg.
constexpr int kPairChunk = 32;  // tokens per chunk

// Word permutation turning the packed int16 weights of 32 flat entries f = j*ng + g
// (after _mm512_packs_epi32 of entries 0..15 and 16..31) into dwords (pair, g) holding
// (entry of token 2*pair, entry of token 2*pair+1).
struct PairShuffle {
  alignas(64) short idx[5][32];
  constexpr PairShuffle() : idx() {
    for (int lg = 0; lg < 5; ++lg) {
      const int ng = 1 << lg;
      for (int t = 0; t < 32; ++t) {
        const int pair = t / (2 * ng), g = (t % (2 * ng)) / 2, j = 2 * pair + t % 2, f = j * ng + g;
        idx[lg][t] = static_cast<short>(f < 16 ? 8 * (f / 4) + f % 4 : 8 * ((f - 16) / 4) + 4 + (f - 16) % 4);
      }
    }
  }
};
constexpr PairShuffle kPairShuffle{};

// Word sources and shifts that build block b (channels 16b..16b+15 of a pass of 4 blocks)
// as word pairs (codeA, codeB): out word 2l takes src word idx[b][2l] >> shift, out word
// 2l+1 src word idx[b][2l+1] >> shift (masked to B bits afterwards). src holds token A's
// bytes of the pass from word 0 and token B's from word 16.
template <int B>
struct PairBuild {
  alignas(64) short idx[4][32];
  alignas(64) short shift[32];
  constexpr PairBuild() : idx(), shift() {
    for (int b = 0; b < 4; ++b)
      for (int l = 0; l < 16; ++l) {
        if (B == 2) {  // a block is 2 words of each token
          idx[b][2 * l] = static_cast<short>(2 * b + l / 8);
          idx[b][2 * l + 1] = static_cast<short>(16 + 2 * b + l / 8);
        } else {  // B == 4: a block is 4 words
          idx[b][2 * l] = static_cast<short>(4 * b + l / 4);
          idx[b][2 * l + 1] = static_cast<short>(16 + 4 * b + l / 4);
        }
      }
    for (int l = 0; l < 16; ++l) shift[2 * l] = shift[2 * l + 1] = static_cast<short>(B == 2 ? 2 * (l % 8) : 4 * (l % 4));
  }
};
template <int B>
constexpr PairBuild<B> kPairBuild{};

// Sum of the lanes l = g (mod NG) of v into lane g (NG divides 16).
template <int NG>
inline __m512 group_sums(__m512 v) noexcept {
  if constexpr (NG <= 8) v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0x4E));  // +8 lanes
  if constexpr (NG <= 4) v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0xB1));  // +4
  if constexpr (NG <= 2) v = _mm512_add_ps(v, _mm512_permute_ps(v, 0x4E));         // +2
  if constexpr (NG <= 1) v = _mm512_add_ps(v, _mm512_permute_ps(v, 0xB1));         // +1
  return v;
}

// One pass over the chunk's token pairs for 4 blocks (channels 16*cb .. 16*cb + 63) and 4
// rows: acc[r][b] = sum over pairs of (codeA, codeB) . (w16_A, w16_B) of the block's group.
// Kept as straight-line code on named accumulators: GCC otherwise shuffles an accumulator
// array through spare registers.
template <int B, int R, int NF, int VG>
__attribute__((always_inline)) inline void pass_pairs(const std::uint8_t* codes, int tc, const std::uint8_t* wp,
                                                      int cb, __m512i (&acc)[4][4]) noexcept {
  __m512i a00 = _mm512_setzero_si512(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00,
          a13 = a00, a20 = a00, a21 = a00, a22 = a00, a23 = a00, a30 = a00, a31 = a00, a32 = a00, a33 = a00;
  const int g0 = 4 * ((cb + 0) * 16 / VG), g1 = 4 * ((cb + 1) * 16 / VG), g2 = 4 * ((cb + 2) * 16 / VG),
            g3 = 4 * ((cb + 3) * 16 / VG);
  const int np = (tc + 1) / 2;
  for (int pi = 0; pi < np; ++pi) {
    const std::uint8_t* ra = codes + off(2 * pi, R);
    const std::uint8_t* rb = 2 * pi + 1 < tc ? ra + R : ra;  // odd tail: B repeats A with weight 0
    const std::uint8_t* w0 = wp + 4 * pi * (NF / kPairChunk);
#define KVSLIM_DP4(pv, g, x0, x1, x2, x3) \
  dpwssd_b(x0, pv, w0 + g);                \
  dpwssd_b(x1, pv, w0 + 2 * NF + g);       \
  dpwssd_b(x2, pv, w0 + 4 * NF + g);       \
  dpwssd_b(x3, pv, w0 + 6 * NF + g);
    if constexpr (B == 8) {
      // 64 bytes of each token: interleave bytes, zero-extend to words.
      const __m512i a = _mm512_loadu_si512(ra), bb = _mm512_loadu_si512(rb);
      const __m512i lo = _mm512_unpacklo_epi8(a, bb), hi = _mm512_unpackhi_epi8(a, bb);
      const __m512i x01 = _mm512_permutex2var_epi64(lo, _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), hi);
      const __m512i x23 = _mm512_permutex2var_epi64(lo, _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15), hi);
      const __m512i p0 = _mm512_cvtepu8_epi16(_mm512_castsi512_si256(x01));
      KVSLIM_DP4(p0, g0, a00, a10, a20, a30)
      const __m512i p1 = _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(x01, 1));
      KVSLIM_DP4(p1, g1, a01, a11, a21, a31)
      const __m512i p2 = _mm512_cvtepu8_epi16(_mm512_castsi512_si256(x23));
      KVSLIM_DP4(p2, g2, a02, a12, a22, a32)
      const __m512i p3 = _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(x23, 1));
      KVSLIM_DP4(p3, g3, a03, a13, a23, a33)
    } else {
      // The pass's 4 blocks are 8*B bytes of each token: src = [A | B] (B from word 16).
      __m512i src;
      if constexpr (B == 2)
        src = _mm512_inserti32x4(_mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ra))),
                                 _mm_loadu_si128(reinterpret_cast<const __m128i*>(rb)), 2);
      else
        src = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ra))),
                                 _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rb)), 1);
      const __m512i sh = _mm512_load_si512(kPairBuild<B>.shift);
      const __m512i mask = _mm512_set1_epi16((1 << B) - 1);
#define KVSLIM_PV(b) \
  _mm512_and_si512(_mm512_srlv_epi16(_mm512_permutexvar_epi16(_mm512_load_si512(kPairBuild<B>.idx[b]), src), sh), mask)
      const __m512i p0 = KVSLIM_PV(0);
      KVSLIM_DP4(p0, g0, a00, a10, a20, a30)
      const __m512i p1 = KVSLIM_PV(1);
      KVSLIM_DP4(p1, g1, a01, a11, a21, a31)
      const __m512i p2 = KVSLIM_PV(2);
      KVSLIM_DP4(p2, g2, a02, a12, a22, a32)
      const __m512i p3 = KVSLIM_PV(3);
      KVSLIM_DP4(p3, g3, a03, a13, a23, a33)
#undef KVSLIM_PV
    }
#undef KVSLIM_DP4
  }
  acc[0][0] = a00; acc[0][1] = a01; acc[0][2] = a02; acc[0][3] = a03;
  acc[1][0] = a10; acc[1][1] = a11; acc[1][2] = a12; acc[1][3] = a13;
  acc[2][0] = a20; acc[2][1] = a21; acc[2][2] = a22; acc[2][3] = a23;
  acc[3][0] = a30; acc[3][1] = a31; acc[3][2] = a32; acc[3][3] = a33;
}

// One chunk of tc <= 32 tokens starting at j0 (kFull: tc == 32, no masks needed). p and the
// scales are finite (checked by the caller before anything is accumulated).
template <int B, int D, int NG, bool kFull>
void accum_chunk(const float* p, int nq, const std::uint16_t* scale, const std::uint16_t* zero,
                 const std::uint8_t* codes, int ntok, int j0, int tc, float* o) noexcept {
  constexpr int R = D * B / 8, NB = D / 16, VG = D / NG, LG = NG == 1 ? 0 : NG == 2 ? 1 : NG == 4 ? 2 : NG == 8 ? 3 : 4;
  constexpr int NF = kPairChunk * NG;  // flat weight entries (token, group) of a full chunk
  alignas(64) float sf[NF], zf[NF];
  alignas(64) std::uint16_t w[4][NF];
  const __m512i pair_perm = _mm512_load_si512(kPairShuffle.idx[LG]);
  {
    const int nflat = tc * NG;
    // Chunk scales and zeros as f32, flat [j][g] (entries past the chunk are 0).
    __m512 smax = _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int f = 0; f < NF; f += 16) {
      __m512 sv, zv;
      if (kFull) {
        sv = vload_h(scale + off(j0, NG) + f);
        zv = vload_h(zero + off(j0, NG) + f);
      } else {
        const int n = nflat - f < 0 ? 0 : imin(16, nflat - f);
        sv = vload_h_n(scale + off(j0, NG) + f, n);
        zv = vload_h_n(zero + off(j0, NG) + f, n);
      }
      _mm512_store_ps(sf + f, sv);
      _mm512_store_ps(zf + f, zv);
      smax = _mm512_max_ps(smax, sv);
    }
    const float sm = _mm512_reduce_max_ps(smax);
    for (int r0 = 0; r0 < nq; r0 += 4) {
      const int nr = imin(4, nq - r0);
      __m512 S[4], zs[4];  // per row: weight step, and sum_j p_j z_jg / S in lane g
      for (int r = 0; r < 4; ++r) {
        const float* pr = p + off(r0 + imin(r, nr - 1), ntok) + j0;
        __m512 pv[2];
        if (kFull) {
          pv[0] = _mm512_loadu_ps(pr);
          pv[1] = _mm512_loadu_ps(pr + 16);
        } else {
          pv[0] = vload_n(pr, imin(16, tc));
          pv[1] = vload_n(pr + 16, tc > 16 ? tc - 16 : 0);
        }
        const float pmax = _mm512_reduce_max_ps(_mm512_range_ps(pv[0], pv[1], 0x0B));
        const float wmax = pmax * sm;
        S[r] = _mm512_set1_ps(wmax / 32767.0f);
        // The running max has weight 1, so a chunk whose largest weight is below kTinyMax
        // adds less than f32 rounding to o; its inverse step would overflow (0 * inf = NaN).
        const __m512 k = _mm512_set1_ps(wmax > kTinyMax ? 32767.0f / wmax : 0.0f);
        pv[0] = _mm512_mul_ps(pv[0], k);
        pv[1] = _mm512_mul_ps(pv[1], k);
        __m512 zacc = _mm512_setzero_ps();
#pragma GCC unroll 8
        for (int f = 0; f < NF; f += 32) {
          __m512i wi[2];
#pragma GCC unroll 2
          for (int h = 0; h < 2; ++h) {
            const int fh = f + 16 * h, t = fh / NG;  // first token of these 16 entries
            const __m512i idx = _mm512_add_epi32(_mm512_set1_epi32(t % 16),
                                                 _mm512_srli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,
                                                                                     11, 12, 13, 14, 15),
                                                                   LG));
            const __m512 pe = _mm512_permutexvar_ps(idx, pv[t / 16]);  // lane l -> p'[t + l/NG]
            wi[h] = _mm512_cvtps_epi32(_mm512_mul_ps(pe, _mm512_load_ps(sf + fh)));
            zacc = _mm512_fmadd_ps(pe, _mm512_load_ps(zf + fh), zacc);
          }
          _mm512_store_si512(w[r] + f, _mm512_permutexvar_epi16(pair_perm, _mm512_packs_epi32(wi[0], wi[1])));
        }
        zs[r] = group_sums<NG>(zacc);
      }
      // Accumulate in passes of 4 blocks (64 channels): 16 int32 accumulators.
      for (int cb = 0; cb < NB; cb += 4) {
        const std::uint8_t* wp = reinterpret_cast<const std::uint8_t*>(&w[0][0]);
        __asm__("" : "+r"(wp));  // keep the weights as per-use broadcast loads
        __m512i acc[4][4];
        pass_pairs<B, R, NF, VG>(codes + off(j0, R) + cb * 2 * B, kFull ? kPairChunk : tc, wp, cb, acc);
        // o += S * (acc + zero sums): one FMA per block.
        for (int r = 0; r < nr; ++r) {
          float* orow = o + off(r0 + r, D);
#pragma GCC unroll 4
          for (int b = 0; b < 4; ++b) {
            const int c = (cb + b) * 16;
            const __m512 zb = _mm512_permutexvar_ps(_mm512_set1_epi32(c / VG), zs[r]);
            const __m512 x = _mm512_add_ps(_mm512_cvtepi32_ps(acc[r][b]), zb);
            _mm512_storeu_ps(orow + c, _mm512_fmadd_ps(x, S[r], _mm512_loadu_ps(orow + c)));
          }
        }
      }
    }
  }
}

// True if no value is NaN or infinite (x - x is 0 exactly for finite x).
inline bool all_finite(const float* x, int n) noexcept {
  __mmask16 bad = 0;
  int i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    bad |= _mm512_cmp_ps_mask(_mm512_sub_ps(v, v), _mm512_setzero_ps(), _CMP_NEQ_UQ);
  }
  if (i < n) {
    const __m512 v = vload_n(x + i, n - i);
    bad |= _mm512_cmp_ps_mask(_mm512_sub_ps(v, v), _mm512_setzero_ps(), _CMP_NEQ_UQ);
  }
  return bad == 0;
}
inline bool all_finite_h(const std::uint16_t* h, int n) noexcept {  // f16: exponent not all ones
  __mmask32 bad = 0;
  for (int i = 0; i < n; i += 32) {
    const __m512i v = _mm512_maskz_loadu_epi16(n - i >= 32 ? ~__mmask32{0} : (__mmask32{1} << (n - i)) - 1, h + i);
    bad |= _mm512_cmpeq_epi16_mask(_mm512_and_si512(v, _mm512_set1_epi16(0x7c00)), _mm512_set1_epi16(0x7c00));
  }
  return bad == 0;
}

template <int B, int D, int NG>
bool kivi_accum_vnni(const float* p, int nq, const std::uint16_t* scale, const std::uint16_t* zero,
                     const std::uint8_t* codes, int ntok, float* o) noexcept {
  // Non-finite weights or scales (only possible with NonFinitePolicy::kAllow) go to the
  // float path, which propagates them like the scalar table; decided before any output.
  if (!all_finite(p, nq * ntok) || !all_finite_h(scale, ntok * NG)) return false;
  for (int j0 = 0; j0 < ntok; j0 += kPairChunk) {
    const int tc = imin(kPairChunk, ntok - j0);
    if (tc == kPairChunk)
      accum_chunk<B, D, NG, true>(p, nq, scale, zero, codes, ntok, j0, tc, o);
    else
      accum_chunk<B, D, NG, false>(p, nq, scale, zero, codes, ntok, j0, tc, o);
  }
  return true;
}

template <int B, int D>
bool kivi_accum_vnni_g(const float* p, int nq, const std::uint16_t* scale, const std::uint16_t* zero,
                       const std::uint8_t* codes, int ntok, int vg, float* o) noexcept {
  switch (D / vg) {
    case 1: return kivi_accum_vnni<B, D, 1>(p, nq, scale, zero, codes, ntok, o);
    case 2: return kivi_accum_vnni<B, D, 2>(p, nq, scale, zero, codes, ntok, o);
    case 4: return kivi_accum_vnni<B, D, 4>(p, nq, scale, zero, codes, ntok, o);
    case 8: return kivi_accum_vnni<B, D, 8>(p, nq, scale, zero, codes, ntok, o);
    case 16: return kivi_accum_vnni<B, D, 16>(p, nq, scale, zero, codes, ntok, o);
    default: return false;
  }
}

void kivi_accum_k(const float* p, int nq, const std::uint16_t* scale, const std::uint16_t* zero,
                  const std::uint8_t* codes, int ntok, int d, int bits, int vg, float* o) noexcept {
  if (has_vnni() && vg % 16 == 0) {
    bool done = false;
    switch (bits * 1000 + d) {
      case 2064: done = kivi_accum_vnni_g<2, 64>(p, nq, scale, zero, codes, ntok, vg, o); break;
      case 2128: done = kivi_accum_vnni_g<2, 128>(p, nq, scale, zero, codes, ntok, vg, o); break;
      case 2256: done = kivi_accum_vnni_g<2, 256>(p, nq, scale, zero, codes, ntok, vg, o); break;
      case 4064: done = kivi_accum_vnni_g<4, 64>(p, nq, scale, zero, codes, ntok, vg, o); break;
      case 4128: done = kivi_accum_vnni_g<4, 128>(p, nq, scale, zero, codes, ntok, vg, o); break;
      case 4256: done = kivi_accum_vnni_g<4, 256>(p, nq, scale, zero, codes, ntok, vg, o); break;
      case 8064: done = kivi_accum_vnni_g<8, 64>(p, nq, scale, zero, codes, ntok, vg, o); break;
      case 8128: done = kivi_accum_vnni_g<8, 128>(p, nq, scale, zero, codes, ntok, vg, o); break;
      case 8256: done = kivi_accum_vnni_g<8, 256>(p, nq, scale, zero, codes, ntok, vg, o); break;
      default: break;
    }
    if (done) return;
  }
  kivi_accum_generic(p, nq, scale, zero, codes, ntok, d, bits, vg, o);
}

#define KVSLIM_CQ_SOFTMAX softmax_block_k
#include "kernels/cq-inl.h"
#undef KVSLIM_CQ_SOFTMAX
#include "kernels/avx2/cq_simd-inl.h"

}  // namespace

extern const KernelTable kTable = {
    "avx512",
    f32_to_f16_k, f16_to_f32_k, f32_to_bf16_k, bf16_to_f32_k,
    scores_f32_k, scores_f16_k, scores_bf16_k,
    accum_f32_k, accum_f16_k, accum_bf16_k,
    softmax_block_k,
    kivi_quant_keys_k, kivi_quant_values_k, kivi_dequant_keys_k, kivi_dequant_values_k,
    kivi_scores_k, kivi_accum_k,
    mask_block_k, attend_f32_k, attend_f16_k, attend_bf16_k, attend_kivi_t<kivi_scores_k, kivi_accum_k>,
    attend_kivi_q8_k,
    cq_tables_k, cq_scores_k, cq_accum_k, attend_cq_k, cq_finish_k, cq_encode_k,
    hadamard_rows_k, rope_rows_k,
    nuq_quant_k, nuq_dequant_k, nuq_scores_k, nuq_accum_k, attend_nuq_k,
};

}  // namespace kvslim::kernels::avx512

#pragma GCC diagnostic pop
