// Scalar kernel table: plain C++ with no ISA assumptions. These are the reference oracles
// (`*_ref`) that every SIMD table is tested against, so they favour obviousness over speed.
#include <cmath>
#include <cstdint>
#include <limits>

#include "kvslim/kernels/kernel_table.h"
#include "kvslim/tensor/dtype.h"

namespace kvslim::kernels::scalar {
namespace {

inline unsigned get_code(const std::uint8_t* row, int c, int bits) noexcept {
  const int bit = c * bits;
  // A code spans at most two bytes for bits <= 8.
  unsigned w = row[bit >> 3];
  if ((bit & 7) + bits > 8) w |= static_cast<unsigned>(row[(bit >> 3) + 1]) << 8;
  return (w >> (bit & 7)) & ((1u << bits) - 1u);
}

inline void put_code(std::uint8_t* row, int c, int bits, unsigned code) noexcept {
  const int bit = c * bits;
  const unsigned w = code << (bit & 7);
  row[bit >> 3] = static_cast<std::uint8_t>(row[bit >> 3] | (w & 0xffu));
  if ((bit & 7) + bits > 8) row[(bit >> 3) + 1] = static_cast<std::uint8_t>(row[(bit >> 3) + 1] | (w >> 8));
}

// The quantization rule of kernel_table.h for one group; writes scale/zero bits.
struct GroupParams {
  float scale, zero, inv;
};
inline GroupParams group_params(float mn, float mx, int bits, std::uint16_t* scale_bits,
                                std::uint16_t* zero_bits) noexcept {
  const float qmax = static_cast<float>((1 << bits) - 1);
  *zero_bits = f32_to_f16(mn);
  const float zero = f16_to_f32(*zero_bits);
  *scale_bits = f32_to_f16((mx - zero) / qmax);
  const float scale = f16_to_f32(*scale_bits);
  return {scale, zero, scale > 0.0f ? 1.0f / scale : 0.0f};
}
inline unsigned quantize(float x, const GroupParams& g, int bits) noexcept {
  const float qmax = static_cast<float>((1 << bits) - 1);
  float c = std::nearbyint((x - g.zero) * g.inv);
  c = c < 0.0f ? 0.0f : (c > qmax ? qmax : c);
  return static_cast<unsigned>(c);
}

void f32_to_f16_ref(const float* src, std::uint16_t* dst, std::size_t n) noexcept {
  for (std::size_t i = 0; i < n; ++i) dst[i] = f32_to_f16(src[i]);
}
void f16_to_f32_ref(const std::uint16_t* src, float* dst, std::size_t n) noexcept {
  for (std::size_t i = 0; i < n; ++i) dst[i] = f16_to_f32(src[i]);
}
void f32_to_bf16_ref(const float* src, std::uint16_t* dst, std::size_t n) noexcept {
  for (std::size_t i = 0; i < n; ++i) dst[i] = f32_to_bf16(src[i]);
}
void bf16_to_f32_ref(const std::uint16_t* src, float* dst, std::size_t n) noexcept {
  for (std::size_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(src[i]);
}

template <class Load>
void scores_dense(const float* q, int nq, int ntok, int d, float* s, Load load) noexcept {
  for (int r = 0; r < nq; ++r)
    for (int j = 0; j < ntok; ++j) {
      float acc = 0.0f;
      for (int c = 0; c < d; ++c) acc += q[r * d + c] * load(j, c);
      s[r * ntok + j] = acc;
    }
}
template <class Load>
void accum_dense(const float* p, int nq, int ntok, int d, float* o, Load load) noexcept {
  for (int r = 0; r < nq; ++r)
    for (int j = 0; j < ntok; ++j) {
      const float w = p[r * ntok + j];
      if (w == 0.0f) continue;
      for (int c = 0; c < d; ++c) o[r * d + c] += w * load(j, c);
    }
}

void scores_f32_ref(const float* q, int nq, const float* k, int ntok, int d, float* s) noexcept {
  scores_dense(q, nq, ntok, d, s, [&](int j, int c) { return k[j * d + c]; });
}
void scores_f16_ref(const float* q, int nq, const std::uint16_t* k, int ntok, int d, float* s) noexcept {
  scores_dense(q, nq, ntok, d, s, [&](int j, int c) { return f16_to_f32(k[j * d + c]); });
}
void scores_bf16_ref(const float* q, int nq, const std::uint16_t* k, int ntok, int d, float* s) noexcept {
  scores_dense(q, nq, ntok, d, s, [&](int j, int c) { return bf16_to_f32(k[j * d + c]); });
}
void accum_f32_ref(const float* p, int nq, const float* v, int ntok, int d, float* o) noexcept {
  accum_dense(p, nq, ntok, d, o, [&](int j, int c) { return v[j * d + c]; });
}
void accum_f16_ref(const float* p, int nq, const std::uint16_t* v, int ntok, int d, float* o) noexcept {
  accum_dense(p, nq, ntok, d, o, [&](int j, int c) { return f16_to_f32(v[j * d + c]); });
}
void accum_bf16_ref(const float* p, int nq, const std::uint16_t* v, int ntok, int d, float* o) noexcept {
  accum_dense(p, nq, ntok, d, o, [&](int j, int c) { return bf16_to_f32(v[j * d + c]); });
}

void softmax_block_ref(float* s, int nq, int ntok, float* m, float* l, float* o, int d) noexcept {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  for (int r = 0; r < nq; ++r) {
    float* row = s + static_cast<std::ptrdiff_t>(r) * ntok;
    float bm = kNegInf;
    for (int j = 0; j < ntok; ++j) bm = row[j] > bm ? row[j] : bm;
    const float mnew = bm > m[r] ? bm : m[r];
    if (mnew == kNegInf) {  // everything masked so far
      for (int j = 0; j < ntok; ++j) row[j] = 0.0f;
      continue;
    }
    const float alpha = std::exp(m[r] - mnew);  // exp(-inf) = 0 on the first block
    float sum = 0.0f;
    for (int j = 0; j < ntok; ++j) {
      row[j] = std::exp(row[j] - mnew);
      sum += row[j];
    }
    if (alpha != 1.0f)
      for (int c = 0; c < d; ++c) o[r * d + c] *= alpha;
    l[r] = l[r] * alpha + sum;
    m[r] = mnew;
  }
}

void kivi_quant_keys_ref(const float* k, int ntok, int d, int bits, std::uint16_t* scale,
                         std::uint16_t* zero, std::uint8_t* codes) noexcept {
  const int rb = row_bytes(d, bits);
  for (int i = 0; i < ntok * rb; ++i) codes[i] = 0;
  for (int c = 0; c < d; ++c) {
    float mn = k[c], mx = k[c];
    for (int j = 1; j < ntok; ++j) {
      mn = k[j * d + c] < mn ? k[j * d + c] : mn;
      mx = k[j * d + c] > mx ? k[j * d + c] : mx;
    }
    const GroupParams g = group_params(mn, mx, bits, &scale[c], &zero[c]);
    for (int j = 0; j < ntok; ++j) put_code(codes + j * rb, c, bits, quantize(k[j * d + c], g, bits));
  }
}

void kivi_quant_values_ref(const float* v, int ntok, int d, int bits, int vgroup, std::uint16_t* scale,
                           std::uint16_t* zero, std::uint8_t* codes) noexcept {
  const int rb = row_bytes(d, bits);
  const int ng = d / vgroup;
  for (int i = 0; i < ntok * rb; ++i) codes[i] = 0;
  for (int j = 0; j < ntok; ++j) {
    const float* x = v + j * d;
    for (int g = 0; g < ng; ++g) {
      float mn = x[g * vgroup], mx = x[g * vgroup];
      for (int c = g * vgroup; c < (g + 1) * vgroup; ++c) {
        mn = x[c] < mn ? x[c] : mn;
        mx = x[c] > mx ? x[c] : mx;
      }
      const GroupParams gp = group_params(mn, mx, bits, &scale[j * ng + g], &zero[j * ng + g]);
      for (int c = g * vgroup; c < (g + 1) * vgroup; ++c) put_code(codes + j * rb, c, bits, quantize(x[c], gp, bits));
    }
  }
}

void kivi_dequant_keys_ref(const std::uint16_t* scale, const std::uint16_t* zero, const std::uint8_t* codes,
                           int ntok, int d, int bits, float* k) noexcept {
  const int rb = row_bytes(d, bits);
  for (int j = 0; j < ntok; ++j)
    for (int c = 0; c < d; ++c)
      k[j * d + c] = static_cast<float>(get_code(codes + j * rb, c, bits)) * f16_to_f32(scale[c]) +
                     f16_to_f32(zero[c]);
}

void kivi_dequant_values_ref(const std::uint16_t* scale, const std::uint16_t* zero, const std::uint8_t* codes,
                             int ntok, int d, int bits, int vgroup, float* v) noexcept {
  const int rb = row_bytes(d, bits);
  const int ng = d / vgroup;
  for (int j = 0; j < ntok; ++j)
    for (int c = 0; c < d; ++c) {
      const int g = j * ng + c / vgroup;
      v[j * d + c] = static_cast<float>(get_code(codes + j * rb, c, bits)) * f16_to_f32(scale[g]) +
                     f16_to_f32(zero[g]);
    }
}

// q.k = sum_c q_c (s_c code_c + z_c) = sum_c (q_c s_c) code_c + sum_c q_c z_c: the scale
// moves into the query once per page and the zero point becomes one constant per row.
void kivi_scores_ref(const float* q, int nq, const std::uint16_t* scale, const std::uint16_t* zero,
                     const std::uint8_t* codes, int ntok, int d, int bits, float* s) noexcept {
  const int rb = row_bytes(d, bits);
  for (int r = 0; r < nq; ++r) {
    float bias = 0.0f;
    for (int c = 0; c < d; ++c) bias += q[r * d + c] * f16_to_f32(zero[c]);
    for (int j = 0; j < ntok; ++j) {
      float acc = 0.0f;
      for (int c = 0; c < d; ++c)
        acc += q[r * d + c] * f16_to_f32(scale[c]) * static_cast<float>(get_code(codes + j * rb, c, bits));
      s[r * ntok + j] = acc + bias;
    }
  }
}

// o_c += sum_j p_j (s_jg code_jc + z_jg) = sum_j (p_j s_jg) code_jc + sum_j p_j z_jg.
void kivi_accum_ref(const float* p, int nq, const std::uint16_t* scale, const std::uint16_t* zero,
                    const std::uint8_t* codes, int ntok, int d, int bits, int vgroup, float* o) noexcept {
  const int rb = row_bytes(d, bits);
  const int ng = d / vgroup;
  for (int r = 0; r < nq; ++r)
    for (int j = 0; j < ntok; ++j) {
      const float w = p[r * ntok + j];
      if (w == 0.0f) continue;
      for (int c = 0; c < d; ++c) {
        const int g = j * ng + c / vgroup;
        o[r * d + c] += w * (f16_to_f32(scale[g]) * static_cast<float>(get_code(codes + j * rb, c, bits)) +
                             f16_to_f32(zero[g]));
      }
    }
}

#include "kernels/block-inl.h"

void mask_block_ref(float* s, int nq, int ntok, const BlockMask& mask) noexcept { mask_block_impl(s, nq, ntok, mask); }

template <class K, class ScoresFn, class AccumFn>
void attend_dense_ref(const float* q, int nq, const K* k, const K* v, int ntok, int d, const BlockMask& mask,
                      OnlineState& st, ScoresFn scores, AccumFn accum) noexcept {
  fused_block(
      nq, ntok, mask, st, [&](float* s) { scores(q, nq, k, ntok, d, s); },
      [&](float* s, float* m, float* l, float* o) { softmax_block_ref(s, nq, ntok, m, l, o, d); },
      [&](const float* p, float* o) { accum(p, nq, v, ntok, d, o); });
}
void attend_f32_ref(const float* q, int nq, const float* k, const float* v, int ntok, int d, const BlockMask& mask,
                    OnlineState& st) noexcept {
  attend_dense_ref(q, nq, k, v, ntok, d, mask, st, scores_f32_ref, accum_f32_ref);
}
void attend_f16_ref(const float* q, int nq, const std::uint16_t* k, const std::uint16_t* v, int ntok, int d,
                    const BlockMask& mask, OnlineState& st) noexcept {
  attend_dense_ref(q, nq, k, v, ntok, d, mask, st, scores_f16_ref, accum_f16_ref);
}
void attend_bf16_ref(const float* q, int nq, const std::uint16_t* k, const std::uint16_t* v, int ntok, int d,
                     const BlockMask& mask, OnlineState& st) noexcept {
  attend_dense_ref(q, nq, k, v, ntok, d, mask, st, scores_bf16_ref, accum_bf16_ref);
}
void attend_kivi_ref(const float* q, int nq, const KiviPage& pg, int ntok, int d, const BlockMask& mask,
                     OnlineState& st) noexcept {
  fused_block(
      nq, ntok, mask, st,
      [&](float* s) { kivi_scores_ref(q, nq, pg.kscale, pg.kzero, pg.kcodes, ntok, d, pg.kbits, s); },
      [&](float* s, float* m, float* l, float* o) { softmax_block_ref(s, nq, ntok, m, l, o, d); },
      [&](const float* p, float* o) {
        kivi_accum_ref(p, nq, pg.vscale, pg.vzero, pg.vcodes, ntok, d, pg.vbits, pg.vgroup, o);
      });
}

// --- KIVI attention with 8-bit integer dot products (kernel_table.h, attend_kivi_q8) ---
// Written as the definition reads: the integer sums in int32 (exact for every supported
// shape: |q8 code| <= 127 * 255 per channel and d <= 4096; w8 code <= 255 * 255 per token and
// ntok <= 4096, both far below 2^31).
constexpr float kQ8Tiny = 0x1p-100f;  // amax / wmax at or below this: the inverse step is 0
bool all_finite(const float* x, int n) noexcept {
  for (int i = 0; i < n; ++i)
    if (!std::isfinite(x[i])) return false;
  return true;
}

void kivi_q8_scores_ref(const float* q, int nq, const std::uint16_t* scale, const std::uint16_t* zero,
                        const std::uint8_t* codes, int ntok, int d, int bits, float* s) noexcept {
  const int rb = row_bytes(d, bits);
  float qs[4096];
  int q8[4096];
  for (int r = 0; r < nq; ++r) {
    const float* qr = q + static_cast<std::ptrdiff_t>(r) * d;
    float amax = 0.0f, bias = 0.0f;
    for (int c = 0; c < d; ++c) {
      qs[c] = qr[c] * f16_to_f32(scale[c]);
      amax = std::fabs(qs[c]) > amax ? std::fabs(qs[c]) : amax;
      bias += qr[c] * f16_to_f32(zero[c]);
    }
    if (!all_finite(qs, d)) {  // the full-precision formula for this row
      kivi_scores_ref(qr, 1, scale, zero, codes, ntok, d, bits, s + static_cast<std::ptrdiff_t>(r) * ntok);
      continue;
    }
    const float S = amax / 127.0f, inv = amax > kQ8Tiny ? 127.0f / amax : 0.0f;
    for (int c = 0; c < d; ++c) q8[c] = static_cast<int>(std::nearbyint(qs[c] * inv));
    for (int j = 0; j < ntok; ++j) {
      std::int32_t acc = 0;
      for (int c = 0; c < d; ++c) acc += q8[c] * static_cast<std::int32_t>(get_code(codes + j * rb, c, bits));
      s[r * ntok + j] = S * static_cast<float>(acc) + bias;
    }
  }
}

void kivi_q8_accum_ref(const float* p, int nq, const std::uint16_t* scale, const std::uint16_t* zero,
                       const std::uint8_t* codes, int ntok, int d, int bits, int vgroup, float* o) noexcept {
  const int rb = row_bytes(d, bits);
  const int ng = d / vgroup;
  float wmax[4096], zs[4096];
  std::int32_t acc[4096];
  for (int r = 0; r < nq; ++r) {
    const float* pr = p + static_cast<std::ptrdiff_t>(r) * ntok;
    float* orow = o + static_cast<std::ptrdiff_t>(r) * d;
    bool finite = true;
    for (int g = 0; g < ng; ++g) wmax[g] = 0.0f, zs[g] = 0.0f;
    for (int j = 0; j < ntok; ++j)
      for (int g = 0; g < ng; ++g) {
        const float w = pr[j] == 0.0f ? 0.0f : pr[j] * f16_to_f32(scale[j * ng + g]);  // p = 0: nothing
        finite = finite && std::isfinite(w);
        wmax[g] = w > wmax[g] ? w : wmax[g];
        zs[g] += pr[j] * f16_to_f32(zero[j * ng + g]);
      }
    if (!finite) {  // the full-precision formula for this row
      kivi_accum_ref(pr, 1, scale, zero, codes, ntok, d, bits, vgroup, orow);
      continue;
    }
    for (int c = 0; c < d; ++c) acc[c] = 0;
    for (int g = 0; g < ng; ++g) {
      const float inv = wmax[g] > kQ8Tiny ? 255.0f / wmax[g] : 0.0f;
      for (int j = 0; j < ntok; ++j) {
        const float w = pr[j] == 0.0f ? 0.0f : pr[j] * f16_to_f32(scale[j * ng + g]);
        float w8 = std::nearbyint(w * inv);
        w8 = w8 < 0.0f ? 0.0f : (w8 > 255.0f ? 255.0f : w8);
        const std::int32_t wi = static_cast<std::int32_t>(w8);
        for (int c = g * vgroup; c < (g + 1) * vgroup; ++c)
          acc[c] += wi * static_cast<std::int32_t>(get_code(codes + j * rb, c, bits));
      }
    }
    for (int c = 0; c < d; ++c) {
      const int g = c / vgroup;
      orow[c] += wmax[g] / 255.0f * static_cast<float>(acc[c]) + zs[g];
    }
  }
}

void attend_kivi_q8_ref(const float* q, int nq, const KiviPage& pg, int ntok, int d, const BlockMask& mask,
                        OnlineState& st) noexcept {
  fused_block(
      nq, ntok, mask, st,
      [&](float* s) { kivi_q8_scores_ref(q, nq, pg.kscale, pg.kzero, pg.kcodes, ntok, d, pg.kbits, s); },
      [&](float* s, float* m, float* l, float* o) { softmax_block_ref(s, nq, ntok, m, l, o, d); },
      [&](const float* p, float* o) {
        kivi_q8_accum_ref(p, nq, pg.vscale, pg.vzero, pg.vcodes, ntok, d, pg.vbits, pg.vgroup, o);
      });
}

// --- NUQ (kernel_table.h, "NUQ page layout"): written as the rule reads. The encoder is
// the one every table runs (the SIMD tables call it), so codes and scales are the same on
// every ISA: plain double arithmetic in channel order, in a file built without FMA flags.
void nuq_quant_ref(const float* x, int ntok, int d, int bits, const float* levels, std::uint16_t* scale,
                   std::uint8_t* codes) noexcept {
  const int n = 1 << bits, rb = row_bytes(d, bits);
  double mid[15];
  for (int i = 0; i + 1 < n; ++i) mid[i] = 0.5 * (static_cast<double>(levels[i]) + static_cast<double>(levels[i + 1]));
  for (int j = 0; j < ntok; ++j) {
    const float* xr = x + static_cast<std::ptrdiff_t>(j) * d;
    std::uint8_t* row = codes + static_cast<std::ptrdiff_t>(j) * rb;
    for (int i = 0; i < rb; ++i) row[i] = 0;
    double ss = 0.0;
    for (int c = 0; c < d; ++c) ss += static_cast<double>(xr[c]) * xr[c];
    const double sigma = std::sqrt(ss / d);
    double xl = 0.0, ll = 0.0;
    for (int c = 0; c < d; ++c) {
      // The nearest level is the number of midpoints below x / sigma (a tie stays below).
      const double y = sigma > 0.0 ? xr[c] / sigma : 0.0;
      unsigned code = 0;
      while (static_cast<int>(code) + 1 < n && mid[code] < y) ++code;
      put_code(row, c, bits, code);
      const double lv = levels[code];
      xl += xr[c] * lv;
      ll += lv * lv;
    }
    scale[j] = sigma > 0.0 ? f32_to_f16(static_cast<float>(xl / ll)) : std::uint16_t{0};
  }
}

void nuq_dequant_ref(const std::uint16_t* scale, const std::uint8_t* codes, int ntok, int d, int bits,
                     const float* levels, float* x) noexcept {
  const int rb = row_bytes(d, bits);
  for (int j = 0; j < ntok; ++j) {
    const float s = f16_to_f32(scale[j]);
    for (int c = 0; c < d; ++c) x[j * d + c] = s * levels[get_code(codes + j * rb, c, bits)];
  }
}

void nuq_scores_ref(const float* q, int nq, const std::uint16_t* scale, const std::uint8_t* codes, int ntok, int d,
                    int bits, const float* levels, float* s) noexcept {
  const int rb = row_bytes(d, bits);
  for (int r = 0; r < nq; ++r)
    for (int j = 0; j < ntok; ++j) {
      float acc = 0.0f;
      for (int c = 0; c < d; ++c) acc += q[r * d + c] * levels[get_code(codes + j * rb, c, bits)];
      s[r * ntok + j] = f16_to_f32(scale[j]) * acc;
    }
}

void nuq_accum_ref(const float* p, int nq, const std::uint16_t* scale, const std::uint8_t* codes, int ntok, int d,
                   int bits, const float* levels, float* o) noexcept {
  const int rb = row_bytes(d, bits);
  for (int r = 0; r < nq; ++r)
    for (int j = 0; j < ntok; ++j) {
      if (p[r * ntok + j] == 0.0f) continue;
      const float w = p[r * ntok + j] * f16_to_f32(scale[j]);
      for (int c = 0; c < d; ++c) o[r * d + c] += w * levels[get_code(codes + j * rb, c, bits)];
    }
}

void attend_nuq_ref(const float* q, int nq, const NuqPage& pg, int ntok, int d, const BlockMask& mask,
                    OnlineState& st) noexcept {
  fused_block(
      nq, ntok, mask, st,
      [&](float* s) { nuq_scores_ref(q, nq, pg.kscale, pg.kcodes, ntok, d, pg.kbits, pg.klevels, s); },
      [&](float* s, float* m, float* l, float* o) { softmax_block_ref(s, nq, ntok, m, l, o, d); },
      [&](const float* p, float* o) { nuq_accum_ref(p, nq, pg.vscale, pg.vcodes, ntok, d, pg.vbits, pg.vlevels, o); });
}

#define KVSLIM_CQ_SOFTMAX softmax_block_ref
#include "kernels/cq-inl.h"
#undef KVSLIM_CQ_SOFTMAX

// The butterfly network of kernel_table.h, stage by stage, per power-of-two block of d.
void hadamard_rows_ref(float* x, int n, int d, const float* pre, const float* post) noexcept {
  for (int r = 0; r < n; ++r) {
    float* row = x + static_cast<std::ptrdiff_t>(r) * d;
    if (pre)
      for (int c = 0; c < d; ++c) row[c] *= pre[c];
    for (int base = 0, rest = d; rest > 0;) {
      int blk = 1;
      while (blk * 2 <= rest) blk *= 2;
      float* b = row + base;
      for (int h = 1; h < blk; h *= 2)
        for (int i = 0; i < blk; i += 2 * h)
          for (int j = i; j < i + h; ++j) {
            const float a = b[j], c = b[j + h];
            b[j] = a + c;
            b[j + h] = a - c;
          }
      base += blk;
      rest -= blk;
    }
    if (post)
      for (int c = 0; c < d; ++c) row[c] *= post[c];
  }
}

void rope_rows_ref(float* x, int n, int d, int half, bool interleaved, const float* cb, const float* sb,
                   const float* oc, const float* os, const int* off) noexcept {
  for (int j = 0; j < n; ++j) {
    if (off[j] < 0) continue;
    const float* c = oc + static_cast<std::ptrdiff_t>(off[j]) * half;
    const float* s = os + static_cast<std::ptrdiff_t>(off[j]) * half;
    float* r = x + static_cast<std::ptrdiff_t>(j) * d;
    for (int i = 0; i < half; ++i) {
      const float ci = cb[i] * c[i] - sb[i] * s[i], si = sb[i] * c[i] + cb[i] * s[i];
      float& a = r[interleaved ? 2 * i : i];
      float& b = r[interleaved ? 2 * i + 1 : i + half];
      const float a0 = a, b0 = b;
      a = a0 * ci - b0 * si;
      b = a0 * si + b0 * ci;
    }
  }
}

}  // namespace

extern const KernelTable kTable = {
    "scalar",
    f32_to_f16_ref, f16_to_f32_ref, f32_to_bf16_ref, bf16_to_f32_ref,
    scores_f32_ref, scores_f16_ref, scores_bf16_ref,
    accum_f32_ref, accum_f16_ref, accum_bf16_ref,
    softmax_block_ref,
    kivi_quant_keys_ref, kivi_quant_values_ref, kivi_dequant_keys_ref, kivi_dequant_values_ref,
    kivi_scores_ref, kivi_accum_ref,
    mask_block_ref, attend_f32_ref, attend_f16_ref, attend_bf16_ref, attend_kivi_ref,
    attend_kivi_q8_ref,
    cq_tables_g, cq_scores_g, cq_accum_g, attend_cq_g, cq_finish_g, cq_encode_g,
    hadamard_rows_ref, rope_rows_ref,
    nuq_quant_ref, nuq_dequant_ref, nuq_scores_ref, nuq_accum_ref, attend_nuq_ref,
};

}  // namespace kvslim::kernels::scalar
