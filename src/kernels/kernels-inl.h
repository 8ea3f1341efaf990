// Generic kernel bodies, written once against a small vector API of kL float lanes
// (vload/vstore/vfma/vhsum/vcodes/..., see avx2/simd_avx2.h and avx512/simd_avx512.h) and
// compiled by each ISA's translation unit inside its own anonymous namespace, so every copy
// has internal linkage and carries only its own ISA's instructions. No STL, no allocation,
// no printing; scratch lives on the stack (at most 64 KB, sized for head_dim <= 4096,
// which CacheConfig validation guarantees).
//
// Every entry follows kernel_table.h. Integer outputs (f16/bf16 bits, KIVI codes, scales,
// zero points) are bit-exact with the scalar table; float outputs differ from it only by
// the order of summation (and FMA's single rounding).
//
// Register blocking: scores keep kRB query rows x kTB tokens of partial dot products in kL
// vectors and reduce them with one transposed reduction (vhsum); accumulation keeps kRB rows
// x kCB vectors of the output in registers while streaming the page's tokens.

constexpr int kMaxD = 4096;     // head_dim bound (CacheConfig validation)
constexpr int kRB = 4;          // query rows per register block
constexpr int kTB = kL / kRB;   // tokens per register block in scores
static_assert(kRB * kTB == kL, "one vhsum reduces exactly kRB x kTB dot products");

inline int imin(int a, int b) noexcept { return a < b ? a : b; }
inline int rowb(int d, int bits) noexcept { return (d * bits + 7) / 8; }
inline std::ptrdiff_t off(int a, int b) noexcept { return static_cast<std::ptrdiff_t>(a) * b; }

// Scalar f16 through F16C: the same round-to-nearest-even as the vector conversions.
inline float h2f(std::uint16_t h) noexcept { return _cvtsh_ss(h); }
inline std::uint16_t f2h(float f) noexcept {
  return static_cast<std::uint16_t>(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// Element loaders for dense pages.
struct F32 {
  using T = float;
  static VF load(const float* p) noexcept { return vload(p); }
  static VF load_n(const float* p, int n) noexcept { return vload_n(p, n); }
};
struct F16 {
  using T = std::uint16_t;
  static VF load(const std::uint16_t* p) noexcept { return vload_h(p); }
  static VF load_n(const std::uint16_t* p, int n) noexcept { return vload_h_n(p, n); }
};
struct BF16 {
  using T = std::uint16_t;
  static VF load(const std::uint16_t* p) noexcept { return vload_b(p); }
  static VF load_n(const std::uint16_t* p, int n) noexcept { return vload_b_n(p, n); }
};

// Writes the nr x nt valid entries of a kRB x kTB block (lane r*kTB + t) to s[r*stride + t].
inline void store_block(float* s, int stride, VF res, int nr, int nt) noexcept {
  if (nr == kRB && nt == kTB) return vstore_block(s, stride, res);
  alignas(64) float t[kL];
  vstore(t, res);
  for (int r = 0; r < nr; ++r)
    for (int j = 0; j < nt; ++j) s[off(r, stride) + j] = t[r * kTB + j];
}

// --- dtype conversion ---
void f32_to_f16_k(const float* src, std::uint16_t* dst, std::size_t n) noexcept {
  std::size_t i = 0;
  for (; i + kL <= n; i += kL) vstore_h(dst + i, vload(src + i));
  if (i < n) {
    const int t = static_cast<int>(n - i);
    vstore_h_n(dst + i, vload_n(src + i, t), t);
  }
}
void f16_to_f32_k(const std::uint16_t* src, float* dst, std::size_t n) noexcept {
  std::size_t i = 0;
  for (; i + kL <= n; i += kL) vstore(dst + i, vload_h_exact(src + i));
  if (i < n) {
    const int t = static_cast<int>(n - i);
    vstore_n(dst + i, vload_h_exact_n(src + i, t), t);
  }
}
void f32_to_bf16_k(const float* src, std::uint16_t* dst, std::size_t n) noexcept {
  std::size_t i = 0;
  for (; i + kL <= n; i += kL) vstore_b(dst + i, vload(src + i));
  if (i < n) {
    const int t = static_cast<int>(n - i);
    vstore_b_n(dst + i, vload_n(src + i, t), t);
  }
}
void bf16_to_f32_k(const std::uint16_t* src, float* dst, std::size_t n) noexcept {
  std::size_t i = 0;
  for (; i + kL <= n; i += kL) vstore(dst + i, vload_b(src + i));
  if (i < n) {
    const int t = static_cast<int>(n - i);
    vstore_n(dst + i, vload_b_n(src + i, t), t);
  }
}

// --- dense scores: s[r][j] = q[r] . k[j] ---
template <int D, class E>
void scores_dense(const float* q, int nq, const typename E::T* k, int ntok, int dd, float* s) noexcept {
  const int d = D ? D : dd;
  const int nv = d / kL, tail = d - nv * kL;
  for (int r0 = 0; r0 < nq; r0 += kRB) {
    const int nr = imin(kRB, nq - r0);
    const float* qr[kRB];
    for (int r = 0; r < kRB; ++r) qr[r] = q + off(r0 + imin(r, nr - 1), d);  // spare rows repeat the last
    for (int j0 = 0; j0 < ntok; j0 += kTB) {
      const int nt = imin(kTB, ntok - j0);
      const typename E::T* kr[kTB];
      for (int t = 0; t < kTB; ++t) kr[t] = k + off(j0 + imin(t, nt - 1), d);
      VF acc[kL];
      for (int i = 0; i < kL; ++i) acc[i] = vzero();
      for (int v = 0; v < nv; ++v) {
        VF kv[kTB];
        for (int t = 0; t < kTB; ++t) kv[t] = E::load(kr[t] + v * kL);
        for (int r = 0; r < kRB; ++r) {
          const VF qv = vload(qr[r] + v * kL);
          for (int t = 0; t < kTB; ++t) acc[r * kTB + t] = vfma(qv, kv[t], acc[r * kTB + t]);
        }
      }
      if (D == 0 && tail) {
        VF kv[kTB];
        for (int t = 0; t < kTB; ++t) kv[t] = E::load_n(kr[t] + nv * kL, tail);
        for (int r = 0; r < kRB; ++r) {
          const VF qv = vload_n(qr[r] + nv * kL, tail);
          for (int t = 0; t < kTB; ++t) acc[r * kTB + t] = vfma(qv, kv[t], acc[r * kTB + t]);
        }
      }
      store_block(s + off(r0, ntok) + j0, ntok, vhsum(acc), nr, nt);
    }
  }
}

// --- dense accumulation: o[r][c] += sum_j p[r][j] v[j][c] ---
// One column block of up to kCB vectors (nc channels) for kRB rows.
template <class E, bool kFull>
inline void accum_block(const float* const* pr, float* const* orow, int nr, const typename E::T* v, int ntok, int d,
                        int c0, int nc) noexcept {
  VF acc[kRB][kCB];
  int nl[kCB];
  for (int b = 0; b < kCB; ++b) {
    const int rest = nc - b * kL;
    nl[b] = kFull ? kL : (rest < 0 ? 0 : imin(rest, kL));
  }
  for (int r = 0; r < kRB; ++r)
    for (int b = 0; b < kCB; ++b) acc[r][b] = kFull ? vload(orow[r] + c0 + b * kL) : vload_n(orow[r] + c0 + b * kL, nl[b]);
  for (int j = 0; j < ntok; ++j) {
    const typename E::T* row = v + off(j, d) + c0;
    VF x[kCB];
    for (int b = 0; b < kCB; ++b) x[b] = kFull ? E::load(row + b * kL) : (nl[b] ? E::load_n(row + b * kL, nl[b]) : vzero());
    for (int r = 0; r < kRB; ++r) {
      const VF pb = vset1(pr[r][j]);
      for (int b = 0; b < kCB; ++b) acc[r][b] = vfma(pb, x[b], acc[r][b]);
    }
  }
  for (int r = 0; r < nr; ++r)
    for (int b = 0; b < kCB; ++b) {
      if (kFull)
        vstore(orow[r] + c0 + b * kL, acc[r][b]);
      else if (nl[b])
        vstore_n(orow[r] + c0 + b * kL, acc[r][b], nl[b]);
    }
}
template <int D, class E>
void accum_dense(const float* p, int nq, const typename E::T* v, int ntok, int dd, float* o) noexcept {
  const int d = D ? D : dd;
  for (int r0 = 0; r0 < nq; r0 += kRB) {
    const int nr = imin(kRB, nq - r0);
    const float* pr[kRB];
    float* orow[kRB];
    for (int r = 0; r < kRB; ++r) {
      const int rr = r0 + imin(r, nr - 1);  // spare rows repeat the last one and are not stored
      pr[r] = p + off(rr, ntok);
      orow[r] = o + off(rr, d);
    }
    int c0 = 0;
    for (; c0 + kCB * kL <= d; c0 += kCB * kL) accum_block<E, true>(pr, orow, nr, v, ntok, d, c0, kCB * kL);
    if (c0 < d) accum_block<E, false>(pr, orow, nr, v, ntok, d, c0, d - c0);
  }
}

// --- online softmax over one block of logits (kernel_table.h) ---
// Rows are handled kL at a time: first every row's block maximum and new running maximum,
// then all the rescale factors exp(m_old - m_new) with one vector exp, then the
// exponentials, sums and output rescaling row by row.
void softmax_block_k(float* s, int nq, int ntok, float* m, float* l, float* o, int d) noexcept {
  const float ninf = -__builtin_inff();
  for (int r0 = 0; r0 < nq; r0 += kL) {
    const int nr = imin(kL, nq - r0);
    alignas(64) float mnew[kL], diff[kL], alpha[kL];
    for (int i = 0; i < kL; ++i) {
      mnew[i] = ninf;
      diff[i] = 0.0f;
    }
    for (int i = 0; i < nr; ++i) {
      const float* row = s + off(r0 + i, ntok);
      VF mx = vset1(ninf);
      int j = 0;
      for (; j + kL <= ntok; j += kL) mx = vmax(vload(row + j), mx);  // NaN logits are ignored, as in scalar
      if (j < ntok) mx = vmax(vload_n_fill(row + j, ntok - j, ninf), mx);
      const float bm = vreduce_max(mx), mo = m[r0 + i];
      mnew[i] = bm > mo ? bm : mo;
      diff[i] = mnew[i] == ninf ? 0.0f : mo - mnew[i];  // exp(-inf) = 0 on the first block
    }
    vstore(alpha, vexp(vload(diff)));
    for (int i = 0; i < nr; ++i) {
      const int r = r0 + i;
      float* row = s + off(r, ntok);
      if (mnew[i] == ninf) {  // everything masked so far
        for (int j = 0; j < ntok; ++j) row[j] = 0.0f;
        continue;
      }
      const VF mv = vset1(mnew[i]);
      VF sum = vzero();
      int j = 0;
      for (; j + kL <= ntok; j += kL) {
        const VF e = vexp(vsub(vload(row + j), mv));
        vstore(row + j, e);
        sum = vadd(sum, e);
      }
      if (j < ntok) {
        const int n = ntok - j;
        const VF e = vkeep_n(vexp(vsub(vload_n(row + j, n), mv)), n);
        vstore_n(row + j, e, n);
        sum = vadd(sum, e);
      }
      const float a = alpha[i];
      if (a != 1.0f) {
        float* orow = o + off(r, d);
        const VF av = vset1(a);
        int c = 0;
        for (; c + kL <= d; c += kL) vstore(orow + c, vmul(vload(orow + c), av));
        if (c < d) vstore_n(orow + c, vmul(vload_n(orow + c, d - c), av), d - c);
      }
      l[r] = l[r] * a + vreduce_add(sum);
      m[r] = mnew[i];
    }
  }
}

// --- KIVI: code packing ---
// 8 codes of B bits, one per byte of w (each < 2^B), compacted into the low 8*B bits,
// LSB first: three rounds of "merge neighbours" (a software PEXT for this pattern).
template <int B>
inline std::uint64_t pack8(std::uint64_t w) noexcept {
  if constexpr (B == 8) {
    return w;
  } else {
    constexpr std::uint64_t m1 = 0x0001000100010001ull * ((1ull << (2 * B)) - 1);
    constexpr std::uint64_t m2 = 0x0000000100000001ull * ((1ull << (4 * B)) - 1);
    constexpr std::uint64_t m3 = (1ull << (8 * B)) - 1;
    w = (w | (w >> (8 - B))) & m1;
    w = (w | (w >> (16 - 2 * B))) & m2;
    return (w | (w >> (32 - 4 * B))) & m3;
  }
}
// Writes the codes of channels [c, c+n) (c a multiple of kL): ceil(n*B/8) bytes at
// p = row + c*B/8. Lanes >= n must hold 0.
template <int B>
inline void vstore_codes(std::uint8_t* p, VI codes, int n) noexcept {
  const __m128i b = vcode_bytes(codes);
  std::uint8_t out[16];
  if constexpr (B == 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), b);
  } else {
    const std::uint64_t w0 = pack8<B>(static_cast<std::uint64_t>(_mm_cvtsi128_si64(b)));
    __builtin_memcpy(out, &w0, B);
    if constexpr (kL == 16) {
      const std::uint64_t w1 = pack8<B>(static_cast<std::uint64_t>(_mm_extract_epi64(b, 1)));
      __builtin_memcpy(out + B, &w1, B);
    }
  }
  if (n == kL) {
    __builtin_memcpy(p, out, kL * B / 8);
  } else {
    const int nbytes = (n * B + 7) / 8;
    for (int i = 0; i < nbytes; ++i) p[i] = out[i];
  }
}

struct GroupParams {
  float zero, inv;
};
// The quantization rule of kernel_table.h for one group; writes scale/zero bits.
inline GroupParams group_params(float mn, float mx, float qmax, std::uint16_t* scale_bits,
                                std::uint16_t* zero_bits) noexcept {
  *zero_bits = f2h(mn);
  const float zero = h2f(*zero_bits);
  *scale_bits = f2h((mx - zero) / qmax);
  const float scale = h2f(*scale_bits);
  return {zero, scale > 0.0f ? 1.0f / scale : 0.0f};
}

// clamp(nearbyint((x - zero) * inv), 0, qmax) lane by lane (the rule of kernel_table.h);
// lanes whose x, zero and inv are 0 give code 0.
inline VI vquant_lane(VF x, VF zero, VF inv, VF qmax) noexcept { return vquant(vmul(vsub(x, zero), inv), qmax); }

// Codes of one row from kL-channel code vectors: 4 vectors at a time with the SIMD packer,
// the tail vector by vector.
template <int B>
inline void store_row_codes(std::uint8_t* row, const VI* codes, int d) noexcept {
  int v = 0;
  for (; (v + 4) * kL <= d; v += 4) vstore_codes4<B>(row + v * kL * B / 8, codes + v);
  for (; v * kL < d; ++v) vstore_codes<B>(row + v * kL * B / 8, codes[v], imin(kL, d - v * kL));
}

// --- KIVI: keys, per channel over the page's tokens ---
template <int B>
void quant_keys(const float* k, int ntok, int d, std::uint16_t* scale, std::uint16_t* zero,
                std::uint8_t* codes) noexcept {
  const int rb = rowb(d, B), nv = (d + kL - 1) / kL;
  const VF qmax = vset1(static_cast<float>((1 << B) - 1));
  alignas(64) float zf[kMaxD], inv[kMaxD];
  // Pass 1: per-channel min/max over the tokens (lane by lane in token order, exactly the
  // scalar comparisons), then zero, scale and the inverse step.
  for (int c = 0; c < d; c += kL) {
    const int n = imin(kL, d - c);
    // Lanes >= n load 0, so their zero, scale, inverse and codes are all 0.
    VF mn = vload_n(k + c, n), mx = mn;
    for (int j = 1; j < ntok; ++j) {
      const VF x = vload_n(k + off(j, d) + c, n);
      mn = vmin(x, mn);
      mx = vmax(x, mx);
    }
    vstore_h_n(zero + c, mn, n);
    const VF z = vload_h_n(zero + c, n);
    vstore_h_n(scale + c, vdiv(vsub(mx, z), qmax), n);
    vstore(zf + c, z);
    vstore(inv + c, vinv_pos(vload_h_n(scale + c, n)));
  }
  // Pass 2: token rows, whole rows at a time.
  VI cv[kMaxD / kL];
  for (int j = 0; j < ntok; ++j) {
    const float* x = k + off(j, d);
    for (int v = 0; v < nv; ++v) {
      const int c = v * kL, n = imin(kL, d - c);
      cv[v] = vquant_lane(n == kL ? vload(x + c) : vload_n(x + c, n), vload(zf + c), vload(inv + c), qmax);
    }
    store_row_codes<B>(codes + off(j, rb), cv, d);
  }
}

// The first x[i] (i in [0, n)) equal to v: recovers the sign of a zero min/max, which a
// tree reduction may pick differently from the scalar left-to-right scan.
inline float first_equal(const float* x, int n, float v) noexcept {
  for (int i = 0; i < n; ++i)
    if (x[i] == v) return x[i];
  return v;
}

// --- KIVI: values, per token over groups of vg channels ---
// Fast path (vg a multiple of kL and ng = d/vg dividing kL): the tokens are taken kL/ng at a
// time so that their kL (token, group) pairs fill one vector: per pair a vertical min/max
// over the group's vectors, then one transposed reduction gives all kL minima (maxima) in
// lanes, and zero, scale and inverse are computed for all of them at once.
template <int B>
void quant_values_batched(const float* v, int ntok, int d, int vg, std::uint16_t* scale, std::uint16_t* zero,
                          std::uint8_t* codes) noexcept {
  const int rb = rowb(d, B), ng = d / vg, tpb = kL / ng, vpg = vg / kL;
  const float qmaxf = static_cast<float>((1 << B) - 1);
  const VF qmax = vset1(qmaxf);
  VI cv[kMaxD / kL];
  for (int j0 = 0; j0 < ntok; j0 += tpb) {
    const int nt = imin(tpb, ntok - j0);
    VF mnv[kL], mxv[kL];
    for (int t = 0; t < tpb; ++t)
      for (int g = 0; g < ng; ++g) {
        const float* xg = v + off(j0 + imin(t, nt - 1), d) + off(g, vg);  // spare tokens repeat the last
        VF mn = vload(xg), mx = mn;
        for (int c = kL; c < vg; c += kL) {
          const VF x = vload(xg + c);
          mn = vmin(x, mn);
          mx = vmax(x, mx);
        }
        mnv[t * ng + g] = mn;
        mxv[t * ng + g] = mx;
      }
    alignas(64) float mnl[kL], mxl[kL];
    vstore(mnl, vhreduce<OpMin>(mnv));
    vstore(mxl, vhreduce<OpMax>(mxv));
    for (int i = 0; i < nt * ng; ++i) {  // a zero extreme keeps the sign the scalar scan would see
      const float* xg = v + off(j0 + i / ng, d) + off(i % ng, vg);
      if (mnl[i] == 0.0f) mnl[i] = first_equal(xg, vg, 0.0f);
      if (mxl[i] == 0.0f) mxl[i] = first_equal(xg, vg, 0.0f);
    }
    // Group parameters of the batch, lane i = (token i / ng, group i % ng): [j][g] is also
    // the layout of scale and zero, so they are stored with one (masked) vector each.
    const int n = nt * ng;
    std::uint16_t* zp = zero + off(j0, ng);
    std::uint16_t* sp = scale + off(j0, ng);
    vstore_h_n(zp, vload(mnl), n);
    const VF z = vload_h_n(zp, n);
    vstore_h_n(sp, vdiv(vsub(vload(mxl), z), qmax), n);
    const VF inv = vinv_pos(vload_h_n(sp, n));
    for (int t = 0; t < nt; ++t) {
      const float* x = v + off(j0 + t, d);
      for (int g = 0; g < ng; ++g) {
        const VF zg = vlane(z, t * ng + g), ig = vlane(inv, t * ng + g);
        for (int c = 0; c < vpg; ++c) cv[g * vpg + c] = vquant_lane(vload(x + g * vg + c * kL), zg, ig, qmax);
      }
      store_row_codes<B>(codes + off(j0 + t, rb), cv, d);
    }
  }
}

template <int B>
void quant_values(const float* v, int ntok, int d, int vg, std::uint16_t* scale, std::uint16_t* zero,
                  std::uint8_t* codes) noexcept {
  const int rb = rowb(d, B), ng = d / vg;
  if (vg % kL == 0 && kL % ng == 0) return quant_values_batched<B>(v, ntok, d, vg, scale, zero, codes);
  // Other groupings: scalar group statistics (exactly the scalar scan), then per-lane
  // zero/inverse vectors.
  const float qmaxf = static_cast<float>((1 << B) - 1);
  const VF qmax = vset1(qmaxf);
  alignas(64) float zc[kMaxD], ic[kMaxD];
  VI cv[kMaxD / kL];
  for (int j = 0; j < ntok; ++j) {
    const float* x = v + off(j, d);
    for (int g = 0; g < ng; ++g) {
      const float* xg = x + off(g, vg);
      float mn = xg[0], mx = xg[0];
      for (int c = 1; c < vg; ++c) {
        mn = xg[c] < mn ? xg[c] : mn;
        mx = xg[c] > mx ? xg[c] : mx;
      }
      const GroupParams gp = group_params(mn, mx, qmaxf, scale + off(j, ng) + g, zero + off(j, ng) + g);
      for (int c = 0; c < vg; ++c) {
        zc[g * vg + c] = gp.zero;
        ic[g * vg + c] = gp.inv;
      }
    }
    for (int c = 0; c < d; c += kL) {
      const int n = imin(kL, d - c);  // lanes >= n: (0 - 0) * 0 = code 0
      cv[c / kL] = vquant_lane(vload_n(x + c, n), vload_n(zc + c, n), vload_n(ic + c, n), qmax);
    }
    store_row_codes<B>(codes + off(j, rb), cv, d);
  }
}

// --- KIVI encode fast paths: head_dim D a multiple of 4 kL (64, 128, 256) ---
// Whole rows are packed 4 vectors at a time from the raw rounded (x - zero) * inv, the
// packer's saturation doing the clamp (see vstore_codes4: bit-exact with vquant).
template <int B, int D>
inline void quant_row_d(const float* x, const VF* zf, const VF* inv, std::uint8_t* row) noexcept {
  static_assert(D % (4 * kL) == 0, "rows of whole 4-vector packs");
  for (int v = 0; v < D / kL; v += 4) {
    VI c[4];
    for (int i = 0; i < 4; ++i) c[i] = vround_i(vmul(vsub(vload(x + (v + i) * kL), zf[v + i]), inv[v + i]));
    vstore_codes4<B>(row + v * kL * B / 8, c);
  }
}

// Keys: pass 1 reads the page row by row for blocks of kKB channel vectors (min/max in
// registers, token order as the scalar scan); pass 2 quantizes and packs row by row.
template <int B, int D>
void quant_keys_d(const float* k, int ntok, std::uint16_t* scale, std::uint16_t* zero, std::uint8_t* codes) noexcept {
  constexpr int NV = D / kL, KB = NV < kKB ? NV : kKB, RB = D * B / 8;
  const VF qmax = vset1(static_cast<float>((1 << B) - 1));
  VF zf[NV], inv[NV];
  for (int v0 = 0; v0 < NV; v0 += KB) {
    VF mn[KB], mx[KB];
    for (int b = 0; b < KB; ++b) mn[b] = mx[b] = vload(k + (v0 + b) * kL);
    for (int j = 1; j < ntok; ++j) {
      const float* x = k + off(j, D) + v0 * kL;
      // The first block touches every row's first lines at a stride of a row, which the
      // hardware prefetchers follow poorly: ask for the rest of the row (the later blocks)
      // and of the next one now, so that the page streams in sequentially.
      if (KB < NV && v0 == 0)
        for (int c = KB * kL; c < D + KB * kL; c += 16) _mm_prefetch(reinterpret_cast<const char*>(x + c), _MM_HINT_T0);
      for (int b = 0; b < KB; ++b) {
        const VF xv = vload(x + b * kL);
        mn[b] = vmin(xv, mn[b]);
        mx[b] = vmax(xv, mx[b]);
      }
    }
    for (int b = 0; b < KB; ++b) {
      const int c = (v0 + b) * kL;
      zf[v0 + b] = vstore_h_round(zero + c, mn[b]);
      inv[v0 + b] = vinv_pos(vstore_h_round(scale + c, vdiv(vsub(mx[b], zf[v0 + b]), qmax)));
    }
  }
  for (int j = 0; j < ntok; ++j) quant_row_d<B, D>(k + off(j, D), zf, inv, codes + off(j, RB));
}

// Values (vg a multiple of kL, ng = D / vg dividing kL): as quant_values_batched, kL/ng
// tokens per batch so that their (token, group) pairs fill one vector of parameters; the
// per-pair zero and inverse are broadcast from a stack copy (loads, not shuffles). NG is
// D / vg when given at compile time (the default vgroup 32), 0 for any other.
template <int B, int D, int NG>
void quant_values_d(const float* v, int ntok, int vg_rt, std::uint16_t* scale, std::uint16_t* zero,
                    std::uint8_t* codes) noexcept {
  constexpr int NV = D / kL, RB = D * B / 8;
  const int vg = NG ? D / NG : vg_rt, ng = NG ? NG : D / vg, tpb = kL / ng, vpg = vg / kL;
  const VF qmax = vset1(static_cast<float>((1 << B) - 1));
  for (int j0 = 0; j0 < ntok; j0 += tpb) {
    const int nt = imin(tpb, ntok - j0);
    VF mnv[kL], mxv[kL];
    for (int t = 0; t < tpb; ++t) {
      const float* x = v + off(j0 + imin(t, nt - 1), D);  // spare tokens repeat the last
      for (int g = 0; g < ng; ++g) {
        const float* xg = x + g * vg;
        VF mn = vload(xg), mx = mn;
        for (int c = 1; c < vpg; ++c) {
          const VF xv = vload(xg + c * kL);
          mn = vmin(xv, mn);
          mx = vmax(xv, mx);
        }
        mnv[t * ng + g] = mn;
        mxv[t * ng + g] = mx;
      }
    }
    VF mn = vhreduce<OpMin>(mnv), mx = vhreduce<OpMax>(mxv);
    // A zero extreme keeps the sign the scalar scan would see (rare: only then a scan).
    if (const unsigned zl = vzero_lanes(mn) | vzero_lanes(mx)) {
      alignas(64) float mnl[kL], mxl[kL];
      vstore(mnl, mn);
      vstore(mxl, mx);
      for (int i = 0; i < nt * ng; ++i) {
        if (!((zl >> i) & 1u)) continue;
        const float* xg = v + off(j0 + i / ng, D) + off(i % ng, vg);
        if (mnl[i] == 0.0f) mnl[i] = first_equal(xg, vg, 0.0f);
        if (mxl[i] == 0.0f) mxl[i] = first_equal(xg, vg, 0.0f);
      }
      mn = vload(mnl);
      mx = vload(mxl);
    }
    const int n = nt * ng;
    std::uint16_t* zp = zero + off(j0, ng);
    std::uint16_t* sp = scale + off(j0, ng);
    alignas(64) float zl[kL], il[kL];
    VF z, s;
    if (n == kL) {
      z = vstore_h_round(zp, mn);
      s = vstore_h_round(sp, vdiv(vsub(mx, z), qmax));
    } else {
      z = vstore_h_round_n(zp, mn, n);
      s = vstore_h_round_n(sp, vdiv(vsub(mx, z), qmax), n);
    }
    vstore(zl, z);
    vstore(il, vinv_pos(s));
    for (int t = 0; t < nt; ++t) {
      const float* x = v + off(j0 + t, D);
      std::uint8_t* row = codes + off(j0 + t, RB);
      const float* zt = zl + t * ng;
      const float* it = il + t * ng;
      for (int v0 = 0; v0 < NV; v0 += 4) {
        VI c[4];
        for (int i = 0; i < 4; ++i) {
          const int g = NG ? (v0 + i) / (NV / NG) : (v0 + i) / vpg;
          c[i] = vround_i(vmul(vsub(vload(x + (v0 + i) * kL), vset1(zt[g])), vset1(it[g])));
        }
        vstore_codes4<B>(row + v0 * kL * B / 8, c);
      }
    }
  }
}

template <int B>
void dequant_keys(const std::uint16_t* scale, const std::uint16_t* zero, const std::uint8_t* codes, int ntok, int d,
                  float* k) noexcept {
  const int rb = rowb(d, B);
  for (int j = 0; j < ntok; ++j) {
    const std::uint8_t* row = codes + off(j, rb);
    float* out = k + off(j, d);
    int c = 0;
    for (; c + kL <= d; c += kL)
      vstore(out + c, vfma(vcodes<B, true>(row + c * B / 8, kL), vload_h(scale + c), vload_h(zero + c)));
    if (c < d) {
      const int n = d - c;
      vstore_n(out + c, vfma(vcodes<B, false>(row + c * B / 8, n), vload_h_n(scale + c, n), vload_h_n(zero + c, n)), n);
    }
  }
}

// Per-channel scale and zero of token j's value groups, expanded into sc[d], zc[d].
inline void expand_groups(const std::uint16_t* sj, const std::uint16_t* zj, int d, int vg, float* sc,
                          float* zc) noexcept {
  for (int g = 0; g < d / vg; ++g) {
    const float s = h2f(sj[g]), z = h2f(zj[g]);
    for (int c = 0; c < vg; ++c) {
      sc[g * vg + c] = s;
      zc[g * vg + c] = z;
    }
  }
}

template <int B>
void dequant_values(const std::uint16_t* scale, const std::uint16_t* zero, const std::uint8_t* codes, int ntok, int d,
                    int vg, float* v) noexcept {
  const int rb = rowb(d, B), ng = d / vg;
  alignas(64) float sc[kMaxD], zc[kMaxD];
  for (int j = 0; j < ntok; ++j) {
    const std::uint8_t* row = codes + off(j, rb);
    float* out = v + off(j, d);
    if (vg % kL == 0) {
      for (int c = 0; c < d; c += kL) {
        const int g = c / vg;
        const VF x = vcodes<B, true>(row + c * B / 8, kL);
        vstore(out + c, vfma(x, vset1(h2f(scale[off(j, ng) + g])), vset1(h2f(zero[off(j, ng) + g]))));
      }
    } else {
      expand_groups(scale + off(j, ng), zero + off(j, ng), d, vg, sc, zc);
      for (int c = 0; c < d; c += kL) {
        const int n = imin(kL, d - c);
        vstore_n(out + c, vfma(vcodes<B, false>(row + c * B / 8, n), vload_n(sc + c, n), vload_n(zc + c, n)), n);
      }
    }
  }
}

// --- KIVI scores on the codes ---
// q.k = sum_c (q_c s_c) code_c + sum_c q_c z_c: the per-channel scale is folded into a
// copy of the query rows, the zero point into one bias per row.
template <int B, int D>
void kivi_scores_g(const float* q, int nq, const std::uint16_t* scale, const std::uint16_t* zero,
                   const std::uint8_t* codes, int ntok, int dd, float* s) noexcept {
  const int d = D ? D : dd;
  const int rb = rowb(d, B), nv = d / kL, tail = d - nv * kL;
  // With D known, every vector goes through vcodes2s, whose lanes carry a power-of-two
  // factor; the scaled query copy takes its inverse.
  constexpr bool kScaled = D != 0 && kScaledCodes<B>;
  alignas(64) float qs[kRB * kMaxD];
  for (int r0 = 0; r0 < nq; r0 += kRB) {
    const int nr = imin(kRB, nq - r0);
    alignas(64) float bias_l[kL];
    for (int r = 0; r < kRB; ++r) {
      const float* qr = q + off(r0 + imin(r, nr - 1), d);
      float* qsr = qs + off(r, d);
      VF b = vzero();
      int c = 0;
      for (; c + kL <= d; c += kL) {
        const VF qv = vload(qr + c);
        VF qsv = vmul(qv, vload_h(scale + c));
        if constexpr (kScaled) qsv = vmul(qsv, vcode_unscale<B>());  // exact: a power of two
        vstore(qsr + c, qsv);
        b = vfma(qv, vload_h(zero + c), b);
      }
      if (c < d) {
        const VF qv = vload_n(qr + c, d - c);
        vstore_n(qsr + c, vmul(qv, vload_h_n(scale + c, d - c)), d - c);
        b = vfma(qv, vload_h_n(zero + c, d - c), b);
      }
      const float bias = vreduce_add(b);
      for (int t = 0; t < kTB; ++t) bias_l[r * kTB + t] = bias;
    }
    const VF bias = vload(bias_l);
    for (int j0 = 0; j0 < ntok; j0 += kTB) {
      const int nt = imin(kTB, ntok - j0);
      const std::uint8_t* kr[kTB];
      for (int t = 0; t < kTB; ++t) kr[t] = codes + off(j0 + imin(t, nt - 1), rb);
      VF acc[kL];
      for (int i = 0; i < kL; ++i) acc[i] = vzero();
      int v = 0;
      if (D) {  // a multiple of 2 kL: the codes of two vectors per load
        for (; v < nv; v += 2) {
          VF kv[kTB][2];
          for (int t = 0; t < kTB; ++t) vcodes2s<B>(kr[t] + v * kL * B / 8, kv[t]);
          for (int h = 0; h < 2; ++h)
            for (int r = 0; r < kRB; ++r) {
              const VF qv = vload(qs + off(r, d) + (v + h) * kL);
              for (int t = 0; t < kTB; ++t) acc[r * kTB + t] = vfma(qv, kv[t][h], acc[r * kTB + t]);
            }
        }
      }
      for (; v < nv; ++v) {
        VF kv[kTB];
        for (int t = 0; t < kTB; ++t) kv[t] = vcodes<B, true>(kr[t] + v * kL * B / 8, kL);
        for (int r = 0; r < kRB; ++r) {
          const VF qv = vload(qs + off(r, d) + v * kL);
          for (int t = 0; t < kTB; ++t) acc[r * kTB + t] = vfma(qv, kv[t], acc[r * kTB + t]);
        }
      }
      if (D == 0 && tail) {
        VF kv[kTB];
        for (int t = 0; t < kTB; ++t) kv[t] = vcodes<B, false>(kr[t] + nv * kL * B / 8, tail);
        for (int r = 0; r < kRB; ++r) {
          const VF qv = vload_n(qs + off(r, d) + nv * kL, tail);
          for (int t = 0; t < kTB; ++t) acc[r * kTB + t] = vfma(qv, kv[t], acc[r * kTB + t]);
        }
      }
      store_block(s + off(r0, ntok) + j0, ntok, vadd(vhsum(acc), bias), nr, nt);
    }
  }
}

// --- KIVI accumulation on the codes, scales folded into the weights ---
// o[r] += sum_j (p_rj s_jg) code_j + sum_j p_rj z_jg. Per chunk of kVC tokens the chunk's
// value scales and zero points are converted from f16 once, and every row's weights
// w = p s and zero-point sums are formed with vector operations (kL (token, group) entries
// at a time), so the token loop is code unpacking plus one FMA per row and vector, its
// weight a broadcast load. Needs vg % kL == 0 (every vector in one group, d a multiple of
// kL) and kL % ng == 0 (a vector of entries covers whole tokens).
// NG: d / vg when known at compile time (0: at run time). kShare: consecutive vectors of a
// column block that lie in one group (they share one weight broadcast per row).
template <int B, int D, int NG, int kShare>
void kivi_accum_w(const float* p, int nq, const std::uint16_t* scale, const std::uint16_t* zero,
                  const std::uint8_t* codes, int ntok, int dd, int vg, float* o) noexcept {
  static_assert(kCB % kShare == 0, "groups tile the column block");
  const int d = D ? D : dd;
  const int rb = rowb(d, B), ng = NG ? NG : d / vg;
  constexpr int kVC = 32;
  alignas(64) float vs[kVC * kL], vz[kVC * kL], w[kRB][kVC * kL], zs[kRB][kL];
  for (int j0 = 0; j0 < ntok; j0 += kVC) {
    const int tc = imin(kVC, ntok - j0), n = tc * ng;
    const std::uint16_t* sc = scale + off(j0, ng);
    const std::uint16_t* zc = zero + off(j0, ng);
    int f = 0;
    for (; f + kL <= n; f += kL) {
      vstore(vs + f, vload_h(sc + f));
      vstore(vz + f, vload_h(zc + f));
    }
    if (f < n) {
      vstore_n(vs + f, vload_h_n(sc + f, n - f), n - f);
      vstore_n(vz + f, vload_h_n(zc + f, n - f), n - f);
    }
    for (int r0 = 0; r0 < nq; r0 += kRB) {
      const int nr = imin(kRB, nq - r0);
      float* orow[kRB];
      for (int r = 0; r < kRB; ++r) {
        const int rr = r0 + imin(r, nr - 1);  // spare rows repeat the last (never stored)
        orow[r] = o + off(rr, d);
        const float* pr = p + off(rr, ntok) + j0;
        VF z = vzero();
        int e = 0;
        for (; e + kL <= n; e += kL) {
          const VF pe = vexpand(pr + e / ng, ng);
          vstore(w[r] + e, vmul(pe, vload(vs + e)));
          z = vfma(pe, vload(vz + e), z);
        }
        alignas(64) float zl[kL];
        vstore(zl, z);
        for (int g = 0; g < ng; ++g) {
          float t = 0.0f;
          for (int i = g; i < kL; i += ng) t += zl[i];
          zs[r][g] = t;
        }
        for (; e < n; ++e) {
          w[r][e] = pr[e / ng] * vs[e];
          zs[r][e % ng] += pr[e / ng] * vz[e];
        }
      }
      for (int c0 = 0; c0 < d; c0 += kCB * kL) {
        const int nb = imin(kCB, (d - c0) / kL);
        int gb[kCB];
        VF acc[kRB][kCB];
        for (int b = 0; b < kCB; ++b) gb[b] = b < nb ? (c0 + b * kL) / vg : 0;
        // Full blocks unpack with vcodes2s: their sums run in the lanes' scaled units (o is
        // scaled in and out by powers of two, so the result is the same as unscaled).
        const bool scaled = kScaledCodes<B> && nb == kCB;
        for (int r = 0; r < kRB; ++r)
          for (int b = 0; b < kCB; ++b) {
            acc[r][b] = b < nb ? vload(orow[r] + c0 + b * kL) : vzero();
            if (scaled) acc[r][b] = vmul(acc[r][b], vcode_scale<B>());
          }
        for (int j = 0; j < tc; ++j) {
          const std::uint8_t* row = codes + off(j0 + j, rb) + c0 * B / 8;
          VF x[kCB];
          if (nb == kCB) {
            for (int b = 0; b < kCB; b += 2) vcodes2s<B>(row + b * kL * B / 8, x + b);
          } else {
            for (int b = 0; b < kCB; ++b) x[b] = b < nb ? vcodes<B, true>(row + b * kL * B / 8, kL) : vzero();
          }
          for (int r = 0; r < kRB; ++r) {
            VF wb = vzero();
            for (int b = 0; b < kCB; ++b) {
              if (b % kShare == 0) wb = vset1(w[r][j * ng + gb[b]]);
              acc[r][b] = vfma(wb, x[b], acc[r][b]);
            }
          }
        }
        for (int r = 0; r < nr; ++r)
          for (int b = 0; b < nb; ++b)
            vstore(orow[r] + c0 + b * kL,
                   scaled ? vfma(acc[r][b], vcode_unscale<B>(), vset1(zs[r][gb[b]])) : vadd(acc[r][b], vset1(zs[r][gb[b]])));
      }
    }
  }
}

// --- KIVI accumulation on the codes ---
// o[r] += sum_j p[r][j] (s_jg code_j + z_jg): each code vector is dequantized once (one FMA
// with the token's group scale and zero) and shared by all kRB rows.
template <int B, int D>
void kivi_accum_g(const float* p, int nq, const std::uint16_t* scale, const std::uint16_t* zero,
                  const std::uint8_t* codes, int ntok, int dd, int vg, float* o) noexcept {
  const int d = D ? D : dd;
  const int rb = rowb(d, B), ng = d / vg;
  if (vg % kL == 0 && kL % ng == 0) {
    constexpr int kShare32 = 32 / kL < kCB ? 32 / kL : kCB;  // vectors per group of 32 in a column block
    if (D && vg == 32) return kivi_accum_w<B, D, D / 32, kShare32>(p, nq, scale, zero, codes, ntok, d, vg, o);
    return kivi_accum_w<B, D, 0, 1>(p, nq, scale, zero, codes, ntok, d, vg, o);
  }
  if (vg % kL == 0) {
    // Every vector lies in one group, and d is a multiple of kL.
    for (int r0 = 0; r0 < nq; r0 += kRB) {
      const int nr = imin(kRB, nq - r0);
      const float* pr[kRB];
      float* orow[kRB];
      for (int r = 0; r < kRB; ++r) {
        const int rr = r0 + imin(r, nr - 1);
        pr[r] = p + off(rr, ntok);
        orow[r] = o + off(rr, d);
      }
      for (int c0 = 0; c0 < d; c0 += kCB * kL) {
        const int nb = imin(kCB, (d - c0) / kL);
        VF acc[kRB][kCB];
        for (int r = 0; r < kRB; ++r)
          for (int b = 0; b < kCB; ++b) acc[r][b] = b < nb ? vload(orow[r] + c0 + b * kL) : vzero();
        for (int j = 0; j < ntok; ++j) {
          const std::uint8_t* row = codes + off(j, rb);
          VF x[kCB];
          for (int b = 0; b < kCB; ++b) {
            if (b >= nb) {
              x[b] = vzero();
              continue;
            }
            const int c = c0 + b * kL, g = c / vg;
            x[b] = vfma(vcodes<B, true>(row + c * B / 8, kL), vset1(h2f(scale[off(j, ng) + g])),
                        vset1(h2f(zero[off(j, ng) + g])));
          }
          for (int r = 0; r < kRB; ++r) {
            const VF pb = vset1(pr[r][j]);
            for (int b = 0; b < kCB; ++b) acc[r][b] = vfma(pb, x[b], acc[r][b]);
          }
        }
        for (int r = 0; r < nr; ++r)
          for (int b = 0; b < nb; ++b) vstore(orow[r] + c0 + b * kL, acc[r][b]);
      }
    }
    return;
  }
  // Groups that do not tile whole vectors: dequantize token by token with per-channel
  // scale/zero, then add into every row.
  alignas(64) float sc[kMaxD], zc[kMaxD];
  for (int j = 0; j < ntok; ++j) {
    const std::uint8_t* row = codes + off(j, rb);
    expand_groups(scale + off(j, ng), zero + off(j, ng), d, vg, sc, zc);
    for (int c = 0; c < d; c += kL) {
      const int n = imin(kL, d - c);
      const VF x = vfma(vcodes<B, false>(row + c * B / 8, n), vload_n(sc + c, n), vload_n(zc + c, n));
      for (int r = 0; r < nq; ++r) {
        const float w = p[off(r, ntok) + j];
        if (w == 0.0f) continue;
        float* orr = o + off(r, d) + c;
        vstore_n(orr, vfma(vset1(w), x, vload_n(orr, n)), n);
      }
    }
  }
}

// --- entry points: dispatch head_dim 64/128/256 and the bit width to specializations ---
// Every bit width the codec accepts (1, 2, 3, 4, 8) has a specialization; the scalar
// fallbacks in the default cases serve only widths no recipe can produce.
#define KVSLIM_DISPATCH_D(fn, d, ...)                  \
  switch (d) {                                         \
    case 64: return fn<64>(__VA_ARGS__);               \
    case 128: return fn<128>(__VA_ARGS__);             \
    case 256: return fn<256>(__VA_ARGS__);             \
    default: return fn<0>(__VA_ARGS__);                \
  }

template <int D>
void scores_f32_d(const float* q, int nq, const float* k, int ntok, int d, float* s) noexcept {
  scores_dense<D, F32>(q, nq, k, ntok, d, s);
}
template <int D>
void scores_f16_d(const float* q, int nq, const std::uint16_t* k, int ntok, int d, float* s) noexcept {
  scores_dense<D, F16>(q, nq, k, ntok, d, s);
}
template <int D>
void scores_bf16_d(const float* q, int nq, const std::uint16_t* k, int ntok, int d, float* s) noexcept {
  scores_dense<D, BF16>(q, nq, k, ntok, d, s);
}
template <int D>
void accum_f32_d(const float* p, int nq, const float* v, int ntok, int d, float* o) noexcept {
  accum_dense<D, F32>(p, nq, v, ntok, d, o);
}
template <int D>
void accum_f16_d(const float* p, int nq, const std::uint16_t* v, int ntok, int d, float* o) noexcept {
  accum_dense<D, F16>(p, nq, v, ntok, d, o);
}
template <int D>
void accum_bf16_d(const float* p, int nq, const std::uint16_t* v, int ntok, int d, float* o) noexcept {
  accum_dense<D, BF16>(p, nq, v, ntok, d, o);
}

void scores_f32_k(const float* q, int nq, const float* k, int ntok, int d, float* s) noexcept {
  KVSLIM_DISPATCH_D(scores_f32_d, d, q, nq, k, ntok, d, s)
}
void scores_f16_k(const float* q, int nq, const std::uint16_t* k, int ntok, int d, float* s) noexcept {
  KVSLIM_DISPATCH_D(scores_f16_d, d, q, nq, k, ntok, d, s)
}
void scores_bf16_k(const float* q, int nq, const std::uint16_t* k, int ntok, int d, float* s) noexcept {
  KVSLIM_DISPATCH_D(scores_bf16_d, d, q, nq, k, ntok, d, s)
}
void accum_f32_k(const float* p, int nq, const float* v, int ntok, int d, float* o) noexcept {
  KVSLIM_DISPATCH_D(accum_f32_d, d, p, nq, v, ntok, d, o)
}
void accum_f16_k(const float* p, int nq, const std::uint16_t* v, int ntok, int d, float* o) noexcept {
  KVSLIM_DISPATCH_D(accum_f16_d, d, p, nq, v, ntok, d, o)
}
void accum_bf16_k(const float* p, int nq, const std::uint16_t* v, int ntok, int d, float* o) noexcept {
  KVSLIM_DISPATCH_D(accum_bf16_d, d, p, nq, v, ntok, d, o)
}

template <int B>
void quant_keys_b(const float* k, int ntok, int d, std::uint16_t* scale, std::uint16_t* zero,
                  std::uint8_t* codes) noexcept {
  switch (d) {
    case 64: return quant_keys_d<B, 64>(k, ntok, scale, zero, codes);
    case 128: return quant_keys_d<B, 128>(k, ntok, scale, zero, codes);
    case 256: return quant_keys_d<B, 256>(k, ntok, scale, zero, codes);
    default: return quant_keys<B>(k, ntok, d, scale, zero, codes);
  }
}
template <int B>
void quant_values_b(const float* v, int ntok, int d, int vg, std::uint16_t* scale, std::uint16_t* zero,
                    std::uint8_t* codes) noexcept {
  if (vg % kL == 0 && kL % (d / vg) == 0) {
    switch (d) {
      case 64: return vg == 32 ? quant_values_d<B, 64, 2>(v, ntok, vg, scale, zero, codes)
                               : quant_values_d<B, 64, 0>(v, ntok, vg, scale, zero, codes);
      case 128: return vg == 32 ? quant_values_d<B, 128, 4>(v, ntok, vg, scale, zero, codes)
                                : quant_values_d<B, 128, 0>(v, ntok, vg, scale, zero, codes);
      case 256: return vg == 32 ? quant_values_d<B, 256, 8>(v, ntok, vg, scale, zero, codes)
                                : quant_values_d<B, 256, 0>(v, ntok, vg, scale, zero, codes);
      default: break;
    }
  }
  quant_values<B>(v, ntok, d, vg, scale, zero, codes);
}

void kivi_quant_keys_k(const float* k, int ntok, int d, int bits, std::uint16_t* scale, std::uint16_t* zero,
                       std::uint8_t* codes) noexcept {
  switch (bits) {
    case 1: return quant_keys_b<1>(k, ntok, d, scale, zero, codes);
    case 2: return quant_keys_b<2>(k, ntok, d, scale, zero, codes);
    case 3: return quant_keys_b<3>(k, ntok, d, scale, zero, codes);
    case 4: return quant_keys_b<4>(k, ntok, d, scale, zero, codes);
    case 8: return quant_keys_b<8>(k, ntok, d, scale, zero, codes);
    default: return scalar::kTable.kivi_quant_keys(k, ntok, d, bits, scale, zero, codes);
  }
}
void kivi_quant_values_k(const float* v, int ntok, int d, int bits, int vg, std::uint16_t* scale,
                         std::uint16_t* zero, std::uint8_t* codes) noexcept {
  switch (bits) {
    case 1: return quant_values_b<1>(v, ntok, d, vg, scale, zero, codes);
    case 2: return quant_values_b<2>(v, ntok, d, vg, scale, zero, codes);
    case 3: return quant_values_b<3>(v, ntok, d, vg, scale, zero, codes);
    case 4: return quant_values_b<4>(v, ntok, d, vg, scale, zero, codes);
    case 8: return quant_values_b<8>(v, ntok, d, vg, scale, zero, codes);
    default: return scalar::kTable.kivi_quant_values(v, ntok, d, bits, vg, scale, zero, codes);
  }
}
void kivi_dequant_keys_k(const std::uint16_t* scale, const std::uint16_t* zero, const std::uint8_t* codes, int ntok,
                         int d, int bits, float* k) noexcept {
  switch (bits) {
    case 1: return dequant_keys<1>(scale, zero, codes, ntok, d, k);
    case 2: return dequant_keys<2>(scale, zero, codes, ntok, d, k);
    case 3: return dequant_keys<3>(scale, zero, codes, ntok, d, k);
    case 4: return dequant_keys<4>(scale, zero, codes, ntok, d, k);
    case 8: return dequant_keys<8>(scale, zero, codes, ntok, d, k);
    default: return scalar::kTable.kivi_dequant_keys(scale, zero, codes, ntok, d, bits, k);
  }
}
void kivi_dequant_values_k(const std::uint16_t* scale, const std::uint16_t* zero, const std::uint8_t* codes,
                           int ntok, int d, int bits, int vg, float* v) noexcept {
  switch (bits) {
    case 1: return dequant_values<1>(scale, zero, codes, ntok, d, vg, v);
    case 2: return dequant_values<2>(scale, zero, codes, ntok, d, vg, v);
    case 3: return dequant_values<3>(scale, zero, codes, ntok, d, vg, v);
    case 4: return dequant_values<4>(scale, zero, codes, ntok, d, vg, v);
    case 8: return dequant_values<8>(scale, zero, codes, ntok, d, vg, v);
    default: return scalar::kTable.kivi_dequant_values(scale, zero, codes, ntok, d, bits, vg, v);
  }
}

template <int B>
void kivi_scores_b(const float* q, int nq, const std::uint16_t* scale, const std::uint16_t* zero,
                   const std::uint8_t* codes, int ntok, int d, float* s) noexcept {
  switch (d) {
    case 64: return kivi_scores_g<B, 64>(q, nq, scale, zero, codes, ntok, d, s);
    case 128: return kivi_scores_g<B, 128>(q, nq, scale, zero, codes, ntok, d, s);
    case 256: return kivi_scores_g<B, 256>(q, nq, scale, zero, codes, ntok, d, s);
    default: return kivi_scores_g<B, 0>(q, nq, scale, zero, codes, ntok, d, s);
  }
}
template <int B>
void kivi_accum_b(const float* p, int nq, const std::uint16_t* scale, const std::uint16_t* zero,
                  const std::uint8_t* codes, int ntok, int d, int vg, float* o) noexcept {
  switch (d) {
    case 64: return kivi_accum_g<B, 64>(p, nq, scale, zero, codes, ntok, d, vg, o);
    case 128: return kivi_accum_g<B, 128>(p, nq, scale, zero, codes, ntok, d, vg, o);
    case 256: return kivi_accum_g<B, 256>(p, nq, scale, zero, codes, ntok, d, vg, o);
    default: return kivi_accum_g<B, 0>(p, nq, scale, zero, codes, ntok, d, vg, o);
  }
}
void kivi_scores_generic(const float* q, int nq, const std::uint16_t* scale, const std::uint16_t* zero,
                         const std::uint8_t* codes, int ntok, int d, int bits, float* s) noexcept {
  switch (bits) {
    case 1: return kivi_scores_b<1>(q, nq, scale, zero, codes, ntok, d, s);
    case 2: return kivi_scores_b<2>(q, nq, scale, zero, codes, ntok, d, s);
    case 3: return kivi_scores_b<3>(q, nq, scale, zero, codes, ntok, d, s);
    case 4: return kivi_scores_b<4>(q, nq, scale, zero, codes, ntok, d, s);
    case 8: return kivi_scores_b<8>(q, nq, scale, zero, codes, ntok, d, s);
    default: return scalar::kTable.kivi_scores(q, nq, scale, zero, codes, ntok, d, bits, s);
  }
}
void kivi_accum_generic(const float* p, int nq, const std::uint16_t* scale, const std::uint16_t* zero,
                        const std::uint8_t* codes, int ntok, int d, int bits, int vg, float* o) noexcept {
  switch (bits) {
    case 1: return kivi_accum_b<1>(p, nq, scale, zero, codes, ntok, d, vg, o);
    case 2: return kivi_accum_b<2>(p, nq, scale, zero, codes, ntok, d, vg, o);
    case 3: return kivi_accum_b<3>(p, nq, scale, zero, codes, ntok, d, vg, o);
    case 4: return kivi_accum_b<4>(p, nq, scale, zero, codes, ntok, d, vg, o);
    case 8: return kivi_accum_b<8>(p, nq, scale, zero, codes, ntok, d, vg, o);
    default: return scalar::kTable.kivi_accum(p, nq, scale, zero, codes, ntok, d, bits, vg, o);
  }
}

#undef KVSLIM_DISPATCH_D

// --- fused block attention (kernel_table.h) ---
#include "kernels/block-inl.h"

void mask_block_k(float* s, int nq, int ntok, const BlockMask& mask) noexcept { mask_block_impl(s, nq, ntok, mask); }

template <class K, class ScoresFn, class AccumFn>
inline void attend_dense_k(const float* q, int nq, const K* k, const K* v, int ntok, int d, const BlockMask& mask,
                           OnlineState& st, ScoresFn scores, AccumFn accum) noexcept {
  fused_block(
      nq, ntok, mask, st, [&](float* s) { scores(q, nq, k, ntok, d, s); },
      [&](float* s, float* m, float* l, float* o) { softmax_block_k(s, nq, ntok, m, l, o, d); },
      [&](const float* p, float* o) { accum(p, nq, v, ntok, d, o); });
}
void attend_f32_k(const float* q, int nq, const float* k, const float* v, int ntok, int d, const BlockMask& mask,
                  OnlineState& st) noexcept {
  attend_dense_k(q, nq, k, v, ntok, d, mask, st, scores_f32_k, accum_f32_k);
}
void attend_f16_k(const float* q, int nq, const std::uint16_t* k, const std::uint16_t* v, int ntok, int d,
                  const BlockMask& mask, OnlineState& st) noexcept {
  attend_dense_k(q, nq, k, v, ntok, d, mask, st, scores_f16_k, accum_f16_k);
}
void attend_bf16_k(const float* q, int nq, const std::uint16_t* k, const std::uint16_t* v, int ntok, int d,
                   const BlockMask& mask, OnlineState& st) noexcept {
  attend_dense_k(q, nq, k, v, ntok, d, mask, st, scores_bf16_k, accum_bf16_k);
}

using KiviScoresFn = void (*)(const float*, int, const std::uint16_t*, const std::uint16_t*, const std::uint8_t*, int,
                              int, int, float*) noexcept;
using KiviAccumFn = void (*)(const float*, int, const std::uint16_t*, const std::uint16_t*, const std::uint8_t*, int,
                             int, int, int, float*) noexcept;
// One page: the translation unit picks its score and accumulation kernels.
template <KiviScoresFn Scores, KiviAccumFn Accum>
void attend_kivi_t(const float* q, int nq, const KiviPage& pg, int ntok, int d, const BlockMask& mask,
                   OnlineState& st) noexcept {
  fused_block(
      nq, ntok, mask, st, [&](float* s) { Scores(q, nq, pg.kscale, pg.kzero, pg.kcodes, ntok, d, pg.kbits, s); },
      [&](float* s, float* m, float* l, float* o) { softmax_block_k(s, nq, ntok, m, l, o, d); },
      [&](const float* p, float* o) { Accum(p, nq, pg.vscale, pg.vzero, pg.vcodes, ntok, d, pg.vbits, pg.vgroup, o); });
}


// --- NUQ (kernel_table.h, "NUQ page layout") ---
// The codes index a table of 2^B levels held in registers (vlevels / vlookup of the ISA's
// simd header); a token's f16 scale multiplies its logit once (scores) or folds into its
// softmax weight (values). The encoder is the scalar table's (bit-identical codes everywhere).
void nuq_quant_k(const float* x, int ntok, int d, int bits, const float* levels, std::uint16_t* scale,
                 std::uint8_t* codes) noexcept {
  scalar::kTable.nuq_quant(x, ntok, d, bits, levels, scale, codes);
}

template <int B>
void nuq_dequant_b(const std::uint16_t* scale, const std::uint8_t* codes, int ntok, int d, const float* levels,
                   float* x) noexcept {
  const int rb = rowb(d, B);
  const VLevels lv = vlevels(levels, 1 << B);
  for (int j = 0; j < ntok; ++j) {
    const std::uint8_t* row = codes + off(j, rb);
    float* out = x + off(j, d);
    const VF s = vset1(h2f(scale[j]));
    int c = 0;
    for (; c + kL <= d; c += kL) vstore(out + c, vmul(s, vlookup<B>(vcode_idx<B>(row + c * B / 8), lv)));
    if (c < d) vstore_n(out + c, vmul(s, vlookup<B>(vcodes_i<B, false>(row + c * B / 8, d - c), lv)), d - c);
  }
}

// Scores: kRB rows x kTB tokens of partial dot products q . L[code] (each token's looked-up
// vector shared by the kRB rows), one transposed reduction per block; then every row is
// multiplied by the tokens' scales in one vector pass (the scales vary along the row, the
// reduction's lanes do not follow it).
template <int B, int D>
void nuq_scores_g(const float* q, int nq, const std::uint16_t* scale, const std::uint8_t* codes, int ntok, int dd,
                  const float* levels, float* s) noexcept {
  const int d = D ? D : dd;
  const int rb = rowb(d, B), nv = d / kL, tail = d - nv * kL;
  const VLevels lv = vlevels(levels, 1 << B);
  for (int r0 = 0; r0 < nq; r0 += kRB) {
    const int nr = imin(kRB, nq - r0);
    const float* qr[kRB];
    for (int r = 0; r < kRB; ++r) qr[r] = q + off(r0 + imin(r, nr - 1), d);  // spare rows repeat the last
    for (int j0 = 0; j0 < ntok; j0 += kTB) {
      const int nt = imin(kTB, ntok - j0);
      const std::uint8_t* kr[kTB];
      for (int t = 0; t < kTB; ++t) kr[t] = codes + off(j0 + imin(t, nt - 1), rb);
      VF acc[kL];
      for (int i = 0; i < kL; ++i) acc[i] = vzero();
      for (int v = 0; v < nv; ++v) {
        VF kv[kTB];
        for (int t = 0; t < kTB; ++t) kv[t] = vlookup<B>(vcode_idx<B>(kr[t] + v * kL * B / 8), lv);
        for (int r = 0; r < kRB; ++r) {
          const VF qv = vload(qr[r] + v * kL);
          for (int t = 0; t < kTB; ++t) acc[r * kTB + t] = vfma(qv, kv[t], acc[r * kTB + t]);
        }
      }
      if (D == 0 && tail) {  // lanes >= tail look up code 0, against query lanes of 0
        VF kv[kTB];
        for (int t = 0; t < kTB; ++t) kv[t] = vlookup<B>(vcodes_i<B, false>(kr[t] + nv * kL * B / 8, tail), lv);
        for (int r = 0; r < kRB; ++r) {
          const VF qv = vload_n(qr[r] + nv * kL, tail);
          for (int t = 0; t < kTB; ++t) acc[r * kTB + t] = vfma(qv, kv[t], acc[r * kTB + t]);
        }
      }
      store_block(s + off(r0, ntok) + j0, ntok, vhsum(acc), nr, nt);
    }
  }
  // s[r][j] *= scale_j, kL tokens at a time.
  for (int j = 0; j < ntok; j += kL) {
    const int n = imin(kL, ntok - j);
    const VF sc = n == kL ? vload_h(scale + j) : vload_h_n(scale + j, n);
    for (int r = 0; r < nq; ++r) {
      float* sr = s + off(r, ntok) + j;
      if (n == kL)
        vstore(sr, vmul(vload(sr), sc));
      else
        vstore_n(sr, vmul(vload_n(sr, n), sc), n);
    }
  }
}

// Values: per chunk of kVC tokens every row's weights w = p * scale are formed once; then per
// column block of up to kCB vectors the token loop looks each code vector up once and adds it
// into the kRB rows' accumulators with one FMA each.
template <int B, bool kFull>
inline void nuq_accum_block(const float (*w)[64], float* const* orow, int nr, const std::uint8_t* codes, int rb,
                            int tc, const VLevels& lv, int c0, int nc) noexcept {
  VF acc[kRB][kCB];
  int nl[kCB];
  for (int b = 0; b < kCB; ++b) {
    const int rest = nc - b * kL;
    nl[b] = kFull ? kL : (rest < 0 ? 0 : imin(rest, kL));
  }
  for (int r = 0; r < kRB; ++r)
    for (int b = 0; b < kCB; ++b) acc[r][b] = kFull ? vload(orow[r] + c0 + b * kL) : vload_n(orow[r] + c0 + b * kL, nl[b]);
  for (int j = 0; j < tc; ++j) {
    const std::uint8_t* row = codes + off(j, rb) + c0 * B / 8;
    VF x[kCB];
    for (int b = 0; b < kCB; ++b)
      x[b] = kFull ? vlookup<B>(vcode_idx<B>(row + b * kL * B / 8), lv)
                   : (nl[b] ? vlookup<B>(vcodes_i<B, false>(row + b * kL * B / 8, nl[b]), lv) : vzero());
    for (int r = 0; r < kRB; ++r) {
      const VF wb = vset1(w[r][j]);
      for (int b = 0; b < kCB; ++b) acc[r][b] = vfma(wb, x[b], acc[r][b]);
    }
  }
  for (int r = 0; r < nr; ++r)
    for (int b = 0; b < kCB; ++b) {
      if (kFull)
        vstore(orow[r] + c0 + b * kL, acc[r][b]);
      else if (nl[b])
        vstore_n(orow[r] + c0 + b * kL, acc[r][b], nl[b]);
    }
}
template <int B, int D>
void nuq_accum_g(const float* p, int nq, const std::uint16_t* scale, const std::uint8_t* codes, int ntok, int dd,
                 const float* levels, float* o) noexcept {
  const int d = D ? D : dd;
  const int rb = rowb(d, B);
  constexpr int kVC = 64;
  const VLevels lv = vlevels(levels, 1 << B);
  alignas(64) float sf[kVC], w[kRB][kVC];
  for (int j0 = 0; j0 < ntok; j0 += kVC) {
    const int tc = imin(kVC, ntok - j0);
    for (int j = 0; j < tc; j += kL) {
      const int n = imin(kL, tc - j);
      vstore_n(sf + j, vload_h_n(scale + j0 + j, n), n);
    }
    for (int r0 = 0; r0 < nq; r0 += kRB) {
      const int nr = imin(kRB, nq - r0);
      float* orow[kRB];
      for (int r = 0; r < kRB; ++r) {
        const int rr = r0 + imin(r, nr - 1);  // spare rows repeat the last (never stored)
        orow[r] = o + off(rr, d);
        const float* pr = p + off(rr, ntok) + j0;
        for (int j = 0; j < tc; j += kL) {
          const int n = imin(kL, tc - j);
          vstore_n(w[r] + j, vmul(vload_n(pr + j, n), vload_n(sf + j, n)), n);
        }
      }
      const std::uint8_t* cj = codes + off(j0, rb);
      int c0 = 0;
      for (; c0 + kCB * kL <= d; c0 += kCB * kL) nuq_accum_block<B, true>(w, orow, nr, cj, rb, tc, lv, c0, kCB * kL);
      if (c0 < d) nuq_accum_block<B, false>(w, orow, nr, cj, rb, tc, lv, c0, d - c0);
    }
  }
}

// bits 1..4 x head_dim 64/128/256 specialized, any other head_dim generic (key: d <= kMaxD < 10000).
#define KVSLIM_NUQ_DISPATCH(fn, bits, d, ...)   \
  switch ((bits) * 10000 + (d)) {               \
    case 10064: return fn<1, 64>(__VA_ARGS__);  \
    case 10128: return fn<1, 128>(__VA_ARGS__); \
    case 10256: return fn<1, 256>(__VA_ARGS__); \
    case 20064: return fn<2, 64>(__VA_ARGS__);  \
    case 20128: return fn<2, 128>(__VA_ARGS__); \
    case 20256: return fn<2, 256>(__VA_ARGS__); \
    case 30064: return fn<3, 64>(__VA_ARGS__);  \
    case 30128: return fn<3, 128>(__VA_ARGS__); \
    case 30256: return fn<3, 256>(__VA_ARGS__); \
    case 40064: return fn<4, 64>(__VA_ARGS__);  \
    case 40128: return fn<4, 128>(__VA_ARGS__); \
    case 40256: return fn<4, 256>(__VA_ARGS__); \
    default:                                    \
      switch (bits) {                           \
        case 1: return fn<1, 0>(__VA_ARGS__);   \
        case 2: return fn<2, 0>(__VA_ARGS__);   \
        case 3: return fn<3, 0>(__VA_ARGS__);   \
        default: return fn<4, 0>(__VA_ARGS__);  \
      }                                         \
  }

void nuq_dequant_k(const std::uint16_t* scale, const std::uint8_t* codes, int ntok, int d, int bits,
                   const float* levels, float* x) noexcept {
  switch (bits) {
    case 1: return nuq_dequant_b<1>(scale, codes, ntok, d, levels, x);
    case 2: return nuq_dequant_b<2>(scale, codes, ntok, d, levels, x);
    case 3: return nuq_dequant_b<3>(scale, codes, ntok, d, levels, x);
    default: return nuq_dequant_b<4>(scale, codes, ntok, d, levels, x);
  }
}
void nuq_scores_k(const float* q, int nq, const std::uint16_t* scale, const std::uint8_t* codes, int ntok, int d,
                  int bits, const float* levels, float* s) noexcept {
  KVSLIM_NUQ_DISPATCH(nuq_scores_g, bits, d, q, nq, scale, codes, ntok, d, levels, s)
}
void nuq_accum_k(const float* p, int nq, const std::uint16_t* scale, const std::uint8_t* codes, int ntok, int d,
                 int bits, const float* levels, float* o) noexcept {
  KVSLIM_NUQ_DISPATCH(nuq_accum_g, bits, d, p, nq, scale, codes, ntok, d, levels, o)
}
#undef KVSLIM_NUQ_DISPATCH

void attend_nuq_k(const float* q, int nq, const NuqPage& pg, int ntok, int d, const BlockMask& mask,
                  OnlineState& st) noexcept {
  fused_block(
      nq, ntok, mask, st, [&](float* s) { nuq_scores_k(q, nq, pg.kscale, pg.kcodes, ntok, d, pg.kbits, pg.klevels, s); },
      [&](float* s, float* m, float* l, float* o) { softmax_block_k(s, nq, ntok, m, l, o, d); },
      [&](const float* p, float* o) { nuq_accum_k(p, nq, pg.vscale, pg.vcodes, ntok, d, pg.vbits, pg.vlevels, o); });
}
