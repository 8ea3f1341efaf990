// KIVI attention with 8-bit integer dot products (kernel_table.h, attend_kivi_q8) in AVX2
// integer instructions: VPMADDUBSW (unsigned bytes x signed bytes, pairs summed to int16),
// int16 sums of a few of those, VPMADDWD by ones to widen them to int32.
//
// Included by kernels_avx2.cpp (and kernels_avx512.cpp, whose flags include AVX2 and which
// then has 32 vector registers) inside the table's anonymous namespace, after kernels-inl.h:
// it uses imin/off, h2f, softmax_block_k, fused_block and kivi_scores_generic /
// kivi_accum_generic from there, and only explicit 256-bit AVX2 intrinsics of its own, so the
// same text compiles in both translation units. Everything lives in namespace q8.
//
// Integer kernels: key and value codes of 2 or 4 bits, head_dim 64, 128 or 256, vgroup a
// multiple of 32, pages of at most kMaxTok tokens; anything else runs the scalar table's
// attend_kivi_q8 (the same semantics).
//
// Keys (s = S * sum_c q8_c code_jc + bias), one token row at a time: the row's bytes are
// split into P = 8 / B code planes (plane p of byte b is channel b * P + p of its 32-byte
// vector: B = 4 low / high nibbles, B = 2 the four bit pairs), each plane multiplied with the
// query's int8 bytes permuted the same way (built once per page and row), for every query
// row of the block. int16 bound: a plane product lane is at most 2 * 15 * 127 = 3810
// (B = 4; 762 for B = 2) and a row sums D / 32 <= 8 of them: <= 30480 < 32767, so one
// VPMADDWD by ones per (row, token) and no overflow for any supported shape. The int32
// vectors of 8 (row, token) pairs are reduced together (VPHADDD tree).
//
// Values (o += W_g * sum_j w8_jg code_jc + sum_j p_j vzero_jg): tokens are taken four at a
// time (a quad A..D) and their code bytes interleaved once per page into a scratch copy in
// which each dword is (codeA_c, codeB_c, codeC_c, codeD_c) of one channel c and each
// 32-byte vector holds 8 channels of one value group. VPMADDUBSW with the row's broadcast
// weight dword (w8_A, w8_B, w8_C, w8_D) of that group gives int16 lanes w8_A codeA +
// w8_B codeB and w8_C codeC + w8_D codeD, at most 2 * 255 * 15 = 7650 (B = 4; 1530 for
// B = 2); kQuadsInt16 quads are summed in int16 (4 * 7650 = 30600, 21 * 1530 = 32130 <
// 32767) before VPMADDWD by ones adds each dword's two halves into the channel's int32 sum.
// The int32 sums (<= 255 * 15 * kMaxTok) are in the scratch's channel order and are put back
// in channel order once per page and row, when W_g * sum + zero-point sum is added to o.

namespace q8 {

constexpr int kMaxTok = 128;          // page tokens the integer kernels take
constexpr float kTiny = 0x1p-100f;    // amax / wmax at or below this: all q8 / w8 are 0

inline __m256i bcast32(const void* p) noexcept {
  int x;
  __builtin_memcpy(&x, p, 4);
  return _mm256_set1_epi32(x);
}
// a += x (int16 lanes), kept as a chain on one register: without the empty asm GCC
// reassociates the sums of several products into trees whose temporaries spill.
inline void add16(__m256i& a, __m256i x) noexcept {
  a = _mm256_add_epi16(a, x);
  __asm__("" : "+v"(a));
}
inline __m256i load32(const void* p) noexcept { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
inline void store32(void* p, __m256i v) noexcept { _mm256_storeu_si256(static_cast<__m256i*>(p), v); }
// 32 bytes, or 16 bytes zero-extended (code rows of 16 bytes: B = 2, D = 64).
template <bool kHalf>
inline __m256i load_row(const std::uint8_t* p) noexcept {
  if constexpr (kHalf)
    return _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  else
    return load32(p);
}

inline float hmax_ps(__m256 v) noexcept {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  x = _mm_max_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}
inline float hsum_ps(__m256 v) noexcept {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}
inline int hmax_epi32(__m256i v) noexcept {
  __m128i x = _mm_max_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  x = _mm_max_epi32(x, _mm_shuffle_epi32(x, 0x4E));
  x = _mm_max_epi32(x, _mm_shuffle_epi32(x, 0xB1));
  return _mm_cvtsi128_si32(x);
}
inline float bits_to_float(int b) noexcept {
  float f;
  __builtin_memcpy(&f, &b, 4);
  return f;
}
// |x| as integer bits: the integer order of non-negative floats is their numeric order, and
// every NaN and infinity is >= 0x7f800000.
inline __m256i abs_bits(__m256 x) noexcept {
  return _mm256_and_si256(_mm256_castps_si256(x), _mm256_set1_epi32(0x7fffffff));
}
// Lane i of the result is the sum of the 8 lanes of a[i].
inline __m256i hsum8_epi32(const __m256i* a) noexcept {
  const __m256i h0 = _mm256_hadd_epi32(_mm256_hadd_epi32(a[0], a[1]), _mm256_hadd_epi32(a[2], a[3]));
  const __m256i h1 = _mm256_hadd_epi32(_mm256_hadd_epi32(a[4], a[5]), _mm256_hadd_epi32(a[6], a[7]));
  return _mm256_add_epi32(_mm256_permute2x128_si256(h0, h1, 0x20), _mm256_permute2x128_si256(h0, h1, 0x31));
}
// 32 int32 (4 vectors, values in [-128, 255]) to bytes in order: signed packs to int16, then
// signed (kSigned) or unsigned saturation to bytes, then one dword permutation for the lane
// interleaving of the packs.
template <bool kSigned>
inline __m256i pack_bytes(__m256i a, __m256i b, __m256i c, __m256i d) noexcept {
  const __m256i x = _mm256_packs_epi32(a, b), y = _mm256_packs_epi32(c, d);
  const __m256i z = kSigned ? _mm256_packs_epi16(x, y) : _mm256_packus_epi16(x, y);
  return _mm256_permutevar8x32_epi32(z, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// ---------------------------------------------------------------------------------------
// Keys.
template <int B, int D>
struct KeyShape {
  static constexpr int P = 8 / B;               // code planes per byte
  static constexpr int RB = D * B / 8;          // bytes per code row
  static constexpr int NV = (RB + 31) / 32;     // 32-byte vectors per row
  static constexpr bool kHalf = RB % 32 != 0;   // one vector of 16 bytes (RB == 16)
  static constexpr int CPV = 256 / B;           // channels per 32-byte vector
  static_assert(!kHalf || RB == 16, "rows of 16 bytes or whole 32-byte vectors");
  // int16 bound of a row's sum of plane products (see the top of the file).
  static_assert(NV * P * 2 * ((1 << B) - 1) * 127 <= 32767, "int16 sums of one token row");
};

// The query's int8 bytes, natural channel order (padded with zeros to NV * CPV), permuted to
// the code planes: out[v][p][b] = q8 of channel v * CPV + b * P + p.
template <int B, int D>
inline void permute_query(const std::int8_t* nat, std::int8_t* out) noexcept {
  using K = KeyShape<B, D>;
  for (int v = 0; v < K::NV; ++v) {
    const std::int8_t* n = nat + v * K::CPV;
    std::int8_t* o = out + v * K::P * 32;
    if constexpr (B == 4) {
      // Per 16-byte lane: even bytes, then odd bytes; then the even halves of both lanes
      // together (VPERMQ) and of both vectors (VPERM2I128).
      const __m256i sel = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6, 8, 10, 12,
                                           14, 1, 3, 5, 7, 9, 11, 13, 15);
      const __m256i a = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(load32(n), sel), 0xD8);
      const __m256i b = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(load32(n + 32), sel), 0xD8);
      store32(o, _mm256_permute2x128_si256(a, b, 0x20));
      store32(o + 32, _mm256_permute2x128_si256(a, b, 0x31));
    } else {
      static_assert(B == 2, "2- or 4-bit codes");
      // Per lane: the bytes of each residue mod 4 as one dword; dword p of both lanes as
      // qword p (VPERMD); then a 4 x 4 transpose of qwords over the 4 vectors.
      const __m256i sel = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15, 0, 4, 8, 12, 1, 5, 9,
                                           13, 2, 6, 10, 14, 3, 7, 11, 15);
      const __m256i idx = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
      __m256i x[4];
      for (int k = 0; k < 4; ++k) x[k] = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(load32(n + 32 * k), sel), idx);
      const __m256i lo01 = _mm256_unpacklo_epi64(x[0], x[1]), hi01 = _mm256_unpackhi_epi64(x[0], x[1]);
      const __m256i lo23 = _mm256_unpacklo_epi64(x[2], x[3]), hi23 = _mm256_unpackhi_epi64(x[2], x[3]);
      store32(o, _mm256_permute2x128_si256(lo01, lo23, 0x20));
      store32(o + 32, _mm256_permute2x128_si256(hi01, hi23, 0x20));
      store32(o + 64, _mm256_permute2x128_si256(lo01, lo23, 0x31));
      store32(o + 96, _mm256_permute2x128_si256(hi01, hi23, 0x31));
    }
  }
}

struct KeyRow {
  float S, bias;
  bool ok;  // every q_c kscale_c finite
};
// NR query rows (stride D) against the page's key scales: each row's q8 bytes permuted for
// the planes (qp[r]), its step S and zero-point bias (kernel_table.h). The rows are done
// together so that their dependency chains (max, bias sum, division) overlap.
template <int B, int D, int NR>
inline void key_rows(const float* q, const float* ksf, const float* kzf,
                     std::int8_t (*qp)[KeyShape<B, D>::NV * KeyShape<B, D>::P * 32], KeyRow* kr) noexcept {
  using K = KeyShape<B, D>;
  alignas(32) float qs[NR][D];
  __m256i am[NR];
  __m256 bias[NR][2];
  for (int r = 0; r < NR; ++r) {
    am[r] = _mm256_setzero_si256();
    bias[r][0] = bias[r][1] = _mm256_setzero_ps();
  }
  for (int c = 0; c < D; c += 8) {
    const __m256 ks = _mm256_load_ps(ksf + c), kz = _mm256_load_ps(kzf + c);
    for (int r = 0; r < NR; ++r) {
      const __m256 qv = _mm256_loadu_ps(q + off(r, D) + c);
      const __m256 x = _mm256_mul_ps(qv, ks);
      _mm256_store_ps(qs[r] + c, x);
      am[r] = _mm256_max_epi32(am[r], abs_bits(x));
      bias[r][(c / 8) & 1] = _mm256_fmadd_ps(qv, kz, bias[r][(c / 8) & 1]);
    }
  }
  alignas(16) float amax[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int r = 0; r < NR; ++r) {
    kr[r].bias = hsum_ps(_mm256_add_ps(bias[r][0], bias[r][1]));
    const int ab = hmax_epi32(am[r]);
    kr[r].ok = ab < 0x7f800000;
    amax[r] = kr[r].ok ? bits_to_float(ab) : 0.0f;  // a non-finite row: bytes 0, float path
  }
  const __m128 a = _mm_load_ps(amax);
  alignas(16) float S[4], inv[4];
  _mm_store_ps(S, _mm_div_ps(a, _mm_set1_ps(127.0f)));
  _mm_store_ps(inv, _mm_and_ps(_mm_div_ps(_mm_set1_ps(127.0f), a), _mm_cmpgt_ps(a, _mm_set1_ps(kTiny))));
  for (int r = 0; r < NR; ++r) {
    kr[r].S = S[r];
    const __m256 iv = _mm256_set1_ps(inv[r]);
    alignas(32) std::int8_t nat[K::NV * K::CPV];
    for (int c = 0; c < D; c += 32) {
      __m256i w[4];
      for (int i = 0; i < 4; ++i) w[i] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_load_ps(qs[r] + c + 8 * i), iv));
      store32(nat + c, pack_bytes<true>(w[0], w[1], w[2], w[3]));
    }
    for (int c = D; c < K::NV * K::CPV; c += 32) store32(nat + c, _mm256_setzero_si256());
    permute_query<B, D>(nat, qp[r]);
  }
}

// The int16 dot products of one token row with NR query rows (acc[r], int16 lanes).
template <int B, int D, int NR>
inline void token_dots(const std::uint8_t* row, const std::int8_t (*qp)[KeyShape<B, D>::NV * KeyShape<B, D>::P * 32],
                       __m256i* acc) noexcept {
  using K = KeyShape<B, D>;
  const __m256i mask = _mm256_set1_epi8(static_cast<char>((1 << B) - 1));
  for (int r = 0; r < NR; ++r) acc[r] = _mm256_setzero_si256();
  for (int v = 0; v < K::NV; ++v) {
    const __m256i x = load_row<K::kHalf>(row + 32 * v);
    for (int p = 0; p < K::P; ++p) {
      const __m256i plane = _mm256_and_si256(p == 0 ? x : _mm256_srli_epi16(x, B * p), mask);
      for (int r = 0; r < NR; ++r)
        add16(acc[r], _mm256_maddubs_epi16(plane, load32(qp[r] + (v * K::P + p) * 32)));
    }
  }
}

// Logits of NR rows (q: row 0 of the block, stride D) over the page's tokens, into s (row
// stride ntok).
// NR >= 3: per token the rows' int32 vectors are reduced to one (two VPHADDD levels: lane
// r = low half of row r, lane 4 + r = high half), two tokens' halves added into lanes
// 4 t + r; the logits go to a token-major buffer, transposed 4 x 4 into s at the end.
// NR <= 2: NR x TB = 8 dot products share one reduction (TB = 8 / NR tokens).
template <int B, int D, int NR>
void key_block(const float* q, const float* ksf, const float* kzf, const std::uint8_t* codes, int ntok, float* s,
               const std::uint16_t* kscale, const std::uint16_t* kzero) noexcept {
  using K = KeyShape<B, D>;
  alignas(32) std::int8_t qp[NR][K::NV * K::P * 32];
  KeyRow kr[NR];
  key_rows<B, D, NR>(q, ksf, kzf, qp, kr);
  const __m256i ones = _mm256_set1_epi16(1);
  if constexpr (NR >= 3) {
    alignas(32) float sl[8], bl[8];
    for (int i = 0; i < 8; ++i) {
      sl[i] = kr[imin(i % 4, NR - 1)].S;
      bl[i] = kr[imin(i % 4, NR - 1)].bias;
    }
    const __m256 Sv = _mm256_load_ps(sl), Bv = _mm256_load_ps(bl);
    alignas(32) float lt[(kMaxTok + 4) * 4];  // [token][row]
    for (int j0 = 0; j0 < ntok; j0 += 2) {
      __m256i u[2];
      for (int t = 0; t < 2; ++t) {
        __m256i acc[NR];
        token_dots<B, D, NR>(codes + off(imin(j0 + t, ntok - 1), K::RB), qp, acc);  // a spare token repeats the last
        const __m256i h01 = _mm256_hadd_epi32(_mm256_madd_epi16(acc[0], ones), _mm256_madd_epi16(acc[1], ones));
        const __m256i h23 = _mm256_hadd_epi32(_mm256_madd_epi16(acc[2], ones),
                                              NR > 3 ? _mm256_madd_epi16(acc[NR - 1], ones) : _mm256_setzero_si256());
        u[t] = _mm256_hadd_epi32(h01, h23);
      }
      const __m256i sum = _mm256_add_epi32(_mm256_permute2x128_si256(u[0], u[1], 0x20),
                                           _mm256_permute2x128_si256(u[0], u[1], 0x31));
      _mm256_store_ps(lt + 4 * j0, _mm256_add_ps(_mm256_mul_ps(Sv, _mm256_cvtepi32_ps(sum)), Bv));
    }
    int j = 0;
    for (; j + 4 <= ntok; j += 4) {
      __m128 a = _mm_load_ps(lt + 4 * j), b = _mm_load_ps(lt + 4 * j + 4), c = _mm_load_ps(lt + 4 * j + 8),
             d = _mm_load_ps(lt + 4 * j + 12);
      _MM_TRANSPOSE4_PS(a, b, c, d);
      _mm_storeu_ps(s + j, a);
      _mm_storeu_ps(s + off(1, ntok) + j, b);
      _mm_storeu_ps(s + off(2, ntok) + j, c);
      if (NR > 3) _mm_storeu_ps(s + off(NR - 1, ntok) + j, d);
    }
    for (; j < ntok; ++j)
      for (int r = 0; r < NR; ++r) s[off(r, ntok) + j] = lt[4 * j + r];
  } else {
    constexpr int TB = 8 / NR;
    alignas(32) float sl[8], bl[8];
    for (int i = 0; i < 8; ++i) {
      sl[i] = kr[i / TB].S;
      bl[i] = kr[i / TB].bias;
    }
    const __m256 Sv = _mm256_load_ps(sl), Bv = _mm256_load_ps(bl);
    for (int j0 = 0; j0 < ntok; j0 += TB) {
      const int nt = imin(TB, ntok - j0);
      __m256i res[8];
      for (int t = 0; t < TB; ++t) {
        __m256i acc[NR];
        token_dots<B, D, NR>(codes + off(j0 + imin(t, nt - 1), K::RB), qp, acc);
        for (int r = 0; r < NR; ++r) res[r * TB + t] = _mm256_madd_epi16(acc[r], ones);
      }
      const __m256 sc = _mm256_add_ps(_mm256_mul_ps(Sv, _mm256_cvtepi32_ps(hsum8_epi32(res))), Bv);
      float* out = s + j0;
      if (nt == TB && TB == 8) {
        _mm256_storeu_ps(out, sc);
      } else if (nt == TB) {
        _mm_storeu_ps(out, _mm256_castps256_ps128(sc));
        _mm_storeu_ps(out + ntok, _mm256_extractf128_ps(sc, 1));
      } else {
        alignas(32) float tmp[8];
        _mm256_store_ps(tmp, sc);
        for (int r = 0; r < NR; ++r)
          for (int t = 0; t < nt; ++t) out[off(r, ntok) + t] = tmp[r * TB + t];
      }
    }
  }
  // Rows with a non-finite q_c kscale_c: the full-precision formula (kernel_table.h).
  for (int r = 0; r < NR; ++r)
    if (!kr[r].ok) kivi_scores_generic(q + off(r, D), 1, kscale, kzero, codes, ntok, D, B, s + off(r, ntok));
}

template <int B, int D>
void scores(const float* q, int nq, const std::uint16_t* kscale, const std::uint16_t* kzero, const std::uint8_t* codes,
            int ntok, float* s) noexcept {
  alignas(32) float ksf[D], kzf[D];
  for (int c = 0; c < D; c += 8) {
    _mm256_store_ps(ksf + c, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kscale + c))));
    _mm256_store_ps(kzf + c, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kzero + c))));
  }
  for (int r0 = 0; r0 < nq; r0 += 4) {
    const float* qr = q + off(r0, D);
    float* sr = s + off(r0, ntok);
    switch (imin(4, nq - r0)) {
      case 1: key_block<B, D, 1>(qr, ksf, kzf, codes, ntok, sr, kscale, kzero); break;
      case 2: key_block<B, D, 2>(qr, ksf, kzf, codes, ntok, sr, kscale, kzero); break;
      case 3: key_block<B, D, 3>(qr, ksf, kzf, codes, ntok, sr, kscale, kzero); break;
      default: key_block<B, D, 4>(qr, ksf, kzf, codes, ntok, sr, kscale, kzero); break;
    }
  }
}

// ---------------------------------------------------------------------------------------
// Values.
template <int B, int D>
struct ValShape {
  static constexpr int P = 8 / B;
  static constexpr int RB = D * B / 8;
  static constexpr int NV = (RB + 31) / 32;
  static constexpr bool kHalf = RB % 32 != 0;
  static constexpr int NBETA = RB / 8;   // 8-byte blocks of a row
  static constexpr int NCV = D / 8;      // scratch vectors per quad (8 channels x 4 tokens)
  static constexpr int kQuadsInt16 = 32767 / (2 * 255 * ((1 << B) - 1));  // quads summed in int16
  static_assert(kQuadsInt16 >= 1, "int16 sums of one quad");
  static_assert(255 * ((1 << B) - 1) * kMaxTok < (1 << 30), "int32 sums of a page");
};

// Interleaved codes of one page: sc[quad][cv] holds, in dword i, tokens 4 quad .. 4 quad + 3
// of channel (8 beta + i) * P + p, cv = beta * P + p (beta: 8-byte block of the code row).
// Tokens past ntok repeat the last row (their weights are 0).
template <int B, int D>
void interleave_codes(const std::uint8_t* codes, int ntok, std::uint8_t* sc) noexcept {
  using V = ValShape<B, D>;
  const __m256i mask = _mm256_set1_epi8(static_cast<char>((1 << B) - 1));
  const int nquad = (ntok + 3) / 4;
  for (int qd = 0; qd < nquad; ++qd) {
    const std::uint8_t* r[4];
    for (int t = 0; t < 4; ++t) r[t] = codes + off(imin(4 * qd + t, ntok - 1), V::RB);
    std::uint8_t* out = sc + off(qd, V::NCV * 32);
    for (int v = 0; v < V::NV; ++v) {
      const __m256i a = load_row<V::kHalf>(r[0] + 32 * v), b = load_row<V::kHalf>(r[1] + 32 * v);
      const __m256i c = load_row<V::kHalf>(r[2] + 32 * v), d = load_row<V::kHalf>(r[3] + 32 * v);
      const __m256i ab0 = _mm256_unpacklo_epi8(a, b), ab1 = _mm256_unpackhi_epi8(a, b);
      const __m256i cd0 = _mm256_unpacklo_epi8(c, d), cd1 = _mm256_unpackhi_epi8(c, d);
      // D_k, dword i: byte 16 (i / 4) + 4 k + i % 4 of each token's vector.
      const __m256i d0 = _mm256_unpacklo_epi16(ab0, cd0), d1 = _mm256_unpackhi_epi16(ab0, cd0);
      const __m256i d2 = _mm256_unpacklo_epi16(ab1, cd1), d3 = _mm256_unpackhi_epi16(ab1, cd1);
      // E_l, dword i: byte 8 l + i.
      __m256i e[4];
      e[0] = _mm256_permute2x128_si256(d0, d1, 0x20);
      e[1] = _mm256_permute2x128_si256(d2, d3, 0x20);
      e[2] = _mm256_permute2x128_si256(d0, d1, 0x31);
      e[3] = _mm256_permute2x128_si256(d2, d3, 0x31);
      constexpr int nb = V::kHalf ? 2 : 4;
      for (int l = 0; l < nb; ++l) {
        const int beta = 4 * v + l;
        for (int p = 0; p < V::P; ++p)
          store32(out + (beta * V::P + p) * 32, _mm256_and_si256(p == 0 ? e[l] : _mm256_srli_epi16(e[l], B * p), mask));
      }
    }
  }
}

// Per-page value parameters in the weights' order [quad][group][token of the quad] (tokens
// past ntok: 0), f32, padded with zeros to whole vectors.
struct ValPage {
  alignas(32) float vs[kMaxTok * 8 + 8];
  alignas(32) float vz[kMaxTok * 8 + 8];
};
// One quad of f16 parameters [token][group] to f32 [group][token].
template <int NG>
inline void transpose_quad(const std::uint16_t* h, float* out) noexcept {
  if constexpr (NG == 1) {
    _mm_store_ps(out, _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(h))));
  } else if constexpr (NG == 2) {
    const __m256 a = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h)));
    _mm256_store_ps(out, _mm256_permutevar8x32_ps(a, _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7)));
  } else if constexpr (NG == 4) {
    const __m256 a = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h)));      // t0 | t1
    const __m256 b = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + 8)));  // t2 | t3
    const __m256i idx = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    _mm256_store_ps(out, _mm256_permutevar8x32_ps(_mm256_unpacklo_ps(a, b), idx));
    _mm256_store_ps(out + 8, _mm256_permutevar8x32_ps(_mm256_unpackhi_ps(a, b), idx));
  } else {
    static_assert(NG == 8, "1, 2, 4 or 8 value groups");
    __m256 a[4];
    for (int t = 0; t < 4; ++t) a[t] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + 8 * t)));
    const __m256 u0 = _mm256_unpacklo_ps(a[0], a[1]), u1 = _mm256_unpacklo_ps(a[2], a[3]);
    const __m256 u2 = _mm256_unpackhi_ps(a[0], a[1]), u3 = _mm256_unpackhi_ps(a[2], a[3]);
    const __m256 x0 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(u0), _mm256_castps_pd(u1)));  // g0 | g4
    const __m256 x1 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(u0), _mm256_castps_pd(u1)));  // g1 | g5
    const __m256 x2 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(u2), _mm256_castps_pd(u3)));  // g2 | g6
    const __m256 x3 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(u2), _mm256_castps_pd(u3)));  // g3 | g7
    _mm256_store_ps(out, _mm256_permute2f128_ps(x0, x1, 0x20));
    _mm256_store_ps(out + 8, _mm256_permute2f128_ps(x2, x3, 0x20));
    _mm256_store_ps(out + 16, _mm256_permute2f128_ps(x0, x1, 0x31));
    _mm256_store_ps(out + 24, _mm256_permute2f128_ps(x2, x3, 0x31));
  }
}
template <int NG>
void value_params(const std::uint16_t* scale, const std::uint16_t* zero, int ntok, ValPage& vp) noexcept {
  const int nfull = ntok / 4, nquad = (ntok + 3) / 4;
  for (int qd = 0; qd < nfull; ++qd) {
    transpose_quad<NG>(scale + off(qd, 4 * NG), vp.vs + qd * 4 * NG);
    transpose_quad<NG>(zero + off(qd, 4 * NG), vp.vz + qd * 4 * NG);
  }
  if (nfull < nquad)  // the last, partial quad
    for (int g = 0; g < NG; ++g)
      for (int t = 0; t < 4; ++t) {
        const int j = 4 * nfull + t, i = (nfull * NG + g) * 4 + t;
        vp.vs[i] = j < ntok ? h2f(scale[j * NG + g]) : 0.0f;
        vp.vz[i] = j < ntok ? h2f(zero[j * NG + g]) : 0.0f;
      }
  for (int i = nquad * NG * 4; i < (nquad * NG * 4 + 7) / 8 * 8; ++i) vp.vs[i] = vp.vz[i] = 0.0f;
}

struct ValRow {
  alignas(32) std::uint8_t w8[kMaxTok * 8 + 32];  // [quad][group][token]: one dword per (quad, group)
  float W[8], zs[8];
  bool ok;  // every p_j vscale_jg finite
};
// Per 128-bit lane: every lane gets the max (sum) of its lane's four.
inline __m256 lane4_max(__m256 v) noexcept {
  v = _mm256_max_ps(v, _mm256_permute_ps(v, 0x4E));
  return _mm256_max_ps(v, _mm256_permute_ps(v, 0xB1));
}
inline __m256 lane4_sum(__m256 v) noexcept {
  v = _mm256_add_ps(v, _mm256_permute_ps(v, 0x4E));
  return _mm256_add_ps(v, _mm256_permute_ps(v, 0xB1));
}
// The weights of one row of probabilities pr (ntok of them) for the page (kernel_table.h).
// Float vectors of 8 (group, token) entries: NG == 1: quads 2k and 2k + 1 of group 0; else
// NPAT = NG / 2 vectors per quad, vector i holding groups 2i (lanes 0-3) and 2i + 1.
template <int NG>
inline void value_row(const float* pr, int ntok, const ValPage& vp, ValRow& vr) noexcept {
  constexpr int NPAT = NG == 1 ? 1 : NG / 2;
  constexpr int TPV = NG == 1 ? 8 : 4;  // tokens per step: one vector (NG == 1) or a quad
  const int nquad = (ntok + 3) / 4, nstep = NG == 1 ? (nquad + 1) / 2 : nquad, nfull = ntok / TPV;
  const int nvec = nstep * NPAT;
  alignas(32) float w[kMaxTok * 8 + 32];
  const __m256 zero = _mm256_setzero_ps();
  __m256 mx[NPAT], zs[NPAT], fin = zero;
  for (int i = 0; i < NPAT; ++i) mx[i] = zs[i] = zero;
  // w = p * vscale, 0 where p = 0 whatever the scale (kernel_table.h); a non-finite w makes
  // the sum fin non-finite (|w| <= 65504 * ntok otherwise: no overflow).
#define KVSLIM_Q8_STEP(st, pv)                                                                \
  {                                                                                           \
    const __m256 nz = _mm256_cmp_ps(pv, zero, _CMP_NEQ_UQ);                                  \
    for (int i = 0; i < NPAT; ++i) {                                                          \
      const int k = (st) * NPAT + i;                                                          \
      const __m256 x = _mm256_and_ps(_mm256_mul_ps(pv, _mm256_load_ps(vp.vs + 8 * k)), nz); \
      _mm256_store_ps(w + 8 * k, x);                                                          \
      fin = _mm256_add_ps(fin, x);                                                            \
      mx[i] = _mm256_max_ps(x, mx[i]);                                                        \
      zs[i] = _mm256_fmadd_ps(pv, _mm256_load_ps(vp.vz + 8 * k), zs[i]);                     \
    }                                                                                         \
  }
  for (int st = 0; st < nfull; ++st) {
    const __m256 pv = NG == 1 ? _mm256_loadu_ps(pr + 8 * st)
                              : _mm256_broadcast_ps(reinterpret_cast<const __m128*>(pr + 4 * st));
    KVSLIM_Q8_STEP(st, pv)
  }
  if (nfull < nstep) {  // the last, partial step: masked load (nothing read past the row)
    const int j = TPV * nfull;
    const __m256 pl = _mm256_maskload_ps(
        pr + j, _mm256_cmpgt_epi32(_mm256_set1_epi32(ntok - j), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
    const __m256 pv = NG == 1 ? pl : _mm256_insertf128_ps(pl, _mm256_castps256_ps128(pl), 1);
    KVSLIM_Q8_STEP(nfull, pv)
  }
#undef KVSLIM_Q8_STEP
  vr.ok = __builtin_isfinite(hsum_ps(fin));
  if (!vr.ok) return;
  // Group maxima and zero-point sums, the inverse steps as vectors in the entries' pattern.
  __m256 ipat[NPAT];
  for (int i = 0; i < NPAT; ++i) {
    __m256 m = lane4_max(mx[i]), z = lane4_sum(zs[i]);
    if constexpr (NG == 1) {
      m = _mm256_max_ps(m, _mm256_permute2f128_ps(m, m, 0x01));
      z = _mm256_add_ps(z, _mm256_permute2f128_ps(z, z, 0x01));
    }
    const __m256 big = _mm256_cmp_ps(m, _mm256_set1_ps(kTiny), _CMP_GT_OQ);
    ipat[i] = _mm256_and_ps(_mm256_div_ps(_mm256_set1_ps(255.0f), m), big);
    const __m256 W = _mm256_div_ps(m, _mm256_set1_ps(255.0f));
    vr.W[NG == 1 ? 0 : 2 * i] = _mm256_cvtss_f32(W);
    vr.zs[NG == 1 ? 0 : 2 * i] = _mm256_cvtss_f32(z);
    if constexpr (NG > 1) {
      vr.W[2 * i + 1] = _mm_cvtss_f32(_mm256_extractf128_ps(W, 1));
      vr.zs[2 * i + 1] = _mm_cvtss_f32(_mm256_extractf128_ps(z, 1));
    }
  }
  for (int k = nvec; k % 4; ++k) _mm256_store_ps(w + 8 * k, zero);
  for (int k = 0; k < nvec; k += 4) {
    __m256i c[4];
    for (int i = 0; i < 4; ++i)
      c[i] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_load_ps(w + 8 * (k + i)), ipat[(k + i) % NPAT]));
    store32(vr.w8 + 8 * k, pack_bytes<false>(c[0], c[1], c[2], c[3]));
  }
}

// o[r] += W_g * (integer sums) + zs_g for NR rows of weights over the interleaved codes.
template <int B, int D, int NG, int NR>
void value_block(const float* p, int ntok, const ValPage& vp, const std::uint8_t* sc, float* o,
                 const std::uint16_t* vscale, const std::uint16_t* vzero, const std::uint8_t* codes) noexcept {
  using V = ValShape<B, D>;
  constexpr int VG = D / NG;
  static_assert(V::P % 2 == 0 && VG % (8 * V::P) == 0, "scratch vectors cv, cv + 1 (cv even) share a block, in one value group");
  const int nquad = (ntok + 3) / 4;
  ValRow vr[NR];
  for (int r = 0; r < NR; ++r) {
    value_row<NG>(p + off(r, ntok), ntok, vp, vr[r]);
    if (!vr[r].ok) __builtin_memset(vr[r].w8, 0, sizeof(vr[r].w8));
  }
  alignas(32) std::int32_t acc[NR][D];
  const __m256i ones = _mm256_set1_epi16(1);
  // Two scratch vectors (16 channels of one group) per weight broadcast; int16 sums over
  // blocks of QI quads (kQuadsInt16 rounded down to a multiple of 4), 4 quads unrolled.
  constexpr int QI = V::kQuadsInt16 >= 4 ? V::kQuadsInt16 / 4 * 4 : V::kQuadsInt16;
  for (int cv = 0; cv < V::NCV; cv += 2) {
    const int g = (cv / V::P) * 8 * V::P / VG;
    const std::uint8_t* col = sc + cv * 32;
    const std::uint8_t* wr[NR];
    for (int r = 0; r < NR; ++r) wr[r] = vr[r].w8 + 4 * g;
    for (int q0 = 0; q0 < nquad; q0 += QI) {
      const int q1 = imin(nquad, q0 + QI);
      __m256i a[NR][2];
      for (int r = 0; r < NR; ++r) a[r][0] = a[r][1] = _mm256_setzero_si256();
      auto quad = [&](int qd) __attribute__((always_inline)) {
        const std::uint8_t* cq = col + off(qd, V::NCV * 32);
        const __m256i c0 = load32(cq), c1 = load32(cq + 32);
        for (int r = 0; r < NR; ++r) {
          const __m256i wb = bcast32(wr[r] + 4 * qd * NG);
          add16(a[r][0], _mm256_maddubs_epi16(wb, c0));
          add16(a[r][1], _mm256_maddubs_epi16(wb, c1));
        }
      };
      int qd = q0;
      for (; qd + 4 <= q1; qd += 4) {
        quad(qd);
        quad(qd + 1);
        quad(qd + 2);
        quad(qd + 3);
      }
      for (; qd < q1; ++qd) quad(qd);
      for (int r = 0; r < NR; ++r)
        for (int h = 0; h < 2; ++h) {
          const __m256i t = _mm256_madd_epi16(a[r][h], ones);
          std::int32_t* dst = acc[r] + 8 * (cv + h);
          store32(dst, q0 == 0 ? t : _mm256_add_epi32(load32(dst), t));
        }
    }
  }
  // Back to channel order: o += W_g * sum + zs_g, 8 P channels (one 8-byte block) at a time.
  for (int r = 0; r < NR; ++r) {
    float* orow = o + off(r, D);
    if (!vr[r].ok) {  // the full-precision formula for this row (kernel_table.h)
      kivi_accum_generic(p + off(r, ntok), 1, vscale, vzero, codes, ntok, D, B, VG, orow);
      continue;
    }
    for (int beta = 0; beta < V::NBETA; ++beta) {
      const int c0 = beta * 8 * V::P, g = c0 / VG;
      const __m256 W = _mm256_set1_ps(vr[r].W[g]), Z = _mm256_set1_ps(vr[r].zs[g]);
      const std::int32_t* a = acc[r] + beta * V::P * 8;
      __m256i n[V::P];
      if constexpr (B == 4) {  // a[0..7]: channels c0 + 2i, a[8..15]: c0 + 2i + 1
        const __m256i lo = load32(a), hi = load32(a + 8);
        const __m256i x = _mm256_unpacklo_epi32(lo, hi), y = _mm256_unpackhi_epi32(lo, hi);
        n[0] = _mm256_permute2x128_si256(x, y, 0x20);
        n[1] = _mm256_permute2x128_si256(x, y, 0x31);
      } else {  // a[8p + i]: channel c0 + 4i + p
        const __m256i p0 = load32(a), p1 = load32(a + 8), p2 = load32(a + 16), p3 = load32(a + 24);
        const __m256i x0 = _mm256_unpacklo_epi32(p0, p1), x1 = _mm256_unpacklo_epi32(p2, p3);
        const __m256i y0 = _mm256_unpackhi_epi32(p0, p1), y1 = _mm256_unpackhi_epi32(p2, p3);
        const __m256i c00 = _mm256_unpacklo_epi64(x0, x1), c04 = _mm256_unpackhi_epi64(x0, x1);  // 0-3|16-19, 4-7|20-23
        const __m256i c08 = _mm256_unpacklo_epi64(y0, y1), c12 = _mm256_unpackhi_epi64(y0, y1);  // 8-11|24-27, 12-15|28-31
        n[0] = _mm256_permute2x128_si256(c00, c04, 0x20);
        n[1] = _mm256_permute2x128_si256(c08, c12, 0x20);
        n[2] = _mm256_permute2x128_si256(c00, c04, 0x31);
        n[3] = _mm256_permute2x128_si256(c08, c12, 0x31);
      }
      for (int i = 0; i < V::P; ++i) {
        float* oc = orow + c0 + 8 * i;
        const __m256 t = _mm256_add_ps(_mm256_mul_ps(W, _mm256_cvtepi32_ps(n[i])), Z);
        _mm256_storeu_ps(oc, _mm256_add_ps(_mm256_loadu_ps(oc), t));
      }
    }
  }
}

template <int B, int D, int NG>
void accum_ng(const float* p, int nq, const std::uint16_t* vscale, const std::uint16_t* vzero,
              const std::uint8_t* codes, int ntok, float* o) noexcept {
  using V = ValShape<B, D>;
  ValPage vp;
  value_params<NG>(vscale, vzero, ntok, vp);
  alignas(32) std::uint8_t sc[kMaxTok / 4 * V::NCV * 32];
  interleave_codes<B, D>(codes, ntok, sc);
  for (int r0 = 0; r0 < nq; r0 += 4) {
    const float* pr = p + off(r0, ntok);
    float* orow = o + off(r0, D);
    switch (imin(4, nq - r0)) {
      case 1: value_block<B, D, NG, 1>(pr, ntok, vp, sc, orow, vscale, vzero, codes); break;
      case 2: value_block<B, D, NG, 2>(pr, ntok, vp, sc, orow, vscale, vzero, codes); break;
      case 3: value_block<B, D, NG, 3>(pr, ntok, vp, sc, orow, vscale, vzero, codes); break;
      default: value_block<B, D, NG, 4>(pr, ntok, vp, sc, orow, vscale, vzero, codes); break;
    }
  }
}

template <int B, int D>
void accum(const float* p, int nq, const std::uint16_t* vscale, const std::uint16_t* vzero, const std::uint8_t* codes,
           int ntok, int vg, float* o) noexcept {
  // vg is a multiple of 32 dividing D (the caller checks): D / vg <= D / 32.
  switch (D / vg) {
    case 1: return accum_ng<B, D, 1>(p, nq, vscale, vzero, codes, ntok, o);
    case 2: return accum_ng<B, D, 2>(p, nq, vscale, vzero, codes, ntok, o);
    case 4:
      if constexpr (D >= 128) return accum_ng<B, D, 4>(p, nq, vscale, vzero, codes, ntok, o);
      break;
    default:
      if constexpr (D >= 256) return accum_ng<B, D, 8>(p, nq, vscale, vzero, codes, ntok, o);
      break;
  }
}

template <int KB, int VB, int D>
void attend(const float* q, int nq, const KiviPage& pg, int ntok, const BlockMask& mask, OnlineState& st) noexcept {
  fused_block(
      nq, ntok, mask, st, [&](float* s) { scores<KB, D>(q, nq, pg.kscale, pg.kzero, pg.kcodes, ntok, s); },
      [&](float* s, float* m, float* l, float* o) { softmax_block_k(s, nq, ntok, m, l, o, D); },
      [&](const float* p, float* o) { accum<VB, D>(p, nq, pg.vscale, pg.vzero, pg.vcodes, ntok, pg.vgroup, o); });
}

template <int D>
void attend_d(const float* q, int nq, const KiviPage& pg, int ntok, const BlockMask& mask, OnlineState& st) noexcept {
  switch (pg.kbits * 10 + pg.vbits) {
    case 22: return attend<2, 2, D>(q, nq, pg, ntok, mask, st);
    case 24: return attend<2, 4, D>(q, nq, pg, ntok, mask, st);
    case 42: return attend<4, 2, D>(q, nq, pg, ntok, mask, st);
    default: return attend<4, 4, D>(q, nq, pg, ntok, mask, st);
  }
}

}  // namespace q8

void attend_kivi_q8_k(const float* q, int nq, const KiviPage& pg, int ntok, int d, const BlockMask& mask,
                      OnlineState& st) noexcept {
  const bool bits_ok = (pg.kbits == 2 || pg.kbits == 4) && (pg.vbits == 2 || pg.vbits == 4);
  // vgroup a multiple of 32 dividing d (64, 128, 256): d / vgroup is 1, 2, 4 or 8.
  if (bits_ok && ntok <= q8::kMaxTok && pg.vgroup % 32 == 0) {
    switch (d) {
      case 64: return q8::attend_d<64>(q, nq, pg, ntok, mask, st);
      case 128: return q8::attend_d<128>(q, nq, pg, ntok, mask, st);
      case 256: return q8::attend_d<256>(q, nq, pg, ntok, mask, st);
      default: break;
    }
  }
  scalar::kTable.attend_kivi_q8(q, nq, pg, ntok, d, mask, st);
}
