// Internal: the per-ISA kernel table. Kernels are plain functions over pointers and sizes:
// noexcept, no allocation, no printing. One table per ISA lives in its own namespace and
// translation unit (src/kernels/<isa>/); the scalar table is complete and is the test oracle.
//
// Conventions for every kernel below:
//   d      head_dim (any value >= 1; 64/128/256 may be specialized)
//   q      [nq][d] f32 query rows, already multiplied by the softmax scale 1/sqrt(d)
//   s, p   [nq][ntok] f32 logits / probabilities, row stride ntok
//   o      [nq][d] f32 attention accumulators
//   f16/bf16 values are raw uint16 bit patterns
//
// KIVI page layout (see docs/formats.md):
//   keys   per-channel asymmetric quantization over the page's ntok tokens:
//          kscale[d], kzero[d] (f16), kcodes[ntok][row_bytes(d, kbits)]
//   values per-token asymmetric quantization over groups of vgroup channels:
//          vscale[ntok][d / vgroup], vzero[ntok][d / vgroup] (f16),
//          vcodes[ntok][row_bytes(d, vbits)]
//   A code row packs d codes LSB-first as a bit stream (code c occupies bits
//   [c*bits, (c+1)*bits) of the row), padded to a whole byte.
// Quantization rule (bit-exact across ISAs): over a group with min mn and max mx,
//   zero  = f16(mn)                       (round to nearest even)
//   scale = f16((mx - zero) / qmax)       qmax = 2^bits - 1
//   inv   = scale > 0 ? 1 / scale : 0     (f32 division)
//   code  = clamp(nearbyint((x - zero) * inv), 0, qmax)   (ties to even)
//   x'    = code * scale + zero
// bits is 1, 2, 3, 4 or 8. At bits = 1 (qmax = 1) the codes are 0/1 = the group's min/max:
// code = 1 exactly where (x - zero) * inv > 1/2 (a tie rounds to even, 0), and
// x' is zero or zero + scale, i.e. f16(mn) or f16(mn) + f16(mx - f16(mn)) (the group's
// min and max up to those two f16 roundings). A row of d 1-bit codes is ceil(d / 8) bytes.
//
// KIVI attention with 8-bit integer dot products (attend_kivi_q8; recipe kivi:qbits=8), on
// the page layout above. Per page and query row r (q already multiplied by 1/sqrt(d)), every
// float operation in f32, in this order:
//   keys    qs_c = q_c * kscale_c;  amax = max_c |qs_c|;  S = amax / 127;
//           inv = amax > 2^-100 ? 127 / amax : 0;  q8_c = nearbyint(qs_c * inv)  (in [-127, 127])
//           s_rj = S * float(sum_c q8_c code_jc) + sum_c q_c kzero_c
//           The integer sum is exact: |sum| <= 127 * 255 * d <= 127 * 255 * 4096 < 2^31. The
//           zero-point bias is the float sum of the full-precision path.
//   then the BlockMask, the online-softmax update and the probs copy exactly as every fused
//   kernel (mask_block, softmax_block), giving p_rj;
//   values  w_jg = p_rj * vscale_jg (0 where p_rj = 0, whatever the scale); per value group g
//           over the page's tokens: wmax_g = max(0, max_j w_jg);  W_g = wmax_g / 255;
//           inv_g = wmax_g > 2^-100 ? 255 / wmax_g : 0;  w8_jg = clamp(nearbyint(w_jg * inv_g), 0, 255)
//           o_rc += W_g * float(sum_j w8_jg code_jc) + sum_j p_rj vzero_jg      (g = c / vgroup)
//           The integer sum is exact: <= 255 * 255 * ntok <= 255 * 255 * 4096 < 2^31. The
//           zero-point sum is the float sum of the full-precision path. Weight scales are per
//           (row, page, value group), the finest a sum over tokens allows (a per-(row, page) W
//           costs the groups with smaller scales up to their ratio in resolution).
//   The 2^-100 threshold keeps 255 / wmax (127 / amax) finite; below it the integer term is
//   below 2^-100 * 255 * ntok (2^-100 * 255 * d) and is dropped.
//   q8 and w8 are bit-exact across ISAs given the same q and p (f32 products, an exact max,
//   one f32 division, one product, round to nearest even): outputs differ between ISAs only by
//   float summation order and by the few-ulp differences of the softmax exp, which can move a
//   w8 that lies within ~1e-6 of a rounding boundary by one step.
//   Non-finite rows: if some qs_c of a row is NaN or infinite, that row's logits for the page
//   come from the full-precision formula (kivi_scores); if some w_jg is, the row's value sum
//   for the page does (kivi_accum). NaN and infinities propagate as in attend_kivi.
//   Error bounds against attend_kivi on the same page (|rounding| <= 1/2 step):
//     logits   |s_rj - s_rj(full)| <= S / 2 * sum_c code_jc        (+ f32 rounding)
//              <= amax * d * (2^kbits - 1) / 254
//     values   |o_rc - o_rc(full)| <= W_g / 2 * sum_j code_jc      (same p; before / l)
//              <= max_j w_jg * ntok * (2^vbits - 1) / 510
//   After the softmax division, a logit error of at most eps moves the output by at most
//   (e^(2 eps) - 1) * (max_j v_jc - min_j v_jc) (tests/kernels_q8_test.cpp checks both).
//   The SIMD tables run integer kernels (VPMADDUBSW, int16 sums, VPMADDWD; no overflow for any
//   shape they take, see src/kernels/avx2/kivi_q8-inl.h) for kbits and vbits in {2, 4},
//   head_dim 64, 128 or 256, vgroup a multiple of 32 and pages of at most 128 tokens; other
//   pages (1-, 3- and 8-bit codes, other head_dims) run the scalar reference, same semantics.
//
// NUQ page layout (docs/formats.md "NUQ page"): per token, keys and values apart,
//   kscale[ntok], vscale[ntok] (f16), kcodes[ntok][row_bytes(d, kbits)],
//   vcodes[ntok][row_bytes(d, vbits)]; code rows packed LSB-first like KIVI's.
// A row x of d floats is stored as one f16 scale s and d indices into a table L of 2^bits
// ascending levels (bits 1..4; the codec passes the unit-Gaussian Lloyd-Max levels):
//   sigma  = sqrt(sum_c x_c^2 / d)                    (double, channels in order)
//   code_c = #{i : mid_i < x_c / sigma}, mid_i = (L[i] + L[i+1]) / 2 (double): the nearest
//            level, the lower one on a tie; sigma == 0: every code is the level nearest 0
//            (the lower on a tie) and s = 0
//   s      = f16(sum_c x_c L[code_c] / sum_c L[code_c]^2)   (double sums, then f32, then f16
//            round to nearest even): the least-squares scale for those codes
//   x'_c   = f32(s) * L[code_c]
// Every table encodes with the scalar code (bit-identical codes and scales on every ISA), and
// nuq_dequant is one float product per value (bit-identical too); nuq_scores / nuq_accum /
// attend_nuq differ from the scalar table only by summation order, FMA and the vector exp
// (tests/nuq_test.cpp). The levels are read from `levels` on every call (in registers on
// AVX2: VPERMILPS for <= 4 levels, VPERMPS for 8, two VPERMPS and a blend on code bit 3 for
// 16; AVX-512: one VPERMPS zmm). Attention reads the codes directly: q . x'_j = s_j sum_c
// q_c L[code_jc], and the value sum folds s_j into the softmax weight.
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvslim::kernels {

/// Bytes of one packed code row of d codes at `bits` bits.
constexpr int row_bytes(int d, int bits) noexcept { return (d * bits + 7) / 8; }

/// Which logits of one block of ntok slots attention must not see, and per-slot logit
/// biases. Applied between the scores and the softmax of every fused block kernel, in this
/// order: dead slots get -inf; the bias is added; the causal rule masks the rest.
struct BlockMask {
  /// Bit j set: slot j was evicted (probability exactly 0). Null: every slot is live.
  const std::uint64_t* dead = nullptr;
  /// Logit bias of slot j (ln of the token's weight: a compensation or merged token stands
  /// for several), or null.
  const float* bias = nullptr;
  /// Causal rule: the block's first live slot has logical index `first`; row r sees live
  /// slots whose index is below limit0 + r % nquery. limit0 = kNoLimit masks nothing.
  std::int64_t first = 0;
  std::int64_t limit0 = kNoLimit;
  int nquery = 1;
  static constexpr std::int64_t kNoLimit = INT64_MAX / 2;
};

/// Online-softmax state of nq query rows, carried across the blocks of one attend call and
/// updated by every fused block kernel (see softmax_block for the update rule).
struct OnlineState {
  float* m;  // [nq] running maximum logit
  float* l;  // [nq] running sum of exp(logit - m)
  float* o;  // [nq][d] running sum of exp(logit - m) * value
  float* s;  // scratch of at least nq * ntok floats
  /// If set: the block's probabilities exp(logit - m), m as it is after the block, are
  /// copied to probs[r * probs_stride + j] (attention mass for scorers).
  float* probs = nullptr;
  std::int64_t probs_stride = 0;
  /// Memory the caller reads a few blocks later (a later page): the kernel issues software
  /// prefetches for these bytes spread between its steps, so that the misses overlap its
  /// arithmetic instead of stalling on full fill buffers in one burst. May be null.
  const void* prefetch = nullptr;
  std::size_t prefetch_bytes = 0;
};

/// One KIVI page, its parts located (layout above; docs/formats.md).
struct KiviPage {
  const std::uint16_t* kscale;
  const std::uint16_t* kzero;
  const std::uint8_t* kcodes;
  const std::uint16_t* vscale;
  const std::uint16_t* vzero;
  const std::uint8_t* vcodes;
  int kbits, vbits, vgroup;
};

/// One CQ page (coupled quantization, docs/formats.md "cq page"): per token one packed row of
/// key codes and one of value codes. A row holds `groups` codes of `cbits` = C·B bits each,
/// LSB-first like a KIVI code row; code g of a row is the index of the centroid of channel
/// group g ([g·C, (g+1)·C)).
struct CqPage {
  const std::uint8_t* kcodes;  // [ntok][row_bytes(kgroups, kcbits)]
  const std::uint8_t* vcodes;  // [ntok][row_bytes(vgroups, vcbits)]
  int kgroups, kcbits, vgroups, vcbits;
};

/// The query-side state of CQ attention over one attend call and kv head, nq rows. Both
/// tables are [group][code][row], so the nq rows of one (group, code) are adjacent.
///   score   [kgroups][2^kcbits][nq]  q_r . centroid(group, code), built by cq_tables
///   weight  [vgroups][2^vcbits][nq]  sum over the tokens with that value code of their
///                                    probability exp(logit - wmax_r); cq_finish turns it
///                                    into output with one product by the centroids
///   wmax    [nq]                     the running max `weight` is relative to (-inf: empty)
struct CqTables {
  const float* score;
  float* weight;
  float* wmax;
  /// The value centroids [vgroups][2^vcbits][vchannels] (may be null). With them attend_cq
  /// may add a page's value side straight into st.o instead of into `weight` (kernel_table.h,
  /// attend_cq); cq_finish then adds only what went into `weight`.
  const float* vcen = nullptr;
  int vchannels = 0;
};

/// One NUQ page, its parts located (layout above; docs/formats.md). klevels / vlevels are the
/// 2^kbits / 2^vbits ascending levels the codes index.
struct NuqPage {
  const std::uint16_t* kscale;  // [ntok] f16
  const std::uint16_t* vscale;  // [ntok] f16
  const std::uint8_t* kcodes;   // [ntok][row_bytes(d, kbits)]
  const std::uint8_t* vcodes;   // [ntok][row_bytes(d, vbits)]
  const float* klevels;
  const float* vlevels;
  int kbits, vbits;
};

struct KernelTable {
  const char* name;

  // --- dtype conversion (round to nearest even; exact inverse) ---
  void (*f32_to_f16)(const float* src, std::uint16_t* dst, std::size_t n) noexcept;
  void (*f16_to_f32)(const std::uint16_t* src, float* dst, std::size_t n) noexcept;
  void (*f32_to_bf16)(const float* src, std::uint16_t* dst, std::size_t n) noexcept;
  void (*bf16_to_f32)(const std::uint16_t* src, float* dst, std::size_t n) noexcept;

  // --- dense pages: k, v are [ntok][d] contiguous ---
  // s[r][j] = dot(q[r], k[j])
  void (*scores_f32)(const float* q, int nq, const float* k, int ntok, int d, float* s) noexcept;
  void (*scores_f16)(const float* q, int nq, const std::uint16_t* k, int ntok, int d, float* s) noexcept;
  void (*scores_bf16)(const float* q, int nq, const std::uint16_t* k, int ntok, int d, float* s) noexcept;
  // o[r][c] += sum_j p[r][j] * v[j][c]
  void (*accum_f32)(const float* p, int nq, const float* v, int ntok, int d, float* o) noexcept;
  void (*accum_f16)(const float* p, int nq, const std::uint16_t* v, int ntok, int d, float* o) noexcept;
  void (*accum_bf16)(const float* p, int nq, const std::uint16_t* v, int ntok, int d, float* o) noexcept;

  // --- online softmax over one block of logits ---
  // Per row r: mnew = max(m[r], max_j s[r][j]); o[r] *= exp(m[r] - mnew);
  // l[r] = l[r] * exp(m[r] - mnew) + sum_j exp(s[r][j] - mnew); s[r][j] = exp(s[r][j] - mnew);
  // m[r] = mnew. Logits of -inf (masked tokens) give probability 0; a row whose m stays
  // -inf is left with p = 0 and o, l unchanged.
  void (*softmax_block)(float* s, int nq, int ntok, float* m, float* l, float* o, int d) noexcept;

  // --- KIVI (layout and rounding rule above) ---
  void (*kivi_quant_keys)(const float* k, int ntok, int d, int bits, std::uint16_t* scale,
                          std::uint16_t* zero, std::uint8_t* codes) noexcept;
  void (*kivi_quant_values)(const float* v, int ntok, int d, int bits, int vgroup,
                            std::uint16_t* scale, std::uint16_t* zero, std::uint8_t* codes) noexcept;
  void (*kivi_dequant_keys)(const std::uint16_t* scale, const std::uint16_t* zero,
                            const std::uint8_t* codes, int ntok, int d, int bits, float* k) noexcept;
  void (*kivi_dequant_values)(const std::uint16_t* scale, const std::uint16_t* zero,
                              const std::uint8_t* codes, int ntok, int d, int bits, int vgroup,
                              float* v) noexcept;
  // s[r][j] = dot(q[r], dequant(k[j])), computed on the codes: the per-channel scale is
  // folded into the query and the zero point into one constant per row.
  void (*kivi_scores)(const float* q, int nq, const std::uint16_t* scale, const std::uint16_t* zero,
                      const std::uint8_t* codes, int ntok, int d, int bits, float* s) noexcept;
  // o[r][c] += sum_j p[r][j] * dequant(v[j][c]), computed on the codes.
  void (*kivi_accum)(const float* p, int nq, const std::uint16_t* scale, const std::uint16_t* zero,
                     const std::uint8_t* codes, int ntok, int d, int bits, int vgroup, float* o) noexcept;

  // --- fused block attention: scores, mask, online-softmax update and value sum in one
  // call per block (a page, or a run of full-precision rows). q as above; st.s holds at
  // least nq * ntok floats. Equivalent to scores_*, mask_block, softmax_block, the probs
  // copy and accum_* in sequence; the fused kernels keep the logits in cache and convert
  // per-page parameters once.
  void (*mask_block)(float* s, int nq, int ntok, const BlockMask& mask) noexcept;
  void (*attend_f32)(const float* q, int nq, const float* k, const float* v, int ntok, int d, const BlockMask& mask,
                     OnlineState& st) noexcept;
  void (*attend_f16)(const float* q, int nq, const std::uint16_t* k, const std::uint16_t* v, int ntok, int d,
                     const BlockMask& mask, OnlineState& st) noexcept;
  void (*attend_bf16)(const float* q, int nq, const std::uint16_t* k, const std::uint16_t* v, int ntok, int d,
                      const BlockMask& mask, OnlineState& st) noexcept;
  void (*attend_kivi)(const float* q, int nq, const KiviPage& page, int ntok, int d, const BlockMask& mask,
                      OnlineState& st) noexcept;
  // attend_kivi with 8-bit integer dot products (semantics above, "KIVI attention with 8-bit
  // integer dot products"): any kbits, vbits, vgroup, d and ntok.
  void (*attend_kivi_q8)(const float* q, int nq, const KiviPage& page, int ntok, int d, const BlockMask& mask,
                         OnlineState& st) noexcept;

  // --- CQ (CqPage, CqTables above) ---
  // Across ISAs (tests/kernels_cq_test.cpp): cq_scores and cq_accum of every table are
  // bit-identical to the scalar table's given the same tables, p and m (each logit sums its
  // groups in order 0..G-1, each weight its tokens in order; the rescale multiplies by the same
  // expf); cq_tables and cq_finish are within 1e-6 of the sum of |terms| (FMA contraction);
  // attend_cq gives identical logits and m, and p, l, weights and outputs within 2e-6
  // relative (the vector exp of softmax_block; p within 2e-6 * p * (1 + |ln p|)). Against
  // double-precision attention over the decoded rows the normalized output is within 1e-5
  // relative L2. The AVX2 and AVX-512 tables run src/kernels/avx2/cq_simd-inl.h (any nq, code
  // width, ntok; vector code for 4- and 8-bit codes, cq_tables/cq_finish at nq 4 and 8,
  // cq_encode at C 4 and 8), else the plain C++ of src/kernels/cq-inl.h.
  // score[g][k][r] = sum_c q[r][g·C + c] * centroids[g][k][c] for the groups·C = d channels;
  // centroids [groups][count][C].
  void (*cq_tables)(const float* q, int nq, const float* centroids, int groups, int count, int C,
                    float* score) noexcept;
  // s[r][j] = sum_g score[g][code_jg][r] (keys of the page).
  void (*cq_scores)(int nq, const CqPage& page, const CqTables& t, int ntok, float* s) noexcept;
  // Rescales row r of t.weight from t.wmax[r] to m[r] (and sets t.wmax[r] = m[r]) unless m[r]
  // is -inf, then adds p[r][j] to weight[g][code_jg][r] for every value group g.
  void (*cq_accum)(const float* p, int nq, const CqPage& page, const CqTables& t, const float* m,
                   int ntok) noexcept;
  // Fused: cq_scores, mask, online softmax, probs copy, cq_accum at the updated max. The
  // value side goes into t.weight as cq_accum's, except that a table may add it straight into
  // st.o (o[r] += p[r][j] * centroid(g, code_jg), after the softmax step's rescale) when
  // t.vcen is set; the AVX2 and AVX-512 tables do at 256 centroids of 4 channels, 4 rows and
  // pages of 128+ tokens, where a 128 KB weight table read and written per token costs more
  // than reading the centroids. Either way o after cq_finish is the same attention.
  void (*attend_cq)(int nq, const CqPage& page, const CqTables& t, int ntok, int d, const BlockMask& mask,
                    OnlineState& st) noexcept;
  // o[r][g·C + c] += exp(wmax[r] - m[r]) * sum_k weight[g][k][r] * centroids[g][k][c], for
  // rows whose wmax is finite; then clears weight and sets wmax to -inf.
  void (*cq_finish)(float* weight, float* wmax, const float* m, int nq, const float* centroids, int groups,
                    int count, int C, float* o, int d) noexcept;
  // Codes one row of groups·C floats: for each group g the index of the nearest of its count
  // centroids ([groups][count][C]), OR-ed LSB-first into row (row_bytes(groups, log2 count)
  // bytes, zeroed by the caller). The distance is kvslim::nearest's, term by term in float
  // (sum over c in order of (x_c - centroid_c)^2, no FMA), lowest index on ties, so every
  // table writes the same codes as the scalar one.
  void (*cq_encode)(const float* x, const float* centroids, int groups, int count, int C,
                    std::uint8_t* row) noexcept;

  // --- Hadamard rotation (recipe key rotate=hadamard; kvslim/policy/rotation.h) ---
  // For each of the n rows x[r] of d floats (row stride d): x[r] <- post * H(pre * x[r])
  // elementwise, pre/post of d floats (null: 1). H is block-diagonal, unnormalized: blocks of
  // the sizes of d's binary digits, largest first (d = 96: channels [0, 64) then [64, 96)),
  // each the Walsh-Hadamard butterfly network: for h = 1, 2, 4, ... < block, for every pair
  // (i, i + h) with i & h == 0: (a, b) <- (a + b, a - b). Every table computes the same
  // float operations in the same order, so results are bit-identical across ISAs.
  void (*hadamard_rows)(float* x, int n, int d, const float* pre, const float* post) noexcept;

  // --- RoPE of pre-RoPE keys (CacheConfig::pre_rope_keys; src/cache/rope.h) ---
  // Rows x [n][d]; row j is skipped if off[j] < 0, else its angles are the block's base
  // angles (cb, sb: cos/sin per pair, [half]) advanced by table row off[j] of oc/os
  // ([*][half], cos/sin of off * freq_i):
  //   c_i = cb_i * oc_i - sb_i * os_i,   s_i = sb_i * oc_i + cb_i * os_i
  // and pair i — channels (i, i + half), or (2i, 2i + 1) if interleaved — turns:
  //   (a, b) <- (a * c_i - b * s_i, a * s_i + b * c_i).
  // SIMD tables may contract these into FMAs: results agree with the scalar table to a few
  // ulp (tests/pre_rope_test.cpp). Channels from 2 * half on are left as they are.
  void (*rope_rows)(float* x, int n, int d, int half, bool interleaved, const float* cb, const float* sb,
                    const float* oc, const float* os, const int* off) noexcept;
  // --- NUQ (layout and rule above; bits 1..4, levels [2^bits] ascending) ---
  // Codes and scales of ntok rows x [ntok][d]: scale [ntok] f16 bits, codes [ntok][row_bytes(d,
  // bits)] (fully written, padding bits 0). Bit-identical on every table.
  void (*nuq_quant)(const float* x, int ntok, int d, int bits, const float* levels, std::uint16_t* scale,
                    std::uint8_t* codes) noexcept;
  // x[j][c] = f32(scale[j]) * levels[code_jc].
  void (*nuq_dequant)(const std::uint16_t* scale, const std::uint8_t* codes, int ntok, int d, int bits,
                      const float* levels, float* x) noexcept;
  // s[r][j] = f32(scale[j]) * sum_c q[r][c] * levels[code_jc], on the codes.
  void (*nuq_scores)(const float* q, int nq, const std::uint16_t* scale, const std::uint8_t* codes, int ntok, int d,
                     int bits, const float* levels, float* s) noexcept;
  // o[r][c] += sum_j (p[r][j] * f32(scale[j])) * levels[code_jc], on the codes.
  void (*nuq_accum)(const float* p, int nq, const std::uint16_t* scale, const std::uint8_t* codes, int ntok, int d,
                    int bits, const float* levels, float* o) noexcept;
  // Fused (same contract as attend_kivi): nuq_scores on the keys, mask_block, softmax_block,
  // the probs copy, nuq_accum on the values; OnlineState::prefetch issued in bursts.
  void (*attend_nuq)(const float* q, int nq, const NuqPage& page, int ntok, int d, const BlockMask& mask,
                     OnlineState& st) noexcept;
};

/// The table for an ISA, or nullptr if its kernels were not built into this library.
const KernelTable* table_for(int isa) noexcept;
/// The table of the active ISA (see kvslim/cpu/isa.h). Resolved once; cheap to call.
const KernelTable& active();

namespace scalar {
extern const KernelTable kTable;
}

}  // namespace kvslim::kernels
