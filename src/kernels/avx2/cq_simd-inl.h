// CQ kernels (kernel_table.h, "CQ") with SSE/AVX vectors: the AVX2 table's, and the AVX-512
// table's (compiled there with AVX-512 flags: EVEX encodings and 32 vector registers; the
// widest row chunk is 8 floats either way, since decode runs nq = 4 or 8 rows per kv head).
// Included inside the ISA's namespace after kernels/cq-inl.h (cq_code, cq_rebase, the `_g`
// fallbacks) and the ISA's softmax_block_k.
//
// The nq rows of a table entry are adjacent, so one (token, group) is one vector load + add
// on the key side and one load-add-store on the value side, for the rows of a chunk of
// 8, 4, 2 or 1 (nq = 3 runs a 2-row and a 1-row chunk). Per row the additions happen in the
// scalar kernels' order (groups 0..G-1 for a logit, tokens in order for a weight), so
// cq_scores and cq_accum are bit-identical to the scalar table; only attend_cq differs,
// through the vector exp of softmax_block_k.
//
// Only 4- and 8-bit codes (C·B = 4 or 8: every recipe in docs/cq.md) have vector kernels;
// 1- and 2-bit codes run the scalar `_g` ones. Each vector instance is a fully unrolled walk
// over 64 / (C·B) codes per word for 4 row widths, and the 1- and 2-bit instances were most
// of the compile time of the two kernel translation units (CI's sanitizer build above all).
//
// Codes are read as 64-bit words of a row (64 / cbits codes each; a row's last bytes
// bytewise, so nothing is read past a row), shifted and masked in general registers: at
// 256 centroids a table row of 4 floats is a 16-byte load at code * 16, and 4 tokens' chains
// are interleaved to cover the add latency. Pages of 128 tokens or more with 8-bit codes take
// the group-major walk below instead. (Gathers across tokens and pshufb tables for 16-entry
// codebooks were not tried.)

// Rows [r0, r0 + W) of a table entry as one vector.
struct CqW1 {
  static constexpr int kW = 1;
  using V = __m128;
  static V zero() noexcept { return _mm_setzero_ps(); }
  static V load(const float* p) noexcept { return _mm_load_ss(p); }
  static void store(float* p, V v) noexcept { _mm_store_ss(p, v); }
  static V add(V a, V b) noexcept { return _mm_add_ss(a, b); }
  static V mul(V a, V b) noexcept { return _mm_mul_ss(a, b); }
  static bool none(V v) noexcept { return _mm_movemask_ps(_mm_cmpneq_ps(v, _mm_setzero_ps())) == 0; }
};
struct CqW2 {
  static constexpr int kW = 2;
  using V = __m128;
  static V zero() noexcept { return _mm_setzero_ps(); }
  // 8 bytes at a float-aligned address: the unaligned-typed integer forms (no double* alignment).
  static V load(const float* p) noexcept { return _mm_castsi128_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i_u*>(p))); }
  static void store(float* p, V v) noexcept { _mm_storel_epi64(reinterpret_cast<__m128i_u*>(p), _mm_castps_si128(v)); }
  static V add(V a, V b) noexcept { return _mm_add_ps(a, b); }
  static V mul(V a, V b) noexcept { return _mm_mul_ps(a, b); }
  static bool none(V v) noexcept { return (_mm_movemask_ps(_mm_cmpneq_ps(v, _mm_setzero_ps())) & 3) == 0; }
};
struct CqW4 {
  static constexpr int kW = 4;
  using V = __m128;
  static V zero() noexcept { return _mm_setzero_ps(); }
  static V load(const float* p) noexcept { return _mm_loadu_ps(p); }
  static void store(float* p, V v) noexcept { _mm_storeu_ps(p, v); }
  static V add(V a, V b) noexcept { return _mm_add_ps(a, b); }
  static V mul(V a, V b) noexcept { return _mm_mul_ps(a, b); }
  static V set1(float x) noexcept { return _mm_set1_ps(x); }
  static V fmadd(V a, V b, V c) noexcept { return _mm_fmadd_ps(a, b, c); }
  static bool none(V v) noexcept { return _mm_movemask_ps(_mm_cmpneq_ps(v, _mm_setzero_ps())) == 0; }
};
struct CqW8 {
  static constexpr int kW = 8;
  using V = __m256;
  static V zero() noexcept { return _mm256_setzero_ps(); }
  static V load(const float* p) noexcept { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) noexcept { _mm256_storeu_ps(p, v); }
  static V add(V a, V b) noexcept { return _mm256_add_ps(a, b); }
  static V mul(V a, V b) noexcept { return _mm256_mul_ps(a, b); }
  static V set1(float x) noexcept { return _mm256_set1_ps(x); }
  static V fmadd(V a, V b, V c) noexcept { return _mm256_fmadd_ps(a, b, c); }
  static bool none(V v) noexcept {
    return _mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_NEQ_UQ)) == 0;
  }
};

// Bytes [b, b + 8) of a code row as a little-endian word; bytes at or past rb read as 0.
inline std::uint64_t cq_word(const std::uint8_t* row, int b, int rb) noexcept {
  std::uint64_t w = 0;
  if (b + 8 <= rb) {
    __builtin_memcpy(&w, row + b, 8);
  } else {
    for (int i = 0; b + i < rb; ++i) w |= static_cast<std::uint64_t>(row[b + i]) << (8 * i);
  }
  return w;
}

// Calls f(t, e) for the groups of T code rows (rows[t]) in group order; e = base + code of
// row t at that group * nq, base advancing by count * nq per group.
template <int CB, int T, class P, class F>
inline void cq_walk(const std::uint8_t* const* rows, int rb, int groups, P* base, int nq, F&& f) noexcept {
  constexpr int kPer = 64 / CB;
  constexpr std::uint64_t kMask = (std::uint64_t{1} << CB) - 1u;
  const std::ptrdiff_t step = static_cast<std::ptrdiff_t>(nq) << CB;
  int g = 0;
  for (int b = 0; g < groups; b += 8) {
    std::uint64_t w[T];
    for (int t = 0; t < T; ++t) w[t] = cq_word(rows[t], b, rb);
    if (g + kPer <= groups) {
#pragma GCC unroll 16
      for (int i = 0; i < kPer; ++i) {
        for (int t = 0; t < T; ++t) f(t, base + static_cast<std::ptrdiff_t>((w[t] >> (i * CB)) & kMask) * nq);
        base += step;
      }
      g += kPer;
    } else {
      for (int i = 0; g < groups; ++i, ++g) {
        for (int t = 0; t < T; ++t) f(t, base + static_cast<std::ptrdiff_t>((w[t] >> (i * CB)) & kMask) * nq);
        base += step;
      }
    }
  }
}

// s[r][j] for rows [r0, r0 + W::kW), tokens 4 at a time (independent add chains).
template <int CB, class W>
void cq_scores_chunk(int nq, int r0, const CqPage& pg, const float* score, int ntok, float* s) noexcept {
  using V = typename W::V;
  constexpr int T = 4;
  const int rb = row_bytes(pg.kgroups, CB);
  const float* base = score + r0;
  alignas(32) float out[T][8];
  int j = 0;
  for (; j + T <= ntok; j += T) {
    const std::uint8_t* rows[T];
    for (int t = 0; t < T; ++t) rows[t] = pg.kcodes + static_cast<std::ptrdiff_t>(j + t) * rb;
    if (j + 2 * T <= ntok) {  // the next block's entries: L2 misses overlap this block's adds
      const std::uint8_t* next[T];
      for (int t = 0; t < T; ++t) next[t] = rows[t] + T * rb;
      cq_walk<CB, T>(next, rb, pg.kgroups, base, nq, [](int, const float* e) { __builtin_prefetch(e, 0, 3); });
    }
    V acc[T];
    for (int t = 0; t < T; ++t) acc[t] = W::zero();
    cq_walk<CB, T>(rows, rb, pg.kgroups, base, nq, [&](int t, const float* e) { acc[t] = W::add(acc[t], W::load(e)); });
    for (int t = 0; t < T; ++t) W::store(out[t], acc[t]);
    for (int r = 0; r < W::kW; ++r)
      for (int t = 0; t < T; ++t) s[static_cast<std::ptrdiff_t>(r0 + r) * ntok + j + t] = out[t][r];
  }
  for (; j < ntok; ++j) {
    const std::uint8_t* rows[1] = {pg.kcodes + static_cast<std::ptrdiff_t>(j) * rb};
    V acc = W::zero();
    cq_walk<CB, 1>(rows, rb, pg.kgroups, base, nq, [&](int, const float* e) { acc = W::add(acc, W::load(e)); });
    W::store(out[0], acc);
    for (int r = 0; r < W::kW; ++r) s[static_cast<std::ptrdiff_t>(r0 + r) * ntok + j] = out[0][r];
  }
}

// Runs Chunk<W>::run(r0, args...) over the row chunks of nq: 8s, then a 4, a 2, a 1.
template <template <class> class Chunk, class... A>
inline void cq_row_chunks(int nq, A&&... a) noexcept {
  int r0 = 0;
  for (; r0 + 8 <= nq; r0 += 8) Chunk<CqW8>::run(r0, a...);
  if (r0 + 4 <= nq) Chunk<CqW4>::run(r0, a...), r0 += 4;
  if (r0 + 2 <= nq) Chunk<CqW2>::run(r0, a...), r0 += 2;
  if (r0 < nq) Chunk<CqW1>::run(r0, a...);
}

template <int CB>
struct CqScoresRun {
  template <class W>
  struct Chunk {
    static void run(int r0, int nq, const CqPage& pg, const float* score, int ntok, float* s) noexcept {
      cq_scores_chunk<CB, W>(nq, r0, pg, score, ntok, s);
    }
  };
};

// ---- Group-major walk for 8-bit codes (256-entry tables) on long pages ----
// At 256 centroids a table is [groups][256][nq] floats: 128 KB for head_dim 128, C = 4 and
// nq = 4, above L1, so the token-major walk above pays an L2 access per (token, group) on
// each side. Here a page is walked 4 groups at a time over a tile of kGmTile tokens: the 4
// groups' table slices (16 KB at nq = 4) stay in L1 while every token of the tile reads
// them, and the per-token partial sums (or probabilities) are an L1 buffer instead. Each
// table line then comes from L2 once per tile and pass instead of once per token. Pages
// shorter than kGmMin tokens keep the token-major walk, since a pass streams its slices
// whether 1 token or 256 read them (recipes' group=, docs/cq.md "Speed").
// Measured on Sapphire Rapids, attend_cq at head_dim 128, nq 4, codes spread over all 256
// centroids: 32-token pages 62.8 (C 4, B 2) and 30.8 (C 8, B 1) ns per token, 256-token
// pages 39.2 and 22.0.
// Per row the additions keep the scalar order (groups in order for a logit, tokens in order
// for a weight), so the results stay bit-identical to the scalar table.
constexpr int kGmTile = 256;
constexpr int kGmMin = 128;

// Groups per pass: 4 keeps a pass's slices (16 KB at nq = 4) well inside a 32 KB L1. 8 was
// 9% faster on Sapphire Rapids (48 KB L1) but fills a 32 KB one (Zen 1-4).
constexpr int kGmPass = 4;

// The kGmPass codes of a pass (bytes p[0..kGmPass)) as one word.
inline std::uint64_t cq_pass_codes(const std::uint8_t* p) noexcept {
  if constexpr (kGmPass == 8) {
    std::uint64_t c;
    __builtin_memcpy(&c, p, 8);
    return c;
  } else {
    std::uint32_t c;
    __builtin_memcpy(&c, p, 4);
    return c;
  }
}

// NQ > 0: nq known at compile time (decode's 4 and 8 rows), so an entry's offset is a shift.
template <class W, int NQ = 0>
void cq_scores_gm(int nq_, int r0, const CqPage& pg, const float* score, int ntok, float* s) noexcept {
  using V = typename W::V;
  const std::ptrdiff_t nq = NQ > 0 ? NQ : nq_;
  const int groups = pg.kgroups;
  const int rb = groups;  // one byte per code
  const std::ptrdiff_t gs = static_cast<std::ptrdiff_t>(nq) << 8;
  alignas(32) float acc[kGmTile][W::kW];  // W::kW wide, not 8: Zen 2's L1 is 32 KB
  for (int j0 = 0; j0 < ntok; j0 += kGmTile) {
    const int nj = ntok - j0 < kGmTile ? ntok - j0 : kGmTile;
    const std::uint8_t* codes = pg.kcodes + static_cast<std::ptrdiff_t>(j0) * rb;
    for (int g = 0; g < groups; g += kGmPass) {
      const float* t0 = score + r0 + g * gs;
      if (g + kGmPass <= groups) {
        for (int j = 0; j < nj; ++j) {
          const std::uint64_t c = cq_pass_codes(codes + static_cast<std::ptrdiff_t>(j) * rb + g);
          V a = g == 0 ? W::zero() : W::load(acc[j]);
#pragma GCC unroll 8
          for (int h = 0; h < kGmPass; ++h)
            a = W::add(a, W::load(t0 + h * gs + static_cast<std::ptrdiff_t>((c >> (8 * h)) & 255u) * nq));
          W::store(acc[j], a);
        }
      } else {
        for (int j = 0; j < nj; ++j) {
          const std::uint8_t* c = codes + static_cast<std::ptrdiff_t>(j) * rb;
          V a = g == 0 ? W::zero() : W::load(acc[j]);
          for (int h = g; h < groups; ++h) a = W::add(a, W::load(t0 + (h - g) * gs + static_cast<std::ptrdiff_t>(c[h]) * nq));
          W::store(acc[j], a);
        }
      }
    }
    for (int r = 0; r < W::kW; ++r) {
      float* sr = s + static_cast<std::ptrdiff_t>(r0 + r) * ntok + j0;
      for (int j = 0; j < nj; ++j) sr[j] = acc[j][r];
    }
  }
}

struct CqScoresGm {
  template <class W>
  struct Chunk {
    static void run(int r0, int nq, const CqPage& pg, const float* score, int ntok, float* s) noexcept {
      cq_scores_gm<W>(nq, r0, pg, score, ntok, s);
    }
  };
};

template <int CB>
void cq_scores_cb(int nq, const CqPage& pg, const CqTables& t, int ntok, float* s) noexcept {
  if (CB == 8 && ntok >= kGmMin) {
    if (nq == 4) return cq_scores_gm<CqW4, 4>(4, 0, pg, t.score, ntok, s);
    if (nq == 8) return cq_scores_gm<CqW8, 8>(8, 0, pg, t.score, ntok, s);
    return cq_row_chunks<CqScoresGm::Chunk>(nq, nq, pg, t.score, ntok, s);
  }
  cq_row_chunks<CqScoresRun<CB>::template Chunk>(nq, nq, pg, t.score, ntok, s);
}

void cq_scores_k(int nq, const CqPage& pg, const CqTables& t, int ntok, float* s) noexcept {
  switch (pg.kcbits) {
    case 4: return cq_scores_cb<4>(nq, pg, t, ntok, s);
    case 8: return cq_scores_cb<8>(nq, pg, t, ntok, s);
    default: return cq_scores_g(nq, pg, t, ntok, s);
  }
}

// pt[j][r] = p[r0 + r][j0 + j] for the W rows of a chunk (0 for rows with use[r] = 0).
template <int W>
inline void cq_transpose_probs(const float* p, int ntok, int r0, int j0, int nj, const bool* use, float (*pt)[8]) noexcept {
  for (int r = 0; r < W; ++r) {
    const float* pr = p + static_cast<std::ptrdiff_t>(r0 + r) * ntok + j0;
    if (use[r0 + r])
      for (int j = 0; j < nj; ++j) pt[j][r] = pr[j];
    else
      for (int j = 0; j < nj; ++j) pt[j][r] = 0.0f;
  }
}

// weight[g][code_jg][r] += p[r][j] for rows [r0, r0 + W::kW): the rows' probabilities of a
// token transposed into one vector (rows with use[r] = 0 as 0, i.e. skipped), then one
// load-add-store per value group. Tokens whose vector is all 0 (masked) are skipped.
template <int CB, class W>
void cq_accum_chunk(const float* p, int nq, int r0, const CqPage& pg, float* weight, const bool* use,
                    int ntok) noexcept {
  using V = typename W::V;
  constexpr int kJ = 64;     // tokens transposed at once
  constexpr int kAhead = 2;  // prefetch distance in tokens
  const int rb = row_bytes(pg.vgroups, CB);
  float* base = weight + r0;
  alignas(32) float pt[kJ][8];
  for (int j0 = 0; j0 < ntok; j0 += kJ) {
    const int nj = ntok - j0 < kJ ? ntok - j0 : kJ;
    cq_transpose_probs<W::kW>(p, ntok, r0, j0, nj, use, pt);
    for (int j = 0; j < nj; ++j) {
      const V pv = W::load(pt[j]);
      if (W::none(pv)) continue;  // masked slots add nothing
      const std::uint8_t* rows[1] = {pg.vcodes + static_cast<std::ptrdiff_t>(j0 + j) * rb};
      if (j + kAhead < nj) {  // a later token's entries, for writing: the misses overlap
        const std::uint8_t* later[1] = {rows[0] + kAhead * rb};
        cq_walk<CB, 1>(later, rb, pg.vgroups, base, nq, [](int, float* e) { __builtin_prefetch(e, 1, 3); });
      }
      cq_walk<CB, 1>(rows, rb, pg.vgroups, base, nq, [&](int, float* e) { W::store(e, W::add(W::load(e), pv)); });
    }
  }
}

// weight[g][code_jg][r] += p[r][j], group-major (cq_scores_gm): the tile's live tokens'
// probability vectors are transposed once, then each pass of 4 groups adds them into the
// 4 groups' L1-resident slices, tokens in order.
template <class W, int NQ = 0>
void cq_accum_gm(const float* p, int nq_, int r0, const CqPage& pg, float* weight, const bool* use, int ntok) noexcept {
  using V = typename W::V;
  const std::ptrdiff_t nq = NQ > 0 ? NQ : nq_;
  const int groups = pg.vgroups;
  const int rb = groups;
  const std::ptrdiff_t gs = static_cast<std::ptrdiff_t>(nq) << 8;
  alignas(32) float pt[kGmTile][8];
  int live[kGmTile];
  for (int j0 = 0; j0 < ntok; j0 += kGmTile) {
    const int nj = ntok - j0 < kGmTile ? ntok - j0 : kGmTile;
    cq_transpose_probs<W::kW>(p, ntok, r0, j0, nj, use, pt);
    int nl = 0;
    for (int j = 0; j < nj; ++j)
      if (!W::none(W::load(pt[j]))) live[nl++] = j;  // masked slots add nothing
    const std::uint8_t* codes = pg.vcodes + static_cast<std::ptrdiff_t>(j0) * rb;
    for (int g = 0; g < groups; g += kGmPass) {
      float* t0 = weight + r0 + g * gs;
      if (g + kGmPass <= groups) {
        for (int i = 0; i < nl; ++i) {
          const int j = live[i];
          const std::uint64_t c = cq_pass_codes(codes + static_cast<std::ptrdiff_t>(j) * rb + g);
          const V pv = W::load(pt[j]);
#pragma GCC unroll 8
          for (int h = 0; h < kGmPass; ++h) {
            float* e = t0 + h * gs + static_cast<std::ptrdiff_t>((c >> (8 * h)) & 255u) * nq;
            W::store(e, W::add(W::load(e), pv));
          }
        }
      } else {
        for (int i = 0; i < nl; ++i) {
          const int j = live[i];
          const std::uint8_t* c = codes + static_cast<std::ptrdiff_t>(j) * rb;
          const V pv = W::load(pt[j]);
          for (int h = g; h < groups; ++h) {
            float* e = t0 + (h - g) * gs + static_cast<std::ptrdiff_t>(c[h]) * nq;
            W::store(e, W::add(W::load(e), pv));
          }
        }
      }
    }
  }
}

struct CqAccumGm {
  template <class W>
  struct Chunk {
    static void run(int r0, const float* p, int nq, const CqPage& pg, float* weight, const bool* use,
                    int ntok) noexcept {
      cq_accum_gm<W>(p, nq, r0, pg, weight, use, ntok);
    }
  };
};

template <int CB>
struct CqAccumRun {
  template <class W>
  struct Chunk {
    static void run(int r0, const float* p, int nq, const CqPage& pg, float* weight, const bool* use,
                    int ntok) noexcept {
      cq_accum_chunk<CB, W>(p, nq, r0, pg, weight, use, ntok);
    }
  };
};

// cq_rebase for every row at once: one pass over the table multiplying each row by its
// factor (1 for rows that keep their max: x * 1 = x, so the result is the scalar one).
inline void cq_rebase_all(const CqTables& t, int nq, const float* m, std::ptrdiff_t entries, bool* use) noexcept {
  constexpr int kMaxRows = 256;
  float f[kMaxRows];
  bool any = false;
  for (int r = 0; r < nq; ++r) {
    use[r] = m[r] != -__builtin_inff();
    f[r] = 1.0f;
    if (use[r] && t.wmax[r] != m[r]) {
      if (t.wmax[r] != -__builtin_inff()) {
        f[r] = __builtin_expf(t.wmax[r] - m[r]);
        any = any || f[r] != 1.0f;
      }
      t.wmax[r] = m[r];
    }
  }
  if (!any) return;
  if (nq == 4) {
    const __m128 fv = _mm_loadu_ps(f);
    for (std::ptrdiff_t e = 0; e < entries; ++e) _mm_storeu_ps(t.weight + 4 * e, _mm_mul_ps(_mm_loadu_ps(t.weight + 4 * e), fv));
  } else if (nq == 8) {
    const __m256 fv = _mm256_loadu_ps(f);
    for (std::ptrdiff_t e = 0; e < entries; ++e)
      _mm256_storeu_ps(t.weight + 8 * e, _mm256_mul_ps(_mm256_loadu_ps(t.weight + 8 * e), fv));
  } else {
    for (std::ptrdiff_t e = 0; e < entries; ++e)
      for (int r = 0; r < nq; ++r) t.weight[e * nq + r] *= f[r];
  }
}

template <int CB>
void cq_accum_cb(const float* p, int nq, const CqPage& pg, const CqTables& t, const float* m, int ntok) noexcept {
  bool use[256];
  cq_rebase_all(t, nq, m, static_cast<std::ptrdiff_t>(pg.vgroups) << CB, use);
  if (CB == 8 && ntok >= kGmMin) {
    if (nq == 4) return cq_accum_gm<CqW4, 4>(p, 4, 0, pg, t.weight, use, ntok);
    if (nq == 8) return cq_accum_gm<CqW8, 8>(p, 8, 0, pg, t.weight, use, ntok);
    return cq_row_chunks<CqAccumGm::Chunk>(nq, p, nq, pg, t.weight, use, ntok);
  }
  cq_row_chunks<CqAccumRun<CB>::template Chunk>(nq, p, nq, pg, t.weight, use, ntok);
}

void cq_accum_k(const float* p, int nq, const CqPage& pg, const CqTables& t, const float* m, int ntok) noexcept {
  if (nq > 256) return cq_accum_g(p, nq, pg, t, m, ntok);
  switch (pg.vcbits) {
    case 4: return cq_accum_cb<4>(p, nq, pg, t, m, ntok);
    case 8: return cq_accum_cb<8>(p, nq, pg, t, m, ntok);
    default: return cq_accum_g(p, nq, pg, t, m, ntok);
  }
}

// The direct value paths' token gather: for the tokens [j0, j0 + nj) whose probabilities
// in the 4 rows are not all 0 (masked slots add nothing), put(n, pj) gets the n-th such
// token's 4 probabilities and live[n] its index in the tile. Returns how many there are.
template <class Put>
inline int cq_live4(const float* p, int ntok, int j0, int nj, int* live, Put put) noexcept {
  int nl = 0;
  for (int j = 0; j < nj; ++j) {
    const __m128 pj = _mm_setr_ps(p[j0 + j], p[ntok + j0 + j], p[2 * ntok + j0 + j], p[3 * ntok + j0 + j]);
    if (_mm_movemask_ps(_mm_cmpneq_ps(pj, _mm_setzero_ps())) == 0) continue;
    put(nl, pj);
    live[nl++] = j;
  }
  return nl;
}

// The walk the direct value paths with a pass function share: tiles of kGmTile tokens, whose
// live tokens and probabilities (4 floats each) are gathered once, then passes of NG groups
// and single groups over them. pass(std::integral_constant<int, n>, pp, live, nl, codes,
// rb, centroids, o) handles n groups from `codes` on (their 256-centroid slices of C
// channels at `centroids`, their output channels at `o`).
template <int C, int NG, class Pass>
inline void cq_direct_walk(const float* p, const CqPage& pg, const float* vcen, int ntok, float* o,
                           Pass&& pass) noexcept {
  constexpr int kCount = 256;
  const int groups = pg.vgroups, rb = groups;
  alignas(16) float pp[kGmTile][4];
  int live[kGmTile];
  for (int j0 = 0; j0 < ntok; j0 += kGmTile) {
    const int nj = ntok - j0 < kGmTile ? ntok - j0 : kGmTile;
    const int nl = cq_live4(p, ntok, j0, nj, live, [&](int n, __m128 pj) { _mm_store_ps(pp[n], pj); });
    const std::uint8_t* codes = pg.vcodes + static_cast<std::ptrdiff_t>(j0) * rb;
    int g = 0;
    for (; g + NG <= groups; g += NG)
      pass(std::integral_constant<int, NG>{}, pp, live, nl, codes + g, rb,
           vcen + static_cast<std::ptrdiff_t>(g) * kCount * C, o + g * C);
    for (; g < groups; ++g)
      pass(std::integral_constant<int, 1>{}, pp, live, nl, codes + g, rb,
           vcen + static_cast<std::ptrdiff_t>(g) * kCount * C, o + g * C);
  }
}

#if defined(__AVX512F__)
// The value side straight into o (kernel_table.h, attend_cq) at 256 centroids of 4 channels
// and 4 rows: one zmm holds a group's 4 rows x 4 channels, so a (token, group) is one
// 4-float centroid broadcast and one FMA with the token's probabilities laid out as
// [p0 x4 | p1 x4 | p2 x4 | p3 x4], and nothing is stored per token. Group-major like
// cq_accum_gm (a pass's 4 centroid slices are 16 KB), two accumulators per group for the
// FMA latency. Versus the weight table: 128 KB read and written at random per token (the
// 4-group passes' RMW) becomes 128 KB of centroids read.
void cq_accum_direct4(const float* p, const CqPage& pg, const float* vcen, int ntok, float* o, int d) noexcept {
  constexpr int kNq = 4, kC = 4, kCount = 256;
  const int groups = pg.vgroups, rb = groups;
  alignas(64) float pp[kGmTile][16];
  int live[kGmTile];
  const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  for (int j0 = 0; j0 < ntok; j0 += kGmTile) {
    const int nj = ntok - j0 < kGmTile ? ntok - j0 : kGmTile;
    const int nl = cq_live4(p, ntok, j0, nj, live, [&](int n, __m128 pj) {
      _mm512_store_ps(pp[n], _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(pj)));
    });
    const std::uint8_t* codes = pg.vcodes + static_cast<std::ptrdiff_t>(j0) * rb;
    for (int g = 0; g < groups; g += 4) {
      const int ng = groups - g < 4 ? groups - g : 4;
      const float* c0 = vcen + static_cast<std::ptrdiff_t>(g) * kCount * kC;
      __m512 a[4], b[4];
      for (int h = 0; h < 4; ++h) a[h] = b[h] = _mm512_setzero_ps();
      const auto add = [&](auto kNg, __m512* acc, int i) {
        const int n = decltype(kNg)::value > 0 ? decltype(kNg)::value : ng;
        const std::uint8_t* c = codes + static_cast<std::ptrdiff_t>(live[i]) * rb + g;
        const __m512 pv = _mm512_load_ps(pp[i]);
        for (int h = 0; h < n; ++h)
          acc[h] = _mm512_fmadd_ps(pv, _mm512_broadcast_f32x4(_mm_loadu_ps(c0 + (h * kCount + c[h]) * kC)), acc[h]);
      };
      const auto run = [&](auto kNg) {
        int i = 0;
        for (; i + 2 <= nl; i += 2) add(kNg, a, i), add(kNg, b, i + 1);
        if (i < nl) add(kNg, a, i);
      };
      if (ng == 4)
        run(std::integral_constant<int, 4>{});
      else
        run(std::integral_constant<int, 0>{});
      for (int h = 0; h < ng; ++h) {
        alignas(64) float r[16];
        _mm512_store_ps(r, _mm512_add_ps(a[h], b[h]));
        for (int q = 0; q < kNq; ++q) {
          float* orow = o + static_cast<std::ptrdiff_t>(q) * d + (g + h) * kC;
          _mm_storeu_ps(orow, _mm_add_ps(_mm_loadu_ps(orow), _mm_load_ps(r + 4 * q)));
        }
      }
    }
  }
}

// The same for 8 channels per group (cq1: C 8, B 1), AVX-512 only: a zmm holds 2 rows x 8
// channels, so a (token, group) is one 8-float centroid broadcast to both halves and two FMAs
// with [p0 x8 | p1 x8] and [p2 x8 | p3 x8]. Passes of 2 groups (16 KB of centroids) with the
// tokens taken in pairs keep 8 accumulators; the weight table it replaces cost a 4-float
// read-modify-write per (token, group) plus cq_finish.
template <int NG>
inline void cq_direct8_pass(const float (*pp)[4], const int* live, int nl, const std::uint8_t* codes, int rb,
                            const float* c0, float* o, int d) noexcept {
  constexpr int kC = 8, kCount = 256;
  const __m512i s01 = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  const __m512i s23 = _mm512_setr_epi32(2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  __m512 a[2][NG], b[2][NG];  // [token parity][group]: rows 0-1 and rows 2-3
  for (int u = 0; u < 2; ++u)
    for (int h = 0; h < NG; ++h) a[u][h] = b[u][h] = _mm512_setzero_ps();
  const auto add = [&](int u, int i) {
    const std::uint8_t* c = codes + static_cast<std::ptrdiff_t>(live[i]) * rb;
    const __m512 pb = _mm512_castps128_ps512(_mm_load_ps(pp[i]));
    const __m512 p01 = _mm512_permutexvar_ps(s01, pb), p23 = _mm512_permutexvar_ps(s23, pb);
#pragma GCC unroll 2
    for (int h = 0; h < NG; ++h) {
      const __m512 cen = _mm512_broadcast_f32x8(_mm256_loadu_ps(c0 + (h * kCount + c[h]) * kC));
      a[u][h] = _mm512_fmadd_ps(p01, cen, a[u][h]);
      b[u][h] = _mm512_fmadd_ps(p23, cen, b[u][h]);
    }
  };
  int i = 0;
  for (; i + 2 <= nl; i += 2) {
    add(0, i);
    add(1, i + 1);
  }
  if (i < nl) add(0, i);
  for (int h = 0; h < NG; ++h) {
    const __m512 x = _mm512_add_ps(a[0][h], a[1][h]), y = _mm512_add_ps(b[0][h], b[1][h]);
    const __m256 v[4] = {_mm512_castps512_ps256(x), _mm512_extractf32x8_ps(x, 1), _mm512_castps512_ps256(y),
                         _mm512_extractf32x8_ps(y, 1)};
    for (int q = 0; q < 4; ++q) {
      float* r = o + static_cast<std::ptrdiff_t>(q) * d + h * kC;
      _mm256_storeu_ps(r, _mm256_add_ps(_mm256_loadu_ps(r), v[q]));
    }
  }
}

void cq_accum_direct8(const float* p, const CqPage& pg, const float* vcen, int ntok, float* o, int d) noexcept {
  cq_direct_walk<8, 2>(p, pg, vcen, ntok, o, [d](auto ng, auto&&... a) { cq_direct8_pass<decltype(ng)::value>(a..., d); });
}
constexpr bool kCqDirect8 = true;
#else
constexpr bool kCqDirect8 = false;
void cq_accum_direct8(const float*, const CqPage&, const float*, int, float*, int) noexcept {}
// One pass of cq_accum_direct4 over groups [g, g + NG): its accumulators are locals of this
// function (in a lambda capturing them GCC stored all 8 to the stack on every token).
template <int NG>
inline void cq_direct4_pass(const float (*pp)[4], const int* live, int nl, const std::uint8_t* codes, int rb,
                            const float* c0, float* o, int d) noexcept {
  constexpr int kC = 4, kCount = 256;
  const __m256i s01 = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1), s23 = _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3);
  __m256 a[NG], b[NG];  // rows 0-1 and rows 2-3 of each group
  for (int h = 0; h < NG; ++h) a[h] = b[h] = _mm256_setzero_ps();
  for (int i = 0; i < nl; ++i) {
    const std::uint8_t* c = codes + static_cast<std::ptrdiff_t>(live[i]) * rb;
    // The 4 probabilities as [p0 x4 | p1 x4] and [p2 x4 | p3 x4], spread here rather than
    // stored spread: 4 KB of probabilities per tile instead of 16 KB keeps the tile, its
    // codes and the pass's 16 KB of centroids inside Zen 2's 32 KB L1.
    const __m256 pb = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(pp[i]));
    const __m256 p01 = _mm256_permutevar_ps(pb, s01), p23 = _mm256_permutevar_ps(pb, s23);
#pragma GCC unroll 4
    for (int h = 0; h < NG; ++h) {
      const __m256 cen = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(c0 + (h * kCount + c[h]) * kC));
      a[h] = _mm256_fmadd_ps(p01, cen, a[h]);
      b[h] = _mm256_fmadd_ps(p23, cen, b[h]);
    }
  }
  for (int h = 0; h < NG; ++h) {
    const __m128 v[4] = {_mm256_castps256_ps128(a[h]), _mm256_extractf128_ps(a[h], 1), _mm256_castps256_ps128(b[h]),
                         _mm256_extractf128_ps(b[h], 1)};
    for (int q = 0; q < 4; ++q) {
      float* x = o + static_cast<std::ptrdiff_t>(q) * d + h * kC;
      _mm_storeu_ps(x, _mm_add_ps(_mm_loadu_ps(x), v[q]));
    }
  }
}

// The AVX2 form of the direct value path: a ymm holds 2 rows x 4 channels of a group, so a
// (token, group) is one 4-float centroid broadcast and two FMAs with [p0 x4 | p1 x4] and
// [p2 x4 | p3 x4]. A pass of 4 groups keeps 8 accumulators. On Zen 2 the weight table's
// read-modify-write cost about 2.4 cycles per (token, group) plus cq_finish.
void cq_accum_direct4(const float* p, const CqPage& pg, const float* vcen, int ntok, float* o, int d) noexcept {
  cq_direct_walk<4, 4>(p, pg, vcen, ntok, o, [d](auto ng, auto&&... a) { cq_direct4_pass<decltype(ng)::value>(a..., d); });
}
#endif

void attend_cq_k(int nq, const CqPage& pg, const CqTables& t, int ntok, int d, const BlockMask& mask,
                 OnlineState& st) noexcept {
  if (t.vcen && (t.vchannels == 4 || (kCqDirect8 && t.vchannels == 8)) && pg.vcbits == 8 && nq == 4 &&
      ntok >= kGmMin) {
    const auto direct = t.vchannels == 4 ? cq_accum_direct4 : cq_accum_direct8;
    fused_block(
        nq, ntok, mask, st, [&](float* s) { cq_scores_k(nq, pg, t, ntok, s); },
        [&](float* s, float* m, float* l, float* o) { softmax_block_k(s, nq, ntok, m, l, o, d); },
        [&](const float* p, float* o) { direct(p, pg, t.vcen, ntok, o, d); });
    return;
  }
  fused_block(
      nq, ntok, mask, st, [&](float* s) { cq_scores_k(nq, pg, t, ntok, s); },
      [&](float* s, float* m, float* l, float* o) { softmax_block_k(s, nq, ntok, m, l, o, d); },
      [&](const float* p, float*) { cq_accum_k(p, nq, pg, t, st.m, ntok); });
}

// ---- Per-call tables and the final centroid product ----
// Both run once per attend call and kv head, over every (group, code): at 256 centroids that
// is 8192 entries per head, and the plain C++ loops (rows and channels innermost, the
// zero-weight test per entry) cost as much as 10K tokens of cq_scores. Here the nq = 4 or
// 8 rows of an entry are one vector: a table entry is C broadcast-FMAs against the query's
// channels transposed per group, and the finish sums weight-vector x centroid-channel
// products per group before scaling a row once. Other nq fall back to the plain loops.
// FMA contraction is within kernel_table.h's 1e-6 of the sum of |terms|.
template <class W>
void cq_tables_w(const float* q, const float* centroids, int groups, int count, int C, float* score) noexcept {
  using V = typename W::V;
  constexpr int kNq = W::kW;
  const int d = groups * C;
  for (int g = 0; g < groups; ++g) {
    V qc[8];
    for (int c = 0; c < C; ++c) {
      alignas(32) float col[8];
      for (int r = 0; r < kNq; ++r) col[r] = q[static_cast<std::ptrdiff_t>(r) * d + g * C + c];
      qc[c] = W::load(col);
    }
    const float* cen = centroids + static_cast<std::ptrdiff_t>(g) * count * C;
    float* out = score + static_cast<std::ptrdiff_t>(g) * count * kNq;
    for (int k = 0; k < count; ++k, cen += C, out += kNq) {
      V acc = W::mul(W::set1(cen[0]), qc[0]);
      for (int c = 1; c < C; ++c) acc = W::fmadd(W::set1(cen[c]), qc[c], acc);
      W::store(out, acc);
    }
  }
}

void cq_tables_k(const float* q, int nq, const float* centroids, int groups, int count, int C,
                 float* score) noexcept {
  if (nq == 4) return cq_tables_w<CqW4>(q, centroids, groups, count, C, score);
  if (nq == 8) return cq_tables_w<CqW8>(q, centroids, groups, count, C, score);
  cq_tables_g(q, nq, centroids, groups, count, C, score);
}

template <class W>
void cq_finish_w(float* weight, float* wmax, const float* m, const float* centroids, int groups, int count, int C,
                 float* o, int d) noexcept {
  using V = typename W::V;
  constexpr int kNq = W::kW;
  bool any = false;
  alignas(32) float f[8];
  for (int r = 0; r < kNq; ++r) {
    f[r] = wmax[r] == -__builtin_inff() ? 0.0f : __builtin_expf(wmax[r] - m[r]);
    any = any || wmax[r] != -__builtin_inff();
  }
  if (!any) return;
  for (int g = 0; g < groups; ++g) {
    V acc[8];
    for (int c = 0; c < C; ++c) acc[c] = W::zero();
    float* w = weight + static_cast<std::ptrdiff_t>(g) * count * kNq;
    const float* cen = centroids + static_cast<std::ptrdiff_t>(g) * count * C;
    for (int k = 0; k < count; ++k, w += kNq, cen += C) {
      const V wk = W::load(w);
      for (int c = 0; c < C; ++c) acc[c] = W::fmadd(wk, W::set1(cen[c]), acc[c]);
      W::store(w, W::zero());
    }
    for (int c = 0; c < C; ++c) {
      alignas(32) float a[8];
      W::store(a, acc[c]);
      for (int r = 0; r < kNq; ++r)
        if (wmax[r] != -__builtin_inff()) o[static_cast<std::ptrdiff_t>(r) * d + g * C + c] += f[r] * a[r];
    }
  }
  for (int r = 0; r < kNq; ++r) wmax[r] = -__builtin_inff();
}

void cq_finish_k(float* weight, float* wmax, const float* m, int nq, const float* centroids, int groups, int count,
                 int C, float* o, int d) noexcept {
  if (nq == 4) return cq_finish_w<CqW4>(weight, wmax, m, centroids, groups, count, C, o, d);
  if (nq == 8) return cq_finish_w<CqW8>(weight, wmax, m, centroids, groups, count, C, o, d);
  cq_finish_g(weight, wmax, m, nq, centroids, groups, count, C, o, d);
}

// ---- Encoding: the nearest centroid per group, 8 centroids at a time ----
// The centroids are [count][C] per group; 8 of them are transposed in registers into one
// vector per channel (unpack + shuffle: centroid lanes in the order 0 2 4 6 | 1 3 5 7, which
// the index vector follows), then each lane sums its squared differences in channel order
// with the same rounding as the scalar loop (cq_sq_add's barrier against FMA contraction),
// keeping the first minimum per lane; the lanes' minima are merged lowest index first. So
// the codes equal the scalar table's. C = 4 and 8 with 16 or 256 centroids (every recipe in
// docs/cq.md but C = 2); other shapes run cq_encode_g.
inline __m256 cq_sq_add8(__m256 acc, __m256 t) noexcept {
  __m256 sq = _mm256_mul_ps(t, t);
  asm("" : "+x"(sq));
  return _mm256_add_ps(acc, sq);
}

// Channels 0-3 of 8 rows whose 4-channel parts are at p + i * stride (floats), i = 0..7,
// transposed: ch[c] lane l = row (0 2 4 6 1 3 5 7)[l], channel c.
inline void cq_transpose8x4(const float* p, int stride, __m256 ch[4]) noexcept {
  const auto pair = [&](int i) {
    return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(p + i * stride)), _mm_loadu_ps(p + (i + 1) * stride), 1);
  };
  const __m256 r0 = pair(0), r1 = pair(2), r2 = pair(4), r3 = pair(6);  // (0|1) (2|3) (4|5) (6|7)
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  ch[0] = _mm256_shuffle_ps(t0, t2, 0x44);
  ch[1] = _mm256_shuffle_ps(t0, t2, 0xEE);
  ch[2] = _mm256_shuffle_ps(t1, t3, 0x44);
  ch[3] = _mm256_shuffle_ps(t1, t3, 0xEE);
}

template <int C>
unsigned cq_nearest8(const float* x, const float* cen, int count) noexcept {
  __m256 xb[C];
  for (int c = 0; c < C; ++c) xb[c] = _mm256_set1_ps(x[c]);
  __m256 bd = _mm256_set1_ps(__builtin_inff());
  __m256i bi = _mm256_setzero_si256();
  __m256i idx = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  const __m256i step = _mm256_set1_epi32(8);
  for (int k = 0; k < count; k += 8, idx = _mm256_add_epi32(idx, step)) {
    __m256 ch[C];
    for (int h = 0; h < C; h += 4) cq_transpose8x4(cen + static_cast<std::ptrdiff_t>(k) * C + h, C, ch + h);
    __m256 dk = _mm256_setzero_ps();
    for (int c = 0; c < C; ++c) dk = cq_sq_add8(dk, _mm256_sub_ps(xb[c], ch[c]));
    const __m256 lt = _mm256_cmp_ps(dk, bd, _CMP_LT_OQ);
    bd = _mm256_blendv_ps(bd, dk, lt);
    bi = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(bi), _mm256_castsi256_ps(idx), lt));
  }
  alignas(32) float d[8];
  alignas(32) std::int32_t i[8];
  _mm256_store_ps(d, bd);
  _mm256_store_si256(reinterpret_cast<__m256i*>(i), bi);
  unsigned best = static_cast<unsigned>(i[0]);
  float b = d[0];
  for (int l = 1; l < 8; ++l)
    if (d[l] < b || (d[l] == b && static_cast<unsigned>(i[l]) < best)) b = d[l], best = static_cast<unsigned>(i[l]);
  return best;
}

void cq_encode_k(const float* x, const float* centroids, int groups, int count, int C, std::uint8_t* row) noexcept {
  if ((C != 4 && C != 8) || count < 8) return cq_encode_g(x, centroids, groups, count, C, row);
  const int cbits = __builtin_ctz(static_cast<unsigned>(count));
  for (int g = 0; g < groups; ++g) {
    const float* cen = centroids + static_cast<std::ptrdiff_t>(g) * count * C;
    const unsigned code = C == 4 ? cq_nearest8<4>(x + g * C, cen, count) : cq_nearest8<8>(x + g * C, cen, count);
    cq_put_code(row, g, cbits, code);
  }
}
