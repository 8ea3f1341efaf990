// KIVI (Liu et al., 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache"):
// keys quantized per channel over a page of `group` tokens, values per token over groups of
// `vgroup` channels, asymmetric (f16 scale + zero point), newest `residual` tokens kept in
// full precision. kbits and vbits are each 1, 2, 3, 4 or 8 (1 bit: the uniform 1-bit baseline,
// codes 0/1 = group min/max). Page layout (docs/formats.md):
//   kscale[d] kzero[d] | kcodes[group][row_bytes(d,kbits)] | pad to 2 |
//   vscale[group][d/vgroup] vzero[group][d/vgroup] | vcodes[group][row_bytes(d,vbits)]
// qbits=8 (default 0: full precision) makes attend() compute q.k and p.v with 8-bit integer
// dot products (kernel_table.h, attend_kivi_q8); the page format is the same, and scores() /
// accumulate() (the non-fused path and tests) stay full precision.
//
// outliers=F (dense-and-sparse, KVQuant): per page, the keys' ceil(F·ntok·d) entries farthest
// from their channel's page mean in units of the channel's rms deviation, and per token the
// values' round(F·d) entries (at least 1) farthest from the token's mean, are kept exactly
// (f16 value + index) in a side list at the end of the page and left out of the min/max that
// sets the scales (their slot holds a value inside the others' range, so the codes stay
// dense). Attention adds their exact part, f16(x) - dequant(code), to the logits and the
// output (docs/outliers.md).
#include <algorithm>
#include <cmath>
#include <functional>
#include <vector>

#include "check.h"
#include "kvslim/kernels/kernel_table.h"
#include "policy/codecs.h"

namespace kvslim::detail {
namespace {

class KiviCodec final : public Codec {
 public:
  KiviCodec(int kbits, int vbits, int vgroup, int qbits, double outliers, PagingOptions o)
      : kbits_(kbits), vbits_(vbits), vgroup_(vgroup), qbits_(qbits), outliers_(outliers), o_(o) {}

  // Offsets of a page of ntok tokens (docs/formats.md). With outliers, the side list follows
  // the value codes (2-aligned): key entries kidx[nk][2] (token, channel) and kval[nk], then
  // value entries vidx[ntok][nv] (channel) and vval[ntok][nv]; all uint16, values f16.
  struct Layout {
    std::size_t kcodes, vscale, vzero, vcodes, bytes;
    int nk = 0, nv = 0;  // key outliers per page, value outliers per token
    std::size_t kidx = 0, kval = 0, vidx = 0, vval = 0;
  };
  int key_outliers(int ntok, int d) const {
    return outliers_ > 0 ? std::max(1, static_cast<int>(std::ceil(outliers_ * ntok * d - 1e-9))) : 0;
  }
  int value_outliers(int d) const {
    return outliers_ > 0 ? std::min(d, std::max(1, static_cast<int>(std::lround(outliers_ * d)))) : 0;
  }
  Layout layout(int ntok, int d) const {
    const std::size_t g = static_cast<std::size_t>(ntok);
    Layout l;
    l.kcodes = 4u * static_cast<std::size_t>(d);
    l.vscale = l.kcodes + g * static_cast<std::size_t>(kernels::row_bytes(d, kbits_));
    l.vscale += l.vscale & 1u;  // f16 alignment
    const std::size_t ng = static_cast<std::size_t>(d / vgroup_);
    l.vzero = l.vscale + 2u * g * ng;
    l.vcodes = l.vzero + 2u * g * ng;
    l.bytes = l.vcodes + g * static_cast<std::size_t>(kernels::row_bytes(d, vbits_));
    if (outliers_ > 0) {
      l.nk = key_outliers(ntok, d);
      l.nv = value_outliers(d);
      l.kidx = l.bytes + (l.bytes & 1u);
      l.kval = l.kidx + 4u * static_cast<std::size_t>(l.nk);
      l.vidx = l.kval + 2u * static_cast<std::size_t>(l.nk);
      l.vval = l.vidx + 2u * g * static_cast<std::size_t>(l.nv);
      l.bytes = l.vval + 2u * g * static_cast<std::size_t>(l.nv);
    }
    return l;
  }

  std::string describe() const override {
    std::string s = fmt::format("kivi:kbits={},vbits={},group={},vgroup={},residual={},sinks={}", kbits_, vbits_,
                                o_.group, vgroup_, o_.residual, o_.sinks);
    if (qbits_) s += fmt::format(",qbits={}", qbits_);  // only when set: existing texts unchanged
    if (outliers_ > 0) s += fmt::format(",outliers={}", outliers_);
    return s + rotation_text(o_.rotation);
  }
  int page_tokens() const override { return o_.group; }
  int residual() const override { return o_.residual; }
  int sinks() const override { return o_.sinks; }
  RotationSpec rotation() const override { return o_.rotation; }
  std::size_t page_bytes(int ntok, int d) const override { return layout(ntok, d).bytes; }
  bool page_ok(const std::byte* page, int ntok, int d) const override {
    if (outliers_ <= 0) return true;
    const Layout l = layout(ntok, d);
    const std::uint16_t* kidx = u16(page + l.kidx);
    for (int e = 0; e < l.nk; ++e)
      if (kidx[2 * e] >= ntok || kidx[2 * e + 1] >= d) return false;
    const std::uint16_t* vidx = u16(page + l.vidx);
    for (std::size_t e = 0; e < static_cast<std::size_t>(ntok) * l.nv; ++e)
      if (vidx[e] >= d) return false;
    return true;
  }
  std::size_t outlier_bytes(int ntok, int d) const override {
    const Layout l = layout(ntok, d);
    return outliers_ > 0 ? l.bytes - l.kidx : 0;
  }
  void check_rows(const float* k, const float* v, int ntok, int d) const override {
    check_f16_range("kivi", k, ntok, d, "key");
    check_f16_range("kivi", v, ntok, d, "value");
  }
  void encode(const kernels::KernelTable& kt, const float* k, const float* v, int ntok, int d,
              std::byte* page) const override {
    const Layout l = layout(ntok, d);
    // The byte that aligns the value scales (an odd key-code size) is zero: every byte of a
    // page is defined, so equal pages are equal bytes (a saved cache, a checksum).
    const std::size_t kend = l.kcodes + static_cast<std::size_t>(ntok) * kernels::row_bytes(d, kbits_);
    if (l.vscale > kend) page[kend] = std::byte{0};
    if (outliers_ > 0) return encode_with_outliers(kt, k, v, ntok, d, page, l);
    kt.kivi_quant_keys(k, ntok, d, kbits_, u16(page), u16(page) + d, u8(page + l.kcodes));
    kt.kivi_quant_values(v, ntok, d, vbits_, vgroup_, u16(page + l.vscale), u16(page + l.vzero), u8(page + l.vcodes));
  }
  void decode(const kernels::KernelTable& kt, const std::byte* page, int ntok, int d, float* k,
              float* v) const override {
    decode_keys(kt, page, ntok, d, k, v);
    const Layout l = layout(ntok, d);
    kt.kivi_dequant_values(u16(page + l.vscale), u16(page + l.vzero), u8(page + l.vcodes), ntok, d, vbits_, vgroup_,
                           v);
    if (outliers_ > 0) for_outliers(kt, page, l, ntok, d, true, [&](int j, int c, float delta) { v[j * d + c] += delta; });
  }
  void decode_keys(const kernels::KernelTable& kt, const std::byte* page, int ntok, int d, float* k,
                   float* /*scratch*/) const override {
    const Layout l = layout(ntok, d);
    kt.kivi_dequant_keys(u16(page), u16(page) + d, u8(page + l.kcodes), ntok, d, kbits_, k);
    if (outliers_ > 0)
      for_outliers(kt, page, l, ntok, d, false, [&](int j, int c, float delta) { k[j * d + c] += delta; });
  }
  void scores(const kernels::KernelTable& kt, const std::byte* page, int ntok, int d, const float* q, int nq,
              float* s) const override {
    const Layout l = layout(ntok, d);
    kt.kivi_scores(q, nq, u16(page), u16(page) + d, u8(page + l.kcodes), ntok, d, kbits_, s);
    if (outliers_ > 0)
      for_outliers(kt, page, l, ntok, d, false, [&](int j, int c, float delta) {
        for (int r = 0; r < nq; ++r) s[r * ntok + j] += q[r * d + c] * delta;
      });
  }
  void accumulate(const kernels::KernelTable& kt, const std::byte* page, int ntok, int d, const float* p, int nq,
                  float* o) const override {
    const Layout l = layout(ntok, d);
    kt.kivi_accum(p, nq, u16(page + l.vscale), u16(page + l.vzero), u8(page + l.vcodes), ntok, d, vbits_, vgroup_, o);
    if (outliers_ > 0)
      for_outliers(kt, page, l, ntok, d, true, [&](int j, int c, float delta) {
        for (int r = 0; r < nq; ++r) o[r * d + c] += p[r * ntok + j] * delta;
      });
  }
  void attend_page(const kernels::KernelTable& kt, const std::byte* page, int ntok, int d, const float* q,
                   std::byte* /*prepared*/, int nq, const kernels::BlockMask& mask,
                   kernels::OnlineState& st) const override {
    // Pages with a side list take the composed path (scores, then the outliers' exact part
    // added to the logits; accumulate, then theirs to the output).
    if (outliers_ > 0) return Codec::attend_page(kt, page, ntok, d, q, nullptr, nq, mask, st);
    const Layout l = layout(ntok, d);
    const kernels::KiviPage pg{u16(page), u16(page) + d,          u8(page + l.kcodes), u16(page + l.vscale),
                               u16(page + l.vzero), u8(page + l.vcodes), kbits_, vbits_, vgroup_};
    if (qbits_ == 8)
      kt.attend_kivi_q8(q, nq, pg, ntok, d, mask, st);
    else
      kt.attend_kivi(q, nq, pg, ntok, d, mask, st);
  }

 private:
  // f(token, channel, exact - dequantized) for the side-list entries of the page: the keys',
  // or the values' if `values`. The f16 fields are widened with the kernel
  // table's f16_to_f32 (vector code) into per-thread buffers first: converting them one
  // at a time in portable code was most of a side-list page's attention time.
  template <class F>
  void for_outliers(const kernels::KernelTable& kt, const std::byte* page, const Layout& l, int ntok, int d,
                    bool values, F&& f) const {
    thread_local std::vector<float> buf;
    const int ng = d / vgroup_;
    const std::size_t nvt = static_cast<std::size_t>(ntok) * l.nv, nsz = static_cast<std::size_t>(ntok) * ng;
    buf.resize(std::max<std::size_t>(2u * d + l.nk, nvt + 2u * nsz));
    if (!values) {
      float* ks = buf.data();
      float* kz = ks + d;
      float* kv = kz + d;
      kt.f16_to_f32(u16(page), ks, static_cast<std::size_t>(2 * d));  // kscale then kzero
      kt.f16_to_f32(u16(page + l.kval), kv, static_cast<std::size_t>(l.nk));
      const std::uint16_t* kidx = u16(page + l.kidx);
      const std::uint8_t* kc = u8(page + l.kcodes);
      const int krow = kernels::row_bytes(d, kbits_);
      for (int e = 0; e < l.nk; ++e) {
        const int j = kidx[2 * e], c = kidx[2 * e + 1];
        f(j, c, kv[e] - (static_cast<float>(code_at(kc + j * krow, c, kbits_)) * ks[c] + kz[c]));
      }
    } else {
      float* vv = buf.data();
      float* vs = vv + nvt;
      float* vz = vs + nsz;
      kt.f16_to_f32(u16(page + l.vval), vv, nvt);
      kt.f16_to_f32(u16(page + l.vscale), vs, 2 * nsz);  // vscale then vzero
      const std::uint16_t* vidx = u16(page + l.vidx);
      const std::uint8_t* vc = u8(page + l.vcodes);
      const int vrow = kernels::row_bytes(d, vbits_);
      for (int j = 0; j < ntok; ++j)
        for (int e = 0; e < l.nv; ++e) {
          const int c = vidx[j * l.nv + e], g = c / vgroup_;
          const float base =
              static_cast<float>(code_at(vc + j * vrow, c, vbits_)) * vs[j * ng + g] + vz[j * ng + g];
          f(j, c, vv[static_cast<std::size_t>(j) * l.nv + e] - base);
        }
    }
  }
  static unsigned code_at(const std::uint8_t* row, int c, int bits) {
    const int bit = c * bits;
    unsigned w = row[bit >> 3];
    if ((bit & 7) + bits > 8) w |= static_cast<unsigned>(row[(bit >> 3) + 1]) << 8;
    return (w >> (bit & 7)) & ((1u << bits) - 1u);
  }

  // The k largest of score[0..n) in the total order (score descending, index ascending on
  // ties: the same picks on every platform), written to out in index order. One pass with a
  // min-heap of the k best so far: most entries lose the one comparison with the heap's top,
  // a well-predicted branch (nth_element or a partial sort of the indices, whose comparisons
  // mispredict, made the encode 1.2-1.5x slower).
  static void top_k(const float* score, int n, int k, std::vector<std::pair<float, int>>& heap, int* out) {
    // Heap order: the worst kept entry on top (lowest score; on equal scores the higher index,
    // which loses the tie).
    const auto worse = [](const std::pair<float, int>& a, const std::pair<float, int>& b) {
      return a.first != b.first ? a.first > b.first : a.second < b.second;
    };
    if (k == 1) {  // the common case for values (round(F·d) = 1): the first maximum
      int best = 0;
      for (int i = 1; i < n; ++i)
        if (score[i] > score[best]) best = i;
      out[0] = best;
      return;
    }
    heap.clear();
    for (int i = 0; i < n; ++i) {
      if (static_cast<int>(heap.size()) < k) {
        heap.emplace_back(score[i], i);
        std::push_heap(heap.begin(), heap.end(), worse);
      } else if (score[i] > heap.front().first) {  // an equal score has a higher index: it loses
        std::pop_heap(heap.begin(), heap.end(), worse);
        heap.back() = {score[i], i};
        std::push_heap(heap.begin(), heap.end(), worse);
      }
    }
    for (int m = 0; m < k; ++m) out[m] = heap[static_cast<std::size_t>(m)].second;
    std::sort(out, out + k);
  }

  // Picks the outliers, parks a value inside the others' range in their slots, quantizes,
  // and writes the side list (module comment).
  void encode_with_outliers(const kernels::KernelTable& kt, const float* k, const float* v, int ntok, int d,
                            std::byte* page, const Layout& l) const {
    const std::size_t n = static_cast<std::size_t>(ntok) * d;
    if (l.kidx > l.vcodes + static_cast<std::size_t>(ntok) * kernels::row_bytes(d, vbits_))
      page[l.kidx - 1] = std::byte{0};  // the alignment pad: every byte of a page is defined
    std::vector<float> kk(k, k + n), vv(v, v + n), score(n);
    std::vector<std::pair<float, int>> tmp;
    std::vector<int> order(static_cast<std::size_t>(l.nk));
    std::vector<char> taken(n, 0);
    // Keys: z-score within the channel over the page's tokens. Row by row with per-channel
    // sums (contiguous, vectorizable); the deviation is summed in double around the mean.
    std::vector<double> cmean(static_cast<std::size_t>(d), 0.0), cvar(cmean.size(), 0.0);
    std::vector<float> cinv(cmean.size());
    for (int j = 0; j < ntok; ++j)
      for (int c = 0; c < d; ++c) cmean[c] += k[j * d + c];
    for (int c = 0; c < d; ++c) cmean[c] /= ntok;
    for (int j = 0; j < ntok; ++j)
      for (int c = 0; c < d; ++c) cvar[c] += (k[j * d + c] - cmean[c]) * (k[j * d + c] - cmean[c]);
    for (int c = 0; c < d; ++c) cinv[c] = static_cast<float>(1.0 / (std::sqrt(cvar[c] / ntok) + 1e-30));
    for (int j = 0; j < ntok; ++j)
      for (int c = 0; c < d; ++c)
        score[j * d + c] = std::fabs(k[j * d + c] - static_cast<float>(cmean[c])) * cinv[c];
    top_k(score.data(), static_cast<int>(n), l.nk, tmp, order.data());
    std::uint16_t* kidx = u16(page + l.kidx);
    std::uint16_t* kval = u16(page + l.kval);
    for (int e = 0; e < l.nk; ++e) {
      const int i = order[e];
      taken[i] = 1;
      kidx[2 * e] = static_cast<std::uint16_t>(i / d);
      kidx[2 * e + 1] = static_cast<std::uint16_t>(i % d);
      kval[e] = f32_to_f16(k[i]);
    }
    // Park each outlier at its channel's mean, clamped to the range of the channel's other
    // entries (only channels that hold an outlier are scanned).
    for (int e = 0; e < l.nk; ++e) {
      const int c = order[e] % d;
      float mn = INFINITY, mx = -INFINITY;
      for (int j = 0; j < ntok; ++j)
        if (!taken[j * d + c]) mn = std::min(mn, k[j * d + c]), mx = std::max(mx, k[j * d + c]);
      // Every entry of the channel an outlier: nothing to protect, the slot keeps its value.
      if (mn <= mx) kk[order[e]] = std::clamp(static_cast<float>(cmean[c]), mn, mx);
    }
    // Values: per token, distance from the token's mean; each outlier parked at its value
    // group's mean, clamped to the group's other entries (only groups that hold one).
    std::uint16_t* vidx = u16(page + l.vidx);
    std::uint16_t* vval = u16(page + l.vval);
    std::vector<int> ch(static_cast<std::size_t>(l.nv));
    std::vector<char> vt(static_cast<std::size_t>(d));
    std::vector<float> dist(static_cast<std::size_t>(d));
    for (int j = 0; j < ntok; ++j) {
      const float* x = v + static_cast<std::size_t>(j) * d;
      double mean = 0.0;
      for (int c = 0; c < d; ++c) mean += x[c];
      mean /= d;
      for (int c = 0; c < d; ++c) dist[c] = static_cast<float>(std::fabs(x[c] - mean));
      top_k(dist.data(), d, l.nv, tmp, ch.data());
      std::fill(vt.begin(), vt.end(), 0);
      for (int e = 0; e < l.nv; ++e) {
        vt[ch[e]] = 1;
        vidx[j * l.nv + e] = static_cast<std::uint16_t>(ch[e]);
        vval[j * l.nv + e] = f32_to_f16(x[ch[e]]);
      }
      for (int e = 0; e < l.nv; ++e) {
        const int g0 = ch[e] / vgroup_ * vgroup_;
        float mn = INFINITY, mx = -INFINITY;
        double gm = 0.0;
        for (int c = g0; c < g0 + vgroup_; ++c) {
          gm += x[c];
          if (!vt[c]) mn = std::min(mn, x[c]), mx = std::max(mx, x[c]);
        }
        if (mn <= mx) vv[static_cast<std::size_t>(j) * d + ch[e]] = std::clamp(static_cast<float>(gm / vgroup_), mn, mx);
      }
    }
    kt.kivi_quant_keys(kk.data(), ntok, d, kbits_, u16(page), u16(page) + d, u8(page + l.kcodes));
    kt.kivi_quant_values(vv.data(), ntok, d, vbits_, vgroup_, u16(page + l.vscale), u16(page + l.vzero),
                         u8(page + l.vcodes));
  }

  static std::uint16_t* u16(std::byte* p) { return reinterpret_cast<std::uint16_t*>(p); }
  static const std::uint16_t* u16(const std::byte* p) { return reinterpret_cast<const std::uint16_t*>(p); }
  static std::uint8_t* u8(std::byte* p) { return reinterpret_cast<std::uint8_t*>(p); }
  static const std::uint8_t* u8(const std::byte* p) { return reinterpret_cast<const std::uint8_t*>(p); }

  int kbits_, vbits_, vgroup_, qbits_;
  double outliers_;
  PagingOptions o_;
};

int read_bits(StageParams& p, const char* key) {
  const int b = p.get_int(key, 2, -1000000, 1000000);
  KVSLIM_CHECK(b == 1 || b == 2 || b == 3 || b == 4 || b == 8, ErrorCode::kInvalidArgument,
               "recipe stage 'kivi': {}={} is not a supported bit width (1, 2, 3, 4 or 8)", key, b);
  return b;
}

}  // namespace

BuiltStage make_kivi_codec(StageParams& p, int head_dim) {
  const int kbits = read_bits(p, "kbits");
  const int vbits = read_bits(p, "vbits");
  // Default: the largest divisor of head_dim that is at most 32 (32 for 64/96/128/256, 20
  // for 80, 25 for 100, 28 for 112), so every real head size works without a key.
  int def_vgroup = std::min(32, head_dim);
  while (head_dim % def_vgroup != 0) --def_vgroup;
  const int vgroup = p.get_int("vgroup", def_vgroup, 1, 1 << 16);
  KVSLIM_CHECK(head_dim % vgroup == 0, ErrorCode::kInvalidArgument,
               "recipe stage 'kivi': vgroup={} does not divide head_dim {}", vgroup, head_dim);
  // qbits: precision of the query and the value weights in attention (0: f32; 8: int8 dot
  // products). A non-integer is Error(kRecipe) from get_int; any other integer names itself.
  const int qbits = p.get_int("qbits", 0, -1000000, 1000000);
  KVSLIM_CHECK(qbits == 0 || qbits == 8, ErrorCode::kInvalidArgument,
               "recipe stage 'kivi': qbits={} is not supported (0: full-precision attention, 8: 8-bit integer dot "
               "products)",
               qbits);
  // outliers: the fraction kept exactly (dense-and-sparse); the paper's 1% is 0.01.
  const double outliers = p.get_double("outliers", 0.0, -1e300, 1e300);
  KVSLIM_CHECK(outliers >= 0.0 && outliers <= 0.1, ErrorCode::kInvalidArgument,
               "recipe stage 'kivi': outliers={} is outside [0, 0.1] (the fraction of values kept exactly)", outliers);
  KVSLIM_CHECK(outliers == 0.0 || qbits == 0, ErrorCode::kInvalidArgument,
               "recipe stage 'kivi': outliers={} with qbits={} is not supported (the 8-bit path has no side list)",
               outliers, qbits);
  PagingOptions o = read_paging(p, PagingOptions{32, 128, 0});
  o.rotation = read_rotation(p);
  p.check_all_used(
      {"kbits", "vbits", "group", "vgroup", "residual", "sinks", "qbits", "outliers", "rotate", "seed", "rotated"});
  BuiltStage b{StageKind::kCodec, nullptr, nullptr, nullptr, nullptr};
  b.codec = std::make_shared<KiviCodec>(kbits, vbits, vgroup, qbits, outliers, o);
  return b;
}

}  // namespace kvslim::detail
