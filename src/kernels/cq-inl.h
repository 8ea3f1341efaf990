// CQ kernels (kernel_table.h, "CQ") in plain C++: the scalar table's reference, and the
// generic fallback of the SIMD tables (compiled there with their ISA flags). Included by each
// kernel translation unit inside its own namespace, after block-inl.h; the unit defines
// KVSLIM_CQ_SOFTMAX as its softmax_block kernel.
//
// The tables are [group][code][row]: a token's score is a sum of one row-vector load per key
// group, and its value side one row-vector add per value group, so the work per token does
// not depend on the codebook size, and no vector is ever decoded.

// C·B is 1, 2, 4 or 8, so a code never straddles a byte.
inline unsigned cq_code(const std::uint8_t* row, int g, int cbits) noexcept {
  const int bit = g * cbits;
  return (static_cast<unsigned>(row[bit >> 3]) >> (bit & 7)) & ((1u << cbits) - 1u);
}

void cq_tables_g(const float* q, int nq, const float* centroids, int groups, int count, int C,
                 float* score) noexcept {
  for (int g = 0; g < groups; ++g)
    for (int k = 0; k < count; ++k) {
      const float* cen = centroids + (static_cast<std::ptrdiff_t>(g) * count + k) * C;
      float* out = score + (static_cast<std::ptrdiff_t>(g) * count + k) * nq;
      for (int r = 0; r < nq; ++r) {
        const float* qr = q + static_cast<std::ptrdiff_t>(r) * groups * C + g * C;
        float acc = 0.0f;
        for (int c = 0; c < C; ++c) acc += qr[c] * cen[c];
        out[r] = acc;
      }
    }
}

void cq_scores_g(int nq, const CqPage& pg, const CqTables& t, int ntok, float* s) noexcept {
  const int rb = row_bytes(pg.kgroups, pg.kcbits);
  const int count = 1 << pg.kcbits;
  float acc[64];
  for (int r0 = 0; r0 < nq; r0 += 64) {
    const int nr = nq - r0 < 64 ? nq - r0 : 64;
    for (int j = 0; j < ntok; ++j) {
      const std::uint8_t* row = pg.kcodes + static_cast<std::ptrdiff_t>(j) * rb;
      for (int r = 0; r < nr; ++r) acc[r] = 0.0f;
      for (int g = 0; g < pg.kgroups; ++g) {
        const float* e = t.score + (static_cast<std::ptrdiff_t>(g) * count + cq_code(row, g, pg.kcbits)) * nq + r0;
        for (int r = 0; r < nr; ++r) acc[r] += e[r];
      }
      for (int r = 0; r < nr; ++r) s[static_cast<std::ptrdiff_t>(r0 + r) * ntok + j] = acc[r];
    }
  }
}

// Brings row r of the weights to the running max m[r]; false if the row sees nothing yet.
inline bool cq_rebase(const CqTables& t, int nq, int r, float m, std::ptrdiff_t entries) noexcept {
  if (m == -__builtin_inff()) return false;
  if (t.wmax[r] != m) {
    if (t.wmax[r] != -__builtin_inff()) {
      const float f = __builtin_expf(t.wmax[r] - m);
      for (std::ptrdiff_t e = 0; e < entries; ++e) t.weight[e * nq + r] *= f;
    }
    t.wmax[r] = m;
  }
  return true;
}

void cq_accum_g(const float* p, int nq, const CqPage& pg, const CqTables& t, const float* m, int ntok) noexcept {
  const int rb = row_bytes(pg.vgroups, pg.vcbits);
  const int count = 1 << pg.vcbits;
  const std::ptrdiff_t entries = static_cast<std::ptrdiff_t>(pg.vgroups) * count;
  for (int r = 0; r < nq; ++r) {
    if (!cq_rebase(t, nq, r, m[r], entries)) continue;
    const float* pr = p + static_cast<std::ptrdiff_t>(r) * ntok;
    for (int j = 0; j < ntok; ++j) {
      if (pr[j] == 0.0f) continue;  // masked slots add nothing
      const std::uint8_t* row = pg.vcodes + static_cast<std::ptrdiff_t>(j) * rb;
      for (int g = 0; g < pg.vgroups; ++g)
        t.weight[(static_cast<std::ptrdiff_t>(g) * count + cq_code(row, g, pg.vcbits)) * nq + r] += pr[j];
    }
  }
}

[[maybe_unused]] void attend_cq_g(int nq, const CqPage& pg, const CqTables& t, int ntok, int d, const BlockMask& mask,
                 OnlineState& st) noexcept {
  fused_block(
      nq, ntok, mask, st, [&](float* s) { cq_scores_g(nq, pg, t, ntok, s); },
      [&](float* s, float* m, float* l, float* o) { KVSLIM_CQ_SOFTMAX(s, nq, ntok, m, l, o, d); },
      [&](const float* p, float*) { cq_accum_g(p, nq, pg, t, st.m, ntok); });
}

void cq_finish_g(float* weight, float* wmax, const float* m, int nq, const float* centroids, int groups, int count,
                 int C, float* o, int d) noexcept {
  for (int r = 0; r < nq; ++r) {
    if (wmax[r] == -__builtin_inff()) continue;
    const float f = __builtin_expf(wmax[r] - m[r]);
    float* orow = o + static_cast<std::ptrdiff_t>(r) * d;
    for (int g = 0; g < groups; ++g)
      for (int k = 0; k < count; ++k) {
        float& w = weight[(static_cast<std::ptrdiff_t>(g) * count + k) * nq + r];
        if (w == 0.0f) continue;
        const float wf = w * f;
        const float* cen = centroids + (static_cast<std::ptrdiff_t>(g) * count + k) * C;
        for (int c = 0; c < C; ++c) orow[g * C + c] += wf * cen[c];
        w = 0.0f;
      }
    wmax[r] = -__builtin_inff();
  }
}

// One squared-distance term added without FMA contraction: the empty asm makes t * t a
// finished value, so acc + t * t rounds twice on every ISA as in kvslim::nearest (built
// without FMA), and every table writes the same codes.
inline float cq_sq_add(float acc, float t) noexcept {
  float sq = t * t;
  asm("" : "+x"(sq));
  return acc + sq;
}

inline void cq_put_code(std::uint8_t* row, int g, int cbits, unsigned code) noexcept {
  const int bit = g * cbits;
  row[bit >> 3] = static_cast<std::uint8_t>(row[bit >> 3] | (code << (bit & 7)));
}

inline unsigned cq_nearest_g(const float* x, const float* cen, int count, int C) noexcept {
  unsigned best = 0;
  float bd = __builtin_inff();
  for (int k = 0; k < count; ++k) {
    float dk = 0.0f;
    for (int c = 0; c < C; ++c) dk = cq_sq_add(dk, x[c] - cen[k * C + c]);
    if (dk < bd) bd = dk, best = static_cast<unsigned>(k);
  }
  return best;
}

[[maybe_unused]] void cq_encode_g(const float* x, const float* centroids, int groups, int count, int C,
                                  std::uint8_t* row) noexcept {
  const int cbits = __builtin_ctz(static_cast<unsigned>(count));
  for (int g = 0; g < groups; ++g)
    cq_put_code(row, g, cbits, cq_nearest_g(x + g * C, centroids + static_cast<std::ptrdiff_t>(g) * count * C, count, C));
}
